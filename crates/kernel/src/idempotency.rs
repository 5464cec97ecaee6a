//! Idempotency keys for commands (semantics of the IETF httpapi
//! Idempotency-Key draft and of Stripe; the PostgreSQL design is
//! Brandur's). docs/guards.md says it for users.
//!
//! A command whose request carries an `idempotency-key` is looked up by
//! (caller scope, key) in `kernel_idempotency` inside the command's own
//! transaction before its handler runs; on success its reply is written
//! there in the same transaction. So a command that committed always finds
//! its record, and one that rolled back never does: a retry after a crash
//! between commit and answer is replayed, never run twice.
//!
//! A concurrent duplicate is refused with ABORTED at once, never queued:
//! in one process by the in-flight set below (taken before the transaction,
//! so on SQLite a duplicate does not even wait for the one writer); across
//! processes on PostgreSQL by a transaction-scoped advisory lock on the
//! key's hash, tried without waiting. The lock is held until the first
//! command commits, and its record is visible the moment the lock is free
//! (READ COMMITTED takes a fresh snapshot per statement).
//!
//! What is stored: successful replies that [`crate::Reply::to_bytes`] can
//! keep. Errors are not (their transaction rolled back, so a retry runs
//! again, safely); replies that hold credentials are not either (a retry
//! signs in again).

use std::collections::HashSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use chrono::{DateTime, Utc};
use sea_orm::{ConnectionTrait, DatabaseBackend, DatabaseConnection, DatabaseTransaction, Statement};
use sha2::{Digest, Sha256};
use uuid::Uuid;

use crate::context::RequestContext;
use crate::error::{Code, Error, Result};

/// How long a record answers retries (`KEEL_IDEMPOTENCY_TTL_SECONDS`).
pub const DEFAULT_TTL: Duration = Duration::from_secs(24 * 3600);

/// The response header (and gRPC metadata) on a replayed answer.
pub const REPLAYED_HEADER: &str = "idempotent-replayed";

/// Longest key accepted (Stripe's limit).
pub const MAX_KEY_LENGTH: usize = 255;

/// A key as a client sent it: 1..=255 printable ASCII characters. The
/// draft's structured-field string form (`"abc"`) is accepted too, its
/// quotes removed.
pub fn parse_key(value: &[u8]) -> Result<String> {
    let unquoted = match value {
        [b'"', inner @ .., b'"'] if !inner.contains(&b'"') && !inner.contains(&b'\\') => inner,
        _ => value,
    };
    if unquoted.is_empty() || unquoted.len() > MAX_KEY_LENGTH {
        return Err(Error::invalid_field(
            "idempotency-key",
            format!("must be 1 to {MAX_KEY_LENGTH} characters"),
        ));
    }
    if !unquoted.iter().all(|byte| (0x20..=0x7e).contains(byte)) {
        return Err(Error::invalid_field(
            "idempotency-key",
            "must be printable ASCII characters",
        ));
    }
    Ok(String::from_utf8_lossy(unquoted).into_owned())
}

/// The fingerprint of a request: SHA-256 of its canonical encoding, hex.
pub fn fingerprint(encoded_request: &[u8]) -> String {
    hex(&Sha256::digest(encoded_request))
}

fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write;
    bytes
        .iter()
        .fold(String::with_capacity(bytes.len() * 2), |mut out, byte| {
            let _ = write!(out, "{byte:02x}");
            out
        })
}

/// Tells the transport that the bus answered from a record (shared by the
/// clones of one request's context).
#[derive(Debug, Clone, Default)]
pub struct ReplayNotice(Arc<AtomicBool>);

impl ReplayNotice {
    pub fn replayed(&self) -> bool {
        self.0.load(Ordering::Relaxed)
    }

    pub(crate) fn mark(&self) {
        self.0.store(true, Ordering::Relaxed);
    }
}

/// The bus's idempotency: the records' lifetime and this process's keys in flight.
pub(crate) struct Idempotency {
    ttl: chrono::Duration,
    // A std mutex: held only to insert or remove, never across an await.
    in_flight: std::sync::Mutex<HashSet<(String, String)>>,
}

impl Idempotency {
    pub(crate) fn new(ttl: Duration) -> Self {
        Self {
            ttl: chrono::Duration::from_std(ttl).unwrap_or(chrono::Duration::MAX),
            in_flight: std::sync::Mutex::new(HashSet::new()),
        }
    }

