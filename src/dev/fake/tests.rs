//! Tests of the fake service over real HTTP on loopback, the way the daemon
//! and out-of-process tools talk to it.

use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde_json::{json, Value};

use super::{FakeOptions, FakeService, Fault};
use crate::core::signature::WebhookSecret;

struct Answer {
    status: u16,
    body: Value,
    retry_after: Option<String>,
}

/// A minimal webhook sender: signs like the daemon does, with the current
/// time as the attempt timestamp.
struct Sender {
    http: reqwest::Client,
    url: String,
    secret: Option<WebhookSecret>,
}

fn client(timeout: Duration) -> reqwest::Client {
    // The crate builds reqwest without a default rustls provider; plain http
    // still needs one installed to build a client. Err = already installed.
    let _ = rustls::crypto::ring::default_provider().install_default();
    reqwest::Client::builder()
        .timeout(timeout)
        .build()
        .expect("reqwest client builds")
}

fn now_secs() -> i64 {
    let secs = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock after 1970")
        .as_secs();
    i64::try_from(secs).expect("timestamp fits i64")
}

async fn start(secret: Option<WebhookSecret>) -> (FakeService, Sender) {
    let service = FakeService::start(FakeOptions {
        secret: secret.clone(),
        ..FakeOptions::default()
    })
    .await
    .expect("fake service starts");
    let sender = Sender {
        http: client(Duration::from_secs(10)),
        url: service.url(),
        secret,
    };
    (service, sender)
}

impl Sender {
    async fn post(&self, webhook_id: &str, envelope: &Value) -> Answer {
        let body = serde_json::to_vec(envelope).expect("envelope serializes");
        self.post_at("", webhook_id, now_secs(), body).await
    }

    async fn post_at(&self, path: &str, webhook_id: &str, timestamp: i64, body: Vec<u8>) -> Answer {
        let mut headers = vec![
            ("content-type", "application/json".to_owned()),
            ("webhook-id", webhook_id.to_owned()),
            ("webhook-timestamp", timestamp.to_string()),
        ];
        if let Some(secret) = &self.secret {
            headers.push((
                "webhook-signature",
                secret.sign(webhook_id, timestamp, &body),
            ));
        }
        self.send_raw(reqwest::Method::POST, path, &headers, body)
            .await
            .expect("request completes")
    }

    async fn send_raw(
        &self,
        method: reqwest::Method,
        path: &str,
        headers: &[(&str, String)],
        body: Vec<u8>,
    ) -> reqwest::Result<Answer> {
        let mut request = self
            .http
            .request(method, format!("{}{path}", self.url))
            .body(body);
        for (name, value) in headers {
            request = request.header(*name, value);
        }
        answer(request.send().await?).await
    }

    async fn admin_get(&self, path: &str) -> Value {
        let response = self
            .http
            .get(format!("{}_fake/{path}", self.url))
            .send()
            .await
            .expect("admin request completes");
        assert_eq!(response.status(), 200);
        response.json().await.expect("admin answers JSON")
    }

    async fn admin_post(&self, path: &str, body: &Value) -> Answer {
        let response = self
            .http
            .post(format!("{}_fake/{path}", self.url))
            .json(body)
            .send()
            .await
            .expect("admin request completes");
        answer(response).await.expect("admin answer readable")
    }
}

async fn answer(response: reqwest::Response) -> reqwest::Result<Answer> {
    let status = response.status().as_u16();
    let retry_after = response
        .headers()
        .get("retry-after")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let bytes = response.bytes().await?;
    let body = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
    Ok(Answer {
        status,
        body,
        retry_after,
    })
}

fn envelope(kind: &str, key: Value, external_id: Option<&str>, data: Option<Value>) -> Value {
    json!({
        "id": format!("evt_{kind}_{}", rand_suffix()),
        "type": kind,
        "occurred_at": "2024-05-01T12:00:00Z",
        "table": "public.users",
        "key": key,
        "external_id": external_id,
        "data": data,
        "previous": null,
        "changed": [],
        "omitted": [],
    })
}

fn rand_suffix() -> u64 {
    rand::random()
}

fn user_id(answer: &Answer) -> String {
    answer.body["id"]
        .as_str()
        .expect("answer carries a user id")
        .to_owned()
}

