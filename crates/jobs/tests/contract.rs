//! The jobs machinery on every database (SQLite, PostgreSQL): enqueue in
//! the command's transaction, runs, retries with backoff, failures kept,
//! fencing of a worker that lost its lease, wake-ups by the commit.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use keel_jobs::{JobRecord, JobState, Jobs, Settings, store};
use keel_kernel::backoff::Backoff;
use keel_kernel::{
    BackgroundTasks, Bus, BusBuilder, Code, Command, CommandContext, CommandHandler, Error, Job, JobContext, JobError,
    JobHandler, JobKind, Module, NewJob, RequestContext, Result, clock,
};
use keel_testkit::{Backend, TestDatabase};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

/// Counts its runs by key.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Count {
    key: String,
}

impl Job for Count {
    const KIND: &'static str = "test.count";
}

/// Fails its first `failures` attempts, for good when `permanent`.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Flaky {
    key: String,
    failures: u32,
    permanent: bool,
}

impl Job for Flaky {
    const KIND: &'static str = "test.flaky";
    const QUEUE: &'static str = "flaky";
}

/// When each run of each key started.
#[derive(Default, Clone)]
struct Runs(Arc<Mutex<HashMap<String, Vec<Instant>>>>);

impl Runs {
    fn note(&self, key: &str) {
        self.0
            .lock()
            .unwrap()
            .entry(key.to_owned())
            .or_default()
            .push(Instant::now());
    }

    fn of(&self, key: &str) -> Vec<Instant> {
        self.0.lock().unwrap().get(key).cloned().unwrap_or_default()
    }
}

#[async_trait]
impl JobHandler<Count> for Runs {
    async fn run(&self, _ctx: &JobContext, job: Count) -> std::result::Result<(), JobError> {
        self.note(&job.key);
        Ok(())
    }
}

#[async_trait]
impl JobHandler<Flaky> for Runs {
    async fn run(&self, ctx: &JobContext, job: Flaky) -> std::result::Result<(), JobError> {
        self.note(&job.key);
        if ctx.attempt <= job.failures {
            let error = Error::unavailable(format!("attempt {} failed on purpose", ctx.attempt));
            return Err(if job.permanent {
                JobError::do_not_retry(error)
            } else {
                error.into()
            });
        }
        Ok(())
    }
}

/// Enqueues `job`, then fails when asked to (after the enqueue).
struct PlaceOrder {
    job: NewJob,
    fail: bool,
}

impl Command for PlaceOrder {
    const NAME: &'static str = "test.place_order";
    type Output = Uuid;
}

struct Orders;

#[async_trait]
impl CommandHandler<PlaceOrder> for Orders {
    async fn handle(&self, ctx: &CommandContext<'_>, command: PlaceOrder) -> Result<Uuid> {
        let id = ctx.enqueue(command.job).await?;
        if command.fail {
            return Err(Error::new(Code::Aborted, "rolled back on purpose"));
        }
        Ok(id)
    }
}

fn settings() -> Settings {
    Settings {
        // Nothing but wake-ups and due times moves a worker in these tests.
        poll: Duration::from_secs(3600),
        rescue_every: Duration::from_millis(100),
        lease: Duration::from_millis(600),
        backoff: Backoff::new(Duration::from_millis(100), Duration::from_secs(5)),
        ..Settings::default()
    }
}

struct Rig {
    _database: TestDatabase,
    db: sea_orm::DatabaseConnection,
    jobs: Jobs,
    bus: Bus,
    runs: Runs,
    _tasks: BackgroundTasks,
}

async fn rig(backend: Backend, settings: Settings) -> Rig {
    let database = TestDatabase::new(backend).await;
    let db = database.db.clone();
    let runs = Runs::default();
    let kinds = vec![JobKind::new::<Count>(runs.clone()), JobKind::new::<Flaky>(runs.clone())];
    let jobs = Jobs::new(db.clone(), kinds, settings).await.unwrap();
    let mut bus = BusBuilder::new(db.clone());
    jobs.register(&mut bus);
    bus.command(Orders);
    let tasks = BackgroundTasks::new(jobs.start_tasks(&db));
    Rig {
        _database: database,
        db,
        jobs,
        bus: bus.build(),
        runs,
        _tasks: tasks,
    }
}

impl Rig {
    async fn place(&self, job: NewJob, fail: bool) -> Result<Uuid> {
        self.bus
            .execute(&RequestContext::system(), PlaceOrder { job, fail })
            .await
    }

    /// Polls the job until it is `state` (or ten seconds pass).
    async fn until(&self, id: Uuid, state: JobState) -> JobRecord {
        let read = || async { self.jobs.get(id).await.unwrap().unwrap() };
        let what = format!("{state:?}");
        keel_testkit::until(&what, Duration::from_secs(10), Duration::from_millis(10), read, |job| {
            job.state == state
        })
        .await
    }
}

