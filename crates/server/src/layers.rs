//! The tower layer around every gRPC call: trace span with the request id,
//! client address, deadline, authentication into a `RequestContext`, the
//! methods' declared access (`keel.api.v1.access`: an anonymous call to a
//! method that needs a caller is UNAUTHENTICATED before its request is
//! read), the idempotency key (checked, required where a method says so,
//! and `idempotent-replayed: true` on an answer the bus replayed), and
//! oversized messages answered as RESOURCE_EXHAUSTED.
//!
//! The request id itself is set and echoed by the listener
//! (`keel_edge::request_id`); this layer only reads it.

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{Buf, Bytes};
use futures::future::BoxFuture;
use http::{HeaderMap, HeaderValue, Request, Response};
use http_body::Frame;
use keel_db::Db;
use keel_edge::access::AccessRules;
use keel_events::tickets::StreamLease;
use keel_identity::Identity;
use keel_kernel::{AccessWatch, Error, RequestContext};
use tonic::body::Body;
use tonic::transport::server::TcpConnectInfo;
use tower::{Layer, Service};
use tracing::Instrument;

use crate::limit::AuthFailures;

#[derive(Clone)]
pub struct ContextLayer {
    state: Arc<LayerState>,
}

struct LayerState {
    identity: Identity,
    /// Given to every authenticated call, so its streams end with its session.
    sessions: Arc<dyn AccessWatch>,
    db: Db,
    /// The services' `max_decoding_message_size`.
    max_message_bytes: usize,
    access: AccessRules,
    /// Failed authentications per client address, when rate limits are on.
    auth_failures: Option<Arc<AuthFailures>>,
}

