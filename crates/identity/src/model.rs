//! Domain types of identity. Each parses at the boundary, so handlers only
//! ever see valid values; `store.rs` maps rows to them, so no SeaORM model
//! leaves it.
//!
//! What commands and queries return ([`User`], [`Session`]) derives serde, so
//! bus middleware can store and replay it. A password hash is in none of
//! them: it travels apart, as a [`HashedPassword`] inside [`Credentials`],
//! read only by login and change-password.

use chrono::{DateTime, Utc};
use keel_kernel::{Error, Result, Role, Secret};
use serde::{Deserialize, Serialize};
use unicode_normalization::UnicodeNormalization;
use uuid::Uuid;

const COMMON_PASSWORDS: &str = include_str!("common-passwords.txt");

/// An email address, NFKC-normalised, plus its case-insensitive key.
///
/// NFKC first, so what looks the same is the same account: a fullwidth
/// `ａda@example.com` is `ada@example.com`. An internationalised domain is
/// mapped by UTS-46 (IDNA) to its ASCII `xn--` form, which is what is
/// stored and shown: `bücher.de` is `xn--bcher-kva.de`, and a lookalike
/// domain cannot pass for the ASCII one it imitates. Lookalikes inside one
/// label or local part are refused: neither may mix Latin, Greek and
/// Cyrillic letters (a Cyrillic `а` in `аda` or `exаmple`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct Email {
    display: String,
    key: String,
}

impl Email {
    pub fn parse(field: &str, raw: &str) -> Result<Email> {
        let normalised: String = raw.nfkc().collect();
        let value = normalised.trim();
        let invalid = |why: &str| Err(Error::invalid_field(field, why));
        if value.is_empty() {
            return invalid("is required");
        }
        if value.len() > 254 {
            return invalid("must be at most 254 characters");
        }
        let Some((local, domain)) = value.rsplit_once('@') else {
            return invalid("is not an email address");
        };
        let well_formed = !local.is_empty()
            && local.len() <= 64
            && domain.contains('.')
            && !domain.starts_with('.')
            && !domain.ends_with('.')
            && !domain.contains("..")
            && value.chars().all(|c| !c.is_whitespace() && !c.is_control())
            && !local.contains('@');
        if !well_formed {
            return invalid("is not an email address");
        }
        if mixes_scripts(local) || domain.split('.').any(mixes_scripts) {
            return invalid("is not an email address: it mixes Latin, Greek and Cyrillic letters");
        }
        let display = if domain.is_ascii() {
            value.to_owned()
        } else {
            match idna::domain_to_ascii(domain) {
                Ok(ascii) if ascii.contains('.') && ascii.len() <= 253 => format!("{local}@{ascii}"),
                _ => return invalid("is not an email address: the domain is not a valid internationalised name"),
            }
        };
        if display.len() > 254 {
            return invalid("must be at most 254 characters");
        }
        Ok(Email {
            key: display.to_lowercase(),
            display,
        })
    }

    pub fn as_str(&self) -> &str {
        &self.display
    }

    /// Lower-cased: what uniqueness and search compare.
    pub fn key(&self) -> &str {
        &self.key
    }

    /// An email as stored: parsed when it was written, so it is not parsed
    /// again on every read (a rule tightened later must not lock existing
    /// accounts out).
    pub(crate) fn from_stored(display: String, key: String) -> Email {
        Email { display, key }
    }
}

/// Whether `text` holds letters of more than one of the scripts whose
/// letters pass for each other (Latin `a`, Cyrillic `а`, Greek `α`).
fn mixes_scripts(text: &str) -> bool {
    let script = |c: char| match c {
        'a'..='z' | 'A'..='Z' => Some(0),
        '\u{00C0}'..='\u{024F}' if c != '\u{00D7}' && c != '\u{00F7}' => Some(0),
        '\u{1E00}'..='\u{1EFF}' | '\u{2C60}'..='\u{2C7F}' | '\u{A720}'..='\u{A7FF}' | '\u{AB30}'..='\u{AB6F}' => {
            Some(0)
        }
        '\u{0370}'..='\u{03FF}' | '\u{1F00}'..='\u{1FFF}' => Some(1),
        '\u{0400}'..='\u{052F}' | '\u{1C80}'..='\u{1C8F}' | '\u{2DE0}'..='\u{2DFF}' | '\u{A640}'..='\u{A69F}' => {
            Some(2)
        }
        _ => None,
    };
    let mut seen = None;
    for found in text.chars().filter_map(script) {
        match seen {
            None => seen = Some(found),
            Some(first) if first != found => return true,
            Some(_) => {}
        }
    }
    false
}

impl TryFrom<String> for Email {
    type Error = Error;

    fn try_from(value: String) -> Result<Email> {
        Email::parse("email", &value)
    }
}

