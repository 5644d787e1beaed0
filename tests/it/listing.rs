//! The fakes' list APIs driven by the vendors' official SDKs (stripe-python,
//! `@memberstack/admin`), so that their pagination, limits and 429s stay what
//! the real services answer: 10,000 seeded users walked page by page must come
//! back once each, in the vendor's order, and a burst over the documented
//! rate limit must surface as the SDK's own rate-limit error.
//!
//! The SDKs are installed on first use under the test target directory (as
//! `.ci/run` also does); where neither the package nor an install is
//! possible, a test says so on stderr and skips.

use std::collections::{BTreeMap, BTreeSet};
use std::process::{Command, Stdio};

use serde_json::{Map, Value};

use crate::common::node_with;
use usersync::dev::fake::memberstack::{FakeMemberstack, FakeMemberstackOptions};
use usersync::dev::fake::stripe::{FakeStripe, FakeStripeOptions};

const SEEDED: usize = 10_000;
const STRIPE_KEY: &str = "sk_test_51UsersyncListingKey0123";
const MEMBERSTACK_KEY: &str = "sk_sb_listing_key";

/// Runs a script, feeding nothing, and returns its stdout as JSON.
fn run_json(program: &str, script: &str, env: &[(String, String)]) -> Value {
    let out = Command::new(program)
        .args([if program == "node" { "-e" } else { "-c" }, script])
        .envs(env.iter().map(|(k, v)| (k, v)))
        .stdin(Stdio::null())
        .output()
        .expect("run the SDK script");
    assert!(
        out.status.success(),
        "{program} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "{program} printed no JSON ({e}): {}",
            String::from_utf8_lossy(&out.stdout)
        )
    })
}

fn strings(v: &Value) -> Vec<String> {
    v.as_array()
        .expect("an array")
        .iter()
        .map(|s| s.as_str().expect("a string").to_string())
        .collect()
}

const STRIPE_WALK: &str = r#"
import json, os, stripe
stripe.api_key = os.environ["KEY"]
stripe.api_base = os.environ["BASE"]
stripe.max_network_retries = 0
out = {}
out["all"] = [c.id for c in stripe.Customer.list(limit=100).auto_paging_iter()]
first = stripe.Customer.list(limit=3)
out["first"] = [c.id for c in first.data]
out["first_more"] = first.has_more
out["first_object"] = first.object
out["first_url"] = first.url
second = stripe.Customer.list(limit=3, starting_after=first.data[-1].id)
out["second"] = [c.id for c in second.data]
back = stripe.Customer.list(limit=3, ending_before=second.data[0].id)
out["back"] = [c.id for c in back.data]
out["back_more"] = back.has_more
try:
    stripe.Customer.list(limit=101)
    out["over_limit"] = None
except stripe.InvalidRequestError as e:
    out["over_limit"] = [e.http_status, e.param]
print(json.dumps(out))
"#;

const STRIPE_BURST: &str = r#"
import json, os, stripe
stripe.api_key = os.environ["KEY"]
stripe.api_base = os.environ["BASE"]
stripe.max_network_retries = 0
seen = None
for _ in range(200):
    try:
        stripe.Customer.list(limit=1)
    except stripe.RateLimitError as e:
        seen = [e.http_status, e.error.code if e.error else None, e.headers.get("retry-after")]
        break
