//! Stream tickets through the real server, on SQLite and PostgreSQL: what a
//! browser's `EventSource` (no Authorization header) opens
//! `GET /v1/events/stream` with. A ticket opens the stream and the
//! browser's reconnect (same URL, `Last-Event-ID`) resumes it; an expired,
//! concurrently reused, revoked-session or forged ticket gets 401; a ticket
//! is no bearer token anywhere else, and never appears in a log.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::Write;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Empty, Full};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use keel_proto::identity as pb;
use keel_testkit::{Backend, PASSWORD, TestApp, authed, spawn_app_with};
use serde_json::{Value, json};

// --- logs ------------------------------------------------------------------------

/// Every log line of this test binary's servers, at debug level: installed
/// before any server starts (keel's own init then keeps it), so the
/// "never logged" test reads what every test wrote.
fn logs() -> Arc<Mutex<Vec<u8>>> {
    static LOGS: OnceLock<Arc<Mutex<Vec<u8>>>> = OnceLock::new();
    LOGS.get_or_init(|| {
        let buffer = Arc::new(Mutex::new(Vec::new()));
        let writer = buffer.clone();
        tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::new("debug"))
            .json()
            .with_span_list(true)
            .with_writer(move || Capture(writer.clone()))
            .init();
        buffer
    })
    .clone()
}

struct Capture(Arc<Mutex<Vec<u8>>>);

impl Write for Capture {
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(bytes);
        Ok(bytes.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

async fn spawn(backend: Backend, first_use: u64, lifetime: u64) -> TestApp {
    logs();
    spawn_app_with(backend, |config| {
        config.stream_ticket_first_use_seconds = first_use;
        config.stream_ticket_lifetime_seconds = lifetime;
        // A heartbeat a second: an idle stream shows that it is alive.
        config.events_heartbeat_seconds = 1;
    })
    .await
}

// --- HTTP --------------------------------------------------------------------------

fn client() -> Client<hyper_util::client::legacy::connect::HttpConnector, Full<Bytes>> {
    Client::builder(TokioExecutor::new()).build_http()
}

async fn rest(app: &TestApp, method: &str, path: &str, bearer: Option<&str>, body: Option<Value>) -> (u16, Value) {
    let mut request = http::Request::builder()
        .method(method)
        .uri(format!("{}{path}", app.endpoint()));
    if let Some(token) = bearer {
        request = request.header("authorization", format!("Bearer {token}"));
    }
    let body = match body {
        Some(body) => {
            request = request.header("content-type", "application/json");
            Full::new(Bytes::from(body.to_string()))
        }
        None => Full::new(Bytes::new()),
    };
    let response = client().request(request.body(body).unwrap()).await.unwrap();
    let status = response.status().as_u16();
    let bytes = response.into_body().collect().await.unwrap().to_bytes();
    let value = if bytes.is_empty() {
        Value::Null
    } else {
        serde_json::from_slice(&bytes).unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&bytes).into()))
    };
    (status, value)
}

struct Ticket {
    text: String,
    first_use_by: chrono::DateTime<chrono::Utc>,
    valid_until: chrono::DateTime<chrono::Utc>,
}

