//! How committed events reach every keel process: in process (one keel),
//! PostgreSQL LISTEN/NOTIFY (every process sharing the database), and Redis
//! pub/sub through fred (the cluster bus), on channels namespaced by the
//! deployment and its database. They only carry news ("numbered through
//! N"); the event table stays the truth: a hub reads what it delivers from
//! it, and a lost message (a reconnect, Redis down) costs latency, never an
//! event: after a reconnect the hub reads the table once, and it also reads
//! it on a slow safety poll.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use fred::clients::SubscriberClient;
use fred::prelude::*;
use keel_kernel::Envelope;
use keel_kernel::cluster::{Announcer, InProcessAnnouncer, Listener};
use sea_orm::sqlx::postgres::{PgListener, PgPool, PgPoolOptions};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

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

/// The Redis channel of a deployment's events (`<namespace>:events`).
pub fn channel(namespace: &str) -> String {
    format!("{namespace}:events")
}

/// What travels through Redis: only that events up to `through` are
/// numbered. Never the events themselves: a hub reads them from its own
/// table, so a message from anyone else on the channel (a misconfigured
/// deployment, a stray client) cannot put an event before a subscriber.
#[derive(Debug, Serialize, Deserialize)]
pub struct News {
    pub through: u64,
}

/// The Redis channels of a deployment's announcements and their answers.
fn announce_channels(namespace: &str) -> (String, String) {
    (format!("{namespace}:announce"), format!("{namespace}:announce:ack"))
}

/// An announcement on Redis: every process runs `topic`'s listener, then
/// answers `id` on the ack channel.
#[derive(Debug, Serialize, Deserialize)]
struct Announcement {
    id: Uuid,
    topic: String,
    message: String,
}

#[derive(Debug, Serialize, Deserialize)]
struct Ack {
    id: Uuid,
}

/// How long an announcement waits for every process to answer.
const ANNOUNCE_WAIT: Duration = Duration::from_secs(1);

/// Announcements through Redis (see [`keel_kernel::cluster`]): published on
/// `<namespace>:announce`, each process runs the listener and answers on
/// `<namespace>:announce:ack`; the announcer waits for as many answers as
/// Redis counted receivers (itself included).
pub struct RedisAnnouncer {
    channel: String,
    acks: String,
    publisher: Client,
    subscriber: SubscriberClient,
    local: InProcessAnnouncer,
    /// Subscribed to both channels since the last (re)connect.
    hearing: AtomicBool,
    // A std mutex: held only to add, find or remove an entry.
    waiting: std::sync::Mutex<HashMap<Uuid, Arc<Waiting>>>,
}

struct Waiting {
    answers: AtomicUsize,
    answered: tokio::sync::Notify,
}

impl RedisAnnouncer {
    fn on_announcement(&self, text: &str) {
        let Ok(announcement) = serde_json::from_str::<Announcement>(text) else {
            tracing::warn!("unreadable announcement from redis");
            return;
        };
        self.local.deliver(&announcement.topic, &announcement.message);
        let Ok(ack) = serde_json::to_string(&Ack { id: announcement.id }) else {
            return;
        };
        let publisher = self.publisher.clone();
        let acks = self.acks.clone();
        tokio::spawn(async move {
            if let Err(error) = publisher.publish::<(), _, _>(acks.as_str(), ack).await {
                tracing::debug!(error = %error, "answering an announcement failed");
            }
        });
    }

    fn on_ack(&self, text: &str) {
        let Ok(ack) = serde_json::from_str::<Ack>(text) else {
            return;
        };
        let waiting = self
            .waiting
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .get(&ack.id)
            .cloned();
        if let Some(waiting) = waiting {
            waiting.answers.fetch_add(1, Ordering::AcqRel);
            waiting.answered.notify_one();
        }
    }

    /// Subscribes to both channels; until then (and after a disconnect) this
    /// process does not hear everything.
    async fn subscribe(&self) {
        loop {
            match self
                .subscriber
                .subscribe(vec![self.channel.as_str(), self.acks.as_str()])
                .await
            {
                Ok(()) => break,
                Err(error) => {
                    tracing::debug!(error = %error, "redis subscribe (announcements) failed; retrying");
                    tokio::time::sleep(Duration::from_millis(500)).await;
                }
            }
        }
        self.local.next_generation();
        self.hearing.store(true, Ordering::Release);
    }
}

