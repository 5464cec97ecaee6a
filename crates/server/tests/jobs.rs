//! Jobs across real keel processes: a keel killed with SIGKILL while its
//! job runs; the job runs again in the next keel once the lease expired.
//! `keel worker` runs what a `keel serve` without workers enqueued; a
//! SIGTERM lets a short job finish and hands a long one back at once.

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
    start_command(&[], env, None)
}

/// `keel <args>`; its output into `log` when given.
fn start_command(args: &[&str], env: &[(&str, String)], log: Option<&std::path::Path>) -> Keel {
    let mut command = Command::new(env!("CARGO_BIN_EXE_keel"));
    command
        .args(args)
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("KEEL_LISTEN", format!("127.0.0.1:{}", free_port()))
        .env("KEEL_LOG", "warn")
        .env("KEEL_LOG_FORMAT", "json")
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    if let Some(log) = log {
        let file = std::fs::File::create(log).unwrap();
        command.stdout(file.try_clone().unwrap()).stderr(file);
    }
    for (key, value) in env {
        command.env(key, value);
    }
    Keel {
        child: command.spawn().unwrap(),
    }
}

/// SIGTERM, as an orchestrator stops a keel.
fn terminate(keel: &Keel) {
    let status = Command::new("kill")
        .args(["-TERM", &keel.child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
}

/// Waits (at most `within`) for the process to end; how long it took.
async fn exited(keel: &mut Keel, within: Duration) -> Duration {
    let started = Instant::now();
    loop {
        if let Some(status) = keel.child.try_wait().unwrap() {
            assert!(status.success(), "keel exited with {status}");
            return started.elapsed();
        }
        assert!(started.elapsed() < within, "keel did not exit within {within:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
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
    let read = || async { jobs.get(id).await.unwrap().unwrap() };
    keel_testkit::until(what, Duration::from_secs(60), Duration::from_millis(20), read, done).await
}

async fn a_job_of_a_killed_keel_runs_again_after_its_lease(backend: Backend) {
    let shared = shared(backend).await;
    // Long enough to be killed in the middle of it, short enough to finish next time.
    let job = NewJob::new(&Noop {
        sleep_ms: 3000,
        ..Noop::default()
    })
    .unwrap();
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

/// `keel serve` with workers off runs none (the job waits, its log has no
/// run), `keel worker` beside it runs the job (its log says so).
async fn keel_worker_runs_jobs_beside_a_keel_serve_without_workers(backend: Backend) {
    let shared = shared(backend).await;
    let logs = tempfile::tempdir().unwrap();
    let mut env = shared.env.clone();
    env.push(("KEEL_JOBS_POLL_MS", "100".to_owned()));
    env.push(("KEEL_LOG", "warn,keel=info,keel_jobs=debug".to_owned()));
    let mut serve_env = env.clone();
    serve_env.push(("KEEL_JOBS_WORKERS", "false".to_owned()));
    let serve_log = logs.path().join("serve.log");
    let _serve = start_command(&["serve"], &serve_env, Some(&serve_log));
    // The serving keel is up (it migrated; its poll would have come).
    wait_for_log(&serve_log, "keel is serving gRPC").await;

    let job = NewJob::new(&Noop {
        sleep_ms: 0,
        ..Default::default()
    })
    .unwrap();
    let [id] = shared.jobs.enqueue(vec![job]).await.unwrap()[..] else {
        panic!("one id")
    };
    let worker_log = logs.path().join("worker.log");
    // `KEEL_JOBS_WORKERS=false` in its environment too: `keel worker` runs them anyway.
    let mut worker = start_command(&["worker"], &serve_env, Some(&worker_log));
    let done = until(&shared.jobs, id, "completed", |job| job.state.is_finished()).await;
    assert_eq!((done.state, done.attempt), (JobState::Completed, 1), "{done:#?}");
    wait_for_log(&worker_log, &id.to_string()).await;
    let serve_said = std::fs::read_to_string(&serve_log).unwrap();
    assert!(!serve_said.contains(&id.to_string()), "keel serve ran it: {serve_said}");
    // The worker serves nothing: its KEEL_LISTEN stays closed.
    let worker_said = std::fs::read_to_string(&worker_log).unwrap();
    assert!(!worker_said.contains("serving gRPC"), "{worker_said}");
    terminate(&worker);
    exited(&mut worker, Duration::from_secs(15)).await;
}

async fn wait_for_log(path: &std::path::Path, needle: &str) {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let text = std::fs::read_to_string(path).unwrap_or_default();
        if text.contains(needle) {
            return;
        }
        assert!(Instant::now() < deadline, "{needle:?} never logged: {text}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A keel running a short job and a long one gets SIGTERM: it stops
/// fetching, the short job completes within the grace, the long one is
/// handed back as the keel exits (available, its attempt given back: no
/// lease to wait out), and the next keel runs it at once, though leases
/// here last a minute.
async fn sigterm_finishes_short_jobs_and_hands_back_long_ones(backend: Backend) {
    let shared = shared(backend).await;
    let mut env: Vec<_> = shared
        .env
        .iter()
        .filter(|(key, _)| *key != "KEEL_JOBS_LEASE_MS")
        .cloned()
        .collect();
    env.push(("KEEL_JOBS_LEASE_MS", "60000".to_owned()));
    env.push(("KEEL_JOBS_SHUTDOWN_GRACE", "3s".to_owned()));
    let short = NewJob::new(&Noop {
        sleep_ms: 1000,
        ..Default::default()
    })
    .unwrap();
    let long = NewJob::new(&Noop {
        sleep_ms: 8000,
        ..Default::default()
    })
    .unwrap();
    let [short, long] = shared.jobs.enqueue(vec![short, long]).await.unwrap()[..] else {
        panic!("two ids")
    };
    let mut first = start(&env);
    for id in [short, long] {
        until(&shared.jobs, id, "ran", |job| job.state == JobState::Running).await;
    }
    terminate(&first);
    // The grace (3 s), not the long job (8 s), decides when it ends.
    let took = exited(&mut first, Duration::from_secs(30)).await;
    assert!(took < Duration::from_millis(6500), "exited after {took:?}");
    let short = shared.jobs.get(short).await.unwrap().unwrap();
    assert_eq!((short.state, short.attempt), (JobState::Completed, 1), "{short:#?}");
    let handed_back = shared.jobs.get(long).await.unwrap().unwrap();
    assert_eq!(handed_back.state, JobState::Available, "{handed_back:#?}");
    assert_eq!(
        (handed_back.attempt, handed_back.lease_token),
        (0, None),
        "{handed_back:#?}"
    );
    assert!(handed_back.errors.is_empty(), "{:?}", handed_back.errors);

    let restarted = Instant::now();
    let _second = start(&env);
    let done = until(&shared.jobs, long, "completed", |job| job.state.is_finished()).await;
    assert_eq!((done.state, done.attempt), (JobState::Completed, 1), "{done:#?}");
    assert!(done.errors.is_empty(), "{:?}", done.errors);
    // Its 8 s and start-up, well inside the minute a lease would have held it.
    assert!(
        restarted.elapsed() < Duration::from_secs(40),
        "{:?}",
        restarted.elapsed()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_keel_worker_runs_jobs_beside_a_keel_serve_without_workers() {
    keel_worker_runs_jobs_beside_a_keel_serve_without_workers(Backend::Sqlite).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs PostgreSQL (KEEL_TEST_DATABASE_URL); run with --include-ignored"]
async fn postgres_keel_worker_runs_jobs_beside_a_keel_serve_without_workers() {
    keel_worker_runs_jobs_beside_a_keel_serve_without_workers(Backend::Postgres).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_sigterm_finishes_short_jobs_and_hands_back_long_ones() {
    sigterm_finishes_short_jobs_and_hands_back_long_ones(Backend::Sqlite).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs PostgreSQL (KEEL_TEST_DATABASE_URL); run with --include-ignored"]
async fn postgres_sigterm_finishes_short_jobs_and_hands_back_long_ones() {
    sigterm_finishes_short_jobs_and_hands_back_long_ones(Backend::Postgres).await;
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

/// `(run_at, state, attempt)` of every `jobs.noop` job.
async fn noop_jobs(jobs: &Jobs) -> Vec<(chrono::DateTime<chrono::Utc>, String, i32)> {
    use sea_orm::{ConnectionTrait, Statement};

    let db = jobs.db();
    let rows = db
        .query_all_raw(Statement::from_string(
            db.get_database_backend(),
            "SELECT run_at, state, attempt FROM jobs WHERE kind = 'jobs.noop' ORDER BY run_at",
        ))
        .await
        .unwrap();
    rows.into_iter()
        .map(|row| {
            (
                row.try_get("", "run_at").unwrap(),
                row.try_get("", "state").unwrap(),
                row.try_get("", "attempt").unwrap(),
            )
        })
        .collect()
}

/// Two keels with the same `KEEL_JOBS_CRON` schedule, ticking every second:
/// each tick is enqueued once, and each of its jobs runs once.
async fn two_keels_enqueue_each_tick_of_a_schedule_once(backend: Backend) {
    let shared = shared(backend).await;
    let mut env = shared.env.clone();
    env.push(("KEEL_JOBS_CRON", "tick|* * * * * *|jobs.noop".to_owned()));
    let _first = start(&env);
    let _second = start(&env);
    let deadline = Instant::now() + Duration::from_secs(60);
    let ticks = loop {
        let ticks = noop_jobs(&shared.jobs).await;
        if ticks.len() >= 4 {
            break ticks;
        }
        assert!(Instant::now() < deadline, "the schedule fired {} times", ticks.len());
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let mut runs_at: Vec<_> = ticks.iter().map(|(run_at, _, _)| *run_at).collect();
    runs_at.dedup();
    assert_eq!(runs_at.len(), ticks.len(), "a tick was enqueued twice: {ticks:#?}");
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let done = noop_jobs(&shared.jobs).await;
        let first_ticks = &done[..ticks.len()];
        if first_ticks.iter().all(|(_, state, _)| state == "completed") {
            // Run once each: one attempt, no lost lease.
            assert!(first_ticks.iter().all(|(_, _, attempt)| *attempt == 1), "{done:#?}");
            break;
        }
        assert!(Instant::now() < deadline, "not every tick's job ran: {done:#?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_two_keels_enqueue_each_tick_of_a_schedule_once() {
    two_keels_enqueue_each_tick_of_a_schedule_once(Backend::Sqlite).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs PostgreSQL (KEEL_TEST_DATABASE_URL); run with --include-ignored"]
async fn postgres_two_keels_enqueue_each_tick_of_a_schedule_once() {
    two_keels_enqueue_each_tick_of_a_schedule_once(Backend::Postgres).await;
}

/// The job ids a keel's JSON log says its `jobs.noop` ran, with attempts.
fn noop_runs(log: &std::path::Path) -> Vec<(String, u64)> {
    std::fs::read_to_string(log)
        .unwrap()
        .lines()
        .filter_map(|line| serde_json::from_str::<serde_json::Value>(line).ok())
        .filter(|line| line["message"] == "jobs.noop ran")
        .map(|line| {
            (
                line["job_id"].as_str().unwrap().to_owned(),
                line["attempt"].as_u64().unwrap(),
            )
        })
        .collect()
}

/// Two `keel worker`s on one database share 10,000 jobs: each job runs
/// once, in one of them (their logs are disjoint and together name every
/// job), at its first attempt.
async fn two_keels_run_each_of_ten_thousand_jobs_once(backend: Backend) {
    const JOBS: usize = 10_000;
    let shared = shared(backend).await;
    let logs = tempfile::tempdir().unwrap();
    let mut env = shared.env.clone();
    // Leases long enough that no run is rescued under a loaded machine.
    env.retain(|(key, _)| *key != "KEEL_JOBS_LEASE_MS");
    env.push(("KEEL_JOBS_LEASE_MS", "30000".to_owned()));
    env.push(("KEEL_JOBS_POLL_MS", "200".to_owned()));
    env.push(("KEEL_LOG", "warn,keel=info,keel_jobs=debug".to_owned()));
    let paths = [logs.path().join("first.log"), logs.path().join("second.log")];
    let mut keels: Vec<Keel> = paths
        .iter()
        .map(|path| start_command(&["worker"], &env, Some(path)))
        .collect();
    for path in &paths {
        wait_for_log(path, "keel is running job workers").await;
    }
    let mut ids = std::collections::HashSet::new();
    for _ in 0..JOBS / 500 {
        let batch = (0..500).map(|_| NewJob::new(&Noop::default()).unwrap()).collect();
        ids.extend(shared.jobs.enqueue(batch).await.unwrap().iter().map(Uuid::to_string));
    }
    assert_eq!(ids.len(), JOBS);
    let deadline = Instant::now() + Duration::from_secs(240);
    loop {
        let completed = keel_jobs::store::count_in_state(shared.jobs.db(), JobState::Completed)
            .await
            .unwrap();
        if completed as usize == JOBS {
            break;
        }
        assert!(Instant::now() < deadline, "{completed} of {JOBS} jobs completed");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Stopped, their logs are whole.
    for keel in &keels {
        terminate(keel);
    }
    for keel in &mut keels {
        exited(keel, Duration::from_secs(30)).await;
    }
    let runs: Vec<Vec<(String, u64)>> = paths.iter().map(|path| noop_runs(path)).collect();
    let mut seen = std::collections::HashSet::new();
    for (path, runs) in paths.iter().zip(&runs) {
        assert!(!runs.is_empty(), "{} ran no job", path.display());
        for (id, attempt) in runs {
            assert_eq!(*attempt, 1, "job {id} ran at attempt {attempt}");
            assert!(seen.insert(id.clone()), "job {id} ran twice");
        }
    }
    assert_eq!(seen, ids, "the keels ran other jobs than were enqueued");
    assert_eq!(
        keel_jobs::store::count_in_state(shared.jobs.db(), JobState::Completed)
            .await
            .unwrap() as usize,
        JOBS
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_two_keels_run_each_of_ten_thousand_jobs_once() {
    two_keels_run_each_of_ten_thousand_jobs_once(Backend::Sqlite).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs PostgreSQL (KEEL_TEST_DATABASE_URL); run with --include-ignored"]
async fn postgres_two_keels_run_each_of_ten_thousand_jobs_once() {
    two_keels_run_each_of_ten_thousand_jobs_once(Backend::Postgres).await;
}
