//! How committed events reach every keel process: in process (one keel), or
//! Redis pub/sub through fred (several). The transport only carries news;
//! the event table stays the truth, so a lost message (Redis down, a
//! reconnect) costs latency, never an event: hubs also poll the table.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use base64::Engine;
use fred::clients::SubscriberClient;
use fred::prelude::*;
use keel_kernel::Envelope;
use serde::{Deserialize, Serialize};

use crate::hub::Hub;

#[async_trait]
pub trait Transport: Send + Sync + 'static {
    /// Tells every process's hub about newly numbered events. Best effort.
    async fn publish(&self, events: &[Envelope]);
}

/// One process: the relay already handed the events to the local hub;
/// there is nobody else to tell.
pub struct InProcess;

#[async_trait]
impl Transport for InProcess {
    async fn publish(&self, _events: &[Envelope]) {}
}

pub const CHANNEL: &str = "keel:events";

/// The JSON form of an event envelope, as it travels through Redis.
#[derive(Debug, Serialize, Deserialize)]
pub struct EnvelopeJson {
    pub event_id: uuid::Uuid,
    pub event_name: String,
    pub event_version: String,
    pub occurred_at: chrono::DateTime<chrono::Utc>,
    pub sequence: u64,
    pub user_id: Option<uuid::Uuid>,
    pub aggregate_id: String,
    pub payload_type: String,
    /// The protobuf payload, base64.
    pub payload: String,
    pub idempotency_key: Option<String>,
}

impl From<&Envelope> for EnvelopeJson {
    fn from(event: &Envelope) -> Self {
        Self {
            event_id: event.event_id,
            event_name: event.name.clone(),
            event_version: event.version.clone(),
            occurred_at: event.occurred_at,
            sequence: event.sequence,
            user_id: event.user_id,
            aggregate_id: event.aggregate_id.clone(),
            payload_type: event.payload_type.clone(),
            payload: base64::engine::general_purpose::STANDARD.encode(&event.payload),
            idempotency_key: event.idempotency_key.clone(),
        }
    }
}

impl EnvelopeJson {
    pub fn into_envelope(self) -> Option<Envelope> {
        Some(Envelope {
            event_id: self.event_id,
            name: self.event_name,
            version: self.event_version,
            occurred_at: self.occurred_at,
            sequence: self.sequence,
            user_id: self.user_id,
            aggregate_id: self.aggregate_id,
            payload_type: self.payload_type,
            payload: base64::engine::general_purpose::STANDARD.decode(self.payload).ok()?,
            idempotency_key: self.idempotency_key,
        })
    }
}

/// Redis pub/sub: a publishing client and a subscriber that feeds the local
/// hub. Both reconnect forever; the subscriber re-subscribes on reconnect.
pub struct Redis {
    publisher: Client,
    _subscriber: SubscriberClient,
    tasks: Vec<tokio::task::AbortHandle>,
}

impl Drop for Redis {
    fn drop(&mut self) {
        for task in &self.tasks {
            task.abort();
        }
    }
}

impl Redis {
    pub async fn connect(url: &str, hub: &Arc<Hub>) -> Result<Redis, Error> {
        let config = Config::from_url(url)?;
        let policy = ReconnectPolicy::new_exponential(0, 50, 1000, 2);
        let connection = |config: &mut ConnectionConfig| {
            config.connection_timeout = Duration::from_secs(2);
            config.internal_command_timeout = Duration::from_secs(2);
        };
        let publisher = Builder::from_config(config.clone())
            .with_connection_config(connection)
            .set_policy(policy.clone())
            .build()?;
        let subscriber = Builder::from_config(config)
            .with_connection_config(connection)
            .with_performance_config(|performance| performance.broadcast_channel_capacity = 4096)
            .set_policy(policy)
            .build_subscriber_client()?;
        // Connect in the background: keel starts, and commits, while Redis is down.
        // Every task is aborted when the transport is dropped.
        let mut tasks = vec![
            publisher.connect().abort_handle(),
            subscriber.connect().abort_handle(),
            subscriber.manage_subscriptions().abort_handle(),
        ];
        let mut messages = subscriber.message_rx();
        let weak = Arc::downgrade(hub);
        tasks.push(
            tokio::spawn(async move {
                while let Ok(message) = messages.recv().await {
                    let Some(hub) = weak.upgrade() else { break };
                    let Ok(text) = message.value.convert::<String>() else {
                        continue;
                    };
                    match serde_json::from_str::<Vec<EnvelopeJson>>(&text) {
                        Ok(batch) => {
                            hub.offer(batch.into_iter().filter_map(EnvelopeJson::into_envelope).collect())
                                .await
                        }
                        Err(error) => tracing::warn!(error = %error, "unreadable event message from redis"),
                    }
                }
            })
            .abort_handle(),
        );
        let subscribing = subscriber.clone();
        tasks.push(
            tokio::spawn(async move {
                // Until Redis answers, subscribe keeps failing; the tracked
                // channel is re-subscribed on every reconnect after that.
                loop {
                    match subscribing.subscribe(CHANNEL).await {
                        Ok(()) => break,
                        Err(error) => {
                            tracing::debug!(error = %error, "redis subscribe failed; retrying");
                            tokio::time::sleep(Duration::from_millis(500)).await;
                        }
                    }
                }
            })
            .abort_handle(),
        );
        Ok(Redis {
            publisher,
            _subscriber: subscriber,
            tasks,
        })
    }
}

#[async_trait]
impl Transport for Redis {
    async fn publish(&self, events: &[Envelope]) {
        let batch: Vec<EnvelopeJson> = events.iter().map(EnvelopeJson::from).collect();
        let Ok(text) = serde_json::to_string(&batch) else {
            return;
        };
        // Bounded: while Redis is away the hubs' polling carries the events.
        let published = tokio::time::timeout(
            Duration::from_millis(500),
            self.publisher.publish::<(), _, _>(CHANNEL, text),
        )
        .await;
        match published {
            Ok(Ok(())) => {}
            Ok(Err(error)) => tracing::debug!(error = %error, "redis publish failed; subscribers will poll"),
            Err(_) => tracing::debug!("redis publish timed out; subscribers will poll"),
        }
    }
}
