//! The inbound direction (issue 16): signed webhooks from Clerk, Memberstack
//! and Stripe applied to the users table.

use std::io::Write;
use std::process::{Command, Stdio};

use usersync::core::inbound::{sign_standard, sign_stripe, standard_key};

fn run_python(env: &[(String, String)], script: &str, vars: &[(&str, String)], body: &[u8]) {
    let mut child = Command::new("python3")
        .args(["-c", script])
        .envs(env.iter().map(|(k, v)| (k, v)))
        .envs(vars.iter().map(|(k, v)| (*k, v)))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("python3");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(body)
        .expect("write body");
    let out = child.wait_with_output().expect("python3");
    assert!(
        out.status.success() && String::from_utf8_lossy(&out.stdout).trim() == "ok",
        "the vendor library refused what usersync signed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

fn now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

/// What the fakes send (signed by `core::inbound`) verifies with the
/// providers' own libraries: `svix` and `standardwebhooks` for Clerk and
/// Memberstack, `stripe.Webhook.construct_event` for Stripe. With Svix's
/// 18-byte example secret, so short secrets are covered too.
#[test]
fn what_the_fakes_sign_verifies_with_the_vendor_libraries() {
    let Some(env) = crate::common::python_with(
        "svix, standardwebhooks, stripe",
        &["svix", "standardwebhooks", "stripe"],
    ) else {
        return;
    };
    let body =
        br#"{"type":"user.created","data":{"id":"user_1","email_addresses":[]},"timestamp":1}"#;
    for secret in [
        "whsec_plJ3nmyCDGBKInavdOK15jsl",
        "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw",
    ] {
        let key = standard_key(secret).expect("key");
        let ts = now();
        let sig = sign_standard(&key, "msg_2abc", ts, body);
        let script = r#"
import os, sys
body = sys.stdin.buffer.read()
from svix.webhooks import Webhook as Svix
Svix(os.environ["SECRET"]).verify(body, {"svix-id": "msg_2abc", "svix-timestamp": os.environ["TS"], "svix-signature": os.environ["SIG"]})
from standardwebhooks.webhooks import Webhook as Std
Std(os.environ["SECRET"]).verify(body, {"webhook-id": "msg_2abc", "webhook-timestamp": os.environ["TS"], "webhook-signature": os.environ["SIG"]})
print("ok")
"#;
        run_python(
            &env,
            script,
            &[
                ("SECRET", secret.into()),
                ("TS", ts.to_string()),
                ("SIG", sig),
            ],
            body,
        );
    }
    let secret = "whsec_test_secret_for_usersync";
    let stripe_body = br#"{"id":"evt_1","object":"event","type":"customer.updated","created":1,"data":{"object":{"id":"cus_1","object":"customer"}}}"#;
    let header = sign_stripe(secret, now(), stripe_body);
    let script = r#"
import os, sys, stripe
body = sys.stdin.buffer.read().decode()
event = stripe.Webhook.construct_event(body, os.environ["SIG"], os.environ["SECRET"])
assert event["id"] == "evt_1"
print("ok")
"#;
    run_python(
        &env,
        script,
        &[("SECRET", secret.into()), ("SIG", header)],
        stripe_body,
    );
}

// ---- the apply path (store::inbound) against PostgreSQL ----

use serde_json::json;
use std::sync::Arc;
use usersync::config::Config;
use usersync::core::inbound_event::{parse, InboundRecord, SourceKind};
use usersync::store::inbound::{Applied, Applier};

use crate::common::{install_crypto, TestDb};

pub const USERS_CLERK: &str = "CREATE TABLE public.users (
    id bigserial PRIMARY KEY,
    email text NOT NULL,
    name text,
    plan text NOT NULL DEFAULT 'free',
    clerk_id text UNIQUE,
    deleted_at timestamptz
)";

pub const CLERK_SECRET: &str = "whsec_plJ3nmyCDGBKInavdOK15jsl";

/// The test database's config with a Clerk source added (`extra`: more
/// lines of the source's table).
pub fn clerk_config(db: &TestDb, extra: &str) -> Config {
    let toml = format!(
        "{}\n[inbound]\nlisten = \"127.0.0.1:0\"\n[inbound.sources.clerk]\nkind = \"clerk\"\nsecret_env = \"CLERK_SECRET\"\nid_column = \"clerk_id\"\n{extra}\n[inbound.sources.clerk.mapping]\nemail = \"primary_email\"\nname = \"/first_name\"\n",
        db.toml()
    );
    let mut env = db.env();
    env.insert("CLERK_SECRET".into(), CLERK_SECRET.into());
    Config::from_parts(Some(&toml), "test", &env).unwrap_or_else(|e| panic!("config: {e}"))
}

pub async fn applier_for(db: &TestDb, cfg: &Config, source: &str) -> Applier {
    let shape = usersync::store::schema::inspect_table(&db.client, &cfg.database.table)
        .await
        .expect("table");
    let inbound = cfg.inbound.as_ref().expect("[inbound]");
    let src = inbound.source(source).expect("source");
    Applier::connect(cfg, src, &shape, std::time::Duration::from_secs(5))
        .await
        .unwrap_or_else(|e| panic!("applier: {e}"))
}

/// A Clerk `user.*` body.
pub fn clerk_user(kind: &str, id: &str, email: &str, name: &str, updated_at: i64) -> Vec<u8> {
    let data = if kind == "user.deleted" {
        json!({"id": id, "deleted": true, "object": "user"})
    } else {
        json!({"id": id, "object": "user", "primary_email_address_id": "idn_1",
               "email_addresses": [{"id": "idn_1", "email_address": email}],
               "first_name": name, "last_name": null, "external_id": null,
               "public_metadata": {}, "created_at": 1, "updated_at": updated_at})
    };
    json!({"type": kind, "object": "event", "instance_id": "ins_1", "timestamp": updated_at, "data": data})
        .to_string()
        .into_bytes()
}

fn record(cfg: &Config, msg_id: &str, body: &[u8]) -> InboundRecord {
    let src = cfg
        .inbound
        .as_ref()
        .and_then(|i| i.source("clerk"))
        .expect("source");
    parse(SourceKind::Clerk, body, Some(msg_id), 0, &src.mapping).expect("parses")
}

async fn xmin(db: &TestDb, clerk_id: &str) -> String {
    db.client
        .query_one(
            "SELECT xmin::text FROM users WHERE clerk_id = $1",
            &[&clerk_id],
        )
        .await
        .expect("xmin")
        .get(0)
}

async fn row(db: &TestDb, clerk_id: &str) -> Option<(String, Option<String>, bool)> {
    db.client
        .query_opt(
            "SELECT email, name, deleted_at IS NOT NULL FROM users WHERE clerk_id = $1",
            &[&clerk_id],
        )
        .await
        .expect("select")
        .map(|r| (r.get(0), r.get(1), r.get(2)))
}

/// A replayed delivery (same svix-id) answers as a duplicate and writes
/// nothing: the row's xmin does not move.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_same_event_twice_writes_once() {
    install_crypto();
    let db = TestDb::new(USERS_CLERK).await;
    let cfg = clerk_config(&db, "");
    let mut a = applier_for(&db, &cfg, "clerk").await;
    let body = clerk_user("user.created", "user_1", "a@x.io", "Ada", 1000);
    let first = a.apply(&record(&cfg, "msg_1", &body)).await.expect("apply");
    assert!(matches!(first, Applied::Applied(_)), "{first:?}");
    let before = xmin(&db, "user_1").await;
    let again = a.apply(&record(&cfg, "msg_1", &body)).await.expect("apply");
    assert_eq!(again, Applied::Duplicate);
    assert_eq!(
        xmin(&db, "user_1").await,
        before,
        "a replay must not write the row"
    );
    assert_eq!(db.count("SELECT count(*) FROM users").await, 1);
    assert_eq!(
        db.count("SELECT count(*) FROM usersync.inbound_events WHERE source = 'clerk'")
            .await,
        1
    );
}

/// Updates arriving newest first, and a create arriving after them,
/// converge to the provider's newest state, not to the last arrival.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn out_of_order_updates_converge_to_the_newest() {
    install_crypto();
    let db = TestDb::new(USERS_CLERK).await;
    let cfg = clerk_config(&db, "");
    let mut a = applier_for(&db, &cfg, "clerk").await;
    let v3 = clerk_user("user.updated", "user_1", "c@x.io", "Three", 3000);
    let v2 = clerk_user("user.updated", "user_1", "b@x.io", "Two", 2000);
    let v1 = clerk_user("user.created", "user_1", "a@x.io", "One", 1000);
    assert!(matches!(
        a.apply(&record(&cfg, "m3", &v3)).await.expect("v3"),
        Applied::Applied(_)
    ));
    assert_eq!(
        a.apply(&record(&cfg, "m2", &v2)).await.expect("v2"),
        Applied::Stale
    );
    assert_eq!(
        a.apply(&record(&cfg, "m1", &v1)).await.expect("v1"),
        Applied::Stale
    );
    assert_eq!(
        row(&db, "user_1").await,
        Some(("c@x.io".into(), Some("Three".into()), false))
    );
    let v4 = clerk_user("user.updated", "user_1", "d@x.io", "Four", 4000);
    assert!(matches!(
        a.apply(&record(&cfg, "m4", &v4)).await.expect("v4"),
        Applied::Applied(_)
    ));
    assert_eq!(
        row(&db, "user_1").await.map(|r| r.1),
        Some(Some("Four".into()))
    );
}

