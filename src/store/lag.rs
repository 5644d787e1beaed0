//! The replication lag, polled from the slot as PostgreSQL sees it.

use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::config::DatabaseConfig;
use crate::observe::metrics;
use crate::store::db::{connect, error_text};

/// Starts the poller until `cancel` fires (beside the metrics endpoint).
pub fn spawn_poller(db: DatabaseConfig, cancel: CancellationToken) {
    tokio::spawn(poll_lag(db, cancel));
}

/// How often the slot's lag is read from `pg_replication_slots`.
const LAG_POLL: Duration = Duration::from_secs(1);

/// Reads the slot's lag as PostgreSQL sees it (the WAL it retains for us)
/// rather than from the stream, so it is right even while the reader is
/// blocked by backpressure and cannot see new WAL.
async fn poll_lag(db: DatabaseConfig, cancel: CancellationToken) {
    let mut client = None;
    loop {
        if client.is_none() {
            client = connect(&db, "usersync-metrics").await.ok();
        }
        let lag = match &client {
            Some(c) => match c
                .query_opt(
                    "SELECT pg_wal_lsn_diff(pg_current_wal_lsn(), confirmed_flush_lsn)::bigint \
                     FROM pg_replication_slots WHERE slot_name = $1",
                    &[&db.slot],
                )
                .await
            {
                Ok(row) => row.and_then(|r| r.try_get::<_, Option<i64>>(0).ok().flatten()),
                Err(e) => {
                    tracing::debug!(error = %error_text(&e), "cannot read the slot's lag");
                    client = None;
                    None
                }
            },
            None => None,
        };
        metrics::set_lag(lag);
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = tokio::time::sleep(LAG_POLL) => {}
        }
    }
}
