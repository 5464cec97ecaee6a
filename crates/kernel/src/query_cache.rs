//! The query cache: a query's reply kept for a while, forgotten when a
//! command changes what it read.
//!
//! A query opts in with [`crate::Query::cache_key`] and names the tags that
//! invalidate it ([`crate::Query::cache_tags`], `identity.user:<id>`). A
//! module declares which of its events change which tags
//! ([`crate::BusBuilder::invalidate_on`]): after a command commits, and before
//! it answers, the bus invalidates the tag of each recorded event's
//! aggregate; before it commits, it holds them ([`QueryCache::hold`]), so a
//! process that dies between its commit and its invalidation leaves no old
//! answer in a shared cache either. So a read after a committed write never
//! returns the old value.
//!
//! Each tag has a generation, bumped by every invalidation. A reader reads
//! the generations of its tags before it reads the database, looks the entry
//! up under those generations, and stores its answer only if none moved in
//! between ([`QueryCache::put`] checks atomically): a reader that read the
//! old row while a writer committed and invalidated never stores it. Entries
//! of an older generation are unreachable and expire after the TTL.
//!
//! Adapters: [`InProcessQueryCache`] here (one process: embedded mode), and
//! Redis in the server (shared by every process of a deployment).

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use async_trait::async_trait;

use crate::error::Result;

/// The cache port. Every error means "no cache now": the bus bypasses it.
#[async_trait]
pub trait QueryCache: Send + Sync + 'static {
    /// The current generation of each tag (0 for one never invalidated).
    async fn generations(&self, tags: &[String]) -> Result<Vec<u64>>;
    /// The entry stored under `key`, if any and not expired.
    async fn get(&self, key: &str) -> Result<Option<Vec<u8>>>;
    /// Stores `value` under `key`, unless a tag's generation is no longer the
    /// one in `generations` (read before the data). Whether it stored.
    async fn put(&self, key: &str, value: Vec<u8>, tags: &[String], generations: &[u64]) -> Result<bool>;
    /// Bumps the generation of each tag: every entry read under an older one
    /// is gone for every reader.
    async fn invalidate(&self, tags: &[String]) -> Result<()>;
    /// Before a command that will invalidate `tags` commits, for `writer`
    /// (the command's own token): until that writer's [`QueryCache::release`]
    /// (or, if its process dies after the commit and it never comes, until
    /// the hold expires) no reader of these tags uses or stores an entry
    /// ([`QueryCache::generations`] fails for them), and entries stored
    /// before are unreachable. Each writer holds and releases for itself: one
    /// writer's release leaves another's hold in place. So a commit whose
    /// invalidation was lost to a crash leaves no old answer behind in a
    /// cache other processes share. The default does nothing: a cache of one
    /// process dies with the process.
    async fn hold(&self, tags: &[String], writer: &str) -> Result<()> {
        let _ = (tags, writer);
        Ok(())
    }
    /// After the commit (or its failure): invalidates `tags` and ends
    /// `writer`'s hold of them.
    async fn release(&self, tags: &[String], writer: &str) -> Result<()> {
        let _ = writer;
        self.invalidate(tags).await
    }
}

/// The key an entry is stored under: the query's key and its tags' generations.
pub fn entry_key(key: &str, generations: &[u64]) -> String {
    let generations: Vec<String> = generations.iter().map(u64::to_string).collect();
    format!("{key}@{}", generations.join("."))
}

/// Hits and misses, for the metrics.
#[derive(Debug, Default)]
pub struct CacheStats {
    hits: AtomicU64,
    misses: AtomicU64,
}

impl CacheStats {
    pub fn hit(&self) {
        self.hits.fetch_add(1, Ordering::Relaxed);
    }

    pub fn miss(&self) {
        self.misses.fetch_add(1, Ordering::Relaxed);
    }

    /// Queries answered from the cache so far.
    pub fn hits(&self) -> u64 {
        self.hits.load(Ordering::Relaxed)
    }

    /// Cacheable queries that ran their handler so far.
    pub fn misses(&self) -> u64 {
        self.misses.load(Ordering::Relaxed)
    }
}

struct State {
    entries: HashMap<String, (Vec<u8>, Instant)>,
    generations: HashMap<String, u64>,
}

