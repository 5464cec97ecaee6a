//! Cron schedules: jobs enqueued at the ticks of a cron expression,
//! declared in code ([`keel_kernel::Module::job_schedules`]) or in
//! configuration (`KEEL_JOBS_CRON`, see [`parse_cron_setting`]).
//!
//! Every process with workers runs every schedule; a tick is enqueued once
//! across all of them because its job is unique by the schedule's name and
//! the tick, in every state (the partial unique index decides, as for any
//! unique job): the first process's insert writes the job, every other's
//! finds it. The last tick a schedule enqueued is kept in `job_schedules`,
//! so a process that starts after ticks were missed (every process was
//! down) enqueues the latest missed tick once, not one job per missed tick.
//! A schedule nobody ran before starts at its next tick.

use std::collections::HashMap;
use std::time::Duration;

use chrono::{DateTime, Utc};
use croner::Cron;
use croner::parser::CronParser;
use keel_kernel::{Error, JobKind, JobSchedule, NewJob, Result, Unique, clock};
use sea_orm::TransactionTrait;

use crate::{Jobs, store};

/// A schedule of `KEEL_JOBS_CRON`: its job kind named, not typed.
#[derive(Debug, Clone, PartialEq)]
pub struct CronEntry {
    pub name: String,
    pub cron: String,
    pub kind: String,
    /// The job's arguments (`{}` when none are given).
    pub args: serde_json::Value,
}

/// Reads `KEEL_JOBS_CRON`: entries separated by `;`, each
/// `NAME|CRON|KIND` or `NAME|CRON|KIND|ARGS`, where `ARGS` is the job's
/// arguments as JSON (without a `;`) and `CRON` a cron expression in UTC:
/// `0 3 * * *` (minutes), `*/10 * * * * *` (seconds first) or `@hourly`.
/// Example: `digest|0 7 * * MON-FRI|mail.digest|{"team":true};tick|*/30 * * * * *|jobs.noop`.
/// Whether each kind exists is checked when the jobs module starts.
pub fn parse_cron_setting(text: &str) -> std::result::Result<Vec<CronEntry>, String> {
    let mut entries: Vec<CronEntry> = Vec::new();
    for entry in text.split(';').map(str::trim).filter(|entry| !entry.is_empty()) {
        let malformed = || format!("{entry:?} is not NAME|CRON|KIND or NAME|CRON|KIND|ARGS_JSON");
        let mut fields = entry.splitn(4, '|').map(str::trim);
        let (Some(name), Some(cron), Some(kind)) = (fields.next(), fields.next(), fields.next()) else {
            return Err(malformed());
        };
        if kind.is_empty() {
            return Err(malformed());
        }
        check_name(name)?;
        parse_cron(cron).map_err(|error| format!("schedule {name}: {error}"))?;
        let args = match fields.next() {
            Some(args) => serde_json::from_str(args)
                .map_err(|error| format!("schedule {name}: its arguments are not JSON: {error}"))?,
            None => serde_json::json!({}),
        };
        if entries.iter().any(|other| other.name == name) {
            return Err(format!("two schedules named {name}"));
        }
        entries.push(CronEntry {
            name: name.to_owned(),
            cron: cron.to_owned(),
            kind: kind.to_owned(),
            args,
        });
    }
    Ok(entries)
}

fn check_name(name: &str) -> std::result::Result<(), String> {
    let valid = name
        .chars()
        .all(|char| char.is_ascii_alphanumeric() || matches!(char, '.' | '-' | '_'));
    if name.is_empty() || name.len() > 128 || !valid {
        return Err(format!(
            "schedule name {name:?} must be 1 to 128 letters, digits, '.', '-' or '_'"
        ));
    }
    Ok(())
}

/// A cron expression: five fields (minutes), six (seconds first), an
/// optional year, or a nickname (`@daily`); read in UTC.
pub fn parse_cron(expression: &str) -> std::result::Result<Cron, String> {
    CronParser::new()
        .parse(expression)
        .map_err(|error| format!("{expression:?} is not a cron expression: {error}"))
}

/// A schedule ready to run: its parsed expression and the job of each tick.
#[derive(Debug, Clone)]
pub(crate) struct Schedule {
    pub name: String,
    cron: Cron,
    job: NewJob,
}

impl Schedule {
    /// The latest tick at or before `now` (whole seconds).
    fn latest_tick(&self, now: DateTime<Utc>) -> Option<DateTime<Utc>> {
        self.cron.find_previous_occurrence(&now, true).ok()
    }

    /// The first tick after `now`.
    fn next_tick(&self, now: DateTime<Utc>) -> Option<DateTime<Utc>> {
        self.cron.find_next_occurrence(&now, false).ok()
    }

