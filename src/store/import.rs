//! The table side of `usersync import`: the resumable cursor per source
//! (`usersync.import_cursors`, one row per source, moved after each page is
//! applied) and the rows a page of listed records may match, read in one
//! query per page so the import can tell what it would insert, link, update
//! or leave alone before it writes anything.

use serde_json::{Map, Value};
use tokio_postgres::Client;

use crate::config::quote_ident;
use crate::core::table::TableShape;
use crate::store::db::DbError;

pub const CURSORS_DDL: &str = "CREATE TABLE IF NOT EXISTS usersync.import_cursors (
    source text PRIMARY KEY,
    cursor text,
    pages bigint NOT NULL DEFAULT 0,
    records bigint NOT NULL DEFAULT 0,
    started_at timestamptz NOT NULL DEFAULT now(),
    updated_at timestamptz NOT NULL DEFAULT now(),
    finished_at timestamptz
);";

fn db_err(context: &'static str) -> impl Fn(tokio_postgres::Error) -> DbError {
    move |source| DbError { context, source }
}

/// Where an unfinished import of a source stopped.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Resume {
    /// The list cursor after the last page applied; `None`: the first page.
    pub cursor: Option<String>,
    pub pages: i64,
    pub records: i64,
}

/// The unfinished import of `source`, if any (a finished one starts over).
pub async fn unfinished(client: &Client, source: &str) -> Result<Option<Resume>, DbError> {
    let row = client
        .query_opt(
            "SELECT cursor, pages, records FROM usersync.import_cursors \
             WHERE source = $1 AND finished_at IS NULL",
            &[&source],
        )
        .await
        .map_err(db_err("reading the import cursor (run `usersync setup` if usersync.import_cursors is missing)"))?;
    row.map(|r| {
        Ok(Resume {
            cursor: r.try_get(0)?,
            pages: r.try_get(1)?,
            records: r.try_get(2)?,
        })
    })
    .transpose()
    .map_err(db_err("reading the import cursor"))
}

/// Starts a new import of `source` at the first page.
pub async fn start(client: &Client, source: &str) -> Result<(), DbError> {
    client
        .execute(
            "INSERT INTO usersync.import_cursors (source) VALUES ($1) \
             ON CONFLICT (source) DO UPDATE SET cursor = NULL, pages = 0, records = 0, \
             started_at = now(), updated_at = now(), finished_at = NULL",
            &[&source],
        )
        .await
        .map_err(db_err(
            "starting the import cursor (run `usersync setup` if usersync.import_cursors is missing)",
        ))?;
    Ok(())
}

/// Records that every record before `cursor` is applied.
pub async fn advance(
    client: &Client,
    source: &str,
    cursor: Option<&str>,
    records: i64,
) -> Result<(), DbError> {
    let finished = cursor.is_none();
    client
        .execute(
            "UPDATE usersync.import_cursors SET cursor = $2, pages = pages + 1, \
             records = records + $3, updated_at = now(), \
             finished_at = CASE WHEN $4 THEN now() END WHERE source = $1",
            &[&source, &cursor, &records, &finished],
        )
        .await
        .map_err(db_err("moving the import cursor"))?;
    Ok(())
}

/// What a source's records are matched on and compared with.
pub struct MatchColumns<'a> {
    pub id_column: &'a str,
    pub email_column: Option<&'a str>,
    /// The `on_delete = soft(column)` column, if any.
    pub soft_column: Option<&'a str>,
}

/// A row as the import compares it.
#[derive(Debug, Clone, PartialEq)]
pub struct Candidate {
    pub key: String,
    /// The source's id column.
    pub id: Option<String>,
    /// Lower-cased, for matching by email.
    pub email: Option<String>,
    pub soft_deleted: bool,
    /// The whole row as `to_jsonb` gives it.
    pub doc: Map<String, Value>,
}

