//! Cursor pagination: page sizes and opaque page tokens.
//!
//! A token is the base64url of a small JSON document that the query writes
//! and reads back (usually the sort key of the last row plus a fingerprint of
//! the filters). Clients treat it as opaque; a token reused with other filters
//! or tampered with is INVALID_ARGUMENT, never a wrong page.

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::error::{Error, Result};

pub const DEFAULT_PAGE_SIZE: u64 = 20;
pub const MAX_PAGE_SIZE: u64 = 100;

/// `page_size` as AIP-158 reads it: 0 means the default, larger than the
/// maximum is lowered to the maximum, negative is an error.
pub fn page_size(requested: i32) -> Result<u64> {
    page_size_within(requested, DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE)
}

/// [`page_size`] for a list with its own default and maximum.
pub fn page_size_within(requested: i32, default: u64, max: u64) -> Result<u64> {
    match requested {
        0 => Ok(default),
        size if size < 0 => Err(Error::invalid_field("page_size", "must not be negative")),
        size => Ok((size as u64).min(max)),
    }
}

pub fn encode_token<T: Serialize>(cursor: &T) -> Result<String> {
    let json = serde_json::to_vec(cursor).map_err(Error::internal)?;
    Ok(URL_SAFE_NO_PAD.encode(json))
}

/// The cursor inside `page_token`, or `None` for the first page.
pub fn decode_token<T: DeserializeOwned>(token: &str) -> Result<Option<T>> {
    if token.is_empty() {
        return Ok(None);
    }
    let invalid = || Error::invalid_field("page_token", "is not a page token of this list");
    let json = URL_SAFE_NO_PAD.decode(token).map_err(|_| invalid())?;
    serde_json::from_slice(&json).map(Some).map_err(|_| invalid())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn page_sizes_default_and_clamp() {
        assert_eq!(page_size(0).ok(), Some(20));
        assert_eq!(page_size(7).ok(), Some(7));
        assert_eq!(page_size(100_000).ok(), Some(100));
        assert!(page_size(-1).is_err());
    }

    #[test]
    fn tokens_round_trip_and_garbage_is_rejected() {
        let token = encode_token(&("2026-01-01", 42)).expect("encode");
        let back: Option<(String, i32)> = decode_token(&token).expect("decode");
        assert_eq!(back, Some(("2026-01-01".to_owned(), 42)));
        assert!(decode_token::<(String, i32)>("not a token!").is_err());
        assert_eq!(decode_token::<(String, i32)>("").ok(), Some(None));
    }
}
