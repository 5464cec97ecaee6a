//! Rate limits behind a port: an in-process limiter now, a Redis one for
//! clusters later. Both answer the same question: may `key` act now, and if
//! not, when may it try again.

use std::collections::HashMap;
use std::num::NonZeroU32;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use governor::clock::{Clock, DefaultClock};
use governor::{DefaultKeyedRateLimiter, Quota as GovernorQuota};
use serde::Deserialize;

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
}

mod seconds {
    use serde::{Deserialize, Deserializer};
    use std::time::Duration;

    pub fn deserialize<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Duration, D::Error> {
        let seconds = f64::deserialize(deserializer)?;
        Duration::try_from_secs_f64(seconds).map_err(serde::de::Error::custom)
    }
}

#[async_trait]
pub trait RateLimiter: Send + Sync + 'static {
    /// Takes one action from `key`'s allowance, or returns how long to wait.
    async fn acquire(&self, key: &str, quota: Quota) -> Result<(), Duration>;
}

/// Keyed GCRA limiters (governor), one per distinct quota.
#[derive(Default)]
pub struct InProcessRateLimiter {
    // A std mutex: held only to find the limiter, never across an await.
    limiters: Mutex<HashMap<Quota, Arc<DefaultKeyedRateLimiter<String>>>>,
    calls: std::sync::atomic::AtomicU64,
}

impl InProcessRateLimiter {
    pub fn new() -> Self {
        Self::default()
    }

    fn limiter(&self, quota: Quota) -> Arc<DefaultKeyedRateLimiter<String>> {
        let mut limiters = self.limiters.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        limiters
            .entry(quota)
            .or_insert_with(|| {
                let burst = NonZeroU32::new(quota.burst.max(1)).unwrap_or(NonZeroU32::MIN);
                let period = quota.period.max(Duration::from_nanos(1));
                let governor_quota = GovernorQuota::with_period(period)
                    .unwrap_or_else(|| GovernorQuota::per_second(NonZeroU32::MIN))
                    .allow_burst(burst);
                Arc::new(DefaultKeyedRateLimiter::keyed(governor_quota))
            })
            .clone()
    }
}

#[async_trait]
impl RateLimiter for InProcessRateLimiter {
    async fn acquire(&self, key: &str, quota: Quota) -> Result<(), Duration> {
        let limiter = self.limiter(quota);
        // Forget idle keys now and then so the map stays bounded.
        if self.calls.fetch_add(1, std::sync::atomic::Ordering::Relaxed) % 4096 == 4095 {
            limiter.retain_recent();
        }
        limiter
            .check_key(&key.to_owned())
            .map_err(|not_until| not_until.wait_time_from(DefaultClock::default().now()))
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
