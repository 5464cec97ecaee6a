//! Commands, queries and their buses.
//!
//! Handlers are registered once, at start-up, by the composition root; each
//! command or query type has exactly one. Every call goes through the same
//! chain: the bus's own span and timing, then the registered middleware
//! (idempotency, metrics, ... as later modules add them), then, for
//! commands, one database transaction around the handler, committed only when
//! the handler succeeds.
//!
//! Results are typed ([`Reply`]): middleware sees each one as an [`Output`]
//! that it can turn into bytes and back, so that an idempotency layer can
//! store a response and replay it, and a cache can keep one, without
//! knowing the command.
//!
//! Idempotency keys ([`crate::idempotency`]) are the bus's own, not a
//! middleware's: their record must be read and written in the command's
//! transaction, which only the bus holds.

use std::any::{Any, TypeId, type_name};
use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use async_trait::async_trait;
use sea_orm::{DatabaseBackend, DatabaseConnection, DatabaseTransaction, TransactionTrait};
use serde::Serialize;
use serde::de::DeserializeOwned;
use tokio::sync::{Mutex, MutexGuard, OnceCell};
use tracing::Instrument;

use crate::context::RequestContext;
use crate::error::{Code, Error, Result};
use crate::events::{DomainEvent, Outbox, PendingEvent};
use crate::idempotency::{Found, Idempotency, Stored};
use crate::jobs::{JobQueue, NewJob};
use crate::query_cache::{CacheStats, QueryCache, entry_key};

/// A request to change state. `NAME` names its span (`identity.register`).
pub trait Command: Send + 'static {
    const NAME: &'static str;
    type Output: Reply;
}

/// A request to read state.
pub trait Query: Send + 'static {
    const NAME: &'static str;
    type Output: Reply;

    /// Opts into the query cache ([`crate::query_cache`]): what tells this
    /// query's answers apart (`GetUser { id }`: the id). The bus adds the
    /// query's name and the caller (user, role, trusted), so an answer never
    /// reaches a caller with other rights; anything else the answer depends
    /// on belongs in the key. `None` (the default): never cached.
    fn cache_key(&self) -> Option<String> {
        None
    }

    /// The tags whose invalidation makes a cached answer stale
    /// (`identity.user:<id>`); see [`BusBuilder::invalidate_on`].
    fn cache_tags(&self) -> Vec<String> {
        Vec::new()
    }
}

/// What a command or query returns, in a form that middleware can keep:
/// every serde type is one (stored as JSON); a live stream is wrapped in
/// [`Live`], which middleware must pass through.
pub trait Reply: Send + Sized + 'static {
    /// A reply that cannot be stored (`to_bytes` is `None`) of a command
    /// that must not run twice: it made something whose secret is shown only
    /// in this reply (an API key). A keyed call records that it ran, without
    /// the reply, and a retry with its key is refused (ALREADY_EXISTS / 409)
    /// instead of making a second one. Other replies that cannot be stored
    /// (fresh sign-in tokens) leave no record: a retry runs again.
    const SHOWN_ONCE: bool = false;
    /// The reply as bytes to store, or `None` when it cannot be stored.
    fn to_bytes(&self) -> Option<Result<Vec<u8>>>;
    /// The reply that [`Reply::to_bytes`] stored.
    fn from_bytes(bytes: &[u8]) -> Result<Self>;
}

impl<T: Serialize + DeserializeOwned + Send + 'static> Reply for T {
    fn to_bytes(&self) -> Option<Result<Vec<u8>>> {
        Some(serde_json::to_vec(self).map_err(Error::internal))
    }

    fn from_bytes(bytes: &[u8]) -> Result<Self> {
        serde_json::from_slice(bytes).map_err(Error::internal)
    }
}

/// A reply that lives on after the call (a subscription's channel): it
/// cannot be stored, cached or replayed.
#[derive(Debug)]
pub struct Live<T>(pub T);

