//! A queue's rate limit holds across processes: two job workers (two
//! `Jobs` on one PostgreSQL table, each with its own Redis connection, as
//! two keels have) share one allowance through the server's Redis limiter.

#![allow(clippy::unwrap_used)]

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use keel_jobs::{JobState, Jobs, RateLimits, Settings, store};
use keel_kernel::limit::{Quota, RateLimiter};
use keel_kernel::{BackgroundTasks, Job, JobContext, JobError, JobHandler, JobKind, Module, NewJob};
use keel_server::limit::RedisRateLimiter;
use keel_testkit::{Backend, TestDatabase};
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Serialize, Deserialize)]
struct Tick {
    index: u32,
}

impl Job for Tick {
    const KIND: &'static str = "test.tick";
    const QUEUE: &'static str = "limited";
}

/// When each job started, and in which worker.
#[derive(Clone, Default)]
struct Starts(Arc<Mutex<Vec<(Instant, &'static str)>>>);

struct Worker {
    name: &'static str,
    starts: Starts,
}

#[async_trait]
impl JobHandler<Tick> for Worker {
    async fn run(&self, _ctx: &JobContext, _job: Tick) -> Result<(), JobError> {
        self.starts.0.lock().unwrap().push((Instant::now(), self.name));
        Ok(())
    }
}

const LIMIT: u32 = 5;
const JOBS: u32 = 20;

async fn redis_limiter(namespace: &str) -> Arc<dyn RateLimiter> {
    let redis = RedisRateLimiter::connect(&keel_testkit::redis_url(), namespace).unwrap();
    assert!(redis.connected(Duration::from_secs(5)).await, "redis is unreachable");
    Arc::new(redis)
}

/// `limited=5/1s` on two workers of concurrency 10 each: 20 due jobs start
/// no faster than one allowance lets them, a burst of 5 then one every
/// 200 ms, however the two share them: the k-th start comes at least
/// (k - 4) × 200 ms after the first. Each worker alone would allow that
/// rate, so two unshared limiters would start them about twice as fast
/// (the test fails with `InProcessRateLimiter` in place of Redis).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs PostgreSQL and Redis (KEEL_TEST_DATABASE_URL, KEEL_TEST_REDIS_URL); run with --include-ignored"]
async fn postgres_two_workers_share_a_queues_rate_limit_through_redis() {
    let database = TestDatabase::new(Backend::Postgres).await;
    let db = database.db.clone();
    // Its own namespace: parallel tests never share an allowance.
    let namespace = format!("test-{}", uuid::Uuid::now_v7().simple());
    let quota = Quota::per_window(LIMIT, Duration::from_secs(1));
    let starts = Starts::default();
    let mut workers = Vec::new();
    let mut tasks = Vec::new();
    for name in ["first", "second"] {
        let settings = Settings {
            concurrency: 10,
            poll: Duration::from_secs(3600),
            rate_limits: RateLimits {
                quotas: HashMap::from([("limited".to_owned(), quota)]),
                limiter: redis_limiter(&namespace).await,
            },
            ..Settings::default()
        };
        let kinds = vec![JobKind::new::<Tick>(Worker {
            name,
            starts: starts.clone(),
        })];
        let jobs = Jobs::new(db.clone(), kinds, settings).await.unwrap();
        tasks.push(BackgroundTasks::new(jobs.start_tasks(&db)));
        workers.push(jobs);
    }
    let batch = (0..JOBS).map(|index| NewJob::new(&Tick { index }).unwrap()).collect();
    workers[0].enqueue(batch).await.unwrap();
    // PostgreSQL's notification wakes the other; wake it as its own commit would too.
    workers[1].enqueue(Vec::new()).await.unwrap();

    let deadline = Instant::now() + Duration::from_secs(30);
    while store::count_in_state(&db, JobState::Completed).await.unwrap() < u64::from(JOBS) {
        assert!(Instant::now() < deadline, "not every job completed");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let mut starts = starts.0.lock().unwrap().clone();
    starts.sort_by_key(|(at, _)| *at);
    assert_eq!(starts.len(), JOBS as usize, "each job ran once");
    let first = starts[0].0;
    let offsets: Vec<u128> = starts.iter().map(|(at, _)| (*at - first).as_millis()).collect();
    let per_second: Vec<usize> = (0..=offsets.last().copied().unwrap_or_default() / 1000)
        .map(|second| offsets.iter().filter(|offset| **offset / 1000 == second).count())
        .collect();
    let by_worker: HashMap<&str, usize> = starts.iter().fold(HashMap::new(), |mut counts, (_, name)| {
        *counts.entry(*name).or_default() += 1;
        counts
    });
    let period = quota.period.as_millis();
    for (index, offset) in offsets.iter().enumerate() {
        // The allowance's schedule, less some slack for the time between the
        // limiter's answer and the handler's first line.
        let earliest = (index as u128).saturating_sub(u128::from(LIMIT) - 1) * period;
        assert!(
            offset + 150 >= earliest,
            "start {index} came {offset} ms after the first, before {earliest} ms: \
             starts (ms) {offsets:?}, per second {per_second:?}, by worker {by_worker:?}"
        );
    }
    // And no slower than the limit either: the queue was not starved.
    let last = *offsets.last().unwrap();
    let schedule = u128::from(JOBS - LIMIT) * period;
    assert!(
        last < schedule + 2000,
        "the last start came {last} ms after the first (schedule {schedule} ms): {offsets:?}"
    );
}
