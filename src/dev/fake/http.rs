//! The fake service's HTTP surface: routing, the order in which a delivery is
//! checked (latency, injected fault, method, signature, then the store), the
//! Standard Webhooks header checks, and the `/_fake/*` admin endpoints that
//! let another process inspect and steer the fake.

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::body::{to_bytes, Bytes};
use axum::extract::{Request, State};
use axum::http::header::RETRY_AFTER;
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{any, get, post};
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::{json, Value};

use super::store::{ActiveFault, Reply};
use super::{Fault, RecordedRequest, Shared};
use crate::core::signature::WebhookSecret;

/// The spec's suggested replay window: five minutes either way.
const TIMESTAMP_TOLERANCE_SECS: u64 = 5 * 60;
/// How long a timeout fault holds a request: far beyond any sane client
/// timeout, so the sender's must fire first.
const TIMEOUT_HOLD: Duration = Duration::from_secs(60);
/// Envelopes are small; anything this big is a sender bug.
const MAX_BODY_BYTES: usize = 4 * 1024 * 1024;

const INVALID_SIGNATURE: &str = "invalid signature";
const STALE_TIMESTAMP: &str = "timestamp outside tolerance";

pub(super) fn router(shared: Arc<Shared>) -> Router {
    Router::new()
        .route("/_fake/users", get(admin_users))
        .route("/_fake/requests", get(admin_requests))
        .route("/_fake/faults", post(admin_faults))
        .route("/_fake/clear", post(admin_clear))
        .route("/_fake/{*rest}", any(admin_unknown))
        // Receivers are configured with arbitrary URLs, so every other path
        // is a webhook endpoint; the path is recorded.
        .fallback(webhook)
        .with_state(shared)
}

async fn webhook(State(shared): State<Arc<Shared>>, request: Request) -> Response {
    let received_at_ms = now_ms();
    let (parts, body) = request.into_parts();
    let webhook_id = header(&parts.headers, "webhook-id");
    let mut record = RecordedRequest {
        method: parts.method.to_string(),
        path: parts.uri.path().to_owned(),
        webhook_id: webhook_id.clone(),
        webhook_timestamp: header(&parts.headers, "webhook-timestamp"),
        webhook_signature: header(&parts.headers, "webhook-signature"),
        signature_valid: None,
        body: Value::Null,
        raw_body: Vec::new(),
        status: 0,
        response: Value::Null,
        received_at_ms,
    };

    let Ok(bytes) = to_bytes(body, MAX_BODY_BYTES).await else {
        let reply = Reply::error(413, "request body too large or unreadable");
        return finish(&shared, record, reply, None);
    };
    record.raw_body = bytes.to_vec();
    // usersync delivers json/jsonb up to 1000 levels deep; serde_json's
    // default limit (128) would refuse them here.
    let parsed = {
        use serde::Deserialize as _;
        let mut de = serde_json::Deserializer::from_slice(&bytes);
        de.disable_recursion_limit();
        Value::deserialize(&mut de)
            .and_then(|v| de.end().map(|()| v))
            .map_err(|err| err.to_string())
    };
    if let Ok(value) = &parsed {
        record.body = value.clone();
    }
    // Checked up front even when a fault will answer, so the log shows
    // whether the sender signed every attempt.
    let auth = shared
        .secret
        .as_ref()
        .map(|secret| authenticate(secret, &parts.headers, &bytes, now_secs()));
    record.signature_valid = auth.map(|result| result.is_ok());

    let latency = shared.store().latency();
    if !latency.is_zero() {
        hold(&shared, latency).await;
    }

    // Bound first: a guard in the match scrutinee would live through the
    // arms, across the await below.
    let fault = shared.store().take_fault();
    match fault {
        None => {}
        Some(ActiveFault::Status(status)) => {
            let status = answerable_status(status);
            let reply = Reply::error(status, format!("injected fault: status {status}"));
            return finish(&shared, record, reply, None);
        }
        Some(ActiveFault::RateLimit { retry_after_secs }) => {
            let reply = Reply::error(429, "rate limited");
            return finish(&shared, record, reply, Some(retry_after_secs));
        }
        Some(ActiveFault::Timeout) => {
            // Recorded on arrival: the sender gives up long before the
            // answer, and tests look for the attempt right after that.
            let reply = Reply::error(504, "injected timeout");
            record.status = reply.status;
            record.response = reply.body.clone();
            shared.store().record(record);
            hold(&shared, TIMEOUT_HOLD).await;
            return respond(reply, None);
        }
    }

    if parts.method != Method::POST {
        return finish(
            &shared,
            record,
            Reply::error(405, "method not allowed"),
            None,
        );
    }
    if let Some(Err(problem)) = auth {
        return finish(&shared, record, Reply::error(401, problem), None);
    }
    if webhook_id.is_none() {
        let reply = Reply::error(400, "missing webhook-id header");
        return finish(&shared, record, reply, None);
    }

    // One critical section for lookup, effect, idempotency entry and log, so
    // concurrent retries of one webhook-id can't both take effect.
    let reply = {
        let mut store = shared.store();
        let reply = store.deliver(
            webhook_id.as_deref(),
            parsed.as_ref().map_err(String::as_str),
        );
        record.status = reply.status;
        record.response = reply.body.clone();
        store.record(record);
        reply
    };
    respond(reply, None)
}

