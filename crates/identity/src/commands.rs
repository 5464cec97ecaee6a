//! The writes of identity: command structs and their handlers.
//!
//! Slow work that needs no database (hashing, verifying a password) runs
//! before the handler opens its transaction, so it holds no lock.

use std::net::IpAddr;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use keel_kernel::limit::Quota;
use keel_kernel::{Code, Command, CommandContext, CommandHandler, Error, Result, Role, Secret, Violations, clock, id};
use uuid::Uuid;

use crate::Identity;
use crate::events::{
    ApiKeyCreated, ApiKeyRevoked, LoginFailed, PasswordChanged, RegistrationDuplicate, RoleChanged, SessionRevoked,
    UserDeleted, UserLoggedIn, UserRegistered, UserUpdated,
};
use crate::model::{
    ApiKey, ApiKeyName, Credentials, DisplayName, Email, HashedPassword, NewPassword, RefreshToken, Session, User,
};
use crate::store;
use crate::tokens::{hash_refresh_token, new_refresh_token};
use keel_proto::identity as pb;

/// Tokens handed to a client at login or refresh. Replies that carry them
/// are never stored by bus middleware (see [`LoginOutcome`]'s `Reply`): a
/// refresh token exists in the database only as a hash.
#[derive(Debug, Clone)]
pub struct IssuedTokens {
    pub access_token: Secret<String>,
    pub access_token_expires_at: DateTime<Utc>,
    pub refresh_token: Secret<String>,
    pub refresh_token_expires_at: DateTime<Utc>,
    pub session_id: Uuid,
}

pub struct Register {
    pub email: Email,
    pub password: NewPassword,
    pub display_name: DisplayName,
}

impl Register {
    /// Parses the three fields, naming every one that is invalid.
    pub fn parse(email: &str, password: &str, display_name: &str) -> Result<Register> {
        let mut violations = Violations::new();
        let email = violations.take(Email::parse("email", email));
        let password = violations.take(NewPassword::parse("password", password));
        let display_name = violations.take(DisplayName::parse("display_name", display_name));
        match (email, password, display_name) {
            (Some(email), Some(password), Some(display_name)) => Ok(Register {
                email,
                password,
                display_name,
            }),
            _ => Err(violations.into_error()),
        }
    }
}

impl Command for Register {
    const NAME: &'static str = "identity.register";
    type Output = User;
}

pub struct Login {
    pub email: Email,
    pub password: Secret<String>,
}

/// A failed login is an outcome, not an error, so that its audit event commits.
#[derive(Debug, Clone)]
pub enum LoginOutcome {
    SignedIn { user: Box<User>, tokens: IssuedTokens },
    Refused,
}

impl Command for Login {
    const NAME: &'static str = "identity.login";
    type Output = LoginOutcome;
}

pub struct RefreshSession {
    pub refresh_token: Secret<String>,
}

/// A refresh either rotates the token or, on reuse, revokes the session.
/// Reuse is an outcome, not an error, so that the revocation commits.
#[derive(Debug, Clone)]
pub enum RefreshOutcome {
    Rotated(IssuedTokens),
    ReuseDetected,
}

/// Replies with fresh credentials are never stored, cached or replayed by
/// bus middleware: a retry signs in (or refreshes) again instead.
macro_rules! never_stored {
    ($($reply:ty),*) => {$(
        impl keel_kernel::Reply for $reply {
            fn to_bytes(&self) -> Option<Result<Vec<u8>>> {
                None
            }

            fn from_bytes(_bytes: &[u8]) -> Result<Self> {
                Err(Error::internal(concat!(stringify!($reply), " carries credentials and is never stored")))
            }
        }
    )*};
}

never_stored!(LoginOutcome, RefreshOutcome);

/// A new API key's secret is shown only in its reply: never stored, and a
/// keyed retry is refused (ALREADY_EXISTS) rather than making a second key.
impl keel_kernel::Reply for CreatedApiKey {
    const SHOWN_ONCE: bool = true;

    fn to_bytes(&self) -> Option<Result<Vec<u8>>> {
        None
    }

    fn from_bytes(_bytes: &[u8]) -> Result<Self> {
        Err(Error::internal("CreatedApiKey carries a secret and is never stored"))
    }
}

impl Command for RefreshSession {
    const NAME: &'static str = "identity.refresh_session";
    type Output = RefreshOutcome;
}

