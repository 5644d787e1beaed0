//! `usersync status`: what the daemon is doing, read from the database alone
//! (so it works whether or not a daemon runs, and from any host): the slot's
//! state and lag, dead letters, and — when a newer `usersync setup` created
//! them — the sync log and backfill progress.

use serde::Serialize;
use tokio_postgres::Client;

use crate::config::DatabaseConfig;
use crate::store::db::error_text;

#[derive(Debug, thiserror::Error)]
#[error("reading status: {0}")]
pub struct StatusError(String);

impl From<tokio_postgres::Error> for StatusError {
    fn from(e: tokio_postgres::Error) -> Self {
        StatusError(error_text(&e))
    }
}

/// The replication slot as PostgreSQL reports it.
#[derive(Debug, Clone, Serialize)]
pub struct SlotInfo {
    pub active: bool,
    /// The server process streaming the slot.
    pub active_pid: Option<i32>,
    pub application_name: Option<String>,
    pub confirmed_lsn: Option<String>,
    /// WAL the slot holds back: `pg_current_wal_lsn() - restart_lsn`.
    pub retained_bytes: Option<i64>,
    /// WAL written but not yet confirmed: `pg_current_wal_lsn() - confirmed_flush_lsn`.
    pub lag_bytes: Option<i64>,
    /// Approximate lag in seconds (see `slot_info`).
    pub lag_seconds: Option<f64>,
    pub wal_status: Option<String>,
}

/// `None` when the slot does not exist. Lag in seconds is approximated: 0
/// when nothing is unconfirmed; else, while streaming, PostgreSQL's
/// `flush_lag` for the walsender (time from writing recent WAL to usersync
/// confirming it); else (not streaming) unknown. The exact figure (now minus
/// the commit time of the oldest unconfirmed change) would need decoding WAL.
pub async fn slot_info(
    client: &Client,
    slot: &str,
) -> Result<Option<SlotInfo>, tokio_postgres::Error> {
    let row = client
        .query_opt(
            "SELECT s.active, s.active_pid, a.application_name::text, s.confirmed_flush_lsn::text, \
                    pg_wal_lsn_diff(pg_current_wal_lsn(), s.restart_lsn)::int8, \
                    pg_wal_lsn_diff(pg_current_wal_lsn(), s.confirmed_flush_lsn)::int8, \
                    extract(epoch FROM coalesce(r.flush_lag, r.write_lag))::float8, \
                    s.wal_status::text \
             FROM pg_replication_slots s \
             LEFT JOIN pg_stat_activity a ON a.pid = s.active_pid \
             LEFT JOIN pg_stat_replication r ON r.pid = s.active_pid \
             WHERE s.slot_name = $1",
            &[&slot],
        )
        .await?;
    Ok(row.map(|r| {
        let active: bool = r.get(0);
        let lag_bytes: Option<i64> = r.get(5);
        let flush_lag: Option<f64> = r.get(6);
        let lag_seconds = match lag_bytes {
            Some(b) if b <= 0 => Some(0.0),
            _ if active => flush_lag,
            _ => None,
        };
        SlotInfo {
            active,
            active_pid: r.get(1),
            application_name: r.get(2),
            confirmed_lsn: r.get(3),
            retained_bytes: r.get(4),
            lag_bytes,
            lag_seconds,
            wal_status: r.get(7),
        }
    }))
}

#[derive(Debug, Clone, Serialize)]
pub struct DeadLetters {
    pub failed: i64,
    pub parked: i64,
    pub parked_users: i64,
}

#[derive(Debug, Clone, Serialize)]
pub struct SyncLog {
    pub last_synced_at: Option<String>,
    pub synced_last_hour: i64,
    pub dead_lettered_last_hour: i64,
    pub parked_last_hour: i64,
}

