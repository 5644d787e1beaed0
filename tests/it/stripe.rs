//! The Stripe sink end to end: a real PostgreSQL, the daemon (in process or
//! the real binary) and the fake Stripe customers API. Creates, updates,
//! deletes per `sink.on_delete`, a crash between the create and the
//! write-back (the idempotency key returns the same customer), a wrong API
//! key, a permanent per-user error, `Stripe-Should-Retry`, and the rate
//! limit under a burst. The first tests drive the sink and the fake
//! directly, without PostgreSQL.

use std::collections::BTreeMap;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::common::*;
use serde_json::{json, Value};
use tokio_util::sync::CancellationToken;
use usersync::config::Config;
use usersync::core::change::{Change, Operation};
use usersync::dev::fake::stripe::{FakeStripe, FakeStripeOptions, StripeRequest};
use usersync::dev::fake::Fault;
use usersync::sink::stripe::StripeSink;
use usersync::sink::Sink;

const WAIT: Duration = Duration::from_secs(30);
const KEY: &str = "sk_test_51UsersyncTestKeyAbCdEf0123";
const MAPPING: &str =
    "[sink.mapping]\nemail = \"email\"\nname = \"name\"\n\"metadata.plan\" = \"plan\"\n";

// ------------------------------------------------------------------ harness

/// A test database set up for usersync, the fake Stripe, and the config
/// that joins them.
struct StripeDb {
    db: TestDb,
    stripe: FakeStripe,
    /// Extra `[sink]` lines (before the mapping).
    sink_extra: String,
    rate: u32,
}

impl StripeDb {
    async fn new(sink_extra: &str) -> StripeDb {
        Self::with_rate(sink_extra, 25).await
    }

    async fn with_rate(sink_extra: &str, rate: u32) -> StripeDb {
        install_crypto();
        let db = TestDb::new(USERS_BIGINT).await;
        let stripe = FakeStripe::start(FakeStripeOptions {
            api_key: KEY.into(),
            rate_limit_per_sec: rate,
            ..FakeStripeOptions::default()
        })
        .await
        .expect("fake stripe");
        StripeDb {
            db,
            stripe,
            sink_extra: sink_extra.to_string(),
            rate,
        }
    }

    fn toml(&self) -> String {
        format!(
            "[database]\nurl = \"{}\"\nslot = \"{}\"\norigin = \"{}\"\n\
             [sink]\nkind = \"stripe\"\nurl = \"{}\"\napi_key_env = \"STRIPE_KEY\"\nrate_limit_per_sec = {}\n{}\n\
             {MAPPING}\
             [retry]\ninitial_backoff_ms = 20\nmax_backoff_ms = 200\n",
            self.db.url,
            self.db.dbname,
            self.db.dbname,
            self.stripe.url(),
            self.rate,
            self.sink_extra
        )
    }

    fn config(&self) -> Config {
        let env: BTreeMap<String, String> = [("STRIPE_KEY".to_string(), KEY.to_string())].into();
        Config::from_parts(Some(&self.toml()), "test", &env)
            .unwrap_or_else(|e| panic!("config: {e}"))
    }

    fn start_daemon(&self) -> InProcessDaemon {
        let cfg = self.config();
        let cancel = CancellationToken::new();
        let c = cancel.clone();
        let task = tokio::spawn(async move { usersync::app::run::run(&cfg, c, None).await });
        InProcessDaemon { cancel, task }
    }

    /// The real binary, configured by environment variables only.
    fn command(&self, args: &[&str], key: &str) -> Command {
        let mut cmd = self.db.binary_command(args);
        cmd.env_remove("USERSYNC_SINK_SECRET_ENV")
            .env("USERSYNC_SINK_KIND", "stripe")
            .env("USERSYNC_SINK_URL", self.stripe.url())
            .env("USERSYNC_SINK_API_KEY_ENV", "STRIPE_KEY")
            .env("STRIPE_KEY", key)
            .env("USERSYNC_SINK_RATE_LIMIT_PER_SEC", self.rate.to_string())
            .env(
                "USERSYNC_SINK_MAPPING",
                "email=email,name=name,metadata.plan=plan",
            );
        cmd
    }

