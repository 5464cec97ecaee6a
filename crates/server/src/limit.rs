//! Rate limits at the gRPC tier, so native gRPC, grpc-web, Connect and REST
//! share them: per-method policies from `KEEL_RATE_LIMITS`, each keyed by
//! the caller (the principal, else the client address) or by the client
//! address, checked on the kernel's limiter port
//! ([`keel_kernel::limit::RateLimiter`]).
//!
//! # Layout
//! - [`RedisRateLimiter`]: the port's shared adapter, GCRA as one Lua script
//!   run with EVALSHA (one key per limited key, under the deployment's
//!   namespace), so every keel of a deployment counts against one allowance.
//! - [`SharedRateLimiter`]: Redis with the fallback of
//!   `KEEL_RATE_LIMIT_FALLBACK` while it cannot answer (`local`: each process
//!   limits alone; `open`: nothing is limited; `closed`: everything is refused).
//! - [`Policies`]: which quota a method has and what it is keyed by.
//! - [`AuthFailures`]: failed authentications (a bad bearer token or API
//!   key, a bad stream ticket) counted per client address on the same
//!   limiter (policy `authentication`); an address past it is refused before
//!   its credentials are looked at, until its allowance is back.
//! - [`RateLimitLayer`]: the tower layer. A limited call is answered
//!   RESOURCE_EXHAUSTED with `google.rpc.RetryInfo` and `retry-after`
//!   (429 with `Retry-After` over REST); every limited call, allowed or not,
//!   carries the IETF draft's `ratelimit-policy` and `ratelimit` metadata,
//!   which the edge sends as `RateLimit-Policy` and `RateLimit` headers.

use std::collections::{BTreeMap, HashMap};
use std::net::IpAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use async_trait::async_trait;
use fred::prelude::*;
use futures::future::BoxFuture;
use http::{HeaderMap, HeaderValue, Request, Response};
use keel_kernel::limit::{Decision, InProcessRateLimiter, Quota, RateLimiter};
use keel_kernel::{Error, RequestContext};
use serde::{Deserialize, Serialize};
use tonic::body::Body;
use tower::{Layer, Service};

/// GCRA in one step, atomic in Redis. KEYS[1]: the limited key; ARGV[1]:
/// the emission interval (µs between actions); ARGV[2]: the burst; ARGV[3]:
/// how many more actions to reserve for the caller's process besides this
/// one (a share, see [`RedisRateLimiter`]); ARGV[4]: the share's lifetime
/// (µs). The clock is Redis's own, so processes with skewed clocks agree.
/// Returns `{allowed, µs the theoretical arrival time lies ahead of now
/// (with this action and the share counted when allowed), actions reserved}`.
///
/// Every action GCRA admits owns one slot of `interval` on the key's
/// timeline, starting no earlier than the action and ending at most a
/// burst's time after it; slots never overlap, which is what bounds the
/// admitted actions in any window. A reserved action is taken later (at
/// most the share's lifetime later), so its slot starts no earlier than
/// now + lifetime: the slots between are left unused, and the bound holds
/// for the actions as they are taken.
const GCRA_SCRIPT: &str = r"
local time = redis.call('TIME')
local now = tonumber(time[1]) * 1000000 + tonumber(time[2])
local interval = tonumber(ARGV[1])
local burst = tonumber(ARGV[2])
local wanted = tonumber(ARGV[3] or '0')
local lifetime = tonumber(ARGV[4] or '0')
local tat = tonumber(redis.call('GET', KEYS[1])) or now
if tat < now then tat = now end
local next_tat = tat + interval
local limit = now + interval * burst
if next_tat > limit then
  return {0, tat - now, 0}
end
local reserved = 0
if wanted > 0 then
  local start = math.max(next_tat, now + lifetime)
  reserved = math.min(wanted, math.floor((limit - start) / interval))
  if reserved > 0 then
    next_tat = start + reserved * interval
  else
    reserved = 0
  end
end
redis.call('SET', KEYS[1], string.format('%.0f', next_tat), 'PX', math.ceil((next_tat - now) / 1000) + 1)
return {1, next_tat - now, reserved}
";