#[derive(Debug, Clone, Serialize)]
pub struct Backfill {
    pub mode: String,
    pub rows_done: i64,
    pub rows_total: Option<i64>,
    pub started_at: String,
    pub updated_at: String,
    pub finished_at: Option<String>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Status {
    pub slot_name: String,
    /// `None`: the slot does not exist (run `usersync setup`).
    pub slot: Option<SlotInfo>,
    pub streaming: bool,
    /// The daemon that leads (`host:pid` and its lock session), if any.
    pub leader: Option<String>,
    /// Daemons waiting to take over.
    pub standbys: i64,
    pub max_retained_wal_mb: u64,
    pub retained_wal_over_limit: bool,
    /// `None`: usersync.dead_letters does not exist.
    pub dead_letters: Option<DeadLetters>,
    /// `None`: usersync.sync_log does not exist (older setup).
    pub sync_log: Option<SyncLog>,
    /// `None` with `backfill_table` true: no backfill ever ran.
    pub backfill: Option<Backfill>,
    pub backfill_table: bool,
}

const NEEDS_SETUP: &str = "n/a (needs a newer `usersync setup`)";

async fn table_exists(client: &Client, name: &str) -> Result<bool, tokio_postgres::Error> {
    Ok(client
        .query_one("SELECT to_regclass($1) IS NOT NULL", &[&name])
        .await?
        .get(0))
}

pub async fn read(client: &Client, cfg: &DatabaseConfig) -> Result<Status, StatusError> {
    let slot = slot_info(client, &cfg.slot).await?;
    let limit = cfg.max_retained_wal_mb.saturating_mul(1024 * 1024) as i64;
    let over = slot
        .as_ref()
        .and_then(|s| s.retained_bytes)
        .is_some_and(|b| b > limit);
    let dead_letters = if table_exists(client, "usersync.dead_letters").await? {
        let r = client
            .query_one(
                "SELECT count(*) FILTER (WHERE state = 'failed'), count(*) FILTER (WHERE state = 'parked'), \
                 count(DISTINCT user_key) FROM usersync.dead_letters",
                &[],
            )
            .await?;
        Some(DeadLetters {
            failed: r.get(0),
            parked: r.get(1),
            parked_users: r.get(2),
        })
    } else {
        None
    };
    let sync_log = if table_exists(client, "usersync.sync_log").await? {
        let r = client
            .query_one(
                "SELECT (SELECT max(logged_at) FROM usersync.sync_log WHERE outcome = 'synced')::text, \
                 count(*) FILTER (WHERE outcome = 'synced'), \
                 count(*) FILTER (WHERE outcome = 'dead_letter'), \
                 count(*) FILTER (WHERE outcome = 'parked') \
                 FROM usersync.sync_log WHERE logged_at > now() - interval '1 hour'",
                &[],
            )
            .await?;
        Some(SyncLog {
            last_synced_at: r.get(0),
            synced_last_hour: r.get(1),
            dead_lettered_last_hour: r.get(2),
            parked_last_hour: r.get(3),
        })
    } else {
        None
    };
    let backfill_table = table_exists(client, "usersync.backfill").await?;
    let backfill = if backfill_table {
        client
            .query_opt(
                "SELECT mode, rows_done, rows_total, started_at::text, updated_at::text, finished_at::text \
                 FROM usersync.backfill ORDER BY started_at DESC, id DESC LIMIT 1",
                &[],
            )
            .await?
            .map(|r| Backfill {
                mode: r.get(0),
                rows_done: r.get(1),
                rows_total: r.get(2),
                started_at: r.get(3),
                updated_at: r.get(4),
                finished_at: r.get(5),
            })
    } else {
        None
    };
    let leadership = crate::store::leader::leadership(client, &cfg.slot)
        .await
        .map_err(|e| StatusError(e.to_string()))?;
    Ok(Status {
        leader: leadership.leader.map(|l| l.describe()),
        standbys: leadership.standbys,
        slot_name: cfg.slot.clone(),
        streaming: slot.as_ref().is_some_and(|s| s.active),
        slot,
        max_retained_wal_mb: cfg.max_retained_wal_mb,
        retained_wal_over_limit: over,
        dead_letters,
        sync_log,
        backfill,
        backfill_table,
    })
}

fn mib(bytes: i64) -> String {
    if bytes < 1024 * 1024 {
        format!("{bytes} bytes")
    } else {
        format!("{:.1} MiB", bytes as f64 / (1024.0 * 1024.0))
    }
}

impl Status {
    /// Aligned `label: value` lines for a terminal.
    pub fn render(&self) -> String {
        let mut lines: Vec<(String, String)> = Vec::new();
        let mut warnings = Vec::new();
        match &self.slot {
            None => lines.push((
                "streaming".into(),
                format!(
                    "no (slot {} does not exist: run `usersync setup`)",
                    self.slot_name
                ),
            )),
            Some(s) => {
                lines.push((
                    "streaming".into(),
                    match s.active_pid {
                        Some(pid) if s.active => format!(
                            "yes (slot {}, server process {pid}, {})",
                            self.slot_name,
                            s.application_name.as_deref().unwrap_or("unknown client")
                        ),
                        _ => format!(
                            "no (slot {} is not in use: is `usersync run` running?)",
                            self.slot_name
                        ),
                    },
                ));
                lines.push((
                    "confirmed position".into(),
                    s.confirmed_lsn.clone().unwrap_or_else(|| "none".into()),
                ));
                lines.push((
                    "lag".into(),
                    format!(
                        "{}, {}",
                        s.lag_bytes.map(mib).unwrap_or_else(|| "unknown".into()),
                        match s.lag_seconds {
                            Some(secs) => format!("~{secs:.1} s"),
                            None => "seconds unknown while not streaming".into(),
                        }
                    ),
                ));
                lines.push((
                    "retained WAL".into(),
                    s.retained_bytes
                        .map(mib)
                        .unwrap_or_else(|| "unknown".into()),
                ));
                if self.retained_wal_over_limit {
                    warnings.push(format!(
                        "warning: the slot retains more than database.max_retained_wal_mb = {} MiB of WAL; PostgreSQL keeps it until usersync confirms (start or fix the daemon, or `usersync teardown` an abandoned slot)",
                        self.max_retained_wal_mb
                    ));
                }
                if s.wal_status.as_deref() == Some("lost") {
                    warnings.push("warning: the slot has lost WAL it needed; changes are gone (teardown, setup and backfill)".into());
                }
            }
        }
        let standbys = match self.standbys {
            0 => "no standby".to_string(),
            1 => "1 standby waiting".to_string(),
            n => format!("{n} standbys waiting"),
        };
        lines.push((
            "leader".into(),
            match &self.leader {
                Some(l) => format!("{l}; {standbys}"),
                None => format!("none (no `usersync run` holds leadership); {standbys}"),
            },
        ));
        match &self.sync_log {
            Some(l) => {
                lines.push((
                    "last successful push".into(),
                    l.last_synced_at
                        .clone()
                        .unwrap_or_else(|| "none yet".into()),
                ));
                lines.push((
                    "last hour".into(),
                    format!(
                        "{} synced, {} dead-lettered, {} parked",
                        l.synced_last_hour, l.dead_lettered_last_hour, l.parked_last_hour
                    ),
                ));
            }
            None => {
                lines.push(("last successful push".into(), NEEDS_SETUP.into()));
                lines.push(("last hour".into(), NEEDS_SETUP.into()));
            }
        }
        match &self.dead_letters {
            Some(d) => {
                lines.push((
                    "dead letters".into(),
                    format!("{} failed, {} parked behind them", d.failed, d.parked),
                ));
                lines.push(("parked users".into(), d.parked_users.to_string()));
            }
            None => {
                lines.push(("dead letters".into(), "n/a (run `usersync setup`)".into()));
                lines.push(("parked users".into(), "n/a (run `usersync setup`)".into()));
            }
        }
        lines.push((
            "backfill".into(),
            match (&self.backfill, self.backfill_table) {
                (_, false) => NEEDS_SETUP.into(),
                (None, true) => "never run".into(),
                (Some(b), true) => {
                    let progress = match b.rows_total {
                        Some(t) if t > 0 => format!(
                            "{}/{t} rows ({:.0}%)",
                            b.rows_done,
                            b.rows_done as f64 * 100.0 / t as f64
                        ),
                        _ => format!("{} rows", b.rows_done),
                    };
                    match &b.finished_at {
                        Some(f) => format!("{} finished at {f}: {progress}", b.mode),
                        None => format!(
                            "{} running since {}: {progress}, last progress {}",
                            b.mode, b.started_at, b.updated_at
                        ),
                    }
                }
            },
        ));
        let width = lines.iter().map(|(l, _)| l.len()).max().unwrap_or(0);
        let mut out = String::new();
        for (label, value) in lines {
            out.push_str(&format!("{label:<width$}  {value}\n"));
        }
        for w in warnings {
            out.push_str(&w);
            out.push('\n');
        }
        out
    }
}
