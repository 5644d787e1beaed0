//! `usersync demo`: a throw-away PostgreSQL, the fake webhook service and
//! the daemon, driven by a short script of inserts, updates and deletes whose
//! syncs are printed as they happen. Everything it starts is stopped and
//! removed at the end or on Ctrl-C.

use std::collections::BTreeMap;
use std::time::Duration;

use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::config::{Config, SinkKind};
use crate::core::outcome::SyncReport;
use crate::core::signature::WebhookSecret;
use crate::dev::fake::memberstack::{FakeMemberstack, FakeMemberstackOptions};
use crate::dev::fake::stripe::{FakeStripe, FakeStripeOptions};
use crate::dev::fake::{FakeOptions, FakeService};
use crate::dev::pgtemp::{TempCluster, TempClusterOptions};

const DEMO_TABLE: &str = "CREATE TABLE public.users (
    id uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    email text NOT NULL UNIQUE,
    name text,
    plan text NOT NULL DEFAULT 'free',
    created_at timestamptz NOT NULL DEFAULT now()
)";

/// The fake external service the demo runs, one per sink kind.
pub(super) enum DemoService {
    Webhook(FakeService, WebhookSecret),
    Memberstack(FakeMemberstack),
    Stripe(FakeStripe),
}

const DEMO_API_KEY: &str = "sk_test_usersyncDemoKey00000000000";

impl DemoService {
    pub(super) async fn start(kind: SinkKind) -> std::io::Result<DemoService> {
        Ok(match kind {
            SinkKind::Webhook => {
                let secret = WebhookSecret::generate();
                let fake = FakeService::start(FakeOptions {
                    port: 0,
                    secret: Some(secret.clone()),
                    latency: Duration::ZERO,
                })
                .await?;
                DemoService::Webhook(fake, secret)
            }
            SinkKind::Memberstack => DemoService::Memberstack(
                FakeMemberstack::start(FakeMemberstackOptions {
                    api_key: DEMO_API_KEY.into(),
                    ..FakeMemberstackOptions::default()
                })
                .await?,
            ),
            SinkKind::Stripe => DemoService::Stripe(
                FakeStripe::start(FakeStripeOptions {
                    api_key: DEMO_API_KEY.into(),
                    ..FakeStripeOptions::default()
                })
                .await?,
            ),
        })
    }

    pub(super) fn label(&self) -> &'static str {
        match self {
            DemoService::Webhook(..) => "fake webhook service",
            DemoService::Memberstack(_) => "fake Memberstack admin API",
            DemoService::Stripe(_) => "fake Stripe API",
        }
    }

    pub(super) fn url(&self) -> String {
        match self {
            DemoService::Webhook(f, _) => f.url(),
            DemoService::Memberstack(f) => f.url(),
            DemoService::Stripe(f) => f.url(),
        }
    }

    /// The `[sink]` part of the demo's config, and the secret's environment.
    pub(super) fn sink_config(&self) -> (String, BTreeMap<String, String>) {
        let (section, secret) = match self {
            DemoService::Webhook(_, s) => (
                "kind = \"webhook\"\nsecret_env = \"DEMO_SECRET\"\n".to_string(),
                s.to_whsec(),
            ),
            DemoService::Memberstack(_) => (
                "kind = \"memberstack\"\napi_key_env = \"DEMO_SECRET\"\n\
                 [sink.mapping]\nemail = \"email\"\n\"customFields.name\" = \"name\"\n\"metaData.plan\" = \"plan\"\n"
                    .to_string(),
                DEMO_API_KEY.to_string(),
            ),
            DemoService::Stripe(_) => (
                "kind = \"stripe\"\napi_key_env = \"DEMO_SECRET\"\non_delete = \"delete\"\n\
                 [sink.mapping]\nemail = \"email\"\nname = \"name\"\n\"metadata.plan\" = \"plan\"\n"
                    .to_string(),
                DEMO_API_KEY.to_string(),
            ),
        };
        let toml = format!("url = \"{}\"\n{section}", self.url());
        (
            toml,
            [("DEMO_SECRET".to_string(), secret)].into_iter().collect(),
        )
    }

    pub(super) fn live_users(&self) -> usize {
        match self {
            DemoService::Webhook(f, _) => f.users().iter().filter(|u| !u.deleted).count(),
            DemoService::Memberstack(f) => f.members().iter().filter(|m| !m.deleted).count(),
            DemoService::Stripe(f) => f.customers().iter().filter(|c| !c.deleted).count(),
        }
    }

    pub(super) async fn shutdown(self) {
        match self {
            DemoService::Webhook(f, _) => f.shutdown().await,
            DemoService::Memberstack(f) => f.shutdown().await,
            DemoService::Stripe(f) => f.shutdown().await,
        }
    }
}

