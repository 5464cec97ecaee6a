//! The jobs module: durable background work in keel's own database.
//!
//! A module declares a job kind in code ([`keel_kernel::Job`] arguments, a
//! [`keel_kernel::JobHandler`], its queue and attempts) and enqueues it
//! from a command handler with [`keel_kernel::CommandContext::enqueue`]:
//! the job row is written in the command's transaction, so a rolled-back
//! command leaves no job and a committed one always has it.
//!
//! Workers run in `keel serve`: a loop per queue with its own concurrency
//! leases due jobs (`FOR UPDATE SKIP LOCKED` on PostgreSQL; one statement
//! through SQLite's single writer), woken by the commit (in process, and
//! by LISTEN/NOTIFY from every process on PostgreSQL) with a slow poll as a
//! safety net. A running job's lease is renewed by its worker; every
//! update after the fetch is fenced on state, attempt and lease token; a
//! rescuer makes jobs of dead workers available again. Failures retry with
//! the kernel's one [`keel_kernel::backoff::Backoff`] up to the kind's
//! attempts, then the job is kept as failed with every attempt's error.
//!
//! # Layout
//! - `model.rs`: states, a stored job, an attempt's error, a lease;
//! - `commands.rs`: the enqueue port the bus writes jobs through;
//! - `queries.rs`: reading a job (its owner or an admin);
//! - `worker.rs`: queue loops, running a job, the rescuer;
//! - `store.rs`: the job table, the only SQL of the module;
//! - `grpc.rs`: the gRPC services (none yet: admin services are to come);
//! - `module.rs`: the module as the composition root wires it;
//! - here: [`Jobs`], the module's handle, its [`Settings`] and the built-in
//!   `jobs.noop` kind.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use keel_kernel::backoff::Backoff;
use keel_kernel::{BusBuilder, Job, JobContext, JobError, JobHandler, JobKind, JobQueue, NewJob, Result, clock};
use sea_orm::{DatabaseConnection, TransactionTrait};
use serde::{Deserialize, Serialize};
use tokio::sync::Notify;
use uuid::Uuid;

pub mod commands;
pub mod grpc;
pub mod model;
mod module;
pub mod queries;
pub mod store;
mod worker;

pub use model::{AttemptError, JobRecord, JobState, Lease, Progress, QueueStats};

#[derive(Debug, Clone)]
pub struct Settings {
    /// Run workers in this process (off: it only enqueues).
    pub workers: bool,
    /// Jobs of one queue running at once in this process, unless `queues`
    /// says otherwise.
    pub concurrency: usize,
    /// Per-queue concurrency.
    pub queues: HashMap<String, usize>,
    /// How long a fetched job is held without a renewal; its worker renews
    /// every third of it. A dead worker's job runs again after this.
    pub lease: Duration,
    /// The safety net when no wake-up arrives (a lost notification).
    pub poll: Duration,
    /// How often expired leases are looked for.
    pub rescue_every: Duration,
    /// LISTEN on PostgreSQL for other processes' commits.
    pub listen: bool,
    /// Delays between attempts.
    pub backoff: Backoff,
    /// How long a cancelled job's handler may take to stop before it is
    /// dropped.
    pub cancel_grace: Duration,
    /// How often a `WatchJob` stream reads the job for changes made by
    /// other processes (this process's changes arrive at once).
    pub watch_poll: Duration,
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            workers: true,
            concurrency: 10,
            queues: HashMap::new(),
            lease: Duration::from_secs(30),
            poll: Duration::from_secs(60),
            rescue_every: Duration::from_secs(30),
            listen: true,
            backoff: Backoff::new(Duration::from_secs(1), Duration::from_secs(3600)),
            cancel_grace: Duration::from_secs(5),
            watch_poll: Duration::from_secs(1),
        }
    }
}

/// The jobs module's handle, cheap to clone.
#[derive(Clone)]
pub struct Jobs {
    inner: Arc<Inner>,
}

