//! `just bench-jobs`, keel's side (scripts/bench-jobs.sh runs BullMQ beside
//! it and prints the table): no-op jobs end to end on PostgreSQL.
//!
//! In a database of its own (`CREATE DATABASE keel_bench_jobs_<id>` on the
//! server of `KEEL_BENCH_DATABASE_URL`, dropped at the end):
//!
//! - throughput: a `Jobs` with workers on queue `bench` (concurrency
//!   `BENCH_CONCURRENCY`) runs while the same process enqueues `BENCH_JOBS`
//!   jobs through `Jobs::enqueue` in batches of `BENCH_BATCH` (a transaction
//!   each); the clock stops when every job has run once and no job of the
//!   table is available or running any more (every completion is written);
//! - idle latency, from the start of the enqueue call to the start of the
//!   handler, `BENCH_SAMPLES` single jobs one at a time with `BENCH_GAP_MS`
//!   between them: enqueued by the workers' own `Jobs` (woken in process),
//!   and by a second `Jobs` without workers on a pool of its own (woken by
//!   PostgreSQL's NOTIFY only, as another keel process would be);
//! - one fetch on a queue with nothing due (the statement a woken worker
//!   runs), timed over many calls;
//! - CPU over the throughput run: this process (`/proc/self/stat`) and the
//!   PostgreSQL backends connected to the bench database.
//!
//! `BENCH_BATCH_COMPLETION=0` writes each completion alone (as before the
//! completer), for the comparison.
//!
//! With `BENCH_FINISHED=n` it then inserts n finished (completed) jobs into
//! the same queue, vacuums and analyses the table, and measures again.
//! Prints one JSON line per phase on stdout, progress on stderr.

// A benchmark: a setup that fails ends the run with its reason.
#![allow(clippy::expect_used)]

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use keel_jobs::{Jobs, Settings, store};
use keel_kernel::{BackgroundTasks, Job, JobContext, JobError, JobHandler, JobKind, Module, NewJob, clock};
use sea_orm::{ConnectionTrait, DatabaseBackend, DatabaseConnection, Statement};
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;

// keel serve's allocator, so the CPU per job is the server's.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// A job that does nothing; a probe also says when it started.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct BenchNoop {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    probe: Option<u64>,
}

impl Job for BenchNoop {
    const KIND: &'static str = "bench.noop";
    const QUEUE: &'static str = "bench";
}

struct Runner {
    runs: AtomicU64,
    started: mpsc::UnboundedSender<(u64, Instant)>,
}

#[async_trait]
impl JobHandler<BenchNoop> for Arc<Runner> {
    async fn run(&self, _ctx: &JobContext, job: BenchNoop) -> Result<(), JobError> {
        if let Some(probe) = job.probe {
            let _ = self.started.send((probe, Instant::now()));
        }
        self.runs.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }
}

fn setting(name: &str, default: u64) -> u64 {
    match std::env::var(name) {
        Ok(value) => value
            .parse()
            .unwrap_or_else(|_| panic!("{name} must be a whole number, not {value:?}")),
        Err(_) => default,
    }
}

/// CPU seconds (user + system) of a process, from `/proc/<pid>/stat`.
fn cpu_seconds(pid: &str) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after "pid (comm) ": state is the first; utime and stime are 12th and 13th.
    let rest = stat.rsplit_once(") ")?.1;
    let fields: Vec<&str> = rest.split(' ').collect();
    let ticks: f64 = fields.get(11)?.parse::<f64>().ok()? + fields.get(12)?.parse::<f64>().ok()?;
    Some(ticks / 100.0)
}

/// CPU seconds of each PostgreSQL backend connected to `database`.
async fn backends_cpu(admin: &DatabaseConnection, database: &str) -> HashMap<i32, f64> {
    let rows = admin
        .query_all_raw(Statement::from_sql_and_values(
            DatabaseBackend::Postgres,
            "SELECT pid FROM pg_stat_activity WHERE datname = $1",
            [database.into()],
        ))
        .await
        .expect("pg_stat_activity");
    rows.iter()
        .filter_map(|row| row.try_get::<i32>("", "pid").ok())
        .filter_map(|pid| cpu_seconds(&pid.to_string()).map(|cpu| (pid, cpu)))
        .collect()
}

