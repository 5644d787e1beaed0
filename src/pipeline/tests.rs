//! The pipeline on its in-memory ports: no PostgreSQL, no HTTP. Each test
//! drives the loop through its channels with a scripted sink and a writer
//! the test controls (it decides when an item becomes durable). Where a test
//! must show that nothing more happens, it runs on tokio's paused clock: the
//! clock only advances once every task is idle, so a timeout that fires
//! proves quiescence instead of guessing it with a sleep.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::future::BoxFuture;
use serde_json::{json, Map, Value};
use tokio::sync::{mpsc, watch, Notify};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use super::memory::MemoryStore;
use super::{Channels, Pipeline, PipelineError};
use crate::config::RetryConfig;
use crate::core::change::{Change, Lsn, Operation, UserKey};
use crate::core::outcome::{DeadLetterState, Outcome, WriteItem};
use crate::sink::{Sink, SinkError};
use crate::source::stream::SourceEvent;

/// One push the sink saw: the user, the change's commit LSN, the id it was sent with.
#[derive(Debug, Clone)]
struct Seen {
    key: String,
    lsn: Lsn,
    external_id: Option<String>,
    op: Operation,
    data: Option<Map<String, Value>>,
}

#[derive(Default)]
struct ScriptedSink {
    seen: Mutex<Vec<Seen>>,
    /// Users whose pushes are refused permanently (HTTP 400).
    refuse: Mutex<HashSet<String>>,
    /// While set, every push is answered 429 with `Retry-After: 600`.
    throttle: std::sync::atomic::AtomicBool,
    /// While set, pushes wait for `release` before answering.
    hold: std::sync::atomic::AtomicBool,
    release: Notify,
    started: AtomicUsize,
    next_id: AtomicUsize,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl Sink for ScriptedSink {
    fn name(&self) -> &'static str {
        "webhook"
    }

    fn push<'a>(
        &'a self,
        change: &'a Change,
        external_id: Option<&'a str>,
    ) -> BoxFuture<'a, Result<Option<String>, SinkError>> {
        Box::pin(async move {
            self.started.fetch_add(1, Ordering::SeqCst);
            if self.hold.load(Ordering::SeqCst) {
                self.release.notified().await;
            }
            // Answers out of order: other users' pushes overtake this one.
            let spins = (change.commit_lsn % 7) as usize;
            for _ in 0..spins {
                tokio::task::yield_now().await;
            }
            lock(&self.seen).push(Seen {
                key: change.key.text.clone(),
                lsn: change.commit_lsn,
                external_id: external_id.map(str::to_string),
                op: change.op,
                data: change.data.clone(),
            });
            if self.throttle.load(Ordering::SeqCst) {
                return Err(SinkError::Http {
                    status: 429,
                    body: "slow down".into(),
                    retry_after: Some(Duration::from_secs(600)),
                });
            }
            if lock(&self.refuse).contains(&change.key.text) {
                return Err(SinkError::Http {
                    status: 400,
                    body: "refused".into(),
                    retry_after: None,
                });
            }
            Ok(match (change.op, external_id) {
                (Operation::Insert, _) => Some(format!(
                    "ext_{}",
                    self.next_id.fetch_add(1, Ordering::SeqCst)
                )),
                (_, id) => id.map(str::to_string),
            })
        })
    }
}

impl ScriptedSink {
    fn seen(&self) -> Vec<Seen> {
        lock(&self.seen).clone()
    }
}

fn change(key: &str, op: Operation, lsn: Lsn) -> Box<Change> {
    let mut data = Map::new();
    data.insert("id".into(), json!(key));
    Box::new(Change {
        event_id: Change::event_id_for(lsn, 0),
        op,
        key: UserKey {
            text: key.to_string(),
            json: Value::String(key.to_string()),
        },
        table: "public.users".into(),
        commit_lsn: lsn,
        position: 0,
        xid: 1,
        commit_time_us: 0,
        data: (op != Operation::Delete).then_some(data),
        previous: None,
        changed: vec!["id".into()],
        omitted: Vec::new(),
        unconvertible: None,
        external_id: None,
        decoded_at: Instant::now(),
    })
}

struct Harness {
    source: mpsc::Sender<SourceEvent>,
    items: mpsc::Receiver<WriteItem>,
    durable: mpsc::UnboundedSender<crate::core::outcome::Durable>,
    acks: watch::Receiver<Lsn>,
    cancel: CancellationToken,
    task: JoinHandle<Result<(), PipelineError>>,
}

fn pipeline(sink: Arc<ScriptedSink>, store: Arc<MemoryStore>) -> Pipeline {
    Pipeline {
        sink,
        retry: RetryConfig {
            max_attempts: 1,
            initial_backoff_ms: 1,
            max_backoff_ms: 1,
            max_elapsed_secs: 1,
        },
        max_in_flight: 8,
        max_buffered: 10_000,
        log_personal_data: false,
        store,
        sync_enabled: None,
    }
}