/// A delete leaves a tombstone: the create and update that were sent
/// before it but arrive after it do not bring the user back, with a soft
/// delete and with a hard one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delete_then_older_create_stays_deleted() {
    install_crypto();
    let db = TestDb::new(USERS_CLERK).await;
    let cfg = clerk_config(&db, "");
    let mut a = applier_for(&db, &cfg, "clerk").await;
    let created = clerk_user("user.created", "user_1", "a@x.io", "Ada", 1000);
    assert!(matches!(
        a.apply(&record(&cfg, "m1", &created))
            .await
            .expect("create"),
        Applied::Applied(_)
    ));
    let deleted = clerk_user("user.deleted", "user_1", "", "", 5000);
    assert!(matches!(
        a.apply(&record(&cfg, "m3", &deleted))
            .await
            .expect("delete"),
        Applied::Applied(_)
    ));
    let update = clerk_user("user.updated", "user_1", "b@x.io", "Late", 4000);
    assert_eq!(
        a.apply(&record(&cfg, "m2", &update)).await.expect("late"),
        Applied::Stale
    );
    assert_eq!(
        row(&db, "user_1").await,
        Some(("a@x.io".into(), Some("Ada".into()), true))
    );

    // Hard delete: the row is gone and an older create arriving after the
    // delete does not insert it again.
    let db = TestDb::new(USERS_CLERK).await;
    let cfg = clerk_config(&db, "on_delete = \"delete\"");
    let mut a = applier_for(&db, &cfg, "clerk").await;
    let deleted = clerk_user("user.deleted", "user_2", "", "", 5000);
    assert_eq!(
        a.apply(&record(&cfg, "d", &deleted)).await.expect("delete"),
        Applied::Unmatched
    );
    let created = clerk_user("user.created", "user_2", "z@x.io", "Zed", 1000);
    assert_eq!(
        a.apply(&record(&cfg, "c", &created)).await.expect("create"),
        Applied::Stale
    );
    assert_eq!(db.count("SELECT count(*) FROM users").await, 0);
}

/// Many deliveries for one user at once, in shuffled order, through one
/// source's applier: every event is recorded once and the row ends at the
/// newest version.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_deliveries_for_one_user_lose_nothing() {
    install_crypto();
    let db = TestDb::new(USERS_CLERK).await;
    let cfg = clerk_config(&db, "");
    let a = Arc::new(tokio::sync::Mutex::new(
        applier_for(&db, &cfg, "clerk").await,
    ));
    let mut versions: Vec<i64> = (1..=40).collect();
    // A fixed shuffle: newest in the middle.
    versions.sort_by_key(|v| (v * 17) % 41);
    let mut tasks = Vec::new();
    for v in versions {
        let a = a.clone();
        let cfg = cfg.clone();
        tasks.push(tokio::spawn(async move {
            let body = clerk_user(
                "user.updated",
                "user_1",
                &format!("v{v}@x.io"),
                &format!("v{v}"),
                v * 1000,
            );
            let r = record(&cfg, &format!("m{v}"), &body);
            a.lock().await.apply(&r).await.expect("apply")
        }));
    }
    for t in tasks {
        t.await.expect("task");
    }
    assert_eq!(
        row(&db, "user_1").await.map(|r| r.1),
        Some(Some("v40".into()))
    );
    assert_eq!(
        db.count("SELECT count(*) FROM usersync.inbound_events")
            .await,
        40
    );
    assert_eq!(db.count("SELECT count(*) FROM users").await, 1);
}

/// Matching order: a row the app created is found by the back-reference
/// (Clerk `external_id` = the row's key) and linked, not duplicated; with
/// `match_email`, by the email; a value the column refuses fails that
/// event only and is recorded as failed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn users_are_matched_by_back_reference_then_email() {
    install_crypto();
    let db = TestDb::new(USERS_CLERK).await;
    db.exec("INSERT INTO users (id, email, name) VALUES (42, 'app@x.io', 'App'), (43, 'mail@x.io', 'Mail')")
        .await;
    let cfg = clerk_config(&db, "match_email = true");
    let mut a = applier_for(&db, &cfg, "clerk").await;
    let mut body: serde_json::Value = serde_json::from_slice(&clerk_user(
        "user.created",
        "user_a",
        "other@x.io",
        "Linked",
        1000,
    ))
    .expect("json");
    body["data"]["external_id"] = json!("42");
    let got = a
        .apply(&record(&cfg, "m1", body.to_string().as_bytes()))
        .await
        .expect("apply");
    assert_eq!(got, Applied::Applied("42".into()));
    let by_mail = clerk_user("user.created", "user_b", "MAIL@x.io", "ByMail", 1000);
    assert_eq!(
        a.apply(&record(&cfg, "m2", &by_mail)).await.expect("apply"),
        Applied::Applied("43".into())
    );
    assert_eq!(db.count("SELECT count(*) FROM users").await, 2);
    assert_eq!(
        db.count(
            "SELECT count(*) FROM users WHERE (id, clerk_id) IN ((42, 'user_a'), (43, 'user_b'))"
        )
        .await,
        2
    );
    // NOT NULL email missing from a new user's event: that event fails,
    // recorded, and the next one applies.
    let mut bad: serde_json::Value =
        serde_json::from_slice(&clerk_user("user.created", "user_c", "c@x.io", "C", 1000))
            .expect("json");
    bad["data"]["email_addresses"] = json!([]);
    let got = a
        .apply(&record(&cfg, "m3", bad.to_string().as_bytes()))
        .await
        .expect("apply");
    assert!(matches!(got, Applied::Failed(_)), "{got:?}");
    assert_eq!(
        db.count("SELECT count(*) FROM usersync.inbound_events WHERE event_id = 'm3' AND outcome = 'failed'")
            .await,
        1
    );
    let good = clerk_user("user.created", "user_d", "d@x.io", "D", 1000);
    assert!(matches!(
        a.apply(&record(&cfg, "m4", &good)).await.expect("apply"),
        Applied::Applied(_)
    ));
}

// ---- the receiver (app::inbound) ----

use usersync::core::inbound::standard_key as key_of;

fn svix_headers(msg_id: &str, ts: i64, body: &[u8]) -> Vec<(&'static str, String)> {
    let key = key_of(CLERK_SECRET).expect("key");
    vec![
        ("svix-id", msg_id.to_string()),
        ("svix-timestamp", ts.to_string()),
        ("svix-signature", sign_standard(&key, msg_id, ts, body)),
        ("content-type", "application/json".to_string()),
    ]
}

async fn post(url: &str, headers: &[(&'static str, String)], body: Vec<u8>) -> (u16, String) {
    let mut req = reqwest::Client::new().post(url).body(body);
    for (k, v) in headers {
        req = req.header(*k, v);
    }
    let resp = req.send().await.expect("post");
    let status = resp.status().as_u16();
    (status, resp.text().await.unwrap_or_default())
}

async fn start_receiver(
    db: &TestDb,
    cfg: &Config,
) -> (String, tokio_util::sync::CancellationToken) {
    let shape = usersync::store::schema::inspect_table(&db.client, &cfg.database.table)
        .await
        .expect("table");
    let cancel = tokio_util::sync::CancellationToken::new();
    let r = usersync::app::inbound::start(cfg, &shape, cancel.clone())
        .await
        .expect("receiver")
        .expect("configured");
    (format!("http://{}", r.addr), cancel)
}

/// Verification comes before anything else: a tampered body, a wrong or
/// missing signature, a stale timestamp and an oversized body are refused
/// with 401/400/413 and leave no trace in the database; a good delivery is
/// applied (200) and its redelivery is a duplicate (200, no second write).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_receiver_verifies_before_it_reads_or_writes() {
    install_crypto();
    let db = TestDb::new(USERS_CLERK).await;
    let cfg = clerk_config(&db, "");
    let (base, cancel) = start_receiver(&db, &cfg).await;
    let url = format!("{base}/clerk");
    let body = clerk_user("user.created", "user_1", "a@x.io", "Ada", 1000);
    let ts = now();
    let good = svix_headers("msg_1", ts, &body);

    let mut tampered = body.clone();
    tampered.extend_from_slice(b" ");
    assert_eq!(post(&url, &good, tampered).await.0, 401);
    let mut missing = good.clone();
    missing.retain(|(k, _)| *k != "svix-signature");
    assert_eq!(post(&url, &missing, body.clone()).await.0, 400);
    // The exact 300 s boundary is the unit tests' (a fixed clock); here the
    // clock runs between the header and its check, so stay a minute clear.
    for skew in [360, -360] {
        let stale = svix_headers("msg_1", now() - skew, &body);
        assert_eq!(post(&url, &stale, body.clone()).await.0, 401, "skew {skew}");
    }
    let only_v1a: Vec<_> = good
        .iter()
        .map(|(k, v)| {
            (
                *k,
                if *k == "svix-signature" {
                    v.replacen("v1,", "v1a,", 1)
                } else {
                    v.clone()
                },
            )
        })
        .collect();
    assert_eq!(post(&url, &only_v1a, body.clone()).await.0, 401);
    let big = vec![b' '; 300 * 1024];
    assert_eq!(
        post(&url, &svix_headers("msg_big", ts, &big), big).await.0,
        413
    );
    assert_eq!(
        post(&format!("{base}/nope"), &good, body.clone()).await.0,
        404
    );
    assert_eq!(
        db.count("SELECT count(*) FROM usersync.inbound_events")
            .await,
        0
    );
    assert_eq!(db.count("SELECT count(*) FROM users").await, 0);

    let (status, text) = post(&url, &good, body.clone()).await;
    assert_eq!((status, text.contains("applied")), (200, true), "{text}");
    let before = xmin(&db, "user_1").await;
    let (status, text) = post(&url, &good, body.clone()).await;
    assert_eq!((status, text.contains("duplicate")), (200, true), "{text}");
    assert_eq!(xmin(&db, "user_1").await, before);
    cancel.cancel();
}

/// The database unreachable for the receiver: 503, so the provider retries;
/// a session killed under it is replaced on the next delivery.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn database_trouble_answers_503_and_recovers() {
    install_crypto();
    let db = TestDb::new(USERS_CLERK).await;
    let cfg = clerk_config(&db, "");
    let (base, cancel) = start_receiver(&db, &cfg).await;
    let url = format!("{base}/clerk");
    let b1 = clerk_user("user.created", "user_1", "a@x.io", "Ada", 1000);
    assert_eq!(
        post(&url, &svix_headers("m1", now(), &b1), b1.clone())
            .await
            .0,
        200
    );
    db.exec("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name = 'usersync-inbound-clerk' AND datname = current_database()")
        .await;
    let b2 = clerk_user("user.updated", "user_1", "b@x.io", "Bea", 2000);
    let h2 = svix_headers("m2", now(), &b2);
    assert_eq!(
        post(&url, &h2, b2.clone()).await.0,
        503,
        "the killed session"
    );
    let (status, text) = post(&url, &h2, b2.clone()).await;
    assert_eq!(status, 200, "{text}");
    assert_eq!(
        row(&db, "user_1").await.map(|r| r.1),
        Some(Some("Bea".into()))
    );
    cancel.cancel();

    // A database that does not answer at all.
    let mut down = cfg.clone();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("free port")
        .port();
    down.database.pg.port(port);
    down.database.port = port;
    let (base, cancel) = start_receiver(&db, &down).await;
    let b3 = clerk_user("user.updated", "user_1", "c@x.io", "Cy", 3000);
    let (status, _) = post(
        &format!("{base}/clerk"),
        &svix_headers("m3", now(), &b3),
        b3,
    )
    .await;
    assert_eq!(status, 503);
    cancel.cancel();
}