impl<T: Send + 'static> Reply for Live<T> {
    fn to_bytes(&self) -> Option<Result<Vec<u8>>> {
        None
    }

    fn from_bytes(_bytes: &[u8]) -> Result<Self> {
        Err(Error::internal("a live reply cannot be restored from bytes"))
    }
}

/// A reply on its way through the middleware chain, its type erased.
pub struct Output {
    value: Box<dyn Any + Send>,
    to_bytes: fn(&(dyn Any + Send)) -> Option<Result<Vec<u8>>>,
}

impl Output {
    pub fn new<R: Reply>(reply: R) -> Self {
        Self {
            value: Box::new(reply),
            to_bytes: |value| value.downcast_ref::<R>().and_then(R::to_bytes),
        }
    }

    /// The reply as bytes to store (see [`Reply::to_bytes`]).
    pub fn to_bytes(&self) -> Option<Result<Vec<u8>>> {
        (self.to_bytes)(self.value.as_ref())
    }

    fn into_reply<R: Reply>(self, name: &str) -> Result<R> {
        self.value
            .downcast::<R>()
            .map(|reply| *reply)
            .map_err(|_| Error::internal(format!("middleware changed the output type of {name}")))
    }
}

impl std::fmt::Debug for Output {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Output").finish_non_exhaustive()
    }
}

/// What a command handler works with: the caller, a connection for reads
/// that need no transaction, and the command's one transaction.
///
/// The transaction (and, on SQLite, the writer slot) is taken at the first
/// call to [`CommandContext::tx`], so that slow work without the database,
/// such as hashing a password, holds no lock.
pub struct CommandContext<'a> {
    pub request: &'a RequestContext,
    pub db: &'a DatabaseConnection,
    writer: Option<&'a Mutex<()>>,
    jobs: Option<&'a Arc<dyn JobQueue>>,
    enqueued: std::sync::atomic::AtomicBool,
    open: OnceCell<OpenTransaction<'a>>,
    // A std mutex: never held across an await.
    events: std::sync::Mutex<Vec<PendingEvent>>,
    after_commit: std::sync::Mutex<Vec<BoxFuture<'static, ()>>>,
}

struct OpenTransaction<'a> {
    tx: DatabaseTransaction,
    // Held until commit or rollback; dropped after the transaction ends.
    _writer: Option<MutexGuard<'a, ()>>,
}

impl<'a> CommandContext<'a> {
    /// The command's transaction, begun on first use.
    pub async fn tx(&self) -> Result<&DatabaseTransaction> {
        let open = self
            .open
            .get_or_try_init(|| async {
                let writer = match self.writer {
                    Some(writer) => Some(writer.lock().await),
                    None => None,
                };
                let tx = self.db.begin_with_options(write_transaction()).await?;
                Ok::<_, Error>(OpenTransaction { tx, _writer: writer })
            })
            .await?;
        Ok(&open.tx)
    }

    /// Records a domain event. It is written to the outbox in this command's
    /// transaction, and only if the command succeeds.
    pub fn record<E: DomainEvent>(&self, payload: &E, user_id: Option<uuid::Uuid>, aggregate_id: impl Into<String>) {
        let mut event = PendingEvent::new(payload, user_id, aggregate_id);
        event.idempotency_key = self.request.idempotency_key.clone();
        self.events
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .push(event);
    }

    /// Enqueues `job` in this command's transaction: it exists if and only
    /// if the command commits. Without a user of its own, the job is the
    /// caller's.
    pub async fn enqueue(&self, job: NewJob) -> Result<uuid::Uuid> {
        let mut ids = self.enqueue_all(vec![job]).await?;
        ids.pop().ok_or_else(|| Error::internal("the job queue returned no id"))
    }

