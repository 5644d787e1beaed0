//! The sync log `usersync.sync_log`: one row per change the daemon made
//! durable (synced, dead-lettered, or parked behind a dead letter), for a DBA
//! asking "when was this user last synced, and what happened". Owns the
//! table's DDL, the one INSERT per write-back batch (inside the write-back
//! transaction, so the log never disagrees with the rows), and retention
//! pruning. Rows hold keys, ids, outcomes, timings and LSNs, never row values.

use std::collections::HashMap;
use std::sync::{Mutex, PoisonError};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tokio_postgres::{Client, GenericClient, Statement};
use tokio_util::sync::CancellationToken;

use crate::config::Config;
use crate::core::change::format_lsn;
use crate::core::outcome::Outcome;
use crate::core::outcome::WriteItem;
use crate::store::db::DbError;

/// Created by `usersync setup`. Another command (`status`) reads these columns.
///
/// An append-only log with no btree: each btree cost every synced change an
/// index entry (about 65 B of WAL each, three of them, plus their page
/// splits: half the log's WAL, BENCHMARKS.md "issue 18"). What reads it asks
/// for a time range (`status`, the status page, retention), which the BRIN
/// on `logged_at` serves: rows arrive in `logged_at` order. A look-up by user
/// scans; bound it by time (`AND logged_at > now() - interval '1 day'`). The
/// DROPs bring an existing install to this shape (setup runs them again
/// harmlessly); `id` stays, without its index, for ordering by hand.
pub const TABLE_DDL: &str = "CREATE TABLE IF NOT EXISTS usersync.sync_log (
    id bigserial,
    logged_at timestamptz NOT NULL DEFAULT now(),
    event_id text,
    operation text NOT NULL,
    user_key text NOT NULL,
    external_id text,
    outcome text NOT NULL,
    attempts integer NOT NULL,
    push_ms double precision,
    latency_ms double precision,
    commit_lsn pg_lsn
);
ALTER TABLE usersync.sync_log DROP CONSTRAINT IF EXISTS sync_log_pkey;
DROP INDEX IF EXISTS usersync.sync_log_user_key_idx;
DROP INDEX IF EXISTS usersync.sync_log_logged_at_idx;
CREATE INDEX IF NOT EXISTS sync_log_logged_at_brin ON usersync.sync_log USING brin (logged_at) WITH (autosummarize = on);";

/// One statement per batch: arrays in, one row per change out.
const INSERT_SQL: &str = "INSERT INTO usersync.sync_log \
     (event_id, operation, user_key, external_id, outcome, attempts, push_ms, latency_ms, commit_lsn) \
     SELECT e, o, k, x, r, a, p, l, n::pg_lsn \
     FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::text[], $6::int4[], $7::float8[], $8::float8[], $9::text[]) \
     AS w(e, o, k, x, r, a, p, l, n)";

/// Rows deleted per statement, so pruning a large backlog never holds long locks.
const PRUNE_BATCH: i64 = 10_000;
/// By row address: the table has no key index to find the rows again by.
const PRUNE_SQL: &str = "DELETE FROM usersync.sync_log WHERE ctid = ANY(ARRAY(\
     SELECT ctid FROM usersync.sync_log WHERE logged_at < now() - make_interval(days => $1) \
     LIMIT $2))";
const PRUNE_EVERY: Duration = Duration::from_secs(60);

/// `sync_log.enabled` per replication origin (one daemon per origin), for
/// the write-back sessions; keyed so that daemons sharing a process (tests,
/// the demo) keep their own setting. Absent means enabled.
static ENABLED: Mutex<Option<HashMap<String, bool>>> = Mutex::new(None);

fn enabled(origin: &str) -> bool {
    let map = ENABLED.lock().unwrap_or_else(PoisonError::into_inner);
    map.as_ref()
        .and_then(|m| m.get(origin).copied())
        .unwrap_or(true)
}

/// Applies `[sync_log]`: whether write-backs log, and the retention pruner
/// (runs at once, then every minute, until `cancel`).
pub fn start(cfg: &Config, cancel: CancellationToken) {
    ENABLED
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .get_or_insert_with(HashMap::new)
        .insert(cfg.database.origin.clone(), cfg.sync_log.enabled);
    if cfg.sync_log.enabled && cfg.sync_log.retention_days > 0 {
        let days = i32::try_from(cfg.sync_log.retention_days).unwrap_or(i32::MAX);
        crate::store::db::spawn_periodic(
            cfg.database.clone(),
            "usersync-sync-log",
            "prune usersync.sync_log",
            PRUNE_EVERY,
            cancel,
            move |c| async move {
                let rows = prune(&c, days).await?;
                if rows > 0 {
                    crate::observe::metrics::sync_log_pruned(rows);
                    tracing::info!(rows, retention_days = days, "pruned the sync log");
                }
                Ok(())
            },
        );
    }
}

/// The prepared INSERT for the write-back session of the daemon using
/// `origin`, `None` when its sync log is disabled.
pub async fn prepare(client: &Client, origin: &str) -> Result<Option<Statement>, DbError> {
    if !enabled(origin) {
        return Ok(None);
    }
    client
        .prepare(INSERT_SQL)
        .await
        .map(Some)
        .map_err(DbError::ctx("preparing the sync log insert"))
}

