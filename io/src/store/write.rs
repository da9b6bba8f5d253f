//! Writes: a primary's and a replica's frames into the WAL and the dirty
//! map, or (a run of committed frames) straight to the extent; reads.

use super::*;

impl Store {
    /// Writes whole blocks at `lba` as the primary. Durable after `sync_to(lsn)`.
    pub fn write(&self, epoch: u64, lba: u64, data: Bytes) -> Result<u64, StoreError> {
        self.check_range(lba, (data.len() / BLOCK_SIZE) as u64)?;
        let wal = self.wal();
        let lsn = wal.append(epoch, FrameKind::Write, lba, data.clone())?;
        let frame = Frame::write(lsn, epoch, lba, data);
        Self::note_dirty(&mut self.dirty(), &frame);
        Ok(lsn)
    }

    /// Zeroes `count` blocks at `lba` as the primary.
    pub fn trim(&self, epoch: u64, lba: u64, count: u64) -> Result<u64, StoreError> {
        self.check_range(lba, count)?;
        let frame = Frame::trim(0, epoch, lba, count);
        let lsn = self
            .wal()
            .append(epoch, FrameKind::Trim, lba, frame.payload.clone())?;
        Self::note_dirty(&mut self.dirty(), &Frame { lsn, ..frame });
        Ok(lsn)
    }

    /// Applies frames shipped by the primary (encoded, LSNs following the
    /// head). Returns the new head. Durable after `sync_to`.
    ///
    /// A large batch (at least [`DIRECT_MIN_BYTES`]: a catch-up's, not a
    /// live write's) whose frames are all at or below `committed` (what the
    /// primary says no primary will take back) goes straight to the extent
    /// instead of the WAL then the extent: a catch-up writes each byte once.
    /// What the WAL holds is checkpointed first (it is all below the
    /// batch, so committed too). `sync_to`
    /// records such a run as a checkpoint: the extent is synced, the epoch
    /// history and the superblock are committed, and the WAL restarts after
    /// the run ([`Wal::restart_after`]). Until then a marker file says a run
    /// is open: a crash may have left some of its blocks in the extent, and
    /// the next open starts a replica over empty (see
    /// [`StoreOptions::reset_interrupted_run`]). After it, everything up to
    /// the run's end is in the extent, and the WAL, whatever part of its
    /// restart a crash interrupted, reopens after it. A failed extent write
    /// or sync poisons the WAL. As with any checkpoint, a truncation below
    /// the run is refused.
    pub fn apply_replicated(&self, raw: &Bytes, committed: u64) -> Result<u64, StoreError> {
        let wal = self.wal();
        if let Some(reason) = wal.poisoned() {
            return Err(WalError::Poisoned(reason).into());
        }
        let mut direct = self.direct();
        let head = direct.as_ref().map_or_else(|| wal.head(), |run| run.last);
        let frames = Wal::decode_replicated(raw, head + 1)?;
        for frame in &frames {
            self.check_range(frame.lba, frame.block_count())?;
        }
        let Some(last) = frames.last().map(|f| f.lsn) else {
            return Ok(head);
        };
        let bulk = raw.len() >= DIRECT_MIN_BYTES && last <= committed && self.snapshot_pins() == 0;
        if bulk && direct.is_none() {
            self.checkpoint_all(&wal)?;
        }
        if bulk && (direct.is_some() || self.may_write_direct(&wal)) {
            let mut history = direct
                .as_ref()
                .map_or_else(|| wal.epochs(), |run| run.epochs.clone());
            for frame in &frames {
                epochs::note(&mut history, frame.lsn, frame.epoch).map_err(WalError::from)?;
            }
            if direct.is_none() {
                self.mark_run(head)?;
            }
            let extent = Arc::clone(&self.read_state().extent);
            if let Err(e) = extent.apply_all(&frames) {
                // Part of the batch may be in the extent, past what a record
                // would name: nothing more is taken (the WAL is poisoned),
                // and the marker makes the next open start over.
                let reason = format!("extent write of committed frames: {e}");
                return Err(wal.poison_now(reason).into());
            }
            *direct = Some(DirectRun {
                last,
                epochs: history,
            });
            return Ok(last);
        }
        // The WAL must hold everything before what it appends.
        self.record_direct(&mut direct)?;
        wal.append_decoded(raw, &frames)?;
        let mut dirty = self.dirty();
        for frame in &frames {
            Self::note_dirty(&mut dirty, frame);
        }
        Ok(wal.head())
    }

