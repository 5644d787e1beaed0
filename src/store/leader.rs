//! Leadership in PostgreSQL: the SQL of the election among daemons that
//! share a slot (`app::leader` runs it). The leader holds a session-level
//! advisory lock, keyed by the slot, on a connection of its own whose
//! `idle_session_timeout` is the lease: a leader that stops pinging loses
//! the lock when PostgreSQL ends that session. Every write-back session of a
//! daemon holds a second, shared key (the fence), so a new leader can end a
//! frozen predecessor's sessions, together with the slot's walsender.

use std::time::Duration;

use tokio_postgres::error::SqlState;
use tokio_postgres::Client;

use crate::config::DatabaseConfig;
use crate::store::db::{connect_watched, ConnectError, DbError};

/// First half of both advisory keys: "usyn" in ASCII, below 2^31 so the
/// key is the same as an int4 and as an oid in `pg_locks`.
const KEY_CLASS: i32 = 0x7573_796e;

/// Second half: the slot's name hashed (FNV-1a, 31 bits). Leader and fence
/// differ in the low bit, so they never collide with each other.
fn slot_key(slot: &str) -> i32 {
    let mut h: u32 = 0x811c_9dc5;
    for b in slot.bytes() {
        h ^= u32::from(b);
        h = h.wrapping_mul(0x0100_0193);
    }
    // Masked to 31 bits: always a non-negative int4.
    (h & 0x7fff_fffe) as i32
}

fn leader_key(slot: &str) -> (i32, i32) {
    (KEY_CLASS, slot_key(slot))
}

fn fence_key(slot: &str) -> (i32, i32) {
    (KEY_CLASS, slot_key(slot) | 1)
}

/// `application_name` of a daemon's lock session; `status` shows it.
pub const LOCK_APP_PREFIX: &str = "usersync-leader";

/// The lock session: one per daemon, standby or leader.
pub struct LockSession {
    client: Client,
    slot: String,
    closed: tokio_util::sync::CancellationToken,
}

impl LockSession {
    /// Connects with the lease as `idle_session_timeout` and no statement
    /// or lock timeouts of the role's (a standby's wait is long on purpose).
    /// `who` names this daemon (host and process) in `pg_stat_activity`.
    pub async fn connect(
        cfg: &DatabaseConfig,
        lease: Duration,
        who: &str,
    ) -> Result<LockSession, LeaderError> {
        let mut app = format!("{LOCK_APP_PREFIX} {who}");
        // NAMEDATALEN: longer names are cut by the server anyway.
        while app.len() > 63 {
            app.pop();
        }
        let (client, closed) = connect_watched(cfg, &app).await?;
        let ms = lease.as_millis().max(1000);
        client
            .batch_execute(&format!(
                "SET idle_session_timeout = {ms}; SET idle_in_transaction_session_timeout = {ms}; \
                 SET statement_timeout = 0; SET client_connection_check_interval = 1000"
            ))
            .await
            .map_err(DbError::ctx("setting up the leadership session"))?;
        Ok(LockSession {
            client,
            slot: cfg.slot.clone(),
            closed,
        })
    }

    /// Takes the leader lock if it is free.
    pub async fn try_acquire(&self) -> Result<bool, LeaderError> {
        let (a, b) = leader_key(&self.slot);
        let row = self
            .client
            .query_one("SELECT pg_try_advisory_lock($1, $2)", &[&a, &b])
            .await
            .map_err(DbError::ctx("trying the leader lock"))?;
        Ok(row
            .try_get::<_, bool>(0)
            .map_err(DbError::ctx("reading the leader lock"))?)
    }

    /// Waits up to `wait` for the leader lock (`Ok(false)`: not yet). The
    /// wait is bounded so that a standby cut off from the server notices.
    pub async fn acquire_within(&self, wait: Duration) -> Result<bool, LeaderError> {
        let (a, b) = leader_key(&self.slot);
        let ms = wait.as_millis().max(1);
        self.client
            .batch_execute(&format!("SET lock_timeout = {ms}"))
            .await
            .map_err(DbError::ctx("bounding the wait for the leader lock"))?;
        let waited = tokio::time::timeout(
            wait + Duration::from_secs(5),
            self.client
                .query_one("SELECT pg_advisory_lock($1, $2)", &[&a, &b]),
        )
        .await;
        match waited {
            Err(_) => Err(LeaderError::Silent),
            Ok(Ok(_)) => Ok(true),
            Ok(Err(e)) if e.code() == Some(&SqlState::LOCK_NOT_AVAILABLE) => Ok(false),
            Ok(Err(e)) => Err(DbError::ctx("waiting for the leader lock")(e).into()),
        }
    }

    /// Fires when the session's connection ends: the server released the
    /// lock then (or will, when it notices), so a leader must stop at once.
    pub fn closed(&self) -> &tokio_util::sync::CancellationToken {
        &self.closed
    }

    /// One round trip: restarts the server's idle clock on this session.
    pub async fn ping(&self) -> Result<(), LeaderError> {
        self.client
            .batch_execute("SELECT 1")
            .await
            .map_err(DbError::ctx("renewing leadership"))?;
        Ok(())
    }

    /// The current leader as one line, for a standby's log.
    pub async fn leadership(&self) -> Result<Option<String>, LeaderError> {
        Ok(leadership(&self.client, &self.slot)
            .await?
            .leader
            .map(|l| l.describe()))
    }

    /// Gives the lock back (a clean stop, or leadership ending otherwise).
    pub async fn release(&self) {
        let (a, b) = leader_key(&self.slot);
        let _ = self
            .client
            .execute("SELECT pg_advisory_unlock($1, $2)", &[&a, &b])
            .await;
    }