    /// The job of `tick`: due then, unique by the schedule and the tick in
    /// every state, so a late process never enqueues a tick again after its
    /// job ran (the key outlives the job until it is pruned, and no process
    /// goes back further than the last tick recorded).
    fn job_of(&self, tick: DateTime<Utc>) -> NewJob {
        let mut job = self.job.clone();
        job.run_at = Some(tick);
        job.unique =
            Some(Unique::key(format!("schedule:{}:{}", self.name, tick.timestamp_micros())).counting_finished());
        job
    }
}

/// The schedules of a process: those of code, then those of configuration
/// (one of the same name replaces the code's: operators move or retune a
/// module's schedule without a build). Every expression, kind and queue is
/// checked here, at start.
pub(crate) fn resolve(
    code: &[JobSchedule],
    config: &[CronEntry],
    kinds: &HashMap<&'static str, JobKind>,
) -> Result<Vec<Schedule>> {
    let mut schedules: Vec<Schedule> = Vec::new();
    for schedule in code {
        check_name(&schedule.name).map_err(Error::internal)?;
        let kind = kinds.get(schedule.job.kind).ok_or_else(|| {
            Error::internal(format!(
                "schedule {}: job kind {} is not registered",
                schedule.name, schedule.job.kind
            ))
        })?;
        if kind.queue != schedule.job.queue {
            return Err(Error::internal(format!(
                "schedule {}: job kind {} runs on queue {}, not {}",
                schedule.name, kind.name, kind.queue, schedule.job.queue
            )));
        }
        if schedules.iter().any(|other| other.name == schedule.name) {
            return Err(Error::internal(format!("two schedules named {}", schedule.name)));
        }
        schedules.push(Schedule {
            name: schedule.name.clone(),
            cron: parse_cron(&schedule.cron)
                .map_err(|error| Error::internal(format!("schedule {}: {error}", schedule.name)))?,
            job: schedule.job.clone(),
        });
    }
    for entry in config {
        let kind = kinds.get(entry.kind.as_str()).ok_or_else(|| {
            Error::internal(format!(
                "KEEL_JOBS_CRON: schedule {}: job kind {} is not registered",
                entry.name, entry.kind
            ))
        })?;
        let schedule = Schedule {
            name: entry.name.clone(),
            cron: parse_cron(&entry.cron)
                .map_err(|error| Error::internal(format!("KEEL_JOBS_CRON: schedule {}: {error}", entry.name)))?,
            job: NewJob {
                kind: kind.name,
                queue: kind.queue,
                args: entry.args.clone(),
                priority: 0,
                run_at: None,
                max_attempts: kind.max_attempts,
                user_id: None,
                timeout: None,
                unique: None,
            },
        };
        match schedules.iter_mut().find(|other| other.name == entry.name) {
            Some(replaced) => {
                tracing::info!(schedule = %entry.name, cron = %entry.cron, "KEEL_JOBS_CRON replaces a schedule of code");
                *replaced = schedule;
            }
            None => schedules.push(schedule),
        }
    }
    Ok(schedules)
}

/// The longest the scheduler sleeps: a bound on how long a jump of the
/// wall clock (or a lost timer) can delay a tick.
const MAX_SLEEP: Duration = Duration::from_secs(60);
/// How soon a tick that could not be enqueued (the database away) is tried
/// again.
const RETRY: Duration = Duration::from_secs(1);

/// Enqueues every schedule's ticks as they come, for as long as the
/// process runs.
pub(crate) async fn run_scheduler(jobs: Jobs) {
    let schedules = jobs.schedules();
    if schedules.is_empty() {
        return;
    }
    let recorded = loop {
        match store::schedule_ticks(jobs.db()).await {
            Ok(recorded) => break recorded,
            Err(error) => {
                tracing::warn!(error = %error, "reading the job schedules' last ticks failed; retrying");
                tokio::time::sleep(RETRY).await;
            }
        }
    };
    let started = clock::now();
    // The last tick of each schedule enqueued (by any process); one never
    // run starts after now.
    let mut last: Vec<DateTime<Utc>> = schedules
        .iter()
        .map(|schedule| recorded.get(&schedule.name).copied().unwrap_or(started))
        .collect();
    loop {
        let now = clock::now();
        let mut failed = false;
        for (schedule, last) in schedules.iter().zip(last.iter_mut()) {
            // Only the latest due tick: ticks missed before it (the process
            // was down, or paused) are skipped, not enqueued in a flood.
            let Some(tick) = schedule.latest_tick(now).filter(|tick| tick > last) else {
                continue;
            };
            match enqueue_tick(&jobs, schedule, tick).await {
                Ok(()) => *last = tick,
                Err(error) => {
                    failed = true;
                    tracing::warn!(schedule = %schedule.name, tick = %tick, error = %error, "enqueueing a scheduled job failed");
                }
            }
        }
        let now = clock::now();
        let mut sleep = MAX_SLEEP;
        if failed {
            sleep = RETRY;
        }
        for schedule in schedules {
            if let Some(next) = schedule.next_tick(now) {
                sleep = sleep.min((next - now).to_std().unwrap_or(Duration::ZERO));
            }
        }
        // Waking a hair early finds the previous tick (done) and sleeps
        // again to the next one, which is this one.
        tokio::time::sleep(sleep.max(Duration::from_millis(1))).await;
    }
}

