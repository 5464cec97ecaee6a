//! Thin tonic adapters of `JobsCommandService` and `JobsQueryService`:
//! proto -> command or query -> bus -> proto.

use std::pin::Pin;

use chrono::{DateTime, Utc};
use futures::Stream;
use keel_kernel::grpc::{GrpcRoutes, checked, context, timestamp};
use keel_kernel::{Bus, Error, Live, id::parse_id};
use keel_proto::jobs as pb;
use keel_proto::jobs::jobs_command_service_server::{JobsCommandService, JobsCommandServiceServer};
use keel_proto::jobs::jobs_query_service_server::{JobsQueryService, JobsQueryServiceServer};
use tokio_stream::StreamExt;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};

use crate::commands::{CancelJob, DeleteJob, EnqueueJob, RetryJob, SetQueuePaused};
use crate::model::{JobRecord, JobState, QueueStats};
use crate::queries::{GetJob, GetQueueStats, ListJobs, WatchJob};

pub struct QueryApi {
    bus: Bus,
}

pub struct CommandApi {
    bus: Bus,
}

/// The full names of the module's services.
pub const SERVICES: &[&str] = &[
    <JobsCommandServiceServer<CommandApi> as tonic::server::NamedService>::NAME,
    <JobsQueryServiceServer<QueryApi> as tonic::server::NamedService>::NAME,
];

/// Adds the module's two services, with the server's limits and compression.
pub fn add_services(bus: &Bus, routes: &mut GrpcRoutes) {
    let limits = routes.limits();
    routes
        .add(keel_kernel::grpc_server!(
            JobsCommandServiceServer::new(CommandApi { bus: bus.clone() }),
            limits
        ))
        .add(keel_kernel::grpc_server!(
            JobsQueryServiceServer::new(QueryApi { bus: bus.clone() }),
            limits
        ));
}

fn state_to_proto(state: JobState) -> pb::JobState {
    match state {
        JobState::Available => pb::JobState::Available,
        JobState::Running => pb::JobState::Running,
        JobState::Completed => pb::JobState::Completed,
        JobState::Failed => pb::JobState::Failed,
        JobState::Cancelled => pb::JobState::Cancelled,
    }
}

fn state_from_proto(value: i32) -> Result<Option<JobState>, Error> {
    let invalid = || Error::invalid_field("state", "is not a job state");
    Ok(match pb::JobState::try_from(value).map_err(|_| invalid())? {
        pb::JobState::Unspecified => None,
        pb::JobState::Available => Some(JobState::Available),
        pb::JobState::Running => Some(JobState::Running),
        pb::JobState::Completed => Some(JobState::Completed),
        pb::JobState::Failed => Some(JobState::Failed),
        pb::JobState::Cancelled => Some(JobState::Cancelled),
    })
}

/// JSON as a `google.protobuf.Value`.
pub fn json_to_value(json: &serde_json::Value) -> prost_types::Value {
    use prost_types::value::Kind;
    let kind = match json {
        serde_json::Value::Null => Kind::NullValue(0),
        serde_json::Value::Bool(value) => Kind::BoolValue(*value),
        serde_json::Value::Number(number) => Kind::NumberValue(number.as_f64().unwrap_or_default()),
        serde_json::Value::String(value) => Kind::StringValue(value.clone()),
        serde_json::Value::Array(values) => Kind::ListValue(prost_types::ListValue {
            values: values.iter().map(json_to_value).collect(),
        }),
        serde_json::Value::Object(map) => Kind::StructValue(json_to_struct(map)),
    };
    prost_types::Value { kind: Some(kind) }
}

fn json_to_struct(map: &serde_json::Map<String, serde_json::Value>) -> prost_types::Struct {
    prost_types::Struct {
        fields: map
            .iter()
            .map(|(key, value)| (key.clone(), json_to_value(value)))
            .collect(),
    }
}

/// A `google.protobuf.Value` as JSON; whole numbers come back as integers
/// (a `Value` has only doubles), so `{"steps": 3}` parses as a `u32` again.
pub fn value_to_json(value: &prost_types::Value) -> serde_json::Value {
    use prost_types::value::Kind;
    match &value.kind {
        None | Some(Kind::NullValue(_)) => serde_json::Value::Null,
        Some(Kind::BoolValue(value)) => serde_json::Value::Bool(*value),
        Some(Kind::NumberValue(number)) => {
            if number.fract() == 0.0 && number.abs() < 9.0e15 {
                serde_json::Value::from(*number as i64)
            } else {
                serde_json::Number::from_f64(*number).map_or(serde_json::Value::Null, serde_json::Value::Number)
            }
        }
        Some(Kind::StringValue(value)) => serde_json::Value::String(value.clone()),
        Some(Kind::ListValue(list)) => serde_json::Value::Array(list.values.iter().map(value_to_json).collect()),
        Some(Kind::StructValue(fields)) => struct_to_json(fields),
    }
}