impl ContextLayer {
    /// `max_message_bytes` is the decoding limit the services were given:
    /// a request message above it is answered RESOURCE_EXHAUSTED. `access`
    /// says which methods need a caller; `auth_failures` counts and
    /// refuses failed authentications per address.
    pub fn new(
        identity: Identity,
        sessions: Arc<dyn AccessWatch>,
        db: Db,
        max_message_bytes: usize,
        access: AccessRules,
        auth_failures: Option<Arc<AuthFailures>>,
    ) -> Self {
        Self {
            state: Arc::new(LayerState {
                identity,
                sessions,
                db,
                max_message_bytes,
                access,
                auth_failures,
            }),
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
    S: Service<Request<FrameWatch<ReqBody>>, Response = Response<ResBody>> + Clone + Send + 'static,
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

    fn call(&mut self, request: Request<ReqBody>) -> Self::Future {
        // The clone that was polled ready serves this call (tower's rule).
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        let state = self.state.clone();
        let request_id = keel_edge::request_id::of(request.headers());
        let oversized = Arc::new(AtomicBool::new(false));
        let mut request = request.map(|body| FrameWatch::new(body, state.max_message_bytes, oversized.clone()));
        let (span, unsampled) = server_span(&request, &request_id);
        let traced = keel_kernel::trace::record_ids(&span);
        let call_span = span.clone();
        let call = async move {
            let started = std::time::Instant::now();
            let mut ctx = RequestContext::new(request_id.clone());
            ctx.client_ip = request
                .extensions()
                .get::<TcpConnectInfo>()
                .and_then(TcpConnectInfo::remote_addr)
                .map(|address| address.ip());
            ctx.user_agent = header(request.headers(), "user-agent").map(str::to_owned);
            ctx.deadline = header(request.headers(), "grpc-timeout")
                .and_then(parse_grpc_timeout)
                .map(|timeout| tokio::time::Instant::now() + timeout);
            // Health and reflection are public: no database round trip for them.
            let public = request.uri().path().starts_with("/grpc.health.")
                || request.uri().path().starts_with("/grpc.reflection.");
            let authorization = header(request.headers(), "authorization").filter(|_| !public);
            let credentials =
                authorization.is_some() || request.headers().contains_key(keel_events::tickets::TICKET_METADATA);
            if credentials
                && let (Some(failures), Some(address)) = (&state.auth_failures, ctx.client_ip)
                && let Some(wait) = failures.blocked(address)
            {
                // Refused before the credentials are looked at: a guess
                // that happens to be right gains nothing either.
                return Ok(failures.refusal(wait));
            }
            if let Some(authorization) = authorization {
                let authenticated = match bearer(authorization) {
                    // An API key (`keel_...`) or an access token.
                    Some(token) => state.identity.authenticate_bearer(&state.db, token).await,
                    None => Err(Error::unauthenticated("authorization must be `Bearer <access token>`")),
                };
                match authenticated {
                    Ok((principal, caller)) => {
                        ctx.principal = Some(principal);
                        caller.keep_in(&mut ctx);
                        ctx.set_access_watch(state.sessions.clone());
                    }
                    Err(error) => {
                        // A token keel signed that has lapsed is a caller
                        // that must refresh, not a guess: not counted.
                        let lapsed = bearer(authorization)
                            .is_some_and(|token| state.identity.tokens().is_expired_access_token(token));
                        return Ok(refuse_credentials(&state, ctx.client_ip.filter(|_| !lapsed), error).await);
                    }
                }
            }
            // The event stream may be opened with a stream ticket instead
            // (a browser's EventSource sends no Authorization); it is
            // taken out of the request either way, so no handler or log
            // downstream sees it, and it counts on no other method.
            let ticket = request.headers_mut().remove(keel_events::tickets::TICKET_METADATA);
            let mut lease = None;
            if let Some(ticket) = ticket
                .filter(|_| ctx.principal.is_none() && request.uri().path() == keel_events::tickets::STREAM_METHOD)
            {
                match redeem_ticket(&state, ticket.to_str().unwrap_or_default()).await {
                    Ok((principal, user, held)) => {
                        ctx.principal = Some(principal);
                        ctx.set_caller(user);
                        ctx.set_access_watch(state.sessions.clone());
                        lease = Some(held);
                    }
                    Err(error) => return Ok(refuse_credentials(&state, ctx.client_ip, error).await),
                }
            }
            if ctx.principal.is_none() && state.access.needs_caller(request.uri().path()) {
                let refused = Error::unauthenticated("authentication required");
                return Ok(tonic::Status::from(refused).into_http::<Body>());
            }
            let mut replay = None;
            if let Some(key) = request.headers().get("idempotency-key") {
                match keel_kernel::idempotency::parse_key(key.as_bytes()) {
                    Ok(key) => {
                        ctx.idempotency_key = Some(key);
                        replay = Some(ctx.watch_replay());
                    }
                    Err(error) => return Ok(tonic::Status::from(error).into_http::<Body>()),
                }
            } else if state.access.needs_idempotency_key(request.uri().path()) {
                let refused = Error::invalid_field("idempotency-key", "this method requires an idempotency key");
                return Ok(tonic::Status::from(refused).into_http::<Body>());
            }
            request.extensions_mut().insert(ctx);
            let response = inner.call(request).await.map_err(Into::into)?;
            let mut response = match lease {
                // The ticket is held while the stream's body lives.
                Some(lease) => response.map(|body| {
                    Body::new(Leased {
                        inner: body,
                        _lease: lease,
                    })
                }),
                None => response.map(Body::new),
            };
            if oversized.load(Ordering::Relaxed) {
                resource_exhausted_for_oversized(response.headers_mut());
            }
            if replay.is_some_and(|notice| notice.replayed()) {
                response.headers_mut().insert(
                    keel_kernel::idempotency::REPLAYED_HEADER,
                    HeaderValue::from_static("true"),
                );
            }
            if traced {
                call_span.record("http.response.status_code", response.status().as_u16());
                // A trailers-only answer has its status in the head;
                // otherwise the trailers bring it, and the span lasts
                // until they do.
                match header(response.headers(), "grpc-status").and_then(|code| code.parse::<i32>().ok()) {
                    Some(code) => record_grpc_status(&call_span, code),
                    None => {
                        response = response.map(|body| {
                            Body::new(TracedBody {
                                inner: body,
                                span: call_span,
                            })
                        })
                    }
                }
            }
            tracing::debug!(duration_ms = started.elapsed().as_secs_f64() * 1000.0, "call answered");
            Ok(response)
        }
        .instrument(span);
        match unsampled {
            Some(passed_on) => Box::pin(keel_kernel::trace::unsampled_call(call, &passed_on)),
            None => Box::pin(call),
        }
    }
}

/// The answer to credentials that did not authenticate: the error, or,
/// when it was one failure too many from this address, the refusal that
/// answers the address's calls with credentials from now until it may
/// retry. Only UNAUTHENTICATED counts (a database outage is no guess).
async fn refuse_credentials(state: &LayerState, address: Option<std::net::IpAddr>, error: Error) -> Response<Body> {
    if error.code() == keel_kernel::Code::Unauthenticated
        && let (Some(failures), Some(address)) = (&state.auth_failures, address)
        && let Some(wait) = failures.failed(address).await
    {
        return failures.refusal(wait);
    }
    tonic::Status::from(error).into_http::<Body>()
}

/// The server span of a call, in OpenTelemetry's RPC terms, a child of
/// the caller's W3C `traceparent` when it sent one (REST and Connect
/// callers' headers arrive here as metadata too).
///
/// Whether the call is sampled is decided first
/// ([`keel_kernel::trace::decide`]): the span of a call that is not is
/// made in the call's unsampled scope, so the tracer never builds it (nor
/// any span made while the call is polled, which
/// [`keel_kernel::trace::unsampled_call`] wraps); the log still has its
/// request id. With it, the `traceparent` such a call passes on.
fn server_span<B>(request: &Request<B>, request_id: &str) -> (tracing::Span, Option<String>) {
    use keel_kernel::trace::Sampling;

    let path = request.uri().path();
    let traceparent = header(request.headers(), keel_kernel::trace::TRACEPARENT);
    let passed_on = match keel_kernel::trace::decide(traceparent) {
        Sampling::Sampled => None,
        Sampling::Unsampled(passed_on) => Some(passed_on),
    };
    let make = || {
        let (service, method) = path.trim_start_matches('/').split_once('/').unwrap_or((path, ""));
        tracing::info_span!(
            "grpc",
            otel.name = path.trim_start_matches('/'),
            otel.kind = "server",
            otel.status_code = tracing::field::Empty,
            rpc.system = "grpc",
            rpc.service = service,
            rpc.method = method,
            rpc.grpc.status_code = tracing::field::Empty,
            http.response.status_code = tracing::field::Empty,
            request_id = %request_id,
            path = %path,
            trace_id = tracing::field::Empty,
            span_id = tracing::field::Empty,
            keel.sampled = passed_on.is_none(),
        )
    };
    match &passed_on {
        None => {
            let span = make();
            keel_kernel::trace::continue_from(&span, traceparent);
            (span, None)
        }
        Some(unsampled) => {
            // Made in the call's scope: the tracer's filter refuses it.
            let span = keel_kernel::trace::in_unsampled_call_now(unsampled, make);
            keel_kernel::trace::mark_unsampled_call(&span, unsampled);
            (span, passed_on)
        }
    }
}

/// gRPC's status on the server span: codes other than OK are errors
/// (OpenTelemetry's RPC conventions leave the client-side ones to clients;
/// a server reports what it answered).
fn record_grpc_status(span: &tracing::Span, code: i32) {
    span.record("rpc.grpc.status_code", code);
    if code != 0 {
        span.record("otel.status_code", "ERROR");
    }
}

pin_project_lite::pin_project! {
    /// A traced call's response body: records the trailers' grpc-status on
    /// the call's span, which ends when the body does.
    struct TracedBody<B> {
        #[pin]
        inner: B,
        span: tracing::Span,
    }
}

impl<B: http_body::Body> http_body::Body for TracedBody<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        let this = self.project();
        let polled = this.inner.poll_frame(cx);
        if let Poll::Ready(Some(Ok(frame))) = &polled
            && let Some(code) = frame
                .trailers_ref()
                .and_then(|trailers| header(trailers, "grpc-status"))
                .and_then(|code| code.parse::<i32>().ok())
        {
            record_grpc_status(this.span, code);
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

/// A stream ticket's principal: the ticket claimed for this stream, then
/// its session checked like an access token's (a revoked session's ticket
/// is refused, and the claim undone as the lease drops). Access ends at the
/// ticket's `valid_until`.
async fn redeem_ticket(
    state: &LayerState,
    ticket: &str,
) -> Result<(keel_kernel::Principal, keel_identity::model::User, StreamLease), Error> {
    let redeemed = keel_events::tickets::redeem(&state.db, ticket).await?;
    let (principal, user) = state
        .identity
        .authenticate_session(
            &state.db,
            redeemed.user_id,
            redeemed.session_id,
            Some(redeemed.valid_until),
        )
        .await
        .map_err(|error| match error.code() {
            keel_kernel::Code::Unauthenticated => {
                Error::unauthenticated("invalid, expired or already used stream ticket")
            }
            _ => error,
        })?;
    Ok((principal, user, redeemed.lease))
}

pin_project_lite::pin_project! {
    /// A response body that holds a stream ticket's lease until it is
    /// dropped: the stream ended or its client went away.
    struct Leased<B> {
        #[pin]
        inner: B,
        _lease: StreamLease,
    }
}

impl<B: http_body::Body> http_body::Body for Leased<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        self.project().inner.poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

fn header<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers.get(name).and_then(|value| value.to_str().ok())
}

fn bearer(authorization: &str) -> Option<&str> {
    let (scheme, token) = authorization.trim().split_once(' ')?;
    (scheme.eq_ignore_ascii_case("bearer") && !token.trim().is_empty()).then(|| token.trim())
}

/// tonic refuses a message over its decoding limit, before decoding it,
/// with OUT_OF_RANGE (as a trailers-only response); the gRPC spec (and our
/// error table) says RESOURCE_EXHAUSTED. Called only when [`FrameWatch`] saw
/// such a message, so a handler's own OUT_OF_RANGE is left alone.
fn resource_exhausted_for_oversized(headers: &mut HeaderMap) {
    if header(headers, "grpc-status") == Some("11") {
        headers.insert("grpc-status", HeaderValue::from_static("8"));
    }
}

pin_project_lite::pin_project! {
    /// A request body that reads the 5-byte gRPC frame headers as they
    /// pass (flag, then the message length, big-endian) and notes a message
    /// longer than `limit`.
    pub struct FrameWatch<B> {
        #[pin]
        inner: B,
        limit: usize,
        oversized: Arc<AtomicBool>,
        // The frame header being read, and how much of it has arrived.
        header: [u8; 5],
        header_read: usize,
        // Bytes of the current message still to pass.
        message_left: usize,
    }
}

impl<B> FrameWatch<B> {
    fn new(inner: B, limit: usize, oversized: Arc<AtomicBool>) -> Self {
        Self {
            inner,
            limit,
            oversized,
            header: [0; 5],
            header_read: 0,
            message_left: 0,
        }
    }
}

impl<B: http_body::Body<Data = Bytes>> http_body::Body for FrameWatch<B> {
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        let this = self.project();
        let polled = this.inner.poll_frame(cx);
        if let Poll::Ready(Some(Ok(frame))) = &polled
            && let Some(data) = frame.data_ref()
        {
            let mut data = data.clone();
            while data.has_remaining() {
                if *this.message_left > 0 {
                    let skip = (*this.message_left).min(data.remaining());
                    data.advance(skip);
                    *this.message_left -= skip;
                    continue;
                }
                this.header[*this.header_read] = data.get_u8();
                *this.header_read += 1;
                if *this.header_read == this.header.len() {
                    *this.header_read = 0;
                    let [_, a, b, c, d] = *this.header;
                    let length = u32::from_be_bytes([a, b, c, d]) as usize;
                    if length > *this.limit {
                        this.oversized.store(true, Ordering::Relaxed);
                    }
                    *this.message_left = length;
                }
            }
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
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

    /// The frame headers of `chunks` as one body, read to the end: whether a
    /// message above `limit` was seen.
    fn oversized(chunks: &[&[u8]], limit: usize) -> bool {
        use http_body_util::BodyExt;
        let flag = Arc::new(AtomicBool::new(false));
        let frames: Vec<Result<Frame<Bytes>, std::convert::Infallible>> = chunks
            .iter()
            .map(|chunk| Ok(Frame::data(Bytes::copy_from_slice(chunk))))
            .collect();
        let body = http_body_util::StreamBody::new(futures::stream::iter(frames));
        let watched = FrameWatch::new(body, limit, flag.clone());
        let runtime = tokio::runtime::Builder::new_current_thread().build().unwrap();
        runtime.block_on(watched.collect()).unwrap();
        flag.load(Ordering::Relaxed)
    }

    #[test]
    fn frame_lengths_are_read_across_chunks() {
        // Two messages of 3 and 4 bytes, split at awkward places.
        let body = [0, 0, 0, 0, 3, b'a', b'b', b'c', 0, 0, 0, 0, 4, 1, 2, 3, 4];
        assert!(!oversized(&[&body], 4));
        assert!(oversized(&[&body], 3));
        assert!(oversized(&[&body[..2], &body[2..9], &body[9..11], &body[11..]], 3));
        assert!(!oversized(&[&body[..2], &body[2..9], &body[9..11], &body[11..]], 4));
        // A header announcing more than the limit is enough: the message
        // itself never comes (tonic stops reading).
        assert!(oversized(&[&[0, 0, 0x50, 0, 0]], 4 * 1024 * 1024));
    }
}