fn count(key: &str) -> NewJob {
    NewJob::new(&Count { key: key.to_owned() }).unwrap()
}

async fn committed_command_runs_its_job_once(backend: Backend) {
    let rig = rig(backend, settings()).await;
    let id = rig.place(count("a"), false).await.unwrap();
    let job = rig.until(id, JobState::Completed).await;
    assert_eq!(job.attempt, 1);
    assert!(job.errors.is_empty());
    assert!(job.finished_at.is_some());
    assert_eq!(job.lease_token, None);
    // Past a lease and a rescue or two: nobody runs it again.
    tokio::time::sleep(Duration::from_millis(900)).await;
    assert_eq!(rig.runs.of("a").len(), 1);
    assert_eq!(rig.jobs.get(id).await.unwrap().unwrap().state, JobState::Completed);
}

async fn rolled_back_command_leaves_no_job(backend: Backend) {
    let rig = rig(backend, settings()).await;
    let error = rig.place(count("b"), true).await.unwrap_err();
    assert_eq!(error.code(), Code::Aborted);
    assert_eq!(store::count(&rig.db).await.unwrap(), 0);
    // A committed one after it runs; the rolled-back one never did.
    let id = rig.place(count("c"), false).await.unwrap();
    rig.until(id, JobState::Completed).await;
    assert!(rig.runs.of("b").is_empty());
    assert_eq!(store::count(&rig.db).await.unwrap(), 1);
}

async fn an_unknown_kind_is_refused_at_the_enqueue(backend: Backend) {
    let rig = rig(backend, settings()).await;
    let mut job = count("d");
    job.kind = "test.nobody_runs_this";
    let error = rig.place(job, false).await.unwrap_err();
    assert_eq!(error.code(), Code::Internal);
    assert_eq!(store::count(&rig.db).await.unwrap(), 0);
}

async fn a_failing_job_retries_with_backoff_then_fails_with_every_error(backend: Backend) {
    let rig = rig(backend, settings()).await;
    let flaky = Flaky {
        key: "e".into(),
        failures: 99,
        permanent: false,
    };
    let id = rig
        .place(NewJob::new(&flaky).unwrap().max_attempts(3), false)
        .await
        .unwrap();
    let job = rig.until(id, JobState::Failed).await;
    assert_eq!(job.attempt, 3);
    let attempts: Vec<u32> = job.errors.iter().map(|error| error.attempt).collect();
    assert_eq!(attempts, [1, 2, 3]);
    assert!(
        job.errors[2].message.contains("attempt 3 failed on purpose"),
        "{:?}",
        job.errors
    );
    let runs = rig.runs.of("e");
    assert_eq!(runs.len(), 3);
    // Backoff 100 ms doubling, jittered into [50%, 100%].
    let first_wait = runs[1] - runs[0];
    let second_wait = runs[2] - runs[1];
    assert!(first_wait >= Duration::from_millis(50), "{first_wait:?}");
    assert!(second_wait >= Duration::from_millis(100), "{second_wait:?}");
    assert!(second_wait < Duration::from_secs(3), "{second_wait:?}");
}

async fn a_job_that_recovers_completes_keeping_earlier_errors(backend: Backend) {
    let rig = rig(backend, settings()).await;
    let flaky = Flaky {
        key: "f".into(),
        failures: 2,
        permanent: false,
    };
    let id = rig.place(NewJob::new(&flaky).unwrap(), false).await.unwrap();
    let job = rig.until(id, JobState::Completed).await;
    assert_eq!(job.attempt, 3);
    assert_eq!(job.errors.len(), 2);
    assert_eq!(rig.runs.of("f").len(), 3);
}

async fn a_do_not_retry_error_fails_at_once(backend: Backend) {
    let rig = rig(backend, settings()).await;
    let flaky = Flaky {
        key: "g".into(),
        failures: 1,
        permanent: true,
    };
    let id = rig.place(NewJob::new(&flaky).unwrap(), false).await.unwrap();
    let job = rig.until(id, JobState::Failed).await;
    assert_eq!(job.attempt, 1);
    assert_eq!(job.errors.len(), 1);
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(rig.runs.of("g").len(), 1);
}

