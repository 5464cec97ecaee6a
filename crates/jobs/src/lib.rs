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
//! A run past its timeout fails its attempt; a snooze puts the job back
//! without using one; a queue with a rate limit starts jobs only with the
//! limiter's permits; [`Jobs::shutdown`] drains the workers and hands back
//! what is still running.
//!
//! # Layout
//! - `model.rs`: states, a stored job, an attempt's error, a lease;
//! - `commands.rs`: the enqueue port the bus writes jobs through, and the
//!   admin commands (enqueue by hand, cancel, retry, delete, pause);
//! - `queries.rs`: get, list, queue statistics, watch (a user sees their
//!   own jobs; an admin every job);
//! - `worker.rs`: queue loops, running a job, the rescuer;
//! - `completer.rs`: completions of many jobs written in one fenced statement;
//! - `schedule.rs`: cron schedules, one enqueue per tick across processes;
//! - `prune.rs`: deleting finished jobs past their retention;
//! - `vacuum.rs`: vacuuming the job table under load (PostgreSQL);
//! - `store.rs`: the job table, the only SQL of the module;
//! - `grpc.rs`: the gRPC adapters of `keel.jobs.v1`;
//! - `module.rs`: the module as the composition root wires it;
//! - here: [`Jobs`], the module's handle, its [`Settings`] and the built-in
//!   `jobs.noop` kind.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use keel_kernel::backoff::Backoff;
use keel_kernel::limit::{InProcessRateLimiter, Quota, RateLimiter};
use keel_kernel::{
    BusBuilder, Job, JobContext, JobError, JobHandler, JobKind, JobQueue, JobSchedule, NewJob, Result, clock,
};
use sea_orm::{DatabaseConnection, TransactionTrait};
use serde::{Deserialize, Serialize};
use tokio::sync::{Notify, watch};
use uuid::Uuid;

pub mod commands;
mod completer;
pub mod grpc;
pub mod model;
mod module;
pub mod prune;
pub mod queries;
pub mod schedule;
pub mod store;
mod vacuum;
mod watching;
mod worker;

pub use model::{AttemptError, BreakerStats, JobRecord, JobState, Lease, Progress, QueueOverview, QueueStats};

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
    /// Write completions in batches, one fenced statement for many jobs
    /// (`completer.rs`); off, one statement and commit per job, as before
    /// (`just bench-jobs` measures both).
    pub batch_completion: bool,
    /// Per-queue rate limits on job starts, counted on the kernel's limiter
    /// port (Redis in a cluster: one allowance for every process).
    pub rate_limits: RateLimits,
    /// At a graceful shutdown, how long running jobs may take to finish
    /// before the rest are handed back.
    pub shutdown_grace: Duration,
    /// Cron schedules declared in code (the composition root gathers the
    /// modules' [`keel_kernel::Module::job_schedules`]).
    pub schedules: Vec<JobSchedule>,
    /// Cron schedules of configuration (`KEEL_JOBS_CRON`); one named like a
    /// schedule of code replaces it.
    pub cron: Vec<schedule::CronEntry>,
    /// How long finished jobs are kept.
    pub retention: prune::Retention,
    /// How often finished jobs past their retention are deleted.
    pub prune_every: Duration,
    /// PostgreSQL: vacuum the job table after this many jobs this process
    /// fetched (`vacuum.rs`); 0: leave it to autovacuum.
    pub vacuum_after: u64,
    /// How long a cancelled job's handler may take to stop before it is
    /// dropped.
    pub cancel_grace: Duration,
    /// How often this process reads its watched jobs (one poller for all
    /// its `WatchJob` streams) for changes other processes made; this
    /// process's changes arrive at once.
    pub watch_poll: Duration,
    /// `WatchJob` streams one caller may hold open at once in a process
    /// (more: RESOURCE_EXHAUSTED).
    pub watch_per_caller: usize,
    /// The outbound targets' circuit breakers in this process (the jobs
    /// and handlers call through them), shown in `GetQueueStats`.
    pub breakers: Vec<Arc<keel_kernel::outbound::Breaker>>,
}

/// Per-queue limits on how fast jobs start, and the limiter that counts
/// them. A worker takes a job of a limited queue only with a permit; a job
/// it could not start stays available, untouched.
#[derive(Clone)]
pub struct RateLimits {
    pub quotas: HashMap<String, Quota>,
    pub limiter: Arc<dyn RateLimiter>,
}

impl RateLimits {
    /// The limiter's key for `queue` (the limiter adds its namespace).
    pub fn key(queue: &str) -> String {
        format!("jobs:{queue}")
    }
}

