//! The webhooks the vendor fakes send: what the fake Clerk and the fake
//! Memberstack send verifies with Svix's own libraries (`svix`,
//! `standardwebhooks`), what the fake Stripe sends with
//! `stripe.Webhook.construct_event`; a refused delivery is retried with the
//! same id; and a burst of deliveries for one user, duplicated, delayed and
//! released out of order, reaches usersync's receiver concurrently and
//! converges to the provider's newest state with nothing lost.

use std::io::Write;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};

use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::routing::post;
use serde_json::{json, Value};
use usersync::dev::fake::clerk::{FakeClerk, FakeClerkOptions};
use usersync::dev::fake::memberstack::{FakeMemberstack, FakeMemberstackOptions};
use usersync::dev::fake::stripe::{FakeStripe, FakeStripeOptions};
use usersync::dev::fake::webhooks::{DeliveryFaults, Release, WebhookTarget};

use crate::common::{install_crypto, python_with, TestDb};
use crate::inbound::{clerk_config, CLERK_SECRET, USERS_CLERK};

const SVIX_SECRET: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";
const STRIPE_SECRET: &str = "whsec_fake_stripe_endpoint_secret";
const CLERK_KEY: &str = "sk_test_fakeWebhooksClerkKey000000";
const MS_KEY: &str = "sk_sb_fake_webhooks";
const STRIPE_KEY: &str = "sk_test_fakeWebhooksStripeKey00000";

/// One delivery as received: the path's last segment, headers, body.
type Delivery = (String, Vec<(String, String)>, String);

/// A receiver that records every delivery (path, headers, body) and
/// refuses the first `fail_first` with a 503.
#[derive(Clone, Default)]
struct Recorder {
    seen: Arc<Mutex<Vec<Delivery>>>,
    fail_first: Arc<AtomicU32>,
}

async fn record(
    State(r): State<Recorder>,
    axum::extract::Path(path): axum::extract::Path<String>,
    headers: HeaderMap,
    body: String,
) -> StatusCode {
    let headers = headers
        .iter()
        .filter_map(|(k, v)| Some((k.as_str().to_string(), v.to_str().ok()?.to_string())))
        .collect();
    r.seen.lock().expect("lock").push((path, headers, body));
    let refuse = r
        .fail_first
        .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
        .is_ok();
    if refuse {
        StatusCode::SERVICE_UNAVAILABLE
    } else {
        StatusCode::NO_CONTENT
    }
}

async fn start_recorder(r: Recorder) -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    let app = axum::Router::new()
        .route("/{path}", post(record))
        .with_state(r);
    tokio::spawn(async move { axum::serve(listener, app).await });
    format!("http://{addr}")
}

const VERIFY: &str = r#"
import json, os, sys
from svix.webhooks import Webhook as Svix
from standardwebhooks.webhooks import Webhook as Std
import stripe
out = []
for path, headers, body in json.load(sys.stdin):
    h = dict(headers)
    if path == "stripe":
        event = stripe.Webhook.construct_event(body, h["stripe-signature"], os.environ["STRIPE_SECRET"])
        out.append([path, event["type"], event["id"]])
    else:
        Svix(os.environ["SVIX_SECRET"]).verify(body, {k: v for k, v in h.items() if k.startswith("svix-")})
        std = {k.replace("svix-", "webhook-"): v for k, v in h.items() if k.startswith("svix-")}
        Std(os.environ["SVIX_SECRET"]).verify(body, std)
        out.append([path, json.loads(body).get("type") or json.loads(body).get("event"), h["svix-id"]])
print(json.dumps(out))
"#;

