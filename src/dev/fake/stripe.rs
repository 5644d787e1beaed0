//! A fake of Stripe's customers API: a real HTTP server on loopback that
//! answers the way api.stripe.com does for what usersync uses, so the Stripe
//! sink is tested against behaviour rather than against itself.
//!
//! - Bearer (or Basic) authentication with one API key; a missing or wrong
//!   key gets Stripe's 401 `invalid_request_error` body, the wrong key
//!   echoed masked (`sk_test_****abcd`) as Stripe does;
//! - a token-bucket rate limit (capacity one second's worth); beyond it a
//!   429 with Stripe's `rate_limit` body and `Retry-After`;
//! - form-encoded bodies and queries, `metadata[k]` included; unknown
//!   parameters are refused (`parameter_unknown`);
//! - `POST /v1/customers` (create, ids `cus_` + 14 alphanumerics),
//!   `POST /v1/customers/{id}` (update: metadata merges, an empty value
//!   removes a key or clears a field), `GET /v1/customers/{id}` (a deleted
//!   customer answers `{"id","object":"customer","deleted":true}`),
//!   `GET /v1/customers` (newest first; `limit` 1..100, `starting_after`,
//!   `ending_before`, `has_more`), `GET /v1/customers/search?query=`
//!   (`metadata['k']:'v'`, `email:'…'`, … joined by AND or OR; a 404 with
//!   `without_search`),
//!   `DELETE /v1/customers/{id}`; an unknown id is a 404 `resource_missing`;
//!   an email without '@' is a 400 `email_invalid` (`param: email`);
//! - subscriptions: `POST /v1/subscriptions` (`customer`, `items[0][price]`,
//!   `metadata[k]`; active at once, as with a default payment method),
//!   `POST /v1/subscriptions/{id}` (`items[0][price]`,
//!   `cancel_at_period_end`, `metadata[k]`), `DELETE /v1/subscriptions/{id}`
//!   (cancels now: `status: canceled`), `GET /v1/subscriptions/{id}`; and
//!   `GET /v1/checkout/sessions/{id}`. A Checkout payment happens in a
//!   browser, so [`FakeStripe::complete_checkout`] stands in for it: a
//!   completed session, its subscription, and their events;
//! - events once given a webhook target: `customer.created/updated/deleted`,
//!   `customer.subscription.created/updated/deleted` (with
//!   `previous_attributes`) and `checkout.session.completed`, stamped with
//!   the second they happen (or the one [`FakeStripe::pin_event_time`]
//!   fixes, to make ties at will);
//! - idempotency on POST: the same `Idempotency-Key` with the same method,
//!   path and parameters gets the first answer again with
//!   `Idempotent-Replayed: true`; with other parameters a 400
//!   `idempotency_error`. As at Stripe, answers are saved once the endpoint
//!   ran (not for 400 validation errors, 401 or 429);
//! - injected faults ([`Fault`]): 5xx and 409 answers carry
//!   `Stripe-Should-Retry: true`.
//!
//! Admin endpoints (`/_fake/customers`, `/_fake/requests`, `POST
//! /_fake/clear`) let another process inspect it.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use axum::body::to_bytes;
use axum::extract::{Request, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use base64::Engine;
use rand::distr::Alphanumeric;
use rand::Rng;
use serde_json::{json, Map, Value};
use tokio::sync::watch;

use super::webhooks::{random_alnum, Webhooks};
use super::{Fault, Server};

const TIMEOUT_HOLD: Duration = Duration::from_secs(60);
const MAX_BODY_BYTES: usize = 1024 * 1024;
const ID_RANDOM_CHARS: usize = 14;
const ADDRESS_FIELDS: &[&str] = &["line1", "line2", "city", "state", "postal_code", "country"];

#[derive(Debug, Clone)]
pub struct FakeStripeOptions {
    /// 0 lets the OS pick a free port.
    pub port: u16,
    /// The one secret key the fake accepts.
    pub api_key: String,
    /// Added to every API request (not to admin requests).
    pub latency: Duration,
    /// Requests per second before 429s; 0 means no limit. Stripe's test
    /// mode allows 25.
    pub rate_limit_per_sec: u32,
    /// Answer `GET /v1/customers/search` as a URL Stripe does not serve
    /// (404), as for an account without Search (Stripe's accounts in India)
    /// or an implementation of the API without it.
    pub without_search: bool,
}

impl Default for FakeStripeOptions {
    fn default() -> Self {
        FakeStripeOptions {
            port: 0,
            api_key: "sk_test_usersyncFakeKey0000000000".into(),
            latency: Duration::ZERO,
            rate_limit_per_sec: 25,
            without_search: false,
        }
    }
}

/// A customer as the fake stores it.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct FakeCustomer {
    /// `cus_` + 14 alphanumerics.
    pub id: String,
    pub email: Option<String>,
    pub name: Option<String>,
    pub phone: Option<String>,
    pub description: Option<String>,
    pub metadata: BTreeMap<String, String>,
    /// `address[…]` and `shipping[…]` parameters as sent.
    pub other: BTreeMap<String, String>,
    /// Unix seconds.
    pub created: i64,
    pub deleted: bool,
    /// Number of updates applied.
    pub updates: u32,
}

/// One API request as the fake saw it, rejected and faulted ones included.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct StripeRequest {
    pub method: String,
    /// The path without the query.
    pub path: String,
    pub query: Option<String>,
    pub idempotency_key: Option<String>,
    /// The decoded form body (POST) or query (GET), in order.
    pub form: Vec<(String, String)>,
    pub status: u16,
    /// Whether the answer was an idempotent replay of an earlier one.
    pub replayed: bool,
    pub response: Value,
    /// Arrival time, milliseconds since the Unix epoch.
    pub received_at_ms: u128,
}

impl StripeRequest {
    /// The first value of a form or query field.
    pub fn field(&self, name: &str) -> Option<&str> {
        self.form
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }
}

/// An answer: status, JSON body and the headers that carry meaning.
#[derive(Debug, Clone, PartialEq)]
struct Reply {
    status: u16,
    body: Value,
    should_retry: Option<bool>,
    retry_after: Option<u64>,
    replayed: bool,
}

impl Reply {
    fn ok(body: Value) -> Reply {
        Reply {
            status: 200,
            body,
            should_retry: None,
            retry_after: None,
            replayed: false,
        }
    }

