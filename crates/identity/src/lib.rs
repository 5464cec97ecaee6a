//! The identity module: users, sessions, tokens.
//!
//! # Layout
//! - `model.rs`: the domain types — `User`, `Session`, and the newtypes that
//!   parse at the boundary (`Email`, `DisplayName`, `NewPassword`);
//! - `commands.rs` / `queries.rs`: the writes and reads with their handlers;
//! - `events.rs`: the events identity emits, and its email handlers (welcome,
//!   someone registering with a taken address);
//! - `store.rs` (private): the SeaORM entities and the module's only SQL,
//!   mapping rows to the domain types;
//! - `pruning.rs`: deletes expired refresh tokens and old sessions on a schedule;
//! - `access.rs`: [`access::SessionWatch`], which ends streams whose session ended;
//! - `access_cache.rs`: active sessions and API keys remembered per process,
//!   exact through the cluster's announcements;
//! - API keys (`CreateApiKey`, `ListApiKeys`, `RevokeApiKey`): admins create
//!   them for internal services; each is its own service-account principal
//!   (its id), authenticated by [`Identity::authenticate_bearer`] when the
//!   bearer starts with `keel_`;
//! - `admin.rs`: account creation for the CLI and the bootstrap admin;
//! - `tokens.rs`: signing keys, JWKS, access JWTs, refresh tokens;
//! - `successor.rs`: the keyed derivation of a refresh token's successor;
//! - `password.rs`: Argon2id hashing on the blocking pool, a bounded number at once;
//! - `grpc.rs`: the tonic adapters of `IdentityCommandService` and
//!   `IdentityQueryService`;
//! - `module.rs`: [`IdentityModule`], what the composition root wires.
//!
//! [`register`] wires the handlers into the bus; [`Identity::authenticate`]
//! turns a bearer token into a principal for the server's auth layer.

pub mod access;
pub mod access_cache;
pub mod admin;
pub mod commands;
pub mod events;
pub mod grpc;
pub mod model;
mod module;
pub mod password;
pub mod pruning;
pub mod queries;
mod store;
pub mod successor;
pub mod tokens;

use std::sync::Arc;
use std::time::Duration;

use keel_kernel::limit::{Quota, RateLimiter};
use keel_kernel::{BusBuilder, Error, Principal, Result, clock};
use sea_orm::{ConnectionTrait, DatabaseConnection};

use crate::model::{ApiKey, PresentedApiKey, User};
pub use crate::module::IdentityModule;
use crate::password::PasswordHasher;
use crate::tokens::TokenService;

/// The knobs of identity, with the defaults the issue asks for.
#[derive(Debug, Clone)]
pub struct IdentitySettings {
    pub refresh_ttl: chrono::Duration,
    /// How long after a rotation the old refresh token still answers (two
    /// tabs refreshing at once, a retry) instead of revoking the session:
    /// with the successor the rotation gave, never a new one.
    pub refresh_grace: chrono::Duration,
    /// Sign-in attempts one client address may make for one account
    /// (login and change-password); more are refused (RESOURCE_EXHAUSTED).
    pub login_per_account_address: Quota,
    /// Sign-in attempts one client address may make, whatever the account;
    /// more are refused.
    pub login_per_address: Quota,
    /// Sign-in attempts for one account, from every address together, that
    /// are verified at once. More are never refused: each waits for its turn
    /// under this quota, at most `login_account_max_delay`, then is verified.
    /// A refusal here would let strangers lock the owner out of their
    /// account; a delay only slows guessing, which the per-address limits
    /// above bound.
    pub login_account_pace: Quota,
    /// The longest an attempt waits under `login_account_pace`.
    pub login_account_max_delay: Duration,
    pub register_per_address: Quota,
    /// How long an expired or revoked session is kept before it is pruned.
    pub session_retention: chrono::Duration,
    /// How often pruning runs.
    pub prune_every: Duration,
    /// At most this many password hashes (or verifications) at once; more
    /// callers wait. The number of cores by default.
    pub password_hash_concurrency: usize,
}

impl Default for IdentitySettings {
    fn default() -> Self {
        Self {
            refresh_ttl: chrono::Duration::days(30),
            refresh_grace: chrono::Duration::seconds(10),
            login_per_account_address: Quota::new(10, Duration::from_secs(60)),
            login_per_address: Quota::new(30, Duration::from_secs(2)),
            login_account_pace: Quota::new(20, Duration::from_millis(500)),
            login_account_max_delay: Duration::from_secs(2),
            register_per_address: Quota::new(10, Duration::from_secs(30)),
            session_retention: chrono::Duration::days(30),
            prune_every: Duration::from_secs(3600),
            password_hash_concurrency: crate::password::default_concurrency(),
        }
    }
}

