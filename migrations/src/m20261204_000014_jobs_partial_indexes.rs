//! Jobs: partial indexes for the hot path. A job's row is updated at every
//! step (fetched, completed), and PostgreSQL writes an entry into each of
//! the table's indexes for every such update (a state change is never a
//! HOT update); a partial index gets one only while its predicate holds. So
//! the fetch index holds the available jobs alone, the rescuer's index the
//! running ones, the pruner's the finished ones, and the owner index the
//! jobs that have an owner: each job costs fewer index writes (12 over its
//! enqueue, fetch and completion when it has no owner, from 21), and a table full of finished
//! jobs leaves the fetch index as small as the queue.
//!
//! The predicates are literals, and the queries that use these indexes say
//! them as literals too (`keel_jobs::store`): a planner matches a partial
//! index to `state = 'available'`, never to `state = $1`.

use sea_orm_migration::prelude::*;

#[derive(DeriveMigrationName)]
pub struct Migration;

/// (old name, old definition, new name, new definition), both backends.
const INDEXES: [(&str, &str, &str, &str); 4] = [
    (
        "jobs_fetch",
        "ON jobs (queue, state, priority, run_at, id)",
        "jobs_fetch_available",
        "ON jobs (queue, priority, run_at, id) WHERE state = 'available'",
    ),
    (
        "jobs_state_leased_until",
        "ON jobs (state, leased_until)",
        "jobs_running_leased_until",
        "ON jobs (leased_until) WHERE state = 'running'",
    ),
    (
        "jobs_state_finished_at",
        "ON jobs (state, finished_at)",
        "jobs_finished_state_finished_at",
        "ON jobs (state, finished_at) WHERE finished_at IS NOT NULL",
    ),
    (
        "jobs_user_id",
        "ON jobs (user_id, id)",
        "jobs_owned_user_id",
        "ON jobs (user_id, id) WHERE user_id IS NOT NULL",
    ),
];

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        for (old, _, new, definition) in INDEXES {
            replace(manager, old, new, definition).await?;
        }
        Ok(())
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        for (old, definition, new, _) in INDEXES {
            replace(manager, new, old, definition).await?;
        }
        Ok(())
    }
}

/// Creates index `name` with `definition`, then drops `replaced`.
async fn replace(manager: &SchemaManager<'_>, replaced: &str, name: &str, definition: &str) -> Result<(), DbErr> {
    let db = manager.get_connection();
    db.execute_unprepared(&format!("CREATE INDEX {name} {definition}"))
        .await?;
    db.execute_unprepared(&format!("DROP INDEX {replaced}")).await?;
    Ok(())
}
