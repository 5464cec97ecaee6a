//! Logs and traces. Logs: JSON for machines, pretty in a terminal; every
//! line of a call carries its request id through the call's span, and, when
//! the call is traced, its `trace_id` and `span_id`. Traces: with
//! `KEEL_OTLP_ENDPOINT` set, spans go to an OpenTelemetry collector over
//! OTLP/gRPC, sampled parent-based at `KEEL_TRACE_SAMPLE_RATIO`. Unset,
//! no exporter and no OpenTelemetry layer exist.
//!
//! The two layers filter apart: `KEEL_LOG` says which lines are written,
//! never which spans are traced (those are the `info` spans of keel and of
//! SeaORM's statements), so a quiet log still yields whole traces.
//!
//! A call's sampling is decided before its span is made
//! ([`keel_kernel::trace::decide`]: the caller's sampled flag, else the
//! ratio), and a call that is not sampled costs the tracer nothing: its span
//! (made in the call's unsampled scope) and every span and event made while
//! the call is polled are left out by the tracer's filter ([`SampledTraces`]) before
//! anything is built. Other roots (a relay batch, a handler run) are built,
//! and the sampler decides them (parent-based on the context their event
//! stored, else the ratio).

use std::io::IsTerminal;
use std::time::Duration;

use opentelemetry::trace::TracerProvider as _;
use opentelemetry_otlp::WithExportConfig as _;
use opentelemetry_sdk::trace::{BatchConfigBuilder, BatchSpanProcessor, Sampler, SdkTracerProvider};
use tracing::field::{Field, Visit};
use tracing::{Event, Metadata, Subscriber};
use tracing_subscriber::filter::{EnvFilter, LevelFilter};
use tracing_subscriber::fmt::MakeWriter;
use tracing_subscriber::layer::SubscriberExt as _;
use tracing_subscriber::layer::{Context, Filter};
use tracing_subscriber::registry::LookupSpan;
use tracing_subscriber::util::SubscriberInitExt as _;
use tracing_subscriber::{Layer as _, Registry};

use crate::config::{Config, LogFormat};

/// What `init` set up; [`Telemetry::shutdown`] exports the spans still
/// queued. Cheap to clone.
#[derive(Clone, Default)]
pub struct Telemetry {
    provider: Option<SdkTracerProvider>,
}

impl Telemetry {
    /// Whether spans are exported (`KEEL_OTLP_ENDPOINT` was set and this
    /// call installed the subscriber).
    pub fn exporting(&self) -> bool {
        self.provider.is_some()
    }

    /// Exports every finished span now. Blocks: call it off the runtime's
    /// worker threads (`spawn_blocking`).
    pub fn flush(&self) {
        if let Some(provider) = &self.provider
            && let Err(error) = provider.force_flush()
        {
            tracing::warn!(error = %error, "flushing spans to the collector");
        }
    }

    /// Exports what is queued and stops the exporter. Blocks, as [`flush`](Self::flush).
    pub fn shutdown(&self) {
        if let Some(provider) = &self.provider
            && let Err(error) = provider.shutdown_with_timeout(Duration::from_secs(5))
        {
            tracing::warn!(error = %error, "shutting the span exporter down");
        }
    }
}

/// Installs the process's subscriber, writing logs to stdout. Must run
/// inside the tokio runtime when `KEEL_OTLP_ENDPOINT` is set (the gRPC
/// exporter lives on it). A second call (tests start several servers)
/// keeps the first subscriber and returns a `Telemetry` that exports nothing.
pub fn init(config: &Config) -> Telemetry {
    init_with_writer(config, std::io::stdout, std::io::stdout().is_terminal())
}

