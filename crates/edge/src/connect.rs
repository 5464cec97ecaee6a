//! The Connect protocol (connectrpc.com/docs/protocol), the default
//! transport of `@connectrpc/connect-web`, on the same port as everything
//! else and for every method:
//!
//! - unary: `POST /<package.Service>/<Method>` with `application/json` or
//!   `application/proto`; the reply is the bare message, an error a JSON
//!   body `{code, message, details}` with the kernel's HTTP status;
//! - server streaming: `application/connect+json` or `+proto`, the request
//!   and each reply in a 5-byte envelope, then an end-of-stream envelope
//!   (flag 2) holding `{"error"?, "metadata"}`, always under HTTP 200.
//!
//! Each call goes to the same gRPC service as native gRPC does, so access,
//! validation, limits and deadlines are the server's, not the edge's.

use std::time::Duration;

use axum::body::Body;
use axum::response::{IntoResponse, Response};
use base64::Engine as _;
use bytes::Bytes;
use futures::StreamExt;
use http::{HeaderMap, HeaderValue, Request, StatusCode, header};
use keel_kernel::Code;
use prost::Message as _;
use prost_reflect::{DescriptorPool, DynamicMessage, MethodDescriptor};
use serde_json::{Map, Value, json};
use tonic::Status;
use tonic::metadata::MetadataMap;

use crate::Edge;
use crate::rpc::{self, Codec};

/// Whether `request` is a Connect call this edge serves: a POST whose path
/// names a method and whose content type is one of Connect's.
pub fn is_connect(pool: &DescriptorPool, request: &Request<Body>) -> bool {
    request.method() == http::Method::POST
        && kind(request.headers()).is_some()
        && rpc::method(pool, request.uri().path()).is_some()
}

/// Unary or streaming, and the codec, from the content type.
fn kind(headers: &HeaderMap) -> Option<(bool, Codec)> {
    let content_type = headers.get(header::CONTENT_TYPE)?.to_str().ok()?;
    let mime = content_type.split(';').next()?.trim().to_ascii_lowercase();
    match mime.as_str() {
        "application/json" => Some((false, Codec::Json)),
        "application/proto" => Some((false, Codec::Proto)),
        "application/connect+json" => Some((true, Codec::Json)),
        "application/connect+proto" => Some((true, Codec::Proto)),
        _ => None,
    }
}

pub async fn handle(edge: &Edge, request: Request<Body>) -> Response {
    let request_id = crate::request_id::of(request.headers());
    let Some((streaming, codec)) = kind(request.headers()) else {
        return unary_error(&Status::internal("not a connect request"), &edge.pool);
    };
    let Some(method) = rpc::method(&edge.pool, request.uri().path()) else {
        return unary_error(&Status::unimplemented("no such method"), &edge.pool);
    };
    if streaming != method.is_server_streaming() || method.is_client_streaming() {
        let status = Status::unimplemented(format!(
            "{} is {}; use the matching content type",
            method.full_name(),
            if method.is_server_streaming() {
                "server streaming"
            } else {
                "unary"
            }
        ));
        return error_response(streaming, codec, &status, &edge.pool);
    }
    match call(edge, &method, streaming, codec, request, &request_id).await {
        Ok(response) => response,
        Err(status) => error_response(streaming, codec, &status, &edge.pool),
    }
}

