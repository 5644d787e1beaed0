//! A lost slot, for real: PostgreSQL removes WAL the stopped daemon's slot
//! still needed (`max_slot_wal_keep_size`), while the app inserts, updates
//! and deletes users. `run` then stops with exit 1 and names `usersync
//! recover`; `check` and `status` say the same; `recover` recreates the slot
//! and the daemon brings the service back in line with the table: changed
//! rows pushed, deleted users deleted, unchanged and already-deleted users
//! not pushed again.
//!
//! The test runs on a cluster of its own: a small `max_slot_wal_keep_size`
//! would invalidate the other tests' slots too.

use std::collections::BTreeMap;
use std::sync::OnceLock;
use std::time::Duration;

use serde_json::Value;
use usersync::dev::pgtemp::{TempCluster, TempClusterOptions};

use crate::common::*;

const WAIT: Duration = Duration::from_secs(60);

fn small_wal_cluster() -> &'static TempCluster {
    static CLUSTER: OnceLock<TempCluster> = OnceLock::new();
    CLUSTER.get_or_init(|| {
        TempCluster::start(TempClusterOptions {
            // The smallest setting: a checkpoint removes every segment
            // before its own, whatever a slot still needs.
            extra_conf: vec!["max_slot_wal_keep_size = '1MB'".into()],
            ..TempClusterOptions::default()
        })
        .unwrap_or_else(|e| panic!("cannot start the small-WAL PostgreSQL: {e}"))
    })
}

/// WAL churn, segment switches and checkpoints until the slot is lost.
async fn invalidate_slot(db: &TestDb) {
    db.exec("CREATE TABLE churn (id bigserial PRIMARY KEY, pad text)")
        .await;
    for _ in 0..10 {
        db.exec("INSERT INTO churn (pad) SELECT repeat('x', 1000) FROM generate_series(1, 4000)")
            .await;
        db.exec("SELECT pg_switch_wal(); CHECKPOINT;").await;
        let status: Option<String> = db
            .client
            .query_one(
                "SELECT wal_status FROM pg_replication_slots WHERE slot_name = $1",
                &[&db.dbname],
            )
            .await
            .expect("slot")
            .get(0);
        if status.as_deref() == Some("lost") {
            return;
        }
    }
    panic!("the slot was not invalidated by the WAL churn");
}

/// The webhook events that reached the service from `from` on, as
/// "type key" lines, sorted.
fn events_since(db: &TestDb, from: usize) -> Vec<String> {
    let mut out: Vec<String> = db.accepted()[from..]
        .iter()
        .map(|b| format!("{} {}", b["type"].as_str().unwrap_or("?"), b["key"]))
        .collect();
    out.sort();
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_slot_is_recovered_with_the_gap_pushed_once() {
    install_crypto();
    let db = TestDb::new_on(small_wal_cluster(), USERS_BIGINT).await;
    db.exec(
        "INSERT INTO users (id, email) SELECT g, 'u' || g || '@example.com' FROM generate_series(1, 8) g",
    )
    .await;
    let daemon = db.start_daemon();
    db.wait_consistent(WAIT).await;
    // Deleted before the loss: its delete was pushed and is not pushed again.
    db.exec("DELETE FROM users WHERE id = 8").await;
    db.wait_confirmed_past_now(WAIT).await;
    daemon.stop().await;

    // The gap, before and after PostgreSQL drops the WAL.
    db.exec(
        "INSERT INTO users (id, email) VALUES (9, 'nine@example.com'), (10, 'ten@example.com')",
    )
    .await;
    db.exec("UPDATE users SET plan = 'pro' WHERE id IN (1, 2)")
        .await;
    db.exec("DELETE FROM users WHERE id IN (3, 4)").await;
    // Changed and changed back: the service already has these values.
    db.exec(
        "UPDATE users SET plan = 'gold' WHERE id = 6; UPDATE users SET plan = 'free' WHERE id = 6",
    )
    .await;
    invalidate_slot(&db).await;
    db.exec("UPDATE users SET plan = 'team' WHERE id = 5; DELETE FROM users WHERE id = 9")
        .await;

    // `run` stops at once, with exit 1 and the way out.
    let run = run_cli(db.binary_command(&["run"]), WAIT).await;
    assert_eq!(run.code, Some(1), "{}", run.all());
    assert!(
        run.stderr.contains("usersync recover") && run.stderr.contains("can no longer be streamed"),
        "{}",
        run.all()
    );
    let check = run_cli(db.binary_command(&["check"]), WAIT).await;
    assert!(
        check.stdout.contains("[FAIL] slot:") && check.stdout.contains("usersync recover"),
        "{}",
        check.all()
    );
    let status = run_cli(db.binary_command(&["status"]), WAIT).await;
    assert!(
        status
            .stdout
            .contains("invalidated: run `usersync recover`"),
        "{}",
        status.all()
    );

    // A dry run counts and changes nothing.
    let dry = run_cli(db.binary_command(&["recover", "--dry-run", "--json"]), WAIT).await;
    assert_eq!(dry.code, Some(0), "{}", dry.all());
    let summary: Value = serde_json::from_str(&dry.stdout).expect("json");
    assert_eq!(
        (
            &summary["changed"],
            &summary["deleted"],
            &summary["already_deleted"]
        ),
        (&Value::from(4), &Value::from(2), &Value::from(1)),
        "{summary}"
    );
    assert_eq!(
        db.count("SELECT count(*) FROM usersync.sync_requests")
            .await,
        0
    );

    let recovered = run_cli(db.binary_command(&["recover"]), WAIT).await;
    assert_eq!(recovered.code, Some(0), "{}", recovered.all());
    let again = run_cli(db.binary_command(&["recover"]), WAIT).await;
    assert_eq!(
        again.code,
        Some(2),
        "a usable slot is refused: {}",
        again.all()
    );

    let before = db.accepted().len();
    let daemon = db.start_daemon();
    db.wait_consistent(WAIT).await;
    // The marker: a change after the recovery arrives after the requests.
    db.exec("UPDATE users SET name = 'marker' WHERE id = 7")
        .await;
    db.wait_confirmed_past_now(WAIT).await;
    daemon.stop().await;

    assert_eq!(
        events_since(&db, before),
        [
            "user.created 10",
            "user.deleted 3",
            "user.deleted 4",
            "user.updated 1",
            "user.updated 2",
            "user.updated 5",
            "user.updated 7",
        ]
    );
    // The service holds what the table holds, value for value, and no key
    // was ever created twice.
    let rows: BTreeMap<String, String> = db
        .client
        .query("SELECT id::text, plan FROM users", &[])
        .await
        .expect("rows")
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    let mut created: BTreeMap<String, usize> = BTreeMap::new();
    for user in db.fake.users() {
        let key = key_text(&user.key);
        *created.entry(key.clone()).or_default() += 1;
        if !user.deleted {
            assert_eq!(
                user.data["plan"].as_str(),
                rows.get(&key).map(String::as_str),
                "user {key}"
            );
        }
    }
    assert!(created.values().all(|n| *n == 1), "{created:?}");
    assert_eq!(
        db.count("SELECT count(*) FROM usersync.sync_requests WHERE done_at IS NULL")
            .await,
        0
    );
}
