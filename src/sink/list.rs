//! Reading the external service's side: the vendor list APIs (Stripe
//! `GET /v1/customers` paged by `starting_after`, Memberstack `GET /members`
//! paged by `after` = the last `endCursor`, Clerk `GET /v1/users` paged by
//! `offset`, oldest first so users created meanwhile come last), each
//! record reduced to what
//! reconcile compares: its id, usersync's back-reference
//! (`metadata.usersync_key` / `metaData.usersync_key` / Clerk's
//! `external_id`) and the values at the
//! mapped field paths. Pages go through the sink's HTTP policy (rate limit,
//! timeout, size cap); a 429 or 5xx is waited out (`Retry-After`) and
//! retried a bounded number of times. The webhook sink has no list API.

use std::time::Duration;

use serde_json::Value;

use super::http::Http;
use super::mapping::{as_text, KEY_METADATA};
use super::SinkError;
use crate::config::{Secret, SinkConfig, SinkKind};

/// Records per page: both vendors' maximum.
pub const PAGE_SIZE: usize = 100;
/// Attempts at one page before the listing gives up.
const MAX_ATTEMPTS: u32 = 8;
/// Wait before retrying a page when the answer names none.
const DEFAULT_WAIT: Duration = Duration::from_secs(1);

/// One external record as reconcile sees it.
#[derive(Debug, Clone, PartialEq)]
pub struct ExternalRecord {
    pub id: String,
    /// The row key usersync stored in the record's metadata, if any.
    pub key: Option<String>,
    /// Kept by `on_delete = "mark"`: the row is gone on purpose.
    pub marked_deleted: bool,
    /// The record as the API answered it.
    pub raw: Value,
}

/// One page and the cursor of the next, `None` after the last.
#[derive(Debug)]
pub struct Page {
    pub records: Vec<ExternalRecord>,
    pub next: Option<String>,
}

/// A service whose records can be listed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Service {
    Memberstack,
    Stripe,
    Clerk,
}

impl Service {
    /// The service a sink of `kind` pushes to, if it has a list API.
    pub fn of_sink(kind: SinkKind) -> Option<Service> {
        match kind {
            SinkKind::Memberstack => Some(Service::Memberstack),
            SinkKind::Stripe => Some(Service::Stripe),
            SinkKind::Webhook => None,
        }
    }
}

pub struct Lister {
    kind: Service,
    http: Http,
    base: String,
    key: Secret,
}

impl Lister {
    /// The sink's own service, with the sink's URL, key and HTTP policy.
    pub fn new(cfg: &SinkConfig) -> Result<Lister, String> {
        let Some(service) = Service::of_sink(cfg.kind) else {
            return Err("the webhook sink has no list API to read the other side from; reconcile and import work with sink.type = \"memberstack\" or \"stripe\"".into());
        };
        let key = cfg
            .api_key
            .clone()
            .filter(|k| !k.expose().is_empty())
            .ok_or_else(|| format!("the {} sink needs an API key", cfg.kind.name()))?;
        Lister::with(service, cfg, &cfg.url, key)
    }

    /// `service` at `base` with `key`, through an HTTP policy made from
    /// `policy` (rate limit, timeout, response cap).
    pub fn with(
        service: Service,
        policy: &SinkConfig,
        base: &str,
        key: Secret,
    ) -> Result<Lister, String> {
        Ok(Lister {
            kind: service,
            http: Http::new(policy)?,
            base: base.trim_end_matches('/').to_string(),
            key,
        })
    }

    /// The mapped field's value in `record`, as text (absent, null and empty
    /// are all `None`, as the vendors store a cleared field).
    pub fn field_text(&self, record: &ExternalRecord, path: &str) -> Option<String> {
        field_text(self.kind, &record.raw, path)
    }

    /// One page after `cursor` (`None`: the first).
    pub async fn page(&self, cursor: Option<&str>) -> Result<Page, SinkError> {
        let url = match (self.kind, cursor) {
            (Service::Stripe, None) => format!("{}/v1/customers?limit={PAGE_SIZE}", self.base),
            (Service::Stripe, Some(c)) => format!(
                "{}/v1/customers?limit={PAGE_SIZE}&starting_after={}",
                self.base,
                super::stripe::encode(c)
            ),
            (Service::Clerk, c) => format!(
                "{}/v1/users?limit={PAGE_SIZE}&offset={}&order_by=%2Bcreated_at",
                self.base,
                c.and_then(|c| c.parse::<u64>().ok()).unwrap_or(0)
            ),
            (Service::Memberstack, None) => format!("{}/members?limit={PAGE_SIZE}", self.base),
            (Service::Memberstack, Some(c)) => format!(
                "{}/members?limit={PAGE_SIZE}&after={}",
                self.base,
                super::stripe::encode(c)
            ),
        };
        let body = self.get(&url).await?;
        match self.kind {
            Service::Stripe => stripe_page(&body),
            Service::Memberstack => memberstack_page(&body),
            Service::Clerk => clerk_page(
                &body,
                cursor.and_then(|c| c.parse::<u64>().ok()).unwrap_or(0),
            ),
        }
    }

