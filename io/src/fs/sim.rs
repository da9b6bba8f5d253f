//! A model of a file system under a page cache, for power-loss tests.
//!
//! Every file has what was written (the page cache) and what was made
//! durable (by `sync_data`/`sync_all`); every directory has its entries as
//! they are and as they were when it was last fsynced. A simulated
//! [`power_loss`](SimFs::power_loss) keeps the durable state, and with
//! [`PowerLoss::Seeded`] also a seeded choice of unsynced 4 KiB pages, file
//! sizes and directory entries (a disk may write back any of them, in any
//! order). Any mutating operation can be made to fail ([`Fault`]): with
//! EIO or ENOSPC and no effect, or as the process's death, after which
//! every operation fails until the power loss. Operations are counted, so
//! a test can crash a workload at every boundary in turn.

use super::{Fs, FsFile};
use std::collections::{BTreeMap, BTreeSet};
use std::io::{self, IoSlice};
use std::path::{Component, Path};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

const PAGE: usize = 4096;

/// What a simulated power loss keeps beyond what was made durable.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PowerLoss {
    /// Nothing: every unsynced page, size and directory entry is lost.
    DropUnsynced,
    /// A choice, from this seed, of unsynced pages, sizes and entries.
    Seeded(u64),
}

/// How an injected fault fails its operation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// EIO, and the operation does nothing.
    Eio,
    /// ENOSPC, and the operation does nothing.
    Enospc,
    /// The process dies before the operation: it and every later one fail.
    Crash,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Entry {
    File(usize),
    Dir(usize),
}

/// One file: `data` differs from `durable` only in `dirty_pages` and,
/// if `len_dirty`, in its length (a sync copies only those), except
/// after a failed fsync (see `sync_data`).
#[derive(Debug, Default)]
struct Inode {
    data: Vec<u8>,
    durable: Vec<u8>,
    dirty_pages: BTreeSet<usize>,
    len_dirty: bool,
}

impl Inode {
    /// Sets the length; the pages between the old and the new end change
    /// (cut, or zeroes where a cut had been).
    fn resize(&mut self, len: usize) {
        let (low, high) = (len.min(self.data.len()), len.max(self.data.len()));
        self.dirty_pages.extend(low / PAGE..high.div_ceil(PAGE));
        self.data.resize(len, 0);
        self.len_dirty = true;
    }
}

#[derive(Debug, Default)]
struct Dir {
    entries: BTreeMap<String, Entry>,
    durable: BTreeMap<String, Entry>,
}

#[derive(Debug)]
struct State {
    inodes: Vec<Inode>,
    dirs: Vec<Dir>,
    ops: u64,
    /// Reading operations so far (counted apart: see [`SimFs::inject_read`]).
    reads: u64,
    read_fault: Option<u64>,
    fault: Option<(u64, Fault)>,
    /// The fault the last operation failed with, if one did.
    failed_with: Option<Fault>,
    /// Every mutating operation, in order: what a failing case prints.
    history: Vec<String>,
    crashed: bool,
}

/// The model (see the module docs). Clones share one file system.
#[derive(Debug, Clone)]
pub struct SimFs {
    state: Arc<Mutex<State>>,
}

impl Default for SimFs {
    fn default() -> Self {
        Self::new()
    }
}

