//! `usersync teardown`: removes what `usersync setup` created for streaming —
//! the replication slot (which otherwise keeps WAL forever), the replication
//! origin and the publication — and, only when asked, schema `usersync`
//! (dead letters, progress). The users table and its two sync columns are
//! never touched: they hold the app's data and the external ids.

use tokio_postgres::Client;

use crate::config::{quote_ident, DatabaseConfig};
use crate::store::db::error_text;

#[derive(Debug, thiserror::Error)]
pub enum TeardownError {
    #[error("replication slot {slot} is in use by server process {pid} ({app}): a usersync daemon is running; stop it first, then run teardown again")]
    SlotActive { slot: String, pid: i32, app: String },
    #[error("teardown failed while {step}: {}", error_text(.source))]
    Sql {
        step: String,
        #[source]
        source: tokio_postgres::Error,
    },
}

impl crate::core::error::Classify for TeardownError {
    fn kind(&self) -> crate::core::error::ErrorKind {
        match self {
            TeardownError::SlotActive { .. } => crate::core::error::ErrorKind::Config,
            TeardownError::Sql { source, .. } => crate::store::db::kind_of(source),
        }
    }
}

fn sql_err(step: impl Into<String>) -> impl FnOnce(tokio_postgres::Error) -> TeardownError {
    let step = step.into();
    move |source| TeardownError::Sql { step, source }
}

/// One object teardown drops, with the SQL that drops it.
#[derive(Debug, Clone)]
pub struct Item {
    pub what: String,
    pub sql: String,
}

/// What exists now and would be dropped, in drop order. Refuses when the
/// slot is being streamed.
pub async fn plan(
    client: &Client,
    cfg: &DatabaseConfig,
    drop_schema: bool,
) -> Result<Vec<Item>, TeardownError> {
    let mut items = Vec::new();
    let slot = client
        .query_opt(
            "SELECT s.active_pid, a.application_name::text FROM pg_replication_slots s \
             LEFT JOIN pg_stat_activity a ON a.pid = s.active_pid WHERE s.slot_name = $1",
            &[&cfg.slot],
        )
        .await
        .map_err(sql_err("reading the slot"))?;
    if let Some(row) = slot {
        let pid: Option<i32> = row.try_get(0).map_err(sql_err("reading the slot"))?;
        if let Some(pid) = pid {
            let app: Option<String> = row.try_get(1).map_err(sql_err("reading the slot"))?;
            return Err(TeardownError::SlotActive {
                slot: cfg.slot.clone(),
                pid,
                app: app.unwrap_or_else(|| "unknown client".into()),
            });
        }
        items.push(Item {
            what: format!(
                "replication slot {} (PostgreSQL stops keeping WAL for usersync)",
                cfg.slot
            ),
            sql: format!(
                "SELECT pg_drop_replication_slot({});",
                crate::config::quote_literal(&cfg.slot)
            ),
        });
    }
    let origin = client
        .query_opt(
            "SELECT 1 FROM pg_replication_origin WHERE roname = $1",
            &[&cfg.origin],
        )
        .await
        .map_err(sql_err("reading the replication origin"))?;
    if origin.is_some() {
        items.push(Item {
            what: format!("replication origin {}", cfg.origin),
            sql: format!(
                "SELECT pg_replication_origin_drop({});",
                crate::config::quote_literal(&cfg.origin)
            ),
        });
    }
    // The inbound sources' origins (`<origin>_in_<source>`), created by the
    // receiver or by setup.
    let inbound_origins = client
        .query(
            "SELECT roname::text FROM pg_replication_origin WHERE starts_with(roname, $1)",
            &[&format!("{}_in_", cfg.origin)],
        )
        .await
        .map_err(sql_err("reading the inbound replication origins"))?;
    for row in &inbound_origins {
        let name: String = row
            .try_get(0)
            .map_err(sql_err("reading the inbound replication origins"))?;
        items.push(Item {
            what: format!("replication origin {name} (inbound)"),
            sql: format!(
                "SELECT pg_replication_origin_drop({});",
                crate::config::quote_literal(&name)
            ),
        });
    }
    let publication = client
        .query_opt(
            "SELECT 1 FROM pg_publication WHERE pubname = $1",
            &[&cfg.publication],
        )
        .await
        .map_err(sql_err("reading the publication"))?;
    if publication.is_some() {
        items.push(Item {
            what: format!("publication {}", cfg.publication),
            sql: format!("DROP PUBLICATION {};", quote_ident(&cfg.publication)),
        });
    }
    if drop_schema {
        let schema = client
            .query_opt("SELECT 1 FROM pg_namespace WHERE nspname = 'usersync'", &[])
            .await
            .map_err(sql_err("reading schema usersync"))?;
        if schema.is_some() {
            items.push(Item {
                what: "schema usersync and everything in it (dead letters, progress, sync log)"
                    .into(),
                sql: "DROP SCHEMA usersync CASCADE;".into(),
            });
        }
    }
    Ok(items)
}

/// Drops the planned items, each in its own statement (a slot cannot be
/// dropped inside a transaction block that did other work).
pub async fn apply(client: &Client, items: &[Item]) -> Result<(), TeardownError> {
    for item in items {
        client
            .batch_execute(&item.sql)
            .await
            .map_err(sql_err(format!("dropping {}", item.what)))?;
    }
    Ok(())
}
