//! The fake service's memory and the meaning of each event type: the user
//! store, the `webhook-id` idempotency table, the fault queue and the request
//! log. Everything here is synchronous so that a whole request's effect is
//! one critical section under the caller's mutex.

use std::collections::{HashMap, VecDeque};
use std::time::Duration;

use rand::distr::Alphanumeric;
use rand::Rng;
use serde::Deserialize;
use serde_json::{json, Map, Value};

use super::{FakeUser, Fault, RecordedRequest};

const USER_ID_PREFIX: &str = "usr_";
const USER_ID_RANDOM_CHARS: usize = 24;

/// A status and JSON body, as answered or to be replayed.
#[derive(Debug, Clone, PartialEq)]
pub(super) struct Reply {
    pub status: u16,
    pub body: Value,
}

impl Reply {
    pub fn new(status: u16, body: Value) -> Self {
        Self { status, body }
    }

    pub fn error(status: u16, message: impl Into<String>) -> Self {
        Self::new(status, json!({ "error": message.into() }))
    }

    fn is_success(&self) -> bool {
        (200..300).contains(&self.status)
    }
}

/// What the next request has to suffer, taken off the fault queue.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum ActiveFault {
    Status(u16),
    RateLimit { retry_after_secs: u64 },
    Timeout,
}

/// The envelope usersync sends. Fields the fake doesn't act on are still
/// typed so that a sender that drifts from the contract gets a 400, as it
/// would from a receiver that validates its input.
#[derive(Debug, Deserialize)]
struct Envelope {
    id: String,
    #[serde(rename = "type")]
    kind: String,
    occurred_at: String,
    table: String,
    key: Value,
    #[serde(default)]
    external_id: Option<String>,
    #[serde(default)]
    data: Option<Map<String, Value>>,
    #[serde(default, rename = "previous")]
    _previous: Option<Map<String, Value>>,
    #[serde(default, rename = "changed")]
    _changed: Vec<String>,
    #[serde(default, rename = "omitted")]
    _omitted: Vec<String>,
}

pub(super) struct Store {
    users: Vec<FakeUser>,
    requests: Vec<RecordedRequest>,
    faults: VecDeque<Fault>,
    latency: Duration,
    /// 2xx replies by `webhook-id`, replayed verbatim on a retry.
    answered: HashMap<String, Reply>,
    /// Index into `users` by external id: an update must not scan every
    /// user ever created (the benchmark's fake shares the daemon's cores).
    by_id: HashMap<String, usize>,
    /// Indexes into `users` by key (as JSON text), in creation order.
    by_key: HashMap<String, Vec<usize>>,
}

impl Store {
    pub fn new(latency: Duration) -> Self {
        Self {
            users: Vec::new(),
            requests: Vec::new(),
            faults: VecDeque::new(),
            latency,
            answered: HashMap::new(),
            by_id: HashMap::new(),
            by_key: HashMap::new(),
        }
    }

    pub fn users(&self) -> &[FakeUser] {
        &self.users
    }

    pub fn live_users_with_key(&self, key: &Value) -> Vec<FakeUser> {
        self.users
            .iter()
            .filter(|u| !u.deleted && &u.key == key)
            .cloned()
            .collect()
    }

    pub fn requests(&self) -> &[RecordedRequest] {
        &self.requests
    }

    pub fn record(&mut self, request: RecordedRequest) {
        self.requests.push(request);
    }

    pub fn inject(&mut self, fault: Fault) {
        self.faults.push_back(fault);
    }

    pub fn latency(&self) -> Duration {
        self.latency
    }

    pub fn set_latency(&mut self, latency: Duration) {
        self.latency = latency;
    }

    pub fn clear(&mut self) {
        self.users.clear();
        self.requests.clear();
        self.faults.clear();
        self.answered.clear();
        self.by_id.clear();
        self.by_key.clear();
    }

