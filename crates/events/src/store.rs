//! The event tables and the only SQL of the events module: outbox writes,
//! sequence assignment by the relay, reads for replay and audit,
//! checkpoints, dead letters, retention.

use chrono::{DateTime, Utc};
use keel_kernel::{Envelope, PendingEvent, Result};
use sea_orm::sea_query::{Expr, Func, LikeExpr};
use sea_orm::{
    ActiveModelTrait, ColumnTrait, Condition, ConnectionTrait, DatabaseBackend, EntityTrait, QueryFilter, QueryOrder,
    QuerySelect, Set, Statement, TransactionTrait,
};
use uuid::Uuid;

use crate::model::{DeadLetter, ListedDeadLetter, StreamTicket};

mod events {
    use sea_orm::entity::prelude::*;

    #[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
    #[sea_orm(table_name = "events")]
    pub struct Model {
        #[sea_orm(primary_key)]
        pub position: i64,
        pub event_id: Uuid,
        pub sequence: Option<i64>,
        pub event_name: String,
        pub event_version: String,
        pub occurred_at: DateTimeUtc,
        pub user_id: Option<Uuid>,
        pub aggregate_id: String,
        pub payload_type: String,
        pub payload: Vec<u8>,
        pub idempotency_key: Option<String>,
        pub audited: bool,
        pub published_at: Option<DateTimeUtc>,
        pub trace_context: Option<String>,
    }

    #[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
    pub enum Relation {}

    impl ActiveModelBehavior for ActiveModel {}
}

mod checkpoints {
    use sea_orm::entity::prelude::*;

    #[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
    #[sea_orm(table_name = "event_checkpoints")]
    pub struct Model {
        #[sea_orm(primary_key, auto_increment = false)]
        pub handler: String,
        pub user_id: Option<Uuid>,
        pub sequence: i64,
        pub leased_by: Option<String>,
        pub leased_until: Option<DateTimeUtc>,
        pub updated_at: DateTimeUtc,
    }

    #[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
    pub enum Relation {}

    impl ActiveModelBehavior for ActiveModel {}
}

mod dead_letters {
    use sea_orm::entity::prelude::*;

    #[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
    #[sea_orm(table_name = "event_dead_letters")]
    pub struct Model {
        #[sea_orm(primary_key, auto_increment = false)]
        pub id: Uuid,
        pub handler: String,
        pub event_id: Uuid,
        pub sequence: i64,
        pub user_id: Option<Uuid>,
        pub attempts: i32,
        pub last_error: String,
        pub failed_at: DateTimeUtc,
        pub replayed_at: Option<DateTimeUtc>,
    }

    #[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
    pub enum Relation {}

    impl ActiveModelBehavior for ActiveModel {}
}

mod stream_tickets {
    use sea_orm::entity::prelude::*;

    #[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
    #[sea_orm(table_name = "event_stream_tickets")]
    pub struct Model {
        #[sea_orm(primary_key, auto_increment = false)]
        pub id: Uuid,
        pub user_id: Uuid,
        pub session_id: Uuid,
        pub token_hash: String,
        pub first_use_by: DateTimeUtc,
        pub valid_until: DateTimeUtc,
        pub first_used_at: Option<DateTimeUtc>,
        pub live: bool,
        pub version: i32,
        pub created_at: DateTimeUtc,
        pub updated_at: DateTimeUtc,
        pub held_until: Option<DateTimeUtc>,
    }

    #[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
    pub enum Relation {}

    impl ActiveModelBehavior for ActiveModel {}
}

mod retention {
    use sea_orm::entity::prelude::*;

    #[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
    #[sea_orm(table_name = "event_retention")]
    pub struct Model {
        #[sea_orm(primary_key, auto_increment = false)]
        pub id: i32,
        pub user_id: Option<Uuid>,
        pub pruned_through: i64,
    }

    #[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
    pub enum Relation {}

    impl ActiveModelBehavior for ActiveModel {}
}

