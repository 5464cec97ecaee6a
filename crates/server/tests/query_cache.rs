//! The query cache: `GetUser` answers from it on a second read, a committed
//! write is read at once (in this process, and with Redis on every process),
//! an answer kept for one caller never reaches another with other rights,
//! and queries still answer while Redis is down.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use keel_kernel::query_cache::{QueryCache, entry_key};
use keel_proto::identity as pb;
use keel_server::config::Secret;
use keel_server::query_cache::RedisQueryCache;
use keel_testkit::{Backend, TestApp, authed, spawn_app_with};

async fn get_user(app: &TestApp, id: &str, token: &str) -> Result<pb::User, tonic::Status> {
    app.queries()
        .await
        .get_user(authed(pb::GetUserRequest { id: id.to_owned() }, token))
        .await
        .map(|response| response.into_inner().user.unwrap())
}

async fn rename(app: &TestApp, id: &str, name: &str, token: &str) {
    app.commands()
        .await
        .update_user(authed(
            pb::UpdateUserRequest {
                user: Some(pb::User {
                    id: id.to_owned(),
                    display_name: name.to_owned(),
                    ..Default::default()
                }),
                update_mask: Some(prost_types::FieldMask {
                    paths: vec!["display_name".to_owned()],
                }),
            },
            token,
        ))
        .await
        .unwrap();
}

fn hits(app: &TestApp) -> u64 {
    app.state.bus.query_cache_stats().hits()
}

/// `keel_query_cache_hits_total` as `/metrics` shows it.
async fn scraped_hits(app: &TestApp) -> f64 {
    let request = http::Request::builder()
        .uri(format!("{}/metrics", app.endpoint()))
        .body(Full::new(Bytes::new()))
        .unwrap();
    let client: Client<_, Full<Bytes>> = Client::builder(TokioExecutor::new()).build_http();
    let body = client
        .request(request)
        .await
        .unwrap()
        .into_body()
        .collect()
        .await
        .unwrap();
    let text = String::from_utf8(body.to_bytes().to_vec()).unwrap();
    text.lines()
        .find_map(|line| line.strip_prefix("keel_query_cache_hits_total "))
        .expect("keel_query_cache_hits_total is exported")
        .trim()
        .parse()
        .unwrap()
}

