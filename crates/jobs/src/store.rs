//! The job table and the only SQL of the jobs module: the enqueue (in the
//! command's transaction), the fetch that leases, and the fenced updates a
//! worker and the rescuer make.
//!
//! Every update of a running job is fenced on `state = 'running'`, its
//! `attempt` and its `lease_token`: a worker that lost its lease (paused
//! past it, rescued, running again elsewhere) changes nothing, and a rescue
//! never overwrites a job that completed meanwhile (river#1302).

use chrono::{DateTime, Utc};
use keel_kernel::{Error, NewJob, Result, Unique};
use sea_orm::sea_query::{Expr, ExprTrait};
use sea_orm::{
    ColumnTrait, ConnectionTrait, DatabaseBackend, DatabaseConnection, EntityTrait, QueryFilter, QueryOrder,
    QuerySelect, Set, Statement, TransactionTrait,
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
        pub timeout_ms: Option<i64>,
        pub snoozes: i32,
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
        timeout: row
            .timeout_ms
            .and_then(|ms| u64::try_from(ms).ok())
            .map(std::time::Duration::from_millis),
        snoozes: u32::try_from(row.snoozes).unwrap_or_default(),
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
/// the transaction commits. A unique job that finds its key taken is not
/// written: its id is the existing job's (see [`insert_reporting`]).
pub async fn insert(
    tx: &impl ConnectionTrait,
    new_jobs: Vec<NewJob>,
    now: DateTime<Utc>,
    notify: Option<&str>,
) -> Result<Vec<Uuid>> {
    Ok(insert_reporting(tx, new_jobs, now, notify)
        .await?
        .into_iter()
        .map(|enqueued| enqueued.id)
        .collect())
}

/// What an enqueue did with one job.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Enqueued {
    /// The job written, or the unique job that was there already.
    pub id: Uuid,
    /// A unique job whose key was taken: nothing was written.
    pub duplicate: bool,
}

/// [`insert`], saying for each job whether it was written or found.
pub async fn insert_reporting(
    tx: &impl ConnectionTrait,
    new_jobs: Vec<NewJob>,
    now: DateTime<Utc>,
    notify: Option<&str>,
) -> Result<Vec<Enqueued>> {
    // Each job's own id, and its unique key when it has one.
    let mut slots: Vec<(Uuid, Option<String>)> = Vec::with_capacity(new_jobs.len());
    let mut rows = Vec::new();
    let mut unique_rows = Vec::new();
    let mut keys_seen = std::collections::HashSet::new();
    for job in new_jobs {
        let id = keel_kernel::id::new_id();
        let Some(unique) = &job.unique else {
            slots.push((id, None));
            rows.push(new_row(id, &job, now));
            continue;
        };
        let key = unique_key(job.kind, unique, now)?;
        // A key twice in one batch: the first is written (or found), the
        // second gets its id (PostgreSQL refuses to upsert one row twice
        // in a statement).
        if keys_seen.insert(key.clone()) {
            let states = unique_states(unique);
            unique_rows.push((id, job, key.clone(), states));
        }
        slots.push((id, Some(key)));
    }
    let inserted_plain = !rows.is_empty();
    if inserted_plain {
        jobs::Entity::insert_many(rows).exec_without_returning(tx).await?;
    }
    let holders = insert_unique(tx, unique_rows, now).await?;
    let enqueued = slots
        .into_iter()
        .map(|(own, key)| match key {
            None => Ok(Enqueued {
                id: own,
                duplicate: false,
            }),
            Some(key) => {
                let id = *holders
                    .get(&key)
                    .ok_or_else(|| Error::internal("a unique job's insert returned no row"))?;
                Ok(Enqueued {
                    id,
                    duplicate: id != own,
                })
            }
        })
        .collect::<Result<Vec<_>>>()?;
    let inserted_any = inserted_plain || enqueued.iter().any(|job| !job.duplicate);
    if let Some(channel) = notify
        && inserted_any
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
    Ok(enqueued)
}

fn new_row(id: Uuid, job: &NewJob, now: DateTime<Utc>) -> jobs::ActiveModel {
    jobs::ActiveModel {
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
        timeout_ms: Set(job
            .timeout
            .map(|timeout| i64::try_from(timeout.as_millis()).unwrap_or(i64::MAX))),
        snoozes: Set(0),
        progress_percent: Set(None),
        progress_message: Set(None),
        result: Set(None),
    }
}

