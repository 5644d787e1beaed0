//! The Memberstack sink end to end: real PostgreSQL, the daemon (in process
//! or the real binary), and the fake Memberstack admin API. Creates look the
//! member up by email first, updates PATCH only when a mapped column changed,
//! deletes follow `sink.on_delete`, a crash between the create and the
//! write-back leaves exactly one member, a wrong key is one clear refusal,
//! permanent refusals are dead-lettered per user, and a burst stays under the
//! rate limit.

use std::collections::BTreeMap;
use std::process::{Child, Command};
use std::time::Duration;

use crate::common::*;
use serde_json::{json, Value};
use tokio_util::sync::CancellationToken;
use usersync::config::Config;
use usersync::dev::fake::memberstack::{
    FakeMember, FakeMemberstack, FakeMemberstackOptions, MemberstackRequest,
};

const WAIT: Duration = Duration::from_secs(30);
const KEY: &str = "sk_sb_test_7Qm2xV9pLk4Rt8Wz";
const MAPPING: &str = "email=email,customFields.first-name=name,metaData.plan=plan";

/// A test database set up for the Memberstack sink, and the fake API.
struct Ms {
    db: TestDb,
    api: FakeMemberstack,
    /// Extra `[sink]` lines.
    sink_extra: String,
}

impl Ms {
    async fn new(sink_extra: &str) -> Ms {
        Self::with_rate(sink_extra, 25).await
    }

    async fn with_rate(sink_extra: &str, rate_limit_per_sec: u32) -> Ms {
        install_crypto();
        let db = TestDb::bare(USERS_BIGINT, "").await;
        let api = FakeMemberstack::start(FakeMemberstackOptions {
            api_key: KEY.into(),
            rate_limit_per_sec,
            ..Default::default()
        })
        .await
        .expect("fake memberstack");
        let ms = Ms {
            db,
            api,
            sink_extra: sink_extra.to_string(),
        };
        let cfg = ms.config();
        usersync::app::setup::apply(&ms.db.client, &cfg.database)
            .await
            .unwrap_or_else(|e| panic!("setup failed: {e}"));
        ms
    }

    fn toml(&self) -> String {
        format!(
            "[database]\nurl = \"{}\"\nslot = \"{}\"\norigin = \"{}\"\n\
             [sink]\nkind = \"memberstack\"\nurl = \"{}\"\napi_key_env = \"MS_KEY\"\n{}\n\
             [sink.mapping]\nemail = \"email\"\n\"customFields.first-name\" = \"name\"\n\"metaData.plan\" = \"plan\"\n\
             [retry]\ninitial_backoff_ms = 20\nmax_backoff_ms = 200\n",
            self.db.url,
            self.db.dbname,
            self.db.dbname,
            self.api.url(),
            self.sink_extra
        )
    }

    fn config(&self) -> Config {
        let env: BTreeMap<String, String> = [("MS_KEY".to_string(), KEY.to_string())]
            .into_iter()
            .collect();
        Config::from_parts(Some(&self.toml()), "test", &env)
            .unwrap_or_else(|e| panic!("config: {e}"))
    }

    fn start_daemon(&self) -> InProcessDaemon {
        let cfg = self.config();
        let cancel = CancellationToken::new();
        let c = cancel.clone();
        let task = tokio::spawn(async move { usersync::app::run::run(&cfg, c, None).await });
        InProcessDaemon { cancel, task }
    }

    /// The binary, configured by the environment only, against the fake.
    fn command(&self, args: &[&str], key: &str) -> Command {
        let mut cmd = self.db.binary_command(args);
        cmd.env_remove("USERSYNC_SINK_SECRET_ENV")
            .env("USERSYNC_SINK_KIND", "memberstack")
            .env("USERSYNC_SINK_URL", self.api.url())
            .env("USERSYNC_SINK_API_KEY_ENV", "MS_KEY")
            .env("MS_KEY", key)
            .env("USERSYNC_SINK_MAPPING", MAPPING);
        cmd
    }

