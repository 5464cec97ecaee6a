//! Access tokens (EdDSA JWTs), the signing keys and their JWKS, and opaque
//! refresh tokens.
//!
//! The key file is JSON: `{"active": "<kid>", "keys": [{"kid": "...",
//! "private_key": "<base64url Ed25519 seed>"} | {"kid": "...", "public_key":
//! "<base64url>"}]}`. The active key signs; every key verifies and is
//! published in the JWKS, so a key can be rotated in before it signs and kept
//! after it stops.

use std::collections::HashMap;
use std::path::Path;
use std::time::Duration;

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use chrono::{DateTime, Utc};
use ed25519_dalek::SigningKey;
use ed25519_dalek::pkcs8::EncodePrivateKey;
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use keel_kernel::{Error, Result, Role, Secret};
use rand::RngCore;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use uuid::Uuid;

pub use crate::successor::SuccessorKey;

const ACCESS_TYPE: &str = "access";

/// One public key as RFC 8037 publishes it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PublicJwk {
    pub kid: String,
    pub x: String,
}

#[derive(Deserialize)]
struct KeyFile {
    active: String,
    keys: Vec<KeyEntry>,
}

#[derive(Deserialize)]
struct KeyEntry {
    kid: String,
    #[serde(default)]
    private_key: Option<Secret<String>>,
    #[serde(default)]
    public_key: Option<String>,
}

/// The signing key and every verification key.
pub struct KeySet {
    active_kid: String,
    signing: EncodingKey,
    successor: SuccessorKey,
    verifying: HashMap<String, DecodingKey>,
    public: Vec<PublicJwk>,
}

impl std::fmt::Debug for KeySet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KeySet")
            .field("active_kid", &self.active_kid)
            .field("kids", &self.public.iter().map(|key| &key.kid).collect::<Vec<_>>())
            .finish_non_exhaustive()
    }
}

/// Why a key file could not be used; messages name the file, never a key.
#[derive(Debug, thiserror::Error)]
pub enum KeyFileError {
    #[error("cannot read auth key file {path}: {source}")]
    Read { path: String, source: std::io::Error },
    #[error("cannot write auth key file {path}: {source}")]
    Write { path: String, source: std::io::Error },
    #[error("auth key file {path} is invalid: {reason}")]
    Invalid { path: String, reason: String },
}

impl KeySet {
    /// Reads a key file.
    pub fn load(path: &Path) -> Result<KeySet, KeyFileError> {
        let text = std::fs::read_to_string(path).map_err(|source| KeyFileError::Read {
            path: path.display().to_string(),
            source,
        })?;
        Self::parse(&text).map_err(|reason| KeyFileError::Invalid {
            path: path.display().to_string(),
            reason,
        })
    }

    /// Reads the key file, or creates it (mode 0600) with one new key.
    ///
    /// Keels started together on one data directory (`keel serve` beside
    /// `keel worker`) race to create it: the key is written to a private
    /// temporary file beside it and linked into place only if no file is
    /// there, so every keel reads one whole file and signs with one key.
    pub fn load_or_generate(path: &Path) -> Result<KeySet, KeyFileError> {
        if path.exists() {
            return Self::load(path);
        }
        let write_error = |source| KeyFileError::Write {
            path: path.display().to_string(),
            source,
        };
        let parent = match path.parent() {
            Some(parent) if !parent.as_os_str().is_empty() => parent,
            _ => Path::new("."),
        };
        std::fs::create_dir_all(parent).map_err(write_error)?;
        // `tempfile` creates the file with mode 0600 on unix.
        let mut file = tempfile::NamedTempFile::new_in(parent).map_err(write_error)?;
        {
            use std::io::Write;
            file.write_all(Self::generate_file().as_bytes()).map_err(write_error)?;
            file.as_file().sync_all().map_err(write_error)?;
        }
        match file.persist_noclobber(path) {
            Ok(_) => tracing::info!(path = %path.display(), "generated a new signing key"),
            // Another keel linked its file first: use that one.
            Err(error) if error.error.kind() == std::io::ErrorKind::AlreadyExists => {}
            Err(error) => return Err(write_error(error.error)),
        }
        Self::load(path)
    }

