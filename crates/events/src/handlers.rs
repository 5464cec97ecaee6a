//! Durable internal handlers: every matching committed event, in order, at
//! least once. Failures are retried with exponential backoff and jitter;
//! after the last attempt the event goes to the dead-letter table and the
//! handler moves on. One process runs a handler at a time (a lease with
//! fencing on the checkpoint).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use keel_kernel::backoff::Backoff;
use keel_kernel::{Code, Envelope, Error, EventHandler, Result, clock, id, topic_matches};
use sea_orm::DatabaseConnection;

use crate::hub::Hub;
use crate::model::DeadLetter;
use crate::store;

#[derive(Debug, Clone, Copy)]
pub struct Settings {
    pub max_attempts: u32,
    pub base_backoff: Duration,
    pub max_backoff: Duration,
    /// How long a runner's lease lasts without renewal.
    pub lease: Duration,
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            max_attempts: 5,
            base_backoff: Duration::from_millis(200),
            max_backoff: Duration::from_secs(30),
            lease: Duration::from_secs(30),
        }
    }
}

/// The registered handlers, by name.
#[derive(Clone, Default)]
pub struct Registry {
    handlers: HashMap<&'static str, Arc<dyn EventHandler>>,
}

impl Registry {
    pub fn add(&mut self, handler: Arc<dyn EventHandler>) {
        let previous = self.handlers.insert(handler.name(), handler);
        assert!(previous.is_none(), "two event handlers share a name");
    }

    pub fn get(&self, name: &str) -> Option<Arc<dyn EventHandler>> {
        self.handlers.get(name).cloned()
    }

    pub fn names(&self) -> Vec<&'static str> {
        self.handlers.keys().copied().collect()
    }

    /// Starts one runner per handler.
    pub fn spawn(
        &self,
        db: &DatabaseConnection,
        hub: &Arc<Hub>,
        settings: Settings,
    ) -> Vec<tokio::task::JoinHandle<()>> {
        let owner = format!("{}-{}", std::process::id(), id::new_id().simple());
        self.handlers
            .values()
            .map(|handler| {
                let runner = Runner {
                    db: db.clone(),
                    hub: hub.clone(),
                    handler: handler.clone(),
                    settings,
                    owner: owner.clone(),
                };
                tokio::spawn(runner.run())
            })
            .collect()
    }
}

struct Runner {
    db: DatabaseConnection,
    hub: Arc<Hub>,
    handler: Arc<dyn EventHandler>,
    settings: Settings,
    owner: String,
}

impl Runner {
    async fn run(self) {
        let (mut news, _) = self.hub.subscribe();
        loop {
            match self.round().await {
                Ok(true) => continue,
                Ok(false) => {}
                Err(error) => {
                    tracing::warn!(handler = self.handler.name(), error = %error, "event handler round failed")
                }
            }
            // Wait for news, or poll: a lease may have expired elsewhere.
            tokio::select! {
                _ = news.recv() => {}
                () = tokio::time::sleep(Duration::from_secs(1)) => {}
            }
        }
    }

