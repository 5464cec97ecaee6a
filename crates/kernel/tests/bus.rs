//! The command bus on a real SQLite database: one transaction per command,
//! committed only on success, the middleware chain in order, deadlines honoured.

#![allow(clippy::unwrap_used)]

use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use keel_kernel::bus::{BoxFuture, CallInfo, Middleware};
use keel_kernel::{
    BusBuilder, Code, Command, CommandContext, CommandHandler, Error, Live, Output, Query, QueryContext, QueryHandler,
    RequestContext, Result,
};
use sea_orm::{ConnectionTrait, Database, DatabaseConnection, Statement};

struct Insert {
    value: i64,
    fail_after_insert: bool,
    sleep: Duration,
    /// Told once the row is inserted, before the sleep and the commit.
    inserted: Option<Arc<tokio::sync::Notify>>,
}

impl Command for Insert {
    const NAME: &'static str = "test.insert";
    type Output = i64;
}

struct Count;

impl Query for Count {
    const NAME: &'static str = "test.count";
    type Output = i64;
}

struct Handlers;

#[async_trait]
impl CommandHandler<Insert> for Handlers {
    async fn handle(&self, ctx: &CommandContext<'_>, command: Insert) -> Result<i64> {
        let tx = ctx.tx().await?;
        tx.execute_unprepared(&format!("INSERT INTO items (value) VALUES ({})", command.value))
            .await?;
        if let Some(inserted) = &command.inserted {
            inserted.notify_one();
        }
        tokio::time::sleep(command.sleep).await;
        if command.fail_after_insert {
            return Err(Error::invalid_field("value", "refused after the write"));
        }
        Ok(command.value)
    }
}

#[async_trait]
impl QueryHandler<Count> for Handlers {
    async fn handle(&self, ctx: &QueryContext<'_>, _query: Count) -> Result<i64> {
        let row = ctx
            .db
            .query_one_raw(Statement::from_string(
                ctx.db.get_database_backend(),
                "SELECT COUNT(*) AS n FROM items",
            ))
            .await?
            .unwrap();
        Ok(row.try_get::<i64>("", "n")?)
    }
}

struct Recorder {
    label: &'static str,
    seen: Arc<Mutex<Vec<String>>>,
}

impl Middleware for Recorder {
    fn around<'a>(&'a self, call: CallInfo<'a>, next: BoxFuture<'a, Result<Output>>) -> BoxFuture<'a, Result<Output>> {
        Box::pin(async move {
            self.seen
                .lock()
                .unwrap()
                .push(format!("{} before {}", self.label, call.name));
            let outcome = next.await;
            self.seen
                .lock()
                .unwrap()
                .push(format!("{} after {} ok={}", self.label, call.name, outcome.is_ok()));
            outcome
        })
    }
}

/// What an idempotency layer or a cache does, reduced to its core: the first
/// call of a request id runs and its reply is kept as bytes; a repeat is
/// answered from the bytes without running the handler. Replies that cannot
/// be stored pass through, and their repeats run again.
#[derive(Default)]
struct Replayer {
    stored: Mutex<std::collections::HashMap<String, Vec<u8>>>,
}

impl Middleware for Replayer {
    fn around<'a>(&'a self, call: CallInfo<'a>, next: BoxFuture<'a, Result<Output>>) -> BoxFuture<'a, Result<Output>> {
        Box::pin(async move {
            let key = format!("{}:{}", call.name, call.request.request_id);
            let kept = self.stored.lock().unwrap().get(&key).cloned();
            if let Some(bytes) = kept {
                return call.restore(&bytes);
            }
            let output = next.await?;
            if let Some(bytes) = output.to_bytes() {
                self.stored.lock().unwrap().insert(key, bytes?);
            }
            Ok(output)
        })
    }
}

/// A reply with structure, stored and restored as it is.
#[derive(Debug, PartialEq, serde::Serialize, serde::Deserialize)]
struct Receipt {
    value: i64,
    note: String,
}

struct InsertWithReceipt(i64);

impl Command for InsertWithReceipt {
    const NAME: &'static str = "test.insert_with_receipt";
    type Output = Receipt;
}

#[async_trait]
impl CommandHandler<InsertWithReceipt> for Handlers {
    async fn handle(&self, ctx: &CommandContext<'_>, command: InsertWithReceipt) -> Result<Receipt> {
        ctx.tx()
            .await?
            .execute_unprepared(&format!("INSERT INTO items (value) VALUES ({})", command.0))
            .await?;
        Ok(Receipt {
            value: command.0,
            note: format!("inserted {}", command.0),
        })
    }
}

