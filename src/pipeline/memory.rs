//! An in-memory [`LaneStore`](super::ports::LaneStore): rows, external ids
//! and parked users held in maps, for the pipeline's unit tests and the
//! benchmark's decode-and-route scenario.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;

use futures::future::BoxFuture;
use futures::FutureExt;

use super::ports::{LaneStore, Link, PortError};
use crate::core::table::CurrentRow;

#[derive(Debug, Default)]
pub struct MemoryStore {
    pub rows: Mutex<HashMap<String, CurrentRow>>,
    pub external_ids: Mutex<HashMap<String, String>>,
    /// Users' recorded values hashes (`user_progress.values_hash`).
    pub hashes: Mutex<HashMap<String, String>>,
    pub parked: Mutex<HashSet<String>>,
    /// An import from the sink's service is running: a never-synced user's
    /// push that may wait for it is told to ([`Link::Wait`]).
    pub import_running: AtomicBool,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl MemoryStore {
    pub fn set_parked(&self, key: &str, parked: bool) {
        let mut p = lock(&self.parked);
        if parked {
            p.insert(key.to_string());
        } else {
            p.remove(key);
        }
    }
}

impl LaneStore for MemoryStore {
    fn external_id<'a>(&'a self, key: &'a str) -> BoxFuture<'a, Option<String>> {
        let id = lock(&self.external_ids).get(key).cloned();
        async move { id }.boxed()
    }

    fn link_for_push<'a>(&'a self, key: &'a str, wait: bool) -> BoxFuture<'a, Link> {
        let link = match lock(&self.external_ids).get(key) {
            Some(id) => Link::Linked {
                id: id.clone(),
                hash: lock(&self.hashes).get(key).cloned(),
            },
            None if wait && self.import_running.load(Ordering::SeqCst) => Link::Wait,
            None => Link::Unlinked,
        };
        async move { link }.boxed()
    }

    fn current_row<'a>(
        &'a self,
        key: &'a str,
    ) -> BoxFuture<'a, Result<Option<CurrentRow>, PortError>> {
        let row = lock(&self.rows).get(key).cloned();
        async move { Ok(row) }.boxed()
    }

    fn is_parked<'a>(&'a self, key: &'a str) -> BoxFuture<'a, Result<bool, PortError>> {
        let parked = lock(&self.parked).contains(key);
        async move { Ok(parked) }.boxed()
    }
}