/// Worker A leases the job and stalls past its lease; the rescuer hands
/// the job to worker B. Everything A writes afterwards is refused; B's
/// completion stands, and no later rescue or late write undoes it.
async fn a_worker_that_lost_its_lease_writes_nothing(backend: Backend) {
    let rig = rig(
        backend,
        Settings {
            workers: false,
            ..settings()
        },
    )
    .await;
    let [id] = rig.jobs.enqueue(vec![count("h")]).await.unwrap()[..] else {
        panic!("one id")
    };
    let now = clock::now();
    let short = now + chrono::Duration::milliseconds(1);
    let a = store::fetch(&rig.db, "default", 10, short, now).await.unwrap();
    assert_eq!(a.len(), 1);
    let lease_a = a[0].lease().unwrap();
    assert_eq!(lease_a.attempt, 1);
    // Nobody else may lease a running job.
    assert!(
        store::fetch(&rig.db, "default", 10, short, now)
            .await
            .unwrap()
            .is_empty()
    );

    let later = now + chrono::Duration::seconds(1);
    assert_eq!(store::rescue(&rig.db, later, 100).await.unwrap(), 1);
    let b = store::fetch(&rig.db, "default", 10, later + chrono::Duration::seconds(30), later)
        .await
        .unwrap();
    assert_eq!(b.len(), 1);
    let lease_b = b[0].lease().unwrap();
    assert_eq!(lease_b.attempt, 2);
    assert_ne!(lease_a.token, lease_b.token);

    // A wakes up: its renewal, completion, retry and failure change nothing.
    assert!(!store::renew(&rig.db, &lease_a, later).await.unwrap());
    assert!(!store::complete(&rig.db, &lease_a, later).await.unwrap());
    assert!(!store::retry(&rig.db, &lease_a, later, &[], later).await.unwrap());
    assert!(!store::fail(&rig.db, &lease_a, &[], later).await.unwrap());
    let job = rig.jobs.get(id).await.unwrap().unwrap();
    assert_eq!(
        (job.state, job.attempt, job.lease_token),
        (JobState::Running, 2, Some(lease_b.token))
    );

    // A stale lease of the same attempt (a token B never had) is refused too.
    let forged = keel_jobs::Lease {
        token: Uuid::now_v7(),
        ..lease_b
    };
    assert!(!store::complete(&rig.db, &forged, later).await.unwrap());

    assert!(store::complete(&rig.db, &lease_b, later).await.unwrap());
    // After the completion: a rescue long past the lease, and A again.
    let much_later = later + chrono::Duration::hours(1);
    assert_eq!(store::rescue(&rig.db, much_later, 100).await.unwrap(), 0);
    assert!(
        !store::retry(&rig.db, &lease_a, much_later, &[], much_later)
            .await
            .unwrap()
    );
    let job = rig.jobs.get(id).await.unwrap().unwrap();
    assert_eq!((job.state, job.attempt), (JobState::Completed, 2));
    assert_eq!(job.errors.len(), 1, "the lost lease is noted: {:?}", job.errors);
}

/// A rescue that finds the last attempt's lease expired fails the job.
async fn a_rescue_of_the_last_attempt_fails_the_job(backend: Backend) {
    let rig = rig(
        backend,
        Settings {
            workers: false,
            ..settings()
        },
    )
    .await;
    let [id] = rig.jobs.enqueue(vec![count("i").max_attempts(1)]).await.unwrap()[..] else {
        panic!("one id")
    };
    let now = clock::now();
    store::fetch(&rig.db, "default", 1, now, now).await.unwrap();
    assert_eq!(
        store::rescue(&rig.db, now + chrono::Duration::seconds(1), 100)
            .await
            .unwrap(),
        1
    );
    let job = rig.jobs.get(id).await.unwrap().unwrap();
    assert_eq!(job.state, JobState::Failed);
    assert_eq!(job.errors.len(), 1);
}

/// Higher priority (smaller number) first, and not before `run_at`.
async fn priority_and_run_at_order_the_fetch(backend: Backend) {
    let rig = rig(
        backend,
        Settings {
            workers: false,
            ..settings()
        },
    )
    .await;
    let now = clock::now();
    let ids = rig
        .jobs
        .enqueue(vec![
            count("low").priority(5),
            count("high").priority(-1),
            count("later").priority(-5).run_at(now + chrono::Duration::hours(1)),
        ])
        .await
        .unwrap();
    let leased = store::fetch(
        &rig.db,
        "default",
        10,
        now + chrono::Duration::seconds(30),
        clock::now(),
    )
    .await
    .unwrap();
    let order: Vec<Uuid> = leased.iter().map(|job| job.id).collect();
    assert_eq!(order, [ids[1], ids[0]]);
}

