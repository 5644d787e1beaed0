//! What became of a change: written back, dead-lettered, skipped, deferred;
//! the items the pipeline hands to the write-back, and what a restarted
//! session knows is already durable. Shared by the pipeline (which decides)
//! and the store (which makes it durable), so neither imports the other.

use std::collections::HashMap;
use std::time::{Duration, Instant, SystemTime};

use serde_json::{Map, Value};
use sha2::{Digest, Sha256};

use super::change::{Change, Lsn, Operation, UserKey};

/// A change whose outcome must be made durable before it is acknowledged:
/// written back into its row, or stored as a dead letter.
#[derive(Debug)]
pub struct WriteItem {
    /// The pipeline's sequence number, reported back once durable.
    pub seq: u64,
    pub event_id: String,
    pub key: UserKey,
    pub op: Operation,
    pub commit_lsn: Lsn,
    pub position: u32,
    pub xid: u32,
    pub decoded_at: Instant,
    pub outcome: Outcome,
    /// Commit time of the source transaction (µs since the Unix epoch).
    pub commit_time_us: i64,
    /// Hash of the values pushed (`requests::values_hash`), kept per user in
    /// `usersync.user_progress`; `None` when no values were pushed.
    pub values_hash: Option<String>,
    /// The sync request this change answers, marked done in the same transaction.
    pub request: Option<RequestMark>,
}

impl WriteItem {
    pub fn new(seq: u64, change: &Change, outcome: Outcome) -> WriteItem {
        WriteItem {
            seq,
            event_id: change.event_id.clone(),
            key: change.key.clone(),
            op: change.op,
            commit_lsn: change.commit_lsn,
            position: change.position,
            xid: change.xid,
            decoded_at: change.decoded_at,
            outcome,
            commit_time_us: change.commit_time_us,
            values_hash: None,
            request: None,
        }
    }
}

#[derive(Debug)]
pub enum Outcome {
    Synced {
        external_id: Option<String>,
        synced_at: SystemTime,
        push_latency: Duration,
        attempts: u32,
    },
    DeadLetter(Box<NewDeadLetter>),
    /// Nothing to write back (a sync request whose row is gone).
    Skipped,
    /// Sync is switched off: the user is recorded in `usersync.pending_users`.
    Deferred,
    /// Sync was switched on: every pending user becomes a sync request.
    Resume,
}

/// What the writer reports back after a commit: the sequence numbers that
/// became durable, and the users whose write-back the database refused
/// (their changes were made durable as dead letters instead), whom the
/// pipeline parks like any other dead-lettered user.
#[derive(Debug, Default, Clone)]
pub struct Durable {
    pub seqs: Vec<u64>,
    pub refused: Vec<String>,
}

impl From<Vec<u64>> for Durable {
    fn from(seqs: Vec<u64>) -> Self {
        Durable {
            seqs,
            refused: Vec::new(),
        }
    }
}

/// One change that reached the external service and, where the row still
/// exists, was written back. For the demo's live output and for logs.
#[derive(Debug, Clone)]
pub struct SyncReport {
    pub event_id: String,
    pub key: String,
    pub op: Operation,
    pub external_id: Option<String>,
    pub push_latency: Duration,
    /// From decoding to the write-back's commit.
    pub total_latency: Duration,
    pub attempts: u32,
}

/// Why a change is in the table.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeadLetterState {
    /// The sink refused this change (or kept failing past the retry budget).
    Failed,
    /// Stored behind an earlier failed change of the same user, never pushed.
    Parked,
}

impl DeadLetterState {
    pub fn as_str(self) -> &'static str {
        match self {
            DeadLetterState::Failed => "failed",
            DeadLetterState::Parked => "parked",
        }
    }
}

/// A change on its way into the table.
#[derive(Debug, Clone)]
pub struct NewDeadLetter {
    pub event_id: String,
    pub user_key: String,
    pub operation: &'static str,
    pub state: DeadLetterState,
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

/// What became of a request, as stored in `sync_requests.outcome`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RequestOutcome {
    Created,
    Updated,
    /// The row is gone: its deletion is (or was) pushed as its own change.
    Unchanged,
    /// A `recover` delete request: the user's deletion was pushed.
    Deleted,
    Failed,
    /// The user has dead letters: stored behind them, pushed by `dlq replay`.
    Parked,
    /// Sync is switched off: the user is pushed when it is switched on.
    Deferred,
}

impl RequestOutcome {
    pub fn as_str(self) -> &'static str {
        match self {
            RequestOutcome::Created => "created",
            RequestOutcome::Updated => "updated",
            RequestOutcome::Unchanged => "unchanged",
            RequestOutcome::Deleted => "deleted",
            RequestOutcome::Failed => "failed",
            RequestOutcome::Parked => "parked",
            RequestOutcome::Deferred => "deferred",
        }
    }
}

/// A request's result, carried to the writer with the change it produced.
#[derive(Debug, Clone)]
pub struct RequestMark {
    pub id: i64,
    pub outcome: RequestOutcome,
    pub external_id: Option<String>,
    pub error: Option<String>,
    pub latency_ms: Option<f64>,
}

impl RequestMark {
    pub fn new(id: i64, outcome: RequestOutcome) -> Self {
        RequestMark {
            id,
            outcome,
            external_id: None,
            error: None,
            latency_ms: None,
        }
    }
}

/// SHA-256 (hex) of the synced values as pushed. `serde_json::Map` keeps
/// its keys sorted, so the same values always give the same text.
pub fn values_hash(data: &Map<String, Value>) -> String {
    let text = serde_json::to_string(data).unwrap_or_default();
    let digest = Sha256::digest(text.as_bytes());
    digest.iter().map(|b| format!("{b:02x}")).collect()
}

/// What a new session knows was already made durable.
#[derive(Debug, Default)]
pub struct Done {
    /// The highest source commit LSN written back (the origin's progress).
    pub through: Lsn,
    /// Newest durable (commit LSN, position) per user, for users whose record
    /// lies in the replay window.
    pub users: HashMap<String, (Lsn, u32)>,
}

impl Done {
    /// Whether this change was already written back or dead-lettered.
    pub fn covers(&self, key: &str, commit_lsn: Lsn, position: u32) -> bool {
        commit_lsn <= self.through
            && self
                .users
                .get(key)
                .is_some_and(|&done| (commit_lsn, position) <= done)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn hash_ignores_insertion_order_and_sees_values() {
        let a: Map<String, Value> =
            serde_json::from_value(json!({"id": 1, "email": "a@x"})).unwrap();
        let mut b = Map::new();
        b.insert("email".into(), json!("a@x"));
        b.insert("id".into(), json!(1));
        assert_eq!(values_hash(&a), values_hash(&b));
        b.insert("email".into(), json!("b@x"));
        assert_ne!(values_hash(&a), values_hash(&b));
        assert_eq!(values_hash(&a).len(), 64);
    }
}
