//! How jobs run, on every database (SQLite, PostgreSQL): timeouts (the
//! kind's, and a job's own), snoozes, and the graceful shutdown of a
//! process's workers.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::HashMap;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use keel_jobs::{JobRecord, JobState, Jobs, Settings};
use keel_kernel::backoff::Backoff;
use keel_kernel::{BackgroundTasks, Job, JobContext, JobError, JobHandler, JobKind, Module, NewJob};
use keel_testkit::{Backend, TestDatabase};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

/// Sleeps `sleep_ms` on attempts up to `slow_attempts`, returns at once
/// after them. Its kind's timeout is 300 ms.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Sleepy {
    key: String,
    sleep_ms: u64,
    slow_attempts: u32,
}

impl Job for Sleepy {
    const KIND: &'static str = "test.sleepy";
    const TIMEOUT: Duration = Duration::from_millis(300);
}

/// Snoozes for `delay_ms` on its first `snoozes` runs, then completes.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Snoozer {
    key: String,
    snoozes: u32,
    delay_ms: u64,
}

impl Job for Snoozer {
    const KIND: &'static str = "test.snoozer";
}

/// One run as its handler saw it.
#[derive(Debug, Clone, Copy)]
struct Run {
    at: Instant,
    attempt: u32,
}

#[derive(Default, Clone)]
struct Runs {
    runs: Arc<Mutex<HashMap<String, Vec<Run>>>>,
    /// Runs whose future was dropped before it finished.
    dropped: Arc<AtomicU32>,
    finished: Arc<AtomicU32>,
}

impl Runs {
    fn note(&self, key: &str, ctx: &JobContext) -> usize {
        let mut runs = self.runs.lock().unwrap();
        let runs = runs.entry(key.to_owned()).or_default();
        runs.push(Run {
            at: Instant::now(),
            attempt: ctx.attempt,
        });
        runs.len()
    }

    fn of(&self, key: &str) -> Vec<Run> {
        self.runs.lock().unwrap().get(key).cloned().unwrap_or_default()
    }
}

/// Counts a dropped run: the future went away before `finish`.
struct DropCheck<'a> {
    runs: &'a Runs,
    finished: bool,
}

impl Drop for DropCheck<'_> {
    fn drop(&mut self) {
        let counter = if self.finished {
            &self.runs.finished
        } else {
            &self.runs.dropped
        };
        counter.fetch_add(1, Ordering::SeqCst);
    }
}

#[async_trait]
impl JobHandler<Sleepy> for Runs {
    async fn run(&self, ctx: &JobContext, job: Sleepy) -> Result<(), JobError> {
        self.note(&job.key, ctx);
        let mut check = DropCheck {
            runs: self,
            finished: false,
        };
        if ctx.attempt <= job.slow_attempts {
            tokio::time::sleep(Duration::from_millis(job.sleep_ms)).await;
        }
        check.finished = true;
        Ok(())
    }
}

#[async_trait]
impl JobHandler<Snoozer> for Runs {
    async fn run(&self, ctx: &JobContext, job: Snoozer) -> Result<(), JobError> {
        let run = self.note(&job.key, ctx);
        if run <= job.snoozes as usize {
            return Err(JobError::snooze(Duration::from_millis(job.delay_ms)));
        }
        Ok(())
    }
}

fn settings() -> Settings {
    Settings {
        // Nothing but wake-ups and due times moves a worker in these tests.
        poll: Duration::from_secs(3600),
        rescue_every: Duration::from_millis(200),
        lease: Duration::from_millis(900),
        backoff: Backoff::new(Duration::from_millis(50), Duration::from_secs(1)),
        ..Settings::default()
    }
}

struct Rig {
    _database: TestDatabase,
    jobs: Jobs,
    runs: Runs,
    _tasks: BackgroundTasks,
}

