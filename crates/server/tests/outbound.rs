//! The outbound policy of the mailer against the real server and a real
//! SMTP peer on a local port: a relay that keeps failing opens the breaker
//! (sends then fail without a connection), the cool-down makes it
//! half-open, one send goes through as the trial and its success closes it;
//! `/readyz` and `/metrics` show each state.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use keel_testkit::{Backend, TestApp, spawn_app_with};
use serde_json::Value;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::sync::Mutex;

/// A minimal SMTP relay: while `up` is false it greets with 421 (service
/// not available) and hangs up; when up it accepts every message. It counts
/// the connections it was offered.
#[derive(Clone, Default)]
struct Relay {
    connections: Arc<AtomicUsize>,
    up: Arc<AtomicBool>,
    messages: Arc<Mutex<Vec<String>>>,
}

impl Relay {
    async fn start() -> (Relay, u16) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let relay = Relay::default();
        let serving = relay.clone();
        tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    return;
                };
                serving.connections.fetch_add(1, Ordering::SeqCst);
                let relay = serving.clone();
                tokio::spawn(async move { relay.session(stream).await });
            }
        });
        (relay, port)
    }

    async fn session(&self, stream: tokio::net::TcpStream) {
        let (read, mut write) = stream.into_split();
        if !self.up.load(Ordering::SeqCst) {
            let _ = write.write_all(b"421 4.3.2 relay down\r\n").await;
            return;
        }
        let _ = write.write_all(b"220 relay ready\r\n").await;
        let mut lines = BufReader::new(read).lines();
        while let Ok(Some(line)) = lines.next_line().await {
            let command = line.to_ascii_uppercase();
            let reply: &[u8] = if command.starts_with("DATA") {
                let _ = write.write_all(b"354 go on\r\n").await;
                let mut message = String::new();
                while let Ok(Some(line)) = lines.next_line().await {
                    if line == "." {
                        break;
                    }
                    message.push_str(&line);
                    message.push('\n');
                }
                self.messages.lock().await.push(message);
                b"250 queued\r\n"
            } else if command.starts_with("QUIT") {
                let _ = write.write_all(b"221 bye\r\n").await;
                return;
            } else {
                b"250 ok\r\n"
            };
            if write.write_all(reply).await.is_err() {
                return;
            }
        }
    }
}

async fn get(app: &TestApp, path: &str) -> (u16, String) {
    get_as(app, path, None).await
}

async fn get_as(app: &TestApp, path: &str, token: Option<&str>) -> (u16, String) {
    let client: Client<_, Full<Bytes>> = Client::builder(TokioExecutor::new()).build_http();
    let mut request = http::Request::get(format!("{}{path}", app.endpoint()));
    if let Some(token) = token {
        request = request.header("authorization", format!("Bearer {token}"));
    }
    let response = client
        .request(request.body(Full::new(Bytes::new())).unwrap())
        .await
        .unwrap();
    let status = response.status().as_u16();
    let body = response.into_body().collect().await.unwrap().to_bytes();
    (status, String::from_utf8(body.to_vec()).unwrap())
}

/// `/readyz`'s mail breaker, and the status code.
async fn mail_breaker(app: &TestApp) -> (u16, Value) {
    let (status, body) = get(app, "/readyz").await;
    let body: Value = serde_json::from_str(&body).unwrap();
    (status, body["details"]["breakers"]["mail"].clone())
}

