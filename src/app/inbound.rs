//! The inbound webhook receiver: `POST /<source>` on `inbound.listen`,
//! verified on the raw body before anything parses it or touches the
//! database, then applied through the source's `store::inbound::Applier`.
//! Answers: 200 (applied, duplicate, stale, echo, unmatched, ignored or
//! recorded as failed), 400 (not a delivery), 401 (signature or timestamp),
//! 404 (no such source), 408 (body too slow), 413 (body too large), 503
//! (database unavailable: the provider retries). Runs beside the stream on
//! its own connections, so an outage here never holds the stream up.

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
use crate::store::inbound::{Applied, Applier, ApplyError};

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
}

struct Shared {
    cfg: Config,
    shape: TableShape,
    sources: Vec<Arc<SourceState>>,
    max_body: usize,
    request_timeout: Duration,
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
    let shared = Arc::new(Shared {
        cfg: cfg.clone(),
        shape: shape.clone(),
        sources: inbound
            .sources
            .iter()
            .map(|s| {
                Arc::new(SourceState {
                    source: s.clone(),
                    applier: tokio::sync::Mutex::new(None),
                })
            })
            .collect(),
        max_body: inbound.max_body_bytes,
        request_timeout: inbound.request_timeout,
    });
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
    let record = match parse(
        state.source.kind,
        &body,
        verified.message_id.as_deref(),
        verified.timestamp,
        &state.source.mapping,
    ) {
        Ok(r) => r,
        Err(e) => {
            tracing::warn!(source = %source, error = %e, "verified inbound event cannot be read");
            crate::observe::metrics::inbound(source, "failed");
            return answer(StatusCode::BAD_REQUEST, "unreadable");
        }
    };
    let applied = tokio::time::timeout(APPLY_TIMEOUT, apply(&shared, &state, &record)).await;
    match applied {
        Ok(Ok(outcome)) => {
            crate::observe::metrics::inbound(source, outcome.outcome());
            tracing::debug!(source = %source, event_id = %record.event_id, event_type = %record.event_type, outcome = outcome.outcome(), "inbound event");
            if let Applied::Failed(reason) = &outcome {
                tracing::warn!(source = %source, event_id = %record.event_id, reason = %reason, "inbound event cannot be applied; recorded as failed");
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

async fn apply(
    shared: &Shared,
    state: &SourceState,
    record: &crate::core::inbound_event::InboundRecord,
) -> Result<Applied, ApplyError> {
    let mut slot = state.applier.lock().await;
    let mut applier = match slot.take() {
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
    let result = applier.apply(record).await;
    // After a database error the session may be broken: open a new one on
    // the next delivery.
    if result.is_ok() {
        *slot = Some(applier);
    }
    result
}
