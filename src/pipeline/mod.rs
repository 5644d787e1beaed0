//! The pipeline between the reader and the sink: per-user lanes (one change
//! in flight per user, commit order within a user, users concurrent up to
//! `max_in_flight`), a bound on buffered changes (when reached, the reader is
//! no longer drained, so it stops reading the stream), parking of users with
//! dead letters, and the ack tracker that confirms to the slot only positions
//! below which every change has been written back or dead-lettered.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::Arc;
use std::time::{Instant, SystemTime};

use futures::future::BoxFuture;
use futures::stream::{FuturesUnordered, StreamExt};
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;

use crate::config::RetryConfig;
use crate::core::change::{format_lsn, Change, Lsn, Operation};
use crate::core::outcome::{
    values_hash, DeadLetterState as DeadState, Done, NewDeadLetter, Outcome, WriteItem,
};
use crate::sink::retry::{push_with_retry_until, PushFailed};
use crate::sink::webhook::Envelope;
use crate::sink::Sink;
use crate::source::stream::SourceEvent;

pub mod ack;
pub mod memory;
pub mod ports;
pub mod requests;
#[cfg(test)]
mod tests;

pub use ack::AckTracker;
use ports::{LaneStore, Link, PortError};

/// How long a push that waits for a running import (see [`Link::Wait`])
/// waits before it looks again.
const IMPORT_WAIT: std::time::Duration = std::time::Duration::from_millis(250);

#[derive(Debug, thiserror::Error)]
pub enum PipelineError {
    #[error("the write-back task stopped")]
    WriterGone,
    #[error("reading the database for a lane: {0}")]
    Store(#[from] PortError),
}

impl crate::core::error::Classify for PipelineError {
    fn kind(&self) -> crate::core::error::ErrorKind {
        match self {
            // The writer's own error says more; it is reported in its place.
            PipelineError::WriterGone => crate::core::error::ErrorKind::Transient,
            PipelineError::Store(e) => e.kind(),
        }
    }
}

struct Queued {
    seq: u64,
    change: Box<Change>,
    /// A sync request: the change is built from the row when its turn comes.
    request: Option<i64>,
}

struct PushResult {
    key: String,
    seq: u64,
    /// Given up at shutdown while waiting to retry: neither written back
    /// nor dead-lettered, so never acknowledged; replayed at the next start.
    abandoned: bool,
    /// After a delete nothing is known: a new row with the key is a new user.
    deleted: bool,
    external_id: Option<String>,
    /// The id was found at the row, linked after the change was committed:
    /// the user's changes still queued from before the link carry no id and
    /// values the link overwrote, so each pushes the row as it is now.
    linked: bool,
    failure: Option<Failure>,
}

impl PushResult {
    /// Given up at shutdown, before or while waiting for a retry.
    fn abandoned(key: String, seq: u64) -> Self {
        PushResult {
            abandoned: true,
            ..PushResult::nothing_pushed(key, seq)
        }
    }

