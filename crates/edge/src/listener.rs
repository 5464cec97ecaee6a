//! One port for everything: `application/grpc-web*` to grpc-web (tonic-web),
//! `application/grpc*` to gRPC, anything else to the REST router; the
//! request id and CORS around it all, with the grpc-web headers exposed.

use std::convert::Infallible;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use axum::body::Body;
use axum::response::IntoResponse;
use futures::future::BoxFuture;
use http::{HeaderName, HeaderValue, Method, Request, Response, StatusCode, header};
use tower::util::BoxCloneSyncService;
use tower::{Layer, Service, ServiceExt};
use tower_http::cors::{AllowOrigin, CorsLayer};

use crate::Edge;
use crate::upstream::{GrpcService, Upstream};

/// Which browser origins may call keel.
#[derive(Debug, Clone, Default)]
pub struct CorsSettings {
    /// Exact origins (`https://app.example.com`), or `*` for any origin.
    /// Empty: no cross-origin calls.
    pub allowed_origins: Vec<String>,
}

pub type ListenerService = BoxCloneSyncService<Request<Body>, Response<Body>, Infallible>;

/// The service for the one listener. `grpc` serves native gRPC (and, through
/// tonic-web, grpc-web); `rest` everything else.
pub fn listener_service(grpc: &Upstream, rest: axum::Router, cors: &CorsSettings) -> ListenerService {
    let grpc_service = grpc.service();
    let grpc_web = BoxCloneSyncService::new(tonic_web::GrpcWebLayer::new().layer(grpc_service.clone()));
    let dispatch = Dispatch {
        grpc: grpc_service,
        grpc_web,
        rest,
    };
    let service = tower::ServiceBuilder::new()
        .layer(crate::request_id::layers())
        .option_layer(cors_layer(cors))
        .service(dispatch);
    BoxCloneSyncService::new(service)
}

#[derive(Clone)]
struct Dispatch {
    grpc: GrpcService,
    grpc_web: GrpcService,
    rest: axum::Router,
}

impl Service<Request<Body>> for Dispatch {
    type Response = Response<Body>;
    type Error = Infallible;
    type Future = BoxFuture<'static, Result<Response<Body>, Infallible>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: Request<Body>) -> Self::Future {
        let content_type = request
            .headers()
            .get(header::CONTENT_TYPE)
            .and_then(|value| value.to_str().ok())
            .unwrap_or_default()
            .to_ascii_lowercase();
        let grpc = if content_type.starts_with("application/grpc-web") {
            Some(self.grpc_web.clone())
        } else if content_type.starts_with("application/grpc") {
            Some(self.grpc.clone())
        } else {
            None
        };
        match grpc {
            Some(service) => Box::pin(async move {
                match service.oneshot(request.map(tonic::body::Body::new)).await {
                    Ok(response) => Ok(response.map(Body::new)),
                    Err(error) => {
                        tracing::error!(error = %error, "grpc service failed");
                        Ok(tonic::Status::internal("internal error").into_http::<Body>())
                    }
                }
            }),
            None => {
                let rest = self.rest.clone();
                Box::pin(async move { rest.oneshot(request).await })
            }
        }
    }
}

fn cors_layer(settings: &CorsSettings) -> Option<CorsLayer> {
    if settings.allowed_origins.is_empty() {
        return None;
    }
    let origin = if settings.allowed_origins.iter().any(|origin| origin == "*") {
        // Any origin, with credentials: echo the caller's origin (a literal
        // `*` is not allowed together with credentials).
        AllowOrigin::mirror_request()
    } else {
        AllowOrigin::list(
            settings
                .allowed_origins
                .iter()
                .filter_map(|origin| HeaderValue::from_str(origin).ok()),
        )
    };
    let headers = |names: &[&'static str]| {
        names
            .iter()
            .map(|name| HeaderName::from_static(name))
            .collect::<Vec<_>>()
    };
    Some(
        CorsLayer::new()
            .allow_origin(origin)
            .allow_credentials(true)
            .allow_methods([
                Method::GET,
                Method::POST,
                Method::PUT,
                Method::PATCH,
                Method::DELETE,
                Method::OPTIONS,
            ])
            .allow_headers(headers(&[
                "content-type",
                "authorization",
                "x-grpc-web",
                "x-user-agent",
                "grpc-timeout",
                "x-request-id",
                "x-request-timeout",
                "idempotency-key",
                "traceparent",
                "tracestate",
                "last-event-id",
                "connect-protocol-version",
                "connect-timeout-ms",
            ]))
            .expose_headers(headers(&[
                "grpc-status",
                "grpc-message",
                "grpc-status-details-bin",
                "x-request-id",
                "retry-after",
                "location",
            ]))
            .max_age(Duration::from_secs(600)),
    )
}

#[derive(Clone, PartialEq, prost::Message)]
struct HealthCheckResponse {
    #[prost(int32, tag = "1")]
    status: i32,
}

/// `/readyz`: 200 when the gRPC tier reports SERVING (it tracks the
/// database), 503 otherwise.
pub async fn readiness(edge: Arc<Edge>) -> axum::response::Response {
    use prost::Message;
    let reply = edge
        .upstream
        .unary("/grpc.health.v1.Health/Check", tonic::Request::new(bytes::Bytes::new()))
        .await;
    let serving = reply
        .ok()
        .and_then(|reply| HealthCheckResponse::decode(reply.message).ok())
        .is_some_and(|health| health.status == 1);
    if serving {
        (StatusCode::OK, axum::Json(serde_json::json!({"status": "ready"}))).into_response()
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            axum::Json(serde_json::json!({"status": "unavailable"})),
        )
            .into_response()
    }
}
