//! Checkpoints (the extent made durable up to an LSN, then the
//! superblock), the committed floor, epochs and truncation.

use super::*;

impl Store {
    /// Applies the WAL up to `up_to` (at most the durable LSN) to the extent,
    /// fsyncs it, commits the superblock and recycles the WAL. A partial
    /// store (an install in place under way) is not checkpointed: its
    /// WAL's frames are not part of what it will hold.
    pub fn checkpoint(&self, up_to: u64) -> Result<CheckpointOutcome, StoreError> {
        self.checkpoint_now(up_to)
    }

    pub(super) fn checkpoint_now(&self, up_to: u64) -> Result<CheckpointOutcome, StoreError> {
        let _serial = self
            .checkpointing
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        // Looked at under the lock: `begin_in_place` marks the store
        // partial under it too.
        if self.partial().is_some() {
            return Ok(CheckpointOutcome::UpToDate);
        }
        let pins = self.snapshot_pins();
        if pins > 0 {
            return Ok(CheckpointOutcome::Paused { pins });
        }
        let (wal, extent, superblock) = {
            let state = self.read_state();
            (
                state.wal.clone(),
                Arc::clone(&state.extent),
                state.superblock,
            )
        };
        let from = superblock.checkpoint;
        let to = up_to.min(wal.durable());
        if to <= from {
            return Ok(CheckpointOutcome::UpToDate);
        }
        wal.read_frames_batched(from, to, CHECKPOINT_BATCH_BYTES, |frames| {
            extent.apply_all(&frames)?;
            self.mark_dirty(&frames);
            Ok::<_, StoreError>(())
        })?;
        extent.sync()?;
        // The maps cover what the superblock will say the extent holds.
        self.persist_dirty_maps()?;
        let next = Superblock {
            checkpoint: to,
            ..superblock
        };
        next.store_in(self.fs(), &self.dir)?;
        self.write_state().superblock = next;
        wal.set_checkpoint(to);
        if to >= self.extent_ahead.load(Ordering::Acquire) {
            self.extent_ahead.store(0, Ordering::Release);
        }
        self.dirty().retain(|_, block| block.lsn > to);
        let recycled = wal.recycle()?;
        Ok(CheckpointOutcome::Done { from, to, recycled })
    }

    pub(super) fn load_committed_floor(fs: &dyn Fs, dir: &Path) -> Result<u64, StoreError> {
        let path = dir.join(COMMITTED_FLOOR);
        match fs.read(&path) {
            Ok(bytes) => decode_run_marker(&bytes).ok_or_else(|| {
                let bad = std::io::Error::new(std::io::ErrorKind::InvalidData, "bad checksum");
                io_err("read", &path)(bad)
            }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(0),
            Err(e) => Err(io_err("read", &path)(e)),
        }
    }

    pub(super) fn floor(&self) -> MutexGuard<'_, u64> {
        self.committed_floor
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// The committed floor last persisted: what a primary told this
    /// replica was committed, as of its last
    /// [`raise_committed_floor`](Self::raise_committed_floor) (0: never).
    pub fn committed_floor(&self) -> u64 {
        *self.floor()
    }

    /// Persists `lsn` as the committed floor if it is higher than the one
    /// persisted and the store is still at `generation` (a job that read
    /// the floor before a base install lowered it is too late), so a
    /// replica that restarts still refuses to truncate below it. Replaced
    /// atomically and durably, one writer at a time.
    pub fn raise_committed_floor(&self, lsn: u64, generation: u64) -> Result<(), StoreError> {
        let mut floor = self.floor();
        if lsn <= *floor || self.superblock().generation != generation {
            return Ok(());
        }
        self.write_committed_floor(&mut floor, lsn)
    }

    /// Persists `lsn` as the committed floor if it is lower than the one
    /// persisted (a base install from a primary whose history ends
    /// below it).
    pub fn lower_committed_floor(&self, lsn: u64) -> Result<(), StoreError> {
        let mut floor = self.floor();
        if lsn >= *floor {
            return Ok(());
        }
        self.write_committed_floor(&mut floor, lsn)
    }

    pub(super) fn write_committed_floor(
        &self,
        floor: &mut u64,
        lsn: u64,
    ) -> Result<(), StoreError> {
        let path = self.dir.join(COMMITTED_FLOOR);
        crate::durable::rewrite_atomic(
            self.fs(),
            &self.dir,
            COMMITTED_FLOOR,
            &encode_run_marker(lsn),
        )
        .map_err(io_err("replace", &path))?;
        *floor = lsn;
        Ok(())
    }

    /// Persists the epoch in the superblock now (fencing must survive restarts).
    pub fn persist_epoch(&self, epoch: u64) -> Result<(), StoreError> {
        let _serial = self
            .checkpointing
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let mut state = self.write_state();
        let next = Superblock {
            epoch,
            ..state.superblock
        };
        next.store_in(self.fs(), &self.dir)?;
        state.superblock = next;
        Ok(())
    }

    /// Drops WAL entries after `lsn` (a replica ahead of committed).
    pub fn truncate_after(&self, lsn: u64) -> Result<(), StoreError> {
        self.record_direct(&mut self.direct())?;
        self.wal().truncate_after(lsn)?;
        self.rebuild_dirty()?;
        Ok(())
    }
}
