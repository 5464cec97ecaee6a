//! The policy of calls to the outside (the SMTP relay now, AI providers
//! later): every attempt is bounded by a timeout, transient failures are
//! retried a few times with the kernel's [`Backoff`] (jittered), and a
//! circuit breaker stops calling a target that keeps failing.
//!
//! The breaker counts consecutive transient failures (UNAVAILABLE,
//! DEADLINE_EXCEEDED, timeouts). After `failures` of them it opens: calls
//! fail at once with UNAVAILABLE, without reaching the target, for
//! `cool_down`. Then it is half-open: the next call goes through as the one
//! trial (others still fail fast while it runs); its success closes the
//! breaker, its failure opens it for another cool-down. An error that is
//! not transient (a refused recipient) is the target answering: it neither
//! trips the breaker nor is retried.
//!
//! Durable work that makes outbound calls (event handlers, jobs) keeps its
//! own, longer retries ([`crate::retry`]): the in-call retries here only
//! smooth over a blip, and an open breaker turns each of that work's
//! attempts into a quick failure instead of a timeout.
//!
//! Why not tower's `Timeout`/`Retry` layers or a breaker crate: the calls
//! guarded here are trait methods (`Mailer::send`), not tower services, and
//! the breaker's state must be read (by `/readyz` and `/metrics`) and its
//! clock controlled in tests; failsafe, the most used breaker crate, reports
//! its state through callbacks and has no clock a test can move.

use std::future::Future;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use crate::backoff::Backoff;
use crate::error::{Code, Error, Result};

/// Timeout, retries and breaker of one outbound target.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OutboundPolicy {
    /// The longest one attempt may take.
    pub timeout: Duration,
    /// Attempts per call, the first included (at least 1).
    pub attempts: u32,
    /// The delay between attempts of one call.
    pub backoff: Backoff,
    pub breaker: BreakerSettings,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BreakerSettings {
    /// Consecutive transient failures that open the breaker (at least 1).
    pub failures: u32,
    /// How long an open breaker refuses calls before it lets a trial through.
    pub cool_down: Duration,
}

impl Default for OutboundPolicy {
    fn default() -> Self {
        Self {
            timeout: Duration::from_secs(10),
            attempts: 2,
            backoff: Backoff::new(Duration::from_millis(200), Duration::from_secs(2)),
            breaker: BreakerSettings {
                failures: 5,
                cool_down: Duration::from_secs(30),
            },
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BreakerState {
    Closed,
    Open,
    HalfOpen,
}

impl BreakerState {
    pub fn as_str(self) -> &'static str {
        match self {
            BreakerState::Closed => "closed",
            BreakerState::Open => "open",
            BreakerState::HalfOpen => "half_open",
        }
    }
}

/// What a breaker looks like now (for `/readyz` and `/metrics`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BreakerSnapshot {
    pub target: &'static str,
    pub state: BreakerState,
    pub consecutive_failures: u32,
    /// Times it opened since the process started.
    pub opened_total: u64,
    /// Calls refused without reaching the target.
    pub rejected_total: u64,
    /// While open: how long until a trial is let through.
    pub half_open_in: Option<Duration>,
}

/// Where a breaker reads the time: the monotonic clock, or a test's.
pub type Clock = Arc<dyn Fn() -> Instant + Send + Sync>;

enum Phase {
    Closed,
    Open {
        since: Instant,
    },
    /// Half-open with the trial call in flight.
    Trial {
        opened: Instant,
    },
}

struct Inner {
    phase: Phase,
    consecutive_failures: u32,
    opened_total: u64,
    rejected_total: u64,
}

/// A circuit breaker for one target.
pub struct Breaker {
    target: &'static str,
    settings: BreakerSettings,
    clock: Clock,
    // A std mutex: held for a few comparisons, never across an await.
    inner: Mutex<Inner>,
}

impl std::fmt::Debug for Breaker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Breaker")
            .field("target", &self.target)
            .field("state", &self.snapshot().state)
            .finish_non_exhaustive()
    }
}

/// Leave to make one call; report its outcome with [`Permit::succeeded`] or
/// [`Permit::failed`]. A permit dropped without an outcome (the caller was
/// cancelled) gives the trial back, so a half-open breaker is not stuck.
pub struct Permit<'a> {
    breaker: &'a Breaker,
    trial: bool,
    reported: bool,
}