/// Standard Webhooks verification as a receiver does it: all three headers
/// present, timestamp within tolerance, and a matching `v1` signature.
fn authenticate(
    secret: &WebhookSecret,
    headers: &HeaderMap,
    body: &[u8],
    now_secs: i64,
) -> Result<(), &'static str> {
    let (Some(id), Some(timestamp), Some(signature)) = (
        header(headers, "webhook-id"),
        header(headers, "webhook-timestamp"),
        header(headers, "webhook-signature"),
    ) else {
        return Err(INVALID_SIGNATURE);
    };
    let Ok(timestamp) = timestamp.trim().parse::<i64>() else {
        return Err(INVALID_SIGNATURE);
    };
    if now_secs.abs_diff(timestamp) > TIMESTAMP_TOLERANCE_SECS {
        return Err(STALE_TIMESTAMP);
    }
    if secret.verify(&id, timestamp, body, &signature) {
        Ok(())
    } else {
        Err(INVALID_SIGNATURE)
    }
}

fn finish(
    shared: &Shared,
    mut record: RecordedRequest,
    reply: Reply,
    retry_after: Option<u64>,
) -> Response {
    record.status = reply.status;
    record.response = reply.body.clone();
    shared.store().record(record);
    respond(reply, retry_after)
}

fn respond(reply: Reply, retry_after_secs: Option<u64>) -> Response {
    let status = StatusCode::from_u16(reply.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let mut response = (status, Json(reply.body)).into_response();
    if let Some(secs) = retry_after_secs {
        response
            .headers_mut()
            .insert(RETRY_AFTER, HeaderValue::from(secs));
    }
    response
}

/// An injected status must be one a client can receive as a final answer.
fn answerable_status(status: u16) -> u16 {
    if (200..=599).contains(&status) {
        status
    } else {
        500
    }
}

/// Waits, but lets go at once when the service is stopping so shutdown
/// doesn't wait out held requests.
async fn hold(shared: &Shared, duration: Duration) {
    let mut stopping = shared.stopping.clone();
    tokio::select! {
        () = tokio::time::sleep(duration) => {}
        _ = stopping.wait_for(|stop| *stop) => {}
    }
}

/// A header as text; values that aren't visible ASCII count as absent.
fn header(headers: &HeaderMap, name: &str) -> Option<String> {
    headers
        .get(name)
        .and_then(|value| value.to_str().ok())
        .map(str::to_owned)
}

fn now_ms() -> u128 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis())
}

fn now_secs() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
}

async fn admin_users(State(shared): State<Arc<Shared>>) -> Response {
    let users = shared.store().users().to_vec();
    Json(users).into_response()
}

async fn admin_requests(State(shared): State<Arc<Shared>>) -> Response {
    let requests = shared.store().requests().to_vec();
    Json(requests).into_response()
}

/// One fault or setting per request, in the shapes
/// `{"status":503,"count":2}`, `{"rate_limit_retry_after":2,"count":1}`,
/// `{"timeout_count":1}` and `{"latency_ms":50}`; `count` defaults to 1.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct FaultRequest {
    status: Option<u16>,
    rate_limit_retry_after: Option<u64>,
    timeout_count: Option<u32>,
    latency_ms: Option<u64>,
    count: Option<u32>,
}

async fn admin_faults(State(shared): State<Arc<Shared>>, body: Bytes) -> Response {
    let request = match serde_json::from_slice::<FaultRequest>(&body) {
        Ok(request) => request,
        Err(err) => return admin_error(format!("invalid fault: {err}")),
    };
    let count = request.count.unwrap_or(1);
    let fault = match request {
        FaultRequest {
            status: Some(status),
            rate_limit_retry_after: None,
            timeout_count: None,
            latency_ms: None,
            ..
        } => Fault::Status { status, count },
        FaultRequest {
            status: None,
            rate_limit_retry_after: Some(retry_after_secs),
            timeout_count: None,
            latency_ms: None,
            ..
        } => Fault::RateLimit {
            retry_after_secs,
            count,
        },
        FaultRequest {
            status: None,
            rate_limit_retry_after: None,
            timeout_count: Some(count),
            latency_ms: None,
            count: None,
        } => Fault::Timeout { count },
        FaultRequest {
            status: None,
            rate_limit_retry_after: None,
            timeout_count: None,
            latency_ms: Some(ms),
            count: None,
        } => {
            shared.store().set_latency(Duration::from_millis(ms));
            return Json(json!({ "ok": true })).into_response();
        }
        _ => {
            return admin_error(
                "give exactly one of status, rate_limit_retry_after (each with an optional \
                 count), timeout_count or latency_ms"
                    .to_owned(),
            )
        }
    };
    shared.store().inject(fault);
    Json(json!({ "ok": true })).into_response()
}

async fn admin_clear(State(shared): State<Arc<Shared>>) -> Response {
    shared.store().clear();
    Json(json!({ "ok": true })).into_response()
}

async fn admin_unknown() -> Response {
    (
        StatusCode::NOT_FOUND,
        Json(json!({ "error": "unknown admin endpoint" })),
    )
        .into_response()
}

fn admin_error(message: String) -> Response {
    (StatusCode::BAD_REQUEST, Json(json!({ "error": message }))).into_response()
}
