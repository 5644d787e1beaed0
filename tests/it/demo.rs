//! `usersync demo` as a newcomer runs it: the script syncs every change, and
//! neither the end of the script nor Ctrl-C leaves a process or a directory
//! behind.

use std::io::{BufRead, BufReader};
use std::os::unix::fs::PermissionsExt;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

fn scratch_tmpdir() -> tempfile::TempDir {
    let dir = tempfile::Builder::new()
        .prefix("demo")
        .tempdir_in("/tmp")
        .expect("tempdir");
    // The throw-away cluster runs as `postgres` when we are root.
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o777)).expect("chmod");
    dir
}

fn port_from(line: &str) -> Option<u16> {
    let rest = line.split("PostgreSQL on 127.0.0.1:").nth(1)?;
    rest.split(|c: char| !c.is_ascii_digit())
        .next()?
        .parse()
        .ok()
}

fn assert_gone(port: u16, tmp: &std::path::Path) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let open = std::net::TcpStream::connect(("127.0.0.1", port)).is_ok();
        let left: Vec<_> = std::fs::read_dir(tmp)
            .map(|d| d.filter_map(Result::ok).map(|e| e.path()).collect())
            .unwrap_or_default();
        if !open && left.is_empty() {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "left behind: port {port} open={open}, files {left:?}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn demo_script_syncs_everything_and_cleans_up() {
    let tmp = scratch_tmpdir();
    let out = Command::new(env!("CARGO_BIN_EXE_usersync"))
        .args(["demo", "--users", "3"])
        .env("TMPDIR", tmp.path())
        .output()
        .expect("run demo");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "demo failed: {stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // 3 creates, 1 update, 1 delete, and a transaction of 2 creates + 1 update.
    assert!(
        stdout.contains("8 of 8 changes pushed and written back"),
        "{stdout}"
    );
    assert_eq!(stdout.matches("sync> user.created").count(), 5, "{stdout}");
    assert_eq!(stdout.matches("sync> user.deleted").count(), 1, "{stdout}");
    let port = stdout.lines().find_map(port_from).expect("port in output");
    assert_gone(port, tmp.path());
}

#[test]
fn demo_stops_cleanly_on_ctrl_c() {
    let tmp = scratch_tmpdir();
    let mut child = Command::new(env!("CARGO_BIN_EXE_usersync"))
        .args(["demo", "--users", "2", "--keep-running"])
        .env("TMPDIR", tmp.path())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn demo");
    let stdout = child.stdout.take().expect("stdout");
    let mut port = None;
    let mut lines = BufReader::new(stdout).lines();
    for line in lines.by_ref() {
        let line = line.expect("line");
        port = port.or_else(|| port_from(&line));
        if line.contains("Press Ctrl-C to stop") {
            break;
        }
    }
    // Keep reading, so the demo's last lines do not hit a closed pipe.
    let rest = std::thread::spawn(move || lines.map_while(Result::ok).collect::<Vec<_>>());
    let port = port.expect("port in output");
    // SAFETY: sending SIGINT to our own child.
    unsafe {
        libc::kill(child.id() as i32, libc::SIGINT);
    }
    let status = child.wait().expect("wait");
    let rest = rest.join().expect("reader");
    assert!(status.success(), "demo exited with {status}: {rest:?}");
    assert!(
        rest.iter()
            .any(|l| l.contains("stopped PostgreSQL and removed its files")),
        "{rest:?}"
    );
    assert_gone(port, tmp.path());
}

/// `--sink memberstack|stripe`: the same script against the local fakes of
/// those APIs.
#[test]
fn demo_runs_against_each_vendor_fake() {
    for sink in ["memberstack", "stripe"] {
        let tmp = scratch_tmpdir();
        let out = Command::new(env!("CARGO_BIN_EXE_usersync"))
            .args(["demo", "--users", "2", "--sink", sink])
            .env("TMPDIR", tmp.path())
            .output()
            .expect("run demo");
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "{sink} demo failed: {stdout}\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        // 2 creates, 1 update, 1 delete, and 2 creates + 1 update.
        assert!(
            stdout.contains("7 of 7 changes pushed and written back"),
            "{stdout}"
        );
        let prefix = if sink == "memberstack" {
            "mem_"
        } else {
            "cus_"
        };
        assert!(stdout.contains(&format!("-> {prefix}")), "{stdout}");
        let port = stdout.lines().find_map(port_from).expect("port in output");
        assert_gone(port, tmp.path());
    }
}

/// `--inbound clerk --sink stripe`: three users sign up in the fake Clerk;
/// each signed webhook is verified and applied by usersync's receiver, each
/// new row becomes exactly one Stripe customer, a rename in Clerk and a plan
/// change in the app are pushed as updates, an account deleted in Clerk
/// deletes the customer, and nothing is sent back to Clerk.
#[test]
fn demo_inbound_clerk_to_stripe_creates_each_customer_once_without_echo() {
    let tmp = scratch_tmpdir();
    let out = Command::new(env!("CARGO_BIN_EXE_usersync"))
        .args([
            "demo",
            "--users",
            "3",
            "--inbound",
            "clerk",
            "--sink",
            "stripe",
        ])
        .env("TMPDIR", tmp.path())
        .output()
        .expect("run demo");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "inbound demo failed: {stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // 3 sign-ups, a rename in Clerk, a plan change in the app, a deletion.
    assert!(
        stdout.contains("6 of 6 changes pushed and written back"),
        "{stdout}"
    );
    let webhooks: Vec<&str> = stdout.lines().filter(|l| l.contains("webhook>")).collect();
    assert_eq!(webhooks.len(), 5, "{stdout}");
    assert!(
        webhooks
            .iter()
            .all(|l| l.contains("-> usersync: 200 applied")),
        "{stdout}"
    );
    assert_eq!(stdout.matches("sync> user.created").count(), 3, "{stdout}");
    assert_eq!(stdout.matches("sync> user.updated").count(), 2, "{stdout}");
    assert_eq!(stdout.matches("sync> user.deleted").count(), 1, "{stdout}");
    assert!(stdout.contains("-> cus_"), "{stdout}");
    assert!(
        stdout.contains("3 sign-ups in Clerk made 3 records in the fake Stripe API; 2 live for Clerk's 2 live users"),
        "{stdout}"
    );
    assert!(
        stdout.contains("the fake Clerk received 5 API requests, all 5 of them the demo's own"),
        "{stdout}"
    );
    let port = stdout.lines().find_map(port_from).expect("port in output");
    assert_gone(port, tmp.path());
}
