//! Keel's events: the transactional outbox, the relay, the bus (Redis or in
//! process), resumable realtime subscriptions, durable internal handlers,
//! the audit log and retention.
//!
//! # Layout
//! - `model.rs`: the domain types (dead letters; the envelope is the kernel's);
//! - `store.rs`: the event tables and the module's only SQL, mapping rows to
//!   domain types (no SeaORM model leaves it);
//! - `relay.rs`: the outbox the command bus writes to, and the relay that
//!   numbers committed events (one at a time across processes) and publishes them;
//! - `transport.rs`: in process, PostgreSQL LISTEN/NOTIFY, Redis pub/sub (fred);
//! - `hub.rs`: one reader of the table per process, fanning out in order;
//! - `subscribe.rs`: replay after a cursor, then live, heartbeats, slow
//!   subscribers, the resync rule;
//! - `handlers.rs`: durable handlers with checkpoints, backoff, dead letters, replay;
//! - `tickets.rs`: stream tickets, what a browser's `EventSource` opens the
//!   stream with (it cannot send an Authorization header);
//! - `queries.rs` / `commands.rs` / `grpc.rs`: the module's API.
//!
//! The guarantee: an event is published if and only if its change
//! committed, and a subscriber that comes back with its cursor misses
//! nothing and sees nothing twice. The table is the truth; the transport
//! only makes it fast.
//!
//! Idle, the module waits for commits rather than polling: this process's
//! commits wake its relay in process, numbering wakes every hub (the local
//! one directly, the others by NOTIFY and Redis), and news wakes the
//! handlers. Polls remain as a slow safety net ([`SAFETY_POLL`]).

pub mod commands;
pub mod grpc;
pub mod handlers;
pub mod hub;
pub mod model;
mod module;
pub mod queries;
pub mod relay;
pub mod store;
pub mod subscribe;
pub mod tickets;
pub mod transport;

use std::sync::Arc;
use std::time::Duration;

use keel_kernel::cluster::{Announcer, InProcessAnnouncer};
use keel_kernel::{BackgroundTasks, BusBuilder, Outbox, Result, clock};
use sea_orm::{DatabaseBackend, DatabaseConnection};

use crate::handlers::Registry;
use crate::hub::Hub;
use crate::relay::{Relay, TableOutbox};

/// The default safety poll: events are announced at commit, so polling
/// only bounds how late a lost notification (or a crashed process's
/// unnumbered row) is noticed; an idle keel costs the database almost nothing.
pub const SAFETY_POLL: Duration = Duration::from_secs(30);

#[derive(Debug, Clone)]
pub struct Settings {
    /// Redis for a cluster of keel processes; `None`: in process.
    pub redis_url: Option<String>,
    /// This deployment's name. Every Redis channel and key carries it and the
    /// database's identity (see [`Events::namespace`]): deployments and test
    /// schemas sharing one Redis never hear each other.
    pub deployment: String,
    pub subscriptions: subscribe::Settings,
    /// Events a process buffers for its subscribers before a slow one is cut off.
    pub hub_buffer: usize,
    /// PostgreSQL: hear of events other processes numbered through
    /// LISTEN/NOTIFY (relays always notify). Off only for tests that must
    /// see Redis itself deliver, or fail. Ignored on SQLite (one process).
    pub listen: bool,
    /// How often each process reads the table for events it heard nothing
    /// of: the slow safety net under notifications, which wake the hub at
    /// every commit. `None`: never; only for tests that must see a
    /// transport itself deliver, or fail.
    pub poll: Option<Duration>,
    /// How often the relay looks for committed, unnumbered events (rows a
    /// crashed process committed but never numbered). `None`: only at start
    /// and when this process commits events.
    pub relay_poll: Option<Duration>,
    /// Numbered events older than this are pruned (once every handler passed them).
    pub retention: Duration,
    pub prune_every: Duration,
    pub handlers: handlers::Settings,
    /// How long stream tickets last (see [`tickets`]).
    pub stream_tickets: tickets::Settings,
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            redis_url: None,
            deployment: "keel".to_owned(),
            subscriptions: subscribe::Settings {
                heartbeat: Duration::from_secs(15),
                queue: 256,
            },
            hub_buffer: 8192,
            listen: true,
            poll: Some(SAFETY_POLL),
            relay_poll: Some(SAFETY_POLL),
            retention: Duration::from_secs(7 * 24 * 3600),
            prune_every: Duration::from_secs(60),
            handlers: handlers::Settings::default(),
            stream_tickets: tickets::Settings::default(),
        }
    }
}

/// The events module, running. Cheap to clone.
#[derive(Clone)]
pub struct Events {
    pub(crate) hub: Arc<Hub>,
    relay: Arc<Relay>,
    pub(crate) registry: Registry,
    pub(crate) settings: Settings,
    namespace: String,
    announcer: Arc<dyn Announcer>,
    /// The relay, hub poller, handler runners and retention: stopped by
    /// [`Events::stop`], or when the last clone of [`Events`] is dropped.
    tasks: Arc<BackgroundTasks>,
}