fn dead_letter(row: dead_letters::Model) -> DeadLetter {
    DeadLetter {
        id: row.id,
        handler: row.handler,
        event_id: row.event_id,
        sequence: row.sequence.max(0) as u64,
        user_id: row.user_id,
        attempts: row.attempts.max(0) as u32,
        last_error: row.last_error,
        failed_at: row.failed_at,
        replayed_at: row.replayed_at,
    }
}

fn envelope(row: events::Model) -> Envelope {
    Envelope {
        event_id: row.event_id,
        name: row.event_name,
        version: row.event_version,
        occurred_at: row.occurred_at,
        sequence: row.sequence.unwrap_or_default().max(0) as u64,
        user_id: row.user_id,
        aggregate_id: row.aggregate_id,
        payload_type: row.payload_type,
        payload: row.payload,
        idempotency_key: row.idempotency_key,
        trace_context: row.trace_context,
    }
}

/// This database's identity: a random id stored in it by the first keel to
/// start (`event_instance`), so that two deployments never share a Redis
/// channel even when their database names and schemas are the same.
/// Concurrent first starts agree: the row is inserted once, then read.
pub async fn instance_id(db: &impl ConnectionTrait) -> Result<Uuid> {
    let backend = db.get_database_backend();
    let insert = match backend {
        DatabaseBackend::Postgres => {
            "INSERT INTO event_instance (id, instance_id) VALUES (1, $1) ON CONFLICT (id) DO NOTHING"
        }
        _ => "INSERT INTO event_instance (id, instance_id) VALUES (1, ?) ON CONFLICT (id) DO NOTHING",
    };
    db.execute_raw(Statement::from_sql_and_values(
        backend,
        insert,
        [keel_kernel::id::new_id().into()],
    ))
    .await?;
    let row = db
        .query_one_raw(Statement::from_string(
            backend,
            "SELECT instance_id FROM event_instance WHERE id = 1",
        ))
        .await?
        .ok_or_else(|| keel_kernel::Error::internal("event_instance has no row"))?;
    Ok(row.try_get_by_index::<Uuid>(0)?)
}

/// Writes a command's events, unnumbered, in its transaction.
pub async fn insert_pending(db: &impl ConnectionTrait, pending: &[PendingEvent]) -> Result<()> {
    let rows = pending.iter().map(|event| events::ActiveModel {
        event_id: Set(event.event_id),
        sequence: Set(None),
        event_name: Set(event.name.to_owned()),
        event_version: Set(event.version.to_owned()),
        occurred_at: Set(event.occurred_at),
        user_id: Set(event.user_id),
        aggregate_id: Set(event.aggregate_id.clone()),
        payload_type: Set(event.payload_type.to_owned()),
        payload: Set(event.payload.clone()),
        idempotency_key: Set(event.idempotency_key.clone()),
        audited: Set(event.audited),
        published_at: Set(None),
        trace_context: Set(event.trace_context.clone()),
        ..Default::default()
    });
    events::Entity::insert_many(rows).exec_without_returning(db).await?;
    Ok(())
}

/// A lock key for the relay's transaction-scoped PostgreSQL advisory lock.
const RELAY_LOCK: i64 = 0x6b65_656c_7265_6c61; // "keelrela"

