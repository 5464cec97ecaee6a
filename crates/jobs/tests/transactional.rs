//! A handler that completes its job in the transaction of its own writes
//! (`JobContext::complete_in`), on every database: the effect and the
//! completion commit together or not at all, whatever the handler does
//! after; a cancelled run cannot complete; a cancelled run that is still
//! stopping is not run again by an admin's retry.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use keel_jobs::commands::{CancelJob, EnqueueJob, RetryJob};
use keel_jobs::{JobRecord, JobState, Jobs, Noop, Settings};
use keel_kernel::backoff::Backoff;
use keel_kernel::{
    BackgroundTasks, Bus, BusBuilder, Code, Error, Job, JobContext, JobError, JobHandler, JobKind, Module, NewJob,
    RequestContext,
};
use keel_testkit::{Backend, TestDatabase};
use sea_orm::{ConnectionTrait, DatabaseConnection, TransactionTrait};
use serde::{Deserialize, Serialize};
use tokio::sync::Notify;
use uuid::Uuid;

#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
enum Mode {
    /// Commits effect and completion, waits past its lease, then fails.
    CommitThenFail,
    /// Waits to be cancelled, then tries to complete.
    CompleteWhenCancelled,
    /// Attempt 1 completes in a transaction it rolls back, runs on past its
    /// lease and returns Ok; later attempts commit.
    RollBackFirst,
    /// Completes in a transaction it never ends (until its run is dropped).
    HoldOpen,
    /// Attempt 1 waits a minute (telling `dropped` if its run is dropped);
    /// later attempts complete.
    LingerFirst,
}

/// Writes one row to `test_effects` per run, in the transaction it
/// completes the job in.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Effect {
    mode: Mode,
}

impl Job for Effect {
    const KIND: &'static str = "test.effect";
}

#[derive(Clone)]
struct Effects {
    db: DatabaseConnection,
    /// Notified when a run started.
    started: Arc<Notify>,
    /// What `complete_in` answered a cancelled run.
    refused: Arc<Mutex<Option<Code>>>,
    /// Notified when a lingering run was dropped.
    dropped: Arc<Notify>,
}

/// Tells `dropped` when the run holding it goes away.
struct DropAlarm(Arc<Notify>);

impl Drop for DropAlarm {
    fn drop(&mut self) {
        self.0.notify_one();
    }
}

async fn write_effect(tx: &impl ConnectionTrait, ctx: &JobContext) {
    tx.execute_unprepared(&format!(
        "INSERT INTO test_effects (job_id, attempt) VALUES ('{}', {})",
        ctx.id, ctx.attempt
    ))
    .await
    .unwrap();
}

#[async_trait]
impl JobHandler<Effect> for Effects {
    async fn run(&self, ctx: &JobContext, job: Effect) -> Result<(), JobError> {
        self.started.notify_one();
        match job.mode {
            Mode::CommitThenFail => {
                let tx = self
                    .db
                    .begin_with_options(keel_kernel::bus::write_transaction())
                    .await?;
                write_effect(&tx, ctx).await;
                ctx.set_result(&serde_json::json!({ "written": 1 }))?;
                ctx.complete_in(&tx).await?;
                // Holding the row's lock past the lease: the renewal must
                // neither wait for it forever nor block the commit.
                tokio::time::sleep(Duration::from_millis(700)).await;
                tx.commit().await?;
                Err(Error::unavailable("failing after the commit").into())
            }
            Mode::CompleteWhenCancelled => {
                ctx.cancelled().await;
                let tx = self
                    .db
                    .begin_with_options(keel_kernel::bus::write_transaction())
                    .await?;
                write_effect(&tx, ctx).await;
                let refused = ctx.complete_in(&tx).await.unwrap_err();
                *self.refused.lock().unwrap() = Some(refused.code());
                // Returning the error drops `tx`: the effect rolls back.
                Err(refused.into())
            }
            Mode::RollBackFirst => {
                let tx = self
                    .db
                    .begin_with_options(keel_kernel::bus::write_transaction())
                    .await?;
                write_effect(&tx, ctx).await;
                ctx.complete_in(&tx).await?;
                if ctx.attempt == 1 {
                    tx.rollback().await?;
                    // Runs on for three leases: with the completion gone,
                    // its worker must renew the lease again.
                    tokio::time::sleep(Duration::from_millis(900)).await;
                } else {
                    tx.commit().await?;
                }
                Ok(())
            }
            Mode::HoldOpen => {
                let tx = self
                    .db
                    .begin_with_options(keel_kernel::bus::write_transaction())
                    .await?;
                write_effect(&tx, ctx).await;
                ctx.complete_in(&tx).await?;
                std::future::pending::<()>().await;
                unreachable!("never woken")
            }
            Mode::LingerFirst => {
                if ctx.attempt == 1 {
                    let _alarm = DropAlarm(self.dropped.clone());
                    tokio::time::sleep(Duration::from_secs(60)).await;
                }
                Ok(())
            }
        }
    }
}

