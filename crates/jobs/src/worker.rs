//! The workers of one process: a loop per queue that leases due jobs while
//! it has free slots (the queue's concurrency), a task per running job that
//! renews its lease and writes its outcome (fenced), and the rescuer that
//! makes jobs of dead workers available again.
//!
//! A loop sleeps until it is woken (a local commit, a PostgreSQL
//! notification, a finished job), until the next delayed job is due, or at
//! most for the safety-net poll.

use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use keel_kernel::{Code, Error, JobContext, JobError, JobReporter, JobSignals, clock};
use tokio::sync::{Notify, Semaphore, watch};
use tokio::task::JoinSet;

use crate::model::{AttemptError, JobRecord, JobState, Lease};
use crate::{Jobs, Phase, store};

/// Counts a running queue loop for [`Jobs::shutdown`]; dropped when the
/// loop ends, however it ends (an abort included).
pub(crate) struct LoopGuard {
    jobs: Jobs,
}

impl LoopGuard {
    pub(crate) fn new(jobs: Jobs) -> LoopGuard {
        jobs.loops().send_modify(|running| *running += 1);
        LoopGuard { jobs }
    }
}

impl Drop for LoopGuard {
    fn drop(&mut self) {
        self.jobs
            .loops()
            .send_modify(|running| *running = running.saturating_sub(1));
    }
}

/// Runs the jobs of `queue`, at most `concurrency` at once, and, when the
/// queue has a rate limit, only as many as its limiter allows. Aborting
/// the loop aborts its running jobs (their leases expire; the rescuer
/// hands them to another worker); a graceful shutdown ([`Jobs::shutdown`])
/// stops its fetches and waits for its jobs instead.
pub(crate) async fn run_queue(guard: LoopGuard, queue: String, concurrency: usize, wake: Arc<Notify>) {
    let jobs = guard.jobs.clone();
    let slots = Arc::new(Semaphore::new(concurrency.max(1)));
    let mut running = JoinSet::new();
    let mut phase = jobs.phase();
    let settings = jobs.settings();
    let quota = settings.rate_limits.quotas.get(&queue).copied();
    let limiter_key = crate::RateLimits::key(&queue);
    // Only the kinds this process can run: others' jobs stay for them.
    let kinds = jobs.kinds_of(&queue);
    let gather = gather_size(concurrency);
    // The last fetch took every slot it asked for: more jobs are likely due.
    let mut backlog = false;
    loop {
        while running.try_join_next().is_some() {}
        let slot = tokio::select! {
            slot = slots.clone().acquire_owned() => match slot {
                Ok(slot) => slot,
                Err(_) => break,
            },
            _ = stopping(&mut phase) => break,
        };
        if stopping_now(&phase) {
            break;
        }
        if backlog && 1 + slots.available_permits() < gather {
            // Under a backlog, one fetch for a few free slots rather than
            // a statement (and a commit) per finished job: wait briefly
            // for more runs to end. An idle queue never waits here (its
            // last fetch came back short), so enqueue-to-start stays one
            // fetch.
            tokio::select! {
                more = slots.clone().acquire_many_owned((gather - 1) as u32) => drop(more),
                _ = tokio::time::sleep(GATHER_WAIT) => {}
                _ = stopping(&mut phase) => break,
            }
        }
        let free = 1 + slots.available_permits();
        let now = clock::now();
        // A limited queue starts no more jobs than its limiter allows: a
        // permit per job, taken before the fetch, so a job it may not start
        // is never leased (nor marked). Permits are asked only for jobs that
        // are due; one taken for a job another process fetched first is
        // spent (the limit holds; the rate may fall short of it).
        let mut want = free;
        let mut refused_for = None;
        if let Some(quota) = quota {
            let due = match store::due(jobs.db(), &queue, &kinds, now, free as u32).await {
                Ok(due) => due as usize,
                Err(error) => {
                    tracing::warn!(error = %error, queue = %queue, "counting due jobs failed");
                    0
                }
            };
            want = 0;
            while want < due {
                match settings.rate_limits.limiter.acquire(&limiter_key, quota).await {
                    Ok(()) => want += 1,
                    Err(retry_after) => {
                        refused_for = Some(retry_after);
                        break;
                    }
                }
            }
        }
        let leased_until = lease_end(now, settings.lease);
        let fetched = if want == 0 {
            Ok(Vec::new())
        } else {
            store::fetch_of_kinds(jobs.db(), &queue, Some(&kinds), want as u32, leased_until, now).await
        };
        match fetched {
            Ok(leased) if !leased.is_empty() => {
                jobs.fetched(leased.len());
                let full = leased.len() == free;
                backlog = full;
                let mut first = Some(slot);
                for job in leased {
                    let slot = match first.take() {
                        Some(slot) => slot,
                        // Free: the fetch took no more than the free slots.
                        None => match slots.clone().acquire_owned().await {
                            Ok(slot) => slot,
                            Err(_) => return,
                        },
                    };
                    let jobs = jobs.clone();
                    let wake = wake.clone();
                    running.spawn(async move {
                        run_job(&jobs, job).await;
                        drop(slot);
                        // A slot is free: look for more at once.
                        wake.notify_one();
                    });
                }
                if full && refused_for.is_none() {
                    continue;
                }
            }
            Ok(_) => {
                backlog = false;
                drop(slot);
            }
            Err(error) => {
                tracing::warn!(error = %error, queue = %queue, "fetching jobs failed");
                backlog = false;
                drop(slot);
            }
        }
        if let Some(retry_after) = refused_for {
            // The limiter is what holds the queue back: a wake-up changes
            // nothing before it allows the next start.
            tokio::select! {
                _ = tokio::time::sleep(retry_after) => {}
                _ = stopping(&mut phase) => break,
            }
            continue;
        }
        let mut sleep = settings.poll;
        // A paused queue waits for its resume's wake-up (or the poll).
        let paused = store::is_paused(jobs.db(), &queue).await.unwrap_or(false);
        if !paused && let Ok(Some(next)) = store::next_due_of_kinds(jobs.db(), &queue, &kinds).await {
            let until = (next - clock::now()).to_std().unwrap_or(Duration::ZERO);
            sleep = sleep.min(until.max(Duration::from_millis(1)));
        }
        tokio::select! {
            _ = wake.notified() => {}
            _ = tokio::time::sleep(sleep) => {}
            _ = stopping(&mut phase) => break,
        }
    }
    // Shutting down: no more fetches. The running jobs finish, or, at the
    // end of the grace, hand themselves back.
    while running.join_next().await.is_some() {}
    drop(guard);
}

