//! The pipeline's `LaneStore` on PostgreSQL: external-id look-ups, current
//! rows for sync requests, and whether a user still has dead letters.

use futures::future::BoxFuture;
use futures::FutureExt;
use tokio_postgres::{Client, Statement};

use crate::config::{quote_ident, Config};
use crate::core::table::{CurrentRow, TableShape, EXTERNAL_ID_COLUMN};
use crate::pipeline::ports::{LaneStore, Link, PortError};
use crate::store::deadletter;
use crate::store::rows::RowError;
use crate::store::writeback::{ExternalIds, WritebackError};

pub struct PgLaneStore {
    ids: ExternalIds,
    rows: CurrentRows,
    /// The session's own connection, for the dead-letter check.
    db: Client,
    /// Set when an inbound source of the sink's own service can link rows
    /// (write `external_user_id`) while pushes run.
    guard: Option<LinkGuard>,
}

/// The value `user_progress.values_hash` holds while a push that may
/// create a record is in flight: never a real hash, so the inbound path
/// sees the user as "not written back" and waits (see [`LinkGuard`]).
pub const PUSH_IN_FLIGHT: &str = "push-in-flight";

/// How recently an unfinished import must have moved its cursor to count
/// as running: a crashed import must not hold creates back for ever.
const IMPORT_ALIVE: &str = "60 seconds";

