//! Sinks push one change to an external service. This module owns the small
//! `Sink` trait every adapter implements, the error classification that
//! decides retry versus dead letter, and the shared HTTP client.

pub mod fence;
pub mod http;
pub mod list;
pub mod mapping;
pub mod memberstack;
pub mod ratelimit;
pub mod retry;
pub mod stripe;
pub mod webhook;

use std::time::Duration;

use futures::future::BoxFuture;

use crate::core::change::{Change, Operation};

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
    /// The change holds a value usersync cannot convert to JSON (see
    /// `Change::unconvertible`); nothing was sent.
    #[error("cannot convert the row to JSON, nothing was sent: column {0}")]
    Unconvertible(String),
    /// The answer's body is longer than `sink.max_response_bytes`; it was
    /// not read on.
    #[error("the answer (HTTP {status}) is longer than sink.max_response_bytes ({limit} bytes); it was not read on")]
    ResponseTooLarge { status: u16, limit: u64 },
    /// The service answered with an external id usersync will not store.
    #[error("invalid external id in the answer: {0}")]
    InvalidExternalId(String),
    /// This daemon's leadership lease ran out (`fence`); nothing was sent.
    /// The push is abandoned, never dead-lettered: the new leader replays it.
    #[error("not the leader any more (leadership lease expired); nothing was sent")]
    Fenced,
}

impl SinkError {
    pub fn is_retryable(&self) -> bool {
        match self {
            SinkError::Http { status, .. } => {
                matches!(status, 408 | 425 | 429) || (500..=599).contains(status)
            }
            SinkError::Api { retryable, .. } => *retryable,
            SinkError::Timeout(_) | SinkError::Connect(_) => true,
            SinkError::Malformed(_)
            | SinkError::Unconvertible(_)
            | SinkError::ResponseTooLarge { .. }
            | SinkError::InvalidExternalId(_)
            | SinkError::Fenced => false,
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
            SinkError::Unconvertible(_) => "a value cannot be converted to JSON".to_string(),
            SinkError::ResponseTooLarge { status, .. } => {
                format!("HTTP {status}: response too large")
            }
            SinkError::InvalidExternalId(_) => "invalid external id".to_string(),
            SinkError::Fenced => "not the leader".to_string(),
        }
    }

