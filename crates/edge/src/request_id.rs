//! `x-request-id`: the one place it is read, made and echoed.
//!
//! The listener keeps a client's id when it is a sane token (1 to 128
//! visible ASCII characters) and otherwise sets a new UUIDv7 before anything
//! else sees the request (tower-http's `SetRequestId`); every response
//! carries the id back (`PropagateRequestId`). The REST handler passes it to
//! the gRPC call as metadata, and the server's context layer reads it with
//! [`of`] for the call's span and `RequestContext`.

use http::{HeaderMap, HeaderName, HeaderValue, Request};
use tower::ServiceBuilder;
use tower::layer::util::{Identity, Stack};
use tower::util::MapRequestLayer;
use tower_http::request_id::{MakeRequestId, PropagateRequestIdLayer, RequestId, SetRequestIdLayer};

pub const REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");

/// Request ids are UUIDv7: time-ordered, like every other id of keel.
#[derive(Debug, Clone, Copy, Default)]
pub struct MakeRequestUuidV7;

impl MakeRequestId for MakeRequestUuidV7 {
    fn make_request_id<B>(&mut self, _request: &Request<B>) -> Option<RequestId> {
        HeaderValue::try_from(new_id()).ok().map(RequestId::new)
    }
}

/// The layers of the listener, outermost first: drop an unusable client id,
/// set one where there is none, echo it on the response.
pub type RequestIdLayers = Stack<
    PropagateRequestIdLayer,
    Stack<SetRequestIdLayer<MakeRequestUuidV7>, Stack<MapRequestLayer<DropUnusable>, Identity>>,
>;

type DropUnusable = fn(Request<axum::body::Body>) -> Request<axum::body::Body>;

pub fn layers() -> RequestIdLayers {
    ServiceBuilder::new()
        .layer(MapRequestLayer::new(drop_unusable as DropUnusable))
        .layer(SetRequestIdLayer::new(REQUEST_ID, MakeRequestUuidV7))
        .layer(PropagateRequestIdLayer::new(REQUEST_ID))
        .into_inner()
}

fn drop_unusable<B>(mut request: Request<B>) -> Request<B> {
    if request
        .headers()
        .get(REQUEST_ID)
        .is_some_and(|value| usable(value).is_none())
    {
        request.headers_mut().remove(REQUEST_ID);
    }
    request
}

/// The request's id: its `x-request-id` when usable (always, behind the
/// listener), else a new one.
pub fn of(headers: &HeaderMap) -> String {
    headers
        .get(REQUEST_ID)
        .and_then(usable)
        .map_or_else(new_id, str::to_owned)
}

fn usable(value: &HeaderValue) -> Option<&str> {
    value
        .to_str()
        .ok()
        .filter(|id| !id.is_empty() && id.len() <= 128 && id.bytes().all(|byte| byte.is_ascii_graphic()))
}

fn new_id() -> String {
    keel_kernel::id::new_id().to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sane_ids_are_kept_others_replaced() {
        let mut headers = HeaderMap::new();
        headers.insert(REQUEST_ID, HeaderValue::from_static("abc-123"));
        assert_eq!(of(&headers), "abc-123");
        headers.insert(REQUEST_ID, HeaderValue::from_static("has space"));
        assert!(uuid::Uuid::parse_str(&of(&headers)).is_ok());
        headers.insert(REQUEST_ID, HeaderValue::from_str(&"x".repeat(129)).unwrap());
        assert!(uuid::Uuid::parse_str(&of(&headers)).is_ok());

        let request = Request::builder().header(REQUEST_ID, "has space").body(()).unwrap();
        assert!(drop_unusable(request).headers().get(REQUEST_ID).is_none());
        let request = Request::builder().header(REQUEST_ID, "fine").body(()).unwrap();
        assert_eq!(drop_unusable(request).headers()[REQUEST_ID], "fine");
    }
}