/// Two processes' workers (and their rescuers) on one table, small
/// concurrency: every one of many jobs runs exactly once.
async fn two_processes_run_each_of_many_jobs_exactly_once(backend: Backend) {
    let first = rig(
        backend,
        Settings {
            concurrency: 3,
            ..settings()
        },
    )
    .await;
    let second_jobs = Jobs::new(
        first.db.clone(),
        vec![JobKind::new::<Count>(first.runs.clone())],
        Settings {
            concurrency: 3,
            ..settings()
        },
    )
    .await
    .unwrap();
    let _second = BackgroundTasks::new(second_jobs.start_tasks(&first.db));
    let total = 300;
    let keys: Vec<String> = (0..total).map(|index| format!("many-{index}")).collect();
    for batch in keys.chunks(50) {
        let jobs = batch.iter().map(|key| count(key)).collect();
        first.jobs.enqueue(jobs).await.unwrap();
        // The other process hears of it by PostgreSQL's notification, or at
        // its poll on SQLite: wake it as its own commit would.
        second_jobs.enqueue(Vec::new()).await.unwrap();
    }
    let deadline = Instant::now() + Duration::from_secs(60);
    while store::count_in_state(&first.db, JobState::Completed).await.unwrap() < total as u64 {
        assert!(Instant::now() < deadline, "not every job completed");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    for key in &keys {
        assert_eq!(first.runs.of(key).len(), 1, "{key}");
    }
    assert_eq!(store::count_in_state(&first.db, JobState::Running).await.unwrap(), 0);
}

/// A worker whose poll never comes in time runs a job another process
/// enqueued: PostgreSQL's notification at the commit woke it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs PostgreSQL (KEEL_TEST_DATABASE_URL); run with --include-ignored"]
async fn postgres_wakes_workers_of_other_processes_at_the_commit() {
    let enqueuer = rig(
        Backend::Postgres,
        Settings {
            workers: false,
            ..settings()
        },
    )
    .await;
    let runner_jobs = Jobs::new(
        enqueuer.db.clone(),
        vec![JobKind::new::<Count>(enqueuer.runs.clone())],
        settings(),
    )
    .await
    .unwrap();
    let _runner = BackgroundTasks::new(runner_jobs.start_tasks(&enqueuer.db));
    // Runs once the listener is connected (it wakes the queues then).
    let warm_up = enqueuer.place(count("warm-up"), false).await.unwrap();
    enqueuer.until(warm_up, JobState::Completed).await;
    let started = Instant::now();
    let id = enqueuer.place(count("j"), false).await.unwrap();
    enqueuer.until(id, JobState::Completed).await;
    assert!(started.elapsed() < Duration::from_secs(5), "{:?}", started.elapsed());
}

/// Workers that fetched `vacuum_after` jobs vacuum the table themselves
/// (the dead fetch-index entries would slow every later fetch until
/// autovacuum came): PostgreSQL counts a vacuum that is not autovacuum's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs PostgreSQL (KEEL_TEST_DATABASE_URL); run with --include-ignored"]
async fn postgres_workers_vacuum_the_table_after_many_fetches() {
    use sea_orm::ConnectionTrait as _;
    let rig = rig(
        Backend::Postgres,
        Settings {
            vacuum_after: 200,
            ..settings()
        },
    )
    .await;
    let vacuums = || async {
        let row = rig
            .db
            .query_one_raw(sea_orm::Statement::from_string(
                sea_orm::DatabaseBackend::Postgres,
                "SELECT vacuum_count FROM pg_stat_user_tables WHERE relid = 'jobs'::regclass",
            ))
            .await
            .unwrap()
            .unwrap();
        row.try_get::<i64>("", "vacuum_count").unwrap()
    };
    assert_eq!(vacuums().await, 0);
    let total = 300;
    let jobs = (0..total).map(|index| count(&format!("v-{index}"))).collect();
    rig.jobs.enqueue(jobs).await.unwrap();
    let completed = || async { store::count_in_state(&rig.db, JobState::Completed).await.unwrap() };
    keel_testkit::until(
        "every job completed",
        Duration::from_secs(30),
        Duration::from_millis(20),
        completed,
        |done| *done == total,
    )
    .await;
    // The process counts its vacuum once the statement has returned, after
    // PostgreSQL counted it: wait for the process, then ask PostgreSQL.
    keel_testkit::until(
        "a vacuum of keel's",
        Duration::from_secs(10),
        Duration::from_millis(50),
        || async { rig.jobs.vacuums().0 },
        |count| *count >= 1,
    )
    .await;
    assert!(
        vacuums().await >= 1,
        "PostgreSQL saw no vacuum that was not autovacuum's"
    );
}

keel_testkit::on_every_backend!(
    committed_command_runs_its_job_once,
    rolled_back_command_leaves_no_job,
    an_unknown_kind_is_refused_at_the_enqueue,
    a_failing_job_retries_with_backoff_then_fails_with_every_error,
    a_job_that_recovers_completes_keeping_earlier_errors,
    a_do_not_retry_error_fails_at_once,
    a_worker_that_lost_its_lease_writes_nothing,
    a_rescue_of_the_last_attempt_fails_the_job,
    priority_and_run_at_order_the_fetch,
    two_processes_run_each_of_many_jobs_exactly_once,
);
