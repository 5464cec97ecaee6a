//! Idempotency keys, end to end: REST and gRPC, SQLite and PostgreSQL, and
//! a keel process killed between a command's commit and its answer.

#![allow(clippy::unwrap_used)]

use std::time::{Duration, Instant};

use keel_proto::identity as pb;
use keel_proto::identity::identity_command_service_client::IdentityCommandServiceClient;
use keel_proto::identity::identity_query_service_client::IdentityQueryServiceClient;
use keel_testkit::{Backend, KeelProcess, PASSWORD, TestApp, authed, backend_tests, spawn_app_with};
use serde_json::{Value, json};
use tonic::transport::Channel;

const CREATE_USER: &str = "/keel.identity.v1.IdentityCommandService/CreateUser";

/// One REST call: status, headers and the JSON body.
async fn rest(
    origin: &str,
    path: &str,
    token: &str,
    key: Option<&str>,
    body: &Value,
) -> (http::StatusCode, http::HeaderMap, Value) {
    use http_body_util::BodyExt;
    let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .build_http::<http_body_util::Full<bytes::Bytes>>();
    let mut request = http::Request::builder()
        .method("POST")
        .uri(format!("{origin}{path}"))
        .header("content-type", "application/json")
        .header("authorization", format!("Bearer {token}"));
    if let Some(key) = key {
        request = request.header("idempotency-key", key);
    }
    let response = client
        .request(request.body(body.to_string().into()).unwrap())
        .await
        .unwrap();
    let (parts, body) = response.into_parts();
    let bytes = body.collect().await.unwrap().to_bytes();
    let json = if bytes.is_empty() {
        Value::Null
    } else {
        serde_json::from_slice(&bytes).unwrap()
    };
    (parts.status, parts.headers, json)
}

fn new_user(email: &str) -> Value {
    json!({"email": email, "password": PASSWORD, "displayName": "Made"})
}

fn replayed(headers: &http::HeaderMap) -> bool {
    headers.get("idempotent-replayed").is_some_and(|value| value == "true")
}

/// How many accounts have an email starting with `prefix`.
async fn users_named(channel: Channel, token: &str, prefix: &str) -> usize {
    IdentityQueryServiceClient::new(channel)
        .list_users(authed(
            pb::ListUsersRequest {
                page_size: 100,
                query: prefix.to_owned(),
                ..Default::default()
            },
            token,
        ))
        .await
        .unwrap()
        .into_inner()
        .users
        .len()
}

fn keyed<T>(message: T, token: &str, key: &str) -> tonic::Request<T> {
    let mut request = authed(message, token);
    request.metadata_mut().insert("idempotency-key", key.parse().unwrap());
    request
}