    pub fn status(&self) -> Option<u16> {
        match self {
            SinkError::Http { status, .. }
            | SinkError::Api { status, .. }
            | SinkError::ResponseTooLarge { status, .. } => Some(*status),
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

/// Refuses a change the source marked as holding a value it cannot convert
/// to JSON: pushing it without that column would silently lose data. A
/// permanent error, so the pipeline dead-letters the change (naming the
/// column) and parks that user alone. Every sink calls this first.
pub fn refuse_unconvertible(change: &Change) -> Result<(), SinkError> {
    match &change.unconvertible {
        Some(what) => Err(SinkError::Unconvertible(what.clone())),
        None => Ok(()),
    }
}

/// How a user's current row is pushed when it is not streamed as a change
/// (a sync request of `backfill` or `sync-user`, `dlq replay`): as an update
/// of its record when the record's id is known, else as a create, in which
/// the Memberstack sink links a member with the same email. Stripe links an
/// existing customer only on the update path (a look-up by the row's key,
/// then a create); its creates are deduplicated by idempotency keys alone,
/// which a customer made by another tool, or by a push whose answer was
/// lost before it was dead-lettered, does not share.
pub fn row_push_op(sink: &str, id_known: bool) -> Operation {
    if id_known || sink == "stripe" {
        Operation::Update
    } else {
        Operation::Insert
    }
}

/// A response body read up to `sink.max_response_bytes`.
#[derive(Debug)]
pub struct Body {
    /// The body as text; invalid UTF-8 replaced (for excerpts only).
    pub text: String,
    /// Whether the body was valid UTF-8. A 2xx answer that is not must not
    /// be parsed from `text`, or ids would silently change.
    pub valid_utf8: bool,
}

impl Body {
    /// The body as JSON, refusing invalid UTF-8 rather than replacing it.
    pub fn json(&self) -> Result<serde_json::Value, &'static str> {
        if !self.valid_utf8 {
            return Err("not valid UTF-8");
        }
        serde_json::from_str(&self.text).map_err(|_| "not JSON")
    }
}

/// Why a body could not be read.
#[derive(Debug)]
pub enum BodyError {
    Transport(reqwest::Error),
    /// The body is longer than the limit; reading stopped there.
    TooLarge {
        status: u16,
        limit: u64,
    },
}

/// Reads `response`'s body, never holding more than `limit` bytes of it:
/// a declared `Content-Length` over the limit is refused before reading,
/// and a body streaming past it is dropped at the limit. One hostile or
/// broken answer must not be able to make the daemon's memory grow.
pub async fn read_body(mut response: reqwest::Response, limit: u64) -> Result<Body, BodyError> {
    let status = response.status().as_u16();
    if response.content_length().is_some_and(|n| n > limit) {
        return Err(BodyError::TooLarge { status, limit });
    }
    let mut bytes: Vec<u8> = Vec::new();
    while let Some(chunk) = response.chunk().await.map_err(BodyError::Transport)? {
        if bytes.len() as u64 + chunk.len() as u64 > limit {
            return Err(BodyError::TooLarge { status, limit });
        }
        bytes.extend_from_slice(&chunk);
    }
    Ok(match String::from_utf8(bytes) {
        Ok(text) => Body {
            text,
            valid_utf8: true,
        },
        Err(e) => Body {
            text: String::from_utf8_lossy(e.as_bytes()).into_owned(),
            valid_utf8: false,
        },
    })
}

/// The one check every external id read from a response passes before it
/// is kept, logged or written back: a non-empty string of at most
/// `max_len` bytes without control characters (a NUL cannot even be
/// stored in a PostgreSQL text column), or an integer, rendered as its
/// exact decimal digits. Floats, objects, arrays, booleans and null are
/// refused. The error never includes the id itself (it may be huge or
/// hostile), only what is wrong with it.
pub fn validate_external_id(
    value: &serde_json::Value,
    max_len: usize,
) -> Result<String, SinkError> {
    use serde_json::Value;
    let bad = |why: String| Err(SinkError::InvalidExternalId(why));
    let id = match value {
        Value::String(s) => s.clone(),
        Value::Number(n) => {
            // arbitrary_precision: the digits exactly as the service sent them.
            let digits = n.to_string();
            let unsigned = digits.strip_prefix('-').unwrap_or(&digits);
            if unsigned.is_empty() || !unsigned.bytes().all(|b| b.is_ascii_digit()) {
                return bad("a number that is not an integer".into());
            }
            digits
        }
        Value::Null => return bad("null".into()),
        Value::Bool(_) => return bad("a boolean".into()),
        Value::Array(_) => return bad("an array".into()),
        Value::Object(_) => return bad("an object".into()),
    };
    if id.is_empty() {
        return bad("empty".into());
    }
    if id.len() > max_len {
        return bad(format!(
            "{} bytes long, more than sink.max_external_id_length ({max_len})",
            id.len()
        ));
    }
    if let Some(c) = id.chars().find(|c| c.is_control()) {
        return bad(format!("contains the control character U+{:04X}", c as u32));
    }
    Ok(id)
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
    fn external_ids_are_validated() {
        use serde_json::json;
        let ok = |v: serde_json::Value| validate_external_id(&v, 255).unwrap();
        let err = |v: serde_json::Value| validate_external_id(&v, 255).unwrap_err().to_string();
        assert_eq!(ok(json!("mem_abc")), "mem_abc");
        assert_eq!(ok(json!("ü☃-é")), "ü☃-é");
        assert_eq!(ok(json!(42)), "42");
        assert_eq!(ok(json!(-7)), "-7");
        let big: serde_json::Value =
            serde_json::from_str("123456789012345678901234567890").unwrap();
        assert_eq!(ok(big), "123456789012345678901234567890");
        assert!(err(json!("ab\u{0}cd")).contains("U+0000"));
        assert!(err(json!("a\nb")).contains("U+000A"));
        assert!(err(json!("a\u{9f}b")).contains("U+009F"));
        assert!(err(json!(1.5)).contains("not an integer"));
        let exp: serde_json::Value = serde_json::from_str("1e3").unwrap();
        assert!(err(exp).contains("not an integer"));
        assert!(err(json!("x".repeat(256))).contains("256 bytes"));
        assert_eq!(ok(json!("x".repeat(255))).len(), 255);
        for v in [
            json!(""),
            json!(null),
            json!(true),
            json!([1]),
            json!({"id": 1}),
        ] {
            validate_external_id(&v, 255).unwrap_err();
        }
        // The error names the problem, never the id.
        assert!(!err(json!(format!("secret{}", "x".repeat(300)))).contains("secret"));
        for e in [
            SinkError::InvalidExternalId("x".into()),
            SinkError::ResponseTooLarge {
                status: 200,
                limit: 1,
            },
            SinkError::Unconvertible("j: x".into()),
        ] {
            assert!(!e.is_retryable(), "{e}");
        }
    }

    /// Answers one request with `raw` (status line, headers and body as
    /// given), then holds the connection open until the client drops it.
    async fn answer_once(raw: Vec<u8>) -> String {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        tokio::spawn(async move {
            let Ok((mut socket, _)) = listener.accept().await else {
                return;
            };
            let mut request = Vec::new();
            let mut buf = [0u8; 1024];
            while !request.windows(4).any(|w| w == b"\r\n\r\n") {
                match socket.read(&mut buf).await {
                    Ok(0) | Err(_) => return,
                    Ok(n) => request.extend_from_slice(&buf[..n]),
                }
            }
            if socket.write_all(&raw).await.is_err() {
                return;
            }
            while matches!(socket.read(&mut buf).await, Ok(n) if n > 0) {}
        });
        format!("http://{addr}/")
    }

    fn chunked(body: &[u8], chunk: usize) -> Vec<u8> {
        let mut raw = b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ntransfer-encoding: chunked\r\n\r\n".to_vec();
        for c in body.chunks(chunk) {
            raw.extend_from_slice(format!("{:x}\r\n", c.len()).as_bytes());
            raw.extend_from_slice(c);
            raw.extend_from_slice(b"\r\n");
        }
        raw.extend_from_slice(b"0\r\n\r\n");
        raw
    }

    fn with_length(declared: usize, body: &[u8]) -> Vec<u8> {
        let mut raw = format!(
            "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {declared}\r\n\r\n"
        )
        .into_bytes();
        raw.extend_from_slice(body);
        raw
    }

    async fn read(raw: Vec<u8>, limit: u64) -> Result<Body, BodyError> {
        let url = answer_once(raw).await;
        let client = http_client(Duration::from_secs(10), 1).expect("client");
        let response = client.get(url).send().await.expect("an answer");
        read_body(response, limit).await
    }

    /// Invariant "bounded bodies": a body of exactly `max_response_bytes`
    /// is read, one byte more is refused, whether its length is declared
    /// (`Content-Length`, refused before reading: a server that declares a
    /// gigabyte and sends nothing more is not waited for) or not (chunked,
    /// refused at the chunk that crosses the limit).
    #[tokio::test]
    async fn bodies_are_read_up_to_the_limit_and_not_a_byte_more() {
        const LIMIT: usize = 4096;
        let exact = vec![b'x'; LIMIT];
        let over = vec![b'x'; LIMIT + 1];
        for (what, raw) in [
            ("declared", with_length(LIMIT, &exact)),
            ("chunked", chunked(&exact, 1000)),
        ] {
            let body = read(raw, LIMIT as u64)
                .await
                .unwrap_or_else(|e| panic!("{what}: {e:?}"));
            assert_eq!(body.text.len(), LIMIT, "{what}");
            assert!(body.valid_utf8);
        }
        for (what, raw) in [
            ("declared", with_length(LIMIT + 1, &over)),
            ("chunked", chunked(&over, 1000)),
            ("declared, never sent", with_length(1 << 30, b"")),
        ] {
            match read(raw, LIMIT as u64).await {
                Err(BodyError::TooLarge { status, limit }) => {
                    assert_eq!((status, limit), (200, LIMIT as u64), "{what}")
                }
                other => panic!("{what}: {other:?}"),
            }
        }
        let body = read(with_length(4, b"ab\xffc"), LIMIT as u64)
            .await
            .expect("read");
        assert!(!body.valid_utf8);
        assert_eq!(body.json(), Err("not valid UTF-8"));
        let body = read(with_length(10, br#"{"id":"a"}"#), LIMIT as u64)
            .await
            .expect("read");
        assert_eq!(body.json(), Ok(serde_json::json!({"id": "a"})));
    }

    /// A redirect is an answer to report, not to follow: a POST that
    /// followed a 307/302 could be re-sent elsewhere or silently become a
    /// GET. And a service that never answers ends in a timeout (retried).
    #[tokio::test]
    async fn the_client_reports_redirects_and_times_out() {
        let url = answer_once(
            b"HTTP/1.1 307 Temporary Redirect\r\nlocation: http://127.0.0.1:1/\r\ncontent-length: 0\r\n\r\n"
                .to_vec(),
        )
        .await;
        let client = http_client(Duration::from_millis(500), 1).expect("client");
        let answer = client.post(url).body("{}").send().await.expect("an answer");
        assert_eq!(answer.status().as_u16(), 307);
        // Headers never come: the request must end on the client's timeout.
        let silent = answer_once(Vec::new()).await;
        let e = client.get(silent).send().await.expect_err("no answer");
        assert!(e.is_timeout(), "{e}");
    }

    /// Every sink request goes through `Http` and its client: a redirect
    /// is reported as the answer there too, never followed.
    #[tokio::test]
    async fn sink_requests_report_redirects() {
        let url = answer_once(
            b"HTTP/1.1 302 Found\r\nlocation: http://127.0.0.1:1/\r\ncontent-length: 0\r\n\r\n"
                .to_vec(),
        )
        .await;
        let cfg = crate::config::SinkConfig {
            kind: crate::config::SinkKind::Webhook,
            url: url.clone(),
            secret: None,
            api_key: None,
            api_key_source: String::new(),
            external_id_pointer: "/id".into(),
            columns: vec![],
            mapping: vec![],
            timeout: Duration::from_secs(10),
            max_in_flight: 1,
            rate_limit_per_sec: 0,
            on_delete: crate::config::OnDelete::Mark,
            max_response_bytes: 1 << 20,
            max_external_id_length: 255,
        };
        let http = http::Http::new(&cfg).expect("http");
        let answer = http
            .send(http.client().post(url).body("{}"), str::to_string)
            .await
            .expect("an answer");
        assert_eq!(answer.status, 302);
    }

    /// What is logged of an error: the status or the transport failure,
    /// never the service's message (it may echo an email).
    #[test]
    fn summaries_leave_the_message_out() {
        let api = SinkError::Api {
            status: 400,
            message: "ada@example.com is not a valid email".into(),
            retryable: false,
            retry_after: None,
        };
        assert_eq!(api.summary(), "HTTP 400");
        assert_eq!(
            SinkError::Malformed("ada@example.com".into()).summary(),
            "malformed response"
        );
    }

    /// A change holding a value that cannot be converted is refused
    /// permanently (dead-lettered, naming the column), never sent without it.
    #[test]
    fn an_unconvertible_change_is_refused() {
        let mut change = Change::for_test(crate::core::change::Operation::Insert, 1.into());
        assert!(refuse_unconvertible(&change).is_ok());
        change.unconvertible = Some("balance: NaN".into());
        let e = refuse_unconvertible(&change).expect_err("refused");
        assert!(!e.is_retryable());
        assert!(e.to_string().contains("balance: NaN"), "{e}");
    }

    #[test]
    fn excerpt_is_bounded_single_line() {
        let e = excerpt(&format!("a\nb{}", "x".repeat(1000)));
        assert!(!e.contains('\n'));
        assert_eq!(e.chars().count(), 300);
    }
}
