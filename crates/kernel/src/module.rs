//! The shape of a Keel module, so that the composition root wires every
//! module the same way: one line in its list of modules, and nothing else.
//!
//! A module brings its command and query handlers (registered on the bus),
//! its durable event handlers, its gRPC services (added by the module's
//! `grpc.rs` to [`GrpcRoutes`], the kernel's one tonic adapter),
//! and the background tasks it needs (pruning, schedules). Its tables come
//! from its migration files in `migrations/`, applied by the one Migrator;
//! its contracts are in the one descriptor set of `keel-proto`, where the
//! names of [`Module::services`] find them.

use std::sync::Arc;

use sea_orm::DatabaseConnection;

use crate::bus::{Bus, BusBuilder};
use crate::events::EventHandler;
use crate::grpc::GrpcRoutes;
use crate::jobs::{JobKind, JobSchedule};

/// Limits every gRPC service gets, from the server's configuration.
#[derive(Debug, Clone, Copy)]
pub struct GrpcLimits {
    /// Largest message decoded or encoded, in bytes.
    pub max_message_bytes: usize,
}

/// A task a module runs for as long as the server runs (the server aborts
/// it at shutdown).
pub type BackgroundTask = tokio::task::JoinHandle<()>;

/// Background tasks that stop together: at [`BackgroundTasks::stop`], or
/// when the set is dropped (so a dropped server or module leaves no loop
/// running).
#[derive(Default)]
pub struct BackgroundTasks(std::sync::Mutex<Vec<BackgroundTask>>);

impl BackgroundTasks {
    pub fn new(tasks: Vec<BackgroundTask>) -> Self {
        Self(std::sync::Mutex::new(tasks))
    }

    /// Aborts every task; idempotent.
    pub fn stop(&self) {
        // A std mutex: held only to take the handles, never across an await.
        let tasks = std::mem::take(&mut *self.0.lock().unwrap_or_else(|poisoned| poisoned.into_inner()));
        for task in tasks {
            task.abort();
        }
    }
}

impl Drop for BackgroundTasks {
    fn drop(&mut self) {
        self.stop();
    }
}

pub trait Module: Send + Sync + 'static {
    /// Short and stable: `identity`, `events`. Names logs and tasks.
    fn name(&self) -> &'static str;

    /// The full names of the module's gRPC services
    /// (`keel.identity.v1.IdentityQueryService`): health reports them,
    /// reflection and the edge find them in the descriptor set.
    fn services(&self) -> &'static [&'static str];

    /// Registers every command and query handler of the module.
    fn register(&self, bus: &mut BusBuilder);

    /// Durable handlers of committed events (welcome emails, projections).
    fn event_handlers(&self) -> Vec<Arc<dyn EventHandler>> {
        Vec::new()
    }

    /// The job kinds the module enqueues, with their handlers (the jobs
    /// module runs them).
    fn job_kinds(&self) -> Vec<JobKind> {
        Vec::new()
    }

    /// The module's cron schedules, next to its job kinds: each tick
    /// enqueues its job once across every keel process.
    fn job_schedules(&self) -> Vec<JobSchedule> {
        Vec::new()
    }

    /// Adds the module's gRPC services, calling `bus`, with `routes.limits()` applied.
    fn grpc(&self, bus: &Bus, routes: &mut GrpcRoutes);

    /// Starts the module's background work once the bus is built.
    fn start_tasks(&self, db: &DatabaseConnection) -> Vec<BackgroundTask> {
        let _ = db;
        Vec::new()
    }
}
