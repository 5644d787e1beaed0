//! Fault injection on a real PostgreSQL and the fake webhook receiver:
//! SIGKILL of the real binary at random moments under mixed writes, a
//! PostgreSQL crash-restart mid-stream, a sink that is down, rate limited or
//! times out, and a kill between the push and the write-back. Every test ends
//! by comparing the external state with the table.
//!
//! The restart test runs on a cluster of its own (`private_cluster`): the
//! shared one serves every other test of the binary. It still takes
//! `RESTART_LOCK` for writing so that no other test of this file runs on the
//! loaded machine while it does.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU32, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use crate::common::*;
use serde_json::Value;
use tokio::sync::RwLock;
use tokio_postgres::types::ToSql;
use tokio_postgres::Client;
use usersync::dev::fake::{Fault, RecordedRequest};

/// Every test reads it for its whole run; the PostgreSQL restart writes it.
static RESTART_LOCK: RwLock<()> = RwLock::const_new(());

const WAIT: Duration = Duration::from_secs(30);
const LONG_WAIT: Duration = Duration::from_secs(60);

// ---------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------

/// xorshift64*: enough randomness for fault timing, reproducible by seed.
struct XorShift(u64);

impl XorShift {
    /// Seeded from `FAULTS_SEED` when set (to replay a failure), else the clock.
    fn from_env_or_time(what: &str) -> XorShift {
        let seed = std::env::var("FAULTS_SEED")
            .ok()
            .and_then(|s| s.trim().parse::<u64>().ok())
            .unwrap_or_else(|| {
                let nanos = SystemTime::now()
                    .duration_since(UNIX_EPOCH)
                    .map_or(0, |d| d.as_nanos() as u64);
                nanos ^ (u64::from(std::process::id()) << 32)
            });
        println!("{what}: seed {seed} (set FAULTS_SEED={seed} to replay)");
        XorShift::new(seed)
    }

    fn new(seed: u64) -> XorShift {
        XorShift(if seed == 0 {
            0x9E37_79B9_7F4A_7C15
        } else {
            seed
        })
    }

    fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    /// Uniform in `0..n` (n > 0).
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }

    /// Uniform in `lo..=hi`.
    fn between(&mut self, lo: u64, hi: u64) -> u64 {
        lo + self.below(hi - lo + 1)
    }

    fn percent(&mut self, p: u64) -> bool {
        self.below(100) < p
    }
}

async fn connect(url: &str) -> Client {
    let (client, conn) = tokio_postgres::connect(url, tokio_postgres::NoTls)
        .await
        .unwrap_or_else(|e| panic!("connect: {e}"));
    tokio::spawn(conn);
    client
}

/// `X/Y` as PostgreSQL prints an LSN.
fn parse_lsn(text: &str) -> u64 {
    let (hi, lo) = text
        .split_once('/')
        .unwrap_or_else(|| panic!("not an LSN: {text}"));
    let hi = u64::from_str_radix(hi, 16).unwrap_or_else(|e| panic!("LSN {text}: {e}"));
    let lo = u64::from_str_radix(lo, 16).unwrap_or_else(|e| panic!("LSN {text}: {e}"));
    (hi << 32) | lo
}

fn fmt_lsn(lsn: u64) -> String {
    format!("{:X}/{:X}", lsn >> 32, lsn & 0xFFFF_FFFF)
}

/// The commit LSN in an event id `evt_<16 hex digits>_<position>`.
fn event_commit_lsn(event_id: &str) -> u64 {
    let hex = event_id
        .strip_prefix("evt_")
        .and_then(|rest| rest.split('_').next())
        .unwrap_or_else(|| panic!("unexpected event id {event_id}"));
    u64::from_str_radix(hex, 16).unwrap_or_else(|e| panic!("event id {event_id}: {e}"))
}

async fn insert_user(client: &Client, id: i64) {
    let email = format!("u{id}@example.com");
    client
        .execute(
            "INSERT INTO users (id, email) VALUES ($1, $2)",
            &[&id, &email],
        )
        .await
        .unwrap_or_else(|e| panic!("insert {id}: {e}"));
}

/// `TestDb::start_daemon` with extra `USERSYNC_…` overrides.
fn start_daemon_with(db: &TestDb, overrides: &[(&str, &str)]) -> InProcessDaemon {
    let mut env = db.env();
    for (k, v) in overrides {
        env.insert((*k).to_string(), (*v).to_string());
    }
    let cfg = usersync::config::Config::from_parts(Some(&db.toml()), "test", &env)
        .unwrap_or_else(|e| panic!("config: {e}"));
    let cancel = tokio_util::sync::CancellationToken::new();
    let c = cancel.clone();
    let task = tokio::spawn(async move { usersync::app::run::run(&cfg, c, None).await });
    InProcessDaemon { cancel, task }
}

