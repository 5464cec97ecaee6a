//! The tower layer around every gRPC call: request id, trace span, client
//! address, deadline, and authentication into a `RequestContext`.

use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use futures::future::BoxFuture;
use http::{HeaderMap, HeaderValue, Request, Response};
use keel_db::Db;
use keel_identity::Identity;
use keel_kernel::{Error, RequestContext};
use tonic::body::Body;
use tonic::transport::server::TcpConnectInfo;
use tower::{Layer, Service};
use tracing::Instrument;

pub const REQUEST_ID: &str = "x-request-id";

#[derive(Clone)]
pub struct ContextLayer {
    state: Arc<LayerState>,
}

struct LayerState {
    identity: Identity,
    db: Db,
}

impl ContextLayer {
    pub fn new(identity: Identity, db: Db) -> Self {
        Self {
            state: Arc::new(LayerState { identity, db }),
        }
    }
}

impl<S> Layer<S> for ContextLayer {
    type Service = ContextService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        ContextService {
            inner,
            state: self.state.clone(),
        }
    }
}

#[derive(Clone)]
pub struct ContextService<S> {
    inner: S,
    state: Arc<LayerState>,
}

impl<S, ReqBody, ResBody> Service<Request<ReqBody>> for ContextService<S>
where
    S: Service<Request<ReqBody>, Response = Response<ResBody>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    ReqBody: Send + 'static,
    ResBody: http_body::Body<Data = bytes::Bytes> + Send + 'static,
    ResBody::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    type Response = Response<Body>;
    type Error = Box<dyn std::error::Error + Send + Sync>;
    type Future = BoxFuture<'static, Result<Self::Response, Self::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, mut request: Request<ReqBody>) -> Self::Future {
        // The clone that was polled ready serves this call (tower's rule).
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        let state = self.state.clone();
        let request_id = request_id(request.headers());
        let span = tracing::info_span!("grpc", request_id = %request_id, path = %request.uri().path());
        Box::pin(
            async move {
                let started = std::time::Instant::now();
                let mut ctx = RequestContext::new(request_id.clone());
                ctx.client_ip = request
                    .extensions()
                    .get::<TcpConnectInfo>()
                    .and_then(TcpConnectInfo::remote_addr)
                    .map(|address| address.ip());
                ctx.user_agent = header(request.headers(), "user-agent").map(str::to_owned);
                ctx.idempotency_key = header(request.headers(), "idempotency-key")
                    .filter(|key| !key.is_empty() && key.len() <= 255)
                    .map(str::to_owned);
                ctx.deadline = header(request.headers(), "grpc-timeout")
                    .and_then(parse_grpc_timeout)
                    .map(|timeout| tokio::time::Instant::now() + timeout);
                // Health and reflection are public: no database round trip for them.
                let public = request.uri().path().starts_with("/grpc.health.")
                    || request.uri().path().starts_with("/grpc.reflection.");
                if let Some(authorization) = header(request.headers(), "authorization").filter(|_| !public) {
                    let principal = match bearer(authorization) {
                        Some(token) => state.identity.authenticate(&state.db, token).await,
                        None => Err(Error::unauthenticated("authorization must be `Bearer <access token>`")),
                    };
                    match principal {
                        Ok(principal) => ctx.principal = Some(principal),
                        Err(error) => {
                            let mut response = tonic::Status::from(error).into_http::<Body>();
                            set_request_id(response.headers_mut(), &request_id);
                            return Ok(response);
                        }
                    }
                }
                request.extensions_mut().insert(ctx);
                let response = inner.call(request).await.map_err(Into::into)?;
                let mut response = response.map(Body::new);
                resource_exhausted_for_oversized(response.headers_mut());
                set_request_id(response.headers_mut(), &request_id);
                tracing::debug!(duration_ms = started.elapsed().as_secs_f64() * 1000.0, "call answered");
                Ok(response)
            }
            .instrument(span),
        )
    }
}

fn header<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers.get(name).and_then(|value| value.to_str().ok())
}

fn bearer(authorization: &str) -> Option<&str> {
    let (scheme, token) = authorization.trim().split_once(' ')?;
    (scheme.eq_ignore_ascii_case("bearer") && !token.trim().is_empty()).then(|| token.trim())
}

/// The client's `x-request-id` when it is a sane token, else a new UUIDv7.
fn request_id(headers: &HeaderMap) -> String {
    header(headers, REQUEST_ID)
        .filter(|id| !id.is_empty() && id.len() <= 128 && id.bytes().all(|byte| byte.is_ascii_graphic()))
        .map(str::to_owned)
        .unwrap_or_else(|| keel_kernel::id::new_id().to_string())
}

fn set_request_id(headers: &mut HeaderMap, request_id: &str) {
    if let Ok(value) = HeaderValue::from_str(request_id) {
        headers.insert(REQUEST_ID, value);
    }
}

/// tonic answers a message over the decoding limit with OUT_OF_RANGE; the
/// gRPC spec (and our error table) says RESOURCE_EXHAUSTED.
fn resource_exhausted_for_oversized(headers: &mut HeaderMap) {
    let oversized = header(headers, "grpc-status") == Some("11")
        // grpc-message is percent-encoded on the wire.
        && header(headers, "grpc-message").is_some_and(|message| message.contains("length%20too%20large"));
    if oversized {
        headers.insert("grpc-status", HeaderValue::from_static("8"));
    }
}

/// `grpc-timeout`: up to 8 digits and a unit (H, M, S, m, u, n).
fn parse_grpc_timeout(value: &str) -> Option<Duration> {
    if value.len() < 2 || value.len() > 9 {
        return None;
    }
    let (digits, unit) = value.split_at(value.len() - 1);
    let amount: u64 = digits.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(amount.checked_mul(3600)?),
        "M" => Duration::from_secs(amount.checked_mul(60)?),
        "S" => Duration::from_secs(amount),
        "m" => Duration::from_millis(amount),
        "u" => Duration::from_micros(amount),
        "n" => Duration::from_nanos(amount),
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grpc_timeouts_parse() {
        assert_eq!(parse_grpc_timeout("5S"), Some(Duration::from_secs(5)));
        assert_eq!(parse_grpc_timeout("250m"), Some(Duration::from_millis(250)));
        assert_eq!(parse_grpc_timeout("S"), None);
        assert_eq!(parse_grpc_timeout("123456789S"), None);
    }

    #[test]
    fn bearer_tokens_are_read_case_insensitively() {
        assert_eq!(bearer("Bearer abc"), Some("abc"));
        assert_eq!(bearer("bearer  abc "), Some("abc"));
        assert_eq!(bearer("Basic abc"), None);
        assert_eq!(bearer("Bearer "), None);
    }

    #[test]
    fn request_ids_are_kept_or_made() {
        let mut headers = HeaderMap::new();
        headers.insert(REQUEST_ID, HeaderValue::from_static("abc-123"));
        assert_eq!(request_id(&headers), "abc-123");
        headers.insert(REQUEST_ID, HeaderValue::from_static("has space"));
        assert_ne!(request_id(&headers), "has space");
    }
}
