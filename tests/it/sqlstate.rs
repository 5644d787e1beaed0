//! The daemon decides by SQLSTATE whether a failed statement is worth
//! retrying (`core::error::sqlstate_kind`): a write-back the server refuses
//! for good stops `run` with exit 1 and the fix, while a serialization
//! failure is retried and the change still lands. The errors are raised by
//! a trigger with German text, so nothing can depend on English messages.

use std::time::Duration;

use crate::common::{run_cli, wait_for, TestDb, USERS_UUID};

/// A trigger that refuses every write-back with the given SQLSTATE, or only
/// the first one when `once`.
async fn refuse_write_back(db: &TestDb, code: &str, once: bool) {
    let guard = if once {
        "IF nextval('fail_once') = 1 THEN"
    } else {
        "IF true THEN"
    };
    db.exec(&format!(
        "CREATE SEQUENCE fail_once;
         CREATE FUNCTION refuse() RETURNS trigger LANGUAGE plpgsql AS $$
         BEGIN
           {guard}
             RAISE EXCEPTION 'Schreiben verweigert' USING ERRCODE = '{code}';
           END IF;
           RETURN NEW;
         END $$;
         CREATE TRIGGER refuse BEFORE UPDATE OF external_user_id ON users
           FOR EACH ROW WHEN (NEW.external_user_id IS DISTINCT FROM OLD.external_user_id)
           EXECUTE FUNCTION refuse();"
    ))
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_write_back_refused_for_good_stops_run_with_the_fix() {
    let db = TestDb::new(USERS_UUID).await;
    refuse_write_back(&db, "42501", false).await;
    db.exec("INSERT INTO users (email, name) VALUES ('ann@example.com', 'Ann')")
        .await;
    // Before the classification, run retried this forever.
    let out = run_cli(db.binary_command(&["run"]), Duration::from_secs(60)).await;
    assert_eq!(out.code, Some(1), "{}", out.all());
    let last = out.stderr.trim_end().lines().last().unwrap_or_default();
    assert!(last.starts_with("usersync: "), "{}", out.all());
    assert!(last.contains("Schreiben verweigert"), "{last}");
    assert!(last.contains("usersync setup --role"), "{last}");
    assert!(last.contains("retrying cannot fix this"), "{last}");
    // Nothing was confirmed past the change: a fixed setup gets it again.
    db.exec("DROP TRIGGER refuse ON users").await;
    let daemon = db.start_daemon();
    db.wait_consistent(Duration::from_secs(30)).await;
    daemon.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_serialization_failure_in_the_write_back_is_retried() {
    let db = TestDb::new(USERS_UUID).await;
    refuse_write_back(&db, "40001", true).await;
    let daemon = db.start_daemon();
    db.exec("INSERT INTO users (email, name) VALUES ('bob@example.com', 'Bob')")
        .await;
    db.wait_consistent(Duration::from_secs(30)).await;
    assert_eq!(db.count("SELECT last_value FROM fail_once").await, 2);
    // The same user's next change travels the same path after the retry.
    db.exec("UPDATE users SET name = 'Robert'").await;
    wait_for("the rename is pushed", Duration::from_secs(30), || {
        db.accepted()
            .iter()
            .any(|b| b.to_string().contains("Robert"))
    })
    .await;
    db.wait_consistent(Duration::from_secs(30)).await;
    assert!(!daemon.task.is_finished(), "the daemon keeps running");
    daemon.stop().await;
}

/// A batch refused for one row is written again one user at a time; an
/// error met there that is not about a row (here a missing privilege: the
/// trigger refuses the batch's row first, then its write on its own) still
/// stops `run` with the fix. It is never turned into the user's dead
/// letter, which would park a user whose only fault is the setup.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_setup_error_met_while_isolating_a_refused_row_still_stops_run() {
    let db = TestDb::new(USERS_UUID).await;
    db.exec(
        "CREATE SEQUENCE calls;
         CREATE FUNCTION refuse() RETURNS trigger LANGUAGE plpgsql AS $$
         BEGIN
           IF nextval('calls') = 1 THEN
             RAISE EXCEPTION 'Zeile verweigert' USING ERRCODE = 'P0001';
           END IF;
           RAISE EXCEPTION 'Schreiben verweigert' USING ERRCODE = '42501';
         END $$;
         CREATE TRIGGER refuse BEFORE UPDATE OF external_user_id ON users
           FOR EACH ROW WHEN (NEW.external_user_id IS DISTINCT FROM OLD.external_user_id)
           EXECUTE FUNCTION refuse();",
    )
    .await;
    db.exec("INSERT INTO users (email, name) VALUES ('dana@example.com', 'Dana')")
        .await;
    let out = run_cli(db.binary_command(&["run"]), Duration::from_secs(60)).await;
    assert_eq!(out.code, Some(1), "{}", out.all());
    let last = out.stderr.trim_end().lines().last().unwrap_or_default();
    assert!(last.contains("Schreiben verweigert"), "{last}");
    assert!(last.contains("retrying cannot fix this"), "{last}");
    assert_eq!(db.count("SELECT last_value FROM calls").await, 2);
    assert_eq!(
        db.count("SELECT count(*) FROM usersync.dead_letters").await,
        0,
        "a setup error is no user's dead letter"
    );
}
