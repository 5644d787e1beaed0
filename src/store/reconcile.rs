//! The table side of `usersync reconcile`: every row as the stream would
//! push it (key, synced values, external id), read by a keyset scan in
//! chunks so that a large table is never held in one result.

use tokio_postgres::{Client, SimpleQueryMessage};

use crate::config::{quote_ident, quote_literal};
use crate::core::table::CurrentRow;
use crate::store::rows::{RowError, RowReader};

fn db_err(source: tokio_postgres::Error) -> RowError {
    RowError::Db(crate::store::db::DbError {
        context: "reading the users table for reconcile",
        source,
    })
}

/// How many rows the table holds (for the progress total).
pub async fn count_rows(client: &Client, reader: &RowReader) -> Result<u64, RowError> {
    let row = client
        .query_one(
            &format!("SELECT count(*) FROM {}", reader.shape().table.quoted()),
            &[],
        )
        .await
        .map_err(db_err)?;
    let n: i64 = row.try_get(0).map_err(db_err)?;
    Ok(u64::try_from(n).unwrap_or(0))
}

/// Reads every row in key order, `chunk` at a time, handing each to `each`.
pub async fn scan_rows(
    client: &Client,
    reader: &RowReader,
    chunk: usize,
    mut each: impl FnMut(CurrentRow),
) -> Result<u64, RowError> {
    let shape = reader.shape();
    let key = quote_ident(&shape.key_column);
    let columns = reader.column_count();
    let mut cursor: Option<String> = None;
    let mut total = 0u64;
    loop {
        let sql = format!(
            "SELECT {cols}, u.{key}::text FROM {table} AS u {filter} ORDER BY u.{key} LIMIT {chunk}",
            cols = reader.select_list("u"),
            table = shape.table.quoted(),
            filter = match &cursor {
                Some(c) => format!("WHERE u.{key} > {}::{}", quote_literal(c), shape.key_type),
                None => String::new(),
            },
            chunk = chunk.max(1),
        );
        let messages = client.simple_query(&sql).await.map_err(db_err)?;
        let mut rows = 0usize;
        for message in &messages {
            let SimpleQueryMessage::Row(row) = message else {
                continue;
            };
            rows += 1;
            let values: Vec<Option<String>> = (0..columns)
                .map(|i| row.try_get(i).map(|v| v.map(str::to_string)))
                .collect::<Result<_, _>>()
                .map_err(db_err)?;
            let key_text = row
                .try_get(columns)
                .map_err(db_err)?
                .unwrap_or_default()
                .to_string();
            each(reader.row_from_values(&key_text, &values)?);
            cursor = Some(key_text);
        }
        total += rows as u64;
        if rows < chunk.max(1) {
            return Ok(total);
        }
    }
}

/// Forgets a row's external id that names a record which no longer exists,
/// so that its next push creates one (`reconcile --fix push`). Only when the
/// row still holds that id: a write-back since then wins. The column is not
/// synced, so the change itself pushes nothing.
pub async fn unlink_missing(
    client: &Client,
    reader: &RowReader,
    key: &str,
    stale_id: &str,
) -> Result<bool, RowError> {
    let shape = reader.shape();
    let sql = format!(
        "UPDATE {table} SET {ext} = NULL WHERE {key} = $1::text::{key_type} AND {ext} = $2",
        table = shape.table.quoted(),
        ext = quote_ident(crate::core::table::EXTERNAL_ID_COLUMN),
        key = quote_ident(&shape.key_column),
        key_type = shape.key_type,
    );
    let n = client
        .execute(&sql, &[&key, &stale_id])
        .await
        .map_err(db_err)?;
    Ok(n == 1)
}
