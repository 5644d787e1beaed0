//! Sync requests: "push this user's current row now", asked by `backfill`,
//! `sync-user` or the off switch being turned back on. A request is a row
//! INSERTed into `usersync.sync_requests`, a table in the publication, so it
//! travels through the replication stream, ordered with the users' own
//! changes, into the same per-user lane. When its turn comes the lane reads
//! the row as it is then and pushes it; the write-back transaction marks the
//! request done. This module owns those tables (`sync_requests`,
//! `pending_users`, the `values_hash` column of `user_progress`), the hash
//! of pushed values, and the SQL the writer and the commands share.

use serde_json::{Map, Value};
use sha2::{Digest, Sha256};
use tokio_postgres::Client;

use crate::config::{quote_ident, quote_literal, DatabaseConfig};
use crate::store::db::error_text;

/// Schema-qualified name, as the reader matches the Relation message.
pub const REQUESTS_SCHEMA: &str = "usersync";
pub const REQUESTS_TABLE: &str = "sync_requests";

pub const REQUESTS_DDL: &str = "CREATE TABLE IF NOT EXISTS usersync.sync_requests (
    id bigserial PRIMARY KEY,
    user_key text NOT NULL,
    reason text NOT NULL,
    requested_at timestamptz NOT NULL DEFAULT now(),
    done_at timestamptz,
    outcome text,
    external_id text,
    error text,
    latency_ms double precision
);";

pub const PENDING_DDL: &str = "CREATE TABLE IF NOT EXISTS usersync.pending_users (
    user_key text PRIMARY KEY,
    first_changed_at timestamptz NOT NULL DEFAULT now()
);";

/// Installs made before the hash existed get the column; rows without it
/// count as "never synced by this version" (backfill pushes them).
pub const HASH_DDL: &str =
    "ALTER TABLE usersync.user_progress ADD COLUMN IF NOT EXISTS values_hash text;";

/// Adds the requests table to the publication, so requests reach the daemon
/// through the stream.
pub fn publication_sql(cfg: &DatabaseConfig) -> String {
    format!(
        "DO $$\nBEGIN\n    IF NOT EXISTS (SELECT 1 FROM pg_publication_tables WHERE pubname = {pub_lit}\n                   AND schemaname = 'usersync' AND tablename = 'sync_requests') THEN\n        ALTER PUBLICATION {pub_ident} ADD TABLE usersync.sync_requests;\n    END IF;\nEND\n$$;",
        pub_lit = quote_literal(&cfg.publication),
        pub_ident = quote_ident(&cfg.publication),
    )
}

/// Marks requests done, in the write-back transaction. Parameters: ids,
/// outcomes, external ids, errors, latencies in ms.
pub const MARK_DONE_SQL: &str = "UPDATE usersync.sync_requests AS r SET done_at = now(), \
     outcome = w.o, external_id = w.e, error = w.err, latency_ms = w.ms \
     FROM unnest($1::int8[], $2::text[], $3::text[], $4::text[], $5::float8[]) AS w(id, o, e, err, ms) \
     WHERE r.id = w.id RETURNING r.id";

/// Remembers users changed while sync is off. Parameter: keys.
pub const DEFER_SQL: &str = "INSERT INTO usersync.pending_users (user_key) \
     SELECT DISTINCT k FROM unnest($1::text[]) AS k ON CONFLICT (user_key) DO NOTHING";

/// Turns every pending user into one request, in one statement: they come
/// back through the stream and push each user's current state once.
pub const RESUME_SQL: &str =
    "WITH moved AS (DELETE FROM usersync.pending_users RETURNING user_key, first_changed_at) \
     INSERT INTO usersync.sync_requests (user_key, reason) \
     SELECT user_key, 'resume' FROM moved ORDER BY first_changed_at, user_key";

/// What became of a request, as stored in `sync_requests.outcome`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RequestOutcome {
    Created,
    Updated,
    /// The row is gone: its deletion is (or was) pushed as its own change.
    Unchanged,
    Failed,
    /// The user has dead letters: stored behind them, pushed by `dlq replay`.
    Parked,
    /// Sync is switched off: the user is pushed when it is switched on.
    Deferred,
}

impl RequestOutcome {
    pub fn as_str(self) -> &'static str {
        match self {
            RequestOutcome::Created => "created",
            RequestOutcome::Updated => "updated",
            RequestOutcome::Unchanged => "unchanged",
            RequestOutcome::Failed => "failed",
            RequestOutcome::Parked => "parked",
            RequestOutcome::Deferred => "deferred",
        }
    }
}

