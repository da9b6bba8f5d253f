//! The extent store: the volume's blocks, 4 KiB each, in one file named by
//! generation (`extent.<generation>`). It only reads, writes and syncs;
//! ordering against the WAL is the checkpointer's job.

use crate::frame::{Frame, FrameKind, BLOCK_SIZE};
use crate::fs::{FsFile, FsRef};
use crate::handles::Handle;
use bytes::Bytes;
use std::collections::BTreeMap;
use std::io::IoSlice;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// Largest single write [`ExtentFile::apply_all`] issues.
pub const COALESCE_BYTES: usize = 1 << 20;

/// What [`ExtentFile::apply_all`] did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ApplyStats {
    /// Blocks the write frames carried.
    pub frame_blocks: u64,
    /// Blocks written after coalescing (trims not counted).
    pub written_blocks: u64,
    /// Write calls issued, trims included.
    pub write_calls: u64,
}

/// An extent store operation that failed.
#[derive(Debug, thiserror::Error)]
pub enum ExtentError {
    /// The blocks lie outside the volume.
    #[error("blocks {lba}..{end} outside a volume of {block_count} blocks")]
    OutOfRange {
        /// First block.
        lba: u64,
        /// One past the last block.
        end: u64,
        /// Volume size.
        block_count: u64,
    },
    /// Data that is not whole blocks.
    #[error("{0} bytes is not a whole number of 4 KiB blocks")]
    Unaligned(usize),
    /// A filesystem call failed.
    #[error("extent {op} {path}: {source}")]
    Io {
        /// What was being done.
        op: &'static str,
        /// The file.
        path: PathBuf,
        /// OS error.
        #[source]
        source: std::io::Error,
    },
}

/// Checks that `blocks` blocks at `lba` lie inside a volume of `block_count` blocks.
pub(crate) fn check_range(lba: u64, blocks: u64, block_count: u64) -> Result<(), ExtentError> {
    let end = lba.saturating_add(blocks);
    if end > block_count {
        return Err(ExtentError::OutOfRange {
            lba,
            end,
            block_count,
        });
    }
    Ok(())
}

/// One extent file. Its descriptor is open only while the process-wide
/// bound on open extents allows ([`crate::handles`]): an idle volume's
/// extent is closed and opened again on its next use.
#[derive(Debug)]
pub struct ExtentFile {
    path: PathBuf,
    fs: FsRef,
    handle: Arc<Handle>,
    block_count: u64,
}

impl ExtentFile {
    /// Path of the extent file of `generation` in `dir`.
    pub fn path(dir: &Path, generation: u64) -> PathBuf {
        dir.join(format!("extent.{generation}"))
    }

    /// Opens (creating if needed) an extent of `block_count` blocks.
    pub fn open(path: &Path, block_count: u64) -> Result<Self, ExtentError> {
        Self::open_in(crate::fs::real_ref(), path, block_count)
    }

    /// [`ExtentFile::open`] on `fs`.
    pub fn open_in(fs: FsRef, path: &Path, block_count: u64) -> Result<Self, ExtentError> {
        let io = |op| {
            let path = path.to_path_buf();
            move |source| ExtentError::Io { op, path, source }
        };
        let (file, _) = crate::durable::open_or_create_in(fs.as_ref(), path).map_err(io("open"))?;
        let size = block_count * BLOCK_SIZE as u64;
        if file.size().map_err(io("stat"))? != size {
            file.set_len(size).map_err(io("size"))?;
        }
        // The size is metadata that only an fsync of the file makes
        // durable: `store verify` and every read past the old end depend on
        // it, and the first checkpoint may be far away. Synced at every
        // open, since a process that died after setting it may not have.
        file.sync_all().map_err(io("sync"))?;
        let extent = Self {
            path: path.to_path_buf(),
            fs,
            handle: Arc::default(),
            block_count,
        };
        extent.handle.get(|| Ok(file)).map_err(io("open"))?;
        Ok(extent)
    }

    /// The file, opened again if the bound on open extents had closed it.
    fn file(&self) -> Result<Arc<dyn FsFile>, ExtentError> {
        self.handle
            .get(|| self.fs.open(&self.path))
            .map_err(self.io("reopen"))
    }

    /// Whether its descriptor is open now.
    pub fn is_open(&self) -> bool {
        self.handle.is_open()
    }

    /// Blocks in the volume.
    pub fn block_count(&self) -> u64 {
        self.block_count
    }

    /// The file's path.
    pub fn file_path(&self) -> &Path {
        &self.path
    }

    fn check(&self, lba: u64, blocks: u64) -> Result<(), ExtentError> {
        check_range(lba, blocks, self.block_count)
    }

    fn io(&self, op: &'static str) -> impl FnOnce(std::io::Error) -> ExtentError {
        let path = self.path.clone();
        move |source| ExtentError::Io { op, path, source }
    }

    /// Writes whole blocks at `lba`.
    pub fn write(&self, lba: u64, data: &[u8]) -> Result<(), ExtentError> {
        if !data.len().is_multiple_of(BLOCK_SIZE) {
            return Err(ExtentError::Unaligned(data.len()));
        }
        self.check(lba, (data.len() / BLOCK_SIZE) as u64)?;
        self.handle.writing();
        self.file()?
            .write_at(data, lba * BLOCK_SIZE as u64)
            .map_err(self.io("write"))
    }

