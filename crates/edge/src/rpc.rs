//! What the browser protocols that name a gRPC method by its path share
//! (the Connect protocol, grpc-web with JSON): finding the method, turning
//! its messages from and into JSON or protobuf, the request's headers as
//! gRPC metadata, and the 5-byte envelopes both frame messages with.

use bytes::{BufMut, Bytes, BytesMut};
use http::HeaderMap;
use prost::Message as _;
use prost_reflect::{
    DescriptorPool, DeserializeOptions, DynamicMessage, MessageDescriptor, MethodDescriptor, SerializeOptions,
};
use tonic::Status;
use tonic::metadata::{MetadataKey, MetadataMap, MetadataValue};

/// How a protocol encodes each message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Codec {
    Proto,
    Json,
}

impl Codec {
    /// Protobuf bytes of the request `body` encodes. An empty body is the
    /// empty message in either encoding.
    pub fn request(self, input: &MessageDescriptor, body: &[u8]) -> Result<Bytes, Status> {
        match self {
            Codec::Proto => {
                // Decoded once so a malformed message is INVALID_ARGUMENT
                // here, with the same words for every protocol.
                DynamicMessage::decode(input.clone(), body).map_err(|error| {
                    Status::invalid_argument(format!("the request is not a valid message: {error}"))
                })?;
                Ok(Bytes::copy_from_slice(body))
            }
            Codec::Json => {
                if body.iter().all(u8::is_ascii_whitespace) {
                    return Ok(Bytes::new());
                }
                let mut deserializer = serde_json::Deserializer::from_slice(body);
                let message = DynamicMessage::deserialize_with_options(
                    input.clone(),
                    &mut deserializer,
                    &DeserializeOptions::new(),
                )
                .and_then(|message| deserializer.end().map(|()| message))
                .map_err(|error| {
                    Status::invalid_argument(format!(
                        "the request is not valid JSON for {}: {error}",
                        input.full_name()
                    ))
                })?;
                Ok(Bytes::from(message.encode_to_vec()))
            }
        }
    }

    /// A reply's protobuf bytes in this encoding.
    pub fn reply(self, output: &MessageDescriptor, message: Bytes) -> Result<Bytes, Status> {
        match self {
            Codec::Proto => Ok(message),
            Codec::Json => {
                let message = DynamicMessage::decode(output.clone(), message).map_err(|error| {
                    tracing::error!(error = %error, message = output.full_name(), "undecodable reply");
                    Status::internal("internal error")
                })?;
                let mut out = Vec::with_capacity(64);
                message
                    .serialize_with_options(&mut serde_json::Serializer::new(&mut out), &SerializeOptions::new())
                    .map_err(|error| {
                        tracing::error!(error = %error, message = output.full_name(), "unserializable reply");
                        Status::internal("internal error")
                    })?;
                Ok(Bytes::from(out))
            }
        }
    }
}

/// The method a path names: `/keel.identity.v1.IdentityQueryService/GetUser`.
pub fn method(pool: &DescriptorPool, path: &str) -> Option<MethodDescriptor> {
    let (service, method) = path.strip_prefix('/')?.split_once('/')?;
    pool.get_service_by_name(service)?
        .methods()
        .find(|candidate| candidate.name() == method)
}

/// Whether a caller may set metadata `name` (through Connect's and
/// grpc-web's headers, or REST's `grpc-metadata-<name>`): not what belongs
/// to HTTP or to a protocol's framing, and not the forwarding headers that
/// name the client's address (the listener decides that address; a caller
/// must not hand a remote keel another one).
pub fn is_caller_metadata(name: &str) -> bool {
    !is_transport_header(name) && !matches!(name, "x-forwarded-for" | "forwarded" | "x-real-ip")
}

/// Request headers that belong to HTTP or to a protocol's framing, not to
/// the call: everything else travels as metadata, as a native gRPC client's
/// metadata would.
fn is_transport_header(name: &str) -> bool {
    matches!(
        name,
        "host"
            | "connection"
            | "keep-alive"
            | "te"
            | "trailer"
            | "transfer-encoding"
            | "upgrade"
            | "content-type"
            | "content-length"
            | "content-encoding"
            | "accept"
            | "accept-encoding"
            | "origin"
            | "referer"
            | "cookie"
            | "x-grpc-web"
            | "x-user-agent"
    ) || name.starts_with("connect-")
        || name.starts_with("sec-")
        || name.starts_with("access-control-")
        || (name.starts_with("grpc-") && name != "grpc-timeout")
}

