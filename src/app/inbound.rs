//! The inbound webhook receiver: `POST /<source>` on `inbound.listen`,
//! verified on the raw body before anything parses it or touches the
//! database, then applied through the source's `store::inbound::Applier`.
//! Answers: 200 (applied, duplicate, stale, echo, unmatched, ignored,
//! deferred, or kept as an inbound dead letter), 400 (not a delivery), 401
//! (signature or timestamp), 404 (no such source), 408 (body too slow), 413
//! (body too large), 503 (database unavailable: the provider retries). Runs
//! beside the stream on its own connections, so an outage here never holds
//! the stream up. Deferred events (their user's outbound change was not
//! written back yet) are re-applied here, by one task per source, once it
//! is; `usersync dlq replay` of an inbound dead letter comes here too.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, Request, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::Router;
use tokio_util::sync::CancellationToken;

use crate::config::inbound::InboundSource;
use crate::config::Config;
use crate::core::inbound_event::parse;
use crate::core::table::TableShape;
use crate::store::inbound::{Applied, Applier, ApplyError, Claim, Delivery};

#[derive(Debug, thiserror::Error)]
#[error("cannot listen for inbound webhooks on {addr}: {source}")]
pub struct InboundError {
    pub addr: String,
    #[source]
    pub source: std::io::Error,
}

impl crate::core::error::Classify for InboundError {
    /// A listen address that cannot be bound (in use, not ours) is the
    /// operator's to change, as with metrics.listen.
    fn kind(&self) -> crate::core::error::ErrorKind {
        crate::core::error::ErrorKind::Config
    }
}

/// At most 256 connections at once (more are closed on accept); a request's
/// headers must arrive within 5 s. Bodies are bounded by the body limit and
/// the request timeout (`inbound.request_timeout`) in the handler.
const BOUNDS: crate::observe::listener::Bounds = crate::observe::listener::Bounds {
    what: "inbound endpoint",
    max_connections: 256,
    header_read_timeout: Duration::from_secs(5),
    max_buf: None,
    lifetime: None,
};
/// How long a request waits for its source's session to apply it before
/// answering 503 (the provider retries; Svix gives up waiting at 15 s).
const APPLY_TIMEOUT: Duration = Duration::from_secs(10);

struct SourceState {
    source: InboundSource,
    /// One session per source (its origin admits one); taken out while a
    /// record is applied and put back only when the apply finished, so a
    /// timed-out request can never leave a half-open transaction behind.
    applier: tokio::sync::Mutex<Option<Applier>>,
    /// Something was deferred: wakes the source's re-evaluation task.
    deferred: tokio::sync::Notify,
    /// Verified deliveries waiting for the source's batch worker.
    queue: tokio::sync::mpsc::UnboundedSender<Queued>,
}

/// A verified delivery and where its outcome goes.
struct Queued {
    delivery: Delivery,
    reply: tokio::sync::oneshot::Sender<Result<(String, Applied), ApplyError>>,
}

struct Shared {
    cfg: Config,
    shape: TableShape,
    sources: Vec<Arc<SourceState>>,
    max_body: usize,
    request_timeout: Duration,
    batch_max: usize,
}

/// A running receiver.
pub struct Receiver {
    pub addr: SocketAddr,
}

