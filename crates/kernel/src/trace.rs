//! Trace context across boundaries: a caller's W3C `traceparent`, the
//! context stored with each outbox event, and the ids a log line carries.
//!
//! Every function here is a no-op unless an OpenTelemetry layer is
//! installed (`KEEL_OTLP_ENDPOINT`): without it a span has no context, and
//! nothing is parsed, written or linked.

use opentelemetry::propagation::{Extractor, Injector, TextMapPropagator};
use opentelemetry::trace::TraceContextExt;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use tracing_opentelemetry::OpenTelemetrySpanExt;

/// The W3C Trace Context header (and gRPC metadata key).
pub const TRACEPARENT: &str = "traceparent";

/// The span field that says whether [`decide`] sampled a call: the
/// tracer's root sampler samples a span where it is true (an unsampled
/// call's span never reaches the tracer).
pub const SAMPLED_FIELD: &str = "keel.sampled";

thread_local! {
    /// While a call that is not sampled is polled on this thread: the
    /// `traceparent` it passes on.
    static PASSED_ON: std::cell::RefCell<Option<std::sync::Arc<str>>> = const { std::cell::RefCell::new(None) };
}

/// Whether this thread is polling a call that is not sampled: the tracer
/// builds no span and records no event for it (the server's trace filter
/// asks).
pub fn in_unsampled_call() -> bool {
    PASSED_ON
        .try_with(|passed_on| passed_on.borrow().is_some())
        .unwrap_or(false)
}

fn passed_on_here() -> Option<std::sync::Arc<str>> {
    PASSED_ON
        .try_with(|passed_on| passed_on.borrow().clone())
        .ok()
        .flatten()
}

pin_project_lite::pin_project! {
    /// A future polled as part of a call that is not sampled, or as part
    /// of none (then it clears an outer call's scope while it is polled).
    pub struct CallScope<F> {
        #[pin]
        future: F,
        passed_on: Option<std::sync::Arc<str>>,
    }
}

/// Polls `future` as the call that passes `traceparent` on and is not
/// sampled: no span it makes is built for the tracer.
pub fn unsampled_call<F: std::future::Future>(future: F, traceparent: &str) -> CallScope<F> {
    CallScope {
        future,
        passed_on: Some(std::sync::Arc::from(traceparent)),
    }
}

/// `future`, polled in the sampling of the call that makes it: a task a
/// call spawns (the bus runs each command in one) stays out of the trace
/// when the call is.
pub fn keep_sampling<F: std::future::Future>(future: F) -> CallScope<F> {
    CallScope {
        future,
        passed_on: passed_on_here(),
    }
}

impl<F: std::future::Future> std::future::Future for CallScope<F> {
    type Output = F::Output;

    fn poll(self: std::pin::Pin<&mut Self>, cx: &mut std::task::Context<'_>) -> std::task::Poll<F::Output> {
        let this = self.project();
        let _restore = Restore::entering(this.passed_on.clone());
        this.future.poll(cx)
    }
}

/// Runs `make` in the scope of the call that passes `traceparent` on and
/// is not sampled: what it makes (the call's own span) is not traced.
pub fn in_unsampled_call_now<R>(traceparent: &str, make: impl FnOnce() -> R) -> R {
    let _restore = Restore::entering(Some(std::sync::Arc::from(traceparent)));
    make()
}

/// The thread's scope as it was before [`Restore::entering`] another;
/// restored when dropped, however the scope ends (a panic included).
struct Restore(Option<std::sync::Arc<str>>);

impl Restore {
    fn entering(scope: Option<std::sync::Arc<str>>) -> Restore {
        Restore(PASSED_ON.try_with(|passed_on| passed_on.replace(scope)).ok().flatten())
    }
}

impl Drop for Restore {
    fn drop(&mut self) {
        let outer = self.0.take();
        let _ = PASSED_ON.try_with(|passed_on| *passed_on.borrow_mut() = outer);
    }
}

/// Marks `span`, the span of a call that is not sampled, with the
/// `traceparent` it passes on: what [`traceparent`] finds for the spans
/// around which no [`CallScope`] is polled (a stream's, after the call).
pub fn mark_unsampled_call(span: &tracing::Span, traceparent: &str) {
    mark_unsampled(span, Unsampled::passing_on(Some(traceparent)));
}

