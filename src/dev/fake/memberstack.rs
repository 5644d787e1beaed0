//! A fake Memberstack admin REST API: a real HTTP server on loopback that
//! behaves like `https://admin.memberstack.com` for the member endpoints
//! usersync uses, so the Memberstack sink can be tested end to end.
//!
//! - `X-API-KEY` must match, else 401 with an error body;
//! - a token bucket of `rate_limit_per_sec` (default 25, Memberstack's
//!   documented limit) answers 429 with `Retry-After: 1` when exceeded;
//! - `GET /members` lists (cursor `after` = the last page's `endCursor`,
//!   `first`/`limit` 1..100 default 50, `order` ASC or DESC), `POST /members` creates (email and password
//!   required, email valid and unique), `GET /members/{id or url-encoded
//!   email}` answers `{"data": member}` or `{"data": null}`, `PATCH
//!   /members/{id}` merges `customFields`/`metaData` (null deletes a key) and
//!   replaces `json`, `DELETE /members/{id}`; unknown ids get 404;
//! - plans: `POST /members/{id}/add-plan` and `/remove-plan` with
//!   `{"planId": "pln_…"}` (free plans, as the admin API offers them) add
//!   and remove a plan connection (`con_…`) in the member's
//!   `planConnections`; [`FakeMemberstack::set_plan_status`] stands in for
//!   a paid plan's state changing through Stripe;
//! - Svix-signed events once given a webhook target: `member.created`,
//!   `member.updated`, `member.deleted` with the member, and
//!   `member.plan.created`, `member.plan.updated`, `member.plan.canceled`
//!   with `{id, planConnection}` (the names of Memberstack's webhook docs;
//!   another page says `member.plan.added`), stamped in milliseconds that
//!   never repeat unless [`FakeMemberstack::pin_event_time`] fixes them;
//! - answers are wrapped in `{"data": …}`, ids are `mem_…`, errors are
//!   `{"code": "…", "message": "…"}`; there are no idempotency keys;
//! - faults ([`Fault`]), a standing latency and late answers
//!   ([`FakeMemberstack::delay_answers`]) can be injected; every API
//!   request is recorded, and `GET /_fake/members` / `GET /_fake/requests`
//!   show the state to another process.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use axum::body::to_bytes;
use axum::extract::{Request, State};
use axum::http::header::RETRY_AFTER;
use axum::http::{HeaderValue, Method, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use rand::Rng;
use serde_json::{json, Map, Value};
use tokio::sync::watch;

use super::webhooks::{svix_message_id, Webhooks};
use super::{Fault, Server};

const MAX_BODY_BYTES: usize = 1024 * 1024;
/// How long a timeout fault holds a request.
const TIMEOUT_HOLD: Duration = Duration::from_secs(60);
const MIN_PASSWORD_LEN: usize = 8;
const DEFAULT_LIMIT: usize = 50;
const MAX_LIMIT: usize = 100;

#[derive(Debug, Clone)]
pub struct FakeMemberstackOptions {
    /// 0 lets the OS pick a free port.
    pub port: u16,
    /// The only key accepted in `X-API-KEY`.
    pub api_key: String,
    /// Added to every API request.
    pub latency: Duration,
    /// Requests per second before 429; 0 for no limit.
    pub rate_limit_per_sec: u32,
}

impl Default for FakeMemberstackOptions {
    fn default() -> Self {
        FakeMemberstackOptions {
            port: 0,
            api_key: "sk_sb_fake_key".into(),
            latency: Duration::ZERO,
            rate_limit_per_sec: 25,
        }
    }
}

/// A member as the fake stores it.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct FakeMember {
    /// `mem_…`
    pub id: String,
    pub email: String,
    pub custom_fields: Map<String, Value>,
    pub meta_data: Map<String, Value>,
    pub json: Map<String, Value>,
    /// Deleted members are kept so tests can tell "deleted" from "never made".
    pub deleted: bool,
    /// Index in [`FakeMemberstack::requests`] of the POST that created it.
    pub created_by_request: usize,
    /// Number of PATCHes applied.
    pub updates: u32,
    /// Length of the password it was created with (the password itself is
    /// only in the recorded POST body).
    pub password_len: usize,
    /// `{id, active, status, planId, type, payment}` as the API shows them.
    pub plan_connections: Vec<Value>,
}