/// Binds `inbound.listen` and serves until `cancel` fires; `None` when no
/// source is configured.
pub async fn start(
    cfg: &Config,
    shape: &TableShape,
    cancel: CancellationToken,
) -> Result<Option<Receiver>, InboundError> {
    let Some(inbound) = cfg.inbound.as_ref() else {
        return Ok(None);
    };
    let bind_err = |source| InboundError {
        addr: inbound.listen.clone(),
        source,
    };
    let listener = tokio::net::TcpListener::bind(&inbound.listen)
        .await
        .map_err(bind_err)?;
    let addr = listener.local_addr().map_err(bind_err)?;
    let mut queues = Vec::new();
    let shared = Arc::new(Shared {
        cfg: cfg.clone(),
        shape: shape.clone(),
        sources: inbound
            .sources
            .iter()
            .map(|s| {
                let (queue, queued) = tokio::sync::mpsc::unbounded_channel();
                queues.push(queued);
                Arc::new(SourceState {
                    source: s.clone(),
                    applier: tokio::sync::Mutex::new(None),
                    deferred: tokio::sync::Notify::new(),
                    queue,
                })
            })
            .collect(),
        max_body: inbound.max_body_bytes,
        request_timeout: inbound.request_timeout,
        batch_max: inbound.batch_max,
    });
    for (state, queued) in shared.sources.iter().zip(queues) {
        tokio::spawn(reevaluate(shared.clone(), state.clone(), cancel.clone()));
        tokio::spawn(batches(
            shared.clone(),
            state.clone(),
            queued,
            cancel.clone(),
        ));
    }
    let app = Router::new()
        .route("/{source}", post(receive))
        .with_state(shared);
    tokio::spawn(crate::observe::listener::serve(
        listener, app, BOUNDS, cancel,
    ));
    tracing::info!(address = %addr, "receiving inbound webhooks on http://{addr}/<source>");
    if !addr.ip().is_loopback() {
        tracing::info!(address = %addr, "the inbound endpoint is reachable beyond this host; every delivery is verified before it is read");
    }
    Ok(Some(Receiver { addr }))
}

/// The origins the stream must drop for this sink: those of the inbound
/// sources that are the sink's own service (memberstack→memberstack,
/// stripe→stripe). A Clerk source's writes are pushed to any sink.
pub fn echo_origins(cfg: &Config) -> Vec<String> {
    cfg.inbound
        .iter()
        .flat_map(|i| i.sources.iter())
        .filter(|s| s.same_service_as(cfg.sink.kind.name()))
        .map(|s| s.origin(&cfg.database.origin))
        .collect()
}

fn answer(status: StatusCode, outcome: &str) -> Response {
    (
        status,
        [(axum::http::header::CONTENT_TYPE, "application/json")],
        format!("{{\"outcome\":\"{outcome}\"}}"),
    )
        .into_response()
}

fn now_secs() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

async fn receive(
    State(shared): State<Arc<Shared>>,
    Path(name): Path<String>,
    request: Request<Body>,
) -> Response {
    let Some(state) = shared
        .sources
        .iter()
        .find(|s| s.source.name == name)
        .cloned()
    else {
        return answer(StatusCode::NOT_FOUND, "unknown_source");
    };
    let source = &state.source.name;
    let (parts, body) = request.into_parts();
    // A declared length over the limit is refused before reading a byte.
    let declared = parts
        .headers
        .get(axum::http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > shared.max_body as u64) {
        crate::observe::metrics::inbound(source, "rejected");
        return answer(StatusCode::PAYLOAD_TOO_LARGE, "too_large");
    }
    let body = match tokio::time::timeout(
        shared.request_timeout,
        axum::body::to_bytes(body, shared.max_body),
    )
    .await
    {
        Ok(Ok(b)) => b,
        Ok(Err(_)) => {
            crate::observe::metrics::inbound(source, "rejected");
            return answer(StatusCode::PAYLOAD_TOO_LARGE, "too_large");
        }
        Err(_) => {
            crate::observe::metrics::inbound(source, "rejected");
            return answer(StatusCode::REQUEST_TIMEOUT, "timeout");
        }
    };
    let verified = match verify(&state.source, &parts.headers, &body) {
        Ok(v) => v,
        Err(rejected) => {
            tracing::info!(source = %source, reason = %rejected, "inbound delivery refused");
            crate::observe::metrics::inbound(source, "rejected");
            let status =
                StatusCode::from_u16(rejected.status()).unwrap_or(StatusCode::UNAUTHORIZED);
            return answer(status, "rejected");
        }
    };
    let delivery = Delivery {
        body: body.to_vec(),
        message_id: verified.message_id.clone(),
        delivered_at: verified.timestamp,
    };
    let applied = tokio::time::timeout(APPLY_TIMEOUT, apply(&shared, &state, delivery)).await;
    match applied {
        Ok(Ok((event_id, outcome))) => {
            crate::observe::metrics::inbound(source, outcome.outcome());
            tracing::debug!(source = %source, event_id = %event_id, outcome = outcome.outcome(), "inbound event");
            match &outcome {
                Applied::Failed(reason) => {
                    tracing::warn!(source = %source, event_id = %event_id, reason = %reason, "inbound event cannot be applied; kept as a dead letter (usersync dlq list --inbound)");
                }
                Applied::Deferred => state.deferred.notify_one(),
                _ => {}
            }
            answer(StatusCode::OK, outcome.outcome())
        }
        Ok(Err(e)) => {
            tracing::warn!(source = %source, error = %e, "inbound event not applied; the provider will retry");
            crate::observe::metrics::inbound(source, "unavailable");
            answer(StatusCode::SERVICE_UNAVAILABLE, "unavailable")
        }
        Err(_) => {
            crate::observe::metrics::inbound(source, "unavailable");
            answer(StatusCode::SERVICE_UNAVAILABLE, "unavailable")
        }
    }
}

