//! Rate limits: one contract suite over both limiters (in process, Redis),
//! the fallback while Redis is unreachable, one allowance shared by two
//! keels on one Redis, and what callers see when refused (REST: 429 with
//! `Retry-After`, `RateLimit-Policy` and `RateLimit`; gRPC:
//! RESOURCE_EXHAUSTED with `google.rpc.RetryInfo`).

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use keel_kernel::limit::{InProcessRateLimiter, Quota, RateLimiter};
use keel_proto::identity as pb;
use keel_server::config::Secret;
use keel_server::limit::{Fallback, RateLimitsSetting, RedisRateLimiter, SharedRateLimiter};
use keel_testkit::{Backend, TestApp, authed, spawn_app_with};
use tonic_types::StatusExt;

const CURRENT_USER: &str = "keel.identity.v1.IdentityQueryService/GetCurrentUser";

/// What every limiter promises, on keys under `prefix` (fresh per run).
async fn contract(limiter: Arc<dyn RateLimiter>, prefix: &str) {
    let quota = Quota::new(3, Duration::from_secs(20));
    let key = format!("{prefix}:a");
    // A burst, counted down; then a refusal that says when to come back.
    for expected_remaining in [2, 1, 0] {
        let decision = limiter.check(&key, quota).await.unwrap();
        assert!(decision.allowed);
        assert_eq!(decision.remaining, expected_remaining);
        let used = 3 - expected_remaining;
        let whole_again = quota.period * used;
        assert!(
            decision.reset <= whole_again && decision.reset > whole_again - Duration::from_secs(2),
            "{decision:?}"
        );
    }
    let refused = limiter.check(&key, quota).await.unwrap();
    assert!(!refused.allowed);
    assert_eq!(refused.remaining, 0);
    assert!(
        refused.retry_after > Duration::from_secs(17) && refused.retry_after <= Duration::from_secs(20),
        "{refused:?}"
    );
    assert!(
        refused.reset >= refused.retry_after + Duration::from_secs(39),
        "{refused:?}"
    );
    // `acquire` refuses with about the same wait.
    let wait = limiter.acquire(&key, quota).await.expect_err("still refused");
    assert!(
        wait <= refused.retry_after && wait + Duration::from_secs(1) > refused.retry_after,
        "{wait:?} vs {refused:?}"
    );
    // Another key has its own allowance; another quota on the same key too.
    assert!(limiter.check(&format!("{prefix}:b"), quota).await.unwrap().allowed);

    // The allowance comes back at the pace of the quota.
    let quick = Quota::new(1, Duration::from_millis(200));
    let key = format!("{prefix}:quick");
    assert!(limiter.check(&key, quick).await.unwrap().allowed);
    let refused = limiter.check(&key, quick).await.unwrap();
    assert!(!refused.allowed && refused.retry_after <= Duration::from_millis(200));
    tokio::time::sleep(refused.retry_after + Duration::from_millis(20)).await;
    assert!(limiter.check(&key, quick).await.unwrap().allowed);

    // Callers at once never get more than the burst between them.
    let key = format!("{prefix}:concurrent");
    let quota = Quota::new(10, Duration::from_secs(60));
    let calls = (0..50).map(|_| {
        let limiter = limiter.clone();
        let key = key.clone();
        tokio::spawn(async move { limiter.check(&key, quota).await.unwrap().allowed })
    });
    let mut allowed = 0;
    for call in calls {
        allowed += usize::from(call.await.unwrap());
    }
    assert_eq!(allowed, 10);
}

fn prefix() -> String {
    format!("test-{}", uuid::Uuid::new_v4().simple())
}

#[tokio::test]
async fn the_in_process_limiter_keeps_the_contract() {
    contract(Arc::new(InProcessRateLimiter::new()), &prefix()).await;
}

#[tokio::test]
#[ignore = "needs Redis"]
async fn the_redis_limiter_keeps_the_contract() {
    let redis = RedisRateLimiter::connect(&keel_testkit::redis_url(), &prefix()).unwrap();
    assert!(redis.connected(Duration::from_secs(5)).await, "redis never connected");
    contract(Arc::new(redis), &prefix()).await;
}

