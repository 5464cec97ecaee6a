//! The kernel's one gRPC adapter: the error table as tonic codes and
//! statuses (with `google.rpc` details), the request context that the
//! server's layers put on each call, and time conversions. No other kernel
//! file knows tonic; every module's `grpc.rs` uses this one.

use std::convert::Infallible;

use chrono::{DateTime, Utc};
use tonic::server::NamedService;
use tonic::service::{Routes, RoutesBuilder};

use crate::context::RequestContext;
use crate::error::{Code, Error, FieldViolation};
use crate::module::GrpcLimits;

pub use tonic::codec::CompressionEncoding;

/// A module's generated server with what every keel service sets: the
/// message size limits of `limits`, and gzip and zstd message compression
/// accepted and sent when the caller asks for it (`grpc-accept-encoding`).
/// A macro because these are inherent methods of each generated server.
///
/// ```text
/// routes.add(keel_kernel::grpc_server!(MyServiceServer::new(api), routes.limits()));
/// ```
#[macro_export]
macro_rules! grpc_server {
    ($server:expr, $limits:expr) => {{
        let limits: $crate::GrpcLimits = $limits;
        $server
            .max_decoding_message_size(limits.max_message_bytes)
            .max_encoding_message_size(limits.max_message_bytes)
            .accept_compressed($crate::grpc::CompressionEncoding::Gzip)
            .accept_compressed($crate::grpc::CompressionEncoding::Zstd)
            .send_compressed($crate::grpc::CompressionEncoding::Gzip)
            .send_compressed($crate::grpc::CompressionEncoding::Zstd)
    }};
}

/// The gRPC services of every module, collected by the composition root
/// through [`crate::Module::grpc`]. Each module adds its generated servers
/// with the [`GrpcRoutes::limits`] applied.
pub struct GrpcRoutes {
    builder: RoutesBuilder,
    limits: GrpcLimits,
}

impl GrpcRoutes {
    pub fn new(limits: GrpcLimits) -> Self {
        Self {
            builder: RoutesBuilder::default(),
            limits,
        }
    }

    /// The limits every service must set (message sizes).
    pub fn limits(&self) -> GrpcLimits {
        self.limits
    }

    pub fn add<S>(&mut self, service: S) -> &mut Self
    where
        S: tower::Service<http::Request<tonic::body::Body>, Error = Infallible>
            + NamedService
            + Clone
            + Send
            + Sync
            + 'static,
        S::Response: axum::response::IntoResponse,
        S::Future: Send + 'static,
    {
        self.builder.add_service(service);
        self
    }

    /// The collected services, for the server's router.
    pub fn into_routes(self) -> Routes {
        self.builder.routes()
    }
}

impl Code {
    pub fn grpc(self) -> tonic::Code {
        tonic::Code::from_i32(self.grpc_number())
    }

    pub fn from_grpc(code: tonic::Code) -> Code {
        Code::from_grpc_number(code as i32)
    }

    /// The code of a status, read with its details: what a transport that
    /// answers in HTTP statuses (the edge) must use, since a FAILED_PRECONDITION
    /// whose `ErrorInfo` reason is `IDEMPOTENCY_KEY_REUSED` is a 422.
    pub fn from_status(status: &tonic::Status) -> Code {
        use tonic_types::StatusExt;

        let code = Code::from_grpc(status.code());
        if code == Code::FailedPrecondition
            && !status.details().is_empty()
            && status
                .get_details_error_info()
                .is_some_and(|info| info.reason == crate::error::IDEMPOTENCY_KEY_REUSED)
        {
            return Code::IdempotencyKeyReused;
        }
        code
    }
}

impl From<Error> for tonic::Status {
    fn from(error: Error) -> Self {
        use tonic_types::{ErrorDetails, StatusExt};

        let code = error.code();
        if let Some(cause) = error.cause() {
            // The span of the call carries the request id.
            if matches!(
                code,
                Code::Internal | Code::Unknown | Code::DataLoss | Code::Unavailable
            ) {
                tracing::error!(code = %code, cause = %cause, "request failed");
            } else {
                tracing::debug!(code = %code, cause = %cause, "request refused");
            }
        }
        let mut details = ErrorDetails::new();
        if !error.violations().is_empty() {
            details.set_bad_request(
                error
                    .violations()
                    .iter()
                    .map(|violation| {
                        tonic_types::FieldViolation::new(violation.field.clone(), violation.description.clone())
                    })
                    .collect::<Vec<_>>(),
            );
        }
        if let Some(retry_after) = error.retry_after() {
            details.set_retry_info(Some(retry_after));
        }
        if let Some((reason, metadata)) = error.info() {
            details.set_error_info(
                reason.to_owned(),
                "keel",
                metadata.iter().cloned().collect::<std::collections::HashMap<_, _>>(),
            );
        }
        let plain = error.violations().is_empty() && error.retry_after().is_none() && error.info().is_none();
        let message = error.message().to_owned();
        let mut status = if plain {
            tonic::Status::new(code.grpc(), message)
        } else {
            tonic::Status::with_error_details(code.grpc(), message, details)
        };
        if let Some(retry_after) = error.retry_after() {
            let seconds = retry_after.as_secs_f64().ceil().max(1.0) as u64;
            if let Ok(value) = seconds.to_string().parse() {
                status.metadata_mut().insert("retry-after", value);
            }
        }
        status
    }
}