async fn call(
    edge: &Edge,
    method: &MethodDescriptor,
    streaming: bool,
    codec: Codec,
    request: Request<Body>,
    request_id: &str,
) -> Result<Response, Status> {
    let (parts, body) = request.into_parts();
    if let Some(version) = parts.headers.get("connect-protocol-version")
        && version != "1"
    {
        return Err(Status::invalid_argument("connect-protocol-version must be 1"));
    }
    let encoding = if streaming {
        "connect-content-encoding"
    } else {
        "content-encoding"
    };
    if let Some(value) = parts.headers.get(encoding)
        && value != "identity"
    {
        return Err(Status::unimplemented(format!(
            "{encoding} {value:?} is not supported; send identity"
        )));
    }
    // Before the body is read, as for REST: an anonymous caller of a method
    // that needs one learns nothing about its fields; the server's layer
    // refuses the call, sent without its message.
    let anonymous = crate::access::Access::of(method).needs_caller() && !rpc::carries_credentials(&parts.headers);
    let message = if anonymous {
        Bytes::new()
    } else {
        let body = axum::body::to_bytes(body, edge.max_body_bytes).await.map_err(|_| {
            Status::resource_exhausted(format!("the request is larger than {} bytes", edge.max_body_bytes))
        })?;
        let message = if streaming { rpc::single_message(&body)? } else { body };
        codec.request(&method.input(), &message)?
    };

    let mut grpc_request = tonic::Request::new(message);
    *grpc_request.metadata_mut() = rpc::metadata(&parts.headers, request_id);
    if let Some(timeout) = timeout(&parts.headers)? {
        grpc_request.set_timeout(timeout);
    }
    crate::rpc::carry_extensions(&parts.extensions, grpc_request.extensions_mut());
    let path = format!("/{}/{}", method.parent_service().full_name(), method.name());
    let content_type = match (streaming, codec) {
        (false, Codec::Json) => "application/json",
        (false, Codec::Proto) => "application/proto",
        (true, Codec::Json) => "application/connect+json",
        (true, Codec::Proto) => "application/connect+proto",
    };

    if !streaming {
        let reply = edge.upstream.unary(&path, grpc_request).await?;
        let body = codec.reply(&method.output(), reply.message)?;
        let mut response = Response::new(Body::from(body));
        response
            .headers_mut()
            .insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
        rpc::copy_metadata(&reply.metadata, response.headers_mut(), "");
        rpc::copy_metadata(&reply.trailers, response.headers_mut(), "trailer-");
        return Ok(response);
    }

    let (metadata, messages) = edge.upstream.server_streaming(&path, grpc_request).await?;
    let output = method.output();
    let pool = edge.pool.clone();
    let frames = futures::stream::unfold(Some(messages), move |messages| {
        let output = output.clone();
        let pool = pool.clone();
        async move {
            let mut messages = messages?;
            let frame = match messages.next().await {
                Some(Ok(message)) => match codec.reply(&output, message) {
                    Ok(bytes) => return Some((rpc::envelope(0, &bytes), Some(messages))),
                    Err(status) => end_of_stream(Some(&status), &MetadataMap::new(), &pool),
                },
                Some(Err(status)) => end_of_stream(Some(&status), status.metadata(), &pool),
                None => {
                    let trailers = messages.trailers().await.ok().flatten().unwrap_or_default();
                    end_of_stream(None, &trailers, &pool)
                }
            };
            Some((frame, None))
        }
    });
    let mut response = Response::new(Body::from_stream(frames.map(Ok::<_, std::convert::Infallible>)));
    response
        .headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    response
        .headers_mut()
        .insert("x-accel-buffering", HeaderValue::from_static("no"));
    rpc::copy_metadata(&metadata, response.headers_mut(), "");
    Ok(response)
}

/// `connect-timeout-ms`: at most 10 digits.
fn timeout(headers: &HeaderMap) -> Result<Option<Duration>, Status> {
    let Some(value) = headers.get("connect-timeout-ms") else {
        return Ok(None);
    };
    value
        .to_str()
        .ok()
        .filter(|digits| (1..=10).contains(&digits.len()) && digits.bytes().all(|byte| byte.is_ascii_digit()))
        .and_then(|digits| digits.parse::<u64>().ok())
        .map(|millis| Some(Duration::from_millis(millis)))
        .ok_or_else(|| Status::invalid_argument("connect-timeout-ms must be a number of milliseconds"))
}

/// `status` as the answer to a Connect call with `headers`, before the call
/// ran (a shed call, say).
pub(crate) fn refusal(headers: &HeaderMap, status: &Status, pool: &DescriptorPool) -> Response {
    let (streaming, codec) = kind(headers).unwrap_or((false, Codec::Json));
    error_response(streaming, codec, status, pool)
}

fn error_response(streaming: bool, codec: Codec, status: &Status, pool: &DescriptorPool) -> Response {
    if !streaming {
        return unary_error(status, pool);
    }
    let content_type = match codec {
        Codec::Json => "application/connect+json",
        Codec::Proto => "application/connect+proto",
    };
    let mut response = Response::new(Body::from(end_of_stream(Some(status), status.metadata(), pool)));
    response
        .headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    response
}

