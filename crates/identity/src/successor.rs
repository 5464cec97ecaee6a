//! Refresh-token successors: the token a rotation hands out is a keyed MAC
//! of the token it replaces, so that redeeming the old token again within
//! the grace window can hand out the *same* successor, though only its hash
//! is stored. Rotation is idempotent, and a session never forks into two
//! live refresh tokens.
//!
//! The MAC key is derived (HKDF-SHA256, its own label) from the seed of the
//! active signing key: without the server's key, holding a refresh token
//! tells nothing of its successor. Rotating the signing key changes the
//! successors; an old token presented again within the grace window of a
//! rotation made under the previous key finds no successor and is treated
//! as a reuse (the client signs in again).

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use hkdf::Hkdf;
use hmac::{Hmac, Mac};
use keel_kernel::{Error, Result, Secret};
use sha2::Sha256;

/// Domain separation: this key is used for nothing else.
const LABEL: &[u8] = b"keel refresh successor v1";

/// The HMAC-SHA256 key of refresh-token successors.
#[derive(Clone)]
pub struct SuccessorKey(Secret<[u8; 32]>);

impl std::fmt::Debug for SuccessorKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SuccessorKey([redacted])")
    }
}

impl SuccessorKey {
    /// Derives the key from an Ed25519 private seed.
    pub fn from_seed(seed: &[u8; 32]) -> std::result::Result<SuccessorKey, String> {
        let mut key = [0u8; 32];
        Hkdf::<Sha256>::new(None, seed)
            .expand(LABEL, &mut key)
            .map_err(|error| format!("cannot derive the refresh successor key: {error}"))?;
        Ok(SuccessorKey(Secret::new(key)))
    }

    /// The successor of `refresh_token`: HMAC-SHA256, base64url, the same
    /// length and alphabet as a random refresh token.
    pub fn successor(&self, refresh_token: &str) -> Result<Secret<String>> {
        let mut mac = Hmac::<Sha256>::new_from_slice(self.0.expose()).map_err(Error::internal)?;
        mac.update(refresh_token.as_bytes());
        Ok(Secret::new(URL_SAFE_NO_PAD.encode(mac.finalize().into_bytes())))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn successors_are_stable_per_key_and_differ_between_keys() {
        let key = SuccessorKey::from_seed(&[7; 32]).unwrap_or_else(|error| panic!("{error}"));
        let other = SuccessorKey::from_seed(&[8; 32]).unwrap_or_else(|error| panic!("{error}"));
        let successor =
            |key: &SuccessorKey, token: &str| key.successor(token).map(|secret| secret.expose().clone()).ok();
        let first = successor(&key, "token").unwrap_or_default();
        assert_eq!(first.len(), 43);
        assert_eq!(Some(&first), successor(&key, "token").as_ref());
        assert_ne!(Some(&first), successor(&key, "token2").as_ref());
        assert_ne!(Some(&first), successor(&other, "token").as_ref());
        // Keyed: not the plain SHA-256 of the token.
        assert_ne!(
            first,
            URL_SAFE_NO_PAD.encode(<Sha256 as sha2::Digest>::digest(b"token"))
        );
    }
}