    /// Enqueues several jobs in one write (see [`CommandContext::enqueue`]).
    pub async fn enqueue_all(&self, jobs: Vec<NewJob>) -> Result<Vec<uuid::Uuid>> {
        let queue = self
            .jobs
            .ok_or_else(|| Error::internal("no job queue is wired to the bus"))?;
        let caller = self.request.principal.as_ref().map(|principal| principal.user_id);
        let jobs = jobs
            .into_iter()
            .map(|mut job| {
                job.user_id = job.user_id.or(caller);
                job
            })
            .collect();
        let ids = queue.enqueue(self.tx().await?, jobs).await?;
        self.enqueued.store(true, std::sync::atomic::Ordering::Relaxed);
        Ok(ids)
    }

    /// Runs `work` once this command has committed, before its caller gets
    /// the answer (dropped if it rolls back). For what must be true by the
    /// time the caller learns of the change, such as every process's cache
    /// having forgotten what the change made stale.
    pub fn after_commit(&self, work: impl Future<Output = ()> + Send + 'static) {
        self.after_commit
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .push(Box::pin(work));
    }

    fn take_after_commit(&self) -> Vec<BoxFuture<'static, ()>> {
        std::mem::take(
            &mut *self
                .after_commit
                .lock()
                .unwrap_or_else(|poisoned| poisoned.into_inner()),
        )
    }

    fn take_events(&self) -> Vec<PendingEvent> {
        std::mem::take(&mut *self.events.lock().unwrap_or_else(|poisoned| poisoned.into_inner()))
    }

    async fn finish(self, success: bool) -> Result<()> {
        let Some(open) = self.open.into_inner() else {
            return Ok(());
        };
        let OpenTransaction { tx, _writer } = open;
        if success {
            tx.commit().await?;
        } else {
            tx.rollback().await?;
        }
        Ok(())
    }
}

/// What a query handler works with: the caller and a connection.
pub struct QueryContext<'a> {
    pub request: &'a RequestContext,
    pub db: &'a DatabaseConnection,
}

#[async_trait]
pub trait CommandHandler<C: Command>: Send + Sync + 'static {
    async fn handle(&self, ctx: &CommandContext<'_>, command: C) -> Result<C::Output>;
}

#[async_trait]
pub trait QueryHandler<Q: Query>: Send + Sync + 'static {
    async fn handle(&self, ctx: &QueryContext<'_>, query: Q) -> Result<Q::Output>;
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CallKind {
    Command,
    Query,
}

/// What middleware may know about a call.
#[derive(Clone, Copy)]
pub struct CallInfo<'a> {
    pub name: &'static str,
    pub kind: CallKind,
    pub request: &'a RequestContext,
    restore: fn(&[u8]) -> Result<Output>,
}

impl CallInfo<'_> {
    /// This call's reply from bytes that [`Output::to_bytes`] produced for
    /// the same command or query: how a middleware answers without the handler.
    pub fn restore(&self, bytes: &[u8]) -> Result<Output> {
        (self.restore)(bytes)
    }
}

impl std::fmt::Debug for CallInfo<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CallInfo")
            .field("name", &self.name)
            .field("kind", &self.kind)
            .field("request", &self.request)
            .finish()
    }
}

pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// One link of the chain around every handler. It receives the rest of the
/// chain as a future and may observe it, time it, or answer without it
/// (with [`CallInfo::restore`]).
pub trait Middleware: Send + Sync + 'static {
    fn around<'a>(&'a self, call: CallInfo<'a>, next: BoxFuture<'a, Result<Output>>) -> BoxFuture<'a, Result<Output>>;
}

type ErasedCommandHandler<C> = Arc<dyn CommandHandler<C>>;
type ErasedQueryHandler<Q> = Arc<dyn QueryHandler<Q>>;