/// Numbers up to `limit` committed, unnumbered events in insertion order,
/// continuing the sequence without a gap, and returns them. Several relays
/// (several keel processes) may call this at once: a transaction-scoped
/// advisory lock lets one number at a time, so no event gets two numbers and
/// numbers follow commit order of the relays.
///
/// On PostgreSQL with a `notify` channel, the same transaction sends
/// `NOTIFY <channel>, '<last sequence>'`: every process listening hears of
/// the batch when, and only if, it commits. NOTIFY serialises the commits
/// of the transactions that send it; numbering is serialised by the lock
/// already, so here that costs nothing (in each command's transaction it
/// would serialise every write of the database).
pub async fn assign_sequences(
    db: &sea_orm::DatabaseConnection,
    limit: u64,
    now: DateTime<Utc>,
    notify: Option<&str>,
) -> Result<Vec<Envelope>> {
    // SQLite: the write lock up front (BEGIN IMMEDIATE) plays the role of the advisory lock.
    // Both are held until commit, so numbering and publishing follow commit order.
    let tx = db.begin_with_options(keel_kernel::bus::write_transaction()).await?;
    if tx.get_database_backend() == DatabaseBackend::Postgres {
        tx.execute_raw(Statement::from_sql_and_values(
            DatabaseBackend::Postgres,
            "SELECT pg_advisory_xact_lock($1)",
            [RELAY_LOCK.into()],
        ))
        .await?;
    }
    let latest = latest_sequence(&tx).await? as i64;
    // One statement numbers the whole batch: the oldest `limit` unnumbered
    // rows get latest+1, latest+2, ... in insertion order. The lock above
    // makes relays take turns, so `latest` cannot move underneath it.
    let mut numbered = events::Entity::find()
        .from_raw_sql(Statement::from_sql_and_values(
            tx.get_database_backend(),
            r#"WITH pending AS (
                   SELECT position FROM events WHERE sequence IS NULL ORDER BY position LIMIT $1
               ), numbered AS (
                   SELECT position AS numbered_position,
                          $2 + row_number() OVER (ORDER BY position) AS next_sequence
                   FROM pending
               )
               UPDATE events SET sequence = numbered.next_sequence, published_at = $3
               FROM numbered
               WHERE events.position = numbered.numbered_position
               RETURNING position, event_id, sequence, event_name, event_version, occurred_at, user_id,
                         aggregate_id, payload_type, payload, idempotency_key, audited, published_at,
                         trace_context"#,
            [(limit as i64).into(), latest.into(), now.into()],
        ))
        .all(&tx)
        .await?;
    // RETURNING promises no order.
    numbered.sort_by_key(|row| row.sequence);
    if let (Some(channel), Some(last)) = (notify, numbered.last())
        && tx.get_database_backend() == DatabaseBackend::Postgres
    {
        let through = last.sequence.unwrap_or_default().to_string();
        tx.execute_raw(Statement::from_sql_and_values(
            DatabaseBackend::Postgres,
            "SELECT pg_notify($1, $2)",
            [channel.into(), through.into()],
        ))
        .await?;
    }
    tx.commit().await?;
    Ok(numbered.into_iter().map(envelope).collect())
}

/// What waits: committed events not numbered yet, when the oldest of them
/// happened, and dead letters not replayed yet.
pub async fn backlog(db: &impl ConnectionTrait) -> Result<(u64, Option<DateTime<Utc>>, u64)> {
    use sea_orm::PaginatorTrait;
    let unnumbered = events::Entity::find()
        .filter(events::Column::Sequence.is_null())
        .count(db)
        .await?;
    let oldest: Option<DateTime<Utc>> = events::Entity::find()
        .filter(events::Column::Sequence.is_null())
        .order_by_asc(events::Column::Position)
        .select_only()
        .column(events::Column::OccurredAt)
        .into_tuple()
        .one(db)
        .await?;
    let dead = dead_letters::Entity::find()
        .filter(dead_letters::Column::ReplayedAt.is_null())
        .count(db)
        .await?;
    Ok((unnumbered, oldest, dead))
}

/// The newest assigned sequence (0 when none). Pruning keeps its
/// watermark, so numbering continues after the table was emptied.
pub async fn latest_sequence(db: &impl ConnectionTrait) -> Result<u64> {
    let latest: Option<Option<i64>> = events::Entity::find()
        .select_only()
        .column_as(Expr::expr(Func::max(Expr::col(events::Column::Sequence))), "latest")
        .into_tuple()
        .one(db)
        .await?;
    let in_table = latest.flatten().unwrap_or_default().max(0) as u64;
    Ok(in_table.max(pruned_through(db).await?))
}

