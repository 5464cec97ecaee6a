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

/// The W3C `traceparent` of `span`, when a tracer records it.
pub fn traceparent(span: &tracing::Span) -> Option<String> {
    let context = span.context();
    if !context.span().span_context().is_valid() {
        return None;
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
        mark_unsampled(span);
        return false;
    }
    span.record("trace_id", span_context.trace_id().to_string().as_str());
    span.record("span_id", span_context.span_id().to_string().as_str());
    true
}

/// The mark of a span whose trace is not sampled, in the span's
/// extensions (tracing-subscriber's registry).
#[derive(Debug, Clone, Copy)]
pub struct Unsampled;

fn mark_unsampled(span: &tracing::Span) {
    use tracing_subscriber::registry::{LookupSpan as _, SpanData as _};
    span.with_subscriber(|(id, dispatch)| {
        if let Some(registry) = dispatch.downcast_ref::<tracing_subscriber::Registry>()
            && let Some(data) = registry.span_data(id)
        {
            data.extensions_mut().insert(Unsampled);
        }
    });
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
    fn malformed_traceparents_are_ignored() {
        assert!(parse("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01").is_some());
        assert!(parse("not a traceparent").is_none());
        assert!(parse("00-00000000000000000000000000000000-00f067aa0ba902b7-01").is_none());
    }
}
