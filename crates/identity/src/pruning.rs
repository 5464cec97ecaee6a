//! Pruning: refresh tokens and sessions that can no longer be used are
//! deleted on a schedule, in bounded batches, so the tables do not grow
//! with time.

use std::time::Duration;

use chrono::{DateTime, Utc};
use keel_kernel::{Result, clock};
use sea_orm::DatabaseConnection;

use crate::store;

/// Rows deleted per statement: small enough that one DELETE holds its locks
/// (on SQLite, the one writer) only briefly.
const BATCH: u64 = 500;

/// What one pruning pass deleted.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Pruned {
    pub refresh_tokens: u64,
    pub sessions: u64,
}

/// Deletes refresh tokens that expired by `now` and sessions that expired
/// or were revoked more than `session_retention` before `now` (kept that
/// long so an account's recent sign-ins can still be looked into). Runs
/// batch after batch until a batch comes back short.
pub async fn prune_expired(
    db: &DatabaseConnection,
    now: DateTime<Utc>,
    session_retention: chrono::Duration,
) -> Result<Pruned> {
    let mut pruned = Pruned::default();
    loop {
        let deleted = store::prune_refresh_tokens(db, now, BATCH).await?;
        pruned.refresh_tokens += deleted;
        if deleted < BATCH {
            break;
        }
    }
    let before = now - session_retention;
    loop {
        let deleted = store::prune_sessions(db, before, BATCH).await?;
        pruned.sessions += deleted;
        if deleted < BATCH {
            break;
        }
    }
    Ok(pruned)
}

/// Prunes every `every`, starting after one period, until the handle is
/// aborted. A failed pass is logged and retried at the next tick. Several
/// keel processes may each run it: the deletes are idempotent.
pub fn spawn_pruning(
    db: DatabaseConnection,
    session_retention: chrono::Duration,
    every: Duration,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut ticks = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            ticks.tick().await;
            match prune_expired(&db, clock::now(), session_retention).await {
                Ok(Pruned {
                    refresh_tokens: 0,
                    sessions: 0,
                }) => {}
                Ok(pruned) => tracing::info!(
                    refresh_tokens = pruned.refresh_tokens,
                    sessions = pruned.sessions,
                    "expired sessions and refresh tokens pruned"
                ),
                Err(error) => tracing::warn!(error = %error, "pruning sessions and refresh tokens failed"),
            }
        }
    })
}

#[cfg(test)]
mod tests {
    use keel_kernel::{Role, id};
    use sea_orm::ConnectionTrait;
    use uuid::Uuid;

    use super::*;
    use crate::model::{DisplayName, Email, HashedPassword, RefreshToken, Session, User};

    /// A migrated database of its own: SQLite in a temporary directory, or
    /// a new schema under `KEEL_TEST_DATABASE_URL` (dropped at the end).
    struct TestDb {
        db: DatabaseConnection,
        _dir: tempfile::TempDir,
        schema: Option<(String, String)>,
    }

    impl TestDb {
        async fn sqlite() -> TestDb {
            let dir = tempfile::tempdir().expect("temporary directory");
            let db = keel_db::connect(&keel_db::DbSettings::new(keel_db::sqlite_url(dir.path())))
                .await
                .expect("sqlite");
            keel_db::migrate(&db).await.expect("migrations");
            TestDb {
                db,
                _dir: dir,
                schema: None,
            }
        }

        async fn postgres(url: String) -> TestDb {
            let schema = format!("test_{}", Uuid::now_v7().simple());
            let admin = keel_db::connect(&keel_db::DbSettings::new(url.clone()))
                .await
                .unwrap_or_else(|error| panic!("PostgreSQL at KEEL_TEST_DATABASE_URL is unreachable: {error}"));
            admin
                .execute_unprepared(&format!("CREATE SCHEMA \"{schema}\""))
                .await
                .expect("create schema");
            let _ = admin.close().await;
            let db = keel_db::connect(&keel_db::DbSettings {
                schema: Some(schema.clone()),
                ..keel_db::DbSettings::new(url.clone())
            })
            .await
            .expect("postgres");
            keel_db::migrate(&db).await.expect("migrations");
            TestDb {
                db,
                _dir: tempfile::tempdir().expect("temporary directory"),
                schema: Some((url, schema)),
            }
        }

        async fn drop_schema(self) {
            if let Some((url, schema)) = &self.schema {
                let _ = self.db.clone().close().await;
                if let Ok(admin) = keel_db::connect(&keel_db::DbSettings::new(url.clone())).await {
                    let _ = admin
                        .execute_unprepared(&format!("DROP SCHEMA IF EXISTS \"{schema}\" CASCADE"))
                        .await;
                    let _ = admin.close().await;
                }
            }
        }
    }

    async fn user(db: &DatabaseConnection, now: DateTime<Utc>) -> User {
        let user = User {
            id: id::new_id(),
            email: Email::parse("email", &format!("{}@example.com", Uuid::now_v7().simple())).expect("email"),
            display_name: DisplayName::parse("display_name", "Ada").expect("name"),
            role: Role::User,
            version: 1,
            created_at: now,
            updated_at: now,
        };
        store::insert_user(db, &user, &HashedPassword::new("$argon2id$unused".to_owned()))
            .await
            .expect("user");
        user
    }

