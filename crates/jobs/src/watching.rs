//! The jobs `WatchJob` streams of this process watch, read for changes by
//! one poller: a query per tick for every watched job (in chunks), not one
//! per stream. Each watched job has a channel of its own holding its latest
//! row, which its streams read: a stream hears only its job, and a slow one
//! skips to the latest row rather than falling behind. Changes this
//! process makes arrive at once through [`Jobs::publish`] (which reads
//! nothing for a job nobody here watches); the poller brings other
//! processes' within a tick. A caller may hold only so many streams at
//! once.

use std::collections::HashMap;
use std::sync::Arc;

use chrono::{DateTime, Utc};
use keel_kernel::{Code, Error, Result};
use tokio::sync::watch;
use uuid::Uuid;

use crate::{JobRecord, Jobs, store};

/// A watched job's latest row: `None` once it was deleted.
pub(crate) type Latest = Option<Arc<Option<JobRecord>>>;

/// The jobs this process watches.
#[derive(Default)]
pub(crate) struct Watched {
    jobs: HashMap<Uuid, WatchedJob>,
    /// Streams per caller (`None`: trusted callers without a user).
    callers: HashMap<Option<Uuid>, usize>,
    /// Whether a poller runs.
    poller: bool,
}

struct WatchedJob {
    streams: usize,
    /// The `updated_at` last told (`Some(None)`: deleted; `None`: nothing
    /// told yet).
    seen: Option<Option<DateTime<Utc>>>,
    latest: watch::Sender<Latest>,
}

/// The most jobs one poll reads in a statement.
const CHUNK: usize = 500;

/// Holds a stream's place and hears its job's changes: dropped, the job
/// and the caller count one stream fewer.
pub(crate) struct Watching {
    jobs: Jobs,
    id: Uuid,
    caller: Option<Uuid>,
    pub(crate) changes: watch::Receiver<Latest>,
}

impl Jobs {
    /// Registers a stream of `caller` on job `id`, before the stream's first
    /// read of it (so no change in between is missed); RESOURCE_EXHAUSTED
    /// when the caller holds `Settings::watch_per_caller` streams already.
    pub(crate) fn start_watching(&self, id: Uuid, caller: Option<Uuid>) -> Result<Watching> {
        let limit = self.settings().watch_per_caller;
        let (changes, start_poller) = {
            let mut watched = self.watched();
            let streams = watched.callers.entry(caller).or_default();
            if *streams >= limit {
                return Err(Error::new(
                    Code::ResourceExhausted,
                    format!("at most {limit} job watches at once per caller; close one first"),
                ));
            }
            *streams += 1;
            let job = watched.jobs.entry(id).or_insert_with(|| WatchedJob {
                streams: 0,
                seen: None,
                latest: watch::Sender::new(None),
            });
            job.streams += 1;
            let changes = job.latest.subscribe();
            (changes, !std::mem::replace(&mut watched.poller, true))
        };
        if start_poller {
            let running = PollerRunning {
                jobs: self.clone(),
                armed: true,
            };
            tokio::spawn(poll(running));
        }
        Ok(Watching {
            jobs: self.clone(),
            id,
            caller,
            changes,
        })
    }

    /// Tells this process's streams on `id` that it changed: reads it once,
    /// and only if one watches it (the hot path pays nothing).
    pub(crate) async fn publish(&self, id: Uuid) {
        if !self.watched().jobs.contains_key(&id) {
            return;
        }
        match store::get(self.db(), id).await {
            Ok(job) => self.tell(id, job),
            Err(error) => {
                tracing::debug!(job_id = %id, error = %error, "reading a changed job for its watchers failed")
            }
        }
    }

    /// Hands `job` (as read now) to the streams on `id`, unless it is what
    /// they were last told.
    fn tell(&self, id: Uuid, job: Option<JobRecord>) {
        let mut watched = self.watched();
        let Some(watched) = watched.jobs.get_mut(&id) else {
            return;
        };
        let now = Some(job.as_ref().map(|job| job.updated_at));
        if now == watched.seen {
            return;
        }
        watched.seen = now;
        watched.latest.send_replace(Some(Arc::new(job)));
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
        if let Some(job) = watched.jobs.get_mut(&self.id) {
            job.streams -= 1;
            if job.streams == 0 {
                watched.jobs.remove(&self.id);
            }
        }
    }
}

/// The poller's claim on `Watched::poller`: released as it stops, and
/// also if it panics, so the next stream starts a new one.
struct PollerRunning {
    jobs: Jobs,
    armed: bool,
}

impl Drop for PollerRunning {
    fn drop(&mut self) {
        if self.armed {
            self.jobs.watched().poller = false;
        }
    }
}

/// Every `watch_poll`, reads the watched jobs and tells the streams of
/// those that changed (or went away). Ends when nothing is watched; the
/// next stream starts it again.
async fn poll(mut running: PollerRunning) {
    let jobs = running.jobs.clone();
    let mut tick = tokio::time::interval(jobs.settings().watch_poll);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tick.tick().await;
    loop {
        tick.tick().await;
        let ids: Vec<Uuid> = {
            let mut watched = jobs.watched();
            if watched.jobs.is_empty() {
                // Released under the lock that a new stream takes to see it.
                watched.poller = false;
                running.armed = false;
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
            for id in chunk {
                jobs.tell(*id, by_id.remove(id));
            }
        }
    }
}
