//! A fake of Clerk's Backend API users endpoints (`https://api.clerk.com/v1`),
//! a real HTTP server on loopback answering as Clerk does, so that
//! `@clerk/backend`'s client and usersync's inbound path meet behaviour, not
//! an echo of themselves; and, once given a target, the Svix-signed
//! `user.created` / `user.updated` / `user.deleted` webhooks Clerk sends
//! for every change.
//!
//! - `Authorization: Bearer <secret key>` (`sk_test_…`/`sk_live_…`) must
//!   match, else 401 `authentication_invalid`;
//! - `POST /v1/users` (JSON: `email_address[]`, `username`, `first_name`,
//!   `last_name`, `external_id`, `password`, `public_metadata`,
//!   `private_metadata`, `unsafe_metadata`, `skip_password_checks`, …),
//!   `GET /v1/users/{id}`, `PATCH /v1/users/{id}` (metadata objects are
//!   replaced, `primary_email_address_id` must name one of the user's
//!   addresses), `DELETE /v1/users/{id}` answering
//!   `{"id","object":"user","deleted":true}`; `GET /v1/users` (a bare JSON
//!   array; `limit` 1-500 default 10, `offset`, `order_by` `±created_at` /
//!   `±updated_at` default `-created_at`, filters `email_address`,
//!   `user_id`, `external_id`, `username` repeatable, `query`) and
//!   `GET /v1/users/count` (`{"object":"total_count","total_count":n}`);
//! - ids `user_…` and `idn_…`, `created_at` / `updated_at` in milliseconds,
//!   `updated_at` strictly increasing per user;
//! - errors `{"errors":[{message,long_message,code,meta}],"clerk_trace_id"}`:
//!   404 `resource_not_found`, 422 form errors (`form_identifier_exists`,
//!   `form_param_format_invalid`, `form_param_unknown`,
//!   `form_data_missing`, `form_password_length_too_short`), 429
//!   `too_many_requests` with `Retry-After` (over the rate limit, default
//!   Clerk's 1,000 requests per 10 s, or an injected fault);
//! - every API request is recorded; `GET /_fake/users` and
//!   `GET /_fake/requests` show the state to another process.

use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::body::to_bytes;
use axum::extract::{Request, State};
use axum::http::header::RETRY_AFTER;
use axum::http::{HeaderValue, Method, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use serde_json::{json, Map, Value};
use tokio::sync::watch;

use super::webhooks::{random_alnum, svix_message_id, WebhookTarget, Webhooks};
use super::{ActiveFault, Bucket, Fault, Server};

const MAX_BODY_BYTES: usize = 1024 * 1024;
const TIMEOUT_HOLD: Duration = Duration::from_secs(60);
const DEFAULT_LIMIT: usize = 10;
const MAX_LIMIT: usize = 500;
const MIN_PASSWORD_LEN: usize = 8;

#[derive(Debug, Clone)]
pub struct FakeClerkOptions {
    /// 0 lets the OS pick a free port.
    pub port: u16,
    /// The one secret key accepted as `Authorization: Bearer …`.
    pub secret_key: String,
    /// Added to every API request.
    pub latency: Duration,
    /// Requests per second before 429; 0 for no limit. Clerk allows 1,000
    /// requests per 10 seconds per instance.
    pub rate_limit_per_sec: u32,
    /// `instance_id` in the webhook envelopes.
    pub instance_id: String,
}

impl Default for FakeClerkOptions {
    fn default() -> Self {
        FakeClerkOptions {
            port: 0,
            secret_key: "sk_test_usersyncFakeClerkKey0000000000".into(),
            latency: Duration::ZERO,
            rate_limit_per_sec: 100,
            instance_id: "ins_usersyncfakeclerk".into(),
        }
    }
}

/// One email address of a user.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct ClerkEmail {
    /// `idn_…`
    pub id: String,
    pub email_address: String,
    pub created_at: i64,
}

/// A user as the fake stores it.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct ClerkUser {
    /// `user_…`
    pub id: String,
    pub email_addresses: Vec<ClerkEmail>,
    pub primary_email_address_id: Option<String>,
    pub username: Option<String>,
    pub first_name: Option<String>,
    pub last_name: Option<String>,
    pub external_id: Option<String>,
    pub public_metadata: Map<String, Value>,
    pub private_metadata: Map<String, Value>,
    pub unsafe_metadata: Map<String, Value>,
    pub password_enabled: bool,
    pub created_at: i64,
    pub updated_at: i64,
    /// Deleted users are kept so tests can tell "deleted" from "never made".
    pub deleted: bool,
    /// Number of updates applied.
    pub updates: u32,
}