    /// The JSON of a key file holding one freshly generated key.
    pub fn generate_file() -> String {
        let mut seed = [0u8; 32];
        rand::rngs::OsRng.fill_bytes(&mut seed);
        let public = URL_SAFE_NO_PAD.encode(SigningKey::from_bytes(&seed).verifying_key().to_bytes());
        let kid = thumbprint(&public);
        serde_json::json!({
            "active": kid,
            "keys": [{ "kid": kid, "private_key": URL_SAFE_NO_PAD.encode(seed) }],
        })
        .to_string()
    }

    pub fn parse(text: &str) -> Result<KeySet, String> {
        let file: KeyFile = serde_json::from_str(text).map_err(|error| error.to_string())?;
        let mut signing = None;
        let mut verifying = HashMap::new();
        let mut public = Vec::new();
        for entry in file.keys {
            let public_bytes: [u8; 32] = match (&entry.private_key, &entry.public_key) {
                (Some(private_key), _) => {
                    let seed: [u8; 32] = URL_SAFE_NO_PAD
                        .decode(private_key.expose().trim())
                        .ok()
                        .and_then(|bytes| bytes.try_into().ok())
                        .ok_or_else(|| format!("key {}: private_key must be 32 bytes of base64url", entry.kid))?;
                    let key = SigningKey::from_bytes(&seed);
                    if entry.kid == file.active {
                        let der = key
                            .to_pkcs8_der()
                            .map_err(|error| format!("key {}: {error}", entry.kid))?;
                        let successor =
                            SuccessorKey::from_seed(&seed).map_err(|error| format!("key {}: {error}", entry.kid))?;
                        signing = Some((EncodingKey::from_ed_der(der.as_bytes()), successor));
                    }
                    key.verifying_key().to_bytes()
                }
                (None, Some(public_key)) => URL_SAFE_NO_PAD
                    .decode(public_key.trim())
                    .ok()
                    .and_then(|bytes| bytes.try_into().ok())
                    .ok_or_else(|| format!("key {}: public_key must be 32 bytes of base64url", entry.kid))?,
                (None, None) => {
                    return Err(format!("key {}: needs private_key or public_key", entry.kid));
                }
            };
            if verifying
                .insert(entry.kid.clone(), DecodingKey::from_ed_der(&public_bytes))
                .is_some()
            {
                return Err(format!("key {} appears twice", entry.kid));
            }
            public.push(PublicJwk {
                kid: entry.kid,
                x: URL_SAFE_NO_PAD.encode(public_bytes),
            });
        }
        let (signing, successor) =
            signing.ok_or_else(|| format!("the active key {:?} has no private_key", file.active))?;
        Ok(KeySet {
            active_kid: file.active,
            signing,
            successor,
            verifying,
            public,
        })
    }

    pub fn public_keys(&self) -> &[PublicJwk] {
        &self.public
    }
}

/// The RFC 7638 thumbprint of an Ed25519 public key, shortened: a kid that
/// is unique per key and the same wherever it is computed.
pub fn thumbprint(x: &str) -> String {
    let canonical = format!(r#"{{"crv":"Ed25519","kty":"OKP","x":"{x}"}}"#);
    URL_SAFE_NO_PAD.encode(Sha256::digest(canonical.as_bytes()))[..16].to_owned()
}

/// The claims of an access token.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct AccessClaims {
    pub iss: String,
    pub aud: String,
    pub sub: String,
    pub sid: String,
    pub role: String,
    pub typ: String,
    pub iat: i64,
    pub exp: i64,
}

/// Issues and verifies access tokens.
pub struct TokenService {
    keys: KeySet,
    issuer: String,
    audience: String,
    access_ttl: Duration,
    /// Tokens whose signature and claims were verified, with what they say:
    /// an Ed25519 verification costs more than the rest of an authenticated
    /// read, and a client sends the same token for its whole lifetime. Keyed
    /// by the whole token, never by a short hash that could be made to
    /// collide; the expiry is checked on every hit. Whether the session is
    /// still active is not cached: the database answers that on every call.
    verified: quick_cache::sync::Cache<String, VerifiedAccess>,
}

/// What a verified access token says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VerifiedAccess {
    pub user_id: Uuid,
    pub session_id: Uuid,
    /// `exp`, in seconds since the epoch.
    pub expires_at: i64,
}

