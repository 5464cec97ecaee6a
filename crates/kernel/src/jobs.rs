//! Background jobs: the kinds a module declares in code, and the port
//! through which a command enqueues one in its own transaction.
//!
//! A job is enqueued if and only if its command commits: the job row and the
//! command's change share one transaction (see
//! [`crate::CommandContext::enqueue`]). Modules know only this port; the
//! jobs module stores, fetches, leases, retries and runs them.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use sea_orm::DatabaseTransaction;
use serde::Serialize;
use serde::de::DeserializeOwned;
use uuid::Uuid;

use crate::error::{Error, Result};

/// The arguments of a job kind: a serde type with the kind's name, its
/// queue and how often it may be attempted.
pub trait Job: Serialize + DeserializeOwned + Send + Sync + 'static {
    /// `<module>.<what>`, e.g. `identity.send_welcome`: stable, it is stored.
    const KIND: &'static str;
    /// The queue whose workers run it (each queue has its own concurrency).
    const QUEUE: &'static str = "default";
    /// Attempts in all, the first included, before the job is failed.
    const MAX_ATTEMPTS: u32 = 5;
    /// How long one run may take: past it the run is dropped and the
    /// attempt fails (retried while attempts remain). A job may say
    /// otherwise ([`NewJob::timeout`]).
    const TIMEOUT: Duration = DEFAULT_JOB_TIMEOUT;
    /// Whether an admin may enqueue it by hand (`EnqueueJob`, with any
    /// arguments and for any user). Off by default: a kind's jobs come from
    /// its module's commands, which check what the caller may do.
    const ADMIN_ENQUEUE: bool = false;
}

/// The timeout of a kind that declares none: long enough for real work,
/// short enough that a hung handler does not hold its slot for ever.
pub const DEFAULT_JOB_TIMEOUT: Duration = Duration::from_secs(15 * 60);

/// A job to enqueue: what [`JobQueue::enqueue`] writes.
#[derive(Debug, Clone, PartialEq)]
pub struct NewJob {
    pub kind: &'static str,
    pub queue: &'static str,
    /// The arguments as JSON.
    pub args: serde_json::Value,
    /// Smaller runs first; 0 by default, negative allowed.
    pub priority: i16,
    /// Not before this time; `None` means now.
    pub run_at: Option<DateTime<Utc>>,
    pub max_attempts: u32,
    /// Whose job it is; `None` takes the command's caller (see
    /// [`crate::CommandContext::enqueue`]), or no user.
    pub user_id: Option<Uuid>,
    /// This job's run timeout; `None`: its kind's [`Job::TIMEOUT`] (read
    /// when it runs, so a new release's value applies to waiting jobs).
    pub timeout: Option<Duration>,
    /// At most one such job at a time (see [`Unique`]); `None`: any number.
    pub unique: Option<Unique>,
}

/// What makes a job unique: its kind and `key`, within a `period` when one
/// is set. An enqueue while a job of the same kind and key is in one of the
/// counted states writes nothing and returns that job's id. The database
/// enforces it (a unique index), so concurrent enqueues, in any number of
/// processes, leave one job.
///
/// `available` and `running` always count: a job moves between them by
/// itself (fetch, retry, rescue), and a second job of the key in one of them
/// would make that move collide. Finished states count when asked
/// (`counting_completed`: "once ever", within the pruning's retention).
///
/// The key is global to the kind, not per user: put the user in it when
/// uniqueness is per user (otherwise one user's enqueue returns the id of
/// another's job, which they cannot see).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Unique {
    pub key: String,
    /// Uniqueness holds within one period, aligned to the Unix epoch (an
    /// hour is a clock hour, UTC): the next period admits a new job even
    /// while the previous one waits. `None`: for as long as the job counts.
    pub period: Option<std::time::Duration>,
    pub completed: bool,
    pub failed: bool,
    pub cancelled: bool,
}

impl Unique {
    /// Unique by `key` (with the kind) while a job is available or running.
    pub fn key(key: impl Into<String>) -> Self {
        Self {
            key: key.into(),
            period: None,
            completed: false,
            failed: false,
            cancelled: false,
        }
    }

    pub fn period(mut self, period: std::time::Duration) -> Self {
        self.period = Some(period);
        self
    }

    /// A completed job of the key counts too.
    pub fn counting_completed(mut self) -> Self {
        self.completed = true;
        self
    }

    /// A failed job of the key counts too.
    pub fn counting_failed(mut self) -> Self {
        self.failed = true;
        self
    }