#[async_trait]
impl Announcer for RedisAnnouncer {
    async fn announce(&self, topic: &'static str, message: &str) {
        // Here first, whatever Redis does.
        self.local.deliver(topic, message);
        let id = Uuid::now_v7();
        let Ok(text) = serde_json::to_string(&Announcement {
            id,
            topic: topic.to_owned(),
            message: message.to_owned(),
        }) else {
            return;
        };
        let waiting = Arc::new(Waiting {
            answers: AtomicUsize::new(0),
            answered: tokio::sync::Notify::new(),
        });
        self.waiting
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .insert(id, waiting.clone());
        let answered = async {
            // Receivers Redis counted: every subscribed process, this one too.
            let receivers = self.publisher.publish::<i64, _, _>(self.channel.as_str(), text).await?;
            let receivers = usize::try_from(receivers).unwrap_or(0);
            loop {
                let notified = waiting.answered.notified();
                if waiting.answers.load(Ordering::Acquire) >= receivers {
                    return Ok::<_, fred::error::Error>(receivers);
                }
                notified.await;
            }
        };
        match tokio::time::timeout(ANNOUNCE_WAIT, answered).await {
            Ok(Ok(_)) => {}
            // The processes that did not hear it are not hearing everything
            // (their caches are off) or will hear it late: say so.
            Ok(Err(error)) => {
                tracing::warn!(topic, error = %error, "announcement not published; other processes' caches may be stale until they reconnect")
            }
            Err(_) => tracing::warn!(
                topic,
                answered = waiting.answers.load(Ordering::Acquire),
                "not every keel process answered an announcement in time"
            ),
        }
        self.waiting
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .remove(&id);
    }

    fn listen(&self, topic: &'static str, listener: Listener) {
        self.local.listen(topic, listener);
    }

    fn hears_everything(&self) -> bool {
        self.hearing.load(Ordering::Acquire) && self.subscriber.is_connected()
    }

    fn generation(&self) -> u64 {
        self.local.generation()
    }
}

/// Redis pub/sub: a publishing client and a subscriber that feeds the local
/// hub and the announcer. Both reconnect forever; the subscriber
/// re-subscribes on reconnect.
pub struct Redis {
    channel: String,
    publisher: Client,
    _subscriber: SubscriberClient,
    announcer: Arc<RedisAnnouncer>,
    tasks: Vec<tokio::task::AbortHandle>,
}

impl Drop for Redis {
    fn drop(&mut self) {
        for task in &self.tasks {
            task.abort();
        }
    }
}

/// How long start-up waits for the first SUBSCRIBE before going on without it.
const SUBSCRIBE_WAIT: Duration = Duration::from_secs(2);

impl Redis {
    /// Connects for the events of `namespace` and its announcements.
    pub async fn connect(url: &str, namespace: &str, hub: &Arc<Hub>) -> Result<Redis, Error> {
        let channel = channel(namespace);
        let channel = channel.as_str();
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
        let (announce_channel, acks) = announce_channels(namespace);
        let announcer = Arc::new(RedisAnnouncer {
            channel: announce_channel.clone(),
            acks: acks.clone(),
            publisher: publisher.clone(),
            subscriber: subscriber.clone(),
            local: InProcessAnnouncer::new(false),
            hearing: AtomicBool::new(false),
            waiting: std::sync::Mutex::new(HashMap::new()),
        });
        let mut messages = subscriber.message_rx();
        let weak = Arc::downgrade(hub);
        let announcements = Arc::downgrade(&announcer);
        tasks.push(
            tokio::spawn(async move {
                loop {
                    let message = match messages.recv().await {
                        Ok(message) => message,
                        // Messages were dropped: announcements may be missed
                        // (caches forget what they held) and news too (read
                        // the table).
                        Err(tokio::sync::broadcast::error::RecvError::Lagged(missed)) => {
                            tracing::warn!(missed, "redis messages dropped; catching up");
                            if let Some(announcer) = announcements.upgrade() {
                                announcer.local.next_generation();
                            }
                            if let Some(hub) = weak.upgrade() {
                                hub.poll().await;
                            }
                            continue;
                        }
                        Err(tokio::sync::broadcast::error::RecvError::Closed) => break,
                    };
                    let Ok(text) = message.value.convert::<String>() else {
                        continue;
                    };
                    if *message.channel == *announce_channel || *message.channel == *acks {
                        let Some(announcer) = announcements.upgrade() else {
                            break;
                        };
                        if *message.channel == *acks {
                            announcer.on_ack(&text);
                        } else {
                            announcer.on_announcement(&text);
                        }
                        continue;
                    }
                    let Some(hub) = weak.upgrade() else { break };
                    match serde_json::from_str::<News>(&text) {
                        Ok(news) => hub.hint(news.through).await,
                        Err(error) => tracing::warn!(error = %error, "unreadable event message from redis"),
                    }
                }
            })
            .abort_handle(),
        );
        // News published while this process was not subscribed (before the
        // first SUBSCRIBE, during a reconnect) is lost: after each
        // (re)subscription the hub reads the table once, so nothing waits
        // for the poll, which may be off.
        let mut reconnects = subscriber.reconnect_rx();
        let weak = Arc::downgrade(hub);
        let announcements = Arc::downgrade(&announcer);
        tasks.push(
            tokio::spawn(async move {
                while reconnects.recv().await.is_ok() {
                    // Announcements made while away were missed: caches stay
                    // off until subscribed again, then forget what they held.
                    if let Some(announcer) = announcements.upgrade() {
                        announcer.hearing.store(false, Ordering::Release);
                        announcer.subscribe().await;
                    }
                    let Some(hub) = weak.upgrade() else { break };
                    hub.poll().await;
                }
            })
            .abort_handle(),
        );
        let subscribing = subscriber.clone();
        let subscribed_channel = channel.to_owned();
        let weak = Arc::downgrade(hub);
        let announcements = announcer.clone();
        let (subscribed, first_subscription) = tokio::sync::oneshot::channel::<()>();
        tasks.push(
            tokio::spawn(async move {
                announcements.subscribe().await;
                // Until Redis answers, subscribe keeps failing; the tracked
                // channel is re-subscribed on every reconnect after that.
                loop {
                    match subscribing.subscribe(subscribed_channel.as_str()).await {
                        Ok(()) => break,
                        Err(error) => {
                            tracing::debug!(error = %error, "redis subscribe failed; retrying");
                            tokio::time::sleep(Duration::from_millis(500)).await;
                        }
                    }
                }
                let _ = subscribed.send(());
                if let Some(hub) = weak.upgrade() {
                    hub.poll().await;
                }
            })
            .abort_handle(),
        );
        // With Redis up, start only once subscribed; with Redis down, start
        // anyway (commits must not wait for Redis) and catch up on subscribing.
        if tokio::time::timeout(SUBSCRIBE_WAIT, first_subscription).await.is_err() {
            tracing::warn!("redis not subscribed yet; events from other processes arrive once it is");
        }
        Ok(Redis {
            channel: channel.to_owned(),
            publisher,
            _subscriber: subscriber,
            announcer,
            tasks,
        })
    }

