//! `just bench-events`: commit-to-subscriber latency with 1, 100 and 1000
//! subscribers, and sustained events per second through the relay, beside a
//! raw Redis PUBLISH -> SUBSCRIBE baseline measured in the same run.
//!
//! Database: `KEEL_BENCH_DATABASE_URL` (PostgreSQL) or a temporary SQLite
//! file. Redis: `KEEL_BENCH_REDIS_URL` (default redis://127.0.0.1:6379); keel
//! runs with the Redis transport, as a cluster would.

// A benchmark: a setup that fails ends the run with its reason.
#![allow(clippy::expect_used)]

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use fred::clients::SubscriberClient;
use fred::prelude::*;
use keel_events::subscribe::{Item, Subscription};
use keel_events::{Events, Settings};
use keel_kernel::{BusBuilder, Command, CommandContext, CommandHandler, DomainEvent, Principal, RequestContext, Role};
use uuid::Uuid;

struct Tick(u64);

impl DomainEvent for Tick {
    const NAME: &'static str = "bench.tick";
    const PAYLOAD_TYPE: &'static str = "google.protobuf.UInt64Value";

    fn encode_payload(&self) -> Vec<u8> {
        prost::Message::encode_to_vec(&self.0)
    }
}

struct Emit(u64);

impl Command for Emit {
    const NAME: &'static str = "bench.emit";
    type Output = ();
}

struct Emitter;

