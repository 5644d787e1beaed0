//! Invariant 8 end to end: secrets never appear in logs (text and JSON), in
//! /metrics, in CLI error output, or in usersync's tables; emails and names
//! stay out of logs unless `log.personal_data = true`. The daemon is driven
//! through successful pushes, retries, a dead letter and a refused
//! credential, with every secret a known string the test can grep for.

use std::process::{Child, Command};
use std::time::{Duration, Instant};

use crate::common::*;
use usersync::dev::fake::memberstack::{FakeMemberstack, FakeMemberstackOptions};
use usersync::dev::fake::Fault;

const WAIT: Duration = Duration::from_secs(60);
const DB_PASSWORD: &str = "pgPw-Zq81xKv93LmTn";
const URL_PASSWORD: &str = "urlPw-Hx42Rb77Jd0Qe";
const MS_KEY: &str = "sk_sb_known_Fy63Nc28Wt5Pa";
const MS_WRONG_KEY: &str = "sk_sb_wrong_Ud19Ge47Ks3Vo";
const EMAIL: &str = "alice.lindqvist@example.com";
const NAME: &str = "Alice Lindqvist";
const BAD_EMAIL: &str = "bob-without-domain";

fn spawn(mut cmd: Command, log: &std::path::Path) -> Child {
    let out = std::fs::File::create(log).expect("log file");
    let err = out.try_clone().expect("log file");
    cmd.env("USERSYNC_LOG_LEVEL", "debug")
        .env("USERSYNC_METRICS_LISTEN", "127.0.0.1:0")
        .env("USERSYNC_DATABASE_PASSWORD_ENV", "TEST_PG_PASSWORD")
        .env("TEST_PG_PASSWORD", DB_PASSWORD)
        .stdout(out)
        .stderr(err)
        .spawn()
        .expect("spawn usersync")
}

