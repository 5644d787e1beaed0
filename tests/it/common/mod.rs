//! Shared test harness: one throw-away PostgreSQL per test binary, a fresh
//! database per test with the users table set up, the fake webhook service,
//! and ways to run the daemon in-process or as the real binary.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use serde_json::Value;
use tokio_util::sync::CancellationToken;
use usersync::config::Config;
use usersync::core::signature::WebhookSecret;
use usersync::dev::fake::{FakeOptions, FakeService};
use usersync::dev::pgtemp::{TempCluster, TempClusterOptions};

pub const USERS_UUID: &str = "CREATE TABLE public.users (
    id uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    email text NOT NULL,
    name text,
    plan text NOT NULL DEFAULT 'free',
    bio text
)";

pub const USERS_BIGINT: &str = "CREATE TABLE public.users (
    id bigint PRIMARY KEY,
    email text NOT NULL,
    name text,
    plan text NOT NULL DEFAULT 'free',
    bio text
)";

pub fn cluster() -> &'static TempCluster {
    static CLUSTER: OnceLock<TempCluster> = OnceLock::new();
    CLUSTER.get_or_init(|| match TempCluster::start(TempClusterOptions::default()) {
        Ok(c) => c,
        Err(e) => panic!("cannot start the test PostgreSQL: {e}"),
    })
}

/// A cluster of its own for the one test that restarts PostgreSQL
/// (`faults::postgres_restart_mid_stream`): every other test shares
/// [`cluster`], and a restart would cut their connections.
pub fn private_cluster() -> &'static TempCluster {
    static CLUSTER: OnceLock<TempCluster> = OnceLock::new();
    CLUSTER.get_or_init(|| match TempCluster::start(TempClusterOptions::default()) {
        Ok(c) => c,
        Err(e) => panic!("cannot start a private test PostgreSQL: {e}"),
    })
}

