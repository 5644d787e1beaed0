//! `usersync demo --inbound clerk`: users sign up in a fake Clerk instead of
//! in the app. Clerk's Svix-signed webhooks reach usersync's inbound
//! receiver, which writes the users table; the stream then pushes each new
//! row to the sink's fake (a Stripe customer with `--sink stripe`) exactly
//! once, and nothing goes back to Clerk. Each step prints what Clerk did,
//! what the receiver answered, and what was pushed.

use std::time::Duration;

use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::demo::{print_report, start_cluster, stop_cluster, DemoError, DemoService};
use crate::config::{Config, SinkKind};
use crate::core::outcome::SyncReport;
use crate::core::signature::WebhookSecret;
use crate::dev::fake::clerk::{FakeClerk, FakeClerkOptions};
use crate::dev::fake::webhooks::Attempt;
use crate::dev::pgtemp::TempCluster;

const TABLE: &str = "CREATE TABLE public.users (
    id bigserial PRIMARY KEY,
    email text NOT NULL UNIQUE,
    name text,
    plan text NOT NULL DEFAULT 'free',
    clerk_id text UNIQUE,
    created_at timestamptz NOT NULL DEFAULT now()
)";

const CLERK_KEY: &str = "sk_test_usersyncDemoClerkKey0000000000";
/// How long a step may take before the demo gives up.
const STEP_TIMEOUT: Duration = Duration::from_secs(30);

