//! Telling every keel process of a change and waiting until each has acted
//! on it: how a cache kept in each process stays exact in a cluster.
//!
//! A command that makes cached state stale announces it after its commit
//! (see [`crate::CommandContext::after_commit`]); its caller is answered only
//! once every listening process has run its listener. A process that may
//! have missed announcements (Redis away, a reconnect) says so through
//! [`Announcer::hears_everything`] and [`Announcer::generation`], and a cache
//! is then not used, or forgets what it held.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};

use async_trait::async_trait;

/// What runs in each process when a topic is announced.
pub type Listener = Arc<dyn Fn(&str) + Send + Sync>;

#[async_trait]
pub trait Announcer: Send + Sync + 'static {
    /// Runs `topic`'s listener with `message` in every listening process,
    /// this one included, and returns once each has (or once a bounded wait
    /// is over: a process that does not answer is slow or gone, and the
    /// announcement is logged).
    async fn announce(&self, topic: &'static str, message: &str);

    /// Sets this process's listener of `topic` (one per topic).
    fn listen(&self, topic: &'static str, listener: Listener);

    /// Whether this process hears every announcement of every process right
    /// now. False in a cluster while its link is down: a cache that relies on
    /// announcements must not answer then.
    fn hears_everything(&self) -> bool;

    /// Changes whenever announcements may have been missed (a reconnect):
    /// what a cache stored under another generation is stale.
    fn generation(&self) -> u64;
}

/// The announcer of one process: listeners run here, at once.
#[derive(Default)]
pub struct InProcessAnnouncer {
    // A std lock: held only to find a listener, never across an await.
    listeners: RwLock<HashMap<&'static str, Listener>>,
    alone: bool,
    generation: AtomicU64,
}

impl InProcessAnnouncer {
    /// `alone`: this process is the whole deployment (embedded SQLite), so
    /// it hears everything; otherwise (several processes on one PostgreSQL
    /// without Redis) nobody else would hear it, and caches stay off.
    pub fn new(alone: bool) -> Self {
        Self {
            listeners: RwLock::new(HashMap::new()),
            alone,
            generation: AtomicU64::new(0),
        }
    }

    /// Runs the listener of `topic` in this process.
    pub fn deliver(&self, topic: &str, message: &str) {
        let listener = self
            .listeners
            .read()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .get(topic)
            .cloned();
        if let Some(listener) = listener {
            listener(message);
        }
    }

    /// Marks that announcements may have been missed (see [`Announcer::generation`]).
    pub fn next_generation(&self) {
        self.generation.fetch_add(1, Ordering::AcqRel);
    }
}

#[async_trait]
impl Announcer for InProcessAnnouncer {
    async fn announce(&self, topic: &'static str, message: &str) {
        self.deliver(topic, message);
    }

    fn listen(&self, topic: &'static str, listener: Listener) {
        self.listeners
            .write()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .insert(topic, listener);
    }

    fn hears_everything(&self) -> bool {
        self.alone
    }

    fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn an_announcement_runs_the_topics_listener_before_it_returns() {
        let announcer = InProcessAnnouncer::new(true);
        let heard = Arc::new(std::sync::Mutex::new(Vec::new()));
        let into = heard.clone();
        announcer.listen(
            "test",
            Arc::new(move |message: &str| into.lock().unwrap_or_else(|p| p.into_inner()).push(message.to_owned())),
        );
        announcer.announce("test", "a").await;
        announcer.announce("other", "b").await;
        assert_eq!(*heard.lock().unwrap_or_else(|p| p.into_inner()), ["a"]);
        assert!(announcer.hears_everything());
        assert!(!InProcessAnnouncer::new(false).hears_everything());
    }
}
