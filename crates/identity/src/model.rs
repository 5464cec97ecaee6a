//! Domain types of identity. Each parses at the boundary, so handlers only
//! ever see valid values.

use keel_kernel::{Error, Result, Secret};

const COMMON_PASSWORDS: &str = include_str!("common-passwords.txt");

/// An email address as the user typed it, plus its case-insensitive key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Email {
    display: String,
    key: String,
}

impl Email {
    pub fn parse(field: &str, raw: &str) -> Result<Email> {
        let value = raw.trim();
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
        Ok(Email {
            display: value.to_owned(),
            key: value.to_lowercase(),
        })
    }

    pub fn as_str(&self) -> &str {
        &self.display
    }

    /// Lower-cased: what uniqueness and search compare.
    pub fn key(&self) -> &str {
        &self.key
    }
}

/// A display name: 1 to 100 characters, no control characters.
#[derive(Debug, Clone, PartialEq, Eq)]
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

#[cfg(test)]
mod tests {
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
    fn password_policy_is_length_and_common_list() {
        assert!(NewPassword::parse("password", "short").is_err());
        assert!(NewPassword::parse("password", &"x".repeat(129)).is_err());
        assert!(NewPassword::parse("password", "Password1").is_err());
        assert!(NewPassword::parse("password", "12345678").is_err());
        assert!(NewPassword::parse("password", "correct horse battery staple").is_ok());
        assert!(NewPassword::parse("password", "ünïcödé!").is_ok());
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