fn verify_in_python(env: &[(String, String)], seen: &Value) -> Value {
    let mut child = Command::new("python3")
        .args(["-c", VERIFY])
        .envs(env.iter().map(|(k, v)| (k, v)))
        .env("SVIX_SECRET", SVIX_SECRET)
        .env("STRIPE_SECRET", STRIPE_SECRET)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("python3");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(seen.to_string().as_bytes())
        .expect("write");
    let out = child.wait_with_output().expect("python3");
    assert!(
        out.status.success(),
        "the vendor libraries refused what the fakes sent: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("json")
}

/// Changes made through each fake's API come out as the vendor's signed
/// events, and each verifies with the vendor's official library. The first
/// delivery is refused once: its retry carries the same message id and
/// verifies too. Stripe events carry the request's Idempotency-Key and the
/// changed fields' previous values.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn what_the_fakes_send_verifies_with_the_vendor_libraries() {
    install_crypto();
    let Some(env) = python_with(
        "svix, standardwebhooks, stripe",
        &["svix", "standardwebhooks", "stripe"],
    ) else {
        return;
    };
    let recorder = Recorder::default();
    recorder.fail_first.store(1, Ordering::SeqCst);
    let base = start_recorder(recorder.clone()).await;
    let clerk = FakeClerk::start(FakeClerkOptions {
        secret_key: CLERK_KEY.into(),
        ..FakeClerkOptions::default()
    })
    .await
    .expect("clerk");
    let ms = FakeMemberstack::start(FakeMemberstackOptions {
        api_key: MS_KEY.into(),
        ..FakeMemberstackOptions::default()
    })
    .await
    .expect("memberstack");
    let stripe = FakeStripe::start(FakeStripeOptions {
        api_key: STRIPE_KEY.into(),
        ..FakeStripeOptions::default()
    })
    .await
    .expect("stripe");
    clerk
        .send_webhooks_to(&format!("{base}/clerk"), SVIX_SECRET, 0.001)
        .expect("target");
    ms.webhooks().set_target(Some(
        WebhookTarget::svix(&format!("{base}/memberstack"), SVIX_SECRET)
            .expect("secret")
            .compressed(0.001),
    ));
    stripe.webhooks().set_target(Some(
        WebhookTarget::stripe(&format!("{base}/stripe"), STRIPE_SECRET)
            .expect("secret")
            .compressed(0.001),
    ));

    let http = reqwest::Client::new();
    let user: Value = http
        .post(format!("{}/v1/users", clerk.url()))
        .bearer_auth(CLERK_KEY)
        .json(&json!({"email_address": ["ada@example.com"], "first_name": "Ada"}))
        .send()
        .await
        .expect("create")
        .json()
        .await
        .expect("json");
    let id = user["id"].as_str().expect("id");
    clerk.webhooks().settled().await;
    for req in [
        http.patch(format!("{}/v1/users/{id}", clerk.url()))
            .json(&json!({"first_name": "Augusta"})),
        http.delete(format!("{}/v1/users/{id}", clerk.url())),
    ] {
        let status = req
            .bearer_auth(CLERK_KEY)
            .send()
            .await
            .expect("send")
            .status();
        assert!(status.is_success(), "{status}");
    }
    let member: Value = http
        .post(format!("{}/members", ms.url()))
        .header("x-api-key", MS_KEY)
        .json(&json!({"email": "ada@example.com", "password": "long enough pw"}))
        .send()
        .await
        .expect("create")
        .json()
        .await
        .expect("json");
    let mid = member["data"]["id"].as_str().expect("id");
    for req in [
        http.patch(format!("{}/members/{mid}", ms.url()))
            .json(&json!({"customFields": {"name": "Ada"}})),
        http.delete(format!("{}/members/{mid}", ms.url())),
    ] {
        let status = req
            .header("x-api-key", MS_KEY)
            .send()
            .await
            .expect("send")
            .status();
        assert!(status.is_success(), "{status}");
    }
    let customer: Value = http
        .post(format!("{}/v1/customers", stripe.url()))
        .bearer_auth(STRIPE_KEY)
        .header("idempotency-key", "usersync-evt_1-create")
        .header("content-type", "application/x-www-form-urlencoded")
        .body("email=ada%40example.com&name=Ada")
        .send()
        .await
        .expect("create")
        .json()
        .await
        .expect("json");
    let cid = customer["id"].as_str().expect("id");
    for req in [
        http.post(format!("{}/v1/customers/{cid}", stripe.url()))
            .header("content-type", "application/x-www-form-urlencoded")
            .body("name=Augusta"),
        http.delete(format!("{}/v1/customers/{cid}", stripe.url())),
    ] {
        let status = req
            .bearer_auth(STRIPE_KEY)
            .send()
            .await
            .expect("send")
            .status();
        assert!(status.is_success(), "{status}");
    }
    clerk.webhooks().settled().await;
    ms.webhooks().settled().await;
    stripe.webhooks().settled().await;

    let seen = recorder.seen.lock().expect("lock").clone();
    let verified = tokio::task::spawn_blocking({
        let seen = serde_json::to_value(&seen).expect("json");
        move || verify_in_python(&env, &seen)
    })
    .await
    .expect("python");
    let kinds: Vec<(String, String)> = verified
        .as_array()
        .expect("array")
        .iter()
        .map(|v| {
            (
                v[0].as_str().unwrap_or("").into(),
                v[1].as_str().unwrap_or("").into(),
            )
        })
        .collect();
    let of = |source: &str| -> Vec<&str> {
        kinds
            .iter()
            .filter(|(s, _)| s == source)
            .map(|(_, t)| t.as_str())
            .collect()
    };
    // The first Clerk delivery was refused once and delivered again.
    assert_eq!(
        of("clerk"),
        [
            "user.created",
            "user.created",
            "user.updated",
            "user.deleted"
        ]
    );
    assert_eq!(verified[0][2], verified[1][2], "a retry keeps its svix-id");
    let attempts = clerk.webhooks().attempts();
    assert_eq!(
        attempts
            .iter()
            .map(|a| (a.attempt, a.status))
            .collect::<Vec<_>>()[..2],
        [(1, Some(503)), (2, Some(204))]
    );
    assert_eq!(
        of("memberstack"),
        ["member.created", "member.updated", "member.deleted"]
    );
    assert_eq!(
        of("stripe"),
        ["customer.created", "customer.updated", "customer.deleted"]
    );
    let stripe_bodies: Vec<Value> = seen
        .iter()
        .filter(|(p, _, _)| p == "stripe")
        .map(|(_, _, b)| serde_json::from_str(b).expect("json"))
        .collect();
    assert_eq!(
        stripe_bodies[0]["request"]["idempotency_key"],
        "usersync-evt_1-create"
    );
    assert_eq!(stripe_bodies[1]["request"]["idempotency_key"], Value::Null);
    assert_eq!(
        stripe_bodies[1]["data"]["previous_attributes"],
        json!({"name": "Ada"})
    );
    assert_eq!(stripe_bodies[2]["data"]["object"]["id"], cid);
    // Clerk's deleted user is only {id, object, deleted}.
    let last_clerk = seen
        .iter()
        .rfind(|(p, _, _)| p == "clerk")
        .map(|(_, _, b)| b.as_str())
        .unwrap_or_default();
    let deleted: Value = serde_json::from_str(last_clerk).expect("json");
    assert_eq!(
        deleted["data"],
        json!({"id": id, "object": "user", "deleted": true})
    );
    clerk.shutdown().await;
    ms.shutdown().await;
    stripe.shutdown().await;
}

