//! The jobs module's admin API through a real keel, on SQLite and
//! PostgreSQL: visibility (user B never sees, watches or cancels A's job),
//! lists with filters and cursor pages, cancellation of waiting and running
//! jobs (a handler that ignores it is dropped), progress watched live over
//! gRPC, grpc-web and SSE, retry of a failed job, pause and resume of a
//! queue (across two processes on PostgreSQL), queue statistics, and bad
//! input refused with INVALID_ARGUMENT.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use keel_proto::jobs as pb;
use keel_proto::jobs::jobs_command_service_client::JobsCommandServiceClient;
use keel_proto::jobs::jobs_query_service_client::JobsQueryServiceClient;
use keel_testkit::{Backend, TestApp, authed, spawn_app_with};
use tonic::Code;
use tonic::transport::Channel;

const DEADLINE: Duration = Duration::from_secs(30);

async fn spawn(backend: Backend) -> TestApp {
    spawn_app_with(backend, |config| {
        // A cancelled handler that ignores the signal is dropped quickly.
        config.jobs_cancel_grace_ms = 300;
        // No safety-net poll stands in for a missing wake-up.
        config.jobs_poll_ms = 3_600_000;
    })
    .await
}

struct Clients {
    commands: JobsCommandServiceClient<Channel>,
    queries: JobsQueryServiceClient<Channel>,
}

async fn clients(app: &TestApp) -> Clients {
    let channel = app.channel().await;
    Clients {
        commands: JobsCommandServiceClient::new(channel.clone()),
        queries: JobsQueryServiceClient::new(channel),
    }
}

fn args(json: serde_json::Value) -> Option<prost_types::Struct> {
    let serde_json::Value::Object(map) = json else {
        panic!("args must be an object")
    };
    Some(prost_types::Struct {
        fields: map
            .into_iter()
            .map(|(key, value)| (key, keel_jobs::grpc::json_to_value(&value)))
            .collect(),
    })
}

fn later(seconds: i64) -> prost_types::Timestamp {
    keel_kernel::grpc::timestamp(chrono::Utc::now() + chrono::Duration::seconds(seconds))
}

/// Enqueues a `jobs.noop` as the admin.
async fn enqueue(app: &TestApp, admin: &str, request: pb::EnqueueJobRequest) -> pb::Job {
    clients(app)
        .await
        .commands
        .enqueue_job(authed(
            pb::EnqueueJobRequest {
                kind: "jobs.noop".to_owned(),
                ..request
            },
            admin,
        ))
        .await
        .unwrap()
        .into_inner()
        .job
        .unwrap()
}

async fn get(app: &TestApp, token: &str, id: &str) -> Result<pb::Job, tonic::Status> {
    clients(app)
        .await
        .queries
        .get_job(authed(pb::GetJobRequest { id: id.to_owned() }, token))
        .await
        .map(|response| response.into_inner().job.unwrap())
}