#[tokio::test]
async fn create_update_delete_flow_by_external_id_and_key() {
    let (fake, tx) = start(Some(WebhookSecret::generate())).await;

    let created_event = envelope(
        "user.created",
        json!(42),
        None,
        Some(json!({"email": "a@x"})),
    );
    let created = tx.post("msg_1", &created_event).await;
    assert_eq!(created.status, 201, "{}", created.body);
    let id = user_id(&created);
    assert!(id.starts_with("usr_"), "{id}");
    assert_eq!(id.len(), 4 + 24);
    assert!(id[4..].chars().all(|c| c.is_ascii_alphanumeric()), "{id}");

    let users = fake.users();
    assert_eq!(users.len(), 1);
    assert_eq!(users[0].external_id, id);
    assert_eq!(users[0].key, json!(42));
    assert_eq!(users[0].data, json!({"email": "a@x"}));
    assert_eq!(users[0].created_by_event, created_event["id"]);
    assert_eq!(users[0].updates, 0);
    assert!(!users[0].deleted);

    let by_id = envelope(
        "user.updated",
        json!(42),
        Some(&id),
        Some(json!({"email": "b@x"})),
    );
    let updated = tx.post("msg_2", &by_id).await;
    assert_eq!(
        (updated.status, updated.body.clone()),
        (200, json!({ "id": id }))
    );

    let by_key = envelope(
        "user.updated",
        json!(42),
        None,
        Some(json!({"email": "c@x"})),
    );
    let updated = tx.post("msg_3", &by_key).await;
    assert_eq!(
        (updated.status, updated.body.clone()),
        (200, json!({ "id": id }))
    );
    let user = &fake.users()[0];
    assert_eq!(user.data, json!({"email": "c@x"}));
    assert_eq!(user.updates, 2);

    let deleted = tx
        .post(
            "msg_4",
            &envelope("user.deleted", json!(42), Some(&id), None),
        )
        .await;
    assert_eq!(
        (deleted.status, deleted.body.clone()),
        (200, json!({ "id": id, "deleted": true }))
    );
    assert!(fake.users()[0].deleted, "deleted users are kept, marked");
    assert!(fake.live_users_with_key(&json!(42)).is_empty());

    // Gone users can't be updated or deleted again.
    let late = tx.post("msg_5", &by_key).await;
    assert_eq!(
        (late.status, late.body),
        (404, json!({"error": "user not found"}))
    );
    let late = tx
        .post(
            "msg_6",
            &envelope("user.deleted", json!(42), Some(&id), None),
        )
        .await;
    assert_eq!(late.status, 404);
    let unknown = envelope("user.updated", json!(42), Some("usr_nope"), Some(json!({})));
    assert_eq!(tx.post("msg_7", &unknown).await.status, 404);

    let requests = fake.requests();
    let statuses: Vec<u16> = requests.iter().map(|r| r.status).collect();
    assert_eq!(statuses, [201, 200, 200, 200, 404, 404, 404]);
    let first = &requests[0];
    assert_eq!(first.method, "POST");
    assert_eq!(first.path, "/");
    assert_eq!(first.webhook_id.as_deref(), Some("msg_1"));
    assert!(first.webhook_timestamp.is_some());
    assert_eq!(first.signature_valid, Some(true));
    assert_eq!(first.body, created_event);
    assert_eq!(first.response, json!({ "id": id }));
    assert!(first.received_at_ms > 1_600_000_000_000);
    fake.shutdown().await;
}

#[tokio::test]
async fn string_keys_and_newest_live_user_wins_lookup_by_key() {
    let (fake, tx) = start(None).await;
    let key = json!("7f3c");
    let first = user_id(
        &tx.post(
            "a",
            &envelope("user.created", key.clone(), None, Some(json!({}))),
        )
        .await,
    );
    let second = user_id(
        &tx.post(
            "b",
            &envelope("user.created", key.clone(), None, Some(json!({}))),
        )
        .await,
    );
    assert_ne!(first, second);
    // A number key is a different key from the string that looks like it.
    assert!(fake.live_users_with_key(&json!(7)).is_empty());

    let update = envelope("user.updated", key.clone(), None, Some(json!({"n": 1})));
    assert_eq!(user_id(&tx.post("c", &update).await), second);
    let delete = envelope("user.deleted", key.clone(), None, None);
    assert_eq!(user_id(&tx.post("d", &delete).await), second);
    assert_eq!(user_id(&tx.post("e", &delete).await), first);
    assert_eq!(tx.post("f", &delete).await.status, 404);
    fake.shutdown().await;
}