/// The sampling ratio of calls, set once by the process that exports
/// traces ([`sample_calls_at`]); unset, [`decide`] samples every call (no
/// tracer: nothing is built either way).
static CALL_RATIO: std::sync::OnceLock<f64> = std::sync::OnceLock::new();

/// Calls without a sampled caller are sampled at `ratio` (0 to 1) from now
/// on. The first setting holds.
pub fn sample_calls_at(ratio: f64) {
    let _ = CALL_RATIO.set(ratio.clamp(0.0, 1.0));
}

/// A call's sampling, decided before its span exists, so that a call that
/// is not sampled costs the tracer nothing (no span is built for it).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Sampling {
    /// Trace it: the caller's trace is sampled, or this one won the ratio.
    Sampled,
    /// Leave it out, passing on this `traceparent` (the caller's trace id,
    /// or a new one, with flags `00`), so the work it causes (its events'
    /// handlers, in any process) is left out too.
    Unsampled(String),
}

/// Parent-based: a caller's valid `traceparent` decides (its sampled flag);
/// without one, the ratio of [`sample_calls_at`].
pub fn decide(traceparent: Option<&str>) -> Sampling {
    let Some(ratio) = CALL_RATIO.get().copied() else {
        return Sampling::Sampled;
    };
    let remote = traceparent.and_then(parse);
    let (sampled, trace_id) = match &remote {
        Some(context) => {
            let span = context.span();
            let span_context = span.span_context();
            (span_context.is_sampled(), span_context.trace_id())
        }
        None => (
            ratio >= 1.0 || (ratio > 0.0 && rand::random::<f64>() < ratio),
            opentelemetry::trace::TraceId::from_bytes(rand::random::<[u8; 16]>()),
        ),
    };
    if sampled {
        return Sampling::Sampled;
    }
    let span_id = opentelemetry::trace::SpanId::from_bytes(rand::random::<[u8; 8]>());
    Sampling::Unsampled(format!("00-{trace_id}-{span_id}-00"))
}

/// The W3C `traceparent` of `span`, when a tracer records it, or the one
/// the work around it passes on while it is not sampled: a call's
/// ([`Sampling::Unsampled`]), a relay batch's or a handler run's.
pub fn traceparent(span: &tracing::Span) -> Option<String> {
    if let Some(passed_on) = passed_on_here() {
        return Some(passed_on.to_string());
    }
    let context = span.context();
    if !context.span().span_context().is_valid() {
        return unsampled_mark(span).and_then(|mark| mark.traceparent.map(|traceparent| traceparent.to_string()));
    }
    let mut captured = Captured(None);
    TraceContextPropagator::new().inject_context(&context, &mut captured);
    captured.0
}

/// Makes `span` a child of the remote span `traceparent` names. A missing
/// or malformed value leaves `span` a root. Call it before `span` is entered.
pub fn continue_from(span: &tracing::Span, traceparent: Option<&str>) {
    if let Some(parent) = traceparent.and_then(parse) {
        // Fails only when no OpenTelemetry layer is installed, or the span
        // was already entered: then there is nothing to continue.
        let _ = span.set_parent(parent);
    }
}

/// `span`'s trace and span ids (hex), when a tracer samples it: what a log
/// line of the span carries.
pub fn ids(span: &tracing::Span) -> Option<(String, String)> {
    let context = span.context();
    let span_ref = context.span();
    let span_context = span_ref.span_context();
    (span_context.is_valid() && span_context.is_sampled())
        .then(|| (span_context.trace_id().to_string(), span_context.span_id().to_string()))
}

/// Records [`ids`] on `span`'s `trace_id` and `span_id` fields (declared
/// `Empty` by the span), so its log lines carry them; returns whether
/// `span` is sampled. A span the tracer decided not to sample is marked
/// [`Unsampled`], so that the spans it contains are never built for the
/// tracer (the server's trace filter reads the mark).
pub fn record_ids(span: &tracing::Span) -> bool {
    let context = span.context();
    let span_ref = context.span();
    let span_context = span_ref.span_context();
    if !span_context.is_valid() {
        return false;
    }
    if !span_context.is_sampled() {
        let traceparent = traceparent(span);
        mark_unsampled(span, Unsampled::passing_on(traceparent.as_deref()));
        return false;
    }
    span.record("trace_id", span_context.trace_id().to_string().as_str());
    span.record("span_id", span_context.span_id().to_string().as_str());
    true
}

