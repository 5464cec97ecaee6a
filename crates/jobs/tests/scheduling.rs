//! Scheduling on every database (SQLite, PostgreSQL): unique jobs held by
//! the database, cron schedules that fire once per tick across processes
//! and catch up once, pruning by retention, and a fetch that leaves kinds a
//! process does not know to the processes that do.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use chrono::{DateTime, Datelike, TimeZone, Utc};
use keel_jobs::prune::{Pruned, Retention};
use keel_jobs::{JobState, Jobs, Settings, store};
use keel_kernel::{
    BackgroundTasks, Bus, BusBuilder, Command, CommandContext, CommandHandler, Job, JobContext, JobError, JobHandler,
    JobKind, JobSchedule, Module, NewJob, RequestContext, Result, Unique, clock,
};
use keel_testkit::{Backend, TestDatabase};
use sea_orm::{ConnectionTrait, Statement};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

/// Counts its runs by key.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Count {
    key: String,
}

impl Job for Count {
    const KIND: &'static str = "test.count";
}

/// A kind only some processes have.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Rare {
    key: String,
}

impl Job for Rare {
    const KIND: &'static str = "test.rare";
}

#[derive(Default, Clone)]
struct Runs(Arc<Mutex<HashMap<String, usize>>>);

impl Runs {
    fn note(&self, key: &str) {
        *self.0.lock().unwrap().entry(key.to_owned()).or_default() += 1;
    }

    fn of(&self, key: &str) -> usize {
        self.0.lock().unwrap().get(key).copied().unwrap_or_default()
    }
}

#[async_trait]
impl JobHandler<Count> for Runs {
    async fn run(&self, _ctx: &JobContext, job: Count) -> std::result::Result<(), JobError> {
        self.note(&job.key);
        Ok(())
    }
}

#[async_trait]
impl JobHandler<Rare> for Runs {
    async fn run(&self, _ctx: &JobContext, job: Rare) -> std::result::Result<(), JobError> {
        self.note(&job.key);
        Ok(())
    }
}

/// Enqueues its job in the command's transaction.
struct PlaceOrder {
    job: NewJob,
}

impl Command for PlaceOrder {
    const NAME: &'static str = "test.place_order";
    type Output = Uuid;
}

struct Orders;

#[async_trait]
impl CommandHandler<PlaceOrder> for Orders {
    async fn handle(&self, ctx: &CommandContext<'_>, command: PlaceOrder) -> Result<Uuid> {
        ctx.enqueue(command.job).await
    }
}

fn settings() -> Settings {
    Settings {
        // Nothing but wake-ups and due times moves a worker in these tests.
        poll: Duration::from_secs(3600),
        rescue_every: Duration::from_secs(3600),
        prune_every: Duration::from_secs(3600),
        ..Settings::default()
    }
}

fn idle() -> Settings {
    Settings {
        workers: false,
        ..settings()
    }
}

struct Rig {
    database: TestDatabase,
    jobs: Jobs,
    bus: Bus,
    runs: Runs,
    _tasks: BackgroundTasks,
}

async fn rig(backend: Backend, settings: Settings) -> Rig {
    let database = TestDatabase::new(backend).await;
    process(database, Runs::default(), settings).await
}

/// A keel process's jobs module on `database` (with kinds `test.count` and
/// `test.rare`).
async fn process(database: TestDatabase, runs: Runs, settings: Settings) -> Rig {
    let db = database.db.clone();
    let kinds = vec![JobKind::new::<Count>(runs.clone()), JobKind::new::<Rare>(runs.clone())];
    let jobs = Jobs::new(db.clone(), kinds, settings).await.unwrap();
    let mut bus = BusBuilder::new(db.clone());
    jobs.register(&mut bus);
    bus.command(Orders);
    let tasks = BackgroundTasks::new(jobs.start_tasks(&db));
    Rig {
        database,
        jobs,
        bus: bus.build(),
        runs,
        _tasks: tasks,
    }
}

