//! The status page's figures (`observe::page`), read the way `usersync
//! status` reads them (`app::status::read`), plus the last hour of the sync
//! log and the newest dead letters. One connection, kept between loads and
//! opened again after a failure; a database that cannot be read is shown on
//! the page, not turned into an error page.

use std::sync::Arc;

use futures::FutureExt;
use tokio::sync::Mutex;
use tokio_postgres::Client;

use crate::config::Config;
use crate::observe::page::{DeadLetterRow, Minute, PageData, Provider};
use crate::store::db::connect;
use crate::store::status as queries;

/// How many dead letters the page lists.
const DEAD_LETTERS_SHOWN: i64 = 20;

/// Installs the provider for this daemon's page.
pub fn install(cfg: &Config) {
    let cfg = Arc::new(cfg.clone());
    let client: Arc<Mutex<Option<Client>>> = Arc::new(Mutex::new(None));
    let provider: Provider = Arc::new(move || {
        let cfg = Arc::clone(&cfg);
        let client = Arc::clone(&client);
        async move { read(&cfg, &client).await }.boxed()
    });
    crate::observe::page::set_provider(provider);
}

async fn read(cfg: &Config, cell: &Mutex<Option<Client>>) -> PageData {
    let mut data = PageData {
        table: cfg.database.table.to_string(),
        slot: cfg.database.slot.clone(),
        sink: cfg.sink.kind.name().to_string(),
        ..PageData::default()
    };
    let mut guard = cell.lock().await;
    if guard.as_ref().is_none_or(|c| c.is_closed()) {
        match connect(&cfg.database, "usersync-status-page").await {
            Ok(c) => *guard = Some(c),
            Err(e) => {
                data.database_error = Some(e.to_string());
                return data;
            }
        }
    }
    let Some(client) = guard.as_ref() else {
        return data;
    };
    if let Err(e) = fill(client, cfg, &mut data).await {
        data.database_error = Some(e.to_string());
        *guard = None;
    }
    data
}

async fn fill(
    client: &Client,
    cfg: &Config,
    data: &mut PageData,
) -> Result<(), queries::StatusError> {
    let status = crate::app::status::read(client, &cfg.database).await?;
    data.backfill = Some(status.backfill_line());
    data.inbound = status.inbound_lines();
    if let Some(slot) = &status.slot {
        data.slot_active = Some(slot.active);
        data.lag_bytes = slot.lag_bytes;
        data.lag_seconds = slot.lag_seconds;
        data.retained_bytes = slot.retained_bytes;
    }
    if let Some(d) = &status.dead_letters {
        data.failed = d.failed;
        data.parked = d.parked;
        data.parked_users = d.parked_users;
    }
    if let Some(log) = &status.sync_log {
        data.last_synced_at = log.last_synced_at.clone();
    }
    data.minutes = queries::pushes_per_minute(client)
        .await?
        .into_iter()
        .map(|(at, synced, dead_lettered, parked)| Minute {
            at,
            synced,
            dead_lettered,
            parked,
        })
        .collect();
    let personal = cfg.log.personal_data;
    data.dead_letters = queries::recent_dead_letters(client, DEAD_LETTERS_SHOWN)
        .await?
        .into_iter()
        .map(|d| DeadLetterRow {
            id: d.id,
            event_id: d.event_id,
            user_key: d.user_key,
            operation: d.operation,
            state: d.state,
            status: d.last_status,
            error: if personal {
                d.last_error
            } else {
                String::new()
            },
            age_secs: d.age_secs,
        })
        .collect();
    Ok(())
}
