//! The one Migrator of every Keel module. Each module's tables arrive in
//! migrations named `m<date>_<seq>_<module>_<what>`, applied in order by
//! `keel migrate` and at start-up.

pub use sea_orm_migration::prelude::*;

mod m20261121_000001_identity;
mod m20261121_000002_events;
mod m20261201_000003_identity;
mod m20261201_000004_events;
mod m20261203_000005_events;
mod m20261203_000006_kernel_idempotency;
mod m20261203_000007_identity_api_keys;
mod m20261203_000008_events;
mod m20261203_000009_events;
mod m20261203_000010_jobs;
mod m20261203_000011_jobs_api;
mod m20261203_000012_jobs_scheduling;
mod m20261203_000013_jobs_execution;
mod m20261204_000014_jobs_partial_indexes;

pub struct Migrator;

#[async_trait::async_trait]
impl MigratorTrait for Migrator {
    fn migrations() -> Vec<Box<dyn MigrationTrait>> {
        vec![
            Box::new(m20261121_000001_identity::Migration),
            Box::new(m20261121_000002_events::Migration),
            Box::new(m20261201_000003_identity::Migration),
            Box::new(m20261201_000004_events::Migration),
            Box::new(m20261203_000005_events::Migration),
            Box::new(m20261203_000006_kernel_idempotency::Migration),
            Box::new(m20261203_000007_identity_api_keys::Migration),
            Box::new(m20261203_000008_events::Migration),
            Box::new(m20261203_000009_events::Migration),
            Box::new(m20261203_000010_jobs::Migration),
            Box::new(m20261203_000011_jobs_api::Migration),
            Box::new(m20261203_000012_jobs_scheduling::Migration),
            Box::new(m20261203_000013_jobs_execution::Migration),
            Box::new(m20261204_000014_jobs_partial_indexes::Migration),
        ]
    }
}

/// Text compared byte by byte on every backend, so that range scans for a
/// prefix and keyset pages agree between SQLite (BINARY) and PostgreSQL.
pub(crate) fn byte_ordered(manager: &SchemaManager, column: ColumnDef) -> ColumnDef {
    let mut column = column;
    if manager.get_database_backend() == sea_orm_migration::sea_orm::DatabaseBackend::Postgres {
        column.extra("COLLATE \"C\"");
    }
    column
}
