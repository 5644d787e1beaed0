//! `usersync dlq replay`: re-syncs users whose changes are in the dead-letter
//! table. A replay never pushes a stored envelope (its data may be stale): it
//! reads the user's current row by key, builds one `Change` from it (created,
//! updated or deleted, depending on the row and the external id known), pushes
//! it through the configured sink with the usual retries, writes the result
//! back into the row and resolves the entries it covered. Entries parked
//! while the replay ran stay, so the user stays parked behind them.

use std::time::{Duration, Instant, SystemTime};

use serde_json::{Map, Value};
use tokio_postgres::{Client, SimpleQueryMessage};

use crate::config::{quote_ident, quote_literal, Config};
use crate::core::change::{Change, Operation, UserKey};
use crate::sink::retry::push_with_retry;
use crate::sink::Sink;
use crate::source::value::{text_to_json, TypeRegistry, ValueError};
use crate::store::db::{connect, error_text, ConnectError};
use crate::store::deadletter::{self, DeadLetterError, Entry};
use crate::store::schema::{self, SchemaError, TableShape, EXTERNAL_ID_COLUMN, SYNCED_AT_COLUMN};

/// The settings the replication connection uses (see `source::stream`), so
/// that a row read in text format is exactly what the stream would have sent
/// (`standard_conforming_strings` for the key literal of the row read).
pub const SESSION_SETTINGS: &str = "SET DateStyle=ISO; SET TimeZone=UTC; \
     SET IntervalStyle=iso_8601; SET extra_float_digits=3; SET standard_conforming_strings=on";

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
    #[error("sink.columns or [sink.mapping] names column {column}, which {table} does not have")]
    UnknownColumn { column: String, table: String },
    #[error("no dead letter with id {0} (see `usersync dlq list`)")]
    UnknownId(i64),
    #[error("{0}")]
    Sink(String),
    #[error("reading the row of user {key}: {reason}")]
    Read { key: String, reason: String },
    #[error("user {key}, column {column}: {source}")]
    Value {
        key: String,
        column: String,
        source: ValueError,
    },
    #[error("writing back user {key} (the push succeeded; replaying again sends the same event id): {reason}")]
    Writeback { key: String, reason: String },
    #[error("database: {0}")]
    Sql(String),
}

impl ReplayError {
    /// Problems the operator must fix (exit code 2) as opposed to runtime failures.
    pub fn is_config(&self) -> bool {
        match self {
            ReplayError::Schema(SchemaError::Query { .. }) => false,
            ReplayError::Schema(_)
            | ReplayError::TableMissing
            | ReplayError::UnknownColumn { .. }
            | ReplayError::UnknownId(_)
            | ReplayError::Sink(_) => true,
            _ => false,
        }
    }
}

fn sql_err(e: tokio_postgres::Error) -> ReplayError {
    ReplayError::Sql(error_text(&e))
}

/// Which dead letters to replay.
#[derive(Debug, Clone)]
pub enum Selection {
    /// The user of this entry (all of the user's entries: one ordered backlog).
    Entry(i64),
    User(String),
    All,
}

/// Whether `column` is pushed: `sink.columns` (plus the key), or every column
/// but the two sync columns. The same rule as the stream's `RowBuilder`.
pub fn is_synced(column: &str, key_column: &str, sink_columns: &[String]) -> bool {
    if sink_columns.is_empty() {
        column != EXTERNAL_ID_COLUMN && column != SYNCED_AT_COLUMN
    } else {
        column == key_column || sink_columns.iter().any(|c| c == column)
    }
}

/// A column of the users table: name and type oid (`pg_attribute.atttypid`,
/// the oid pgoutput's Relation message carries).
#[derive(Debug, Clone)]
pub struct Column {
    pub name: String,
    pub type_oid: u32,
}

/// The stream's JSON for a row read in text format (each type's output
/// function, as pgoutput sends it) under [`SESSION_SETTINGS`]: every synced
/// column converted with
/// `text_to_json`, NULL as null. Errors name the column, never the value.
pub fn row_to_data(
    columns: &[Column],
    values: &[Option<String>],
    synced: impl Fn(&str) -> bool,
    types: &TypeRegistry,
) -> Result<Map<String, Value>, (String, ValueError)> {
    columns
        .iter()
        .zip(values)
        .filter(|(c, _)| synced(&c.name))
        .map(|(c, v)| {
            let value = match v {
                None => Value::Null,
                Some(text) => text_to_json(c.type_oid, text.as_bytes(), types)
                    .map_err(|e| (c.name.clone(), e))?,
            };
            Ok((c.name.clone(), value))
        })
        .collect()
}

