//! Pruning: finished jobs are deleted once their retention passes —
//! completed and cancelled ones after `retain_completed` (24 h by default),
//! failed ones after `retain_failed` (7 days: they are the dead letters an
//! admin reads). The job table stays small however long keel runs (pg-boss
//! users met 30 s queries at 14M rows).
//!
//! Every process with workers prunes every `prune_every` (five minutes by
//! default; at once again after a run that reached its limit): in batches, one short statement each (no lock outlives it),
//! oldest first through the `(state, finished_at)` index; a run stops after
//! `MAX_BATCHES` batches of a state and the next run goes on.

use std::time::Duration;

use chrono::{DateTime, Utc};
use keel_kernel::{Result, clock};
use sea_orm::{ConnectionTrait, DatabaseConnection};

use crate::model::JobState;
use crate::store;

/// How long finished jobs are kept.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Retention {
    /// Completed and cancelled jobs.
    pub completed: Duration,
    /// Failed jobs.
    pub failed: Duration,
}

impl Default for Retention {
    fn default() -> Self {
        Self {
            completed: Duration::from_secs(24 * 3600),
            failed: Duration::from_secs(7 * 24 * 3600),
        }
    }
}

/// What one pruning deleted.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Pruned {
    pub completed: u64,
    pub cancelled: u64,
    pub failed: u64,
}

impl Pruned {
    pub fn total(&self) -> u64 {
        self.completed + self.cancelled + self.failed
    }
}

/// Rows one statement deletes.
pub const BATCH: u64 = 1000;
/// Batches of one state in one run (a million rows at most).
const MAX_BATCHES: u32 = 1000;

/// Deletes the jobs whose retention ran out before `now`, `batch` rows a
/// statement.
pub async fn prune(db: &impl ConnectionTrait, now: DateTime<Utc>, retention: Retention, batch: u64) -> Result<Pruned> {
    let batch = batch.max(1);
    let before = |keep: Duration| now - chrono::Duration::from_std(keep).unwrap_or(chrono::Duration::MAX);
    let mut pruned = Pruned::default();
    for (state, keep) in [
        (JobState::Completed, retention.completed),
        (JobState::Cancelled, retention.completed),
        (JobState::Failed, retention.failed),
    ] {
        let before = before(keep);
        let mut deleted = 0;
        for _ in 0..MAX_BATCHES {
            let count = store::delete_finished(db, state, before, batch).await?;
            deleted += count;
            if count < batch {
                break;
            }
        }
        match state {
            JobState::Completed => pruned.completed = deleted,
            JobState::Cancelled => pruned.cancelled = deleted,
            _ => pruned.failed = deleted,
        }
    }
    Ok(pruned)
}

/// Every `every`, prunes; each process does (a few indexed statements
/// when there is nothing to delete; on PostgreSQL two processes pruning at
/// once skip each other's rows).
/// A run that stopped at its limit is followed by the next one at once
/// (the table must not grow faster than it is pruned).
pub(crate) async fn run_pruner(db: DatabaseConnection, retention: Retention, every: Duration) {
    let full = BATCH * u64::from(MAX_BATCHES);
    let mut wait = every;
    loop {
        tokio::time::sleep(wait).await;
        wait = every;
        match prune(&db, clock::now(), retention, BATCH).await {
            Ok(pruned) if pruned.total() > 0 => {
                tracing::info!(
                    completed = pruned.completed,
                    cancelled = pruned.cancelled,
                    failed = pruned.failed,
                    "finished jobs pruned"
                );
                if pruned.completed >= full || pruned.cancelled >= full || pruned.failed >= full {
                    wait = Duration::ZERO;
                }
            }
            Ok(_) => {}
            Err(error) => tracing::warn!(error = %error, "pruning finished jobs failed"),
        }
    }
}
