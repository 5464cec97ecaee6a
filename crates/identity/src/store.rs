//! The identity tables and the only SQL of the module.
//!
//! Rows become domain types here ([`User`], [`Session`], ...), and only
//! here: a SeaORM model never leaves this file. A row that no longer parses
//! (an unknown role, a malformed email) is an internal error, raised once,
//! here.

use chrono::{DateTime, Utc};
use keel_kernel::bus::write_transaction;
use keel_kernel::{Error, Result, Role};
use sea_orm::sea_query::{Expr, Query};
use sea_orm::{
    ActiveModelTrait, ColumnTrait, Condition, ConnectionTrait, DatabaseConnection, EntityTrait, PaginatorTrait,
    QueryFilter, QueryOrder, QuerySelect, Set, SqlErr, TransactionTrait,
};
use uuid::Uuid;

use crate::model::{ApiKey, ApiKeyName, Credentials, DisplayName, Email, HashedPassword, RefreshToken, Session, User};

pub mod users {
    use sea_orm::entity::prelude::*;

    #[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
    #[sea_orm(table_name = "users")]
    pub struct Model {
        #[sea_orm(primary_key, auto_increment = false)]
        pub id: Uuid,
        pub user_id: Uuid,
        pub email: String,
        pub email_key: String,
        pub display_name: String,
        pub display_name_key: String,
        pub role: String,
        pub password_hash: String,
        pub version: i32,
        pub created_at: DateTimeUtc,
        pub updated_at: DateTimeUtc,
    }

    #[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
    pub enum Relation {
        #[sea_orm(has_many = "super::sessions::Entity")]
        Sessions,
    }

    impl Related<super::sessions::Entity> for Entity {
        fn to() -> RelationDef {
            Relation::Sessions.def()
        }
    }

    impl ActiveModelBehavior for ActiveModel {}
}

pub mod sessions {
    use sea_orm::entity::prelude::*;

    #[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
    #[sea_orm(table_name = "sessions")]
    pub struct Model {
        #[sea_orm(primary_key, auto_increment = false)]
        pub id: Uuid,
        pub user_id: Uuid,
        pub created_at: DateTimeUtc,
        pub updated_at: DateTimeUtc,
        pub last_refreshed_at: DateTimeUtc,
        pub expires_at: DateTimeUtc,
        pub revoked_at: Option<DateTimeUtc>,
        pub user_agent: String,
        pub ip_address: String,
    }

    #[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
    pub enum Relation {
        #[sea_orm(
            belongs_to = "super::users::Entity",
            from = "Column::UserId",
            to = "super::users::Column::Id",
            on_delete = "Cascade"
        )]
        User,
    }

    impl Related<super::users::Entity> for Entity {
        fn to() -> RelationDef {
            Relation::User.def()
        }
    }

    impl ActiveModelBehavior for ActiveModel {}
}

pub mod refresh_tokens {
    use sea_orm::entity::prelude::*;

    #[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
    #[sea_orm(table_name = "refresh_tokens")]
    pub struct Model {
        #[sea_orm(primary_key, auto_increment = false)]
        pub id: Uuid,
        pub user_id: Uuid,
        pub session_id: Uuid,
        pub token_hash: String,
        pub created_at: DateTimeUtc,
        pub expires_at: DateTimeUtc,
        pub used_at: Option<DateTimeUtc>,
    }

    #[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
    pub enum Relation {}

    impl ActiveModelBehavior for ActiveModel {}
}

pub mod api_keys {
    use sea_orm::entity::prelude::*;

    #[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
    #[sea_orm(table_name = "api_keys")]
    pub struct Model {
        #[sea_orm(primary_key, auto_increment = false)]
        pub id: Uuid,
        pub user_id: Uuid,
        pub name: String,
        pub role: String,
        pub secret_hash: String,
        pub created_at: DateTimeUtc,
        pub updated_at: DateTimeUtc,
        pub expires_at: Option<DateTimeUtc>,
        pub last_used_at: Option<DateTimeUtc>,
        pub revoked_at: Option<DateTimeUtc>,
    }

    #[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
    pub enum Relation {}

    impl ActiveModelBehavior for ActiveModel {}
}

