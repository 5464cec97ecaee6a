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
use keel_kernel::{Error, JobContext, JobError, clock};
use tokio::sync::{Notify, Semaphore};
use tokio::task::JoinSet;

use crate::model::{AttemptError, JobRecord};
use crate::{Jobs, store};

/// Runs the jobs of `queue`, at most `concurrency` at once. Aborting the
/// loop aborts its running jobs (their leases expire; the rescuer hands
/// them to another worker).
pub(crate) async fn run_queue(jobs: Jobs, queue: String, concurrency: usize, wake: Arc<Notify>) {
    let slots = Arc::new(Semaphore::new(concurrency.max(1)));
    let mut running = JoinSet::new();
    let settings = jobs.settings();
    // Only the kinds this process can run: others' jobs stay for them.
    let kinds = jobs.kinds_of(&queue);
    loop {
        while running.try_join_next().is_some() {}
        let Ok(slot) = slots.clone().acquire_owned().await else {
            return;
        };
        let free = 1 + slots.available_permits();
        let now = clock::now();
        let leased_until = now + chrono::Duration::from_std(settings.lease).unwrap_or(chrono::Duration::seconds(30));
        match store::fetch_of_kinds(jobs.db(), &queue, Some(&kinds), free as u32, leased_until, now).await {
            Ok(leased) if !leased.is_empty() => {
                let full = leased.len() == free;
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
                if full {
                    continue;
                }
            }
            Ok(_) => drop(slot),
            Err(error) => {
                tracing::warn!(error = %error, queue = %queue, "fetching jobs failed");
                drop(slot);
            }
        }
        let mut sleep = settings.poll;
        if let Ok(Some(next)) = store::next_due_of_kinds(jobs.db(), &queue, &kinds).await {
            let until = (next - clock::now()).to_std().unwrap_or(Duration::ZERO);
            sleep = sleep.min(until.max(Duration::from_millis(1)));
        }
        tokio::select! {
            _ = wake.notified() => {}
            _ = tokio::time::sleep(sleep) => {}
        }
    }
}

/// Runs one leased job to its outcome. The lease is renewed every third of
/// its length; when a renewal finds it lost, the run is dropped (another
/// worker may have the job by now) and nothing is written.
async fn run_job(jobs: &Jobs, job: JobRecord) {
    let Some(lease) = job.lease() else { return };
    let settings = jobs.settings();
    let ctx = JobContext {
        id: job.id,
        kind: job.kind.clone(),
        attempt: job.attempt,
        max_attempts: job.max_attempts,
        user_id: job.user_id,
    };
    let outcome = match jobs.kind(&job.kind) {
        None => Err(JobError::do_not_retry(Error::internal(format!(
            "no handler for job kind {} in this keel",
            job.kind
        )))),
        Some(kind) => {
            let run = kind.run(&ctx, &job.args);
            tokio::pin!(run);
            let mut renewal = tokio::time::interval((settings.lease / 3).max(Duration::from_millis(10)));
            renewal.tick().await;
            loop {
                tokio::select! {
                    outcome = &mut run => break outcome,
                    _ = renewal.tick() => {
                        let now = clock::now();
                        match store::renew(jobs.db(), &lease, lease_end(now, settings.lease), now).await {
                            Ok(true) => {}
                            Ok(false) => {
                                tracing::warn!(job_id = %job.id, attempt = job.attempt, "job lease lost; run abandoned");
                                return;
                            }
                            // The lease may still hold; the next renewal tries again.
                            Err(error) => tracing::warn!(job_id = %job.id, error = %error, "renewing a job lease failed"),
                        }
                    }
                }
            }
        }
    };
    let now = clock::now();
    let written = match outcome {
        Ok(()) => store::complete(jobs.db(), &lease, now).await,
        Err(failure) => {
            let mut errors = job.errors.clone();
            errors.push(AttemptError {
                attempt: job.attempt,
                at: now,
                message: failure.error.to_string(),
            });
            if failure.retry && job.attempt < job.max_attempts {
                let delay = settings.backoff.delay(job.attempt);
                let run_at = now + chrono::Duration::from_std(delay).unwrap_or(chrono::Duration::hours(1));
                tracing::info!(job_id = %job.id, kind = %job.kind, attempt = job.attempt, error = %failure.error, "job failed; retrying");
                store::retry(jobs.db(), &lease, run_at, &errors, now).await
            } else {
                tracing::warn!(job_id = %job.id, kind = %job.kind, attempt = job.attempt, error = %failure.error, "job failed");
                store::fail(jobs.db(), &lease, &errors, now).await
            }
        }
    };
    match written {
        Ok(true) => {}
        Ok(false) => tracing::warn!(job_id = %job.id, attempt = job.attempt, "job lease lost; outcome discarded"),
        Err(error) => {
            tracing::warn!(job_id = %job.id, error = %error, "writing a job's outcome failed; its lease will expire")
        }
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
