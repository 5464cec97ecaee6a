//! The module's gRPC services. None yet: the admin command and query
//! services (`proto/keel/jobs/v1`: get, list, stats, watch; cancel, retry,
//! delete, pause) are to come (docs/jobs.md).

/// The full names of the module's services.
pub const SERVICES: &[&str] = &[];