fn settings() -> Settings {
    Settings {
        poll: Duration::from_secs(3600),
        rescue_every: Duration::from_millis(100),
        lease: Duration::from_millis(300),
        backoff: Backoff::new(Duration::from_millis(100), Duration::from_secs(1)),
        cancel_grace: Duration::from_millis(800),
        shutdown_grace: Duration::from_millis(300),
        ..Settings::default()
    }
}

struct Rig {
    _database: TestDatabase,
    db: DatabaseConnection,
    jobs: Jobs,
    bus: Bus,
    effects: Effects,
    _tasks: BackgroundTasks,
}

async fn rig(backend: Backend) -> Rig {
    rig_with(backend, settings()).await
}

async fn rig_with(backend: Backend, settings: Settings) -> Rig {
    let database = TestDatabase::new(backend).await;
    let db = database.db.clone();
    db.execute_unprepared("CREATE TABLE test_effects (job_id TEXT NOT NULL, attempt INTEGER NOT NULL)")
        .await
        .unwrap();
    let effects = Effects {
        db: db.clone(),
        started: Arc::new(Notify::new()),
        refused: Arc::default(),
        dropped: Arc::default(),
    };
    let jobs = Jobs::new(db.clone(), vec![JobKind::new::<Effect>(effects.clone())], settings)
        .await
        .unwrap();
    let mut bus = BusBuilder::new(db.clone());
    jobs.register(&mut bus);
    let tasks = BackgroundTasks::new(jobs.start_tasks(&db));
    Rig {
        _database: database,
        db,
        jobs,
        bus: bus.build(),
        effects,
        _tasks: tasks,
    }
}

impl Rig {
    async fn enqueue(&self, mode: Mode) -> Uuid {
        self.jobs
            .enqueue(vec![NewJob::new(&Effect { mode }).unwrap()])
            .await
            .unwrap()[0]
    }

    /// Polls the job until `done` holds (or ten seconds pass).
    async fn until(&self, id: Uuid, what: &str, done: impl Fn(&JobRecord) -> bool) -> JobRecord {
        let read = || async { self.jobs.get(id).await.unwrap().unwrap() };
        keel_testkit::until(what, Duration::from_secs(10), Duration::from_millis(10), read, done).await
    }

    /// The attempts that left an effect, for `id`.
    async fn effects_of(&self, id: Uuid) -> Vec<i64> {
        let rows = self
            .db
            .query_all_raw(sea_orm::Statement::from_string(
                self.db.get_database_backend(),
                format!("SELECT attempt FROM test_effects WHERE job_id = '{id}' ORDER BY attempt"),
            ))
            .await
            .unwrap();
        rows.iter()
            .map(|row| {
                row.try_get::<i64>("", "attempt")
                    .or_else(|_| row.try_get::<i32>("", "attempt").map(i64::from))
                    .unwrap()
            })
            .collect()
    }
}