/// The limiter port on Redis, shared by every process of a deployment.
///
/// A round trip per call is what this costs (Redis is often on the same
/// machine, sharing its CPU), so a hot key takes a *share* of its
/// allowance per round trip: besides the call that asks, up to
/// `KEEL_RATE_LIMIT_SHARE_MAX` - 1 more actions (1024 by default, at most a
/// sixteenth of the burst),
/// which this process hands out without asking for [`share_lifetime`]
/// (50 ms at most). The script places the share's slots after that
/// lifetime, so all processes together never admit more than the quota,
/// whenever the actions are taken; a share that is not used up in time is
/// dropped (the quota loses it, and never gains). The share's size follows
/// the key's demand in this process: one (no share) for a key that is not
/// hot, doubled while shares run out before their time, shrunk to what was
/// used when they do not. Small quotas (a burst under 32) never take a
/// share: every call is one round trip, exact to the action.
pub struct RedisRateLimiter {
    client: Client,
    /// `<deployment>:<database instance>:ratelimit:`, like the events' channels.
    prefix: String,
    /// The script's SHA-1 once loaded (`SCRIPT LOAD` answers it).
    script: std::sync::Mutex<Option<String>>,
    /// This process's shares, by limited key. A std mutex: held only to find
    /// a key's share, never across an await.
    shares: std::sync::Mutex<HashMap<String, Arc<Share>>>,
    /// Calls on the shared path, to forget idle keys now and then.
    calls: std::sync::atomic::AtomicU64,
    round_trips: std::sync::atomic::AtomicU64,
    share_max: u32,
    connecting: tokio::task::AbortHandle,
}

/// The largest share by default, in actions per round trip
/// (`KEEL_RATE_LIMIT_SHARE_MAX`).
pub const SHARE_MAX: u32 = 1024;

/// How long a share may be used: 50 ms, or a hundredth of the quota's
/// window when that is shorter, so the slots a share leaves unused (its
/// lifetime's worth when the key was idle) stay a small part of the burst.
pub fn share_lifetime(quota: Quota) -> Duration {
    (quota.window() / 100).min(Duration::from_millis(50))
}

/// The most a key may take at once under `quota`; 1: no shares.
fn share_cap(quota: Quota, max: u32) -> u32 {
    if share_lifetime(quota) < Duration::from_millis(1) {
        return 1;
    }
    (quota.burst / 16).clamp(1, max.max(1))
}

/// One key's share in this process. The async mutex makes the round trips
/// of one key single-flight: callers that find the share empty queue behind
/// the one refilling it, and take from what it brings.
struct Share {
    state: tokio::sync::Mutex<ShareState>,
    /// Callers queued on `state`: the demand the next share is sized for.
    waiting: std::sync::atomic::AtomicU32,
}

struct ShareState {
    quota: Quota,
    /// Reserved actions not handed out yet.
    tokens: u32,
    /// Until when they may be (the round trip's start + the lifetime).
    until: tokio::time::Instant,
    /// When the key's allowance is whole again, as last heard from Redis
    /// (measured from the round trip's start: early by its length at most).
    whole_at: tokio::time::Instant,
    /// Refused by Redis: no call passes before this (the key's theoretical
    /// arrival time only moves forward), so none asks again before it.
    refused_until: tokio::time::Instant,
    /// The size of the last share (1: none) and of the next one.
    last: u32,
    next: u32,
}

impl Drop for RedisRateLimiter {
    fn drop(&mut self) {
        self.connecting.abort();
    }
}

impl RedisRateLimiter {
    /// Connects in the background: keel starts, and answers, while Redis is
    /// down (the fallback decides meanwhile). `namespace` is the events'
    /// (`<deployment>:<database instance>`).
    pub fn connect(url: &str, namespace: &str) -> Result<RedisRateLimiter, fred::error::Error> {
        let config = Config::from_url(url)?;
        let client = Builder::from_config(config)
            .with_connection_config(|connection| {
                connection.connection_timeout = Duration::from_secs(2);
                connection.internal_command_timeout = Duration::from_secs(2);
            })
            .with_performance_config(|performance| {
                // A call waits this long for its answer at most; then the fallback answers.
                performance.default_command_timeout = Duration::from_millis(500);
            })
            .set_policy(ReconnectPolicy::new_exponential(0, 50, 1000, 2))
            .build()?;
        let connecting = client.connect().abort_handle();
        Ok(RedisRateLimiter {
            client,
            prefix: format!("{namespace}:ratelimit:"),
            script: std::sync::Mutex::new(None),
            shares: std::sync::Mutex::new(HashMap::new()),
            calls: std::sync::atomic::AtomicU64::new(0),
            round_trips: std::sync::atomic::AtomicU64::new(0),
            share_max: SHARE_MAX,
            connecting,
        })
    }

