//! The Stripe sink: one Stripe customer per row, through the customers API
//! (`/v1/customers`), form-encoded with a Bearer key.
//!
//! - create: `POST /v1/customers` with the mapped fields and
//!   `metadata[usersync_key]` (the row's key), under an `Idempotency-Key`
//!   derived from the event id, so a push replayed after a crash gets the
//!   first answer (the same customer) back instead of a second customer;
//! - update: `POST /v1/customers/{id}`; a NULL column clears its field;
//! - delete, per `sink.on_delete`: mark (`metadata[deleted_at]`, keeps the
//!   billing history), delete (`DELETE /v1/customers/{id}`, a 404 counts as
//!   done) or ignore;
//! - an update or delete whose customer id is unknown first looks the
//!   customer up by `metadata['usersync_key']` (customer search). Where the
//!   search API answers 404 (an account without Search, such as Stripe's
//!   accounts in India, or an implementation of the API without it), the
//!   look-up lists customers instead: by the mapped email first, then all.
//!
//! Errors are Stripe's `{"error":{type,code,message}}`; `Stripe-Should-Retry`
//! decides retry versus dead letter where Stripe sends it. One call of
//! [`Sink::push`] is one attempt; retries are the pipeline's.

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use futures::future::BoxFuture;
use reqwest::Method;
use serde_json::{Map, Value};
use sha2::{Digest, Sha256};

use super::http::Http;
use super::mapping::{as_text, KEY_METADATA};
use super::{
    excerpt, parse_retry_after, refuse_unconvertible, validate_external_id, Sink, SinkError,
};
use crate::config::{OnDelete, Secret, SinkConfig};
use crate::core::change::{format_time_us, Change, Operation};

/// The API version every request pins, so that an account's default version
/// (customer search needs 2020-08-27 or later) cannot change the answers.
pub const STRIPE_VERSION: &str = "2024-06-20";

/// The metadata key a `mark` delete sets to the commit time.
pub const DELETED_AT_METADATA: &str = "deleted_at";

/// Stripe prunes idempotency keys after 24 hours. A create older than this
/// may no longer be deduplicated by its key, so it looks for the customer
/// first.
const IDEMPOTENCY_WINDOW: Duration = Duration::from_secs(23 * 3600);

/// How long to wait before retrying a create whose idempotency key was used
/// with other parameters and whose customer search has no answer yet
/// (Stripe's search index lags writes by up to about a minute).
const SEARCH_LAG_RETRY: Duration = Duration::from_secs(10);

/// Stripe customer fields a mapping may name, as dotted paths.
const SCALAR_FIELDS: &[&str] = &["email", "name", "phone", "description"];
const ADDRESS_FIELDS: &[&str] = &["line1", "line2", "city", "state", "postal_code", "country"];

pub struct StripeSink {
    http: Http,
    /// API base URL without a trailing slash.
    base: String,
    key: Secret,
    /// (form field name such as `metadata[plan]`, users column).
    fields: Vec<(String, String)>,
    on_delete: OnDelete,
    max_external_id_length: usize,
    /// Set when the customer search answered 404: look-ups list instead.
    search_unavailable: AtomicBool,
}

/// The most pages one look-up by listing reads (100 customers each): a
/// listing that never ends is an answer that is wrong, not a big account.
const MAX_LOOKUP_PAGES: usize = 100_000;

/// A failed request: the error for the pipeline plus Stripe's error type and
/// code, which some callers act on (a 404 on delete is success).
#[derive(Debug)]
struct Failed {
    error: SinkError,
    kind: Option<String>,
    code: Option<String>,
}

impl From<Failed> for SinkError {
    fn from(f: Failed) -> SinkError {
        f.error
    }
}

impl From<SinkError> for Failed {
    fn from(error: SinkError) -> Failed {
        Failed {
            error,
            kind: None,
            code: None,
        }
    }
}

/// Which mutation a request is, for its idempotency key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Create,
    Update,
    Mark,
}

impl Kind {
    fn name(self) -> &'static str {
        match self {
            Kind::Create => "create",
            Kind::Update => "update",
            Kind::Mark => "mark",
        }
    }
}

impl StripeSink {
    pub fn new(cfg: &SinkConfig) -> Result<Self, String> {
        let key = cfg
            .api_key
            .clone()
            .filter(|k| !k.expose().is_empty())
            .ok_or("the stripe sink needs an API key: set sink.api_key_env or sink.api_key_file")?;
        let mut fields = Vec::with_capacity(cfg.mapping.len());
        for (path, column) in &cfg.mapping {
            fields.push((form_field(path)?, column.clone()));
        }
        Ok(StripeSink {
            http: Http::new(cfg)?,
            base: cfg.url.trim_end_matches('/').to_string(),
            key,
            fields,
            on_delete: cfg.on_delete,
            max_external_id_length: cfg.max_external_id_length,
            search_unavailable: AtomicBool::new(false),
        })
    }

    /// A client that only reads ([`StripeSink::retrieve`]): the inbound
    /// apply's, with a Stripe source's own key and URL
    /// (`inbound.sources.<name>.api_key_env`); `policy` gives the timeout,
    /// rate limit and response cap.
    pub fn reader(
        policy: &SinkConfig,
        base: &str,
        key: crate::config::Secret,
    ) -> Result<Self, String> {
        Ok(StripeSink {
            http: Http::new(policy)?,
            base: base.trim_end_matches('/').to_string(),
            key,
            fields: Vec::new(),
            on_delete: policy.on_delete,
            max_external_id_length: policy.max_external_id_length,
            search_unavailable: AtomicBool::new(false),
        })
    }

