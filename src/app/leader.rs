//! Leader election for `usersync run`: any number of daemons may run
//! against one slot; one leads (streams, pushes, writes back), the others
//! wait as standbys and take over when it stops, dies, freezes or is cut off.
//! PostgreSQL is the only coordinator (`store::leader` holds the SQL); the
//! argument for why at most one daemon acts at a time is in DESIGN.md
//! ("Hot standby"). This module owns the terms: win, renew the lease, fence
//! the predecessor, run the daemon (`app::run`) under the lease, step down.

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;

use crate::config::Config;
use crate::core::error::Classify;
use crate::core::outcome::SyncReport;
use crate::observe::metrics::set_leader;
use crate::sink::fence::{Fenced, Lease};
use crate::sink::Sink;
use crate::store::leader::{LeaderError, LockSession};

use super::run::{self, RunError};

/// `app::run::run`, elected: the sink from the config.
pub async fn run(
    cfg: &Config,
    cancel: CancellationToken,
    reports: Option<mpsc::UnboundedSender<SyncReport>>,
) -> Result<(), RunError> {
    let sink = crate::sink::build(&cfg.sink).map_err(RunError::Sink)?;
    run_elected(cfg, sink, cancel, reports, None).await
}

/// Runs the daemon whenever this process leads, until `cancel` fires.
pub async fn run_elected(
    cfg: &Config,
    sink: Arc<dyn Sink>,
    cancel: CancellationToken,
    reports: Option<mpsc::UnboundedSender<SyncReport>>,
    switch: Option<watch::Receiver<bool>>,
) -> Result<(), RunError> {
    let lease_len = Duration::from_secs(cfg.database.leader_lease_secs);
    let who = identity();
    let mut delay = Duration::from_millis(500);
    // The preflight first, as `run` always did: a wrong setup or an
    // unsupported server (the lock session needs PostgreSQL 14's
    // idle_session_timeout) is one message and an exit, not an election
    // that retries forever.
    run::prepare(cfg).await?;
    let mut checked = false;
    loop {
        set_leader(false);
        if cancel.is_cancelled() {
            return Ok(());
        }
        let lock = match LockSession::connect(&cfg.database, lease_len, &who).await {
            Ok(lock) => lock,
            Err(e) => {
                // The first attempt of a lone daemon reports an unreachable
                // server like `run` always did: as a failure to start.
                if !checked {
                    if let LeaderError::Connect(e) = e {
                        return Err(RunError::Connect(e));
                    }
                }
                tracing::warn!(error = %e, retry_in_ms = delay.as_millis() as u64, "cannot open the leadership session");
                if sleep_or_cancel(delay, &cancel).await {
                    return Ok(());
                }
                delay = (delay * 2).min(Duration::from_secs(30));
                continue;
            }
        };
        let waited_before = checked;
        match elect(cfg, &lock, &cancel, lease_len, &mut checked).await {
            Ok(true) => {}
            Ok(false) => return Ok(()),
            Err(Elected::Fatal(e)) => return Err(e),
            Err(Elected::Retry(e)) => {
                tracing::warn!(error = %e, retry_in_ms = delay.as_millis() as u64, "election interrupted");
                if sleep_or_cancel(delay, &cancel).await {
                    return Ok(());
                }
                delay = (delay * 2).min(Duration::from_secs(30));
                continue;
            }
        }
        // A standby that waited (the preflight ran) or any later term.
        let took_over = checked || waited_before;
        checked = true;
        delay = Duration::from_millis(500);
        let term = cancel.child_token();
        let lease = Lease::new(term.clone());
        // The lease counts from a round trip made after winning: the
        // server's idle clock starts no earlier than this ping was sent.
        let sent = Instant::now();
        if let Err(e) = lock.ping().await {
            tracing::warn!(error = %e, "lost the leadership session right after winning");
            continue;
        }
        lease.extend(sent + validity(lease_len));
        match lock.fence_predecessor().await {
            Ok(0) => {}
            Ok(n) => tracing::info!(
                sessions = n,
                "ended a previous leader's sessions (walsender, write-back)"
            ),
            Err(e) => tracing::warn!(error = %e, "cannot look for a previous leader's sessions"),
        }
        set_leader(true);
        if took_over {
            tracing::info!(slot = %cfg.database.slot, lease_secs = lease_len.as_secs(), "leading: this daemon streams; any other waits as a standby");
        } else {
            // A lone daemon's start: not news (and stderr stays one message
            // when the preflight then fails).
            tracing::debug!(slot = %cfg.database.slot, lease_secs = lease_len.as_secs(), "leading: this daemon streams; any other waits as a standby");
        }
        let keeper = tokio::spawn(keep(lock, lease.clone(), lease_len));
        let fenced: Arc<dyn Sink> = Arc::new(Fenced::new(Arc::clone(&sink), lease.clone()));
        let result =
            run::run_with_switch(cfg, fenced, term.clone(), reports.clone(), switch.clone()).await;
        set_leader(false);
        let lost = term.is_cancelled() && !cancel.is_cancelled();
        term.cancel();
        if let Ok(lock) = keeper.await {
            lock.release().await;
        }
        match result {
            Ok(()) if !lost => return Ok(()),
            Ok(()) => tracing::warn!(
                "lost leadership; pushes stopped. Waiting as a standby (a new leader replays whatever this one had not confirmed)"
            ),
            Err(e) if lost => tracing::warn!(error = %e, "lost leadership; waiting as a standby"),
            Err(RunError::Connect(e)) => {
                tracing::warn!(error = %e, retry_in_ms = delay.as_millis() as u64, "cannot start; stepping down and retrying");
                if sleep_or_cancel(delay, &cancel).await {
                    return Ok(());
                }
                delay = (delay * 2).min(Duration::from_secs(30));
            }
            Err(e) => return Err(e),
        }
    }
}

