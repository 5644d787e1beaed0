//! Dead letters from the daemon's side: a permanent refusal parks the user
//! (its later changes are stored behind, in order, never pushed) while other
//! users keep flowing, the slot moves past dead-lettered changes, and a
//! change that keeps failing past the retry budget is dead-lettered too.

use std::time::Duration;

use crate::common::*;

const WAIT: Duration = Duration::from_secs(30);

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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_user_is_parked_while_others_flow() {
    install_crypto();
    let db = TestDb::new(USERS_BIGINT).await;
    let daemon = db.start_daemon();
    db.exec("INSERT INTO users (id, email) VALUES (1, 'not-an-email')")
        .await;
    db.exec("UPDATE users SET name = 'first' WHERE id = 1")
        .await;
    db.exec("INSERT INTO users (id, email) VALUES (2, 'two@example.com')")
        .await;
    db.exec("UPDATE users SET name = 'second' WHERE id = 1")
        .await;
    db.exec("INSERT INTO users (id, email) VALUES (3, 'three@example.com')")
        .await;
    wait_for("users 2 and 3", WAIT, || db.fake.users().len() == 2).await;
    let deadline = std::time::Instant::now() + WAIT;
    while dead_letters(&db).await.len() < 3 && std::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let dl = dead_letters(&db).await;
    assert_eq!(dl.len(), 3, "{dl:?}");
    assert_eq!(
        (
            dl[0].0.as_str(),
            dl[0].1.as_str(),
            dl[0].2.as_str(),
            dl[0].3
        ),
        ("1", "user.created", "failed", Some(422))
    );
    assert!(dl[0].4.contains("invalid email"), "{}", dl[0].4);
    assert!(dl[1..]
        .iter()
        .all(|d| d.0 == "1" && d.1 == "user.updated" && d.2 == "parked"));
    // Never pushed out of order: one refused create, nothing after it.
    let for_user_1 = db
        .fake
        .requests()
        .into_iter()
        .filter(|r| r.body["key"] == 1)
        .count();
    assert_eq!(for_user_1, 1);

    // Fixing the row is a change too: parked behind, not pushed.
    db.exec("UPDATE users SET email = 'one@example.com' WHERE id = 1")
        .await;
    // Every dead-lettered change of user 1 lies below this position.
    let parked_lsn: String = db
        .client
        .query_one("SELECT pg_current_wal_lsn()::text", &[])
        .await
        .expect("lsn")
        .get(0);
    db.exec("INSERT INTO users (id, email) VALUES (4, 'four@example.com')")
        .await;
    wait_for("user 4", WAIT, || db.fake.users().len() == 3).await;

    // The slot moves past the dead-lettered changes (other databases of the
    // shared test cluster write WAL too, so the distance to the server's
    // current position says nothing; the position after the parked change does).
    db.wait_confirmed_past(&parked_lsn, WAIT).await;
    daemon.stop().await;
    assert_eq!(dead_letters(&db).await.len(), 4);

    // Still parked after a restart.
    let daemon = db.start_daemon();
    db.exec("UPDATE users SET plan = 'pro' WHERE id = 1").await;
    db.exec("INSERT INTO users (id, email) VALUES (5, 'five@example.com')")
        .await;
    wait_for("user 5", WAIT, || db.fake.users().len() == 4).await;
    let deadline = std::time::Instant::now() + WAIT;
    while dead_letters(&db).await.len() < 5 && std::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(dead_letters(&db).await.len(), 5);
    daemon.stop().await;

    // Once the dead letters are gone (as `dlq replay` or `discard` leaves
    // them), the user's next change is pushed again.
    db.exec("DELETE FROM usersync.dead_letters").await;
    let daemon = db.start_daemon();
    db.exec("UPDATE users SET name = 'back' WHERE id = 1").await;
    wait_for("user 1 pushed again", WAIT, || {
        db.fake
            .requests()
            .iter()
            .any(|r| r.body["key"] == 1 && r.body["data"]["name"] == "back")
    })
    .await;
    daemon.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retries_past_the_budget_are_dead_lettered() {
    install_crypto();
    let db = TestDb::with_sink(USERS_BIGINT, "").await;
    let mut cfg_toml = db.toml();
    cfg_toml.push_str("max_attempts = 3\n");
    let cfg =
        usersync::config::Config::from_parts(Some(&cfg_toml), "test", &db.env()).expect("config");
    db.fake.inject(usersync::dev::fake::Fault::Status {
        status: 503,
        count: 3,
    });
    let cancel = tokio_util::sync::CancellationToken::new();
    let c = cancel.clone();
    let task = tokio::spawn(async move { usersync::app::run::run(&cfg, c, None).await });
    db.exec("INSERT INTO users (id, email) VALUES (1, 'a@example.com')")
        .await;
    let deadline = std::time::Instant::now() + WAIT;
    while dead_letters(&db).await.is_empty() && std::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let dl = dead_letters(&db).await;
    assert_eq!(dl.len(), 1, "{dl:?}");
    assert_eq!(dl[0].3, Some(503));
    assert!(dl[0].4.contains("gave up after 3 attempts"), "{}", dl[0].4);
    assert_eq!(db.fake.requests().len(), 3);
    cancel.cancel();
    task.await.expect("join").expect("daemon");
}
