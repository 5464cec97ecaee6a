//! `WatchJob` streams on every database (SQLite, PostgreSQL): the changes
//! another process makes reach a watcher through this process's one poller,
//! a deleted job ends the stream with NOT_FOUND, a lease renewal is no
//! change, the poller stops when nothing is watched and starts again with
//! the next watch, and a caller may hold only so many streams at once.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::{Duration, Instant};

use keel_jobs::commands::DeleteJob;
use keel_jobs::queries::WatchJob;
use keel_jobs::{JobRecord, JobState, Jobs, Noop, Settings};
use keel_kernel::{
    BackgroundTasks, Bus, BusBuilder, Code, Live, Module, NewJob, Principal, RequestContext, Result, Role,
};
use keel_testkit::{Backend, TestDatabase};
use tokio::sync::mpsc;
use uuid::Uuid;

/// Two jobs modules on one database, as two keel processes would have:
/// `watcher` runs no workers, `worker` does.
struct Rig {
    _database: TestDatabase,
    watcher: Jobs,
    watcher_bus: Bus,
    worker: Jobs,
    worker_bus: Bus,
    _tasks: BackgroundTasks,
}

async fn rig(backend: Backend, watch_per_caller: usize) -> Rig {
    rig_with_lease(backend, watch_per_caller, Settings::default().lease).await
}

async fn rig_with_lease(backend: Backend, watch_per_caller: usize, lease: Duration) -> Rig {
    let database = TestDatabase::new(backend).await;
    let db = database.db.clone();
    let watcher = Jobs::new(
        db.clone(),
        Vec::new(),
        Settings {
            workers: false,
            watch_poll: Duration::from_millis(100),
            watch_per_caller,
            ..Settings::default()
        },
    )
    .await
    .unwrap();
    let mut watcher_bus = BusBuilder::new(db.clone());
    watcher.register(&mut watcher_bus);
    let worker = Jobs::new(
        db.clone(),
        Vec::new(),
        Settings {
            poll: Duration::from_millis(50),
            lease,
            ..Settings::default()
        },
    )
    .await
    .unwrap();
    let mut worker_bus = BusBuilder::new(db.clone());
    worker.register(&mut worker_bus);
    let tasks = BackgroundTasks::new(worker.start_tasks(&db));
    Rig {
        _database: database,
        watcher,
        watcher_bus: watcher_bus.build(),
        worker,
        worker_bus: worker_bus.build(),
        _tasks: tasks,
    }
}

fn user(user_id: Uuid) -> RequestContext {
    RequestContext::system().with_principal(Principal {
        user_id,
        session_id: Uuid::now_v7(),
        role: Role::User,
        access_expires_at: None,
    })
}

async fn watch(bus: &Bus, request: &RequestContext, id: Uuid) -> Result<mpsc::Receiver<Result<JobRecord>>> {
    let Live(receiver) = bus.ask(request, WatchJob { id }).await?;
    Ok(receiver)
}

/// What the stream sends until it ends (or ten seconds pass).
async fn drain(mut stream: mpsc::Receiver<Result<JobRecord>>) -> Vec<Result<JobRecord>> {
    let mut seen = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), async {
        while let Some(item) = stream.recv().await {
            seen.push(item);
        }
    })
    .await
    .expect("the stream did not end in time");
    seen
}

async fn another_processs_changes_reach_the_watcher(backend: Backend) {
    let rig = rig(backend, 100).await;
    let owner = Uuid::now_v7();
    let job = NewJob::new(&Noop {
        steps: 3,
        step_ms: 300,
        ..Noop::default()
    })
    .unwrap()
    .for_user(owner)
    // Not yet due: the watch is open before the run starts.
    .run_at(keel_kernel::clock::now() + chrono::Duration::milliseconds(300));
    let id = rig.watcher.enqueue(vec![job]).await.unwrap()[0];
    let streams = [
        watch(&rig.watcher_bus, &user(owner), id).await.unwrap(),
        watch(&rig.watcher_bus, &user(owner), id).await.unwrap(),
    ];
    for stream in streams {
        let seen: Vec<JobRecord> = drain(stream).await.into_iter().map(Result::unwrap).collect();
        assert_eq!(seen[0].state, JobState::Available, "{seen:#?}");
        assert_eq!(seen.last().unwrap().state, JobState::Completed, "{seen:#?}");
        let percents: Vec<u8> = seen
            .iter()
            .filter_map(|job| job.progress.as_ref().map(|progress| progress.percent))
            .collect();
        assert!(percents.len() >= 2, "steps seen from the other process: {seen:#?}");
        assert!(percents.is_sorted(), "{percents:?}");
    }
}

