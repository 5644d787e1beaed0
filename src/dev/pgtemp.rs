//! Throw-away PostgreSQL clusters started from the locally installed server
//! binaries, for `usersync demo`, the integration tests (one shared cluster
//! per test binary, a database per test) and the benchmarks.
//!
//! This module owns the whole life of such a cluster: finding the binaries,
//! `initdb` into a fresh temporary directory, choosing a free port, running
//! the server as the `postgres` OS user when we are root, starting,
//! crash-restarting and stopping it, and removing every trace of it again,
//! also when the owning process dies without running `Drop` (a test binary's
//! cluster kept in a `static`, a SIGKILLed demo): a small detached watchdog
//! shell notices the owner's death and cleans up.
//!
//! Everything here is synchronous and std-only so that it can be called from
//! plain tests and from inside a tokio runtime alike; each call is short.

use std::ffi::OsString;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::net::{Ipv4Addr, TcpListener};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

const HOST: &str = "127.0.0.1";
const SUPERUSER: &str = "postgres";
const BINDIR_ENV: &str = "USERSYNC_PG_BINDIR";
const VERSIONS_ROOT: &str = "/usr/lib/postgresql";
/// Passed to `pg_ctl -t`; also bounds our own wait for readiness.
const START_TIMEOUT_SECS: u64 = 60;
/// Another process can grab the port between our probe and the server's bind.
const PORT_ATTEMPTS: usize = 5;
/// Our settings live in their own file, included from postgresql.conf, so a
/// retry on another port can simply rewrite it.
const CONF_FILE: &str = "usersync.conf";
const LOG_FILE: &str = "log";
const PID_FILE: &str = "postmaster.pid";

#[derive(Debug, thiserror::Error)]
pub enum PgTempError {
    #[error(
        "PostgreSQL server binaries not found ({detail}); install postgresql, \
         e.g. `apt-get install postgresql`, or put pg_config on PATH, \
         or set USERSYNC_PG_BINDIR to the directory holding initdb"
    )]
    BinariesNotFound { detail: String },
    #[error(
        "running as root, but there is no `postgres` OS user to run the server as \
         (initdb and postgres refuse to run as root); create one, \
         e.g. `useradd --system --user-group postgres`, or run as an unprivileged user"
    )]
    NoPostgresUser,
    #[error("initdb failed ({status}):\n{stderr_tail}")]
    Initdb { status: String, stderr_tail: String },
    #[error(
        "PostgreSQL failed to start on port {port} ({status}): {output}\n\
         --- server log tail ---\n{log_tail}"
    )]
    Start {
        port: u16,
        status: String,
        output: String,
        log_tail: String,
    },
    #[error(
        "timed out after {waited:?} waiting for PostgreSQL on port {port} to accept connections\n\
         --- server log tail ---\n{log_tail}"
    )]
    Timeout {
        port: u16,
        waited: Duration,
        log_tail: String,
    },
    #[error("psql on database {dbname:?} failed ({status}): {stderr}")]
    Psql {
        dbname: String,
        status: String,
        stderr: String,
    },
    #[error("{what} failed ({status}): {output}")]
    Command {
        what: String,
        status: String,
        output: String,
    },
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: io::Error,
    },
}

fn io_err(context: impl Into<String>) -> impl FnOnce(io::Error) -> PgTempError {
    let context = context.into();
    move |source| PgTempError::Io { context, source }
}

#[derive(Debug, Clone, Default)]
pub struct TempClusterOptions {
    /// Off by default: the data is thrown away, and fsync makes tests slow.
    pub fsync: bool,
    /// Extra postgresql.conf lines, applied after ours so they can override them.
    pub extra_conf: Vec<String>,
    /// A fixed port; `None` picks a free one (and retries if it gets taken).
    pub port: Option<u16>,
    /// The server binaries to use; `None` looks them up as [`find_bin_dir`]
    /// does (`USERSYNC_PG_BINDIR` first).
    pub bin_dir: Option<PathBuf>,
}

/// The OS identity the server runs as when we are root.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct RunAs {
    uid: u32,
    gid: u32,
}

#[derive(Debug)]
pub struct TempCluster {
    /// `None` only while dropping.
    dir: Option<tempfile::TempDir>,
    /// The temp dir itself: data directory, socket directory and log in one.
    data_dir: PathBuf,
    bin_dir: PathBuf,
    /// The server's major version (`PG_VERSION` of the new cluster).
    major_version: u32,
    port: u16,
    run_as: Option<RunAs>,
    watchdog: Option<Child>,
}

impl TempCluster {
    pub fn start(opts: TempClusterOptions) -> Result<TempCluster, PgTempError> {
        Self::start_with_ports(opts, &mut free_port)
    }