/// The jobs that hold their unique key: those of the partial unique index
/// `jobs_unique` (migration `m20261203_000012_jobs_scheduling`, where the
/// same text is: the conflict target must name the index's predicate).
fn unique_predicate(backend: DatabaseBackend) -> &'static str {
    match backend {
        DatabaseBackend::Postgres => "unique_key IS NOT NULL AND strpos(unique_states, ',' || state || ',') > 0",
        _ => "unique_key IS NOT NULL AND instr(unique_states, ',' || state || ',') > 0",
    }
}

/// The stored key of a unique job: a hash of its kind, its key and, with
/// a period, the start of the period `now` is in (periods are aligned to
/// the Unix epoch), so that any key fits the column and the next period
/// is another key.
fn unique_key(kind: &str, unique: &Unique, now: DateTime<Utc>) -> Result<String> {
    let mut hasher = Sha256::new();
    hasher.update(kind.as_bytes());
    hasher.update([0]);
    hasher.update(unique.key.as_bytes());
    if let Some(period) = unique.period {
        let period = i64::try_from(period.as_micros()).unwrap_or(i64::MAX);
        if period <= 0 {
            return Err(Error::internal(format!(
                "the unique period of a {kind} job must be positive"
            )));
        }
        let start = now.timestamp_micros().div_euclid(period) * period;
        hasher.update([0]);
        hasher.update(start.to_string().as_bytes());
    }
    Ok(hasher.finalize().iter().map(|byte| format!("{byte:02x}")).collect())
}

/// The states in which a unique job holds its key, as stored:
/// `,available,running,` and the finished states asked for.
fn unique_states(unique: &Unique) -> String {
    let mut states = vec![JobState::Available, JobState::Running];
    for (counted, state) in [
        (unique.completed, JobState::Completed),
        (unique.failed, JobState::Failed),
        (unique.cancelled, JobState::Cancelled),
    ] {
        if counted {
            states.push(state);
        }
    }
    let mut stored = String::from(",");
    for state in states {
        stored.push_str(state.as_str());
        stored.push(',');
    }
    stored
}

/// Writes unique jobs (their keys distinct) in one statement; for each key,
/// the id of the job that holds it: the one written, or the one that was
/// there. The partial unique index decides, so concurrent enqueues of a key
/// (in any transaction, in any process) leave one job: on PostgreSQL the
/// second waits for the first's transaction and, once it commits, takes its
/// row (`DO UPDATE` returns it; `DO NOTHING` would return nothing); SQLite
/// runs the statements one after the other.
async fn insert_unique(
    tx: &impl ConnectionTrait,
    rows: Vec<(Uuid, NewJob, String, String)>,
    now: DateTime<Utc>,
) -> Result<std::collections::HashMap<String, Uuid>> {
    /// Rows per statement: 16 parameters each stays far below both
    /// backends' limits (PostgreSQL 65535, SQLite 32766).
    const CHUNK: usize = 1000;
    let mut holders = std::collections::HashMap::with_capacity(rows.len());
    let backend = tx.get_database_backend();
    let mut rows = rows.into_iter().peekable();
    while rows.peek().is_some() {
        let chunk: Vec<_> = rows.by_ref().take(CHUNK).collect();
        let mut values: Vec<sea_orm::Value> = Vec::with_capacity(chunk.len() * 16);
        let mut tuples = Vec::with_capacity(chunk.len());
        for (id, job, key, states) in chunk {
            let first = values.len();
            values.extend([
                id.into(),
                job.queue.into(),
                job.kind.into(),
                job.args.to_string().into(),
                JobState::Available.as_str().into(),
                job.priority.into(),
                job.run_at.unwrap_or(now).into(),
                0_i32.into(),
                i32::try_from(job.max_attempts).unwrap_or(i32::MAX).into(),
                "[]".into(),
                job.user_id.into(),
                now.into(),
                now.into(),
                key.into(),
                states.into(),
                job.timeout
                    .map(|timeout| i64::try_from(timeout.as_millis()).unwrap_or(i64::MAX))
                    .into(),
            ]);
            let placeholders: Vec<String> = (first + 1..=values.len()).map(|index| format!("${index}")).collect();
            tuples.push(format!("({})", placeholders.join(", ")));
        }
        let sql = format!(
            "INSERT INTO jobs (id, queue, kind, args, state, priority, run_at, attempt, max_attempts, errors, user_id, \
             created_at, updated_at, unique_key, unique_states, timeout_ms) VALUES {} \
             ON CONFLICT (unique_key) WHERE {} DO UPDATE SET kind = excluded.kind \
             RETURNING id, unique_key",
            tuples.join(", "),
            unique_predicate(backend)
        );
        for row in tx
            .query_all_raw(Statement::from_sql_and_values(backend, sql, values))
            .await?
        {
            let id: Uuid = row.try_get("", "id")?;
            let key: String = row.try_get("", "unique_key")?;
            holders.insert(key, id);
        }
    }
    Ok(holders)
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
    fetch_of_kinds(db, queue, None, limit, leased_until, now).await
}

