//! The job table and the only SQL of the jobs module: the enqueue (in the
//! command's transaction), the fetch that leases, and the fenced updates a
//! worker and the rescuer make.
//!
//! Every update of a running job is fenced on `state = 'running'`, its
//! `attempt` and its `lease_token`: a worker that lost its lease (paused
//! past it, rescued, running again elsewhere) changes nothing, and a rescue
//! never overwrites a job that completed meanwhile (river#1302).

use chrono::{DateTime, Utc};
use keel_kernel::{Error, NewJob, Result};
use sea_orm::sea_query::Expr;
use sea_orm::{
    ColumnTrait, ConnectionTrait, DatabaseBackend, EntityTrait, QueryFilter, QueryOrder, QuerySelect, Set, Statement,
};
use sha2::{Digest, Sha256};
use uuid::Uuid;

use crate::model::{AttemptError, JobRecord, JobState, Lease, Progress, QueueStats};

mod jobs {
    use sea_orm::entity::prelude::*;

    #[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
    #[sea_orm(table_name = "jobs")]
    pub struct Model {
        #[sea_orm(primary_key, auto_increment = false)]
        pub id: Uuid,
        pub queue: String,
        pub kind: String,
        pub args: String,
        pub state: String,
        pub priority: i16,
        pub run_at: DateTimeUtc,
        pub attempt: i32,
        pub max_attempts: i32,
        pub lease_token: Option<Uuid>,
        pub leased_until: Option<DateTimeUtc>,
        pub attempted_at: Option<DateTimeUtc>,
        pub errors: String,
        pub user_id: Option<Uuid>,
        pub created_at: DateTimeUtc,
        pub updated_at: DateTimeUtc,
        pub finished_at: Option<DateTimeUtc>,
        pub progress_percent: Option<i16>,
        pub progress_message: Option<String>,
        pub result: Option<String>,
    }

    #[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
    pub enum Relation {}

    impl ActiveModelBehavior for ActiveModel {}
}

/// A queue's pause, shared by every process (the fetch reads it).
mod job_queues {
    use sea_orm::entity::prelude::*;

    #[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
    #[sea_orm(table_name = "job_queues")]
    pub struct Model {
        #[sea_orm(primary_key, auto_increment = false)]
        pub queue: String,
        pub paused_at: Option<DateTimeUtc>,
        pub updated_at: DateTimeUtc,
    }

    #[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
    pub enum Relation {}

    impl ActiveModelBehavior for ActiveModel {}
}

fn record(row: jobs::Model) -> Result<JobRecord> {
    let state = JobState::parse(&row.state)
        .ok_or_else(|| Error::internal(format!("job {} has an unknown state {:?}", row.id, row.state)))?;
    Ok(JobRecord {
        id: row.id,
        queue: row.queue,
        kind: row.kind,
        args: serde_json::from_str(&row.args).map_err(Error::internal)?,
        state,
        priority: row.priority,
        run_at: row.run_at,
        attempt: u32::try_from(row.attempt).unwrap_or_default(),
        max_attempts: u32::try_from(row.max_attempts).unwrap_or(1),
        lease_token: row.lease_token,
        leased_until: row.leased_until,
        attempted_at: row.attempted_at,
        errors: serde_json::from_str(&row.errors).map_err(Error::internal)?,
        user_id: row.user_id,
        created_at: row.created_at,
        updated_at: row.updated_at,
        finished_at: row.finished_at,
        progress: row.progress_percent.map(|percent| Progress {
            percent: u8::try_from(percent.clamp(0, 100)).unwrap_or(100),
            message: row.progress_message.unwrap_or_default(),
        }),
        result: row
            .result
            .as_deref()
            .map(serde_json::from_str)
            .transpose()
            .map_err(Error::internal)?,
    })
}

