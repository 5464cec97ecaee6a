//! Streams end when access ends: an event subscription over gRPC, grpc-web
//! and SSE ends with UNAUTHENTICATED, the reason and the cursor to resume
//! after, when its access token expires and, within moments, when its
//! session is logged out, revoked, ended by a password change, when the
//! user's role changes or the user is deleted; on PostgreSQL and Redis also
//! when that happens through another keel process. Streams of other
//! sessions go on.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use keel_proto::events as ev;
use keel_proto::events::event_query_service_client::EventQueryServiceClient;
use keel_proto::identity as pb;
use keel_testkit::{Backend, PASSWORD, TestApp, authed, backend_tests, spawn_app_with};
use tonic_types::StatusExt;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Protocol {
    Grpc,
    GrpcWeb,
    Sse,
}

const PROTOCOLS: [Protocol; 3] = [Protocol::Grpc, Protocol::GrpcWeb, Protocol::Sse];

/// An open subscription on one protocol.
enum Opened {
    Grpc(tonic::Streaming<ev::SubscribeResponse>),
    Sse {
        body: hyper::body::Incoming,
        buffer: String,
    },
}

/// What a stream said next.
#[derive(Debug, PartialEq, Eq)]
enum Next {
    Event {
        sequence: u64,
        name: String,
    },
    Heartbeat,
    /// The stream ended with an error: its code, `ErrorInfo` reason and
    /// `resume_after_sequence`.
    Ended {
        code: String,
        reason: String,
        resume: Option<u64>,
    },
    Closed,
}

async fn open(app: &TestApp, protocol: Protocol, token: &str, after: u64) -> Opened {
    let request = || {
        authed(
            ev::SubscribeRequest {
                topics: vec![],
                after_sequence: after,
            },
            token,
        )
    };
    match protocol {
        Protocol::Grpc => Opened::Grpc(
            EventQueryServiceClient::new(app.channel().await)
                .subscribe(request())
                .await
                .unwrap()
                .into_inner(),
        ),
        Protocol::GrpcWeb => Opened::Grpc(
            EventQueryServiceClient::new(app.grpc_web())
                .subscribe(request())
                .await
                .unwrap()
                .into_inner(),
        ),
        Protocol::Sse => {
            let client = Client::builder(TokioExecutor::new()).build_http::<Empty<Bytes>>();
            let request = http::Request::get(format!("{}/v1/events/stream?afterSequence={after}", app.endpoint()))
                .header("accept", "text/event-stream")
                .header("authorization", format!("Bearer {token}"))
                .body(Empty::new())
                .unwrap();
            let response = client.request(request).await.unwrap();
            assert_eq!(response.status(), 200);
            Opened::Sse {
                body: response.into_body(),
                buffer: String::new(),
            }
        }
    }
}

impl Opened {
    async fn next(&mut self) -> Next {
        match self {
            Opened::Grpc(stream) => match stream.message().await {
                Ok(Some(message)) => match message.kind {
                    Some(ev::subscribe_response::Kind::Event(event)) => Next::Event {
                        sequence: event.sequence,
                        name: event.event_name,
                    },
                    _ => Next::Heartbeat,
                },
                Ok(None) => Next::Closed,
                Err(status) => {
                    let info = status.get_error_details().error_info().cloned();
                    Next::Ended {
                        code: format!("{:?}", status.code()),
                        reason: info.as_ref().map(|info| info.reason.clone()).unwrap_or_default(),
                        resume: info
                            .and_then(|info| info.metadata.get("resume_after_sequence").cloned())
                            .map(|sequence| sequence.parse().unwrap()),
                    }
                }
            },
            Opened::Sse { body, buffer } => loop {
                if let Some(end) = buffer.find("\n\n") {
                    let block: String = buffer.drain(..end + 2).collect();
                    return sse_block(&block);
                }
                match body.frame().await {
                    Some(frame) => {
                        if let Ok(data) = frame.unwrap().into_data() {
                            buffer.push_str(std::str::from_utf8(&data).unwrap());
                        }
                    }
                    None => return Next::Closed,
                }
            },
        }
    }

    /// Reads until the stream ends, within `limit`; events are collected.
    async fn ending(&mut self, limit: Duration) -> (Vec<String>, Next) {
        let deadline = tokio::time::Instant::now() + limit;
        let mut events = Vec::new();
        loop {
            let next = tokio::time::timeout_at(deadline, self.next())
                .await
                .expect("the stream did not end in time");
            match next {
                Next::Event { name, .. } => events.push(name),
                Next::Heartbeat => {}
                ended => return (events, ended),
            }
        }
    }