impl From<Email> for String {
    fn from(email: Email) -> String {
        email.display
    }
}

/// A display name: 1 to 100 characters, no control characters.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct DisplayName(String);

impl DisplayName {
    pub fn parse(field: &str, raw: &str) -> Result<DisplayName> {
        let value = raw.trim();
        if value.is_empty() {
            return Err(Error::invalid_field(field, "is required"));
        }
        if value.chars().count() > 100 {
            return Err(Error::invalid_field(field, "must be at most 100 characters"));
        }
        if value.chars().any(char::is_control) {
            return Err(Error::invalid_field(field, "must not contain control characters"));
        }
        Ok(DisplayName(value.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    pub fn key(&self) -> String {
        self.0.to_lowercase()
    }

    /// A display name as stored (see [`Email::from_stored`]).
    pub(crate) fn from_stored(value: String) -> DisplayName {
        DisplayName(value)
    }
}

impl TryFrom<String> for DisplayName {
    type Error = Error;

    fn try_from(value: String) -> Result<DisplayName> {
        DisplayName::parse("display_name", &value)
    }
}

impl From<DisplayName> for String {
    fn from(name: DisplayName) -> String {
        name.0
    }
}

/// A new password that meets the policy: 8 to 128 characters (length, not
/// composition rules) and not one of the most common passwords.
#[derive(Debug, Clone)]
pub struct NewPassword(Secret<String>);

impl NewPassword {
    pub fn parse(field: &str, raw: &str) -> Result<NewPassword> {
        let length = raw.chars().count();
        if length < 8 {
            return Err(Error::invalid_field(field, "must be at least 8 characters"));
        }
        if length > 128 {
            return Err(Error::invalid_field(field, "must be at most 128 characters"));
        }
        let lowered = raw.to_lowercase();
        if COMMON_PASSWORDS.lines().any(|common| common == lowered) {
            return Err(Error::invalid_field(
                field,
                "is one of the most common passwords; choose another",
            ));
        }
        Ok(NewPassword(Secret::new(raw.to_owned())))
    }

    pub fn secret(&self) -> &Secret<String> {
        &self.0
    }
}

/// An Argon2id hash as stored (PHC string). It never leaves the module in
/// an output, has no serde, and prints as `[redacted]`.
#[derive(Clone, PartialEq, Eq)]
pub struct HashedPassword(String);

impl HashedPassword {
    pub(crate) fn new(phc: String) -> Self {
        Self(phc)
    }

    pub(crate) fn as_str(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for HashedPassword {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("[redacted]")
    }
}

/// An account as the rest of Keel sees it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct User {
    pub id: Uuid,
    pub email: Email,
    pub display_name: DisplayName,
    pub role: Role,
    /// Bumped by every write; a write based on an older version is ABORTED.
    pub version: i32,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}

/// A user with the hash of their password: what login and change-password
/// read, and nothing else.
#[derive(Debug, Clone)]
pub(crate) struct Credentials {
    pub user: User,
    pub password_hash: HashedPassword,
}

/// A signed-in device: alive until it expires or is revoked.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Session {
    pub id: Uuid,
    pub user_id: Uuid,
    pub created_at: DateTime<Utc>,
    pub last_refreshed_at: DateTime<Utc>,
    pub expires_at: DateTime<Utc>,
    pub revoked_at: Option<DateTime<Utc>>,
    pub user_agent: String,
    pub ip_address: String,
}

impl Session {
    pub fn is_active(&self, now: DateTime<Utc>) -> bool {
        self.revoked_at.is_none() && self.expires_at > now
    }
}

/// A refresh token as stored: its SHA-256, never the token itself.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct RefreshToken {
    pub id: Uuid,
    pub user_id: Uuid,
    pub session_id: Uuid,
    pub token_hash: String,
    pub created_at: DateTime<Utc>,
    pub expires_at: DateTime<Utc>,
    /// Set when the token is exchanged; a second exchange after the grace
    /// window is reuse.
    pub used_at: Option<DateTime<Utc>>,
}

/// An API key's name (the service it is for): 1 to 100 characters, no
/// control characters.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct ApiKeyName(String);

impl ApiKeyName {
    pub fn parse(field: &str, raw: &str) -> Result<ApiKeyName> {
        DisplayName::parse(field, raw).map(|name| ApiKeyName(name.0))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    pub(crate) fn from_stored(value: String) -> ApiKeyName {
        ApiKeyName(value)
    }
}

impl TryFrom<String> for ApiKeyName {
    type Error = Error;

