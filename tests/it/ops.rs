//! Operator commands run as the real binary: `check` (every setup mistake,
//! one line each, all of them at once), `status` and `teardown`.

use std::time::Duration;

use crate::common::*;
use serde_json::Value;
use usersync::dev::fake::memberstack::{FakeMemberstack, FakeMemberstackOptions};
use usersync::dev::pgtemp::{TempCluster, TempClusterOptions};

const LIMIT: Duration = Duration::from_secs(60);

async fn check_json(db: &TestDb, cmd: std::process::Command) -> (Option<i32>, Value) {
    let _ = db;
    let out = run_cli(cmd, LIMIT).await;
    let v: Value = serde_json::from_str(&out.stdout)
        .unwrap_or_else(|e| panic!("check --json printed no JSON ({e}): {}", out.all()));
    (out.code, v)
}

/// A stopped daemon's walsender may take a moment to release the slot.
async fn wait_slot_inactive(db: &TestDb) {
    for _ in 0..200 {
        let active = db
            .count(&format!(
                "SELECT count(*) FROM pg_replication_slots WHERE slot_name = '{}' AND active",
                db.dbname
            ))
            .await;
        if active == 0 {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("slot {} still active after the daemon stopped", db.dbname);
}

/// The level of the first finding named `check`, and its whole line.
fn level<'a>(report: &'a Value, check: &str) -> (&'a str, &'a Value) {
    let f = report["checks"]
        .as_array()
        .expect("checks")
        .iter()
        .find(|f| f["check"] == check)
        .unwrap_or_else(|| panic!("no finding {check} in {report:#}"));
    (f["level"].as_str().unwrap_or_default(), f)
}

#[tokio::test]
async fn check_passes_on_a_good_setup() {
    let db = TestDb::new(USERS_UUID).await;
    let out = run_cli(db.binary_command(&["check"]), LIMIT).await;
    assert_eq!(out.code, Some(0), "{}", out.all());
    assert!(out.stdout.contains("all checks passed"), "{}", out.all());
    assert!(!out.stdout.contains("FAIL"), "{}", out.all());
}

#[tokio::test]
async fn check_reports_every_mistake_with_its_fix() {
    let db = TestDb::new(USERS_UUID).await;
    db.exec(
        "ALTER TABLE users REPLICA IDENTITY DEFAULT;
         ALTER TABLE users DROP COLUMN external_synced_at;
         ALTER PUBLICATION usersync_users DROP TABLE users;
         DROP TABLE usersync.user_progress;",
    )
    .await;
    // The webhook secret's variable is unset: config loading fails, but the
    // database is still checked.
    let mut cmd = db.binary_command(&["check", "--json"]);
    cmd.env_remove("TEST_SECRET");
    let (code, report) = check_json(&db, cmd).await;
    assert_eq!(code, Some(1), "{report:#}");
    assert_eq!(report["ok"], false);
    let (l, f) = level(&report, "config");
    assert_eq!(l, "fail");
    assert!(
        f["message"].as_str().unwrap().contains("TEST_SECRET"),
        "{f}"
    );
    let (l, f) = level(&report, "columns");
    assert_eq!(l, "fail");
    assert!(
        f["message"]
            .as_str()
            .unwrap()
            .contains("ADD COLUMN external_synced_at timestamptz"),
        "{f}"
    );
    let (l, f) = level(&report, "replica_identity");
    assert_eq!(l, "fail");
    assert!(
        f["message"]
            .as_str()
            .unwrap()
            .contains("REPLICA IDENTITY FULL"),
        "{f}"
    );
    let (l, f) = level(&report, "publication");
    assert_eq!(l, "fail");
    assert!(
        f["message"].as_str().unwrap().contains("ALTER PUBLICATION"),
        "{f}"
    );
    assert_eq!(level(&report, "usersync_tables").0, "fail");
    // What is fine is said to be fine.
    assert_eq!(level(&report, "wal_level").0, "ok");
    assert_eq!(level(&report, "slot").0, "ok");
    assert_eq!(level(&report, "origin").0, "ok");
    assert_eq!(level(&report, "sink").0, "skipped");

    // The text form: one line per finding.
    let mut cmd = db.binary_command(&["check"]);
    cmd.env_remove("TEST_SECRET");
    let out = run_cli(cmd, LIMIT).await;
    assert_eq!(out.code, Some(1), "{}", out.all());
    let fails = out
        .stdout
        .lines()
        .filter(|l| l.starts_with("[FAIL]"))
        .count();
    assert_eq!(fails, 5, "{}", out.stdout);
}

#[tokio::test]
async fn check_reports_a_table_without_primary_key_and_missing_setup() {
    let db = TestDb::bare("CREATE TABLE users (id bigint, email text)", "").await;
    let (code, report) = check_json(&db, db.binary_command(&["check", "--json"])).await;
    assert_eq!(code, Some(1));
    let (l, f) = level(&report, "table");
    assert_eq!(l, "fail");
    assert!(
        f["message"].as_str().unwrap().contains("no primary key"),
        "{f}"
    );
    for missing in ["publication", "slot", "origin", "usersync_tables"] {
        let (l, f) = level(&report, missing);
        assert_eq!(l, "fail", "{f}");
        assert!(
            f["message"].as_str().unwrap().contains("usersync setup"),
            "{f}"
        );
    }
}

#[tokio::test]
async fn check_names_each_missing_privilege_with_its_grant() {
    let db = TestDb::new(USERS_UUID).await;
    let role = format!("r_{}", db.dbname);
    db.exec(&format!("CREATE ROLE {role} LOGIN")).await;
    let url = db.url.replace("://postgres@", &format!("://{role}@"));
    assert_ne!(url, db.url, "test URL format changed");
    let mut cmd = db.binary_command(&["check", "--json"]);
    cmd.env("USERSYNC_DATABASE_URL", &url);
    let (code, report) = check_json(&db, cmd).await;
    assert_eq!(code, Some(1), "{report:#}");
    for (check, fix) in [
        ("privilege.replication", format!("ALTER ROLE \"{role}\" REPLICATION;")),
        ("privilege.select", format!("GRANT SELECT ON \"public\".\"users\" TO \"{role}\";")),
        (
            "privilege.update",
            format!("GRANT UPDATE (external_user_id, external_synced_at) ON \"public\".\"users\" TO \"{role}\";"),
        ),
        ("privilege.usersync_schema", format!("GRANT USAGE ON SCHEMA usersync TO \"{role}\";")),
        (
            "privilege.origin",
            format!("GRANT EXECUTE ON FUNCTION pg_replication_origin_session_setup(text) TO \"{role}\";"),
        ),
    ] {
        let (l, f) = level(&report, check);
        assert_eq!(l, "fail", "{f}");
        assert!(f["fix"].as_str().unwrap_or_default().contains(&fix), "{check}: {f}");
    }
    // Applying the suggested fixes makes check pass.
    let fixes: Vec<String> = report["checks"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|f| {
            f["check"]
                .as_str()
                .unwrap_or_default()
                .starts_with("privilege.")
        })
        .filter_map(|f| f["fix"].as_str().map(str::to_string))
        .collect();
    db.exec(&fixes.join("\n")).await;
    let mut cmd = db.binary_command(&["check"]);
    cmd.env("USERSYNC_DATABASE_URL", &url);
    let out = run_cli(cmd, LIMIT).await;
    assert_eq!(out.code, Some(0), "{}", out.all());
}

#[tokio::test]
async fn check_warns_about_an_active_slot_and_retained_wal() {
    let db = TestDb::new(USERS_UUID).await;
    db.exec("INSERT INTO users (email) VALUES ('a@example.com')")
        .await;
    let daemon = db.start_daemon();
    db.wait_consistent(Duration::from_secs(30)).await;
    let mut cmd = db.binary_command(&["check", "--json"]);
    cmd.env("USERSYNC_DATABASE_MAX_RETAINED_WAL_MB", "0");
    let (code, report) = check_json(&db, cmd).await;
    assert_eq!(code, Some(1), "{report:#}");
    // Streamed by usersync itself: healthy.
    let (l, f) = level(&report, "slot_active");
    assert_eq!(l, "ok", "{f}");
    let (l, f) = level(&report, "retained_wal");
    assert_eq!(l, "warn");
    assert!(
        f["message"]
            .as_str()
            .unwrap()
            .contains("max_retained_wal_mb"),
        "{f}"
    );
    // The running daemon holds its WAL sender: that is not a shortage.
    assert_eq!(level(&report, "wal_senders").0, "ok");
    daemon.stop().await;
    wait_slot_inactive(&db).await;

    // Another consumer on the slot is a problem, with the way out.
    let c = cluster();
    let mut other = std::process::Command::new(c.bin_dir().join("pg_recvlogical"))
        .args(["-h", c.host(), "-U", "postgres", "--no-loop", "--start"])
        .arg(format!("--port={}", c.port()))
        .arg(format!("--dbname={}", db.dbname))
        .arg(format!("--slot={}", db.dbname))
        .args([
            "-o",
            "proto_version=1",
            "-o",
            "publication_names=usersync_users",
        ])
        .args(["-f", "/dev/null"])
        .spawn()
        .expect("pg_recvlogical");
    let mut report = Value::Null;
    for _ in 0..100 {
        let (_, r) = check_json(&db, db.binary_command(&["check", "--json"])).await;
        report = r;
        // Until pg_recvlogical has attached, there is no slot_active finding yet.
        let warned = report["checks"].as_array().is_some_and(|c| {
            c.iter()
                .any(|f| f["check"] == "slot_active" && f["level"] == "warn")
        });
        if warned {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let _ = other.kill();
    let _ = other.wait();
    let (l, f) = level(&report, "slot_active");
    assert_eq!(l, "warn", "{report:#}");
    assert!(
        f["fix"].as_str().unwrap().contains("pg_terminate_backend"),
        "{f}"
    );
}

#[tokio::test]
async fn check_reports_an_unreachable_sink_and_a_wrong_api_key() {
    install_crypto();
    let db = TestDb::new(USERS_UUID).await;
    let mut cmd = db.binary_command(&["check", "--json"]);
    cmd.env("USERSYNC_SINK_URL", "http://127.0.0.1:9/hooks");
    let (code, report) = check_json(&db, cmd).await;
    assert_eq!(code, Some(1));
    let (l, f) = level(&report, "sink");
    assert_eq!(l, "fail");
    assert!(
        f["message"].as_str().unwrap().contains("not reachable"),
        "{f}"
    );

    let api = FakeMemberstack::start(FakeMemberstackOptions {
        api_key: "sk_right".into(),
        ..Default::default()
    })
    .await
    .expect("fake memberstack");
    let memberstack = |key: &str| {
        let mut cmd = db.binary_command(&["check", "--json"]);
        cmd.env("USERSYNC_SINK_KIND", "memberstack")
            .env("USERSYNC_SINK_URL", api.url())
            .env("USERSYNC_SINK_API_KEY_ENV", "MS_KEY")
            .env("USERSYNC_SINK_MAPPING", "email=email")
            .env("MS_KEY", key);
        cmd
    };
    let (code, report) = check_json(&db, memberstack("sk_wrong")).await;
    assert_eq!(code, Some(1));
    let (l, f) = level(&report, "sink");
    assert_eq!(l, "fail");
    assert!(
        f["message"]
            .as_str()
            .unwrap()
            .contains("rejected the API key"),
        "{f}"
    );
    assert!(!f.to_string().contains("sk_wrong"), "{f}");
    let (code, report) = check_json(&db, memberstack("sk_right")).await;
    assert_eq!(code, Some(0), "{report:#}");
    assert!(
        api.members().is_empty(),
        "check must not create anything in the service"
    );
    api.shutdown().await;
}

#[tokio::test]
async fn check_reports_wal_level_and_no_free_slot_or_sender() {
    // A cluster of its own: these are server settings.
    let cluster = TempCluster::start(TempClusterOptions {
        extra_conf: vec![
            "wal_level = replica".into(),
            "max_replication_slots = 0".into(),
            "max_wal_senders = 0".into(),
        ],
        ..Default::default()
    })
    .expect("cluster");
    cluster.psql("postgres", USERS_UUID).expect("create table");
    let out = run_cli(
        {
            let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_usersync"));
            cmd.args(["check", "--json"])
                .env_remove("USERSYNC_CONFIG")
                .env("USERSYNC_DATABASE_URL", cluster.url("postgres"))
                .env("USERSYNC_SINK_URL", "http://127.0.0.1:9/")
                .env("USERSYNC_SINK_SECRET_ENV", "S")
                .env("S", "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw")
                .current_dir(std::env::temp_dir());
            cmd
        },
        LIMIT,
    )
    .await;
    assert_eq!(out.code, Some(1), "{}", out.all());
    let report: Value = serde_json::from_str(&out.stdout).expect("json");
    let (l, f) = level(&report, "wal_level");
    assert_eq!(l, "fail");
    assert!(
        f["fix"]
            .as_str()
            .unwrap()
            .contains("ALTER SYSTEM SET wal_level = logical"),
        "{f}"
    );
    let (l, f) = level(&report, "replication_slots");
    assert_eq!(l, "fail");
    assert!(
        f["fix"]
            .as_str()
            .unwrap()
            .contains("max_replication_slots = 1"),
        "{f}"
    );
    let (l, f) = level(&report, "wal_senders");
    assert_eq!(l, "fail");
    assert!(
        f["fix"].as_str().unwrap().contains("max_wal_senders = 1"),
        "{f}"
    );
}

#[tokio::test]
async fn status_shows_streaming_lag_dead_letters_and_newer_tables() {
    let db = TestDb::new(USERS_BIGINT).await;
    db.exec("INSERT INTO users (id, email) VALUES (1, 'a@example.com'), (2, 'b@example.com')")
        .await;
    let daemon = db.start_daemon();
    db.wait_consistent(Duration::from_secs(30)).await;

    let out = run_cli(db.binary_command(&["status"]), LIMIT).await;
    assert_eq!(out.code, Some(0), "{}", out.all());
    assert!(out.stdout.contains("streaming"), "{}", out.stdout);
    assert!(out.stdout.contains("yes (slot"), "{}", out.stdout);
    assert!(
        !out.stdout.contains("n/a (needs a newer `usersync setup`)"),
        "{}",
        out.stdout
    );
    let out = run_cli(db.binary_command(&["status", "--json"]), LIMIT).await;
    assert_eq!(out.code, Some(0), "{}", out.all());
    let s: Value = serde_json::from_str(&out.stdout).expect("json");
    assert_eq!(s["streaming"], true, "{s:#}");
    assert!(s["slot"]["active_pid"].as_i64().is_some(), "{s:#}");
    assert!(s["slot"]["confirmed_lsn"].as_str().is_some(), "{s:#}");
    assert!(s["slot"]["lag_bytes"].as_i64().is_some(), "{s:#}");
    assert_eq!(s["dead_letters"]["failed"], 0);
    // The daemon's own sync log: the two inserts.
    assert_eq!(s["sync_log"]["synced_last_hour"], 2, "{s:#}");
    assert!(s["sync_log"]["last_synced_at"].as_str().is_some(), "{s:#}");
    assert_eq!(s["backfill_table"], true);
    assert!(s["backfill"].is_null(), "no backfill ran: {s:#}");
    daemon.stop().await;
    wait_slot_inactive(&db).await;

    // The sync log and backfill cursor, filled by hand.
    db.exec(
        "TRUNCATE usersync.sync_log;
         INSERT INTO usersync.sync_log (operation, user_key, outcome, attempts) VALUES
            ('insert', '1', 'synced', 1), ('insert', '2', 'synced', 2), ('update', '1', 'dead_letter', 5),
            ('update', '1', 'parked', 0);
         INSERT INTO usersync.sync_log (logged_at, operation, user_key, outcome, attempts) VALUES
            (now() - interval '2 hours', 'insert', '3', 'synced', 1);
         INSERT INTO usersync.backfill (id, mode, cursor, rows_total, rows_done, started_at, updated_at, finished_at)
            VALUES (1, 'missing', '500', 1000, 500, now(), now(), NULL);
         INSERT INTO usersync.dead_letters (event_id, user_key, operation, state, envelope, last_error,
            attempts, first_attempt_at, last_attempt_at, commit_lsn) VALUES
            ('e1', '1', 'update', 'failed', '{}', 'HTTP 400', 5, now(), now(), '0/1'),
            ('e2', '1', 'update', 'parked', '{}', 'parked', 0, now(), now(), '0/2');",
    )
    .await;
    let out = run_cli(db.binary_command(&["status", "--json"]), LIMIT).await;
    let s: Value = serde_json::from_str(&out.stdout).expect("json");
    assert_eq!(s["streaming"], false, "{s:#}");
    assert_eq!(s["sync_log"]["synced_last_hour"], 2, "{s:#}");
    assert_eq!(s["sync_log"]["dead_lettered_last_hour"], 1, "{s:#}");
    assert!(s["sync_log"]["last_synced_at"].as_str().is_some(), "{s:#}");
    assert_eq!(s["dead_letters"]["failed"], 1);
    assert_eq!(s["dead_letters"]["parked"], 1);
    assert_eq!(s["dead_letters"]["parked_users"], 1);
    assert_eq!(s["backfill"]["rows_done"], 500);
    let out = run_cli(db.binary_command(&["status"]), LIMIT).await;
    assert!(out.stdout.contains("500/1000 rows (50%)"), "{}", out.stdout);
    assert!(
        out.stdout.contains("2 synced, 1 dead-lettered"),
        "{}",
        out.stdout
    );
    assert!(out.stdout.contains("no (slot"), "{}", out.stdout);
    assert!(!out.stdout.contains("warning"), "{}", out.stdout);
    let mut cmd = db.binary_command(&["status"]);
    cmd.env("USERSYNC_DATABASE_MAX_RETAINED_WAL_MB", "0");
    let out = run_cli(cmd, LIMIT).await;
    assert_eq!(out.code, Some(0), "{}", out.all());
    assert!(
        out.stdout
            .contains("warning: the slot retains more than database.max_retained_wal_mb = 0 MiB"),
        "{}",
        out.stdout
    );
}

#[tokio::test]
async fn teardown_asks_refuses_while_running_and_keeps_the_table() {
    let db = TestDb::new(USERS_BIGINT).await;
    db.exec("INSERT INTO users (id, email) VALUES (1, 'a@example.com')")
        .await;
    let daemon = db.start_daemon();
    db.wait_consistent(Duration::from_secs(30)).await;

    let out = run_cli(db.binary_command(&["teardown", "--yes"]), LIMIT).await;
    assert_eq!(out.code, Some(1), "{}", out.all());
    assert!(
        out.stderr.contains("a usersync daemon is running"),
        "{}",
        out.all()
    );
    daemon.stop().await;
    wait_slot_inactive(&db).await;

    let out = run_cli(db.binary_command(&["teardown"]), LIMIT).await;
    assert_eq!(out.code, Some(2), "{}", out.all());
    assert!(
        out.stdout.contains("pg_drop_replication_slot"),
        "{}",
        out.all()
    );
    assert!(out.stderr.contains("--yes"), "{}", out.all());
    assert_eq!(
        db.count(&format!(
            "SELECT count(*) FROM pg_replication_slots WHERE slot_name = '{}'",
            db.dbname
        ))
        .await,
        1,
        "nothing is dropped without --yes"
    );

    let out = run_cli(db.binary_command(&["teardown", "--yes"]), LIMIT).await;
    assert_eq!(out.code, Some(0), "{}", out.all());
    for (what, sql) in [
        (
            "slot",
            format!(
                "SELECT count(*) FROM pg_replication_slots WHERE slot_name = '{}'",
                db.dbname
            ),
        ),
        (
            "origin",
            format!(
                "SELECT count(*) FROM pg_replication_origin WHERE roname = '{}'",
                db.dbname
            ),
        ),
        (
            "publication",
            "SELECT count(*) FROM pg_publication WHERE pubname = 'usersync_users'".to_string(),
        ),
    ] {
        assert_eq!(db.count(&sql).await, 0, "{what} is still there");
    }
    // The app's data and usersync's schema stay.
    assert_eq!(
        db.count("SELECT count(*) FROM users WHERE external_user_id IS NOT NULL")
            .await,
        1
    );
    assert_eq!(
        db.count("SELECT count(*) FROM usersync.dead_letters").await,
        0
    );
    // A second teardown has nothing left to do.
    let out = run_cli(db.binary_command(&["teardown", "--yes"]), LIMIT).await;
    assert_eq!(out.code, Some(0), "{}", out.all());
    assert!(out.stdout.contains("nothing to drop"), "{}", out.all());
    // --drop-schema removes usersync's own tables as well.
    let out = run_cli(
        db.binary_command(&["teardown", "--yes", "--drop-schema"]),
        LIMIT,
    )
    .await;
    assert_eq!(out.code, Some(0), "{}", out.all());
    assert_eq!(
        db.count("SELECT count(*) FROM pg_namespace WHERE nspname = 'usersync'")
            .await,
        0
    );
    assert_eq!(db.count("SELECT count(*) FROM users").await, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_setups_all_succeed() {
    let db = TestDb::bare(USERS_UUID, "").await;
    let runs: Vec<_> = (0..3)
        .map(|_| run_cli(db.binary_command(&["setup"]), LIMIT))
        .collect();
    for out in futures::future::join_all(runs).await {
        assert_eq!(out.code, Some(0), "{}", out.all());
    }
    let out = run_cli(db.binary_command(&["check"]), LIMIT).await;
    assert_eq!(out.code, Some(0), "{}", out.all());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_metrics_endpoint_survives_a_flood_of_half_sent_requests() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let db = TestDb::new(USERS_UUID).await;
    let mut cfg = db.config();
    cfg.metrics.listen = "127.0.0.1:0".into();
    let cancel = tokio_util::sync::CancellationToken::new();
    let server = usersync::app::run::serve_metrics(&cfg, cancel.clone())
        .await
        .expect("serve")
        .expect("enabled");
    // Far more half-sent requests than the endpoint keeps connections for.
    let mut open = Vec::new();
    for _ in 0..200 {
        if let Ok(mut s) = tokio::net::TcpStream::connect(server.addr).await {
            let _ = s.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n").await;
            open.push(s);
        }
    }
    // Each is closed by the server (header-read timeout, or at once past the
    // connection cap): a read ends instead of waiting forever.
    for mut s in open {
        let mut buf = [0u8; 256];
        let read = tokio::time::timeout(Duration::from_secs(30), s.read(&mut buf)).await;
        assert!(read.is_ok(), "a half-sent request kept its connection open");
    }
    // And the endpoint still answers.
    let mut s = tokio::net::TcpStream::connect(server.addr)
        .await
        .expect("connect");
    s.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .await
        .expect("write");
    let mut answer = String::new();
    tokio::time::timeout(Duration::from_secs(30), s.read_to_string(&mut answer))
        .await
        .expect("an answer")
        .expect("read");
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    cancel.cancel();
}

#[tokio::test]
async fn check_refuses_sink_columns_that_name_no_column() {
    let db = TestDb::new(USERS_UUID).await;
    let mut cmd = db.binary_command(&["check", "--json"]);
    cmd.env("USERSYNC_SINK_COLUMNS", "email,nickname");
    let (code, report) = check_json(&db, cmd).await;
    assert_eq!(code, Some(1), "{report:#}");
    let (l, f) = level(&report, "sink_columns");
    assert_eq!(l, "fail", "{f}");
    assert!(
        f["message"]
            .as_str()
            .unwrap_or_default()
            .contains("nickname"),
        "{f}"
    );
}
