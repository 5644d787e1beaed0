//! Bad input gets one clear message, exit code 2, and nothing is consumed
//! (invariant 7). Every case runs the real binary, configured by environment
//! variables (and a `--config` file where the case is about the file).
//! The harness names each test database's slot and origin after the
//! database, so the tests run in parallel.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use crate::common::{poll_until, wait_until, TestDb, USERS_UUID};
use usersync::dev::pgtemp::{TempCluster, TempClusterOptions};

const BIN: &str = env!("CARGO_BIN_EXE_usersync");

// ---------------------------------------------------------------- helpers

use crate::common::CliOutcome as Outcome;

/// Runs the binary to completion (at most 30 s: every case here must exit
/// on its own; one that starts streaming instead is a failure).
async fn run(cmd: Command) -> Outcome {
    crate::common::run_cli(cmd, Duration::from_secs(30)).await
}

/// The binary with nothing from the outer environment that could configure it.
fn bare_command(args: &[&str], dir: &Path) -> Command {
    let mut cmd = Command::new(BIN);
    cmd.args(args).env_clear().current_dir(dir);
    if let Ok(path) = std::env::var("PATH") {
        cmd.env("PATH", path);
    }
    cmd
}

/// Exit code as expected; stderr is one readable message (the `usersync:`
/// prefix once, at most two lines, no panic, no debug dump, no log lines)
/// containing every phrase; nothing on stdout.
fn assert_one_message(out: &Outcome, code: i32, phrases: &[&str]) {
    let err = out.stderr.trim_end();
    assert_eq!(
        out.code,
        Some(code),
        "exit code; stderr:\n{}\nstdout:\n{}",
        out.stderr,
        out.stdout
    );
    assert!(
        err.starts_with("usersync: ") && err.matches("usersync: ").count() == 1,
        "stderr should be one `usersync: ...` message:\n{err}"
    );
    // A parse error may name the key on a second line; more is a dump.
    assert!(
        err.lines().count() <= 2,
        "stderr should be one short message:\n{err}"
    );
    for bad in [
        "panicked",
        "backtrace",
        "Error {",
        "Some(",
        " INFO ",
        " WARN ",
    ] {
        assert!(!err.contains(bad), "stderr contains {bad:?}:\n{err}");
    }
    for phrase in phrases {
        assert!(err.contains(phrase), "stderr lacks {phrase:?}:\n{err}");
    }
    assert!(
        out.stdout.trim().is_empty(),
        "nothing on stdout expected:\n{}",
        out.stdout
    );
}

/// The webhook secret (with and without its prefix) is nowhere in the output.
fn assert_no_secret(db: &TestDb, out: &Outcome) {
    let whsec = db.secret.to_whsec();
    let raw = whsec.trim_start_matches("whsec_");
    let all = out.all();
    assert!(
        !all.contains(&whsec) && !all.contains(raw),
        "the webhook secret appears in the output:\n{all}"
    );
}

async fn slot_count(db: &TestDb) -> i64 {
    db.count(&format!(
        "SELECT count(*) FROM pg_replication_slots WHERE slot_name = '{}'",
        db.dbname
    ))
    .await
}

async fn insert_user(db: &TestDb, email: &str) {
    db.exec(&format!(
        "INSERT INTO users (email, name) VALUES ('{email}', 'Ann')"
    ))
    .await;
}

/// Makes a change, runs `cmd`, and checks the refusal: the message, the
/// slot's confirmed position unchanged, nothing pushed, no secret shown.
async fn refuses(db: &TestDb, cmd: Command, code: i32, phrases: &[&str]) -> Outcome {
    assert_eq!(
        slot_count(db).await,
        1,
        "the test expects the slot to exist"
    );
    refuses_with_slot(db, cmd, code, phrases, true).await
}

async fn refuses_with_slot(
    db: &TestDb,
    cmd: Command,
    code: i32,
    phrases: &[&str],
    slot_exists: bool,
) -> Outcome {
    insert_user(db, "before@example.com").await;
    let before = if slot_exists {
        let lsn = db.confirmed_flush_lsn().await;
        assert!(lsn.is_some(), "the slot has no confirmed_flush_lsn");
        lsn
    } else {
        None
    };
    let out = run(cmd).await;
    eprintln!("{:?}: {}", out.code, out.stderr.trim_end());
    assert_one_message(&out, code, phrases);
    assert_no_secret(db, &out);
    if slot_exists {
        assert_eq!(
            db.confirmed_flush_lsn().await,
            before,
            "the slot's confirmed_flush_lsn moved although usersync refused to start"
        );
    }
    assert!(
        db.fake.requests().is_empty(),
        "something was pushed: {:?}",
        db.fake.requests()
    );
    let unsynced = db
        .count("SELECT count(*) FROM users WHERE external_user_id IS NULL")
        .await;
    let rows = db.count("SELECT count(*) FROM users").await;
    assert_eq!(unsynced, rows, "a row was written back");
    out
}

