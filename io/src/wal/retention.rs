//! Retention: the checkpoint, pins, recycling whole segments below the
//! floor, truncation after a divergence point, a restart after a
//! checkpoint, and the epoch history stored.

use super::*;

impl Wal {
    /// Records the checkpoint: entries up to it are in the extent.
    pub fn set_checkpoint(&self, lsn: u64) {
        let mut writer = self.writer();
        writer.checkpoint = writer.checkpoint.max(lsn.min(writer.head));
    }

    /// Restarts the log after `lsn`, with `history` as its epoch history:
    /// every frame it holds, and everything up to `lsn`, is held elsewhere
    /// (a store applied it to its extent and committed a checkpoint at
    /// `lsn` before calling this). All segments are replaced by an empty one
    /// whose first LSN is `lsn + 1`; head, tail, checkpoint and durable all
    /// become `lsn`.
    ///
    /// Crash-safe with [`WalOptions::start_after`] at `lsn`: whether the new
    /// segment, the old ones, both or neither survive, the next open starts
    /// after `lsn`. Refused while frames after the checkpoint exist, or
    /// while pins hold segments.
    pub fn restart_after(&self, lsn: u64, history: &[EpochStart]) -> Result<(), WalError> {
        let mut writer = self.writer();
        if let Some(reason) = self.inner.poison.get() {
            return Err(WalError::Poisoned(reason.clone()));
        }
        if writer.head > writer.checkpoint || lsn < writer.head {
            return Err(WalError::NotApplied {
                lsn,
                head: writer.head,
                checkpoint: writer.checkpoint,
            });
        }
        let pins = self.inner.pins.len();
        if pins > 0 {
            return Err(WalError::Pinned { pins });
        }
        self.replace_epochs(&mut writer, history)?;
        let already = writer.head == lsn
            && writer.segments.len() == 1
            && writer.segments[0].is_empty()
            && writer.segments[0].first == lsn + 1;
        if !already {
            let path = self.inner.dir.join(segment::segment_name(
                self.inner.options.generation,
                lsn + 1,
            ));
            let file = self.fs().create(&path).map_err(io_err("create", &path))?;
            let old = std::mem::replace(
                &mut writer.segments,
                vec![Segment::empty(path.clone(), lsn + 1)],
            );
            writer.active = file.into();
            writer.allocated = 0;
            writer.unsynced = 0;
            writer.synced_last = 0;
            writer.head = lsn;
            writer.tail = lsn;
            writer.checkpoint = lsn;
            // An empty last segment (a rotation whose write failed) may
            // carry the new one's name: it is the new one now.
            for segment in old.iter().filter(|s| s.path != path) {
                self.fs()
                    .remove_file(&segment.path)
                    .map_err(io_err("remove", &segment.path))?;
            }
        }
        // Every time: a retry after a failed removal finds the switch made,
        // and the new segment's name must still become durable.
        self.sync_wal_dir()?;
        let mut state = lock(&self.inner.sync);
        state.durable = state.durable.max(lsn);
        self.inner.durable_tx.send_replace(state.durable);
        Ok(())
    }

    /// Persists `history` as the epoch history (it may run past the head:
    /// see [`Wal::restart_after`]; an open cuts what the frames do not
    /// reach).
    pub fn store_epochs(&self, history: &[EpochStart]) -> Result<(), WalError> {
        self.replace_epochs(&mut self.writer(), history)
    }

    pub(super) fn replace_epochs(
        &self,
        writer: &mut Writer,
        history: &[EpochStart],
    ) -> Result<(), WalError> {
        epochs::validate(history)?;
        if history != writer.epochs.as_slice() {
            self.persist_epochs(writer, history.to_vec())?;
        }
        Ok(())
    }

    /// Replaces the persisted epoch history with `history`, then the
    /// writer's.
    pub(super) fn persist_epochs(
        &self,
        writer: &mut Writer,
        history: Vec<EpochStart>,
    ) -> Result<(), EpochError> {
        let generation = self.inner.options.generation;
        epochs::store(self.fs().as_ref(), &self.inner.dir, generation, &history)?;
        writer.epochs = history;
        Ok(())
    }

    /// Pins the WAL after `lsn`: nothing after it is recycled while the pin lives.
    pub fn pin_from(&self, lsn: u64, label: &str) -> Result<WalPin, WalError> {
        let writer = self.writer();
        if lsn < writer.tail {
            return Err(WalError::PinBelowTail {
                lsn,
                tail: writer.tail,
            });
        }
        Ok(self.inner.pins.add(lsn, label))
    }