/// A request parsed into its command or query after its contract's field
/// rules were checked (`keel_proto::validate`: `google.api.field_behavior`
/// and `buf.validate`). Every module's `grpc.rs` calls this (or [`checked`])
/// first, so the rules hold for every method and protocol (REST, Connect and
/// grpc-web reach the same service), after the access layer and after tonic
/// decompressed and decoded the message.
pub fn parse<R, C>(request: R) -> Result<C, Error>
where
    R: prost::Message + prost::Name,
    C: TryFrom<R, Error = Error>,
{
    let rules = rule_violations(&request)?;
    Error::with_rules(rules, C::try_from(request))
}

/// [`parse`] for a request that has no parse of its own.
pub fn checked<R: prost::Message + prost::Name>(request: &R) -> Result<(), Error> {
    Error::with_rules(rule_violations(request)?, Ok(()))
}

fn rule_violations<R: prost::Message + prost::Name>(request: &R) -> Result<Vec<FieldViolation>, Error> {
    let violations = keel_proto::validate::violations(request).map_err(Error::internal)?;
    Ok(violations
        .into_iter()
        .map(|violation| FieldViolation {
            field: violation.field,
            description: violation.description,
        })
        .collect())
}

/// The context the server's layers attached to the call, or a bare one
/// (no principal) when the service is called without them. With an
/// idempotency key it carries the request's fingerprint: the SHA-256 of the
/// decoded message encoded again, so the same request sent over REST,
/// Connect or gRPC, compressed or not, has one fingerprint.
pub fn context<T: prost::Message>(request: &tonic::Request<T>) -> RequestContext {
    let mut ctx = request
        .extensions()
        .get::<RequestContext>()
        .cloned()
        .unwrap_or_else(|| RequestContext::new(crate::id::new_id().to_string()));
    if ctx.idempotency_key.is_some() {
        ctx.set_request_fingerprint(crate::idempotency::fingerprint(&request.get_ref().encode_to_vec()));
    }
    ctx
}

pub fn timestamp(time: DateTime<Utc>) -> prost_types::Timestamp {
    prost_types::Timestamp {
        seconds: time.timestamp(),
        nanos: time.timestamp_subsec_nanos() as i32,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_code_maps_to_its_tonic_code_and_back() {
        let expected = [
            (Code::Cancelled, tonic::Code::Cancelled),
            (Code::Unknown, tonic::Code::Unknown),
            (Code::InvalidArgument, tonic::Code::InvalidArgument),
            (Code::DeadlineExceeded, tonic::Code::DeadlineExceeded),
            (Code::NotFound, tonic::Code::NotFound),
            (Code::AlreadyExists, tonic::Code::AlreadyExists),
            (Code::PermissionDenied, tonic::Code::PermissionDenied),
            (Code::Unauthenticated, tonic::Code::Unauthenticated),
            (Code::ResourceExhausted, tonic::Code::ResourceExhausted),
            (Code::FailedPrecondition, tonic::Code::FailedPrecondition),
            (Code::Aborted, tonic::Code::Aborted),
            (Code::OutOfRange, tonic::Code::OutOfRange),
            (Code::Unimplemented, tonic::Code::Unimplemented),
            (Code::Internal, tonic::Code::Internal),
            (Code::Unavailable, tonic::Code::Unavailable),
            (Code::DataLoss, tonic::Code::DataLoss),
        ];
        assert_eq!(expected.len(), Code::ALL.len());
        for (code, grpc) in expected {
            assert_eq!(code.grpc(), grpc, "{code}");
            assert_eq!(Code::from_grpc(grpc), code);
        }
        assert_eq!(Code::from_grpc(tonic::Code::Ok), Code::Unknown);
    }

    #[test]
    fn a_reused_idempotency_key_survives_the_trip_through_a_status() {
        let status: tonic::Status = Error::idempotency_key_reused("reused").into();
        assert_eq!(status.code(), tonic::Code::FailedPrecondition);
        assert_eq!(Code::from_status(&status), Code::IdempotencyKeyReused);
        let plain: tonic::Status = Error::new(Code::FailedPrecondition, "no").into();
        assert_eq!(Code::from_status(&plain), Code::FailedPrecondition);
    }

    #[test]
    fn internal_causes_never_reach_the_client() {
        let status: tonic::Status = Error::internal("password column missing").into();
        assert_eq!(status.code(), tonic::Code::Internal);
        assert_eq!(status.message(), "internal error");
    }

    #[test]
    fn field_violations_travel_as_bad_request() {
        use tonic_types::StatusExt;
        let status: tonic::Status = Error::invalid_field("email", "is not an email address").into();
        let details = status.get_error_details();
        let bad_request = details.bad_request().expect("bad request details");
        assert_eq!(bad_request.field_violations[0].field, "email");
        assert_eq!(status.message(), "email: is not an email address");
    }
}
