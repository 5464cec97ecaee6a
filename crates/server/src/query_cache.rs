//! The query cache's shared adapter ([`keel_kernel::query_cache`]): Redis,
//! so that every keel of a deployment sees one cache, and an invalidation at
//! a command's commit is seen by every process.
//!
//! Keys live under `<deployment>:<database instance>:qcache:` like the rate
//! limiter's: `gen:<tag>` holds a tag's generation, `entry:<key>@<generations>`
//! an answer. A put is one Lua script that stores only if every generation is
//! still the one the reader read before its database read; an invalidation
//! is one script that moves them. Generations come from Redis's clock
//! (microseconds, never less than the last one plus one), and one that is
//! absent, expired or evicted is created anew from the clock, so a tag never
//! returns to a generation it had: an entry once unreachable stays so.
//!
//! While Redis cannot answer, every call fails at once and the bus bypasses
//! the cache: queries read the database.

use std::time::Duration;

use async_trait::async_trait;
use fred::prelude::*;
use keel_kernel::Error;
use keel_kernel::query_cache::QueryCache;

// The features keel builds fred with have scripts, not key commands.
const GET_SCRIPT: &str = "return redis.call('GET', KEYS[1])";

// The tags' generations. An absent generation (never invalidated, expired,
// evicted) is created from the clock, a value this tag never had: entries
// stored under an earlier one stay unreachable. A tag that a write holds
// (HOLD_SCRIPT: a live member in its hold set) makes the answer 'held'.
const GENERATIONS_SCRIPT: &str = r"
-- KEYS[1..n]: the tags' generation keys; KEYS[n+1..2n]: their hold sets.
-- ARGV[1]: twice the TTL in seconds.
if redis.replicate_commands then redis.replicate_commands() end
local n = #KEYS / 2
local time = redis.call('TIME')
local micros = tonumber(time[1]) * 1000000 + tonumber(time[2])
local now = string.format('%.0f', micros)
local generations = {}
for i = 1, n do
  redis.call('ZREMRANGEBYSCORE', KEYS[n + i], '-inf', micros)
  if redis.call('ZCARD', KEYS[n + i]) > 0 then
    return 'held'
  end
  local generation = redis.call('GET', KEYS[i])
  if not generation then
    generation = now
    redis.call('SET', KEYS[i], generation, 'EX', tonumber(ARGV[1]))
  end
  generations[i] = generation
end
return generations
";

const PUT_SCRIPT: &str = r"
-- KEYS[1]: the entry; KEYS[2..]: the tags' generation keys.
-- ARGV[1]: TTL in seconds; ARGV[2]: the value; ARGV[3..]: generations read.
for i = 2, #KEYS do
  local current = tonumber(redis.call('GET', KEYS[i]) or '0')
  if current ~= tonumber(ARGV[i + 1]) then
    return 0
  end
end
local ttl = tonumber(ARGV[1])
redis.call('SET', KEYS[1], ARGV[2], 'EX', ttl)
for i = 2, #KEYS do
  redis.call('EXPIRE', KEYS[i], 2 * ttl)
end
return 1
";

// Moves each generation to a value it never had: the clock, or one more
// than the current one if the clock is behind it; and ends the hold of the
// writer ARGV[2] (if any) on each tag.
const INVALIDATE_SCRIPT: &str = r"
-- KEYS[1..n]: the tags' generation keys; KEYS[n+1..2n]: their hold sets.
-- ARGV[1]: twice the TTL in seconds; ARGV[2]: the writer whose hold ends, or ''.
if redis.replicate_commands then redis.replicate_commands() end
local n = #KEYS / 2
local time = redis.call('TIME')
local now = tonumber(time[1]) * 1000000 + tonumber(time[2])
for i = 1, n do
  local current = tonumber(redis.call('GET', KEYS[i]) or '0')
  local generation = math.max(now, current + 1)
  redis.call('SET', KEYS[i], string.format('%.0f', generation), 'EX', tonumber(ARGV[1]))
  if ARGV[2] ~= '' then
    redis.call('ZREM', KEYS[n + i], ARGV[2])
  end
end
return n
";

// Holds each tag for writer ARGV[3], about to commit: the generation moves
// (entries stored before are unreachable, and a fill that read before now
// stores nothing), and the writer joins the tag's hold set until ARGV[2]
// seconds from now. While any writer's hold is live, GENERATIONS_SCRIPT
// answers 'held': readers neither use nor fill entries. Each writer ends its
// own hold (INVALIDATE_SCRIPT); one whose process died ends at its expiry.
const HOLD_SCRIPT: &str = r"
-- KEYS[1..n]: the tags' generation keys; KEYS[n+1..2n]: their hold sets.
-- ARGV[1]: twice the TTL in seconds; ARGV[2]: the hold's length in seconds;
-- ARGV[3]: the writer.
if redis.replicate_commands then redis.replicate_commands() end
local n = #KEYS / 2
local time = redis.call('TIME')
local now = tonumber(time[1]) * 1000000 + tonumber(time[2])
local hold = tonumber(ARGV[2])
for i = 1, n do
  local current = tonumber(redis.call('GET', KEYS[i]) or '0')
  local generation = math.max(now, current + 1)
  redis.call('SET', KEYS[i], string.format('%.0f', generation), 'EX', tonumber(ARGV[1]))
  redis.call('ZADD', KEYS[n + i], now + hold * 1000000, ARGV[3])
  if redis.call('TTL', KEYS[n + i]) < hold then
    redis.call('EXPIRE', KEYS[n + i], hold)
  end
end
return n
";

