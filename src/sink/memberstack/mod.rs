//! The Memberstack sink: keeps one Memberstack member per users row through
//! the admin REST API (`X-API-KEY`, `{"data": …}` envelopes, `mem_…` ids).
//!
//! Memberstack has no idempotency keys, so a create first looks the member
//! up by email (`GET /members/{email}`): a member found there that carries
//! this row's key in `metaData.usersync_key` (or no key at all: a member that
//! existed before usersync) is linked and brought up to date instead of being
//! created again. That makes a crash between the create and the write-back,
//! or a create whose answer was lost, safe: the retry finds the member. A
//! member found there that belongs to another row is never linked; the create
//! then goes ahead and Memberstack refuses the duplicate email with its own
//! message, which ends in the dead-letter table.
//!
//! Every request, lookups included, first waits on the sink's rate limiter
//! (`sink.rate_limit_per_sec`, 25 by default: Memberstack's documented limit).
//! The API key and the generated passwords never appear in errors or logs.

use std::time::Duration;

use futures::future::BoxFuture;
use rand::seq::SliceRandom;
use rand::Rng;
use reqwest::Method;
use serde_json::{Map, Value};

use super::http::Http;
use super::mapping::{self, as_text, insert_path, KEY_METADATA};
use super::{excerpt, refuse_unconvertible, validate_external_id, Sink, SinkError};
use crate::config::{OnDelete, Secret, SinkConfig};
use crate::core::change::{format_time_us, Change, Operation};

/// The member field a column can be mapped to, besides nested paths under
/// these objects.
const OBJECTS: [&str; 3] = ["customFields", "metaData", "json"];
/// Where a deletion is recorded with `sink.on_delete = "mark"`.
const DELETED_AT: &str = "deleted_at";
/// Length of a generated password: ~190 bits from the alphabet below.
const PASSWORD_LEN: usize = 32;
const LOWER: &[u8] = b"abcdefghijkmnopqrstuvwxyz";
const UPPER: &[u8] = b"ABCDEFGHJKLMNPQRSTUVWXYZ";
const DIGITS: &[u8] = b"23456789";
const SYMBOLS: &[u8] = b"!#%*+-=?@_~";

pub struct MemberstackSink {
    http: Http,
    /// API base URL without a trailing slash.
    base: String,
    key: Secret,
    /// The mapping without `password` (never sent on updates).
    mapping: Vec<(String, String)>,
    /// The column mapped to `password`, if any: used instead of a generated one.
    password_column: Option<String>,
    on_delete: OnDelete,
    max_external_id_length: usize,
}

/// A member as the API returns it (the parts the sink acts on).
#[derive(Debug, Clone)]
struct Member {
    id: String,
    email: Option<String>,
    /// `metaData.usersync_key`: the row this member was made for.
    key: Option<String>,
    raw: Value,
}

impl Member {
    /// The id must pass [`validate_external_id`] (`max_id_len` is
    /// `sink.max_external_id_length`).
    fn parse(data: &Value, max_id_len: usize) -> Result<Option<Member>, SinkError> {
        if data.is_null() {
            return Ok(None);
        }
        let id = match data.get("id") {
            Some(Value::String(s)) if !s.is_empty() => {
                validate_external_id(&data["id"], max_id_len)?
            }
            _ => {
                return Err(SinkError::Malformed(format!(
                    "a Memberstack member without an id: {}",
                    excerpt(&data.to_string())
                )))
            }
        };
        let email = data
            .pointer("/auth/email")
            .or_else(|| data.get("email"))
            .and_then(Value::as_str)
            .map(str::to_string);
        let key = data
            .get("metaData")
            .and_then(|m| m.get(KEY_METADATA))
            .and_then(as_text);
        Ok(Some(Member {
            id,
            email,
            key,
            raw: data.clone(),
        }))
    }

    /// Made for this row, or made outside usersync (adopted).
    fn linkable_to(&self, key: &str) -> bool {
        self.key.as_deref().is_none_or(|k| k == key)
    }

    fn object(&self, name: &str) -> Option<&Map<String, Value>> {
        self.raw.get(name).and_then(Value::as_object)
    }
}

/// One HTTP answer, before interpretation.
struct Reply {
    status: u16,
    retry_after: Option<Duration>,
    body: String,
    /// Whether `body` arrived as valid UTF-8 (else it was replaced, and is
    /// only good for an excerpt).
    valid_utf8: bool,
}

impl Reply {
    fn ok(&self) -> bool {
        (200..300).contains(&self.status)
    }
}