/// The identity module's handlers and authenticator; cheap to clone.
#[derive(Clone)]
pub struct Identity {
    inner: Arc<Inner>,
}

struct Inner {
    tokens: TokenService,
    cache: Arc<access_cache::AccessCache>,
    hasher: PasswordHasher,
    limiter: Arc<dyn RateLimiter>,
    settings: IdentitySettings,
}

impl Identity {
    pub fn new(tokens: TokenService, limiter: Arc<dyn RateLimiter>, settings: IdentitySettings) -> Self {
        Self {
            inner: Arc::new(Inner {
                tokens,
                cache: Arc::new(access_cache::AccessCache::default()),
                hasher: PasswordHasher::with_concurrency(settings.password_hash_concurrency),
                limiter,
                settings,
            }),
        }
    }

    pub fn tokens(&self) -> &TokenService {
        &self.inner.tokens
    }

    /// Turns on the per-process access cache, exact through `announcer`
    /// (see [`access_cache`]); the composition root calls it once the
    /// events module, which owns the cluster link, is running.
    pub fn attach_announcer(&self, announcer: Arc<dyn keel_kernel::cluster::Announcer>) {
        self.inner.cache.attach(announcer);
    }

    pub(crate) fn cache(&self) -> &access_cache::AccessCache {
        &self.inner.cache
    }

    /// Once `ctx` commits, and before it answers, every process forgets what
    /// it remembered of `user_id`'s sessions (see [`access_cache`]).
    pub(crate) fn forget_everywhere(&self, ctx: &keel_kernel::CommandContext<'_>, user_id: uuid::Uuid) {
        let cache = self.inner.cache.clone();
        ctx.after_commit(async move { cache.announce(user_id).await });
    }

    pub(crate) fn hasher(&self) -> &PasswordHasher {
        &self.inner.hasher
    }

    pub(crate) fn limiter(&self) -> &dyn RateLimiter {
        self.inner.limiter.as_ref()
    }

    pub(crate) fn settings(&self) -> &IdentitySettings {
        &self.inner.settings
    }

    /// Verifies an access token and that its session is still active. The
    /// role comes from the database (or the access cache, which every
    /// revocation, deletion and demotion clears in every process before it
    /// answers), so they take effect at once rather than at the token's expiry.
    pub async fn authenticate(&self, db: &impl ConnectionTrait, access_token: &str) -> Result<Principal> {
        self.authenticate_with_user(db, access_token)
            .await
            .map(|(principal, _)| principal)
    }

    /// [`Identity::authenticate`], and the user it read on the way (one
    /// statement for both): the server keeps it in the request context, so
    /// that `GetCurrentUser` needs no second read.
    pub async fn authenticate_with_user(
        &self,
        db: &impl ConnectionTrait,
        access_token: &str,
    ) -> Result<(Principal, User)> {
        let verified = self.tokens().verify_access(access_token)?;
        self.authenticate_session(db, verified.user_id, verified.session_id, verified.expires_at())
            .await
            .map_err(|error| match error.code() {
                keel_kernel::Code::Unauthenticated => Error::unauthenticated("invalid or expired access token"),
                _ => error,
            })
    }

    /// The principal of a bearer token: an API key when it starts with
    /// `keel_`, else an access token. The caller is what authentication read
    /// on the way, for the request context.
    pub async fn authenticate_bearer(&self, db: &impl ConnectionTrait, bearer: &str) -> Result<(Principal, Caller)> {
        if bearer.starts_with(model::API_KEY_PREFIX) {
            let (principal, key) = self.authenticate_api_key(db, bearer).await?;
            return Ok((principal, Caller::ApiKey(key)));
        }
        let (principal, user) = self.authenticate_with_user(db, bearer).await?;
        Ok((principal, Caller::User(user)))
    }