/// How long a loop with a backlog waits for [`gather_size`] free slots
/// before it fetches for those it has: at most this much of a slot's time
/// is left unused per fetch.
const GATHER_WAIT: Duration = Duration::from_millis(2);

/// How many free slots a loop with a backlog gathers for one fetch: a
/// quarter of its concurrency (at least one, at most 64).
fn gather_size(concurrency: usize) -> usize {
    (concurrency / 4).clamp(1, 64)
}

fn stopping_now(phase: &watch::Receiver<Phase>) -> bool {
    *phase.borrow() != Phase::Running
}

/// Resolves once the workers shut down (at once if they are).
async fn stopping(phase: &mut watch::Receiver<Phase>) {
    // The sender lives as long as the module: an error cannot come first.
    let _ = phase.wait_for(|phase| *phase != Phase::Running).await;
}

/// Resolves once running jobs must be handed back.
async fn handing_back(phase: &mut watch::Receiver<Phase>) {
    let _ = phase.wait_for(|phase| *phase == Phase::HandBack).await;
}

/// Runs one leased job to its outcome. The lease is renewed every third of
/// its length; when a renewal finds it lost, or none succeeded for a whole
/// lease, the run is dropped (another worker may have the job by now) and
/// no outcome is written. The run is always dropped before a write for it
/// that its own transaction could block. A run past its
/// timeout is dropped and fails the attempt; at the end of a shutdown's
/// grace it is dropped and the job handed back.
async fn run_job(jobs: &Jobs, job: JobRecord) {
    let Some(lease) = job.lease() else { return };
    let settings = jobs.settings();
    let mut cancelled = jobs.run_started(job.id, job.attempt);
    let _registered = RunRegistration { jobs, lease };
    let ctx = JobContext {
        id: job.id,
        kind: job.kind.clone(),
        attempt: job.attempt,
        max_attempts: job.max_attempts,
        user_id: job.user_id,
        signals: JobSignals::new(
            Arc::new(Reporter {
                jobs: jobs.clone(),
                lease,
            }),
            cancelled.clone(),
        ),
    };
    jobs.publish(job.id).await;
    let outcome = match jobs.kind(&job.kind) {
        None => Err(JobError::do_not_retry(Error::internal(format!(
            "no handler for job kind {} in this keel",
            job.kind
        )))),
        Some(kind) => {
            let timeout = job.timeout.unwrap_or(kind.timeout);
            // Boxed so it can be dropped before anything is written for the
            // run: an unpolled handler may hold a transaction, and a write
            // behind its lock (a row in PostgreSQL, the file in SQLite) would
            // wait for a commit that never comes.
            let mut run = Box::pin(kind.run(&ctx, &job.args));
            let deadline = tokio::time::sleep(timeout);
            tokio::pin!(deadline);
            let mut phase = jobs.phase();
            // Polled beside the handler, never instead of it: a renewal
            // that waits for a lock the handler's transaction holds must not
            // stop that transaction from committing.
            let renewing = keep_leased(jobs, &lease, &ctx.signals);
            tokio::pin!(renewing);
            let interrupted = tokio::select! {
                outcome = &mut run => Interrupted::No(outcome),
                _ = &mut deadline => Interrupted::TimedOut,
                _ = handing_back(&mut phase) => Interrupted::HandBack,
                true = async { cancelled.wait_for(|cancelled| *cancelled).await.is_ok() } => Interrupted::Cancelled,
                () = &mut renewing => Interrupted::LeaseGone,
            };
            match interrupted {
                Interrupted::No(outcome) => outcome,
                Interrupted::TimedOut => {
                    drop(run);
                    Err(JobError::from(Error::new(
                        Code::DeadlineExceeded,
                        format!("the job ran past its timeout of {} ms", timeout.as_millis()),
                    )))
                }
                Interrupted::HandBack => {
                    drop(run);
                    match store::hand_back(jobs.db(), &lease, clock::now()).await {
                        Ok(true) => {
                            tracing::info!(job_id = %job.id, kind = %job.kind, attempt = job.attempt, "job handed back at shutdown")
                        }
                        Ok(false) => {
                            tracing::warn!(job_id = %job.id, attempt = job.attempt, "job lease lost; not handed back")
                        }
                        Err(error) => {
                            tracing::warn!(job_id = %job.id, error = %error, "handing a job back failed; its lease will expire")
                        }
                    }
                    return;
                }
                Interrupted::Cancelled => {
                    drain_cancelled(jobs, &job, run).await;
                    return;
                }
                Interrupted::LeaseGone => {
                    // Cancelled in another process: this run hears it here.
                    if cancelled_in_table(jobs, job.id).await {
                        jobs.signal_cancelled(job.id, job.attempt);
                        drain_cancelled(jobs, &job, run).await;
                        return;
                    }
                    drop(run);
                    tracing::warn!(job_id = %job.id, attempt = job.attempt, "job lease lost; run abandoned");
                    run_stopped(jobs, &job).await;
                    return;
                }
            }
        }
    };
    let outcome = if ctx.signals.completed_in_transaction() {
        // The handler's transaction holds the completion: the table says
        // whether it committed. If it did, nothing is left to write.
        if matches!(store::get(jobs.db(), job.id).await, Ok(Some(now)) if now.state == JobState::Completed && now.attempt == job.attempt)
        {
            jobs.publish(job.id).await;
            return;
        }
        match outcome {
            Ok(()) => Err(JobError::from(Error::internal(
                "the handler completed the job in a transaction that did not commit",
            ))),
            failed => failed,
        }
    } else {
        outcome
    };
    let now = clock::now();
    let written = match outcome {
        Ok(()) => match ctx.signals.take_result() {
            Some(result) => store::complete_with_result(jobs.db(), &lease, &result, now).await,
            None => jobs.complete(lease, now).await,
        },
        Err(JobError {
            snooze: Some(delay), ..
        }) => {
            let run_at = now + chrono::Duration::from_std(delay).unwrap_or(chrono::Duration::hours(1));
            tracing::info!(job_id = %job.id, kind = %job.kind, attempt = job.attempt, delay_ms = delay.as_millis() as u64, "job snoozed");
            store::snooze(jobs.db(), &lease, run_at, now).await
        }
        Err(failure) => {
            // The kernel's retry decision, the one durable event handlers take.
            let policy = keel_kernel::retry::RetryPolicy::new(settings.backoff, job.max_attempts);
            let decision = policy.decide(job.attempt, &failure.error, failure.retry, now);
            let recorded = decision.failure();
            let mut errors = job.errors.clone();
            errors.push(AttemptError {
                attempt: recorded.attempt,
                at: recorded.at,
                message: recorded.message.clone(),
            });
            match decision {
                keel_kernel::retry::Decision::Retry { at: run_at, .. } => {
                    let written = store::retry(jobs.db(), &lease, run_at, &errors, now).await;
                    if matches!(written, Ok(true)) {
                        jobs.count_failure(true);
                        tracing::info!(job_id = %job.id, kind = %job.kind, attempt = job.attempt, error = %failure.error, "job failed; retrying");
                    }
                    written
                }
                keel_kernel::retry::Decision::GiveUp { .. } => {
                    let written = store::fail(jobs.db(), &lease, &errors, now).await;
                    if matches!(written, Ok(true)) {
                        jobs.count_failure(false);
                        tracing::warn!(job_id = %job.id, kind = %job.kind, attempt = job.attempt, error = %failure.error, "job failed");
                    }
                    written
                }
            }
        }
    };
    match written {
        Ok(true) => jobs.publish(job.id).await,
        Ok(false) => {
            tracing::warn!(job_id = %job.id, attempt = job.attempt, "job lease lost; outcome discarded");
            // Lost to a cancel the handler heard before the worker did.
            run_stopped(jobs, &job).await;
        }
        Err(error) => {
            tracing::warn!(job_id = %job.id, error = %error, "writing a job's outcome failed; its lease will expire")
        }
    }
}

