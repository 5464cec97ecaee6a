//! The one error type of Keel and the one table that maps its codes to gRPC
//! codes and HTTP statuses. Every transport reads this table; none keeps its own.

use std::time::Duration;

/// The restricted set of error codes. Each one has exactly one gRPC code and
/// one HTTP status (grpc-gateway's table).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Code {
    Cancelled,
    Unknown,
    InvalidArgument,
    DeadlineExceeded,
    NotFound,
    AlreadyExists,
    PermissionDenied,
    Unauthenticated,
    ResourceExhausted,
    FailedPrecondition,
    Aborted,
    OutOfRange,
    Unimplemented,
    Internal,
    Unavailable,
    DataLoss,
    /// A refinement of FAILED_PRECONDITION that REST answers with 422: an
    /// idempotency key sent again with a different request. It travels over
    /// gRPC as FAILED_PRECONDITION with the `google.rpc.ErrorInfo` reason
    /// [`IDEMPOTENCY_KEY_REUSED`], which is how the edge tells it apart
    /// ([`Code::from_status`](crate::grpc)). Not in [`Code::ALL`]: no gRPC
    /// code number maps to it alone.
    IdempotencyKeyReused,
}

/// The `google.rpc.ErrorInfo` reason of [`Code::IdempotencyKeyReused`].
pub const IDEMPOTENCY_KEY_REUSED: &str = "IDEMPOTENCY_KEY_REUSED";

impl Code {
    pub const ALL: [Code; 16] = [
        Code::Cancelled,
        Code::Unknown,
        Code::InvalidArgument,
        Code::DeadlineExceeded,
        Code::NotFound,
        Code::AlreadyExists,
        Code::PermissionDenied,
        Code::Unauthenticated,
        Code::ResourceExhausted,
        Code::FailedPrecondition,
        Code::Aborted,
        Code::OutOfRange,
        Code::Unimplemented,
        Code::Internal,
        Code::Unavailable,
        Code::DataLoss,
    ];

    /// The one table: (gRPC code number, HTTP status, name). The gRPC
    /// numbers are those of `google.rpc.Code`; `grpc.rs` turns them into
    /// tonic's type, so that this file knows no transport.
    const fn row(self) -> (i32, u16, &'static str) {
        match self {
            Code::Cancelled => (1, 499, "CANCELLED"),
            Code::Unknown => (2, 500, "UNKNOWN"),
            Code::InvalidArgument => (3, 400, "INVALID_ARGUMENT"),
            Code::DeadlineExceeded => (4, 504, "DEADLINE_EXCEEDED"),
            Code::NotFound => (5, 404, "NOT_FOUND"),
            Code::AlreadyExists => (6, 409, "ALREADY_EXISTS"),
            Code::PermissionDenied => (7, 403, "PERMISSION_DENIED"),
            Code::Unauthenticated => (16, 401, "UNAUTHENTICATED"),
            Code::ResourceExhausted => (8, 429, "RESOURCE_EXHAUSTED"),
            Code::FailedPrecondition => (9, 400, "FAILED_PRECONDITION"),
            Code::Aborted => (10, 409, "ABORTED"),
            Code::OutOfRange => (11, 400, "OUT_OF_RANGE"),
            Code::Unimplemented => (12, 501, "UNIMPLEMENTED"),
            Code::Internal => (13, 500, "INTERNAL"),
            Code::Unavailable => (14, 503, "UNAVAILABLE"),
            Code::DataLoss => (15, 500, "DATA_LOSS"),
            Code::IdempotencyKeyReused => (9, 422, "FAILED_PRECONDITION"),
        }
    }

    /// The `google.rpc.Code` number.
    pub const fn grpc_number(self) -> i32 {
        self.row().0
    }

    pub const fn http_status(self) -> u16 {
        self.row().1
    }

    /// The canonical name, as REST error bodies show it (`NOT_FOUND`).
    pub const fn as_str(self) -> &'static str {
        self.row().2
    }

    /// The code of a `google.rpc.Code` number; `Unknown` for OK and numbers outside the table.
    pub fn from_grpc_number(number: i32) -> Code {
        Code::ALL
            .into_iter()
            .find(|candidate| candidate.grpc_number() == number)
            .unwrap_or(Code::Unknown)
    }
}

