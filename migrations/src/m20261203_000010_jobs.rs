//! Jobs: durable background work. A row is written in the transaction of
//! the command that enqueues it; workers lease it (`lease_token`,
//! `leased_until`, `attempt`) and every state change after that is fenced on
//! state, attempt and lease token. `args` and `errors` hold JSON (an object;
//! a list of every attempt's error).

use sea_orm_migration::prelude::*;

#[derive(DeriveMigrationName)]
pub struct Migration;

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .create_table(
                Table::create()
                    .table(Jobs::Table)
                    .col(ColumnDef::new(Jobs::Id).uuid().not_null().primary_key())
                    .col(crate::byte_ordered(
                        manager,
                        ColumnDef::new(Jobs::Queue).string_len(128).not_null().to_owned(),
                    ))
                    .col(crate::byte_ordered(
                        manager,
                        ColumnDef::new(Jobs::Kind).string_len(128).not_null().to_owned(),
                    ))
                    .col(ColumnDef::new(Jobs::Args).text().not_null())
                    // available | running | completed | failed | cancelled
                    .col(crate::byte_ordered(
                        manager,
                        ColumnDef::new(Jobs::State).string_len(16).not_null().to_owned(),
                    ))
                    .col(ColumnDef::new(Jobs::Priority).small_integer().not_null().default(0))
                    .col(ColumnDef::new(Jobs::RunAt).timestamp_with_time_zone().not_null())
                    .col(ColumnDef::new(Jobs::Attempt).integer().not_null().default(0))
                    .col(ColumnDef::new(Jobs::MaxAttempts).integer().not_null())
                    .col(ColumnDef::new(Jobs::LeaseToken).uuid())
                    .col(ColumnDef::new(Jobs::LeasedUntil).timestamp_with_time_zone())
                    .col(ColumnDef::new(Jobs::AttemptedAt).timestamp_with_time_zone())
                    .col(ColumnDef::new(Jobs::Errors).text().not_null())
                    .col(ColumnDef::new(Jobs::UserId).uuid())
                    .col(ColumnDef::new(Jobs::CreatedAt).timestamp_with_time_zone().not_null())
                    .col(ColumnDef::new(Jobs::UpdatedAt).timestamp_with_time_zone().not_null())
                    .col(ColumnDef::new(Jobs::FinishedAt).timestamp_with_time_zone())
                    .to_owned(),
            )
            .await?;
        // The fetch: a queue's available jobs, smallest priority first, then
        // the earliest due.
        manager
            .create_index(
                Index::create()
                    .name("jobs_fetch")
                    .table(Jobs::Table)
                    .col(Jobs::Queue)
                    .col(Jobs::State)
                    .col(Jobs::Priority)
                    .col(Jobs::RunAt)
                    .col(Jobs::Id)
                    .to_owned(),
            )
            .await?;
        // The rescuer: running jobs whose lease ran out.
        manager
            .create_index(
                Index::create()
                    .name("jobs_state_leased_until")
                    .table(Jobs::Table)
                    .col(Jobs::State)
                    .col(Jobs::LeasedUntil)
                    .to_owned(),
            )
            .await?;
        // A user's jobs, newest first (ids are time-ordered).
        manager
            .create_index(
                Index::create()
                    .name("jobs_user_id")
                    .table(Jobs::Table)
                    .col(Jobs::UserId)
                    .col(Jobs::Id)
                    .to_owned(),
            )
            .await
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager.drop_table(Table::drop().table(Jobs::Table).to_owned()).await
    }
}

#[derive(DeriveIden)]
enum Jobs {
    Table,
    Id,
    Queue,
    Kind,
    Args,
    State,
    Priority,
    RunAt,
    Attempt,
    MaxAttempts,
    LeaseToken,
    LeasedUntil,
    AttemptedAt,
    Errors,
    UserId,
    CreatedAt,
    UpdatedAt,
    FinishedAt,
}