// ---- no echo, per sink (source::stream drops same-service origins) ----

use usersync::dev::fake::stripe::{FakeStripe, FakeStripeOptions};

const STRIPE_KEY: &str = "sk_test_51UsersyncTestKeyAbCdEf0123";
const STRIPE_WH: &str = "whsec_test_secret_for_usersync";

/// Clerk and Stripe sources feeding a table whose sink is Stripe.
fn clerk_and_stripe_config(db: &TestDb, stripe: &FakeStripe) -> Config {
    let toml = format!(
        "[database]\nurl = \"{}\"\nslot = \"{}\"\norigin = \"{}\"\n\
         [sink]\nkind = \"stripe\"\nurl = \"{}\"\napi_key_env = \"STRIPE_KEY\"\n\
         [sink.mapping]\nemail = \"email\"\nname = \"name\"\n\"metadata.plan\" = \"plan\"\n\
         [retry]\ninitial_backoff_ms = 20\nmax_backoff_ms = 200\n\
         [metrics]\nlisten = \"\"\n\
         [inbound]\nlisten = \"127.0.0.1:0\"\n\
         [inbound.sources.clerk]\nkind = \"clerk\"\nsecret_env = \"CLERK_SECRET\"\nid_column = \"clerk_id\"\n\
         [inbound.sources.clerk.mapping]\nemail = \"primary_email\"\nname = \"/first_name\"\n\
         [inbound.sources.stripe]\nkind = \"stripe\"\nsecret_env = \"STRIPE_WH\"\n\
         [inbound.sources.stripe.mapping]\nname = \"/name\"\n",
        db.url,
        db.dbname,
        db.dbname,
        stripe.url()
    );
    let env: std::collections::BTreeMap<String, String> = [
        ("STRIPE_KEY".to_string(), STRIPE_KEY.to_string()),
        ("CLERK_SECRET".to_string(), CLERK_SECRET.to_string()),
        ("STRIPE_WH".to_string(), STRIPE_WH.to_string()),
    ]
    .into();
    Config::from_parts(Some(&toml), "test", &env).unwrap_or_else(|e| panic!("config: {e}"))
}