/// The mark of a span whose trace is not sampled, in the span's
/// extensions (tracing-subscriber's registry), with the `traceparent` its
/// work passes on. The spans inside it carry it too.
#[derive(Debug, Clone, Default)]
pub struct Unsampled {
    traceparent: Option<std::sync::Arc<str>>,
}

impl Unsampled {
    pub fn passing_on(traceparent: Option<&str>) -> Unsampled {
        Unsampled {
            traceparent: traceparent.map(std::sync::Arc::from),
        }
    }
}

fn mark_unsampled(span: &tracing::Span, mark: Unsampled) {
    use tracing_subscriber::registry::{LookupSpan as _, SpanData as _};
    span.with_subscriber(|(id, dispatch)| {
        if let Some(registry) = dispatch.downcast_ref::<tracing_subscriber::Registry>()
            && let Some(data) = registry.span_data(id)
        {
            data.extensions_mut().insert(mark);
        }
    });
}

/// The mark of `span` or of the nearest span around it that has one (the
/// spans inside an unsampled span are never seen by the tracer: only that
/// span holds it).
fn unsampled_mark(span: &tracing::Span) -> Option<Unsampled> {
    use tracing_subscriber::registry::LookupSpan as _;
    span.with_subscriber(|(id, dispatch)| {
        let registry = dispatch.downcast_ref::<tracing_subscriber::Registry>()?;
        registry
            .span(id)?
            .scope()
            .find_map(|span| span.extensions().get::<Unsampled>().cloned())
    })
    .flatten()
}

fn parse(traceparent: &str) -> Option<opentelemetry::Context> {
    let context = TraceContextPropagator::new().extract(&Given(traceparent));
    context.span().span_context().is_valid().then_some(context)
}

/// A carrier holding only a `traceparent`.
struct Given<'a>(&'a str);

impl Extractor for Given<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        (key == TRACEPARENT).then_some(self.0)
    }

    fn keys(&self) -> Vec<&str> {
        vec![TRACEPARENT]
    }
}

/// A carrier that keeps the `traceparent` and drops the rest (`tracestate`
/// is not stored: keel sets none).
struct Captured(Option<String>);

impl Injector for Captured {
    fn set(&mut self, key: &str, value: String) {
        if key == TRACEPARENT {
            self.0 = Some(value);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn without_an_opentelemetry_layer_nothing_is_traced() {
        let span = tracing::info_span!("untraced");
        continue_from(&span, Some("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"));
        assert_eq!(traceparent(&span), None);
        assert_eq!(ids(&span), None);
    }

    #[test]
    fn a_call_scope_holds_while_polled_and_is_restored_after() {
        use futures::FutureExt as _;

        assert!(!in_unsampled_call());
        let seen = unsampled_call(async { in_unsampled_call() }, "00-a-b-00").now_or_never();
        assert_eq!(seen, Some(true));
        assert!(!in_unsampled_call(), "restored after the poll");

        // A task made inside the call keeps its sampling; one made outside
        // clears it while it is polled, even inside the call.
        // (In a Vec: a future returned bare from an async block is a lint.)
        let inner = unsampled_call(async { vec![keep_sampling(async { passed_on_here() })] }, "00-a-b-00")
            .now_or_never()
            .unwrap()
            .remove(0);
        assert_eq!(inner.now_or_never().unwrap().as_deref(), Some("00-a-b-00"));
        let outside = keep_sampling(async { in_unsampled_call() });
        let nested = unsampled_call(outside, "00-a-b-00").now_or_never();
        assert_eq!(nested, Some(false));

        // A panic inside the scope leaves the thread as it was.
        let panicked = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            unsampled_call(async { panic!("inside") }, "00-a-b-00").now_or_never()
        }));
        assert!(panicked.is_err());
        assert!(!in_unsampled_call(), "restored after a panic");
    }

    #[test]
    fn malformed_traceparents_are_ignored() {
        assert!(parse("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01").is_some());
        assert!(parse("not a traceparent").is_none());
        assert!(parse("00-00000000000000000000000000000000-00f067aa0ba902b7-01").is_none());
    }
}