impl ClerkUser {
    /// The primary address, if any.
    pub fn primary_email(&self) -> Option<&str> {
        let primary = self.primary_email_address_id.as_deref()?;
        self.email_addresses
            .iter()
            .find(|e| e.id == primary)
            .map(|e| e.email_address.as_str())
    }

    /// The Backend API's user object.
    pub fn api_json(&self) -> Value {
        let emails: Vec<Value> = self
            .email_addresses
            .iter()
            .map(|e| {
                json!({
                    "id": e.id,
                    "object": "email_address",
                    "email_address": e.email_address,
                    "reserved": false,
                    "verification": {
                        "status": "verified",
                        "strategy": "admin",
                        "attempts": null,
                        "expire_at": null,
                    },
                    "linked_to": [],
                    "matches_sso_connection": false,
                    "created_at": e.created_at,
                    "updated_at": e.created_at,
                })
            })
            .collect();
        json!({
            "id": self.id,
            "object": "user",
            "username": self.username,
            "first_name": self.first_name,
            "last_name": self.last_name,
            "image_url": format!("https://img.clerk.com/fake/{}", self.id),
            "has_image": false,
            "primary_email_address_id": self.primary_email_address_id,
            "primary_phone_number_id": null,
            "primary_web3_wallet_id": null,
            "password_enabled": self.password_enabled,
            "two_factor_enabled": false,
            "totp_enabled": false,
            "backup_code_enabled": false,
            "email_addresses": emails,
            "phone_numbers": [],
            "web3_wallets": [],
            "passkeys": [],
            "external_accounts": [],
            "saml_accounts": [],
            "enterprise_accounts": [],
            "public_metadata": self.public_metadata,
            "private_metadata": self.private_metadata,
            "unsafe_metadata": self.unsafe_metadata,
            "external_id": self.external_id,
            "last_sign_in_at": null,
            "banned": false,
            "locked": false,
            "lockout_expires_in_seconds": null,
            "verification_attempts_remaining": 100,
            "created_at": self.created_at,
            "updated_at": self.updated_at,
            "delete_self_enabled": true,
            "create_organization_enabled": true,
            "last_active_at": null,
            "mfa_enabled_at": null,
            "mfa_disabled_at": null,
            "legal_accepted_at": null,
            "profile_image_url": format!("https://img.clerk.com/fake/{}", self.id),
        })
    }
}

/// One API request as the fake saw it (admin `/_fake/*` requests excluded).
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct ClerkRequest {
    pub method: String,
    pub path: String,
    pub query: Option<String>,
    /// Whether the bearer key matched.
    pub authenticated: bool,
    /// The request body as JSON, or null.
    pub body: Value,
    pub status: u16,
    pub response: Value,
    pub received_at_ms: u128,
}

#[derive(Debug, Clone)]
struct Reply {
    status: u16,
    body: Value,
    retry_after: Option<u64>,
}

impl Reply {
    fn ok(body: Value) -> Self {
        Reply {
            status: 200,
            body,
            retry_after: None,
        }
    }

    /// Clerk's error body; `param` goes to `meta.param_name`.
    fn error(status: u16, code: &str, message: &str, long: String, param: Option<&str>) -> Self {
        let mut error = json!({ "message": message, "long_message": long, "code": code });
        if let Some(p) = param {
            error["meta"] = json!({ "param_name": p });
        }
        Reply {
            status,
            body: json!({ "errors": [error], "clerk_trace_id": random_hex(32) }),
            retry_after: None,
        }
    }

    fn not_found() -> Self {
        Reply::error(
            404,
            "resource_not_found",
            "not found",
            "Resource not found".into(),
            None,
        )
    }

    fn invalid(param: &str, long: String) -> Self {
        Reply::error(
            422,
            "form_param_format_invalid",
            "is invalid",
            long,
            Some(param),
        )
    }

    fn unknown(param: &str) -> Self {
        Reply::error(
            422,
            "form_param_unknown",
            "is unknown",
            format!("{param} is not a valid parameter for this request."),
            Some(param),
        )
    }

