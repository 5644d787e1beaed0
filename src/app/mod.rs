//! One composition root per command: each wires configuration, store, sink
//! and pipeline for `run`, `backfill`, `import`, `reconcile`, `sync-user`, `dlq`, `setup`,
//! `check`, `status`, `recover` and `teardown`.

pub mod backfill;
pub mod check;
pub mod dlq;
pub mod import;
pub mod inbound;
pub mod leader;
pub mod page;
pub mod reconcile;
pub mod recover;
pub mod role;
pub mod run;
pub mod setup;
pub mod signals;
pub mod status;
pub mod sync_user;
pub mod teardown;