fn closed_port_url() -> String {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    drop(listener);
    format!("redis://127.0.0.1:{port}")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_get_user_is_answered_from_the_cache() {
    let app = spawn_app_with(Backend::Sqlite, |config| config.query_cache = true).await;
    let (user, tokens) = app.signed_in("cached@example.com").await;
    let before = hits(&app);
    let first = get_user(&app, &user.id, &tokens.access_token).await.unwrap();
    assert_eq!(hits(&app), before, "the first read runs the handler");
    let second = get_user(&app, &user.id, &tokens.access_token).await.unwrap();
    assert_eq!(second, first);
    assert_eq!(hits(&app), before + 1, "the second read did not reach the handler");
    assert!(scraped_hits(&app).await >= 1.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_read_after_an_update_returns_the_new_value() {
    let app = spawn_app_with(Backend::Sqlite, |config| config.query_cache = true).await;
    let (user, tokens) = app.signed_in("renamed@example.com").await;
    get_user(&app, &user.id, &tokens.access_token).await.unwrap();
    get_user(&app, &user.id, &tokens.access_token).await.unwrap();
    let cached = hits(&app);
    rename(&app, &user.id, "Renamed", &tokens.access_token).await;
    let read = get_user(&app, &user.id, &tokens.access_token).await.unwrap();
    assert_eq!(read.display_name, "Renamed");
    assert_eq!(hits(&app), cached, "the update invalidated the entry");
    // The new value is cached in turn.
    assert_eq!(
        get_user(&app, &user.id, &tokens.access_token)
            .await
            .unwrap()
            .display_name,
        "Renamed"
    );
    assert_eq!(hits(&app), cached + 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_answer_cached_for_one_caller_never_reaches_another() {
    let app = spawn_app_with(Backend::Sqlite, |config| config.query_cache = true).await;
    let (owner, owner_tokens) = app.signed_in("owner@example.com").await;
    let (_, other_tokens) = app.signed_in("other@example.com").await;
    get_user(&app, &owner.id, &owner_tokens.access_token).await.unwrap();
    get_user(&app, &owner.id, &owner_tokens.access_token).await.unwrap();
    let refused = get_user(&app, &owner.id, &other_tokens.access_token).await.unwrap_err();
    assert_eq!(refused.code(), tonic::Code::NotFound, "another user's row stays hidden");
    let (_, admin) = app.admin("root@example.com").await;
    assert_eq!(
        get_user(&app, &owner.id, &admin.access_token).await.unwrap().id,
        owner.id
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_the_cache_off_every_read_runs_the_handler() {
    let app = spawn_app_with(Backend::Sqlite, |config| config.query_cache = false).await;
    let (user, tokens) = app.signed_in("off@example.com").await;
    for _ in 0..3 {
        get_user(&app, &user.id, &tokens.access_token).await.unwrap();
    }
    assert_eq!(hits(&app), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_redis_down_queries_read_the_database() {
    let url = closed_port_url();
    let app = spawn_app_with(Backend::Sqlite, move |config| {
        config.redis_url = Some(Secret::new(url));
        config.query_cache = true;
    })
    .await;
    let (user, tokens) = app.signed_in("down@example.com").await;
    for _ in 0..2 {
        get_user(&app, &user.id, &tokens.access_token).await.unwrap();
    }
    rename(&app, &user.id, "Still answered", &tokens.access_token).await;
    let read = get_user(&app, &user.id, &tokens.access_token).await.unwrap();
    assert_eq!(read.display_name, "Still answered");
    assert_eq!(hits(&app), 0, "nothing answered from an unreachable cache");
}

/// Two keels on one PostgreSQL and one Redis: B caches, A updates, B reads
/// the new value at once (A's commit invalidated the shared entry).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs PostgreSQL (KEEL_TEST_DATABASE_URL) and Redis (KEEL_TEST_REDIS_URL); run with --include-ignored"]
async fn an_update_on_one_keel_is_read_at_once_on_another() {
    let redis = keel_testkit::redis_url();
    let a = spawn_app_with(Backend::Postgres, move |config| {
        config.redis_url = Some(Secret::new(redis));
        config.query_cache = true;
    })
    .await;
    let b = keel_testkit::second_process(&a).await;
    let (user, tokens) = a.signed_in("cluster@example.com").await;
    get_user(&b, &user.id, &tokens.access_token).await.unwrap();
    let cached = hits(&b);
    assert_eq!(
        get_user(&b, &user.id, &tokens.access_token).await.unwrap().display_name,
        user.display_name
    );
    assert_eq!(hits(&b), cached + 1, "B answered from the cache");
    // The cache is shared: A finds what B stored.
    let a_hits = hits(&a);
    get_user(&a, &user.id, &tokens.access_token).await.unwrap();
    assert_eq!(hits(&a), a_hits + 1, "A answered from the entry B stored");

    rename(&a, &user.id, "Renamed on A", &tokens.access_token).await;
    let read = get_user(&b, &user.id, &tokens.access_token).await.unwrap();
    assert_eq!(read.display_name, "Renamed on A", "B never answers the old value");
}

/// The race the generations close, on Redis: a reader read the generation
/// and then the old row; a writer committed and invalidated; the reader's
/// put must store nothing.
#[tokio::test]
#[ignore = "needs Redis (KEEL_TEST_REDIS_URL); run with --include-ignored"]
async fn a_redis_fill_that_raced_an_invalidation_is_dropped() {
    let namespace = format!("test:{}", uuid::Uuid::now_v7().simple());
    let cache = RedisQueryCache::connect(&keel_testkit::redis_url(), &namespace, Duration::from_secs(60)).unwrap();
    assert!(cache.connected(Duration::from_secs(5)).await);
    let tags = vec!["identity.user:1".to_owned(), "identity.user:2".to_owned()];

    let generations = cache.generations(&tags).await.unwrap();
    assert_eq!(
        cache.generations(&tags).await.unwrap(),
        generations,
        "stable until invalidated"
    );
    let key = entry_key("q:1", &generations);
    let value = vec![0_u8, 159, 146, 150, 255];
    assert!(cache.put(&key, value.clone(), &tags, &generations).await.unwrap());
    assert_eq!(cache.get(&key).await.unwrap(), Some(value), "bytes round-trip");

    let before = cache.generations(&tags).await.unwrap();
    cache.invalidate(&tags[1..]).await.unwrap();
    let after = cache.generations(&tags).await.unwrap();
    assert_eq!(after[0], before[0]);
    assert!(after[1] > before[1]);
    assert!(
        !cache
            .put(&entry_key("q:1", &before), b"old".to_vec(), &tags, &before)
            .await
            .unwrap(),
        "a put under a moved generation stores nothing"
    );
    assert_eq!(cache.get(&entry_key("q:1", &after)).await.unwrap(), None);
}

/// A generation key that Redis evicted (or that expired) comes back with a
/// value the tag never had: the entries stored under the old one stay
/// unreachable, instead of reappearing as they would under a counter reset to 0.
#[tokio::test]
#[ignore = "needs Redis (KEEL_TEST_REDIS_URL); run with --include-ignored"]
async fn a_lost_generation_never_makes_old_entries_reachable() {
    use fred::prelude::*;
    let url = keel_testkit::redis_url();
    let namespace = format!("test:{}", uuid::Uuid::now_v7().simple());
    let cache = RedisQueryCache::connect(&url, &namespace, Duration::from_secs(60)).unwrap();
    assert!(cache.connected(Duration::from_secs(5)).await);
    let tags = vec!["identity.user:1".to_owned()];
    let generations = cache.generations(&tags).await.unwrap();
    let key = entry_key("q:1", &generations);
    assert!(cache.put(&key, b"old".to_vec(), &tags, &generations).await.unwrap());

    let client = fred::clients::Client::new(fred::types::config::Config::from_url(&url).unwrap(), None, None, None);
    client.init().await.unwrap();
    let _: i64 = client
        .eval(
            "return redis.call('DEL', KEYS[1])",
            format!("{namespace}:qcache:gen:identity.user:1"),
            Vec::<String>::new(),
        )
        .await
        .unwrap();
    let fresh = cache.generations(&tags).await.unwrap();
    assert_ne!(fresh, generations);
    assert_eq!(cache.get(&entry_key("q:1", &fresh)).await.unwrap(), None);
}

/// The writer's process dies right after its commit, before it invalidates
/// (`KEEL_TEST_ABORT_AFTER_COMMIT`): another keel that had the old answer
/// cached must not give it again. The writer held the user's tag before it
/// committed (`QueryCache::hold`); without the hold, B answers the old name
/// until the entry's TTL.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs PostgreSQL (KEEL_TEST_DATABASE_URL) and Redis (KEEL_TEST_REDIS_URL); run with --include-ignored"]
async fn a_writer_that_dies_between_commit_and_invalidation_leaves_no_old_answer() {
    let redis = keel_testkit::redis_url();
    let b = spawn_app_with(Backend::Postgres, {
        let redis = redis.clone();
        move |config| {
            config.redis_url = Some(Secret::new(redis));
            config.query_cache = true;
            // Longer than the test: the entry must not expire before the crash.
            config.query_cache_ttl_seconds = 3600;
            // Identity's own cache of rows is told by the events relay,
            // which survives the crash; off here, so that only the query
            // cache can answer from memory.
            config.access_cache = false;
        }
    })
    .await;
    let (user, tokens) = b.signed_in("doomed-writer@example.com").await;
    get_user(&b, &user.id, &tokens.access_token).await.unwrap();
    let cached = hits(&b);
    get_user(&b, &user.id, &tokens.access_token).await.unwrap();
    assert_eq!(hits(&b), cached + 1, "B answers from the cache");

    // A: another keel of the deployment (B's schema, signing keys and
    // Redis) that aborts right after an UpdateUser with a key commits.
    let url = keel_testkit::postgres_url();
    let schema = b.state.config.database_schema.clone().unwrap();
    let mut a = keel_testkit::KeelProcess::start(
        env!("CARGO_BIN_EXE_keel"),
        &[
            ("KEEL_DATA_DIR", b.data_dir.path().display().to_string()),
            ("KEEL_DATABASE_URL", url),
            ("KEEL_DATABASE_SCHEMA", schema),
            ("KEEL_REDIS_URL", redis),
            ("KEEL_QUERY_CACHE", "on".to_owned()),
            ("KEEL_QUERY_CACHE_TTL_SECONDS", "3600".to_owned()),
            ("KEEL_ACCESS_CACHE", "false".to_owned()),
            ("KEEL_TEST_ABORT_AFTER_COMMIT", "identity.update_user".to_owned()),
        ],
    )
    .await;
    // Still answered from the cache now that A runs.
    let cached = hits(&b);
    get_user(&b, &user.id, &tokens.access_token).await.unwrap();
    assert_eq!(hits(&b), cached + 1, "B still answers from the cache before the crash");
    let mut request = authed(
        pb::UpdateUserRequest {
            user: Some(pb::User {
                id: user.id.clone(),
                display_name: "Renamed before the crash".to_owned(),
                ..Default::default()
            }),
            update_mask: Some(prost_types::FieldMask {
                paths: vec!["display_name".to_owned()],
            }),
        },
        &tokens.access_token,
    );
    request
        .metadata_mut()
        .insert("idempotency-key", "doomed-rename".parse().unwrap());
    let answer = pb::identity_command_service_client::IdentityCommandServiceClient::new(a.channel().await)
        .update_user(request)
        .await;
    assert!(answer.is_err(), "the writer died before answering: {answer:?}");
    assert!(!a.exited().await.success());
    let committed = b.current_user(&tokens.access_token).await.unwrap();
    assert_eq!(
        committed.display_name, "Renamed before the crash",
        "the rename committed"
    );

    let read = get_user(&b, &user.id, &tokens.access_token).await.unwrap();
    assert_eq!(
        read.display_name, "Renamed before the crash",
        "B never answers the old value"
    );
}

/// The Redis hold: while a tag is held no reader gets its generations (so
/// none uses or stores an entry), a fill that read before the hold stores
/// nothing, one writer's release leaves another writer's hold in place, and
/// the last release ends it with a generation past every one the tag had.
#[tokio::test]
#[ignore = "needs Redis (KEEL_TEST_REDIS_URL); run with --include-ignored"]
async fn a_held_tag_is_neither_read_nor_filled_until_every_writer_released_it() {
    let namespace = format!("test:{}", uuid::Uuid::now_v7().simple());
    let cache = RedisQueryCache::connect(&keel_testkit::redis_url(), &namespace, Duration::from_secs(60)).unwrap();
    assert!(cache.connected(Duration::from_secs(5)).await);
    let tags = vec!["identity.user:1".to_owned()];
    let before = cache.generations(&tags).await.unwrap();

    cache.hold(&tags, "writer-1").await.unwrap();
    let held = cache.generations(&tags).await.unwrap_err();
    assert!(held.to_string().contains("held"), "{held}");
    assert!(
        !cache
            .put(&entry_key("q:1", &before), b"old".to_vec(), &tags, &before)
            .await
            .unwrap(),
        "a fill that read before the hold stores nothing"
    );
    assert!(
        cache.generations(&["identity.user:2".to_owned()]).await.is_ok(),
        "other tags are not held"
    );

    // Two writers of one tag: the first one's release leaves the second's hold.
    cache.hold(&tags, "writer-2").await.unwrap();
    cache.release(&tags, "writer-1").await.unwrap();
    assert!(cache.generations(&tags).await.is_err(), "writer-2 still holds the tag");
    cache.release(&tags, "writer-2").await.unwrap();
    let after = cache.generations(&tags).await.unwrap();
    assert!(after[0] > before[0], "{after:?} after {before:?}");
    let key = entry_key("q:1", &after);
    assert!(cache.put(&key, b"new".to_vec(), &tags, &after).await.unwrap());
    assert_eq!(cache.get(&key).await.unwrap(), Some(b"new".to_vec()));
}
