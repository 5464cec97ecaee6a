//! One contract suite for the events machinery, run on every database
//! (SQLite, PostgreSQL) and every transport (in process, PostgreSQL
//! LISTEN/NOTIFY, Redis).

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use keel_events::handlers::Registry;
use keel_events::subscribe::Item;
use keel_events::{Events, Settings, store};
use keel_kernel::{
    BusBuilder, Code, Command, CommandContext, CommandHandler, DomainEvent, Envelope, Error, EventHandler, Principal,
    RequestContext, Result, Role,
};
use keel_testkit::{Backend, TestDatabase};
use tokio::sync::mpsc;
use uuid::Uuid;

struct Noted(String);

impl DomainEvent for Noted {
    const NAME: &'static str = "test.note.added";
    const PAYLOAD_TYPE: &'static str = "google.protobuf.StringValue";

    fn encode_payload(&self) -> Vec<u8> {
        prost::Message::encode_to_vec(&self.0)
    }
}

/// Records one event per note; fails (after recording) when asked to.
struct AddNote {
    text: String,
    user: Uuid,
    fail: bool,
}

impl Command for AddNote {
    const NAME: &'static str = "test.add_note";
    type Output = ();
}

struct Notes;

#[async_trait]
impl CommandHandler<AddNote> for Notes {
    async fn handle(&self, ctx: &CommandContext<'_>, command: AddNote) -> Result<()> {
        ctx.record(&Noted(command.text.clone()), Some(command.user), command.text);
        if command.fail {
            return Err(Error::new(Code::Aborted, "rolled back on purpose"));
        }
        Ok(())
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Transport {
    InProcess,
    /// PostgreSQL's LISTEN/NOTIFY between two processes (no Redis).
    Notify,
    Redis,
}

struct Rig {
    _database: TestDatabase,
    db: sea_orm::DatabaseConnection,
    /// The process that commits: the bus writes to its outbox, its relay numbers.
    events: Events,
    /// The process subscribers listen on. In process: the same one (its
    /// relay hands events to its hub). Notify and Redis: a second instance
    /// on the same database whose hub hears of events only through
    /// PostgreSQL's notifications, or only through Redis.
    listener: Events,
    bus: keel_kernel::Bus,
}

/// Nothing but the transport under test tells a hub of news: no table
/// poll, no relay poll, and LISTEN only when it is the transport. A
/// transport that delivers nothing fails the test.
fn without_polling(settings: Settings, transport: Transport) -> Settings {
    Settings {
        poll: None,
        relay_poll: None,
        listen: transport == Transport::Notify,
        ..settings
    }
}

async fn rig(backend: Backend, transport: Transport, settings: Settings, registry: Registry) -> Rig {
    let database = TestDatabase::new(backend).await;
    let redis_url = match transport {
        Transport::InProcess | Transport::Notify => None,
        Transport::Redis => Some(keel_testkit::redis_url()),
    };
    let settings = without_polling(Settings { redis_url, ..settings }, transport);
    // The writer's own hub hears of its events from its relay.
    let writer = Settings {
        listen: false,
        ..settings.clone()
    };
    let events = Events::start(database.db.clone(), writer, registry).await.unwrap();
    let listener = match transport {
        Transport::InProcess => events.clone(),
        Transport::Notify | Transport::Redis => Events::start(database.db.clone(), settings, Registry::default())
            .await
            .unwrap(),
    };
    let mut builder = BusBuilder::new(database.db.clone());
    builder.outbox(events.outbox()).command::<AddNote>(Notes);
    Rig {
        db: database.db.clone(),
        _database: database,
        events,
        listener,
        bus: builder.build(),
    }
}

fn admin() -> Principal {
    Principal {
        user_id: Uuid::now_v7(),
        session_id: Uuid::now_v7(),
        role: Role::Admin,
        access_expires_at: None,
    }
}

async fn add(rig: &Rig, text: &str, user: Uuid, fail: bool) -> Result<()> {
    rig.bus
        .execute(
            &RequestContext::new("test"),
            AddNote {
                text: text.to_owned(),
                user,
                fail,
            },
        )
        .await
}

/// Events until `count` arrived (or the deadline passed).
async fn collect(receiver: &mut mpsc::Receiver<Result<Item>>, count: usize) -> Vec<Arc<Envelope>> {
    let mut events = Vec::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while events.len() < count {
        match tokio::time::timeout_at(deadline, receiver.recv()).await {
            Ok(Some(Ok(Item::Event(event)))) => events.push(event),
            Ok(Some(Ok(Item::Heartbeat { .. }))) => {}
            Ok(Some(Err(error))) => panic!("subscription failed: {error}"),
            Ok(None) | Err(_) => break,
        }
    }
    events
}

async fn subscribe(
    rig: &Rig,
    principal: Principal,
    topics: &[&str],
    after: u64,
) -> Result<mpsc::Receiver<Result<Item>>> {
    start_subscription(
        rig,
        principal,
        topics,
        after,
        Duration::from_secs(30),
        keel_kernel::access::never(),
    )
    .await
}

/// [`subscribe`] with its heartbeat and the future that ends its access.
async fn start_subscription(
    rig: &Rig,
    principal: Principal,
    topics: &[&str],
    after: u64,
    heartbeat: Duration,
    access_ended: keel_kernel::access::AccessEnd,
) -> Result<mpsc::Receiver<Result<Item>>> {
    keel_events::subscribe::start(
        rig.db.clone(),
        rig.events_hub(),
        keel_events::subscribe::Settings { heartbeat, queue: 64 },
        keel_events::subscribe::Subscription {
            topics: topics.iter().map(|topic| (*topic).to_owned()).collect(),
            after,
            principal,
        },
        access_ended,
    )
    .await
}

impl Rig {
    /// The hub subscribers listen on (see [`Rig::listener`]).
    fn events_hub(&self) -> Arc<keel_events::hub::Hub> {
        self.listener.hub()
    }
}

async fn committed_events_arrive_in_order_and_rolled_back_ones_never(backend: Backend, transport: Transport) {
    let rig = rig(backend, transport, Settings::default(), Registry::default()).await;
    let user = Uuid::now_v7();
    let mut live = subscribe(&rig, admin(), &["test.*"], 0).await.unwrap();
    for index in 0..20 {
        add(&rig, &format!("note {index}"), user, false).await.unwrap();
        // Every third command fails after recording: its event must vanish with it.
        if index % 3 == 0 {
            assert!(add(&rig, &format!("rolled back {index}"), user, true).await.is_err());
        }
    }
    // A marker last: a rolled-back event, had it been published, would come before it.
    add(&rig, "marker", user, false).await.unwrap();
    let events = collect(&mut live, 21).await;
    assert_eq!(events.len(), 21, "{transport:?}");
    let sequences: Vec<u64> = events.iter().map(|event| event.sequence).collect();
    assert_eq!(sequences, (1..=21).collect::<Vec<_>>());
    let texts: Vec<String> = events.iter().map(|event| event.aggregate_id.clone()).collect();
    let mut expected: Vec<String> = (0..20).map(|index| format!("note {index}")).collect();
    expected.push("marker".to_owned());
    assert_eq!(texts, expected);
    assert_eq!(store::latest_sequence(&rig.db).await.unwrap(), 21);
}

async fn a_late_subscriber_replays_then_continues_live_without_gap_or_duplicate(
    backend: Backend,
    transport: Transport,
) {
    let rig = rig(backend, transport, Settings::default(), Registry::default()).await;
    let user = Uuid::now_v7();
    for index in 0..10 {
        add(&rig, &format!("early {index}"), user, false).await.unwrap();
    }
    rig.events.flush().await.unwrap();
    let mut from_four = subscribe(&rig, admin(), &[], 4).await.unwrap();
    let writer = {
        let bus = rig.bus.clone();
        tokio::spawn(async move {
            for index in 0..30 {
                bus.execute(
                    &RequestContext::new("test"),
                    AddNote {
                        text: format!("late {index}"),
                        user,
                        fail: false,
                    },
                )
                .await
                .unwrap();
            }
        })
    };
    let events = collect(&mut from_four, 36).await;
    writer.await.unwrap();
    let sequences: Vec<u64> = events.iter().map(|event| event.sequence).collect();
    assert_eq!(sequences, (5..=40).collect::<Vec<_>>(), "{transport:?}");
}

async fn users_see_only_their_own_events(backend: Backend, transport: Transport) {
    let rig = rig(backend, transport, Settings::default(), Registry::default()).await;
    let (alice, bob) = (Uuid::now_v7(), Uuid::now_v7());
    let as_user = |user_id| Principal {
        user_id,
        session_id: Uuid::now_v7(),
        role: Role::User,
        access_expires_at: None,
    };
    let mut bobs = subscribe(&rig, as_user(bob), &[], 0).await.unwrap();
    for index in 0..5 {
        add(&rig, &format!("alice {index}"), alice, false).await.unwrap();
    }
    add(&rig, "bob 0", bob, false).await.unwrap();
    add(&rig, "alice 5", alice, false).await.unwrap();
    // Bob's marker: whatever of Alice's leaked would arrive before it.
    add(&rig, "bob marker", bob, false).await.unwrap();
    let seen = |events: Vec<Arc<Envelope>>| -> Vec<(u64, String)> {
        events
            .iter()
            .map(|event| (event.sequence, event.aggregate_id.clone()))
            .collect()
    };
    let expected = [(6, "bob 0".to_owned()), (8, "bob marker".to_owned())];
    assert_eq!(seen(collect(&mut bobs, 2).await), expected, "{transport:?}");
    // Replayed from the table (filtered there by owner), the same.
    let mut replayed = subscribe(&rig, as_user(bob), &[], 0).await.unwrap();
    assert_eq!(seen(collect(&mut replayed, 2).await), expected);
    let mut from_seven = subscribe(&rig, as_user(bob), &["test.note.*"], 6).await.unwrap();
    add(&rig, "bob live", bob, false).await.unwrap();
    assert_eq!(
        seen(collect(&mut from_seven, 2).await),
        [(8, "bob marker".to_owned()), (9, "bob live".to_owned())]
    );
}

async fn a_cursor_beyond_what_a_sequence_can_be_is_refused(backend: Backend, transport: Transport) {
    let rig = rig(backend, transport, Settings::default(), Registry::default()).await;
    let error = subscribe(&rig, admin(), &[], i64::MAX as u64 + 1).await.unwrap_err();
    assert_eq!(error.code(), Code::InvalidArgument);
    assert!(subscribe(&rig, admin(), &[], i64::MAX as u64).await.is_ok());
}

async fn a_subscription_ends_when_its_access_ends_saying_where_to_resume(backend: Backend, transport: Transport) {
    let rig = rig(backend, transport, Settings::default(), Registry::default()).await;
    let user = Uuid::now_v7();
    let (end, ended) = tokio::sync::oneshot::channel::<()>();
    let access_ended = Box::pin(async move {
        let _ = ended.await;
        keel_kernel::AccessEnded::Revoked
    });
    let mut receiver = start_subscription(&rig, admin(), &[], 0, Duration::from_secs(30), access_ended)
        .await
        .unwrap();
    for index in 0..3 {
        add(&rig, &format!("n{index}"), user, false).await.unwrap();
    }
    assert_eq!(collect(&mut receiver, 3).await.len(), 3);
    end.send(()).unwrap();
    let error = loop {
        match tokio::time::timeout(Duration::from_secs(10), receiver.recv())
            .await
            .unwrap()
        {
            Some(Ok(Item::Heartbeat { .. })) => {}
            Some(Ok(Item::Event(event))) => panic!("an event after access ended: {}", event.sequence),
            Some(Err(error)) => break error,
            None => panic!("ended without saying why"),
        }
    };
    assert_eq!(error.code(), Code::Unauthenticated);
    let (reason, metadata) = error.info().expect("an ErrorInfo");
    assert_eq!(reason, "SESSION_ENDED");
    assert_eq!(metadata, [("resume_after_sequence".to_owned(), "3".to_owned())]);
    assert!(receiver.recv().await.is_none(), "nothing after the error");
}

async fn heartbeats_carry_the_subscribers_own_cursor(backend: Backend, transport: Transport) {
    let rig = rig(backend, transport, Settings::default(), Registry::default()).await;
    let (alice, bob) = (Uuid::now_v7(), Uuid::now_v7());
    let bob_principal = Principal {
        user_id: bob,
        session_id: Uuid::now_v7(),
        role: Role::User,
        access_expires_at: None,
    };
    let mut bobs = start_subscription(
        &rig,
        bob_principal,
        &[],
        0,
        Duration::from_millis(20),
        keel_kernel::access::never(),
    )
    .await
    .unwrap();
    add(&rig, "bob's", bob, false).await.unwrap();
    for index in 0..4 {
        add(&rig, &format!("alice {index}"), alice, false).await.unwrap();
    }
    assert_eq!(collect(&mut bobs, 1).await[0].sequence, 1);
    // Once this process has seen Alice's four, a heartbeat still says 1.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while rig.events_hub().latest() < 5 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the hub never saw alice's events"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let mut heartbeats = 0;
    while heartbeats < 3 {
        match tokio::time::timeout_at(deadline, bobs.recv()).await.unwrap() {
            Some(Ok(Item::Heartbeat { cursor })) => {
                assert_eq!(cursor, 1, "a heartbeat told of other users' events");
                heartbeats += 1;
            }
            other => panic!("expected heartbeats only: {other:?}"),
        }
    }
}

async fn a_subscriber_too_slow_is_ended_with_where_to_resume(backend: Backend, transport: Transport) {
    let settings = Settings {
        hub_buffer: 16,
        ..Settings::default()
    };
    let rig = rig(backend, transport, settings, Registry::default()).await;
    let mut slow = keel_events::subscribe::start(
        rig.db.clone(),
        rig.events_hub(),
        keel_events::subscribe::Settings {
            heartbeat: Duration::from_secs(30),
            queue: 1,
        },
        keel_events::subscribe::Subscription {
            topics: Vec::new(),
            after: 0,
            principal: admin(),
        },
        keel_kernel::access::never(),
    )
    .await
    .unwrap();
    let user = Uuid::now_v7();
    for index in 0..80 {
        add(&rig, &format!("n{index}"), user, false).await.unwrap();
    }
    rig.events.flush().await.unwrap();
    // The listener's hub has sent all 80 into a buffer of 16 that the
    // subscription could not drain: it is behind.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while rig.events_hub().latest() < 80 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the listener never heard of the events"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let mut last = 0;
    let error = loop {
        match tokio::time::timeout(Duration::from_secs(10), slow.recv())
            .await
            .unwrap()
        {
            Some(Ok(Item::Event(event))) => {
                assert_eq!(event.sequence, last + 1, "never skipped silently");
                last = event.sequence;
            }
            Some(Ok(Item::Heartbeat { .. })) => {}
            Some(Err(error)) => break error,
            None => panic!("the slow subscription ended without an error"),
        }
    };
    assert_eq!(error.code(), Code::ResourceExhausted);
    assert!(
        error.message().contains(&format!("after_sequence={last}")),
        "{}",
        error.message()
    );
    let (reason, metadata) = error.info().unwrap();
    assert_eq!(reason, "SUBSCRIBER_TOO_SLOW");
    assert_eq!(metadata[0].1, last.to_string());
    assert_eq!(rig.events_hub().dropped_slow(), 1, "counted for /metrics");
}

async fn a_cursor_older_than_retention_must_resync(backend: Backend, transport: Transport) {
    let rig = rig(backend, transport, Settings::default(), Registry::default()).await;
    let user = Uuid::now_v7();
    for index in 0..5 {
        add(&rig, &format!("n{index}"), user, false).await.unwrap();
    }
    rig.events.flush().await.unwrap();
    let pruned = store::prune(
        &rig.db,
        keel_kernel::clock::now() + chrono::Duration::seconds(1),
        u64::MAX / 2,
    )
    .await
    .unwrap();
    assert_eq!(pruned, 5);
    let error = subscribe(&rig, admin(), &[], 2).await.unwrap_err();
    assert_eq!(error.code(), Code::FailedPrecondition);
    assert_eq!(error.info().unwrap().0, "RESYNC_REQUIRED");
    // From the watermark on is fine.
    let mut ok = subscribe(&rig, admin(), &[], 5).await.unwrap();
    add(&rig, "after prune", user, false).await.unwrap();
    assert_eq!(collect(&mut ok, 1).await[0].sequence, 6);
}

/// Fails its first `failures` deliveries of each event.
struct Flaky {
    failures: u32,
    attempts: AtomicU32,
    handled: mpsc::UnboundedSender<Uuid>,
}

#[async_trait]
impl EventHandler for Flaky {
    fn name(&self) -> &'static str {
        "test.flaky"
    }

    fn topics(&self) -> Vec<&'static str> {
        vec!["test.*"]
    }

