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