fn verify(
    source: &InboundSource,
    headers: &HeaderMap,
    body: &[u8],
) -> Result<crate::core::inbound::Verified, crate::core::inbound::Rejected> {
    source.verifier.verify(
        |name| headers.get(name).and_then(|v| v.to_str().ok()),
        body,
        now_secs(),
    )
}

/// The source's session (opened on first use), taken out of its slot;
/// the caller puts it back only when its work succeeded: after a database
/// error the session may be broken, and the next use opens a new one.
async fn session<'s>(
    shared: &Shared,
    state: &'s SourceState,
) -> Result<(tokio::sync::MutexGuard<'s, Option<Applier>>, Applier), ApplyError> {
    let mut slot = state.applier.lock().await;
    let applier = match slot.take() {
        Some(a) => a,
        None => {
            Applier::connect(
                &shared.cfg,
                &state.source,
                &shared.shape,
                Duration::from_secs(2),
            )
            .await?
        }
    };
    Ok((slot, applier))
}

/// Applies one verified delivery through the source's batch worker: its
/// event id and outcome, once the transaction that recorded it committed.
/// A request that times out meanwhile stays queued and is applied later;
/// the provider's retry then finds it a duplicate.
async fn apply(
    shared: &Shared,
    state: &SourceState,
    delivery: Delivery,
) -> Result<(String, Applied), ApplyError> {
    if shared.batch_max <= 1 {
        return apply_one(shared, state, &delivery).await;
    }
    let (reply, answer) = tokio::sync::oneshot::channel();
    if let Err(unsent) = state.queue.send(Queued { delivery, reply }) {
        // The worker has stopped (the receiver is shutting down).
        return apply_one(shared, state, &unsent.0.delivery).await;
    }
    match answer.await {
        Ok(result) => result,
        Err(_) => Err(ApplyError::Stopped {
            source_name: state.source.name.clone(),
        }),
    }
}

/// The source's batch worker: takes whatever deliveries queued up while the
/// last batch was applied (at most `inbound.batch_max`) and applies them in
/// one transaction, so under load the per-event BEGIN/COMMIT round trips
/// and WAL flushes are paid once per batch; a lone delivery is applied as
/// before. Each delivery keeps its own claim, version check and outcome.
async fn batches(
    shared: Arc<Shared>,
    state: Arc<SourceState>,
    mut queued: tokio::sync::mpsc::UnboundedReceiver<Queued>,
    cancel: CancellationToken,
) {
    loop {
        let first = tokio::select! {
            q = queued.recv() => match q {
                Some(q) => q,
                None => return,
            },
            () = cancel.cancelled() => return,
        };
        let mut batch = vec![first];
        while batch.len() < shared.batch_max {
            match queued.try_recv() {
                Ok(q) => batch.push(q),
                Err(_) => break,
            }
        }
        apply_batch(&shared, &state, batch).await;
    }
}