    /// Nothing to push (a request whose row is gone or unreadable): its
    /// write item is already on its way to the writer.
    fn nothing_pushed(key: String, seq: u64) -> Self {
        PushResult {
            key,
            seq,
            abandoned: false,
            deleted: false,
            external_id: None,
            linked: false,
            failure: None,
        }
    }
}

struct Failure {
    seq: u64,
    change: Box<Change>,
    request: Option<i64>,
    external_id: Option<String>,
    failed: PushFailed,
    first_attempt_at: SystemTime,
}

/// The session's channels: changes in from the reader, items out to the
/// writer, durable sequence numbers back from it, confirmed positions out
/// to the reader.
pub struct Channels {
    pub source: mpsc::Receiver<SourceEvent>,
    pub writer: mpsc::Sender<WriteItem>,
    pub written: mpsc::UnboundedReceiver<crate::core::outcome::Durable>,
    pub acks: watch::Sender<Lsn>,
}

pub struct Pipeline {
    pub sink: Arc<dyn Sink>,
    pub retry: RetryConfig,
    pub max_in_flight: usize,
    pub max_buffered: usize,
    /// Log row values of pushed changes (`log.personal_data`).
    pub log_personal_data: bool,
    /// Per-user reads: external ids, current rows, whether still parked.
    pub store: Arc<dyn LaneStore>,
    /// The off switch (`[sync] enabled`); `None` means always on.
    pub sync_enabled: Option<watch::Receiver<bool>>,
}

struct State {
    /// Changes waiting per user; a key is present while its user has work.
    lanes: HashMap<String, VecDeque<Queued>>,
    /// Users with queued work and nothing in flight, in arrival order.
    ready: VecDeque<String>,
    /// Users with a push in flight.
    active: HashSet<String>,
    /// Users with dead letters: their changes are stored behind them, not
    /// pushed. The value is the sequence number of the user's newest dead
    /// letter sent to the writer in this session (none for users parked at
    /// start): until it is durable, the table cannot yet show the user as
    /// parked, so it must not be asked.
    parked: HashMap<String, Option<u64>>,
    /// Items handed to the writer and not yet reported durable (may dip
    /// below zero for a moment: the writer can report before the push task ends).
    unwritten: i64,
    /// External ids learnt from pushes whose write-back may not be visible yet
    /// in later changes' rows (an update right after the create), with the
    /// push's sequence number: kept until that write-back is durable, also
    /// when the user's lane empties meanwhile, because until then a lookup
    /// of the row finds no id and the update would go out without one.
    /// Per user: the id, the sequence number whose write-back makes it
    /// durable, and whether it was found linked at the row (by an import or
    /// webhook after the user's queued changes were committed; see
    /// `PushResult::linked`).
    known_ids: HashMap<String, (String, u64, bool)>,
    ack: AckTracker,
}

/// The dead letter for `change`: `failed` when the sink refused it, else
/// parked behind the user's earlier failure.
fn dead_letter(
    seq: u64,
    change: &Change,
    external_id: Option<&str>,
    failure: Option<(&PushFailed, SystemTime)>,
) -> WriteItem {
    let now = SystemTime::now();
    let envelope =
        serde_json::to_value(Envelope::new(change, external_id)).unwrap_or(serde_json::Value::Null);
    let (state, last_status, last_error, attempts, first) = match failure {
        Some((f, first)) => (
            DeadState::Failed,
            f.error.status(),
            if f.error.is_retryable() {
                format!("gave up after {} attempts: {}", f.attempts, f.error)
            } else {
                f.error.to_string()
            },
            f.attempts,
            first,
        ),
        None => (
            DeadState::Parked,
            None,
            "parked behind an earlier dead letter of this user".to_string(),
            0,
            now,
        ),
    };
    WriteItem::new(
        seq,
        change,
        Outcome::DeadLetter(Box::new(NewDeadLetter {
            event_id: change.event_id.clone(),
            user_key: change.key.text.clone(),
            operation: change.op.event_type(),
            state,
            envelope,
            last_status,
            last_error,
            attempts,
            first_attempt_at: first,
            last_attempt_at: now,
            commit_lsn: format_lsn(change.commit_lsn),
        })),
    )
}

impl Pipeline {
    /// Runs until the source closes or `cancel` fires. On cancel, pushes
    /// under way finish and are written back first; pushes only waiting to
    /// retry are abandoned (unacknowledged, replayed at the next start). `parked` are the users with
    /// dead letters at start; `done` what an earlier session already made
    /// durable.
    pub async fn run(
        &self,
        ch: Channels,
        parked: HashSet<String>,
        done: Done,
        cancel: CancellationToken,
    ) -> Result<(), PipelineError> {
        let Channels {
            mut source,
            writer,
            mut written,
            acks,
        } = ch;
        let mut st = State {
            lanes: HashMap::new(),
            ready: VecDeque::new(),
            active: HashSet::new(),
            parked: parked.into_iter().map(|k| (k, None)).collect(),
            unwritten: 0,
            known_ids: HashMap::new(),
            ack: AckTracker::default(),
        };
        // Polled by this loop rather than spawned: a task per change cost
        // ~12 % of the daemon's CPU (BENCHMARKS.md), and the pushes are I/O.
        let mut pushes: Pushes = FuturesUnordered::new();
        let mut draining = false;
        let mut switch = self.sync_enabled.clone();
        let mut enabled = switch.as_ref().is_none_or(|s| *s.borrow());
        if enabled {
            // Users changed while sync was off (before a restart) are pushed now.
            requests::send_resume(&writer, &mut st.ack).await?;
            st.unwritten += 1;
        } else {
            tracing::warn!("sync is switched off ([sync] enabled = false): reading and acknowledging the stream, pushing nothing; changed users are recorded in usersync.pending_users");
        }
        loop {
            self.start_ready(&mut st, &mut pushes, &writer, &cancel);
            crate::observe::metrics::pipeline(st.active.len(), st.ack.in_flight(), st.parked.len());
            if draining && st.active.is_empty() && st.unwritten == 0 {
                return Ok(());
            }
            let room = !draining && st.ack.in_flight() < self.max_buffered;
            tokio::select! {
                _ = cancel.cancelled(), if !draining => {
                    draining = true;
                    // Queued changes that never started stay unacknowledged
                    // and are replayed from the slot next time.
                    st.lanes.retain(|key, lane| {
                        lane.clear();
                        st.active.contains(key)
                    });
                    st.ready.clear();
                }
                now = requests::switch_changed(&mut switch), if switch.is_some() => {
                    match now {
                        Some(now) if now != enabled => {
                            enabled = now;
                            if enabled {
                                tracing::info!("sync switched on");
                                requests::send_resume(&writer, &mut st.ack).await?;
                                st.unwritten += 1;
                            } else {
                                tracing::warn!("sync switched off: reading and acknowledging the stream, pushing nothing; changed users are recorded in usersync.pending_users");
                            }
                        }
                        Some(_) => {}
                        None => switch = None,
                    }
                }
                ev = source.recv(), if room => match ev {
                    Some(ev @ (SourceEvent::Change(_) | SourceEvent::Request { .. })) => {
                        let (change, request) = match ev {
                            SourceEvent::Change(change) => (change, None),
                            SourceEvent::Request { change, id } => (change, Some(id)),
                            _ => continue,
                        };
                        crate::observe::metrics::change_seen(change.op.label());
                        let key = change.key.text.clone();
                        if done.covers(&key, change.commit_lsn, change.position) {
                            tracing::debug!(event_id = %change.event_id, "already written back before the restart; skipped");
                            continue;
                        }
                        let seq = st.ack.register();
                        if !enabled {
                            let item = requests::deferred(seq, &change, request);
                            send(&writer, item, &mut st).await?;
                            continue;
                        }
                        if let Some(&last) = st.parked.get(&key) {
                            let still = match last {
                                Some(last) if st.ack.is_pending(last) => true,
                                _ => self.store.is_parked(&key).await?,
                            };
                            if still {
                                let mut item = dead_letter(seq, &change, change.external_id.as_deref(), None);
                                item.request = requests::parked_mark(request);
                                send(&writer, item, &mut st).await?;
                                st.parked.insert(key, Some(seq));
                                continue;
                            }
                            tracing::info!(user = %key, "dead letters resolved; pushing this user's changes again");
                            st.parked.remove(&key);
                        }
                        let lane = st.lanes.entry(key.clone()).or_default();
                        if lane.is_empty() && !st.active.contains(&key) {
                            st.ready.push_back(key);
                        }
                        lane.push_back(Queued { seq, change, request });
                    }
                    Some(SourceEvent::TxnEnd { end_lsn }) | Some(SourceEvent::Idle { wal_end: end_lsn }) => {
                        st.ack.boundary(end_lsn);
                        if let Some(lsn) = st.ack.advance() {
                            let _ = acks.send(lsn);
                        }
                    }
                    None => draining = true,
                },
                Some(result) = pushes.next() => {
                    let key = result.key;
                    st.active.remove(&key);
                    if result.abandoned {
                        continue;
                    }
                    if let Some(f) = result.failure {
                        // Park the user: this change and every later one go to
                        // the dead-letter table, in order, until replayed.
                        let mut item = dead_letter(f.seq, &f.change, f.external_id.as_deref(), Some((&f.failed, f.first_attempt_at)));
                        item.request = requests::failed_mark(f.request, &f.failed);
                        send(&writer, item, &mut st).await?;
                        let mut last = f.seq;
                        for q in st.lanes.remove(&key).into_iter().flatten() {
                            let ext = st.known_ids.get(&key).map(|(id, _, _)| id.clone()).or_else(|| q.change.external_id.clone());
                            let mut item = dead_letter(q.seq, &q.change, ext.as_deref(), None);
                            item.request = requests::parked_mark(q.request);
                            send(&writer, item, &mut st).await?;
                            last = q.seq;
                        }
                        st.parked.insert(key.clone(), Some(last));
                        st.known_ids.remove(&key);
                        continue;
                    }
                    st.unwritten += 1;
                    match result.external_id {
                        Some(id) if !result.deleted => { st.known_ids.insert(key.clone(), (id, result.seq, result.linked)); }
                        _ => { st.known_ids.remove(&key); }
                    }
                    match st.lanes.get(&key) {
                        Some(lane) if !lane.is_empty() && !draining => st.ready.push_back(key),
                        _ => {
                            st.lanes.remove(&key);
                        }
                    }
                }
                durable = written.recv() => {
                    let Some(crate::core::outcome::Durable { seqs, refused }) = durable else {
                        return Err(PipelineError::WriterGone);
                    };
                    for key in refused {
                        // Parked from now on; whether it still is, the
                        // dead-letter table says when its next change comes.
                        tracing::warn!(user = %key, "the write-back was refused; the change is a dead letter and the user is parked");
                        st.parked.insert(key, None);
                    }
                    if !st.known_ids.is_empty() {
                        // The row now holds the id: later changes find it there.
                        let durable: HashSet<u64> = seqs.iter().copied().collect();
                        st.known_ids.retain(|_, (_, seq, _)| !durable.contains(seq));
                    }
                    for seq in seqs {
                        st.ack.complete(seq);
                        st.unwritten -= 1;
                    }
                    if let Some(lsn) = st.ack.advance() {
                        let _ = acks.send(lsn);
                    }
                }
            }
        }
    }