/// Another process on the same database, with only `kinds`.
async fn another_process(rig: &Rig, kinds: Vec<JobKind>, settings: Settings) -> (Jobs, BackgroundTasks) {
    let jobs = Jobs::new(rig.database.db.clone(), kinds, settings).await.unwrap();
    let tasks = BackgroundTasks::new(jobs.start_tasks(&rig.database.db));
    (jobs, tasks)
}

impl Rig {
    fn db(&self) -> &sea_orm::DatabaseConnection {
        &self.database.db
    }

    async fn place(&self, job: NewJob) -> Result<Uuid> {
        self.bus.execute(&RequestContext::system(), PlaceOrder { job }).await
    }

    /// `(run_at, args)` of every job of `kind`.
    async fn jobs_of(&self, kind: &str) -> Vec<(DateTime<Utc>, serde_json::Value)> {
        let backend = self.db().get_database_backend();
        let rows = self
            .db()
            .query_all_raw(Statement::from_sql_and_values(
                backend,
                "SELECT run_at, args FROM jobs WHERE kind = $1 ORDER BY run_at",
                [kind.into()],
            ))
            .await
            .unwrap();
        rows.into_iter()
            .map(|row| {
                let args: String = row.try_get("", "args").unwrap();
                (row.try_get("", "run_at").unwrap(), serde_json::from_str(&args).unwrap())
            })
            .collect()
    }
}

fn count(key: &str) -> NewJob {
    NewJob::new(&Count { key: key.to_owned() }).unwrap()
}

/// 50 commands at once enqueue the same unique job, each in its own
/// transaction: one job is written and every command gets its id. Without
/// the partial unique index the upsert has no conflict target and fails.
async fn fifty_concurrent_unique_enqueues_leave_one_job(backend: Backend) {
    let rig = Arc::new(rig(backend, idle()).await);
    let start = Arc::new(tokio::sync::Barrier::new(50));
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..50 {
        let rig = rig.clone();
        let start = start.clone();
        tasks.spawn(async move {
            start.wait().await;
            rig.place(count("order-1").unique(Unique::key("order-1")))
                .await
                .unwrap()
        });
    }
    let ids: Vec<Uuid> = tasks.join_all().await;
    assert_eq!(ids.len(), 50);
    assert!(ids.iter().all(|id| *id == ids[0]), "{ids:?}");
    assert_eq!(store::count(rig.db()).await.unwrap(), 1);
    let job = rig.jobs.get(ids[0]).await.unwrap().unwrap();
    assert_eq!(job.state, JobState::Available);
    // Another key, and the same key for another kind, are other jobs.
    let other_key = rig
        .place(count("order-2").unique(Unique::key("order-2")))
        .await
        .unwrap();
    let other_kind = rig
        .place(
            NewJob::new(&Rare { key: "order-1".into() })
                .unwrap()
                .unique(Unique::key("order-1")),
        )
        .await
        .unwrap();
    assert_ne!(other_key, ids[0]);
    assert_ne!(other_kind, ids[0]);
    assert_eq!(store::count(rig.db()).await.unwrap(), 3);
}