/// A hot key on two Redis limiters (two processes' worth: two connections,
/// two sets of shares): each takes shares of the allowance, so it asks
/// Redis far less than once a call, and the two together still never admit
/// more than the burst. What they hold and do not use is lost, so a little
/// less may pass, never more.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs Redis"]
async fn shares_of_a_hot_key_never_admit_more_than_its_quota() {
    let namespace = prefix();
    let connect = || {
        let redis = RedisRateLimiter::connect(&keel_testkit::redis_url(), &namespace).unwrap();
        Arc::new(redis)
    };
    let (first, second) = (connect(), connect());
    for limiter in [&first, &second] {
        assert!(limiter.connected(Duration::from_secs(5)).await, "redis never connected");
    }
    // A burst of 400 over 20 minutes: nothing comes back during the test.
    let quota = Quota::per_window(400, Duration::from_secs(1200));
    let calls = 1000;
    let tasks = (0..50).map(|task| {
        let limiter = if task % 2 == 0 { first.clone() } else { second.clone() };
        tokio::spawn(async move {
            let mut allowed = 0;
            for _ in 0..calls / 50 {
                allowed += usize::from(limiter.check("hot", quota).await.unwrap().allowed);
            }
            allowed
        })
    });
    let mut allowed = 0;
    for task in tasks {
        allowed += task.await.unwrap();
    }
    let shares = keel_server::limit::SHARE_MAX.min(400 / 16) as usize;
    assert!(allowed <= 400, "two processes let {allowed} through a burst of 400");
    assert!(
        allowed >= 400 - 2 * shares,
        "{allowed} of a burst of 400: more was lost in unused shares than two shares"
    );
    let round_trips = first.round_trips() + second.round_trips();
    assert!(
        round_trips < calls as u64 / 4,
        "{round_trips} round trips for {calls} calls: the hot key took no shares"
    );
    // Refused calls say when to come back, as without shares.
    let refused = first.check("hot", quota).await.unwrap();
    assert!(
        !refused.allowed && refused.retry_after > Duration::from_secs(1),
        "{refused:?}"
    );
}

/// A Redis URL where nothing listens.
fn closed_port_url() -> String {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    drop(listener);
    format!("redis://127.0.0.1:{port}")
}

#[tokio::test]
async fn without_redis_the_configured_fallback_answers_at_once() {
    let url = closed_port_url();
    let quota = Quota::new(2, Duration::from_secs(60));
    for (fallback, expected) in [
        (Fallback::Local, [true, true, false]),
        (Fallback::Open, [true, true, true]),
        (Fallback::Closed, [false, false, false]),
    ] {
        let limiter = SharedRateLimiter::new(RedisRateLimiter::connect(&url, "fallback").unwrap(), fallback);
        let started = std::time::Instant::now();
        let mut answers = Vec::new();
        for _ in 0..3 {
            answers.push(limiter.check("k", quota).await.unwrap().allowed);
        }
        assert_eq!(answers, expected, "{fallback:?}");
        assert!(
            started.elapsed() < Duration::from_secs(1),
            "{fallback:?}: the fallback waited"
        );
    }
}

async fn limited_app(backend: Backend, limits: &str, configure: impl FnOnce(&mut keel_server::Config)) -> TestApp {
    let limits = limits.to_owned();
    spawn_app_with(backend, move |config| {
        config.rate_limits = RateLimitsSetting::Text(limits);
        configure(config);
    })
    .await
}