fn struct_to_json(fields: &prost_types::Struct) -> serde_json::Value {
    serde_json::Value::Object(
        fields
            .fields
            .iter()
            .map(|(key, value)| (key.clone(), value_to_json(value)))
            .collect(),
    )
}

/// The protobuf form of a job.
pub fn job_to_proto(job: &JobRecord) -> pb::Job {
    pb::Job {
        id: job.id.to_string(),
        queue: job.queue.clone(),
        kind: job.kind.clone(),
        args: match &job.args {
            serde_json::Value::Object(map) => Some(json_to_struct(map)),
            _ => None,
        },
        state: state_to_proto(job.state) as i32,
        priority: i32::from(job.priority),
        run_at: Some(timestamp(job.run_at)),
        attempt: job.attempt,
        max_attempts: job.max_attempts,
        errors: job
            .errors
            .iter()
            .map(|error| pb::AttemptError {
                attempt: error.attempt,
                at: Some(timestamp(error.at)),
                message: error.message.clone(),
            })
            .collect(),
        user_id: job.user_id.map(|id| id.to_string()).unwrap_or_default(),
        created_at: Some(timestamp(job.created_at)),
        updated_at: Some(timestamp(job.updated_at)),
        finished_at: job.finished_at.map(timestamp),
        progress: job.progress.as_ref().map(|progress| pb::JobProgress {
            percent: u32::from(progress.percent),
            message: progress.message.clone(),
        }),
        result: job.result.as_ref().map(json_to_value),
        attempted_at: job.attempted_at.map(timestamp),
    }
}

fn stats_to_proto(stats: &QueueStats) -> pb::QueueStats {
    pb::QueueStats {
        queue: stats.queue.clone(),
        available: stats.available,
        depth: stats.depth,
        oldest_waiting_age: Some(prost_types::Duration {
            seconds: stats.oldest_waiting.map_or(0, |age| age.as_secs() as i64),
            nanos: stats.oldest_waiting.map_or(0, |age| age.subsec_nanos() as i32),
        }),
        running: stats.running,
        failed: stats.failed,
        completed_last_minute: stats.completed_last_minute,
        paused: stats.paused,
    }
}

fn time(field: &str, value: Option<prost_types::Timestamp>) -> Result<Option<DateTime<Utc>>, Error> {
    value
        .map(|value| {
            // Years 1 to 9999 (what RFC 3339, and so REST, can say; the
            // databases take them all) and nanos of one second.
            let seconds = -62_135_596_800..=253_402_300_799;
            let nanos = 0..1_000_000_000;
            if !seconds.contains(&value.seconds) || !nanos.contains(&value.nanos) {
                return Err(Error::invalid_field(field, "is out of range (years 1 to 9999)"));
            }
            DateTime::from_timestamp(value.seconds, value.nanos as u32)
                .ok_or_else(|| Error::invalid_field(field, "is out of range"))
        })
        .transpose()
}

fn non_empty(value: String) -> Option<String> {
    (!value.is_empty()).then_some(value)
}

type WatchJobStream = Pin<Box<dyn Stream<Item = Result<pb::WatchJobResponse, Status>> + Send>>;

#[tonic::async_trait]
impl JobsQueryService for QueryApi {
    type WatchJobStream = WatchJobStream;

    async fn get_job(&self, request: Request<pb::GetJobRequest>) -> Result<Response<pb::GetJobResponse>, Status> {
        let ctx = context(&request);
        checked(request.get_ref())?;
        let id = parse_id("id", &request.get_ref().id)?;
        let job = self.bus.ask(&ctx, GetJob { id }).await?;
        Ok(Response::new(pb::GetJobResponse {
            job: Some(job_to_proto(&job)),
        }))
    }

    async fn list_jobs(&self, request: Request<pb::ListJobsRequest>) -> Result<Response<pb::ListJobsResponse>, Status> {
        let ctx = context(&request);
        checked(request.get_ref())?;
        let request = request.into_inner();
        let page = self
            .bus
            .ask(
                &ctx,
                ListJobs {
                    page_size: request.page_size,
                    page_token: request.page_token,
                    queue: non_empty(request.queue),
                    kind: non_empty(request.kind),
                    state: state_from_proto(request.state)?,
                    created_after: time("created_after", request.created_after)?,
                    created_before: time("created_before", request.created_before)?,
                },
            )
            .await?;
        Ok(Response::new(pb::ListJobsResponse {
            jobs: page.jobs.iter().map(job_to_proto).collect(),
            next_page_token: page.next_page_token,
        }))
    }

    async fn get_queue_stats(
        &self,
        request: Request<pb::GetQueueStatsRequest>,
    ) -> Result<Response<pb::GetQueueStatsResponse>, Status> {
        let ctx = context(&request);
        checked(request.get_ref())?;
        let overview = self.bus.ask(&ctx, GetQueueStats).await?;
        Ok(Response::new(pb::GetQueueStatsResponse {
            queues: overview.queues.iter().map(stats_to_proto).collect(),
            breakers: overview.breakers.iter().map(breaker_to_proto).collect(),
        }))
    }