    async fn send_change(
        &self,
        change: &Change,
        external_id: Option<&str>,
    ) -> Result<Option<String>, SinkError> {
        refuse_unconvertible(change)?;
        match change.op {
            Operation::Insert | Operation::Update => {
                let data = change.data.as_ref().ok_or_else(|| {
                    SinkError::Malformed(format!("{} carries no row data", change.event_id))
                })?;
                let id = match external_id {
                    Some(id) => Some(id.to_string()),
                    // A create is deduplicated by its idempotency key, unless
                    // the key may have expired since the change was made.
                    None if change.op == Operation::Insert && !older_than_key_window(change) => {
                        None
                    }
                    None => self.find(change).await?,
                };
                match id {
                    Some(id) => self.update(change, &id, data, Kind::Update).await,
                    None => self.create(change, data).await,
                }
                .map(Some)
            }
            Operation::Delete => {
                if self.on_delete == OnDelete::Ignore {
                    return Ok(external_id.map(str::to_string));
                }
                let id = match external_id {
                    Some(id) => id.to_string(),
                    None => match self.find(change).await? {
                        Some(id) => id,
                        // Never reached Stripe: nothing to delete.
                        None => return Ok(None),
                    },
                };
                match self.on_delete {
                    OnDelete::Delete => self.delete(&id).await.map(Some),
                    _ => {
                        let mut form = Form::default();
                        form.push(
                            format!("metadata[{DELETED_AT_METADATA}]"),
                            format_time_us(change.commit_time_us),
                        );
                        self.post_customer(change, &id, form, Kind::Mark)
                            .await
                            .map(Some)
                    }
                }
            }
        }
    }

    async fn create(
        &self,
        change: &Change,
        data: &Map<String, Value>,
    ) -> Result<String, SinkError> {
        let form = self.fields_form(change, data, false);
        let key = idempotency_key(change, Kind::Create, None);
        match self
            .request(Method::POST, "/v1/customers", Some(&form), Some(&key))
            .await
        {
            Ok(body) => customer_id(
                &body,
                "the answer to a customer create",
                self.max_external_id_length,
            ),
            // The key was first used with other parameters (the mapping
            // changed across a restart, or a replay found the row changed):
            // that first request may have created the customer. Link it.
            Err(f) if f.kind.as_deref() == Some("idempotency_error") => {
                match self.find(change).await? {
                    Some(id) => self.update(change, &id, data, Kind::Update).await,
                    None => Err(SinkError::Api {
                        status: f.error.status().unwrap_or(400),
                        message: format!(
                            "{}; no customer with metadata {KEY_METADATA}={} is found yet (Stripe's search can lag a minute), retrying",
                            api_message(&f.error),
                            change.key.text
                        ),
                        retryable: true,
                        retry_after: Some(SEARCH_LAG_RETRY),
                    }),
                }
            }
            Err(f) => Err(f.into()),
        }
    }

    async fn update(
        &self,
        change: &Change,
        id: &str,
        data: &Map<String, Value>,
        kind: Kind,
    ) -> Result<String, SinkError> {
        let form = self.fields_form(change, data, true);
        self.post_customer(change, id, form, kind).await
    }

    async fn post_customer(
        &self,
        change: &Change,
        id: &str,
        form: Form,
        kind: Kind,
    ) -> Result<String, SinkError> {
        let path = format!("/v1/customers/{}", encode(id));
        // Updates set values, so applying one twice is harmless: the key
        // includes a digest of the request and only dedupes exact retries,
        // never refuses a changed one.
        let key = idempotency_key(change, kind, Some(&digest(&path, &form)));
        let body = self
            .request(Method::POST, &path, Some(&form), Some(&key))
            .await?;
        // An answer without an id keeps the known one; an id that is there
        // must be valid.
        match body.get("id") {
            None | Some(Value::Null) => Ok(id.to_string()),
            Some(_) => customer_id(
                &body,
                "the answer to a customer update",
                self.max_external_id_length,
            ),
        }
    }

    async fn delete(&self, id: &str) -> Result<String, SinkError> {
        let path = format!("/v1/customers/{}", encode(id));
        // DELETE is idempotent at Stripe; an idempotency key has no effect on it.
        match self.request(Method::DELETE, &path, None, None).await {
            Ok(_) => Ok(id.to_string()),
            Err(f) if f.code.as_deref() == Some("resource_missing") => {
                tracing::debug!(external_id = id, "customer already gone");
                Ok(id.to_string())
            }
            Err(f) => Err(f.into()),
        }
    }

    /// The live (not deleted, not marked) customer whose
    /// `metadata[usersync_key]` is the row's key.
    async fn find(&self, change: &Change) -> Result<Option<String>, SinkError> {
        if !self.search_unavailable.load(Ordering::Relaxed) {
            match self.search(change).await {
                // Stripe's answer to a URL it does not serve; not a
                // customer's 404 (those name `resource_missing`).
                Err(f) if f.error.status() == Some(404) && f.code.is_none() => {
                    tracing::warn!(
                        "Stripe answered the customer search with 404 (Search is not available to this account or this implementation of the API); customers are looked up by listing them from now on, which takes a request per 100 customers"
                    );
                    self.search_unavailable.store(true, Ordering::Relaxed);
                }
                found => return self.pick(change, found?),
            }
        }
        // The customer may carry an email the row no longer has, so a miss
        // by email is checked against every customer.
        if let Some(email) = self.mapped_email(change) {
            let found = self.list_all(change, Some(&email)).await?;
            if let Some(id) = self.pick(change, found)? {
                return Ok(Some(id));
            }
        }
        let found = self.list_all(change, None).await?;
        self.pick(change, found)
    }

