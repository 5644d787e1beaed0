//! `usersync dlq list | show | replay | discard`, end to end: real
//! PostgreSQL, the fake webhook service and the real binary. Dead letters
//! are inserted with `deadletter::insert`, the way the daemon stores them;
//! the daemon (in process) only makes the users known to the service first.

use std::process::Command;
use std::time::{Duration, SystemTime};

use serde_json::{json, Value};

use crate::common::{TestDb, USERS_BIGINT, USERS_UUID};
use usersync::core::outcome::DeadLetterState as State;
use usersync::core::outcome::NewDeadLetter;
use usersync::dev::fake::Fault;
use usersync::store::deadletter::{self};

const WAIT: Duration = Duration::from_secs(30);
const BIN: &str = env!("CARGO_BIN_EXE_usersync");

const ANN: &str = "11111111-1111-4111-8111-111111111111";
const BOB: &str = "22222222-2222-4222-8222-222222222222";
const CAT: &str = "33333333-3333-4333-8333-333333333333";
const DAN: &str = "44444444-4444-4444-8444-444444444444";
const EVE: &str = "55555555-5555-4555-8555-555555555555";

// ---------------------------------------------------------------- helpers

use crate::common::CliOutcome as Outcome;

async fn run(cmd: Command) -> Outcome {
    crate::common::run_cli(cmd, Duration::from_secs(60)).await
}

async fn dlq(db: &TestDb, args: &[&str]) -> Outcome {
    let mut full = vec!["dlq"];
    full.extend_from_slice(args);
    run(db.binary_command(&full)).await
}

fn expect_code(out: &Outcome, code: i32, what: &str) {
    assert_eq!(
        out.code,
        Some(code),
        "{what}: exit code\nstdout:\n{}\nstderr:\n{}",
        out.stdout,
        out.stderr
    );
}

/// A database set up by `usersync setup`, with the dead-letter table (which
/// an older setup may not create yet).
async fn dlq_db(table_sql: &str) -> TestDb {
    let db = TestDb::new(table_sql).await;
    ensure_table(&db).await;
    db
}

async fn ensure_table(db: &TestDb) {
    let exists: bool = db
        .client
        .query_one(
            "SELECT to_regclass('usersync.dead_letters') IS NOT NULL",
            &[],
        )
        .await
        .expect("to_regclass")
        .get(0);
    if !exists {
        db.exec(deadletter::TABLE_DDL).await;
    }
}

/// Runs the daemon until every row is synced, then stops it.
async fn sync_with_daemon(db: &TestDb) {
    let daemon = db.start_daemon();
    db.wait_consistent(WAIT).await;
    daemon.stop().await;
}

async fn external_id(db: &TestDb, key: &str) -> Option<String> {
    db.client
        .query_one(
            "SELECT external_user_id FROM users WHERE id::text = $1",
            &[&key],
        )
        .await
        .expect("row")
        .get(0)
}

async fn synced_at(db: &TestDb, key: &str) -> Option<SystemTime> {
    db.client
        .query_one(
            "SELECT external_synced_at FROM users WHERE id::text = $1",
            &[&key],
        )
        .await
        .expect("row")
        .get(0)
}

/// The `data` the stream pushed in the `user.created` of `key`.
fn created_data(db: &TestDb, key: &Value) -> Value {
    db.accepted()
        .into_iter()
        .find(|e| e["type"] == "user.created" && &e["key"] == key)
        .map(|e| e["data"].clone())
        .unwrap_or_else(|| panic!("no accepted user.created for {key}"))
}

/// Accepted envelopes pushed by a replay, in order.
fn replayed(db: &TestDb) -> Vec<Value> {
    db.accepted()
        .into_iter()
        .filter(|b| {
            b["id"]
                .as_str()
                .is_some_and(|id| id.starts_with("evt_replay_"))
        })
        .collect()
}

struct Letter<'a> {
    event_id: &'a str,
    key: &'a str,
    kind: &'static str,
    state: State,
    external_id: Option<&'a str>,
    data: Option<Value>,
    last_status: Option<u16>,
    last_error: &'a str,
    attempts: u32,
}

