//! Keel's edge: every gRPC method also served as REST/JSON (from its
//! `google.api.http` annotation) and as grpc-web, on one listener.
//!
//! # Layout
//! - [`access`]: which methods need a caller (`keel.api.v1.access`);
//! - [`template`]: path templates (`/v1/{name=shelves/*}:verb`), parse and match;
//! - [`routes`]: the route table, read from descriptors alone;
//! - [`transcode`]: JSON <-> protobuf, path and query bindings;
//! - [`rest`]: the one REST handler (unary JSON, server streams as SSE or NDJSON);
//! - [`connect`]: the Connect protocol (unary and server streams, JSON and binary);
//! - [`grpc_web`]: grpc-web with JSON messages (binary and text are tonic-web's);
//! - [`rpc`]: what those two share: methods by path, codecs, metadata, envelopes;
//! - [`upstream`]: calls by method path on any gRPC tower service, in
//!   process or over a channel;
//! - [`error`]: `{"error": {...}}` bodies with the kernel's HTTP statuses;
//! - [`openapi`]: the OpenAPI 3.1 document of the same routes;
//! - [`docs`]: `/docs`, Swagger UI from the binary (vendored assets);
//! - [`listener`]: one port: gRPC, grpc-web, Connect and REST by content type, CORS;
//! - [`shed`]: load shedding, at most so many calls answered at once;
//! - [`headers`]: the security headers of every browser-facing answer;
//! - [`request_id`]: `x-request-id`, kept or made (UUIDv7) and echoed.
//!
//! The edge knows descriptors, not modules: a new annotated RPC is served
//! with no edge code.

pub mod access;
pub mod connect;
pub mod docs;
pub mod error;
pub mod grpc_web;
pub mod headers;
pub mod listener;
pub mod openapi;
pub mod request_id;
pub mod rest;
pub mod routes;
pub mod rpc;
pub mod shed;
pub mod template;
pub mod transcode;
pub mod upstream;

use std::sync::Arc;

use prost_reflect::DescriptorPool;

pub use headers::SecuritySettings;
pub use listener::{CorsSettings, listener_service};
pub use rpc::Protocol;
pub use upstream::Upstream;

/// The REST edge: routes, descriptors and the gRPC peer they are served by.
pub struct Edge {
    pub routes: routes::RouteTable,
    pub pool: DescriptorPool,
    pub upstream: Upstream,
    pub max_body_bytes: usize,
    /// Sheds calls beyond a bound (none: every call is admitted).
    pub shedder: Option<Arc<shed::Shedder>>,
    routes_of_server: Option<axum::Router>,
    /// What `/readyz` adds under `details` (the server's circuit breakers).
    readiness_details: Option<ReadinessDetails>,
    openapi: serde_json::Value,
}

/// Reads the details `/readyz` shows beside its status, at each request.
pub type ReadinessDetails = Arc<dyn Fn() -> serde_json::Value + Send + Sync>;

impl Edge {
    /// Reads the routes of every annotated method in `descriptor_set`.
    pub fn new(descriptor_set: &[u8], upstream: Upstream, max_body_bytes: usize) -> Result<Edge, String> {
        let pool = DescriptorPool::decode(descriptor_set).map_err(|error| format!("descriptor set: {error}"))?;
        let routes = routes::RouteTable::from_pool(&pool)?;
        let openapi = openapi::document(&routes, &pool);
        Ok(Edge {
            routes,
            pool,
            upstream,
            max_body_bytes,
            shedder: None,
            readiness_details: None,
            routes_of_server: None,
            openapi,
        })
    }

    /// Sheds calls beyond `shedder`'s bound; see [`shed`].
    pub fn with_shedder(mut self, shedder: Arc<shed::Shedder>) -> Edge {
        self.shedder = Some(shedder);
        self
    }

    /// `/readyz` shows what `details` reads, under `details`.
    pub fn with_readiness_details(mut self, details: ReadinessDetails) -> Edge {
        self.readiness_details = Some(details);
        self
    }

    pub fn readiness_details(&self) -> Option<serde_json::Value> {
        self.readiness_details.as_ref().map(|details| details())
    }

    /// Plain HTTP routes of the server's own (`/metrics`) beside the edge's.
    pub fn with_routes(mut self, routes: axum::Router) -> Edge {
        self.routes_of_server = Some(routes);
        self
    }

    pub fn openapi(&self) -> &serde_json::Value {
        &self.openapi
    }

    /// The REST router: `/healthz`, `/readyz`, `/openapi.json`, `/docs`, and
    /// every annotated method as the fallback.
    pub fn router(self: Arc<Self>) -> axum::Router {
        use axum::routing::get;
        let openapi = self.clone();
        let ready = self.clone();
        let server_routes = self.routes_of_server.clone().unwrap_or_default();
        let fallback = self;
        axum::Router::new()
            .merge(server_routes)
            .route(
                "/healthz",
                get(|| async { axum::Json(serde_json::json!({ "status": "ok" })) }),
            )
            .route("/readyz", get(move || listener::readiness(ready.clone())))
            .route(
                "/openapi.json",
                get(move || {
                    let document = openapi.openapi.clone();
                    async move { axum::Json(document) }
                }),
            )
            .merge(docs::router())
            .fallback(move |request: http::Request<axum::body::Body>| rest::handle(fallback.clone(), request))
    }
}

#[cfg(test)]
mod tests;
