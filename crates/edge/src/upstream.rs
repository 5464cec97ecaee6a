//! Calls a gRPC method by path with protobuf bytes in and out, on any tower
//! service that speaks gRPC: the in-process server (no socket) or a
//! `tonic::transport::Channel` to a remote keel.

use bytes::{Buf, BufMut, Bytes};
use futures::future::BoxFuture;
use http::uri::PathAndQuery;
use tonic::codec::{Codec, DecodeBuf, Decoder, EncodeBuf, Encoder};
use tonic::metadata::MetadataMap;
use tonic::{Status, Streaming};
use tower::util::BoxCloneSyncService;
use tower::{ServiceExt, service_fn};

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;
// The error is a `Status`, not a boxed `dyn Error`: a `dyn` error type
// trips the compiler's `Send` proof of tonic's client futures
// (rust-lang/rust#102211).
/// A gRPC service as the edge calls it: in process (the server's routes) or
/// a remote keel behind a channel.
pub type GrpcService = BoxCloneSyncService<http::Request<tonic::body::Body>, http::Response<tonic::body::Body>, Status>;

/// A gRPC peer for the edge. Cheap to clone.
#[derive(Clone)]
pub struct Upstream {
    inner: GrpcService,
}

/// What a unary call returned.
pub struct UnaryReply {
    pub metadata: MetadataMap,
    pub message: Bytes,
    /// Trailing metadata other than the status.
    pub trailers: MetadataMap,
}

impl Upstream {
    /// Any `Service<http::Request<Body>>` answering gRPC: the server's own
    /// routes (in process) or a `Channel`.
    pub fn new<S, B>(service: S) -> Upstream
    where
        S: tower::Service<http::Request<tonic::body::Body>, Response = http::Response<B>>
            + Clone
            + Send
            + Sync
            + 'static,
        S::Future: Send + 'static,
        S::Error: Into<BoxError>,
        B: http_body::Body<Data = Bytes> + Send + 'static,
        B::Error: Into<BoxError>,
    {
        let inner = service
            .map_response(|response: http::Response<B>| response.map(tonic::body::Body::new))
            .map_err(|error: S::Error| Status::from_error(error.into()));
        Upstream {
            inner: BoxCloneSyncService::new(inner),
        }
    }

    /// A tonic client over the upstream. tonic needs an owned service per call.
    fn grpc(&self) -> tonic::client::Grpc<GrpcService> {
        tonic::client::Grpc::new(self.inner.clone())
    }

    /// A unary call, framed and unframed here rather than by tonic's client
    /// codec: one buffer in, one collected body out, no per-call client
    /// state (this is the hot path of every REST call).
    pub fn unary(&self, path: &str, request: tonic::Request<Bytes>) -> BoxFuture<'static, Result<UnaryReply, Status>> {
        let service = self.inner.clone();
        let path = path.to_owned();
        Box::pin(async move {
            let (metadata, extensions, message) = request.into_parts();
            let length = u32::try_from(message.len()).map_err(|_| Status::resource_exhausted("request too large"))?;
            let mut frame = bytes::BytesMut::with_capacity(5 + message.len());
            frame.put_u8(0);
            frame.put_u32(length);
            frame.put_slice(&message);
            let mut call = http::Request::new(tonic::body::Body::new(http_body_util::Full::new(frame.freeze())));
            *call.method_mut() = http::Method::POST;
            *call.uri_mut() = http::Uri::try_from(path).map_err(|_| Status::internal("bad method path"))?;
            *call.version_mut() = http::Version::HTTP_2;
            *call.headers_mut() = metadata.into_headers();
            call.headers_mut().insert(
                http::header::CONTENT_TYPE,
                http::HeaderValue::from_static("application/grpc"),
            );
            call.headers_mut()
                .insert(http::header::TE, http::HeaderValue::from_static("trailers"));
            *call.extensions_mut() = extensions;

            let response = service.oneshot(call).await?;
            let (parts, body) = response.into_parts();
            // Trailers-only: the status is in the headers.
            if let Some(status) = Status::from_header_map(&parts.headers)
                && status.code() != tonic::Code::Ok
            {
                return Err(status);
            }
            let collected = http_body_util::BodyExt::collect(body)
                .await
                .map_err(|error| Status::from_error(error.into()))?;
            if let Some(status) = collected.trailers().and_then(Status::from_header_map)
                && status.code() != tonic::Code::Ok
            {
                return Err(status);
            }
            let trailers = MetadataMap::from_headers(collected.trailers().cloned().unwrap_or_default());
            let data = collected.to_bytes();
            if data.len() < 5 || data[0] != 0 {
                return Err(Status::internal(
                    "the upstream answered without an uncompressed message",
                ));
            }
            let length = u32::from_be_bytes([data[1], data[2], data[3], data[4]]) as usize;
            if data.len() < 5 + length {
                return Err(Status::internal("the upstream's message is truncated"));
            }
            Ok(UnaryReply {
                metadata: MetadataMap::from_headers(parts.headers),
                message: data.slice(5..5 + length),
                trailers,
            })
        })
    }

    pub fn server_streaming(
        &self,
        path: &str,
        request: tonic::Request<Bytes>,
    ) -> BoxFuture<'static, Result<(MetadataMap, Streaming<Bytes>), Status>> {
        let path = PathAndQuery::try_from(path).map_err(|_| Status::internal("bad method path"));
        let mut grpc = self.grpc();
        Box::pin(async move {
            grpc.ready()
                .await
                .map_err(|error| Status::unavailable(format!("upstream unavailable: {error}")))?;
            let response = grpc.server_streaming(request, path?, RawCodec).await?;
            let (metadata, stream, _) = response.into_parts();
            Ok((metadata, stream))
        })
    }

    /// The raw service, for forwarding gRPC and grpc-web requests untouched.
    pub fn service(&self) -> GrpcService {
        self.inner.clone()
    }
}

/// Passes protobuf bytes through unchanged: the edge encodes and decodes
/// with descriptors, not generated types.
#[derive(Debug, Clone, Copy, Default)]
pub struct RawCodec;

impl Codec for RawCodec {
    type Encode = Bytes;
    type Decode = Bytes;
    type Encoder = RawCodec;
    type Decoder = RawCodec;

    fn encoder(&mut self) -> Self::Encoder {
        RawCodec
    }

    fn decoder(&mut self) -> Self::Decoder {
        RawCodec
    }
}

impl Encoder for RawCodec {
    type Item = Bytes;
    type Error = Status;

    fn encode(&mut self, item: Bytes, dst: &mut EncodeBuf<'_>) -> Result<(), Status> {
        dst.put(item);
        Ok(())
    }
}

impl Decoder for RawCodec {
    type Item = Bytes;
    type Error = Status;

    fn decode(&mut self, src: &mut DecodeBuf<'_>) -> Result<Option<Bytes>, Status> {
        Ok(Some(src.copy_to_bytes(src.remaining())))
    }
}

/// An upstream that refuses every call: for tests of the pure HTTP rules.
pub fn unreachable_upstream() -> Upstream {
    Upstream::new(service_fn(|_request: http::Request<tonic::body::Body>| async {
        Ok::<_, Status>(Status::unavailable("no upstream").into_http::<tonic::body::Body>())
    }))
}
