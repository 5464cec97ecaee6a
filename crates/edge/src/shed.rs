//! Load shedding: at most `max_in_flight` calls are being answered at once
//! (until their response head); one more is answered at once with
//! UNAVAILABLE (gRPC, grpc-web, Connect) or 503 (REST), `Retry-After: 1`,
//! instead of queueing behind the others while latency grows without
//! bound. `/readyz` says `overloaded` for a second after a call was shed,
//! so a load balancer sends the next ones elsewhere.
//!
//! A server stream counts until its first response head, not for its
//! whole life: an open subscription is not work in progress.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::response::IntoResponse;
use http::{HeaderValue, Request, Response, StatusCode, header};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// How long `/readyz` reports overload after the last shed call.
const OVERLOADED_FOR: Duration = Duration::from_secs(1);

#[derive(Debug)]
pub struct Shedder {
    permits: Arc<Semaphore>,
    started: Instant,
    /// Milliseconds since `started` of the last shed call, plus one (0: never).
    last_shed: AtomicU64,
    shed_total: AtomicU64,
}

impl Shedder {
    pub fn new(max_in_flight: usize) -> Shedder {
        Shedder {
            permits: Arc::new(Semaphore::new(max_in_flight.max(1))),
            started: Instant::now(),
            last_shed: AtomicU64::new(0),
            shed_total: AtomicU64::new(0),
        }
    }

    /// A permit for one call, or `None` (and the call is counted as shed).
    pub fn admit(&self) -> Option<OwnedSemaphorePermit> {
        match self.permits.clone().try_acquire_owned() {
            Ok(permit) => Some(permit),
            Err(_) => {
                let now = u64::try_from(self.started.elapsed().as_millis()).unwrap_or(u64::MAX);
                self.last_shed.store(now.saturating_add(1), Ordering::Relaxed);
                self.shed_total.fetch_add(1, Ordering::Relaxed);
                None
            }
        }
    }

    /// Whether a call was shed within the last second.
    pub fn overloaded(&self) -> bool {
        let last = self.last_shed.load(Ordering::Relaxed);
        if last == 0 {
            return false;
        }
        let now = u64::try_from(self.started.elapsed().as_millis()).unwrap_or(u64::MAX);
        now.saturating_add(1).saturating_sub(last) < OVERLOADED_FOR.as_millis() as u64
    }

    /// Calls shed since start.
    pub fn shed_total(&self) -> u64 {
        self.shed_total.load(Ordering::Relaxed)
    }
}

/// The answer to a shed call, in the caller's protocol (`connect`: a
/// Connect call, answered as the Connect protocol answers errors: a unary
/// call's error body, a stream's end-of-stream message).
pub fn shed_response(request: &Request<Body>, connect: Option<&prost_reflect::DescriptorPool>) -> Response<Body> {
    const MESSAGE: &str = "keel is overloaded; retry shortly";
    let content_type = request
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|value| value.to_str().ok())
        .unwrap_or_default()
        .to_ascii_lowercase();
    let mut response = if content_type.starts_with("application/grpc") {
        // gRPC and grpc-web: a trailers-only answer, status in the headers.
        tonic::Status::unavailable(MESSAGE).into_http::<Body>()
    } else if let Some(pool) = connect {
        crate::connect::refusal(request.headers(), &tonic::Status::unavailable(MESSAGE), pool)
    } else {
        crate::error::EdgeError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            keel_kernel::Code::Unavailable.as_str(),
            MESSAGE,
        )
        .with_request_id(&crate::request_id::of(request.headers()))
        .into_response()
    };
    response
        .headers_mut()
        .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
    response
}
