//! A volume's content as it was at one LSN, while writes go on: the
//! extent pinned at its checkpoint ([`SnapshotPin`]) with the WAL's frames
//! after it, up to that LSN, laid over it. What an online verify compares
//! on every copy, so that neither side's later writes (nor where its
//! checkpointer happens to be) makes two equal copies look different.

use super::{SnapshotPin, Store, StoreError};
use crate::frame::{FrameKind, BLOCK_SIZE};
use crate::regions;
use bytes::Bytes;
use std::collections::BTreeMap;
use std::sync::Arc;

/// The content at `lsn`: a pin of the extent at its checkpoint (at most
/// `lsn`) and the newest version of every block written in `(checkpoint,
/// lsn]`. Dropping it releases the pin (the checkpointer goes on).
#[derive(Debug)]
pub struct ContentAt {
    lsn: u64,
    pin: Arc<SnapshotPin>,
    /// Blocks written after the pin's LSN, up to `lsn`: their last data.
    overlay: BTreeMap<u64, Bytes>,
}

impl Store {
    /// Pins the extent at its checkpoint and reads the frames after it up
    /// to `lsn` (which must be durable and at least the checkpoint), or
    /// takes the `pin` given (it must be this store's, at most `lsn`).
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
        if lsn < from || lsn > durable {
            return Err(StoreError::NotAt {
                lsn,
                checkpoint: from,
                durable,
            });
        }
        let mut overlay = BTreeMap::new();
        if lsn > from {
            // Retained: the pin holds the WAL after its LSN.
            for frame in self.wal().read_frames(from, lsn)? {
                for i in 0..frame.block_count() {
                    let data = match frame.kind {
                        FrameKind::Write => {
                            let at = i as usize * BLOCK_SIZE;
                            frame.payload.slice(at..at + BLOCK_SIZE)
                        }
                        _ => super::zero_block(),
                    };
                    overlay.insert(frame.lba + i, data);
                }
            }
        }
        Ok(ContentAt { lsn, pin, overlay })
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
        for (lba, data) in self.overlay.range(first..end) {
            let at = ((lba - first) * block) as usize;
            buf[at..at + BLOCK_SIZE].copy_from_slice(data);
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
        let end = offset.saturating_add(len).min(self.bytes());
        if region_bytes < BLOCK_SIZE as u64
            || !region_bytes.is_multiple_of(BLOCK_SIZE as u64)
            || !offset.is_multiple_of(region_bytes)
            || offset >= end
        {
            return Err(StoreError::BaseIncomplete {
                received: offset.saturating_add(len),
                expected: self.bytes(),
            });
        }
        let step = (region_bytes.max(1 << 20) / region_bytes) * region_bytes;
        let mut sums = Vec::new();
        let mut at = offset;
        while at < end {
            let n = step.min(end - at);
            self.read_into(at, n, buf)?;
            sums.extend(regions::region_sums(buf, region_bytes));
            at += n;
        }
        Ok(sums)
    }
}
