//! TLS to PostgreSQL: a cluster of its own with ssl = on and a pg_hba that
//! accepts TLS connections only, a CA and server certificate made for the
//! test with the openssl CLI, and the daemon (the release binary) syncing end
//! to end with sslmode=verify-full; a wrong CA, a host name the certificate
//! does not name, and sslmode=disable each fail with one clear message.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use crate::common::{install_crypto, run_cli, USERS_BIGINT};
use usersync::core::signature::WebhookSecret;
use usersync::dev::fake::{FakeOptions, FakeService};
use usersync::dev::pgtemp::{TempCluster, TempClusterOptions};

const LIMIT: Duration = Duration::from_secs(60);

fn openssl(dir: &Path, args: &[&str]) {
    let out = Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .output()
        .expect("the openssl CLI is needed for the TLS test");
    assert!(
        out.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn id(flag: &str) -> u32 {
    let out = Command::new("id")
        .args([flag, "postgres"])
        .output()
        .expect("id");
    String::from_utf8_lossy(&out.stdout)
        .trim()
        .parse()
        .expect("postgres user id")
}

/// CA, other CA, and a server certificate for DNS name `localhost` only.
struct Certs {
    _dir: tempfile::TempDir,
    ca: PathBuf,
    other_ca: PathBuf,
    server_crt: PathBuf,
    server_key: PathBuf,
    hba: PathBuf,
}

fn make_certs() -> Certs {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    let ec = [
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:prime256v1",
        "-nodes",
    ];
    for (name, cn) in [("ca", "usersync test CA"), ("other_ca", "some other CA")] {
        let (key, crt, subj) = (
            format!("{name}.key"),
            format!("{name}.crt"),
            format!("/CN={cn}"),
        );
        let mut args = vec!["req", "-x509"];
        args.extend(ec);
        args.extend(["-keyout", &key, "-out", &crt, "-days", "2", "-subj", &subj]);
        args.extend([
            "-addext",
            "basicConstraints=critical,CA:TRUE",
            "-addext",
            "keyUsage=critical,keyCertSign,cRLSign",
        ]);
        openssl(d, &args);
    }
    let mut args = vec!["req"];
    args.extend(ec);
    args.extend([
        "-keyout",
        "server.key",
        "-out",
        "server.csr",
        "-subj",
        "/CN=localhost",
    ]);
    openssl(d, &args);
    std::fs::write(
        d.join("server.ext"),
        "subjectAltName=DNS:localhost\nextendedKeyUsage=serverAuth\n",
    )
    .expect("ext");
    openssl(
        d,
        &[
            "x509",
            "-req",
            "-in",
            "server.csr",
            "-CA",
            "ca.crt",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-out",
            "server.crt",
            "-days",
            "2",
            "-extfile",
            "server.ext",
        ],
    );
    // Only TLS over TCP; the local socket stays open for the harness.
    std::fs::write(
        d.join("pg_hba.conf"),
        "local all all trust\n\
         hostssl all all 127.0.0.1/32 trust\n\
         hostssl replication all 127.0.0.1/32 trust\n\
         hostssl all all ::1/128 trust\n\
         hostssl replication all ::1/128 trust\n",
    )
    .expect("hba");
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(d, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    for f in ["ca.crt", "other_ca.crt", "server.crt", "pg_hba.conf"] {
        std::fs::set_permissions(d.join(f), std::fs::Permissions::from_mode(0o644)).expect("chmod");
    }
    let key = d.join("server.key");
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).expect("chmod");
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } == 0 {
        // The server runs as postgres and insists on owning its key.
        std::os::unix::fs::chown(&key, Some(id("-u")), Some(id("-g"))).expect("chown key");
    }
    Certs {
        ca: d.join("ca.crt"),
        other_ca: d.join("other_ca.crt"),
        server_crt: d.join("server.crt"),
        server_key: key,
        hba: d.join("pg_hba.conf"),
        _dir: dir,
    }
}

fn binary(url: &str, fake: &FakeService, secret: &WebhookSecret, args: &[&str]) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_usersync"));
    cmd.args(args)
        .env_remove("USERSYNC_CONFIG")
        .env_remove("PGSSLMODE")
        .env("USERSYNC_DATABASE_URL", url)
        .env("USERSYNC_SINK_URL", fake.url())
        .env("USERSYNC_SINK_SECRET_ENV", "TEST_SECRET")
        .env("TEST_SECRET", secret.to_whsec())
        .env("USERSYNC_RETRY_INITIAL_BACKOFF_MS", "20")
        .env("USERSYNC_RETRY_MAX_BACKOFF_MS", "200")
        // No metrics port: tests run side by side.
        .env("USERSYNC_METRICS_LISTEN", "")
        .current_dir(std::env::temp_dir());
    cmd
}

