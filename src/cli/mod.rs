//! The command line: argument parsing, `--help` text, and the edge where
//! every error becomes one readable message and an exit code
//! (0 ok, 1 runtime failure, 2 usage or configuration error).

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{ArgGroup, Parser, Subcommand};
use tokio_util::sync::CancellationToken;

mod dlq;

use crate::config::{self, Config, ProcessEnv};

const ABOUT: &str = "Keeps a PostgreSQL users table in sync with an external user service.

usersync reads the logical replication stream of the users table, pushes every
insert, update and delete to the configured sink (a signed webhook, Memberstack or
Stripe) with retries, and writes external_user_id and external_synced_at back into
the row. Start with `usersync setup`, then `usersync check`, then `usersync run`;
`usersync backfill` pushes the users that existed before.

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

    /// Log format, overriding log.format (and USERSYNC_LOG_FORMAT): `text`
    /// for people, `json` (one object per line) for log collectors. Logs go
    /// to stderr. Per-change lines ("synced", with operation, user key,
    /// external id, outcome, attempts, durations and commit LSN) are at
    /// debug level: set USERSYNC_LOG_LEVEL=info,usersync=debug to see them.
    #[arg(long, global = true, value_enum, value_name = "FORMAT")]
    pub log_format: Option<crate::observe::logging::LogFormat>,

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
    ///
    /// Serves Prometheus metrics on /metrics, liveness on /healthz and
    /// readiness on /readyz (streaming, and slot lag under
    /// metrics.ready_max_lag_mb) at metrics.listen, 127.0.0.1:9187 by
    /// default ("" disables). Records every synced or dead-lettered change in
    /// usersync.sync_log (sync_log.enabled, sync_log.retention_days).
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
        /// Also create (or bring up to date) a least-privilege role NAME for
        /// the daemon: LOGIN REPLICATION, SELECT on the users table, UPDATE of
        /// the two sync columns only, rows of schema usersync, and EXECUTE on
        /// the replication origin functions the write-back calls. usersync
        /// never sets its password: the DBA does (`\password NAME` in psql),
        /// and usersync reads it through database.password_env. Needs a
        /// superuser. The SQL for the role `usersync` is in sql/role.sql.
        #[arg(long, value_name = "NAME")]
        role: Option<String>,
        /// With --role: only the role, not the other setup steps (for a DBA
        /// who ran setup already).
        #[arg(long, requires = "role")]
        role_only: bool,
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
        /// Which external service to sync to (each is a local fake that
        /// behaves like the real API).
        #[arg(long, value_enum, default_value_t = SinkArg::Webhook)]
        sink: SinkArg,
        /// Users sign up in a fake of this provider instead of in the app:
        /// its signed webhooks reach usersync's inbound receiver, which
        /// writes the table; each new row is pushed to the sink once, and
        /// nothing is pushed back to the provider. Try
        /// `--inbound clerk --sink stripe`.
        #[arg(long, value_enum)]
        inbound: Option<InboundArg>,
    },
    /// Inspect, replay or discard dead letters: changes the sink refused
    /// (or kept failing past the retry budget), and the later changes of the
    /// same user parked behind them. A user with dead letters is parked: the
    /// daemon pushes nothing for it until its dead letters are replayed or
    /// discarded.
    ///
    /// Entries live in usersync.dead_letters (created by `usersync setup`).
    Dlq {
        #[command(subcommand)]
        command: DlqCommand,
    },
    /// Diagnose the setup: every problem on its own line, with why it
    /// matters and the command or SQL that fixes it.
    ///
    /// Checks the configuration (an unset secret variable is one line; the
    /// database is still checked), the connection, wal_level, free
    /// replication slots and WAL senders, the users table (single-column
    /// primary key, the two sync columns, REPLICA IDENTITY FULL), the
    /// publication, the slot (in use by another process? WAL retained above
    /// database.max_retained_wal_mb?), the origin, usersync's tables, the
    /// connecting role's privileges (REPLICATION, SELECT, UPDATE of the sync
    /// columns, schema usersync, the origin functions), and the sink
    /// (reachable, API key accepted; nothing is created). Exit code 0 when
    /// every check is ok, 1 otherwise (warnings included).
    Check {
        /// Print a JSON object {"ok": bool, "checks": [{check, level,
        /// message, fix}]} instead of lines.
        #[arg(long)]
        json: bool,
    },
    /// Show what the daemon is doing, from the database: streaming or not
    /// (and which server process), the slot's confirmed position, lag in
    /// bytes and (approximately) seconds, retained WAL, the last successful
    /// push and pushes and failures in the last hour (from usersync.sync_log),
    /// dead letters and parked users, and backfill progress.
    ///
    /// Lag in seconds is PostgreSQL's flush_lag for the streaming connection
    /// (0 when nothing is unconfirmed, unknown while not streaming).
    Status {
        /// Print a JSON object instead of lines.
        #[arg(long)]
        json: bool,
    },
    /// Remove what setup created for streaming: the replication slot (so
    /// PostgreSQL stops keeping WAL for usersync), the replication origin
    /// and the publication.
    ///
    /// The users table and its external_user_id / external_synced_at columns
    /// are never touched; schema usersync (dead letters, progress) stays
    /// unless --drop-schema is given. Refuses while a daemon streams the
    /// slot. Without --yes, prints what would be dropped and exits with 2.
    Teardown {
        /// Confirm: without it, nothing is dropped.
        #[arg(long)]
        yes: bool,
        /// Also drop schema usersync with everything in it (dead letters,
        /// progress, sync log): their data is lost.
        #[arg(long)]
        drop_schema: bool,
    },
    /// Run the fake webhook receiver used by the demo and the tests, for
    /// trying usersync against something local. It stores users, verifies
    /// signatures and shows its state at /_fake/users and /_fake/requests.
    /// With --mode clerk|memberstack|stripe, a fake of that vendor's API
    /// instead, which can also send the vendor's signed webhooks.
    FakeService {
        /// Port on 127.0.0.1 (0 picks a free one).
        #[arg(long, default_value_t = 8080)]
        port: u16,
        /// Name of the environment variable holding the webhook signing
        /// secret (whsec_...) or, with --mode clerk|memberstack|stripe, the
        /// API key the fake accepts. Without it, one is generated and printed.
        #[arg(long)]
        secret_env: Option<String>,
        /// Added latency per request, in milliseconds.
        #[arg(long, default_value_t = 0)]
        latency_ms: u64,
        /// Which service to imitate: a webhook receiver, the Memberstack
        /// admin API, Stripe's customers API, or Clerk's Backend API users.
        #[arg(long, value_enum, default_value_t = FakeModeArg::Webhook)]
        mode: FakeModeArg,
        /// With --mode clerk|memberstack|stripe: POST the vendor's signed
        /// webhooks (Svix-signed user.* / member.*, Stripe-signed
        /// customer.*) for every change to this URL, e.g. usersync's
        /// http://127.0.0.1:9188/<source>.
        #[arg(long, requires = "webhook_secret_env")]
        webhook_url: Option<String>,
        /// Name of the environment variable holding the whsec_ secret the
        /// webhooks are signed with.
        #[arg(long, requires = "webhook_url")]
        webhook_secret_env: Option<String>,
        /// Multiplies the vendor's retry schedule (Svix: 5 s, 5 min, 30 min,
        /// 2 h, 5 h, 10 h, 10 h): 0.001 retries after 5 ms, 300 ms, ….
        #[arg(long, default_value_t = 1.0)]
        webhook_retry_scale: f64,
    },
    /// Push the users that already exist in the table, beside a running
    /// daemon.
    ///
    /// Scans the users table in key order, in chunks, and queues a sync
    /// request (usersync.sync_requests) per selected row: by default rows
    /// with no external id, or whose synced values changed since usersync
    /// last pushed them (or that usersync never pushed: a row synced by an
    /// older script is pushed once, and the sink links the record that
    /// already exists: same email for Memberstack, metadata key for Stripe);
    /// with --all, every row. The running daemon (`usersync run`) pushes each
    /// request in the user's own lane, reading the row as it is at that
    /// moment, so a backfill never overwrites a newer change. Each chunk's
    /// pushes finish before the next chunk, so the sink's rate limit paces
    /// the backfill. The cursor is kept in usersync.backfill: after Ctrl-C or
    /// a crash, the next `usersync backfill` continues where it stopped; a
    /// finished backfill starts again from the beginning.
    ///
    /// Exits with code 1 if no daemon is streaming from the slot.
    Backfill {
        /// Push every row, not only the changed ones.
        #[arg(long)]
        all: bool,
        /// Print how many rows would be pushed, and the first keys, without
        /// queuing anything.
        #[arg(long)]
        dry_run: bool,
        /// Rows per chunk (default: backfill.chunk_size, 500).
        #[arg(long, value_name = "ROWS")]
        chunk_size: Option<usize>,
    },
    /// Recover from a replication slot that can no longer stream (WAL
    /// removed past max_slot_wal_keep_size, invalidated, or lost in a
    /// failover): recreate the slot and bring the service back in line with
    /// the table for the changes no slot recorded.
    ///
    /// The new slot is created first (a failover slot on PostgreSQL 17+), so
    /// every later commit streams. Then a sync request is queued for every
    /// row whose synced values differ from what usersync last pushed (or
    /// that was never linked), and a delete request for every user usersync
    /// synced whose row is gone (unless the sync log shows its delete was
    /// pushed). The daemon (`usersync run`, started afterwards) pushes them
    /// in the users' own lanes; unchanged rows are not pushed again. Refuses
    /// while the slot is usable (exit 2). `usersync check` and `status` say
    /// when this is needed.
    Recover {
        /// Print what would be queued; change nothing.
        #[arg(long)]
        dry_run: bool,
        /// Print the summary as one JSON object.
        #[arg(long)]
        json: bool,
        /// Rows per scan chunk (default: backfill.chunk_size, 500).
        #[arg(long, value_name = "ROWS")]
        chunk_size: Option<usize>,
    },
    /// Bring the users of an inbound source (clerk, memberstack or stripe; read
    /// through its list API) into the users table, with the source's
    /// [inbound] mapping and matching: a user with a row (by the source's id
    /// column, usersync's back-reference, or the email with match_email) is
    /// linked and updated, not duplicated; the others are inserted
    /// (on_create). Writes go through the inbound write path, tagged so the
    /// daemon never pushes them back to the source. Records that already
    /// agree are not written, so a second import changes nothing.
    ///
    /// The list cursor is kept in usersync.import_cursors after every page:
    /// after Ctrl-C or a crash the next `usersync import` resumes there
    /// (--restart starts at the first page). The provider's rate limit is
    /// honoured (sink.rate_limit_per_sec, and a 429's Retry-After).
    Import {
        /// The source: its name under [inbound.sources], or its kind.
        #[arg(long, value_name = "SOURCE")]
        from: String,
        /// Print what would be inserted, linked and updated; write nothing.
        #[arg(long)]
        dry_run: bool,
        /// Ignore an unfinished import's cursor and start at the first page.
        #[arg(long)]
        restart: bool,
        /// Print the report as one JSON object.
        #[arg(long)]
        json: bool,
    },
    /// Compare the users table with the sink's service (memberstack or
    /// stripe, read through its list API) and report per user what differs:
    /// only in the table, only in the service, linked to a record that no
    /// longer exists, mapped field values that differ, one record claimed by
    /// two rows. Ends with a summary line of counts. Exit code 0 when both
    /// sides agree, 1 when they do not (or on a runtime failure), 2 on a
    /// configuration error.
    ///
    /// --fix push queues a sync request for every row the table can fix
    /// (only in the table, values differ, linked to a missing record); the
    /// running daemon pushes them in the users' own lanes, ordered with live
    /// changes, dead-lettering failures as usual. Records only in the
    /// service and double claims are reported, not changed.
    ///
    /// --from SOURCE compares with an [inbound] source (Clerk too) through
    /// its mapping and matching. --fix pull makes the table match the
    /// service through the inbound write path (as `usersync import`, tagged
    /// so nothing is pushed back) and applies the source's on_delete to rows
    /// linked to records that are gone; rows only in the table are left
    /// alone. Without --from it uses the source of the sink's own service.
    Reconcile {
        /// Print the report as one JSON object.
        #[arg(long)]
        json: bool,
        /// `push`: make the service match the table; `pull`: make the
        /// table match the service.
        #[arg(long, value_name = "DIRECTION")]
        fix: Option<FixArg>,
        /// Compare with an inbound source (its name or kind under
        /// [inbound.sources]; clerk too) through its mapping, instead of
        /// with the sink's service.
        #[arg(long, value_name = "SOURCE")]
        from: Option<String>,
    },
    /// Push one user now, from its current row, and print the result
    /// (external id, status, latency) or the error.
    ///
    /// With a daemon streaming, the push goes through the daemon (the user's
    /// lane, in order with the user's own changes) and this command waits for
    /// the result; otherwise it pushes directly while holding the replication
    /// origin, so a daemon starting meanwhile waits for it. Exit code 1 if
    /// there is no such row or the push failed.
    SyncUser {
        /// The user's primary key, as text.
        key: String,
        /// Print the result as one JSON object.
        #[arg(long)]
        json: bool,
        /// How long to wait for a running daemon's answer, in seconds.
        #[arg(long, value_name = "SECS", default_value_t = 60)]
        timeout: u64,
    },
}

