//! Jobs across real keel processes: a keel killed with SIGKILL while its
//! job runs; the job runs again in the next keel once the lease expired.

#![allow(clippy::unwrap_used)]

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use keel_jobs::{JobRecord, JobState, Jobs, Noop, Settings};
use keel_kernel::NewJob;
use keel_testkit::Backend;
use uuid::Uuid;

struct Keel {
    child: Child,
}

impl Drop for Keel {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn start(env: &[(&str, String)]) -> Keel {
    let mut command = Command::new(env!("CARGO_BIN_EXE_keel"));
    command
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("KEEL_LISTEN", format!("127.0.0.1:{}", free_port()))
        .env("KEEL_LOG", "warn")
        .env("KEEL_LOG_FORMAT", "json")
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    for (key, value) in env {
        command.env(key, value);
    }
    Keel {
        child: command.spawn().unwrap(),
    }
}

/// The database both keels use, and its settings for them.
struct Shared {
    jobs: Jobs,
    env: Vec<(&'static str, String)>,
    _dir: tempfile::TempDir,
    schema: Option<(String, String)>,
}

impl Drop for Shared {
    fn drop(&mut self) {
        if let Some((url, schema)) = self.schema.take() {
            keel_testkit::drop_schema(url, schema);
        }
    }
}

async fn shared(backend: Backend) -> Shared {
    let dir = tempfile::tempdir().unwrap();
    let mut env = vec![
        ("KEEL_DATA_DIR", dir.path().display().to_string()),
        // A short lease: the dead keel's job is rescued after about a second.
        ("KEEL_JOBS_LEASE_MS", "1000".to_owned()),
    ];
    let (settings, schema) = match backend {
        Backend::Sqlite => (keel_db::DbSettings::new(keel_db::sqlite_url(dir.path())), None),
        Backend::Postgres => {
            let url = keel_testkit::postgres_url();
            let name = keel_testkit::create_schema(&url).await;
            env.push(("KEEL_DATABASE_URL", url.clone()));
            env.push(("KEEL_DATABASE_SCHEMA", name.clone()));
            let settings = keel_db::DbSettings {
                schema: Some(name.clone()),
                ..keel_db::DbSettings::new(url.clone())
            };
            (settings, Some((url, name)))
        }
    };
    let db = keel_db::connect(&settings).await.unwrap();
    keel_db::migrate(&db).await.unwrap();
    // This process only enqueues and reads.
    let jobs = Jobs::new(
        db,
        Vec::new(),
        Settings {
            workers: false,
            ..Settings::default()
        },
    )
    .await
    .unwrap();
    Shared {
        jobs,
        env,
        _dir: dir,
        schema,
    }
}

async fn until(jobs: &Jobs, id: Uuid, what: &str, done: impl Fn(&JobRecord) -> bool) -> JobRecord {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let job = jobs.get(id).await.unwrap().unwrap();
        if done(&job) {
            return job;
        }
        assert!(Instant::now() < deadline, "the job never {what}: {job:#?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn a_job_of_a_killed_keel_runs_again_after_its_lease(backend: Backend) {
    let shared = shared(backend).await;
    // Long enough to be killed in the middle of it, short enough to finish next time.
    let job = NewJob::new(&Noop { sleep_ms: 3000, ..Noop::default() }).unwrap();
    let [id] = shared.jobs.enqueue(vec![job]).await.unwrap()[..] else {
        panic!("one id")
    };

    let mut first = start(&shared.env);
    let running = until(&shared.jobs, id, "ran", |job| job.state == JobState::Running).await;
    assert_eq!(running.attempt, 1);
    first.child.kill().unwrap();
    first.child.wait().unwrap();
    drop(first);
    // Dead: nothing completes it, and it stays leased until the lease runs out.
    let after_kill = shared.jobs.get(id).await.unwrap().unwrap();
    assert_eq!((after_kill.state, after_kill.attempt), (JobState::Running, 1));

    let _second = start(&shared.env);
    let done = until(&shared.jobs, id, "completed", |job| job.state.is_finished()).await;
    assert_eq!(done.state, JobState::Completed, "{done:#?}");
    assert_eq!(done.attempt, 2, "{done:#?}");
    assert_eq!(done.errors.len(), 1, "the lost lease is noted: {:?}", done.errors);
    assert!(done.attempted_at > running.attempted_at);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_a_job_of_a_killed_keel_runs_again_after_its_lease() {
    a_job_of_a_killed_keel_runs_again_after_its_lease(Backend::Sqlite).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs PostgreSQL (KEEL_TEST_DATABASE_URL); run with --include-ignored"]
async fn postgres_a_job_of_a_killed_keel_runs_again_after_its_lease() {
    a_job_of_a_killed_keel_runs_again_after_its_lease(Backend::Postgres).await;
}
