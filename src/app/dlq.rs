//! `usersync dlq replay`: re-syncs users whose changes are in the dead-letter
//! table. A replay never pushes a stored envelope (its data may be stale): it
//! reads the user's current row by key, builds one `Change` from it (created,
//! updated or deleted, depending on the row and the external id known), pushes
//! it through the configured sink with the usual retries, writes the result
//! back into the row and resolves the entries it covered. Entries parked
//! while the replay ran stay, so the user stays parked behind them.

use std::time::{Duration, Instant, SystemTime};

use serde_json::Value;
use tokio_postgres::Client;

use crate::config::Config;
use crate::core::change::{Change, Operation};
use crate::core::error::{Classify, ErrorKind};
use crate::core::table::EXTERNAL_ID_COLUMN;
use crate::core::table::SYNCED_AT_COLUMN;
use crate::sink::retry::push_with_retry;
use crate::sink::Sink;
use crate::store::db::{connect, error_text, ConnectError, DbError};
use crate::store::deadletter::{self, DeadLetterError, Entry};
use crate::store::rows::{RowError, RowReader, SESSION_SETTINGS};
use crate::store::schema::{self, SchemaError};

#[derive(Debug, thiserror::Error)]
pub enum ReplayError {
    #[error(transparent)]
    Connect(#[from] ConnectError),
    #[error(transparent)]
    Schema(#[from] SchemaError),
    #[error(transparent)]
    DeadLetters(#[from] DeadLetterError),
    #[error("the dead-letter table usersync.dead_letters does not exist; run `usersync setup` (or `usersync setup --print-sql` for the DBA)")]
    TableMissing,
    #[error(transparent)]
    Rows(#[from] RowError),
    #[error("no dead letter with id {0} (see `usersync dlq list`)")]
    UnknownId(i64),
    #[error("{0}")]
    Sink(String),
    #[error("writing back user {key} (the push succeeded; replaying again sends the same event id): {}", error_text(.source))]
    Writeback {
        key: String,
        #[source]
        source: tokio_postgres::Error,
    },
    #[error(transparent)]
    Db(#[from] DbError),
}

impl Classify for ReplayError {
    fn kind(&self) -> ErrorKind {
        match self {
            ReplayError::Connect(e) => e.kind(),
            ReplayError::Schema(e) => e.kind(),
            ReplayError::DeadLetters(e) => e.kind(),
            ReplayError::Rows(e) => e.kind(),
            ReplayError::TableMissing | ReplayError::UnknownId(_) | ReplayError::Sink(_) => {
                ErrorKind::Config
            }
            ReplayError::Writeback { .. } => ErrorKind::Permanent,
            ReplayError::Db(e) => e.kind(),
        }
    }
}

fn sql_err(source: tokio_postgres::Error) -> ReplayError {
    ReplayError::Db(DbError {
        context: "dlq replay",
        source,
    })
}

/// Which dead letters to replay.
#[derive(Debug, Clone)]
pub enum Selection {
    /// The user of this entry (all of the user's entries: one ordered backlog).
    Entry(i64),
    User(String),
    All,
}

/// What happened to one user.
#[derive(Debug, Clone)]
pub enum Outcome {
    /// Pushed (and, unless deleted, written back); the entries are resolved.
    Synced {
        key: String,
        operation: Operation,
        external_id: Option<String>,
        resolved: u64,
        attempts: u32,
        latency: Duration,
    },
    /// The row is gone and no external id was ever known: the service never
    /// had the user, so the entries are resolved without a push.
    NothingToDelete { key: String, resolved: u64 },
    /// The push failed; the entries stay, with the attempt recorded.
    Failed {
        key: String,
        operation: Operation,
        attempts: u32,
        error: String,
    },
}

impl Outcome {
    pub fn is_failure(&self) -> bool {
        matches!(self, Outcome::Failed { .. })
    }
}

impl std::fmt::Display for Outcome {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let plural = |n: u64| if n == 1 { "" } else { "s" };
        match self {
            Outcome::Synced {
                key,
                operation,
                external_id,
                resolved,
                attempts,
                latency,
            } => write!(
                f,
                "{key} → {} ({}, {} ms, {attempts} attempt{}; {resolved} dead letter{} resolved)",
                external_id.as_deref().unwrap_or("(no external id)"),
                operation.event_type(),
                latency.as_millis(),
                plural(u64::from(*attempts)),
                plural(*resolved),
            ),
            Outcome::NothingToDelete { key, resolved } => write!(
                f,
                "{key} → nothing to delete (the row is gone and no external id was ever known; {resolved} dead letter{} resolved)",
                plural(*resolved),
            ),
            Outcome::Failed {
                key,
                operation,
                attempts,
                error,
            } => write!(
                f,
                "{key}: {} failed after {attempts} attempt{}: {error} (the dead letters stay)",
                operation.event_type(),
                plural(u64::from(*attempts)),
            ),
        }
    }
}

/// Everything a replay needs: one database session with the stream's
/// settings, the row reader and the sink.
pub struct Replayer {
    client: Client,
    rows: RowReader,
    sink: std::sync::Arc<dyn Sink>,
    retry: crate::config::RetryConfig,
    writeback: String,
    /// `sync_log.enabled`: successful replays are logged in usersync.sync_log.
    sync_log: bool,
}

impl Replayer {
    /// Connects and checks the table, the sync columns and the dead-letter
    /// table, before anything is pushed.
    pub async fn connect(cfg: &Config) -> Result<Replayer, ReplayError> {
        let sink = crate::sink::build(&cfg.sink).map_err(ReplayError::Sink)?;
        Self::with_sink(cfg, sink).await
    }

    pub async fn with_sink(
        cfg: &Config,
        sink: std::sync::Arc<dyn Sink>,
    ) -> Result<Replayer, ReplayError> {
        let client = connect(&cfg.database, "usersync-dlq").await?;
        client
            .batch_execute(SESSION_SETTINGS)
            .await
            .map_err(sql_err)?;
        let shape = schema::inspect_table(&client, &cfg.database.table).await?;
        for (column, ty) in [
            (EXTERNAL_ID_COLUMN, "text"),
            (SYNCED_AT_COLUMN, "timestamptz"),
        ] {
            if !shape.has_column(column) {
                return Err(SchemaError::MissingColumn {
                    table: shape.table.clone(),
                    column,
                    ty,
                }
                .into());
            }
        }
        if !deadletter::table_exists(&client).await? {
            return Err(ReplayError::TableMissing);
        }
        let writeback = crate::store::writeback::guarded_update_sql(&shape);
        let rows =
            RowReader::new(&client, shape, &cfg.sink.columns, &cfg.database.publication).await?;
        Ok(Replayer {
            client,
            rows,
            sink,
            retry: cfg.retry.clone(),
            writeback,
            sync_log: cfg.sync_log.enabled,
        })
    }

    /// The users to replay, in the order of their oldest dead letter.
    pub async fn users(&self, selection: &Selection) -> Result<Vec<String>, ReplayError> {
        Ok(match selection {
            Selection::Entry(id) => match deadletter::get(&self.client, *id).await? {
                Some(entry) => vec![entry.user_key],
                None => return Err(ReplayError::UnknownId(*id)),
            },
            Selection::User(key) => {
                if deadletter::is_parked(&self.client, key).await? {
                    vec![key.clone()]
                } else {
                    Vec::new()
                }
            }
            Selection::All => deadletter::users_by_age(&self.client).await?,
        })
    }

    /// Replays `users` one after another; `report` sees each outcome as it
    /// happens. A failed push is an outcome (the next user follows); a
    /// database problem stops the replay with an error.
    pub async fn replay(
        &mut self,
        users: &[String],
        mut report: impl FnMut(&Outcome),
    ) -> Result<Vec<Outcome>, ReplayError> {
        let mut outcomes = Vec::with_capacity(users.len());
        for key in users {
            if let Some(outcome) = self.replay_user(key).await? {
                report(&outcome);
                outcomes.push(outcome);
            }
        }
        Ok(outcomes)
    }

    /// `None` when the user has no dead letters (any more).
    async fn replay_user(&mut self, key: &str) -> Result<Option<Outcome>, ReplayError> {
        // The backlog first, then the row: an entry parked after this read
        // has a higher id and is not resolved, and its change is either in
        // the row read below or still to come.
        let backlog = deadletter::backlog(&self.client, key).await?;
        let Some(newest) = backlog.last() else {
            return Ok(None);
        };
        let ids: Vec<i64> = backlog.iter().map(|e| e.id).collect();
        let event_id = format!("evt_replay_{}", newest.id);
        let envelope_id = newest_external_id(&backlog);
        let row = self.rows.read(&self.client, key).await?;
        let (op, user_key, data, omitted, external_id) = match row {
            Some(row) => {
                let external_id = row.external_id.or(envelope_id);
                let op = crate::sink::row_push_op(self.sink.name(), external_id.is_some());
                (op, row.key, Some(row.data), row.omitted, external_id)
            }
            None => match envelope_id {
                Some(id) => (
                    Operation::Delete,
                    self.rows.key(key)?,
                    None,
                    Vec::new(),
                    Some(id),
                ),
                None => {
                    let resolved = deadletter::resolve(&self.client, key, &ids).await?;
                    tracing::info!(user = %key, resolved, "replay: row gone and never synced; dead letters resolved");
                    return Ok(Some(Outcome::NothingToDelete {
                        key: key.to_string(),
                        resolved,
                    }));
                }
            },
        };
        let change = Change {
            event_id,
            op,
            key: user_key,
            table: self.rows.shape().table.to_string(),
            commit_lsn: 0,
            position: 0,
            xid: 0,
            commit_time_us: now_us(),
            changed: data
                .as_ref()
                .map(|d| d.keys().cloned().collect())
                .unwrap_or_default(),
            data,
            previous: None,
            omitted,
            unconvertible: None,
            external_id: external_id.clone(),
            decoded_at: Instant::now(),
        };
        let started = Instant::now();
        match push_with_retry(
            self.sink.as_ref(),
            &change,
            external_id.as_deref(),
            &self.retry,
        )
        .await
        {
            Ok(pushed) => {
                let latency = started.elapsed();
                let external_id = pushed.external_id.or(external_id);
                let log = self.sync_log.then(|| crate::store::synclog::Replayed {
                    event_id: &change.event_id,
                    op,
                    key,
                    external_id: external_id.as_deref(),
                    attempts: pushed.attempts,
                    push: latency,
                });
                let resolved = self
                    .write_back_and_resolve(key, op, external_id.as_deref(), &ids, log.as_ref())
                    .await?;
                tracing::info!(
                    event_id = %change.event_id,
                    user = %key,
                    operation = op.event_type(),
                    external_id = external_id.as_deref().unwrap_or(""),
                    attempts = pushed.attempts,
                    push_ms = latency.as_millis() as u64,
                    resolved,
                    "replayed"
                );
                Ok(Some(Outcome::Synced {
                    key: key.to_string(),
                    operation: op,
                    external_id,
                    resolved,
                    attempts: pushed.attempts,
                    latency,
                }))
            }
            Err(failed) => {
                let error = failed.error.to_string();
                deadletter::record_failure(
                    &self.client,
                    &ids,
                    failed.attempts,
                    failed.error.status(),
                    &format!("replay {}: {error}", change.event_id),
                )
                .await?;
                // The caller reports the outcome; this is for structured logs.
                tracing::info!(
                    event_id = %change.event_id,
                    user = %key,
                    operation = op.event_type(),
                    attempts = failed.attempts,
                    error = %error,
                    "replay failed; the dead letters stay"
                );
                Ok(Some(Outcome::Failed {
                    key: key.to_string(),
                    operation: op,
                    attempts: failed.attempts,
                    error,
                }))
            }
        }
    }

    /// One transaction: the write-back (guarded like the daemon's, so a
    /// newer sync is never overwritten) and the removal of the entries read.
    async fn write_back_and_resolve(
        &mut self,
        key: &str,
        op: Operation,
        external_id: Option<&str>,
        ids: &[i64],
        log: Option<&crate::store::synclog::Replayed<'_>>,
    ) -> Result<u64, ReplayError> {
        let wb_err = |source: tokio_postgres::Error| ReplayError::Writeback {
            key: key.to_string(),
            source,
        };
        let tx = self.client.transaction().await.map_err(wb_err)?;
        if op != Operation::Delete {
            crate::store::writeback::write_back_one(
                &tx,
                &self.writeback,
                key,
                external_id,
                SystemTime::now(),
            )
            .await
            .map_err(wb_err)?;
        }
        let resolved = deadletter::resolve(&tx, key, ids).await?;
        if let Some(log) = log {
            crate::store::synclog::insert_replayed(&tx, log)
                .await
                .map_err(wb_err)?;
        }
        tx.commit().await.map_err(wb_err)?;
        Ok(resolved)
    }
}

/// The external id named by the newest envelope that names one.
fn newest_external_id(backlog: &[Entry]) -> Option<String> {
    backlog.iter().rev().find_map(|e| {
        e.envelope
            .as_ref()
            .and_then(|env| env.get("external_id"))
            .and_then(Value::as_str)
            .filter(|s| !s.is_empty())
            .map(str::to_string)
    })
}

fn now_us() -> i64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_micros()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

// ------------------------------------------------------------------------
// `usersync dlq list | show | discard`: read and delete, nothing pushed.

/// A connection for the read-only and discard commands, after checking
/// that the table exists (an older setup may lack it).
pub async fn open(db: &crate::config::DatabaseConfig) -> Result<Client, ReplayError> {
    let client = connect(db, "usersync-dlq").await?;
    if !deadletter::table_exists(&client).await? {
        return Err(ReplayError::TableMissing);
    }
    Ok(client)
}

pub async fn list(client: &Client, user: Option<&str>) -> Result<Vec<Entry>, ReplayError> {
    Ok(deadletter::list(client, user).await?)
}

/// One entry with its envelope, or `UnknownId`.
pub async fn show(client: &Client, id: i64) -> Result<Entry, ReplayError> {
    deadletter::get(client, id)
        .await?
        .ok_or(ReplayError::UnknownId(id))
}

/// Deletes one entry; also says whether its user still has others (and so
/// stays parked).
pub async fn discard_one(client: &Client, id: i64) -> Result<(Entry, bool), ReplayError> {
    let entry = deadletter::discard_one(client, id)
        .await?
        .ok_or(ReplayError::UnknownId(id))?;
    let parked = deadletter::is_parked(client, &entry.user_key).await?;
    Ok((entry, parked))
}

/// Deletes every entry of one user (which unparks it).
pub async fn discard_user(client: &Client, user: &str) -> Result<Vec<Entry>, ReplayError> {
    Ok(deadletter::discard_user(client, user).await?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn newest_envelope_id_wins() {
        let entry = |id: i64, env: Value| Entry {
            id,
            event_id: format!("evt_{id}"),
            user_key: "k".into(),
            operation: "user.updated".into(),
            state: "parked".into(),
            attempts: 0,
            last_status: None,
            last_error: String::new(),
            first_attempt_at: String::new(),
            last_attempt_at: String::new(),
            commit_lsn: "0/0".into(),
            envelope: Some(env),
        };
        let backlog = vec![
            entry(1, json!({"external_id": "usr_old"})),
            entry(2, json!({"external_id": "usr_new"})),
            entry(3, json!({"external_id": null})),
        ];
        assert_eq!(newest_external_id(&backlog).as_deref(), Some("usr_new"));
        assert_eq!(newest_external_id(&backlog[2..]), None);
    }
}