impl VerifiedAccess {
    /// `exp` as a time.
    pub fn expires_at(&self) -> Option<DateTime<Utc>> {
        DateTime::from_timestamp(self.expires_at, 0)
    }
}

/// Accepted clock skew on `exp`, `nbf` and `iat`, in seconds.
const LEEWAY_SECONDS: i64 = 5;

/// Verified tokens kept (about 400 bytes each).
const VERIFIED_CAPACITY: usize = 10_000;

impl std::fmt::Debug for TokenService {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TokenService")
            .field("keys", &self.keys)
            .field("issuer", &self.issuer)
            .field("audience", &self.audience)
            .field("access_ttl", &self.access_ttl)
            .finish_non_exhaustive()
    }
}

impl TokenService {
    pub fn new(keys: KeySet, issuer: String, audience: String, access_ttl: Duration) -> Self {
        Self {
            keys,
            issuer,
            audience,
            access_ttl,
            verified: quick_cache::sync::Cache::new(VERIFIED_CAPACITY),
        }
    }

    pub fn keys(&self) -> &KeySet {
        &self.keys
    }

    pub fn issue_access(
        &self,
        user_id: Uuid,
        session_id: Uuid,
        role: Role,
        now: DateTime<Utc>,
    ) -> Result<(String, DateTime<Utc>)> {
        let expires_at = now + self.access_ttl;
        let claims = AccessClaims {
            iss: self.issuer.clone(),
            aud: self.audience.clone(),
            sub: user_id.to_string(),
            sid: session_id.to_string(),
            role: role.as_str().to_owned(),
            typ: ACCESS_TYPE.to_owned(),
            iat: now.timestamp(),
            exp: expires_at.timestamp(),
        };
        let mut header = Header::new(Algorithm::EdDSA);
        header.kid = Some(self.keys.active_kid.clone());
        header.typ = Some("JWT".to_owned());
        let token = jsonwebtoken::encode(&header, &claims, &self.keys.signing)
            .map_err(|error| Error::internal(format!("signing failed: {error}")))?;
        Ok((token, expires_at))
    }

    /// Checks signature (EdDSA only, by `kid`), `iss`, `aud`, `exp`, `nbf`,
    /// `iat` and `typ`; returns what the token grants.
    pub fn verify_access(&self, token: &str) -> Result<VerifiedAccess> {
        if let Some(verified) = self.verified.get(token) {
            if Utc::now().timestamp() > verified.expires_at + LEEWAY_SECONDS {
                self.verified.remove(token);
                return Err(Error::unauthenticated("invalid or expired access token"));
            }
            return Ok(verified);
        }
        let verified = self.verify_signed(token)?;
        self.verified.insert(token.to_owned(), verified);
        Ok(verified)
    }

    /// True for an access token keel signed (known `kid`, good signature,
    /// `iss`, `aud`, `typ`) whose time is up: a caller that must refresh,
    /// not a guess. The rate limit on failed authentications leaves these
    /// out, so a client whose token lapsed never counts against its address.
    pub fn is_expired_access_token(&self, token: &str) -> bool {
        let Ok(header) = jsonwebtoken::decode_header(token) else {
            return false;
        };
        let Some(key) = header.kid.as_deref().and_then(|kid| self.keys.verifying.get(kid)) else {
            return false;
        };
        if header.alg != Algorithm::EdDSA {
            return false;
        }
        let mut validation = Validation::new(Algorithm::EdDSA);
        validation.set_issuer(&[&self.issuer]);
        validation.set_audience(&[&self.audience]);
        validation.set_required_spec_claims(&["exp", "iss", "aud", "sub"]);
        validation.validate_exp = false;
        jsonwebtoken::decode::<AccessClaims>(token, key, &validation).is_ok_and(|decoded| {
            decoded.claims.typ == ACCESS_TYPE && decoded.claims.exp + LEEWAY_SECONDS < Utc::now().timestamp()
        })
    }