    /// The largest share a hot key takes per round trip ([`SHARE_MAX`] by
    /// default; 1: none, a round trip per call).
    pub fn with_share_max(mut self, max: u32) -> Self {
        self.share_max = max.max(1);
        self
    }

    /// Waits at most `within` for the connection; whether it is up.
    pub async fn connected(&self, within: Duration) -> bool {
        tokio::time::timeout(within, self.client.wait_for_connect())
            .await
            .is_ok_and(|connected| connected.is_ok())
    }

    async fn script_sha(&self, reload: bool) -> Result<String, fred::error::Error> {
        if !reload
            && let Some(sha) = self
                .script
                .lock()
                .unwrap_or_else(|poisoned| poisoned.into_inner())
                .clone()
        {
            return Ok(sha);
        }
        let sha: String = self.client.script_load(GCRA_SCRIPT).await?;
        *self.script.lock().unwrap_or_else(|poisoned| poisoned.into_inner()) = Some(sha.clone());
        Ok(sha)
    }

    /// One round trip: this action, and `extra` more reserved for `lifetime`.
    async fn evaluate(
        &self,
        key: &str,
        quota: Quota,
        extra: u32,
        lifetime: Duration,
    ) -> Result<Vec<i64>, fred::error::Error> {
        let interval = i64::try_from(quota.period.as_micros()).unwrap_or(i64::MAX).max(1);
        let burst = i64::from(quota.burst.max(1));
        let lifetime = i64::try_from(lifetime.as_micros()).unwrap_or(i64::MAX);
        let key = format!("{}{key}", self.prefix);
        let args = [interval, burst, i64::from(extra), lifetime];
        let sha = self.script_sha(false).await?;
        match self
            .client
            .evalsha::<Vec<i64>, _, _, _>(sha, key.as_str(), args.to_vec())
            .await
        {
            // Redis restarted or flushed its scripts: load it again, once.
            Err(error) if error.details().starts_with("NOSCRIPT") => {
                let sha = self.script_sha(true).await?;
                self.client.evalsha(sha, key.as_str(), args.to_vec()).await
            }
            answered => answered,
        }
    }

    /// How many times this limiter has asked Redis (tests and benchmarks).
    pub fn round_trips(&self) -> u64 {
        self.round_trips.load(Ordering::Relaxed)
    }

    /// `(allowed, ahead, reserved)` from Redis.
    async fn ask(
        &self,
        key: &str,
        quota: Quota,
        extra: u32,
        lifetime: Duration,
    ) -> Result<(bool, Duration, u32), Error> {
        self.round_trips.fetch_add(1, Ordering::Relaxed);
        let answer = self
            .evaluate(key, quota, extra, lifetime)
            .await
            .map_err(|error| Error::unavailable(format!("redis rate limiter: {error}")))?;
        let [allowed, ahead_micros, reserved] = answer[..] else {
            return Err(Error::internal(format!(
                "redis rate limiter: unexpected answer {answer:?}"
            )));
        };
        let ahead = Duration::from_micros(u64::try_from(ahead_micros).unwrap_or(0));
        Ok((allowed == 1, ahead, u32::try_from(reserved).unwrap_or(0).min(extra)))
    }

    fn share(&self, key: &str) -> Arc<Share> {
        let mut shares = self.shares.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        // Forget idle keys now and then so the map stays bounded: one no
        // caller holds and whose share is spent or out of time.
        if self.calls.fetch_add(1, Ordering::Relaxed) % 4096 == 4095 {
            let now = tokio::time::Instant::now();
            shares.retain(|_, share| {
                Arc::strong_count(share) > 1
                    || share
                        .state
                        .try_lock()
                        .map_or(true, |state| state.tokens > 0 && state.until > now)
            });
        }
        if let Some(share) = shares.get(key) {
            return share.clone();
        }
        let now = tokio::time::Instant::now();
        let share = Arc::new(Share {
            state: tokio::sync::Mutex::new(ShareState {
                quota: Quota::new(0, Duration::ZERO),
                tokens: 0,
                until: now,
                whole_at: now,
                refused_until: now,
                last: 1,
                next: 1,
            }),
            waiting: std::sync::atomic::AtomicU32::new(0),
        });
        shares.insert(key.to_owned(), share.clone());
        share
    }