    async fn search(&self, change: &Change) -> Result<Vec<Value>, Failed> {
        let query = format!(
            "metadata['{KEY_METADATA}']:'{}'",
            change.key.text.replace('\\', "\\\\").replace('\'', "\\'")
        );
        let path = format!("/v1/customers/search?query={}&limit=10", encode(&query));
        let body = self.request(Method::GET, &path, None, None).await?;
        match body.get("data").and_then(Value::as_array) {
            Some(found) => Ok(found.clone()),
            None => Err(Failed::from(SinkError::Malformed(format!(
                "customer search answered without a data list: {}",
                excerpt(&body.to_string())
            )))),
        }
    }

    /// Every customer `GET /v1/customers` lists (with that email, if given)
    /// that carries the row's key, page by page.
    async fn list_all(
        &self,
        change: &Change,
        email: Option<&str>,
    ) -> Result<Vec<Value>, SinkError> {
        let mut path = String::from("/v1/customers?limit=100");
        if let Some(email) = email {
            path.push_str(&format!("&email={}", encode(email)));
        }
        let mut found = Vec::new();
        let mut after: Option<String> = None;
        for _ in 0..MAX_LOOKUP_PAGES {
            let page_path = match &after {
                Some(id) => format!("{path}&starting_after={}", encode(id)),
                None => path.clone(),
            };
            let body = self.request(Method::GET, &page_path, None, None).await?;
            let Some(page) = body.get("data").and_then(Value::as_array) else {
                return Err(SinkError::Malformed(format!(
                    "customer list answered without a data list: {}",
                    excerpt(&body.to_string())
                )));
            };
            found.extend(
                page.iter()
                    .filter(|c| carries_key(c, &change.key.text))
                    .cloned(),
            );
            if body.get("has_more").and_then(Value::as_bool) != Some(true) {
                return Ok(found);
            }
            let last = match page.last().and_then(|c| c.get("id")) {
                Some(id) => validate_external_id(id, self.max_external_id_length)?,
                None => {
                    return Err(SinkError::Malformed(
                        "customer list answered has_more with an empty page".into(),
                    ))
                }
            };
            if after.as_deref() == Some(last.as_str()) {
                return Err(SinkError::Malformed(format!(
                    "customer list answered the same page twice (after {last})"
                )));
            }
            after = Some(last);
        }
        Err(SinkError::Malformed(format!(
            "customer list did not end within {MAX_LOOKUP_PAGES} pages"
        )))
    }

    /// The row's email as the mapping sends it, if email is mapped.
    fn mapped_email(&self, change: &Change) -> Option<String> {
        let (_, column) = self.fields.iter().find(|(field, _)| field == "email")?;
        let data = change.data.as_ref().or(change.previous.as_ref())?;
        as_text(data.get(column)?).filter(|e| !e.is_empty())
    }

    fn pick(&self, change: &Change, found: Vec<Value>) -> Result<Option<String>, SinkError> {
        live_customer(change, &found, self.max_external_id_length)
    }

    /// The mapped fields plus the row key. On update a NULL column is sent
    /// as an empty string, which clears the field (a metadata key is
    /// removed); on create it is left out.
    fn fields_form(&self, change: &Change, data: &Map<String, Value>, update: bool) -> Form {
        let mut form = Form::default();
        for (field, column) in &self.fields {
            let Some(value) = data.get(column) else {
                continue;
            };
            match as_text(value) {
                Some(text) if update || !text.is_empty() => form.push(field.clone(), text),
                Some(_) => {}
                None if update => form.push(field.clone(), String::new()),
                None => {}
            }
        }
        form.push(format!("metadata[{KEY_METADATA}]"), change.key.text.clone());
        form
    }

    /// One HTTP request under the sink policy (rate limit, timeout, size
    /// cap): the parsed JSON body of a
    /// 2xx answer, or the classified failure.
    async fn request(
        &self,
        method: Method,
        path_and_query: &str,
        form: Option<&Form>,
        idempotency_key: Option<&str>,
    ) -> Result<Value, Failed> {
        let url = format!("{}{}", self.base, path_and_query);
        let mut request = self
            .http
            .client()
            .request(method.clone(), &url)
            .bearer_auth(self.key.expose())
            .header("Stripe-Version", STRIPE_VERSION);
        if let Some(key) = idempotency_key {
            request = request.header("Idempotency-Key", key);
        }
        if let Some(form) = form {
            request = request
                .header("content-type", "application/x-www-form-urlencoded")
                .body(form.encode());
        }
        let started = std::time::Instant::now();
        let answer = self
            .http
            .send(request, |t| self.redact(t))
            .await
            .map_err(Failed::from)?;
        let (status, headers, body) = (answer.status, answer.headers, answer.body);
        let text = body.text.as_str();
        tracing::debug!(
            method = %method,
            path = path_only(path_and_query),
            status,
            replayed = headers.get("idempotent-replayed").is_some(),
            duration_ms = started.elapsed().as_millis() as u64,
            "stripe request"
        );
        if (200..300).contains(&status) {
            return body.json().map_err(|e| {
                Failed::from(SinkError::Malformed(format!(
                    "Stripe answered {status} with a body that is {e}: {}",
                    excerpt(&self.redact(text))
                )))
            });
        }
        let header = |name: &str| headers.get(name).and_then(|v| v.to_str().ok());
        Err(classify(
            status,
            header("stripe-should-retry"),
            header("retry-after"),
            text,
            self.key.expose(),
        ))
    }

