//! Durable internal handlers: every matching committed event, in order, at
//! least once. Failures are retried with exponential backoff and jitter;
//! after the last attempt the event goes to the dead-letter table and the
//! handler moves on. Whether and when to retry is the kernel's
//! [`RetryPolicy`], the decision jobs take too. One process runs a handler
//! at a time (a lease with fencing on the checkpoint).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use keel_kernel::backoff::Backoff;
use keel_kernel::retry::{Decision, RetryPolicy};
use keel_kernel::{Code, Envelope, Error, EventHandler, Result, clock, id, topic_matches};
use sea_orm::DatabaseConnection;
use tokio::sync::broadcast;
use tracing::Instrument;

use crate::hub::Hub;
use crate::model::DeadLetter;
use crate::store::{self, ReplayOutcome};

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

impl Settings {
    /// The kernel's retry / dead-letter decision with these numbers.
    pub fn retry_policy(&self) -> RetryPolicy {
        RetryPolicy::new(Backoff::new(self.base_backoff, self.max_backoff), self.max_attempts)
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

/// How a round ended.
enum Round {
    /// A full page was handled: there may be more.
    More,
    /// Caught up through everything the hub delivered.
    Idle,
    /// Another process holds the lease, until about then.
    Elsewhere(chrono::DateTime<chrono::Utc>),
}

impl Runner {
    /// Rounds run when news of a matching event arrives, and every `lease`
    /// (to move the checkpoint past events the handler ignores). Idle, a
    /// runner costs the database nothing: it knows its checkpoint while it
    /// holds the lease, and renews the lease only when there is work (an
    /// expired lease is taken again then, or by another process). A runner
    /// that finds the lease held elsewhere sleeps until it expires, so a
    /// crashed holder is replaced within one lease.
    async fn run(self) {
        let (mut news, _) = self.hub.subscribe();
        let topics = self.handler.topics();
        // The checkpoint, known while this runner holds the lease.
        let mut checkpoint = None;
        let mut due = true;
        // Not reset by news: ignored events alone still move the checkpoint.
        let mut sweep = tokio::time::interval(self.settings.lease);
        sweep.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            if due {
                match self.round(&mut checkpoint).await {
                    Ok(Round::More) => continue,
                    Ok(Round::Idle) => {}
                    Ok(Round::Elsewhere(until)) => {
                        checkpoint = None;
                        let left = (until - clock::now()).to_std().unwrap_or_default();
                        tokio::time::sleep(left.clamp(Duration::from_millis(100), self.settings.lease)).await;
                        continue;
                    }
                    Err(error) => {
                        checkpoint = None;
                        tracing::warn!(handler = self.handler.name(), error = %error, "event handler round failed");
                        tokio::time::sleep(Duration::from_secs(1)).await;
                        continue;
                    }
                }
            }
            due = tokio::select! {
                received = news.recv() => match received {
                    Ok(event) => topics.iter().any(|topic| topic_matches(topic, &event.name)),
                    // Missed some: perhaps matching ones.
                    Err(broadcast::error::RecvError::Lagged(_)) => true,
                    Err(broadcast::error::RecvError::Closed) => return,
                },
                _ = sweep.tick() => true,
            };
        }
    }

    /// Handles one page of events.
    ///
    /// The database work grows with the events the handler wants, not with
    /// all events, and is nothing when there is nothing new: the lease is
    /// taken once per round, only when the hub has delivered past the
    /// checkpoint, the page is filtered by topic in SQL, the checkpoint
    /// moves (renewing the lease in the same statement) after each handled
    /// event and once at the end of the page past the events it ignores.
    async fn round(&self, checkpoint: &mut Option<u64>) -> Result<Round> {
        const PAGE: u64 = 100;
        // The hub delivered through `known`, so every event up to it is
        // committed and visible (numbering commits in sequence order): a
        // page that is not full covers everything through it.
        let known = self.hub.latest();
        if checkpoint.is_some_and(|checkpoint| known <= checkpoint) {
            return Ok(Round::Idle);
        }
        let name = self.handler.name();
        let now = clock::now();
        if let store::Lease::HeldUntil(until) =
            store::lease(&self.db, name, &self.owner, now, now + self.settings.lease).await?
        {
            return Ok(Round::Elsewhere(until));
        }
        let from = store::checkpoint(&self.db, name).await?.unwrap_or(0);
        *checkpoint = Some(from);
        if known <= from {
            return Ok(Round::Idle);
        }
        let topics = self.handler.topics();
        let batch = store::read_matching(&self.db, from, Some(known), None, &topics, PAGE).await?;
        let full = batch.len() as u64 == PAGE;
        let through = match batch.last() {
            Some(last) if full => last.sequence,
            _ => known,
        };
        for event in &batch {
            // Already filtered in SQL; the kernel's rule stays the definition.
            if !topics.iter().any(|topic| topic_matches(topic, &event.name)) {
                continue;
            }
            self.deliver(event).await?;
            if !self.advance(event.sequence).await? {
                // Lost the lease (a long retry): another process goes on.
                return Ok(Round::Elsewhere(clock::now() + self.settings.lease));
            }
            *checkpoint = Some(event.sequence);
        }
        if through > checkpoint.unwrap_or(from) {
            if !self.advance(through).await? {
                return Ok(Round::Elsewhere(clock::now() + self.settings.lease));
            }
            *checkpoint = Some(through);
        }
        Ok(if full { Round::More } else { Round::Idle })
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

    /// Runs the handler on `event`, in a span of the trace that recorded
    /// the event when it was traced (whichever process recorded it).
    async fn deliver(&self, event: &Envelope) -> Result<()> {
        let Some(parent) = event.trace_context.as_deref() else {
            return self.deliver_with_retries(event).await;
        };
        let name = format!("{} {}", self.handler.name(), event.name);
        let span = tracing::info_span!(
            "events.handle",
            otel.name = name.as_str(),
            otel.kind = "consumer",
            messaging.system = "keel",
            messaging.operation.type = "process",
            messaging.destination.name = event.name.as_str(),
            messaging.message.id = %event.event_id,
            keel.event.handler = self.handler.name(),
            keel.event.sequence = event.sequence,
            trace_id = tracing::field::Empty,
            span_id = tracing::field::Empty,
        );
        keel_kernel::trace::continue_from(&span, Some(parent));
        keel_kernel::trace::record_ids(&span);
        self.deliver_with_retries(event).instrument(span).await
    }

    /// Runs the handler until it succeeds or the kernel's retry policy (the
    /// one jobs use) gives up, then dead-letters the event.
    async fn deliver_with_retries(&self, event: &Envelope) -> Result<()> {
        let policy = self.settings.retry_policy();
        let mut attempt = 0;
        loop {
            attempt += 1;
            let Err(error) = self.handler.handle(event).await else {
                return Ok(());
            };
            // Every handler error may be transient: a handler says nothing
            // else (unlike a job's "do not retry").
            match policy.decide(attempt, &error, true, clock::now()) {
                Decision::GiveUp { failure } => {
                    tracing::error!(handler = self.handler.name(), event_id = %event.event_id, attempts = failure.attempt, error = %error, "event dead-lettered");
                    return store::insert_dead_letter(
                        &self.db,
                        DeadLetter {
                            id: id::new_id(),
                            handler: self.handler.name().to_owned(),
                            event_id: event.event_id,
                            sequence: event.sequence,
                            user_id: event.user_id,
                            attempts: failure.attempt,
                            last_error: failure.message,
                            failed_at: failure.at,
                            replayed_at: None,
                        },
                    )
                    .await;
                }
                Decision::Retry { delay, .. } => {
                    self.hub.count_handler_retry();
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
            store::record_replay(
                db,
                id,
                letter.attempts + 1,
                ReplayOutcome::Succeeded { at: clock::now() },
            )
            .await?;
            tracing::info!(handler = letter.handler, event_id = %letter.event_id, "dead letter replayed");
            Ok(())
        }
        Err(error) => {
            let error_text = error.to_string();
            store::record_replay(
                db,
                id,
                letter.attempts + 1,
                ReplayOutcome::Failed { error: &error_text },
            )
            .await?;
            Err(Error::new(
                Code::FailedPrecondition,
                format!("the handler failed again: {}", error.message()),
            ))
        }
    }
}
