//! WAL retention with an idle users table: when other tables take all the
//! writes (the managed-provider pattern), the slot's confirmed position still
//! follows the server's (the reader acknowledges a keepalive's `wal_end`
//! when no transaction is open, `pipeline::ack`), so PostgreSQL does not keep
//! that WAL for usersync; a users change afterwards still arrives once.

use std::time::Duration;

use crate::common::*;

const WAIT: Duration = Duration::from_secs(60);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wal_written_to_other_tables_is_confirmed_without_any_users_change() {
    install_crypto();
    let db = TestDb::new(USERS_BIGINT).await;
    let daemon = db.start_daemon();
    db.exec("INSERT INTO users (id, email) VALUES (1, 'one@example.com')")
        .await;
    db.wait_confirmed_past_now(WAIT).await;
    let last_users_change = db.confirmed_flush_lsn().await.expect("confirmed");
    db.exec("CREATE TABLE other (id bigserial PRIMARY KEY, pad text)")
        .await;
    for _ in 0..16 {
        db.exec("INSERT INTO other (pad) SELECT repeat('x', 1000) FROM generate_series(1, 2000)")
            .await;
    }
    let churned: String = db
        .client
        .query_one("SELECT pg_current_wal_lsn()::text", &[])
        .await
        .expect("lsn")
        .get(0);
    let churn_bytes: i64 = db
        .client
        .query_one(
            "SELECT pg_wal_lsn_diff($1::text::pg_lsn, $2::text::pg_lsn)::int8",
            &[&churned, &last_users_change],
        )
        .await
        .expect("diff")
        .get(0);
    assert!(
        churn_bytes > 16 * 1024 * 1024,
        "churn of {churn_bytes} bytes"
    );
    // No users change since: only keepalives can move the slot past this.
    db.wait_confirmed_past(&churned, WAIT).await;

    // The marker: the same user's next change still arrives, once.
    let before = db.accepted().len();
    db.exec("UPDATE users SET plan = 'pro' WHERE id = 1").await;
    db.wait_confirmed_past_now(WAIT).await;
    let after: Vec<String> = db.accepted()[before..]
        .iter()
        .map(|b| format!("{} {} {}", b["type"], b["data"]["id"], b["data"]["plan"]))
        .collect();
    assert_eq!(after, ["\"user.updated\" 1 \"pro\""]);
    daemon.stop().await;
}
