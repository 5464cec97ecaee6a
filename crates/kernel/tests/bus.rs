//! The command bus on a real SQLite database: one transaction per command,
//! committed only on success, the middleware chain in order, deadlines honoured.

#![allow(clippy::unwrap_used)]

use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use keel_kernel::bus::{BoxFuture, CallInfo, Erased, Middleware};
use keel_kernel::{
    BusBuilder, Code, Command, CommandContext, CommandHandler, Error, Query, QueryContext, QueryHandler,
    RequestContext, Result,
};
use sea_orm::{ConnectionTrait, Database, DatabaseConnection, Statement};

struct Insert {
    value: i64,
    fail_after_insert: bool,
    sleep: Duration,
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
    fn around<'a>(&'a self, call: CallInfo<'a>, next: BoxFuture<'a, Result<Erased>>) -> BoxFuture<'a, Result<Erased>> {
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
