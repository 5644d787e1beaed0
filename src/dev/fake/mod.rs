//! The fake external user service: a real HTTP server on loopback that receives
//! usersync's Standard Webhooks deliveries the way a production receiver
//! would (signature and replay checks, `webhook-id` idempotency, a user
//! store keyed by the ids it hands out) and can be told to misbehave. The
//! demo runs it in or out of process, the integration tests drive it in
//! process. This file owns the public API and the server's lifecycle;
//! `store` owns the state and the event semantics, `http` the wire format.

pub mod clerk;
mod http;
pub mod memberstack;
pub mod serve;
mod store;
pub mod stripe;
#[cfg(test)]
mod tests;
pub mod webhooks;

use std::collections::VecDeque;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::core::signature::WebhookSecret;
use store::Store;

/// How long `shutdown` waits for in-flight requests before dropping them.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);

#[derive(Debug, Clone, Default)]
pub struct FakeOptions {
    /// 0 lets the OS pick a free port.
    pub port: u16,
    /// When set, every delivery must carry a valid signature by this secret.
    pub secret: Option<WebhookSecret>,
    /// Added to every webhook request (not to admin requests).
    pub latency: Duration,
}

/// A user as the external service stores it.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct FakeUser {
    /// The service's own id, `usr_…`, returned to the sender on creation.
    pub external_id: String,
    /// The source row's primary key as sent in the envelope.
    pub key: serde_json::Value,
    pub data: serde_json::Value,
    /// Deleted users are kept so tests can tell "deleted" from "never made".
    pub deleted: bool,
    /// The envelope `id` (`evt_…`) of the `user.created` that made it.
    pub created_by_event: String,
    /// Number of `user.updated` events applied.
    pub updates: u32,
}

/// One webhook request as the service saw it, including rejected ones and
/// injected faults. Admin requests are not recorded.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct RecordedRequest {
    pub method: String,
    pub path: String,
    pub webhook_id: Option<String>,
    /// The raw `webhook-timestamp` header.
    pub webhook_timestamp: Option<String>,
    /// The raw `webhook-signature` header.
    pub webhook_signature: Option<String>,
    /// `None` when the service has no secret; otherwise whether the request
    /// passed verification (signature and timestamp tolerance).
    pub signature_valid: Option<bool>,
    /// The request body parsed as JSON, or null when it wasn't JSON.
    pub body: serde_json::Value,
    /// The body exactly as received, for checking signatures independently.
    #[serde(skip)]
    pub raw_body: Vec<u8>,
    pub status: u16,
    /// The JSON body the service answered with.
    pub response: serde_json::Value,
    /// Arrival time, milliseconds since the Unix epoch.
    pub received_at_ms: u128,
}

/// A misbehaviour applied to the next `count` webhook requests. Queued
/// faults run one after another in the order they were injected.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// Answer with this status and a JSON error body, changing nothing.
    Status { status: u16, count: u32 },
    /// Answer 429 with a `Retry-After` header.
    RateLimit { retry_after_secs: u64, count: u32 },
    /// Hold the request for a minute, then answer 504: long enough that the
    /// sender's own timeout has to fire.
    Timeout { count: u32 },
}

/// State shared by the handlers and the owning [`FakeService`].
struct Shared {
    store: Mutex<Store>,
    secret: Option<WebhookSecret>,
    /// Turns true (or closes) when the service stops, so held requests end.
    stopping: watch::Receiver<bool>,
}

impl Shared {
    fn store(&self) -> MutexGuard<'_, Store> {
        // A panicking handler must not take the whole fake down with it:
        // the store stays consistent because every mutation is one short,
        // synchronous critical section.
        self.store.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// A running fake service. Dropping it also stops the server (without
/// waiting); [`FakeService::shutdown`] stops it and waits.
pub struct FakeService {
    shared: Arc<Shared>,
    server: Server,
}

impl FakeService {
    /// Binds 127.0.0.1 and starts serving in the background.
    pub async fn start(opts: FakeOptions) -> std::io::Result<FakeService> {
        let bound = Server::bind(opts.port).await?;
        let shared = Arc::new(Shared {
            store: Mutex::new(Store::new(opts.latency)),
            secret: opts.secret,
            stopping: bound.stopping(),
        });
        let server = bound.serve(http::router(Arc::clone(&shared)), "fake service")?;
        Ok(FakeService { shared, server })
    }

    pub fn addr(&self) -> SocketAddr {
        self.server.addr()
    }

    /// The root URL deliveries should be POSTed to, with a trailing slash.
    pub fn url(&self) -> String {
        format!("http://{}/", self.server.addr())
    }

    /// All users, deleted ones included, in creation order.
    pub fn users(&self) -> Vec<FakeUser> {
        self.shared.store().users().to_vec()
    }

    /// Users with this primary key that aren't deleted; more than one means
    /// the sender created a duplicate.
    pub fn live_users_with_key(&self, key: &serde_json::Value) -> Vec<FakeUser> {
        self.shared.store().live_users_with_key(key)
    }

    /// Every recorded webhook request, in the order they were answered
    /// (a request held by a timeout fault is recorded when it arrives).
    pub fn requests(&self) -> Vec<RecordedRequest> {
        self.shared.store().requests().to_vec()
    }