impl Breaker {
    pub fn new(target: &'static str, settings: BreakerSettings) -> Breaker {
        Breaker::with_clock(target, settings, Arc::new(Instant::now))
    }

    pub fn with_clock(target: &'static str, settings: BreakerSettings, clock: Clock) -> Breaker {
        Breaker {
            target,
            settings,
            clock,
            inner: Mutex::new(Inner {
                phase: Phase::Closed,
                consecutive_failures: 0,
                opened_total: 0,
                rejected_total: 0,
            }),
        }
    }

    pub fn target(&self) -> &'static str {
        self.target
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // The state is a few counters: a panic elsewhere leaves it usable.
        self.inner.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// A permit, or the refusal (UNAVAILABLE) when the breaker is open or
    /// its trial is running.
    pub fn admit(&self) -> Result<Permit<'_>> {
        let now = (self.clock)();
        let mut inner = self.lock();
        let refused_for = match inner.phase {
            Phase::Closed => {
                return Ok(Permit {
                    breaker: self,
                    trial: false,
                    reported: false,
                });
            }
            Phase::Open { since } => {
                let elapsed = now.saturating_duration_since(since);
                if elapsed >= self.settings.cool_down {
                    inner.phase = Phase::Trial { opened: since };
                    return Ok(Permit {
                        breaker: self,
                        trial: true,
                        reported: false,
                    });
                }
                self.settings.cool_down - elapsed
            }
            Phase::Trial { .. } => Duration::ZERO,
        };
        inner.rejected_total += 1;
        Err(Error::unavailable(format!(
            "{} circuit open: call refused without reaching it (trial in {} ms)",
            self.target,
            refused_for.as_millis()
        )))
    }

    pub fn snapshot(&self) -> BreakerSnapshot {
        let now = (self.clock)();
        let inner = self.lock();
        let (state, half_open_in) = match inner.phase {
            Phase::Closed => (BreakerState::Closed, None),
            Phase::Open { since } => {
                let elapsed = now.saturating_duration_since(since);
                if elapsed >= self.settings.cool_down {
                    (BreakerState::HalfOpen, None)
                } else {
                    (BreakerState::Open, Some(self.settings.cool_down - elapsed))
                }
            }
            Phase::Trial { .. } => (BreakerState::HalfOpen, None),
        };
        BreakerSnapshot {
            target: self.target,
            state,
            consecutive_failures: inner.consecutive_failures,
            opened_total: inner.opened_total,
            rejected_total: inner.rejected_total,
            half_open_in,
        }
    }

    fn report(&self, trial: bool, failed: bool) {
        let now = (self.clock)();
        let mut inner = self.lock();
        if !failed {
            inner.consecutive_failures = 0;
            inner.phase = Phase::Closed;
            return;
        }
        inner.consecutive_failures = inner.consecutive_failures.saturating_add(1);
        let opens = match inner.phase {
            // A call admitted before the breaker opened, failing late: it
            // is already open.
            Phase::Open { .. } => false,
            Phase::Trial { .. } => trial,
            Phase::Closed => inner.consecutive_failures >= self.settings.failures.max(1),
        };
        if opens {
            inner.phase = Phase::Open { since: now };
            inner.opened_total += 1;
            tracing::warn!(
                target_name = self.target,
                consecutive_failures = inner.consecutive_failures,
                cool_down_ms = self.settings.cool_down.as_millis() as u64,
                "circuit breaker opened"
            );
        }
    }

    fn give_back(&self) {
        let mut inner = self.lock();
        if let Phase::Trial { opened } = inner.phase {
            inner.phase = Phase::Open { since: opened };
        }
    }
}

impl Permit<'_> {
    pub fn succeeded(mut self) {
        self.reported = true;
        self.breaker.report(self.trial, false);
    }

    pub fn failed(mut self) {
        self.reported = true;
        self.breaker.report(self.trial, true);
    }
}

impl Drop for Permit<'_> {
    fn drop(&mut self) {
        if !self.reported && self.trial {
            self.breaker.give_back();
        }
    }
}

/// Failures worth retrying and counting against the target: it did not
/// answer, or answered that it cannot now.
pub fn is_transient(error: &Error) -> bool {
    matches!(error.code(), Code::Unavailable | Code::DeadlineExceeded)
}

/// One outbound target: its policy and its breaker.
pub struct Outbound {
    policy: OutboundPolicy,
    breaker: Arc<Breaker>,
}

