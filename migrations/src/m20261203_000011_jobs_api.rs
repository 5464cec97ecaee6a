//! Jobs' admin API: what a handler reports while it runs (progress percent
//! and message) and its result (JSON text), the pause of a queue
//! (`job_queues`, one row per queue ever paused, read by every process's
//! fetch), and the indexes of the admin list (by queue, by kind, newest
//! first) and of the statistics (completed in the last minute).

use sea_orm_migration::prelude::*;

#[derive(DeriveMigrationName)]
pub struct Migration;

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        // One column per ALTER: SQLite adds one at a time.
        for column in [
            ColumnDef::new(Jobs::ProgressPercent).small_integer().to_owned(),
            ColumnDef::new(Jobs::ProgressMessage).text().to_owned(),
            ColumnDef::new(Jobs::Result).text().to_owned(),
        ] {
            let mut column = column;
            manager
                .alter_table(Table::alter().table(Jobs::Table).add_column(&mut column).to_owned())
                .await?;
        }
        manager
            .create_table(
                Table::create()
                    .table(JobQueues::Table)
                    .col(crate::byte_ordered(
                        manager,
                        ColumnDef::new(JobQueues::Queue)
                            .string_len(128)
                            .not_null()
                            .primary_key()
                            .to_owned(),
                    ))
                    // Set while the queue is paused.
                    .col(ColumnDef::new(JobQueues::PausedAt).timestamp_with_time_zone())
                    .col(
                        ColumnDef::new(JobQueues::UpdatedAt)
                            .timestamp_with_time_zone()
                            .not_null(),
                    )
                    .to_owned(),
            )
            .await?;
        for (name, columns) in [
            ("jobs_queue_id", [Jobs::Queue, Jobs::Id]),
            ("jobs_kind_id", [Jobs::Kind, Jobs::Id]),
            ("jobs_state_finished_at", [Jobs::State, Jobs::FinishedAt]),
        ] {
            let mut index = Index::create();
            index.name(name).table(Jobs::Table);
            for column in columns {
                index.col(column);
            }
            manager.create_index(index.to_owned()).await?;
        }
        Ok(())
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        for name in ["jobs_queue_id", "jobs_kind_id", "jobs_state_finished_at"] {
            manager
                .drop_index(Index::drop().name(name).table(Jobs::Table).to_owned())
                .await?;
        }
        manager
            .drop_table(Table::drop().table(JobQueues::Table).to_owned())
            .await?;
        for column in [Jobs::ProgressPercent, Jobs::ProgressMessage, Jobs::Result] {
            manager
                .alter_table(Table::alter().table(Jobs::Table).drop_column(column).to_owned())
                .await?;
        }
        Ok(())
    }
}

#[derive(DeriveIden, Clone, Copy)]
enum Jobs {
    Table,
    Id,
    Queue,
    Kind,
    State,
    FinishedAt,
    ProgressPercent,
    ProgressMessage,
    Result,
}

#[derive(DeriveIden)]
enum JobQueues {
    Table,
    Queue,
    PausedAt,
    UpdatedAt,
}
