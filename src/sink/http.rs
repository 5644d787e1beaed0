//! The HTTP policy every sink's requests go through the same way: the
//! client-side rate limit (`sink.rate_limit_per_sec`), the per-request
//! timeout (`sink.timeout_ms`, in the client), the response-size cap
//! (`sink.max_response_bytes`), and transport errors classified once
//! (timeout or connection failure, both retryable). Retries are applied
//! above it, to whole pushes, by `retry`.

use std::time::Duration;

use reqwest::header::HeaderMap;
use reqwest::RequestBuilder;

use super::ratelimit::RateLimiter;
use super::{parse_retry_after, read_body, Body, BodyError, SinkError};
use crate::config::SinkConfig;

pub struct Http {
    client: reqwest::Client,
    limiter: Option<RateLimiter>,
    timeout: Duration,
    max_response_bytes: u64,
}

/// A response whose body was read within the cap.
#[derive(Debug)]
pub struct Answer {
    pub status: u16,
    pub headers: HeaderMap,
    pub body: Body,
}

impl Answer {
    /// `Retry-After` as seconds or an HTTP date.
    pub fn retry_after(&self) -> Option<Duration> {
        self.headers
            .get("retry-after")
            .and_then(|v| v.to_str().ok())
            .and_then(parse_retry_after)
    }
}

impl Http {
    pub fn new(cfg: &SinkConfig) -> Result<Http, String> {
        Ok(Http {
            client: super::http_client(cfg.timeout, cfg.max_in_flight)?,
            limiter: RateLimiter::new(cfg.rate_limit_per_sec),
            timeout: cfg.timeout,
            max_response_bytes: cfg.max_response_bytes,
        })
    }

    /// For building requests; send them with [`Http::send`].
    pub fn client(&self) -> &reqwest::Client {
        &self.client
    }

    /// One request: waits for a rate-limit slot, sends, reads the body up
    /// to the cap. `redact` removes credentials from transport error text.
    pub async fn send(
        &self,
        request: RequestBuilder,
        redact: impl Fn(&str) -> String,
    ) -> Result<Answer, SinkError> {
        if let Some(limiter) = &self.limiter {
            limiter.acquire().await;
        }
        let response = request
            .send()
            .await
            .map_err(|e| self.transport_error(e, &redact))?;
        let status = response.status().as_u16();
        let headers = response.headers().clone();
        let body = match read_body(response, self.max_response_bytes).await {
            Ok(body) => body,
            Err(BodyError::Transport(e)) => return Err(self.transport_error(e, &redact)),
            Err(BodyError::TooLarge { status, limit }) => {
                return Err(SinkError::ResponseTooLarge { status, limit })
            }
        };
        Ok(Answer {
            status,
            headers,
            body,
        })
    }

    fn transport_error(&self, e: reqwest::Error, redact: &impl Fn(&str) -> String) -> SinkError {
        if e.is_timeout() {
            return SinkError::Timeout(self.timeout);
        }
        // The URL can hold an email (look-ups by email): personal data stays out.
        let e = e.without_url();
        let mut msg = e.to_string();
        let mut source = std::error::Error::source(&e);
        while let Some(inner) = source {
            msg.push_str(": ");
            msg.push_str(&inner.to_string());
            source = inner.source();
        }
        SinkError::Connect(redact(&msg))
    }
}
