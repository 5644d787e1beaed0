//! The dead-letter table `usersync.dead_letters`: changes the sink refused
//! permanently (or kept failing past the retry budget), and the later
//! changes of the same user parked behind them so that they are never pushed
//! out of order. Owns the table's DDL and every query on it.

use crate::core::outcome::NewDeadLetter;
use std::time::SystemTime;

use serde_json::Value;
use tokio_postgres::GenericClient;

use crate::core::error::{Classify, ErrorKind};
use crate::store::db::DbError;

pub const TABLE_DDL: &str = "CREATE TABLE IF NOT EXISTS usersync.dead_letters (
    id bigserial PRIMARY KEY,
    event_id text NOT NULL UNIQUE,
    user_key text NOT NULL,
    operation text NOT NULL,
    state text NOT NULL CHECK (state IN ('failed', 'parked')),
    envelope jsonb NOT NULL,
    last_status integer,
    last_error text NOT NULL,
    attempts integer NOT NULL,
    first_attempt_at timestamptz NOT NULL,
    last_attempt_at timestamptz NOT NULL,
    commit_lsn pg_lsn NOT NULL
);
CREATE INDEX IF NOT EXISTS dead_letters_user_key ON usersync.dead_letters (user_key, id);";

#[derive(Debug, thiserror::Error)]
#[error(transparent)]
pub struct DeadLetterError(#[from] pub DbError);

impl Classify for DeadLetterError {
    fn kind(&self) -> ErrorKind {
        self.0.kind()
    }
}

fn sql_err(source: tokio_postgres::Error) -> DeadLetterError {
    DeadLetterError(DbError {
        context: "dead-letter table",
        source,
    })
}

/// Inserts, ignoring a change already stored (a replay after a crash).
pub async fn insert<C: GenericClient>(
    client: &C,
    dl: &NewDeadLetter,
) -> Result<(), DeadLetterError> {
    client
        .execute(
            "INSERT INTO usersync.dead_letters (event_id, user_key, operation, state, envelope, \
             last_status, last_error, attempts, first_attempt_at, last_attempt_at, commit_lsn) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11::text::pg_lsn) \
             ON CONFLICT (event_id) DO NOTHING",
            &[
                &dl.event_id,
                &dl.user_key,
                &dl.operation,
                &dl.state.as_str(),
                &dl.envelope,
                &dl.last_status.map(i32::from),
                &dl.last_error,
                &i32::try_from(dl.attempts).unwrap_or(i32::MAX),
                &dl.first_attempt_at,
                &dl.last_attempt_at,
                &dl.commit_lsn,
            ],
        )
        .await
        .map_err(sql_err)?;
    Ok(())
}

/// Users with anything in the table: parked until replayed or discarded.
pub async fn parked_users<C: GenericClient>(client: &C) -> Result<Vec<String>, DeadLetterError> {
    client
        .query("SELECT DISTINCT user_key FROM usersync.dead_letters", &[])
        .await
        .map_err(sql_err)?
        .iter()
        .map(|r| r.try_get(0).map_err(sql_err))
        .collect()
}

/// Whether `user_key` still has dead letters.
pub async fn is_parked<C: GenericClient>(
    client: &C,
    user_key: &str,
) -> Result<bool, DeadLetterError> {
    Ok(client
        .query_opt(
            "SELECT 1 FROM usersync.dead_letters WHERE user_key = $1 LIMIT 1",
            &[&user_key],
        )
        .await
        .map_err(sql_err)?
        .is_some())
}

// ------------------------------------------------------------------------
// The operator's side: `usersync dlq list | show | replay | discard`.

/// Whether `usersync.dead_letters` exists (an older setup may lack it).
pub async fn table_exists<C: GenericClient>(client: &C) -> Result<bool, DeadLetterError> {
    let row = client
        .query_one(
            "SELECT to_regclass('usersync.dead_letters') IS NOT NULL",
            &[],
        )
        .await
        .map_err(sql_err)?;
    row.try_get(0).map_err(sql_err)
}

/// One row of the table, as the operator sees it. `envelope` is only read
/// where asked for (`dlq show`): it holds personal data.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Entry {
    pub id: i64,
    pub event_id: String,
    pub user_key: String,
    pub operation: String,
    pub state: String,
    pub attempts: i32,
    pub last_status: Option<i32>,
    pub last_error: String,
    /// RFC 3339, UTC.
    pub first_attempt_at: String,
    /// RFC 3339, UTC.
    pub last_attempt_at: String,
    pub commit_lsn: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub envelope: Option<Value>,
}

const ENTRY_COLUMNS: &str = "id, event_id, user_key, operation, state, attempts, last_status, \
     last_error, first_attempt_at, last_attempt_at, commit_lsn::text";

fn rfc3339(t: SystemTime) -> String {
    let us = match t.duration_since(SystemTime::UNIX_EPOCH) {
        Ok(d) => i64::try_from(d.as_micros()).unwrap_or(i64::MAX),
        Err(e) => -i64::try_from(e.duration().as_micros()).unwrap_or(i64::MAX),
    };
    crate::core::change::format_time_us(us)
}

