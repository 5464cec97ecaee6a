//! Events: a stream ticket's hold is a lease. `held_until` is renewed by
//! the stream that holds the ticket; once it has passed (the holding
//! process died), a reconnect may take the ticket over.

use sea_orm_migration::prelude::*;

#[derive(DeriveMigrationName)]
pub struct Migration;

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .alter_table(
                Table::alter()
                    .table(EventStreamTickets::Table)
                    .add_column(ColumnDef::new(EventStreamTickets::HeldUntil).timestamp_with_time_zone())
                    .to_owned(),
            )
            .await?;
        // Retention deletes tickets past their lifetime.
        manager
            .create_index(
                Index::create()
                    .name("ix_event_stream_tickets_valid_until")
                    .table(EventStreamTickets::Table)
                    .col(EventStreamTickets::ValidUntil)
                    .to_owned(),
            )
            .await
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .drop_index(
                Index::drop()
                    .name("ix_event_stream_tickets_valid_until")
                    .table(EventStreamTickets::Table)
                    .to_owned(),
            )
            .await?;
        manager
            .alter_table(
                Table::alter()
                    .table(EventStreamTickets::Table)
                    .drop_column(EventStreamTickets::HeldUntil)
                    .to_owned(),
            )
            .await
    }
}

#[derive(DeriveIden)]
enum EventStreamTickets {
    Table,
    ValidUntil,
    HeldUntil,
}