impl Default for RateLimits {
    fn default() -> Self {
        Self {
            quotas: HashMap::new(),
            limiter: Arc::new(InProcessRateLimiter::new()),
        }
    }
}

impl std::fmt::Debug for RateLimits {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RateLimits")
            .field("quotas", &self.quotas)
            .finish_non_exhaustive()
    }
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
            batch_completion: true,
            rate_limits: RateLimits::default(),
            shutdown_grace: Duration::from_secs(10),
            schedules: Vec::new(),
            cron: Vec::new(),
            retention: prune::Retention::default(),
            prune_every: Duration::from_secs(300),
            vacuum_after: 5_000,
            cancel_grace: Duration::from_secs(5),
            watch_poll: Duration::from_secs(1),
            watch_per_caller: 100,
            breakers: Vec::new(),
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
    completer: completer::Completer,
    /// Where the workers are in their life: running, or shutting down.
    phase: watch::Sender<Phase>,
    /// Queue loops still running (each holds a [`worker::LoopGuard`]).
    loops: watch::Sender<usize>,
    /// The cron schedules this process runs.
    schedules: Vec<schedule::Schedule>,
    /// The cancellation signals of the runs in this process.
    running: std::sync::Mutex<Runs>,
    /// The jobs this process's streams watch, each with its latest row.
    watched: std::sync::Mutex<watching::Watched>,
    /// Attempts this process's workers failed and scheduled again.
    retried: std::sync::atomic::AtomicU64,
    /// Jobs this process's workers gave up on.
    gave_up: std::sync::atomic::AtomicU64,
    /// Jobs this process leased since its last vacuum of the table.
    fetched: std::sync::atomic::AtomicU64,
    /// Vacuums of the table this process ran, and their time in all.
    vacuums: std::sync::atomic::AtomicU64,
    vacuum_micros: std::sync::atomic::AtomicU64,
}

/// The runs of this process, by job and attempt: each one's cancellation
/// signal, and cancels that came before their run registered (a fetch
/// that leased the job just before the cancel committed).
#[derive(Default)]
struct Runs {
    signals: HashMap<(Uuid, u32), tokio::sync::watch::Sender<bool>>,
    cancelled_early: HashMap<(Uuid, u32), std::time::Instant>,
}

/// How long a cancel waits for its run to register in this process: a
/// fetch registers its runs at once, so anything older went elsewhere.
const EARLY_CANCEL_KEPT: Duration = Duration::from_secs(60);

