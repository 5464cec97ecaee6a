//! Load shedding and the client's address behind trusted proxies, against
//! the real server.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use keel_proto::identity as pb;
use keel_testkit::{Backend, PASSWORD, TestApp, authed, spawn_app, spawn_app_with};
use serde_json::{Value, json};

async fn request(
    app: &TestApp,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: Value,
) -> (http::StatusCode, http::HeaderMap, Value) {
    let mut builder = http::Request::builder()
        .method(method)
        .uri(format!("{}{path}", app.endpoint()))
        .header("content-type", "application/json");
    for (name, value) in headers {
        builder = builder.header(*name, *value);
    }
    let body = if body.is_null() {
        Bytes::new()
    } else {
        Bytes::from(body.to_string())
    };
    let response = Client::builder(TokioExecutor::new())
        .build_http()
        .request(builder.body(Full::new(body)).unwrap())
        .await
        .unwrap();
    let (parts, body) = response.into_parts();
    let body = body.collect().await.unwrap().to_bytes();
    (
        parts.status,
        parts.headers,
        serde_json::from_slice(&body).unwrap_or(Value::Null),
    )
}

/// Opens a REST call that stays in flight until the returned stream is
/// dropped: its head promises a body that never comes.
async fn held_call(app: &TestApp) -> tokio::net::TcpStream {
    use tokio::io::AsyncWriteExt;
    let mut stream = tokio::net::TcpStream::connect(app.addr).await.unwrap();
    stream
        .write_all(b"POST /v1/auth/register HTTP/1.1\r\nhost: keel\r\ncontent-type: application/json\r\ncontent-length: 100\r\n\r\n{")
        .await
        .unwrap();
    stream
}

/// [`held_call`], forwarded for `client` by the (trusted) proxy, returned
/// once it is in flight: it asks `Expect: 100-continue`, which the server
/// answers when the admitted call starts reading its body (a shed call
/// gets its 503 instead), and then sends a part of the body.
async fn admitted_held_call_from(app: &TestApp, client: &str) -> tokio::net::TcpStream {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(app.addr).await.unwrap();
    let head = format!(
        "POST /v1/auth/register HTTP/1.1\r\nhost: keel\r\nx-forwarded-for: {client}\r\n\
         content-type: application/json\r\ncontent-length: 100\r\nexpect: 100-continue\r\n\r\n"
    );
    stream.write_all(head.as_bytes()).await.unwrap();
    let mut answer = Vec::new();
    let mut buffer = [0u8; 256];
    let read = async {
        while !answer.windows(4).any(|window| window == b"\r\n\r\n") {
            let read = stream.read(&mut buffer).await.unwrap();
            assert!(read > 0, "closed: {}", String::from_utf8_lossy(&answer));
            answer.extend_from_slice(&buffer[..read]);
        }
    };
    tokio::time::timeout(std::time::Duration::from_secs(10), read)
        .await
        .expect("an answer to the head within 10 s");
    assert!(
        answer.starts_with(b"HTTP/1.1 100"),
        "not admitted: {}",
        String::from_utf8_lossy(&answer)
    );
    stream.write_all(b"{").await.unwrap();
    stream
}

async fn register_over_grpc(app: &TestApp, email: &str) -> Result<(), tonic::Status> {
    app.commands()
        .await
        .register(pb::RegisterRequest {
            email: email.to_owned(),
            password: PASSWORD.to_owned(),
            display_name: "Flood".to_owned(),
        })
        .await
        .map(|_| ())
}