    async fn handle(&self, event: &Envelope) -> Result<()> {
        if self.attempts.fetch_add(1, Ordering::SeqCst) < self.failures {
            return Err(Error::unavailable("downstream is down"));
        }
        let _ = self.handled.send(event.event_id);
        Ok(())
    }
}

async fn failing_handlers_retry_then_dead_letter_then_replay(backend: Backend, transport: Transport) {
    let (handled, mut done) = mpsc::unbounded_channel();
    let flaky = Arc::new(Flaky {
        failures: 4,
        attempts: AtomicU32::new(0),
        handled,
    });
    let mut registry = Registry::default();
    registry.add(flaky.clone());
    let settings = Settings {
        handlers: keel_events::handlers::Settings {
            max_attempts: 3,
            base_backoff: Duration::from_millis(20),
            max_backoff: Duration::from_millis(100),
            lease: Duration::from_secs(30),
        },
        ..Settings::default()
    };
    let rig = rig(backend, transport, settings, registry).await;
    let user = Uuid::now_v7();
    add(&rig, "first", user, false).await.unwrap();
    add(&rig, "second", user, false).await.unwrap();
    // The first event fails three times and is dead-lettered; the handler
    // moves on: the second fails once more (4th failure), then succeeds.
    let second = tokio::time::timeout(Duration::from_secs(10), done.recv())
        .await
        .unwrap()
        .unwrap();
    let letters: Vec<_> = store::list_dead_letters(&rig.db, false, None, 10)
        .await
        .unwrap()
        .into_iter()
        .map(|listed| {
            assert_eq!(
                listed.event.as_ref().map(|event| event.event_id),
                Some(listed.letter.event_id)
            );
            listed.letter
        })
        .collect();
    assert_eq!(letters.len(), 1);
    assert_eq!(letters[0].attempts, 3);
    assert!(
        letters[0].last_error.contains("downstream is down"),
        "{}",
        letters[0].last_error
    );
    assert_ne!(letters[0].event_id, second);
    assert_eq!(flaky.attempts.load(Ordering::SeqCst), 5);
    let (writer, listener) = (rig.events.hub(), rig.listener.hub());
    let listener_retries = if Arc::ptr_eq(&writer, &listener) {
        0
    } else {
        listener.handler_retries()
    };
    assert_eq!(
        writer.handler_retries() + listener_retries,
        3,
        "two retries of the first event, one of the second, counted for /metrics"
    );
    // The admin replays it: now the handler succeeds.
    keel_events::handlers::replay(&rig.db, &registry_of(&flaky), letters[0].id)
        .await
        .unwrap();
    assert_eq!(done.recv().await.unwrap(), letters[0].event_id);
    let replayed = store::find_dead_letter(&rig.db, letters[0].id).await.unwrap().unwrap();
    assert!(replayed.replayed_at.is_some());
    assert!(
        store::list_dead_letters(&rig.db, false, None, 10)
            .await
            .unwrap()
            .is_empty()
    );
    let again = keel_events::handlers::replay(&rig.db, &registry_of(&flaky), letters[0].id)
        .await
        .unwrap_err();
    assert_eq!(again.code(), Code::FailedPrecondition);
    assert_eq!(store::checkpoint(&rig.db, "test.flaky").await.unwrap(), Some(2));
}

