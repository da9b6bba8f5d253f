//! A node's local volume: WAL + extent + superblock, and the checkpointer.
//!
//! Directory layout: `superblock`, `extent.<generation>`, `wal/`; `RUN`
//! while committed frames written straight to the extent are not yet
//! recorded.
//!
//! - Writes go to the WAL; the newest version of every block written since
//!   the checkpoint is kept in a dirty map, so reads return the latest data
//!   even for blocks still only in the WAL.
//! - [`Store::checkpoint`] applies WAL frames in LSN order to the extent,
//!   fsyncs it, commits the superblock, then lets retention advance. A crash
//!   at any point reopens to the same content: re-applying frames is
//!   idempotent and the superblock is replaced atomically.
//! - Snapshots: a [`SnapshotPin`] **pauses the checkpointer** while it lives,
//!   so the extent file stays exactly at the pin's LSN and is read in chunks
//!   while writes continue into the WAL (which the pin also retains).
//! - A replica installs a base into a staging file; the switch is the atomic
//!   superblock commit that names the new generation. Extent files and WAL
//!   segments of other generations are removed on open.
//! - A replica's large batches of committed frames skip the WAL and go
//!   straight to the extent, recorded as a checkpoint at the next sync (see
//!   [`Store::apply_replicated`]); a crash before that starts a replica over
//!   empty on open.

use crate::epochs::{self, EpochStart};
use crate::extent::{check_range, ExtentError, ExtentFile};
use crate::frame::{Frame, FrameKind, BLOCK_SIZE};
use crate::fs::{Fs, FsFile, FsRef};
use crate::pins::WalPin;
use crate::superblock::{new_uuid, Superblock, SuperblockError};
use crate::wal::{RecycleReport, SyncMode, Wal, WalError, WalOptions};
use bytes::{Bytes, BytesMut};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, RwLock, RwLockReadGuard, RwLockWriteGuard};
use std::time::{Duration, Instant};

mod at_lsn;
mod delta;
pub use at_lsn::ContentAt;
pub use delta::{InPlaceInstall, PartialImage};

/// Store configuration.
#[derive(Debug, Clone)]
pub struct StoreOptions {
    /// Volume size in 4 KiB blocks.
    pub block_count: u64,
    /// WAL segment size.
    pub segment_bytes: u64,
    /// WAL durability.
    pub sync: SyncMode,
    /// Retained WAL bytes above which retention reports pressure.
    pub max_retained_bytes: Option<u64>,
    /// How long [`Store::open`] waits for another instance on the same
    /// directory (one stopping, whose last checkpoint is still running) to
    /// let go before failing with [`StoreError::Locked`].
    pub lock_wait: Duration,
    /// Whether the store locks its directory (`LOCK`, one descriptor held
    /// while open). A node that hosts thousands of stores turns it off and
    /// holds one lock on the directory above them all instead; it must
    /// then never open one store twice at once itself.
    pub lock: bool,
    /// What [`Store::open`] does with a run of committed frames a crash
    /// interrupted (see [`Store::apply_replicated`]): its extent may hold
    /// some of the run's blocks past its checkpoint, data no LSN it reports
    /// accounts for. `true` (a replica): start over empty, a new generation
    /// with nothing applied, and be sent everything again. `false`: refuse
    /// ([`StoreError::InterruptedRun`]); such a store must not serve as a
    /// primary.
    pub reset_interrupted_run: bool,
    /// The file system under it: the real one, or a model of the page
    /// cache in power-loss tests (see [`fs`](crate::fs)).
    pub fs: FsRef,
}

impl StoreOptions {
    /// Defaults for a volume of `block_count` blocks.
    pub fn new(block_count: u64) -> Self {
        Self {
            block_count,
            segment_bytes: 64 << 20,
            sync: SyncMode::Data,
            max_retained_bytes: None,
            lock_wait: Duration::from_secs(10),
            lock: true,
            reset_interrupted_run: false,
            fs: crate::fs::real_ref(),
        }
    }
}

