//! Events: stream tickets, what a browser's `EventSource` authenticates the
//! event stream with (it cannot send an Authorization header). Only the
//! ticket's SHA-256 is stored; `live` marks the one stream a ticket may
//! have open at a time, `version` guards its concurrent redemption.

use sea_orm_migration::prelude::*;

#[derive(DeriveMigrationName)]
pub struct Migration;

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .create_table(
                Table::create()
                    .table(EventStreamTickets::Table)
                    .col(ColumnDef::new(EventStreamTickets::Id).uuid().not_null().primary_key())
                    .col(ColumnDef::new(EventStreamTickets::UserId).uuid().not_null())
                    .col(ColumnDef::new(EventStreamTickets::SessionId).uuid().not_null())
                    .col(ColumnDef::new(EventStreamTickets::TokenHash).string_len(64).not_null())
                    .col(
                        ColumnDef::new(EventStreamTickets::FirstUseBy)
                            .timestamp_with_time_zone()
                            .not_null(),
                    )
                    .col(
                        ColumnDef::new(EventStreamTickets::ValidUntil)
                            .timestamp_with_time_zone()
                            .not_null(),
                    )
                    .col(ColumnDef::new(EventStreamTickets::FirstUsedAt).timestamp_with_time_zone())
                    .col(
                        ColumnDef::new(EventStreamTickets::Live)
                            .boolean()
                            .not_null()
                            .default(false),
                    )
                    .col(
                        ColumnDef::new(EventStreamTickets::Version)
                            .integer()
                            .not_null()
                            .default(0),
                    )
                    .col(
                        ColumnDef::new(EventStreamTickets::CreatedAt)
                            .timestamp_with_time_zone()
                            .not_null(),
                    )
                    .col(
                        ColumnDef::new(EventStreamTickets::UpdatedAt)
                            .timestamp_with_time_zone()
                            .not_null(),
                    )
                    .to_owned(),
            )
            .await?;
        // Redemption looks a ticket up by its hash.
        manager
            .create_index(
                Index::create()
                    .name("event_stream_tickets_token_hash")
                    .table(EventStreamTickets::Table)
                    .col(EventStreamTickets::TokenHash)
                    .unique()
                    .to_owned(),
            )
            .await?;
        // Creating a ticket prunes the user's expired ones.
        manager
            .create_index(
                Index::create()
                    .name("event_stream_tickets_user_valid_until")
                    .table(EventStreamTickets::Table)
                    .col(EventStreamTickets::UserId)
                    .col(EventStreamTickets::ValidUntil)
                    .to_owned(),
            )
            .await
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .drop_table(Table::drop().table(EventStreamTickets::Table).to_owned())
            .await
    }
}

#[derive(DeriveIden)]
enum EventStreamTickets {
    Table,
    Id,
    UserId,
    SessionId,
    TokenHash,
    FirstUseBy,
    ValidUntil,
    FirstUsedAt,
    Live,
    Version,
    CreatedAt,
    UpdatedAt,
}