    /// A cancelled job of the key counts too.
    pub fn counting_cancelled(mut self) -> Self {
        self.cancelled = true;
        self
    }

    /// Every state counts: one job of the key (and period), ever, until
    /// it is pruned.
    pub fn counting_finished(self) -> Self {
        self.counting_completed().counting_failed().counting_cancelled()
    }
}

/// A job enqueued on a cron schedule, declared in code
/// ([`crate::Module::job_schedules`]) or in configuration. Every keel
/// process with workers runs the schedules; each tick enqueues `job` once
/// across all of them (its `run_at` is the tick, its uniqueness the
/// schedule's name and the tick).
#[derive(Debug, Clone, PartialEq)]
pub struct JobSchedule {
    /// Stable (it identifies the ticks already enqueued): letters, digits,
    /// `.`, `-`, `_`.
    pub name: String,
    /// A cron expression in UTC: five fields (minutes), six (seconds first)
    /// or an alias such as `@hourly`.
    pub cron: String,
    pub job: NewJob,
}

impl JobSchedule {
    pub fn new(name: impl Into<String>, cron: impl Into<String>, job: NewJob) -> Self {
        Self {
            name: name.into(),
            cron: cron.into(),
            job,
        }
    }
}

impl NewJob {
    pub fn new<J: Job>(job: &J) -> Result<Self> {
        Ok(Self {
            kind: J::KIND,
            queue: J::QUEUE,
            args: serde_json::to_value(job).map_err(Error::internal)?,
            priority: 0,
            run_at: None,
            max_attempts: J::MAX_ATTEMPTS.max(1),
            user_id: None,
            timeout: None,
            unique: None,
        })
    }

    /// At most one job of this kind and key (see [`Unique`]); an enqueue
    /// that finds one returns its id.
    pub fn unique(mut self, unique: Unique) -> Self {
        self.unique = Some(unique);
        self
    }

    pub fn priority(mut self, priority: i16) -> Self {
        self.priority = priority;
        self
    }

    pub fn run_at(mut self, run_at: DateTime<Utc>) -> Self {
        self.run_at = Some(run_at);
        self
    }

    pub fn max_attempts(mut self, max_attempts: u32) -> Self {
        self.max_attempts = max_attempts.max(1);
        self
    }

    pub fn for_user(mut self, user_id: Uuid) -> Self {
        self.user_id = Some(user_id);
        self
    }

    /// Overrides the kind's [`Job::TIMEOUT`] for this job (at least 1 ms).
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = Some(timeout.max(Duration::from_millis(1)));
        self
    }
}

/// Where the bus writes a command's jobs, inside its transaction.
#[async_trait]
pub trait JobQueue: Send + Sync + 'static {
    /// Writes `jobs` in `tx`; their ids. An unknown kind is a wiring bug
    /// (INTERNAL), found at the enqueue rather than by a worker.
    async fn enqueue(&self, tx: &DatabaseTransaction, jobs: Vec<NewJob>) -> Result<Vec<Uuid>>;

    /// Called after a transaction that enqueued committed: wake the workers.
    fn committed(&self);
}

/// What a job's handler knows about the run, and how it talks to its
/// worker: progress reports, a result, the cancellation signal.
#[derive(Debug, Clone)]
pub struct JobContext {
    pub id: Uuid,
    pub kind: String,
    /// 1 for the first attempt.
    pub attempt: u32,
    pub max_attempts: u32,
    pub user_id: Option<Uuid>,
    /// The worker's side of the run ([`JobSignals::detached`] outside a worker).
    pub signals: JobSignals,
}

impl JobContext {
    /// Reports how far the run got (`percent` is capped at 100), stored on
    /// the job fenced on the run's lease, so watchers see it. An error
    /// (FAILED_PRECONDITION) when the run no longer holds the job: it was
    /// cancelled or its lease lost; the handler should stop.
    pub async fn progress(&self, percent: u8, message: impl Into<String>) -> Result<()> {
        match &self.signals.reporter {
            Some(reporter) => reporter.progress(percent.min(100), &message.into()).await,
            None => Ok(()),
        }
    }

