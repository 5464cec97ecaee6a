//! The domain types of the events module (the envelope itself is the
//! kernel's): what `store.rs` maps rows to and the API hands out.

use chrono::{DateTime, Utc};
use keel_kernel::Envelope;
use serde::{Deserialize, Serialize};
use uuid::Uuid;

/// An event a durable handler gave up on after its last attempt.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeadLetter {
    pub id: Uuid,
    /// The handler's name.
    pub handler: String,
    pub event_id: Uuid,
    pub sequence: u64,
    /// The event's owner.
    pub user_id: Option<Uuid>,
    pub attempts: u32,
    pub last_error: String,
    pub failed_at: DateTime<Utc>,
    /// When an admin's replay succeeded.
    pub replayed_at: Option<DateTime<Utc>>,
}

/// A dead letter with its event, while the event is retained.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ListedDeadLetter {
    pub letter: DeadLetter,
    pub event: Option<Envelope>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_listed_dead_letter_survives_a_json_round_trip() {
        let event = Envelope {
            event_id: Uuid::now_v7(),
            name: "test.note.added".into(),
            version: "1.0".into(),
            occurred_at: Utc::now(),
            sequence: 7,
            user_id: Some(Uuid::now_v7()),
            aggregate_id: "note".into(),
            payload_type: "google.protobuf.StringValue".into(),
            payload: vec![1, 2, 3],
            idempotency_key: None,
            trace_context: Some("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01".into()),
        };
        let listed = ListedDeadLetter {
            letter: DeadLetter {
                id: Uuid::now_v7(),
                handler: "test.flaky".into(),
                event_id: event.event_id,
                sequence: 7,
                user_id: event.user_id,
                attempts: 3,
                last_error: "down".into(),
                failed_at: Utc::now(),
                replayed_at: None,
            },
            event: Some(event),
        };
        let json = serde_json::to_string(&listed).expect("serializes");
        assert_eq!(
            serde_json::from_str::<ListedDeadLetter>(&json).expect("deserializes"),
            listed
        );
    }
}

/// A stream ticket as stored: its hash stays in the store.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StreamTicket {
    pub id: Uuid,
    pub user_id: Uuid,
    pub session_id: Uuid,
    /// The first stream must open before this.
    pub first_use_by: DateTime<Utc>,
    /// Reconnects are accepted until this; the stream ends then.
    pub valid_until: DateTime<Utc>,
    pub first_used_at: Option<DateTime<Utc>>,
    /// A stream holds the ticket, while `held_until` has not passed.
    pub live: bool,
    /// The hold's lease: renewed by the holding stream, it lapses when the
    /// holder's process dies, and a reconnect may then take the ticket over.
    pub held_until: Option<DateTime<Utc>>,
    pub version: i32,
    pub created_at: DateTime<Utc>,
}