/// Fails at once, with the daemon's result, if an in-process daemon ended.
async fn assert_running(daemon: &mut InProcessDaemon, when: &str) {
    if !daemon.task.is_finished() {
        return;
    }
    match (&mut daemon.task).await {
        Ok(Ok(())) => panic!(
            "the daemon stopped by itself {when} (daemon::run returned Ok without being cancelled)"
        ),
        Ok(Err(e)) => panic!("the daemon stopped {when}: {e}"),
        Err(e) => panic!("the daemon panicked {when}: {e}"),
    }
}

/// `TestDb::wait_consistent`, explaining rows left without an external id
/// on failure.
async fn wait_consistent_explained(db: &TestDb, timeout: Duration) {
    let deadline = Instant::now() + timeout;
    loop {
        match db.consistency_problem().await {
            None => return,
            Some(p) if Instant::now() > deadline => panic!(
                "not consistent after {timeout:?}: {p}\n{}\nbinary log tail:\n{}",
                explain_missing_ids(db).await,
                db.log_tail()
            ),
            Some(_) => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
}

fn strip_ansi(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut chars = text.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            for c in chars.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// For rows without an external id: what the service and the daemon's log
/// say happened to them.
async fn explain_missing_ids(db: &TestDb) -> String {
    let rows = db
        .client
        .query(
            "SELECT id::text FROM users WHERE external_user_id IS NULL ORDER BY id LIMIT 5",
            &[],
        )
        .await
        .expect("rows");
    let log = strip_ansi(&std::fs::read_to_string(db.log_path()).unwrap_or_default());
    let mut out = String::new();
    for row in rows {
        let key: String = row.get(0);
        let users: Vec<String> = db
            .fake
            .users()
            .into_iter()
            .filter(|u| key_text(&u.key) == key)
            .map(|u| format!("{} (deleted: {})", u.external_id, u.deleted))
            .collect();
        let synced: Vec<&str> = log
            .lines()
            .filter(|l| l.contains(" synced ") && l.contains(&format!(" user={key} ")))
            .collect();
        out.push_str(&format!(
            "row {key} has no external id; the service has {users:?}"
        ));
        if log.is_empty() {
            out.push_str(" (in-process daemon: no log)\n");
        } else {
            out.push_str(&format!(
                "; the daemon logged {} sync(s) of it as written back:\n{}\n",
                synced.len(),
                synced.join("\n")
            ));
        }
    }
    out
}

/// `wait_consistent` that notices a daemon that is gone.
async fn wait_consistent_running(db: &TestDb, daemon: &mut InProcessDaemon, when: &str) {
    let deadline = Instant::now() + LONG_WAIT;
    loop {
        assert_running(daemon, when).await;
        match db.consistency_problem().await {
            None => return,
            Some(p) if Instant::now() > deadline => panic!(
                "not consistent {when} after {LONG_WAIT:?}: {p}\n{}",
                explain_missing_ids(db).await
            ),
            Some(_) => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
}

async fn restart_postgres(db: &mut TestDb) {
    let started = Instant::now();
    tokio::task::spawn_blocking(|| private_cluster().restart_immediate())
        .await
        .expect("restart task")
        .unwrap_or_else(|e| panic!("restart_immediate: {e}"));
    println!("PostgreSQL restarted in {:?}", started.elapsed());
    // The harness connection died with the server.
    db.client = reconnect(&db.url).await;
}

async fn confirmed_lsn(db: &TestDb) -> u64 {
    parse_lsn(
        &db.confirmed_flush_lsn()
            .await
            .expect("slot has a confirmed LSN"),
    )
}

async fn current_insert_lsn(client: &Client) -> u64 {
    let row = client
        .query_one("SELECT pg_current_wal_insert_lsn()::text", &[])
        .await
        .expect("pg_current_wal_insert_lsn");
    parse_lsn(row.get(0))
}

fn is_success(r: &RecordedRequest) -> bool {
    (200..300).contains(&r.status)
}

/// Rows whose synced values (email, name, plan) differ from their live
/// external user's `data`.
async fn latest_value_problems(db: &TestDb) -> Vec<String> {
    let rows = db
        .client
        .query(
            "SELECT id::text, email, name, plan, external_user_id FROM users ORDER BY id",
            &[],
        )
        .await
        .expect("rows");
    let users = db.fake.users();
    let mut problems = Vec::new();
    for row in &rows {
        let key: String = row.get(0);
        let ext: Option<String> = row.get(4);
        let Some(ext) = ext else {
            problems.push(format!("row {key} has no external id"));
            continue;
        };
        let Some(user) = users.iter().find(|u| !u.deleted && u.external_id == ext) else {
            problems.push(format!("row {key}: no live external user {ext}"));
            continue;
        };
        let wanted: [(&str, Option<String>); 3] = [
            ("email", Some(row.get(1))),
            ("name", row.get(2)),
            ("plan", Some(row.get(3))),
        ];
        for (column, want) in wanted {
            let got = user.data.get(column).cloned().unwrap_or(Value::Null);
            let want = want.map_or(Value::Null, Value::String);
            if got != want {
                problems.push(format!(
                    "user {key} ({ext}): {column} is {got} externally but {want} in the row"
                ));
            }
        }
    }
    problems
}

/// Every row's live external user carries the row's current email, name and
/// plan (waits for trailing updates to arrive).
async fn assert_latest_values(db: &TestDb) {
    let deadline = Instant::now() + WAIT;
    loop {
        let problems = latest_value_problems(db).await;
        if problems.is_empty() {
            return;
        }
        if Instant::now() > deadline {
            panic!(
                "{} value mismatch(es) after {WAIT:?}, first ones: {:#?}\nbinary log tail:\n{}",
                problems.len(),
                &problems[..problems.len().min(10)],
                db.log_tail()
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// No key was ever created twice externally, and exactly the given keys were
/// created.
fn assert_created_once(db: &TestDb, inserted: &BTreeSet<i64>) {
    let users = db.fake.users();
    let mut per_key: BTreeMap<String, usize> = BTreeMap::new();
    for u in &users {
        *per_key.entry(key_text(&u.key)).or_default() += 1;
    }
    let dups: Vec<_> = per_key.iter().filter(|(_, n)| **n > 1).collect();
    assert!(
        dups.is_empty(),
        "duplicate external users (key, count): {dups:?}"
    );
    assert_eq!(
        users.len(),
        inserted.len(),
        "external users ever created vs distinct ids ever inserted"
    );
    let expected: BTreeSet<String> = inserted.iter().map(|id| id.to_string()).collect();
    let created: BTreeSet<String> = per_key.into_keys().collect();
    assert_eq!(created, expected, "the created users are the inserted rows");
}

fn assert_log_clean(db: &TestDb) {
    let log = std::fs::read_to_string(db.log_path()).unwrap_or_default();
    assert!(
        !log.contains("panicked"),
        "the daemon panicked:\n{}",
        db.log_tail()
    );
}

/// The real binary; SIGKILLed when dropped, so a failing test leaves no
/// daemon behind.
struct Binary(std::process::Child);

impl Binary {
    fn spawn(db: &TestDb) -> Binary {
        Binary(db.spawn_binary(&["run"]))
    }
}

impl Drop for Binary {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// SIGKILL, after checking that the daemon had not stopped on its own.
fn kill(binary: &mut Binary, db: &TestDb) {
    let child = &mut binary.0;
    if let Some(status) = child.try_wait().expect("try_wait") {
        panic!(
            "the daemon exited by itself ({status}) before it was killed\nlog tail:\n{}",
            db.log_tail()
        );
    }
    child.kill().expect("SIGKILL");
    child.wait().expect("wait for the killed daemon");
}

// ---------------------------------------------------------------------------
// Mixed writer
// ---------------------------------------------------------------------------

enum Op {
    Insert {
        id: i64,
        email: String,
        name: Option<String>,
        plan: &'static str,
    },
    SetName(i64, String),
    SetPlan(i64, &'static str),
    SetBoth(i64, String, &'static str),
    Delete(i64),
}

const PLANS: [&str; 3] = ["free", "pro", "team"];

impl Op {
    fn random(rng: &mut XorShift, live: &mut Vec<i64>, next_id: &mut i64) -> Op {
        let roll = rng.below(100);
        if live.is_empty() || roll < 45 {
            let id = *next_id;
            *next_id += 1;
            live.push(id);
            return Op::Insert {
                id,
                email: format!("u{id}@example.com"),
                name: rng
                    .percent(70)
                    .then(|| format!("name{}", rng.below(1_000_000))),
                plan: PLANS[rng.below(3) as usize],
            };
        }
        let idx = rng.below(live.len() as u64) as usize;
        let id = live[idx];
        if roll < 80 {
            let name = format!("name{}", rng.below(1_000_000));
            let plan = PLANS[rng.below(3) as usize];
            match rng.below(3) {
                0 => Op::SetName(id, name),
                1 => Op::SetPlan(id, plan),
                _ => Op::SetBoth(id, name, plan),
            }
        } else {
            live.swap_remove(idx);
            Op::Delete(id)
        }
    }

    async fn run<C: tokio_postgres::GenericClient>(
        &self,
        c: &C,
    ) -> Result<u64, tokio_postgres::Error> {
        match self {
            Op::Insert {
                id,
                email,
                name,
                plan,
            } => {
                let params: [&(dyn ToSql + Sync); 4] = [id, email, name, plan];
                c.execute(
                    "INSERT INTO users (id, email, name, plan) VALUES ($1, $2, $3, $4)",
                    &params,
                )
                .await
            }
            Op::SetName(id, name) => {
                c.execute("UPDATE users SET name = $2 WHERE id = $1", &[id, name])
                    .await
            }
            Op::SetPlan(id, plan) => {
                c.execute("UPDATE users SET plan = $2 WHERE id = $1", &[id, plan])
                    .await
            }
            Op::SetBoth(id, name, plan) => {
                c.execute(
                    "UPDATE users SET name = $2, plan = $3 WHERE id = $1",
                    &[id, name, plan],
                )
                .await
            }
            Op::Delete(id) => c.execute("DELETE FROM users WHERE id = $1", &[id]).await,
        }
    }
}

#[derive(Debug, Default)]
struct MixedOutcome {
    inserted: BTreeSet<i64>,
    ops: usize,
    txns: usize,
    multi: usize,
}

/// Random inserts, updates of name/plan and deletes, mostly one per
/// transaction, 15 % as transactions of 2–5 statements, until `max_ops`
/// statements ran or `stop` is set. Any database error fails the test.
async fn mixed_writer(
    url: String,
    seed: u64,
    max_ops: usize,
    stop: Arc<AtomicBool>,
) -> MixedOutcome {
    let mut rng = XorShift::new(seed);
    let mut client = connect(&url).await;
    let mut live: Vec<i64> = Vec::new();
    let mut next_id: i64 = 1;
    let mut out = MixedOutcome::default();
    while out.ops < max_ops && !stop.load(Ordering::Relaxed) {
        if rng.percent(15) {
            let n = rng.between(2, 5);
            let ops: Vec<Op> = (0..n)
                .map(|_| Op::random(&mut rng, &mut live, &mut next_id))
                .collect();
            let tx = client.transaction().await.expect("begin");
            for op in &ops {
                op.run(&tx).await.expect("statement in a transaction");
            }
            tx.commit().await.expect("commit");
            out.multi += 1;
            out.ops += ops.len();
            for op in &ops {
                if let Op::Insert { id, .. } = op {
                    out.inserted.insert(*id);
                }
            }
        } else {
            let op = Op::random(&mut rng, &mut live, &mut next_id);
            op.run(&client).await.expect("statement");
            out.ops += 1;
            if let Op::Insert { id, .. } = op {
                out.inserted.insert(id);
            }
        }
        out.txns += 1;
        let pause = rng.below(4);
        if pause > 0 {
            tokio::time::sleep(Duration::from_millis(pause)).await;
        }
    }
    out
}

// ---------------------------------------------------------------------------
// 1 + 2: SIGKILL at random moments
// ---------------------------------------------------------------------------

async fn sigkill_at_random_moments(min_kills: usize) {
    install_crypto();
    let _shared = RESTART_LOCK.read().await;
    let db = TestDb::new(USERS_BIGINT).await;
    let mut rng = XorShift::from_env_or_time("sigkill");
    let started = Instant::now();
    // Roughly 100 statements per kill: ~2,000 in the default run.
    let max_ops = 100 * min_kills;
    let writer_budget = Duration::from_millis(1000 * min_kills as u64);
    let stop = Arc::new(AtomicBool::new(false));
    let mut child = Binary::spawn(&db);
    let writer = tokio::spawn(mixed_writer(
        db.url.clone(),
        rng.next(),
        max_ops,
        Arc::clone(&stop),
    ));

    let mut kills = 0usize;
    loop {
        let delay = rng.between(50, 400);
        tokio::time::sleep(Duration::from_millis(delay)).await;
        kill(&mut child, &db);
        kills += 1;
        child = Binary::spawn(&db);
        if kills >= min_kills && (writer.is_finished() || started.elapsed() > writer_budget) {
            break;
        }
    }
    stop.store(true, Ordering::Relaxed);
    let outcome = writer.await.expect("writer");
    println!(
        "{kills} kills in {:?}; writer: {} statements in {} transactions ({} multi-statement), {} ids inserted, {} rows left",
        started.elapsed(),
        outcome.ops,
        outcome.txns,
        outcome.multi,
        outcome.inserted.len(),
        db.count("SELECT count(*) FROM users").await,
    );
    assert!(kills >= min_kills);

    // The last daemon catches up.
    wait_consistent_explained(&db, LONG_WAIT).await;
    assert_latest_values(&db).await;
    assert_created_once(&db, &outcome.inserted);
    kill(&mut child, &db);
    assert_log_clean(&db);
    println!("converged after {:?}", started.elapsed());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_at_random_moments_under_mixed_writes() {
    sigkill_at_random_moments(20).await;
}

/// `cargo test --release --test it faults:: -- --ignored` (README.md, "Development")
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "soak: 100+ kills, run with --ignored"]
async fn sigkill_soak() {
    sigkill_at_random_moments(120).await;
}

// ---------------------------------------------------------------------------
// 3: PostgreSQL crash-restart mid-stream
// ---------------------------------------------------------------------------

/// An error that a server restart explains: the connection is gone, the
/// server was shut down (class 57) or the connection failed (class 08).
fn is_restart_error(client: &Client, e: &tokio_postgres::Error) -> bool {
    client.is_closed()
        || e.is_closed()
        || e.code()
            .is_none_or(|c| c.code().starts_with("57") || c.code().starts_with("08"))
}

async fn reconnect(url: &str) -> Client {
    let deadline = Instant::now() + LONG_WAIT;
    loop {
        match tokio_postgres::connect(url, tokio_postgres::NoTls).await {
            Ok((client, conn)) => {
                tokio::spawn(conn);
                match client.simple_query("SELECT 1").await {
                    Ok(_) => return client,
                    Err(e) if Instant::now() > deadline => panic!("reconnect: {e}"),
                    Err(_) => {}
                }
            }
            Err(e) if Instant::now() > deadline => panic!("reconnect: {e}"),
            Err(_) => {}
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Runs `op` until it succeeds, reconnecting after errors a restart explains;
/// `done` tells whether an ambiguous earlier attempt already took effect.
async fn with_reconnect(
    client: &mut Client,
    url: &str,
    errors: &AtomicU32,
    sql: &str,
    params: &[&(dyn ToSql + Sync)],
    done_sql: &str,
    done_params: &[&(dyn ToSql + Sync)],
) {
    loop {
        match client.execute(sql, params).await {
            Ok(_) => return,
            Err(e) => {
                assert!(is_restart_error(client, &e), "{sql}: {e}");
                errors.fetch_add(1, Ordering::Relaxed);
                *client = reconnect(url).await;
                match client.query_opt(done_sql, done_params).await {
                    Ok(Some(_)) => return,
                    Ok(None) => {}
                    Err(e) => assert!(is_restart_error(client, &e), "{done_sql}: {e}"),
                }
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_restart_mid_stream() {
    install_crypto();
    let _exclusive = RESTART_LOCK.write().await;
    let mut db = TestDb::new_on(private_cluster(), USERS_BIGINT).await;
    let mut daemon = db.start_daemon();
    const N: i64 = 600;
    let progress = Arc::new(AtomicI64::new(0));
    let errors = Arc::new(AtomicU32::new(0));
    let writer = {
        let url = db.url.clone();
        let progress = Arc::clone(&progress);
        let errors = Arc::clone(&errors);
        tokio::spawn(async move {
            let mut client = connect(&url).await;
            for id in 1..=N {
                let email = format!("u{id}@example.com");
                with_reconnect(
                    &mut client,
                    &url,
                    &errors,
                    "INSERT INTO users (id, email) VALUES ($1, $2)",
                    &[&id, &email],
                    "SELECT 1 FROM users WHERE id = $1",
                    &[&id],
                )
                .await;
                if id % 3 == 0 {
                    // An update of an older row, so there is more than creates.
                    let target = id / 2;
                    let plan = format!("plan{id}");
                    with_reconnect(
                        &mut client,
                        &url,
                        &errors,
                        "UPDATE users SET plan = $2 WHERE id = $1",
                        &[&target, &plan],
                        "SELECT 1 FROM users WHERE id = $1 AND plan = $2",
                        &[&target, &plan],
                    )
                    .await;
                }
                progress.store(id, Ordering::Relaxed);
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
        })
    };
    wait_for("the stream to be under way", LONG_WAIT, || {
        progress.load(Ordering::Relaxed) >= N / 3 && db.fake.users().len() >= 20
    })
    .await;
    let at_restart = progress.load(Ordering::Relaxed);
    restart_postgres(&mut db).await;
    println!("(mid-stream, after row {at_restart})");
    assert!(
        at_restart < N,
        "the writer finished before the restart; the test proves nothing"
    );
    writer.await.expect("writer");
    assert!(
        errors.load(Ordering::Relaxed) >= 1,
        "the writer never saw the restart"
    );
    wait_consistent_running(&db, &mut daemon, "after a restart mid-stream").await;
    assert_latest_values(&db).await;
    assert_eq!(db.count("SELECT count(*) FROM users").await, N);
    assert_created_once(&db, &(1..=N).collect());

    // Once more while the daemon is idle, the common case in production.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    restart_postgres(&mut db).await;
    for id in N + 1..=N + 20 {
        insert_user(&db.client, id).await;
    }
    wait_consistent_running(&db, &mut daemon, "after a restart while idle").await;
    assert_latest_values(&db).await;
    assert_created_once(&db, &(1..=N + 20).collect());
    daemon.stop().await;
}

// ---------------------------------------------------------------------------
// 4: the sink is down for a while
// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sink_down_then_back() {
    install_crypto();
    let _shared = RESTART_LOCK.read().await;
    let db = TestDb::new(USERS_BIGINT).await;
    // A retry budget longer than the outage (the harness shortens backoff to
    // at most 200 ms, so the default 10 attempts would end in dead letters).
    let daemon = start_daemon_with(&db, &[("USERSYNC_RETRY_MAX_ATTEMPTS", "1000")]);
    let mut inserted: BTreeSet<i64> = BTreeSet::new();
    for id in 1..=5i64 {
        insert_user(&db.client, id).await;
        inserted.insert(id);
    }
    wait_consistent_explained(&db, WAIT).await;
    let before = confirmed_lsn(&db).await;

    // The outage: keep at least CHUNK failures queued for 3 s. Every request
    // a fault answers is recorded with its status, so what is left in the
    // queue is "injected minus recorded 503s".
    const CHUNK: u32 = 128;
    let count_503 = || {
        db.fake
            .requests()
            .iter()
            .filter(|r| r.status == 503)
            .count() as u64
    };
    db.fake.inject(Fault::Status {
        status: 503,
        count: 2 * CHUNK,
    });
    let mut injected = u64::from(2 * CHUNK);
    let outage = Instant::now();
    let mut next_id = 6i64;
    let mut samples: Vec<u64> = Vec::new();
    let mut tick = 0u32;
    while outage.elapsed() < Duration::from_secs(3) {
        if injected - count_503() < u64::from(CHUNK) {
            db.fake.inject(Fault::Status {
                status: 503,
                count: CHUNK,
            });
            injected += u64::from(CHUNK);
        }
        insert_user(&db.client, next_id).await;
        inserted.insert(next_id);
        next_id += 1;
        if tick % 4 == 0 {
            let target = 1 + i64::from(tick / 4) % 5;
            let plan = format!("plan{tick}");
            db.client
                .execute(
                    "UPDATE users SET plan = $2 WHERE id = $1",
                    &[&target, &plan],
                )
                .await
                .expect("update");
        }
        tick += 1;
        samples.push(confirmed_lsn(&db).await);
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    samples.push(confirmed_lsn(&db).await);
    let requests = db.fake.requests();
    let failed = requests.iter().filter(|r| r.status == 503).count();
    assert!(
        failed >= 5,
        "the sink was hardly tried during the outage: {failed} failures"
    );
    let delivered: BTreeSet<&str> = requests
        .iter()
        .filter(|r| is_success(r))
        .filter_map(|r| r.webhook_id.as_deref())
        .collect();
    // Changes that failed and were still undelivered at the end of the
    // outage: the slot may not have been confirmed past the oldest of them
    // at any moment (before its commit it could not be, after it not until
    // its delivery).
    let undelivered: BTreeSet<&str> = requests
        .iter()
        .filter(|r| r.status == 503)
        .filter_map(|r| r.webhook_id.as_deref())
        .filter(|id| !delivered.contains(id))
        .collect();
    let oldest_failing = undelivered
        .iter()
        .map(|id| event_commit_lsn(id))
        .min()
        .expect("changes failed during the outage");
    let max_during = samples.iter().copied().max().unwrap_or(before);
    println!(
        "outage: {failed} failed requests, {} changes still failing, {} delivered before or during it, {injected} faults injected, {} rows inserted; confirmed before {}, oldest failing change at {}, highest confirmed during the outage {}",
        undelivered.len(),
        delivered.len(),
        next_id - 6,
        fmt_lsn(before),
        fmt_lsn(oldest_failing),
        fmt_lsn(max_during)
    );
    assert!(
        max_during <= oldest_failing,
        "the slot was confirmed to {} while the change committed at {} had not been delivered",
        fmt_lsn(max_during),
        fmt_lsn(oldest_failing)
    );
    assert!(
        samples.windows(2).all(|w| w[0] <= w[1]) && samples[0] >= before,
        "the confirmed position went backwards"
    );

    // The service recovers once the queued failures are used up.
    wait_consistent_explained(&db, LONG_WAIT).await;
    assert_latest_values(&db).await;
    assert_created_once(&db, &inserted);
    wait_until("the slot to be confirmed past the outage", WAIT, || async {
        confirmed_lsn(&db).await > oldest_failing
    })
    .await;
    daemon.stop().await;
}

// ---------------------------------------------------------------------------
// 5: 429 with Retry-After
// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rate_limit_storm_honours_retry_after() {
    install_crypto();
    let _shared = RESTART_LOCK.read().await;
    let db = TestDb::new(USERS_BIGINT).await;
    db.fake.inject(Fault::RateLimit {
        retry_after_secs: 1,
        count: 20,
    });
    let daemon = db.start_daemon();
    for id in 1..=10i64 {
        insert_user(&db.client, id).await;
    }
    wait_consistent_explained(&db, WAIT).await;
    assert_latest_values(&db).await;
    assert_created_once(&db, &(1..=10).collect());
    daemon.stop().await;

    let requests = db.fake.requests();
    let limited = requests.iter().filter(|r| r.status == 429).count();
    assert_eq!(limited, 20, "every injected 429 was used");
    let mut by_id: BTreeMap<&str, Vec<&RecordedRequest>> = BTreeMap::new();
    for r in &requests {
        by_id
            .entry(r.webhook_id.as_deref().expect("webhook-id"))
            .or_default()
            .push(r);
    }
    let mut too_early = Vec::new();
    for (id, mut attempts) in by_id {
        attempts.sort_by_key(|r| r.received_at_ms);
        assert!(
            attempts.last().is_some_and(|r| is_success(r)),
            "{id} never succeeded"
        );
        for pair in attempts.windows(2) {
            if pair[0].status == 429 {
                let gap = pair[1].received_at_ms - pair[0].received_at_ms;
                if gap < 900 {
                    too_early.push(format!("{id}: retried {gap} ms after a 429"));
                }
            }
        }
    }
    assert!(
        too_early.is_empty(),
        "Retry-After: 1 not honoured: {too_early:#?}"
    );
}

// ---------------------------------------------------------------------------
// 6: the sink does not answer in time
// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sink_timeouts_are_retried() {
    install_crypto();
    let _shared = RESTART_LOCK.read().await;
    let db = TestDb::with_sink(USERS_BIGINT, "timeout_ms = 300").await;
    db.fake.inject(Fault::Timeout { count: 3 });
    let daemon = db.start_daemon();
    for id in 1..=5i64 {
        insert_user(&db.client, id).await;
    }
    wait_consistent_explained(&db, WAIT).await;
    db.exec("UPDATE users SET name = 'after-timeouts' WHERE id IN (1, 3)")
        .await;
    assert_latest_values(&db).await;
    assert_created_once(&db, &(1..=5).collect());
    daemon.stop().await;
    let requests = db.fake.requests();
    let timed_out: Vec<&RecordedRequest> = requests.iter().filter(|r| r.status == 504).collect();
    assert_eq!(timed_out.len(), 3, "every injected timeout was hit");
    for r in timed_out {
        let id = r.webhook_id.as_deref().expect("webhook-id");
        assert!(
            requests
                .iter()
                .any(|o| o.webhook_id.as_deref() == Some(id) && is_success(o)),
            "{id} timed out and was never delivered"
        );
    }
}

// ---------------------------------------------------------------------------
// 7: SIGKILL after the push, before the write-back
// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_between_push_and_write_back_replays_without_duplicate() {
    install_crypto();
    let _shared = RESTART_LOCK.read().await;
    let db = TestDb::new(USERS_BIGINT).await;
    let mut child = Binary::spawn(&db);
    let mut in_window = 0;
    for round in 0..10i64 {
        let id = round + 1;
        // Even rounds hold a lock on the row, so the write-back blocks and the
        // kill is certain to fall between push and write-back (the latency
        // leaves time to take the lock). Odd rounds kill as soon as the
        // service has answered, racing the write-back.
        let lock_row = round % 2 == 0;
        db.fake.set_latency(if lock_row {
            Duration::from_millis(300)
        } else {
            Duration::ZERO
        });
        insert_user(&db.client, id).await;
        let after_insert = current_insert_lsn(&db.client).await;
        let locker = if lock_row {
            let c = connect(&db.url).await;
            c.batch_execute(&format!(
                "BEGIN; SELECT 1 FROM users WHERE id = {id} FOR UPDATE"
            ))
            .await
            .expect("lock the row");
            Some(c)
        } else {
            None
        };
        let deadline = Instant::now() + WAIT;
        let answered = loop {
            let found =
                db.fake.requests().into_iter().find(|r| {
                    is_success(r) && r.body["key"] == id && r.body["type"] == "user.created"
                });
            if let Some(r) = found {
                break r;
            }
            assert!(
                Instant::now() < deadline,
                "round {round}: no answered create\nlog tail:\n{}",
                db.log_tail()
            );
            tokio::task::yield_now().await;
        };
        kill(&mut child, &db);
        // Confirmed first: a confirmed position implies an earlier write-back.
        let confirmed = confirmed_lsn(&db).await;
        let ext: Option<String> = db
            .client
            .query_one("SELECT external_user_id FROM users WHERE id = $1", &[&id])
            .await
            .expect("row")
            .get(0);
        let event_id = answered.webhook_id.clone().expect("webhook-id");
        let commit = event_commit_lsn(&event_id);
        assert!(
            commit <= after_insert,
            "event {event_id} names a commit after the insert returned ({})",
            fmt_lsn(after_insert)
        );
        if lock_row {
            assert_eq!(
                ext, None,
                "round {round}: the write-back ran through a row lock"
            );
        }
        if ext.is_none() {
            in_window += 1;
            assert!(
                confirmed <= commit,
                "round {round}: the slot is confirmed to {} but the change committed at {} was not written back",
                fmt_lsn(confirmed),
                fmt_lsn(commit)
            );
        }
        if let Some(c) = locker {
            c.batch_execute("ROLLBACK").await.expect("unlock");
        }
        db.fake.set_latency(Duration::ZERO);
        child = Binary::spawn(&db);
        wait_consistent_explained(&db, WAIT).await;
        let live = db.fake.live_users_with_key(&serde_json::json!(id));
        assert_eq!(live.len(), 1, "round {round}: {live:?}");
        if ext.is_none() {
            let sent = db
                .fake
                .requests()
                .iter()
                .filter(|r| r.webhook_id.as_deref() == Some(event_id.as_str()))
                .count();
            assert!(sent >= 2, "round {round}: {event_id} was not replayed");
        }
        assert_eq!(db.fake.users().len() as i64, id, "round {round}");
    }
    println!("{in_window} of 10 kills fell between push and write-back");
    assert_latest_values(&db).await;
    assert_created_once(&db, &(1..=10).collect());
    kill(&mut child, &db);
    assert_log_clean(&db);
}

/// SIGTERM while a push sleeps on the service's `Retry-After: 600` (capped
/// at 600 s) stops the release binary at once instead of after ten
/// minutes: the sleeping retry is abandoned, nothing of it is confirmed,
/// and the next start delivers the change (nothing lost, pushed once).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_does_not_wait_for_a_retry_after_sleep() {
    let db = TestDb::new(USERS_UUID).await;
    db.fake.inject(Fault::RateLimit {
        retry_after_secs: 600,
        count: 1,
    });
    let mut child = db.spawn_binary(&["run"]);
    db.exec("INSERT INTO users (email, name) VALUES ('wait@example.com', 'W')")
        .await;
    wait_for("the 429 with Retry-After: 600", WAIT, || {
        db.fake.requests().iter().any(|r| r.status == 429)
    })
    .await;
    let pid = i32::try_from(child.id()).expect("pid");
    // SAFETY: signalling our own child process.
    unsafe { libc::kill(pid, libc::SIGTERM) };
    // Far below the 600 s the retry would sleep: only an abandoned retry
    // lets the process end within this bound.
    let deadline = Instant::now() + Duration::from_secs(60);
    let status = loop {
        if let Some(status) = child.try_wait().expect("wait") {
            break status;
        }
        assert!(
            Instant::now() < deadline,
            "usersync still running 60 s after SIGTERM:\n{}",
            db.log_tail()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(status.code(), Some(0), "{}", db.log_tail());
    assert!(db.accepted().is_empty(), "nothing was accepted yet");
    // The next start delivers it, once.
    let daemon = db.start_daemon();
    db.wait_consistent(WAIT).await;
    daemon.stop().await;
    assert_eq!(db.accepted().len(), 1);
}