/// Events numbered after `after`, in order.
pub async fn read_after(db: &impl ConnectionTrait, after: u64, limit: u64) -> Result<Vec<Envelope>> {
    let rows = events::Entity::find()
        .filter(events::Column::Sequence.gt(after as i64))
        .order_by_asc(events::Column::Sequence)
        .limit(limit)
        .all(db)
        .await?;
    Ok(rows.into_iter().map(envelope).collect())
}

/// Events numbered after `after` (and through `through`, when given), in
/// order, filtered in SQL: of `user_id` only when given (the index
/// `ix_events_user_id_sequence`), with a name matching one of `topics` when
/// some are given.
pub async fn read_matching(
    db: &impl ConnectionTrait,
    after: u64,
    through: Option<u64>,
    user_id: Option<Uuid>,
    topics: &[&str],
    limit: u64,
) -> Result<Vec<Envelope>> {
    let mut select = events::Entity::find().filter(events::Column::Sequence.gt(after as i64));
    if let Some(through) = through {
        select = select.filter(events::Column::Sequence.lte(through.min(i64::MAX as u64) as i64));
    }
    if let Some(user_id) = user_id {
        select = select.filter(events::Column::UserId.eq(user_id));
    }
    if let Some(names) = names_condition(topics) {
        select = select.filter(names);
    }
    let rows = select
        .order_by_asc(events::Column::Sequence)
        .limit(limit)
        .all(db)
        .await?;
    Ok(rows.into_iter().map(envelope).collect())
}

/// Event names equal to one of `topics`, or starting with the prefix of a
/// `prefix.*` topic (LIKE wildcards in the prefix escaped); `None` for no topics.
fn names_condition(topics: &[&str]) -> Option<Condition> {
    // Scoped: the trait's `max`/`min` would shadow the integers' elsewhere.
    use sea_orm::sea_query::ExprTrait as _;

    if topics.is_empty() {
        return None;
    }
    let mut condition = Condition::any();
    for topic in topics {
        condition = match topic.strip_suffix('*') {
            Some(prefix) => {
                let escaped = prefix.replace('\\', "\\\\").replace('%', "\\%").replace('_', "\\_");
                condition
                    .add(Expr::col(events::Column::EventName).like(LikeExpr::new(format!("{escaped}%")).escape('\\')))
            }
            None => condition.add(events::Column::EventName.eq(*topic)),
        };
    }
    Some(condition)
}

pub async fn find_by_event_id(db: &impl ConnectionTrait, event_id: Uuid) -> Result<Option<Envelope>> {
    Ok(events::Entity::find()
        .filter(events::Column::EventId.eq(event_id))
        .one(db)
        .await?
        .map(envelope))
}

/// Everything up to this sequence was pruned (0: nothing yet).
pub async fn pruned_through(db: &impl ConnectionTrait) -> Result<u64> {
    Ok(retention::Entity::find_by_id(1)
        .one(db)
        .await?
        .map_or(0, |row| row.pruned_through.max(0) as u64))
}

/// Deletes numbered events that occurred before `before` and that every
/// handler has passed, and moves the watermark. Returns how many went.
pub async fn prune(db: &sea_orm::DatabaseConnection, before: DateTime<Utc>, handlers_through: u64) -> Result<u64> {
    let tx = db.begin_with_options(keel_kernel::bus::write_transaction()).await?;
    let newest_old: Option<Option<i64>> = events::Entity::find()
        .select_only()
        .column_as(Expr::expr(Func::max(Expr::col(events::Column::Sequence))), "newest")
        .filter(events::Column::OccurredAt.lt(before))
        .filter(events::Column::Sequence.is_not_null())
        .filter(events::Column::Sequence.lte(handlers_through as i64))
        .into_tuple()
        .one(&tx)
        .await?;
    let Some(through) = newest_old.flatten() else {
        tx.commit().await?;
        return Ok(0);
    };
    let deleted = events::Entity::delete_many()
        .filter(events::Column::Sequence.lte(through))
        .exec(&tx)
        .await?
        .rows_affected;
    let existing = retention::Entity::find_by_id(1).one(&tx).await?;
    match existing {
        Some(_) => {
            retention::Entity::update_many()
                .col_expr(retention::Column::PrunedThrough, Expr::value(through))
                .filter(retention::Column::Id.eq(1))
                .exec(&tx)
                .await?;
        }
        None => {
            retention::ActiveModel {
                id: Set(1),
                user_id: Set(None),
                pruned_through: Set(through),
            }
            .insert(&tx)
            .await?;
        }
    }
    tx.commit().await?;
    Ok(deleted)
}