/// 50 identical POSTs at once with one key: one account, one body; every
/// other answer is that body replayed or ABORTED (the first still running).
async fn fifty_identical_posts_make_one_effect(app: TestApp) {
    let (_, admin) = app.admin("first-admin@example.com").await;
    let origin = app.endpoint();
    let body = new_user("parallel@example.com");
    let calls = (0..50).map(|_| {
        let (origin, token, body) = (origin.clone(), admin.access_token.clone(), body.clone());
        tokio::spawn(async move { rest(&origin, "/v1/users", &token, Some("order-1"), &body).await })
    });
    let answers = futures::future::join_all(calls).await;
    let mut bodies = Vec::new();
    let (mut fresh, mut replays, mut in_flight) = (0, 0, 0);
    for answer in answers {
        let (status, headers, json) = answer.unwrap();
        match status.as_u16() {
            201 => {
                if replayed(&headers) {
                    replays += 1;
                } else {
                    fresh += 1;
                }
                bodies.push(json["data"].clone());
            }
            409 => {
                assert_eq!(json["error"]["code"], "ABORTED", "{json}");
                in_flight += 1;
            }
            other => panic!("unexpected {other}: {json}"),
        }
    }
    assert_eq!(fresh, 1, "replays {replays}, in flight {in_flight}");
    assert_eq!(fresh + replays + in_flight, 50);
    assert!(bodies.windows(2).all(|pair| pair[0] == pair[1]), "{bodies:?}");
    assert_eq!(bodies[0]["user"]["email"], "parallel@example.com");
    assert_eq!(
        users_named(app.channel().await, &admin.access_token, "parallel@").await,
        1
    );

    // After the first finished, a repeat is a replay of the same body.
    let (status, headers, json) = rest(&origin, "/v1/users", &admin.access_token, Some("order-1"), &body).await;
    assert_eq!(status, 201);
    assert!(replayed(&headers));
    assert_eq!(json["data"], bodies[0]);

    // The same key with another request: 422, nothing created.
    let changed = new_user("changed@example.com");
    let (status, headers, json) = rest(&origin, "/v1/users", &admin.access_token, Some("order-1"), &changed).await;
    assert_eq!(status, 422, "{json}");
    assert!(!replayed(&headers));
    assert_eq!(json["error"]["code"], "FAILED_PRECONDITION");
    assert!(
        json["error"]["message"].as_str().unwrap().contains("different request"),
        "{json}"
    );
    assert_eq!(
        users_named(app.channel().await, &admin.access_token, "changed@").await,
        0
    );

    // Another caller's same key is theirs alone: their own result.
    let (_, other) = app.admin("second-admin@example.com").await;
    let theirs = new_user("theirs@example.com");
    let (status, headers, json) = rest(&origin, "/v1/users", &other.access_token, Some("order-1"), &theirs).await;
    assert_eq!(status, 201, "{json}");
    assert!(!replayed(&headers));
    assert_eq!(json["data"]["user"]["email"], "theirs@example.com");

    // A command that fails rolls back and leaves no record: its retry runs
    // again (and fails again), it is not replayed.
    for _ in 0..2 {
        let taken = new_user("parallel@example.com");
        let (status, headers, json) = rest(&origin, "/v1/users", &other.access_token, Some("taken-1"), &taken).await;
        assert_eq!(status, 409, "{json}");
        assert_eq!(json["error"]["code"], "ALREADY_EXISTS");
        assert!(!replayed(&headers));
    }

    // Keys are 1..=255 printable ASCII characters.
    for bad in ["x".repeat(256), "tab\there".to_owned()] {
        let (status, _, json) = rest(&origin, "/v1/users", &admin.access_token, Some(&bad), &body).await;
        assert_eq!(status, 400, "{json}");
        assert_eq!(json["error"]["code"], "INVALID_ARGUMENT");
    }
}

/// The same over native gRPC: metadata in, `idempotent-replayed` out,
/// ABORTED while in flight, FAILED_PRECONDITION (IDEMPOTENCY_KEY_REUSED)
/// for another request.
async fn the_same_over_grpc(app: TestApp) {
    use tonic_types::StatusExt;
    let (_, admin) = app.admin("grpc-admin@example.com").await;
    let channel = app.channel().await;
    let request = pb::CreateUserRequest {
        email: "grpc-made@example.com".into(),
        password: PASSWORD.into(),
        display_name: "Made".into(),
        role: 0,
    };
    let calls = (0..50).map(|_| {
        let (channel, token, request) = (channel.clone(), admin.access_token.clone(), request.clone());
        tokio::spawn(async move {
            IdentityCommandServiceClient::new(channel)
                .create_user(keyed(request, &token, "grpc-1"))
                .await
        })
    });
    let (mut fresh, mut replays, mut in_flight) = (0, 0, 0);
    let mut users = Vec::new();
    for answer in futures::future::join_all(calls).await {
        match answer.unwrap() {
            Ok(response) => {
                if response
                    .metadata()
                    .get("idempotent-replayed")
                    .is_some_and(|value| value == "true")
                {
                    replays += 1;
                } else {
                    fresh += 1;
                }
                users.push(response.into_inner().user.unwrap());
            }
            Err(status) => {
                assert_eq!(status.code(), tonic::Code::Aborted, "{status:?}");
                in_flight += 1;
            }
        }
    }
    assert_eq!(fresh, 1, "replays {replays}, in flight {in_flight}");
    assert!(users.windows(2).all(|pair| pair[0] == pair[1]));
    assert_eq!(users_named(channel.clone(), &admin.access_token, "grpc-made@").await, 1);

    let changed = pb::CreateUserRequest {
        email: "grpc-changed@example.com".into(),
        ..request.clone()
    };
    let status = IdentityCommandServiceClient::new(channel.clone())
        .create_user(keyed(changed, &admin.access_token, "grpc-1"))
        .await
        .unwrap_err();
    assert_eq!(status.code(), tonic::Code::FailedPrecondition, "{status:?}");
    assert_eq!(
        status.get_details_error_info().map(|info| info.reason),
        Some("IDEMPOTENCY_KEY_REUSED".to_owned())
    );

    // The key is the same over REST and gRPC: the REST retry of the gRPC
    // request is a replay.
    let (status, headers, json) = rest(
        &app.endpoint(),
        "/v1/users",
        &admin.access_token,
        Some("grpc-1"),
        &new_user("grpc-made@example.com"),
    )
    .await;
    assert_eq!(status, 201, "{json}");
    assert!(replayed(&headers));
    assert_eq!(json["data"]["user"]["id"], users[0].id);
}

