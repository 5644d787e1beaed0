//! `usersync reconcile` end to end against the fake Stripe: each drift kind
//! made on purpose and reported by the real binary (text and JSON, exit 1),
//! agreement exiting 0, and `--fix push` converging through the daemon's
//! lanes without a second customer and without echo.

use std::collections::BTreeMap;
use std::process::Command;
use std::time::Duration;

use crate::common::*;
use serde_json::Value;
use tokio_util::sync::CancellationToken;
use usersync::config::Config;
use usersync::dev::fake::stripe::{FakeStripe, FakeStripeOptions};

const WAIT: Duration = Duration::from_secs(30);
const KEY: &str = "sk_test_51UsersyncReconcileKey0123";

struct Harness {
    db: TestDb,
    stripe: FakeStripe,
}

impl Harness {
    async fn new(table_sql: &str) -> Harness {
        install_crypto();
        let db = TestDb::new(table_sql).await;
        let stripe = FakeStripe::start(FakeStripeOptions {
            api_key: KEY.into(),
            rate_limit_per_sec: 0,
            ..FakeStripeOptions::default()
        })
        .await
        .expect("fake stripe");
        Harness { db, stripe }
    }

    fn config(&self) -> Config {
        let toml = format!(
            "[database]\nurl = \"{}\"\nslot = \"{}\"\norigin = \"{}\"\n\
             [sink]\nkind = \"stripe\"\nurl = \"{}\"\napi_key_env = \"STRIPE_KEY\"\nrate_limit_per_sec = 0\n\
             [sink.mapping]\nemail = \"email\"\nname = \"name\"\n\"metadata.plan\" = \"plan\"\n\
             [retry]\ninitial_backoff_ms = 20\nmax_backoff_ms = 200\n",
            self.db.url,
            self.db.dbname,
            self.db.dbname,
            self.stripe.url(),
        );
        let env: BTreeMap<String, String> = [("STRIPE_KEY".to_string(), KEY.to_string())].into();
        Config::from_parts(Some(&toml), "test", &env).unwrap_or_else(|e| panic!("config: {e}"))
    }

    fn start_daemon(&self) -> InProcessDaemon {
        let cfg = self.config();
        let cancel = CancellationToken::new();
        let c = cancel.clone();
        let task = tokio::spawn(async move { usersync::app::run::run(&cfg, c, None).await });
        InProcessDaemon { cancel, task }
    }

    fn command(&self, args: &[&str]) -> Command {
        let mut cmd = self.db.binary_command(args);
        cmd.env_remove("USERSYNC_SINK_SECRET_ENV")
            .env("USERSYNC_SINK_KIND", "stripe")
            .env("USERSYNC_SINK_URL", self.stripe.url())
            .env("USERSYNC_SINK_API_KEY_ENV", "STRIPE_KEY")
            .env("STRIPE_KEY", KEY)
            .env("USERSYNC_SINK_RATE_LIMIT_PER_SEC", "0")
            .env(
                "USERSYNC_SINK_MAPPING",
                "email=email,name=name,metadata.plan=plan",
            );
        cmd
    }

    /// Runs `usersync reconcile ARGS` to its end: (exit code, stdout, stderr).
    async fn reconcile(&self, args: &[&str]) -> (Option<i32>, String, String) {
        let mut all = vec!["reconcile"];
        all.extend_from_slice(args);
        let mut cmd = self.command(&all);
        let out = tokio::task::spawn_blocking(move || cmd.output())
            .await
            .expect("join")
            .expect("run usersync reconcile");
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    }

    async fn external_id(&self, id: i64) -> Option<String> {
        self.db
            .client
            .query_one("SELECT external_user_id FROM users WHERE id = $1", &[&id])
            .await
            .expect("row")
            .get(0)
    }