fn registry_of(handler: &Arc<Flaky>) -> Registry {
    let mut registry = Registry::default();
    registry.add(handler.clone());
    registry
}

async fn concurrent_relays_never_number_an_event_twice(backend: Backend, transport: Transport) {
    let rig = rig(backend, transport, Settings::default(), Registry::default()).await;
    let user = Uuid::now_v7();
    for index in 0..60 {
        keel_events::store::insert_pending(
            &rig.db,
            &[keel_kernel::PendingEvent::new(
                &Noted(format!("{index}")),
                Some(user),
                format!("{index}"),
            )],
        )
        .await
        .unwrap();
    }
    // Four relays race (as four keel processes would), and the rig's own
    // relays (their run at start may still be going).
    let relays: Vec<_> = (0..4)
        .map(|_| {
            let db = rig.db.clone();
            tokio::spawn(async move {
                let mut numbered = Vec::new();
                for _ in 0..20 {
                    let batch = store::assign_sequences(&db, 7, keel_kernel::clock::now(), None)
                        .await
                        .expect("a relay failed");
                    let sequences: Vec<u64> = batch.iter().map(|event| event.sequence).collect();
                    assert!(
                        sequences.windows(2).all(|pair| pair[1] == pair[0] + 1),
                        "a batch is not consecutive: {sequences:?}"
                    );
                    numbered.extend(batch.into_iter().map(|event| (event.sequence, event.aggregate_id)));
                }
                numbered
            })
        })
        .collect();
    let mut all = Vec::new();
    for relay in relays {
        all.extend(relay.await.unwrap());
    }
    while !store::assign_sequences(&rig.db, 100, keel_kernel::clock::now(), None)
        .await
        .unwrap()
        .is_empty()
    {}
    // Numbered once each, none skipped, in insertion order.
    let expected: Vec<(u64, String)> = (0..60).map(|index| (index + 1, format!("{index}"))).collect();
    let table: Vec<(u64, String)> = store::read_after(&rig.db, 0, 1000)
        .await
        .unwrap()
        .into_iter()
        .map(|event| (event.sequence, event.aggregate_id))
        .collect();
    assert_eq!(table, expected);
    // And no relay was told a number that the table does not hold.
    all.sort();
    let handed_out = all.len();
    all.dedup_by_key(|(sequence, _)| *sequence);
    assert_eq!(all.len(), handed_out, "a sequence was handed out twice");
    assert!(all.iter().all(|numbered| expected.contains(numbered)), "{all:?}");
}

