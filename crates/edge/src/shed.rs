//! Load shedding: at most `max_in_flight` calls are being answered at once
//! (until their response head); one more is answered at once with
//! UNAVAILABLE (gRPC, grpc-web, Connect) or 503 (REST), `Retry-After: 1`,
//! instead of queueing behind the others while latency grows without
//! bound. `/readyz` says `overloaded` for a second after a call was shed,
//! so a load balancer sends the next ones elsewhere.
//!
//! A server stream counts until its first response head, not for its
//! whole life: an open subscription is not work in progress.
//!
//! One client address may hold at most a share of the calls in flight
//! (`KEEL_MAX_IN_FLIGHT_PER_ADDRESS`, a quarter of the whole by default):
//! a client that opens calls and never finishes sending them (a stalled
//! body) sheds its own next calls, not everyone's. Behind trusted proxies
//! the address is the client they name; behind a proxy keel does not trust
//! every call comes from the proxy's address, so raise the share to the
//! whole there.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::response::IntoResponse;
use http::{HeaderValue, Request, Response, StatusCode, header};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// How long `/readyz` reports overload after the last shed call.
const OVERLOADED_FOR: Duration = Duration::from_secs(1);

/// Calls in flight per client address.
type PerAddress = Arc<std::sync::Mutex<HashMap<IpAddr, usize>>>;

#[derive(Debug)]
pub struct Shedder {
    permits: Arc<Semaphore>,
    per_address: PerAddress,
    max_per_address: usize,
    started: Instant,
    /// Milliseconds since `started` of the last shed call, plus one (0: never).
    last_shed: AtomicU64,
    shed_total: AtomicU64,
}

/// One admitted call: its place among the calls in flight, and its
/// address's, both given back when dropped.
#[derive(Debug)]
pub struct Admitted {
    _permit: OwnedSemaphorePermit,
    address: Option<(PerAddress, IpAddr)>,
}

impl Drop for Admitted {
    fn drop(&mut self) {
        if let Some((per_address, address)) = &self.address {
            let mut counts = per_address.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
            if let Some(count) = counts.get_mut(address) {
                *count -= 1;
                if *count == 0 {
                    counts.remove(address);
                }
            }
        }
    }
}

impl Shedder {
    /// At most `max_in_flight` calls at once, a quarter of them from one
    /// address (see [`Shedder::with_max_per_address`]).
    pub fn new(max_in_flight: usize) -> Shedder {
        let max_in_flight = max_in_flight.max(1);
        Shedder {
            permits: Arc::new(Semaphore::new(max_in_flight)),
            per_address: PerAddress::default(),
            max_per_address: (max_in_flight / 4).max(1),
            started: Instant::now(),
            last_shed: AtomicU64::new(0),
            shed_total: AtomicU64::new(0),
        }
    }

    /// At most `max` calls in flight from one client address.
    pub fn with_max_per_address(mut self, max: usize) -> Shedder {
        self.max_per_address = max.max(1);
        self
    }

    /// A permit for one call, or `None` (and the call is counted as shed).
    pub fn admit(&self) -> Option<Admitted> {
        self.admit_from(None)
    }

    /// [`Shedder::admit`] for a call from `address`, which is refused too
    /// when its address has its share in flight already.
    pub fn admit_from(&self, address: Option<IpAddr>) -> Option<Admitted> {
        let Ok(permit) = self.permits.clone().try_acquire_owned() else {
            return self.shed();
        };
        let Some(address) = address else {
            return Some(Admitted {
                _permit: permit,
                address: None,
            });
        };
        {
            let mut counts = self.per_address.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
            let count = counts.entry(address).or_insert(0);
            if *count >= self.max_per_address {
                drop(counts);
                return self.shed();
            }
            *count += 1;
        }
        Some(Admitted {
            _permit: permit,
            address: Some((self.per_address.clone(), address)),
        })
    }

    fn shed(&self) -> Option<Admitted> {
        let now = u64::try_from(self.started.elapsed().as_millis()).unwrap_or(u64::MAX);
        self.last_shed.store(now.saturating_add(1), Ordering::Relaxed);
        self.shed_total.fetch_add(1, Ordering::Relaxed);
        None
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_address_holds_at_most_its_share() {
        let shedder = Shedder::new(4).with_max_per_address(2);
        let one: IpAddr = "203.0.113.7".parse().unwrap();
        let other: IpAddr = "203.0.113.8".parse().unwrap();
        let first = [
            shedder.admit_from(Some(one)).unwrap(),
            shedder.admit_from(Some(one)).unwrap(),
        ];
        assert!(shedder.admit_from(Some(one)).is_none(), "its share is taken");
        assert_eq!(shedder.shed_total(), 1);
        let second = [
            shedder.admit_from(Some(other)).unwrap(),
            shedder.admit_from(Some(other)).unwrap(),
        ];
        assert!(shedder.admit_from(None).is_none(), "the whole is taken");
        drop(first);
        assert!(shedder.admit_from(Some(one)).is_some(), "its places came back");
        drop(second);
        assert!(
            shedder.per_address.lock().unwrap().is_empty(),
            "no address is kept once idle"
        );
    }
}
