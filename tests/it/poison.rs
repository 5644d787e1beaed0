//! No poison pill: one hostile row value or one hostile answer from the
//! service fails that user's change (a dead letter with the reason, the
//! user parked) and never stops sync for everyone. Each test ends by
//! inserting another user after the poisoned ones and waiting for its
//! write-back; "nothing more of the poisoned user is pushed" is shown by its
//! next change, which travels the same lane and must be parked, not sent.

use std::time::{Duration, Instant};

use axum::body::Bytes;
use axum::http::StatusCode;
use axum::response::IntoResponse;
use serde_json::Value;
use tokio_util::sync::CancellationToken;
use usersync::config::Config;

use crate::common::*;

const WAIT: Duration = Duration::from_secs(60);

const USERS_WITH_JSON: &str = "CREATE TABLE public.users (
    id bigint PRIMARY KEY,
    email text NOT NULL,
    name text,
    j jsonb,
    js json
)";

/// (user key, state, last error) of every dead letter, in order.
async fn dead_letters(db: &TestDb) -> Vec<(String, String, String)> {
    db.client
        .query(
            "SELECT user_key, state, last_error FROM usersync.dead_letters ORDER BY id",
            &[],
        )
        .await
        .expect("dead letters")
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2)))
        .collect()
}

async fn external_id(db: &TestDb, id: i64) -> Option<String> {
    db.client
        .query_one("SELECT external_user_id FROM users WHERE id = $1", &[&id])
        .await
        .expect("row")
        .get(0)
}

/// Waits until user `id` is written back and `dead` dead letters exist.
async fn wait_settled(db: &TestDb, id: i64, dead: usize) {
    let settled = poll_until(WAIT, || async {
        external_id(db, id).await.is_some() && dead_letters(db).await.len() >= dead
    })
    .await;
    if !settled {
        panic!(
            "user {id} written back: {}; dead letters: {:?}; requests: {:?}",
            external_id(db, id).await.is_some(),
            dead_letters(db).await,
            db.fake
                .requests()
                .iter()
                .map(|r| (r.status, r.body["key"].clone()))
                .collect::<Vec<_>>()
        );
    }
}

fn nested(depth: usize) -> String {
    format!("{}1{}", "[".repeat(depth), "]".repeat(depth))
}

/// Issue items 2 and 7: valid jsonb with numbers beyond f64 and nesting
/// beyond serde_json's limit is delivered digit for digit; a json value
/// PostgreSQL accepts but JSON text cannot hold (a lone surrogate) becomes
/// that user's dead letter naming the column, not a halted daemon.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_values_are_delivered_exactly_or_dead_letter_one_user() {
    install_crypto();
    let db = TestDb::new(USERS_WITH_JSON).await;
    let daemon = db.start_daemon();
    let deep = nested(200);
    db.exec(&format!(
        r#"INSERT INTO users (id, email, j) VALUES (1, 'one@example.com',
           '{{"n": 1e400, "big": 123456789012345678901234567890,
              "dec": 0.1000000000000000000001, "deep": {deep}}}')"#
    ))
    .await;
    db.exec(
        r#"INSERT INTO users (id, email, js) VALUES (2, 'two@example.com', '{"a": "\ud800"}')"#,
    )
    .await;
    // The poisoned user's next change: it must be parked behind, never sent.
    db.exec("UPDATE users SET name = 'after' WHERE id = 2")
        .await;
    db.exec("INSERT INTO users (id, email) VALUES (3, 'three@example.com')")
        .await;
    let deadline = Instant::now() + WAIT;
    while !daemon.task.is_finished() && Instant::now() < deadline {
        if external_id(&db, 3).await.is_some() && dead_letters(&db).await.len() >= 2 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    if daemon.task.is_finished() {
        daemon.stop().await;
        panic!("the daemon stopped");
    }
    wait_settled(&db, 3, 2).await;
    assert!(external_id(&db, 1).await.is_some());

    let sent = db.accepted();
    let one = sent
        .iter()
        .find(|b| b["key"] == 1)
        .expect("user 1 was pushed");
    let expected = format!(
        r#"{{"big":123456789012345678901234567890,"dec":0.1000000000000000000001,"deep":{deep},"n":1{}}}"#,
        "0".repeat(400)
    );
    assert_eq!(serde_json::to_string(&one["data"]["j"]).unwrap(), expected);

    assert!(
        db.fake.requests().iter().all(|r| r.body["key"] != 2),
        "the poisoned user was pushed"
    );
    let dl = dead_letters(&db).await;
    assert_eq!(dl.len(), 2, "{dl:?}");
    assert_eq!((dl[0].0.as_str(), dl[0].1.as_str()), ("2", "failed"));
    assert!(dl[0].2.contains("column js"), "{}", dl[0].2);
    assert_eq!((dl[1].0.as_str(), dl[1].1.as_str()), ("2", "parked"));
    daemon.stop().await;
}