async fn rig(backend: Backend, settings: Settings) -> Rig {
    let database = TestDatabase::new(backend).await;
    let db = database.db.clone();
    let runs = Runs::default();
    let kinds = vec![
        JobKind::new::<Sleepy>(runs.clone()),
        JobKind::new::<Snoozer>(runs.clone()),
    ];
    let jobs = Jobs::new(db.clone(), kinds, settings).await.unwrap();
    let tasks = BackgroundTasks::new(jobs.start_tasks(&db));
    Rig {
        _database: database,
        jobs,
        runs,
        _tasks: tasks,
    }
}

impl Rig {
    async fn enqueue(&self, job: NewJob) -> Uuid {
        let [id] = self.jobs.enqueue(vec![job]).await.unwrap()[..] else {
            panic!("one id")
        };
        id
    }

    async fn until(&self, id: Uuid, what: &str, done: impl Fn(&JobRecord) -> bool) -> JobRecord {
        let read = || async { self.jobs.get(id).await.unwrap().unwrap() };
        keel_testkit::until(what, Duration::from_secs(15), Duration::from_millis(10), read, done).await
    }
}

fn sleepy(key: &str, sleep_ms: u64, slow_attempts: u32) -> NewJob {
    NewJob::new(&Sleepy {
        key: key.to_owned(),
        sleep_ms,
        slow_attempts,
    })
    .unwrap()
}

/// The first attempt would sleep a minute; the kind's 300 ms timeout drops
/// it (the handler's future goes away) and fails the attempt; the retry,
/// fast, completes.
async fn a_run_past_its_timeout_fails_the_attempt_and_the_retry_runs(backend: Backend) {
    let rig = rig(backend, settings()).await;
    let started = Instant::now();
    let id = rig.enqueue(sleepy("a", 60_000, 1)).await;
    let job = rig.until(id, "finished", |job| job.state.is_finished()).await;
    assert_eq!(job.state, JobState::Completed, "{job:#?}");
    assert_eq!(job.attempt, 2, "{job:#?}");
    assert_eq!(job.errors.len(), 1, "{:?}", job.errors);
    assert_eq!(job.errors[0].attempt, 1);
    assert!(job.errors[0].message.contains("timeout of 300 ms"), "{:?}", job.errors);
    assert!(started.elapsed() < Duration::from_secs(10), "{:?}", started.elapsed());
    let runs = rig.runs.of("a");
    assert_eq!(runs.len(), 2);
    let first_run_lasted = runs[1].at - runs[0].at;
    assert!(first_run_lasted >= Duration::from_millis(300), "{first_run_lasted:?}");
    // The timed-out run was dropped, not left running beside the retry.
    assert_eq!(rig.runs.dropped.load(Ordering::SeqCst), 1);
    assert_eq!(rig.runs.finished.load(Ordering::SeqCst), 1);
}

/// A job's own timeout wins over its kind's, both ways: 1 s runs that
/// outlast the kind's 300 ms complete with a 5 s timeout, and fail with a
/// 100 ms one when it is the last attempt.
async fn a_job_overrides_its_kinds_timeout(backend: Backend) {
    let rig = rig(backend, settings()).await;
    let longer = rig
        .enqueue(sleepy("longer", 1000, 1).timeout(Duration::from_secs(5)))
        .await;
    let shorter = rig
        .enqueue(
            sleepy("shorter", 1000, 1)
                .timeout(Duration::from_millis(100))
                .max_attempts(1),
        )
        .await;
    let longer = rig.until(longer, "finished", |job| job.state.is_finished()).await;
    assert_eq!((longer.state, longer.attempt), (JobState::Completed, 1), "{longer:#?}");
    assert!(longer.errors.is_empty());
    let shorter = rig.until(shorter, "finished", |job| job.state.is_finished()).await;
    assert_eq!(shorter.state, JobState::Failed, "{shorter:#?}");
    assert!(
        shorter.errors[0].message.contains("timeout of 100 ms"),
        "{:?}",
        shorter.errors
    );
}

