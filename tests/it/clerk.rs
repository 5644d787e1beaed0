//! The fake Clerk's Backend API as `@clerk/backend` (Clerk's own Node
//! client) uses it: create, get, update, list with limit/offset/order and
//! the email filter, count, delete, and the errors the client turns into
//! `ClerkAPIResponseError` (404, 422, 401, 429 with Retry-After). Skips with
//! a note on stderr where the npm package can neither be found nor installed.

use std::process::{Command, Stdio};

use serde_json::Value;
use usersync::dev::fake::clerk::{FakeClerk, FakeClerkOptions};
use usersync::dev::fake::Fault;

use crate::common::node_with;

const KEY: &str = "sk_test_usersyncClerkSdkKey0123456789";

fn run_node(script: &str, env: &[(String, String)]) -> Value {
    let out = Command::new("node")
        .args(["-e", script])
        .envs(env.iter().map(|(k, v)| (k, v)))
        .stdin(Stdio::null())
        .output()
        .expect("node");
    assert!(
        out.status.success(),
        "node failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "node printed no JSON ({e}): {}",
            String::from_utf8_lossy(&out.stdout)
        )
    })
}

const USERS_SCRIPT: &str = r#"
const { createClerkClient } = require("@clerk/backend");
const clerk = createClerkClient({ secretKey: process.env.KEY, apiUrl: process.env.BASE });
const err = (e) => [e.status, (e.errors && e.errors[0] && e.errors[0].code) || null, !!e.clerkTraceId, e.retryAfter ?? null];
(async () => {
  const out = {};
  const ada = await clerk.users.createUser({
    emailAddress: ["ada@example.com"], firstName: "Ada", lastName: "Lovelace",
    externalId: "42", publicMetadata: { plan: "pro" }, password: "correct horse battery",
  });
  out.created = [ada.id, ada.primaryEmailAddress && ada.primaryEmailAddress.emailAddress,
    ada.emailAddresses[0].id, ada.firstName, ada.externalId, ada.publicMetadata.plan,
    typeof ada.createdAt, ada.createdAt === ada.updatedAt, ada.passwordEnabled];
  const got = await clerk.users.getUser(ada.id);
  out.got = [got.id, got.fullName, got.primaryEmailAddressId === ada.primaryEmailAddressId];
  const upd = await clerk.users.updateUser(ada.id, { firstName: "Augusta", username: "augusta" });
  out.updated = [upd.firstName, upd.username, upd.updatedAt > ada.updatedAt, upd.lastName];
  const ids = [ada.id];
  for (let i = 1; i <= 5; i++) {
    const u = await clerk.users.createUser({ emailAddress: [`user${i}@example.com`], firstName: `User ${i}` });
    ids.push(u.id);
  }
  out.ids = ids;
  const p1 = await clerk.users.getUserList({ limit: 2, orderBy: "+created_at" });
  const p2 = await clerk.users.getUserList({ limit: 2, offset: 2, orderBy: "+created_at" });
  const p4 = await clerk.users.getUserList({ limit: 2, offset: 6, orderBy: "+created_at" });
  const newest = await clerk.users.getUserList({ limit: 3 });
  out.pages = [p1.data.map((u) => u.id), p2.data.map((u) => u.id), p4.data.map((u) => u.id),
    newest.data.map((u) => u.id), p1.totalCount];
  const byEmail = await clerk.users.getUserList({ emailAddress: ["user3@example.com", "ada@example.com"] });
  out.by_email = [byEmail.data.map((u) => u.id).sort(), byEmail.totalCount];
  out.count = await clerk.users.getCount();
  try { await clerk.users.createUser({ emailAddress: ["ada@example.com"] }); out.taken = null; }
  catch (e) { out.taken = err(e); }
  try { await clerk.users.createUser({ emailAddress: ["not-an-email"] }); out.invalid = null; }
  catch (e) { out.invalid = err(e); }
  try { await clerk.users.getUserList({ limit: 501 }); out.over_limit = null; }
  catch (e) { out.over_limit = err(e); }
  const del = await clerk.users.deleteUser(ada.id);
  out.deleted = [del.id, del.object, del.deleted];
  try { await clerk.users.getUser(ada.id); out.gone = null; } catch (e) { out.gone = err(e); }
  try { await clerk.users.deleteUser(ada.id); out.gone_again = null; } catch (e) { out.gone_again = err(e); }
  const wrong = createClerkClient({ secretKey: "sk_test_wrong", apiUrl: process.env.BASE });
  try { await wrong.users.getUser(ids[1]); out.unauthorized = null; } catch (e) { out.unauthorized = err(e); }
  out.count_after = await clerk.users.getCount();
  console.log(JSON.stringify(out));
})().catch((e) => { console.error(e); process.exit(1); });
"#;

