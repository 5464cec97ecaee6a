//! One port for everything: `application/grpc-web+json` and the Connect
//! protocol to the edge's codecs, other `application/grpc-web*` to
//! grpc-web (tonic-web), `application/grpc*` to gRPC, anything else to the
//! REST router; the
//! request id, the security headers and CORS around it all, with the
//! grpc-web headers exposed.

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
use tower_http::cors::{AllowCredentials, AllowHeaders, AllowOrigin, CorsLayer};
use tower_http::set_header::SetResponseHeaderLayer;

use crate::Edge;
use crate::headers::SecuritySettings;
use crate::rpc::Protocol;
use crate::upstream::GrpcService;

/// Which browser origins may call keel.
///
/// An allowed origin is echoed in `access-control-allow-origin`; only exact
/// origins (and, in development, loopback ones) also get
/// `access-control-allow-credentials` (cookies, HTTP auth). A bearer token in
/// `authorization` needs no credentials mode, so `*` still serves browser
/// apps that sign in with tokens. `Origin: null` (sandboxed frames, `file:`
/// pages, some redirects) is never allowed: any page can produce it.
#[derive(Debug, Clone, Default)]
pub struct CorsSettings {
    /// Exact origins (`https://app.example.com`), allowed with credentials;
    /// `*` allows every other origin too, without credentials. Empty (and no
    /// loopback): no cross-origin calls.
    pub allowed_origins: Vec<String>,
    /// Also allow, with credentials, `http(s)://localhost`, `127.0.0.1` and
    /// `[::1]` on any port: the development default.
    pub allow_loopback: bool,
}

/// What the CORS settings make of one request's `Origin`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum OriginPolicy {
    Refused,
    Allowed,
    AllowedWithCredentials,
}

impl CorsSettings {
    fn is_empty(&self) -> bool {
        self.allowed_origins.is_empty() && !self.allow_loopback
    }

    fn policy(&self, origin: &HeaderValue) -> OriginPolicy {
        let Ok(origin) = origin.to_str() else {
            return OriginPolicy::Refused;
        };
        if origin.eq_ignore_ascii_case("null") {
            return OriginPolicy::Refused;
        }
        let listed = self.allowed_origins.iter().any(|allowed| allowed == origin);
        if listed || (self.allow_loopback && is_loopback_origin(origin)) {
            OriginPolicy::AllowedWithCredentials
        } else if self.allowed_origins.iter().any(|allowed| allowed == "*") {
            OriginPolicy::Allowed
        } else {
            OriginPolicy::Refused
        }
    }
}

/// `http(s)://localhost`, `127.0.0.1` or `[::1]`, with an optional port and
/// nothing else (so neither `localhost.evil.example` nor `localhost@evil.example`).
fn is_loopback_origin(origin: &str) -> bool {
    let Some(authority) = origin
        .strip_prefix("http://")
        .or_else(|| origin.strip_prefix("https://"))
    else {
        return false;
    };
    let Some(port) = ["localhost", "127.0.0.1", "[::1]"]
        .iter()
        .find_map(|host| authority.strip_prefix(host))
    else {
        return false;
    };
    match port.strip_prefix(':') {
        None => port.is_empty(),
        Some(digits) => (1..=5).contains(&digits.len()) && digits.bytes().all(|byte| byte.is_ascii_digit()),
    }
}

pub type ListenerService = BoxCloneSyncService<Request<Body>, Response<Body>, Infallible>;

/// The service for the one listener: native gRPC and binary or text
/// grpc-web (tonic-web) straight to the edge's upstream; grpc-web with JSON
/// and the Connect protocol through the edge's codecs; REST for the rest.
pub fn listener_service(edge: Arc<Edge>, cors: &CorsSettings, security: &SecuritySettings) -> ListenerService {
    let grpc_service = edge.upstream.service();
    let grpc_web = BoxCloneSyncService::new(tonic_web::GrpcWebLayer::new().layer(grpc_service.clone()));
    let dispatch = ListenerService::new(Dispatch {
        grpc: grpc_service,
        grpc_web,
        rest: edge.clone().router().layer(rest_compression()),
        edge,
    });
    let service = tower::ServiceBuilder::new()
        .layer(crate::request_id::layers())
        .service(crate::headers::wrap(with_cors(dispatch, cors), security));
    BoxCloneSyncService::new(service)
}