    fn redact(&self, text: &str) -> String {
        redact(text, self.key.expose())
    }

    /// `GET /v1/customers/{id}`: the customer as it is now (a deleted one
    /// is Stripe's `{"id", "deleted": true}` stub); `None` when Stripe has
    /// no such customer. The inbound apply asks when two events tie on
    /// `created` or arrive out of order.
    pub async fn customer(&self, id: &str) -> Result<Option<Value>, SinkError> {
        self.retrieve("customers", id).await
    }

    /// `GET /v1/{collection}/{id}` (`customers`, `subscriptions`,
    /// `checkout/sessions`): the object as it is now; `None` when Stripe
    /// has no such object.
    pub async fn retrieve(&self, collection: &str, id: &str) -> Result<Option<Value>, SinkError> {
        let path = format!("/v1/{collection}/{}", encode(id));
        match self.request(Method::GET, &path, None, None).await {
            Ok(body) => Ok(Some(body)),
            Err(f) if f.code.as_deref() == Some("resource_missing") => Ok(None),
            Err(f) => Err(f.error),
        }
    }
}

impl Sink for StripeSink {
    fn name(&self) -> &'static str {
        "stripe"
    }

    fn push<'a>(
        &'a self,
        change: &'a Change,
        external_id: Option<&'a str>,
    ) -> BoxFuture<'a, Result<Option<String>, SinkError>> {
        Box::pin(self.send_change(change, external_id))
    }

    fn check(&self) -> BoxFuture<'_, Result<(), SinkError>> {
        Box::pin(async {
            self.request(Method::GET, "/v1/customers?limit=1", None, None)
                .await
                .map(|_| ())
                .map_err(SinkError::from)
        })
    }
}

/// Of the customers found, the live one that carries the row's key (an
/// implementation of the API that ignores the query must not link the row
/// to somebody else's customer).
fn live_customer(
    change: &Change,
    found: &[Value],
    max_id_len: usize,
) -> Result<Option<String>, SinkError> {
    let live: Vec<String> = found
        .iter()
        .filter(|c| carries_key(c, &change.key.text))
        .filter(|c| c.get("deleted").and_then(Value::as_bool) != Some(true))
        .filter(|c| {
            c.pointer(&format!("/metadata/{DELETED_AT_METADATA}"))
                .is_none()
        })
        .filter_map(|c| c.get("id"))
        .map(|id| validate_external_id(id, max_id_len))
        .collect::<Result<_, _>>()?;
    if live.len() > 1 {
        tracing::warn!(
            user = %change.key,
            customers = live.len(),
            "several Stripe customers carry this user's key; using the first"
        );
    }
    Ok(live.into_iter().next())
}

/// Whether a customer's `metadata.usersync_key` is `key`.
fn carries_key(customer: &Value, key: &str) -> bool {
    customer
        .pointer(&format!("/metadata/{KEY_METADATA}"))
        .and_then(Value::as_str)
        == Some(key)
}

/// `email` → `email`, `metadata.plan` → `metadata[plan]`,
/// `shipping.address.city` → `shipping[address][city]`; anything that is
/// not a customer field Stripe takes as a string is refused at start.
fn form_field(path: &str) -> Result<String, String> {
    let parts: Vec<&str> = path.split('.').collect();
    let valid = match parts.as_slice() {
        [field] => SCALAR_FIELDS.contains(field),
        ["metadata", key] => {
            if key.len() > 40 || key.contains(['[', ']']) {
                return Err(format!(
                    "sink.mapping: Stripe metadata keys are at most 40 characters without '[' or ']'; {key:?} is not"
                ));
            }
            if *key == KEY_METADATA || *key == DELETED_AT_METADATA {
                return Err(format!(
                    "sink.mapping: metadata.{key} is set by usersync itself; map the column to another metadata key"
                ));
            }
            true
        }
        ["address", sub] => ADDRESS_FIELDS.contains(sub),
        ["shipping", "name" | "phone"] => true,
        ["shipping", "address", sub] => ADDRESS_FIELDS.contains(sub),
        _ => false,
    };
    if !valid {
        return Err(format!(
            "sink.mapping: {path:?} is not a Stripe customer field; use email, name, phone, description, \
             metadata.<key>, address.<line1|line2|city|state|postal_code|country>, shipping.name, \
             shipping.phone or shipping.address.<…>"
        ));
    }
    let mut name = parts[0].to_string();
    for part in &parts[1..] {
        name.push('[');
        name.push_str(part);
        name.push(']');
    }
    Ok(name)
}

/// `usersync-<event id>-<kind>[-<digest>]`: stable across retries and
/// restarts, distinct per request kind, at most 255 characters.
fn idempotency_key(change: &Change, kind: Kind, digest: Option<&str>) -> String {
    let mut key = format!("usersync-{}-{}", change.event_id, kind.name());
    if let Some(d) = digest {
        key.push('-');
        key.push_str(d);
    }
    key.truncate(255);
    key
}

/// A short digest of a request's path and form, for update keys.
fn digest(path: &str, form: &Form) -> String {
    let mut hasher = Sha256::new();
    hasher.update(path.as_bytes());
    hasher.update(b"\n");
    hasher.update(form.encode().as_bytes());
    hasher.finalize()[..6]
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

fn older_than_key_window(change: &Change) -> bool {
    let now_us = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_micros() as i64);
    now_us.saturating_sub(change.commit_time_us) > IDEMPOTENCY_WINDOW.as_micros() as i64
}