/// One page of the audit log: audited events, of the given names (exact or
/// `prefix.*`) when some are given, newest first.
pub async fn list_events(
    db: &impl ConnectionTrait,
    names: &[String],
    user_id: Option<Uuid>,
    since: Option<DateTime<Utc>>,
    until: Option<DateTime<Utc>>,
    before_sequence: Option<u64>,
    limit: u64,
) -> Result<Vec<Envelope>> {
    let mut select = events::Entity::find()
        .filter(events::Column::Sequence.is_not_null())
        .filter(events::Column::Audited.eq(true));
    let names: Vec<&str> = names.iter().map(String::as_str).collect();
    if let Some(names) = names_condition(&names) {
        select = select.filter(names);
    }
    if let Some(user_id) = user_id {
        select = select.filter(events::Column::UserId.eq(user_id));
    }
    if let Some(since) = since {
        select = select.filter(events::Column::OccurredAt.gte(since));
    }
    if let Some(until) = until {
        select = select.filter(events::Column::OccurredAt.lt(until));
    }
    if let Some(before) = before_sequence {
        select = select.filter(events::Column::Sequence.lt(before as i64));
    }
    let rows = select
        .order_by_desc(events::Column::Sequence)
        .limit(limit)
        .all(db)
        .await?;
    Ok(rows.into_iter().map(envelope).collect())
}

pub async fn checkpoint(db: &impl ConnectionTrait, handler: &str) -> Result<Option<u64>> {
    Ok(checkpoints::Entity::find_by_id(handler.to_owned())
        .one(db)
        .await?
        .map(|row| row.sequence.max(0) as u64))
}

/// The lowest checkpoint of the given handlers: what retention may prune through.
/// A handler that never ran counts as 0.
pub async fn lowest_checkpoint(db: &impl ConnectionTrait, handlers: &[&str]) -> Result<u64> {
    let sequences: Vec<i64> = checkpoints::Entity::find()
        .select_only()
        .column(checkpoints::Column::Sequence)
        .filter(checkpoints::Column::Handler.is_in(handlers.iter().copied()))
        .into_tuple()
        .all(db)
        .await?;
    if sequences.len() < handlers.len() {
        return Ok(0);
    }
    Ok(sequences
        .into_iter()
        .min()
        .map_or(u64::MAX, |lowest| lowest.max(0) as u64))
}

pub async fn insert_dead_letter(db: &impl ConnectionTrait, letter: DeadLetter) -> Result<()> {
    // Attempts are few and sequences i64 by construction: the casts hold.
    let attempts = i32::try_from(letter.attempts).unwrap_or(i32::MAX);
    let existing = dead_letters::Entity::find()
        .filter(dead_letters::Column::Handler.eq(letter.handler.as_str()))
        .filter(dead_letters::Column::EventId.eq(letter.event_id))
        .one(db)
        .await?;
    if existing.is_some() {
        // Redelivered after a crash: the letter is already there.
        return Ok(());
    }
    dead_letters::ActiveModel {
        id: Set(letter.id),
        handler: Set(letter.handler),
        event_id: Set(letter.event_id),
        sequence: Set(letter.sequence as i64),
        user_id: Set(letter.user_id),
        attempts: Set(attempts),
        last_error: Set(letter.last_error),
        failed_at: Set(letter.failed_at),
        replayed_at: Set(letter.replayed_at),
    }
    .insert(db)
    .await?;
    Ok(())
}