fn start(p: Pipeline, source_capacity: usize) -> Harness {
    let (source_tx, source_rx) = mpsc::channel(source_capacity);
    let (item_tx, item_rx) = mpsc::channel(1024);
    let (durable_tx, durable_rx) = mpsc::unbounded_channel();
    let (ack_tx, ack_rx) = watch::channel(0);
    let cancel = CancellationToken::new();
    let c = cancel.clone();
    let task = tokio::spawn(async move {
        p.run(
            Channels {
                source: source_rx,
                writer: item_tx,
                written: durable_rx,
                acks: ack_tx,
            },
            HashSet::new(),
            Default::default(),
            c,
        )
        .await
    });
    Harness {
        source: source_tx,
        items: item_rx,
        durable: durable_tx,
        acks: ack_rx,
        cancel,
        task,
    }
}

impl Harness {
    async fn send(&self, ev: SourceEvent) {
        self.source.send(ev).await.expect("pipeline running");
    }

    /// A one-change transaction ending at `lsn + 1`.
    async fn txn(&self, key: &str, op: Operation, lsn: Lsn) {
        self.send(SourceEvent::Change(change(key, op, lsn))).await;
        self.send(SourceEvent::TxnEnd { end_lsn: lsn + 1 }).await;
    }

    /// The next item handed to the writer (skipping the start-up resume).
    async fn item(&mut self) -> WriteItem {
        loop {
            let item = tokio::time::timeout(Duration::from_secs(10), self.items.recv())
                .await
                .expect("an item within 10 s")
                .expect("writer channel open");
            if !matches!(item.outcome, Outcome::Resume) {
                return item;
            }
            self.durable
                .send(vec![item.seq].into())
                .expect("pipeline running");
        }
    }

    fn make_durable(&self, items: &[&WriteItem]) {
        self.durable
            .send(items.iter().map(|i| i.seq).collect::<Vec<_>>().into())
            .expect("pipeline running");
    }

    /// Ends the loop without waiting for its drain (items the test never
    /// made durable would keep it waiting).
    async fn stop(self) {
        self.cancel.cancel();
        self.task.abort();
        let _ = self.task.await;
    }
}

/// Answers every item as durable at once, collecting them.
fn auto_writer(mut h: Harness) -> (Harness, Arc<Mutex<Vec<WriteItem>>>) {
    let collected = Arc::new(Mutex::new(Vec::new()));
    let (tx, rx) = mpsc::channel(1024);
    let items = std::mem::replace(&mut h.items, rx);
    drop(tx);
    let durable = h.durable.clone();
    let out = Arc::clone(&collected);
    tokio::spawn(async move {
        let mut items = items;
        while let Some(item) = items.recv().await {
            let _ = durable.send(vec![item.seq].into());
            lock(&out).push(item);
        }
    });
    (h, collected)
}

