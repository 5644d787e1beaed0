//! What the pipeline needs from the database, as one small trait: the
//! Postgres implementation lives in `store::lanes`, an in-memory one in
//! `pipeline::memory` for tests and the benchmark. The write-back itself is
//! not a port but a channel: the pipeline hands `WriteItem`s to the writer
//! task and hears back the sequence numbers that became durable.

use futures::future::BoxFuture;

use crate::core::error::{Classify, ErrorKind};
use crate::core::table::CurrentRow;

/// A failed read, with its cause and its kind kept (the session decides by
/// the kind whether to restart or stop).
#[derive(Debug, thiserror::Error)]
#[error("{source}")]
pub struct PortError {
    kind: ErrorKind,
    #[source]
    source: Box<dyn std::error::Error + Send + Sync>,
}

impl PortError {
    pub fn new(e: impl std::error::Error + Classify + Send + Sync + 'static) -> Self {
        PortError {
            kind: e.kind(),
            source: Box::new(e),
        }
    }
}

impl Classify for PortError {
    fn kind(&self) -> ErrorKind {
        self.kind
    }
}

/// Per-user reads a lane makes. Each is answered from the database's
/// current state; none writes.
pub trait LaneStore: Send + Sync + 'static {
    /// The row's external id, when neither memory nor the change knows it.
    /// `None` also when the read fails: the sink then finds the record its
    /// own way (look-up by email or metadata).
    fn external_id<'a>(&'a self, key: &'a str) -> BoxFuture<'a, Option<String>>;

    /// The user's row as it is now (for sync requests); `None` when gone.
    fn current_row<'a>(
        &'a self,
        key: &'a str,
    ) -> BoxFuture<'a, Result<Option<CurrentRow>, PortError>>;

    /// The key as the stream would push it (a number for an integer key),
    /// from its text form, for a change built from a request rather than
    /// from a row. By default the text itself.
    fn user_key(&self, text: &str) -> crate::core::change::UserKey {
        crate::core::change::UserKey {
            json: serde_json::Value::String(text.to_string()),
            text: text.to_string(),
        }
    }

    /// Whether the user still has dead letters (replayed or discarded ones
    /// are gone from the table).
    fn is_parked<'a>(&'a self, key: &'a str) -> BoxFuture<'a, Result<bool, PortError>>;
}