    fn verify_signed(&self, token: &str) -> Result<VerifiedAccess> {
        let refuse = |why: &str| {
            tracing::debug!(reason = why, "access token refused");
            Error::unauthenticated("invalid or expired access token")
        };
        let header = jsonwebtoken::decode_header(token).map_err(|_| refuse("malformed header"))?;
        if header.alg != Algorithm::EdDSA {
            return Err(refuse("algorithm is not EdDSA"));
        }
        let key = header
            .kid
            .as_deref()
            .and_then(|kid| self.keys.verifying.get(kid))
            .ok_or_else(|| refuse("unknown kid"))?;
        let mut validation = Validation::new(Algorithm::EdDSA);
        validation.set_issuer(&[&self.issuer]);
        validation.set_audience(&[&self.audience]);
        validation.set_required_spec_claims(&["exp", "iss", "aud", "sub"]);
        validation.validate_nbf = true;
        validation.leeway = LEEWAY_SECONDS as u64;
        let claims = jsonwebtoken::decode::<AccessClaims>(token, key, &validation)
            .map_err(|error| {
                tracing::debug!(error = %error, "access token refused");
                Error::unauthenticated("invalid or expired access token")
            })?
            .claims;
        if claims.typ != ACCESS_TYPE {
            return Err(refuse("not an access token"));
        }
        // Issued in the future, or after it expires: not a token keel made.
        if claims.iat > Utc::now().timestamp() + LEEWAY_SECONDS || claims.iat > claims.exp {
            return Err(refuse("iat is in the future"));
        }
        let user_id = Uuid::parse_str(&claims.sub).map_err(|_| refuse("bad sub"))?;
        let session_id = Uuid::parse_str(&claims.sid).map_err(|_| refuse("bad sid"))?;
        Ok(VerifiedAccess {
            user_id,
            session_id,
            expires_at: claims.exp,
        })
    }
}

/// A new refresh token: 256 random bits, base64url. Only its hash is stored.
pub fn new_refresh_token() -> Secret<String> {
    let mut bytes = [0u8; 32];
    rand::rngs::OsRng.fill_bytes(&mut bytes);
    Secret::new(URL_SAFE_NO_PAD.encode(bytes))
}

/// SHA-256 (hex) of a refresh token: enough for 256-bit random input, and
/// cheap enough to look up on every refresh.
pub fn hash_refresh_token(token: &str) -> String {
    let digest = Sha256::digest(token.as_bytes());
    digest.iter().map(|byte| format!("{byte:02x}")).collect()
}