    /// Stripe's error shape.
    fn error(
        status: u16,
        kind: &str,
        code: Option<&str>,
        param: Option<&str>,
        message: String,
    ) -> Reply {
        let mut error = Map::new();
        if let Some(code) = code {
            error.insert("code".into(), code.into());
            error.insert(
                "doc_url".into(),
                format!(
                    "https://stripe.com/docs/error-codes/{}",
                    code.replace('_', "-")
                )
                .into(),
            );
        }
        error.insert("message".into(), message.into());
        if let Some(param) = param {
            error.insert("param".into(), param.into());
        }
        error.insert("type".into(), kind.into());
        Reply {
            status,
            body: json!({ "error": error }),
            should_retry: None,
            retry_after: None,
            replayed: false,
        }
    }

    fn invalid(param: &str, code: &str, message: String) -> Reply {
        Reply::error(
            400,
            "invalid_request_error",
            Some(code),
            Some(param),
            message,
        )
    }

    fn missing(id: &str) -> Reply {
        Reply::error(
            404,
            "invalid_request_error",
            Some("resource_missing"),
            Some("id"),
            format!("No such customer: '{id}'"),
        )
    }

    fn rate_limited(retry_after: u64) -> Reply {
        let mut r = Reply::error(
            429,
            "invalid_request_error",
            Some("rate_limit"),
            None,
            "Request rate limit exceeded. Learn more about rate limits here https://stripe.com/docs/rate-limits.".into(),
        );
        r.retry_after = Some(retry_after);
        r
    }
}

/// What an idempotency key was first used for, and the answer saved.
struct Saved {
    method: String,
    path: String,
    params: Vec<(String, String)>,
    reply: Reply,
}

/// A token bucket holding up to one second's worth of requests.
struct Bucket {
    per_sec: u32,
    tokens: f64,
    last: Instant,
}

impl Bucket {
    fn new(per_sec: u32) -> Bucket {
        Bucket {
            per_sec,
            tokens: f64::from(per_sec),
            last: Instant::now(),
        }
    }

    fn take(&mut self) -> bool {
        if self.per_sec == 0 {
            return true;
        }
        let now = Instant::now();
        let cap = f64::from(self.per_sec);
        self.tokens = (self.tokens + now.duration_since(self.last).as_secs_f64() * cap).min(cap);
        self.last = now;
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

enum ActiveFault {
    Status(u16),
    RateLimit(u64),
    Timeout,
}

/// A subscription as the fake stores it (one item, one price).
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct FakeSubscription {
    /// `sub_` + 14 alphanumerics.
    pub id: String,
    pub customer: String,
    /// `active`, `canceled`, or whatever a test set.
    pub status: String,
    pub price: String,
    pub cancel_at_period_end: bool,
    pub metadata: BTreeMap<String, String>,
    /// Unix seconds.
    pub created: i64,
    pub canceled_at: Option<i64>,
}

/// A completed Checkout Session.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct FakeCheckoutSession {
    /// `cs_test_` + alphanumerics.
    pub id: String,
    pub customer: String,
    pub subscription: String,
    pub client_reference_id: Option<String>,
    pub email: Option<String>,
    pub created: i64,
}

struct Store {
    customers: Vec<FakeCustomer>,
    subscriptions: Vec<FakeSubscription>,
    sessions: Vec<FakeCheckoutSession>,
    /// Events are stamped with this second instead of the clock's.
    event_time: Option<i64>,
    requests: Vec<StripeRequest>,
    faults: VecDeque<Fault>,
    latency: Duration,
    without_search: bool,
    saved: HashMap<String, Saved>,
    bucket: Bucket,
    /// Where `customer.*` events go (Stripe-signed), when configured.
    webhooks: Webhooks,
}

impl Store {
    fn take_fault(&mut self) -> Option<ActiveFault> {
        loop {
            let front = self.faults.front_mut()?;
            let (remaining, active) = match front {
                Fault::Status { status, count } => (count, ActiveFault::Status(*status)),
                Fault::RateLimit {
                    retry_after_secs,
                    count,
                } => (count, ActiveFault::RateLimit(*retry_after_secs)),
                Fault::Timeout { count } => (count, ActiveFault::Timeout),
            };
            if *remaining == 0 {
                self.faults.pop_front();
                continue;
            }
            *remaining -= 1;
            if *remaining == 0 {
                self.faults.pop_front();
            }
            return Some(active);
        }
    }

    /// For a request that may change a customer: the customer as it is
    /// before (null for a create), to report `previous_attributes` and the
    /// deleted object.
    fn event_subject(&self, method: &str, path: &str) -> Option<Value> {
        if !self.webhooks.is_configured() {
            return None;
        }
        let segments: Vec<&str> = path.trim_end_matches('/').split('/').skip(1).collect();
        match (method, segments.as_slice()) {
            ("POST", ["v1", "customers"]) => Some(Value::Null),
            ("POST", ["v1", "customers", "search"]) => None,
            ("POST" | "DELETE", ["v1", "customers", id]) => {
                let id = percent_decode(id);
                self.customers
                    .iter()
                    .find(|c| c.id == id && !c.deleted)
                    .map(customer_json)
            }
            _ => None,
        }
    }

    /// Queues the event Stripe sends for a change that took effect, with
    /// `request.idempotency_key` as the request carried it.
    fn emit(
        &mut self,
        method: &str,
        path: &str,
        before: Option<Value>,
        answer: &Value,
        idempotency_key: Option<&str>,
    ) {
        let Some(before) = before else { return };
        let (kind, object, previous) = match (method, before) {
            ("POST", Value::Null) if path.trim_end_matches('/') == "/v1/customers" => {
                ("customer.created", answer.clone(), None)
            }
            ("POST", old) => {
                let mut previous = Map::new();
                if let (Some(old), Some(new)) = (old.as_object(), answer.as_object()) {
                    for (k, v) in old {
                        if new.get(k) != Some(v) {
                            previous.insert(k.clone(), v.clone());
                        }
                    }
                }
                if previous.is_empty() {
                    // Stripe sends no customer.updated for a no-op update.
                    return;
                }
                (
                    "customer.updated",
                    answer.clone(),
                    Some(Value::Object(previous)),
                )
            }
            ("DELETE", old) => ("customer.deleted", old, None),
            _ => return,
        };
        self.send_event(kind, object, previous, idempotency_key);
    }

    /// Queues one event with Stripe's envelope; `idempotency_key` is the
    /// causing request's (None for a dashboard or Checkout action).
    fn send_event(
        &self,
        kind: &str,
        object: Value,
        previous: Option<Value>,
        idempotency_key: Option<&str>,
    ) {
        if !self.webhooks.is_configured() {
            return;
        }
        let mut data = json!({ "object": object });
        if let Some(p) = previous {
            data["previous_attributes"] = p;
        }
        let id = format!("evt_{}", random_alnum(24));
        let body = json!({
            "id": id,
            "object": "event",
            "api_version": "2024-06-20",
            "created": self.event_time.unwrap_or_else(now_secs),
            "data": data,
            "livemode": false,
            "pending_webhooks": 1,
            "request": { "id": format!("req_{}", random_alnum(14)), "idempotency_key": idempotency_key },
            "type": kind,
        });
        self.webhooks.send(id, kind, body.to_string().into_bytes());
    }