impl Events {
    /// Starts the hub, the transports, the relay, the handlers and retention.
    pub async fn start(db: DatabaseConnection, settings: Settings, registry: Registry) -> Result<Events> {
        let hub = Hub::start(db.clone(), settings.hub_buffer).await?;
        let instance = store::instance_id(&db).await?;
        let namespace = format!("{}:{}", settings.deployment, instance.simple());
        let postgres = db.get_database_backend() == DatabaseBackend::Postgres;
        let notify = postgres.then(|| transport::postgres_channel(instance));
        let mut tasks = Vec::new();
        if let Some(channel) = notify.as_deref().filter(|_| settings.listen) {
            let listening = transport::listen_postgres(db.get_postgres_connection_pool(), channel, &hub)
                .await
                .map_err(|error| keel_kernel::Error::unavailable(format!("listening for events: {error}")))?;
            tasks.push(listening);
        }
        let (transport, announcer): (Arc<dyn transport::Transport>, Arc<dyn Announcer>) = match &settings.redis_url {
            Some(url) => {
                let redis = transport::Redis::connect(url, &namespace, &hub)
                    .await
                    .map_err(|error| keel_kernel::Error::unavailable(format!("KEEL_REDIS_URL: {error}")))?;
                let announcer = redis.announcer();
                (Arc::new(redis), announcer)
            }
            // Alone on SQLite; on PostgreSQL without Redis other processes
            // may share the database and would not hear: caches stay off.
            None => (
                Arc::new(transport::InProcess),
                Arc::new(InProcessAnnouncer::new(!postgres)),
            ),
        };
        let relay = Relay::new(db.clone(), transport, &hub, notify);
        // Rows a crashed process committed but never numbered: before
        // anything new.
        relay.run_once().await?;
        tasks.push(relay.spawn(settings.relay_poll));
        tasks.extend(settings.poll.map(|every| hub.spawn_poller(every)));
        tasks.extend(registry.spawn(&db, &hub, settings.handlers));
        tasks.push(spawn_retention(
            db,
            registry.names(),
            settings.retention,
            settings.prune_every,
        ));
        Ok(Events {
            hub,
            relay,
            registry,
            settings,
            namespace,
            announcer,
            tasks: Arc::new(BackgroundTasks::new(tasks)),
        })
    }

    /// What the command bus writes events to.
    pub fn outbox(&self) -> Arc<dyn Outbox> {
        Arc::new(TableOutbox::new(self.relay.clone()))
    }

    /// Numbers and publishes pending events now (tests, shutdown).
    pub async fn flush(&self) -> Result<usize> {
        self.relay.run_once().await
    }

    /// `<deployment>:<instance id of the database>`: the prefix of every
    /// Redis channel and key of this deployment.
    pub fn namespace(&self) -> &str {
        &self.namespace
    }

    /// Announcements every process of this deployment acts on before the
    /// announcing command answers (Redis in a cluster; see
    /// [`keel_kernel::cluster`]).
    pub fn announcer(&self) -> Arc<dyn Announcer> {
        self.announcer.clone()
    }

    pub fn latest_sequence(&self) -> u64 {
        self.hub.latest()
    }

    /// Stops the relay, the poller, the handlers and retention (shutdown).
    /// Committed events not yet numbered are numbered by the next start.
    pub fn stop(&self) {
        self.tasks.stop();
    }

    pub fn hub(&self) -> Arc<Hub> {
        self.hub.clone()
    }

    /// What waits for the relay and for admins (metrics read it).
    pub async fn backlog(&self) -> Result<Backlog> {
        let (unnumbered, oldest, dead_letters) = store::backlog(self.hub.db()).await?;
        Ok(Backlog {
            unnumbered,
            oldest_age: oldest.map(|at| (chrono::Utc::now() - at).to_std().unwrap_or_default()),
            dead_letters,
        })
    }
}

/// See [`Events::backlog`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Backlog {
    /// Committed events the relay has not numbered yet.
    pub unnumbered: u64,
    /// How long the oldest of them has waited.
    pub oldest_age: Option<Duration>,
    /// Dead letters not replayed yet.
    pub dead_letters: u64,
}

/// Registers the module's queries and commands.
pub fn register(bus: &mut BusBuilder, events: &Events) {
    bus.query::<queries::Subscribe>(events.clone())
        .query::<queries::ListAuditEvents>(events.clone())
        .query::<queries::ListDeadLetters>(events.clone())
        .command::<commands::ReplayDeadLetter>(events.clone())
        .command::<tickets::CreateStreamTicket>(events.clone());
}

fn spawn_retention(
    db: DatabaseConnection,
    handlers: Vec<&'static str>,
    retention: Duration,
    every: Duration,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        loop {
            tokio::time::sleep(every).await;
            let result = async {
                let through = if handlers.is_empty() {
                    u64::MAX / 2
                } else {
                    store::lowest_checkpoint(&db, &handlers).await?
                };
                let tickets = store::prune_stream_tickets(&db, clock::now()).await?;
                if tickets > 0 {
                    tracing::info!(tickets, "expired stream tickets deleted");
                }
                let before = clock::now() - chrono::Duration::from_std(retention).unwrap_or(chrono::Duration::MAX);
                store::prune(&db, before, through).await
            }
            .await;
            match result {
                Ok(0) => {}
                Ok(pruned) => tracing::info!(pruned, "old events pruned"),
                Err(error) => tracing::warn!(error = %error, "event retention failed"),
            }
        }
    })
}