/// A request's result, carried to the writer with the change it produced.
#[derive(Debug, Clone)]
pub struct RequestMark {
    pub id: i64,
    pub outcome: RequestOutcome,
    pub external_id: Option<String>,
    pub error: Option<String>,
    pub latency_ms: Option<f64>,
}

impl RequestMark {
    pub fn new(id: i64, outcome: RequestOutcome) -> Self {
        RequestMark {
            id,
            outcome,
            external_id: None,
            error: None,
            latency_ms: None,
        }
    }
}

/// SHA-256 (hex) of the synced values as pushed. `serde_json::Map` keeps
/// its keys sorted, so the same values always give the same text.
pub fn values_hash(data: &Map<String, Value>) -> String {
    let text = serde_json::to_string(data).unwrap_or_default();
    let digest = Sha256::digest(text.as_bytes());
    digest.iter().map(|b| format!("{b:02x}")).collect()
}

#[derive(Debug, thiserror::Error)]
pub enum RequestError {
    #[error("database: {0}")]
    Sql(String),
    #[error(
        "{0} does not exist; run `usersync setup` (or `usersync setup --print-sql` for the DBA)"
    )]
    Missing(&'static str),
    #[error("publication {0} does not include usersync.sync_requests (backfill and sync-user send their requests through it); run `usersync setup` or: ALTER PUBLICATION {0} ADD TABLE usersync.sync_requests;")]
    NotPublished(String),
}

fn sql_err(e: tokio_postgres::Error) -> RequestError {
    RequestError::Sql(error_text(&e))
}

/// The tables and column this feature needs exist, and requests are
/// published. Part of the daemon's preflight.
pub async fn check(client: &Client, cfg: &DatabaseConfig) -> Result<(), RequestError> {
    for table in [
        "usersync.sync_requests",
        "usersync.pending_users",
        "usersync.backfill",
    ] {
        let exists: bool = client
            .query_one("SELECT to_regclass($1) IS NOT NULL", &[&table])
            .await
            .map_err(sql_err)?
            .get(0);
        if !exists {
            return Err(RequestError::Missing(match table {
                "usersync.sync_requests" => "table usersync.sync_requests",
                "usersync.pending_users" => "table usersync.pending_users",
                _ => "table usersync.backfill",
            }));
        }
    }
    let has_hash = client
        .query_opt(
            "SELECT 1 FROM information_schema.columns WHERE table_schema = 'usersync' \
             AND table_name = 'user_progress' AND column_name = 'values_hash'",
            &[],
        )
        .await
        .map_err(sql_err)?
        .is_some();
    if !has_hash {
        return Err(RequestError::Missing(
            "column usersync.user_progress.values_hash",
        ));
    }
    let published = client
        .query_opt(
            "SELECT 1 FROM pg_publication_tables WHERE pubname = $1 \
             AND schemaname = 'usersync' AND tablename = 'sync_requests'",
            &[&cfg.publication],
        )
        .await
        .map_err(sql_err)?
        .is_some();
    if !published {
        return Err(RequestError::NotPublished(cfg.publication.clone()));
    }
    Ok(())
}

/// Whether a daemon is consuming the slot right now.
pub async fn slot_active(client: &Client, slot: &str) -> Result<bool, RequestError> {
    Ok(client
        .query_opt(
            "SELECT active FROM pg_replication_slots WHERE slot_name = $1",
            &[&slot],
        )
        .await
        .map_err(sql_err)?
        .map(|r| r.get::<_, bool>(0))
        .unwrap_or(false))
}

/// Inserts one request per key; returns their ids.
pub async fn enqueue(
    client: &Client,
    keys: &[String],
    reason: &str,
) -> Result<Vec<i64>, RequestError> {
    Ok(client
        .query(
            "INSERT INTO usersync.sync_requests (user_key, reason) \
             SELECT k, $2 FROM unnest($1::text[]) WITH ORDINALITY AS u(k, n) ORDER BY n RETURNING id",
            &[&keys, &reason],
        )
        .await
        .map_err(sql_err)?
        .iter()
        .map(|r| r.get(0))
        .collect())
}

/// How many of `ids` are not done yet.
pub async fn open_count(client: &Client, ids: &[i64]) -> Result<i64, RequestError> {
    Ok(client
        .query_one(
            "SELECT count(*) FROM usersync.sync_requests WHERE id = ANY($1) AND done_at IS NULL",
            &[&ids],
        )
        .await
        .map_err(sql_err)?
        .get(0))
}