    async fn watch_job(&self, request: Request<pb::WatchJobRequest>) -> Result<Response<WatchJobStream>, Status> {
        let ctx = context(&request);
        checked(request.get_ref())?;
        let id = parse_id("id", &request.get_ref().id)?;
        let Live(receiver) = self.bus.ask(&ctx, WatchJob { id }).await?;
        let stream = ReceiverStream::new(receiver).map(|item| match item {
            Ok(job) => Ok(pb::WatchJobResponse {
                job: Some(job_to_proto(&job)),
            }),
            Err(error) => Err(Status::from(error)),
        });
        Ok(Response::new(Box::pin(stream)))
    }
}

#[tonic::async_trait]
impl JobsCommandService for CommandApi {
    async fn enqueue_job(
        &self,
        request: Request<pb::EnqueueJobRequest>,
    ) -> Result<Response<pb::EnqueueJobResponse>, Status> {
        let ctx = context(&request);
        checked(request.get_ref())?;
        let request = request.into_inner();
        let user_id = match request.user_id.as_str() {
            "" => None,
            id => Some(parse_id("user_id", id)?),
        };
        let command = EnqueueJob {
            kind: request.kind,
            args: request
                .args
                .as_ref()
                .map_or_else(|| serde_json::json!({}), struct_to_json),
            priority: i16::try_from(request.priority)
                .map_err(|_| Error::invalid_field("priority", "must be within -32768..32767"))?,
            run_at: time("run_at", request.run_at)?,
            max_attempts: request.max_attempts,
            user_id,
        };
        let job = self.bus.execute(&ctx, command).await?;
        Ok(Response::new(pb::EnqueueJobResponse {
            job: Some(job_to_proto(&job)),
        }))
    }

    async fn cancel_job(
        &self,
        request: Request<pb::CancelJobRequest>,
    ) -> Result<Response<pb::CancelJobResponse>, Status> {
        let ctx = context(&request);
        checked(request.get_ref())?;
        let id = parse_id("id", &request.get_ref().id)?;
        let job = self.bus.execute(&ctx, CancelJob { id }).await?;
        Ok(Response::new(pb::CancelJobResponse {
            job: Some(job_to_proto(&job)),
        }))
    }

    async fn retry_job(&self, request: Request<pb::RetryJobRequest>) -> Result<Response<pb::RetryJobResponse>, Status> {
        let ctx = context(&request);
        checked(request.get_ref())?;
        let id = parse_id("id", &request.get_ref().id)?;
        let job = self.bus.execute(&ctx, RetryJob { id }).await?;
        Ok(Response::new(pb::RetryJobResponse {
            job: Some(job_to_proto(&job)),
        }))
    }

    async fn delete_job(
        &self,
        request: Request<pb::DeleteJobRequest>,
    ) -> Result<Response<pb::DeleteJobResponse>, Status> {
        let ctx = context(&request);
        checked(request.get_ref())?;
        let id = parse_id("id", &request.get_ref().id)?;
        self.bus.execute(&ctx, DeleteJob { id }).await?;
        Ok(Response::new(pb::DeleteJobResponse {}))
    }

    async fn pause_queue(
        &self,
        request: Request<pb::PauseQueueRequest>,
    ) -> Result<Response<pb::PauseQueueResponse>, Status> {
        let ctx = context(&request);
        checked(request.get_ref())?;
        let queue = request.into_inner().queue;
        let stats = self.bus.execute(&ctx, SetQueuePaused { queue, paused: true }).await?;
        Ok(Response::new(pb::PauseQueueResponse {
            stats: Some(stats_to_proto(&stats)),
        }))
    }

    async fn resume_queue(
        &self,
        request: Request<pb::ResumeQueueRequest>,
    ) -> Result<Response<pb::ResumeQueueResponse>, Status> {
        let ctx = context(&request);
        checked(request.get_ref())?;
        let queue = request.into_inner().queue;
        let stats = self.bus.execute(&ctx, SetQueuePaused { queue, paused: false }).await?;
        Ok(Response::new(pb::ResumeQueueResponse {
            stats: Some(stats_to_proto(&stats)),
        }))
    }
}

fn breaker_to_proto(breaker: &crate::model::BreakerStats) -> pb::CircuitBreaker {
    let state = match breaker.state.as_str() {
        "closed" => pb::CircuitState::Closed,
        "open" => pb::CircuitState::Open,
        "half_open" => pb::CircuitState::HalfOpen,
        _ => pb::CircuitState::Unspecified,
    };
    pb::CircuitBreaker {
        target: breaker.target.clone(),
        state: state.into(),
        consecutive_failures: breaker.consecutive_failures,
        opened_total: breaker.opened_total,
        rejected_total: breaker.rejected_total,
        half_open_in: breaker.half_open_in.map(|wait| prost_types::Duration {
            seconds: i64::try_from(wait.as_secs()).unwrap_or(i64::MAX),
            nanos: i32::try_from(wait.subsec_nanos()).unwrap_or(0),
        }),
    }
}
