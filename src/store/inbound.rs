//! Applying inbound records to the users table, exactly once and in the
//! provider's order. One transaction per record, on a session tagged with the
//! source's own replication origin (`<origin>_in_<source>`) so the stream can
//! tell these writes apart: it claims the event id in
//! `usersync.inbound_events` (a replay finds it and writes nothing), compares
//! the provider's version with the one kept per provider object in
//! `usersync.inbound_versions` (older events, and creates older than a
//! delete's tombstone, change nothing), finds the user's row, writes it, and,
//! when the source is the service the sink pushes to, records the values
//! hash in `usersync.user_progress` so `backfill` does not push them back.
//!
//! The entry point for other commands (import, reconcile) is
//! [`Applier::apply`]: a source and one [`InboundRecord`].

use std::collections::HashMap;
use std::time::Duration;

use tokio_postgres::error::SqlState;
use tokio_postgres::{Client, Statement};

use crate::config::inbound::{InboundOnDelete, InboundSource, OnCreate};
use crate::config::{quote_ident, Config};
use crate::core::inbound_event::{supersedes, Action, InboundRecord};
use crate::core::table::TableShape;
use crate::store::db::{connect, error_text, ConnectError};
use crate::store::origin::{self, OriginError};
use crate::store::rows::RowReader;

pub const EVENTS_DDL: &str = "CREATE TABLE IF NOT EXISTS usersync.inbound_events (
    source text NOT NULL,
    event_id text NOT NULL,
    event_type text NOT NULL,
    subject text NOT NULL,
    outcome text NOT NULL DEFAULT 'received',
    user_key text,
    error text,
    received_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (source, event_id)
);
CREATE INDEX IF NOT EXISTS inbound_events_failed ON usersync.inbound_events (received_at) WHERE outcome = 'failed';";

pub const VERSIONS_DDL: &str = "CREATE TABLE IF NOT EXISTS usersync.inbound_versions (
    source text NOT NULL,
    stream text NOT NULL,
    subject text NOT NULL,
    version bigint NOT NULL,
    deleted boolean NOT NULL DEFAULT false,
    PRIMARY KEY (source, stream, subject)
);";

/// What one record came to; each is answered 200 to the provider.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Applied {
    /// The row was written (inserted, updated, soft-deleted, unlinked or
    /// deleted); the row's key.
    Applied(String),
    /// The event id was already recorded: nothing written.
    Duplicate,
    /// Older than what was applied for that object (or than its tombstone).
    Stale,
    /// Caused by usersync's own push (Stripe `request.idempotency_key`).
    Echo,
    /// No row matches and the policy (or the action) creates none.
    Unmatched,
    /// An event type usersync does not map.
    Ignored,
    /// The record cannot be applied, ever (a value the column refuses, two
    /// rows with the email): recorded as failed with the reason.
    Failed(String),
}

