//! `usersync setup --role NAME`: the daemon runs end to end as the
//! least-privilege role, and that role can change nothing but the two sync
//! columns.

use std::time::Duration;

use crate::common::*;

const LIMIT: Duration = Duration::from_secs(60);

/// Kills the spawned daemon when the test ends, also on panic.
struct Daemon(std::process::Child);

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[tokio::test]
async fn daemon_runs_as_the_least_privilege_role() {
    let db = TestDb::new(USERS_BIGINT).await;
    let role = format!("r_{}", db.dbname);
    let out = run_cli(db.binary_command(&["setup", "--role", &role]), LIMIT).await;
    assert_eq!(out.code, Some(0), "{}", out.all());
    assert!(out.stdout.contains("\\password"), "{}", out.all());
    let attrs = db
        .client
        .query_one(
            "SELECT rolcanlogin, rolreplication, rolsuper, rolcreaterole, rolcreatedb FROM pg_roles WHERE rolname = $1",
            &[&role],
        )
        .await
        .expect("role exists");
    let attrs: (bool, bool, bool, bool, bool) = (
        attrs.get(0),
        attrs.get(1),
        attrs.get(2),
        attrs.get(3),
        attrs.get(4),
    );
    assert_eq!(attrs, (true, true, false, false, false));

    let url = db.url.replace("://postgres@", &format!("://{role}@"));
    assert_ne!(url, db.url, "test URL format changed");

    // check, connected as the role, finds nothing missing.
    let mut cmd = db.binary_command(&["check"]);
    cmd.env("USERSYNC_DATABASE_URL", &url);
    let out = run_cli(cmd, LIMIT).await;
    assert_eq!(out.code, Some(0), "{}", out.all());

    let log = std::fs::File::create(db.log_path()).expect("log");
    let mut cmd = db.binary_command(&["run"]);
    cmd.env("USERSYNC_DATABASE_URL", &url)
        .env("USERSYNC_LOG_LEVEL", "info,usersync=debug")
        .stdout(log.try_clone().expect("log"))
        .stderr(log);
    let _daemon = Daemon(cmd.spawn().expect("spawn usersync"));

    db.exec("INSERT INTO users (id, email) VALUES (1, 'a@example.com'), (2, 'b@example.com'), (3, 'c@example.com')")
        .await;
    db.wait_consistent(Duration::from_secs(30)).await;
    db.exec("UPDATE users SET name = 'Bea' WHERE id = 2; DELETE FROM users WHERE id = 3")
        .await;
    db.wait_consistent(Duration::from_secs(30)).await;
    let kinds: Vec<String> = db
        .accepted()
        .iter()
        .map(|b| b["type"].as_str().unwrap_or_default().to_string())
        .collect();
    for kind in ["user.created", "user.updated", "user.deleted"] {
        assert!(
            kinds.iter().any(|k| k == kind),
            "no {kind} in {kinds:?}\n{}",
            db.log_tail()
        );
    }
    assert_eq!(
        db.count("SELECT count(*) FROM users WHERE external_synced_at IS NOT NULL")
            .await,
        2
    );

    // As that role: the sync columns may change, nothing else.
    let (client, conn) = tokio_postgres::connect(&url, tokio_postgres::NoTls)
        .await
        .expect("connect as the role");
    tokio::spawn(conn);
    let denied = |sql: &'static str| {
        let client = &client;
        async move {
            let err = client
                .batch_execute(sql)
                .await
                .expect_err(&format!("{sql} must be refused"));
            let db_err = err.as_db_error().expect("a server error");
            assert_eq!(db_err.code().code(), "42501", "{sql}: {db_err}");
        }
    };
    denied("UPDATE users SET email = 'evil@example.com' WHERE id = 1").await;
    denied("UPDATE users SET name = 'x', external_user_id = 'y' WHERE id = 1").await;
    denied("DELETE FROM users WHERE id = 1").await;
    denied("INSERT INTO users (id, email) VALUES (9, 'x@example.com')").await;
    // Before 15 every role may create in schema public unless the DBA
    // revoked it; that is the server's default, not a grant of usersync's.
    let server: i32 = db
        .client
        .query_one("SELECT current_setting('server_version_num')::int", &[])
        .await
        .expect("server version")
        .get(0);
    if server >= 150_000 {
        denied("CREATE TABLE public.evil (id int)").await;
    }
    denied("CREATE TABLE usersync.evil (id int)").await;
    denied("ALTER TABLE users REPLICA IDENTITY DEFAULT").await;
    client
        .batch_execute("UPDATE users SET external_synced_at = external_synced_at WHERE id = 1")
        .await
        .expect("the role may update the sync columns");
}

