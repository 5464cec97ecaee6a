//! OpenTelemetry traces against the real server and an in-test OTLP
//! collector (a tonic server of OTLP's TraceService): a REST sign-up is one
//! trace from the server span through the command, its database
//! statements, the relay's publish and the welcome-email handler; a
//! caller's `traceparent` is honoured; the call's log lines carry the ids.
//!
//! The subscriber and its exporter are the process's: the tests share them
//! (and the collector), each test's spans told apart by their trace ids.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use keel_server::config::LogFormat;
use keel_testkit::{Backend, TestApp, spawn_app_with};
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{TraceService, TraceServiceServer};
use opentelemetry_proto::tonic::collector::trace::v1::{ExportTraceServiceRequest, ExportTraceServiceResponse};
use opentelemetry_proto::tonic::common::v1::any_value::Value;
use opentelemetry_proto::tonic::trace::v1::Span;
use opentelemetry_proto::tonic::trace::v1::span::SpanKind;
use sea_orm::ConnectionTrait as _;

/// Every span exported to it.
#[derive(Clone, Default)]
struct Collector {
    spans: Arc<Mutex<Vec<Span>>>,
}

#[tonic::async_trait]
impl TraceService for Collector {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        let mut spans = self.spans.lock().unwrap();
        for resource in request.into_inner().resource_spans {
            for scope in resource.scope_spans {
                spans.extend(scope.spans);
            }
        }
        Ok(tonic::Response::new(ExportTraceServiceResponse {
            partial_success: None,
        }))
    }
}

async fn start_collector() -> (Collector, String) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap();
    let collector = Collector::default();
    let service = TraceServiceServer::new(collector.clone());
    tokio::spawn(async move {
        tonic::transport::Server::builder()
            .add_service(service)
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener))
            .await
            .unwrap();
    });
    (collector, format!("http://{address}"))
}

/// The log output, shared with the test.
#[derive(Clone, Default)]
struct Captured(Arc<Mutex<Vec<u8>>>);

impl std::io::Write for Captured {
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(bytes);
        Ok(bytes.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Captured {
    fn lines(&self) -> Vec<serde_json::Value> {
        String::from_utf8(self.0.lock().unwrap().clone())
            .unwrap()
            .lines()
            .filter_map(|line| serde_json::from_str(line).ok())
            .collect()
    }
}

async fn register(app: &TestApp, email: &str, traceparent: Option<&str>) -> u16 {
    let mut builder = http::Request::builder()
        .method("POST")
        .uri(format!("{}/v1/auth/register", app.endpoint()))
        .header("content-type", "application/json");
    if let Some(traceparent) = traceparent {
        builder = builder.header("traceparent", traceparent);
    }
    let body = serde_json::json!({"email": email, "password": "correct horse battery", "displayName": "Traced"});
    let client: Client<_, Full<Bytes>> = Client::builder(TokioExecutor::new()).build_http();
    let response = client
        .request(builder.body(Full::new(Bytes::from(body.to_string()))).unwrap())
        .await
        .unwrap();
    let status = response.status().as_u16();
    let _ = response.into_body().collect().await.unwrap();
    status
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|byte| format!("{byte:02x}")).collect()
}

fn attribute<'a>(span: &'a Span, key: &str) -> Option<&'a Value> {
    span.attributes
        .iter()
        .find(|pair| pair.key == key)
        .and_then(|pair| pair.value.as_ref())
        .and_then(|value| value.value.as_ref())
}

fn string_attribute<'a>(span: &'a Span, key: &str) -> Option<&'a str> {
    match attribute(span, key) {
        Some(Value::StringValue(value)) => Some(value),
        _ => None,
    }
}

/// What one trace must hold, by span name; `None` until all are there.
fn complete_trace(spans: &[Span], trace_id: &str) -> Option<HashMap<String, Span>> {
    let in_trace: Vec<&Span> = spans.iter().filter(|span| hex(&span.trace_id) == trace_id).collect();
    let find = |predicate: &dyn Fn(&Span) -> bool| in_trace.iter().copied().find(|span| predicate(span)).cloned();
    let server = find(&|span| {
        span.name == "keel.identity.v1.IdentityCommandService/Register" && span.kind == SpanKind::Server as i32
    })?;
    let command = find(&|span| span.name == "identity.register")?;
    let database = find(&|span| span.name.starts_with("sea_orm."))?;
    let publish = find(&|span| span.name == "publish identity.user.registered")?;
    let handler = find(&|span| span.name == "identity.welcome_email identity.user.registered")?;
    Some(HashMap::from([
        ("server".to_owned(), server),
        ("command".to_owned(), command),
        ("database".to_owned(), database),
        ("publish".to_owned(), publish),
        ("handler".to_owned(), handler),
    ]))
}

