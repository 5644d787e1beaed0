//! Sync requests: "push this user's current row now", asked by `backfill`,
//! `sync-user` or the off switch being turned back on. A request is a row
//! INSERTed into `usersync.sync_requests`, a table in the publication, so it
//! travels through the replication stream, ordered with the users' own
//! changes, into the same per-user lane. When its turn comes the lane reads
//! the row as it is then and pushes it; the write-back transaction marks the
//! request done. This module owns those tables (`sync_requests`,
//! `pending_users`, the `values_hash` column of `user_progress`), the hash
//! of pushed values, and the SQL the writer and the commands share.

use crate::core::outcome::RequestMark;
use tokio_postgres::Client;

use crate::config::{quote_ident, quote_literal, DatabaseConfig};
use crate::core::error::{Classify, ErrorKind};
use crate::store::db::DbError;

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

#[derive(Debug, thiserror::Error)]
pub enum RequestError {
    #[error(transparent)]
    Db(#[from] DbError),
    #[error(
        "{0} does not exist; run `usersync setup` (or `usersync setup --print-sql` for the DBA)"
    )]
    Missing(&'static str),
    #[error("publication {0} does not include usersync.sync_requests (backfill and sync-user send their requests through it); run `usersync setup` or: ALTER PUBLICATION {0} ADD TABLE usersync.sync_requests;")]
    NotPublished(String),
}

impl Classify for RequestError {
    fn kind(&self) -> ErrorKind {
        match self {
            RequestError::Db(e) => e.kind(),
            RequestError::Missing(_) | RequestError::NotPublished(_) => ErrorKind::Config,
        }
    }
}

fn sql_err(source: tokio_postgres::Error) -> RequestError {
    RequestError::Db(DbError {
        context: "sync requests",
        source,
    })
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
            .try_get(0)
            .map_err(sql_err)?;
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
        .map(|r| r.try_get::<_, bool>(0))
        .transpose()
        .map_err(sql_err)?
        .unwrap_or(false))
}

/// Inserts one request per key; returns their ids.
pub async fn enqueue(
    client: &Client,
    keys: &[String],
    reason: &str,
) -> Result<Vec<i64>, RequestError> {
    client
        .query(
            "INSERT INTO usersync.sync_requests (user_key, reason) \
             SELECT k, $2 FROM unnest($1::text[]) WITH ORDINALITY AS u(k, n) ORDER BY n RETURNING id",
            &[&keys, &reason],
        )
        .await
        .map_err(sql_err)?
        .iter()
        .map(|r| r.try_get(0).map_err(sql_err))
        .collect()
}

/// How many of `ids` are not done yet.
pub async fn open_count(client: &Client, ids: &[i64]) -> Result<i64, RequestError> {
    client
        .query_one(
            "SELECT count(*) FROM usersync.sync_requests WHERE id = ANY($1) AND done_at IS NULL",
            &[&ids],
        )
        .await
        .map_err(sql_err)?
        .try_get(0)
        .map_err(sql_err)
}

/// How many of `ids` ended in each outcome (created, updated, failed, ...).
pub async fn outcomes(client: &Client, ids: &[i64]) -> Result<Vec<(String, u64)>, RequestError> {
    let rows = client
        .query(
            "SELECT coalesce(outcome, 'unknown'), count(*) FROM usersync.sync_requests \
             WHERE id = ANY($1) GROUP BY 1 ORDER BY 1",
            &[&ids],
        )
        .await
        .map_err(sql_err)?;
    let mut out = Vec::with_capacity(rows.len());
    for r in &rows {
        let outcome: String = r.try_get(0).map_err(sql_err)?;
        let n: i64 = r.try_get(1).map_err(sql_err)?;
        out.push((outcome, u64::try_from(n).unwrap_or(0)));
    }
    Ok(out)
}

/// The writer's part, inside its origin-tagged transaction: users deferred
/// while sync is off, pending users turned into requests when it is switched
/// on (after the deferrals of the same batch), and requests marked done. Each
/// is one statement per batch. Being origin-tagged, none of these writes is
/// pushed; the requests a resume inserts are still routed (see the reader).
pub async fn write_marks(
    tx: &tokio_postgres::Transaction<'_>,
    batch: &[crate::core::outcome::WriteItem],
) -> Result<(), DbError> {
    use crate::core::outcome::Outcome;
    let err = DbError::ctx("marking sync requests done");
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
                .map(|r| r.try_get(0))
                .collect::<Result<_, _>>()
                .map_err(err)?;
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

/// How an answered sync request ended.
#[derive(Debug, Clone)]
pub struct Answer {
    pub outcome: String,
    pub external_id: Option<String>,
    pub error: Option<String>,
    pub latency_ms: Option<f64>,
}

/// The request's answer, or `None` while the daemon has not answered it.
pub async fn answer(client: &Client, id: i64) -> Result<Option<Answer>, RequestError> {
    let row = client
        .query_one(
            "SELECT done_at IS NOT NULL, outcome, external_id, error, latency_ms \
             FROM usersync.sync_requests WHERE id = $1",
            &[&id],
        )
        .await
        .map_err(sql_err)?;
    if !row.try_get::<_, bool>(0).map_err(sql_err)? {
        return Ok(None);
    }
    Ok(Some(Answer {
        outcome: row
            .try_get::<_, Option<String>>(1)
            .map_err(sql_err)?
            .unwrap_or_default(),
        external_id: row.try_get(2).map_err(sql_err)?,
        error: row.try_get(3).map_err(sql_err)?,
        latency_ms: row.try_get(4).map_err(sql_err)?,
    }))
}