/// Two deployments (two PostgreSQL schemas) on one Redis, nothing but
/// Redis telling hubs of news: each subscriber sees its own deployment's
/// events, all of them, and never the other's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs PostgreSQL (KEEL_TEST_DATABASE_URL) and Redis (KEEL_TEST_REDIS_URL); run with --include-ignored"]
async fn two_deployments_on_one_redis_never_see_each_others_events() {
    let a = rig(
        Backend::Postgres,
        Transport::Redis,
        Settings::default(),
        Registry::default(),
    )
    .await;
    let b = rig(
        Backend::Postgres,
        Transport::Redis,
        Settings::default(),
        Registry::default(),
    )
    .await;
    let user = Uuid::now_v7();
    let mut on_a = subscribe(&a, admin(), &[], 0).await.unwrap();
    let mut on_b = subscribe(&b, admin(), &[], 0).await.unwrap();
    for index in 0..3 {
        add(&b, &format!("b{index}"), user, false).await.unwrap();
    }
    for index in 0..2 {
        add(&a, &format!("a{index}"), user, false).await.unwrap();
    }
    for index in 3..6 {
        add(&b, &format!("b{index}"), user, false).await.unwrap();
    }
    // The last event of each: whatever leaked in would arrive before it.
    add(&a, "a marker", user, false).await.unwrap();
    add(&b, "b marker", user, false).await.unwrap();
    let seen = |events: Vec<Arc<Envelope>>| -> Vec<(u64, String)> {
        events
            .iter()
            .map(|event| (event.sequence, event.aggregate_id.clone()))
            .collect()
    };
    assert_eq!(
        seen(collect(&mut on_a, 3).await),
        [(1, "a0".to_owned()), (2, "a1".to_owned()), (3, "a marker".to_owned())]
    );
    let mut expected_b: Vec<(u64, String)> = (0..6).map(|index| (index + 1, format!("b{index}"))).collect();
    expected_b.push((7, "b marker".to_owned()));
    assert_eq!(seen(collect(&mut on_b, 7).await), expected_b);
}