/// A unary error: the kernel's HTTP status and `{code, message, details}`;
/// what the status's metadata says (`retry-after`, say) as headers.
fn unary_error(status: &Status, pool: &DescriptorPool) -> Response {
    let code = Code::from_grpc(status.code());
    let http_status = StatusCode::from_u16(code.http_status()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let mut response = (http_status, axum::Json(error_json(status, pool))).into_response();
    rpc::copy_metadata(status.metadata(), response.headers_mut(), "");
    response
}

/// The end-of-stream envelope: the error (if the stream failed) and the
/// trailers.
fn end_of_stream(status: Option<&Status>, trailers: &MetadataMap, pool: &DescriptorPool) -> Bytes {
    let mut metadata = Map::new();
    for (name, value) in trailers.clone().into_headers() {
        let Some(name) = name else { continue };
        if name.as_str().starts_with("grpc-") || name == header::CONTENT_TYPE {
            continue;
        }
        let Ok(value) = value.to_str() else { continue };
        let entry = metadata
            .entry(name.as_str().to_owned())
            .or_insert_with(|| Value::Array(Vec::new()));
        if let Value::Array(values) = entry {
            values.push(Value::String(value.to_owned()));
        }
    }
    let mut end = json!({ "metadata": metadata });
    if let Some(status) = status {
        end["error"] = error_json(status, pool);
    }
    rpc::envelope(2, end.to_string().as_bytes())
}

/// `{"code": "invalid_argument", "message": ..., "details": [{"type",
/// "value", "debug"}]}`: each detail's bytes in unpadded base64, its JSON
/// as `debug` for people reading it.
fn error_json(status: &Status, pool: &DescriptorPool) -> Value {
    let code = Code::from_grpc(status.code());
    // Connect's names are the gRPC names in lower case, but for one spelling.
    let name = match code {
        Code::Cancelled => "canceled".to_owned(),
        other => other.as_str().to_ascii_lowercase(),
    };
    let mut error = json!({ "code": name });
    if !status.message().is_empty() {
        error["message"] = Value::String(status.message().to_owned());
    }
    let details = decode_details(status.details(), pool);
    if !details.is_empty() {
        error["details"] = Value::Array(details);
    }
    error
}

#[derive(Clone, PartialEq, prost::Message)]
struct RpcStatus {
    #[prost(int32, tag = "1")]
    code: i32,
    #[prost(string, tag = "2")]
    message: String,
    #[prost(message, repeated, tag = "3")]
    details: Vec<prost_types::Any>,
}

fn decode_details(bytes: &[u8], pool: &DescriptorPool) -> Vec<Value> {
    if bytes.is_empty() {
        return Vec::new();
    }
    let Ok(status) = RpcStatus::decode(bytes) else {
        return Vec::new();
    };
    status
        .details
        .into_iter()
        .map(|any| {
            let name = any.type_url.rsplit('/').next().unwrap_or_default().to_owned();
            let debug = pool
                .get_message_by_name(&name)
                .and_then(|descriptor| DynamicMessage::decode(descriptor, any.value.as_slice()).ok())
                .and_then(|message| serde_json::to_value(&message).ok());
            let mut detail = json!({
                "type": name,
                "value": base64::engine::general_purpose::STANDARD_NO_PAD.encode(&any.value),
            });
            if let Some(debug) = debug {
                detail["debug"] = debug;
            }
            detail
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connect_timeouts_parse() {
        let headers = |value: &'static str| {
            let mut headers = HeaderMap::new();
            headers.insert("connect-timeout-ms", HeaderValue::from_static(value));
            headers
        };
        assert_eq!(timeout(&headers("250")).unwrap(), Some(Duration::from_millis(250)));
        assert!(timeout(&headers("")).is_err());
        assert!(timeout(&headers("12345678901")).is_err());
        assert!(timeout(&headers("-5")).is_err());
        assert_eq!(timeout(&HeaderMap::new()).unwrap(), None);
    }
}
