//! The queries behind `usersync status` and the status parts of `check`:
//! the slot as PostgreSQL reports it, dead-letter counts, the last hour of
//! the sync log and the newest backfill. Each part reads its own table and
//! says `None` when an older setup lacks it.

use serde::Serialize;
use tokio_postgres::{Client, Row};

use crate::store::db::DbError;

#[derive(Debug, thiserror::Error)]
#[error(transparent)]
pub struct StatusError(#[from] DbError);

impl crate::core::error::Classify for StatusError {
    fn kind(&self) -> crate::core::error::ErrorKind {
        self.0.kind()
    }
}

fn err(context: &'static str) -> impl Fn(tokio_postgres::Error) -> StatusError + Copy {
    move |source| StatusError(DbError { context, source })
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
    /// Why PostgreSQL invalidated the slot (17+: `wal_removed`, `rows_removed`,
    /// `wal_level_insufficient`, 18's `idle_timeout`); `None` when valid.
    pub invalidation_reason: Option<String>,
    /// 16+: invalidated by a recovery conflict (logical decoding on a standby).
    pub conflicting: Option<bool>,
    /// 17+: the slot is created to be synchronized to standbys.
    pub failover: Option<bool>,
    /// 17+, on a standby: the slot is a synchronized copy of the primary's.
    pub synced: Option<bool>,
    /// `pg_is_in_recovery()` of the server answering (a standby).
    pub in_recovery: bool,
    pub server_version_num: i32,
}

impl SlotInfo {
    /// Why the slot can no longer stream, in words, when it cannot: its WAL
    /// was removed (`wal_status = lost`, or 17+'s `invalidation_reason`), or
    /// it conflicted with recovery (16+'s `conflicting`).
    pub fn invalidated(&self) -> Option<String> {
        if let Some(reason) = &self.invalidation_reason {
            return Some(match reason.as_str() {
                "wal_removed" => "was invalidated: PostgreSQL removed WAL it still needed (max_slot_wal_keep_size)".to_string(),
                "rows_removed" => "was invalidated: rows it still needed were vacuumed away (a recovery conflict)".to_string(),
                "wal_level_insufficient" => "was invalidated: wal_level on the primary went below logical".to_string(),
                "idle_timeout" => "was invalidated: it stayed unused longer than idle_replication_slot_timeout".to_string(),
                other => format!("was invalidated ({other})"),
            });
        }
        if self.wal_status.as_deref() == Some("lost") {
            return Some(
                "has lost WAL it still needed (max_slot_wal_keep_size); it cannot stream any more"
                    .to_string(),
            );
        }
        if self.conflicting == Some(true) {
            return Some("was invalidated by a recovery conflict".to_string());
        }
        None
    }
}

/// `None` when the slot does not exist. Lag in seconds is approximated: 0
/// when nothing is unconfirmed; else, while streaming, PostgreSQL's
/// `flush_lag` for the walsender (time from writing recent WAL to usersync
/// confirming it); else (not streaming) unknown. The exact figure (now minus
/// the commit time of the oldest unconfirmed change) would need decoding WAL.
pub async fn slot_info(client: &Client, slot: &str) -> Result<Option<SlotInfo>, StatusError> {
    let e = err("reading the replication slot");
    let server = client
        .query_one(
            "SELECT current_setting('server_version_num')::int, pg_is_in_recovery()",
            &[],
        )
        .await
        .map_err(e)?;
    let version: i32 = server.try_get(0).map_err(e)?;
    let in_recovery: bool = server.try_get(1).map_err(e)?;
    // Columns newer servers have; older ones answer NULL for them.
    let conflicting = if version >= 160_000 {
        "s.conflicting"
    } else {
        "NULL::bool"
    };
    let (reason, failover, synced) = if version >= 170_000 {
        ("s.invalidation_reason::text", "s.failover", "s.synced")
    } else {
        ("NULL::text", "NULL::bool", "NULL::bool")
    };
    // On a standby, pg_current_wal_lsn() is refused: the replayed position
    // stands in for it.
    let current = if in_recovery {
        "pg_last_wal_replay_lsn()"
    } else {
        "pg_current_wal_lsn()"
    };
    let sql = format!(
        "SELECT s.active, s.active_pid, a.application_name::text, s.confirmed_flush_lsn::text, \
                pg_wal_lsn_diff({current}, s.restart_lsn)::int8, \
                pg_wal_lsn_diff({current}, s.confirmed_flush_lsn)::int8, \
                extract(epoch FROM coalesce(r.flush_lag, r.write_lag))::float8, \
                s.wal_status::text, {reason}, {conflicting}, {failover}, {synced} \
         FROM pg_replication_slots s \
         LEFT JOIN pg_stat_activity a ON a.pid = s.active_pid \
         LEFT JOIN pg_stat_replication r ON r.pid = s.active_pid \
         WHERE s.slot_name = $1"
    );
    let row = client.query_opt(&sql, &[&slot]).await.map_err(e)?;
    let Some(r) = row else { return Ok(None) };
    let active: bool = r.try_get(0).map_err(e)?;
    let lag_bytes: Option<i64> = r.try_get(5).map_err(e)?;
    let flush_lag: Option<f64> = r.try_get(6).map_err(e)?;
    let lag_seconds = match lag_bytes {
        Some(b) if b <= 0 => Some(0.0),
        _ if active => flush_lag,
        _ => None,
    };
    Ok(Some(SlotInfo {
        active,
        active_pid: r.try_get(1).map_err(e)?,
        application_name: r.try_get(2).map_err(e)?,
        confirmed_lsn: r.try_get(3).map_err(e)?,
        retained_bytes: r.try_get(4).map_err(e)?,
        lag_bytes,
        lag_seconds,
        wal_status: r.try_get(7).map_err(e)?,
        invalidation_reason: r.try_get(8).map_err(e)?,
        conflicting: r.try_get(9).map_err(e)?,
        failover: r.try_get(10).map_err(e)?,
        synced: r.try_get(11).map_err(e)?,
        in_recovery,
        server_version_num: version,
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

pub async fn table_exists(client: &Client, name: &str) -> Result<bool, StatusError> {
    let e = err("looking up usersync's tables");
    client
        .query_one("SELECT to_regclass($1) IS NOT NULL", &[&name])
        .await
        .map_err(e)?
        .try_get(0)
        .map_err(e)
}

/// `None` when usersync.dead_letters does not exist.
pub async fn dead_letters(client: &Client) -> Result<Option<DeadLetters>, StatusError> {
    if !table_exists(client, "usersync.dead_letters").await? {
        return Ok(None);
    }
    let e = err("counting dead letters");
    let r = client
        .query_one(
            "SELECT count(*) FILTER (WHERE state = 'failed'), count(*) FILTER (WHERE state = 'parked'), \
             count(DISTINCT user_key) FROM usersync.dead_letters",
            &[],
        )
        .await
        .map_err(e)?;
    Ok(Some(DeadLetters {
        failed: r.try_get(0).map_err(e)?,
        parked: r.try_get(1).map_err(e)?,
        parked_users: r.try_get(2).map_err(e)?,
    }))
}

/// The last hour of usersync.sync_log; `None` when an older setup lacks it.
pub async fn sync_log(client: &Client) -> Result<Option<SyncLog>, StatusError> {
    if !table_exists(client, "usersync.sync_log").await? {
        return Ok(None);
    }
    let e = err("reading the sync log");
    let r = client
        .query_one(
            // The newest synced row, looked for in a widening time range:
            // the log's only index is a BRIN on logged_at, so an unbounded
            // max() would read the whole table on every status page load.
            // COALESCE stops at the first range that has one.
            "SELECT coalesce(\
             (SELECT max(logged_at) FROM usersync.sync_log WHERE outcome = 'synced' AND logged_at > now() - interval '1 hour'), \
             (SELECT max(logged_at) FROM usersync.sync_log WHERE outcome = 'synced' AND logged_at > now() - interval '1 day'), \
             (SELECT max(logged_at) FROM usersync.sync_log WHERE outcome = 'synced'))::text, \
             count(*) FILTER (WHERE outcome = 'synced'), \
             count(*) FILTER (WHERE outcome = 'dead_letter'), \
             count(*) FILTER (WHERE outcome = 'parked') \
             FROM usersync.sync_log WHERE logged_at > now() - interval '1 hour'",
            &[],
        )
        .await
        .map_err(e)?;
    Ok(Some(SyncLog {
        last_synced_at: r.try_get(0).map_err(e)?,
        synced_last_hour: r.try_get(1).map_err(e)?,
        dead_lettered_last_hour: r.try_get(2).map_err(e)?,
        parked_last_hour: r.try_get(3).map_err(e)?,
    }))
}

/// The newest backfill run, if any.
pub async fn latest_backfill(client: &Client) -> Result<Option<Backfill>, StatusError> {
    let e = err("reading backfill progress");
    let row = client
        .query_opt(
            "SELECT mode, rows_done, rows_total, started_at::text, updated_at::text, finished_at::text \
             FROM usersync.backfill ORDER BY started_at DESC, id DESC LIMIT 1",
            &[],
        )
        .await
        .map_err(e)?;
    row.map(|r: Row| {
        Ok(Backfill {
            mode: r.try_get(0).map_err(e)?,
            rows_done: r.try_get(1).map_err(e)?,
            rows_total: r.try_get(2).map_err(e)?,
            started_at: r.try_get(3).map_err(e)?,
            updated_at: r.try_get(4).map_err(e)?,
            finished_at: r.try_get(5).map_err(e)?,
        })
    })
    .transpose()
}

/// An inbound source's newest event (no subject or user: those are
/// personal data).
#[derive(Debug, Clone, Serialize)]
pub struct InboundSource {
    pub source: String,
    pub last_event_type: String,
    pub last_outcome: String,
    pub last_received_at: String,
    pub last_age_secs: f64,
}

/// Every source that ever sent an event, with its newest one; `None` when
/// usersync.inbound_events does not exist (older setup). The sources are
/// found by a skip scan of the primary key and each newest event through
/// `inbound_events_recent`, so the cost does not grow with the table.
pub async fn inbound_sources(client: &Client) -> Result<Option<Vec<InboundSource>>, StatusError> {
    if !table_exists(client, "usersync.inbound_events").await? {
        return Ok(None);
    }
    let e = err("reading the inbound sources' last events");
    let rows = client
        .query(
            "WITH RECURSIVE s(source) AS ( \
                 (SELECT source FROM usersync.inbound_events ORDER BY source LIMIT 1) \
                 UNION ALL \
                 SELECT (SELECT e.source FROM usersync.inbound_events e \
                         WHERE e.source > s.source ORDER BY e.source LIMIT 1) \
                 FROM s WHERE s.source IS NOT NULL) \
             SELECT s.source, left(l.event_type, 100), l.outcome, l.received_at::text, \
                    extract(epoch FROM now() - l.received_at)::float8 \
             FROM s CROSS JOIN LATERAL ( \
                 SELECT event_type, outcome, received_at FROM usersync.inbound_events e \
                 WHERE e.source = s.source ORDER BY received_at DESC LIMIT 1) l \
             WHERE s.source IS NOT NULL ORDER BY s.source LIMIT 50",
            &[],
        )
        .await
        .map_err(e)?;
    rows.iter()
        .map(|r| {
            Ok(InboundSource {
                source: r.try_get(0).map_err(e)?,
                last_event_type: r.try_get(1).map_err(e)?,
                last_outcome: r.try_get(2).map_err(e)?,
                last_received_at: r.try_get(3).map_err(e)?,
                last_age_secs: r.try_get(4).map_err(e)?,
            })
        })
        .collect::<Result<_, _>>()
        .map(Some)
}

/// One dead letter for the status page, newest first.
#[derive(Debug, Clone)]
pub struct RecentDeadLetter {
    pub id: i64,
    pub event_id: String,
    pub user_key: String,
    pub operation: String,
    pub state: String,
    pub last_status: Option<i32>,
    pub last_error: String,
    pub age_secs: i64,
}

pub async fn recent_dead_letters(
    client: &Client,
    limit: i64,
) -> Result<Vec<RecentDeadLetter>, StatusError> {
    if !table_exists(client, "usersync.dead_letters").await? {
        return Ok(Vec::new());
    }
    let e = err("listing dead letters");
    let rows = client
        .query(
            "SELECT id, event_id, user_key, operation, state, last_status, last_error, \
             extract(epoch FROM now() - last_attempt_at)::int8 \
             FROM usersync.dead_letters ORDER BY id DESC LIMIT $1",
            &[&limit],
        )
        .await
        .map_err(e)?;
    rows.iter()
        .map(|r| {
            Ok(RecentDeadLetter {
                id: r.try_get(0).map_err(e)?,
                event_id: r.try_get(1).map_err(e)?,
                user_key: r.try_get(2).map_err(e)?,
                operation: r.try_get(3).map_err(e)?,
                state: r.try_get(4).map_err(e)?,
                last_status: r.try_get(5).map_err(e)?,
                last_error: r.try_get(6).map_err(e)?,
                age_secs: r.try_get(7).map_err(e)?,
            })
        })
        .collect()
}

/// Pushes per minute over the last hour from the sync log: (unix seconds
/// of the minute, synced, dead-lettered, parked).
pub async fn pushes_per_minute(client: &Client) -> Result<Vec<(i64, i64, i64, i64)>, StatusError> {
    if !table_exists(client, "usersync.sync_log").await? {
        return Ok(Vec::new());
    }
    let e = err("reading the sync log");
    let rows = client
        .query(
            "SELECT extract(epoch FROM date_trunc('minute', logged_at))::int8, \
             count(*) FILTER (WHERE outcome = 'synced'), \
             count(*) FILTER (WHERE outcome = 'dead_letter'), \
             count(*) FILTER (WHERE outcome = 'parked') \
             FROM usersync.sync_log WHERE logged_at > now() - interval '1 hour' \
             GROUP BY 1 ORDER BY 1",
            &[],
        )
        .await
        .map_err(e)?;
    rows.iter()
        .map(|r| {
            Ok((
                r.try_get(0).map_err(e)?,
                r.try_get(1).map_err(e)?,
                r.try_get(2).map_err(e)?,
                r.try_get(3).map_err(e)?,
            ))
        })
        .collect()
}