/// Forty changes of one Clerk user, each webhook duplicated half the time,
/// delayed up to 30 ms and released in shuffled order, hit usersync's
/// receiver concurrently: every delivery is verified and answered 200,
/// every message is recorded once, and the row ends at Clerk's newest state.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_shuffled_duplicated_deliveries_for_one_user_converge() {
    install_crypto();
    let db = TestDb::new(USERS_CLERK).await;
    let cfg = clerk_config(&db, "");
    let shape = usersync::store::schema::inspect_table(&db.client, &cfg.database.table)
        .await
        .expect("table");
    let cancel = tokio_util::sync::CancellationToken::new();
    let receiver = usersync::app::inbound::start(&cfg, &shape, cancel.clone())
        .await
        .expect("receiver")
        .expect("configured");
    let clerk = FakeClerk::start(FakeClerkOptions {
        secret_key: CLERK_KEY.into(),
        rate_limit_per_sec: 0,
        ..FakeClerkOptions::default()
    })
    .await
    .expect("clerk");
    clerk
        .send_webhooks_to(
            &format!("http://{}/clerk", receiver.addr),
            CLERK_SECRET,
            0.001,
        )
        .expect("target");
    clerk.webhooks().set_faults(DeliveryFaults {
        duplicate_percent: 50,
        max_delay: std::time::Duration::from_millis(30),
    });
    clerk.webhooks().hold();

    let http = reqwest::Client::new();
    let user: Value = http
        .post(format!("{}/v1/users", clerk.url()))
        .bearer_auth(CLERK_KEY)
        .json(&json!({"email_address": ["v0@example.com"], "first_name": "v0"}))
        .send()
        .await
        .expect("create")
        .json()
        .await
        .expect("json");
    let id = user["id"].as_str().expect("id").to_string();
    for v in 1..=40 {
        let status = http
            .patch(format!("{}/v1/users/{id}", clerk.url()))
            .bearer_auth(CLERK_KEY)
            .json(&json!({"first_name": format!("v{v}")}))
            .send()
            .await
            .expect("update")
            .status();
        assert!(status.is_success(), "{status}");
    }
    clerk.webhooks().release(Release::Shuffled);
    clerk.webhooks().settled().await;

    let attempts = clerk.webhooks().attempts();
    let sent = clerk.webhooks().sent();
    assert_eq!(sent.len(), 41);
    assert!(attempts.len() >= 41, "{}", attempts.len());
    assert!(
        attempts.iter().all(|a| a.status == Some(200)),
        "every delivery is verified and applied or recognised: {:?}",
        attempts
            .iter()
            .filter(|a| a.status != Some(200))
            .collect::<Vec<_>>()
    );
    let name: Option<String> = db
        .client
        .query_one("SELECT name FROM users WHERE clerk_id = $1", &[&id])
        .await
        .expect("row")
        .get(0);
    assert_eq!(name.as_deref(), Some("v40"));
    assert_eq!(db.count("SELECT count(*) FROM users").await, 1);
    assert_eq!(
        db.count("SELECT count(*) FROM usersync.inbound_events WHERE source = 'clerk'")
            .await,
        41,
        "each message recorded once, duplicates not twice"
    );
    let outcomes: Vec<&str> = attempts
        .iter()
        .filter_map(|a| a.response.split('"').nth(3))
        .collect();
    assert!(
        outcomes
            .iter()
            .all(|o| ["applied", "stale", "duplicate"].contains(o)),
        "{outcomes:?}"
    );
    cancel.cancel();
    clerk.shutdown().await;
}