backend_tests! {
    async fn fifty_parallel_identical_posts_make_one_effect(app: TestApp) {
        fifty_identical_posts_make_one_effect(app).await;
    }

    async fn grpc_keys_replay_abort_and_refuse_like_rest(app: TestApp) {
        the_same_over_grpc(app).await;
    }
}

/// Two keel processes on one PostgreSQL: duplicates sent to both at once
/// make one effect. The other process's duplicates meet the advisory lock
/// (ABORTED at once) or, after the commit, the record (a replay).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs PostgreSQL (KEEL_TEST_DATABASE_URL); run with --include-ignored"]
async fn postgres_two_processes_share_the_keys() {
    let first = keel_testkit::spawn_app(Backend::Postgres).await;
    let second = keel_testkit::second_process(&first).await;
    let (_, admin) = first.admin("cluster-admin@example.com").await;
    let body = new_user("cluster@example.com");
    let calls = (0..40).map(|index| {
        let origin = if index % 2 == 0 {
            first.endpoint()
        } else {
            second.endpoint()
        };
        let (token, body) = (admin.access_token.clone(), body.clone());
        tokio::spawn(async move { rest(&origin, "/v1/users", &token, Some("cluster-1"), &body).await })
    });
    let mut fresh = 0;
    let mut ids = std::collections::HashSet::new();
    for answer in futures::future::join_all(calls).await {
        let (status, headers, json) = answer.unwrap();
        match status.as_u16() {
            201 => {
                fresh += usize::from(!replayed(&headers));
                ids.insert(json["data"]["user"]["id"].as_str().unwrap().to_owned());
            }
            409 => assert_eq!(json["error"]["code"], "ABORTED", "{json}"),
            other => panic!("unexpected {other}: {json}"),
        }
    }
    assert_eq!(fresh, 1);
    assert_eq!(ids.len(), 1);
    assert_eq!(
        users_named(first.channel().await, &admin.access_token, "cluster@").await,
        1
    );
    // Once the first is done, the other process replays it.
    let (status, headers, _) = rest(
        &second.endpoint(),
        "/v1/users",
        &admin.access_token,
        Some("cluster-1"),
        &body,
    )
    .await;
    assert_eq!(status, 201);
    assert!(replayed(&headers));
}

/// A method configured to need a key refuses a call without one (400 /
/// INVALID_ARGUMENT) and runs one with it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_method_that_requires_a_key_refuses_a_call_without_one() {
    let app = spawn_app_with(Backend::Sqlite, |config| {
        config.idempotency_required_methods = Some(CREATE_USER.to_owned());
    })
    .await;
    let (_, admin) = app.admin("required-admin@example.com").await;
    let body = new_user("required@example.com");
    let (status, _, json) = rest(&app.endpoint(), "/v1/users", &admin.access_token, None, &body).await;
    assert_eq!(status, 400, "{json}");
    assert_eq!(json["error"]["code"], "INVALID_ARGUMENT");
    assert!(
        json["error"]["message"].as_str().unwrap().contains("idempotency"),
        "{json}"
    );
    let status = IdentityCommandServiceClient::new(app.channel().await)
        .create_user(authed(
            pb::CreateUserRequest {
                email: "required@example.com".into(),
                password: PASSWORD.into(),
                display_name: "Made".into(),
                role: 0,
            },
            &admin.access_token,
        ))
        .await
        .unwrap_err();
    assert_eq!(status.code(), tonic::Code::InvalidArgument);
    let (status, _, json) = rest(&app.endpoint(), "/v1/users", &admin.access_token, Some("req-1"), &body).await;
    assert_eq!(status, 201, "{json}");
    // Other methods are not affected.
    assert!(app.current_user(&admin.access_token).await.is_ok());
}