impl MemberstackSink {
    pub fn new(cfg: &SinkConfig) -> Result<Self, String> {
        let key = cfg
            .api_key
            .clone()
            .ok_or("the memberstack sink needs sink.api_key_env or sink.api_key_file")?;
        let mut mapping = Vec::new();
        let mut password_column = None;
        for (field, column) in &cfg.mapping {
            let mut parts = field.splitn(2, '.');
            let head = parts.next().unwrap_or_default();
            let rest = parts.next();
            match (head, rest) {
                ("email", None) => mapping.push((field.clone(), column.clone())),
                ("password", None) => password_column = Some(column.clone()),
                (obj, Some(name)) if OBJECTS.contains(&obj) && !name.is_empty() => {
                    if obj == "metaData" && (name == KEY_METADATA || name.starts_with("usersync_key.")) {
                        return Err(format!(
                            "sink.mapping: metaData.{KEY_METADATA} is reserved (usersync stores the row's key there)"
                        ));
                    }
                    mapping.push((field.clone(), column.clone()));
                }
                _ => {
                    return Err(format!(
                        "sink.mapping: {field:?} is not a Memberstack member field; use \"email\", \
                         \"password\", \"customFields.<name>\", \"metaData.<name>\" or \"json.<name>\""
                    ))
                }
            }
        }
        if !mapping.iter().any(|(f, _)| f == "email") {
            return Err(
                "sink.mapping: Memberstack needs an email: map it, e.g. email = \"email\"".into(),
            );
        }
        Ok(MemberstackSink {
            http: Http::new(cfg)?,
            base: cfg.url.trim_end_matches('/').to_string(),
            key,
            mapping,
            password_column,
            on_delete: cfg.on_delete,
            max_external_id_length: cfg.max_external_id_length,
        })
    }

    /// A client that only reads ([`MemberstackSink::member`]): the inbound
    /// apply's, with a Memberstack source's own key and URL
    /// (`inbound.sources.<name>.api_key_env`); `policy` gives the timeout,
    /// rate limit and response cap.
    pub fn reader(
        policy: &SinkConfig,
        base: &str,
        key: crate::config::Secret,
    ) -> Result<Self, String> {
        Ok(MemberstackSink {
            http: Http::new(policy)?,
            base: base.trim_end_matches('/').to_string(),
            key,
            mapping: Vec::new(),
            password_column: None,
            on_delete: policy.on_delete,
            max_external_id_length: policy.max_external_id_length,
        })
    }

    // ------------------------------------------------------------ operations

    async fn send(
        &self,
        change: &Change,
        external_id: Option<&str>,
    ) -> Result<Option<String>, SinkError> {
        refuse_unconvertible(change)?;
        let key = change.key.text.as_str();
        let known = external_id.filter(|id| {
            let ours = id.starts_with("mem_");
            if !ours {
                tracing::warn!(user = %key, external_id = %id, "the row's external id is not a Memberstack member id; looking the member up by email");
            }
            ours
        });
        match change.op {
            Operation::Insert => {
                let body = self.body(change.data.as_ref(), key);
                self.create_or_link(key, body, None, change.data.as_ref())
                    .await
                    .map(Some)
            }
            Operation::Update => {
                let body = self.body(change.data.as_ref(), key);
                if let Some(id) = known {
                    if self.update(id, &body).await? {
                        return Ok(Some(id.to_string()));
                    }
                    tracing::info!(user = %key, member = %id, "member not found in Memberstack; looking it up by email");
                }
                let previous = self.email_of(change.previous.as_ref());
                self.create_or_link(key, body, previous, change.data.as_ref())
                    .await
                    .map(Some)
            }
            Operation::Delete => self.delete(change, key, known).await,
        }
    }

    /// Finds the row's member by email (the current one, then `previous`),
    /// links it and brings it up to date, or creates it.
    async fn create_or_link(
        &self,
        key: &str,
        body: Map<String, Value>,
        previous_email: Option<String>,
        data: Option<&Map<String, Value>>,
    ) -> Result<String, SinkError> {
        let email = body
            .get("email")
            .and_then(Value::as_str)
            .map(str::to_string);
        let mut candidates: Vec<String> = email.iter().cloned().collect();
        if let Some(p) = previous_email {
            if !candidates.iter().any(|c| c.eq_ignore_ascii_case(&p)) {
                candidates.push(p);
            }
        }
        for candidate in &candidates {
            let Some(member) = self.lookup(candidate).await? else {
                continue;
            };
            if !member.linkable_to(key) {
                // Never take over another row's member. With the current
                // email the create below gets Memberstack's own refusal.
                tracing::info!(user = %key, member = %member.id, "a member with this email belongs to another row; not linking it");
                continue;
            }
            if self.link(&member, &body).await? {
                tracing::info!(user = %key, member = %member.id, "linked the existing Memberstack member");
                return Ok(member.id);
            }
        }
        self.create(key, body, data).await
    }