/// Orders a create with an inbound write that links the same row.
///
/// Without it, a push of a row with no external id reads "no id", and an
/// import (or a webhook of the sink's service) links the row to the record
/// the service already has before the push's write-back: the sink creates
/// a second record and the write-back replaces the link with it. One
/// statement closes that gap. It reads the id under `FOR KEY SHARE`, which
/// waits for a linking transaction's `FOR UPDATE` and then sees its id;
/// and, when it finds none, it sets the user's values hash to
/// [`PUSH_IN_FLIGHT`] in the same statement, so a link that comes after it
/// finds the user in flight and waits for the write-back (which records the
/// real hash, or NULL for a dead letter). While an import from the sink's
/// service runs, a row that was never pushed (no hash) and is not being
/// inserted is not created at all: the import may be about to link it to
/// the record the service has had all along ([`Link::Wait`]).
struct LinkGuard {
    client: Client,
    claim: Statement,
    hash: Statement,
    /// The names of the sources of the sink's service (their import cursors).
    sources: Vec<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum LaneStoreError {
    #[error(transparent)]
    Writeback(#[from] WritebackError),
    #[error(transparent)]
    Rows(#[from] RowError),
}

impl crate::core::error::Classify for LaneStoreError {
    fn kind(&self) -> crate::core::error::ErrorKind {
        match self {
            LaneStoreError::Writeback(e) => e.kind(),
            LaneStoreError::Rows(e) => e.kind(),
        }
    }
}

impl PgLaneStore {
    pub async fn connect(
        cfg: &Config,
        shape: &TableShape,
        db: Client,
    ) -> Result<PgLaneStore, LaneStoreError> {
        let sources: Vec<String> = cfg
            .inbound
            .iter()
            .flat_map(|i| i.sources.iter())
            .filter(|s| s.same_service_as(cfg.sink.kind.name()))
            .map(|s| s.name.clone())
            .collect();
        let guard = if sources.is_empty() {
            None
        } else {
            Some(LinkGuard::connect(cfg, shape, sources).await?)
        };
        Ok(PgLaneStore {
            ids: ExternalIds::connect(&cfg.database, shape).await?,
            rows: CurrentRows::connect(cfg, shape).await?,
            db,
            guard,
        })
    }
}

impl LinkGuard {
    async fn connect(
        cfg: &Config,
        shape: &TableShape,
        sources: Vec<String>,
    ) -> Result<LinkGuard, LaneStoreError> {
        let err = |source| {
            LaneStoreError::Rows(RowError::Db(crate::store::db::DbError {
                context: "preparing the create guard",
                source,
            }))
        };
        let client = crate::store::db::connect(&cfg.database, "usersync-link-guard")
            .await
            .map_err(|e| LaneStoreError::Rows(RowError::from(e)))?;
        // The mark needs no durability: after a crash the push is replayed
        // and marks again. It only has to be visible, which a commit is at
        // once without waiting for the flush.
        client
            .batch_execute("SET synchronous_commit = off")
            .await
            .map_err(err)?;
        let key = quote_ident(&shape.key_column);
        let sql = format!(
            "WITH r AS (SELECT u.{ext}::text AS id FROM {table} AS u \
                 WHERE u.{key} = $1::text::{key_type} FOR KEY SHARE OF u), \
             p AS (SELECT values_hash FROM usersync.user_progress WHERE user_key = $1::text), \
             wait AS (SELECT $2::bool \
                 AND NOT EXISTS (SELECT 1 FROM p WHERE values_hash IS NOT NULL) \
                 AND EXISTS (SELECT 1 FROM usersync.import_cursors c \
                     WHERE c.source = ANY($3::text[]) AND c.finished_at IS NULL \
                     AND c.updated_at > now() - interval '{IMPORT_ALIVE}') AS w), \
             mark AS (INSERT INTO usersync.user_progress (user_key, commit_lsn, position, values_hash) \
                 SELECT $1::text, '0/0', 0, '{PUSH_IN_FLIGHT}' \
                 WHERE EXISTS (SELECT 1 FROM r WHERE r.id IS NULL) AND NOT (SELECT w FROM wait) \
                 ON CONFLICT (user_key) DO UPDATE SET values_hash = EXCLUDED.values_hash \
                 RETURNING 1) \
             SELECT (SELECT id FROM r), (SELECT w FROM wait), (SELECT count(*) FROM mark)",
            ext = quote_ident(EXTERNAL_ID_COLUMN),
            table = shape.table.quoted(),
            key_type = shape.key_type,
        );
        let claim = client.prepare(&sql).await.map_err(err)?;
        let hash = client
            .prepare("SELECT values_hash FROM usersync.user_progress WHERE user_key = $1::text")
            .await
            .map_err(err)?;
        Ok(LinkGuard {
            client,
            claim,
            hash,
            sources,
        })
    }

    async fn claim(&self, key: &str, wait_for_import: bool) -> Result<Link, tokio_postgres::Error> {
        let row = self
            .client
            .query_one(&self.claim, &[&key, &wait_for_import, &self.sources])
            .await?;
        let id: Option<String> = row.try_get(0)?;
        let wait: bool = row.try_get(1)?;
        Ok(match id {
            // Read after the claim, so a link that the claim waited for is
            // seen with the hash it recorded (the claim's own snapshot is
            // older than that commit).
            Some(id) => Link::Linked {
                id,
                hash: self
                    .client
                    .query_opt(&self.hash, &[&key])
                    .await?
                    .map(|r| r.try_get(0))
                    .transpose()?
                    .flatten(),
            },
            None if wait => Link::Wait,
            None => Link::Unlinked,
        })
    }
}

impl LaneStore for PgLaneStore {
    fn external_id<'a>(&'a self, key: &'a str) -> BoxFuture<'a, Option<String>> {
        self.ids.get(key).boxed()
    }

    fn link_for_push<'a>(&'a self, key: &'a str, wait_for_import: bool) -> BoxFuture<'a, Link> {
        async move {
            let Some(guard) = &self.guard else {
                return match self.ids.get(key).await {
                    Some(id) => Link::Linked { id, hash: None },
                    None => Link::Unlinked,
                };
            };
            match guard.claim(key, wait_for_import).await {
                Ok(link) => link,
                // Like a failed look-up: the sink finds the record its own
                // way, unguarded (logged: it reopens the gap above).
                Err(e) => {
                    tracing::warn!(error = %crate::store::db::error_text(&e), "the create guard failed; pushing unguarded");
                    match self.ids.get(key).await {
                        Some(id) => Link::Linked { id, hash: None },
                        None => Link::Unlinked,
                    }
                }
            }
        }
        .boxed()
    }

    fn current_row<'a>(
        &'a self,
        key: &'a str,
    ) -> BoxFuture<'a, Result<Option<CurrentRow>, PortError>> {
        async move { self.rows.read(key).await.map_err(PortError::new) }.boxed()
    }

    fn user_key(&self, text: &str) -> crate::core::change::UserKey {
        self.rows
            .reader
            .key(text)
            .unwrap_or_else(|_| crate::core::change::UserKey {
                json: serde_json::Value::String(text.to_string()),
                text: text.to_string(),
            })
    }

    fn is_parked<'a>(&'a self, key: &'a str) -> BoxFuture<'a, Result<bool, PortError>> {
        async move {
            deadletter::is_parked(&self.db, key)
                .await
                .map_err(PortError::new)
        }
        .boxed()
    }
}

/// Reads users' current rows for the lanes' sync requests: one session with
/// the stream's settings (see `rows::SESSION_SETTINGS`), shared by the
/// concurrent pushes (tokio-postgres pipelines their queries).
pub struct CurrentRows {
    client: Client,
    reader: crate::store::rows::RowReader,
}

impl CurrentRows {
    pub async fn connect(
        cfg: &crate::config::Config,
        shape: &crate::core::table::TableShape,
    ) -> Result<CurrentRows, crate::store::rows::RowError> {
        let client = crate::store::db::connect(&cfg.database, "usersync-requests").await?;
        client
            .batch_execute(crate::store::rows::SESSION_SETTINGS)
            .await
            .map_err(|source| {
                crate::store::rows::RowError::Db(crate::store::db::DbError {
                    context: "reading users' current rows",
                    source,
                })
            })?;
        let reader = crate::store::rows::RowReader::new(
            &client,
            shape.clone(),
            &cfg.sink.columns,
            &cfg.database.publication,
        )
        .await?;
        Ok(CurrentRows { client, reader })
    }

    pub async fn read(
        &self,
        key: &str,
    ) -> Result<Option<crate::core::table::CurrentRow>, crate::store::rows::RowError> {
        self.reader.read(&self.client, key).await
    }
}