impl FakeMember {
    /// `metaData.usersync_key` as text, if set.
    pub fn usersync_key(&self) -> Option<String> {
        match self.meta_data.get("usersync_key")? {
            Value::String(s) => Some(s.clone()),
            Value::Null => None,
            other => Some(other.to_string()),
        }
    }

    fn api_json(&self, with_json: bool) -> Value {
        let mut v = json!({
            "id": self.id,
            "auth": { "email": self.email },
            "verified": false,
            "customFields": self.custom_fields,
            "metaData": self.meta_data,
            "loginRedirect": null,
            "permissions": [],
            "planConnections": self.plan_connections,
            "stripeCustomerId": null,
            "profileImage": null,
        });
        if with_json {
            v["json"] = Value::Object(self.json.clone());
        }
        v
    }
}

/// One API request as the fake saw it (admin `/_fake/*` requests excluded).
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct MemberstackRequest {
    pub method: String,
    /// The raw path, still percent-encoded.
    pub path: String,
    pub query: Option<String>,
    /// Whether `X-API-KEY` matched.
    pub authenticated: bool,
    /// The request body as JSON, or null.
    pub body: Value,
    pub status: u16,
    pub response: Value,
    /// Arrival time, milliseconds since the Unix epoch.
    pub received_at_ms: u128,
}

struct Bucket {
    per_sec: u32,
    tokens: f64,
    at: Instant,
}

impl Bucket {
    fn new(per_sec: u32) -> Self {
        Bucket {
            per_sec,
            tokens: f64::from(per_sec),
            at: Instant::now(),
        }
    }

    /// Takes a token; `false` when the limit is exceeded.
    fn take(&mut self) -> bool {
        if self.per_sec == 0 {
            return true;
        }
        let now = Instant::now();
        let cap = f64::from(self.per_sec);
        self.tokens = (self.tokens + now.duration_since(self.at).as_secs_f64() * cap).min(cap);
        self.at = now;
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

struct Store {
    members: Vec<FakeMember>,
    requests: Vec<MemberstackRequest>,
    faults: VecDeque<Fault>,
    latency: Duration,
    bucket: Bucket,
    /// Where `member.*` events go (Svix-signed), when configured.
    webhooks: Webhooks,
    /// The last event timestamp handed out, in ms: never repeats.
    clock_ms: i64,
    /// Events are stamped with this instead (ties on purpose).
    pinned_ms: Option<i64>,
    /// (method, remaining count, delay): answers held after processing.
    delays: Vec<(String, u32, Duration)>,
}

/// What the next request suffers, off the fault queue.
enum Active {
    Status(u16),
    RateLimit(u64),
    Timeout,
}

impl Store {
    fn take_delay(&mut self, method: &str) -> Option<Duration> {
        let slot = self
            .delays
            .iter_mut()
            .find(|(m, n, _)| m.eq_ignore_ascii_case(method) && *n > 0)?;
        slot.1 -= 1;
        let d = slot.2;
        self.delays.retain(|(_, n, _)| *n > 0);
        Some(d)
    }

    fn take_fault(&mut self) -> Option<Active> {
        loop {
            let front = self.faults.front_mut()?;
            let (count, active) = match front {
                Fault::Status { status, count } => (count, Active::Status(*status)),
                Fault::RateLimit {
                    retry_after_secs,
                    count,
                } => (count, Active::RateLimit(*retry_after_secs)),
                Fault::Timeout { count } => (count, Active::Timeout),
            };
            if *count == 0 {
                self.faults.pop_front();
                continue;
            }
            *count -= 1;
            if *count == 0 {
                self.faults.pop_front();
            }
            return Some(active);
        }
    }

    /// Queues the webhook Memberstack sends (through Svix) for a change that
    /// succeeded: `{event, timestamp, payload}` with the member as the API
    /// shows it; a no-op without a target.
    fn emit(&mut self, method: &Method, answer: &Value) {
        if !self.webhooks.is_configured() {
            return;
        }
        let event = match *method {
            Method::POST => "member.created",
            Method::PATCH => "member.updated",
            Method::DELETE => "member.deleted",
            _ => return,
        };
        let Some(id) = answer.pointer("/data/id").and_then(Value::as_str) else {
            return;
        };
        let Some(member) = self.members.iter().rev().find(|m| m.id == id) else {
            return;
        };
        let payload = member.api_json(true);
        self.send_event(event, payload);
    }

    fn send_event(&mut self, event: &str, payload: Value) {
        if !self.webhooks.is_configured() {
            return;
        }
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX));
        self.clock_ms = now.max(self.clock_ms + 1);
        let at = self.pinned_ms.unwrap_or(self.clock_ms);
        let body = json!({ "event": event, "timestamp": at, "payload": payload });
        self.webhooks
            .send(svix_message_id(), event, body.to_string().into_bytes());
    }

