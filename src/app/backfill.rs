//! `usersync backfill`: pushes the users that already exist in the table.
//! A keyset scan in chunks selects rows with no external id, no stored hash
//! of pushed values, or a hash that differs from the row's current values
//! (`--all`: every row), and queues one sync request per selected row. The
//! requests reach the daemon through the stream, so they enter the same
//! per-user lanes as the users' own changes (see `requests`). The scan waits
//! until a chunk's requests are done before it moves its cursor, which paces
//! it at the sink's rate limit and bounds what is queued. The cursor lives in
//! `usersync.backfill`, so a killed backfill continues where it stopped.

use std::time::{Duration, Instant};

use tokio_postgres::Client;
use tokio_util::sync::CancellationToken;

use crate::config::Config;
use crate::core::error::{Classify, ErrorKind};
use crate::observe::progress::Progress;
use crate::store::db::{connect, ConnectError, DbError};
use crate::store::requests::{self, RequestError};
use crate::store::rows::RowError;
use crate::store::rows::{RowReader, SESSION_SETTINGS};
use crate::store::schema::{self, SchemaError};

use crate::store::backfill as store;
pub use crate::store::backfill::TABLE_DDL;

/// How long the backfill waits for a daemon that stopped streaming before
/// it gives up (its cursor is kept).
const DAEMON_GONE_AFTER: Duration = Duration::from_secs(30);

