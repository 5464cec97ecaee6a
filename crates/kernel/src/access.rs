//! When a caller's access ends, so that long-lived calls end with it.
//!
//! A unary call is authenticated once and over in milliseconds; a stream
//! (an event subscription, later a job watch or a chat reply) can outlive
//! the token and the session it was opened with. Every stream selects on
//! [`RequestContext::access_ended`](crate::RequestContext::access_ended) and
//! ends with [`AccessEnded::into_error`] when it fires: at the access
//! token's expiry, or as soon as the [`AccessWatch`] hears that the session
//! no longer grants what it granted (logout, revocation, a password change
//! that ended it, a role change, the user deleted).

use std::future::Future;
use std::pin::Pin;

use crate::context::Principal;
use crate::error::Error;

/// Why a caller's access ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AccessEnded {
    /// The access token expired: reconnect with a fresh one.
    Expired,
    /// The session was revoked or ended, or the user's role or existence
    /// changed: sign in again.
    Revoked,
}

impl AccessEnded {
    /// The `google.rpc.ErrorInfo` reason clients can branch on.
    pub const fn reason(self) -> &'static str {
        match self {
            AccessEnded::Expired => "ACCESS_TOKEN_EXPIRED",
            AccessEnded::Revoked => "SESSION_ENDED",
        }
    }

    /// The UNAUTHENTICATED error a stream ends with; `resume` is the
    /// metadata that says where to pick up (e.g. `resume_after_sequence`).
    pub fn into_error(self, resume: &[(&str, String)]) -> Error {
        let message = match self {
            AccessEnded::Expired => "access token expired; reconnect with a fresh token to resume",
            AccessEnded::Revoked => "the session ended (signed out, revoked, role changed or account deleted)",
        };
        Error::unauthenticated(message).with_info(self.reason(), resume)
    }
}

/// A future that resolves when access ends.
pub type AccessEnd = Pin<Box<dyn Future<Output = AccessEnded> + Send + 'static>>;

/// Access that never ends: in-process callers, and tests of the stream
/// itself.
pub fn never() -> AccessEnd {
    Box::pin(std::future::pending())
}

/// Hears of changes to sessions (in every process: the composition root
/// feeds it from the event bus) and tells the streams of an affected
/// principal. Implemented by identity, which knows what ends a session.
pub trait AccessWatch: Send + Sync + 'static {
    /// Resolves once `principal`'s session stops granting what it granted
    /// when the principal was authenticated. Changes made after this call
    /// are heard; the future also checks once, when first polled, for a
    /// change made between authentication and this call.
    fn revoked(&self, principal: &Principal) -> AccessEnd;
}
