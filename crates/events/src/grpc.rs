//! Thin tonic adapters of `EventQueryService` and `EventCommandService`.

use std::pin::Pin;

use futures::Stream;
use keel_kernel::grpc::{GrpcRoutes, checked, context, timestamp};
use keel_kernel::{Bus, Envelope, Error, Live, id::parse_id};
use keel_proto::events as pb;
use keel_proto::events::event_command_service_server::{EventCommandService, EventCommandServiceServer};
use keel_proto::events::event_query_service_server::{EventQueryService, EventQueryServiceServer};
use tokio_stream::StreamExt;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};

use crate::commands::ReplayDeadLetter;
use crate::queries::{ListAuditEvents, ListDeadLetters, Subscribe};
use crate::subscribe::Item;
use crate::tickets::CreateStreamTicket;

pub struct QueryApi {
    bus: Bus,
}

pub struct CommandApi {
    bus: Bus,
}

/// The full names of the events module's gRPC services.
pub const SERVICES: &[&str] = &[
    <EventCommandServiceServer<CommandApi> as tonic::server::NamedService>::NAME,
    <EventQueryServiceServer<QueryApi> as tonic::server::NamedService>::NAME,
];

/// Adds the events module's two gRPC services, with the server's limits and compression.
pub fn add_services(bus: &Bus, routes: &mut GrpcRoutes) {
    let limits = routes.limits();
    routes
        .add(keel_kernel::grpc_server!(
            EventCommandServiceServer::new(CommandApi { bus: bus.clone() }),
            limits
        ))
        .add(keel_kernel::grpc_server!(
            EventQueryServiceServer::new(QueryApi { bus: bus.clone() }),
            limits
        ));
}

/// The protobuf form of an envelope; the payload is an `Any`.
pub fn event_to_proto(event: &Envelope) -> pb::Event {
    pb::Event {
        event_id: event.event_id.to_string(),
        event_name: event.name.clone(),
        event_version: event.version.clone(),
        occurred_at: Some(timestamp(event.occurred_at)),
        sequence: event.sequence,
        user_id: event.user_id.map(|id| id.to_string()).unwrap_or_default(),
        aggregate_id: event.aggregate_id.clone(),
        payload: Some(prost_types::Any {
            type_url: format!("type.googleapis.com/{}", event.payload_type),
            value: event.payload.clone(),
        }),
        idempotency_key: event.idempotency_key.clone().unwrap_or_default(),
    }
}

fn time(
    field: &str,
    value: Option<prost_types::Timestamp>,
) -> keel_kernel::Result<Option<chrono::DateTime<chrono::Utc>>> {
    value
        .map(|value| {
            chrono::DateTime::from_timestamp(value.seconds, value.nanos.max(0) as u32)
                .ok_or_else(|| Error::invalid_field(field, "is out of range"))
        })
        .transpose()
}

type SubscribeStream = Pin<Box<dyn Stream<Item = Result<pb::SubscribeResponse, Status>> + Send>>;

#[tonic::async_trait]
impl EventQueryService for QueryApi {
    type SubscribeStream = SubscribeStream;

    async fn subscribe(&self, request: Request<pb::SubscribeRequest>) -> Result<Response<SubscribeStream>, Status> {
        let ctx = context(&request);
        checked(request.get_ref())?;
        // SSE clients reconnect with `Last-Event-ID`; it wins over the field.
        let resume = match request.metadata().get("last-event-id") {
            Some(value) => Some(
                value
                    .to_str()
                    .ok()
                    .and_then(|value| value.trim().parse::<u64>().ok())
                    .ok_or_else(|| Error::invalid_field("last-event-id", "must be a sequence number"))?,
            ),
            None => None,
        };
        let request = request.into_inner();
        let Live(receiver) = self
            .bus
            .ask(
                &ctx,
                Subscribe {
                    topics: request.topics,
                    after_sequence: resume.unwrap_or(request.after_sequence),
                },
            )
            .await?;
        let stream = ReceiverStream::new(receiver).map(|item| match item {
            Ok(Item::Event(event)) => Ok(pb::SubscribeResponse {
                sequence: event.sequence,
                kind: Some(pb::subscribe_response::Kind::Event(event_to_proto(&event))),
            }),
            Ok(Item::Heartbeat { cursor }) => Ok(pb::SubscribeResponse {
                sequence: 0,
                kind: Some(pb::subscribe_response::Kind::Heartbeat(pb::Heartbeat {
                    at: Some(timestamp(keel_kernel::clock::now())),
                    latest_sequence: cursor,
                })),
            }),
            Err(error) => Err(Status::from(error)),
        });
        Ok(Response::new(Box::pin(stream)))
    }