fn customer_id(body: &Value, what: &str, max_id_len: usize) -> Result<String, SinkError> {
    match body.get("id") {
        Some(id @ Value::String(s)) if !s.is_empty() => validate_external_id(id, max_id_len),
        _ => Err(SinkError::Malformed(format!(
            "{what} has no customer id: {}",
            excerpt(&body.to_string())
        ))),
    }
}

/// The message part of an `Api` error, for wrapping it.
fn api_message(e: &SinkError) -> String {
    match e {
        SinkError::Api { message, .. } => message.clone(),
        other => other.to_string(),
    }
}

/// Stripe's error answer as a [`SinkError::Api`]: the message is
/// `<type>/<code>: <message>`; retryable follows `Stripe-Should-Retry` when
/// Stripe sends it, else the status (408, 425, 429, 5xx).
fn classify(
    status: u16,
    should_retry: Option<&str>,
    retry_after: Option<&str>,
    body: &str,
    api_key: &str,
) -> Failed {
    let error = serde_json::from_str::<Value>(body)
        .ok()
        .and_then(|v| v.get("error").cloned())
        .filter(Value::is_object);
    let field = |name: &str| {
        error
            .as_ref()
            .and_then(|e| e.get(name))
            .and_then(Value::as_str)
            .filter(|s| !s.is_empty())
            .map(str::to_string)
    };
    let kind = field("type");
    let code = field("code");
    let message = match (&kind, &code, field("message")) {
        (Some(t), Some(c), Some(m)) => format!("{t}/{c}: {m}"),
        (Some(t), None, Some(m)) => format!("{t}: {m}"),
        (Some(t), Some(c), None) => format!("{t}/{c}"),
        (None, _, Some(m)) => m,
        _ if body.trim().is_empty() => "no error body".to_string(),
        _ => excerpt(body),
    };
    let retryable = match should_retry.map(|v| v.trim().to_ascii_lowercase()) {
        Some(v) if v == "true" => true,
        Some(v) if v == "false" => false,
        _ => matches!(status, 408 | 425 | 429) || (500..=599).contains(&status),
    };
    Failed {
        error: SinkError::Api {
            status,
            message: excerpt(&redact(&message, api_key)),
            retryable,
            retry_after: retry_after.and_then(parse_retry_after),
        },
        kind,
        code,
    }
}

/// Removes the API key, and the masked form Stripe echoes in a 401
/// (`sk_test_****abcd`), from text bound for logs and errors.
fn redact(text: &str, api_key: &str) -> String {
    // A key too short to be real would only mangle the text.
    let text = if api_key.len() < 8 {
        text.to_string()
    } else {
        text.replace(api_key, "<redacted>")
    };
    const PREFIXES: &[&str] = &["sk_live_", "sk_test_", "rk_live_", "rk_test_"];
    text.split(' ')
        .map(|word| {
            if PREFIXES.iter().any(|p| word.contains(p)) {
                "<redacted>"
            } else {
                word
            }
        })
        .collect::<Vec<_>>()
        .join(" ")
}

/// The path of a request without its query (which may carry a user key).
fn path_only(path_and_query: &str) -> &str {
    path_and_query.split('?').next().unwrap_or(path_and_query)
}

/// An `application/x-www-form-urlencoded` body, fields in order.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Form(Vec<(String, String)>);

impl Form {
    pub fn push(&mut self, name: impl Into<String>, value: impl Into<String>) {
        self.0.push((name.into(), value.into()));
    }

    /// `name=value&…`, each percent-encoded; brackets in names stay literal
    /// as Stripe's own libraries send them.
    pub fn encode(&self) -> String {
        self.0
            .iter()
            .map(|(k, v)| format!("{}={}", encode_name(k), encode(v)))
            .collect::<Vec<_>>()
            .join("&")
    }
}

fn encode_name(name: &str) -> String {
    name.split_inclusive(['[', ']'])
        .map(|part| match part.strip_suffix(['[', ']']) {
            Some(stem) => format!("{}{}", encode(stem), &part[stem.len()..]),
            None => encode(part),
        })
        .collect()
}