/// A message on a deployment's channel that its table does not confirm
/// (a stray client, an older keel publishing whole events) delivers nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs PostgreSQL (KEEL_TEST_DATABASE_URL) and Redis (KEEL_TEST_REDIS_URL); run with --include-ignored"]
async fn a_hub_delivers_only_what_its_table_confirms() {
    use fred::prelude::*;

    let rig = rig(
        Backend::Postgres,
        Transport::Redis,
        Settings::default(),
        Registry::default(),
    )
    .await;
    let mut live = subscribe(&rig, admin(), &[], 0).await.unwrap();
    let redis = Builder::from_config(Config::from_url(&keel_testkit::redis_url()).unwrap())
        .build()
        .unwrap();
    redis.init().await.unwrap();
    let channel = keel_events::transport::channel(rig.listener.namespace());
    assert!(
        channel.starts_with("keel:") && channel.ends_with(":events"),
        "{channel}"
    );
    assert_eq!(
        rig.listener.namespace(),
        rig.events.namespace(),
        "one database, one namespace"
    );
    let forged_event = serde_json::json!([{
        "event_id": Uuid::now_v7(), "event_name": "test.note.added", "event_version": "1.0",
        "occurred_at": "2026-01-01T00:00:00Z", "sequence": 1, "user_id": null,
        "aggregate_id": "forged", "payload_type": "google.protobuf.StringValue", "payload": "",
        "idempotency_key": null
    }]);
    for message in [
        forged_event.to_string(),
        r#"{"through":1}"#.to_owned(),
        r#"{"through":5}"#.to_owned(),
    ] {
        let receivers: u32 = redis.publish(channel.as_str(), message).await.unwrap();
        assert_eq!(
            receivers, 2,
            "the writer and the listener are both subscribed to {channel}"
        );
    }
    add(&rig, "real", Uuid::now_v7(), false).await.unwrap();
    let events = collect(&mut live, 1).await;
    assert_eq!(events.len(), 1);
    assert_eq!((events[0].sequence, events[0].aggregate_id.as_str()), (1, "real"));
    // The forged hints cost reads, not events: the next one is still 2.
    add(&rig, "next", Uuid::now_v7(), false).await.unwrap();
    assert_eq!(collect(&mut live, 1).await[0].sequence, 2);
}