/// REST answers compressed (gzip, br, zstd, by `accept-encoding`) from
/// 1 KiB up: below that the framing costs more than it saves. Server-sent
/// events and NDJSON streams stay uncompressed (a compressor buffers, and each event must go
/// out at once); gRPC, grpc-web and Connect never reach this router.
fn rest_compression() -> tower_http::compression::CompressionLayer<impl tower_http::compression::Predicate> {
    use tower_http::compression::predicate::{DefaultPredicate, NotForContentType, Predicate, SizeAbove};
    tower_http::compression::CompressionLayer::new().compress_when(
        DefaultPredicate::new()
            .and(SizeAbove::new(1024))
            .and(NotForContentType::const_new("application/x-ndjson")),
    )
}

/// CORS around `dispatch`, for requests that carry an `Origin` only: a
/// request without one is not a browser's cross-origin call, and its
/// response carries no `access-control-*` header.
fn with_cors(dispatch: ListenerService, settings: &CorsSettings) -> ListenerService {
    let Some(cors) = cors_layer(settings) else {
        return dispatch;
    };
    // A preflight's requested headers are answered by mirroring those this
    // edge accepts: the fixed list, and any `grpc-metadata-*` (REST's
    // custom metadata), which no fixed list can name.
    let cross_origin = ListenerService::new(cors.layer(dispatch.clone()));
    let cross_origin = ListenerService::new(tower::service_fn(move |mut request: Request<Body>| {
        keep_allowed_request_headers(request.headers_mut());
        cross_origin.clone().oneshot(request)
    }));
    // The answer depends on `Origin` even when there is none: caches must
    // not hand this one to a cross-origin caller.
    let same_origin = ListenerService::new(
        SetResponseHeaderLayer::appending(header::VARY, HeaderValue::from_static("origin")).layer(dispatch),
    );
    ListenerService::new(tower::service_fn(move |request: Request<Body>| {
        let service = if request.headers().contains_key(header::ORIGIN) {
            cross_origin.clone()
        } else {
            same_origin.clone()
        };
        service.oneshot(request)
    }))
}

#[derive(Clone)]
struct Dispatch {
    grpc: GrpcService,
    grpc_web: GrpcService,
    rest: axum::Router,
    edge: Arc<Edge>,
}

impl Service<Request<Body>> for Dispatch {
    type Response = Response<Body>;
    type Error = Infallible;
    type Future = BoxFuture<'static, Result<Response<Body>, Infallible>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: Request<Body>) -> Self::Future {
        let connect = crate::connect::is_connect(&self.edge.pool, &request);
        // Health, readiness and metrics are answered under load too: they
        // are what tells a balancer and an operator about it.
        let exempt = matches!(request.uri().path(), "/healthz" | "/readyz" | "/metrics")
            || request.uri().path().starts_with("/grpc.health.v1.Health/");
        let permit = match &self.edge.shedder {
            Some(shedder) if !exempt => match shedder.admit_from(
                request
                    .extensions()
                    .get::<tonic::transport::server::TcpConnectInfo>()
                    .and_then(tonic::transport::server::TcpConnectInfo::remote_addr)
                    .map(|address| address.ip()),
            ) {
                Ok(permit) => Some(permit),
                Err(why) => {
                    let response = crate::shed::refusal_response(&request, connect.then_some(&self.edge.pool), why);
                    return Box::pin(async move { Ok(response) });
                }
            },
            _ => None,
        };
        let answer = self.answer(request, connect);
        Box::pin(async move {
            let response = answer.await;
            drop(permit);
            response
        })
    }
}

