//! The file-system seam: every file operation the io crate makes (create,
//! open, positional read and write, pwritev, set_len, fdatasync/fsync,
//! rename, remove, list, mkdir, directory fsync, the store's lock), behind
//! one narrow trait so a test can put a model of the page cache under them.
//!
//! [`RealFs`] is the real file system: one virtual call per file
//! operation, next to a system call (P1 and P4 alternated before and after
//! putting the WAL and the extent on it: docs/BENCHMARKS.md). [`SimFs`]
//! (feature `testing`) keeps what was written in memory and what was made
//! durable apart, so a simulated power loss keeps exactly what a real one
//! may. The WAL ([`WalOptions::fs`](crate::WalOptions::fs)), the store
//! ([`StoreOptions::fs`](crate::StoreOptions::fs)), the extent, the
//! superblock, the epoch history and the run marker all go through the
//! `Fs` they are given. The io_uring reader needs real descriptors: a WAL
//! on another `Fs` is read with positional reads through it.

#[cfg(feature = "testing")]
mod sim;

#[cfg(feature = "testing")]
pub use sim::{Fault, PowerLoss, SimFs};

use std::io::{self, IoSlice};
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::{Arc, OnceLock};

/// A shared [`Fs`], as the options of a WAL or a store hold it.
pub type FsRef = Arc<dyn Fs>;

/// A file opened through an [`Fs`].
pub trait FsFile: Send + Sync + std::fmt::Debug {
    /// Writes all of `buf` at `offset`.
    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()>;
    /// `pwritev`: writes from `bufs` at `offset`, returning how much (a
    /// short write is possible, as with the system call).
    fn write_vectored_at(&self, bufs: &[IoSlice<'_>], offset: u64) -> io::Result<usize> {
        let Some(first) = bufs.iter().find(|b| !b.is_empty()) else {
            return Ok(0);
        };
        self.write_at(first, offset)?;
        Ok(first.len())
    }
    /// Reads into `buf` at `offset`; returns the bytes read (0 at the end).
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<usize>;
    /// Fills `buf` from `offset`; `UnexpectedEof` if the file ends first.
    fn read_exact_at(&self, mut buf: &mut [u8], mut offset: u64) -> io::Result<()> {
        while !buf.is_empty() {
            match self.read_at(buf, offset) {
                Ok(0) => return Err(io::ErrorKind::UnexpectedEof.into()),
                Ok(n) => {
                    buf = &mut buf[n..];
                    offset += n as u64;
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }
    /// Sets the size.
    fn set_len(&self, len: u64) -> io::Result<()>;
    /// The size.
    fn size(&self) -> io::Result<u64>;
    /// fdatasync: the data and the size are durable.
    fn sync_data(&self) -> io::Result<()>;
    /// fsync: as `sync_data`, and the rest of the file's metadata.
    fn sync_all(&self) -> io::Result<()>;
    /// Takes an exclusive advisory lock without waiting (`flock`); whether
    /// it was free. Held until the file is closed.
    fn try_lock(&self) -> io::Result<bool>;
}

/// The operations on names (see the module docs).
pub trait Fs: Send + Sync + std::fmt::Debug {
    /// Creates `path` (or truncates it), for reading and writing.
    fn create(&self, path: &Path) -> io::Result<Box<dyn FsFile>>;
    /// Creates `path` for reading and writing; fails with `AlreadyExists`
    /// if it exists.
    fn create_new(&self, path: &Path) -> io::Result<Box<dyn FsFile>>;
    /// Opens an existing `path` for reading and writing.
    fn open(&self, path: &Path) -> io::Result<Box<dyn FsFile>>;
    /// Opens `path`, creating it if it does not exist; whether it was
    /// created.
    fn open_or_create(&self, path: &Path) -> io::Result<(Box<dyn FsFile>, bool)> {
        match self.open(path) {
            Ok(file) => Ok((file, false)),
            Err(e) if e.kind() == io::ErrorKind::NotFound => match self.create_new(path) {
                Ok(file) => Ok((file, true)),
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => Ok((self.open(path)?, false)),
                Err(e) => Err(e),
            },
            Err(e) => Err(e),
        }
    }
    /// The size of the file at `path`.
    fn len(&self, path: &Path) -> io::Result<u64>;
    /// Whether `path` names a file or a directory.
    fn exists(&self, path: &Path) -> bool {
        self.is_dir(path) || self.len(path).is_ok()
    }
    /// The names in directory `dir` (names that are not UTF-8 are left out:
    /// walship creates none).
    fn list(&self, dir: &Path) -> io::Result<Vec<String>>;
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
    /// Whether this is the real file system (the io_uring reader, which
    /// opens descriptors of its own, may read it).
    fn is_real(&self) -> bool {
        false
    }
}

/// The real file system.
#[derive(Debug, Clone, Copy, Default)]
pub struct RealFs;

/// The real file system, for callers that take a `&dyn Fs`.
pub fn real() -> &'static RealFs {
    static REAL: RealFs = RealFs;
    &REAL
}

/// The real file system, shared: the default of every option that holds
/// an [`FsRef`].
pub fn real_ref() -> FsRef {
    static REAL: OnceLock<FsRef> = OnceLock::new();
    Arc::clone(REAL.get_or_init(|| Arc::new(RealFs)))
}

#[derive(Debug)]
struct RealFile(std::fs::File);

impl FsFile for RealFile {
    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        self.0.write_all_at(buf, offset)
    }
    fn write_vectored_at(&self, bufs: &[IoSlice<'_>], offset: u64) -> io::Result<usize> {
        Ok(rustix::io::pwritev(&self.0, bufs, offset)?)
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<usize> {
        FileExt::read_at(&self.0, buf, offset)
    }
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        FileExt::read_exact_at(&self.0, buf, offset)
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
    fn try_lock(&self) -> io::Result<bool> {
        match self.0.try_lock() {
            Ok(()) => Ok(true),
            Err(std::fs::TryLockError::WouldBlock) => Ok(false),
            Err(std::fs::TryLockError::Error(e)) => Err(e),
        }
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
    fn create_new(&self, path: &Path) -> io::Result<Box<dyn FsFile>> {
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
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
    fn len(&self, path: &Path) -> io::Result<u64> {
        Ok(std::fs::metadata(path)?.len())
    }
    fn list(&self, dir: &Path) -> io::Result<Vec<String>> {
        let mut names = Vec::new();
        for entry in std::fs::read_dir(dir)? {
            if let Ok(name) = entry?.file_name().into_string() {
                names.push(name);
            }
        }
        Ok(names)
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
    fn is_real(&self) -> bool {
        true
    }
}

#[cfg(all(test, feature = "testing"))]
mod tests;