#[derive(Subcommand, Debug)]
pub enum DlqCommand {
    /// List dead letters, oldest first: id, event id, user key, operation,
    /// state (failed, or parked behind a failed change), attempts, last
    /// HTTP status, last attempt time and an excerpt of the last error.
    ///
    /// The envelopes (row data, personal data) are never listed; see
    /// `usersync dlq show <ID>` for one entry in full.
    List {
        /// Print a JSON array instead of a table.
        #[arg(long)]
        json: bool,
        /// Only this user's entries (the primary key as text).
        #[arg(long, value_name = "KEY")]
        user: Option<String>,
        /// List the inbound dead letters instead: webhook events that could
        /// not be read or applied, by source (`[inbound.sources]`).
        #[arg(long, conflicts_with = "user")]
        inbound: bool,
    },
    /// Print one dead letter in full, as JSON, including the envelope that
    /// was (or would have been) pushed. The envelope holds row data.
    #[command(group(ArgGroup::new("entry").required(true).args(["id", "inbound"])))]
    Show {
        /// The entry's id (first column of `usersync dlq list`).
        id: Option<i64>,
        /// An inbound dead letter, as SOURCE/EVENT_ID (`usersync dlq list
        /// --inbound`), with the delivery's body.
        #[arg(long, value_name = "SOURCE/EVENT_ID")]
        inbound: Option<String>,
    },
    /// Re-sync users with dead letters from their CURRENT rows.
    ///
    /// For each user (in the order of their oldest dead letter), usersync
    /// reads the row as it is now (never the stored envelope, which may be
    /// stale) and pushes it through the configured sink with the usual
    /// retries: user.updated if an external id is known, user.created if not,
    /// user.deleted if the row is gone (nothing is pushed for a deleted row
    /// that never reached the service). On success the external id and sync
    /// time are written back and the user's dead letters are removed, which
    /// unparks the user; changes parked while the replay ran stay. On
    /// failure the entries stay, with the attempt recorded, and the next
    /// user follows. The event id is evt_replay_<highest dead-letter id of
    /// the user>, the same if the replay is repeated.
    ///
    /// Exit code 1 if any user failed.
    ///
    /// `--inbound SOURCE/EVENT_ID` re-applies an inbound dead letter
    /// instead: its kept delivery is read with the mapping as configured
    /// now and written through the source's own path (tagged with the
    /// source's origin, so never pushed back to that service). A running
    /// daemon receiving for the source applies it for you.
    #[command(group(ArgGroup::new("target").required(true).args(["id", "user", "all", "inbound"])))]
    Replay {
        /// Replay the user of this entry (all of the user's dead letters:
        /// they are one ordered backlog).
        id: Option<i64>,
        /// Replay this user (the primary key as text).
        #[arg(long, value_name = "KEY")]
        user: Option<String>,
        /// Replay every user with dead letters.
        #[arg(long)]
        all: bool,
        /// Re-apply this inbound dead letter (SOURCE/EVENT_ID).
        #[arg(long, value_name = "SOURCE/EVENT_ID")]
        inbound: Option<String>,
    },
    /// Delete dead letters without pushing them: the changes are given up
    /// for good. A user whose dead letters are all gone is no longer parked;
    /// `usersync dlq replay` is usually what you want instead.
    ///
    /// `--inbound SOURCE/EVENT_ID` gives up an inbound dead letter instead:
    /// its kept body is dropped; the event stays recorded, so the provider
    /// redelivering it changes nothing.
    #[command(group(ArgGroup::new("target").required(true).args(["id", "user", "inbound"])))]
    Discard {
        /// Discard this entry only.
        id: Option<i64>,
        /// Discard every entry of this user (the primary key as text).
        #[arg(long, value_name = "KEY")]
        user: Option<String>,
        /// Confirm: without it, nothing is deleted.
        #[arg(long)]
        yes: bool,
        /// Give up this inbound dead letter (SOURCE/EVENT_ID).
        #[arg(long, value_name = "SOURCE/EVENT_ID")]
        inbound: Option<String>,
    },
}