/// Collects handlers and middleware at start-up, then becomes an immutable [`Bus`].
pub struct BusBuilder {
    db: DatabaseConnection,
    outbox: Option<Arc<dyn Outbox>>,
    jobs: Option<Arc<dyn JobQueue>>,
    commands: HashMap<TypeId, Box<dyn Any + Send + Sync>>,
    queries: HashMap<TypeId, Box<dyn Any + Send + Sync>>,
    middleware: Vec<Arc<dyn Middleware>>,
    idempotency: Option<std::time::Duration>,
    abort_after_commit: Option<String>,
    query_cache: Option<Arc<dyn QueryCache>>,
    invalidations: HashMap<&'static str, Vec<&'static str>>,
}

impl BusBuilder {
    pub fn new(db: DatabaseConnection) -> Self {
        Self {
            db,
            outbox: None,
            jobs: None,
            commands: HashMap::new(),
            queries: HashMap::new(),
            middleware: Vec::new(),
            idempotency: None,
            abort_after_commit: None,
            query_cache: None,
            invalidations: HashMap::new(),
        }
    }

    /// Keeps the answers of queries that opt in ([`Query::cache_key`]).
    pub fn query_cache(&mut self, cache: Arc<dyn QueryCache>) -> &mut Self {
        self.query_cache = Some(cache);
        self
    }

    /// A committed command that recorded event `event` invalidates the tag
    /// `<tag_prefix>:<the event's aggregate id>`, before it answers.
    pub fn invalidate_on(&mut self, event: &'static str, tag_prefix: &'static str) -> &mut Self {
        self.invalidations.entry(event).or_default().push(tag_prefix);
        self
    }

    /// Honours commands' idempotency keys, keeping each record for `ttl`
    /// (needs the `kernel_idempotency` table). Without it a key only
    /// travels into the command's events.
    pub fn idempotency(&mut self, ttl: std::time::Duration) -> &mut Self {
        self.idempotency = Some(ttl);
        self
    }

    /// A test hook (`KEEL_TEST_ABORT_AFTER_COMMIT`): the process aborts
    /// right after a `command` that carried an idempotency key commits,
    /// before anyone hears of it, as a crash there would. Crash-consistency tests use it; nothing else may.
    pub fn abort_after_commit(&mut self, command: impl Into<String>) -> &mut Self {
        self.abort_after_commit = Some(command.into());
        self
    }

    /// Registers the handler of `C`. Registering twice is a wiring bug.
    pub fn command<C: Command>(&mut self, handler: impl CommandHandler<C>) -> &mut Self {
        let handler: ErasedCommandHandler<C> = Arc::new(handler);
        let previous = self.commands.insert(TypeId::of::<C>(), Box::new(handler));
        assert!(previous.is_none(), "two handlers for command {}", type_name::<C>());
        self
    }

    pub fn query<Q: Query>(&mut self, handler: impl QueryHandler<Q>) -> &mut Self {
        let handler: ErasedQueryHandler<Q> = Arc::new(handler);
        let previous = self.queries.insert(TypeId::of::<Q>(), Box::new(handler));
        assert!(previous.is_none(), "two handlers for query {}", type_name::<Q>());
        self
    }

    /// Where commands' events go. Without an outbox, recorded events are dropped.
    pub fn outbox(&mut self, outbox: Arc<dyn Outbox>) -> &mut Self {
        self.outbox = Some(outbox);
        self
    }

    /// Where commands' jobs go ([`CommandContext::enqueue`]). Without one,
    /// enqueueing fails.
    pub fn jobs(&mut self, jobs: Arc<dyn JobQueue>) -> &mut Self {
        self.jobs = Some(jobs);
        self
    }

    /// Adds a link to the chain; the first added is the outermost.
    pub fn middleware(&mut self, middleware: impl Middleware) -> &mut Self {
        self.middleware.push(Arc::new(middleware));
        self
    }

