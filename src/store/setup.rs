//! The idempotent SQL that prepares a database for the daemon (sync
//! columns, schema, replica identity, publication, origin, slot), printed
//! for a DBA or applied by `usersync setup`. `sql/setup.sql` is this output
//! for the default names.

use tokio_postgres::Client;

use crate::config::{quote_ident, quote_literal, DatabaseConfig};
use crate::core::table::EXTERNAL_ID_COLUMN;
use crate::core::table::SYNCED_AT_COLUMN;
use crate::store::db::error_text;

/// A setup statement that failed: the step's comment and the server's reason.
#[derive(Debug, thiserror::Error)]
#[error("setup step failed: {step}: {}{}", error_text(.source), crate::store::db::fix_of(.source).map(|f| format!(" ({f})")).unwrap_or_default())]
pub struct StepError {
    pub step: String,
    #[source]
    pub source: tokio_postgres::Error,
}

impl crate::core::error::Classify for StepError {
    fn kind(&self) -> crate::core::error::ErrorKind {
        crate::store::db::kind_of(&self.source)
    }
}

/// One statement with the comment that explains it to a DBA.
pub struct Step {
    pub comment: &'static str,
    pub sql: String,
}

/// The statements, in order. Each runs in its own transaction because
/// PostgreSQL refuses to create a logical slot in a transaction that wrote.
pub fn steps(cfg: &DatabaseConfig) -> Vec<Step> {
    let table = cfg.table.quoted();
    let publication = &cfg.publication;
    vec![
        Step {
            comment: "The two columns usersync writes back: the external service's id and the time of the last successful sync.",
            sql: format!(
                "ALTER TABLE {table} ADD COLUMN IF NOT EXISTS {EXTERNAL_ID_COLUMN} text,\n    ADD COLUMN IF NOT EXISTS {SYNCED_AT_COLUMN} timestamptz;"
            ),
        },
        Step {
            comment: "usersync's own objects live in their own schema.",
            sql: "CREATE SCHEMA IF NOT EXISTS usersync;".to_string(),
        },
        Step {
            comment: "Changes the external service refused, and the later changes of those users parked behind them.",
            sql: crate::store::deadletter::TABLE_DDL.to_string(),
        },
        Step {
            comment: "The newest change made durable per user, so a restart does not push what was already written back.",
            sql: crate::store::progress::TABLE_DDL.to_string(),
        },
        Step {
            comment: "One row per synced or dead-lettered change (keys, outcome, timings; no row values), for \"when was this user last synced\"; pruned after sync_log.retention_days.",
            sql: crate::store::synclog::TABLE_DDL.to_string(),
        },
        Step {
            comment: "Deletes and updates carry the whole old row, so a delete reaches the external service with its external id although the row is gone.",
            sql: format!("ALTER TABLE {table} REPLICA IDENTITY FULL;"),
        },
        Step {
            comment: "The publication the slot streams: the users table only.",
            sql: format!(
                "DO $$\nBEGIN\n    IF NOT EXISTS (SELECT 1 FROM pg_publication WHERE pubname = {pub_lit}) THEN\n        CREATE PUBLICATION {pub_ident} FOR TABLE {table};\n    ELSIF NOT EXISTS (SELECT 1 FROM pg_publication_tables WHERE pubname = {pub_lit}\n                      AND schemaname = {schema_lit} AND tablename = {name_lit}) THEN\n        ALTER PUBLICATION {pub_ident} ADD TABLE {table};\n    END IF;\nEND\n$$;",
                pub_lit = quote_literal(publication),
                pub_ident = quote_ident(publication),
                schema_lit = quote_literal(&cfg.table.schema),
                name_lit = quote_literal(&cfg.table.name),
            ),
        },
        Step {
            comment: "PostgreSQL 18 and later stream stored generated columns when the publication asks for them; earlier versions cannot (usersync then lists them in `omitted`).",
            sql: format!(
                "DO $$\nBEGIN\n    IF current_setting('server_version_num')::int >= 180000 THEN\n        EXECUTE format('ALTER PUBLICATION %I SET (publish_generated_columns = stored)', {pub_lit});\n    END IF;\nEND\n$$;",
                pub_lit = quote_literal(publication),
            ),
        },
        Step {
            comment: "The replication origin that tags usersync's write-backs, so the daemon never pushes its own writes again.",
            sql: format!(
                "SELECT pg_replication_origin_create({origin})\n    WHERE NOT EXISTS (SELECT 1 FROM pg_replication_origin WHERE roname = {origin});",
                origin = quote_literal(&cfg.origin)
            ),
        },
        Step {
            comment: "The logical replication slot: PostgreSQL keeps WAL from here until usersync confirms it. On PostgreSQL 17+ it is a failover slot (5th argument), which a standby with sync_replication_slots = on keeps a copy of, so usersync continues after a promotion.",
            sql: create_slot_sql(&cfg.slot),
        },
        Step {
            comment: "Sync requests (backfill, sync-user, switching sync back on): each row asks the daemon to push one user's current state.",
            sql: crate::store::requests::REQUESTS_DDL.to_string(),
        },
        Step {
            comment: "Requests travel through the stream, ordered with the users' own changes.",
            sql: crate::store::requests::publication_sql(cfg),
        },
        Step {
            comment: "Users changed while sync was switched off ([sync] enabled = false), pushed when it is switched on.",
            sql: crate::store::requests::PENDING_DDL.to_string(),
        },
        Step {
            comment: "A hash of the values last pushed per user, so backfill can tell which rows changed since.",
            sql: crate::store::requests::HASH_DDL.to_string(),
        },
        Step {
            comment: "The backfill's resumable cursor (one row).",
            sql: crate::store::backfill::TABLE_DDL.to_string(),
        },
        Step {
            comment: "Inbound webhook events applied or refused, by source and event id: a redelivery finds its id here and writes nothing.",
            sql: crate::store::inbound::EVENTS_DDL.to_string(),
        },
        Step {
            comment: "Each inbound source's newest event, for `usersync status` and the status page, without scanning the table.",
            sql: "CREATE INDEX IF NOT EXISTS inbound_events_recent ON usersync.inbound_events (source, received_at)".to_string(),
        },
        Step {
            comment: "The newest provider version applied per inbound object (deletes leave a tombstone), so older deliveries change nothing.",
            sql: crate::store::inbound::VERSIONS_DDL.to_string(),
        },
        Step {
            comment: "Rows an inbound source's delete unlinked (on_delete = \"unlink\"), so `reconcile --from` that source counts them as agreeing.",
            sql: crate::store::inbound::UNLINKED_DDL.to_string(),
        },
        Step {
            comment: "Where an unfinished `usersync import` of each source stopped (the list cursor after the last page applied), so a crashed import resumes there.",
            sql: crate::store::import::CURSORS_DDL.to_string(),
        },
    ]
}

