//! All integration tests in one binary: one link of the crate instead of one per
//! file, and one throw-away PostgreSQL cluster shared by every test (a fresh
//! database per test).

mod backfill;
mod clerk;
mod common;
mod dashboards;
mod deadletters;
mod demo;
mod dlq;
mod docker;
mod errors;
mod exactly_once;
mod failover;
mod fake_webhooks;
mod faults;
mod import;
mod inbound;
mod layers;
mod listing;
mod memberstack;
mod observability;
mod ops;
mod poison;
mod reconcile;
mod recover;
mod retention;
mod role;
mod secrets;
mod spine;
mod sqlstate;
mod standby;
mod statuspage;
mod stripe;
mod tls;
mod values;
