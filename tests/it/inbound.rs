//! The inbound direction (issue 16): signed webhooks from Clerk, Memberstack
//! and Stripe applied to the users table.

use std::io::Write;
use std::process::{Command, Stdio};

use usersync::core::inbound::{sign_standard, sign_stripe, standard_key};

/// `python3` and the environment under which every one of `modules` imports:
/// the machine's install, or a copy of `packages` installed once from PyPI
/// into the target directory. `None` (the test then says why it skips) only
/// when they cannot be installed.
fn python_with(modules: &str, packages: &[&str]) -> Option<Vec<(String, String)>> {
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
    let dir = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("pydeps-inbound");
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

fn run_python(env: &[(String, String)], script: &str, vars: &[(&str, String)], body: &[u8]) {
    let mut child = Command::new("python3")
        .args(["-c", script])
        .envs(env.iter().map(|(k, v)| (k, v)))
        .envs(vars.iter().map(|(k, v)| (*k, v)))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("python3");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(body)
        .expect("write body");
    let out = child.wait_with_output().expect("python3");
    assert!(
        out.status.success() && String::from_utf8_lossy(&out.stdout).trim() == "ok",
        "the vendor library refused what usersync signed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

fn now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

/// What the fakes send (signed by `core::inbound`) verifies with the
/// providers' own libraries: `svix` and `standardwebhooks` for Clerk and
/// Memberstack, `stripe.Webhook.construct_event` for Stripe. With Svix's
/// 18-byte example secret, so short secrets are covered too.
#[test]
fn what_the_fakes_sign_verifies_with_the_vendor_libraries() {
    let Some(env) = python_with(
        "svix, standardwebhooks, stripe",
        &["svix", "standardwebhooks", "stripe"],
    ) else {
        return;
    };
    let body =
        br#"{"type":"user.created","data":{"id":"user_1","email_addresses":[]},"timestamp":1}"#;
    for secret in [
        "whsec_plJ3nmyCDGBKInavdOK15jsl",
        "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw",
    ] {
        let key = standard_key(secret).expect("key");
        let ts = now();
        let sig = sign_standard(&key, "msg_2abc", ts, body);
        let script = r#"
import os, sys
body = sys.stdin.buffer.read()
from svix.webhooks import Webhook as Svix
Svix(os.environ["SECRET"]).verify(body, {"svix-id": "msg_2abc", "svix-timestamp": os.environ["TS"], "svix-signature": os.environ["SIG"]})
from standardwebhooks.webhooks import Webhook as Std
Std(os.environ["SECRET"]).verify(body, {"webhook-id": "msg_2abc", "webhook-timestamp": os.environ["TS"], "webhook-signature": os.environ["SIG"]})
print("ok")
"#;
        run_python(
            &env,
            script,
            &[
                ("SECRET", secret.into()),
                ("TS", ts.to_string()),
                ("SIG", sig),
            ],
            body,
        );
    }
    let secret = "whsec_test_secret_for_usersync";
    let stripe_body = br#"{"id":"evt_1","object":"event","type":"customer.updated","created":1,"data":{"object":{"id":"cus_1","object":"customer"}}}"#;
    let header = sign_stripe(secret, now(), stripe_body);
    let script = r#"
import os, sys, stripe
body = sys.stdin.buffer.read().decode()
event = stripe.Webhook.construct_event(body, os.environ["SIG"], os.environ["SECRET"])
assert event["id"] == "evt_1"
print("ok")
"#;
    run_python(
        &env,
        script,
        &[("SECRET", secret.into()), ("SIG", header)],
        stripe_body,
    );
}
