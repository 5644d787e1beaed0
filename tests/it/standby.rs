//! Hot standby: two `usersync run` binaries on one database. Exactly one
//! leads (`usersync_leader` 1, `/readyz` 200, named by `status`); the other
//! waits and takes over when the leader loses its lock session, is killed
//! with SIGKILL mid-stream, or freezes (SIGSTOP); a frozen leader that wakes
//! up pushes nothing. Every test ends by comparing the service with the
//! table: every row written back, no user created twice, each change
//! written back once.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use crate::common::*;
use crate::observability::{http_get, sample};

const WAIT: Duration = Duration::from_secs(60);

/// One daemon binary with its own log file and metrics port.
struct Daemon {
    child: Child,
    log: PathBuf,
}

impl Daemon {
    fn spawn(db: &TestDb, name: &str, envs: &[(&str, &str)]) -> Daemon {
        let log = std::path::Path::new(env!("CARGO_TARGET_TMPDIR"))
            .join(format!("{}-{name}.log", db.dbname));
        let _ = std::fs::remove_file(&log);
        let out = std::fs::File::create(&log).expect("log file");
        let err = out.try_clone().expect("log file");
        let mut cmd = db.binary_command(&["run"]);
        cmd.env("USERSYNC_LOG_LEVEL", "info,usersync=debug")
            .env("USERSYNC_METRICS_LISTEN", "127.0.0.1:0");
        for (k, v) in envs {
            cmd.env(k, v);
        }
        let child = cmd.stdout(out).stderr(err).spawn().expect("spawn usersync");
        Daemon { child, log }
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    fn text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn count(&self, needle: &str) -> usize {
        self.text().matches(needle).count()
    }

    fn tail(&self) -> String {
        let text = self.text();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(40)..].join("\n")
    }