    /// Claims `key` for `command` in this process: ABORTED if a command
    /// with the same scope and key is running here.
    pub(crate) fn claim(&self, ctx: &RequestContext, command: &'static str, key: &str) -> Result<Claim<'_>> {
        let (scope, user_id) = scope(ctx)?;
        let entry = (scope, key.to_owned());
        let inserted = self
            .in_flight
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .insert(entry.clone());
        if !inserted {
            return Err(in_flight());
        }
        Ok(Claim {
            owner: self,
            entry,
            user_id,
            command,
            fingerprint: ctx
                .request_fingerprint()
                .map_or_else(|| fingerprint(&[]), str::to_owned),
        })
    }
}

/// Whose keys these are: a signed-in caller's own, a trusted in-process
/// caller's, or, for an anonymous caller, its client address'.
fn scope(ctx: &RequestContext) -> Result<(String, Option<Uuid>)> {
    if let Some(principal) = &ctx.principal {
        return Ok((format!("user:{}", principal.user_id), Some(principal.user_id)));
    }
    if ctx.is_trusted() {
        return Ok(("system".to_owned(), None));
    }
    match ctx.client_ip {
        Some(address) => Ok((format!("addr:{address}"), None)),
        None => Err(Error::invalid_field(
            "idempotency-key",
            "needs a signed-in caller or a known client address",
        )),
    }
}

fn in_flight() -> Error {
    Error::new(
        Code::Aborted,
        "a request with this idempotency key is still in progress; retry after it finishes",
    )
}

/// What the record of a claimed key says.
pub(crate) enum Found {
    /// No live record: run the command.
    Absent,
    /// The stored reply of the first request.
    Replay(Vec<u8>),
    /// The first request ran, and its reply was shown once
    /// ([`crate::bus::Reply::SHOWN_ONCE`]).
    ShownOnce,
}

/// What a record keeps of a command that ran.
pub(crate) enum Stored {
    /// Its reply, to replay.
    Reply(Vec<u8>),
    /// Nothing: the reply was shown once. Stored as no bytes, which no
    /// reply is (the smallest, `()`, is `null`).
    ShownOnce,
}

/// A key claimed for one command, released when dropped.
pub(crate) struct Claim<'a> {
    owner: &'a Idempotency,
    entry: (String, String),
    user_id: Option<Uuid>,
    command: &'static str,
    fingerprint: String,
}

impl Drop for Claim<'_> {
    fn drop(&mut self) {
        self.owner
            .in_flight
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .remove(&self.entry);
    }
}

impl Claim<'_> {
    /// Looks the key up in the command's transaction. On PostgreSQL the
    /// key's advisory lock is tried first: another process's command with
    /// this key still running means ABORTED now. A record of another
    /// request is IDEMPOTENCY_KEY_REUSED (422); an expired one not yet
    /// pruned is deleted.
    pub(crate) async fn look_up(&self, tx: &DatabaseTransaction, now: DateTime<Utc>) -> Result<Found> {
        let backend = tx.get_database_backend();
        let (scope, key) = &self.entry;
        if backend == DatabaseBackend::Postgres {
            let row = tx
                .query_one_raw(Statement::from_sql_and_values(
                    backend,
                    "SELECT pg_try_advisory_xact_lock($1) AS locked",
                    [lock_key(scope, key).into()],
                ))
                .await?;
            let locked = row.map(|row| row.try_get::<bool>("", "locked")).transpose()?;
            if locked != Some(true) {
                return Err(in_flight());
            }
        }
        let row = tx
            .query_one_raw(Statement::from_sql_and_values(
                backend,
                "SELECT command, fingerprint, reply, expires_at FROM kernel_idempotency \
                 WHERE scope = $1 AND key = $2",
                [scope.clone().into(), key.clone().into()],
            ))
            .await?;
        let Some(row) = row else {
            return Ok(Found::Absent);
        };
        let expires_at: DateTime<Utc> = row.try_get("", "expires_at")?;
        if expires_at <= now {
            tx.execute_raw(Statement::from_sql_and_values(
                backend,
                "DELETE FROM kernel_idempotency WHERE scope = $1 AND key = $2",
                [scope.clone().into(), key.clone().into()],
            ))
            .await?;
            return Ok(Found::Absent);
        }
        let command: String = row.try_get("", "command")?;
        let fingerprint: String = row.try_get("", "fingerprint")?;
        if command != self.command || fingerprint != self.fingerprint {
            return Err(Error::idempotency_key_reused(
                "this idempotency key was already used with a different request; \
                 use a new key for a new request",
            ));
        }
        let reply: Vec<u8> = row.try_get("", "reply")?;
        Ok(if reply.is_empty() {
            Found::ShownOnce
        } else {
            Found::Replay(reply)
        })
    }

    /// Writes the record of a successful command in its transaction.
    pub(crate) async fn record(&self, tx: &DatabaseTransaction, stored: Stored, now: DateTime<Utc>) -> Result<()> {
        let reply = match stored {
            Stored::Reply(bytes) => bytes,
            Stored::ShownOnce => Vec::new(),
        };
        let (scope, key) = &self.entry;
        let expires_at = now
            .checked_add_signed(self.owner.ttl)
            .unwrap_or(DateTime::<Utc>::MAX_UTC);
        tx.execute_raw(Statement::from_sql_and_values(
            tx.get_database_backend(),
            "INSERT INTO kernel_idempotency \
             (id, user_id, scope, key, command, fingerprint, reply, created_at, expires_at) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)",
            [
                crate::id::new_id().into(),
                self.user_id.into(),
                scope.clone().into(),
                key.clone().into(),
                self.command.into(),
                self.fingerprint.clone().into(),
                reply.into(),
                now.into(),
                expires_at.into(),
            ],
        ))
        .await?;
        Ok(())
    }
}

