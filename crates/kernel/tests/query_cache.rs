//! The bus's query cache on a real SQLite database, with the in-process
//! adapter: a cached answer skips the handler; a committed command forgets
//! the answers its events name before it answers; and a read that raced a
//! write never leaves the old value behind.

#![allow(clippy::unwrap_used)]

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use keel_kernel::query_cache::InProcessQueryCache;
use keel_kernel::{
    Bus, BusBuilder, Command, CommandContext, CommandHandler, DomainEvent, Query, QueryContext, QueryHandler,
    RequestContext, Result,
};
use sea_orm::{ConnectionTrait, Database, Statement};
use tokio::sync::Notify;

struct Changed;

impl DomainEvent for Changed {
    const NAME: &'static str = "test.item.changed";
    const PAYLOAD_TYPE: &'static str = "test.Changed";

    fn encode_payload(&self) -> Vec<u8> {
        Vec::new()
    }
}

struct SetValue {
    id: i64,
    value: i64,
}

impl Command for SetValue {
    const NAME: &'static str = "test.set_value";
    type Output = ();
}

struct ReadValue {
    id: i64,
}

impl Query for ReadValue {
    const NAME: &'static str = "test.read_value";
    type Output = i64;

    fn cache_key(&self) -> Option<String> {
        Some(self.id.to_string())
    }

    fn cache_tags(&self) -> Vec<String> {
        vec![format!("item:{}", self.id)]
    }
}

/// Once armed, the next read tells `read` after its database read and
/// waits for `proceed` before it answers.
#[derive(Default)]
struct Gate {
    armed: std::sync::atomic::AtomicBool,
    read: Notify,
    proceed: Notify,
}

struct Handlers {
    reads: Arc<AtomicUsize>,
    gate: Arc<Gate>,
}

#[async_trait]
impl CommandHandler<SetValue> for Handlers {
    async fn handle(&self, ctx: &CommandContext<'_>, command: SetValue) -> Result<()> {
        ctx.tx()
            .await?
            .execute_unprepared(&format!(
                "UPDATE items SET value = {} WHERE id = {}",
                command.value, command.id
            ))
            .await?;
        ctx.record(&Changed, None, command.id.to_string());
        Ok(())
    }
}

#[async_trait]
impl QueryHandler<ReadValue> for Handlers {
    async fn handle(&self, ctx: &QueryContext<'_>, query: ReadValue) -> Result<i64> {
        self.reads.fetch_add(1, Ordering::SeqCst);
        let row = ctx
            .db
            .query_one_raw(Statement::from_string(
                ctx.db.get_database_backend(),
                format!("SELECT value FROM items WHERE id = {}", query.id),
            ))
            .await?
            .unwrap();
        let value = row.try_get::<i64>("", "value")?;
        if self.gate.armed.swap(false, Ordering::SeqCst) {
            self.gate.read.notify_one();
            self.gate.proceed.notified().await;
        }
        Ok(value)
    }
}

async fn bus(dir: &tempfile::TempDir) -> (Bus, Arc<AtomicUsize>, Arc<Gate>) {
    let url = format!("sqlite://{}?mode=rwc", dir.path().join("cache.db").display());
    let db = Database::connect(url).await.unwrap();
    db.execute_unprepared("CREATE TABLE items (id INTEGER PRIMARY KEY, value INTEGER NOT NULL)")
        .await
        .unwrap();
    db.execute_unprepared("INSERT INTO items (id, value) VALUES (1, 10), (2, 20)")
        .await
        .unwrap();
    let reads = Arc::new(AtomicUsize::new(0));
    let gate = Arc::new(Gate::default());
    let mut builder = BusBuilder::new(db);
    builder
        .command::<SetValue>(Handlers {
            reads: reads.clone(),
            gate: gate.clone(),
        })
        .query::<ReadValue>(Handlers {
            reads: reads.clone(),
            gate: gate.clone(),
        })
        .query_cache(Arc::new(InProcessQueryCache::new(Duration::from_secs(60), 100)))
        .invalidate_on(Changed::NAME, "item");
    (builder.build(), reads, gate)
}

#[tokio::test]
async fn a_cached_answer_skips_the_handler_until_a_command_changes_it() {
    let dir = tempfile::tempdir().unwrap();
    let (bus, reads, _) = bus(&dir).await;
    let ctx = RequestContext::new("test");
    assert_eq!(bus.ask(&ctx, ReadValue { id: 1 }).await.unwrap(), 10);
    assert_eq!(bus.ask(&ctx, ReadValue { id: 1 }).await.unwrap(), 10);
    assert_eq!(reads.load(Ordering::SeqCst), 1, "the second read was a hit");
    assert_eq!(bus.query_cache_stats().hits(), 1);

    // A change of another item forgets nothing of this one.
    bus.execute(&ctx, SetValue { id: 2, value: 21 }).await.unwrap();
    assert_eq!(bus.ask(&ctx, ReadValue { id: 1 }).await.unwrap(), 10);
    assert_eq!(reads.load(Ordering::SeqCst), 1);

    bus.execute(&ctx, SetValue { id: 1, value: 11 }).await.unwrap();
    assert_eq!(bus.ask(&ctx, ReadValue { id: 1 }).await.unwrap(), 11);
    assert_eq!(reads.load(Ordering::SeqCst), 2);
}

/// The reader reads the old row; the writer commits and invalidates; the
/// reader then stores what it read. The next read must see the new value.
#[tokio::test]
async fn a_read_that_raced_a_write_leaves_no_stale_entry() {
    let dir = tempfile::tempdir().unwrap();
    let (bus, _, gate) = bus(&dir).await;
    gate.armed.store(true, Ordering::SeqCst);
    let reader = {
        let bus = bus.clone();
        tokio::spawn(async move { bus.ask(&RequestContext::new("reader"), ReadValue { id: 1 }).await })
    };
    tokio::time::timeout(Duration::from_secs(10), gate.read.notified())
        .await
        .unwrap();
    bus.execute(&RequestContext::new("writer"), SetValue { id: 1, value: 12 })
        .await
        .unwrap();
    gate.proceed.notify_one();
    // Concurrent with the write, the reader may answer the old value...
    assert_eq!(reader.await.unwrap().unwrap(), 10);
    // ...but it stored nothing that a later read finds.
    assert_eq!(
        bus.ask(&RequestContext::new("later"), ReadValue { id: 1 })
            .await
            .unwrap(),
        12
    );
}