/// Flushes the exporter until `trace_id`'s trace is whole, for at most 20 s.
async fn wait_for_trace(
    telemetry: &keel_server::telemetry::Telemetry,
    collector: &Collector,
    trace_id: &str,
) -> HashMap<String, Span> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        let flushing = telemetry.clone();
        tokio::task::spawn_blocking(move || flushing.flush()).await.unwrap();
        if let Some(trace) = complete_trace(&collector.spans.lock().unwrap(), trace_id) {
            return trace;
        }
        if tokio::time::Instant::now() > deadline {
            let names: Vec<(String, String)> = collector
                .spans
                .lock()
                .unwrap()
                .iter()
                .map(|span| (hex(&span.trace_id), span.name.clone()))
                .collect();
            panic!("trace {trace_id} incomplete after 20 s; exported: {names:?}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The trace and request ids of the server span of each logged line.
fn logged_trace_ids(logs: &Captured) -> Vec<(String, String)> {
    logs.lines()
        .iter()
        .filter_map(|line| {
            let spans = line.get("spans")?.as_array()?;
            let server = spans
                .iter()
                .find(|span| span.get("name").and_then(|n| n.as_str()) == Some("grpc"))?;
            let trace_id = server.get("trace_id")?.as_str()?.to_owned();
            let request_id = server.get("request_id")?.as_str()?.to_owned();
            Some((trace_id, request_id))
        })
        .collect()
}

/// The process's subscriber, exporter, collector and log capture. They live
/// on a runtime of their own: the exporter's channel runs on the runtime
/// that made it, and each test has its own.
struct Shared {
    telemetry: keel_server::telemetry::Telemetry,
    collector: Collector,
    logs: Captured,
    endpoint: String,
}

static SHARED: std::sync::OnceLock<Shared> = std::sync::OnceLock::new();

fn shared() -> &'static Shared {
    SHARED.get_or_init(|| {
        let (sender, receiver) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(1)
                .enable_all()
                .build()
                .unwrap();
            runtime.block_on(async move {
                let (collector, endpoint) = start_collector().await;
                let logs = Captured::default();
                let writer = logs.clone();
                let config = keel_server::Config {
                    otlp_endpoint: Some(endpoint.clone()),
                    trace_sample_ratio: 1.0,
                    // The layer's "call answered" line is a debug line of every call.
                    log: "info,keel_server=debug".to_owned(),
                    log_format: Some(LogFormat::Json),
                    ..keel_server::Config::default()
                };
                let telemetry = keel_server::telemetry::init_with_writer(&config, move || writer.clone(), false);
                assert!(
                    telemetry.exporting(),
                    "this test installs the process's subscriber first"
                );
                sender
                    .send(Shared {
                        telemetry,
                        collector,
                        logs,
                        endpoint,
                    })
                    .unwrap();
                std::future::pending::<()>().await;
            });
        });
        receiver.recv().unwrap()
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rest_sign_up_is_one_trace_through_the_outbox_to_its_handler() {
    let shared = shared();
    let endpoint = shared.endpoint.clone();
    let app = spawn_app_with(Backend::Sqlite, |config| {
        config.otlp_endpoint = Some(endpoint);
    })
    .await;
    one_trace_through_the_outbox(shared, &app, "sqlite", "4bf92f3577b34da6a3ce929d0e0e4736").await;
    app.stop().await;
}

/// On PostgreSQL with a second keel beside the first: the call reaches one,
/// and either may number the event and run the handler, from the event
/// row's stored context.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs PostgreSQL (KEEL_TEST_DATABASE_URL); run with --include-ignored"]
async fn postgres_a_sign_up_on_one_keel_is_one_trace_whichever_keel_handles_it() {
    let shared = shared();
    let endpoint = shared.endpoint.clone();
    let first = spawn_app_with(Backend::Postgres, |config| {
        config.otlp_endpoint = Some(endpoint);
    })
    .await;
    let second = keel_testkit::second_process(&first).await;
    one_trace_through_the_outbox(shared, &second, "postgres", "5ce0a1b2c3d4e5f60718293a4b5c6d7e").await;
    second.stop().await;
    first.stop().await;
}

async fn one_trace_through_the_outbox(shared: &Shared, app: &TestApp, tag: &str, caller_trace: &str) {
    let (telemetry, collector, logs) = (&shared.telemetry, &shared.collector, &shared.logs);

    // Without a caller's context: the server span is the root.
    let email = format!("traced-{tag}@example.com");
    assert_eq!(register(app, &email, None).await, 201);
    let server_trace = collector_trace_of_register(telemetry, collector, &email).await;
    let trace = wait_for_trace(telemetry, collector, &server_trace).await;
    let server = &trace["server"];
    assert!(
        server.parent_span_id.is_empty(),
        "no caller context: the server span is a root"
    );
    assert_eq!(string_attribute(server, "rpc.system"), Some("grpc"));
    assert_eq!(
        string_attribute(server, "rpc.service"),
        Some("keel.identity.v1.IdentityCommandService")
    );
    assert_eq!(string_attribute(server, "rpc.method"), Some("Register"));
    assert_eq!(attribute(server, "rpc.grpc.status_code"), Some(&Value::IntValue(0)));
    assert_eq!(
        trace["command"].parent_span_id, server.span_id,
        "the command runs in the call"
    );
    assert_eq!(
        trace["publish"].kind,
        SpanKind::Producer as i32,
        "the relay's publish continues the trace"
    );
    assert_eq!(trace["handler"].kind, SpanKind::Consumer as i32);
    assert_eq!(
        string_attribute(&trace["handler"], "keel.event.handler"),
        Some("identity.welcome_email")
    );

    // A caller's traceparent: the call joins the caller's trace, under its span.
    let caller_span = "00f067aa0ba902b7";
    let traceparent = format!("00-{caller_trace}-{caller_span}-01");
    let email = format!("caller-traced-{tag}@example.com");
    assert_eq!(register(app, &email, Some(&traceparent)).await, 201);
    let trace = wait_for_trace(telemetry, collector, caller_trace).await;
    assert_eq!(hex(&trace["server"].parent_span_id), caller_span);
    assert_eq!(hex(&trace["handler"].trace_id), caller_trace);

    // A caller that does not sample: nothing of the call is exported (its
    // span is never built, nor a span inside it as a root of its own), and
    // its event passes the caller's trace on, unsampled, to its handler.
    let unsampled_trace = format!("{}{}", &caller_trace[..24], "00000000");
    let email = format!("unsampled-{tag}@example.com");
    assert_eq!(
        register(app, &email, Some(&format!("00-{unsampled_trace}-{caller_span}-00"))).await,
        201
    );
    let stored: Vec<String> = app
        .state
        .db
        .query_all_raw(sea_orm::Statement::from_string(
            app.state.db.get_database_backend(),
            format!("SELECT trace_context FROM events WHERE trace_context LIKE '00-{unsampled_trace}-%'"),
        ))
        .await
        .unwrap()
        .iter()
        .map(|row| row.try_get::<String>("", "trace_context").unwrap())
        .collect();
    assert!(
        stored.len() == 1 && stored[0].ends_with("-00"),
        "the unsampled call's event carries its caller's trace, unsampled: {stored:?}"
    );
    // A sampled call after it: once its trace is whole (its handler ran),
    // the unsampled call's handler ran before it.
    let after_trace = format!("{}{}", &caller_trace[..24], "11111111");
    let email = format!("after-unsampled-{tag}@example.com");
    assert_eq!(
        register(app, &email, Some(&format!("00-{after_trace}-{caller_span}-01"))).await,
        201
    );
    wait_for_trace(telemetry, collector, &after_trace).await;
    let exported = collector.spans.lock().unwrap().clone();
    assert!(
        !exported.iter().any(|span| hex(&span.trace_id) == unsampled_trace),
        "no span of the unsampled call is exported"
    );
    assert!(
        !exported
            .iter()
            .any(|span| span.name == "identity.register" && span.parent_span_id.is_empty()),
        "no command span is exported as a root of its own"
    );

    // The call's log lines carry its trace id beside its request id.
    let logged = logged_trace_ids(logs);
    assert!(
        logged.iter().any(|(trace_id, _)| trace_id == &server_trace),
        "a log line of the first call carries its trace id: {logged:?}"
    );
    assert!(
        logged.iter().any(|(trace_id, _)| trace_id == caller_trace),
        "a log line of the second call carries the caller's trace id: {logged:?}"
    );
    assert!(
        !String::from_utf8(logs.0.lock().unwrap().clone())
            .unwrap()
            .contains("correct horse battery"),
        "no password reaches a log line"
    );
}

/// The trace id of a root Register server span no test took yet: each
/// test's first sign-up is its only call without a caller's context (whose
/// of two parallel tests it is matters not: each trace must be whole).
async fn collector_trace_of_register(
    telemetry: &keel_server::telemetry::Telemetry,
    collector: &Collector,
    email: &str,
) -> String {
    static CLAIMED: Mutex<Vec<String>> = Mutex::new(Vec::new());
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        let flushing = telemetry.clone();
        tokio::task::spawn_blocking(move || flushing.flush()).await.unwrap();
        let claimed_now = {
            let mut claimed = CLAIMED.lock().unwrap();
            let found = collector
                .spans
                .lock()
                .unwrap()
                .iter()
                .filter(|span| {
                    span.name == "keel.identity.v1.IdentityCommandService/Register" && span.parent_span_id.is_empty()
                })
                .map(|span| hex(&span.trace_id))
                .find(|trace_id| !claimed.contains(trace_id));
            if let Some(trace_id) = &found {
                claimed.push(trace_id.clone());
            }
            found
        };
        if let Some(trace_id) = claimed_now {
            return trace_id;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "no Register server span for {email} exported within 20 s"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
