//! Prometheus metrics and the health endpoints. Owns the process-wide
//! registry, every metric definition, the tiny recording functions the hot
//! paths call (one line each, no allocation: label sets are resolved once),
//! the replication-lag poller, and the axum server for `/metrics`,
//! `/healthz` and `/readyz` that `usersync run` and the demo start.
//!
//! Built on `prometheus-client`, the Prometheus project's own Rust client:
//! its metrics are plain atomics behind cheap handles, so a handle resolved
//! once per label set costs one atomic add per change.

use std::net::SocketAddr;
use std::sync::OnceLock;
use std::time::Duration;

use axum::http::{header, StatusCode};
use axum::response::IntoResponse;
use axum::routing::get;
use axum::Router;
use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::{Registry, Unit};
use tokio_util::sync::CancellationToken;

use crate::config::Config;

#[derive(Debug, thiserror::Error)]
pub enum MetricsError {
    #[error("cannot listen on {addr} (metrics.listen): {source}; pick another port, or set metrics.listen = \"\" to disable the endpoint")]
    Bind {
        addr: String,
        source: std::io::Error,
    },
}

type Labels1 = [(&'static str, &'static str); 1];
type Labels2 = [(&'static str, &'static str); 2];
type HistogramFamily<L> = Family<L, Histogram, fn() -> Histogram>;

/// Where a push attempt ended.
#[derive(Debug, Clone, Copy)]
pub enum PushOutcome {
    Ok,
    /// Will be retried (or dead-lettered once the retry budget is spent).
    RetryableError,
    /// Refused for good: dead-lettered at once.
    PermanentError,
}

const OPERATIONS: [&str; 3] = ["insert", "update", "delete"];
const KNOWN_SINKS: [&str; 3] = ["webhook", "memberstack", "stripe"];

/// Handles for one sink, resolved on its first push.
struct SinkHandles {
    ok: Counter,
    retryable: Counter,
    permanent: Counter,
    duration: Histogram,
    retries: Counter,
}

struct Metrics {
    registry: Registry,
    changes_seen: [Counter; 3],
    synced: [Counter; 3],
    pushes: Family<Labels2, Counter>,
    push_duration: HistogramFamily<Labels1>,
    retries: Family<Labels1, Counter>,
    /// One slot per known sink, the last for any other (benchmarks' null sink).
    sinks: [OnceLock<SinkHandles>; 4],
    sync_latency: Histogram,
    dead_failed: Counter,
    dead_parked: Counter,
    parked_users: Gauge,
    in_flight: Gauge,
    buffered: Gauge,
    buffer_capacity: Gauge,
    lag_bytes: Gauge,
    streaming: Gauge,
    leader: Gauge,
    sync_log_pruned: Counter,
    /// Inbound webhook events by source (configured names) and outcome.
    inbound: Family<Vec<(String, String)>, Counter>,
    /// The periodic reconcile's last counts, by drift kind.
    drift: Family<Vec<(String, String)>, Gauge>,
}

/// `insert`, `update`, `delete`: the `operation` label's values, in order.
fn op_index(op: &str) -> usize {
    match op {
        "insert" => 0,
        "update" => 1,
        _ => 2,
    }
}

fn latency_histogram() -> Histogram {
    // 1 ms … ~65 s: local webhooks answer in milliseconds, retried pushes take seconds.
    Histogram::new(exponential_buckets(0.001, 2.0, 17))
}

