//! Events through the real server: resumable subscriptions over gRPC,
//! grpc-web and SSE, authorization on every protocol, the dead-letter
//! replay of a failing handler, the audit log, and Redis going away.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use keel_proto::events as ev;
use keel_proto::events::event_command_service_client::EventCommandServiceClient;
use keel_proto::events::event_query_service_client::EventQueryServiceClient;
use keel_proto::identity as pb;
use keel_testkit::{Backend, PASSWORD, TestApp, authed, spawn_app, spawn_app_with};
use tonic::Code;

async fn subscribe(app: &TestApp, token: &str, topics: &[&str], after: u64) -> tonic::Streaming<ev::SubscribeResponse> {
    EventQueryServiceClient::new(app.channel().await)
        .subscribe(authed(
            ev::SubscribeRequest {
                topics: topics.iter().map(|topic| (*topic).to_owned()).collect(),
                after_sequence: after,
            },
            token,
        ))
        .await
        .unwrap()
        .into_inner()
}

/// The next `count` events of a stream (heartbeats skipped).
async fn take(stream: &mut tonic::Streaming<ev::SubscribeResponse>, count: usize) -> Vec<ev::Event> {
    let mut events = Vec::new();
    while events.len() < count {
        let message = tokio::time::timeout(Duration::from_secs(10), stream.message())
            .await
            .expect("no event within 10 s")
            .unwrap()
            .expect("stream ended");
        if let Some(ev::subscribe_response::Kind::Event(event)) = message.kind {
            assert_eq!(message.sequence, event.sequence);
            events.push(event);
        }
    }
    events
}

fn sequences(events: &[ev::Event]) -> Vec<u64> {
    events.iter().map(|event| event.sequence).collect()
}