enum Elected {
    Fatal(RunError),
    Retry(LeaderError),
}

/// `Ok(true)`: this daemon leads. `Ok(false)`: stopped while waiting.
async fn elect(
    cfg: &Config,
    lock: &LockSession,
    cancel: &CancellationToken,
    lease_len: Duration,
    checked: &mut bool,
) -> Result<bool, Elected> {
    if lock.try_acquire().await.map_err(Elected::Retry)? {
        return Ok(true);
    }
    if !*checked {
        // A standby with a wrong setup says so now, not when it takes over.
        match run::prepare(cfg).await {
            Ok(_) => *checked = true,
            Err(e) if e.kind() == crate::core::error::ErrorKind::Config => {
                return Err(Elected::Fatal(e))
            }
            Err(e) => {
                tracing::warn!(error = %e, "standby: the preflight failed; it runs again on taking over")
            }
        }
    }
    match lock.leadership().await {
        Ok(Some(leader)) => {
            tracing::info!(slot = %cfg.database.slot, leader = %leader, "standby: another usersync leads; waiting to take over")
        }
        _ => tracing::info!(slot = %cfg.database.slot, "standby: waiting to lead"),
    }
    loop {
        tokio::select! {
            _ = cancel.cancelled() => return Ok(false),
            won = lock.acquire_within(lease_len) => match won {
                Ok(true) => return Ok(true),
                Ok(false) => {}
                Err(e) => return Err(Elected::Retry(e)),
            },
        }
    }
}

/// How long after sending a successful ping this daemon may act as the
/// leader: 80 % of the lease, well before PostgreSQL can end the session
/// (which it does no earlier than the full lease after the ping ended).
fn validity(lease_len: Duration) -> Duration {
    lease_len * 4 / 5
}

/// Renews the lease until it is lost; gives the session back for release.
async fn keep(lock: LockSession, lease: Lease, lease_len: Duration) -> LockSession {
    let interval = (lease_len / 10).max(Duration::from_millis(200));
    loop {
        tokio::select! {
            _ = lease.token().cancelled() => return lock,
            _ = lock.closed().cancelled() => {
                tracing::warn!("the leadership session was closed; stepping down");
                lease.lose();
                return lock;
            }
            _ = tokio::time::sleep(interval) => {}
        }
        let sent = Instant::now();
        let Some(deadline) = lease.deadline().filter(|d| *d > sent) else {
            tracing::warn!(
                "the leadership lease ran out (was this process paused?); stepping down"
            );
            lease.lose();
            return lock;
        };
        match tokio::time::timeout(deadline - sent, lock.ping()).await {
            Ok(Ok(())) => lease.extend(sent + validity(lease_len)),
            Ok(Err(e)) => {
                tracing::warn!(error = %e, "the leadership session failed; stepping down");
                lease.lose();
                return lock;
            }
            Err(_) => {
                tracing::warn!(
                    "the leadership session did not answer before the lease ran out; stepping down"
                );
                lease.lose();
                return lock;
            }
        }
    }
}

async fn sleep_or_cancel(d: Duration, cancel: &CancellationToken) -> bool {
    tokio::select! {
        _ = cancel.cancelled() => true,
        _ = tokio::time::sleep(d) => false,
    }
}

/// `host:pid`, so `status` can name the daemon that leads.
fn identity() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .or_else(|| std::env::var("HOSTNAME").ok())
        .unwrap_or_default();
    let host: String = host
        .trim()
        .chars()
        .filter(|c| c.is_ascii_graphic())
        .take(40)
        .collect();
    let host = if host.is_empty() {
        "unknown-host".to_string()
    } else {
        host
    };
    format!("{host}:{}", std::process::id())
}