/// A ticket from `POST /v1/events/stream-tickets`, as a browser gets one.
async fn create_ticket(app: &TestApp, access_token: &str) -> Ticket {
    let (status, body) = rest(
        app,
        "POST",
        "/v1/events/stream-tickets",
        Some(access_token),
        Some(json!({})),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    let data = &body["data"];
    let time = |name: &str| {
        chrono::DateTime::parse_from_rfc3339(data[name].as_str().unwrap())
            .unwrap()
            .to_utc()
    };
    let ticket = Ticket {
        text: data["ticket"].as_str().unwrap().to_owned(),
        first_use_by: time("firstUseBy"),
        valid_until: time("validUntil"),
    };
    assert_eq!(ticket.text.len(), 43, "256 bits, URL-safe base64");
    ticket
}

/// An open server-sent-event stream.
struct Sse {
    body: hyper::body::Incoming,
    buffer: String,
}

/// One SSE block: its `id:` (none for heartbeats and errors), `event:`, data.
#[derive(Debug)]
struct Block {
    id: Option<u64>,
    event: Option<String>,
    data: Value,
}

/// `GET /v1/events/stream?ticket=...` as EventSource sends it (no
/// Authorization): the stream, or the refusal's status and body.
async fn open(app: &TestApp, query: &str, last_event_id: Option<u64>) -> Result<Sse, (u16, Value)> {
    let client = Client::builder(TokioExecutor::new()).build_http::<Empty<Bytes>>();
    let mut request = http::Request::get(format!("{}/v1/events/stream?{query}", app.endpoint()))
        .header("accept", "text/event-stream")
        .header("origin", "http://localhost:5173");
    if let Some(id) = last_event_id {
        request = request.header("last-event-id", id.to_string());
    }
    let response = client.request(request.body(Empty::new()).unwrap()).await.unwrap();
    let status = response.status().as_u16();
    if status != 200 {
        let bytes = response.into_body().collect().await.unwrap().to_bytes();
        return Err((status, serde_json::from_slice(&bytes).unwrap_or(Value::Null)));
    }
    assert_eq!(response.headers()["content-type"], "text/event-stream");
    Ok(Sse {
        body: response.into_body(),
        buffer: String::new(),
    })
}

async fn open_with_ticket(app: &TestApp, ticket: &str, last_event_id: Option<u64>) -> Result<Sse, (u16, Value)> {
    open(app, &format!("topics=identity.*&ticket={ticket}"), last_event_id).await
}

/// Reconnects as a browser does after a drop. The server frees the ticket
/// when it notices the old connection is gone, which may take a moment
/// after the client closed it: retried (401 only) until 5 s have passed.
async fn reconnect(app: &TestApp, ticket: &str, last_event_id: u64) -> Sse {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    loop {
        match open_with_ticket(app, ticket, Some(last_event_id)).await {
            Ok(sse) => return sse,
            Err((401, _)) if tokio::time::Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Err(refused) => panic!("reconnect refused: {refused:?}"),
        }
    }
}

fn refused(result: Result<Sse, (u16, Value)>, what: &str) -> Value {
    match result {
        Ok(_) => panic!("{what}: the stream opened"),
        Err((status, body)) => {
            assert_eq!(status, 401, "{what}: {body}");
            assert_eq!(body["error"]["code"], "UNAUTHENTICATED", "{what}: {body}");
            body
        }
    }
}

impl Sse {
    /// The next block, within 10 s; `None` when the stream ended.
    async fn next(&mut self) -> Option<Block> {
        loop {
            if let Some(end) = self.buffer.find("\n\n") {
                let block: String = self.buffer.drain(..end + 2).collect();
                let field = |name: &str| {
                    block
                        .lines()
                        .find_map(|line| line.strip_prefix(name).map(str::to_owned))
                };
                let Some(data) = field("data: ") else { continue };
                return Some(Block {
                    id: field("id: ").map(|id| id.parse().unwrap()),
                    event: field("event: "),
                    data: serde_json::from_str(&data).unwrap(),
                });
            }
            let frame = tokio::time::timeout(Duration::from_secs(10), self.body.frame())
                .await
                .expect("nothing on the stream within 10 s")?;
            let Ok(data) = frame.unwrap().into_data() else { continue };
            self.buffer.push_str(std::str::from_utf8(&data).unwrap());
        }
    }

    /// The ids of the next `count` events (heartbeats skipped).
    async fn events(&mut self, count: usize) -> Vec<u64> {
        let mut ids = Vec::new();
        while ids.len() < count {
            let block = self.next().await.expect("stream ended");
            assert_eq!(block.event, None, "{block:?}");
            if let Some(id) = block.id {
                ids.push(id);
            }
        }
        ids
    }

    /// Reads until the stream ends, within 10 s; its last block (the error
    /// it ended with).
    async fn until_end(&mut self) -> Block {
        let read = async {
            let mut last = None;
            while let Some(block) = self.next().await {
                last = Some(block);
            }
            last.expect("the stream ended without a word")
        };
        tokio::time::timeout(Duration::from_secs(10), read)
            .await
            .expect("the stream did not end within 10 s")
    }
}

async fn register_many(app: &TestApp, prefix: &str, count: usize) {
    for index in 0..count {
        keel_identity::admin::create_user(
            &app.state.bus,
            &format!("{prefix}{index}@example.com"),
            PASSWORD,
            None,
            keel_kernel::Role::User,
        )
        .await
        .unwrap();
    }
}

/// Sleeps until `at` has passed: what an expiry test waits for is time.
async fn wait_past(at: chrono::DateTime<chrono::Utc>) {
    let left = (at - chrono::Utc::now()).to_std().unwrap_or_default();
    tokio::time::sleep(left + Duration::from_millis(100)).await;
}

// --- the cases ---------------------------------------------------------------------

/// A ticket opens the stream; after a drop, the same URL with
/// `Last-Event-ID` continues where it stopped, with no gap or repeat.
async fn a_ticket_opens_the_stream_and_reconnects_resume(backend: Backend) {
    let app = spawn(backend, 60, 900).await;
    let (_, admin) = app.admin("root@example.com").await;
    register_many(&app, "a", 3).await;
    let ticket = create_ticket(&app, &admin.access_token).await;
    assert!(ticket.first_use_by <= ticket.valid_until);
    let mut sse = open_with_ticket(&app, &ticket.text, None).await.unwrap();
    let first = sse.events(3).await;
    assert_eq!(first, [1, 2, 3]);
    drop(sse);
    register_many(&app, "b", 3).await;
    let mut resumed = reconnect(&app, &ticket.text, 3).await;
    app.state.events.flush().await.unwrap();
    let latest = app.state.events.latest_sequence();
    let rest = resumed.events((latest - 3) as usize).await;
    assert_eq!(rest, (4..=latest).collect::<Vec<_>>());
    assert!(latest >= 7, "root registered and signed in, three more users: {latest}");
}

/// Not used within its first-use window: refused. Used in time, a
/// reconnect after `valid_until` is refused, and the open stream ends then.
async fn expired_tickets_are_refused(backend: Backend) {
    // Short enough to wait for, long enough for a loaded machine to open a
    // stream within the first-use window.
    let app = spawn(backend, 2, 4).await;
    let (_, user) = app.signed_in("ada@example.com").await;
    let unused = create_ticket(&app, &user.access_token).await;
    wait_past(unused.first_use_by).await;
    refused(open_with_ticket(&app, &unused.text, None).await, "first use too late");

    let used = create_ticket(&app, &user.access_token).await;
    let mut sse = open_with_ticket(&app, &used.text, None).await.unwrap();
    let end = sse.until_end().await;
    assert!(
        chrono::Utc::now() >= used.valid_until,
        "the stream ended before the ticket's end"
    );
    assert_eq!(end.event.as_deref(), Some("error"), "{end:?}");
    assert_eq!(end.data["error"]["code"], "UNAUTHENTICATED", "{end:?}");
    drop(sse);
    refused(
        open_with_ticket(&app, &used.text, Some(0)).await,
        "reconnect after valid_until",
    );
}

/// One live stream per ticket: a second one while the first is open gets
/// 401; once the first has ended, the reconnect works.
async fn a_ticket_in_use_is_refused_for_a_second_stream(backend: Backend) {
    let app = spawn(backend, 60, 900).await;
    let (_, user) = app.signed_in("ada@example.com").await;
    let ticket = create_ticket(&app, &user.access_token).await;
    let mut first = open_with_ticket(&app, &ticket.text, None).await.unwrap();
    // The first stream is live (its replay, then a heartbeat).
    assert!(first.next().await.is_some());
    refused(
        open_with_ticket(&app, &ticket.text, None).await,
        "second concurrent stream",
    );
    refused(
        open_with_ticket(&app, &ticket.text, Some(1)).await,
        "second concurrent stream",
    );
    // Still the first one's: it keeps streaming.
    assert!(first.next().await.is_some());
    drop(first);
    let mut again = reconnect(&app, &ticket.text, 0).await;
    assert!(again.next().await.is_some());
    // And the reconnect holds it in turn.
    refused(
        open_with_ticket(&app, &ticket.text, None).await,
        "concurrent with the reconnect",
    );
}

/// The hold is a lease: a live stream renews it, so it is never taken over
/// however long it runs; a holder that stopped renewing (its process died
/// with the stream open) loses it once the lease lapses, and the browser's
/// reconnect is accepted.
async fn a_lapsed_hold_is_taken_over(backend: Backend) {
    use sea_orm::ConnectionTrait;
    use sea_orm::sea_query::{Alias, Expr, ExprTrait, Query};
    // A lifetime of 8 s: the lease is 4 s (half), renewed every 1.3 s.
    let app = spawn(backend, 4, 8).await;
    let (_, ada) = app.signed_in("ada@example.com").await;
    let ticket = create_ticket(&app, &ada.access_token).await;
    let mut live = open_with_ticket(&app, &ticket.text, None).await.unwrap();
    assert!(live.next().await.is_some());
    wait_past(chrono::Utc::now() + chrono::Duration::milliseconds(5_500)).await;
    refused(
        open_with_ticket(&app, &ticket.text, Some(0)).await,
        "a live stream's renewed hold",
    );
    assert!(live.next().await.is_some(), "the live stream kept streaming");
    drop(live);

    // What a process that died holding the ticket leaves behind: held,
    // until a lease nobody renews.
    let (bob_user, bob) = app.signed_in("bob@example.com").await;
    let crashed = create_ticket(&app, &bob.access_token).await;
    let now = chrono::Utc::now();
    let held_until = now + chrono::Duration::seconds(2);
    let dead_hold = Query::update()
        .table(Alias::new("event_stream_tickets"))
        .value(Alias::new("live"), true)
        .value(Alias::new("held_until"), held_until)
        .value(Alias::new("first_used_at"), now)
        .and_where(ExprTrait::eq(
            Expr::col(Alias::new("user_id")),
            uuid::Uuid::parse_str(&bob_user.id).unwrap(),
        ))
        .to_owned();
    let marked = app.state.db.execute(&dead_hold).await.unwrap();
    assert_eq!(marked.rows_affected(), 1);
    refused(
        open_with_ticket(&app, &crashed.text, Some(0)).await,
        "held by a stream whose lease has not lapsed",
    );
    wait_past(held_until).await;
    let mut taken_over = open_with_ticket(&app, &crashed.text, Some(0))
        .await
        .expect("the reconnect after the lease lapsed");
    assert!(taken_over.next().await.is_some());
    // And the new stream holds it in turn.
    refused(
        open_with_ticket(&app, &crashed.text, Some(0)).await,
        "concurrent with the takeover",
    );
}

/// A ticket of a session that ended is refused, and a stream opened with
/// one ends when its session does.
async fn a_revoked_sessions_ticket_is_refused(backend: Backend) {
    let app = spawn(backend, 60, 900).await;
    let (_, user) = app.signed_in("ada@example.com").await;
    let ticket = create_ticket(&app, &user.access_token).await;
    let other = create_ticket(&app, &user.access_token).await;
    let mut sse = open_with_ticket(&app, &ticket.text, None).await.unwrap();
    assert!(sse.next().await.is_some());
    let (status, body) = rest(
        &app,
        "POST",
        "/v1/auth/logout",
        Some(&user.access_token),
        Some(json!({})),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    let end = sse.until_end().await;
    assert_eq!(end.event.as_deref(), Some("error"), "{end:?}");
    assert_eq!(end.data["error"]["code"], "UNAUTHENTICATED", "{end:?}");
    drop(sse);
    refused(
        open_with_ticket(&app, &other.text, None).await,
        "unused ticket of a logged-out session",
    );
    // Given time to free the first one: still refused.
    tokio::time::sleep(Duration::from_millis(300)).await;
    refused(
        open_with_ticket(&app, &ticket.text, Some(0)).await,
        "reconnect after logout",
    );
}

/// Made-up tickets, a ticket with one character changed, an empty one and
/// a stream without credentials: all the same 401.
async fn forged_tickets_are_refused(backend: Backend) {
    let app = spawn(backend, 60, 900).await;
    let (_, user) = app.signed_in("ada@example.com").await;
    let real = create_ticket(&app, &user.access_token).await;
    let mut altered = real.text.clone().into_bytes();
    altered[10] = if altered[10] == b'A' { b'B' } else { b'A' };
    let altered = String::from_utf8(altered).unwrap();
    let mut messages = Vec::new();
    for forged in [
        "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA".to_owned(),
        altered,
        "not-a-ticket".to_owned(),
        "%00%0A".to_owned(),
        String::new(),
    ] {
        let body = refused(
            open_with_ticket(&app, &forged, None).await,
            &format!("forged {forged:?}"),
        );
        messages.push(body["error"]["message"].clone());
    }
    for message in &messages {
        assert_eq!(message, &messages[0], "every refusal says the same");
    }
    refused(open(&app, "topics=identity.*", None).await, "no ticket, no token");
    // The real one is unharmed by the attempts.
    let mut sse = open_with_ticket(&app, &real.text, None).await.unwrap();
    assert!(sse.next().await.is_some());
}

/// A ticket is not a bearer token: not as `Authorization` on REST or gRPC,
/// not as `?ticket=` on another route, not as metadata on another method;
/// nor is an access token accepted as a ticket.
async fn a_ticket_is_never_a_bearer_token(backend: Backend) {
    let app = spawn(backend, 60, 900).await;
    let (_, user) = app.signed_in("ada@example.com").await;
    let ticket = create_ticket(&app, &user.access_token).await;

    let (status, body) = rest(&app, "GET", "/v1/users/me", Some(&ticket.text), None).await;
    assert_eq!(status, 401, "{body}");
    let (status, body) = rest(&app, "GET", &format!("/v1/users/me?ticket={}", ticket.text), None, None).await;
    assert!(status == 400 || status == 401, "{status} {body}");
    let (status, body) = rest(
        &app,
        "POST",
        &format!("/v1/events/stream-tickets?ticket={}", ticket.text),
        None,
        Some(json!({})),
    )
    .await;
    assert_eq!(status, 401, "a ticket does not create tickets: {body}");
    // Over REST, the header form of the metadata on another route.
    let request = http::Request::get(format!("{}/v1/users/me", app.endpoint()))
        .header("grpc-metadata-x-keel-stream-ticket", &ticket.text)
        .body(Full::new(Bytes::new()))
        .unwrap();
    assert_eq!(client().request(request).await.unwrap().status(), 401);

    let mut queries = app.queries().await;
    let error = queries
        .get_current_user(authed(pb::GetCurrentUserRequest {}, &ticket.text))
        .await
        .unwrap_err();
    assert_eq!(error.code(), tonic::Code::Unauthenticated);
    let mut request = tonic::Request::new(pb::GetCurrentUserRequest {});
    request
        .metadata_mut()
        .insert("x-keel-stream-ticket", ticket.text.parse().unwrap());
    let error = queries.get_current_user(request).await.unwrap_err();
    assert_eq!(error.code(), tonic::Code::Unauthenticated);

    refused(
        open_with_ticket(&app, &user.access_token, None).await,
        "an access token as a ticket",
    );
    // None of that used the ticket up.
    let mut sse = open_with_ticket(&app, &ticket.text, None).await.unwrap();
    assert!(sse.next().await.is_some());
}

/// Tickets appear in no log line, at debug level, whatever happened to
/// them: created, streamed, refused, reused, used as a bearer token.
async fn a_ticket_is_never_logged(backend: Backend) {
    let app = spawn(backend, 60, 900).await;
    let (_, user) = app.signed_in("ada@example.com").await;
    let ticket = create_ticket(&app, &user.access_token).await;
    let mut sse = open_with_ticket(&app, &ticket.text, None).await.unwrap();
    assert!(sse.next().await.is_some());
    refused(open_with_ticket(&app, &ticket.text, None).await, "concurrent");
    let (status, _) = rest(&app, "GET", "/v1/users/me", Some(&ticket.text), None).await;
    assert_eq!(status, 401);
    let (status, _) = rest(&app, "GET", &format!("/v1/users/me?ticket={}", ticket.text), None, None).await;
    assert_ne!(status, 200);
    drop(sse);
    let forged = "B".repeat(43);
    refused(open_with_ticket(&app, &forged, None).await, "forged");
    app.stop().await;
    let logs = String::from_utf8(logs().lock().unwrap().clone()).unwrap();
    assert!(logs.contains("\"level\""), "the capture saw log lines: {}", logs.len());
    assert!(!logs.contains(&ticket.text), "a ticket in the logs");
    assert!(!logs.contains(&forged), "a forged ticket in the logs");
}

macro_rules! on_both_backends {
    ($($name:ident),* $(,)?) => {
        mod sqlite {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    super::$name(keel_testkit::Backend::Sqlite).await;
                }
            )*
        }
        mod postgres {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                #[ignore = "needs PostgreSQL (KEEL_TEST_DATABASE_URL); run with --include-ignored"]
                async fn $name() {
                    super::$name(keel_testkit::Backend::Postgres).await;
                }
            )*
        }
    };
}