/// Renews the run's lease every third of its length; resolves when the
/// lease is gone: a renewal found it taken (and the handler did not
/// complete the job in its own transaction), or no renewal succeeded for a
/// whole lease, after which the rescuer may have handed the job to another
/// worker and the stopping bound a cancel set no longer holds.
///
/// A handler that completed the job in its transaction keeps the lease
/// renewed until the transaction ends: the renewal waits for its lock (on
/// the row in PostgreSQL, on the file in SQLite), then finds the job
/// completed (and stays quiet) or, when the transaction rolled back, renews
/// as before.
async fn keep_leased(jobs: &Jobs, lease: &Lease, signals: &JobSignals) {
    let length = jobs.settings().lease;
    let mut renewal = tokio::time::interval((length / 3).max(Duration::from_millis(10)));
    renewal.tick().await;
    let mut held_until = tokio::time::Instant::now() + length;
    loop {
        renewal.tick().await;
        let renew = store::renew(jobs.db(), lease, lease_end(clock::now(), length));
        // Once the handler's transaction holds the completion, it holds the
        // row too: no rescuer or worker takes the job before it ends, so the
        // renewal may wait for it, however long.
        let in_transaction = signals.completed_in_transaction();
        let renewed = if in_transaction {
            Ok(renew.await)
        } else {
            tokio::time::timeout_at(held_until, renew).await
        };
        match renewed {
            Ok(Ok(true)) => held_until = tokio::time::Instant::now() + length,
            Ok(Ok(false)) if signals.completed_in_transaction() && completed_at(jobs, lease).await => {
                return std::future::pending().await;
            }
            Ok(Ok(false)) => return,
            // The lease may still hold; the next renewal tries again.
            Ok(Err(error)) => tracing::warn!(job_id = %lease.id, error = %error, "renewing a job lease failed"),
            Err(_) => {}
        }
        if !in_transaction && tokio::time::Instant::now() >= held_until {
            tracing::warn!(job_id = %lease.id, attempt = lease.attempt, lease_ms = length.as_millis() as u64, "no lease renewal succeeded for a whole lease");
            return;
        }
    }
}

