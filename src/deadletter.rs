//! The dead-letter table `usersync.dead_letters`: changes the sink refused
//! permanently (or kept failing past the retry budget), and the later
//! changes of the same user parked behind them so that they are never pushed
//! out of order. Owns the table's DDL and every query on it.

use std::time::SystemTime;

use serde_json::Value;
use tokio_postgres::GenericClient;

use crate::db::error_text;

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
#[error("dead-letter table: {0}")]
pub struct DeadLetterError(pub String);

fn sql_err(e: tokio_postgres::Error) -> DeadLetterError {
    DeadLetterError(error_text(&e))
}

/// Why a change is in the table.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum State {
    /// The sink refused this change (or kept failing past the retry budget).
    Failed,
    /// Stored behind an earlier failed change of the same user, never pushed.
    Parked,
}

impl State {
    pub fn as_str(self) -> &'static str {
        match self {
            State::Failed => "failed",
            State::Parked => "parked",
        }
    }
}

/// A change on its way into the table.
#[derive(Debug, Clone)]
pub struct NewDeadLetter {
    pub event_id: String,
    pub user_key: String,
    pub operation: &'static str,
    pub state: State,
    /// The webhook envelope that was (or would have been) pushed.
    pub envelope: Value,
    pub last_status: Option<u16>,
    /// What went wrong, without secrets: status and a body excerpt.
    pub last_error: String,
    pub attempts: u32,
    pub first_attempt_at: SystemTime,
    pub last_attempt_at: SystemTime,
    pub commit_lsn: String,
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
                &(dl.attempts as i32),
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
    Ok(client
        .query("SELECT DISTINCT user_key FROM usersync.dead_letters", &[])
        .await
        .map_err(sql_err)?
        .iter()
        .map(|r| r.get(0))
        .collect())
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