    /// Brings a found member up to date. `false` when it is gone meanwhile.
    async fn link(&self, member: &Member, body: &Map<String, Value>) -> Result<bool, SinkError> {
        let mut patch = merged_json(body, member.object("json"));
        if member
            .object("metaData")
            .and_then(|m| m.get(DELETED_AT))
            .is_some_and(|v| !v.is_null())
        {
            // Re-created after a "mark" delete: the member is live again.
            insert_path(&mut patch, &format!("metaData.{DELETED_AT}"), Value::Null);
        }
        if is_current(member, &patch) {
            return Ok(true);
        }
        self.patch(&member.id, &patch).await
    }

    async fn create(
        &self,
        key: &str,
        mut body: Map<String, Value>,
        data: Option<&Map<String, Value>>,
    ) -> Result<String, SinkError> {
        let mapped = self
            .password_column
            .as_ref()
            .and_then(|c| data.and_then(|d| d.get(c)))
            .and_then(as_text);
        let password = Secret::new(mapped.unwrap_or_else(generate_password));
        body.insert(
            "password".into(),
            Value::String(password.expose().to_string()),
        );
        let reply = self
            .request(Method::POST, "/members", Some(&Value::Object(body)))
            .await?;
        let data = self.data(reply, &[password.expose()])?;
        match Member::parse(&data, self.max_external_id_length)? {
            Some(m) => {
                tracing::info!(user = %key, member = %m.id, "created the Memberstack member");
                Ok(m.id)
            }
            None => Err(SinkError::Malformed(
                "Memberstack answered the create with no member".into(),
            )),
        }
    }

    /// PATCHes a known member. `false` when it does not exist.
    async fn update(&self, id: &str, body: &Map<String, Value>) -> Result<bool, SinkError> {
        if body.contains_key("json") {
            // `json` is replaced as a whole on PATCH: keep what others stored.
            return match self.get(id).await? {
                Some(member) => self.link(&member, body).await,
                None => Ok(false),
            };
        }
        self.patch(id, body).await
    }

    async fn patch(&self, id: &str, body: &Map<String, Value>) -> Result<bool, SinkError> {
        let path = format!("/members/{}", encode_segment(id));
        let reply = self
            .request(Method::PATCH, &path, Some(&Value::Object(body.clone())))
            .await?;
        if reply.status == 404 {
            return Ok(false);
        }
        self.data(reply, &[])?;
        Ok(true)
    }

    async fn delete(
        &self,
        change: &Change,
        key: &str,
        known: Option<&str>,
    ) -> Result<Option<String>, SinkError> {
        if self.on_delete == OnDelete::Ignore {
            return Ok(known.map(str::to_string));
        }
        let id = match known {
            Some(id) => Some(id.to_string()),
            // Deleted before its external id was written back: find the
            // member by the old row's email, but only if it is this row's.
            None => match self.email_of(change.previous.as_ref()) {
                Some(email) => self
                    .lookup(&email)
                    .await?
                    .filter(|m| m.key.as_deref() == Some(key))
                    .map(|m| m.id),
                None => None,
            },
        };
        let Some(id) = id else {
            tracing::debug!(user = %key, "deleted row has no Memberstack member; nothing to do");
            return Ok(None);
        };
        match self.on_delete {
            OnDelete::Mark => {
                let mut body = Map::new();
                insert_path(
                    &mut body,
                    &format!("metaData.{DELETED_AT}"),
                    Value::String(format_time_us(change.commit_time_us)),
                );
                insert_path(
                    &mut body,
                    &format!("metaData.{KEY_METADATA}"),
                    Value::String(key.to_string()),
                );
                if !self.patch(&id, &body).await? {
                    tracing::info!(user = %key, member = %id, "member already gone; nothing to mark");
                }
            }
            _ => {
                let path = format!("/members/{}", encode_segment(&id));
                let reply = self.request(Method::DELETE, &path, None).await?;
                if reply.status == 404 {
                    tracing::info!(user = %key, member = %id, "member already gone");
                } else {
                    self.data(reply, &[])?;
                }
            }
        }
        Ok(Some(id))
    }

    // ------------------------------------------------------------ the API

    /// `GET /members/{email}`: `None` when no member has it.
    async fn lookup(&self, email: &str) -> Result<Option<Member>, SinkError> {
        self.get(email).await
    }