pub struct Logout;

impl Command for Logout {
    const NAME: &'static str = "identity.logout";
    type Output = ();
}

pub struct ChangePassword {
    pub current_password: Secret<String>,
    pub new_password: NewPassword,
}

impl Command for ChangePassword {
    const NAME: &'static str = "identity.change_password";
    type Output = ();
}

pub struct CreateUser {
    pub email: Email,
    pub password: NewPassword,
    pub display_name: DisplayName,
    pub role: Role,
}

impl CreateUser {
    /// Parses the account fields like [`Register::parse`]; `role` was read
    /// by the caller (a proto enum, a CLI flag) and its violation, if any,
    /// is named after the others.
    pub fn parse(email: &str, password: &str, display_name: &str, role: Result<Role>) -> Result<CreateUser> {
        let mut violations = Violations::new();
        let account = violations.take(Register::parse(email, password, display_name));
        let role = violations.take(role);
        match (account, role) {
            (Some(account), Some(role)) => Ok(CreateUser {
                email: account.email,
                password: account.password,
                display_name: account.display_name,
                role,
            }),
            _ => Err(violations.into_error()),
        }
    }
}

impl Command for CreateUser {
    const NAME: &'static str = "identity.create_user";
    type Output = User;
}

/// The fields named by the update mask; `None` leaves a field alone.
pub struct UpdateUser {
    pub id: Uuid,
    pub email: Option<Email>,
    pub display_name: Option<DisplayName>,
    pub role: Option<Role>,
}

impl Command for UpdateUser {
    const NAME: &'static str = "identity.update_user";
    type Output = User;
}

pub struct DeleteUser {
    pub id: Uuid,
}

impl Command for DeleteUser {
    const NAME: &'static str = "identity.delete_user";
    type Output = ();
}

pub struct RevokeSession {
    pub id: Uuid,
}

impl Command for RevokeSession {
    const NAME: &'static str = "identity.revoke_session";
    type Output = ();
}

fn invalid_refresh_token() -> Error {
    Error::unauthenticated("invalid or expired refresh token")
}

impl Identity {
    async fn throttle(&self, scope: &str, key: impl std::fmt::Display, quota: Quota) -> Result<()> {
        self.limiter()
            .acquire(&format!("{scope}:{key}"), quota)
            .await
            .map_err(|retry_after| {
                Error::resource_exhausted(
                    format!("too many attempts; retry in {} s", retry_after.as_secs().max(1)),
                    retry_after,
                )
            })
    }

    async fn throttle_address(&self, scope: &str, address: Option<IpAddr>, quota: Quota) -> Result<()> {
        match address {
            Some(address) => self.throttle(scope, address, quota).await,
            None => Ok(()),
        }
    }

    /// The strict limits of a sign-in attempt for `account` (an email key
    /// or a user id): per client address, and per account and address
    /// together. Callers without an address (in-process ones) share one
    /// allowance per account.
    async fn throttle_sign_in(&self, account: &str, address: Option<IpAddr>) -> Result<()> {
        let settings = self.settings();
        self.throttle_address("login:address", address, settings.login_per_address)
            .await?;
        let address = address.map_or_else(|| "in-process".to_owned(), |address| address.to_string());
        self.throttle(
            "login:account_address",
            format!("{account}:{address}"),
            settings.login_per_account_address,
        )
        .await
    }

    /// Waits for `account`'s turn under the per-account pace, at most
    /// `login_account_max_delay`; never refuses. Runs before the password is
    /// verified and before any transaction, so a waiting attempt holds no
    /// hashing permit and no lock.
    async fn slow_down_account(&self, account: &str) {
        let settings = self.settings();
        let key = format!("login:account:{account}");
        let deadline = tokio::time::Instant::now() + settings.login_account_max_delay;
        loop {
            let Err(retry_after) = self.limiter().acquire(&key, settings.login_account_pace).await else {
                return;
            };
            let now = tokio::time::Instant::now();
            if now >= deadline {
                tracing::debug!("sign-in attempts for one account are many; verifying after the longest delay");
                return;
            }
            tokio::time::sleep(retry_after.min(deadline - now)).await;
        }
    }