    async fn list_audit_events(
        &self,
        request: Request<pb::ListAuditEventsRequest>,
    ) -> Result<Response<pb::ListAuditEventsResponse>, Status> {
        let ctx = context(&request);
        checked(request.get_ref())?;
        let request = request.into_inner();
        let user_id = if request.user_id.is_empty() {
            None
        } else {
            Some(parse_id("user_id", &request.user_id)?)
        };
        let page = self
            .bus
            .ask(
                &ctx,
                ListAuditEvents {
                    page_size: request.page_size,
                    page_token: request.page_token,
                    event_names: request.event_names,
                    user_id,
                    since: time("since", request.since)?,
                    until: time("until", request.until)?,
                },
            )
            .await?;
        Ok(Response::new(pb::ListAuditEventsResponse {
            events: page.events.iter().map(event_to_proto).collect(),
            next_page_token: page.next_page_token,
        }))
    }

    async fn list_dead_letters(
        &self,
        request: Request<pb::ListDeadLettersRequest>,
    ) -> Result<Response<pb::ListDeadLettersResponse>, Status> {
        let ctx = context(&request);
        checked(request.get_ref())?;
        let request = request.into_inner();
        let page = self
            .bus
            .ask(
                &ctx,
                ListDeadLetters {
                    page_size: request.page_size,
                    page_token: request.page_token,
                    include_replayed: request.include_replayed,
                },
            )
            .await?;
        Ok(Response::new(pb::ListDeadLettersResponse {
            dead_letters: page
                .dead_letters
                .iter()
                .map(|listed| pb::DeadLetter {
                    id: listed.letter.id.to_string(),
                    handler: listed.letter.handler.clone(),
                    event: listed.event.as_ref().map(event_to_proto),
                    attempts: i32::try_from(listed.letter.attempts).unwrap_or(i32::MAX),
                    last_error: listed.letter.last_error.clone(),
                    failed_at: Some(timestamp(listed.letter.failed_at)),
                    replayed_at: listed.letter.replayed_at.map(timestamp),
                })
                .collect(),
            next_page_token: page.next_page_token,
        }))
    }
}

#[tonic::async_trait]
impl EventCommandService for CommandApi {
    async fn replay_dead_letter(
        &self,
        request: Request<pb::ReplayDeadLetterRequest>,
    ) -> Result<Response<pb::ReplayDeadLetterResponse>, Status> {
        let ctx = context(&request);
        checked(request.get_ref())?;
        let id = parse_id("id", &request.get_ref().id)?;
        self.bus.execute(&ctx, ReplayDeadLetter { id }).await?;
        Ok(Response::new(pb::ReplayDeadLetterResponse {}))
    }

    async fn create_stream_ticket(
        &self,
        request: Request<pb::CreateStreamTicketRequest>,
    ) -> Result<Response<pb::CreateStreamTicketResponse>, Status> {
        let ctx = context(&request);
        checked(request.get_ref())?;
        let issued = self.bus.execute(&ctx, CreateStreamTicket).await?;
        Ok(Response::new(pb::CreateStreamTicketResponse {
            ticket: issued.ticket.expose().clone(),
            first_use_by: Some(timestamp(issued.first_use_by)),
            valid_until: Some(timestamp(issued.valid_until)),
        }))
    }
}