struct Inner {
    db: DatabaseConnection,
    settings: Settings,
    kinds: HashMap<&'static str, JobKind>,
    /// One per queue that has kinds here: what wakes its loop.
    wake: HashMap<&'static str, Arc<Notify>>,
    /// PostgreSQL's channel for this job table.
    channel: Option<String>,
    /// The cancellation signals of the runs in this process, by job and attempt.
    running: std::sync::Mutex<HashMap<(Uuid, u32), tokio::sync::watch::Sender<bool>>>,
    /// Jobs as this process changed them, for its `WatchJob` streams (sent
    /// only while one listens).
    changes: tokio::sync::broadcast::Sender<Arc<JobRecord>>,
}

impl Jobs {
    /// The module with every kind it may run: `kinds` from the other
    /// modules, and its own. Two kinds of one name are a wiring bug.
    pub async fn new(db: DatabaseConnection, kinds: Vec<JobKind>, settings: Settings) -> Result<Jobs> {
        let mut by_name = HashMap::new();
        for kind in kinds.into_iter().chain(builtin_kinds()) {
            if let Some(previous) = by_name.insert(kind.name, kind) {
                return Err(keel_kernel::Error::internal(format!(
                    "two job kinds named {}",
                    previous.name
                )));
            }
        }
        let wake = by_name
            .values()
            .map(|kind| (kind.queue, Arc::new(Notify::new())))
            .collect();
        let channel = store::channel(&db).await?;
        Ok(Jobs {
            inner: Arc::new(Inner {
                db,
                settings,
                kinds: by_name,
                wake,
                channel,
                running: std::sync::Mutex::default(),
                changes: tokio::sync::broadcast::channel(1024).0,
            }),
        })
    }

    pub fn db(&self) -> &DatabaseConnection {
        &self.inner.db
    }

    pub fn settings(&self) -> &Settings {
        &self.inner.settings
    }

    pub fn kind(&self, name: &str) -> Option<&JobKind> {
        self.inner.kinds.get(name)
    }

    /// What the command bus enqueues through.
    pub fn queue(&self) -> Arc<dyn JobQueue> {
        Arc::new(commands::Enqueuer::new(self.clone()))
    }

    /// Enqueues outside any command, in a transaction of its own (tools,
    /// tests, start-up work).
    pub async fn enqueue(&self, jobs: Vec<NewJob>) -> Result<Vec<Uuid>> {
        let tx = self
            .db()
            .begin_with_options(keel_kernel::bus::write_transaction())
            .await?;
        let ids = self.queue().enqueue(&tx, jobs).await?;
        tx.commit().await?;
        self.wake_all();
        Ok(ids)
    }

    pub async fn get(&self, id: Uuid) -> Result<Option<JobRecord>> {
        store::get(self.db(), id).await
    }

    /// Every registered kind.
    pub fn kinds(&self) -> impl Iterator<Item = &JobKind> {
        self.inner.kinds.values()
    }

    /// The queues that have kinds here.
    pub fn queues(&self) -> Vec<&'static str> {
        let mut queues: Vec<_> = self.inner.wake.keys().copied().collect();
        queues.sort_unstable();
        queues
    }

    /// Registers a run's cancellation signal; removed by [`Jobs::run_ended`].
    pub(crate) fn run_started(&self, id: Uuid, attempt: u32) -> tokio::sync::watch::Receiver<bool> {
        let (sender, receiver) = tokio::sync::watch::channel(false);
        self.inner
            .running
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .insert((id, attempt), sender);
        receiver
    }

    pub(crate) fn run_ended(&self, id: Uuid, attempt: u32) {
        self.inner
            .running
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .remove(&(id, attempt));
    }

    /// Signals every run of `id` in this process that the job was cancelled.
    pub(crate) fn signal_cancelled(&self, id: Uuid) {
        let running = self.inner.running.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        for ((job, _), sender) in running.iter() {
            if *job == id {
                sender.send_replace(true);
            }
        }
    }

    /// This process's job changes, for a watcher.
    pub(crate) fn subscribe_changes(&self) -> tokio::sync::broadcast::Receiver<Arc<JobRecord>> {
        self.inner.changes.subscribe()
    }

    /// Tells this process's watchers that `id` changed (reads it once, and
    /// only while someone watches: the hot path pays nothing).
    pub(crate) async fn publish(&self, id: Uuid) {
        if self.inner.changes.receiver_count() == 0 {
            return;
        }
        match store::get(self.db(), id).await {
            Ok(Some(job)) => {
                let _ = self.inner.changes.send(Arc::new(job));
            }
            Ok(None) => {}
            Err(error) => tracing::debug!(job_id = %id, error = %error, "reading a changed job for its watchers failed"),
        }
    }

    pub(crate) fn channel(&self) -> Option<&str> {
        self.inner.channel.as_deref()
    }

    /// Wakes every queue loop of this process.
    pub(crate) fn wake_all(&self) {
        for wake in self.inner.wake.values() {
            wake.notify_one();
        }
    }

    /// The worker loops, the rescuer and the PostgreSQL listener.
    pub(crate) fn spawn_tasks(&self) -> Vec<keel_kernel::BackgroundTask> {
        let settings = self.settings();
        if !settings.workers {
            return Vec::new();
        }
        let mut tasks: Vec<_> = self
            .inner
            .wake
            .iter()
            .map(|(queue, wake)| {
                let concurrency = settings.queues.get(*queue).copied().unwrap_or(settings.concurrency);
                tokio::spawn(worker::run_queue(
                    self.clone(),
                    (*queue).to_owned(),
                    concurrency,
                    wake.clone(),
                ))
            })
            .collect();
        tasks.push(tokio::spawn(worker::run_rescuer(self.clone(), settings.rescue_every)));
        if let Some(channel) = self.channel().filter(|_| settings.listen) {
            tasks.push(tokio::spawn(worker::listen(self.clone(), channel.to_owned())));
        }
        tasks
    }
}