    /// Checkpoints everything the WAL holds, unless readers pin it (then
    /// nothing goes straight to the extent anyway).
    pub(super) fn checkpoint_all(&self, wal: &Wal) -> Result<(), StoreError> {
        let head = wal.head();
        if head > self.superblock().checkpoint && wal.pin_stats().count == 0 {
            wal.sync_to(head)?;
            self.checkpoint(head)?;
        }
        Ok(())
    }

    /// Writes the run marker, durably, before the run's first extent
    /// write; replaced atomically (one a failed run left must not be torn
    /// by a crash mid-write).
    pub(super) fn mark_run(&self, from: u64) -> Result<(), StoreError> {
        let path = self.dir.join(RUN_MARKER);
        crate::durable::rewrite_atomic(self.fs(), &self.dir, RUN_MARKER, &encode_run_marker(from))
            .map_err(io_err("replace", &path))
    }

    /// Whether a run of committed frames may start: the extent holds
    /// everything the WAL does (no checkpoint running, none owed) and no
    /// reader holds the WAL or the extent's image.
    pub(super) fn may_write_direct(&self, wal: &Wal) -> bool {
        let Ok(_serial) = self.checkpointing.try_lock() else {
            return false;
        };
        wal.head() == self.read_state().superblock.checkpoint
            && wal.pin_stats().count == 0
            && self.dirty().is_empty()
    }

    /// Records a run of frames written straight to the extent (see
    /// [`Store::apply_replicated`]), in an order a crash cannot reverse:
    /// extent, epoch history, superblock, WAL.
    pub(super) fn record_direct(&self, direct: &mut Option<DirectRun>) -> Result<(), StoreError> {
        let Some(run) = direct.as_ref() else {
            return Ok(());
        };
        if let Some(reason) = self.wal().poisoned() {
            return Err(WalError::Poisoned(reason).into());
        }
        let _serial = self
            .checkpointing
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let (wal, extent, superblock) = {
            let state = self.read_state();
            (
                state.wal.clone(),
                Arc::clone(&state.extent),
                state.superblock,
            )
        };
        // If this fails, the page cache may have dropped the run's blocks
        // and a second fdatasync would succeed without them: nothing more
        // is recorded or acknowledged (the WAL is poisoned), and the marker
        // stays, so the next open starts over.
        if let Err(e) = extent.sync() {
            let reason = format!("extent sync of committed frames written to it: {e}");
            return Err(wal.poison_now(reason).into());
        }
        // Past the WAL's head until the restart: an open after a crash
        // before the superblock commit cuts it back to the head.
        wal.store_epochs(&run.epochs)?;
        let next = Superblock {
            checkpoint: run.last,
            ..superblock
        };
        next.store_in(self.fs(), &self.dir)?;
        self.write_state().superblock = next;
        wal.restart_after(run.last, &run.epochs)?;
        let marker = self.dir.join(RUN_MARKER);
        self.fs()
            .remove_file(&marker)
            .map_err(io_err("remove", &marker))?;
        self.fs()
            .sync_dir(&self.dir)
            .map_err(io_err("sync", &self.dir))?;
        *direct = None;
        Ok(())
    }

    /// The highest LSN applied: the WAL's head, or the end of a run of
    /// committed frames written straight to the extent.
    pub fn head(&self) -> u64 {
        match self.direct().as_ref() {
            Some(run) => run.last,
            None => self.wal().head(),
        }
    }

    /// Waits until everything up to `lsn` is durable (group commit).
    pub fn sync_to(&self, lsn: u64) -> Result<u64, StoreError> {
        self.record_direct(&mut self.direct())?;
        Ok(self.wal().sync_to(lsn)?)
    }

    /// Reads `blocks` blocks at `lba`: the newest data, from the WAL or the extent.
    pub fn read(&self, lba: u64, blocks: u64) -> Result<Bytes, StoreError> {
        self.check_range(lba, blocks)?;
        // The dirty blocks first, then the extent: a checkpoint that writes
        // a block to the extent and then drops it from the dirty map between
        // the two would otherwise leave this read the extent's older data
        // and no dirty block over it. Taken with the extent under the state
        // lock, so a base install does not switch the extent between them.
        let (extent, overlay) = {
            let state = self.read_state();
            let overlay: Vec<(u64, Bytes)> = self
                .dirty()
                .range(lba..lba + blocks)
                .map(|(block, entry)| (*block, entry.data.clone()))
                .collect();
            (Arc::clone(&state.extent), overlay)
        };
        let mut out = extent.read(lba, blocks)?;
        for (block, data) in overlay {
            let at = ((block - lba) as usize) * BLOCK_SIZE;
            out[at..at + BLOCK_SIZE].copy_from_slice(&data);
        }
        Ok(Bytes::from(out))
    }
}