    /// `POST /members/{id}/add-plan`: a FREE plan connection, active.
    fn add_plan(&mut self, id: &str, body: &Value) -> Reply {
        let Some(plan) = body
            .get("planId")
            .and_then(Value::as_str)
            .filter(|p| p.starts_with("pln_"))
            .map(str::to_string)
        else {
            return Reply::error(400, "invalid-request", "planId is required.");
        };
        let Some(member) = self.by_id_mut(id) else {
            return member_not_found();
        };
        let connection = json!({
            "id": format!("con_{}", super::webhooks::random_alnum(25).to_lowercase()),
            "active": true,
            "status": "ACTIVE",
            "planId": plan,
            "type": "FREE",
            "payment": null,
        });
        member.plan_connections.push(connection.clone());
        let (member_id, answer) = (member.id.clone(), member.api_json(true));
        self.send_event(
            "member.plan.created",
            json!({"id": member_id, "planConnection": connection}),
        );
        Reply::ok(json!({ "data": answer }))
    }

    /// `POST /members/{id}/remove-plan`: the connection goes; its last
    /// state (`CANCELED`) is what the event carries.
    fn remove_plan(&mut self, id: &str, body: &Value) -> Reply {
        let plan = body
            .get("planId")
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_string();
        let Some(member) = self.by_id_mut(id) else {
            return member_not_found();
        };
        let Some(i) = member
            .plan_connections
            .iter()
            .position(|c| c.get("planId").and_then(Value::as_str) == Some(plan.as_str()))
        else {
            return Reply::error(404, "not-found", "The member does not have this plan.");
        };
        let mut connection = member.plan_connections.remove(i);
        connection["status"] = json!("CANCELED");
        connection["active"] = json!(false);
        let (member_id, answer) = (member.id.clone(), member.api_json(true));
        self.send_event(
            "member.plan.canceled",
            json!({"id": member_id, "planConnection": connection}),
        );
        Reply::ok(json!({ "data": answer }))
    }

    fn live(&self) -> impl Iterator<Item = &FakeMember> {
        self.members.iter().filter(|m| !m.deleted)
    }

    fn by_id_mut(&mut self, id: &str) -> Option<&mut FakeMember> {
        self.members.iter_mut().find(|m| !m.deleted && m.id == id)
    }

    fn by_email(&self, email: &str) -> Option<&FakeMember> {
        self.live().find(|m| m.email.eq_ignore_ascii_case(email))
    }

    fn email_taken(&self, email: &str, except: Option<&str>) -> bool {
        self.live()
            .any(|m| m.email.eq_ignore_ascii_case(email) && Some(m.id.as_str()) != except)
    }