/// Whether `s` can be the text of a key of type `key_type` at all, so a
/// hostile back-reference never reaches a failing cast.
pub fn key_text_fits(key_type: &str, s: &str) -> bool {
    match key_type.split('(').next().unwrap_or_default().trim() {
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

/// Every row whose id column is one of `ids`, whose key is one of `keys`,
/// or (with an email column) whose email is one of `emails`, compared
/// lower-cased.
pub async fn candidates(
    client: &Client,
    shape: &TableShape,
    cols: &MatchColumns<'_>,
    ids: &[String],
    keys: &[String],
    emails: &[String],
) -> Result<Vec<Candidate>, DbError> {
    let key = quote_ident(&shape.key_column);
    let id = quote_ident(cols.id_column);
    let keys: Vec<&String> = keys
        .iter()
        .filter(|k| key_text_fits(&shape.key_type, k))
        .collect();
    let email = match cols.email_column {
        Some(c) => format!("lower(u.{}::text)", quote_ident(c)),
        None => "NULL::text".into(),
    };
    let email_filter = match cols.email_column {
        Some(_) => format!(" OR {email} = ANY($3::text[])"),
        None => String::new(),
    };
    let soft = match cols.soft_column {
        Some(c) => format!("u.{} IS NOT NULL", quote_ident(c)),
        None => "false".into(),
    };
    let sql = format!(
        "SELECT u.{key}::text, u.{id}::text, {email}, {soft}, to_jsonb(u) FROM {table} AS u \
         WHERE u.{id}::text = ANY($1::text[]) OR u.{key} = ANY($2::text[]::{key_type}[]){email_filter}",
        table = shape.table.quoted(),
        key_type = shape.key_type,
    );
    let emails: Vec<String> = emails.iter().map(|e| e.to_lowercase()).collect();
    let rows = match cols.email_column {
        Some(_) => client.query(&sql, &[&ids, &keys, &emails]).await,
        None => client.query(&sql, &[&ids, &keys]).await,
    }
    .map_err(db_err("reading the rows a page of listed records matches"))?;
    let read = db_err("reading the rows a page of listed records matches");
    rows.iter()
        .map(|r| {
            let doc: Value = r.try_get(4).map_err(&read)?;
            Ok(Candidate {
                key: r.try_get(0).map_err(&read)?,
                id: r.try_get(1).map_err(&read)?,
                email: r.try_get(2).map_err(&read)?,
                soft_deleted: r.try_get(3).map_err(&read)?,
                doc: match doc {
                    Value::Object(m) => m,
                    _ => Map::new(),
                },
            })
        })
        .collect()
}

/// A row as `reconcile --from <source>` sees it: its key, the source's id
/// it holds, whether `on_delete = soft(…)` marked it deleted, and whether
/// the source's delete unlinked it (`on_delete = "unlink"`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LinkState {
    pub key: String,
    pub id: Option<String>,
    pub soft_deleted: bool,
    pub unlinked: bool,
}

/// Every row's key, id column, soft-delete mark and unlink mark from
/// `source`, in key order.
pub async fn link_states(
    client: &Client,
    shape: &TableShape,
    cols: &MatchColumns<'_>,
    source: &str,
) -> Result<Vec<LinkState>, DbError> {
    let read = db_err("reading the users table for reconcile");
    let soft = match cols.soft_column {
        Some(c) => format!("u.{} IS NOT NULL", quote_ident(c)),
        None => "false".into(),
    };
    let key = quote_ident(&shape.key_column);
    // A setup from before the unlink mark has no table: nothing unlinked.
    let marks: bool = client
        .query_one(
            "SELECT to_regclass('usersync.inbound_unlinked') IS NOT NULL",
            &[],
        )
        .await
        .and_then(|r| r.try_get(0))
        .map_err(&read)?;
    let unlinked = if marks {
        format!(
            "EXISTS (SELECT 1 FROM usersync.inbound_unlinked x \
             WHERE x.source = $1 AND x.user_key = u.{key}::text)"
        )
    } else {
        "$1::text IS NULL".into()
    };
    // `u.` so the order is the key's own, not its text's.
    let sql = format!(
        "SELECT u.{key}::text, u.{}::text, {soft}, {unlinked} FROM {} AS u ORDER BY u.{key}",
        quote_ident(cols.id_column),
        shape.table.quoted()
    );
    let rows = client.query(&sql, &[&source]).await.map_err(&read)?;
    rows.iter()
        .map(|r| {
            Ok(LinkState {
                key: r.try_get(0).map_err(&read)?,
                id: r.try_get(1).map_err(&read)?,
                soft_deleted: r.try_get(2).map_err(&read)?,
                unlinked: r.try_get(3).map_err(&read)?,
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn back_references_are_checked_against_the_key_type() {
        assert!(key_text_fits("bigint", "42"));
        assert!(!key_text_fits("bigint", "42; drop"));
        assert!(!key_text_fits("integer", "99999999999"));
        assert!(key_text_fits(
            "uuid",
            "123e4567-e89b-12d3-a456-426614174000"
        ));
        assert!(!key_text_fits("uuid", "123e4567"));
        assert!(key_text_fits("text", "anything"));
        assert!(!key_text_fits("text", ""));
    }
}
