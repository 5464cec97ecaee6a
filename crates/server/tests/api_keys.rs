//! API keys for internal services: an admin creates one, it works as
//! `authorization: Bearer keel_...` over gRPC, grpc-web, REST and Connect,
//! is listed without its secret, and is refused at once when revoked or
//! expired. Only admins manage keys; the secret never reaches a log.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::Write;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use keel_proto::identity as pb;
use keel_proto::identity::identity_query_service_client::IdentityQueryServiceClient;
use keel_testkit::{Backend, TestApp, authed, spawn_app, spawn_app_with};
use tonic::Code;

/// Everything every server of this test binary logs, at debug (SQL
/// statements included), as JSON lines.
fn captured_logs() -> &'static Arc<Mutex<Vec<u8>>> {
    static LOGS: OnceLock<Arc<Mutex<Vec<u8>>>> = OnceLock::new();
    LOGS.get_or_init(|| {
        let logs = Arc::new(Mutex::new(Vec::new()));
        let sink = logs.clone();
        tracing_subscriber::fmt()
            .json()
            .with_span_list(true)
            .with_env_filter(tracing_subscriber::EnvFilter::new(
                "debug,h2=info,hyper=info,hyper_util=info,tower=info,tonic=info",
            ))
            .with_writer(move || Sink(sink.clone()))
            .init();
        logs
    })
}

struct Sink(Arc<Mutex<Vec<u8>>>);