    fn try_from(value: String) -> Result<ApiKeyName> {
        ApiKeyName::parse("name", &value)
    }
}

impl From<ApiKeyName> for String {
    fn from(name: ApiKeyName) -> String {
        name.0
    }
}

/// An internal service's credential, as stored and listed: never its
/// secret. The key is its own service-account principal: `id` is the
/// principal's user and session id.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ApiKey {
    pub id: Uuid,
    pub name: ApiKeyName,
    pub role: Role,
    /// The admin who created it (the row's owner).
    pub created_by: Uuid,
    pub created_at: DateTime<Utc>,
    pub expires_at: Option<DateTime<Utc>>,
    pub last_used_at: Option<DateTime<Utc>>,
    pub revoked_at: Option<DateTime<Utc>>,
}

impl ApiKey {
    pub fn is_active(&self, now: DateTime<Utc>) -> bool {
        self.revoked_at.is_none() && self.expires_at.is_none_or(|expires_at| expires_at > now)
    }

    /// `keel_<id>_`: how the key begins.
    pub fn prefix(&self) -> String {
        format!("{API_KEY_PREFIX}{}_", self.id.simple())
    }
}

/// What every API key begins with: a bearer that does is an API key, not a JWT.
pub const API_KEY_PREFIX: &str = "keel_";

/// A presented API key, split: `keel_<id as 32 hex digits>_<secret>`. The
/// secret is base64url (which may itself contain `_`), so the id is read by
/// its fixed length.
pub struct PresentedApiKey {
    pub id: Uuid,
    pub secret: Secret<String>,
}

impl PresentedApiKey {
    /// `None` when `raw` is not shaped like a key.
    pub fn parse(raw: &str) -> Option<PresentedApiKey> {
        let rest = raw.strip_prefix(API_KEY_PREFIX)?;
        let id = rest.get(..32)?;
        let secret = rest.get(32..)?.strip_prefix('_')?;
        if secret.is_empty() || !id.bytes().all(|byte| byte.is_ascii_hexdigit()) {
            return None;
        }
        Some(PresentedApiKey {
            id: Uuid::try_parse(id).ok()?,
            secret: Secret::new(secret.to_owned()),
        })
    }
}

/// A new key: 256 random bits, base64url, after its id.
pub(crate) fn new_api_key(id: Uuid) -> (Secret<String>, Secret<String>) {
    let secret = crate::tokens::new_refresh_token();
    let key = Secret::new(format!("{API_KEY_PREFIX}{}_{}", id.simple(), secret.expose()));
    (key, secret)
}

#[cfg(test)]
mod tests {

    /// The contracts list the common passwords too (`not_in`, for clients and
    /// the OpenAPI document): the same list as the one refused here.
    #[test]
    fn the_contracts_refuse_the_same_common_passwords() {
        let pool = prost_reflect::DescriptorPool::decode(keel_proto::FILE_DESCRIPTOR_SET).unwrap();
        let ours: Vec<String> = COMMON_PASSWORDS.lines().map(str::to_owned).collect();
        for (message, field) in [
            ("RegisterRequest", "password"),
            ("CreateUserRequest", "password"),
            ("ChangePasswordRequest", "new_password"),
        ] {
            let message = pool
                .get_message_by_name(&format!("keel.identity.v1.{message}"))
                .unwrap();
            let field = message.get_field_by_name(field).unwrap();
            let rules = keel_proto::validate::field_rules(&field).unwrap();
            let string = keel_proto::validate::kind_rules(&rules, "string").unwrap();
            assert_eq!(
                keel_proto::validate::string_list(&string, "not_in"),
                ours,
                "{}",
                field.full_name()
            );
        }
    }

    use super::*;

    #[test]
    fn emails_parse_and_fold_case() {
        let email = Email::parse("email", "  Ada@Example.COM ").expect("valid");
        assert_eq!(email.as_str(), "Ada@Example.COM");
        assert_eq!(email.key(), "ada@example.com");
        for bad in [
            "",
            "ada",
            "ada@",
            "@example.com",
            "ada@example",
            "a da@example.com",
            "ada@.com",
        ] {
            assert!(Email::parse("email", bad).is_err(), "{bad:?} should be refused");
        }
    }