    fn list(&self, query: Option<&str>) -> Reply {
        let param = |name: &str| {
            query.and_then(|q| {
                q.split('&')
                    .filter_map(|kv| kv.split_once('='))
                    .find(|(k, _)| *k == name)
                    .map(|(_, v)| v.to_string())
            })
        };
        let limit = param("first")
            .or_else(|| param("limit"))
            .and_then(|v| v.parse::<usize>().ok())
            .unwrap_or(DEFAULT_LIMIT)
            .clamp(1, MAX_LIMIT);
        let after = param("after")
            .and_then(|v| v.parse::<usize>().ok())
            .unwrap_or(0);
        let with_json = param("includeJSON").as_deref() == Some("true");
        // The cursor is a member's creation number; DESC walks it downwards,
        // so `after` means "older than" there.
        let descending = param("order").is_some_and(|o| o.eq_ignore_ascii_case("DESC"));
        let mut live: Vec<(usize, &FakeMember)> = self
            .members
            .iter()
            .enumerate()
            .filter(|(_, m)| !m.deleted)
            .map(|(i, m)| (i + 1, m))
            .collect();
        if descending {
            live.reverse();
        }
        let beyond = |c: usize, cursor: usize| {
            if descending {
                cursor == 0 || c < cursor
            } else {
                c > cursor
            }
        };
        let page: Vec<&(usize, &FakeMember)> = live
            .iter()
            .filter(|(c, _)| beyond(*c, after))
            .take(limit)
            .collect();
        let end = page.last().map(|(c, _)| *c).unwrap_or(after);
        Reply::ok(json!({
            "totalCount": live.len(),
            "endCursor": end,
            "hasNextPage": page.len() == limit && live.iter().any(|(c, _)| beyond(*c, end)),
            "data": page.iter().map(|(_, m)| m.api_json(with_json)).collect::<Vec<_>>(),
        }))
    }

    fn create(&mut self, body: &Value, request_index: usize) -> Reply {
        let Some(body) = body.as_object() else {
            return Reply::error(
                400,
                "invalid-request",
                "The request body must be a JSON object.",
            );
        };
        let email = match body.get("email") {
            Some(Value::String(e)) if !e.trim().is_empty() => e.trim().to_string(),
            _ => return Reply::error(400, "email-required", "An email is required."),
        };
        let password = match body.get("password") {
            Some(Value::String(p)) if !p.is_empty() => p,
            _ => return Reply::error(400, "password-required", "A password is required."),
        };
        if !valid_email(&email) {
            return invalid_email();
        }
        if password.chars().count() < MIN_PASSWORD_LEN {
            return Reply::error(
                400,
                "invalid-password",
                "The password must be at least 8 characters long.",
            );
        }
        if self.email_taken(&email, None) {
            return email_in_use();
        }
        let objects = match objects_of(body) {
            Ok(o) => o,
            Err(reply) => return reply,
        };
        let [custom_fields, meta_data, json] = objects.map(|o| {
            o.map(|m| m.into_iter().filter(|(_, v)| !v.is_null()).collect())
                .unwrap_or_default()
        });
        let member = FakeMember {
            id: new_member_id(),
            email,
            custom_fields,
            meta_data,
            json,
            deleted: false,
            created_by_request: request_index,
            updates: 0,
            password_len: password.chars().count(),
            plan_connections: Vec::new(),
        };
        let reply = Reply::new(201, json!({ "data": member.api_json(true) }));
        self.members.push(member);
        reply
    }

    fn get(&self, id_or_email: &str) -> Reply {
        let found = if id_or_email.starts_with("mem_") {
            self.live().find(|m| m.id == id_or_email)
        } else {
            self.by_email(id_or_email)
        };
        Reply::ok(json!({ "data": found.map(|m| m.api_json(true)) }))
    }

