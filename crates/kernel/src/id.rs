//! Identifiers: UUIDv7, time-ordered so that inserts stay index-friendly.

use uuid::Uuid;

use crate::error::{Error, Result};

pub fn new_id() -> Uuid {
    Uuid::now_v7()
}

/// Parses a request field that must hold an id.
pub fn parse_id(field: &str, value: &str) -> Result<Uuid> {
    if value.is_empty() {
        return Err(Error::invalid_field(field, "is required"));
    }
    Uuid::parse_str(value).map_err(|_| Error::invalid_field(field, "is not a valid id"))
}