impl Outbound {
    pub fn new(target: &'static str, policy: OutboundPolicy) -> Outbound {
        Outbound::with_breaker(policy, Arc::new(Breaker::new(target, policy.breaker)))
    }

    /// With a breaker built elsewhere (a test's clock).
    pub fn with_breaker(policy: OutboundPolicy, breaker: Arc<Breaker>) -> Outbound {
        Outbound { policy, breaker }
    }

    pub fn breaker(&self) -> &Arc<Breaker> {
        &self.breaker
    }

    /// Runs `call` under the policy: each attempt admitted by the breaker
    /// and bounded by the timeout, transient failures retried while
    /// attempts remain and the breaker stays closed. The error is the last
    /// attempt's, or the breaker's refusal.
    pub async fn call<T, F, Fut>(&self, mut call: F) -> Result<T>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<T>>,
    {
        let target = self.breaker.target();
        let mut attempt = 0;
        loop {
            attempt += 1;
            let permit = self.breaker.admit()?;
            let outcome = match tokio::time::timeout(self.policy.timeout, call()).await {
                Ok(outcome) => outcome,
                Err(_) => Err(Error::unavailable(format!(
                    "{target}: no answer within {} ms",
                    self.policy.timeout.as_millis()
                ))),
            };
            let error = match outcome {
                Ok(value) => {
                    permit.succeeded();
                    return Ok(value);
                }
                Err(error) if is_transient(&error) => error,
                Err(error) => {
                    // The target answered; the request itself was refused.
                    permit.succeeded();
                    return Err(error);
                }
            };
            permit.failed();
            if attempt >= self.policy.attempts.max(1) || self.breaker.snapshot().state != BreakerState::Closed {
                return Err(error);
            }
            let delay = self.policy.backoff.delay(attempt);
            tracing::warn!(target_name = target, attempt, retry_in_ms = delay.as_millis() as u64, error = %error, "outbound call failed; retrying");
            tokio::time::sleep(delay).await;
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use std::sync::atomic::{AtomicU32, Ordering};

    use super::*;

    /// A clock the test moves by hand.
    #[derive(Clone)]
    struct HandClock(Arc<Mutex<Instant>>);

    impl HandClock {
        fn new() -> HandClock {
            HandClock(Arc::new(Mutex::new(Instant::now())))
        }
        fn advance(&self, by: Duration) {
            *self.0.lock().unwrap() += by;
        }
        fn clock(&self) -> Clock {
            let at = self.0.clone();
            Arc::new(move || *at.lock().unwrap())
        }
    }

    fn policy(attempts: u32, failures: u32) -> OutboundPolicy {
        OutboundPolicy {
            timeout: Duration::from_millis(200),
            attempts,
            backoff: Backoff::new(Duration::from_millis(1), Duration::from_millis(2)),
            breaker: BreakerSettings {
                failures,
                cool_down: Duration::from_secs(30),
            },
        }
    }

    fn outbound(attempts: u32, failures: u32, clock: &HandClock) -> Outbound {
        let policy = policy(attempts, failures);
        Outbound::with_breaker(
            policy,
            Arc::new(Breaker::with_clock("test", policy.breaker, clock.clock())),
        )
    }

    async fn failing(calls: &AtomicU32) -> Result<()> {
        calls.fetch_add(1, Ordering::SeqCst);
        Err(Error::unavailable("down"))
    }

    #[tokio::test]
    async fn consecutive_transient_failures_open_the_breaker_and_then_calls_fail_fast() {
        let clock = HandClock::new();
        let outbound = outbound(1, 3, &clock);
        let calls = AtomicU32::new(0);
        for _ in 0..3 {
            assert!(outbound.call(|| failing(&calls)).await.is_err());
        }
        assert_eq!(calls.load(Ordering::SeqCst), 3);
        let snapshot = outbound.breaker().snapshot();
        assert_eq!(snapshot.state, BreakerState::Open);
        assert_eq!(snapshot.consecutive_failures, 3);
        assert_eq!(snapshot.opened_total, 1);
        let refused = outbound.call(|| failing(&calls)).await.unwrap_err();
        assert_eq!(refused.code(), Code::Unavailable);
        assert!(refused.to_string().contains("circuit open"), "{refused}");
        assert_eq!(
            calls.load(Ordering::SeqCst),
            3,
            "an open breaker does not call the target"
        );
        assert_eq!(outbound.breaker().snapshot().rejected_total, 1);
    }

    #[tokio::test]
    async fn a_success_resets_the_count() {
        let clock = HandClock::new();
        let outbound = outbound(1, 3, &clock);
        let calls = AtomicU32::new(0);
        for _ in 0..2 {
            assert!(outbound.call(|| failing(&calls)).await.is_err());
        }
        outbound.call(|| async { Ok(()) }).await.unwrap();
        for _ in 0..2 {
            assert!(outbound.call(|| failing(&calls)).await.is_err());
        }
        assert_eq!(outbound.breaker().snapshot().state, BreakerState::Closed);
    }

    #[tokio::test]
    async fn after_the_cool_down_one_trial_goes_through_and_its_success_closes() {
        let clock = HandClock::new();
        let outbound = outbound(1, 1, &clock);
        let calls = AtomicU32::new(0);
        assert!(outbound.call(|| failing(&calls)).await.is_err());
        assert_eq!(outbound.breaker().snapshot().state, BreakerState::Open);
        clock.advance(Duration::from_secs(29));
        assert!(outbound.call(|| failing(&calls)).await.is_err());
        assert_eq!(calls.load(Ordering::SeqCst), 1, "still cooling down");
        clock.advance(Duration::from_secs(1));
        assert_eq!(outbound.breaker().snapshot().state, BreakerState::HalfOpen);

        // The trial holds its permit: a second caller meanwhile is refused.
        let trial = outbound.breaker().admit().unwrap();
        let other = outbound.breaker().admit();
        assert!(other.is_err(), "one trial at a time");
        trial.succeeded();
        let snapshot = outbound.breaker().snapshot();
        assert_eq!(snapshot.state, BreakerState::Closed);
        assert_eq!(snapshot.consecutive_failures, 0);
        outbound.call(|| async { Ok(()) }).await.unwrap();
    }

    #[tokio::test]
    async fn a_failed_trial_opens_it_for_another_cool_down() {
        let clock = HandClock::new();
        let outbound = outbound(1, 2, &clock);
        let calls = AtomicU32::new(0);
        for _ in 0..2 {
            assert!(outbound.call(|| failing(&calls)).await.is_err());
        }
        clock.advance(Duration::from_secs(30));
        assert!(outbound.call(|| failing(&calls)).await.is_err());
        assert_eq!(calls.load(Ordering::SeqCst), 3, "the trial reached the target");
        let snapshot = outbound.breaker().snapshot();
        assert_eq!(snapshot.state, BreakerState::Open);
        assert_eq!(snapshot.opened_total, 2);
        assert_eq!(snapshot.half_open_in, Some(Duration::from_secs(30)));
    }

    #[tokio::test]
    async fn a_cancelled_trial_gives_its_turn_back() {
        let clock = HandClock::new();
        let outbound = outbound(1, 1, &clock);
        let calls = AtomicU32::new(0);
        assert!(outbound.call(|| failing(&calls)).await.is_err());
        clock.advance(Duration::from_secs(30));
        drop(outbound.breaker().admit().unwrap());
        assert!(outbound.breaker().admit().is_ok(), "the next caller gets the trial");
    }

    #[tokio::test]
    async fn transient_failures_are_retried_within_a_call_others_are_not() {
        let clock = HandClock::new();
        let outbound = outbound(3, 10, &clock);
        let calls = AtomicU32::new(0);
        assert!(outbound.call(|| failing(&calls)).await.is_err());
        assert_eq!(calls.load(Ordering::SeqCst), 3);

        let refused = AtomicU32::new(0);
        let error = outbound
            .call(|| async {
                refused.fetch_add(1, Ordering::SeqCst);
                Err::<(), _>(Error::invalid_field("to", "no such mailbox"))
            })
            .await
            .unwrap_err();
        assert_eq!(error.code(), Code::InvalidArgument);
        assert_eq!(refused.load(Ordering::SeqCst), 1, "a refusal is not retried");
        assert_eq!(
            outbound.breaker().snapshot().consecutive_failures,
            0,
            "the target answered: not a failure of the target"
        );
    }

    #[tokio::test]
    async fn an_attempt_past_the_timeout_is_a_transient_failure() {
        let clock = HandClock::new();
        let outbound = outbound(1, 1, &clock);
        let error = outbound.call(std::future::pending::<Result<()>>).await.unwrap_err();
        assert_eq!(error.code(), Code::Unavailable);
        assert!(error.to_string().contains("no answer within 200 ms"), "{error}");
        assert_eq!(outbound.breaker().snapshot().state, BreakerState::Open);
    }
}
