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
//! (`KEEL_MAX_IN_FLIGHT_PER_ADDRESS`): a client that opens calls and never
//! finishes sending them (a stalled body) is refused its next calls with
//! RESOURCE_EXHAUSTED / 429, not everyone's. That is a limit on one
//! client, not overload: `/readyz` does not say `overloaded` for it and it
//! is counted apart. Behind trusted proxies the address is the client they
//! name; behind a proxy keel does not trust every call has the proxy's
//! address, which is why the server's default share is a quarter only
//! when trusted proxies are configured, and the whole otherwise.

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
    /// `None`: no share per address (nothing is counted per address).
    max_per_address: Option<usize>,
    started: Instant,
    /// Milliseconds since `started` of the last shed call, plus one (0: never).
    last_shed: AtomicU64,
    shed_total: AtomicU64,
    address_refused_total: AtomicU64,
}

/// Why a call was not admitted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refused {
    /// Every place in flight is taken: shed, and `/readyz` says overloaded.
    Overloaded,
    /// Its address holds its share already: a limit on that client.
    AddressShare,
}

/// One admitted call: its place among the calls in flight, and its
/// address's, both given back when dropped.
#[derive(Debug)]
pub struct Admitted {
    _permit: Option<OwnedSemaphorePermit>,
    address: Option<(PerAddress, IpAddr)>,
}

impl Admitted {
    fn without_permit(address: Option<(PerAddress, IpAddr)>) -> Admitted {
        Admitted { _permit: None, address }
    }
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
    /// At most `max_in_flight` calls at once, any number of them from one
    /// address (see [`Shedder::with_max_per_address`]).
    pub fn new(max_in_flight: usize) -> Shedder {
        let max_in_flight = max_in_flight.max(1);
        Shedder {
            permits: Arc::new(Semaphore::new(max_in_flight)),
            per_address: PerAddress::default(),
            max_per_address: None,
            started: Instant::now(),
            last_shed: AtomicU64::new(0),
            shed_total: AtomicU64::new(0),
            address_refused_total: AtomicU64::new(0),
        }
    }

    /// At most `max` calls in flight from one client address (one at
    /// least; the whole or more is no share of its own).
    pub fn with_max_per_address(mut self, max: usize) -> Shedder {
        self.max_per_address = (max < self.permits.available_permits()).then_some(max.max(1));
        self
    }

    /// A permit for one call, or why not (and the refusal is counted).
    pub fn admit(&self) -> Result<Admitted, Refused> {
        self.admit_from(None)
    }

    /// [`Shedder::admit`] for a call from `address`, which is refused too
    /// when its address has its share in flight already. The address is
    /// looked at first: a call refused for its address never held a place.
    pub fn admit_from(&self, address: Option<IpAddr>) -> Result<Admitted, Refused> {
        let address = address.filter(|_| self.max_per_address.is_some());
        if let Some(address) = address {
            let max = self.max_per_address.unwrap_or(usize::MAX);
            let mut counts = self.per_address.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
            let count = counts.entry(address).or_insert(0);
            if *count >= max {
                drop(counts);
                self.address_refused_total.fetch_add(1, Ordering::Relaxed);
                return Err(Refused::AddressShare);
            }
            *count += 1;
        }
        let counted = address.map(|address| (self.per_address.clone(), address));
        match self.permits.clone().try_acquire_owned() {
            Ok(permit) => Ok(Admitted {
                _permit: Some(permit),
                address: counted,
            }),
            Err(_) => {
                // Its address's place is given back by this guard.
                drop(Admitted::without_permit(counted));
                let now = u64::try_from(self.started.elapsed().as_millis()).unwrap_or(u64::MAX);
                self.last_shed.store(now.saturating_add(1), Ordering::Relaxed);
                self.shed_total.fetch_add(1, Ordering::Relaxed);
                Err(Refused::Overloaded)
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

    /// Calls refused since start because their address held its share.
    pub fn address_refused_total(&self) -> u64 {
        self.address_refused_total.load(Ordering::Relaxed)
    }
}

/// The answer to a shed call, in the caller's protocol (`connect`: a
/// Connect call, answered as the Connect protocol answers errors: a unary
/// call's error body, a stream's end-of-stream message).
pub fn shed_response(request: &Request<Body>, connect: Option<&prost_reflect::DescriptorPool>) -> Response<Body> {
    refusal_response(request, connect, Refused::Overloaded)
}

/// The answer to a call that was not admitted, in the caller's protocol:
/// UNAVAILABLE / 503 when keel is overloaded, RESOURCE_EXHAUSTED / 429 when
/// the caller's address holds its share; `Retry-After: 1` either way.
pub fn refusal_response(
    request: &Request<Body>,
    connect: Option<&prost_reflect::DescriptorPool>,
    why: Refused,
) -> Response<Body> {
    let (status, code, http) = match why {
        Refused::Overloaded => (
            tonic::Status::unavailable("keel is overloaded; retry shortly"),
            keel_kernel::Code::Unavailable,
            StatusCode::SERVICE_UNAVAILABLE,
        ),
        Refused::AddressShare => (
            tonic::Status::resource_exhausted("too many calls in flight from this address; retry shortly"),
            keel_kernel::Code::ResourceExhausted,
            StatusCode::TOO_MANY_REQUESTS,
        ),
    };
    let content_type = request
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|value| value.to_str().ok())
        .unwrap_or_default()
        .to_ascii_lowercase();
    let mut response = if content_type.starts_with("application/grpc") {
        // gRPC and grpc-web: a trailers-only answer, status in the headers.
        status.into_http::<Body>()
    } else if let Some(pool) = connect {
        crate::connect::refusal(request.headers(), &status, pool)
    } else {
        crate::error::EdgeError::new(http, code.as_str(), status.message())
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
        assert_eq!(shedder.admit_from(Some(one)).unwrap_err(), Refused::AddressShare);
        assert_eq!(shedder.address_refused_total(), 1);
        assert!(!shedder.overloaded(), "one client's limit is not overload");
        let second = [
            shedder.admit_from(Some(other)).unwrap(),
            shedder.admit_from(Some(other)).unwrap(),
        ];
        let third: IpAddr = "203.0.113.9".parse().unwrap();
        assert_eq!(shedder.admit_from(Some(third)).unwrap_err(), Refused::Overloaded);
        assert!(shedder.overloaded());
        assert_eq!(shedder.shed_total(), 1);
        assert!(
            !shedder.per_address.lock().unwrap().contains_key(&third),
            "a shed call gives its address's place back"
        );
        drop(first);
        assert!(shedder.admit_from(Some(one)).is_ok(), "its places came back");
        drop(second);
        assert!(
            shedder.per_address.lock().unwrap().is_empty(),
            "no address is kept once idle"
        );
    }
}