/// One address with its share of the calls in flight (two stalled bodies
/// here) is refused its own next call (RESOURCE_EXHAUSTED / 429, gRPC
/// too), not another address's, and keel does not call that overload: a
/// client that never finishes sending cannot take every caller's place.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_address_cannot_take_every_place_in_flight() {
    let app = spawn_app_with(Backend::Sqlite, |config| {
        config.max_in_flight = 8;
        config.max_in_flight_per_address = Some(2);
        config.trusted_proxies = Some("127.0.0.1/32".to_owned());
        config.register_burst = 1000;
    })
    .await;
    let stalling = "203.0.113.7";
    let _held = [
        admitted_held_call_from(&app, stalling).await,
        admitted_held_call_from(&app, stalling).await,
    ];
    let body = |email: &str| json!({"email": email, "password": PASSWORD, "displayName": "Stall"});
    let (status, headers, answer) = request(
        &app,
        "POST",
        "/v1/auth/register",
        &[("x-forwarded-for", stalling)],
        body("stall@example.com"),
    )
    .await;
    assert_eq!(status, 429, "{answer}");
    assert_eq!(headers["retry-after"], "1");
    assert_eq!(answer["error"]["code"], "RESOURCE_EXHAUSTED", "{answer}");
    let mut request_from_stalling = tonic::Request::new(pb::RegisterRequest {
        email: "stall-grpc@example.com".to_owned(),
        password: PASSWORD.to_owned(),
        display_name: "Stall".to_owned(),
    });
    request_from_stalling
        .metadata_mut()
        .insert("x-forwarded-for", stalling.parse().unwrap());
    let refused = app.commands().await.register(request_from_stalling).await.unwrap_err();
    assert_eq!(refused.code(), tonic::Code::ResourceExhausted, "{refused:?}");
    let (ready, _, _) = request(&app, "GET", "/readyz", &[], Value::Null).await;
    assert_eq!(ready, 200, "one client's limit is not overload");
    for other in ["203.0.113.8", "198.51.100.1"] {
        let email = format!("other-{other}@example.com");
        let (status, _, answer) = request(
            &app,
            "POST",
            "/v1/auth/register",
            &[("x-forwarded-for", other)],
            body(&email),
        )
        .await;
        assert!(status.is_success(), "{other}: {status} {answer}");
    }
}

/// With `KEEL_MAX_IN_FLIGHT` calls in flight, one more is answered at once
/// in its protocol's words (gRPC UNAVAILABLE, REST and Connect 503, with
/// `Retry-After`), `/readyz` says `overloaded`, health is still answered;
/// once the calls in flight end, calls are admitted again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calls_beyond_the_in_flight_bound_are_shed_at_once() {
    let app = spawn_app_with(Backend::Sqlite, |config| {
        config.max_in_flight = 2;
        // The registrations admitted before the held calls take their
        // permits must not meet the per-address sign-up limit.
        config.register_burst = 1000;
    })
    .await;
    let (ready, _, _) = request(&app, "GET", "/readyz", &[], Value::Null).await;
    assert_eq!(ready, 200);
    let held = [held_call(&app).await, held_call(&app).await];

    // The held calls take their permits as soon as the server has read their
    // heads; until then a call may still get through.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    let mut attempt = 0;
    let shed = loop {
        attempt += 1;
        match register_over_grpc(&app, &format!("early-{attempt}@example.com")).await {
            Err(status) if status.code() == tonic::Code::Unavailable => break status,
            other => {
                other.unwrap();
                assert!(std::time::Instant::now() < deadline, "never shed with two calls held");
            }
        }
    };
    assert_eq!(shed.metadata().get("retry-after").unwrap(), "1");

    let body = json!({"email": "rest@example.com", "password": PASSWORD, "displayName": "Flood"});
    let (status, headers, answer) = request(&app, "POST", "/v1/auth/register", &[], body.clone()).await;
    assert_eq!(status, 503, "{answer}");
    assert_eq!(headers["retry-after"], "1");
    assert_eq!(answer["error"]["code"], "UNAVAILABLE", "{answer}");
    assert!(answer["error"]["request_id"].is_string(), "{answer}");
    let (status, _, answer) = request(
        &app,
        "POST",
        "/keel.identity.v1.IdentityCommandService/Register",
        &[("connect-protocol-version", "1")],
        body.clone(),
    )
    .await;
    assert_eq!(
        (status.as_u16(), answer["code"].as_str()),
        (503, Some("unavailable")),
        "{answer}"
    );

    // A Connect stream learns it in the stream's own terms: HTTP 200 and an
    // end-of-stream message with the error.
    let stream = http::Request::post(format!("{}/keel.events.v1.EventQueryService/Subscribe", app.endpoint()))
        .header("content-type", "application/connect+json")
        .header("connect-protocol-version", "1")
        .body(Full::new(Bytes::from_static(b"\0\0\0\0\x02{}")))
        .unwrap();
    let response = Client::builder(TokioExecutor::new())
        .build_http()
        .request(stream)
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(response.headers()["retry-after"], "1");
    let envelope = response.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(envelope[0], 2, "an end-of-stream envelope: {envelope:?}");
    let end: Value = serde_json::from_slice(&envelope[5..]).unwrap();
    assert_eq!(end["error"]["code"], "unavailable", "{end}");

    let (ready, _, answer) = request(&app, "GET", "/readyz", &[], Value::Null).await;
    assert_eq!((ready.as_u16(), answer["status"].as_str()), (503, Some("overloaded")));
    let (health, _, _) = request(&app, "GET", "/healthz", &[], Value::Null).await;
    assert_eq!(health, 200, "/healthz is never shed");
    let (metrics, _, _) = request(&app, "GET", "/metrics", &[], Value::Null).await;
    assert_eq!(metrics, 200, "/metrics is never shed: overload is when it is read");

    // The held calls end (their clients go away): calls are admitted again.
    drop(held);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        let (status, _, answer) = request(&app, "POST", "/v1/auth/register", &[], body.clone()).await;
        if status.is_success() {
            break;
        }
        assert_eq!(status, 503, "{answer}");
        assert!(
            std::time::Instant::now() < deadline,
            "still shed after the held calls ended"
        );
    }
}