    /// `GET /members/{id}`: the member as the API shows it now (the
    /// inbound apply asks on a tie, an out-of-order event and a deferred
    /// event's second look); `None` when there is no such member.
    pub async fn member(&self, id: &str) -> Result<Option<Value>, SinkError> {
        Ok(self.get(id).await?.map(|m| m.raw))
    }

    /// `GET /members/{id or email}`; absence is `{"data": null}` (or a 404).
    async fn get(&self, id_or_email: &str) -> Result<Option<Member>, SinkError> {
        let path = format!("/members/{}", encode_segment(id_or_email));
        let reply = self.request(Method::GET, &path, None).await?;
        if reply.status == 404 {
            return Ok(None);
        }
        Member::parse(&self.data(reply, &[])?, self.max_external_id_length)
    }

    /// One request under the sink policy (rate limit, timeout, size cap).
    async fn request(
        &self,
        method: Method,
        path: &str,
        body: Option<&Value>,
    ) -> Result<Reply, SinkError> {
        let mut req = self
            .http
            .client()
            .request(method, format!("{}{path}", self.base))
            .header("x-api-key", self.key.expose())
            .header("accept", "application/json");
        if let Some(body) = body {
            let bytes = serde_json::to_vec(body)
                .map_err(|e| SinkError::Malformed(format!("cannot encode the request: {e}")))?;
            req = req.header("content-type", "application/json").body(bytes);
        }
        let answer = self.http.send(req, |t| self.redact(t, &[])).await?;
        let (status, retry_after, body) = (answer.status, answer.retry_after(), answer.body);
        Ok(Reply {
            status,
            retry_after,
            body: body.text,
            valid_utf8: body.valid_utf8,
        })
    }

    /// The `data` of a 2xx answer, or the API's error.
    fn data(&self, reply: Reply, secrets: &[&str]) -> Result<Value, SinkError> {
        if !reply.ok() {
            return Err(self.api_error(&reply, secrets));
        }
        if reply.body.trim().is_empty() {
            return Ok(Value::Null);
        }
        if !reply.valid_utf8 {
            return Err(SinkError::Malformed(format!(
                "Memberstack answered HTTP {} with a body that is not valid UTF-8",
                reply.status
            )));
        }
        let v: Value = serde_json::from_str(&reply.body).map_err(|_| {
            SinkError::Malformed(format!(
                "Memberstack answered HTTP {} with a body that is not JSON: {}",
                reply.status,
                self.redact(&excerpt(&reply.body), secrets)
            ))
        })?;
        match v {
            Value::Object(mut o) if o.contains_key("data") => {
                Ok(o.remove("data").unwrap_or(Value::Null))
            }
            other => Ok(other),
        }
    }

    fn api_error(&self, reply: &Reply, secrets: &[&str]) -> SinkError {
        let message = error_message(&reply.body).unwrap_or_else(|| match excerpt(&reply.body) {
            e if e.is_empty() => reqwest::StatusCode::from_u16(reply.status)
                .ok()
                .and_then(|s| s.canonical_reason())
                .unwrap_or("no message")
                .to_string(),
            e => e,
        });
        let status = reply.status;
        SinkError::Api {
            status,
            message: self.redact(&message, secrets),
            retryable: matches!(status, 408 | 425 | 429) || (500..=599).contains(&status),
            retry_after: reply.retry_after,
        }
    }

    fn redact(&self, text: &str, secrets: &[&str]) -> String {
        let mut out = text.to_string();
        for s in secrets.iter().copied().chain([self.key.expose()]) {
            if s.len() >= 4 {
                out = out.replace(s, "<redacted>");
            }
        }
        out
    }

    // ------------------------------------------------------------ bodies

    /// The mapped fields present in `data`, plus the row's key in
    /// `metaData.usersync_key`. Custom field values are sent as text.
    fn body(&self, data: Option<&Map<String, Value>>, key: &str) -> Map<String, Value> {
        let mut body = data
            .map(|d| mapping::apply(&self.mapping, d))
            .unwrap_or_default();
        if let Some(email) = body.get_mut("email") {
            if !email.is_null() && !email.is_string() {
                *email = Value::String(as_text(email).unwrap_or_default());
            }
        }
        if let Some(Value::Object(fields)) = body.get_mut("customFields") {
            for v in fields.values_mut() {
                if !v.is_null() && !v.is_string() {
                    *v = Value::String(as_text(v).unwrap_or_default());
                }
            }
        }
        insert_path(
            &mut body,
            &format!("metaData.{KEY_METADATA}"),
            Value::String(key.to_string()),
        );
        body
    }

