//! The command line: argument parsing, `--help` text, and the edge where
//! every error becomes one readable message and an exit code
//! (0 ok, 1 runtime failure, 2 usage or configuration error).

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use tokio_util::sync::CancellationToken;

use crate::config::{self, Config, ProcessEnv};

const ABOUT: &str = "Keeps a PostgreSQL users table in sync with an external user service.

usersync reads the logical replication stream of the users table, pushes every
insert, update and delete to the configured sink (a signed webhook) with retries,
and writes external_user_id and external_synced_at back into the row.

Configuration comes from sync.toml (see sync.toml.example); every key can be
overridden by an environment variable USERSYNC_<SECTION>_<KEY>, for example
USERSYNC_DATABASE_URL or USERSYNC_SINK_URL. Secrets are only ever named by
reference (database.password_env, sink.secret_env, or *_file).

Exit codes: 0 ok, 1 runtime failure, 2 usage or configuration error.";

#[derive(Parser, Debug)]
#[command(name = "usersync", version, about = ABOUT, long_about = ABOUT)]
pub struct Cli {
    /// Path of the config file. Without this flag, ./sync.toml is read if it
    /// exists, else the configuration comes from USERSYNC_* variables alone.
    #[arg(long, short = 'c', global = true, env = "USERSYNC_CONFIG")]
    pub config: Option<PathBuf>,

    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Run the daemon: stream changes, push them, write results back.
    ///
    /// Checks the database first (wal_level, table shape, sync columns,
    /// replica identity, publication, slot, origin) and refuses to start, with
    /// exit code 2, if anything is missing: run `usersync setup` first.
    /// Stops cleanly on Ctrl-C or SIGTERM, finishing the pushes in flight.
    Run,
    /// Prepare the database (idempotent): add the two sync columns, schema
    /// `usersync`, REPLICA IDENTITY FULL, the publication, the replication
    /// origin and the logical slot.
    ///
    /// Needs a role that may alter the users table and create publications
    /// and slots (usually the table owner with REPLICATION, or a superuser).
    /// With --print-sql, prints the SQL instead of running it, for a DBA.
    Setup {
        /// Print the SQL (also in sql/setup.sql) instead of applying it.
        #[arg(long)]
        print_sql: bool,
    },
    /// Show usersync working end to end on this machine: a throw-away
    /// PostgreSQL from the local binaries, the fake webhook service, the
    /// daemon, and a script of inserts, updates and deletes synced live.
    ///
    /// Needs the PostgreSQL server binaries (initdb, pg_ctl); set
    /// USERSYNC_PG_BINDIR if they are not found. Leaves nothing behind.
    Demo {
        /// How many users the script creates.
        #[arg(long, default_value_t = 5)]
        users: u32,
        /// After the script, keep everything running (and print how to
        /// connect with psql) until Ctrl-C.
        #[arg(long)]
        keep_running: bool,
    },
    /// Run the fake webhook receiver used by the demo and the tests, for
    /// trying usersync against something local. It stores users, verifies
    /// signatures and shows its state at /_fake/users and /_fake/requests.
    FakeService {
        /// Port on 127.0.0.1 (0 picks a free one).
        #[arg(long, default_value_t = 8080)]
        port: u16,
        /// Name of the environment variable holding the signing secret
        /// (whsec_...). Without it, a secret is generated and printed.
        #[arg(long)]
        secret_env: Option<String>,
        /// Added latency per request, in milliseconds.
        #[arg(long, default_value_t = 0)]
        latency_ms: u64,
    },
}

/// An error at the edge: the message to print and the exit code.
pub struct Failure {
    pub code: u8,
    pub message: String,
}

impl Failure {
    pub fn usage(message: impl std::fmt::Display) -> Self {
        Failure {
            code: 2,
            message: message.to_string(),
        }
    }
    pub fn runtime(message: impl std::fmt::Display) -> Self {
        Failure {
            code: 1,
            message: message.to_string(),
        }
    }
}