    fn update(&mut self, id: &str, body: &Value) -> Reply {
        let Some(body) = body.as_object() else {
            return Reply::error(
                400,
                "invalid-request",
                "The request body must be a JSON object.",
            );
        };
        if self.by_id_mut(id).is_none() {
            return member_not_found();
        }
        let email = match body.get("email") {
            None => None,
            Some(Value::String(e)) if valid_email(e.trim()) => Some(e.trim().to_string()),
            Some(_) => return invalid_email(),
        };
        if let Some(e) = &email {
            if self.email_taken(e, Some(id)) {
                return email_in_use();
            }
        }
        let [custom_fields, meta_data, json] = match objects_of(body) {
            Ok(o) => o,
            Err(reply) => return reply,
        };
        let Some(member) = self.by_id_mut(id) else {
            return member_not_found();
        };
        if let Some(e) = email {
            member.email = e;
        }
        merge(&mut member.custom_fields, custom_fields);
        merge(&mut member.meta_data, meta_data);
        if let Some(json) = json {
            member.json = json;
        }
        member.updates += 1;
        Reply::ok(json!({ "data": member.api_json(true) }))
    }

    fn delete(&mut self, id: &str) -> Reply {
        match self.by_id_mut(id) {
            Some(member) => {
                member.deleted = true;
                Reply::ok(json!({ "data": { "id": member.id } }))
            }
            None => member_not_found(),
        }
    }
}

/// `customFields`, `metaData`, `json` of a body: each absent or an object.
type Objects = [Option<Map<String, Value>>; 3];

fn objects_of(body: &Map<String, Value>) -> Result<Objects, Reply> {
    let mut out: Objects = [None, None, None];
    for (slot, name) in out.iter_mut().zip(["customFields", "metaData", "json"]) {
        match body.get(name) {
            None | Some(Value::Null) => {}
            Some(Value::Object(o)) => *slot = Some(o.clone()),
            Some(_) => {
                return Err(Reply::error(
                    400,
                    "invalid-request",
                    format!("{name} must be an object."),
                ))
            }
        }
    }
    Ok(out)
}

/// Shallow merge; a null value deletes the key.
fn merge(target: &mut Map<String, Value>, patch: Option<Map<String, Value>>) {
    for (k, v) in patch.into_iter().flatten() {
        if v.is_null() {
            target.remove(&k);
        } else {
            target.insert(k, v);
        }
    }
}

fn valid_email(e: &str) -> bool {
    match e.split_once('@') {
        Some((local, domain)) => {
            !local.is_empty() && !domain.is_empty() && !domain.contains('@') && !e.contains(' ')
        }
        None => false,
    }
}

fn invalid_email() -> Reply {
    Reply::error(
        400,
        "invalid-email",
        "Please provide a valid email address.",
    )
}

fn email_in_use() -> Reply {
    Reply::error(
        400,
        "email-already-in-use",
        "The email address is already in use by another member.",
    )
}

fn member_not_found() -> Reply {
    Reply::error(404, "member-not-found", "Member not found.")
}

fn new_member_id() -> String {
    const CHARS: &[u8] = b"abcdefghijklmnopqrstuvwxyz0123456789";
    let mut rng = rand::rng();
    let tail: String = (0..25)
        .map(|_| CHARS[rng.random_range(0..CHARS.len())] as char)
        .collect();
    format!("mem_{tail}")
}

#[derive(Debug, Clone)]
struct Reply {
    status: u16,
    body: Value,
    retry_after: Option<u64>,
}

impl Reply {
    fn new(status: u16, body: Value) -> Self {
        Reply {
            status,
            body,
            retry_after: None,
        }
    }

    fn ok(body: Value) -> Self {
        Self::new(200, body)
    }