impl std::fmt::Display for Code {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One invalid field of a request (`google.rpc.BadRequest.FieldViolation`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FieldViolation {
    pub field: String,
    pub description: String,
}

/// The error every command, query and adapter returns.
///
/// `message` is sent to the client; `cause` never is: for internal errors the
/// client sees a fixed message and the cause is logged with the request id.
#[derive(Debug)]
pub struct Error {
    code: Code,
    message: String,
    violations: Vec<FieldViolation>,
    retry_after: Option<Duration>,
    // Boxed: rare, and it keeps `Result<T, Error>` small.
    info: Option<Box<ErrorInfo>>,
    cause: Option<Box<dyn std::error::Error + Send + Sync>>,
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// A machine-readable reason and its metadata (`google.rpc.ErrorInfo`).
type ErrorInfo = (String, Vec<(String, String)>);

impl Error {
    pub fn new(code: Code, message: impl Into<String>) -> Self {
        Self {
            code,
            message: message.into(),
            violations: Vec::new(),
            retry_after: None,
            info: None,
            cause: None,
        }
    }

    /// Adds a machine-readable reason (`google.rpc.ErrorInfo`, domain `keel`)
    /// with metadata, e.g. where a subscriber should resume.
    pub fn with_info(mut self, reason: &str, metadata: &[(&str, String)]) -> Self {
        let metadata = metadata.iter().map(|(key, value)| ((*key).to_owned(), value.clone()));
        self.info = Some(Box::new((reason.to_owned(), metadata.collect())));
        self
    }

    pub fn info(&self) -> Option<(&str, &[(String, String)])> {
        self.info
            .as_deref()
            .map(|(reason, metadata)| (reason.as_str(), metadata.as_slice()))
    }

    pub fn code(&self) -> Code {
        self.code
    }

    pub fn message(&self) -> &str {
        &self.message
    }

    pub fn violations(&self) -> &[FieldViolation] {
        &self.violations
    }

    pub fn retry_after(&self) -> Option<Duration> {
        self.retry_after
    }

    /// What went wrong inside, for the log; never for the client.
    pub fn cause(&self) -> Option<&(dyn std::error::Error + Send + Sync + 'static)> {
        self.cause.as_deref()
    }

    pub fn not_found(what: impl Into<String>) -> Self {
        Self::new(Code::NotFound, format!("{} not found", what.into()))
    }

    pub fn unauthenticated(message: impl Into<String>) -> Self {
        Self::new(Code::Unauthenticated, message)
    }

    pub fn permission_denied(message: impl Into<String>) -> Self {
        Self::new(Code::PermissionDenied, message)
    }

    pub fn already_exists(message: impl Into<String>) -> Self {
        Self::new(Code::AlreadyExists, message)
    }

    /// A request with one invalid field.
    pub fn invalid_field(field: impl Into<String>, description: impl Into<String>) -> Self {
        Self::invalid(vec![FieldViolation {
            field: field.into(),
            description: description.into(),
        }])
    }

    /// A request with several invalid fields; the message names them all.
    pub fn invalid(violations: Vec<FieldViolation>) -> Self {
        let message = violations
            .iter()
            .map(|violation| format!("{}: {}", violation.field, violation.description))
            .collect::<Vec<_>>()
            .join("; ");
        Self {
            violations,
            ..Self::new(Code::InvalidArgument, message)
        }
    }

    /// The same idempotency key with a different request (422 over REST).
    pub fn idempotency_key_reused(message: impl Into<String>) -> Self {
        Self::new(Code::IdempotencyKeyReused, message).with_info(IDEMPOTENCY_KEY_REUSED, &[])
    }

    /// A request judged twice: by its contract's field rules (`rules`) and by
    /// its parse into a command or query (`parsed`). A refusal names every
    /// field either refused, the parse's own descriptions first (they are
    /// the more precise), then the rules' for the fields it did not name.
    pub fn with_rules<T>(rules: Vec<FieldViolation>, parsed: Result<T>) -> Result<T> {
        if rules.is_empty() {
            return parsed;
        }
        let mut violations = match parsed {
            Err(error) if error.code == Code::InvalidArgument && !error.violations.is_empty() => error.violations,
            // Any other outcome of the parse: the rules refuse first.
            _ => Vec::new(),
        };
        for rule in rules {
            // `update_mask.id` from the parse already names `update_mask`.
            let named = |violation: &FieldViolation| {
                violation.field == rule.field
                    || violation
                        .field
                        .strip_prefix(rule.field.as_str())
                        .is_some_and(|rest| rest.starts_with('.'))
            };
            if !violations.iter().any(named) {
                violations.push(rule);
            }
        }
        Err(Self::invalid(violations))
    }

    pub fn resource_exhausted(message: impl Into<String>, retry_after: Duration) -> Self {
        Self {
            retry_after: Some(retry_after),
            ..Self::new(Code::ResourceExhausted, message)
        }
    }

    /// An internal failure: the client is told only "internal error".
    pub fn internal(cause: impl Into<Box<dyn std::error::Error + Send + Sync>>) -> Self {
        Self {
            cause: Some(cause.into()),
            ..Self::new(Code::Internal, "internal error")
        }
    }

    pub fn unavailable(cause: impl Into<Box<dyn std::error::Error + Send + Sync>>) -> Self {
        Self {
            cause: Some(cause.into()),
            ..Self::new(Code::Unavailable, "service unavailable, retry later")
        }
    }

    pub fn with_cause(mut self, cause: impl Into<Box<dyn std::error::Error + Send + Sync>>) -> Self {
        self.cause = Some(cause.into());
        self
    }
}

impl std::fmt::Display for Error {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.code, self.message)?;
        if let Some(cause) = &self.cause {
            write!(f, " ({cause})")?;
        }
        Ok(())
    }
}

impl std::error::Error for Error {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.cause.as_deref().map(|cause| cause as _)
    }
}