/// The writer's part, inside its origin-tagged transaction: users deferred
/// while sync is off, pending users turned into requests when it is switched
/// on (after the deferrals of the same batch), and requests marked done. Each
/// is one statement per batch. Being origin-tagged, none of these writes is
/// pushed; the requests a resume inserts are still routed (see the reader).
pub async fn write_marks(
    tx: &tokio_postgres::Transaction<'_>,
    batch: &[crate::store::writeback::WriteItem],
) -> Result<(), crate::store::writeback::WritebackError> {
    use crate::store::writeback::{Outcome, WritebackError};
    let err = |e: tokio_postgres::Error| WritebackError::Sql(error_text(&e));
    let deferred: Vec<&str> = batch
        .iter()
        .filter(|i| matches!(i.outcome, Outcome::Deferred))
        .map(|i| i.key.text.as_str())
        .collect();
    if !deferred.is_empty() {
        tx.execute(DEFER_SQL, &[&deferred]).await.map_err(err)?;
    }
    if batch.iter().any(|i| matches!(i.outcome, Outcome::Resume)) {
        let n = tx.execute(RESUME_SQL, &[]).await.map_err(err)?;
        if n > 0 {
            tracing::info!(
                users = n,
                "sync switched on: pushing the users changed while it was off"
            );
        }
    }
    let marks: Vec<&RequestMark> = batch.iter().filter_map(|i| i.request.as_ref()).collect();
    if !marks.is_empty() {
        // pgoutput sends a transaction a moment before other sessions can
        // see it (the visibility gap in DESIGN.md): a request row may not be
        // visible yet. Each statement takes a new snapshot, so retry the
        // unmatched ones briefly; a request row deleted meanwhile is given up.
        let mut marks = marks;
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
        let mut wait = std::time::Duration::from_millis(2);
        loop {
            let ids: Vec<i64> = marks.iter().map(|m| m.id).collect();
            let outcomes: Vec<&str> = marks.iter().map(|m| m.outcome.as_str()).collect();
            let ext: Vec<Option<&str>> = marks.iter().map(|m| m.external_id.as_deref()).collect();
            let errors: Vec<Option<&str>> = marks.iter().map(|m| m.error.as_deref()).collect();
            let ms: Vec<Option<f64>> = marks.iter().map(|m| m.latency_ms).collect();
            let matched: std::collections::HashSet<i64> = tx
                .query(MARK_DONE_SQL, &[&ids, &outcomes, &ext, &errors, &ms])
                .await
                .map_err(err)?
                .iter()
                .map(|r| r.get(0))
                .collect();
            marks.retain(|m| !matched.contains(&m.id));
            if marks.is_empty() {
                break;
            }
            if std::time::Instant::now() > deadline {
                tracing::warn!(
                    requests = marks.len(),
                    "sync requests not found to mark done (deleted meanwhile?)"
                );
                break;
            }
            tokio::time::sleep(wait).await;
            wait = (wait * 2).min(std::time::Duration::from_millis(100));
        }
    }
    Ok(())
}

/// Reads users' current rows for the lanes' sync requests: one session with
/// the stream's settings (see `replay::SESSION_SETTINGS`), shared by the
/// concurrent pushes (tokio-postgres pipelines their queries).
pub struct CurrentRows {
    client: Client,
    reader: crate::app::dlq::RowReader,
}

impl CurrentRows {
    pub async fn connect(
        cfg: &crate::config::Config,
        shape: &crate::store::schema::TableShape,
    ) -> Result<CurrentRows, crate::app::dlq::ReplayError> {
        let client = crate::store::db::connect(&cfg.database, "usersync-requests").await?;
        client
            .batch_execute(crate::app::dlq::SESSION_SETTINGS)
            .await
            .map_err(|e| crate::app::dlq::ReplayError::Sql(error_text(&e)))?;
        let reader =
            crate::app::dlq::RowReader::new(&client, shape.clone(), &cfg.sink.columns).await?;
        Ok(CurrentRows { client, reader })
    }

    pub async fn read(
        &self,
        key: &str,
    ) -> Result<Option<crate::app::dlq::CurrentRow>, crate::app::dlq::ReplayError> {
        self.reader.read(&self.client, key).await
    }
}

/// A request that needs no push: its row is gone (the deletion travels as
/// its own change) or could not be read.
pub struct NoPush(RequestMark);

impl NoPush {
    pub fn into_write_item(
        self,
        seq: u64,
        change: &crate::core::change::Change,
    ) -> crate::store::writeback::WriteItem {
        let mut item = crate::store::writeback::WriteItem::new(
            seq,
            change,
            crate::store::writeback::Outcome::Skipped,
        );
        item.request = Some(self.0);
        item
    }
}