    fn rate_limited(secs: u64) -> Self {
        let mut r = Reply::error(
            429,
            "too_many_requests",
            "Too many requests",
            "Too many requests, retry later".into(),
            None,
        );
        r.retry_after = Some(secs);
        r
    }
}

struct Store {
    users: Vec<ClerkUser>,
    by_id: HashMap<String, usize>,
    requests: Vec<ClerkRequest>,
    faults: VecDeque<Fault>,
    latency: Duration,
    bucket: Bucket,
    /// The last millisecond handed out: versions never repeat or go back.
    clock_ms: i64,
    instance_id: String,
    webhooks: Webhooks,
}

/// The parameters a create accepts (besides the metadata objects).
const CREATE_PARAMS: &[&str] = &[
    "email_address",
    "phone_number",
    "web3_wallet",
    "username",
    "password",
    "password_digest",
    "password_hasher",
    "first_name",
    "last_name",
    "external_id",
    "public_metadata",
    "private_metadata",
    "unsafe_metadata",
    "skip_password_checks",
    "skip_password_requirement",
    "skip_legal_checks",
    "created_at",
    "totp_secret",
    "backup_codes",
    "legal_accepted_at",
];

const UPDATE_PARAMS: &[&str] = &[
    "username",
    "password",
    "password_digest",
    "password_hasher",
    "first_name",
    "last_name",
    "external_id",
    "primary_email_address_id",
    "public_metadata",
    "private_metadata",
    "unsafe_metadata",
    "skip_password_checks",
    "sign_out_of_other_sessions",
    "notify_primary_email_address_changed",
    "created_at",
    "delete_self_enabled",
    "create_organization_enabled",
    "legal_accepted_at",
    "totp_secret",
    "backup_codes",
];

impl Store {
    fn tick(&mut self, at_least: i64) -> i64 {
        let now = now_ms().max(self.clock_ms + 1).max(at_least);
        self.clock_ms = now;
        now
    }

    fn live(&self, id: &str) -> Option<usize> {
        self.by_id
            .get(id)
            .copied()
            .filter(|&i| !self.users[i].deleted)
    }

    fn email_taken(&self, email: &str, except: Option<&str>) -> bool {
        self.users.iter().any(|u| {
            !u.deleted
                && Some(u.id.as_str()) != except
                && u.email_addresses
                    .iter()
                    .any(|e| e.email_address.eq_ignore_ascii_case(email))
        })
    }

    fn username_taken(&self, name: &str, except: Option<&str>) -> bool {
        self.users.iter().any(|u| {
            !u.deleted
                && Some(u.id.as_str()) != except
                && u.username
                    .as_deref()
                    .is_some_and(|n| n.eq_ignore_ascii_case(name))
        })
    }

    fn handle(&mut self, method: &Method, path: &str, query: Option<&str>, body: &Value) -> Reply {
        let segments: Vec<&str> = path.trim_end_matches('/').split('/').skip(1).collect();
        match (method, segments.as_slice()) {
            (&Method::GET, ["v1", "users"]) => self.list(query),
            (&Method::GET, ["v1", "users", "count"]) => self.count(query),
            (&Method::POST, ["v1", "users"]) => self.create(body),
            (&Method::GET, ["v1", "users", id]) => match self.live(id) {
                Some(i) => Reply::ok(self.users[i].api_json()),
                None => Reply::not_found(),
            },
            (&Method::PATCH, ["v1", "users", id]) => self.update(id, body),
            (&Method::DELETE, ["v1", "users", id]) => self.delete(id),
            _ => Reply::not_found(),
        }
    }

