//! Realtime subscriptions: replay from the table after the cursor, then
//! live from the hub, with no gap and no duplicate at the hand-over.

use std::sync::Arc;
use std::time::Duration;

use keel_kernel::access::AccessEnd;
use keel_kernel::{Code, Envelope, Error, Principal, Result, topic_matches};
use sea_orm::DatabaseConnection;
use tokio::sync::{broadcast, mpsc};

use crate::hub::Hub;
use crate::store;

/// What a subscriber receives.
#[derive(Debug, Clone)]
pub enum Item {
    Event(Arc<Envelope>),
    /// The subscriber's own cursor: resuming after it misses nothing.
    Heartbeat {
        cursor: u64,
    },
}

#[derive(Debug, Clone)]
pub struct Subscription {
    pub topics: Vec<String>,
    pub after: u64,
    pub principal: Principal,
}

impl Subscription {
    fn wants(&self, event: &Envelope) -> bool {
        let visible = self.principal.is_admin() || event.user_id == Some(self.principal.user_id);
        visible && (self.topics.is_empty() || self.topics.iter().any(|topic| topic_matches(topic, &event.name)))
    }

    /// Whose events this subscription may see: `None` for all (admins).
    fn owner(&self) -> Option<uuid::Uuid> {
        (!self.principal.is_admin()).then_some(self.principal.user_id)
    }

    /// Sends the stored events it wants numbered after `after` through
    /// `through`, filtered in SQL (by owner and topic), page by page, noting
    /// the last one sent in `delivered`. False when the subscriber went away
    /// or the read failed (it was told).
    async fn send_stored(
        &self,
        db: &DatabaseConnection,
        after: u64,
        through: u64,
        sender: &mpsc::Sender<Result<Item>>,
        delivered: &mut u64,
    ) -> bool {
        const PAGE: u64 = 500;
        let topics: Vec<&str> = self.topics.iter().map(String::as_str).collect();
        let mut last = after;
        loop {
            let page = match store::read_matching(db, last, Some(through), self.owner(), &topics, PAGE).await {
                Ok(page) => page,
                Err(error) => {
                    let _ = sender.send(Err(error)).await;
                    return false;
                }
            };
            for event in &page {
                last = event.sequence;
            }
            for event in page.iter().filter(|event| self.wants(event)) {
                if sender.send(Ok(Item::Event(Arc::new(event.clone())))).await.is_err() {
                    return false;
                }
                *delivered = event.sequence;
            }
            if (page.len() as u64) < PAGE {
                return true;
            }
        }
    }
}

#[derive(Debug, Clone, Copy)]
pub struct Settings {
    pub heartbeat: Duration,
    /// Items queued for one subscriber before it counts as too slow.
    pub queue: usize,
}

/// Starts a subscription; its items arrive on the returned channel. An error
/// item ends it. Fails at once with FAILED_PRECONDITION (reason
/// `RESYNC_REQUIRED`) when the cursor is older than the retention window.
/// When `access_ended` resolves (the token expired, the session ended) the
/// subscription ends with UNAUTHENTICATED and the cursor to resume after.
pub async fn start(
    db: DatabaseConnection,
    hub: Arc<Hub>,
    settings: Settings,
    subscription: Subscription,
    access_ended: AccessEnd,
) -> Result<mpsc::Receiver<Result<Item>>> {
    if subscription.after > i64::MAX as u64 {
        return Err(Error::invalid_field(
            "after_sequence",
            format!("must be at most {}", i64::MAX),
        ));
    }
    for topic in &subscription.topics {
        let wildcard_inside = topic.trim_end_matches('*').contains('*');
        if topic.is_empty() || wildcard_inside {
            return Err(Error::invalid_field(
                "topics",
                format!("{topic:?} is not an event name or `prefix.*`"),
            ));
        }
    }
    let pruned = store::pruned_through(&db).await?;
    if subscription.after < pruned {
        return Err(Error::new(
            Code::FailedPrecondition,
            format!(
                "events up to sequence {pruned} are no longer retained; resync, then subscribe after the newest sequence"
            ),
        )
        .with_info(
            "RESYNC_REQUIRED",
            &[("oldest_retained_sequence", (pruned + 1).to_string()), ("latest_sequence", hub.latest().to_string())],
        ));
    }
    // Subscribe to the live feed before replaying, so nothing committed in
    // between is missed; duplicates are dropped by sequence.
    let (live, _) = hub.subscribe();
    let (sender, receiver) = mpsc::channel(settings.queue.max(1));
    // Left out of traces with the call that opened it, when it is.
    tokio::spawn(keel_kernel::trace::keep_sampling(run(
        db,
        hub.clone(),
        settings,
        subscription,
        live,
        sender,
        access_ended,
    )));
    Ok(receiver)
}

async fn run(
    db: DatabaseConnection,
    hub: Arc<Hub>,
    settings: Settings,
    subscription: Subscription,
    mut live: broadcast::Receiver<Arc<Envelope>>,
    sender: mpsc::Sender<Result<Item>>,
    mut access_ended: AccessEnd,
) {
    // Everything numbered through `known` is committed and visible (numbering
    // commits in sequence order), and the live feed, attached before this
    // read, carries everything after it: replay through it, then go live.
    let known = match store::latest_sequence(&db).await {
        Ok(known) => known,
        Err(error) => {
            let _ = sender.send(Err(error)).await;
            return;
        }
    };
    // The last event sent to this subscriber: what heartbeats say, so they
    // tell nothing of other users' activity.
    let mut delivered = subscription.after;
    if known > subscription.after
        && !subscription
            .send_stored(&db, subscription.after, known, &sender, &mut delivered)
            .await
    {
        return;
    }
    // The last event looked at (sent or not for this subscriber): where a
    // resumption starts when the stream ends.
    let mut last = subscription.after.max(known);
    let mut heartbeat = tokio::time::interval_at(tokio::time::Instant::now() + settings.heartbeat, settings.heartbeat);
    loop {
        tokio::select! {
            received = live.recv() => match received {
                Ok(event) => {
                    if event.sequence <= last {
                        continue;
                    }
                    // A hole in the live feed (the hub skipped a gap): send
                    // what the table has of it first.
                    if event.sequence > last + 1
                        && !subscription.send_stored(&db, last, event.sequence - 1, &sender, &mut delivered).await
                    {
                        return;
                    }
                    last = event.sequence;
                    if subscription.wants(&event) {
                        let sequence = event.sequence;
                        if sender.send(Ok(Item::Event(event))).await.is_err() {
                            return;
                        }
                        delivered = sequence;
                    }
                }
                Err(broadcast::error::RecvError::Lagged(_)) => {
                    hub.count_dropped_slow();
                    let error = Error::new(
                        Code::ResourceExhausted,
                        format!("subscriber too slow to keep up; resume with after_sequence={last}"),
                    )
                    .with_info("SUBSCRIBER_TOO_SLOW", &[("resume_after_sequence", last.to_string())]);
                    let _ = sender.send(Err(error)).await;
                    return;
                }
                Err(broadcast::error::RecvError::Closed) => return,
            },
            _ = heartbeat.tick() => {
                if sender.send(Ok(Item::Heartbeat { cursor: delivered })).await.is_err() {
                    return;
                }
            }
            ended = &mut access_ended => {
                let _ = sender.send(Err(ended.into_error(&[("resume_after_sequence", last.to_string())]))).await;
                return;
            }
            () = sender.closed() => return,
        }
    }
}
