//! Identity as a keel module: what the composition root needs of it.

use std::sync::Arc;

use keel_kernel::grpc::GrpcRoutes;
use keel_kernel::mail::Mailer;
use keel_kernel::{BackgroundTask, Bus, BusBuilder, EventHandler, Module};

use crate::Identity;
use crate::events::{DuplicateRegistrationEmail, WelcomeEmail};

/// The identity module: its handlers, its services, its emails.
#[derive(Clone)]
pub struct IdentityModule {
    identity: Identity,
    mailer: Arc<dyn Mailer>,
}

impl IdentityModule {
    pub fn new(identity: Identity, mailer: Arc<dyn Mailer>) -> Self {
        Self { identity, mailer }
    }

    /// The authenticator the server's auth layer calls.
    pub fn identity(&self) -> &Identity {
        &self.identity
    }
}

impl Module for IdentityModule {
    fn name(&self) -> &'static str {
        "identity"
    }

    fn services(&self) -> &'static [&'static str] {
        crate::grpc::SERVICES
    }

    fn register(&self, bus: &mut BusBuilder) {
        crate::register(bus, &self.identity);
    }

    fn event_handlers(&self) -> Vec<Arc<dyn EventHandler>> {
        vec![
            Arc::new(WelcomeEmail::new(self.mailer.clone())),
            Arc::new(DuplicateRegistrationEmail::new(self.mailer.clone())),
        ]
    }

    fn grpc(&self, bus: &Bus, routes: &mut GrpcRoutes) {
        crate::grpc::add_services(bus, routes);
    }

    fn start_tasks(&self, db: &sea_orm::DatabaseConnection) -> Vec<BackgroundTask> {
        vec![self.identity.spawn_pruning(db.clone())]
    }
}
