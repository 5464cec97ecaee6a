//! Enqueueing: the kernel's [`JobQueue`] port, which the bus calls inside
//! a command's transaction; and the admin commands (enqueue by hand,
//! cancel, retry, delete, pause and resume a queue).

use async_trait::async_trait;
use keel_kernel::{BusBuilder, Code, Command, CommandContext, CommandHandler, Error, JobQueue, NewJob, Result, clock};
use sea_orm::DatabaseTransaction;
use uuid::Uuid;

use crate::model::{JobRecord, JobState, QueueStats};
use crate::{Jobs, store};

pub struct Enqueuer {
    jobs: Jobs,
}

impl Enqueuer {
    pub fn new(jobs: Jobs) -> Self {
        Self { jobs }
    }
}

#[async_trait]
impl JobQueue for Enqueuer {
    async fn enqueue(&self, tx: &DatabaseTransaction, jobs: Vec<NewJob>) -> Result<Vec<Uuid>> {
        for job in &jobs {
            match self.jobs.kind(job.kind) {
                None => return Err(Error::internal(format!("job kind {} is not registered", job.kind))),
                Some(kind) if kind.queue != job.queue => {
                    return Err(Error::internal(format!(
                        "job kind {} runs on queue {}, not {}",
                        job.kind, kind.queue, job.queue
                    )));
                }
                Some(_) => {}
            }
        }
        store::insert(tx, jobs, clock::now(), self.jobs.channel()).await
    }

    fn committed(&self) {
        self.jobs.wake_all();
    }
}

/// Admin: enqueue a job of a registered kind by hand.
pub struct EnqueueJob {
    pub kind: String,
    pub args: serde_json::Value,
    pub priority: i16,
    pub run_at: Option<chrono::DateTime<chrono::Utc>>,
    /// 0: the kind's.
    pub max_attempts: u32,
    /// `None`: a job of no user.
    pub user_id: Option<Uuid>,
}

impl Command for EnqueueJob {
    const NAME: &'static str = "jobs.enqueue_job";
    type Output = JobRecord;
}

/// Cancel a waiting or running job (its owner or an admin).
pub struct CancelJob {
    pub id: Uuid,
}

impl Command for CancelJob {
    const NAME: &'static str = "jobs.cancel_job";
    type Output = JobRecord;
}

/// Admin: run a failed or cancelled job again.
pub struct RetryJob {
    pub id: Uuid,
}

impl Command for RetryJob {
    const NAME: &'static str = "jobs.retry_job";
    type Output = JobRecord;
}

/// Admin: remove a job that is not running.
pub struct DeleteJob {
    pub id: Uuid,
}

impl Command for DeleteJob {
    const NAME: &'static str = "jobs.delete_job";
    type Output = ();
}

/// Admin: pause (or resume) a queue in every process.
pub struct SetQueuePaused {
    pub queue: String,
    pub paused: bool,
}

impl Command for SetQueuePaused {
    const NAME: &'static str = "jobs.set_queue_paused";
    type Output = QueueStats;
}

fn not_found() -> Error {
    Error::new(Code::NotFound, "job not found")
}

/// The job if the caller may act on it; anyone else is told it does not
/// exist. A job of no user is an admin's.
pub(crate) fn visible_to(request: &keel_kernel::RequestContext, job: &JobRecord) -> bool {
    match job.user_id {
        Some(owner) => request.may_act_for(owner),
        None => request.require_admin().is_ok(),
    }
}

struct Handlers {
    jobs: Jobs,
}

#[async_trait]
impl CommandHandler<EnqueueJob> for Handlers {
    async fn handle(&self, ctx: &CommandContext<'_>, command: EnqueueJob) -> Result<JobRecord> {
        ctx.request.require_admin()?;
        let kind = self
            .jobs
            .kind(&command.kind)
            .ok_or_else(|| Error::invalid_field("kind", format!("{:?} is not a registered job kind", command.kind)))?;
        if !kind.admin_enqueue {
            // Its jobs come from its module's commands, which check what
            // the caller may do; by hand, anything could be asked of it.
            return Err(Error::invalid_field(
                "kind",
                format!(
                    "{} is not enqueued by hand: its module's commands enqueue it",
                    kind.name
                ),
            ));
        }
        kind.check(&command.args)
            .map_err(|why| Error::invalid_field("args", format!("are not the arguments of {}: {why}", kind.name)))?;
        let job = NewJob {
            kind: kind.name,
            queue: kind.queue,
            args: command.args,
            priority: command.priority,
            run_at: command.run_at,
            max_attempts: if command.max_attempts == 0 {
                kind.max_attempts
            } else {
                command.max_attempts
            },
            user_id: command.user_id,
            timeout: None,
            unique: None,
        };
        // Through the queue itself, not `ctx.enqueue`: a job without a user
        // stays without one (it would become the admin's).
        let tx = ctx.tx().await?;
        let id = self
            .jobs
            .queue()
            .enqueue(tx, vec![job])
            .await?
            .pop()
            .ok_or_else(|| Error::internal("the job queue returned no id"))?;
        let jobs = self.jobs.clone();
        ctx.after_commit(async move { jobs.wake_all() });
        store::get(tx, id).await?.ok_or_else(not_found)
    }
}