/// Clerk → table → Stripe: a user signing up in Clerk becomes exactly one
/// Stripe customer; a change that comes from Stripe is never pushed back to
/// Stripe. The marker is the same user's next app update, which travels the
/// same stream: once it has reached Stripe, anything the Stripe-sourced
/// write would have pushed would have arrived before it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_echo_to_the_same_service_and_exactly_one_push_to_another() {
    install_crypto();
    let db = TestDb::new(USERS_CLERK).await;
    let stripe = FakeStripe::start(FakeStripeOptions {
        api_key: STRIPE_KEY.into(),
        rate_limit_per_sec: 100,
        ..FakeStripeOptions::default()
    })
    .await
    .expect("fake stripe");
    let cfg = clerk_and_stripe_config(&db, &stripe);
    let cancel = tokio_util::sync::CancellationToken::new();
    let daemon = {
        let cfg = cfg.clone();
        let c = cancel.clone();
        tokio::spawn(async move { usersync::app::run::run(&cfg, c, None).await })
    };
    let mut clerk = applier_for(&db, &cfg, "clerk").await;
    let body = clerk_user("user.created", "user_1", "a@x.io", "Ada", 1000);
    let src = cfg
        .inbound
        .as_ref()
        .and_then(|i| i.source("clerk"))
        .expect("clerk");
    let r = parse(SourceKind::Clerk, &body, Some("m1"), 0, &src.mapping).expect("parse");
    assert!(matches!(
        clerk.apply(&r).await.expect("apply"),
        Applied::Applied(_)
    ));

    let wait = std::time::Duration::from_secs(30);
    let deadline = std::time::Instant::now() + wait;
    let customer = loop {
        let id: Option<String> = db
            .client
            .query_one(
                "SELECT external_user_id FROM users WHERE clerk_id = 'user_1'",
                &[],
            )
            .await
            .expect("row")
            .get(0);
        if let Some(id) = id {
            break id;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the Clerk user never became a Stripe customer"
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    };
    assert_eq!(stripe.customers().len(), 1);

    // Stripe tells about a change made in Stripe: applied to the table…
    let mut from_stripe = applier_for(&db, &cfg, "stripe").await;
    let event = json!({"id": "evt_1", "object": "event", "type": "customer.updated", "created": 2_000_000_000i64,
        "data": {"object": {"id": customer, "object": "customer", "email": "a@x.io", "name": "Named In Stripe",
                             "metadata": {}}},
        "request": {"id": "req_1", "idempotency_key": "dashboard-edit"}});
    let src = cfg
        .inbound
        .as_ref()
        .and_then(|i| i.source("stripe"))
        .expect("stripe");
    let r = parse(
        SourceKind::Stripe,
        event.to_string().as_bytes(),
        None,
        0,
        &src.mapping,
    )
    .expect("parse");
    assert!(matches!(
        from_stripe.apply(&r).await.expect("apply"),
        Applied::Applied(_)
    ));
    assert_eq!(
        row(&db, "user_1").await.map(|r| r.1),
        Some(Some("Named In Stripe".into()))
    );

    // …and not pushed back. The marker: the app's next update of the user.
    db.exec("UPDATE users SET plan = 'pro' WHERE clerk_id = 'user_1'")
        .await;
    let deadline = std::time::Instant::now() + wait;
    while !stripe
        .customers()
        .iter()
        .any(|c| c.metadata.get("plan").map(String::as_str) == Some("pro"))
    {
        assert!(
            std::time::Instant::now() < deadline,
            "the marker never reached Stripe"
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    let writes: Vec<_> = stripe
        .requests()
        .into_iter()
        .filter(|r| r.method == "POST" && r.status < 300)
        .collect();
    let creates = writes.iter().filter(|r| r.path == "/v1/customers").count();
    let updates = writes
        .iter()
        .filter(|r| r.path.starts_with("/v1/customers/"))
        .count();
    assert_eq!(
        (creates, updates),
        (1, 1),
        "one create (from Clerk) and one update (the marker), no echo: {:#?}",
        writes
            .iter()
            .map(|r| (&r.path, &r.form))
            .collect::<Vec<_>>()
    );
    cancel.cancel();
    let _ = daemon.await;
}

// ---- crash between verify and commit (the real binary, SIGKILL) ----

/// The binary, receiving for a Clerk source on a free port; the rest of
/// its configuration comes from the test database's environment.
fn spawn_receiving_binary(db: &TestDb, port: u16) -> std::process::Child {
    spawn_receiving_binary_with(db, port, &[])
}

/// [`spawn_receiving_binary`] with more environment (`extra`).
fn spawn_receiving_binary_with(
    db: &TestDb,
    port: u16,
    extra: &[(&str, String)],
) -> std::process::Child {
    spawn_receiving_binary_sources(db, port, "", extra)
}

/// [`spawn_receiving_binary_with`] with more sources (`sources`: TOML).
fn spawn_receiving_binary_sources(
    db: &TestDb,
    port: u16,
    sources: &str,
    extra: &[(&str, String)],
) -> std::process::Child {
    let path = std::path::Path::new(env!("CARGO_TARGET_TMPDIR"))
        .join(format!("{}-inbound.toml", db.dbname));
    std::fs::write(
        &path,
        format!(
            "[inbound]\nlisten = \"127.0.0.1:{port}\"\n[inbound.sources.clerk]\nkind = \"clerk\"\nsecret_env = \"CLERK_SECRET\"\nid_column = \"clerk_id\"\n[inbound.sources.clerk.mapping]\nemail = \"primary_email\"\nname = \"/first_name\"\n{sources}"
        ),
    )
    .expect("write config");
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(db.log_path())
        .expect("log file");
    let log2 = log.try_clone().expect("log file");
    let mut cmd = db.binary_command(&["--config", &path.display().to_string(), "run"]);
    for (k, v) in extra {
        cmd.env(k, v);
    }
    cmd.env("CLERK_SECRET", CLERK_SECRET)
        .stdout(log)
        .stderr(log2)
        .spawn()
        .expect("spawn usersync")
}

async fn wait_listening(port: u16, db: &TestDb) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .is_err()
    {
        assert!(
            std::time::Instant::now() < deadline,
            "receiver never listened: {}",
            db.log_tail()
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
}

/// SIGKILL while a verified delivery's transaction is open (held at the
/// version lock by the test): nothing of it is committed, the provider's
/// retry to the restarted daemon applies it, and a further retry is a
/// duplicate: applied exactly once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_between_verify_and_commit_applies_once() {
    install_crypto();
    let db = TestDb::new(USERS_CLERK).await;
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("free port")
        .port();
    let mut child = spawn_receiving_binary(&db, port);
    wait_listening(port, &db).await;
    let url = format!("http://127.0.0.1:{port}/clerk");

    let (locker, conn) = tokio_postgres::connect(&db.url, tokio_postgres::NoTls)
        .await
        .expect("connect");
    tokio::spawn(conn);
    locker
        .batch_execute("BEGIN; LOCK TABLE usersync.inbound_versions IN EXCLUSIVE MODE")
        .await
        .expect("lock");
    let body = clerk_user("user.created", "user_1", "a@x.io", "Ada", 1000);
    let headers = svix_headers("msg_kill", now(), &body);
    let pending = {
        let (url, headers, body) = (url.clone(), headers.clone(), body.clone());
        tokio::spawn(async move {
            let mut req = reqwest::Client::new().post(&url).body(body);
            for (k, v) in &headers {
                req = req.header(*k, v);
            }
            req.send().await.map(|r| r.status().as_u16())
        })
    };
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while db
        .count("SELECT count(*) FROM pg_stat_activity WHERE application_name = 'usersync-inbound-clerk' AND datname = current_database() AND wait_event_type = 'Lock'")
        .await
        == 0
    {
        assert!(std::time::Instant::now() < deadline, "the apply never reached the lock: {}", db.log_tail());
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    child.kill().expect("SIGKILL");
    let _ = child.wait();
    let answered = pending.await.expect("task");
    assert!(
        answered.as_ref().map_or(true, |s| *s == 503),
        "{answered:?}"
    );
    locker.batch_execute("ROLLBACK").await.expect("unlock");
    assert_eq!(
        db.count("SELECT count(*) FROM usersync.inbound_events")
            .await,
        0
    );
    assert_eq!(db.count("SELECT count(*) FROM users").await, 0);

    // The provider retries (the same svix-id) against the restarted daemon.
    let mut child = spawn_receiving_binary(&db, port);
    wait_listening(port, &db).await;
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    loop {
        let (status, text) = post(&url, &headers, body.clone()).await;
        if status == 200 {
            assert!(text.contains("applied"), "{text}");
            break;
        }
        assert_eq!(status, 503, "{text}");
        assert!(
            std::time::Instant::now() < deadline,
            "never applied: {}",
            db.log_tail()
        );
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    let (status, text) = post(&url, &headers, body.clone()).await;
    assert_eq!((status, text.contains("duplicate")), (200, true), "{text}");
    assert_eq!(db.count("SELECT count(*) FROM users").await, 1);
    assert_eq!(
        db.count("SELECT count(*) FROM usersync.inbound_events")
            .await,
        1
    );
    child.kill().expect("kill");
    let _ = child.wait();
}

// ---- the apply path's second half: ties, deferral, dead letters, outages ----

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("free port")
        .port()
}

/// A Stripe `customer.updated` event body.
fn stripe_customer_event(
    evt: &str,
    customer: &str,
    name: &str,
    created: i64,
    idempotency_key: &str,
) -> Vec<u8> {
    json!({"id": evt, "object": "event", "type": "customer.updated", "created": created,
        "data": {"object": {"id": customer, "object": "customer", "email": "a@x.io", "name": name,
                             "metadata": {}}},
        "request": {"id": "req_1", "idempotency_key": idempotency_key}})
    .to_string()
    .into_bytes()
}

fn stripe_record(cfg: &Config, body: &[u8]) -> InboundRecord {
    let src = cfg
        .inbound
        .as_ref()
        .and_then(|i| i.source("stripe"))
        .expect("stripe source");
    parse(SourceKind::Stripe, body, None, 0, &src.mapping).expect("parse")
}

async fn wait_for(what: &str, db: &TestDb, mut done: impl FnMut() -> bool) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while !done() {
        assert!(
            std::time::Instant::now() < deadline,
            "{what}: {}",
            db.log_tail()
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
}

async fn wait_sql(what: &str, db: &TestDb, sql: &str) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while db.count(sql).await == 0 {
        assert!(
            std::time::Instant::now() < deadline,
            "{what}: {}",
            db.log_tail()
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
}

/// Two Stripe events for one customer with the same `created` second: the
/// second to arrive does not win by arrival; the customer is fetched from
/// Stripe (`GET /v1/customers/{id}`) and applied as Stripe has it. Each
/// write leaves a sync log row (outcome `inbound`) in its transaction.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stripe_tie_applies_the_customer_as_stripe_has_it() {
    install_crypto();
    let db = TestDb::new(USERS_CLERK).await;
    let stripe = FakeStripe::start(FakeStripeOptions {
        api_key: STRIPE_KEY.into(),
        rate_limit_per_sec: 100,
        ..FakeStripeOptions::default()
    })
    .await
    .expect("fake stripe");
    let cfg = clerk_and_stripe_config(&db, &stripe);
    // Stripe's newest state is "Second"; the tied event "First" arrives last.
    let customer = stripe.insert_customer(Some("a@x.io"), Some("Second"), Default::default());
    db.client
        .execute(
            "INSERT INTO users (email, name, external_user_id) VALUES ('a@x.io', 'Zero', $1)",
            &[&customer],
        )
        .await
        .expect("insert");
    let mut a = applier_for(&db, &cfg, "stripe").await;
    let t = 1_900_000_000;
    let second = stripe_customer_event("evt_b", &customer, "Second", t, "dashboard-b");
    let first = stripe_customer_event("evt_a", &customer, "First", t, "dashboard-a");
    for (body, what) in [(second, "second"), (first, "first, tied")] {
        let got = a.apply(&stripe_record(&cfg, &body)).await.expect("apply");
        assert!(matches!(got, Applied::Applied(_)), "{what}: {got:?}");
    }
    let name: Option<String> = db
        .client
        .query_one("SELECT name FROM users", &[])
        .await
        .expect("row")
        .get(0);
    assert_eq!(name.as_deref(), Some("Second"), "the tie went by arrival");
    assert!(
        stripe
            .requests()
            .iter()
            .any(|r| r.method == "GET" && r.path == format!("/v1/customers/{customer}")),
        "the current customer was never fetched"
    );
    // An older event after them: Stripe's current state again, not its own.
    let older = stripe_customer_event("evt_0", &customer, "Older", t - 5, "dashboard-0");
    a.apply(&stripe_record(&cfg, &older)).await.expect("apply");
    let name: Option<String> = db
        .client
        .query_one("SELECT name FROM users", &[])
        .await
        .expect("row")
        .get(0);
    assert_eq!(name.as_deref(), Some("Second"));
    assert_eq!(
        db.count("SELECT count(*) FROM usersync.sync_log WHERE outcome = 'inbound' AND operation = 'stripe:customer.updated' AND external_id IS NOT NULL")
            .await,
        3
    );
}

/// A Stripe source with its own API key (`api_key_env`, `api_url`) while
/// the sink is another service (here the webhook sink): a tie is settled by
/// fetching the customer with the source's key, as when the sink is Stripe.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stripe_source_with_its_own_key_fetches_on_a_tie_whatever_the_sink() {
    install_crypto();
    let db = TestDb::new(USERS_CLERK).await;
    let stripe = FakeStripe::start(FakeStripeOptions {
        api_key: STRIPE_KEY.into(),
        rate_limit_per_sec: 100,
        ..FakeStripeOptions::default()
    })
    .await
    .expect("fake stripe");
    let toml = format!(
        "{}\n[inbound]\nlisten = \"127.0.0.1:0\"\n\
         [inbound.sources.stripe]\nkind = \"stripe\"\nsecret_env = \"STRIPE_WH\"\nid_column = \"stripe_id\"\n\
         api_key_env = \"STRIPE_SOURCE_KEY\"\napi_url = \"{}\"\n\
         [inbound.sources.stripe.mapping]\nname = \"/name\"\n",
        db.toml(),
        stripe.url()
    );
    let mut env = db.env();
    env.insert("STRIPE_WH".into(), STRIPE_WH.into());
    env.insert("STRIPE_SOURCE_KEY".into(), STRIPE_KEY.into());
    let cfg = Config::from_parts(Some(&toml), "test", &env).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(cfg.sink.kind.name(), "webhook");
    db.exec("ALTER TABLE users ADD COLUMN stripe_id text UNIQUE")
        .await;
    let customer = stripe.insert_customer(Some("a@x.io"), Some("Second"), Default::default());
    db.client
        .execute(
            "INSERT INTO users (email, name, stripe_id) VALUES ('a@x.io', 'Zero', $1)",
            &[&customer],
        )
        .await
        .expect("insert");
    let mut a = applier_for(&db, &cfg, "stripe").await;
    let t = 1_900_000_000;
    let second = stripe_customer_event("evt_b", &customer, "Second", t, "dashboard-b");
    let first = stripe_customer_event("evt_a", &customer, "First", t, "dashboard-a");
    for body in [second, first] {
        let got = a.apply(&stripe_record(&cfg, &body)).await.expect("apply");
        assert!(matches!(got, Applied::Applied(_)), "{got:?}");
    }
    assert_eq!(
        user_name(&db).await.as_deref(),
        Some("Second"),
        "the tie went by arrival: the source's own key was not used to fetch"
    );
    assert!(stripe
        .requests()
        .iter()
        .any(|r| r.method == "GET" && r.path == format!("/v1/customers/{customer}")));
}

async fn user_name(db: &TestDb) -> Option<String> {
    db.client
        .query_one("SELECT name FROM users", &[])
        .await
        .expect("row")
        .get(0)
}

/// A sink that holds every push while its gate is closed.
struct GatedSink {
    inner: usersync::sink::stripe::StripeSink,
    open: tokio::sync::watch::Receiver<bool>,
    waiting: Arc<std::sync::atomic::AtomicUsize>,
}

impl usersync::sink::Sink for GatedSink {
    fn name(&self) -> &'static str {
        "stripe"
    }

    fn push<'a>(
        &'a self,
        change: &'a usersync::core::change::Change,
        external_id: Option<&'a str>,
    ) -> futures::future::BoxFuture<'a, Result<Option<String>, usersync::sink::SinkError>> {
        Box::pin(async move {
            let mut open = self.open.clone();
            if !*open.borrow() {
                self.waiting
                    .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                let _ = open.wait_for(|o| *o).await;
            }
            self.inner.push(change, external_id).await
        })
    }

    fn check(&self) -> futures::future::BoxFuture<'_, Result<(), usersync::sink::SinkError>> {
        self.inner.check()
    }
}