fn user_from_row(row: users::Model) -> Result<User> {
    let role = Role::parse(&row.role)
        .ok_or_else(|| Error::internal(format!("user {} has unknown role {:?}", row.id, row.role)))?;
    // Email and display name were parsed when written; they are taken as
    // stored, so that a rule tightened later never locks an account out.
    Ok(User {
        id: row.id,
        email: Email::from_stored(row.email, row.email_key),
        display_name: DisplayName::from_stored(row.display_name),
        role,
        version: row.version,
        created_at: row.created_at,
        updated_at: row.updated_at,
    })
}

fn credentials_from_row(mut row: users::Model) -> Result<Credentials> {
    let password_hash = HashedPassword::new(std::mem::take(&mut row.password_hash));
    Ok(Credentials {
        user: user_from_row(row)?,
        password_hash,
    })
}

fn session_from_row(row: sessions::Model) -> Session {
    Session {
        id: row.id,
        user_id: row.user_id,
        created_at: row.created_at,
        last_refreshed_at: row.last_refreshed_at,
        expires_at: row.expires_at,
        revoked_at: row.revoked_at,
        user_agent: row.user_agent,
        ip_address: row.ip_address,
    }
}

fn refresh_token_from_row(row: refresh_tokens::Model) -> RefreshToken {
    RefreshToken {
        id: row.id,
        user_id: row.user_id,
        session_id: row.session_id,
        token_hash: row.token_hash,
        created_at: row.created_at,
        expires_at: row.expires_at,
        used_at: row.used_at,
    }
}

fn unique_violation(error: sea_orm::DbErr, message: &str) -> Error {
    match error.sql_err() {
        Some(SqlErr::UniqueConstraintViolation(_)) => Error::already_exists(message),
        _ => error.into(),
    }
}

const EMAIL_TAKEN: &str = "an account with this email already exists";

fn concurrently_changed() -> Error {
    Error::new(
        keel_kernel::Code::Aborted,
        "the user was changed concurrently; read it again and retry",
    )
}

fn user_row(user: &User, password_hash: &HashedPassword) -> users::ActiveModel {
    users::ActiveModel {
        id: Set(user.id),
        // The owner of a user row is the user.
        user_id: Set(user.id),
        email: Set(user.email.as_str().to_owned()),
        email_key: Set(user.email.key().to_owned()),
        display_name: Set(user.display_name.as_str().to_owned()),
        display_name_key: Set(user.display_name.key()),
        role: Set(user.role.as_str().to_owned()),
        password_hash: Set(password_hash.as_str().to_owned()),
        version: Set(user.version),
        created_at: Set(user.created_at),
        updated_at: Set(user.updated_at),
    }
}

/// Inserts a user; a taken email is ALREADY_EXISTS.
pub async fn insert_user(db: &impl ConnectionTrait, user: &User, password_hash: &HashedPassword) -> Result<()> {
    user_row(user, password_hash)
        .insert(db)
        .await
        .map_err(|error| unique_violation(error, EMAIL_TAKEN))?;
    Ok(())
}

/// Inserts a user unless the email is taken (`ON CONFLICT DO NOTHING`, so
/// a concurrent registration of the same email is waited for, never an
/// error that would abort the transaction); true when it inserted.
pub async fn insert_user_if_email_free(
    db: &impl ConnectionTrait,
    user: &User,
    password_hash: &HashedPassword,
) -> Result<bool> {
    let inserted = users::Entity::insert(user_row(user, password_hash))
        .on_conflict_do_nothing_on([users::Column::EmailKey])
        .exec_without_returning(db)
        .await?;
    Ok(matches!(inserted, sea_orm::TryInsertResult::Inserted(rows) if rows > 0))
}

pub async fn find_user_by_email(db: &impl ConnectionTrait, email: &Email) -> Result<Option<User>> {
    users::Entity::find()
        .filter(users::Column::EmailKey.eq(email.key()))
        .one(db)
        .await?
        .map(user_from_row)
        .transpose()
}

pub async fn find_user(db: &impl ConnectionTrait, id: Uuid) -> Result<Option<User>> {
    users::Entity::find_by_id(id)
        .one(db)
        .await?
        .map(user_from_row)
        .transpose()
}

/// A user with their password hash: for login and change-password only.
pub async fn find_credentials(db: &impl ConnectionTrait, id: Uuid) -> Result<Option<Credentials>> {
    users::Entity::find_by_id(id)
        .one(db)
        .await?
        .map(credentials_from_row)
        .transpose()
}