    pub fn build(self) -> Bus {
        // SQLite has one writer. Queueing command transactions here, instead
        // of letting them race for the file lock, avoids SQLITE_BUSY when a
        // deferred transaction upgrades from read to write.
        let writer = (self.db.get_database_backend() == DatabaseBackend::Sqlite).then(|| Mutex::new(()));
        Bus {
            inner: Arc::new(Inner {
                db: self.db,
                outbox: self.outbox,
                jobs: self.jobs,
                writer,
                commands: self.commands,
                queries: self.queries,
                middleware: self.middleware,
                idempotency: self.idempotency.map(Idempotency::new),
                abort_after_commit: self.abort_after_commit,
                query_cache: self.query_cache,
                invalidations: self.invalidations,
                cache_stats: CacheStats::default(),
            }),
        }
    }
}

struct Inner {
    db: DatabaseConnection,
    outbox: Option<Arc<dyn Outbox>>,
    jobs: Option<Arc<dyn JobQueue>>,
    writer: Option<Mutex<()>>,
    commands: HashMap<TypeId, Box<dyn Any + Send + Sync>>,
    queries: HashMap<TypeId, Box<dyn Any + Send + Sync>>,
    middleware: Vec<Arc<dyn Middleware>>,
    idempotency: Option<Idempotency>,
    abort_after_commit: Option<String>,
    query_cache: Option<Arc<dyn QueryCache>>,
    invalidations: HashMap<&'static str, Vec<&'static str>>,
    cache_stats: CacheStats,
}

/// The command bus and the query bus, cheap to clone.
#[derive(Clone)]
pub struct Bus {
    inner: Arc<Inner>,
}

impl Bus {
    pub fn db(&self) -> &DatabaseConnection {
        &self.inner.db
    }

    /// The query cache's hits and misses in this process.
    pub fn query_cache_stats(&self) -> &CacheStats {
        &self.inner.cache_stats
    }

    /// Runs `command` in one transaction through the middleware chain.
    ///
    /// The command runs in a task of its own, to its end: a caller that goes
    /// away (a client disconnecting) or whose deadline passes stops waiting,
    /// but never cancels the command between two statements of its
    /// transaction. A cancelled transaction future can hand its connection
    /// back to the pool still inside the transaction, whose half-done writes
    /// the next user of the connection would commit. Past the deadline the
    /// command rolls back instead of committing, and the caller gets
    /// DEADLINE_EXCEEDED at the deadline.
    pub async fn execute<C: Command>(&self, ctx: &RequestContext, command: C) -> Result<C::Output> {
        let bus = self.clone();
        let task_ctx = ctx.clone();
        // The task carries the caller's span, so its logs keep the request
        // id, and its sampling: a call left out of traces leaves it out.
        let task = tokio::spawn(crate::trace::keep_sampling(
            async move { bus.execute_to_the_end(&task_ctx, command).await }.instrument(tracing::Span::current()),
        ));
        let joined = match ctx.deadline {
            Some(deadline) => match tokio::time::timeout_at(deadline, task).await {
                Ok(joined) => joined,
                Err(_) => return Err(deadline_exceeded()),
            },
            None => task.await,
        };
        joined.map_err(|error| Error::internal(format!("command {} failed: {error}", C::NAME)))?
    }