    /// Writes `refresh_token` as one of `session_id`, in the command's
    /// transaction, and signs an access token.
    async fn issue_tokens(
        &self,
        ctx: &CommandContext<'_>,
        user: &User,
        session_id: Uuid,
        refresh_token: Secret<String>,
        now: DateTime<Utc>,
    ) -> Result<IssuedTokens> {
        let refresh_token_expires_at = now + self.settings().refresh_ttl;
        store::insert_refresh_token(
            ctx.tx().await?,
            &RefreshToken {
                id: id::new_id(),
                user_id: user.id,
                session_id,
                token_hash: hash_refresh_token(refresh_token.expose()),
                created_at: now,
                expires_at: refresh_token_expires_at,
                used_at: None,
            },
        )
        .await?;
        let (access_token, access_token_expires_at) =
            self.tokens().issue_access(user.id, session_id, user.role, now)?;
        Ok(IssuedTokens {
            access_token: Secret::new(access_token),
            access_token_expires_at,
            refresh_token,
            refresh_token_expires_at,
            session_id,
        })
    }
}

fn new_user(email: Email, display_name: DisplayName, role: Role) -> User {
    let now = clock::now();
    User {
        id: id::new_id(),
        email,
        display_name,
        role,
        version: 1,
        created_at: now,
        updated_at: now,
    }
}

/// Refuses to leave the system without an admin.
async fn keep_an_admin(ctx: &CommandContext<'_>, target: &User) -> Result<()> {
    if target.role == Role::Admin && store::count_admins(ctx.tx().await?).await? <= 1 {
        return Err(Error::new(
            Code::FailedPrecondition,
            "this is the last admin; make another admin first",
        ));
    }
    Ok(())
}

fn record_registered(ctx: &CommandContext<'_>, user: &User) {
    ctx.record(
        &UserRegistered(pb::UserRegistered {
            user_id: user.id.to_string(),
            email: user.email.as_str().to_owned(),
            display_name: user.display_name.as_str().to_owned(),
        }),
        Some(user.id),
        user.id.to_string(),
    );
}

fn record_session_revoked(ctx: &CommandContext<'_>, user_id: Uuid, session_id: Uuid, reason: &str) {
    ctx.record(
        &SessionRevoked(pb::SessionRevoked {
            user_id: user_id.to_string(),
            session_id: session_id.to_string(),
            reason: reason.to_owned(),
        }),
        Some(user_id),
        session_id.to_string(),
    );
}

/// Who did it, for audit events: the principal, or `system`.
fn actor(ctx: &CommandContext<'_>) -> String {
    ctx.request
        .principal
        .as_ref()
        .map_or_else(|| "system".to_owned(), |principal| principal.user_id.to_string())
}

fn not_found_user() -> Error {
    Error::not_found("user")
}

#[async_trait]
impl CommandHandler<Register> for Identity {
    async fn handle(&self, ctx: &CommandContext<'_>, command: Register) -> Result<User> {
        let settings = self.settings();
        self.throttle_address("register:address", ctx.request.client_ip, settings.register_per_address)
            .await?;
        // Hashed whether or not the email is taken: the same work, the same time.
        let hash = self.hasher().hash(command.password.secret()).await?;
        let user = new_user(command.email, command.display_name, Role::User);
        let tx = ctx.tx().await?;
        let owner = match store::find_user_by_email(tx, &user.email).await? {
            Some(owner) => Some(owner),
            None if store::insert_user_if_email_free(tx, &user, &hash).await? => None,
            // Taken between the check and the insert, by a concurrent registration.
            None => Some(
                store::find_user_by_email(tx, &user.email)
                    .await?
                    .ok_or_else(|| Error::internal("an email was taken by no user"))?,
            ),
        };
        let Some(owner) = owner else {
            record_registered(ctx, &user);
            tracing::info!(user_id = %user.id, "user registered");
            return Ok(user);
        };
        // The same answer as for a new account, with a user that was never
        // stored: Register does not tell who has an account. The owner is
        // told by email instead.
        ctx.record(
            &RegistrationDuplicate(pb::RegistrationDuplicate {
                user_id: owner.id.to_string(),
                email: owner.email.as_str().to_owned(),
                ip_address: ctx.request.client_ip.map(|ip| ip.to_string()).unwrap_or_default(),
            }),
            Some(owner.id),
            owner.id.to_string(),
        );
        tracing::info!(user_id = %owner.id, "registration with a taken email; the owner is told");
        Ok(user)
    }
}

