//! Domain events: what a command handler records, and the port through which
//! the bus writes them to the outbox in the command's own transaction.
//!
//! An event is published if and only if its change committed: the outbox
//! row and the state change share one transaction; a relay publishes
//! committed rows afterwards.

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use sea_orm::DatabaseTransaction;
use uuid::Uuid;

use crate::error::Result;

/// A payload of `proto/keel/<module>/v1/events.proto`, with its name.
pub trait DomainEvent {
    /// `<module>.<aggregate>.<what happened>`, e.g. `identity.user.registered`.
    const NAME: &'static str;
    /// The payload's schema version.
    const VERSION: &'static str = "1.0";
    /// The payload's full protobuf name, e.g. `keel.identity.v1.UserRegistered`.
    const PAYLOAD_TYPE: &'static str;
    /// Security-relevant: listed in the admins' audit log.
    const AUDITED: bool = false;

    /// The payload's protobuf encoding.
    fn encode_payload(&self) -> Vec<u8>;
}

/// An event recorded by a handler, not yet committed.
#[derive(Debug, Clone, PartialEq)]
pub struct PendingEvent {
    pub event_id: Uuid,
    pub name: &'static str,
    pub version: &'static str,
    pub occurred_at: DateTime<Utc>,
    /// Whose event it is; `None` for events of no user (only admins see them).
    pub user_id: Option<Uuid>,
    pub aggregate_id: String,
    pub payload_type: &'static str,
    pub payload: Vec<u8>,
    pub idempotency_key: Option<String>,
    pub audited: bool,
    /// The W3C `traceparent` of the span that recorded it, when traced.
    pub trace_context: Option<String>,
}

impl PendingEvent {
    pub fn new<E: DomainEvent>(payload: &E, user_id: Option<Uuid>, aggregate_id: impl Into<String>) -> Self {
        Self {
            event_id: crate::id::new_id(),
            name: E::NAME,
            version: E::VERSION,
            occurred_at: crate::clock::now(),
            user_id,
            aggregate_id: aggregate_id.into(),
            payload_type: E::PAYLOAD_TYPE,
            payload: payload.encode_payload(),
            idempotency_key: None,
            audited: E::AUDITED,
            trace_context: crate::trace::traceparent(&tracing::Span::current()),
        }
    }
}

/// Where the bus writes a command's events, inside its transaction.
#[async_trait]
pub trait Outbox: Send + Sync + 'static {
    async fn write(&self, tx: &DatabaseTransaction, events: &[PendingEvent]) -> Result<()>;

    /// Called after a transaction with events committed: wake the relay.
    fn committed(&self);
}

/// A committed event with its sequence: what subscribers and handlers see.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Envelope {
    pub event_id: Uuid,
    pub name: String,
    pub version: String,
    pub occurred_at: DateTime<Utc>,
    /// Monotonic, one per committed event, without gaps.
    pub sequence: u64,
    pub user_id: Option<Uuid>,
    pub aggregate_id: String,
    pub payload_type: String,
    pub payload: Vec<u8>,
    pub idempotency_key: Option<String>,
    /// The W3C `traceparent` of the span that recorded it, when traced:
    /// the relay's publish and each handler's run continue that trace.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub trace_context: Option<String>,
}

impl Envelope {
    /// The payload as `M`, when it is of `payload_type`.
    pub fn payload<M: prost::Message + Default>(&self, payload_type: &str) -> Option<M> {
        (self.payload_type == payload_type)
            .then(|| M::decode(self.payload.as_slice()).ok())
            .flatten()
    }
}

/// True when `name` matches `topic`: exactly, or by a trailing wildcard
/// (`identity.*` matches `identity.user.registered`; `*` matches all).
pub fn topic_matches(topic: &str, name: &str) -> bool {
    match topic.strip_suffix('*') {
        Some(prefix) => name.starts_with(prefix),
        None => topic == name,
    }
}

/// A durable internal handler: delivered every matching committed event at
/// least once, in sequence order, with retries and a dead-letter table.
/// It must be idempotent by `event_id`.
#[async_trait]
pub trait EventHandler: Send + Sync + 'static {
    /// Stable: checkpoints and dead letters are kept under it.
    fn name(&self) -> &'static str;
    /// Event names, exact or with a trailing wildcard.
    fn topics(&self) -> Vec<&'static str>;
    async fn handle(&self, event: &Envelope) -> Result<()>;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn topics_match_exactly_or_by_trailing_wildcard() {
        assert!(topic_matches("identity.*", "identity.user.registered"));
        assert!(topic_matches("*", "market.order.paid"));
        assert!(topic_matches("identity.user.registered", "identity.user.registered"));
        assert!(!topic_matches("identity.user", "identity.user.registered"));
        assert!(!topic_matches("market.*", "identity.user.registered"));
    }
}