    pub fn inject(&self, fault: Fault) {
        self.shared.store().inject(fault);
    }

    pub fn set_latency(&self, d: Duration) {
        self.shared.store().set_latency(d);
    }

    /// Forgets users, recorded requests, queued faults and the idempotency
    /// memory. The standing latency is configuration and stays.
    pub fn clear(&self) {
        self.shared.store().clear();
    }

    /// Stops accepting connections, releases requests held by faults or
    /// latency, and waits (briefly) for the server to finish.
    pub async fn shutdown(self) {
        self.server.shutdown("fake service").await;
    }
}

/// Runs the fake as a foreground server until Ctrl-C (for
/// `usersync fake-service`). The URL goes alone on stdout so scripts can
/// read it; the human-readable note goes to stderr.
pub async fn serve_forever(opts: FakeOptions) -> std::io::Result<()> {
    let signed = opts.secret.is_some();
    let service = FakeService::start(opts).await?;
    let url = service.url();
    println!("{url}");
    eprintln!(
        "fake user service listening on {url} (signatures {}); \
         inspect with GET {url}_fake/users and {url}_fake/requests; Ctrl-C to stop",
        if signed { "required" } else { "not checked" }
    );
    let result = tokio::signal::ctrl_c().await;
    service.shutdown().await;
    result
}

/// Resolves once the service is stopping, or its owner is gone.
async fn stopped(mut stopping: watch::Receiver<bool>) {
    // An Err means the sender was dropped with the FakeService: stop too.
    let _ = stopping.wait_for(|stop| *stop).await;
}

/// The HTTP server of a fake: bound on 127.0.0.1, stopped gracefully (on
/// `shutdown`, or when dropped) so that requests held by faults end.
pub(crate) struct Server {
    addr: SocketAddr,
    stop: watch::Sender<bool>,
    task: JoinHandle<()>,
}

/// A bound listener, before the router (which needs `stopping`) exists.
pub(crate) struct Bound {
    listener: TcpListener,
    stop: watch::Sender<bool>,
    stopping: watch::Receiver<bool>,
}

impl Server {
    pub(crate) async fn bind(port: u16) -> std::io::Result<Bound> {
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, port)).await?;
        let (stop, stopping) = watch::channel(false);
        Ok(Bound {
            listener,
            stop,
            stopping,
        })
    }

    pub(crate) fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Stops accepting, releases held requests, waits briefly, then aborts.
    pub(crate) async fn shutdown(self, name: &str) {
        let Server { stop, mut task, .. } = self;
        // Err only means the server is already gone.
        let _ = stop.send(true);
        if tokio::time::timeout(SHUTDOWN_GRACE, &mut task)
            .await
            .is_err()
        {
            tracing::warn!("{name} did not stop in time; aborting it");
            task.abort();
        }
    }
}

impl Bound {
    /// Turns true when the server stops (closed when it is dropped).
    pub(crate) fn stopping(&self) -> watch::Receiver<bool> {
        self.stopping.clone()
    }

    pub(crate) fn serve(self, app: axum::Router, name: &'static str) -> std::io::Result<Server> {
        let addr = self.listener.local_addr()?;
        let stopping = self.stopping;
        let listener = self.listener;
        let task = tokio::spawn(async move {
            let result = axum::serve(listener, app)
                .with_graceful_shutdown(stopped(stopping))
                .await;
            if let Err(err) = result {
                tracing::warn!(%err, "{name} stopped with an error");
            }
        });
        tracing::debug!(%addr, "{name} listening");
        Ok(Server {
            addr,
            stop: self.stop,
            task,
        })
    }
}

/// What the next request of a vendor fake has to suffer, off its queue.
pub(crate) enum ActiveFault {
    Status(u16),
    RateLimit(u64),
    Timeout,
}

/// Consumes one request's worth of the oldest queued fault.
pub(crate) fn take_fault(faults: &mut VecDeque<Fault>) -> Option<ActiveFault> {
    loop {
        let front = faults.front_mut()?;
        let (remaining, active) = match front {
            Fault::Status { status, count } => (count, ActiveFault::Status(*status)),
            Fault::RateLimit {
                retry_after_secs,
                count,
            } => (count, ActiveFault::RateLimit(*retry_after_secs)),
            Fault::Timeout { count } => (count, ActiveFault::Timeout),
        };
        if *remaining == 0 {
            faults.pop_front();
            continue;
        }
        *remaining -= 1;
        if *remaining == 0 {
            faults.pop_front();
        }
        return Some(active);
    }
}

/// A token bucket holding up to one second's worth of requests.
pub(crate) struct Bucket {
    per_sec: u32,
    tokens: f64,
    last: Instant,
}

impl Bucket {
    pub(crate) fn new(per_sec: u32) -> Bucket {
        Bucket {
            per_sec,
            tokens: f64::from(per_sec),
            last: Instant::now(),
        }
    }

    /// Takes a token; false when the limit is exceeded (0 = no limit).
    pub(crate) fn take(&mut self) -> bool {
        if self.per_sec == 0 {
            return true;
        }
        let now = Instant::now();
        let cap = f64::from(self.per_sec);
        self.tokens = (self.tokens + now.duration_since(self.last).as_secs_f64() * cap).min(cap);
        self.last = now;
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}