/// Snoozed twice for 300 ms with one attempt allowed: were a snooze a
/// failure, the job would fail at the first. It runs again after each
/// delay, always as attempt 1, and completes with no error and two snoozes
/// counted.
async fn a_snoozed_job_runs_again_after_its_delay_without_using_an_attempt(backend: Backend) {
    let rig = rig(backend, settings()).await;
    let job = NewJob::new(&Snoozer {
        key: "s".into(),
        snoozes: 2,
        delay_ms: 300,
    })
    .unwrap()
    .max_attempts(1);
    let id = rig.enqueue(job).await;
    let snoozed = rig.until(id, "snoozed", |job| job.snoozes == 1).await;
    assert_eq!(snoozed.state, JobState::Available, "{snoozed:#?}");
    assert_eq!(snoozed.attempt, 0, "the snooze gave its attempt back: {snoozed:#?}");
    assert!(snoozed.run_at > snoozed.attempted_at.unwrap());
    let job = rig.until(id, "finished", |job| job.state.is_finished()).await;
    assert_eq!(job.state, JobState::Completed, "{job:#?}");
    assert_eq!((job.attempt, job.snoozes), (1, 2), "{job:#?}");
    assert!(job.errors.is_empty(), "{:?}", job.errors);
    let runs = rig.runs.of("s");
    assert_eq!(runs.iter().map(|run| run.attempt).collect::<Vec<_>>(), [1, 1, 1]);
    for pair in runs.windows(2) {
        let gap = pair[1].at - pair[0].at;
        assert!(gap >= Duration::from_millis(300), "ran again after {gap:?}");
    }
}

/// A shutdown with a short job and a long one running: no more fetches,
/// the short one completes within the grace, the long one's run is
/// dropped at its end and the job handed back (available, attempt given
/// back, no lease), so it does not wait out its lease.
async fn a_shutdown_lets_short_jobs_finish_and_hands_back_the_rest(backend: Backend) {
    let rig = rig(
        backend,
        Settings {
            shutdown_grace: Duration::from_millis(800),
            lease: Duration::from_secs(60),
            ..settings()
        },
    )
    .await;
    let short = rig
        .enqueue(sleepy("short", 300, 1).timeout(Duration::from_secs(60)))
        .await;
    let long = rig
        .enqueue(sleepy("long", 60_000, 1).timeout(Duration::from_secs(120)))
        .await;
    for id in [short, long] {
        rig.until(id, "ran", |job| job.state == JobState::Running).await;
    }
    let started = Instant::now();
    rig.jobs.shutdown().await;
    let took = started.elapsed();
    assert!(took >= Duration::from_millis(700), "{took:?}");
    assert!(took < Duration::from_secs(5), "{took:?}");
    let short = rig.jobs.get(short).await.unwrap().unwrap();
    assert_eq!((short.state, short.attempt), (JobState::Completed, 1), "{short:#?}");
    let long = rig.jobs.get(long).await.unwrap().unwrap();
    assert_eq!(long.state, JobState::Available, "handed back at once: {long:#?}");
    assert_eq!((long.attempt, long.lease_token), (0, None), "{long:#?}");
    assert!(long.errors.is_empty(), "{:?}", long.errors);
    assert_eq!(rig.runs.dropped.load(Ordering::SeqCst), 1);
    // Stopped: a new job waits for another process.
    let later = rig.enqueue(sleepy("later", 0, 0)).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(rig.jobs.get(later).await.unwrap().unwrap().state, JobState::Available);
    assert!(rig.runs.of("later").is_empty());
}

keel_testkit::on_every_backend!(
    a_run_past_its_timeout_fails_the_attempt_and_the_retry_runs,
    a_job_overrides_its_kinds_timeout,
    a_snoozed_job_runs_again_after_its_delay_without_using_an_attempt,
    a_shutdown_lets_short_jobs_finish_and_hands_back_the_rest,
);