/// [`fetch`], taking only jobs of `kinds` when given: a process leaves the
/// jobs it has no handler for (an older or newer keel's kinds, during a
/// rolling deploy) to the processes that have one.
pub async fn fetch_of_kinds(
    db: &impl ConnectionTrait,
    queue: &str,
    kinds: Option<&[&str]>,
    limit: u32,
    leased_until: DateTime<Utc>,
    now: DateTime<Utc>,
) -> Result<Vec<JobRecord>> {
    if kinds.is_some_and(<[&str]>::is_empty) {
        return Ok(Vec::new());
    }
    let backend = db.get_database_backend();
    let lock = match backend {
        DatabaseBackend::Postgres => "FOR UPDATE SKIP LOCKED",
        _ => "",
    };
    // `kind IN ($6, ...)`: a filter on the fetch index's rows, cheap while
    // the head of the queue is mostly this process's kinds.
    let kind_filter = match kinds {
        Some(kinds) => {
            let placeholders: Vec<String> = (6..6 + kinds.len()).map(|index| format!("${index}")).collect();
            format!(" AND kind IN ({})", placeholders.join(", "))
        }
        None => String::new(),
    };
    let sql = format!(
        r#"UPDATE jobs
           SET state = 'running', attempt = attempt + 1, lease_token = $1, leased_until = $2,
               attempted_at = $3, updated_at = $3
           WHERE id IN (
               SELECT id FROM jobs
               WHERE queue = $4 AND state = 'available' AND run_at <= $3{kind_filter}
                 AND NOT EXISTS (SELECT 1 FROM job_queues WHERE job_queues.queue = $4 AND paused_at IS NOT NULL)
               ORDER BY priority, run_at, id
               LIMIT $5
               {lock}
           )
           RETURNING id, queue, kind, args, state, priority, run_at, attempt, max_attempts, lease_token,
                     leased_until, attempted_at, errors, user_id, created_at, updated_at, finished_at,
                     timeout_ms, snoozes, progress_percent, progress_message, result"#
    );
    let token = keel_kernel::id::new_id();
    let mut values: Vec<sea_orm::Value> = vec![
        token.into(),
        leased_until.into(),
        now.into(),
        queue.into(),
        i64::from(limit).into(),
    ];
    values.extend(kinds.unwrap_or_default().iter().map(|kind| (*kind).into()));
    let rows = jobs::Entity::find()
        .from_raw_sql(Statement::from_sql_and_values(backend, sql, values))
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

/// `state = '<state>'` with the state as a literal, not a parameter: a
/// planner uses a partial index (`WHERE state = 'available'`, the fetch's;
/// `WHERE state = 'running'`, the rescuer's) only for a literal.
fn in_state(state: JobState) -> sea_orm::sea_query::SimpleExpr {
    Expr::cust(format!("\"jobs\".\"state\" = '{}'", state.as_str()))
}

fn errors_json(errors: &[AttemptError]) -> Result<String> {
    serde_json::to_string(errors).map_err(Error::internal)
}

/// PostgreSQL: removes the dead rows of the job table and their index
/// entries (`vacuum.rs` says why the workers do it), unless another vacuum
/// holds the table. Not in a transaction: VACUUM cannot run in one.
pub async fn vacuum(db: &DatabaseConnection) -> Result<()> {
    db.execute_unprepared("VACUUM (INDEX_CLEANUP ON, SKIP_LOCKED) jobs")
        .await?;
    Ok(())
}

/// PostgreSQL: whether this role may vacuum the job table (it owns it, or
/// is a member of its owner, or a superuser).
pub async fn may_vacuum(db: &DatabaseConnection) -> Result<bool> {
    let row = db
        .query_one_raw(Statement::from_string(
            DatabaseBackend::Postgres,
            "SELECT pg_has_role(current_user, relowner, 'USAGE') AS may FROM pg_class WHERE oid = 'jobs'::regclass",
        ))
        .await?
        .ok_or_else(|| Error::internal("the job table is not in pg_class"))?;
    Ok(row.try_get::<bool>("", "may")?)
}

/// PostgreSQL's estimate of the job table's rows (`pg_class.reltuples`,
/// updated by every vacuum and analyse); no scan.
pub async fn estimated_rows(db: &DatabaseConnection) -> Result<f64> {
    let row = db
        .query_one_raw(Statement::from_string(
            DatabaseBackend::Postgres,
            "SELECT reltuples::float8 AS rows FROM pg_class WHERE oid = 'jobs'::regclass",
        ))
        .await?
        .ok_or_else(|| Error::internal("the job table is not in pg_class"))?;
    Ok(row.try_get::<f64>("", "rows")?.max(0.0))
}

/// Extends the lease; false when the worker no longer holds it. A renewal
/// is no change of the job: `updated_at` stays, and watchers hear nothing.
pub async fn renew(db: &impl ConnectionTrait, lease: &Lease, until: DateTime<Utc>) -> Result<bool> {
    let result = jobs::Entity::update_many()
        .col_expr(jobs::Column::LeasedUntil, Expr::value(until))
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

/// Marks completed, at its own time, every job of `done` whose lease its
/// worker still holds — each fenced exactly as [`complete`] is — and leaves
/// the others unchanged. Which of `done` were completed, in their order.
///
/// PostgreSQL: one statement for the whole batch (the leases as arrays, so
/// it is one prepared statement whatever the batch's size). SQLite: the
/// single updates in one transaction (its one writer pays a commit, not a
/// statement, per job).
pub async fn complete_many(db: &DatabaseConnection, done: &[(Lease, DateTime<Utc>)]) -> Result<Vec<bool>> {
    if done.is_empty() {
        return Ok(Vec::new());
    }
    if db.get_database_backend() != DatabaseBackend::Postgres {
        let tx = db.begin().await?;
        let mut completed = Vec::with_capacity(done.len());
        for (lease, at) in done {
            completed.push(complete(&tx, lease, *at).await?);
        }
        tx.commit().await?;
        return Ok(completed);
    }
    // Array literals, cast by PostgreSQL: uuids, integers and RFC 3339
    // times need no quoting inside them.
    let list = |items: Vec<String>| format!("{{{}}}", items.join(","));
    let ids = list(done.iter().map(|(lease, _)| lease.id.to_string()).collect());
    let attempts = list(done.iter().map(|(lease, _)| lease.attempt.to_string()).collect());
    let tokens = list(done.iter().map(|(lease, _)| lease.token.to_string()).collect());
    let times = list(done.iter().map(|(_, at)| at.to_rfc3339()).collect());
    let rows = db
        .query_all_raw(Statement::from_sql_and_values(
            DatabaseBackend::Postgres,
            r#"UPDATE jobs
               SET state = 'completed', lease_token = NULL, leased_until = NULL,
                   finished_at = done.at, updated_at = done.at
               FROM unnest($1::uuid[], $2::int4[], $3::uuid[], $4::timestamptz[]) AS done(id, attempt, token, at)
               WHERE jobs.id = done.id AND jobs.state = 'running' AND jobs.attempt = done.attempt
                 AND jobs.lease_token = done.token
               RETURNING done.id, done.attempt, done.token"#,
            [ids.into(), attempts.into(), tokens.into(), times.into()],
        ))
        .await?;
    let mut written = std::collections::HashSet::with_capacity(rows.len());
    for row in rows {
        let id: Uuid = row.try_get("", "id")?;
        let attempt: i32 = row.try_get("", "attempt")?;
        let token: Uuid = row.try_get("", "token")?;
        written.insert((id, attempt, token));
    }
    Ok(done
        .iter()
        .map(|(lease, _)| written.contains(&(lease.id, i32::try_from(lease.attempt).unwrap_or(i32::MAX), lease.token)))
        .collect())
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

/// Puts a snoozed job back, available at `run_at`, giving back the
/// attempt its run took (a snooze is not a failure: it uses up no attempt
/// and adds no error) and counting the snooze.
pub async fn snooze(
    db: &impl ConnectionTrait,
    lease: &Lease,
    run_at: DateTime<Utc>,
    now: DateTime<Utc>,
) -> Result<bool> {
    let result = jobs::Entity::update_many()
        .col_expr(jobs::Column::State, Expr::value(JobState::Available.as_str()))
        .col_expr(jobs::Column::Attempt, Expr::col(jobs::Column::Attempt).sub(1))
        .col_expr(jobs::Column::Snoozes, Expr::col(jobs::Column::Snoozes).add(1))
        .col_expr(jobs::Column::LeaseToken, Expr::value(Option::<Uuid>::None))
        .col_expr(jobs::Column::LeasedUntil, Expr::value(Option::<DateTime<Utc>>::None))
        .col_expr(jobs::Column::RunAt, Expr::value(run_at))
        .col_expr(jobs::Column::UpdatedAt, Expr::value(now))
        .filter(fenced(lease))
        .exec(db)
        .await?;
    Ok(result.rows_affected == 1)
}

/// Hands a running job back at a graceful shutdown: available again at
/// once, for any worker, with the attempt it took given back (the job did
/// not fail; its run was cut short). Fenced like every other update.
pub async fn hand_back(db: &impl ConnectionTrait, lease: &Lease, now: DateTime<Utc>) -> Result<bool> {
    let result = jobs::Entity::update_many()
        .col_expr(jobs::Column::State, Expr::value(JobState::Available.as_str()))
        .col_expr(jobs::Column::Attempt, Expr::col(jobs::Column::Attempt).sub(1))
        .col_expr(jobs::Column::LeaseToken, Expr::value(Option::<Uuid>::None))
        .col_expr(jobs::Column::LeasedUntil, Expr::value(Option::<DateTime<Utc>>::None))
        .col_expr(jobs::Column::RunAt, Expr::value(now))
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
        .filter(in_state(JobState::Running))
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

/// The jobs of `ids` that exist, in no order.
pub async fn get_many(db: &impl ConnectionTrait, ids: &[Uuid]) -> Result<Vec<JobRecord>> {
    jobs::Entity::find()
        .filter(jobs::Column::Id.is_in(ids.iter().copied()))
        .all(db)
        .await?
        .into_iter()
        .map(record)
        .collect()
}

/// When the earliest available job of `queue` is due (a delayed job, a
/// retry waiting out its backoff).
pub async fn next_due(db: &impl ConnectionTrait, queue: &str) -> Result<Option<DateTime<Utc>>> {
    Ok(jobs::Entity::find()
        .filter(jobs::Column::Queue.eq(queue))
        .filter(in_state(JobState::Available))
        .order_by_asc(jobs::Column::RunAt)
        .one(db)
        .await?
        .map(|row| row.run_at))
}

/// How many jobs of `kinds` in `queue` are due at `now`, counting at most
/// `limit`: a rate-limited queue takes no more permits than it has jobs to
/// start (of the kinds this process runs; none while it is paused).
pub async fn due(
    db: &impl ConnectionTrait,
    queue: &str,
    kinds: &[&str],
    now: DateTime<Utc>,
    limit: u32,
) -> Result<u32> {
    if kinds.is_empty() || is_paused(db, queue).await? {
        return Ok(0);
    }
    let rows = jobs::Entity::find()
        .select_only()
        .column(jobs::Column::Id)
        .filter(jobs::Column::Queue.eq(queue))
        .filter(in_state(JobState::Available))
        .filter(jobs::Column::Kind.is_in(kinds.iter().copied()))
        .filter(jobs::Column::RunAt.lte(now))
        .limit(u64::from(limit))
        .into_tuple::<Uuid>()
        .all(db)
        .await?;
    Ok(u32::try_from(rows.len()).unwrap_or(u32::MAX))
}

/// [`next_due`] among the jobs of `kinds` (those this process runs).
pub async fn next_due_of_kinds(
    db: &impl ConnectionTrait,
    queue: &str,
    kinds: &[&str],
) -> Result<Option<DateTime<Utc>>> {
    if kinds.is_empty() {
        return Ok(None);
    }
    Ok(jobs::Entity::find()
        .filter(jobs::Column::Queue.eq(queue))
        .filter(in_state(JobState::Available))
        .filter(jobs::Column::Kind.is_in(kinds.iter().copied()))
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
    Ok(of_state(jobs::Entity::find(), state).count(db).await?)
}

/// Only jobs in `state`, through that state's partial index: a finished
/// job always has its finish time, which the finished jobs' index asks for.
fn of_state(select: sea_orm::Select<jobs::Entity>, state: JobState) -> sea_orm::Select<jobs::Entity> {
    let select = select.filter(in_state(state));
    if state.is_finished() {
        select.filter(jobs::Column::FinishedAt.is_not_null())
    } else {
        select
    }
}

/// The last tick each cron schedule enqueued, by schedule name.
pub async fn schedule_ticks(db: &impl ConnectionTrait) -> Result<std::collections::HashMap<String, DateTime<Utc>>> {
    let backend = db.get_database_backend();
    let rows = db
        .query_all_raw(Statement::from_string(
            backend,
            "SELECT name, last_tick FROM job_schedules",
        ))
        .await?;
    let mut ticks = std::collections::HashMap::with_capacity(rows.len());
    for row in rows {
        ticks.insert(row.try_get("", "name")?, row.try_get("", "last_tick")?);
    }
    Ok(ticks)
}

/// Records that the schedule `name` enqueued `tick`; an earlier tick never
/// replaces a later one.
pub async fn record_tick(db: &impl ConnectionTrait, name: &str, tick: DateTime<Utc>, now: DateTime<Utc>) -> Result<()> {
    let backend = db.get_database_backend();
    db.execute_raw(Statement::from_sql_and_values(
        backend,
        "INSERT INTO job_schedules (name, last_tick, created_at, updated_at) VALUES ($1, $2, $3, $3) \
         ON CONFLICT (name) DO UPDATE SET last_tick = excluded.last_tick, updated_at = excluded.updated_at \
         WHERE job_schedules.last_tick < excluded.last_tick",
        [name.into(), tick.into(), now.into()],
    ))
    .await?;
    Ok(())
}

/// Deletes up to `limit` jobs in `state` that finished before `before`,
/// the oldest first (the `(state, finished_at)` index walks them in
/// order). One short statement per batch: no lock is held between
/// batches, and on PostgreSQL rows another pruner holds are skipped, not
/// waited for. How many it deleted.
pub async fn delete_finished(
    db: &impl ConnectionTrait,
    state: JobState,
    before: DateTime<Utc>,
    limit: u64,
) -> Result<u64> {
    let backend = db.get_database_backend();
    let lock = match backend {
        DatabaseBackend::Postgres => "FOR UPDATE SKIP LOCKED",
        _ => "",
    };
    let sql = format!(
        "DELETE FROM jobs WHERE id IN (\
             SELECT id FROM jobs WHERE state = $1 AND finished_at < $2 ORDER BY finished_at LIMIT $3 {lock})"
    );
    let result = db
        .execute_raw(Statement::from_sql_and_values(
            backend,
            sql,
            [
                state.as_str().into(),
                before.into(),
                i64::try_from(limit).unwrap_or(i64::MAX).into(),
            ],
        ))
        .await?;
    Ok(result.rows_affected())
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
        .col_expr(
            jobs::Column::ProgressPercent,
            Expr::value(i16::from(Ord::min(percent, 100))),
        )
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
/// its lease token is cleared, so whatever its worker writes later is
/// refused by the fence. A running job's `leased_until` becomes
/// `stopping_until`, the latest its handler may still run (its worker hears
/// of the cancel at its next renewal, then gives it the cancel grace); the
/// worker clears it when the handler stopped ([`run_stopped`]), and until
/// then the job is not run again ([`run_again`]). False when it was neither
/// waiting nor running (finished meanwhile).
pub async fn cancel(
    db: &impl ConnectionTrait,
    id: Uuid,
    stopping_until: DateTime<Utc>,
    now: DateTime<Utc>,
) -> Result<bool> {
    let stopping = Expr::case(
        jobs::Column::State.eq(JobState::Running.as_str()),
        Expr::value(Some(stopping_until)),
    )
    .finally(Expr::value(Option::<DateTime<Utc>>::None));
    let result = jobs::Entity::update_many()
        .col_expr(jobs::Column::State, Expr::value(JobState::Cancelled.as_str()))
        .col_expr(jobs::Column::LeaseToken, Expr::value(Option::<Uuid>::None))
        .col_expr(jobs::Column::LeasedUntil, stopping.into())
        .col_expr(jobs::Column::FinishedAt, Expr::value(now))
        .col_expr(jobs::Column::UpdatedAt, Expr::value(now))
        .filter(jobs::Column::Id.eq(id))
        .filter(jobs::Column::State.is_in([JobState::Available.as_str(), JobState::Running.as_str()]))
        .exec(db)
        .await?;
    Ok(result.rows_affected == 1)
}

/// A cancelled run's handler has stopped: the job may run again at once.
pub async fn run_stopped(db: &impl ConnectionTrait, id: Uuid, attempt: u32) -> Result<()> {
    jobs::Entity::update_many()
        .col_expr(jobs::Column::LeasedUntil, Expr::value(Option::<DateTime<Utc>>::None))
        .filter(jobs::Column::Id.eq(id))
        .filter(jobs::Column::State.eq(JobState::Cancelled.as_str()))
        .filter(jobs::Column::Attempt.eq(i32::try_from(attempt).unwrap_or(i32::MAX)))
        .filter(jobs::Column::LeaseToken.is_null())
        .exec(db)
        .await?;
    Ok(())
}

/// Makes a failed or cancelled job available again at once, with at least
/// one attempt left; its errors stay. Fenced on the state and attempt it
/// was read with, and on no cancelled run still stopping (see [`cancel`]);
/// false when that changed meanwhile; FAILED_PRECONDITION when it is
/// unique and another job holds its key now.
pub async fn run_again(db: &impl ConnectionTrait, job: &JobRecord, now: DateTime<Utc>) -> Result<bool> {
    let attempt = i32::try_from(job.attempt).unwrap_or(i32::MAX);
    let max_attempts = Ord::max(job.max_attempts, job.attempt.saturating_add(1));
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
        .filter(
            sea_orm::Condition::any()
                .add(jobs::Column::LeasedUntil.is_null())
                .add(jobs::Column::LeasedUntil.lte(now)),
        )
        .exec(db)
        .await
        .map_err(|error| match error.sql_err() {
            // A unique job whose key another job took meanwhile.
            Some(sea_orm::SqlErr::UniqueConstraintViolation(_)) => Error::new(
                keel_kernel::Code::FailedPrecondition,
                "another job holds this job's unique key",
            ),
            _ => error.into(),
        })?;
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
        select = of_state(select, state);
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
    // One state at a time, each through its partial index: available jobs
    // through the fetch index, running ones the rescuer's, failed ones the
    // finished jobs'.
    for state in [JobState::Available, JobState::Running, JobState::Failed] {
        let by_queue: Vec<(String, i64)> = of_state(jobs::Entity::find(), state)
            .select_only()
            .column(jobs::Column::Queue)
            .column_as(jobs::Column::Id.count(), "n")
            .group_by(jobs::Column::Queue)
            .into_tuple()
            .all(db)
            .await?;
        for (queue, n) in by_queue {
            let stats = stats_of(&mut queues, &queue);
            let counted = match state {
                JobState::Available => &mut stats.depth,
                JobState::Running => &mut stats.running,
                _ => &mut stats.failed,
            };
            *counted = count(n);
        }
    }
    let due: Vec<(String, i64)> = jobs::Entity::find()
        .select_only()
        .column(jobs::Column::Queue)
        .column_as(jobs::Column::Id.count(), "n")
        .filter(in_state(JobState::Available))
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
            .filter(in_state(JobState::Available))
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
