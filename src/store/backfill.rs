//! The backfill's SQL: its resumable cursor (one row), the keyset scan of
//! the users table.

/// The cursor. `status` (another command) reads mode, cursor, rows_total,
/// rows_done, started_at, updated_at and finished_at.
pub const TABLE_DDL: &str = "CREATE TABLE IF NOT EXISTS usersync.backfill (
    id integer PRIMARY KEY DEFAULT 1 CHECK (id = 1),
    mode text NOT NULL,
    cursor text,
    rows_total bigint,
    rows_done bigint NOT NULL DEFAULT 0,
    started_at timestamptz NOT NULL,
    updated_at timestamptz NOT NULL,
    finished_at timestamptz,
    rows_queued bigint NOT NULL DEFAULT 0
);";

use tokio_postgres::{Client, SimpleQueryMessage};

use crate::config::{quote_ident, quote_literal};
use crate::core::table::TableShape;
use crate::store::db::DbError;
use crate::store::rows::RowReader;

fn err(context: &'static str) -> impl Fn(tokio_postgres::Error) -> DbError + Copy {
    move |source| DbError { context, source }
}

/// Where a backfill stands.
#[derive(Debug, Clone)]
pub struct Cursor {
    /// The text of the last key scanned; `None` before the first chunk.
    pub last_key: Option<String>,
    pub total: i64,
    pub done: i64,
    pub resumed: bool,
}

/// One scanned row: its key's text, the column values in the reader's
/// order (text form), and the hash of the values last pushed, if any.
pub struct ScannedRow {
    pub key: String,
    pub values: Vec<Option<String>>,
    pub pushed_hash: Option<String>,
}

pub async fn count_rows(client: &Client, shape: &TableShape) -> Result<i64, DbError> {
    let e = err("counting the users table's rows");
    client
        .query_one(
            &format!("SELECT count(*) FROM {}", shape.table.quoted()),
            &[],
        )
        .await
        .map_err(e)?
        .try_get(0)
        .map_err(e)
}

/// The next `limit` rows after `after` in key order, with their pushed
/// hashes. Read in text form through the simple protocol, like the stream.
pub async fn scan_chunk(
    client: &Client,
    reader: &RowReader,
    after: Option<&str>,
    limit: usize,
) -> Result<Vec<ScannedRow>, DbError> {
    let shape = reader.shape();
    let key = quote_ident(&shape.key_column);
    let sql = format!(
        "SELECT {cols}, p.values_hash, u.{key}::text FROM {table} AS u \
         LEFT JOIN usersync.user_progress AS p ON p.user_key = u.{key}::text \
         {filter} ORDER BY u.{key} LIMIT {limit}",
        cols = reader.select_list("u"),
        table = shape.table.quoted(),
        filter = match after {
            Some(c) => format!("WHERE u.{key} > {}::{}", quote_literal(c), shape.key_type),
            None => String::new(),
        },
    );
    let e = err("scanning the users table");
    let columns = reader.column_count();
    let mut rows = Vec::new();
    for message in client.simple_query(&sql).await.map_err(e)? {
        let SimpleQueryMessage::Row(row) = message else {
            continue;
        };
        let values: Vec<Option<String>> = (0..columns)
            .map(|i| row.try_get(i).map(|v| v.map(str::to_string)))
            .collect::<Result<_, _>>()
            .map_err(e)?;
        let pushed_hash = row.try_get(columns).map_err(e)?.map(str::to_string);
        let key = row
            .try_get(columns + 1)
            .map_err(e)?
            .unwrap_or_default()
            .to_string();
        rows.push(ScannedRow {
            key,
            values,
            pushed_hash,
        });
    }
    Ok(rows)
}

/// A finished backfill (or one of the other mode) starts again from the
/// beginning; an unfinished one of the same mode continues from its cursor.
pub async fn start_or_resume(
    client: &Client,
    shape: &TableShape,
    mode: &str,
) -> Result<Cursor, DbError> {
    let e = err("reading the backfill cursor");
    let row = client
        .query_opt(
            "SELECT mode, cursor, coalesce(rows_total, 0), rows_done, finished_at IS NOT NULL \
             FROM usersync.backfill WHERE id = 1",
            &[],
        )
        .await
        .map_err(e)?;
    if let Some(row) = row {
        let stored_mode: String = row.try_get(0).map_err(e)?;
        let finished: bool = row.try_get(4).map_err(e)?;
        if !finished && stored_mode == mode {
            return Ok(Cursor {
                last_key: row.try_get(1).map_err(e)?,
                total: row.try_get(2).map_err(e)?,
                done: row.try_get(3).map_err(e)?,
                resumed: true,
            });
        }
    }
    let total = count_rows(client, shape).await?;
    client
        .execute(
            "INSERT INTO usersync.backfill AS b (id, mode, cursor, rows_total, rows_done, rows_queued, started_at, updated_at, finished_at) \
             VALUES (1, $1, NULL, $2, 0, 0, now(), now(), NULL) \
             ON CONFLICT (id) DO UPDATE SET mode = EXCLUDED.mode, cursor = NULL, rows_total = EXCLUDED.rows_total, \
             rows_done = 0, rows_queued = 0, started_at = now(), updated_at = now(), finished_at = NULL",
            &[&mode, &total],
        )
        .await
        .map_err(err("starting the backfill cursor"))?;
    Ok(Cursor {
        last_key: None,
        total,
        done: 0,
        resumed: false,
    })
}

/// Moves the cursor past a chunk whose requests are all done.
pub async fn advance(
    client: &Client,
    last_key: Option<&str>,
    scanned: usize,
    queued: usize,
) -> Result<(), DbError> {
    let scanned = i64::try_from(scanned).unwrap_or(i64::MAX);
    let queued = i64::try_from(queued).unwrap_or(i64::MAX);
    client
        .execute(
            "UPDATE usersync.backfill SET cursor = $1, rows_done = rows_done + $2, \
             rows_queued = rows_queued + $3, updated_at = now() WHERE id = 1",
            &[&last_key, &scanned, &queued],
        )
        .await
        .map_err(err("moving the backfill cursor"))?;
    Ok(())
}

pub async fn finish(client: &Client) -> Result<(), DbError> {
    client
        .execute(
            "UPDATE usersync.backfill SET finished_at = now(), updated_at = now() WHERE id = 1",
            &[],
        )
        .await
        .map_err(err("finishing the backfill"))?;
    Ok(())
}
