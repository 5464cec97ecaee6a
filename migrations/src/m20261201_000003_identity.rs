//! Identity: the indexes that counting admins and pruning need.
//!
//! - `ix_users_role`: `count_admins` (the last-admin guard) filters on role;
//! - `ix_refresh_tokens_expires_at`: pruning deletes expired refresh tokens;
//! - `ix_sessions_expires_at`, `ix_sessions_revoked_at`: pruning deletes
//!   sessions that expired or were revoked before the retention cut-off.

use sea_orm_migration::prelude::*;

#[derive(DeriveMigrationName)]
pub struct Migration;

fn indexes() -> Vec<IndexCreateStatement> {
    vec![
        Index::create()
            .name("ix_users_role")
            .table(Users::Table)
            .col(Users::Role)
            .to_owned(),
        Index::create()
            .name("ix_refresh_tokens_expires_at")
            .table(RefreshTokens::Table)
            .col(RefreshTokens::ExpiresAt)
            .to_owned(),
        Index::create()
            .name("ix_sessions_expires_at")
            .table(Sessions::Table)
            .col(Sessions::ExpiresAt)
            .to_owned(),
        Index::create()
            .name("ix_sessions_revoked_at")
            .table(Sessions::Table)
            .col(Sessions::RevokedAt)
            .to_owned(),
    ]
}

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        for index in indexes() {
            manager.create_index(index).await?;
        }
        Ok(())
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        for drop in [
            Index::drop().name("ix_users_role").table(Users::Table).to_owned(),
            Index::drop()
                .name("ix_refresh_tokens_expires_at")
                .table(RefreshTokens::Table)
                .to_owned(),
            Index::drop()
                .name("ix_sessions_expires_at")
                .table(Sessions::Table)
                .to_owned(),
            Index::drop()
                .name("ix_sessions_revoked_at")
                .table(Sessions::Table)
                .to_owned(),
        ] {
            manager.drop_index(drop).await?;
        }
        Ok(())
    }
}

#[derive(DeriveIden)]
enum Users {
    Table,
    Role,
}

#[derive(DeriveIden)]
enum Sessions {
    Table,
    ExpiresAt,
    RevokedAt,
}

#[derive(DeriveIden)]
enum RefreshTokens {
    Table,
    ExpiresAt,
}