    /// The email the mapping reads from a row (for lookups by the old email).
    fn email_of(&self, row: Option<&Map<String, Value>>) -> Option<String> {
        let column = &self.mapping.iter().find(|(f, _)| f == "email")?.1;
        row?.get(column).and_then(as_text).filter(|e| !e.is_empty())
    }
}

impl Sink for MemberstackSink {
    fn name(&self) -> &'static str {
        "memberstack"
    }

    fn push<'a>(
        &'a self,
        change: &'a Change,
        external_id: Option<&'a str>,
    ) -> BoxFuture<'a, Result<Option<String>, SinkError>> {
        Box::pin(self.send(change, external_id))
    }

    fn check(&self) -> BoxFuture<'_, Result<(), SinkError>> {
        Box::pin(async move {
            let reply = self.request(Method::GET, "/members?limit=1", None).await?;
            self.data(reply, &[]).map(|_| ())
        })
    }
}

/// `body` with its `json` object laid over the member's current one, since
/// Memberstack replaces `json` as a whole.
fn merged_json(
    body: &Map<String, Value>,
    current: Option<&Map<String, Value>>,
) -> Map<String, Value> {
    let mut out = body.clone();
    if let (Some(Value::Object(ours)), Some(current)) = (out.get_mut("json"), current) {
        let mut merged = current.clone();
        for (k, v) in ours.iter() {
            merged.insert(k.clone(), v.clone());
        }
        *ours = merged;
    }
    out
}

/// Whether the member already has every value of `patch`.
fn is_current(member: &Member, patch: &Map<String, Value>) -> bool {
    patch
        .iter()
        .all(|(field, value)| match (field.as_str(), value) {
            ("email", Value::String(e)) => member
                .email
                .as_deref()
                .is_some_and(|m| m.eq_ignore_ascii_case(e)),
            (obj, Value::Object(fields)) if OBJECTS.contains(&obj) => {
                let current = member.object(obj);
                fields.iter().all(|(k, v)| {
                    let have = current.and_then(|c| c.get(k)).unwrap_or(&Value::Null);
                    have == v
                })
            }
            _ => false,
        })
}

/// The message of a Memberstack error body. The documented shape is
/// `{"error": "…"}`; `{"code": …, "message": …}` and `{"error": {…}}` are
/// read too.
fn error_message(body: &str) -> Option<String> {
    let v: Value = serde_json::from_str(body).ok()?;
    let obj = match v.get("error") {
        Some(Value::Object(inner)) => inner.clone(),
        _ => v.as_object()?.clone(),
    };
    let text = |k: &str| {
        obj.get(k)
            .and_then(Value::as_str)
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(str::to_string)
    };
    let message = text("message").or_else(|| text("error"));
    let code = text("code");
    let text = match (code, message) {
        (Some(c), Some(m)) if !m.contains(&c) => format!("{m} ({c})"),
        (_, Some(m)) => m,
        (Some(c), None) => c,
        (None, None) => return None,
    };
    Some(excerpt(&text))
}