/// The query cache on Redis.
pub struct RedisQueryCache {
    client: Client,
    prefix: String,
    ttl_seconds: i64,
    connecting: tokio::task::AbortHandle,
}

impl Drop for RedisQueryCache {
    fn drop(&mut self) {
        self.connecting.abort();
    }
}

impl RedisQueryCache {
    /// Connects in the background: keel starts, and answers from the
    /// database, while Redis is down. `namespace` is the events'
    /// (`<deployment>:<database instance>`).
    pub fn connect(url: &str, namespace: &str, ttl: Duration) -> Result<RedisQueryCache, fred::error::Error> {
        let config = Config::from_url(url)?;
        let client = Builder::from_config(config)
            .with_connection_config(|connection| {
                connection.connection_timeout = Duration::from_secs(2);
                connection.internal_command_timeout = Duration::from_secs(2);
            })
            .with_performance_config(|performance| {
                // A query waits this long for the cache at most, then reads the database.
                performance.default_command_timeout = Duration::from_millis(250);
            })
            .set_policy(ReconnectPolicy::new_exponential(0, 50, 1000, 2))
            .build()?;
        let connecting = client.connect().abort_handle();
        Ok(RedisQueryCache {
            client,
            prefix: format!("{namespace}:qcache:"),
            ttl_seconds: i64::try_from(ttl.as_secs()).unwrap_or(i64::MAX).max(1),
            connecting,
        })
    }

    /// Waits at most `within` for the connection; whether it is up.
    pub async fn connected(&self, within: Duration) -> bool {
        tokio::time::timeout(within, self.client.wait_for_connect())
            .await
            .is_ok_and(|connected| connected.is_ok())
    }

    fn generation_key(&self, tag: &str) -> String {
        format!("{}gen:{tag}", self.prefix)
    }

    /// The tags' generation keys, then their hold sets.
    fn tag_keys(&self, tags: &[String]) -> Vec<String> {
        let generations = tags.iter().map(|tag| self.generation_key(tag));
        let holds = tags.iter().map(|tag| format!("{}hold:{tag}", self.prefix));
        generations.chain(holds).collect()
    }

    fn ready(&self) -> keel_kernel::Result<()> {
        // Not connected: answer at once rather than queue behind a reconnect.
        if self.client.is_connected() {
            Ok(())
        } else {
            Err(Error::unavailable("redis query cache: not connected"))
        }
    }
}

fn unavailable(error: fred::error::Error) -> Error {
    Error::unavailable(format!("redis query cache: {error}"))
}

#[async_trait]
impl QueryCache for RedisQueryCache {
    async fn generations(&self, tags: &[String]) -> keel_kernel::Result<Vec<u64>> {
        self.ready()?;
        if tags.is_empty() {
            return Ok(Vec::new());
        }
        let keys = self.tag_keys(tags);
        let answer: Value = self
            .client
            .eval(GENERATIONS_SCRIPT, keys, vec![2 * self.ttl_seconds])
            .await
            .map_err(unavailable)?;
        if answer.as_str().is_some_and(|answer| answer == "held") {
            return Err(Error::unavailable(
                "redis query cache: a tag is held by a write in progress",
            ));
        }
        let values: Vec<Option<String>> = answer.convert().map_err(unavailable)?;
        Ok(values
            .into_iter()
            .map(|value| {
                value
                    .and_then(|value| value.parse().ok())
                    .ok_or_else(|| Error::internal("redis query cache: a generation that is not a number"))
            })
            .collect::<keel_kernel::Result<Vec<u64>>>()?)
    }

    async fn get(&self, key: &str) -> keel_kernel::Result<Option<Vec<u8>>> {
        self.ready()?;
        self.client
            .eval(GET_SCRIPT, format!("{}entry:{key}", self.prefix), Vec::<Value>::new())
            .await
            .map_err(unavailable)
    }

    async fn put(&self, key: &str, value: Vec<u8>, tags: &[String], generations: &[u64]) -> keel_kernel::Result<bool> {
        self.ready()?;
        if tags.len() != generations.len() {
            return Ok(false);
        }
        let mut keys = vec![format!("{}entry:{key}", self.prefix)];
        keys.extend(tags.iter().map(|tag| self.generation_key(tag)));
        let mut args: Vec<Value> = vec![Value::from(self.ttl_seconds), Value::Bytes(value.into())];
        args.extend(generations.iter().map(|generation| Value::from(generation.to_string())));
        let stored: i64 = self.client.eval(PUT_SCRIPT, keys, args).await.map_err(unavailable)?;
        Ok(stored == 1)
    }

    async fn invalidate(&self, tags: &[String]) -> keel_kernel::Result<()> {
        self.release(tags, "").await
    }

    /// Held for the TTL: a hold outlives any commit, and one whose writer
    /// never ends it ends as the entries it hid would have.
    async fn hold(&self, tags: &[String], writer: &str) -> keel_kernel::Result<()> {
        self.ready()?;
        let args: Vec<Value> = vec![
            Value::from(2 * self.ttl_seconds),
            Value::from(self.ttl_seconds),
            Value::from(writer),
        ];
        let _: i64 = self
            .client
            .eval(HOLD_SCRIPT, self.tag_keys(tags), args)
            .await
            .map_err(unavailable)?;
        Ok(())
    }

    async fn release(&self, tags: &[String], writer: &str) -> keel_kernel::Result<()> {
        self.ready()?;
        let args: Vec<Value> = vec![Value::from(2 * self.ttl_seconds), Value::from(writer)];
        let _: i64 = self
            .client
            .eval(INVALIDATE_SCRIPT, self.tag_keys(tags), args)
            .await
            .map_err(unavailable)?;
        Ok(())
    }
}