/// The workers' phase. Shutting down goes Running → Draining (no more
/// fetches; running jobs go on) → HandBack (the jobs still running are
/// dropped and handed back).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Phase {
    Running,
    Draining,
    HandBack,
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
        let completer = completer::Completer::start(db.clone());
        let schedules = schedule::resolve(&settings.schedules, &settings.cron, &by_name)?;
        Ok(Jobs {
            inner: Arc::new(Inner {
                db,
                settings,
                kinds: by_name,
                wake,
                channel,
                completer,
                phase: watch::Sender::new(Phase::Running),
                loops: watch::Sender::new(0),
                schedules,
                running: std::sync::Mutex::default(),
                watched: std::sync::Mutex::default(),
                retried: std::sync::atomic::AtomicU64::new(0),
                gave_up: std::sync::atomic::AtomicU64::new(0),
                fetched: std::sync::atomic::AtomicU64::new(0),
                vacuums: std::sync::atomic::AtomicU64::new(0),
                vacuum_micros: std::sync::atomic::AtomicU64::new(0),
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

    /// The kinds of `queue` this process runs.
    pub(crate) fn kinds_of(&self, queue: &str) -> Vec<&'static str> {
        let mut kinds: Vec<_> = self
            .inner
            .kinds
            .values()
            .filter(|kind| kind.queue == queue)
            .map(|kind| kind.name)
            .collect();
        kinds.sort_unstable();
        kinds
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

    pub(crate) fn schedules(&self) -> &[schedule::Schedule] {
        &self.inner.schedules
    }

    /// Every registered kind.
    pub fn kinds(&self) -> impl Iterator<Item = &JobKind> {
        self.inner.kinds.values()
    }

    /// The queues that have kinds here.
    /// Since this process started: attempts its workers failed and
    /// scheduled again, and jobs they gave up on (for `/metrics`).
    pub fn failure_counts(&self) -> (u64, u64) {
        use std::sync::atomic::Ordering::Relaxed;
        (self.inner.retried.load(Relaxed), self.inner.gave_up.load(Relaxed))
    }

    pub(crate) fn count_failure(&self, retried: bool) {
        let counter = if retried {
            &self.inner.retried
        } else {
            &self.inner.gave_up
        };
        counter.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    }

    /// Every queue's statistics, as `GetQueueStats` answers them.
    pub async fn stats(&self) -> Result<Vec<QueueStats>> {
        store::stats(self.db(), &self.queues(), clock::now()).await
    }

    pub fn queues(&self) -> Vec<&'static str> {
        let mut queues: Vec<_> = self.inner.wake.keys().copied().collect();
        queues.sort_unstable();
        queues
    }

    /// Registers a run's cancellation signal; removed by [`Jobs::run_ended`].
    /// Already true when the run was cancelled before it registered.
    pub(crate) fn run_started(&self, id: Uuid, attempt: u32) -> tokio::sync::watch::Receiver<bool> {
        let mut runs = self.runs();
        let early = runs.cancelled_early.remove(&(id, attempt)).is_some();
        let (sender, receiver) = tokio::sync::watch::channel(early);
        runs.signals.insert((id, attempt), sender);
        receiver
    }

    pub(crate) fn run_ended(&self, id: Uuid, attempt: u32) {
        self.runs().signals.remove(&(id, attempt));
    }

    /// Signals attempt `attempt` of `id` in this process that the job was
    /// cancelled; when that run has not registered yet, it is cancelled as
    /// it does (for a while: it may be another process's).
    pub(crate) fn signal_cancelled(&self, id: Uuid, attempt: u32) {
        let mut runs = self.runs();
        match runs.signals.get(&(id, attempt)) {
            Some(sender) => {
                sender.send_replace(true);
            }
            None => {
                let now = std::time::Instant::now();
                runs.cancelled_early
                    .retain(|_, at| now.duration_since(*at) < EARLY_CANCEL_KEPT);
                runs.cancelled_early.insert((id, attempt), now);
            }
        }
    }

    fn runs(&self) -> std::sync::MutexGuard<'_, Runs> {
        self.inner
            .running
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
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

    pub(crate) fn phase(&self) -> watch::Receiver<Phase> {
        self.inner.phase.subscribe()
    }

    pub(crate) fn loops(&self) -> &watch::Sender<usize> {
        &self.inner.loops
    }

    /// Stops this process's workers gracefully: no more fetches; running
    /// jobs may finish within `shutdown_grace`; the ones still running then
    /// are dropped and handed back at once (available again, their attempt
    /// given back, fenced on their lease), so another process runs them
    /// without waiting out the lease. Returns when every queue loop ended
    /// (or, if writing the hand-backs hangs, a few seconds after the grace:
    /// the leases cover what was not written).
    pub async fn shutdown(&self) {
        // Only the first call shuts down; a later one (the server stops
        // twice: at the signal and at the end) must not undo a HandBack.
        let first = self.inner.phase.send_if_modified(|phase| {
            let running = *phase == Phase::Running;
            if running {
                *phase = Phase::Draining;
            }
            running
        });
        if !first {
            return;
        }
        let grace = self.settings().shutdown_grace;
        let mut loops = self.inner.loops.subscribe();
        let started = std::time::Instant::now();
        if tokio::time::timeout(grace, loops.wait_for(|running| *running == 0))
            .await
            .is_ok()
        {
            tracing::info!(waited_ms = started.elapsed().as_millis() as u64, "job workers stopped");
            return;
        }
        self.inner.phase.send_replace(Phase::HandBack);
        let handed_back = tokio::time::timeout(Duration::from_secs(5), loops.wait_for(|running| *running == 0))
            .await
            .is_ok();
        tracing::info!(
            grace_ms = grace.as_millis() as u64,
            handed_back,
            "job workers stopped; jobs still running were handed back"
        );
    }

    /// The worker loops, the rescuer, the scheduler, the pruner, the
    /// vacuum and the PostgreSQL listener.
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
                // Counted before it is spawned: a shutdown right after this
                // waits for it.
                let guard = worker::LoopGuard::new(self.clone());
                tokio::spawn(worker::run_queue(guard, (*queue).to_owned(), concurrency, wake.clone()))
            })
            .collect();
        tasks.push(tokio::spawn(worker::run_rescuer(self.clone(), settings.rescue_every)));
        tasks.push(tokio::spawn(schedule::run_scheduler(self.clone())));
        tasks.push(tokio::spawn(prune::run_pruner(
            self.db().clone(),
            settings.retention,
            settings.prune_every,
        )));
        tasks.push(tokio::spawn(vacuum::run_vacuum(self.clone())));
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
    const ADMIN_ENQUEUE: bool = true;
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
