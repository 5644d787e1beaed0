//! `usersync setup --role NAME`: the usual setup (unless --role-only, since
//! the grants name usersync's tables), then the least-privilege role whose
//! SQL is in `store::role`, with the grants for the inbound sources' writes
//! when `[inbound]` is configured.

use tokio_postgres::Client;

use crate::app::setup::{self, SetupError};
use crate::config::DatabaseConfig;
pub use crate::store::role::{
    render, render_with, steps, valid_role_name, InboundWrites, ORIGIN_FUNCTIONS,
};

#[derive(Debug, thiserror::Error)]
pub enum RoleError {
    #[error(transparent)]
    Setup(#[from] SetupError),
    #[error("creating role {role}: {source}")]
    Step {
        role: String,
        #[source]
        source: crate::store::setup::StepError,
    },
}

impl crate::core::error::Classify for RoleError {
    fn kind(&self) -> crate::core::error::ErrorKind {
        match self {
            RoleError::Setup(e) => e.kind(),
            RoleError::Step { source, .. } => source.kind(),
        }
    }
}

/// Applies the setup (unless `role_only`) and creates or updates the role.
pub async fn apply(
    client: &Client,
    db: &DatabaseConfig,
    role: &str,
    role_only: bool,
    inbound: Option<&InboundWrites>,
) -> Result<(), RoleError> {
    if !role_only {
        setup::apply(client, db).await?;
    }
    crate::store::role::run_steps(client, db, role, inbound)
        .await
        .map_err(|source| RoleError::Step {
            role: role.to_string(),
            source,
        })
}
