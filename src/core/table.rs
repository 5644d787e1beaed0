//! The users table as usersync sees it, and the names of the objects usersync
//! reads and writes (the two sync columns, the sync-request table).

use serde_json::{Map, Value};

use super::change::UserKey;
use super::names::TableName;

pub const EXTERNAL_ID_COLUMN: &str = "external_user_id";
pub const SYNCED_AT_COLUMN: &str = "external_synced_at";
pub const REQUESTS_SCHEMA: &str = "usersync";
pub const REQUESTS_TABLE: &str = "sync_requests";
/// The reason of a request `usersync recover` queues for a user that has
/// progress but no row (deleted while the slot could not stream): pushed as
/// a delete when its turn finds the row still gone, naming the external id
/// the request carries (its `external_id` column, filled at insert).
pub const RECOVER_DELETE_REASON: &str = "recover-delete";
/// Longest external id a request may carry into a delete.
pub const MAX_REQUEST_EXTERNAL_ID: usize = 1024;

/// The users table as the daemon sees it.
#[derive(Debug, Clone)]
pub struct TableShape {
    pub table: TableName,
    pub key_column: String,
    /// `format_type` of the key column, used to cast text keys in SQL.
    pub key_type: String,
    /// Every column with its `format_type`, in attribute order.
    pub columns: Vec<(String, String)>,
    pub replica_identity: char,
}

impl TableShape {
    pub fn has_column(&self, name: &str) -> bool {
        self.columns.iter().any(|(c, _)| c == name)
    }

    pub fn column_type(&self, name: &str) -> Option<&str> {
        self.columns
            .iter()
            .find(|(c, _)| c == name)
            .map(|(_, t)| t.as_str())
    }
}

/// Whether `column` is pushed: `sink.columns` (plus the key), or every column
/// but the two sync columns. The same rule as the stream's `RowBuilder`.
pub fn is_synced(column: &str, key_column: &str, sink_columns: &[String]) -> bool {
    if sink_columns.is_empty() {
        column != EXTERNAL_ID_COLUMN && column != SYNCED_AT_COLUMN
    } else {
        column == key_column || sink_columns.iter().any(|c| c == column)
    }
}

/// A user's row as it is now.
#[derive(Debug, Clone)]
pub struct CurrentRow {
    pub key: UserKey,
    /// Restricted to the synced columns, as the stream would push it.
    pub data: Map<String, Value>,
    pub external_id: Option<String>,
    /// Synced columns the stream cannot carry (generated columns before
    /// PostgreSQL 18), left out of `data` as the stream leaves them out, so
    /// that a row read here hashes like the same row streamed.
    pub omitted: Vec<String>,
}
