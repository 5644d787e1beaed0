//! `usersync status`: what the daemon is doing, read from the database alone
//! (so it works whether or not a daemon runs, and from any host): the slot's
//! state and lag, dead letters, and — when a newer `usersync setup` created
//! them — the sync log and backfill progress. The queries are
//! `store::status`; this module puts them together and renders them.

use serde::Serialize;
use tokio_postgres::Client;

use crate::config::DatabaseConfig;
use crate::store::status::{self as queries};
pub use crate::store::status::{
    Backfill, DeadLetters, InboundSource, SlotInfo, StatusError, SyncLog,
};

#[derive(Debug, Clone, Serialize)]
pub struct Status {
    pub slot_name: String,
    /// `None`: the slot does not exist (run `usersync setup`).
    pub slot: Option<SlotInfo>,
    pub streaming: bool,
    /// Why the slot can never stream again (lost WAL, invalidated), when so:
    /// `usersync recover` is the way back.
    pub slot_invalidated: Option<String>,
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
    /// Each inbound source's newest event; `None`: an older setup without
    /// usersync.inbound_events.
    pub inbound: Option<Vec<InboundSource>>,
}

const NEEDS_SETUP: &str = "n/a (needs a newer `usersync setup`)";

pub async fn read(client: &Client, cfg: &DatabaseConfig) -> Result<Status, StatusError> {
    let slot = queries::slot_info(client, &cfg.slot).await?;
    let limit =
        i64::try_from(cfg.max_retained_wal_mb.saturating_mul(1024 * 1024)).unwrap_or(i64::MAX);
    let over = slot
        .as_ref()
        .and_then(|s| s.retained_bytes)
        .is_some_and(|b| b > limit);
    let dead_letters = queries::dead_letters(client).await?;
    let sync_log = queries::sync_log(client).await?;
    let backfill_table = queries::table_exists(client, "usersync.backfill").await?;
    let backfill = if backfill_table {
        queries::latest_backfill(client).await?
    } else {
        None
    };
    let inbound = queries::inbound_sources(client).await?;
    let leadership = crate::store::leader::leadership(client, &cfg.slot).await?;
    Ok(Status {
        leader: leadership.leader.map(|l| l.describe()),
        standbys: leadership.standbys,
        slot_name: cfg.slot.clone(),
        streaming: slot.as_ref().is_some_and(|s| s.active),
        slot_invalidated: slot.as_ref().and_then(|s| s.invalidated()),
        slot,
        max_retained_wal_mb: cfg.max_retained_wal_mb,
        retained_wal_over_limit: over,
        dead_letters,
        sync_log,
        backfill,
        backfill_table,
        inbound,
    })
}

fn age(secs: f64) -> String {
    let secs = secs.max(0.0) as u64;
    match secs {
        0..=119 => format!("{secs} s"),
        120..=7199 => format!("{} min", secs / 60),
        _ => format!("{} h", secs / 3600),
    }
}

fn mib(bytes: i64) -> String {
    if bytes < 1024 * 1024 {
        format!("{bytes} bytes")
    } else {
        format!("{:.1} MiB", bytes as f64 / (1024.0 * 1024.0))
    }
}

impl Status {
    /// The backfill's state in one line (also on the status page).
    pub fn backfill_line(&self) -> String {
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
        }
    }

    /// Each inbound source with its newest event in words, shared with the
    /// status page.
    pub fn inbound_lines(&self) -> Vec<(String, String)> {
        self.inbound
            .iter()
            .flatten()
            .map(|s| {
                (
                    s.source.clone(),
                    format!(
                        "last event {} ({}) at {}, {} ago",
                        s.last_event_type,
                        s.last_outcome,
                        s.last_received_at,
                        age(s.last_age_secs)
                    ),
                )
            })
            .collect()
    }

    /// Aligned `label: value` lines for a terminal.
    pub fn render(&self) -> String {
        let mut lines: Vec<(String, String)> = Vec::new();
        let mut warnings = Vec::new();
        match &self.slot {
            None => lines.push((
                "streaming".into(),
                format!(
                    "no (slot {} does not exist: run `usersync setup`, or `usersync recover` if usersync synced this database before)",
                    self.slot_name
                ),
            )),
            Some(s) => {
                lines.push((
                    "streaming".into(),
                    match s.active_pid {
                        _ if s.invalidated().is_some() => format!(
                            "no (slot {} is invalidated: run `usersync recover`)",
                            self.slot_name
                        ),
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
                if let Some(problem) = s.invalidated() {
                    warnings.push(format!(
                        "warning: slot {} {problem}. `usersync run` stops until it is recovered: run `usersync recover` (it recreates the slot and pushes every row changed or deleted meanwhile; `--dry-run` shows how many)",
                        self.slot_name
                    ));
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
        lines.push(("backfill".into(), self.backfill_line()));
        for (source, line) in self.inbound_lines() {
            lines.push((format!("inbound {source}"), line));
        }
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