/// A key counts in the states it names: by default available and running
/// (a finished job lets the next one in), with `counting_completed` a
/// completed one too. One batch naming a key twice writes one job.
async fn a_unique_job_counts_in_its_states(backend: Backend) {
    let rig = rig(backend, idle()).await;
    let db = rig.db();
    let later = || clock::now() + chrono::Duration::seconds(30);

    let ids = rig
        .jobs
        .enqueue(vec![
            count("a").unique(Unique::key("a")),
            count("a").unique(Unique::key("a")),
            count("plain"),
        ])
        .await
        .unwrap();
    assert_eq!(ids[0], ids[1]);
    assert_eq!(store::count(db).await.unwrap(), 2);
    let reported = store::insert_reporting(db, vec![count("a").unique(Unique::key("a"))], clock::now(), None)
        .await
        .unwrap();
    assert_eq!(
        reported[0],
        store::Enqueued {
            id: ids[0],
            duplicate: true
        }
    );

    // Running still counts.
    let leased = store::fetch(db, "default", 1, later(), clock::now()).await.unwrap();
    assert_eq!(leased[0].id, ids[0]);
    assert_eq!(
        rig.jobs
            .enqueue(vec![count("a").unique(Unique::key("a"))])
            .await
            .unwrap(),
        [ids[0]]
    );
    // Completed does not, by default.
    assert!(
        store::complete(db, &leased[0].lease().unwrap(), clock::now())
            .await
            .unwrap()
    );
    let next = rig
        .jobs
        .enqueue(vec![count("a").unique(Unique::key("a"))])
        .await
        .unwrap()[0];
    assert_ne!(next, ids[0]);

    // Counting completed jobs: once ever (until pruned).
    let once = || count("b").unique(Unique::key("b").counting_completed());
    let [first] = rig.jobs.enqueue(vec![once()]).await.unwrap()[..] else {
        panic!("one id")
    };
    let leased = store::fetch(db, "default", 10, later(), clock::now()).await.unwrap();
    let lease = leased.iter().find(|job| job.id == first).unwrap().lease().unwrap();
    assert!(store::complete(db, &lease, clock::now()).await.unwrap());
    assert_eq!(rig.jobs.enqueue(vec![once()]).await.unwrap(), [first]);
    assert_eq!(rig.jobs.get(first).await.unwrap().unwrap().state, JobState::Completed);
}

/// A batch of more unique jobs than one statement takes: each key is
/// written once and both its enqueues get its id.
async fn a_large_batch_of_unique_jobs_keeps_each_key_once(backend: Backend) {
    let rig = rig(backend, idle()).await;
    let keys: Vec<String> = (0..1250).map(|index| format!("bulk-{index}")).collect();
    let jobs = keys
        .iter()
        .chain(keys.iter())
        .map(|key| count(key).unique(Unique::key(key.clone())))
        .collect();
    let ids = rig.jobs.enqueue(jobs).await.unwrap();
    assert_eq!(ids.len(), 2500);
    assert_eq!(ids[..1250], ids[1250..]);
    assert_eq!(ids[..1250].iter().collect::<std::collections::HashSet<_>>().len(), 1250);
    assert_eq!(store::count(rig.db()).await.unwrap(), 1250);
}

/// With a period, the key holds within one period (aligned to the epoch):
/// the next period admits a second job though the first still waits.
async fn a_unique_period_lets_a_second_job_in_after_the_period(backend: Backend) {
    let rig = rig(backend, idle()).await;
    let db = rig.db();
    let hourly = || count("report").unique(Unique::key("report").period(Duration::from_secs(3600)));
    let hour = Utc.with_ymd_and_hms(2026, 12, 3, 10, 0, 0).unwrap();
    let at = |minutes: i64| hour + chrono::Duration::minutes(minutes);

    let first = store::insert(db, vec![hourly()], at(10), None).await.unwrap()[0];
    assert_eq!(store::insert(db, vec![hourly()], at(59), None).await.unwrap(), [first]);
    let second = store::insert(db, vec![hourly()], at(60), None).await.unwrap()[0];
    assert_ne!(second, first);
    assert_eq!(
        store::insert(db, vec![hourly()], at(119), None).await.unwrap(),
        [second]
    );
    let third = store::insert(db, vec![hourly()], at(125), None).await.unwrap()[0];
    assert_ne!(third, second);
    assert_eq!(store::count_in_state(db, JobState::Available).await.unwrap(), 3);
    // Without a period, the same key stays one job across the hours.
    let forever = || count("report").unique(Unique::key("report"));
    let one = store::insert(db, vec![forever()], at(0), None).await.unwrap()[0];
    assert_eq!(store::insert(db, vec![forever()], at(600), None).await.unwrap(), [one]);
}

