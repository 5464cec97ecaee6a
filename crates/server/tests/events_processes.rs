//! Events across real keel processes: SIGKILL while publishing, and two
//! processes sharing PostgreSQL and Redis.

#![allow(clippy::unwrap_used)]

use std::collections::{BTreeMap, HashSet};
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use keel_proto::events as ev;
use keel_proto::events::event_query_service_client::EventQueryServiceClient;
use keel_proto::identity as pb;
use keel_proto::identity::identity_command_service_client::IdentityCommandServiceClient;
use keel_testkit::{KeelProcess, PASSWORD, authed, free_port};
use tonic::transport::Channel;

async fn start(port: u16, env: &[(&str, String)]) -> KeelProcess {
    let mut env = env.to_vec();
    env.push(("KEEL_EVENTS_HEARTBEAT_SECONDS", "1".to_owned()));
    KeelProcess::start_on(env!("CARGO_BIN_EXE_keel"), port, &env).await
}

/// Every event from sequence 0 until the stream's heartbeat says there is
/// no more; asserts none arrives twice and none is skipped.
async fn all_events(keel: &KeelProcess, token: &str) -> Vec<ev::Event> {
    let mut stream = EventQueryServiceClient::new(keel.channel().await)
        .subscribe(authed(
            ev::SubscribeRequest {
                topics: vec![],
                after_sequence: 0,
            },
            token,
        ))
        .await
        .unwrap()
        .into_inner();
    let mut events: Vec<ev::Event> = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let message = tokio::time::timeout(Duration::from_secs(5), stream.message())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        match message.kind.unwrap() {
            ev::subscribe_response::Kind::Event(event) => {
                assert_eq!(event.sequence, events.len() as u64 + 1, "a gap or a duplicate");
                events.push(event);
            }
            ev::subscribe_response::Kind::Heartbeat(heartbeat) => {
                if heartbeat.latest_sequence == events.len() as u64 {
                    return events;
                }
            }
        }
        assert!(Instant::now() < deadline, "the subscriber never caught up");
    }
}

fn registered_email(event: &ev::Event) -> Option<String> {
    (event.event_name == "identity.user.registered").then(|| {
        let payload: pb::UserRegistered =
            prost_reflect::prost::Message::decode(event.payload.as_ref().unwrap().value.as_slice()).unwrap();
        payload.email
    })
}

/// Registers users from four clients at once, some twice (refused and
/// rolled back), until the server dies. Counts acknowledgements in
/// `acknowledged_so_far`; returns the acknowledged emails.
async fn register_until_killed(keel: &KeelProcess, acknowledged_so_far: Arc<AtomicUsize>) -> Vec<String> {
    let workers: Vec<_> = (0..4)
        .map(|worker| {
            let channel = keel.url();
            let counter = acknowledged_so_far.clone();
            tokio::spawn(async move {
                let channel = Channel::from_shared(channel).unwrap().connect().await.unwrap();
                register_from(channel, worker, counter).await
            })
        })
        .collect();
    let mut acknowledged = Vec::new();
    for worker in workers {
        acknowledged.extend(worker.await.unwrap());
    }
    acknowledged
}

async fn register_from(channel: Channel, worker: usize, counter: Arc<AtomicUsize>) -> Vec<String> {
    let mut commands = IdentityCommandServiceClient::new(channel);
    let mut acknowledged = Vec::new();
    for index in 0..10_000 {
        let email = format!("crash{worker}-{index}@example.com");
        let request = |email: &str| pb::RegisterRequest {
            email: email.to_owned(),
            password: PASSWORD.into(),
            display_name: "Crash".into(),
        };
        match commands.register(request(&email)).await {
            Ok(_) => {
                acknowledged.push(email.clone());
                counter.fetch_add(1, Ordering::SeqCst);
            }
            Err(_) => break,
        }
        if index % 5 == 0 {
            // A duplicate: answered like a new account, but it creates no
            // account, so no second registered event may ever appear.
            if commands.register(request(&email.to_uppercase())).await.is_err() {
                break;
            }
        }
    }
    acknowledged
}

