//! The relay: numbers committed outbox rows and announces them. It runs in
//! every keel process; the table's advisory lock makes them take turns, so
//! an event is numbered once, in order.

use std::sync::{Arc, Weak};
use std::time::Duration;

use async_trait::async_trait;
use keel_kernel::{Outbox, PendingEvent, Result, clock};
use sea_orm::{DatabaseConnection, DatabaseTransaction};
use tokio::sync::Notify;

use crate::hub::Hub;
use crate::store;
use crate::transport::Transport;

pub struct Relay {
    db: DatabaseConnection,
    transport: Arc<dyn Transport>,
    // This process's subscribers hear of an event without the transport's
    // round trip; other processes through it.
    local: Weak<Hub>,
    /// PostgreSQL: the channel numbering notifies in its transaction (see
    /// [`store::assign_sequences`]), which every process's hub listens to.
    notify: Option<String>,
    wake: Notify,
}

impl Relay {
    pub fn new(
        db: DatabaseConnection,
        transport: Arc<dyn Transport>,
        local: &Arc<Hub>,
        notify: Option<String>,
    ) -> Arc<Relay> {
        Arc::new(Relay {
            db,
            transport,
            local: Arc::downgrade(local),
            notify,
            wake: Notify::new(),
        })
    }

    /// Numbers and publishes everything pending; returns how many.
    pub async fn run_once(&self) -> Result<usize> {
        let mut total = 0;
        loop {
            let batch = store::assign_sequences(&self.db, 500, clock::now(), self.notify.as_deref()).await?;
            if batch.is_empty() {
                return Ok(total);
            }
            total += batch.len();
            // One span per traced event, in its call's trace, for as long
            // as the batch takes to publish.
            let publishing: Vec<tracing::Span> = batch.iter().filter_map(publish_span).collect();
            if let Some(hub) = self.local.upgrade() {
                hub.offer(batch.clone()).await;
            }
            self.transport.publish(&batch).await;
            drop(publishing);
        }
    }

    /// Runs on every commit with events in this process, and every `every`
    /// when given (rows another process committed and then crashed before
    /// numbering; the next commit anywhere numbers them too). Other
    /// processes' commits do not wake it: their own relay numbers them.
    /// What was pending at start, [`crate::Events::start`] numbered before
    /// spawning it.
    pub fn spawn(self: &Arc<Self>, every: Option<Duration>) -> tokio::task::JoinHandle<()> {
        let relay = self.clone();
        tokio::spawn(async move {
            loop {
                match every {
                    Some(every) => tokio::select! {
                        () = relay.wake.notified() => {}
                        () = tokio::time::sleep(every) => {}
                    },
                    None => relay.wake.notified().await,
                }
                while let Err(error) = relay.run_once().await {
                    tracing::warn!(error = %error, "event relay failed; retrying");
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
            }
        })
    }
}

/// The relay's span for `event`, a child of the span that recorded it;
/// none for an event recorded while nothing was traced.
fn publish_span(event: &keel_kernel::Envelope) -> Option<tracing::Span> {
    let parent = event.trace_context.as_deref()?;
    let name = format!("publish {}", event.name);
    let span = tracing::info_span!(
        "events.publish",
        otel.name = name.as_str(),
        otel.kind = "producer",
        messaging.system = "keel",
        messaging.operation.type = "send",
        messaging.destination.name = event.name.as_str(),
        messaging.message.id = %event.event_id,
        keel.event.sequence = event.sequence,
    );
    keel_kernel::trace::continue_from(&span, Some(parent));
    // Started now (an OpenTelemetry span starts when first entered).
    span.in_scope(|| {});
    Some(span)
}

/// The outbox the command bus writes to: the event table, in the command's
/// transaction.
pub struct TableOutbox {
    relay: Arc<Relay>,
}

impl TableOutbox {
    pub fn new(relay: Arc<Relay>) -> Self {
        Self { relay }
    }
}

#[async_trait]
impl Outbox for TableOutbox {
    async fn write(&self, tx: &DatabaseTransaction, events: &[PendingEvent]) -> Result<()> {
        store::insert_pending(tx, events).await
    }

    fn committed(&self) {
        self.relay.wake.notify_one();
    }
}