/// Notifications sent while a listener was disconnected are lost: after
/// reconnecting it reads the table once. Here the events are numbered
/// without a notification, so with polling off only that read can deliver
/// them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs PostgreSQL (KEEL_TEST_DATABASE_URL); run with --include-ignored"]
async fn a_listener_that_reconnects_reads_what_it_missed() {
    use sea_orm::ConnectionTrait;

    let rig = rig(
        Backend::Postgres,
        Transport::Notify,
        Settings::default(),
        Registry::default(),
    )
    .await;
    // From here on only this test numbers events: no relay races it.
    rig.events.stop();
    let channel = keel_events::transport::postgres_channel(store::instance_id(&rig.db).await.unwrap());
    let mut live = subscribe(&rig, admin(), &[], 0).await.unwrap();
    let number = |notify: Option<String>| {
        let db = rig.db.clone();
        async move {
            store::assign_sequences(&db, 100, keel_kernel::clock::now(), notify.as_deref())
                .await
                .unwrap()
                .len()
        }
    };
    add(&rig, "heard", Uuid::now_v7(), false).await.unwrap();
    assert_eq!(number(Some(channel.clone())).await, 1);
    assert_eq!(collect(&mut live, 1).await.len(), 1, "the notification arrives");
    // Unannounced: numbered without a notification, once the hub has
    // finished reading after "heard" (it reads until the table has no more).
    tokio::time::sleep(Duration::from_millis(200)).await;
    for index in 0..3 {
        store::insert_pending(
            &rig.db,
            &[keel_kernel::PendingEvent::new(
                &Noted(format!("missed {index}")),
                Some(Uuid::now_v7()),
                format!("missed {index}"),
            )],
        )
        .await
        .unwrap();
    }
    assert_eq!(number(None).await, 3);
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(rig.listener.latest_sequence(), 1, "nothing told the listener");
    let terminated = rig
        .db
        .query_all_raw(sea_orm::Statement::from_sql_and_values(
            sea_orm::DatabaseBackend::Postgres,
            // Chosen first, ended after: never anyone else's connection.
            "WITH chosen AS MATERIALIZED (SELECT pid FROM pg_stat_activity \
             WHERE datname = current_database() AND query LIKE 'LISTEN %' AND query LIKE $1) \
             SELECT pg_terminate_backend(pid) FROM chosen",
            [format!("%{channel}%").into()],
        ))
        .await
        .unwrap();
    assert_eq!(terminated.len(), 1, "the listener's connection");
    let events = collect(&mut live, 3).await;
    let texts: Vec<&str> = events.iter().map(|event| event.aggregate_id.as_str()).collect();
    assert_eq!(texts, ["missed 0", "missed 1", "missed 2"]);
}

