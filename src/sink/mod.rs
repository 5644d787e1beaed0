//! Sinks push one change to an external service. This module owns the small
//! `Sink` trait every adapter implements, the error classification that
//! decides retry versus dead letter, and the shared HTTP client.

pub mod mapping;
pub mod memberstack;
pub mod ratelimit;
pub mod retry;
pub mod stripe;
pub mod webhook;

use std::time::Duration;

use futures::future::BoxFuture;

use crate::core::change::Change;

/// What one attempt at pushing a change can fail with. `retryable` follows
/// DESIGN.md: 408, 425, 429, 5xx, timeouts and connection errors are retried;
/// other 4xx and malformed answers are permanent.
#[derive(Debug, Clone, thiserror::Error)]
pub enum SinkError {
    #[error("HTTP {status}: {body}")]
    Http {
        status: u16,
        /// A short excerpt of the response body, for the operator.
        body: String,
        retry_after: Option<Duration>,
    },
    /// A vendor API's error, classified by the adapter (which may know
    /// better than the status, e.g. Stripe's `Stripe-Should-Retry`).
    #[error("HTTP {status}: {message}")]
    Api {
        status: u16,
        /// The API's own message (never the request, which may hold secrets).
        message: String,
        retryable: bool,
        retry_after: Option<Duration>,
    },
    #[error("no answer within {0:?}")]
    Timeout(Duration),
    #[error("cannot connect: {0}")]
    Connect(String),
    #[error("malformed response: {0}")]
    Malformed(String),
}

impl SinkError {
    pub fn is_retryable(&self) -> bool {
        match self {
            SinkError::Http { status, .. } => {
                matches!(status, 408 | 425 | 429) || (500..=599).contains(status)
            }
            SinkError::Api { retryable, .. } => *retryable,
            SinkError::Timeout(_) | SinkError::Connect(_) => true,
            SinkError::Malformed(_) => false,
        }
    }

    pub fn retry_after(&self) -> Option<Duration> {
        match self {
            SinkError::Http { retry_after, .. } | SinkError::Api { retry_after, .. } => {
                *retry_after
            }
            _ => None,
        }
    }

    /// Safe to log: the status or transport failure, without the service's
    /// message (which may echo personal data, e.g. an invalid email).
    pub fn summary(&self) -> String {
        match self {
            SinkError::Http { status, .. } | SinkError::Api { status, .. } => {
                format!("HTTP {status}")
            }
            SinkError::Timeout(d) => format!("no answer within {d:?}"),
            SinkError::Connect(e) => format!("cannot connect: {e}"),
            SinkError::Malformed(_) => "malformed response".to_string(),
        }
    }

    pub fn status(&self) -> Option<u16> {
        match self {
            SinkError::Http { status, .. } | SinkError::Api { status, .. } => Some(*status),
            _ => None,
        }
    }
}

/// An external user service.
pub trait Sink: Send + Sync + 'static {
    /// Short name for logs and metrics ("webhook").
    fn name(&self) -> &'static str;

    /// One attempt at pushing `change`. `external_id` is the best id known for
    /// the user (from the row, or from an earlier push in this process).
    /// Returns the external id the service reports, if any.
    fn push<'a>(
        &'a self,
        change: &'a Change,
        external_id: Option<&'a str>,
    ) -> BoxFuture<'a, Result<Option<String>, SinkError>>;

    /// A cheap authenticated request made at start, so that a wrong API key
    /// is one clear error before anything is consumed. `Ok` when the sink has
    /// nothing to check.
    fn check(&self) -> BoxFuture<'_, Result<(), SinkError>> {
        Box::pin(async { Ok(()) })
    }
}

/// Parses `Retry-After` as delay-seconds or an HTTP date (RFC 9110 §10.2.3).
pub fn parse_retry_after(value: &str) -> Option<Duration> {
    let value = value.trim();
    if let Ok(secs) = value.parse::<u64>() {
        return Some(Duration::from_secs(secs));
    }
    let when = httpdate::parse_http_date(value).ok()?;
    Some(
        when.duration_since(std::time::SystemTime::now())
            .unwrap_or(Duration::ZERO),
    )
}

/// The HTTP client every sink shares: rustls with the ring provider, one
/// pool, a per-request timeout.
pub fn http_client(timeout: Duration, max_idle: usize) -> Result<reqwest::Client, String> {
    // Installing twice is harmless; the first provider wins.
    let _ = rustls::crypto::ring::default_provider().install_default();
    reqwest::Client::builder()
        .timeout(timeout)
        .connect_timeout(timeout.min(Duration::from_secs(10)))
        .pool_max_idle_per_host(max_idle)
        // A redirected POST would silently turn into a GET; a 3xx is an answer to report.
        .redirect(reqwest::redirect::Policy::none())
        .user_agent(concat!("usersync/", env!("CARGO_PKG_VERSION")))
        .build()
        .map_err(|e| format!("cannot build the HTTP client: {e}"))
}

/// A body excerpt safe to log and store: bounded, one line.
pub fn excerpt(body: &str) -> String {
    let one_line: String = body
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .take(300)
        .collect();
    one_line.trim().to_string()
}

/// The sink `cfg` asks for.
pub fn build(cfg: &crate::config::SinkConfig) -> Result<std::sync::Arc<dyn Sink>, String> {
    use crate::config::SinkKind;
    Ok(match cfg.kind {
        SinkKind::Webhook => std::sync::Arc::new(webhook::WebhookSink::new(cfg)?),
        SinkKind::Memberstack => std::sync::Arc::new(memberstack::MemberstackSink::new(cfg)?),
        SinkKind::Stripe => std::sync::Arc::new(stripe::StripeSink::new(cfg)?),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn http(status: u16) -> SinkError {
        SinkError::Http {
            status,
            body: String::new(),
            retry_after: None,
        }
    }

    #[test]
    fn classification_follows_design() {
        for s in [408, 425, 429, 500, 502, 503, 599] {
            assert!(http(s).is_retryable(), "{s}");
        }
        for s in [400, 401, 403, 404, 409, 410, 422] {
            assert!(!http(s).is_retryable(), "{s}");
        }
        assert!(SinkError::Timeout(Duration::from_secs(1)).is_retryable());
        assert!(SinkError::Connect("refused".into()).is_retryable());
        assert!(!SinkError::Malformed("x".into()).is_retryable());
    }

    #[test]
    fn retry_after_seconds_and_date() {
        assert_eq!(parse_retry_after(" 7 "), Some(Duration::from_secs(7)));
        let future = std::time::SystemTime::now() + Duration::from_secs(30);
        let d = parse_retry_after(&httpdate::fmt_http_date(future)).unwrap();
        assert!(
            d > Duration::from_secs(25) && d <= Duration::from_secs(30),
            "{d:?}"
        );
        assert_eq!(
            parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT"),
            Some(Duration::ZERO)
        );
        assert_eq!(parse_retry_after("soon"), None);
    }

    #[test]
    fn excerpt_is_bounded_single_line() {
        let e = excerpt(&format!("a\nb{}", "x".repeat(1000)));
        assert!(!e.contains('\n'));
        assert_eq!(e.chars().count(), 300);
    }
}