    /// A hot key's path: from this process's share, else one round trip
    /// that takes this action and refills the share.
    async fn check_shared(&self, key: &str, quota: Quota, cap: u32) -> Result<Decision, Error> {
        let share = self.share(key);
        share.waiting.fetch_add(1, Ordering::Relaxed);
        let mut state = share.state.lock().await;
        let waiting = share.waiting.fetch_sub(1, Ordering::Relaxed).saturating_sub(1);
        let now = tokio::time::Instant::now();
        if state.quota != quota {
            // The policy changed under the key: what was reserved was for another quota.
            state.quota = quota;
            state.tokens = 0;
            state.refused_until = now;
        }
        if state.tokens > 0 && now < state.until {
            state.tokens -= 1;
            let ahead = state.whole_at.saturating_duration_since(now);
            let mut decision = Decision::from_gcra(quota, true, ahead);
            // What this process holds may go at once too.
            decision.remaining = decision.remaining.saturating_add(state.tokens).min(quota.burst);
            return Ok(decision);
        }
        if now < state.refused_until {
            return Ok(Decision {
                allowed: false,
                remaining: 0,
                reset: state.whole_at.saturating_duration_since(now),
                retry_after: state.refused_until.saturating_duration_since(now),
            });
        }
        if state.last > 1 {
            // Spent before its time: the key is hotter than the share. Out of
            // time with some left: it needed what it used.
            state.next = if state.tokens == 0 {
                state.last.saturating_mul(2)
            } else {
                state.last - state.tokens
            };
        } else if now < state.until {
            // Called again within a share's lifetime of the last round trip:
            // one caller at a time, but hot.
            state.next = 2;
        }
        state.tokens = 0;
        let wanted = state.next.max(waiting.saturating_add(1)).clamp(1, cap);
        let lifetime = share_lifetime(quota);
        let sent = tokio::time::Instant::now();
        let answer = self.ask(key, quota, wanted - 1, lifetime).await;
        // A failed round trip leaves the share empty; the fallback answers.
        let (allowed, ahead, reserved) = answer?;
        state.tokens = reserved;
        state.until = sent + lifetime;
        state.whole_at = sent + ahead;
        state.last = 1 + reserved;
        let mut decision = Decision::from_gcra(quota, allowed, ahead);
        if !allowed {
            // The key is spent: refuse here until it may pass, then ask one by one.
            state.refused_until = sent + decision.retry_after;
            state.next = 1;
        }
        if allowed {
            decision.remaining = decision.remaining.saturating_add(reserved).min(quota.burst);
        }
        Ok(decision)
    }
}

#[async_trait]
impl RateLimiter for RedisRateLimiter {
    async fn check(&self, key: &str, quota: Quota) -> Result<Decision, Error> {
        // Not connected: answer at once rather than queue behind a reconnect.
        if !self.client.is_connected() {
            return Err(Error::unavailable("redis rate limiter: not connected"));
        }
        let cap = share_cap(quota, self.share_max);
        if cap > 1 {
            return self.check_shared(key, quota, cap).await;
        }
        let (allowed, ahead, _) = self.ask(key, quota, 0, Duration::ZERO).await?;
        Ok(Decision::from_gcra(quota, allowed, ahead))
    }
}

/// `KEEL_RATE_LIMITER`: which limiter counts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LimiterKind {
    /// Redis when `KEEL_REDIS_URL` is set, in process otherwise.
    Auto,
    /// In process, even with Redis: each keel limits alone.
    Local,
    /// Redis (`KEEL_REDIS_URL` required).
    Redis,
    /// No per-method limits (identity's sign-in limits stay, in process).
    Off,
}

/// `KEEL_RATE_LIMIT_FALLBACK`: what counts while Redis cannot answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Fallback {
    /// Each process limits alone with its in-process limiter (the default):
    /// a cluster of n lets through up to n times a limit.
    Local,
    /// Nothing is limited.
    Open,
    /// Every limited call is refused (RESOURCE_EXHAUSTED, retry in 1 s).
    Closed,
}

/// Redis, and the fallback while Redis cannot answer.
pub struct SharedRateLimiter {
    redis: RedisRateLimiter,
    fallback: Fallback,
    local: InProcessRateLimiter,
    /// Whether the last answer was the fallback's (logged once per outage).
    degraded: AtomicBool,
}

impl SharedRateLimiter {
    pub fn new(redis: RedisRateLimiter, fallback: Fallback) -> Self {
        Self {
            redis,
            fallback,
            local: InProcessRateLimiter::new(),
            degraded: AtomicBool::new(false),
        }
    }
}