async fn a_committed_completion_stands_whatever_the_handler_returns(backend: Backend) {
    let rig = rig(backend).await;
    let id = rig.enqueue(Mode::CommitThenFail).await;
    let job = rig.until(id, "finished", |job| job.state.is_finished()).await;
    assert_eq!(job.state, JobState::Completed, "{job:#?}");
    assert_eq!(job.attempt, 1);
    assert!(job.errors.is_empty(), "{:?}", job.errors);
    assert_eq!(job.result, Some(serde_json::json!({ "written": 1 })));
    assert_eq!(job.lease_token, None);
    // Past the lease and a few rescues: it never runs again.
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert_eq!(rig.jobs.get(id).await.unwrap().unwrap().attempt, 1);
    assert_eq!(rig.effects_of(id).await, [1]);
    // The handler's error after the commit is no failure of the job: none
    // is counted (the metrics' retries and give-ups).
    assert_eq!(rig.jobs.failure_counts(), (0, 0));
}

async fn a_cancelled_run_cannot_complete_and_its_effect_rolls_back(backend: Backend) {
    let rig = rig(backend).await;
    let started = rig.effects.started.notified();
    let id = rig.enqueue(Mode::CompleteWhenCancelled).await;
    tokio::time::timeout(Duration::from_secs(10), started)
        .await
        .expect("the run started");
    let cancelled = rig
        .bus
        .execute(&RequestContext::system(), CancelJob { id })
        .await
        .unwrap();
    assert_eq!(cancelled.state, JobState::Cancelled);
    assert!(
        cancelled.leased_until.is_some(),
        "a running job is stopping: {cancelled:#?}"
    );
    // Once the handler stopped, the worker says so in the table.
    let stopped = rig.until(id, "stopped", |job| job.leased_until.is_none()).await;
    assert_eq!(stopped.state, JobState::Cancelled);
    assert_eq!(*rig.effects.refused.lock().unwrap(), Some(Code::FailedPrecondition));
    assert_eq!(rig.effects_of(id).await, Vec::<i64>::new());
}

async fn a_completion_that_rolled_back_counts_as_a_failed_attempt(backend: Backend) {
    let rig = rig(backend).await;
    let id = rig.enqueue(Mode::RollBackFirst).await;
    let job = rig.until(id, "finished", |job| job.state.is_finished()).await;
    assert_eq!(job.state, JobState::Completed, "{job:#?}");
    assert_eq!(job.attempt, 2);
    assert_eq!(job.errors.len(), 1, "{:?}", job.errors);
    assert!(job.errors[0].message.contains("did not commit"), "{:?}", job.errors);
    assert_eq!(rig.effects_of(id).await, [2]);
}

async fn a_retry_waits_for_a_cancelled_run_to_stop(backend: Backend) {
    let rig = rig(backend).await;
    // Ignores the signal: its worker drops it at the end of the grace.
    let noop = NewJob::new(&Noop {
        sleep_ms: 2000,
        ..Noop::default()
    })
    .unwrap();
    let id = rig.jobs.enqueue(vec![noop]).await.unwrap()[0];
    rig.until(id, "ran", |job| job.state == JobState::Running).await;
    let system = RequestContext::system();
    rig.bus.execute(&system, CancelJob { id }).await.unwrap();
    let early = rig.bus.execute(&system, RetryJob { id }).await.unwrap_err();
    assert_eq!(early.code(), Code::FailedPrecondition, "{early:?}");
    assert!(early.message().contains("may still be stopping"), "{early:?}");
    let stopped = rig.until(id, "stopped", |job| job.leased_until.is_none()).await;
    assert_eq!(stopped.state, JobState::Cancelled);
    let retried = rig.bus.execute(&system, RetryJob { id }).await.unwrap();
    assert_eq!(retried.state, JobState::Available);
    let done = rig
        .until(id, "completed again", |job| job.state == JobState::Completed)
        .await;
    assert_eq!(done.attempt, 2);
}

