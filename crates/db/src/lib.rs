//! Keel's data layer: one code path for PostgreSQL and SQLite.
//!
//! # Layout
//! - [`connect`]: a pool for a `postgres://` or `sqlite://` URL, with the
//!   SQLite pragmas the embedded mode needs (WAL, busy timeout, foreign keys);
//! - [`migrate`]: the one Migrator of every module (`keel migrate`, start-up);
//! - [`sqlite_url`]: the embedded default, a file under the data directory.
//!
//! Transactions are the command bus's (`keel_kernel::bus`); the outbox
//! writer is the events module's (`keel_events::relay`).

use std::path::Path;
use std::time::Duration;

use sea_orm::sqlx::sqlite::{SqliteJournalMode, SqliteSynchronous};
use sea_orm::{ConnectOptions, Database, DatabaseBackend, DatabaseConnection, DbErr};
use sea_orm_migration::MigratorTrait;

pub use sea_orm::DatabaseConnection as Db;

/// A pooled connection idle at least this long is pinged before it is
/// handed out; busier ones are used as they are.
pub const PING_IF_IDLE_FOR: Duration = Duration::from_secs(30);

/// The target of the event the pool emits for every connection it hands
/// out, at `INFO` (over the slow threshold, 2 s, at `WARN`), with the
/// wait in the field [`ACQUIRED_AFTER_FIELD`] (seconds, `f64`): sqlx's own
/// measurement, which `/metrics` turns into `keel_db_pool_acquire_seconds`.
pub const ACQUIRE_EVENT_TARGET: &str = "sqlx::pool::acquire";
/// See [`ACQUIRE_EVENT_TARGET`].
pub const ACQUIRED_AFTER_FIELD: &str = "acquired_after_secs";

/// How to reach the database.
#[derive(Debug, Clone)]
pub struct DbSettings {
    pub url: String,
    pub max_connections: u32,
    /// PostgreSQL only: the schema to work in (tests use one per test).
    pub schema: Option<String>,
    pub acquire_timeout: Duration,
}

impl DbSettings {
    pub fn new(url: impl Into<String>) -> Self {
        Self {
            url: url.into(),
            max_connections: 16,
            schema: None,
            acquire_timeout: Duration::from_secs(5),
        }
    }
}

/// The SQLite URL of the embedded mode: `<data_dir>/keel.db`, created if missing.
pub fn sqlite_url(data_dir: &Path) -> String {
    format!("sqlite://{}?mode=rwc", data_dir.join("keel.db").display())
}

/// Opens a pool. Fails with a message that names the URL's scheme when it is
/// neither PostgreSQL nor SQLite, and never prints the URL (it may hold a password).
pub async fn connect(settings: &DbSettings) -> Result<DatabaseConnection, DbErr> {
    let scheme = settings.url.split(':').next().unwrap_or_default();
    if !matches!(scheme, "postgres" | "postgresql" | "sqlite") {
        return Err(DbErr::Custom(format!(
            "unsupported database scheme {scheme:?}: use postgres:// or sqlite://"
        )));
    }
    let mut options = ConnectOptions::new(settings.url.clone());
    options
        .max_connections(settings.max_connections)
        .min_connections(1)
        .acquire_timeout(settings.acquire_timeout)
        .connect_timeout(settings.acquire_timeout)
        .sqlx_logging(false)
        // sqlx pings every connection it hands out by default: one more
        // round trip per checkout, which doubled the database work of an
        // authenticated read. Only a connection idle long enough to have been
        // dropped (by the server, a proxy, a firewall) is pinged; one that
        // broke in use fails its statement and is discarded by the pool.
        .test_before_acquire_if_idle_for(PING_IF_IDLE_FOR)
        // Every checkout reports its wait (ACQUIRE_EVENT_TARGET); a
        // subscriber that wants none pays one disabled callsite check, and
        // one that logs at `info` must leave this target out (keel's does).
        .map_sqlx_postgres_pool_opts(|pool| pool.acquire_time_level(log::LevelFilter::Info))
        .map_sqlx_sqlite_pool_opts(|pool| pool.acquire_time_level(log::LevelFilter::Info))
        .map_sqlx_sqlite_opts(|sqlite| {
            sqlite
                .journal_mode(SqliteJournalMode::Wal)
                .synchronous(SqliteSynchronous::Normal)
                .busy_timeout(Duration::from_secs(10))
                .foreign_keys(true)
        });
    if let Some(schema) = &settings.schema {
        options.set_schema_search_path(schema.clone());
    }
    Database::connect(options).await
}

/// Applies every pending migration.
pub async fn migrate(db: &DatabaseConnection) -> Result<(), DbErr> {
    keel_migrations::Migrator::up(db, None).await
}

/// True when the database answers. The driver's ping runs no statement, so
/// the readiness check every few seconds counts as no transaction.
pub async fn ping(db: &DatabaseConnection) -> bool {
    db.ping().await.is_ok()
}

/// The pool's idle connections, its open connections and its size limit.
pub fn pool_status(db: &DatabaseConnection) -> (u32, u32, u32) {
    match db.get_database_backend() {
        DatabaseBackend::Postgres => {
            let pool = db.get_postgres_connection_pool();
            (
                u32::try_from(pool.num_idle()).unwrap_or(u32::MAX),
                pool.size(),
                pool.options().get_max_connections(),
            )
        }
        DatabaseBackend::Sqlite => {
            let pool = db.get_sqlite_connection_pool();
            (
                u32::try_from(pool.num_idle()).unwrap_or(u32::MAX),
                pool.size(),
                pool.options().get_max_connections(),
            )
        }
        _ => (0, 0, 0),
    }
}

pub fn backend_name(db: &DatabaseConnection) -> &'static str {
    match db.get_database_backend() {
        DatabaseBackend::Postgres => "postgres",
        DatabaseBackend::Sqlite => "sqlite",
        _ => "other",
    }
}