    /// Ends the sessions of a previous leader that may still be alive but
    /// silent (frozen, cut off): the slot's walsender and every session
    /// holding the fence key, which holds the replication origin. Run by a
    /// new leader before it starts; its own sessions do not exist yet.
    /// Returns how many were ended.
    pub async fn fence_predecessor(&self) -> Result<u64, LeaderError> {
        let (a, b) = fence_key(&self.slot);
        let rows = self
            .client
            .query(
                "SELECT active_pid FROM pg_replication_slots \
                   WHERE slot_name = $1 AND active_pid IS NOT NULL \
                 UNION \
                 SELECT l.pid FROM pg_locks l JOIN pg_database d ON d.oid = l.database \
                   WHERE l.locktype = 'advisory' AND d.datname = current_database() \
                     AND l.classid = $2::int4::oid AND l.objid = $3::int4::oid \
                     AND l.objsubid = 2 AND l.granted",
                &[&self.slot, &a, &b],
            )
            .await
            .map_err(DbError::ctx("finding a previous leader's sessions"))?;
        let mut ended = 0;
        for row in rows {
            let Ok(Some(pid)) = row.try_get::<_, Option<i32>>(0) else {
                continue;
            };
            // Waits (up to 5 s) for the backend to exit, so the slot and the
            // origin are free when this leader's session starts.
            match self
                .client
                .query_one("SELECT pg_terminate_backend($1, 5000)", &[&pid])
                .await
            {
                Ok(r) if r.try_get::<_, bool>(0).unwrap_or(false) => ended += 1,
                Ok(_) => {}
                Err(e) => tracing::warn!(
                    pid,
                    error = %crate::store::db::error_text(&e),
                    "cannot end a previous leader's session; the slot or origin is freed by wal_sender_timeout or when that daemon notices it lost leadership"
                ),
            }
        }
        Ok(ended)
    }
}

/// Marks a write-back session as fenceable by the next leader (a shared
/// advisory lock: any number of sessions hold it at once).
pub async fn mark_fenceable(client: &Client, slot: &str) -> Result<(), tokio_postgres::Error> {
    let (a, b) = fence_key(slot);
    client
        .execute("SELECT pg_advisory_lock_shared($1, $2)", &[&a, &b])
        .await
        .map(|_| ())
}

/// Who leads the daemons of `slot`, for `status`.
#[derive(Debug, Clone)]
pub struct Leadership {
    /// The leader's lock session: backend pid, application name (host and
    /// process id of the daemon), client address and since when it leads
    /// (the session's start).
    pub leader: Option<LeaderSession>,
    /// Daemons waiting for the lock.
    pub standbys: i64,
}

#[derive(Debug, Clone)]
pub struct LeaderSession {
    pub pid: i32,
    pub application_name: Option<String>,
    pub client_addr: Option<String>,
    pub backend_start: Option<String>,
}

impl LeaderSession {
    pub fn describe(&self) -> String {
        let name = self
            .application_name
            .as_deref()
            .and_then(|n| n.strip_prefix(LOCK_APP_PREFIX))
            .map(str::trim)
            .filter(|n| !n.is_empty())
            .unwrap_or("unknown daemon");
        let mut s = format!("{name} (backend pid {}", self.pid);
        if let Some(addr) = &self.client_addr {
            s.push_str(&format!(", from {addr}"));
        }
        if let Some(since) = &self.backend_start {
            s.push_str(&format!(", since {since}"));
        }
        s.push(')');
        s
    }
}

pub async fn leadership(client: &Client, slot: &str) -> Result<Leadership, DbError> {
    let (a, b) = leader_key(slot);
    let rows = client
        .query(
            "SELECT l.pid, l.granted, a.application_name::text, host(a.client_addr), \
                    to_char(a.backend_start AT TIME ZONE 'UTC', 'YYYY-MM-DD HH24:MI:SS') || ' UTC' \
               FROM pg_locks l JOIN pg_database d ON d.oid = l.database \
               LEFT JOIN pg_stat_activity a ON a.pid = l.pid \
              WHERE l.locktype = 'advisory' AND d.datname = current_database() \
                AND l.classid = $1::int4::oid AND l.objid = $2::int4::oid AND l.objsubid = 2",
            &[&a, &b],
        )
        .await
        .map_err(DbError::ctx("reading who leads"))?;
    let mut out = Leadership {
        leader: None,
        standbys: 0,
    };
    for r in rows {
        let granted: bool = r.try_get(1).map_err(DbError::ctx("reading who leads"))?;
        if !granted {
            out.standbys += 1;
            continue;
        }
        out.leader = Some(LeaderSession {
            pid: r.try_get(0).map_err(DbError::ctx("reading who leads"))?,
            application_name: r.try_get(2).map_err(DbError::ctx("reading who leads"))?,
            client_addr: r.try_get(3).map_err(DbError::ctx("reading who leads"))?,
            backend_start: r.try_get(4).map_err(DbError::ctx("reading who leads"))?,
        });
    }
    Ok(out)
}

#[derive(Debug, thiserror::Error)]
pub enum LeaderError {
    #[error(transparent)]
    Connect(#[from] ConnectError),
    #[error(transparent)]
    Db(#[from] DbError),
    #[error("the leadership session did not answer in time")]
    Silent,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_non_negative_and_leader_differs_from_fence() {
        for slot in [
            "usersync",
            "a",
            "",
            "t_123_4",
            "zzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzz",
        ] {
            let (_, l) = leader_key(slot);
            let (_, f) = fence_key(slot);
            assert!(l >= 0 && f >= 0);
            assert_ne!(l, f);
            assert_eq!(l & 1, 0);
        }
        assert_ne!(leader_key("a"), leader_key("b"));
    }
}