async fn wait_until(what: &str, f: impl Fn() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::task::yield_now().await;
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_user_is_pushed_in_commit_order_while_users_run_concurrently() {
    let sink = Arc::new(ScriptedSink::default());
    let h = start(pipeline(sink.clone(), Arc::default()), 64);
    let (h, _items) = auto_writer(h);
    let users = 20u64;
    let per_user = 10u64;
    let mut lsn = 100;
    for round in 0..per_user {
        for u in 0..users {
            let op = if round == 0 {
                Operation::Insert
            } else {
                Operation::Update
            };
            h.txn(&format!("u{u}"), op, lsn).await;
            lsn += 10;
        }
    }
    let total = (users * per_user) as usize;
    wait_until("every push", || sink.seen().len() == total).await;
    let mut per_key: HashMap<String, Vec<Lsn>> = HashMap::new();
    for s in sink.seen() {
        per_key.entry(s.key).or_default().push(s.lsn);
    }
    for (key, lsns) in &per_key {
        let mut sorted = lsns.clone();
        sorted.sort_unstable();
        assert_eq!(lsns, &sorted, "user {key} pushed out of commit order");
    }
    // Concurrency: the pushes of different users interleave.
    let seen = sink.seen();
    let first_key = &seen[0].key;
    let first_run = seen.iter().take_while(|s| &s.key == first_key).count();
    assert!(first_run < per_user as usize, "users were not interleaved");
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_user_is_parked_behind_its_dead_letter_until_replayed() {
    let sink = Arc::new(ScriptedSink::default());
    let store = Arc::new(MemoryStore::default());
    lock(&sink.refuse).insert("a".into());
    let mut h = start(pipeline(sink.clone(), store.clone()), 64);

    h.txn("a", Operation::Insert, 100).await;
    let failed = h.item().await;
    match &failed.outcome {
        Outcome::DeadLetter(dl) => assert_eq!(dl.state, DeadLetterState::Failed),
        other => panic!("expected a dead letter, got {other:?}"),
    }
    // The dead letter is durable: the table shows the user as parked.
    store.set_parked("a", true);
    h.make_durable(&[&failed]);
    lock(&sink.refuse).clear();

    // The user's next change is stored behind it, not pushed; others flow.
    h.txn("a", Operation::Update, 200).await;
    let parked = h.item().await;
    match &parked.outcome {
        Outcome::DeadLetter(dl) => assert_eq!(dl.state, DeadLetterState::Parked),
        other => panic!("expected a parked dead letter, got {other:?}"),
    }
    h.make_durable(&[&parked]);
    h.txn("b", Operation::Insert, 300).await;
    let b = h.item().await;
    assert!(matches!(b.outcome, Outcome::Synced { .. }));
    assert_eq!(b.key.text, "b");
    h.make_durable(&[&b]);
    assert_eq!(
        sink.seen().iter().filter(|s| s.key == "a").count(),
        1,
        "a parked change was pushed"
    );

    // `dlq replay` resolved the user: its next change is pushed again.
    store.set_parked("a", false);
    h.txn("a", Operation::Update, 400).await;
    let again = h.item().await;
    assert!(matches!(again.outcome, Outcome::Synced { .. }), "{again:?}");
    assert_eq!(again.key.text, "a");
    assert_eq!(sink.seen().last().map(|s| s.lsn), Some(400));
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_ack_never_passes_a_change_whose_write_back_is_not_durable() {
    let sink = Arc::new(ScriptedSink::default());
    let mut h = start(pipeline(sink.clone(), Arc::default()), 64);

    h.txn("a", Operation::Insert, 100).await;
    let a = h.item().await; // pushed; its write-back is held
    h.txn("b", Operation::Insert, 200).await;
    let b = h.item().await;
    h.make_durable(&[&b]);
    // A later transaction and an idle keepalive complete too.
    h.send(SourceEvent::Idle { wal_end: 500 }).await;
    // The marker: a third user's change travels the same loop after all of
    // the above; once it is pushed, the loop has seen b's durability.
    h.txn("c", Operation::Insert, 600).await;
    let c = h.item().await;
    assert!(
        *h.acks.borrow() < 101,
        "confirmed {} while a's write-back (ending at 101) is not durable",
        *h.acks.borrow()
    );
    h.make_durable(&[&a, &c]);
    let mut acks = h.acks.clone();
    tokio::time::timeout(Duration::from_secs(10), acks.wait_for(|lsn| *lsn >= 601))
        .await
        .expect("confirmed once durable")
        .expect("pipeline running");
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_external_id_is_kept_until_its_write_back_is_durable() {
    let sink = Arc::new(ScriptedSink::default());
    let store = Arc::new(MemoryStore::default());
    let mut h = start(pipeline(sink.clone(), store.clone()), 64);

    h.txn("a", Operation::Insert, 100).await;
    let created = h.item().await;
    let id = match &created.outcome {
        Outcome::Synced { external_id, .. } => external_id.clone().expect("an id"),
        other => panic!("expected synced, got {other:?}"),
    };
    // Not durable yet: the row does not show the id, and the lane is empty.
    h.txn("a", Operation::Update, 200).await;
    let updated = h.item().await;
    assert_eq!(
        sink.seen().last().and_then(|s| s.external_id.clone()),
        Some(id.clone()),
        "the update went out without the id its create returned"
    );
    // Once durable, the row is where the id is read from.
    h.make_durable(&[&created, &updated]);
    store
        .external_ids
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .insert("a".into(), "ext_from_row".into());
    // The marker: b's push goes through the same loop after the durability report.
    h.txn("b", Operation::Insert, 250).await;
    let b = h.item().await;
    h.make_durable(&[&b]);
    h.txn("a", Operation::Update, 300).await;
    let _ = h.item().await;
    assert_eq!(
        sink.seen().last().map(|s| (s.lsn, s.external_id.clone())),
        Some((300, Some("ext_from_row".into())))
    );
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_sync_off_changes_are_deferred_and_switching_on_resumes() {
    let sink = Arc::new(ScriptedSink::default());
    let (switch_tx, switch_rx) = watch::channel(false);
    let mut p = pipeline(sink.clone(), Arc::default());
    p.sync_enabled = Some(switch_rx);
    let mut h = start(p, 64);

    h.txn("a", Operation::Insert, 100).await;
    let deferred = h.item().await;
    assert!(
        matches!(deferred.outcome, Outcome::Deferred),
        "{deferred:?}"
    );
    h.make_durable(&[&deferred]);
    let mut acks = h.acks.clone();
    tokio::time::timeout(Duration::from_secs(10), acks.wait_for(|l| *l >= 101))
        .await
        .expect("the slot keeps advancing while off")
        .expect("pipeline running");
    assert!(sink.seen().is_empty(), "pushed while sync is off");

    switch_tx.send(true).expect("pipeline listening");
    let resume = tokio::time::timeout(Duration::from_secs(10), h.items.recv())
        .await
        .expect("a resume item")
        .expect("writer open");
    assert!(matches!(resume.outcome, Outcome::Resume), "{resume:?}");
    h.make_durable(&[&resume]);
    h.txn("b", Operation::Insert, 200).await;
    let b = h.item().await;
    assert!(matches!(b.outcome, Outcome::Synced { .. }));
    h.stop().await;
}

#[tokio::test(start_paused = true)]
async fn the_reader_is_not_drained_past_max_buffered_changes() {
    let sink = Arc::new(ScriptedSink::default());
    sink.hold.store(true, Ordering::SeqCst);
    let mut p = pipeline(sink.clone(), Arc::default());
    p.max_buffered = 4;
    p.max_in_flight = 100;
    let h = start(p, 1);
    let (h, items) = auto_writer(h);
    let sent = Arc::new(AtomicUsize::new(0));
    let source = h.source.clone();
    let counter = Arc::clone(&sent);
    let feeder = tokio::spawn(async move {
        for i in 0..20u64 {
            if source
                .send(SourceEvent::Change(change(
                    &format!("u{i}"),
                    Operation::Insert,
                    100 + i,
                )))
                .await
                .is_err()
            {
                return;
            }
            counter.fetch_add(1, Ordering::SeqCst);
        }
    });
    // The paused clock moves only when every task waits: reaching this
    // timeout proves the pipeline and the feeder are both stuck.
    let _ = tokio::time::timeout(Duration::from_secs(60), std::future::pending::<()>()).await;
    assert_eq!(sink.started.load(Ordering::SeqCst), 4, "pushes started");
    assert_eq!(
        sent.load(Ordering::SeqCst),
        5,
        "four buffered in the pipeline and one waiting in the channel"
    );
    // Released, everything flows.
    sink.hold.store(false, Ordering::SeqCst);
    sink.release.notify_waiters();
    let _ = tokio::time::timeout(Duration::from_secs(60), feeder).await;
    let _ = tokio::time::timeout(Duration::from_secs(60), std::future::pending::<()>()).await;
    assert_eq!(sent.load(Ordering::SeqCst), 20);
    assert_eq!(
        lock(&items)
            .iter()
            .filter(|i| matches!(i.outcome, Outcome::Synced { .. }))
            .count(),
        20
    );
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_push_waiting_to_retry_does_not_hold_up_shutdown() {
    let sink = Arc::new(ScriptedSink::default());
    sink.throttle.store(true, Ordering::SeqCst);
    let mut p = pipeline(sink.clone(), Arc::default());
    p.retry = RetryConfig {
        max_attempts: 50,
        initial_backoff_ms: 10,
        max_backoff_ms: 100,
        max_elapsed_secs: 3600,
    };
    let h = start(p, 64);
    let (h, items) = auto_writer(h);
    h.txn("a", Operation::Insert, 100).await;
    // The first attempt was answered 429: the push now waits 600 s.
    wait_until("the first attempt", || sink.seen().len() == 1).await;
    h.cancel.cancel();
    let ended = tokio::time::timeout(Duration::from_secs(30), h.task)
        .await
        .expect("the pipeline stops without waiting for Retry-After")
        .expect("no panic");
    assert!(ended.is_ok(), "{ended:?}");
    // Abandoned, not failed: no dead letter, no write-back, no ack past it.
    assert!(lock(&items)
        .iter()
        .all(|i| matches!(i.outcome, Outcome::Resume)));
    assert!(*h.acks.borrow() < 101);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_change_behind_a_dead_letter_not_yet_durable_is_parked() {
    let sink = Arc::new(ScriptedSink::default());
    let store = Arc::new(MemoryStore::default());
    lock(&sink.refuse).insert("a".into());
    let mut h = start(pipeline(sink.clone(), store.clone()), 64);
    h.txn("a", Operation::Insert, 100).await;
    let failed = h.item().await;
    assert!(matches!(failed.outcome, Outcome::DeadLetter(_)));
    // The dead letter is not durable yet, so the table cannot show the user
    // as parked: the pipeline must not ask it, and must not push.
    lock(&sink.refuse).clear();
    h.txn("a", Operation::Update, 200).await;
    let next = h.item().await;
    match &next.outcome {
        Outcome::DeadLetter(dl) => assert_eq!(dl.state, DeadLetterState::Parked),
        other => panic!("pushed ahead of its own dead letter: {other:?}"),
    }
    assert_eq!(sink.seen().len(), 1);
    h.stop().await;
}

/// A leader that wakes from a pause after its lease ran out, before any timer
/// has told the session (the lease's token is not cancelled yet): the fenced
/// sink sends nothing, and the change is abandoned for the new leader to
/// replay, never dead-lettered (`max_attempts = 1` here, so any other
/// failure would be a dead letter at once).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_push_after_the_lease_ran_out_sends_nothing_and_writes_no_dead_letter() {
    use crate::sink::fence::{Fenced, Lease};
    let sink = Arc::new(ScriptedSink::default());
    let mut p = pipeline(sink.clone(), Arc::default());
    let lease = Lease::new(CancellationToken::new());
    lease.extend(Instant::now() + Duration::from_millis(200));
    p.sink = Arc::new(Fenced::new(sink.clone(), lease.clone()));
    let mut h = start(p, 64);
    h.txn("a", Operation::Insert, 100).await;
    let a = h.item().await;
    assert!(matches!(a.outcome, Outcome::Synced { .. }), "{a:?}");
    h.make_durable(&[&a]);
    while lease.deadline().is_some_and(|d| Instant::now() < d) {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(!lease.token().is_cancelled(), "no timer ended the lease");
    h.txn("b", Operation::Insert, 200).await;
    let token = lease.token().clone();
    wait_until("the fence to refuse b's push", || token.is_cancelled()).await;
    h.cancel.cancel();
    let ended = tokio::time::timeout(Duration::from_secs(10), &mut h.task).await;
    assert!(matches!(ended, Ok(Ok(Ok(())))), "{ended:?}");
    let keys: Vec<String> = sink.seen().into_iter().map(|s| s.key).collect();
    assert_eq!(
        keys,
        ["a"],
        "only the push made under the lease reached the sink"
    );
    while let Ok(item) = h.items.try_recv() {
        assert!(
            matches!(item.outcome, Outcome::Resume),
            "nothing is written for the fenced change: {item:?}"
        );
    }
}

#[tokio::test(start_paused = true)]
async fn no_more_than_max_in_flight_pushes_run_at_once() {
    let sink = Arc::new(ScriptedSink::default());
    sink.hold.store(true, Ordering::SeqCst);
    let mut p = pipeline(sink.clone(), Arc::default());
    p.max_in_flight = 2;
    let h = start(p, 64);
    let (h, items) = auto_writer(h);
    for i in 0..5u64 {
        h.txn(&format!("u{i}"), Operation::Insert, 100 + 10 * i)
            .await;
    }
    // The paused clock moves only when every task waits: the pipeline has
    // started every push it was going to.
    let _ = tokio::time::timeout(Duration::from_secs(60), std::future::pending::<()>()).await;
    assert_eq!(
        sink.started.load(Ordering::SeqCst),
        2,
        "pushes started at once"
    );
    sink.hold.store(false, Ordering::SeqCst);
    sink.release.notify_waiters();
    let _ = tokio::time::timeout(Duration::from_secs(60), std::future::pending::<()>()).await;
    assert_eq!(
        lock(&items)
            .iter()
            .filter(|i| matches!(i.outcome, Outcome::Synced { .. }))
            .count(),
        5
    );
    h.stop().await;
}

/// `sync-user` (run while no daemon was) linked the row before the stream
/// reached its insert: the insert is pushed as an update of that record,
/// never as a second create.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_insert_of_a_row_already_linked_is_pushed_as_an_update_of_its_record() {
    let sink = Arc::new(ScriptedSink::default());
    let store = Arc::new(MemoryStore::default());
    lock(&store.external_ids).insert("a".into(), "ext_linked".into());
    let mut h = start(pipeline(sink.clone(), store.clone()), 64);
    h.txn("a", Operation::Insert, 100).await;
    let item = h.item().await;
    assert!(matches!(item.outcome, Outcome::Synced { .. }), "{item:?}");
    let seen = sink.seen();
    assert_eq!(seen.len(), 1);
    assert_eq!(seen[0].op, Operation::Update, "a second create");
    assert_eq!(seen[0].external_id.as_deref(), Some("ext_linked"));
    // A row not linked yet is created.
    h.txn("b", Operation::Insert, 200).await;
    let _ = h.item().await;
    let seen = sink.seen();
    assert_eq!(
        (seen[1].op, seen[1].external_id.as_deref()),
        (Operation::Insert, None)
    );
    h.stop().await;
}

/// A change decoded without the external id (the row was linked after the
/// change was made) finds it in the table: a delete stays a delete of that
/// record, an update updates it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_change_decoded_without_the_id_is_pushed_with_the_id_the_table_holds() {
    let sink = Arc::new(ScriptedSink::default());
    let store = Arc::new(MemoryStore::default());
    lock(&store.external_ids).insert("a".into(), "ext_a".into());
    lock(&store.external_ids).insert("b".into(), "ext_b".into());
    let mut h = start(pipeline(sink.clone(), store.clone()), 64);
    h.txn("a", Operation::Update, 100).await;
    let _ = h.item().await;
    h.txn("b", Operation::Delete, 200).await;
    let _ = h.item().await;
    let seen = sink.seen();
    let of = |key: &str| {
        let s = seen.iter().find(|s| s.key == key).expect("pushed");
        (s.op, s.external_id.clone())
    };
    assert_eq!(of("a"), (Operation::Update, Some("ext_a".into())));
    assert_eq!(of("b"), (Operation::Delete, Some("ext_b".into())));
    h.stop().await;
}

/// A clean stop waits for the writer to make every item durable, dead
/// letters included, and then ends.
#[tokio::test(start_paused = true)]
async fn a_stop_waits_for_a_dead_letter_to_become_durable() {
    let sink = Arc::new(ScriptedSink::default());
    lock(&sink.refuse).insert("a".into());
    let mut h = start(pipeline(sink.clone(), Arc::default()), 64);
    h.txn("a", Operation::Insert, 100).await;
    let failed = h.item().await;
    assert!(
        matches!(failed.outcome, Outcome::DeadLetter(_)),
        "{failed:?}"
    );
    h.cancel.cancel();
    let _ = tokio::time::timeout(Duration::from_secs(60), std::future::pending::<()>()).await;
    assert!(
        !h.task.is_finished(),
        "the loop ended while its dead letter was not durable"
    );
    h.make_durable(&[&failed]);
    let ended = tokio::time::timeout(Duration::from_secs(60), h.task)
        .await
        .expect("the loop ends once the dead letter is durable")
        .expect("join");
    assert!(ended.is_ok(), "{ended:?}");
}

/// A row linked behind the lanes' back (an import or a webhook of the
/// sink's own service, whose write is not pushed) after the user's queued
/// changes were committed: they carry no id and values the link overwrote.
/// Each is pushed as an update of the linked record with the row as it is
/// now, never as a create, also the second one, whose id comes from memory
/// while the first write-back is not durable yet.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn changes_from_before_a_link_push_the_row_as_it_is_now() {
    use crate::core::table::CurrentRow;
    let sink = Arc::new(ScriptedSink::default());
    let store = Arc::new(MemoryStore::default());
    let mut now = Map::new();
    now.insert("id".into(), json!("u1"));
    now.insert("name".into(), json!("as the link wrote it"));
    lock(&store.rows).insert(
        "u1".into(),
        CurrentRow {
            key: UserKey {
                text: "u1".into(),
                json: json!("u1"),
            },
            data: now.clone(),
            external_id: Some("ext_linked".into()),
            omitted: Vec::new(),
        },
    );
    lock(&store.external_ids).insert("u1".into(), "ext_linked".into());
    // The link recorded the hash of what it wrote, as an inbound write of
    // the sink's service does.
    lock(&store.hashes).insert("u1".into(), crate::core::outcome::values_hash(&now));
    let mut h = start(pipeline(Arc::clone(&sink), Arc::clone(&store)), 16);
    h.txn("u1", Operation::Update, 10).await;
    h.txn("u1", Operation::Insert, 20).await;
    // Neither write-back is made durable: the second push's id is the
    // first one's, from memory.
    let first = h.item().await;
    let second = h.item().await;
    let seen = sink.seen();
    assert_eq!(seen.len(), 2, "{seen:?}");
    for s in &seen {
        assert_eq!(s.external_id.as_deref(), Some("ext_linked"), "{s:?}");
        assert_eq!(s.op, Operation::Update, "{s:?}");
        assert_eq!(s.data.as_ref(), Some(&now), "{s:?}");
    }
    for item in [&first, &second] {
        assert!(
            matches!(&item.outcome, Outcome::Synced { external_id: Some(id), .. } if id == "ext_linked"),
            "{:?}",
            item.outcome
        );
    }
    h.stop().await;
}

/// An import from the sink's service is running: a never-synced user's
/// update waits for it (the import may be about to link the row to a record
/// the service already has; creating one now would make a second) and is
/// then pushed as an update of the record the import linked. An insert, a
/// row the service cannot have yet, does not wait.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn during_an_import_only_a_never_synced_users_update_waits_for_it() {
    let sink = Arc::new(ScriptedSink::default());
    let store = Arc::new(MemoryStore::default());
    store.import_running.store(true, Ordering::SeqCst);
    let mut h = start(pipeline(Arc::clone(&sink), Arc::clone(&store)), 16);
    h.txn("old", Operation::Update, 10).await;
    h.txn("new", Operation::Insert, 20).await;
    let first = h.item().await;
    assert_eq!(first.key.text, "new", "{first:?}");
    let keys: Vec<String> = sink.seen().into_iter().map(|s| s.key).collect();
    assert_eq!(keys, ["new"], "the update did not wait for the import");
    // The import links the row and ends.
    lock(&store.external_ids).insert("old".into(), "ext_imported".into());
    store.import_running.store(false, Ordering::SeqCst);
    let second = h.item().await;
    assert_eq!(second.key.text, "old", "{second:?}");
    let seen = sink.seen();
    assert_eq!(seen.len(), 2, "{seen:?}");
    assert_eq!(seen[1].external_id.as_deref(), Some("ext_imported"));
    assert_eq!(seen[1].op, Operation::Update);
    h.stop().await;
}

/// The row's id came from this user's own earlier push (its write-back is
/// durable, so memory no longer holds it) and the row has changed since:
/// the recorded hash is not the row's, so a change committed before that
/// write-back still pushes its own values, in order (found by
/// `spine::one_transaction_of_many_users_keeps_per_user_order`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_change_from_before_its_own_write_back_keeps_its_values() {
    use crate::core::table::CurrentRow;
    let sink = Arc::new(ScriptedSink::default());
    let store = Arc::new(MemoryStore::default());
    let mut now = Map::new();
    now.insert("id".into(), json!("u2"));
    now.insert("name".into(), json!("a later change"));
    lock(&store.rows).insert(
        "u2".into(),
        CurrentRow {
            key: UserKey {
                text: "u2".into(),
                json: json!("u2"),
            },
            data: now.clone(),
            external_id: Some("ext_own".into()),
            omitted: Vec::new(),
        },
    );
    lock(&store.external_ids).insert("u2".into(), "ext_own".into());
    lock(&store.hashes).insert("u2".into(), "hash of the created values".into());
    let mut h = start(pipeline(Arc::clone(&sink), Arc::clone(&store)), 16);
    h.txn("u2", Operation::Update, 10).await;
    let _ = h.item().await;
    let seen = sink.seen();
    assert_eq!(seen.len(), 1, "{seen:?}");
    assert_eq!(seen[0].external_id.as_deref(), Some("ext_own"));
    assert_eq!(seen[0].op, Operation::Update);
    assert_eq!(
        seen[0].data.as_ref().and_then(|d| d.get("name")),
        None,
        "the change's own values, not the row's: {seen:?}"
    );
    h.stop().await;
}

/// A sync request (`sync-user`, `backfill`, `recover`) on its own: a
/// transaction holding only the request's placeholder change.
async fn request(
    h: &Harness,
    key: &str,
    op: Operation,
    lsn: Lsn,
    id: i64,
    external_id: Option<&str>,
) {
    let mut c = change(key, op, lsn);
    // As `Rows::request_change` builds it: the lane reads the row's values.
    c.data = None;
    c.changed = Vec::new();
    c.external_id = external_id.map(str::to_string);
    h.send(SourceEvent::Request { change: c, id }).await;
    h.send(SourceEvent::TxnEnd { end_lsn: lsn + 1 }).await;
}

fn row(key: &str, external_id: Option<&str>) -> crate::core::table::CurrentRow {
    let mut data = Map::new();
    data.insert("id".into(), json!(key));
    data.insert("name".into(), json!(format!("row of {key}")));
    crate::core::table::CurrentRow {
        key: UserKey {
            text: key.into(),
            json: json!(key),
        },
        data,
        external_id: external_id.map(str::to_string),
        omitted: Vec::new(),
    }
}

/// Each request ends marked with what its push did, which `sync-user`,
/// `backfill --wait` and `recover` report: a never-linked row's push created
/// the record; a linked row's updated it; a row deleted before the
/// request's turn pushes nothing (its deletion travels as its own change);
/// a `recover` delete request whose row is still gone pushes the delete.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_sync_request_is_marked_with_what_its_push_did() {
    use crate::core::outcome::RequestOutcome;
    let sink = Arc::new(ScriptedSink::default());
    let store = Arc::new(MemoryStore::default());
    lock(&store.rows).insert("new".into(), row("new", None));
    lock(&store.rows).insert("linked".into(), row("linked", Some("ext_linked")));
    lock(&store.external_ids).insert("linked".into(), "ext_linked".into());
    // Linked once; its row was deleted before the request's turn.
    lock(&store.external_ids).insert("gone".into(), "ext_gone".into());
    let mut h = start(pipeline(Arc::clone(&sink), Arc::clone(&store)), 16);
    request(&h, "new", Operation::Update, 10, 1, None).await;
    request(&h, "linked", Operation::Update, 20, 2, None).await;
    request(&h, "gone", Operation::Update, 30, 3, None).await;
    request(&h, "deleted", Operation::Delete, 40, 4, Some("ext_deleted")).await;
    let mut items = HashMap::new();
    for _ in 0..4 {
        let item = h.item().await;
        items.insert(item.key.text.clone(), item);
    }
    let mark = |key: &str| {
        let item = items.get(key).expect("an item for every request");
        item.request.clone().expect("the request's mark")
    };
    let seen = sink.seen();
    let pushed = |key: &str| seen.iter().find(|s| s.key == key).cloned();

    let new = mark("new");
    assert_eq!(new.id, 1);
    assert_eq!(new.outcome, RequestOutcome::Created, "{new:?}");
    assert_eq!(new.external_id.as_deref(), Some("ext_0"), "{new:?}");
    assert_eq!(pushed("new").map(|s| s.op), Some(Operation::Insert));
    // `sync-user` reports the push's latency in milliseconds.
    let Outcome::Synced { push_latency, .. } = &items["new"].outcome else {
        panic!("{:?}", items["new"].outcome)
    };
    assert_eq!(new.latency_ms, Some(push_latency.as_secs_f64() * 1000.0));

    let linked = mark("linked");
    assert_eq!(linked.outcome, RequestOutcome::Updated, "{linked:?}");
    assert_eq!(linked.external_id.as_deref(), Some("ext_linked"));
    let linked_push = pushed("linked").expect("the linked row is pushed");
    assert_eq!(linked_push.op, Operation::Update);
    assert_eq!(linked_push.data.as_ref(), Some(&row("linked", None).data));

    let gone = mark("gone");
    assert_eq!(gone.outcome, RequestOutcome::Unchanged, "{gone:?}");
    assert!(
        matches!(items["gone"].outcome, Outcome::Skipped),
        "{:?}",
        items["gone"].outcome
    );
    assert!(
        pushed("gone").is_none(),
        "a request whose row is gone pushed: {seen:?}"
    );

    let deleted = mark("deleted");
    assert_eq!(deleted.outcome, RequestOutcome::Deleted, "{deleted:?}");
    let delete = pushed("deleted").expect("the recover delete is pushed");
    assert_eq!(delete.op, Operation::Delete);
    assert_eq!(delete.external_id.as_deref(), Some("ext_deleted"));
    assert_eq!(seen.len(), 3, "{seen:?}");
    h.stop().await;
}

/// A change with a value the stream could not convert was pushed without
/// it (a sink that sends such a change at all): no values hash is recorded,
/// so `backfill` never takes the row as synced with values it never sent.
/// A whole change's hash is recorded, and a delete's never.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_a_whole_changes_values_are_recorded_as_synced() {
    let sink = Arc::new(ScriptedSink::default());
    let store = Arc::new(MemoryStore::default());
    lock(&store.external_ids).insert("whole".into(), "ext_w".into());
    lock(&store.external_ids).insert("partial".into(), "ext_p".into());
    lock(&store.external_ids).insert("deleted".into(), "ext_d".into());
    let mut h = start(pipeline(Arc::clone(&sink), Arc::clone(&store)), 16);
    h.txn("whole", Operation::Update, 10).await;
    let mut partial = change("partial", Operation::Update, 20);
    partial.unconvertible = Some("avatar: not valid UTF-8".into());
    h.send(SourceEvent::Change(partial)).await;
    h.send(SourceEvent::TxnEnd { end_lsn: 21 }).await;
    h.txn("deleted", Operation::Delete, 30).await;
    let mut items = HashMap::new();
    for _ in 0..3 {
        let item = h.item().await;
        items.insert(item.key.text.clone(), item);
    }
    let mut whole = Map::new();
    whole.insert("id".into(), json!("whole"));
    assert_eq!(
        items["whole"].values_hash,
        Some(crate::core::outcome::values_hash(&whole))
    );
    for key in ["partial", "deleted"] {
        assert!(
            matches!(items[key].outcome, Outcome::Synced { .. }),
            "{key}: {:?}",
            items[key].outcome
        );
        assert_eq!(items[key].values_hash, None, "{key}");
    }
    h.stop().await;
}