    async fn wait_linked(&self, id: i64) -> String {
        let deadline = std::time::Instant::now() + WAIT;
        loop {
            if let Some(ext) = self.external_id(id).await {
                return ext;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "row {id} never linked; log:\n{}",
                self.db.log_tail()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    fn creates(&self) -> usize {
        self.stripe
            .requests()
            .iter()
            .filter(|r| r.method == "POST" && r.path == "/v1/customers" && r.status == 200)
            .count()
    }

    fn posts(&self) -> usize {
        self.stripe
            .requests()
            .iter()
            .filter(|r| r.method == "POST")
            .count()
    }
}

fn counts(json: &Value) -> BTreeMap<String, u64> {
    json["counts"]
        .as_object()
        .expect("counts")
        .iter()
        .map(|(k, v)| (k.clone(), v.as_u64().expect("a count")))
        .collect()
}

fn keys_of(json: &Value, kind: &str) -> Vec<Vec<String>> {
    json["drifts"]
        .as_array()
        .expect("drifts")
        .iter()
        .filter(|d| d["kind"] == kind)
        .map(|d| {
            d["user_keys"]
                .as_array()
                .expect("keys")
                .iter()
                .map(|k| k.as_str().expect("key").to_string())
                .collect()
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_drift_kind_is_reported_and_agreement_exits_zero() {
    let h = Harness::new(USERS_BIGINT).await;
    let daemon = h.start_daemon();
    for id in 1..=5 {
        h.db.exec(&format!(
            "INSERT INTO users (id, email, name, plan) VALUES ({id}, 'u{id}@example.com', 'U{id}', 'pro')"
        ))
        .await;
    }
    let mut ext = BTreeMap::new();
    for id in 1..=5 {
        ext.insert(id, h.wait_linked(id).await);
    }
    // Pushed values and written-back ids agree: exit 0.
    let (code, out, err) = h.reconcile(&[]).await;
    assert_eq!(code, Some(0), "{out}{err}");
    assert!(out.contains("5 rows, 5 records"), "{out}");
    assert!(out.contains("in agreement"), "{out}");
    // Not a terminal: progress as plain log lines, no bar.
    assert!(err.contains("reconcile: 5/5 rows (100.0%)"), "{err}");
    assert!(!err.contains('\r'), "{err}");
    daemon.stop().await;

    // Each kind once, the daemon stopped so nothing is repaired meanwhile.
    h.db.exec("INSERT INTO users (id, email, plan) VALUES (6, 'u6@example.com', 'free')")
        .await; // only in the table
    let stray = h
        .stripe
        .insert_customer(Some("stray@example.com"), None, BTreeMap::new()); // only in the service
    assert!(h.stripe.edit_customer(&ext[&2], |c| c.deleted = true)); // linked to a missing record
    assert!(h.stripe.edit_customer(&ext[&3], |c| {
        c.metadata.insert("plan".into(), "team".into());
    })); // a mapped value differs
    h.db.exec(&format!(
        "UPDATE users SET external_user_id = '{}' WHERE id = 5",
        ext[&4]
    ))
    .await; // one record claimed by rows 4 and 5 (5's own record is now unclaimed)

    let (code, out, err) = h.reconcile(&["--json"]).await;
    assert_eq!(code, Some(1), "{out}{err}");
    let json: Value = serde_json::from_str(&out).expect("JSON report");
    assert_eq!(
        counts(&json),
        BTreeMap::from([
            ("claimed_twice".to_string(), 1),
            ("fields_differ".to_string(), 1),
            ("linked_missing".to_string(), 1),
            ("only_in_service".to_string(), 2),
            ("only_in_table".to_string(), 1),
        ]),
        "{out}"
    );
    assert_eq!(keys_of(&json, "only_in_table"), vec![vec!["6".to_string()]]);
    assert_eq!(
        keys_of(&json, "linked_missing"),
        vec![vec!["2".to_string()]]
    );
    assert_eq!(keys_of(&json, "fields_differ"), vec![vec!["3".to_string()]]);
    assert_eq!(
        keys_of(&json, "claimed_twice"),
        vec![vec!["4".to_string(), "5".to_string()]]
    );
    let differ = json["drifts"]
        .as_array()
        .expect("drifts")
        .iter()
        .find(|d| d["kind"] == "fields_differ")
        .expect("fields_differ");
    assert_eq!(differ["fields"], serde_json::json!(["metadata.plan"]));
    let service: Vec<&str> = json["drifts"]
        .as_array()
        .expect("drifts")
        .iter()
        .filter(|d| d["kind"] == "only_in_service")
        .filter_map(|d| d["external_id"].as_str())
        .collect();
    assert!(service.contains(&stray.as_str()), "{out}");
    assert!(service.contains(&ext[&5].as_str()), "{out}");
    assert_eq!(json["rows"], 6);

    // The text form: one line per drift and the summary line.
    let (code, out, _) = h.reconcile(&[]).await;
    assert_eq!(code, Some(1));
    assert!(
        out.lines().last().is_some_and(|l| l
            == "6 rows, 5 records: 1 only_in_table, 2 only_in_service, 1 linked_missing, 1 fields_differ, 1 claimed_twice; NOT in agreement"),
        "{out}"
    );
    assert!(out.contains("fields_differ    user 3"), "{out}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fix_push_converges_through_the_lanes_without_a_second_customer_or_echo() {
    // Rows from before usersync are not in the slot: only in the table.
    let h = Harness::new(&format!(
        "{USERS_BIGINT}; INSERT INTO users (id, email, plan) VALUES \
         (1, 'a@example.com', 'pro'), (2, 'b@example.com', 'free'), (3, 'c@example.com', 'team')"
    ))
    .await;
    let daemon = h.start_daemon();
    h.db.exec("INSERT INTO users (id, email, plan) VALUES (4, 'd@example.com', 'pro')")
        .await;
    h.db.exec("INSERT INTO users (id, email, plan) VALUES (5, 'e@example.com', 'pro')")
        .await;
    let four = h.wait_linked(4).await;
    let five = h.wait_linked(5).await;
    assert!(h.stripe.edit_customer(&four, |c| {
        c.email = Some("edited-in-dashboard@example.com".into());
    }));
    // Deleted in the dashboard: the row links to nothing.
    assert!(h.stripe.edit_customer(&five, |c| c.deleted = true));

    let (code, out, err) = h.reconcile(&["--json"]).await;
    assert_eq!(code, Some(1), "{out}{err}");
    let json: Value = serde_json::from_str(&out).expect("JSON report");
    assert_eq!(counts(&json)["only_in_table"], 3, "{out}");
    assert_eq!(counts(&json)["fields_differ"], 1, "{out}");
    assert_eq!(counts(&json)["linked_missing"], 1, "{out}");

    let (code, out, err) = h.reconcile(&["--fix", "push"]).await;
    assert_eq!(code, Some(1), "the report is of what was found: {out}{err}");
    assert!(out.contains("fix push: 5 queued"), "{out}{err}");

    let (code, out, err) = h.reconcile(&[]).await;
    assert_eq!(code, Some(0), "converged: {out}{err}");
    for id in 1..=5 {
        assert!(h.external_id(id).await.is_some(), "row {id} linked");
    }
    assert_ne!(h.external_id(5).await.as_deref(), Some(five.as_str()));
    // One create per row, plus the one that replaced the deleted customer.
    assert_eq!(h.creates(), 6, "never a second live customer for a row");
    let mut live: Vec<String> = h
        .stripe
        .customers()
        .iter()
        .filter(|c| !c.deleted)
        .filter_map(|c| c.metadata.get("usersync_key").cloned())
        .collect();
    live.sort();
    assert_eq!(live, ["1", "2", "3", "4", "5"]);
    assert_eq!(
        h.stripe
            .customers()
            .iter()
            .find(|c| c.id == four)
            .and_then(|c| c.email.clone())
            .as_deref(),
        Some("d@example.com")
    );

    // No echo: the next thing Stripe sees is the marker, the same user's
    // next change through the same path.
    let before = h.posts();
    h.db.exec("UPDATE users SET plan = 'marker' WHERE id = 4")
        .await;
    wait_for("the marker push", WAIT, || h.posts() > before).await;
    let after: Vec<_> = h
        .stripe
        .requests()
        .into_iter()
        .filter(|r| r.method == "POST")
        .skip(before)
        .collect();
    assert_eq!(after.len(), 1, "{after:#?}");
    assert_eq!(after[0].field("metadata[plan]"), Some("marker"));
    daemon.stop().await;
}