fn entry(row: &tokio_postgres::Row, with_envelope: bool) -> Result<Entry, DeadLetterError> {
    let get_err = sql_err;
    Ok(Entry {
        id: row.try_get(0).map_err(get_err)?,
        event_id: row.try_get(1).map_err(get_err)?,
        user_key: row.try_get(2).map_err(get_err)?,
        operation: row.try_get(3).map_err(get_err)?,
        state: row.try_get(4).map_err(get_err)?,
        attempts: row.try_get(5).map_err(get_err)?,
        last_status: row.try_get(6).map_err(get_err)?,
        last_error: row.try_get(7).map_err(get_err)?,
        first_attempt_at: rfc3339(row.try_get(8).map_err(get_err)?),
        last_attempt_at: rfc3339(row.try_get(9).map_err(get_err)?),
        commit_lsn: row.try_get(10).map_err(get_err)?,
        envelope: if with_envelope {
            Some(row.try_get(11).map_err(get_err)?)
        } else {
            None
        },
    })
}

fn entries(
    rows: &[tokio_postgres::Row],
    with_envelope: bool,
) -> Result<Vec<Entry>, DeadLetterError> {
    rows.iter().map(|r| entry(r, with_envelope)).collect()
}

/// Every entry (of one user, if given), oldest first, without envelopes.
pub async fn list<C: GenericClient>(
    client: &C,
    user_key: Option<&str>,
) -> Result<Vec<Entry>, DeadLetterError> {
    let rows = client
        .query(
            &format!(
                "SELECT {ENTRY_COLUMNS} FROM usersync.dead_letters \
                 WHERE $1::text IS NULL OR user_key = $1 ORDER BY id"
            ),
            &[&user_key],
        )
        .await
        .map_err(sql_err)?;
    entries(&rows, false)
}

/// One entry with its envelope.
pub async fn get<C: GenericClient>(client: &C, id: i64) -> Result<Option<Entry>, DeadLetterError> {
    let row = client
        .query_opt(
            &format!("SELECT {ENTRY_COLUMNS}, envelope FROM usersync.dead_letters WHERE id = $1"),
            &[&id],
        )
        .await
        .map_err(sql_err)?;
    row.map(|r| entry(&r, true)).transpose()
}

/// Every entry of one user with its envelope, oldest first: the user's
/// backlog as a replay reads it.
pub async fn backlog<C: GenericClient>(
    client: &C,
    user_key: &str,
) -> Result<Vec<Entry>, DeadLetterError> {
    let rows = client
        .query(
            &format!(
                "SELECT {ENTRY_COLUMNS}, envelope FROM usersync.dead_letters \
                 WHERE user_key = $1 ORDER BY id"
            ),
            &[&user_key],
        )
        .await
        .map_err(sql_err)?;
    entries(&rows, true)
}

/// Users with dead letters, in the order of their oldest one.
pub async fn users_by_age<C: GenericClient>(client: &C) -> Result<Vec<String>, DeadLetterError> {
    let rows = client
        .query(
            "SELECT user_key FROM usersync.dead_letters GROUP BY user_key ORDER BY min(id)",
            &[],
        )
        .await
        .map_err(sql_err)?;
    rows.iter().map(|r| r.try_get(0).map_err(sql_err)).collect()
}

/// Removes the entries `ids` of `user_key` after a successful replay.
/// Entries parked meanwhile have other ids and stay.
pub async fn resolve<C: GenericClient>(
    client: &C,
    user_key: &str,
    ids: &[i64],
) -> Result<u64, DeadLetterError> {
    client
        .execute(
            "DELETE FROM usersync.dead_letters WHERE user_key = $1 AND id = ANY($2)",
            &[&user_key, &ids],
        )
        .await
        .map_err(sql_err)
}

/// Records a failed replay on the entries it covered.
pub async fn record_failure<C: GenericClient>(
    client: &C,
    ids: &[i64],
    attempts: u32,
    last_status: Option<u16>,
    last_error: &str,
) -> Result<(), DeadLetterError> {
    client
        .execute(
            "UPDATE usersync.dead_letters SET attempts = attempts + $2, last_status = $3, \
             last_error = $4, last_attempt_at = now() WHERE id = ANY($1)",
            &[
                &ids,
                &i32::try_from(attempts).unwrap_or(i32::MAX),
                &last_status.map(i32::from),
                &last_error,
            ],
        )
        .await
        .map_err(sql_err)?;
    Ok(())
}

/// Deletes one entry; `None` if there is no such id.
pub async fn discard_one<C: GenericClient>(
    client: &C,
    id: i64,
) -> Result<Option<Entry>, DeadLetterError> {
    let row = client
        .query_opt(
            &format!("DELETE FROM usersync.dead_letters WHERE id = $1 RETURNING {ENTRY_COLUMNS}"),
            &[&id],
        )
        .await
        .map_err(sql_err)?;
    row.map(|r| entry(&r, false)).transpose()
}

/// Deletes every entry of one user, returning them oldest first.
pub async fn discard_user<C: GenericClient>(
    client: &C,
    user_key: &str,
) -> Result<Vec<Entry>, DeadLetterError> {
    let rows = client
        .query(
            &format!(
                "WITH gone AS (DELETE FROM usersync.dead_letters WHERE user_key = $1 \
                 RETURNING {ENTRY_COLUMNS}) SELECT * FROM gone ORDER BY id"
            ),
            &[&user_key],
        )
        .await
        .map_err(sql_err)?;
    entries(&rows, false)
}