/// The PostgreSQL channel that wakes the workers of the job table in the
/// connection's schema: processes sharing the table share the channel; test
/// schemas in one database never wake each other. `None` on SQLite.
pub async fn channel(db: &impl ConnectionTrait) -> Result<Option<String>> {
    if db.get_database_backend() != DatabaseBackend::Postgres {
        return Ok(None);
    }
    let row = db
        .query_one_raw(Statement::from_string(
            DatabaseBackend::Postgres,
            "SELECT current_schema() AS schema",
        ))
        .await?
        .ok_or_else(|| Error::internal("current_schema() returned no row"))?;
    let schema: String = row.try_get("", "schema")?;
    // A channel is an identifier of at most 63 bytes; a schema name may be
    // as long, so it is hashed.
    let digest = Sha256::digest(schema.as_bytes());
    let hex: String = digest.iter().take(12).map(|byte| format!("{byte:02x}")).collect();
    Ok(Some(format!("keel_jobs_{hex}")))
}

/// Writes `jobs`, available from their `run_at`; on PostgreSQL with a
/// channel also `NOTIFY` it, which PostgreSQL delivers when, and only if,
/// the transaction commits.
pub async fn insert(
    tx: &impl ConnectionTrait,
    new_jobs: Vec<NewJob>,
    now: DateTime<Utc>,
    notify: Option<&str>,
) -> Result<Vec<Uuid>> {
    let mut ids = Vec::with_capacity(new_jobs.len());
    let mut rows = Vec::with_capacity(new_jobs.len());
    for job in new_jobs {
        let id = keel_kernel::id::new_id();
        ids.push(id);
        rows.push(jobs::ActiveModel {
            id: Set(id),
            queue: Set(job.queue.to_owned()),
            kind: Set(job.kind.to_owned()),
            args: Set(job.args.to_string()),
            state: Set(JobState::Available.as_str().to_owned()),
            priority: Set(job.priority),
            run_at: Set(job.run_at.unwrap_or(now)),
            attempt: Set(0),
            max_attempts: Set(i32::try_from(job.max_attempts).unwrap_or(i32::MAX)),
            lease_token: Set(None),
            leased_until: Set(None),
            attempted_at: Set(None),
            errors: Set("[]".to_owned()),
            user_id: Set(job.user_id),
            created_at: Set(now),
            updated_at: Set(now),
            finished_at: Set(None),
            progress_percent: Set(None),
            progress_message: Set(None),
            result: Set(None),
        });
    }
    if rows.is_empty() {
        return Ok(ids);
    }
    jobs::Entity::insert_many(rows).exec_without_returning(tx).await?;
    if let Some(channel) = notify
        && tx.get_database_backend() == DatabaseBackend::Postgres
    {
        // Identical notifications of one transaction are folded into one.
        tx.execute_raw(Statement::from_sql_and_values(
            DatabaseBackend::Postgres,
            "SELECT pg_notify($1, '')",
            [channel.into()],
        ))
        .await?;
    }
    Ok(ids)
}

/// Leases up to `limit` due jobs of `queue`: smallest priority first, then
/// the earliest due. Each starts its next attempt, held until
/// `leased_until`, under a new lease token.
///
/// One statement on both backends. PostgreSQL: `FOR UPDATE SKIP LOCKED`, so
/// workers of every process fetch at once without taking each other's rows.
/// SQLite has no row locks (and no SKIP LOCKED): its one writer runs the
/// statement whole, so two fetches never lease one job.
pub async fn fetch(
    db: &impl ConnectionTrait,
    queue: &str,
    limit: u32,
    leased_until: DateTime<Utc>,
    now: DateTime<Utc>,
) -> Result<Vec<JobRecord>> {
    let backend = db.get_database_backend();
    let lock = match backend {
        DatabaseBackend::Postgres => "FOR UPDATE SKIP LOCKED",
        _ => "",
    };
    let sql = format!(
        r#"UPDATE jobs
           SET state = 'running', attempt = attempt + 1, lease_token = $1, leased_until = $2,
               attempted_at = $3, updated_at = $3
           WHERE id IN (
               SELECT id FROM jobs
               WHERE queue = $4 AND state = 'available' AND run_at <= $3
                 AND NOT EXISTS (SELECT 1 FROM job_queues WHERE job_queues.queue = $4 AND paused_at IS NOT NULL)
               ORDER BY priority, run_at, id
               LIMIT $5
               {lock}
           )
           RETURNING id, queue, kind, args, state, priority, run_at, attempt, max_attempts, lease_token,
                     leased_until, attempted_at, errors, user_id, created_at, updated_at, finished_at,
                     progress_percent, progress_message, result"#
    );
    let token = keel_kernel::id::new_id();
    let rows = jobs::Entity::find()
        .from_raw_sql(Statement::from_sql_and_values(
            backend,
            sql,
            [
                token.into(),
                leased_until.into(),
                now.into(),
                queue.into(),
                i64::from(limit).into(),
            ],
        ))
        .all(db)
        .await?;
    let mut leased = rows.into_iter().map(record).collect::<Result<Vec<_>>>()?;
    // RETURNING promises no order.
    leased.sort_by_key(|job| (job.priority, job.run_at, job.id));
    Ok(leased)
}

