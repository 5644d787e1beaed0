//! docker/docker-compose.yml and docker/Dockerfile, checked without a Docker
//! engine: the files are parsed, and the services' own commands, flags and
//! environment run outside Docker against a throw-away cluster (init.sql,
//! `usersync setup`, the fake service, `usersync run`, the app's SQL), with
//! only host names and ports rewritten. A renamed flag, variable or column
//! breaks this test instead of the demo.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::common::*;
use serde_json::Value;

const WAIT: Duration = Duration::from_secs(60);

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn compose() -> Value {
    let path = repo().join("docker/docker-compose.yml");
    let text = std::fs::read_to_string(&path).expect("docker/docker-compose.yml");
    serde_yaml_ng::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn service<'a>(c: &'a Value, name: &str) -> &'a Value {
    c.pointer(&format!("/services/{name}"))
        .unwrap_or_else(|| panic!("compose has no service {name}"))
}

fn command(svc: &Value) -> Vec<String> {
    svc["command"]
        .as_array()
        .expect("command as a list")
        .iter()
        .map(|v| v.as_str().expect("string argument").to_string())
        .collect()
}

fn environment(svc: &Value) -> BTreeMap<String, String> {
    svc["environment"]
        .as_object()
        .map(|m| {
            m.iter()
                .map(|(k, v)| {
                    let v = match v {
                        Value::String(s) => s.clone(),
                        other => other.to_string(),
                    };
                    (k.clone(), v)
                })
                .collect()
        })
        .unwrap_or_default()
}

/// The binary with exactly `env` (plus PATH): nothing from the test
/// harness may make it work where the container would not.
fn usersync(args: &[String], env: &BTreeMap<String, String>) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_usersync"));
    cmd.args(args)
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .envs(env)
        .current_dir(std::env::temp_dir());
    cmd
}

#[test]
fn dockerfile_builds_every_target_and_runs_unprivileged() {
    let text = std::fs::read_to_string(repo().join("docker/Dockerfile")).expect("Dockerfile");
    // Each stage's text, starting at its FROM.
    let stages: Vec<&str> = text.split("\nFROM ").skip(1).collect();
    assert!(stages.len() >= 2, "multi-stage build expected");
    let build = stages[0];
    let runtime = stages[stages.len() - 1];
    for line in build.lines().filter(|l| l.starts_with("COPY ")) {
        let parts: Vec<&str> = line.split_whitespace().collect();
        for src in &parts[1..parts.len() - 1] {
            assert!(repo().join(src).exists(), "Dockerfile copies missing {src}");
        }
    }
    let cargo = std::fs::read_to_string(repo().join("Cargo.toml")).expect("Cargo.toml");
    if cargo.contains("[[bench]]") {
        assert!(
            build.contains("COPY benches"),
            "Cargo.toml declares benches: cargo needs them"
        );
    }
    assert!(build.contains("cargo build --release --locked"), "{build}");
    let user = runtime
        .lines()
        .find_map(|l| l.strip_prefix("USER "))
        .expect("runtime stage sets USER");
    assert!(!matches!(user.trim(), "root" | "0"), "runs as root");
    assert!(runtime.contains("ENTRYPOINT [\"usersync\"]"), "{runtime}");
    assert!(
        runtime.starts_with("debian:")
            || runtime.contains("slim")
            || runtime.contains("distroless")
    );
    let ignore = std::fs::read_to_string(repo().join(".dockerignore")).unwrap_or_default();
    assert!(
        ignore.lines().any(|l| l.trim() == "target"),
        ".dockerignore must skip target/"
    );
}

#[test]
fn compose_names_only_known_settings() {
    let c = compose();
    let db = service(&c, "db");
    assert_eq!(db["image"], "postgres:15");
    assert!(command(db).iter().any(|a| a == "wal_level=logical"));
    let known: Vec<String> = usersync::config::KEYS
        .iter()
        .map(|(s, k, _)| usersync::config::env_name(s, k))
        .collect();
    for name in ["fake", "setup", "usersync"] {
        let svc = service(&c, name);
        assert_eq!(svc["build"]["dockerfile"], "docker/Dockerfile");
        assert_eq!(svc["build"]["context"], "..");
        let env = environment(svc);
        for (k, v) in &env {
            if k.starts_with("USERSYNC_") {
                assert!(known.contains(k), "service {name}: {k} is no config key");
            }
            if k.ends_with("_ENV") {
                assert!(
                    env.contains_key(v),
                    "service {name}: {k} names {v}, which is not set"
                );
            }
        }
    }
}