impl Letter<'_> {
    fn envelope(&self, key_json: Value) -> Value {
        json!({
            "id": self.event_id,
            "type": self.kind,
            "occurred_at": "2026-01-02T03:04:05Z",
            "table": "public.users",
            "key": key_json,
            "external_id": self.external_id,
            "data": self.data,
            "previous": null,
            "changed": self.data.as_ref().and_then(Value::as_object).map(|d| d.keys().cloned().collect::<Vec<_>>()).unwrap_or_default(),
            "omitted": [],
        })
    }
}

/// Inserts like the daemon does and returns the new entry's id.
async fn insert_letter(db: &TestDb, l: Letter<'_>, key_json: Value) -> i64 {
    let now = SystemTime::now();
    deadletter::insert(
        &db.client,
        &NewDeadLetter {
            event_id: l.event_id.to_string(),
            user_key: l.key.to_string(),
            operation: l.kind,
            state: l.state,
            envelope: l.envelope(key_json),
            last_status: l.last_status,
            last_error: l.last_error.to_string(),
            attempts: l.attempts,
            first_attempt_at: now - Duration::from_secs(60),
            last_attempt_at: now - Duration::from_secs(30),
            commit_lsn: "0/1000000".to_string(),
        },
    )
    .await
    .unwrap_or_else(|e| panic!("insert dead letter: {e}"));
    db.client
        .query_one(
            "SELECT id FROM usersync.dead_letters WHERE event_id = $1",
            &[&l.event_id],
        )
        .await
        .expect("dead letter id")
        .get(0)
}

async fn letters_of(db: &TestDb, key: &str) -> i64 {
    db.client
        .query_one(
            "SELECT count(*) FROM usersync.dead_letters WHERE user_key = $1",
            &[&key],
        )
        .await
        .expect("count")
        .get(0)
}

fn failed_update<'a>(
    event_id: &'a str,
    key: &'a str,
    external_id: Option<&'a str>,
    data: Value,
) -> Letter<'a> {
    Letter {
        event_id,
        key,
        kind: "user.updated",
        state: State::Failed,
        external_id,
        data: Some(data),
        last_status: Some(503),
        last_error: "HTTP 503: {\"error\":\"upstream unavailable\"}",
        attempts: 10,
    }
}

fn with_plan(data: &Value, plan: &str) -> Value {
    let mut d = data.clone();
    d["plan"] = json!(plan);
    d
}