/// A bounded map in this process, entries expiring after a TTL. Only for one
/// process (embedded mode): another process's commands cannot reach it.
pub struct InProcessQueryCache {
    ttl: Duration,
    capacity: usize,
    // A std mutex: never held across an await; every operation is short.
    state: std::sync::Mutex<State>,
}

impl InProcessQueryCache {
    pub fn new(ttl: Duration, capacity: usize) -> Self {
        Self {
            ttl,
            capacity: capacity.max(1),
            state: std::sync::Mutex::new(State {
                entries: HashMap::new(),
                generations: HashMap::new(),
            }),
        }
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

#[async_trait]
impl QueryCache for InProcessQueryCache {
    async fn generations(&self, tags: &[String]) -> Result<Vec<u64>> {
        let state = self.state();
        Ok(tags
            .iter()
            .map(|tag| state.generations.get(tag).copied().unwrap_or(0))
            .collect())
    }

    async fn get(&self, key: &str) -> Result<Option<Vec<u8>>> {
        let mut state = self.state();
        match state.entries.get(key) {
            Some((value, expires)) if *expires > Instant::now() => Ok(Some(value.clone())),
            Some(_) => {
                state.entries.remove(key);
                Ok(None)
            }
            None => Ok(None),
        }
    }

    async fn put(&self, key: &str, value: Vec<u8>, tags: &[String], generations: &[u64]) -> Result<bool> {
        let mut state = self.state();
        let current = tags
            .iter()
            .zip(generations)
            .all(|(tag, generation)| state.generations.get(tag).copied().unwrap_or(0) == *generation);
        if !current || tags.len() != generations.len() {
            return Ok(false);
        }
        let now = Instant::now();
        if state.entries.len() >= self.capacity && !state.entries.contains_key(key) {
            state.entries.retain(|_, (_, expires)| *expires > now);
            if state.entries.len() >= self.capacity {
                // Still full of live entries: drop one (any) to make room.
                if let Some(victim) = state.entries.keys().next().cloned() {
                    state.entries.remove(&victim);
                }
            }
        }
        state.entries.insert(key.to_owned(), (value, now + self.ttl));
        Ok(true)
    }

    async fn invalidate(&self, tags: &[String]) -> Result<()> {
        let mut state = self.state();
        for tag in tags {
            *state.generations.entry(tag.clone()).or_insert(0) += 1;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    fn tags() -> Vec<String> {
        vec!["identity.user:1".to_owned()]
    }

    #[tokio::test]
    async fn an_entry_is_found_under_its_generations() {
        let cache = InProcessQueryCache::new(Duration::from_secs(60), 10);
        let generations = cache.generations(&tags()).await.unwrap();
        let key = entry_key("q:1", &generations);
        assert!(cache.put(&key, b"old".to_vec(), &tags(), &generations).await.unwrap());
        assert_eq!(cache.get(&key).await.unwrap().as_deref(), Some(&b"old"[..]));
        cache.invalidate(&tags()).await.unwrap();
        let after = cache.generations(&tags()).await.unwrap();
        assert_eq!(cache.get(&entry_key("q:1", &after)).await.unwrap(), None);
    }

    /// Reader reads generations and the old row; a writer commits and
    /// invalidates; the reader's put must not store the old row.
    #[tokio::test]
    async fn a_fill_that_raced_an_invalidation_is_dropped() {
        let cache = InProcessQueryCache::new(Duration::from_secs(60), 10);
        let before = cache.generations(&tags()).await.unwrap();
        cache.invalidate(&tags()).await.unwrap();
        assert!(
            !cache
                .put(&entry_key("q:1", &before), b"old".to_vec(), &tags(), &before)
                .await
                .unwrap()
        );
        let after = cache.generations(&tags()).await.unwrap();
        assert_eq!(cache.get(&entry_key("q:1", &after)).await.unwrap(), None);
        assert_eq!(cache.get(&entry_key("q:1", &before)).await.unwrap(), None);
    }

    #[tokio::test]
    async fn entries_expire_and_the_map_stays_bounded() {
        let cache = InProcessQueryCache::new(Duration::from_millis(0), 2);
        for i in 0..5 {
            cache.put(&format!("k{i}"), vec![1], &[], &[]).await.unwrap();
        }
        assert!(cache.state().entries.len() <= 2);
        assert_eq!(cache.get("k4").await.unwrap(), None, "expired");
    }
}