macro_rules! contract {
    ($($name:ident),* $(,)?) => {
        $(
            mod $name {
                use super::*;

                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn sqlite_in_process() {
                    super::$name(Backend::Sqlite, Transport::InProcess).await;
                }

                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                #[ignore = "needs PostgreSQL (KEEL_TEST_DATABASE_URL); run with --include-ignored"]
                async fn postgres_in_process() {
                    super::$name(Backend::Postgres, Transport::InProcess).await;
                }

                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                #[ignore = "needs PostgreSQL (KEEL_TEST_DATABASE_URL); run with --include-ignored"]
                async fn postgres_notify() {
                    super::$name(Backend::Postgres, Transport::Notify).await;
                }

                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                #[ignore = "needs PostgreSQL (KEEL_TEST_DATABASE_URL) and Redis (KEEL_TEST_REDIS_URL); run with --include-ignored"]
                async fn postgres_redis() {
                    super::$name(Backend::Postgres, Transport::Redis).await;
                }
            }
        )*
    };
}

contract!(
    committed_events_arrive_in_order_and_rolled_back_ones_never,
    a_late_subscriber_replays_then_continues_live_without_gap_or_duplicate,
    users_see_only_their_own_events,
    a_cursor_beyond_what_a_sequence_can_be_is_refused,
    a_subscriber_too_slow_is_ended_with_where_to_resume,
    a_subscription_ends_when_its_access_ends_saying_where_to_resume,
    heartbeats_carry_the_subscribers_own_cursor,
    an_announcement_returns_once_every_process_heard_it,
    a_cursor_older_than_retention_must_resync,
    failing_handlers_retry_then_dead_letter_then_replay,
    concurrent_relays_never_number_an_event_twice,
);