    /// This deployment's announcer (see [`keel_kernel::cluster`]).
    pub fn announcer(&self) -> Arc<RedisAnnouncer> {
        self.announcer.clone()
    }
}

#[async_trait]
impl Transport for Redis {
    async fn publish(&self, events: &[Envelope]) {
        let Some(through) = events.iter().map(|event| event.sequence).max() else {
            return;
        };
        let Ok(text) = serde_json::to_string(&News { through }) else {
            return;
        };
        // Bounded: while Redis is away the hubs' polling carries the events.
        let published = tokio::time::timeout(
            Duration::from_millis(500),
            self.publisher.publish::<(), _, _>(self.channel.as_str(), text),
        )
        .await;
        match published {
            Ok(Ok(())) => {}
            Ok(Err(error)) => tracing::debug!(error = %error, "redis publish failed; subscribers will poll"),
            Err(_) => tracing::debug!("redis publish timed out; subscribers will poll"),
        }
    }
}

/// The PostgreSQL channel of a database's events: `keel_events_<instance>`,
/// the id [`crate::store::instance_id`] keeps in the event tables' schema.
/// Test schemas in one database never wake each other; processes sharing
/// the event table share the channel, as they share the events. (A channel
/// is an identifier of at most 63 bytes: the deployment name does not fit
/// beside the id, and adds nothing to the table's own identity.)
pub fn postgres_channel(instance: Uuid) -> String {
    format!("keel_events_{}", instance.simple())
}

/// Listens to `channel` on a connection of its own (not one of the pool's:
/// a listening connection never serves a query) and hints the hub at every
/// notification: the relays send one when their numbering commits.
/// Returns once listening, so nothing committed after start goes unheard.
/// Reconnects forever; after each reconnect the hub reads the table once
/// (notifications sent meanwhile are lost).
pub async fn listen_postgres(
    pool: &PgPool,
    channel: &str,
    hub: &Arc<Hub>,
) -> Result<tokio::task::JoinHandle<()>, sea_orm::sqlx::Error> {
    let own = PgPoolOptions::new()
        .max_connections(1)
        .min_connections(0)
        .max_lifetime(None)
        .idle_timeout(None)
        .connect_lazy_with((*pool.connect_options()).clone());
    let mut listener = listen(&own, channel).await?;
    let channel = channel.to_owned();
    let weak = Arc::downgrade(hub);
    Ok(tokio::spawn(async move {
        loop {
            match listener.try_recv().await {
                Ok(Some(notification)) => {
                    let Some(hub) = weak.upgrade() else { break };
                    match notification.payload().parse::<u64>() {
                        Ok(through) => hub.hint(through).await,
                        Err(_) => {
                            tracing::warn!(payload = notification.payload(), "unreadable event notification");
                            hub.poll().await;
                        }
                    }
                }
                // Lost and re-established (sqlx listens again before it
                // returns): what was sent in between is in the table.
                Ok(None) => {
                    let Some(hub) = weak.upgrade() else { break };
                    hub.poll().await;
                }
                Err(error) => {
                    tracing::warn!(error = %error, "postgres event listener lost; reconnecting");
                    drop(listener);
                    listener = loop {
                        tokio::time::sleep(Duration::from_millis(500)).await;
                        match listen(&own, &channel).await {
                            Ok(listener) => break listener,
                            Err(error) => tracing::debug!(error = %error, "postgres listen failed; retrying"),
                        }
                    };
                    let Some(hub) = weak.upgrade() else { break };
                    hub.poll().await;
                }
            }
        }
    }))
}

async fn listen(pool: &PgPool, channel: &str) -> Result<PgListener, sea_orm::sqlx::Error> {
    let mut listener = PgListener::connect_with(pool).await?;
    // The listener belongs to no pool that closes: keep listening.
    listener.ignore_pool_close_event(true);
    listener.listen(channel).await?;
    Ok(listener)
}