    async fn get(&self, url: &str) -> Result<Value, SinkError> {
        let mut attempt = 0;
        loop {
            attempt += 1;
            let mut req = self
                .http
                .client()
                .get(url)
                .header("accept", "application/json");
            req = match self.kind {
                Service::Stripe | Service::Clerk => req.bearer_auth(self.key.expose()),
                Service::Memberstack => req.header("x-api-key", self.key.expose()),
            };
            let key = self.key.expose().to_string();
            let result = self.http.send(req, |t| t.replace(&key, "[redacted]")).await;
            let error = match result {
                Ok(answer) if (200..300).contains(&answer.status) => {
                    return answer
                        .body
                        .json()
                        .map_err(|e| SinkError::Malformed(format!("list page: {e}")));
                }
                Ok(answer) => SinkError::Http {
                    status: answer.status,
                    body: answer.body.text.chars().take(200).collect(),
                    retry_after: answer.retry_after(),
                },
                Err(e) => e,
            };
            if !error.is_retryable() || attempt >= MAX_ATTEMPTS {
                return Err(error);
            }
            let wait = error.retry_after().unwrap_or(DEFAULT_WAIT);
            tracing::debug!(attempt, error = %error.summary(), ?wait, "list page refused; waiting");
            tokio::time::sleep(wait).await;
        }
    }
}

fn record_id(v: &Value) -> Result<String, SinkError> {
    match v.get("id").and_then(Value::as_str) {
        Some(id) if !id.is_empty() && id.len() <= 255 => Ok(id.to_string()),
        _ => Err(SinkError::Malformed(
            "a listed record has no usable id".into(),
        )),
    }
}

fn stripe_page(body: &Value) -> Result<Page, SinkError> {
    let data = body
        .get("data")
        .and_then(Value::as_array)
        .ok_or_else(|| SinkError::Malformed("customer list without data".into()))?;
    let mut records = Vec::with_capacity(data.len());
    for c in data {
        let metadata = c.get("metadata");
        records.push(ExternalRecord {
            id: record_id(c)?,
            key: metadata.and_then(|m| m.get(KEY_METADATA)).and_then(as_text),
            marked_deleted: metadata
                .and_then(|m| m.get(super::stripe::DELETED_AT_METADATA))
                .is_some_and(|v| !v.is_null()),
            raw: c.clone(),
        });
    }
    let more = body.get("has_more").and_then(Value::as_bool) == Some(true);
    let next = if more {
        records.last().map(|r| r.id.clone())
    } else {
        None
    };
    Ok(Page { records, next })
}

fn memberstack_page(body: &Value) -> Result<Page, SinkError> {
    let data = body
        .get("data")
        .and_then(Value::as_array)
        .ok_or_else(|| SinkError::Malformed("member list without data".into()))?;
    let mut records = Vec::with_capacity(data.len());
    for m in data {
        records.push(ExternalRecord {
            id: record_id(m)?,
            key: m
                .get("metaData")
                .and_then(|d| d.get(KEY_METADATA))
                .and_then(as_text),
            marked_deleted: false,
            raw: m.clone(),
        });
    }
    let more = body.get("hasNextPage").and_then(Value::as_bool) == Some(true);
    let next = match (more, body.get("endCursor")) {
        (true, Some(Value::Number(n))) => Some(n.to_string()),
        (true, Some(Value::String(s))) => Some(s.clone()),
        (true, _) => {
            return Err(SinkError::Malformed(
                "member list says it has a next page but gives no endCursor".into(),
            ))
        }
        (false, _) => None,
    };
    Ok(Page { records, next })
}

/// Clerk answers a bare array; a full page means there may be more, at the
/// next offset.
fn clerk_page(body: &Value, offset: u64) -> Result<Page, SinkError> {
    let data = body
        .as_array()
        .ok_or_else(|| SinkError::Malformed("user list is not an array".into()))?;
    let mut records = Vec::with_capacity(data.len());
    for u in data {
        records.push(ExternalRecord {
            id: record_id(u)?,
            key: u.get("external_id").and_then(as_text),
            marked_deleted: false,
            raw: u.clone(),
        });
    }
    let next = (records.len() >= PAGE_SIZE).then(|| (offset + records.len() as u64).to_string());
    Ok(Page { records, next })
}