async fn a_job_deleted_elsewhere_ends_the_watch_with_not_found(backend: Backend) {
    let rig = rig(backend, 100).await;
    let later = keel_kernel::clock::now() + chrono::Duration::hours(1);
    let id = rig
        .watcher
        .enqueue(vec![NewJob::new(&Noop::default()).unwrap().run_at(later)])
        .await
        .unwrap()[0];
    let stream = watch(&rig.watcher_bus, &RequestContext::system(), id).await.unwrap();
    rig.worker_bus
        .execute(&RequestContext::system(), DeleteJob { id })
        .await
        .unwrap();
    let seen = drain(stream).await;
    assert_eq!(seen.len(), 2, "{seen:#?}");
    assert_eq!(seen[1].as_ref().unwrap_err().code(), Code::NotFound);
}

async fn a_caller_holds_only_so_many_watches(backend: Backend) {
    let rig = rig(backend, 2).await;
    let later = keel_kernel::clock::now() + chrono::Duration::hours(1);
    let (alice, bob) = (Uuid::now_v7(), Uuid::now_v7());
    let mut ids = Vec::new();
    for owner in [alice, alice, alice, bob] {
        let job = NewJob::new(&Noop::default()).unwrap().run_at(later).for_user(owner);
        ids.push(rig.worker.enqueue(vec![job]).await.unwrap()[0]);
    }
    let first = watch(&rig.watcher_bus, &user(alice), ids[0]).await.unwrap();
    let _second = watch(&rig.watcher_bus, &user(alice), ids[1]).await.unwrap();
    let refused = watch(&rig.watcher_bus, &user(alice), ids[2]).await.unwrap_err();
    assert_eq!(refused.code(), Code::ResourceExhausted, "{refused:?}");
    // Another caller's allowance is their own.
    let _bob = watch(&rig.watcher_bus, &user(bob), ids[3]).await.unwrap();
    // A closed stream gives its place back (once its task saw it close).
    drop(first);
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match watch(&rig.watcher_bus, &user(alice), ids[2]).await {
            Ok(_third) => break,
            Err(error) => assert_eq!(error.code(), Code::ResourceExhausted, "{error:?}"),
        }
        assert!(Instant::now() < deadline, "the closed stream never gave its place back");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// A worker renewing its lease changes nothing a watcher sees: the stream
/// sends the job's changes (running, completed), not a row per renewal.
async fn lease_renewals_are_no_news_to_a_watcher(backend: Backend) {
    // Renewed every 50 ms over a one-second run; the watcher polls every 100.
    let rig = rig_with_lease(backend, 100, Duration::from_millis(150)).await;
    let job = NewJob::new(&Noop {
        sleep_ms: 1000,
        ..Noop::default()
    })
    .unwrap()
    .run_at(keel_kernel::clock::now() + chrono::Duration::milliseconds(200));
    let id = rig.worker.enqueue(vec![job]).await.unwrap()[0];
    let stream = watch(&rig.watcher_bus, &RequestContext::system(), id).await.unwrap();
    let seen: Vec<JobRecord> = drain(stream).await.into_iter().map(Result::unwrap).collect();
    let states: Vec<JobState> = seen.iter().map(|job| job.state).collect();
    assert_eq!(
        states,
        [JobState::Available, JobState::Running, JobState::Completed],
        "{seen:#?}"
    );
}

/// The poller stops once nothing is watched, and the next watch starts it
/// again: another process's change still reaches the new stream.
async fn a_watch_after_the_poller_stopped_starts_it_again(backend: Backend) {
    let rig = rig(backend, 100).await;
    let later = keel_kernel::clock::now() + chrono::Duration::hours(1);
    let system = RequestContext::system();
    for round in 0..2 {
        let id = rig
            .watcher
            .enqueue(vec![NewJob::new(&Noop::default()).unwrap().run_at(later)])
            .await
            .unwrap()[0];
        let stream = watch(&rig.watcher_bus, &system, id).await.unwrap();
        rig.worker_bus.execute(&system, DeleteJob { id }).await.unwrap();
        let seen = drain(stream).await;
        assert_eq!(seen.len(), 2, "round {round}: {seen:#?}");
        assert_eq!(seen[1].as_ref().unwrap_err().code(), Code::NotFound);
        // Nothing is watched now: a few of its ticks, and the poller is
        // gone (were it not, the next round would pass without a restart).
        tokio::time::sleep(Duration::from_millis(400)).await;
    }
}

keel_testkit::on_every_backend!(
    another_processs_changes_reach_the_watcher,
    a_job_deleted_elsewhere_ends_the_watch_with_not_found,
    a_caller_holds_only_so_many_watches,
    lease_renewals_are_no_news_to_a_watcher,
    a_watch_after_the_poller_stopped_starts_it_again,
);
