//! WAL retention pins.
//!
//! A [`WalPin`] keeps every WAL entry after its LSN from being recycled.
//! The table is a small map behind a mutex that is never held across IO, so
//! dropping a pin costs a map removal: it never blocks on disk and never
//! panics (a poisoned lock is recovered, the pin removed all the same).

use std::collections::BTreeMap;
use std::fmt;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

#[derive(Debug, Clone)]
struct PinEntry {
    from: u64,
    label: String,
    since: Instant,
}

#[derive(Debug, Default)]
struct PinState {
    next_id: u64,
    pins: BTreeMap<u64, PinEntry>,
}

/// The table of live pins of one WAL.
#[derive(Debug, Default)]
pub(crate) struct PinTable {
    state: Mutex<PinState>,
}

/// One live pin, for reports.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PinInfo {
    /// Pin id.
    pub id: u64,
    /// Entries after this LSN are kept.
    pub from: u64,
    /// Who holds it.
    pub label: String,
    /// How long it has been held.
    pub held_for: Duration,
}

impl PinTable {
    fn lock(&self) -> MutexGuard<'_, PinState> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Adds a pin. The caller has checked `from` against the tail under the WAL lock.
    pub(crate) fn add(self: &Arc<Self>, from: u64, label: &str) -> WalPin {
        let mut state = self.lock();
        state.next_id += 1;
        let id = state.next_id;
        state.pins.insert(
            id,
            PinEntry {
                from,
                label: label.to_owned(),
                since: Instant::now(),
            },
        );
        WalPin {
            table: Arc::clone(self),
            id,
            from,
        }
    }

    fn release(&self, id: u64) {
        self.lock().pins.remove(&id);
    }

    /// Lowest pinned LSN, if any pin is live.
    pub(crate) fn min_from(&self) -> Option<u64> {
        self.lock().pins.values().map(|p| p.from).min()
    }

    /// Every live pin, oldest LSN first.
    pub(crate) fn list(&self) -> Vec<PinInfo> {
        let now = Instant::now();
        let mut pins: Vec<PinInfo> = self
            .lock()
            .pins
            .iter()
            .map(|(id, p)| PinInfo {
                id: *id,
                from: p.from,
                label: p.label.clone(),
                held_for: now.duration_since(p.since),
            })
            .collect();
        pins.sort_by_key(|p| (p.from, p.id));
        pins
    }

    pub(crate) fn len(&self) -> usize {
        self.lock().pins.len()
    }
}

/// Keeps the WAL after `from` from being recycled while it lives.
///
/// Dropping it releases the pin at once (a map removal; no IO, no panic).
/// Segments it protected are deleted by the next `Wal::recycle`, not by the drop.
#[must_use = "a WalPin releases its retention as soon as it is dropped"]
pub struct WalPin {
    table: Arc<PinTable>,
    id: u64,
    from: u64,
}

impl WalPin {
    /// Entries after this LSN are kept.
    pub fn from(&self) -> u64 {
        self.from
    }

    /// The pin's id in reports.
    pub fn id(&self) -> u64 {
        self.id
    }
}

impl fmt::Debug for WalPin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("WalPin")
            .field("id", &self.id)
            .field("from", &self.from)
            .finish()
    }
}

impl Drop for WalPin {
    fn drop(&mut self) {
        self.table.release(self.id);
    }
}
