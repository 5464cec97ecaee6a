//! Who is calling, under which request id, until when.

use std::any::Any;
use std::net::IpAddr;
use std::sync::Arc;

use chrono::{DateTime, Utc};
use tokio::time::Instant;
use uuid::Uuid;

use crate::access::{AccessEnd, AccessEnded, AccessWatch};
use crate::error::{Error, Result};
use crate::idempotency::ReplayNotice;

/// The roles of Keel, from least to most powerful.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    User,
    Moderator,
    Admin,
}

impl Role {
    pub const fn as_str(self) -> &'static str {
        match self {
            Role::User => "user",
            Role::Moderator => "moderator",
            Role::Admin => "admin",
        }
    }

    pub fn parse(value: &str) -> Option<Role> {
        match value {
            "user" => Some(Role::User),
            "moderator" => Some(Role::Moderator),
            "admin" => Some(Role::Admin),
            _ => None,
        }
    }
}

impl std::fmt::Display for Role {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// An authenticated caller: a user acting through one session.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Principal {
    pub user_id: Uuid,
    pub session_id: Uuid,
    /// Read from the database at authentication, not from the token, so a
    /// demotion takes effect at once.
    pub role: Role,
    /// When the access token it came with expires: streams end then (see
    /// [`RequestContext::access_ended`]). `None` for a principal that no
    /// token carried (tests, in-process callers).
    pub access_expires_at: Option<DateTime<Utc>>,
}

impl Principal {
    pub fn is_admin(&self) -> bool {
        self.role == Role::Admin
    }
}

/// Everything a handler may know about the call besides its arguments.
#[derive(Debug, Clone)]
pub struct RequestContext {
    pub request_id: String,
    pub principal: Option<Principal>,
    pub deadline: Option<Instant>,
    pub client_ip: Option<IpAddr>,
    pub user_agent: Option<String>,
    /// The request's `idempotency-key`, carried into the events it causes
    /// and, for a command, the key of its idempotency record.
    pub idempotency_key: Option<String>,
    /// SHA-256 of the request message (set with a key, by the gRPC adapter):
    /// what tells a retry from another request under the same key.
    request_fingerprint: Option<String>,
    /// Where the bus says it answered from an idempotency record.
    replay_notice: Option<ReplayNotice>,
    /// Set only by in-process callers (the CLI, start-up bootstrap), never
    /// from a network request: such a caller may do what an admin may.
    trusted: bool,
    /// What authentication read about the caller (identity's `User`), so a
    /// handler that needs exactly that reads it here instead of from the
    /// database a second time. It is as fresh as the authentication, which
    /// ran at the start of this same request.
    caller: Option<CallerSnapshot>,
    /// Tells streams when the principal's session ends (set by the server's
    /// auth layer with the principal).
    access_watch: Option<AccessWatchHandle>,
}

#[derive(Clone)]
struct AccessWatchHandle(Arc<dyn AccessWatch>);

impl std::fmt::Debug for AccessWatchHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("AccessWatch")
    }
}

#[derive(Clone)]
struct CallerSnapshot(Arc<dyn Any + Send + Sync>);

impl std::fmt::Debug for CallerSnapshot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("CallerSnapshot")
    }
}

impl RequestContext {
    pub fn new(request_id: impl Into<String>) -> Self {
        Self {
            request_id: request_id.into(),
            principal: None,
            deadline: None,
            client_ip: None,
            user_agent: None,
            idempotency_key: None,
            request_fingerprint: None,
            replay_notice: None,
            trusted: false,
            caller: None,
            access_watch: None,
        }
    }

    /// A context for work that no client started (CLI, bootstrap, tasks).
    pub fn system() -> Self {
        Self {
            trusted: true,
            ..Self::new(format!("system-{}", crate::id::new_id()))
        }
    }

    pub fn is_trusted(&self) -> bool {
        self.trusted
    }

    pub fn with_principal(mut self, principal: Principal) -> Self {
        self.principal = Some(principal);
        self
    }

    /// The fingerprint of the request message (see [`crate::idempotency::fingerprint`]).
    pub fn set_request_fingerprint(&mut self, fingerprint: String) {
        self.request_fingerprint = Some(fingerprint);
    }

    pub fn request_fingerprint(&self) -> Option<&str> {
        self.request_fingerprint.as_deref()
    }

    /// A notice, shared with every clone of this context, that says whether
    /// the bus answered from an idempotency record (the transport then adds
    /// `idempotent-replayed: true`).
    pub fn watch_replay(&mut self) -> ReplayNotice {
        self.replay_notice.get_or_insert_with(ReplayNotice::default).clone()
    }

    pub(crate) fn mark_replayed(&self) {
        if let Some(notice) = &self.replay_notice {
            notice.mark();
        }
    }

    /// Keeps what authentication read about the caller (see [`Self::caller`]).
    pub fn set_caller<T: Any + Send + Sync>(&mut self, snapshot: T) {
        self.caller = Some(CallerSnapshot(Arc::new(snapshot)));
    }

    /// What authentication read about the caller, when it was a `T`.
    pub fn caller<T: Any>(&self) -> Option<&T> {
        self.caller.as_ref().and_then(|snapshot| snapshot.0.downcast_ref::<T>())
    }

    /// Where streams of this call hear that the principal's session ended.
    pub fn set_access_watch(&mut self, watch: Arc<dyn AccessWatch>) {
        self.access_watch = Some(AccessWatchHandle(watch));
    }

    /// Resolves when the caller's access ends: at its access token's expiry,
    /// or when the access watch hears that its session ended. Never for a
    /// call without a principal. A long-lived call selects on it and ends
    /// with [`AccessEnded::into_error`].
    pub fn access_ended(&self) -> AccessEnd {
        let Some(principal) = &self.principal else {
            return crate::access::never();
        };
        let revoked = self.access_watch.as_ref().map(|watch| watch.0.revoked(principal));
        let expires_at = principal.access_expires_at;
        Box::pin(async move {
            let expiry = async {
                match expires_at {
                    Some(at) => {
                        let left = (at - Utc::now()).to_std().unwrap_or_default();
                        tokio::time::sleep(left).await;
                        AccessEnded::Expired
                    }
                    None => std::future::pending().await,
                }
            };
            let revoked = async {
                match revoked {
                    Some(revoked) => revoked.await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                ended = expiry => ended,
                ended = revoked => ended,
            }
        })
    }

    /// The caller, or UNAUTHENTICATED.
    pub fn principal(&self) -> Result<&Principal> {
        self.principal
            .as_ref()
            .ok_or_else(|| Error::unauthenticated("authentication required"))
    }

    /// Ok for an authenticated or trusted caller, else UNAUTHENTICATED.
    pub fn require_caller(&self) -> Result<()> {
        if self.trusted {
            Ok(())
        } else {
            self.principal().map(|_| ())
        }
    }

    /// Ok for an admin or a trusted in-process caller, else
    /// UNAUTHENTICATED (nobody) or PERMISSION_DENIED (not an admin).
    pub fn require_admin(&self) -> Result<()> {
        if self.trusted || self.principal()?.is_admin() {
            Ok(())
        } else {
            Err(Error::permission_denied("this call needs the admin role"))
        }
    }

    /// True when the caller may act on `user_id`'s resources: themself, an
    /// admin, or a trusted in-process caller.
    pub fn may_act_for(&self, user_id: uuid::Uuid) -> bool {
        self.trusted
            || self
                .principal
                .as_ref()
                .is_some_and(|principal| principal.is_admin() || principal.user_id == user_id)
    }
}