/// Percent-encodes per application/x-www-form-urlencoded (WHATWG URL
/// spec): `*-._` and alphanumerics stay, space becomes `+`, every other
/// byte of the UTF-8 text becomes `%XX`.
pub fn encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'*' | b'-' | b'.' | b'_' => {
                out.push(b as char)
            }
            b' ' => out.push('+'),
            _ => out.push_str(&format!("%{b:02X}")),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    fn change(op: Operation, event: &str) -> Change {
        let mut c = Change::for_test(op, Value::from(42));
        c.event_id = event.into();
        c
    }

    /// Past Stripe's idempotency window a replayed create can no longer
    /// count on its key: it looks the customer up first, or a change
    /// replayed a day later would create a second customer.
    #[test]
    fn a_create_older_than_the_idempotency_window_looks_up_first() {
        let now_us = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_micros() as i64);
        let window = IDEMPOTENCY_WINDOW.as_micros() as i64;
        let minute = 60_000_000;
        let mut c = change(Operation::Insert, "evt_1");
        c.commit_time_us = now_us - window - minute;
        assert!(older_than_key_window(&c));
        c.commit_time_us = now_us - window + minute;
        assert!(!older_than_key_window(&c));
    }

    /// Only a live customer that carries the row's key is linked, whatever
    /// the look-up answered: a Stripe-compatible server that ignores the
    /// search query (answers fixtures) must not link the row to somebody
    /// else's customer, and a deleted or marked one is not the user's.
    #[test]
    fn only_a_live_customer_carrying_the_rows_key_is_linked() {
        use serde_json::json;
        let c = change(Operation::Update, "evt_1");
        let others = vec![
            json!({"id": "cus_other", "metadata": {"usersync_key": "7"}}),
            json!({"id": "cus_nokey", "metadata": {}}),
            json!({"id": "cus_bare"}),
            json!({"id": "cus_gone", "deleted": true, "metadata": {"usersync_key": "42"}}),
            json!({"id": "cus_marked", "metadata": {"usersync_key": "42", "deleted_at": "2026-01-01T00:00:00Z"}}),
        ];
        assert_eq!(live_customer(&c, &others, 255).ok(), Some(None));
        let mut found = others;
        found.push(json!({"id": "cus_ours", "metadata": {"usersync_key": "42"}}));
        assert_eq!(
            live_customer(&c, &found, 255).ok(),
            Some(Some("cus_ours".to_string()))
        );
    }

    /// The fake Stripe (no rate limit) and a sink pointed at it.
    async fn fake() -> (crate::dev::fake::stripe::FakeStripe, StripeSink) {
        fake_with(false).await
    }

    async fn fake_with(without_search: bool) -> (crate::dev::fake::stripe::FakeStripe, StripeSink) {
        use crate::dev::fake::stripe::{FakeStripe, FakeStripeOptions};
        let api = FakeStripe::start(FakeStripeOptions {
            rate_limit_per_sec: 0,
            without_search,
            ..Default::default()
        })
        .await
        .expect("fake stripe");
        let cfg = sink_cfg(&api.url());
        (api, StripeSink::new(&cfg).expect("sink"))
    }

    fn sink_cfg(url: &str) -> SinkConfig {
        SinkConfig {
            kind: crate::config::SinkKind::Stripe,
            url: url.into(),
            secret: None,
            api_key: Some(Secret::new(
                crate::dev::fake::stripe::FakeStripeOptions::default().api_key,
            )),
            api_key_source: "environment variable STRIPE_KEY".into(),
            external_id_pointer: "/id".into(),
            columns: vec![],
            mapping: vec![("email".into(), "email".into())],
            timeout: Duration::from_secs(10),
            max_in_flight: 1,
            rate_limit_per_sec: 0,
            on_delete: OnDelete::Delete,
            max_response_bytes: 1 << 20,
            max_external_id_length: 255,
        }
    }

    /// The fake with one customer the sink created; its id.
    async fn fake_with_a_customer() -> (crate::dev::fake::stripe::FakeStripe, StripeSink, String) {
        let (api, sink) = fake().await;
        let id = sink
            .push(&with_email(Operation::Insert, "evt_1"), None)
            .await
            .expect("create")
            .expect("an id");
        (api, sink, id)
    }

    fn with_email(op: Operation, event: &str) -> Change {
        let mut c = change(op, event);
        c.data = serde_json::json!({"email": "ada@example.com"})
            .as_object()
            .cloned();
        c
    }

    /// Only Stripe's "no such customer" makes a delete a success; any other
    /// refusal is the change's failure (retried or dead-lettered), not a
    /// customer silently left in place.
    #[tokio::test]
    async fn a_refused_delete_fails_and_only_a_missing_customer_counts_as_deleted() {
        let (api, sink, id) = fake_with_a_customer().await;
        api.inject(crate::dev::fake::Fault::Status {
            status: 400,
            count: 1,
        });
        let gone = change(Operation::Delete, "evt_2");
        let e = sink.push(&gone, Some(&id)).await.expect_err("a 400");
        assert_eq!(e.status(), Some(400));
        assert_eq!(api.customers().len(), 1, "the customer is still there");
        assert_eq!(
            sink.push(&gone, Some(&id)).await.expect("delete"),
            Some(id.clone())
        );
        // Deleted already: Stripe answers 404 resource_missing.
        assert_eq!(sink.push(&gone, Some(&id)).await.expect("again"), Some(id));
    }

    /// Only a 404 without an error code means customer search is not
    /// served; any other failure of a search fails the look-up (so it is
    /// retried) and the next look-up searches again.
    #[tokio::test]
    async fn only_an_unserved_search_switches_the_look_up_to_listing() {
        let (api, sink) = fake().await;
        api.inject(crate::dev::fake::Fault::Status {
            status: 400,
            count: 1,
        });
        let c = with_email(Operation::Update, "evt_1");
        let e = sink.push(&c, None).await.expect_err("a 400");
        assert_eq!(e.status(), Some(400));
        assert!(api.customers().is_empty(), "nothing created");
        sink.push(&c, None).await.expect("update").expect("an id");
        let paths: Vec<String> = api.requests().iter().map(|r| r.path.clone()).collect();
        assert_eq!(
            paths,
            [
                "/v1/customers/search",
                "/v1/customers/search",
                "/v1/customers"
            ],
            "search, search again, create"
        );
    }

    /// Without customer search the look-up lists customers: by the row's
    /// mapped email first (one request when the customer still has it), then
    /// every customer page by page (it may carry an older email).
    #[tokio::test]
    async fn without_search_the_look_up_lists_by_email_first_then_every_page() {
        let (api, sink) = fake_with(true).await;
        let key = |k: &str| BTreeMap::from([(KEY_METADATA.to_string(), k.to_string())]);
        let moved = api.insert_customer(Some("old@example.com"), None, key("42"));
        let current = api.insert_customer(Some("bob@example.com"), None, key("43"));
        // Newer customers list first: the moved one is on the second page.
        for i in 0..120 {
            api.insert_customer(
                Some(&format!("u{i}@example.com")),
                None,
                key(&format!("x{i}")),
            );
        }
        let mut bob = Change::for_test(Operation::Update, Value::from(43));
        bob.data = serde_json::json!({"email": "bob@example.com"})
            .as_object()
            .cloned();
        assert_eq!(
            sink.push(&bob, None).await.expect("bob"),
            Some(current.clone())
        );
        let ada = with_email(Operation::Update, "evt_1");
        assert_eq!(
            sink.push(&ada, None).await.expect("ada"),
            Some(moved.clone())
        );
        let asked: Vec<(String, String)> = api
            .requests()
            .iter()
            .map(|r| {
                (
                    format!("{} {}", r.method, r.path),
                    r.query.clone().unwrap_or_default(),
                )
            })
            .collect();
        let shape: Vec<&str> = asked.iter().map(|(m, _)| m.as_str()).collect();
        let current_path = format!("POST /v1/customers/{current}");
        let moved_path = format!("POST /v1/customers/{moved}");
        assert_eq!(
            shape,
            [
                "GET /v1/customers/search",
                "GET /v1/customers",
                current_path.as_str(),
                "GET /v1/customers",
                "GET /v1/customers",
                "GET /v1/customers",
                moved_path.as_str(),
            ],
            "{asked:#?}"
        );
        assert!(asked[1].1.contains("email=bob%40example.com"), "{asked:#?}");
        assert!(asked[3].1.contains("email=ada%40example.com"), "{asked:#?}");
        assert!(!asked[4].1.contains("email="), "{asked:#?}");
        assert!(asked[5].1.contains("starting_after="), "{asked:#?}");
    }

    /// `retrieve` (the inbound apply's fetch): the object as it is, `None`
    /// for Stripe's "no such customer", and any other refusal an error.
    #[tokio::test]
    async fn retrieve_answers_the_object_none_when_missing_and_fails_otherwise() {
        let (api, sink, id) = fake_with_a_customer().await;
        let got = sink.customer(&id).await.expect("customer").expect("found");
        assert_eq!(
            (got["id"].as_str(), got["email"].as_str()),
            (Some(id.as_str()), Some("ada@example.com"))
        );
        assert_eq!(sink.customer("cus_nobody").await.expect("missing"), None);
        api.inject(crate::dev::fake::Fault::Status {
            status: 400,
            count: 1,
        });
        let e = sink.customer(&id).await.expect_err("a 400");
        assert_eq!(e.status(), Some(400));
    }

    /// A 2xx answer that is not JSON fails with an excerpt of what came
    /// back, with the API key taken out (some proxies echo the request).
    #[tokio::test]
    async fn a_malformed_answer_is_reported_with_the_key_redacted() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let key = crate::dev::fake::stripe::FakeStripeOptions::default().api_key;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let url = format!("http://{}", listener.local_addr().expect("addr"));
        let body = format!("<html>proxy echo: Authorization: Bearer {key}</html>");
        tokio::spawn(async move {
            while let Ok((mut conn, _)) = listener.accept().await {
                let mut buf = vec![0u8; 8192];
                let _ = conn.read(&mut buf).await;
                let answer = format!(
                    "HTTP/1.1 200 OK\r\ncontent-type: text/html\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                    body.len()
                );
                let _ = conn.write_all(answer.as_bytes()).await;
            }
        });
        let sink = StripeSink::new(&sink_cfg(&url)).expect("sink");
        let e = sink.customer("cus_1").await.expect_err("not JSON");
        let text = e.to_string();
        assert!(text.contains("proxy echo"), "{text}");
        assert!(!text.contains(&key), "{text}");
        assert!(text.contains("<redacted>"), "{text}");
    }

    #[test]
    fn form_encoding_is_application_x_www_form_urlencoded() {
        let mut f = Form::default();
        f.push("email", "zoë+x@example.com");
        f.push("metadata[plan & tier]", "a=b c/ü");
        f.push("name", "");
        assert_eq!(
            f.encode(),
            "email=zo%C3%AB%2Bx%40example.com&metadata[plan+%26+tier]=a%3Db+c%2F%C3%BC&name="
        );
        assert_eq!(encode("AZaz09*-._~"), "AZaz09*-._%7E");
    }

    #[test]
    fn mapping_paths_become_form_fields() {
        assert_eq!(form_field("email").unwrap(), "email");
        assert_eq!(form_field("metadata.plan").unwrap(), "metadata[plan]");
        assert_eq!(
            form_field("shipping.address.city").unwrap(),
            "shipping[address][city]"
        );
        assert_eq!(form_field("address.city").unwrap(), "address[city]");
        assert_eq!(form_field("shipping.name").unwrap(), "shipping[name]");
        assert_eq!(form_field("shipping.phone").unwrap(), "shipping[phone]");
        let longest = format!("metadata.{}", "k".repeat(40));
        assert!(form_field(&longest).is_ok());
        for bad in [
            "emails",
            "metadata",
            "metadata.a.b",
            "address.street",
            "metadata.usersync_key",
            "metadata.deleted_at",
            "metadata.x[y]",
        ] {
            assert!(form_field(bad).is_err(), "{bad}");
        }
        let long = format!("metadata.{}", "k".repeat(41));
        assert!(form_field(&long).is_err());
    }

    #[test]
    fn idempotency_keys_are_stable_and_distinct_per_kind() {
        let c = change(Operation::Update, "evt_00000000000000FF_3");
        assert_eq!(
            idempotency_key(&c, Kind::Create, None),
            "usersync-evt_00000000000000FF_3-create"
        );
        let mut form = Form::default();
        form.push("name", "A");
        let d1 = digest("/v1/customers/cus_1", &form);
        assert_eq!(d1, digest("/v1/customers/cus_1", &form));
        form.push("email", "");
        assert_ne!(d1, digest("/v1/customers/cus_1", &form));
        assert_eq!(
            idempotency_key(&c, Kind::Update, Some(&d1)),
            format!("usersync-evt_00000000000000FF_3-update-{d1}")
        );
        assert_eq!(d1.len(), 12);
    }

    const KEY: &str = "sk_test_0123456789abcdef";

    #[test]
    fn errors_follow_stripe_should_retry_then_status() {
        let body = r#"{"error":{"type":"invalid_request_error","code":"idempotency_key_in_use","message":"busy"}}"#;
        let f = classify(409, Some("true"), None, body, KEY);
        assert!(f.error.is_retryable());
        assert_eq!(
            f.error.to_string(),
            "HTTP 409: invalid_request_error/idempotency_key_in_use: busy"
        );
        assert_eq!(f.code.as_deref(), Some("idempotency_key_in_use"));
        assert!(!classify(409, None, None, body, KEY).error.is_retryable());
        assert!(!classify(500, Some("false"), None, "{}", KEY)
            .error
            .is_retryable());
        assert!(classify(503, None, None, "", KEY).error.is_retryable());
        let limited = classify(429, None, Some("3"), "", KEY).error;
        assert!(limited.is_retryable());
        assert_eq!(limited.retry_after(), Some(Duration::from_secs(3)));
        let plain = classify(
            400,
            None,
            None,
            r#"{"error":{"type":"idempotency_error","message":"m"}}"#,
            KEY,
        );
        assert_eq!(plain.kind.as_deref(), Some("idempotency_error"));
        assert_eq!(plain.error.to_string(), "HTTP 400: idempotency_error: m");
        assert!(!plain.error.is_retryable());
        let garbage = classify(502, None, None, "<html>bad gateway</html>", KEY);
        assert_eq!(
            garbage.error.to_string(),
            "HTTP 502: <html>bad gateway</html>"
        );
    }

    /// Stripe's error object always has a `type`; `code` and `message`
    /// may be missing, and a proxy in front of Stripe may answer with no
    /// body or a non-Stripe one. The message stored with a dead letter keeps
    /// whatever is there, in the same `<type>/<code>: <message>` form.
    #[test]
    fn error_messages_keep_every_part_stripe_sent() {
        let msg =
            |status: u16, body: &str| classify(status, None, None, body, KEY).error.to_string();
        assert_eq!(
            msg(
                404,
                r#"{"error":{"type":"invalid_request_error","code":"resource_missing"}}"#
            ),
            "HTTP 404: invalid_request_error/resource_missing"
        );
        assert_eq!(
            msg(400, r#"{"error":{"message":"No such customer: 'cus_x'"}}"#),
            "HTTP 400: No such customer: 'cus_x'"
        );
        assert_eq!(msg(503, ""), "HTTP 503: no error body");
        assert_eq!(msg(503, " \n"), "HTTP 503: no error body");
    }

    /// A key too short to be real is not searched for (it would mangle the
    /// text); from 8 characters on it is.
    #[test]
    fn only_a_key_of_eight_characters_or_more_is_replaced() {
        assert_eq!(redact("a 1234567 b", "1234567"), "a 1234567 b");
        assert_eq!(redact("a 12345678 b", "12345678"), "a <redacted> b");
    }

    /// An `Api` error wraps its message alone; other errors their text.
    #[test]
    fn api_message_is_the_message_without_the_status() {
        let api = SinkError::Api {
            status: 400,
            message: "idempotency_error: keys".into(),
            retryable: false,
            retry_after: None,
        };
        assert_eq!(api_message(&api), "idempotency_error: keys");
        let other = SinkError::Malformed("no id".into());
        assert_eq!(api_message(&other), other.to_string());
    }

    #[test]
    fn the_key_and_its_masked_echo_are_redacted() {
        let key = "sk_test_51AbCdEfGhIjKlMnOp";
        let body = format!(
            r#"{{"error":{{"type":"invalid_request_error","message":"Invalid API Key provided: sk_test_***************MnOp. Or {key}"}}}}"#
        );
        let msg = classify(401, None, None, &body, key).error.to_string();
        assert!(!msg.contains(key) && !msg.contains("MnOp"), "{msg}");
        assert!(
            msg.starts_with(
                "HTTP 401: invalid_request_error: Invalid API Key provided: <redacted>"
            ),
            "{msg}"
        );
    }

    /// NULL or an empty value: left out of a create, clears on update.
    #[test]
    fn null_and_empty_clear_on_update_and_are_left_out_on_create() {
        let mut cfg = sink_cfg("http://127.0.0.1:9/");
        cfg.mapping.extend([
            ("metadata.plan".into(), "plan".into()),
            ("name".into(), "name".into()),
            ("phone".into(), "phone".into()),
        ]);
        let sink = StripeSink::new(&cfg).expect("sink");
        assert_eq!(sink.base, "http://127.0.0.1:9");
        let c = change(Operation::Insert, "evt_1");
        let data = serde_json::json!({"email": "a@x", "plan": null, "name": 7, "phone": ""});
        let data = data.as_object().cloned().unwrap_or_default();
        assert_eq!(
            sink.fields_form(&c, &data, false).encode(),
            "email=a%40x&name=7&metadata[usersync_key]=42"
        );
        assert_eq!(
            sink.fields_form(&c, &data, true).encode(),
            "email=a%40x&metadata[plan]=&name=7&phone=&metadata[usersync_key]=42"
        );
    }
}