fn fenced(lease: &Lease) -> sea_orm::Condition {
    sea_orm::Condition::all()
        .add(jobs::Column::Id.eq(lease.id))
        .add(jobs::Column::State.eq(JobState::Running.as_str()))
        .add(jobs::Column::Attempt.eq(i32::try_from(lease.attempt).unwrap_or(i32::MAX)))
        .add(jobs::Column::LeaseToken.eq(lease.token))
}

fn errors_json(errors: &[AttemptError]) -> Result<String> {
    serde_json::to_string(errors).map_err(Error::internal)
}

/// Extends the lease; false when the worker no longer holds it.
pub async fn renew(db: &impl ConnectionTrait, lease: &Lease, until: DateTime<Utc>, now: DateTime<Utc>) -> Result<bool> {
    let result = jobs::Entity::update_many()
        .col_expr(jobs::Column::LeasedUntil, Expr::value(until))
        .col_expr(jobs::Column::UpdatedAt, Expr::value(now))
        .filter(fenced(lease))
        .exec(db)
        .await?;
    Ok(result.rows_affected == 1)
}

/// Marks the job completed; false (and nothing changed) when the worker no
/// longer holds its lease.
pub async fn complete(db: &impl ConnectionTrait, lease: &Lease, now: DateTime<Utc>) -> Result<bool> {
    finish(db, lease, JobState::Completed, None, now).await
}

/// Marks the job failed for good, keeping every attempt's error.
pub async fn fail(
    db: &impl ConnectionTrait,
    lease: &Lease,
    errors: &[AttemptError],
    now: DateTime<Utc>,
) -> Result<bool> {
    finish(db, lease, JobState::Failed, Some(errors), now).await
}

async fn finish(
    db: &impl ConnectionTrait,
    lease: &Lease,
    state: JobState,
    errors: Option<&[AttemptError]>,
    now: DateTime<Utc>,
) -> Result<bool> {
    let mut update = jobs::Entity::update_many()
        .col_expr(jobs::Column::State, Expr::value(state.as_str()))
        .col_expr(jobs::Column::LeaseToken, Expr::value(Option::<Uuid>::None))
        .col_expr(jobs::Column::LeasedUntil, Expr::value(Option::<DateTime<Utc>>::None))
        .col_expr(jobs::Column::FinishedAt, Expr::value(now))
        .col_expr(jobs::Column::UpdatedAt, Expr::value(now));
    if let Some(errors) = errors {
        update = update.col_expr(jobs::Column::Errors, Expr::value(errors_json(errors)?));
    }
    let result = update.filter(fenced(lease)).exec(db).await?;
    Ok(result.rows_affected == 1)
}

/// Makes the job available again at `run_at` (a retry after backoff),
/// keeping every attempt's error.
pub async fn retry(
    db: &impl ConnectionTrait,
    lease: &Lease,
    run_at: DateTime<Utc>,
    errors: &[AttemptError],
    now: DateTime<Utc>,
) -> Result<bool> {
    let result = jobs::Entity::update_many()
        .col_expr(jobs::Column::State, Expr::value(JobState::Available.as_str()))
        .col_expr(jobs::Column::LeaseToken, Expr::value(Option::<Uuid>::None))
        .col_expr(jobs::Column::LeasedUntil, Expr::value(Option::<DateTime<Utc>>::None))
        .col_expr(jobs::Column::RunAt, Expr::value(run_at))
        .col_expr(jobs::Column::Errors, Expr::value(errors_json(errors)?))
        .col_expr(jobs::Column::UpdatedAt, Expr::value(now))
        .filter(fenced(lease))
        .exec(db)
        .await?;
    Ok(result.rows_affected == 1)
}

