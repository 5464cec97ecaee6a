//! The `keel` binary's library: configuration, the composition root, the
//! listener, shutdown, and the CLI's subcommands.
//!
//! # Layout
//! - [`config`]: layered settings (defaults, `keel.toml`, `KEEL_*`), validated;
//! - [`app`]: `State::build` wires the modules; `Application::build` binds
//!   (port 0 in tests) and `run_until_stopped` serves until a shutdown future;
//! - [`files`]: the data directory 0700 and keel's files in it 0600;
//! - [`health`]: `grpc.health.v1` (Check, List, Watch) per module service;
//! - [`layers`]: request id, span, deadline and authentication around every call;
//! - [`limit`]: per-method rate limits (in process or Redis) as a layer at the gRPC tier;
//! - [`listen`]: the accept loop of the one port (HTTP/1.1 and h2c), graceful shutdown;
//! - [`metrics`]: `/metrics`, calls counted and timed at the gRPC tier;
//! - [`mail`]: the mailer adapters (SMTP, or a file in the data directory);
//! - [`proxy`]: the client's address behind trusted reverse proxies;
//! - [`telemetry`]: JSON or pretty logs; OTLP traces when `KEEL_OTLP_ENDPOINT` is set.

pub mod app;
pub mod config;
pub mod files;
pub mod health;
pub mod layers;
pub mod limit;
pub mod listen;
pub mod mail;
pub mod metrics;
pub mod proxy;
pub mod query_cache;
pub mod telemetry;

pub use app::{Application, State};
pub use config::Config;