/// Why the demo stopped; every cause is a runtime failure (exit 1).
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct DemoError(pub(super) String);

impl DemoError {
    pub(super) fn new(e: impl std::fmt::Display) -> Self {
        DemoError(e.to_string())
    }
}

pub async fn run(users: u32, keep_running: bool, sink: SinkKind) -> Result<(), DemoError> {
    let (cluster, cancel) = start_cluster().await?;
    let result = with_cluster(&cluster, users, keep_running, sink, cancel).await;
    stop_cluster(cluster);
    result
}

/// Logging, Ctrl-C handling and the throw-away cluster every demo runs on.
pub(super) async fn start_cluster() -> Result<(TempCluster, CancellationToken), DemoError> {
    crate::observe::logging::init_logging("warn", false);
    let cancel = CancellationToken::new();
    crate::app::signals::spawn_signal_handler(cancel.clone());

    println!("usersync demo: starting a throw-away PostgreSQL ...");
    let cluster = tokio::task::spawn_blocking(|| {
        TempCluster::start(TempClusterOptions {
            fsync: false,
            extra_conf: Vec::new(),
            port: None,
            bin_dir: None,
        })
    })
    .await
    .map_err(DemoError::new)?
    .map_err(DemoError::new)?;
    Ok((cluster, cancel))
}

pub(super) fn stop_cluster(cluster: TempCluster) {
    drop(cluster);
    println!("usersync demo: stopped PostgreSQL and removed its files.");
}

