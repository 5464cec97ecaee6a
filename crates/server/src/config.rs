//! Configuration: defaults, then `keel.toml` (or `--config FILE`), then
//! `KEEL_*` variables. Validated at start; errors name the setting.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use figment::Figment;
use figment::providers::{Env, Format, Serialized, Toml};
pub use keel_kernel::Secret;
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Environment {
    Development,
    Production,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    Json,
    Pretty,
}

/// Every setting of keel. Secrets are wrapped: `Debug` prints `[redacted]`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Config {
    /// `KEEL_LISTEN`: the one address for gRPC (and later REST, grpc-web).
    pub listen: SocketAddr,
    /// `KEEL_DATA_DIR`: the SQLite file and the generated signing key live here.
    pub data_dir: PathBuf,
    /// `KEEL_DATABASE_URL`: `postgres://...`; unset means SQLite in the data dir.
    pub database_url: Option<Secret<String>>,
    /// `KEEL_DATABASE_SCHEMA`: PostgreSQL only, the schema to work in.
    pub database_schema: Option<String>,
    /// `KEEL_DATABASE_MAX_CONNECTIONS`
    pub database_max_connections: u32,
    /// `KEEL_REDIS_URL`: the cluster mode's bus, cache and limits (later issues).
    pub redis_url: Option<Secret<String>>,
    /// `KEEL_DEPLOYMENT`: this deployment's name (`keel`). With the database's
    /// identity it namespaces every Redis channel and key, so deployments
    /// sharing a Redis never hear each other.
    pub deployment: String,
    /// `KEEL_ENV`: `development` (default) or `production`.
    pub env: Environment,
    /// `KEEL_LOG`: a tracing filter (`info`, `keel=debug,info`).
    pub log: String,
    /// `KEEL_LOG_FORMAT`: `json` or `pretty`; unset means pretty in a terminal.
    pub log_format: Option<LogFormat>,
    /// `KEEL_REFLECTION`: gRPC server reflection; unset means on except in production.
    pub reflection: Option<bool>,
    /// `KEEL_AUTH_KEYS_FILE`: the signing-key file; required in production.
    pub auth_keys_file: Option<PathBuf>,
    /// `KEEL_AUTH_ISSUER` / `KEEL_AUTH_AUDIENCE`: the `iss` and `aud` of access tokens.
    pub auth_issuer: String,
    pub auth_audience: String,
    /// `KEEL_ACCESS_TOKEN_TTL_SECONDS`: 900 (15 minutes) by default.
    pub access_token_ttl_seconds: u64,
    /// `KEEL_REFRESH_GRACE_SECONDS`: how long a rotated refresh token still rotates.
    pub refresh_grace_seconds: u64,
    /// `KEEL_PASSWORD_HASH_CONCURRENCY`: at most this many Argon2id hashes
    /// (19 MiB each) at once; more logins wait for one. Unset: one per core
    /// but one (at least one), so a flood of sign-ins leaves a core to reads.
    pub password_hash_concurrency: Option<usize>,
    /// `KEEL_BOOTSTRAP_ADMIN_EMAIL` / `KEEL_BOOTSTRAP_ADMIN_PASSWORD`: an admin
    /// created at start when no account has that email (for containers).
    pub bootstrap_admin_email: Option<String>,
    pub bootstrap_admin_password: Option<Secret<String>>,
    /// `KEEL_MAX_MESSAGE_BYTES`: the largest request or response message.
    pub max_message_bytes: usize,
    /// `KEEL_SHUTDOWN_GRACE_SECONDS`: how long in-flight calls may finish after SIGTERM.
    pub shutdown_grace_seconds: u64,
    /// `KEEL_MAX_CONNECTIONS`: open client connections at most; one more is
    /// closed at once, so idle sockets cannot use up file descriptors.
    pub max_connections: usize,
    /// `KEEL_FIRST_BYTE_TIMEOUT_SECONDS`: a connection that sends nothing
    /// (or no complete HTTP/1.1 request head) for this long is closed.
    pub first_byte_timeout_seconds: u64,
    /// `KEEL_IDLE_TIMEOUT_SECONDS`: a connection with no call in flight for
    /// this long is closed (HTTP/1.1 keep-alive between requests, HTTP/2
    /// without streams); an open stream is a call in flight.
    pub idle_timeout_seconds: u64,
    /// `KEEL_HTTP2_MAX_CONCURRENT_STREAMS`: streams (calls) one HTTP/2
    /// connection may have open at once.
    pub http2_max_concurrent_streams: u32,
    /// `KEEL_ACCESS_CACHE`: remember active sessions per process, so an
    /// authenticated call needs no database round trip of its own. Exact:
    /// every revocation clears every process before it answers; on by default,
    /// in effect on SQLite and with Redis (several processes on PostgreSQL
    /// without Redis could not hear each other, so there it stays off).
    pub access_cache: bool,
    /// `KEEL_QUERY_CACHE`: keep the answers of queries that opt in (`GetUser`)
    /// until a command changes them (`on`/`true`; `off`/`false`, the default:
    /// measured, it makes `GetUser` slower, which the access cache already
    /// answers from memory; see docs/guards.md). Shared in Redis when `KEEL_REDIS_URL` is set; in process on
    /// SQLite (one process); off on PostgreSQL without Redis, where another
    /// process's writes could not reach this process's cache.
    #[serde(deserialize_with = "on_or_off")]
    pub query_cache: bool,
    /// `KEEL_QUERY_CACHE_TTL_SECONDS`: the longest a cached answer is used
    /// (bounds what a change made outside keel can leave behind).
    pub query_cache_ttl_seconds: u64,
    /// `KEEL_REGISTER_BURST`: registrations one client address may make at
    /// once; one more every 30 s after that.
    pub register_burst: u32,
    /// `KEEL_LOGIN_BURST_PER_ACCOUNT_ADDRESS`: sign-in attempts one client
    /// address may make for one account at once; one more every 60 s after
    /// that; more are refused (429).
    pub login_burst_per_account_address: u32,
    /// `KEEL_LOGIN_ACCOUNT_BURST` / `KEEL_LOGIN_ACCOUNT_INTERVAL_MS`: sign-in
    /// attempts for one account, from all addresses together, verified at
    /// once; after the burst, one every interval. More are never refused,
    /// only delayed, at most `KEEL_LOGIN_ACCOUNT_MAX_DELAY_MS`: strangers
    /// can slow an account's sign-in, never lock its owner out.
    pub login_account_burst: u32,
    pub login_account_interval_ms: u64,
    pub login_account_max_delay_ms: u64,
    /// `KEEL_SMTP_URL`: send email through this SMTP relay
    /// (`smtp://user:pass@host:587`, user and password percent-encoded:
    /// `%40` for `@`); unset: write it to `KEEL_MAIL_FILE`.
    pub smtp_url: Option<Secret<String>>,
    /// `KEEL_MAIL_FROM`: the sender of keel's email.
    pub mail_from: String,
    /// `KEEL_MAIL_FILE`: where email goes without SMTP (default `<data dir>/mail.jsonl`).
    pub mail_file: Option<PathBuf>,
    /// `KEEL_MAIL_TIMEOUT_MS`: the longest one attempt to send an email
    /// may take.
    pub mail_timeout_ms: u64,
    /// `KEEL_MAIL_ATTEMPTS`: attempts of one send on a transient failure,
    /// the first included (the handler that sends retries later on its own).
    pub mail_attempts: u32,
    /// `KEEL_MAIL_BREAKER_FAILURES`: consecutive transient failures after
    /// which sends fail at once, without reaching the relay, for
    /// `KEEL_MAIL_BREAKER_COOL_DOWN_MS`; then one send is tried.
    pub mail_breaker_failures: u32,
    pub mail_breaker_cool_down_ms: u64,
    /// `KEEL_EVENTS_RETENTION_HOURS`: numbered events older than this are pruned.
    pub events_retention_hours: u64,
    /// `KEEL_EVENTS_HEARTBEAT_SECONDS`: idle subscriptions get a heartbeat this often.
    pub events_heartbeat_seconds: u64,
    /// `KEEL_STREAM_TICKET_FIRST_USE_SECONDS`: a stream ticket must open its
    /// first stream this soon after its creation.
    pub stream_ticket_first_use_seconds: u64,
    /// `KEEL_STREAM_TICKET_LIFETIME_SECONDS`: reconnects with a stream ticket
    /// are accepted this long after its creation; its stream ends then.
    pub stream_ticket_lifetime_seconds: u64,
    /// `KEEL_EVENTS_POLL_MS`: the safety net under notifications (events
    /// are announced at commit): how often each process reads the event
    /// table for events nobody announced, and looks for committed rows a
    /// crashed process never numbered; 0 turns it off (tests that must see
    /// a transport itself deliver).
    pub events_poll_ms: u64,
    /// `KEEL_EVENTS_LISTEN`: PostgreSQL only, hear of other processes'
    /// events through LISTEN/NOTIFY (on by default; off only for tests that
    /// must see Redis itself deliver).
    pub events_listen: bool,
    /// `KEEL_EVENT_HANDLER_MAX_ATTEMPTS`: attempts before an event is dead-lettered.
    pub event_handler_max_attempts: u32,
    /// `KEEL_EVENT_HANDLER_BACKOFF_MS`: the first retry's delay; it doubles, with jitter.
    pub event_handler_backoff_ms: u64,
    /// `KEEL_JOBS_WORKERS`: run job workers in this process (on by default).
    pub jobs_workers: bool,
    /// `KEEL_JOBS_CONCURRENCY`: jobs of one queue running at once in this
    /// process, unless `KEEL_JOBS_QUEUES` names the queue.
    pub jobs_concurrency: usize,
    /// `KEEL_JOBS_QUEUES`: per-queue concurrency, `mail=2,default=20`.
    pub jobs_queues: Option<String>,
    /// `KEEL_JOBS_LEASE_MS`: how long a running job is held without a
    /// renewal (its worker renews every third of it); a dead worker's job
    /// runs again after it (and at most one more lease: the rescuer looks
    /// every lease, at most every 30 s).
    pub jobs_lease_ms: u64,
    /// `KEEL_JOBS_POLL_MS`: the safety net under commit wake-ups (each poll
    /// is a fetch and a look for the next due job, per queue: an idle keel
    /// stays under a transaction a second).
    pub jobs_poll_ms: u64,
    /// `KEEL_JOBS_BACKOFF_MS`: a failed job's first retry delay; it doubles
    /// (at most an hour), with jitter.
    pub jobs_backoff_ms: u64,
    /// `KEEL_JOBS_RATE_LIMITS`: per-queue limits on job starts,
    /// `mail=10/1s,reports=100/1m` (`QUEUE=LIMIT/WINDOW`, the window in
    /// `ms`, `s`, `m` or `h`, bare numbers are seconds): a burst of LIMIT,
    /// refilled evenly over the window (GCRA), counted on the rate limiter
    /// (Redis when `KEEL_REDIS_URL` is set: one allowance for every keel).
    pub jobs_rate_limits: Option<String>,
    /// `KEEL_JOBS_SHUTDOWN_GRACE`: at SIGTERM or ctrl-c, how long running
    /// jobs may take to finish (`10s`, `500ms`; bare numbers are seconds);
    /// the ones still running then are handed back at once.
    #[serde(deserialize_with = "text_or_number")]
    pub jobs_shutdown_grace: String,
    /// `KEEL_JOBS_CRON`: cron schedules, `NAME|CRON|KIND[|ARGS_JSON]`
    /// separated by `;` (see `keel_jobs::schedule::parse_cron_setting`),
    /// e.g. `digest|0 7 * * MON-FRI|mail.digest|{"team":true}`. Times are
    /// UTC; one named like a module's schedule replaces it.
    pub jobs_cron: Option<String>,
    /// `KEEL_JOBS_RETAIN_COMPLETED`: completed and cancelled jobs are
    /// deleted this long after they finished (`24h`; `s`, `m`, `h`, `d`, or
    /// a number of seconds).
    #[serde(deserialize_with = "text_or_number")]
    pub jobs_retain_completed: String,
    /// `KEEL_JOBS_RETAIN_FAILED`: failed jobs (the dead letters) are
    /// deleted this long after they failed (`7d`).
    #[serde(deserialize_with = "text_or_number")]
    pub jobs_retain_failed: String,
    /// `KEEL_JOBS_CANCEL_GRACE_MS`: how long a cancelled job's handler may
    /// take to stop before it is dropped.
    pub jobs_cancel_grace_ms: u64,
    /// `KEEL_JOBS_VACUUM_AFTER`: PostgreSQL: the workers vacuum the job
    /// table after this many jobs this process fetched (dead entries of
    /// fetched jobs slow every later fetch until a vacuum); 0 leaves it to
    /// autovacuum.
    pub jobs_vacuum_after: u64,
    /// `KEEL_JOBS_WATCH_PER_CALLER`: `WatchJob` streams one caller may hold
    /// open at once in a process (more: RESOURCE_EXHAUSTED).
    pub jobs_watch_per_caller: usize,
    /// `KEEL_CORS_ALLOWED_ORIGINS`: comma-separated origins that browsers may
    /// call from with credentials (`https://app.example.com`), and/or `*`: any
    /// other origin, without credentials. `null` is never allowed. Unset:
    /// loopback origins (`http://localhost:*`, `127.0.0.1`, `[::1]`) in
    /// development, none in production.
    pub cors_allowed_origins: Option<String>,
    /// `KEEL_HSTS`: send `Strict-Transport-Security` (one year). Set it when
    /// browsers reach keel only over HTTPS, through a TLS-terminating proxy.
    pub hsts: bool,
    /// `KEEL_MAX_IN_FLIGHT`: calls being answered at once (until their
    /// response head); one more is answered UNAVAILABLE / 503 with
    /// `Retry-After` at once, and `/readyz` says `overloaded` for a second.
    pub max_in_flight: usize,
    /// `KEEL_MAX_IN_FLIGHT_PER_ADDRESS`: of those, how many one client
    /// address may have; one more is RESOURCE_EXHAUSTED / 429. Unset: a
    /// quarter when `KEEL_TRUSTED_PROXIES` is set (the addresses are the
    /// clients'), else no share of its own (behind a proxy keel does not
    /// trust, every call has the proxy's address).
    pub max_in_flight_per_address: Option<usize>,
    /// `KEEL_TRUSTED_PROXIES`: comma-separated addresses or CIDR ranges of
    /// reverse proxies whose forwarded header is believed (see
    /// `crate::proxy`). Unset: none; the peer is the client.
    pub trusted_proxies: Option<String>,
    /// `KEEL_FORWARDED_HEADER`: `x-forwarded-for` (default) or `forwarded`:
    /// the header those proxies write.
    pub forwarded_header: String,
    /// `KEEL_METRICS`: serve `/metrics` (Prometheus text format) on the main
    /// port, without authentication. Turn it off where the port is public
    /// and the numbers should not be.
    pub metrics: bool,
    /// `KEEL_METRICS_POOL_TIMING`: fill `keel_db_pool_acquire_seconds`
    /// from every checkout of a database connection. Off by default: it
    /// costs about 10 µs of CPU per checkout (one tracing event dispatched
    /// per checkout; `just bench-hotpath`, metrics row 0.93 with it, 0.98
    /// without).
    pub metrics_pool_timing: bool,
    /// `KEEL_RATE_LIMITER`: `auto` (default: Redis when `KEEL_REDIS_URL` is
    /// set, in process otherwise), `local`, `redis` or `off` (no per-method
    /// limits; identity's sign-in limits stay, in process).
    pub rate_limiter: crate::limit::LimiterKind,
    /// `KEEL_RATE_LIMIT_FALLBACK`: while Redis cannot answer, `local`
    /// (default: each process limits alone), `open` (nothing is limited) or
    /// `closed` (every limited call is refused).
    pub rate_limit_fallback: crate::limit::Fallback,
    /// `KEEL_RATE_LIMIT_SHARE_MAX`: on Redis, the most actions of a hot key
    /// one round trip reserves for this process (1024 by default; 1: a round
    /// trip per call). See `crate::limit::RedisRateLimiter`.
    pub rate_limit_share_max: u32,
    /// `KEEL_RATE_LIMITS` (or a `[rate_limits]` table): per-method limits
    /// over the built-in `default` (1000 calls per 60 s per caller), e.g.
    /// `default=600/60;keel.identity.v1.IdentityQueryService/ListUsers=60/60@address`
    /// (see `crate::limit::RateLimitsSetting`).
    pub rate_limits: crate::limit::RateLimitsSetting,
    /// `KEEL_IDEMPOTENCY_TTL_SECONDS`: how long a command's idempotency
    /// record answers retries of its key (24 h by default); expired records
    /// are pruned in batches every `min(ttl, 1 h)`.
    pub idempotency_ttl_seconds: u64,
    /// `KEEL_IDEMPOTENCY_REQUIRED_METHODS`: comma-separated gRPC paths
    /// (`/keel.identity.v1.IdentityCommandService/CreateUser`) that refuse a
    /// call without an idempotency key, besides the methods whose contract
    /// says so (`keel.api.v1.idempotency = IDEMPOTENCY_REQUIRED`).
    pub idempotency_required_methods: Option<String>,
    /// `KEEL_TEST_ABORT_AFTER_COMMIT`: a test hook, refused in production:
    /// the process aborts right after the named command (`identity.create_user`)
    /// commits, before it answers, as a crash there would.
    pub test_abort_after_commit: Option<String>,
    /// `KEEL_OTLP_ENDPOINT`: an OpenTelemetry collector's OTLP/gRPC address
    /// (`http://collector:4317`). Set: spans are exported to it and log
    /// lines carry `trace_id` and `span_id`. Unset: no exporter at all.
    pub otlp_endpoint: Option<String>,
    /// `KEEL_TRACE_SAMPLE_RATIO`: the share of new traces recorded, 0 to 1
    /// (parent-based: a caller's sampled `traceparent` is always followed).
    pub trace_sample_ratio: f64,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 8080)),
            data_dir: PathBuf::from("./keel-data"),
            database_url: None,
            database_schema: None,
            database_max_connections: 16,
            redis_url: None,
            deployment: "keel".to_owned(),
            env: Environment::Development,
            log: "info".to_owned(),
            log_format: None,
            reflection: None,
            auth_keys_file: None,
            auth_issuer: "keel".to_owned(),
            auth_audience: "keel".to_owned(),
            access_token_ttl_seconds: 900,
            refresh_grace_seconds: 10,
            password_hash_concurrency: None,
            bootstrap_admin_email: None,
            bootstrap_admin_password: None,
            max_message_bytes: 4 * 1024 * 1024,
            shutdown_grace_seconds: 10,
            max_connections: 4096,
            first_byte_timeout_seconds: 10,
            idle_timeout_seconds: 120,
            http2_max_concurrent_streams: 200,
            cors_allowed_origins: None,
            hsts: false,
            max_in_flight: 1024,
            max_in_flight_per_address: None,
            trusted_proxies: None,
            forwarded_header: "x-forwarded-for".to_owned(),
            metrics: true,
            metrics_pool_timing: false,
            rate_limiter: crate::limit::LimiterKind::Auto,
            rate_limit_fallback: crate::limit::Fallback::Local,
            rate_limit_share_max: crate::limit::SHARE_MAX,
            rate_limits: crate::limit::RateLimitsSetting::default(),
            idempotency_ttl_seconds: 24 * 3600,
            idempotency_required_methods: None,
            test_abort_after_commit: None,
            otlp_endpoint: None,
            trace_sample_ratio: 1.0,
            register_burst: 10,
            access_cache: true,
            query_cache: false,
            query_cache_ttl_seconds: 60,
            login_burst_per_account_address: 10,
            login_account_burst: 20,
            login_account_interval_ms: 500,
            login_account_max_delay_ms: 2000,
            smtp_url: None,
            mail_from: "Keel <keel@localhost>".to_owned(),
            mail_file: None,
            mail_timeout_ms: 10_000,
            mail_attempts: 2,
            mail_breaker_failures: 5,
            mail_breaker_cool_down_ms: 30_000,
            events_retention_hours: 7 * 24,
            events_heartbeat_seconds: 15,
            stream_ticket_first_use_seconds: 60,
            stream_ticket_lifetime_seconds: 15 * 60,
            events_poll_ms: 30_000,
            events_listen: true,
            event_handler_max_attempts: 5,
            event_handler_backoff_ms: 200,
            jobs_workers: true,
            jobs_concurrency: 10,
            jobs_queues: None,
            jobs_lease_ms: 30_000,
            jobs_poll_ms: 60_000,
            jobs_backoff_ms: 1_000,
            jobs_rate_limits: None,
            jobs_shutdown_grace: "10s".to_owned(),
            jobs_cron: None,
            jobs_retain_completed: "24h".to_owned(),
            jobs_retain_failed: "7d".to_owned(),
            jobs_cancel_grace_ms: 5_000,
            jobs_vacuum_after: 5_000,
            jobs_watch_per_caller: 100,
        }
    }
}