/// Percent-encodes one path segment like `encodeURIComponent` (and more:
/// only unreserved characters stay).
fn encode_segment(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// A strong random password from the thread-local CSPRNG, with every
/// character class so that password policies accept it.
fn generate_password() -> String {
    let mut rng = rand::rng();
    let all: Vec<u8> = [LOWER, UPPER, DIGITS, SYMBOLS].concat();
    let mut chars: Vec<u8> = [LOWER, UPPER, DIGITS, SYMBOLS]
        .iter()
        .map(|class| class[rng.random_range(0..class.len())])
        .collect();
    while chars.len() < PASSWORD_LEN {
        chars.push(all[rng.random_range(0..all.len())]);
    }
    chars.shuffle(&mut rng);
    String::from_utf8(chars).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::SinkKind;
    use crate::dev::fake::memberstack::{FakeMemberstack, FakeMemberstackOptions};
    use serde_json::json;

    const KEY: &str = "sk_sb_unit_5Xq8Lm2Pz7Rt";

    fn cfg(url: &str, on_delete: OnDelete) -> SinkConfig {
        SinkConfig {
            kind: SinkKind::Memberstack,
            url: url.into(),
            secret: None,
            api_key: Some(Secret::new(KEY)),
            api_key_source: "environment variable MS_KEY".into(),
            external_id_pointer: "/id".into(),
            columns: vec![],
            mapping: vec![
                ("email".into(), "email".into()),
                ("customFields.first-name".into(), "name".into()),
            ],
            timeout: Duration::from_secs(10),
            max_in_flight: 1,
            rate_limit_per_sec: 0,
            on_delete,
            max_response_bytes: 1 << 20,
            max_external_id_length: 255,
        }
    }

    /// The fake admin API (no rate limit) and a sink pointed at it.
    async fn fake(on_delete: OnDelete) -> (FakeMemberstack, MemberstackSink) {
        let api = FakeMemberstack::start(FakeMemberstackOptions {
            api_key: KEY.into(),
            rate_limit_per_sec: 0,
            ..Default::default()
        })
        .await
        .expect("fake memberstack");
        let sink = MemberstackSink::new(&cfg(&api.url(), on_delete)).expect("sink");
        (api, sink)
    }

    /// A change of user `key`: `data` after it, `previous` before it.
    fn change(op: Operation, key: &str, data: Option<Value>, previous: Option<Value>) -> Change {
        let obj = |v: Value| v.as_object().cloned().expect("an object");
        let mut c = Change::for_test(op, Value::from(key));
        c.commit_time_us = 1_764_000_000_000_000;
        c.data = data.map(obj);
        c.previous = previous.map(obj);
        c
    }

    fn meta(v: Value) -> Map<String, Value> {
        v.as_object().cloned().expect("an object")
    }

    #[test]
    fn segments_are_encoded_like_encode_uri_component() {
        assert_eq!(encode_segment("a.b+c@x.com"), "a.b%2Bc%40x.com");
        assert_eq!(encode_segment("mem_abc123"), "mem_abc123");
        assert_eq!(encode_segment("ü/?#"), "%C3%BC%2F%3F%23");
    }

    #[test]
    fn passwords_are_long_varied_and_fresh() {
        let a = generate_password();
        let b = generate_password();
        assert_eq!(a.len(), PASSWORD_LEN);
        assert_ne!(a, b);
        for class in [LOWER, UPPER, DIGITS, SYMBOLS] {
            assert!(a.bytes().any(|c| class.contains(&c)), "{class:?}");
        }
    }

    #[test]
    fn error_bodies_of_several_shapes() {
        assert_eq!(
            error_message(r#"{"error":"Member not found"}"#).as_deref(),
            Some("Member not found")
        );
        assert_eq!(
            error_message(r#"{"code":"email-already-in-use","message":"Email taken"}"#).as_deref(),
            Some("Email taken (email-already-in-use)")
        );
        assert_eq!(
            error_message(r#"{"error":{"code":"x","message":"y"}}"#).as_deref(),
            Some("y (x)")
        );
        assert_eq!(error_message("<html>"), None);
    }

    #[test]
    fn current_members_need_no_patch() {
        let m = Member::parse(
            &json!({
            "id": "mem_1",
            "auth": {"email": "A@x.com"},
            "customFields": {"first-name": "Ada"},
            "metaData": {"usersync_key": "1", "plan": "pro", "other": 1}
            }),
            255,
        )
        .unwrap()
        .unwrap();
        assert!(m.linkable_to("1") && !m.linkable_to("2"));
        let patch = json!({"email": "a@x.com", "customFields": {"first-name": "Ada"}, "metaData": {"usersync_key": "1", "plan": "pro"}});
        assert!(is_current(&m, patch.as_object().unwrap()));
        let patch = json!({"email": "a@x.com", "metaData": {"plan": "free"}});
        assert!(!is_current(&m, patch.as_object().unwrap()));
    }

    #[test]
    fn json_is_merged_over_the_current_value() {
        let body = json!({"json": {"a": 1}}).as_object().unwrap().clone();
        let current = json!({"a": 0, "b": 2}).as_object().unwrap().clone();
        assert_eq!(
            Value::Object(merged_json(&body, Some(&current))),
            json!({"json": {"a": 1, "b": 2}})
        );
    }

    /// An error answer without a JSON body (a gateway's HTML page, or no
    /// body at all) still says what happened: the page's excerpt, or the
    /// status's reason phrase. 429 and 5xx are retried with their
    /// `Retry-After`; other 4xx are permanent.
    #[test]
    fn error_answers_are_classified_and_never_lose_their_message() {
        let sink = MemberstackSink::new(&cfg("http://127.0.0.1:9", OnDelete::Mark)).expect("sink");
        let reply = |status: u16, body: &str, retry_after: Option<u64>| Reply {
            status,
            retry_after: retry_after.map(Duration::from_secs),
            body: body.into(),
            valid_utf8: true,
        };
        let gateway = sink.api_error(&reply(502, "<html>502 Bad Gateway</html>", None), &[]);
        assert_eq!(
            gateway.to_string(),
            "HTTP 502: <html>502 Bad Gateway</html>"
        );
        assert!(gateway.is_retryable());
        let empty = sink.api_error(&reply(503, "", Some(2)), &[]);
        assert_eq!(empty.to_string(), "HTTP 503: Service Unavailable");
        assert!(empty.is_retryable());
        assert_eq!(empty.retry_after(), Some(Duration::from_secs(2)));
        let limited = sink.api_error(
            &reply(
                429,
                r#"{"code":"too-many-requests","message":"Too many requests"}"#,
                Some(1),
            ),
            &[],
        );
        assert!(limited.is_retryable());
        assert_eq!(limited.retry_after(), Some(Duration::from_secs(1)));
        let refused = sink.api_error(
            &reply(
                400,
                r#"{"code":"email-already-in-use","message":"Email already in use"}"#,
                None,
            ),
            &[],
        );
        assert!(!refused.is_retryable());
        assert_eq!(refused.status(), Some(400));
        let unauthorized = sink.api_error(&reply(401, &format!("invalid key {KEY}"), None), &[]);
        assert!(!unauthorized.is_retryable());
        assert!(!unauthorized.to_string().contains(KEY), "{unauthorized}");
    }

    /// A row inserted again after a `mark` delete links its marked member
    /// (same key, same email) and makes it live again: `deleted_at` is
    /// cleared, no second member is created.
    #[tokio::test]
    async fn a_member_marked_deleted_is_live_again_when_its_row_returns() {
        let (api, sink) = fake(OnDelete::Mark).await;
        let marked = api.insert_member(
            "back@example.com",
            Map::new(),
            meta(json!({"usersync_key": "42", "deleted_at": "2026-11-28T10:00:00.000000Z"})),
        );
        let c = change(
            Operation::Insert,
            "42",
            Some(json!({"email": "back@example.com"})),
            None,
        );
        assert_eq!(
            sink.push(&c, None).await.expect("push"),
            Some(marked.id.clone())
        );
        let patch = api
            .requests()
            .into_iter()
            .find(|r| r.method == "PATCH")
            .expect("a PATCH of the marked member");
        assert_eq!(patch.path, format!("/members/{}", marked.id));
        assert_eq!(patch.body["metaData"]["deleted_at"], Value::Null);
        let members = api.members();
        assert_eq!(members.len(), 1, "{members:#?}");
        assert!(members[0]
            .meta_data
            .get("deleted_at")
            .is_none_or(Value::is_null));
    }

    /// A create replayed for a member that already has every value (a
    /// crash after the create, before the write-back) links it without a
    /// PATCH: a needless write costs a request of the 25/s budget and makes
    /// Memberstack send a `member.updated` webhook for nothing.
    #[tokio::test]
    async fn relinking_a_member_that_is_already_current_sends_no_patch() {
        let (api, sink) = fake(OnDelete::Mark).await;
        let data = json!({"email": "same@example.com", "name": "Ada"});
        let created = change(Operation::Insert, "7", Some(data.clone()), None);
        let id = sink
            .push(&created, None)
            .await
            .expect("create")
            .expect("id");
        let n = api.requests().len();
        // The same insert replayed (a crash before its write-back).
        let again = change(Operation::Insert, "7", Some(data), None);
        assert_eq!(sink.push(&again, None).await.expect("push"), Some(id));
        let after: Vec<String> = api
            .requests()
            .iter()
            .skip(n)
            .map(|r| format!("{} {}", r.method, r.path))
            .collect();
        assert_eq!(after, ["GET /members/same%40example.com"]);
        assert_eq!(api.members()[0].updates, 0);
    }

    /// A row deleted before its member's id was written back is found by
    /// its old email, but only a member carrying this row's key is deleted:
    /// one that belongs to another row, or was made outside usersync, is
    /// left alone.
    #[tokio::test]
    async fn a_delete_without_a_known_id_removes_only_this_rows_member() {
        let (api, sink) = fake(OnDelete::Delete).await;
        let mine = api.insert_member(
            "mine@example.com",
            Map::new(),
            meta(json!({"usersync_key": "7"})),
        );
        let other = api.insert_member(
            "other@example.com",
            Map::new(),
            meta(json!({"usersync_key": "8"})),
        );
        let foreign = api.insert_member("foreign@example.com", Map::new(), Map::new());
        for (email, expected) in [
            ("other@example.com", None),
            ("foreign@example.com", None),
            ("mine@example.com", Some(mine.id.clone())),
        ] {
            let gone = change(Operation::Delete, "7", None, Some(json!({"email": email})));
            assert_eq!(
                sink.push(&gone, None).await.expect("delete"),
                expected,
                "{email}"
            );
        }
        let deleted: Vec<String> = api
            .members()
            .into_iter()
            .filter(|m| m.deleted)
            .map(|m| m.id)
            .collect();
        assert_eq!(deleted, std::slice::from_ref(&mine.id));
        assert!(!deleted.contains(&other.id) && !deleted.contains(&foreign.id));
    }

    /// Memberstack answers 404 for a member that is already gone (deleted
    /// in the dashboard, or by this very delete before its write-back was
    /// lost): the delete is done, not a failure to retry or dead-letter.
    #[tokio::test]
    async fn deleting_a_member_already_gone_is_done() {
        let (api, sink) = fake(OnDelete::Delete).await;
        let m = api.insert_member(
            "gone@example.com",
            Map::new(),
            meta(json!({"usersync_key": "7"})),
        );
        let gone = change(Operation::Delete, "7", None, None);
        for _ in 0..2 {
            assert_eq!(
                sink.push(&gone, Some(&m.id)).await.expect("delete"),
                Some(m.id.clone())
            );
        }
        let statuses: Vec<u16> = api.requests().iter().map(|r| r.status).collect();
        assert_eq!(statuses, [200, 404]);
        assert!(api.members()[0].deleted);
    }

    /// The inbound apply's read: the member as the API shows it, `None`
    /// for an id Memberstack does not know.
    #[tokio::test]
    async fn member_reads_the_member_or_none() {
        let (api, sink) = fake(OnDelete::Mark).await;
        let m = api.insert_member(
            "read@example.com",
            meta(json!({"first-name": "Ro"})),
            Map::new(),
        );
        let got = sink.member(&m.id).await.expect("read").expect("a member");
        assert_eq!(got["id"], m.id.as_str());
        assert_eq!(got["auth"]["email"], "read@example.com");
        assert_eq!(got["customFields"]["first-name"], "Ro");
        assert_eq!(
            sink.member("mem_unknown0000000000000000")
                .await
                .expect("read"),
            None
        );
        assert_eq!(sink.name(), "memberstack");
    }

    /// Memberstack's email and custom fields are strings: a number from
    /// the row is sent as its text, a NULL stays null (it clears a custom
    /// field) rather than becoming "".
    #[test]
    fn values_are_sent_as_text_and_null_stays_null() {
        let sink = MemberstackSink::new(&cfg("http://127.0.0.1:9", OnDelete::Mark)).expect("sink");
        let data = meta(json!({"email": 12345, "name": 7}));
        assert_eq!(
            Value::Object(sink.body(Some(&data), "1")),
            json!({"email": "12345", "customFields": {"first-name": "7"}, "metaData": {"usersync_key": "1"}})
        );
        let data = meta(json!({"email": null, "name": null}));
        assert_eq!(
            Value::Object(sink.body(Some(&data), "1")),
            json!({"email": null, "customFields": {"first-name": null}, "metaData": {"usersync_key": "1"}})
        );
        let data = meta(json!({"email": "a@x.com", "name": "Ada"}));
        assert_eq!(
            Value::Object(sink.body(Some(&data), "1")),
            json!({"email": "a@x.com", "customFields": {"first-name": "Ada"}, "metaData": {"usersync_key": "1"}})
        );
    }

    #[test]
    fn a_code_already_in_the_message_is_not_repeated() {
        assert_eq!(
            error_message(
                r#"{"code":"invalid-email","message":"invalid-email: check the address"}"#
            )
            .as_deref(),
            Some("invalid-email: check the address")
        );
    }

    /// Memberstack's rate limit answers 429 with `Retry-After`: the push
    /// fails retryably and carries the wait the API asked for, and nothing
    /// was created.
    #[tokio::test]
    async fn a_429_carries_the_wait_memberstack_asks_for() {
        let (api, sink) = fake(OnDelete::Mark).await;
        api.inject(crate::dev::fake::Fault::RateLimit {
            retry_after_secs: 7,
            count: 1,
        });
        let c = change(
            Operation::Insert,
            "7",
            Some(json!({"email": "rl@example.com"})),
            None,
        );
        let e = sink.push(&c, None).await.expect_err("429");
        assert_eq!(e.status(), Some(429));
        assert!(e.is_retryable());
        assert_eq!(e.retry_after(), Some(Duration::from_secs(7)));
        assert!(api.members().is_empty());
    }
}