#[tokio::test]
async fn lookup_by_key_follows_a_key_change() {
    let (fake, tx) = start(None).await;
    let id = user_id(
        &tx.post(
            "a",
            &envelope("user.created", json!(1), None, Some(json!({}))),
        )
        .await,
    );
    // The update names the user by external id and carries its new key.
    let rekey = envelope("user.updated", json!(2), Some(&id), Some(json!({"n": 1})));
    assert_eq!(user_id(&tx.post("b", &rekey).await), id);
    let by_old = envelope("user.updated", json!(1), None, Some(json!({})));
    assert_eq!(tx.post("c", &by_old).await.status, 404, "old key is gone");
    let by_new = envelope("user.deleted", json!(2), None, None);
    assert_eq!(user_id(&tx.post("d", &by_new).await), id);
    assert_eq!(tx.post("e", &by_new).await.status, 404);
    fake.shutdown().await;
}

#[tokio::test]
async fn same_webhook_id_is_answered_once_and_replayed() {
    let (fake, tx) = start(Some(WebhookSecret::generate())).await;
    let create = envelope("user.created", json!(1), None, Some(json!({"v": 1})));
    let first = tx.post("msg_dup", &create).await;
    assert_eq!(first.status, 201);

    // A retry is a new attempt: new timestamp, new signature, same id.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let again = tx.post("msg_dup", &create).await;
    assert_eq!((again.status, &again.body), (first.status, &first.body));
    // Even a different body under the same id changes nothing.
    let other = envelope("user.updated", json!(1), None, Some(json!({"v": 2})));
    let replayed = tx.post("msg_dup", &other).await;
    assert_eq!((replayed.status, &replayed.body), (201, &first.body));

    assert_eq!(fake.users().len(), 1);
    assert_eq!(fake.users()[0].data, json!({"v": 1}));
    let requests = fake.requests();
    assert_eq!(requests.len(), 3, "replays are recorded too");
    assert_ne!(requests[0].webhook_timestamp, requests[1].webhook_timestamp);

    // Only 2xx answers are remembered: a 404 can succeed on retry.
    let update_missing = envelope("user.updated", json!(2), None, Some(json!({})));
    assert_eq!(tx.post("msg_later", &update_missing).await.status, 404);
    tx.post(
        "msg_make2",
        &envelope("user.created", json!(2), None, Some(json!({}))),
    )
    .await;
    assert_eq!(tx.post("msg_later", &update_missing).await.status, 200);
    fake.shutdown().await;
}

#[tokio::test]
async fn distinct_webhook_ids_for_one_key_make_duplicates() {
    let (fake, tx) = start(None).await;
    let create = envelope(
        "user.created",
        json!(5),
        None,
        Some(json!({"email": "d@x"})),
    );
    let a = tx.post("msg_a", &create).await;
    let b = tx.post("msg_b", &create).await;
    assert_eq!((a.status, b.status), (201, 201));
    assert_ne!(user_id(&a), user_id(&b));
    let live = fake.live_users_with_key(&json!(5));
    assert_eq!(live.len(), 2, "the fake must expose duplicate creates");
    assert_eq!(fake.users().len(), 2);
    fake.shutdown().await;
}