    fn create(&mut self, body: &Value) -> Reply {
        let Some(body) = body.as_object() else {
            return Reply::error(
                400,
                "malformed_request",
                "malformed request",
                "The request body is not a JSON object.".into(),
                None,
            );
        };
        if let Some(unknown) = body.keys().find(|k| !CREATE_PARAMS.contains(&k.as_str())) {
            return Reply::unknown(unknown);
        }
        let emails = match strings(body.get("email_address"), "email_address") {
            Ok(e) => e,
            Err(r) => return r,
        };
        if emails.is_empty() {
            return Reply::error(
                422,
                "form_data_missing",
                "missing data",
                "email_address must be included.".into(),
                Some("email_address"),
            );
        }
        for email in &emails {
            if !valid_email(email) {
                return Reply::invalid(
                    "email_address",
                    "email_address must be a valid email address.".into(),
                );
            }
            if self.email_taken(email, None) {
                return taken("email address", "email_address");
            }
        }
        let fields = match Fields::read(body) {
            Ok(f) => f,
            Err(r) => return r,
        };
        if let Some(Some(name)) = &fields.username {
            if self.username_taken(name, None) {
                return taken("username", "username");
            }
        }
        let now = self.tick(0);
        let email_addresses: Vec<ClerkEmail> = emails
            .into_iter()
            .map(|email_address| ClerkEmail {
                id: format!("idn_{}", random_alnum(27)),
                email_address,
                created_at: now,
            })
            .collect();
        let mut user = ClerkUser {
            id: format!("user_{}", random_alnum(27)),
            primary_email_address_id: email_addresses.first().map(|e| e.id.clone()),
            email_addresses,
            username: None,
            first_name: None,
            last_name: None,
            external_id: None,
            public_metadata: Map::new(),
            private_metadata: Map::new(),
            unsafe_metadata: Map::new(),
            password_enabled: false,
            created_at: now,
            updated_at: now,
            deleted: false,
            updates: 0,
        };
        fields.apply(&mut user);
        let out = user.api_json();
        self.by_id.insert(user.id.clone(), self.users.len());
        self.users.push(user);
        self.emit("user.created", out.clone(), now);
        Reply::ok(out)
    }

    fn update(&mut self, id: &str, body: &Value) -> Reply {
        let Some(index) = self.live(id) else {
            return Reply::not_found();
        };
        let Some(body) = body.as_object() else {
            return Reply::error(
                400,
                "malformed_request",
                "malformed request",
                "The request body is not a JSON object.".into(),
                None,
            );
        };
        if let Some(unknown) = body.keys().find(|k| !UPDATE_PARAMS.contains(&k.as_str())) {
            return Reply::unknown(unknown);
        }
        let fields = match Fields::read(body) {
            Ok(f) => f,
            Err(r) => return r,
        };
        if let Some(Some(name)) = &fields.username {
            if self.username_taken(name, Some(id)) {
                return taken("username", "username");
            }
        }
        let primary = match body.get("primary_email_address_id") {
            None | Some(Value::Null) => None,
            Some(Value::String(p)) => {
                if !self.users[index].email_addresses.iter().any(|e| &e.id == p) {
                    return Reply::invalid(
                        "primary_email_address_id",
                        format!("{p} does not match one of the user's email addresses."),
                    );
                }
                Some(p.clone())
            }
            Some(_) => {
                return Reply::invalid(
                    "primary_email_address_id",
                    "primary_email_address_id must be a string.".into(),
                )
            }
        };
        let at_least = self.users[index].updated_at + 1;
        let now = self.tick(at_least);
        let user = &mut self.users[index];
        fields.apply(user);
        if let Some(p) = primary {
            user.primary_email_address_id = Some(p);
        }
        user.updated_at = now;
        user.updates += 1;
        let out = user.api_json();
        self.emit("user.updated", out.clone(), now);
        Reply::ok(out)
    }

    fn delete(&mut self, id: &str) -> Reply {
        let Some(index) = self.live(id) else {
            return Reply::not_found();
        };
        let at_least = self.users[index].updated_at + 1;
        let now = self.tick(at_least);
        self.users[index].deleted = true;
        let out = json!({ "id": id, "object": "user", "deleted": true });
        self.emit("user.deleted", out.clone(), now);
        Reply::ok(out)
    }