/// Running jobs whose lease ran out before `now` (their worker died or
/// stalled): each becomes available again at once, or failed when it used
/// its last attempt, with the lost lease noted among its errors. Each
/// update is fenced on the lease that expired and on its being expired
/// still, so a renewal or a completion in between wins. How many it rescued.
pub async fn rescue(db: &impl ConnectionTrait, now: DateTime<Utc>, limit: u64) -> Result<usize> {
    let expired = jobs::Entity::find()
        .filter(jobs::Column::State.eq(JobState::Running.as_str()))
        .filter(jobs::Column::LeasedUntil.lt(now))
        .order_by_asc(jobs::Column::LeasedUntil)
        .limit(limit)
        .all(db)
        .await?;
    let mut rescued = 0;
    for row in expired {
        let job = record(row)?;
        let Some(lease) = job.lease() else { continue };
        let mut errors = job.errors.clone();
        errors.push(AttemptError {
            attempt: job.attempt,
            at: now,
            message: "the worker's lease expired (it stopped or stalled)".to_owned(),
        });
        let last = job.attempt >= job.max_attempts;
        let state = if last { JobState::Failed } else { JobState::Available };
        let mut update = jobs::Entity::update_many()
            .col_expr(jobs::Column::State, Expr::value(state.as_str()))
            .col_expr(jobs::Column::LeaseToken, Expr::value(Option::<Uuid>::None))
            .col_expr(jobs::Column::LeasedUntil, Expr::value(Option::<DateTime<Utc>>::None))
            .col_expr(jobs::Column::Errors, Expr::value(errors_json(&errors)?))
            .col_expr(jobs::Column::UpdatedAt, Expr::value(now));
        update = if last {
            update.col_expr(jobs::Column::FinishedAt, Expr::value(now))
        } else {
            update.col_expr(jobs::Column::RunAt, Expr::value(now))
        };
        let result = update
            .filter(fenced(&lease))
            .filter(jobs::Column::LeasedUntil.lt(now))
            .exec(db)
            .await?;
        if result.rows_affected == 1 {
            rescued += 1;
            tracing::warn!(job_id = %job.id, kind = %job.kind, attempt = job.attempt, "job lease expired; rescued");
        }
    }
    Ok(rescued)
}

pub async fn get(db: &impl ConnectionTrait, id: Uuid) -> Result<Option<JobRecord>> {
    jobs::Entity::find_by_id(id).one(db).await?.map(record).transpose()
}

/// When the earliest available job of `queue` is due (a delayed job, a
/// retry waiting out its backoff).
pub async fn next_due(db: &impl ConnectionTrait, queue: &str) -> Result<Option<DateTime<Utc>>> {
    Ok(jobs::Entity::find()
        .filter(jobs::Column::Queue.eq(queue))
        .filter(jobs::Column::State.eq(JobState::Available.as_str()))
        .order_by_asc(jobs::Column::RunAt)
        .one(db)
        .await?
        .map(|row| row.run_at))
}

/// How many jobs the table holds.
pub async fn count(db: &impl ConnectionTrait) -> Result<u64> {
    use sea_orm::PaginatorTrait;
    Ok(jobs::Entity::find().count(db).await?)
}

/// How many jobs are in `state`.
pub async fn count_in_state(db: &impl ConnectionTrait, state: JobState) -> Result<u64> {
    use sea_orm::PaginatorTrait;
    Ok(jobs::Entity::find()
        .filter(jobs::Column::State.eq(state.as_str()))
        .count(db)
        .await?)
}