async fn apply_batch(shared: &Shared, state: &SourceState, batch: Vec<Queued>) {
    let source = &state.source;
    let mut items = Vec::with_capacity(batch.len());
    let mut replies = Vec::with_capacity(batch.len());
    let mut readable = true;
    for q in batch {
        let d = &q.delivery;
        match parse(
            source.kind,
            &d.body,
            d.message_id.as_deref(),
            d.delivered_at,
            &source.mapping,
        ) {
            Ok(record) => items.push((Some(record), q.delivery)),
            Err(_) => {
                readable = false;
                items.push((None, q.delivery));
            }
        }
        replies.push(q.reply);
    }
    // Together only when every body reads (an unreadable one is a dead
    // letter of its own) and there is more than one.
    if readable && items.len() > 1 {
        let together: Vec<_> = items
            .into_iter()
            .filter_map(|(r, d)| r.map(|r| (r, d)))
            .collect();
        let outcomes = match session(shared, state).await {
            Ok((mut slot, mut a)) => {
                let out = a.receive_batch(&together).await;
                if !a.is_closed() {
                    *slot = Some(a);
                }
                out
            }
            Err(_) => None,
        };
        match outcomes {
            Some(outcomes) => {
                for (((record, _), outcome), reply) in
                    together.into_iter().zip(outcomes).zip(replies)
                {
                    let _ = reply.send(Ok((record.event_id, outcome)));
                }
            }
            // Nothing committed: one by one, each with its own outcome or
            // error.
            None => {
                for ((_, delivery), reply) in together.into_iter().zip(replies) {
                    let _ = reply.send(apply_one(shared, state, &delivery).await);
                }
            }
        }
        return;
    }
    for ((_, delivery), reply) in items.into_iter().zip(replies) {
        let _ = reply.send(apply_one(shared, state, &delivery).await);
    }
}

/// Parses and applies one verified delivery in its own transaction: its
/// event id and outcome. A body that does not read as an event is kept as
/// a dead letter.
async fn apply_one(
    shared: &Shared,
    state: &SourceState,
    delivery: &Delivery,
) -> Result<(String, Applied), ApplyError> {
    let source = &state.source;
    let parsed = parse(
        source.kind,
        &delivery.body,
        delivery.message_id.as_deref(),
        delivery.delivered_at,
        &source.mapping,
    );
    let (mut slot, mut a) = session(shared, state).await?;
    let result = match parsed {
        Ok(record) => a
            .receive(&record, delivery)
            .await
            .map(|outcome| (record.event_id, outcome)),
        Err(e) => a
            .dead_letter_unreadable(None, delivery, &e.to_string())
            .await
            .map(|outcome| (delivery.message_id.clone().unwrap_or_default(), outcome)),
    };
    if result.is_ok() {
        *slot = Some(a);
    }
    result
}

/// How often a source with deferred events looks at them again.
const REEVALUATE_EVERY: Duration = Duration::from_millis(250);
/// How often an idle source checks for events handed to it (`usersync dlq
/// replay` while this daemon holds the source's session).
const HANDED_EVERY: u32 = 16;

/// The source's deferred events, applied once their users' outbound
/// changes are written back (the apply path decides, by the values hash).
/// Polls while something is deferred; otherwise only a cheap check every
/// few seconds on a connection of its own (not the source's session, which
/// holds the origin and opens on the first delivery).
async fn reevaluate(shared: Arc<Shared>, state: Arc<SourceState>, cancel: CancellationToken) {
    let mut checker: Option<tokio_postgres::Client> = None;
    let mut pending = false;
    let mut idle_ticks = HANDED_EVERY;
    loop {
        if !pending && idle_ticks >= HANDED_EVERY {
            idle_ticks = 0;
            if checker.as_ref().is_none_or(|c| c.is_closed()) {
                checker = crate::store::db::connect(&shared.cfg.database, "usersync-inbound")
                    .await
                    .ok();
            }
            if let Some(c) = &checker {
                pending = crate::store::inbound::deferred_waiting(c, &state.source.name)
                    .await
                    .unwrap_or(false);
            }
        }
        if pending {
            match reevaluate_once(&shared, &state).await {
                Ok(left) => pending = left,
                Err(e) => {
                    tracing::warn!(source = %state.source.name, error = %e, "cannot re-apply deferred inbound events yet");
                }
            }
        }
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = state.deferred.notified() => pending = true,
            _ = tokio::time::sleep(REEVALUATE_EVERY) => idle_ticks += 1,
        }
    }
}

/// One pass over the deferred events; whether any is still deferred.
async fn reevaluate_once(shared: &Shared, state: &SourceState) -> Result<bool, ApplyError> {
    let (mut slot, mut a) = session(shared, state).await?;
    let result = reevaluate_with(&mut a, &state.source).await;
    if result.is_ok() {
        *slot = Some(a);
    }
    result
}