/// A switch: a boolean, or `on` / `off` (what an operator writes).
fn on_or_off<'de, D: serde::Deserializer<'de>>(deserializer: D) -> Result<bool, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Switch {
        Bool(bool),
        Text(String),
    }
    match Switch::deserialize(deserializer)? {
        Switch::Bool(value) => Ok(value),
        Switch::Text(text) => match text.to_ascii_lowercase().as_str() {
            "on" | "true" => Ok(true),
            "off" | "false" => Ok(false),
            _ => Err(serde::de::Error::custom("expected on, off, true or false")),
        },
    }
}

/// A setting written either way: `10s`, or `10` (a TOML or variable number).
fn text_or_number<'de, D: serde::Deserializer<'de>>(deserializer: D) -> Result<String, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum TextOrNumber {
        Number(u64),
        Text(String),
    }
    Ok(match TextOrNumber::deserialize(deserializer)? {
        TextOrNumber::Number(number) => number.to_string(),
        TextOrNumber::Text(text) => text,
    })
}

/// A duration as an operator writes it: `500ms`, `90s`, `15m`, `24h`,
/// `7d`, or a bare number of seconds; longer than zero.
fn parse_duration(text: &str) -> Result<std::time::Duration, String> {
    let text = text.trim();
    let refused = || format!("{text:?} is not a duration (500ms, 90s, 15m, 24h, 7d)");
    let split = text.find(|char: char| !char.is_ascii_digit()).unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let unit_ms: u64 = match unit.trim() {
        "ms" => 1,
        "" | "s" => 1_000,
        "m" => 60_000,
        "h" => 3_600_000,
        "d" => 86_400_000,
        _ => return Err(refused()),
    };
    let number: u64 = number.parse().map_err(|_| refused())?;
    match number.checked_mul(unit_ms) {
        Some(0) => Err(format!("{text:?} must be longer than zero")),
        Some(ms) => Ok(std::time::Duration::from_millis(ms)),
        None => Err(format!("{text:?} is too long")),
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("configuration: {0}")]
    Figment(#[from] Box<figment::Error>),
    #[error("configuration: {setting}: {reason}")]
    Invalid { setting: &'static str, reason: String },
}

fn invalid(setting: &'static str, reason: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        setting,
        reason: reason.into(),
    }
}

impl Config {
    /// `KEEL_JOBS_QUEUES` read: queue names and their concurrency.
    pub fn jobs_queue_concurrency(&self) -> Result<std::collections::HashMap<String, usize>, ConfigError> {
        let mut queues = std::collections::HashMap::new();
        let Some(spec) = &self.jobs_queues else {
            return Ok(queues);
        };
        for entry in spec.split(',').map(str::trim).filter(|entry| !entry.is_empty()) {
            let parsed = entry
                .split_once('=')
                .and_then(|(queue, count)| Some((queue.trim(), count.trim().parse::<usize>().ok()?)))
                .filter(|(queue, count)| !queue.is_empty() && *count > 0);
            let Some((queue, count)) = parsed else {
                return Err(invalid(
                    "KEEL_JOBS_QUEUES",
                    format!("{entry:?} is not queue=concurrency (at least 1)"),
                ));
            };
            queues.insert(queue.to_owned(), count);
        }
        Ok(queues)
    }

    /// `KEEL_JOBS_RATE_LIMITS` read: each queue's quota.
    pub fn jobs_rate_limits(
        &self,
    ) -> Result<std::collections::HashMap<String, keel_kernel::limit::Quota>, ConfigError> {
        let mut quotas = std::collections::HashMap::new();
        let Some(spec) = &self.jobs_rate_limits else {
            return Ok(quotas);
        };
        for entry in spec.split(',').map(str::trim).filter(|entry| !entry.is_empty()) {
            let parsed = entry
                .split_once('=')
                .and_then(|(queue, rate)| {
                    let (limit, window) = rate.split_once('/')?;
                    Some((
                        queue.trim(),
                        limit.trim().parse::<u32>().ok()?,
                        parse_duration(window).ok()?,
                    ))
                })
                .filter(|(queue, limit, window)| !queue.is_empty() && *limit > 0 && !window.is_zero());
            let Some((queue, limit, window)) = parsed else {
                return Err(invalid(
                    "KEEL_JOBS_RATE_LIMITS",
                    format!("{entry:?} is not queue=limit/window (e.g. mail=10/1s; limit at least 1)"),
                ));
            };
            quotas.insert(queue.to_owned(), keel_kernel::limit::Quota::per_window(limit, window));
        }
        Ok(quotas)
    }

    /// `KEEL_JOBS_SHUTDOWN_GRACE` read.
    pub fn jobs_shutdown_grace(&self) -> Result<std::time::Duration, ConfigError> {
        parse_duration(&self.jobs_shutdown_grace).map_err(|error| invalid("KEEL_JOBS_SHUTDOWN_GRACE", error))
    }

    /// `KEEL_JOBS_CRON` read (each kind is checked when the jobs module starts).
    pub fn jobs_cron_entries(&self) -> Result<Vec<keel_jobs::schedule::CronEntry>, ConfigError> {
        keel_jobs::schedule::parse_cron_setting(self.jobs_cron.as_deref().unwrap_or_default())
            .map_err(|error| invalid("KEEL_JOBS_CRON", error))
    }

    /// `KEEL_JOBS_RETAIN_COMPLETED` and `KEEL_JOBS_RETAIN_FAILED` read.
    pub fn jobs_retention(&self) -> Result<keel_jobs::prune::Retention, ConfigError> {
        Ok(keel_jobs::prune::Retention {
            completed: parse_duration(&self.jobs_retain_completed)
                .map_err(|error| invalid("KEEL_JOBS_RETAIN_COMPLETED", error))?,
            failed: parse_duration(&self.jobs_retain_failed)
                .map_err(|error| invalid("KEEL_JOBS_RETAIN_FAILED", error))?,
        })
    }

    /// Defaults, then the file (`path`, or `./keel.toml` when it exists), then `KEEL_*`.
    pub fn load(path: Option<&Path>) -> Result<Config, ConfigError> {
        let mut figment = Figment::from(Serialized::defaults(Config::default()));
        match path {
            Some(path) => {
                if !path.exists() {
                    return Err(invalid("--config", format!("{} does not exist", path.display())));
                }
                figment = figment.merge(Toml::file(path));
            }
            None => figment = figment.merge(Toml::file("keel.toml")),
        }
        let config: Config = figment
            .merge(Env::prefixed("KEEL_").ignore(&["config"]))
            .extract()
            .map_err(Box::new)?;
        config.validate()?;
        Ok(config)
    }

    pub fn validate(&self) -> Result<(), ConfigError> {
        if let Some(url) = &self.database_url {
            let scheme = url.expose().split(':').next().unwrap_or_default();
            if !matches!(scheme, "postgres" | "postgresql" | "sqlite") {
                return Err(invalid(
                    "KEEL_DATABASE_URL",
                    format!("scheme {scheme:?} is not supported; use postgres:// or sqlite://"),
                ));
            }
        }
        if let Some(url) = &self.redis_url
            && !url.expose().starts_with("redis://")
            && !url.expose().starts_with("rediss://")
        {
            return Err(invalid("KEEL_REDIS_URL", "must start with redis:// or rediss://"));
        }
        let deployment_is_a_name = self
            .deployment
            .chars()
            .all(|char| char.is_ascii_alphanumeric() || matches!(char, '-' | '_' | '.'));
        if self.deployment.is_empty() || self.deployment.len() > 64 || !deployment_is_a_name {
            return Err(invalid(
                "KEEL_DEPLOYMENT",
                "must be 1 to 64 characters of letters, digits, '-', '_' or '.'",
            ));
        }
        if self.login_burst_per_account_address == 0 {
            return Err(invalid("KEEL_LOGIN_BURST_PER_ACCOUNT_ADDRESS", "must be at least 1"));
        }
        if self.login_account_max_delay_ms > 60_000 {
            return Err(invalid(
                "KEEL_LOGIN_ACCOUNT_MAX_DELAY_MS",
                "must be at most 60000: a delay, not a lock-out",
            ));
        }
        if self.max_connections == 0 {
            return Err(invalid("KEEL_MAX_CONNECTIONS", "must be at least 1"));
        }
        if self.first_byte_timeout_seconds == 0 {
            return Err(invalid("KEEL_FIRST_BYTE_TIMEOUT_SECONDS", "must be at least 1"));
        }
        if self.idle_timeout_seconds == 0 {
            return Err(invalid("KEEL_IDLE_TIMEOUT_SECONDS", "must be at least 1"));
        }
        if self.http2_max_concurrent_streams == 0 {
            return Err(invalid("KEEL_HTTP2_MAX_CONCURRENT_STREAMS", "must be at least 1"));
        }
        if self.max_message_bytes < 1024 {
            return Err(invalid("KEEL_MAX_MESSAGE_BYTES", "must be at least 1024"));
        }
        if self.access_token_ttl_seconds == 0 || self.access_token_ttl_seconds > 24 * 3600 {
            return Err(invalid("KEEL_ACCESS_TOKEN_TTL_SECONDS", "must be between 1 and 86400"));
        }
        if self.password_hash_concurrency == Some(0) {
            return Err(invalid("KEEL_PASSWORD_HASH_CONCURRENCY", "must be at least 1"));
        }
        if self.events_heartbeat_seconds == 0 {
            return Err(invalid("KEEL_EVENTS_HEARTBEAT_SECONDS", "must be at least 1"));
        }
        if self.stream_ticket_first_use_seconds == 0 {
            return Err(invalid("KEEL_STREAM_TICKET_FIRST_USE_SECONDS", "must be at least 1"));
        }
        if self.stream_ticket_lifetime_seconds < self.stream_ticket_first_use_seconds {
            return Err(invalid(
                "KEEL_STREAM_TICKET_LIFETIME_SECONDS",
                "must be at least KEEL_STREAM_TICKET_FIRST_USE_SECONDS",
            ));
        }
        if let Some(endpoint) = &self.otlp_endpoint
            && !endpoint.starts_with("http://")
            && !endpoint.starts_with("https://")
        {
            return Err(invalid("KEEL_OTLP_ENDPOINT", "must start with http:// or https://"));
        }
        if !(0.0..=1.0).contains(&self.trace_sample_ratio) {
            return Err(invalid("KEEL_TRACE_SAMPLE_RATIO", "must be between 0 and 1"));
        }
        if self.jobs_concurrency == 0 {
            return Err(invalid("KEEL_JOBS_CONCURRENCY", "must be at least 1"));
        }
        self.jobs_queue_concurrency()?;
        self.jobs_rate_limits()?;
        self.jobs_shutdown_grace()?;
        if self.jobs_lease_ms < 300 {
            return Err(invalid("KEEL_JOBS_LEASE_MS", "must be at least 300"));
        }
        if self.jobs_poll_ms == 0 {
            return Err(invalid("KEEL_JOBS_POLL_MS", "must be at least 1"));
        }
        self.jobs_cron_entries()?;
        self.jobs_retention()?;
        if self.event_handler_max_attempts == 0 {
            return Err(invalid("KEEL_EVENT_HANDLER_MAX_ATTEMPTS", "must be at least 1"));
        }
        for (name, value) in [
            ("KEEL_MAIL_TIMEOUT_MS", self.mail_timeout_ms),
            ("KEEL_MAIL_ATTEMPTS", u64::from(self.mail_attempts)),
            ("KEEL_MAIL_BREAKER_FAILURES", u64::from(self.mail_breaker_failures)),
        ] {
            if value == 0 {
                return Err(invalid(name, "must be at least 1"));
            }
        }
        if let Some(url) = &self.smtp_url {
            crate::mail::SmtpSettings::parse(url.expose()).map_err(|reason| invalid("KEEL_SMTP_URL", reason))?;
        }
        if self.database_max_connections == 0 {
            return Err(invalid("KEEL_DATABASE_MAX_CONNECTIONS", "must be at least 1"));
        }
        if self.auth_issuer.is_empty() || self.auth_audience.is_empty() {
            return Err(invalid("KEEL_AUTH_ISSUER", "issuer and audience must not be empty"));
        }
        if self.bootstrap_admin_email.is_some() != self.bootstrap_admin_password.is_some() {
            return Err(invalid(
                "KEEL_BOOTSTRAP_ADMIN_PASSWORD",
                "set both KEEL_BOOTSTRAP_ADMIN_EMAIL and KEEL_BOOTSTRAP_ADMIN_PASSWORD, or neither",
            ));
        }
        for origin in self.cors_settings().allowed_origins {
            // An origin as browsers send it: scheme, host and port, nothing
            // else, so an exact comparison is the right one.
            let canonical = url::Url::parse(&origin)
                .ok()
                .map(|url| url.origin())
                .filter(url::Origin::is_tuple)
                .map(|parsed| parsed.ascii_serialization());
            if origin != "*" && canonical.as_deref() != Some(origin.as_str()) {
                return Err(invalid(
                    "KEEL_CORS_ALLOWED_ORIGINS",
                    format!(
                        "{origin:?} is not an origin: write scheme://host[:port] in lower case without a path \
                         (https://app.example.com), or *; null is never allowed"
                    ),
                ));
            }
        }
        if self.max_in_flight == 0 {
            return Err(invalid("KEEL_MAX_IN_FLIGHT", "must be at least 1"));
        }
        if self.max_in_flight_per_address == Some(0) {
            return Err(invalid("KEEL_MAX_IN_FLIGHT_PER_ADDRESS", "must be at least 1"));
        }
        self.trusted_proxies()?;
        self.rate_limit_policies()?;
        if self.rate_limiter == crate::limit::LimiterKind::Redis && self.redis_url.is_none() {
            return Err(invalid("KEEL_RATE_LIMITER", "redis needs KEEL_REDIS_URL"));
        }
        if self.query_cache_ttl_seconds == 0 {
            return Err(invalid("KEEL_QUERY_CACHE_TTL_SECONDS", "must be at least 1"));
        }
        if self.idempotency_ttl_seconds == 0 {
            return Err(invalid("KEEL_IDEMPOTENCY_TTL_SECONDS", "must be at least 1"));
        }
        for method in self.idempotency_required_methods() {
            if !method.starts_with('/') || method.matches('/').count() != 2 {
                return Err(invalid(
                    "KEEL_IDEMPOTENCY_REQUIRED_METHODS",
                    format!("{method:?} is not a gRPC path (/package.Service/Method)"),
                ));
            }
        }
        if self.env == Environment::Production && self.test_abort_after_commit.is_some() {
            return Err(invalid(
                "KEEL_TEST_ABORT_AFTER_COMMIT",
                "is a test hook and is refused when KEEL_ENV=production",
            ));
        }
        if self.env == Environment::Production && self.auth_keys_file.is_none() {
            return Err(invalid(
                "KEEL_AUTH_KEYS_FILE",
                "is required when KEEL_ENV=production (create one with `keel keys generate`)",
            ));
        }
        Ok(())
    }

    /// The proxies whose forwarded header is believed (see `KEEL_TRUSTED_PROXIES`).
    pub fn trusted_proxies(&self) -> Result<crate::proxy::TrustedProxies, ConfigError> {
        let header = crate::proxy::ForwardedHeader::parse(&self.forwarded_header)
            .map_err(|error| invalid("KEEL_FORWARDED_HEADER", error))?;
        crate::proxy::TrustedProxies::parse(self.trusted_proxies.as_deref().unwrap_or_default(), header)
            .map_err(|error| invalid("KEEL_TRUSTED_PROXIES", error))
    }

    /// The per-method rate limits (see `KEEL_RATE_LIMITS`).
    pub fn rate_limit_policies(&self) -> Result<crate::limit::Policies, ConfigError> {
        crate::limit::Policies::from_setting(&self.rate_limits).map_err(|error| invalid("KEEL_RATE_LIMITS", error))
    }

    /// The load shedder of `KEEL_MAX_IN_FLIGHT` and
    /// `KEEL_MAX_IN_FLIGHT_PER_ADDRESS`.
    pub fn shedder(&self) -> keel_edge::shed::Shedder {
        let shedder = keel_edge::shed::Shedder::new(self.max_in_flight);
        match self.max_in_flight_per_address {
            Some(max) => shedder.with_max_per_address(max),
            None if self.trusted_proxies.is_some() => shedder.with_max_per_address(self.max_in_flight / 4),
            None => shedder,
        }
    }

    /// Which browser origins may call keel (see `KEEL_CORS_ALLOWED_ORIGINS`).
    pub fn cors_settings(&self) -> keel_edge::CorsSettings {
        match &self.cors_allowed_origins {
            Some(origins) => keel_edge::CorsSettings {
                allowed_origins: origins
                    .split(',')
                    .map(str::trim)
                    .filter(|origin| !origin.is_empty())
                    .map(str::to_owned)
                    .collect(),
                allow_loopback: false,
            },
            None => keel_edge::CorsSettings {
                allowed_origins: Vec::new(),
                allow_loopback: self.env == Environment::Development,
            },
        }
    }

    pub fn security_settings(&self) -> keel_edge::SecuritySettings {
        keel_edge::SecuritySettings { hsts: self.hsts }
    }

    /// The gRPC paths of `KEEL_IDEMPOTENCY_REQUIRED_METHODS`.
    pub fn idempotency_required_methods(&self) -> impl Iterator<Item = &str> {
        self.idempotency_required_methods
            .as_deref()
            .unwrap_or_default()
            .split(',')
            .map(str::trim)
            .filter(|method| !method.is_empty())
    }

    pub fn reflection_enabled(&self) -> bool {
        self.reflection.unwrap_or(self.env != Environment::Production)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secrets_never_reach_debug_output() {
        let config = Config {
            database_url: Some(Secret::new("postgres://keel:hunter2@db/keel".to_owned())),
            bootstrap_admin_password: Some(Secret::new("hunter2".to_owned())),
            ..Config::default()
        };
        let printed = format!("{config:?}");
        assert!(!printed.contains("hunter2"), "{printed}");
        assert!(printed.contains("[redacted]"));
    }

    #[test]
    fn job_queues_read_as_name_and_concurrency() {
        let config = Config {
            jobs_queues: Some("mail=2, default=20,".to_owned()),
            ..Config::default()
        };
        let queues = config.jobs_queue_concurrency().expect("valid");
        assert_eq!(queues.get("mail"), Some(&2));
        assert_eq!(queues.get("default"), Some(&20));
        for bad in ["mail", "mail=0", "=3", "mail=x"] {
            let config = Config {
                jobs_queues: Some(bad.to_owned()),
                ..Config::default()
            };
            let error = config.validate().expect_err(bad).to_string();
            assert!(error.contains("KEEL_JOBS_QUEUES"), "{error}");
        }
    }

    #[test]
    fn job_rate_limits_and_shutdown_grace_read_back() {
        let config = Config {
            jobs_rate_limits: Some("mail=10/1s, reports=6/1m,".to_owned()),
            jobs_shutdown_grace: "1500ms".to_owned(),
            ..Config::default()
        };
        let quotas = config.jobs_rate_limits().expect("valid");
        assert_eq!(
            quotas.get("mail"),
            Some(&keel_kernel::limit::Quota::per_window(
                10,
                std::time::Duration::from_secs(1)
            ))
        );
        assert_eq!(
            quotas.get("reports").map(|quota| quota.period),
            Some(std::time::Duration::from_secs(10))
        );
        assert_eq!(
            config.jobs_shutdown_grace().ok(),
            Some(std::time::Duration::from_millis(1500))
        );
        assert_eq!(
            Config::default().jobs_shutdown_grace().ok(),
            Some(std::time::Duration::from_secs(10))
        );
        for bad in ["mail", "mail=0/1s", "mail=10", "mail=10/0s", "=1/1s"] {
            let config = Config {
                jobs_rate_limits: Some(bad.to_owned()),
                ..Config::default()
            };
            let error = config.validate().expect_err(bad).to_string();
            assert!(error.contains("KEEL_JOBS_RATE_LIMITS"), "{error}");
        }
        let config = Config {
            jobs_shutdown_grace: "soon".to_owned(),
            ..Config::default()
        };
        let error = config.validate().expect_err("soon").to_string();
        assert!(error.contains("KEEL_JOBS_SHUTDOWN_GRACE"), "{error}");
    }

    #[test]
    fn job_retention_reads_durations_and_names_the_setting() {
        let retention = Config::default().jobs_retention().expect("defaults");
        assert_eq!(retention.completed, std::time::Duration::from_secs(24 * 3600));
        assert_eq!(retention.failed, std::time::Duration::from_secs(7 * 24 * 3600));
        for (text, seconds) in [
            ("90s", 90),
            ("15m", 900),
            ("2h", 7200),
            ("3d", 3 * 86400),
            ("3600", 3600),
        ] {
            assert_eq!(
                parse_duration(text),
                Ok(std::time::Duration::from_secs(seconds)),
                "{text}"
            );
        }
        for bad in ["", "0", "0h", "h", "5w", "-1d", "1.5h"] {
            let config = Config {
                jobs_retain_failed: bad.to_owned(),
                ..Config::default()
            };
            let error = config.validate().expect_err(bad).to_string();
            assert!(error.contains("KEEL_JOBS_RETAIN_FAILED"), "{bad}: {error}");
        }
    }

    #[test]
    #[allow(clippy::result_large_err)] // figment's Jail fixes the closure's error type
    fn job_schedules_and_retention_come_from_variables() {
        figment::Jail::expect_with(|jail| {
            jail.set_env(
                "KEEL_JOBS_CRON",
                "tick|*/10 * * * * *|jobs.noop|{\"sleep_ms\":1};nightly|@daily|jobs.noop",
            );
            jail.set_env("KEEL_JOBS_RETAIN_COMPLETED", "3600");
            let config = Config::load(None).map_err(|error| error.to_string())?;
            let entries = config.jobs_cron_entries().map_err(|error| error.to_string())?;
            assert_eq!(entries.len(), 2);
            assert_eq!(entries[0].cron, "*/10 * * * * *");
            assert_eq!(entries[1].name, "nightly");
            let retention = config.jobs_retention().map_err(|error| error.to_string())?;
            assert_eq!(retention.completed, std::time::Duration::from_secs(3600));
            jail.set_env("KEEL_JOBS_CRON", "tick|every second|jobs.noop");
            let error = Config::load(None).expect_err("refused").to_string();
            assert!(error.contains("KEEL_JOBS_CRON"), "{error}");
            Ok(())
        });
    }

    #[test]
    fn production_needs_keys_and_errors_name_the_setting() {
        let config = Config {
            env: Environment::Production,
            ..Config::default()
        };
        let error = config.validate().expect_err("refused").to_string();
        assert!(error.contains("KEEL_AUTH_KEYS_FILE"), "{error}");
        assert!(!config.reflection_enabled());
    }

    #[test]
    fn cors_defaults_to_loopback_in_development_and_nothing_in_production() {
        let development = Config::default().cors_settings();
        assert!(development.allow_loopback && development.allowed_origins.is_empty());
        let production = Config {
            env: Environment::Production,
            ..Config::default()
        }
        .cors_settings();
        assert!(!production.allow_loopback && production.allowed_origins.is_empty());
        let configured = Config {
            cors_allowed_origins: Some("https://app.example.com, *".to_owned()),
            ..Config::default()
        };
        configured.validate().expect("valid origins");
        let settings = configured.cors_settings();
        assert!(!settings.allow_loopback);
        assert_eq!(settings.allowed_origins, ["https://app.example.com", "*"]);
    }

    #[test]
    fn cors_origins_that_are_not_origins_are_refused() {
        for origins in [
            "null",
            "https://app.example.com/",
            "https://App.example.com",
            "app.example.com",
            "https://app.example.com/path",
            "file:///tmp/x",
        ] {
            let config = Config {
                cors_allowed_origins: Some(origins.to_owned()),
                ..Config::default()
            };
            let error = config.validate().expect_err(origins).to_string();
            assert!(error.contains("KEEL_CORS_ALLOWED_ORIGINS"), "{error}");
        }
    }

    #[test]
    #[allow(clippy::result_large_err)] // figment's Jail fixes the closure's error type
    fn env_variables_override_the_file_and_bad_values_name_the_key() {
        figment::Jail::expect_with(|jail| {
            jail.create_file("keel.toml", "listen = \"127.0.0.1:9000\"\nlog = \"debug\"")?;
            jail.set_env("KEEL_LISTEN", "127.0.0.1:9100");
            let config = Config::load(None).map_err(|error| error.to_string())?;
            assert_eq!(config.listen.port(), 9100);
            assert_eq!(config.log, "debug");
            jail.set_env("KEEL_MAX_MESSAGE_BYTES", "lots");
            let error = Config::load(None).expect_err("refused").to_string();
            assert!(
                error.contains("MAX_MESSAGE_BYTES") && error.contains("KEEL_"),
                "{error}"
            );
            Ok(())
        });
    }

    #[test]
    #[allow(clippy::result_large_err)] // figment's Jail fixes the closure's error type
    fn the_query_cache_is_off_by_default_and_on_by_a_variable() {
        figment::Jail::expect_with(|jail| {
            let config = Config::load(None).map_err(|error| error.to_string())?;
            assert!(!config.query_cache);
            assert_eq!(config.query_cache_ttl_seconds, 60);
            jail.set_env("KEEL_QUERY_CACHE", "on");
            let config = Config::load(None).map_err(|error| error.to_string())?;
            assert!(config.query_cache);
            jail.set_env("KEEL_QUERY_CACHE", "off");
            jail.set_env("KEEL_QUERY_CACHE_TTL_SECONDS", "5");
            let config = Config::load(None).map_err(|error| error.to_string())?;
            assert!(!config.query_cache);
            assert_eq!(config.query_cache_ttl_seconds, 5);
            jail.set_env("KEEL_QUERY_CACHE_TTL_SECONDS", "0");
            let error = Config::load(None).expect_err("refused").to_string();
            assert!(error.contains("KEEL_QUERY_CACHE_TTL_SECONDS"), "{error}");
            Ok(())
        });
    }

    #[test]
    #[allow(clippy::result_large_err)] // figment's Jail fixes the closure's error type
    fn rate_limits_come_from_a_table_or_a_variable() {
        figment::Jail::expect_with(|jail| {
            jail.create_file(
                "keel.toml",
                "[rate_limits.default]\nlimit = 100\nwindow_seconds = 60\n\n\
                 [rate_limits.\"keel.identity.v1.IdentityQueryService/GetUser\"]\nlimit = 5\nwindow_seconds = 10\nby = \"address\"\n",
            )?;
            let config = Config::load(None).map_err(|error| error.to_string())?;
            let entries = config.rate_limits.entries().map_err(|error| error.to_string())?;
            assert_eq!(entries["default"].limit, 100);
            assert_eq!(
                entries["keel.identity.v1.IdentityQueryService/GetUser"].by,
                crate::limit::KeyedBy::Address
            );
            jail.set_env("KEEL_RATE_LIMITS", "default=7/60");
            jail.set_env("KEEL_RATE_LIMIT_FALLBACK", "closed");
            let config = Config::load(None).map_err(|error| error.to_string())?;
            let entries = config.rate_limits.entries().map_err(|error| error.to_string())?;
            assert_eq!(entries.len(), 1);
            assert_eq!(entries["default"].limit, 7);
            assert_eq!(config.rate_limit_fallback, crate::limit::Fallback::Closed);
            jail.set_env("KEEL_RATE_LIMITS", "default=lots");
            let error = Config::load(None).expect_err("refused").to_string();
            assert!(error.contains("KEEL_RATE_LIMITS"), "{error}");
            Ok(())
        });
    }
}