    /// Sets the run's result (any serde value, stored as JSON with the
    /// completion; a later call replaces it). Kept only if the run completes.
    pub fn set_result(&self, result: &impl Serialize) -> Result<()> {
        let value = serde_json::to_value(result).map_err(Error::internal)?;
        *self
            .signals
            .result
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner()) = Some(value);
        Ok(())
    }

    /// Completes the job in `tx`, the transaction that holds this run's
    /// effects, so that they and the completion commit together or not at
    /// all: once `tx` commits, no crash, lost lease or retry runs the
    /// effects again. The result set so far ([`JobContext::set_result`]) is
    /// stored with it. Fenced on the run's lease: FAILED_PRECONDITION when
    /// the run no longer holds the job (cancelled, or its lease lost to
    /// another worker); return that error, which drops `tx` and rolls the
    /// effects back.
    ///
    /// Call it last, commit `tx`, then return. A `tx` begun with
    /// [`crate::bus::write_transaction`] takes SQLite's write lock at once.
    /// If `tx` does not commit, the worker counts the run as failed (and
    /// retries it while attempts remain), whatever the handler returns.
    /// Outside a worker ([`JobSignals::detached`]) it writes nothing.
    pub async fn complete_in(&self, tx: &DatabaseTransaction) -> Result<()> {
        let Some(reporter) = &self.signals.reporter else {
            return Ok(());
        };
        let result = self
            .signals
            .result
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .clone();
        reporter.complete_in(tx, result.as_ref()).await?;
        self.signals
            .completed_in_transaction
            .store(true, std::sync::atomic::Ordering::SeqCst);
        Ok(())
    }

    /// True once the job was cancelled: stop, the outcome is discarded.
    pub fn is_cancelled(&self) -> bool {
        *self.signals.cancelled.borrow()
    }

    /// Resolves when the job is cancelled (never, if it is not). A handler
    /// that does not stop within the worker's grace period is dropped.
    pub async fn cancelled(&self) {
        let mut cancelled = self.signals.cancelled.clone();
        if cancelled.wait_for(|cancelled| *cancelled).await.is_err() {
            // The worker went away without cancelling: nothing will.
            std::future::pending::<()>().await;
        }
    }
}

/// Where a running job's progress goes: the jobs module stores it fenced
/// on the run's lease.
#[async_trait]
pub trait JobReporter: Send + Sync + 'static {
    async fn progress(&self, percent: u8, message: &str) -> Result<()>;
    /// Writes the run's completion (with `result`) in `tx`, fenced on its
    /// lease; FAILED_PRECONDITION when the run no longer holds the job.
    async fn complete_in(&self, tx: &DatabaseTransaction, result: Option<&serde_json::Value>) -> Result<()>;
}

/// The worker's side of a run, held by its [`JobContext`].
#[derive(Clone)]
pub struct JobSignals {
    reporter: Option<Arc<dyn JobReporter>>,
    cancelled: tokio::sync::watch::Receiver<bool>,
    result: Arc<std::sync::Mutex<Option<serde_json::Value>>>,
    completed_in_transaction: Arc<std::sync::atomic::AtomicBool>,
    // Keeps a detached context's channel open, so it is never cancelled.
    _detached: Option<Arc<tokio::sync::watch::Sender<bool>>>,
}

impl JobSignals {
    /// A run's signals: progress through `reporter`, cancellation when
    /// `cancelled` turns true.
    pub fn new(reporter: Arc<dyn JobReporter>, cancelled: tokio::sync::watch::Receiver<bool>) -> Self {
        Self {
            reporter: Some(reporter),
            cancelled,
            result: Arc::default(),
            completed_in_transaction: Arc::default(),
            _detached: None,
        }
    }

    /// No worker behind it (a handler called directly): progress goes
    /// nowhere, it is never cancelled.
    pub fn detached() -> Self {
        let (sender, cancelled) = tokio::sync::watch::channel(false);
        Self {
            reporter: None,
            cancelled,
            result: Arc::default(),
            completed_in_transaction: Arc::default(),
            _detached: Some(Arc::new(sender)),
        }
    }

    /// Whether the handler completed the job in its own transaction
    /// ([`JobContext::complete_in`]); whether that committed, only the
    /// table knows.
    pub fn completed_in_transaction(&self) -> bool {
        self.completed_in_transaction.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// The result the handler set, taken (for the completion to store).
    pub fn take_result(&self) -> Option<serde_json::Value> {
        self.result
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .take()
    }
}

impl Default for JobSignals {
    fn default() -> Self {
        Self::detached()
    }
}

impl std::fmt::Debug for JobSignals {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JobSignals")
            .field("cancelled", &*self.cancelled.borrow())
            .finish_non_exhaustive()
    }
}

/// How a run failed: retried (with backoff, while attempts remain) unless
/// it says it must not be; or, snoozed, not failed at all.
#[derive(Debug)]
pub struct JobError {
    pub error: Error,
    pub retry: bool,
    /// "Not now": run again after this, without using up an attempt (see
    /// [`JobError::snooze`]).
    pub snooze: Option<Duration>,
}