#[derive(Debug, thiserror::Error)]
pub enum BackfillError {
    #[error(transparent)]
    Connect(#[from] ConnectError),
    #[error(transparent)]
    Schema(#[from] SchemaError),
    #[error(transparent)]
    Rows(#[from] RowError),
    #[error(transparent)]
    Requests(#[from] RequestError),
    #[error("no daemon is streaming from replication slot {0}: backfill only queues sync requests, which `usersync run` pushes. Start `usersync run` (or set [backfill] on_start = true) and run the backfill again")]
    NoDaemon(String),
    #[error("the daemon stopped streaming from slot {0} during the backfill; the cursor is kept: run `usersync backfill` again once `usersync run` is back")]
    DaemonGone(String),
    #[error("interrupted; the cursor is kept: run `usersync backfill` again to continue")]
    Interrupted,
    #[error(transparent)]
    Db(#[from] DbError),
}

impl Classify for BackfillError {
    fn kind(&self) -> ErrorKind {
        match self {
            BackfillError::Connect(e) => e.kind(),
            BackfillError::Schema(e) => e.kind(),
            BackfillError::Rows(e) => e.kind(),
            BackfillError::Requests(e) => e.kind(),
            BackfillError::NoDaemon(_)
            | BackfillError::DaemonGone(_)
            | BackfillError::Interrupted => ErrorKind::Permanent,
            BackfillError::Db(e) => e.kind(),
        }
    }
}

fn sql_err(source: tokio_postgres::Error) -> BackfillError {
    BackfillError::Db(DbError {
        context: "backfill",
        source,
    })
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// No external id, no stored hash, or values changed since the last push.
    Changed,
    All,
}

impl Mode {
    pub fn as_str(self) -> &'static str {
        match self {
            Mode::Changed => "changed",
            Mode::All => "all",
        }
    }
}

#[derive(Debug, Clone)]
pub struct Options {
    pub mode: Mode,
    pub dry_run: bool,
    pub chunk_size: usize,
    /// Inside `run`: wait for the stream instead of refusing, and log
    /// progress lines rather than drawing a bar.
    pub beside_daemon: bool,
}

/// What a backfill did.
#[derive(Debug, Default, Clone)]
pub struct Summary {
    pub rows_scanned: u64,
    pub queued: u64,
    pub resumed: bool,
    /// Requests by outcome (created, updated, failed, ...).
    pub outcomes: std::collections::BTreeMap<String, u64>,
    /// Dry run: the first keys that would be pushed.
    pub sample: Vec<String>,
}

impl std::fmt::Display for Summary {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} rows scanned, {} pushed",
            self.rows_scanned, self.queued
        )?;
        if !self.outcomes.is_empty() {
            let parts: Vec<String> = self
                .outcomes
                .iter()
                .map(|(k, v)| format!("{k} {v}"))
                .collect();
            write!(f, " ({})", parts.join(", "))?;
        }
        Ok(())
    }
}

/// Runs a backfill to its end. The caller decides what an error means.
pub async fn run(
    cfg: &Config,
    opts: &Options,
    cancel: CancellationToken,
) -> Result<Summary, BackfillError> {
    let client = connect(&cfg.database, "usersync-backfill").await?;
    client
        .batch_execute(SESSION_SETTINGS)
        .await
        .map_err(sql_err)?;
    let shape = schema::inspect_table(&client, &cfg.database.table).await?;
    schema::check_table_ready(&shape)?;
    requests::check(&client, &cfg.database).await?;
    let reader =
        RowReader::new(&client, shape, &cfg.sink.columns, &cfg.database.publication).await?;

    if !opts.dry_run {
        wait_for_daemon(&client, cfg, opts, &cancel).await?;
    }
    let mut state = if opts.dry_run {
        store::Cursor {
            last_key: None,
            total: store::count_rows(&client, reader.shape()).await?,
            done: 0,
            resumed: false,
        }
    } else {
        store::start_or_resume(&client, reader.shape(), opts.mode.as_str()).await?
    };
    let mut summary = Summary {
        resumed: state.resumed,
        ..Summary::default()
    };
    if state.resumed {
        tracing::info!(
            rows_done = state.done,
            rows_total = state.total,
            "resuming the unfinished backfill from its cursor"
        );
    }
    let mut progress = Progress::new(
        "backfill",
        "rows",
        state.total.max(0) as u64,
        state.done.max(0) as u64,
        opts.beside_daemon || opts.dry_run,
    );
    let mut warned_off = false;
    loop {
        if cancel.is_cancelled() {
            progress.finish();
            return Err(BackfillError::Interrupted);
        }
        let chunk =
            store::scan_chunk(&client, &reader, state.last_key.as_deref(), opts.chunk_size).await?;
        let rows = chunk.len();
        let mut last: Option<String> = None;
        let mut selected: Vec<String> = Vec::new();
        for scanned in chunk {
            let current = reader.row_from_values(&scanned.key, &scanned.values)?;
            let wanted = match opts.mode {
                Mode::All => true,
                Mode::Changed => {
                    current.external_id.is_none()
                        || scanned.pushed_hash.as_deref()
                            != Some(crate::core::outcome::values_hash(&current.data).as_str())
                }
            };
            if wanted {
                selected.push(scanned.key.clone());
            }
            last = Some(scanned.key);
        }
        if rows == 0 {
            break;
        }
        summary.rows_scanned += rows as u64;
        if opts.dry_run {
            summary.queued += selected.len() as u64;
            for k in selected {
                if summary.sample.len() < 20 {
                    summary.sample.push(k);
                }
            }
        } else {
            if !selected.is_empty() {
                let ids = requests::enqueue(&client, &selected, "backfill").await?;
                summary.queued += ids.len() as u64;
                let unselected = (rows - selected.len()) as i64;
                wait_done(&client, cfg, &ids, &cancel, |open| {
                    let finished = ids.len() as i64 - open;
                    progress.set((state.done + unselected + finished).max(0) as u64);
                })
                .await?;
                for (outcome, n) in requests::outcomes(&client, &ids).await? {
                    if outcome == "deferred" && !warned_off {
                        warned_off = true;
                        tracing::warn!("sync is switched off: backfilled users are recorded as pending and pushed when it is switched on");
                    }
                    *summary.outcomes.entry(outcome).or_default() += n;
                }
            }
            store::advance(&client, last.as_deref(), rows, selected.len()).await?;
        }
        state.done += rows as i64;
        state.last_key = last;
        progress.set(state.done.max(0) as u64);
        if rows < opts.chunk_size {
            break;
        }
    }
    if !opts.dry_run {
        store::finish(&client).await?;
    }
    progress.finish();
    Ok(summary)
}

/// As a command, refuses at once when no daemon streams (the requests would
/// only be pushed once `run` starts); beside the daemon, waits for its stream.
async fn wait_for_daemon(
    client: &Client,
    cfg: &Config,
    opts: &Options,
    cancel: &CancellationToken,
) -> Result<(), BackfillError> {
    loop {
        if requests::slot_active(client, &cfg.database.slot).await? {
            return Ok(());
        }
        if !opts.beside_daemon {
            return Err(BackfillError::NoDaemon(cfg.database.slot.clone()));
        }
        tokio::select! {
            _ = cancel.cancelled() => return Err(BackfillError::Interrupted),
            _ = tokio::time::sleep(Duration::from_millis(500)) => {}
        }
    }
}

/// Waits until every request in `ids` is done; `report` sees how many are open.
async fn wait_done(
    client: &Client,
    cfg: &Config,
    ids: &[i64],
    cancel: &CancellationToken,
    mut report: impl FnMut(i64),
) -> Result<(), BackfillError> {
    let mut inactive_since: Option<Instant> = None;
    let mut last_slot_check = Instant::now();
    loop {
        let open = requests::open_count(client, ids).await?;
        report(open);
        if open == 0 {
            return Ok(());
        }
        if last_slot_check.elapsed() > Duration::from_secs(2) {
            last_slot_check = Instant::now();
            if requests::slot_active(client, &cfg.database.slot).await? {
                inactive_since = None;
            } else {
                let since = *inactive_since.get_or_insert_with(Instant::now);
                if since.elapsed() > DAEMON_GONE_AFTER {
                    return Err(BackfillError::DaemonGone(cfg.database.slot.clone()));
                }
            }
        }
        tokio::select! {
            _ = cancel.cancelled() => return Err(BackfillError::Interrupted),
            _ = tokio::time::sleep(Duration::from_millis(100)) => {}
        }
    }
}

/// `[backfill] on_start`: a backfill of changed rows beside the stream. Its
/// failure is logged; the daemon goes on.
pub fn spawn_beside_daemon(cfg: Config, cancel: CancellationToken) {
    tokio::spawn(async move {
        let opts = Options {
            mode: Mode::Changed,
            dry_run: false,
            chunk_size: cfg.backfill.chunk_size,
            beside_daemon: true,
        };
        match run(&cfg, &opts, cancel).await {
            Ok(summary) => tracing::info!(%summary, "backfill finished"),
            Err(BackfillError::Interrupted) => {
                tracing::info!(
                    "backfill stopped with the daemon; it continues from its cursor next start"
                )
            }
            Err(e) => tracing::error!(error = %e, "backfill failed; the daemon goes on"),
        }
    });
}