struct Watch;

impl Query for Watch {
    const NAME: &'static str = "test.watch";
    type Output = Live<tokio::sync::mpsc::Receiver<i64>>;
}

#[async_trait]
impl QueryHandler<Watch> for Handlers {
    async fn handle(&self, _ctx: &QueryContext<'_>, _query: Watch) -> Result<Live<tokio::sync::mpsc::Receiver<i64>>> {
        let (sender, receiver) = tokio::sync::mpsc::channel(1);
        sender.send(7).await.map_err(Error::internal)?;
        Ok(Live(receiver))
    }
}

async fn database(dir: &tempfile::TempDir) -> DatabaseConnection {
    let url = format!("sqlite://{}?mode=rwc", dir.path().join("bus.db").display());
    let db = Database::connect(url).await.unwrap();
    db.execute_unprepared("CREATE TABLE items (value INTEGER NOT NULL)")
        .await
        .unwrap();
    db
}

fn insert(value: i64, fail_after_insert: bool, sleep: Duration) -> Insert {
    Insert {
        value,
        fail_after_insert,
        sleep,
        inserted: None,
    }
}

#[tokio::test]
async fn a_command_commits_on_success_and_leaves_nothing_on_failure() {
    let dir = tempfile::tempdir().unwrap();
    let mut builder = BusBuilder::new(database(&dir).await);
    builder.command::<Insert>(Handlers).query::<Count>(Handlers);
    let bus = builder.build();
    let ctx = RequestContext::new("test");

    assert_eq!(bus.execute(&ctx, insert(1, false, Duration::ZERO)).await.unwrap(), 1);
    let error = bus.execute(&ctx, insert(2, true, Duration::ZERO)).await.unwrap_err();
    assert_eq!(error.code(), Code::InvalidArgument);
    assert_eq!(bus.ask(&ctx, Count).await.unwrap(), 1);
}

#[tokio::test]
async fn an_expired_deadline_is_deadline_exceeded_and_rolls_back() {
    let dir = tempfile::tempdir().unwrap();
    let mut builder = BusBuilder::new(database(&dir).await);
    builder.command::<Insert>(Handlers).query::<Count>(Handlers);
    let bus = builder.build();
    let mut ctx = RequestContext::new("test");
    ctx.deadline = Some(tokio::time::Instant::now() + Duration::from_millis(50));

    let error = bus
        .execute(&ctx, insert(1, false, Duration::from_millis(500)))
        .await
        .unwrap_err();
    assert_eq!(error.code(), Code::DeadlineExceeded);
    ctx.deadline = None;
    assert_eq!(bus.ask(&ctx, Count).await.unwrap(), 0);
    // The writer slot was released with the dropped transaction.
    assert_eq!(bus.execute(&ctx, insert(3, false, Duration::ZERO)).await.unwrap(), 3);
}

#[tokio::test]
async fn middleware_wraps_every_call_outermost_first() {
    let dir = tempfile::tempdir().unwrap();
    let seen = Arc::new(Mutex::new(Vec::new()));
    let mut builder = BusBuilder::new(database(&dir).await);
    builder
        .command::<Insert>(Handlers)
        .query::<Count>(Handlers)
        .middleware(Recorder {
            label: "outer",
            seen: seen.clone(),
        })
        .middleware(Recorder {
            label: "inner",
            seen: seen.clone(),
        });
    let bus = builder.build();
    let ctx = RequestContext::new("test");
    bus.execute(&ctx, insert(1, true, Duration::ZERO)).await.unwrap_err();
    bus.ask(&ctx, Count).await.unwrap();
    assert_eq!(
        *seen.lock().unwrap(),
        [
            "outer before test.insert",
            "inner before test.insert",
            "inner after test.insert ok=false",
            "outer after test.insert ok=false",
            "outer before test.count",
            "inner before test.count",
            "inner after test.count ok=true",
            "outer after test.count ok=true",
        ]
    );
}

#[tokio::test]
async fn an_unregistered_command_is_an_internal_error() {
    let dir = tempfile::tempdir().unwrap();
    let bus = BusBuilder::new(database(&dir).await).build();
    let error = bus
        .execute(&RequestContext::new("test"), insert(1, false, Duration::ZERO))
        .await
        .unwrap_err();
    assert_eq!(error.code(), Code::Internal);
}

