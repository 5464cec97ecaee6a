//! The jobs module as a keel module. It is built before the bus (the bus
//! enqueues through it), with every other module's job kinds.

use keel_kernel::grpc::GrpcRoutes;
use keel_kernel::{BackgroundTask, Bus, BusBuilder, Module};
use sea_orm::DatabaseConnection;

use crate::Jobs;

impl Module for Jobs {
    fn name(&self) -> &'static str {
        "jobs"
    }

    fn services(&self) -> &'static [&'static str] {
        crate::grpc::SERVICES
    }

    fn register(&self, bus: &mut BusBuilder) {
        crate::register(bus, self);
    }

    fn grpc(&self, bus: &Bus, routes: &mut GrpcRoutes) {
        crate::grpc::add_services(bus, routes);
    }

    /// Workers on the module's own connection (the one it was built with).
    fn start_tasks(&self, _db: &DatabaseConnection) -> Vec<BackgroundTask> {
        self.spawn_tasks()
    }
}