#[derive(clap::ValueEnum, Clone, Copy, Debug)]
pub enum SinkArg {
    Webhook,
    Memberstack,
    Stripe,
}

impl SinkArg {
    pub fn kind(self) -> crate::config::SinkKind {
        match self {
            SinkArg::Webhook => crate::config::SinkKind::Webhook,
            SinkArg::Memberstack => crate::config::SinkKind::Memberstack,
            SinkArg::Stripe => crate::config::SinkKind::Stripe,
        }
    }
}

/// The providers `demo --inbound` can receive from.
#[derive(clap::ValueEnum, Clone, Copy, Debug)]
pub enum InboundArg {
    Clerk,
}

#[derive(clap::ValueEnum, Clone, Copy, Debug)]
pub enum FakeModeArg {
    Webhook,
    Memberstack,
    Stripe,
    Clerk,
}

impl FakeModeArg {
    fn kind(self) -> crate::dev::fake::serve::FakeKind {
        use crate::dev::fake::serve::FakeKind;
        match self {
            FakeModeArg::Webhook => FakeKind::Webhook,
            FakeModeArg::Memberstack => FakeKind::Memberstack,
            FakeModeArg::Stripe => FakeKind::Stripe,
            FakeModeArg::Clerk => FakeKind::Clerk,
        }
    }
}