    /// The users a list or count selects, in `order_by` order.
    fn select(
        &self,
        query: Option<&str>,
        counting: bool,
    ) -> Result<(Vec<&ClerkUser>, usize, usize), Reply> {
        let mut limit = DEFAULT_LIMIT;
        let mut offset = 0;
        let mut order = ("created_at", true);
        let mut emails = Vec::new();
        let mut ids = Vec::new();
        let mut external = Vec::new();
        let mut usernames = Vec::new();
        let mut text = None;
        for (k, v) in parse_query(query.unwrap_or("")) {
            // Clients send repeated keys, some with a [] suffix.
            match k.trim_end_matches("[]") {
                "limit" if !counting => match v.parse::<usize>() {
                    Ok(l) if (1..=MAX_LIMIT).contains(&l) => limit = l,
                    _ => {
                        return Err(Reply::invalid(
                            "limit",
                            format!("limit must be an integer between 1 and {MAX_LIMIT}."),
                        ))
                    }
                },
                "offset" if !counting => match v.parse::<usize>() {
                    Ok(o) => offset = o,
                    _ => {
                        return Err(Reply::invalid(
                            "offset",
                            "offset must be a non-negative integer.".into(),
                        ))
                    }
                },
                "order_by" if !counting => {
                    let (desc, field) = match v.strip_prefix('-') {
                        Some(f) => (true, f),
                        None => (false, v.strip_prefix('+').unwrap_or(&v)),
                    };
                    match field {
                        "created_at" => order = ("created_at", desc),
                        "updated_at" => order = ("updated_at", desc),
                        _ => {
                            return Err(Reply::invalid(
                                "order_by",
                                format!("order_by {v:?} is not supported; use created_at or updated_at, prefixed with + or -."),
                            ))
                        }
                    }
                }
                "email_address" => emails.push(v.to_ascii_lowercase()),
                "user_id" => ids.push(v),
                "external_id" => external.push(v),
                "username" => usernames.push(v.to_ascii_lowercase()),
                "query" => text = Some(v.to_ascii_lowercase()),
                // Filters the fake has no data for select nobody.
                "phone_number" | "web3_wallet" | "organization_id" => ids.push(String::new()),
                other => return Err(Reply::unknown(other)),
            }
        }
        let mut users: Vec<&ClerkUser> = self
            .users
            .iter()
            .filter(|u| !u.deleted)
            .filter(|u| {
                emails.is_empty()
                    || u.email_addresses
                        .iter()
                        .any(|e| emails.contains(&e.email_address.to_ascii_lowercase()))
            })
            .filter(|u| ids.is_empty() || ids.contains(&u.id))
            .filter(|u| {
                external.is_empty() || u.external_id.as_ref().is_some_and(|x| external.contains(x))
            })
            .filter(|u| {
                usernames.is_empty()
                    || u.username
                        .as_ref()
                        .is_some_and(|n| usernames.contains(&n.to_ascii_lowercase()))
            })
            .filter(|u| {
                text.as_ref().is_none_or(|t| {
                    let hay = [
                        Some(u.id.as_str()),
                        u.username.as_deref(),
                        u.first_name.as_deref(),
                        u.last_name.as_deref(),
                        u.external_id.as_deref(),
                    ];
                    hay.iter()
                        .flatten()
                        .any(|h| h.to_ascii_lowercase().contains(t.as_str()))
                        || u.email_addresses
                            .iter()
                            .any(|e| e.email_address.to_ascii_lowercase().contains(t.as_str()))
                })
            })
            .collect();
        // Creation order breaks ties, so pages never overlap.
        let key = |u: &ClerkUser| match order.0 {
            "updated_at" => u.updated_at,
            _ => u.created_at,
        };
        users.sort_by(|a, b| {
            let position = |u: &ClerkUser| self.by_id.get(&u.id).copied().unwrap_or(0);
            let ordering = key(a).cmp(&key(b)).then(position(a).cmp(&position(b)));
            if order.1 {
                ordering.reverse()
            } else {
                ordering
            }
        });
        Ok((users, limit, offset))
    }

    fn list(&self, query: Option<&str>) -> Reply {
        match self.select(query, false) {
            Ok((users, limit, offset)) => Reply::ok(Value::Array(
                users
                    .into_iter()
                    .skip(offset)
                    .take(limit)
                    .map(ClerkUser::api_json)
                    .collect(),
            )),
            Err(r) => r,
        }
    }

    fn count(&self, query: Option<&str>) -> Reply {
        match self.select(query, true) {
            Ok((users, _, _)) => {
                Reply::ok(json!({ "object": "total_count", "total_count": users.len() }))
            }
            Err(r) => r,
        }
    }

    /// Queues the webhook Clerk sends for a change (a no-op without a
    /// target): `{data, object:"event", type, timestamp, instance_id}`.
    fn emit(&self, event_type: &str, data: Value, timestamp: i64) {
        if !self.webhooks.is_configured() {
            return;
        }
        let body = json!({
            "data": data,
            "event_attributes": { "http_request": { "client_ip": "127.0.0.1", "user_agent": "usersync-fake-clerk" } },
            "instance_id": self.instance_id,
            "object": "event",
            "timestamp": timestamp,
            "type": event_type,
        });
        self.webhooks
            .send(svix_message_id(), event_type, body.to_string().into_bytes());
    }
}