#[tokio::test]
async fn bad_or_missing_signatures_are_rejected_and_recorded() {
    let secret = WebhookSecret::generate();
    let (fake, tx) = start(Some(secret.clone())).await;
    let create = envelope("user.created", json!(9), None, Some(json!({})));
    let body = serde_json::to_vec(&create).expect("serializes");
    let ts = now_secs();
    let json_type = ("content-type", "application/json".to_owned());

    let wrong_key = WebhookSecret::generate().sign("msg_x", ts, &body);
    let tampered = secret.sign("msg_x", ts, b"{}");
    let other_id = secret.sign("msg_y", ts, &body);
    for signature in [
        wrong_key,
        tampered,
        other_id,
        "v1,".to_owned(),
        "garbage".to_owned(),
    ] {
        let headers = [
            json_type.clone(),
            ("webhook-id", "msg_x".to_owned()),
            ("webhook-timestamp", ts.to_string()),
            ("webhook-signature", signature),
        ];
        let answer = tx
            .send_raw(reqwest::Method::POST, "", &headers, body.clone())
            .await
            .expect("answered");
        assert_eq!(
            (answer.status, answer.body),
            (401, json!({"error": "invalid signature"}))
        );
    }

    let good = secret.sign("msg_x", ts, &body);
    let all = [
        ("webhook-id", "msg_x".to_owned()),
        ("webhook-timestamp", ts.to_string()),
        ("webhook-signature", good),
    ];
    for missing in 0..all.len() {
        let mut headers = vec![json_type.clone()];
        headers.extend(
            all.iter()
                .enumerate()
                .filter(|(i, _)| *i != missing)
                .map(|(_, h)| h.clone()),
        );
        let answer = tx
            .send_raw(reqwest::Method::POST, "", &headers, body.clone())
            .await
            .expect("answered");
        assert_eq!(answer.status, 401, "without {}", all[missing].0);
    }
    let mut garbled = all.to_vec();
    garbled[1].1 = "soon".to_owned();
    let answer = tx
        .send_raw(reqwest::Method::POST, "", &garbled, body.clone())
        .await
        .expect("answered");
    assert_eq!(answer.status, 401);

    assert!(fake.users().is_empty());
    let requests = fake.requests();
    assert_eq!(requests.len(), 9);
    assert!(requests
        .iter()
        .all(|r| r.status == 401 && r.signature_valid == Some(false)));

    // A rejected id isn't remembered: the properly signed delivery goes in.
    assert_eq!(tx.post("msg_x", &create).await.status, 201);
    fake.shutdown().await;
}

#[tokio::test]
async fn timestamps_outside_five_minutes_are_rejected() {
    let (fake, tx) = start(Some(WebhookSecret::generate())).await;
    let create = envelope("user.created", json!(3), None, Some(json!({})));
    let body = serde_json::to_vec(&create).expect("serializes");
    let now = now_secs();
    for ts in [now - 301, now + 301, 0, i64::MIN, i64::MAX] {
        let answer = tx.post_at("", "msg_t", ts, body.clone()).await;
        assert_eq!(
            (answer.status, answer.body),
            (401, json!({"error": "timestamp outside tolerance"})),
            "timestamp {ts}"
        );
    }
    assert!(fake.users().is_empty());
    assert!(fake
        .requests()
        .iter()
        .all(|r| r.signature_valid == Some(false)));
    // Within tolerance (a delayed or slightly skewed sender) is fine.
    assert_eq!(
        tx.post_at("", "msg_t", now - 240, body.clone())
            .await
            .status,
        201
    );
    assert_eq!(tx.post_at("", "msg_u", now + 240, body).await.status, 201);
    fake.shutdown().await;
}

#[tokio::test]
async fn without_a_secret_signatures_are_not_checked_but_ids_are_required() {
    let (fake, tx) = start(None).await;
    let create = envelope("user.created", json!(4), None, Some(json!({})));
    let body = serde_json::to_vec(&create).expect("serializes");
    let headers = [
        ("content-type", "application/json".to_owned()),
        ("webhook-id", "msg_1".to_owned()),
        ("webhook-signature", "v1,whatever".to_owned()),
    ];
    let answer = tx
        .send_raw(reqwest::Method::POST, "", &headers, body.clone())
        .await
        .expect("answered");
    assert_eq!(answer.status, 201);
    let answer = tx
        .send_raw(reqwest::Method::POST, "", &headers[..1], body)
        .await
        .expect("answered");
    assert_eq!(answer.status, 400);
    assert!(fake.requests().iter().all(|r| r.signature_valid.is_none()));
    fake.shutdown().await;
}