/// Stores a running job's progress, fenced on its lease; false when the
/// worker no longer holds it (cancelled, lease lost).
pub async fn progress(
    db: &impl ConnectionTrait,
    lease: &Lease,
    percent: u8,
    message: &str,
    now: DateTime<Utc>,
) -> Result<bool> {
    let result = jobs::Entity::update_many()
        .col_expr(jobs::Column::ProgressPercent, Expr::value(i16::from(percent.min(100))))
        .col_expr(jobs::Column::ProgressMessage, Expr::value(message))
        .col_expr(jobs::Column::UpdatedAt, Expr::value(now))
        .filter(fenced(lease))
        .exec(db)
        .await?;
    Ok(result.rows_affected == 1)
}

/// [`complete`] with the handler's result (JSON), in the same fenced update.
pub async fn complete_with_result(
    db: &impl ConnectionTrait,
    lease: &Lease,
    result: &serde_json::Value,
    now: DateTime<Utc>,
) -> Result<bool> {
    let updated = jobs::Entity::update_many()
        .col_expr(jobs::Column::State, Expr::value(JobState::Completed.as_str()))
        .col_expr(jobs::Column::LeaseToken, Expr::value(Option::<Uuid>::None))
        .col_expr(jobs::Column::LeasedUntil, Expr::value(Option::<DateTime<Utc>>::None))
        .col_expr(jobs::Column::FinishedAt, Expr::value(now))
        .col_expr(jobs::Column::UpdatedAt, Expr::value(now))
        .col_expr(jobs::Column::Result, Expr::value(result.to_string()))
        .filter(fenced(lease))
        .exec(db)
        .await?;
    Ok(updated.rows_affected == 1)
}

/// Cancels a job that is waiting or running: it is `cancelled` at once and
/// its lease is cleared, so whatever its worker writes later is refused by
/// the fence. False when it was neither (finished meanwhile).
pub async fn cancel(db: &impl ConnectionTrait, id: Uuid, now: DateTime<Utc>) -> Result<bool> {
    let result = jobs::Entity::update_many()
        .col_expr(jobs::Column::State, Expr::value(JobState::Cancelled.as_str()))
        .col_expr(jobs::Column::LeaseToken, Expr::value(Option::<Uuid>::None))
        .col_expr(jobs::Column::LeasedUntil, Expr::value(Option::<DateTime<Utc>>::None))
        .col_expr(jobs::Column::FinishedAt, Expr::value(now))
        .col_expr(jobs::Column::UpdatedAt, Expr::value(now))
        .filter(jobs::Column::Id.eq(id))
        .filter(jobs::Column::State.is_in([JobState::Available.as_str(), JobState::Running.as_str()]))
        .exec(db)
        .await?;
    Ok(result.rows_affected == 1)
}

/// Makes a failed or cancelled job available again at once, with at least
/// one attempt left; its errors stay. Fenced on the state and attempt it
/// was read with; false when it changed meanwhile.
pub async fn run_again(db: &impl ConnectionTrait, job: &JobRecord, now: DateTime<Utc>) -> Result<bool> {
    let attempt = i32::try_from(job.attempt).unwrap_or(i32::MAX);
    let max_attempts = job.max_attempts.max(job.attempt.saturating_add(1));
    let result = jobs::Entity::update_many()
        .col_expr(jobs::Column::State, Expr::value(JobState::Available.as_str()))
        .col_expr(jobs::Column::RunAt, Expr::value(now))
        .col_expr(
            jobs::Column::MaxAttempts,
            Expr::value(i32::try_from(max_attempts).unwrap_or(i32::MAX)),
        )
        .col_expr(jobs::Column::FinishedAt, Expr::value(Option::<DateTime<Utc>>::None))
        .col_expr(jobs::Column::ProgressPercent, Expr::value(Option::<i16>::None))
        .col_expr(jobs::Column::ProgressMessage, Expr::value(Option::<String>::None))
        .col_expr(jobs::Column::Result, Expr::value(Option::<String>::None))
        .col_expr(jobs::Column::UpdatedAt, Expr::value(now))
        .filter(jobs::Column::Id.eq(job.id))
        .filter(jobs::Column::State.eq(job.state.as_str()))
        .filter(jobs::Column::Attempt.eq(attempt))
        .exec(db)
        .await?;
    Ok(result.rows_affected == 1)
}

