//! Batched completion on every database (SQLite, PostgreSQL): one write for
//! many jobs keeps the fence of each (state, attempt, lease token), and a
//! process's workers finishing at once all get their own answer.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::{Duration, Instant};

use keel_jobs::{JobState, Jobs, Lease, Noop, Settings, store};
use keel_kernel::{BackgroundTasks, Module, NewJob, clock};
use keel_testkit::{Backend, TestDatabase};
use uuid::Uuid;

fn noop() -> NewJob {
    NewJob::new(&Noop {
        sleep_ms: 0,
        ..Default::default()
    })
    .unwrap()
}

async fn jobs_without_workers(database: &TestDatabase) -> Jobs {
    Jobs::new(
        database.db.clone(),
        Vec::new(),
        Settings {
            workers: false,
            ..Settings::default()
        },
    )
    .await
    .unwrap()
}

/// Leases of every job of the default queue due at `now` (up to 100).
async fn lease_all(
    db: &sea_orm::DatabaseConnection,
    until: chrono::DateTime<chrono::Utc>,
    now: chrono::DateTime<chrono::Utc>,
) -> Vec<Lease> {
    store::fetch(db, "default", 100, until, now)
        .await
        .unwrap()
        .iter()
        .map(|job| job.lease().unwrap())
        .collect()
}

async fn a_batch_completes_only_the_leases_still_held(backend: Backend) {
    let database = TestDatabase::new(backend).await;
    let db = &database.db;
    let jobs = jobs_without_workers(&database).await;
    jobs.enqueue(vec![noop(), noop(), noop(), noop()]).await.unwrap();
    let now = clock::now();
    let leases = lease_all(db, now + chrono::Duration::milliseconds(1), now).await;
    let [held, forged, stale, rescued] = leases[..] else {
        panic!("four leases: {leases:?}")
    };
    // `rescued` loses its lease and runs again under a new one (attempt 2).
    let later = now + chrono::Duration::seconds(1);
    assert!(
        store::renew(db, &held, later + chrono::Duration::seconds(60))
            .await
            .unwrap()
    );
    assert!(
        store::renew(db, &forged, later + chrono::Duration::seconds(60))
            .await
            .unwrap()
    );
    assert!(
        store::renew(db, &stale, later + chrono::Duration::seconds(60))
            .await
            .unwrap()
    );
    assert_eq!(store::rescue(db, later, 100).await.unwrap(), 1);
    let [again] = lease_all(db, later + chrono::Duration::seconds(60), later).await[..] else {
        panic!("the rescued job leased again")
    };
    assert_eq!((again.id, again.attempt), (rescued.id, 2));

    let forged_lease = Lease {
        token: Uuid::now_v7(),
        ..forged
    };
    let stale_lease = Lease {
        attempt: stale.attempt + 1,
        ..stale
    };
    let at = later + chrono::Duration::milliseconds(250);
    // The rescued job's old and new lease in one batch: only the new one wins.
    let written = store::complete_many(
        db,
        &[
            (held, at),
            (forged_lease, at),
            (stale_lease, at),
            (rescued, at),
            (again, at),
        ],
    )
    .await
    .unwrap();
    assert_eq!(written, [true, false, false, false, true]);

    let job = jobs.get(held.id).await.unwrap().unwrap();
    assert_eq!(
        (job.state, job.lease_token, job.leased_until),
        (JobState::Completed, None, None)
    );
    assert_eq!(
        job.finished_at.map(|t| t.timestamp_millis()),
        Some(at.timestamp_millis())
    );
    for (lease, attempt) in [(forged, 1), (stale, 1)] {
        let job = jobs.get(lease.id).await.unwrap().unwrap();
        assert_eq!(
            (job.state, job.attempt, job.lease_token, job.finished_at),
            (JobState::Running, attempt, Some(lease.token), None),
            "a refused lease changed its job"
        );
    }
    let job = jobs.get(rescued.id).await.unwrap().unwrap();
    assert_eq!((job.state, job.attempt), (JobState::Completed, 2));

    // A completed job's lease completes nothing again; the real holders do.
    let written = store::complete_many(db, &[(held, at), (forged, at), (stale, at)])
        .await
        .unwrap();
    assert_eq!(written, [false, true, true]);
    assert!(store::complete_many(db, &[]).await.unwrap().is_empty());
    assert_eq!(store::count_in_state(db, JobState::Completed).await.unwrap(), 4);
}

/// Many jobs finishing at once in one process: each is completed once, and
/// the workers carry on (their answers arrive; no slot is lost).
async fn many_workers_finishing_at_once_all_complete(backend: Backend) {
    let database = TestDatabase::new(backend).await;
    let db = database.db.clone();
    let jobs = Jobs::new(
        db.clone(),
        Vec::new(),
        Settings {
            concurrency: 50,
            poll: Duration::from_secs(3600),
            ..Settings::default()
        },
    )
    .await
    .unwrap();
    let _tasks = BackgroundTasks::new(jobs.start_tasks(&db));
    let total = 2000;
    for _ in 0..4 {
        jobs.enqueue((0..total / 4).map(|_| noop()).collect()).await.unwrap();
    }
    let deadline = Instant::now() + Duration::from_secs(60);
    while store::count_in_state(&db, JobState::Completed).await.unwrap() < total {
        assert!(
            Instant::now() < deadline,
            "{} of {total} completed",
            store::count_in_state(&db, JobState::Completed).await.unwrap()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(store::count(&db).await.unwrap(), total);
    for state in [JobState::Available, JobState::Running, JobState::Failed] {
        assert_eq!(store::count_in_state(&db, state).await.unwrap(), 0, "{state:?}");
    }
}

keel_testkit::on_every_backend!(
    a_batch_completes_only_the_leases_still_held,
    many_workers_finishing_at_once_all_complete,
);