    fn spawn(&self) -> Child {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.db.log_path())
            .expect("log file");
        let log2 = log.try_clone().expect("log file");
        self.command(&["run"], KEY)
            .stdout(log)
            .stderr(log2)
            .spawn()
            .expect("spawn usersync")
    }

    async fn exec(&self, sql: &str) {
        self.db.exec(sql).await
    }

    /// Live customers (not deleted, not marked) by `metadata[usersync_key]`.
    fn live_by_key(&self) -> BTreeMap<String, Vec<String>> {
        let mut out: BTreeMap<String, Vec<String>> = BTreeMap::new();
        for c in self.stripe.customers() {
            if c.deleted || c.metadata.contains_key("deleted_at") {
                continue;
            }
            let key = c.metadata.get("usersync_key").cloned().unwrap_or_default();
            out.entry(key).or_default().push(c.id);
        }
        out
    }

    /// `None` when every row has an external id naming its one live
    /// customer, and no live customer lacks a row.
    async fn problem(&self) -> Option<String> {
        let rows = self.db.synced_rows().await;
        let live = self.live_by_key();
        for (key, ext) in &rows {
            let Some(ext) = ext else {
                return Some(format!("row {key} has no external id"));
            };
            match live.get(key).map(Vec::as_slice) {
                Some([one]) if one == ext => {}
                Some([one]) => return Some(format!("row {key} has {ext}, Stripe {one}")),
                Some(many) => return Some(format!("row {key} has {} customers", many.len())),
                None => return Some(format!("row {key} has no customer")),
            }
        }
        let keys: Vec<&String> = rows.iter().map(|(k, _)| k).collect();
        live.keys()
            .find(|k| !keys.contains(k))
            .map(|k| format!("customer for {k} is live but the row is gone"))
    }

    async fn wait_consistent(&self, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        loop {
            match self.problem().await {
                None => return,
                Some(p) if Instant::now() > deadline => panic!(
                    "not consistent after {timeout:?}: {p}\nrequests: {:#?}\nlog tail:\n{}",
                    self.stripe
                        .requests()
                        .iter()
                        .rev()
                        .take(5)
                        .collect::<Vec<_>>(),
                    self.db.log_tail()
                ),
                Some(_) => tokio::time::sleep(Duration::from_millis(100)).await,
            }
        }
    }

    async fn external_id(&self, id: i64) -> Option<String> {
        self.db
            .client
            .query_one("SELECT external_user_id FROM users WHERE id = $1", &[&id])
            .await
            .expect("row")
            .get(0)
    }

    fn requests_since(&self, n: usize) -> Vec<StripeRequest> {
        self.stripe.requests().into_iter().skip(n).collect()
    }
}

fn is_create(r: &StripeRequest) -> bool {
    r.method == "POST" && r.path == "/v1/customers"
}

async fn dead_letters(db: &TestDb) -> Vec<(String, String, String, Option<i32>, String)> {
    db.client
        .query(
            "SELECT user_key, operation, state, last_status, last_error FROM usersync.dead_letters ORDER BY id",
            &[],
        )
        .await
        .expect("dead letters")
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2), r.get(3), r.get(4)))
        .collect()
}

// ------------------------------------------------- the fake and the sink alone

async fn fake(rate: u32) -> FakeStripe {
    install_crypto();
    FakeStripe::start(FakeStripeOptions {
        api_key: KEY.into(),
        rate_limit_per_sec: rate,
        ..FakeStripeOptions::default()
    })
    .await
    .expect("fake stripe")
}

/// A raw request to the fake, as curl would send it.
async fn call(
    fake: &FakeStripe,
    method: &str,
    path: &str,
    form: &str,
    idempotency_key: Option<&str>,
) -> (u16, Value, reqwest::header::HeaderMap) {
    let client = reqwest::Client::new();
    let mut req = client
        .request(method.parse().unwrap(), format!("{}{path}", fake.url()))
        .bearer_auth(KEY);
    if let Some(k) = idempotency_key {
        req = req.header("Idempotency-Key", k);
    }
    if !form.is_empty() {
        req = req
            .header("content-type", "application/x-www-form-urlencoded")
            .body(form.to_string());
    }
    let resp = req.send().await.expect("request");
    let status = resp.status().as_u16();
    let headers = resp.headers().clone();
    let body = resp.json().await.expect("json body");
    (status, body, headers)
}

fn sink_for(fake: &FakeStripe, on_delete: &str) -> StripeSink {
    let toml = format!(
        "[database]\nurl = \"postgres://u@127.0.0.1:9/db\"\n[sink]\nkind = \"stripe\"\nurl = \"{}\"\n\
         api_key_env = \"STRIPE_KEY\"\non_delete = \"{on_delete}\"\nrate_limit_per_sec = 0\n{MAPPING}",
        fake.url()
    );
    let env: BTreeMap<String, String> = [("STRIPE_KEY".to_string(), KEY.to_string())].into();
    let cfg = Config::from_parts(Some(&toml), "test", &env).expect("config");
    StripeSink::new(&cfg.sink).expect("sink")
}

fn change(op: Operation, event: &str, key: i64, data: Option<Value>) -> Change {
    let mut change = Change::for_test(op, json!(key));
    change.event_id = event.into();
    change.commit_time_us = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_micros() as i64;
    change.data = data.map(|d| d.as_object().cloned().unwrap());
    change
}