async fn post_stripe(port: u16, body: Vec<u8>) -> (u16, String) {
    let header = sign_stripe(STRIPE_WH, now(), &body);
    post(
        &format!("http://127.0.0.1:{port}/stripe"),
        &[
            ("stripe-signature", header),
            ("content-type", "application/json".into()),
        ],
        body,
    )
    .await
}

/// The conflict rule: a Stripe event for a user whose own change is still
/// being pushed to Stripe (the sink holds it) is deferred, so the app's
/// newer value is not reverted by Stripe's older state; once the push is
/// written back, the event is looked at again against Stripe's current
/// customer, and table and Stripe agree on the app's value.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_event_for_a_user_whose_push_is_in_flight_waits_for_its_write_back() {
    install_crypto();
    let db = TestDb::new(USERS_CLERK).await;
    let stripe = FakeStripe::start(FakeStripeOptions {
        api_key: STRIPE_KEY.into(),
        rate_limit_per_sec: 100,
        ..FakeStripeOptions::default()
    })
    .await
    .expect("fake stripe");
    let mut cfg = clerk_and_stripe_config(&db, &stripe);
    let port = free_port();
    if let Some(i) = cfg.inbound.as_mut() {
        i.listen = format!("127.0.0.1:{port}");
    }
    let (gate, open) = tokio::sync::watch::channel(true);
    let waiting = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let sink = Arc::new(GatedSink {
        inner: usersync::sink::stripe::StripeSink::new(&cfg.sink).expect("sink"),
        open,
        waiting: waiting.clone(),
    });
    let cancel = tokio_util::sync::CancellationToken::new();
    let daemon = {
        let cfg = cfg.clone();
        let c = cancel.clone();
        tokio::spawn(async move { usersync::app::run::run_with_sink(&cfg, sink, c, None).await })
    };
    db.exec("INSERT INTO users (email, name) VALUES ('a@x.io', 'Ada')")
        .await;
    wait_sql(
        "the user never reached Stripe",
        &db,
        "SELECT count(*) FROM users u JOIN usersync.user_progress p ON p.user_key = u.id::text \
         WHERE u.external_user_id IS NOT NULL AND p.values_hash IS NOT NULL",
    )
    .await;
    let customer: String = db
        .client
        .query_one("SELECT external_user_id FROM users", &[])
        .await
        .expect("row")
        .get(0);

    gate.send_replace(false);
    db.exec("UPDATE users SET name = 'AppNew'").await;
    wait_for("the push never reached the sink", &db, || {
        waiting.load(std::sync::atomic::Ordering::SeqCst) > 0
    })
    .await;
    // Stripe tells of a state older than the app's change, with a newer
    // `created` than anything applied before.
    let (status, text) = post_stripe(
        port,
        stripe_customer_event("evt_old", &customer, "Old", now(), "dashboard-edit"),
    )
    .await;
    assert_eq!((status, text.contains("deferred")), (200, true), "{text}");
    assert_eq!(user_name(&db).await.as_deref(), Some("AppNew"), "reverted");

    gate.send_replace(true);
    wait_sql(
        "the deferred event was never looked at again",
        &db,
        "SELECT count(*) FROM usersync.inbound_events WHERE event_id = 'evt_old' AND outcome <> 'deferred'",
    )
    .await;
    assert_eq!(
        db.count("SELECT count(*) FROM usersync.inbound_events WHERE event_id = 'evt_old' AND outcome = 'applied' AND body IS NULL")
            .await,
        1
    );
    assert_eq!(user_name(&db).await.as_deref(), Some("AppNew"));
    assert_eq!(
        stripe
            .customers()
            .iter()
            .find(|c| c.id == customer)
            .and_then(|c| c.name.clone())
            .as_deref(),
        Some("AppNew")
    );
    cancel.cancel();
    let _ = daemon.await;
}

/// A config file for the binary: the test database's environment plus a
/// Clerk source.
fn clerk_source_file(db: &TestDb, port: u16) -> std::path::PathBuf {
    let path = std::path::Path::new(env!("CARGO_TARGET_TMPDIR"))
        .join(format!("{}-inbound-dlq.toml", db.dbname));
    std::fs::write(
        &path,
        format!(
            "[inbound]\nlisten = \"127.0.0.1:{port}\"\n[inbound.sources.clerk]\nkind = \"clerk\"\nsecret_env = \"CLERK_SECRET\"\nid_column = \"clerk_id\"\n[inbound.sources.clerk.mapping]\nemail = \"primary_email\"\nname = \"/first_name\"\n"
        ),
    )
    .expect("write config");
    path
}