/// Turns a request's placeholder change into the push of the user's current
/// row: created when no external id is known (the sink links a record that
/// already exists), updated otherwise. Returns the external id to push with.
pub async fn prepare(
    rows: Option<&CurrentRows>,
    id: i64,
    change: &mut crate::core::change::Change,
    known: Option<String>,
    sink: &str,
) -> Result<Option<String>, NoPush> {
    use crate::core::change::Operation;
    let Some(rows) = rows else {
        let mut mark = RequestMark::new(id, RequestOutcome::Failed);
        mark.error = Some("this session cannot read rows for sync requests".into());
        return Err(NoPush(mark));
    };
    let row = match rows.read(&change.key.text).await {
        Ok(Some(row)) => row,
        Ok(None) => return Err(NoPush(RequestMark::new(id, RequestOutcome::Unchanged))),
        Err(e) => {
            tracing::warn!(request = id, user = %change.key, error = %e, "sync request: cannot read the row; not pushed");
            let mut mark = RequestMark::new(id, RequestOutcome::Failed);
            mark.error = Some(e.to_string());
            return Err(NoPush(mark));
        }
    };
    let external_id = known.or(row.external_id);
    // Stripe links an existing customer only on the update path (search by
    // metadata key, then create); its creates are deduplicated by
    // idempotency keys alone, which a customer made by another tool lacks.
    change.op = if external_id.is_some() || sink == "stripe" {
        Operation::Update
    } else {
        Operation::Insert
    };
    change.key = row.key;
    change.changed = row.data.keys().cloned().collect();
    change.data = Some(row.data);
    change.external_id = external_id.clone();
    Ok(external_id)
}

/// The hash of the values a successful push sent and, for a request, its mark.
pub fn annotate_synced(
    item: &mut crate::store::writeback::WriteItem,
    change: &crate::core::change::Change,
    request: Option<i64>,
    external_id: Option<&str>,
    latency: std::time::Duration,
) {
    use crate::core::change::Operation;
    if change.op != Operation::Delete && change.omitted.is_empty() {
        item.values_hash = change.data.as_ref().map(values_hash);
    }
    if let Some(id) = request {
        let outcome = match change.op {
            Operation::Delete => RequestOutcome::Unchanged,
            _ if change.external_id.is_none() => RequestOutcome::Created,
            _ => RequestOutcome::Updated,
        };
        let mut mark = RequestMark::new(id, outcome);
        mark.external_id = external_id.map(str::to_string);
        mark.latency_ms = Some(latency.as_secs_f64() * 1000.0);
        item.request = Some(mark);
    }
}

pub fn parked_mark(request: Option<i64>) -> Option<RequestMark> {
    request.map(|id| {
        let mut mark = RequestMark::new(id, RequestOutcome::Parked);
        mark.error = Some(
            "the user has dead letters and is parked behind them; see `usersync dlq list`, then `usersync dlq replay`".into(),
        );
        mark
    })
}

pub fn failed_mark(
    request: Option<i64>,
    failed: &crate::sink::retry::PushFailed,
) -> Option<RequestMark> {
    request.map(|id| {
        let mut mark = RequestMark::new(id, RequestOutcome::Failed);
        mark.error = Some(format!(
            "{} after {} attempt(s); dead-lettered (see `usersync dlq list`)",
            failed.error, failed.attempts
        ));
        mark
    })
}

/// A change received while sync is off: its user is recorded as pending.
pub fn deferred(
    seq: u64,
    change: &crate::core::change::Change,
    request: Option<i64>,
) -> crate::store::writeback::WriteItem {
    let mut item = crate::store::writeback::WriteItem::new(
        seq,
        change,
        crate::store::writeback::Outcome::Deferred,
    );
    item.request = request.map(|id| {
        let mut mark = RequestMark::new(id, RequestOutcome::Deferred);
        mark.error = Some(
            "sync is switched off ([sync] enabled = false); the user is pushed when it is switched on".into(),
        );
        mark
    });
    item
}

/// Queues the resume (pending users become requests) behind every deferral
/// already handed to the writer.
pub async fn send_resume(
    writer: &tokio::sync::mpsc::Sender<crate::store::writeback::WriteItem>,
    ack: &mut crate::pipeline::AckTracker,
) -> Result<(), crate::pipeline::PipelineError> {
    use crate::core::change::{Operation, UserKey};
    let item = crate::store::writeback::WriteItem {
        seq: ack.register(),
        event_id: "resume".into(),
        key: UserKey {
            text: String::new(),
            json: Value::Null,
        },
        op: Operation::Update,
        commit_lsn: 0,
        position: 0,
        xid: 0,
        decoded_at: std::time::Instant::now(),
        outcome: crate::store::writeback::Outcome::Resume,
        commit_time_us: 0,
        values_hash: None,
        request: None,
    };
    writer
        .send(item)
        .await
        .map_err(|_| crate::pipeline::PipelineError::WriterGone)
}