    async fn execute_to_the_end<C: Command>(&self, ctx: &RequestContext, command: C) -> Result<C::Output> {
        let handler = self
            .inner
            .commands
            .get(&TypeId::of::<C>())
            .and_then(|handler| handler.downcast_ref::<ErasedCommandHandler<C>>())
            .cloned()
            .ok_or_else(|| unregistered(C::NAME))?;
        let inner = &self.inner;
        let terminal: BoxFuture<'_, Result<Output>> = Box::pin(async move {
            let command_ctx = CommandContext {
                request: ctx,
                db: &inner.db,
                writer: inner.writer.as_ref(),
                jobs: inner.jobs.as_ref(),
                enqueued: std::sync::atomic::AtomicBool::new(false),
                open: OnceCell::new(),
                events: std::sync::Mutex::new(Vec::new()),
                after_commit: std::sync::Mutex::new(Vec::new()),
            };
            // A keyed command claims its key in this process, then looks it
            // up in its own transaction (begun here, before the handler).
            let claim = match (&inner.idempotency, &ctx.idempotency_key) {
                (Some(idempotency), Some(key)) => Some(idempotency.claim(ctx, C::NAME, key)?),
                _ => None,
            };
            if let Some(claim) = &claim {
                match claim.look_up(command_ctx.tx().await?, crate::clock::now()).await {
                    Ok(Found::Absent) => {}
                    Ok(Found::Replay(bytes)) => {
                        command_ctx.finish(false).await?;
                        let output = restore::<C::Output>(&bytes)?;
                        ctx.mark_replayed();
                        return Ok(output);
                    }
                    Ok(Found::ShownOnce) => {
                        command_ctx.finish(false).await?;
                        return Err(Error::already_exists(
                            "the request with this idempotency key already ran; its reply held a secret \
                             shown only once, so it is not replayed (list what it made; use a new key to \
                             make another)",
                        ));
                    }
                    Err(error) => {
                        command_ctx.finish(false).await?;
                        return Err(error);
                    }
                }
            }
            let mut outcome = handler.handle(&command_ctx, command).await;
            if outcome.is_ok()
                && ctx
                    .deadline
                    .is_some_and(|deadline| deadline <= tokio::time::Instant::now())
            {
                // The caller was told DEADLINE_EXCEEDED: nothing commits.
                outcome = Err(deadline_exceeded());
            }
            let events = command_ctx.take_events();
            let after_commit = command_ctx.take_after_commit();
            if let (Some(claim), Ok(reply)) = (&claim, &outcome) {
                // A reply that cannot be stored (it holds credentials) leaves
                // no record, and a retry runs again, unless it was shown once.
                match reply.to_bytes() {
                    Some(Ok(bytes)) => {
                        claim
                            .record(command_ctx.tx().await?, Stored::Reply(bytes), crate::clock::now())
                            .await?
                    }
                    Some(Err(error)) => outcome = Err(error),
                    None if C::Output::SHOWN_ONCE => {
                        claim
                            .record(command_ctx.tx().await?, Stored::ShownOnce, crate::clock::now())
                            .await?
                    }
                    None => {}
                }
            }
            let wrote_events = match (&outcome, &inner.outbox) {
                (Ok(_), Some(outbox)) if !events.is_empty() => {
                    outbox.write(command_ctx.tx().await?, &events).await?;
                    true
                }
                _ => false,
            };
            let enqueued = outcome.is_ok() && command_ctx.enqueued.load(std::sync::atomic::Ordering::Relaxed);
            // The tags this commit will invalidate are held first: should
            // this process die between the commit and the invalidation, no
            // other process answers from an entry of before the write.
            let stale = if outcome.is_ok() {
                stale_tags(inner, &events)
            } else {
                Vec::new()
            };
            // Only a command that makes cached tags stale needs a name for its hold.
            let writer = if stale.is_empty() {
                String::new()
            } else {
                crate::id::new_id().to_string()
            };
            hold(inner, &stale, &writer).await;
            if outcome.is_ok()
                && !stale.is_empty()
                && ctx
                    .deadline
                    .is_some_and(|deadline| deadline <= tokio::time::Instant::now())
            {
                // The hold took the rest of the caller's time: nothing commits.
                outcome = Err(deadline_exceeded());
            }
            if let Err(error) = command_ctx.finish(outcome.is_ok()).await {
                // Not committed: the hold is let go at once.
                release(inner, &stale, &writer).await;
                return Err(error);
            }
            if outcome.is_err() {
                release(inner, &stale, &writer).await;
            }
            if outcome.is_ok() && claim.is_some() && inner.abort_after_commit.as_deref() == Some(C::NAME) {
                tracing::error!(
                    command = C::NAME,
                    "KEEL_TEST_ABORT_AFTER_COMMIT: aborting after the commit"
                );
                std::process::abort();
            }
            if wrote_events && let Some(outbox) = &inner.outbox {
                outbox.committed();
            }
            if enqueued && let Some(jobs) = &inner.jobs {
                jobs.committed();
            }
            if outcome.is_ok() {
                for work in after_commit {
                    work.await;
                }
                release(inner, &stale, &writer).await;
            }
            outcome.map(Output::new)
        });
        let output = self
            .run(CallKind::Command, C::NAME, ctx, restore::<C::Output>, terminal)
            .await?;
        output.into_reply(C::NAME)
    }

    /// Runs `query` through the middleware chain, outside any transaction.
    pub async fn ask<Q: Query>(&self, ctx: &RequestContext, query: Q) -> Result<Q::Output> {
        let handler = self
            .inner
            .queries
            .get(&TypeId::of::<Q>())
            .and_then(|handler| handler.downcast_ref::<ErasedQueryHandler<Q>>())
            .cloned()
            .ok_or_else(|| unregistered(Q::NAME))?;
        let db = &self.inner.db;
        let cached = match (&self.inner.query_cache, query.cache_key()) {
            (Some(cache), Some(key)) => Some((
                cache,
                format!("{}:{key}:{}", Q::NAME, caller_key(ctx)),
                query.cache_tags(),
            )),
            _ => None,
        };
        let stats = &self.inner.cache_stats;
        let terminal: BoxFuture<'_, Result<Output>> = Box::pin(async move {
            let Some((cache, key, tags)) = cached else {
                let output = handler.handle(&QueryContext { request: ctx, db }, query).await?;
                return Ok(Output::new(output));
            };
            // The generations are read before the database: a write that
            // commits after this point makes the put below a no-op.
            let generations = cache
                .generations(&tags)
                .await
                .inspect_err(|error| tracing::debug!(error = %error, "query cache bypassed"))
                .ok();
            if let Some(generations) = &generations {
                match cache.get(&entry_key(&key, generations)).await {
                    Ok(Some(bytes)) => match Q::Output::from_bytes(&bytes) {
                        Ok(reply) => {
                            stats.hit();
                            return Ok(Output::new(reply));
                        }
                        Err(error) => tracing::warn!(error = %error, query = Q::NAME, "query cache: unreadable entry"),
                    },
                    Ok(None) => {}
                    Err(error) => tracing::debug!(error = %error, "query cache bypassed"),
                }
            }
            stats.miss();
            let output = handler.handle(&QueryContext { request: ctx, db }, query).await?;
            if let Some(generations) = generations
                && let Some(Ok(bytes)) = Reply::to_bytes(&output)
                && let Err(error) = cache
                    .put(&entry_key(&key, &generations), bytes, &tags, &generations)
                    .await
            {
                tracing::debug!(error = %error, "query cache: not stored");
            }
            Ok(Output::new(output))
        });
        let output = self
            .run(CallKind::Query, Q::NAME, ctx, restore::<Q::Output>, terminal)
            .await?;
        output.into_reply(Q::NAME)
    }

    async fn run<'a>(
        &'a self,
        kind: CallKind,
        name: &'static str,
        ctx: &'a RequestContext,
        restore: fn(&[u8]) -> Result<Output>,
        terminal: BoxFuture<'a, Result<Output>>,
    ) -> Result<Output> {
        let call = CallInfo {
            name,
            kind,
            request: ctx,
            restore,
        };
        let chained = self
            .inner
            .middleware
            .iter()
            .rev()
            .fold(terminal, |next, middleware| middleware.around(call, next));
        let span = match kind {
            CallKind::Command => tracing::info_span!(
                "command",
                otel.name = name,
                command = name,
                duration_ms = tracing::field::Empty,
                code = tracing::field::Empty
            ),
            CallKind::Query => tracing::info_span!(
                "query",
                otel.name = name,
                query = name,
                duration_ms = tracing::field::Empty,
                code = tracing::field::Empty
            ),
        };
        let started = std::time::Instant::now();
        let outcome = async {
            // A query holds no transaction: past its deadline it is dropped.
            // A command is never dropped (see `execute`).
            match ctx.deadline {
                Some(deadline) if kind == CallKind::Query => tokio::time::timeout_at(deadline, chained)
                    .await
                    .unwrap_or_else(|_| Err(deadline_exceeded())),
                _ => chained.await,
            }
        }
        .instrument(span.clone())
        .await;
        let duration_ms = started.elapsed().as_secs_f64() * 1000.0;
        span.record("duration_ms", duration_ms);
        span.record(
            "code",
            outcome.as_ref().err().map_or("OK", |error| error.code().as_str()),
        );
        span.in_scope(|| tracing::debug!(duration_ms, ok = outcome.is_ok(), "{name} finished"));
        outcome
    }
}