async fn with_cluster(
    cluster: &TempCluster,
    users: u32,
    keep_running: bool,
    sink: SinkKind,
    cancel: CancellationToken,
) -> Result<(), DemoError> {
    cluster.create_database("demo").map_err(DemoError::new)?;
    cluster.psql("demo", DEMO_TABLE).map_err(DemoError::new)?;

    let fake = DemoService::start(sink)
        .await
        .map_err(|e| DemoError::new(format!("cannot start the fake service: {e}")))?;
    println!(
        "usersync demo: PostgreSQL on 127.0.0.1:{}, {} at {}",
        cluster.port(),
        fake.label(),
        fake.url()
    );

    let (sink_toml, env) = fake.sink_config();
    let toml = format!(
        "[database]\nurl = \"{}\"\n[sink]\n{sink_toml}",
        cluster.url("demo"),
    );
    let cfg = Config::from_parts(Some(&toml), "demo config", &env).map_err(DemoError::new)?;

    let client = crate::store::db::connect(&cfg.database, "usersync-demo")
        .await
        .map_err(DemoError::new)?;
    crate::app::setup::apply(&client, &cfg.database)
        .await
        .map_err(DemoError::new)?;
    println!("usersync demo: ran `usersync setup` (columns, publication, origin, slot)\n");

    let (reports_tx, mut reports) = mpsc::unbounded_channel();
    let daemon_cancel = cancel.child_token();
    // A free port: the demo must not collide with a real daemon's 9187.
    let mut metrics_cfg = cfg.clone();
    metrics_cfg.metrics.listen = "127.0.0.1:0".into();
    if let Ok(Some(m)) = crate::app::run::serve_metrics(&metrics_cfg, daemon_cancel.clone()).await {
        println!(
            "usersync demo: metrics on http://{}/metrics (also /healthz, /readyz)\n",
            m.addr
        );
    }
    let daemon = {
        let cfg = cfg.clone();
        let c = daemon_cancel.clone();
        tokio::spawn(async move { crate::app::leader::run(&cfg, c, Some(reports_tx)).await })
    };

    let script = script(users);
    let expected = script.iter().map(|(_, pushes)| pushes).sum::<usize>();
    let writer = async {
        for (sql, _) in &script {
            tokio::time::sleep(Duration::from_millis(150)).await;
            println!("  app> {sql}");
            if let Err(e) = client.batch_execute(sql).await {
                return Err(DemoError::new(format!("demo script: {e}")));
            }
        }
        Ok(())
    };
    let printer = async {
        let mut seen = 0;
        while seen < expected {
            match tokio::time::timeout(Duration::from_secs(30), reports.recv()).await {
                Ok(Some(r)) => {
                    print_report(&r);
                    seen += 1;
                }
                _ => break,
            }
        }
        seen
    };
    let (written, seen) = tokio::select! {
        _ = cancel.cancelled() => (Ok(()), 0),
        both = async { tokio::join!(writer, printer) } => both,
    };
    written?;

    if !cancel.is_cancelled() {
        println!();
        let live = fake.live_users();
        println!(
            "usersync demo: {seen} of {expected} changes pushed and written back; the fake service holds {live} live users."
        );
        let rows = cluster
            .psql(
                "demo",
                "SELECT email, plan, external_user_id, to_char(external_synced_at, 'HH24:MI:SS.MS') FROM users ORDER BY email",
            )
            .map_err(DemoError::new)?;
        println!(
            "usersync demo: the users table now (email | plan | external_user_id | synced at):"
        );
        for line in rows.lines() {
            println!("  {line}");
        }
        if keep_running {
            println!(
                "\nusersync demo: still running. Try: psql '{}' -c \"INSERT INTO users (email) VALUES ('you@example.com')\"\nPress Ctrl-C to stop.",
                cluster.url("demo")
            );
            loop {
                tokio::select! {
                    _ = cancel.cancelled() => break,
                    r = reports.recv() => match r {
                        Some(r) => print_report(&r),
                        None => break,
                    },
                }
            }
        }
    }
    daemon_cancel.cancel();
    let outcome = daemon.await;
    fake.shutdown().await;
    match outcome {
        Ok(Ok(())) => {}
        Ok(Err(e)) => return Err(DemoError::new(e)),
        Err(e) => return Err(DemoError::new(e)),
    }
    if seen < expected && !cancel.is_cancelled() {
        return Err(DemoError::new(format!(
            "only {seen} of {expected} changes were synced within 30 s"
        )));
    }
    Ok(())
}

/// The statements the demo app runs, each with the number of pushes it causes.
fn script(users: u32) -> Vec<(String, usize)> {
    let mut s = Vec::new();
    for i in 1..=users {
        s.push((
            format!("INSERT INTO users (email, name) VALUES ('user{i}@example.com', 'User {i}')"),
            1,
        ));
    }
    if users >= 1 {
        s.push((
            "UPDATE users SET plan = 'pro' WHERE email = 'user1@example.com'".into(),
            1,
        ));
        s.push((
            // Touches no synced value: nothing is pushed.
            "UPDATE users SET plan = plan WHERE email = 'user1@example.com'".into(),
            0,
        ));
    }
    if users >= 2 {
        s.push((
            "DELETE FROM users WHERE email = 'user2@example.com'".into(),
            1,
        ));
    }
    s.push((
        "BEGIN; INSERT INTO users (email, name) VALUES ('team-a@example.com', 'Team A'), ('team-b@example.com', 'Team B'); \
         UPDATE users SET name = 'Team B (owner)' WHERE email = 'team-b@example.com'; COMMIT"
            .into(),
        3,
    ));
    s
}

pub(super) fn print_report(r: &SyncReport) {
    println!(
        "  sync> {:<13} user {} -> {}  (push {} ms, decoded -> written back {} ms{})",
        r.op.event_type(),
        r.key,
        r.external_id.as_deref().unwrap_or("-"),
        r.push_latency.as_millis(),
        r.total_latency.as_millis(),
        if r.attempts > 1 {
            format!(", {} attempts", r.attempts)
        } else {
            String::new()
        }
    );
}