/// Unlike [`Register`], a taken email is ALREADY_EXISTS: the caller is an
/// admin (or the CLI), trusted to know which accounts exist.
#[async_trait]
impl CommandHandler<CreateUser> for Identity {
    async fn handle(&self, ctx: &CommandContext<'_>, command: CreateUser) -> Result<User> {
        ctx.request.require_admin()?;
        let hash = self.hasher().hash(command.password.secret()).await?;
        let user = new_user(command.email, command.display_name, command.role);
        store::insert_user(ctx.tx().await?, &user, &hash).await?;
        record_registered(ctx, &user);
        tracing::info!(user_id = %user.id, role = %command.role, "user created");
        Ok(user)
    }
}

#[async_trait]
impl CommandHandler<Login> for Identity {
    async fn handle(&self, ctx: &CommandContext<'_>, command: Login) -> Result<LoginOutcome> {
        let settings = self.settings();
        self.throttle_sign_in(command.email.key(), ctx.request.client_ip)
            .await?;
        self.slow_down_account(command.email.key()).await;
        let credentials = store::find_credentials_by_email(ctx.db, &command.email).await?;
        let address = ctx.request.client_ip.map(|ip| ip.to_string()).unwrap_or_default();
        let Some(Credentials { user, password_hash }) = credentials else {
            // Same work, same answer as a wrong password: no enumeration.
            self.hasher().verify_dummy(&command.password).await?;
            ctx.record(
                &LoginFailed(pb::LoginFailed {
                    user_id: String::new(),
                    ip_address: address,
                    reason: "unknown_email".to_owned(),
                }),
                None,
                command.email.key(),
            );
            return Ok(LoginOutcome::Refused);
        };
        if !self.hasher().verify(&command.password, &password_hash).await? {
            ctx.record(
                &LoginFailed(pb::LoginFailed {
                    user_id: user.id.to_string(),
                    ip_address: address,
                    reason: "wrong_password".to_owned(),
                }),
                Some(user.id),
                user.id.to_string(),
            );
            return Ok(LoginOutcome::Refused);
        }
        let now = clock::now();
        let session = Session {
            id: id::new_id(),
            user_id: user.id,
            created_at: now,
            last_refreshed_at: now,
            expires_at: now + settings.refresh_ttl,
            revoked_at: None,
            user_agent: ctx.request.user_agent.clone().unwrap_or_default(),
            ip_address: address.clone(),
        };
        store::insert_session(ctx.tx().await?, &session).await?;
        let tokens = self
            .issue_tokens(ctx, &user, session.id, new_refresh_token(), now)
            .await?;
        ctx.record(
            &UserLoggedIn(pb::UserLoggedIn {
                user_id: user.id.to_string(),
                session_id: session.id.to_string(),
                ip_address: address,
            }),
            Some(user.id),
            user.id.to_string(),
        );
        tracing::info!(user_id = %user.id, session_id = %session.id, "logged in");
        Ok(LoginOutcome::SignedIn {
            user: Box::new(user),
            tokens,
        })
    }
}

/// How many rotations a redemption within the grace window follows (tab A
/// rotated twice while tab B still held the first token).
const SUCCESSOR_CHAIN: usize = 8;

impl Identity {
    /// The live refresh token that `presented` (already exchanged) leads to:
    /// its successor, or that one's, while each was exchanged within the
    /// grace window. `None` is a reuse: a step exchanged longer ago, a chain
    /// too long, or a successor that is not there.
    async fn live_successor(
        &self,
        ctx: &CommandContext<'_>,
        presented: RefreshToken,
        presented_secret: Secret<String>,
        now: DateTime<Utc>,
    ) -> Result<Option<(RefreshToken, Secret<String>)>> {
        let tx = ctx.tx().await?;
        let key = self.tokens().keys().successor_key();
        let (mut token, mut secret) = (presented, presented_secret);
        for _ in 0..=SUCCESSOR_CHAIN {
            let Some(used_at) = token.used_at else {
                return Ok(Some((token, secret)));
            };
            if now - used_at > self.settings().refresh_grace {
                return Ok(None);
            }
            secret = key.successor(secret.expose())?;
            match store::find_refresh_token(tx, &hash_refresh_token(secret.expose())).await? {
                Some(next) if next.session_id == token.session_id && next.expires_at > now => token = next,
                _ => return Ok(None),
            }
        }
        Ok(None)
    }
}

