//! Resources (pins) held for the engine's plans.
//!
//! The table maps the engine's `ResourceId`s to the real guards. A guard is
//! released when the engine says so (`ReleaseResources`) or when the executor
//! holding a [`Lease`] on it is dropped (cancelled, finished, panicked),
//! whichever comes first; the second is a no-op, so each guard is dropped
//! exactly once.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use walship_engine::ResourceId;
use walship_io::{SnapshotPin, WalPin};

/// A real pin behind an engine resource.
#[derive(Debug)]
pub(crate) enum Held {
    /// WAL retention (held for its `Drop`).
    Wal(#[allow(dead_code)] WalPin),
    /// A snapshot or full-base image (shared with the executor reading it).
    Image(Arc<SnapshotPin>),
}

#[derive(Debug, Clone, Default)]
pub(crate) struct ResourceTable(Arc<Mutex<HashMap<ResourceId, Held>>>);

impl ResourceTable {
    fn lock(&self) -> MutexGuard<'_, HashMap<ResourceId, Held>> {
        self.0.lock().unwrap_or_else(PoisonError::into_inner)
    }

    pub(crate) fn insert(&self, id: ResourceId, held: Held) {
        self.lock().insert(id, held);
    }

    /// Drops the guards of `ids` that are still held.
    pub(crate) fn release(&self, ids: &[ResourceId]) {
        let released: Vec<Held> = {
            let mut table = self.lock();
            ids.iter().filter_map(|id| table.remove(id)).collect()
        };
        drop(released);
    }

    pub(crate) fn len(&self) -> usize {
        self.lock().len()
    }

    pub(crate) fn image(&self, ids: &[ResourceId]) -> Option<Arc<SnapshotPin>> {
        let table = self.lock();
        ids.iter().find_map(|id| match table.get(id) {
            Some(Held::Image(pin)) => Some(Arc::clone(pin)),
            _ => None,
        })
    }

    pub(crate) fn lease(&self, ids: Vec<ResourceId>) -> Lease {
        Lease {
            table: self.clone(),
            ids,
            slot: None,
        }
    }
}

/// Held by an executor future. Dropping it releases the resources it
/// names, and gives back the rebuild slot it holds.
#[must_use = "dropping a Lease releases its pins at once"]
#[derive(Debug)]
pub(crate) struct Lease {
    table: ResourceTable,
    ids: Vec<ResourceId>,
    slot: Option<crate::recovery::RebuildSlot>,
}

impl Lease {
    /// The lease also holds `slot` (a rebuild's), until it drops.
    pub(crate) fn with_slot(mut self, slot: Option<crate::recovery::RebuildSlot>) -> Self {
        self.slot = slot;
        self
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        self.table.release(&self.ids);
    }
}