pub fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            let _ = e.print();
            return match e.kind() {
                clap::error::ErrorKind::DisplayHelp | clap::error::ErrorKind::DisplayVersion => {
                    ExitCode::SUCCESS
                }
                _ => ExitCode::from(2),
            };
        }
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("usersync: cannot start the async runtime: {e}");
            return ExitCode::from(1);
        }
    };
    match runtime.block_on(dispatch(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(f) => {
            eprintln!("usersync: {}", f.message);
            ExitCode::from(f.code)
        }
    }
}

fn config_path(cli: &Cli) -> (PathBuf, bool) {
    match &cli.config {
        Some(p) => (p.clone(), true),
        None => (PathBuf::from("sync.toml"), false),
    }
}

async fn dispatch(cli: Cli) -> Result<(), Failure> {
    let (path, explicit) = config_path(&cli);
    match cli.command {
        Command::Run => {
            let cfg = Config::load(&path, explicit, &ProcessEnv).map_err(Failure::usage)?;
            crate::observe::init_logging(&cfg.log.level, cfg.log.format == "json");
            let cancel = CancellationToken::new();
            spawn_signal_handler(cancel.clone());
            crate::daemon::run(&cfg, cancel, None).await.map_err(|e| {
                if e.is_config() {
                    Failure::usage(e)
                } else {
                    Failure::runtime(e)
                }
            })
        }
        Command::Setup { print_sql } => {
            let db = config::load_database(&path, explicit, &ProcessEnv, !print_sql)
                .map_err(Failure::usage)?;
            if print_sql {
                print!("{}", crate::setup::render(&db));
                return Ok(());
            }
            crate::observe::init_logging("info", false);
            let client = crate::db::connect(&db, "usersync-setup")
                .await
                .map_err(Failure::runtime)?;
            match crate::setup::apply(&client, &db).await {
                Ok(()) => {
                    println!(
                        "usersync: {} is ready: columns, REPLICA IDENTITY FULL, publication {}, origin {}, slot {}",
                        db.table, db.publication, db.origin, db.slot
                    );
                    Ok(())
                }
                Err(crate::setup::SetupError::Schema(e)) => Err(Failure::usage(e)),
                Err(e) => Err(Failure::runtime(e)),
            }
        }
        Command::Demo {
            users,
            keep_running,
        } => crate::demo::run(users, keep_running).await,
        Command::FakeService {
            port,
            secret_env,
            latency_ms,
        } => {
            crate::observe::init_logging("info", false);
            let secret = match secret_env {
                Some(var) => {
                    let text = std::env::var(&var).map_err(|_| {
                        Failure::usage(format!("environment variable {var} is not set"))
                    })?;
                    crate::sink::signature::WebhookSecret::parse(&text).map_err(Failure::usage)?
                }
                None => {
                    let s = crate::sink::signature::WebhookSecret::generate();
                    println!(
                        "signing secret (give it to usersync as sink.secret_env): {}",
                        s.to_whsec()
                    );
                    s
                }
            };
            crate::fake::serve_forever(crate::fake::FakeOptions {
                port,
                secret: Some(secret),
                latency: std::time::Duration::from_millis(latency_ms),
            })
            .await
            .map_err(|e| Failure::runtime(format!("fake service: {e}")))
        }
    }
}

/// Ctrl-C and SIGTERM both ask for a clean stop; a second one exits at once.
pub fn spawn_signal_handler(cancel: CancellationToken) {
    tokio::spawn(async move {
        let mut term =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(s) => s,
                Err(_) => {
                    let _ = tokio::signal::ctrl_c().await;
                    cancel.cancel();
                    return;
                }
            };
        for round in 0..2 {
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = term.recv() => {}
            }
            if round == 0 {
                tracing::info!(
                    "stopping: finishing pushes in flight (signal again to exit at once)"
                );
                cancel.cancel();
            } else {
                std::process::exit(130);
            }
        }
    });
}
