//! The retry policy around a sink: exponential backoff with jitter from
//! `[retry]`, bounded by attempts and elapsed time, honouring `Retry-After`.

use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use backon::{BackoffBuilder, Retryable};
use rand::Rng;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use super::{Sink, SinkError};
use crate::config::RetryConfig;
use crate::core::change::Change;

/// Longest `Retry-After` honoured as given; a longer one is capped so a
/// confused server cannot park a user for a day.
const MAX_RETRY_AFTER: Duration = Duration::from_secs(600);

#[derive(Debug)]
pub struct Pushed {
    pub external_id: Option<String>,
    pub attempts: u32,
}

#[derive(Debug)]
pub struct PushFailed {
    pub error: SinkError,
    pub attempts: u32,
}

/// Exponential backoff with full jitter (each wait uniform in
/// `[0, min(max, initial * 2^n)]`), ending after `max_attempts` attempts or
/// once `max_elapsed` has passed since the first attempt.
#[derive(Debug, Clone)]
pub struct FullJitter {
    pub initial: Duration,
    pub max: Duration,
    pub max_attempts: usize,
    pub max_elapsed: Duration,
}

impl FullJitter {
    pub fn from_config(policy: &RetryConfig) -> Self {
        FullJitter {
            initial: Duration::from_millis(policy.initial_backoff_ms),
            max: Duration::from_millis(policy.max_backoff_ms),
            max_attempts: policy.max_attempts,
            max_elapsed: Duration::from_secs(policy.max_elapsed_secs),
        }
    }
}

#[derive(Debug)]
pub struct FullJitterDelays {
    policy: FullJitter,
    retries: usize,
    started: std::time::Instant,
}

impl BackoffBuilder for FullJitter {
    type Backoff = FullJitterDelays;
    fn build(self) -> FullJitterDelays {
        FullJitterDelays {
            policy: self,
            retries: 0,
            started: std::time::Instant::now(),
        }
    }
}

impl Iterator for FullJitterDelays {
    type Item = Duration;
    fn next(&mut self) -> Option<Duration> {
        if self.retries + 1 >= self.policy.max_attempts
            || self.started.elapsed() >= self.policy.max_elapsed
        {
            return None;
        }
        let exp = self.retries.min(30) as u32;
        self.retries += 1;
        let ceiling = self
            .policy
            .initial
            .saturating_mul(1u32 << exp)
            .min(self.policy.max);
        let ms = rand::rng().random_range(0..=ceiling.as_millis() as u64);
        Some(Duration::from_millis(ms))
    }
}

/// Pushes with retries. Permanent errors return at once.
pub async fn push_with_retry(
    sink: &dyn Sink,
    change: &Change,
    external_id: Option<&str>,
    policy: &RetryConfig,
) -> Result<Pushed, PushFailed> {
    let never = CancellationToken::new();
    match push_with_retry_until(sink, change, external_id, policy, &never).await {
        Some(result) => result,
        // `never` is never cancelled.
        None => Err(PushFailed {
            error: SinkError::Malformed("abandoned".into()),
            attempts: 0,
        }),
    }
}