    fn error(status: u16, code: &str, message: impl Into<String>) -> Self {
        Self::new(status, json!({ "code": code, "message": message.into() }))
    }
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

/// A running fake Memberstack. Dropping it stops the server too.
pub struct FakeMemberstack {
    shared: Arc<Shared>,
    server: Server,
    webhooks: Webhooks,
}

impl FakeMemberstack {
    /// Binds 127.0.0.1 and serves in the background.
    pub async fn start(opts: FakeMemberstackOptions) -> std::io::Result<FakeMemberstack> {
        let bound = Server::bind(opts.port).await?;
        let webhooks = Webhooks::default();
        let shared = Arc::new(Shared {
            store: Mutex::new(Store {
                members: Vec::new(),
                requests: Vec::new(),
                faults: VecDeque::new(),
                latency: opts.latency,
                bucket: Bucket::new(opts.rate_limit_per_sec),
                webhooks: webhooks.clone(),
                clock_ms: 0,
                pinned_ms: None,
                delays: Vec::new(),
            }),
            api_key: opts.api_key,
            stopping: bound.stopping(),
        });
        let app = Router::new()
            .route("/_fake/members", get(admin_members))
            .route("/_fake/requests", get(admin_requests))
            .fallback(api)
            .with_state(Arc::clone(&shared));
        let server = bound.serve(app, "fake Memberstack")?;
        Ok(FakeMemberstack {
            shared,
            server,
            webhooks,
        })
    }

    /// The Svix-signed `member.created/updated/deleted` webhooks this fake
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

    /// All members, deleted ones included, in creation order.
    pub fn members(&self) -> Vec<FakeMember> {
        self.shared.store().members.clone()
    }

    /// Live members carrying this row key in `metaData.usersync_key`.
    pub fn live_members_with_key(&self, key: &str) -> Vec<FakeMember> {
        self.shared
            .store()
            .live()
            .filter(|m| m.usersync_key().as_deref() == Some(key))
            .cloned()
            .collect()
    }

    /// Adds a member directly (as if made in the dashboard), unrecorded.
    pub fn insert_member(
        &self,
        email: &str,
        custom_fields: Map<String, Value>,
        meta_data: Map<String, Value>,
    ) -> FakeMember {
        let member = FakeMember {
            id: new_member_id(),
            email: email.to_string(),
            custom_fields,
            meta_data,
            json: Map::new(),
            deleted: false,
            created_by_request: usize::MAX,
            updates: 0,
            password_len: 0,
            plan_connections: Vec::new(),
        };
        self.shared.store().members.push(member.clone());
        member
    }

    /// Every API request, in the order they were answered (a request held by
    /// a timeout fault is recorded on arrival).
    pub fn requests(&self) -> Vec<MemberstackRequest> {
        self.shared.store().requests.clone()
    }

    pub fn inject(&self, fault: Fault) {
        self.shared.store().faults.push_back(fault);
    }

    /// Changes a live member as a dashboard edit would (unrecorded); false
    /// when there is none with this id.
    pub fn edit_member(&self, id: &str, edit: impl FnOnce(&mut FakeMember)) -> bool {
        match self.shared.store().by_id_mut(id) {
            Some(m) => {
                edit(m);
                true
            }
            None => false,
        }
    }

    /// Stamps every later event with this millisecond (`None`: the
    /// clock's), so a test can make events tie.
    pub fn pin_event_time(&self, ms: Option<i64>) {
        self.shared.store().pinned_ms = ms;
    }

    /// A paid plan's connection changing state (as Stripe billing makes
    /// it, outside the admin API): sets `status` (and `active` for
    /// `ACTIVE`/`TRIALING`) and sends `member.plan.updated`. False when the
    /// member has no such connection.
    pub fn set_plan_status(&self, member: &str, connection: &str, status: &str) -> bool {
        let mut store = self.shared.store();
        let Some(m) = store.by_id_mut(member) else {
            return false;
        };
        let Some(c) = m
            .plan_connections
            .iter_mut()
            .find(|c| c.get("id").and_then(Value::as_str) == Some(connection))
        else {
            return false;
        };
        c["status"] = json!(status);
        c["active"] = json!(matches!(status, "ACTIVE" | "TRIALING"));
        let payload = json!({"id": member, "planConnection": c.clone()});
        store.send_event("member.plan.updated", payload);
        true
    }