/// Registers the module's queries.
pub fn register(bus: &mut BusBuilder, jobs: &Jobs) {
    bus.jobs(jobs.queue());
    commands::register(bus, jobs);
    queries::register(bus, jobs);
}

/// `jobs.noop`: does nothing (after `sleep_ms`, if set), or, with
/// `steps`, reports progress `steps` times, `step_ms` apart (stopping when
/// cancelled), and sets `{"steps": n}` as its result. For benchmarks, tests
/// and demos. `sleep_ms` ignores cancellation (a handler that must be
/// dropped).
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct Noop {
    #[serde(default)]
    pub sleep_ms: u64,
    #[serde(default, skip_serializing_if = "is_zero")]
    pub steps: u32,
    #[serde(default, skip_serializing_if = "is_zero_u64")]
    pub step_ms: u64,
    /// Fail (and retry) every attempt with this message.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fail: Option<String>,
}

fn is_zero(value: &u32) -> bool {
    *value == 0
}

fn is_zero_u64(value: &u64) -> bool {
    *value == 0
}

impl Job for Noop {
    const KIND: &'static str = "jobs.noop";
    const MAX_ATTEMPTS: u32 = 3;
}

/// The longest a `jobs.noop` sleeps (and each of its steps waits).
const NOOP_MAX_SLEEP: Duration = Duration::from_secs(600);
/// The most steps a `jobs.noop` reports.
const NOOP_MAX_STEPS: u32 = 1000;

struct RunNoop;

#[async_trait]
impl JobHandler<Noop> for RunNoop {
    async fn run(&self, ctx: &JobContext, job: Noop) -> std::result::Result<(), JobError> {
        if job.sleep_ms > 0 {
            tokio::time::sleep(Duration::from_millis(job.sleep_ms).min(NOOP_MAX_SLEEP)).await;
        }
        let steps = job.steps.min(NOOP_MAX_STEPS);
        for step in 1..=steps {
            tokio::select! {
                () = tokio::time::sleep(Duration::from_millis(job.step_ms).min(NOOP_MAX_SLEEP)) => {}
                () = ctx.cancelled() => return Err(keel_kernel::Error::new(keel_kernel::Code::Cancelled, "cancelled").into()),
            }
            let percent = u8::try_from(u64::from(step) * 100 / u64::from(steps)).unwrap_or(100);
            ctx.progress(percent, format!("step {step} of {steps}")).await?;
        }
        if let Some(message) = job.fail {
            return Err(keel_kernel::Error::internal(message).into());
        }
        if steps > 0 {
            ctx.set_result(&serde_json::json!({ "steps": steps }))?;
        }
        tracing::debug!(job_id = %ctx.id, attempt = ctx.attempt, at = %clock::now(), "jobs.noop ran");
        Ok(())
    }
}

fn builtin_kinds() -> Vec<JobKind> {
    vec![JobKind::new(RunNoop)]
}
