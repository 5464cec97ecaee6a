//! grpc-web with JSON messages (`application/grpc-web+json`), which
//! tonic-web does not speak: connect-web's grpc-web transport sends it with
//! `useBinaryFormat: false`. Binary and text (base64) grpc-web stay with
//! tonic-web.
//!
//! The request is one envelope holding the JSON message; the reply is the
//! JSON messages in envelopes, then a trailer envelope (flag 0x80) with
//! `grpc-status`, `grpc-message`, `grpc-status-details-bin` and the other
//! trailers as HTTP/1 header lines, under HTTP 200.

use axum::body::Body;
use axum::response::Response;
use bytes::Bytes;
use futures::StreamExt;
use http::{HeaderMap, HeaderValue, Request, header};
use prost_reflect::MethodDescriptor;
use tonic::Status;
use tonic::metadata::MetadataMap;

use crate::Edge;
use crate::rpc::{self, Codec};

const CONTENT_TYPE: &str = "application/grpc-web+json";

/// Whether `request` is grpc-web with JSON messages.
pub fn is_grpc_web_json(headers: &HeaderMap) -> bool {
    headers
        .get(header::CONTENT_TYPE)
        .and_then(|value| value.to_str().ok())
        .and_then(|value| value.split(';').next())
        .is_some_and(|mime| mime.trim().eq_ignore_ascii_case(CONTENT_TYPE))
}

pub async fn handle(edge: &Edge, request: Request<Body>) -> Response {
    let request_id = crate::request_id::of(request.headers());
    let Some(method) = rpc::method(&edge.pool, request.uri().path()) else {
        return reply(
            Vec::new(),
            &Status::unimplemented("no such method"),
            &MetadataMap::new(),
        );
    };
    match call(edge, &method, request, &request_id).await {
        Ok(response) => response,
        Err(status) => reply(Vec::new(), &status, status.metadata()),
    }
}

async fn call(
    edge: &Edge,
    method: &MethodDescriptor,
    request: Request<Body>,
    request_id: &str,
) -> Result<Response, Status> {
    if method.is_client_streaming() {
        return Err(Status::unimplemented("client streaming is not served over grpc-web"));
    }
    let (parts, body) = request.into_parts();
    if let Some(encoding) = parts.headers.get("grpc-encoding")
        && encoding != "identity"
    {
        return Err(Status::unimplemented(format!(
            "grpc-encoding {encoding:?} is not supported with JSON messages"
        )));
    }
    // As for REST: an anonymous caller of a method that needs one learns
    // nothing about its fields; the server's layer refuses the call, sent
    // without its message.
    let anonymous = crate::access::Access::of(method).needs_caller() && !rpc::carries_credentials(&parts.headers);
    let message = if anonymous {
        Bytes::new()
    } else {
        let body = axum::body::to_bytes(body, edge.max_body_bytes).await.map_err(|_| {
            Status::resource_exhausted(format!("the request is larger than {} bytes", edge.max_body_bytes))
        })?;
        Codec::Json.request(&method.input(), &rpc::single_message(&body)?)?
    };
    let mut grpc_request = tonic::Request::new(message);
    *grpc_request.metadata_mut() = rpc::metadata(&parts.headers, request_id);
    crate::rpc::carry_extensions(&parts.extensions, grpc_request.extensions_mut());
    let path = format!("/{}/{}", method.parent_service().full_name(), method.name());
    let output = method.output();

    if !method.is_server_streaming() {
        let answer = edge.upstream.unary(&path, grpc_request).await?;
        let json = Codec::Json.reply(&output, answer.message)?;
        let mut response = reply(vec![rpc::envelope(0, &json)], &Status::ok(""), &answer.trailers);
        rpc::copy_metadata(&answer.metadata, response.headers_mut(), "");
        return Ok(response);
    }

    let (metadata, messages) = edge.upstream.server_streaming(&path, grpc_request).await?;
    let frames = futures::stream::unfold(Some(messages), move |messages| {
        let output = output.clone();
        async move {
            let mut messages = messages?;
            let frame = match messages.next().await {
                Some(Ok(message)) => match Codec::Json.reply(&output, message) {
                    Ok(json) => return Some((rpc::envelope(0, &json), Some(messages))),
                    Err(status) => trailer_frame(&status, &MetadataMap::new()),
                },
                Some(Err(status)) => trailer_frame(&status, status.metadata()),
                None => {
                    let trailers = messages.trailers().await.ok().flatten().unwrap_or_default();
                    trailer_frame(&Status::ok(""), &trailers)
                }
            };
            Some((frame, None))
        }
    });
    let mut response = Response::new(Body::from_stream(frames.map(Ok::<_, std::convert::Infallible>)));
    response
        .headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static(CONTENT_TYPE));
    rpc::copy_metadata(&metadata, response.headers_mut(), "");
    Ok(response)
}

/// A whole reply: `messages` then the trailer envelope.
fn reply(mut messages: Vec<Bytes>, status: &Status, trailers: &MetadataMap) -> Response {
    messages.push(trailer_frame(status, trailers));
    let mut response = Response::new(Body::from(messages.concat()));
    response
        .headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static(CONTENT_TYPE));
    response
}

/// The trailer envelope: the status (as gRPC writes it in trailers) and the
/// trailing metadata, one `name: value` line each.
fn trailer_frame(status: &Status, trailers: &MetadataMap) -> Bytes {
    let mut lines = String::new();
    let mut status_headers = HeaderMap::new();
    if status.add_header(&mut status_headers).is_err() {
        status_headers.clear();
        status_headers.insert("grpc-status", HeaderValue::from_static("13"));
    }
    let trailer_headers = trailers.clone().into_headers();
    let others = trailer_headers
        .iter()
        .filter(|(name, _)| !name.as_str().starts_with("grpc-") && *name != header::CONTENT_TYPE);
    for (name, value) in status_headers.iter().chain(others) {
        if let Ok(value) = value.to_str() {
            lines.push_str(name.as_str());
            lines.push(':');
            lines.push_str(value);
            lines.push_str("\r\n");
        }
    }
    rpc::envelope(0x80, lines.as_bytes())
}