async fn metrics_text(log: &std::path::Path) -> String {
    let deadline = Instant::now() + WAIT;
    let base = loop {
        let text = std::fs::read_to_string(log).unwrap_or_default();
        if let Some(at) = text.find("metrics on http://") {
            let rest = &text[at + "metrics on ".len()..];
            if let Some(end) = rest.find("/metrics") {
                break rest[..end].to_string();
            }
        }
        assert!(Instant::now() < deadline, "no metrics address:\n{text}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    reqwest::get(format!("{base}/metrics"))
        .await
        .expect("scrape")
        .text()
        .await
        .expect("body")
}

/// Asks for a clean stop (SIGTERM), so shutdown lines are logged too.
fn stop(mut child: Child) {
    unsafe {
        libc::kill(child.id() as i32, libc::SIGTERM);
    }
    let deadline = Instant::now() + WAIT;
    while Instant::now() < deadline {
        if let Ok(Some(_)) = child.try_wait() {
            return;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let _ = child.kill();
    let _ = child.wait();
}

fn assert_clean(what: &str, text: &str, secrets: &[&str]) {
    for s in secrets {
        assert!(!text.contains(s), "{what} contains secret {s:?}:\n{text}");
    }
}

async fn table_text(db: &TestDb, table: &str) -> String {
    db.client
        .query(&format!("SELECT t::text FROM {table} t"), &[])
        .await
        .expect("table")
        .iter()
        .map(|r| r.get::<_, String>(0))
        .collect::<Vec<_>>()
        .join("\n")
}

async fn wait_count(db: &TestDb, sql: &str, n: i64) {
    let deadline = Instant::now() + WAIT;
    while db.count(sql).await < n {
        assert!(Instant::now() < deadline, "{sql} < {n}:\n{}", db.log_tail());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn secrets_and_personal_data_stay_out_of_logs_metrics_errors_and_tables() {
    install_crypto();
    let db = TestDb::new(USERS_BIGINT).await;
    let whsec = db.secret.to_whsec();
    let whsec_body = whsec.trim_start_matches("whsec_").to_string();
    let dir = tempfile::tempdir().expect("tempdir");
    let mut secrets = vec![
        whsec.as_str(),
        whsec_body.as_str(),
        DB_PASSWORD,
        URL_PASSWORD,
        MS_KEY,
        MS_WRONG_KEY,
    ];
    let pii = [EMAIL, NAME, "Lindqvist", BAD_EMAIL];

    // Webhook, JSON logs: pushes, retries, a dead letter and a parked change.
    let json_log = dir.path().join("json.log");
    let mut cmd = db.binary_command(&["run", "--log-format", "json"]);
    cmd.env("USERSYNC_LOG_FORMAT", "text");
    let child = spawn(cmd, &json_log);
    db.fake.inject(Fault::Status {
        status: 503,
        count: 2,
    });
    db.exec(&format!(
        "INSERT INTO users (id, email, name) VALUES (1, '{EMAIL}', '{NAME}')"
    ))
    .await;
    db.exec(&format!(
        "INSERT INTO users (id, email, name) VALUES (2, '{BAD_EMAIL}', 'Bob Marchetti')"
    ))
    .await;
    db.exec("UPDATE users SET name = 'Bob M.' WHERE id = 2")
        .await;
    db.exec(&format!("UPDATE users SET name = '{NAME} Jr' WHERE id = 1"))
        .await;
    wait_count(&db, "SELECT count(*) FROM usersync.dead_letters", 2).await;
    wait_count(
        &db,
        "SELECT count(*) FROM usersync.sync_log WHERE outcome = 'synced'",
        2,
    )
    .await;
    let metrics = metrics_text(&json_log).await;
    stop(child);
    let json = std::fs::read_to_string(&json_log).expect("log");
    assert!(
        json.lines()
            .all(|l| l.trim().is_empty() || l.starts_with('{')),
        "--log-format json must win over log.format:\n{json}"
    );
    assert!(
        json.contains("\"outcome\":\"synced\""),
        "per-change lines at debug:\n{json}"
    );
    assert!(json.contains("push failed, will retry"), "{json}");
    assert!(json.contains("dead-lettered"), "{json}");
    assert_clean("JSON log", &json, &secrets);
    assert_clean("JSON log", &json, &pii);
    assert!(metrics.contains("usersync_pushes_total"), "{metrics}");
    assert_clean("/metrics", &metrics, &secrets);
    assert_clean("/metrics", &metrics, &pii);

    // Text logs, and with personal_data the values do show (the check above
    // is not vacuous).
    let text_log = dir.path().join("text.log");
    let child = spawn(
        db.binary_command(&["run", "--log-format", "text"]),
        &text_log,
    );
    db.exec("UPDATE users SET plan = 'pro' WHERE id = 1").await;
    wait_count(
        &db,
        "SELECT count(*) FROM usersync.sync_log WHERE outcome = 'synced'",
        3,
    )
    .await;
    stop(child);
    let text = std::fs::read_to_string(&text_log).expect("log");
    assert!(!text.contains("{\""), "text format expected:\n{text}");
    assert!(text.contains("synced"), "{text}");
    // Written to a file, not a terminal: no colour escape codes.
    assert!(
        !text.contains('\u{1b}'),
        "escape codes in a log file:\n{text}"
    );
    assert_clean("text log", &text, &secrets);
    assert_clean("text log", &text, &pii);

    let pd_log = dir.path().join("personal.log");
    let mut cmd = db.binary_command(&["run"]);
    cmd.env("USERSYNC_LOG_PERSONAL_DATA", "true");
    let child = spawn(cmd, &pd_log);
    db.exec("UPDATE users SET plan = 'team' WHERE id = 1").await;
    wait_count(
        &db,
        "SELECT count(*) FROM usersync.sync_log WHERE outcome = 'synced'",
        4,
    )
    .await;
    stop(child);
    let pd = std::fs::read_to_string(&pd_log).expect("log");
    assert!(
        pd.contains(EMAIL),
        "log.personal_data = true logs values:\n{pd}"
    );
    assert_clean("personal-data log", &pd, &secrets);

    // CLI output: dlq list, a database URL with a password that fails, and
    // a wrong webhook secret format.
    let out = run_cli(db.binary_command(&["dlq", "list"]), WAIT).await;
    assert_eq!(out.code, Some(0), "{}", out.all());
    assert_clean("dlq list", &out.all(), &secrets);
    let mut cmd = db.binary_command(&["run"]);
    cmd.env(
        "USERSYNC_DATABASE_URL",
        format!(
            "postgres://postgres:{URL_PASSWORD}@127.0.0.1:1/{}",
            db.dbname
        ),
    );
    let out = run_cli(cmd, WAIT).await;
    assert_ne!(out.code, Some(0), "{}", out.all());
    assert_clean("connection error", &out.all(), &secrets);
    let mut cmd = db.binary_command(&["run"]);
    cmd.env("TEST_SECRET", format!("{whsec}!!"));
    let out = run_cli(cmd, WAIT).await;
    assert_eq!(out.code, Some(2), "{}", out.all());
    assert_clean("bad secret error", &out.all(), &secrets);

    // Memberstack: a push with the right key, then a refused key.
    let api = FakeMemberstack::start(FakeMemberstackOptions {
        api_key: MS_KEY.into(),
        ..Default::default()
    })
    .await
    .expect("fake memberstack");
    let ms = |key: &str, args: &[&str]| {
        let mut cmd = db.binary_command(args);
        cmd.env_remove("USERSYNC_SINK_SECRET_ENV")
            .env("USERSYNC_SINK_KIND", "memberstack")
            .env("USERSYNC_SINK_URL", api.url())
            .env("USERSYNC_SINK_API_KEY_ENV", "MS_KEY")
            .env("MS_KEY", key)
            .env(
                "USERSYNC_SINK_MAPPING",
                "email=email,customFields.first-name=name",
            );
        cmd
    };
    let out = run_cli(ms(MS_WRONG_KEY, &["run"]), WAIT).await;
    assert_eq!(out.code, Some(2), "{}", out.all());
    assert!(
        out.all().contains("MS_KEY"),
        "names the variable: {}",
        out.all()
    );
    assert_clean("refused key", &out.all(), &secrets);
    let ms_log = dir.path().join("memberstack.log");
    let child = spawn(ms(MS_KEY, &["run", "--log-format", "json"]), &ms_log);
    db.exec("INSERT INTO users (id, email, name) VALUES (3, 'carol.ng@example.com', 'Carol Ng')")
        .await;
    db.exec("INSERT INTO users (id, email) VALUES (4, 'dave-no-domain')")
        .await;
    let deadline = Instant::now() + WAIT;
    while api.members().is_empty() {
        assert!(Instant::now() < deadline, "memberstack push");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    wait_count(
        &db,
        "SELECT count(*) FROM usersync.dead_letters WHERE user_key = '4'",
        1,
    )
    .await;
    let metrics = metrics_text(&ms_log).await;
    stop(child);
    let ms_text = std::fs::read_to_string(&ms_log).expect("log");
    assert_clean("memberstack log", &ms_text, &secrets);
    assert_clean(
        "memberstack log",
        &ms_text,
        &["carol.ng@example.com", "Carol Ng", "dave-no-domain"],
    );
    assert_clean("memberstack /metrics", &metrics, &secrets);

    // usersync's tables.
    secrets.retain(|s| !s.is_empty());
    for table in [
        "usersync.dead_letters",
        "usersync.sync_log",
        "usersync.user_progress",
    ] {
        let t = table_text(&db, table).await;
        assert_clean(table, &t, &secrets);
    }
    let sync_log = table_text(&db, "usersync.sync_log").await;
    assert_clean("usersync.sync_log", &sync_log, &pii);
}
