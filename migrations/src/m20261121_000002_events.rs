//! Events: the outbox and event log, handler checkpoints, dead letters, and
//! the retention watermark.

use sea_orm_migration::{prelude::*, schema::*};

#[derive(DeriveMigrationName)]
pub struct Migration;

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .create_table(
                Table::create()
                    .table(Events::Table)
                    // Insertion order: the relay numbers events in this order.
                    .col(big_pk_auto(Events::Position))
                    .col(uuid_uniq(Events::EventId))
                    // Assigned by the relay after commit: contiguous, no gaps.
                    .col(big_integer_null(Events::Sequence))
                    .col(string_len(Events::EventName, 128))
                    .col(string_len(Events::EventVersion, 16))
                    .col(timestamp_with_time_zone(Events::OccurredAt))
                    // The owner; NULL for events of no user (admins only).
                    .col(uuid_null(Events::UserId))
                    .col(text(Events::AggregateId))
                    .col(string_len(Events::PayloadType, 255))
                    .col(binary(Events::Payload))
                    .col(string_len_null(Events::IdempotencyKey, 255))
                    // Security-relevant: listed in the audit log.
                    .col(boolean(Events::Audited))
                    .col(timestamp_with_time_zone_null(Events::PublishedAt))
                    .to_owned(),
            )
            .await?;
        for index in [
            Index::create()
                .name("ux_events_sequence")
                .table(Events::Table)
                .col(Events::Sequence)
                .unique()
                .to_owned(),
            Index::create()
                .name("ix_events_event_name_sequence")
                .table(Events::Table)
                .col(Events::EventName)
                .col(Events::Sequence)
                .to_owned(),
            Index::create()
                .name("ix_events_audited_sequence")
                .table(Events::Table)
                .col(Events::Audited)
                .col(Events::Sequence)
                .to_owned(),
            Index::create()
                .name("ix_events_user_id_sequence")
                .table(Events::Table)
                .col(Events::UserId)
                .col(Events::Sequence)
                .to_owned(),
            Index::create()
                .name("ix_events_occurred_at")
                .table(Events::Table)
                .col(Events::OccurredAt)
                .to_owned(),
        ] {
            manager.create_index(index).await?;
        }

        manager
            .create_table(
                Table::create()
                    .table(EventCheckpoints::Table)
                    .col(string_len(EventCheckpoints::Handler, 128).primary_key())
                    .col(uuid_null(EventCheckpoints::UserId))
                    .col(big_integer(EventCheckpoints::Sequence))
                    // The process that runs the handler now, and until when:
                    // one runner per handler across keel processes.
                    .col(string_len_null(EventCheckpoints::LeasedBy, 64))
                    .col(timestamp_with_time_zone_null(EventCheckpoints::LeasedUntil))
                    .col(timestamp_with_time_zone(EventCheckpoints::UpdatedAt))
                    .to_owned(),
            )
            .await?;

        manager
            .create_table(
                Table::create()
                    .table(EventDeadLetters::Table)
                    .col(pk_uuid(EventDeadLetters::Id))
                    .col(string_len(EventDeadLetters::Handler, 128))
                    .col(uuid(EventDeadLetters::EventId))
                    .col(big_integer(EventDeadLetters::Sequence))
                    .col(uuid_null(EventDeadLetters::UserId))
                    .col(integer(EventDeadLetters::Attempts))
                    .col(text(EventDeadLetters::LastError))
                    .col(timestamp_with_time_zone(EventDeadLetters::FailedAt))
                    .col(timestamp_with_time_zone_null(EventDeadLetters::ReplayedAt))
                    .to_owned(),
            )
            .await?;
        for index in [
            Index::create()
                .name("ux_event_dead_letters_handler_event")
                .table(EventDeadLetters::Table)
                .col(EventDeadLetters::Handler)
                .col(EventDeadLetters::EventId)
                .unique()
                .to_owned(),
            Index::create()
                .name("ix_event_dead_letters_failed_at")
                .table(EventDeadLetters::Table)
                .col(EventDeadLetters::FailedAt)
                .col(EventDeadLetters::Id)
                .to_owned(),
        ] {
            manager.create_index(index).await?;
        }

        manager
            .create_table(
                Table::create()
                    .table(EventRetention::Table)
                    .col(integer(EventRetention::Id).primary_key())
                    .col(uuid_null(EventRetention::UserId))
                    // Every event up to this sequence has been pruned.
                    .col(big_integer(EventRetention::PrunedThrough))
                    .to_owned(),
            )
            .await
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        for table in [
            EventRetention::Table.into_iden(),
            EventDeadLetters::Table.into_iden(),
            EventCheckpoints::Table.into_iden(),
            Events::Table.into_iden(),
        ] {
            manager.drop_table(Table::drop().table(table).to_owned()).await?;
        }
        Ok(())
    }
}

#[derive(DeriveIden)]
enum Events {
    Table,
    Position,
    EventId,
    Sequence,
    EventName,
    EventVersion,
    OccurredAt,
    UserId,
    AggregateId,
    PayloadType,
    Payload,
    IdempotencyKey,
    Audited,
    PublishedAt,
}

#[derive(DeriveIden)]
enum EventCheckpoints {
    Table,
    Handler,
    UserId,
    Sequence,
    LeasedBy,
    LeasedUntil,
    UpdatedAt,
}

#[derive(DeriveIden)]
enum EventDeadLetters {
    Table,
    Id,
    Handler,
    EventId,
    Sequence,
    UserId,
    Attempts,
    LastError,
    FailedAt,
    ReplayedAt,
}

#[derive(DeriveIden)]
enum EventRetention {
    Table,
    Id,
    UserId,
    PrunedThrough,
}