    fn create_subscription(&mut self, params: &[(String, String)], key: Option<&str>) -> Reply {
        let mut customer = None;
        let mut price = None;
        let mut metadata = BTreeMap::new();
        for (k, v) in params {
            match k.as_str() {
                "customer" => customer = Some(v.clone()),
                "items[0][price]" => price = Some(v.clone()),
                m if m.starts_with("metadata[") && m.ends_with(']') => {
                    metadata.insert(m[9..m.len() - 1].to_string(), v.clone());
                }
                other => return unknown_parameter(other),
            }
        }
        let Some(customer) = customer else {
            return Reply::invalid(
                "customer",
                "parameter_missing",
                "Missing required param: customer.".into(),
            );
        };
        if !self
            .customers
            .iter()
            .any(|c| c.id == customer && !c.deleted)
        {
            return Reply::invalid(
                "customer",
                "resource_missing",
                format!("No such customer: '{customer}'"),
            );
        }
        let price = match price {
            Some(p) if p.starts_with("price_") => p,
            Some(p) => {
                return Reply::invalid(
                    "items[0][price]",
                    "resource_missing",
                    format!("No such price: '{p}'"),
                )
            }
            None => {
                return Reply::invalid(
                    "items",
                    "parameter_missing",
                    "Missing required param: items.".into(),
                )
            }
        };
        let sub = FakeSubscription {
            id: format!("sub_{}", random_alnum(ID_RANDOM_CHARS)),
            customer,
            status: "active".into(),
            price,
            cancel_at_period_end: false,
            metadata,
            created: now_secs(),
            canceled_at: None,
        };
        let body = subscription_json(&sub);
        self.subscriptions.push(sub);
        self.send_event("customer.subscription.created", body.clone(), None, key);
        Reply::ok(body)
    }

    fn update_subscription(
        &mut self,
        id: &str,
        params: &[(String, String)],
        key: Option<&str>,
    ) -> Reply {
        let Some(i) = self.subscriptions.iter().position(|s| s.id == id) else {
            return Reply::missing(id);
        };
        let mut sub = self.subscriptions[i].clone();
        if sub.status == "canceled" {
            return Reply::invalid("subscription", "resource_missing", format!("A canceled subscription can only update its cancellation_details and metadata: {id}"));
        }
        for (k, v) in params {
            match k.as_str() {
                "items[0][price]" if v.starts_with("price_") => sub.price = v.clone(),
                "items[0][price]" => {
                    return Reply::invalid(
                        "items[0][price]",
                        "resource_missing",
                        format!("No such price: '{v}'"),
                    )
                }
                "cancel_at_period_end" => sub.cancel_at_period_end = v == "true",
                m if m.starts_with("metadata[") && m.ends_with(']') => {
                    let name = m[9..m.len() - 1].to_string();
                    if v.is_empty() {
                        sub.metadata.remove(&name);
                    } else {
                        sub.metadata.insert(name, v.clone());
                    }
                }
                other => return unknown_parameter(other),
            }
        }
        let before = subscription_json(&self.subscriptions[i]);
        let body = subscription_json(&sub);
        self.subscriptions[i] = sub;
        let previous = changed_attributes(&before, &body);
        if !previous.is_empty() {
            self.send_event(
                "customer.subscription.updated",
                body.clone(),
                Some(Value::Object(previous)),
                key,
            );
        }
        Reply::ok(body)
    }

    fn cancel_subscription(&mut self, id: &str, key: Option<&str>) -> Reply {
        let event_time = self.event_time;
        let Some(sub) = self
            .subscriptions
            .iter_mut()
            .find(|s| s.id == id && s.status != "canceled")
        else {
            return Reply::missing(id);
        };
        sub.status = "canceled".into();
        sub.canceled_at = Some(event_time.unwrap_or_else(now_secs));
        let body = subscription_json(sub);
        self.send_event("customer.subscription.deleted", body.clone(), None, key);
        Reply::ok(body)
    }

    /// Routes one authenticated, admitted request. Synchronous: the whole
    /// effect, idempotency entry included, is one critical section.
    fn handle(
        &mut self,
        method: &str,
        path: &str,
        params: &[(String, String)],
        key: Option<&str>,
    ) -> Reply {
        let segments: Vec<&str> = path.trim_end_matches('/').split('/').skip(1).collect();
        match (method, segments.as_slice()) {
            ("POST", ["v1", "customers"]) => {
                self.idempotent(key, method, path, params, |s| s.create(params))
            }
            ("POST", ["v1", "customers", "search"]) => unrecognized(method, path),
            ("POST", ["v1", "customers", id]) => {
                let id = percent_decode(id);
                self.idempotent(key, method, path, params, |s| s.update(&id, params))
            }
            ("GET", ["v1", "customers"]) => self.list(params),
            ("GET", ["v1", "customers", "search"]) if self.without_search => {
                unrecognized(method, path)
            }
            ("GET", ["v1", "customers", "search"]) => self.search(params),
            ("GET", ["v1", "customers", id]) => self.retrieve(&percent_decode(id)),
            ("DELETE", ["v1", "customers", id]) => self.delete(&percent_decode(id)),
            ("POST", ["v1", "subscriptions"]) => self.idempotent(key, method, path, params, |s| {
                s.create_subscription(params, key)
            }),
            ("POST", ["v1", "subscriptions", id]) => {
                let id = percent_decode(id);
                self.idempotent(key, method, path, params, |s| {
                    s.update_subscription(&id, params, key)
                })
            }
            ("DELETE", ["v1", "subscriptions", id]) => {
                self.cancel_subscription(&percent_decode(id), key)
            }
            ("GET", ["v1", "subscriptions", id]) => {
                let id = percent_decode(id);
                match self.subscriptions.iter().find(|s| s.id == id) {
                    Some(sub) => Reply::ok(subscription_json(sub)),
                    None => Reply::missing(&id),
                }
            }
            ("GET", ["v1", "checkout", "sessions", id]) => {
                let id = percent_decode(id);
                match self.sessions.iter().find(|s| s.id == id) {
                    Some(session) => Reply::ok(session_json(session)),
                    None => Reply::missing(&id),
                }
            }
            _ => unrecognized(method, path),
        }
    }