async fn reevaluate_with(a: &mut Applier, source: &InboundSource) -> Result<bool, ApplyError> {
    let due = a.deferred(50).await?;
    let mut left = false;
    for stored in &due {
        let d = &stored.delivery;
        let outcome = match parse(
            source.kind,
            &d.body,
            d.message_id.as_deref(),
            d.delivered_at,
            &source.mapping,
        ) {
            Ok(record) => {
                a.reapply(
                    &record,
                    d,
                    Claim::Deferred {
                        overdue: stored.overdue,
                    },
                )
                .await?
            }
            Err(e) => {
                a.dead_letter_unreadable(Some(&stored.event_id), d, &e.to_string())
                    .await?
            }
        };
        match outcome {
            Applied::Deferred => left = true,
            Applied::Duplicate => {}
            other => {
                crate::observe::metrics::inbound(&source.name, other.outcome());
                tracing::debug!(source = %source.name, event_id = %stored.event_id, outcome = other.outcome(), "deferred inbound event re-applied");
            }
        }
    }
    Ok(left || due.len() == 50)
}

/// What `usersync dlq replay SOURCE/EVENT` came to.
#[derive(Debug)]
pub enum Replayed {
    /// Applied here (no receiver was running): the apply's outcome.
    Applied(Applied),
    /// A running receiver holds the source's session: handed to it.
    Handed,
    NotFound,
}

#[derive(Debug, thiserror::Error)]
pub enum InboundReplayError {
    #[error("no inbound source {0} in the configuration")]
    UnknownSource(String),
    #[error(transparent)]
    Apply(#[from] ApplyError),
    #[error(transparent)]
    Db(#[from] crate::store::db::DbError),
    #[error(transparent)]
    Schema(#[from] crate::store::schema::SchemaError),
    #[error(transparent)]
    Connect(#[from] crate::store::db::ConnectError),
}

impl crate::core::error::Classify for InboundReplayError {
    fn kind(&self) -> crate::core::error::ErrorKind {
        match self {
            InboundReplayError::UnknownSource(_) => crate::core::error::ErrorKind::Config,
            InboundReplayError::Apply(e) => e.kind(),
            InboundReplayError::Db(e) => e.kind(),
            InboundReplayError::Schema(e) => e.kind(),
            InboundReplayError::Connect(e) => e.kind(),
        }
    }
}

/// `usersync dlq replay SOURCE/EVENT`: parses the kept delivery with the
/// mapping as configured now and applies it through the source's write
/// path (its origin, so never echoed to its own service). When a daemon is
/// receiving for the source, it holds the source's session: the dead
/// letter is handed to it and applied like a deferred event.
pub async fn replay(
    cfg: &Config,
    source_name: &str,
    event_id: &str,
) -> Result<Replayed, InboundReplayError> {
    let source = cfg
        .inbound
        .as_ref()
        .and_then(|i| i.source(source_name))
        .ok_or_else(|| InboundReplayError::UnknownSource(source_name.to_string()))?;
    let client = crate::store::db::connect(&cfg.database, "usersync-dlq").await?;
    let Some(delivery) =
        crate::store::inbound::dead_letter_delivery(&client, source_name, event_id).await?
    else {
        return Ok(Replayed::NotFound);
    };
    let shape = crate::store::schema::inspect_table(&client, &cfg.database.table).await?;
    let mut applier = match Applier::connect(cfg, source, &shape, Duration::ZERO).await {
        Ok(a) => a,
        Err(ApplyError::OriginBusy { .. }) => {
            return Ok(
                if crate::store::inbound::requeue(&client, source_name, event_id).await? {
                    Replayed::Handed
                } else {
                    Replayed::NotFound
                },
            )
        }
        Err(e) => return Err(e.into()),
    };
    let outcome = match parse(
        source.kind,
        &delivery.body,
        delivery.message_id.as_deref(),
        delivery.delivered_at,
        &source.mapping,
    ) {
        Ok(record) => {
            applier
                .reapply(&record, &delivery, Claim::DeadLetter)
                .await?
        }
        Err(e) => {
            applier
                .dead_letter_unreadable(Some(event_id), &delivery, &e.to_string())
                .await?
        }
    };
    crate::observe::metrics::inbound(source_name, outcome.outcome());
    Ok(Replayed::Applied(outcome))
}