#[async_trait]
impl RateLimiter for SharedRateLimiter {
    async fn check(&self, key: &str, quota: Quota) -> Result<Decision, Error> {
        match self.redis.check(key, quota).await {
            Ok(decision) => {
                if self.degraded.swap(false, Ordering::Relaxed) {
                    tracing::info!("redis rate limiter answers again");
                }
                Ok(decision)
            }
            Err(error) => {
                if !self.degraded.swap(true, Ordering::Relaxed) {
                    tracing::warn!(
                        error = %error,
                        fallback = ?self.fallback,
                        "redis rate limiter unavailable; KEEL_RATE_LIMIT_FALLBACK answers"
                    );
                }
                Ok(match self.fallback {
                    Fallback::Local => self.local.check_now(key, quota),
                    Fallback::Open => Decision {
                        allowed: true,
                        remaining: quota.burst,
                        reset: Duration::ZERO,
                        retry_after: Duration::ZERO,
                    },
                    Fallback::Closed => Decision {
                        allowed: false,
                        remaining: 0,
                        reset: Duration::from_secs(1),
                        retry_after: Duration::from_secs(1),
                    },
                })
            }
        }
    }
}

/// What a policy counts by.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum KeyedBy {
    /// The authenticated principal (user or service account); an anonymous
    /// call counts by its client address.
    #[default]
    Principal,
    /// The client address (behind trusted proxies, the one they name).
    Address,
}

/// One entry of `KEEL_RATE_LIMITS` / `[rate_limits]`: `limit` calls per
/// `window_seconds`; `limit = 0` turns the method's limit off.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PolicySetting {
    pub limit: u32,
    pub window_seconds: u64,
    #[serde(default)]
    pub by: KeyedBy,
}

/// `KEEL_RATE_LIMITS`: a `[rate_limits]` table of keel.toml, or the same as
/// text: `NAME=LIMIT/WINDOW_SECONDS[@principal|@address]`, separated by `;`
/// (`default=1000/60;keel.identity.v1.IdentityQueryService/GetUser=100/60@address`).
/// `NAME` is `default` or a method (`package.Service/Method`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum RateLimitsSetting {
    Table(BTreeMap<String, PolicySetting>),
    Text(String),
}

impl Default for RateLimitsSetting {
    fn default() -> Self {
        Self::Table(BTreeMap::new())
    }
}

impl RateLimitsSetting {
    pub fn entries(&self) -> Result<BTreeMap<String, PolicySetting>, String> {
        match self {
            Self::Table(table) => Ok(table.clone()),
            Self::Text(text) => text
                .split(';')
                .map(str::trim)
                .filter(|entry| !entry.is_empty())
                .map(parse_entry)
                .collect(),
        }
    }
}

fn parse_entry(entry: &str) -> Result<(String, PolicySetting), String> {
    let malformed = || format!("{entry:?} is not NAME=LIMIT/WINDOW_SECONDS[@principal|@address]");
    let (name, rest) = entry.split_once('=').ok_or_else(malformed)?;
    let (rate, by) = match rest.split_once('@') {
        Some((rate, "principal")) => (rate, KeyedBy::Principal),
        Some((rate, "address")) => (rate, KeyedBy::Address),
        Some(_) => return Err(malformed()),
        None => (rest, KeyedBy::Principal),
    };
    let (limit, window) = rate.split_once('/').ok_or_else(malformed)?;
    let limit = limit.trim().parse().map_err(|_| malformed())?;
    let window_seconds = window.trim().trim_end_matches('s').parse().map_err(|_| malformed())?;
    Ok((
        name.trim().to_owned(),
        PolicySetting {
            limit,
            window_seconds,
            by,
        },
    ))
}

/// The default policy when `KEEL_RATE_LIMITS` names none: generous, per caller.
pub const DEFAULT_POLICY: PolicySetting = PolicySetting {
    limit: 1000,
    window_seconds: 60,
    by: KeyedBy::Principal,
};

/// The policy name of failed authentications in `KEEL_RATE_LIMITS`.
pub const AUTHENTICATION_POLICY: &str = "authentication";