    fn idempotent(
        &mut self,
        key: Option<&str>,
        method: &str,
        path: &str,
        params: &[(String, String)],
        run: impl FnOnce(&mut Store) -> Reply,
    ) -> Reply {
        let Some(key) = key else { return run(self) };
        if key.len() > 255 {
            return Reply::error(
                400,
                "invalid_request_error",
                None,
                None,
                "Idempotency keys can be at most 255 characters long.".into(),
            );
        }
        let mut sorted = params.to_vec();
        sorted.sort();
        if let Some(saved) = self.saved.get(key) {
            if saved.method == method && saved.path == path && saved.params == sorted {
                let mut reply = saved.reply.clone();
                reply.replayed = true;
                return reply;
            }
            return Reply::error(
                400,
                "idempotency_error",
                None,
                None,
                format!(
                    "Keys for idempotent requests can only be used with the same parameters they were first used with. Try using a key other than '{key}' if you meant to execute a different request."
                ),
            );
        }
        let reply = run(self);
        // Saved once the endpoint ran; a parameter error is not.
        if reply.status != 400 {
            self.saved.insert(
                key.to_string(),
                Saved {
                    method: method.to_string(),
                    path: path.to_string(),
                    params: sorted,
                    reply: reply.clone(),
                },
            );
        }
        reply
    }

    fn create(&mut self, params: &[(String, String)]) -> Reply {
        let mut customer = FakeCustomer {
            id: new_id(),
            email: None,
            name: None,
            phone: None,
            description: None,
            metadata: BTreeMap::new(),
            other: BTreeMap::new(),
            created: now_secs(),
            deleted: false,
            updates: 0,
        };
        if let Err(reply) = apply(&mut customer, params) {
            return reply;
        }
        let body = customer_json(&customer);
        self.customers.push(customer);
        Reply::ok(body)
    }

    fn update(&mut self, id: &str, params: &[(String, String)]) -> Reply {
        let Some(customer) = self.customers.iter_mut().find(|c| c.id == id && !c.deleted) else {
            return Reply::missing(id);
        };
        // Validate on a copy: a refused update changes nothing.
        let mut updated = customer.clone();
        if let Err(reply) = apply(&mut updated, params) {
            return reply;
        }
        updated.updates += 1;
        *customer = updated;
        Reply::ok(customer_json(customer))
    }

    fn retrieve(&self, id: &str) -> Reply {
        match self.customers.iter().find(|c| c.id == id) {
            Some(c) if c.deleted => Reply::ok(deleted_json(id)),
            Some(c) => Reply::ok(customer_json(c)),
            None => Reply::missing(id),
        }
    }

    fn delete(&mut self, id: &str) -> Reply {
        match self.customers.iter_mut().find(|c| c.id == id && !c.deleted) {
            Some(c) => {
                c.deleted = true;
                Reply::ok(deleted_json(id))
            }
            None => Reply::missing(id),
        }
    }

    /// Newest first, like Stripe. `starting_after` pages towards older
    /// customers, `ending_before` towards newer ones (the page itself still
    /// newest first); the cursor is an id, which may since have been deleted.
    fn list(&self, params: &[(String, String)]) -> Reply {
        let mut limit = 10;
        let mut email = None;
        let mut after = None;
        let mut before = None;
        for (k, v) in params {
            match k.as_str() {
                "limit" => match parse_limit(v) {
                    Ok(l) => limit = l,
                    Err(reply) => return reply,
                },
                "email" => email = Some(v.as_str()),
                "starting_after" => after = Some(v.as_str()),
                "ending_before" => before = Some(v.as_str()),
                "created" => {}
                other => return unknown_parameter(other),
            }
        }
        if after.is_some() && before.is_some() {
            return Reply::error(
                400,
                "invalid_request_error",
                None,
                None,
                "You may only specify one of these parameters: ending_before, starting_after."
                    .into(),
            );
        }
        // Positions in creation order; the list is the reverse of it.
        let anchor = |param: &str, id: &str| -> Result<usize, Reply> {
            self.customers
                .iter()
                .position(|c| c.id == id)
                .ok_or_else(|| {
                    Reply::error(
                        400,
                        "invalid_request_error",
                        Some("resource_missing"),
                        Some(param),
                        format!("No such customer: '{id}'"),
                    )
                })
        };
        let listed = |(_, c): &(usize, &FakeCustomer)| {
            !c.deleted && (email.is_none() || c.email.as_deref() == email)
        };
        let page: Vec<&FakeCustomer>;
        let has_more;
        if let Some(id) = before {
            let at = match anchor("ending_before", id) {
                Ok(at) => at,
                Err(reply) => return reply,
            };
            // The `limit` customers just newer than the anchor, oldest of them
            // last; more remain when even newer ones exist.
            let newer: Vec<&FakeCustomer> = self
                .customers
                .iter()
                .enumerate()
                .skip(at + 1)
                .filter(listed)
                .map(|(_, c)| c)
                .collect();
            has_more = newer.len() > limit;
            page = newer.into_iter().take(limit).rev().collect();
        } else {
            let end = match after {
                Some(id) => match anchor("starting_after", id) {
                    Ok(at) => at,
                    Err(reply) => return reply,
                },
                None => self.customers.len(),
            };
            let older: Vec<&FakeCustomer> = self.customers[..end]
                .iter()
                .enumerate()
                .rev()
                .filter(listed)
                .map(|(_, c)| c)
                .collect();
            has_more = older.len() > limit;
            page = older.into_iter().take(limit).collect();
        }
        Reply::ok(json!({
            "object": "list",
            "data": page.iter().map(|c| customer_json(c)).collect::<Vec<_>>(),
            "has_more": has_more,
            "url": "/v1/customers",
        }))
    }

