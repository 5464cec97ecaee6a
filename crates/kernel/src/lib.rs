//! What every Keel module shares.
//!
//! # Layout
//! - [`error`]: the one error type and the one table from codes to gRPC codes
//!   and HTTP statuses;
//! - [`bus`]: `Command` / `Query` traits, typed handlers and typed replies
//!   that middleware can store, the middleware chain, one transaction per command;
//! - [`module`]: the `Module` trait every module implements, so the
//!   composition root wires each with one line;
//! - [`events`]: domain events and the outbox port;
//! - [`idempotency`]: idempotency keys of commands, recorded in the
//!   command's own transaction;
//! - [`jobs`]: job kinds declared in code and the port that enqueues them
//!   in a command's transaction;
//! - [`context`]: the request context (principal, request id, deadline) and roles;
//! - [`access`]: when a caller's access ends, so that streams end with it;
//! - [`cluster`]: announcements every keel process acts on before a command
//!   answers (how per-process caches stay exact);
//! - [`id`]: UUIDv7 ids; [`page`]: page sizes and opaque page tokens;
//! - [`query_cache`]: queries' answers kept until a command invalidates them;
//! - [`limit`]: the rate-limiter port and its in-process adapter;
//! - [`backoff`]: the one retry schedule (exponential, capped, jittered);
//! - [`retry`]: the one retry / dead-letter decision of durable handlers and jobs;
//! - [`outbound`]: the policy of calls to the outside (timeout, retries,
//!   circuit breaker);
//! - [`secret`]: a wrapper that keeps secrets out of logs;
//! - [`trace`]: W3C trace context across calls, the outbox and log lines;
//! - [`grpc`]: the one adapter that knows tonic: codes, statuses with
//!   details, the request context of a call, timestamps.
//!
//! The kernel depends on no module. Its ports know neither tonic (only
//! `grpc.rs` does) nor any SeaORM entity; the one SeaORM type they share is
//! the connection and the command's transaction, which the bus owns.

pub mod access;
pub mod backoff;
pub mod bus;
pub mod clock;
pub mod cluster;
pub mod context;
pub mod error;
pub mod events;
pub mod grpc;
pub mod id;
pub mod idempotency;
pub mod jobs;
pub mod limit;
pub mod mail;
pub mod module;
pub mod outbound;
pub mod page;
pub mod query_cache;
pub mod retry;
pub mod secret;
pub mod trace;

pub use access::{AccessEnded, AccessWatch};
pub use bus::{
    Bus, BusBuilder, Command, CommandContext, CommandHandler, Live, Output, Query, QueryContext, QueryHandler, Reply,
};
pub use context::{Principal, RequestContext, Role};
pub use error::{Code, Error, FieldViolation, Result, Violations};
pub use events::{DomainEvent, Envelope, EventHandler, Outbox, PendingEvent, topic_matches};
pub use jobs::{
    Job, JobContext, JobError, JobHandler, JobKind, JobQueue, JobReporter, JobSchedule, JobSignals, NewJob, Unique,
};
pub use module::{BackgroundTask, BackgroundTasks, GrpcLimits, Module};
pub use secret::Secret;
