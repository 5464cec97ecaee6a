//! The REST side of the edge: one handler for every annotated method.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::response::sse::{Event, Sse};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use futures::StreamExt;
use http::{HeaderMap, HeaderValue, Request, StatusCode, header};
use keel_kernel::Code;
use prost_reflect::DynamicMessage;
use serde_json::{Value, json};
use tonic::metadata::{MetadataKey, MetadataMap, MetadataValue};

use crate::Edge;
use crate::error::EdgeError;
use crate::routes::{BodyBinding, RouteMatch};
use crate::transcode::{message_json, request_bytes, response_body};

/// Request headers that travel to the gRPC call as metadata.
const FORWARDED: [&str; 7] = [
    "authorization",
    "last-event-id",
    "idempotency-key",
    "traceparent",
    "tracestate",
    "user-agent",
    "grpc-timeout",
];

pub async fn handle(edge: Arc<Edge>, request: Request<Body>) -> Response {
    let request_id = crate::request_id::of(request.headers());
    match transcode(&edge, request, &request_id).await {
        Ok(response) => response,
        Err(error) => error.with_request_id(&request_id).into_response(),
    }
}

async fn transcode(edge: &Edge, request: Request<Body>, request_id: &str) -> Result<Response, EdgeError> {
    let (parts, body) = request.into_parts();
    let path = parts.uri.path();
    let (route, bindings) = match edge.routes.find(&parts.method, path) {
        RouteMatch::Found(route, bindings) => (route, bindings),
        RouteMatch::NotFound => {
            return Err(EdgeError::new(
                StatusCode::NOT_FOUND,
                Code::NotFound.as_str(),
                format!("no route for {} {path}", parts.method),
            ));
        }
        RouteMatch::MethodNotAllowed(allowed) => {
            let allow = allowed.iter().map(http::Method::as_str).collect::<Vec<_>>().join(", ");
            let mut error = EdgeError::new(
                StatusCode::METHOD_NOT_ALLOWED,
                Code::Unimplemented.as_str(),
                format!("{} is not allowed on {path}; allowed: {allow}", parts.method),
            );
            if let Ok(value) = HeaderValue::from_str(&allow) {
                error.headers.push((header::ALLOW, value));
            }
            return Err(error);
        }
    };
    // A server stream may be opened with a stream ticket (`?ticket=`), what
    // a browser's EventSource has instead of an Authorization header. It
    // travels as metadata, never as a field; the server's layer decides
    // which methods redeem one (the event stream alone).
    let (query, ticket) = if route.method.is_server_streaming() {
        take_ticket(parts.uri.query())
    } else {
        (parts.uri.query().map(str::to_owned), None)
    };
    // Before the body is read: an anonymous caller of a method that needs
    // one learns nothing about its fields. The call still goes to the gRPC
    // tier, with no message, so the refusal is the server's own (and is
    // counted with the others); the server's layer decides for a token or
    // ticket that is there.
    let message = if route.needs_caller && !parts.headers.contains_key(header::AUTHORIZATION) && ticket.is_none() {
        Bytes::new()
    } else {
        let body = axum::body::to_bytes(body, edge.max_body_bytes).await.map_err(|_| {
            EdgeError::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                Code::ResourceExhausted.as_str(),
                format!("the request body is larger than {} bytes", edge.max_body_bytes),
            )
        })?;
        if !matches!(route.body, BodyBinding::None) && !body.is_empty() && !is_json(&parts.headers) {
            return Err(EdgeError::new(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                Code::InvalidArgument.as_str(),
                "the request body must be application/json",
            ));
        }
        request_bytes(route, &bindings, query.as_deref(), &body)?
    };

    let mut grpc_request = tonic::Request::new(message);
    *grpc_request.metadata_mut() = metadata(&parts.headers, request_id);
    if let Some(ticket) = ticket {
        // Not text a header can carry: no ticket keel issued (the server
        // answers every bad ticket with these words too).
        let value = MetadataValue::try_from(ticket.as_str()).map_err(|_| {
            EdgeError::new(
                StatusCode::UNAUTHORIZED,
                Code::Unauthenticated.as_str(),
                "invalid, expired or already used stream ticket",
            )
        })?;
        grpc_request.metadata_mut().insert(STREAM_TICKET_METADATA, value);
    }
    if let Some(timeout) = timeout(&parts.headers)? {
        grpc_request.set_timeout(timeout);
    }
    crate::rpc::carry_extensions(&parts.extensions, grpc_request.extensions_mut());

    if route.method.is_server_streaming() {
        let sse = parts
            .headers
            .get(header::ACCEPT)
            .and_then(|value| value.to_str().ok())
            .is_some_and(|accept| accept.contains("text/event-stream"));
        return stream(edge, route, grpc_request, sse, request_id).await;
    }
    let reply = edge
        .upstream
        .unary(&route.grpc_path, grpc_request)
        .await
        .map_err(|status| EdgeError::from_status(&status, &edge.pool))?;
    let body = response_body(route, &reply.message)?;
    if parts.method == http::Method::GET && route.success_status == StatusCode::OK {
        return Ok(conditional_get(&parts.headers, body, &reply.metadata));
    }
    let mut response = (route.success_status, body).into_response();
    response
        .headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
    crate::rpc::copy_metadata(&reply.metadata, response.headers_mut(), "");
    Ok(response)
}