// ------------------------------------------------------------------ tests

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn list_show_and_replay_user_push_the_current_row() {
    let db = dlq_db(USERS_UUID).await;
    db.exec(&format!(
        "INSERT INTO users (id, email, name) VALUES ('{ANN}', 'ann@example.com', 'Ann'), ('{BOB}', 'bob@example.com', 'Bob')"
    ))
    .await;
    sync_with_daemon(&db).await;
    let ann_ext = external_id(&db, ANN).await.expect("ann synced");
    let bob_ext = external_id(&db, BOB).await.expect("bob synced");
    let ann_data = created_data(&db, &json!(ANN));
    let bob_data = created_data(&db, &json!(BOB));

    let a1 = insert_letter(
        &db,
        failed_update(
            "evt_0000000001000000_0",
            ANN,
            Some(&ann_ext),
            with_plan(&ann_data, "pro"),
        ),
        json!(ANN),
    )
    .await;
    let a2 = insert_letter(
        &db,
        Letter {
            state: State::Parked,
            last_status: None,
            last_error: "parked behind evt_0000000001000000_0",
            attempts: 0,
            ..failed_update(
                "evt_0000000001000100_0",
                ANN,
                Some(&ann_ext),
                with_plan(&ann_data, "team"),
            )
        },
        json!(ANN),
    )
    .await;
    let b1 = insert_letter(
        &db,
        Letter {
            last_status: Some(422),
            last_error: &format!("HTTP 422: {}", "x".repeat(200)),
            attempts: 1,
            ..failed_update(
                "evt_0000000001000200_0",
                BOB,
                Some(&bob_ext),
                with_plan(&bob_data, "pro"),
            )
        },
        json!(BOB),
    )
    .await;
    assert!(a1 < a2 && a2 < b1);
    // The app moves on after the changes were dead-lettered.
    db.exec(&format!(
        "UPDATE users SET plan = 'enterprise' WHERE id = '{ANN}'"
    ))
    .await;
    let before = synced_at(&db, ANN).await.expect("synced_at");

    // list: readable, oldest first, no personal data.
    let out = dlq(&db, &["list"]).await;
    expect_code(&out, 0, "dlq list");
    let lines: Vec<&str> = out.stdout.lines().collect();
    assert_eq!(lines.len(), 4, "header and three entries:\n{}", out.stdout);
    assert!(lines[0].contains("EVENT") && lines[0].contains("LAST ERROR"));
    assert!(lines[1].starts_with(&a1.to_string()) && lines[1].contains("evt_0000000001000000_0"));
    assert!(lines[1].contains(ANN) && lines[1].contains("failed") && lines[1].contains("503"));
    assert!(lines[2].contains("parked") && lines[2].contains("user.updated"));
    assert!(lines[3].contains(BOB) && lines[3].contains("422"));
    assert!(
        !lines[3].contains(&"x".repeat(60)),
        "the error is an excerpt of at most 60 characters:\n{}",
        lines[3]
    );
    assert!(
        !out.stdout.contains("example.com"),
        "list output must not carry row data:\n{}",
        out.stdout
    );

    let out = dlq(&db, &["list", "--json"]).await;
    expect_code(&out, 0, "dlq list --json");
    let list: Value = serde_json::from_str(&out.stdout).expect("list --json is JSON");
    let list = list.as_array().expect("an array");
    let ids: Vec<i64> = list.iter().map(|e| e["id"].as_i64().unwrap()).collect();
    assert_eq!(ids, vec![a1, a2, b1]);
    assert!(
        list.iter().all(|e| e.get("envelope").is_none()),
        "{list:#?}"
    );
    assert_eq!(list[0]["user_key"], ANN);
    assert_eq!(list[0]["state"], "failed");
    assert_eq!(list[0]["attempts"], 10);
    assert_eq!(list[0]["last_status"], 503);
    assert_eq!(list[1]["state"], "parked");
    assert_eq!(list[1]["last_status"], Value::Null);
    assert!(!out.stdout.contains("example.com"));

    let out = dlq(&db, &["list", "--json", "--user", ANN]).await;
    expect_code(&out, 0, "dlq list --user");
    let only: Vec<Value> = serde_json::from_str(&out.stdout).expect("JSON");
    assert_eq!(only.len(), 2);

    // show: everything, the envelope included.
    let out = dlq(&db, &["show", &a1.to_string()]).await;
    expect_code(&out, 0, "dlq show");
    let shown: Value = serde_json::from_str(&out.stdout).expect("show is JSON");
    assert_eq!(shown["id"], a1);
    assert_eq!(shown["event_id"], "evt_0000000001000000_0");
    assert_eq!(shown["commit_lsn"], "0/1000000");
    assert_eq!(shown["envelope"]["data"]["plan"], "pro");
    assert_eq!(shown["envelope"]["external_id"], ann_ext.as_str());

    let out = dlq(&db, &["show", "987654"]).await;
    expect_code(&out, 2, "dlq show of an unknown id");
    assert!(out.stderr.contains("987654"), "{}", out.stderr);

    // replay --user: the current row, not the stored envelopes.
    let out = dlq(&db, &["replay", "--user", ANN]).await;
    expect_code(&out, 0, "dlq replay --user");
    assert!(
        out.stdout.contains(ANN) && out.stdout.contains(&ann_ext),
        "{}",
        out.stdout
    );
    let replayed: Vec<_> = db
        .fake
        .requests()
        .into_iter()
        .filter(|r| {
            r.webhook_id
                .as_deref()
                .is_some_and(|id| id.starts_with("evt_replay_"))
        })
        .collect();
    assert_eq!(replayed.len(), 1, "one push for the user: {replayed:#?}");
    let r = &replayed[0];
    assert_eq!(
        r.webhook_id.as_deref(),
        Some(format!("evt_replay_{a2}").as_str())
    );
    assert_eq!(r.signature_valid, Some(true));
    assert!((200..300).contains(&r.status), "{r:#?}");
    assert_eq!(r.body["id"], format!("evt_replay_{a2}"));
    assert_eq!(r.body["type"], "user.updated");
    assert_eq!(r.body["key"], ANN);
    assert_eq!(r.body["external_id"], ann_ext.as_str());
    // Exactly the stream's JSON of the row, with the app's latest change.
    assert_eq!(r.body["data"], with_plan(&ann_data, "enterprise"));
    let ann = db
        .fake
        .users()
        .into_iter()
        .find(|u| u.external_id == ann_ext)
        .expect("ann in the service");
    assert_eq!(ann.data["plan"], "enterprise");
    assert_eq!(db.fake.live_users_with_key(&json!(ANN)).len(), 1);
    // Written back, entries resolved; the other user untouched.
    assert_eq!(
        external_id(&db, ANN).await.as_deref(),
        Some(ann_ext.as_str())
    );
    assert!(synced_at(&db, ANN).await.expect("synced_at") > before);
    assert_eq!(letters_of(&db, ANN).await, 0);
    assert_eq!(letters_of(&db, BOB).await, 1);

    // Nothing left for that user.
    let out = dlq(&db, &["replay", "--user", ANN]).await;
    expect_code(&out, 0, "dlq replay of a user without dead letters");
    assert!(out.stdout.contains("no dead letters"), "{}", out.stdout);
}