async fn survives_sigkill_while_publishing(env: Vec<(&'static str, String)>) {
    let port = free_port();
    let mut env = env;
    env.push(("KEEL_REGISTER_BURST", "100000".to_owned()));
    let mut keel = start(port, &env).await;
    let pid = keel.pid();
    // Kill it mid-stream, once a random-ish amount of work was acknowledged
    // (commits keep going in the other clients as it dies).
    let acknowledged_so_far = Arc::new(AtomicUsize::new(0));
    let killer = {
        let acknowledged_so_far = acknowledged_so_far.clone();
        let enough = 10 + (pid % 30) as usize;
        tokio::spawn(async move {
            let deadline = Instant::now() + Duration::from_secs(60);
            while acknowledged_so_far.load(Ordering::SeqCst) < enough {
                assert!(
                    Instant::now() < deadline,
                    "keel acknowledged too little to kill it mid-stream"
                );
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            let _ = Command::new("kill").args(["-KILL", &pid.to_string()]).status();
        })
    };
    let acknowledged = register_until_killed(&keel, acknowledged_so_far).await;
    killer.await.unwrap();
    let _ = keel.exited().await;

    keel = start(port, &env).await;
    let token = keel.admin_token().await;
    let events = all_events(&keel, &token).await;
    let mut registered: BTreeMap<String, usize> = BTreeMap::new();
    for email in events.iter().filter_map(registered_email) {
        *registered.entry(email.to_lowercase()).or_default() += 1;
    }
    // Exactly once each: no duplicate from a refused (rolled back) command,
    // none twice from a relay interrupted mid-publish.
    assert!(registered.values().all(|count| *count == 1), "{registered:?}");
    for email in &acknowledged {
        assert!(
            registered.contains_key(email),
            "{email} committed but its event is missing"
        );
    }
    // Every event is of a committed change: at most the calls in flight at
    // the kill (one per client) may have committed without an answer.
    let acknowledged: HashSet<&String> = acknowledged.iter().collect();
    let unacknowledged: Vec<_> = registered
        .keys()
        .filter(|email| email.starts_with("crash") && !acknowledged.contains(email))
        .collect();
    assert!(unacknowledged.len() <= 4, "{unacknowledged:?}");
    let ids: HashSet<&str> = events.iter().map(|event| event.event_id.as_str()).collect();
    assert_eq!(ids.len(), events.len());
    println!(
        "crash test: {} registrations acknowledged before SIGKILL; {} events after restart, sequences 1..={} without gap or duplicate",
        acknowledged.len(),
        events.len(),
        events.len()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_during_publishing_sqlite() {
    let data = tempfile::tempdir().unwrap();
    survives_sigkill_while_publishing(vec![("KEEL_DATA_DIR", data.path().display().to_string())]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs PostgreSQL (KEEL_TEST_DATABASE_URL); run with --include-ignored"]
async fn sigkill_during_publishing_postgres() {
    let url = keel_testkit::postgres_url();
    let schema = keel_testkit::create_schema(&url).await;
    let data = tempfile::tempdir().unwrap();
    survives_sigkill_while_publishing(vec![
        ("KEEL_DATA_DIR", data.path().display().to_string()),
        ("KEEL_DATABASE_URL", url.clone()),
        ("KEEL_DATABASE_SCHEMA", schema.clone()),
    ])
    .await;
    keel_testkit::drop_schema(url, schema);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs PostgreSQL (KEEL_TEST_DATABASE_URL) and Redis (KEEL_TEST_REDIS_URL); run with --include-ignored"]
async fn an_event_committed_through_one_process_reaches_a_subscriber_of_another() {
    let url = keel_testkit::postgres_url();
    let redis = keel_testkit::redis_url();
    let schema = keel_testkit::create_schema(&url).await;
    let keys = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(keys.path(), keel_identity::tokens::KeySet::generate_file()).unwrap();
    let (data_a, data_b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let shared = |data: &tempfile::TempDir| {
        vec![
            ("KEEL_DATA_DIR", data.path().display().to_string()),
            ("KEEL_DATABASE_URL", url.clone()),
            ("KEEL_DATABASE_SCHEMA", schema.clone()),
            ("KEEL_REDIS_URL", redis.clone()),
            ("KEEL_AUTH_KEYS_FILE", keys.path().display().to_string()),
            // Only Redis tells B of A's events: if it delivers nothing, the test fails.
            ("KEEL_EVENTS_POLL_MS", "0".to_owned()),
            ("KEEL_EVENTS_LISTEN", "false".to_owned()),
        ]
    };
    let a = start(free_port(), &shared(&data_a)).await;
    let b = start(free_port(), &shared(&data_b)).await;
    let token = a.admin_token().await;
    let mut on_b = EventQueryServiceClient::new(b.channel().await)
        .subscribe(authed(
            ev::SubscribeRequest {
                topics: vec!["identity.user.registered".into()],
                after_sequence: 0,
            },
            &token,
        ))
        .await
        .unwrap()
        .into_inner();
    let mut seen = Vec::new();
    let mut commands = IdentityCommandServiceClient::new(a.channel().await);
    for index in 0..5 {
        let email = format!("across{index}@example.com");
        commands
            .register(pb::RegisterRequest {
                email: email.clone(),
                password: PASSWORD.into(),
                display_name: "Across".into(),
            })
            .await
            .unwrap();
        let started = Instant::now();
        // Wait for it on B (the bootstrap admin's event comes first).
        loop {
            let message = tokio::time::timeout(Duration::from_secs(5), on_b.message())
                .await
                .unwrap()
                .unwrap()
                .unwrap();
            if let Some(ev::subscribe_response::Kind::Event(event)) = message.kind {
                let got = registered_email(&event).unwrap();
                seen.push(got.clone());
                if got == email {
                    break;
                }
            }
        }
        println!("{email}: committed on A, received on B after {:?}", started.elapsed());
    }
    assert_eq!(seen.last().unwrap(), "across4@example.com");
    drop((a, b));
    keel_testkit::drop_schema(url, schema);
}