/// A GET's answer with a weak `ETag` (a digest of the body: cheap beside
/// the call, and exact for what the caller would receive), or `304 Not
/// Modified` when `If-None-Match` already names it.
fn conditional_get(headers: &HeaderMap, body: Vec<u8>, metadata: &MetadataMap) -> Response {
    use sha2::Digest;
    let digest = sha2::Sha256::digest(&body);
    let tag = format!(
        "W/\"{}\"",
        digest[..16]
            .iter()
            .map(|byte| format!("{byte:02x}"))
            .collect::<String>()
    );
    let matches = headers
        .get_all(header::IF_NONE_MATCH)
        .iter()
        .filter_map(|value| value.to_str().ok())
        .flat_map(|value| value.split(','))
        .map(str::trim)
        // Weak comparison: `W/"x"` and `"x"` name the same representation.
        .any(|candidate| candidate == "*" || candidate.trim_start_matches("W/") == tag.trim_start_matches("W/"));
    let mut response = if matches {
        StatusCode::NOT_MODIFIED.into_response()
    } else {
        let mut response = (StatusCode::OK, body).into_response();
        response
            .headers_mut()
            .insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
        response
    };
    if let Ok(value) = HeaderValue::from_str(&tag) {
        response.headers_mut().insert(header::ETAG, value);
    }
    // Instead of the edge's `no-store`, which would keep a browser from
    // ever sending the tag back: the caller's own cache may keep the
    // answer but must ask again each time; shared caches keep nothing.
    response
        .headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("private, no-cache"));
    crate::rpc::copy_metadata(metadata, response.headers_mut(), "");
    response
}

/// The metadata a stream ticket travels in (`keel_events::tickets`).
pub const STREAM_TICKET_METADATA: &str = "x-keel-stream-ticket";

/// `query` without its `ticket` parameter, and the ticket (percent-decoded).
/// The rest of the query is left byte for byte as it came.
fn take_ticket(query: Option<&str>) -> (Option<String>, Option<String>) {
    let Some(query) = query else {
        return (None, None);
    };
    let mut ticket = None;
    let rest: Vec<&str> = query
        .split('&')
        .filter(|pair| {
            let (name, value) = pair.split_once('=').unwrap_or((pair, ""));
            if name == "ticket" {
                ticket = Some(
                    percent_encoding::percent_decode_str(value)
                        .decode_utf8_lossy()
                        .into_owned(),
                );
                false
            } else {
                true
            }
        })
        .collect();
    let rest = (!rest.is_empty()).then(|| rest.join("&"));
    (rest, ticket)
}

fn is_json(headers: &HeaderMap) -> bool {
    headers
        .get(header::CONTENT_TYPE)
        .and_then(|value| value.to_str().ok())
        .and_then(|value| value.split(';').next())
        .is_some_and(|mime| {
            let mime = mime.trim().to_ascii_lowercase();
            mime == "application/json" || (mime.starts_with("application/") && mime.ends_with("+json"))
        })
}

fn metadata(headers: &HeaderMap, request_id: &str) -> MetadataMap {
    let mut metadata = MetadataMap::new();
    for (name, value) in headers {
        let name = name.as_str();
        let key = if FORWARDED.contains(&name) {
            name
        } else if let Some(custom) = name
            .strip_prefix("grpc-metadata-")
            .filter(|custom| crate::rpc::is_caller_metadata(custom))
        {
            custom
        } else {
            continue;
        };
        if let (Ok(key), Ok(value)) = (
            MetadataKey::from_bytes(key.as_bytes()),
            MetadataValue::try_from(value.as_bytes()),
        ) {
            metadata.append(key, value);
        }
    }
    if let Ok(value) = MetadataValue::try_from(request_id) {
        metadata.insert("x-request-id", value);
    }
    metadata
}