    async fn session(
        db: &DatabaseConnection,
        user: &User,
        expires_at: DateTime<Utc>,
        revoked_at: Option<DateTime<Utc>>,
    ) -> Uuid {
        let created_at = expires_at - chrono::Duration::days(60);
        let session = Session {
            id: id::new_id(),
            user_id: user.id,
            created_at,
            last_refreshed_at: created_at,
            expires_at,
            revoked_at,
            user_agent: String::new(),
            ip_address: String::new(),
        };
        store::insert_session(db, &session).await.expect("session");
        session.id
    }

    async fn token(
        db: &DatabaseConnection,
        user: &User,
        session_id: Uuid,
        expires_at: DateTime<Utc>,
        used_at: Option<DateTime<Utc>>,
    ) -> Uuid {
        let token = RefreshToken {
            id: id::new_id(),
            user_id: user.id,
            session_id,
            token_hash: Uuid::now_v7().simple().to_string(),
            created_at: expires_at - chrono::Duration::days(30),
            expires_at,
            used_at,
        };
        store::insert_refresh_token(db, &token).await.expect("token");
        token.id
    }

    async fn token_exists(db: &DatabaseConnection, id: Uuid) -> bool {
        store::find_refresh_token_by_id(db, id).await.expect("read").is_some()
    }

    async fn session_exists(db: &DatabaseConnection, id: Uuid) -> bool {
        store::find_session(db, id).await.expect("read").is_some()
    }

    async fn prunes_what_can_no_longer_be_used(test: TestDb) {
        let db = &test.db;
        let now = clock::now();
        let day = chrono::Duration::days(1);
        let retention = chrono::Duration::days(30);
        let ada = user(db, now).await;

        let active = session(db, &ada, now + day, None).await;
        let expired_long_ago = session(db, &ada, now - retention - day, None).await;
        let expired_recently = session(db, &ada, now - day, None).await;
        let revoked_long_ago = session(db, &ada, now + day, Some(now - retention - day)).await;
        let revoked_recently = session(db, &ada, now + day, Some(now - day)).await;

        let expired_token = token(db, &ada, active, now - chrono::Duration::seconds(1), None).await;
        let live_token = token(db, &ada, active, now + day, None).await;
        // Used, past the grace window, not expired: kept, so that presenting
        // it again is still recognised as reuse and revokes the session.
        let used_token = token(db, &ada, active, now + day, Some(now - day)).await;
        let token_of_revoked_session = token(db, &ada, revoked_long_ago, now + day, None).await;

        let pruned = prune_expired(db, now, retention).await.expect("prune");
        assert_eq!(
            pruned,
            Pruned {
                refresh_tokens: 1,
                sessions: 2
            }
        );
        assert!(!token_exists(db, expired_token).await);
        assert!(token_exists(db, live_token).await);
        assert!(token_exists(db, used_token).await);
        assert!(
            !token_exists(db, token_of_revoked_session).await,
            "a pruned session takes its tokens with it"
        );
        assert!(session_exists(db, active).await);
        assert!(!session_exists(db, expired_long_ago).await);
        assert!(session_exists(db, expired_recently).await);
        assert!(!session_exists(db, revoked_long_ago).await);
        assert!(session_exists(db, revoked_recently).await);

        assert_eq!(
            prune_expired(db, now, retention).await.expect("prune"),
            Pruned::default()
        );
        test.drop_schema().await;
    }

    /// More rows than one batch: every batch runs, none is left behind.
    async fn prunes_in_batches_until_done(test: TestDb) {
        let db = &test.db;
        let now = clock::now();
        let ada = user(db, now).await;
        let active = session(db, &ada, now + chrono::Duration::days(1), None).await;
        let expired = BATCH * 2 + 7;
        for _ in 0..expired {
            token(db, &ada, active, now - chrono::Duration::minutes(1), None).await;
        }
        let live = token(db, &ada, active, now + chrono::Duration::days(1), None).await;

        let pruned = prune_expired(db, now, chrono::Duration::days(30)).await.expect("prune");
        assert_eq!(pruned.refresh_tokens, expired);
        assert!(token_exists(db, live).await);
        test.drop_schema().await;
    }

    /// Runs only when included (`--include-ignored`); then PostgreSQL is required.
    fn postgres_url() -> String {
        std::env::var("KEEL_TEST_DATABASE_URL")
            .ok()
            .filter(|url| !url.is_empty())
            .expect("KEEL_TEST_DATABASE_URL must name the PostgreSQL this test needs")
    }

    #[tokio::test]
    async fn sqlite_prunes_what_can_no_longer_be_used() {
        prunes_what_can_no_longer_be_used(TestDb::sqlite().await).await;
    }

    #[tokio::test]
    async fn sqlite_prunes_in_batches_until_done() {
        prunes_in_batches_until_done(TestDb::sqlite().await).await;
    }

    #[tokio::test]
    #[ignore = "needs PostgreSQL (KEEL_TEST_DATABASE_URL); run with --include-ignored"]
    async fn postgres_prunes_what_can_no_longer_be_used() {
        prunes_what_can_no_longer_be_used(TestDb::postgres(postgres_url()).await).await;
    }

    #[tokio::test]
    #[ignore = "needs PostgreSQL (KEEL_TEST_DATABASE_URL); run with --include-ignored"]
    async fn postgres_prunes_in_batches_until_done() {
        prunes_in_batches_until_done(TestDb::postgres(postgres_url()).await).await;
    }
}