/// A user's row as it is now.
#[derive(Debug, Clone)]
pub struct CurrentRow {
    pub key: UserKey,
    /// Restricted to the synced columns, as the stream would push it.
    pub data: Map<String, Value>,
    pub external_id: Option<String>,
}

/// Reads users' current rows by key, the way the stream would see them.
/// Expects a session set up with [`SESSION_SETTINGS`].
///
/// The row is read through the simple-query protocol, whose results are each
/// type's output function: the text pgoutput sends. A `col::text` cast is not
/// the same for every type (bool gives `true` instead of `t`, `char(n)` loses
/// its padding, `inet` gains a netmask), so it is not used.
pub struct RowReader {
    shape: TableShape,
    columns: Vec<Column>,
    key_oid: u32,
    sink_columns: Vec<String>,
    types: TypeRegistry,
    /// `SELECT … WHERE key = `, completed by the quoted key and its cast.
    select: String,
}

impl RowReader {
    pub async fn new(
        client: &Client,
        shape: TableShape,
        sink_columns: &[String],
    ) -> Result<RowReader, ReplayError> {
        for column in sink_columns {
            if !shape.has_column(column) {
                return Err(ReplayError::UnknownColumn {
                    column: column.clone(),
                    table: shape.table.to_string(),
                });
            }
        }
        let rows = client
            .query(
                "SELECT a.attname::text, a.atttypid, n.nspname::text, t.typname::text \
                 FROM pg_attribute a JOIN pg_type t ON t.oid = a.atttypid \
                 JOIN pg_namespace n ON n.oid = t.typnamespace \
                 WHERE a.attrelid = $1::text::regclass AND a.attnum > 0 AND NOT a.attisdropped \
                 ORDER BY a.attnum",
                &[&shape.table.quoted()],
            )
            .await
            .map_err(|e| {
                ReplayError::Schema(SchemaError::Query {
                    what: "the users table's column types",
                    reason: error_text(&e),
                })
            })?;
        let mut columns = Vec::with_capacity(rows.len());
        let mut types = TypeRegistry::default();
        for row in &rows {
            let column = Column {
                name: row.try_get(0).map_err(sql_err)?,
                type_oid: row.try_get(1).map_err(sql_err)?,
            };
            // Only names for messages, as pgoutput Type messages give the stream.
            types.insert(
                column.type_oid,
                row.try_get(2).map_err(sql_err)?,
                row.try_get(3).map_err(sql_err)?,
            );
            columns.push(column);
        }
        let key_oid = columns
            .iter()
            .find(|c| c.name == shape.key_column)
            .map(|c| c.type_oid)
            .ok_or_else(|| {
                ReplayError::Sql(format!(
                    "the key column {} of {} has no type in pg_attribute",
                    shape.key_column, shape.table
                ))
            })?;
        let select = format!(
            "SELECT {} FROM {} WHERE {} = ",
            columns
                .iter()
                .map(|c| quote_ident(&c.name))
                .collect::<Vec<_>>()
                .join(", "),
            shape.table.quoted(),
            quote_ident(&shape.key_column),
        );
        Ok(RowReader {
            shape,
            columns,
            key_oid,
            sink_columns: sink_columns.to_vec(),
            types,
            select,
        })
    }

    pub fn shape(&self) -> &TableShape {
        &self.shape
    }

    /// The key as the stream would push it, from its text form.
    pub fn key(&self, text: &str) -> Result<UserKey, ReplayError> {
        let json = text_to_json(self.key_oid, text.as_bytes(), &self.types).map_err(|source| {
            ReplayError::Value {
                key: text.to_string(),
                column: self.shape.key_column.clone(),
                source,
            }
        })?;
        Ok(UserKey {
            text: text.to_string(),
            json,
        })
    }

    /// The row of `key`, or `None` if it is gone.
    pub async fn read(
        &self,
        client: &Client,
        key: &str,
    ) -> Result<Option<CurrentRow>, ReplayError> {
        let read_err = |e: tokio_postgres::Error| ReplayError::Read {
            key: key.to_string(),
            reason: error_text(&e),
        };
        let sql = format!(
            "{}{}::{}",
            self.select,
            quote_literal(key),
            self.shape.key_type
        );
        let messages = client.simple_query(&sql).await.map_err(read_err)?;
        let Some(row) = messages.iter().find_map(|m| match m {
            SimpleQueryMessage::Row(row) => Some(row),
            _ => None,
        }) else {
            return Ok(None);
        };
        let values: Vec<Option<String>> = (0..self.columns.len())
            .map(|i| row.try_get(i).map(|v| v.map(str::to_string)))
            .collect::<Result<_, _>>()
            .map_err(read_err)?;
        self.row_from_values(key, &values).map(Some)
    }

