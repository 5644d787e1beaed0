//! Exactly-once write-back across SIGKILL: a change written back just before
//! the kill is not pushed again after the restart, although the slot's
//! confirmed position had not caught up with it yet.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use crate::common::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_right_after_write_back_does_not_push_again() {
    install_crypto();
    let db = TestDb::new(USERS_BIGINT).await;
    let mut child = db.spawn_binary(&["run"]);
    let mut lagging = 0;
    for id in 1..=6i64 {
        db.client
            .execute(
                "INSERT INTO users (id, email) VALUES ($1, 'u' || $2 || '@example.com')",
                &[&id, &id.to_string()],
            )
            .await
            .expect("insert");
        let after: String = db
            .client
            .query_one("SELECT pg_current_wal_lsn()::text", &[])
            .await
            .expect("lsn")
            .get(0);
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let n = db
                .count(&format!(
                    "SELECT count(*) FROM users WHERE id = {id} AND external_user_id IS NOT NULL"
                ))
                .await;
            if n == 1 {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "user {id} not written back:\n{}",
                db.log_tail()
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        child.kill().expect("SIGKILL");
        let _ = child.wait();
        let behind: bool = db
            .client
            .query_one(
                "SELECT confirmed_flush_lsn < $1::text::pg_lsn FROM pg_replication_slots WHERE slot_name = $2",
                &[&after, &db.dbname],
            )
            .await
            .expect("slot")
            .get(0);
        if behind {
            lagging += 1;
        }
        child = db.spawn_binary(&["run"]);
    }
    db.wait_consistent(Duration::from_secs(30)).await;
    // A replay is of a change committed before now: once the slot is
    // confirmed past now, every replayed push has arrived.
    db.wait_confirmed_past_now(Duration::from_secs(30)).await;
    child.kill().expect("kill");
    let _ = child.wait();
    assert!(
        lagging > 0,
        "the slot never lagged behind the write-back at the kill: the test proved nothing"
    );
    let mut per_event: BTreeMap<String, usize> = BTreeMap::new();
    for r in db.fake.requests() {
        *per_event
            .entry(r.webhook_id.unwrap_or_default())
            .or_default() += 1;
    }
    let repeated: Vec<_> = per_event.iter().filter(|(_, n)| **n > 1).collect();
    assert!(
        repeated.is_empty(),
        "pushed again after restart: {repeated:?} (slot lagged {lagging} times)"
    );
    assert_eq!(db.fake.users().len(), 6);
}

/// The same for updates of one existing user: its progress record is moved
/// forward in place (`store::progress::ADVANCE_SQL`), not inserted, and a
/// replayed update it covers must not be pushed again either.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_right_after_an_update_write_back_does_not_push_again() {
    install_crypto();
    let db = TestDb::new(USERS_BIGINT).await;
    let mut child = db.spawn_binary(&["run"]);
    db.exec("INSERT INTO users (id, email) VALUES (1, 'u0@example.com')")
        .await;
    db.wait_consistent(Duration::from_secs(30)).await;
    let mut lagging = 0;
    for n in 1..=6i64 {
        let before = synced_at(&db).await;
        db.client
            .execute(
                "UPDATE users SET email = 'u' || $1 || '@example.com' WHERE id = 1",
                &[&n.to_string()],
            )
            .await
            .expect("update");
        let after: String = db
            .client
            .query_one("SELECT pg_current_wal_lsn()::text", &[])
            .await
            .expect("lsn")
            .get(0);
        let deadline = Instant::now() + Duration::from_secs(30);
        while synced_at(&db).await == before {
            assert!(
                Instant::now() < deadline,
                "update {n} not written back:\n{}",
                db.log_tail()
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        child.kill().expect("SIGKILL");
        let _ = child.wait();
        let behind: bool = db
            .client
            .query_one(
                "SELECT confirmed_flush_lsn < $1::text::pg_lsn FROM pg_replication_slots WHERE slot_name = $2",
                &[&after, &db.dbname],
            )
            .await
            .expect("slot")
            .get(0);
        if behind {
            lagging += 1;
        }
        child = db.spawn_binary(&["run"]);
    }
    db.wait_consistent(Duration::from_secs(30)).await;
    db.wait_confirmed_past_now(Duration::from_secs(30)).await;
    child.kill().expect("kill");
    let _ = child.wait();
    assert!(
        lagging > 0,
        "the slot never lagged behind the write-back at the kill: the test proved nothing"
    );
    let mut per_event: BTreeMap<String, usize> = BTreeMap::new();
    for r in db.fake.requests() {
        *per_event
            .entry(r.webhook_id.unwrap_or_default())
            .or_default() += 1;
    }
    let repeated: Vec<_> = per_event.iter().filter(|(_, n)| **n > 1).collect();
    assert!(
        repeated.is_empty(),
        "pushed again after restart: {repeated:?} (slot lagged {lagging} times)"
    );
    assert_eq!(
        per_event.len(),
        7,
        "one create and six updates: {per_event:?}"
    );
}

async fn synced_at(db: &TestDb) -> Option<String> {
    db.client
        .query_one(
            "SELECT external_synced_at::text FROM users WHERE id = 1",
            &[],
        )
        .await
        .expect("row")
        .get(0)
}