    /// The service-account principal of an API key (`keel_<id>_<secret>`):
    /// the key's id is its user and session id, its role the key's; access
    /// ends at the key's expiry. Unknown, revoked and expired keys and a
    /// wrong secret are one answer, UNAUTHENTICATED. The key's
    /// `last_used_at` is written at most once a minute.
    pub async fn authenticate_api_key(&self, db: &impl ConnectionTrait, raw: &str) -> Result<(Principal, ApiKey)> {
        use subtle::ConstantTimeEq;
        let refused = || Error::unauthenticated("invalid, expired or revoked API key");
        let presented = PresentedApiKey::parse(raw).ok_or_else(refused)?;
        let now = clock::now();
        let (key, secret_hash) = match self.cache().get_key(presented.id) {
            Some(remembered) => remembered,
            None => {
                let ticket = self.cache().ticket();
                let (key, secret_hash) = store::find_api_key_with_hash(db, presented.id)
                    .await?
                    .ok_or_else(refused)?;
                if key.is_active(now)
                    && let Some(ticket) = ticket
                {
                    self.cache().fill_key(ticket, &key, &secret_hash);
                }
                (key, secret_hash)
            }
        };
        let presented_hash = tokens::hash_refresh_token(presented.secret.expose());
        let matches: bool = presented_hash.as_bytes().ct_eq(secret_hash.as_bytes()).into();
        if !matches || !key.is_active(now) {
            return Err(refused());
        }
        if self.cache().should_touch(&key, now) {
            let every = chrono::Duration::from_std(access_cache::LAST_USED_EVERY).unwrap_or(chrono::Duration::MAX);
            // A failed write loses a "last used" time, never a call.
            if let Err(error) = store::touch_api_key(db, key.id, now, now - every).await {
                tracing::warn!(api_key_id = %key.id, error = %error, "recording an api key's last use");
            }
        }
        let principal = Principal {
            user_id: key.id,
            session_id: key.id,
            role: key.role,
            access_expires_at: key.expires_at,
        };
        Ok((principal, key))
    }

    /// The principal of `session_id` when it is `user_id`'s and still
    /// active, for a credential other than an access token that stands for
    /// the session (a stream ticket); its access ends at `access_expires_at`.
    pub async fn authenticate_session(
        &self,
        db: &impl ConnectionTrait,
        user_id: uuid::Uuid,
        session_id: uuid::Uuid,
        access_expires_at: Option<chrono::DateTime<chrono::Utc>>,
    ) -> Result<(Principal, User)> {
        let refused = || Error::unauthenticated("the session is not active");
        let now = clock::now();
        let (session, user) = match self.cache().get(session_id, now) {
            Some(remembered) => remembered,
            None => {
                let ticket = self.cache().ticket();
                let (session, user) = store::find_session_with_user(db, session_id)
                    .await?
                    .ok_or_else(refused)?;
                if session.is_active(now)
                    && let Some(ticket) = ticket
                {
                    self.cache().fill(ticket, &session, &user);
                }
                (session, user)
            }
        };
        if session.user_id != user_id || !session.is_active(now) {
            return Err(refused());
        }
        let principal = Principal {
            user_id,
            session_id,
            role: user.role,
            access_expires_at,
        };
        Ok((principal, user))
    }

    /// Starts pruning expired refresh tokens and old sessions, every
    /// `prune_every`; abort the handle to stop it.
    pub fn spawn_pruning(&self, db: DatabaseConnection) -> tokio::task::JoinHandle<()> {
        let settings = self.settings();
        pruning::spawn_pruning(db, settings.session_retention, settings.prune_every)
    }
}

/// What authentication read about the caller: a user (access token) or an
/// API key.
#[derive(Debug, Clone)]
pub enum Caller {
    User(User),
    ApiKey(ApiKey),
}

impl Caller {
    /// Keeps it in the request context (`ctx.caller::<User>()` or
    /// `ctx.caller::<ApiKey>()`).
    pub fn keep_in(self, ctx: &mut keel_kernel::RequestContext) {
        match self {
            Caller::User(user) => ctx.set_caller(user),
            Caller::ApiKey(key) => ctx.set_caller(key),
        }
    }
}

/// Registers every command and query handler of identity.
pub fn register(bus: &mut BusBuilder, identity: &Identity) {
    bus.command::<commands::Register>(identity.clone())
        .command::<commands::Login>(identity.clone())
        .command::<commands::RefreshSession>(identity.clone())
        .command::<commands::Logout>(identity.clone())
        .command::<commands::ChangePassword>(identity.clone())
        .command::<commands::CreateUser>(identity.clone())
        .command::<commands::UpdateUser>(identity.clone())
        .command::<commands::DeleteUser>(identity.clone())
        .command::<commands::RevokeSession>(identity.clone())
        .command::<commands::CreateApiKey>(identity.clone())
        .command::<commands::RevokeApiKey>(identity.clone())
        .query::<queries::GetCurrentUser>(identity.clone())
        .query::<queries::GetUser>(identity.clone())
        .query::<queries::ListUsers>(identity.clone())
        .query::<queries::ListSessions>(identity.clone())
        .query::<queries::ListApiKeys>(identity.clone())
        .query::<queries::GetJwks>(identity.clone());
    // What changes a user's row forgets `GetUser`'s cached answers of that
    // user (each event's aggregate is the user id).
    for event in [
        <events::UserUpdated as keel_kernel::DomainEvent>::NAME,
        <events::RoleChanged as keel_kernel::DomainEvent>::NAME,
        <events::UserDeleted as keel_kernel::DomainEvent>::NAME,
        <events::PasswordChanged as keel_kernel::DomainEvent>::NAME,
    ] {
        bus.invalidate_on(event, queries::USER_TAG);
    }
}