/// A request whose push is refused ends `failed` with the reason and where
/// to look; the same user's next request, while that dead letter is not
/// even durable yet, ends `parked` and says how to get it pushed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_request_is_marked_failed_and_the_next_one_parked() {
    use crate::core::outcome::RequestOutcome;
    let sink = Arc::new(ScriptedSink::default());
    let store = Arc::new(MemoryStore::default());
    lock(&store.rows).insert("f".into(), row("f", Some("ext_f")));
    lock(&store.external_ids).insert("f".into(), "ext_f".into());
    lock(&sink.refuse).insert("f".into());
    let mut h = start(pipeline(Arc::clone(&sink), Arc::clone(&store)), 16);
    request(&h, "f", Operation::Update, 10, 7, None).await;
    let failed = h.item().await;
    let mark = failed.request.clone().expect("the request's mark");
    assert_eq!(
        (mark.id, mark.outcome),
        (7, RequestOutcome::Failed),
        "{mark:?}"
    );
    let error = mark.error.unwrap_or_default();
    assert!(
        error.contains("HTTP 400")
            && error.contains("after 1 attempt(s)")
            && error.contains("dlq list"),
        "{error}"
    );
    request(&h, "f", Operation::Update, 20, 8, None).await;
    let parked = h.item().await;
    let mark = parked.request.clone().expect("the request's mark");
    assert_eq!(
        (mark.id, mark.outcome),
        (8, RequestOutcome::Parked),
        "{mark:?}"
    );
    assert!(
        mark.error.unwrap_or_default().contains("dlq replay"),
        "the parked mark says how to get the user pushed"
    );
    assert_eq!(sink.seen().len(), 1, "the parked request was pushed");
    h.stop().await;
}