#[tokio::test]
async fn the_fake_speaks_stripe() {
    let fake = fake(0).await;
    // Authentication.
    let resp = reqwest::Client::new()
        .get(format!("{}/v1/customers", fake.url()))
        .bearer_auth("sk_test_wrongwrongwrong9876")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 401);
    let body: Value = resp.json().await.unwrap();
    assert_eq!(body["error"]["type"], "invalid_request_error");
    assert_eq!(
        body["error"]["message"],
        format!("Invalid API Key provided: sk_test_{}9876", "*".repeat(15))
    );

    // Create with metadata, then update: metadata merges, "" removes.
    let (status, created, _) = call(
        &fake,
        "POST",
        "/v1/customers",
        "email=ada%40example.com&name=Ada&metadata[plan]=free&metadata%5Bteam%5D=x",
        Some("k1"),
    )
    .await;
    assert_eq!(status, 200);
    let id = created["id"].as_str().unwrap().to_string();
    assert!(id.starts_with("cus_") && id.len() == 18, "{id}");
    assert!(id[4..].chars().all(|c| c.is_ascii_alphanumeric()));
    assert_eq!(created["object"], "customer");
    assert_eq!(created["metadata"], json!({"plan": "free", "team": "x"}));
    let (_, updated, _) = call(
        &fake,
        "POST",
        &format!("/v1/customers/{id}"),
        "metadata[plan]=pro&metadata[team]=&name=",
        None,
    )
    .await;
    assert_eq!(updated["metadata"], json!({"plan": "pro"}));
    assert_eq!(updated["name"], Value::Null);
    assert_eq!(updated["email"], "ada@example.com");

    // Idempotency: same key and parameters → the first answer, flagged.
    let (status, again, headers) = call(
        &fake,
        "POST",
        "/v1/customers",
        "metadata%5Bteam%5D=x&email=ada%40example.com&name=Ada&metadata[plan]=free",
        Some("k1"),
    )
    .await;
    assert_eq!(status, 200);
    assert_eq!(again, created, "the saved answer, not the customer now");
    assert_eq!(headers["idempotent-replayed"], "true");
    // Same key, other parameters → idempotency_error.
    let (status, refused, _) = call(&fake, "POST", "/v1/customers", "name=Bob", Some("k1")).await;
    assert_eq!(status, 400);
    assert_eq!(refused["error"]["type"], "idempotency_error");
    assert_eq!(
        refused["error"]["message"],
        "Keys for idempotent requests can only be used with the same parameters they were first used with. Try using a key other than 'k1' if you meant to execute a different request."
    );
    assert_eq!(fake.customers().len(), 1);

    // Validation, unknown ids, unknown parameters.
    let (status, bad, _) = call(&fake, "POST", "/v1/customers", "email=nope", Some("k2")).await;
    assert_eq!(status, 400);
    assert_eq!(bad["error"]["code"], "email_invalid");
    assert_eq!(bad["error"]["param"], "email");
    assert_eq!(bad["error"]["message"], "Invalid email address: nope");
    let (status, _, _) = call(&fake, "POST", "/v1/customers", "email=ok%40x.y", Some("k2")).await;
    assert_eq!(
        status, 200,
        "a refused parameter error is not saved under the key"
    );
    let (status, unknown, _) = call(&fake, "POST", "/v1/customers", "plan=pro", None).await;
    assert_eq!(
        (status, unknown["error"]["code"].as_str()),
        (400, Some("parameter_unknown"))
    );
    let (status, missing, _) =
        call(&fake, "GET", "/v1/customers/cus_doesnotexist00", "", None).await;
    assert_eq!(status, 404);
    assert_eq!(missing["error"]["code"], "resource_missing");
    assert_eq!(
        missing["error"]["message"],
        "No such customer: 'cus_doesnotexist00'"
    );

    // Search and list.
    let q = "metadata%5B%27team%27%5D%3A%27x%27";
    let (_, found, _) = call(
        &fake,
        "GET",
        &format!("/v1/customers/search?query={q}"),
        "",
        None,
    )
    .await;
    assert_eq!(found["object"], "search_result");
    assert_eq!(
        found["data"].as_array().unwrap().len(),
        0,
        "team was removed"
    );
    let q = "metadata%5B%27plan%27%5D%3A%27pro%27+AND+email%3A%27ada%40example.com%27";
    let (_, found, _) = call(
        &fake,
        "GET",
        &format!("/v1/customers/search?query={q}"),
        "",
        None,
    )
    .await;
    assert_eq!(found["data"][0]["id"], id.as_str());
    let (_, list, _) = call(&fake, "GET", "/v1/customers?limit=1", "", None).await;
    assert_eq!(
        (list["object"].as_str(), list["has_more"].as_bool()),
        (Some("list"), Some(true))
    );

    // Delete, then it is gone.
    let (status, deleted, _) =
        call(&fake, "DELETE", &format!("/v1/customers/{id}"), "", None).await;
    assert_eq!(status, 200);
    assert_eq!(
        deleted,
        json!({"id": id, "object": "customer", "deleted": true})
    );
    let (status, _, _) = call(&fake, "DELETE", &format!("/v1/customers/{id}"), "", None).await;
    assert_eq!(status, 404);
    let (status, stub, _) = call(&fake, "GET", &format!("/v1/customers/{id}"), "", None).await;
    assert_eq!((status, stub["deleted"].as_bool()), (200, Some(true)));
    fake.shutdown().await;
}