fn metrics() -> &'static Metrics {
    static METRICS: OnceLock<Metrics> = OnceLock::new();
    METRICS.get_or_init(|| {
        let mut registry = Registry::with_prefix("usersync");
        let changes: Family<Labels1, Counter> = Family::default();
        registry.register(
            "changes_seen",
            "Changes to the users table decoded from the replication stream, by operation (own write-backs and updates of unsynced columns excluded)",
            changes.clone(),
        );
        let synced: Family<Labels1, Counter> = Family::default();
        registry.register(
            "changes_synced",
            "Changes pushed and made durable (written back), by operation",
            synced.clone(),
        );
        let pushes: Family<Labels2, Counter> = Family::default();
        registry.register(
            "pushes",
            "Push attempts to the external service, by sink and outcome (ok, retryable_error, permanent_error)",
            pushes.clone(),
        );
        let push_duration: HistogramFamily<Labels1> =
            Family::new_with_constructor(latency_histogram);
        registry.register_with_unit(
            "push_duration",
            "Duration of one push attempt (one HTTP exchange), by sink",
            Unit::Seconds,
            push_duration.clone(),
        );
        let retries: Family<Labels1, Counter> = Family::default();
        registry.register(
            "push_retries",
            "Push attempts that failed and are retried after a backoff, by sink",
            retries.clone(),
        );
        let sync_latency = latency_histogram();
        registry.register_with_unit(
            "sync_latency",
            "From the source transaction's commit to the write-back's commit, per synced change",
            Unit::Seconds,
            sync_latency.clone(),
        );
        let dead: Family<Labels1, Counter> = Family::default();
        registry.register(
            "dead_letters",
            "Changes stored in usersync.dead_letters, by state (failed: refused by the service or out of retries; parked: queued behind a failed change of the same user)",
            dead.clone(),
        );
        let parked_users = Gauge::default();
        registry.register(
            "parked_users",
            "Users with dead letters whose changes are held until `usersync dlq replay`",
            parked_users.clone(),
        );
        let in_flight = Gauge::default();
        registry.register(
            "pushes_in_flight",
            "Users with a push in progress (at most sink.max_in_flight)",
            in_flight.clone(),
        );
        let buffered = Gauge::default();
        registry.register(
            "buffered_changes",
            "Changes held in memory, queued or in flight, not yet durable (at most pipeline.max_buffered_changes; reading stops when full)",
            buffered.clone(),
        );
        let buffer_capacity = Gauge::default();
        registry.register(
            "buffered_changes_limit",
            "pipeline.max_buffered_changes",
            buffer_capacity.clone(),
        );
        let lag_bytes = Gauge::default();
        registry.register_with_unit(
            "replication_lag",
            "WAL between the server's current position and the slot's confirmed position (PostgreSQL keeps at least this much WAL for usersync); -1 when unknown",
            Unit::Bytes,
            lag_bytes.clone(),
        );
        lag_bytes.set(-1);
        let streaming = Gauge::default();
        registry.register(
            "streaming",
            "1 while a replication session is streaming, else 0",
            streaming.clone(),
        );
        let leader = Gauge::default();
        registry.register(
            "leader",
            "1 while this daemon holds leadership (app::leader) and may push and write back, else 0 (standby)",
            leader.clone(),
        );
        let sync_log_pruned = Counter::default();
        registry.register(
            "sync_log_pruned_rows",
            "Rows deleted from usersync.sync_log by retention (sync_log.retention_days)",
            sync_log_pruned.clone(),
        );
        let inbound: Family<Vec<(String, String)>, Counter> = Family::default();
        registry.register(
            "inbound_events",
            "Inbound webhook deliveries by source and outcome (applied, duplicate, stale, echo, unmatched, ignored, failed, rejected, unavailable)",
            inbound.clone(),
        );
        let drift: Family<Vec<(String, String)>, Gauge> = Family::default();
        registry.register(
            "drift_records",
            "Differences between the users table and the service found by the last periodic reconcile ([reconcile] every), by kind (only_in_table, only_in_service, linked_missing, fields_differ, claimed_twice)",
            drift.clone(),
        );
        Metrics {
            drift,
            inbound,
            changes_seen: OPERATIONS.map(|op| changes.get_or_create_owned(&[("operation", op)])),
            synced: OPERATIONS.map(|op| synced.get_or_create_owned(&[("operation", op)])),
            pushes,
            push_duration,
            retries,
            sinks: Default::default(),
            sync_latency,
            dead_failed: dead.get_or_create_owned(&[("state", "failed")]),
            dead_parked: dead.get_or_create_owned(&[("state", "parked")]),
            parked_users,
            in_flight,
            buffered,
            buffer_capacity,
            lag_bytes,
            streaming,
            leader,
            sync_log_pruned,
            registry,
        }
    })
}

