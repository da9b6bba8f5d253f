//! The extent store: the volume's blocks, 4 KiB each, in one file named by
//! generation (`extent.<generation>`). It only reads, writes and syncs;
//! ordering against the WAL is the checkpointer's job.

use crate::frame::{Frame, FrameKind, BLOCK_SIZE};
use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

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

/// One extent file.
#[derive(Debug)]
pub struct ExtentFile {
    path: PathBuf,
    file: File,
    block_count: u64,
}

impl ExtentFile {
    /// Path of the extent file of `generation` in `dir`.
    pub fn path(dir: &Path, generation: u64) -> PathBuf {
        dir.join(format!("extent.{generation}"))
    }

    /// Opens (creating if needed) an extent of `block_count` blocks.
    pub fn open(path: &Path, block_count: u64) -> Result<Self, ExtentError> {
        let io = |op| {
            let path = path.to_path_buf();
            move |source| ExtentError::Io { op, path, source }
        };
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(path)
            .map_err(io("open"))?;
        let size = block_count * BLOCK_SIZE as u64;
        if file.metadata().map_err(io("stat"))?.len() != size {
            file.set_len(size).map_err(io("size"))?;
        }
        Ok(Self {
            path: path.to_path_buf(),
            file,
            block_count,
        })
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
        if data.len() % BLOCK_SIZE != 0 {
            return Err(ExtentError::Unaligned(data.len()));
        }
        self.check(lba, (data.len() / BLOCK_SIZE) as u64)?;
        self.file
            .write_all_at(data, lba * BLOCK_SIZE as u64)
            .map_err(self.io("write"))
    }

    /// Reads `blocks` blocks at `lba`.
    pub fn read(&self, lba: u64, blocks: u64) -> Result<Vec<u8>, ExtentError> {
        self.check(lba, blocks)?;
        let mut buf = vec![0u8; (blocks as usize) * BLOCK_SIZE];
        self.file
            .read_exact_at(&mut buf, lba * BLOCK_SIZE as u64)
            .map_err(self.io("read"))?;
        Ok(buf)
    }

    /// Fills `buf` with raw bytes of the image at `offset` (for snapshot and
    /// base transfer, which recycle their buffers).
    pub fn read_bytes_into(&self, offset: u64, buf: &mut [u8]) -> Result<(), ExtentError> {
        self.file
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

    /// Makes every write durable.
    pub fn sync(&self) -> Result<(), ExtentError> {
        self.file.sync_data().map_err(self.io("sync"))
    }
}