#[tokio::test]
async fn the_fake_limits_the_rate_and_injects_faults() {
    let fake = fake(5).await;
    let mut statuses = Vec::new();
    for _ in 0..8 {
        statuses.push(
            call(&fake, "GET", "/v1/customers?limit=1", "", None)
                .await
                .0,
        );
    }
    assert_eq!(
        statuses.iter().filter(|s| **s == 200).count(),
        5,
        "{statuses:?}"
    );
    let limited = fake
        .requests()
        .into_iter()
        .find(|r| r.status == 429)
        .unwrap();
    assert_eq!(limited.response["error"]["code"], "rate_limit");
    tokio::time::sleep(Duration::from_millis(1100)).await;
    fake.inject(Fault::Status {
        status: 503,
        count: 1,
    });
    let client = reqwest::Client::new();
    let resp = client
        .get(format!("{}/v1/customers", fake.url()))
        .bearer_auth(KEY)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 503);
    assert_eq!(resp.headers()["stripe-should-retry"], "true");
    fake.inject(Fault::RateLimit {
        retry_after_secs: 7,
        count: 1,
    });
    let resp = client
        .get(format!("{}/v1/customers", fake.url()))
        .bearer_auth(KEY)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 429);
    assert_eq!(resp.headers()["retry-after"], "7");
    fake.shutdown().await;
}

#[tokio::test]
async fn the_sink_replays_a_create_and_links_unknown_ids_by_search() {
    let fake = fake(0).await;
    let sink = sink_for(&fake, "mark");
    let data = json!({"email": "a@example.com", "name": "A", "plan": "free"});
    let create = change(
        Operation::Insert,
        "evt_0000000000000010_0",
        7,
        Some(data.clone()),
    );
    let first = sink.push(&create, None).await.unwrap().unwrap();
    let again = sink.push(&create, None).await.unwrap().unwrap();
    assert_eq!(first, again);
    assert_eq!(fake.customers().len(), 1);
    let reqs = fake.requests();
    assert_eq!(
        reqs[0].idempotency_key.as_deref(),
        Some("usersync-evt_0000000000000010_0-create")
    );
    assert_eq!(reqs[0].field("metadata[usersync_key]"), Some("7"));
    assert!(reqs[1].replayed);

    // The same event with other parameters (the mapping changed across a
    // restart): Stripe refuses the key; the sink finds the customer instead.
    let changed = change(
        Operation::Insert,
        "evt_0000000000000010_0",
        7,
        Some(json!({"email": "b@example.com", "name": "A", "plan": "free"})),
    );
    assert_eq!(
        sink.push(&changed, None).await.unwrap().as_deref(),
        Some(first.as_str())
    );
    assert_eq!(fake.customers().len(), 1);
    assert_eq!(fake.customers()[0].email.as_deref(), Some("b@example.com"));

    // An update with no known id is linked by search; NULL clears a field.
    let update = change(
        Operation::Update,
        "evt_0000000000000020_0",
        7,
        Some(json!({"email": "b@example.com", "name": null, "plan": "pro"})),
    );
    let n = fake.requests().len();
    assert_eq!(
        sink.push(&update, None).await.unwrap().as_deref(),
        Some(first.as_str())
    );
    let reqs: Vec<StripeRequest> = fake.requests().into_iter().skip(n).collect();
    assert_eq!(reqs.len(), 2, "{reqs:#?}");
    assert_eq!(
        (reqs[0].method.as_str(), reqs[0].path.as_str()),
        ("GET", "/v1/customers/search")
    );
    assert_eq!(reqs[0].field("query"), Some("metadata['usersync_key']:'7'"));
    assert_eq!(reqs[1].path, format!("/v1/customers/{first}"));
    assert_eq!(reqs[1].field("name"), Some(""));
    let c = &fake.customers()[0];
    assert_eq!(
        (c.name.as_deref(), c.metadata["plan"].as_str()),
        (None, "pro")
    );

    // An update of a user Stripe never heard of creates it.
    let orphan = change(
        Operation::Update,
        "evt_0000000000000030_0",
        8,
        Some(json!({"email": "c@example.com", "name": null, "plan": "free"})),
    );
    let created = sink.push(&orphan, None).await.unwrap().unwrap();
    assert_ne!(created, first);
    let c = fake
        .customers()
        .into_iter()
        .find(|c| c.id == created)
        .unwrap();
    assert_eq!(c.name, None, "NULL is left out on create");

    // A delete of a user that never reached Stripe sends nothing after the search.
    let n = fake.requests().len();
    let gone = change(Operation::Delete, "evt_0000000000000040_0", 9, None);
    assert_eq!(sink.push(&gone, None).await.unwrap(), None);
    assert_eq!(fake.requests().len(), n + 1);

    // With on_delete = delete, an already deleted customer counts as done.
    let deleting = sink_for(&fake, "delete");
    let del = change(Operation::Delete, "evt_0000000000000050_0", 8, None);
    assert_eq!(
        deleting
            .push(&del, Some(&created))
            .await
            .unwrap()
            .as_deref(),
        Some(created.as_str())
    );
    assert_eq!(
        deleting
            .push(&del, Some(&created))
            .await
            .unwrap()
            .as_deref(),
        Some(created.as_str())
    );
    let last = fake.requests().pop().unwrap();
    assert_eq!((last.method.as_str(), last.status), ("DELETE", 404));
    fake.shutdown().await;
}