/// An announcement returns only once every process ran its listener: on
/// Redis between two processes, in process within one.
async fn an_announcement_returns_once_every_process_heard_it(backend: Backend, transport: Transport) {
    let rig = rig(backend, transport, Settings::default(), Registry::default()).await;
    let (speaker, other) = (rig.events.announcer(), rig.listener.announcer());
    let heard = |announcer: &Arc<dyn keel_kernel::cluster::Announcer>| {
        let heard = Arc::new(std::sync::Mutex::new(Vec::<String>::new()));
        let into = heard.clone();
        announcer.listen(
            "test.topic",
            Arc::new(move |message: &str| into.lock().unwrap().push(message.to_owned())),
        );
        heard
    };
    let by_speaker = heard(&speaker);
    if transport != Transport::Redis {
        // Alone on SQLite, a process hears everything; on PostgreSQL without
        // Redis others may share the database unheard, so nobody relies on it.
        assert_eq!(
            speaker.hears_everything(),
            backend == Backend::Sqlite,
            "{backend:?} {transport:?}"
        );
        speaker.announce("test.topic", "alone").await;
        assert_eq!(*by_speaker.lock().unwrap(), ["alone"]);
        return;
    }
    let by_other = heard(&other);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while !(speaker.hears_everything() && other.hears_everything()) {
        assert!(
            tokio::time::Instant::now() < deadline,
            "{transport:?}: never hearing everything"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    for index in 0..5 {
        let message = format!("m{index}");
        speaker.announce("test.topic", &message).await;
        // No waiting here: the announcement returned, so both have run it.
        assert!(by_speaker.lock().unwrap().contains(&message), "{transport:?}");
        assert!(
            by_other.lock().unwrap().contains(&message),
            "{transport:?}: the other process had not heard {message}"
        );
    }
}