/// Deletes a job unless it is running; false when nothing was deleted.
pub async fn delete_unless_running(db: &impl ConnectionTrait, id: Uuid) -> Result<bool> {
    let result = jobs::Entity::delete_many()
        .filter(jobs::Column::Id.eq(id))
        .filter(jobs::Column::State.ne(JobState::Running.as_str()))
        .exec(db)
        .await?;
    Ok(result.rows_affected == 1)
}

/// Wakes the workers of every process on PostgreSQL when the transaction
/// commits (what an enqueue sends; a retry or a resume sends it too).
pub async fn notify(db: &impl ConnectionTrait, channel: Option<&str>) -> Result<()> {
    if let Some(channel) = channel
        && db.get_database_backend() == DatabaseBackend::Postgres
    {
        db.execute_raw(Statement::from_sql_and_values(
            DatabaseBackend::Postgres,
            "SELECT pg_notify($1, '')",
            [channel.into()],
        ))
        .await?;
    }
    Ok(())
}

/// Pauses (`paused`) or resumes `queue` for every process.
pub async fn set_paused(db: &impl ConnectionTrait, queue: &str, paused: bool, now: DateTime<Utc>) -> Result<()> {
    use sea_orm::sea_query::OnConflict;

    let row = job_queues::ActiveModel {
        queue: Set(queue.to_owned()),
        paused_at: Set(paused.then_some(now)),
        updated_at: Set(now),
    };
    job_queues::Entity::insert(row)
        .on_conflict(
            OnConflict::column(job_queues::Column::Queue)
                .update_columns([job_queues::Column::PausedAt, job_queues::Column::UpdatedAt])
                .to_owned(),
        )
        .exec_without_returning(db)
        .await?;
    Ok(())
}

/// Whether `queue` is paused.
pub async fn is_paused(db: &impl ConnectionTrait, queue: &str) -> Result<bool> {
    Ok(job_queues::Entity::find_by_id(queue.to_owned())
        .one(db)
        .await?
        .is_some_and(|row| row.paused_at.is_some()))
}

/// Every queue with a row in `job_queues` and whether it is paused.
async fn queue_rows(db: &impl ConnectionTrait) -> Result<Vec<(String, bool)>> {
    Ok(job_queues::Entity::find()
        .all(db)
        .await?
        .into_iter()
        .map(|row| (row.queue, row.paused_at.is_some()))
        .collect())
}

/// What [`list`] returns: the filters of `ListJobs`.
#[derive(Debug, Clone, Default)]
pub struct ListFilter {
    pub queue: Option<String>,
    pub kind: Option<String>,
    pub state: Option<JobState>,
    pub created_after: Option<DateTime<Utc>>,
    pub created_before: Option<DateTime<Utc>>,
    /// Only this user's jobs (a caller who is not an admin).
    pub owner: Option<Uuid>,
}

/// Jobs matching `filter`, newest first (ids are time-ordered), with ids
/// below `before`, at most `limit`.
pub async fn list(
    db: &impl ConnectionTrait,
    filter: &ListFilter,
    before: Option<Uuid>,
    limit: u64,
) -> Result<Vec<JobRecord>> {
    let mut select = jobs::Entity::find();
    if let Some(queue) = &filter.queue {
        select = select.filter(jobs::Column::Queue.eq(queue.as_str()));
    }
    if let Some(kind) = &filter.kind {
        select = select.filter(jobs::Column::Kind.eq(kind.as_str()));
    }
    if let Some(state) = filter.state {
        select = select.filter(jobs::Column::State.eq(state.as_str()));
    }
    if let Some(after) = filter.created_after {
        select = select.filter(jobs::Column::CreatedAt.gte(after));
    }
    if let Some(before) = filter.created_before {
        select = select.filter(jobs::Column::CreatedAt.lt(before));
    }
    if let Some(owner) = filter.owner {
        select = select.filter(jobs::Column::UserId.eq(owner));
    }
    if let Some(before) = before {
        select = select.filter(jobs::Column::Id.lt(before));
    }
    select
        .order_by_desc(jobs::Column::Id)
        .limit(limit)
        .all(db)
        .await?
        .into_iter()
        .map(record)
        .collect()
}

