//! Jobs: scheduling.
//!
//! - Unique jobs: `unique_key` (a hash of kind, key and period) and
//!   `unique_states` (the states in which the job counts, as
//!   `,available,running,`), with a partial unique index over the jobs that
//!   count: the database, not a check before the insert, keeps one job per
//!   key. The enqueue's `ON CONFLICT` names the same predicate, textually
//!   (SQLite matches a partial index by its expression).
//! - Pruning: finished jobs by state and finish time.
//! - Cron schedules: the last tick each schedule enqueued, so a process that
//!   was down catches up once, not once per missed tick.

use sea_orm_migration::prelude::*;
use sea_orm_migration::sea_orm::DatabaseBackend;

#[derive(DeriveMigrationName)]
pub struct Migration;

/// Kept equal to `keel_jobs::store`'s conflict target, per backend.
const UNIQUE_PREDICATE_POSTGRES: &str = "unique_key IS NOT NULL AND strpos(unique_states, ',' || state || ',') > 0";
const UNIQUE_PREDICATE_SQLITE: &str = "unique_key IS NOT NULL AND instr(unique_states, ',' || state || ',') > 0";

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        // One column per statement: SQLite alters one at a time.
        manager
            .alter_table(
                Table::alter()
                    .table(Jobs::Table)
                    .add_column(crate::byte_ordered(
                        manager,
                        ColumnDef::new(Jobs::UniqueKey).string_len(64).null().to_owned(),
                    ))
                    .to_owned(),
            )
            .await?;
        manager
            .alter_table(
                Table::alter()
                    .table(Jobs::Table)
                    .add_column(crate::byte_ordered(
                        manager,
                        ColumnDef::new(Jobs::UniqueStates).string_len(64).null().to_owned(),
                    ))
                    .to_owned(),
            )
            .await?;
        let predicate = match manager.get_database_backend() {
            DatabaseBackend::Postgres => UNIQUE_PREDICATE_POSTGRES,
            _ => UNIQUE_PREDICATE_SQLITE,
        };
        manager
            .get_connection()
            .execute_unprepared(&format!(
                "CREATE UNIQUE INDEX jobs_unique ON jobs (unique_key) WHERE {predicate}"
            ))
            .await?;
        // Pruning walks completed, cancelled and failed jobs oldest first on
        // `jobs_state_finished_at`, which `m20261203_000011_jobs_api` made.
        manager
            .create_table(
                Table::create()
                    .table(JobSchedules::Table)
                    .col(crate::byte_ordered(
                        manager,
                        ColumnDef::new(JobSchedules::Name)
                            .string_len(128)
                            .not_null()
                            .primary_key()
                            .to_owned(),
                    ))
                    .col(
                        ColumnDef::new(JobSchedules::LastTick)
                            .timestamp_with_time_zone()
                            .not_null(),
                    )
                    // Schedules are the deployment's; kept for the rule that
                    // every table has an owner column.
                    .col(ColumnDef::new(JobSchedules::UserId).uuid())
                    .col(
                        ColumnDef::new(JobSchedules::CreatedAt)
                            .timestamp_with_time_zone()
                            .not_null(),
                    )
                    .col(
                        ColumnDef::new(JobSchedules::UpdatedAt)
                            .timestamp_with_time_zone()
                            .not_null(),
                    )
                    .to_owned(),
            )
            .await
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .drop_table(Table::drop().table(JobSchedules::Table).to_owned())
            .await?;
        manager
            .drop_index(Index::drop().name("jobs_unique").table(Jobs::Table).to_owned())
            .await?;
        for column in [Jobs::UniqueStates, Jobs::UniqueKey] {
            manager
                .alter_table(Table::alter().table(Jobs::Table).drop_column(column).to_owned())
                .await?;
        }
        Ok(())
    }
}

#[derive(DeriveIden)]
enum Jobs {
    Table,
    UniqueKey,
    UniqueStates,
}

#[derive(DeriveIden)]
enum JobSchedules {
    Table,
    Name,
    LastTick,
    UserId,
    CreatedAt,
    UpdatedAt,
}
