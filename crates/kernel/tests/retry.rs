//! The contract of the one retry / dead-letter decision that durable event
//! handlers and jobs share: attempts left and a retryable error give a
//! retry at a backed-off, jittered time; the last attempt or an error that
//! says "do not retry" gives up; either way the failure is recorded.

#![allow(clippy::unwrap_used)]

use std::time::Duration;

use chrono::{DateTime, TimeZone, Utc};
use keel_kernel::Error;
use keel_kernel::backoff::Backoff;
use keel_kernel::retry::{AttemptFailure, Decision, RetryPolicy};

fn at(seconds: i64) -> DateTime<Utc> {
    Utc.timestamp_opt(1_800_000_000 + seconds, 0).unwrap()
}

fn policy(max_attempts: u32) -> RetryPolicy {
    RetryPolicy::new(
        Backoff::new(Duration::from_millis(100), Duration::from_secs(1)),
        max_attempts,
    )
}

fn retry_delay(decision: &Decision, now: DateTime<Utc>) -> Duration {
    match decision {
        Decision::Retry { at, delay, .. } => {
            assert_eq!(
                (*at - now).to_std().unwrap(),
                *delay,
                "the retry falls due `delay` after the failure"
            );
            *delay
        }
        Decision::GiveUp { .. } => panic!("expected a retry, got {decision:?}"),
    }
}

#[test]
fn a_retryable_failure_with_attempts_left_retries_after_a_growing_jittered_delay() {
    let policy = policy(10);
    let error = Error::unavailable("smtp: connection refused");
    let now = at(0);
    let mut firsts = std::collections::BTreeSet::new();
    for _ in 0..50 {
        let first = retry_delay(&policy.decide(1, &error, true, now), now);
        assert!(
            (Duration::from_millis(50)..=Duration::from_millis(100)).contains(&first),
            "{first:?}"
        );
        firsts.insert(first);
        let third = retry_delay(&policy.decide(3, &error, true, now), now);
        assert!(
            (Duration::from_millis(200)..=Duration::from_millis(400)).contains(&third),
            "{third:?}"
        );
        let capped = retry_delay(&policy.decide(9, &error, true, now), now);
        assert!(
            (Duration::from_millis(500)..=Duration::from_secs(1)).contains(&capped),
            "{capped:?}"
        );
    }
    assert!(firsts.len() > 1, "the delay is jittered: 50 draws gave {firsts:?}");
}

#[test]
fn the_last_attempt_gives_up_with_the_failure_recorded() {
    let policy = policy(3);
    let error = Error::unavailable("smtp: connection refused");
    assert!(matches!(policy.decide(2, &error, true, at(5)), Decision::Retry { .. }));
    let decision = policy.decide(3, &error, true, at(7));
    assert_eq!(
        decision,
        Decision::GiveUp {
            failure: AttemptFailure {
                attempt: 3,
                at: at(7),
                message: error.to_string(),
            }
        }
    );
    // An attempt past the last (a rescued job) gives up too.
    assert!(matches!(policy.decide(4, &error, true, at(8)), Decision::GiveUp { .. }));
}

#[test]
fn an_error_that_says_do_not_retry_gives_up_at_the_first_attempt() {
    let decision = policy(10).decide(1, &Error::invalid_field("to", "not an address"), false, at(1));
    let Decision::GiveUp { failure } = decision else {
        panic!("expected to give up, got {decision:?}");
    };
    assert_eq!(failure.attempt, 1);
    assert_eq!(failure.at, at(1));
    assert_eq!(failure.message, "INVALID_ARGUMENT: to: not an address");
}

#[test]
fn a_retry_records_the_failure_it_was_decided_on() {
    let error = Error::internal("handler broke");
    let decision = policy(5).decide(2, &error, true, at(3));
    assert!(matches!(decision, Decision::Retry { .. }));
    assert_eq!(
        decision.failure(),
        &AttemptFailure {
            attempt: 2,
            at: at(3),
            message: error.to_string(),
        }
    );
    // The cause is kept in the record (operators read it), not only the
    // client-facing "internal error".
    assert!(decision.into_failure().message.contains("handler broke"));
}

#[test]
fn zero_attempts_means_the_one_that_failed() {
    let decision = policy(0).decide(1, &Error::unavailable("down"), true, at(0));
    assert!(matches!(decision, Decision::GiveUp { .. }), "{decision:?}");
}
