//! Every SQL statement usersync runs against the app database: connections
//! and session settings, the write-back transaction, dead letters, progress,
//! sync requests, the sync log and catalog checks.

pub mod backfill;
pub mod catalog;
pub mod db;
pub mod deadletter;
pub mod import;
pub mod inbound;
pub mod lag;
pub mod lanes;
pub mod leader;
pub mod origin;
pub mod progress;
pub mod reconcile;
pub mod recover;
pub mod requests;
pub mod role;
pub mod rows;
pub mod schema;
pub mod setup;
pub mod status;
pub mod synclog;
pub mod teardown;
pub mod types;
pub mod writeback;