    fn search(&self, params: &[(String, String)]) -> Reply {
        let mut limit = 10;
        let mut query = None;
        for (k, v) in params {
            match k.as_str() {
                "limit" => match parse_limit(v) {
                    Ok(l) => limit = l,
                    Err(reply) => return reply,
                },
                "query" => query = Some(v.as_str()),
                "page" => {}
                other => return unknown_parameter(other),
            }
        }
        let Some(query) = query else {
            return Reply::invalid(
                "query",
                "parameter_missing",
                "Missing required param: query.".into(),
            );
        };
        let (clauses, any) = match parse_query(query) {
            Ok(q) => q,
            Err(problem) => {
                return Reply::error(
                    400,
                    "invalid_request_error",
                    None,
                    Some("query"),
                    format!("Invalid search query: {problem}"),
                )
            }
        };
        let matching: Vec<&FakeCustomer> = self
            .customers
            .iter()
            .rev()
            .filter(|c| !c.deleted)
            .filter(|c| {
                let mut hits = clauses.iter().map(|clause| clause.matches(c));
                if any {
                    hits.any(|h| h)
                } else {
                    hits.all(|h| h)
                }
            })
            .collect();
        Reply::ok(json!({
            "object": "search_result",
            "data": matching.iter().take(limit).map(|c| customer_json(c)).collect::<Vec<_>>(),
            "has_more": matching.len() > limit,
            "next_page": null,
            "url": "/v1/customers/search",
        }))
    }
}

/// Applies create or update parameters; refuses what Stripe refuses.
fn apply(c: &mut FakeCustomer, params: &[(String, String)]) -> Result<(), Reply> {
    for (name, value) in params {
        let set = |field: &mut Option<String>| {
            *field = (!value.is_empty()).then(|| value.clone());
        };
        match name.as_str() {
            "email" => {
                if !value.is_empty() && !value.contains('@') {
                    return Err(Reply::invalid(
                        "email",
                        "email_invalid",
                        format!("Invalid email address: {value}"),
                    ));
                }
                set(&mut c.email);
            }
            "name" => set(&mut c.name),
            "phone" => set(&mut c.phone),
            "description" => set(&mut c.description),
            // `metadata=` unsets every key.
            "metadata" if value.is_empty() => c.metadata.clear(),
            "expand[]" => {}
            other => {
                if let Some(key) = other
                    .strip_prefix("metadata[")
                    .and_then(|k| k.strip_suffix(']'))
                {
                    if key.is_empty() || key.len() > 40 || key.contains(['[', ']']) {
                        return Err(Reply::invalid(
                            "metadata",
                            "parameter_invalid_string",
                            format!("Invalid metadata key {key:?}: keys are 1 to 40 characters without square brackets."),
                        ));
                    }
                    if value.chars().count() > 500 {
                        return Err(Reply::invalid(
                            "metadata",
                            "parameter_invalid_string",
                            format!("Metadata values can have a maximum length of 500 characters; the value for {key:?} is longer."),
                        ));
                    }
                    if value.is_empty() {
                        c.metadata.remove(key);
                    } else {
                        c.metadata.insert(key.to_string(), value.clone());
                    }
                } else if is_address_param(other) {
                    if value.is_empty() {
                        c.other.remove(other);
                    } else {
                        c.other.insert(other.to_string(), value.clone());
                    }
                } else {
                    return Err(unknown_parameter(other));
                }
            }
        }
    }
    if c.metadata.len() > 50 {
        return Err(Reply::invalid(
            "metadata",
            "parameter_invalid_string",
            "Metadata can have at most 50 keys.".into(),
        ));
    }
    Ok(())
}

fn is_address_param(name: &str) -> bool {
    let sub = |prefix: &str| {
        name.strip_prefix(prefix)
            .and_then(|r| r.strip_suffix(']'))
            .is_some_and(|f| ADDRESS_FIELDS.contains(&f))
    };
    sub("address[")
        || sub("shipping[address][")
        || matches!(name, "shipping[name]" | "shipping[phone]")
}

fn unknown_parameter(name: &str) -> Reply {
    Reply::invalid(
        name,
        "parameter_unknown",
        format!("Received unknown parameter: {name}"),
    )
}

fn unrecognized(method: &str, path: &str) -> Reply {
    Reply::error(
        404,
        "invalid_request_error",
        None,
        None,
        format!("Unrecognized request URL ({method}: {path}). Please see https://stripe.com/docs or we can help at https://support.stripe.com/."),
    )
}

fn parse_limit(v: &str) -> Result<usize, Reply> {
    match v.parse::<usize>() {
        Ok(l) if (1..=100).contains(&l) => Ok(l),
        _ => Err(Reply::invalid(
            "limit",
            "parameter_invalid_integer",
            format!("Invalid integer: {v}; limit must be between 1 and 100."),
        )),
    }
}

fn customer_json(c: &FakeCustomer) -> Value {
    let address = |prefix: &str| -> Value {
        let fields: Map<String, Value> = ADDRESS_FIELDS
            .iter()
            .map(|f| {
                let v = c.other.get(&format!("{prefix}[{f}]")).cloned();
                (f.to_string(), v.map_or(Value::Null, Value::String))
            })
            .collect();
        if fields.values().all(Value::is_null) {
            Value::Null
        } else {
            Value::Object(fields)
        }
    };
    let shipping_name = c.other.get("shipping[name]");
    let shipping = if shipping_name.is_none() && address("shipping[address]").is_null() {
        Value::Null
    } else {
        json!({
            "address": address("shipping[address]"),
            "name": shipping_name,
            "phone": c.other.get("shipping[phone]"),
        })
    };
    json!({
        "id": c.id,
        "object": "customer",
        "address": address("address"),
        "balance": 0,
        "created": c.created,
        "currency": null,
        "default_source": null,
        "delinquent": false,
        "description": c.description,
        "discount": null,
        "email": c.email,
        "invoice_prefix": c.id[4..12].to_uppercase(),
        "livemode": false,
        "metadata": c.metadata,
        "name": c.name,
        "next_invoice_sequence": 1,
        "phone": c.phone,
        "preferred_locales": [],
        "shipping": shipping,
        "tax_exempt": "none",
        "test_clock": null,
    })
}

fn subscription_json(s: &FakeSubscription) -> Value {
    json!({
        "id": s.id,
        "object": "subscription",
        "cancel_at_period_end": s.cancel_at_period_end,
        "canceled_at": s.canceled_at,
        "collection_method": "charge_automatically",
        "created": s.created,
        "currency": "usd",
        "customer": s.customer,
        "items": {
            "object": "list",
            "data": [{
                "id": format!("si_{}", &s.id[4..]),
                "object": "subscription_item",
                "price": {"id": s.price, "object": "price", "lookup_key": null},
                "quantity": 1,
            }],
            "has_more": false,
        },
        "livemode": false,
        "metadata": s.metadata,
        "status": s.status,
    })
}

fn session_json(s: &FakeCheckoutSession) -> Value {
    json!({
        "id": s.id,
        "object": "checkout.session",
        "client_reference_id": s.client_reference_id,
        "created": s.created,
        "customer": s.customer,
        "customer_details": {"email": s.email},
        "livemode": false,
        "metadata": {},
        "mode": "subscription",
        "payment_status": "paid",
        "status": "complete",
        "subscription": s.subscription,
    })
}

/// `previous_attributes`: the top-level values that changed, as they were.
fn changed_attributes(before: &Value, after: &Value) -> Map<String, Value> {
    let mut previous = Map::new();
    if let (Some(old), Some(new)) = (before.as_object(), after.as_object()) {
        for (k, v) in old {
            if new.get(k) != Some(v) {
                previous.insert(k.clone(), v.clone());
            }
        }
    }
    previous
}

fn deleted_json(id: &str) -> Value {
    json!({ "id": id, "object": "customer", "deleted": true })
}

/// One `field:'value'` clause of a search query.
#[derive(Debug, PartialEq)]
enum Clause {
    Field(String, String),
    Metadata(String, String),
}

impl Clause {
    fn matches(&self, c: &FakeCustomer) -> bool {
        match self {
            Clause::Metadata(k, v) => c.metadata.get(k) == Some(v),
            Clause::Field(f, v) => {
                let have = match f.as_str() {
                    "email" => &c.email,
                    "name" => &c.name,
                    "phone" => &c.phone,
                    _ => &c.description,
                };
                have.as_deref() == Some(v.as_str())
            }
        }
    }
}

/// Parses the subset of Stripe's search query language that applies to
/// customers' string fields: clauses joined by AND or by OR (not both).
/// Returns the clauses and whether they are OR-ed.
fn parse_query(q: &str) -> Result<(Vec<Clause>, bool), String> {
    let chars: Vec<char> = q.chars().collect();
    let mut i = 0;
    let mut clauses = Vec::new();
    let mut joiner: Option<&str> = None;
    let skip_spaces = |i: &mut usize| {
        while *i < chars.len() && chars[*i] == ' ' {
            *i += 1;
        }
    };
    let quoted = |i: &mut usize| -> Result<String, String> {
        let quote = match chars.get(*i) {
            Some(c @ ('\'' | '"')) => *c,
            _ => return Err(format!("expected a quoted value at position {i}")),
        };
        *i += 1;
        let mut out = String::new();
        while let Some(&c) = chars.get(*i) {
            *i += 1;
            match c {
                '\\' => match chars.get(*i) {
                    Some(&next) => {
                        out.push(next);
                        *i += 1;
                    }
                    None => break,
                },
                c if c == quote => return Ok(out),
                c => out.push(c),
            }
        }
        Err("unterminated string".into())
    };
    loop {
        skip_spaces(&mut i);
        let start = i;
        while i < chars.len() && (chars[i].is_ascii_alphanumeric() || chars[i] == '_') {
            i += 1;
        }
        let field: String = chars[start..i].iter().collect();
        let clause_field = if field == "metadata" {
            if chars.get(i) != Some(&'[') {
                return Err("expected metadata['key']".into());
            }
            i += 1;
            let key = quoted(&mut i)?;
            if chars.get(i) != Some(&']') {
                return Err("expected ']' after the metadata key".into());
            }
            i += 1;
            Some(key)
        } else if matches!(field.as_str(), "email" | "name" | "phone" | "description") {
            None
        } else {
            return Err(format!("{field:?} is not a searchable customer field"));
        };
        if chars.get(i) != Some(&':') {
            return Err(format!("expected ':' after {field}"));
        }
        i += 1;
        let value = quoted(&mut i)?;
        clauses.push(match clause_field {
            Some(key) => Clause::Metadata(key, value),
            None => Clause::Field(field, value),
        });
        skip_spaces(&mut i);
        if i >= chars.len() {
            break;
        }
        let rest: String = chars[i..].iter().collect();
        let word = if rest.starts_with("AND ") {
            "AND"
        } else if rest.starts_with("OR ") {
            "OR"
        } else {
            return Err(format!(
                "unexpected {:?}",
                rest.chars().take(10).collect::<String>()
            ));
        };
        if joiner.is_some_and(|j| j != word) {
            return Err("AND and OR cannot be combined in one query".into());
        }
        joiner = Some(word);
        i += word.len();
    }
    Ok((clauses, joiner == Some("OR")))
}

struct Shared {
    store: Mutex<Store>,
    api_key: String,
    stopping: watch::Receiver<bool>,
}

impl Shared {
    fn store(&self) -> MutexGuard<'_, Store> {
        self.store.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// A running fake Stripe. Dropping it stops the server without waiting.
pub struct FakeStripe {
    shared: Arc<Shared>,
    server: Server,
    webhooks: Webhooks,
}

impl FakeStripe {
    /// Binds 127.0.0.1 and serves in the background.
    pub async fn start(opts: FakeStripeOptions) -> std::io::Result<FakeStripe> {
        let bound = Server::bind(opts.port).await?;
        let webhooks = Webhooks::default();
        let shared = Arc::new(Shared {
            store: Mutex::new(Store {
                customers: Vec::new(),
                subscriptions: Vec::new(),
                sessions: Vec::new(),
                event_time: None,
                requests: Vec::new(),
                faults: VecDeque::new(),
                latency: opts.latency,
                without_search: opts.without_search,
                saved: HashMap::new(),
                bucket: Bucket::new(opts.rate_limit_per_sec),
                webhooks: webhooks.clone(),
            }),
            api_key: opts.api_key,
            stopping: bound.stopping(),
        });
        let app = Router::new()
            .route("/_fake/customers", get(admin_customers))
            .route("/_fake/requests", get(admin_requests))
            .route("/_fake/clear", post(admin_clear))
            .fallback(api)
            .with_state(Arc::clone(&shared));
        let server = bound.serve(app, "fake Stripe")?;
        Ok(FakeStripe {
            shared,
            server,
            webhooks,
        })
    }

