//! The one bounded HTTP/1 accept loop behind usersync's listeners (the
//! metrics endpoint and the inbound webhook receiver): a cap on open
//! connections (more are closed on accept), a header-read timeout against
//! slow or half-sent requests, and, where a listener wants them, a small
//! read buffer and a lifetime per connection. Each listener names its bounds.

use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use tokio_util::sync::CancellationToken;

/// What one listener allows a client.
#[derive(Debug, Clone, Copy)]
pub struct Bounds {
    /// Names the listener in logs.
    pub what: &'static str,
    pub max_connections: usize,
    pub header_read_timeout: Duration,
    /// hyper's read buffer; `None` keeps hyper's default.
    pub max_buf: Option<usize>,
    /// No connection lives longer than this, whatever it does.
    pub lifetime: Option<Duration>,
}

/// Serves `app` on `listener` until `cancel` fires.
pub async fn serve(
    listener: tokio::net::TcpListener,
    app: Router,
    bounds: Bounds,
    cancel: CancellationToken,
) {
    use hyper_util::rt::{TokioIo, TokioTimer};
    use hyper_util::service::TowerToHyperService;
    let slots = Arc::new(tokio::sync::Semaphore::new(bounds.max_connections));
    loop {
        let stream = tokio::select! {
            _ = cancel.cancelled() => return,
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(e) => {
                    // Out of file descriptors, say: wait instead of spinning.
                    tracing::debug!(error = %e, listener = bounds.what, "accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        let Ok(slot) = Arc::clone(&slots).try_acquire_owned() else {
            drop(stream);
            continue;
        };
        let service = TowerToHyperService::new(app.clone());
        let cancel = cancel.clone();
        tokio::spawn(async move {
            let _slot = slot;
            let mut builder = hyper::server::conn::http1::Builder::new();
            builder
                .timer(TokioTimer::new())
                .header_read_timeout(bounds.header_read_timeout);
            if let Some(max) = bounds.max_buf {
                builder.max_buf_size(max);
            }
            let conn = builder.serve_connection(TokioIo::new(stream), service);
            let lifetime = bounds.lifetime.unwrap_or(Duration::MAX);
            tokio::select! {
                _ = cancel.cancelled() => {}
                _ = tokio::time::timeout(lifetime, conn) => {}
            }
        });
    }
}
