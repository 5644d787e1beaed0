//! The replication origin of a write-back session. Tagging a session's
//! transactions with the daemon's origin makes the decoder drop them (no
//! echo); the origin admits one session at a time, which is also how
//! `sync-user` knows whether a daemon is writing back.

use std::time::{Duration, Instant};

use tokio_postgres::error::SqlState;
use tokio_postgres::Client;

/// Why the session could not take the origin; the driver's error is kept.
#[derive(Debug, thiserror::Error)]
pub enum OriginError {
    /// Another session holds the origin (SQLSTATE 55006, object in use).
    #[error("replication origin in use: {}", crate::store::db::error_text(.0))]
    Busy(#[source] tokio_postgres::Error),
    #[error("cannot set up the replication origin: {}", crate::store::db::error_text(.0))]
    Failed(#[source] tokio_postgres::Error),
}

/// Whether a failed `pg_replication_origin_session_setup` means another
/// session holds the origin. By SQLSTATE, not by the message, which is
/// translated under another `lc_messages`.
pub fn is_busy(code: Option<&SqlState>) -> bool {
    code == Some(&SqlState::OBJECT_IN_USE)
}

/// Tags `client`'s session with `origin`. A busy origin is retried every
/// half second until `wait` has passed (zero: reported at once): a killed
/// daemon's backend can hold it for a moment after the process is gone.
pub async fn take(client: &Client, origin: &str, wait: Duration) -> Result<(), OriginError> {
    let deadline = Instant::now() + wait;
    loop {
        match client
            .execute("SELECT pg_replication_origin_session_setup($1)", &[&origin])
            .await
        {
            Ok(_) => return Ok(()),
            Err(e) if is_busy(e.code()) => {
                if Instant::now() < deadline {
                    tokio::time::sleep(Duration::from_millis(500)).await;
                    continue;
                }
                return Err(OriginError::Busy(e));
            }
            Err(e) => return Err(OriginError::Failed(e)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn busy_is_object_in_use_only() {
        assert!(is_busy(Some(&SqlState::OBJECT_IN_USE)));
        assert!(is_busy(Some(&SqlState::from_code("55006"))));
        assert!(!is_busy(Some(&SqlState::UNDEFINED_OBJECT)));
        assert!(!is_busy(Some(&SqlState::CONFIGURATION_LIMIT_EXCEEDED)));
        assert!(!is_busy(None));
    }
}
