//! The reads of identity: query structs and their handlers.

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use keel_kernel::page::{decode_token, encode_token, page_size};
use keel_kernel::{Error, Query, QueryContext, QueryHandler, Result, clock};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::Identity;
use crate::model::{ApiKey, Session, User};
use crate::store::{self, UserKey, UserOrder};
use crate::tokens::PublicJwk;

pub struct GetCurrentUser;

impl Query for GetCurrentUser {
    const NAME: &'static str = "identity.get_current_user";
    type Output = User;
}

pub struct GetUser {
    pub id: Uuid,
}

/// The query-cache tag of one user's row: `identity.user:<id>`.
pub const USER_TAG: &str = "identity.user";

impl Query for GetUser {
    const NAME: &'static str = "identity.get_user";
    type Output = User;

    // Keyed by the id; the bus adds the caller, so the access check's
    // answer (own row, or admin) is the same for every hit of an entry.
    fn cache_key(&self) -> Option<String> {
        Some(self.id.to_string())
    }

    fn cache_tags(&self) -> Vec<String> {
        vec![format!("{USER_TAG}:{}", self.id)]
    }
}

pub struct ListUsers {
    pub page_size: i32,
    pub page_token: String,
    pub query: String,
    pub order_by: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct UserPage {
    pub users: Vec<User>,
    pub next_page_token: String,
}

impl Query for ListUsers {
    const NAME: &'static str = "identity.list_users";
    type Output = UserPage;
}

pub struct ListSessions;

impl Query for ListSessions {
    const NAME: &'static str = "identity.list_sessions";
    type Output = Vec<Session>;
}

pub struct GetJwks;

impl Query for GetJwks {
    const NAME: &'static str = "identity.get_jwks";
    type Output = Vec<PublicJwk>;
}

#[async_trait]
impl QueryHandler<GetCurrentUser> for Identity {
    async fn handle(&self, ctx: &QueryContext<'_>, _query: GetCurrentUser) -> Result<User> {
        let principal = ctx.request.principal()?;
        // Authentication read the caller's row in this request already.
        if let Some(user) = ctx.request.caller::<User>().filter(|user| user.id == principal.user_id) {
            return Ok(user.clone());
        }
        store::find_user(ctx.db, principal.user_id)
            .await?
            .ok_or_else(|| Error::not_found("user"))
    }
}

#[async_trait]
impl QueryHandler<GetUser> for Identity {
    async fn handle(&self, ctx: &QueryContext<'_>, query: GetUser) -> Result<User> {
        ctx.request.require_caller()?;
        // Another user's id answers exactly like an id that does not exist.
        if !ctx.request.may_act_for(query.id) {
            return Err(Error::not_found("user"));
        }
        if let Some(user) = self.cache().get_user(query.id) {
            return Ok(user);
        }
        let ticket = self.cache().ticket();
        let user = store::find_user(ctx.db, query.id)
            .await?
            .ok_or_else(|| Error::not_found("user"))?;
        if let Some(ticket) = ticket {
            self.cache().fill_user(ticket, &user);
        }
        Ok(user)
    }
}

/// What a page token holds: the filters it belongs to and the last key seen.
#[derive(Debug, Serialize, Deserialize, PartialEq, Eq)]
struct UserCursor {
    /// `order_by` as normalised, and `query`, of the list this token continues.
    order: String,
    query: String,
    /// The last row: its creation time (RFC 3339) and id, or its email key.
    created_at: Option<DateTime<Utc>>,
    id: Option<Uuid>,
    email: Option<String>,
}

fn parse_order(order_by: &str) -> Result<(UserOrder, bool, String)> {
    let words: Vec<String> = order_by.split_whitespace().map(str::to_lowercase).collect();
    let words: Vec<&str> = words.iter().map(String::as_str).collect();
    let (field, descending) = match words.as_slice() {
        [] => ("created_at", false),
        [field] | [field, "asc"] => (*field, false),
        [field, "desc"] => (*field, true),
        _ => return Err(invalid_order()),
    };
    let order = match field {
        "created_at" => UserOrder::CreatedAt,
        "email" => UserOrder::Email,
        _ => return Err(invalid_order()),
    };
    let normalised = format!("{field}{}", if descending { " desc" } else { "" });
    Ok((order, descending, normalised))
}

fn invalid_order() -> Error {
    Error::invalid_field(
        "order_by",
        "must be `created_at` or `email`, optionally followed by `desc`",
    )
}

#[async_trait]
impl QueryHandler<ListUsers> for Identity {
    async fn handle(&self, ctx: &QueryContext<'_>, query: ListUsers) -> Result<UserPage> {
        ctx.request.require_admin()?;
        let limit = page_size(query.page_size)?;
        let (order, descending, normalised_order) = parse_order(&query.order_by)?;
        let prefix = query.query.trim().to_lowercase();
        let cursor: Option<UserCursor> = decode_token(&query.page_token)?;
        let after = match &cursor {
            None => None,
            Some(cursor) if cursor.order != normalised_order || cursor.query != prefix => {
                return Err(Error::invalid_field(
                    "page_token",
                    "belongs to a list with another query or order_by",
                ));
            }
            Some(cursor) => Some(match (order, cursor) {
                (
                    UserOrder::CreatedAt,
                    UserCursor {
                        created_at: Some(created_at),
                        id: Some(id),
                        ..
                    },
                ) => UserKey::CreatedAt(*created_at, *id),
                (UserOrder::Email, UserCursor { email: Some(email), .. }) => UserKey::Email(email.clone()),
                _ => {
                    return Err(Error::invalid_field("page_token", "is not a page token of this list"));
                }
            }),
        };
        let prefix_filter = (!prefix.is_empty()).then_some(prefix.as_str());
        let mut users = store::list_users(ctx.db, prefix_filter, order, descending, after.as_ref(), limit + 1).await?;
        let next_page_token = if users.len() as u64 > limit {
            users.truncate(limit as usize);
            let last = users.last().ok_or_else(|| Error::internal("page without rows"))?;
            encode_token(&UserCursor {
                order: normalised_order,
                query: prefix,
                created_at: (order == UserOrder::CreatedAt).then_some(last.created_at),
                id: (order == UserOrder::CreatedAt).then_some(last.id),
                email: (order == UserOrder::Email).then(|| last.email.key().to_owned()),
            })?
        } else {
            String::new()
        };
        Ok(UserPage { users, next_page_token })
    }
}

#[async_trait]
impl QueryHandler<ListSessions> for Identity {
    async fn handle(&self, ctx: &QueryContext<'_>, _query: ListSessions) -> Result<Vec<Session>> {
        let principal = ctx.request.principal()?;
        store::list_active_sessions(ctx.db, principal.user_id, clock::now()).await
    }
}

pub struct ListApiKeys {
    pub page_size: i32,
    pub page_token: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ApiKeyPage {
    pub api_keys: Vec<ApiKey>,
    pub next_page_token: String,
}

impl Query for ListApiKeys {
    const NAME: &'static str = "identity.list_api_keys";
    type Output = ApiKeyPage;
}

/// A page token of `ListApiKeys`: the last id seen.
#[derive(Debug, Serialize, Deserialize)]
struct ApiKeyCursor {
    after: Uuid,
}

#[async_trait]
impl QueryHandler<ListApiKeys> for Identity {
    async fn handle(&self, ctx: &QueryContext<'_>, query: ListApiKeys) -> Result<ApiKeyPage> {
        ctx.request.require_admin()?;
        let limit = page_size(query.page_size)?;
        let cursor: Option<ApiKeyCursor> = decode_token(&query.page_token)?;
        let mut api_keys = store::list_api_keys(ctx.db, cursor.map(|cursor| cursor.after), limit + 1).await?;
        let next_page_token = if api_keys.len() as u64 > limit {
            api_keys.truncate(limit as usize);
            let last = api_keys.last().ok_or_else(|| Error::internal("page without rows"))?;
            encode_token(&ApiKeyCursor { after: last.id })?
        } else {
            String::new()
        };
        Ok(ApiKeyPage {
            api_keys,
            next_page_token,
        })
    }
}

#[async_trait]
impl QueryHandler<GetJwks> for Identity {
    async fn handle(&self, _ctx: &QueryContext<'_>, _query: GetJwks) -> Result<Vec<PublicJwk>> {
        Ok(self.tokens().keys().public_keys().to_vec())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn order_by_accepts_the_two_keys_and_desc() {
        assert!(matches!(parse_order(""), Ok((UserOrder::CreatedAt, false, _))));
        assert!(matches!(parse_order("email DESC"), Ok((UserOrder::Email, true, _))));
        assert!(matches!(
            parse_order("created_at asc"),
            Ok((UserOrder::CreatedAt, false, _))
        ));
        assert!(parse_order("password").is_err());
        assert!(parse_order("email desc extra").is_err());
    }
}