    /// The Stripe-signed `customer.created/updated/deleted` events this fake
    /// sends once given a target ([`Webhooks::set_target`]).
    pub fn webhooks(&self) -> &Webhooks {
        &self.webhooks
    }

    pub fn addr(&self) -> SocketAddr {
        self.server.addr()
    }

    /// The API base URL (what `sink.url` should be), without a trailing slash.
    pub fn url(&self) -> String {
        format!("http://{}", self.server.addr())
    }

    /// Every customer ever created, deleted ones included, oldest first.
    pub fn customers(&self) -> Vec<FakeCustomer> {
        self.shared.store().customers.clone()
    }

    /// Every API request, in the order they were answered (a request held by
    /// a timeout fault is recorded on arrival).
    pub fn requests(&self) -> Vec<StripeRequest> {
        self.shared.store().requests.clone()
    }

    pub fn inject(&self, fault: Fault) {
        self.shared.store().faults.push_back(fault);
    }

    /// Adds a customer directly, as if made in Stripe's dashboard, without a
    /// request: for seeding lists. Returns its id.
    pub fn insert_customer(
        &self,
        email: Option<&str>,
        name: Option<&str>,
        metadata: BTreeMap<String, String>,
    ) -> String {
        let customer = FakeCustomer {
            id: new_id(),
            email: email.map(str::to_string),
            name: name.map(str::to_string),
            phone: None,
            description: None,
            metadata,
            other: BTreeMap::new(),
            created: now_secs(),
            deleted: false,
            updates: 0,
        };
        let id = customer.id.clone();
        self.shared.store().customers.push(customer);
        id
    }