/// Like [`push_with_retry`], but a push that is only waiting for its next
/// attempt when `stop` fires is abandoned at once (`None`): nothing is
/// pending at the service, and the change, never acknowledged, is replayed
/// from the slot at the next start. An attempt under way still finishes, so
/// its answer is written back. Without this, a `Retry-After` of minutes kept
/// SIGTERM waiting for minutes.
pub async fn push_with_retry_until(
    sink: &dyn Sink,
    change: &Change,
    external_id: Option<&str>,
    policy: &RetryConfig,
    stop: &CancellationToken,
) -> Option<Result<Pushed, PushFailed>> {
    let attempts = AtomicU32::new(0);
    let abandon = std::sync::Arc::new(Notify::new());
    let sleeper = {
        let (stop, abandon) = (stop.clone(), std::sync::Arc::clone(&abandon));
        move |wait: Duration| {
            let (stop, abandon) = (stop.clone(), std::sync::Arc::clone(&abandon));
            async move {
                tokio::select! {
                    _ = tokio::time::sleep(wait) => {}
                    _ = stop.cancelled() => {
                        abandon.notify_one();
                        std::future::pending::<()>().await;
                    }
                }
            }
        }
    };
    let retried = (|| async {
        attempts.fetch_add(1, Ordering::Relaxed);
        timed_push(sink.name(), sink.push(change, external_id)).await
    })
    .retry(FullJitter::from_config(policy))
    .sleep(sleeper)
    .when(SinkError::is_retryable)
    .adjust(|e: &SinkError, planned: Option<Duration>| {
        // Exhausted stays exhausted; otherwise wait at least what the server asked.
        let planned = planned?;
        Some(match e.retry_after() {
            Some(asked) => planned.max(asked.min(MAX_RETRY_AFTER)),
            None => planned,
        })
    })
    .notify(|e: &SinkError, wait: Duration| {
        crate::observe::metrics::retry(sink.name());
        tracing::warn!(
            event_id = %change.event_id,
            sink = sink.name(),
            attempt = attempts.load(Ordering::Relaxed),
            error = %e.summary(),
            retry_in_ms = wait.as_millis() as u64,
            "push failed, will retry"
        );
    });
    let result = tokio::select! {
        r = retried => r,
        _ = abandon.notified() => {
            tracing::info!(event_id = %change.event_id, "stopping: a push waiting to retry is abandoned; it is replayed at the next start");
            return None;
        }
    };
    if matches!(result, Err(SinkError::Fenced)) {
        // Leadership is gone: the new leader replays this change; a dead
        // letter written now would park a user for no fault of theirs.
        tracing::info!(event_id = %change.event_id, "not the leader any more: push abandoned; the new leader replays it");
        return None;
    }
    let attempts = attempts.load(Ordering::Relaxed);
    Some(match result {
        Ok(external_id) => Ok(Pushed {
            external_id,
            attempts,
        }),
        Err(error) => Err(PushFailed { error, attempts }),
    })
}

/// Awaits one push attempt and records its outcome and duration.
async fn timed_push<T>(
    sink: &'static str,
    push: impl std::future::Future<Output = Result<T, SinkError>>,
) -> Result<T, SinkError> {
    use crate::observe::metrics::{push_done, PushOutcome};
    let started = std::time::Instant::now();
    let result = push.await;
    let outcome = match &result {
        Ok(_) => PushOutcome::Ok,
        Err(e) if e.is_retryable() => PushOutcome::RetryableError,
        Err(_) => PushOutcome::PermanentError,
    };
    push_done(sink, outcome, started.elapsed().as_secs_f64());
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(attempts: usize, elapsed_secs: u64) -> FullJitter {
        FullJitter {
            initial: Duration::from_millis(100),
            max: Duration::from_millis(1000),
            max_attempts: attempts,
            max_elapsed: Duration::from_secs(elapsed_secs),
        }
    }

    #[test]
    fn delays_stay_under_the_doubling_cap() {
        for _ in 0..50 {
            let delays: Vec<Duration> = policy(8, 3600).build().collect();
            assert_eq!(delays.len(), 7, "8 attempts = 7 waits");
            for (n, d) in delays.iter().enumerate() {
                let cap = (100u64 << n).min(1000);
                assert!(d.as_millis() as u64 <= cap, "wait {n}: {d:?} > {cap} ms");
            }
        }
    }

    #[test]
    fn jitter_spreads_the_waits() {
        let firsts: std::collections::BTreeSet<u128> = (0..200)
            .filter_map(|_| policy(5, 3600).build().nth(3))
            .map(|d| d.as_millis())
            .collect();
        assert!(firsts.len() > 20, "full jitter should vary: {firsts:?}");
    }

    #[test]
    fn elapsed_budget_ends_retries() {
        let mut delays = policy(1000, 0).build();
        assert_eq!(delays.next(), None);
        assert_eq!(
            policy(1, 3600).build().next(),
            None,
            "one attempt, no retry"
        );
    }
}
