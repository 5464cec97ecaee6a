//! What every module's `grpc.rs` shares: the request context that the
//! server's layers put on each call, and time conversions.

use chrono::{DateTime, Utc};

use crate::context::RequestContext;

/// The context the server's layers attached to the call, or a bare one
/// (no principal) when the service is called without them.
pub fn context<T>(request: &tonic::Request<T>) -> RequestContext {
    request
        .extensions()
        .get::<RequestContext>()
        .cloned()
        .unwrap_or_else(|| RequestContext::new(crate::id::new_id().to_string()))
}

pub fn timestamp(time: DateTime<Utc>) -> prost_types::Timestamp {
    prost_types::Timestamp {
        seconds: time.timestamp(),
        nanos: time.timestamp_subsec_nanos() as i32,
    }
}