    fn start_ready(
        &self,
        st: &mut State,
        pushes: &mut Pushes,
        writer: &mpsc::Sender<WriteItem>,
        cancel: &CancellationToken,
    ) {
        while st.active.len() < self.max_in_flight {
            let Some(key) = st.ready.pop_front() else {
                break;
            };
            let Some(queued) = st.lanes.get_mut(&key).and_then(|l| l.pop_front()) else {
                continue;
            };
            st.active.insert(key.clone());
            let known = st.known_ids.get(&key);
            // Committed before the row was linked (its tuple has no id):
            // the link's values are newer than this change's.
            let mut linked = known.is_some_and(|(_, _, linked)| *linked)
                && queued.change.external_id.is_none()
                && queued.change.op != Operation::Delete;
            let external_id = known
                .map(|(id, _, _)| id.clone())
                .or_else(|| queued.change.external_id.clone());
            let sink = Arc::clone(&self.sink);
            let retry = self.retry.clone();
            let writer = writer.clone();
            let log_values = self.log_personal_data;
            let store = Arc::clone(&self.store);
            let stop = cancel.clone();
            pushes.push(Box::pin(async move {
                let Queued {
                    seq,
                    mut change,
                    request,
                } = queued;
                let mut external_id = external_id;
                if linked && request.is_none() {
                    if let Ok(Some(row)) = store.current_row(&change.key.text).await {
                        requests::adopt_row(&mut change, row);
                    }
                    change.op = Operation::Update;
                }
                if let Some(id) = request {
                    // The row as it is now: never older than a change this
                    // lane pushed before, and a later change queues behind.
                    match requests::prepare(
                        store.as_ref(),
                        id,
                        &mut change,
                        external_id.take(),
                        sink.name(),
                    )
                    .await
                    {
                        Ok(id) => external_id = id,
                        Err(item) => {
                            let _ = writer.send(item.into_write_item(seq, &change)).await;
                            return PushResult::nothing_pushed(key, seq);
                        }
                    }
                }
                let external_id = match external_id {
                    Some(id) => Some(id),
                    None if change.op == Operation::Delete => {
                        store.external_id(&change.key.text).await
                    }
                    // About to create: what the row holds now decides,
                    // read in order with an inbound write linking it.
                    None => loop {
                        let wait = change.op != Operation::Insert;
                        match store.link_for_push(&change.key.text, wait).await {
                            // Linked by an inbound write of the sink's
                            // service (an import, a webhook) after this
                            // change was committed: that write is newer and
                            // was not pushed (no echo), so the row as it is
                            // now is what the service must get. Otherwise
                            // (a write-back of this user's earlier push,
                            // `sync-user` without a daemon) the change's own
                            // values, as an update: creating would duplicate.
                            Link::Linked { id, hash } => {
                                if let (Some(hash), Ok(Some(row))) =
                                    (hash, store.current_row(&change.key.text).await)
                                {
                                    if values_hash(&row.data) == hash {
                                        requests::adopt_row(&mut change, row);
                                        linked = true;
                                    }
                                }
                                change.op = Operation::Update;
                                break Some(id);
                            }
                            Link::Unlinked => break None,
                            Link::Wait => {
                                tracing::debug!(user = %change.key, "an import from the sink's service is running; this never-synced user waits for it before a record is created");
                                tokio::select! {
                                    _ = tokio::time::sleep(IMPORT_WAIT) => {}
                                    _ = stop.cancelled() => {
                                        return PushResult::abandoned(key, seq);
                                    }
                                }
                            }
                        }
                    },
                };
                let started = Instant::now();
                let first_attempt_at = SystemTime::now();
                let Some(pushed) = push_with_retry_until(
                    sink.as_ref(),
                    &change,
                    external_id.as_deref(),
                    &retry,
                    &stop,
                )
                .await
                else {
                    return PushResult::abandoned(key, seq);
                };
                match pushed {
                    Ok(pushed) => {
                        let external_id = pushed.external_id.or(external_id);
                        if log_values {
                            tracing::info!(
                                event_id = %change.event_id,
                                data = %serde_json::Value::from(change.data.clone()),
                                previous = %serde_json::Value::from(change.previous.clone()),
                                "pushed values"
                            );
                        }
                        let push_latency = started.elapsed();
                        let mut item = WriteItem::new(
                            seq,
                            &change,
                            Outcome::Synced {
                                external_id: external_id.clone(),
                                synced_at: SystemTime::now(),
                                push_latency,
                                attempts: pushed.attempts,
                            },
                        );
                        requests::annotate_synced(
                            &mut item,
                            &change,
                            request,
                            external_id.as_deref(),
                            push_latency,
                        );
                        // A closed writer means shutdown; the change is replayed next start.
                        let _ = writer.send(item).await;
                        PushResult {
                            deleted: change.op == Operation::Delete,
                            external_id,
                            linked,
                            ..PushResult::nothing_pushed(key, seq)
                        }
                    }
                    Err(failed) => PushResult {
                        failure: Some(Failure {
                            seq,
                            change,
                            request,
                            external_id,
                            failed,
                            first_attempt_at,
                        }),
                        ..PushResult::nothing_pushed(key, seq)
                    },
                }
            }));
        }
    }
}

type Pushes = FuturesUnordered<BoxFuture<'static, PushResult>>;

async fn send(
    writer: &mpsc::Sender<WriteItem>,
    item: WriteItem,
    st: &mut State,
) -> Result<(), PipelineError> {
    writer
        .send(item)
        .await
        .map_err(|_| PipelineError::WriterGone)?;
    st.unwritten += 1;
    Ok(())
}