    /// Deletes whole segments at or below min(checkpoint, every pin).
    /// The active segment is never deleted.
    pub fn recycle(&self) -> Result<RecycleReport, WalError> {
        // The index changes under the lock; the files go after it is released,
        // so appends never wait on unlink and directory fsync.
        let (removed, report) = {
            let mut writer = self.writer();
            let floor = self
                .inner
                .pins
                .min_from()
                .map_or(writer.checkpoint, |p| p.min(writer.checkpoint));
            let mut report = RecycleReport {
                segments_deleted: 0,
                bytes_freed: 0,
                tail: writer.tail,
                floor,
            };
            let mut removed = Vec::new();
            while writer.segments.len() > 1 && writer.segments[0].last() <= floor {
                let segment = writer.segments.remove(0);
                writer.tail = segment.last();
                report.segments_deleted += 1;
                report.bytes_freed += segment.bytes;
                removed.push(segment.path);
            }
            report.tail = writer.tail;
            (removed, report)
        };
        for path in &removed {
            self.fs()
                .remove_file(path)
                .map_err(io_err("remove", path))?;
        }
        if !removed.is_empty() {
            self.sync_wal_dir()?;
        }
        Ok(report)
    }

    /// Drops every entry after `lsn` (a replica ahead of committed). Refused
    /// below the checkpoint, whose entries are already in the extent.
    pub fn truncate_after(&self, lsn: u64) -> Result<(), WalError> {
        let mut writer = self.writer();
        if let Some(reason) = self.inner.poison.get() {
            return Err(WalError::Poisoned(reason.clone()));
        }
        if lsn < writer.checkpoint {
            return Err(WalError::BelowCheckpoint {
                lsn,
                checkpoint: writer.checkpoint,
            });
        }
        if lsn >= writer.head {
            return Ok(());
        }
        if lsn < writer.tail {
            return Err(WalError::Recycled {
                from: lsn,
                tail: writer.tail,
            });
        }
        // Newest first, each removal durable before the next: a power loss
        // may keep any subset of unsynced removals, and one that kept an
        // older segment's removal but not a newer one's would leave a gap
        // that open refuses.
        while writer.segments.len() > 1 && writer.segments.last().is_some_and(|s| s.first > lsn + 1)
        {
            if let Some(segment) = writer.segments.pop() {
                self.fs()
                    .remove_file(&segment.path)
                    .map_err(io_err("remove", &segment.path))?;
                self.sync_wal_dir()?;
            }
        }
        let Some(segment) = writer.segments.last_mut() else {
            return Err(WalError::Poisoned("no active segment".into()));
        };
        let cut = segment.offset_of(lsn + 1);
        segment.offsets.truncate((lsn + 1 - segment.first) as usize);
        segment.bytes = cut;
        let path = segment.path.clone();
        let file = self.fs().open(&path).map_err(io_err("open", &path))?;
        file.set_len(cut).map_err(io_err("truncate", &path))?;
        file.sync_all().map_err(io_err("sync", &path))?;
        self.sync_wal_dir()?;
        writer.active = file.into();
        writer.allocated = cut;
        writer.head = lsn;
        let mut history = writer.epochs.clone();
        if epochs::cut_after(&mut history, lsn) {
            self.persist_epochs(&mut writer, history)?;
        }
        let mut state = lock(&self.inner.sync);
        state.durable = state.durable.min(lsn);
        state.truncations += 1;
        self.inner.durable_tx.send_replace(state.durable);
        Ok(())
    }

    /// Bytes of retained frames after `lsn`.
    pub(super) fn bytes_after(writer: &Writer, lsn: u64) -> u64 {
        writer.segments.iter().map(|s| s.bytes_after(lsn)).sum()
    }

    /// Bytes of retained frames after `lsn`: what a pin at `lsn` keeps
    /// from being recycled, at most.
    pub fn retained_after(&self, lsn: u64) -> u64 {
        Self::bytes_after(&self.writer(), lsn)
    }

    /// Retention and pin pressure.
    pub fn retention(&self) -> RetentionReport {
        let writer = self.writer();
        let retained_bytes = Self::bytes_after(&writer, writer.tail);
        let beyond_checkpoint = Self::bytes_after(&writer, writer.checkpoint);
        let pins = self
            .inner
            .pins
            .list()
            .into_iter()
            .map(|pin| {
                let bytes_held =
                    Self::bytes_after(&writer, pin.from).saturating_sub(beyond_checkpoint);
                PinReport { pin, bytes_held }
            })
            .collect();
        let max_bytes = self.inner.options.max_retained_bytes;
        RetentionReport {
            retained_bytes,
            max_bytes,
            over_limit: max_bytes.is_some_and(|max| retained_bytes > max),
            tail: writer.tail,
            checkpoint: writer.checkpoint,
            head: writer.head,
            pins,
        }
    }

    /// Pin table summary.
    pub fn pin_stats(&self) -> PinStats {
        let report = self.retention();
        PinStats {
            count: self.inner.pins.len(),
            oldest_from: report.pins.first().map(|p| p.pin.from),
            bytes_held: report.pins.first().map_or(0, |p| p.bytes_held),
        }
    }
}
