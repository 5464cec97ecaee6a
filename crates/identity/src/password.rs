//! Password hashing: Argon2id, m=19456 KiB, t=2, p=1 (OWASP's minimum), run
//! on the blocking pool so a hash never stalls the async workers.

use std::sync::{Arc, OnceLock};

use argon2::password_hash::rand_core::OsRng;
use argon2::password_hash::{PasswordHash, PasswordHasher as _, PasswordVerifier as _, SaltString};
use argon2::{Algorithm, Argon2, Params, Version};
use keel_kernel::{Error, Result, Secret};

use crate::model::HashedPassword;

#[derive(Clone)]
pub struct PasswordHasher {
    params: Params,
    // Verified against when the account does not exist, so that an unknown
    // email costs the same time as a wrong password.
    dummy: Arc<OnceLock<HashedPassword>>,
}

impl Default for PasswordHasher {
    fn default() -> Self {
        Self::new()
    }
}

impl PasswordHasher {
    pub fn new() -> Self {
        let params = Params::new(19_456, 2, 1, None).unwrap_or_default();
        Self {
            params,
            dummy: Arc::new(OnceLock::new()),
        }
    }

    fn argon2(params: Params) -> Argon2<'static> {
        Argon2::new(Algorithm::Argon2id, Version::V0x13, params)
    }

    /// A PHC string (`$argon2id$v=19$m=19456,t=2,p=1$...`).
    pub async fn hash(&self, password: &Secret<String>) -> Result<HashedPassword> {
        let params = self.params.clone();
        let password = password.clone();
        tokio::task::spawn_blocking(move || {
            let salt = SaltString::generate(&mut OsRng);
            Self::argon2(params)
                .hash_password(password.expose().as_bytes(), &salt)
                .map(|hash| HashedPassword::new(hash.to_string()))
                .map_err(|error| Error::internal(format!("hashing failed: {error}")))
        })
        .await
        .map_err(Error::internal)?
    }

    /// True when `password` matches `stored`. Malformed hashes are internal errors.
    pub async fn verify(&self, password: &Secret<String>, stored: &HashedPassword) -> Result<bool> {
        let params = self.params.clone();
        let password = password.clone();
        let stored = stored.clone();
        tokio::task::spawn_blocking(move || {
            let parsed = PasswordHash::new(stored.as_str())
                .map_err(|error| Error::internal(format!("stored hash unreadable: {error}")))?;
            Ok(Self::argon2(params)
                .verify_password(password.expose().as_bytes(), &parsed)
                .is_ok())
        })
        .await
        .map_err(Error::internal)?
    }

    /// Spends the time of one verification, for an account that does not exist.
    pub async fn verify_dummy(&self, password: &Secret<String>) -> Result<()> {
        let dummy = match self.dummy.get() {
            Some(dummy) => dummy.clone(),
            None => {
                let hash = self.hash(&Secret::new("keel dummy password".to_owned())).await?;
                self.dummy.get_or_init(|| hash).clone()
            }
        };
        self.verify(password, &dummy).await.map(|_| ())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn hashes_are_argon2id_with_the_required_cost_and_verify() {
        let hasher = PasswordHasher::new();
        let secret = Secret::new("correct horse battery staple".to_owned());
        let hash = hasher.hash(&secret).await.expect("hash");
        assert!(
            hash.as_str().starts_with("$argon2id$v=19$m=19456,t=2,p=1$"),
            "{}",
            hash.as_str()
        );
        assert_eq!(format!("{hash:?}"), "[redacted]");
        assert!(hasher.verify(&secret, &hash).await.expect("verify"));
        assert!(
            !hasher
                .verify(&Secret::new("wrong".to_owned()), &hash)
                .await
                .expect("verify")
        );
    }
}