    /// Changes a customer as a dashboard edit would (no request recorded);
    /// false when there is no live customer with this id.
    pub fn edit_customer(&self, id: &str, edit: impl FnOnce(&mut FakeCustomer)) -> bool {
        let mut store = self.shared.store();
        match store
            .customers
            .iter_mut()
            .find(|c| c.id == id && !c.deleted)
        {
            Some(c) => {
                edit(c);
                true
            }
            None => false,
        }
    }

    /// Switches the rate limit: requests per second, 0 for none.
    pub fn set_rate_limit(&self, per_sec: u32) {
        self.shared.store().bucket = Bucket::new(per_sec);
    }

    /// Every subscription, canceled ones included, oldest first.
    pub fn subscriptions(&self) -> Vec<FakeSubscription> {
        self.shared.store().subscriptions.clone()
    }

    /// Stamps every later event with this second (`None`: the clock's), so
    /// a test can make events tie as Stripe's one-second `created` does.
    pub fn pin_event_time(&self, second: Option<i64>) {
        self.shared.store().event_time = second;
    }

    /// A buyer finishing a subscription Checkout for a live customer, as the
    /// browser would: a completed session and an active subscription to
    /// `price`, and their events (`customer.subscription.created`, then
    /// `checkout.session.completed`, neither with an idempotency key).
    /// Returns (session id, subscription id); `None` without such a
    /// customer.
    pub fn complete_checkout(
        &self,
        customer: &str,
        price: &str,
        client_reference_id: Option<&str>,
    ) -> Option<(String, String)> {
        let mut store = self.shared.store();
        let email = store
            .customers
            .iter()
            .find(|c| c.id == customer && !c.deleted)?
            .email
            .clone();
        let sub = FakeSubscription {
            id: format!("sub_{}", random_alnum(ID_RANDOM_CHARS)),
            customer: customer.to_string(),
            status: "active".into(),
            price: price.to_string(),
            cancel_at_period_end: false,
            metadata: BTreeMap::new(),
            created: now_secs(),
            canceled_at: None,
        };
        let session = FakeCheckoutSession {
            id: format!("cs_test_{}", random_alnum(58)),
            customer: customer.to_string(),
            subscription: sub.id.clone(),
            client_reference_id: client_reference_id.map(str::to_string),
            email,
            created: now_secs(),
        };
        store.send_event(
            "customer.subscription.created",
            subscription_json(&sub),
            None,
            None,
        );
        store.send_event(
            "checkout.session.completed",
            session_json(&session),
            None,
            None,
        );
        let ids = (session.id.clone(), sub.id.clone());
        store.subscriptions.push(sub);
        store.sessions.push(session);
        Some(ids)
    }

    pub fn set_latency(&self, d: Duration) {
        self.shared.store().latency = d;
    }

    /// Forgets customers, requests, faults and saved idempotent answers.
    pub fn clear(&self) {
        let mut store = self.shared.store();
        store.customers.clear();
        store.subscriptions.clear();
        store.sessions.clear();
        store.requests.clear();
        store.faults.clear();
        store.saved.clear();
    }

    /// Stops serving, releases held requests, waits briefly.
    pub async fn shutdown(self) {
        self.server.shutdown("fake Stripe").await;
    }
}

/// Runs the fake in the foreground until Ctrl-C; the URL goes alone on stdout.
pub async fn serve_forever(opts: FakeStripeOptions) -> std::io::Result<()> {
    let fake = FakeStripe::start(opts).await?;
    let url = fake.url();
    println!("{url}");
    eprintln!(
        "fake Stripe customers API on {url}; inspect with GET {url}/_fake/customers and {url}/_fake/requests; Ctrl-C to stop"
    );
    let result = tokio::signal::ctrl_c().await;
    fake.shutdown().await;
    result
}

async fn api(State(shared): State<Arc<Shared>>, request: Request) -> Response {
    let received_at_ms = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis());
    let (parts, body) = request.into_parts();
    let method = parts.method.as_str().to_string();
    let path = parts.uri.path().to_string();
    let query = parts.uri.query().map(str::to_string);
    let idempotency_key = header(&parts.headers, "idempotency-key");
    let bytes = to_bytes(body, MAX_BODY_BYTES).await.unwrap_or_default();
    let mut form = parse_form(query.as_deref().unwrap_or(""));
    form.extend(parse_form(&String::from_utf8_lossy(&bytes)));
    let record = StripeRequest {
        method: method.clone(),
        path: path.clone(),
        query,
        idempotency_key: idempotency_key.clone(),
        form,
        status: 0,
        replayed: false,
        response: Value::Null,
        received_at_ms,
    };

