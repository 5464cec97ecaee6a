//! Events: the identity of this deployment's database, for namespacing what
//! it shares with others (Redis channels). One row, written by the first
//! keel to start (`keel_events::store::instance_id`): a database name and
//! schema repeat across servers, a random id does not.

use sea_orm_migration::prelude::*;

#[derive(DeriveMigrationName)]
pub struct Migration;

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .create_table(
                Table::create()
                    .table(EventInstance::Table)
                    .col(ColumnDef::new(EventInstance::Id).integer().not_null().primary_key())
                    .col(ColumnDef::new(EventInstance::InstanceId).uuid().not_null())
                    .to_owned(),
            )
            .await
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .drop_table(Table::drop().table(EventInstance::Table).to_owned())
            .await
    }
}

#[derive(DeriveIden)]
enum EventInstance {
    Table,
    Id,
    InstanceId,
}