/// The slot statement `setup` runs on this server: a plain statement with
/// the arguments this version takes, never the printed script's DO block,
/// because PostgreSQL can fail a slot created inside PL/pgSQL with
/// "snapshot reference … is not owned by resource owner TopTransaction"
/// (seen in CI on 14 and on 17, in some runs only).
pub async fn create_slot_sql_for(
    client: &Client,
    slot: &str,
) -> Result<String, tokio_postgres::Error> {
    let version: i32 = client
        .query_one("SELECT current_setting('server_version_num')::int", &[])
        .await?
        .try_get(0)?;
    // 17+: temporary = false, two_phase = false, failover = true.
    let failover = if version >= 170_000 {
        ", false, false, true"
    } else {
        ""
    };
    Ok(format!(
        "SELECT pg_create_logical_replication_slot({slot}, 'pgoutput'{failover})\n    WHERE NOT EXISTS (SELECT 1 FROM pg_replication_slots WHERE slot_name = {slot});",
        slot = quote_literal(slot)
    ))
}

/// Creates the logical slot when it does not exist, as a failover slot
/// where the server has them (17+). One DO block: a slot cannot be created
/// in a transaction that wrote, and the block writes nothing before it.
pub fn create_slot_sql(slot: &str) -> String {
    format!(
        "DO $$\nBEGIN\n    IF NOT EXISTS (SELECT 1 FROM pg_replication_slots WHERE slot_name = {slot}) THEN\n        IF current_setting('server_version_num')::int >= 170000 THEN\n            PERFORM pg_create_logical_replication_slot({slot}, 'pgoutput', false, false, true);\n        ELSE\n            PERFORM pg_create_logical_replication_slot({slot}, 'pgoutput');\n        END IF;\n    END IF;\nEND\n$$;",
        slot = quote_literal(slot)
    )
}

/// The script a DBA can read and run with `psql -f`.
pub fn render(cfg: &DatabaseConfig) -> String {
    let mut out = format!(
        "-- usersync setup for table {} (publication {}, slot {}, origin {}).\n\
         -- Idempotent: safe to run again. Run each statement on its own (psql -f does);\n\
         -- a logical slot cannot be created inside a transaction that wrote.\n",
        cfg.table, cfg.publication, cfg.slot, cfg.origin
    );
    for step in steps(cfg) {
        out.push_str("\n-- ");
        out.push_str(step.comment);
        out.push('\n');
        out.push_str(&step.sql);
        out.push('\n');
    }
    out
}

/// Runs every step, each in its own transaction (notices of a rerun's
/// "already exists, skipping" silenced).
pub async fn run_steps(client: &Client, cfg: &DatabaseConfig) -> Result<(), StepError> {
    // Two setups at once (two replicas starting, a deploy script run twice)
    // would race on CREATE … IF NOT EXISTS, which is not safe against a
    // concurrent creator: one session-level lock makes them take turns, and
    // the second finds everything in place.
    let step_err = |step: &str| {
        let step = step.to_string();
        move |source: tokio_postgres::Error| StepError { step, source }
    };
    client
        .batch_execute(&format!("SELECT pg_advisory_lock({SETUP_LOCK})"))
        .await
        .map_err(step_err("wait for any other usersync setup to finish"))?;
    let result = run_steps_locked(client, cfg).await;
    let unlocked = client
        .batch_execute(&format!("SELECT pg_advisory_unlock({SETUP_LOCK})"))
        .await
        .map_err(step_err("release the setup lock"));
    result.and(unlocked)
}

/// The advisory lock key `setup` holds while it runs (an arbitrary
/// constant: "usersync" in ASCII).
const SETUP_LOCK: i64 = 0x7573_6572_7379_6e63;

async fn run_steps_locked(client: &Client, cfg: &DatabaseConfig) -> Result<(), StepError> {
    // A rerun's "already exists, skipping" notices are expected, not news.
    client
        .batch_execute("SET client_min_messages = warning")
        .await
        .map_err(|source| StepError {
            step: "quiet notices".to_string(),
            source,
        })?;
    let slot_sql = create_slot_sql(&cfg.slot);
    for step in steps(cfg) {
        let sql = if step.sql == slot_sql {
            create_slot_sql_for(client, &cfg.slot)
                .await
                .map_err(|source| StepError {
                    step: step.comment.to_string(),
                    source,
                })?
        } else {
            step.sql.clone()
        };
        client
            .batch_execute(&sql)
            .await
            .map_err(|source| StepError {
                step: step.comment.to_string(),
                source,
            })?;
    }
    Ok(())
}