/// The metadata of a call whose headers are `headers`, with the request id
/// the edge assigned.
pub fn metadata(headers: &HeaderMap, request_id: &str) -> MetadataMap {
    let mut metadata = MetadataMap::new();
    for (name, value) in headers {
        if !is_caller_metadata(name.as_str()) {
            continue;
        }
        if let (Ok(key), Ok(value)) = (
            MetadataKey::from_bytes(name.as_str().as_bytes()),
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

/// Response metadata as headers (`prefix` is `trailer-` for trailers sent
/// as headers), less what belongs to gRPC's framing.
pub fn copy_metadata(metadata: &MetadataMap, headers: &mut HeaderMap, prefix: &str) {
    for (name, value) in metadata.clone().into_headers() {
        let Some(name) = name else { continue };
        if name == http::header::CONTENT_TYPE
            || name == http::header::CONTENT_LENGTH
            || name == http::header::DATE
            || name == "te"
            || name.as_str().starts_with("grpc-")
        {
            continue;
        }
        let name = if prefix.is_empty() {
            name
        } else {
            match http::HeaderName::try_from(format!("{prefix}{name}")) {
                Ok(name) => name,
                Err(_) => continue,
            }
        };
        headers.append(name, value);
    }
}

/// Which protocol a call arrived in, set by the listener on every request
/// and carried to the gRPC call the edge makes of it (metrics label calls
/// by it).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Protocol {
    Grpc,
    GrpcWeb,
    Connect,
    Rest,
}

impl Protocol {
    pub const fn as_str(self) -> &'static str {
        match self {
            Protocol::Grpc => "grpc",
            Protocol::GrpcWeb => "grpc-web",
            Protocol::Connect => "connect",
            Protocol::Rest => "rest",
        }
    }
}

/// What the edge's own gRPC call of an HTTP request keeps of it: the
/// connection's addresses and the protocol.
pub fn carry_extensions(from: &http::Extensions, to: &mut tonic::Extensions) {
    if let Some(info) = from.get::<tonic::transport::server::TcpConnectInfo>() {
        to.insert(info.clone());
    }
    if let Some(protocol) = from.get::<Protocol>() {
        to.insert(*protocol);
    }
}

/// A 5-byte envelope: flags, big-endian length, the bytes.
pub fn envelope(flags: u8, payload: &[u8]) -> Bytes {
    let mut frame = BytesMut::with_capacity(5 + payload.len());
    frame.put_u8(flags);
    frame.put_u32(u32::try_from(payload.len()).unwrap_or(u32::MAX));
    frame.put_slice(payload);
    frame.freeze()
}

/// The one message of a request body made of envelopes: a unary or
/// server-streaming call sends exactly one, uncompressed.
pub fn single_message(body: &Bytes) -> Result<Bytes, Status> {
    if body.len() < 5 {
        return Err(Status::invalid_argument("the request has no complete message envelope"));
    }
    let flags = body[0];
    let length = u32::from_be_bytes([body[1], body[2], body[3], body[4]]) as usize;
    if flags & 1 != 0 {
        return Err(Status::unimplemented("compressed request messages are not supported"));
    }
    if flags != 0 {
        return Err(Status::invalid_argument(format!(
            "unexpected envelope flags {flags:#04x}"
        )));
    }
    if body.len() != 5 + length {
        return Err(Status::invalid_argument(
            "the request must hold exactly one complete message envelope",
        ));
    }
    Ok(body.slice(5..))
}

/// Whether a call sends something that may authenticate it: a bearer, or
/// a stream ticket (in its metadata, as the edge's REST route puts it).
/// A call without either, to a method that needs a caller, is refused
/// before its body is read.
pub(crate) fn carries_credentials(headers: &http::HeaderMap) -> bool {
    headers.contains_key(http::header::AUTHORIZATION) || headers.contains_key(crate::rest::STREAM_TICKET_METADATA)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn envelopes_round_trip_and_malformed_ones_are_refused() {
        let frame = envelope(0, b"abc");
        assert_eq!(&frame[..], b"\0\0\0\0\x03abc");
        assert_eq!(single_message(&frame).unwrap(), Bytes::from_static(b"abc"));
        for bad in [
            &b"\0\0\0"[..],
            b"\0\0\0\0\x04abc",
            b"\0\0\0\0\x02abc",
            b"\x01\0\0\0\x03abc",
            b"\x80\0\0\0\x03abc",
        ] {
            assert!(single_message(&Bytes::copy_from_slice(bad)).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn callers_cannot_name_their_address_or_the_framing() {
        for refused in [
            "x-forwarded-for",
            "forwarded",
            "x-real-ip",
            "grpc-accept-encoding",
            "grpc-status",
            "te",
        ] {
            assert!(!is_caller_metadata(refused), "{refused}");
        }
        for allowed in ["authorization", "idempotency-key", "grpc-timeout", "x-tenant"] {
            assert!(is_caller_metadata(allowed), "{allowed}");
        }
    }

    #[test]
    fn framing_headers_stay_behind_and_the_rest_is_metadata() {
        let mut headers = HeaderMap::new();
        for (name, value) in [
            ("authorization", "Bearer t"),
            ("content-type", "application/json"),
            ("connect-protocol-version", "1"),
            ("grpc-timeout", "5S"),
            ("grpc-status", "0"),
            ("idempotency-key", "k"),
            ("cookie", "a=b"),
            ("x-forwarded-for", "6.6.6.6"),
            ("forwarded", "for=6.6.6.6"),
        ] {
            headers.insert(
                http::HeaderName::from_static(name),
                http::HeaderValue::from_static(value),
            );
        }
        let metadata = metadata(&headers, "rid");
        let mut names: Vec<_> = metadata.keys().map(|key| format!("{key:?}")).collect();
        names.sort();
        assert_eq!(
            names,
            [
                "Ascii(\"authorization\")",
                "Ascii(\"grpc-timeout\")",
                "Ascii(\"idempotency-key\")",
                "Ascii(\"x-request-id\")"
            ]
        );
    }
}