/// The hostile endpoint: the answer depends on the user's email.
async fn hostile(body: Bytes) -> axum::response::Response {
    let envelope: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
    let email = envelope["data"]["email"].as_str().unwrap_or_default();
    let key = envelope["key"].to_string();
    let json = |status: StatusCode, text: Vec<u8>| {
        (status, [("content-type", "application/json")], text).into_response()
    };
    let padded = |n: usize| format!(r#"{{"id":"x","pad":"{}"}}"#, "x".repeat(n)).into_bytes();
    match email {
        "nul@example.com" => json(StatusCode::OK, br#"{"id":"ab\u0000cd"}"#.to_vec()),
        "ctl@example.com" => json(StatusCode::OK, br#"{"id":"a\u0007b"}"#.to_vec()),
        "utf8@example.com" => json(StatusCode::OK, b"{\"id\":\"ab\xffcd\"}".to_vec()),
        "float@example.com" => json(StatusCode::OK, br#"{"id":1.5}"#.to_vec()),
        "object@example.com" => json(StatusCode::OK, br#"{"id":{"x":1}}"#.to_vec()),
        "long@example.com" => json(
            StatusCode::OK,
            format!(r#"{{"id":"{}"}}"#, "i".repeat(100_000)).into_bytes(),
        ),
        "big@example.com" => json(
            StatusCode::OK,
            br#"{"id":123456789012345678901234567890}"#.to_vec(),
        ),
        "huge@example.com" => json(StatusCode::OK, padded(50 * 1024 * 1024)),
        "hugeerr@example.com" => json(StatusCode::BAD_GATEWAY, padded(50 * 1024 * 1024)),
        _ => json(
            StatusCode::OK,
            format!(r#"{{"id":"ok_{key}"}}"#).into_bytes(),
        ),
    }
}

/// Issue items 1, 3 and 6: answers with an unstorable id (NUL, control
/// character, invalid UTF-8, float, object, 100 kB) or a 50 MB body (2xx or
/// error) each fail that user's push permanently; a huge integer id is kept
/// digit for digit; the user inserted after all of them is written back.
/// An update whose only change is a value that cannot be converted is that
/// user's dead letter naming the column, not an update of nothing (which
/// would be dropped, and the bad value never reported).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_update_of_only_an_unconvertible_value_is_dead_lettered() {
    install_crypto();
    let db = TestDb::new(USERS_WITH_JSON).await;
    let daemon = db.start_daemon();
    db.exec("INSERT INTO users (id, email) VALUES (5, 'five@example.com')")
        .await;
    wait_until("user 5 synced", WAIT, || async {
        external_id(&db, 5).await.is_some()
    })
    .await;
    db.exec(r#"UPDATE users SET js = '{"a": "\ud800"}' WHERE id = 5"#)
        .await;
    // Ends early when the daemon stops: a stopped session dead-letters nothing.
    poll_until(WAIT, || async {
        !dead_letters(&db).await.is_empty() || daemon.task.is_finished()
    })
    .await;
    let dl = dead_letters(&db).await;
    assert!(!dl.is_empty(), "the update was not dead-lettered");
    assert_eq!((dl[0].0.as_str(), dl[0].1.as_str()), ("5", "failed"));
    assert!(dl[0].2.contains("column js"), "{}", dl[0].2);
    daemon.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_answers_dead_letter_one_user_each() {
    install_crypto();
    let db = TestDb::new(USERS_BIGINT).await;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    let server = tokio::spawn(async move {
        let app = axum::Router::new().route("/", axum::routing::post(hostile));
        let _ = axum::serve(listener, app).await;
    });
    let toml = db
        .toml()
        .replace(&db.fake.url(), &format!("http://{addr}/"));
    let cfg = Config::from_parts(Some(&toml), "test", &db.env()).expect("config");
    let cancel = CancellationToken::new();
    let c = cancel.clone();
    let task = tokio::spawn(async move { usersync::app::run::run(&cfg, c, None).await });

    let hostile_users: [(i64, &str, &str); 8] = [
        (1, "nul", "U+0000"),
        (2, "ctl", "U+0007"),
        (3, "utf8", "not valid UTF-8"),
        (4, "float", "not an integer"),
        (5, "object", "an object"),
        (6, "long", "100000 bytes long"),
        (7, "huge", "longer than sink.max_response_bytes"),
        (8, "hugeerr", "longer than sink.max_response_bytes"),
    ];
    for (id, name, _) in &hostile_users {
        db.exec(&format!(
            "INSERT INTO users (id, email) VALUES ({id}, '{name}@example.com')"
        ))
        .await;
        db.exec(&format!("UPDATE users SET name = 'next' WHERE id = {id}"))
            .await;
    }
    db.exec("INSERT INTO users (id, email) VALUES (9, 'big@example.com')")
        .await;
    db.exec("INSERT INTO users (id, email) VALUES (10, 'fine@example.com')")
        .await;
    wait_settled(&db, 10, 2 * hostile_users.len()).await;

    assert_eq!(external_id(&db, 10).await.as_deref(), Some("ok_10"));
    assert_eq!(
        external_id(&db, 9).await.as_deref(),
        Some("123456789012345678901234567890")
    );
    let dl = dead_letters(&db).await;
    assert_eq!(dl.len(), 2 * hostile_users.len(), "{dl:?}");
    for (id, _, reason) in &hostile_users {
        let key = id.to_string();
        let mine: Vec<_> = dl.iter().filter(|d| d.0 == key).collect();
        assert_eq!(mine.len(), 2, "user {id}: {mine:?}");
        assert_eq!(mine[0].1, "failed");
        assert!(mine[0].2.contains(reason), "user {id}: {}", mine[0].2);
        assert_eq!(mine[1].1, "parked", "user {id}");
        assert_eq!(external_id(&db, *id).await, None, "user {id}");
    }

    cancel.cancel();
    match tokio::time::timeout(Duration::from_secs(30), task).await {
        Ok(Ok(Ok(()))) => {}
        other => panic!("daemon: {other:?}"),
    }
    server.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn arrays_of_any_element_type_are_arrays_and_domains_their_base_type() {
    install_crypto();
    let db = TestDb::new(
        "CREATE TYPE mood AS ENUM ('happy', 'sad');
         CREATE DOMAIN posint AS int CHECK (VALUE > 0);
         CREATE DOMAIN tags AS text[];
         CREATE TYPE pair AS (a int, b text);
         CREATE TABLE public.users (
             id bigint PRIMARY KEY,
             email text NOT NULL,
             moods mood[],
             age posint,
             ages posint[],
             labels tags,
             pairs pair[]
         )",
    )
    .await;
    let daemon = db.start_daemon();
    db.exec(
        "INSERT INTO users VALUES (1, 'a@example.com', '{happy,sad}', 42, '{1,2}', '{x,\"y z\"}',
                                   ARRAY[ROW(1, 'one')::pair])",
    )
    .await;
    db.wait_consistent(WAIT).await;
    daemon.stop().await;
    let bodies = db.accepted();
    let data = &bodies
        .iter()
        .find(|b| b["type"] == "user.created")
        .expect("the create")["data"];
    assert_eq!(data["moods"], serde_json::json!(["happy", "sad"]), "{data}");
    assert_eq!(data["age"], serde_json::json!(42), "{data}");
    assert_eq!(data["ages"], serde_json::json!([1, 2]), "{data}");
    assert_eq!(data["labels"], serde_json::json!(["x", "y z"]), "{data}");
    assert_eq!(data["pairs"], serde_json::json!(["(1,one)"]), "{data}");
}

/// A write-back the app's table refuses for one row (here a trigger of the
/// app raising for one user; a CHECK constraint or a column too short for
/// the external id are the same SQLSTATE classes) fails that user's change,
/// not the batch and not the daemon: the users committed in the same
/// transaction are written back, the refused one becomes a dead letter
/// (pushed, not written back) and its next change is parked.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_back_refused_for_one_row_dead_letters_only_that_user() {
    let db = TestDb::new(USERS_WITH_JSON).await;
    db.exec(
        "CREATE FUNCTION app_guard() RETURNS trigger LANGUAGE plpgsql AS $$
         BEGIN
           IF NEW.email = 'refused@example.com' THEN
             RAISE EXCEPTION 'app rule: this account is frozen' USING ERRCODE = 'P0001';
           END IF;
           RETURN NEW;
         END $$;
         CREATE TRIGGER app_guard BEFORE UPDATE OF external_user_id ON users
           FOR EACH ROW EXECUTE FUNCTION app_guard();",
    )
    .await;
    let daemon = db.start_daemon();
    // One transaction: the three changes are written back in one batch.
    db.exec(
        "BEGIN;
         INSERT INTO users (id, email) VALUES (1, 'one@example.com');
         INSERT INTO users (id, email) VALUES (2, 'refused@example.com');
         INSERT INTO users (id, email) VALUES (3, 'three@example.com');
         COMMIT;",
    )
    .await;
    wait_settled(&db, 3, 1).await;
    assert!(external_id(&db, 1).await.is_some());
    assert_eq!(external_id(&db, 2).await, None);
    let dl = dead_letters(&db).await;
    assert_eq!(dl.len(), 1, "{dl:?}");
    assert_eq!((dl[0].0.as_str(), dl[0].1.as_str()), ("2", "failed"));
    assert!(dl[0].2.contains("P0001"), "{}", dl[0].2);
    assert!(dl[0].2.contains("this account is frozen"), "{}", dl[0].2);
    // The push made a record: the dead letter keeps its id (and the
    // attempts), so `dlq replay` updates that record instead of creating a
    // second one.
    let made = db.fake.live_users_with_key(&serde_json::json!(2));
    assert_eq!(made.len(), 1, "{made:?}");
    let row = db
        .client
        .query_one(
            "SELECT envelope->>'external_id', attempts FROM usersync.dead_letters WHERE user_key = '2'",
            &[],
        )
        .await
        .expect("dead letter");
    let (kept, attempts): (Option<String>, i32) = (row.get(0), row.get(1));
    assert_eq!(kept.as_deref(), Some(made[0].external_id.as_str()));
    assert_eq!(attempts, 1);

    // The refused user's next change is parked, and the stream goes on:
    // user 4, changed after it, is written back.
    db.exec("UPDATE users SET name = 'after' WHERE id = 2")
        .await;
    db.exec("INSERT INTO users (id, email) VALUES (4, 'four@example.com')")
        .await;
    wait_settled(&db, 4, 2).await;
    let dl = dead_letters(&db).await;
    assert_eq!(
        (dl[1].0.as_str(), dl[1].1.as_str()),
        ("2", "parked"),
        "{dl:?}"
    );
    let pushes_of_2 = db
        .fake
        .requests()
        .iter()
        .filter(|r| r.body["key"] == 2)
        .count();
    assert_eq!(pushes_of_2, 1, "only the create of user 2 was pushed");
    assert!(!daemon.task.is_finished(), "the daemon keeps running");
    daemon.stop().await;
}