fn dlq(db: &TestDb, path: &std::path::Path, args: &[&str]) -> (bool, String) {
    let mut all = vec!["--config", path.to_str().expect("path"), "dlq"];
    all.extend_from_slice(args);
    let out = db
        .binary_command(&all)
        .env("CLERK_SECRET", CLERK_SECRET)
        .output()
        .expect("usersync dlq");
    (
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

/// An event the table refuses (a NOT NULL column without a value) and a
/// verified body that is no event are inbound dead letters with their
/// source, answered 200 so the provider stops retrying; `dlq list
/// --inbound` and `dlq show --inbound` show them; after the table is fixed,
/// `dlq replay --inbound` re-applies the kept delivery through the
/// receiver's write path (handed to the running receiver), and a body that
/// still does not read stays a dead letter (applied by the command itself
/// when no receiver holds the source).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_and_unreadable_events_are_dead_letters_that_replay() {
    install_crypto();
    let db = TestDb::new(USERS_CLERK).await;
    let cfg = clerk_config(&db, "");
    let (base, cancel) = start_receiver(&db, &cfg).await;
    let url = format!("{base}/clerk");
    let mut no_email: serde_json::Value =
        serde_json::from_slice(&clerk_user("user.created", "user_1", "", "Ada", 1000))
            .expect("json");
    no_email["data"]["email_addresses"] = json!([]);
    let no_email = no_email.to_string().into_bytes();
    let (status, text) = post(&url, &svix_headers("m_bad", now(), &no_email), no_email).await;
    assert_eq!((status, text.contains("failed")), (200, true), "{text}");
    let junk = br#"{"type":"user.created"}"#.to_vec();
    let (status, text) = post(&url, &svix_headers("m_junk", now(), &junk), junk).await;
    assert_eq!((status, text.contains("failed")), (200, true), "{text}");

    let path = clerk_source_file(&db, free_port());
    let (ok, out) = dlq(&db, &path, &["list", "--inbound", "--json"]);
    assert!(ok, "{out}");
    let listed: serde_json::Value = serde_json::from_str(&out).expect("json list");
    let ids: Vec<(&str, &str)> = listed
        .as_array()
        .expect("array")
        .iter()
        .map(|e| {
            (
                e["source"].as_str().unwrap_or_default(),
                e["event_id"].as_str().unwrap_or_default(),
            )
        })
        .collect();
    assert_eq!(ids, vec![("clerk", "m_bad"), ("clerk", "m_junk")]);
    let (ok, out) = dlq(&db, &path, &["show", "--inbound", "clerk/m_bad"]);
    assert!(
        ok && out.contains("user_1") && out.contains("null value"),
        "{out}"
    );

    // Fixed: a default for the column. The receiver holds the source's
    // session, so the replay is handed to it.
    db.exec("ALTER TABLE users ALTER COLUMN email SET DEFAULT 'unknown@x.io'")
        .await;
    let (ok, out) = dlq(&db, &path, &["replay", "--inbound", "clerk/m_bad"]);
    assert!(ok && out.contains("handed"), "{out}");
    wait_sql(
        "the handed dead letter was never applied",
        &db,
        "SELECT count(*) FROM users WHERE clerk_id = 'user_1' AND email = 'unknown@x.io'",
    )
    .await;
    assert_eq!(
        db.count("SELECT count(*) FROM usersync.inbound_events WHERE event_id = 'm_bad' AND outcome = 'applied'")
            .await,
        1
    );

    // No receiver: the command applies it itself; an unreadable body stays.
    cancel.cancel();
    wait_sql(
        "the receiver's session never ended",
        &db,
        "SELECT CASE WHEN count(*) = 0 THEN 1::bigint ELSE 0 END FROM pg_stat_activity WHERE application_name = 'usersync-inbound-clerk' AND datname = current_database()",
    )
    .await;
    let (ok, out) = dlq(&db, &path, &["replay", "--inbound", "clerk/m_junk"]);
    assert!(!ok && out.contains("still cannot be applied"), "{out}");
    let (ok, out) = dlq(&db, &path, &["list", "--inbound", "--json"]);
    assert!(
        ok && out.contains("m_junk") && !out.contains("m_bad"),
        "{out}"
    );

    // Given up: not without --yes; then gone from the list, and the
    // provider redelivering it is a duplicate, not applied again.
    let (ok, out) = dlq(&db, &path, &["discard", "--inbound", "clerk/m_junk"]);
    assert!(!ok && out.contains("--yes"), "{out}");
    let (ok, out) = dlq(
        &db,
        &path,
        &["discard", "--inbound", "clerk/m_junk", "--yes"],
    );
    assert!(ok && out.contains("discarded"), "{out}");
    let (ok, out) = dlq(&db, &path, &["list", "--inbound"]);
    assert!(ok && out.contains("no inbound dead letters"), "{out}");
    let (ok, out) = dlq(
        &db,
        &path,
        &["discard", "--inbound", "clerk/m_junk", "--yes"],
    );
    assert!(!ok && out.contains("no inbound dead letter"), "{out}");
    let (base, cancel) = start_receiver(&db, &cfg).await;
    let junk = br#"{"type":"user.created"}"#.to_vec();
    let (status, text) = post(
        &format!("{base}/clerk"),
        &svix_headers("m_junk", now(), &junk),
        junk,
    )
    .await;
    assert_eq!((status, text.contains("duplicate")), (200, true), "{text}");
    assert_eq!(
        db.count("SELECT count(*) FROM usersync.inbound_events WHERE event_id = 'm_junk' AND outcome = 'discarded' AND body IS NULL")
            .await,
        1
    );
    cancel.cancel();
}

/// The database refusing the inbound write for a server-side reason (the
/// version table locked past `lock_timeout`) answers 503, so the provider
/// retries, while the outbound stream goes on pushing and writing back;
/// the retry after the lock is gone applies.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_inbound_outage_answers_503_while_outbound_keeps_flowing() {
    install_crypto();
    let db = TestDb::new(USERS_CLERK).await;
    let stripe = FakeStripe::start(FakeStripeOptions {
        api_key: STRIPE_KEY.into(),
        rate_limit_per_sec: 100,
        ..FakeStripeOptions::default()
    })
    .await
    .expect("fake stripe");
    let mut cfg = clerk_and_stripe_config(&db, &stripe);
    let port = free_port();
    if let Some(i) = cfg.inbound.as_mut() {
        i.listen = format!("127.0.0.1:{port}");
    }
    let cancel = tokio_util::sync::CancellationToken::new();
    let daemon = {
        let cfg = cfg.clone();
        let c = cancel.clone();
        tokio::spawn(async move { usersync::app::run::run(&cfg, c, None).await })
    };
    wait_listening(port, &db).await;
    let url = format!("http://127.0.0.1:{port}/clerk");
    // The source's session is open and its statements prepared before the
    // outage, so the failure below comes from the apply itself.
    let warm = clerk_user("user.created", "user_0", "z@x.io", "Zed", 1000);
    let (status, text) = post(&url, &svix_headers("m0", now(), &warm), warm).await;
    assert_eq!(status, 200, "{text}");
    let (locker, conn) = tokio_postgres::connect(&db.url, tokio_postgres::NoTls)
        .await
        .expect("connect");
    tokio::spawn(conn);
    locker
        .batch_execute("BEGIN; LOCK TABLE usersync.inbound_versions IN EXCLUSIVE MODE")
        .await
        .expect("lock");
    let body = clerk_user("user.created", "user_1", "c@x.io", "Cleo", 1000);
    let headers = svix_headers("m1", now(), &body);
    for n in 0..2 {
        db.exec(&format!(
            "INSERT INTO users (email, name) VALUES ('app{n}@x.io', 'App {n}')"
        ))
        .await;
        let (status, text) = post(&url, &headers, body.clone()).await;
        assert_eq!(status, 503, "{text}");
        wait_sql(
            "the outbound stream stopped while inbound failed",
            &db,
            &format!("SELECT count(*) FROM users WHERE email = 'app{n}@x.io' AND external_user_id IS NOT NULL"),
        )
        .await;
    }
    // user_0 (from Clerk) and the two app users.
    wait_sql(
        "the Clerk user never reached Stripe",
        &db,
        "SELECT count(*) FROM users WHERE clerk_id = 'user_0' AND external_user_id IS NOT NULL",
    )
    .await;
    assert_eq!(stripe.customers().len(), 3);
    locker.batch_execute("ROLLBACK").await.expect("unlock");
    let (status, text) = post(&url, &headers, body.clone()).await;
    assert_eq!((status, text.contains("applied")), (200, true), "{text}");
    assert_eq!(
        db.count("SELECT count(*) FROM users WHERE clerk_id = 'user_1'")
            .await,
        1
    );
    cancel.cancel();
    let _ = daemon.await;
}

// ---- subscription and checkout state from Stripe, plans from Memberstack ----

use usersync::dev::fake::memberstack::{FakeMemberstack, FakeMemberstackOptions};
use usersync::dev::fake::webhooks::{Release, WebhookTarget};

/// The users table with columns for the billing state the sources map.
const BILLING_COLUMNS: &str = "ALTER TABLE users ADD COLUMN subscription_status text, \
     ADD COLUMN price text, ADD COLUMN paid text, ADD COLUMN plan_status text";

/// A Stripe source (sink Stripe, so it can fetch) mapping the customer's
/// name, the subscription's status and price, and the checkout's payment
/// status; the receiver on `port`.
fn stripe_billing_config(db: &TestDb, stripe: &FakeStripe, port: u16) -> Config {
    let toml = format!(
        "[database]\nurl = \"{}\"\nslot = \"{}\"\norigin = \"{}\"\n\
         [sink]\nkind = \"stripe\"\nurl = \"{}\"\napi_key_env = \"STRIPE_KEY\"\n\
         [sink.mapping]\nemail = \"email\"\nname = \"name\"\n\
         [metrics]\nlisten = \"\"\n\
         [inbound]\nlisten = \"127.0.0.1:{port}\"\n\
         [inbound.sources.stripe]\nkind = \"stripe\"\nsecret_env = \"STRIPE_WH\"\n\
         [inbound.sources.stripe.mapping]\nname = \"/name\"\n\
         subscription_status = \"subscription:/status\"\n\
         price = \"subscription:/items/data/0/price/id\"\n\
         paid = \"checkout:/payment_status\"\n",
        db.url,
        db.dbname,
        db.dbname,
        stripe.url()
    );
    let env: std::collections::BTreeMap<String, String> = [
        ("STRIPE_KEY".to_string(), STRIPE_KEY.to_string()),
        ("STRIPE_WH".to_string(), STRIPE_WH.to_string()),
    ]
    .into();
    Config::from_parts(Some(&toml), "test", &env).unwrap_or_else(|e| panic!("config: {e}"))
}

async fn billing_row(db: &TestDb, email: &str) -> Vec<Option<String>> {
    let r = db
        .client
        .query_one(
            "SELECT name, external_user_id, subscription_status, price, paid, plan_status \
             FROM users WHERE email = $1",
            &[&email],
        )
        .await
        .expect("row");
    (0..6).map(|i| r.get(i)).collect()
}

/// `POST`/`DELETE` to the fake Stripe's API as a dashboard or app would.
async fn stripe_call(
    stripe: &FakeStripe,
    method: reqwest::Method,
    path: &str,
    form: &[(&str, &str)],
) -> serde_json::Value {
    let resp = reqwest::Client::new()
        .request(method, format!("{}{path}", stripe.url()))
        .bearer_auth(STRIPE_KEY)
        .header("content-type", "application/x-www-form-urlencoded")
        .body(
            form.iter()
                .map(|(k, v)| format!("{}={v}", k.replace('[', "%5B").replace(']', "%5D")))
                .collect::<Vec<_>>()
                .join("&"),
        )
        .send()
        .await
        .expect("stripe call");
    assert!(resp.status().is_success(), "{path}: {}", resp.status());
    resp.json().await.expect("json")
}