impl JobError {
    /// Not a failure: the job cannot do its work yet (a resource is busy, a
    /// partner asked to come back later). It becomes available again after
    /// `delay`; the snooze uses up no attempt (the attempt it took is given
    /// back, so the next run sees the same `ctx.attempt`) and adds no error;
    /// the job counts its snoozes.
    pub fn snooze(delay: Duration) -> Self {
        Self {
            error: Error::unavailable(format!("snoozed for {} ms", delay.as_millis())),
            retry: true,
            snooze: Some(delay),
        }
    }

    /// A failure no retry can mend (bad arguments, a refused request): the
    /// job is failed at once.
    pub fn do_not_retry(error: impl Into<Error>) -> Self {
        Self {
            error: error.into(),
            retry: false,
            snooze: None,
        }
    }
}

impl From<Error> for JobError {
    fn from(error: Error) -> Self {
        Self {
            error,
            retry: true,
            snooze: None,
        }
    }
}

/// A database error of a handler's own writes: retried, as any [`Error`]
/// of its kind would be.
impl From<sea_orm::DbErr> for JobError {
    fn from(error: sea_orm::DbErr) -> Self {
        Error::from(error).into()
    }
}

impl std::fmt::Display for JobError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.error.fmt(f)
    }
}

/// Runs the jobs of kind `J`. Every run may be a repeat (a crash after the
/// effect, before the completion): make it idempotent, for instance by the
/// job's id, or, when its effects are writes to keel's database, complete
/// the job in their transaction ([`JobContext::complete_in`]).
#[async_trait]
pub trait JobHandler<J: Job>: Send + Sync + 'static {
    async fn run(&self, ctx: &JobContext, job: J) -> std::result::Result<(), JobError>;
}

#[async_trait]
trait ErasedHandler: Send + Sync + 'static {
    async fn run(&self, ctx: &JobContext, args: &serde_json::Value) -> std::result::Result<(), JobError>;
    fn check(&self, args: &serde_json::Value) -> std::result::Result<(), String>;
}

struct Typed<J, H> {
    handler: H,
    _job: std::marker::PhantomData<fn() -> J>,
}

#[async_trait]
impl<J: Job, H: JobHandler<J>> ErasedHandler for Typed<J, H> {
    async fn run(&self, ctx: &JobContext, args: &serde_json::Value) -> std::result::Result<(), JobError> {
        // Arguments that no longer parse will not parse on a retry either.
        let job = J::deserialize(args)
            .map_err(|error| JobError::do_not_retry(Error::internal(format!("arguments of {}: {error}", J::KIND))))?;
        self.handler.run(ctx, job).await
    }

    fn check(&self, args: &serde_json::Value) -> std::result::Result<(), String> {
        J::deserialize(args).map(|_| ()).map_err(|error| error.to_string())
    }
}

/// A job kind with its handler, its type erased: what a module declares
/// ([`crate::Module::job_kinds`]) and the jobs module runs.
#[derive(Clone)]
pub struct JobKind {
    pub name: &'static str,
    pub queue: &'static str,
    pub max_attempts: u32,
    /// The kind's [`Job::TIMEOUT`].
    pub timeout: Duration,
    /// The kind's [`Job::ADMIN_ENQUEUE`].
    pub admin_enqueue: bool,
    handler: Arc<dyn ErasedHandler>,
}

impl JobKind {
    pub fn new<J: Job>(handler: impl JobHandler<J>) -> Self {
        Self {
            name: J::KIND,
            queue: J::QUEUE,
            max_attempts: J::MAX_ATTEMPTS.max(1),
            timeout: J::TIMEOUT.max(Duration::from_millis(1)),
            admin_enqueue: J::ADMIN_ENQUEUE,
            handler: Arc::new(Typed {
                handler,
                _job: std::marker::PhantomData,
            }),
        }
    }

    /// Whether `args` parse as the kind's arguments; why not, if they do not.
    pub fn check(&self, args: &serde_json::Value) -> std::result::Result<(), String> {
        self.handler.check(args)
    }

    /// Parses `args` as the kind's arguments and runs the handler.
    pub async fn run(&self, ctx: &JobContext, args: &serde_json::Value) -> std::result::Result<(), JobError> {
        self.handler.run(ctx, args).await
    }
}

impl std::fmt::Debug for JobKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JobKind")
            .field("name", &self.name)
            .field("queue", &self.queue)
            .field("max_attempts", &self.max_attempts)
            .field("timeout", &self.timeout)
            .finish_non_exhaustive()
    }
}
