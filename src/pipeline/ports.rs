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

/// What a push without a known external id finds at the row.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Link {
    /// The row holds this id: an update, not a create. `hash` is the
    /// user's `values_hash` as recorded now (read after the id): when it is
    /// the hash of the row as it is now, the row's last write recorded it,
    /// which a write-back of an older change never does for a row changed
    /// since, but an inbound write that linked the row does (its values are
    /// newer than this change's and were not pushed).
    Linked { id: String, hash: Option<String> },
    /// No id: the sink creates (or finds) the record. Where inbound writes
    /// can link rows, the user is marked as having a push in flight first,
    /// so that they wait for its write-back instead of linking the row to
    /// another record meanwhile.
    Unlinked,
    /// An import from the sink's service is running and the row has never
    /// been pushed: it may be about to link the row to a record the
    /// service already has. Ask again shortly.
    Wait,
}

/// Per-user reads a lane makes. Each is answered from the database's
/// current state; none writes, except the in-flight mark of
/// [`LaneStore::link_for_push`].
pub trait LaneStore: Send + Sync + 'static {
    /// The row's external id, when neither memory nor the change knows it.
    /// `None` also when the read fails: the sink then finds the record its
    /// own way (look-up by email or metadata).
    fn external_id<'a>(&'a self, key: &'a str) -> BoxFuture<'a, Option<String>>;

    /// Before a push that would create a record (no external id known):
    /// the row's id as it is now, read so that it is ordered with an inbound
    /// write linking the same row (an import, a webhook of the sink's own
    /// service). `wait_for_import`: the change is not an insert, so the row
    /// may be one that an import from the sink's service is about to link.
    /// By default a plain read of [`LaneStore::external_id`].
    fn link_for_push<'a>(&'a self, key: &'a str, wait_for_import: bool) -> BoxFuture<'a, Link> {
        let _ = wait_for_import;
        Box::pin(async move {
            match self.external_id(key).await {
                Some(id) => Link::Linked { id, hash: None },
                None => Link::Unlinked,
            }
        })
    }

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