    fn spawn(&self, args: &[&str]) -> Child {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.db.log_path())
            .expect("log file");
        let log2 = log.try_clone().expect("log file");
        self.command(args, KEY)
            .stdout(log)
            .stderr(log2)
            .spawn()
            .expect("spawn usersync")
    }

    async fn exec(&self, sql: &str) {
        self.db.exec(sql).await
    }

    async fn external_id(&self, id: i64) -> Option<String> {
        self.db
            .client
            .query_one("SELECT external_user_id FROM users WHERE id = $1", &[&id])
            .await
            .expect("row")
            .get(0)
    }

    /// Waits until row `id` has a `mem_` external id and returns it.
    async fn wait_synced(&self, id: i64) -> String {
        let deadline = std::time::Instant::now() + WAIT;
        loop {
            if let Some(ext) = self.external_id(id).await.filter(|e| e.starts_with("mem_")) {
                return ext;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "row {id} not synced after {WAIT:?}; requests: {:#?}\nlog: {}",
                self.api.requests(),
                self.db.log_tail()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    fn member(&self, id: &str) -> FakeMember {
        self.api
            .members()
            .into_iter()
            .find(|m| m.id == id)
            .unwrap_or_else(|| panic!("no member {id}"))
    }

    fn requests_since(&self, n: usize) -> Vec<MemberstackRequest> {
        self.api.requests().into_iter().skip(n).collect()
    }

    async fn dead_letters(&self) -> Vec<(String, String, Option<i32>, String)> {
        self.db
            .client
            .query(
                "SELECT user_key, state, last_status, last_error FROM usersync.dead_letters ORDER BY id",
                &[],
            )
            .await
            .expect("dead letters")
            .iter()
            .map(|r| (r.get(0), r.get(1), r.get(2), r.get(3)))
            .collect()
    }
}

fn method_path(r: &MemberstackRequest) -> String {
    format!("{} {}", r.method, r.path)
}

fn posts(api: &FakeMemberstack) -> usize {
    api.requests()
        .iter()
        .filter(|r| r.method == "POST" && r.path == "/members")
        .count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn create_then_updates_patch_only_mapped_changes() {
    let ms = Ms::new("").await;
    let daemon = ms.start_daemon();
    ms.exec("INSERT INTO users (id, email, name) VALUES (1, 'ada@example.com', 'Ada')")
        .await;
    let id = ms.wait_synced(1).await;

    // Check, look-up by email, create.
    let reqs: Vec<String> = ms.api.requests().iter().map(method_path).collect();
    assert_eq!(
        reqs,
        [
            "GET /members",
            "GET /members/ada%40example.com",
            "POST /members"
        ],
        "{reqs:#?}"
    );
    let post = &ms.api.requests()[2];
    assert!(post.authenticated);
    let password = post.body["password"].as_str().expect("a password");
    assert!(password.len() >= 24, "weak generated password");
    assert_eq!(post.body["email"], "ada@example.com");
    let m = ms.member(&id);
    assert_eq!(m.email, "ada@example.com");
    assert_eq!(
        m.custom_fields,
        json!({"first-name": "Ada"}).as_object().unwrap().clone()
    );
    assert_eq!(
        m.meta_data,
        json!({"plan": "free", "usersync_key": "1"})
            .as_object()
            .unwrap()
            .clone()
    );
    assert_eq!(
        ms.db
            .count("SELECT count(*) FROM users WHERE external_synced_at IS NOT NULL")
            .await,
        1
    );

    // A mapped column: one PATCH of that member, and no echo of the write-back.
    let n = ms.api.requests().len();
    ms.exec("UPDATE users SET plan = 'pro' WHERE id = 1").await;
    wait_for("the PATCH", WAIT, || ms.api.requests().len() > n).await;
    // An echo of the write-back would be committed before now and pushed
    // before the slot is confirmed past now.
    ms.db.wait_confirmed_past_now(WAIT).await;
    let new = ms.requests_since(n);
    assert_eq!(new.len(), 1, "{new:#?}");
    assert_eq!(method_path(&new[0]), format!("PATCH /members/{id}"));
    assert_eq!(new[0].body["metaData"]["plan"], "pro");
    assert_eq!(new[0].body["metaData"]["usersync_key"], "1");
    assert!(new[0].body.get("password").is_none());
    assert_eq!(ms.member(&id).meta_data["plan"], "pro");
    assert_eq!(ms.member(&id).updates, 1);

    // An unmapped column: nothing at all. The marker after it proves the
    // daemon got past it.
    let n = ms.api.requests().len();
    ms.exec("UPDATE users SET bio = 'likes engines' WHERE id = 1")
        .await;
    ms.exec("UPDATE users SET name = 'Ada L.' WHERE id = 1")
        .await;
    wait_for("the marker PATCH", WAIT, || {
        ms.requests_since(n)
            .iter()
            .any(|r| r.body["customFields"]["first-name"] == "Ada L.")
    })
    .await;
    let new = ms.requests_since(n);
    assert_eq!(new.len(), 1, "{new:#?}");
    assert_eq!(new[0].body["customFields"]["first-name"], "Ada L.");

    // An email change updates the same member.
    let n = ms.api.requests().len();
    ms.exec("UPDATE users SET email = 'ada@lovelace.org' WHERE id = 1")
        .await;
    wait_for("the email PATCH", WAIT, || ms.api.requests().len() > n).await;
    let new = ms.requests_since(n);
    assert_eq!(method_path(&new[0]), format!("PATCH /members/{id}"));
    assert_eq!(ms.member(&id).email, "ada@lovelace.org");
    assert_eq!(ms.api.members().len(), 1);
    daemon.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn update_without_a_known_id_finds_the_member_by_its_old_email() {
    let ms = Ms::new("").await;
    let daemon = ms.start_daemon();
    ms.exec("INSERT INTO users (id, email) VALUES (1, 'old@example.com')")
        .await;
    let id = ms.wait_synced(1).await;
    daemon.stop().await;
    // The row lost its external id (a write by the app to the sync columns
    // only is not pushed); then the email changes.
    ms.exec("UPDATE users SET external_user_id = NULL WHERE id = 1")
        .await;
    ms.exec("UPDATE users SET email = 'new@example.com' WHERE id = 1")
        .await;
    let n = ms.api.requests().len();
    let daemon = ms.start_daemon();
    assert_eq!(ms.wait_synced(1).await, id);
    let reqs: Vec<String> = ms.requests_since(n).iter().map(method_path).collect();
    assert_eq!(
        reqs,
        [
            "GET /members",
            "GET /members/new%40example.com",
            "GET /members/old%40example.com",
            &format!("PATCH /members/{id}"),
        ],
        "{reqs:#?}"
    );
    assert_eq!(ms.api.members().len(), 1);
    assert_eq!(ms.member(&id).email, "new@example.com");
    daemon.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_existing_member_is_adopted_not_duplicated() {
    let ms = Ms::new("").await;
    let pre = ms.api.insert_member(
        "pre@example.com",
        json!({"company": "Acme"}).as_object().unwrap().clone(),
        serde_json::Map::new(),
    );
    let daemon = ms.start_daemon();
    ms.exec("INSERT INTO users (id, email, name) VALUES (5, 'PRE@example.com', 'Pre')")
        .await;
    assert_eq!(ms.wait_synced(5).await, pre.id);
    assert_eq!(posts(&ms.api), 0);
    let m = ms.member(&pre.id);
    assert_eq!(m.usersync_key().as_deref(), Some("5"));
    assert_eq!(m.custom_fields["first-name"], "Pre");
    assert_eq!(
        m.custom_fields["company"], "Acme",
        "foreign fields are kept"
    );
    daemon.stop().await;
}

async fn delete_with(policy: &str) -> (Ms, String) {
    let ms = Ms::new(&format!("on_delete = \"{policy}\"")).await;
    let daemon = ms.start_daemon();
    ms.exec("INSERT INTO users (id, email) VALUES (1, 'gone@example.com')")
        .await;
    let id = ms.wait_synced(1).await;
    ms.exec("DELETE FROM users WHERE id = 1").await;
    // The marker travels the same user's lane after the delete: the key
    // inserted again (another email, so another member). Once it is synced,
    // the delete was handled.
    ms.exec("INSERT INTO users (id, email) VALUES (1, 'marker@example.com')")
        .await;
    let deadline = std::time::Instant::now() + WAIT;
    while ms.external_id(1).await.is_none_or(|e| e == id) {
        assert!(
            std::time::Instant::now() < deadline,
            "the re-inserted row 1 was not synced: {:#?}",
            ms.api.requests()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    daemon.stop().await;
    (ms, id)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delete_policy_delete_removes_the_member() {
    let (ms, id) = delete_with("delete").await;
    assert!(ms.member(&id).deleted);
    let deletes: Vec<String> = ms
        .api
        .requests()
        .iter()
        .filter(|r| r.method == "DELETE")
        .map(method_path)
        .collect();
    assert_eq!(deletes, [format!("DELETE /members/{id}")]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delete_policy_ignore_sends_nothing() {
    let (ms, id) = delete_with("ignore").await;
    let m = ms.member(&id);
    assert!(!m.deleted);
    assert_eq!(m.updates, 0);
    let touching: Vec<String> = ms
        .api
        .requests()
        .iter()
        .filter(|r| r.path.contains(&id))
        .map(method_path)
        .collect();
    assert!(touching.is_empty(), "{touching:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delete_policy_mark_stamps_deleted_at() {
    let (ms, id) = delete_with("mark").await;
    let m = ms.member(&id);
    assert!(!m.deleted);
    let at = m.meta_data["deleted_at"].as_str().expect("deleted_at");
    time::OffsetDateTime::parse(at, &time::format_description::well_known::Rfc3339)
        .unwrap_or_else(|e| panic!("{at:?} is not RFC 3339: {e}"));
    assert_eq!(m.usersync_key().as_deref(), Some("1"));
    assert_eq!(
        ms.api
            .requests()
            .iter()
            .filter(|r| r.method == "DELETE")
            .count(),
        0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_between_create_and_write_back_leaves_one_member() {
    let ms = Ms::new("").await;
    // The POST takes effect, but its answer is held: the daemon is killed
    // while it waits, before any write-back.
    ms.api.delay_answers("POST", 1, Duration::from_secs(20));
    let mut child = ms.spawn(&["run"]);
    ms.exec("INSERT INTO users (id, email, name) VALUES (1, 'crash@example.com', 'Cee')")
        .await;
    wait_for("the member to be created", WAIT, || {
        ms.api.members().len() == 1
    })
    .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    child.kill().expect("SIGKILL");
    let _ = child.wait();
    assert_eq!(
        ms.external_id(1).await,
        None,
        "killed before the write-back"
    );

    let mut child = ms.spawn(&["run"]);
    let id = ms.wait_synced(1).await;
    child.kill().expect("kill");
    let _ = child.wait();
    let members = ms.api.members();
    assert_eq!(members.len(), 1, "{members:#?}");
    assert_eq!(members[0].id, id);
    assert_eq!(posts(&ms.api), 1, "the restart linked, not created");

    // Neither the key nor the generated password is in the daemon's output.
    let post = ms
        .api
        .requests()
        .into_iter()
        .find(|r| r.method == "POST")
        .expect("post");
    let password = post.body["password"]
        .as_str()
        .expect("password")
        .to_string();
    let log = std::fs::read_to_string(ms.db.log_path()).unwrap_or_default();
    assert!(!log.contains(KEY), "API key in the log:\n{log}");
    assert!(!log.contains(&password), "password in the log:\n{log}");
    assert!(
        !log.contains("crash@example.com"),
        "email in the log:\n{log}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_create_whose_answer_is_lost_is_linked_on_retry() {
    let ms = Ms::new("timeout_ms = 1000").await;
    ms.api.delay_answers("POST", 1, Duration::from_secs(3));
    let daemon = ms.start_daemon();
    ms.exec("INSERT INTO users (id, email) VALUES (1, 'late@example.com')")
        .await;
    let id = ms.wait_synced(1).await;
    assert_eq!(ms.api.members().len(), 1);
    assert_eq!(ms.api.members()[0].id, id);
    assert_eq!(posts(&ms.api), 1);
    daemon.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transient_errors_are_retried_without_duplicates() {
    let ms = Ms::new("").await;
    let daemon = ms.start_daemon();
    wait_for("the start-up check", WAIT, || !ms.api.requests().is_empty()).await;
    ms.api.inject(usersync::dev::fake::Fault::Status {
        status: 503,
        count: 2,
    });
    ms.api.inject(usersync::dev::fake::Fault::RateLimit {
        retry_after_secs: 1,
        count: 1,
    });
    let started = std::time::Instant::now();
    ms.exec("INSERT INTO users (id, email) VALUES (1, 'retry@example.com')")
        .await;
    let id = ms.wait_synced(1).await;
    assert!(
        started.elapsed() >= Duration::from_secs(1),
        "Retry-After was not honoured"
    );
    let statuses: Vec<u16> = ms.api.requests().iter().skip(1).map(|r| r.status).collect();
    assert_eq!(statuses, [503, 503, 429, 200, 201], "{statuses:?}");
    assert_eq!(ms.api.members().len(), 1);
    assert_eq!(ms.api.members()[0].id, id);
    daemon.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_api_key_is_one_message_exit_2_and_consumes_nothing() {
    let ms = Ms::new("").await;
    ms.exec("INSERT INTO users (id, email) VALUES (1, 'a@example.com')")
        .await;
    let before = ms.db.confirmed_flush_lsn().await;
    let wrong = "sk_sb_wrong_Zx81Kq0Pp3";
    let mut cmd = tokio::process::Command::from(ms.command(&["run"], wrong));
    cmd.stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true);
    let out = tokio::time::timeout(WAIT, cmd.output())
        .await
        .expect("usersync should refuse to start, not run")
        .expect("spawn");
    let stderr = String::from_utf8_lossy(&out.stderr);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(2), "{stderr}{stdout}");
    let err = stderr.trim_end();
    assert!(
        err.starts_with("usersync: ") && err.lines().count() == 1,
        "one message expected:\n{err}"
    );
    assert!(err.contains("MS_KEY"), "{err}");
    assert!(err.contains("401"), "{err}");
    assert!(stdout.trim().is_empty(), "{stdout}");
    assert!(!stderr.contains(wrong) && !stdout.contains(wrong));
    assert_eq!(ms.db.confirmed_flush_lsn().await, before);
    // Only the check reached the API, and it was refused.
    let reqs = ms.api.requests();
    assert_eq!(reqs.len(), 1, "{reqs:#?}");
    assert_eq!((reqs[0].status, reqs[0].authenticated), (401, false));
    assert!(ms.api.members().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn permanent_refusals_are_dead_lettered_while_others_flow() {
    let ms = Ms::new("").await;
    let daemon = ms.start_daemon();
    ms.exec("INSERT INTO users (id, email) VALUES (1, 'taken@example.com')")
        .await;
    ms.wait_synced(1).await;
    // The same email as user 1's member, and an invalid email.
    ms.exec(
        "INSERT INTO users (id, email) VALUES (2, 'taken@example.com');
         INSERT INTO users (id, email) VALUES (3, 'not-an-email');
         INSERT INTO users (id, email) VALUES (4, 'four@example.com');",
    )
    .await;
    ms.wait_synced(4).await;
    let deadline = std::time::Instant::now() + WAIT;
    while ms.dead_letters().await.len() < 2 && std::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let dl = ms.dead_letters().await;
    assert_eq!(dl.len(), 2, "{dl:?}");
    let by_user: BTreeMap<&str, &(String, String, Option<i32>, String)> =
        dl.iter().map(|d| (d.0.as_str(), d)).collect();
    let two = by_user["2"];
    assert_eq!((two.1.as_str(), two.2), ("failed", Some(400)));
    assert!(two.3.contains("already in use"), "{}", two.3);
    let three = by_user["3"];
    assert_eq!((three.1.as_str(), three.2), ("failed", Some(400)));
    assert!(three.3.contains("valid email"), "{}", three.3);
    assert!(!two.3.contains(KEY) && !three.3.contains(KEY));
    assert_eq!(ms.external_id(2).await, None);
    assert_eq!(ms.external_id(3).await, None);
    let live: Vec<String> = ms
        .api
        .members()
        .iter()
        .filter(|m| !m.deleted)
        .filter_map(FakeMember::usersync_key)
        .collect();
    assert_eq!(live, ["1", "4"]);
    // User 1's member was not taken over by user 2.
    assert_eq!(ms.api.live_members_with_key("1").len(), 1);
    daemon.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_of_creates_stays_under_the_rate_limit() {
    const RATE: usize = 100;
    const USERS: i64 = 500;
    let ms = Ms::with_rate(&format!("rate_limit_per_sec = {RATE}"), RATE as u32).await;
    let daemon = ms.start_daemon();
    ms.exec(&format!(
        "INSERT INTO users (id, email, name) SELECT g, 'u' || g || '@example.com', 'U' || g FROM generate_series(1, {USERS}) g"
    ))
    .await;
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while ms
        .db
        .count("SELECT count(*) FROM users WHERE external_user_id LIKE 'mem_%'")
        .await
        < USERS
    {
        assert!(
            std::time::Instant::now() < deadline,
            "burst not synced in time; {} requests",
            ms.api.requests().len()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    daemon.stop().await;
    let reqs = ms.api.requests();
    let limited = reqs.iter().filter(|r| r.status == 429).count();
    assert_eq!(limited, 0, "429s at the fake");
    assert!(ms.dead_letters().await.is_empty());
    assert_eq!(ms.api.members().len(), USERS as usize);
    assert_eq!(posts(&ms.api), USERS as usize);
    // Any one-second window holds at most the limit (a little slack for
    // the network reordering evenly spaced requests).
    let times: Vec<u128> = reqs.iter().map(|r| r.received_at_ms).collect();
    let mut sorted = times.clone();
    sorted.sort_unstable();
    let busiest = sorted
        .iter()
        .enumerate()
        .map(|(i, t)| sorted[i..].iter().take_while(|u| **u < t + 1000).count())
        .max()
        .unwrap_or(0);
    assert!(
        busiest <= RATE + RATE / 20 + 1,
        "{busiest} requests in one second (limit {RATE})"
    );
    assert!(
        busiest >= RATE / 2,
        "the limiter should not be far below the limit: {busiest}"
    );
    let members: Vec<Value> = ms
        .api
        .members()
        .iter()
        .take(1)
        .map(|m| json!(m.custom_fields))
        .collect();
    assert!(members[0]["first-name"]
        .as_str()
        .is_some_and(|n| n.starts_with('U')));
}
