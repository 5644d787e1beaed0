//! The retry policy around a sink: exponential backoff with jitter from
//! `[retry]`, bounded by attempts and elapsed time, honouring `Retry-After`.

use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use backon::{ExponentialBuilder, Retryable};

use super::{Sink, SinkError};
use crate::change::Change;
use crate::config::RetryConfig;

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

pub fn backoff(policy: &RetryConfig) -> ExponentialBuilder {
    ExponentialBuilder::default()
        .with_min_delay(Duration::from_millis(policy.initial_backoff_ms))
        .with_max_delay(Duration::from_millis(policy.max_backoff_ms))
        .with_max_times(policy.max_attempts.saturating_sub(1))
        .with_total_delay(Some(Duration::from_secs(policy.max_elapsed_secs)))
        .with_jitter()
}

/// Pushes with retries. Permanent errors return at once.
pub async fn push_with_retry(
    sink: &dyn Sink,
    change: &Change,
    external_id: Option<&str>,
    policy: &RetryConfig,
) -> Result<Pushed, PushFailed> {
    let attempts = AtomicU32::new(0);
    let result = (|| async {
        attempts.fetch_add(1, Ordering::Relaxed);
        sink.push(change, external_id).await
    })
    .retry(backoff(policy))
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
        tracing::warn!(
            event_id = %change.event_id,
            sink = sink.name(),
            attempt = attempts.load(Ordering::Relaxed),
            error = %e,
            retry_in_ms = wait.as_millis() as u64,
            "push failed, will retry"
        );
    })
    .await;
    let attempts = attempts.load(Ordering::Relaxed);
    match result {
        Ok(external_id) => Ok(Pushed {
            external_id,
            attempts,
        }),
        Err(error) => Err(PushFailed { error, attempts }),
    }
}
