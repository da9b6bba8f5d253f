//! Group commit: one caller fsyncs for everyone; a failed fsync poisons
//! the WAL.

use super::*;

impl Wal {
    /// Makes a rotated-in segment's directory entry durable (as the sync
    /// mode asks).
    pub(super) fn sync_dir_after_rotation(&self) -> Result<(), String> {
        if self.inner.options.sync == SyncMode::None {
            return Ok(());
        }
        self.inner
            .options
            .fs
            .sync_dir(&self.inner.dir)
            .map_err(|error| {
                format!(
                    "fsync of {} after a rotation: {error}",
                    self.inner.dir.display()
                )
            })
    }

    pub(super) fn sync_file(&self, file: &dyn FsFile) -> std::io::Result<()> {
        self.inner.syncs.fetch_add(1, Ordering::Relaxed);
        #[cfg(feature = "faults")]
        {
            if self.inner.fail_next_sync.swap(false, Ordering::SeqCst) {
                return Err(std::io::Error::from_raw_os_error(libc::EIO));
            }
            let delay = self.inner.sync_delay_us.load(Ordering::Relaxed);
            if delay > 0 {
                std::thread::sleep(std::time::Duration::from_micros(delay));
            }
        }
        self.inner.options.sync.sync(file)
    }

    /// Makes the next sync fail with EIO, as a disk error would. For tests of
    /// the poisoning path (feature `faults`).
    #[cfg(feature = "faults")]
    pub fn inject_sync_failure(&self) {
        self.inner.fail_next_sync.store(true, Ordering::SeqCst);
    }

    /// Makes every sync from now on take `delay` longer, as a slow disk
    /// would (zero: as fast as the disk). For tests of what waits on a sync
    /// (feature `faults`).
    #[cfg(feature = "faults")]
    pub fn inject_sync_delay(&self, delay: std::time::Duration) {
        let micros = u64::try_from(delay.as_micros()).unwrap_or(u64::MAX);
        self.inner.sync_delay_us.store(micros, Ordering::Relaxed);
    }

    /// Returns once every LSN up to `lsn` is durable. One caller syncs for all
    /// waiting callers (group commit).
    ///
    /// Lock order is writer → sync everywhere; this function never holds the
    /// sync lock while taking the writer lock.
    pub fn sync_to(&self, lsn: u64) -> Result<u64, WalError> {
        loop {
            let mut state = lock(&self.inner.sync);
            if let Some(reason) = self.inner.poison.get() {
                return Err(WalError::Poisoned(reason.clone()));
            }
            if state.durable >= lsn {
                return Ok(state.durable);
            }
            if state.syncing {
                drop(
                    self.inner
                        .synced
                        .wait(state)
                        .unwrap_or_else(PoisonError::into_inner),
                );
                continue;
            }
            state.syncing = true;
            let truncations = state.truncations;
            drop(state);
            let (target, file, new_segment) = {
                let mut writer = self.writer();
                writer.synced_last = std::mem::take(&mut writer.unsynced);
                let new_segment = std::mem::take(&mut writer.dir_unsynced);
                (writer.head, Arc::clone(&writer.active), new_segment)
            };
            let result = self
                .sync_file(file.as_ref())
                .map_err(|error| format!("fdatasync: {error}"))
                .and_then(|()| match new_segment {
                    true => self.sync_dir_after_rotation(),
                    false => Ok(()),
                });
            let failed = result.err().map(|reason| self.poison(reason));
            let mut state = lock(&self.inner.sync);
            state.syncing = false;
            if failed.is_none() && state.truncations == truncations {
                state.durable = state.durable.max(target);
                self.inner.durable_tx.send_replace(state.durable);
            }
            self.inner.synced.notify_all();
            // Waiters (and this caller, on the next turn) see the poison.
            if failed.is_none() && target < lsn {
                return Err(WalError::BeyondHead {
                    to: lsn,
                    head: target,
                });
            }
        }
    }

    /// Poisons the WAL (the first reason stays) and returns the error that says so.
    pub(super) fn poison(&self, reason: String) -> WalError {
        let _ = self.inner.poison.set(reason);
        WalError::Poisoned(self.poisoned().unwrap_or_default())
    }

    /// Poisons the WAL: a write it does not hold failed to sync (the
    /// store's run of committed frames written to the extent).
    pub(crate) fn poison_now(&self, reason: String) -> WalError {
        self.poison(reason)
    }
}
