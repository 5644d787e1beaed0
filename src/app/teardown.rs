//! `usersync teardown`: the command's steps are the store's plan (what
//! exists and would be dropped, refusing while a daemon streams) and apply;
//! the confirmation between them is the command line's.

pub use crate::store::teardown::{apply, plan, Item, TeardownError};
