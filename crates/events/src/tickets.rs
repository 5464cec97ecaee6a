//! Stream tickets: how a browser's `new EventSource(url)`, which cannot send
//! an Authorization header, authenticates the event stream.
//!
//! A signed-in caller asks for a ticket (`CreateStreamTicket`) and opens
//! `GET /v1/events/stream?ticket=...`. The ticket is 256 random bits, stored
//! only as its SHA-256, bound to the caller's session, and accepted on the
//! stream method alone ([`STREAM_METHOD`]): it is never a bearer token.
//!
//! The browser reconnects on its own with the same URL (and
//! `Last-Event-ID`), so a ticket is not single-use; what keeps a leaked one
//! from being a bearer token forever:
//! - it must first be used within [`Settings::first_use`] of its creation;
//! - it works for reconnects only until `valid_until`
//!   ([`Settings::lifetime`] after creation), and the stream it opened ends
//!   then (the principal's access expires with it);
//! - one live stream per ticket: a second, concurrent redemption is refused
//!   until the first stream has ended ([`StreamLease`]);
//! - each redemption checks that the session is still active, and the
//!   stream ends like every stream when the session ends.
//!
//! Every refusal is the same UNAUTHENTICATED answer, so a probe learns
//! nothing about which tickets exist.
//!
//! The hold of a stream is a lease (`held_until`): the holding stream
//! renews it every third of [`hold`], and it lapses when the holder's
//! process dies without releasing it. A reconnect after the lapse takes the
//! ticket over, so a crash costs the browser at most [`hold`] (30 s, or half
//! a short ticket's lifetime) instead of its ticket. A holder that finds
//! its lease taken over stops renewing; its release then leaves the new
//! hold alone (both are fenced on the version of their claim). Tickets past
//! their lifetime are deleted by the events retention.

use std::time::Duration;

use async_trait::async_trait;
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use chrono::{DateTime, Utc};
use keel_kernel::secret::Secret;
use keel_kernel::{Command, CommandContext, CommandHandler, Error, Result, clock, id::new_id};
use rand::RngCore;
use sea_orm::DatabaseConnection;
use sha2::{Digest, Sha256};
use uuid::Uuid;

use crate::Events;
use crate::model::StreamTicket;
use crate::store;

/// The one gRPC method a ticket authenticates: the event stream
/// (`GET /v1/events/stream`).
pub const STREAM_METHOD: &str = "/keel.events.v1.EventQueryService/Subscribe";

/// The metadata the edge carries `?ticket=` in to [`STREAM_METHOD`].
pub const TICKET_METADATA: &str = "x-keel-stream-ticket";

/// The query parameter of the stream route.
pub const TICKET_QUERY_PARAMETER: &str = "ticket";

/// How long tickets last.
#[derive(Debug, Clone, Copy)]
pub struct Settings {
    /// From creation to the first stream.
    pub first_use: Duration,
    /// From creation to the last accepted reconnect (and the stream's end).
    pub lifetime: Duration,
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            first_use: Duration::from_secs(60),
            // An access token's lifetime: what a leaked ticket is worth at most.
            lifetime: Duration::from_secs(15 * 60),
        }
    }
}

/// Creates a ticket for the calling user's session.
pub struct CreateStreamTicket;

/// A new ticket: the only time its text exists outside the caller.
#[derive(Debug)]
pub struct IssuedTicket {
    pub ticket: Secret<String>,
    pub first_use_by: DateTime<Utc>,
    pub valid_until: DateTime<Utc>,
}

// A ticket is a credential: bus middleware (idempotency) never stores it.
impl keel_kernel::Reply for IssuedTicket {
    fn to_bytes(&self) -> Option<Result<Vec<u8>>> {
        None
    }

    fn from_bytes(_bytes: &[u8]) -> Result<Self> {
        Err(Error::internal("a stream ticket is never stored"))
    }
}

impl Command for CreateStreamTicket {
    const NAME: &'static str = "events.create_stream_ticket";
    type Output = IssuedTicket;
}

#[async_trait]
impl CommandHandler<CreateStreamTicket> for Events {
    async fn handle(&self, ctx: &CommandContext<'_>, _command: CreateStreamTicket) -> Result<IssuedTicket> {
        let principal = ctx.request.principal()?;
        let settings = self.settings.stream_tickets;
        let now = clock::now();
        let after = |duration: Duration| {
            chrono::Duration::from_std(duration)
                .map(|duration| now + duration)
                .map_err(|_| Error::internal("stream ticket lifetime out of range"))
        };
        let valid_until = after(settings.lifetime)?;
        let first_use_by = after(settings.first_use)?.min(valid_until);
        let mut bytes = [0u8; 32];
        rand::rngs::OsRng.fill_bytes(&mut bytes);
        let ticket = Secret::new(URL_SAFE_NO_PAD.encode(bytes));
        let row = StreamTicket {
            id: new_id(),
            user_id: principal.user_id,
            session_id: principal.session_id,
            first_use_by,
            valid_until,
            first_used_at: None,
            live: false,
            held_until: None,
            version: 0,
            created_at: now,
        };
        store::insert_stream_ticket(ctx.tx().await?, &row, &hash(ticket.expose())).await?;
        Ok(IssuedTicket {
            ticket,
            first_use_by,
            valid_until,
        })
    }
}

