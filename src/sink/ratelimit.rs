//! A client-side request rate limit shared by a sink's concurrent pushes, so
//! that a vendor's documented limit is respected and 429s stay the exception.

use std::time::Duration;

use tokio::sync::Mutex;
use tokio::time::Instant;

#[derive(Debug)]
pub struct RateLimiter {
    interval: Duration,
    next: Mutex<Instant>,
}

impl RateLimiter {
    /// `None` for 0 (no limit).
    pub fn new(per_sec: u32) -> Option<RateLimiter> {
        (per_sec > 0).then(|| RateLimiter {
            interval: Duration::from_secs_f64(1.0 / f64::from(per_sec)),
            next: Mutex::new(Instant::now()),
        })
    }

    /// Waits for the next free slot. Slots are spaced evenly, so a burst of
    /// pushes goes out at the limit, never above it.
    pub async fn acquire(&self) {
        let mut next = self.next.lock().await;
        let now = Instant::now();
        if *next > now {
            tokio::time::sleep_until(*next).await;
        }
        *next = (*next).max(now) + self.interval;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn spaces_requests_at_the_limit() {
        let limiter = RateLimiter::new(10).expect("limiter");
        let start = Instant::now();
        for _ in 0..11 {
            limiter.acquire().await;
        }
        let elapsed = start.elapsed();
        assert!(
            elapsed >= Duration::from_millis(1000) && elapsed < Duration::from_millis(1100),
            "{elapsed:?}"
        );
        assert!(RateLimiter::new(0).is_none());
    }
}
