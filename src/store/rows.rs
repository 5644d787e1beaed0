//! Reading users' current rows the way the stream sees them: the same
//! session settings, each type's output text, the same text-to-JSON
//! conversion. Used by sync requests, `dlq replay`, `sync-user` and backfill.

use serde_json::{Map, Value};
use tokio_postgres::{Client, SimpleQueryMessage};

use crate::config::{quote_ident, quote_literal};
use crate::core::change::UserKey;
use crate::core::error::{Classify, ErrorKind};
use crate::core::table::{is_synced, CurrentRow, TableShape, EXTERNAL_ID_COLUMN};
use crate::source::value::{text_to_json, TypeRegistry, ValueError};
use crate::store::db::error_text;
use crate::store::schema::SchemaError;

/// The settings the replication connection uses (see `source::stream`), so
/// that a row read in text format is exactly what the stream would have sent
/// (`standard_conforming_strings` for the key literal of the row read).
/// Derived from the one list in `core::session`.
pub const SESSION_SETTINGS: &str = crate::core::session::SQL;

#[derive(Debug, thiserror::Error)]
pub enum RowError {
    #[error(transparent)]
    Connect(#[from] crate::store::db::ConnectError),
    #[error(transparent)]
    Schema(#[from] SchemaError),
    #[error("sink.columns or [sink.mapping] names column {column}, which {table} does not have")]
    UnknownColumn { column: String, table: String },
    #[error("reading the row of user {key}: {}", error_text(.source))]
    Read {
        key: String,
        #[source]
        source: tokio_postgres::Error,
    },
    #[error("user {key}, column {column}: {source}")]
    Value {
        key: String,
        column: String,
        source: ValueError,
    },
    #[error("the key column {column} of {table} has no type in pg_attribute (was it dropped?)")]
    KeyColumnGone { column: String, table: String },
    #[error(transparent)]
    Db(#[from] crate::store::db::DbError),
}

impl Classify for RowError {
    fn kind(&self) -> ErrorKind {
        match self {
            RowError::Connect(e) => e.kind(),
            RowError::Schema(e) => e.kind(),
            RowError::UnknownColumn { .. } | RowError::KeyColumnGone { .. } => ErrorKind::Config,
            RowError::Read { source, .. } => crate::store::db::kind_of(source),
            // One user's value: that user's dead letter, not a stop.
            RowError::Value { .. } => ErrorKind::Permanent,
            RowError::Db(e) => e.kind(),
        }
    }
}

/// Why [`RowReader::read_in`] failed: the transaction's statement (kept
/// whole, for its SQLSTATE) or a value the stream could not decode either.
#[derive(Debug)]
pub enum InTxError {
    Db(tokio_postgres::Error),
    Value,
}

fn sql_err(source: tokio_postgres::Error) -> RowError {
    RowError::Db(crate::store::db::DbError {
        context: "reading the users table's columns",
        source,
    })
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
    /// Synced columns not selected because the stream does not carry them.
    not_streamed: Vec<String>,
    types: TypeRegistry,
    /// `SELECT … WHERE key = `, completed by the quoted key and its cast.
    select: String,
}

impl RowReader {
    /// `publication` decides which generated columns the stream carries
    /// (`store::catalog::unstreamed_generated_columns`); the reader leaves
    /// the others out too, or a backfill would see every such row as changed.
    pub async fn new(
        client: &Client,
        shape: TableShape,
        sink_columns: &[String],
        publication: &str,
    ) -> Result<RowReader, RowError> {
        for column in sink_columns {
            if !shape.has_column(column) {
                return Err(RowError::UnknownColumn {
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
            .map_err(|source| {
                RowError::Schema(SchemaError::Query {
                    what: "the users table's column types",
                    source,
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
        crate::store::types::load_kinds(client, &shape.table, &mut types).await?;
        let unstreamed = crate::store::catalog::unstreamed_generated_columns(
            client,
            &shape.table.quoted(),
            publication,
        )
        .await
        .map_err(|source| {
            RowError::Schema(SchemaError::Query {
                what: "the users table's generated columns",
                source,
            })
        })?;
        let key_column = shape.key_column.as_str();
        let not_streamed: Vec<String> = unstreamed
            .into_iter()
            .filter(|c| c != key_column && is_synced(c, key_column, sink_columns))
            .collect();
        columns.retain(|c| !not_streamed.contains(&c.name));
        let key_oid = columns
            .iter()
            .find(|c| c.name == shape.key_column)
            .map(|c| c.type_oid)
            .ok_or_else(|| RowError::KeyColumnGone {
                column: shape.key_column.clone(),
                table: shape.table.to_string(),
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
            not_streamed,
            types,
            select,
        })
    }

    pub fn shape(&self) -> &TableShape {
        &self.shape
    }

    /// The key as the stream would push it, from its text form.
    pub fn key(&self, text: &str) -> Result<UserKey, RowError> {
        let json = text_to_json(self.key_oid, text.as_bytes(), &self.types).map_err(|source| {
            RowError::Value {
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

    /// The row of `key` as text values in `select_list` order, or `None`.
    async fn values_of(
        &self,
        client: &Client,
        key: &str,
    ) -> Result<Option<Vec<Option<String>>>, tokio_postgres::Error> {
        let sql = format!(
            "{}{}::{}",
            self.select,
            quote_literal(key),
            self.shape.key_type
        );
        let messages = client.simple_query(&sql).await?;
        let Some(row) = messages.iter().find_map(|m| match m {
            SimpleQueryMessage::Row(row) => Some(row),
            _ => None,
        }) else {
            return Ok(None);
        };
        (0..self.columns.len())
            .map(|i| row.try_get(i).map(|v| v.map(str::to_string)))
            .collect::<Result<Vec<_>, _>>()
            .map(Some)
    }

    /// The row of `key`, or `None` if it is gone.
    pub async fn read(&self, client: &Client, key: &str) -> Result<Option<CurrentRow>, RowError> {
        let values = self
            .values_of(client, key)
            .await
            .map_err(|source| RowError::Read {
                key: key.to_string(),
                source,
            })?;
        values.map(|v| self.row_from_values(key, &v)).transpose()
    }

    /// [`RowReader::read`] keeping the driver's error whole (the inbound
    /// apply hashes the row it just wrote, in its open transaction).
    pub async fn read_in(&self, tx: &Client, key: &str) -> Result<Option<CurrentRow>, InTxError> {
        let values = self.values_of(tx, key).await.map_err(InTxError::Db)?;
        values
            .map(|v| self.row_from_values(key, &v).map_err(|_| InTxError::Value))
            .transpose()
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
    ) -> Result<CurrentRow, RowError> {
        let key_column = self.shape.key_column.as_str();
        let data = row_to_data(
            &self.columns,
            values,
            |c| is_synced(c, key_column, &self.sink_columns),
            &self.types,
        )
        .map_err(|(column, source)| RowError::Value {
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
            omitted: self.not_streamed.clone(),
        })
    }
}

/// The key as the stream spells it (a lane is chosen by this text), for a
/// key typed by a person; `None` when there is no such row, including when
/// the text is not even a value of the key's type (SQLSTATE 22P02).
pub async fn canonical_key(
    client: &Client,
    shape: &TableShape,
    key: &str,
) -> Result<Option<String>, crate::store::db::DbError> {
    let sql = format!(
        "SELECT {key}::text FROM {table} WHERE {key} = $1::text::{ty}",
        key = quote_ident(&shape.key_column),
        table = shape.table.quoted(),
        ty = shape.key_type,
    );
    let e = |source| crate::store::db::DbError {
        context: "looking up the user's key",
        source,
    };
    match client.query_opt(&sql, &[&key]).await {
        Ok(Some(row)) => row.try_get(0).map(Some).map_err(e),
        Ok(None) => Ok(None),
        Err(err)
            if err.code()
                == Some(&tokio_postgres::error::SqlState::INVALID_TEXT_REPRESENTATION) =>
        {
            Ok(None)
        }
        Err(err) => Err(e(err)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::table::SYNCED_AT_COLUMN;
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
}
