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

/// Memberstack keeps the email under `auth` and the mapped fields under
/// `customFields`/`metaData`; its list is paged by `endCursor`. 250 members
/// (three pages) against 250 rows linked by id, key or nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn memberstack_members_are_read_across_pages_and_compared_at_their_own_paths() {
    use serde_json::{json, Map};
    use usersync::app::reconcile::{run, Options};
    use usersync::dev::fake::memberstack::{FakeMemberstack, FakeMemberstackOptions};

    install_crypto();
    let db = TestDb::new(USERS_BIGINT).await;
    let ms = FakeMemberstack::start(FakeMemberstackOptions {
        api_key: "sk_sb_reconcile".into(),
        rate_limit_per_sec: 25,
        ..FakeMemberstackOptions::default()
    })
    .await
    .expect("fake memberstack");
    let toml = format!(
        "[database]\nurl = \"{}\"\nslot = \"{}\"\norigin = \"{}\"\n\
         [sink]\nkind = \"memberstack\"\nurl = \"{}\"\napi_key_env = \"MS_KEY\"\nrate_limit_per_sec = 25\n\
         [sink.mapping]\nemail = \"email\"\n\"customFields.first-name\" = \"name\"\n\"metaData.plan\" = \"plan\"\n",
        db.url,
        db.dbname,
        db.dbname,
        ms.url()
    );
    let env: BTreeMap<String, String> =
        [("MS_KEY".to_string(), "sk_sb_reconcile".to_string())].into();
    let cfg = Config::from_parts(Some(&toml), "test", &env).expect("config");

    let mut values = Vec::new();
    for id in 1..=250i64 {
        let custom: Map<String, Value> = [("first-name".to_string(), json!(format!("N{id}")))]
            .into_iter()
            .collect();
        let meta: Map<String, Value> = [
            ("usersync_key".to_string(), json!(id.to_string())),
            (
                "plan".to_string(),
                json!(if id == 7 { "team" } else { "pro" }),
            ),
        ]
        .into_iter()
        .collect();
        let member = ms.insert_member(&format!("m{id}@example.com"), custom, meta);
        // Odd rows linked by id, even ones only by the member's back-reference.
        let ext = if id % 2 == 1 {
            format!("'{}'", member.id)
        } else {
            "NULL".to_string()
        };
        values.push(format!(
            "({id}, 'm{id}@example.com', 'N{id}', 'pro', {ext})"
        ));
    }
    db.exec(&format!(
        "INSERT INTO users (id, email, name, plan, external_user_id) VALUES {}",
        values.join(", ")
    ))
    .await;

    let opts = Options {
        fix: None,
        from: None,
        quiet: true,
    };
    let report = run(&cfg, &opts, CancellationToken::new())
        .await
        .expect("reconcile");
    assert_eq!((report.rows, report.records), (250, 250));
    assert_eq!(report.drifts.len(), 1, "{:#?}", report.drifts);
    assert_eq!(report.drifts[0].user_keys, vec!["7".to_string()]);
    assert_eq!(report.drifts[0].fields, vec!["metaData.plan".to_string()]);

    // The email lives under auth.email: a dashboard edit there is seen.
    let twelve = ms
        .members()
        .into_iter()
        .find(|m| m.email == "m12@example.com")
        .expect("member 12");
    assert!(ms.edit_member(&twelve.id, |m| m.email = "changed@example.com".into()));
    let report = run(&cfg, &opts, CancellationToken::new())
        .await
        .expect("reconcile");
    let twelve: Vec<_> = report
        .drifts
        .iter()
        .filter(|d| d.user_keys == ["12"])
        .collect();
    assert_eq!(twelve.len(), 1, "{:#?}", report.drifts);
    assert_eq!(twelve[0].fields, vec!["email".to_string()]);
    ms.shutdown().await;
}

/// `[reconcile] every`: the daemon reconciles by itself and exports the
/// counts; a dashboard edit and a customer made outside usersync show up as
/// `usersync_drift_records{kind=…}` without anyone running a command.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_periodic_reconcile_exports_drift_made_behind_usersyncs_back() {
    use crate::observability::{http_get, metrics_url, sample};
    let h = Harness::new(USERS_BIGINT).await;
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(h.db.log_path())
        .expect("log file");
    let log2 = log.try_clone().expect("log file");
    let mut child = h
        .command(&["run"])
        .env("USERSYNC_RECONCILE_EVERY", "1s")
        .env("USERSYNC_METRICS_LISTEN", "127.0.0.1:0")
        .env("USERSYNC_LOG_LEVEL", "info")
        .stdout(log)
        .stderr(log2)
        .spawn()
        .expect("spawn usersync run");
    h.db.exec("INSERT INTO users (id, email, name, plan) VALUES (1, 'a@example.com', 'A', 'pro')")
        .await;
    let ext = h.wait_linked(1).await;
    let base = metrics_url(&h.db).await;
    let drift = |text: &str, kind: &str| {
        sample(text, &format!("usersync_drift_records{{kind=\"{kind}\"}}"))
    };
    let wait_drift = |want: [(&'static str, f64); 3]| {
        let base = base.clone();
        async move {
            let deadline = std::time::Instant::now() + WAIT;
            loop {
                let (_, text) = http_get(&format!("{base}/metrics")).await;
                if want.iter().all(|(k, v)| drift(&text, k) == Some(*v)) {
                    return;
                }
                assert!(
                    std::time::Instant::now() < deadline,
                    "drift never became {want:?}:\n{}",
                    text.lines()
                        .filter(|l| l.contains("drift"))
                        .collect::<Vec<_>>()
                        .join("\n")
                );
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    };
    wait_drift([
        ("only_in_table", 0.0),
        ("fields_differ", 0.0),
        ("only_in_service", 0.0),
    ])
    .await;
    assert!(h.stripe.edit_customer(&ext, |c| {
        c.metadata.insert("plan".into(), "team".into());
    }));
    h.stripe
        .insert_customer(Some("stray@example.com"), None, BTreeMap::new());
    wait_drift([
        ("only_in_table", 0.0),
        ("fields_differ", 1.0),
        ("only_in_service", 1.0),
    ])
    .await;
    child.kill().expect("kill");
    child.wait().expect("reaped");
}