/// Polls `/readyz` until the mail breaker satisfies `done` (at most 15 s).
async fn breaker_until(app: &TestApp, what: &str, done: impl Fn(&Value) -> bool) -> Value {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    loop {
        let (_, breaker) = mail_breaker(app).await;
        if done(&breaker) {
            return breaker;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{what} within 15 s; last: {breaker}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// `keel_outbound_breaker_state{target="mail",state=...}` in a scrape.
fn breaker_state_metric(metrics: &str, state: &str) -> Option<f64> {
    let prefix = format!("keel_outbound_breaker_state{{target=\"mail\",state=\"{state}\"}} ");
    metrics
        .lines()
        .find_map(|line| line.strip_prefix(&prefix))
        .map(|value| value.trim().parse().unwrap())
}

#[tokio::test]
async fn a_failing_relay_opens_the_breaker_then_a_trial_after_the_cool_down_closes_it() {
    let (relay, port) = Relay::start().await;
    let app = spawn_app_with(Backend::Sqlite, move |config| {
        config.smtp_url = Some(keel_server::config::Secret::new(format!("smtp://127.0.0.1:{port}")));
        // One connection per handler attempt; two attempts per event.
        config.mail_attempts = 1;
        config.mail_breaker_failures = 2;
        config.mail_breaker_cool_down_ms = 3_000;
        config.event_handler_max_attempts = 2;
        config.event_handler_backoff_ms = 10;
    })
    .await;

    let (status, breaker) = mail_breaker(&app).await;
    assert_eq!(status, 200);
    assert_eq!(breaker["state"], "closed", "{breaker}");

    // Two welcome emails: the first event's two attempts reach the relay
    // (421) and open the breaker; the second event's are refused at once.
    let (first, second) = tokio::join!(app.register("ann@example.com"), app.register("bob@example.com"));
    drop((first, second));
    let open = breaker_until(&app, "two refused sends", |breaker| {
        breaker["rejected_total"].as_u64() >= Some(2)
    })
    .await;
    assert_eq!(open["state"], "open", "{open}");
    assert_eq!(open["opened_total"], 1, "{open}");
    assert!(open["half_open_in_ms"].as_u64().is_some(), "{open}");
    assert_eq!(
        relay.connections.load(Ordering::SeqCst),
        2,
        "an open breaker sends without connecting"
    );
    let (status, _) = mail_breaker(&app).await;
    assert_eq!(status, 200, "an open mail breaker does not make keel unready");
    let (_, metrics) = get(&app, "/metrics").await;
    assert_eq!(breaker_state_metric(&metrics, "open"), Some(1.0), "{metrics}");
    assert_eq!(breaker_state_metric(&metrics, "closed"), Some(0.0));
    assert!(
        metrics.contains("keel_outbound_rejected_total{target=\"mail\"} 2"),
        "{metrics}"
    );
    // The queue statistics show it too (an admin's REST call).
    let (_, admin) = app.admin("root@example.com").await;
    let (status, stats) = get_as(&app, "/v1/queues/stats", Some(&admin.access_token)).await;
    assert_eq!(status, 200, "{stats}");
    let stats: Value = serde_json::from_str(&stats).unwrap();
    let breakers = stats["data"]["breakers"]
        .as_array()
        .unwrap_or_else(|| panic!("breakers in the stats: {stats}"));
    assert_eq!(breakers.len(), 1, "{stats}");
    assert_eq!(breakers[0]["target"], "mail", "{stats}");
    assert_eq!(breakers[0]["state"], "CIRCUIT_STATE_OPEN", "{stats}");
    assert_eq!(breakers[0]["openedTotal"], "1", "{stats}");
    assert!(breakers[0]["halfOpenIn"].is_string(), "{stats}");

    // After the cool-down: half-open; the relay is back; the next send is
    // the trial, and its success closes the breaker.
    breaker_until(&app, "half-open after the cool-down", |breaker| {
        breaker["state"] == "half_open"
    })
    .await;
    relay.up.store(true, Ordering::SeqCst);
    app.register("cat@example.com").await;
    let closed = breaker_until(&app, "closed after the trial", |breaker| breaker["state"] == "closed").await;
    assert_eq!(closed["consecutive_failures"], 0, "{closed}");
    assert_eq!(relay.connections.load(Ordering::SeqCst), 3, "one trial connection");
    let messages = relay.messages.lock().await.clone();
    assert_eq!(messages.len(), 1, "{messages:?}");
    assert!(messages[0].contains("cat@example.com"), "{}", messages[0]);
    let (_, metrics) = get(&app, "/metrics").await;
    assert_eq!(breaker_state_metric(&metrics, "closed"), Some(1.0), "{metrics}");
    assert!(
        metrics.contains("keel_outbound_breaker_opened_total{target=\"mail\"} 1"),
        "{metrics}"
    );
}

#[tokio::test]
async fn without_smtp_readyz_lists_no_breaker() {
    let app = spawn_app_with(Backend::Sqlite, |_| {}).await;
    let (status, body) = get(&app, "/readyz").await;
    assert_eq!(status, 200);
    let body: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(body["status"], "ready");
    assert_eq!(body["details"]["breakers"], serde_json::json!({}));
}