    /// Waits until `needle` appears `n` times in the log.
    async fn wait_log(&mut self, needle: &str, n: usize) {
        let deadline = Instant::now() + WAIT;
        while self.count(needle) < n {
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                panic!(
                    "daemon exited ({status}) waiting for {needle:?}:\n{}",
                    self.tail()
                );
            }
            assert!(
                Instant::now() < deadline,
                "no {needle:?} (x{n}) in the log after {WAIT:?}:\n{}",
                self.tail()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    async fn metrics_url(&mut self) -> String {
        self.wait_log("metrics on http://", 1).await;
        let log = self.text();
        let at = log.find("metrics on http://").expect("address");
        let rest = &log[at + "metrics on ".len()..];
        rest[..rest.find("/metrics").expect("address end")].to_string()
    }

    fn signal(&self, sig: &str) {
        let ok = Command::new("kill")
            .args([sig, &self.pid().to_string()])
            .status()
            .expect("kill");
        assert!(ok.success(), "kill {sig}");
    }

    fn kill9(&mut self) {
        if let Some(status) = self.child.try_wait().expect("try_wait") {
            panic!("daemon exited by itself ({status}):\n{}", self.tail());
        }
        self.child.kill().expect("SIGKILL");
        self.child.wait().expect("wait");
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = Command::new("kill")
            .args(["-CONT", &self.child.id().to_string()])
            .status();
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

async fn leader_gauge(base: &str) -> f64 {
    let (_, body) = http_get(&format!("{base}/metrics")).await;
    sample(&body, "usersync_leader").unwrap_or(-1.0)
}

/// `usersync status` output.
async fn status(db: &TestDb) -> String {
    let out = run_cli(db.binary_command(&["status"]), WAIT).await;
    out.all()
}

/// Inserts users `from..=to` (ten per transaction) and then moves each to
/// plan 'pro': every user has two changes that travel the stream.
async fn write_users(db: &TestDb, from: i64, to: i64) {
    for start in (from..=to).step_by(10) {
        let end = (start + 9).min(to);
        db.exec(&format!(
            "INSERT INTO users (id, email) SELECT i, 'u' || i || '@example.com' FROM generate_series({start}, {end}) i"
        ))
        .await;
    }
    for start in (from..=to).step_by(10) {
        let end = (start + 9).min(to);
        db.exec(&format!(
            "UPDATE users SET plan = 'pro' WHERE id BETWEEN {start} AND {end}"
        ))
        .await;
    }
}

/// Every row is written back with the id of its one external user, which
/// holds the row's latest plan; each change was written back exactly once.
async fn assert_converged(db: &TestDb, changes: i64) {
    // Everything committed so far is pushed and written back once the slot
    // is confirmed past the current position.
    db.wait_confirmed_past_now(WAIT).await;
    db.wait_consistent(WAIT).await;
    let users = db.fake.users();
    let mut per_key: BTreeMap<String, usize> = BTreeMap::new();
    for u in &users {
        *per_key.entry(key_text(&u.key)).or_default() += 1;
    }
    let dups: Vec<_> = per_key.iter().filter(|(_, n)| **n > 1).collect();
    assert!(
        dups.is_empty(),
        "users created twice (key, count): {dups:?}"
    );
    let rows = db
        .client
        .query("SELECT id::text, plan FROM users", &[])
        .await
        .expect("rows");
    for r in rows {
        let (id, plan): (String, String) = (r.get(0), r.get(1));
        let u = users.iter().find(|u| key_text(&u.key) == id).expect("user");
        assert_eq!(u.data["plan"], plan.as_str(), "user {id}: {u:?}");
    }
    let twice = db
        .count(
            "SELECT count(*) FROM (SELECT event_id FROM usersync.sync_log WHERE outcome = 'synced' \
             GROUP BY event_id HAVING count(*) > 1) d",
        )
        .await;
    assert_eq!(twice, 0, "changes written back more than once");
    let once = db
        .count("SELECT count(DISTINCT event_id) FROM usersync.sync_log WHERE outcome = 'synced'")
        .await;
    assert_eq!(once, changes, "changes written back");
}

async fn wait_requests(db: &TestDb, n: usize) {
    wait_for(&format!("{n} requests at the service"), WAIT, || {
        db.fake.requests().len() >= n
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leadership_moves_on_a_lost_lock_session_and_on_sigkill_without_loss_or_duplicates() {
    install_crypto();
    let db = TestDb::new(USERS_BIGINT).await;
    // Answers take a while, so a takeover finds changes in flight.
    db.fake.set_latency(Duration::from_millis(20));
    let mut a = Daemon::spawn(&db, "a", &[]);
    a.wait_log("leading:", 1).await;
    let mut b = Daemon::spawn(&db, "b", &[]);
    b.wait_log("standby: another usersync leads", 1).await;
    let (a_url, b_url) = (a.metrics_url().await, b.metrics_url().await);
    wait_until("a streaming and ready", WAIT, || async {
        http_get(&format!("{a_url}/readyz")).await.0 == 200
    })
    .await;
    assert_eq!(leader_gauge(&a_url).await, 1.0);
    assert_eq!(leader_gauge(&b_url).await, 0.0);
    let (code, body) = http_get(&format!("{b_url}/readyz")).await;
    assert_eq!(code, 503, "{body}");
    assert!(body.contains("standby"), "{body}");
    assert_eq!(http_get(&format!("{b_url}/healthz")).await.0, 200);
    let st = status(&db).await;
    assert!(st.contains(&format!(":{} (backend pid", a.pid())), "{st}");
    assert!(st.contains("1 standby waiting"), "{st}");

    // 1. The leader's lock session ends (a DBA, a proxy, a network cut)
    //    while changes stream: the standby takes over, the old leader steps
    //    down to standby.
    write_users(&db, 1, 200).await;
    wait_requests(&db, 50).await;
    assert_eq!(
        b.count("leading:"),
        0,
        "the standby streamed while a leader led"
    );
    let ended = db
        .count(&format!(
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity \
             WHERE application_name LIKE 'usersync-leader %:{}'",
            a.pid()
        ))
        .await;
    assert_eq!(ended, 1, "a's lock session");
    write_users(&db, 201, 400).await;
    b.wait_log("leading:", 1).await;
    a.wait_log("lost leadership", 1).await;
    a.wait_log("standby: another usersync leads", 1).await;

    // 2. The new leader is killed mid-stream: the first takes over again.
    let seen = db.fake.requests().len();
    write_users(&db, 401, 600).await;
    wait_requests(&db, seen + 50).await;
    b.kill9();
    write_users(&db, 601, 700).await;
    a.wait_log("leading:", 2).await;
    const N: i64 = 700;
    assert_converged(&db, N * 2).await;
    let st = status(&db).await;
    assert!(st.contains(&format!(":{} (backend pid", a.pid())), "{st}");
    assert!(st.contains("no standby"), "{st}");
    wait_until("a ready again", WAIT, || async {
        http_get(&format!("{a_url}/readyz")).await.0 == 200
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frozen_leader_is_replaced_and_pushes_nothing_when_it_wakes() {
    install_crypto();
    let db = TestDb::new(USERS_BIGINT).await;
    // Slow answers: the leader has pushes in flight and queued when frozen.
    db.fake.set_latency(Duration::from_millis(50));
    let lease = [("USERSYNC_DATABASE_LEADER_LEASE_SECS", "2")];
    let mut a = Daemon::spawn(&db, "a", &lease);
    a.wait_log("leading:", 1).await;
    let mut b = Daemon::spawn(&db, "b", &lease);
    b.wait_log("standby: another usersync leads", 1).await;

    db.exec("INSERT INTO users (id, email) SELECT i, 'u' || i || '@example.com' FROM generate_series(1, 300) i")
        .await;
    wait_requests(&db, 20).await;
    a.signal("-STOP");
    let frozen_at = Instant::now();
    b.wait_log("leading:", 1).await;
    println!("takeover after SIGSTOP: {:?}", frozen_at.elapsed());
    assert_converged(&db, 300).await;

    // The frozen leader wakes: it must find its lease gone and push nothing.
    let before = db.fake.requests().len();
    a.signal("-CONT");
    a.wait_log("lost leadership", 1).await;
    db.exec("INSERT INTO users (id, email) VALUES (1000, 'marker@example.com')")
        .await;
    assert_converged(&db, 301).await;
    let after: Vec<String> = db.fake.requests()[before..]
        .iter()
        .map(|r| format!("{} {}", r.body["type"], r.body["data"]["id"]))
        .collect();
    assert_eq!(
        after,
        vec!["\"user.created\" 1000".to_string()],
        "only the marker is pushed after the old leader woke up"
    );
}

/// A term that ends while its write-back waits for the replication origin
/// (held by a predecessor's session, up to 30 s) ends at once: the wait is
/// part of the term. Without that, the stopped term comes back after the
/// wait with an error instead of a clean stop.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_term_ending_while_the_write_back_waits_for_the_origin_stops_at_once() {
    install_crypto();
    let db = TestDb::new(USERS_BIGINT).await;
    // The predecessor's write-back session, still holding the origin.
    let (holder, conn) = tokio_postgres::connect(&db.url, tokio_postgres::NoTls)
        .await
        .expect("connect");
    tokio::spawn(conn);
    holder
        .execute(
            "SELECT pg_replication_origin_session_setup($1)",
            &[&db.dbname],
        )
        .await
        .expect("hold the origin");
    let daemon = db.start_daemon();
    // The daemon's write-back session exists: it is waiting for the origin.
    let deadline = Instant::now() + WAIT;
    while db
        .count(&format!(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = '{}' AND application_name = 'usersync-writeback'",
            db.dbname
        ))
        .await
        == 0
    {
        assert!(Instant::now() < deadline, "no write-back session");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    daemon.cancel.cancel();
    // Still held: a term that waits it out ends only after the 30 s origin
    // wait (and then cleanly, its error being transient), so the bound here
    // is that wait, not a performance figure: the fixed term ends at once.
    match tokio::time::timeout(Duration::from_secs(20), daemon.task).await {
        Ok(Ok(Ok(()))) => {}
        Ok(Ok(Err(e))) => panic!("the stopped term failed: {e}"),
        Ok(Err(e)) => panic!("daemon panicked: {e}"),
        Err(_) => panic!("the stopped term kept waiting for the replication origin"),
    }
    drop(holder);
}
