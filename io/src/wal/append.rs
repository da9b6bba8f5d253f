//! Appending: a primary's frames (LSNs assigned), a replica's (LSNs
//! checked), the epoch history recorded before a newer epoch's first
//! frame, and rotation to the next segment.

use super::*;

impl Wal {
    /// Appends one record as the primary, assigning the next LSN.
    pub fn append(
        &self,
        epoch: u64,
        kind: FrameKind,
        lba: u64,
        payload: Bytes,
    ) -> Result<u64, WalError> {
        let mut writer = self.writer();
        let lsn = writer.head + 1;
        let frame = Frame {
            lsn,
            epoch,
            kind,
            flags: 0,
            lba,
            payload,
        };
        frame.validate()?;
        self.record_epochs(&mut writer, [(lsn, epoch)])?;
        writer.scratch.clear();
        frame.encode(&mut writer.scratch);
        self.write_encoded(&mut writer, lsn, &[frame.encoded_len()], None)?;
        Ok(lsn)
    }

    /// Records the epochs of frames `(lsn, epoch)` about to be written after
    /// the head: a newer epoch is persisted before its first frame is
    /// written; an older one is refused and nothing is written. Entries a
    /// failed write left past the head are dropped first.
    pub(super) fn record_epochs(
        &self,
        writer: &mut Writer,
        frames: impl IntoIterator<Item = (u64, u64)> + Clone,
    ) -> Result<(), WalError> {
        let head = writer.head;
        let newest = writer.epochs.last().copied();
        let unchanged = newest.is_some_and(|e| e.first_lsn <= head)
            && frames
                .clone()
                .into_iter()
                .all(|(_, epoch)| newest.is_some_and(|e| e.epoch == epoch));
        if unchanged {
            return Ok(());
        }
        if let Some(reason) = self.inner.poison.get() {
            return Err(WalError::Poisoned(reason.clone()));
        }
        let mut history = writer.epochs.clone();
        epochs::cut_after(&mut history, head);
        for (lsn, epoch) in frames {
            epochs::note(&mut history, lsn, epoch)?;
        }
        if history != writer.epochs {
            self.persist_epochs(writer, history)?;
        }
        Ok(())
    }

    /// The epoch history: the first LSN of each epoch the log holds, oldest first.
    pub fn epochs(&self) -> Vec<EpochStart> {
        self.writer().epochs.clone()
    }

    /// The newest epoch in the log and its first LSN.
    pub fn newest_epoch(&self) -> Option<EpochStart> {
        self.writer().epochs.last().copied()
    }

    /// Appends frames received from the primary; the first must carry `head + 1`
    /// and the rest follow it. `raw` is their encoded form, written as is.
    /// Returns the frames, sliced from `raw`.
    pub fn append_replicated(&self, raw: &Bytes) -> Result<Vec<Frame>, WalError> {
        let frames = Self::decode_replicated(raw, self.head() + 1)?;
        self.append_decoded(raw, &frames)?;
        Ok(frames)
    }

    /// Writes encoded frames (of `lens` bytes, from `first_lsn`) to the active
    /// segment: `raw` as received, or the primary's freshly encoded `scratch`.
    pub(super) fn write_encoded(
        &self,
        writer: &mut Writer,
        first_lsn: u64,
        lens: &[usize],
        raw: Option<&Bytes>,
    ) -> Result<(), WalError> {
        if let Some(reason) = self.inner.poison.get() {
            return Err(WalError::Poisoned(reason.clone()));
        }
        let total = raw.map_or(writer.scratch.len(), Bytes::len) as u64;
        let needs_rotation = writer
            .segments
            .last()
            .is_some_and(|s| !s.is_empty() && s.bytes + total > self.inner.options.segment_bytes);
        if needs_rotation {
            self.rotate(writer, first_lsn)?;
        }
        let Writer {
            segments,
            active,
            allocated,
            unsynced,
            synced_last,
            scratch,
            head,
            ..
        } = writer;
        let Some(segment) = segments.last_mut() else {
            return Err(WalError::Poisoned("no active segment".into()));
        };
        let data: &[u8] = match raw {
            Some(raw) => raw,
            None => scratch,
        };
        let end = segment.bytes + total;
        let zero_ahead = self.inner.options.zero_ahead;
        // Only where syncs come every few small writes: when more is written
        // between two syncs (a catch-up), the file's growth costs each sync
        // little, and zeroes would be written for bytes about to come.
        *unsynced += total;
        if end > *allocated && (*unsynced).max(*synced_last) < zero_ahead {
            // Past the end of this write: its own bytes need no zeroes.
            let mut at = (*allocated).max(end);
            while at < end + zero_ahead {
                let len = (end + zero_ahead - at).min(ZEROES.len() as u64) as usize;
                active
                    .write_at(&ZEROES[..len], at)
                    .map_err(io_err("write zeroes", &segment.path))?;
                at += len as u64;
            }
            *allocated = at;
        }
        active
            .write_at(data, segment.bytes)
            .map_err(io_err("write", &segment.path))?;
        *allocated = (*allocated).max(end);
        let mut offset = segment.bytes;
        for len in lens {
            segment.offsets.push(offset);
            offset += *len as u64;
        }
        segment.bytes = offset;
        *head = first_lsn + lens.len() as u64 - 1;
        Ok(())
    }

