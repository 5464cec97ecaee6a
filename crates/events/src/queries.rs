//! The reads of the events module: subscriptions, the audit log, dead letters.

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use keel_kernel::page::{decode_token, encode_token, page_size_within};
use keel_kernel::{Envelope, Error, Live, Query, QueryContext, QueryHandler, Result};
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;
use uuid::Uuid;

use crate::Events;
use crate::model::ListedDeadLetter;
use crate::store;
use crate::subscribe::{self, Item, Subscription};

pub struct Subscribe {
    pub topics: Vec<String>,
    pub after_sequence: u64,
}

impl Query for Subscribe {
    const NAME: &'static str = "events.subscribe";
    type Output = Live<mpsc::Receiver<Result<Item>>>;
}

pub struct ListAuditEvents {
    pub page_size: i32,
    pub page_token: String,
    pub event_names: Vec<String>,
    pub user_id: Option<Uuid>,
    pub since: Option<DateTime<Utc>>,
    pub until: Option<DateTime<Utc>>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct EventPage {
    pub events: Vec<Envelope>,
    pub next_page_token: String,
}

impl Query for ListAuditEvents {
    const NAME: &'static str = "events.list_audit_events";
    type Output = EventPage;
}

pub struct ListDeadLetters {
    pub page_size: i32,
    pub page_token: String,
    pub include_replayed: bool,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DeadLetterPage {
    pub dead_letters: Vec<ListedDeadLetter>,
    pub next_page_token: String,
}

impl Query for ListDeadLetters {
    const NAME: &'static str = "events.list_dead_letters";
    type Output = DeadLetterPage;
}

#[async_trait]
impl QueryHandler<Subscribe> for Events {
    async fn handle(&self, ctx: &QueryContext<'_>, query: Subscribe) -> Result<Live<mpsc::Receiver<Result<Item>>>> {
        let principal = ctx.request.principal()?.clone();
        subscribe::start(
            ctx.db.clone(),
            self.hub.clone(),
            self.settings.subscriptions,
            Subscription {
                topics: query.topics,
                after: query.after_sequence,
                principal,
            },
            ctx.request.access_ended(),
        )
        .await
        .map(Live)
    }
}

/// Audit pages: the filters they belong to and the last sequence seen.
#[derive(Serialize, Deserialize, PartialEq)]
struct AuditCursor {
    filters: String,
    before: u64,
}

#[async_trait]
impl QueryHandler<ListAuditEvents> for Events {
    async fn handle(&self, ctx: &QueryContext<'_>, query: ListAuditEvents) -> Result<EventPage> {
        ctx.request.require_admin()?;
        let limit = page_size_within(query.page_size, 50, 200)?;
        let filters = format!(
            "{:?}|{:?}|{:?}|{:?}",
            query.event_names, query.user_id, query.since, query.until
        );
        let cursor: Option<AuditCursor> = decode_token(&query.page_token)?;
        if cursor.as_ref().is_some_and(|cursor| cursor.filters != filters) {
            return Err(Error::invalid_field(
                "page_token",
                "belongs to a list with other filters",
            ));
        }
        let mut events = store::list_events(
            ctx.db,
            &query.event_names,
            query.user_id,
            query.since,
            query.until,
            cursor.map(|cursor| cursor.before),
            limit + 1,
        )
        .await?;
        let next_page_token = if events.len() as u64 > limit {
            events.truncate(limit as usize);
            let before = events.last().map_or(0, |event| event.sequence);
            encode_token(&AuditCursor { filters, before })?
        } else {
            String::new()
        };
        Ok(EventPage {
            events,
            next_page_token,
        })
    }
}

#[derive(Serialize, Deserialize)]
struct DeadLetterCursor {
    include_replayed: bool,
    failed_at: DateTime<Utc>,
    id: Uuid,
}

#[async_trait]
impl QueryHandler<ListDeadLetters> for Events {
    async fn handle(&self, ctx: &QueryContext<'_>, query: ListDeadLetters) -> Result<DeadLetterPage> {
        ctx.request.require_admin()?;
        let limit = page_size_within(query.page_size, 50, 200)?;
        let cursor: Option<DeadLetterCursor> = decode_token(&query.page_token)?;
        if cursor
            .as_ref()
            .is_some_and(|cursor| cursor.include_replayed != query.include_replayed)
        {
            return Err(Error::invalid_field(
                "page_token",
                "belongs to a list with other filters",
            ));
        }
        let mut dead_letters = store::list_dead_letters(
            ctx.db,
            query.include_replayed,
            cursor.map(|cursor| (cursor.failed_at, cursor.id)),
            limit + 1,
        )
        .await?;
        let next_page_token = if dead_letters.len() as u64 > limit {
            dead_letters.truncate(limit as usize);
            match dead_letters.last() {
                Some(last) => encode_token(&DeadLetterCursor {
                    include_replayed: query.include_replayed,
                    failed_at: last.letter.failed_at,
                    id: last.letter.id,
                })?,
                None => String::new(),
            }
        } else {
            String::new()
        };
        Ok(DeadLetterPage {
            dead_letters,
            next_page_token,
        })
    }
}
