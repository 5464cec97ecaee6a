//! `/metrics`: Prometheus text format (prometheus-client), on the main
//! port, never behind user auth, off with `KEEL_METRICS=false`.
//!
//! Calls are counted where every protocol meets: the gRPC tier, which the
//! edge calls in process for REST, Connect and grpc-web with JSON. The
//! `protocol` label is what the listener saw (`keel_edge::Protocol`); the
//! `method` label is the gRPC method's full name, or `unknown` for a path
//! that names none (label values stay bounded whatever callers send);
//! `code` is the gRPC status name. What is read rather than counted (the
//! database pool, the outbox, dead letters, subscribers, the process) is
//! read at scrape time.

use std::collections::HashSet;
use std::pin::Pin;
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, LazyLock};
use std::task::{Context, Poll};
use std::time::Instant;

use bytes::Bytes;
use futures::future::BoxFuture;
use http::{Request, Response};
use http_body::Frame;
use keel_edge::Protocol;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::{Registry, Unit};
use tonic::body::Body;
use tower::{Layer, Service};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CallLabels {
    protocol: &'static str,
    method: String,
    code: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct MethodLabels {
    protocol: &'static str,
    method: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OnlyMethodLabels {
    method: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ProtocolLabels {
    protocol: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct TargetLabels {
    target: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct TargetStateLabels {
    target: &'static str,
    state: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct QueueLabels {
    queue: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StateLabels {
    state: &'static str,
}

fn latency_histogram() -> Histogram {
    // 0.5 ms to ~16 s.
    Histogram::new(prometheus_client::metrics::histogram::exponential_buckets(
        0.0005, 2.0, 16,
    ))
}

/// Waits for a database connection, from sqlx's own timing of every
/// checkout (`telemetry` feeds it; one per process, whichever pool waited).
/// 10 µs to ~5 s, the pool's acquire timeout. The rate of its `_sum` is the
/// mean number of callers waiting for a connection (Little's law): the
/// pool's "waiting", which sqlx does not count.
pub(crate) static POOL_ACQUIRE_SECONDS: LazyLock<Histogram> = LazyLock::new(|| {
    Histogram::new(prometheus_client::metrics::histogram::exponential_buckets(
        0.000_01, 2.0, 20,
    ))
});

/// Whether checkouts are timed (`KEEL_METRICS_POOL_TIMING`): set by the
/// first keel of the process that asks; the tracing filter reads it.
static POOL_TIMING: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Times every checkout of a database connection from now on, in this process.
pub fn time_pool_checkouts() {
    POOL_TIMING.store(true, std::sync::atomic::Ordering::Relaxed);
}

pub(crate) fn pool_checkouts_timed() -> bool {
    POOL_TIMING.load(std::sync::atomic::Ordering::Relaxed)
}

/// Every metric keel exports, in one registry per process.
pub struct Metrics {
    registry: Registry,
    methods: HashSet<String>,
    requests: Family<CallLabels, Counter>,
    durations: Family<MethodLabels, Histogram, fn() -> Histogram>,
    in_flight: Family<ProtocolLabels, Gauge>,
    pool_connections: Family<StateLabels, Gauge>,
    pool_max: Gauge,
    pool_timeouts: Counter,
    outbox_backlog: Gauge,
    relay_lag: Gauge<f64, AtomicU64>,
    dead_letters: Gauge,
    subscribers: Gauge,
    subscribers_dropped_slow: Counter,
    handler_retries: Counter,
    shed: Counter,
    query_cache_hits: Counter,
    query_cache_misses: Counter,
    rate_limited: Family<OnlyMethodLabels, Counter>,
    breaker_state: Family<TargetStateLabels, Gauge>,
    breaker_failures: Family<TargetLabels, Gauge>,
    breaker_opened: Family<TargetLabels, Counter>,
    breaker_rejected: Family<TargetLabels, Counter>,
    queues: QueueGauges,
    job_retries: Counter,
    job_failures: Counter,
    cpu: Counter<f64, AtomicU64>,
    resident: Gauge,
}

/// Per job queue, what `GetQueueStats` says of it.
struct QueueGauges {
    available: Family<QueueLabels, Gauge>,
    depth: Family<QueueLabels, Gauge>,
    oldest_waiting: Family<QueueLabels, Gauge<f64, AtomicU64>>,
    running: Family<QueueLabels, Gauge>,
    failed: Family<QueueLabels, Gauge>,
    paused: Family<QueueLabels, Gauge>,
    /// The queues the last refresh found: one that is gone since (its jobs
    /// pruned, its pause lifted) loses its series rather than keeping the
    /// last values.
    shown: std::sync::Mutex<std::collections::HashSet<String>>,
}

impl QueueGauges {
    fn register(registry: &mut Registry) -> Self {
        let gauges = QueueGauges {
            available: Family::default(),
            depth: Family::default(),
            oldest_waiting: Family::default(),
            running: Family::default(),
            failed: Family::default(),
            paused: Family::default(),
            shown: std::sync::Mutex::default(),
        };
        registry.register(
            "job_queue_available",
            "Jobs due now, waiting for a worker",
            gauges.available.clone(),
        );
        registry.register(
            "job_queue_depth",
            "Every waiting job: due, delayed or backing off",
            gauges.depth.clone(),
        );
        registry.register_with_unit(
            "job_queue_oldest_waiting",
            "How long the oldest due job has waited since it became due",
            Unit::Seconds,
            gauges.oldest_waiting.clone(),
        );
        registry.register("job_queue_running", "Jobs running now", gauges.running.clone());
        registry.register(
            "job_queue_failed",
            "Failed jobs kept (the queue's dead letters)",
            gauges.failed.clone(),
        );
        registry.register("job_queue_paused", "1 while the queue is paused", gauges.paused.clone());
        gauges
    }

    /// Shows `queues`, and no other.
    fn show(&self, queues: &[keel_jobs::QueueStats]) {
        let now: std::collections::HashSet<String> = queues.iter().map(|stats| stats.queue.clone()).collect();
        let mut shown = self.shown.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        for gone in shown.difference(&now) {
            let labels = QueueLabels { queue: gone.clone() };
            self.available.remove(&labels);
            self.depth.remove(&labels);
            self.oldest_waiting.remove(&labels);
            self.running.remove(&labels);
            self.failed.remove(&labels);
            self.paused.remove(&labels);
        }
        queues.iter().for_each(|stats| self.set(stats));
        *shown = now;
    }

    fn set(&self, stats: &keel_jobs::QueueStats) {
        let labels = QueueLabels {
            queue: stats.queue.clone(),
        };
        let count = |value: u64| i64::try_from(value).unwrap_or(i64::MAX);
        self.available.get_or_create(&labels).set(count(stats.available));
        self.depth.get_or_create(&labels).set(count(stats.depth));
        self.oldest_waiting
            .get_or_create(&labels)
            .set(stats.oldest_waiting.map_or(0.0, |age| age.as_secs_f64()));
        self.running.get_or_create(&labels).set(count(stats.running));
        self.failed.get_or_create(&labels).set(count(stats.failed));
        self.paused.get_or_create(&labels).set(i64::from(stats.paused));
    }
}

impl Metrics {
    pub fn new(descriptor_set: &[u8]) -> anyhow::Result<Metrics> {
        let pool = prost_reflect::DescriptorPool::decode(descriptor_set)?;
        let methods = pool
            .services()
            .flat_map(|service| service.methods().collect::<Vec<_>>())
            .map(|method| format!("/{}/{}", method.parent_service().full_name(), method.name()))
            .collect();
        let mut registry = Registry::with_prefix("keel");
        let requests = Family::<CallLabels, Counter>::default();
        registry.register(
            "requests",
            "Calls answered, by protocol, method and gRPC code",
            requests.clone(),
        );
        let durations = Family::<MethodLabels, Histogram, fn() -> Histogram>::new_with_constructor(latency_histogram);
        registry.register_with_unit(
            "request_duration",
            "Time from a call's arrival to the end of its answer (a stream's whole life)",
            Unit::Seconds,
            durations.clone(),
        );
        let in_flight = Family::<ProtocolLabels, Gauge>::default();
        registry.register("requests_in_flight", "Calls being answered now", in_flight.clone());
        let pool_connections = Family::<StateLabels, Gauge>::default();
        registry.register(
            "db_pool_connections",
            "Database connections of the pool, idle or in use",
            pool_connections.clone(),
        );
        let pool_max = Gauge::default();
        registry.register("db_pool_max_connections", "The pool's size limit", pool_max.clone());
        let pool_timeouts = Counter::default();
        registry.register(
            "db_pool_acquire_timeouts",
            "Checkouts of a database connection that timed out (not in keel_db_pool_acquire_seconds)",
            pool_timeouts.clone(),
        );
        registry.register_with_unit(
            "db_pool_acquire",
            "Time a caller waited for a database connection (the rate of the sum: callers waiting, on average)",
            Unit::Seconds,
            POOL_ACQUIRE_SECONDS.clone(),
        );
        let outbox_backlog = Gauge::default();
        registry.register(
            "outbox_backlog_events",
            "Committed events the relay has not numbered yet",
            outbox_backlog.clone(),
        );
        let relay_lag = Gauge::<f64, AtomicU64>::default();
        registry.register_with_unit(
            "outbox_relay_lag",
            "Age of the oldest event the relay has not numbered yet (0: none waiting)",
            Unit::Seconds,
            relay_lag.clone(),
        );
        let dead_letters = Gauge::default();
        registry.register(
            "event_dead_letters",
            "Events a durable handler gave up on, not replayed yet",
            dead_letters.clone(),
        );
        let subscribers = Gauge::default();
        registry.register(
            "realtime_subscribers",
            "Open event subscriptions on this process",
            subscribers.clone(),
        );
        let shed = Counter::default();
        let subscribers_dropped_slow = Counter::default();
        registry.register(
            "realtime_subscribers_dropped_slow",
            "Live event feeds ended because their subscriber fell too far behind",
            subscribers_dropped_slow.clone(),
        );
        let handler_retries = Counter::default();
        registry.register(
            "event_handler_retries",
            "Durable event handler runs that failed and were retried",
            handler_retries.clone(),
        );
        registry.register("shed_requests", "Calls refused by load shedding", shed.clone());
        let query_cache_hits = Counter::default();
        registry.register(
            "query_cache_hits",
            "Queries answered from the query cache",
            query_cache_hits.clone(),
        );
        let query_cache_misses = Counter::default();
        registry.register(
            "query_cache_misses",
            "Cacheable queries that ran their handler",
            query_cache_misses.clone(),
        );
        let rate_limited = Family::<OnlyMethodLabels, Counter>::default();
        registry.register(
            "rate_limited",
            "Calls refused by their rate limit (KEEL_RATE_LIMITS), by method",
            rate_limited.clone(),
        );
        let breaker_state = Family::<TargetStateLabels, Gauge>::default();
        registry.register(
            "outbound_breaker_state",
            "1 for the state each outbound target's circuit breaker is in (closed, open, half_open), 0 for the others",
            breaker_state.clone(),
        );
        let breaker_failures = Family::<TargetLabels, Gauge>::default();
        registry.register(
            "outbound_breaker_consecutive_failures",
            "Consecutive transient failures of an outbound target",
            breaker_failures.clone(),
        );
        let breaker_opened = Family::<TargetLabels, Counter>::default();
        registry.register(
            "outbound_breaker_opened",
            "Times an outbound target's circuit breaker opened",
            breaker_opened.clone(),
        );
        let breaker_rejected = Family::<TargetLabels, Counter>::default();
        registry.register(
            "outbound_rejected",
            "Outbound calls refused by an open circuit breaker, without reaching the target",
            breaker_rejected.clone(),
        );
        let queues = QueueGauges::register(&mut registry);
        let job_retries = Counter::default();
        registry.register(
            "job_retries",
            "Attempts this process's workers failed and scheduled again",
            job_retries.clone(),
        );
        let job_failures = Counter::default();
        registry.register(
            "job_failures",
            "Jobs this process's workers gave up on (failed, kept)",
            job_failures.clone(),
        );
        let cpu = Counter::<f64, AtomicU64>::default();
        registry.register_with_unit("process_cpu", "CPU time used by keel", Unit::Seconds, cpu.clone());
        let resident = Gauge::default();
        registry.register_with_unit(
            "process_resident_memory",
            "Resident memory of keel",
            Unit::Bytes,
            resident.clone(),
        );
        Ok(Metrics {
            registry,
            methods,
            requests,
            durations,
            in_flight,
            pool_connections,
            pool_max,
            pool_timeouts,
            outbox_backlog,
            relay_lag,
            dead_letters,
            subscribers,
            subscribers_dropped_slow,
            handler_retries,
            shed,
            query_cache_hits,
            query_cache_misses,
            rate_limited,
            breaker_state,
            breaker_failures,
            breaker_opened,
            breaker_rejected,
            queues,
            job_retries,
            job_failures,
            cpu,
            resident,
        })
    }

    /// Reads what is read rather than counted, then renders the text format.
    pub async fn render(&self, state: &crate::State, shedder: Option<&keel_edge::shed::Shedder>) -> String {
        let (idle, size, max) = keel_db::pool_status(&state.db);
        self.pool_connections
            .get_or_create(&StateLabels { state: "idle" })
            .set(i64::from(idle));
        self.pool_connections
            .get_or_create(&StateLabels { state: "in_use" })
            .set(i64::from(size.saturating_sub(idle)));
        self.pool_max.set(i64::from(max));
        let timeouts = keel_kernel::error::POOL_ACQUIRE_TIMEOUTS.load(std::sync::atomic::Ordering::Relaxed);
        let counted = self.pool_timeouts.get();
        if timeouts > counted {
            self.pool_timeouts.inc_by(timeouts - counted);
        }
        match state.events.backlog().await {
            Ok(backlog) => {
                self.outbox_backlog
                    .set(i64::try_from(backlog.unnumbered).unwrap_or(i64::MAX));
                self.relay_lag
                    .set(backlog.oldest_age.map_or(0.0, |age| age.as_secs_f64()));
                self.dead_letters
                    .set(i64::try_from(backlog.dead_letters).unwrap_or(i64::MAX));
            }
            Err(error) => tracing::warn!(error = %error, "metrics: reading the outbox backlog"),
        }
        let hub = state.events.hub();
        self.subscribers
            .set(i64::try_from(hub.subscribers()).unwrap_or(i64::MAX));
        self.subscribers_dropped_slow
            .inc_by(hub.dropped_slow().saturating_sub(self.subscribers_dropped_slow.get()));
        self.handler_retries
            .inc_by(hub.handler_retries().saturating_sub(self.handler_retries.get()));
        if let Some(shedder) = shedder {
            let total = shedder.shed_total();
            self.shed.inc_by(total.saturating_sub(self.shed.get()));
        }
        let stats = state.bus.query_cache_stats();
        self.query_cache_hits
            .inc_by(stats.hits().saturating_sub(self.query_cache_hits.get()));
        self.query_cache_misses
            .inc_by(stats.misses().saturating_sub(self.query_cache_misses.get()));
        for breaker in state.breakers.iter() {
            let snapshot = breaker.snapshot();
            let target = snapshot.target;
            for candidate in [
                keel_kernel::outbound::BreakerState::Closed,
                keel_kernel::outbound::BreakerState::Open,
                keel_kernel::outbound::BreakerState::HalfOpen,
            ] {
                self.breaker_state
                    .get_or_create(&TargetStateLabels {
                        target,
                        state: candidate.as_str(),
                    })
                    .set(i64::from(candidate == snapshot.state));
            }
            self.breaker_failures
                .get_or_create(&TargetLabels { target })
                .set(i64::from(snapshot.consecutive_failures));
            let opened = self.breaker_opened.get_or_create(&TargetLabels { target });
            opened.inc_by(snapshot.opened_total.saturating_sub(opened.get()));
            let rejected = self.breaker_rejected.get_or_create(&TargetLabels { target });
            rejected.inc_by(snapshot.rejected_total.saturating_sub(rejected.get()));
        }
        match state.jobs.stats().await {
            Ok(queues) => self.queues.show(&queues),
            Err(error) => tracing::warn!(error = %error, "metrics: reading the job queues"),
        }
        let (retried, gave_up) = state.jobs.failure_counts();
        self.job_retries.inc_by(retried.saturating_sub(self.job_retries.get()));
        self.job_failures
            .inc_by(gave_up.saturating_sub(self.job_failures.get()));
        if let Some((cpu_seconds, resident_bytes)) = process_usage() {
            self.cpu.inc_by((cpu_seconds - self.cpu.get()).max(0.0));
            self.resident.set(i64::try_from(resident_bytes).unwrap_or(i64::MAX));
        }
        let mut out = String::new();
        if let Err(error) = prometheus_client::encoding::text::encode(&mut out, &self.registry) {
            tracing::error!(error = %error, "metrics: encoding");
        }
        out
    }

    fn method_label(&self, path: &str) -> String {
        if self.methods.contains(path) {
            path.trim_start_matches('/').to_owned()
        } else {
            "unknown".to_owned()
        }
    }
}

impl crate::limit::RefusalCounter for Metrics {
    fn rate_limited(&self, path: &str) {
        self.rate_limited
            .get_or_create(&OnlyMethodLabels {
                method: self.method_label(path),
            })
            .inc();
    }
}

/// `GET /metrics`.
pub fn route(metrics: Arc<Metrics>, state: crate::State, shedder: Arc<keel_edge::shed::Shedder>) -> axum::Router {
    axum::Router::new().route(
        "/metrics",
        axum::routing::get(move || {
            let metrics = metrics.clone();
            let state = state.clone();
            let shedder = shedder.clone();
            async move {
                let text = metrics.render(&state, Some(&shedder)).await;
                (
                    [(
                        http::header::CONTENT_TYPE,
                        "application/openmetrics-text; version=1.0.0; charset=utf-8",
                    )],
                    text,
                )
            }
        }),
    )
}

/// CPU seconds (user + system) and resident bytes of this process, from
/// /proc (Linux); `None` elsewhere.
fn process_usage() -> Option<(f64, u64)> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    // Fields after the command name, which is in parentheses and may hold spaces.
    let fields: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
    let ticks: f64 = fields.get(11)?.parse::<f64>().ok()? + fields.get(12)?.parse::<f64>().ok()?;
    // Resident memory in kB as the kernel states it (no page size assumed).
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let kilobytes: u64 = status
        .lines()
        .find_map(|line| line.strip_prefix("VmRSS:"))?
        .split_whitespace()
        .next()?
        .parse()
        .ok()?;
    // /proc's times are in USER_HZ, which Linux fixes at 100 for user space
    // on every architecture (whatever the kernel's own tick rate).
    Some((ticks / 100.0, kilobytes * 1024))
}

/// Counts and times every call of the gRPC tier.
#[derive(Clone)]
pub struct MetricsLayer {
    metrics: Arc<Metrics>,
}

impl MetricsLayer {
    pub fn new(metrics: Arc<Metrics>) -> Self {
        Self { metrics }
    }
}

impl<S> Layer<S> for MetricsLayer {
    type Service = MetricsService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        MetricsService {
            inner,
            metrics: self.metrics.clone(),
        }
    }
}

#[derive(Clone)]
pub struct MetricsService<S> {
    inner: S,
    metrics: Arc<Metrics>,
}

impl<S, ReqBody> Service<Request<ReqBody>> for MetricsService<S>
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
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        let protocol = request
            .extensions()
            .get::<Protocol>()
            .copied()
            .unwrap_or(Protocol::Grpc)
            .as_str();
        let call = Call {
            metrics: self.metrics.clone(),
            protocol,
            method: self.metrics.method_label(request.uri().path()),
            started: Instant::now(),
            recorded: false,
        };
        call.metrics.in_flight.get_or_create(&ProtocolLabels { protocol }).inc();
        Box::pin(async move {
            let mut call = call;
            let response = inner.call(request).await?;
            // Trailers-only (errors, mostly): the status is in the head.
            if let Some(code) = grpc_code(response.headers()) {
                call.record(code);
                return Ok(response);
            }
            Ok(response.map(|body| Body::new(Observed { inner: body, call })))
        })
    }
}

/// One call being measured; recorded once, when its status is known or
/// when it is dropped unanswered (a caller that went away: CANCELLED).
struct Call {
    metrics: Arc<Metrics>,
    protocol: &'static str,
    method: String,
    started: Instant,
    recorded: bool,
}

impl Call {
    fn record(&mut self, code: &'static str) {
        if self.recorded {
            return;
        }
        self.recorded = true;
        let metrics = &self.metrics;
        metrics
            .in_flight
            .get_or_create(&ProtocolLabels {
                protocol: self.protocol,
            })
            .dec();
        metrics
            .requests
            .get_or_create(&CallLabels {
                protocol: self.protocol,
                method: self.method.clone(),
                code,
            })
            .inc();
        metrics
            .durations
            .get_or_create(&MethodLabels {
                protocol: self.protocol,
                method: self.method.clone(),
            })
            .observe(self.started.elapsed().as_secs_f64());
    }
}

impl Drop for Call {
    fn drop(&mut self) {
        self.record("CANCELLED");
    }
}

fn grpc_code(headers: &http::HeaderMap) -> Option<&'static str> {
    let number: i32 = headers.get("grpc-status")?.to_str().ok()?.parse().ok()?;
    if number == 0 {
        return Some("OK");
    }
    Some(keel_kernel::Code::from_grpc_number(number).as_str())
}

/// A response body that records its call when the trailers (or the end)
/// arrive.
struct Observed {
    inner: Body,
    call: Call,
}

impl http_body::Body for Observed {
    type Data = Bytes;
    type Error = tonic::Status;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        match &polled {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(code) = frame.trailers_ref().and_then(grpc_code) {
                    self.call.record(code);
                }
            }
            Poll::Ready(Some(Err(_))) => self.call.record("INTERNAL"),
            // A gRPC response that ends without a status is an error to
            // its caller (the protocol says UNKNOWN), never a success.
            Poll::Ready(None) => self.call.record("UNKNOWN"),
            Poll::Pending => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt;

    #[tokio::test]
    async fn a_response_that_ends_without_a_status_counts_as_unknown() {
        let metrics = Arc::new(Metrics::new(keel_proto::FILE_DESCRIPTOR_SET).unwrap());
        let call = Call {
            metrics: metrics.clone(),
            protocol: "grpc",
            method: "unknown".to_owned(),
            started: Instant::now(),
            recorded: false,
        };
        let body = Observed {
            inner: Body::empty(),
            call,
        };
        body.collect().await.unwrap();
        let labels = |code| CallLabels {
            protocol: "grpc",
            method: "unknown".to_owned(),
            code,
        };
        assert_eq!(metrics.requests.get_or_create(&labels("UNKNOWN")).get(), 1);
        assert_eq!(metrics.requests.get_or_create(&labels("OK")).get(), 0);
    }
}
