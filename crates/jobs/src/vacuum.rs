//! Vacuuming the job table under load (PostgreSQL).
//!
//! A fetch moves the jobs it leases out of the fetch index
//! (`jobs_fetch_available`), but their entries stay in it, dead, until a
//! vacuum removes them, and they sit where every fetch starts: the index is
//! in fetch order. So each fetch walks over every job fetched since the last
//! vacuum. Measured on PostgreSQL 15: after 48,000 fetched jobs a fetch of
//! 12 read 495 index pages (1.4 ms); after a vacuum, 14 (0.08 ms).
//! Autovacuum visits a database at most once a minute (`autovacuum_naptime`),
//! far too seldom for a queue that runs thousands of jobs a second, so the
//! workers vacuum the table themselves: after every
//! [`Settings::vacuum_after`](crate::Settings::vacuum_after) jobs this
//! process fetched, checked twice a second. An idle queue never vacuums.
//!
//! A vacuum's cost grows with the table (it reads every index whole), the
//! walk's with the interval between vacuums; the interval that makes their
//! sum smallest grows with the square root of the table's size. So
//! `vacuum_after` is the interval for a table of [`REFERENCE_ROWS`] rows,
//! and after each vacuum the next interval is scaled by `sqrt(rows /
//! REFERENCE_ROWS)` (never below `vacuum_after`), from PostgreSQL's own row
//! estimate (`pg_class.reltuples`, which the vacuum has just updated): with
//! a million finished jobs kept, every ~23,000 fetched jobs instead of 5,000.
//!
//! `VACUUM (INDEX_CLEANUP ON, SKIP_LOCKED) jobs`: index cleanup forced (a
//! few thousand dead rows in a big table are under PostgreSQL's threshold
//! for cleaning indexes, and the fetch index is what needs it), and skipped
//! when another vacuum (autovacuum, another keel) holds the table. With a
//! million finished jobs in the table one such vacuum took 60 ms. SQLite
//! has no dead index entries to walk: nothing runs there.

use std::sync::atomic::Ordering;
use std::time::Duration;

use sea_orm::DatabaseBackend;

use crate::{Jobs, store};

/// How often the count of fetched jobs is looked at.
const CHECK_EVERY: Duration = Duration::from_millis(500);

/// The table size `vacuum_after` is meant for (see the module's notes).
pub(crate) const REFERENCE_ROWS: f64 = 50_000.0;

/// The interval after a vacuum that left `rows` rows: `after`, scaled by
/// the square root of the table's size over [`REFERENCE_ROWS`].
pub(crate) fn next_interval(after: u64, rows: f64) -> u64 {
    let scale = (rows / REFERENCE_ROWS).sqrt().max(1.0);
    (after as f64 * scale).min(u64::MAX as f64) as u64
}

impl Jobs {
    /// Counts jobs this process leased, for the vacuum.
    pub(crate) fn fetched(&self, jobs: usize) {
        self.inner
            .fetched
            .fetch_add(u64::try_from(jobs).unwrap_or(u64::MAX), Ordering::Relaxed);
    }

    /// Vacuums this process ran, and how long they took in all (tests and
    /// statistics).
    pub fn vacuums(&self) -> (u64, Duration) {
        (
            self.inner.vacuums.load(Ordering::Relaxed),
            Duration::from_micros(self.inner.vacuum_micros.load(Ordering::Relaxed)),
        )
    }
}

/// Vacuums the job table after every `vacuum_after` jobs this process
/// fetched; returns at once where there is nothing to do (SQLite, or
/// `vacuum_after` 0).
pub(crate) async fn run_vacuum(jobs: Jobs) {
    let after = jobs.settings().vacuum_after;
    if after == 0 || jobs.db().get_database_backend() != DatabaseBackend::Postgres {
        return;
    }
    let mut interval = tokio::time::interval(CHECK_EVERY);
    interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut threshold = after;
    let mut may_vacuum = None;
    loop {
        interval.tick().await;
        let fetched = jobs.inner.fetched.load(Ordering::Relaxed);
        if fetched < threshold {
            continue;
        }
        // Asked once, at the first vacuum due (an idle keel never asks): a
        // role that does not own the table gets a warning from VACUUM, not
        // an error, and would vacuum nothing for ever.
        if may_vacuum.is_none() {
            may_vacuum = store::may_vacuum(jobs.db()).await.ok();
        }
        if may_vacuum == Some(false) {
            tracing::warn!(
                "the job table is not this role's to vacuum: the workers leave it to autovacuum (KEEL_JOBS_VACUUM_AFTER=0 says so)"
            );
            return;
        }
        jobs.inner.fetched.fetch_sub(fetched, Ordering::Relaxed);
        let started = std::time::Instant::now();
        match store::vacuum(jobs.db()).await {
            Ok(()) => {
                jobs.inner.vacuums.fetch_add(1, Ordering::Relaxed);
                jobs.inner.vacuum_micros.fetch_add(
                    u64::try_from(started.elapsed().as_micros()).unwrap_or(u64::MAX),
                    Ordering::Relaxed,
                );
                if let Ok(rows) = store::estimated_rows(jobs.db()).await {
                    threshold = next_interval(after, rows);
                }
                tracing::debug!(fetched, next_after = threshold, "job table vacuumed");
            }
            Err(error) => tracing::warn!(error = %error, "vacuuming the job table failed"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_interval_grows_with_the_square_root_of_the_table() {
        assert_eq!(next_interval(5_000, 0.0), 5_000, "never below the setting");
        assert_eq!(next_interval(5_000, 50_000.0), 5_000);
        assert_eq!(next_interval(5_000, 200_000.0), 10_000);
        assert_eq!(next_interval(5_000, 1_100_000.0), 23_452);
    }
}
