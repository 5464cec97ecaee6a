//! A wrapper that keeps secrets out of logs and `Debug` output, and wipes
//! them from memory when dropped.

use serde::{Deserialize, Deserializer, Serialize, Serializer};
use zeroize::Zeroize;

/// A secret value (password, token, key, URL with credentials).
///
/// - `Debug` prints `[redacted]`, so a secret in a struct, an error or a
///   `tracing` field never reaches a log. There is deliberately no
///   `Display`: `format!("{secret}")` does not compile, so a secret cannot
///   end up as the text `[redacted]` where its value was meant.
/// - [`Secret::expose`] is the one way to read it: greppable, so every use
///   is deliberate.
/// - The value is zeroized on drop (the `zeroize` crate), clones included.
///   Copies made before it was wrapped, or by code it was exposed to, are
///   not.
/// - `Deserialize` is transparent (configuration reads secrets); `Serialize`
///   writes `"[redacted]"`, so that a configuration dump or a stored reply
///   never holds the value. Replies that must hand credentials to a client
///   are never stored by middleware at all (identity's `LoginOutcome`).
#[derive(Clone, Default, PartialEq, Eq)]
pub struct Secret<T: Zeroize>(T);

impl<T: Zeroize> Secret<T> {
    pub fn new(value: T) -> Self {
        Self(value)
    }

    /// The one way to read the value: greppable, so every use is deliberate.
    pub fn expose(&self) -> &T {
        &self.0
    }
}

impl<T: Zeroize> Drop for Secret<T> {
    fn drop(&mut self) {
        self.0.zeroize();
    }
}

impl<T: Zeroize> std::fmt::Debug for Secret<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("[redacted]")
    }
}

impl<'de, T: Zeroize + Deserialize<'de>> Deserialize<'de> for Secret<T> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        T::deserialize(deserializer).map(Secret)
    }
}

impl<T: Zeroize> Serialize for Secret<T> {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str("[redacted]")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_never_shows_the_value() {
        let secret = Secret::new("hunter2".to_owned());
        assert_eq!(format!("{secret:?}"), "[redacted]");
        assert_eq!(format!("{:?}", Some(&secret)), "Some([redacted])");
        assert_eq!(secret.expose(), "hunter2");
    }

    #[test]
    fn serialising_redacts_and_deserialising_reads_the_value() {
        let secret = Secret::new("hunter2".to_owned());
        assert_eq!(serde_json::to_string(&secret).unwrap(), "\"[redacted]\"");
        let back: Secret<String> = serde_json::from_str("\"hunter2\"").unwrap();
        assert_eq!(back, secret);
    }

    #[test]
    fn the_value_is_wiped_on_drop() {
        use std::sync::Arc;
        use std::sync::atomic::{AtomicBool, Ordering};

        /// Records that it was zeroized.
        #[derive(Default)]
        struct Probe(Arc<AtomicBool>);
        impl Zeroize for Probe {
            fn zeroize(&mut self) {
                self.0.store(true, Ordering::SeqCst);
            }
        }

        let wiped = Arc::new(AtomicBool::new(false));
        let secret = Secret::new(Probe(wiped.clone()));
        assert!(!wiped.load(Ordering::SeqCst));
        drop(secret);
        assert!(wiped.load(Ordering::SeqCst));
    }
}