/// `dlq replay` writes back through its own guarded UPDATE: a row whose
/// `external_synced_at` is newer than the replay (another writer, a later
/// sync) keeps it. Fails when the guard is dropped from the UPDATE in
/// src/app/dlq.rs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replay_never_overwrites_a_newer_sync() {
    let db = dlq_db(USERS_UUID).await;
    db.exec(&format!(
        "INSERT INTO users (id, email, name) VALUES ('{ANN}', 'ann@example.com', 'Ann')"
    ))
    .await;
    sync_with_daemon(&db).await;
    let ann_ext = external_id(&db, ANN).await.expect("ann synced");
    let ann_data = created_data(&db, &json!(ANN));
    insert_letter(
        &db,
        failed_update(
            "evt_0000000001000000_0",
            ANN,
            Some(&ann_ext),
            with_plan(&ann_data, "pro"),
        ),
        json!(ANN),
    )
    .await;
    db.exec(&format!(
        "UPDATE users SET plan = 'pro', external_synced_at = '2999-01-01 00:00:00+00' WHERE id = '{ANN}'"
    ))
    .await;
    let newer = synced_at(&db, ANN).await.expect("synced_at");

    let out = dlq(&db, &["replay", "--user", ANN]).await;
    expect_code(&out, 0, "dlq replay --user");
    let pushed = replayed(&db);
    assert_eq!(pushed.len(), 1, "{pushed:#?}");
    assert_eq!(pushed[0]["data"]["plan"], "pro");
    assert_eq!(letters_of(&db, ANN).await, 0);
    assert_eq!(
        synced_at(&db, ANN).await,
        Some(newer),
        "dlq replay overwrote a newer external_synced_at"
    );
    assert_eq!(
        external_id(&db, ANN).await.as_deref(),
        Some(ann_ext.as_str())
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replay_all_creates_updates_and_deletes_in_order() {
    let db = dlq_db(USERS_UUID).await;
    db.exec(&format!(
        "INSERT INTO users (id, email) VALUES ('{ANN}', 'ann@example.com'), ('{CAT}', 'cat@example.com')"
    ))
    .await;
    sync_with_daemon(&db).await;
    let ann_ext = external_id(&db, ANN).await.expect("ann synced");
    let cat_ext = external_id(&db, CAT).await.expect("cat synced");
    let ann_data = created_data(&db, &json!(ANN));
    // While the daemon is away: a new user, a deleted one.
    db.exec(&format!(
        "INSERT INTO users (id, email, name, plan) VALUES ('{DAN}', 'dan@example.com', 'Dan', 'pro');
         DELETE FROM users WHERE id = '{CAT}'"
    ))
    .await;

    // Oldest first: Dan's create, Cat's delete, Eve (never synced, gone), Ann.
    let dan_data =
        json!({"id": DAN, "email": "dan@example.com", "name": "Dan", "plan": "free", "bio": null});
    let d1 = insert_letter(
        &db,
        Letter {
            kind: "user.created",
            ..failed_update("evt_0000000002000000_0", DAN, None, dan_data)
        },
        json!(DAN),
    )
    .await;
    let c1 = insert_letter(
        &db,
        Letter {
            kind: "user.deleted",
            data: None,
            ..failed_update("evt_0000000002000100_0", CAT, Some(&cat_ext), json!(null))
        },
        json!(CAT),
    )
    .await;
    insert_letter(
        &db,
        Letter {
            kind: "user.created",
            ..failed_update(
                "evt_0000000002000200_0",
                EVE,
                None,
                json!({"id": EVE, "email": "eve@example.com"}),
            )
        },
        json!(EVE),
    )
    .await;
    let a1 = insert_letter(
        &db,
        failed_update(
            "evt_0000000002000300_0",
            ANN,
            Some(&ann_ext),
            with_plan(&ann_data, "pro"),
        ),
        json!(ANN),
    )
    .await;

    let out = dlq(&db, &["replay", "--all"]).await;
    expect_code(&out, 0, "dlq replay --all");
    assert!(out.stdout.contains("nothing to delete"), "{}", out.stdout);
    let bodies = replayed(&db);
    let seen: Vec<(String, String)> = bodies
        .iter()
        .map(|b| {
            (
                b["type"].as_str().unwrap().to_string(),
                b["id"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    assert_eq!(
        seen,
        vec![
            ("user.created".to_string(), format!("evt_replay_{d1}")),
            ("user.deleted".to_string(), format!("evt_replay_{c1}")),
            ("user.updated".to_string(), format!("evt_replay_{a1}")),
        ],
        "one push per user, oldest dead letter first; none for a user the service never had"
    );
    // Dan: created from the current row (plan 'pro', not the envelope's 'free').
    assert_eq!(bodies[0]["data"]["plan"], "pro");
    assert_eq!(bodies[0]["external_id"], Value::Null);
    let dan_ext = external_id(&db, DAN)
        .await
        .expect("dan's external id written back");
    assert_eq!(
        db.fake.live_users_with_key(&json!(DAN))[0].external_id,
        dan_ext
    );
    // Cat: deleted with the id stored in the envelope.
    assert_eq!(bodies[1]["external_id"], cat_ext.as_str());
    assert_eq!(bodies[1]["data"], Value::Null);
    assert!(db
        .fake
        .users()
        .iter()
        .any(|u| u.external_id == cat_ext && u.deleted));
    // Ann: unchanged row, updated as it is.
    assert_eq!(bodies[2]["data"], ann_data);
    assert_eq!(
        db.count("SELECT count(*) FROM usersync.dead_letters").await,
        0
    );
    assert_eq!(db.consistency_problem().await, None);

    let out = dlq(&db, &["list"]).await;
    expect_code(&out, 0, "dlq list of an empty table");
    assert!(out.stdout.contains("no dead letters"), "{}", out.stdout);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_replay_keeps_the_entries_and_continues_with_the_next_user() {
    let db = dlq_db(USERS_UUID).await;
    db.exec(&format!(
        "INSERT INTO users (id, email) VALUES ('{ANN}', 'ann@example.com'), ('{BOB}', 'bob@example.com')"
    ))
    .await;
    sync_with_daemon(&db).await;
    let ann_ext = external_id(&db, ANN).await.expect("ann synced");
    let bob_ext = external_id(&db, BOB).await.expect("bob synced");
    let ann_data = created_data(&db, &json!(ANN));
    let bob_data = created_data(&db, &json!(BOB));
    let a1 = insert_letter(
        &db,
        failed_update("evt_0000000003000000_0", ANN, Some(&ann_ext), ann_data),
        json!(ANN),
    )
    .await;
    insert_letter(
        &db,
        failed_update("evt_0000000003000100_0", BOB, Some(&bob_ext), bob_data),
        json!(BOB),
    )
    .await;
    let before: SystemTime = db
        .client
        .query_one(
            "SELECT last_attempt_at FROM usersync.dead_letters WHERE id = $1",
            &[&a1],
        )
        .await
        .expect("row")
        .get(0);

    // The service refuses the first push (Ann's) permanently.
    db.fake.inject(Fault::Status {
        status: 400,
        count: 1,
    });
    let out = dlq(&db, &["replay", "--all"]).await;
    expect_code(&out, 1, "dlq replay with a refusing service");
    assert!(out.stderr.contains("400"), "{}", out.stderr);
    assert!(
        out.stdout.contains(BOB),
        "Bob still replayed:\n{}",
        out.stdout
    );
    assert_eq!(letters_of(&db, BOB).await, 0);
    let row = db
        .client
        .query_one(
            "SELECT attempts, last_status, last_error, last_attempt_at, state FROM usersync.dead_letters WHERE id = $1",
            &[&a1],
        )
        .await
        .expect("Ann's dead letter stays");
    let attempts: i32 = row.get(0);
    let status: Option<i32> = row.get(1);
    let error: String = row.get(2);
    let at: SystemTime = row.get(3);
    let state: String = row.get(4);
    assert_eq!(attempts, 11, "one more attempt recorded");
    assert_eq!(status, Some(400));
    assert!(
        error.contains("400") && error.contains(&format!("evt_replay_{a1}")),
        "{error}"
    );
    assert!(!error.contains("example.com"), "{error}");
    assert!(at > before);
    assert_eq!(state, "failed");

    // Fixed: replaying by entry id resolves the user.
    let out = dlq(&db, &["replay", &a1.to_string()]).await;
    expect_code(&out, 0, "dlq replay <ID> after the service recovered");
    assert_eq!(letters_of(&db, ANN).await, 0);
    // The same event id as the failed attempt: the receiver can deduplicate.
    let ids: Vec<String> = db
        .fake
        .requests()
        .into_iter()
        .filter(|r| {
            r.body["key"] == ANN
                && r.body["id"]
                    .as_str()
                    .is_some_and(|i| i.starts_with("evt_replay_"))
        })
        .map(|r| r.body["id"].as_str().unwrap_or_default().to_string())
        .collect();
    assert_eq!(ids, vec![format!("evt_replay_{a1}"); 2]);

    let out = dlq(&db, &["replay", "987654"]).await;
    expect_code(&out, 2, "dlq replay of an unknown id");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn discard_needs_yes() {
    let db = dlq_db(USERS_BIGINT).await;
    let x1 = insert_letter(
        &db,
        failed_update("evt_0000000004000000_0", "7", None, json!({"id": 7})),
        json!(7),
    )
    .await;
    let x2 = insert_letter(
        &db,
        Letter {
            state: State::Parked,
            ..failed_update("evt_0000000004000100_0", "7", None, json!({"id": 7}))
        },
        json!(7),
    )
    .await;
    let y1 = insert_letter(
        &db,
        failed_update("evt_0000000004000200_0", "8", None, json!({"id": 8})),
        json!(8),
    )
    .await;
    let total = || db.count("SELECT count(*) FROM usersync.dead_letters");

    for args in [
        vec!["discard", &*x1.to_string()],
        vec!["discard", "--user", "7"],
    ] {
        let out = dlq(&db, &args).await;
        expect_code(&out, 2, "dlq discard without --yes");
        assert!(out.stderr.contains("--yes"), "{}", out.stderr);
        assert_eq!(total().await, 3, "nothing deleted without --yes");
    }

    let out = dlq(&db, &["discard", &x1.to_string(), "--yes"]).await;
    expect_code(&out, 0, "dlq discard <ID> --yes");
    assert!(
        out.stdout.contains(&format!("discarded dead letter {x1}"))
            && out.stdout.contains("evt_0000000004000000_0"),
        "{}",
        out.stdout
    );
    assert_eq!(total().await, 2);

    let out = dlq(&db, &["discard", "--user", "7", "--yes"]).await;
    expect_code(&out, 0, "dlq discard --user --yes");
    assert!(
        out.stdout.contains(&format!("discarded dead letter {x2}")),
        "{}",
        out.stdout
    );
    assert_eq!(letters_of(&db, "7").await, 0);
    assert_eq!(letters_of(&db, "8").await, 1);

    let out = dlq(&db, &["discard", "987654", "--yes"]).await;
    expect_code(&out, 2, "dlq discard of an unknown id");
    assert_eq!(total().await, 1);

    let out = dlq(&db, &["discard", &y1.to_string(), "--user", "8", "--yes"]).await;
    expect_code(&out, 2, "an id and --user together");
    let out = dlq(&db, &["replay"]).await;
    expect_code(&out, 2, "replay without a target");
    assert_eq!(total().await, 1);
}

/// The replayed JSON is the stream's, type by type, even when the database's
/// own defaults would print values differently.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replayed_row_is_the_streams_json() {
    let db = dlq_db(
        "CREATE TABLE public.users (
            id bigint PRIMARY KEY,
            email text NOT NULL,
            plan text NOT NULL DEFAULT 'free',
            c_bool bool,
            c_numeric numeric,
            c_float8 float8,
            c_float4 float4,
            c_date date,
            c_timestamp timestamp,
            c_timestamptz timestamptz,
            c_interval interval,
            c_jsonb jsonb,
            c_bytea bytea,
            c_text_array text[],
            c_int_array int4[],
            c_uuid uuid,
            c_char char(6),
            c_inet inet,
            c_null text
        )",
    )
    .await;
    db.exec(&format!(
        "ALTER DATABASE {} SET DateStyle = 'SQL, DMY';
         ALTER DATABASE {0} SET TimeZone = 'America/New_York';
         ALTER DATABASE {0} SET IntervalStyle = 'postgres_verbose';
         ALTER DATABASE {0} SET extra_float_digits = 0",
        db.dbname
    ))
    .await;
    db.exec(
        "INSERT INTO users VALUES (42, 'ann@example.com', 'pro', true, 12345.678900,
            0.1::float8 + 0.2::float8, 1.1::float4, '2024-02-29', '2024-02-29 13:14:15.123456',
            '2024-02-29 13:14:15.5+02', '1 year 2 mons 3 days 04:05:06.5', '{\"a\": [1, 2.50]}',
            '\\x00ff10', '{\"a b\",NULL,\"c,d\"}', '{{1,2},{3,4}}',
            'a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11', 'ab', '192.168.1.5', NULL)",
    )
    .await;
    sync_with_daemon(&db).await;
    let ext = external_id(&db, "42").await.expect("synced");
    let streamed = created_data(&db, &json!(42));
    insert_letter(
        &db,
        failed_update("evt_0000000005000000_0", "42", Some(&ext), json!({})),
        json!(42),
    )
    .await;
    let out = dlq(&db, &["replay", "--user", "42"]).await;
    expect_code(&out, 0, "dlq replay");
    let bodies = replayed(&db);
    assert_eq!(bodies.len(), 1);
    assert_eq!(bodies[0]["key"], json!(42));
    assert_eq!(
        bodies[0]["data"], streamed,
        "replayed data differs from the stream's"
    );
    assert_eq!(streamed["c_float8"], json!(0.30000000000000004));
    assert_eq!(streamed["c_bool"], json!(true));
    assert_eq!(streamed["c_char"], json!("ab    "));
    assert_eq!(streamed["c_inet"], json!("192.168.1.5"));
}

#[tokio::test]
async fn help_explains_each_command() {
    for (args, phrases) in [
        (
            vec!["dlq", "--help"],
            vec!["list", "show", "replay", "discard", "parked"],
        ),
        (
            vec!["dlq", "list", "--help"],
            vec!["--json", "--user", "oldest"],
        ),
        (vec!["dlq", "show", "--help"], vec!["envelope"]),
        (
            vec!["dlq", "replay", "--help"],
            vec!["--all", "--user", "CURRENT", "evt_replay_", "user.deleted"],
        ),
        (vec!["dlq", "discard", "--help"], vec!["--yes", "--user"]),
        (vec!["--help"], vec!["dlq"]),
    ] {
        let mut cmd = Command::new(BIN);
        cmd.args(&args).env_clear();
        let out = run(cmd).await;
        assert_eq!(out.code, Some(0), "{args:?}: {}", out.stderr);
        for p in phrases {
            assert!(
                out.stdout.contains(p),
                "{args:?} lacks {p:?}:\n{}",
                out.stdout
            );
        }
    }
}