impl Write for Sink {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

fn logs_text() -> String {
    String::from_utf8_lossy(&captured_logs().lock().unwrap()).into_owned()
}

async fn create_key(
    app: &TestApp,
    token: &str,
    name: &str,
    role: pb::Role,
    expires_at: Option<prost_types::Timestamp>,
) -> Result<pb::CreateApiKeyResponse, tonic::Status> {
    app.commands()
        .await
        .create_api_key(authed(
            pb::CreateApiKeyRequest {
                name: name.to_owned(),
                role: role as i32,
                expires_at,
            },
            token,
        ))
        .await
        .map(tonic::Response::into_inner)
}

async fn list_keys(app: &TestApp, token: &str) -> Result<pb::ListApiKeysResponse, tonic::Status> {
    app.queries()
        .await
        .list_api_keys(authed(pb::ListApiKeysRequest::default(), token))
        .await
        .map(tonic::Response::into_inner)
}

/// An HTTP/1.1 call: its status and body.
async fn http_call(app: &TestApp, method: &str, path: &str, token: &str, body: Option<&str>) -> (u16, String) {
    let client = Client::builder(TokioExecutor::new()).build_http::<Full<Bytes>>();
    let mut builder = http::Request::builder()
        .method(method)
        .uri(format!("{}{path}", app.endpoint()))
        .header("authorization", format!("Bearer {token}"));
    if body.is_some() {
        builder = builder
            .header("content-type", "application/json")
            .header("connect-protocol-version", "1");
    }
    let request = builder
        .body(Full::new(Bytes::from(body.unwrap_or_default().to_owned())))
        .unwrap();
    let response = client.request(request).await.unwrap();
    let status = response.status().as_u16();
    let body = response.into_body().collect().await.unwrap().to_bytes();
    (status, String::from_utf8_lossy(&body).into_owned())
}

/// `ListApiKeys` with `token` over the four protocols: each reply (as
/// text) or status code (gRPC's, or HTTP's).
async fn list_over_every_protocol(app: &TestApp, token: &str) -> Vec<(&'static str, Result<String, String>)> {
    let grpc = list_keys(app, token)
        .await
        .map(|reply| format!("{reply:?}"))
        .map_err(|status| format!("{:?}", status.code()));
    let grpc_web = IdentityQueryServiceClient::new(app.grpc_web())
        .list_api_keys(authed(pb::ListApiKeysRequest::default(), token))
        .await
        .map(|reply| format!("{:?}", reply.into_inner()))
        .map_err(|status| format!("{:?}", status.code()));
    let http = |(status, body): (u16, String)| {
        if status == 200 {
            Ok(body)
        } else {
            Err(status.to_string())
        }
    };
    let rest = http(http_call(app, "GET", "/v1/api-keys", token, None).await);
    let connect = http(
        http_call(
            app,
            "POST",
            "/keel.identity.v1.IdentityQueryService/ListApiKeys",
            token,
            Some("{}"),
        )
        .await,
    );
    vec![
        ("grpc", grpc),
        ("grpc-web", grpc_web),
        ("rest", rest),
        ("connect", connect),
    ]
}

fn assert_refused_everywhere(outcomes: &[(&str, Result<String, String>)], when: &str) {
    for (protocol, outcome) in outcomes {
        let code = outcome
            .as_ref()
            .expect_err(&format!("{protocol} accepted the key {when}"));
        assert!(code == "Unauthenticated" || code == "401", "{protocol} {when}: {code}");
    }
}

async fn the_main_flow(app: TestApp) {
    let (_, admin) = app.admin("root@example.com").await;
    let created = create_key(&app, &admin.access_token, "billing-worker", pb::Role::Admin, None)
        .await
        .unwrap();
    let key = created.key.clone();
    let listed_key = created.api_key.clone().unwrap();
    let prefix = format!("keel_{}_", listed_key.id.replace('-', ""));
    assert_eq!(listed_key.prefix, prefix);
    assert!(key.starts_with(&prefix), "{key}");
    let secret = key.strip_prefix(&prefix).unwrap().to_owned();
    assert!(secret.len() >= 43, "256 bits, base64url: {secret}");
    assert_eq!(listed_key.role, pb::Role::Admin as i32);
    assert!(listed_key.last_used_at.is_none() && listed_key.revoked_at.is_none());

    // The key works on all four protocols, and no reply shows its secret.
    let mut replies = String::new();
    for (protocol, outcome) in list_over_every_protocol(&app, &key).await {
        let body = outcome.unwrap_or_else(|code| panic!("{protocol} refused the key: {code}"));
        assert!(body.contains("billing-worker"), "{protocol}: {body}");
        replies.push_str(&body);
    }
    assert!(!replies.contains(&secret), "a reply carried the secret");

    // Listed with its prefix, name, role and last use; the last use is
    // written once, not on every call.
    let listed = list_keys(&app, &admin.access_token).await.unwrap();
    let found = listed.api_keys.iter().find(|k| k.id == listed_key.id).unwrap();
    assert_eq!(found.name, "billing-worker");
    assert_eq!(found.prefix, prefix);
    let last_used = found.last_used_at.expect("last_used_at after use");
    list_keys(&app, &key).await.unwrap();
    let again = list_keys(&app, &admin.access_token).await.unwrap();
    let found = again.api_keys.iter().find(|k| k.id == listed_key.id).unwrap();
    assert_eq!(
        found.last_used_at,
        Some(last_used),
        "last_used_at was written again within the minute"
    );
    assert!(!format!("{again:?}").contains(&secret));

    // The principal is the key's own: stable, the key's id.
    let (status, body) = http_call(&app, "GET", "/v1/sessions", &key, None).await;
    assert_eq!(status, 200, "{body}");

    // A wrong secret behind a valid prefix, and a malformed key.
    let wrong = format!("{prefix}{}", "A".repeat(43));
    assert_refused_everywhere(&list_over_every_protocol(&app, &wrong).await, "with a wrong secret");
    assert_refused_everywhere(&list_over_every_protocol(&app, "keel_nothing").await, "malformed");

    // Revoked: refused at once (the key was cached by the calls above).
    app.commands()
        .await
        .revoke_api_key(authed(
            pb::RevokeApiKeyRequest {
                id: listed_key.id.clone(),
            },
            &admin.access_token,
        ))
        .await
        .unwrap();
    assert_refused_everywhere(&list_over_every_protocol(&app, &key).await, "after revocation");
    let listed = list_keys(&app, &admin.access_token).await.unwrap();
    let found = listed.api_keys.iter().find(|k| k.id == listed_key.id).unwrap();
    assert!(found.revoked_at.is_some());

    // Nothing logged the key or its secret (the capture works: it holds
    // the creation).
    let logs = logs_text();
    assert!(logs.contains(&listed_key.id), "the log capture saw nothing of the key");
    assert!(!logs.contains(&secret), "the secret reached the log");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_works_everywhere_until_revoked_on_sqlite() {
    captured_logs();
    the_main_flow(spawn_app(Backend::Sqlite).await).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs PostgreSQL (KEEL_TEST_DATABASE_URL); run with --include-ignored"]
async fn a_key_works_everywhere_until_revoked_on_postgres() {
    captured_logs();
    the_main_flow(spawn_app(Backend::Postgres).await).await;
}

/// An API key is rate limited as its own service account: its calls use
/// its allowance, not its creator's, nor another key's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_is_rate_limited_as_its_service_account() {
    captured_logs();
    let app = spawn_app_with(Backend::Sqlite, |config| {
        config.rate_limits = keel_server::limit::RateLimitsSetting::Text(
            "keel.identity.v1.IdentityQueryService/ListApiKeys=2/600".to_owned(),
        );
    })
    .await;
    let (_, admin) = app.admin("root@example.com").await;
    let first = create_key(&app, &admin.access_token, "first", pb::Role::Admin, None)
        .await
        .unwrap()
        .key;
    let second = create_key(&app, &admin.access_token, "second", pb::Role::Admin, None)
        .await
        .unwrap()
        .key;
    for _ in 0..2 {
        list_keys(&app, &first).await.unwrap();
    }
    let refused = list_keys(&app, &first).await.unwrap_err();
    assert_eq!(refused.code(), Code::ResourceExhausted, "{refused:?}");
    list_keys(&app, &second)
        .await
        .expect("another key has its own allowance");
    list_keys(&app, &admin.access_token)
        .await
        .expect("the admin who made the key has their own allowance");
}

/// A keyed retry of CreateApiKey makes no second key: the first reply
/// showed the secret once and is not stored, so the retry is refused with
/// ALREADY_EXISTS (409 over REST); a new key makes a new API key.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_keyed_retry_of_create_api_key_makes_no_second_key() {
    captured_logs();
    let app = spawn_app(Backend::Sqlite).await;
    let (_, admin) = app.admin("root@example.com").await;
    let create = |idempotency_key: &'static str| {
        let app = &app;
        let token = admin.access_token.clone();
        async move {
            let mut request = authed(
                pb::CreateApiKeyRequest {
                    name: "mailer".to_owned(),
                    role: pb::Role::User as i32,
                    expires_at: None,
                },
                &token,
            );
            request
                .metadata_mut()
                .insert("idempotency-key", idempotency_key.parse().unwrap());
            app.commands()
                .await
                .create_api_key(request)
                .await
                .map(tonic::Response::into_inner)
        }
    };
    let first = create("mailer-1").await.unwrap();
    assert!(first.key.starts_with("keel_"));
    let retry = create("mailer-1").await.unwrap_err();
    assert_eq!(retry.code(), Code::AlreadyExists, "{retry:?}");
    assert!(retry.message().contains("shown only once"), "{}", retry.message());
    assert!(!retry.message().contains(&first.key));
    let (status, body) = {
        let client = Client::builder(TokioExecutor::new()).build_http::<Full<Bytes>>();
        let request = http::Request::builder()
            .method("POST")
            .uri(format!("{}/v1/api-keys", app.endpoint()))
            .header("authorization", format!("Bearer {}", admin.access_token))
            .header("content-type", "application/json")
            .header("idempotency-key", "mailer-1")
            .body(Full::new(Bytes::from_static(
                br#"{"name":"mailer","role":"ROLE_USER"}"#,
            )))
            .unwrap();
        let response = client.request(request).await.unwrap();
        let status = response.status().as_u16();
        let body = response.into_body().collect().await.unwrap().to_bytes();
        (status, String::from_utf8_lossy(&body).into_owned())
    };
    assert_eq!(status, 409, "{body}");
    let listed = list_keys(&app, &admin.access_token).await.unwrap();
    assert_eq!(
        listed.api_keys.iter().filter(|key| key.name == "mailer").count(),
        1,
        "{listed:?}"
    );
    create("mailer-2").await.unwrap();
    let listed = list_keys(&app, &admin.access_token).await.unwrap();
    assert_eq!(listed.api_keys.iter().filter(|key| key.name == "mailer").count(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_expired_key_is_refused() {
    captured_logs();
    let app = spawn_app(Backend::Sqlite).await;
    let (_, admin) = app.admin("root@example.com").await;
    let past = keel_kernel::grpc::timestamp(chrono::Utc::now() - chrono::Duration::seconds(1));
    let refused = create_key(&app, &admin.access_token, "late", pb::Role::User, Some(past))
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::InvalidArgument);

    let expires_at = chrono::Utc::now() + chrono::Duration::seconds(2);
    let created = create_key(
        &app,
        &admin.access_token,
        "short-lived",
        pb::Role::Admin,
        Some(keel_kernel::grpc::timestamp(expires_at)),
    )
    .await
    .unwrap();
    list_keys(&app, &created.key).await.unwrap();
    // Refused from its expiry on, although it is remembered.
    let deadline = expires_at + chrono::Duration::seconds(10);
    loop {
        let before = chrono::Utc::now();
        match list_keys(&app, &created.key).await {
            Ok(_) => assert!(before < expires_at, "accepted after its expiry"),
            Err(status) => {
                assert_eq!(status.code(), Code::Unauthenticated);
                assert!(
                    chrono::Utc::now() >= expires_at,
                    "refused before its expiry: {status:?}"
                );
                break;
            }
        }
        assert!(chrono::Utc::now() < deadline, "never refused");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_refused_everywhere(&list_over_every_protocol(&app, &created.key).await, "after expiry");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_admins_manage_keys() {
    captured_logs();
    let app = spawn_app(Backend::Sqlite).await;
    let (_, admin) = app.admin("root@example.com").await;
    let (_, user) = app.signed_in("ada@example.com").await;
    let created = create_key(&app, &admin.access_token, "reader", pb::Role::User, None)
        .await
        .unwrap();

    // A user, and a key with the user role, are refused every key call.
    for token in [&user.access_token, &created.key] {
        let create = create_key(&app, token, "mine", pb::Role::Admin, None)
            .await
            .unwrap_err();
        assert_eq!(create.code(), Code::PermissionDenied);
        assert_eq!(list_keys(&app, token).await.unwrap_err().code(), Code::PermissionDenied);
        let revoke = app
            .commands()
            .await
            .revoke_api_key(authed(
                pb::RevokeApiKeyRequest {
                    id: created.api_key.clone().unwrap().id,
                },
                token,
            ))
            .await
            .unwrap_err();
        assert_eq!(revoke.code(), Code::PermissionDenied);
        let (status, _) = http_call(&app, "GET", "/v1/api-keys", token, None).await;
        assert_eq!(status, 403);
    }
    // The user-role key still works for what a user may do.
    let (status, body) = http_call(&app, "GET", "/v1/sessions", &created.key, None).await;
    assert_eq!(status, 200, "{body}");
    // Without a caller: UNAUTHENTICATED.
    let anonymous = app
        .queries()
        .await
        .list_api_keys(pb::ListApiKeysRequest::default())
        .await
        .unwrap_err();
    assert_eq!(anonymous.code(), Code::Unauthenticated);
    // An unknown id is NOT_FOUND for an admin.
    let unknown = app
        .commands()
        .await
        .revoke_api_key(authed(
            pb::RevokeApiKeyRequest {
                id: keel_kernel::id::new_id().to_string(),
            },
            &admin.access_token,
        ))
        .await
        .unwrap_err();
    assert_eq!(unknown.code(), Code::NotFound);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs PostgreSQL (KEEL_TEST_DATABASE_URL) and Redis (KEEL_TEST_REDIS_URL); run with --include-ignored"]
async fn a_key_revoked_on_one_process_is_refused_by_another_at_once() {
    captured_logs();
    let redis = keel_testkit::redis_url();
    let first = spawn_app_with(Backend::Postgres, move |config| {
        config.redis_url = Some(keel_server::config::Secret::new(redis));
    })
    .await;
    let second = keel_testkit::second_process(&first).await;
    let (_, admin) = first.admin("root@example.com").await;
    let created = create_key(&first, &admin.access_token, "worker", pb::Role::Admin, None)
        .await
        .unwrap();
    // The second process remembers the key.
    list_keys(&second, &created.key).await.unwrap();
    list_keys(&second, &created.key).await.unwrap();
    first
        .commands()
        .await
        .revoke_api_key(authed(
            pb::RevokeApiKeyRequest {
                id: created.api_key.unwrap().id,
            },
            &admin.access_token,
        ))
        .await
        .unwrap();
    assert_refused_everywhere(
        &list_over_every_protocol(&second, &created.key).await,
        "on the other process",
    );
}
