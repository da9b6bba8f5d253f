//! A volume's content as it was at one LSN, while writes go on: the
//! extent pinned at its checkpoint ([`SnapshotPin`]) with the WAL's frames
//! after it, up to that LSN, laid over it. What an online verify compares
//! on every copy, so that neither side's later writes (nor where its
//! checkpointer happens to be) makes two equal copies look different.

use super::{SnapshotPin, Store, StoreError};
use crate::frame::{Frame, FrameKind, BLOCK_SIZE};
use crate::regions;
use std::sync::atomic::Ordering;
use std::sync::Arc;

/// The content at `lsn`: a pin of the extent at its checkpoint (at most
/// `lsn`) and the frames in `(checkpoint, lsn]`, laid over it in order when
/// read (a frame, not a block, per entry: a trim of the whole volume is one).
/// Dropping it releases the pin (the checkpointer goes on).
#[derive(Debug)]
pub struct ContentAt {
    lsn: u64,
    pin: Arc<SnapshotPin>,
    frames: Vec<Frame>,
}

impl Store {
    /// The lowest LSN [`content_at`](Self::content_at) can give: the
    /// checkpoint, or past it while the extent may hold frames a crash
    /// caught between a checkpoint's extent writes and its superblock (the
    /// WAL's head at open, until a checkpoint reaches it): the content at a
    /// lower LSN would show those frames' blocks.
    pub fn content_floor(&self) -> u64 {
        self.superblock()
            .checkpoint
            .max(self.extent_ahead.load(Ordering::Acquire))
    }

    /// Pins the extent at its checkpoint and reads the frames after it up
    /// to `lsn` (which must be durable and at least the
    /// [`content_floor`](Self::content_floor)), or takes the `pin` given (it
    /// must be this store's, at most `lsn`).
    pub fn content_at(
        &self,
        lsn: u64,
        pin: Option<Arc<SnapshotPin>>,
        label: &str,
    ) -> Result<ContentAt, StoreError> {
        let pin = match pin {
            Some(pin) => pin,
            None => Arc::new(self.snapshot_pin(label)?),
        };
        let from = pin.lsn();
        let durable = self.wal().durable();
        let floor = from.max(self.extent_ahead.load(Ordering::Acquire));
        if lsn < floor || lsn > durable {
            return Err(StoreError::NotAt {
                lsn,
                checkpoint: floor,
                durable,
            });
        }
        // Retained: the pin holds the WAL after its LSN.
        let frames = match lsn > from {
            true => self.wal().read_frames(from, lsn)?,
            false => Vec::new(),
        };
        Ok(ContentAt { lsn, pin, frames })
    }
}

impl ContentAt {
    /// The LSN it is the content at.
    pub fn lsn(&self) -> u64 {
        self.lsn
    }

    /// The volume's size in bytes.
    pub fn bytes(&self) -> u64 {
        self.pin.image_bytes()
    }

    /// Reads `[offset, offset + len)` (whole blocks) into `buf`.
    pub fn read_into(
        &self,
        offset: u64,
        len: u64,
        buf: &mut bytes::BytesMut,
    ) -> Result<(), StoreError> {
        self.pin.read_into(offset, len as usize, buf)?;
        let block = BLOCK_SIZE as u64;
        let (first, end) = (offset / block, (offset + len).div_ceil(block));
        // In LSN order: the last frame to touch a block wins.
        for frame in &self.frames {
            let (from, to) = (
                frame.lba.max(first),
                (frame.lba + frame.block_count()).min(end),
            );
            if from >= to {
                continue;
            }
            let at = ((from - first) * block) as usize;
            let bytes = ((to - from) * block) as usize;
            match frame.kind {
                FrameKind::Write => {
                    let src = ((from - frame.lba) * block) as usize;
                    buf[at..at + bytes].copy_from_slice(&frame.payload[src..src + bytes]);
                }
                _ => buf[at..at + bytes].fill(0),
            }
        }
        Ok(())
    }

    /// The checksums of the regions in `[offset, offset + len)`.
    pub fn sums(
        &self,
        offset: u64,
        len: u64,
        region_bytes: u64,
        buf: &mut bytes::BytesMut,
    ) -> Result<Vec<u128>, StoreError> {
        sums_in_steps(
            offset,
            len,
            region_bytes,
            self.bytes(),
            buf,
            |at, n, buf| self.read_into(at, n, buf),
        )
    }
}

/// The checksums of the regions in `[offset, offset + len)` (cut at
/// `volume_bytes`), `read` a MiB or so at a time into `buf`: regions of
/// whole blocks, `offset` at a region's start, something to read.
pub(super) fn sums_in_steps(
    offset: u64,
    len: u64,
    region_bytes: u64,
    volume_bytes: u64,
    buf: &mut bytes::BytesMut,
    mut read: impl FnMut(u64, u64, &mut bytes::BytesMut) -> Result<(), StoreError>,
) -> Result<Vec<u128>, StoreError> {
    let end = offset.saturating_add(len).min(volume_bytes);
    if region_bytes < BLOCK_SIZE as u64
        || !region_bytes.is_multiple_of(BLOCK_SIZE as u64)
        || !offset.is_multiple_of(region_bytes)
        || offset >= end
    {
        return Err(StoreError::BaseIncomplete {
            received: offset.saturating_add(len),
            expected: volume_bytes,
        });
    }
    let step = (region_bytes.max(1 << 20) / region_bytes) * region_bytes;
    let mut sums = Vec::with_capacity((end - offset).div_ceil(region_bytes) as usize);
    let mut at = offset;
    while at < end {
        let n = step.min(end - at);
        read(at, n, buf)?;
        sums.extend(regions::region_sums(buf, region_bytes));
        at += n;
    }
    Ok(sums)
}