/// Whether the job is completed at the lease's attempt.
async fn completed_at(jobs: &Jobs, lease: &Lease) -> bool {
    matches!(store::get(jobs.db(), lease.id).await, Ok(Some(job)) if job.state == JobState::Completed && job.attempt == lease.attempt)
}

/// How a run's select ended.
enum Interrupted {
    No(std::result::Result<(), JobError>),
    TimedOut,
    HandBack,
    Cancelled,
    LeaseGone,
}

/// Removes a run's cancellation signal when the run ends, however it ends.
struct RunRegistration<'a> {
    jobs: &'a Jobs,
    lease: Lease,
}

impl Drop for RunRegistration<'_> {
    fn drop(&mut self) {
        self.jobs.run_ended(self.lease.id, self.lease.attempt);
    }
}

/// Stores a handler's progress fenced on its run's lease.
struct Reporter {
    jobs: Jobs,
    lease: Lease,
}

#[async_trait::async_trait]
impl JobReporter for Reporter {
    async fn progress(&self, percent: u8, message: &str) -> keel_kernel::Result<()> {
        if store::progress(self.jobs.db(), &self.lease, percent, message, clock::now()).await? {
            self.jobs.publish(self.lease.id).await;
            Ok(())
        } else {
            Err(no_longer_this_runs())
        }
    }

