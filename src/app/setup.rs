//! `usersync setup`: checks that the table is one usersync can sync, applies
//! the setup SQL (`store::setup`) and checks the result.

use tokio_postgres::Client;

use crate::config::DatabaseConfig;
use crate::store::schema::{self, SchemaError};
pub use crate::store::setup::{render, steps, Step};

#[derive(Debug, thiserror::Error)]
pub enum SetupError {
    #[error(transparent)]
    Schema(#[from] SchemaError),
    #[error(transparent)]
    Step(#[from] crate::store::setup::StepError),
}

impl crate::core::error::Classify for SetupError {
    fn kind(&self) -> crate::core::error::ErrorKind {
        match self {
            SetupError::Schema(e) => e.kind(),
            SetupError::Step(e) => e.kind(),
        }
    }
}

/// Applies the steps after checking that the table is one usersync can sync,
/// so a composite key or a missing table is refused before anything changes.
pub async fn apply(client: &Client, cfg: &DatabaseConfig) -> Result<(), SetupError> {
    schema::check_wal_level(client).await?;
    schema::inspect_table(client, &cfg.table).await?;
    crate::store::setup::run_steps(client, cfg).await?;
    let shape = schema::inspect_table(client, &cfg.table).await?;
    schema::check_table_ready(&shape)?;
    schema::check_publication(client, cfg).await?;
    schema::check_slot(client, cfg).await?;
    schema::check_origin(client, cfg).await?;
    schema::check_own_tables(client).await?;
    schema::check_requests(client, cfg).await?;
    Ok(())
}