/// Reads the job until `done` holds, within [`DEADLINE`].
async fn until(app: &TestApp, token: &str, id: &str, what: &str, done: impl Fn(&pb::Job) -> bool) -> pb::Job {
    let deadline = tokio::time::Instant::now() + DEADLINE;
    loop {
        let job = get(app, token, id).await.unwrap();
        if done(&job) {
            return job;
        }
        assert!(tokio::time::Instant::now() < deadline, "the job never {what}: {job:#?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn state(job: &pb::Job) -> pb::JobState {
    pb::JobState::try_from(job.state).unwrap()
}

async fn list(app: &TestApp, token: &str, request: pb::ListJobsRequest) -> Result<pb::ListJobsResponse, tonic::Status> {
    clients(app)
        .await
        .queries
        .list_jobs(authed(request, token))
        .await
        .map(tonic::Response::into_inner)
}

async fn users_never_see_watch_or_cancel_each_others_jobs(app: TestApp) {
    let (_, admin) = app.admin("root@example.com").await;
    let (ada_user, ada_tokens) = app.signed_in("ada@example.com").await;
    let (_, bob_tokens) = app.signed_in("bob@example.com").await;
    let (ada, bob, admin) = (ada_tokens.access_token, bob_tokens.access_token, admin.access_token);
    let adas = enqueue(
        &app,
        &admin,
        pb::EnqueueJobRequest {
            user_id: ada_user.id.clone(),
            run_at: Some(later(3600)),
            ..Default::default()
        },
    )
    .await;
    let nobodys = enqueue(
        &app,
        &admin,
        pb::EnqueueJobRequest {
            run_at: Some(later(3600)),
            ..Default::default()
        },
    )
    .await;
    assert!(nobodys.user_id.is_empty());
    assert_eq!(get(&app, &ada, &adas.id).await.unwrap().id, adas.id);
    assert_eq!(get(&app, &admin, &adas.id).await.unwrap().id, adas.id);
    assert_eq!(get(&app, &admin, &nobodys.id).await.unwrap().id, nobodys.id);
    // Bob: NOT_FOUND for Ada's job, exactly as for one that does not exist.
    for (token, id, who) in [
        (&bob, &adas.id, "bob, ada's"),
        (&ada, &nobodys.id, "ada, nobody's"),
        (&bob, &nobodys.id, "bob, nobody's"),
    ] {
        assert_eq!(get(&app, token, id).await.unwrap_err().code(), Code::NotFound, "{who}");
        let watched = clients(&app)
            .await
            .queries
            .watch_job(authed(pb::WatchJobRequest { id: id.clone() }, token))
            .await;
        assert_eq!(
            watched.err().map(|status| status.code()),
            Some(Code::NotFound),
            "{who} watched"
        );
        let cancelled = clients(&app)
            .await
            .commands
            .cancel_job(authed(pb::CancelJobRequest { id: id.clone() }, token))
            .await;
        assert_eq!(
            cancelled.err().map(|status| status.code()),
            Some(Code::NotFound),
            "{who} cancelled"
        );
    }
    let missing = uuid::Uuid::now_v7().to_string();
    assert_eq!(get(&app, &bob, &missing).await.unwrap_err().code(), Code::NotFound);
    // Lists: each user their own; the admin every job.
    assert_eq!(list(&app, &ada, Default::default()).await.unwrap().jobs.len(), 1);
    assert!(list(&app, &bob, Default::default()).await.unwrap().jobs.is_empty());
    assert_eq!(list(&app, &admin, Default::default()).await.unwrap().jobs.len(), 2);
    // The job is still waiting: Bob's cancel changed nothing; Ada may cancel it.
    assert_eq!(
        state(&get(&app, &ada, &adas.id).await.unwrap()),
        pb::JobState::Available
    );
    let cancelled = clients(&app)
        .await
        .commands
        .cancel_job(authed(pb::CancelJobRequest { id: adas.id.clone() }, &ada))
        .await
        .unwrap()
        .into_inner()
        .job
        .unwrap();
    assert_eq!(state(&cancelled), pb::JobState::Cancelled);
}

async fn admins_list_with_filters_and_cursor_pages(app: TestApp) {
    let (_, admin) = app.admin("root@example.com").await;
    let admin = admin.access_token;
    let before = keel_kernel::grpc::timestamp(chrono::Utc::now() - chrono::Duration::seconds(1));
    let mut ids = Vec::new();
    for _ in 0..5 {
        ids.push(
            enqueue(
                &app,
                &admin,
                pb::EnqueueJobRequest {
                    run_at: Some(later(3600)),
                    ..Default::default()
                },
            )
            .await
            .id,
        );
    }
    clients(&app)
        .await
        .commands
        .cancel_job(authed(pb::CancelJobRequest { id: ids[1].clone() }, &admin))
        .await
        .unwrap();
    // Pages of two, newest first, every job once.
    let mut seen = Vec::new();
    let mut token = String::new();
    let mut pages = 0;
    loop {
        let page = list(
            &app,
            &admin,
            pb::ListJobsRequest {
                page_size: 2,
                page_token: token.clone(),
                queue: "default".to_owned(),
                ..Default::default()
            },
        )
        .await
        .unwrap();
        pages += 1;
        assert!(page.jobs.len() <= 2);
        seen.extend(page.jobs.into_iter().map(|job| job.id));
        if page.next_page_token.is_empty() {
            break;
        }
        token = page.next_page_token;
    }
    let newest_first: Vec<String> = ids.iter().rev().cloned().collect();
    assert_eq!(seen, newest_first);
    assert_eq!(pages, 3);
    let only = |state: pb::JobState| pb::ListJobsRequest {
        state: state as i32,
        ..Default::default()
    };
    let cancelled = list(&app, &admin, only(pb::JobState::Cancelled)).await.unwrap().jobs;
    assert_eq!(
        cancelled.iter().map(|job| job.id.clone()).collect::<Vec<_>>(),
        vec![ids[1].clone()]
    );
    assert_eq!(
        list(&app, &admin, only(pb::JobState::Available))
            .await
            .unwrap()
            .jobs
            .len(),
        4
    );
    let by_kind = |kind: &str| pb::ListJobsRequest {
        kind: kind.to_owned(),
        ..Default::default()
    };
    assert_eq!(list(&app, &admin, by_kind("jobs.noop")).await.unwrap().jobs.len(), 5);
    assert!(list(&app, &admin, by_kind("other.kind")).await.unwrap().jobs.is_empty());
    let in_time = |after: Option<prost_types::Timestamp>, before: Option<prost_types::Timestamp>| pb::ListJobsRequest {
        created_after: after,
        created_before: before,
        ..Default::default()
    };
    assert_eq!(
        list(&app, &admin, in_time(Some(before), None))
            .await
            .unwrap()
            .jobs
            .len(),
        5
    );
    assert!(
        list(&app, &admin, in_time(Some(later(60)), None))
            .await
            .unwrap()
            .jobs
            .is_empty()
    );
    assert!(
        list(&app, &admin, in_time(None, Some(before)))
            .await
            .unwrap()
            .jobs
            .is_empty()
    );
    // A page token of another list is refused, not a wrong page.
    let first = list(
        &app,
        &admin,
        pb::ListJobsRequest {
            page_size: 2,
            ..Default::default()
        },
    )
    .await
    .unwrap();
    let reused = list(
        &app,
        &admin,
        pb::ListJobsRequest {
            page_size: 2,
            page_token: first.next_page_token,
            kind: "jobs.noop".to_owned(),
            ..Default::default()
        },
    )
    .await;
    assert_eq!(reused.unwrap_err().code(), Code::InvalidArgument);
}

async fn cancelling_stops_waiting_and_running_jobs(app: TestApp) {
    let (_, admin) = app.admin("root@example.com").await;
    let admin = admin.access_token;
    let cancel = |id: String| {
        let app = &app;
        let admin = admin.clone();
        async move {
            clients(app)
                .await
                .commands
                .cancel_job(authed(pb::CancelJobRequest { id }, &admin))
                .await
        }
    };
    // Waiting: cancelled at once, never run.
    let waiting = enqueue(
        &app,
        &admin,
        pb::EnqueueJobRequest {
            run_at: Some(later(3600)),
            ..Default::default()
        },
    )
    .await;
    let job = cancel(waiting.id.clone()).await.unwrap().into_inner().job.unwrap();
    assert_eq!(state(&job), pb::JobState::Cancelled);
    assert!(job.finished_at.is_some());
    assert_eq!(job.attempt, 0);
    // A finished job cannot be cancelled again.
    assert_eq!(
        cancel(waiting.id.clone()).await.unwrap_err().code(),
        Code::FailedPrecondition
    );

    // Running, cooperative: it stops at the signal, between two steps.
    let cooperative = enqueue(
        &app,
        &admin,
        pb::EnqueueJobRequest {
            args: args(serde_json::json!({"steps": 1000, "step_ms": 20})),
            ..Default::default()
        },
    )
    .await;
    until(&app, &admin, &cooperative.id, "reported progress", |job| {
        job.progress.is_some()
    })
    .await;
    let job = cancel(cooperative.id.clone()).await.unwrap().into_inner().job.unwrap();
    assert_eq!(state(&job), pb::JobState::Cancelled);
    let percent = job.progress.as_ref().map(|progress| progress.percent);
    // Its handler heard it: no progress is stored after the cancellation
    // (the fence refuses it), and the job stays cancelled.
    let after = until(&app, &admin, &cooperative.id, "stayed cancelled", |_| true).await;
    assert_eq!(state(&after), pb::JobState::Cancelled);
    assert!(after.progress.as_ref().map(|progress| progress.percent) <= percent.max(Some(100)));

    // Running, ignoring the signal (a long sleep): dropped after the grace,
    // the job ends cancelled and its slot runs the next job.
    let stubborn = enqueue(
        &app,
        &admin,
        pb::EnqueueJobRequest {
            args: args(serde_json::json!({"sleep_ms": 600_000})),
            ..Default::default()
        },
    )
    .await;
    until(&app, &admin, &stubborn.id, "started", |job| {
        state(job) == pb::JobState::Running
    })
    .await;
    cancel(stubborn.id.clone()).await.unwrap();
    let job = get(&app, &admin, &stubborn.id).await.unwrap();
    assert_eq!(state(&job), pb::JobState::Cancelled);
    assert!(job.result.is_none());
}

async fn a_dropped_handler_frees_its_slot(backend: Backend) {
    let app = spawn_app_with(backend, |config| {
        config.jobs_cancel_grace_ms = 200;
        config.jobs_concurrency = 1;
        config.jobs_poll_ms = 3_600_000;
    })
    .await;
    let (_, admin) = app.admin("root@example.com").await;
    let admin = admin.access_token;
    let stubborn = enqueue(
        &app,
        &admin,
        pb::EnqueueJobRequest {
            args: args(serde_json::json!({"sleep_ms": 600_000})),
            ..Default::default()
        },
    )
    .await;
    until(&app, &admin, &stubborn.id, "started", |job| {
        state(job) == pb::JobState::Running
    })
    .await;
    let next = enqueue(&app, &admin, pb::EnqueueJobRequest::default()).await;
    clients(&app)
        .await
        .commands
        .cancel_job(authed(
            pb::CancelJobRequest {
                id: stubborn.id.clone(),
            },
            &admin,
        ))
        .await
        .unwrap();
    // The only slot was the stubborn job's: the next one runs only once it
    // was dropped.
    until(&app, &admin, &next.id, "completed", |job| {
        state(job) == pb::JobState::Completed
    })
    .await;
    assert_eq!(
        state(&get(&app, &admin, &stubborn.id).await.unwrap()),
        pb::JobState::Cancelled
    );
}

#[derive(Debug, Clone, Copy)]
enum Protocol {
    Grpc,
    GrpcWeb,
    Sse,
}

/// Watches `id` until it ends; every message's (state, percent).
async fn watch(
    app: &TestApp,
    protocol: Protocol,
    token: &str,
    id: &str,
) -> Vec<(pb::JobState, Option<u32>, Option<pb::Job>)> {
    let request = authed(pb::WatchJobRequest { id: id.to_owned() }, token);
    let mut seen = Vec::new();
    let read = async {
        match protocol {
            Protocol::Grpc | Protocol::GrpcWeb => {
                let mut stream = match protocol {
                    Protocol::Grpc => {
                        JobsQueryServiceClient::new(app.channel().await)
                            .watch_job(request)
                            .await
                    }
                    _ => JobsQueryServiceClient::new(app.grpc_web()).watch_job(request).await,
                }
                .unwrap()
                .into_inner();
                while let Some(message) = stream.message().await.unwrap() {
                    let job = message.job.unwrap();
                    seen.push((
                        state(&job),
                        job.progress.as_ref().map(|progress| progress.percent),
                        Some(job),
                    ));
                }
            }
            Protocol::Sse => {
                let client = Client::builder(TokioExecutor::new()).build_http::<Empty<Bytes>>();
                let request = http::Request::get(format!("{}/v1/jobs/{id}:watch", app.endpoint()))
                    .header("accept", "text/event-stream")
                    .header("authorization", format!("Bearer {token}"))
                    .body(Empty::new())
                    .unwrap();
                let response = client.request(request).await.unwrap();
                assert_eq!(response.status(), 200);
                let mut body = response.into_body();
                let mut buffer = String::new();
                while let Some(frame) = body.frame().await {
                    if let Ok(data) = frame.unwrap().into_data() {
                        buffer.push_str(std::str::from_utf8(&data).unwrap());
                    }
                    while let Some(end) = buffer.find("\n\n") {
                        let block: String = buffer.drain(..end + 2).collect();
                        let Some(data) = block.lines().find_map(|line| line.strip_prefix("data: ")) else {
                            continue;
                        };
                        assert!(!block.contains("event: error"), "{block}");
                        let value: serde_json::Value = serde_json::from_str(data).unwrap();
                        let job = &value["data"]["job"];
                        let state = match job["state"].as_str().unwrap() {
                            "JOB_STATE_AVAILABLE" => pb::JobState::Available,
                            "JOB_STATE_RUNNING" => pb::JobState::Running,
                            "JOB_STATE_COMPLETED" => pb::JobState::Completed,
                            other => panic!("unexpected state {other}"),
                        };
                        let percent = job["progress"]["percent"].as_u64().map(|percent| percent as u32);
                        if state == pb::JobState::Completed {
                            // A Struct's numbers are doubles: `5` or `5.0`.
                            assert_eq!(job["result"]["steps"].as_f64(), Some(5.0), "{job}");
                        }
                        seen.push((state, percent, None));
                    }
                }
            }
        }
    };
    tokio::time::timeout(DEADLINE, read)
        .await
        .expect("the watch did not end in time");
    seen
}

async fn progress_arrives_in_order_on_every_protocol(app: TestApp) {
    let (_, admin) = app.admin("root@example.com").await;
    let (user, tokens) = app.signed_in("ada@example.com").await;
    let admin = admin.access_token;
    for protocol in [Protocol::Grpc, Protocol::GrpcWeb, Protocol::Sse] {
        // Due in a moment: the watch is open before the first step.
        let job = enqueue(
            &app,
            &admin,
            pb::EnqueueJobRequest {
                args: args(serde_json::json!({"steps": 5, "step_ms": 30})),
                run_at: Some(keel_kernel::grpc::timestamp(
                    chrono::Utc::now() + chrono::Duration::milliseconds(700),
                )),
                user_id: user.id.clone(),
                ..Default::default()
            },
        )
        .await;
        let seen = watch(&app, protocol, &tokens.access_token, &job.id).await;
        let percents: Vec<u32> =
            seen.iter()
                .filter_map(|(_, percent, _)| *percent)
                .fold(Vec::new(), |mut all, percent| {
                    if all.last() != Some(&percent) {
                        all.push(percent);
                    }
                    all
                });
        assert_eq!(percents, vec![20, 40, 60, 80, 100], "{protocol:?}: {seen:?}");
        assert_eq!(
            seen.first().map(|(state, ..)| *state),
            Some(pb::JobState::Available),
            "{protocol:?}"
        );
        assert!(
            seen.iter().any(|(state, ..)| *state == pb::JobState::Running),
            "{protocol:?}"
        );
        let (last_state, _, last) = seen.last().unwrap();
        assert_eq!(*last_state, pb::JobState::Completed, "{protocol:?}");
        if let Some(last) = last {
            let result = last.result.as_ref().map(keel_jobs::grpc::value_to_json);
            assert_eq!(result, Some(serde_json::json!({"steps": 5})), "{protocol:?}");
        }
    }
}

async fn an_admin_retry_runs_a_failed_job_again(app: TestApp) {
    let (_, admin) = app.admin("root@example.com").await;
    let admin = admin.access_token;
    let job = enqueue(
        &app,
        &admin,
        pb::EnqueueJobRequest {
            args: args(serde_json::json!({"fail": "boom"})),
            max_attempts: 1,
            ..Default::default()
        },
    )
    .await;
    let failed = until(&app, &admin, &job.id, "failed", |job| {
        state(job) == pb::JobState::Failed
    })
    .await;
    assert_eq!((failed.attempt, failed.errors.len()), (1, 1));
    // Only a failed or cancelled job may be retried.
    let waiting = enqueue(
        &app,
        &admin,
        pb::EnqueueJobRequest {
            run_at: Some(later(3600)),
            ..Default::default()
        },
    )
    .await;
    let mut commands = clients(&app).await.commands;
    let refused = commands
        .retry_job(authed(pb::RetryJobRequest { id: waiting.id.clone() }, &admin))
        .await;
    assert_eq!(refused.unwrap_err().code(), Code::FailedPrecondition);
    let retried = commands
        .retry_job(authed(pb::RetryJobRequest { id: job.id.clone() }, &admin))
        .await
        .unwrap()
        .into_inner()
        .job
        .unwrap();
    assert!(matches!(
        state(&retried),
        pb::JobState::Available | pb::JobState::Running
    ));
    // It ran again: a second attempt, failed again, both errors kept.
    let again = until(&app, &admin, &job.id, "ran again", |job| {
        state(job) == pb::JobState::Failed && job.attempt == 2
    })
    .await;
    assert_eq!(again.errors.len(), 2);
    // Deleting: not while running; a finished job goes.
    commands
        .delete_job(authed(pb::DeleteJobRequest { id: job.id.clone() }, &admin))
        .await
        .unwrap();
    assert_eq!(get(&app, &admin, &job.id).await.unwrap_err().code(), Code::NotFound);
}

async fn pause_and_resume(app: &TestApp, admin: &str, paused: bool) {
    let mut commands = clients(app).await.commands;
    let queue = "default".to_owned();
    let stats = if paused {
        commands
            .pause_queue(authed(pb::PauseQueueRequest { queue }, admin))
            .await
            .unwrap()
            .into_inner()
            .stats
    } else {
        commands
            .resume_queue(authed(pb::ResumeQueueRequest { queue }, admin))
            .await
            .unwrap()
            .into_inner()
            .stats
    };
    assert_eq!(stats.unwrap().paused, paused);
}

/// The job stays available for a while: no worker fetches it. An absence
/// can only be watched for a time; a second is many fetches' worth.
async fn stays_waiting(app: &TestApp, admin: &str, id: &str) {
    let until = tokio::time::Instant::now() + Duration::from_millis(1500);
    while tokio::time::Instant::now() < until {
        assert_eq!(state(&get(app, admin, id).await.unwrap()), pb::JobState::Available);
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn a_paused_queue_is_not_fetched_until_resumed(app: TestApp) {
    let (_, admin) = app.admin("root@example.com").await;
    let admin = admin.access_token;
    pause_and_resume(&app, &admin, true).await;
    let job = enqueue(&app, &admin, pb::EnqueueJobRequest::default()).await;
    stays_waiting(&app, &admin, &job.id).await;
    pause_and_resume(&app, &admin, false).await;
    until(&app, &admin, &job.id, "completed after the resume", |job| {
        state(job) == pb::JobState::Completed
    })
    .await;
}

async fn stats_count_what_is_there(app: TestApp) {
    let (_, admin) = app.admin("root@example.com").await;
    let admin = admin.access_token;
    let failed = enqueue(
        &app,
        &admin,
        pb::EnqueueJobRequest {
            args: args(serde_json::json!({"fail": "boom"})),
            max_attempts: 1,
            ..Default::default()
        },
    )
    .await;
    let completed = enqueue(&app, &admin, pb::EnqueueJobRequest::default()).await;
    until(&app, &admin, &failed.id, "failed", |job| {
        state(job) == pb::JobState::Failed
    })
    .await;
    until(&app, &admin, &completed.id, "completed", |job| {
        state(job) == pb::JobState::Completed
    })
    .await;
    pause_and_resume(&app, &admin, true).await;
    enqueue(&app, &admin, pb::EnqueueJobRequest::default()).await;
    for _ in 0..2 {
        enqueue(
            &app,
            &admin,
            pb::EnqueueJobRequest {
                run_at: Some(later(3600)),
                ..Default::default()
            },
        )
        .await;
    }
    let queues = clients(&app)
        .await
        .queries
        .get_queue_stats(authed(pb::GetQueueStatsRequest {}, &admin))
        .await
        .unwrap()
        .into_inner()
        .queues;
    let default = queues.iter().find(|stats| stats.queue == "default").unwrap();
    assert_eq!(
        (
            default.available,
            default.depth,
            default.running,
            default.failed,
            default.completed_last_minute,
            default.paused
        ),
        (1, 3, 0, 1, 1, true),
        "{default:?}"
    );
    let age = default.oldest_waiting_age.unwrap();
    assert!(age.seconds >= 0 && (age.seconds > 0 || age.nanos > 0), "{age:?}");
    // Users may not read the statistics.
    let (_, user) = app.signed_in("ada@example.com").await;
    let refused = clients(&app)
        .await
        .queries
        .get_queue_stats(authed(pb::GetQueueStatsRequest {}, &user.access_token))
        .await;
    assert_eq!(refused.unwrap_err().code(), Code::PermissionDenied);
}

async fn bad_input_is_invalid_argument(app: TestApp) {
    let (_, admin) = app.admin("root@example.com").await;
    let admin = admin.access_token;
    let mut commands = clients(&app).await.commands;
    for (kind, arguments, why) in [
        ("nobody.knows", serde_json::json!({}), "unknown kind"),
        (
            "jobs.noop",
            serde_json::json!({"steps": "many"}),
            "a string for a number",
        ),
        ("jobs.noop", serde_json::json!({"bogus": 1}), "an unknown field"),
    ] {
        let refused = commands
            .enqueue_job(authed(
                pb::EnqueueJobRequest {
                    kind: kind.to_owned(),
                    args: args(arguments),
                    ..Default::default()
                },
                &admin,
            ))
            .await;
        assert_eq!(refused.unwrap_err().code(), Code::InvalidArgument, "{why}");
    }
    let bad_state = list(
        &app,
        &admin,
        pb::ListJobsRequest {
            state: 42,
            ..Default::default()
        },
    )
    .await;
    assert_eq!(bad_state.unwrap_err().code(), Code::InvalidArgument);
    assert_eq!(
        get(&app, &admin, "not-an-id").await.unwrap_err().code(),
        Code::InvalidArgument
    );
    let unknown_queue = commands
        .pause_queue(authed(
            pb::PauseQueueRequest {
                queue: "nope".to_owned(),
            },
            &admin,
        ))
        .await;
    assert_eq!(unknown_queue.unwrap_err().code(), Code::InvalidArgument);
    // Over REST too: an unknown state name is a 400.
    let client = Client::builder(TokioExecutor::new()).build_http::<Empty<Bytes>>();
    let request = http::Request::get(format!("{}/v1/jobs?state=JOB_STATE_STALLED", app.endpoint()))
        .header("authorization", format!("Bearer {admin}"))
        .body(Empty::new())
        .unwrap();
    let response = client.request(request).await.unwrap();
    assert_eq!(response.status(), 400);
    // No job was written by any of it.
    assert!(list(&app, &admin, Default::default()).await.unwrap().jobs.is_empty());
}

macro_rules! on_both {
    ($($name:ident),* $(,)?) => {
        mod sqlite {
            use super::*;
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    super::$name(spawn(Backend::Sqlite).await).await;
                }
            )*
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn a_dropped_handler_frees_its_slot() {
                super::a_dropped_handler_frees_its_slot(Backend::Sqlite).await;
            }
        }
        mod postgres {
            use super::*;
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                #[ignore = "needs PostgreSQL (KEEL_TEST_DATABASE_URL); run with --include-ignored"]
                async fn $name() {
                    super::$name(spawn(Backend::Postgres).await).await;
                }
            )*
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            #[ignore = "needs PostgreSQL (KEEL_TEST_DATABASE_URL); run with --include-ignored"]
            async fn a_dropped_handler_frees_its_slot() {
                super::a_dropped_handler_frees_its_slot(Backend::Postgres).await;
            }
        }
    };
}

on_both!(
    users_never_see_watch_or_cancel_each_others_jobs,
    admins_list_with_filters_and_cursor_pages,
    cancelling_stops_waiting_and_running_jobs,
    progress_arrives_in_order_on_every_protocol,
    an_admin_retry_runs_a_failed_job_again,
    a_paused_queue_is_not_fetched_until_resumed,
    stats_count_what_is_there,
    bad_input_is_invalid_argument,
);

/// Two keels on one PostgreSQL database: a pause made through one stops
/// the fetch in the other (which alone runs workers), and a resume through
/// the first wakes it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs PostgreSQL (KEEL_TEST_DATABASE_URL); run with --include-ignored"]
async fn postgres_pause_holds_in_a_second_process() {
    let first = spawn_app_with(Backend::Postgres, |config| {
        config.jobs_workers = false;
    })
    .await;
    let schema = first.state.config.database_schema.clone();
    let keys = first.data_dir.path().join("auth-keys.json");
    let second = spawn_app_with(Backend::Postgres, move |config| {
        config.database_schema = schema;
        config.auth_keys_file = Some(keys);
        config.jobs_poll_ms = 3_600_000;
    })
    .await;
    let (_, admin) = first.admin("root@example.com").await;
    let admin = admin.access_token;
    pause_and_resume(&first, &admin, true).await;
    let job = enqueue(&first, &admin, pb::EnqueueJobRequest::default()).await;
    stays_waiting(&first, &admin, &job.id).await;
    pause_and_resume(&first, &admin, false).await;
    until(
        &first,
        &admin,
        &job.id,
        "run by the second keel after the resume",
        |job| state(job) == pb::JobState::Completed,
    )
    .await;
    drop(second);
}
