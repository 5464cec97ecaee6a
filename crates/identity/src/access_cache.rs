//! [`AccessCache`]: active sessions and their users, users by id, and API
//! keys, remembered per process, so that an authenticated call (and `GetUser`)
//! needs no database round trip of its own.
//!
//! It can only grant: an entry whose session is no longer active by its own
//! record is a miss, and the database decides. It is exact because every
//! command that ends a session or changes a user announces it after its
//! commit, through the cluster's [`Announcer`], and answers its caller only
//! once every process has forgotten that user. A process that may have
//! missed an announcement does not use its entries: while it is not hearing
//! (Redis away; several processes on PostgreSQL without Redis: always) the
//! cache is off, and what it stored before a reconnect is stale. A fill that
//! began before an announcement is dropped (`epoch`), so a read racing with
//! a revocation never stores the state it revoked. Entries also expire after
//! [`TTL`], which bounds what a change made outside keel (an operator's SQL)
//! can leave behind.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use keel_kernel::cluster::Announcer;
use uuid::Uuid;

use crate::model::{ApiKey, Session, User};

/// The announcements' topic; the message is the user id.
pub const TOPIC: &str = "identity.access";

/// The longest an entry is used.
pub const TTL: Duration = Duration::from_secs(60);

/// Sessions kept (about 1 KiB each).
const CAPACITY: usize = 10_000;

#[derive(Clone)]
struct UserEntry {
    user: User,
    generation: u64,
    stored_at: Instant,
}

#[derive(Clone)]
struct Entry {
    session: Session,
    user: User,
    generation: u64,
    stored_at: Instant,
}

#[derive(Clone)]
struct KeyEntry {
    key: ApiKey,
    secret_hash: String,
    generation: u64,
    stored_at: Instant,
}

/// How often a key's `last_used_at` is written, at most.
pub const LAST_USED_EVERY: Duration = Duration::from_secs(60);

/// What a fill must still match when it stores (see [`AccessCache::ticket`]).
pub(crate) struct Ticket {
    epoch: u64,
    generation: u64,
}

pub struct AccessCache {
    entries: quick_cache::sync::Cache<Uuid, Entry>,
    users: quick_cache::sync::Cache<Uuid, UserEntry>,
    /// API keys by id, with their secrets' hashes; an announcement of the
    /// key's id forgets it.
    keys: quick_cache::sync::Cache<Uuid, KeyEntry>,
    /// When this process last wrote a key's `last_used_at`: a throttle, not
    /// a cache, so it works whether or not the process is hearing.
    touched: quick_cache::sync::Cache<Uuid, Instant>,
    /// Advanced by every announcement: fills begun before it are dropped.
    epoch: AtomicU64,
    announcer: OnceLock<Arc<dyn Announcer>>,
}

impl Default for AccessCache {
    fn default() -> Self {
        Self {
            entries: quick_cache::sync::Cache::new(CAPACITY),
            users: quick_cache::sync::Cache::new(CAPACITY),
            keys: quick_cache::sync::Cache::new(CAPACITY),
            touched: quick_cache::sync::Cache::new(CAPACITY),
            epoch: AtomicU64::new(0),
            announcer: OnceLock::new(),
        }
    }
}

impl AccessCache {
    /// Turns the cache on, with the announcer every process hears; until
    /// then it holds nothing.
    pub fn attach(self: &Arc<Self>, announcer: Arc<dyn Announcer>) {
        let weak = Arc::downgrade(self);
        announcer.listen(
            TOPIC,
            Arc::new(move |message: &str| {
                if let Some(cache) = weak.upgrade() {
                    cache.forget(message);
                }
            }),
        );
        let _ = self.announcer.set(announcer);
    }

    /// The announcer, while this process hears every announcement.
    fn hearing(&self) -> Option<&Arc<dyn Announcer>> {
        self.announcer.get().filter(|announcer| announcer.hears_everything())
    }

    /// The session and its user, when remembered, still current and still
    /// active by the session's own record.
    pub(crate) fn get(&self, session_id: Uuid, now: chrono::DateTime<chrono::Utc>) -> Option<(Session, User)> {
        let announcer = self.hearing()?;
        let entry = self.entries.get(&session_id)?;
        let current = entry.generation == announcer.generation() && entry.stored_at.elapsed() < TTL;
        (current && entry.session.is_active(now)).then_some((entry.session, entry.user))
    }

    /// Taken before reading the database for a fill.
    pub(crate) fn ticket(&self) -> Option<Ticket> {
        let announcer = self.hearing()?;
        Some(Ticket {
            epoch: self.epoch.load(Ordering::Acquire),
            generation: announcer.generation(),
        })
    }