    if let Err(reply) = authenticate(&shared.api_key, &parts.headers) {
        return finish(&shared, record, reply);
    }
    let admitted = shared.store().bucket.take();
    if !admitted {
        return finish(&shared, record, Reply::rate_limited(1));
    }
    let latency = shared.store().latency;
    if !latency.is_zero() {
        hold(&shared, latency).await;
    }
    let fault = shared.store().take_fault();
    match fault {
        None => {}
        Some(ActiveFault::Status(status)) => return finish(&shared, record, fault_reply(status)),
        Some(ActiveFault::RateLimit(secs)) => {
            return finish(&shared, record, Reply::rate_limited(secs))
        }
        Some(ActiveFault::Timeout) => {
            let mut reply = Reply::error(504, "api_error", None, None, "Injected timeout.".into());
            reply.should_retry = Some(true);
            let mut early = record;
            early.status = reply.status;
            early.response = reply.body.clone();
            shared.store().requests.push(early);
            hold(&shared, TIMEOUT_HOLD).await;
            return respond(reply);
        }
    }
    let reply = {
        let mut store = shared.store();
        let params = record.form.clone();
        let before = store.event_subject(&method, &path);
        let reply = store.handle(&method, &path, &params, idempotency_key.as_deref());
        if reply.status == 200 && !reply.replayed {
            store.emit(
                &method,
                &path,
                before,
                &reply.body,
                idempotency_key.as_deref(),
            );
        }
        let mut record = record;
        record.status = reply.status;
        record.replayed = reply.replayed;
        record.response = reply.body.clone();
        store.requests.push(record);
        reply
    };
    respond(reply)
}

fn fault_reply(status: u16) -> Reply {
    let status = if (400..=599).contains(&status) {
        status
    } else {
        500
    };
    let mut reply = match status {
        409 => Reply::error(
            409,
            "invalid_request_error",
            Some("idempotency_key_in_use"),
            None,
            "There is currently another in-progress request using this Idempotency Key (that probably means you submitted twice, and the other request is still going through). Please try again later.".into(),
        ),
        429 => Reply::rate_limited(1),
        s if s >= 500 => Reply::error(
            s,
            "api_error",
            None,
            None,
            format!("Injected fault: status {s}."),
        ),
        s => Reply::error(
            s,
            "invalid_request_error",
            None,
            None,
            format!("Injected fault: status {s}."),
        ),
    };
    if status == 409 || status >= 500 {
        reply.should_retry = Some(true);
    }
    reply
}

/// Bearer `<key>`, or Basic with the key as user name (as curl -u sends it).
fn authenticate(api_key: &str, headers: &HeaderMap) -> Result<(), Reply> {
    let given = header(headers, "authorization").and_then(|h| {
        let (scheme, value) = h.split_once(' ')?;
        match scheme.to_ascii_lowercase().as_str() {
            "bearer" => Some(value.trim().to_string()),
            "basic" => base64::engine::general_purpose::STANDARD
                .decode(value.trim())
                .ok()
                .and_then(|b| String::from_utf8(b).ok())
                .map(|s| s.split(':').next().unwrap_or_default().to_string()),
            _ => None,
        }
    });
    match given {
        Some(k) if k == api_key => Ok(()),
        Some(k) if !k.is_empty() => Err(Reply::error(
            401,
            "invalid_request_error",
            None,
            None,
            format!("Invalid API Key provided: {}", mask(&k)),
        )),
        _ => Err(Reply::error(
            401,
            "invalid_request_error",
            None,
            None,
            "You did not provide an API key. You need to provide your API key in the Authorization header, using Bearer auth (e.g. 'Authorization: Bearer YOUR_SECRET_KEY'). See https://stripe.com/docs/api#authentication for details, or we can help at https://support.stripe.com/.".into(),
        )),
    }
}

/// Stripe's echo of a wrong key: its prefix, stars, and the last four.
fn mask(key: &str) -> String {
    let prefix = [
        "sk_test_", "sk_live_", "rk_test_", "rk_live_", "pk_test_", "pk_live_",
    ]
    .iter()
    .find(|p| key.starts_with(**p))
    .copied()
    .unwrap_or("");
    let rest: Vec<char> = key[prefix.len()..].chars().collect();
    let shown = rest.len().min(4);
    let tail: String = rest[rest.len() - shown..].iter().collect();
    format!("{prefix}{}{tail}", "*".repeat(rest.len() - shown))
}

fn finish(shared: &Shared, mut record: StripeRequest, reply: Reply) -> Response {
    record.status = reply.status;
    record.replayed = reply.replayed;
    record.response = reply.body.clone();
    shared.store().requests.push(record);
    respond(reply)
}

fn respond(reply: Reply) -> Response {
    let status = StatusCode::from_u16(reply.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let mut response = (status, Json(reply.body)).into_response();
    let headers = response.headers_mut();
    let request_id: String = rand::rng()
        .sample_iter(Alphanumeric)
        .take(14)
        .map(char::from)
        .collect();
    if let Ok(v) = HeaderValue::from_str(&format!("req_{request_id}")) {
        headers.insert("request-id", v);
    }
    if let Some(retry) = reply.should_retry {
        headers.insert(
            "stripe-should-retry",
            HeaderValue::from_static(if retry { "true" } else { "false" }),
        );
    }
    if let Some(secs) = reply.retry_after {
        headers.insert("retry-after", HeaderValue::from(secs));
    }
    if reply.replayed {
        headers.insert("idempotent-replayed", HeaderValue::from_static("true"));
    }
    response
}

async fn hold(shared: &Shared, duration: Duration) {
    let mut stopping = shared.stopping.clone();
    tokio::select! {
        () = tokio::time::sleep(duration) => {}
        _ = stopping.wait_for(|stop| *stop) => {}
    }
}

fn header(headers: &HeaderMap, name: &str) -> Option<String> {
    headers
        .get(name)
        .and_then(|v| v.to_str().ok())
        .map(str::to_string)
}

/// Decodes `a=b&c=d` (application/x-www-form-urlencoded).
fn parse_form(text: &str) -> Vec<(String, String)> {
    text.split('&')
        .filter(|pair| !pair.is_empty())
        .map(|pair| {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            (percent_decode(k), percent_decode(v))
        })
        .collect()
}

/// `+` is a space, `%XX` a byte; invalid escapes stay as they are.
fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let hex = |b: u8| (b as char).to_digit(16).map(|d| d as u8);
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'+' => out.push(b' '),
            b'%' => match (
                bytes.get(i + 1).copied().and_then(hex),
                bytes.get(i + 2).copied().and_then(hex),
            ) {
                (Some(hi), Some(lo)) => {
                    out.push(hi * 16 + lo);
                    i += 2;
                }
                _ => out.push(b'%'),
            },
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn new_id() -> String {
    let random: String = rand::rng()
        .sample_iter(Alphanumeric)
        .take(ID_RANDOM_CHARS)
        .map(char::from)
        .collect();
    format!("cus_{random}")
}

fn now_secs() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64)
}

async fn admin_customers(State(shared): State<Arc<Shared>>) -> Response {
    Json(shared.store().customers.clone()).into_response()
}

async fn admin_requests(State(shared): State<Arc<Shared>>) -> Response {
    Json(shared.store().requests.clone()).into_response()
}

async fn admin_clear(State(shared): State<Arc<Shared>>) -> Response {
    let mut store = shared.store();
    store.customers.clear();
    store.requests.clear();
    store.faults.clear();
    store.saved.clear();
    Json(json!({ "ok": true })).into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn queries_parse_like_stripe_search() {
        assert_eq!(
            parse_query(r"metadata['usersync_key']:'o\'brien' AND email:'a@x'").unwrap(),
            (
                vec![
                    Clause::Metadata("usersync_key".into(), "o'brien".into()),
                    Clause::Field("email".into(), "a@x".into())
                ],
                false
            )
        );
        assert!(parse_query("email:'a' OR name:\"b\"").unwrap().1);
        for bad in [
            "email:'a' AND name:'b' OR phone:'c'",
            "plan:'x'",
            "email:a",
            "metadata:'x'",
            "email:'a",
        ] {
            assert!(parse_query(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn forms_decode() {
        assert_eq!(
            parse_form("metadata%5Bplan%5D=a+b%26c&metadata[x]=%C3%BC&e="),
            vec![
                ("metadata[plan]".to_string(), "a b&c".to_string()),
                ("metadata[x]".to_string(), "ü".to_string()),
                ("e".to_string(), String::new()),
            ]
        );
        assert_eq!(percent_decode("100%"), "100%");
        assert_eq!(percent_decode("%zz%4"), "%zz%4");
    }

    #[test]
    fn wrong_keys_are_masked_like_stripe() {
        assert_eq!(mask("sk_test_abcdefgh1234"), "sk_test_********1234");
        assert_eq!(mask("abc"), "abc");
        assert_eq!(mask("secretkey"), "*****tkey");
    }
}