#[tokio::test]
async fn print_sql_with_role_appends_the_role_section() {
    let db = TestDb::bare("", "").await;
    let out = run_cli(
        db.binary_command(&["setup", "--print-sql", "--role", "usersync"]),
        LIMIT,
    )
    .await;
    assert_eq!(out.code, Some(0), "{}", out.all());
    assert!(out.stdout.contains("pg_create_logical_replication_slot"));
    assert!(out
        .stdout
        .contains("CREATE ROLE \"usersync\" LOGIN REPLICATION"));
    assert!(
        !out.stdout.contains("PASSWORD '"),
        "usersync never sets a password"
    );
    let out = run_cli(
        db.binary_command(&["setup", "--print-sql", "--role", "Bad;Name"]),
        LIMIT,
    )
    .await;
    assert_eq!(out.code, Some(2), "{}", out.all());
}

/// A config file with a Clerk source (`on_delete` as given), for the binary.
fn inbound_file(db: &TestDb, name: &str, on_delete: &str) -> std::path::PathBuf {
    let path = std::path::Path::new(env!("CARGO_TARGET_TMPDIR"))
        .join(format!("{}-{name}.toml", db.dbname));
    std::fs::write(
        &path,
        format!(
            "[inbound]\nlisten = \"127.0.0.1:0\"\n[inbound.sources.clerk]\nkind = \"clerk\"\nsecret_env = \"CLERK_SECRET\"\nid_column = \"clerk_id\"\non_delete = \"{on_delete}\"\n[inbound.sources.clerk.mapping]\nemail = \"primary_email\"\nname = \"/first_name\"\n"
        ),
    )
    .expect("write config");
    path
}

fn with_inbound(db: &TestDb, path: &std::path::Path, args: &[&str]) -> std::process::Command {
    let mut all = vec!["--config", path.to_str().expect("path")];
    all.extend_from_slice(args);
    let mut cmd = db.binary_command(&all);
    cmd.env("CLERK_SECRET", crate::inbound::CLERK_SECRET);
    cmd
}

async fn refused(client: &tokio_postgres::Client, sql: &str) {
    let err = client
        .batch_execute(sql)
        .await
        .expect_err(&format!("{sql} must be refused"));
    let db_err = err.as_db_error().expect("a server error");
    assert_eq!(db_err.code().code(), "42501", "{sql}: {db_err}");
}

/// With `[inbound]`, `setup --role` grants what the sources write: INSERT
/// and UPDATE of the mapped, id and soft-delete columns (no other column),
/// DELETE only for `on_delete = "delete"`; `check` as the role finds it
/// all, fails on a revoked INSERT, and warns about a NOT NULL column an
/// inbound insert would leave empty.
#[tokio::test]
async fn inbound_writes_are_granted_and_checked() {
    let db = TestDb::new(crate::inbound::USERS_CLERK).await;
    let deleting = format!("d_{}", db.dbname);
    let soft = format!("s_{}", db.dbname);
    let hard_cfg = inbound_file(&db, "hard", "delete");
    let soft_cfg = inbound_file(&db, "soft", "soft(deleted_at)");
    for (role, path) in [(&deleting, &hard_cfg), (&soft, &soft_cfg)] {
        let out = run_cli(with_inbound(&db, path, &["setup", "--role", role]), LIMIT).await;
        assert_eq!(out.code, Some(0), "{}", out.all());
    }
    let url_of = |role: &str| db.url.replace("://postgres@", &format!("://{role}@"));
    let mut cmd = with_inbound(&db, &hard_cfg, &["check"]);
    cmd.env("USERSYNC_DATABASE_URL", url_of(&deleting));
    let out = run_cli(cmd, LIMIT).await;
    assert_eq!(out.code, Some(0), "{}", out.all());

    let connect = |role: String| {
        let url = url_of(&role);
        async move {
            let (client, conn) = tokio_postgres::connect(&url, tokio_postgres::NoTls)
                .await
                .expect("connect as the role");
            tokio::spawn(conn);
            client
        }
    };
    let hard = connect(deleting.clone()).await;
    hard.batch_execute(
        "INSERT INTO users (email, name, clerk_id) VALUES ('a@x.io', 'Ada', 'user_1');
         UPDATE users SET name = 'Bea', clerk_id = 'user_1' WHERE clerk_id = 'user_1'",
    )
    .await
    .expect("the role may insert and update what the source writes");
    refused(&hard, "UPDATE users SET plan = 'pro'").await;
    refused(&hard, "UPDATE users SET deleted_at = now()").await;
    hard.batch_execute("DELETE FROM users WHERE clerk_id = 'user_1'")
        .await
        .expect("on_delete = delete may delete");
    db.exec("INSERT INTO users (email, clerk_id) VALUES ('b@x.io', 'user_2')")
        .await;
    let soft_client = connect(soft.clone()).await;
    soft_client
        .batch_execute("UPDATE users SET deleted_at = now() WHERE clerk_id = 'user_2'")
        .await
        .expect("on_delete = soft(deleted_at) may set deleted_at");
    refused(&soft_client, "DELETE FROM users").await;

    // A revoked INSERT fails the check; a NOT NULL column without a
    // default or mapping is a warning.
    db.exec(&format!("REVOKE INSERT (email) ON users FROM {deleting}"))
        .await;
    let mut cmd = with_inbound(&db, &hard_cfg, &["check"]);
    cmd.env("USERSYNC_DATABASE_URL", url_of(&deleting));
    let out = run_cli(cmd, LIMIT).await;
    assert_ne!(out.code, Some(0), "{}", out.all());
    assert!(
        out.all().contains("privilege.inbound_insert"),
        "{}",
        out.all()
    );
    db.exec("ALTER TABLE users ADD COLUMN tenant text NOT NULL DEFAULT 't'; ALTER TABLE users ALTER COLUMN tenant DROP DEFAULT")
        .await;
    let out = run_cli(with_inbound(&db, &soft_cfg, &["check"]), LIMIT).await;
    assert_ne!(out.code, Some(0), "{}", out.all());
    assert!(
        out.all().contains("inbound.insert_columns") && out.all().contains("tenant"),
        "{}",
        out.all()
    );
}