    /// Reads until an event named `name` arrives, within 10 s: the stream
    /// is alive.
    async fn expect_event(&mut self, name: &str) -> u64 {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        loop {
            match tokio::time::timeout_at(deadline, self.next())
                .await
                .unwrap_or_else(|_| panic!("no {name} within 10 s"))
            {
                Next::Event { sequence, name: seen } if seen == name => return sequence,
                Next::Event { .. } | Next::Heartbeat => {}
                other => panic!("the stream ended while waiting for {name}: {other:?}"),
            }
        }
    }
}

fn sse_block(block: &str) -> Next {
    let field = |name: &str| block.lines().find_map(|line| line.strip_prefix(name));
    let Some(data) = field("data: ") else {
        return Next::Heartbeat;
    };
    let value: serde_json::Value = serde_json::from_str(data).unwrap();
    if field("event: ") == Some("error") {
        let error = &value["error"];
        let info = error["details"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|detail| detail["@type"] == "type.googleapis.com/google.rpc.ErrorInfo");
        return Next::Ended {
            code: error["code"].as_str().unwrap_or_default().to_owned(),
            reason: info
                .map(|info| info["reason"].as_str().unwrap().to_owned())
                .unwrap_or_default(),
            resume: info
                .and_then(|info| info["metadata"]["resume_after_sequence"].as_str())
                .map(|sequence| sequence.parse().unwrap()),
        };
    }
    match &value["data"]["event"] {
        serde_json::Value::Null => Next::Heartbeat,
        event => Next::Event {
            sequence: event["sequence"].as_str().unwrap().parse().unwrap(),
            name: event["eventName"].as_str().unwrap().to_owned(),
        },
    }
}

/// One stream per protocol, all with `token`.
async fn open_all(app: &TestApp, token: &str) -> Vec<(Protocol, Opened)> {
    let mut opened = Vec::new();
    for protocol in PROTOCOLS {
        opened.push((protocol, open(app, protocol, token, 0).await));
    }
    opened
}

/// Every stream ends with UNAUTHENTICATED and `reason`, soon.
async fn all_end(streams: &mut [(Protocol, Opened)], reason: &str, why: &str) {
    let started = Instant::now();
    for (protocol, stream) in streams.iter_mut() {
        let (_, ended) = stream.ending(Duration::from_secs(10)).await;
        match ended {
            Next::Ended {
                code,
                reason: seen,
                resume,
            } => {
                assert!(
                    code == "Unauthenticated" || code == "UNAUTHENTICATED",
                    "{why}, {protocol:?}: {code}"
                );
                assert_eq!(seen, reason, "{why}, {protocol:?}");
                assert!(resume.is_some(), "{why}, {protocol:?}: no cursor to resume after");
            }
            other => panic!("{why}, {protocol:?}: ended with {other:?}"),
        }
    }
    eprintln!("{why}: all three streams ended within {:?}", started.elapsed());
}

backend_tests! {
    async fn an_api_keys_streams_end_when_it_is_revoked(app: TestApp) {
        let (_, admin) = app.admin("root@example.com").await;
        let created = app
            .commands()
            .await
            .create_api_key(authed(
                pb::CreateApiKeyRequest { name: "watcher".to_owned(), role: pb::Role::User as i32, expires_at: None },
                &admin.access_token,
            ))
            .await
            .unwrap()
            .into_inner();
        let mut streams = open_all(&app, &created.key).await;
        app.commands()
            .await
            .revoke_api_key(authed(pb::RevokeApiKeyRequest { id: created.api_key.unwrap().id }, &admin.access_token))
            .await
            .unwrap();
        all_end(&mut streams, "SESSION_ENDED", "RevokeApiKey").await;
    }

    async fn every_way_a_session_ends_ends_its_streams_on_every_protocol(app: TestApp) {
        let (_, admin) = app.admin("root@example.com").await;

        // Logout.
        let (_, tokens) = app.signed_in("logout@example.com").await;
        let mut streams = open_all(&app, &tokens.access_token).await;
        app.commands().await.logout(authed(pb::LogoutRequest {}, &tokens.access_token)).await.unwrap();
        all_end(&mut streams, "SESSION_ENDED", "logout").await;

        // RevokeSession from another session: that session's streams go on.
        let (_, laptop) = app.signed_in("laptop@example.com").await;
        let phone = app.login("laptop@example.com").await;
        let mut laptop_streams = open_all(&app, &laptop.access_token).await;
        let mut phone_streams = open_all(&app, &phone.access_token).await;
        app.commands()
            .await
            .revoke_session(authed(pb::RevokeSessionRequest { id: laptop.session_id.clone() }, &phone.access_token))
            .await
            .unwrap();
        all_end(&mut laptop_streams, "SESSION_ENDED", "RevokeSession").await;
        app.login("laptop@example.com").await;
        for (protocol, stream) in &mut phone_streams {
            stream.expect_event("identity.user.logged_in").await;
            eprintln!("the revoking session's {protocol:?} stream goes on");
        }

        // A password change ends the other sessions' streams, not its own.
        let (_, old) = app.signed_in("change@example.com").await;
        let current = app.login("change@example.com").await;
        let mut old_streams = open_all(&app, &old.access_token).await;
        let mut current_streams = open_all(&app, &current.access_token).await;
        app.commands()
            .await
            .change_password(authed(
                pb::ChangePasswordRequest {
                    current_password: PASSWORD.to_owned(),
                    new_password: "another long passphrase".to_owned(),
                },
                &current.access_token,
            ))
            .await
            .unwrap();
        all_end(&mut old_streams, "SESSION_ENDED", "ChangePassword").await;
        for (_, stream) in &mut current_streams {
            stream.expect_event("identity.password.changed").await;
        }

        // A role change: the admin's view of everyone's events ends.
        let (deputy, deputy_tokens) = app.signed_in("deputy@example.com").await;
        let set_role = |role: pb::Role| pb::UpdateUserRequest {
            user: Some(pb::User { id: deputy.id.clone(), role: role as i32, ..Default::default() }),
            update_mask: Some(prost_types::FieldMask { paths: vec!["role".to_owned()] }),
        };
        app.commands().await.update_user(authed(set_role(pb::Role::Admin), &admin.access_token)).await.unwrap();
        let mut deputy_streams = open_all(&app, &deputy_tokens.access_token).await;
        app.commands().await.update_user(authed(set_role(pb::Role::User), &admin.access_token)).await.unwrap();
        all_end(&mut deputy_streams, "SESSION_ENDED", "demotion").await;

        // A deleted account.
        let (gone, gone_tokens) = app.signed_in("gone@example.com").await;
        let mut gone_streams = open_all(&app, &gone_tokens.access_token).await;
        app.commands()
            .await
            .delete_user(authed(pb::DeleteUserRequest { id: gone.id.clone() }, &admin.access_token))
            .await
            .unwrap();
        all_end(&mut gone_streams, "SESSION_ENDED", "DeleteUser").await;
        for (protocol, stream) in &mut gone_streams {
            assert_eq!(stream.next().await, Next::Closed, "{protocol:?}: nothing after the end");
        }
    }
}