/// Options for a transaction that will write. On SQLite it is `BEGIN
/// IMMEDIATE`: the write lock is taken (waiting out the busy timeout) before
/// the first read, so that a writer outside this bus (the event relay, a
/// handler) committing in between cannot fail the transaction's first write
/// with SQLITE_BUSY_SNAPSHOT. PostgreSQL ignores it.
pub fn write_transaction() -> sea_orm::TransactionOptions {
    sea_orm::TransactionOptions {
        sqlite_transaction_mode: Some(sea_orm::SqliteTransactionMode::Immediate),
        ..sea_orm::TransactionOptions::default()
    }
}

/// Who asks, as far as a cached answer is concerned: user, role, trusted.
fn caller_key(ctx: &RequestContext) -> String {
    let trusted = if ctx.is_trusted() { "+trusted" } else { "" };
    match &ctx.principal {
        Some(principal) => format!("{}.{}{trusted}", principal.user_id.simple(), principal.role.as_str()),
        None => format!("anonymous{trusted}"),
    }
}

/// The query-cache tags a command's events make stale (see
/// [`BusBuilder::invalidate_on`]); none without a cache.
fn stale_tags(inner: &Inner, events: &[PendingEvent]) -> Vec<String> {
    if inner.query_cache.is_none() {
        return Vec::new();
    }
    let mut tags: Vec<String> = events
        .iter()
        .flat_map(|event| {
            inner
                .invalidations
                .get(event.name)
                .into_iter()
                .flatten()
                .map(move |prefix| format!("{prefix}:{}", event.aggregate_id))
        })
        .collect();
    tags.sort();
    tags.dedup();
    tags
}