/// The settable scalar and metadata fields of a create or update, read and
/// checked before anything changes. `Some(None)` clears a field.
#[derive(Default)]
struct Fields {
    username: Option<Option<String>>,
    first_name: Option<Option<String>>,
    last_name: Option<Option<String>>,
    external_id: Option<Option<String>>,
    public_metadata: Option<Map<String, Value>>,
    private_metadata: Option<Map<String, Value>>,
    unsafe_metadata: Option<Map<String, Value>>,
    password: bool,
}

impl Fields {
    fn read(body: &Map<String, Value>) -> Result<Fields, Reply> {
        let text = |name: &str| -> Result<Option<Option<String>>, Reply> {
            match body.get(name) {
                None => Ok(None),
                Some(Value::Null) => Ok(Some(None)),
                Some(Value::String(s)) if s.is_empty() => Ok(Some(None)),
                Some(Value::String(s)) if s.chars().count() <= 256 => Ok(Some(Some(s.clone()))),
                Some(_) => Err(Reply::invalid(
                    name,
                    format!("{name} must be a string of at most 256 characters."),
                )),
            }
        };
        let object = |name: &str| -> Result<Option<Map<String, Value>>, Reply> {
            match body.get(name) {
                None => Ok(None),
                Some(Value::Null) => Ok(Some(Map::new())),
                Some(Value::Object(o)) => Ok(Some(o.clone())),
                Some(_) => Err(Reply::invalid(name, format!("{name} must be an object."))),
            }
        };
        let skip_checks = body
            .get("skip_password_checks")
            .and_then(Value::as_bool)
            .unwrap_or(false);
        let password = match body.get("password") {
            None | Some(Value::Null) => false,
            Some(Value::String(p)) => {
                if p.chars().count() < MIN_PASSWORD_LEN && !skip_checks {
                    return Err(Reply::error(
                        422,
                        "form_password_length_too_short",
                        "Passwords must be 8 characters or more.",
                        "Passwords must be 8 characters or more.".into(),
                        Some("password"),
                    ));
                }
                true
            }
            Some(_) => {
                return Err(Reply::invalid(
                    "password",
                    "password must be a string.".into(),
                ))
            }
        };
        let username = text("username")?;
        if let Some(Some(u)) = &username {
            if u.len() < 4
                || !u
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
            {
                return Err(Reply::invalid(
                    "username",
                    "Usernames must be between 4 and 64 characters long and can only contain letters, numbers, '_' and '-'.".into(),
                ));
            }
        }
        Ok(Fields {
            username,
            first_name: text("first_name")?,
            last_name: text("last_name")?,
            external_id: text("external_id")?,
            public_metadata: object("public_metadata")?,
            private_metadata: object("private_metadata")?,
            unsafe_metadata: object("unsafe_metadata")?,
            password,
        })
    }

    fn apply(self, user: &mut ClerkUser) {
        if let Some(v) = self.username {
            user.username = v;
        }
        if let Some(v) = self.first_name {
            user.first_name = v;
        }
        if let Some(v) = self.last_name {
            user.last_name = v;
        }
        if let Some(v) = self.external_id {
            user.external_id = v;
        }
        if let Some(v) = self.public_metadata {
            user.public_metadata = v;
        }
        if let Some(v) = self.private_metadata {
            user.private_metadata = v;
        }
        if let Some(v) = self.unsafe_metadata {
            user.unsafe_metadata = v;
        }
        if self.password {
            user.password_enabled = true;
        }
    }
}

/// A string or an array of strings (Clerk accepts both for identifiers).
fn strings(v: Option<&Value>, name: &str) -> Result<Vec<String>, Reply> {
    match v {
        None | Some(Value::Null) => Ok(Vec::new()),
        Some(Value::String(s)) => Ok(vec![s.trim().to_string()]),
        Some(Value::Array(items)) => items
            .iter()
            .map(|i| {
                i.as_str().map(|s| s.trim().to_string()).ok_or_else(|| {
                    Reply::invalid(name, format!("{name} must be an array of strings."))
                })
            })
            .collect(),
        Some(_) => Err(Reply::invalid(
            name,
            format!("{name} must be an array of strings."),
        )),
    }
}