/// Statistics of every queue in `known` (the queues of this keel's kinds),
/// in the table, or paused, by name.
pub async fn stats(db: &impl ConnectionTrait, known: &[&str], now: DateTime<Utc>) -> Result<Vec<QueueStats>> {
    use std::collections::BTreeMap;

    let mut queues: BTreeMap<String, QueueStats> = BTreeMap::new();
    fn stats_of<'a>(queues: &'a mut BTreeMap<String, QueueStats>, queue: &str) -> &'a mut QueueStats {
        queues.entry(queue.to_owned()).or_insert_with(|| QueueStats {
            queue: queue.to_owned(),
            ..QueueStats::default()
        })
    }
    for queue in known {
        stats_of(&mut queues, queue);
    }
    for (queue, paused) in queue_rows(db).await? {
        stats_of(&mut queues, &queue).paused = paused;
    }
    let count = |n: i64| u64::try_from(n).unwrap_or_default();
    // Finished jobs other than failed ones are left out: the table may hold
    // many completed jobs, and they are no queue's load.
    let by_state: Vec<(String, String, i64)> = jobs::Entity::find()
        .select_only()
        .column(jobs::Column::Queue)
        .column(jobs::Column::State)
        .column_as(jobs::Column::Id.count(), "n")
        .filter(jobs::Column::State.is_in([
            JobState::Available.as_str(),
            JobState::Running.as_str(),
            JobState::Failed.as_str(),
        ]))
        .group_by(jobs::Column::Queue)
        .group_by(jobs::Column::State)
        .into_tuple()
        .all(db)
        .await?;
    for (queue, state, n) in by_state {
        let stats = stats_of(&mut queues, &queue);
        match JobState::parse(&state) {
            Some(JobState::Available) => stats.depth = count(n),
            Some(JobState::Running) => stats.running = count(n),
            Some(JobState::Failed) => stats.failed = count(n),
            _ => {}
        }
    }
    let due: Vec<(String, i64)> = jobs::Entity::find()
        .select_only()
        .column(jobs::Column::Queue)
        .column_as(jobs::Column::Id.count(), "n")
        .filter(jobs::Column::State.eq(JobState::Available.as_str()))
        .filter(jobs::Column::RunAt.lte(now))
        .group_by(jobs::Column::Queue)
        .into_tuple()
        .all(db)
        .await?;
    for (queue, n) in due {
        stats_of(&mut queues, &queue).available = count(n);
    }
    let completed: Vec<(String, i64)> = jobs::Entity::find()
        .select_only()
        .column(jobs::Column::Queue)
        .column_as(jobs::Column::Id.count(), "n")
        .filter(jobs::Column::State.eq(JobState::Completed.as_str()))
        .filter(jobs::Column::FinishedAt.gte(now - chrono::Duration::minutes(1)))
        .group_by(jobs::Column::Queue)
        .into_tuple()
        .all(db)
        .await?;
    for (queue, n) in completed {
        stats_of(&mut queues, &queue).completed_last_minute = count(n);
    }
    let waiting: Vec<String> = queues
        .values()
        .filter(|stats| stats.available > 0)
        .map(|stats| stats.queue.clone())
        .collect();
    for queue in waiting {
        // The oldest due job: the fetch index has the queue's available
        // jobs; few queues, one row each.
        let oldest = jobs::Entity::find()
            .filter(jobs::Column::Queue.eq(queue.as_str()))
            .filter(jobs::Column::State.eq(JobState::Available.as_str()))
            .filter(jobs::Column::RunAt.lte(now))
            .order_by_asc(jobs::Column::RunAt)
            .one(db)
            .await?;
        if let Some(oldest) = oldest {
            stats_of(&mut queues, &queue).oldest_waiting = Some((now - oldest.run_at).to_std().unwrap_or_default());
        }
    }
    Ok(queues.into_values().collect())
}