impl Dispatch {
    fn answer(
        &mut self,
        mut request: Request<Body>,
        connect: bool,
    ) -> BoxFuture<'static, Result<Response<Body>, Infallible>> {
        let content_type = request
            .headers()
            .get(header::CONTENT_TYPE)
            .and_then(|value| value.to_str().ok())
            .unwrap_or_default()
            .to_ascii_lowercase();
        let protocol = if connect {
            Protocol::Connect
        } else if content_type.starts_with("application/grpc-web") {
            Protocol::GrpcWeb
        } else if content_type.starts_with("application/grpc") {
            Protocol::Grpc
        } else {
            Protocol::Rest
        };
        request.extensions_mut().insert(protocol);
        if protocol == Protocol::GrpcWeb && crate::grpc_web::is_grpc_web_json(request.headers()) {
            let edge = self.edge.clone();
            return Box::pin(async move { Ok(crate::grpc_web::handle(&edge, request).await) });
        }
        if connect {
            let edge = self.edge.clone();
            return Box::pin(async move { Ok(crate::connect::handle(&edge, request).await) });
        }
        let grpc = match protocol {
            Protocol::GrpcWeb => Some(self.grpc_web.clone()),
            Protocol::Grpc => Some(self.grpc.clone()),
            Protocol::Connect | Protocol::Rest => None,
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

/// Request headers a cross-origin caller may send.
const ALLOWED_HEADERS: [&str; 14] = [
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
    "if-none-match",
];

fn is_allowed_header(name: &str) -> bool {
    let name = name.trim().to_ascii_lowercase();
    ALLOWED_HEADERS.contains(&name.as_str())
        || name
            .strip_prefix("grpc-metadata-")
            .is_some_and(|rest| !rest.is_empty() && HeaderName::try_from(rest).is_ok())
}

/// Rewrites a preflight's `access-control-request-headers` to the names
/// this edge accepts, so that mirroring it allows exactly those.
fn keep_allowed_request_headers(headers: &mut http::HeaderMap) {
    let Some(requested) = headers.get(header::ACCESS_CONTROL_REQUEST_HEADERS) else {
        return;
    };
    let kept = requested
        .to_str()
        .unwrap_or_default()
        .split(',')
        .filter(|name| is_allowed_header(name))
        .map(|name| name.trim().to_ascii_lowercase())
        .collect::<Vec<_>>()
        .join(",");
    match HeaderValue::from_str(&kept) {
        Ok(value) if !kept.is_empty() => {
            headers.insert(header::ACCESS_CONTROL_REQUEST_HEADERS, value);
        }
        _ => {
            headers.remove(header::ACCESS_CONTROL_REQUEST_HEADERS);
        }
    }
}

fn cors_layer(settings: &CorsSettings) -> Option<CorsLayer> {
    if settings.is_empty() {
        return None;
    }
    let for_origin = settings.clone();
    let for_credentials = settings.clone();
    // Both by predicate: the echoed origin and the credentials flag are
    // decided per origin, never `*` together with credentials.
    let origin = AllowOrigin::predicate(move |origin, _| for_origin.policy(origin) != OriginPolicy::Refused);
    let credentials = AllowCredentials::predicate(move |origin, _| {
        for_credentials.policy(origin) == OriginPolicy::AllowedWithCredentials
    });
    let headers = |names: &[&'static str]| {
        names
            .iter()
            .map(|name| HeaderName::from_static(name))
            .collect::<Vec<_>>()
    };
    Some(
        CorsLayer::new()
            .allow_origin(origin)
            .allow_credentials(credentials)
            .allow_methods([
                Method::GET,
                Method::POST,
                Method::PUT,
                Method::PATCH,
                Method::DELETE,
                Method::OPTIONS,
            ])
            .allow_headers(AllowHeaders::mirror_request())
            .expose_headers(headers(&[
                "grpc-status",
                "grpc-message",
                "grpc-status-details-bin",
                "x-request-id",
                "retry-after",
                "location",
                "etag",
                // The guards' answers (docs/guards.md): a replayed
                // idempotent command, the rate limit's state.
                "idempotent-replayed",
                "ratelimit-policy",
                "ratelimit",
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
    // Details inform (an open circuit breaker of the mailer); they do not
    // decide readiness: keel still answers every call that needs no mail.
    let body = |status: &str| {
        let mut body = serde_json::json!({ "status": status });
        if let Some(details) = edge.readiness_details() {
            body["details"] = details;
        }
        axum::Json(body)
    };
    if edge.shedder.as_ref().is_some_and(|shedder| shedder.overloaded()) {
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            [(header::RETRY_AFTER, HeaderValue::from_static("1"))],
            body("overloaded"),
        )
            .into_response();
    }
    if serving {
        (StatusCode::OK, body("ready")).into_response()
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, body("unavailable")).into_response()
    }
}