fn taken(what: &str, param: &str) -> Reply {
    Reply::error(
        422,
        "form_identifier_exists",
        &format!("That {what} is taken. Please try another."),
        format!("That {what} is taken. Please try another."),
        Some(param),
    )
}

fn valid_email(e: &str) -> bool {
    match e.split_once('@') {
        Some((local, domain)) => {
            !local.is_empty()
                && domain.contains('.')
                && !domain.starts_with('.')
                && !domain.ends_with('.')
                && !domain.contains('@')
                && !e.chars().any(char::is_whitespace)
        }
        None => false,
    }
}

/// `a=b&c=d` with `+` as space and `%XX` escapes.
fn parse_query(q: &str) -> Vec<(String, String)> {
    q.split('&')
        .filter(|p| !p.is_empty())
        .map(|p| {
            let (k, v) = p.split_once('=').unwrap_or((p, ""));
            (percent_decode(k), percent_decode(v))
        })
        .collect()
}

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

fn random_hex(n: usize) -> String {
    use rand::Rng;
    let mut rng = rand::rng();
    (0..n)
        .map(|_| char::from_digit(rng.random_range(0..16), 16).unwrap_or('0'))
        .collect()
}

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

struct Shared {
    store: Mutex<Store>,
    secret_key: String,
    stopping: watch::Receiver<bool>,
}

impl Shared {
    fn store(&self) -> MutexGuard<'_, Store> {
        self.store.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// A running fake Clerk. Dropping it stops the server without waiting.
pub struct FakeClerk {
    shared: Arc<Shared>,
    server: Server,
    webhooks: Webhooks,
}

impl FakeClerk {
    /// Binds 127.0.0.1 and serves in the background.
    pub async fn start(opts: FakeClerkOptions) -> std::io::Result<FakeClerk> {
        let bound = Server::bind(opts.port).await?;
        let webhooks = Webhooks::default();
        let shared = Arc::new(Shared {
            store: Mutex::new(Store {
                users: Vec::new(),
                by_id: HashMap::new(),
                requests: Vec::new(),
                faults: VecDeque::new(),
                latency: opts.latency,
                bucket: Bucket::new(opts.rate_limit_per_sec),
                clock_ms: 0,
                instance_id: opts.instance_id,
                webhooks: webhooks.clone(),
            }),
            secret_key: opts.secret_key,
            stopping: bound.stopping(),
        });
        let app = Router::new()
            .route("/_fake/users", get(admin_users))
            .route("/_fake/requests", get(admin_requests))
            .fallback(api)
            .with_state(Arc::clone(&shared));
        let server = bound.serve(app, "fake Clerk")?;
        Ok(FakeClerk {
            shared,
            server,
            webhooks,
        })
    }

    pub fn addr(&self) -> SocketAddr {
        self.server.addr()
    }

    /// The API base URL without the version (`@clerk/backend`'s `apiUrl`),
    /// no trailing slash.
    pub fn url(&self) -> String {
        format!("http://{}", self.server.addr())
    }

    /// Every user ever created, deleted ones included, oldest first.
    pub fn users(&self) -> Vec<ClerkUser> {
        self.shared.store().users.clone()
    }

    /// Every API request, in the order answered (a request held by a
    /// timeout fault is recorded on arrival).
    pub fn requests(&self) -> Vec<ClerkRequest> {
        self.shared.store().requests.clone()
    }

    pub fn inject(&self, fault: Fault) {
        self.shared.store().faults.push_back(fault);
    }

    pub fn set_rate_limit(&self, per_sec: u32) {
        self.shared.store().bucket = Bucket::new(per_sec);
    }

    pub fn set_latency(&self, d: Duration) {
        self.shared.store().latency = d;
    }

    /// The Svix-signed webhooks this fake sends: give it a target with
    /// [`Webhooks::set_target`], steer it with faults, read the attempts.
    pub fn webhooks(&self) -> &Webhooks {
        &self.webhooks
    }

    /// Sends `user.*` webhooks to `url`, signed with `secret` (`whsec_…`),
    /// retried on Svix's schedule times `compress`.
    pub fn send_webhooks_to(
        &self,
        url: &str,
        secret: &str,
        compress: f64,
    ) -> Result<(), crate::core::inbound::InboundSecretError> {
        let target = WebhookTarget::svix(url, secret)?.compressed(compress);
        self.webhooks.set_target(Some(target));
        Ok(())
    }