    /// Switches the rate limit: requests per second, 0 for none.
    pub fn set_rate_limit(&self, per_sec: u32) {
        self.shared.store().bucket = Bucket::new(per_sec);
    }

    pub fn set_latency(&self, d: Duration) {
        self.shared.store().latency = d;
    }

    /// The next `count` requests with `method` take effect and are recorded
    /// at once, but their answer is held for `delay`: an answer lost or late
    /// on the way back (the sender times out or crashes meanwhile).
    pub fn delay_answers(&self, method: &str, count: u32, delay: Duration) {
        self.shared
            .store()
            .delays
            .push((method.to_ascii_uppercase(), count, delay));
    }

    /// Forgets members, recorded requests and queued faults.
    pub fn clear(&self) {
        let mut store = self.shared.store();
        store.members.clear();
        store.requests.clear();
        store.faults.clear();
        store.delays.clear();
    }

    /// Stops the server, releasing held requests, and waits briefly.
    pub async fn shutdown(self) {
        self.server.shutdown("fake Memberstack").await;
    }
}

async fn api(State(shared): State<Arc<Shared>>, request: Request) -> Response {
    let received_at_ms = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis());
    let (parts, body) = request.into_parts();
    let authenticated = parts
        .headers
        .get("x-api-key")
        .and_then(|v| v.to_str().ok())
        .is_some_and(|k| k == shared.api_key);
    let bytes = to_bytes(body, MAX_BODY_BYTES).await.unwrap_or_default();
    let parsed = serde_json::from_slice::<Value>(&bytes).ok();
    let mut record = MemberstackRequest {
        method: parts.method.to_string(),
        path: parts.uri.path().to_string(),
        query: parts.uri.query().map(str::to_string),
        authenticated,
        body: parsed.clone().unwrap_or(Value::Null),
        status: 0,
        response: Value::Null,
        received_at_ms,
    };
    // The limiter counts arrivals, before any latency.
    let limited = !shared.store().bucket.take();
    let latency = shared.store().latency;
    if !latency.is_zero() {
        hold(&shared, latency).await;
    }
    if limited {
        let mut reply = Reply::error(429, "rate-limited", "Too many requests.");
        reply.retry_after = Some(1);
        return finish(&shared, record, reply);
    }
    let fault = shared.store().take_fault();
    match fault {
        None => {}
        Some(Active::Status(status)) => {
            let status = if (200..=599).contains(&status) {
                status
            } else {
                500
            };
            let reply = Reply::error(
                status,
                "injected-fault",
                format!("Injected fault: status {status}."),
            );
            return finish(&shared, record, reply);
        }
        Some(Active::RateLimit(secs)) => {
            let mut reply = Reply::error(429, "rate-limited", "Too many requests.");
            reply.retry_after = Some(secs);
            return finish(&shared, record, reply);
        }
        Some(Active::Timeout) => {
            let reply = Reply::error(504, "injected-timeout", "Injected timeout.");
            record.status = reply.status;
            record.response = reply.body.clone();
            shared.store().requests.push(record);
            hold(&shared, TIMEOUT_HOLD).await;
            return respond(reply);
        }
    }
    if !authenticated {
        let reply = Reply::error(401, "unauthorized", "Invalid or missing API key.");
        return finish(&shared, record, reply);
    }
    if !bytes.is_empty() && parsed.is_none() && matches!(parts.method, Method::POST | Method::PATCH)
    {
        let reply = Reply::error(
            400,
            "invalid-request",
            "The request body is not valid JSON.",
        );
        return finish(&shared, record, reply);
    }
    let body = parsed.unwrap_or(Value::Null);
    let path = parts.uri.path().trim_end_matches('/');
    let segment = path
        .strip_prefix("/members/")
        .filter(|s| !s.is_empty() && !s.contains('/'))
        .map(percent_decode);
    // `/members/{id}/add-plan`, `/members/{id}/remove-plan`.
    let action = path
        .strip_prefix("/members/")
        .and_then(|s| s.split_once('/'))
        .map(|(id, what)| (percent_decode(id), what.to_string()));
    // One critical section per request: lookup, effect and record.
    let (reply, delay) = {
        let mut store = shared.store();
        let index = store.requests.len();
        let reply = match (&parts.method, path, segment, action) {
            (&Method::GET, "/members", _, _) => store.list(parts.uri.query()),
            (&Method::POST, "/members", _, _) => store.create(&body, index),
            (&Method::GET, _, Some(s), _) => store.get(&s),
            (&Method::PATCH, _, Some(s), _) => store.update(&s, &body),
            (&Method::DELETE, _, Some(s), _) => store.delete(&s),
            (&Method::POST, _, None, Some((id, what))) if what == "add-plan" => {
                let reply = store.add_plan(&id, &body);
                record.status = reply.status;
                record.response = reply.body.clone();
                store.requests.push(record);
                drop(store);
                return respond(reply);
            }
            (&Method::POST, _, None, Some((id, what))) if what == "remove-plan" => {
                let reply = store.remove_plan(&id, &body);
                record.status = reply.status;
                record.response = reply.body.clone();
                store.requests.push(record);
                drop(store);
                return respond(reply);
            }
            _ => Reply::error(404, "not-found", "Not found."),
        };
        if (200..300).contains(&reply.status) {
            store.emit(&parts.method, &reply.body);
        }
        record.status = reply.status;
        record.response = reply.body.clone();
        store.requests.push(record);
        (reply, store.take_delay(parts.method.as_str()))
    };
    if let Some(d) = delay {
        hold(&shared, d).await;
    }
    respond(reply)
}

