//! Existing users, manual sync and the off switch, end to end against real
//! PostgreSQL and the fakes: a backfill of 10,000 pre-existing users while a
//! writer updates random users (external state equals the table, no
//! duplicates, members that already existed are linked), a backfill killed
//! half-way that continues, `sync-user` with and without a daemon, and
//! `[sync] enabled` switched off and on with SIGHUP.

use std::collections::{BTreeMap, HashMap};
use std::time::{Duration, Instant};

use crate::common::*;
use rand::Rng;
use serde_json::{json, Map, Value};
use tokio_util::sync::CancellationToken;
use usersync::app::backfill::{Mode, Options};
use usersync::config::Config;
use usersync::dev::fake::memberstack::{FakeMemberstack, FakeMemberstackOptions};

const CLI_LIMIT: Duration = Duration::from_secs(120);
const MS_KEY: &str = "sk_sb_test_backfill_7Qm2xV9p";

async fn insert_users(db: &TestDb, from: i64, to: i64) {
    db.exec(&format!(
        "INSERT INTO users (id, email, name, plan) \
         SELECT g, 'u' || g || '@example.com', 'name ' || g, 'free' FROM generate_series({from}, {to}) AS g"
    ))
    .await;
}

async fn wait_slot_active(db: &TestDb) {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let active: bool = db
            .client
            .query_one(
                "SELECT coalesce(bool_or(active), false) FROM pg_replication_slots WHERE slot_name = $1",
                &[&db.dbname],
            )
            .await
            .expect("slot")
            .get(0);
        if active {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "the daemon never started streaming"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sync_user_on_a_missing_key_is_a_clear_error() {
    let db = TestDb::new(USERS_BIGINT).await;
    let out = run_cli(db.binary_command(&["sync-user", "42"]), CLI_LIMIT).await;
    assert_eq!(out.code, Some(1), "{}", out.all());
    assert!(
        out.stderr.contains("no row with key 42 in public.users"),
        "{}",
        out.all()
    );
    // Not even a key of the column's type: the same answer, as JSON too.
    let out = run_cli(
        db.binary_command(&["sync-user", "nope", "--json"]),
        CLI_LIMIT,
    )
    .await;
    assert_eq!(out.code, Some(1), "{}", out.all());
    let v: Value = serde_json::from_str(out.stdout.trim()).expect("json on stdout");
    assert!(
        v["error"]
            .as_str()
            .is_some_and(|e| e.contains("no row with key nope")),
        "{v}"
    );
    assert!(db.fake.requests().is_empty(), "nothing may be pushed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sync_user_works_with_and_without_a_daemon() {
    let db = TestDb::new(USERS_BIGINT).await;
    db.exec("INSERT INTO users (id, email, name) VALUES (1, 'ann@example.com', 'Ann')")
        .await;

    // No daemon: pushed directly, written back.
    let out = run_cli(db.binary_command(&["sync-user", "1", "--json"]), CLI_LIMIT).await;
    assert_eq!(out.code, Some(0), "{}", out.all());
    let v: Value = serde_json::from_str(out.stdout.trim()).expect("json");
    assert_eq!(v["status"], "created", "{v}");
    assert_eq!(v["via"], "direct", "{v}");
    let ext = v["external_id"].as_str().expect("external id").to_string();
    assert!(v["latency_ms"].as_f64().is_some(), "{v}");
    assert_eq!(
        db.synced_rows().await,
        vec![("1".into(), Some(ext.clone()))]
    );
    // It recorded the values it pushed: a backfill of changed rows (a dry
    // run needs no daemon) has nothing to push again.
    let out = run_cli(db.binary_command(&["backfill", "--dry-run"]), CLI_LIMIT).await;
    assert_eq!(out.code, Some(0), "{}", out.all());
    assert!(
        out.stdout.contains("0 of 1 rows would be pushed"),
        "{}",
        out.all()
    );

    // The daemon then streams the row's insert: the row is linked already,
    // so it is not created a second time.
    let daemon = db.start_daemon();
    db.exec("UPDATE users SET name = 'Ann B' WHERE id = 1")
        .await;
    let fake = &db.fake;
    wait_for("the update", Duration::from_secs(30), || {
        fake.users()
            .iter()
            .any(|u| !u.deleted && u.data["name"] == "Ann B")
    })
    .await;
    db.wait_consistent(Duration::from_secs(30)).await;

    // With the daemon streaming: through its lane.
    let out = run_cli(db.binary_command(&["sync-user", "1"]), CLI_LIMIT).await;
    assert_eq!(out.code, Some(0), "{}", out.all());
    assert!(out.stdout.contains(&ext), "{}", out.all());
    assert!(out.stdout.contains("updated"), "{}", out.all());
    assert!(out.stdout.contains("via daemon"), "{}", out.all());
    let live = db.fake.live_users_with_key(&json!(1));
    assert_eq!(live.len(), 1, "one user externally: {live:?}");
    assert_eq!(live[0].external_id, ext);
    let done = db
        .count("SELECT count(*) FROM usersync.sync_requests WHERE outcome = 'updated' AND done_at IS NOT NULL")
        .await;
    assert_eq!(done, 1);
    daemon.stop().await;
}

/// `sync-user` without a daemon writes back through its own guarded UPDATE:
/// a row whose `external_synced_at` is newer than this sync (another writer,
/// a later sync) keeps it. Fails when the guard is dropped from the UPDATE in
/// src/app/sync_user.rs.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sync_user_never_overwrites_a_newer_sync() {
    let db = TestDb::new(USERS_BIGINT).await;
    db.exec("INSERT INTO users (id, email, name) VALUES (1, 'ann@example.com', 'Ann')")
        .await;
    let out = run_cli(db.binary_command(&["sync-user", "1", "--json"]), CLI_LIMIT).await;
    assert_eq!(out.code, Some(0), "{}", out.all());
    let v: Value = serde_json::from_str(out.stdout.trim()).expect("json");
    let ext = v["external_id"].as_str().expect("external id").to_string();

    db.exec(
        "UPDATE users SET name = 'Ann B', external_synced_at = '2999-01-01 00:00:00+00' WHERE id = 1",
    )
    .await;
    let out = run_cli(db.binary_command(&["sync-user", "1", "--json"]), CLI_LIMIT).await;
    assert_eq!(out.code, Some(0), "{}", out.all());
    let v: Value = serde_json::from_str(out.stdout.trim()).expect("json");
    assert_eq!(v["status"], "updated", "{v}");
    assert_eq!(v["via"], "direct", "{v}");
    // It was pushed...
    let live = db.fake.live_users_with_key(&json!(1));
    assert_eq!(live.len(), 1, "{live:?}");
    assert_eq!(live[0].data["name"], "Ann B");
    // ...and the newer sync in the row is left alone.
    let row = db
        .client
        .query_one(
            "SELECT external_user_id, external_synced_at = '2999-01-01 00:00:00+00' FROM users WHERE id = 1",
            &[],
        )
        .await
        .expect("row");
    let (id, untouched): (String, bool) = (row.get(0), row.get(1));
    assert!(untouched, "sync-user overwrote a newer external_synced_at");
    assert_eq!(id, ext);
}

/// The Memberstack fake without a rate limit, and a config for it.
struct Ms {
    db: TestDb,
    api: FakeMemberstack,
}

impl Ms {
    async fn bare() -> Ms {
        install_crypto();
        let db = TestDb::bare(USERS_BIGINT, "").await;
        let api = FakeMemberstack::start(FakeMemberstackOptions {
            api_key: MS_KEY.into(),
            rate_limit_per_sec: 0,
            ..Default::default()
        })
        .await
        .expect("fake memberstack");
        Ms { db, api }
    }

    fn config(&self) -> Config {
        let toml = format!(
            "[database]\nurl = \"{}\"\nslot = \"{}\"\norigin = \"{}\"\n\
             [sink]\nkind = \"memberstack\"\nurl = \"{}\"\napi_key_env = \"MS_KEY\"\nrate_limit_per_sec = 5000\nmax_in_flight = 32\n\
             [sink.mapping]\nemail = \"email\"\n\"customFields.first-name\" = \"name\"\n\"metaData.plan\" = \"plan\"\n\
             [retry]\ninitial_backoff_ms = 20\nmax_backoff_ms = 200\n",
            self.db.url,
            self.db.dbname,
            self.db.dbname,
            self.api.url(),
        );
        let env: BTreeMap<String, String> = [("MS_KEY".to_string(), MS_KEY.to_string())]
            .into_iter()
            .collect();
        Config::from_parts(Some(&toml), "test", &env).unwrap_or_else(|e| panic!("config: {e}"))
    }

    /// `None` when every row has exactly one live member, named by the
    /// row's external id, holding the row's current values.
    async fn problem(&self) -> Option<String> {
        let rows = self
            .db
            .client
            .query(
                "SELECT id::text, email, name, plan, external_user_id FROM users ORDER BY id",
                &[],
            )
            .await
            .expect("rows");
        let members = self.api.members();
        let mut by_key: HashMap<String, Vec<&usersync::dev::fake::memberstack::FakeMember>> =
            HashMap::new();
        let mut live = 0;
        for m in members.iter().filter(|m| !m.deleted) {
            live += 1;
            if let Some(k) = m.usersync_key() {
                by_key.entry(k).or_default().push(m);
            }
        }
        for r in &rows {
            let key: String = r.get(0);
            let Some(ext) = r.get::<_, Option<String>>(4) else {
                return Some(format!("row {key} has no external id"));
            };
            let found = by_key.get(&key).map(Vec::as_slice).unwrap_or_default();
            let [m] = found else {
                return Some(format!("row {key} has {} live members", found.len()));
            };
            if m.id != ext {
                return Some(format!("row {key}: external id {ext}, member {}", m.id));
            }
            let email: String = r.get(1);
            let name: Option<String> = r.get(2);
            let plan: String = r.get(3);
            if m.email != email
                || m.custom_fields.get("first-name") != Some(&json!(name))
                || m.meta_data.get("plan") != Some(&json!(plan))
            {
                return Some(format!(
                    "row {key} is older externally: member {:?} {:?} {:?}, row {name:?} {plan}",
                    m.email, m.custom_fields, m.meta_data
                ));
            }
        }
        if live != rows.len() {
            return Some(format!("{live} live members for {} rows", rows.len()));
        }
        None
    }

    async fn wait_consistent(&self, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        loop {
            match self.problem().await {
                None => return,
                Some(p) if Instant::now() > deadline => panic!("not consistent: {p}"),
                Some(_) => tokio::time::sleep(Duration::from_millis(250)).await,
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn backfill_of_10000_users_while_a_writer_updates_them() {
    const USERS: i64 = 10_000;
    let ms = Ms::bare().await;
    insert_users(&ms.db, 1, USERS).await;
    ms.db
        .exec("ALTER TABLE users ADD COLUMN external_user_id text, ADD COLUMN external_synced_at timestamptz")
        .await;
    // Members that already exist: 1..=100 synced by an old script (the row
    // has the id), 101..=200 made by hand (only the email matches).
    let mut existing = HashMap::new();
    for g in 1..=200i64 {
        let m = ms
            .api
            .insert_member(&format!("u{g}@example.com"), Map::new(), Map::new());
        existing.insert(g.to_string(), m.id.clone());
        if g <= 100 {
            ms.db
                .exec(&format!(
                    "UPDATE users SET external_user_id = '{}' WHERE id = {g}",
                    m.id
                ))
                .await;
        }
    }
    let cfg = ms.config();
    usersync::app::setup::apply(&ms.db.client, &cfg.database)
        .await
        .unwrap_or_else(|e| panic!("setup failed: {e}"));

    let cancel = CancellationToken::new();
    let daemon_cfg = cfg.clone();
    let c = cancel.clone();
    let daemon = tokio::spawn(async move { usersync::app::run::run(&daemon_cfg, c, None).await });
    wait_slot_active(&ms.db).await;

    // The writer: random users, random values, while the backfill runs.
    let writer_stop = CancellationToken::new();
    let (client, conn) = tokio_postgres::connect(&ms.db.url, tokio_postgres::NoTls)
        .await
        .expect("connect");
    tokio::spawn(conn);
    let stop = writer_stop.clone();
    let writer = tokio::spawn(async move {
        let mut n = 0u32;
        while !stop.is_cancelled() && n < 3000 {
            let (id, plan) = {
                let mut rng = rand::rng();
                (
                    rng.random_range(1..=USERS),
                    ["free", "pro", "team"][rng.random_range(0..3)],
                )
            };
            client
                .execute(
                    "UPDATE users SET name = $1, plan = $2 WHERE id = $3",
                    &[&format!("w{n}"), &plan, &id],
                )
                .await
                .expect("writer update");
            n += 1;
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        n
    });

    let opts = Options {
        mode: Mode::Changed,
        dry_run: false,
        chunk_size: 500,
        beside_daemon: false,
    };
    let summary = usersync::app::backfill::run(&cfg, &opts, CancellationToken::new())
        .await
        .unwrap_or_else(|e| panic!("backfill: {e}"));
    writer_stop.cancel();
    let writes = writer.await.expect("writer");
    assert!(writes > 0);
    assert_eq!(summary.rows_scanned, USERS as u64);
    assert_eq!(
        summary.outcomes.get("failed").copied().unwrap_or(0),
        0,
        "{summary}"
    );

    ms.wait_consistent(Duration::from_secs(180)).await;
    // Existing members were linked, not duplicated.
    for (key, id) in &existing {
        let ext: Option<String> = ms
            .db
            .client
            .query_one(
                "SELECT external_user_id FROM users WHERE id = $1::text::bigint",
                &[key],
            )
            .await
            .expect("row")
            .get(0);
        assert_eq!(ext.as_deref(), Some(id.as_str()), "row {key}");
    }
    let finished = ms
        .db
        .count("SELECT count(*) FROM usersync.backfill WHERE finished_at IS NOT NULL AND rows_done = 10000")
        .await;
    assert_eq!(finished, 1);

    // A second backfill finds nothing changed.
    let again = usersync::app::backfill::run(&cfg, &opts, CancellationToken::new())
        .await
        .unwrap_or_else(|e| panic!("second backfill: {e}"));
    assert_eq!(again.queued, 0, "{again}");

    cancel.cancel();
    match tokio::time::timeout(Duration::from_secs(30), daemon).await {
        Ok(Ok(Ok(()))) => {}
        other => panic!("daemon did not stop cleanly: {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn backfill_killed_half_way_continues_without_duplicates() {
    let db = TestDb::bare(USERS_BIGINT, "max_in_flight = 4").await;
    insert_users(&db, 1, 2000).await;
    let cfg = db.config();
    usersync::app::setup::apply(&db.client, &cfg.database)
        .await
        .unwrap_or_else(|e| panic!("setup failed: {e}"));
    db.fake.set_latency(Duration::from_millis(20));
    let daemon = db.start_daemon();
    wait_slot_active(&db).await;

    // Nothing is queued by a dry run.
    let out = run_cli(db.binary_command(&["backfill", "--dry-run"]), CLI_LIMIT).await;
    assert_eq!(out.code, Some(0), "{}", out.all());
    assert!(
        out.stdout.contains("2000 of 2000 rows would be pushed"),
        "{}",
        out.all()
    );
    assert_eq!(
        db.count("SELECT count(*) FROM usersync.sync_requests")
            .await,
        0
    );

    let mut child = db.spawn_binary(&["backfill", "--chunk-size", "100"]);
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let done = db
            .count("SELECT coalesce(max(rows_done), 0) FROM usersync.backfill")
            .await;
        if done >= 300 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "backfill made no progress: {}",
            db.log_tail()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    child.kill().expect("SIGKILL");
    let _ = child.wait();
    let unfinished = db
        .count(
            "SELECT count(*) FROM usersync.backfill WHERE finished_at IS NULL AND rows_done < 2000",
        )
        .await;
    assert_eq!(unfinished, 1, "killed before the end");

    db.fake.set_latency(Duration::ZERO);
    let out = run_cli(
        db.binary_command(&["backfill", "--chunk-size", "100"]),
        CLI_LIMIT,
    )
    .await;
    assert_eq!(out.code, Some(0), "{}", out.all());
    assert!(out.stdout.contains("resumed"), "{}", out.all());
    // stderr is a pipe here, not a terminal: progress comes as plain log
    // lines (at least the final one), never as a redrawn bar.
    assert!(
        out.stderr.contains("backfill: 2000/2000 rows (100.0%)"),
        "{}",
        out.all()
    );
    assert!(
        !out.stderr.contains('\r') && !out.stderr.contains("\x1b[2K"),
        "{}",
        out.all()
    );
    db.wait_consistent(Duration::from_secs(60)).await;
    let finished = db
        .count("SELECT count(*) FROM usersync.backfill WHERE finished_at IS NOT NULL AND rows_done = 2000")
        .await;
    assert_eq!(finished, 1);
    daemon.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn backfill_without_a_daemon_refuses() {
    let db = TestDb::new(USERS_BIGINT).await;
    insert_users(&db, 1, 10).await;
    let out = run_cli(db.binary_command(&["backfill"]), CLI_LIMIT).await;
    assert_eq!(out.code, Some(1), "{}", out.all());
    assert!(
        out.stderr.contains("no daemon is streaming"),
        "{}",
        out.all()
    );
    assert_eq!(
        db.count("SELECT count(*) FROM usersync.sync_requests")
            .await,
        0
    );
}

fn sighup(child: &std::process::Child) {
    let pid = i32::try_from(child.id()).expect("pid");
    // SAFETY: sends a signal to our own child process.
    let rc = unsafe { libc::kill(pid, libc::SIGHUP) };
    assert_eq!(rc, 0, "kill -HUP");
}

async fn wait_log(db: &TestDb, needle: &str, occurrences: usize) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let text = std::fs::read_to_string(db.log_path()).unwrap_or_default();
        if text.matches(needle).count() >= occurrences {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "no {needle:?} in the log: {}",
            db.log_tail()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sync_off_then_on_pushes_each_changed_user_once() {
    let db = TestDb::new(USERS_BIGINT).await;
    insert_users(&db, 1, 100).await;
    let config =
        std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("{}.toml", db.dbname));
    std::fs::write(&config, "[sync]\nenabled = true\n").expect("config");
    let config_arg = config.display().to_string();
    let mut child = db.spawn_binary(&["--config", &config_arg, "run"]);
    db.wait_consistent(Duration::from_secs(60)).await;

    std::fs::write(&config, "[sync]\nenabled = false\n").expect("config");
    sighup(&child);
    wait_log(&db, "sync switched off", 1).await;
    let before = db.accepted().len();

    for i in 0..500 {
        db.exec(&format!(
            "UPDATE users SET name = 'off {i}' WHERE id = {}",
            i % 50 + 1
        ))
        .await;
    }
    let lsn: String = db
        .client
        .query_one("SELECT pg_current_wal_lsn()::text", &[])
        .await
        .expect("lsn")
        .get(0);
    // The slot keeps moving while off: WAL does not pile up.
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let caught_up: bool = db
            .client
            .query_one(
                "SELECT coalesce(confirmed_flush_lsn >= $1::text::pg_lsn, false) FROM pg_replication_slots WHERE slot_name = $2",
                &[&lsn, &db.dbname],
            )
            .await
            .expect("slot")
            .get(0);
        if caught_up {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the slot stopped advancing while off: {}",
            db.log_tail()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(db.accepted().len(), before, "nothing is pushed while off");
    assert_eq!(
        db.count("SELECT count(*) FROM usersync.pending_users")
            .await,
        50
    );

    std::fs::write(&config, "[sync]\nenabled = true\n").expect("config");
    sighup(&child);
    let fake = &db.fake;
    wait_for("the changed users", Duration::from_secs(60), || {
        fake.requests()
            .iter()
            .filter(|r| (200..300).contains(&r.status))
            .count()
            >= before + 50
    })
    .await;
    // A stray second push would come from a change or request committed
    // before now: once the slot is confirmed past now, it would have arrived.
    db.wait_consistent(Duration::from_secs(30)).await;
    db.wait_confirmed_past_now(Duration::from_secs(30)).await;
    let pushed: Vec<Value> = db.accepted()[before..].to_vec();
    assert_eq!(pushed.len(), 50, "each changed user once: {pushed:?}");
    let mut seen = std::collections::BTreeSet::new();
    for body in &pushed {
        assert_eq!(body["type"], "user.updated");
        let id = body["key"].as_i64().expect("key");
        assert!(seen.insert(id), "user {id} pushed twice");
        // The latest state: the last of its ten updates.
        let last = (0..500).filter(|i| i % 50 + 1 == id).max().expect("last");
        assert_eq!(body["data"]["name"], format!("off {last}"), "{body}");
    }
    assert_eq!(
        db.count("SELECT count(*) FROM usersync.pending_users")
            .await,
        0
    );

    // SAFETY: our own child.
    unsafe { libc::kill(i32::try_from(child.id()).expect("pid"), libc::SIGTERM) };
    let _ = child.wait();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn run_refuses_a_setup_without_the_request_table_in_the_publication() {
    let db = TestDb::new(USERS_BIGINT).await;
    db.exec("ALTER PUBLICATION usersync_users DROP TABLE usersync.sync_requests")
        .await;
    let out = run_cli(db.binary_command(&["run"]), CLI_LIMIT).await;
    assert_eq!(out.code, Some(2), "{}", out.all());
    assert!(
        out.stderr.contains("usersync.sync_requests")
            && out.stderr.contains("run `usersync setup`"),
        "{}",
        out.all()
    );
    // setup repairs it.
    usersync::app::setup::apply(&db.client, &db.config().database)
        .await
        .unwrap_or_else(|e| panic!("setup: {e}"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn backfill_links_an_existing_stripe_customer() {
    backfill_links_existing_stripe_customers(false).await;
}

/// Where Stripe answers the customer search 404 (an account without Search,
/// an implementation of the API without it), the look-up lists customers:
/// by email, and all of them when the customer's email is not the row's.
/// A customer with the row's email but another key is somebody else's.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn backfill_links_existing_stripe_customers_without_customer_search() {
    backfill_links_existing_stripe_customers(true).await;
}

async fn backfill_links_existing_stripe_customers(without_search: bool) {
    use usersync::dev::fake::stripe::{FakeStripe, FakeStripeOptions};
    const STRIPE_KEY: &str = "sk_test_51UsersyncBackfillKey0123";
    install_crypto();
    let db = TestDb::bare(USERS_BIGINT, "").await;
    insert_users(&db, 1, 3).await;
    let stripe = FakeStripe::start(FakeStripeOptions {
        api_key: STRIPE_KEY.into(),
        rate_limit_per_sec: 0,
        without_search,
        ..FakeStripeOptions::default()
    })
    .await
    .expect("fake stripe");
    let make = |form: &'static str| {
        let url = format!("{}/v1/customers", stripe.url());
        async move {
            let made: Value = reqwest::Client::new()
                .post(url)
                .bearer_auth(STRIPE_KEY)
                .header("content-type", "application/x-www-form-urlencoded")
                .body(form)
                .send()
                .await
                .expect("create customer")
                .json()
                .await
                .expect("customer json");
            made["id"].as_str().expect("customer id").to_string()
        }
    };
    // A customer made by another tool for row 2, carrying its key.
    let existing = make("email=u2%40example.com&metadata%5Busersync_key%5D=2").await;
    // Row 3's customer, made when the row had another email.
    let moved = make("email=old3%40example.com&metadata%5Busersync_key%5D=3").await;
    // Row 1's email, somebody else's key.
    let other = make("email=u1%40example.com&metadata%5Busersync_key%5D=99").await;
    let toml = format!(
        "[database]\nurl = \"{}\"\nslot = \"{}\"\norigin = \"{}\"\n\
         [sink]\nkind = \"stripe\"\nurl = \"{}\"\napi_key_env = \"STRIPE_KEY\"\nrate_limit_per_sec = 0\n\
         [sink.mapping]\nemail = \"email\"\nname = \"name\"\n\"metadata.plan\" = \"plan\"\n\
         [retry]\ninitial_backoff_ms = 20\nmax_backoff_ms = 200\n",
        db.url,
        db.dbname,
        db.dbname,
        stripe.url(),
    );
    let env: BTreeMap<String, String> = [("STRIPE_KEY".to_string(), STRIPE_KEY.to_string())].into();
    let cfg =
        Config::from_parts(Some(&toml), "test", &env).unwrap_or_else(|e| panic!("config: {e}"));
    usersync::app::setup::apply(&db.client, &cfg.database)
        .await
        .unwrap_or_else(|e| panic!("setup failed: {e}"));
    let cancel = CancellationToken::new();
    let daemon_cfg = cfg.clone();
    let c = cancel.clone();
    let daemon = tokio::spawn(async move { usersync::app::run::run(&daemon_cfg, c, None).await });
    wait_slot_active(&db).await;
    let opts = Options {
        mode: Mode::Changed,
        dry_run: false,
        chunk_size: 500,
        beside_daemon: false,
    };
    let summary = usersync::app::backfill::run(&cfg, &opts, CancellationToken::new())
        .await
        .unwrap_or_else(|e| panic!("backfill: {e}"));
    assert_eq!(summary.queued, 3, "{summary}");

    let live: Vec<_> = stripe
        .customers()
        .into_iter()
        .filter(|c| !c.deleted)
        .collect();
    assert_eq!(live.len(), 4, "{live:?}");
    let ext = |id: i64| {
        let client = &db.client;
        async move {
            let ext: Option<String> = client
                .query_one("SELECT external_user_id FROM users WHERE id = $1", &[&id])
                .await
                .expect("row")
                .get(0);
            ext
        }
    };
    assert_eq!(ext(2).await, Some(existing), "linked, not duplicated");
    assert_eq!(
        ext(3).await,
        Some(moved),
        "linked by its key, not its old email"
    );
    let first = ext(1).await.expect("row 1 synced");
    assert_ne!(first, other, "linked to a customer with another key");
    cancel.cancel();
    match tokio::time::timeout(Duration::from_secs(30), daemon).await {
        Ok(Ok(Ok(()))) => {}
        other => panic!("daemon did not stop cleanly: {other:?}"),
    }
}

/// Answered requests older than a day are deleted by the daemon; open ones
/// and recent answers stay.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn answered_requests_are_pruned_after_a_day() {
    let db = TestDb::new(USERS_BIGINT).await;
    // Written as if a daemon had answered them long ago; the slot is moved
    // past them so that the daemon does not answer them again (the open one
    // must survive either way).
    db.exec(
        "INSERT INTO usersync.sync_requests (user_key, reason, requested_at, done_at, outcome) VALUES
            ('1', 'sync-user', now() - interval '3 days', now() - interval '2 days', 'synced'),
            ('2', 'backfill', now() - interval '3 days', now() - interval '2 days', 'synced'),
            ('3', 'sync-user', now() - interval '2 hours', now() - interval '1 hour', 'synced'),
            ('4', 'backfill', now() - interval '3 days', NULL, NULL);",
    )
    .await;
    db.exec("SELECT pg_replication_slot_advance(current_database(), pg_current_wal_lsn())")
        .await;
    let daemon = db.start_daemon();
    wait_until("the old answers to go", Duration::from_secs(30), || async {
        db.count("SELECT count(*) FROM usersync.sync_requests")
            .await
            == 2
    })
    .await;
    let left = db
        .count("SELECT count(*) FROM usersync.sync_requests WHERE user_key IN ('3', '4')")
        .await;
    assert_eq!(left, 2);
    daemon.stop().await;
}

/// `[backfill] on_start = true`: `run` pushes the users that existed before
/// usersync by itself, beside the stream.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn run_with_backfill_on_start_pushes_existing_users() {
    let db = TestDb::with_sink(
        &format!(
            "{USERS_BIGINT}; INSERT INTO users (id, email) SELECT g, 'old' || g || '@example.com' FROM generate_series(1, 200) g"
        ),
        "\n[backfill]\non_start = true\nchunk_size = 50\n",
    )
    .await;
    let daemon = db.start_daemon();
    db.exec("INSERT INTO users (id, email) VALUES (1000, 'new@example.com')")
        .await;
    db.wait_consistent(Duration::from_secs(60)).await;
    assert_eq!(
        db.count("SELECT count(*) FROM users WHERE external_user_id IS NULL")
            .await,
        0
    );
    wait_until(
        "the backfill to finish",
        Duration::from_secs(30),
        || async {
            db.count("SELECT count(*) FROM usersync.backfill WHERE finished_at IS NOT NULL")
                .await
                == 1
        },
    )
    .await;
    let users = db.fake.users();
    assert_eq!(users.len(), 201, "one external user per row, no duplicates");
    daemon.stop().await;
}
