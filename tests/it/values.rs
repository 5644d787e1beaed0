//! Rows become the right JSON, end to end: real PostgreSQL, the daemon in
//! process, and the envelopes as the fake webhook receiver got them.

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use time::format_description::well_known::Rfc3339;
use time::OffsetDateTime;

use crate::common::{cluster, InProcessDaemon, TestDb, USERS_BIGINT, USERS_UUID};
use tokio_util::sync::CancellationToken;
use usersync::config::Config;
use usersync::core::signature::WebhookSecret;
use usersync::dev::fake::{FakeOptions, FakeService};
use usersync::dev::pgtemp::{TempCluster, TempClusterOptions};

const WAIT: Duration = Duration::from_secs(30);

/// Waits for an accepted envelope matching `pred` and returns it. Fails
/// early, with the daemon's error, if the daemon stops meanwhile.
async fn wait_envelope(
    db: &TestDb,
    daemon: &mut InProcessDaemon,
    what: &str,
    pred: impl Fn(&Value) -> bool,
) -> Value {
    let deadline = Instant::now() + WAIT;
    loop {
        if let Some(found) = db.accepted().into_iter().find(|e| pred(e)) {
            return found;
        }
        if daemon.task.is_finished() {
            let result = (&mut daemon.task).await;
            panic!("the daemon stopped while waiting for {what}: {result:?}");
        }
        if Instant::now() > deadline {
            panic!(
                "timed out after {WAIT:?} waiting for {what}; accepted so far:\n{:#?}",
                db.accepted()
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// `TestDb::wait_consistent`, but a failure says how many rows lack their
/// external id and what the fake got, and, if the daemon stopped, why.
async fn wait_synced(db: &TestDb, daemon: &mut InProcessDaemon) {
    let deadline = Instant::now() + WAIT;
    loop {
        let Some(problem) = db.consistency_problem().await else {
            return;
        };
        if daemon.task.is_finished() {
            let result = (&mut daemon.task).await;
            panic!("the daemon stopped before the table was in sync ({problem}): {result:?}");
        }
        if Instant::now() > deadline {
            let unsynced = db
                .count("SELECT count(*) FROM users WHERE external_user_id IS NULL")
                .await;
            let requests = db.fake.requests();
            let shown: Vec<String> = requests
                .iter()
                .take(20)
                .map(|r| format!("{} {} -> {}", r.body["type"], r.body["key"], r.status))
                .collect();
            panic!(
                "not consistent after {WAIT:?}: {problem}; {unsynced} row(s) without an external id; \
                 the fake got {} request(s): {shown:?}",
                requests.len()
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn is(kind: &'static str) -> impl Fn(&Value) -> bool {
    move |e| e["type"] == kind
}

fn of_type(db: &TestDb, kind: &str) -> Vec<Value> {
    db.accepted()
        .into_iter()
        .filter(|e| e["type"] == kind)
        .collect()
}

fn keys(v: &Value) -> BTreeSet<String> {
    v.as_object()
        .unwrap_or_else(|| panic!("not an object: {v}"))
        .keys()
        .cloned()
        .collect()
}

fn set(names: &[&str]) -> BTreeSet<String> {
    names.iter().map(|s| s.to_string()).collect()
}

/// The `id` the fake returned for the `user.created` of `key`.
fn created_id(db: &TestDb, key: &Value) -> String {
    db.fake
        .requests()
        .into_iter()
        .find(|r| {
            (200..300).contains(&r.status)
                && r.body["type"] == "user.created"
                && &r.body["key"] == key
        })
        .and_then(|r| r.response["id"].as_str().map(str::to_string))
        .unwrap_or_else(|| panic!("no accepted user.created for {key}"))
}

async fn insert_returning_id(db: &TestDb, sql: &str) -> String {
    db.client
        .query_one(sql, &[])
        .await
        .unwrap_or_else(|e| panic!("{sql}: {e}"))
        .get(0)
}

// ----------------------------------------------------------------- types

const TYPES_TABLE: &str = r#"
CREATE EXTENSION IF NOT EXISTS citext;
CREATE TABLE public.users (
    id bigint PRIMARY KEY,
    email text NOT NULL,
    plan text NOT NULL DEFAULT 'free',
    c_bool bool,
    c_int2 int2,
    c_int4 int4,
    c_int8 int8,
    c_numeric numeric,
    c_float8 float8,
    c_text text,
    c_varchar varchar(40),
    c_citext citext,
    c_uuid uuid,
    c_date date,
    c_timestamp timestamp,
    c_timestamptz timestamptz,
    c_json json,
    c_jsonb jsonb,
    c_bytea bytea,
    c_text_array text[],
    c_int_array int4[]
)"#;

const TYPED_COLUMNS: &[&str] = &[
    "c_bool",
    "c_int2",
    "c_int4",
    "c_int8",
    "c_numeric",
    "c_float8",
    "c_text",
    "c_varchar",
    "c_citext",
    "c_uuid",
    "c_date",
    "c_timestamp",
    "c_timestamptz",
    "c_json",
    "c_jsonb",
    "c_bytea",
    "c_text_array",
    "c_int_array",
];

async fn assert_citext_available() {
    let (client, conn) = tokio_postgres::connect(&cluster().url("postgres"), tokio_postgres::NoTls)
        .await
        .expect("connect");
    tokio::spawn(conn);
    let available = client
        .query_opt(
            "SELECT 1 FROM pg_available_extensions WHERE name = 'citext'",
            &[],
        )
        .await
        .expect("pg_available_extensions")
        .is_some();
    assert!(
        available,
        "the citext extension is not available in this PostgreSQL install (install postgresql-contrib)"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_column_type_arrives_as_the_right_json() {
    assert_citext_available().await;
    let db = TestDb::new(TYPES_TABLE).await;
    let mut daemon = db.start_daemon();
    db.exec(
        r#"INSERT INTO users (id, email, c_bool, c_int2, c_int4, c_int8, c_numeric, c_float8,
               c_text, c_varchar, c_citext, c_uuid, c_date, c_timestamp, c_timestamptz,
               c_json, c_jsonb, c_bytea, c_text_array, c_int_array)
           VALUES (1, 'all@example.com', true, -32768, 2147483647, 9223372036854775807,
               '123456789012345.678901234567890', 0.1,
               'héllo ☃ "quoted"', 'Ada Lovelace', 'MiXeD@Example.COM',
               'a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11', '2024-02-29',
               '2024-01-02 03:04:05.123456', '2024-01-02 03:04:05.5+02',
               '{"a": [1, 2.5, null], "b": "x"}', '{"nested": {"k": true}, "n": 12}',
               '\x68656c6c6f00ff', ARRAY['a', 'b c', NULL, 'q"uote', ''], '{1,-2,3}');
           INSERT INTO users (id, email) VALUES (2, 'nulls@example.com');"#,
    )
    .await;
    let full = wait_envelope(&db, &mut daemon, "the create of row 1", |e| {
        e["type"] == "user.created" && e["key"] == json!(1)
    })
    .await;
    let nulls = wait_envelope(&db, &mut daemon, "the create of row 2", |e| {
        e["type"] == "user.created" && e["key"] == json!(2)
    })
    .await;
    let data = &full["data"];
    let expected = json!({
        "id": 1,
        "email": "all@example.com",
        "plan": "free",
        "c_bool": true,
        "c_int2": -32768,
        "c_int4": 2147483647,
        "c_int8": 9223372036854775807i64,
        // 30 significant digits: only a string keeps them all.
        "c_numeric": "123456789012345.678901234567890",
        "c_float8": 0.1,
        "c_text": "héllo ☃ \"quoted\"",
        "c_varchar": "Ada Lovelace",
        "c_citext": "MiXeD@Example.COM",
        "c_uuid": "a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11",
        "c_date": "2024-02-29",
        "c_timestamp": "2024-01-02T03:04:05.123456",
        "c_json": {"a": [1, 2.5, null], "b": "x"},
        "c_jsonb": {"nested": {"k": true}, "n": 12},
        "c_bytea": "aGVsbG8A/w==",
        "c_text_array": ["a", "b c", null, "q\"uote", ""],
        "c_int_array": [1, -2, 3],
    });
    for (column, want) in expected.as_object().unwrap() {
        assert_eq!(&data[column], want, "data.{column} in {full:#}");
    }
    // timestamptz: ISO 8601 with a T and an offset (or Z), same instant.
    let tstz = data["c_timestamptz"]
        .as_str()
        .unwrap_or_else(|| panic!("c_timestamptz is not a string: {full:#}"));
    assert!(tstz.contains('T'), "c_timestamptz {tstz:?} has no T");
    let parsed = OffsetDateTime::parse(tstz, &Rfc3339)
        .unwrap_or_else(|e| panic!("c_timestamptz {tstz:?} is not RFC 3339: {e}"));
    let want = OffsetDateTime::parse("2024-01-02T01:04:05.5Z", &Rfc3339).unwrap();
    assert_eq!(parsed, want, "c_timestamptz {tstz:?}");
    // The sync columns are not user data.
    let sent = keys(data);
    assert!(!sent.contains("external_user_id") && !sent.contains("external_synced_at"));
    assert_eq!(
        sent.len(),
        expected.as_object().unwrap().len() + 1,
        "{sent:?}"
    );

    let data = &nulls["data"];
    for column in TYPED_COLUMNS {
        assert_eq!(
            data.get(*column),
            Some(&Value::Null),
            "data.{column} should be present and null: {nulls:#}"
        );
    }
    wait_synced(&db, &mut daemon).await;
    daemon.stop().await;
}

// ----------------------------------------------------------------- TOAST

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unchanged_toasted_value_is_sent_in_full() {
    let db = TestDb::new(USERS_UUID).await;
    let mut daemon = db.start_daemon();
    let id = insert_returning_id(
        &db,
        "INSERT INTO users (email, bio)
             SELECT 'toast@example.com', string_agg(md5(random()::text), '')
             FROM generate_series(1, 3200)
         RETURNING id::text",
    )
    .await;
    let bio: String = db
        .client
        .query_one("SELECT bio FROM users", &[])
        .await
        .expect("bio")
        .get(0);
    assert_eq!(bio.len(), 102_400);
    // The value really lives out of line, so an update that leaves it alone
    // does not carry it in the new tuple.
    // Even compressed it is far above the ~2 kB TOAST target.
    let stored = db
        .count("SELECT pg_column_size(bio)::int8 FROM users")
        .await;
    assert!(stored > 4000, "bio takes only {stored} bytes: not TOASTed");
    wait_synced(&db, &mut daemon).await;
    let created = &of_type(&db, "user.created")[0];
    assert_eq!(created["data"]["bio"], json!(bio), "the create carries bio");

    db.exec(&format!("UPDATE users SET plan = 'pro' WHERE id = '{id}'"))
        .await;
    let update = wait_envelope(&db, &mut daemon, "the update of plan", is("user.updated")).await;
    assert_eq!(
        update["changed"],
        json!(["plan"]),
        "{:#}",
        update["changed"]
    );
    assert_eq!(update["data"]["plan"], json!("pro"));
    assert_eq!(
        update["omitted"],
        json!([]),
        "nothing may be omitted with REPLICA IDENTITY FULL"
    );
    let sent = update["data"]["bio"].as_str().unwrap_or_else(|| {
        panic!(
            "data.bio is {} instead of the full value",
            update["data"]["bio"]
        )
    });
    assert_eq!(sent.len(), bio.len(), "data.bio was cut");
    assert!(sent == bio, "data.bio differs from the stored value");
    wait_synced(&db, &mut daemon).await;
    daemon.stop().await;
}

// ---------------------------------------------------------- sink.columns

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_configured_columns_are_sent_and_watched() {
    let db = TestDb::with_sink(USERS_UUID, "columns = [\"email\", \"plan\"]").await;
    let mut daemon = db.start_daemon();
    let id = insert_returning_id(
        &db,
        "INSERT INTO users (email, name, bio) VALUES ('a@example.com', 'Ann', 'hi') RETURNING id::text",
    )
    .await;
    wait_synced(&db, &mut daemon).await;
    let created = &of_type(&db, "user.created")[0];
    assert_eq!(keys(&created["data"]), set(&["id", "email", "plan"]));

    db.exec(&format!(
        "UPDATE users SET name = 'Annie', bio = 'changed' WHERE id = '{id}'"
    ))
    .await;
    db.exec(&format!(
        "UPDATE users SET email = 'b@example.com' WHERE id = '{id}'"
    ))
    .await;
    let update = wait_envelope(&db, &mut daemon, "the update of email", |e| {
        e["type"] == "user.updated" && e["data"]["email"] == "b@example.com"
    })
    .await;
    // Changes of one user arrive in commit order, so a push of the first
    // update would already be here.
    let updates = of_type(&db, "user.updated");
    assert_eq!(
        updates.len(),
        1,
        "an update of unsynced columns was pushed: {updates:#?}"
    );
    assert_eq!(update["changed"], json!(["email"]));
    assert_eq!(keys(&update["data"]), set(&["id", "email", "plan"]));
    assert_eq!(update["data"]["id"], json!(id));
    assert_eq!(update["data"]["plan"], json!("free"));
    assert_eq!(keys(&update["previous"]), set(&["id", "email", "plan"]));
    assert_eq!(update["previous"]["email"], json!("a@example.com"));
    wait_synced(&db, &mut daemon).await;
    daemon.stop().await;
}

// ------------------------------------------------------------ ALTER TABLE

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn alter_table_mid_stream_follows_the_new_shape() {
    let db = TestDb::new(USERS_UUID).await;
    let mut daemon = db.start_daemon();
    let id = insert_returning_id(
        &db,
        "INSERT INTO users (email) VALUES ('alter@example.com') RETURNING id::text",
    )
    .await;
    wait_synced(&db, &mut daemon).await;

    db.exec("ALTER TABLE users ADD COLUMN nickname text").await;
    db.exec(&format!(
        "UPDATE users SET nickname = 'Nick' WHERE id = '{id}'"
    ))
    .await;
    let update = wait_envelope(&db, &mut daemon, "the update of nickname", |e| {
        e["type"] == "user.updated" && e["data"].get("nickname").is_some()
    })
    .await;
    assert_eq!(update["data"]["nickname"], json!("Nick"));
    assert_eq!(update["changed"], json!(["nickname"]));
    wait_synced(&db, &mut daemon).await;

    db.exec("ALTER TABLE users DROP COLUMN nickname").await;
    db.exec(&format!("UPDATE users SET plan = 'pro' WHERE id = '{id}'"))
        .await;
    let update = wait_envelope(&db, &mut daemon, "the update of plan", |e| {
        e["type"] == "user.updated" && e["data"]["plan"] == "pro"
    })
    .await;
    assert!(
        update["data"].get("nickname").is_none(),
        "a dropped column is still sent: {update:#}"
    );
    assert!(
        update["previous"].get("nickname").is_none(),
        "a dropped column is still in previous: {update:#}"
    );
    assert_eq!(update["changed"], json!(["plan"]));
    wait_synced(&db, &mut daemon).await;
    daemon.stop().await;
}

// ------------------------------------------------------------- key types

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bigint_primary_key_arrives_as_a_number() {
    let db = TestDb::new(USERS_BIGINT).await;
    let mut daemon = db.start_daemon();
    // Above 2^53 as well: the key must stay exact.
    db.exec(
        "INSERT INTO users (id, email) VALUES (42, 'a@example.com'), (9007199254740993, 'b@example.com')",
    )
    .await;
    wait_synced(&db, &mut daemon).await;
    let keys: BTreeSet<String> = of_type(&db, "user.created")
        .iter()
        .map(|e| {
            assert!(e["key"].is_number(), "key is not a number: {e:#}");
            assert_eq!(e["data"]["id"], e["key"]);
            e["key"].to_string()
        })
        .collect();
    assert_eq!(keys, set(&["42", "9007199254740993"]));
    assert_eq!(
        db.count("SELECT count(*) FROM users WHERE external_user_id LIKE 'usr_%' AND external_synced_at IS NOT NULL")
            .await,
        2,
        "the write-back did not land"
    );
    daemon.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn text_primary_key_arrives_as_a_string() {
    let db = TestDb::new(
        "CREATE TABLE public.users (
            id text PRIMARY KEY,
            email text NOT NULL,
            name text,
            plan text NOT NULL DEFAULT 'free',
            bio text
        )",
    )
    .await;
    let mut daemon = db.start_daemon();
    db.exec(
        "INSERT INTO users (id, email) VALUES ('user-ä 1', 'a@example.com'), ('o''brien', 'b@example.com')",
    )
    .await;
    wait_synced(&db, &mut daemon).await;
    let keys: BTreeSet<String> = of_type(&db, "user.created")
        .iter()
        .map(|e| {
            e["key"]
                .as_str()
                .unwrap_or_else(|| panic!("key is not a string: {e:#}"))
                .to_string()
        })
        .collect();
    assert_eq!(keys, set(&["user-ä 1", "o'brien"]));
    assert_eq!(
        db.count("SELECT count(*) FROM users WHERE external_user_id LIKE 'usr_%' AND external_synced_at IS NOT NULL")
            .await,
        2,
        "the write-back did not land"
    );
    daemon.stop().await;
}

// ------------------------------------------------------- previous/changed

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn update_and_delete_carry_previous_changed_and_external_id() {
    let db = TestDb::new(USERS_UUID).await;
    let mut daemon = db.start_daemon();
    let id = insert_returning_id(
        &db,
        "INSERT INTO users (email, name) VALUES ('p@example.com', 'Pat') RETURNING id::text",
    )
    .await;
    wait_synced(&db, &mut daemon).await;
    let external = created_id(&db, &json!(id));

    db.exec(&format!("UPDATE users SET plan = 'pro' WHERE id = '{id}'"))
        .await;
    let update = wait_envelope(&db, &mut daemon, "the update of plan", is("user.updated")).await;
    assert_eq!(update["key"], json!(id));
    assert_eq!(update["previous"]["plan"], json!("free"));
    assert_eq!(update["data"]["plan"], json!("pro"));
    assert_eq!(update["changed"], json!(["plan"]));
    assert_eq!(update["external_id"], json!(external));
    wait_synced(&db, &mut daemon).await;

    db.exec(&format!("DELETE FROM users WHERE id = '{id}'"))
        .await;
    let delete = wait_envelope(&db, &mut daemon, "the delete", is("user.deleted")).await;
    assert_eq!(delete["key"], json!(id));
    assert_eq!(delete["external_id"], json!(external), "{delete:#}");
    assert_eq!(delete["data"], Value::Null, "{delete:#}");
    let previous = &delete["previous"];
    assert_eq!(previous["id"], json!(id), "{delete:#}");
    assert_eq!(previous["email"], json!("p@example.com"));
    assert_eq!(previous["name"], json!("Pat"));
    assert_eq!(previous["plan"], json!("pro"));
    assert!(previous.get("external_user_id").is_none(), "{delete:#}");
    wait_synced(&db, &mut daemon).await;
    assert!(
        db.fake.users().iter().all(|u| u.deleted),
        "the user is still live externally"
    );
    daemon.stop().await;
}

// ------------------------------------------------------------- write-back

// PostgreSQL hands a transaction to the walsender as soon as its commit
// record is flushed, before the committing backend makes it visible to other
// sessions (synchronous replication waits in between; on a busy machine it
// is a scheduling gap). A write-back that runs in that gap matches no row;
// the writer must wait for the source transaction to become visible and
// retry, or the row keeps external_user_id NULL for good.
// This test makes the gap long on purpose with a synchronous standby that
// never connects, on its own cluster (the setting is cluster-wide).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn write_back_lands_when_the_commit_becomes_visible_late() {
    let pg = tokio::task::spawn_blocking(|| TempCluster::start(TempClusterOptions::default()))
        .await
        .unwrap()
        .unwrap_or_else(|e| panic!("cannot start a PostgreSQL: {e}"));
    pg.create_database("app").expect("create database");
    pg.psql("app", USERS_BIGINT).expect("create table");
    // Only the app's commit is to wait for the standby that never comes:
    // the daemon's sessions commit locally (were its own write-back or
    // resume commit to wait too, as it did under load on 14, the write-back
    // would never reach the row at all). The app's session asks for the
    // wait itself, below.
    pg.psql("app", "ALTER DATABASE app SET synchronous_commit = local")
        .expect("synchronous_commit");
    let url = pg.url("app");
    let secret = WebhookSecret::generate();
    let fake = FakeService::start(FakeOptions {
        port: 0,
        secret: Some(secret.clone()),
        latency: Duration::ZERO,
    })
    .await
    .expect("fake service");
    let toml = format!(
        "[database]\nurl = \"{url}\"\n[sink]\nurl = \"{}\"\nsecret_env = \"S\"\n\
         [retry]\ninitial_backoff_ms = 20\nmax_backoff_ms = 200\n",
        fake.url()
    );
    let env: BTreeMap<String, String> = [("S".to_string(), secret.to_whsec())].into();
    let cfg = Config::from_parts(Some(&toml), "test", &env).expect("config");
    let connect = || async {
        let (client, conn) = tokio_postgres::connect(&url, tokio_postgres::NoTls)
            .await
            .expect("connect");
        tokio::spawn(conn);
        client
    };
    let admin = connect().await;
    usersync::app::setup::apply(&admin, &cfg.database)
        .await
        .expect("setup");
    let cancel = CancellationToken::new();
    let stop = cancel.clone();
    let mut daemon = tokio::spawn(async move { usersync::app::run::run(&cfg, stop, None).await });

    let external_id_of = |id: i64| {
        let admin = &admin;
        async move {
            admin
                .query_opt("SELECT external_user_id FROM users WHERE id = $1", &[&id])
                .await
                .expect("select")
                .and_then(|r| r.get::<_, Option<String>>(0))
        }
    };
    let wait_external_id = |id: i64| async move {
        let deadline = Instant::now() + WAIT;
        loop {
            if let Some(ext) = external_id_of(id).await {
                return Some(ext);
            }
            if Instant::now() > deadline {
                return None;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    };
    // The daemon streams.
    admin
        .execute(
            "INSERT INTO users (id, email) VALUES (1, 'one@example.com')",
            &[],
        )
        .await
        .expect("insert 1");
    assert!(wait_external_id(1).await.is_some(), "row 1 never synced");

    // From now on a commit waits, flushed but invisible, for a standby that
    // never comes.
    admin
        .batch_execute("ALTER SYSTEM SET synchronous_standby_names = 'usersync_test_nobody'")
        .await
        .expect("alter system");
    admin
        .batch_execute("SELECT pg_reload_conf()")
        .await
        .expect("reload");
    let app = connect().await;
    app.batch_execute("SET synchronous_commit = on")
        .await
        .expect("synchronous_commit");
    let deadline = Instant::now() + WAIT;
    loop {
        let v: String = app
            .query_one("SHOW synchronous_standby_names", &[])
            .await
            .expect("show")
            .get(0);
        if v == "usersync_test_nobody" {
            break;
        }
        assert!(Instant::now() < deadline, "the setting never took effect");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let mut insert = tokio::spawn(async move {
        app.execute(
            "INSERT INTO users (id, email) VALUES (2, 'two@example.com')",
            &[],
        )
        .await
        .map(|_| ())
    });
    let deadline = Instant::now() + WAIT;
    while !fake
        .requests()
        .iter()
        .any(|r| r.body["type"] == "user.created" && r.body["key"] == json!(2))
    {
        assert!(
            Instant::now() < deadline,
            "the create of row 2 was never pushed"
        );
        assert!(
            !daemon.is_finished(),
            "the daemon stopped: {:?}",
            (&mut daemon).await
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // The write-back has run while the row is still invisible: its UPDATE
    // matched nothing and it now loops in one transaction, checking whether
    // the source transaction is visible and updating again (its latest
    // statement is either of the two; a write-back that is not waiting
    // commits within milliseconds, so a transaction open for over 200 ms
    // is this loop).
    let deadline = Instant::now() + WAIT;
    loop {
        let waiting: i64 = admin
            .query_one(
                "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() \
                 AND application_name = 'usersync-writeback' \
                 AND now() - xact_start > interval '200 ms' \
                 AND (query LIKE '%pg_visible_in_snapshot%' OR query LIKE '%unnest(%')",
                &[],
            )
            .await
            .expect("pg_stat_activity")
            .get(0);
        if waiting > 0 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the write-back never waited for the invisible row"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(!insert.is_finished(), "the insert's commit did not wait");
    assert_eq!(
        admin
            .query_one("SELECT count(*) FROM users WHERE id = 2", &[])
            .await
            .expect("count")
            .get::<_, i64>(0),
        0,
        "row 2 is visible before its commit finished"
    );

    // Let the commit finish: the row becomes visible.
    admin
        .batch_execute("ALTER SYSTEM RESET synchronous_standby_names")
        .await
        .expect("alter system");
    admin
        .batch_execute("SELECT pg_reload_conf()")
        .await
        .expect("reload");
    tokio::time::timeout(WAIT, &mut insert)
        .await
        .expect("the insert never committed")
        .unwrap()
        .expect("insert 2");
    let pushed_id = fake
        .users()
        .into_iter()
        .find(|u| u.key == json!(2) && !u.deleted)
        .map(|u| u.external_id)
        .expect("user 2 exists in the fake");
    let ext = wait_external_id(2).await;
    cancel.cancel();
    let stopped = tokio::time::timeout(WAIT, daemon).await;
    assert_eq!(
        ext.as_deref(),
        Some(pushed_id.as_str()),
        "the external id of row 2 was never written back"
    );
    assert!(
        matches!(stopped, Ok(Ok(Ok(())))),
        "the daemon did not stop cleanly: {stopped:?}"
    );
    fake.shutdown().await;
}

/// A stored generated column never vanishes silently: PostgreSQL 18 streams
/// it once `usersync setup` set `publish_generated_columns = stored`, and it
/// arrives in `data`; before 18 the stream cannot carry it, and every insert
/// and update names it in `omitted` (and `check` says why).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn generated_columns_are_sent_or_named_in_omitted() {
    let db = TestDb::new(
        "CREATE TABLE public.users (
            id bigint PRIMARY KEY,
            email text NOT NULL,
            email_lower text GENERATED ALWAYS AS (lower(email)) STORED
        )",
    )
    .await;
    let version = db
        .count("SELECT current_setting('server_version_num')::int8")
        .await;
    let mut daemon = db.start_daemon();
    db.exec("INSERT INTO users (id, email) VALUES (1, 'Ann@Example.com')")
        .await;
    let created = wait_envelope(&db, &mut daemon, "the create", |e| {
        e["type"] == "user.created"
    })
    .await;
    let omitted: Vec<&str> = created["omitted"]
        .as_array()
        .map(|a| a.iter().filter_map(Value::as_str).collect())
        .unwrap_or_default();
    if version >= 180_000 {
        assert_eq!(
            created["data"]["email_lower"], "ann@example.com",
            "{created:#}"
        );
        assert!(omitted.is_empty(), "{created:#}");
    } else {
        assert!(created["data"].get("email_lower").is_none(), "{created:#}");
        assert_eq!(omitted, ["email_lower"], "{created:#}");
        let out = crate::common::run_cli(db.binary_command(&["check", "--json"]), WAIT).await;
        let report: Value = serde_json::from_str(&out.stdout).expect("check json");
        let finding = report["checks"]
            .as_array()
            .and_then(|c| c.iter().find(|f| f["check"] == "generated_columns"))
            .unwrap_or_else(|| panic!("no generated_columns finding: {report:#}"));
        assert!(
            finding["message"]
                .as_str()
                .is_some_and(|m| m.contains("email_lower")),
            "{finding:#}"
        );
    }
    wait_synced(&db, &mut daemon).await;
    // The row reader leaves out what the stream leaves out, so the values
    // hash recorded for the streamed change matches the row as backfill
    // reads it: nothing to push again.
    let out = crate::common::run_cli(db.binary_command(&["backfill", "--dry-run"]), WAIT).await;
    assert!(
        out.stdout.contains(" 0 of 1 rows would be pushed"),
        "a synced row with a generated column would be pushed again: {}",
        out.all()
    );
    // A delete carries no row data, so it omits nothing.
    db.exec("DELETE FROM users WHERE id = 1").await;
    let deleted = wait_envelope(&db, &mut daemon, "the delete", |e| {
        e["type"] == "user.deleted"
    })
    .await;
    assert_eq!(deleted["omitted"], serde_json::json!([]), "{deleted:#}");
    daemon.stop().await;
}
