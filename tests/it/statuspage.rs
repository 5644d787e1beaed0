//! The status page at `/` as a person sees it: the daemon runs with its
//! metrics listener, a dead letter is produced, and headless Chromium loads
//! the page. The rendered DOM must show the streaming state, the lag and the
//! dead letter, agree with `usersync status --json`, and a screenshot is
//! left at target/status-page.png for a person to look at.

use std::process::{Child, Command};
use std::time::{Duration, Instant};

use serde_json::Value;
use usersync::dev::fake::Fault;

use crate::common::*;
use crate::observability::metrics_url;

const WAIT: Duration = Duration::from_secs(60);

fn chromium() -> Option<String> {
    ["chromium", "chromium-browser", "google-chrome"]
        .into_iter()
        .find(|b| {
            Command::new(b)
                .arg("--version")
                .output()
                .is_ok_and(|o| o.status.success())
        })
        .map(str::to_string)
}

fn spawn_run(db: &TestDb) -> Child {
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(db.log_path())
        .expect("log file");
    let log2 = log.try_clone().expect("log file");
    db.binary_command(&["run"])
        .env("USERSYNC_METRICS_LISTEN", "127.0.0.1:0")
        .stdout(log)
        .stderr(log2)
        .spawn()
        .expect("spawn usersync")
}