#[async_trait]
impl CommandHandler<CancelJob> for Handlers {
    async fn handle(&self, ctx: &CommandContext<'_>, command: CancelJob) -> Result<JobRecord> {
        ctx.request.require_caller()?;
        let tx = ctx.tx().await?;
        let job = store::get(tx, command.id).await?.ok_or_else(not_found)?;
        if !visible_to(ctx.request, &job) {
            return Err(not_found());
        }
        let now = clock::now();
        let settings = self.jobs.settings();
        // A worker hears of the cancel by its next renewal at the latest,
        // then gives the handler the cancel grace.
        let stopping = settings.lease + settings.cancel_grace;
        let stopping_until = now + chrono::Duration::from_std(stopping).unwrap_or(chrono::Duration::hours(1));
        if job.state.is_finished() || !store::cancel(tx, job.id, stopping_until, now).await? {
            return Err(Error::new(
                Code::FailedPrecondition,
                format!(
                    "the job is {}; only a waiting or running job can be cancelled",
                    job.state.as_str()
                ),
            ));
        }
        let cancelled = store::get(tx, command.id).await?.ok_or_else(not_found)?;
        // The run the cancel stopped, if it was running: the attempt its
        // fetch took, as the row says now.
        let stopped = cancelled.leased_until.is_some().then_some(cancelled.attempt);
        let jobs = self.jobs.clone();
        let id = job.id;
        ctx.after_commit(async move {
            if let Some(attempt) = stopped {
                jobs.signal_cancelled(id, attempt);
            }
            jobs.publish(id).await;
        });
        Ok(cancelled)
    }
}

#[async_trait]
impl CommandHandler<RetryJob> for Handlers {
    async fn handle(&self, ctx: &CommandContext<'_>, command: RetryJob) -> Result<JobRecord> {
        ctx.request.require_admin()?;
        let tx = ctx.tx().await?;
        let job = store::get(tx, command.id).await?.ok_or_else(not_found)?;
        let retryable = matches!(job.state, JobState::Failed | JobState::Cancelled);
        let now = clock::now();
        if let (JobState::Cancelled, Some(until)) = (job.state, job.leased_until)
            && until > now
        {
            // Two runs of one job at once: the cancelled one may still be
            // stopping (its side effects are not fenced).
            return Err(Error::new(
                Code::FailedPrecondition,
                format!(
                    "the cancelled run may still be stopping (until {}); retry after it",
                    until.to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
                ),
            ));
        }
        if !retryable || !store::run_again(tx, &job, now).await? {
            return Err(Error::new(
                Code::FailedPrecondition,
                format!(
                    "the job is {}; only a failed or cancelled job can be retried",
                    job.state.as_str()
                ),
            ));
        }
        store::notify(tx, self.jobs.channel()).await?;
        let jobs = self.jobs.clone();
        let id = job.id;
        ctx.after_commit(async move {
            jobs.wake_all();
            jobs.publish(id).await;
        });
        store::get(tx, command.id).await?.ok_or_else(not_found)
    }
}

#[async_trait]
impl CommandHandler<DeleteJob> for Handlers {
    async fn handle(&self, ctx: &CommandContext<'_>, command: DeleteJob) -> Result<()> {
        ctx.request.require_admin()?;
        let tx = ctx.tx().await?;
        if store::delete_unless_running(tx, command.id).await? {
            return Ok(());
        }
        match store::get(tx, command.id).await? {
            Some(_) => Err(Error::new(
                Code::FailedPrecondition,
                "the job is running; cancel it first",
            )),
            None => Err(not_found()),
        }
    }
}

#[async_trait]
impl CommandHandler<SetQueuePaused> for Handlers {
    async fn handle(&self, ctx: &CommandContext<'_>, command: SetQueuePaused) -> Result<QueueStats> {
        ctx.request.require_admin()?;
        let tx = ctx.tx().await?;
        let known = self.jobs.queues();
        // A queue that no kind uses is a typo when pausing; resuming one
        // that was paused stays possible.
        let resuming_a_paused_queue = !command.paused && store::is_paused(tx, &command.queue).await?;
        if !known.contains(&command.queue.as_str()) && !resuming_a_paused_queue {
            return Err(Error::invalid_field(
                "queue",
                format!("{:?} is not a queue of this keel's job kinds", command.queue),
            ));
        }
        let now = clock::now();
        store::set_paused(tx, &command.queue, command.paused, now).await?;
        // Every process's loops re-read the pause when woken.
        store::notify(tx, self.jobs.channel()).await?;
        let jobs = self.jobs.clone();
        ctx.after_commit(async move { jobs.wake_all() });
        let stats = store::stats(tx, &known, now).await?;
        Ok(stats
            .into_iter()
            .find(|stats| stats.queue == command.queue)
            .unwrap_or(QueueStats {
                queue: command.queue,
                paused: command.paused,
                ..QueueStats::default()
            }))
    }
}

pub(crate) fn register(bus: &mut BusBuilder, jobs: &Jobs) {
    bus.command::<EnqueueJob>(Handlers { jobs: jobs.clone() });
    bus.command::<CancelJob>(Handlers { jobs: jobs.clone() });
    bus.command::<RetryJob>(Handlers { jobs: jobs.clone() });
    bus.command::<DeleteJob>(Handlers { jobs: jobs.clone() });
    bus.command::<SetQueuePaused>(Handlers { jobs: jobs.clone() });
}
