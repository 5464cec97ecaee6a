//! The one retry / dead-letter decision of everything that retries durable
//! work: the events module's durable handlers and the jobs module's
//! workers. Each keeps its own storage (a handler's dead-letter row, a
//! job's `failed` state); what they share is the rule that decides, after
//! a failed attempt, whether and when to try again, and the record of the
//! failure they keep.
//!
//! The decision takes `now` rather than reading the clock, so a test can
//! state exactly when a retry falls due.

use std::time::Duration;

use chrono::{DateTime, Utc};

use crate::backoff::Backoff;
use crate::error::Error;

/// How often and how patiently to try: a backoff schedule and a number of
/// attempts in all, the first included.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetryPolicy {
    pub backoff: Backoff,
    /// At least 1: a policy of 0 attempts is read as 1 (the attempt that
    /// failed was made).
    pub max_attempts: u32,
}

/// One failed attempt, as kept by whoever keeps failures (a job's error
/// list, a dead letter's last error).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AttemptFailure {
    /// 1 for the first attempt.
    pub attempt: u32,
    pub at: DateTime<Utc>,
    pub message: String,
}

/// What to do after a failed attempt.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// Try again at `at` (`delay` after the failure).
    Retry {
        at: DateTime<Utc>,
        delay: Duration,
        failure: AttemptFailure,
    },
    /// No more attempts: dead-letter the event, fail the job.
    GiveUp { failure: AttemptFailure },
}

impl Decision {
    /// The failure the decision was made on, to record either way.
    pub fn failure(&self) -> &AttemptFailure {
        match self {
            Decision::Retry { failure, .. } | Decision::GiveUp { failure } => failure,
        }
    }

    pub fn into_failure(self) -> AttemptFailure {
        match self {
            Decision::Retry { failure, .. } | Decision::GiveUp { failure } => failure,
        }
    }
}

impl RetryPolicy {
    pub const fn new(backoff: Backoff, max_attempts: u32) -> Self {
        Self { backoff, max_attempts }
    }

    /// The decision after attempt `attempt` (1-based) failed at `now` with
    /// `error`. `retryable: false` is an error that says no retry can mend
    /// it (bad arguments, a refused request): it gives up at once, whatever
    /// attempts remain.
    pub fn decide(&self, attempt: u32, error: &Error, retryable: bool, now: DateTime<Utc>) -> Decision {
        let failure = AttemptFailure {
            attempt,
            at: now,
            message: error.to_string(),
        };
        if !retryable || attempt >= self.max_attempts.max(1) {
            return Decision::GiveUp { failure };
        }
        let delay = self.backoff.delay(attempt);
        // A delay too long for chrono is an hour, still far in the future.
        let at = now + chrono::Duration::from_std(delay).unwrap_or(chrono::Duration::hours(1));
        Decision::Retry { at, delay, failure }
    }
}
