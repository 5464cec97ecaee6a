//! [`SessionWatch`]: tells long-lived streams that their caller's session
//! ended, in every keel process.
//!
//! The events that can end or change a session's access (a revoked session,
//! a password change that ended the others, a role change, a deleted user)
//! reach every process through the event bus; the composition root hands
//! each to [`SessionWatch::observe`]. A stream of an affected user then asks
//! the database again, so the decision is always the store's, never the
//! event's.

use keel_kernel::access::AccessEnd;
use keel_kernel::{AccessEnded, AccessWatch, DomainEvent, Envelope, Principal, Result, clock};
use sea_orm::DatabaseConnection;
use tokio::sync::broadcast;
use uuid::Uuid;

use crate::events::{ApiKeyRevoked, PasswordChanged, RoleChanged, SessionRevoked, UserDeleted};
use crate::store;

/// The events after which a user's sessions are checked again.
const ACCESS_EVENTS: [&str; 5] = [
    SessionRevoked::NAME,
    ApiKeyRevoked::NAME,
    PasswordChanged::NAME,
    RoleChanged::NAME,
    UserDeleted::NAME,
];

/// Stands for "every user": sent when the feed lost events, so that every
/// stream checks its session.
const EVERYONE: Uuid = Uuid::nil();

/// Identity's [`AccessWatch`]; cheap to clone.
#[derive(Clone)]
pub struct SessionWatch {
    db: DatabaseConnection,
    /// The users whose access may have changed.
    changed: broadcast::Sender<Uuid>,
}

impl SessionWatch {
    pub fn new(db: DatabaseConnection) -> Self {
        let (changed, _) = broadcast::channel(1024);
        Self { db, changed }
    }

    /// Called with every committed event, in every process.
    pub fn observe(&self, event: &Envelope) {
        if let Some(user_id) = event.user_id
            && ACCESS_EVENTS.contains(&event.name.as_str())
        {
            // No receiver means no stream is open: nothing to tell.
            let _ = self.changed.send(user_id);
        }
    }

    /// Called when events may have been missed (the feed lagged): every
    /// open stream checks its session.
    pub fn observe_unknown(&self) {
        let _ = self.changed.send(EVERYONE);
    }
}

/// Whether `principal` is still what authentication found: the session
/// (or the API key, whose id is its principal's session id) active, the
/// same user, the same role.
async fn still_valid(db: &DatabaseConnection, principal: &Principal) -> Result<bool> {
    let now = clock::now();
    Ok(match store::find_session_with_user(db, principal.session_id).await? {
        Some((session, user)) => {
            session.user_id == principal.user_id && session.is_active(now) && user.role == principal.role
        }
        None => match store::find_api_key(db, principal.session_id).await? {
            Some(key) => key.id == principal.user_id && key.is_active(now) && key.role == principal.role,
            None => false,
        },
    })
}

impl AccessWatch for SessionWatch {
    fn revoked(&self, principal: &Principal) -> AccessEnd {
        // Subscribed now, so no change after this call is missed; the first
        // check below covers the moments since authentication.
        let mut changed = self.changed.subscribe();
        let db = self.db.clone();
        let principal = principal.clone();
        Box::pin(async move {
            loop {
                match still_valid(&db, &principal).await {
                    Ok(true) => {}
                    Ok(false) => {
                        tracing::info!(user_id = %principal.user_id, session_id = %principal.session_id, "stream ended: session no longer valid");
                        return AccessEnded::Revoked;
                    }
                    // The store is unreachable: keep the stream, ask again at the next change.
                    Err(error) => tracing::warn!(error = %error, "checking a stream's session"),
                }
                loop {
                    match changed.recv().await {
                        Ok(user_id) if user_id == principal.user_id || user_id == EVERYONE => break,
                        Ok(_) => {}
                        Err(broadcast::error::RecvError::Lagged(_)) => break,
                        Err(broadcast::error::RecvError::Closed) => std::future::pending::<()>().await,
                    }
                }
            }
        })
    }
}