pub async fn find_dead_letter(db: &impl ConnectionTrait, id: Uuid) -> Result<Option<DeadLetter>> {
    Ok(dead_letters::Entity::find_by_id(id).one(db).await?.map(dead_letter))
}

/// How an admin's replay of a dead letter ended.
pub enum ReplayOutcome<'a> {
    Succeeded { at: DateTime<Utc> },
    Failed { error: &'a str },
}

/// Records a replay: its attempt, and either when it succeeded (the letter
/// is done) or its new error (the letter stays).
pub async fn record_replay(
    db: &impl ConnectionTrait,
    id: Uuid,
    attempts: u32,
    outcome: ReplayOutcome<'_>,
) -> Result<()> {
    let update = dead_letters::Entity::update_many().col_expr(
        dead_letters::Column::Attempts,
        Expr::value(i32::try_from(attempts).unwrap_or(i32::MAX)),
    );
    let update = match outcome {
        ReplayOutcome::Succeeded { at } => update.col_expr(dead_letters::Column::ReplayedAt, Expr::value(Some(at))),
        ReplayOutcome::Failed { error } => {
            update.col_expr(dead_letters::Column::LastError, Expr::value(error.to_owned()))
        }
    };
    update.filter(dead_letters::Column::Id.eq(id)).exec(db).await?;
    Ok(())
}

/// One page of dead letters, newest first, before `(failed_at, id)`, each
/// with its event while retained: two queries a page (the letters, then
/// their events by `IN`), whatever its size.
pub async fn list_dead_letters(
    db: &impl ConnectionTrait,
    include_replayed: bool,
    before: Option<(DateTime<Utc>, Uuid)>,
    limit: u64,
) -> Result<Vec<ListedDeadLetter>> {
    let mut select = dead_letters::Entity::find();
    if !include_replayed {
        select = select.filter(dead_letters::Column::ReplayedAt.is_null());
    }
    if let Some((failed_at, id)) = before {
        select = select.filter(
            Condition::any().add(dead_letters::Column::FailedAt.lt(failed_at)).add(
                Condition::all()
                    .add(dead_letters::Column::FailedAt.eq(failed_at))
                    .add(dead_letters::Column::Id.lt(id)),
            ),
        );
    }
    let letters = select
        .order_by_desc(dead_letters::Column::FailedAt)
        .order_by_desc(dead_letters::Column::Id)
        .limit(limit)
        .all(db)
        .await?;
    if letters.is_empty() {
        return Ok(Vec::new());
    }
    let mut events: std::collections::HashMap<Uuid, Envelope> = events::Entity::find()
        .filter(events::Column::EventId.is_in(letters.iter().map(|letter| letter.event_id)))
        .all(db)
        .await?
        .into_iter()
        .map(|row| (row.event_id, envelope(row)))
        .collect();
    Ok(letters
        .into_iter()
        .map(|row| {
            let event = events.remove(&row.event_id);
            ListedDeadLetter {
                letter: dead_letter(row),
                event,
            }
        })
        .collect())
}

/// What [`lease`] found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Lease {
    /// Taken, renewed or confirmed: this owner holds it.
    Taken,
    /// Another process holds it, until about then (it may renew it).
    HeldUntil(DateTime<Utc>),
}