/// Records expire after the configured window and are pruned.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expired_records_no_longer_answer_and_are_pruned() {
    let app = spawn_app_with(Backend::Sqlite, |config| {
        config.idempotency_ttl_seconds = 1;
    })
    .await;
    let (_, admin) = app.admin("ttl-admin@example.com").await;
    let origin = app.endpoint();
    let (status, _, first) = rest(
        &origin,
        "/v1/users",
        &admin.access_token,
        Some("ttl-1"),
        &new_user("ttl@example.com"),
    )
    .await;
    assert_eq!(status, 201, "{first}");
    // Past the window, the key is free again: another request under it runs.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (status, headers, json) = rest(
            &origin,
            "/v1/users",
            &admin.access_token,
            Some("ttl-1"),
            &new_user("ttl-next@example.com"),
        )
        .await;
        if status == 201 {
            assert!(!replayed(&headers));
            break;
        }
        assert_eq!(status, 422, "{json}");
        assert!(Instant::now() < deadline, "the record never expired");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // Pruning deletes what expired.
    let later = chrono::Utc::now() + chrono::Duration::seconds(5);
    let pruned = keel_kernel::idempotency::prune_expired(&app.state.db, later)
        .await
        .unwrap();
    assert!(pruned >= 1, "{pruned}");
}

// --- a keel process killed between commit and answer -----------------------

async fn start(env: &[(&str, String)]) -> KeelProcess {
    KeelProcess::start(env!("CARGO_BIN_EXE_keel"), env).await
}

/// The process dies right after the keyed command commits, before it
/// answers; the retry with the same key, on a fresh process, gets the
/// committed result and creates nothing twice.
async fn a_crash_between_commit_and_answer(database: &[(&str, String)]) {
    let mut env = database.to_vec();
    env.push(("KEEL_TEST_ABORT_AFTER_COMMIT", "identity.create_user".to_owned()));
    let mut doomed = start(&env).await;
    let token = doomed.admin_token().await;
    let body = new_user("crash@example.com");
    let origin = doomed.url();
    let call = tokio::spawn(async move {
        use http_body_util::BodyExt;
        let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
            .build_http::<http_body_util::Full<bytes::Bytes>>();
        let request = http::Request::builder()
            .method("POST")
            .uri(format!("{origin}/v1/users"))
            .header("content-type", "application/json")
            .header("authorization", format!("Bearer {token}"))
            .header("idempotency-key", "crash-1")
            .body(body.to_string().into())
            .unwrap();
        match client.request(request).await {
            Ok(response) => Some((response.status(), response.into_body().collect().await.is_ok())),
            Err(_) => None,
        }
    });
    let status = doomed.exited().await;
    assert!(!status.success(), "{status:?}");
    let answer = call.await.unwrap();
    assert!(
        answer.is_none() || answer.is_some_and(|(_, complete)| !complete),
        "the caller got an answer: {answer:?}"
    );
    drop(doomed);

    let keel = start(database).await;
    let token = keel.admin_token().await;
    let (status, headers, json) = rest(
        &keel.url(),
        "/v1/users",
        &token,
        Some("crash-1"),
        &new_user("crash@example.com"),
    )
    .await;
    assert_eq!(status, 201, "{json}");
    assert!(replayed(&headers), "the committed result is replayed, not run again");
    assert_eq!(json["data"]["user"]["email"], "crash@example.com");
    assert_eq!(users_named(keel.channel().await, &token, "crash@").await, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_a_crash_between_commit_and_answer_is_replayed_on_retry() {
    let data = tempfile::Builder::new()
        .permissions(std::os::unix::fs::PermissionsExt::from_mode(0o700))
        .tempdir()
        .unwrap();
    a_crash_between_commit_and_answer(&[("KEEL_DATA_DIR", data.path().display().to_string())]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs PostgreSQL (KEEL_TEST_DATABASE_URL); run with --include-ignored"]
async fn postgres_a_crash_between_commit_and_answer_is_replayed_on_retry() {
    let url = keel_testkit::postgres_url();
    let schema = keel_testkit::create_schema(&url).await;
    let data = tempfile::Builder::new()
        .permissions(std::os::unix::fs::PermissionsExt::from_mode(0o700))
        .tempdir()
        .unwrap();
    a_crash_between_commit_and_answer(&[
        ("KEEL_DATA_DIR", data.path().display().to_string()),
        ("KEEL_DATABASE_URL", url.clone()),
        ("KEEL_DATABASE_SCHEMA", schema.clone()),
    ])
    .await;
    keel_testkit::drop_schema(url, schema);
}