/// SHA-256 (hex): enough for 256 random bits, cheap to look up.
fn hash(ticket: &str) -> String {
    Sha256::digest(ticket.as_bytes())
        .iter()
        .map(|byte| format!("{byte:02x}"))
        .collect()
}

/// A redeemed ticket: whose session it stands for, until when, and the
/// stream's hold on it.
#[derive(Debug)]
pub struct Redeemed {
    pub user_id: Uuid,
    pub session_id: Uuid,
    pub valid_until: DateTime<Utc>,
    pub lease: StreamLease,
}

/// The longest a stream's hold on a ticket lasts without renewal: 30 s, or
/// half the ticket's lifetime when that is shorter (at least 1 s).
pub fn hold(ticket: &StreamTicket) -> Duration {
    let lifetime = (ticket.valid_until - ticket.created_at).to_std().unwrap_or_default();
    (lifetime / 2).clamp(Duration::from_secs(1), Duration::from_secs(30))
}

/// The one live stream of a ticket. While it lives it renews the hold's
/// lease; dropping it (the stream's response ended, or the client went
/// away) lets a reconnect redeem the ticket again at once.
#[derive(Debug)]
pub struct StreamLease {
    db: DatabaseConnection,
    ticket_id: Uuid,
    /// The version the claim wrote: renewals and the release are fenced on it.
    version: i32,
    renewal: tokio::task::JoinHandle<()>,
}

impl StreamLease {
    fn start(db: DatabaseConnection, ticket_id: Uuid, version: i32, hold: Duration) -> StreamLease {
        let renewal = tokio::spawn({
            let db = db.clone();
            async move {
                let every = hold / 3;
                let hold = chrono::Duration::from_std(hold).unwrap_or(chrono::Duration::MAX);
                loop {
                    tokio::time::sleep(every).await;
                    match store::renew_stream_ticket(&db, ticket_id, version, clock::now() + hold).await {
                        Ok(true) => {}
                        Ok(false) => {
                            tracing::warn!(%ticket_id, "a stream ticket's hold lapsed and was taken over");
                            return;
                        }
                        // Retried at the next turn; the lease is three turns long.
                        Err(error) => {
                            tracing::warn!(%ticket_id, error = %error, "could not renew a stream ticket's hold")
                        }
                    }
                }
            }
        });
        StreamLease {
            db,
            ticket_id,
            version,
            renewal,
        }
    }
}

impl Drop for StreamLease {
    fn drop(&mut self) {
        self.renewal.abort();
        let (db, ticket_id, version) = (self.db.clone(), self.ticket_id, self.version);
        // Drop cannot await; without a runtime (shutdown) the ticket stays
        // held until its lease lapses.
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            runtime.spawn(async move {
                if let Err(error) = store::release_stream_ticket(&db, ticket_id, version, clock::now()).await {
                    tracing::warn!(%ticket_id, error = %error, "could not release a stream ticket");
                }
            });
        }
    }
}

/// Redeems `ticket` for one stream. Whether its session is still active is
/// the caller's to check (identity knows sessions); dropping the lease
/// undoes the redemption.
pub async fn redeem(db: &DatabaseConnection, ticket: &str) -> Result<Redeemed> {
    let refused = || Error::unauthenticated("invalid, expired or already used stream ticket");
    // Tickets are 43 URL-safe characters: anything else is not looked up.
    if ticket.len() != 43
        || !ticket
            .bytes()
            .all(|byte| byte.is_ascii_alphanumeric() || byte == b'-' || byte == b'_')
    {
        return Err(refused());
    }
    let now = clock::now();
    let stored = store::find_stream_ticket(db, &hash(ticket))
        .await?
        .ok_or_else(refused)?;
    let usable_until = match stored.first_used_at {
        None => stored.first_use_by,
        Some(_) => stored.valid_until,
    };
    // Held by a stream whose lease has not lapsed.
    let held = stored.live && stored.held_until.is_some_and(|held_until| held_until > now);
    if now >= usable_until || now >= stored.valid_until || held {
        return Err(refused());
    }
    let hold = hold(&stored);
    let held_until = now + chrono::Duration::from_std(hold).unwrap_or(chrono::Duration::MAX);
    if !store::claim_stream_ticket(db, &stored, now, held_until).await? {
        return Err(refused());
    }
    if stored.live {
        tracing::info!(ticket_id = %stored.id, "a stream ticket whose hold lapsed was taken over");
    }
    Ok(Redeemed {
        user_id: stored.user_id,
        session_id: stored.session_id,
        valid_until: stored.valid_until,
        lease: StreamLease::start(db.clone(), stored.id, stored.version + 1, hold),
    })
}