/// Failed authentications one client address may make, unless
/// `KEEL_RATE_LIMITS` says `authentication=...`: 30 a minute. Lapsed
/// access tokens keel signed are not counted (a client that must refresh);
/// what counts are credentials keel never issued, revoked or expired API
/// keys, and bad stream tickets. All the clients behind one address (a NAT,
/// a proxy that is not in `KEEL_TRUSTED_PROXIES`) share it.
pub const DEFAULT_AUTHENTICATION_POLICY: PolicySetting = PolicySetting {
    limit: 30,
    window_seconds: 60,
    by: KeyedBy::Address,
};

/// One method's (or the default) limit, ready to check.
#[derive(Debug, Clone)]
pub struct Policy {
    /// The name in `RateLimit-Policy` and the limiter's keys.
    pub name: String,
    pub quota: Quota,
    pub by: KeyedBy,
    header: HeaderValue,
}

impl Policy {
    fn new(name: &str, setting: &PolicySetting) -> Result<Option<Policy>, String> {
        if setting.limit == 0 {
            return Ok(None);
        }
        if setting.window_seconds == 0 {
            return Err(format!("{name}: window_seconds must be at least 1"));
        }
        let header = HeaderValue::from_str(&format!("\"{name}\";q={};w={}", setting.limit, setting.window_seconds))
            .map_err(|_| format!("{name:?} cannot be a header's policy name"))?;
        Ok(Some(Policy {
            name: name.to_owned(),
            quota: Quota::per_window(setting.limit, Duration::from_secs(setting.window_seconds)),
            by: setting.by,
            header,
        }))
    }

    /// `RateLimit: "<name>";r=<remaining>;t=<seconds until whole again>`.
    fn state(&self, decision: &Decision) -> Option<HeaderValue> {
        let seconds = decision.reset.as_secs_f64().ceil() as u64;
        HeaderValue::from_str(&format!("\"{}\";r={};t={seconds}", self.name, decision.remaining)).ok()
    }
}

/// Which policy each method has: its own, or the default.
#[derive(Debug, Clone, Default)]
pub struct Policies {
    default: Option<Policy>,
    /// Failed authentications per client address ([`AuthFailures`]).
    authentication: Option<Policy>,
    /// By gRPC path (`/package.Service/Method`); `None`: not limited.
    methods: HashMap<String, Option<Policy>>,
}

impl Policies {
    /// The built-in default, then `setting`'s entries over it.
    pub fn from_setting(setting: &RateLimitsSetting) -> Result<Policies, String> {
        let mut entries = setting.entries()?;
        let default = entries.remove("default").unwrap_or(DEFAULT_POLICY);
        let authentication = entries
            .remove(AUTHENTICATION_POLICY)
            .unwrap_or(DEFAULT_AUTHENTICATION_POLICY);
        // Failed authentications have no principal: always per address.
        let authentication = PolicySetting {
            by: KeyedBy::Address,
            ..authentication
        };
        let mut policies = Policies {
            default: Policy::new("default", &default)?,
            authentication: Policy::new(AUTHENTICATION_POLICY, &authentication)?,
            methods: HashMap::new(),
        };
        for (name, entry) in entries {
            let method = name.trim_start_matches('/');
            if method
                .split_once('/')
                .is_none_or(|(service, rpc)| service.is_empty() || rpc.is_empty())
            {
                return Err(format!(
                    "{name:?} is neither `default` nor a method (package.Service/Method)"
                ));
            }
            policies
                .methods
                .insert(format!("/{method}"), Policy::new(method, &entry)?);
        }
        Ok(policies)
    }

    /// The limit on failed authentications per address, unless it is off.
    pub fn authentication(&self) -> Option<&Policy> {
        self.authentication.as_ref()
    }

    /// The policy of the gRPC method at `path`, if it is limited. Health
    /// and reflection never are.
    pub fn for_path(&self, path: &str) -> Option<&Policy> {
        if path.starts_with("/grpc.health.") || path.starts_with("/grpc.reflection.") {
            return None;
        }
        match self.methods.get(path) {
            Some(policy) => policy.as_ref(),
            None => self.default.as_ref(),
        }
    }
}