#[derive(clap::ValueEnum, Clone, Copy, Debug)]
pub enum FixArg {
    Push,
    Pull,
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
    /// The one mapping from an error's kind to an exit code
    /// (`core::error::ErrorKind::exit_code`).
    pub fn of<E: crate::core::error::Classify + std::fmt::Display>(e: E) -> Self {
        Failure {
            code: e.kind().exit_code(),
            message: e.to_string(),
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
    crate::observe::logging::set_format_override(cli.log_format);
    let (path, explicit) = config_path(&cli);
    match cli.command {
        Command::Run => {
            let cfg = Config::load(&path, explicit, &ProcessEnv).map_err(Failure::usage)?;
            crate::observe::logging::init_logging(&cfg.log.level, cfg.log.format == "json");
            let cancel = CancellationToken::new();
            crate::app::signals::spawn_signal_handler(cancel.clone());
            crate::app::run::serve_metrics(&cfg, cancel.clone())
                .await
                .map_err(Failure::usage)?;
            let switch = crate::app::signals::spawn_reload_handler(path.clone(), explicit, &cfg);
            let sink = crate::sink::build(&cfg.sink).map_err(Failure::usage)?;
            crate::app::leader::run_elected(&cfg, sink, cancel, None, Some(switch))
                .await
                .map_err(Failure::of)
        }
        Command::Setup {
            print_sql,
            role,
            role_only,
        } => {
            let db = config::load_database(&path, explicit, &ProcessEnv, !print_sql)
                .map_err(Failure::usage)?;
            if let Some(role) = &role {
                crate::app::role::valid_role_name(role).map_err(Failure::usage)?;
            }
            // The inbound sources' writes need grants of their own; they
            // come from the whole configuration (its secrets too).
            let inbound = role.as_ref().and_then(|_| {
                Config::load(&path, explicit, &ProcessEnv)
                    .ok()
                    .and_then(|c| {
                        c.inbound
                            .as_ref()
                            .map(|i| crate::app::role::InboundWrites::of(i, &c.database.origin))
                    })
            });
            if print_sql {
                if !role_only {
                    print!("{}", crate::app::setup::render(&db));
                }
                if let Some(role) = &role {
                    if !role_only {
                        println!();
                    }
                    print!(
                        "{}",
                        crate::app::role::render_with(&db, role, inbound.as_ref())
                    );
                }
                return Ok(());
            }
            if let Some(role) = role {
                return setup_role(&db, &role, role_only, inbound.as_ref()).await;
            }
            crate::observe::logging::init_logging("info", false);
            let client = crate::store::db::connect(&db, "usersync-setup")
                .await
                .map_err(Failure::runtime)?;
            match crate::app::setup::apply(&client, &db).await {
                Ok(()) => {
                    println!(
                        "usersync: {} is ready: columns, REPLICA IDENTITY FULL, publication {}, origin {}, slot {}",
                        db.table, db.publication, db.origin, db.slot
                    );
                    Ok(())
                }
                Err(e) => Err(Failure::of(e)),
            }
        }
        Command::Demo {
            users,
            keep_running,
            sink,
            inbound,
        } => match inbound {
            Some(InboundArg::Clerk) => {
                crate::dev::demo_inbound::run(users, keep_running, sink.kind()).await
            }
            None => crate::dev::demo::run(users, keep_running, sink.kind()).await,
        }
        .map_err(Failure::runtime),
        Command::Dlq { command } => dlq::run(command, &path, explicit).await,
        Command::Check { json } => check(&path, explicit, json).await,
        Command::Status { json } => status(&path, explicit, json).await,
        Command::Teardown { yes, drop_schema } => teardown(&path, explicit, yes, drop_schema).await,
        Command::FakeService {
            port,
            secret_env,
            latency_ms,
            mode,
            webhook_url,
            webhook_secret_env,
            webhook_retry_scale,
        } => {
            let webhooks = match (webhook_url, webhook_secret_env) {
                (Some(url), Some(var)) => Some(crate::dev::fake::serve::SendWebhooks {
                    url,
                    secret: std::env::var(&var).map_err(|_| {
                        Failure::usage(format!("environment variable {var} is not set"))
                    })?,
                    compress: webhook_retry_scale,
                }),
                _ => None,
            };
            fake_service(port, secret_env, latency_ms, mode, webhooks).await
        }
        Command::Backfill {
            all,
            dry_run,
            chunk_size,
        } => backfill(&path, explicit, all, dry_run, chunk_size).await,
        Command::Recover {
            dry_run,
            json,
            chunk_size,
        } => recover(&path, explicit, dry_run, json, chunk_size).await,
        Command::Reconcile { json, fix, from } => reconcile(&path, explicit, json, fix, from).await,
        Command::Import {
            from,
            dry_run,
            restart,
            json,
        } => import(&path, explicit, from, dry_run, restart, json).await,
        Command::SyncUser { key, json, timeout } => {
            sync_user(&path, explicit, &key, json, timeout).await
        }
    }
}

async fn fake_service(
    port: u16,
    secret_env: Option<String>,
    latency_ms: u64,
    mode: FakeModeArg,
    webhooks: Option<crate::dev::fake::serve::SendWebhooks>,
) -> Result<(), Failure> {
    use crate::dev::fake::serve::{start, StartError};
    crate::observe::logging::init_logging("info", false);
    let given = match &secret_env {
        Some(var) => Some(
            std::env::var(var)
                .map_err(|_| Failure::usage(format!("environment variable {var} is not set")))?,
        ),
        None => None,
    };
    let running = start(
        mode.kind(),
        port,
        given,
        std::time::Duration::from_millis(latency_ms),
        webhooks,
    )
    .await
    .map_err(|e| match e {
        StartError::Secret(_) | StartError::WebhookSecret(_) | StartError::NoWebhooks => {
            Failure::usage(e)
        }
        StartError::Io(_) => Failure::runtime(e),
    })?;
    if let Some(generated) = &running.generated {
        eprintln!("{generated}");
    }
    println!("{}", running.url);
    eprintln!("fake service running; Ctrl-C stops it");
    let _ = tokio::signal::ctrl_c().await;
    (running.stop)().await;
    Ok(())
}

/// `usersync setup --role NAME`: the role (and, unless --role-only, the
/// usual setup first, since the grants name usersync's tables).
async fn setup_role(
    db: &config::DatabaseConfig,
    role: &str,
    role_only: bool,
    inbound: Option<&crate::app::role::InboundWrites>,
) -> Result<(), Failure> {
    crate::observe::logging::init_logging("info", false);
    let client = crate::store::db::connect(db, "usersync-setup")
        .await
        .map_err(Failure::runtime)?;
    crate::app::role::apply(&client, db, role, role_only, inbound)
        .await
        .map_err(Failure::of)?;
    println!(
        "usersync: role {role} is ready (LOGIN REPLICATION, SELECT on {table}, UPDATE of the two sync columns, schema usersync, origin functions).\n\
         usersync sets no password: set one with `\\password {role}` in psql, export it (e.g. USERSYNC_DB_PASSWORD) and set database.password_env; then connect as {role} in database.url.",
        table = db.table
    );
    Ok(())
}

/// `usersync check`.
async fn check(path: &std::path::Path, explicit: bool, json: bool) -> Result<(), Failure> {
    crate::observe::logging::init_logging("error", false);
    let report = crate::app::check::run(path, explicit, &ProcessEnv).await;
    if json {
        let text = serde_json::to_string_pretty(&report).map_err(Failure::runtime)?;
        println!("{text}");
    } else {
        print!("{}", report.render());
    }
    if report.ok {
        Ok(())
    } else if report.unsupported_server() {
        Err(Failure::usage("check found problems (see above)"))
    } else {
        Err(Failure::runtime("check found problems (see above)"))
    }
}

/// `usersync status`.
async fn status(path: &std::path::Path, explicit: bool, json: bool) -> Result<(), Failure> {
    let db = config::load_database(path, explicit, &ProcessEnv, true).map_err(Failure::usage)?;
    crate::observe::logging::init_logging("warn", false);
    let client = crate::store::db::connect(&db, "usersync-status")
        .await
        .map_err(Failure::runtime)?;
    let status = crate::app::status::read(&client, &db)
        .await
        .map_err(Failure::runtime)?;
    if json {
        let text = serde_json::to_string_pretty(&status).map_err(Failure::runtime)?;
        println!("{text}");
    } else {
        print!("{}", status.render());
    }
    Ok(())
}

/// `usersync teardown`.
async fn teardown(
    path: &std::path::Path,
    explicit: bool,
    yes: bool,
    drop_schema: bool,
) -> Result<(), Failure> {
    let db = config::load_database(path, explicit, &ProcessEnv, true).map_err(Failure::usage)?;
    crate::observe::logging::init_logging("warn", false);
    let client = crate::store::db::connect(&db, "usersync-teardown")
        .await
        .map_err(Failure::runtime)?;
    let items = crate::app::teardown::plan(&client, &db, drop_schema)
        .await
        .map_err(Failure::runtime)?;
    if items.is_empty() {
        println!(
            "nothing to drop: no slot {}, origin {} or publication {}",
            db.slot, db.origin, db.publication
        );
        return Ok(());
    }
    if !yes {
        println!("teardown would drop:");
        for item in &items {
            println!("  {}: {}", item.what, item.sql);
        }
        println!(
            "{} and its columns {} and {} stay.",
            db.table,
            crate::core::table::EXTERNAL_ID_COLUMN,
            crate::core::table::SYNCED_AT_COLUMN
        );
        return Err(Failure::usage("nothing was dropped: add --yes to confirm"));
    }
    crate::app::teardown::apply(&client, &items)
        .await
        .map_err(Failure::runtime)?;
    for item in &items {
        println!("dropped {}", item.what);
    }
    Ok(())
}

/// `usersync backfill`.
/// `usersync import`: the report on stdout (with --dry-run, one line per
/// record that would be written).
async fn import(
    path: &std::path::Path,
    explicit: bool,
    from: String,
    dry_run: bool,
    restart: bool,
    json: bool,
) -> Result<(), Failure> {
    use crate::app::import::{Options, Plan};
    let cfg = Config::load(path, explicit, &ProcessEnv).map_err(Failure::usage)?;
    crate::observe::logging::init_logging(&cfg.log.level, cfg.log.format == "json");
    let opts = Options {
        from,
        dry_run,
        restart,
        quiet: false,
    };
    let cancel = CancellationToken::new();
    crate::app::signals::spawn_signal_handler(cancel.clone());
    let report = crate::app::import::run(&cfg, &opts, cancel)
        .await
        .map_err(Failure::of)?;
    if json {
        let text = serde_json::to_string_pretty(&report).map_err(Failure::runtime)?;
        println!("{text}");
        return Ok(());
    }
    for p in &report.plans {
        match &p.plan {
            Plan::Insert => println!("insert  external {}", p.external_id),
            Plan::Link { key } => println!("link    external {} user {key}", p.external_id),
            Plan::Update { key, columns } => println!(
                "update  external {} user {key} columns {}",
                p.external_id,
                columns.join(", ")
            ),
            Plan::Unchanged { .. } | Plan::Unmatched => {}
        }
    }
    if let Some(pages) = report.resumed_after_pages {
        println!("resumed after page {pages}");
    }
    println!("{}", report.summary_line());
    Ok(())
}

/// `usersync reconcile`: the report on stdout, exit 1 on drift.
async fn reconcile(
    path: &std::path::Path,
    explicit: bool,
    json: bool,
    fix: Option<FixArg>,
    from: Option<String>,
) -> Result<(), Failure> {
    use crate::app::reconcile::{Fix, Options};
    let cfg = Config::load(path, explicit, &ProcessEnv).map_err(Failure::usage)?;
    crate::observe::logging::init_logging(&cfg.log.level, cfg.log.format == "json");
    let fix = fix.map(|f| match f {
        FixArg::Push => Fix::Push,
        FixArg::Pull => Fix::Pull,
    });
    // `[reconcile] from` is what the periodic run compares with; the
    // command agrees with it unless told otherwise (`--fix push` always
    // compares with the sink's service).
    let from = match fix {
        Some(Fix::Push) => from,
        _ => from.or_else(|| cfg.reconcile.from.clone()),
    };
    let opts = Options {
        fix,
        from,
        quiet: false,
    };
    let cancel = CancellationToken::new();
    crate::app::signals::spawn_signal_handler(cancel.clone());
    let report = crate::app::reconcile::run(&cfg, &opts, cancel)
        .await
        .map_err(Failure::of)?;
    if json {
        let text = serde_json::to_string_pretty(&report).map_err(Failure::runtime)?;
        println!("{text}");
    } else {
        for d in &report.drifts {
            let mut line = format!("{:<16}", d.kind.as_str());
            if !d.user_keys.is_empty() {
                line.push_str(&format!(" user {}", d.user_keys.join(", ")));
            }
            if let Some(id) = &d.external_id {
                line.push_str(&format!(" external {id}"));
            }
            if !d.fields.is_empty() {
                line.push_str(&format!(" fields {}", d.fields.join(", ")));
            }
            println!("{line}");
        }
        if let Some(fixed) = &report.fixed {
            let parts: Vec<String> = fixed.iter().map(|(k, v)| format!("{k} {v}")).collect();
            if opts.fix == Some(Fix::Pull) {
                println!("fix pull: {}", parts.join(", "));
            } else {
                println!(
                    "fix push: {} queued ({})",
                    fixed.values().sum::<u64>(),
                    parts.join(", ")
                );
            }
        }
        println!("{}", report.summary_line());
    }
    if report.in_agreement() {
        Ok(())
    } else {
        // The report is the message; only the exit code is left to say.
        Err(Failure {
            code: 1,
            message: format!(
                "{} difference(s) between the table and the service",
                report.drifts.len()
            ),
        })
    }
}

async fn backfill(
    path: &std::path::Path,
    explicit: bool,
    all: bool,
    dry_run: bool,
    chunk_size: Option<usize>,
) -> Result<(), Failure> {
    use crate::app::backfill::{Mode, Options};
    let cfg = Config::load(path, explicit, &ProcessEnv).map_err(Failure::usage)?;
    crate::observe::logging::init_logging(&cfg.log.level, cfg.log.format == "json");
    let chunk_size = chunk_size.unwrap_or(cfg.backfill.chunk_size);
    if chunk_size == 0 {
        return Err(Failure::usage("--chunk-size must be at least 1"));
    }
    let opts = Options {
        mode: if all { Mode::All } else { Mode::Changed },
        dry_run,
        chunk_size,
        beside_daemon: false,
    };
    let cancel = CancellationToken::new();
    crate::app::signals::spawn_signal_handler(cancel.clone());
    match crate::app::backfill::run(&cfg, &opts, cancel).await {
        Ok(summary) if dry_run => {
            println!(
                "dry run ({} mode): {} of {} rows would be pushed; nothing was queued",
                opts.mode.as_str(),
                summary.queued,
                summary.rows_scanned
            );
            if !summary.sample.is_empty() {
                println!("first keys: {}", summary.sample.join(", "));
            }
            Ok(())
        }
        Ok(summary) => {
            println!(
                "backfill {}: {summary}",
                if summary.resumed {
                    "resumed and finished"
                } else {
                    "finished"
                }
            );
            let failed = summary.outcomes.get("failed").copied().unwrap_or(0)
                + summary.outcomes.get("parked").copied().unwrap_or(0);
            if failed > 0 {
                return Err(Failure::runtime(format!(
                    "{failed} user(s) were not pushed (dead-lettered or parked): see `usersync dlq list`"
                )));
            }
            Ok(())
        }
        Err(e) => Err(Failure::of(e)),
    }
}

/// `usersync recover`.
async fn recover(
    path: &std::path::Path,
    explicit: bool,
    dry_run: bool,
    json: bool,
    chunk_size: Option<usize>,
) -> Result<(), Failure> {
    let cfg = Config::load(path, explicit, &ProcessEnv).map_err(Failure::usage)?;
    crate::observe::logging::init_logging(&cfg.log.level, cfg.log.format == "json");
    let chunk_size = chunk_size.unwrap_or(cfg.backfill.chunk_size);
    if chunk_size == 0 {
        return Err(Failure::usage("--chunk-size must be at least 1"));
    }
    let opts = crate::app::recover::Options {
        dry_run,
        chunk_size,
    };
    let summary = crate::app::recover::run(&cfg, &opts)
        .await
        .map_err(Failure::of)?;
    if json {
        let text = serde_json::to_string_pretty(&summary).map_err(Failure::runtime)?;
        println!("{text}");
    } else if dry_run {
        println!("dry run: {summary}; nothing was changed");
    } else {
        println!(
            "recovered: {summary}. The new slot starts at {}; start `usersync run` to push them (`usersync status` shows the daemon)",
            summary.new_slot_lsn
        );
    }
    Ok(())
}

/// `usersync sync-user`.
async fn sync_user(
    path: &std::path::Path,
    explicit: bool,
    key: &str,
    json: bool,
    timeout: u64,
) -> Result<(), Failure> {
    let cfg = Config::load(path, explicit, &ProcessEnv).map_err(Failure::usage)?;
    crate::observe::logging::init_logging(&cfg.log.level, cfg.log.format == "json");
    let result =
        crate::app::sync_user::sync_user(&cfg, key, std::time::Duration::from_secs(timeout)).await;
    match result {
        Ok(r) if json => {
            println!("{}", serde_json::to_string(&r).unwrap_or_default());
            Ok(())
        }
        Ok(r) => {
            println!("{r}");
            Ok(())
        }
        Err(e) => {
            if json {
                println!(
                    "{}",
                    serde_json::json!({ "key": key, "error": e.to_string() })
                );
            }
            Err(Failure::of(e))
        }
    }
}
