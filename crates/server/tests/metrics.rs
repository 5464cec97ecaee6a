//! `/metrics` against the real server: the counters and histograms move by
//! exactly the calls made, on each protocol, with bounded labels, and the
//! text parses with a Prometheus parser.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::HashMap;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use keel_proto::identity as pb;
use keel_proto::identity::identity_query_service_client::IdentityQueryServiceClient;
use keel_testkit::{Backend, TestApp, authed, spawn_app_with};

async fn http(app: &TestApp, method: &str, path: &str, headers: &[(&str, &str)], body: &str) -> (u16, String) {
    let mut builder = http::Request::builder()
        .method(method)
        .uri(format!("{}{path}", app.endpoint()));
    for (name, value) in headers {
        builder = builder.header(*name, *value);
    }
    let client: Client<_, Full<Bytes>> = Client::builder(TokioExecutor::new()).build_http();
    let response = client
        .request(builder.body(Full::new(Bytes::from(body.to_owned()))).unwrap())
        .await
        .unwrap();
    let status = response.status().as_u16();
    let body = response.into_body().collect().await.unwrap().to_bytes();
    (status, String::from_utf8(body.to_vec()).unwrap())
}

/// Every sample of a scrape, by name and sorted labels.
type Samples = HashMap<(String, Vec<(String, String)>), f64>;

async fn scrape(app: &TestApp) -> Samples {
    let (status, text) = http(app, "GET", "/metrics", &[], "").await;
    assert_eq!(status, 200);
    let lines = text.lines().map(|line| Ok(line.to_owned()));
    let scrape = prometheus_parse::Scrape::parse(lines).expect("the text parses as Prometheus metrics");
    let mut samples = Samples::new();
    for sample in scrape.samples {
        let mut labels: Vec<(String, String)> = sample.labels.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
        labels.sort();
        let value = match sample.value {
            prometheus_parse::Value::Counter(v)
            | prometheus_parse::Value::Gauge(v)
            | prometheus_parse::Value::Untyped(v) => v,
            prometheus_parse::Value::Histogram(buckets) => {
                // The +Inf bucket: the count.
                buckets.iter().map(|bucket| bucket.count).fold(0.0, f64::max)
            }
            prometheus_parse::Value::Summary(_) => continue,
        };
        samples.insert((sample.metric, labels), value);
    }
    samples
}

fn value(samples: &Samples, name: &str, labels: &[(&str, &str)]) -> f64 {
    let mut labels: Vec<(String, String)> = labels.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect();
    labels.sort();
    samples.get(&(name.to_owned(), labels)).copied().unwrap_or(0.0)
}

const ME: &str = "keel.identity.v1.IdentityQueryService/GetCurrentUser";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calls_move_the_counters_by_exactly_the_calls_made() {
    // Checkouts are timed in the whole process from here on.
    let app = spawn_app_with(Backend::Sqlite, |config| config.metrics_pool_timing = true).await;
    let (_, tokens) = app.signed_in("metrics@example.com").await;
    let token = tokens.access_token.clone();
    let before = scrape(&app).await;

    // gRPC twice, grpc-web once, REST once, Connect once; REST anonymously once.
    let mut grpc = IdentityQueryServiceClient::new(app.channel().await);
    for _ in 0..2 {
        grpc.get_current_user(authed(pb::GetCurrentUserRequest {}, &token))
            .await
            .unwrap();
    }
    IdentityQueryServiceClient::new(app.grpc_web())
        .get_current_user(authed(pb::GetCurrentUserRequest {}, &token))
        .await
        .unwrap();
    let bearer = format!("Bearer {token}");
    assert_eq!(
        http(&app, "GET", "/v1/users/me", &[("authorization", &bearer)], "")
            .await
            .0,
        200
    );
    let connect = [("content-type", "application/json"), ("authorization", bearer.as_str())];
    assert_eq!(http(&app, "POST", &format!("/{ME}"), &connect, "{}").await.0, 200);
    assert_eq!(http(&app, "GET", "/v1/users/me", &[], "").await.0, 401);
    // A path that names no method: labelled `unknown`, not by the path.
    let raw_grpc = [("content-type", "application/grpc")];
    http(&app, "POST", "/no.such.Service/Nope", &raw_grpc, "").await;

    let after = scrape(&app).await;
    let moved = |protocol: &str, method: &str, code: &str| {
        let labels = [("protocol", protocol), ("method", method), ("code", code)];
        value(&after, "keel_requests_total", &labels) - value(&before, "keel_requests_total", &labels)
    };
    assert_eq!(moved("grpc", ME, "OK"), 2.0);
    assert_eq!(moved("grpc-web", ME, "OK"), 1.0);
    assert_eq!(moved("rest", ME, "OK"), 1.0);
    assert_eq!(moved("connect", ME, "OK"), 1.0);
    assert_eq!(moved("rest", ME, "UNAUTHENTICATED"), 1.0);
    assert_eq!(moved("grpc", "unknown", "UNIMPLEMENTED"), 1.0);
    let timed = |protocol: &str| {
        let labels = [("protocol", protocol), ("method", ME)];
        value(&after, "keel_request_duration_seconds", &labels)
            - value(&before, "keel_request_duration_seconds", &labels)
    };
    assert_eq!(timed("grpc"), 2.0, "histogram count");
    assert_eq!(timed("rest"), 2.0, "the 401 is timed too");
    // No label holds a path with an id or anything a caller chose.
    for (name, labels) in after.keys() {
        for (key, label) in labels {
            assert!(!label.contains("/v1/"), "{name} {key}={label}");
            assert!(!label.contains("no.such"), "{name} {key}={label}");
        }
    }
    assert_eq!(value(&after, "keel_requests_in_flight", &[("protocol", "grpc")]), 0.0);
    assert!(value(&after, "keel_db_pool_max_connections", &[]) >= 1.0);
    // Each of the five signed-in calls read the database: at least five
    // checkouts were timed (other tests of this process add theirs).
    let checkouts =
        value(&after, "keel_db_pool_acquire_seconds", &[]) - value(&before, "keel_db_pool_acquire_seconds", &[]);
    assert!(checkouts >= 5.0, "{checkouts} checkouts timed");
    assert!(after.contains_key(&("keel_db_pool_acquire_timeouts_total".to_owned(), Vec::new())));
    assert!(value(&after, "keel_process_resident_memory_bytes", &[]) > 1_000_000.0);
    assert!(value(&after, "keel_process_cpu_seconds_total", &[]) > 0.0);
    assert_eq!(value(&after, "keel_event_dead_letters", &[]), 0.0);
    assert!(after.contains_key(&("keel_outbox_backlog_events".to_owned(), Vec::new())));
    // Exported from the start (the events contract tests count them).
    for counted in [
        "keel_realtime_subscribers_dropped_slow_total",
        "keel_event_handler_retries_total",
    ] {
        assert!(after.contains_key(&(counted.to_owned(), Vec::new())), "{counted}");
    }
}