#[tokio::test]
async fn malformed_bodies_and_unknown_types_get_400() {
    let (fake, tx) = start(Some(WebhookSecret::generate())).await;
    let not_json = tx
        .post_at("", "m1", now_secs(), b"{not json".to_vec())
        .await;
    assert_eq!(not_json.status, 400);
    assert!(not_json.body["error"]
        .as_str()
        .is_some_and(|e| e.starts_with("malformed JSON")));

    let cases = [
        envelope("user.renamed", json!(1), None, Some(json!({}))),
        envelope("user.created", json!(1), None, None),
        envelope("user.updated", json!(1), None, None),
        envelope("user.created", json!({"id": 1}), None, Some(json!({}))),
        envelope("user.created", json!(null), None, Some(json!({}))),
        envelope("user.created", json!(1), None, Some(json!([1, 2]))),
        json!({"type": "user.created", "key": 1, "data": {}}),
        json!([]),
    ];
    for (i, case) in cases.iter().enumerate() {
        let answer = tx.post(&format!("bad_{i}"), case).await;
        assert_eq!(answer.status, 400, "case {i}: {case}");
        assert!(answer.body["error"].is_string(), "case {i}");
    }
    assert!(fake.users().is_empty());
    let requests = fake.requests();
    assert_eq!(
        requests[0].body,
        Value::Null,
        "unparseable bodies record null"
    );
    assert_eq!(requests[1].body, cases[0]);
    fake.shutdown().await;
}

#[tokio::test]
async fn any_path_is_a_webhook_endpoint_but_only_for_post() {
    let (fake, tx) = start(None).await;
    let create = envelope("user.created", json!(1), None, Some(json!({})));
    let body = serde_json::to_vec(&create).expect("serializes");
    let answer = tx.post_at("hooks/users", "m1", now_secs(), body).await;
    assert_eq!(answer.status, 201);
    let get = tx
        .send_raw(reqwest::Method::GET, "", &[], Vec::new())
        .await
        .expect("answered");
    assert_eq!(get.status, 405);
    let requests = fake.requests();
    assert_eq!(requests[0].path, "/hooks/users");
    assert_eq!(
        (requests[1].method.as_str(), requests[1].status),
        ("GET", 405)
    );
    fake.shutdown().await;
}

#[tokio::test]
async fn status_faults_answer_first_and_change_nothing() {
    let (fake, tx) = start(Some(WebhookSecret::generate())).await;
    let create = envelope("user.created", json!(1), None, Some(json!({})));
    fake.inject(Fault::Status {
        status: 503,
        count: 2,
    });
    fake.inject(Fault::Status {
        status: 500,
        count: 1,
    });
    let statuses = [
        tx.post("m1", &create).await.status,
        tx.post("m1", &create).await.status,
        tx.post("m1", &create).await.status,
        tx.post("m1", &create).await.status,
    ];
    assert_eq!(statuses, [503, 503, 500, 201]);
    assert_eq!(fake.users().len(), 1);

    // Faults come before idempotency and signature checks.
    fake.inject(Fault::Status {
        status: 502,
        count: 1,
    });
    assert_eq!(tx.post("m1", &create).await.status, 502);
    fake.inject(Fault::Status {
        status: 200,
        count: 1,
    });
    let bogus = tx.post_at("", "m9", 0, b"nonsense".to_vec()).await;
    assert_eq!(bogus.status, 200, "an injected 2xx is a lost write");
    // Zero-count faults are no-ops; out-of-range statuses become 500.
    fake.inject(Fault::Status {
        status: 418,
        count: 0,
    });
    fake.inject(Fault::Status {
        status: 42,
        count: 1,
    });
    assert_eq!(tx.post("m1", &create).await.status, 500);
    assert_eq!(tx.post("m1", &create).await.status, 201);
    assert_eq!(fake.users().len(), 1);

    let requests = fake.requests();
    assert_eq!(requests.len(), 8, "injected answers are recorded");
    assert_eq!(requests[0].status, 503);
    assert_eq!(requests[0].signature_valid, Some(true));
    assert_eq!(requests[5].signature_valid, Some(false));
    fake.shutdown().await;
}