/// Failed authentications, per client address: each one takes an action
/// of the address's `authentication` allowance on the shared limiter (so
/// every keel of a deployment counts them together), and an address the
/// limiter refused is remembered here until its retry time: its calls with
/// credentials are refused at once, before a token is verified or an API
/// key looked up, and a guess that happens to be right gains nothing. Only
/// failures reach the limiter; a valid caller costs nothing. Calls without
/// an address (in process) are never counted.
pub struct AuthFailures {
    limiter: Arc<dyn RateLimiter>,
    policy: Policy,
    /// Addresses refused, until when. Bounded: past [`MAX_BLOCKED`] the
    /// expired are swept out, and a new address that still finds no room is
    /// refused by the limiter at its next failure instead.
    blocked: std::sync::Mutex<HashMap<IpAddr, std::time::Instant>>,
    /// When the full map was last swept.
    last_sweep: std::sync::Mutex<Option<std::time::Instant>>,
}

/// Addresses [`AuthFailures`] remembers at most.
const MAX_BLOCKED: usize = 100_000;

impl AuthFailures {
    pub fn new(limiter: Arc<dyn RateLimiter>, policy: Policy) -> Self {
        Self {
            limiter,
            policy,
            blocked: std::sync::Mutex::new(HashMap::new()),
            last_sweep: std::sync::Mutex::new(None),
        }
    }

    /// How long `address` is still refused, if it is.
    pub fn blocked(&self, address: IpAddr) -> Option<Duration> {
        let blocked = self.blocked.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        let until = *blocked.get(&address)?;
        until.checked_duration_since(std::time::Instant::now())
    }

    /// Counts a failed authentication from `address`; how long it must
    /// wait when that was one too many.
    pub async fn failed(&self, address: IpAddr) -> Option<Duration> {
        let key = format!("{}:ip:{address}", self.policy.name);
        let decision = match self.limiter.check(&key, self.policy.quota).await {
            Ok(decision) => decision,
            Err(error) => {
                tracing::warn!(error = %error, "rate limiter unavailable; a failed authentication is not counted");
                return None;
            }
        };
        if decision.allowed {
            return None;
        }
        let retry_after = decision.retry_after.max(Duration::from_secs(1));
        let until = std::time::Instant::now() + retry_after;
        let mut blocked = self.blocked.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        let now = std::time::Instant::now();
        // Full: the expired are swept out, at most once a second (a sweep
        // walks the whole map under the lock every credentialed call takes).
        if blocked.len() >= MAX_BLOCKED && !blocked.contains_key(&address) {
            let mut last_sweep = self.last_sweep.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
            if last_sweep.is_none_or(|swept| now.duration_since(swept) >= Duration::from_secs(1)) {
                blocked.retain(|_, until| *until > now);
                *last_sweep = Some(now);
            }
        }
        if blocked.len() < MAX_BLOCKED || blocked.contains_key(&address) {
            blocked.insert(address, until);
        }
        Some(retry_after)
    }

    /// The answer to a refused address: RESOURCE_EXHAUSTED with RetryInfo
    /// (429 with `Retry-After` over REST) and the policy's header.
    pub fn refusal(&self, retry_after: Duration) -> Response<Body> {
        let seconds = retry_after.as_secs_f64().ceil().max(1.0) as u64;
        let refused = Error::resource_exhausted(
            format!("too many failed authentications from this address; retry in {seconds} s"),
            retry_after,
        );
        let mut response = tonic::Status::from(refused).into_http::<Body>();
        response
            .headers_mut()
            .insert("ratelimit-policy", self.policy.header.clone());
        response
    }
}

/// Counts refused calls (`keel_rate_limited_total{method}`).
pub trait RefusalCounter: Send + Sync + 'static {
    fn rate_limited(&self, path: &str);
}

#[derive(Clone)]
pub struct RateLimitLayer {
    state: Arc<LayerState>,
}

struct LayerState {
    limiter: Arc<dyn RateLimiter>,
    policies: Policies,
    refusals: Option<Arc<dyn RefusalCounter>>,
}

impl RateLimitLayer {
    /// Runs inside the context layer: it reads the caller and address the
    /// context layer put in the request.
    pub fn new(limiter: Arc<dyn RateLimiter>, policies: Policies, refusals: Option<Arc<dyn RefusalCounter>>) -> Self {
        Self {
            state: Arc::new(LayerState {
                limiter,
                policies,
                refusals,
            }),
        }
    }
}

impl<S> Layer<S> for RateLimitLayer {
    type Service = RateLimitService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        RateLimitService {
            inner,
            state: self.state.clone(),
        }
    }
}

#[derive(Clone)]
pub struct RateLimitService<S> {
    inner: S,
    state: Arc<LayerState>,
}

