//! The events module as a keel module. It starts before the bus is built
//! (the bus writes to its outbox), with every other module's handlers, so
//! the composition root adds it to the list last.

use keel_kernel::grpc::GrpcRoutes;
use keel_kernel::{Bus, BusBuilder, Module};

use crate::Events;

impl Module for Events {
    fn name(&self) -> &'static str {
        "events"
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
}