/// `x-request-timeout` (seconds) as the call's deadline; `grpc-timeout`
/// travels as metadata and wins when both are given.
fn timeout(headers: &HeaderMap) -> Result<Option<Duration>, EdgeError> {
    if headers.contains_key("grpc-timeout") {
        return Ok(None);
    }
    let Some(value) = headers.get("x-request-timeout") else {
        return Ok(None);
    };
    value
        .to_str()
        .ok()
        .and_then(|value| value.trim().parse::<f64>().ok())
        .and_then(|seconds| Duration::try_from_secs_f64(seconds).ok())
        .filter(|duration| !duration.is_zero())
        .map(Some)
        .ok_or_else(|| EdgeError::bad_request("x-request-timeout must be a positive number of seconds"))
}

/// A server stream as SSE (`text/event-stream`, each message an event whose
/// `id:` is its cursor) or NDJSON. An error mid-stream ends it with a last
/// event in the `{"error": ...}` shape (SSE: `event: error`).
async fn stream(
    edge: &Edge,
    route: &crate::routes::Route,
    request: tonic::Request<Bytes>,
    sse: bool,
    request_id: &str,
) -> Result<Response, EdgeError> {
    let (metadata, messages) = edge
        .upstream
        .server_streaming(&route.grpc_path, request)
        .await
        .map_err(|status| EdgeError::from_status(&status, &edge.pool))?;
    let output = route.method.output();
    let response_body = route.response_body.clone();
    let pool = edge.pool.clone();
    let request_id = request_id.to_owned();
    let cursor_field = ["cursor", "sequence"]
        .into_iter()
        .find_map(|name| output.get_field_by_name(name));
    let items = messages.map(move |item| match item {
        Ok(bytes) => match DynamicMessage::decode(output.clone(), bytes) {
            Ok(message) => {
                let data = message_json(&message, response_body.as_ref()).unwrap_or_else(|error| error.body());
                let cursor = cursor_field
                    .as_ref()
                    .and_then(|field| cursor_text(&message.get_field(field)));
                StreamItem::Message {
                    cursor,
                    body: json!({ "data": data }),
                }
            }
            Err(error) => StreamItem::Error(
                EdgeError::internal(format!("undecodable stream message: {error}")).with_request_id(&request_id),
            ),
        },
        Err(status) => StreamItem::Error(EdgeError::from_status(&status, &pool).with_request_id(&request_id)),
    });
    let mut response = if sse {
        // No keep-alive comments: a stream that must stay open while idle
        // (events) sends heartbeat messages of its own, which clients see.
        Sse::new(items.map(|item| Ok::<_, Infallible>(item.into_sse_event()))).into_response()
    } else {
        let mut response = Response::new(Body::from_stream(
            items.map(|item| Ok::<_, Infallible>(item.into_ndjson_line())),
        ));
        response
            .headers_mut()
            .insert(header::CONTENT_TYPE, HeaderValue::from_static("application/x-ndjson"));
        response
            .headers_mut()
            .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
        response
    };
    // Tell proxies (nginx) not to buffer the stream.
    response
        .headers_mut()
        .insert("x-accel-buffering", HeaderValue::from_static("no"));
    crate::rpc::copy_metadata(&metadata, response.headers_mut(), "");
    Ok(response)
}

/// One item of a server stream, before it is framed as SSE or NDJSON.
enum StreamItem {
    Message { cursor: Option<String>, body: Value },
    Error(EdgeError),
}

impl StreamItem {
    fn into_sse_event(self) -> Event {
        match self {
            StreamItem::Message { cursor, body } => {
                let event = Event::default();
                // axum refuses (panics on) an id with a line break or NUL.
                let event = match cursor.filter(|id| !id.contains(['\r', '\n', '\0'])) {
                    Some(id) => event.id(id),
                    None => event,
                };
                event.data(body.to_string())
            }
            StreamItem::Error(error) => Event::default().event("error").data(error.body().to_string()),
        }
    }

    fn into_ndjson_line(self) -> Bytes {
        let body = match self {
            StreamItem::Message { body, .. } => body,
            StreamItem::Error(error) => error.body(),
        };
        Bytes::from(format!("{body}\n"))
    }
}

/// A message's cursor as an SSE id: a non-empty string or a non-zero number.
fn cursor_text(value: &prost_reflect::Value) -> Option<String> {
    use prost_reflect::Value;
    match value {
        Value::String(text) if !text.is_empty() => Some(text.clone()),
        Value::U64(number) if *number > 0 => Some(number.to_string()),
        Value::I64(number) if *number > 0 => Some(number.to_string()),
        Value::U32(number) if *number > 0 => Some(number.to_string()),
        Value::I32(number) if *number > 0 => Some(number.to_string()),
        _ => None,
    }
}