    /// The table's columns, quoted and prefixed with `alias.`, in the order
    /// [`RowReader::row_from_values`] expects (for scans of many rows).
    pub fn select_list(&self, alias: &str) -> String {
        self.columns
            .iter()
            .map(|c| format!("{alias}.{}", quote_ident(&c.name)))
            .collect::<Vec<_>>()
            .join(", ")
    }

    pub fn column_count(&self) -> usize {
        self.columns.len()
    }

    /// A row read in text format (columns in `select_list` order), as the
    /// stream would push it.
    pub fn row_from_values(
        &self,
        key: &str,
        values: &[Option<String>],
    ) -> Result<CurrentRow, ReplayError> {
        let key_column = self.shape.key_column.as_str();
        let data = row_to_data(
            &self.columns,
            values,
            |c| is_synced(c, key_column, &self.sink_columns),
            &self.types,
        )
        .map_err(|(column, source)| ReplayError::Value {
            key: key.to_string(),
            column,
            source,
        })?;
        let value_of = |name: &str| {
            self.columns
                .iter()
                .position(|c| c.name == name)
                .and_then(|i| values[i].clone())
        };
        let key_text = value_of(key_column).unwrap_or_else(|| key.to_string());
        let external_id = value_of(EXTERNAL_ID_COLUMN).filter(|s| !s.is_empty());
        Ok(CurrentRow {
            key: self.key(&key_text)?,
            data,
            external_id,
        })
    }
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
        let writeback = format!(
            "UPDATE {table} SET {ext} = COALESCE($2, {ext}), {at} = $3 \
             WHERE {key} = $1::text::{key_type} AND ({at} IS NULL OR {at} < $3)",
            table = shape.table.quoted(),
            ext = quote_ident(EXTERNAL_ID_COLUMN),
            at = quote_ident(SYNCED_AT_COLUMN),
            key = quote_ident(&shape.key_column),
            key_type = shape.key_type,
        );
        let rows = RowReader::new(&client, shape, &cfg.sink.columns).await?;
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
        let (op, user_key, data, external_id) = match row {
            Some(row) => {
                let external_id = row.external_id.or(envelope_id);
                let op = if external_id.is_some() {
                    Operation::Update
                } else {
                    Operation::Insert
                };
                (op, row.key, Some(row.data), external_id)
            }
            None => match envelope_id {
                Some(id) => (Operation::Delete, self.rows.key(key)?, None, Some(id)),
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
            omitted: Vec::new(),
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
        let wb_err = |e: tokio_postgres::Error| ReplayError::Writeback {
            key: key.to_string(),
            reason: error_text(&e),
        };
        let tx = self.client.transaction().await.map_err(wb_err)?;
        if op != Operation::Delete {
            tx.execute(&self.writeback, &[&key, &external_id, &SystemTime::now()])
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

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn cols(spec: &[(&str, u32)]) -> Vec<Column> {
        spec.iter()
            .map(|(n, o)| Column {
                name: n.to_string(),
                type_oid: *o,
            })
            .collect()
    }

    #[test]
    fn synced_columns_follow_the_stream() {
        let none: Vec<String> = Vec::new();
        assert!(is_synced("email", "id", &none));
        assert!(!is_synced(EXTERNAL_ID_COLUMN, "id", &none));
        assert!(!is_synced(SYNCED_AT_COLUMN, "id", &none));
        let some = vec!["email".to_string()];
        assert!(is_synced("id", "id", &some));
        assert!(is_synced("email", "id", &some));
        assert!(!is_synced("plan", "id", &some));
    }

    #[test]
    fn row_to_data_converts_by_type_and_filters() {
        let columns = cols(&[
            ("id", 20),
            ("email", 25),
            ("score", 1700),
            ("tags", 1009),
            ("bio", 25),
            (EXTERNAL_ID_COLUMN, 25),
        ]);
        let values = vec![
            Some("42".to_string()),
            Some("a@example.com".to_string()),
            Some("1.50".to_string()),
            Some("{a,\"b c\"}".to_string()),
            None,
            Some("usr_1".to_string()),
        ];
        let data = row_to_data(
            &columns,
            &values,
            |c| is_synced(c, "id", &[]),
            &TypeRegistry::default(),
        )
        .unwrap();
        assert_eq!(
            Value::Object(data),
            json!({"id": 42, "email": "a@example.com", "score": "1.50", "tags": ["a", "b c"], "bio": null})
        );
    }

    #[test]
    fn row_to_data_errors_name_the_column_not_the_value() {
        let columns = cols(&[("n", 23)]);
        let (column, err) = row_to_data(
            &columns,
            &[Some("secret-value".to_string())],
            |_| true,
            &TypeRegistry::default(),
        )
        .unwrap_err();
        assert_eq!(column, "n");
        assert!(!err.to_string().contains("secret"));
    }

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