/// A store operation that failed.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// WAL failure.
    #[error(transparent)]
    Wal(#[from] WalError),
    /// Extent failure.
    #[error(transparent)]
    Extent(#[from] ExtentError),
    /// Superblock failure.
    #[error(transparent)]
    Superblock(#[from] SuperblockError),
    /// The volume on disk has another size than configured.
    #[error("volume has {on_disk} blocks, configured {configured}")]
    SizeMismatch {
        /// Blocks on disk.
        on_disk: u64,
        /// Blocks configured.
        configured: u64,
    },
    /// A crash interrupted a run of committed frames written straight to
    /// the extent: it may hold blocks past the checkpoint (see
    /// [`StoreOptions::reset_interrupted_run`]).
    #[error("a crash interrupted committed frames written to the extent after {checkpoint}: it may hold blocks past its checkpoint; open it as a replica to start over, or rebuild it")]
    InterruptedRun {
        /// The checkpoint the run started from.
        checkpoint: u64,
    },
    /// Base chunks must arrive in order.
    #[error("base chunk at offset {got}, expected {expected}")]
    ChunkOutOfOrder {
        /// Offset expected.
        expected: u64,
        /// Offset received.
        got: u64,
    },
    /// The base is not complete.
    #[error("base incomplete: {received} of {expected} bytes")]
    BaseIncomplete {
        /// Bytes received.
        received: u64,
        /// Bytes expected.
        expected: u64,
    },
    /// The received base does not match the sender's checksum.
    #[error("base checksum mismatch: sender {expected:#010x}, received {actual:#010x}")]
    BaseChecksum {
        /// Sender's crc.
        expected: u32,
        /// Crc of what arrived.
        actual: u32,
    },
    /// The content at `lsn` cannot be read: it is before the checkpoint the
    /// extent is pinned at, or past what is durable.
    #[error("no content at lsn {lsn}: the extent is at {checkpoint}, durable through {durable}")]
    NotAt {
        /// Asked for.
        lsn: u64,
        /// The pinned checkpoint.
        checkpoint: u64,
        /// The durable LSN.
        durable: u64,
    },
    /// The extent is pinned (a snapshot: a rebuild or a verify reads it),
    /// so what was asked cannot change it now; ask again once it is not.
    #[error("the extent is pinned by {pins} reader(s) (a rebuild or a verify): try again once they are done")]
    Pinned {
        /// Pins held.
        pins: usize,
    },
    /// Another open store holds the directory.
    #[error("store {0} is in use by another instance")]
    Locked(PathBuf),
    /// A filesystem call failed.
    #[error("store {op} {path}: {source}")]
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

impl StoreError {
    /// Whether the local storage failed (an OS error such as ENOSPC or EIO,
    /// a WAL poisoned by one, damaged files), as opposed to input the store
    /// refused (an out-of-order frame or chunk, a bad checksum, a range
    /// outside the volume). A node whose storage failed cannot take writes
    /// until someone frees space or replaces the disk.
    pub fn is_storage_failure(&self) -> bool {
        match self {
            Self::Wal(error) => error.is_storage_failure(),
            Self::Extent(error) => matches!(error, ExtentError::Io { .. }),
            Self::Superblock(_)
            | Self::Io { .. }
            | Self::SizeMismatch { .. }
            | Self::InterruptedRun { .. } => true,
            Self::ChunkOutOfOrder { .. }
            | Self::NotAt { .. }
            | Self::Pinned { .. }
            | Self::BaseIncomplete { .. }
            | Self::BaseChecksum { .. }
            | Self::Locked(_) => false,
        }
    }
}

fn io_err(op: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> StoreError {
    let path = path.to_path_buf();
    move |source| StoreError::Io { op, path, source }
}

/// What opening found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoreReport {
    /// Whether the store was created now.
    pub created: bool,
    /// The trusted checkpoint.
    pub checkpoint: u64,
    /// WAL head.
    pub head: u64,
    /// Torn bytes the WAL cut off.
    pub torn_bytes_dropped: u64,
    /// Frames replayed into the dirty map.
    pub replayed_frames: u64,
    /// A crash had interrupted a run of committed frames written straight
    /// to the extent after this checkpoint, and the store started over
    /// empty ([`StoreOptions::reset_interrupted_run`]).
    pub reset_after_interrupted_run: Option<u64>,
    /// A dirty maps file was found and not used (damaged, or of another
    /// generation): why. Rebuilds it would have served compare checksums.
    pub dirty_maps_dropped: Option<String>,
}

/// What a checkpoint did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CheckpointOutcome {
    /// Frames `(from, to]` are in the extent and the superblock says so.
    Done {
        /// Previous checkpoint.
        from: u64,
        /// New checkpoint.
        to: u64,
        /// Retention pass after it.
        recycled: RecycleReport,
    },
    /// Nothing new was durable.
    UpToDate,
    /// Snapshot pins are held; the checkpointer is paused.
    Paused {
        /// Pins held.
        pins: usize,
    },
}

#[derive(Debug, Clone)]
struct DirtyBlock {
    lsn: u64,
    data: Bytes,
}

/// The smallest replicated batch whose committed frames go straight to the
/// extent (see [`Store::apply_replicated`]): catch-ups ship batches of up to
/// a MiB; a live stream's small batches stay in the WAL, whose one sync
/// per ack is cheaper than recording a checkpoint.
pub const DIRECT_MIN_BYTES: usize = 256 << 10;

/// Present while a run of committed frames written straight to the extent
/// is not yet recorded: the checkpoint it started from (u64, little-endian)
/// and the crc32c of those 8 bytes.
const RUN_MARKER: &str = "RUN";
const RUN_MARKER_TMP: &str = "RUN.tmp";

/// The committed floor a replica persisted: the highest LSN a primary told
/// it was committed (see [`Store::raise_committed_floor`]), u64 and crc32c
/// as in the run marker.
const COMMITTED_FLOOR: &str = "COMMITTED";

fn encode_run_marker(from: u64) -> [u8; 12] {
    let lsn = from.to_le_bytes();
    let mut bytes = [0u8; 12];
    bytes[..8].copy_from_slice(&lsn);
    bytes[8..].copy_from_slice(&crc32c::crc32c(&lsn).to_le_bytes());
    bytes
}

/// The checkpoint a marker names; `None` if a crash cut its write.
pub(crate) fn decode_run_marker(bytes: &[u8]) -> Option<u64> {
    let (from, crc) = (bytes.get(..8)?, bytes.get(8..12)?);
    (bytes.len() == 12 && crc32c::crc32c(from).to_le_bytes() == crc)
        .then(|| u64::from_le_bytes(from.try_into().unwrap_or_default()))
}

/// Committed frames a replica wrote straight to its extent, not yet
/// recorded by a checkpoint.
#[derive(Debug)]
struct DirectRun {
    /// The last LSN written.
    last: u64,
    /// The WAL's epoch history with these frames' epochs noted.
    epochs: Vec<EpochStart>,
}

#[derive(Debug)]
struct State {
    superblock: Superblock,
    extent: Arc<ExtentFile>,
    wal: Wal,
}

/// One node's volume. Share it in an `Arc`.
#[derive(Debug)]
pub struct Store {
    dir: PathBuf,
    options: StoreOptions,
    state: RwLock<State>,
    dirty: Mutex<BTreeMap<u64, DirtyBlock>>,
    /// Committed frames written straight to the extent since the last
    /// checkpoint (see [`Store::apply_replicated`]). Lock order: this, then
    /// `checkpointing`, then the state.
    direct: Mutex<Option<DirectRun>>,
    snapshot_pins: Arc<AtomicUsize>,
    checkpointing: Mutex<()>,
    /// The committed floor persisted (0: none).
    committed_floor: Mutex<u64>,
    /// Dirty maps of away replicas (a primary's; see `delta`). Lock
    /// order: `checkpointing`, then this.
    dirty_maps: Mutex<delta::Maps>,
    /// An install in place under way or interrupted (a replica's).
    partial: Arc<Mutex<Option<PartialImage>>>,
    /// The extent may hold frames up to this LSN past its checkpoint (a
    /// crash cut a checkpoint between its extent writes and its
    /// superblock): the WAL's head at open, until a checkpoint reaches it.
    extent_ahead: std::sync::atomic::AtomicU64,
    /// The directory's `LOCK` file, locked for the life of this instance: two
    /// instances on one directory would checkpoint and recycle under each
    /// other (one deleting segments the other still lists). `None` when
    /// the store's owner holds a lock over many stores instead.
    _lock: Option<Box<dyn FsFile>>,
}

fn zero_block() -> Bytes {
    static ZEROS: [u8; BLOCK_SIZE] = [0; BLOCK_SIZE];
    Bytes::from_static(&ZEROS)
}

impl Store {
    /// Opens the store in `dir`, creating it if empty.
    pub fn open(
        dir: impl AsRef<Path>,
        options: StoreOptions,
    ) -> Result<(Store, StoreReport), StoreError> {
        let dir = dir.as_ref().to_path_buf();
        let fs = options.fs.as_ref();
        crate::durable::create_dir_all_in(fs, &dir).map_err(io_err("create", &dir))?;
        let lock = match options.lock {
            true => Some(Self::lock(fs, &dir, options.lock_wait)?),
            false => None,
        };
        let (superblock, created) = match Superblock::load_in(fs, &dir) {
            Ok(sb) => (sb, false),
            Err(SuperblockError::Missing(_)) => {
                let uuid = new_uuid().map_err(io_err("uuid", Path::new("/dev/urandom")))?;
                let sb = Superblock {
                    uuid,
                    block_count: options.block_count,
                    checkpoint: 0,
                    epoch: 0,
                    generation: 1,
                };
                sb.store_in(fs, &dir)?;
                (sb, true)
            }
            Err(e) => return Err(e.into()),
        };
        if superblock.block_count != options.block_count {
            return Err(StoreError::SizeMismatch {
                on_disk: superblock.block_count,
                configured: options.block_count,
            });
        }
        let (superblock, reset_after_interrupted_run) =
            Self::settle_interrupted_run(fs, &dir, superblock, options.reset_interrupted_run)?;
        Self::settle_in_place_rename(fs, &dir, superblock.generation)?;
        Self::remove_other_extents(fs, &dir, superblock.generation)?;
        let extent = ExtentFile::open_in(
            Arc::clone(&options.fs),
            &ExtentFile::path(&dir, superblock.generation),
            options.block_count,
        )?;
        // A WAL that ends below the checkpoint restarts after it: committed
        // frames written straight to the extent, then the checkpoint, and a
        // crash before the WAL followed (see `apply_replicated`).
        let (wal, recovery) = Wal::open(dir.join("wal"), Self::wal_options(&options, &superblock))?;
        wal.set_checkpoint(superblock.checkpoint);
        let store = Store {
            dir,
            options,
            state: RwLock::new(State {
                superblock,
                extent: Arc::new(extent),
                wal,
            }),
            dirty: Mutex::new(BTreeMap::new()),
            direct: Mutex::new(None),
            snapshot_pins: Arc::new(AtomicUsize::new(0)),
            committed_floor: Mutex::new(0),
            dirty_maps: Mutex::new(delta::Maps::default()),
            partial: Arc::new(Mutex::new(None)),
            extent_ahead: std::sync::atomic::AtomicU64::new(
                match recovery.head > superblock.checkpoint {
                    true => recovery.head,
                    false => 0,
                },
            ),
            checkpointing: Mutex::new(()),
            _lock: lock,
        };
        *store.floor() = Self::load_committed_floor(store.fs(), &store.dir)?;
        let dirty_maps_dropped = store.load_dirty_maps()?;
        store.load_partial()?;
        let replayed_frames = store.rebuild_dirty()?;
        let report = StoreReport {
            created,
            checkpoint: superblock.checkpoint,
            head: recovery.head,
            torn_bytes_dropped: recovery.torn_bytes_dropped,
            replayed_frames,
            reset_after_interrupted_run,
            dirty_maps_dropped,
        };
        Ok((store, report))
    }

    /// Deals with the marker of a run of committed frames written straight
    /// to the extent. A run is live if the marker names the checkpoint
    /// still committed: the crash came before the run was recorded, and
    /// its blocks may be in the extent. Frames sent again would rewrite
    /// them only if they are the same frames; after a failover they need
    /// not be, and blocks the new primary never writes would keep the old
    /// run's data. So a replica starts over: a new generation, empty, with
    /// nothing applied (its epoch kept), committed before the marker goes.
    /// A marker whose run was recorded (or whose own write a crash cut:
    /// nothing was written to the extent before it was synced) just goes.
    fn settle_interrupted_run(
        fs: &dyn Fs,
        dir: &Path,
        superblock: Superblock,
        reset: bool,
    ) -> Result<(Superblock, Option<u64>), StoreError> {
        let tmp = dir.join(RUN_MARKER_TMP);
        if fs.exists(&tmp) {
            fs.remove_file(&tmp).map_err(io_err("remove", &tmp))?;
        }
        let path = dir.join(RUN_MARKER);
        let marked = match fs.read(&path) {
            Ok(bytes) => decode_run_marker(&bytes),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok((superblock, None)),
            Err(e) => return Err(io_err("read", &path)(e)),
        };
        let mut settled = (superblock, None);
        if marked == Some(superblock.checkpoint) {
            if !reset {
                return Err(StoreError::InterruptedRun {
                    checkpoint: superblock.checkpoint,
                });
            }
            let next = Superblock {
                generation: superblock.generation + 1,
                checkpoint: 0,
                ..superblock
            };
            // What an install a crash cut before its commit left of the
            // next generation must not be taken for it.
            let staging = dir.join(format!("extent.{}.staging", next.generation));
            for leftover in [ExtentFile::path(dir, next.generation), staging] {
                if fs.exists(&leftover) {
                    fs.remove_file(&leftover)
                        .map_err(io_err("remove", &leftover))?;
                }
            }
            let wal_dir = dir.join("wal");
            if fs.is_dir(&wal_dir) {
                epochs::remove_others(fs, &wal_dir, superblock.generation)
                    .map_err(WalError::from)?;
            }
            next.store_in(fs, dir)?;
            settled = (next, Some(superblock.checkpoint));
        }
        fs.remove_file(&path).map_err(io_err("remove", &path))?;
        fs.sync_dir(dir).map_err(io_err("sync", dir))?;
        Ok(settled)
    }

    /// Locks `dir/LOCK` exclusively, waiting up to `wait` for a previous
    /// instance (the lock is the kernel's: a crashed process holds nothing).
    fn lock(fs: &dyn Fs, dir: &Path, wait: Duration) -> Result<Box<dyn FsFile>, StoreError> {
        let path = dir.join("LOCK");
        let (file, _) =
            crate::durable::open_or_create_in(fs, &path).map_err(io_err("create", &path))?;
        let deadline = Instant::now() + wait;
        loop {
            match file.try_lock() {
                Ok(true) => return Ok(file),
                Ok(false) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(5));
                }
                Ok(false) => return Err(StoreError::Locked(dir.to_path_buf())),
                Err(e) => return Err(io_err("lock", &path)(e)),
            }
        }
    }

    fn wal_options(options: &StoreOptions, superblock: &Superblock) -> WalOptions {
        WalOptions {
            segment_bytes: options.segment_bytes,
            sync: options.sync,
            generation: superblock.generation,
            start_after: superblock.checkpoint,
            max_retained_bytes: options.max_retained_bytes,
            fs: Arc::clone(&options.fs),
            ..WalOptions::default()
        }
    }

    fn remove_other_extents(fs: &dyn Fs, dir: &Path, generation: u64) -> Result<(), StoreError> {
        let keep = format!("extent.{generation}");
        let mut removed = false;
        for name in fs.list(dir).map_err(io_err("list", dir))? {
            if name.starts_with("extent.") && name != keep {
                let path = dir.join(&name);
                fs.remove_file(&path).map_err(io_err("remove", &path))?;
                removed = true;
            }
        }
        if removed {
            fs.sync_dir(dir).map_err(io_err("sync", dir))?;
        }
        Ok(())
    }

    fn read_state(&self) -> RwLockReadGuard<'_, State> {
        self.state.read().unwrap_or_else(PoisonError::into_inner)
    }

    fn write_state(&self) -> RwLockWriteGuard<'_, State> {
        self.state.write().unwrap_or_else(PoisonError::into_inner)
    }

    fn dirty(&self) -> MutexGuard<'_, BTreeMap<u64, DirtyBlock>> {
        self.dirty.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn direct(&self) -> MutexGuard<'_, Option<DirectRun>> {
        self.direct.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Replays `(checkpoint, head]` into the dirty map. Returns the frames replayed.
    fn rebuild_dirty(&self) -> Result<u64, StoreError> {
        let (wal, checkpoint) = {
            let state = self.read_state();
            (state.wal.clone(), state.superblock.checkpoint)
        };
        let frames = wal.read_frames(checkpoint, wal.head())?;
        let mut dirty = self.dirty();
        dirty.clear();
        for frame in &frames {
            Self::note_dirty(&mut dirty, frame);
        }
        Ok(frames.len() as u64)
    }

    fn note_dirty(dirty: &mut BTreeMap<u64, DirtyBlock>, frame: &Frame) {
        let blocks = frame.block_count();
        for i in 0..blocks {
            let data = match frame.kind {
                FrameKind::Write => {
                    let at = i as usize * BLOCK_SIZE;
                    frame.payload.slice(at..at + BLOCK_SIZE)
                }
                _ => zero_block(),
            };
            let entry = dirty.entry(frame.lba + i).or_insert(DirtyBlock {
                lsn: 0,
                data: zero_block(),
            });
            if frame.lsn > entry.lsn {
                *entry = DirtyBlock {
                    lsn: frame.lsn,
                    data,
                };
            }
        }
    }

    fn check_range(&self, lba: u64, blocks: u64) -> Result<(), StoreError> {
        Ok(check_range(lba, blocks, self.options.block_count)?)
    }

    /// The directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The current WAL (a replica's changes when it installs a base).
    pub fn wal(&self) -> Wal {
        self.read_state().wal.clone()
    }

    /// The superblock as last committed.
    pub fn superblock(&self) -> Superblock {
        self.read_state().superblock
    }

    /// Blocks in the volume.
    pub fn block_count(&self) -> u64 {
        self.options.block_count
    }

    /// Snapshot pins held (the checkpointer is paused while this is non-zero).
    pub fn snapshot_pins(&self) -> usize {
        self.snapshot_pins.load(Ordering::Acquire)
    }

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
    fn checkpoint_all(&self, wal: &Wal) -> Result<(), StoreError> {
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
    fn mark_run(&self, from: u64) -> Result<(), StoreError> {
        let path = self.dir.join(RUN_MARKER);
        crate::durable::rewrite_atomic(self.fs(), &self.dir, RUN_MARKER, &encode_run_marker(from))
            .map_err(io_err("replace", &path))
    }

    /// The file system it is on.
    fn fs(&self) -> &dyn Fs {
        self.options.fs.as_ref()
    }

    /// Whether a run of committed frames may start: the extent holds
    /// everything the WAL does (no checkpoint running, none owed) and no
    /// reader holds the WAL or the extent's image.
    fn may_write_direct(&self, wal: &Wal) -> bool {
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
    fn record_direct(&self, direct: &mut Option<DirectRun>) -> Result<(), StoreError> {
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

    /// Applies the WAL up to `up_to` (at most the durable LSN) to the extent,
    /// fsyncs it, commits the superblock and recycles the WAL. A partial
    /// store (an install in place under way) is not checkpointed: its
    /// WAL's frames are not part of what it will hold.
    pub fn checkpoint(&self, up_to: u64) -> Result<CheckpointOutcome, StoreError> {
        self.checkpoint_now(up_to)
    }

    fn checkpoint_now(&self, up_to: u64) -> Result<CheckpointOutcome, StoreError> {
        let _serial = self
            .checkpointing
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        // Looked at under the lock: `begin_in_place` marks the store
        // partial under it too.
        if self.partial().is_some() {
            return Ok(CheckpointOutcome::UpToDate);
        }
        let pins = self.snapshot_pins();
        if pins > 0 {
            return Ok(CheckpointOutcome::Paused { pins });
        }
        let (wal, extent, superblock) = {
            let state = self.read_state();
            (
                state.wal.clone(),
                Arc::clone(&state.extent),
                state.superblock,
            )
        };
        let from = superblock.checkpoint;
        let to = up_to.min(wal.durable());
        if to <= from {
            return Ok(CheckpointOutcome::UpToDate);
        }
        wal.read_frames_batched(from, to, CHECKPOINT_BATCH_BYTES, |frames| {
            extent.apply_all(&frames)?;
            self.mark_dirty(&frames);
            Ok::<_, StoreError>(())
        })?;
        extent.sync()?;
        // The maps cover what the superblock will say the extent holds.
        self.persist_dirty_maps()?;
        let next = Superblock {
            checkpoint: to,
            ..superblock
        };
        next.store_in(self.fs(), &self.dir)?;
        self.write_state().superblock = next;
        wal.set_checkpoint(to);
        if to >= self.extent_ahead.load(Ordering::Acquire) {
            self.extent_ahead.store(0, Ordering::Release);
        }
        self.dirty().retain(|_, block| block.lsn > to);
        let recycled = wal.recycle()?;
        Ok(CheckpointOutcome::Done { from, to, recycled })
    }

    fn load_committed_floor(fs: &dyn Fs, dir: &Path) -> Result<u64, StoreError> {
        let path = dir.join(COMMITTED_FLOOR);
        match fs.read(&path) {
            Ok(bytes) => decode_run_marker(&bytes).ok_or_else(|| {
                let bad = std::io::Error::new(std::io::ErrorKind::InvalidData, "bad checksum");
                io_err("read", &path)(bad)
            }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(0),
            Err(e) => Err(io_err("read", &path)(e)),
        }
    }

    fn floor(&self) -> MutexGuard<'_, u64> {
        self.committed_floor
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// The committed floor last persisted: what a primary told this
    /// replica was committed, as of its last
    /// [`raise_committed_floor`](Self::raise_committed_floor) (0: never).
    pub fn committed_floor(&self) -> u64 {
        *self.floor()
    }

    /// Persists `lsn` as the committed floor if it is higher than the one
    /// persisted and the store is still at `generation` (a job that read
    /// the floor before a base install lowered it is too late), so a
    /// replica that restarts still refuses to truncate below it. Replaced
    /// atomically and durably, one writer at a time.
    pub fn raise_committed_floor(&self, lsn: u64, generation: u64) -> Result<(), StoreError> {
        let mut floor = self.floor();
        if lsn <= *floor || self.superblock().generation != generation {
            return Ok(());
        }
        self.write_committed_floor(&mut floor, lsn)
    }

    /// Persists `lsn` as the committed floor if it is lower than the one
    /// persisted (a base install from a primary whose history ends
    /// below it).
    pub fn lower_committed_floor(&self, lsn: u64) -> Result<(), StoreError> {
        let mut floor = self.floor();
        if lsn >= *floor {
            return Ok(());
        }
        self.write_committed_floor(&mut floor, lsn)
    }

    fn write_committed_floor(&self, floor: &mut u64, lsn: u64) -> Result<(), StoreError> {
        let path = self.dir.join(COMMITTED_FLOOR);
        crate::durable::rewrite_atomic(
            self.fs(),
            &self.dir,
            COMMITTED_FLOOR,
            &encode_run_marker(lsn),
        )
        .map_err(io_err("replace", &path))?;
        *floor = lsn;
        Ok(())
    }

    /// Persists the epoch in the superblock now (fencing must survive restarts).
    pub fn persist_epoch(&self, epoch: u64) -> Result<(), StoreError> {
        let _serial = self
            .checkpointing
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let mut state = self.write_state();
        let next = Superblock {
            epoch,
            ..state.superblock
        };
        next.store_in(self.fs(), &self.dir)?;
        state.superblock = next;
        Ok(())
    }

    /// Drops WAL entries after `lsn` (a replica ahead of committed).
    pub fn truncate_after(&self, lsn: u64) -> Result<(), StoreError> {
        self.record_direct(&mut self.direct())?;
        self.wal().truncate_after(lsn)?;
        self.rebuild_dirty()?;
        Ok(())
    }

    /// Pins the extent image at the current checkpoint (see the module docs).
    pub fn snapshot_pin(&self, label: &str) -> Result<SnapshotPin, StoreError> {
        // No committed frames are written straight to the extent while it is
        // pinned; a run already written is recorded first.
        let mut direct = self.direct();
        self.record_direct(&mut direct)?;
        let _serial = self
            .checkpointing
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let state = self.read_state();
        let lsn = state.superblock.checkpoint;
        let wal_pin = state.wal.pin_from(lsn, label)?;
        self.snapshot_pins.fetch_add(1, Ordering::AcqRel);
        Ok(SnapshotPin {
            lsn,
            extent: Arc::clone(&state.extent),
            image_bytes: self.options.block_count * BLOCK_SIZE as u64,
            gate: Arc::clone(&self.snapshot_pins),
            _wal_pin: wal_pin,
        })
    }

    /// Checkpoints everything durable, then pins that image: a full base at a
    /// known LSN, with the WAL after it retained.
    pub fn full_base_pin(&self, label: &str) -> Result<SnapshotPin, StoreError> {
        let durable = self.wal().durable();
        self.checkpoint(durable)?;
        self.snapshot_pin(label)
    }

    /// A crc32c of the whole readable volume (WAL included), for comparing replicas.
    pub fn content_checksum(&self) -> Result<u32, StoreError> {
        const STEP: u64 = 256;
        let mut crc = 0u32;
        let mut lba = 0;
        while lba < self.options.block_count {
            let blocks = STEP.min(self.options.block_count - lba);
            crc = crc32c::crc32c_append(crc, &self.read(lba, blocks)?);
            lba += blocks;
        }
        Ok(crc)
    }

    /// Starts receiving a base image of this volume's size at `image_lsn`.
    pub fn begin_install(&self, image_lsn: u64) -> Result<BaseInstall, StoreError> {
        let generation = self.read_state().superblock.generation + 1;
        let final_path = ExtentFile::path(&self.dir, generation);
        let staging = self.dir.join(format!("extent.{generation}.staging"));
        let file = self
            .fs()
            .create(&staging)
            .map_err(io_err("create", &staging))?;
        let image_bytes = self.options.block_count * BLOCK_SIZE as u64;
        file.set_len(image_bytes)
            .map_err(io_err("size", &staging))?;
        Ok(BaseInstall {
            file,
            staging,
            final_path,
            generation,
            image_lsn,
            image_bytes,
            received: 0,
            unsynced: 0,
            crc: 0,
        })
    }

    /// Switches to a fully received base: the superblock commit naming the new
    /// generation is the atomic point. The WAL restarts after the image LSN,
    /// with `epochs` (the sender's epoch history up to the image) as its
    /// history, written before the commit so both switch together.
    pub fn commit_install(
        &self,
        install: BaseInstall,
        expected_crc: u32,
        epoch: u64,
        epochs: &[EpochStart],
    ) -> Result<(), StoreError> {
        // The base replaces whatever was written straight to the extent.
        let mut direct = self.direct();
        if install.received != install.image_bytes {
            return Err(StoreError::BaseIncomplete {
                received: install.received,
                expected: install.image_bytes,
            });
        }
        if install.crc != expected_crc {
            let _ = self.fs().remove_file(&install.staging);
            return Err(StoreError::BaseChecksum {
                expected: expected_crc,
                actual: install.crc,
            });
        }
        epochs::validate(epochs).map_err(WalError::from)?;
        let mut history = epochs.to_vec();
        epochs::cut_after(&mut history, install.image_lsn);
        install
            .file
            .sync_all()
            .map_err(io_err("sync", &install.staging))?;
        let fs = self.fs();
        epochs::store(fs, &self.dir.join("wal"), install.generation, &history)
            .map_err(WalError::from)?;
        fs.rename(&install.staging, &install.final_path)
            .map_err(io_err("rename", &install.final_path))?;
        fs.sync_dir(&self.dir).map_err(io_err("sync", &self.dir))?;
        let _serial = self
            .checkpointing
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let mut state = self.write_state();
        let old_extent = state.extent.file_path().to_path_buf();
        let next = Superblock {
            generation: install.generation,
            checkpoint: install.image_lsn,
            epoch,
            ..state.superblock
        };
        next.store_in(fs, &self.dir)?;
        let (wal, _) = Wal::open(
            self.dir.join("wal"),
            Self::wal_options(&self.options, &next),
        )?;
        wal.set_checkpoint(next.checkpoint);
        state.extent = Arc::new(ExtentFile::open_in(
            Arc::clone(&self.options.fs),
            &install.final_path,
            self.options.block_count,
        )?);
        state.wal = wal;
        state.superblock = next;
        self.dirty().clear();
        *direct = None;
        drop(state);
        // Another history now: no map built in the old one holds, and an
        // install in place this one replaced is over.
        self.clear_dirty_maps()?;
        self.clear_partial()?;
        let marker = self.dir.join(RUN_MARKER);
        if fs.exists(&marker) {
            fs.remove_file(&marker).map_err(io_err("remove", &marker))?;
            fs.sync_dir(&self.dir).map_err(io_err("sync", &self.dir))?;
        }
        let _ = fs.remove_file(&old_extent);
        Ok(())
    }
}

/// Keeps the extent image at `lsn` readable, and the WAL after it.
///
/// Dropping it resumes the checkpointer and releases the WAL pin; neither
/// blocks or panics.
#[must_use = "a SnapshotPin releases the image as soon as it is dropped"]
#[derive(Debug)]
pub struct SnapshotPin {
    lsn: u64,
    extent: Arc<ExtentFile>,
    image_bytes: u64,
    gate: Arc<AtomicUsize>,
    _wal_pin: WalPin,
}

impl SnapshotPin {
    /// The LSN the image holds.
    pub fn lsn(&self) -> u64 {
        self.lsn
    }

    /// Size of the image.
    pub fn image_bytes(&self) -> u64 {
        self.image_bytes
    }

    /// Reads `len` bytes of the image at `offset`.
    pub fn read(&self, offset: u64, len: usize) -> Result<Bytes, StoreError> {
        let mut buf = BytesMut::new();
        self.read_into(offset, len, &mut buf)?;
        Ok(buf.freeze())
    }

    /// Reads `len` bytes of the image at `offset` into `buf`, replacing its
    /// contents and reusing its allocation. A transfer that recycles its
    /// buffers touches no fresh memory per chunk: on a VM, fresh pages cost
    /// more than the read itself.
    pub fn read_into(&self, offset: u64, len: usize, buf: &mut BytesMut) -> Result<(), StoreError> {
        // A recycled buffer is overwritten as it is: zeroing it first would
        // touch every byte once more.
        if buf.len() >= len {
            buf.truncate(len);
        } else {
            buf.resize(len, 0);
        }
        self.extent.read_bytes_into(offset, buf)?;
        Ok(())
    }

    /// crc32c of the whole image.
    pub fn checksum(&self) -> Result<u32, StoreError> {
        const STEP: u64 = 1 << 20;
        let mut crc = 0;
        let mut offset = 0;
        let mut buf = BytesMut::new();
        while offset < self.image_bytes {
            let len = STEP.min(self.image_bytes - offset) as usize;
            self.read_into(offset, len, &mut buf)?;
            crc = crc32c::crc32c_append(crc, &buf);
            offset += len as u64;
        }
        Ok(crc)
    }
}

impl Drop for SnapshotPin {
    fn drop(&mut self) {
        self.gate.fetch_sub(1, Ordering::AcqRel);
    }
}

/// A base image being received into a staging file. Dropping it without
/// committing leaves the staging file, which the next open removes.
#[derive(Debug)]
pub struct BaseInstall {
    file: Box<dyn FsFile>,
    staging: PathBuf,
    final_path: PathBuf,
    generation: u64,
    image_lsn: u64,
    image_bytes: u64,
    received: u64,
    /// Bytes written since the last `fdatasync`.
    unsynced: u64,
    crc: u32,
}

/// A checkpoint reads and coalesces the WAL this many bytes at a time: its
/// memory is bounded by this, not by how far the checkpoint is behind.
const CHECKPOINT_BATCH_BYTES: usize = 64 << 20;

/// A base install syncs its staging file every this many bytes, so dirty
/// page cache stays bounded (no writeback throttling stalls for the node's
/// other writers) and the final install sync is short.
const INSTALL_SYNC_BYTES: u64 = 16 << 20;

impl BaseInstall {
    /// Writes the next chunk; chunks arrive in order.
    pub fn write_chunk(&mut self, offset: u64, data: &[u8]) -> Result<(), StoreError> {
        if offset != self.received {
            return Err(StoreError::ChunkOutOfOrder {
                expected: self.received,
                got: offset,
            });
        }
        if offset + data.len() as u64 > self.image_bytes {
            return Err(StoreError::BaseIncomplete {
                received: offset + data.len() as u64,
                expected: self.image_bytes,
            });
        }
        self.file
            .write_at(data, offset)
            .map_err(io_err("write", &self.staging))?;
        self.crc = crc32c::crc32c_append(self.crc, data);
        self.received += data.len() as u64;
        self.unsynced += data.len() as u64;
        if self.unsynced >= INSTALL_SYNC_BYTES {
            self.file
                .sync_data()
                .map_err(io_err("sync", &self.staging))?;
            self.unsynced = 0;
        }
        Ok(())
    }

    /// The image LSN.
    pub fn image_lsn(&self) -> u64 {
        self.image_lsn
    }

    /// Bytes received.
    pub fn received(&self) -> u64 {
        self.received
    }
}
