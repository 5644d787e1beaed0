//! `usersync recover`: the way back from a slot that can no longer stream
//! (WAL removed past `max_slot_wal_keep_size`, invalidated by a conflict or
//! an idle timeout) or that a failover lost (PostgreSQL before 17, or a
//! slot that was not synchronized). The changes made while no usable slot
//! recorded them are gone from WAL, so the service is brought back in line
//! with the table instead:
//!
//! 1. the slot is replaced first, so every commit from then on streams;
//! 2. every row whose values differ from what was last pushed (the hash in
//!    `usersync.user_progress`, as `backfill` compares it), or that was
//!    never linked, gets a sync request;
//! 3. every user with progress but no row gets a delete request, unless the
//!    sync log shows its delete was already pushed.
//!
//! The requests travel through the new slot into the users' lanes, so the
//! daemon pushes them in order with the users' own later changes; nothing
//! is pushed twice for a row that did not change. `recover` only queues:
//! `usersync run` pushes.

use tokio_postgres::Client;

use crate::config::{Config, SinkKind};
use crate::core::error::{Classify, ErrorKind};
use crate::core::outcome::values_hash;
use crate::store::db::{connect, ConnectError, DbError};
use crate::store::recover as store;
use crate::store::requests::{self, RequestError};
use crate::store::rows::{RowError, RowReader, SESSION_SETTINGS};
use crate::store::schema::{self, SchemaError};
use crate::store::status::{self, StatusError};

