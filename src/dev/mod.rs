//! For trying usersync and testing it: the demo, fake external services and
//! throw-away PostgreSQL clusters. Never imported by the daemon's own layers.

#[cfg(test)]
pub mod canned;
pub mod demo;
pub mod demo_inbound;
pub mod fake;
pub mod pgtemp;