on_both_backends!(
    a_ticket_opens_the_stream_and_reconnects_resume,
    expired_tickets_are_refused,
    a_ticket_in_use_is_refused_for_a_second_stream,
    a_lapsed_hold_is_taken_over,
    a_revoked_sessions_ticket_is_refused,
    forged_tickets_are_refused,
    a_ticket_is_never_a_bearer_token,
    a_ticket_is_never_logged,
);

/// A Connect stream that authenticates with a ticket (as metadata, no
/// Authorization) still has its request read: the edge refuses unread
/// only calls that carry nothing that may authenticate them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connect_stream_with_a_ticket_keeps_its_request() {
    let app = spawn(Backend::Sqlite, 60, 900).await;
    let (_, admin) = app.admin("root@example.com").await;
    register_many(&app, "c", 3).await;
    let ticket = create_ticket(&app, &admin.access_token).await;
    let message = br#"{"topics":["identity.*"],"afterSequence":"2"}"#;
    let mut envelope = vec![0u8];
    envelope.extend_from_slice(&u32::try_from(message.len()).unwrap().to_be_bytes());
    envelope.extend_from_slice(message);
    let request = http::Request::post(format!("{}/keel.events.v1.EventQueryService/Subscribe", app.endpoint()))
        .header("content-type", "application/connect+json")
        .header("connect-protocol-version", "1")
        .header("x-keel-stream-ticket", &ticket.text)
        .body(Full::new(Bytes::from(envelope)))
        .unwrap();
    let response = client().request(request).await.unwrap();
    assert_eq!(response.status(), 200);
    let mut body = response.into_body();
    let mut buffer = Vec::new();
    let first = loop {
        if buffer.len() >= 5 {
            let length = u32::from_be_bytes(buffer[1..5].try_into().unwrap()) as usize;
            if buffer.len() >= 5 + length {
                assert_eq!(
                    buffer[0],
                    0,
                    "a message, not the end: {:?}",
                    String::from_utf8_lossy(&buffer)
                );
                break serde_json::from_slice::<Value>(&buffer[5..5 + length]).unwrap();
            }
        }
        let frame = tokio::time::timeout(Duration::from_secs(10), body.frame())
            .await
            .expect("nothing on the stream within 10 s")
            .expect("the stream ended")
            .unwrap();
        if let Ok(data) = frame.into_data() {
            buffer.extend_from_slice(&data);
        }
    };
    assert_eq!(first["sequence"], "3", "resumed after 2, as asked: {first}");
}