impl Applied {
    pub fn outcome(&self) -> &'static str {
        match self {
            Applied::Applied(_) => "applied",
            Applied::Duplicate => "duplicate",
            Applied::Stale => "stale",
            Applied::Echo => "echo",
            Applied::Unmatched => "unmatched",
            Applied::Ignored => "ignored",
            Applied::Failed(_) => "failed",
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ApplyError {
    #[error(transparent)]
    Connect(#[from] ConnectError),
    #[error("replication origin {origin} is in use by another session (is another usersync receiving for this source?)")]
    OriginBusy { origin: String },
    #[error("cannot prepare the inbound apply for source {source_name}: {reason}")]
    Setup { source_name: String, reason: String },
    /// The database did not answer or refused for a passing reason: the
    /// provider should retry (503).
    #[error("database unavailable: {0}")]
    Unavailable(String),
}

/// A failure of this record's own values (class 22 data exception, 23
/// integrity violation) as opposed to a passing database problem.
fn is_permanent(e: &tokio_postgres::Error) -> bool {
    e.code().is_some_and(|c| {
        let code = c.code();
        code.starts_with("22") || code.starts_with("23") || *c == SqlState::UNDEFINED_COLUMN
    })
}

/// One source's apply session.
pub struct Applier {
    client: Client,
    source: InboundSource,
    shape: TableShape,
    /// Record the values hash (the source's service is the sink's).
    record_hash: bool,
    reader: RowReader,
    claim: Statement,
    version: Statement,
    set_version: Statement,
    finish: Statement,
    by_id: Statement,
    by_key: Statement,
    by_email: Option<Statement>,
    progress: Statement,
    writes: HashMap<(bool, Vec<String>), Statement>,
}

impl Applier {
    /// Opens the source's session and takes its origin (created if missing,
    /// waiting up to `wait` for a previous holder to go away).
    pub async fn connect(
        cfg: &Config,
        source: &InboundSource,
        shape: &TableShape,
        wait: Duration,
    ) -> Result<Applier, ApplyError> {
        let setup_err = |reason: String| ApplyError::Setup {
            source_name: source.name.clone(),
            reason,
        };
        let sql_err = |e: tokio_postgres::Error| setup_err(error_text(&e));
        let client = connect(&cfg.database, &format!("usersync-inbound-{}", source.name)).await?;
        let origin_name = source.origin(&cfg.database.origin);
        ensure_origin(&client, &origin_name)
            .await
            .map_err(sql_err)?;
        match origin::take(&client, &origin_name, wait).await {
            Ok(()) => {}
            Err(OriginError::Busy(_)) => {
                return Err(ApplyError::OriginBusy {
                    origin: origin_name,
                })
            }
            Err(OriginError::Failed(e)) => return Err(sql_err(e)),
        }
        for column in source
            .mapping
            .iter()
            .map(|(c, _)| c)
            .chain([&source.id_column])
        {
            if !shape.has_column(column) {
                return Err(setup_err(format!(
                    "the mapping or id_column names column {column}, which {} does not have",
                    shape.table
                )));
            }
        }
        if let InboundOnDelete::Soft(c) = &source.on_delete {
            if !shape.has_column(c) {
                return Err(setup_err(format!(
                    "on_delete = soft({c}) but {} has no column {c}",
                    shape.table
                )));
            }
        }
        let table = shape.table.quoted();
        let key = quote_ident(&shape.key_column);
        let id = quote_ident(&source.id_column);
        let claim = client
            .prepare(
                "INSERT INTO usersync.inbound_events (source, event_id, event_type, subject) \
                 VALUES ($1, $2, $3, $4) ON CONFLICT DO NOTHING",
            )
            .await
            .map_err(sql_err)?;
        // Inserting or touching the row locks it: deliveries of one object
        // take turns from here to commit.
        let version = client
            .prepare(
                "INSERT INTO usersync.inbound_versions AS v (source, stream, subject, version) \
                 VALUES ($1, $2, $3, -9223372036854775808) \
                 ON CONFLICT (source, stream, subject) DO UPDATE SET version = v.version \
                 RETURNING version, deleted",
            )
            .await
            .map_err(sql_err)?;
        let set_version = client
            .prepare(
                "UPDATE usersync.inbound_versions SET version = $4, deleted = $5 \
                 WHERE source = $1 AND stream = $2 AND subject = $3",
            )
            .await
            .map_err(sql_err)?;
        let finish = client
            .prepare(
                "UPDATE usersync.inbound_events SET outcome = $3, user_key = $4, error = $5 \
                 WHERE source = $1 AND event_id = $2",
            )
            .await
            .map_err(sql_err)?;
        let by_id = client
            .prepare(&format!(
                "SELECT {key}::text FROM {table} WHERE {id} = $1 LIMIT 2 FOR UPDATE"
            ))
            .await
            .map_err(sql_err)?;
        let by_key = client
            .prepare(&format!(
                "SELECT {key}::text FROM {table} WHERE {key} = $1::text::{} FOR UPDATE",
                shape.key_type
            ))
            .await
            .map_err(sql_err)?;
        let by_email = match (&source.email_column, source.match_email) {
            (Some(c), true) => Some(
                client
                    .prepare(&format!(
                        "SELECT {key}::text FROM {table} WHERE lower({}::text) = lower($1) LIMIT 2 FOR UPDATE",
                        quote_ident(c)
                    ))
                    .await
                    .map_err(sql_err)?,
            ),
            _ => None,
        };
        let progress = client
            .prepare(
                "INSERT INTO usersync.user_progress (user_key, commit_lsn, position, values_hash) \
                 VALUES ($1, '0/0', 0, $2) ON CONFLICT (user_key) DO UPDATE SET values_hash = EXCLUDED.values_hash",
            )
            .await
            .map_err(sql_err)?;
        let reader = RowReader::new(
            &client,
            shape.clone(),
            &cfg.sink.columns,
            &cfg.database.publication,
        )
        .await
        .map_err(|e| setup_err(e.to_string()))?;
        Ok(Applier {
            client,
            source: source.clone(),
            shape: shape.clone(),
            record_hash: source.same_service_as(cfg.sink.kind.name()),
            reader,
            claim,
            version,
            set_version,
            finish,
            by_id,
            by_key,
            by_email,
            progress,
            writes: HashMap::new(),
        })
    }

    pub fn source(&self) -> &InboundSource {
        &self.source
    }

    /// Applies one record in one transaction. `Err` only for passing
    /// problems (the provider retries); a record that can never apply comes
    /// back as [`Applied::Failed`], recorded under its event id.
    pub async fn apply(&mut self, record: &InboundRecord) -> Result<Applied, ApplyError> {
        match self.try_apply(record).await {
            Ok(a) => Ok(a),
            Err(e) if is_permanent(&e) => {
                let reason = error_text(&e);
                self.record_failure(record, &reason).await?;
                Ok(Applied::Failed(reason))
            }
            Err(e) => Err(ApplyError::Unavailable(error_text(&e))),
        }
    }

    async fn record_failure(
        &mut self,
        record: &InboundRecord,
        reason: &str,
    ) -> Result<(), ApplyError> {
        let unavailable = |e: tokio_postgres::Error| ApplyError::Unavailable(error_text(&e));
        let tx = self.client.transaction().await.map_err(unavailable)?;
        let claimed = tx
            .execute(
                &self.claim,
                &[
                    &self.source.name,
                    &record.event_id,
                    &record.event_type,
                    &record.subject,
                ],
            )
            .await
            .map_err(unavailable)?;
        if claimed == 1 {
            tx.execute(
                &self.finish,
                &[
                    &self.source.name,
                    &record.event_id,
                    &"failed",
                    &None::<String>,
                    &Some(reason),
                ],
            )
            .await
            .map_err(unavailable)?;
        }
        tx.commit().await.map_err(unavailable)
    }

    async fn try_apply(
        &mut self,
        record: &InboundRecord,
    ) -> Result<Applied, tokio_postgres::Error> {
        // BEGIN/COMMIT by hand: a `Transaction` would borrow the client for
        // its whole life, and the write statements are cached on `self`.
        self.client.batch_execute("BEGIN").await?;
        let result = self.in_transaction(record).await;
        match result {
            Ok(Some(outcome)) => {
                self.client.batch_execute("COMMIT").await?;
                Ok(outcome)
            }
            Ok(None) => {
                self.client.batch_execute("ROLLBACK").await?;
                Ok(Applied::Duplicate)
            }
            Err(e) => {
                // The session may be gone; the error that matters is `e`.
                let _ = self.client.batch_execute("ROLLBACK").await;
                Err(e)
            }
        }
    }

    /// The transaction's statements; `None` for a duplicate.
    async fn in_transaction(
        &mut self,
        record: &InboundRecord,
    ) -> Result<Option<Applied>, tokio_postgres::Error> {
        let source = self.source.name.clone();
        let claimed = self
            .client
            .execute(
                &self.claim,
                &[
                    &source,
                    &record.event_id,
                    &record.event_type,
                    &record.subject,
                ],
            )
            .await?;
        if claimed == 0 {
            return Ok(None);
        }
        let outcome = self.decide_and_write(record).await?;
        let user_key = match &outcome {
            Applied::Applied(k) => Some(k.clone()),
            _ => None,
        };
        self.client
            .execute(
                &self.finish,
                &[
                    &source,
                    &record.event_id,
                    &outcome.outcome(),
                    &user_key,
                    &None::<String>,
                ],
            )
            .await?;
        Ok(Some(outcome))
    }

    async fn decide_and_write(
        &mut self,
        record: &InboundRecord,
    ) -> Result<Applied, tokio_postgres::Error> {
        if record.action == Action::Ignore {
            return Ok(Applied::Ignored);
        }
        let source = self.source.name.clone();
        let stream = record.stream.to_string();
        let tx = &self.client;
        let row = tx
            .query_one(&self.version, &[&source, &stream, &record.subject])
            .await?;
        let stored: i64 = row.try_get(0)?;
        let deleted: bool = row.try_get(1)?;
        let is_delete = record.action == Action::Delete;
        if !supersedes((record.version, is_delete), (stored, deleted)) {
            return Ok(Applied::Stale);
        }
        tx.execute(
            &self.set_version,
            &[
                &source,
                &stream,
                &record.subject,
                &record.version,
                &is_delete,
            ],
        )
        .await?;
        if record
            .idempotency_key
            .as_deref()
            .is_some_and(|k| k.starts_with("usersync-"))
        {
            return Ok(Applied::Echo);
        }
        let found = self.find(record).await?;
        let key = match (record.action, found) {
            (Action::Delete, None) => return Ok(Applied::Unmatched),
            (Action::Delete, Some(key)) => {
                self.delete(&key).await?;
                return Ok(Applied::Applied(key));
            }
            (Action::Update, None) => return Ok(Applied::Unmatched),
            (Action::Upsert, None) if self.source.on_create == OnCreate::Ignore => {
                return Ok(Applied::Unmatched)
            }
            (_, Some(key)) => {
                self.write(record, Some(&key)).await?;
                key
            }
            (_, None) => match self.write(record, None).await? {
                Some(key) => key,
                None => return Ok(Applied::Unmatched),
            },
        };
        if self.record_hash {
            if let Some(hash) = self.values_hash(&key).await? {
                self.client.execute(&self.progress, &[&key, &hash]).await?;
            }
        }
        Ok(Applied::Applied(key))
    }

    /// The row's key: by the provider's id, then the back-reference
    /// usersync's sinks store, then (when enabled) the email. An ambiguous
    /// email matches nothing.
    async fn find(&self, record: &InboundRecord) -> Result<Option<String>, tokio_postgres::Error> {
        let tx = &self.client;
        let rows = tx.query(&self.by_id, &[&record.subject]).await?;
        if let [one] = rows.as_slice() {
            return Ok(Some(one.try_get(0)?));
        }
        if let Some(back) = record.back_ref.as_deref().filter(|b| self.key_text_fits(b)) {
            let rows = tx.query(&self.by_key, &[&back]).await?;
            if let Some(one) = rows.first() {
                return Ok(Some(one.try_get(0)?));
            }
        }
        if let (Some(stmt), Some(email)) = (&self.by_email, record.email.as_deref()) {
            let rows = tx.query(stmt, &[&email]).await?;
            if let [one] = rows.as_slice() {
                return Ok(Some(one.try_get(0)?));
            }
        }
        Ok(None)
    }

    /// Whether a back-reference can be the key's text at all, so a hostile
    /// metadata value never reaches a failing cast.
    fn key_text_fits(&self, s: &str) -> bool {
        let ty = self
            .shape
            .key_type
            .split('(')
            .next()
            .unwrap_or_default()
            .trim();
        match ty {
            "smallint" => s.parse::<i16>().is_ok(),
            "integer" => s.parse::<i32>().is_ok(),
            "bigint" => s.parse::<i64>().is_ok(),
            "uuid" => {
                s.len() == 36
                    && s.char_indices().all(|(i, c)| {
                        if matches!(i, 8 | 13 | 18 | 23) {
                            c == '-'
                        } else {
                            c.is_ascii_hexdigit()
                        }
                    })
            }
            _ => !s.is_empty() && s.len() <= 255,
        }
    }

    /// Updates the row of `key` (or inserts one) with the record's values
    /// and the provider's id; columns the event does not carry stay as they
    /// are (or take their defaults).
    async fn write(
        &mut self,
        record: &InboundRecord,
        key: Option<&str>,
    ) -> Result<Option<String>, tokio_postgres::Error> {
        let mut columns: Vec<String> = record.values.keys().cloned().collect();
        columns.sort();
        let insert = key.is_none();
        let stmt = match self.writes.get(&(insert, columns.clone())) {
            Some(s) => s.clone(),
            None => {
                let sql = self.write_sql(insert, &columns);
                let s = self.client.prepare(&sql).await?;
                self.writes.insert((insert, columns), s.clone());
                s
            }
        };
        let values = serde_json::Value::Object(record.values.clone());
        match key {
            Some(key) => {
                self.client
                    .execute(&stmt, &[&values, &record.subject, &key])
                    .await?;
                Ok(Some(key.to_string()))
            }
            None => {
                let row = self
                    .client
                    .query_opt(&stmt, &[&values, &record.subject])
                    .await?;
                row.map(|r| r.try_get(0)).transpose()
            }
        }
    }

    fn write_sql(&self, insert: bool, columns: &[String]) -> String {
        let table = self.shape.table.quoted();
        let key = quote_ident(&self.shape.key_column);
        let id = quote_ident(&self.source.id_column);
        // jsonb_populate_record converts each JSON value with the column's
        // own input function, so every type the table uses is handled by
        // PostgreSQL, and a value the type refuses fails this record only.
        let from = format!("jsonb_populate_record(NULL::{table}, $1::jsonb) AS r");
        let soft = match &self.source.on_delete {
            InboundOnDelete::Soft(c) if !columns.contains(c) => Some(quote_ident(c)),
            _ => None,
        };
        if insert {
            let names: Vec<String> = columns.iter().map(|c| quote_ident(c)).collect();
            let picks: Vec<String> = columns
                .iter()
                .map(|c| format!("r.{}", quote_ident(c)))
                .collect();
            let mut cols = names.join(", ");
            let mut vals = picks.join(", ");
            if !cols.is_empty() {
                cols.push_str(", ");
                vals.push_str(", ");
            }
            format!(
                "INSERT INTO {table} ({cols}{id}) SELECT {vals}$2::text FROM {from} RETURNING {key}::text"
            )
        } else {
            let mut sets: Vec<String> = columns
                .iter()
                .map(|c| format!("{0} = r.{0}", quote_ident(c)))
                .collect();
            sets.push(format!("{id} = $2::text"));
            // A newer create or update after a delete brings the user back.
            if let Some(soft) = soft {
                sets.push(format!("{soft} = NULL"));
            }
            format!(
                "UPDATE {table} AS u SET {} FROM {from} WHERE u.{key} = $3::text::{}",
                sets.join(", "),
                self.shape.key_type
            )
        }
    }

    async fn delete(&self, key: &str) -> Result<(), tokio_postgres::Error> {
        let table = self.shape.table.quoted();
        let k = quote_ident(&self.shape.key_column);
        let where_key = format!("WHERE {k} = $1::text::{}", self.shape.key_type);
        let sql = match &self.source.on_delete {
            InboundOnDelete::Soft(c) => {
                format!("UPDATE {table} SET {} = now() {where_key}", quote_ident(c))
            }
            InboundOnDelete::Unlink => format!(
                "UPDATE {table} SET {} = NULL {where_key}",
                quote_ident(&self.source.id_column)
            ),
            InboundOnDelete::Delete => format!("DELETE FROM {table} {where_key}"),
            InboundOnDelete::Ignore => return Ok(()),
        };
        self.client.execute(&sql, &[&key]).await?;
        Ok(())
    }

    /// The hash `backfill` compares: the row as the stream would push it.
    async fn values_hash(&self, key: &str) -> Result<Option<String>, tokio_postgres::Error> {
        match self.reader.read_in(&self.client, key).await {
            Ok(Some(row)) => Ok(Some(crate::core::outcome::values_hash(&row.data))),
            Ok(None) => Ok(None),
            Err(crate::store::rows::InTxError::Db(e)) => Err(e),
            // A value the stream could not decode either: no hash, so
            // backfill pushes (and dead-letters) it as it would anyway.
            Err(crate::store::rows::InTxError::Value) => Ok(None),
        }
    }
}

/// Creates the origin if it does not exist yet (setup creates it too).
async fn ensure_origin(client: &Client, name: &str) -> Result<(), tokio_postgres::Error> {
    client
        .execute(
            "SELECT pg_replication_origin_create($1) \
             WHERE NOT EXISTS (SELECT 1 FROM pg_replication_origin WHERE roname = $1)",
            &[&name],
        )
        .await
        .map(|_| ())
}
