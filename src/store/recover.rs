//! The SQL of `usersync recover`: replacing a slot that can no longer
//! stream (or that a failover lost) with a new one, and finding the users
//! deleted while no slot recorded it (progress but no row). The changed rows
//! are found by the backfill's scan (`store::backfill::scan_chunk`).

use tokio_postgres::Client;

use crate::config::{quote_ident, DatabaseConfig};
use crate::core::table::TableShape;
use crate::store::db::DbError;

/// Drops the unusable slot, if there is one, and creates the new one (a
/// failover slot on 17+, as `setup` does). Returns the new slot's
/// confirmed position: every commit after it streams, every one before it
/// is in the tables the caller scans next.
pub async fn replace_slot(client: &Client, cfg: &DatabaseConfig) -> Result<String, DbError> {
    client
        .execute(
            "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots WHERE slot_name = $1",
            &[&cfg.slot],
        )
        .await
        .map_err(DbError::ctx("dropping the unusable replication slot"))?;
    let create = crate::store::setup::create_slot_sql_for(client, &cfg.slot)
        .await
        .map_err(DbError::ctx("creating the replication slot"))?;
    client
        .batch_execute(&create)
        .await
        .map_err(DbError::ctx("creating the replication slot"))?;
    let e = DbError::ctx("reading the new replication slot");
    client
        .query_one(
            "SELECT confirmed_flush_lsn::text FROM pg_replication_slots WHERE slot_name = $1",
            &[&cfg.slot],
        )
        .await
        .map_err(e)?
        .try_get::<_, Option<String>>(0)
        .map_err(e)
        .map(Option::unwrap_or_default)
}

/// A user with recorded progress whose row is gone.
#[derive(Debug, Clone)]
pub struct Vanished {
    pub key: String,
    /// The newest external id the sync log knows for the user.
    pub external_id: Option<String>,
    /// Whether the service may still hold the user: the newest sync-log
    /// entry is not a delete, or, with no entry (sync log off or pruned),
    /// the last push carried values (a pushed delete records none).
    pub needs_delete: bool,
}

/// The next `limit` users after `after` (in key text order) that have
/// progress but no row.
pub async fn vanished_chunk(
    client: &Client,
    shape: &TableShape,
    after: Option<&str>,
    limit: i64,
) -> Result<Vec<Vanished>, DbError> {
    // Progress keys are the key column's text form, written by usersync, so
    // they cast back to the key's type and the lookup uses the primary key.
    let sql = format!(
        "SELECT p.user_key, \
                (SELECT l.operation FROM usersync.sync_log l WHERE l.user_key = p.user_key \
                   ORDER BY l.logged_at DESC, l.id DESC LIMIT 1), \
                (SELECT l.external_id FROM usersync.sync_log l \
                   WHERE l.user_key = p.user_key AND l.external_id IS NOT NULL \
                   ORDER BY l.logged_at DESC, l.id DESC LIMIT 1), \
                p.values_hash IS NOT NULL \
         FROM usersync.user_progress p \
         WHERE ($1::text IS NULL OR p.user_key > $1) \
           AND NOT EXISTS (SELECT 1 FROM {table} u WHERE u.{key} = p.user_key::{ty}) \
         ORDER BY p.user_key LIMIT $2",
        table = shape.table.quoted(),
        key = quote_ident(&shape.key_column),
        ty = shape.key_type,
    );
    let e = DbError::ctx("finding users deleted while the slot could not stream");
    let rows = client.query(&sql, &[&after, &limit]).await.map_err(e)?;
    let mut out = Vec::with_capacity(rows.len());
    for r in rows {
        let key: String = r.try_get(0).map_err(e)?;
        let last_op: Option<String> = r.try_get(1).map_err(e)?;
        let external_id: Option<String> = r.try_get(2).map_err(e)?;
        let had_values: bool = r.try_get(3).map_err(e)?;
        let needs_delete = match last_op.as_deref() {
            Some(op) => op != crate::core::change::Operation::Delete.event_type(),
            None => had_values,
        };
        out.push(Vanished {
            key,
            external_id: external_id
                .filter(|x| x.len() <= crate::core::table::MAX_REQUEST_EXTERNAL_ID),
            needs_delete,
        });
    }
    Ok(out)
}

/// Queues one delete request per user, carrying the external id the delete
/// names; returns their ids. The daemon pushes each in the user's lane.
pub async fn enqueue_deletes(client: &Client, users: &[Vanished]) -> Result<Vec<i64>, DbError> {
    let keys: Vec<&str> = users.iter().map(|v| v.key.as_str()).collect();
    let ids: Vec<Option<&str>> = users.iter().map(|v| v.external_id.as_deref()).collect();
    let e = DbError::ctx("queuing the deletes");
    client
        .query(
            "INSERT INTO usersync.sync_requests (user_key, reason, external_id) \
             SELECT k, $3, x FROM unnest($1::text[], $2::text[]) WITH ORDINALITY AS u(k, x, n) \
             ORDER BY n RETURNING id",
            &[&keys, &ids, &crate::core::table::RECOVER_DELETE_REASON],
        )
        .await
        .map_err(e)?
        .iter()
        .map(|r| r.try_get(0).map_err(e))
        .collect()
}
