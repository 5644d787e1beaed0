//! The pipeline's `LaneStore` on PostgreSQL: external-id look-ups, current
//! rows for sync requests, and whether a user still has dead letters.

use futures::future::BoxFuture;
use futures::FutureExt;
use tokio_postgres::Client;

use crate::config::Config;
use crate::core::table::{CurrentRow, TableShape};
use crate::pipeline::ports::{LaneStore, PortError};
use crate::store::deadletter;
use crate::store::rows::RowError;
use crate::store::writeback::{ExternalIds, WritebackError};

pub struct PgLaneStore {
    ids: ExternalIds,
    rows: CurrentRows,
    /// The session's own connection, for the dead-letter check.
    db: Client,
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
        Ok(PgLaneStore {
            ids: ExternalIds::connect(&cfg.database, shape).await?,
            rows: CurrentRows::connect(cfg, shape).await?,
            db,
        })
    }
}

impl LaneStore for PgLaneStore {
    fn external_id<'a>(&'a self, key: &'a str) -> BoxFuture<'a, Option<String>> {
        self.ids.get(key).boxed()
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