    async fn complete_in(
        &self,
        tx: &sea_orm::DatabaseTransaction,
        result: Option<&serde_json::Value>,
    ) -> keel_kernel::Result<()> {
        let now = clock::now();
        let written = match result {
            Some(result) => store::complete_with_result(tx, &self.lease, result, now).await?,
            None => store::complete(tx, &self.lease, now).await?,
        };
        if written { Ok(()) } else { Err(no_longer_this_runs()) }
    }
}

fn no_longer_this_runs() -> Error {
    Error::new(
        Code::FailedPrecondition,
        "the job is no longer this run's (cancelled or its lease lost)",
    )
}

/// Whether the job was cancelled (checked when a renewal found the lease gone).
async fn cancelled_in_table(jobs: &Jobs, id: uuid::Uuid) -> bool {
    matches!(store::get(jobs.db(), id).await, Ok(Some(job)) if job.state == JobState::Cancelled)
}

/// A cancelled job's handler has the grace period to stop; then it is
/// dropped. Its outcome is never written: the table says cancelled already
/// (and the fence would refuse it); that it stopped is.
async fn drain_cancelled<F: std::future::Future>(jobs: &Jobs, job: &JobRecord, mut run: std::pin::Pin<Box<F>>) {
    let grace = jobs.settings().cancel_grace;
    match tokio::time::timeout(grace, run.as_mut()).await {
        Ok(_) => {
            tracing::info!(job_id = %job.id, kind = %job.kind, attempt = job.attempt, "job cancelled; its handler stopped")
        }
        Err(_) => {
            tracing::warn!(job_id = %job.id, kind = %job.kind, attempt = job.attempt, grace_ms = grace.as_millis() as u64, "job cancelled; its handler ignored the signal and was dropped")
        }
    }
    // Dropped before the write, which its transaction could block.
    drop(run);
    run_stopped(jobs, job).await;
}

/// The run's handler has stopped (returned or dropped): if the job was
/// cancelled, an admin may run it again now, not only once the bound the
/// cancel set has passed. Fenced: a job that was not cancelled is left be.
async fn run_stopped(jobs: &Jobs, job: &JobRecord) {
    if let Err(error) = store::run_stopped(jobs.db(), job.id, job.attempt).await {
        tracing::warn!(job_id = %job.id, error = %error, "noting a cancelled run's stop failed; a retry waits for the cancel's bound");
    }
}

fn lease_end(now: DateTime<Utc>, lease: Duration) -> DateTime<Utc> {
    now + chrono::Duration::from_std(lease).unwrap_or(chrono::Duration::seconds(30))
}

/// Every `every`, makes jobs whose lease expired available again, and
/// wakes the queues when it did.
pub(crate) async fn run_rescuer(jobs: Jobs, every: Duration) {
    loop {
        tokio::time::sleep(every).await;
        match store::rescue(jobs.db(), clock::now(), 1000).await {
            Ok(0) => {}
            Ok(_) => jobs.wake_all(),
            Err(error) => tracing::warn!(error = %error, "rescuing expired jobs failed"),
        }
    }
}

/// Listens on the job table's PostgreSQL channel on a connection of its
/// own (a listening connection serves no query) and wakes every queue at
/// each notification: an enqueue anywhere sends one as it commits.
/// Reconnects forever; after a reconnect it wakes the queues once
/// (notifications sent meanwhile are lost; the table is the truth).
pub(crate) async fn listen(jobs: Jobs, channel: String) {
    use sea_orm::sqlx::postgres::{PgListener, PgPoolOptions};

    let pool = jobs.db().get_postgres_connection_pool();
    let own = PgPoolOptions::new()
        .max_connections(1)
        .min_connections(0)
        .max_lifetime(None)
        .idle_timeout(None)
        .connect_lazy_with((*pool.connect_options()).clone());
    loop {
        let listening = async {
            let mut listener = PgListener::connect_with(&own).await?;
            listener.ignore_pool_close_event(true);
            listener.listen(&channel).await?;
            Ok::<_, sea_orm::sqlx::Error>(listener)
        }
        .await;
        let mut listener = match listening {
            Ok(listener) => listener,
            Err(error) => {
                tracing::debug!(error = %error, "postgres job listen failed; retrying");
                tokio::time::sleep(Duration::from_millis(500)).await;
                continue;
            }
        };
        jobs.wake_all();
        loop {
            match listener.try_recv().await {
                Ok(Some(_)) => jobs.wake_all(),
                Ok(None) => jobs.wake_all(),
                Err(error) => {
                    tracing::warn!(error = %error, "postgres job listener lost; reconnecting");
                    break;
                }
            }
        }
    }
}
