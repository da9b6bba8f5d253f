//! A process-wide bound on open extent files: a node hosting thousands of
//! volumes must not hold a descriptor for each idle one.
//!
//! Each extent has a [`Handle`]: its file while open, opened again on
//! demand. Past [`max_open`] open handles, the least recently used clean
//! one is closed (a second-chance clock over the handles in open order).
//! A handle with writes not yet synced is never closed: a writeback error
//! is reported to the descriptor that was open when it happened, and must
//! reach the sync that follows.

use crate::fs::FsFile;
use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock, PoisonError, Weak};

/// Open extent files allowed at once, unless [`set_max_open`] says otherwise.
pub const DEFAULT_MAX_OPEN: usize = 1024;

static MAX_OPEN: AtomicUsize = AtomicUsize::new(DEFAULT_MAX_OPEN);
static OPEN: AtomicUsize = AtomicUsize::new(0);

/// Sets how many extent files the process keeps open at most (at least 1).
pub fn set_max_open(max: usize) {
    MAX_OPEN.store(max.max(1), Ordering::Relaxed);
}

/// How many extent files the process may keep open.
pub fn max_open() -> usize {
    MAX_OPEN.load(Ordering::Relaxed)
}

/// How many extent files are open now.
pub fn open_now() -> usize {
    OPEN.load(Ordering::Relaxed)
}

/// Handles in the order they were opened (the clock's hand is the front).
fn clock() -> MutexGuard<'static, VecDeque<Weak<Handle>>> {
    static CLOCK: OnceLock<Mutex<VecDeque<Weak<Handle>>>> = OnceLock::new();
    CLOCK
        .get_or_init(Mutex::default)
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

/// One extent's file, open or not. Dropping it closes the file if open.
#[derive(Debug, Default)]
pub(crate) struct Handle {
    file: Mutex<Option<Arc<dyn FsFile>>>,
    /// Used since the clock last passed: spared once.
    used: AtomicBool,
    /// Writes begun (counted before the file is taken for them).
    writes: AtomicU64,
    /// `writes` as a successful sync saw it when it began: the handle is
    /// clean (may be closed) only when this has caught up.
    synced: AtomicU64,
}

impl Handle {
    /// The open file: the cached one, or `open()`'s (and then another
    /// handle may be closed to stay within the bound).
    pub(crate) fn get(
        self: &Arc<Self>,
        open: impl FnOnce() -> std::io::Result<Box<dyn FsFile>>,
    ) -> std::io::Result<Arc<dyn FsFile>> {
        self.used.store(true, Ordering::Relaxed);
        let mut file = lock(&self.file);
        if let Some(file) = file.as_ref() {
            return Ok(Arc::clone(file));
        }
        let opened: Arc<dyn FsFile> = open()?.into();
        *file = Some(Arc::clone(&opened));
        drop(file);
        OPEN.fetch_add(1, Ordering::Relaxed);
        let mut clock = clock();
        clock.push_back(Arc::downgrade(self));
        evict(&mut clock, self);
        Ok(opened)
    }

    /// Notes a write about to begin; call before taking the file for it.
    pub(crate) fn writing(&self) {
        self.writes.fetch_add(1, Ordering::SeqCst);
    }

    /// Notes a sync about to begin; the token says what it covers.
    pub(crate) fn syncing(&self) -> u64 {
        self.writes.load(Ordering::SeqCst)
    }

    /// Notes that the sync begun with `covered` succeeded.
    pub(crate) fn synced(&self, covered: u64) {
        self.synced.fetch_max(covered, Ordering::SeqCst);
    }

    fn clean(&self) -> bool {
        self.synced.load(Ordering::SeqCst) >= self.writes.load(Ordering::SeqCst)
    }

    /// Whether its file is open now.
    pub(crate) fn is_open(&self) -> bool {
        lock(&self.file).is_some()
    }

    /// Closes the file if it is open and clean; whether it did.
    fn close_if_clean(&self) -> bool {
        let mut file = lock(&self.file);
        // A writer counts its write before it takes the file (under this
        // lock), so a write in flight keeps the handle dirty.
        if !self.clean() || file.take().is_none() {
            return false;
        }
        OPEN.fetch_sub(1, Ordering::Relaxed);
        true
    }
}

impl Drop for Handle {
    fn drop(&mut self) {
        let file = self.file.get_mut().unwrap_or_else(PoisonError::into_inner);
        if file.take().is_some() {
            OPEN.fetch_sub(1, Ordering::Relaxed);
        }
    }
}

/// Closes handles until the bound holds, sparing `keep` (just opened),
/// the recently used once, and the unsynced; gives up after one full
/// turn of the clock (everything open is busy or dirty).
fn evict(clock: &mut VecDeque<Weak<Handle>>, keep: &Arc<Handle>) {
    let mut budget = clock.len() * 2;
    while OPEN.load(Ordering::Relaxed) > max_open() && budget > 0 {
        budget -= 1;
        let Some(weak) = clock.pop_front() else {
            return;
        };
        let Some(handle) = weak.upgrade() else {
            continue;
        };
        if !handle.is_open() {
            continue;
        }
        if Arc::ptr_eq(&handle, keep) || handle.used.swap(false, Ordering::Relaxed) {
            clock.push_back(weak);
            continue;
        }
        if !handle.close_if_clean() {
            clock.push_back(weak);
        }
    }
}

#[cfg(test)]
mod tests {
    use crate::extent::ExtentFile;
    use crate::frame::BLOCK_SIZE;

    #[test]
    fn idle_extents_are_closed_past_the_bound_and_reopened_on_use() {
        let dir = tempfile::tempdir().unwrap();
        super::set_max_open(4);
        let extents: Vec<ExtentFile> = (0..12)
            .map(|i| {
                let extent = ExtentFile::open(&dir.path().join(format!("e{i}")), 4).unwrap();
                extent.write(0, &[i as u8; BLOCK_SIZE]).unwrap();
                extent.sync().unwrap();
                extent
            })
            .collect();
        // Other tests share the bound: at least the excess of ours is closed.
        let open = extents.iter().filter(|e| e.is_open()).count();
        assert!(open <= 4, "{open} of 12 open with a bound of 4");
        for (i, extent) in extents.iter().enumerate() {
            assert_eq!(extent.read(0, 1).unwrap(), vec![i as u8; BLOCK_SIZE]);
        }

        // Written and not synced: kept open however many others open.
        let dirty = ExtentFile::open(&dir.path().join("dirty"), 4).unwrap();
        dirty.write(1, &[7u8; BLOCK_SIZE]).unwrap();
        for extent in &extents {
            extent.read(0, 1).unwrap();
        }
        assert!(dirty.is_open(), "an extent with unsynced writes stays open");
        dirty.sync().unwrap();
        for extent in &extents {
            extent.read(0, 1).unwrap();
        }
        assert!(!dirty.is_open(), "once synced it may be closed");
        assert_eq!(dirty.read(1, 1).unwrap(), vec![7u8; BLOCK_SIZE]);
        super::set_max_open(super::DEFAULT_MAX_OPEN);
    }
}