/// Events of a server-sent-event stream until `count` arrived; the stream is
/// then dropped (a disconnect).
async fn take_sse(
    app: &TestApp,
    token: &str,
    last_event_id: Option<u64>,
    count: usize,
) -> Vec<(u64, serde_json::Value)> {
    let client = Client::builder(TokioExecutor::new()).build_http::<Empty<Bytes>>();
    let mut request = http::Request::get(format!("{}/v1/events/stream?topics=identity.*", app.endpoint()))
        .header("accept", "text/event-stream")
        .header("authorization", format!("Bearer {token}"));
    if let Some(id) = last_event_id {
        request = request.header("last-event-id", id.to_string());
    }
    let response = client.request(request.body(Empty::new()).unwrap()).await.unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(response.headers()["content-type"], "text/event-stream");
    let mut body = response.into_body();
    let mut buffer = String::new();
    let mut events = Vec::new();
    while events.len() < count {
        let frame = tokio::time::timeout(Duration::from_secs(10), body.frame())
            .await
            .expect("no SSE data within 10 s")
            .unwrap()
            .unwrap();
        let Ok(data) = frame.into_data() else { continue };
        buffer.push_str(std::str::from_utf8(&data).unwrap());
        while let Some(end) = buffer.find("\n\n") {
            let block: String = buffer.drain(..end + 2).collect();
            let id = block
                .lines()
                .find_map(|line| line.strip_prefix("id: "))
                .map(|id| id.parse::<u64>().unwrap());
            let data = block.lines().find_map(|line| line.strip_prefix("data: ")).unwrap();
            let value: serde_json::Value = serde_json::from_str(data).unwrap();
            if let Some(id) = id {
                events.push((id, value["data"]["event"].clone()));
            }
        }
    }
    events
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

keel_testkit::backend_tests! {
    async fn grpc_subscribers_resume_with_their_cursor_without_gap_or_duplicate(app: TestApp) {
        let (_, admin) = app.admin("root@example.com").await;
        register_many(&app, "a", 5).await;
        let mut stream = subscribe(&app, &admin.access_token, &[], 0).await;
        let first = take(&mut stream, 4).await;
        drop(stream);
        register_many(&app, "b", 5).await;
        let last = first.last().unwrap().sequence;
        let mut resumed = subscribe(&app, &admin.access_token, &[], last).await;
        // Numbered and handed to the hub before its position is read.
        app.state.events.flush().await.unwrap();
        let latest = app.state.events.latest_sequence();
        let rest = take(&mut resumed, (latest - last) as usize).await;
        let all: Vec<u64> = sequences(&first).into_iter().chain(sequences(&rest)).collect();
        assert_eq!(all, (1..=latest).collect::<Vec<_>>());
        assert!(latest >= 12, "root registered + logged in, ten users: {latest}");
    }

    async fn sse_reconnects_with_last_event_id_resume_exactly(app: TestApp) {
        let (_, admin) = app.admin("root@example.com").await;
        register_many(&app, "a", 3).await;
        let first = take_sse(&app, &admin.access_token, None, 3).await;
        assert_eq!(first.iter().map(|(id, _)| *id).collect::<Vec<_>>(), [1, 2, 3]);
        assert_eq!(first[0].1["eventName"], "identity.user.registered");
        assert_eq!(first[0].1["payload"]["@type"], "type.googleapis.com/keel.identity.v1.UserRegistered");
        register_many(&app, "b", 3).await;
        let resumed = take_sse(&app, &admin.access_token, Some(3), 5).await;
        assert_eq!(resumed.iter().map(|(id, _)| *id).collect::<Vec<_>>(), [4, 5, 6, 7, 8]);
        assert_eq!(resumed.last().unwrap().1["payload"]["email"], "b2@example.com");
    }

    async fn users_never_receive_other_users_events_on_any_protocol(app: TestApp) {
        let (bob, bob_tokens) = app.signed_in("bob@example.com").await;
        let token = bob_tokens.access_token.clone();
        let mut grpc = subscribe(&app, &token, &[], 0).await;
        // grpc-web over HTTP/1.1.
        let web = EventQueryServiceClient::new(app.grpc_web());
        let mut grpc_web = web
            .clone()
            .subscribe(authed(ev::SubscribeRequest { topics: vec![], after_sequence: 0 }, &token))
            .await
            .unwrap()
            .into_inner();
        // Alice's whole life happens meanwhile.
        let (_, alice) = app.signed_in("alice@example.com").await;
        app.commands().await.logout(authed(pb::LogoutRequest {}, &alice.access_token)).await.unwrap();
        // Then Bob does something.
        app.login("bob@example.com").await;
        // Bob's events: registered, logged in twice.
        for events in [take(&mut grpc, 3).await, take(&mut grpc_web, 3).await] {
            assert!(events.iter().all(|event| event.user_id == bob.id), "{events:?}");
            assert_eq!(events.last().unwrap().event_name, "identity.user.logged_in");
        }
        let sse = take_sse(&app, &token, None, 3).await;
        assert!(sse.iter().all(|(_, event)| event["userId"] == bob.id.as_str()));
        assert_eq!(sse.iter().map(|(id, _)| *id).collect::<Vec<_>>().len(), 3);
        // Unauthenticated subscriptions are refused.
        let anonymous = EventQueryServiceClient::new(app.channel().await)
            .subscribe(ev::SubscribeRequest { topics: vec![], after_sequence: 0 })
            .await;
        assert_eq!(anonymous.unwrap_err().code(), Code::Unauthenticated);
    }

    async fn the_audit_log_lists_security_events_for_admins_only(app: TestApp) {
        let (_, admin) = app.admin("root@example.com").await;
        let (user, tokens) = app.signed_in("mallory@example.com").await;
        let failed = app
            .commands()
            .await
            .login(pb::LoginRequest { email: "mallory@example.com".into(), password: "not the password".into() })
            .await;
        assert_eq!(failed.unwrap_err().code(), Code::Unauthenticated);
        app.commands()
            .await
            .update_user(authed(
                pb::UpdateUserRequest {
                    user: Some(pb::User { id: user.id.clone(), role: pb::Role::Moderator as i32, ..Default::default() }),
                    update_mask: Some(prost_types::FieldMask { paths: vec!["role".into()] }),
                },
                &admin.access_token,
            ))
            .await
            .unwrap();
        app.commands().await.logout(authed(pb::LogoutRequest {}, &tokens.access_token)).await.unwrap();
        app.commands()
            .await
            .delete_user(authed(pb::DeleteUserRequest { id: user.id.clone() }, &admin.access_token))
            .await
            .unwrap();
        app.state.events.flush().await.unwrap();

        let list = |token: &str, names: Vec<&str>, page_token: String| {
            authed(
                ev::ListAuditEventsRequest {
                    page_size: 2,
                    page_token,
                    event_names: names.into_iter().map(str::to_owned).collect(),
                    ..Default::default()
                },
                token,
            )
        };
        let mut client = EventQueryServiceClient::new(app.channel().await);
        let mut names = Vec::new();
        let mut page_token = String::new();
        loop {
            let page = client.list_audit_events(list(&admin.access_token, vec![], page_token)).await.unwrap().into_inner();
            assert!(page.events.len() <= 2);
            names.extend(page.events.iter().map(|event| event.event_name.clone()));
            if page.next_page_token.is_empty() {
                break;
            }
            page_token = page.next_page_token;
        }
        assert_eq!(
            names,
            ["identity.user.deleted", "identity.session.revoked", "identity.user.role_changed", "identity.login.failed"]
        );
        let only = client
            .list_audit_events(list(&admin.access_token, vec!["identity.login.*"], String::new()))
            .await
            .unwrap()
            .into_inner();
        assert_eq!(only.events.len(), 1);
        let denied = client.list_audit_events(list(&tokens.access_token, vec![], String::new())).await;
        assert_eq!(denied.unwrap_err().code(), Code::Unauthenticated, "mallory's session was revoked");
        let (_, other) = app.signed_in("eve@example.com").await;
        let denied = client.list_audit_events(list(&other.access_token, vec![], String::new())).await;
        assert_eq!(denied.unwrap_err().code(), Code::PermissionDenied);
    }
}

/// The welcome mailer writes to a directory that does not exist: retried,
/// dead-lettered, then replayed by an admin once the directory is there.
async fn a_failing_handler_is_dead_lettered_and_replayed(backend: Backend) {
    let mail_dir = tempfile::tempdir().unwrap();
    let mail_file = mail_dir.path().join("later").join("mail.jsonl");
    let configured = mail_file.clone();
    let app = spawn_app_with(backend, move |config| {
        config.mail_file = Some(configured);
        config.event_handler_max_attempts = 3;
        config.event_handler_backoff_ms = 10;
    })
    .await;
    let (_, admin) = app.admin("root@example.com").await;
    let mut client = EventQueryServiceClient::new(app.channel().await);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    let letters = loop {
        let page = client
            .list_dead_letters(authed(ev::ListDeadLettersRequest::default(), &admin.access_token))
            .await
            .unwrap()
            .into_inner();
        if !page.dead_letters.is_empty() {
            break page.dead_letters;
        }
        assert!(tokio::time::Instant::now() < deadline, "no dead letter within 10 s");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(letters.len(), 1);
    let letter = &letters[0];
    assert_eq!(letter.handler, "identity.welcome_email");
    assert_eq!(letter.attempts, 3);
    assert_eq!(letter.event.as_ref().unwrap().event_name, "identity.user.registered");
    assert!(letter.last_error.contains("mail file"), "{}", letter.last_error);

    let replay = |token: &str| authed(ev::ReplayDeadLetterRequest { id: letter.id.clone() }, token);
    let mut commands = EventCommandServiceClient::new(app.channel().await);
    // Still failing: the letter stays, with the new error.
    assert_eq!(
        commands
            .replay_dead_letter(replay(&admin.access_token))
            .await
            .unwrap_err()
            .code(),
        Code::FailedPrecondition
    );
    let (_, user) = app.signed_in("plain@example.com").await;
    assert_eq!(
        commands
            .replay_dead_letter(replay(&user.access_token))
            .await
            .unwrap_err()
            .code(),
        Code::PermissionDenied
    );

    std::fs::create_dir_all(mail_file.parent().unwrap()).unwrap();
    commands.replay_dead_letter(replay(&admin.access_token)).await.unwrap();
    let mail = std::fs::read_to_string(&mail_file).unwrap();
    assert!(mail.contains("\"to\":\"root@example.com\""), "{mail}");
    let open = client
        .list_dead_letters(authed(ev::ListDeadLettersRequest::default(), &admin.access_token))
        .await
        .unwrap()
        .into_inner();
    assert!(open.dead_letters.iter().all(|open| open.id != letter.id));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_letters_sqlite() {
    a_failing_handler_is_dead_lettered_and_replayed(Backend::Sqlite).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs PostgreSQL (KEEL_TEST_DATABASE_URL); run with --include-ignored"]
async fn dead_letters_postgres() {
    a_failing_handler_is_dead_lettered_and_replayed(Backend::Postgres).await;
}

/// A private redis-server on a free port, stopped on drop.
struct PrivateRedis {
    port: u16,
    child: Option<std::process::Child>,
}

impl PrivateRedis {
    fn start(port: u16) -> PrivateRedis {
        let child = std::process::Command::new("redis-server")
            .args([
                "--port",
                &port.to_string(),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
            ])
            .stdout(std::process::Stdio::null())
            .spawn()
            .expect("redis-server must be installed for this test");
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(std::time::Instant::now() < deadline, "redis-server did not start");
            std::thread::sleep(Duration::from_millis(50));
        }
        PrivateRedis {
            port,
            child: Some(child),
        }
    }

    fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for PrivateRedis {
    fn drop(&mut self) {
        self.stop();
    }
}

async fn redis_going_away_loses_nothing(backend: Backend) {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let mut redis = PrivateRedis::start(port);
    let url = format!("redis://127.0.0.1:{}", redis.port);
    let app = spawn_app_with(backend, move |config| {
        config.redis_url = Some(keel_server::config::Secret::new(url));
    })
    .await;
    let (_, admin) = app.admin("root@example.com").await;
    let mut stream = subscribe(&app, &admin.access_token, &["identity.user.registered"], 0).await;
    assert_eq!(take(&mut stream, 1).await.len(), 1);

    redis.stop();
    // Commands still commit while Redis is down.
    register_many(&app, "during", 5).await;
    let mut redis = PrivateRedis::start(port);
    register_many(&app, "after", 2).await;
    let events = take(&mut stream, 7).await;
    let emails: Vec<String> = events
        .iter()
        .map(|event| {
            let payload: pb::UserRegistered =
                prost_reflect::prost::Message::decode(event.payload.as_ref().unwrap().value.as_slice()).unwrap();
            payload.email
        })
        .collect();
    let mut expected: Vec<String> = (0..5).map(|index| format!("during{index}@example.com")).collect();
    expected.extend((0..2).map(|index| format!("after{index}@example.com")));
    assert_eq!(emails, expected);
    redis.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs Redis (redis-server on PATH); run with --include-ignored"]
async fn redis_restart_sqlite() {
    redis_going_away_loses_nothing(Backend::Sqlite).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs PostgreSQL (KEEL_TEST_DATABASE_URL) and Redis (redis-server on PATH); run with --include-ignored"]
async fn redis_restart_postgres() {
    redis_going_away_loses_nothing(Backend::Postgres).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cursor_in_the_pruned_past_is_told_to_resync() {
    let app = spawn_app(Backend::Sqlite).await;
    let (_, admin) = app.admin("root@example.com").await;
    register_many(&app, "x", 3).await;
    app.state.events.flush().await.unwrap();
    keel_events::store::prune(
        &app.state.db,
        keel_kernel::clock::now() + chrono::Duration::seconds(1),
        u64::MAX / 2,
    )
    .await
    .unwrap();
    let status = EventQueryServiceClient::new(app.channel().await)
        .subscribe(authed(
            ev::SubscribeRequest {
                topics: vec![],
                after_sequence: 1,
            },
            &admin.access_token,
        ))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::FailedPrecondition);
    use tonic_types::StatusExt;
    assert_eq!(
        status.get_error_details().error_info().unwrap().reason,
        "RESYNC_REQUIRED"
    );
}

/// Transactions PostgreSQL counted in `database` so far (committed and
/// rolled back), read through `admin`, a connection to another database:
/// the reading itself is not counted.
async fn transactions_in(admin: &sea_orm::DatabaseConnection, database: &str) -> i64 {
    use sea_orm::ConnectionTrait;

    let row = admin
        .query_one_raw(sea_orm::Statement::from_sql_and_values(
            sea_orm::DatabaseBackend::Postgres,
            "SELECT (xact_commit + xact_rollback)::bigint FROM pg_stat_database WHERE datname = $1",
            [database.into()],
        ))
        .await
        .unwrap()
        .expect("the database has statistics");
    row.try_get_by_index::<i64>(0).unwrap()
}

/// Ends the connections to `database` (all, or all but the one listening
/// for events) and waits until they are gone. A backend reports its counts
/// to the statistics at its next statement or when it ends, not while it
/// idles: ending them is what makes the counts complete.
async fn end_connections(admin: &sea_orm::DatabaseConnection, database: &str, but_listening: bool) {
    use sea_orm::ConnectionTrait;

    let filter = if but_listening {
        " AND query NOT LIKE 'LISTEN %'"
    } else {
        ""
    };
    let ended = admin
        .query_all_raw(sea_orm::Statement::from_sql_and_values(
            sea_orm::DatabaseBackend::Postgres,
            // Chosen first, ended after: a condition beside the filter
            // could be evaluated before it, on everyone's connections.
            format!(
                "WITH chosen AS MATERIALIZED (SELECT pid FROM pg_stat_activity WHERE datname = $1{filter}) \
                 SELECT pid, pg_terminate_backend(pid) FROM chosen"
            ),
            [database.into()],
        ))
        .await
        .unwrap();
    let pids: Vec<i32> = ended.iter().map(|row| row.try_get_by_index(0).unwrap()).collect();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let left = admin
            .query_all_raw(sea_orm::Statement::from_sql_and_values(
                sea_orm::DatabaseBackend::Postgres,
                "SELECT pid FROM pg_stat_activity WHERE pid = ANY($1)",
                [pids.clone().into()],
            ))
            .await
            .unwrap();
        if left.is_empty() {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "connections did not end");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // A backend leaves the activity view before it reports its last counts
    // (under load, long before): when PostgreSQL runs on this machine, wait
    // for its process to end; then until the counts stop moving.
    while pids
        .iter()
        .any(|pid| std::path::Path::new(&format!("/proc/{pid}")).exists())
    {
        assert!(tokio::time::Instant::now() < deadline, "backends did not exit");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let mut last = transactions_in(admin, database).await;
    loop {
        tokio::time::sleep(Duration::from_millis(300)).await;
        let now = transactions_in(admin, database).await;
        if now == last {
            return;
        }
        assert!(tokio::time::Instant::now() < deadline, "the counts did not settle");
        last = now;
    }
}

/// With nothing to do, keel wakes from commits, not from a clock: at most
/// one database transaction a second, counted by PostgreSQL in a database
/// of the test's own (other tests' work does not count).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs PostgreSQL (KEEL_TEST_DATABASE_URL); run with --include-ignored"]
async fn an_idle_keel_runs_at_most_one_transaction_a_second() {
    use sea_orm::ConnectionTrait;

    let url = keel_testkit::postgres_url();
    let admin = keel_db::connect(&keel_db::DbSettings::new(url.clone())).await.unwrap();
    let database = format!("idle_{}", uuid::Uuid::now_v7().simple());
    admin
        .execute_unprepared(&format!("CREATE DATABASE \"{database}\""))
        .await
        .unwrap();
    let mut own = url::Url::parse(&url).unwrap();
    own.set_path(&database);
    let own = own.to_string();
    let app = spawn_app_with(Backend::Postgres, move |config| {
        config.database_url = Some(keel_server::config::Secret::new(own));
        config.database_schema = None;
        // One pooled connection: ended below, it is replaced once, at the
        // next health check, then reused (a larger pool replaces its ended
        // connections one health check at a time: more starts in the window).
        config.database_max_connections = 1;
    })
    .await;
    // Some work first (events, the welcome handler), then nothing.
    let (_, admin_tokens) = app.admin("root@example.com").await;
    let mut stream = subscribe(&app, &admin_tokens.access_token, &[], 0).await;
    assert!(!take(&mut stream, 1).await.is_empty());
    tokio::time::sleep(Duration::from_secs(2)).await;
    // What start-up did is counted before the window. Counted in it besides
    // idle work: the pool's one new connection (a transaction to start it)
    // and the listener's start and LISTEN (ended at the end, not now: it
    // would listen again, and read the table once, in the window).
    end_connections(&admin, &database, true).await;
    let before = transactions_in(&admin, &database).await;
    // Measuring costs transactions of its own (the pool's new connection,
    // the listeners' UNLISTEN, what the ended connections still report:
    // about 10); an idle keel's own come in bursts (the events' safety net,
    // the handlers' checkpoints, the jobs' poll and rescue: about 15 every
    // 30 s). 120 s keeps the fixed part and a burst more or less at either
    // edge of the window from deciding the result (in 60 s, a busy machine
    // measured 61 with three bursts in the window, a quiet one 41).
    let idle = Duration::from_secs(120);
    tokio::time::sleep(idle).await;
    // Stopped, keel reconnects nothing: ending its connections completes
    // the counts.
    drop(stream);
    app.stop().await;
    end_connections(&admin, &database, false).await;
    let after = transactions_in(&admin, &database).await;
    let per_second = (after - before) as f64 / idle.as_secs_f64();
    println!(
        "idle keel: {} transactions in {idle:?} ({per_second:.2}/s)",
        after - before
    );
    admin
        .execute_unprepared(&format!("DROP DATABASE \"{database}\" WITH (FORCE)"))
        .await
        .unwrap();
    assert!(per_second <= 1.0, "{} transactions in {idle:?}", after - before);
}