    #[test]
    fn lookalike_emails_share_a_key_or_are_refused() {
        // Fullwidth letters and at sign: NFKC makes them the ASCII they look like.
        let fullwidth = Email::parse("email", "\u{FF41}da\u{FF20}example.com").expect("valid");
        assert_eq!(fullwidth.key(), "ada@example.com");
        assert_eq!(fullwidth.as_str(), "ada@example.com");
        assert_eq!(
            Email::parse("email", "\u{FF21}DA@EXAMPLE.COM").expect("valid").key(),
            Email::parse("email", "ada@example.com").expect("valid").key()
        );
        // A ligature is its letters.
        assert_eq!(
            Email::parse("email", "o\u{FB03}ce@example.com").expect("valid").key(),
            "office@example.com"
        );

        // A Cyrillic `а` in the domain, or in a Latin local part: refused.
        for lookalike in [
            "ada@ex\u{0430}mple.com",
            "\u{0430}da@example.com",
            "ad\u{03B1}@example.com",
            "ada@\u{0435}xample.com",
        ] {
            let error = Email::parse("email", lookalike).expect_err(lookalike);
            assert!(error.to_string().contains("is not an email address"), "{error}");
        }
        // One script alone is a real address; IDNs in their ASCII form are fine.
        assert!(Email::parse("email", "\u{0430}\u{0434}\u{0430}@example.com").is_ok());
        assert!(Email::parse("email", "zo\u{00EB}@example.com").is_ok());
        assert!(Email::parse("email", "ada@xn--80ak6aa92e.com").is_ok());
        // An internationalised domain is stored and shown in its xn-- form
        // (UTS-46), so the same name written either way is one account, and a
        // whole-script lookalike of an ASCII domain reads as what it is.
        let idn = Email::parse("email", "ada@B\u{00FC}cher.de").expect("an IDN");
        assert_eq!(idn.as_str(), "ada@xn--bcher-kva.de");
        assert_eq!(
            idn.key(),
            Email::parse("email", "ada@xn--bcher-kva.de").expect("valid").key()
        );
        let cyrillic = Email::parse("email", "ada@\u{0430}\u{0440}\u{0440}\u{04CF}\u{0435}.com").expect("one script");
        assert!(cyrillic.as_str().starts_with("ada@xn--"), "{}", cyrillic.as_str());
        assert_ne!(cyrillic.key(), "ada@apple.com");
        assert!(Email::parse("email", "ada@b\u{00FC}cher.\u{0000}de").is_err());
    }

    #[test]
    fn stored_emails_are_not_parsed_again() {
        // Written before normalisation: read back as stored, never refused.
        let stored = Email::from_stored("ada@ex\u{0430}mple.com".into(), "ada@ex\u{0430}mple.com".into());
        assert_eq!(stored.key(), "ada@ex\u{0430}mple.com");
    }

    #[test]
    fn password_policy_is_length_and_common_list() {
        assert!(NewPassword::parse("password", "short").is_err());
        assert!(NewPassword::parse("password", &"x".repeat(129)).is_err());
        assert!(NewPassword::parse("password", "Password1").is_err());
        assert!(NewPassword::parse("password", "12345678").is_err());
        assert!(NewPassword::parse("password", "correct horse battery staple").is_ok());
        assert!(NewPassword::parse("password", "ünïcödé!").is_ok());
    }

    #[test]
    fn users_round_trip_through_serde_without_a_password() {
        let user = User {
            id: Uuid::now_v7(),
            email: Email::parse("email", "Ada@Example.com").expect("valid"),
            display_name: DisplayName::parse("display_name", "Ada").expect("valid"),
            role: Role::Moderator,
            version: 3,
            created_at: Utc::now(),
            updated_at: Utc::now(),
        };
        let json = serde_json::to_value(&user).expect("serialize");
        assert_eq!(json["email"], "Ada@Example.com");
        assert_eq!(json["role"], "moderator");
        let back: User = serde_json::from_value(json.clone()).expect("deserialize");
        assert_eq!(back, user);
        assert_eq!(back.email.key(), "ada@example.com");
        let mut forged = json;
        forged["role"] = "root".into();
        assert!(serde_json::from_value::<User>(forged).is_err());
    }

    #[test]
    fn api_keys_parse_by_their_fixed_length_id() {
        let id = Uuid::now_v7();
        let (key, secret) = new_api_key(id);
        let parsed = PresentedApiKey::parse(key.expose()).expect("a key");
        assert_eq!(parsed.id, id);
        assert_eq!(parsed.secret.expose(), secret.expose());
        assert_eq!(key.expose().len(), 5 + 32 + 1 + 43);
        let underscored = format!("keel_{}_a_b", id.simple());
        assert_eq!(
            PresentedApiKey::parse(&underscored).map(|k| k.secret.expose().clone()),
            Some("a_b".into())
        );
        for bad in [
            "keel_",
            "keel_abc_def",
            &format!("keel_{}_", id.simple()),
            &format!("keel_{}x", id.simple()),
            "eyJhbGciOi",
        ] {
            assert!(PresentedApiKey::parse(bad).is_none(), "{bad:?}");
        }
    }

    #[test]
    fn display_names_are_bounded() {
        assert!(DisplayName::parse("display_name", " ").is_err());
        assert!(DisplayName::parse("display_name", &"é".repeat(101)).is_err());
        assert_eq!(
            DisplayName::parse("display_name", " Ada ").map(|n| n.key()).ok(),
            Some("ada".to_owned())
        );
    }
}