/// Checkouts of a database connection that timed out (the pool had none
/// free within its acquire timeout), as keel's code met them: sqlx reports
/// no timing for them, so `/metrics` counts them apart
/// (`keel_db_pool_acquire_timeouts_total`).
pub static POOL_ACQUIRE_TIMEOUTS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

impl From<sea_orm::DbErr> for Error {
    fn from(error: sea_orm::DbErr) -> Self {
        if matches!(
            error,
            sea_orm::DbErr::ConnectionAcquire(sea_orm::error::ConnAcquireErr::Timeout)
        ) {
            POOL_ACQUIRE_TIMEOUTS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
        match &error {
            sea_orm::DbErr::ConnectionAcquire(_) | sea_orm::DbErr::Conn(_) => Error::unavailable(error),
            _ => Error::internal(error),
        }
    }
}

impl<E: Into<Error> + std::error::Error> From<sea_orm::TransactionError<E>> for Error {
    fn from(error: sea_orm::TransactionError<E>) -> Self {
        match error {
            sea_orm::TransactionError::Connection(db) => db.into(),
            sea_orm::TransactionError::Transaction(inner) => inner.into(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_checkout_that_timed_out_is_counted_and_unavailable() {
        let before = POOL_ACQUIRE_TIMEOUTS.load(std::sync::atomic::Ordering::Relaxed);
        let error = Error::from(sea_orm::DbErr::ConnectionAcquire(
            sea_orm::error::ConnAcquireErr::Timeout,
        ));
        assert_eq!(error.code(), Code::Unavailable);
        assert!(POOL_ACQUIRE_TIMEOUTS.load(std::sync::atomic::Ordering::Relaxed) > before);
    }

    #[test]
    fn the_table_matches_grpc_gateway() {
        let expected = [
            (Code::Cancelled, 499),
            (Code::InvalidArgument, 400),
            (Code::DeadlineExceeded, 504),
            (Code::NotFound, 404),
            (Code::AlreadyExists, 409),
            (Code::PermissionDenied, 403),
            (Code::Unauthenticated, 401),
            (Code::ResourceExhausted, 429),
            (Code::FailedPrecondition, 400),
            (Code::Aborted, 409),
            (Code::OutOfRange, 400),
            (Code::Unimplemented, 501),
            (Code::Unavailable, 503),
            (Code::Internal, 500),
            (Code::Unknown, 500),
            (Code::DataLoss, 500),
        ];
        for (code, status) in expected {
            assert_eq!(code.http_status(), status, "{code}");
            assert_eq!(Code::from_grpc_number(code.grpc_number()), code);
        }
    }

    #[test]
    fn a_reused_idempotency_key_is_a_failed_precondition_that_rest_answers_with_422() {
        let error = Error::idempotency_key_reused("reused");
        assert_eq!(error.code().http_status(), 422);
        assert_eq!(error.code().grpc_number(), Code::FailedPrecondition.grpc_number());
        assert_eq!(error.code().as_str(), "FAILED_PRECONDITION");
        assert_eq!(error.info().map(|(reason, _)| reason), Some(IDEMPOTENCY_KEY_REUSED));
        // A plain FAILED_PRECONDITION stays 400.
        assert_eq!(Code::from_grpc_number(9), Code::FailedPrecondition);
    }
}

/// Gathers the field violations of several parses, so that one response
/// names every invalid field instead of only the first.
#[derive(Debug, Default)]
pub struct Violations(Vec<FieldViolation>);

impl Violations {
    pub fn new() -> Self {
        Self::default()
    }

    /// The value, or `None` after recording why it was refused.
    pub fn take<T>(&mut self, result: Result<T>) -> Option<T> {
        match result {
            Ok(value) => Some(value),
            Err(error) if error.violations.is_empty() => {
                self.0.push(FieldViolation {
                    field: String::new(),
                    description: error.message,
                });
                None
            }
            Err(error) => {
                self.0.extend(error.violations);
                None
            }
        }
    }

    /// INVALID_ARGUMENT naming every recorded field.
    pub fn into_error(self) -> Error {
        if self.0.is_empty() {
            return Error::new(Code::InvalidArgument, "invalid request");
        }
        Error::invalid(self.0)
    }
}