    /// Handles one page of events; true when there may be more.
    ///
    /// The database work grows with the events the handler wants, not with
    /// all events: the lease is taken once per round, the page is filtered
    /// by topic in SQL, the checkpoint moves (renewing the lease in the same
    /// statement) after each handled event and once at the end of the page
    /// past the events the handler ignores.
    async fn round(&self) -> Result<bool> {
        const PAGE: u64 = 100;
        let name = self.handler.name();
        let now = clock::now();
        if !store::lease(&self.db, name, &self.owner, now, now + self.settings.lease).await? {
            return Ok(false);
        }
        let from = store::checkpoint(&self.db, name).await?.unwrap_or(0);
        // The hub delivered through `known`, so every event up to it is
        // committed and visible (numbering commits in sequence order): a
        // page that is not full covers everything through it.
        let known = self.hub.latest();
        if known <= from {
            return Ok(false);
        }
        let topics = self.handler.topics();
        let batch = store::read_matching(&self.db, from, Some(known), None, &topics, PAGE).await?;
        let full = batch.len() as u64 == PAGE;
        let through = match batch.last() {
            Some(last) if full => last.sequence,
            _ => known,
        };
        let mut checkpoint = from;
        for event in &batch {
            // Already filtered in SQL; the kernel's rule stays the definition.
            if !topics.iter().any(|topic| topic_matches(topic, &event.name)) {
                continue;
            }
            self.deliver(event).await?;
            if !self.advance(event.sequence).await? {
                // Lost the lease (a long retry): another process goes on.
                return Ok(false);
            }
            checkpoint = event.sequence;
        }
        if through > checkpoint && !self.advance(through).await? {
            return Ok(false);
        }
        Ok(full)
    }

    /// Moves the checkpoint to `sequence` and renews the lease; false when
    /// the lease was lost.
    async fn advance(&self, sequence: u64) -> Result<bool> {
        let now = clock::now();
        store::advance_checkpoint(
            &self.db,
            self.handler.name(),
            &self.owner,
            sequence,
            now,
            now + self.settings.lease,
        )
        .await
    }

    async fn deliver(&self, event: &Envelope) -> Result<()> {
        let mut attempt = 0;
        loop {
            attempt += 1;
            match self.handler.handle(event).await {
                Ok(()) => return Ok(()),
                Err(error) if attempt >= self.settings.max_attempts => {
                    tracing::error!(handler = self.handler.name(), event_id = %event.event_id, attempts = attempt, error = %error, "event dead-lettered");
                    return store::insert_dead_letter(
                        &self.db,
                        DeadLetter {
                            id: id::new_id(),
                            handler: self.handler.name().to_owned(),
                            event_id: event.event_id,
                            sequence: event.sequence,
                            user_id: event.user_id,
                            attempts: attempt,
                            last_error: error.to_string(),
                            failed_at: clock::now(),
                            replayed_at: None,
                        },
                    )
                    .await;
                }
                Err(error) => {
                    let delay = Backoff::new(self.settings.base_backoff, self.settings.max_backoff).delay(attempt);
                    tracing::warn!(handler = self.handler.name(), event_id = %event.event_id, attempt, retry_in_ms = delay.as_millis() as u64, error = %error, "event handler failed; retrying");
                    tokio::time::sleep(delay).await;
                }
            }
        }
    }
}

/// Runs a dead letter's handler on its event once more. Success marks the
/// letter replayed; failure keeps it, with the new error.
pub async fn replay(db: &DatabaseConnection, registry: &Registry, id: uuid::Uuid) -> Result<()> {
    let letter = store::find_dead_letter(db, id)
        .await?
        .ok_or_else(|| Error::not_found("dead letter"))?;
    if letter.replayed_at.is_some() {
        return Err(Error::new(
            Code::FailedPrecondition,
            "this dead letter was already replayed",
        ));
    }
    let handler = registry.get(&letter.handler).ok_or_else(|| {
        Error::new(
            Code::FailedPrecondition,
            format!("no handler named {:?} runs here", letter.handler),
        )
    })?;
    let event = store::find_by_event_id(db, letter.event_id)
        .await?
        .ok_or_else(|| Error::new(Code::FailedPrecondition, "the event is no longer retained"))?;
    match handler.handle(&event).await {
        Ok(()) => {
            store::mark_replayed(db, id, clock::now(), letter.attempts + 1).await?;
            tracing::info!(handler = letter.handler, event_id = %letter.event_id, "dead letter replayed");
            Ok(())
        }
        Err(error) => {
            store::record_replay_failure(db, id, &error.to_string(), letter.attempts + 1).await?;
            Err(Error::new(
                Code::FailedPrecondition,
                format!("the handler failed again: {}", error.message()),
            ))
        }
    }
}