/// The switch's next value; `None` once nobody can change it any more.
pub async fn switch_changed(
    switch: &mut Option<tokio::sync::watch::Receiver<bool>>,
) -> Option<bool> {
    match switch {
        Some(rx) => match rx.changed().await {
            Ok(()) => Some(*rx.borrow_and_update()),
            Err(_) => None,
        },
        None => std::future::pending().await,
    }
}

/// The off switch for `usersync run`: on SIGHUP the config is read again and
/// `[sync] enabled` applied at once; any other changed key needs a restart.
pub fn spawn_reload_handler(
    path: std::path::PathBuf,
    explicit: bool,
    cfg: &crate::config::Config,
) -> tokio::sync::watch::Receiver<bool> {
    let (tx, rx) = tokio::sync::watch::channel(cfg.sync.enabled);
    let mut current = cfg.clone();
    tokio::spawn(async move {
        let mut hup = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()) {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(error = %e, "cannot listen for SIGHUP; [sync] enabled applies at restart only");
                // Keeps the sender, so the switch stays as configured.
                std::future::pending::<()>().await;
                return;
            }
        };
        while hup.recv().await.is_some() {
            let new = match crate::config::Config::load(&path, explicit, &crate::config::ProcessEnv)
            {
                Ok(c) => c,
                Err(e) => {
                    tracing::error!(error = %e, "SIGHUP: the config is invalid; nothing changed");
                    continue;
                }
            };
            let mut others = new.clone();
            others.sync.enabled = current.sync.enabled;
            if format!("{others:?}") != format!("{current:?}") {
                tracing::warn!(
                    "SIGHUP: keys other than [sync] enabled changed; restart to apply them"
                );
            }
            if new.sync.enabled != current.sync.enabled {
                tracing::info!(
                    enabled = new.sync.enabled,
                    "SIGHUP: applying [sync] enabled"
                );
            } else {
                tracing::info!(
                    enabled = new.sync.enabled,
                    "SIGHUP: [sync] enabled unchanged"
                );
            }
            current.sync.enabled = new.sync.enabled;
            let _ = tx.send(new.sync.enabled);
        }
    });
    rx
}

/// How long an answered request is kept: `sync-user` and `backfill` read
/// their outcomes within minutes; a day leaves room to look one up by hand.
pub const DONE_RETENTION: &str = "1 day";
const PRUNE_EVERY: std::time::Duration = std::time::Duration::from_secs(600);
const PRUNE_BATCH: i64 = 10_000;

/// Deletes answered requests older than [`DONE_RETENTION`], in bounded
/// batches (each delete is also decoded by the walsender, and ignored).
/// Unanswered requests are never touched: the stream still owes them a push.
pub async fn prune_done(client: &Client) -> Result<u64, tokio_postgres::Error> {
    let sql = format!(
        "DELETE FROM usersync.sync_requests WHERE id IN (SELECT id FROM usersync.sync_requests \
         WHERE done_at < now() - interval '{DONE_RETENTION}' ORDER BY id LIMIT $1)"
    );
    let mut total = 0;
    loop {
        let n = client.execute(&sql, &[&PRUNE_BATCH]).await?;
        total += n;
        if n < PRUNE_BATCH as u64 {
            return Ok(total);
        }
    }
}

/// Runs [`prune_done`] at start and every ten minutes until `cancel`.
pub fn spawn_pruner(db: DatabaseConfig, cancel: tokio_util::sync::CancellationToken) {
    crate::store::db::spawn_periodic(
        db,
        "usersync-requests",
        "prune usersync.sync_requests",
        PRUNE_EVERY,
        cancel,
        |c| async move {
            let rows = prune_done(&c).await?;
            if rows > 0 {
                tracing::info!(rows, "deleted answered sync requests older than a day");
            }
            Ok(())
        },
    );
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn hash_ignores_insertion_order_and_sees_values() {
        let a: Map<String, Value> =
            serde_json::from_value(json!({"id": 1, "email": "a@x"})).unwrap();
        let mut b = Map::new();
        b.insert("email".into(), json!("a@x"));
        b.insert("id".into(), json!(1));
        assert_eq!(values_hash(&a), values_hash(&b));
        b.insert("email".into(), json!("b@x"));
        assert_ne!(values_hash(&a), values_hash(&b));
        assert_eq!(values_hash(&a).len(), 64);
    }
}