/// Holds `tags` for `writer` before the commit that makes them stale
/// ([`QueryCache::hold`]). A failure is logged and the command goes on: its
/// invalidation after the commit still comes (unless the process dies
/// meanwhile, the case the hold is for).
async fn hold(inner: &Inner, tags: &[String], writer: &str) {
    if let (Some(cache), false) = (&inner.query_cache, tags.is_empty())
        && let Err(error) = cache.hold(tags, writer).await
    {
        tracing::warn!(error = %error, ?tags, "query cache: hold before the commit failed");
    }
}

/// Invalidates `tags` after a commit made them stale, and ends `writer`'s
/// hold (also after a commit that failed). A failure is logged: the command
/// has committed, and a cache that cannot be reached is bypassed by readers
/// too.
async fn release(inner: &Inner, tags: &[String], writer: &str) {
    if let (Some(cache), false) = (&inner.query_cache, tags.is_empty())
        && let Err(error) = cache.release(tags, writer).await
    {
        tracing::warn!(error = %error, ?tags, "query cache: invalidation failed; entries expire after their TTL");
    }
}

fn deadline_exceeded() -> Error {
    Error::new(Code::DeadlineExceeded, "deadline exceeded")
}

fn unregistered(name: &str) -> Error {
    Error::internal(format!("no handler registered for {name}"))
}

fn restore<R: Reply>(bytes: &[u8]) -> Result<Output> {
    R::from_bytes(bytes).map(Output::new)
}