pub async fn find_credentials_by_email(db: &impl ConnectionTrait, email: &Email) -> Result<Option<Credentials>> {
    users::Entity::find()
        .filter(users::Column::EmailKey.eq(email.key()))
        .one(db)
        .await?
        .map(credentials_from_row)
        .transpose()
}

/// Writes the profile and role of `user` if its row's version still is
/// `user.version - 1`: a concurrent update in between is ABORTED, never
/// silently overwritten.
pub async fn update_user(db: &impl ConnectionTrait, user: &User) -> Result<()> {
    let result = users::Entity::update_many()
        .col_expr(users::Column::Email, Expr::value(user.email.as_str()))
        .col_expr(users::Column::EmailKey, Expr::value(user.email.key()))
        .col_expr(users::Column::DisplayName, Expr::value(user.display_name.as_str()))
        .col_expr(users::Column::DisplayNameKey, Expr::value(user.display_name.key()))
        .col_expr(users::Column::Role, Expr::value(user.role.as_str()))
        .col_expr(users::Column::Version, Expr::value(user.version))
        .col_expr(users::Column::UpdatedAt, Expr::value(user.updated_at))
        .filter(users::Column::Id.eq(user.id))
        .filter(users::Column::Version.eq(user.version - 1))
        .exec(db)
        .await
        .map_err(|error| unique_violation(error, EMAIL_TAKEN))?;
    if result.rows_affected == 0 {
        return Err(concurrently_changed());
    }
    Ok(())
}

/// Replaces the password hash of `user`, under the same version rule as
/// [`update_user`].
pub async fn update_password(db: &impl ConnectionTrait, user: &User, password_hash: &HashedPassword) -> Result<()> {
    let result = users::Entity::update_many()
        .col_expr(users::Column::PasswordHash, Expr::value(password_hash.as_str()))
        .col_expr(users::Column::Version, Expr::value(user.version))
        .col_expr(users::Column::UpdatedAt, Expr::value(user.updated_at))
        .filter(users::Column::Id.eq(user.id))
        .filter(users::Column::Version.eq(user.version - 1))
        .exec(db)
        .await?;
    if result.rows_affected == 0 {
        return Err(concurrently_changed());
    }
    Ok(())
}

pub async fn delete_user(db: &impl ConnectionTrait, id: Uuid) -> Result<bool> {
    let result = users::Entity::delete_by_id(id).exec(db).await?;
    Ok(result.rows_affected > 0)
}