/// Takes, renews or confirms the lease of `handler` for `owner` until
/// `until`, unless another process holds it.
pub async fn lease(
    db: &impl ConnectionTrait,
    handler: &str,
    owner: &str,
    now: DateTime<Utc>,
    until: DateTime<Utc>,
) -> Result<Lease> {
    let existing = checkpoints::Entity::find_by_id(handler.to_owned()).one(db).await?;
    if existing.is_none() {
        // First run anywhere: start from the beginning of the log. A
        // concurrent first insert loses on the primary key and is harmless.
        let _ = checkpoints::ActiveModel {
            handler: Set(handler.to_owned()),
            user_id: Set(None),
            sequence: Set(0),
            leased_by: Set(None),
            leased_until: Set(None),
            updated_at: Set(now),
        }
        .insert(db)
        .await;
    }
    let taken = checkpoints::Entity::update_many()
        .col_expr(checkpoints::Column::LeasedBy, Expr::value(Some(owner.to_owned())))
        .col_expr(checkpoints::Column::LeasedUntil, Expr::value(Some(until)))
        .filter(checkpoints::Column::Handler.eq(handler))
        .filter(
            Condition::any()
                .add(checkpoints::Column::LeasedUntil.is_null())
                .add(checkpoints::Column::LeasedUntil.lt(now))
                .add(checkpoints::Column::LeasedBy.eq(owner)),
        )
        .exec(db)
        .await?;
    if taken.rows_affected == 1 {
        return Ok(Lease::Taken);
    }
    // Read before the update, so perhaps renewed since: the caller looks
    // again then, and finds the later time.
    let held_until = existing.and_then(|row| row.leased_until).unwrap_or(now);
    Ok(Lease::HeldUntil(held_until))
}

/// Moves the checkpoint forward and renews the lease until `until`, if
/// `owner` still holds it (fencing: a runner that lost its lease cannot move
/// it back). One statement.
pub async fn advance_checkpoint(
    db: &impl ConnectionTrait,
    handler: &str,
    owner: &str,
    sequence: u64,
    now: DateTime<Utc>,
    until: DateTime<Utc>,
) -> Result<bool> {
    let updated = checkpoints::Entity::update_many()
        .col_expr(checkpoints::Column::Sequence, Expr::value(sequence as i64))
        .col_expr(checkpoints::Column::UpdatedAt, Expr::value(now))
        .col_expr(checkpoints::Column::LeasedUntil, Expr::value(Some(until)))
        .filter(checkpoints::Column::Handler.eq(handler))
        .filter(checkpoints::Column::LeasedBy.eq(owner))
        .filter(checkpoints::Column::Sequence.lt(sequence as i64))
        .exec(db)
        .await?;
    Ok(updated.rows_affected == 1)
}

// --- stream tickets ------------------------------------------------------------

fn stream_ticket(row: stream_tickets::Model) -> StreamTicket {
    StreamTicket {
        id: row.id,
        user_id: row.user_id,
        session_id: row.session_id,
        first_use_by: row.first_use_by,
        valid_until: row.valid_until,
        first_used_at: row.first_used_at,
        live: row.live,
        held_until: row.held_until,
        version: row.version,
        created_at: row.created_at,
    }
}

/// Stores a new ticket under its hash, and drops the user's tickets that
/// can no longer be used (so the table holds live tickets only).
pub async fn insert_stream_ticket(db: &impl ConnectionTrait, ticket: &StreamTicket, token_hash: &str) -> Result<()> {
    stream_tickets::Entity::delete_many()
        .filter(stream_tickets::Column::UserId.eq(ticket.user_id))
        .filter(stream_tickets::Column::ValidUntil.lt(ticket.created_at))
        .exec(db)
        .await?;
    stream_tickets::ActiveModel {
        id: Set(ticket.id),
        user_id: Set(ticket.user_id),
        session_id: Set(ticket.session_id),
        token_hash: Set(token_hash.to_owned()),
        first_use_by: Set(ticket.first_use_by),
        valid_until: Set(ticket.valid_until),
        first_used_at: Set(ticket.first_used_at),
        live: Set(ticket.live),
        held_until: Set(ticket.held_until),
        version: Set(ticket.version),
        created_at: Set(ticket.created_at),
        updated_at: Set(ticket.created_at),
    }
    .insert(db)
    .await?;
    Ok(())
}