/// [`init`] with another log destination; `terminal` picks the pretty
/// format when `KEEL_LOG_FORMAT` is unset.
pub fn init_with_writer<W>(config: &Config, writer: W, terminal: bool) -> Telemetry
where
    W: for<'writer> MakeWriter<'writer> + Send + Sync + 'static,
{
    let mut filter = EnvFilter::try_new(&config.log).unwrap_or_else(|_| EnvFilter::new("info"));
    // SeaORM's statement spans are for traces: a log line does not need
    // them, and the log would pay for one span per statement.
    if !config.log.contains("sea_orm")
        && let Ok(directive) = "sea_orm::database=warn".parse()
    {
        filter = filter.add_directive(directive);
    }
    if !config.log.contains("sqlx::pool")
        && let Ok(directive) = format!("{}=warn", keel_db::ACQUIRE_EVENT_TARGET).parse()
    {
        filter = filter.add_directive(directive);
    }
    let format = config
        .log_format
        .unwrap_or(if terminal { LogFormat::Pretty } else { LogFormat::Json });
    let logs = match format {
        LogFormat::Json => tracing_subscriber::fmt::layer()
            .json()
            // The span list carries the call's request id (and trace and
            // span ids when traced) on every line.
            .with_current_span(false)
            .with_span_list(true)
            .flatten_event(true)
            .with_writer(writer)
            .with_filter(filter)
            .boxed(),
        LogFormat::Pretty => tracing_subscriber::fmt::layer()
            .compact()
            .with_writer(writer)
            .with_filter(filter)
            .boxed(),
    };
    let provider = match &config.otlp_endpoint {
        Some(endpoint) => match tracer_provider(config, endpoint) {
            Ok(provider) => Some(provider),
            Err(error) => {
                eprintln!("keel: KEEL_OTLP_ENDPOINT {endpoint}: {error}; spans are not exported");
                None
            }
        },
        None => None,
    };
    let traces = provider.as_ref().map(|provider| {
        tracing_opentelemetry::layer()
            .with_tracer(provider.tracer("keel"))
            // Per span, these would add a source location, a thread and
            // busy/idle timings (two clock reads per poll) that no keel
            // dashboard reads.
            .with_location(false)
            .with_threads(false)
            .with_tracked_inactivity(false)
            .with_filter(SampledTraces)
    });
    let acquires = config.metrics.then(|| PoolAcquireTimes.with_filter(TimedCheckouts));
    match Registry::default().with(logs).with(traces).with(acquires).try_init() {
        Ok(()) => {
            if provider.is_some() {
                keel_kernel::trace::sample_calls_at(config.trace_sample_ratio);
            }
            Telemetry { provider }
        }
        Err(_) => {
            // Another subscriber is installed: this exporter would never get a span.
            if let Some(provider) = provider {
                let _ = provider.shutdown();
            }
            Telemetry::default()
        }
    }
}

/// Feeds `keel_db_pool_acquire_seconds` from the event the pool emits for
/// every checkout ([`keel_db::ACQUIRE_EVENT_TARGET`], at `INFO`), whichever
/// pool of the process waited. Its own filter takes only those events; the
/// log's filter takes them from `WARN` (a slow checkout) unless `KEEL_LOG`
/// names them, and the tracer's never. At `INFO`, not `TRACE`: a `TRACE`
/// filter anywhere lowers the process's maximum level, and with it
/// SeaORM's statement spans went missing from the exported traces (the
/// traces test caught it).
struct PoolAcquireTimes;

impl<S: Subscriber> tracing_subscriber::Layer<S> for PoolAcquireTimes {
    fn on_event(&self, event: &Event<'_>, _: Context<'_, S>) {
        let mut waited = AcquiredAfter(None);
        event.record(&mut waited);
        if let Some(seconds) = waited.0 {
            crate::metrics::POOL_ACQUIRE_SECONDS.observe(seconds);
        }
    }
}

/// The filter of [`PoolAcquireTimes`]: the checkout events alone, and
/// those only while a keel of this process asked for them
/// ([`crate::metrics::time_pool_checkouts`]). Every other callsite is
/// `never` to it, so it costs them nothing; while nobody asked, a checkout
/// event is a check of one flag and goes nowhere (dispatching it cost
/// about 10 µs a checkout).
struct TimedCheckouts;

impl<S> Filter<S> for TimedCheckouts {
    fn enabled(&self, metadata: &Metadata<'_>, _: &Context<'_, S>) -> bool {
        metadata.target() == keel_db::ACQUIRE_EVENT_TARGET && crate::metrics::pool_checkouts_timed()
    }

    fn callsite_enabled(&self, metadata: &'static Metadata<'static>) -> tracing::subscriber::Interest {
        if metadata.target() == keel_db::ACQUIRE_EVENT_TARGET {
            tracing::subscriber::Interest::sometimes()
        } else {
            tracing::subscriber::Interest::never()
        }
    }

    fn max_level_hint(&self) -> Option<LevelFilter> {
        Some(LevelFilter::INFO)
    }
}

struct AcquiredAfter(Option<f64>);

impl Visit for AcquiredAfter {
    fn record_f64(&mut self, field: &Field, value: f64) {
        if field.name() == keel_db::ACQUIRED_AFTER_FIELD {
            self.0 = Some(value);
        }
    }

    fn record_debug(&mut self, _: &Field, _: &dyn std::fmt::Debug) {}
}