#[async_trait]
impl CommandHandler<RefreshSession> for Identity {
    async fn handle(&self, ctx: &CommandContext<'_>, command: RefreshSession) -> Result<RefreshOutcome> {
        let now = clock::now();
        let tx = ctx.tx().await?;
        let token_hash = hash_refresh_token(command.refresh_token.expose());
        // Locked: a second redemption of this token waits for the first to
        // commit, then sees it exchanged and finds the same successor.
        let token = store::lock_refresh_token(tx, &token_hash)
            .await?
            .ok_or_else(invalid_refresh_token)?;
        let session = store::find_session(tx, token.session_id)
            .await?
            .filter(|session| session.is_active(now))
            .ok_or_else(invalid_refresh_token)?;
        if token.expires_at <= now {
            return Err(invalid_refresh_token());
        }
        let user = store::find_user(tx, session.user_id)
            .await?
            .ok_or_else(invalid_refresh_token)?;

        if token.used_at.is_none() {
            if !store::claim_refresh_token(tx, token.id, now).await? {
                // Not while the row is locked; refused rather than guessed at.
                return Err(Error::new(
                    Code::Aborted,
                    "the refresh token was exchanged concurrently; retry",
                ));
            }
            // The successor is derived, not random, so that presenting this
            // token again (a second tab, a retry) hands out the same one.
            let successor = self
                .tokens()
                .keys()
                .successor_key()
                .successor(command.refresh_token.expose())?;
            let tokens = self.issue_tokens(ctx, &user, session.id, successor, now).await?;
            store::touch_session(tx, session.id, now, tokens.refresh_token_expires_at).await?;
            return Ok(RefreshOutcome::Rotated(tokens));
        }
        // Already exchanged. Within the grace window this is a second tab
        // refreshing at the same moment: it gets the live token the first
        // exchange led to, never a second branch. After it, the token was
        // stolen or replayed: end the session.
        let Some((live, refresh_token)) = self.live_successor(ctx, token, command.refresh_token, now).await? else {
            store::revoke_session(tx, session.id, now).await?;
            self.forget_everywhere(ctx, user.id);
            record_session_revoked(ctx, user.id, session.id, "refresh_token_reuse");
            tracing::warn!(user_id = %user.id, session_id = %session.id, "refresh token reused; session revoked");
            return Ok(RefreshOutcome::ReuseDetected);
        };
        let (access_token, access_token_expires_at) =
            self.tokens().issue_access(user.id, session.id, user.role, now)?;
        Ok(RefreshOutcome::Rotated(IssuedTokens {
            access_token: Secret::new(access_token),
            access_token_expires_at,
            refresh_token,
            refresh_token_expires_at: live.expires_at,
            session_id: session.id,
        }))
    }
}

#[async_trait]
impl CommandHandler<Logout> for Identity {
    async fn handle(&self, ctx: &CommandContext<'_>, _command: Logout) -> Result<()> {
        let principal = ctx.request.principal()?;
        store::revoke_session(ctx.tx().await?, principal.session_id, clock::now()).await?;
        self.forget_everywhere(ctx, principal.user_id);
        record_session_revoked(ctx, principal.user_id, principal.session_id, "logout");
        tracing::info!(user_id = %principal.user_id, session_id = %principal.session_id, "logged out");
        Ok(())
    }
}

#[async_trait]
impl CommandHandler<ChangePassword> for Identity {
    async fn handle(&self, ctx: &CommandContext<'_>, command: ChangePassword) -> Result<()> {
        let principal = ctx.request.principal()?.clone();
        self.throttle_sign_in(&principal.user_id.to_string(), ctx.request.client_ip)
            .await?;
        let Credentials { user, password_hash } = store::find_credentials(ctx.db, principal.user_id)
            .await?
            .ok_or_else(not_found_user)?;
        // Guesses of one password through either door share one pace.
        self.slow_down_account(user.email.key()).await;
        if !self.hasher().verify(&command.current_password, &password_hash).await? {
            return Err(Error::invalid_field("current_password", "is not correct"));
        }
        let new_hash: HashedPassword = self.hasher().hash(command.new_password.secret()).await?;
        let now = clock::now();
        let tx = ctx.tx().await?;
        let updated = User {
            version: user.version + 1,
            updated_at: now,
            ..user
        };
        store::update_password(tx, &updated, &new_hash).await?;
        let revoked = store::revoke_other_sessions(tx, principal.user_id, Some(principal.session_id), now).await?;
        self.forget_everywhere(ctx, principal.user_id);
        ctx.record(
            &PasswordChanged(pb::PasswordChanged {
                user_id: principal.user_id.to_string(),
                revoked_sessions: revoked,
            }),
            Some(principal.user_id),
            principal.user_id.to_string(),
        );
        tracing::info!(user_id = %principal.user_id, revoked_sessions = revoked, "password changed");
        Ok(())
    }
}