/// A shutdown finds a handler holding the transaction of its completion
/// (and so the job's row, or SQLite's file): the run is dropped, its
/// transaction rolls back, and only then is the job handed back, which
/// that transaction's lock would otherwise have blocked.
async fn a_run_holding_its_transaction_at_shutdown_is_handed_back(backend: Backend) {
    // A lease that outlasts the test: no rescuer takes the job first.
    let rig = rig_with(
        backend,
        Settings {
            lease: Duration::from_secs(60),
            ..settings()
        },
    )
    .await;
    let started = rig.effects.started.notified();
    let id = rig.enqueue(Mode::HoldOpen).await;
    tokio::time::timeout(Duration::from_secs(10), started)
        .await
        .expect("the run started");
    rig.until(id, "ran", |job| job.state == JobState::Running).await;
    tokio::time::timeout(Duration::from_secs(10), rig.jobs.shutdown())
        .await
        .expect("the shutdown ended");
    let job = rig.jobs.get(id).await.unwrap().unwrap();
    assert_eq!(job.state, JobState::Available, "handed back: {job:#?}");
    assert_eq!((job.attempt, job.lease_token), (0, None), "{job:#?}");
    assert_eq!(rig.effects_of(id).await, Vec::<i64>::new());
}

/// While the job's row is locked (PostgreSQL) or the database is (SQLite),
/// no renewal gets through: after a whole lease without one, the worker
/// drops the run, as the rescuer may give the job to another worker (the
/// stopping bound a cancel sets assumes it). Once the lock goes, the job
/// runs again.
async fn a_run_without_a_renewal_for_a_whole_lease_is_abandoned(backend: Backend) {
    let rig = rig(backend).await;
    let started = rig.effects.started.notified();
    let id = rig.enqueue(Mode::LingerFirst).await;
    tokio::time::timeout(Duration::from_secs(10), started)
        .await
        .expect("the run started");
    rig.until(id, "ran", |job| job.state == JobState::Running).await;
    let dropped = rig.effects.dropped.notified();
    let blocker = rig
        .db
        .begin_with_options(keel_kernel::bus::write_transaction())
        .await
        .unwrap();
    blocker
        .execute_unprepared(&format!("UPDATE jobs SET priority = priority WHERE id = '{id}'"))
        .await
        .unwrap();
    // A lease is 300 ms; renewals come every 100 ms.
    tokio::time::timeout(Duration::from_secs(5), dropped)
        .await
        .expect("the run was dropped while no renewal got through");
    blocker.rollback().await.unwrap();
    let done = rig.until(id, "completed", |job| job.state == JobState::Completed).await;
    assert_eq!(done.attempt, 2, "{done:#?}");
}

async fn admins_enqueue_only_kinds_that_allow_it(backend: Backend) {
    let rig = rig(backend).await;
    let system = RequestContext::system();
    let enqueue = |kind: &str, args: serde_json::Value| EnqueueJob {
        kind: kind.to_owned(),
        args,
        priority: 0,
        run_at: None,
        max_attempts: 0,
        user_id: None,
    };
    let refused = rig
        .bus
        .execute(
            &system,
            enqueue("test.effect", serde_json::json!({ "mode": "RollBackFirst" })),
        )
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::InvalidArgument, "{refused:?}");
    assert!(format!("{refused:?}").contains("not enqueued by hand"), "{refused:?}");
    let enqueued = rig
        .bus
        .execute(&system, enqueue("jobs.noop", serde_json::json!({})))
        .await
        .unwrap();
    assert_eq!(enqueued.kind, "jobs.noop");
    rig.until(enqueued.id, "completed", |job| job.state == JobState::Completed)
        .await;
}

keel_testkit::on_every_backend!(
    a_committed_completion_stands_whatever_the_handler_returns,
    a_cancelled_run_cannot_complete_and_its_effect_rolls_back,
    a_completion_that_rolled_back_counts_as_a_failed_attempt,
    a_retry_waits_for_a_cancelled_run_to_stop,
    admins_enqueue_only_kinds_that_allow_it,
    a_run_holding_its_transaction_at_shutdown_is_handed_back,
    a_run_without_a_renewal_for_a_whole_lease_is_abandoned,
);