fn cpu_since(before: &HashMap<i32, f64>, after: &HashMap<i32, f64>) -> f64 {
    // A backend that appeared meanwhile counts whole.
    after
        .iter()
        .map(|(pid, cpu)| cpu - before.get(pid).copied().unwrap_or(0.0))
        .sum()
}

fn percentile(sorted: &[Duration], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize].as_secs_f64() * 1000.0
}

/// The URL of `database` on the server of `url`.
fn database_url(url: &str, database: &str) -> String {
    let (base, query) = url
        .split_once('?')
        .map_or((url, None), |(base, query)| (base, Some(query)));
    let authority_start = base.find("://").map_or(0, |at| at + 3);
    let path_start = base[authority_start..]
        .find('/')
        .map_or(base.len(), |at| authority_start + at);
    let mut out = format!("{}/{database}", &base[..path_start]);
    if let Some(query) = query {
        out.push('?');
        out.push_str(query);
    }
    out
}

struct Rig {
    admin: DatabaseConnection,
    database: String,
    db: DatabaseConnection,
    workers: Jobs,
    enqueuer: Jobs,
    runner: Arc<Runner>,
    started: mpsc::UnboundedReceiver<(u64, Instant)>,
    next_probe: u64,
    deadline: Duration,
}

impl Rig {
    async fn unfinished(&self) -> i64 {
        let row = self
            .db
            .query_one_raw(Statement::from_string(
                DatabaseBackend::Postgres,
                // One count per partial index (a table of finished jobs is not scanned).
                "SELECT (SELECT count(*) FROM jobs WHERE state = 'available') \
                        + (SELECT count(*) FROM jobs WHERE state = 'running') AS n",
            ))
            .await
            .expect("count")
            .expect("a row");
        row.try_get("", "n").expect("n")
    }