/// The tracer's filter: `info` and above, and nothing of a call that is not
/// sampled (its span and what is made while it is polled: all in its scope,
/// [`keel_kernel::trace::in_unsampled_call`]) nor inside a span the sampler
/// dropped (a relay batch's or a handler run's, marked
/// [`keel_kernel::trace::Unsampled`]) or one this filter left out already.
/// Other spans without a parent are built: the sampler decides them.
struct SampledTraces;

impl<S> Filter<S> for SampledTraces
where
    S: Subscriber + for<'lookup> LookupSpan<'lookup>,
{
    fn enabled(&self, metadata: &Metadata<'_>, cx: &Context<'_, S>) -> bool {
        if *metadata.level() > tracing::Level::INFO
            || keel_kernel::trace::in_unsampled_call()
            || metadata.target() == keel_db::ACQUIRE_EVENT_TARGET
        {
            return false;
        }
        let current = cx.current_span();
        let Some(parent) = current.id() else {
            return true;
        };
        // `cx` sees only the spans this filter let through.
        cx.span(parent)
            .is_some_and(|parent| parent.extensions().get::<keel_kernel::trace::Unsampled>().is_none())
    }

    fn max_level_hint(&self) -> Option<LevelFilter> {
        Some(LevelFilter::INFO)
    }
}

/// The root sampler: a call's span that [`keel_kernel::trace::decide`]
/// sampled (`keel.sampled` true) is sampled; any other root at
/// the ratio. Under `ParentBased`, which decides every span with a parent.
#[derive(Debug, Clone)]
struct CallsDecided {
    ratio: Sampler,
}

impl opentelemetry_sdk::trace::ShouldSample for CallsDecided {
    fn should_sample(
        &self,
        parent_context: Option<&opentelemetry::Context>,
        trace_id: opentelemetry::trace::TraceId,
        name: &str,
        span_kind: &opentelemetry::trace::SpanKind,
        attributes: &[opentelemetry::KeyValue],
        links: &[opentelemetry::trace::Link],
    ) -> opentelemetry_sdk::trace::SamplingResult {
        if attributes.iter().any(|attribute| {
            attribute.key.as_str() == keel_kernel::trace::SAMPLED_FIELD
                && attribute.value == opentelemetry::Value::Bool(true)
        }) {
            return Sampler::AlwaysOn.should_sample(parent_context, trace_id, name, span_kind, attributes, links);
        }
        self.ratio
            .should_sample(parent_context, trace_id, name, span_kind, attributes, links)
    }
}

fn tracer_provider(
    config: &Config,
    endpoint: &str,
) -> Result<SdkTracerProvider, opentelemetry_otlp::ExporterBuildError> {
    let exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_tonic()
        .with_endpoint(endpoint)
        .with_timeout(Duration::from_secs(10))
        .build()?;
    let batches = BatchSpanProcessor::builder(exporter)
        .with_batch_config(
            BatchConfigBuilder::default()
                .with_max_queue_size(8192)
                .with_scheduled_delay(Duration::from_secs(1))
                .build(),
        )
        .build();
    let resource = opentelemetry_sdk::Resource::builder()
        .with_service_name("keel")
        .with_attribute(opentelemetry::KeyValue::new(
            "keel.deployment",
            config.deployment.clone(),
        ))
        .build();
    Ok(SdkTracerProvider::builder()
        .with_span_processor(batches)
        .with_sampler(Sampler::ParentBased(Box::new(CallsDecided {
            ratio: Sampler::TraceIdRatioBased(config.trace_sample_ratio),
        })))
        .with_resource(resource)
        .build())
}

#[cfg(test)]
mod tests {
    use super::*;
    use opentelemetry::trace::{SpanKind, TraceId};
    use opentelemetry_sdk::trace::{SamplingDecision, ShouldSample as _};

    fn decision(sampler: &CallsDecided, attributes: &[opentelemetry::KeyValue]) -> SamplingDecision {
        sampler
            .should_sample(
                None,
                TraceId::from_bytes([7; 16]),
                "grpc",
                &SpanKind::Server,
                attributes,
                &[],
            )
            .decision
    }

    #[test]
    fn a_call_the_edge_sampled_is_not_sampled_again() {
        let never = CallsDecided {
            ratio: Sampler::TraceIdRatioBased(0.0),
        };
        assert_eq!(
            decision(
                &never,
                &[opentelemetry::KeyValue::new(keel_kernel::trace::SAMPLED_FIELD, true)]
            ),
            SamplingDecision::RecordAndSample,
            "the edge rolled the ratio already"
        );
        assert_eq!(
            decision(&never, &[]),
            SamplingDecision::Drop,
            "other roots take the ratio"
        );
    }
}