/// Whom a call counts against under `by`: `None` for a call without a
/// caller or an address (in process), which is never limited.
fn subject(ctx: Option<&RequestContext>, by: KeyedBy) -> Option<String> {
    let ctx = ctx?;
    let address = |ip: IpAddr| format!("ip:{ip}");
    match by {
        KeyedBy::Principal => ctx
            .principal
            .as_ref()
            .map(|principal| format!("user:{}", principal.user_id))
            .or_else(|| ctx.client_ip.map(address)),
        KeyedBy::Address => ctx.client_ip.map(address),
    }
}

fn set_headers(headers: &mut HeaderMap, policy: &Policy, decision: &Decision) {
    headers.insert("ratelimit-policy", policy.header.clone());
    if let Some(state) = policy.state(decision) {
        headers.insert("ratelimit", state);
    }
}

impl<S, ReqBody> Service<Request<ReqBody>> for RateLimitService<S>
where
    S: Service<Request<ReqBody>, Response = Response<Body>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
    ReqBody: Send + 'static,
{
    type Response = Response<Body>;
    type Error = S::Error;
    type Future = BoxFuture<'static, Result<Response<Body>, S::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request<ReqBody>) -> Self::Future {
        // The clone that was polled ready serves this call (tower's rule).
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        let state = self.state.clone();
        Box::pin(async move {
            let path = request.uri().path();
            let Some(policy) = state.policies.for_path(path) else {
                return inner.call(request).await;
            };
            let Some(subject) = subject(request.extensions().get::<RequestContext>(), policy.by) else {
                return inner.call(request).await;
            };
            let key = format!("{}:{subject}", policy.name);
            let decision = match state.limiter.check(&key, policy.quota).await {
                Ok(decision) => decision,
                Err(error) => {
                    tracing::warn!(error = %error, "rate limiter unavailable; the call passes");
                    return inner.call(request).await;
                }
            };
            if !decision.allowed {
                if let Some(refusals) = &state.refusals {
                    refusals.rate_limited(path);
                }
                tracing::debug!(policy = %policy.name, "call refused by its rate limit");
                let seconds = decision.retry_after.as_secs_f64().ceil().max(1.0) as u64;
                let refused = Error::resource_exhausted(
                    format!("rate limit exceeded; retry in {seconds} s"),
                    decision.retry_after,
                );
                let mut response = tonic::Status::from(refused).into_http::<Body>();
                set_headers(response.headers_mut(), policy, &decision);
                return Ok(response);
            }
            let mut response = inner.call(request).await?;
            set_headers(response.headers_mut(), policy, &decision);
            Ok(response)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_text_form_reads_like_the_table() {
        let setting = RateLimitsSetting::Text(
            "default=100/60; keel.identity.v1.IdentityQueryService/GetUser=5/10s@address;a.B/C=0/1".to_owned(),
        );
        let entries = setting.entries().unwrap();
        assert_eq!(entries["default"].limit, 100);
        let get_user = &entries["keel.identity.v1.IdentityQueryService/GetUser"];
        assert_eq!(
            (get_user.limit, get_user.window_seconds, get_user.by),
            (5, 10, KeyedBy::Address)
        );
        let policies = Policies::from_setting(&setting).unwrap();
        assert!(policies.for_path("/a.B/C").is_none(), "limit 0 is off");
        assert!(policies.for_path("/grpc.health.v1.Health/Check").is_none());
        let default = policies.for_path("/x.Y/Z").unwrap();
        assert_eq!(default.header, "\"default\";q=100;w=60");
        assert_eq!(default.quota, Quota::new(100, Duration::from_millis(600)));
        assert!(RateLimitsSetting::Text("nonsense".to_owned()).entries().is_err());
        assert!(Policies::from_setting(&RateLimitsSetting::Text("GetUser=1/1".to_owned())).is_err());
    }

    #[test]
    fn headers_follow_the_ietf_draft() {
        let policy = Policy::new(
            "default",
            &PolicySetting {
                limit: 100,
                window_seconds: 60,
                by: KeyedBy::Principal,
            },
        )
        .unwrap()
        .unwrap();
        let decision = Decision {
            allowed: true,
            remaining: 50,
            reset: Duration::from_millis(29_500),
            retry_after: Duration::ZERO,
        };
        let mut headers = HeaderMap::new();
        set_headers(&mut headers, &policy, &decision);
        assert_eq!(headers["ratelimit-policy"], "\"default\";q=100;w=60");
        assert_eq!(headers["ratelimit"], "\"default\";r=50;t=30");
    }
}