fn finish(shared: &Shared, mut record: MemberstackRequest, reply: Reply) -> Response {
    record.status = reply.status;
    record.response = reply.body.clone();
    shared.store().requests.push(record);
    respond(reply)
}

fn respond(reply: Reply) -> Response {
    let status = StatusCode::from_u16(reply.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let mut response = (status, Json(reply.body)).into_response();
    if let Some(secs) = reply.retry_after {
        response
            .headers_mut()
            .insert(RETRY_AFTER, HeaderValue::from(secs));
    }
    response
}

async fn hold(shared: &Shared, d: Duration) {
    let mut stopping = shared.stopping.clone();
    tokio::select! {
        () = tokio::time::sleep(d) => {}
        _ = stopping.wait_for(|s| *s) => {}
    }
}

fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' && i + 2 < bytes.len() {
            let hex = |b: u8| (b as char).to_digit(16);
            if let (Some(h), Some(l)) = (hex(bytes[i + 1]), hex(bytes[i + 2])) {
                out.push((h * 16 + l) as u8);
                i += 3;
                continue;
            }
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

async fn admin_members(State(shared): State<Arc<Shared>>) -> Response {
    let members = shared.store().members.clone();
    Json(members).into_response()
}

async fn admin_requests(State(shared): State<Arc<Shared>>) -> Response {
    let requests = shared.store().requests.clone();
    Json(requests).into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percent_decoding() {
        assert_eq!(percent_decode("a%40b.com"), "a@b.com");
        assert_eq!(percent_decode("a%2Bb%40x"), "a+b@x");
        assert_eq!(percent_decode("bad%4"), "bad%4");
        assert_eq!(percent_decode("%C3%BC"), "ü");
        assert_eq!(percent_decode("%aü"), "%aü");
    }

    #[test]
    fn bucket_allows_the_rate_and_refuses_more() {
        let mut b = Bucket::new(5);
        assert!((0..5).all(|_| b.take()));
        assert!(!b.take());
        assert!(Bucket::new(0).take());
    }
}
