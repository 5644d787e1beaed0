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
use crate::store::db::error_text;

pub const TABLE_DDL: &str = "CREATE TABLE IF NOT EXISTS usersync.user_progress (
    user_key text PRIMARY KEY,
    commit_lsn pg_lsn NOT NULL,
    position integer NOT NULL
);";

/// Moves each user's record forward, never back. Parameters: keys, commit
/// LSNs as text, positions, and the hash of the values pushed by that change
/// (NULL when it pushed no values: a delete, a dead letter, sync switched
/// off), which `backfill` compares with the row's current values.
pub const UPSERT_SQL: &str = "INSERT INTO usersync.user_progress AS p (user_key, commit_lsn, position, values_hash) \
     SELECT k, l::pg_lsn, n, h FROM unnest($1::text[], $2::text[], $3::int4[], $4::text[]) AS w(k, l, n, h) \
     ON CONFLICT (user_key) DO UPDATE SET commit_lsn = EXCLUDED.commit_lsn, position = EXCLUDED.position, \
     values_hash = EXCLUDED.values_hash \
     WHERE (p.commit_lsn, p.position) < (EXCLUDED.commit_lsn, EXCLUDED.position)";

#[derive(Debug, thiserror::Error)]
#[error("reading write-back progress: {0}")]
pub struct ProgressError(String);

/// Loads the replay window: from the slot's confirmed position to the
/// origin's progress.
pub async fn load(client: &Client, origin: &str, slot: &str) -> Result<Done, ProgressError> {
    let err = |e: tokio_postgres::Error| ProgressError(error_text(&e));
    let row = client
        .query_one(
            "SELECT pg_replication_origin_progress($1, true)::text, \
             (SELECT confirmed_flush_lsn::text FROM pg_replication_slots WHERE slot_name = $2)",
            &[&origin, &slot],
        )
        .await
        .map_err(err)?;
    let through = row
        .get::<_, Option<String>>(0)
        .as_deref()
        .and_then(parse_lsn)
        .unwrap_or(0);
    let confirmed = row
        .get::<_, Option<String>>(1)
        .as_deref()
        .and_then(parse_lsn)
        .unwrap_or(0);
    if through <= confirmed {
        return Ok(Done::default());
    }
    let users = client
        .query(
            "SELECT user_key, commit_lsn::text, position FROM usersync.user_progress \
             WHERE commit_lsn >= $1::text::pg_lsn",
            &[&format_lsn(confirmed)],
        )
        .await
        .map_err(err)?
        .iter()
        .filter_map(|r| {
            let lsn = parse_lsn(&r.get::<_, String>(1))?;
            Some((r.get(0), (lsn, r.get::<_, i32>(2) as u32)))
        })
        .collect();
    Ok(Done { through, users })
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