    /// Consumes one request's worth of the oldest queued fault.
    pub fn take_fault(&mut self) -> Option<ActiveFault> {
        loop {
            let front = self.faults.front_mut()?;
            let (remaining, active) = match front {
                Fault::Status { status, count } => (count, ActiveFault::Status(*status)),
                Fault::RateLimit {
                    retry_after_secs,
                    count,
                } => (
                    count,
                    ActiveFault::RateLimit {
                        retry_after_secs: *retry_after_secs,
                    },
                ),
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

    /// Applies one authenticated delivery. A `webhook-id` that already got a
    /// 2xx gets that reply again and changes nothing; failures are not
    /// remembered, so a retry after a 4xx/5xx is processed afresh.
    /// `body` is the request body parsed as JSON, or the parse error.
    pub fn deliver(&mut self, webhook_id: Option<&str>, body: Result<&Value, &str>) -> Reply {
        if let Some(previous) = webhook_id.and_then(|id| self.answered.get(id)) {
            return previous.clone();
        }
        let reply = match body.map(Envelope::deserialize) {
            Ok(Ok(envelope)) => self.apply(envelope),
            Ok(Err(err)) => Reply::error(400, format!("invalid envelope: {err}")),
            Err(err) => Reply::error(400, format!("malformed JSON: {err}")),
        };
        if let (Some(id), true) = (webhook_id, reply.is_success()) {
            self.answered.insert(id.to_owned(), reply.clone());
        }
        reply
    }

    fn apply(&mut self, envelope: Envelope) -> Reply {
        if let Some(problem) = envelope_problem(&envelope) {
            return Reply::error(400, problem);
        }
        // Like a real user service, refuse an email it cannot use: the
        // permanent, per-user error the dead-letter tests rely on.
        let bad_email = envelope
            .data
            .as_ref()
            .and_then(|d| d.get("email"))
            .and_then(|e| e.as_str())
            .is_some_and(|e| !e.contains('@'));
        if bad_email && envelope.kind != "user.deleted" {
            return Reply::error(422, "invalid email address");
        }
        match envelope.kind.as_str() {
            "user.created" => self.create(envelope),
            "user.updated" => self.update(envelope),
            "user.deleted" => self.delete(envelope),
            other => Reply::error(400, format!("unknown event type {other:?}")),
        }
    }

    /// Deliberately not deduplicated by key: a second create for the same
    /// row is the duplicate the tests are there to catch.
    fn create(&mut self, envelope: Envelope) -> Reply {
        let Some(data) = envelope.data else {
            return Reply::error(400, "user.created requires data");
        };
        let external_id = new_user_id();
        let index = self.users.len();
        self.by_id.insert(external_id.clone(), index);
        self.by_key
            .entry(envelope.key.to_string())
            .or_default()
            .push(index);
        self.users.push(FakeUser {
            external_id: external_id.clone(),
            key: envelope.key,
            data: Value::Object(data),
            deleted: false,
            created_by_event: envelope.id,
            updates: 0,
        });
        Reply::new(201, json!({ "id": external_id }))
    }

    fn update(&mut self, envelope: Envelope) -> Reply {
        let Some(data) = envelope.data else {
            return Reply::error(400, "user.updated requires data");
        };
        let Some(index) = self.find_live(envelope.external_id.as_deref(), &envelope.key) else {
            return user_not_found();
        };
        // The key is taken from the event too: a primary-key change arrives
        // as an update and later lookups by key must follow it.
        if self.users[index].key != envelope.key {
            let old = self.users[index].key.to_string();
            if let Some(list) = self.by_key.get_mut(&old) {
                list.retain(|&i| i != index);
            }
            let list = self.by_key.entry(envelope.key.to_string()).or_default();
            list.push(index);
            list.sort_unstable();
        }
        let user = &mut self.users[index];
        user.key = envelope.key;
        user.data = Value::Object(data);
        user.updates += 1;
        Reply::new(200, json!({ "id": user.external_id }))
    }

    fn delete(&mut self, envelope: Envelope) -> Reply {
        let Some(index) = self.find_live(envelope.external_id.as_deref(), &envelope.key) else {
            return user_not_found();
        };
        let user = &mut self.users[index];
        user.deleted = true;
        Reply::new(200, json!({ "id": user.external_id, "deleted": true }))
    }

    /// By external id when the sender knows it, else the newest live user
    /// with the key. Deleted users are gone as far as the API is concerned.
    fn find_live(&self, external_id: Option<&str>, key: &Value) -> Option<usize> {
        let live = |&i: &usize| !self.users[i].deleted;
        match external_id {
            Some(id) => self.by_id.get(id).copied().filter(live),
            None => self
                .by_key
                .get(&key.to_string())?
                .iter()
                .rev()
                .copied()
                .find(live),
        }
    }
}

fn envelope_problem(envelope: &Envelope) -> Option<&'static str> {
    if envelope.id.is_empty() {
        return Some("envelope id must not be empty");
    }
    if envelope.occurred_at.is_empty() {
        return Some("occurred_at must not be empty");
    }
    if envelope.table.is_empty() {
        return Some("table must not be empty");
    }
    if !(envelope.key.is_string() || envelope.key.is_number()) {
        return Some("key must be a string or a number");
    }
    None
}

fn user_not_found() -> Reply {
    Reply::error(404, "user not found")
}

fn new_user_id() -> String {
    let random: String = rand::rng()
        .sample_iter(Alphanumeric)
        .take(USER_ID_RANDOM_CHARS)
        .map(char::from)
        .collect();
    format!("{USER_ID_PREFIX}{random}")
}
