//! The write-back: records the external id and the sync time in the users
//! row after a successful push. One session, tagged with the daemon's
//! replication origin so the decoder drops these transactions (no echo);
//! items are grouped into one UPDATE per batch, and a row is only touched if
//! its `external_synced_at` is older, so a newer sync is never overwritten.

use crate::core::outcome::{
    DeadLetterState, Durable, NewDeadLetter, Outcome, SyncReport, WriteItem,
};
use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant, SystemTime};

use tokio::sync::mpsc;
use tokio_postgres::{Client, GenericClient, Statement};

use crate::config::{quote_ident, DatabaseConfig};
use crate::core::change::{format_lsn, Lsn, Operation};
use crate::core::error::{Classify, ErrorKind};
use crate::core::table::TableShape;
use crate::core::table::EXTERNAL_ID_COLUMN;
use crate::core::table::SYNCED_AT_COLUMN;
use crate::store::db::{connect, error_text, ConnectError};
use crate::store::deadletter::{self};
use crate::store::origin::OriginError;

#[derive(Debug, thiserror::Error)]
pub enum WritebackError {
    #[error(transparent)]
    Connect(#[from] ConnectError),
    #[error("replication origin {origin} is in use by another session (is another usersync running against this database?): {reason}")]
    OriginBusy { origin: String, reason: String },
    #[error("cannot tag the write-back session with origin {origin}: {}", error_text(.source))]
    OriginSetup {
        origin: String,
        #[source]
        source: tokio_postgres::Error,
    },
    #[error("write-back failed: {0}")]
    Db(#[from] crate::store::db::DbError),
    #[error("write-back failed: {0}")]
    DeadLetter(#[from] deadletter::DeadLetterError),
    #[error("write-back failed: {0}")]
    Requests(#[from] crate::store::requests::RequestError),
    #[error("write-back failed: {0}")]
    Rows(#[from] crate::store::rows::RowError),
    #[error("source transactions of {count} change(s) did not become visible within {timeout:?} (is a synchronous standby missing?)")]
    Invisible { count: usize, timeout: Duration },
}

impl Classify for WritebackError {
    fn kind(&self) -> ErrorKind {
        match self {
            WritebackError::Connect(e) => e.kind(),
            // Another daemon (or a frozen one) holds the origin: waiting is
            // the only thing to do.
            WritebackError::OriginBusy { .. } | WritebackError::Invisible { .. } => {
                ErrorKind::Transient
            }
            WritebackError::OriginSetup { source, .. } => crate::store::db::kind_of(source),
            WritebackError::Db(e) => e.kind(),
            WritebackError::DeadLetter(e) => e.kind(),
            WritebackError::Requests(e) => e.kind(),
            WritebackError::Rows(e) => e.kind(),
        }
    }
}

fn sql_err(source: tokio_postgres::Error) -> WritebackError {
    WritebackError::Db(crate::store::db::DbError {
        context: "write-back",
        source,
    })
}

pub struct Writer {
    client: Client,
    update: Statement,
    progress: Statement,
    user_progress: Statement,
    advance_progress: Statement,
    visible: Statement,
    batch_size: usize,
    sync_log: Option<Statement>,
    visibility_timeout: Duration,
}

impl Writer {
    pub async fn connect(
        cfg: &DatabaseConfig,
        shape: &TableShape,
        batch_size: usize,
    ) -> Result<Writer, WritebackError> {
        let client = connect(cfg, "usersync-writeback").await?;
        // A later leader ends this session if this daemon freezes while
        // holding the origin (store::leader).
        crate::store::leader::mark_fenceable(&client, &cfg.slot)
            .await
            .map_err(sql_err)?;
        setup_origin_session(&client, &cfg.origin).await?;
        let sql = guarded_update_sql(shape);
        let update = client.prepare(&sql).await.map_err(sql_err)?;
        let progress = client
            .prepare("SELECT pg_replication_origin_xact_setup($1::text::pg_lsn, $2)")
            .await
            .map_err(sql_err)?;
        let user_progress = client
            .prepare(crate::store::progress::UPSERT_SQL)
            .await
            .map_err(sql_err)?;
        let advance_progress = client
            .prepare(crate::store::progress::ADVANCE_SQL)
            .await
            .map_err(sql_err)?;
        let visible = client.prepare(VISIBLE_SQL).await.map_err(sql_err)?;
        let sync_log = crate::store::synclog::prepare(&client, &cfg.origin).await?;
        Ok(Writer {
            client,
            update,
            progress,
            user_progress,
            advance_progress,
            visible,
            batch_size,
            sync_log,
            visibility_timeout: VISIBILITY_TIMEOUT,
        })
    }

    /// How long a write-back waits for its source transaction to become
    /// visible before it fails (default 300 s); tests shorten it to see
    /// the failure.
    pub fn with_visibility_timeout(mut self, timeout: Duration) -> Self {
        self.visibility_timeout = timeout;
        self
    }

    /// Writes batches until `items` closes. Each batch's sequence numbers go
    /// to `done` only after its transaction committed.
    pub async fn run(
        mut self,
        mut items: mpsc::Receiver<WriteItem>,
        done: mpsc::UnboundedSender<Durable>,
        reports: Option<mpsc::UnboundedSender<SyncReport>>,
    ) -> Result<(), WritebackError> {
        let mut batch = Vec::with_capacity(self.batch_size);
        loop {
            batch.clear();
            if items.recv_many(&mut batch, self.batch_size).await == 0 {
                return Ok(());
            }
            let refused = match self.write(&batch).await {
                Ok(()) => Vec::new(),
                Err(e) if is_row_error(&e) => self.isolate(&mut batch).await?,
                Err(e) => return Err(e),
            };
            record_metrics(&batch);
            tracing::info!(
                changes = batch.len(),
                dead_lettered = batch
                    .iter()
                    .filter(|i| matches!(i.outcome, Outcome::DeadLetter(_)))
                    .count(),
                "written back"
            );
            let seqs = batch.iter().map(|i| i.seq).collect();
            if done.send(Durable { seqs, refused }).is_err() {
                return Ok(());
            }
            for item in &batch {
                let total = item.decoded_at.elapsed();
                match &item.outcome {
                    Outcome::Synced {
                        external_id,
                        push_latency,
                        attempts,
                        ..
                    } => {
                        tracing::debug!(
                            event_id = %item.event_id,
                            user = %item.key,
                            operation = item.op.event_type(),
                            external_id = external_id.as_deref().unwrap_or(""),
                            outcome = "synced",
                            attempts,
                            push_ms = push_latency.as_millis() as u64,
                            total_ms = total.as_millis() as u64,
                            lsn = %format_lsn(item.commit_lsn),
                            "synced"
                        );
                        if let Some(r) = &reports {
                            let _ = r.send(SyncReport {
                                event_id: item.event_id.clone(),
                                key: item.key.text.clone(),
                                op: item.op,
                                external_id: external_id.clone(),
                                push_latency: *push_latency,
                                total_latency: total,
                                attempts: *attempts,
                            });
                        }
                    }
                    Outcome::DeadLetter(dl) => tracing::warn!(
                        event_id = %item.event_id,
                        user = %item.key,
                        operation = item.op.event_type(),
                        outcome = "dead_letter",
                        state = dl.state.as_str(),
                        attempts = dl.attempts,
                        status = dl.last_status,
                        total_ms = total.as_millis() as u64,
                        lsn = %format_lsn(item.commit_lsn),
                        "dead-lettered (details: `usersync dlq list`); the user is parked until `usersync dlq replay`"
                    ),
                    Outcome::Skipped => {
                        tracing::debug!(event_id = %item.event_id, user = %item.key, "sync request: the row is gone; nothing pushed")
                    }
                    Outcome::Deferred => {
                        tracing::debug!(event_id = %item.event_id, user = %item.key, "sync is off; user recorded as pending")
                    }
                    Outcome::Resume => {
                        tracing::info!(
                            "sync is on: users changed while it was off are queued for a push"
                        )
                    }
                }
            }
        }
    }

    /// A batch the database refused for a reason that belongs to one row
    /// (a value a column, a constraint or a trigger of the app rejects):
    /// each item is written on its own, and one that is still refused
    /// becomes a dead letter instead, so one user's row never stops the
    /// stream. Returns the users whose write-back was refused.
    async fn isolate(&mut self, batch: &mut [WriteItem]) -> Result<Vec<String>, WritebackError> {
        let mut refused = Vec::new();
        for item in batch.iter_mut() {
            match self.write(std::slice::from_ref(item)).await {
                Ok(()) => {}
                Err(e) if is_row_error(&e) => {
                    item.outcome = Outcome::DeadLetter(Box::new(refused_dead_letter(item, &e)));
                    self.write(std::slice::from_ref(item)).await?;
                    refused.push(item.key.text.clone());
                }
                Err(e) => return Err(e),
            }
        }
        Ok(refused)
    }

    async fn write(&mut self, batch: &[WriteItem]) -> Result<(), WritebackError> {
        // The last sync per user wins: a batch may hold several syncs of one
        // user, and one UPDATE cannot apply two rows to the same target.
        let mut latest: HashMap<&str, (Option<&str>, SystemTime, u32)> = HashMap::new();
        let mut dead = Vec::new();
        for item in batch {
            match &item.outcome {
                Outcome::Synced {
                    external_id,
                    synced_at,
                    ..
                } if item.op != Operation::Delete => {
                    latest.insert(
                        item.key.text.as_str(),
                        (external_id.as_deref(), *synced_at, item.xid),
                    );
                }
                Outcome::Synced { .. } => {}
                Outcome::DeadLetter(dl) => dead.push(dl),
                Outcome::Skipped | Outcome::Deferred | Outcome::Resume => {}
            }
        }

        let keys: Vec<&str> = latest.keys().copied().collect();
        let ext: Vec<Option<&str>> = keys.iter().map(|k| latest[k].0).collect();
        let at: Vec<SystemTime> = keys.iter().map(|k| latest[k].1).collect();
        let max_lsn = batch.iter().map(|i| i.commit_lsn).max().unwrap_or(0);
        let (update, visible) = (self.update.clone(), self.visible.clone());
        let tx = self.client.transaction().await.map_err(sql_err)?;
        // Records the highest source LSN written back in the origin's progress.
        tx.execute(&self.progress, &[&format_lsn(max_lsn), &SystemTime::now()])
            .await
            .map_err(sql_err)?;
        if !keys.is_empty() {
            let matched = tx
                .query(&self.update, &[&keys, &ext, &at])
                .await
                .map_err(sql_err)?;
            if matched.len() < keys.len() {
                let matched: HashSet<String> = matched
                    .iter()
                    .map(|r| r.try_get(0))
                    .collect::<Result<_, _>>()
                    .map_err(sql_err)?;
                let unmatched: Vec<&str> = keys
                    .iter()
                    .copied()
                    .filter(|k| !matched.contains(*k))
                    .collect();
                let timeout = self.visibility_timeout;
                await_visibility(&tx, &update, &visible, unmatched, &latest, timeout).await?;
            }
        }
        for dl in dead {
            deadletter::insert(&tx, dl).await?;
        }
        crate::store::requests::write_marks(&tx, batch).await?;
        // Per user, the newest change this batch makes durable.
        let mut newest: HashMap<&str, Newest> = HashMap::new();
        for item in batch {
            if matches!(item.outcome, Outcome::Resume) {
                continue;
            }
            let at = (item.commit_lsn, item.position);
            let entry = newest.entry(item.key.text.as_str()).or_insert(Newest {
                at: (0, 0),
                hash: None,
                known: false,
            });
            entry.known |= item.op != Operation::Insert;
            if at >= entry.at {
                entry.at = at;
                entry.hash = item.values_hash.as_deref();
            }
        }
        // Known users are moved forward in place first (no row lock logged);
        // the rest, and any the guess missed, go through the upsert.
        let (known, new): (Vec<&str>, Vec<&str>) =
            newest.keys().copied().partition(|k| newest[k].known);
        let mut rest = new;
        if !known.is_empty() {
            let args = progress_args(&known, &newest);
            let moved: HashSet<String> = tx
                .query(&self.advance_progress, &[&known, &args.0, &args.1, &args.2])
                .await
                .map_err(sql_err)?
                .iter()
                .map(|r| r.try_get(0))
                .collect::<Result<_, _>>()
                .map_err(sql_err)?;
            rest.extend(known.iter().copied().filter(|k| !moved.contains(*k)));
        }
        if !rest.is_empty() {
            let args = progress_args(&rest, &newest);
            tx.execute(&self.user_progress, &[&rest, &args.0, &args.1, &args.2])
                .await
                .map_err(sql_err)?;
        }
        crate::store::synclog::insert(&tx, self.sync_log.as_ref(), batch).await?;
        tx.commit().await.map_err(sql_err)?;
        Ok(())
    }
}

/// A user's newest change in a write-back batch, for its progress record.
#[derive(Clone, Copy)]
struct Newest<'a> {
    /// (commit LSN, position) of the change.
    at: (Lsn, u32),
    /// The hash of the values it pushed, if it pushed any.
    hash: Option<&'a str>,
    /// Whether the user may have a record already: the batch holds a
    /// change of it other than an insert.
    known: bool,
}

/// The per-user columns of the progress statements, in the order of `users`:
/// commit LSNs as text, positions, value hashes.
fn progress_args<'a>(
    users: &[&str],
    newest: &HashMap<&str, Newest<'a>>,
) -> (Vec<String>, Vec<i32>, Vec<Option<&'a str>>) {
    let mut lsns = Vec::with_capacity(users.len());
    let mut positions = Vec::with_capacity(users.len());
    let mut hashes = Vec::with_capacity(users.len());
    for k in users {
        let n = newest[k];
        lsns.push(format_lsn(n.at.0));
        // A position is a change's index in its transaction; the column is
        // int4, and no transaction holds 2^31 row changes of one table.
        positions.push(i32::try_from(n.at.1).unwrap_or(i32::MAX));
        hashes.push(n.hash);
    }
    (lsns, positions, hashes)
}

/// SQLSTATE classes that belong to the values of one row rather than to the
/// session or the setup: data exceptions (a value too long for the app's
/// column), integrity violations (the app's constraints), errors raised by
/// the app's triggers and functions, program limits (a row too big).
fn is_row_error(e: &WritebackError) -> bool {
    let WritebackError::Db(db) = e else {
        return false;
    };
    db.code()
        .and_then(|c| c.code().get(..2))
        .is_some_and(|class| matches!(class, "22" | "23" | "P0" | "54" | "2F" | "38" | "39"))
}

/// The dead letter of a change whose push succeeded but whose write-back the
/// database refused; `dlq replay` pushes the current row and writes it back
/// again once the app's table accepts it.
fn refused_dead_letter(item: &WriteItem, e: &WritebackError) -> NewDeadLetter {
    let now = SystemTime::now();
    let (external_id, attempts) = match &item.outcome {
        Outcome::Synced {
            external_id,
            attempts,
            ..
        } => (external_id.clone(), *attempts),
        _ => (None, 0),
    };
    NewDeadLetter {
        event_id: item.event_id.clone(),
        user_key: item.key.text.clone(),
        operation: item.op.event_type(),
        state: DeadLetterState::Failed,
        envelope: serde_json::json!({
            "type": item.op.event_type(),
            "key": item.key.json,
            "external_id": external_id,
        }),
        last_status: None,
        // The server's message and code, not its detail: a constraint's
        // detail spells out the whole row.
        last_error: match e {
            WritebackError::Db(db) => match db.source.as_db_error() {
                Some(d) => format!(
                    "pushed, but the database refused the write-back (SQLSTATE {}): {}",
                    d.code().code(),
                    d.message()
                ),
                None => format!("pushed, but the database refused the write-back: {e}"),
            },
            other => format!("pushed, but the database refused the write-back: {other}"),
        },
        attempts,
        first_attempt_at: now,
        last_attempt_at: now,
        commit_lsn: format_lsn(item.commit_lsn),
    }
}

/// Whether every given source transaction (32-bit xid, widened with the
/// epoch of the current snapshot) is visible to a new snapshot.
const VISIBLE_SQL: &str = "SELECT coalesce(bool_and(pg_visible_in_snapshot(\
     (CASE WHEN (((m.xmax >> 32) << 32) | x) > m.xmax \
           THEN (((m.xmax >> 32) << 32) | x) - 4294967296 \
           ELSE (((m.xmax >> 32) << 32) | x) END)::text::xid8, m.snap)), true) \
     FROM (SELECT s AS snap, pg_snapshot_xmax(s)::text::bigint AS xmax FROM pg_current_snapshot() AS s) AS m, \
     unnest($1::int8[]) AS x";

/// How long a write-back waits for its source transaction to become visible
/// by default.
const VISIBILITY_TIMEOUT: Duration = Duration::from_secs(300);

/// pgoutput sends a transaction once its commit is flushed, a moment
/// before other sessions can see its rows (longer with synchronous
/// replication). A write-back that ran in that gap matched nothing;
/// retry it until the source transaction is visible. A row still
/// unmatched then was deleted meanwhile or has a newer sync: both fine.
async fn await_visibility(
    tx: &tokio_postgres::Transaction<'_>,
    update: &Statement,
    visible_sql: &Statement,
    mut unmatched: Vec<&str>,
    latest: &HashMap<&str, (Option<&str>, SystemTime, u32)>,
    timeout: Duration,
) -> Result<(), WritebackError> {
    let deadline = Instant::now() + timeout;
    let mut wait = Duration::from_millis(2);
    while !unmatched.is_empty() {
        let xids: Vec<i64> = unmatched.iter().map(|k| i64::from(latest[k].2)).collect();
        let visible: bool = tx
            .query_one(visible_sql, &[&xids])
            .await
            .map_err(sql_err)?
            .try_get(0)
            .map_err(sql_err)?;
        // Always update again after the check: its snapshot is newer than
        // the check's, so it sees every row the check found visible.
        let ext: Vec<Option<&str>> = unmatched.iter().map(|k| latest[k].0).collect();
        let at: Vec<SystemTime> = unmatched.iter().map(|k| latest[k].1).collect();
        let matched: HashSet<String> = tx
            .query(update, &[&unmatched, &ext, &at])
            .await
            .map_err(sql_err)?
            .iter()
            .map(|r| r.try_get(0))
            .collect::<Result<_, _>>()
            .map_err(sql_err)?;
        unmatched.retain(|k| !matched.contains(*k));
        if visible || unmatched.is_empty() {
            return Ok(());
        }
        if Instant::now() > deadline {
            return Err(WritebackError::Invisible {
                count: unmatched.len(),
                timeout,
            });
        }
        tokio::time::sleep(wait).await;
        wait = (wait * 2).min(Duration::from_millis(200));
    }
    Ok(())
}

/// Tags this session's transactions with our origin. A killed daemon's
/// backend can hold the origin for a moment after the process is gone, so a
/// busy origin is retried briefly before it is reported.
async fn setup_origin_session(client: &Client, origin: &str) -> Result<(), WritebackError> {
    match crate::store::origin::take(client, origin, Duration::from_secs(30)).await {
        Ok(()) => Ok(()),
        Err(OriginError::Busy(e)) => Err(WritebackError::OriginBusy {
            origin: origin.to_string(),
            reason: error_text(&e),
        }),
        Err(OriginError::Failed(source)) => Err(WritebackError::OriginSetup {
            origin: origin.to_string(),
            source,
        }),
    }
}

/// The guarded write-back, the one statement that writes the sync columns.
/// Parameters: keys (text), external ids (null keeps the stored one) and
/// sync times, as arrays of one length; a row is only touched if its
/// `external_synced_at` is older, so a newer sync is never overwritten.
/// Returns the keys it updated.
pub fn guarded_update_sql(shape: &TableShape) -> String {
    format!(
        "UPDATE {table} AS u SET {ext} = COALESCE(w.ext, u.{ext}), {at} = w.at \
         FROM unnest($1::text[], $2::text[], $3::timestamptz[]) AS w(k, ext, at) \
         WHERE u.{key} = w.k::{key_type} AND (u.{at} IS NULL OR u.{at} < w.at) \
         RETURNING w.k",
        table = shape.table.quoted(),
        ext = quote_ident(EXTERNAL_ID_COLUMN),
        at = quote_ident(SYNCED_AT_COLUMN),
        key = quote_ident(&shape.key_column),
        key_type = shape.key_type,
    )
}

/// One user through the guarded write-back ([`guarded_update_sql`]), for
/// the commands that sync a single user (`sync-user`, `dlq replay`). A row
/// that is gone or has a newer sync is left as it is, which is no error.
pub async fn write_back_one<C: GenericClient>(
    client: &C,
    guarded_update: &str,
    key: &str,
    external_id: Option<&str>,
    at: SystemTime,
) -> Result<(), tokio_postgres::Error> {
    let keys: &[&str] = &[key];
    let ext: &[Option<&str>] = &[external_id];
    let at: &[SystemTime] = &[at];
    client.execute(guarded_update, &[&keys, &ext, &at]).await?;
    Ok(())
}

/// Reads a row's current external id: for an update or delete decoded
/// before its create's write-back landed (after a restart, when the id the
/// create returned is no longer in memory), so the sink need not search for
/// the record (Stripe's search is only eventually consistent).
pub struct ExternalIds {
    client: Client,
    select: Statement,
}

impl ExternalIds {
    pub async fn connect(cfg: &DatabaseConfig, shape: &TableShape) -> Result<Self, WritebackError> {
        let client = connect(cfg, "usersync-lookup").await?;
        let sql = format!(
            "SELECT {ext} FROM {table} WHERE {key} = $1::text::{key_type}",
            ext = quote_ident(EXTERNAL_ID_COLUMN),
            table = shape.table.quoted(),
            key = quote_ident(&shape.key_column),
            key_type = shape.key_type,
        );
        let select = client.prepare(&sql).await.map_err(sql_err)?;
        Ok(ExternalIds { client, select })
    }

    /// `None` when the row is gone, has no id, or the read failed (the sink
    /// then finds the record its own way).
    pub async fn get(&self, key: &str) -> Option<String> {
        match self.client.query_opt(&self.select, &[&key]).await {
            Ok(row) => row.and_then(|r| r.try_get::<_, Option<String>>(0).ok().flatten()),
            Err(e) => {
                tracing::debug!(error = %error_text(&e), "external id look-up failed");
                None
            }
        }
    }
}

/// A committed batch in the metrics: synced changes by operation with their
/// commit-to-sync latency, dead letters by state.
fn record_metrics(batch: &[WriteItem]) {
    use crate::core::outcome::DeadLetterState;
    use crate::observe::metrics;
    let now_us = SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_micros()).unwrap_or(i64::MAX))
        .unwrap_or(0);
    for item in batch {
        match &item.outcome {
            Outcome::Synced { .. } => metrics::synced(item.op.label(), item.commit_time_us, now_us),
            Outcome::DeadLetter(dl) => metrics::dead_lettered(dl.state == DeadLetterState::Failed),
            Outcome::Skipped | Outcome::Deferred | Outcome::Resume => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::names::TableName;

    #[test]
    fn guarded_update_quotes_and_casts_the_key() {
        let shape = TableShape {
            table: TableName::parse("app.Users").unwrap(),
            key_column: "user id".into(),
            key_type: "uuid".into(),
            columns: Vec::new(),
            replica_identity: 'd',
        };
        let sql = guarded_update_sql(&shape);
        assert!(sql.starts_with(&format!("UPDATE {} AS u SET ", shape.table.quoted())));
        assert!(sql.contains(r#"WHERE u."user id" = w.k::uuid"#), "{sql}");
        assert!(
            sql.contains(r#"(u."external_synced_at" IS NULL OR u."external_synced_at" < w.at)"#),
            "{sql}"
        );
        assert!(sql.ends_with("RETURNING w.k"));
    }

    #[test]
    fn progress_args_are_one_column_per_user_in_the_users_order() {
        let mut newest = HashMap::new();
        newest.insert(
            "a",
            Newest {
                at: (0x1_0000_002A, 3),
                hash: Some("h-a"),
                known: true,
            },
        );
        newest.insert(
            "b",
            Newest {
                at: (0x16B_3748, u32::MAX),
                hash: None,
                known: false,
            },
        );
        let (lsns, positions, hashes) = progress_args(&["b", "a"], &newest);
        assert_eq!(lsns, ["0/16B3748", "1/2A"]);
        // The column is int4: a position past it is clamped, never wrapped.
        assert_eq!(positions, [i32::MAX, 3]);
        assert_eq!(hashes, [None, Some("h-a")]);
    }
}