async fn session_addresses(app: &TestApp, forwarded: &[(&str, &str)]) -> String {
    app.register("proxied@example.com").await;
    let (status, _, body) = request(
        app,
        "POST",
        "/v1/auth/login",
        forwarded,
        json!({"email": "proxied@example.com", "password": PASSWORD}),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    let token = body["data"]["tokens"]["accessToken"].as_str().unwrap().to_owned();
    let sessions = app
        .queries()
        .await
        .list_sessions(authed(pb::ListSessionsRequest {}, &token))
        .await
        .unwrap()
        .into_inner()
        .sessions;
    assert_eq!(sessions.len(), 1);
    sessions[0].ip_address.clone()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_forwarded_address_is_believed_only_from_a_trusted_proxy() {
    let forged = [("x-forwarded-for", "6.6.6.6, 203.0.113.9")];
    // By default no proxy is trusted: the header is the caller's own words.
    let app = spawn_app(Backend::Sqlite).await;
    assert_eq!(session_addresses(&app, &forged).await, "127.0.0.1");
    app.stop().await;

    // Behind a trusted proxy (the test itself, on loopback): the rightmost
    // address that is not a trusted proxy, never the leftmost.
    let app = spawn_app_with(Backend::Sqlite, |config| {
        config.trusted_proxies = Some("127.0.0.1/32, 10.0.0.0/8".to_owned());
    })
    .await;
    let chain = [("x-forwarded-for", "6.6.6.6, 203.0.113.9, 10.1.1.1")];
    assert_eq!(session_addresses(&app, &chain).await, "203.0.113.9");
    app.stop().await;

    let app = spawn_app_with(Backend::Sqlite, |config| {
        config.trusted_proxies = Some("127.0.0.1".to_owned());
        config.forwarded_header = "forwarded".to_owned();
    })
    .await;
    let forwarded = [
        ("forwarded", r#"for=6.6.6.6, for="[2001:db8::9]:443""#),
        ("x-forwarded-for", "7.7.7.7"),
    ];
    assert_eq!(session_addresses(&app, &forwarded).await, "2001:db8::9");
}