const LIMITED_SCRIPT: &str = r#"
const { createClerkClient } = require("@clerk/backend");
const clerk = createClerkClient({ secretKey: process.env.KEY, apiUrl: process.env.BASE });
(async () => {
  try { await clerk.users.getUser(process.env.ID); console.log(JSON.stringify({ limited: null })); }
  catch (e) { console.log(JSON.stringify({ limited: [e.status, e.errors[0].code, e.retryAfter] })); }
})();
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clerk_backend_sdk_creates_reads_updates_lists_and_deletes_users() {
    let Some(mut env) = node_with(&["@clerk/backend"]) else {
        return;
    };
    let fake = FakeClerk::start(FakeClerkOptions {
        secret_key: KEY.into(),
        rate_limit_per_sec: 0,
        ..FakeClerkOptions::default()
    })
    .await
    .expect("fake clerk");
    env.push(("KEY".into(), KEY.into()));
    env.push(("BASE".into(), fake.url()));
    let script_env = env.clone();
    let out = tokio::task::spawn_blocking(move || run_node(USERS_SCRIPT, &script_env))
        .await
        .expect("node");

    let ids: Vec<String> = out["ids"]
        .as_array()
        .expect("ids")
        .iter()
        .map(|v| v.as_str().expect("id").to_string())
        .collect();
    assert_eq!(ids.len(), 6);
    assert!(ids.iter().all(|id| id.starts_with("user_")), "{ids:?}");
    let created = &out["created"];
    assert_eq!(created[1], "ada@example.com", "{out}");
    assert!(
        created[2].as_str().is_some_and(|s| s.starts_with("idn_")),
        "{out}"
    );
    assert_eq!(
        (
            &created[3],
            &created[4],
            &created[5],
            &created[6],
            &created[7],
            &created[8]
        ),
        (
            &Value::from("Ada"),
            &Value::from("42"),
            &Value::from("pro"),
            &Value::from("number"),
            &Value::from(true),
            &Value::from(true)
        ),
        "{out}"
    );
    assert_eq!(
        out["got"],
        serde_json::json!([ids[0], "Ada Lovelace", true])
    );
    assert_eq!(
        out["updated"],
        serde_json::json!(["Augusta", "augusta", true, "Lovelace"])
    );
    // Oldest first by +created_at; offset pages do not overlap; past the
    // end an empty page; the default order is newest first; totalCount
    // from /v1/users/count.
    assert_eq!(out["pages"][0], serde_json::json!([ids[0], ids[1]]));
    assert_eq!(out["pages"][1], serde_json::json!([ids[2], ids[3]]));
    assert_eq!(out["pages"][2], serde_json::json!([]));
    assert_eq!(out["pages"][3], serde_json::json!([ids[5], ids[4], ids[3]]));
    assert_eq!(out["pages"][4], 6);
    let mut two = vec![ids[0].clone(), ids[3].clone()];
    two.sort();
    assert_eq!(out["by_email"], serde_json::json!([two, 2]));
    assert_eq!(out["count"], 6);
    assert_eq!(
        out["taken"],
        serde_json::json!([422, "form_identifier_exists", true, null])
    );
    assert_eq!(
        out["invalid"],
        serde_json::json!([422, "form_param_format_invalid", true, null])
    );
    assert_eq!(
        out["over_limit"],
        serde_json::json!([422, "form_param_format_invalid", true, null])
    );
    assert_eq!(out["deleted"], serde_json::json!([ids[0], "user", true]));
    assert_eq!(
        out["gone"],
        serde_json::json!([404, "resource_not_found", true, null])
    );
    assert_eq!(
        out["gone_again"],
        serde_json::json!([404, "resource_not_found", true, null])
    );
    assert_eq!(
        out["unauthorized"],
        serde_json::json!([401, "authentication_invalid", true, null])
    );
    assert_eq!(out["count_after"], 5);

    // A 429 with Retry-After reaches the client as its retryAfter.
    fake.inject(Fault::RateLimit {
        retry_after_secs: 7,
        count: 1,
    });
    env.push(("ID".into(), ids[1].clone()));
    let out = tokio::task::spawn_blocking(move || run_node(LIMITED_SCRIPT, &env))
        .await
        .expect("node");
    assert_eq!(
        out["limited"],
        serde_json::json!([429, "too_many_requests", 7])
    );
    let users = fake.users();
    assert_eq!(users.iter().filter(|u| !u.deleted).count(), 5);
    fake.shutdown().await;
}
