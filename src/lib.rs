//! usersync: keeps an application's `users` table in sync with an external user
//! service by reading PostgreSQL's logical replication stream.
//!
//! The crate is a library so that the binary, the demo, the tests and the
//! benchmarks drive exactly the same code. See DESIGN.md for the data flow.

pub mod change;
pub mod check;
pub mod cli;
pub mod config;
pub mod daemon;
pub mod db;
pub mod deadletter;
pub mod demo;
pub mod fake;
pub mod metrics;
pub mod observe;
pub mod pgtemp;
pub mod pipeline;
pub mod progress;
pub mod replay;
pub mod role;
pub mod schema;
pub mod setup;
pub mod sink;
pub mod source;
pub mod status;
pub mod synclog;
pub mod teardown;
pub mod tls;
pub mod writeback;

pub mod backfill;
pub mod manual;
pub mod requests;
