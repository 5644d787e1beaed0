//! Operator-facing surfaces of a running daemon: `/metrics` values that move
//! with real changes, `/healthz`, `/readyz` (503 before streaming and while
//! the slot lags past the threshold, 200 while streaming), and the sync log
//! table (outcomes, attempts, retention pruning).

use std::process::Child;
use std::time::{Duration, Instant};

use crate::common::*;
use usersync::dev::fake::Fault;

const WAIT: Duration = Duration::from_secs(60);

/// The binary's `run` with the metrics endpoint on a free port, plus `envs`.
fn spawn_run(db: &TestDb, envs: &[(&str, &str)]) -> Child {
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(db.log_path())
        .expect("log file");
    let log2 = log.try_clone().expect("log file");
    let mut cmd = db.binary_command(&["run"]);
    cmd.env("USERSYNC_LOG_LEVEL", "info,usersync=debug")
        .env("USERSYNC_METRICS_LISTEN", "127.0.0.1:0");
    for (k, v) in envs {
        cmd.env(k, v);
    }
    cmd.stdout(log)
        .stderr(log2)
        .spawn()
        .expect("spawn usersync")
}

/// The metrics endpoint's base URL, read from the daemon's log.
pub async fn metrics_url(db: &TestDb) -> String {
    let deadline = Instant::now() + WAIT;
    loop {
        let log = std::fs::read_to_string(db.log_path()).unwrap_or_default();
        if let Some(at) = log.find("metrics on http://") {
            let rest = &log[at + "metrics on ".len()..];
            if let Some(end) = rest.find("/metrics") {
                return rest[..end].to_string();
            }
        }
        assert!(
            Instant::now() < deadline,
            "no metrics address in the log:\n{}",
            db.log_tail()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

pub async fn http_get(url: &str) -> (u16, String) {
    let r = reqwest::get(url)
        .await
        .unwrap_or_else(|e| panic!("GET {url}: {e}"));
    let status = r.status().as_u16();
    (status, r.text().await.unwrap_or_default())
}

/// The value of one series (`name{labels}` exactly as exposed), if present.
pub fn sample(text: &str, series: &str) -> Option<f64> {
    text.lines().find_map(|line| {
        let rest = line.strip_prefix(series)?;
        let value = rest.strip_prefix(' ')?;
        value.split(' ').next()?.parse().ok()
    })
}

/// Polls `base/path` until `ok(status, body)` holds.
async fn wait_http(base: &str, path: &str, what: &str, ok: impl Fn(u16, &str) -> bool) -> String {
    let deadline = Instant::now() + WAIT;
    loop {
        let (status, body) = http_get(&format!("{base}{path}")).await;
        if ok(status, &body) {
            return body;
        }
        assert!(
            Instant::now() < deadline,
            "timed out waiting for {what}; last {path}: {status} {body}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn stop(mut child: Child) {
    let _ = child.kill();
    let _ = child.wait();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_and_health_follow_a_real_run() {
    install_crypto();
    let db = TestDb::new(USERS_BIGINT).await;
    // Holding the daemon's origin keeps its session from starting: it is
    // up and alive but not streaming.
    db.client
        .execute(
            "SELECT pg_replication_origin_session_setup($1)",
            &[&db.dbname],
        )
        .await
        .expect("hold origin");
    let child = spawn_run(&db, &[]);
    let base = metrics_url(&db).await;
    assert_eq!(http_get(&format!("{base}/healthz")).await.0, 200);
    // Right after the start the election can still be under way (readyz
    // says standby); once this daemon leads, it waits for its origin.
    wait_http(
        &base,
        "/readyz",
        "the leader waiting for its origin",
        |s, b| s == 503 && b.contains("not streaming"),
    )
    .await;
    let (_, text) = http_get(&format!("{base}/metrics")).await;
    assert_eq!(sample(&text, "usersync_streaming"), Some(0.0), "{text}");

    db.client
        .execute("SELECT pg_replication_origin_session_reset()", &[])
        .await
        .expect("release origin");
    wait_http(&base, "/readyz", "readiness", |s, _| s == 200).await;

    db.exec("INSERT INTO users (id, email) VALUES (1, 'a@example.com'), (2, 'b@example.com'), (3, 'c@example.com')")
        .await;
    db.exec("UPDATE users SET name = 'Ann' WHERE id = 1").await;
    db.exec("INSERT INTO users (id, email) VALUES (4, 'not-an-email')")
        .await;
    let text = wait_http(&base, "/metrics", "counters", |_, t| {
        sample(t, "usersync_dead_letters_total{state=\"failed\"}") == Some(1.0)
            && sample(t, "usersync_changes_synced_total{operation=\"update\"}") == Some(1.0)
            && sample(t, "usersync_changes_synced_total{operation=\"insert\"}") == Some(3.0)
    })
    .await;
    let get =
        |series: &str| sample(&text, series).unwrap_or_else(|| panic!("{series} missing:\n{text}"));
    assert_eq!(
        get("usersync_changes_seen_total{operation=\"insert\"}"),
        4.0
    );
    assert_eq!(
        get("usersync_changes_seen_total{operation=\"update\"}"),
        1.0
    );
    assert_eq!(
        get("usersync_changes_seen_total{operation=\"delete\"}"),
        0.0
    );
    assert_eq!(
        get("usersync_pushes_total{sink=\"webhook\",outcome=\"ok\"}"),
        4.0
    );
    assert_eq!(
        get("usersync_pushes_total{sink=\"webhook\",outcome=\"permanent_error\"}"),
        1.0
    );
    assert_eq!(
        get("usersync_push_duration_seconds_count{sink=\"webhook\"}"),
        5.0
    );
    assert_eq!(get("usersync_sync_latency_seconds_count"), 4.0);
    assert_eq!(get("usersync_dead_letters_total{state=\"parked\"}"), 0.0);
    assert_eq!(get("usersync_parked_users"), 1.0);
    assert_eq!(get("usersync_streaming"), 1.0);
    assert!(
        get("usersync_replication_lag_bytes").is_finite(),
        "the lag's value is checked in readyz_fails_while_the_slot_lags_past_the_threshold"
    );
    assert!(get("usersync_buffered_changes_limit") >= 1.0);
    assert!(
        text.contains("# TYPE usersync_push_duration_seconds histogram"),
        "{text}"
    );
    assert!(text.contains("# HELP usersync_pushes "), "{text}");
    assert_eq!(http_get(&format!("{base}/readyz")).await.0, 200);
    stop(child);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readyz_fails_while_the_slot_lags_past_the_threshold() {
    install_crypto();
    let db = TestDb::new(USERS_BIGINT).await;
    // Retries never give up here: the change stays unconfirmed until cleared.
    let child = spawn_run(
        &db,
        &[
            ("USERSYNC_METRICS_READY_MAX_LAG_MB", "0"),
            ("USERSYNC_RETRY_MAX_ATTEMPTS", "100000"),
        ],
    );
    let base = metrics_url(&db).await;
    wait_http(&base, "/metrics", "streaming", |_, t| {
        sample(t, "usersync_streaming") == Some(1.0)
    })
    .await;
    // The service is down: the change cannot be confirmed, the slot lags.
    db.fake.inject(Fault::Status {
        status: 503,
        count: 100_000,
    });
    db.exec("INSERT INTO users (id, email) VALUES (1, 'a@example.com')")
        .await;
    let body = wait_http(&base, "/readyz", "lag over threshold", |s, b| {
        s == 503 && b.contains("lag")
    })
    .await;
    assert!(body.contains("ready_max_lag_mb"), "{body}");
    // One scrape is not a snapshot: an attempt can complete between the
    // pushes family and the retries family, so wait for both to show it.
    let text = wait_http(&base, "/metrics", "retries", |_, t| {
        sample(t, "usersync_push_retries_total{sink=\"webhook\"}").unwrap_or(0.0) >= 2.0
            && sample(
                t,
                "usersync_pushes_total{sink=\"webhook\",outcome=\"retryable_error\"}",
            )
            .unwrap_or(0.0)
                >= 2.0
    })
    .await;
    assert!(
        sample(
            &text,
            "usersync_pushes_total{sink=\"webhook\",outcome=\"retryable_error\"}"
        )
        .unwrap_or(0.0)
            >= 2.0,
        "{text}"
    );
    assert_eq!(
        sample(&text, "usersync_pushes_in_flight"),
        Some(1.0),
        "{text}"
    );
    assert_eq!(
        sample(&text, "usersync_buffered_changes"),
        Some(1.0),
        "{text}"
    );

    // The lag's value, not only its presence. The metric is the cluster's
    // WAL position minus the slot's confirmed one; other tests write WAL, so
    // bounds are taken against positions this test recorded. While the
    // change is refused the slot stays at or before its commit (the LSN in
    // its event id); ~1 MB of WAL written after it must show in the lag.
    let event_id = db.fake.requests()[0].body["id"]
        .as_str()
        .expect("event id")
        .to_string();
    let commit_lsn = format!(
        "{:X}/{:X}",
        u64::from_str_radix(&event_id[4..12], 16).expect("LSN"),
        u64::from_str_radix(&event_id[12..20], 16).expect("LSN")
    );
    db.exec(
        "CREATE TABLE filler AS SELECT g, repeat('x', 100) AS pad FROM generate_series(1, 8000) g",
    )
    .await;
    let at_least: f64 = db
        .client
        .query_one(
            "SELECT pg_wal_lsn_diff(pg_current_wal_lsn(), $1::text::pg_lsn)::float8",
            &[&commit_lsn],
        )
        .await
        .expect("lsn diff")
        .get(0);
    assert!(at_least > 500_000.0, "the filler wrote {at_least} bytes");
    wait_http(&base, "/metrics", "the lag to cover the filler", |_, t| {
        sample(t, "usersync_replication_lag_bytes").unwrap_or(0.0) >= at_least
    })
    .await;

    // Once the change is written back, the slot catches up: the lag falls
    // below the WAL written since a position recorded after the change.
    db.fake.clear();
    let caught_up: String = db
        .client
        .query_one("SELECT pg_current_wal_lsn()::text", &[])
        .await
        .expect("lsn")
        .get(0);
    db.wait_confirmed_past_now(WAIT).await;
    let deadline = std::time::Instant::now() + WAIT;
    loop {
        let (_, text) = http_get(&format!("{base}/metrics")).await;
        let lag = sample(&text, "usersync_replication_lag_bytes").expect("lag");
        let bound: f64 = db
            .client
            .query_one(
                "SELECT pg_wal_lsn_diff(pg_current_wal_lsn(), $1::text::pg_lsn)::float8",
                &[&caught_up],
            )
            .await
            .expect("lsn diff")
            .get(0);
        if lag <= bound {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "lag {lag} still above {bound}, the WAL written since {caught_up}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    stop(child);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_listen_conflict_is_a_config_error() {
    let db = TestDb::new(USERS_BIGINT).await;
    let taken = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = taken.local_addr().expect("addr").to_string();
    let mut cmd = db.binary_command(&["run"]);
    cmd.env("USERSYNC_METRICS_LISTEN", &addr);
    let out = run_cli(cmd, WAIT).await;
    assert_eq!(out.code, Some(2), "{}", out.all());
    assert!(out.stderr.contains("metrics.listen"), "{}", out.all());
    let mut cmd = db.binary_command(&["run"]);
    cmd.env("USERSYNC_METRICS_LISTEN", "localhost");
    let out = run_cli(cmd, WAIT).await;
    assert_eq!(out.code, Some(2), "{}", out.all());
    assert!(out.stderr.contains("metrics.listen"), "{}", out.all());
}

type LogRow = (
    String,
    String,
    Option<String>,
    String,
    i32,
    Option<f64>,
    Option<f64>,
    Option<String>,
);

async fn sync_log(db: &TestDb, user: &str) -> Vec<LogRow> {
    db.client
        .query(
            "SELECT event_id, operation, external_id, outcome, attempts, push_ms, latency_ms, commit_lsn::text \
             FROM usersync.sync_log WHERE user_key = $1 ORDER BY id",
            &[&user],
        )
        .await
        .expect("sync log")
        .iter()
        .map(|r| {
            (
                r.get::<_, Option<String>>(0).unwrap_or_default(),
                r.get(1),
                r.get(2),
                r.get(3),
                r.get(4),
                r.get(5),
                r.get(6),
                r.get(7),
            )
        })
        .collect()
}

async fn wait_rows(db: &TestDb, user: &str, n: usize) -> Vec<LogRow> {
    let deadline = Instant::now() + WAIT;
    loop {
        let rows = sync_log(db, user).await;
        if rows.len() >= n {
            return rows;
        }
        assert!(Instant::now() < deadline, "user {user}: {rows:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sync_log_records_outcomes_and_prunes_old_rows() {
    install_crypto();
    let db = TestDb::new(USERS_BIGINT).await;
    db.exec(
        "INSERT INTO usersync.sync_log (logged_at, operation, user_key, outcome, attempts) VALUES \
         (now() - interval '40 days', 'user.created', 'old', 'synced', 1), \
         (now() - interval '5 days', 'user.created', 'recent', 'synced', 1)",
    )
    .await;
    // Two refusals before the first create gets through: three attempts.
    db.fake.inject(Fault::Status {
        status: 503,
        count: 2,
    });
    let daemon = db.start_daemon();
    db.exec("INSERT INTO users (id, email) VALUES (1, 'a@example.com')")
        .await;
    let first = wait_rows(&db, "1", 1).await;
    db.exec("UPDATE users SET name = 'Ann' WHERE id = 1").await;
    db.exec("INSERT INTO users (id, email) VALUES (2, 'not-an-email')")
        .await;
    db.exec("UPDATE users SET name = 'Bob' WHERE id = 2").await;
    let one = wait_rows(&db, "1", 2).await;
    let two = wait_rows(&db, "2", 2).await;
    let ext: Option<String> = db
        .client
        .query_one("SELECT external_user_id FROM users WHERE id = 1", &[])
        .await
        .expect("row")
        .get(0);
    assert_eq!(first.len(), 1);
    let (event, op, ext1, outcome, attempts, push_ms, latency_ms, lsn) = &one[0];
    assert!(event.starts_with("evt_"), "{event}");
    assert_eq!(op, "user.created");
    assert_eq!(outcome, "synced");
    assert_eq!(*attempts, 3);
    assert!(ext.is_some() && ext1 == &ext, "{ext1:?} vs {ext:?}");
    assert!(push_ms.is_some_and(|ms| ms >= 0.0));
    assert!(latency_ms.is_some_and(|ms| ms >= 0.0));
    assert!(lsn.is_some());
    assert_eq!(
        (one[1].1.as_str(), one[1].3.as_str(), one[1].4),
        ("user.updated", "synced", 1)
    );
    assert_eq!(
        (two[0].1.as_str(), two[0].3.as_str(), two[0].4, two[0].5),
        ("user.created", "dead_letter", 1, None)
    );
    assert_eq!(
        (two[1].1.as_str(), two[1].3.as_str(), two[1].4),
        ("user.updated", "parked", 0)
    );
    // Retention (30 days by default) runs at start: the 40-day-old row goes,
    // the 5-day-old one stays.
    let deadline = Instant::now() + WAIT;
    while !sync_log(&db, "old").await.is_empty() {
        assert!(Instant::now() < deadline, "old row not pruned");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(sync_log(&db, "recent").await.len(), 1);
    daemon.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn run_without_the_sync_log_table_says_run_setup() {
    let db = TestDb::new(USERS_BIGINT).await;
    db.exec("DROP TABLE usersync.sync_log").await;
    let out = run_cli(db.binary_command(&["run"]), WAIT).await;
    assert_eq!(out.code, Some(2), "{}", out.all());
    assert!(out.stderr.contains("usersync.sync_log"), "{}", out.all());
    assert!(out.stderr.contains("usersync setup"), "{}", out.all());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sync_log_can_be_switched_off() {
    install_crypto();
    // sink_extra ends the [sink] section, so a new section can follow.
    let db = TestDb::with_sink(USERS_BIGINT, "[sync_log]\nenabled = false").await;
    let daemon = db.start_daemon();
    db.exec("INSERT INTO users (id, email) VALUES (1, 'a@example.com')")
        .await;
    db.wait_consistent(WAIT).await;
    daemon.stop().await;
    assert_eq!(db.count("SELECT count(*) FROM usersync.sync_log").await, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replay_is_in_the_sync_log() {
    install_crypto();
    let db = TestDb::new(USERS_BIGINT).await;
    let daemon = db.start_daemon();
    db.exec("INSERT INTO users (id, email) VALUES (7, 'not-an-email')")
        .await;
    wait_rows(&db, "7", 1).await;
    daemon.stop().await;
    db.exec("UPDATE users SET email = 'seven@example.com' WHERE id = 7")
        .await;
    let out = run_cli(db.binary_command(&["dlq", "replay", "--user", "7"]), WAIT).await;
    assert_eq!(out.code, Some(0), "{}", out.all());
    let rows = sync_log(&db, "7").await;
    assert_eq!(rows.len(), 2, "{rows:?}");
    let (event, op, ext, outcome, attempts, push_ms, _, lsn) = &rows[1];
    assert!(event.starts_with("evt_replay_"), "{event}");
    assert_eq!(
        (op.as_str(), outcome.as_str(), *attempts),
        ("user.created", "synced", 1)
    );
    assert!(
        ext.is_some() && push_ms.is_some() && lsn.is_none(),
        "{:?}",
        rows[1]
    );
}