    /// Enqueues `total` jobs in batches while the workers run; returns
    /// (seconds to the last completion, seconds of the enqueueing, CPU of
    /// this process, CPU of the database backends).
    async fn throughput(&self, total: u64, batch: u64) -> (f64, f64, f64, f64) {
        let runs_before = self.runner.runs.load(Ordering::Relaxed);
        let self_before = cpu_seconds("self").expect("own cpu");
        let db_before = backends_cpu(&self.admin, &self.database).await;
        let started = Instant::now();
        let deadline = started + self.deadline;
        let mut sent = 0;
        while sent < total {
            let size = batch.min(total - sent);
            let jobs = (0..size)
                .map(|_| NewJob::new(&BenchNoop { probe: None }).expect("job"))
                .collect();
            self.workers.enqueue(jobs).await.expect("enqueue");
            sent += size;
        }
        let enqueued = started.elapsed();
        while self.runner.runs.load(Ordering::Relaxed) - runs_before < total {
            assert!(
                Instant::now() < deadline,
                "{} of {total} jobs ran before the deadline",
                self.runner.runs.load(Ordering::Relaxed) - runs_before
            );
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        while self.unfinished().await > 0 {
            assert!(Instant::now() < deadline, "jobs still unfinished at the deadline");
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        let seconds = started.elapsed().as_secs_f64();
        let self_cpu = cpu_seconds("self").expect("own cpu") - self_before;
        let db_cpu = cpu_since(&db_before, &backends_cpu(&self.admin, &self.database).await);
        let ran = self.runner.runs.load(Ordering::Relaxed) - runs_before;
        assert_eq!(ran, total, "every job ran exactly once");
        (seconds, enqueued.as_secs_f64(), self_cpu, db_cpu)
    }

    /// Enqueue-to-start of single jobs on an idle queue, enqueued through
    /// `through` (the workers' own `Jobs`, or the one without workers).
    async fn latency(&mut self, in_process: bool, samples: u64, gap: Duration) -> Vec<Duration> {
        let mut latencies = Vec::with_capacity(samples as usize);
        for _ in 0..samples {
            let probe = self.next_probe;
            self.next_probe += 1;
            let job = NewJob::new(&BenchNoop { probe: Some(probe) }).expect("job");
            let through = if in_process { &self.workers } else { &self.enqueuer };
            let sent = Instant::now();
            through.enqueue(vec![job]).await.expect("enqueue");
            loop {
                let (got, at) = tokio::time::timeout(Duration::from_secs(10), self.started.recv())
                    .await
                    .unwrap_or_else(|_| panic!("probe {probe} did not start within 10 s"))
                    .expect("runner alive");
                if got == probe {
                    latencies.push(at.saturating_duration_since(sent));
                    break;
                }
            }
            tokio::time::sleep(gap).await;
        }
        latencies.sort();
        latencies
    }

    /// Microseconds of one fetch that finds nothing due in `bench`.
    async fn empty_fetch(&self, calls: u32) -> f64 {
        let started = Instant::now();
        for _ in 0..calls {
            let now = clock::now();
            let leased = store::fetch(&self.db, "bench", 10, now + chrono::Duration::seconds(30), now)
                .await
                .expect("fetch");
            assert!(leased.is_empty(), "nothing is due while the fetch is timed");
        }
        started.elapsed().as_secs_f64() * 1e6 / f64::from(calls)
    }

    /// `rows` completed jobs in `bench`, spread over the last day, with
    /// time-ordered ids like the real ones; then VACUUM ANALYZE, as
    /// autovacuum would have done.
    async fn add_finished(&self, rows: u64) {
        let sql = r#"
            INSERT INTO jobs (id, queue, kind, args, state, priority, run_at, attempt, max_attempts,
                              attempted_at, errors, created_at, updated_at, finished_at)
            SELECT (lpad(to_hex((extract(epoch FROM at) * 1000)::bigint), 12, '0') || '7' || substr(h, 1, 3)
                    || '8' || substr(h, 4, 15))::uuid,
                   'bench', 'bench.noop', '{}', 'completed', 0, at, 1, 5, at, '[]', at, at, at
            FROM (SELECT now() - interval '1 day' + g * (interval '1 day' / $1) AS at,
                         md5(g::text || random()::text) AS h
                  FROM generate_series(1, $1) AS g) AS s"#;
        self.db
            .execute_raw(Statement::from_sql_and_values(
                DatabaseBackend::Postgres,
                sql,
                [i64::try_from(rows).expect("rows").into()],
            ))
            .await
            .expect("insert finished jobs");
        self.db.execute_unprepared("VACUUM ANALYZE jobs").await.expect("vacuum");
    }
}

#[tokio::main]
async fn main() {
    let total = setting("BENCH_JOBS", 50_000);
    let batch = setting("BENCH_BATCH", 1000);
    let concurrency = setting("BENCH_CONCURRENCY", 50) as usize;
    let samples = setting("BENCH_SAMPLES", 200);
    let gap = Duration::from_millis(setting("BENCH_GAP_MS", 5));
    let finished_rows = setting("BENCH_FINISHED", 0);
    let deadline = Duration::from_secs(setting("BENCH_DEADLINE_S", 120));
    let server =
        std::env::var("KEEL_BENCH_DATABASE_URL").unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".into());
    assert!(
        server.starts_with("postgres"),
        "KEEL_BENCH_DATABASE_URL must be a PostgreSQL URL"
    );
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(tracing_subscriber::EnvFilter::new(
            std::env::var("BENCH_LOG").unwrap_or_else(|_| "warn".into()),
        ))
        .init();

    let admin = keel_db::connect(&keel_db::DbSettings::new(server.clone()))
        .await
        .expect("postgres");
    let database = format!("keel_bench_jobs_{}", uuid::Uuid::now_v7().simple());
    admin
        .execute_unprepared(&format!("CREATE DATABASE \"{database}\""))
        .await
        .expect("create database (the role needs CREATEDB)");
    let url = database_url(&server, &database);
    let db = keel_db::connect(&keel_db::DbSettings::new(url.clone()))
        .await
        .expect("bench database");
    keel_db::migrate(&db).await.expect("migrations");

    let (started_tx, started_rx) = mpsc::unbounded_channel();
    let runner = Arc::new(Runner {
        runs: AtomicU64::new(0),
        started: started_tx,
    });
    let batch_completion = setting("BENCH_BATCH_COMPLETION", 1) == 1;
    // 0: the table is vacuumed by autovacuum alone.
    let vacuum_after = setting("BENCH_VACUUM_AFTER", Settings::default().vacuum_after);
    let settings = Settings {
        concurrency,
        batch_completion,
        vacuum_after,
        ..Settings::default()
    };
    let workers = Jobs::new(
        db.clone(),
        vec![JobKind::new::<BenchNoop>(runner.clone())],
        settings.clone(),
    )
    .await
    .expect("jobs");
    let tasks = BackgroundTasks::new(workers.start_tasks(&db));
    // Another keel's view: its own pool, no workers, no in-process wake-up
    // of the workers above; only PostgreSQL's NOTIFY reaches them.
    let other_db = keel_db::connect(&keel_db::DbSettings {
        max_connections: 4,
        ..keel_db::DbSettings::new(url)
    })
    .await
    .expect("second pool");
    let enqueuer = Jobs::new(
        other_db.clone(),
        vec![JobKind::new::<BenchNoop>(runner.clone())],
        Settings {
            workers: false,
            ..settings
        },
    )
    .await
    .expect("jobs without workers");

    let mut rig = Rig {
        admin,
        database: database.clone(),
        db,
        workers,
        enqueuer,
        runner,
        started: started_rx,
        next_probe: 0,
        deadline,
    };
    // The listener connects in the background: one probe through NOTIFY
    // before anything is measured.
    rig.latency(false, 1, gap).await;
    // Warm-up: connections, statement caches.
    rig.throughput(batch.min(total), batch).await;

    let mut phases = vec![("empty", 0u64)];
    if finished_rows > 0 {
        phases.push(("finished", finished_rows));
    }
    for (phase, rows) in phases {
        if rows > 0 {
            eprintln!("bench-jobs (keel): inserting {rows} finished jobs");
            let inserting = Instant::now();
            rig.add_finished(rows).await;
            eprintln!(
                "bench-jobs (keel): inserted and vacuumed in {:.1} s",
                inserting.elapsed().as_secs_f64()
            );
        }
        eprintln!("bench-jobs (keel): {phase}: {total} jobs, batches of {batch}, concurrency {concurrency}");
        let (seconds, enqueue_seconds, self_cpu, db_cpu) = rig.throughput(total, batch).await;
        let local = rig.latency(true, samples, gap).await;
        let notified = rig.latency(false, samples, gap).await;
        let fetch_us = rig.empty_fetch(500).await;
        let table_rows = {
            let row = rig
                .db
                .query_one_raw(Statement::from_string(
                    DatabaseBackend::Postgres,
                    "SELECT count(*) AS n FROM jobs",
                ))
                .await
                .expect("count")
                .expect("a row");
            row.try_get::<i64>("", "n").expect("n")
        };
        println!(
            "{}",
            serde_json::json!({
                "system": "keel",
                "phase": phase,
                "batch_completion": batch_completion,
                "vacuum_after": vacuum_after,
                "vacuums": rig.workers.vacuums().0,
                "vacuum_ms": rig.workers.vacuums().1.as_secs_f64() * 1000.0,
                "table_rows": table_rows,
                "jobs": total,
                "batch": batch,
                "concurrency": concurrency,
                "seconds": seconds,
                "rate": total as f64 / seconds,
                "enqueue_seconds": enqueue_seconds,
                "cpu_self_s": self_cpu,
                "cpu_store_s": db_cpu,
                "p50_ms": percentile(&local, 0.5),
                "p99_ms": percentile(&local, 0.99),
                "max_ms": percentile(&local, 1.0),
                "notify_p50_ms": percentile(&notified, 0.5),
                "notify_p99_ms": percentile(&notified, 0.99),
                "notify_max_ms": percentile(&notified, 1.0),
                "samples": local.len(),
                "empty_fetch_us": fetch_us,
            })
        );
    }

    tasks.stop();
    // Closed before the database is dropped, so no pooled connection is
    // cut under the pool.
    let _ = rig.db.close_by_ref().await;
    let _ = other_db.close_by_ref().await;
    rig.admin
        .execute_unprepared(&format!("DROP DATABASE IF EXISTS \"{database}\" WITH (FORCE)"))
        .await
        .expect("drop database");
}