/// Logs a batch inside the write-back transaction `tx`.
pub async fn insert(
    tx: &impl GenericClient,
    statement: Option<&Statement>,
    batch: &[WriteItem],
) -> Result<(), DbError> {
    let Some(statement) = statement else {
        return Ok(());
    };
    if batch.is_empty() {
        return Ok(());
    }
    let now_us = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_micros() as i64)
        .unwrap_or(0);
    let n = batch.len();
    let mut event_ids = Vec::with_capacity(n);
    let mut ops = Vec::with_capacity(n);
    let mut keys = Vec::with_capacity(n);
    let mut ext: Vec<Option<&str>> = Vec::with_capacity(n);
    let mut outcomes = Vec::with_capacity(n);
    let mut attempts: Vec<i32> = Vec::with_capacity(n);
    let mut push_ms: Vec<Option<f64>> = Vec::with_capacity(n);
    let mut latency_ms: Vec<f64> = Vec::with_capacity(n);
    let mut lsns = Vec::with_capacity(n);
    for item in batch {
        match &item.outcome {
            Outcome::Synced {
                external_id,
                push_latency,
                attempts: a,
                ..
            } => {
                ext.push(external_id.as_deref());
                outcomes.push("synced");
                attempts.push(i32::try_from(*a).unwrap_or(i32::MAX));
                push_ms.push(Some(push_latency.as_secs_f64() * 1000.0));
            }
            Outcome::DeadLetter(dl) => {
                ext.push(None);
                outcomes.push(match dl.state {
                    crate::core::outcome::DeadLetterState::Failed => "dead_letter",
                    crate::core::outcome::DeadLetterState::Parked => "parked",
                });
                attempts.push(i32::try_from(dl.attempts).unwrap_or(i32::MAX));
                push_ms.push(None);
            }
            // Nothing reached the service: no request found its row, sync
            // was off, or the bookkeeping of switching it on.
            Outcome::Skipped | Outcome::Deferred | Outcome::Resume => continue,
        }
        event_ids.push(item.event_id.as_str());
        ops.push(item.op.event_type());
        keys.push(item.key.text.as_str());
        latency_ms.push((now_us - item.commit_time_us).max(0) as f64 / 1000.0);
        lsns.push(format_lsn(item.commit_lsn));
    }
    if event_ids.is_empty() {
        return Ok(());
    }
    tx.execute(
        statement,
        &[
            &event_ids,
            &ops,
            &keys,
            &ext,
            &outcomes,
            &attempts,
            &push_ms,
            &latency_ms,
            &lsns,
        ],
    )
    .await
    .map_err(DbError::ctx("writing the sync log"))?;
    Ok(())
}

/// An inbound write (`store::inbound`), logged in its transaction:
/// operation `<source>:<event type>`, outcome `inbound`, the provider's id
/// of the user as the external id.
const INBOUND_SQL: &str = "INSERT INTO usersync.sync_log \
     (event_id, operation, user_key, external_id, outcome, attempts) \
     VALUES ($1, $2, $3, $4, 'inbound', 1)";

/// The prepared insert of [`INBOUND_SQL`]: event id, operation, user key,
/// external id.
pub async fn prepare_inbound(client: &Client) -> Result<Statement, tokio_postgres::Error> {
    client.prepare(INBOUND_SQL).await
}

/// Deletes rows older than `days`, in bounded batches. Returns rows deleted.
pub async fn prune(client: &Client, days: i32) -> Result<u64, tokio_postgres::Error> {
    let mut total = 0;
    loop {
        let deleted = client.execute(PRUNE_SQL, &[&days, &PRUNE_BATCH]).await?;
        total += deleted;
        if deleted < PRUNE_BATCH as u64 {
            return Ok(total);
        }
    }
}

/// A `usersync dlq replay` that reached the service: logged like a daemon
/// sync, so "when was this user last synced" sees it (no commit LSN or
/// commit-to-sync latency: the replay pushes the row as it is now).
pub struct Replayed<'a> {
    pub event_id: &'a str,
    pub op: crate::core::change::Operation,
    pub key: &'a str,
    pub external_id: Option<&'a str>,
    pub attempts: u32,
    pub push: Duration,
}

const REPLAY_SQL: &str = "INSERT INTO usersync.sync_log \
     (event_id, operation, user_key, external_id, outcome, attempts, push_ms) \
     VALUES ($1, $2, $3, $4, 'synced', $5, $6)";

/// Logs a replay inside its write-back transaction `tx`.
pub async fn insert_replayed(
    tx: &impl GenericClient,
    r: &Replayed<'_>,
) -> Result<(), tokio_postgres::Error> {
    let attempts = i32::try_from(r.attempts).unwrap_or(i32::MAX);
    let push_ms = r.push.as_secs_f64() * 1000.0;
    tx.execute(
        REPLAY_SQL,
        &[
            &r.event_id,
            &r.op.event_type(),
            &r.key,
            &r.external_id,
            &attempts,
            &push_ms,
        ],
    )
    .await?;
    Ok(())
}
