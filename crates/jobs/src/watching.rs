//! The jobs `WatchJob` streams of this process watch, read for changes by
//! one poller: a query per tick for every watched job (in chunks), not one
//! per stream. Changes this process makes arrive at once through
//! [`Jobs::publish`]; the poller brings other processes' within a tick. A
//! caller may hold only so many streams at once.

use std::collections::HashMap;
use std::sync::Arc;

use chrono::{DateTime, Utc};
use keel_kernel::{Code, Error, Result};
use uuid::Uuid;

use crate::{JobRecord, Jobs, store};

/// A change of one job: its row now, or `None` once it was deleted.
#[derive(Debug)]
pub(crate) struct JobChange {
    pub id: Uuid,
    pub job: Option<JobRecord>,
}

/// The jobs this process watches.
#[derive(Default)]
pub(crate) struct Watched {
    /// Per job: its streams, and the `updated_at` the poller last saw.
    jobs: HashMap<Uuid, (usize, Option<DateTime<Utc>>)>,
    /// Streams per caller (`None`: trusted callers without a user).
    callers: HashMap<Option<Uuid>, usize>,
    poller: bool,
}

/// The most jobs one poll reads in a statement.
const CHUNK: usize = 500;

/// Holds a stream's place: dropped, the job and the caller count one
/// stream fewer.
pub(crate) struct Watching {
    jobs: Jobs,
    id: Uuid,
    caller: Option<Uuid>,
}

impl Jobs {
    /// Registers a stream of `caller` on `job`; RESOURCE_EXHAUSTED when the
    /// caller holds `Settings::watch_per_caller` streams already.
    pub(crate) fn start_watching(&self, job: &JobRecord, caller: Option<Uuid>) -> Result<Watching> {
        let limit = self.settings().watch_per_caller;
        let start_poller = {
            let mut watched = self.watched();
            let streams = watched.callers.entry(caller).or_default();
            if *streams >= limit {
                return Err(Error::new(
                    Code::ResourceExhausted,
                    format!("at most {limit} job watches at once per caller; close one first"),
                ));
            }
            *streams += 1;
            watched.jobs.entry(job.id).or_insert((0, Some(job.updated_at))).0 += 1;
            !std::mem::replace(&mut watched.poller, true)
        };
        if start_poller {
            tokio::spawn(poll(self.clone()));
        }
        Ok(Watching {
            jobs: self.clone(),
            id: job.id,
            caller,
        })
    }

    fn watched(&self) -> std::sync::MutexGuard<'_, Watched> {
        self.inner
            .watched
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

impl Drop for Watching {
    fn drop(&mut self) {
        let mut watched = self.jobs.watched();
        if let Some(streams) = watched.callers.get_mut(&self.caller) {
            *streams -= 1;
            if *streams == 0 {
                watched.callers.remove(&self.caller);
            }
        }
        if let Some((streams, _)) = watched.jobs.get_mut(&self.id) {
            *streams -= 1;
            if *streams == 0 {
                watched.jobs.remove(&self.id);
            }
        }
    }
}

/// Every `watch_poll`, reads the watched jobs and tells the streams of
/// those that changed (or went away). Ends when nothing is watched; the
/// next stream starts it again.
async fn poll(jobs: Jobs) {
    let mut tick = tokio::time::interval(jobs.settings().watch_poll);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tick.tick().await;
    loop {
        tick.tick().await;
        let ids: Vec<Uuid> = {
            let mut watched = jobs.watched();
            if watched.jobs.is_empty() {
                watched.poller = false;
                return;
            }
            watched.jobs.keys().copied().collect()
        };
        for chunk in ids.chunks(CHUNK) {
            let found = match store::get_many(jobs.db(), chunk).await {
                Ok(found) => found,
                Err(error) => {
                    tracing::warn!(error = %error, "reading watched jobs failed; trying again at the next tick");
                    break;
                }
            };
            let mut by_id: HashMap<Uuid, JobRecord> = found.into_iter().map(|job| (job.id, job)).collect();
            let changed: Vec<JobChange> = {
                let mut watched = jobs.watched();
                chunk
                    .iter()
                    .filter_map(|id| {
                        let (_, seen) = watched.jobs.get_mut(id)?;
                        let job = by_id.remove(id);
                        let now = job.as_ref().map(|job| job.updated_at);
                        (now != *seen).then(|| {
                            *seen = now;
                            JobChange { id: *id, job }
                        })
                    })
                    .collect()
            };
            for change in changed {
                let _ = jobs.inner.changes.send(Arc::new(change));
            }
        }
    }
}
