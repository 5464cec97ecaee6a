//! Reading jobs: a job is seen by its owner and by admins; anyone else is
//! told it does not exist. Lists, queue statistics, and a job watched live.

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use keel_kernel::page::{decode_token, encode_token, page_size};
use keel_kernel::{BusBuilder, Code, Error, Live, Query, QueryContext, QueryHandler, Result, clock};
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;
use uuid::Uuid;

use crate::Jobs;
use crate::commands::visible_to;
use crate::model::{JobRecord, JobState, QueueOverview};
use crate::store::{self, ListFilter};
use crate::watching::Watching;

pub struct GetJob {
    pub id: Uuid,
}

impl Query for GetJob {
    const NAME: &'static str = "jobs.get_job";
    type Output = JobRecord;
}

pub struct ListJobs {
    pub page_size: i32,
    pub page_token: String,
    pub queue: Option<String>,
    pub kind: Option<String>,
    pub state: Option<JobState>,
    pub created_after: Option<DateTime<Utc>>,
    pub created_before: Option<DateTime<Utc>>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct JobPage {
    pub jobs: Vec<JobRecord>,
    pub next_page_token: String,
}

impl Query for ListJobs {
    const NAME: &'static str = "jobs.list_jobs";
    type Output = JobPage;
}

pub struct GetQueueStats;

impl Query for GetQueueStats {
    const NAME: &'static str = "jobs.get_queue_stats";
    type Output = QueueOverview;
}

/// The job now, then at every change until it is finished.
pub struct WatchJob {
    pub id: Uuid,
}

impl Query for WatchJob {
    const NAME: &'static str = "jobs.watch_job";
    type Output = Live<mpsc::Receiver<Result<JobRecord>>>;
}

fn not_found() -> Error {
    Error::new(Code::NotFound, "job not found")
}

struct Handlers {
    jobs: Jobs,
}

#[async_trait]
impl QueryHandler<GetJob> for Handlers {
    async fn handle(&self, ctx: &QueryContext<'_>, query: GetJob) -> Result<JobRecord> {
        ctx.request.require_caller()?;
        let job = store::get(ctx.db, query.id).await?.ok_or_else(not_found)?;
        if !visible_to(ctx.request, &job) {
            return Err(not_found());
        }
        Ok(job)
    }
}

/// Job pages: the filters they belong to and the last id seen.
#[derive(Serialize, Deserialize)]
struct JobCursor {
    filters: String,
    before: Uuid,
}

#[async_trait]
impl QueryHandler<ListJobs> for Handlers {
    async fn handle(&self, ctx: &QueryContext<'_>, query: ListJobs) -> Result<JobPage> {
        ctx.request.require_caller()?;
        let limit = page_size(query.page_size)?;
        // Users list their own jobs; admins (and trusted callers) all.
        let owner = match (&ctx.request.principal, ctx.request.require_admin()) {
            (_, Ok(())) => None,
            (Some(principal), Err(_)) => Some(principal.user_id),
            (None, Err(error)) => return Err(error),
        };
        if let (Some(after), Some(before)) = (query.created_after, query.created_before)
            && after >= before
        {
            return Err(Error::invalid_field(
                "created_before",
                "must be later than created_after",
            ));
        }
        let filter = ListFilter {
            queue: query.queue,
            kind: query.kind,
            state: query.state,
            created_after: query.created_after,
            created_before: query.created_before,
            owner,
        };
        let filters = format!(
            "{:?}|{:?}|{:?}|{:?}|{:?}|{:?}",
            filter.queue, filter.kind, filter.state, filter.created_after, filter.created_before, filter.owner
        );
        let cursor: Option<JobCursor> = decode_token(&query.page_token)?;
        if cursor.as_ref().is_some_and(|cursor| cursor.filters != filters) {
            return Err(Error::invalid_field(
                "page_token",
                "belongs to a list with other filters",
            ));
        }
        let mut jobs = store::list(ctx.db, &filter, cursor.map(|cursor| cursor.before), limit + 1).await?;
        let next_page_token = if jobs.len() as u64 > limit {
            jobs.truncate(limit as usize);
            match jobs.last() {
                Some(last) => encode_token(&JobCursor {
                    filters,
                    before: last.id,
                })?,
                None => String::new(),
            }
        } else {
            String::new()
        };
        Ok(JobPage { jobs, next_page_token })
    }
}

#[async_trait]
impl QueryHandler<GetQueueStats> for Handlers {
    async fn handle(&self, ctx: &QueryContext<'_>, _query: GetQueueStats) -> Result<QueueOverview> {
        ctx.request.require_admin()?;
        Ok(QueueOverview {
            queues: store::stats(ctx.db, &self.jobs.queues(), clock::now()).await?,
            breakers: self
                .jobs
                .settings()
                .breakers
                .iter()
                .map(|breaker| breaker.snapshot().into())
                .collect(),
        })
    }
}

#[async_trait]
impl QueryHandler<WatchJob> for Handlers {
    async fn handle(&self, ctx: &QueryContext<'_>, query: WatchJob) -> Result<Live<mpsc::Receiver<Result<JobRecord>>>> {
        ctx.request.require_caller()?;
        let caller = ctx.request.principal.as_ref().map(|principal| principal.user_id);
        // Listening before the first read: no change in between is missed.
        let watching = self.jobs.start_watching(query.id, caller)?;
        let job = store::get(ctx.db, query.id).await?.ok_or_else(not_found)?;
        if !visible_to(ctx.request, &job) {
            return Err(not_found());
        }
        let (sender, receiver) = mpsc::channel(64);
        // Left out of traces with the call that opened it, when it is.
        tokio::spawn(keel_kernel::trace::keep_sampling(watch(
            job,
            sender,
            ctx.request.access_ended(),
            watching,
        )));
        Ok(Live(receiver))
    }
}

/// Sends `job`, then each change: this process's at once, other
/// processes' when the process's poller reads them (see `watching.rs`); a
/// slow watcher gets the latest row, never an older one after a newer.
/// Ends after a finished state, when the job is deleted (NOT_FOUND), when
/// access ends, or when the watcher goes away.
async fn watch(
    job: JobRecord,
    sender: mpsc::Sender<Result<JobRecord>>,
    mut access_ended: keel_kernel::access::AccessEnd,
    mut watching: Watching,
) {
    let mut last = job;
    if sender.send(Ok(last.clone())).await.is_err() || last.state.is_finished() {
        return;
    }
    loop {
        tokio::select! {
            changed = watching.changes.changed() => {
                // The sender lives while this stream is registered.
                if changed.is_err() {
                    return;
                }
            }
            ended = &mut access_ended => {
                let _ = sender.send(Err(ended.into_error(&[]))).await;
                return;
            }
            () = sender.closed() => return,
        }
        let Some(latest) = watching.changes.borrow_and_update().clone() else {
            continue;
        };
        let Some(current) = latest.as_ref().clone() else {
            let _ = sender.send(Err(not_found())).await;
            return;
        };
        // Unchanged, or older than what was sent (a read that raced a write).
        if current == last || current.updated_at < last.updated_at {
            continue;
        }
        let finished = current.state.is_finished();
        last = current;
        if sender.send(Ok(last.clone())).await.is_err() || finished {
            return;
        }
    }
}

pub(crate) fn register(bus: &mut BusBuilder, jobs: &Jobs) {
    bus.query::<GetJob>(Handlers { jobs: jobs.clone() });
    bus.query::<ListJobs>(Handlers { jobs: jobs.clone() });
    bus.query::<GetQueueStats>(Handlers { jobs: jobs.clone() });
    bus.query::<WatchJob>(Handlers { jobs: jobs.clone() });
}
