//! What every Keel module shares.
//!
//! # Layout
//! - [`error`]: the one error type and the one table from codes to gRPC codes
//!   and HTTP statuses;
//! - [`bus`]: `Command` / `Query` traits, typed handlers, the middleware
//!   chain, one transaction per command;
//! - [`events`]: domain events and the outbox port;
//! - [`context`]: the request context (principal, request id, deadline) and roles;
//! - [`id`]: UUIDv7 ids; [`page`]: page sizes and opaque page tokens;
//! - [`limit`]: the rate-limiter port and its in-process adapter;
//! - [`secret`]: a wrapper that keeps secrets out of logs.
//!
//! The kernel depends on no module.

pub mod bus;
pub mod clock;
pub mod context;
pub mod error;
pub mod events;
pub mod grpc;
pub mod id;
pub mod limit;
pub mod mail;
pub mod page;
pub mod secret;

pub use bus::{Bus, BusBuilder, Command, CommandContext, CommandHandler, Query, QueryContext, QueryHandler};
pub use context::{Principal, RequestContext, Role};
pub use error::{Code, Error, FieldViolation, Result, Violations};
pub use events::{DomainEvent, Envelope, EventHandler, Outbox, PendingEvent, topic_matches};
pub use secret::Secret;
