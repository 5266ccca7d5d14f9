//! A token bucket shared by all connections of a node, for its ingress and egress caps.

use std::sync::Mutex;
use std::time::Duration;

use tokio::time::Instant;

/// Bytes per second with a burst of one second's worth.
#[derive(Debug)]
pub struct RateLimiter {
    rate: Option<f64>,
    burst: f64,
    bucket: Mutex<(f64, Instant)>,
}

impl RateLimiter {
    /// `bytes_per_sec == 0` means unlimited.
    pub fn new(bytes_per_sec: u64) -> Self {
        let rate = (bytes_per_sec > 0).then_some(bytes_per_sec as f64);
        // One second's worth, at least 64 KiB. Debt is allowed, so this need not cover a piece.
        let burst = (bytes_per_sec as f64).max(64.0 * 1024.0);
        Self {
            rate,
            burst,
            bucket: Mutex::new((burst, Instant::now())),
        }
    }

    /// Waits until `bytes` may pass. Debt is allowed, so one large piece never waits forever.
    pub async fn acquire(&self, bytes: usize) {
        let wait = self.take(bytes);
        if !wait.is_zero() {
            tokio::time::sleep(wait).await;
        }
    }

    /// Lets `bytes` pass at once, in debt if need be: a reader is waiting for them. The cap
    /// still holds on average, because everything behind them waits longer.
    pub fn debit(&self, bytes: usize) {
        self.take(bytes);
    }

    /// Takes `bytes` from the bucket and says how long the caller should wait for them.
    fn take(&self, bytes: usize) -> Duration {
        let Some(rate) = self.rate else {
            return Duration::ZERO;
        };
        {
            let mut b = self.bucket.lock().unwrap_or_else(|p| p.into_inner());
            let now = Instant::now();
            let (tokens, last) = *b;
            let refilled = (tokens + now.duration_since(last).as_secs_f64() * rate).min(self.burst);
            let left = refilled - bytes as f64;
            *b = (left, now);
            if left >= 0.0 {
                Duration::ZERO
            } else {
                Duration::from_secs_f64(-left / rate)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn holds_the_average_rate() {
        let limiter = RateLimiter::new(1 << 20);
        let start = tokio::time::Instant::now();
        // A one-second burst first, then 1 MiB/s.
        for _ in 0..8 {
            limiter.acquire(1 << 20).await;
        }
        let elapsed = start.elapsed();
        assert!(
            elapsed >= Duration::from_secs(6) && elapsed <= Duration::from_secs(8),
            "{elapsed:?}"
        );
        // A piece bigger than the burst still passes, in debt.
        let start = tokio::time::Instant::now();
        limiter.acquire(4 << 20).await;
        assert!(
            start.elapsed() <= Duration::from_secs(5),
            "{:?}",
            start.elapsed()
        );
        RateLimiter::new(0).acquire(usize::MAX).await;
    }

    #[tokio::test(start_paused = true)]
    async fn a_debit_passes_at_once_and_delays_what_follows() {
        let limiter = RateLimiter::new(1 << 20);
        limiter.acquire(1 << 20).await;
        let start = tokio::time::Instant::now();
        limiter.debit(2 << 20);
        assert!(start.elapsed().is_zero());
        limiter.acquire(1 << 20).await;
        assert!(
            start.elapsed() >= Duration::from_secs(3),
            "{:?}",
            start.elapsed()
        );
    }
}