print(json.dumps({"limited": seen}))
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stripe_python_walks_ten_thousand_customers_once_each() {
    let Some(env) = crate::common::python_with("stripe", &["stripe"]) else {
        return;
    };
    let fake = FakeStripe::start(FakeStripeOptions {
        api_key: STRIPE_KEY.into(),
        rate_limit_per_sec: 0,
        ..FakeStripeOptions::default()
    })
    .await
    .expect("fake stripe");
    let mut ids: Vec<String> = (0..SEEDED)
        .map(|i| {
            let meta = BTreeMap::from([("usersync_key".to_string(), i.to_string())]);
            fake.insert_customer(Some(&format!("u{i}@example.com")), None, meta)
        })
        .collect();
    // Stripe lists newest first.
    ids.reverse();
    let mut env = env;
    env.push(("KEY".into(), STRIPE_KEY.into()));
    env.push(("BASE".into(), fake.url()));
    let out = tokio::task::spawn_blocking(move || run_json("python3", STRIPE_WALK, &env))
        .await
        .expect("join");
    assert_eq!(
        strings(&out["all"]),
        ids,
        "every customer once, newest first"
    );
    assert_eq!(strings(&out["first"]), ids[..3]);
    assert_eq!(out["first_more"], true);
    assert_eq!(out["first_object"], "list");
    assert_eq!(out["first_url"], "/v1/customers");
    assert_eq!(
        strings(&out["second"]),
        ids[3..6],
        "starting_after pages on"
    );
    assert_eq!(strings(&out["back"]), ids[..3], "ending_before pages back");
    assert_eq!(out["back_more"], false);
    assert_eq!(out["over_limit"], serde_json::json!([400, "limit"]));
    fake.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stripe_python_sees_the_rate_limit_as_a_rate_limit_error() {
    let Some(env) = crate::common::python_with("stripe", &["stripe"]) else {
        return;
    };
    let fake = FakeStripe::start(FakeStripeOptions {
        api_key: STRIPE_KEY.into(),
        rate_limit_per_sec: 25,
        ..FakeStripeOptions::default()
    })
    .await
    .expect("fake stripe");
    fake.insert_customer(Some("a@example.com"), None, BTreeMap::new());
    let mut env = env;
    env.push(("KEY".into(), STRIPE_KEY.into()));
    env.push(("BASE".into(), fake.url()));
    let burst_env = env.clone();
    let out = tokio::task::spawn_blocking(move || run_json("python3", STRIPE_BURST, &burst_env))
        .await
        .expect("join");
    assert_eq!(out["limited"], serde_json::json!([429, "rate_limit", "1"]));
    // Switched off, the same burst goes through.
    fake.set_rate_limit(0);
    let out = tokio::task::spawn_blocking(move || run_json("python3", STRIPE_BURST, &env))
        .await
        .expect("join");
    assert_eq!(out["limited"], Value::Null);
    fake.shutdown().await;
}

const MEMBERSTACK_WALK: &str = r#"
const ms = require("@memberstack/admin").init(process.env.KEY, { baseUrl: process.env.BASE });
(async () => {
  const out = { all: [], pages: 0 };
  let after;
  do {
    const page = await ms.members.list({ limit: 100, after });
    out.pages += 1;
    out.total = page.totalCount;
    for (const m of page.data) out.all.push(m.id);
    after = page.hasNextPage ? page.endCursor : undefined;
  } while (after !== undefined);
  const desc = await ms.members.list({ limit: 3, order: "DESC" });
  out.desc = desc.data.map((m) => m.id);
  const desc2 = await ms.members.list({ limit: 3, order: "DESC", after: desc.endCursor });
  out.desc2 = desc2.data.map((m) => m.id);
  const big = await ms.members.list({ limit: 500 });
  out.capped = big.data.length;
  process.stdout.write(JSON.stringify(out));
})().catch((e) => { console.error(e); process.exit(1); });
"#;

const MEMBERSTACK_BURST: &str = r#"
const ms = require("@memberstack/admin").init(process.env.KEY, { baseUrl: process.env.BASE });
(async () => {
  let limited = null;
  for (let i = 0; i < 200 && !limited; i++) {
    try { await ms.members.list({ limit: 1 }); } catch (e) { limited = e.code || JSON.stringify(e); }
  }
  process.stdout.write(JSON.stringify({ limited }));
})().catch((e) => { console.error(e); process.exit(1); });
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn memberstack_admin_sdk_walks_ten_thousand_members_once_each() {
    let Some(env) = node_with(&["@memberstack/admin"]) else {
        return;
    };
    let fake = FakeMemberstack::start(FakeMemberstackOptions {
        api_key: MEMBERSTACK_KEY.into(),
        rate_limit_per_sec: 0,
        ..FakeMemberstackOptions::default()
    })
    .await
    .expect("fake memberstack");
    let ids: Vec<String> = (0..SEEDED)
        .map(|i| {
            fake.insert_member(&format!("m{i}@example.com"), Map::new(), Map::new())
                .id
        })
        .collect();
    let mut env = env;
    env.push(("KEY".into(), MEMBERSTACK_KEY.into()));
    env.push(("BASE".into(), fake.url()));
    let out = tokio::task::spawn_blocking(move || run_json("node", MEMBERSTACK_WALK, &env))
        .await
        .expect("join");
    let all = strings(&out["all"]);
    assert_eq!(all, ids, "every member once, oldest first");
    assert_eq!(
        all.iter().collect::<BTreeSet<_>>().len(),
        SEEDED,
        "no duplicates"
    );
    assert_eq!(out["pages"], SEEDED / 100);
    assert_eq!(out["total"], SEEDED);
    let newest: Vec<String> = ids.iter().rev().cloned().collect();
    assert_eq!(strings(&out["desc"]), newest[..3]);
    assert_eq!(strings(&out["desc2"]), newest[3..6], "DESC pages on");
    assert_eq!(out["capped"], 100, "limits above 100 are capped");
    fake.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn memberstack_admin_sdk_sees_the_rate_limit() {
    let Some(env) = node_with(&["@memberstack/admin"]) else {
        return;
    };
    let fake = FakeMemberstack::start(FakeMemberstackOptions {
        api_key: MEMBERSTACK_KEY.into(),
        rate_limit_per_sec: 25,
        ..FakeMemberstackOptions::default()
    })
    .await
    .expect("fake memberstack");
    let mut env = env;
    env.push(("KEY".into(), MEMBERSTACK_KEY.into()));
    env.push(("BASE".into(), fake.url()));
    let burst_env = env.clone();
    let out = tokio::task::spawn_blocking(move || run_json("node", MEMBERSTACK_BURST, &burst_env))
        .await
        .expect("join");
    assert_eq!(out["limited"], "rate-limited");
    fake.set_rate_limit(0);
    let out = tokio::task::spawn_blocking(move || run_json("node", MEMBERSTACK_BURST, &env))
        .await
        .expect("join");
    assert_eq!(out["limited"], Value::Null);
    fake.shutdown().await;
}