/// The job queues as `GetQueueStats` sees them, and the workers' retries
/// and give-ups, after jobs that wait and one that fails twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn job_queues_and_failures_are_in_the_scrape() {
    let app = spawn_app_with(Backend::Sqlite, |config| config.jobs_backoff_ms = 10).await;
    let jobs = &app.state.jobs;
    let later = keel_kernel::clock::now() + chrono::Duration::hours(1);
    let waiting = || {
        keel_kernel::NewJob::new(&keel_jobs::Noop::default())
            .unwrap()
            .run_at(later)
    };
    jobs.enqueue(vec![waiting(), waiting()]).await.unwrap();
    let failing = keel_kernel::NewJob::new(&keel_jobs::Noop {
        fail: Some("boom".to_owned()),
        ..keel_jobs::Noop::default()
    })
    .unwrap()
    .max_attempts(2);
    let id = jobs.enqueue(vec![failing]).await.unwrap()[0];
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while jobs.get(id).await.unwrap().unwrap().state != keel_jobs::JobState::Failed {
        assert!(std::time::Instant::now() < deadline, "the failing job never failed");
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }

    let samples = scrape(&app).await;
    let queue = [("queue", "default")];
    assert_eq!(value(&samples, "keel_job_queue_depth", &queue), 2.0);
    assert_eq!(value(&samples, "keel_job_queue_available", &queue), 0.0);
    assert_eq!(value(&samples, "keel_job_queue_running", &queue), 0.0);
    assert_eq!(value(&samples, "keel_job_queue_failed", &queue), 1.0);
    assert_eq!(value(&samples, "keel_job_queue_paused", &queue), 0.0);
    assert!(
        samples.contains_key(&(
            "keel_job_queue_oldest_waiting_seconds".to_owned(),
            vec![("queue".to_owned(), "default".to_owned())]
        )),
        "{samples:?}"
    );
    assert_eq!(value(&samples, "keel_job_retries_total", &[]), 1.0);
    assert_eq!(value(&samples, "keel_job_failures_total", &[]), 1.0);

    // A queue that exists only through its jobs (of a kind another keel
    // build runs) leaves the scrape with them.
    let report = jobs.enqueue(vec![waiting()]).await.unwrap()[0];
    let moved = sea_orm::ConnectionTrait::execute_raw(
        jobs.db(),
        sea_orm::Statement::from_sql_and_values(
            sea_orm::DbBackend::Sqlite,
            "UPDATE jobs SET queue = 'reports' WHERE id = ?",
            [report.into()],
        ),
    )
    .await
    .unwrap();
    assert_eq!(moved.rows_affected(), 1);
    let reports = [("queue", "reports")];
    assert_eq!(value(&scrape(&app).await, "keel_job_queue_depth", &reports), 1.0);
    assert!(
        keel_jobs::store::delete_unless_running(jobs.db(), report)
            .await
            .unwrap()
    );
    let samples = scrape(&app).await;
    let left: Vec<_> = samples
        .keys()
        .filter(|(_, labels)| labels.iter().any(|(_, value)| value == "reports"))
        .collect();
    assert!(left.is_empty(), "a vanished queue's series stayed: {left:?}");
    assert_eq!(value(&samples, "keel_job_queue_depth", &queue), 2.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_can_be_turned_off() {
    let app = spawn_app_with(Backend::Sqlite, |config| config.metrics = false).await;
    assert_eq!(http(&app, "GET", "/metrics", &[], "").await.0, 404);
}
