//! The file-system seam: the operations walship's durable metadata uses
//! (create, open, positional read and write, set_len, fdatasync/fsync,
//! rename, remove, mkdir, directory fsync), behind one narrow trait so a
//! test can put a model of the page cache under them.
//!
//! [`RealFs`] is the real file system; the functions that take a `&dyn Fs`
//! cost one virtual call per file operation, on metadata paths only
//! (superblock, epoch history, directories, assignment). [`SimFs`] (feature
//! `testing`) keeps what was written in memory and what was made durable
//! apart, so a simulated power loss keeps exactly what a real one may.
//!
//! Not yet behind it: WAL segments and the extent (their data path, the
//! io_uring reader's descriptors). Until they are, a power loss is modelled
//! for the metadata files alone.

#[cfg(feature = "testing")]
mod sim;

#[cfg(feature = "testing")]
pub use sim::{Fault, PowerLoss, SimFs};

use std::io;
use std::os::unix::fs::FileExt;
use std::path::Path;

/// A file opened through an [`Fs`].
pub trait FsFile: Send + Sync + std::fmt::Debug {
    /// Writes all of `buf` at `offset`.
    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()>;
    /// Reads into `buf` at `offset`; returns the bytes read (0 at the end).
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<usize>;
    /// Sets the size.
    fn set_len(&self, len: u64) -> io::Result<()>;
    /// The size.
    fn size(&self) -> io::Result<u64>;
    /// fdatasync: the data and the size are durable.
    fn sync_data(&self) -> io::Result<()>;
    /// fsync: as `sync_data`, and the rest of the file's metadata.
    fn sync_all(&self) -> io::Result<()>;
}

/// The operations on names (see the module docs).
pub trait Fs: Send + Sync + std::fmt::Debug {
    /// Creates `path` (or truncates it), for reading and writing.
    fn create(&self, path: &Path) -> io::Result<Box<dyn FsFile>>;
    /// Opens an existing `path` for reading and writing.
    fn open(&self, path: &Path) -> io::Result<Box<dyn FsFile>>;
    /// The whole content of `path`.
    fn read(&self, path: &Path) -> io::Result<Vec<u8>>;
    /// Renames `from` to `to`, replacing `to`.
    fn rename(&self, from: &Path, to: &Path) -> io::Result<()>;
    /// Removes a file.
    fn remove_file(&self, path: &Path) -> io::Result<()>;
    /// Creates one directory (its parent exists).
    fn create_dir(&self, path: &Path) -> io::Result<()>;
    /// Whether `path` is a directory.
    fn is_dir(&self, path: &Path) -> bool;
    /// fsync of a directory: the entries created, renamed and removed in
    /// it are durable.
    fn sync_dir(&self, path: &Path) -> io::Result<()>;
}

/// The real file system.
#[derive(Debug, Clone, Copy, Default)]
pub struct RealFs;

/// The real file system, for callers that take a `&dyn Fs`.
pub fn real() -> &'static RealFs {
    static REAL: RealFs = RealFs;
    &REAL
}

#[derive(Debug)]
struct RealFile(std::fs::File);

impl FsFile for RealFile {
    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        self.0.write_all_at(buf, offset)
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<usize> {
        FileExt::read_at(&self.0, buf, offset)
    }
    fn set_len(&self, len: u64) -> io::Result<()> {
        self.0.set_len(len)
    }
    fn size(&self) -> io::Result<u64> {
        Ok(self.0.metadata()?.len())
    }
    fn sync_data(&self) -> io::Result<()> {
        self.0.sync_data()
    }
    fn sync_all(&self) -> io::Result<()> {
        self.0.sync_all()
    }
}

impl Fs for RealFs {
    fn create(&self, path: &Path) -> io::Result<Box<dyn FsFile>> {
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(path)?;
        Ok(Box::new(RealFile(file)))
    }
    fn open(&self, path: &Path) -> io::Result<Box<dyn FsFile>> {
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(path)?;
        Ok(Box::new(RealFile(file)))
    }
    fn read(&self, path: &Path) -> io::Result<Vec<u8>> {
        std::fs::read(path)
    }
    fn rename(&self, from: &Path, to: &Path) -> io::Result<()> {
        std::fs::rename(from, to)
    }
    fn remove_file(&self, path: &Path) -> io::Result<()> {
        std::fs::remove_file(path)
    }
    fn create_dir(&self, path: &Path) -> io::Result<()> {
        match std::fs::create_dir(path) {
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists && path.is_dir() => Ok(()),
            other => other,
        }
    }
    fn is_dir(&self, path: &Path) -> bool {
        path.is_dir()
    }
    fn sync_dir(&self, path: &Path) -> io::Result<()> {
        std::fs::File::open(path)?.sync_all()
    }
}

#[cfg(all(test, feature = "testing"))]
mod tests;