#[async_trait]
impl CommandHandler<Emit> for Emitter {
    async fn handle(&self, ctx: &CommandContext<'_>, command: Emit) -> keel_kernel::Result<()> {
        ctx.record(&Tick(command.0), None, command.0.to_string());
        // The event needs a transaction to be written in, like any command's.
        ctx.tx().await?;
        Ok(())
    }
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

fn ms(duration: Duration) -> f64 {
    duration.as_secs_f64() * 1000.0
}

/// Latencies (commit returned -> subscriber received) for `events` events,
/// one every `gap`, with `subscribers` subscribers.
async fn keel_latency(
    events_module: &Events,
    bus: &keel_kernel::Bus,
    db: &sea_orm::DatabaseConnection,
    subscribers: usize,
    events: u64,
    gap: Duration,
    base: u64,
) -> Vec<Duration> {
    let committed: Arc<Mutex<Vec<Option<Instant>>>> = Arc::new(Mutex::new(vec![None; events as usize]));
    let received: Arc<Mutex<Vec<(u64, Instant)>>> =
        Arc::new(Mutex::new(Vec::with_capacity(subscribers * events as usize)));
    let admin = Principal {
        user_id: Uuid::now_v7(),
        session_id: Uuid::now_v7(),
        role: Role::Admin,
        access_expires_at: None,
    };
    let mut consumers = Vec::new();
    for _ in 0..subscribers {
        let mut receiver = keel_events::subscribe::start(
            db.clone(),
            events_module.hub(),
            keel_events::subscribe::Settings {
                heartbeat: Duration::from_secs(60),
                queue: 1024,
            },
            Subscription {
                topics: vec!["bench.*".into()],
                after: events_module.latest_sequence(),
                principal: admin.clone(),
            },
            keel_kernel::access::never(),
        )
        .await
        .expect("subscribe");
        let received = received.clone();
        consumers.push(tokio::spawn(async move {
            let mut got = 0;
            while got < events {
                match tokio::time::timeout(Duration::from_secs(30), receiver.recv()).await {
                    Ok(Some(Ok(Item::Event(event)))) => {
                        let index: u64 = event.aggregate_id.parse().unwrap_or(0);
                        if index >= base {
                            received
                                .lock()
                                .unwrap_or_else(|p| p.into_inner())
                                .push((index - base, Instant::now()));
                            got += 1;
                        }
                    }
                    Ok(Some(Ok(Item::Heartbeat { .. }))) => {}
                    _ => break,
                }
            }
        }));
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    for index in 0..events {
        bus.execute(&RequestContext::system(), Emit(base + index))
            .await
            .expect("commit");
        committed.lock().unwrap_or_else(|p| p.into_inner())[index as usize] = Some(Instant::now());
        tokio::time::sleep(gap).await;
    }
    for consumer in consumers {
        let _ = consumer.await;
    }
    let committed = committed.lock().unwrap_or_else(|p| p.into_inner()).clone();
    let received = received.lock().unwrap_or_else(|p| p.into_inner()).clone();
    let mut latencies: Vec<Duration> = received
        .iter()
        .filter_map(|(index, at)| committed[*index as usize].map(|commit| at.saturating_duration_since(commit)))
        .collect();
    latencies.sort();
    latencies
}

async fn redis_latency(url: &str, subscribers: usize, messages: u64, gap: Duration) -> Vec<Duration> {
    let config = Config::from_url(url).expect("redis url");
    let publisher = Builder::from_config(config.clone()).build().expect("client");
    publisher.init().await.expect("redis");
    let channel = format!("bench:{}", Uuid::now_v7());
    let published: Arc<Mutex<Vec<Option<Instant>>>> = Arc::new(Mutex::new(vec![None; messages as usize]));
    let received: Arc<Mutex<Vec<(u64, Instant)>>> = Arc::new(Mutex::new(Vec::new()));
    let mut clients: Vec<SubscriberClient> = Vec::new();
    let mut consumers = Vec::new();
    for _ in 0..subscribers {
        // Room for every message of the run (a fred channel per connection).
        let subscriber = Builder::from_config(config.clone())
            .with_performance_config(|performance| performance.broadcast_channel_capacity = 256)
            .build_subscriber_client()
            .expect("subscriber");
        subscriber.init().await.expect("redis");
        let mut rx = subscriber.message_rx();
        subscriber.subscribe(channel.as_str()).await.expect("subscribe");
        let received = received.clone();
        consumers.push(tokio::spawn(async move {
            let mut got = 0;
            while got < messages {
                match tokio::time::timeout(Duration::from_secs(30), rx.recv()).await {
                    Ok(Ok(message)) => {
                        let index: u64 = message
                            .value
                            .convert::<String>()
                            .ok()
                            .and_then(|v| v.parse().ok())
                            .unwrap_or(0);
                        received
                            .lock()
                            .unwrap_or_else(|p| p.into_inner())
                            .push((index, Instant::now()));
                        got += 1;
                    }
                    _ => break,
                }
            }
        }));
        clients.push(subscriber);
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    for index in 0..messages {
        // From the call, not its reply: Redis delivers to subscribers before
        // it answers the publisher.
        published.lock().unwrap_or_else(|p| p.into_inner())[index as usize] = Some(Instant::now());
        let _: () = publisher
            .publish(channel.as_str(), index.to_string())
            .await
            .expect("publish");
        tokio::time::sleep(gap).await;
    }
    for consumer in consumers {
        let _ = consumer.await;
    }
    for client in clients {
        let _ = client.quit().await;
    }
    let _ = publisher.quit().await;
    let published = published.lock().unwrap_or_else(|p| p.into_inner()).clone();
    let mut latencies: Vec<Duration> = received
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .iter()
        .filter_map(|(index, at)| {
            published
                .get(*index as usize)
                .copied()
                .flatten()
                .map(|sent| at.saturating_duration_since(sent))
        })
        .collect();
    latencies.sort();
    latencies
}

#[tokio::main]
async fn main() {
    let redis_url = std::env::var("KEEL_BENCH_REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".into());
    let dir = std::env::temp_dir().join(format!("keel-bench-{}", Uuid::now_v7()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    // PostgreSQL: a schema of the bench's own, dropped at the end.
    let schema = format!("bench_{}", Uuid::now_v7().simple());
    let (settings, backend) = match std::env::var("KEEL_BENCH_DATABASE_URL") {
        Ok(url) => {
            let admin = keel_db::connect(&keel_db::DbSettings::new(url.clone()))
                .await
                .expect("postgres");
            sea_orm::ConnectionTrait::execute_unprepared(&admin, &format!("CREATE SCHEMA \"{schema}\""))
                .await
                .expect("schema");
            let settings = keel_db::DbSettings {
                max_connections: 16,
                schema: Some(schema.clone()),
                ..keel_db::DbSettings::new(url)
            };
            (settings, "postgres")
        }
        Err(_) => (keel_db::DbSettings::new(keel_db::sqlite_url(&dir)), "sqlite"),
    };
    let db = keel_db::connect(&settings).await.expect("database");
    keel_db::migrate(&db).await.expect("migrations");
    let events = Events::start(
        db.clone(),
        Settings {
            redis_url: Some(redis_url.clone()),
            hub_buffer: 65_536,
            ..Settings::default()
        },
        keel_events::handlers::Registry::default(),
    )
    .await
    .expect("events");
    let mut builder = BusBuilder::new(db.clone());
    builder.outbox(events.outbox()).command::<Emit>(Emitter);
    let bus = builder.build();
    tokio::time::sleep(Duration::from_millis(500)).await;

    println!(
        "keel bench-events: database {backend}, transport redis ({redis_url}), {} cores",
        std::thread::available_parallelism().map_or(1, |n| n.get())
    );
    println!();
    println!("commit-to-subscriber latency (200 events, one every 5 ms), beside Redis PUBLISH -> SUBSCRIBE");
    println!("| subscribers | keel p50 ms | keel p99 ms | redis p50 ms | redis p99 ms | p99 keel/redis |");
    println!("|---:|---:|---:|---:|---:|---:|");
    let mut base = 1_000_000;
    for subscribers in [1usize, 100, 1000] {
        let keel = keel_latency(&events, &bus, &db, subscribers, 200, Duration::from_millis(5), base).await;
        base += 1_000_000;
        let redis = redis_latency(&redis_url, subscribers, 200, Duration::from_millis(5)).await;
        let (kp50, kp99, rp50, rp99) = (
            percentile(&keel, 0.5),
            percentile(&keel, 0.99),
            percentile(&redis, 0.5),
            percentile(&redis, 0.99),
        );
        println!(
            "| {subscribers} | {:.3} | {:.3} | {:.3} | {:.3} | {:.2} |",
            ms(kp50),
            ms(kp99),
            ms(rp50),
            ms(rp99),
            ms(kp99) / ms(rp99).max(0.001)
        );
        assert_eq!(keel.len(), subscribers * 200, "every subscriber received every event");
    }

    // Sustained throughput: 8 writers commit as fast as they can; one
    // subscriber must receive every event.
    let total = 4000u64;
    let admin = Principal {
        user_id: Uuid::now_v7(),
        session_id: Uuid::now_v7(),
        role: Role::Admin,
        access_expires_at: None,
    };
    let mut receiver = keel_events::subscribe::start(
        db.clone(),
        events.hub(),
        keel_events::subscribe::Settings {
            heartbeat: Duration::from_secs(60),
            queue: 4096,
        },
        Subscription {
            topics: vec![],
            after: events.latest_sequence(),
            principal: admin,
        },
        keel_kernel::access::never(),
    )
    .await
    .expect("subscribe");
    let started = Instant::now();
    let writers: Vec<_> = (0..8u64)
        .map(|writer| {
            let bus = bus.clone();
            tokio::spawn(async move {
                for index in 0..total / 8 {
                    bus.execute(&RequestContext::system(), Emit(10_000_000 + writer * 100_000 + index))
                        .await
                        .expect("commit");
                }
            })
        })
        .collect();
    let mut got = 0;
    while got < total {
        match tokio::time::timeout(Duration::from_secs(60), receiver.recv()).await {
            Ok(Some(Ok(Item::Event(_)))) => got += 1,
            Ok(Some(Ok(Item::Heartbeat { .. }))) => {}
            other => panic!(
                "throughput run failed: {:?}",
                other.map(|item| item.map(|r| r.map(|_| ())))
            ),
        }
    }
    let keel_rate = total as f64 / started.elapsed().as_secs_f64();
    for writer in writers {
        let _ = writer.await;
    }

    let redis_rate = {
        let config = Config::from_url(&redis_url).expect("redis url");
        let publisher = Builder::from_config(config.clone()).build().expect("client");
        publisher.init().await.expect("redis");
        let subscriber = Builder::from_config(config)
            .with_performance_config(|performance| performance.broadcast_channel_capacity = 65_536)
            .build_subscriber_client()
            .expect("subscriber");
        subscriber.init().await.expect("redis");
        let mut rx = subscriber.message_rx();
        let channel = format!("bench:{}", Uuid::now_v7());
        subscriber.subscribe(channel.as_str()).await.expect("subscribe");
        let started = Instant::now();
        let publishers: Vec<_> = (0..8)
            .map(|_| {
                let publisher = publisher.clone();
                let channel = channel.clone();
                tokio::spawn(async move {
                    for index in 0..total / 8 {
                        let _: () = publisher
                            .publish(channel.as_str(), index.to_string())
                            .await
                            .expect("publish");
                    }
                })
            })
            .collect();
        let mut got = 0;
        while got < total {
            rx.recv().await.expect("message");
            got += 1;
        }
        for publisher in publishers {
            let _ = publisher.await;
        }
        total as f64 / started.elapsed().as_secs_f64()
    };
    println!();
    println!("sustained throughput ({total} events, 8 concurrent writers, 1 subscriber)");
    println!("| path | events/s | ratio to redis |");
    println!("|---|---:|---:|");
    println!(
        "| keel: commit + outbox + relay + redis + hub + subscriber | {keel_rate:.0} | {:.2} |",
        keel_rate / redis_rate
    );
    println!("| redis: PUBLISH -> SUBSCRIBE | {redis_rate:.0} | 1.00 |");
    events.stop();
    if backend == "postgres" {
        let _ = sea_orm::ConnectionTrait::execute_unprepared(&db, &format!("DROP SCHEMA \"{schema}\" CASCADE")).await;
    }
    let _ = std::fs::remove_dir_all(&dir);
}
