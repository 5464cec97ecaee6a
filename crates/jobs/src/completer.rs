//! Batched completion: the successful runs of a process are written many at
//! a time, one fenced statement for the batch ([`store::complete_many`]),
//! instead of a statement and a commit per job.
//!
//! A worker hands its lease over and waits for the answer (completed, or
//! the lease was lost); its slot stays taken until then, so a job is never
//! fetched again by this process before its completion is written, and the
//! number waiting is bounded by the process's concurrency. The writer is a
//! group commit: it takes whatever has arrived (at most [`MAX_BATCH`]),
//! writes it, answers, and takes the next lot. It never waits for a batch
//! to fill: an idle queue's completion is written at once, and under load
//! the batch is what arrived while the previous one was being written.
//!
//! The writer lives as long as the [`crate::Jobs`] that made it (it stops
//! when the last handle is dropped), not as a background task: a shutdown
//! that stops the workers still gets the outcomes of the runs that finish.

use chrono::{DateTime, Utc};
use keel_kernel::{Error, Result};
use sea_orm::DatabaseConnection;
use tokio::sync::{mpsc, oneshot};

use crate::model::Lease;
use crate::{Jobs, store};

/// The most completions one statement writes (4 array parameters of this
/// many items; PostgreSQL parses them in a fraction of a millisecond).
pub(crate) const MAX_BATCH: usize = 1000;

struct Done {
    lease: Lease,
    at: DateTime<Utc>,
    reply: oneshot::Sender<Result<bool>>,
}

pub(crate) struct Completer {
    // Unbounded, yet bounded in fact: every sender waits for its answer.
    sender: mpsc::UnboundedSender<Done>,
}

impl Completer {
    /// Starts the writer on `db`. Needs a tokio runtime.
    pub(crate) fn start(db: DatabaseConnection) -> Self {
        let (sender, receiver) = mpsc::unbounded_channel();
        tokio::spawn(write_batches(db, receiver));
        Self { sender }
    }

    /// Marks the job completed at `at`, fenced on its lease like
    /// [`store::complete`]: false (and nothing changed) when the worker no
    /// longer holds it.
    pub(crate) async fn complete(&self, lease: Lease, at: DateTime<Utc>) -> Result<bool> {
        let (reply, answer) = oneshot::channel();
        self.sender
            .send(Done { lease, at, reply })
            .map_err(|_| Error::unavailable("the job completer has stopped"))?;
        answer
            .await
            .map_err(|_| Error::unavailable("the job completer stopped before writing"))?
    }
}

impl Jobs {
    /// Marks a finished run's job completed (fenced on its lease): through
    /// the completer, or alone when batching is off.
    pub(crate) async fn complete(&self, lease: Lease, at: DateTime<Utc>) -> Result<bool> {
        if self.settings().batch_completion {
            self.inner.completer.complete(lease, at).await
        } else {
            store::complete(self.db(), &lease, at).await
        }
    }
}

async fn write_batches(db: DatabaseConnection, mut receiver: mpsc::UnboundedReceiver<Done>) {
    let mut batch = Vec::with_capacity(MAX_BATCH);
    while receiver.recv_many(&mut batch, MAX_BATCH).await > 0 {
        let done: Vec<_> = batch.iter().map(|item| (item.lease, item.at)).collect();
        match store::complete_many(&db, &done).await {
            Ok(completed) => {
                for (item, written) in batch.drain(..).zip(completed) {
                    let _ = item.reply.send(Ok(written));
                }
            }
            Err(error) => {
                // Nothing of the batch was written (one statement, or one
                // transaction): each worker logs it and its lease expires.
                tracing::warn!(error = %error, jobs = batch.len(), "writing a batch of job completions failed");
                for item in batch.drain(..) {
                    let _ = item.reply.send(Err(Error::new(error.code(), error.to_string())));
                }
            }
        }
    }
}