// ------------------------------------------------------------ end to end

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn insert_creates_a_customer_and_writes_its_id_back() {
    let s = StripeDb::new("").await;
    let daemon = s.start_daemon();
    s.exec("INSERT INTO users (id, email, name, plan) VALUES (1, 'ada@example.com', 'Ada Lovelace', 'pro')")
        .await;
    s.wait_consistent(WAIT).await;
    daemon.stop().await;
    let ext = s.external_id(1).await.expect("external id");
    assert!(ext.starts_with("cus_"), "{ext}");
    let customers = s.stripe.customers();
    assert_eq!(customers.len(), 1);
    let c = &customers[0];
    assert_eq!(c.id, ext);
    assert_eq!(c.email.as_deref(), Some("ada@example.com"));
    assert_eq!(c.name.as_deref(), Some("Ada Lovelace"));
    assert_eq!(
        c.metadata,
        [("plan", "pro"), ("usersync_key", "1")]
            .into_iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect::<BTreeMap<String, String>>()
    );
    let creates: Vec<StripeRequest> = s.stripe.requests().into_iter().filter(is_create).collect();
    assert_eq!(creates.len(), 1);
    let key = creates[0].idempotency_key.clone().expect("idempotency key");
    assert!(
        key.starts_with("usersync-evt_") && key.ends_with("-create"),
        "{key}"
    );
    // The unmapped column is not sent.
    assert!(creates[0].form.iter().all(|(k, _)| k != "bio"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn updates_send_one_post_and_unmapped_columns_nothing() {
    let s = StripeDb::new("").await;
    let daemon = s.start_daemon();
    s.exec("INSERT INTO users (id, email, name) VALUES (1, 'a@example.com', 'A')")
        .await;
    s.wait_consistent(WAIT).await;
    let ext = s.external_id(1).await.unwrap();

    // A mapped column: one POST to the customer.
    let n = s.stripe.requests().len();
    s.exec("UPDATE users SET plan = 'pro' WHERE id = 1").await;
    // The marker: the same user's next mapped change travels the lane after
    // it; once it is in, anything the update caused is in too.
    s.exec("UPDATE users SET name = 'marker' WHERE id = 1")
        .await;
    wait_for("the marker", WAIT, || {
        s.requests_since(n)
            .iter()
            .any(|r| r.field("name") == Some("marker"))
    })
    .await;
    let reqs = s.requests_since(n);
    assert_eq!(reqs.len(), 2, "{reqs:#?}");
    assert_eq!(reqs[1].field("name"), Some("marker"));
    assert_eq!(
        (reqs[0].method.as_str(), reqs[0].path.clone()),
        ("POST", format!("/v1/customers/{ext}"))
    );
    assert_eq!(reqs[0].field("metadata[plan]"), Some("pro"));
    assert!(reqs[0]
        .idempotency_key
        .as_deref()
        .is_some_and(|k| k.starts_with("usersync-evt_") && k.contains("-update-")));
    assert_eq!(s.stripe.customers()[0].metadata["plan"], "pro");

    // An unmapped column: nothing. A later mapped change (NULL clears the
    // name) is the only request.
    let n = s.stripe.requests().len();
    s.exec("UPDATE users SET bio = 'likes tea' WHERE id = 1")
        .await;
    s.exec("UPDATE users SET name = NULL WHERE id = 1").await;
    // The marker travels the same lane after the unmapped change.
    wait_for("the marker update", WAIT, || {
        s.requests_since(n)
            .iter()
            .any(|r| r.field("name") == Some(""))
    })
    .await;
    let reqs = s.requests_since(n);
    assert_eq!(reqs.len(), 1, "{reqs:#?}");
    assert_eq!(reqs[0].field("name"), Some(""));
    assert_eq!(s.stripe.customers()[0].name, None);
    assert_eq!(s.stripe.customers().len(), 1);
    daemon.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delete_marks_the_customer_by_default() {
    let s = StripeDb::new("").await;
    let daemon = s.start_daemon();
    s.exec("INSERT INTO users (id, email) VALUES (1, 'a@example.com')")
        .await;
    s.wait_consistent(WAIT).await;
    let ext = s.external_id(1).await.unwrap();
    let n = s.stripe.requests().len();
    s.exec("DELETE FROM users WHERE id = 1").await;
    wait_for("the mark", WAIT, || s.stripe.requests().len() > n).await;
    s.wait_consistent(WAIT).await;
    daemon.stop().await;
    let reqs = s.requests_since(n);
    assert_eq!(reqs.len(), 1, "{reqs:#?}");
    assert_eq!(
        (reqs[0].method.as_str(), reqs[0].path.clone()),
        ("POST", format!("/v1/customers/{ext}"))
    );
    assert!(reqs[0]
        .idempotency_key
        .as_deref()
        .is_some_and(|k| k.contains("-mark-")));
    let c = &s.stripe.customers()[0];
    assert!(!c.deleted, "billing history is kept");
    let at = c.metadata.get("deleted_at").expect("deleted_at");
    time::OffsetDateTime::parse(at, &time::format_description::well_known::Rfc3339)
        .unwrap_or_else(|e| panic!("{at}: {e}"));
    assert_eq!(c.metadata["usersync_key"], "1");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delete_policy_delete_deletes_the_customer() {
    let s = StripeDb::new("on_delete = \"delete\"").await;
    let daemon = s.start_daemon();
    s.exec("INSERT INTO users (id, email) VALUES (1, 'a@example.com')")
        .await;
    s.wait_consistent(WAIT).await;
    let ext = s.external_id(1).await.unwrap();
    let n = s.stripe.requests().len();
    s.exec("DELETE FROM users WHERE id = 1").await;
    wait_for("the delete", WAIT, || s.stripe.customers()[0].deleted).await;
    daemon.stop().await;
    let reqs = s.requests_since(n);
    assert_eq!(reqs.len(), 1, "{reqs:#?}");
    assert_eq!(
        (
            reqs[0].method.as_str(),
            reqs[0].path.clone(),
            reqs[0].status
        ),
        ("DELETE", format!("/v1/customers/{ext}"), 200)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delete_policy_ignore_sends_nothing() {
    let s = StripeDb::new("on_delete = \"ignore\"").await;
    let daemon = s.start_daemon();
    s.exec("INSERT INTO users (id, email) VALUES (1, 'a@example.com')")
        .await;
    s.wait_consistent(WAIT).await;
    let n = s.stripe.requests().len();
    s.exec("DELETE FROM users WHERE id = 1").await;
    // The same user's next change (the key inserted again) travels its lane
    // after the delete: once it is in, the delete has been handled.
    s.exec("INSERT INTO users (id, email) VALUES (1, 'b@example.com')")
        .await;
    wait_for("the re-insert", WAIT, || s.stripe.customers().len() == 2).await;
    daemon.stop().await;
    let reqs = s.requests_since(n);
    assert_eq!(reqs.len(), 1, "only the re-insert's create: {reqs:#?}");
    assert!(is_create(&reqs[0]));
    let c = &s.stripe.customers()[0];
    assert!(!c.deleted && !c.metadata.contains_key("deleted_at"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_between_create_and_write_back_replays_the_same_customer() {
    let s = StripeDb::new("").await;
    let mut child = s.spawn();
    s.exec("INSERT INTO users (id, email) VALUES (0, 'warmup@example.com')")
        .await;
    s.wait_consistent(WAIT).await;

    // Slow answers leave time to lock the row, so the write-back blocks and
    // the kill certainly falls between the create and the write-back.
    s.stripe.set_latency(Duration::from_millis(300));
    s.exec("INSERT INTO users (id, email, name) VALUES (1, 'one@example.com', 'One')")
        .await;
    let (locker, conn) = tokio_postgres::connect(&s.db.url, tokio_postgres::NoTls)
        .await
        .expect("connect");
    tokio::spawn(conn);
    locker
        .batch_execute("BEGIN; SELECT 1 FROM users WHERE id = 1 FOR UPDATE")
        .await
        .expect("lock the row");
    let created = |s: &StripeDb| -> Vec<StripeRequest> {
        s.stripe
            .requests()
            .into_iter()
            .filter(|r| is_create(r) && r.field("metadata[usersync_key]") == Some("1"))
            .collect()
    };
    wait_for("the create", WAIT, || {
        created(&s).iter().any(|r| r.status == 200)
    })
    .await;
    child.kill().expect("SIGKILL");
    let _ = child.wait();
    assert_eq!(
        s.external_id(1).await,
        None,
        "the write-back ran through the row lock"
    );
    locker.batch_execute("ROLLBACK").await.expect("unlock");
    s.stripe.set_latency(Duration::ZERO);

    let mut child = s.spawn();
    s.wait_consistent(WAIT).await;
    child.kill().expect("kill");
    let _ = child.wait();
    let creates = created(&s);
    assert!(
        creates.len() >= 2,
        "the create was not replayed: {creates:#?}"
    );
    let first = &creates[0];
    let last = creates.last().unwrap();
    assert_eq!(first.idempotency_key, last.idempotency_key);
    assert!(
        last.replayed,
        "the replay was not answered from the idempotency key"
    );
    assert_eq!(first.response["id"], last.response["id"]);
    let ext = s.external_id(1).await.unwrap();
    assert_eq!(first.response["id"], ext.as_str());
    let with_key: Vec<_> = s
        .stripe
        .customers()
        .into_iter()
        .filter(|c| c.metadata.get("usersync_key").map(String::as_str) == Some("1"))
        .collect();
    assert_eq!(with_key.len(), 1, "exactly one customer: {with_key:#?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_api_key_stops_run_before_anything_is_consumed() {
    let s = StripeDb::new("").await;
    s.exec("INSERT INTO users (id, email) VALUES (1, 'a@example.com')")
        .await;
    let before = s.db.confirmed_flush_lsn().await;
    assert!(before.is_some());
    let wrong = "sk_test_51WrongKeyDoNotLeakZyXw9876";
    let mut cmd = tokio::process::Command::from(s.command(&["run"], wrong));
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    let out = tokio::time::timeout(WAIT, cmd.output())
        .await
        .expect("usersync did not exit")
        .expect("spawn");
    let stderr = String::from_utf8_lossy(&out.stderr);
    let all = format!("{}{stderr}", String::from_utf8_lossy(&out.stdout));
    assert_eq!(out.status.code(), Some(2), "{all}");
    let err = stderr.trim_end();
    assert!(
        err.starts_with("usersync: ")
            && err.matches("usersync: ").count() == 1
            && err.lines().count() == 1,
        "one message expected:\n{err}"
    );
    assert!(err.contains("STRIPE_KEY"), "{err}");
    assert!(err.contains("401"), "{err}");
    assert!(
        !all.contains(wrong) && !all.contains("9876") && !all.contains(KEY),
        "the key leaked:\n{all}"
    );
    assert_eq!(
        s.db.confirmed_flush_lsn().await,
        before,
        "something was consumed"
    );
    assert!(s.stripe.customers().is_empty());
    let reqs = s.stripe.requests();
    assert_eq!(reqs.len(), 1, "{reqs:#?}");
    assert_eq!((reqs[0].method.as_str(), reqs[0].status), ("GET", 401));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_invalid_email_is_dead_lettered_with_stripes_message_while_others_flow() {
    let s = StripeDb::new("").await;
    let daemon = s.start_daemon();
    s.exec("INSERT INTO users (id, email) VALUES (1, 'not-an-email')")
        .await;
    s.exec("INSERT INTO users (id, email) VALUES (2, 'two@example.com')")
        .await;
    s.exec("UPDATE users SET name = 'later' WHERE id = 1").await;
    s.exec("INSERT INTO users (id, email) VALUES (3, 'three@example.com')")
        .await;
    wait_for("users 2 and 3", WAIT, || s.stripe.customers().len() == 2).await;
    let deadline = Instant::now() + WAIT;
    while dead_letters(&s.db).await.len() < 2 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    daemon.stop().await;
    let dl = dead_letters(&s.db).await;
    assert_eq!(dl.len(), 2, "{dl:?}");
    let (user, op, state, status, error) = &dl[0];
    assert_eq!(
        (user.as_str(), op.as_str(), state.as_str(), *status),
        ("1", "user.created", "failed", Some(400))
    );
    assert!(
        error.contains("invalid_request_error/email_invalid: Invalid email address: not-an-email"),
        "{error}"
    );
    assert_eq!((dl[1].0.as_str(), dl[1].2.as_str()), ("1", "parked"));
    let creates_for_1 = s
        .stripe
        .requests()
        .into_iter()
        .filter(|r| r.field("metadata[usersync_key]") == Some("1"))
        .count();
    assert_eq!(creates_for_1, 1, "a permanent error is not retried");
    assert!(s.external_id(2).await.is_some() && s.external_id(3).await.is_some());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_conflict_marked_stripe_should_retry_is_retried() {
    let s = StripeDb::new("").await;
    s.stripe.inject(Fault::Status {
        status: 409,
        count: 2,
    });
    let daemon = s.start_daemon();
    // The daemon's start check takes the first fault; the create the second.
    s.exec("INSERT INTO users (id, email) VALUES (1, 'a@example.com')")
        .await;
    s.wait_consistent(WAIT).await;
    daemon.stop().await;
    let reqs = s.stripe.requests();
    let conflicts = reqs.iter().filter(|r| r.status == 409).count();
    assert_eq!(conflicts, 2, "{reqs:#?}");
    let creates: Vec<&StripeRequest> = reqs.iter().filter(|r| is_create(r)).collect();
    assert_eq!(creates.last().unwrap().status, 200);
    assert!(
        creates.iter().any(|r| r.status == 409),
        "the create met a 409: {reqs:#?}"
    );
    assert!(creates
        .windows(2)
        .all(|w| w[0].idempotency_key == w[1].idempotency_key));
    assert!(dead_letters(&s.db).await.is_empty());
    assert_eq!(s.stripe.customers().len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_stays_under_the_rate_limit() {
    const RATE: u32 = 100;
    const USERS: i64 = 500;
    let s = StripeDb::with_rate("", RATE).await;
    let daemon = s.start_daemon();
    let started = Instant::now();
    s.exec(&format!(
        "INSERT INTO users (id, email) SELECT g, 'u' || g || '@example.com' FROM generate_series(1, {USERS}) g"
    ))
    .await;
    s.wait_consistent(Duration::from_secs(60)).await;
    let elapsed = started.elapsed();
    daemon.stop().await;
    let reqs = s.stripe.requests();
    assert!(reqs.iter().all(|r| r.status != 429), "429s at the fake");
    assert!(dead_letters(&s.db).await.is_empty());
    assert_eq!(s.stripe.customers().len() as i64, USERS);
    // At most RATE requests in any one-second window (sliding), with a 5%
    // margin for jitter between the limiter's slot and the arrival.
    let times: Vec<u128> = reqs.iter().map(|r| r.received_at_ms).collect();
    let busiest = times
        .iter()
        .map(|t| times.iter().filter(|u| **u >= *t && **u < t + 1000).count())
        .max()
        .unwrap_or(0);
    println!(
        "{} requests in {elapsed:?}; busiest second: {busiest}",
        reqs.len()
    );
    assert!(
        busiest <= RATE as usize * 105 / 100,
        "{busiest} requests in one second"
    );
    assert!(
        busiest >= RATE as usize / 2,
        "the burst never came near the limit ({busiest}/s)"
    );
    let floor = Duration::from_millis((USERS as u64 - u64::from(RATE)) * 1000 / u64::from(RATE));
    assert!(
        elapsed >= floor,
        "{USERS} creates in {elapsed:?}: the limiter did not hold"
    );
}

/// A row whose customer exists although the row does not hold its id (the
/// push was dead-lettered after Stripe had made the customer, or another
/// tool made it with the row's key) is linked by `dlq replay` and by
/// `sync-user`, never created a second time: without a known id both push
/// the row as an update, which looks the customer up first, as the daemon's
/// sync requests do.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replay_and_sync_user_link_an_existing_customer_instead_of_creating_one() {
    let s = StripeDb::new("").await;
    let daemon = s.start_daemon();
    s.exec("INSERT INTO users (id, email) VALUES (1, 'not-an-email')")
        .await;
    s.exec("INSERT INTO users (id, email) VALUES (3, 'three@example.com')")
        .await;
    let deadline = Instant::now() + WAIT;
    while s.external_id(3).await.is_none() || dead_letters(&s.db).await.is_empty() {
        assert!(
            Instant::now() < deadline,
            "user 3 not written back, or user 1 not dead-lettered"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    daemon.stop().await;
    assert_eq!(dead_letters(&s.db).await.len(), 1);
    // The customers exist all the same.
    let (status, one, _) = call(
        &s.stripe,
        "POST",
        "/v1/customers",
        "email=one%40example.com&metadata%5Busersync_key%5D=1",
        None,
    )
    .await;
    assert_eq!(status, 200, "{one}");
    let (status, two, _) = call(
        &s.stripe,
        "POST",
        "/v1/customers",
        "email=two%40example.com&metadata%5Busersync_key%5D=2",
        None,
    )
    .await;
    assert_eq!(status, 200, "{two}");
    s.exec("UPDATE users SET email = 'one@example.com' WHERE id = 1")
        .await;
    s.exec("INSERT INTO users (id, email) VALUES (2, 'two@example.com')")
        .await;

    let out = run_cli(s.command(&["dlq", "replay", "--all"], KEY), WAIT).await;
    assert_eq!(out.code, Some(0), "{}", out.all());
    let out = run_cli(s.command(&["sync-user", "2"], KEY), WAIT).await;
    assert_eq!(out.code, Some(0), "{}", out.all());
    assert_eq!(s.external_id(1).await.as_deref(), one["id"].as_str());
    assert_eq!(s.external_id(2).await.as_deref(), two["id"].as_str());
    let live = s.live_by_key();
    assert_eq!(live.get("1").map(Vec::len), Some(1), "{live:?}");
    assert_eq!(live.get("2").map(Vec::len), Some(1), "{live:?}");
}
