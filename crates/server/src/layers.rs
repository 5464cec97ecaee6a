//! The tower layer around every gRPC call: trace span with the request id,
//! client address, deadline, and authentication into a `RequestContext`.
//!
//! The request id itself is set and echoed by the listener
//! (`keel_edge::request_id`); this layer only reads it.

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
        let request_id = keel_edge::request_id::of(request.headers());
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
                        Err(error) => return Ok(tonic::Status::from(error).into_http::<Body>()),
                    }
                }
                request.extensions_mut().insert(ctx);
                let response = inner.call(request).await.map_err(Into::into)?;
                let mut response = response.map(Body::new);
                resource_exhausted_for_oversized(response.headers_mut());
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
}
