//! Exactly-once write-back across crashes. Each write-back transaction
//! records, with the replication origin (`pg_replication_origin_xact_setup`),
//! the highest source commit LSN it covers, and per user the newest change
//! made durable in `usersync.user_progress`. After a crash the slot replays
//! from its confirmed position, which can lag behind what was written back;
//! changes up to the origin's progress are checked against the per-user
//! record and skipped when already done, so they are neither pushed nor
//! written back again.

use crate::core::change::parse_lsn;
use crate::core::outcome::Done;

use tokio_postgres::Client;

use crate::core::change::format_lsn;
use crate::core::error::{Classify, ErrorKind};
use crate::store::db::DbError;

/// With room left on each page (`fillfactor`), moving a user's record
/// forward is a heap-only (HOT) update on the same page: no new index entry,
/// and the page's dead versions are pruned in place. The table is usersync's
/// own and holds one row per user; the price is a third more pages. Setting
/// it again is harmless, and an existing table keeps its rows (only pages
/// filled from now on leave the room).
pub const TABLE_DDL: &str = "CREATE TABLE IF NOT EXISTS usersync.user_progress (
    user_key text PRIMARY KEY,
    commit_lsn pg_lsn NOT NULL,
    position integer NOT NULL
);
ALTER TABLE usersync.user_progress SET (fillfactor = 75);";

/// Moves the records of users that have one forward, never back, and
/// returns their keys. A plain UPDATE: an `ON CONFLICT DO UPDATE` first
/// locks the row it conflicts with, which logs a row-lock record (~54 B of
/// WAL) before the update itself. Parameters as [`UPSERT_SQL`].
pub const ADVANCE_SQL: &str = "UPDATE usersync.user_progress AS p \
     SET commit_lsn = w.l::pg_lsn, position = w.n, values_hash = w.h \
     FROM unnest($1::text[], $2::text[], $3::int4[], $4::text[]) AS w(k, l, n, h) \
     WHERE p.user_key = w.k AND (p.commit_lsn, p.position) < (w.l::pg_lsn, w.n) \
     RETURNING p.user_key";

/// Moves each user's record forward, never back. Parameters: keys, commit
/// LSNs as text, positions, and the hash of the values pushed by that change
/// (NULL when it pushed no values: a delete, a dead letter, sync switched
/// off), which `backfill` compares with the row's current values. The
/// write-back runs it for users [`ADVANCE_SQL`] did not move: new users,
/// and the rare ones whose record is already at or past the change (a
/// replay), where the guard leaves the record as it is.
pub const UPSERT_SQL: &str = "INSERT INTO usersync.user_progress AS p (user_key, commit_lsn, position, values_hash) \
     SELECT k, l::pg_lsn, n, h FROM unnest($1::text[], $2::text[], $3::int4[], $4::text[]) AS w(k, l, n, h) \
     ON CONFLICT (user_key) DO UPDATE SET commit_lsn = EXCLUDED.commit_lsn, position = EXCLUDED.position, \
     values_hash = EXCLUDED.values_hash \
     WHERE (p.commit_lsn, p.position) < (EXCLUDED.commit_lsn, EXCLUDED.position)";

#[derive(Debug, thiserror::Error)]
#[error(transparent)]
pub struct ProgressError(#[from] DbError);

impl Classify for ProgressError {
    fn kind(&self) -> ErrorKind {
        self.0.kind()
    }
}

/// Loads the replay window: from the slot's confirmed position to the
/// origin's progress.
pub async fn load(client: &Client, origin: &str, slot: &str) -> Result<Done, ProgressError> {
    let err = |source| {
        ProgressError(DbError {
            context: "reading write-back progress",
            source,
        })
    };
    let row = client
        .query_one(
            "SELECT pg_replication_origin_progress($1, true)::text, \
             (SELECT confirmed_flush_lsn::text FROM pg_replication_slots WHERE slot_name = $2)",
            &[&origin, &slot],
        )
        .await
        .map_err(err)?;
    let through = row
        .try_get::<_, Option<String>>(0)
        .map_err(err)?
        .as_deref()
        .and_then(parse_lsn)
        .unwrap_or(0);
    let confirmed = row
        .try_get::<_, Option<String>>(1)
        .map_err(err)?
        .as_deref()
        .and_then(parse_lsn)
        .unwrap_or(0);
    if through <= confirmed {
        return Ok(Done::default());
    }
    let rows = client
        .query(
            "SELECT user_key, commit_lsn::text, position FROM usersync.user_progress \
             WHERE commit_lsn >= $1::text::pg_lsn",
            &[&format_lsn(confirmed)],
        )
        .await
        .map_err(err)?;
    let mut users = std::collections::HashMap::with_capacity(rows.len());
    for r in &rows {
        let key: String = r.try_get(0).map_err(err)?;
        let lsn: String = r.try_get(1).map_err(err)?;
        let position: i32 = r.try_get(2).map_err(err)?;
        if let (Some(lsn), Ok(position)) = (parse_lsn(&lsn), u32::try_from(position)) {
            users.insert(key, (lsn, position));
        }
    }
    Ok(Done { through, users })
}

/// A push made outside the stream (`sync-user` without a daemon): records
/// the hash of the values it pushed, so `backfill` does not push them again,
/// without moving the user's stream position.
pub const MANUAL_HASH_SQL: &str = "INSERT INTO usersync.user_progress (user_key, commit_lsn, position, values_hash) \
     VALUES ($1, '0/0', 0, $2) ON CONFLICT (user_key) DO UPDATE SET values_hash = EXCLUDED.values_hash";

pub async fn record_manual_hash<C: tokio_postgres::GenericClient>(
    client: &C,
    key: &str,
    hash: &str,
) -> Result<(), tokio_postgres::Error> {
    client.execute(MANUAL_HASH_SQL, &[&key, &hash]).await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lsn_round_trips() {
        assert_eq!(parse_lsn("16/B374D848"), Some(0x16_B374_D848));
        assert_eq!(parse_lsn(&format_lsn(0x1_0000_0001)), Some(0x1_0000_0001));
        assert_eq!(parse_lsn("nope"), None);
    }

    #[test]
    fn covers_only_what_was_recorded() {
        let done = Done {
            through: 500,
            users: [("a".to_string(), (300, 2))].into_iter().collect(),
        };
        assert!(done.covers("a", 300, 2));
        assert!(done.covers("a", 200, 9));
        assert!(!done.covers("a", 300, 3));
        assert!(!done.covers("b", 100, 0));
        assert!(!done.covers("a", 600, 0));
    }
}