#[tokio::test]
async fn rate_limit_fault_sends_retry_after() {
    let (fake, tx) = start(None).await;
    let create = envelope("user.created", json!(1), None, Some(json!({})));
    fake.inject(Fault::RateLimit {
        retry_after_secs: 7,
        count: 1,
    });
    let limited = tx.post("m1", &create).await;
    assert_eq!(limited.status, 429);
    assert_eq!(limited.retry_after.as_deref(), Some("7"));
    assert!(limited.body["error"].is_string());
    let ok = tx.post("m1", &create).await;
    assert_eq!((ok.status, ok.retry_after), (201, None));
    assert_eq!(fake.requests()[0].status, 429);
    fake.shutdown().await;
}

#[tokio::test]
async fn timeout_fault_outlasts_the_client_timeout() {
    let (fake, tx) = start(None).await;
    let create = envelope("user.created", json!(1), None, Some(json!({})));
    let body = serde_json::to_vec(&create).expect("serializes");
    fake.inject(Fault::Timeout { count: 1 });

    let impatient = client(Duration::from_millis(200));
    let started = Instant::now();
    let result = impatient
        .post(fake.url())
        .header("content-type", "application/json")
        .header("webhook-id", "m1")
        .header("webhook-timestamp", now_secs().to_string())
        .body(body)
        .send()
        .await;
    let err = match result {
        Ok(response) => panic!("expected a timeout, got {}", response.status()),
        Err(err) => err,
    };
    assert!(err.is_timeout(), "{err}");
    assert!(started.elapsed() < Duration::from_secs(5));
    assert!(
        fake.users().is_empty(),
        "a timed-out attempt changes nothing"
    );
    let requests = fake.requests();
    assert_eq!(requests.len(), 1);
    assert_eq!(requests[0].status, 504);

    // The fault is used up: the retry goes through promptly.
    let retry = tx.post("m1", &create).await;
    assert_eq!(retry.status, 201);
    assert_eq!(fake.users().len(), 1);
    fake.shutdown().await;
}

#[tokio::test]
async fn shutdown_releases_requests_held_by_a_timeout_fault() {
    let (fake, tx) = start(None).await;
    fake.inject(Fault::Timeout { count: 1 });
    let create = envelope("user.created", json!(1), None, Some(json!({})));
    let held = tokio::spawn(async move { tx.post("m1", &create).await.status });
    let deadline = Instant::now() + Duration::from_secs(5);
    while fake.requests().is_empty() {
        assert!(Instant::now() < deadline, "held request never arrived");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let started = Instant::now();
    fake.shutdown().await;
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "{:?}",
        started.elapsed()
    );
    assert_eq!(held.await.expect("sender task"), 504);
}

#[tokio::test]
async fn latency_delays_webhooks_but_not_admin_requests() {
    let (fake, tx) = start(None).await;
    let create = envelope("user.created", json!(1), None, Some(json!({})));
    let latency = Duration::from_millis(300);
    fake.set_latency(latency);
    let started = Instant::now();
    assert_eq!(tx.post("m1", &create).await.status, 201);
    assert!(started.elapsed() >= latency, "{:?}", started.elapsed());

    let started = Instant::now();
    tx.admin_get("users").await;
    assert!(started.elapsed() < latency, "{:?}", started.elapsed());

    fake.set_latency(Duration::ZERO);
    let started = Instant::now();
    assert_eq!(tx.post("m2", &create).await.status, 201);
    assert!(started.elapsed() < latency, "{:?}", started.elapsed());
    fake.shutdown().await;
}

#[tokio::test]
async fn latency_option_applies_from_start() {
    let latency = Duration::from_millis(200);
    let fake = FakeService::start(FakeOptions {
        latency,
        ..FakeOptions::default()
    })
    .await
    .expect("starts");
    let http = client(Duration::from_secs(10));
    let started = Instant::now();
    let response = http.get(fake.url()).send().await.expect("answered");
    assert_eq!(response.status(), 405);
    assert!(started.elapsed() >= latency);
    fake.shutdown().await;
}

