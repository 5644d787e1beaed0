//! The domain type that flows from the decoder to the sinks: one committed
//! change to one user row, with everything a sink needs to push it and the
//! pipeline needs to order and acknowledge it.

use std::time::Instant;

use serde_json::{Map, Value};

/// Position in the WAL, as PostgreSQL's `pg_lsn`.
pub type Lsn = u64;

/// Formats an LSN the way PostgreSQL prints `pg_lsn` (`16/B374D848`).
/// Parses PostgreSQL's `X/Y` text form of an LSN.
pub fn parse_lsn(text: &str) -> Option<Lsn> {
    let (hi, lo) = text.split_once('/')?;
    Some((u64::from_str_radix(hi, 16).ok()? << 32) | u64::from_str_radix(lo, 16).ok()?)
}

pub fn format_lsn(lsn: Lsn) -> String {
    format!("{:X}/{:X}", lsn >> 32, lsn & 0xFFFF_FFFF)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Operation {
    Insert,
    Update,
    Delete,
}

impl Operation {
    /// `insert`, `update` or `delete` (metric labels, logs).
    pub fn label(self) -> &'static str {
        match self {
            Operation::Insert => "insert",
            Operation::Update => "update",
            Operation::Delete => "delete",
        }
    }

    /// The webhook event type.
    pub fn event_type(self) -> &'static str {
        match self {
            Operation::Insert => "user.created",
            Operation::Update => "user.updated",
            Operation::Delete => "user.deleted",
        }
    }
}

/// A user's primary key: the JSON value pushed to the sink, and its text form
/// used to route the change to a lane and to address the row in SQL.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct UserKey {
    pub text: String,
    pub json: Value,
}

impl std::fmt::Display for UserKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.text)
    }
}

#[derive(Debug, Clone)]
pub struct Change {
    /// Stable across retries and restarts: derived from the commit LSN and the
    /// change's position in its transaction.
    pub event_id: String,
    pub op: Operation,
    pub key: UserKey,
    pub table: String,
    pub commit_lsn: Lsn,
    /// Position among the users-table changes of its transaction.
    pub position: u32,
    /// The source transaction's id (32 bits, as pgoutput sends it).
    pub xid: u32,
    /// Commit time, microseconds since the Unix epoch.
    pub commit_time_us: i64,
    /// The row after the change (inserts, updates), restricted to the synced columns.
    pub data: Option<Map<String, Value>>,
    /// The row before the change, where the replica identity gives it.
    pub previous: Option<Map<String, Value>>,
    /// Synced columns whose value differs between `previous` and `data`.
    pub changed: Vec<String>,
    /// Synced columns left out of `data` because PostgreSQL did not send them
    /// (an unchanged TOASTed value with no old row to recover it from).
    pub omitted: Vec<String>,
    /// `<column>: <error>` when a synced value (or the key) of this change
    /// cannot be converted to JSON. The column is left out of `data`; every
    /// sink refuses such a change permanently, so it becomes that user's dead
    /// letter, naming the column, instead of stopping the session at the same
    /// LSN on every start.
    pub unconvertible: Option<String>,
    /// The external id known for the row when the change was decoded.
    pub external_id: Option<String>,
    /// When the decoder produced the change, for latency figures.
    pub decoded_at: Instant,
}

impl Change {
    /// `evt_<commit LSN as 16 hex digits>_<position>`.
    pub fn event_id_for(commit_lsn: Lsn, position: u32) -> String {
        format!("evt_{commit_lsn:016X}_{position}")
    }

    /// A change of user `key` (a JSON string or number) in the first
    /// transaction at LSN 1, without values: the tests' starting point (the
    /// `it` tests build the library without `cfg(test)`, hence public).
    #[doc(hidden)]
    pub fn for_test(op: Operation, key: Value) -> Change {
        let text = match &key {
            Value::String(s) => s.clone(),
            other => other.to_string(),
        };
        Change {
            event_id: Change::event_id_for(1, 0),
            op,
            key: UserKey { text, json: key },
            table: "public.users".into(),
            commit_lsn: 1,
            position: 0,
            xid: 1,
            commit_time_us: 0,
            data: None,
            previous: None,
            changed: vec![],
            omitted: vec![],
            unconvertible: None,
            external_id: None,
            decoded_at: Instant::now(),
        }
    }
}

/// Microseconds between the Unix epoch and PostgreSQL's epoch (2000-01-01).
pub const PG_EPOCH_OFFSET_US: i64 = 946_684_800_000_000;

/// RFC 3339 text for a time in microseconds since the Unix epoch.
pub fn format_time_us(us: i64) -> String {
    let nanos = i128::from(us) * 1000;
    match time::OffsetDateTime::from_unix_timestamp_nanos(nanos) {
        Ok(t) => t
            .format(&time::format_description::well_known::Rfc3339)
            .unwrap_or_else(|_| us.to_string()),
        Err(_) => us.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lsn_prints_like_postgres() {
        assert_eq!(format_lsn(0x16_B374_D848), "16/B374D848");
        assert_eq!(format_lsn(0), "0/0");
    }

    #[test]
    fn event_id_is_stable_and_sortable() {
        assert_eq!(
            Change::event_id_for(0x1_0000_00FF, 3),
            "evt_00000001000000FF_3"
        );
    }

    #[test]
    fn time_is_rfc3339() {
        assert_eq!(format_time_us(0), "1970-01-01T00:00:00Z");
        assert_eq!(format_time_us(1_500_000), "1970-01-01T00:00:01.5Z");
    }
}