/// The key's 64-bit PostgreSQL advisory lock: the first 8 bytes of a
/// SHA-256 of scope and key. Two keys sharing one (2^-64) only means a
/// needless ABORTED while both run.
fn lock_key(scope: &str, key: &str) -> i64 {
    let digest = Sha256::new()
        .chain_update(b"keel.idempotency\0")
        .chain_update(scope.as_bytes())
        .chain_update(b"\0")
        .chain_update(key.as_bytes())
        .finalize();
    let mut first = [0u8; 8];
    first.copy_from_slice(&digest[..8]);
    i64::from_be_bytes(first)
}

/// Rows deleted per statement: one DELETE holds its locks (on SQLite, the
/// one writer) only briefly.
const PRUNE_BATCH: u64 = 500;

/// Deletes records that expired by `now`, batch after batch until a batch
/// comes back short. Returns how many.
pub async fn prune_expired(db: &DatabaseConnection, now: DateTime<Utc>) -> Result<u64> {
    let mut pruned = 0;
    loop {
        let deleted = db
            .execute_raw(Statement::from_sql_and_values(
                db.get_database_backend(),
                "DELETE FROM kernel_idempotency WHERE id IN \
                 (SELECT id FROM kernel_idempotency WHERE expires_at <= $1 LIMIT $2)",
                [now.into(), (PRUNE_BATCH as i64).into()],
            ))
            .await?
            .rows_affected();
        pruned += deleted;
        if deleted < PRUNE_BATCH {
            return Ok(pruned);
        }
    }
}

/// Prunes every `every`, starting after one period, until the handle is
/// aborted. Several keel processes may each run it: the deletes are idempotent.
pub fn spawn_pruning(db: DatabaseConnection, every: Duration) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut ticks = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            ticks.tick().await;
            match prune_expired(&db, crate::clock::now()).await {
                Ok(0) => {}
                Ok(pruned) => tracing::info!(pruned, "expired idempotency records pruned"),
                Err(error) => tracing::warn!(error = %error, "pruning idempotency records failed"),
            }
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_one_to_255_printable_ascii_characters() {
        assert_eq!(parse_key(b"order-42").unwrap(), "order-42");
        assert_eq!(parse_key(b"\"order-42\"").unwrap(), "order-42");
        assert_eq!(parse_key(b"a b~").unwrap(), "a b~");
        assert_eq!(parse_key(&[b'k'; 255]).unwrap().len(), 255);
        for refused in [
            &b""[..],
            b"\"\"",
            &[b'k'; 256],
            b"tab\there",
            "caf\u{e9}".as_bytes(),
            b"\x7f",
        ] {
            let error = parse_key(refused).unwrap_err();
            assert_eq!(error.code(), Code::InvalidArgument, "{refused:?}");
        }
    }

    #[test]
    fn a_duplicate_in_this_process_is_aborted_until_the_first_is_done() {
        let idempotency = Idempotency::new(DEFAULT_TTL);
        let ctx = RequestContext::system();
        let first = idempotency.claim(&ctx, "test.command", "k").unwrap();
        let error = idempotency.claim(&ctx, "test.command", "k").err().unwrap();
        assert_eq!(error.code(), Code::Aborted);
        // Another key is free.
        drop(idempotency.claim(&ctx, "test.command", "other").unwrap());
        drop(first);
        assert!(idempotency.claim(&ctx, "test.command", "k").is_ok());
    }

    #[test]
    fn anonymous_callers_are_scoped_by_address_or_refused() {
        let mut ctx = RequestContext::new("r");
        assert_eq!(scope(&ctx).unwrap_err().code(), Code::InvalidArgument);
        ctx.client_ip = Some("192.0.2.1".parse().unwrap());
        assert_eq!(scope(&ctx).unwrap().0, "addr:192.0.2.1");
    }
}
