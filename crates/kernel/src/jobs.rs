//! Background jobs: the kinds a module declares in code, and the port
//! through which a command enqueues one in its own transaction.
//!
//! A job is enqueued if and only if its command commits: the job row and the
//! command's change share one transaction (see
//! [`crate::CommandContext::enqueue`]). Modules know only this port; the
//! jobs module stores, fetches, leases, retries and runs them.

use std::sync::Arc;

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
}

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
        })
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
}

/// The worker's side of a run, held by its [`JobContext`].
#[derive(Clone)]
pub struct JobSignals {
    reporter: Option<Arc<dyn JobReporter>>,
    cancelled: tokio::sync::watch::Receiver<bool>,
    result: Arc<std::sync::Mutex<Option<serde_json::Value>>>,
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
            _detached: Some(Arc::new(sender)),
        }
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
/// it says it must not be.
#[derive(Debug)]
pub struct JobError {
    pub error: Error,
    pub retry: bool,
}

impl JobError {
    /// A failure no retry can mend (bad arguments, a refused request): the
    /// job is failed at once.
    pub fn do_not_retry(error: impl Into<Error>) -> Self {
        Self {
            error: error.into(),
            retry: false,
        }
    }
}

impl From<Error> for JobError {
    fn from(error: Error) -> Self {
        Self { error, retry: true }
    }
}

impl std::fmt::Display for JobError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.error.fmt(f)
    }
}

/// Runs the jobs of kind `J`. Every run may be a repeat (a crash after the
/// effect, before the completion): make it idempotent, for instance by the
/// job's id.
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
    handler: Arc<dyn ErasedHandler>,
}

impl JobKind {
    pub fn new<J: Job>(handler: impl JobHandler<J>) -> Self {
        Self {
            name: J::KIND,
            queue: J::QUEUE,
            max_attempts: J::MAX_ATTEMPTS.max(1),
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
            .finish_non_exhaustive()
    }
}