    /// Stores what the database said, unless an announcement (or a
    /// reconnect) came since the ticket was taken.
    pub(crate) fn fill(&self, ticket: Ticket, session: &Session, user: &User) {
        let Some(announcer) = self.hearing() else {
            return;
        };
        if announcer.generation() != ticket.generation || self.epoch.load(Ordering::Acquire) != ticket.epoch {
            return;
        }
        self.entries.insert(
            session.id,
            Entry {
                session: session.clone(),
                user: user.clone(),
                generation: ticket.generation,
                stored_at: Instant::now(),
            },
        );
        // Stored after an announcement that the read may have missed: take
        // it back (the announcement's `retain` may have run before the insert).
        if self.epoch.load(Ordering::Acquire) != ticket.epoch {
            self.entries.remove(&session.id);
        }
    }

    /// The user `user_id`, when remembered and current.
    pub(crate) fn get_user(&self, user_id: Uuid) -> Option<User> {
        let announcer = self.hearing()?;
        let entry = self.users.get(&user_id)?;
        (entry.generation == announcer.generation() && entry.stored_at.elapsed() < TTL).then_some(entry.user)
    }

    /// Stores a user the database returned, under the same rule as [`Self::fill`].
    pub(crate) fn fill_user(&self, ticket: Ticket, user: &User) {
        let Some(announcer) = self.hearing() else {
            return;
        };
        if announcer.generation() != ticket.generation || self.epoch.load(Ordering::Acquire) != ticket.epoch {
            return;
        }
        self.users.insert(
            user.id,
            UserEntry {
                user: user.clone(),
                generation: ticket.generation,
                stored_at: Instant::now(),
            },
        );
        if self.epoch.load(Ordering::Acquire) != ticket.epoch {
            self.users.remove(&user.id);
        }
    }

    /// The API key `id` and its secret's hash, when remembered and current
    /// (its expiry is the caller's to check).
    pub(crate) fn get_key(&self, id: Uuid) -> Option<(ApiKey, String)> {
        let announcer = self.hearing()?;
        let entry = self.keys.get(&id)?;
        (entry.generation == announcer.generation() && entry.stored_at.elapsed() < TTL)
            .then_some((entry.key, entry.secret_hash))
    }

    /// Stores a key the database returned, under the same rule as [`Self::fill`].
    pub(crate) fn fill_key(&self, ticket: Ticket, key: &ApiKey, secret_hash: &str) {
        let Some(announcer) = self.hearing() else {
            return;
        };
        if announcer.generation() != ticket.generation || self.epoch.load(Ordering::Acquire) != ticket.epoch {
            return;
        }
        self.keys.insert(
            key.id,
            KeyEntry {
                key: key.clone(),
                secret_hash: secret_hash.to_owned(),
                generation: ticket.generation,
                stored_at: Instant::now(),
            },
        );
        if self.epoch.load(Ordering::Acquire) != ticket.epoch {
            self.keys.remove(&key.id);
        }
    }

    /// Whether this use of `key` should write its `last_used_at`: neither
    /// the stored value nor this process's last write is younger than
    /// [`LAST_USED_EVERY`]. A true answer counts as the write.
    pub(crate) fn should_touch(&self, key: &ApiKey, now: chrono::DateTime<chrono::Utc>) -> bool {
        let every = chrono::Duration::from_std(LAST_USED_EVERY).unwrap_or(chrono::Duration::MAX);
        if key.last_used_at.is_some_and(|last_used_at| now - last_used_at < every) {
            return false;
        }
        if self
            .touched
            .get(&key.id)
            .is_some_and(|touched| touched.elapsed() < LAST_USED_EVERY)
        {
            return false;
        }
        self.touched.insert(key.id, Instant::now());
        true
    }

    /// Forgets `user_id` and every session of it, or the API key of that id
    /// (the announcement's listener).
    fn forget(&self, user_id: &str) {
        self.epoch.fetch_add(1, Ordering::AcqRel);
        match Uuid::parse_str(user_id) {
            Ok(user_id) => {
                self.users.remove(&user_id);
                self.keys.remove(&user_id);
                self.entries.retain(|_, entry| entry.user.id != user_id);
            }
            Err(_) => {
                self.users.clear();
                self.keys.clear();
                self.entries.clear();
            }
        }
    }

    /// Tells every process to forget `user_id`'s sessions; returns once they have.
    pub(crate) async fn announce(&self, user_id: Uuid) {
        if let Some(announcer) = self.announcer.get() {
            announcer.announce(TOPIC, &user_id.to_string()).await;
        }
    }

    /// Whether an announcer is attached (tests, diagnostics).
    pub fn is_attached(&self) -> bool {
        self.announcer.get().is_some()
    }
}