fn sink_handles(sink: &'static str) -> &'static SinkHandles {
    let m = metrics();
    let slot = KNOWN_SINKS.iter().position(|s| *s == sink).unwrap_or(3);
    m.sinks[slot].get_or_init(|| SinkHandles {
        ok: m
            .pushes
            .get_or_create_owned(&[("sink", sink), ("outcome", "ok")]),
        retryable: m
            .pushes
            .get_or_create_owned(&[("sink", sink), ("outcome", "retryable_error")]),
        permanent: m
            .pushes
            .get_or_create_owned(&[("sink", sink), ("outcome", "permanent_error")]),
        duration: m.push_duration.get_or_create_owned(&[("sink", sink)]),
        retries: m.retries.get_or_create_owned(&[("sink", sink)]),
    })
}

/// A change decoded from the stream and handed to the pipeline.
pub fn change_seen(op: &str) {
    metrics().changes_seen[op_index(op)].inc();
}

/// One push attempt ended after `secs`.
pub fn push_done(sink: &'static str, outcome: PushOutcome, secs: f64) {
    let h = sink_handles(sink);
    match outcome {
        PushOutcome::Ok => h.ok.inc(),
        PushOutcome::RetryableError => h.retryable.inc(),
        PushOutcome::PermanentError => h.permanent.inc(),
    };
    h.duration.observe(secs);
}

/// A failed attempt will be retried.
pub fn retry(sink: &'static str) {
    sink_handles(sink).retries.inc();
}

/// The pipeline's occupancy, recorded once per loop turn (plain stores).
pub fn pipeline(in_flight: usize, buffered: usize, parked: usize) {
    let m = metrics();
    m.in_flight.set(in_flight as i64);
    m.buffered.set(buffered as i64);
    m.parked_users.set(parked as i64);
}

/// A change written back in a committed batch: counted by operation, with
/// its commit-to-sync latency.
pub fn synced(op: &str, commit_time_us: i64, now_us: i64) {
    let m = metrics();
    m.synced[op_index(op)].inc();
    let us = (now_us - commit_time_us).max(0);
    m.sync_latency.observe(us as f64 / 1e6);
}

/// A change stored as a dead letter in a committed batch (`failed`: refused
/// by the sink; else parked behind an earlier one).
pub fn dead_lettered(failed: bool) {
    let m = metrics();
    if failed {
        m.dead_failed.inc()
    } else {
        m.dead_parked.inc()
    };
}

/// One inbound delivery answered, by source and outcome.
pub fn inbound(source: &str, outcome: &str) {
    metrics()
        .inbound
        .get_or_create(&vec![
            ("source".to_string(), source.to_string()),
            ("outcome".to_string(), outcome.to_string()),
        ])
        .inc();
}

/// The periodic reconcile's count of one drift kind.
pub fn set_drift(kind: &str, records: u64) {
    metrics()
        .drift
        .get_or_create(&vec![("kind".to_string(), kind.to_string())])
        .set(i64::try_from(records).unwrap_or(i64::MAX));
}

/// Rows removed from the sync log by retention.
pub fn sync_log_pruned(rows: u64) {
    metrics().sync_log_pruned.inc_by(rows);
}

/// Marks the daemon as streaming until the guard is dropped (session end).
#[must_use]
pub fn streaming() -> StreamingGuard {
    metrics().streaming.set(1);
    StreamingGuard(())
}

pub struct StreamingGuard(());

impl Drop for StreamingGuard {
    fn drop(&mut self) {
        metrics().streaming.set(0);
    }
}

/// Whether this daemon leads (`app::leader` sets it on winning and losing).
pub fn set_leader(leading: bool) {
    metrics().leader.set(i64::from(leading));
}

/// The slot's lag in bytes, or `None` when it cannot be read.
pub fn set_lag(bytes: Option<i64>) {
    metrics().lag_bytes.set(bytes.unwrap_or(-1));
    if let Some(b) = bytes {
        crate::observe::page::record_lag(b);
    }
}

/// Whether this process streams right now (the `usersync_streaming` gauge).
pub fn is_streaming() -> bool {
    metrics().streaming.get() == 1
}

/// The registry in OpenMetrics text, as served on `/metrics`.
pub fn render() -> String {
    let mut out = String::new();
    // Writing into a String cannot fail.
    let _ = encode(&mut out, &metrics().registry);
    out
}

/// Why the daemon is or is not ready, for `/readyz`.
pub fn readiness(max_lag_bytes: u64) -> Result<String, String> {
    let m = metrics();
    if m.leader.get() != 1 {
        return Err(
            "not ready: standby (another usersync leads, or the election is under way); this one takes over when the leader stops".into(),
        );
    }
    if m.streaming.get() != 1 {
        return Err("not ready: not streaming (starting, or reconnecting to PostgreSQL)".into());
    }
    let lag = m.lag_bytes.get();
    if lag < 0 {
        return Err("not ready: replication lag not known yet".into());
    }
    if lag as u64 > max_lag_bytes {
        return Err(format!(
            "not ready: replication lag {lag} bytes exceeds metrics.ready_max_lag_mb ({max_lag_bytes} bytes)"
        ));
    }
    Ok(format!("ready: streaming, replication lag {lag} bytes"))
}

/// A running metrics endpoint.
pub struct Server {
    pub addr: SocketAddr,
}

/// Starts `/metrics`, `/healthz` and `/readyz` on `metrics.listen` until
/// `cancel` fires. `None` when disabled. The lag they report is set by the
/// store's poller (`store::lag`), started beside it.
pub async fn serve(
    cfg: &Config,
    cancel: CancellationToken,
) -> Result<Option<Server>, MetricsError> {
    if cfg.metrics.listen.is_empty() {
        return Ok(None);
    }
    let listener = tokio::net::TcpListener::bind(&cfg.metrics.listen)
        .await
        .map_err(|source| MetricsError::Bind {
            addr: cfg.metrics.listen.clone(),
            source,
        })?;
    let addr = listener.local_addr().map_err(|source| MetricsError::Bind {
        addr: cfg.metrics.listen.clone(),
        source,
    })?;
    let max_lag = cfg.metrics.ready_max_lag_mb.saturating_mul(1024 * 1024);
    let app = Router::new()
        .route(
            "/metrics",
            get(|| async {
                (
                    [(
                        header::CONTENT_TYPE,
                        "application/openmetrics-text; version=1.0.0; charset=utf-8",
                    )],
                    render(),
                )
            }),
        )
        .route("/healthz", get(|| async { "ok\n" }))
        .route(
            "/",
            get(|| async {
                match crate::observe::page::current(is_streaming()).await {
                    Some(html) => (
                        [
                            (header::CONTENT_TYPE, "text/html; charset=utf-8"),
                            (header::CACHE_CONTROL, "no-store"),
                        ],
                        html,
                    )
                        .into_response(),
                    None => (StatusCode::NOT_FOUND, "no status page here; see /metrics\n")
                        .into_response(),
                }
            }),
        )
        .route(
            "/readyz",
            get(move || async move {
                match readiness(max_lag) {
                    Ok(why) => (StatusCode::OK, why + "\n").into_response(),
                    Err(why) => (StatusCode::SERVICE_UNAVAILABLE, why + "\n").into_response(),
                }
            }),
        );
    metrics()
        .buffer_capacity
        .set(cfg.pipeline.max_buffered_changes as i64);
    tokio::spawn(crate::observe::listener::serve(
        listener,
        app,
        BOUNDS,
        cancel.clone(),
    ));
    tracing::info!(address = %addr, "metrics on http://{addr}/metrics, health on /healthz and /readyz");
    if !addr.ip().is_loopback() {
        tracing::warn!(address = %addr, "the metrics endpoint is reachable beyond this host; bind metrics.listen to 127.0.0.1 unless a firewall or network policy guards the port");
    }
    Ok(Some(Server { addr }))
}

/// A scraper's requests are tiny GETs: 64 connections, headers within 5 s,
/// a 16 KiB buffer, and no connection older than a minute.
const BOUNDS: crate::observe::listener::Bounds = crate::observe::listener::Bounds {
    what: "metrics endpoint",
    max_connections: 64,
    header_read_timeout: Duration::from_secs(5),
    max_buf: Some(16 * 1024),
    lifetime: Some(Duration::from_secs(60)),
};
