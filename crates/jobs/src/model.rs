//! The domain of jobs: states, a stored job, the error of one attempt.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

/// Where a job is in its life. `available` covers both "due now" and
/// "waiting for `run_at`" (a delay or a retry's backoff).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum JobState {
    Available,
    Running,
    Completed,
    Failed,
    Cancelled,
}

impl JobState {
    /// The stored spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            JobState::Available => "available",
            JobState::Running => "running",
            JobState::Completed => "completed",
            JobState::Failed => "failed",
            JobState::Cancelled => "cancelled",
        }
    }

    pub fn parse(value: &str) -> Option<JobState> {
        Some(match value {
            "available" => JobState::Available,
            "running" => JobState::Running,
            "completed" => JobState::Completed,
            "failed" => JobState::Failed,
            "cancelled" => JobState::Cancelled,
            _ => return None,
        })
    }

    /// No worker will touch it again.
    pub fn is_finished(self) -> bool {
        matches!(self, JobState::Completed | JobState::Failed | JobState::Cancelled)
    }
}

/// What went wrong in one attempt; a job keeps one per failed attempt.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AttemptError {
    pub attempt: u32,
    pub at: DateTime<Utc>,
    pub message: String,
}

/// A stored job.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JobRecord {
    pub id: Uuid,
    pub queue: String,
    pub kind: String,
    pub args: serde_json::Value,
    pub state: JobState,
    pub priority: i16,
    pub run_at: DateTime<Utc>,
    /// Attempts begun so far (the running one included), snoozes and
    /// shutdown hand-backs not counted: they give their attempt back.
    pub attempt: u32,
    pub max_attempts: u32,
    /// Set while running: the fence of every update the worker makes.
    pub lease_token: Option<Uuid>,
    pub leased_until: Option<DateTime<Utc>>,
    pub attempted_at: Option<DateTime<Utc>>,
    pub errors: Vec<AttemptError>,
    pub user_id: Option<Uuid>,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
    pub finished_at: Option<DateTime<Utc>>,
    /// This job's own run timeout; `None`: its kind's.
    pub timeout: Option<std::time::Duration>,
    /// How often it was snoozed (a snooze gives back its attempt).
    pub snoozes: u32,
    /// What the handler last reported.
    pub progress: Option<Progress>,
    /// What the handler set as its result, stored with the completion.
    pub result: Option<serde_json::Value>,
}

/// A handler's report of how far it got.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Progress {
    /// 0 to 100.
    pub percent: u8,
    pub message: String,
}

/// Every queue's statistics and the breakers its jobs call through.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct QueueOverview {
    pub queues: Vec<QueueStats>,
    pub breakers: Vec<BreakerStats>,
}

/// An outbound target's circuit breaker in this process, as now.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BreakerStats {
    pub target: String,
    /// `closed`, `open` or `half_open`.
    pub state: String,
    pub consecutive_failures: u32,
    pub opened_total: u64,
    pub rejected_total: u64,
    /// While open: how long until a trial is let through.
    pub half_open_in: Option<std::time::Duration>,
}

impl From<keel_kernel::outbound::BreakerSnapshot> for BreakerStats {
    fn from(snapshot: keel_kernel::outbound::BreakerSnapshot) -> Self {
        Self {
            target: snapshot.target.to_owned(),
            state: snapshot.state.as_str().to_owned(),
            consecutive_failures: snapshot.consecutive_failures,
            opened_total: snapshot.opened_total,
            rejected_total: snapshot.rejected_total,
            half_open_in: snapshot.half_open_in,
        }
    }
}

/// What a queue holds and does now (see `GetQueueStats`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct QueueStats {
    pub queue: String,
    /// Due now, waiting for a worker.
    pub available: u64,
    /// Every waiting job (due, delayed, backing off).
    pub depth: u64,
    /// Since the oldest due job became due.
    pub oldest_waiting: Option<std::time::Duration>,
    pub running: u64,
    pub failed: u64,
    pub completed_last_minute: u64,
    pub paused: bool,
}

/// A job a worker holds: its id, and the attempt and lease token that
/// fence what the worker may still write.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Lease {
    pub id: Uuid,
    pub attempt: u32,
    pub token: Uuid,
}

impl JobRecord {
    /// The lease of a running job.
    pub fn lease(&self) -> Option<Lease> {
        match (self.state, self.lease_token) {
            (JobState::Running, Some(token)) => Some(Lease {
                id: self.id,
                attempt: self.attempt,
                token,
            }),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn states_read_back_as_written() {
        for state in [
            JobState::Available,
            JobState::Running,
            JobState::Completed,
            JobState::Failed,
            JobState::Cancelled,
        ] {
            assert_eq!(JobState::parse(state.as_str()), Some(state));
        }
        assert_eq!(JobState::parse("stalled"), None);
    }
}