    /// Reads `blocks` blocks at `lba`.
    pub fn read(&self, lba: u64, blocks: u64) -> Result<Vec<u8>, ExtentError> {
        self.check(lba, blocks)?;
        let mut buf = vec![0u8; (blocks as usize) * BLOCK_SIZE];
        self.file()?
            .read_exact_at(&mut buf, lba * BLOCK_SIZE as u64)
            .map_err(self.io("read"))?;
        Ok(buf)
    }

    /// Fills `buf` with raw bytes of the image at `offset` (for snapshot and
    /// base transfer, which recycle their buffers).
    pub fn read_bytes_into(&self, offset: u64, buf: &mut [u8]) -> Result<(), ExtentError> {
        self.file()?
            .read_exact_at(buf, offset)
            .map_err(self.io("read"))
    }

    /// Applies one WAL frame.
    pub fn apply(&self, frame: &Frame) -> Result<(), ExtentError> {
        match frame.kind {
            FrameKind::Write => self.write(frame.lba, &frame.payload),
            FrameKind::Trim => {
                let count = frame.block_count();
                self.check(frame.lba, count)?;
                let zeros = vec![0u8; BLOCK_SIZE * 256];
                let mut lba = frame.lba;
                let end = frame.lba + count;
                while lba < end {
                    let n = (end - lba).min(256);
                    self.write(lba, &zeros[..n as usize * BLOCK_SIZE])?;
                    lba += n;
                }
                Ok(())
            }
            FrameKind::Barrier => Ok(()),
        }
    }

    /// Applies `frames` in order, the way a checkpoint does: between trims,
    /// only the last write of each block is written, in block order, with
    /// adjacent blocks joined into writes of up to [`COALESCE_BYTES`]. The
    /// result on disk is the same as applying every frame in turn; a hot
    /// block rewritten a hundred times costs one write, and scattered 4 KiB
    /// frames become large sequential writes.
    pub fn apply_all<'a>(
        &self,
        frames: impl IntoIterator<Item = &'a Frame>,
    ) -> Result<ApplyStats, ExtentError> {
        let mut stats = ApplyStats::default();
        let mut latest: BTreeMap<u64, Bytes> = BTreeMap::new();
        for frame in frames {
            match frame.kind {
                FrameKind::Write => {
                    if !frame.payload.len().is_multiple_of(BLOCK_SIZE) {
                        return Err(ExtentError::Unaligned(frame.payload.len()));
                    }
                    let blocks = (frame.payload.len() / BLOCK_SIZE) as u64;
                    self.check(frame.lba, blocks)?;
                    for i in 0..blocks {
                        let at = i as usize * BLOCK_SIZE;
                        latest.insert(frame.lba + i, frame.payload.slice(at..at + BLOCK_SIZE));
                    }
                    stats.frame_blocks += blocks;
                }
                FrameKind::Trim => {
                    // Writes before the trim land first; the trim zeroes on top.
                    self.write_latest(&mut latest, &mut stats)?;
                    self.apply(frame)?;
                    stats.write_calls += frame.block_count().div_ceil(256);
                }
                FrameKind::Barrier => {}
            }
        }
        self.write_latest(&mut latest, &mut stats)?;
        Ok(stats)
    }

    /// Writes the collected blocks in runs of adjacent blocks, each run one
    /// vectored write straight from the blocks' buffers (no copy to join
    /// them).
    fn write_latest(
        &self,
        latest: &mut BTreeMap<u64, Bytes>,
        stats: &mut ApplyStats,
    ) -> Result<(), ExtentError> {
        let mut run: Vec<Bytes> = Vec::new();
        let mut start = 0;
        for (lba, block) in std::mem::take(latest) {
            let next = start + run.len() as u64;
            if !run.is_empty() && (lba != next || run.len() * BLOCK_SIZE >= COALESCE_BYTES) {
                self.write_blocks(start, &run)?;
                stats.write_calls += 1;
                run.clear();
            }
            if run.is_empty() {
                start = lba;
            }
            run.push(block);
            stats.written_blocks += 1;
        }
        if !run.is_empty() {
            self.write_blocks(start, &run)?;
            stats.write_calls += 1;
        }
        Ok(())
    }

    /// Writes `blocks`, one block each and adjacent from `lba`, with
    /// `pwritev` (again for what a short write left). At most
    /// [`COALESCE_BYTES`] of blocks: 256 buffers, within the kernel's 1024.
    fn write_blocks(&self, lba: u64, blocks: &[Bytes]) -> Result<(), ExtentError> {
        if let Some(bad) = blocks.iter().find(|b| b.len() != BLOCK_SIZE) {
            return Err(ExtentError::Unaligned(bad.len()));
        }
        self.check(lba, blocks.len() as u64)?;
        self.handle.writing();
        let file = self.file()?;
        let mut slices: Vec<IoSlice<'_>> = blocks.iter().map(|b| IoSlice::new(b)).collect();
        let mut left = &mut slices[..];
        let mut offset = lba * BLOCK_SIZE as u64;
        while !left.is_empty() {
            let written = file
                .write_vectored_at(left, offset)
                .map_err(self.io("write"))?;
            if written == 0 {
                return Err(self.io("write")(std::io::ErrorKind::WriteZero.into()));
            }
            offset += written as u64;
            IoSlice::advance_slices(&mut left, written);
        }
        Ok(())
    }

    /// Makes every write durable.
    pub fn sync(&self) -> Result<(), ExtentError> {
        let covered = self.handle.syncing();
        self.file()?.sync_data().map_err(self.io("sync"))?;
        self.handle.synced(covered);
        Ok(())
    }
}