/// splitmix64: the seeded choices of a power loss.
fn next(seed: &mut u64) -> u64 {
    *seed = seed.wrapping_add(0x9E37_79B9_7F4A_7C15);
    let mut z = *seed;
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

fn not_found(path: &Path) -> io::Error {
    io::Error::new(
        io::ErrorKind::NotFound,
        format!("{}: not found", path.display()),
    )
}

impl SimFs {
    /// An empty file system: the root directory alone.
    pub fn new() -> Self {
        Self {
            state: Arc::new(Mutex::new(State {
                inodes: Vec::new(),
                dirs: vec![Dir::default()],
                ops: 0,
                reads: 0,
                read_fault: None,
                fault: None,
                failed_with: None,
                history: Vec::new(),
                crashed: false,
            })),
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Mutating operations so far.
    pub fn ops(&self) -> u64 {
        self.lock().ops
    }

    /// The mutating operations so far, numbered, and the power losses:
    /// the history a failing case prints.
    pub fn history(&self) -> Vec<String> {
        self.lock().history.clone()
    }

    /// Makes mutating operation number `op` (counted from the start, see
    /// [`ops`](Self::ops)) fail with `fault`.
    pub fn inject(&self, op: u64, fault: Fault) {
        self.lock().fault = Some((op, fault));
    }

    /// Forgets an injected fault that has not fired (reads' too).
    pub fn clear_fault(&self) {
        let mut state = self.lock();
        state.fault = None;
        state.read_fault = None;
    }

    /// Reading operations (open, read, positional read, size, list) so
    /// far. They are counted apart from the mutating ones, so a test of
    /// writes keeps its boundaries.
    pub fn reads(&self) -> u64 {
        self.lock().reads
    }

    /// Makes reading operation number `read` (see [`reads`](Self::reads))
    /// fail with EIO, as a bad sector would.
    pub fn inject_read(&self, read: u64) {
        self.lock().read_fault = Some(read);
    }

    /// Makes the next mutating operation fail with `fault`, whoever makes
    /// it (nodes sharing the model race for it).
    pub fn inject_next(&self, fault: Fault) {
        let mut state = self.lock();
        state.fault = Some((state.ops + 1, fault));
    }

    /// The process comes back after an injected [`Fault::Crash`] without a
    /// power loss (kill -9): the page cache keeps everything written. A
    /// fault injected for a later operation stays (a workload may restart
    /// its process on purpose before the crash a test scheduled).
    pub fn restart(&self) {
        let mut state = self.lock();
        if state.fault.is_some_and(|(op, _)| op <= state.ops) {
            state.fault = None;
        }
        state.crashed = false;
    }

    /// Whether an injected [`Fault::Crash`] has happened.
    pub fn crashed(&self) -> bool {
        self.lock().crashed
    }

    /// The power goes: what survives is what was durable, and under
    /// [`PowerLoss::Seeded`] a seeded part of what was not. The process is
    /// back (faults cleared).
    /// Returns how many unsynced pages, sizes and directory entries it
    /// dropped (a test that must lose something checks it did).
    pub fn power_loss(&self, mode: PowerLoss) -> usize {
        let mut dropped = 0;
        let mut state = self.lock();
        state.history.push(format!("power loss, {mode:?}"));
        let mut seed = match mode {
            PowerLoss::DropUnsynced => None,
            PowerLoss::Seeded(seed) => Some(seed),
        };
        let mut keep = move || seed.as_mut().is_some_and(|s| next(s) & 1 == 0);
        for dir in &mut state.dirs {
            let names: BTreeSet<String> = dir
                .entries
                .keys()
                .chain(dir.durable.keys())
                .cloned()
                .collect();
            let mut after = BTreeMap::new();
            for name in names {
                let (now, then) = (dir.entries.get(&name), dir.durable.get(&name));
                let survivor = match now != then {
                    true if keep() => now,
                    true => {
                        dropped += 1;
                        then
                    }
                    false => then,
                };
                if let Some(entry) = survivor {
                    after.insert(name, *entry);
                }
            }
            dir.entries = after.clone();
            dir.durable = after;
        }
        for inode in &mut state.inodes {
            let mut data = inode.durable.clone();
            if inode.len_dirty {
                match keep() {
                    true => data.resize(inode.data.len(), 0),
                    false => dropped += 1,
                }
            }
            for &page in &inode.dirty_pages {
                let start = page * PAGE;
                if start >= data.len() {
                    continue;
                }
                if !keep() {
                    dropped += 1;
                    continue;
                }
                let end = (start + PAGE).min(data.len()).min(inode.data.len());
                if start < end {
                    data[start..end].copy_from_slice(&inode.data[start..end]);
                }
            }
            inode.data = data.clone();
            inode.durable = data;
            inode.dirty_pages.clear();
            inode.len_dirty = false;
        }
        state.fault = None;
        state.crashed = false;
        dropped
    }
}

impl State {
    /// Counts a mutating operation and applies an injected fault.
    fn begin(&mut self, op: &str, path: &Path) -> io::Result<()> {
        if self.crashed {
            return Err(io::Error::other("the process died"));
        }
        self.ops += 1;
        self.failed_with = None;
        let fault = match self.fault {
            Some((at, fault)) if at == self.ops => format!(" ({fault:?})"),
            _ => String::new(),
        };
        self.history
            .push(format!("{} {op} {}{fault}", self.ops, path.display()));
        match self.fault {
            Some((op, fault)) if op == self.ops => match fault {
                Fault::Eio => {
                    self.failed_with = Some(Fault::Eio);
                    Err(io::Error::from_raw_os_error(libc::EIO))
                }
                Fault::Enospc => {
                    self.failed_with = Some(Fault::Enospc);
                    Err(io::Error::from_raw_os_error(libc::ENOSPC))
                }
                Fault::Crash => {
                    self.crashed = true;
                    Err(io::Error::other("the process died"))
                }
            },
            _ => Ok(()),
        }
    }

    /// Counts a reading operation and fails it if it was injected to.
    fn begin_read(&mut self) -> io::Result<()> {
        if self.crashed {
            return Err(io::Error::other("the process died"));
        }
        self.reads += 1;
        match self.read_fault == Some(self.reads) {
            true => Err(io::Error::from_raw_os_error(libc::EIO)),
            false => Ok(()),
        }
    }

    /// The directory holding `path`'s last component, and that name.
    fn parent(&self, path: &Path) -> io::Result<(usize, String)> {
        let mut names: Vec<String> = path
            .components()
            .filter_map(|c| match c {
                Component::Normal(name) => Some(name.to_string_lossy().into_owned()),
                _ => None,
            })
            .collect();
        let last = names.pop().ok_or_else(|| not_found(path))?;
        let mut dir = 0;
        for name in names {
            match self.dirs[dir].entries.get(&name) {
                Some(Entry::Dir(next)) => dir = *next,
                _ => return Err(not_found(path)),
            }
        }
        Ok((dir, last))
    }

    fn lookup(&self, path: &Path) -> io::Result<Entry> {
        if path
            .components()
            .all(|c| !matches!(c, Component::Normal(_)))
        {
            return Ok(Entry::Dir(0));
        }
        let (dir, name) = self.parent(path)?;
        self.dirs[dir]
            .entries
            .get(&name)
            .copied()
            .ok_or_else(|| not_found(path))
    }

    fn file(&self, path: &Path) -> io::Result<usize> {
        match self.lookup(path)? {
            Entry::File(inode) => Ok(inode),
            Entry::Dir(_) => Err(io::Error::other(format!("{}: a directory", path.display()))),
        }
    }
}

#[derive(Debug)]
struct SimFile {
    fs: SimFs,
    inode: usize,
    path: std::path::PathBuf,
}

impl FsFile for SimFile {
    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        let mut state = self.fs.lock();
        state.begin(
            "write",
            Path::new(&format!("{} @{offset}+{}", self.path.display(), buf.len())),
        )?;
        let inode = &mut state.inodes[self.inode];
        let (start, end) = (offset as usize, offset as usize + buf.len());
        if inode.data.len() < end {
            inode.resize(end);
        }
        inode.data[start..end].copy_from_slice(buf);
        inode.dirty_pages.extend(start / PAGE..end.div_ceil(PAGE));
        Ok(())
    }

    /// All of `bufs`, as one operation (a real `pwritev` of the extent's
    /// runs is short only at the end of the disk).
    fn write_vectored_at(&self, bufs: &[IoSlice<'_>], offset: u64) -> io::Result<usize> {
        let joined: Vec<u8> = bufs.iter().flat_map(|b| b.iter().copied()).collect();
        self.write_at(&joined, offset)?;
        Ok(joined.len())
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<usize> {
        let mut state = self.fs.lock();
        state.begin_read()?;
        let data = &state.inodes[self.inode].data;
        let start = (offset as usize).min(data.len());
        let n = buf.len().min(data.len() - start);
        buf[..n].copy_from_slice(&data[start..start + n]);
        Ok(n)
    }

    fn set_len(&self, len: u64) -> io::Result<()> {
        let mut state = self.fs.lock();
        state.begin(
            "set_len",
            Path::new(&format!("{} to {len}", self.path.display())),
        )?;
        state.inodes[self.inode].resize(len as usize);
        Ok(())
    }

    fn size(&self) -> io::Result<u64> {
        Ok(self.fs.lock().inodes[self.inode].data.len() as u64)
    }

    fn sync_data(&self) -> io::Result<()> {
        let mut state = self.fs.lock();
        if let Err(error) = state.begin("fsync", &self.path) {
            // Linux after a failed writeback: the dirty pages are marked
            // clean, so a later fsync reports success for what it never
            // wrote (fsyncgate), while reads still see the new bytes until
            // the pages are evicted; a power loss loses them. A caller must
            // not retry an fsync and trust it. (The one place where `data`
            // differs from `durable` outside the dirty pages.)
            if state.failed_with == Some(Fault::Eio) {
                let inode = &mut state.inodes[self.inode];
                inode.dirty_pages.clear();
                inode.len_dirty = false;
            }
            return Err(error);
        }
        let inode = &mut state.inodes[self.inode];
        let len = inode.data.len();
        inode.durable.resize(len, 0);
        for page in std::mem::take(&mut inode.dirty_pages) {
            let (start, end) = (page * PAGE, ((page + 1) * PAGE).min(len));
            if start < end {
                inode.durable[start..end].copy_from_slice(&inode.data[start..end]);
            }
        }
        inode.len_dirty = false;
        Ok(())
    }

    fn sync_all(&self) -> io::Result<()> {
        self.sync_data()
    }

    /// One process uses the model: a lock is always free.
    fn try_lock(&self) -> io::Result<bool> {
        Ok(true)
    }
}

impl Fs for SimFs {
    fn create(&self, path: &Path) -> io::Result<Box<dyn FsFile>> {
        let mut state = self.lock();
        state.begin("create", path)?;
        let (dir, name) = state.parent(path)?;
        let inode = match state.dirs[dir].entries.get(&name) {
            Some(Entry::File(inode)) => {
                let inode = *inode;
                state.inodes[inode].resize(0);
                inode
            }
            Some(Entry::Dir(_)) => {
                return Err(io::Error::other(format!("{}: a directory", path.display())))
            }
            None => {
                state.inodes.push(Inode::default());
                let inode = state.inodes.len() - 1;
                state.dirs[dir].entries.insert(name, Entry::File(inode));
                inode
            }
        };
        Ok(Box::new(SimFile {
            fs: self.clone(),
            inode,
            path: path.to_path_buf(),
        }))
    }

    fn create_new(&self, path: &Path) -> io::Result<Box<dyn FsFile>> {
        if self.lock().lookup(path).is_ok() {
            return Err(io::Error::new(
                io::ErrorKind::AlreadyExists,
                format!("{}: exists", path.display()),
            ));
        }
        self.create(path)
    }

    fn open(&self, path: &Path) -> io::Result<Box<dyn FsFile>> {
        let mut state = self.lock();
        state.begin_read()?;
        let inode = state.file(path)?;
        drop(state);
        Ok(Box::new(SimFile {
            fs: self.clone(),
            inode,
            path: path.to_path_buf(),
        }))
    }

    fn len(&self, path: &Path) -> io::Result<u64> {
        let mut state = self.lock();
        state.begin_read()?;
        let inode = state.file(path)?;
        Ok(state.inodes[inode].data.len() as u64)
    }

    fn list(&self, path: &Path) -> io::Result<Vec<String>> {
        let mut state = self.lock();
        state.begin_read()?;
        match state.lookup(path)? {
            Entry::Dir(dir) => Ok(state.dirs[dir].entries.keys().cloned().collect()),
            Entry::File(_) => Err(io::Error::other(format!(
                "{}: not a directory",
                path.display()
            ))),
        }
    }

    fn read(&self, path: &Path) -> io::Result<Vec<u8>> {
        let mut state = self.lock();
        state.begin_read()?;
        let inode = state.file(path)?;
        Ok(state.inodes[inode].data.clone())
    }

    fn rename(&self, from: &Path, to: &Path) -> io::Result<()> {
        let mut state = self.lock();
        state.begin(
            "rename",
            Path::new(&format!("{} -> {}", from.display(), to.display())),
        )?;
        let (from_dir, from_name) = state.parent(from)?;
        let (to_dir, to_name) = state.parent(to)?;
        let entry = state.dirs[from_dir]
            .entries
            .remove(&from_name)
            .ok_or_else(|| not_found(from))?;
        state.dirs[to_dir].entries.insert(to_name, entry);
        Ok(())
    }

    fn remove_file(&self, path: &Path) -> io::Result<()> {
        let mut state = self.lock();
        state.begin("remove", path)?;
        state.file(path)?;
        let (dir, name) = state.parent(path)?;
        state.dirs[dir].entries.remove(&name);
        Ok(())
    }

    fn create_dir(&self, path: &Path) -> io::Result<()> {
        let mut state = self.lock();
        state.begin("mkdir", path)?;
        match state.lookup(path) {
            Ok(Entry::Dir(_)) => return Ok(()),
            Ok(Entry::File(_)) => {
                return Err(io::Error::new(
                    io::ErrorKind::AlreadyExists,
                    format!("{}: a file", path.display()),
                ))
            }
            Err(_) => {}
        }
        let (dir, name) = state.parent(path)?;
        state.dirs.push(Dir::default());
        let new = state.dirs.len() - 1;
        state.dirs[dir].entries.insert(name, Entry::Dir(new));
        Ok(())
    }

    fn is_dir(&self, path: &Path) -> bool {
        matches!(self.lock().lookup(path), Ok(Entry::Dir(_)))
    }

    fn sync_dir(&self, path: &Path) -> io::Result<()> {
        let mut state = self.lock();
        state.begin("fsync dir", path)?;
        let Entry::Dir(dir) = state.lookup(path)? else {
            return Err(io::Error::other(format!(
                "{}: not a directory",
                path.display()
            )));
        };
        let dir = &mut state.dirs[dir];
        dir.durable = dir.entries.clone();
        Ok(())
    }
}