    /// `next_port` is a parameter so the port-collision retry can be tested.
    fn start_with_ports(
        opts: TempClusterOptions,
        next_port: &mut dyn FnMut() -> io::Result<u16>,
    ) -> Result<TempCluster, PgTempError> {
        let bin_dir = match &opts.bin_dir {
            Some(dir) => {
                find_bin_dir_with(Some(dir.clone().into_os_string()), Path::new(VERSIONS_ROOT))?
            }
            None => find_bin_dir()?,
        };
        let run_as = server_user()?;
        let base = choose_base_dir(run_as)?;
        let dir = tempfile::Builder::new()
            .prefix("usersync-pg-")
            .tempdir_in(&base)
            .map_err(io_err(format!("creating a temp dir in {}", base.display())))?;
        let data_dir = dir.path().to_path_buf();
        if let Some(user) = run_as {
            chown(&data_dir, user)?;
        }
        // From here on an early return drops `cluster`, which stops whatever
        // got started and removes the directory.
        let mut cluster = TempCluster {
            dir: Some(dir),
            data_dir,
            bin_dir,
            major_version: 0,
            port: 0,
            run_as,
            watchdog: None,
        };
        // Before initdb, so that even a death during start leaves nothing.
        cluster.watchdog = Some(spawn_watchdog(&cluster.data_dir)?);
        cluster.initdb()?;
        cluster.major_version = cluster.read_major_version()?;
        cluster.include_our_conf()?;

        let mut attempt = 0;
        loop {
            attempt += 1;
            cluster.port = match opts.port {
                Some(port) => port,
                None => next_port().map_err(io_err("finding a free TCP port"))?,
            };
            cluster.write_conf(&opts)?;
            let log_offset = fs::metadata(cluster.log_path()).map_or(0, |m| m.len());
            match cluster.pg_ctl_start() {
                Ok(()) => break,
                Err(err) => {
                    let retry = opts.port.is_none()
                        && attempt < PORT_ATTEMPTS
                        && read_from(&cluster.log_path(), log_offset)
                            .contains("Address already in use");
                    if !retry {
                        return Err(err);
                    }
                    tracing::debug!(port = cluster.port, "port taken meanwhile, retrying");
                    cluster.stop_server()?;
                }
            }
        }
        cluster.wait_ready()?;
        tracing::debug!(
            port = cluster.port,
            dir = %cluster.data_dir.display(),
            "temporary PostgreSQL cluster started"
        );
        Ok(cluster)
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    pub fn host(&self) -> &str {
        HOST
    }

    pub fn socket_dir(&self) -> &Path {
        &self.data_dir
    }

    pub fn bin_dir(&self) -> &Path {
        &self.bin_dir
    }

    /// The server's major version, e.g. 14 or 18.
    pub fn major_version(&self) -> u32 {
        self.major_version
    }

    pub fn url(&self, dbname: &str) -> String {
        format!(
            "postgres://{SUPERUSER}@{HOST}:{}/{}",
            self.port,
            percent_encode(dbname)
        )
    }

    pub fn create_database(&self, name: &str) -> Result<(), PgTempError> {
        let sql = format!("CREATE DATABASE {}", quote_ident(name));
        let out = run(self.psql_command("postgres").arg("-c").arg(sql), "psql")?;
        if !out.status.success() {
            return Err(PgTempError::Psql {
                dbname: "postgres".into(),
                status: out.status.to_string(),
                stderr: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
            });
        }
        Ok(())
    }

    /// Runs `sql` (any number of statements, fed on stdin so each runs on its
    /// own and the first error stops the script) and returns psql's stdout:
    /// unaligned rows, `|`-separated, one per line, without headers, footers
    /// or command tags.
    pub fn psql(&self, dbname: &str, sql: &str) -> Result<String, PgTempError> {
        let mut child = self
            .psql_command(dbname)
            .args(["-f", "-"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(io_err("running psql"))?;
        let stdin = child.stdin.take();
        // Writing from another thread keeps a large script and a large result
        // from deadlocking on two full pipes.
        let out = std::thread::scope(|scope| {
            scope.spawn(move || {
                if let Some(mut stdin) = stdin {
                    // psql stopping early (ON_ERROR_STOP) closes the pipe; its
                    // exit status reports that, not this write.
                    let _ = stdin.write_all(sql.as_bytes());
                }
            });
            child.wait_with_output()
        })
        .map_err(io_err("running psql"))?;
        if !out.status.success() {
            return Err(PgTempError::Psql {
                dbname: dbname.into(),
                status: out.status.to_string(),
                stderr: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
            });
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// Simulates a server crash and waits until the server accepts
    /// connections again. `synchronous_commit` stays on, so a commit that
    /// returned survives it (fsync off only matters for an OS crash).
    pub fn restart_immediate(&self) -> Result<(), PgTempError> {
        let timeout = START_TIMEOUT_SECS.to_string();
        let out = run(
            self.pg_ctl()
                .args(["-w", "-t", &timeout, "-m", "immediate", "restart"]),
            "pg_ctl restart",
        )?;
        if !out.status.success() {
            return Err(self.start_error(&out));
        }
        self.wait_ready()
    }

    /// Stops the server (immediately: the data is thrown away anyway). The
    /// directory stays until drop. Calling it again does nothing.
    pub fn stop(&mut self) -> Result<(), PgTempError> {
        self.stop_server()
    }

    /// Stops the server the way a crash does (`-m immediate`) and leaves it
    /// down; the directory stays until drop.
    pub fn crash(&self) -> Result<(), PgTempError> {
        self.stop_server()
    }

    /// Promotes a standby (`pg_ctl promote`, waiting until it is a
    /// primary that accepts writes).
    pub fn promote(&self) -> Result<(), PgTempError> {
        let timeout = START_TIMEOUT_SECS.to_string();
        let out = run(
            self.pg_ctl().args(["-w", "-t", &timeout, "promote"]),
            "pg_ctl promote",
        )?;
        if !out.status.success() {
            return Err(PgTempError::Command {
                what: "pg_ctl promote".into(),
                status: out.status.to_string(),
                output: format!(
                    "{}{}\n--- server log tail ---\n{}",
                    String::from_utf8_lossy(&out.stdout),
                    String::from_utf8_lossy(&out.stderr),
                    self.log_tail(30)
                ),
            });
        }
        Ok(())
    }

    /// A physical standby of this cluster, for failover tests, made without
    /// `pg_basebackup` (the packaged servers of other versions lack it): the
    /// server is stopped cleanly, its data directory copied (without
    /// replication slots, sockets and the pid file, as a base backup leaves
    /// them out), and started again; the copy starts with `standby.signal`,
    /// streaming from this server through `primary_conninfo` (connecting to
    /// database `conninfo_dbname`) and the lines of `extra_conf`.
    pub fn start_standby(
        &self,
        conninfo_dbname: &str,
        extra_conf: &[String],
    ) -> Result<TempCluster, PgTempError> {
        let out = run(
            self.pg_ctl().args(["-w", "-t", "60", "-m", "fast", "stop"]),
            "pg_ctl stop",
        )?;
        if !out.status.success() {
            return Err(PgTempError::Command {
                what: "pg_ctl stop".into(),
                status: out.status.to_string(),
                output: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
            });
        }
        let base = choose_base_dir(self.run_as)?;
        let dir = tempfile::Builder::new()
            .prefix("usersync-pg-")
            .tempdir_in(&base)
            .map_err(io_err(format!("creating a temp dir in {}", base.display())))?;
        let data_dir = dir.path().to_path_buf();
        if let Some(user) = self.run_as {
            chown(&data_dir, user)?;
        }
        // What initdb would have set: the server refuses anything wider.
        {
            use std::os::unix::fs::PermissionsExt;
            fs::set_permissions(&data_dir, fs::Permissions::from_mode(0o700))
                .map_err(io_err(format!("chmod {}", data_dir.display())))?;
        }
        let copied = copy_data_dir(&self.data_dir, &data_dir, self.run_as);
        // The primary comes back whatever happened to the copy.
        self.pg_ctl_start()?;
        self.wait_ready()?;
        copied?;
        let mut standby = TempCluster {
            dir: Some(dir),
            data_dir,
            bin_dir: self.bin_dir.clone(),
            major_version: self.major_version,
            port: 0,
            run_as: self.run_as,
            watchdog: None,
        };
        standby.watchdog = Some(spawn_watchdog(&standby.data_dir)?);
        let signal = standby.data_dir.join("standby.signal");
        fs::write(&signal, "").map_err(io_err(format!("writing {}", signal.display())))?;
        if let Some(user) = self.run_as {
            chown(&signal, user)?;
        }
        let mut conf = vec![format!(
            "primary_conninfo = 'host={HOST} port={} user={SUPERUSER} dbname={} application_name=usersync_standby'",
            self.port,
            conninfo_dbname.replace('\\', "\\\\").replace('\'', "\\'")
        )];
        conf.extend(extra_conf.iter().cloned());
        let opts = TempClusterOptions {
            extra_conf: conf,
            ..TempClusterOptions::default()
        };
        standby.port = free_port().map_err(io_err("finding a free TCP port"))?;
        standby.write_conf(&opts)?;
        standby.pg_ctl_start()?;
        standby.wait_ready()?;
        Ok(standby)
    }

    pub fn log_tail(&self, lines: usize) -> String {
        tail_lines(&read_tail(&self.log_path()), lines)
    }

    fn log_path(&self) -> PathBuf {
        self.data_dir.join(LOG_FILE)
    }

    /// A command for a server-side binary: as the `postgres` user when we are
    /// root, from inside the cluster dir because our own working directory
    /// may not be accessible to that user.
    fn server_command(&self, program: &str) -> Command {
        let mut cmd = client_command(&self.bin_dir, program);
        if let Some(user) = self.run_as {
            cmd.uid(user.uid).gid(user.gid);
        }
        cmd.current_dir(&self.data_dir);
        // Its own process group: a Ctrl-C at the terminal must reach usersync,
        // which then drains and stops the server, not the server first.
        cmd.process_group(0);
        cmd
    }

    fn pg_ctl(&self) -> Command {
        let mut cmd = self.server_command("pg_ctl");
        cmd.arg("-D")
            .arg(&self.data_dir)
            .arg("-l")
            .arg(self.log_path());
        cmd
    }

    fn psql_command(&self, dbname: &str) -> Command {
        let mut cmd = client_command(&self.bin_dir, "psql");
        cmd.args(["-X", "-A", "-t", "-q", "-v", "ON_ERROR_STOP=1", "-h", HOST])
            .arg("-p")
            .arg(self.port.to_string())
            .args(["-U", SUPERUSER, "-d"])
            // As a conninfo string, so a database name containing `=` is not
            // itself taken for one.
            .arg(format!("dbname={}", conninfo_quote(dbname)));
        cmd
    }

    fn initdb(&self) -> Result<(), PgTempError> {
        let out = run(
            self.server_command("initdb")
                .arg("-D")
                .arg(&self.data_dir)
                .args(["-U", SUPERUSER, "--auth=trust", "-E", "UTF8", "--locale=C"])
                // The cluster is thrown away; syncing it costs seconds per start.
                .arg("--no-sync"),
            "initdb",
        )?;
        if !out.status.success() {
            let mut text = String::from_utf8_lossy(&out.stdout).into_owned();
            text.push_str(&String::from_utf8_lossy(&out.stderr));
            return Err(PgTempError::Initdb {
                status: out.status.to_string(),
                stderr_tail: tail_lines(&text, 20),
            });
        }
        Ok(())
    }

    /// initdb writes the major version ("14", "9.6") to `PG_VERSION`.
    fn read_major_version(&self) -> Result<u32, PgTempError> {
        let path = self.data_dir.join("PG_VERSION");
        let text =
            fs::read_to_string(&path).map_err(io_err(format!("reading {}", path.display())))?;
        parse_version(text.trim())
            .and_then(|v| v.first().copied())
            .ok_or_else(|| PgTempError::Command {
                what: "initdb".into(),
                status: "wrote an unreadable PG_VERSION".into(),
                output: text.trim().to_owned(),
            })
    }

    fn include_our_conf(&self) -> Result<(), PgTempError> {
        let path = self.data_dir.join("postgresql.conf");
        let mut file = OpenOptions::new()
            .append(true)
            .open(&path)
            .map_err(io_err(format!("opening {}", path.display())))?;
        writeln!(file, "\ninclude = '{CONF_FILE}'")
            .map_err(io_err(format!("writing {}", path.display())))
    }

    fn write_conf(&self, opts: &TempClusterOptions) -> Result<(), PgTempError> {
        let onoff = |b: bool| if b { "on" } else { "off" };
        let mut conf = format!(
            "# Written by usersync's pgtemp on every start attempt.\n\
             listen_addresses = '{HOST}'\n\
             port = {port}\n\
             unix_socket_directories = '{socket_dir}'\n\
             wal_level = logical\n\
             max_replication_slots = 400\n\
             max_wal_senders = 100\n\
             max_connections = 300\n\
             fsync = {fsync}\n",
            port = self.port,
            socket_dir = self.data_dir.display(),
            fsync = onoff(opts.fsync),
        );
        conf.push_str(
            "shared_buffers = 64MB\n\
             logging_collector = off\n\
             wal_sender_timeout = '60s'\n\
             max_slot_wal_keep_size = -1\n",
        );
        if self.major_version >= 18 {
            // From 18 on, replication origins have their own limit (default
            // 10) instead of sharing max_replication_slots. Every origin that
            // has recorded progress holds one of these until it is dropped,
            // and every test database has its own origin: with the default,
            // the 11th daemon's write-back fails ("could not find free
            // replication state slot for replication origin"). 400, like
            // the slots: the tests share one cluster, a slot and an origin
            // per test database.
            conf.push_str("max_active_replication_origins = 400\n");
        }
        for line in &opts.extra_conf {
            conf.push_str(line);
            conf.push('\n');
        }
        let path = self.data_dir.join(CONF_FILE);
        fs::write(&path, conf).map_err(io_err(format!("writing {}", path.display())))?;
        if let Some(user) = self.run_as {
            chown(&path, user)?;
        }
        Ok(())
    }

    fn pg_ctl_start(&self) -> Result<(), PgTempError> {
        let timeout = START_TIMEOUT_SECS.to_string();
        let out = run(
            self.pg_ctl().args(["-w", "-t", &timeout, "start"]),
            "pg_ctl start",
        )?;
        if out.status.success() {
            Ok(())
        } else {
            Err(self.start_error(&out))
        }
    }

    fn start_error(&self, out: &Output) -> PgTempError {
        let mut output = String::from_utf8_lossy(&out.stdout).into_owned();
        output.push_str(&String::from_utf8_lossy(&out.stderr));
        let log_tail = self.log_tail(30);
        if output.contains("did not start in time") {
            PgTempError::Timeout {
                port: self.port,
                waited: Duration::from_secs(START_TIMEOUT_SECS),
                log_tail,
            }
        } else {
            PgTempError::Start {
                port: self.port,
                status: out.status.to_string(),
                output: output.trim().to_owned(),
                log_tail,
            }
        }
    }

    /// `pg_ctl -w` already waits for the postmaster to report ready; this
    /// also proves that a client gets through over TCP.
    fn wait_ready(&self) -> Result<(), PgTempError> {
        let started = Instant::now();
        let limit = Duration::from_secs(START_TIMEOUT_SECS);
        loop {
            let out = run(
                client_command(&self.bin_dir, "pg_isready")
                    .args([
                        "-q", "-h", HOST, "-t", "2", "-U", SUPERUSER, "-d", "postgres",
                    ])
                    .arg("-p")
                    .arg(self.port.to_string()),
                "pg_isready",
            )?;
            match out.status.code() {
                Some(0) => return Ok(()),
                // 1: rejecting (still starting), 2: no response; 3 is a usage error.
                Some(1) | Some(2) => {}
                _ => {
                    return Err(PgTempError::Command {
                        what: "pg_isready".into(),
                        status: out.status.to_string(),
                        output: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
                    })
                }
            }
            if started.elapsed() >= limit {
                return Err(PgTempError::Timeout {
                    port: self.port,
                    waited: started.elapsed(),
                    log_tail: self.log_tail(30),
                });
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn stop_server(&self) -> Result<(), PgTempError> {
        let pid_file = self.data_dir.join(PID_FILE);
        if !pid_file.exists() {
            return Ok(());
        }
        let out = run(
            self.pg_ctl()
                .args(["-w", "-t", "60", "-m", "immediate", "stop"]),
            "pg_ctl stop",
        )?;
        if out.status.success() {
            return Ok(());
        }
        // pg_ctl also fails when the pid file is stale or vanished meanwhile,
        // which for a stop is success; only a live postmaster is a failure.
        match read_postmaster_pid(&pid_file) {
            Some(pid) if process_alive(pid) => {
                // SAFETY: plain syscall; `pid` is a positive pid read from the
                // pid file of our own cluster.
                unsafe { libc::kill(pid, libc::SIGKILL) };
                let mut output = String::from_utf8_lossy(&out.stdout).into_owned();
                output.push_str(&String::from_utf8_lossy(&out.stderr));
                Err(PgTempError::Command {
                    what: "pg_ctl stop".into(),
                    status: out.status.to_string(),
                    output: format!("{} (postmaster {pid} was SIGKILLed)", output.trim()),
                })
            }
            _ => Ok(()),
        }
    }
}

impl Drop for TempCluster {
    fn drop(&mut self) {
        if let Err(err) = self.stop_server() {
            tracing::warn!(%err, "stopping the temporary PostgreSQL cluster");
        }
        if let Some(dir) = self.dir.take() {
            let path = dir.path().to_path_buf();
            if let Err(first) = dir.close() {
                // Exiting server processes may still be removing files.
                std::thread::sleep(Duration::from_millis(200));
                match fs::remove_dir_all(&path) {
                    Ok(()) => {}
                    Err(err) if err.kind() == io::ErrorKind::NotFound => {}
                    Err(err) => tracing::warn!(
                        %first, %err, dir = %path.display(),
                        "removing the temporary PostgreSQL cluster directory"
                    ),
                }
            }
        }
        // Last, so that there is no moment in which we could die leaving the
        // directory without anyone to remove it.
        if let Some(mut watchdog) = self.watchdog.take() {
            if let Ok(pid) = i32::try_from(watchdog.id()) {
                // SAFETY: plain syscall. The watchdog leads its own process
                // group (pgid == its pid), and as we have not reaped it yet
                // that id cannot have been reused; the group also holds its
                // `sleep`.
                unsafe { libc::kill(-pid, libc::SIGKILL) };
            }
            let _ = watchdog.wait();
        }
    }
}

/// `$USERSYNC_PG_BINDIR`, then `pg_config --bindir` if it has initdb, then
/// the highest `/usr/lib/postgresql/*/bin` (Debian's layout).
pub fn find_bin_dir() -> Result<PathBuf, PgTempError> {
    find_bin_dir_with(std::env::var_os(BINDIR_ENV), Path::new(VERSIONS_ROOT))
}

fn find_bin_dir_with(
    env_value: Option<OsString>,
    versions_root: &Path,
) -> Result<PathBuf, PgTempError> {
    if let Some(dir) = env_value.filter(|v| !v.is_empty()) {
        let dir = PathBuf::from(dir);
        if has_initdb(&dir) {
            return Ok(dir);
        }
        // An explicit choice that does not work is a configuration mistake
        // to report, not to paper over with some other installation.
        return Err(PgTempError::BinariesNotFound {
            detail: format!("{BINDIR_ENV}={} has no initdb", dir.display()),
        });
    }
    let mut tried = Vec::new();
    match Command::new("pg_config")
        .arg("--bindir")
        .stdin(Stdio::null())
        .output()
    {
        Ok(out) if out.status.success() => {
            let dir = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
            if has_initdb(&dir) {
                return Ok(dir);
            }
            // Client-only installs ship pg_config without the server.
            tried.push(format!(
                "`pg_config --bindir` is {}, which has no initdb",
                dir.display()
            ));
        }
        Ok(out) => tried.push(format!("`pg_config --bindir` failed ({})", out.status)),
        Err(err) => tried.push(format!("no pg_config on PATH ({err})")),
    }
    let mut best: Option<(Vec<u32>, PathBuf)> = None;
    if let Ok(entries) = fs::read_dir(versions_root) {
        for entry in entries.flatten() {
            let Some(version) = parse_version(&entry.file_name().to_string_lossy()) else {
                continue;
            };
            let bin = entry.path().join("bin");
            if has_initdb(&bin) && best.as_ref().is_none_or(|(v, _)| version > *v) {
                best = Some((version, bin));
            }
        }
    }
    if let Some((_, bin)) = best {
        return Ok(bin);
    }
    tried.push(format!("no {}/*/bin/initdb", versions_root.display()));
    Err(PgTempError::BinariesNotFound {
        detail: tried.join("; "),
    })
}

fn has_initdb(dir: &Path) -> bool {
    dir.join("initdb").is_file()
}

/// "15" or "9.6"; other names (e.g. "common") are not versions.
fn parse_version(name: &str) -> Option<Vec<u32>> {
    name.split('.').map(|part| part.parse().ok()).collect()
}

fn free_port() -> io::Result<u16> {
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))?;
    Ok(listener.local_addr()?.port())
}

/// `None` when the server can run as ourselves; the `postgres` user when we
/// are root, because initdb and postgres refuse to run as root.
fn server_user() -> Result<Option<RunAs>, PgTempError> {
    // SAFETY: geteuid has no preconditions and cannot fail.
    if unsafe { libc::geteuid() } != 0 {
        return Ok(None);
    }
    match lookup_user(SUPERUSER)? {
        Some(user) => Ok(Some(user)),
        None => Err(PgTempError::NoPostgresUser),
    }
}

fn lookup_user(name: &str) -> Result<Option<RunAs>, PgTempError> {
    let context = || format!("looking up the {name:?} OS user");
    let cname = std::ffi::CString::new(name)
        .map_err(|e| io_err(context())(io::Error::new(io::ErrorKind::InvalidInput, e)))?;
    let mut buf: Vec<libc::c_char> = vec![0; 4096];
    loop {
        // SAFETY: an all-zero passwd (null pointers, zero ids) is a valid
        // value; getpwnam_r only writes into it.
        let mut pwd: libc::passwd = unsafe { std::mem::zeroed() };
        let mut result: *mut libc::passwd = std::ptr::null_mut();
        // SAFETY: every pointer is valid for the duration of the call and
        // `buf.len()` is the real size of `buf`. getpwnam_r (unlike
        // getpwnam) touches no shared static state.
        let rc = unsafe {
            libc::getpwnam_r(
                cname.as_ptr(),
                &mut pwd,
                buf.as_mut_ptr(),
                buf.len(),
                &mut result,
            )
        };
        if rc == libc::ERANGE && buf.len() < (1 << 20) {
            buf.resize(buf.len() * 2, 0);
            continue;
        }
        if rc != 0 {
            return Err(io_err(context())(io::Error::from_raw_os_error(rc)));
        }
        return Ok((!result.is_null()).then_some(RunAs {
            uid: pwd.pw_uid,
            gid: pwd.pw_gid,
        }));
    }
}

fn chown(path: &Path, user: RunAs) -> Result<(), PgTempError> {
    std::os::unix::fs::chown(path, Some(user.uid), Some(user.gid))
        .map_err(io_err(format!("chown {}", path.display())))
}

/// `$TMPDIR` if it suits, else `/tmp`. It must be reachable by the server's
/// user, and plain and short: the path goes into postgresql.conf as the
/// socket directory, and socket paths are limited to 107 bytes.
fn choose_base_dir(run_as: Option<RunAs>) -> Result<PathBuf, PgTempError> {
    let candidates = [std::env::temp_dir(), PathBuf::from("/tmp")];
    for base in &candidates {
        let Ok(base) = base.canonicalize() else {
            continue;
        };
        if base_dir_usable(&base, run_as) {
            return Ok(base);
        }
        tracing::debug!(base = %base.display(), "unsuitable for a temporary cluster");
    }
    Err(io_err(format!(
        "no temp dir for the cluster: $TMPDIR and /tmp must be directories \
         with a plain path of at most 60 bytes{}",
        if run_as.is_some() {
            ", traversable (o+x) all the way down by the postgres user"
        } else {
            ""
        }
    ))(io::Error::from(io::ErrorKind::PermissionDenied)))
}

fn base_dir_usable(base: &Path, run_as: Option<RunAs>) -> bool {
    let bytes = base.as_os_str().as_bytes();
    let plain = bytes
        .iter()
        .all(|b| b.is_ascii_alphanumeric() || b"/._-+".contains(b));
    if !base.is_absolute() || bytes.len() > 60 || !plain || !base.is_dir() {
        return false;
    }
    match run_as {
        None => true,
        Some(user) => base.ancestors().all(|dir| traversable_by(dir, user)),
    }
}

/// Conservative: supplementary groups are not considered.
fn traversable_by(dir: &Path, user: RunAs) -> bool {
    let Ok(meta) = fs::metadata(dir) else {
        return false;
    };
    let mode = meta.mode();
    if meta.uid() == user.uid {
        mode & 0o100 != 0
    } else if meta.gid() == user.gid {
        mode & 0o010 != 0
    } else {
        mode & 0o001 != 0
    }
}

/// Runs as the owner (so `kill -0` on it works, and root may delete anything)
/// with the owner's pid and the cluster dir as `$1` and `$2`. The owner
/// counts as gone once it no longer exists or is a zombie. Once the owner
/// is gone it shuts the postmaster down the way `pg_ctl stop -m immediate`
/// does (SIGQUIT; pg_ctl itself refuses to run as root), escalating to
/// SIGKILL after 5 s, then removes the directory.
const WATCHDOG_SCRIPT: &str = r#"
alive() {
    kill -0 "$1" 2>/dev/null || return 1
    # A zombie still passes kill -0, and one whose new parent reaps slowly
    # would hold the cleanup up. The state follows the last ')' in stat.
    stat=
    { read -r stat < "/proc/$1/stat"; } 2>/dev/null
    state=${stat##*") "}
    [ "${state%% *}" != Z ]
}
while alive "$1"; do sleep 0.5; done
n=0
while [ -f "$2/postmaster.pid" ] && [ "$n" -lt 40 ]; do
    pid=$(head -n 1 "$2/postmaster.pid" 2>/dev/null)
    case "$pid" in
        ''|*[!0-9]*) ;;
        *)
            if [ "$n" -lt 20 ]; then sig=QUIT; else sig=KILL; fi
            kill -s "$sig" "$pid" 2>/dev/null || break
            ;;
    esac
    sleep 0.25
    n=$((n + 1))
done
rm -rf "$2"
"#;

/// Copies a stopped cluster's data directory: regular files and
/// directories only (no sockets), without the pid file, the server log and
/// the contents of `pg_replslot` (a standby must not start with the
/// primary's slots: the slot sync worker refuses a same-named slot it did
/// not create).
fn copy_data_dir(from: &Path, to: &Path, run_as: Option<RunAs>) -> Result<(), PgTempError> {
    use std::os::unix::fs::PermissionsExt;
    for entry in fs::read_dir(from).map_err(io_err(format!("reading {}", from.display())))? {
        let entry = entry.map_err(io_err(format!("reading {}", from.display())))?;
        let name = entry.file_name();
        if [PID_FILE, LOG_FILE, "postmaster.opts", "standby.signal"]
            .iter()
            .any(|n| name.as_bytes() == n.as_bytes())
        {
            continue;
        }
        let source = entry.path();
        let target = to.join(&name);
        let kind = entry
            .file_type()
            .map_err(io_err(format!("reading {}", source.display())))?;
        if kind.is_dir() {
            fs::create_dir(&target).map_err(io_err(format!("creating {}", target.display())))?;
            fs::set_permissions(&target, fs::Permissions::from_mode(0o700))
                .map_err(io_err(format!("chmod {}", target.display())))?;
            if name.as_bytes() != b"pg_replslot" {
                copy_data_dir(&source, &target, run_as)?;
            }
        } else if kind.is_file() {
            fs::copy(&source, &target).map_err(io_err(format!("copying {}", source.display())))?;
        } else {
            continue;
        }
        if let Some(user) = run_as {
            chown(&target, user)?;
        }
    }
    Ok(())
}

fn spawn_watchdog(dir: &Path) -> Result<Child, PgTempError> {
    Command::new("/bin/sh")
        .arg("-c")
        .arg(WATCHDOG_SCRIPT)
        .arg("usersync-pgtemp-watchdog")
        .arg(std::process::id().to_string())
        .arg(dir)
        .stdin(Stdio::null())
        // Must not hold a caller's pipes open: whoever reads our output to
        // EOF would otherwise wait for the watchdog too.
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .current_dir("/")
        // Its own process group, so a Ctrl-C to the terminal does not kill
        // it together with us before it has done its job.
        .process_group(0)
        .spawn()
        .map_err(io_err("spawning the cleanup watchdog (/bin/sh)"))
}

/// A command for a PostgreSQL binary with an environment that cannot steer
/// it elsewhere (PGHOST, PGDATA, PGOPTIONS, ... are dropped).
fn client_command(bin_dir: &Path, program: &str) -> Command {
    let mut cmd = Command::new(bin_dir.join(program));
    for (key, _) in std::env::vars_os() {
        if key.as_bytes().starts_with(b"PG") {
            cmd.env_remove(key);
        }
    }
    // English messages, which `start` inspects.
    cmd.env("LC_ALL", "C")
        .env("PGCLIENTENCODING", "UTF8")
        .env("PGCONNECT_TIMEOUT", "10")
        .stdin(Stdio::null());
    cmd
}

fn run(cmd: &mut Command, what: &str) -> Result<Output, PgTempError> {
    cmd.stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .output()
        .map_err(io_err(format!("running {what} ({:?})", cmd.get_program())))
}

fn read_postmaster_pid(pid_file: &Path) -> Option<i32> {
    let text = fs::read_to_string(pid_file).ok()?;
    let pid: i32 = text.lines().next()?.trim().parse().ok()?;
    (pid > 0).then_some(pid)
}

fn process_alive(pid: i32) -> bool {
    // SAFETY: signal 0 only checks for existence and permission.
    let rc = unsafe { libc::kill(pid, 0) };
    rc == 0 || io::Error::last_os_error().raw_os_error() == Some(libc::EPERM)
}

/// At most the last 256 KiB: the log of a long demo can grow large.
fn read_tail(path: &Path) -> String {
    read_from(
        path,
        fs::metadata(path).map_or(0, |m| m.len().saturating_sub(256 * 1024)),
    )
}

fn read_from(path: &Path, offset: u64) -> String {
    let mut buf = Vec::new();
    let read = File::open(path).and_then(|mut file| {
        file.seek(SeekFrom::Start(offset))?;
        file.read_to_end(&mut buf)
    });
    match read {
        Ok(_) => String::from_utf8_lossy(&buf).into_owned(),
        Err(_) => String::new(),
    }
}

fn tail_lines(text: &str, lines: usize) -> String {
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

fn quote_ident(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

fn conninfo_quote(value: &str) -> String {
    format!("'{}'", value.replace('\\', "\\\\").replace('\'', "\\'"))
}

fn percent_encode(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for byte in text.bytes() {
        if byte.is_ascii_alphanumeric() || b"-._~".contains(&byte) {
            out.push(char::from(byte));
        } else {
            out.push_str(&format!("%{byte:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::error::Error;
    use std::io::{BufRead, BufReader};
    use std::net::{SocketAddr, TcpStream};

    type TestResult = Result<(), Box<dyn Error>>;

    async fn connect(url: &str) -> Result<tokio_postgres::Client, Box<dyn Error>> {
        let (client, connection) = tokio_postgres::connect(url, tokio_postgres::NoTls).await?;
        tokio::spawn(async move {
            let _ = connection.await;
        });
        Ok(client)
    }

    fn port_accepts(port: u16) -> bool {
        let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
        TcpStream::connect_timeout(&addr, Duration::from_millis(500)).is_ok()
    }

    /// Pids of processes whose command line mentions `needle`: the
    /// postmaster (`postgres -D <dir>`) and the watchdog both do.
    fn processes_mentioning(needle: &Path) -> Vec<u32> {
        let needle = needle.as_os_str().as_bytes();
        let Ok(entries) = fs::read_dir("/proc") else {
            return Vec::new();
        };
        entries
            .flatten()
            .filter_map(|entry| {
                let pid: u32 = entry.file_name().to_str()?.parse().ok()?;
                let cmdline = fs::read(entry.path().join("cmdline")).ok()?;
                cmdline
                    .windows(needle.len())
                    .any(|w| w == needle)
                    .then_some(pid)
            })
            .collect()
    }

    fn assert_gone(dir: &Path, port: u16, bin_dir: &Path, run_as: Option<RunAs>) {
        assert!(!dir.exists(), "{} still exists", dir.display());
        assert!(!port_accepts(port), "port {port} still accepts connections");
        let procs = processes_mentioning(dir);
        assert!(procs.is_empty(), "processes left behind: {procs:?}");
        let mut status = client_command(bin_dir, "pg_ctl");
        if let Some(user) = run_as {
            status.uid(user.uid).gid(user.gid);
        }
        let out = status
            .current_dir("/")
            .arg("-D")
            .arg(dir)
            .arg("status")
            .output();
        match out {
            Ok(out) => {
                assert!(!out.status.success(), "pg_ctl status says running");
                assert!(!String::from_utf8_lossy(&out.stdout).contains("server is running"));
            }
            Err(err) => panic!("pg_ctl status: {err}"),
        }
    }

    fn uid_of(pid: i32) -> Option<u32> {
        let status = fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
        let line = status.lines().find(|l| l.starts_with("Uid:"))?;
        line.split_whitespace().nth(2)?.parse().ok()
    }

    #[tokio::test]
    async fn starts_with_logical_wal_and_serves_databases() -> TestResult {
        let cluster = TempCluster::start(TempClusterOptions {
            extra_conf: vec!["work_mem = '7MB'".into()],
            ..Default::default()
        })?;
        assert_eq!(cluster.host(), "127.0.0.1");
        assert_eq!(cluster.socket_dir(), cluster.data_dir.as_path());
        assert!(cluster.bin_dir().join("pg_recvlogical").is_file());
        assert_eq!(
            cluster.url("postgres"),
            format!("postgres://postgres@127.0.0.1:{}/postgres", cluster.port())
        );
        assert!(cluster
            .socket_dir()
            .join(format!(".s.PGSQL.{}", cluster.port()))
            .exists());
        if let Some(user) = cluster.run_as {
            let pid = read_postmaster_pid(&cluster.data_dir.join(PID_FILE));
            assert_eq!(
                pid.and_then(uid_of),
                Some(user.uid),
                "server not run as postgres"
            );
        }

        let client = connect(&cluster.url("postgres")).await?;
        for (setting, expected) in [
            ("wal_level", "logical"),
            ("fsync", "off"),
            ("synchronous_commit", "on"),
            ("max_replication_slots", "400"),
            ("max_connections", "300"),
            ("work_mem", "7MB"),
        ] {
            let row = client.query_one(&format!("SHOW {setting}"), &[]).await?;
            assert_eq!(row.get::<_, String>(0), expected, "{setting}");
        }
        let row = client
            .query_one(
                "SELECT current_setting('server_version_num')::int / 10000",
                &[],
            )
            .await?;
        assert_eq!(
            i64::from(cluster.major_version()),
            i64::from(row.get::<_, i32>(0))
        );
        if cluster.major_version() >= 18 {
            let row = client
                .query_one("SHOW max_active_replication_origins", &[])
                .await?;
            assert_eq!(row.get::<_, String>(0), "400");
        }

        // A name that needs quoting everywhere: SQL identifier, URL, conninfo.
        let db = "t 1\"x=y'z";
        cluster.create_database(db)?;
        let client = connect(&cluster.url(db)).await?;
        let row = client.query_one("SELECT current_database()", &[]).await?;
        assert_eq!(row.get::<_, String>(0), db);
        let row = client
            .query_one(
                "SELECT lsn::text FROM pg_create_logical_replication_slot('s', 'pgoutput')",
                &[],
            )
            .await?;
        assert!(row.get::<_, String>(0).contains('/'));

        assert_eq!(
            cluster.psql(db, "CREATE TABLE t (a int, b text); INSERT INTO t VALUES (1, 'x'), (2, 'y'); SELECT * FROM t ORDER BY a")?,
            "1|x\n2|y\n"
        );
        assert_eq!(
            cluster.psql(db, "SELECT slot_name, plugin FROM pg_replication_slots")?,
            "s|pgoutput\n"
        );
        match cluster.psql(db, "SELECT 1; SELECT * FROM missing; SELECT 2") {
            Err(PgTempError::Psql { stderr, .. }) => assert!(stderr.contains("does not exist")),
            other => panic!("expected a psql error, got {other:?}"),
        }
        assert!(cluster.create_database(db).is_err(), "duplicate database");
        Ok(())
    }

    #[tokio::test]
    async fn restart_immediate_comes_back() -> TestResult {
        let cluster = TempCluster::start(TempClusterOptions::default())?;
        let old_pid = read_postmaster_pid(&cluster.data_dir.join(PID_FILE));
        cluster.psql(
            "postgres",
            "SET synchronous_commit = on; CREATE TABLE kept (a int); INSERT INTO kept VALUES (42)",
        )?;
        let client = connect(&cluster.url("postgres")).await?;
        cluster.restart_immediate()?;
        assert!(
            client.simple_query("SELECT 1").await.is_err(),
            "old connection survived"
        );
        assert_ne!(
            read_postmaster_pid(&cluster.data_dir.join(PID_FILE)),
            old_pid
        );
        let client = connect(&cluster.url("postgres")).await?;
        let row = client.query_one("SELECT a FROM kept", &[]).await?;
        assert_eq!(row.get::<_, i32>(0), 42);
        assert!(cluster
            .log_tail(200)
            .contains("database system was interrupted"));
        Ok(())
    }

    #[test]
    fn drop_leaves_nothing_behind() -> TestResult {
        let cluster = TempCluster::start(TempClusterOptions::default())?;
        let (dir, port, bin_dir, run_as) = (
            cluster.data_dir.clone(),
            cluster.port(),
            cluster.bin_dir().to_path_buf(),
            cluster.run_as,
        );
        let watchdog = cluster.watchdog.as_ref().map(Child::id);
        assert!(dir.join(PID_FILE).exists());
        assert!(port_accepts(port));
        assert!(!processes_mentioning(&dir).is_empty());
        drop(cluster);
        assert_gone(&dir, port, &bin_dir, run_as);
        if let Some(pid) = watchdog {
            assert!(
                !Path::new(&format!("/proc/{pid}")).exists(),
                "watchdog left"
            );
        }
        Ok(())
    }

    #[test]
    fn stop_is_idempotent() -> TestResult {
        let mut cluster = TempCluster::start(TempClusterOptions {
            fsync: true,
            ..Default::default()
        })?;
        assert_eq!(cluster.psql("postgres", "SHOW fsync")?, "on\n");
        assert_eq!(cluster.psql("postgres", "SHOW synchronous_commit")?, "on\n");
        cluster.stop()?;
        cluster.stop()?;
        assert!(!port_accepts(cluster.port()));
        assert!(cluster.psql("postgres", "SELECT 1").is_err());
        assert!(cluster.data_dir.exists(), "stop must keep the directory");
        let dir = cluster.data_dir.clone();
        drop(cluster);
        assert!(!dir.exists());
        Ok(())
    }

    #[test]
    fn retries_when_the_port_is_taken_meanwhile() -> TestResult {
        let blocker = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))?;
        let taken = blocker.local_addr()?.port();
        let mut offered = vec![taken].into_iter();
        let mut next = || offered.next().map_or_else(free_port, Ok);
        let cluster = TempCluster::start_with_ports(TempClusterOptions::default(), &mut next)?;
        assert_ne!(cluster.port(), taken);
        assert_eq!(cluster.psql("postgres", "SELECT 1")?, "1\n");
        assert!(cluster.log_tail(100).contains("Address already in use"));
        Ok(())
    }

    #[test]
    fn explicit_port_is_used_and_not_retried() -> TestResult {
        let port = free_port()?;
        let cluster = TempCluster::start(TempClusterOptions {
            port: Some(port),
            ..Default::default()
        })?;
        assert_eq!(cluster.port(), port);
        assert!(port_accepts(port));
        drop(cluster);

        let blocker = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))?;
        let taken = blocker.local_addr()?.port();
        match TempCluster::start(TempClusterOptions {
            port: Some(taken),
            ..Default::default()
        }) {
            Err(err @ PgTempError::Start { .. }) => {
                assert!(err.to_string().contains("Address already in use"), "{err}")
            }
            other => panic!("expected a start error, got {other:?}"),
        }
        Ok(())
    }

    #[test]
    fn bin_dir_lookup() -> TestResult {
        let found = find_bin_dir()?;
        assert!(found.join("initdb").is_file());

        let explicit = find_bin_dir_with(
            Some(found.clone().into_os_string()),
            Path::new("/nonexistent"),
        )?;
        assert_eq!(explicit, found);

        let err = find_bin_dir_with(Some("/nonexistent/bin".into()), Path::new(VERSIONS_ROOT))
            .err()
            .ok_or("a bin dir without initdb was accepted")?;
        let text = err.to_string();
        assert!(
            text.contains("USERSYNC_PG_BINDIR=/nonexistent/bin"),
            "{text}"
        );
        assert!(text.contains("apt-get install postgresql"), "{text}");

        assert_eq!(parse_version("15"), Some(vec![15]));
        assert_eq!(parse_version("9.6"), Some(vec![9, 6]));
        assert_eq!(parse_version("common"), None);
        assert!(parse_version("10") > parse_version("9.6"));
        Ok(())
    }

    #[test]
    fn quoting() {
        assert_eq!(quote_ident(r#"a"b"#), r#""a""b""#);
        assert_eq!(conninfo_quote(r"a'b\c"), r"'a\'b\\c'");
        assert_eq!(percent_encode("a b/é"), "a%20b%2F%C3%A9");
    }

    #[test]
    fn cluster_can_live_in_a_static() {
        fn shareable<T: Send + Sync>() {}
        shareable::<TempCluster>();
    }

    const ORPHAN_ENV: &str = "USERSYNC_PGTEMP_ORPHAN_CHILD";

    /// Not a test on its own: the body of the child process that the orphan
    /// tests re-exec this binary into.
    #[test]
    fn orphan_child() {
        if std::env::var_os(ORPHAN_ENV).is_none() {
            return;
        }
        let cluster = match TempCluster::start(TempClusterOptions::default()) {
            Ok(cluster) => cluster,
            Err(err) => {
                println!("\nORPHAN_ERROR={err}");
                std::process::exit(3);
            }
        };
        println!("\nORPHAN_DIR={}", cluster.data_dir.display());
        println!("\nORPHAN_PORT={}", cluster.port());
        let _ = io::stdout().flush();
        let mut line = String::new();
        let _ = io::stdin().read_line(&mut line);
        // Leaves without running Drop, like a process whose cluster lives
        // in a `static`.
        std::process::exit(0);
    }

    enum Death {
        Exit,
        Sigkill,
    }

    fn orphaned_cluster_is_removed(death: Death) -> TestResult {
        let test_path = module_path!().split_once("::").map_or("", |(_, rest)| rest);
        let mut child = Command::new(std::env::current_exe()?)
            .args(["--exact", &format!("{test_path}::orphan_child")])
            .args(["--nocapture", "--test-threads=1"])
            .env(ORPHAN_ENV, "1")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()?;
        let stdout = child.stdout.take().ok_or("no child stdout")?;
        let (mut dir, mut port) = (None, None);
        let mut seen = String::new();
        for line in BufReader::new(stdout).lines() {
            let line = line?;
            if let Some(v) = line.split_once("ORPHAN_DIR=").map(|(_, v)| v) {
                dir = Some(PathBuf::from(v.trim()));
            }
            if let Some(v) = line.split_once("ORPHAN_PORT=").map(|(_, v)| v) {
                port = Some(v.trim().parse::<u16>()?);
            }
            seen.push_str(&line);
            seen.push('\n');
            if dir.is_some() && port.is_some() {
                break;
            }
        }
        let (Some(dir), Some(port)) = (dir, port) else {
            let _ = child.kill();
            let _ = child.wait();
            return Err(format!("child printed no cluster:\n{seen}").into());
        };
        assert!(dir.join(PID_FILE).exists());
        assert!(port_accepts(port));

        match death {
            Death::Exit => {
                let mut stdin = child.stdin.take().ok_or("no child stdin")?;
                stdin.write_all(b"go\n")?;
                let status = child.wait()?;
                assert!(status.success(), "child exited with {status}");
            }
            Death::Sigkill => {
                child.kill()?;
                child.wait()?;
            }
        }
        let died = Instant::now();
        while died.elapsed() < Duration::from_secs(20)
            && (dir.exists() || port_accepts(port) || !processes_mentioning(&dir).is_empty())
        {
            std::thread::sleep(Duration::from_millis(100));
        }
        assert!(
            died.elapsed() < Duration::from_secs(10),
            "cleanup took {:?}",
            died.elapsed()
        );
        assert_gone(&dir, port, &find_bin_dir()?, server_user()?);
        Ok(())
    }

    #[test]
    fn watchdog_cleans_up_after_exit_without_drop() -> TestResult {
        orphaned_cluster_is_removed(Death::Exit)
    }

    #[test]
    fn watchdog_cleans_up_after_sigkill() -> TestResult {
        orphaned_cluster_is_removed(Death::Sigkill)
    }
}