struct Daemon(std::process::Child);

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[tokio::test]
async fn daemon_syncs_over_verified_tls_and_refuses_what_it_cannot_trust() {
    install_crypto();
    let certs = make_certs();
    let cluster = TempCluster::start(TempClusterOptions {
        extra_conf: vec![
            "ssl = on".into(),
            format!("ssl_cert_file = '{}'", certs.server_crt.display()),
            format!("ssl_key_file = '{}'", certs.server_key.display()),
            format!("hba_file = '{}'", certs.hba.display()),
        ],
        ..Default::default()
    })
    .expect("TLS cluster");
    cluster.create_database("app").expect("database");
    cluster.psql("app", USERS_BIGINT).expect("table");
    let port = cluster.port();
    let url = |host: &str, query: &str| format!("postgres://postgres@{host}:{port}/app?{query}");
    let ca = certs.ca.display().to_string();
    let other = certs.other_ca.display().to_string();
    let secret = WebhookSecret::generate();
    let fake = FakeService::start(FakeOptions {
        port: 0,
        secret: Some(secret.clone()),
        latency: Duration::ZERO,
    })
    .await
    .expect("fake");

    let full = url(
        "localhost",
        &format!("sslmode=verify-full&sslrootcert={ca}"),
    );
    let out = run_cli(binary(&full, &fake, &secret, &["setup"]), LIMIT).await;
    assert_eq!(out.code, Some(0), "setup over TLS: {}", out.all());

    // A certificate from another CA: one message naming the setting.
    let wrong = url(
        "localhost",
        &format!("sslmode=verify-full&sslrootcert={other}"),
    );
    let out = run_cli(binary(&wrong, &fake, &secret, &["run"]), LIMIT).await;
    assert_eq!(out.code, Some(1), "{}", out.all());
    assert!(out.stderr.contains("certificate"), "{}", out.all());
    assert!(out.stderr.contains(&other), "{}", out.all());
    assert_eq!(out.stderr.trim().lines().count(), 1, "{}", out.all());

    // verify-full checks the host name: the certificate names localhost only.
    let by_ip = url(
        "127.0.0.1",
        &format!("sslmode=verify-full&sslrootcert={ca}"),
    );
    let out = run_cli(binary(&by_ip, &fake, &secret, &["run"]), LIMIT).await;
    assert_eq!(out.code, Some(1), "{}", out.all());
    assert!(out.stderr.contains("certificate"), "{}", out.all());
    // verify-ca does not, so the same address works for it.
    let ca_only = url("127.0.0.1", &format!("sslmode=verify-ca&sslrootcert={ca}"));
    let out = run_cli(binary(&ca_only, &fake, &secret, &["check"]), LIMIT).await;
    assert_eq!(out.code, Some(0), "{}", out.all());

    // No TLS against a server that only accepts TLS.
    let plain = url("localhost", "sslmode=disable");
    let out = run_cli(binary(&plain, &fake, &secret, &["run"]), LIMIT).await;
    assert_eq!(out.code, Some(1), "{}", out.all());
    assert!(out.stderr.contains("hostssl"), "{}", out.all());

    // sslmode in [database] (here through its environment override) wins over the URL.
    let mut cmd = binary(&plain, &fake, &secret, &["check"]);
    cmd.env("USERSYNC_DATABASE_SSLMODE", "verify-full")
        .env("USERSYNC_DATABASE_SSLROOTCERT", &ca);
    let out = run_cli(cmd, LIMIT).await;
    assert_eq!(out.code, Some(0), "{}", out.all());

    // End to end with verify-full.
    let log = tempfile::NamedTempFile::new().expect("log");
    let mut cmd = binary(&full, &fake, &secret, &["run"]);
    cmd.stdout(log.reopen().expect("log"))
        .stderr(log.reopen().expect("log"));
    let _daemon = Daemon(cmd.spawn().expect("spawn"));
    cluster
        .psql(
            "app",
            "INSERT INTO users (id, email) VALUES (1, 'a@example.com'), (2, 'b@example.com');
             UPDATE users SET name = 'Bea' WHERE id = 2;
             DELETE FROM users WHERE id = 1;",
        )
        .expect("writes");
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let kinds: Vec<String> = fake
            .requests()
            .into_iter()
            .filter(|r| (200..300).contains(&r.status))
            .map(|r| r.body["type"].as_str().unwrap_or_default().to_string())
            .collect();
        let synced = cluster
            .psql(
                "app",
                "SELECT count(*) FROM users WHERE external_user_id IS NOT NULL",
            )
            .expect("count");
        if kinds.iter().filter(|k| *k == "user.created").count() == 2
            && kinds.iter().any(|k| k == "user.updated")
            && kinds.iter().any(|k| k == "user.deleted")
            && synced.trim() == "1"
        {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "not synced over TLS: {kinds:?}, {synced}\n{}",
            std::fs::read_to_string(log.path()).unwrap_or_default()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Every usersync session is encrypted, the replication stream included.
    let sessions = cluster
        .psql(
            "app",
            "SELECT count(*) FILTER (WHERE s.ssl), count(*) FILTER (WHERE NOT s.ssl), \
                    count(*) FILTER (WHERE a.backend_type = 'walsender') \
             FROM pg_stat_activity a JOIN pg_stat_ssl s USING (pid) \
             WHERE a.application_name = 'usersync'",
        )
        .expect("pg_stat_ssl");
    let counts: Vec<i64> = sessions
        .trim()
        .split('|')
        .map(|n| n.parse().expect("number"))
        .collect();
    assert!(counts[0] >= 2, "{sessions}");
    assert_eq!(counts[1], 0, "{sessions}");
    assert_eq!(counts[2], 1, "{sessions}");
    fake.shutdown().await;
}