/// Two processes run one schedule that ticks every second: each tick is
/// enqueued (and run) once.
async fn a_schedule_in_two_processes_fires_once_per_tick(backend: Backend) {
    let every_second = || Settings {
        schedules: vec![JobSchedule::new("every-second", "* * * * * *", count("tick"))],
        ..settings()
    };
    let first = rig(backend, every_second()).await;
    let (_second, _second_tasks) =
        another_process(&first, vec![JobKind::new::<Count>(first.runs.clone())], every_second()).await;
    let deadline = Instant::now() + Duration::from_secs(20);
    let ticks = loop {
        let ticks = first.jobs_of(Count::KIND).await;
        if ticks.len() >= 4 {
            break ticks;
        }
        assert!(Instant::now() < deadline, "the schedule fired {} times", ticks.len());
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let mut per_tick: BTreeMap<DateTime<Utc>, usize> = BTreeMap::new();
    for (tick, _) in &ticks {
        *per_tick.entry(*tick).or_default() += 1;
    }
    assert!(per_tick.values().all(|count| *count == 1), "{per_tick:#?}");
    for tick in per_tick.keys() {
        assert_eq!(tick.timestamp_subsec_micros(), 0, "ticks are whole seconds: {tick}");
    }
    // Each job ran once, in one of the two processes.
    let deadline = Instant::now() + Duration::from_secs(10);
    while store::count_in_state(first.db(), JobState::Completed).await.unwrap() < ticks.len() as u64 {
        assert!(Instant::now() < deadline, "not every tick's job ran");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let ran = first.runs.of("tick");
    let enqueued = first.jobs_of(Count::KIND).await.len();
    assert!(ran >= ticks.len() && ran <= enqueued, "ran {ran}, enqueued {enqueued}");
}

/// A schedule whose last tick is a year old enqueues the latest missed tick
/// once (not one per missed tick); a schedule never run before waits for
/// its next tick.
async fn a_process_that_was_down_catches_up_one_tick(backend: Backend) {
    let database = TestDatabase::new(backend).await;
    let now = clock::now();
    let this_new_year = Utc.with_ymd_and_hms(now.year(), 1, 1, 0, 0, 0).unwrap();
    let two_years_ago = Utc.with_ymd_and_hms(now.year() - 2, 1, 1, 0, 0, 0).unwrap();
    store::record_tick(&database.db, "yearly-caught-up", two_years_ago, now)
        .await
        .unwrap();
    let rig = process(
        database,
        Runs::default(),
        Settings {
            schedules: vec![
                JobSchedule::new("yearly-caught-up", "0 0 1 1 *", count("caught-up")),
                JobSchedule::new("yearly-new", "0 0 1 1 *", count("new")),
            ],
            ..settings()
        },
    )
    .await;
    let deadline = Instant::now() + Duration::from_secs(10);
    while rig.runs.of("caught-up") == 0 {
        assert!(Instant::now() < deadline, "no catch-up");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let jobs = rig.jobs_of(Count::KIND).await;
    assert_eq!(jobs.len(), 1, "{jobs:?}");
    assert_eq!(jobs[0].0, this_new_year);
    assert_eq!(jobs[0].1, serde_json::json!({"key": "caught-up"}));
    let ticks = store::schedule_ticks(rig.db()).await.unwrap();
    assert_eq!(ticks.get("yearly-caught-up"), Some(&this_new_year));
    assert_eq!(ticks.get("yearly-new"), None);
}

/// A finished job at `finished` in `state` (leased and finished through the
/// worker's own fenced writes; `cancelled` set as an admin would).
async fn finished_job(rig: &Rig, key: &str, state: JobState, finished: DateTime<Utc>) -> Uuid {
    let db = rig.db();
    let id = store::insert(db, vec![count(key)], finished, None).await.unwrap()[0];
    let leased = store::fetch(db, "default", 1, finished + chrono::Duration::seconds(30), finished)
        .await
        .unwrap();
    let lease = leased[0].lease().unwrap();
    assert_eq!(lease.id, id);
    match state {
        JobState::Completed => assert!(store::complete(db, &lease, finished).await.unwrap()),
        JobState::Failed => assert!(store::fail(db, &lease, &[], finished).await.unwrap()),
        JobState::Cancelled => {
            let backend = db.get_database_backend();
            db.execute_raw(Statement::from_sql_and_values(
                backend,
                "UPDATE jobs SET state = 'cancelled', lease_token = NULL, leased_until = NULL, finished_at = $1 \
                 WHERE id = $2",
                [finished.into(), id.into()],
            ))
            .await
            .unwrap();
        }
        _ => unreachable!("{state:?} is not finished"),
    }
    id
}

/// Completed and cancelled jobs older than their retention (24 h) and
/// failed ones older than theirs (7 days) are deleted, in batches; every
/// other job stays, however old.
async fn pruning_deletes_exactly_the_old_finished_jobs(backend: Backend) {
    let rig = rig(backend, idle()).await;
    let now = clock::now();
    let ago = |hours: i64| now - chrono::Duration::hours(hours);
    let mut doomed = Vec::new();
    for index in 0..4 {
        doomed.push(finished_job(&rig, &format!("old-{index}"), JobState::Completed, ago(25 + index)).await);
    }
    doomed.push(finished_job(&rig, "old-cancelled", JobState::Cancelled, ago(30)).await);
    doomed.push(finished_job(&rig, "old-failed", JobState::Failed, ago(8 * 24)).await);
    let mut kept = vec![
        finished_job(&rig, "recent", JobState::Completed, ago(23)).await,
        finished_job(&rig, "recent-cancelled", JobState::Cancelled, ago(1)).await,
        finished_job(&rig, "recent-failed", JobState::Failed, ago(6 * 24)).await,
    ];
    // Unfinished jobs created long ago: running, and waiting.
    let running = store::insert(rig.db(), vec![count("running")], ago(30 * 24), None)
        .await
        .unwrap()[0];
    let leased = store::fetch(rig.db(), "default", 1, now + chrono::Duration::hours(1), ago(30 * 24))
        .await
        .unwrap();
    assert_eq!(leased[0].id, running);
    kept.push(running);
    kept.extend(
        store::insert(rig.db(), vec![count("waiting")], ago(30 * 24), None)
            .await
            .unwrap(),
    );
    let total = store::count(rig.db()).await.unwrap();

    let pruned = keel_jobs::prune::prune(rig.db(), now, Retention::default(), 2)
        .await
        .unwrap();
    assert_eq!(
        pruned,
        Pruned {
            completed: 4,
            cancelled: 1,
            failed: 1
        }
    );
    for id in &doomed {
        assert!(rig.jobs.get(*id).await.unwrap().is_none(), "{id} was kept");
    }
    for id in &kept {
        assert!(rig.jobs.get(*id).await.unwrap().is_some(), "{id} was deleted");
    }
    assert_eq!(store::count(rig.db()).await.unwrap(), total - 6);
    let again = keel_jobs::prune::prune(rig.db(), now, Retention::default(), 2)
        .await
        .unwrap();
    assert_eq!(again.total(), 0);
}

/// The pruner runs by itself in a process with workers.
async fn the_pruner_runs_on_its_own(backend: Backend) {
    let rig = rig(
        backend,
        Settings {
            prune_every: Duration::from_millis(50),
            retention: Retention {
                completed: Duration::from_millis(1),
                failed: Duration::from_secs(3600),
            },
            ..settings()
        },
    )
    .await;
    let id = rig.place(count("short-lived")).await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while rig.jobs.get(id).await.unwrap().is_some() {
        assert!(Instant::now() < deadline, "the completed job was never pruned");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(rig.runs.of("short-lived"), 1);
}

/// A process without `test.rare` leaves its job alone (it used to take and
/// fail it); a process with the kind runs it.
async fn a_process_without_a_kind_leaves_its_jobs_to_one_that_has_it(backend: Backend) {
    // The first process runs only `test.count`; its bus enqueues `test.rare`
    // through the second process's registry.
    let database = TestDatabase::new(backend).await;
    let runs = Runs::default();
    let without = Jobs::new(
        database.db.clone(),
        vec![JobKind::new::<Count>(runs.clone())],
        settings(),
    )
    .await
    .unwrap();
    let _without_tasks = BackgroundTasks::new(without.start_tasks(&database.db));
    let with = Jobs::new(
        database.db.clone(),
        vec![JobKind::new::<Count>(runs.clone()), JobKind::new::<Rare>(runs.clone())],
        idle(),
    )
    .await
    .unwrap();
    let [rare] = with
        .enqueue(vec![NewJob::new(&Rare { key: "rare".into() }).unwrap()])
        .await
        .unwrap()[..]
    else {
        panic!("one id")
    };
    // Enqueued after it, on the same queue: once it has run, the first
    // process has fetched past the rare job (which comes first in order).
    let [after] = without.enqueue(vec![count("after")]).await.unwrap()[..] else {
        panic!("one id")
    };
    let deadline = Instant::now() + Duration::from_secs(10);
    while without.get(after).await.unwrap().unwrap().state != JobState::Completed {
        assert!(Instant::now() < deadline, "the known kind never ran");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let job = with.get(rare).await.unwrap().unwrap();
    assert_eq!((job.state, job.attempt), (JobState::Available, 0), "{job:#?}");
    assert!(job.errors.is_empty(), "{:?}", job.errors);

    // A process that has the kind runs it.
    let runner = Jobs::new(
        database.db.clone(),
        vec![JobKind::new::<Rare>(runs.clone())],
        settings(),
    )
    .await
    .unwrap();
    let _runner_tasks = BackgroundTasks::new(runner.start_tasks(&database.db));
    runner.enqueue(Vec::new()).await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while runner.get(rare).await.unwrap().unwrap().state != JobState::Completed {
        assert!(Instant::now() < deadline, "the rare kind never ran");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(runs.of("rare"), 1);
}

/// Bad schedules are refused when the module starts, naming the schedule.
async fn bad_schedules_are_refused_at_start(backend: Backend) {
    let database = TestDatabase::new(backend).await;
    let runs = Runs::default();
    let start = |schedules: Vec<JobSchedule>, cron: &str| {
        let db = database.db.clone();
        let runs = runs.clone();
        let cron = keel_jobs::schedule::parse_cron_setting(cron).unwrap();
        async move {
            Jobs::new(
                db,
                vec![JobKind::new::<Count>(runs)],
                Settings {
                    schedules,
                    cron,
                    ..idle()
                },
            )
            .await
            .err()
            .map(|error| error.to_string())
        }
    };
    let unknown = NewJob::new(&Rare { key: "x".into() }).unwrap();
    let error = start(vec![JobSchedule::new("rare", "@hourly", unknown)], "")
        .await
        .unwrap();
    assert!(error.contains("rare") && error.contains("not registered"), "{error}");
    let error = start(vec![JobSchedule::new("count", "every hour", count("x"))], "")
        .await
        .unwrap();
    assert!(error.contains("count") && error.contains("cron"), "{error}");
    let error = start(Vec::new(), "nightly|@daily|test.nobody").await.unwrap();
    assert!(
        error.contains("KEEL_JOBS_CRON") && error.contains("test.nobody"),
        "{error}"
    );
    // Configuration may replace a schedule of code by its name.
    assert_eq!(
        start(
            vec![JobSchedule::new("count", "@hourly", count("x"))],
            "count|@daily|test.count"
        )
        .await,
        None
    );
}

keel_testkit::on_every_backend!(
    fifty_concurrent_unique_enqueues_leave_one_job,
    a_unique_job_counts_in_its_states,
    a_large_batch_of_unique_jobs_keeps_each_key_once,
    a_unique_period_lets_a_second_job_in_after_the_period,
    a_schedule_in_two_processes_fires_once_per_tick,
    a_process_that_was_down_catches_up_one_tick,
    pruning_deletes_exactly_the_old_finished_jobs,
    the_pruner_runs_on_its_own,
    a_process_without_a_kind_leaves_its_jobs_to_one_that_has_it,
    bad_schedules_are_refused_at_start,
);