/// One thing that happens in the demo, and how many pushes it causes.
enum Step {
    /// A user signs up in Clerk (`POST /v1/users`).
    SignUp(u32),
    /// User n changes their first name in Clerk (`PATCH /v1/users/{id}`).
    Rename(u32, &'static str),
    /// The app changes the table itself.
    App(&'static str),
    /// User n deletes their account in Clerk (`DELETE /v1/users/{id}`).
    Delete(u32),
}

fn script(users: u32) -> Vec<(Step, usize)> {
    let mut s: Vec<(Step, usize)> = (1..=users).map(|i| (Step::SignUp(i), 1)).collect();
    if users >= 1 {
        s.push((Step::Rename(1, "Ada"), 1));
        s.push((
            Step::App("UPDATE users SET plan = 'pro' WHERE email = 'user1@example.com'"),
            1,
        ));
    }
    if users >= 2 {
        s.push((Step::Delete(2), 1));
    }
    s
}

fn free_port() -> Result<u16, DemoError> {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .map_err(|e| DemoError::new(format!("no free port for the inbound receiver: {e}")))
}

/// `usersync demo --inbound clerk`: the cluster, the script, the cleanup.
pub async fn run(users: u32, keep_running: bool, sink: SinkKind) -> Result<(), DemoError> {
    let (cluster, cancel) = start_cluster().await?;
    let result = with_cluster(&cluster, users, keep_running, sink, cancel).await;
    stop_cluster(cluster);
    result
}

async fn with_cluster(
    cluster: &TempCluster,
    users: u32,
    keep_running: bool,
    sink: SinkKind,
    cancel: CancellationToken,
) -> Result<(), DemoError> {
    cluster.create_database("demo").map_err(DemoError::new)?;
    cluster.psql("demo", TABLE).map_err(DemoError::new)?;
    let fake = DemoService::start(sink)
        .await
        .map_err(|e| DemoError::new(format!("cannot start the fake service: {e}")))?;
    let clerk = FakeClerk::start(FakeClerkOptions {
        secret_key: CLERK_KEY.into(),
        ..FakeClerkOptions::default()
    })
    .await
    .map_err(|e| DemoError::new(format!("cannot start the fake Clerk: {e}")))?;
    let result = run_script(cluster, &fake, &clerk, users, keep_running, cancel).await;
    clerk.shutdown().await;
    fake.shutdown().await;
    result
}

async fn run_script(
    cluster: &TempCluster,
    fake: &DemoService,
    clerk: &FakeClerk,
    users: u32,
    keep_running: bool,
    cancel: CancellationToken,
) -> Result<(), DemoError> {
    let port = free_port()?;
    let inbound_url = format!("http://127.0.0.1:{port}/clerk");
    println!(
        "usersync demo: PostgreSQL on 127.0.0.1:{}, {} at {} (the sink), fake Clerk Backend API at {} (where users sign up)",
        cluster.port(),
        fake.label(),
        fake.url(),
        clerk.url()
    );
    let secret = WebhookSecret::generate().to_whsec();
    let (sink_toml, mut env) = fake.sink_config();
    env.insert("DEMO_CLERK_SECRET".into(), secret.clone());
    let toml = format!(
        "[database]\nurl = \"{}\"\n[sink]\n{sink_toml}\n\
         [inbound]\nlisten = \"127.0.0.1:{port}\"\n\
         [inbound.sources.clerk]\nkind = \"clerk\"\nsecret_env = \"DEMO_CLERK_SECRET\"\n\
         id_column = \"clerk_id\"\non_delete = \"delete\"\n\
         [inbound.sources.clerk.mapping]\nemail = \"primary_email\"\nname = \"/first_name\"\n",
        cluster.url("demo"),
    );
    let cfg = Config::from_parts(Some(&toml), "demo config", &env).map_err(DemoError::new)?;
    let client = crate::store::db::connect(&cfg.database, "usersync-demo")
        .await
        .map_err(DemoError::new)?;
    crate::app::setup::apply(&client, &cfg.database)
        .await
        .map_err(DemoError::new)?;
    println!("usersync demo: ran `usersync setup` (columns, publication, origin, slot)");

    let (reports_tx, mut reports) = mpsc::unbounded_channel();
    let daemon_cancel = cancel.child_token();
    let daemon = {
        let cfg = cfg.clone();
        let c = daemon_cancel.clone();
        tokio::spawn(async move { crate::app::leader::run(&cfg, c, Some(reports_tx)).await })
    };
    // Clerk would retry a refused delivery anyway; waiting keeps the
    // printed story free of connection errors.
    let deadline = tokio::time::Instant::now() + STEP_TIMEOUT;
    while tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .is_err()
    {
        if tokio::time::Instant::now() > deadline || daemon.is_finished() {
            daemon_cancel.cancel();
            return match daemon.await {
                Ok(Err(e)) => Err(DemoError::new(e)),
                _ => Err(DemoError::new("the inbound receiver never started")),
            };
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    clerk
        .send_webhooks_to(&inbound_url, &secret, 0.001)
        .map_err(DemoError::new)?;
    println!(
        "usersync demo: usersync receives Clerk's signed webhooks on {inbound_url} and pushes the table to the {}\n",
        fake.label()
    );

    let script = script(users);
    let expected: usize = script.iter().map(|(_, n)| n).sum();
    let http = reqwest::Client::new();
    let mut ids: Vec<String> = Vec::new();
    let mut demo_requests = 0usize;
    let mut attempts_seen = 0usize;
    let mut seen = 0usize;
    let steps = async {
        for (step, pushes) in &script {
            tokio::time::sleep(Duration::from_millis(150)).await;
            match step {
                Step::SignUp(i) => {
                    let email = format!("user{i}@example.com");
                    let user = clerk_call(
                        &http,
                        reqwest::Method::POST,
                        &format!("{}/v1/users", clerk.url()),
                        Some(serde_json::json!({"email_address": [email], "first_name": format!("User {i}")})),
                    )
                    .await?;
                    let id = user["id"].as_str().unwrap_or_default().to_string();
                    println!("  clerk> {email} signs up (POST /v1/users) -> {id}");
                    ids.push(id);
                }
                Step::Rename(n, name) => {
                    let id = nth(&ids, *n)?;
                    clerk_call(
                        &http,
                        reqwest::Method::PATCH,
                        &format!("{}/v1/users/{id}", clerk.url()),
                        Some(serde_json::json!({ "first_name": name })),
                    )
                    .await?;
                    println!(
                        "  clerk> {id} changes their first name to {name} (PATCH /v1/users/{id})"
                    );
                }
                Step::Delete(n) => {
                    let id = nth(&ids, *n)?;
                    clerk_call(
                        &http,
                        reqwest::Method::DELETE,
                        &format!("{}/v1/users/{id}", clerk.url()),
                        None,
                    )
                    .await?;
                    println!("  clerk> {id} deletes their account (DELETE /v1/users/{id})");
                }
                Step::App(sql) => {
                    println!("  app>   {sql}");
                    client
                        .batch_execute(sql)
                        .await
                        .map_err(|e| DemoError::new(format!("demo script: {e}")))?;
                }
            }
            if !matches!(step, Step::App(_)) {
                demo_requests += 1;
                tokio::time::timeout(STEP_TIMEOUT, clerk.webhooks().settled())
                    .await
                    .map_err(|_| DemoError::new("Clerk's webhook was not delivered within 30 s"))?;
                let attempts = clerk.webhooks().attempts();
                for a in attempts.iter().skip(attempts_seen) {
                    print_attempt(a);
                }
                attempts_seen = attempts.len();
            }
            for _ in 0..*pushes {
                match tokio::time::timeout(STEP_TIMEOUT, reports.recv()).await {
                    Ok(Some(r)) => {
                        print_report(&r);
                        seen += 1;
                    }
                    _ => return Err(DemoError::new("a change was not pushed within 30 s")),
                }
            }
        }
        Ok::<(), DemoError>(())
    };
    let outcome = tokio::select! {
        _ = cancel.cancelled() => Ok(()),
        r = steps => r,
    };
    if let Err(e) = outcome {
        daemon_cancel.cancel();
        let _ = daemon.await;
        return Err(e);
    }

    if !cancel.is_cancelled() {
        summary(cluster, fake, clerk, seen, expected, demo_requests)?;
        if keep_running {
            println!(
                "\nusersync demo: still running. Sign up another user in the fake Clerk:\n  curl -s -H 'Authorization: Bearer {CLERK_KEY}' -H 'Content-Type: application/json' -d '{{\"email_address\":[\"you@example.com\"]}}' {}/v1/users\nPress Ctrl-C to stop.",
                clerk.url()
            );
            keep_printing(&cancel, clerk, &mut reports, attempts_seen).await;
        }
    }
    daemon_cancel.cancel();
    match daemon.await {
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

fn nth(ids: &[String], n: u32) -> Result<&String, DemoError> {
    ids.get(n as usize - 1)
        .ok_or_else(|| DemoError::new(format!("demo script: no user {n}")))
}

async fn clerk_call(
    http: &reqwest::Client,
    method: reqwest::Method,
    url: &str,
    body: Option<serde_json::Value>,
) -> Result<serde_json::Value, DemoError> {
    let mut request = http.request(method, url).bearer_auth(CLERK_KEY);
    if let Some(b) = body {
        request = request.json(&b);
    }
    let response = request
        .send()
        .await
        .map_err(|e| DemoError::new(format!("fake Clerk: {e}")))?;
    let status = response.status();
    let body: serde_json::Value = response.json().await.unwrap_or_default();
    if !status.is_success() {
        return Err(DemoError::new(format!(
            "fake Clerk answered {status}: {body}"
        )));
    }
    Ok(body)
}

fn print_attempt(a: &Attempt) {
    let outcome = serde_json::from_str::<serde_json::Value>(&a.response)
        .ok()
        .and_then(|v| {
            v.get("outcome")
                .and_then(|o| o.as_str())
                .map(str::to_string)
        })
        .unwrap_or_else(|| a.response.clone());
    println!(
        "  webhook> {:<13} {} -> usersync: {} {}{}",
        a.event_type,
        a.message_id,
        a.status.map_or("no answer".to_string(), |s| s.to_string()),
        outcome,
        if a.attempt > 1 {
            format!(" (attempt {})", a.attempt)
        } else {
            String::new()
        }
    );
}

fn summary(
    cluster: &TempCluster,
    fake: &DemoService,
    clerk: &FakeClerk,
    seen: usize,
    expected: usize,
    demo_requests: usize,
) -> Result<(), DemoError> {
    println!();
    let clerk_users = clerk.users().iter().filter(|u| !u.deleted).count();
    let signups = clerk.users().len();
    println!("usersync demo: {seen} of {expected} changes pushed and written back.");
    let created = match fake {
        DemoService::Stripe(f) => f
            .requests()
            .iter()
            .filter(|r| {
                r.method == "POST" && r.path == "/v1/customers" && r.status == 200 && !r.replayed
            })
            .count(),
        _ => signups,
    };
    println!(
        "usersync demo: exactly once: {signups} sign-ups in Clerk made {created} records in the {}; {} live for Clerk's {clerk_users} live users.",
        fake.label(),
        fake.live_users()
    );
    let clerk_requests = clerk.requests().len();
    println!(
        "usersync demo: no echo: the fake Clerk received {clerk_requests} API requests, all {demo_requests} of them the demo's own; usersync wrote nothing back to Clerk."
    );
    let rows = cluster
        .psql(
            "demo",
            "SELECT id, email, name, plan, clerk_id, external_user_id FROM users ORDER BY id",
        )
        .map_err(DemoError::new)?;
    println!("usersync demo: the users table now (id | email | name | plan | clerk_id | external_user_id):");
    for line in rows.lines() {
        println!("  {line}");
    }
    Ok(())
}

async fn keep_printing(
    cancel: &CancellationToken,
    clerk: &FakeClerk,
    reports: &mut mpsc::UnboundedReceiver<SyncReport>,
    mut attempts_seen: usize,
) {
    let mut tick = tokio::time::interval(Duration::from_millis(200));
    loop {
        tokio::select! {
            _ = cancel.cancelled() => break,
            r = reports.recv() => match r {
                Some(r) => print_report(&r),
                None => break,
            },
            _ = tick.tick() => {
                let attempts = clerk.webhooks().attempts();
                for a in attempts.iter().skip(attempts_seen) {
                    print_attempt(a);
                }
                attempts_seen = attempts.len();
            }
        }
    }
}