fn spawn_logged(mut cmd: Command, log: &Path) -> Child {
    let out = std::fs::File::create(log).expect("log");
    let err = out.try_clone().expect("log");
    cmd.stdout(out).stderr(err).spawn().expect("spawn")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn compose_services_run_outside_docker() {
    let c = compose();
    let cluster = cluster();
    let port = cluster.port();
    cluster
        .psql(
            "postgres",
            "DO $$ BEGIN CREATE ROLE app LOGIN SUPERUSER PASSWORD 'app'; \
             EXCEPTION WHEN duplicate_object THEN NULL; END $$",
        )
        .expect("role app");
    let dbname = unique_db("compose");
    cluster.create_database(&dbname).expect("database");
    let init = std::fs::read_to_string(repo().join("docker/init.sql")).expect("init.sql");
    cluster.psql(&dbname, &init).expect("init.sql");
    let db_url = |v: &str| v.replace("@db:5432/app", &format!("@127.0.0.1:{port}/{dbname}"));
    let dir = tempfile::tempdir().expect("tempdir");

    // The fake service, on a free port instead of 8080.
    let fake = service(&c, "fake");
    let mut args = command(fake);
    let at = args.iter().position(|a| a == "--port").expect("--port");
    args[at + 1] = "0".into();
    let mut fake_child = usersync(&args, &environment(fake))
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("fake-service");
    let mut first = String::new();
    BufReader::new(fake_child.stdout.take().expect("stdout"))
        .read_line(&mut first)
        .expect("fake URL");
    let fake_addr = first
        .trim()
        .trim_start_matches("http://")
        .trim_end_matches('/')
        .to_string();
    assert!(
        fake_addr.starts_with("127.0.0.1:"),
        "fake printed {first:?}"
    );

    // setup, as the compose file runs it.
    let setup = service(&c, "setup");
    let env: BTreeMap<String, String> = environment(setup)
        .into_iter()
        .map(|(k, v)| (k, db_url(&v)))
        .collect();
    let out = run_cli(usersync(&command(setup), &env), WAIT).await;
    assert_eq!(out.code, Some(0), "setup: {}", out.all());

    // The daemon.
    let daemon = service(&c, "usersync");
    let env: BTreeMap<String, String> = environment(daemon)
        .into_iter()
        .map(|(k, v)| {
            let v = db_url(&v)
                .replace("127.0.0.1:8080", &fake_addr)
                .replace("0.0.0.0:9187", "127.0.0.1:0");
            (k, v)
        })
        .collect();
    let log = dir.path().join("usersync.log");
    let mut daemon_child = spawn_logged(usersync(&command(daemon), &env), &log);

    // The app's script, with compose's `$$` escapes undone.
    let app = service(&c, "app");
    let entry: Vec<String> = app["entrypoint"]
        .as_array()
        .expect("entrypoint")
        .iter()
        .map(|v| v.as_str().expect("string").to_string())
        .collect();
    assert_eq!(entry, ["sh", "-c"]);
    let script = command(app).join("\n").replace("$$", "$");
    let mut app_env = environment(app);
    app_env.insert("PGHOST".into(), "127.0.0.1".into());
    app_env.insert("PGPORT".into(), port.to_string());
    app_env.insert("PGDATABASE".into(), dbname.clone());
    let mut cmd = Command::new("sh");
    cmd.args(["-c", &script])
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .envs(&app_env);
    let out = run_cli(cmd, WAIT).await;
    assert_eq!(out.code, Some(0), "app: {}", out.all());
    assert!(out.stdout.contains("user1@example.com"), "{}", out.all());

    let (client, conn) = tokio_postgres::connect(&cluster.url(&dbname), tokio_postgres::NoTls)
        .await
        .expect("connect");
    tokio::spawn(conn);
    let deadline = Instant::now() + WAIT;
    loop {
        let pending: i64 = client
            .query_one(
                "SELECT count(*) FROM users WHERE external_user_id IS NULL \
                 OR (name = 'User One' AND external_synced_at IS NULL)",
                &[],
            )
            .await
            .expect("count")
            .get(0);
        let synced: i64 = client
            .query_one(
                "SELECT count(*) FROM usersync.sync_log WHERE outcome = 'synced'",
                &[],
            )
            .await
            .expect("sync log")
            .get(0);
        if pending == 0 && synced >= 4 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "not synced: {pending} rows pending, {synced} synced\n{}",
            std::fs::read_to_string(&log).unwrap_or_default()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let log_text = std::fs::read_to_string(&log).unwrap_or_default();
    assert!(
        log_text.contains("metrics on http://127.0.0.1:"),
        "{log_text}"
    );
    assert!(
        log_text.contains(" synced"),
        "per-change lines shown:\n{log_text}"
    );
    let _ = daemon_child.kill();
    let _ = daemon_child.wait();
    let _ = fake_child.kill();
    let _ = fake_child.wait();
}
