//! `grpc.health.v1.Health`: the server (`""`) and every module service by
//! its full name, with `Check`, `List` and `Watch`.
//!
//! keel serves the protocol itself because tonic-health has no `List`. The
//! set of names is fixed when the server starts (every module's services),
//! so a name is known from the first call on, and the statuses need no lock:
//! one watch channel per name.
//!
//! [`readiness_details`] is what `/readyz` adds: the outbound targets'
//! circuit breakers.

use std::collections::{BTreeMap, HashMap};
use std::pin::Pin;
use std::sync::Arc;

use futures::{Stream, StreamExt};
use keel_proto::grpc::health::v1 as pb;
use pb::health_check_response::ServingStatus;
use pb::health_server::{Health, HealthServer};
use tokio::sync::watch;
use tonic::{Request, Response, Status};

/// The statuses of the server and its services, shared by the reporter
/// (the database watch) and the gRPC service.
#[derive(Clone)]
pub struct HealthStatuses {
    services: Arc<BTreeMap<String, watch::Sender<ServingStatus>>>,
}

impl HealthStatuses {
    /// `""` (the whole server) and each of `services`, all at `initial`.
    pub fn new<'a>(services: impl IntoIterator<Item = &'a str>, initial: ServingStatus) -> HealthStatuses {
        let services = std::iter::once("")
            .chain(services)
            .map(|name| (name.to_owned(), watch::channel(initial).0))
            .collect();
        HealthStatuses {
            services: Arc::new(services),
        }
    }

    /// Every name takes `status`; watchers hear of a change only.
    pub fn set_all(&self, status: ServingStatus) {
        for sender in self.services.values() {
            sender.send_if_modified(|current| std::mem::replace(current, status) != status);
        }
    }

    pub fn status(&self, service: &str) -> Option<ServingStatus> {
        self.services.get(service).map(|sender| *sender.borrow())
    }

    /// The gRPC service over these statuses.
    pub fn service(&self) -> HealthServer<HealthService> {
        HealthServer::new(HealthService { statuses: self.clone() })
    }
}

pub struct HealthService {
    statuses: HealthStatuses,
}

fn response(status: ServingStatus) -> pb::HealthCheckResponse {
    pb::HealthCheckResponse { status: status as i32 }
}

type WatchStream = Pin<Box<dyn Stream<Item = Result<pb::HealthCheckResponse, Status>> + Send>>;

#[tonic::async_trait]
impl Health for HealthService {
    async fn check(
        &self,
        request: Request<pb::HealthCheckRequest>,
    ) -> Result<Response<pb::HealthCheckResponse>, Status> {
        match self.statuses.status(&request.get_ref().service) {
            Some(status) => Ok(Response::new(response(status))),
            None => Err(Status::not_found("service not registered")),
        }
    }

    async fn list(&self, _request: Request<pb::HealthListRequest>) -> Result<Response<pb::HealthListResponse>, Status> {
        let statuses: HashMap<String, pb::HealthCheckResponse> = self
            .statuses
            .services
            .iter()
            .map(|(name, sender)| (name.clone(), response(*sender.borrow())))
            .collect();
        Ok(Response::new(pb::HealthListResponse { statuses }))
    }

    type WatchStream = WatchStream;

    async fn watch(&self, request: Request<pb::HealthCheckRequest>) -> Result<Response<WatchStream>, Status> {
        let stream: WatchStream = match self.statuses.services.get(&request.get_ref().service) {
            Some(sender) => Box::pin(
                tokio_stream::wrappers::WatchStream::new(sender.subscribe()).map(|status| Ok(response(status))),
            ),
            // The protocol: SERVICE_UNKNOWN, and the call stays open. The
            // names never change after start, so nothing follows.
            None => Box::pin(
                futures::stream::once(async { Ok(response(ServingStatus::ServiceUnknown)) })
                    .chain(futures::stream::pending()),
            ),
        };
        Ok(Response::new(stream))
    }
}

/// `/readyz`'s `details`: each outbound target's circuit breaker, by
/// target (`{"breakers": {"mail": {"state": "open", ...}}}`).
pub fn readiness_details(breakers: &[std::sync::Arc<keel_kernel::outbound::Breaker>]) -> serde_json::Value {
    let breakers: serde_json::Map<String, serde_json::Value> = breakers
        .iter()
        .map(|breaker| {
            let snapshot = breaker.snapshot();
            (
                snapshot.target.to_owned(),
                serde_json::json!({
                    "state": snapshot.state.as_str(),
                    "consecutive_failures": snapshot.consecutive_failures,
                    "opened_total": snapshot.opened_total,
                    "rejected_total": snapshot.rejected_total,
                    "half_open_in_ms": snapshot.half_open_in.map(|left| left.as_millis() as u64),
                }),
            )
        })
        .collect();
    serde_json::json!({ "breakers": breakers })
}