#[async_trait]
impl CommandHandler<UpdateUser> for Identity {
    async fn handle(&self, ctx: &CommandContext<'_>, command: UpdateUser) -> Result<User> {
        ctx.request.require_caller()?;
        // Someone else's account does not exist for a non-admin.
        if !ctx.request.may_act_for(command.id) {
            return Err(not_found_user());
        }
        if command.role.is_some() {
            ctx.request
                .require_admin()
                .map_err(|_| Error::permission_denied("only an admin may change a role"))?;
        }
        let tx = ctx.tx().await?;
        let user = store::find_user(tx, command.id).await?.ok_or_else(not_found_user)?;
        if let Some(role) = command.role
            && role != Role::Admin
        {
            keep_an_admin(ctx, &user).await?;
        }
        let now = clock::now();
        let mut updated = user.clone();
        if let Some(email) = command.email {
            updated.email = email;
        }
        if let Some(display_name) = command.display_name {
            updated.display_name = display_name;
        }
        if let Some(role) = command.role {
            updated.role = role;
        }
        if updated == user {
            return Ok(user);
        }
        updated.version = user.version + 1;
        updated.updated_at = now;
        store::update_user(tx, &updated).await?;
        // The remembered user (GetCurrentUser answers from it) and its role.
        self.forget_everywhere(ctx, updated.id);
        let changed_fields: Vec<String> = [
            (updated.email != user.email).then_some("email"),
            (updated.display_name != user.display_name).then_some("display_name"),
        ]
        .into_iter()
        .flatten()
        .map(str::to_owned)
        .collect();
        if !changed_fields.is_empty() {
            ctx.record(
                &UserUpdated(pb::UserUpdated {
                    user_id: user.id.to_string(),
                    changed_fields,
                    changed_by: actor(ctx),
                    version: updated.version,
                }),
                Some(user.id),
                user.id.to_string(),
            );
        }
        if updated.role != user.role {
            ctx.record(
                &RoleChanged(pb::RoleChanged {
                    user_id: user.id.to_string(),
                    from_role: user.role.as_str().to_owned(),
                    to_role: updated.role.as_str().to_owned(),
                    changed_by: actor(ctx),
                }),
                Some(user.id),
                user.id.to_string(),
            );
            tracing::info!(user_id = %user.id, from = %user.role, to = %updated.role, "role changed");
        }
        Ok(updated)
    }
}

#[async_trait]
impl CommandHandler<DeleteUser> for Identity {
    async fn handle(&self, ctx: &CommandContext<'_>, command: DeleteUser) -> Result<()> {
        ctx.request.require_admin()?;
        let tx = ctx.tx().await?;
        let user = store::find_user(tx, command.id).await?.ok_or_else(not_found_user)?;
        keep_an_admin(ctx, &user).await?;
        // Sessions and refresh tokens go with the user (ON DELETE CASCADE),
        // so the user's access tokens stop working at once.
        store::delete_user(tx, user.id).await?;
        self.forget_everywhere(ctx, user.id);
        ctx.record(
            &UserDeleted(pb::UserDeleted {
                user_id: user.id.to_string(),
                deleted_by: actor(ctx),
            }),
            Some(user.id),
            user.id.to_string(),
        );
        tracing::info!(user_id = %user.id, "user deleted");
        Ok(())
    }
}

