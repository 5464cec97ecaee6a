//! Rate limits behind a port. The in-process adapter (governor) lives here;
//! the Redis one, shared by every process of a deployment, is the server's
//! (`keel_server::limit`). Both answer the same question with GCRA: may
//! `key` act now, how many more may it take at once, and when is its
//! allowance whole again (or, refused, when may it try again).

use std::collections::HashMap;
use std::num::NonZeroU32;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use governor::clock::{Clock, DefaultClock};
use governor::middleware::StateInformationMiddleware;
use governor::state::keyed::DefaultKeyedStateStore;
use governor::{Quota as GovernorQuota, RateLimiter as Governor};
use serde::Deserialize;

use crate::Error;

/// `burst` actions at once, then one more every `period` (GCRA).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Deserialize)]
pub struct Quota {
    pub burst: u32,
    #[serde(with = "seconds")]
    pub period: Duration,
}

impl Quota {
    pub const fn new(burst: u32, period: Duration) -> Self {
        Self { burst, period }
    }

    /// `limit` actions per `window`: a burst of `limit`, refilled evenly
    /// over the window (what `RateLimit-Policy: q=<limit>;w=<window>` says).
    pub fn per_window(limit: u32, window: Duration) -> Self {
        let limit = limit.max(1);
        Self {
            burst: limit,
            period: (window / limit).max(Duration::from_nanos(1)),
        }
    }

    /// The time the whole burst takes to refill: the window of the policy.
    pub fn window(&self) -> Duration {
        self.period.saturating_mul(self.burst.max(1))
    }
}

mod seconds {
    use serde::{Deserialize, Deserializer};
    use std::time::Duration;

    pub fn deserialize<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Duration, D::Error> {
        let seconds = f64::deserialize(deserializer)?;
        Duration::try_from_secs_f64(seconds).map_err(serde::de::Error::custom)
    }
}

/// A limiter's answer for one action.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Decision {
    pub allowed: bool,
    /// Actions the key may still take at once after this one.
    pub remaining: u32,
    /// Until the key's allowance is whole again.
    pub reset: Duration,
    /// Refused: how long to wait before the next action can pass; zero when allowed.
    pub retry_after: Duration,
}

impl Decision {
    /// GCRA's answer from the key's theoretical arrival time, given as how
    /// far it lies ahead of now once this action is counted (`ahead`), or,
    /// refused, how far it lies ahead without it.
    pub fn from_gcra(quota: Quota, allowed: bool, ahead: Duration) -> Decision {
        let period = quota.period.max(Duration::from_nanos(1));
        let burst = quota.burst.max(1);
        if allowed {
            let used = ahead.as_nanos().div_ceil(period.as_nanos());
            let remaining = u128::from(burst).saturating_sub(used);
            Decision {
                allowed,
                remaining: u32::try_from(remaining).unwrap_or(u32::MAX),
                reset: ahead,
                retry_after: Duration::ZERO,
            }
        } else {
            let tolerance = period.saturating_mul(burst - 1);
            Decision {
                allowed,
                remaining: 0,
                reset: ahead,
                retry_after: ahead.saturating_sub(tolerance).max(Duration::from_millis(1)),
            }
        }
    }
}

#[async_trait]
pub trait RateLimiter: Send + Sync + 'static {
    /// Takes one action from `key`'s allowance under `quota`, if it has one.
    /// `Err` only when the limiter cannot answer (a shared store is
    /// unreachable); the composition root puts a fallback in front.
    async fn check(&self, key: &str, quota: Quota) -> Result<Decision, Error>;

    /// Takes one action from `key`'s allowance, or returns how long to wait.
    /// A limiter that cannot answer lets the action pass (the composition
    /// root's fallback decides before this is reached).
    async fn acquire(&self, key: &str, quota: Quota) -> Result<(), Duration> {
        match self.check(key, quota).await {
            Ok(decision) if decision.allowed => Ok(()),
            Ok(decision) => Err(decision.retry_after),
            Err(error) => {
                tracing::warn!(error = %error, "rate limiter unavailable; letting the action pass");
                Ok(())
            }
        }
    }
}

type KeyedGovernor = Governor<String, DefaultKeyedStateStore<String>, DefaultClock, StateInformationMiddleware>;

/// Keyed GCRA limiters (governor), one per distinct quota.
#[derive(Default)]
pub struct InProcessRateLimiter {
    // A std mutex: held only to find the limiter, never across an await.
    limiters: Mutex<HashMap<Quota, Arc<KeyedGovernor>>>,
    calls: std::sync::atomic::AtomicU64,
}

impl InProcessRateLimiter {
    pub fn new() -> Self {
        Self::default()
    }

    fn limiter(&self, quota: Quota) -> Arc<KeyedGovernor> {
        let mut limiters = self.limiters.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        limiters
            .entry(quota)
            .or_insert_with(|| {
                let burst = NonZeroU32::new(quota.burst.max(1)).unwrap_or(NonZeroU32::MIN);
                let period = quota.period.max(Duration::from_nanos(1));
                let governor_quota = GovernorQuota::with_period(period)
                    .unwrap_or_else(|| GovernorQuota::per_second(NonZeroU32::MIN))
                    .allow_burst(burst);
                Arc::new(Governor::keyed(governor_quota).with_middleware::<StateInformationMiddleware>())
            })
            .clone()
    }

    /// The answer without async: what the Redis adapter's local fallback uses.
    pub fn check_now(&self, key: &str, quota: Quota) -> Decision {
        let limiter = self.limiter(quota);
        // Forget idle keys now and then so the map stays bounded.
        if self.calls.fetch_add(1, std::sync::atomic::Ordering::Relaxed) % 4096 == 4095 {
            limiter.retain_recent();
        }
        let period = quota.period.max(Duration::from_nanos(1));
        match limiter.check_key(&key.to_owned()) {
            Ok(snapshot) => {
                let remaining = snapshot.remaining_burst_capacity();
                let used = quota.burst.max(1).saturating_sub(remaining);
                Decision {
                    allowed: true,
                    remaining,
                    reset: period.saturating_mul(used),
                    retry_after: Duration::ZERO,
                }
            }
            Err(not_until) => {
                let retry_after = not_until.wait_time_from(DefaultClock::default().now());
                Decision {
                    allowed: false,
                    remaining: 0,
                    reset: retry_after.saturating_add(period.saturating_mul(quota.burst.max(1) - 1)),
                    retry_after,
                }
            }
        }
    }
}

#[async_trait]
impl RateLimiter for InProcessRateLimiter {
    async fn check(&self, key: &str, quota: Quota) -> Result<Decision, Error> {
        Ok(self.check_now(key, quota))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_key_is_refused_after_its_burst_and_others_are_not() {
        let limiter = InProcessRateLimiter::new();
        let quota = Quota::new(3, Duration::from_secs(60));
        for _ in 0..3 {
            assert!(limiter.acquire("a", quota).await.is_ok());
        }
        let wait = limiter.acquire("a", quota).await.expect_err("fourth is refused");
        assert!(wait > Duration::from_secs(50) && wait <= Duration::from_secs(60));
        assert!(limiter.acquire("b", quota).await.is_ok());
    }
}
