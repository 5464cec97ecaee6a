//! One retry schedule for everything that retries (durable event handlers
//! now, jobs next): exponential from a base, capped, with jitter so that
//! failures that happened together do not retry together.

use std::time::Duration;

use rand::Rng;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Backoff {
    /// The delay before the first retry (before jitter).
    pub base: Duration,
    /// No delay is longer than this.
    pub max: Duration,
}

impl Backoff {
    pub const fn new(base: Duration, max: Duration) -> Self {
        Self { base, max }
    }

    /// The delay before retry `attempt` (1-based): `base * 2^(attempt-1)`,
    /// capped at `max`, then a random point between half and all of it.
    pub fn delay(&self, attempt: u32) -> Duration {
        let exponential = self.base.saturating_mul(1 << attempt.saturating_sub(1).min(16));
        let capped = exponential.min(self.max);
        capped.mul_f64(rand::thread_rng().gen_range(0.5..=1.0))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delays_grow_exponentially_within_jitter_and_cap() {
        let backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(1));
        for _ in 0..50 {
            let first = backoff.delay(1);
            assert!(
                first >= Duration::from_millis(50) && first <= Duration::from_millis(100),
                "{first:?}"
            );
            let third = backoff.delay(3);
            assert!(
                third >= Duration::from_millis(200) && third <= Duration::from_millis(400),
                "{third:?}"
            );
            assert!(backoff.delay(30) <= Duration::from_secs(1));
            assert!(backoff.delay(30) >= Duration::from_millis(500));
        }
    }
}