#[tokio::test]
async fn middleware_can_store_a_typed_reply_and_replay_it_without_the_handler() {
    let dir = tempfile::tempdir().unwrap();
    let mut builder = BusBuilder::new(database(&dir).await);
    builder
        .command::<InsertWithReceipt>(Handlers)
        .query::<Count>(Handlers)
        .query::<Watch>(Handlers)
        .middleware(Replayer::default());
    let bus = builder.build();
    let first = RequestContext::new("first");

    let receipt = bus.execute(&first, InsertWithReceipt(5)).await.unwrap();
    let replayed = bus.execute(&first, InsertWithReceipt(5)).await.unwrap();
    assert_eq!(replayed, receipt);
    assert_eq!(
        bus.ask(&first, Count).await.unwrap(),
        1,
        "the replay must not run the handler again"
    );

    let other = RequestContext::new("other");
    assert_eq!(bus.execute(&other, InsertWithReceipt(6)).await.unwrap().value, 6);
    assert_eq!(bus.ask(&other, Count).await.unwrap(), 2);

    // A live reply is not stored: each ask gets a channel of its own.
    for _ in 0..2 {
        let Live(mut receiver) = bus.ask(&first, Watch).await.unwrap();
        assert_eq!(receiver.recv().await, Some(7));
    }
}

#[tokio::test]
async fn a_command_whose_caller_goes_away_still_runs_to_its_end() {
    let dir = tempfile::tempdir().unwrap();
    let mut builder = BusBuilder::new(database(&dir).await);
    builder.command::<Insert>(Handlers).query::<Count>(Handlers);
    let bus = builder.build();
    let ctx = RequestContext::new("test");

    // The caller (a request whose client disconnected) is dropped while the
    // command sits between its INSERT and its COMMIT.
    let inserted = Arc::new(tokio::sync::Notify::new());
    let command = Insert {
        inserted: Some(inserted.clone()),
        ..insert(1, false, Duration::from_millis(300))
    };
    let caller = {
        let (bus, ctx) = (bus.clone(), ctx.clone());
        tokio::spawn(async move { bus.execute(&ctx, command).await })
    };
    inserted.notified().await;
    caller.abort();
    assert!(caller.await.unwrap_err().is_cancelled());

    // The command commits on its own; nothing is left half-done.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while bus.ask(&ctx, Count).await.unwrap() != 1 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the abandoned command never committed"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(bus.execute(&ctx, insert(2, false, Duration::ZERO)).await.unwrap(), 2);
    assert_eq!(bus.ask(&ctx, Count).await.unwrap(), 2);
}

/// Inserts a row; once committed, counts the rows (on another connection)
/// into `seen`.
struct InsertThenCount {
    value: i64,
    fail: bool,
    seen: Arc<Mutex<Vec<i64>>>,
}

impl Command for InsertThenCount {
    const NAME: &'static str = "test.insert_then_count";
    type Output = ();
}

#[async_trait]
impl CommandHandler<InsertThenCount> for Handlers {
    async fn handle(&self, ctx: &CommandContext<'_>, command: InsertThenCount) -> Result<()> {
        ctx.tx()
            .await?
            .execute_unprepared(&format!("INSERT INTO items (value) VALUES ({})", command.value))
            .await?;
        let (db, seen) = (ctx.db.clone(), command.seen.clone());
        ctx.after_commit(async move {
            let row = db
                .query_one_raw(Statement::from_string(
                    db.get_database_backend(),
                    "SELECT COUNT(*) AS n FROM items",
                ))
                .await
                .unwrap()
                .unwrap();
            seen.lock().unwrap().push(row.try_get::<i64>("", "n").unwrap());
        });
        if command.fail {
            return Err(Error::invalid_field("value", "refused after the write"));
        }
        Ok(())
    }
}

#[tokio::test]
async fn after_commit_work_sees_the_commit_and_finishes_before_the_caller_is_answered() {
    let dir = tempfile::tempdir().unwrap();
    let mut builder = BusBuilder::new(database(&dir).await);
    builder.command::<InsertThenCount>(Handlers);
    let bus = builder.build();
    let ctx = RequestContext::new("test");
    let seen = Arc::new(Mutex::new(Vec::new()));
    let command = |value, fail| InsertThenCount {
        value,
        fail,
        seen: seen.clone(),
    };
    bus.execute(&ctx, command(1, false)).await.unwrap();
    assert_eq!(*seen.lock().unwrap(), [1], "ran after the commit, before the answer");
    bus.execute(&ctx, command(2, true)).await.unwrap_err();
    assert_eq!(*seen.lock().unwrap(), [1], "a rolled-back command runs none");
    bus.execute(&ctx, command(3, false)).await.unwrap();
    assert_eq!(*seen.lock().unwrap(), [1, 2]);
}
