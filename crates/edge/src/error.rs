//! Errors as REST clients see them:
//! `{"error": {"code": "NOT_FOUND", "message": "...", "details": [...], "request_id": "..."}}`
//! with the HTTP status from the kernel's one table.

use axum::response::{IntoResponse, Response};
use http::{HeaderValue, StatusCode};
use keel_kernel::Code;
use prost_reflect::{DescriptorPool, DynamicMessage};
use serde_json::{Value, json};

#[derive(Debug, Clone)]
pub struct EdgeError {
    pub status: StatusCode,
    pub code: &'static str,
    pub message: String,
    pub details: Vec<Value>,
    pub request_id: Option<String>,
    pub headers: Vec<(http::HeaderName, HeaderValue)>,
}

impl EdgeError {
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        Self {
            status,
            code,
            message: message.into(),
            details: Vec::new(),
            request_id: None,
            headers: Vec::new(),
        }
    }

    pub fn bad_request(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, Code::InvalidArgument.as_str(), message)
    }

    pub fn internal(message: impl Into<String>) -> Self {
        let message = message.into();
        tracing::error!(cause = %message, "edge failure");
        Self::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            Code::Internal.as_str(),
            "internal error",
        )
    }

    /// A gRPC status in REST form, with its details decoded from
    /// `grpc-status-details-bin` through the descriptor pool.
    pub fn from_status(status: &tonic::Status, pool: &DescriptorPool) -> Self {
        let code = Code::from_status(status);
        let mut error = Self::new(
            StatusCode::from_u16(code.http_status()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR),
            code.as_str(),
            status.message(),
        );
        error.details = details(status.details(), pool);
        // What the status's metadata says of when to come back:
        // `Retry-After`, and the rate limit's `RateLimit-Policy` and `RateLimit`.
        for name in ["retry-after", "ratelimit-policy", "ratelimit"] {
            if let Some(value) = status.metadata().get(name).and_then(|value| value.to_str().ok())
                && let Ok(value) = HeaderValue::from_str(value)
            {
                error.headers.push((http::HeaderName::from_static(name), value));
            }
        }
        error
    }

    pub fn with_request_id(mut self, request_id: &str) -> Self {
        self.request_id = Some(request_id.to_owned());
        self
    }

    pub fn body(&self) -> Value {
        json!({
            "error": {
                "code": self.code,
                "message": self.message,
                "details": self.details,
                "request_id": self.request_id,
            }
        })
    }
}

fn details(bytes: &[u8], pool: &DescriptorPool) -> Vec<Value> {
    if bytes.is_empty() {
        return Vec::new();
    }
    let Some(status_type) = pool.get_message_by_name("google.rpc.Status") else {
        return Vec::new();
    };
    let Ok(status) = DynamicMessage::decode(status_type, bytes) else {
        return Vec::new();
    };
    let options = prost_reflect::SerializeOptions::new().skip_default_fields(false);
    match status.serialize_with_options(serde_json::value::Serializer, &options) {
        Ok(Value::Object(mut object)) => match object.remove("details") {
            Some(Value::Array(details)) => details,
            _ => Vec::new(),
        },
        _ => Vec::new(),
    }
}

impl IntoResponse for EdgeError {
    fn into_response(self) -> Response {
        let mut response = (self.status, axum::Json(self.body())).into_response();
        for (name, value) in self.headers {
            response.headers_mut().insert(name, value);
        }
        if let Some(id) = self.request_id.as_deref().and_then(|id| HeaderValue::from_str(id).ok()) {
            response.headers_mut().insert("x-request-id", id);
        }
        response
    }
}