/// A unique database name per test in this binary.
pub fn unique_db(prefix: &str) -> String {
    static N: AtomicU32 = AtomicU32::new(0);
    format!(
        "{prefix}_{}_{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    )
}

pub struct TestDb {
    pub dbname: String,
    pub url: String,
    pub secret: WebhookSecret,
    pub fake: FakeService,
    pub client: tokio_postgres::Client,
    /// Extra sync.toml lines for the `[sink]` section.
    pub sink_extra: String,
}

impl TestDb {
    /// A database with `table_sql` run in it, the fake service, and `usersync
    /// setup` applied.
    pub async fn new(table_sql: &str) -> TestDb {
        Self::with_sink(table_sql, "").await
    }

    pub async fn with_sink(table_sql: &str, sink_extra: &str) -> TestDb {
        let db = Self::bare(table_sql, sink_extra).await;
        let cfg = db.config();
        usersync::app::setup::apply(&db.client, &cfg.database)
            .await
            .unwrap_or_else(|e| panic!("setup failed: {e}"));
        db
    }

    /// Database and table only; no `usersync setup`.
    pub async fn bare(table_sql: &str, sink_extra: &str) -> TestDb {
        Self::bare_on(cluster(), table_sql, sink_extra).await
    }

    /// Like [`TestDb::new`], on the given cluster.
    pub async fn new_on(c: &'static TempCluster, table_sql: &str) -> TestDb {
        let db = Self::bare_on(c, table_sql, "").await;
        let cfg = db.config();
        usersync::app::setup::apply(&db.client, &cfg.database)
            .await
            .unwrap_or_else(|e| panic!("setup failed: {e}"));
        db
    }

    async fn bare_on(c: &'static TempCluster, table_sql: &str, sink_extra: &str) -> TestDb {
        let dbname = unique_db("t");
        c.create_database(&dbname).expect("create database");
        if !table_sql.is_empty() {
            c.psql(&dbname, table_sql).expect("create table");
        }
        let secret = WebhookSecret::generate();
        let fake = FakeService::start(FakeOptions {
            port: 0,
            secret: Some(secret.clone()),
            latency: Duration::ZERO,
        })
        .await
        .expect("fake service");
        let url = c.url(&dbname);
        let (client, conn) = tokio_postgres::connect(&url, tokio_postgres::NoTls)
            .await
            .expect("connect");
        tokio::spawn(conn);
        TestDb {
            dbname,
            url,
            secret,
            fake,
            client,
            sink_extra: sink_extra.to_string(),
        }
    }

    pub fn toml(&self) -> String {
        format!(
            "[database]\nurl = \"{}\"\nslot = \"{}\"\norigin = \"{}\"\n[sink]\nurl = \"{}\"\nsecret_env = \"TEST_SECRET\"\n{}\n[retry]\ninitial_backoff_ms = 20\nmax_backoff_ms = 200\n",
            self.url,
            self.dbname,
            self.dbname,
            self.fake.url(),
            self.sink_extra
        )
    }

    pub fn env(&self) -> BTreeMap<String, String> {
        [("TEST_SECRET".to_string(), self.secret.to_whsec())]
            .into_iter()
            .collect()
    }

    pub fn config(&self) -> Config {
        Config::from_parts(Some(&self.toml()), "test", &self.env())
            .unwrap_or_else(|e| panic!("config: {e}"))
    }

    /// Runs the daemon in this process until the returned handle is stopped.
    pub fn start_daemon(&self) -> InProcessDaemon {
        let cfg = self.config();
        let cancel = CancellationToken::new();
        let c = cancel.clone();
        let task = tokio::spawn(async move { usersync::app::run::run(&cfg, c, None).await });
        InProcessDaemon { cancel, task }
    }

    /// Runs the binary with the config in the environment only; its output
    /// goes to `log_path()` (a pipe nobody reads would stall it).
    pub fn spawn_binary(&self, args: &[&str]) -> Child {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log_path())
            .expect("log file");
        let log2 = log.try_clone().expect("log file");
        self.binary_command(args)
            // Per-change "synced" lines, for diagnosing a failed test.
            .env("USERSYNC_LOG_LEVEL", "info,usersync=debug")
            .stdout(log)
            .stderr(log2)
            .spawn()
            .expect("spawn usersync")
    }

    pub fn log_path(&self) -> std::path::PathBuf {
        std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("{}.log", self.dbname))
    }

    pub fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(self.log_path()).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(30)..].join("\n")
    }

    pub fn binary_command(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_usersync"));
        cmd.args(args)
            .env_remove("USERSYNC_CONFIG")
            .env("USERSYNC_DATABASE_URL", &self.url)
            // Slots and origins are cluster-wide: one per test database.
            .env("USERSYNC_DATABASE_SLOT", &self.dbname)
            .env("USERSYNC_DATABASE_ORIGIN", &self.dbname)
            .env("USERSYNC_SINK_URL", self.fake.url())
            .env("USERSYNC_SINK_SECRET_ENV", "TEST_SECRET")
            .env("TEST_SECRET", self.secret.to_whsec())
            .env("USERSYNC_RETRY_INITIAL_BACKOFF_MS", "20")
            .env("USERSYNC_RETRY_MAX_BACKOFF_MS", "200")
            // Parallel daemons would fight over the default metrics port.
            .env("USERSYNC_METRICS_LISTEN", "")
            .current_dir(std::env::temp_dir());
        cmd
    }

    pub async fn exec(&self, sql: &str) {
        self.client
            .batch_execute(sql)
            .await
            .unwrap_or_else(|e| panic!("{sql}: {e}"));
    }

    pub async fn count(&self, sql: &str) -> i64 {
        self.client
            .query_one(sql, &[])
            .await
            .unwrap_or_else(|e| panic!("{sql}: {e}"))
            .get(0)
    }

    /// Rows as (key text, external id).
    pub async fn synced_rows(&self) -> Vec<(String, Option<String>)> {
        self.client
            .query(
                "SELECT id::text, external_user_id FROM users ORDER BY id",
                &[],
            )
            .await
            .expect("rows")
            .iter()
            .map(|r| (r.get(0), r.get(1)))
            .collect()
    }

    pub async fn confirmed_flush_lsn(&self) -> Option<String> {
        self.client
            .query_one(
                "SELECT confirmed_flush_lsn::text FROM pg_replication_slots WHERE slot_name = $1",
                &[&self.dbname],
            )
            .await
            .expect("slot")
            .get(0)
    }

    /// Quiescence without guessing: records the server's WAL position now
    /// and waits until the slot is confirmed at or past it. Every change
    /// committed before this call has then been pushed and written back (the
    /// ack follows the write-back's commit), so whatever it would push has
    /// arrived. Needs a daemon streaming.
    pub async fn wait_confirmed_past_now(&self, timeout: Duration) {
        let lsn: String = self
            .client
            .query_one("SELECT pg_current_wal_lsn()::text", &[])
            .await
            .expect("lsn")
            .get(0);
        self.wait_confirmed_past(&lsn, timeout).await;
    }

    /// Waits until the slot is confirmed at or past `lsn`, a position the
    /// test recorded after its own change (the cluster is shared, so the
    /// distance to its current WAL position says nothing).
    pub async fn wait_confirmed_past(&self, lsn: &str, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        loop {
            let past: bool = self
                .client
                .query_one(
                    "SELECT coalesce(confirmed_flush_lsn >= $1::text::pg_lsn, false) FROM pg_replication_slots WHERE slot_name = $2",
                    &[&lsn, &self.dbname],
                )
                .await
                .expect("slot")
                .get(0);
            if past {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "slot not confirmed past {lsn} after {timeout:?}\nbinary log tail:\n{}",
                self.log_tail()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Waits until every row has an external id and the fake has exactly one
    /// live user per row (and none for deleted rows).
    pub async fn wait_consistent(&self, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        loop {
            let problem = self.consistency_problem().await;
            match problem {
                None => return,
                Some(p) if Instant::now() > deadline => panic!(
                    "not consistent after {timeout:?}: {p}\nbinary log tail:\n{}",
                    self.log_tail()
                ),
                Some(_) => tokio::time::sleep(Duration::from_millis(100)).await,
            }
        }
    }

    /// `None` when the database and the fake service agree.
    pub async fn consistency_problem(&self) -> Option<String> {
        let rows = self.synced_rows().await;
        let users = self.fake.users();
        let mut live: BTreeMap<String, Vec<&usersync::dev::fake::FakeUser>> = BTreeMap::new();
        for u in users.iter().filter(|u| !u.deleted) {
            live.entry(key_text(&u.key)).or_default().push(u);
        }
        for (key, ext) in &rows {
            let Some(ext) = ext else {
                return Some(format!("row {key} has no external id"));
            };
            match live.get(key).map(Vec::as_slice) {
                Some([one]) if &one.external_id == ext => {}
                Some([one]) => {
                    return Some(format!(
                        "row {key} has {ext}, the service {}",
                        one.external_id
                    ))
                }
                Some(many) => {
                    return Some(format!("row {key} exists {} times externally", many.len()))
                }
                None => return Some(format!("row {key} is not in the service")),
            }
        }
        let keys: std::collections::BTreeSet<&String> = rows.iter().map(|(k, _)| k).collect();
        for key in live.keys() {
            if !keys.contains(key) {
                return Some(format!(
                    "user {key} is live externally but not in the table"
                ));
            }
        }
        None
    }

    /// Requests that reached the handler (2xx), in order.
    pub fn accepted(&self) -> Vec<Value> {
        self.fake
            .requests()
            .into_iter()
            .filter(|r| (200..300).contains(&r.status))
            .map(|r| r.body)
            .collect()
    }
}

pub fn key_text(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

pub struct InProcessDaemon {
    pub cancel: CancellationToken,
    pub task: tokio::task::JoinHandle<Result<(), usersync::app::run::RunError>>,
}

impl InProcessDaemon {
    pub async fn stop(self) {
        self.cancel.cancel();
        match tokio::time::timeout(Duration::from_secs(30), self.task).await {
            Ok(Ok(Ok(()))) => {}
            Ok(Ok(Err(e))) => panic!("daemon failed: {e}"),
            Ok(Err(e)) => panic!("daemon panicked: {e}"),
            Err(_) => panic!("daemon did not stop within 30 s"),
        }
    }
}

pub async fn wait_for<F: Fn() -> bool>(what: &str, timeout: Duration, f: F) {
    let deadline = Instant::now() + timeout;
    while !f() {
        if Instant::now() > deadline {
            panic!("timed out after {timeout:?} waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// [`wait_for`] for a check that must await (a query, a request): polls
/// `f` until it holds, failing after `timeout` with `what`.
pub async fn wait_until<F, Fut>(what: &str, timeout: Duration, f: F)
where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    if !poll_until(timeout, f).await {
        panic!("timed out after {timeout:?} waiting for {what}");
    }
}

/// Polls the async check `f` until it holds or `timeout` has passed, and
/// says which: for a caller whose failure message shows the state it finds
/// then (the daemon's log, the requests the fake saw).
pub async fn poll_until<F, Fut>(timeout: Duration, f: F) -> bool
where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if f().await {
            return true;
        }
        if Instant::now() > deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

pub fn install_crypto() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

/// `python3` and the environment under which every one of `modules` imports:
/// the machine's install, or a copy of `packages` installed once from PyPI
/// into the target directory. `None` (the test then says why it skips) only
/// when they cannot be installed.
pub fn python_with(modules: &str, packages: &[&str]) -> Option<Vec<(String, String)>> {
    let works = |env: &[(String, String)]| {
        Command::new("python3")
            .args(["-c", &format!("import {modules}")])
            .envs(env.iter().map(|(k, v)| (k, v)))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    };
    if works(&[]) {
        return Some(Vec::new());
    }
    let dir = std::path::Path::new(env!("CARGO_TARGET_TMPDIR"))
        .join(format!("pydeps-{}", packages.join("-")));
    let env = vec![("PYTHONPATH".to_string(), dir.display().to_string())];
    if works(&env) {
        return Some(env);
    }
    let out = Command::new("python3")
        .args([
            "-m",
            "pip",
            "install",
            "--quiet",
            "--disable-pip-version-check",
            "--target",
        ])
        .arg(&dir)
        .args(packages)
        .output();
    match out {
        Ok(o) if o.status.success() && works(&env) => Some(env),
        Ok(o) => {
            eprintln!(
                "SKIPPED: cannot install {packages:?} with pip: {}",
                String::from_utf8_lossy(&o.stderr)
            );
            None
        }
        Err(e) => {
            eprintln!("SKIPPED: cannot run python3 -m pip: {e}");
            None
        }
    }
}

/// `python3` and the environment under which `import standardwebhooks`
/// works (the test that needs it fails, rather than skips, without it).
pub fn python_with_standardwebhooks() -> (String, Vec<(String, String)>) {
    let env = python_with("standardwebhooks", &["standardwebhooks"])
        .unwrap_or_else(|| panic!("cannot install the standardwebhooks Python package"));
    ("python3".into(), env)
}

/// A NODE_PATH under which these npm packages load, installed into the
/// target directory when missing.
pub fn node_with(packages: &[&str]) -> Option<Vec<(String, String)>> {
    let dir = std::path::PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("nodedeps");
    let env = vec![(
        "NODE_PATH".to_string(),
        dir.join("node_modules").display().to_string(),
    )];
    let works = || {
        packages.iter().all(|p| {
            Command::new("node")
                .args(["-e", &format!("require({p:?})")])
                .envs(env.iter().map(|(k, v)| (k, v)))
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .is_ok_and(|s| s.success())
        })
    };
    if works() {
        return Some(env);
    }
    let _ = std::fs::create_dir_all(&dir);
    let out = Command::new("npm")
        .args(["install", "--silent", "--no-audit", "--no-fund", "--prefix"])
        .arg(&dir)
        .args(packages)
        .output();
    match out {
        Ok(o) if o.status.success() && works() => Some(env),
        other => {
            eprintln!(
                "SKIPPED: npm packages {packages:?} are not installed and cannot be: {other:?}"
            );
            None
        }
    }
}

/// What a finished run of the binary printed.
pub struct CliOutcome {
    pub code: Option<i32>,
    pub stdout: String,
    pub stderr: String,
}

impl CliOutcome {
    pub fn all(&self) -> String {
        format!("{}{}", self.stdout, self.stderr)
    }
}

/// Runs the binary to completion; one that is still running after `limit`
/// is a failure (every such case must exit on its own).
pub async fn run_cli(cmd: Command, limit: Duration) -> CliOutcome {
    let mut cmd = tokio::process::Command::from(cmd);
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    let mut child = cmd.spawn().expect("spawn usersync");
    // Read as it comes, so that a run that does not end still shows what
    // it said in the failure.
    fn collect<R: tokio::io::AsyncRead + Unpin + Send + 'static>(
        pipe: Option<R>,
    ) -> (Arc<Mutex<Vec<u8>>>, tokio::task::JoinHandle<()>) {
        let buf = Arc::new(Mutex::new(Vec::new()));
        let sink = Arc::clone(&buf);
        let task = tokio::spawn(async move {
            use tokio::io::AsyncReadExt;
            let Some(mut pipe) = pipe else { return };
            let mut chunk = [0u8; 8192];
            while let Ok(n) = pipe.read(&mut chunk).await {
                if n == 0 {
                    break;
                }
                sink.lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner)
                    .extend_from_slice(&chunk[..n]);
            }
        });
        (buf, task)
    }
    let (stdout, out_task) = collect(child.stdout.take());
    let (stderr, err_task) = collect(child.stderr.take());
    let text = |b: &Arc<Mutex<Vec<u8>>>| {
        String::from_utf8_lossy(&b.lock().unwrap_or_else(std::sync::PoisonError::into_inner))
            .into_owned()
    };
    let status = match tokio::time::timeout(limit, child.wait()).await {
        Ok(status) => status.expect("wait for usersync"),
        Err(_) => {
            let _ = child.kill().await;
            panic!(
                "usersync did not exit within {limit:?}; it wrote:\n{}{}",
                text(&stdout),
                text(&stderr)
            );
        }
    };
    let _ = out_task.await;
    let _ = err_task.await;
    CliOutcome {
        code: status.code(),
        stdout: text(&stdout),
        stderr: text(&stderr),
    }
}