impl KeySet {
    /// The key that derives refresh-token successors, from the active key
    /// (see [`SuccessorKey`]).
    pub fn successor_key(&self) -> &SuccessorKey {
        &self.successor
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn service() -> TokenService {
        let keys = KeySet::parse(&KeySet::generate_file()).expect("keys");
        TokenService::new(keys, "keel".into(), "keel".into(), Duration::from_secs(900))
    }

    #[test]
    fn a_token_verifies_with_its_own_keys_only() {
        let service = service();
        let (user, session) = (Uuid::now_v7(), Uuid::now_v7());
        let (token, _) = service
            .issue_access(user, session, Role::User, Utc::now())
            .expect("issue");
        let verified = service.verify_access(&token).expect("verifies");
        assert_eq!((verified.user_id, verified.session_id), (user, session));
        assert!(self::service().verify_access(&token).is_err());
    }

    #[test]
    fn a_remembered_token_still_expires() {
        let service = service();
        let (user, session) = (Uuid::now_v7(), Uuid::now_v7());
        let (token, _) = service
            .issue_access(user, session, Role::User, Utc::now())
            .expect("issue");
        assert!(service.verify_access(&token).is_ok());
        assert!(
            service.verified.get(token.as_str()).is_some(),
            "verified once, remembered"
        );
        // The same token, remembered as past its expiry (and the leeway).
        service.verified.insert(
            token.clone(),
            VerifiedAccess {
                user_id: user,
                session_id: session,
                expires_at: Utc::now().timestamp() - LEEWAY_SECONDS - 1,
            },
        );
        assert!(service.verify_access(&token).is_err());
        // An expired token is never remembered.
        let (old, _) = service
            .issue_access(user, session, Role::User, Utc::now() - chrono::Duration::hours(1))
            .expect("issue");
        assert!(service.verify_access(&old).is_err());
        assert!(service.verified.get(old.as_str()).is_none());
    }

    /// A token keel's own key signed, with these claims over valid ones.
    fn signed(service: &TokenService, overrides: serde_json::Value) -> String {
        let now = Utc::now().timestamp();
        let mut claims = serde_json::json!({
            "iss": "keel", "aud": "keel", "sub": Uuid::now_v7().to_string(), "sid": Uuid::now_v7().to_string(),
            "role": "user", "typ": "access", "iat": now, "exp": now + 900,
        });
        for (key, value) in overrides.as_object().expect("an object") {
            claims[key] = value.clone();
        }
        let mut header = Header::new(Algorithm::EdDSA);
        header.kid = Some(service.keys.active_kid.clone());
        jsonwebtoken::encode(&header, &claims, &service.keys.signing).expect("sign")
    }

    #[test]
    fn tokens_not_yet_valid_or_issued_in_the_future_are_refused() {
        let service = service();
        let now = Utc::now().timestamp();
        assert!(service.verify_access(&signed(&service, serde_json::json!({}))).is_ok());
        assert!(
            service
                .verify_access(&signed(&service, serde_json::json!({"nbf": now - 60})))
                .is_ok()
        );
        // Within the leeway is skew, beyond it a token from the future.
        assert!(
            service
                .verify_access(&signed(&service, serde_json::json!({"iat": now + 2})))
                .is_ok()
        );
        for refused in [
            serde_json::json!({"nbf": now + 120}),
            serde_json::json!({"iat": now + 120}),
            serde_json::json!({"iat": now + 2000}),
            serde_json::json!({"iat": "yesterday"}),
        ] {
            assert!(
                service.verify_access(&signed(&service, refused.clone())).is_err(),
                "{refused} was accepted"
            );
        }
    }

    #[test]
    fn rotation_keeps_old_tokens_valid() {
        let old = KeySet::generate_file();
        let old_value: serde_json::Value = serde_json::from_str(&old).expect("json");
        let old_kid = old_value["active"].as_str().expect("kid").to_owned();
        let old_private = old_value["keys"][0]["private_key"].as_str().expect("key").to_owned();
        let old_service = TokenService::new(
            KeySet::parse(&old).expect("keys"),
            "keel".into(),
            "keel".into(),
            Duration::from_secs(900),
        );
        let (token, _) = old_service
            .issue_access(Uuid::now_v7(), Uuid::now_v7(), Role::User, Utc::now())
            .expect("issue");

        let new: serde_json::Value = serde_json::from_str(&KeySet::generate_file()).expect("json");
        let rotated = serde_json::json!({
            "active": new["active"],
            "keys": [new["keys"][0], { "kid": old_kid, "private_key": old_private }],
        });
        let rotated = TokenService::new(
            KeySet::parse(&rotated.to_string()).expect("keys"),
            "keel".into(),
            "keel".into(),
            Duration::from_secs(900),
        );
        assert_eq!(rotated.keys().public_keys().len(), 2);
        assert!(rotated.verify_access(&token).is_ok());
    }

    /// Keels started together on a fresh data directory all come up, with
    /// one key among them: none fails on the file another created, none
    /// reads it half-written.
    #[test]
    fn keels_racing_to_create_the_key_file_share_one_key() {
        for _ in 0..20 {
            let dir = tempfile::tempdir().expect("dir");
            let path = dir.path().join("auth-keys.json");
            let start = std::sync::Barrier::new(8);
            let kids: Vec<String> = std::thread::scope(|scope| {
                let racers: Vec<_> = (0..8)
                    .map(|_| {
                        scope.spawn(|| {
                            start.wait();
                            KeySet::load_or_generate(&path).expect("load or generate").active_kid
                        })
                    })
                    .collect();
                racers.into_iter().map(|racer| racer.join().expect("racer")).collect()
            });
            assert!(kids.iter().all(|kid| *kid == kids[0]), "{kids:?}");
            assert_eq!(KeySet::load(&path).expect("the file").active_kid, kids[0]);
            let left: Vec<_> = std::fs::read_dir(dir.path()).expect("dir").collect();
            assert_eq!(left.len(), 1, "temporary files left behind: {left:?}");
        }
    }

    #[test]
    fn key_files_without_a_signing_key_are_refused() {
        let error = KeySet::parse(r#"{"active":"a","keys":[{"kid":"a","public_key":"AAAA"}]}"#).expect_err("invalid");
        assert!(error.contains("32 bytes"), "{error}");
    }
}