/// Enqueues `tick`'s job unless another process did, and records the tick
/// with it, in one transaction.
async fn enqueue_tick(jobs: &Jobs, schedule: &Schedule, tick: DateTime<Utc>) -> Result<()> {
    let now = clock::now();
    let tx = jobs
        .db()
        .begin_with_options(keel_kernel::bus::write_transaction())
        .await?;
    let enqueued = store::insert_reporting(&tx, vec![schedule.job_of(tick)], now, jobs.channel()).await?;
    let Some(enqueued) = enqueued.first().copied() else {
        return Err(Error::internal("a scheduled job's insert reported nothing"));
    };
    if enqueued.duplicate {
        tx.rollback().await?;
        tracing::debug!(schedule = %schedule.name, tick = %tick, job_id = %enqueued.id, "tick already enqueued by another process");
        return Ok(());
    }
    store::record_tick(&tx, &schedule.name, tick, now).await?;
    tx.commit().await?;
    jobs.wake_all();
    tracing::debug!(schedule = %schedule.name, tick = %tick, job_id = %enqueued.id, "scheduled job enqueued");
    Ok(())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn the_setting_reads_entries_with_and_without_arguments() {
        let entries =
            parse_cron_setting(r#" digest|0 7 * * MON-FRI|mail.digest|{"team":true} ; tick|*/30 * * * * *|jobs.noop;"#)
                .unwrap();
        assert_eq!(entries.len(), 2);
        assert_eq!(entries[0].name, "digest");
        assert_eq!(entries[0].cron, "0 7 * * MON-FRI");
        assert_eq!(entries[0].kind, "mail.digest");
        assert_eq!(entries[0].args, serde_json::json!({"team": true}));
        assert_eq!(entries[1].args, serde_json::json!({}));
        assert!(parse_cron_setting("").unwrap().is_empty());
    }

    #[test]
    fn the_setting_refuses_what_it_cannot_read() {
        for (text, says) in [
            ("digest|0 7 * * *", "NAME|CRON|KIND"),
            ("digest|not cron|mail.digest", "not a cron expression"),
            ("digest|61 * * * *|mail.digest", "not a cron expression"),
            ("di gest|0 7 * * *|mail.digest", "schedule name"),
            ("digest|0 7 * * *|mail.digest|{nope", "not JSON"),
            ("a|@daily|x;a|@hourly|x", "two schedules named a"),
        ] {
            let error = parse_cron_setting(text).unwrap_err();
            assert!(error.contains(says), "{text}: {error}");
        }
    }

    #[test]
    fn ticks_are_whole_seconds_in_utc() {
        let every_second = parse_cron("* * * * * *").unwrap();
        let schedule = Schedule {
            name: "t".into(),
            cron: every_second,
            job: NewJob::new(&crate::Noop {
                sleep_ms: 0,
                ..Default::default()
            })
            .unwrap(),
        };
        let now: DateTime<Utc> = "2026-12-03T10:00:05.250Z".parse().unwrap();
        let at = |text: &str| text.parse::<DateTime<Utc>>().unwrap();
        assert_eq!(schedule.latest_tick(now), Some(at("2026-12-03T10:00:05Z")));
        assert_eq!(schedule.next_tick(now), Some(at("2026-12-03T10:00:06Z")));
        let on_the_tick = at("2026-12-03T10:00:05Z");
        assert_eq!(schedule.latest_tick(on_the_tick), Some(on_the_tick));
        assert_eq!(schedule.next_tick(on_the_tick), Some(at("2026-12-03T10:00:06Z")));

        let daily = parse_cron("0 3 * * *").unwrap();
        let schedule = Schedule {
            cron: daily,
            ..schedule
        };
        assert_eq!(schedule.latest_tick(now), Some(at("2026-12-03T03:00:00Z")));
        assert_eq!(schedule.next_tick(now), Some(at("2026-12-04T03:00:00Z")));
        let job = schedule.job_of(at("2026-12-04T03:00:00Z"));
        assert_eq!(job.run_at, Some(at("2026-12-04T03:00:00Z")));
        assert!(job.unique.unwrap().completed);
    }
}