#[async_trait]
impl CommandHandler<RevokeSession> for Identity {
    async fn handle(&self, ctx: &CommandContext<'_>, command: RevokeSession) -> Result<()> {
        ctx.request.require_caller()?;
        let tx = ctx.tx().await?;
        let session = store::find_session(tx, command.id)
            .await?
            .filter(|session| ctx.request.may_act_for(session.user_id))
            .ok_or_else(|| Error::not_found("session"))?;
        store::revoke_session(tx, session.id, clock::now()).await?;
        self.forget_everywhere(ctx, session.user_id);
        record_session_revoked(ctx, session.user_id, session.id, "revoked");
        tracing::info!(user_id = %session.user_id, session_id = %session.id, "session revoked");
        Ok(())
    }
}

pub struct CreateApiKey {
    pub name: ApiKeyName,
    pub role: Role,
    pub expires_at: Option<DateTime<Utc>>,
}

/// A new key and the one copy of its secret (never stored by middleware).
#[derive(Debug, Clone)]
pub struct CreatedApiKey {
    pub api_key: ApiKey,
    /// `keel_<id>_<secret>`.
    pub key: Secret<String>,
}

impl Command for CreateApiKey {
    const NAME: &'static str = "identity.create_api_key";
    type Output = CreatedApiKey;
}

pub struct RevokeApiKey {
    pub id: Uuid,
}

impl Command for RevokeApiKey {
    const NAME: &'static str = "identity.revoke_api_key";
    type Output = ();
}

#[async_trait]
impl CommandHandler<CreateApiKey> for Identity {
    async fn handle(&self, ctx: &CommandContext<'_>, command: CreateApiKey) -> Result<CreatedApiKey> {
        ctx.request.require_admin()?;
        let now = clock::now();
        if command.expires_at.is_some_and(|expires_at| expires_at <= now) {
            return Err(Error::invalid_field("expires_at", "must be in the future"));
        }
        let id = id::new_id();
        let (key, secret) = crate::model::new_api_key(id);
        let created_by = ctx
            .request
            .principal
            .as_ref()
            .map_or(Uuid::nil(), |principal| principal.user_id);
        let api_key = ApiKey {
            id,
            name: command.name,
            role: command.role,
            created_by,
            created_at: now,
            expires_at: command.expires_at,
            last_used_at: None,
            revoked_at: None,
        };
        let tx = ctx.tx().await?;
        store::insert_api_key(tx, &api_key, &hash_refresh_token(secret.expose())).await?;
        ctx.record(
            &ApiKeyCreated(pb::ApiKeyCreated {
                api_key_id: id.to_string(),
                name: api_key.name.as_str().to_owned(),
                role: api_key.role.as_str().to_owned(),
                created_by: actor(ctx),
            }),
            Some(id),
            id.to_string(),
        );
        tracing::info!(api_key_id = %id, role = %api_key.role, created_by = %actor(ctx), "api key created");
        Ok(CreatedApiKey { api_key, key })
    }
}

#[async_trait]
impl CommandHandler<RevokeApiKey> for Identity {
    async fn handle(&self, ctx: &CommandContext<'_>, command: RevokeApiKey) -> Result<()> {
        ctx.request.require_admin()?;
        let tx = ctx.tx().await?;
        let key = store::find_api_key(tx, command.id)
            .await?
            .ok_or_else(|| Error::not_found("api key"))?;
        if store::revoke_api_key(tx, key.id, clock::now()).await? {
            // Every process forgets the key before this call answers.
            self.forget_everywhere(ctx, key.id);
            ctx.record(
                &ApiKeyRevoked(pb::ApiKeyRevoked {
                    api_key_id: key.id.to_string(),
                    revoked_by: actor(ctx),
                }),
                Some(key.id),
                key.id.to_string(),
            );
            tracing::info!(api_key_id = %key.id, revoked_by = %actor(ctx), "api key revoked");
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use keel_kernel::Reply;

    use super::*;

    #[test]
    fn replies_with_credentials_are_never_stored() {
        let tokens = IssuedTokens {
            access_token: Secret::new("access".to_owned()),
            access_token_expires_at: clock::now(),
            refresh_token: Secret::new("refresh".to_owned()),
            refresh_token_expires_at: clock::now(),
            session_id: id::new_id(),
        };
        assert!(RefreshOutcome::Rotated(tokens).to_bytes().is_none());
        assert!(LoginOutcome::Refused.to_bytes().is_none());
        assert!(LoginOutcome::from_bytes(b"{}").is_err());
    }
}