/// A stream ends when its access token expires, saying where to resume, and
/// a new token resumes it there without a gap.
async fn a_stream_ends_at_token_expiry_and_resumes_with_a_new_token(backend: Backend) {
    let app = spawn_app_with(backend, |config| config.access_token_ttl_seconds = 2).await;
    for protocol in PROTOCOLS {
        let email = format!("{protocol:?}@example.com").to_lowercase();
        let (_, tokens) = app.signed_in(&email).await;
        let mut stream = open(&app, protocol, &tokens.access_token, 0).await;
        let (seen, ended) = stream.ending(Duration::from_secs(10)).await;
        assert_eq!(
            seen,
            ["identity.user.registered", "identity.user.logged_in"],
            "{protocol:?}"
        );
        let Next::Ended { code, reason, resume } = ended else {
            panic!("{protocol:?}: {ended:?}");
        };
        assert!(code.eq_ignore_ascii_case("unauthenticated"), "{protocol:?}: {code}");
        assert_eq!(reason, "ACCESS_TOKEN_EXPIRED", "{protocol:?}");
        let resume = resume.expect("a cursor");
        assert!(resume >= 2, "{protocol:?}: resume after {resume}");
        // A fresh token picks up after the cursor: the next event is new.
        let fresh = app.login(&email).await;
        let mut resumed = open(&app, protocol, &fresh.access_token, resume).await;
        let sequence = resumed.expect_event("identity.user.logged_in").await;
        assert_eq!(sequence, resume + 1, "{protocol:?}: nothing lost, nothing twice");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expiry_sqlite() {
    a_stream_ends_at_token_expiry_and_resumes_with_a_new_token(Backend::Sqlite).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs PostgreSQL (KEEL_TEST_DATABASE_URL); run with --include-ignored"]
async fn expiry_postgres() {
    a_stream_ends_at_token_expiry_and_resumes_with_a_new_token(Backend::Postgres).await;
}

/// A logout through one keel process ends the streams open on another.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs PostgreSQL (KEEL_TEST_DATABASE_URL) and Redis (KEEL_TEST_REDIS_URL); run with --include-ignored"]
async fn a_session_ended_on_one_process_ends_its_streams_on_another() {
    let redis = keel_testkit::redis_url();
    let first = spawn_app_with(Backend::Postgres, move |config| {
        config.redis_url = Some(keel_server::config::Secret::new(redis));
    })
    .await;
    let second = keel_testkit::second_process(&first).await;
    let (_, tokens) = first.signed_in("ada@example.com").await;
    let mut streams = open_all(&second, &tokens.access_token).await;
    first
        .commands()
        .await
        .logout(authed(pb::LogoutRequest {}, &tokens.access_token))
        .await
        .unwrap();
    all_end(&mut streams, "SESSION_ENDED", "logout on another process").await;
}