/// `check`'s warning about NOT NULL columns: it names each column without a
/// default that a row created by an inbound source would leave empty, and
/// only those. A column the user object maps (`region`) or with a default
/// (`plan`) is not named; one only a subscription maps (`status`, from a
/// source that never inserts) is, because a subscription event never
/// creates the row. Once the columns get defaults the check is ok.
#[tokio::test]
async fn check_warns_about_not_null_columns_an_inbound_insert_cannot_fill() {
    let db = TestDb::new(crate::inbound::USERS_CLERK).await;
    db.exec(
        "ALTER TABLE users ADD COLUMN stripe_id text, ADD COLUMN region text NOT NULL, \
         ADD COLUMN tenant text NOT NULL, ADD COLUMN status text NOT NULL",
    )
    .await;
    let path = std::path::Path::new(env!("CARGO_TARGET_TMPDIR"))
        .join(format!("{}-notnull.toml", db.dbname));
    std::fs::write(
        &path,
        "[inbound]\nlisten = \"127.0.0.1:0\"\n\
         [inbound.sources.clerk]\nkind = \"clerk\"\nsecret_env = \"CLERK_SECRET\"\nid_column = \"clerk_id\"\n\
         [inbound.sources.clerk.mapping]\nemail = \"primary_email\"\nname = \"/first_name\"\nregion = \"/public_metadata/region\"\n\
         [inbound.sources.stripe]\nkind = \"stripe\"\nsecret_env = \"STRIPE_WH\"\nid_column = \"stripe_id\"\non_create = \"ignore\"\n\
         [inbound.sources.stripe.mapping]\nstatus = \"subscription:/status\"\n",
    )
    .expect("write config");
    let finding = || async {
        let mut cmd = with_inbound(&db, &path, &["check", "--json"]);
        cmd.env("STRIPE_WH", "whsec_test_secret_for_usersync");
        let out = run_cli(cmd, LIMIT).await;
        let report: serde_json::Value = serde_json::from_str(&out.stdout)
            .unwrap_or_else(|e| panic!("check --json: {e}: {}", out.all()));
        report["checks"]
            .as_array()
            .and_then(|all| {
                all.iter()
                    .find(|c| c["check"] == "inbound.insert_columns")
                    .cloned()
            })
            .unwrap_or_else(|| panic!("no inbound.insert_columns finding: {}", out.all()))
    };
    let f = finding().await;
    let message = f["message"].as_str().unwrap_or_default();
    assert_eq!(f["level"], "warn", "{f}");
    assert!(
        message.contains("(tenant, status)"),
        "the unfillable columns are not named: {message}"
    );
    for filled in ["region", "email", "plan", "clerk_id"] {
        assert!(!message.contains(filled), "{filled} is filled: {message}");
    }
    db.exec("ALTER TABLE users ALTER COLUMN tenant SET DEFAULT 't', ALTER COLUMN status SET DEFAULT 'none'")
        .await;
    let f = finding().await;
    assert_eq!(f["level"], "ok", "{f}");
}
