//! The per-process fan-out: one reader of the event table per process, not
//! one per subscriber. It delivers events to local subscribers strictly in
//! sequence order without gaps. Events come from two places only: this
//! process's relay (which just numbered them in its own transaction) and the
//! table. News from the transport is a hint to read the table, never an event
//! (see [`Hub::hint`]); the table is also polled, in case news never comes.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use keel_kernel::{Envelope, Result};
use sea_orm::DatabaseConnection;
use tokio::sync::{Mutex, broadcast};

use crate::store;

pub struct Hub {
    db: DatabaseConnection,
    sender: broadcast::Sender<Arc<Envelope>>,
    /// The last sequence delivered; guarded so deliveries never interleave.
    position: Mutex<u64>,
    /// The same, readable without waiting.
    delivered: AtomicU64,
    /// Live feeds ended because their subscriber fell too far behind.
    dropped_slow: AtomicU64,
    /// Durable handler runs of this process that failed and were retried.
    handler_retries: AtomicU64,
}

impl Hub {
    /// Starts at the newest committed event: subscribers replay older ones
    /// from the table themselves.
    pub async fn start(db: DatabaseConnection, buffer: usize) -> Result<Arc<Hub>> {
        let latest = store::latest_sequence(&db).await?;
        let (sender, _) = broadcast::channel(buffer.max(16));
        Ok(Arc::new(Hub {
            db,
            sender,
            position: Mutex::new(latest),
            delivered: AtomicU64::new(latest),
            dropped_slow: AtomicU64::new(0),
            handler_retries: AtomicU64::new(0),
        }))
    }

    /// Live feeds this process ended because their subscriber fell too far
    /// behind (`SUBSCRIBER_TOO_SLOW`), since it started.
    pub fn dropped_slow(&self) -> u64 {
        self.dropped_slow.load(Ordering::Relaxed)
    }

    pub(crate) fn count_dropped_slow(&self) {
        self.dropped_slow.fetch_add(1, Ordering::Relaxed);
    }

    /// Durable handler runs of this process that failed and were retried,
    /// since it started (the dead letters are in the table).
    pub fn handler_retries(&self) -> u64 {
        self.handler_retries.load(Ordering::Relaxed)
    }

    pub(crate) fn count_handler_retry(&self) {
        self.handler_retries.fetch_add(1, Ordering::Relaxed);
    }

    /// A live feed, and the position it starts after. Subscribe before
    /// replaying, so nothing falls between replay and live.
    pub fn subscribe(&self) -> (broadcast::Receiver<Arc<Envelope>>, u64) {
        let receiver = self.sender.subscribe();
        (receiver, self.delivered.load(Ordering::Acquire))
    }

    /// Open live feeds on this process.
    pub fn subscribers(&self) -> usize {
        self.sender.receiver_count()
    }

    pub(crate) fn db(&self) -> &DatabaseConnection {
        &self.db
    }

    pub fn latest(&self) -> u64 {
        self.delivered.load(Ordering::Acquire)
    }

    /// Events this process's relay just numbered: trusted as they are (they
    /// come from our own table, in our own transaction).
    pub async fn offer(&self, mut batch: Vec<Envelope>) {
        batch.sort_by_key(|event| event.sequence);
        let mut position = self.position.lock().await;
        for event in batch {
            if event.sequence <= *position {
                continue;
            }
            if event.sequence == *position + 1 {
                self.deliver(&mut position, event);
            } else if let Err(error) = self.catch_up(&mut position).await {
                tracing::warn!(error = %error, "event hub could not read the event table");
                return;
            }
        }
    }

    /// News from the transport: events are numbered through `through`.
    ///
    /// Redis is shared infrastructure, so what it says is checked against
    /// the table before anything is delivered. The cheapest sound check is
    /// to deliver nothing from the message at all: when it claims events past
    /// our position, read the table after the position (one indexed range
    /// read, the same the poll does, and what verifying each event id would
    /// cost anyway). A message about events we already have (our own relay's
    /// publish, a duplicate) costs no query; a false one costs one empty read.
    pub async fn hint(&self, through: u64) {
        if through <= self.latest() {
            return;
        }
        let mut position = self.position.lock().await;
        if through <= *position {
            return;
        }
        if let Err(error) = self.catch_up(&mut position).await {
            tracing::warn!(error = %error, "event hub could not read the event table");
        }
    }

    /// Reads whatever the table has past the position (the safety net).
    pub async fn poll(&self) {
        let mut position = self.position.lock().await;
        if let Err(error) = self.catch_up(&mut position).await {
            tracing::debug!(error = %error, "event hub poll failed");
        }
    }

    async fn catch_up(&self, position: &mut u64) -> Result<()> {
        loop {
            let batch = store::read_after(&self.db, *position, 1000).await?;
            if batch.is_empty() {
                return Ok(());
            }
            for event in batch {
                if event.sequence == *position + 1 {
                    self.deliver(position, event);
                } else {
                    // A hole in the numbering would be a bug in the relay:
                    // say so, and do not wait for it forever.
                    tracing::error!(
                        expected = *position + 1,
                        found = event.sequence,
                        "gap in event sequence"
                    );
                    self.deliver(position, event);
                }
            }
        }
    }

    fn deliver(&self, position: &mut u64, event: Envelope) {
        *position = event.sequence;
        self.delivered.store(event.sequence, Ordering::Release);
        // No receivers is fine: nobody is subscribed right now.
        let _ = self.sender.send(Arc::new(event));
    }

    /// Polls the table every `every` until the hub is dropped.
    pub fn spawn_poller(self: &Arc<Self>, every: Duration) -> tokio::task::JoinHandle<()> {
        let weak = Arc::downgrade(self);
        tokio::spawn(async move {
            let mut ticker = tokio::time::interval(every);
            ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                ticker.tick().await;
                let Some(hub) = weak.upgrade() else { break };
                hub.poll().await;
            }
        })
    }
}