    /// Stops serving, releases held requests, waits briefly.
    pub async fn shutdown(self) {
        self.server.shutdown("fake Clerk").await;
    }
}

async fn api(State(shared): State<Arc<Shared>>, request: Request) -> Response {
    let received_at_ms = super::webhooks::now_ms();
    let (parts, body) = request.into_parts();
    let authenticated = parts
        .headers
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .and_then(|h| h.strip_prefix("Bearer "))
        .is_some_and(|k| k.trim() == shared.secret_key);
    let bytes = to_bytes(body, MAX_BODY_BYTES).await.unwrap_or_default();
    let parsed = serde_json::from_slice::<Value>(&bytes).ok();
    let mut record = ClerkRequest {
        method: parts.method.to_string(),
        path: parts.uri.path().to_string(),
        query: parts.uri.query().map(str::to_string),
        authenticated,
        body: parsed.clone().unwrap_or(Value::Null),
        status: 0,
        response: Value::Null,
        received_at_ms,
    };
    if !authenticated {
        let reply = Reply::error(
            401,
            "authentication_invalid",
            "Invalid authentication",
            "Unable to authenticate the request, you need to supply an active secret key as Authorization: Bearer sk_…".into(),
            None,
        );
        return finish(&shared, record, reply);
    }
    let limited = !shared.store().bucket.take();
    if limited {
        return finish(&shared, record, Reply::rate_limited(1));
    }
    let latency = shared.store().latency;
    if !latency.is_zero() {
        hold(&shared, latency).await;
    }
    let fault = super::take_fault(&mut shared.store().faults);
    match fault {
        None => {}
        Some(ActiveFault::Status(status)) => {
            let status = if (400..=599).contains(&status) {
                status
            } else {
                500
            };
            let reply = if status == 429 {
                Reply::rate_limited(1)
            } else {
                Reply::error(
                    status,
                    "internal_clerk_error",
                    "Oops, an unexpected error occurred",
                    format!("Injected fault: status {status}."),
                    None,
                )
            };
            return finish(&shared, record, reply);
        }
        Some(ActiveFault::RateLimit(secs)) => {
            return finish(&shared, record, Reply::rate_limited(secs))
        }
        Some(ActiveFault::Timeout) => {
            let reply = Reply::error(
                504,
                "internal_clerk_error",
                "timeout",
                "Injected timeout.".into(),
                None,
            );
            record.status = reply.status;
            record.response = reply.body.clone();
            shared.store().requests.push(record);
            hold(&shared, TIMEOUT_HOLD).await;
            return respond(reply);
        }
    }
    if !bytes.is_empty() && parsed.is_none() {
        let reply = Reply::error(
            400,
            "malformed_request",
            "malformed request",
            "The request body is not valid JSON.".into(),
            None,
        );
        return finish(&shared, record, reply);
    }
    let body = parsed.unwrap_or(Value::Null);
    // One critical section: effect, webhook queued in order, record.
    let reply = {
        let mut store = shared.store();
        let reply = store.handle(&parts.method, parts.uri.path(), parts.uri.query(), &body);
        record.status = reply.status;
        record.response = reply.body.clone();
        store.requests.push(record);
        reply
    };
    respond(reply)
}

fn finish(shared: &Shared, mut record: ClerkRequest, reply: Reply) -> Response {
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

async fn admin_users(State(shared): State<Arc<Shared>>) -> Response {
    Json(shared.store().users.clone()).into_response()
}

async fn admin_requests(State(shared): State<Arc<Shared>>) -> Response {
    Json(shared.store().requests.clone()).into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn queries_decode_repeated_keys() {
        assert_eq!(
            parse_query(
                "email_address=a%40x.io&email_address%5B%5D=b%2Bc%40x.io&order_by=-created_at"
            ),
            vec![
                ("email_address".to_string(), "a@x.io".to_string()),
                ("email_address[]".to_string(), "b+c@x.io".to_string()),
                ("order_by".to_string(), "-created_at".to_string()),
            ]
        );
    }

    #[test]
    fn emails_are_checked_like_a_form() {
        assert!(valid_email("a@x.io"));
        for bad in ["a", "a@x", "@x.io", "a b@x.io", "a@x.io@y.io"] {
            assert!(!valid_email(bad), "{bad}");
        }
    }
}