#[tokio::test]
async fn admin_endpoints_inspect_and_steer_the_fake() {
    let (fake, tx) = start(Some(WebhookSecret::generate())).await;
    let create = envelope(
        "user.created",
        json!(11),
        None,
        Some(json!({"email": "e@x"})),
    );
    let id = user_id(&tx.post("m1", &create).await);

    let users = tx.admin_get("users").await;
    assert_eq!(users.as_array().map(Vec::len), Some(1));
    assert_eq!(users[0]["external_id"], json!(id));
    assert_eq!(users[0]["key"], json!(11));
    assert_eq!(users[0]["deleted"], json!(false));
    let requests = tx.admin_get("requests").await;
    assert_eq!(
        requests.as_array().map(Vec::len),
        Some(1),
        "admin calls aren't recorded"
    );
    assert_eq!(requests[0]["webhook_id"], json!("m1"));
    assert_eq!(requests[0]["signature_valid"], json!(true));
    assert_eq!(requests[0]["status"], json!(201));

    let ok = json!({"ok": true});
    for fault in [
        json!({"status": 503, "count": 2}),
        json!({"rate_limit_retry_after": 2, "count": 1}),
        json!({"status": 500}),
    ] {
        let answer = tx.admin_post("faults", &fault).await;
        assert_eq!((answer.status, &answer.body), (200, &ok), "{fault}");
    }
    let update = envelope("user.updated", json!(11), Some(&id), Some(json!({})));
    let mut seen = Vec::new();
    for _ in 0..5 {
        let answer = tx.post("m2", &update).await;
        seen.push((answer.status, answer.retry_after));
    }
    assert_eq!(
        seen,
        [
            (503, None),
            (503, None),
            (429, Some("2".to_owned())),
            (500, None),
            (200, None)
        ]
    );

    assert_eq!(
        tx.admin_post("faults", &json!({"timeout_count": 1}))
            .await
            .status,
        200
    );
    let impatient = Sender {
        http: client(Duration::from_millis(200)),
        url: fake.url(),
        secret: tx.secret.clone(),
    };
    let body = serde_json::to_vec(&update).expect("serializes");
    let headers = [("webhook-id", "m3".to_owned())];
    let timed_out = impatient
        .send_raw(reqwest::Method::POST, "", &headers, body)
        .await;
    assert!(timed_out.is_err_and(|e| e.is_timeout()));

    assert_eq!(
        tx.admin_post("faults", &json!({"latency_ms": 250}))
            .await
            .status,
        200
    );
    let started = Instant::now();
    assert_eq!(tx.post("m4", &update).await.status, 200);
    assert!(started.elapsed() >= Duration::from_millis(250));
    assert_eq!(
        tx.admin_post("faults", &json!({"latency_ms": 0}))
            .await
            .status,
        200
    );

    for bad in [
        json!({}),
        json!({"status": 503, "timeout_count": 1}),
        json!({"timeout_count": 1, "count": 2}),
        json!({"latency_ms": 5, "count": 2}),
        json!({"status": "503"}),
        json!({"status": 503, "colour": "red"}),
    ] {
        let answer = tx.admin_post("faults", &bad).await;
        assert_eq!(answer.status, 400, "{bad}");
        assert!(answer.body["error"].is_string());
    }
    assert_eq!(tx.admin_post("nothing-here", &json!({})).await.status, 404);

    assert_eq!(tx.admin_post("clear", &json!({})).await.status, 200);
    assert_eq!(tx.admin_get("users").await, json!([]));
    assert_eq!(tx.admin_get("requests").await, json!([]));
    assert!(fake.users().is_empty() && fake.requests().is_empty());
    // Clearing also forgets answered webhook-ids.
    assert_eq!(tx.post("m1", &create).await.status, 201);
    fake.shutdown().await;
}

#[tokio::test]
async fn clear_forgets_users_requests_faults_and_answered_ids() {
    let (fake, tx) = start(None).await;
    let create = envelope("user.created", json!(1), None, Some(json!({})));
    let first = user_id(&tx.post("m1", &create).await);
    fake.inject(Fault::Status {
        status: 503,
        count: 5,
    });
    fake.clear();
    assert!(fake.users().is_empty() && fake.requests().is_empty());
    let again = tx.post("m1", &create).await;
    assert_eq!(again.status, 201, "no fault left, id not remembered");
    assert_ne!(user_id(&again), first);
    assert_eq!(fake.users().len(), 1);
    fake.shutdown().await;
}

#[tokio::test]
async fn dropping_the_service_stops_the_server() {
    let (fake, tx) = start(None).await;
    let url = fake.url();
    drop(fake);
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let result = tx.http.get(&url).send().await;
        if result.is_err() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "server still answering after drop"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
