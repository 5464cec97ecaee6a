//! Identity: API keys, the credentials of internal services. Each key is its
//! own service-account principal (its id is the principal's id). Only the
//! SHA-256 of the key's secret is stored; the key is looked up by its id,
//! which it carries in the clear (`keel_<id>_<secret>`). `user_id` is the
//! owner of the row: the admin who created the key.

use sea_orm_migration::{prelude::*, schema::*};

#[derive(DeriveMigrationName)]
pub struct Migration;

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .create_table(
                Table::create()
                    .table(ApiKeys::Table)
                    .col(pk_uuid(ApiKeys::Id))
                    .col(uuid(ApiKeys::UserId))
                    .col(text(ApiKeys::Name))
                    .col(string_len(ApiKeys::Role, 16))
                    .col(string_len(ApiKeys::SecretHash, 64))
                    .col(timestamp_with_time_zone(ApiKeys::CreatedAt))
                    .col(timestamp_with_time_zone(ApiKeys::UpdatedAt))
                    .col(timestamp_with_time_zone_null(ApiKeys::ExpiresAt))
                    .col(timestamp_with_time_zone_null(ApiKeys::LastUsedAt))
                    .col(timestamp_with_time_zone_null(ApiKeys::RevokedAt))
                    .to_owned(),
            )
            .await
        // ListApiKeys pages by id (time-ordered): the primary key serves it.
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager.drop_table(Table::drop().table(ApiKeys::Table).to_owned()).await
    }
}

#[derive(DeriveIden)]
enum ApiKeys {
    Table,
    Id,
    UserId,
    Name,
    Role,
    SecretHash,
    CreatedAt,
    UpdatedAt,
    ExpiresAt,
    LastUsedAt,
    RevokedAt,
}
