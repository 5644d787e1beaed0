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

use tokio_postgres::{Client, SimpleQueryMessage};
use tokio_util::sync::CancellationToken;

use crate::config::{quote_ident, quote_literal, Config};
use crate::observe::progress::Progress;
use crate::store::db::{connect, error_text, ConnectError};
use crate::store::requests::{self, RequestError};
use crate::store::rows::RowError;
use crate::store::rows::{RowReader, SESSION_SETTINGS};
use crate::store::schema::{self, SchemaError};

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
    #[error("database: {0}")]
    Sql(String),
}

impl BackfillError {
    pub fn is_config(&self) -> bool {
        match self {
            BackfillError::Schema(SchemaError::Query { .. }) => false,
            BackfillError::Schema(_) => true,
            BackfillError::Requests(RequestError::Sql(_)) => false,
            BackfillError::Requests(_) => true,
            BackfillError::Rows(e) => e.is_config(),
            _ => false,
        }
    }
}

fn sql_err(e: tokio_postgres::Error) -> BackfillError {
    BackfillError::Sql(error_text(&e))
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

struct State {
    cursor: Option<String>,
    total: i64,
    done: i64,
    resumed: bool,
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
    let key = quote_ident(&shape.key_column);
    let key_type = shape.key_type.clone();
    let table = shape.table.quoted();
    let reader = RowReader::new(&client, shape, &cfg.sink.columns).await?;

    if !opts.dry_run {
        wait_for_daemon(&client, cfg, opts, &cancel).await?;
    }
    let mut state = if opts.dry_run {
        let total: i64 = client
            .query_one(&format!("SELECT count(*) FROM {table}"), &[])
            .await
            .map_err(sql_err)?
            .get(0);
        State {
            cursor: None,
            total,
            done: 0,
            resumed: false,
        }
    } else {
        start_or_resume(&client, &table, opts.mode).await?
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
    let columns = reader.column_count();
    let mut warned_off = false;
    loop {
        if cancel.is_cancelled() {
            progress.finish();
            return Err(BackfillError::Interrupted);
        }
        let sql = format!(
            "SELECT {cols}, p.values_hash, u.{key}::text FROM {table} AS u \
             LEFT JOIN usersync.user_progress AS p ON p.user_key = u.{key}::text \
             {filter} ORDER BY u.{key} LIMIT {limit}",
            cols = reader.select_list("u"),
            filter = match &state.cursor {
                Some(c) => format!("WHERE u.{key} > {}::{key_type}", quote_literal(c)),
                None => String::new(),
            },
            limit = opts.chunk_size,
        );
        let messages = client.simple_query(&sql).await.map_err(sql_err)?;
        let mut rows = 0usize;
        let mut last: Option<String> = None;
        let mut selected: Vec<String> = Vec::new();
        for message in &messages {
            let SimpleQueryMessage::Row(row) = message else {
                continue;
            };
            rows += 1;
            let values: Vec<Option<String>> = (0..columns)
                .map(|i| row.try_get(i).map(|v| v.map(str::to_string)))
                .collect::<Result<_, _>>()
                .map_err(sql_err)?;
            let stored: Option<&str> = row.try_get(columns).map_err(sql_err)?;
            let key_text: String = row
                .try_get(columns + 1)
                .map_err(sql_err)?
                .unwrap_or_default()
                .to_string();
            let current = reader.row_from_values(&key_text, &values)?;
            let wanted = match opts.mode {
                Mode::All => true,
                Mode::Changed => {
                    current.external_id.is_none()
                        || stored != Some(crate::core::outcome::values_hash(&current.data).as_str())
                }
            };
            if wanted {
                selected.push(key_text.clone());
            }
            last = Some(key_text);
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
                for (outcome, n) in outcomes(&client, &ids).await? {
                    if outcome == "deferred" && !warned_off {
                        warned_off = true;
                        tracing::warn!("sync is switched off: backfilled users are recorded as pending and pushed when it is switched on");
                    }
                    *summary.outcomes.entry(outcome).or_default() += n;
                }
            }
            client
                .execute(
                    "UPDATE usersync.backfill SET cursor = $1, rows_done = rows_done + $2, \
                     rows_queued = rows_queued + $3, updated_at = now() WHERE id = 1",
                    &[&last, &(rows as i64), &(selected.len() as i64)],
                )
                .await
                .map_err(sql_err)?;
        }
        state.done += rows as i64;
        state.cursor = last;
        progress.set(state.done.max(0) as u64);
        if rows < opts.chunk_size {
            break;
        }
    }
    if !opts.dry_run {
        client
            .execute(
                "UPDATE usersync.backfill SET finished_at = now(), updated_at = now() WHERE id = 1",
                &[],
            )
            .await
            .map_err(sql_err)?;
    }
    progress.finish();
    Ok(summary)
}

/// A finished backfill (or one of the other mode) starts again from the
/// beginning; an unfinished one of the same mode continues from its cursor.
async fn start_or_resume(client: &Client, table: &str, mode: Mode) -> Result<State, BackfillError> {
    let row = client
        .query_opt(
            "SELECT mode, cursor, coalesce(rows_total, 0), rows_done, finished_at IS NOT NULL \
             FROM usersync.backfill WHERE id = 1",
            &[],
        )
        .await
        .map_err(sql_err)?;
    if let Some(row) = row {
        let stored_mode: String = row.get(0);
        let finished: bool = row.get(4);
        if !finished && stored_mode == mode.as_str() {
            return Ok(State {
                cursor: row.get(1),
                total: row.get(2),
                done: row.get(3),
                resumed: true,
            });
        }
    }
    let total: i64 = client
        .query_one(&format!("SELECT count(*) FROM {table}"), &[])
        .await
        .map_err(sql_err)?
        .get(0);
    client
        .execute(
            "INSERT INTO usersync.backfill AS b (id, mode, cursor, rows_total, rows_done, rows_queued, started_at, updated_at, finished_at) \
             VALUES (1, $1, NULL, $2, 0, 0, now(), now(), NULL) \
             ON CONFLICT (id) DO UPDATE SET mode = EXCLUDED.mode, cursor = NULL, rows_total = EXCLUDED.rows_total, \
             rows_done = 0, rows_queued = 0, started_at = now(), updated_at = now(), finished_at = NULL",
            &[&mode.as_str(), &total],
        )
        .await
        .map_err(sql_err)?;
    Ok(State {
        cursor: None,
        total,
        done: 0,
        resumed: false,
    })
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

async fn outcomes(client: &Client, ids: &[i64]) -> Result<Vec<(String, u64)>, BackfillError> {
    Ok(client
        .query(
            "SELECT coalesce(outcome, 'unknown'), count(*) FROM usersync.sync_requests \
             WHERE id = ANY($1) GROUP BY 1",
            &[&ids],
        )
        .await
        .map_err(sql_err)?
        .iter()
        .map(|r| (r.get(0), r.get::<_, i64>(1) as u64))
        .collect())
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