/// What the fake Stripe sends for a Checkout and a subscription's life
/// (`customer.subscription.created/updated/deleted`,
/// `checkout.session.completed`, Stripe-signed) reaches the row: matched
/// through the event's customer id, or through the session's
/// `client_reference_id` for a row not linked yet (which the session then
/// links); each object's fields read only that object, so the customer's
/// `name` is never taken from a subscription or a session.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stripe_subscription_and_checkout_events_reach_the_row() {
    install_crypto();
    let db = TestDb::new(USERS_CLERK).await;
    db.exec(BILLING_COLUMNS).await;
    let stripe = FakeStripe::start(FakeStripeOptions {
        api_key: STRIPE_KEY.into(),
        rate_limit_per_sec: 0,
        ..FakeStripeOptions::default()
    })
    .await
    .expect("fake stripe");
    let cfg = stripe_billing_config(&db, &stripe, 0);
    let (url, cancel) = start_receiver(&db, &cfg).await;
    stripe.webhooks().set_target(Some(
        WebhookTarget::stripe(&format!("{url}/stripe"), STRIPE_WH)
            .expect("target")
            .compressed(0.0001),
    ));
    let ada = stripe.insert_customer(Some("a@x.io"), Some("Ada"), Default::default());
    db.client
        .execute(
            "INSERT INTO users (email, name, external_user_id) VALUES ('a@x.io', 'Ada', $1)",
            &[&ada],
        )
        .await
        .expect("insert");
    let (_, sub) = stripe
        .complete_checkout(&ada, "price_basic", None)
        .expect("checkout");
    stripe.webhooks().settled().await;
    assert_eq!(
        billing_row(&db, "a@x.io").await,
        vec![
            Some("Ada".into()),
            Some(ada.clone()),
            Some("active".into()),
            Some("price_basic".into()),
            Some("paid".into()),
            None
        ]
    );
    stripe_call(
        &stripe,
        reqwest::Method::POST,
        &format!("/v1/subscriptions/{sub}"),
        &[("items[0][price]", "price_pro")],
    )
    .await;
    stripe.webhooks().settled().await;
    assert_eq!(
        billing_row(&db, "a@x.io").await[3].as_deref(),
        Some("price_pro")
    );
    stripe_call(
        &stripe,
        reqwest::Method::DELETE,
        &format!("/v1/subscriptions/{sub}"),
        &[],
    )
    .await;
    stripe.webhooks().settled().await;
    let row = billing_row(&db, "a@x.io").await;
    assert_eq!(
        (row[0].as_deref(), row[2].as_deref(), row[3].as_deref()),
        (Some("Ada"), Some("canceled"), Some("price_pro"))
    );

    // A row not linked to its customer yet: the session's
    // client_reference_id (the app's user id) finds it and links it.
    let bob = stripe.insert_customer(Some("b@x.io"), Some("Bob"), Default::default());
    let key: i64 = db
        .client
        .query_one(
            "INSERT INTO users (email, name) VALUES ('b@x.io', 'Robert') RETURNING id",
            &[],
        )
        .await
        .expect("insert")
        .get(0);
    stripe
        .complete_checkout(&bob, "price_basic", Some(&key.to_string()))
        .expect("checkout");
    stripe.webhooks().settled().await;
    let row = billing_row(&db, "b@x.io").await;
    assert_eq!(
        (row[0].as_deref(), row[1].as_deref(), row[4].as_deref()),
        (Some("Robert"), Some(bob.as_str()), Some("paid"))
    );
    let attempts = stripe.webhooks().attempts();
    assert!(
        attempts.iter().all(|a| a.status == Some(200)),
        "{attempts:?}"
    );
    for kind in [
        "customer.subscription.created",
        "customer.subscription.updated",
        "customer.subscription.deleted",
        "checkout.session.completed",
    ] {
        assert!(
            attempts.iter().any(|a| a.event_type == kind),
            "{kind} never sent"
        );
    }
    cancel.cancel();
}

/// Two subscription events stamped with the same second arrive newest
/// first: the older one does not win by arriving last; the subscription is
/// fetched (`GET /v1/subscriptions/{id}`) and applied as Stripe has it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_subscription_tie_applies_the_subscription_as_stripe_has_it() {
    install_crypto();
    let db = TestDb::new(USERS_CLERK).await;
    db.exec(BILLING_COLUMNS).await;
    let stripe = FakeStripe::start(FakeStripeOptions {
        api_key: STRIPE_KEY.into(),
        rate_limit_per_sec: 0,
        ..FakeStripeOptions::default()
    })
    .await
    .expect("fake stripe");
    let cfg = stripe_billing_config(&db, &stripe, 0);
    let (url, cancel) = start_receiver(&db, &cfg).await;
    stripe.webhooks().set_target(Some(
        WebhookTarget::stripe(&format!("{url}/stripe"), STRIPE_WH)
            .expect("target")
            .compressed(0.0001),
    ));
    let ada = stripe.insert_customer(Some("a@x.io"), Some("Ada"), Default::default());
    db.client
        .execute(
            "INSERT INTO users (email, name, external_user_id) VALUES ('a@x.io', 'Ada', $1)",
            &[&ada],
        )
        .await
        .expect("insert");
    stripe.pin_event_time(Some(now() + 60));
    stripe.webhooks().hold();
    let sub = stripe_call(
        &stripe,
        reqwest::Method::POST,
        "/v1/subscriptions",
        &[("customer", &ada), ("items[0][price]", "price_basic")],
    )
    .await;
    let sub = sub["id"].as_str().expect("id").to_string();
    stripe_call(
        &stripe,
        reqwest::Method::POST,
        &format!("/v1/subscriptions/{sub}"),
        &[("items[0][price]", "price_pro")],
    )
    .await;
    stripe.webhooks().release(Release::Reversed);
    stripe.webhooks().settled().await;
    let sent: Vec<String> = stripe
        .webhooks()
        .attempts()
        .iter()
        .map(|a| a.event_type.clone())
        .collect();
    assert_eq!(
        sent,
        [
            "customer.subscription.updated",
            "customer.subscription.created"
        ],
        "not delivered newest first"
    );
    assert_eq!(
        billing_row(&db, "a@x.io").await[3].as_deref(),
        Some("price_pro"),
        "the tie went by arrival"
    );
    assert!(
        stripe
            .requests()
            .iter()
            .any(|r| r.method == "GET" && r.path == format!("/v1/subscriptions/{sub}")),
        "the current subscription was never fetched"
    );
    cancel.cancel();
}

const MS_KEY: &str = "sk_sb_inbound_plans";

/// Memberstack `member.plan.*` events from the fake Memberstack (Svix-signed,
/// `{id, planConnection}`) reach the row through `plan:` fields; and a tie
/// (two events of one millisecond, newest first) reads the member from the
/// admin API (`GET /members/{id}`), for a plan connection and for the
/// member itself, instead of re-applying the event's own values.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn memberstack_plan_events_apply_and_a_tie_reads_the_member() {
    install_crypto();
    let db = TestDb::new(USERS_CLERK).await;
    db.exec(BILLING_COLUMNS).await;
    let ms = FakeMemberstack::start(FakeMemberstackOptions {
        api_key: MS_KEY.into(),
        rate_limit_per_sec: 0,
        ..FakeMemberstackOptions::default()
    })
    .await
    .expect("fake memberstack");
    let toml = format!(
        "[database]\nurl = \"{}\"\nslot = \"{}\"\norigin = \"{}\"\n\
         [sink]\nkind = \"memberstack\"\nurl = \"{}\"\napi_key_env = \"MS_KEY\"\nrate_limit_per_sec = 0\n\
         [sink.mapping]\nemail = \"email\"\n\
         [metrics]\nlisten = \"\"\n\
         [inbound]\nlisten = \"127.0.0.1:0\"\n\
         [inbound.sources.memberstack]\nkind = \"memberstack\"\nsecret_env = \"WHSEC\"\n\
         [inbound.sources.memberstack.mapping]\nemail = \"auth_email\"\n\
         price = \"plan:/planConnection/planId\"\nplan_status = \"plan:/planConnection/status\"\n",
        db.url,
        db.dbname,
        db.dbname,
        ms.url()
    );
    let env: std::collections::BTreeMap<String, String> = [
        ("MS_KEY".to_string(), MS_KEY.to_string()),
        ("WHSEC".to_string(), CLERK_SECRET.to_string()),
    ]
    .into();
    let cfg =
        Config::from_parts(Some(&toml), "test", &env).unwrap_or_else(|e| panic!("config: {e}"));
    let (url, cancel) = start_receiver(&db, &cfg).await;
    ms.webhooks().set_target(Some(
        WebhookTarget::svix(&format!("{url}/memberstack"), CLERK_SECRET)
            .expect("target")
            .compressed(0.0001),
    ));
    let member = ms.insert_member("a@x.io", Default::default(), Default::default());
    db.client
        .execute(
            "INSERT INTO users (email, name, external_user_id) VALUES ('a@x.io', 'Ada', $1)",
            &[&member.id],
        )
        .await
        .expect("insert");
    let added: serde_json::Value = reqwest::Client::new()
        .post(format!("{}/members/{}/add-plan", ms.url(), member.id))
        .header("x-api-key", MS_KEY)
        .json(&json!({"planId": "pln_gold"}))
        .send()
        .await
        .expect("add-plan")
        .json()
        .await
        .expect("json");
    let connection = added
        .pointer("/data/planConnections/0/id")
        .and_then(serde_json::Value::as_str)
        .expect("connection")
        .to_string();
    ms.webhooks().settled().await;
    let row = billing_row(&db, "a@x.io").await;
    assert_eq!(
        (row[3].as_deref(), row[5].as_deref()),
        (Some("pln_gold"), Some("ACTIVE"))
    );

    // A plan tie: PAST_DUE then ACTIVE again in one millisecond, delivered
    // newest first.
    let t = i64::try_from(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .expect("clock")
            .as_millis(),
    )
    .expect("ms")
        + 60_000;
    ms.pin_event_time(Some(t));
    ms.webhooks().hold();
    assert!(ms.set_plan_status(&member.id, &connection, "PAST_DUE"));
    assert!(ms.set_plan_status(&member.id, &connection, "ACTIVE"));
    ms.webhooks().release(Release::Reversed);
    ms.webhooks().settled().await;
    assert_eq!(
        billing_row(&db, "a@x.io").await[5].as_deref(),
        Some("ACTIVE"),
        "the plan tie went by arrival"
    );
    let member_gets = |ms: &FakeMemberstack| {
        ms.requests()
            .iter()
            .filter(|r| r.method == "GET" && r.path == format!("/members/{}", member.id))
            .count()
    };
    assert!(
        member_gets(&ms) >= 1,
        "the member was never fetched for the plan tie"
    );

    // A member tie: two email changes in one millisecond, newest first.
    let before = member_gets(&ms);
    ms.pin_event_time(Some(t + 1));
    ms.webhooks().hold();
    for email in ["b@x.io", "c@x.io"] {
        let status = reqwest::Client::new()
            .patch(format!("{}/members/{}", ms.url(), member.id))
            .header("x-api-key", MS_KEY)
            .json(&json!({"email": email}))
            .send()
            .await
            .expect("patch")
            .status();
        assert!(status.is_success());
    }
    ms.webhooks().release(Release::Reversed);
    ms.webhooks().settled().await;
    let email: String = db
        .client
        .query_one("SELECT email FROM users", &[])
        .await
        .expect("row")
        .get(0);
    assert_eq!(email, "c@x.io", "the member tie went by arrival");
    assert!(
        member_gets(&ms) > before,
        "the member was never fetched for the member tie"
    );
    assert!(ms
        .webhooks()
        .attempts()
        .iter()
        .all(|a| a.status == Some(200)));
    cancel.cancel();
}