    pub(super) fn rotate(&self, writer: &mut Writer, next_first: u64) -> Result<(), WalError> {
        let old_path = writer
            .segments
            .last()
            .map(|s| s.path.clone())
            .unwrap_or_default();
        // Recovery reads a short segment followed by another as corruption:
        // the full one must be durable before the next holds a frame.
        let durable = lock(&self.inner.sync).durable;
        if durable < writer.head {
            if let Err(error) = self.sync_file(writer.active.as_ref()) {
                let reason = format!("sync before rotation of {}: {error}", old_path.display());
                return Err(self.poison(reason));
            }
        }
        // The sealed segment keeps its frames only. Unsynced: if a crash
        // loses the cut, the zeroes are read as what they are.
        if let Some(sealed) = writer.segments.last() {
            if writer.allocated > sealed.bytes {
                writer
                    .active
                    .set_len(sealed.bytes)
                    .map_err(io_err("trim zeroes", &old_path))?;
            }
        }
        if writer.dir_unsynced {
            if let Err(reason) = self.sync_dir_after_rotation() {
                return Err(self.poison(reason));
            }
            writer.dir_unsynced = false;
        }
        let path = self.inner.dir.join(segment::segment_name(
            self.inner.options.generation,
            next_first,
        ));
        let file = self
            .inner
            .options
            .fs
            .create_new(&path)
            .map_err(io_err("create", &path))?;
        // Its directory entry: the next sync, before its frames count. (The
        // entry of the one before is durable, above: with both waiting, a
        // crash could keep this one and lose that, a gap.)
        writer.dir_unsynced = true;
        writer.active = file.into();
        writer.allocated = 0;
        writer.synced_last = std::mem::take(&mut writer.unsynced);
        writer.segments.push(Segment::empty(path, next_first));
        Ok(())
    }

    /// Decodes a replicated batch expected to start at `first`.
    pub(crate) fn decode_replicated(raw: &Bytes, first: u64) -> Result<Vec<Frame>, WalError> {
        frame::decode_all(raw, first).map_err(|(_, e)| match e {
            FrameError::Discontinuity { expected, found } => WalError::OutOfOrder {
                expected,
                got: found,
            },
            other => WalError::Frame(other),
        })
    }

    /// Appends `raw`, already decoded into `frames`; the first LSN is checked
    /// again under the lock.
    pub(crate) fn append_decoded(&self, raw: &Bytes, frames: &[Frame]) -> Result<(), WalError> {
        let Some(first) = frames.first() else {
            return Ok(());
        };
        let mut writer = self.writer();
        if first.lsn != writer.head + 1 {
            return Err(WalError::OutOfOrder {
                expected: writer.head + 1,
                got: first.lsn,
            });
        }
        self.record_epochs(&mut writer, frames.iter().map(|f| (f.lsn, f.epoch)))?;
        let lens: Vec<usize> = frames.iter().map(Frame::encoded_len).collect();
        self.write_encoded(&mut writer, first.lsn, &lens, Some(raw))
    }
}
