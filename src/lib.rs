//! usersync: keeps an application's `users` table in sync with an external user
//! service by reading PostgreSQL's logical replication stream.
//!
//! The crate is a library so that the binary, the demo, the tests and the
//! benchmarks drive exactly the same code. See DESIGN.md for the data flow.
//!
//! Layers, lowest first; a module imports only from layers below its own
//! (checked by `tests/it/layers.rs`, the order written there and in DESIGN.md):
//!
//! `core` → `config` → `observe` → `source` → `sink` → `pipeline` → `store`
//! → `app` → `dev` → `cli`

pub mod app;
pub mod cli;
pub mod config;
pub mod core;
pub mod dev;
pub mod observe;
pub mod pipeline;
pub mod sink;
pub mod source;
pub mod store;