fn write_config(dir: &tempfile::TempDir, text: &str) -> String {
    let path = dir.path().join("sync.toml");
    std::fs::write(&path, text).expect("write sync.toml");
    path.display().to_string()
}

fn closed_port() -> u16 {
    let listener = std::net::TcpListener::bind(("127.0.0.1", 0)).expect("bind");
    listener.local_addr().expect("addr").port()
}

// ------------------------------------------------------------ config file

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_key_in_config_file_is_named() {
    let db = TestDb::new(USERS_UUID).await;
    let dir = tempfile::tempdir().unwrap();
    let path = write_config(&dir, "[sink]\nmax_inflight = 3\n");
    let cmd = db.binary_command(&["--config", &path, "run"]);
    refuses(&db, cmd, 2, &["max_inflight"]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_type_in_config_file_is_refused() {
    let db = TestDb::new(USERS_UUID).await;
    let dir = tempfile::tempdir().unwrap();
    let path = write_config(&dir, "[sink]\ntimeout_ms = \"soon\"\n");
    let cmd = db.binary_command(&["--config", &path, "run"]);
    refuses(&db, cmd, 2, &["timeout_ms"]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn env_override_of_wrong_type_names_the_variable() {
    let db = TestDb::new(USERS_UUID).await;
    let mut cmd = db.binary_command(&["run"]);
    cmd.env("USERSYNC_SINK_MAX_IN_FLIGHT", "lots");
    refuses(&db, cmd, 2, &["USERSYNC_SINK_MAX_IN_FLIGHT"]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn missing_secret_env_var_is_named() {
    let db = TestDb::new(USERS_UUID).await;
    let mut cmd = db.binary_command(&["run"]);
    cmd.env("USERSYNC_SINK_SECRET_ENV", "USERSYNC_TEST_NO_SUCH_SECRET")
        .env_remove("USERSYNC_TEST_NO_SUCH_SECRET");
    refuses(&db, cmd, 2, &["USERSYNC_TEST_NO_SUCH_SECRET", "not set"]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn missing_config_file_is_refused() {
    let db = TestDb::new(USERS_UUID).await;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("no-such-sync.toml").display().to_string();
    let cmd = db.binary_command(&["--config", &path, "run"]);
    refuses(&db, cmd, 2, &["no-such-sync.toml"]).await;
    // The same for setup, which reads the same file.
    let out = run(db.binary_command(&["--config", &path, "setup"])).await;
    assert_one_message(&out, 2, &["no-such-sync.toml"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn password_in_config_file_url_is_refused_without_echo() {
    let db = TestDb::new(USERS_UUID).await;
    let dir = tempfile::tempdir().unwrap();
    let pw_url = db
        .url
        .replacen("postgres@", "postgres:Hunter2-dont-echo@", 1);
    assert_ne!(pw_url, db.url, "test URL has an unexpected shape");
    let path = write_config(&dir, &format!("[database]\nurl = \"{pw_url}\"\n"));
    for args in [
        &["--config", path.as_str(), "run"][..],
        &["--config", path.as_str(), "setup"][..],
    ] {
        let out = refuses(&db, db.binary_command(args), 2, &["password"]).await;
        assert!(
            !out.all().contains("Hunter2-dont-echo"),
            "the password is echoed:\n{}",
            out.all()
        );
    }
}

// ------------------------------------------------------- database objects

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn missing_publication_says_run_setup() {
    let db = TestDb::new(USERS_UUID).await;
    db.exec("DROP PUBLICATION usersync_users").await;
    let cmd = db.binary_command(&["run"]);
    refuses(&db, cmd, 2, &["usersync_users", "usersync setup"]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn missing_slot_is_refused() {
    let db = TestDb::new(USERS_UUID).await;
    db.exec(&format!("SELECT pg_drop_replication_slot('{}')", db.dbname))
        .await;
    let cmd = db.binary_command(&["run"]);
    refuses_with_slot(&db, cmd, 2, &["slot", "usersync setup"], false).await;
    // Refusing must not have created the slot behind the operator's back.
    assert_eq!(slot_count(&db).await, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn missing_origin_is_refused() {
    let db = TestDb::new(USERS_UUID).await;
    db.exec(&format!(
        "SELECT pg_replication_origin_drop('{}')",
        db.dbname
    ))
    .await;
    let cmd = db.binary_command(&["run"]);
    refuses(&db, cmd, 2, &["origin", "usersync setup"]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn missing_sync_column_is_named() {
    let db = TestDb::new(USERS_UUID).await;
    db.exec("ALTER TABLE users DROP COLUMN external_synced_at")
        .await;
    let cmd = db.binary_command(&["run"]);
    refuses(&db, cmd, 2, &["external_synced_at"]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replica_identity_default_is_refused() {
    let db = TestDb::new(USERS_UUID).await;
    db.exec("ALTER TABLE users REPLICA IDENTITY DEFAULT").await;
    let cmd = db.binary_command(&["run"]);
    refuses(&db, cmd, 2, &["REPLICA IDENTITY", "FULL"]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sink_columns_naming_a_missing_column_is_refused() {
    let db = TestDb::new(USERS_UUID).await;
    let mut cmd = db.binary_command(&["run"]);
    cmd.env("USERSYNC_SINK_COLUMNS", "email,nope");
    refuses(&db, cmd, 2, &["nope", "sink.columns"]).await;
}

/// The key column renamed while the daemon streams. A change behind the
/// rename is decoded under the new name (the one column the table did not
/// have at session start) and pushed with its key; the write-back, prepared
/// with the old name, fails, so the session stops (exit 1, one message), and
/// a restart (key read anew from the catalog) replays the changes from
/// before the rename under the old name and writes both users back.
/// Nothing is lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_column_renamed_mid_stream_loses_nothing_across_a_restart() {
    // The key is not the first column, so a guess by position is wrong.
    let db = TestDb::new(
        "CREATE TABLE public.users (
            email text NOT NULL,
            name text,
            id uuid PRIMARY KEY DEFAULT gen_random_uuid(),
            plan text NOT NULL DEFAULT 'free'
        )",
    )
    .await;
    let daemon = tokio::spawn(run(db.binary_command(&["run"])));
    insert_user(&db, "first@example.com").await;
    let synced = "SELECT count(*) FROM users WHERE external_synced_at IS NOT NULL";
    wait_until("the first user synced", Duration::from_secs(30), || async {
        db.count(synced).await > 0
    })
    .await;
    // One transaction: its insert is decoded under the old name and its
    // update under the new one, by this session and after the restart.
    db.exec(
        "BEGIN; INSERT INTO users (email, name) VALUES ('second@example.com', 'Bo'); \
         ALTER TABLE users RENAME COLUMN id TO uid; \
         UPDATE users SET name = 'Renamed', external_synced_at = NULL WHERE email = 'first@example.com'; \
         COMMIT",
    )
    .await;
    let out = daemon.await.expect("the daemon task");
    eprintln!("{:?}: {}", out.code, out.stderr.trim_end());
    assert_eq!(out.code, Some(1), "exit code; stderr:\n{}", out.stderr);
    let last = out.stderr.trim_end().lines().last().unwrap_or_default();
    assert!(last.starts_with("usersync: "), "{}", out.stderr);
    let pushed = db.accepted();
    let renamed: Vec<_> = pushed
        .iter()
        .filter(|b| b["data"]["name"] == "Renamed")
        .collect();
    assert!(
        renamed
            .iter()
            .all(|b| b["key"] == pushed[0]["key"] && b["data"]["uid"] == pushed[0]["key"]),
        "the update behind the rename went out with another key: {pushed:#?}"
    );
    let mut daemon = db.spawn_binary(&["run"]);
    let written_back = poll_until(Duration::from_secs(30), || async {
        db.count(synced).await >= 2
    })
    .await;
    assert!(
        written_back,
        "the update behind the rename was not written back after a restart: {:#?}\n{}",
        db.accepted(),
        db.log_tail()
    );
    let _ = daemon.kill();
    let _ = daemon.wait();
    assert!(
        db.accepted()
            .iter()
            .any(|b| b["data"]["name"] == "Renamed" && b["key"] == pushed[0]["key"]),
        "the update behind the rename was never pushed: {:#?}",
        db.accepted()
    );
}

// ------------------------------------------------------------------ setup

/// Nothing of usersync's exists in the database (or the cluster).
async fn assert_nothing_created(db: &TestDb) {
    let name = &db.dbname;
    for (what, sql) in [
        (
            "publication",
            "SELECT count(*) FROM pg_publication WHERE pubname = 'usersync_users'".to_string(),
        ),
        (
            "slot",
            format!("SELECT count(*) FROM pg_replication_slots WHERE slot_name = '{name}'"),
        ),
        (
            "origin",
            format!("SELECT count(*) FROM pg_replication_origin WHERE roname = '{name}'"),
        ),
        (
            "schema",
            "SELECT count(*) FROM pg_namespace WHERE nspname = 'usersync'".to_string(),
        ),
        (
            "sync column",
            "SELECT count(*) FROM information_schema.columns WHERE column_name = 'external_user_id'"
                .to_string(),
        ),
    ] {
        assert_eq!(db.count(&sql).await, 0, "setup created a {what}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn setup_refuses_composite_primary_key_and_creates_nothing() {
    let db = TestDb::bare(
        "CREATE TABLE public.users (org int, id int, email text, PRIMARY KEY (org, id))",
        "",
    )
    .await;
    let out = run(db.binary_command(&["setup"])).await;
    assert_one_message(&out, 2, &["composite primary key", "org, id"]);
    assert_no_secret(&db, &out);
    assert_nothing_created(&db).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn setup_refuses_table_without_primary_key() {
    let db = TestDb::bare("CREATE TABLE public.users (id int, email text)", "").await;
    let out = run(db.binary_command(&["setup"])).await;
    assert_one_message(&out, 2, &["no primary key"]);
    assert_no_secret(&db, &out);
    assert_nothing_created(&db).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn setup_refuses_missing_table() {
    let db = TestDb::bare("", "").await;
    let out = run(db.binary_command(&["setup"])).await;
    assert_one_message(&out, 2, &["public.users", "does not exist"]);
    assert_no_secret(&db, &out);
    assert_nothing_created(&db).await;
    // run says the same before it looks for anything else.
    let out = run(db.binary_command(&["run"])).await;
    assert_one_message(&out, 2, &["public.users", "does not exist"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wal_level_replica_is_refused_by_run_and_setup() {
    let db = TestDb::bare("", "").await;
    let other = tokio::task::spawn_blocking(|| {
        TempCluster::start(TempClusterOptions {
            extra_conf: vec!["wal_level = replica".into()],
            ..Default::default()
        })
    })
    .await
    .unwrap()
    .unwrap_or_else(|e| panic!("cannot start the wal_level=replica cluster: {e}"));
    other.create_database("app").expect("create database");
    other.psql("app", USERS_UUID).expect("create table");
    let url = other.url("app");
    for args in [&["run"][..], &["setup"][..]] {
        let mut cmd = db.binary_command(args);
        cmd.env("USERSYNC_DATABASE_URL", &url);
        let out = run(cmd).await;
        assert_one_message(&out, 2, &["wal_level", "logical"]);
        assert_no_secret(&db, &out);
    }
    assert_eq!(
        other
            .psql(
                "app",
                "SELECT count(*) FROM pg_publication; SELECT count(*) FROM pg_replication_origin"
            )
            .expect("query")
            .split_whitespace()
            .collect::<Vec<_>>(),
        ["0", "0"],
        "setup changed something on a server it refused"
    );
}

/// PostgreSQL 13 and older: pgoutput refuses the `messages` option that the
/// replication stream asks for. Needs a PostgreSQL 13 server:
/// `USERSYNC_PG13_BINDIR=$(.ci/pg-bin.sh 13)` (CI sets it).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_older_than_14_is_refused_by_run_and_check() {
    let Some(bin_dir) = std::env::var_os("USERSYNC_PG13_BINDIR").filter(|v| !v.is_empty()) else {
        eprintln!("skipped: set USERSYNC_PG13_BINDIR=$(.ci/pg-bin.sh 13) to run it");
        return;
    };
    let db = TestDb::bare("", "").await;
    let old = tokio::task::spawn_blocking(move || {
        TempCluster::start(TempClusterOptions {
            bin_dir: Some(bin_dir.into()),
            ..Default::default()
        })
    })
    .await
    .unwrap()
    .unwrap_or_else(|e| panic!("cannot start the PostgreSQL 13 cluster: {e}"));
    assert_eq!(old.major_version(), 13);
    old.create_database("app").expect("create database");
    old.psql("app", USERS_UUID).expect("create table");
    let url = old.url("app");
    // Set up as far as 13 allows, so that the version is the only problem.
    let mut setup = db.binary_command(&["setup"]);
    setup.env("USERSYNC_DATABASE_URL", &url);
    run(setup).await;

    let mut cmd = db.binary_command(&["run"]);
    cmd.env("USERSYNC_DATABASE_URL", &url);
    let out = run(cmd).await;
    assert_one_message(&out, 2, &["PostgreSQL 13.", "not supported", "14 or newer"]);

    let mut cmd = db.binary_command(&["check"]);
    cmd.env("USERSYNC_DATABASE_URL", &url);
    let out = run(cmd).await;
    assert_eq!(out.code, Some(2), "{}", out.all());
    let line = out
        .stdout
        .lines()
        .find(|l| l.contains("server_version"))
        .unwrap_or_else(|| panic!("no server_version line:\n{}", out.all()));
    assert!(line.starts_with("[FAIL]"), "{line}");
    assert!(
        line.contains("PostgreSQL 13.") && line.contains("14 or newer"),
        "{line}"
    );
}

// ---------------------------------------------------------------- runtime

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unreachable_database_is_exit_1_naming_host_and_port() {
    let db = TestDb::bare("", "").await;
    let port = closed_port();
    let url = format!("postgres://postgres@127.0.0.1:{port}/app");
    let target = format!("127.0.0.1:{port}");
    for args in [&["run"][..], &["setup"][..]] {
        let mut cmd = db.binary_command(args);
        cmd.env("USERSYNC_DATABASE_URL", &url)
            .env("USERSYNC_DATABASE_PASSWORD_ENV", "USERSYNC_TEST_DB_PW")
            .env("USERSYNC_TEST_DB_PW", "Pw-never-printed-42");
        let out = run(cmd).await;
        assert_one_message(&out, 1, &[&target]);
        assert_no_secret(&db, &out);
        assert!(
            !out.all().contains("Pw-never-printed-42"),
            "the database password is in the output:\n{}",
            out.all()
        );
    }
}

// -------------------------------------------------------- setup --print-sql

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn print_sql_needs_no_config_and_matches_the_committed_script() {
    let dir = tempfile::tempdir().unwrap();
    let out = run(bare_command(&["setup", "--print-sql"], dir.path())).await;
    assert_eq!(out.code, Some(0), "stderr:\n{}", out.stderr);
    for phrase in [
        "REPLICA IDENTITY FULL",
        "pg_create_logical_replication_slot",
        "CREATE PUBLICATION",
        "pg_replication_origin_create",
        "external_user_id",
        "external_synced_at",
    ] {
        assert!(
            out.stdout.contains(phrase),
            "lacks {phrase}:\n{}",
            out.stdout
        );
    }
    let committed = include_str!("../../sql/setup.sql");
    assert_eq!(
        out.stdout, committed,
        "sql/setup.sql differs from `usersync setup --print-sql`"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn print_sql_refuses_a_table_name_that_would_break_out_of_the_script() {
    let dir = tempfile::tempdir().unwrap();
    for args in [
        &["setup", "--print-sql"][..],
        &["setup", "--role", "usersync_role", "--print-sql"][..],
    ] {
        let mut cmd = bare_command(args, dir.path());
        cmd.env(
            "USERSYNC_DATABASE_TABLE",
            "public.users\n; DROP TABLE public.accounts; --",
        );
        let out = run(cmd).await;
        // Refused at config load: nothing printed that psql -f could run.
        assert_one_message(&out, 2, &["control character"]);
        assert!(!out.stdout.contains("DROP TABLE"), "{}", out.all());
    }
}

// ------------------------------------------------------------------ --help

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn help_texts_exit_0_and_say_what_they_do() {
    let dir = tempfile::tempdir().unwrap();
    for (args, phrases) in [
        (
            &["--help"][..],
            &["users table", "run", "setup", "demo", "Exit codes"][..],
        ),
        (&["run", "--help"][..], &["daemon", "usersync setup"][..]),
        (
            &["setup", "--help"][..],
            &["REPLICA IDENTITY", "publication", "--print-sql"][..],
        ),
        (&["demo", "--help"][..], &["PostgreSQL", "fake"][..]),
    ] {
        let out = run(bare_command(args, dir.path())).await;
        assert_eq!(out.code, Some(0), "{args:?}: {}", out.all());
        for phrase in phrases {
            assert!(
                out.stdout.contains(phrase),
                "{args:?} help lacks {phrase:?}:\n{}",
                out.stdout
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_subcommand_exits_2() {
    let dir = tempfile::tempdir().unwrap();
    let out = run(bare_command(&["frobnicate"], dir.path())).await;
    assert_eq!(out.code, Some(2), "{}", out.all());
    assert!(out.stderr.contains("frobnicate"), "{}", out.stderr);
    assert!(!out.stderr.contains("panicked"), "{}", out.stderr);
}