/// Served by `ix_users_role`.
pub async fn count_admins(db: &impl ConnectionTrait) -> Result<u64> {
    Ok(users::Entity::find()
        .filter(users::Column::Role.eq(Role::Admin.as_str()))
        .count(db)
        .await?)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UserOrder {
    CreatedAt,
    Email,
}

/// Where the previous page stopped: the sort key of its last row.
#[derive(Debug, Clone)]
pub enum UserKey {
    CreatedAt(DateTime<Utc>, Uuid),
    Email(String),
}

/// One page of users, keyset-paginated: rows inserted while a client pages
/// never shift or repeat what it sees.
pub async fn list_users(
    db: &impl ConnectionTrait,
    prefix: Option<&str>,
    order: UserOrder,
    descending: bool,
    after: Option<&UserKey>,
    limit: u64,
) -> Result<Vec<User>> {
    let mut select = users::Entity::find();
    if let Some(prefix) = prefix {
        // A half-open range instead of LIKE: no wildcard escaping, and both
        // backends scan the byte-ordered key index.
        let upper = format!("{prefix}\u{10FFFF}");
        select = select.filter(
            Condition::any()
                .add(
                    Condition::all()
                        .add(users::Column::EmailKey.gte(prefix))
                        .add(users::Column::EmailKey.lt(upper.as_str())),
                )
                .add(
                    Condition::all()
                        .add(users::Column::DisplayNameKey.gte(prefix))
                        .add(users::Column::DisplayNameKey.lt(upper.as_str())),
                ),
        );
    }
    let sort = if descending {
        sea_orm::Order::Desc
    } else {
        sea_orm::Order::Asc
    };
    match after {
        Some(UserKey::CreatedAt(created_at, id)) => {
            let (time_after, id_after) = if descending {
                (users::Column::CreatedAt.lt(*created_at), users::Column::Id.lt(*id))
            } else {
                (users::Column::CreatedAt.gt(*created_at), users::Column::Id.gt(*id))
            };
            select = select.filter(
                Condition::any().add(time_after).add(
                    Condition::all()
                        .add(users::Column::CreatedAt.eq(*created_at))
                        .add(id_after),
                ),
            );
        }
        Some(UserKey::Email(email_key)) => {
            select = select.filter(if descending {
                users::Column::EmailKey.lt(email_key.as_str())
            } else {
                users::Column::EmailKey.gt(email_key.as_str())
            });
        }
        None => {}
    }
    select = match order {
        UserOrder::CreatedAt => select
            .order_by(users::Column::CreatedAt, sort.clone())
            .order_by(users::Column::Id, sort),
        UserOrder::Email => select.order_by(users::Column::EmailKey, sort),
    };
    select
        .limit(limit)
        .all(db)
        .await?
        .into_iter()
        .map(user_from_row)
        .collect()
}

pub async fn insert_session(db: &impl ConnectionTrait, session: &Session) -> Result<()> {
    sessions::ActiveModel {
        id: Set(session.id),
        user_id: Set(session.user_id),
        created_at: Set(session.created_at),
        updated_at: Set(session.created_at),
        last_refreshed_at: Set(session.last_refreshed_at),
        expires_at: Set(session.expires_at),
        revoked_at: Set(session.revoked_at),
        user_agent: Set(session.user_agent.clone()),
        ip_address: Set(session.ip_address.clone()),
    }
    .insert(db)
    .await?;
    Ok(())
}

/// A session and its user in one query (the authentication path).
pub async fn find_session_with_user(db: &impl ConnectionTrait, session_id: Uuid) -> Result<Option<(Session, User)>> {
    let found = sessions::Entity::find_by_id(session_id)
        .find_also_related(users::Entity)
        .one(db)
        .await?;
    match found {
        Some((session, Some(user))) => Ok(Some((session_from_row(session), user_from_row(user)?))),
        _ => Ok(None),
    }
}

pub async fn find_session(db: &impl ConnectionTrait, session_id: Uuid) -> Result<Option<Session>> {
    Ok(sessions::Entity::find_by_id(session_id)
        .one(db)
        .await?
        .map(session_from_row))
}

/// Revokes one session if it is still active; true when this call revoked it.
pub async fn revoke_session(db: &impl ConnectionTrait, session_id: Uuid, now: DateTime<Utc>) -> Result<bool> {
    let result = sessions::Entity::update_many()
        .col_expr(sessions::Column::RevokedAt, Expr::value(Some(now)))
        .col_expr(sessions::Column::UpdatedAt, Expr::value(now))
        .filter(sessions::Column::Id.eq(session_id))
        .filter(sessions::Column::RevokedAt.is_null())
        .exec(db)
        .await?;
    Ok(result.rows_affected > 0)
}

/// Revokes every active session of `user_id` but `keep`; returns how many.
pub async fn revoke_other_sessions(
    db: &impl ConnectionTrait,
    user_id: Uuid,
    keep: Option<Uuid>,
    now: DateTime<Utc>,
) -> Result<u64> {
    let mut update = sessions::Entity::update_many()
        .col_expr(sessions::Column::RevokedAt, Expr::value(Some(now)))
        .col_expr(sessions::Column::UpdatedAt, Expr::value(now))
        .filter(sessions::Column::UserId.eq(user_id))
        .filter(sessions::Column::RevokedAt.is_null());
    if let Some(keep) = keep {
        update = update.filter(sessions::Column::Id.ne(keep));
    }
    Ok(update.exec(db).await?.rows_affected)
}

pub async fn touch_session(
    db: &impl ConnectionTrait,
    session_id: Uuid,
    now: DateTime<Utc>,
    expires_at: DateTime<Utc>,
) -> Result<()> {
    sessions::Entity::update_many()
        .col_expr(sessions::Column::LastRefreshedAt, Expr::value(now))
        .col_expr(sessions::Column::UpdatedAt, Expr::value(now))
        .col_expr(sessions::Column::ExpiresAt, Expr::value(expires_at))
        .filter(sessions::Column::Id.eq(session_id))
        .exec(db)
        .await?;
    Ok(())
}

pub async fn list_active_sessions(
    db: &impl ConnectionTrait,
    user_id: Uuid,
    now: DateTime<Utc>,
) -> Result<Vec<Session>> {
    Ok(sessions::Entity::find()
        .filter(sessions::Column::UserId.eq(user_id))
        .filter(sessions::Column::RevokedAt.is_null())
        .filter(sessions::Column::ExpiresAt.gt(now))
        .order_by_desc(sessions::Column::CreatedAt)
        .limit(1000)
        .all(db)
        .await?
        .into_iter()
        .map(session_from_row)
        .collect())
}

pub async fn insert_refresh_token(db: &impl ConnectionTrait, token: &RefreshToken) -> Result<()> {
    refresh_tokens::ActiveModel {
        id: Set(token.id),
        user_id: Set(token.user_id),
        session_id: Set(token.session_id),
        token_hash: Set(token.token_hash.clone()),
        created_at: Set(token.created_at),
        expires_at: Set(token.expires_at),
        used_at: Set(token.used_at),
    }
    .insert(db)
    .await?;
    Ok(())
}

pub async fn find_refresh_token(db: &impl ConnectionTrait, token_hash: &str) -> Result<Option<RefreshToken>> {
    Ok(refresh_tokens::Entity::find()
        .filter(refresh_tokens::Column::TokenHash.eq(token_hash))
        .one(db)
        .await?
        .map(refresh_token_from_row))
}

/// [`find_refresh_token`], the row locked until the transaction ends
/// (`FOR UPDATE` on PostgreSQL; SQLite has one writer at a time): two
/// redemptions of one token at once take turns.
pub async fn lock_refresh_token(db: &impl ConnectionTrait, token_hash: &str) -> Result<Option<RefreshToken>> {
    Ok(refresh_tokens::Entity::find()
        .filter(refresh_tokens::Column::TokenHash.eq(token_hash))
        .lock_exclusive()
        .one(db)
        .await?
        .map(refresh_token_from_row))
}

#[cfg(test)]
pub async fn find_refresh_token_by_id(db: &impl ConnectionTrait, id: Uuid) -> Result<Option<RefreshToken>> {
    Ok(refresh_tokens::Entity::find_by_id(id)
        .one(db)
        .await?
        .map(refresh_token_from_row))
}

/// Marks a token used if nobody has; true when this call did. Two concurrent
/// exchanges of one token cannot both win.
pub async fn claim_refresh_token(db: &impl ConnectionTrait, id: Uuid, now: DateTime<Utc>) -> Result<bool> {
    let result = refresh_tokens::Entity::update_many()
        .col_expr(refresh_tokens::Column::UsedAt, Expr::value(Some(now)))
        .filter(refresh_tokens::Column::Id.eq(id))
        .filter(refresh_tokens::Column::UsedAt.is_null())
        .exec(db)
        .await?;
    Ok(result.rows_affected > 0)
}

/// Deletes at most `batch` refresh tokens that expired at or before `now`,
/// in one statement (served by `ix_refresh_tokens_expires_at`); returns how
/// many.
///
/// A used token is kept until it expires, not pruned after the grace window:
/// presenting it again must still find it, so that reuse revokes the session.
pub async fn prune_refresh_tokens(db: &DatabaseConnection, now: DateTime<Utc>, batch: u64) -> Result<u64> {
    let expired = Query::select()
        .column(refresh_tokens::Column::Id)
        .from(refresh_tokens::Entity)
        .and_where(refresh_tokens::Column::ExpiresAt.lte(now))
        .limit(batch)
        .to_owned();
    delete_in_write_transaction(
        db,
        refresh_tokens::Entity::delete_many().filter(refresh_tokens::Column::Id.in_subquery(expired)),
    )
    .await
}

/// Deletes at most `batch` sessions that expired, or were revoked, before
/// `before`, in one statement (served by `ix_sessions_expires_at` and
/// `ix_sessions_revoked_at`); their refresh tokens go with them (ON DELETE
/// CASCADE). Returns how many sessions.
pub async fn prune_sessions(db: &DatabaseConnection, before: DateTime<Utc>, batch: u64) -> Result<u64> {
    let ended = Query::select()
        .column(sessions::Column::Id)
        .from(sessions::Entity)
        .cond_where(
            Condition::any()
                .add(sessions::Column::ExpiresAt.lt(before))
                .add(sessions::Column::RevokedAt.lt(before)),
        )
        .limit(batch)
        .to_owned();
    delete_in_write_transaction(
        db,
        sessions::Entity::delete_many().filter(sessions::Column::Id.in_subquery(ended)),
    )
    .await
}

/// One DELETE in its own write transaction: IMMEDIATE on SQLite, so that it
/// queues behind other writers instead of failing on a stale snapshot.
async fn delete_in_write_transaction<E: EntityTrait>(
    db: &DatabaseConnection,
    delete: sea_orm::DeleteMany<E>,
) -> Result<u64> {
    let tx = db.begin_with_options(write_transaction()).await?;
    let deleted = delete.exec(&tx).await?.rows_affected;
    tx.commit().await?;
    Ok(deleted)
}

fn api_key_from_row(row: api_keys::Model) -> Result<(ApiKey, String)> {
    let role = Role::parse(&row.role)
        .ok_or_else(|| Error::internal(format!("api key {} has unknown role {:?}", row.id, row.role)))?;
    let key = ApiKey {
        id: row.id,
        name: ApiKeyName::from_stored(row.name),
        role,
        created_by: row.user_id,
        created_at: row.created_at,
        expires_at: row.expires_at,
        last_used_at: row.last_used_at,
        revoked_at: row.revoked_at,
    };
    Ok((key, row.secret_hash))
}

/// Stores a new API key with the SHA-256 (hex) of its secret.
pub async fn insert_api_key(db: &impl ConnectionTrait, key: &ApiKey, secret_hash: &str) -> Result<()> {
    api_keys::ActiveModel {
        id: Set(key.id),
        user_id: Set(key.created_by),
        name: Set(key.name.as_str().to_owned()),
        role: Set(key.role.as_str().to_owned()),
        secret_hash: Set(secret_hash.to_owned()),
        created_at: Set(key.created_at),
        updated_at: Set(key.created_at),
        expires_at: Set(key.expires_at),
        last_used_at: Set(key.last_used_at),
        revoked_at: Set(key.revoked_at),
    }
    .insert(db)
    .await?;
    Ok(())
}

/// An API key and the hash of its secret (the authentication path).
pub async fn find_api_key_with_hash(db: &impl ConnectionTrait, id: Uuid) -> Result<Option<(ApiKey, String)>> {
    api_keys::Entity::find_by_id(id)
        .one(db)
        .await?
        .map(api_key_from_row)
        .transpose()
}

pub async fn find_api_key(db: &impl ConnectionTrait, id: Uuid) -> Result<Option<ApiKey>> {
    Ok(find_api_key_with_hash(db, id).await?.map(|(key, _)| key))
}

/// One page of API keys by id (time-ordered), after `after`.
pub async fn list_api_keys(db: &impl ConnectionTrait, after: Option<Uuid>, limit: u64) -> Result<Vec<ApiKey>> {
    let mut select = api_keys::Entity::find();
    if let Some(after) = after {
        select = select.filter(api_keys::Column::Id.gt(after));
    }
    select
        .order_by_asc(api_keys::Column::Id)
        .limit(limit)
        .all(db)
        .await?
        .into_iter()
        .map(|row| api_key_from_row(row).map(|(key, _)| key))
        .collect()
}

/// Revokes an API key if it is not revoked yet; true when this call did.
pub async fn revoke_api_key(db: &impl ConnectionTrait, id: Uuid, now: DateTime<Utc>) -> Result<bool> {
    let result = api_keys::Entity::update_many()
        .col_expr(api_keys::Column::RevokedAt, Expr::value(Some(now)))
        .col_expr(api_keys::Column::UpdatedAt, Expr::value(now))
        .filter(api_keys::Column::Id.eq(id))
        .filter(api_keys::Column::RevokedAt.is_null())
        .exec(db)
        .await?;
    Ok(result.rows_affected > 0)
}

/// Records that the key was used at `now`, unless it was recorded after
/// `unless_after` (so that every process together writes it at most once
/// per interval).
pub async fn touch_api_key(
    db: &impl ConnectionTrait,
    id: Uuid,
    now: DateTime<Utc>,
    unless_after: DateTime<Utc>,
) -> Result<()> {
    api_keys::Entity::update_many()
        .col_expr(api_keys::Column::LastUsedAt, Expr::value(Some(now)))
        .filter(api_keys::Column::Id.eq(id))
        .filter(
            Condition::any()
                .add(api_keys::Column::LastUsedAt.is_null())
                .add(api_keys::Column::LastUsedAt.lte(unless_after)),
        )
        .exec(db)
        .await?;
    Ok(())
}