// ---- metrics: every outcome counted under its own label ----

/// `usersync_inbound_events{source, outcome}` as the binary exports it.
async fn inbound_counts(
    metrics_port: u16,
    source: &str,
) -> std::collections::BTreeMap<String, f64> {
    let text = reqwest::get(format!("http://127.0.0.1:{metrics_port}/metrics"))
        .await
        .expect("scrape")
        .text()
        .await
        .expect("text");
    text.lines()
        .filter(|l| {
            l.starts_with("usersync_inbound_events") && l.contains(&format!("source=\"{source}\""))
        })
        .filter_map(|l| {
            let outcome = l.split("outcome=\"").nth(1)?.split('"').next()?.to_string();
            let value = l.rsplit(' ').next()?.parse().ok()?;
            Some((outcome, value))
        })
        .collect()
}

/// Each outcome a delivery can come to is counted once, under its own
/// label, in the binary's `/metrics`: applied, duplicate (the same svix-id
/// again), stale (an older `updated_at`), ignored (an unmapped event type),
/// unmatched (a delete of an unknown user), failed (a NOT NULL column
/// left empty), rejected (a bad signature), deferred (the user's own push
/// is held by the sink) and unavailable (a locked version row: 503); and,
/// on a Stripe source, echo (an event carrying usersync's own idempotency
/// key).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_inbound_outcome_is_counted_on_metrics() {
    install_crypto();
    let db = TestDb::new(USERS_CLERK).await;
    db.exec("ALTER TABLE users ADD COLUMN stripe_id text UNIQUE")
        .await;
    let (port, metrics_port) = (free_port(), free_port());
    let mut child = spawn_receiving_binary_sources(
        &db,
        port,
        "[inbound.sources.stripe]\nkind = \"stripe\"\nsecret_env = \"STRIPE_WH\"\nid_column = \"stripe_id\"\n\
         [inbound.sources.stripe.mapping]\nname = \"/name\"\n",
        &[
            (
                "USERSYNC_METRICS_LISTEN",
                format!("127.0.0.1:{metrics_port}"),
            ),
            ("STRIPE_WH", STRIPE_WH.to_string()),
        ],
    );
    wait_listening(port, &db).await;
    wait_listening(metrics_port, &db).await;
    let url = format!("http://127.0.0.1:{port}/clerk");
    let send = |msg: &'static str, body: Vec<u8>| {
        let url = url.clone();
        async move {
            let headers = svix_headers(msg, now(), &body);
            post(&url, &headers, body).await.0
        }
    };
    let created = clerk_user("user.created", "user_1", "a@x.io", "Ada", 1000);
    assert_eq!(send("msg_applied", created.clone()).await, 200);
    assert_eq!(send("msg_applied", created).await, 200);
    let older = clerk_user("user.updated", "user_1", "a@x.io", "Old", 500);
    assert_eq!(send("msg_stale", older).await, 200);
    let other = json!({"type": "session.created", "timestamp": 1, "data": {"id": "sess_1"}});
    assert_eq!(
        send("msg_ignored", other.to_string().into_bytes()).await,
        200
    );
    let gone = clerk_user("user.deleted", "user_nobody", "", "", 1000);
    assert_eq!(send("msg_unmatched", gone).await, 200);
    let no_email = json!({"type": "user.created", "timestamp": 1,
        "data": {"id": "user_2", "email_addresses": [], "primary_email_address_id": null,
                 "first_name": "Nomail", "updated_at": 1000}});
    assert_eq!(
        send("msg_failed", no_email.to_string().into_bytes()).await,
        200
    );
    let body = clerk_user("user.updated", "user_1", "a@x.io", "Ada", 1100);
    let mut headers = svix_headers("msg_rejected", now(), &body);
    headers[2].1 = "v1,AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=".into();
    assert_eq!(post(&url, &headers, body).await.0, 401);

    // Deferred: a user pushed once, then changed by the app while the sink
    // holds its push.
    db.exec("INSERT INTO users (email, name, clerk_id) VALUES ('d@x.io', 'Dee', 'user_d')")
        .await;
    wait_sql(
        "the app's user was never pushed",
        &db,
        "SELECT count(*) FROM users u JOIN usersync.user_progress p ON p.user_key = u.id::text \
         WHERE u.clerk_id = 'user_d' AND p.values_hash IS NOT NULL",
    )
    .await;
    db.fake
        .inject(usersync::dev::fake::Fault::Timeout { count: 1000 });
    db.exec("UPDATE users SET name = 'Dee2' WHERE clerk_id = 'user_d'")
        .await;
    let dee = clerk_user("user.updated", "user_d", "d@x.io", "Clerk", 2000);
    assert_eq!(send("msg_deferred", dee).await, 200);

    // Unavailable: the version row is locked past lock_timeout.
    let (locker, conn) = tokio_postgres::connect(&db.url, tokio_postgres::NoTls)
        .await
        .expect("connect");
    tokio::spawn(conn);
    locker
        .batch_execute("BEGIN; LOCK TABLE usersync.inbound_versions IN EXCLUSIVE MODE")
        .await
        .expect("lock");
    let later = clerk_user("user.updated", "user_1", "a@x.io", "Later", 1200);
    assert_eq!(send("msg_unavailable", later).await, 503);
    locker.batch_execute("ROLLBACK").await.expect("unlock");

    // Echo: Stripe telling of a change usersync's own push made.
    let echo = stripe_customer_event(
        "evt_echo",
        "cus_echo",
        "Pushed",
        now(),
        "usersync-update-42-0123456789abcdef",
    );
    assert_eq!(post_stripe(port, echo).await.0, 200);

    let counts = inbound_counts(metrics_port, "clerk").await;
    let stripe_counts = inbound_counts(metrics_port, "stripe").await;
    let _ = child.kill();
    let _ = child.wait();
    for outcome in [
        "applied",
        "duplicate",
        "stale",
        "ignored",
        "unmatched",
        "failed",
        "rejected",
        "deferred",
        "unavailable",
    ] {
        assert_eq!(
            counts.get(outcome).copied(),
            Some(1.0),
            "{outcome}: {counts:?}"
        );
    }
    assert_eq!(
        stripe_counts.get("echo").copied(),
        Some(1.0),
        "echo: {stripe_counts:?}"
    );
}

// ---- several deliveries in one transaction (inbound.batch_max) ----

/// A batch keeps each delivery's own outcome and the dedupe, in one
/// transaction: a created user, the same event again (duplicate), an older
/// update (stale) and another user are answered as they would be one by
/// one, and both rows carry the one transaction's id. A batch with a record
/// the table refuses commits nothing and says so, for the caller to apply
/// its deliveries one by one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_keeps_each_outcome_in_one_transaction() {
    install_crypto();
    let db = TestDb::new(USERS_CLERK).await;
    let cfg = clerk_config(&db, "");
    let mut a = applier_for(&db, &cfg, "clerk").await;
    let item = |msg: &str, body: Vec<u8>| {
        (
            record(&cfg, msg, &body),
            usersync::store::inbound::Delivery {
                body,
                message_id: Some(msg.to_string()),
                delivered_at: now(),
            },
        )
    };
    let batch = vec![
        item(
            "msg_a",
            clerk_user("user.created", "user_1", "a@x.io", "Ada", 1000),
        ),
        item(
            "msg_a",
            clerk_user("user.created", "user_1", "a@x.io", "Ada", 1000),
        ),
        item(
            "msg_old",
            clerk_user("user.updated", "user_1", "a@x.io", "Old", 500),
        ),
        item(
            "msg_b",
            clerk_user("user.created", "user_2", "b@x.io", "Bea", 1000),
        ),
    ];
    let outcomes = a.receive_batch(&batch).await.expect("the batch commits");
    let names: Vec<&str> = outcomes.iter().map(Applied::outcome).collect();
    assert_eq!(names, ["applied", "duplicate", "stale", "applied"]);
    assert_eq!(
        xmin(&db, "user_1").await,
        xmin(&db, "user_2").await,
        "not one transaction"
    );
    assert_eq!(
        row(&db, "user_1").await.map(|r| r.1),
        Some(Some("Ada".to_string()))
    );
    assert_eq!(
        db.count("SELECT count(*) FROM usersync.inbound_events")
            .await,
        3
    );

    let no_email = json!({"type": "user.created", "timestamp": 1,
        "data": {"id": "user_3", "email_addresses": [], "primary_email_address_id": null,
                 "first_name": "Nomail", "updated_at": 1000}});
    let failing = vec![
        item(
            "msg_c",
            clerk_user("user.created", "user_4", "d@x.io", "Dee", 1000),
        ),
        item("msg_d", no_email.to_string().into_bytes()),
    ];
    assert!(
        a.receive_batch(&failing).await.is_none(),
        "a refused record must fail the batch"
    );
    assert_eq!(
        db.count(
            "SELECT count(*) FROM usersync.inbound_events WHERE event_id IN ('msg_c', 'msg_d')"
        )
        .await,
        0,
        "part of a failed batch was committed"
    );
    assert!(row(&db, "user_4").await.is_none());
    // The session is still good: the same deliveries one by one.
    for (r, d) in &failing {
        a.receive(r, d).await.expect("apply");
    }
    assert!(row(&db, "user_4").await.is_some());
}