/// The DOM after Chromium rendered the page (and a screenshot, when asked).
fn render(browser: &str, url: &str, screenshot: Option<&std::path::Path>) -> String {
    let profile = tempdir();
    let mut cmd = Command::new(browser);
    cmd.args([
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--no-first-run",
        "--window-size=1000,1000",
    ])
    .arg(format!("--user-data-dir={}", profile.display()));
    match screenshot {
        Some(path) => cmd.arg(format!("--screenshot={}", path.display())),
        None => cmd.arg("--dump-dom"),
    };
    let out = cmd.arg(url).output().expect("run chromium");
    let _ = std::fs::remove_dir_all(&profile);
    assert!(
        out.status.success(),
        "chromium failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn tempdir() -> std::path::PathBuf {
    let dir = std::path::Path::new(env!("CARGO_TARGET_TMPDIR"))
        .join(format!("chromium-{}", unique_db("p")));
    std::fs::create_dir_all(&dir).expect("profile dir");
    dir
}

/// The text inside the element with this id.
fn by_id<'a>(dom: &'a str, id: &str) -> Option<&'a str> {
    let at = dom.find(&format!("id=\"{id}\""))?;
    let rest = &dom[at..];
    let start = rest.find('>')? + 1;
    let end = rest[start..].find("</")?;
    Some(&rest[start..start + end])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_status_page_shows_streaming_lag_and_a_dead_letter_in_a_browser() {
    let Some(browser) = chromium() else {
        eprintln!(
            "SKIPPED: no chromium on this machine (apt-get install chromium; .ci/run installs it)"
        );
        return;
    };
    let db = TestDb::new(USERS_UUID).await;
    // The first push is refused for good: that user's dead letter.
    db.fake.inject(Fault::Status {
        status: 422,
        count: 1,
    });
    let mut daemon = spawn_run(&db);
    let base = metrics_url(&db).await;
    db.exec("INSERT INTO users (email, name) VALUES ('refused@example.com', 'Ann')")
        .await;
    db.exec("INSERT INTO users (email, name) VALUES ('fine@example.com', 'Bob')")
        .await;
    let deadline = Instant::now() + WAIT;
    while db.count("SELECT count(*) FROM usersync.dead_letters").await < 1
        || db
            .count("SELECT count(*) FROM users WHERE external_user_id IS NOT NULL")
            .await
            < 1
    {
        assert!(Instant::now() < deadline, "{}", db.log_tail());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let event_id: String = db
        .client
        .query_one("SELECT event_id FROM usersync.dead_letters", &[])
        .await
        .expect("dead letter")
        .get(0);

    let url = format!("{base}/");
    let dom = tokio::task::spawn_blocking({
        let (browser, url) = (browser.clone(), url.clone());
        move || render(&browser, &url, None)
    })
    .await
    .expect("render");
    assert_eq!(by_id(&dom, "state"), Some("streaming"), "{dom}");
    let lag = by_id(&dom, "lag").unwrap_or_default();
    assert!(lag.contains("bytes") || lag.contains("MiB"), "lag: {lag}");
    assert!(
        dom.contains(&event_id),
        "the dead letter is not listed:\n{dom}"
    );
    assert!(
        !dom.contains("refused@example.com"),
        "personal data on the page"
    );
    let counts = by_id(&dom, "dead-letter-counts").unwrap_or_default();

    // The page and `usersync status` agree.
    let out = run_cli(db.binary_command(&["status", "--json"]), WAIT).await;
    assert_eq!(out.code, Some(0), "{}", out.all());
    let status: Value = serde_json::from_str(&out.stdout).expect("status json");
    assert_eq!(status["streaming"], true);
    let dl = &status["dead_letters"];
    assert_eq!(
        counts,
        format!(
            "{} failed, {} parked behind them, {} parked users",
            dl["failed"], dl["parked"], dl["parked_users"]
        )
    );

    let shot = std::path::Path::new(env!("CARGO_TARGET_TMPDIR"))
        .parent()
        .map(|t| t.join("status-page.png"))
        .expect("target dir");
    let _ = std::fs::remove_file(&shot);
    tokio::task::spawn_blocking({
        let shot = shot.clone();
        move || render(&browser, &url, Some(&shot))
    })
    .await
    .expect("screenshot");
    assert!(
        std::fs::metadata(&shot).is_ok_and(|m| m.len() > 1000),
        "no screenshot at {}",
        shot.display()
    );
    let _ = daemon.kill();
    let _ = daemon.wait();
}

/// A TCP proxy in front of PostgreSQL that can be cut: while down it
/// ends every open connection and every new one at once, as a database
/// host that went away does ("server closed the connection unexpectedly").
struct Proxy {
    port: u16,
    up: tokio::sync::watch::Sender<bool>,
}

impl Proxy {
    async fn start(target: String) -> Proxy {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind the proxy");
        let port = listener.local_addr().expect("proxy address").port();
        let (up, watch) = tokio::sync::watch::channel(true);
        tokio::spawn(async move {
            while let Ok((mut client, _)) = listener.accept().await {
                let mut watch = watch.clone();
                let target = target.clone();
                tokio::spawn(async move {
                    if !*watch.borrow() {
                        return;
                    }
                    let Ok(mut server) = tokio::net::TcpStream::connect(&target).await else {
                        return;
                    };
                    tokio::select! {
                        _ = tokio::io::copy_bidirectional(&mut client, &mut server) => {}
                        _ = watch.wait_for(|up| !*up) => {}
                    }
                });
            }
        });
        Proxy { port, up }
    }

    fn set_up(&self, up: bool) {
        let _ = self.up.send(up);
    }
}

/// The page through a real outage of the app database, and the inbound
/// sources: an applied Clerk event shows on the page and in `usersync
/// status` (source, event type, outcome; no user). Then the daemon's way
/// to PostgreSQL is cut (every connection ends, new ones are closed at
/// once), and the page says "the database cannot be reached" instead of
/// failing; once the way is back it says "streaming" again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_page_lists_inbound_sources_and_survives_a_database_outage() {
    use crate::inbound::{applier_for, clerk_config, clerk_user, USERS_CLERK};
    use crate::observability::http_get;
    use usersync::core::inbound_event::{parse, SourceKind};

    install_crypto();
    let db = TestDb::new(USERS_CLERK).await;
    let cfg = clerk_config(&db, "");
    let mut applier = applier_for(&db, &cfg, "clerk").await;
    let body = clerk_user("user.created", "user_1", "page@example.com", "Ann", 1000);
    let mapping = &cfg
        .inbound
        .as_ref()
        .and_then(|i| i.source("clerk"))
        .expect("source")
        .mapping;
    let record = parse(SourceKind::Clerk, &body, Some("msg_1"), 0, mapping).expect("parses");
    applier.apply(&record).await.expect("apply");
    drop(applier);

    let out = run_cli(db.binary_command(&["status", "--json"]), WAIT).await;
    assert_eq!(out.code, Some(0), "{}", out.all());
    let status: Value = serde_json::from_str(&out.stdout).expect("status json");
    let sources = status["inbound"].as_array().cloned().unwrap_or_default();
    assert_eq!(sources.len(), 1, "{status:#}");
    assert_eq!(sources[0]["source"], "clerk");
    assert_eq!(sources[0]["last_event_type"], "user.created");
    assert_eq!(sources[0]["last_outcome"], "applied");

    // The daemon reaches PostgreSQL only through the proxy.
    let rest = db.url.split_once('@').map(|(_, r)| r).expect("url host");
    let (hostport, path) = rest.split_once('/').expect("url path");
    let proxy = Proxy::start(hostport.to_string()).await;
    let proxied = db.url.replace(
        &format!("@{hostport}/{path}"),
        &format!("@127.0.0.1:{}/{path}", proxy.port),
    );
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(db.log_path())
        .expect("log file");
    let log2 = log.try_clone().expect("log file");
    let mut daemon = db
        .binary_command(&["run"])
        .env("USERSYNC_DATABASE_URL", &proxied)
        .env("USERSYNC_METRICS_LISTEN", "127.0.0.1:0")
        .stdout(log)
        .stderr(log2)
        .spawn()
        .expect("spawn usersync");
    let base = metrics_url(&db).await;
    let page = |want: &'static str| {
        let url = format!("{base}/");
        async move {
            let deadline = Instant::now() + WAIT;
            loop {
                let (code, html) = http_get(&url).await;
                if code == 200 && html.contains(want) {
                    return html;
                }
                assert!(
                    Instant::now() < deadline,
                    "the page never showed {want:?} (HTTP {code}):\n{html}"
                );
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    };
    let html = page(r#"class="streaming""#).await;
    assert!(html.contains("Inbound sources"), "{html}");
    assert!(html.contains("clerk"), "{html}");
    assert!(html.contains("user.created (applied)"), "{html}");
    assert!(
        !html.contains("page@example.com"),
        "personal data on the page"
    );

    proxy.set_up(false);
    let html = page(r#"id="database-error""#).await;
    let html = if html.contains(r#"class="down""#) {
        html
    } else {
        // The stream notices the cut at its next read; the page, at once.
        page(r#"class="down""#).await
    };
    assert!(html.contains("cannot be reached"), "{html}");
    assert!(
        daemon.try_wait().expect("wait").is_none(),
        "the daemon died"
    );

    proxy.set_up(true);
    let html = page(r#"class="streaming""#).await;
    assert!(!html.contains(r#"id="database-error""#), "{html}");
    let _ = daemon.kill();
    let _ = daemon.wait();
}