async fn current_user(app: &TestApp, token: &str) -> Result<pb::User, tonic::Status> {
    app.current_user(token).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn commands_keep_working_with_redis_down_under_the_local_fallback() {
    let url = closed_port_url();
    let app = limited_app(Backend::Sqlite, &format!("{CURRENT_USER}=3/600"), |config| {
        config.redis_url = Some(Secret::new(url));
        config.rate_limit_fallback = Fallback::Local;
    })
    .await;
    // Register and login (commands, limited by the default policy and by
    // identity's sign-in limits) answer.
    let (_, tokens) = app.signed_in("down@example.com").await;
    for _ in 0..3 {
        current_user(&app, &tokens.access_token).await.unwrap();
    }
    // The process's own limiter still limits.
    let refused = current_user(&app, &tokens.access_token).await.unwrap_err();
    assert_eq!(refused.code(), tonic::Code::ResourceExhausted);
}

async fn rest_get(app: &TestApp, path: &str, token: &str) -> (http::StatusCode, http::HeaderMap, Bytes) {
    rest_get_with(app, path, token, &[]).await
}

async fn rest_get_with(
    app: &TestApp,
    path: &str,
    token: &str,
    headers: &[(&str, &str)],
) -> (http::StatusCode, http::HeaderMap, Bytes) {
    let mut request = http::Request::builder()
        .uri(format!("{}{path}", app.endpoint()))
        .header("authorization", format!("Bearer {token}"));
    for (name, value) in headers {
        request = request.header(*name, *value);
    }
    let request = request.body(Full::new(Bytes::new())).unwrap();
    let client: Client<_, Full<Bytes>> = Client::builder(TokioExecutor::new()).build_http();
    let response = client.request(request).await.unwrap();
    let (parts, body) = response.into_parts();
    (parts.status, parts.headers, body.collect().await.unwrap().to_bytes())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rest_answers_429_with_retry_after_and_the_ietf_fields() {
    let app = limited_app(Backend::Sqlite, &format!("{CURRENT_USER}=2/600"), |_| {}).await;
    let (_, tokens) = app.signed_in("rest@example.com").await;
    let policy = format!("\"{CURRENT_USER}\";q=2;w=600");

    let (status, headers, _) = rest_get(&app, "/v1/users/me", &tokens.access_token).await;
    assert_eq!(status, 200);
    assert_eq!(headers["ratelimit-policy"], policy.as_str());
    assert_eq!(headers["ratelimit"], format!("\"{CURRENT_USER}\";r=1;t=300").as_str());
    let (status, headers, _) = rest_get(&app, "/v1/users/me", &tokens.access_token).await;
    assert_eq!(status, 200);
    assert_eq!(headers["ratelimit"], format!("\"{CURRENT_USER}\";r=0;t=600").as_str());

    let (status, headers, body) = rest_get(&app, "/v1/users/me", &tokens.access_token).await;
    assert_eq!(status, 429);
    let retry_after: u64 = headers["retry-after"].to_str().unwrap().parse().unwrap();
    assert!((290..=300).contains(&retry_after), "{retry_after}");
    assert_eq!(headers["ratelimit-policy"], policy.as_str());
    assert!(
        headers["ratelimit"]
            .to_str()
            .unwrap()
            .starts_with(&format!("\"{CURRENT_USER}\";r=0;t=")),
        "{:?}",
        headers["ratelimit"]
    );
    let body: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(body["error"]["code"], "RESOURCE_EXHAUSTED");

    // Keyed by caller: another user still has their allowance.
    let (_, other) = app.signed_in("other@example.com").await;
    let (status, _, _) = rest_get(&app, "/v1/users/me", &other.access_token).await;
    assert_eq!(status, 200);

    // Counted, by method.
    let (_, _, metrics) = rest_get(&app, "/metrics", "none").await;
    let metrics = String::from_utf8(metrics.to_vec()).unwrap();
    assert!(
        metrics.contains(&format!("keel_rate_limited_total{{method=\"{CURRENT_USER}\"}} 1")),
        "{metrics}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_answers_resource_exhausted_with_retry_info() {
    let app = limited_app(Backend::Sqlite, &format!("{CURRENT_USER}=1/60"), |_| {}).await;
    let (_, tokens) = app.signed_in("grpc@example.com").await;
    let mut queries = app.queries().await;
    let allowed = queries
        .get_current_user(authed(pb::GetCurrentUserRequest {}, &tokens.access_token))
        .await
        .unwrap();
    assert_eq!(
        allowed.metadata().get("ratelimit").unwrap(),
        format!("\"{CURRENT_USER}\";r=0;t=60").as_str()
    );
    let refused = queries
        .get_current_user(authed(pb::GetCurrentUserRequest {}, &tokens.access_token))
        .await
        .unwrap_err();
    assert_eq!(refused.code(), tonic::Code::ResourceExhausted);
    let retry = refused.get_details_retry_info().expect("RetryInfo in the details");
    let delay = retry.retry_delay.expect("a retry delay");
    assert!(
        delay > Duration::from_secs(55) && delay <= Duration::from_secs(60),
        "{delay:?}"
    );
    assert!(refused.metadata().get("ratelimit-policy").is_some());
}

/// Failed authentications count per client address (behind a trusted
/// proxy, the one it names): past the `authentication` allowance the
/// address is refused at once, even with valid credentials (a right guess
/// gains nothing), over REST and gRPC; another address, and calls without
/// credentials, still pass.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_authentications_are_limited_per_address() {
    let app = limited_app(Backend::Sqlite, "authentication=3/600", |config| {
        config.trusted_proxies = Some("127.0.0.1/32".to_owned());
    })
    .await;
    let (_, tokens) = app.signed_in("guessed@example.com").await;
    let guesser = [("x-forwarded-for", "203.0.113.7")];
    for guess in [
        "not-a-token",
        "keel_0123456789abcdef0123456789abcdef_nope",
        "eyJhbGciOiJFZERTQSJ9.e30.x",
    ] {
        let (status, _, _) = rest_get_with(&app, "/v1/users/me", guess, &guesser).await;
        assert_eq!(status, 401, "{guess}");
    }
    let (status, headers, body) = rest_get_with(&app, "/v1/users/me", "one-more", &guesser).await;
    assert_eq!(status, 429, "{}", String::from_utf8_lossy(&body));
    let retry_after: u64 = headers["retry-after"].to_str().unwrap().parse().unwrap();
    assert!((1..=600).contains(&retry_after), "{retry_after}");
    assert_eq!(headers["ratelimit-policy"], "\"authentication\";q=3;w=600");
    let (status, _, _) = rest_get_with(&app, "/v1/users/me", &tokens.access_token, &guesser).await;
    assert_eq!(status, 429, "the address is refused before its token is read");

    let mut queries = app.queries().await;
    let mut request = authed(pb::GetCurrentUserRequest {}, &tokens.access_token);
    request
        .metadata_mut()
        .insert("x-forwarded-for", "203.0.113.7".parse().unwrap());
    let refused = queries.get_current_user(request).await.unwrap_err();
    assert_eq!(refused.code(), tonic::Code::ResourceExhausted, "{refused:?}");
    assert!(refused.get_details_retry_info().is_some());

    let other = [("x-forwarded-for", "203.0.113.8")];
    let (status, _, _) = rest_get_with(&app, "/v1/users/me", &tokens.access_token, &other).await;
    assert_eq!(status, 200, "another address keeps its allowance");
    current_user(&app, &tokens.access_token).await.unwrap();

    // A call without credentials from the refused address still passes.
    let register = http::Request::post(format!("{}/v1/auth/register", app.endpoint()))
        .header("content-type", "application/json")
        .header("x-forwarded-for", "203.0.113.7")
        .body(Full::new(Bytes::from_static(
            br#"{"email":"after-guesses@example.com","password":"correct horse battery staple","displayName":"After"}"#,
        )))
        .unwrap();
    let client: Client<_, Full<Bytes>> = Client::builder(TokioExecutor::new()).build_http();
    let registered = client.request(register).await.unwrap();
    assert!(registered.status().is_success(), "{}", registered.status());

    // A token keel signed that has lapsed is a caller that must refresh,
    // not a guess: however many, they never trip the limit.
    let user_id = uuid::Uuid::parse_str(&current_user(&app, &tokens.access_token).await.unwrap().id).unwrap();
    let (lapsed, _) = app
        .state
        .identity
        .tokens()
        .issue_access(
            user_id,
            uuid::Uuid::now_v7(),
            keel_kernel::Role::User,
            chrono::Utc::now() - chrono::Duration::hours(2),
        )
        .unwrap();
    let refreshing = [("x-forwarded-for", "203.0.113.9")];
    for _ in 0..5 {
        let (status, _, _) = rest_get_with(&app, "/v1/users/me", &lapsed, &refreshing).await;
        assert_eq!(status, 401);
    }
    let (status, _, _) = rest_get_with(&app, "/v1/users/me", &tokens.access_token, &refreshing).await;
    assert_eq!(status, 200, "lapsed tokens did not count against the address");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_off_limiter_limits_no_method() {
    let app = limited_app(Backend::Sqlite, &format!("{CURRENT_USER}=1/60"), |config| {
        config.rate_limiter = keel_server::limit::LimiterKind::Off;
    })
    .await;
    let (_, tokens) = app.signed_in("off@example.com").await;
    for _ in 0..3 {
        current_user(&app, &tokens.access_token).await.unwrap();
    }
}

/// Two keels of one deployment (one PostgreSQL schema, one Redis): a limit
/// of N lets N calls through between them, not 2N.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs PostgreSQL and Redis"]
async fn two_keels_on_one_redis_share_one_allowance() {
    let limits = format!("{CURRENT_USER}=5/600");
    let redis = keel_testkit::redis_url();
    let first = limited_app(Backend::Postgres, &limits, |config| {
        config.redis_url = Some(Secret::new(redis));
    })
    .await;
    let schema = first.state.config.database_schema.clone();
    let redis = first.state.config.redis_url.clone();
    let keys = first.data_dir.path().join("auth-keys.json");
    let second = limited_app(Backend::Postgres, &limits, move |config| {
        config.database_schema = schema;
        config.auth_keys_file = Some(keys);
        config.redis_url = redis;
    })
    .await;
    let (_, tokens) = first.signed_in("shared@example.com").await;
    // Both processes answer the token (same keys, same database).
    let mut allowed = 0;
    for round in 0..6 {
        for app in [&first, &second] {
            match current_user(app, &tokens.access_token).await {
                Ok(_) => allowed += 1,
                Err(status) => assert_eq!(status.code(), tonic::Code::ResourceExhausted, "round {round}"),
            }
        }
    }
    assert_eq!(allowed, 5, "two keels let {allowed} through a limit of 5");
}