/// Where a mapping path lives in the listed record: Memberstack keeps the
/// email under `auth`; everything else is at its own dotted path.
pub fn field_text(kind: Service, raw: &Value, path: &str) -> Option<String> {
    let pointer = match (kind, path) {
        (Service::Memberstack, "email") => "/auth/email".to_string(),
        _ => format!(
            "/{}",
            path.replace('~', "~0").replace('/', "~1").replace('.', "/")
        ),
    };
    raw.pointer(&pointer)
        .and_then(as_text)
        .filter(|s| !s.is_empty())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dev::canned::answering;
    use serde_json::json;

    fn lister(url: &str) -> Lister {
        let policy = SinkConfig {
            kind: SinkKind::Stripe,
            url: url.into(),
            secret: None,
            api_key: Some(Secret::new("sk_test_list_unit_0000")),
            api_key_source: "environment variable K".into(),
            external_id_pointer: "/id".into(),
            columns: vec![],
            mapping: vec![],
            timeout: Duration::from_secs(5),
            max_in_flight: 1,
            rate_limit_per_sec: 0,
            on_delete: crate::config::OnDelete::Delete,
            max_response_bytes: 1 << 20,
            max_external_id_length: 255,
        };
        Lister::new(&policy).expect("lister")
    }

    /// A page refused with a retryable status is asked again, up to
    /// MAX_ATTEMPTS times; a refusal that retrying cannot fix, once.
    #[tokio::test]
    async fn a_refused_page_is_retried_a_bounded_number_of_times_and_a_permanent_refusal_once() {
        let refusal = r#"{"error":{"message":"no"}}"#;
        let server = answering(503, refusal).await;
        // Bounded, so a retry loop that never ends fails here instead of hanging.
        let e = tokio::time::timeout(Duration::from_secs(30), lister(&server.url).page(None))
            .await
            .expect("the retries end")
            .expect_err("503");
        assert_eq!(e.status(), Some(503));
        assert_eq!(server.requests(), MAX_ATTEMPTS as usize);
        let server = answering(401, refusal).await;
        let e = lister(&server.url).page(None).await.expect_err("401");
        assert_eq!(e.status(), Some(401));
        assert_eq!(server.requests(), 1);
    }

    #[test]
    fn a_listed_id_is_one_to_255_characters() {
        assert!(record_id(&json!({"id": ""})).is_err());
        assert!(record_id(&json!({"id": "x".repeat(256)})).is_err());
        assert!(record_id(&json!({"id": 7})).is_err());
        assert_eq!(
            record_id(&json!({"id": "x".repeat(255)})).ok(),
            Some("x".repeat(255))
        );
    }

    #[test]
    fn pages_read_cursor_and_back_reference() {
        let stripe = json!({"object": "list", "has_more": true, "data": [
            {"id": "cus_1", "email": "a@x", "metadata": {"usersync_key": "7", "plan": "pro"}},
            {"id": "cus_2", "metadata": {"deleted_at": "2026-01-01"}}
        ]});
        let page = stripe_page(&stripe).unwrap();
        assert_eq!(page.next.as_deref(), Some("cus_2"));
        assert_eq!(page.records[0].key.as_deref(), Some("7"));
        assert!(page.records[1].marked_deleted);
        assert_eq!(
            field_text(Service::Stripe, &page.records[0].raw, "metadata.plan").as_deref(),
            Some("pro")
        );
        let ms = json!({"hasNextPage": false, "endCursor": 9, "data": [
            {"id": "mem_1", "auth": {"email": "b@x"}, "metaData": {"usersync_key": 3}}
        ]});
        let page = memberstack_page(&ms).unwrap();
        assert_eq!(page.next, None);
        assert_eq!(page.records[0].key.as_deref(), Some("3"));
        assert_eq!(
            field_text(Service::Memberstack, &page.records[0].raw, "email").as_deref(),
            Some("b@x")
        );
        assert!(stripe_page(&json!({"data": [{"id": ""}]})).is_err());
        // A null deleted_at (an implementation that keeps cleared keys) is not a mark.
        let cleared = json!({"data": [{"id": "cus_3", "metadata": {"deleted_at": null}}]});
        assert!(!stripe_page(&cleared).unwrap().records[0].marked_deleted);
        assert!(memberstack_page(&json!({"hasNextPage": true, "data": []})).is_err());
        let full: Vec<Value> = (0..PAGE_SIZE)
            .map(|i| json!({"id": format!("user_{i}"), "external_id": "9"}))
            .collect();
        let page = clerk_page(&Value::Array(full), 200).unwrap();
        assert_eq!(page.next.as_deref(), Some("300"));
        assert_eq!(page.records[0].key.as_deref(), Some("9"));
        let page = clerk_page(&json!([{"id": "user_1"}]), 300).unwrap();
        assert_eq!(page.next, None);
        assert!(clerk_page(&json!({"data": []}), 0).is_err());
    }
}