#[derive(Debug, thiserror::Error)]
pub enum RecoverError {
    #[error(transparent)]
    Connect(#[from] ConnectError),
    #[error(transparent)]
    Schema(#[from] SchemaError),
    #[error(transparent)]
    Rows(#[from] RowError),
    #[error(transparent)]
    Requests(#[from] RequestError),
    #[error(transparent)]
    Status(#[from] StatusError),
    #[error(transparent)]
    Db(#[from] DbError),
    #[error("replication slot {0} is usable: there is nothing to recover (rows changed while sync was off are pushed by `usersync backfill`)")]
    SlotHealthy(String),
    #[error("this server is a standby (in recovery): run `usersync recover` against the primary (after a failover, the promoted server)")]
    Standby,
}

impl Classify for RecoverError {
    fn kind(&self) -> ErrorKind {
        match self {
            RecoverError::Connect(e) => e.kind(),
            RecoverError::Schema(e) => e.kind(),
            RecoverError::Rows(e) => e.kind(),
            RecoverError::Requests(e) => e.kind(),
            RecoverError::Status(e) => e.kind(),
            RecoverError::Db(e) => e.kind(),
            RecoverError::SlotHealthy(_) | RecoverError::Standby => ErrorKind::Config,
        }
    }
}

#[derive(Debug, Clone)]
pub struct Options {
    /// Count what would be queued; change nothing.
    pub dry_run: bool,
    pub chunk_size: usize,
}

/// What a recovery found and did.
#[derive(Debug, Default, Clone, serde::Serialize)]
pub struct Summary {
    /// Why the old slot could not be used ("does not exist", "was invalidated: …").
    pub slot_problem: String,
    /// The new slot's starting position (empty on a dry run).
    pub new_slot_lsn: String,
    pub rows_scanned: u64,
    /// Rows queued (or, on a dry run, to be queued) for a push.
    pub changed: u64,
    /// Users queued (or to be queued) for a delete.
    pub deleted: u64,
    /// Users with progress but no row whose delete was already pushed.
    pub already_deleted: u64,
}

impl std::fmt::Display for Summary {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "slot {}; {} rows scanned: {} changed row(s) and {} deleted user(s) to push ({} deletion(s) were already pushed)",
            self.slot_problem, self.rows_scanned, self.changed, self.deleted, self.already_deleted
        )
    }
}

pub async fn run(cfg: &Config, opts: &Options) -> Result<Summary, RecoverError> {
    let db = &cfg.database;
    let client = connect(db, "usersync-recover").await?;
    client
        .batch_execute(SESSION_SETTINGS)
        .await
        .map_err(DbError::ctx("session settings"))?;
    schema::check_server_version(&client).await?;
    schema::check_wal_level(&client).await?;
    let shape = schema::inspect_table(&client, &db.table).await?;
    schema::check_table_ready(&shape)?;
    schema::check_publication(&client, db).await?;
    schema::check_origin(&client, db).await?;
    schema::check_own_tables(&client).await?;
    requests::check(&client, db).await?;
    let slot_problem = match status::slot_info(&client, &db.slot).await? {
        Some(info) if info.in_recovery => return Err(RecoverError::Standby),
        Some(info) => match info.invalidated() {
            Some(problem) => problem,
            None => return Err(RecoverError::SlotHealthy(db.slot.clone())),
        },
        None => "does not exist".to_string(),
    };
    let reader =
        RowReader::new(&client, shape, &cfg.sink.columns, &cfg.database.publication).await?;
    let mut summary = Summary {
        slot_problem: format!("{} {slot_problem}", db.slot),
        ..Summary::default()
    };
    if !opts.dry_run {
        summary.new_slot_lsn = store::replace_slot(&client, db).await?;
        tracing::info!(slot = %db.slot, lsn = %summary.new_slot_lsn, "replication slot recreated; every commit from here on streams");
    }
    // Without ids from the sink (a webhook without external_id_pointer), a
    // row's missing id says nothing: only its values decide.
    let ids_expected =
        cfg.sink.kind != SinkKind::Webhook || !cfg.sink.external_id_pointer.is_empty();
    queue_changed(&client, &reader, opts, ids_expected, &mut summary).await?;
    queue_deletes(&client, &reader, opts, &mut summary).await?;
    Ok(summary)
}

/// Rows whose values differ from the last push, or never linked.
async fn queue_changed(
    client: &Client,
    reader: &RowReader,
    opts: &Options,
    ids_expected: bool,
    summary: &mut Summary,
) -> Result<(), RecoverError> {
    let mut after: Option<String> = None;
    loop {
        let chunk =
            crate::store::backfill::scan_chunk(client, reader, after.as_deref(), opts.chunk_size)
                .await?;
        let rows = chunk.len();
        let mut selected = Vec::new();
        for scanned in chunk {
            let current = reader.row_from_values(&scanned.key, &scanned.values)?;
            let changed =
                scanned.pushed_hash.as_deref() != Some(values_hash(&current.data).as_str());
            if changed || (ids_expected && current.external_id.is_none()) {
                selected.push(scanned.key.clone());
            }
            after = Some(scanned.key);
        }
        summary.rows_scanned += rows as u64;
        summary.changed += selected.len() as u64;
        if !opts.dry_run && !selected.is_empty() {
            requests::enqueue(client, &selected, "recover").await?;
        }
        if rows < opts.chunk_size {
            return Ok(());
        }
    }
}

/// Users with progress but no row.
async fn queue_deletes(
    client: &Client,
    reader: &RowReader,
    opts: &Options,
    summary: &mut Summary,
) -> Result<(), RecoverError> {
    let limit = i64::try_from(opts.chunk_size).unwrap_or(i64::MAX);
    let mut after: Option<String> = None;
    loop {
        let chunk = store::vanished_chunk(client, reader.shape(), after.as_deref(), limit).await?;
        let n = chunk.len();
        after = chunk.last().map(|v| v.key.clone());
        let (todo, done): (Vec<_>, Vec<_>) = chunk.into_iter().partition(|v| v.needs_delete);
        summary.deleted += todo.len() as u64;
        summary.already_deleted += done.len() as u64;
        if !opts.dry_run && !todo.is_empty() {
            store::enqueue_deletes(client, &todo).await?;
        }
        if n < opts.chunk_size {
            return Ok(());
        }
    }
}