pub async fn find_stream_ticket(db: &impl ConnectionTrait, token_hash: &str) -> Result<Option<StreamTicket>> {
    Ok(stream_tickets::Entity::find()
        .filter(stream_tickets::Column::TokenHash.eq(token_hash))
        .one(db)
        .await?
        .map(stream_ticket))
}

/// Marks `ticket` as held by a stream until `held_until`, if it is still
/// as it was read (same version) and no stream holds it (none did, or the
/// holder's lease lapsed): of two concurrent redemptions one wins.
pub async fn claim_stream_ticket(
    db: &impl ConnectionTrait,
    ticket: &StreamTicket,
    now: DateTime<Utc>,
    held_until: DateTime<Utc>,
) -> Result<bool> {
    let claimed = stream_tickets::Entity::update_many()
        .col_expr(stream_tickets::Column::Live, Expr::value(true))
        .col_expr(stream_tickets::Column::HeldUntil, Expr::value(Some(held_until)))
        .col_expr(
            stream_tickets::Column::FirstUsedAt,
            Expr::value(Some(ticket.first_used_at.unwrap_or(now))),
        )
        .col_expr(stream_tickets::Column::Version, Expr::value(ticket.version + 1))
        .col_expr(stream_tickets::Column::UpdatedAt, Expr::value(now))
        .filter(stream_tickets::Column::Id.eq(ticket.id))
        .filter(stream_tickets::Column::Version.eq(ticket.version))
        .filter(
            Condition::any()
                .add(stream_tickets::Column::Live.eq(false))
                .add(stream_tickets::Column::HeldUntil.is_null())
                .add(stream_tickets::Column::HeldUntil.lte(now)),
        )
        .exec(db)
        .await?;
    Ok(claimed.rows_affected == 1)
}

/// Extends the hold of the stream that claimed the ticket at `version`;
/// false when that hold is gone (it lapsed and another stream took over).
pub async fn renew_stream_ticket(
    db: &impl ConnectionTrait,
    id: Uuid,
    version: i32,
    held_until: DateTime<Utc>,
) -> Result<bool> {
    let renewed = stream_tickets::Entity::update_many()
        .col_expr(stream_tickets::Column::HeldUntil, Expr::value(Some(held_until)))
        .filter(stream_tickets::Column::Id.eq(id))
        .filter(stream_tickets::Column::Version.eq(version))
        .filter(stream_tickets::Column::Live.eq(true))
        .exec(db)
        .await?;
    Ok(renewed.rows_affected == 1)
}

/// Deletes tickets past their lifetime (the events retention); returns how many.
pub async fn prune_stream_tickets(db: &impl ConnectionTrait, now: DateTime<Utc>) -> Result<u64> {
    Ok(stream_tickets::Entity::delete_many()
        .filter(stream_tickets::Column::ValidUntil.lt(now))
        .exec(db)
        .await?
        .rows_affected)
}

/// The ticket's stream (the one that claimed it at `version`) ended: a
/// reconnect may claim it again. A hold taken over since is left alone.
pub async fn release_stream_ticket(
    db: &impl ConnectionTrait,
    id: Uuid,
    version: i32,
    now: DateTime<Utc>,
) -> Result<()> {
    stream_tickets::Entity::update_many()
        .col_expr(stream_tickets::Column::Live, Expr::value(false))
        .col_expr(
            stream_tickets::Column::HeldUntil,
            Expr::value(Option::<DateTime<Utc>>::None),
        )
        .col_expr(
            stream_tickets::Column::Version,
            sea_orm::sea_query::ExprTrait::add(Expr::col(stream_tickets::Column::Version), 1),
        )
        .col_expr(stream_tickets::Column::UpdatedAt, Expr::value(now))
        .filter(stream_tickets::Column::Id.eq(id))
        .filter(stream_tickets::Column::Version.eq(version))
        .exec(db)
        .await?;
    Ok(())
}
