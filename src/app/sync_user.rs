//! `usersync sync-user <key>`: pushes one user now and reports the result.
//! With a daemon streaming, the push goes through it as a sync request (the
//! user's lane, so it never races the user's own changes) and the command
//! waits for the request's outcome. Without one, the command pushes
//! directly from the current row while holding the replication origin: the
//! origin admits one session, so no daemon can write back meanwhile (a
//! starting daemon waits for it), and the write-back is tagged with it, so
//! it is not pushed again when the daemon reads it.

use std::time::{Duration, Instant, SystemTime};

use serde::Serialize;
use tokio_postgres::Client;

use crate::config::Config;
use crate::core::change::Change;
use crate::core::error::{Classify, ErrorKind};
use crate::sink::retry::push_with_retry;
use crate::store::db::{connect, error_text, ConnectError, DbError};
use crate::store::origin::{self, OriginError};
use crate::store::requests::{self, RequestError};
use crate::store::rows::RowError;
use crate::store::rows::{RowReader, SESSION_SETTINGS};
use crate::store::schema::{self, SchemaError};
use crate::store::writeback;

#[derive(Debug, thiserror::Error)]
pub enum ManualError {
    #[error(transparent)]
    Connect(#[from] ConnectError),
    #[error(transparent)]
    Schema(#[from] SchemaError),
    #[error(transparent)]
    Rows(#[from] RowError),
    #[error(transparent)]
    Requests(#[from] RequestError),
    #[error("{0}")]
    Sink(String),
    #[error("no row with key {key} in {table}")]
    NotFound { key: String, table: String },
    #[error("user {key}: {outcome}: {error}")]
    Refused {
        key: String,
        outcome: String,
        error: String,
    },
    #[error("user {key}: the push failed after {attempts} attempt(s): {error}")]
    PushFailed {
        key: String,
        attempts: u32,
        error: String,
    },
    #[error("user {key}: the daemon did not answer sync request {id} within {secs} s (it stays queued and is pushed when the daemon gets to it)")]
    Timeout { key: String, id: i64, secs: u64 },
    #[error("user {key}: pushed (external id {external_id}), but the write-back failed: {}; running sync-user again sends the same event id", error_text(.source))]
    Writeback {
        key: String,
        external_id: String,
        #[source]
        source: tokio_postgres::Error,
    },
    #[error("cannot tag the write-back with origin {origin}: {}", error_text(.source))]
    Origin {
        origin: String,
        #[source]
        source: tokio_postgres::Error,
    },
    #[error("user {0}: the sync request was not stored (no id came back)")]
    NotQueued(String),
    #[error(transparent)]
    Db(#[from] DbError),
}

impl Classify for ManualError {
    fn kind(&self) -> ErrorKind {
        match self {
            ManualError::Connect(e) => e.kind(),
            ManualError::Schema(e) => e.kind(),
            ManualError::Rows(e) => e.kind(),
            ManualError::Requests(e) => e.kind(),
            ManualError::Sink(_) => ErrorKind::Config,
            ManualError::NotFound { .. }
            | ManualError::Refused { .. }
            | ManualError::PushFailed { .. }
            | ManualError::Writeback { .. }
            | ManualError::NotQueued(_) => ErrorKind::Permanent,
            ManualError::Timeout { .. } => ErrorKind::Transient,
            ManualError::Origin { source, .. } => crate::store::db::kind_of(source),
            ManualError::Db(e) => e.kind(),
        }
    }
}

fn sql_err(source: tokio_postgres::Error) -> ManualError {
    ManualError::Db(DbError {
        context: "sync-user",
        source,
    })
}

/// What `sync-user` prints.
#[derive(Debug, Clone, Serialize)]
pub struct SyncUserResult {
    pub key: String,
    pub external_id: Option<String>,
    /// created, updated or unchanged.
    pub status: String,
    pub latency_ms: f64,
    /// "daemon" (through the running daemon's lane) or "direct".
    pub via: &'static str,
}

impl std::fmt::Display for SyncUserResult {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} → {} ({}, {:.0} ms, via {})",
            self.key,
            self.external_id.as_deref().unwrap_or("(no external id)"),
            self.status,
            self.latency_ms,
            self.via
        )
    }
}

pub async fn sync_user(
    cfg: &Config,
    key: &str,
    timeout: Duration,
) -> Result<SyncUserResult, ManualError> {
    let client = connect(&cfg.database, "usersync-sync-user").await?;
    client
        .batch_execute(SESSION_SETTINGS)
        .await
        .map_err(sql_err)?;
    let shape = schema::inspect_table(&client, &cfg.database.table).await?;
    schema::check_table_ready(&shape)?;
    requests::check(&client, &cfg.database).await?;
    let not_found = || ManualError::NotFound {
        key: key.to_string(),
        table: shape.table.to_string(),
    };
    let found = crate::store::rows::canonical_key(&client, &shape, key).await?;
    let Some(key_text) = found else {
        return Err(not_found());
    };
    if !requests::slot_active(&client, &cfg.database.slot).await? {
        match direct(cfg, &client, shape.clone(), &key_text).await {
            Err(Direct::OriginBusy) => {}
            Err(Direct::Failed(e)) => return Err(e),
            Ok(result) => return Ok(result),
        }
    }
    through_daemon(&client, &key_text, timeout).await
}

async fn through_daemon(
    client: &Client,
    key: &str,
    timeout: Duration,
) -> Result<SyncUserResult, ManualError> {
    let ids = requests::enqueue(client, &[key.to_string()], "sync-user").await?;
    let Some(&id) = ids.first() else {
        return Err(ManualError::NotQueued(key.to_string()));
    };
    let started = Instant::now();
    loop {
        if let Some(answer) = requests::answer(client, id).await? {
            return match answer.outcome.as_str() {
                "created" | "updated" | "unchanged" => Ok(SyncUserResult {
                    key: key.to_string(),
                    external_id: answer.external_id,
                    status: answer.outcome,
                    latency_ms: answer
                        .latency_ms
                        .unwrap_or_else(|| started.elapsed().as_secs_f64() * 1000.0),
                    via: "daemon",
                }),
                _ => Err(ManualError::Refused {
                    key: key.to_string(),
                    outcome: answer.outcome,
                    error: answer.error.unwrap_or_default(),
                }),
            };
        }
        if started.elapsed() > timeout {
            return Err(ManualError::Timeout {
                key: key.to_string(),
                id,
                secs: timeout.as_secs(),
            });
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

enum Direct {
    /// A daemon holds (or just took) the origin: go through it instead.
    OriginBusy,
    Failed(ManualError),
}

impl From<ManualError> for Direct {
    fn from(e: ManualError) -> Self {
        Direct::Failed(e)
    }
}

impl From<ConnectError> for Direct {
    fn from(e: ConnectError) -> Self {
        Direct::Failed(e.into())
    }
}

impl From<RowError> for Direct {
    fn from(e: RowError) -> Self {
        Direct::Failed(e.into())
    }
}

async fn direct(
    cfg: &Config,
    client: &Client,
    shape: crate::core::table::TableShape,
    key: &str,
) -> Result<SyncUserResult, Direct> {
    let sink = crate::sink::build(&cfg.sink).map_err(ManualError::Sink)?;
    let wb = connect(&cfg.database, "usersync-sync-user-writeback").await?;
    // No wait: a busy origin means a daemon is writing back; go through it.
    match origin::take(&wb, &cfg.database.origin, Duration::ZERO).await {
        Ok(()) => {}
        Err(OriginError::Busy(_)) => return Err(Direct::OriginBusy),
        Err(OriginError::Failed(source)) => {
            return Err(ManualError::Origin {
                origin: cfg.database.origin.clone(),
                source,
            }
            .into())
        }
    }
    let writeback = writeback::guarded_update_sql(&shape);
    let table = shape.table.to_string();
    let reader =
        RowReader::new(client, shape, &cfg.sink.columns, &cfg.database.publication).await?;
    // Read after taking the origin: no daemon pushes this user meanwhile.
    let Some(row) = reader.read(client, key).await? else {
        return Err(ManualError::NotFound {
            key: key.to_string(),
            table,
        }
        .into());
    };
    let hash = crate::core::outcome::values_hash(&row.data);
    let id_known = row.external_id.is_some();
    let op = crate::sink::row_push_op(sink.name(), id_known);
    let change = Change {
        // Stable for the same values, so a retried create after a failed
        // write-back reuses its idempotency key.
        event_id: format!("evt_sync_{}", &hash[..24]),
        op,
        key: row.key,
        table: table.clone(),
        commit_lsn: 0,
        position: 0,
        xid: 0,
        commit_time_us: now_us(),
        changed: row.data.keys().cloned().collect(),
        data: Some(row.data),
        previous: None,
        omitted: row.omitted,
        unconvertible: None,
        external_id: row.external_id.clone(),
        decoded_at: Instant::now(),
    };
    let started = Instant::now();
    let pushed = push_with_retry(
        sink.as_ref(),
        &change,
        row.external_id.as_deref(),
        &cfg.retry,
    )
    .await
    .map_err(|f| ManualError::PushFailed {
        key: key.to_string(),
        attempts: f.attempts,
        error: f.error.to_string(),
    })?;
    let latency = started.elapsed();
    let external_id = pushed.external_id.or(row.external_id);
    let wb_err = |source: tokio_postgres::Error| ManualError::Writeback {
        key: key.to_string(),
        external_id: external_id.clone().unwrap_or_default(),
        source,
    };
    let mut wb = wb;
    let tx = wb.transaction().await.map_err(wb_err)?;
    writeback::write_back_one(
        &tx,
        &writeback,
        key,
        external_id.as_deref(),
        SystemTime::now(),
    )
    .await
    .map_err(wb_err)?;
    crate::store::progress::record_manual_hash(&tx, key, &hash)
        .await
        .map_err(wb_err)?;
    tx.commit().await.map_err(wb_err)?;
    tracing::info!(
        event_id = %change.event_id,
        user = %key,
        operation = op.event_type(),
        external_id = external_id.as_deref().unwrap_or(""),
        attempts = pushed.attempts,
        "synced directly (no daemon streaming)"
    );
    Ok(SyncUserResult {
        key: key.to_string(),
        external_id,
        status: if id_known { "updated" } else { "created" }.to_string(),
        latency_ms: latency.as_secs_f64() * 1000.0,
        via: "direct",
    })
}

fn now_us() -> i64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_micros()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}
