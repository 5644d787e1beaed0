//! Sync requests inside a lane: a request's turn reads the user's current
//! row and pushes it; what became of it (created, updated, unchanged,
//! parked, failed, deferred) travels to the writer with the change.

use serde_json::Value;

use super::ack::AckTracker;
use super::ports::LaneStore;
use super::PipelineError;
use crate::core::change::Change;
use crate::core::outcome::{values_hash, Outcome, RequestMark, RequestOutcome, WriteItem};
use crate::sink::retry::PushFailed;

/// A request that needs no push: its row is gone (the deletion travels as
/// its own change) or could not be read.
pub struct NoPush(RequestMark);

impl NoPush {
    pub fn into_write_item(self, seq: u64, change: &Change) -> WriteItem {
        let mut item = WriteItem::new(seq, change, Outcome::Skipped);
        item.request = Some(self.0);
        item
    }
}

/// Turns a request's placeholder change into the push of the user's current
/// row: created when no external id is known (the sink links a record that
/// already exists), updated otherwise; a `recover` delete request whose row
/// is still gone stays the delete it is. Returns the external id to push with.
pub async fn prepare(
    rows: &dyn LaneStore,
    id: i64,
    change: &mut Change,
    known: Option<String>,
    sink: &str,
) -> Result<Option<String>, NoPush> {
    use crate::core::change::Operation;
    let row = match rows.current_row(&change.key.text).await {
        Ok(Some(row)) => row,
        // `recover`'s delete of a user deleted while the slot could not
        // stream: still gone, so the delete is pushed like a streamed one.
        Ok(None) if change.op == Operation::Delete => {
            change.key = rows.user_key(&change.key.text);
            return Ok(known.or_else(|| change.external_id.clone()));
        }
        Ok(None) => return Err(NoPush(RequestMark::new(id, RequestOutcome::Unchanged))),
        Err(e) => {
            tracing::warn!(request = id, user = %change.key, error = %e, "sync request: cannot read the row; not pushed");
            let mut mark = RequestMark::new(id, RequestOutcome::Failed);
            mark.error = Some(e.to_string());
            return Err(NoPush(mark));
        }
    };
    let external_id = known.or(row.external_id.clone());
    change.op = crate::sink::row_push_op(sink, external_id.is_some());
    adopt_row(change, row);
    change.external_id = external_id.clone();
    Ok(external_id)
}

/// Makes `change` push `row`, the user's row as it is now: every synced
/// column, as a request pushes it.
pub fn adopt_row(change: &mut Change, row: crate::core::table::CurrentRow) {
    change.key = row.key;
    change.changed = row.data.keys().cloned().collect();
    change.data = Some(row.data);
    change.omitted = row.omitted;
}

/// The hash of the values a successful push sent and, for a request, its mark.
pub fn annotate_synced(
    item: &mut WriteItem,
    change: &Change,
    request: Option<i64>,
    external_id: Option<&str>,
    latency: std::time::Duration,
) {
    use crate::core::change::Operation;
    // Hashed even when columns were omitted: a column the stream never
    // carries (generated, before PostgreSQL 18) is left out of the row
    // reader's hash too, and a TOASTed value the stream left out makes a
    // hash no full row can match, so backfill pushes that user once more
    // rather than skipping a change.
    if change.op != Operation::Delete && change.unconvertible.is_none() {
        item.values_hash = change.data.as_ref().map(values_hash);
    }
    if let Some(id) = request {
        let outcome = match change.op {
            Operation::Delete => RequestOutcome::Deleted,
            _ if change.external_id.is_none() => RequestOutcome::Created,
            _ => RequestOutcome::Updated,
        };
        let mut mark = RequestMark::new(id, outcome);
        mark.external_id = external_id.map(str::to_string);
        mark.latency_ms = Some(latency.as_secs_f64() * 1000.0);
        item.request = Some(mark);
    }
}

pub fn parked_mark(request: Option<i64>) -> Option<RequestMark> {
    request.map(|id| {
        let mut mark = RequestMark::new(id, RequestOutcome::Parked);
        mark.error = Some(
            "the user has dead letters and is parked behind them; see `usersync dlq list`, then `usersync dlq replay`".into(),
        );
        mark
    })
}

pub fn failed_mark(request: Option<i64>, failed: &PushFailed) -> Option<RequestMark> {
    request.map(|id| {
        let mut mark = RequestMark::new(id, RequestOutcome::Failed);
        mark.error = Some(format!(
            "{} after {} attempt(s); dead-lettered (see `usersync dlq list`)",
            failed.error, failed.attempts
        ));
        mark
    })
}

/// A change received while sync is off: its user is recorded as pending.
pub fn deferred(seq: u64, change: &Change, request: Option<i64>) -> WriteItem {
    let mut item = WriteItem::new(seq, change, Outcome::Deferred);
    item.request = request.map(|id| {
        let mut mark = RequestMark::new(id, RequestOutcome::Deferred);
        mark.error = Some(
            "sync is switched off ([sync] enabled = false); the user is pushed when it is switched on".into(),
        );
        mark
    });
    item
}

/// Queues the resume (pending users become requests) behind every deferral
/// already handed to the writer.
pub async fn send_resume(
    writer: &tokio::sync::mpsc::Sender<WriteItem>,
    ack: &mut AckTracker,
) -> Result<(), PipelineError> {
    use crate::core::change::{Operation, UserKey};
    let item = WriteItem {
        seq: ack.register(),
        event_id: "resume".into(),
        key: UserKey {
            text: String::new(),
            json: Value::Null,
        },
        op: Operation::Update,
        commit_lsn: 0,
        position: 0,
        xid: 0,
        decoded_at: std::time::Instant::now(),
        outcome: Outcome::Resume,
        commit_time_us: 0,
        values_hash: None,
        request: None,
    };
    writer
        .send(item)
        .await
        .map_err(|_| PipelineError::WriterGone)
}

/// The switch's next value; `None` once nobody can change it any more.
pub async fn switch_changed(
    switch: &mut Option<tokio::sync::watch::Receiver<bool>>,
) -> Option<bool> {
    match switch {
        Some(rx) => match rx.changed().await {
            Ok(()) => Some(*rx.borrow_and_update()),
            Err(_) => None,
        },
        None => std::future::pending().await,
    }
}
