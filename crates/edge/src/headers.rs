//! The security headers of every HTTP answer of the edge (REST, grpc-web,
//! `/docs`, `/openapi.json`, health, CORS preflights, errors): what helmet
//! sets for a Node API, tuned for one.
//!
//! Native gRPC answers (`application/grpc`) get none: no browser reads
//! them, and they are the hot path. A header a handler already set wins
//! (`/docs` brings its own `Content-Security-Policy`, server streams their
//! `Cache-Control: no-cache`).

use axum::body::Body;
use http::{HeaderName, HeaderValue, Response, header};
use tower_http::set_header::SetResponseHeaderLayer;

use crate::listener::ListenerService;

/// JSON and protobuf load nothing and belong in no frame.
pub const API_CONTENT_SECURITY_POLICY: &str = "default-src 'none'; frame-ancestors 'none'";

/// One year; no `includeSubDomains`, which is the operator's call for the
/// whole domain, not keel's.
pub const STRICT_TRANSPORT_SECURITY: &str = "max-age=31536000";

/// Which optional headers to send.
#[derive(Debug, Clone, Default)]
pub struct SecuritySettings {
    /// `Strict-Transport-Security` on every answer: keel is reached only
    /// over HTTPS (through a TLS-terminating proxy; keel speaks plain
    /// HTTP). Browsers ignore it over plain HTTP.
    pub hsts: bool,
}

/// Adds the header unless the answer is native gRPC.
#[derive(Clone)]
struct ForBrowsers(HeaderValue);

impl tower_http::set_header::MakeHeaderValue<Response<Body>> for ForBrowsers {
    fn make_header_value(&mut self, response: &Response<Body>) -> Option<HeaderValue> {
        (!is_native_grpc(response)).then(|| self.0.clone())
    }
}

fn is_native_grpc(response: &Response<Body>) -> bool {
    response
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|value| value.to_str().ok())
        .is_some_and(|content_type| {
            content_type.starts_with("application/grpc") && !content_type.starts_with("application/grpc-web")
        })
}

/// `service` with the headers added to its answers.
pub fn wrap(service: ListenerService, settings: &SecuritySettings) -> ListenerService {
    let set = |name: HeaderName, value: &'static str| {
        SetResponseHeaderLayer::if_not_present(name, ForBrowsers(HeaderValue::from_static(value)))
    };
    let service = tower::ServiceBuilder::new()
        .layer(set(header::X_CONTENT_TYPE_OPTIONS, "nosniff"))
        .layer(set(header::X_FRAME_OPTIONS, "DENY"))
        .layer(set(header::REFERRER_POLICY, "no-referrer"))
        .layer(set(
            HeaderName::from_static("cross-origin-opener-policy"),
            "same-origin",
        ))
        // `same-origin` binds only no-cors loads (`<img>`, `<script>`): a
        // CORS-mode fetch (grpc-web, REST from an allowed origin) is governed
        // by CORS alone, so cross-origin browser clients keep working.
        .layer(set(
            HeaderName::from_static("cross-origin-resource-policy"),
            "same-origin",
        ))
        .layer(set(header::CONTENT_SECURITY_POLICY, API_CONTENT_SECURITY_POLICY))
        // Login and refresh answers carry tokens (RFC 6749 §5.1), the rest
        // user data: no cache keeps any of it.
        .layer(set(header::CACHE_CONTROL, "no-store"))
        .option_layer(
            settings
                .hsts
                .then(|| set(header::STRICT_TRANSPORT_SECURITY, STRICT_TRANSPORT_SECURITY)),
        )
        .service(service);
    ListenerService::new(service)
}
