//! Kernel: idempotency records. One row per (caller scope, key) of a
//! command that committed, written in that command's own transaction: the
//! command's name, a SHA-256 of its request, its stored reply, and when the
//! record expires (pruned in batches after that).

use sea_orm_migration::prelude::*;

#[derive(DeriveMigrationName)]
pub struct Migration;

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .create_table(
                Table::create()
                    .table(KernelIdempotency::Table)
                    .col(ColumnDef::new(KernelIdempotency::Id).uuid().not_null().primary_key())
                    // The caller's user, when a signed-in caller sent the key.
                    .col(ColumnDef::new(KernelIdempotency::UserId).uuid())
                    // `user:<uuid>`, `addr:<ip>` or `system`: keys never meet across callers.
                    .col(ColumnDef::new(KernelIdempotency::Scope).string_len(80).not_null())
                    .col(ColumnDef::new(KernelIdempotency::Key).string_len(255).not_null())
                    .col(ColumnDef::new(KernelIdempotency::Command).string_len(128).not_null())
                    .col(ColumnDef::new(KernelIdempotency::Fingerprint).string_len(64).not_null())
                    .col(ColumnDef::new(KernelIdempotency::Reply).binary().not_null())
                    .col(
                        ColumnDef::new(KernelIdempotency::CreatedAt)
                            .timestamp_with_time_zone()
                            .not_null(),
                    )
                    .col(
                        ColumnDef::new(KernelIdempotency::ExpiresAt)
                            .timestamp_with_time_zone()
                            .not_null(),
                    )
                    .to_owned(),
            )
            .await?;
        // The lookup of every keyed command, and what two concurrent
        // inserts of one key meet on.
        manager
            .create_index(
                Index::create()
                    .name("kernel_idempotency_scope_key")
                    .table(KernelIdempotency::Table)
                    .col(KernelIdempotency::Scope)
                    .col(KernelIdempotency::Key)
                    .unique()
                    .to_owned(),
            )
            .await?;
        // Pruning takes expired rows in batches.
        manager
            .create_index(
                Index::create()
                    .name("kernel_idempotency_expires_at")
                    .table(KernelIdempotency::Table)
                    .col(KernelIdempotency::ExpiresAt)
                    .to_owned(),
            )
            .await
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .drop_table(Table::drop().table(KernelIdempotency::Table).to_owned())
            .await
    }
}

#[derive(DeriveIden)]
enum KernelIdempotency {
    Table,
    Id,
    UserId,
    Scope,
    Key,
    Command,
    Fingerprint,
    Reply,
    CreatedAt,
    ExpiresAt,
}
