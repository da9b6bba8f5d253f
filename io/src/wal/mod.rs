//! The segmented write-ahead log.
//!
//! - **Append** assigns LSNs (primary) or checks them (replica), encodes
//!   frames and writes them to the active segment under one lock.
//! - **Group commit**: [`Wal::sync_to`] lets one caller fsync for everyone;
//!   callers arriving while a sync runs wait for it and usually find their LSN
//!   covered. The durable LSN is published on a watch channel.
//! - **Rotation** creates the next segment once the full one is durable: the
//!   group commit has usually got there, else rotation syncs it. The next
//!   sync fsyncs the directory before any frame of the new segment counts
//!   as durable. So a durable LSN never depends on an unsynced older
//!   segment, and the writer seldom waits on a sync (a volume's writer is
//!   the thread its actors share). Open syncs the last segments and the
//!   directory: what it found counts as durable (a process that died may
//!   have left writes nobody synced).
//! - **Poisoning**: after a failed fsync the WAL refuses every write and sync.
//!   The kernel may have dropped the dirty pages, so nothing past the last
//!   good sync is ever acknowledged.
//! - **Retention**: the tail advances to min(checkpoint, every live pin);
//!   [`Wal::recycle`] deletes whole segments below that floor.
//! - **Epoch history**: the first LSN of every epoch the log holds, kept
//!   durably beside the segments (see [`EpochStart`]); an append in a newer
//!   epoch records it before its frame is written, an older epoch is refused.

use crate::epochs::{self, EpochError, EpochStart};
use crate::frame::{self, Frame, FrameError, FrameKind};
use crate::fs::{FsFile, FsRef};
use crate::pins::{PinInfo, PinTable, WalPin};
use crate::segment::{self, Segment};
use bytes::{Bytes, BytesMut};
use std::path::{Path, PathBuf};
#[cfg(feature = "faults")]
use std::sync::atomic::AtomicBool;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use tokio::sync::watch;

mod append;
mod open;
mod plan;
mod read;
mod retention;
mod sync;

pub use plan::{plan, OpenPlan, TornTail};

/// How appends are made durable.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SyncMode {
    /// `fdatasync`.
    Data,
    /// `fsync`.
    Full,
    /// No sync at all: durable means written. For tests and benchmarks only.
    None,
}

impl SyncMode {
    /// Syncs `file` as this mode says.
    fn sync(self, file: &dyn FsFile) -> std::io::Result<()> {
        match self {
            Self::Data => file.sync_data(),
            Self::Full => file.sync_all(),
            Self::None => Ok(()),
        }
    }
}

/// WAL configuration.
#[derive(Debug, Clone)]
pub struct WalOptions {
    /// Target segment size; a segment rotates before it would exceed this.
    pub segment_bytes: u64,
    /// How durability is achieved.
    pub sync: SyncMode,
    /// Generation of this WAL's history (see the segment docs).
    pub generation: u64,
    /// What the caller holds elsewhere (a store: the checkpoint, applied
    /// to the extent). An empty WAL's first LSN is `start_after + 1`; so is
    /// that of one whose frames all lie at or below it, and segments before
    /// a gap that ends there are dropped (see [`Wal::restart_after`]).
    pub start_after: u64,
    /// Retained bytes above which [`Wal::retention`] reports pressure.
    pub max_retained_bytes: Option<u64>,
    /// Zeroes written ahead of small appends, so that most appends overwrite
    /// blocks the file already has (0: never). An append that grows the
    /// file makes its `fdatasync` write the inode and the allocation too;
    /// one into zeroed blocks syncs only its data: measured here for 4 KiB
    /// appends, 170-290 µs and 3-4 context switches per sync growing the
    /// file, 95-130 µs and 2 into zeroes written ahead (fallocate does not
    /// help: its unwritten extents are converted, a metadata write, on each
    /// first write). Only while less than this has been written since the
    /// last sync: bulk writes (a catch-up) extend the file themselves, and
    /// write no byte twice.
    pub zero_ahead: u64,
    /// The file system under it: the real one, or a model of the page
    /// cache in power-loss tests (see [`fs`](crate::fs)).
    pub fs: FsRef,
}

impl Default for WalOptions {
    fn default() -> Self {
        Self {
            segment_bytes: 64 << 20,
            sync: SyncMode::Data,
            generation: 1,
            start_after: 0,
            max_retained_bytes: None,
            zero_ahead: 128 << 10,
            fs: crate::fs::real_ref(),
        }
    }
}

/// What [`Wal`] writes zeroes ahead from.
static ZEROES: [u8; 64 << 10] = [0; 64 << 10];

/// A WAL operation that failed.
#[derive(Debug, thiserror::Error)]
pub enum WalError {
    /// A filesystem call failed.
    #[error("wal {op} {path}: {source}")]
    Io {
        /// What was being done.
        op: &'static str,
        /// The file or directory.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// A frame that is not the last thing in the log is damaged. Nothing was truncated.
    #[error("wal corrupt at {path}:{offset} (lsn {lsn}): {error}")]
    Corrupt {
        /// Segment file.
        path: PathBuf,
        /// Byte offset of the bad frame.
        offset: u64,
        /// LSN expected there.
        lsn: u64,
        /// What was wrong.
        error: FrameError,
    },
    /// Segments do not follow each other.
    #[error("wal segments not contiguous: {path} starts at {found}, expected {expected}")]
    SegmentGap {
        /// The segment.
        path: PathBuf,
        /// LSN expected.
        expected: u64,
        /// LSN its name gives.
        found: u64,
    },
    /// A segment of a newer generation exists than the one being opened.
    #[error("wal holds generation {found} newer than the expected {expected}")]
    NewerGeneration {
        /// Generation requested.
        expected: u64,
        /// Generation found on disk.
        found: u64,
    },
    /// A previous fsync failed; the WAL refuses all writes and syncs.
    #[error("wal poisoned by a failed sync: {0}")]
    Poisoned(String),
    /// A replicated frame does not carry the next LSN.
    #[error("append out of order: expected lsn {expected}, got {got}")]
    OutOfOrder {
        /// Next LSN.
        expected: u64,
        /// LSN offered.
        got: u64,
    },
    /// A frame offered for append is malformed.
    #[error("invalid frame: {0}")]
    Frame(#[from] FrameError),
    /// Truncation below the checkpoint would drop data already in the extent.
    #[error("cannot truncate after {lsn}: checkpoint {checkpoint} is already applied")]
    BelowCheckpoint {
        /// Requested point.
        lsn: u64,
        /// The checkpoint.
        checkpoint: u64,
    },
    /// The range starts below the tail: those entries were recycled.
    #[error("range after {from} was recycled: wal tail is {tail}")]
    Recycled {
        /// Exclusive start requested.
        from: u64,
        /// Current tail.
        tail: u64,
    },
    /// The range ends past the head.
    #[error("range ends at {to}, past the head {head}")]
    BeyondHead {
        /// Inclusive end requested.
        to: u64,
        /// Current head.
        head: u64,
    },
    /// The epoch history refused: an older epoch than the log's newest, or
    /// a history file that cannot be read or written.
    #[error(transparent)]
    Epochs(#[from] EpochError),
    /// [`Wal::restart_after`] refused: frames after the checkpoint are not
    /// held anywhere else, or `lsn` is below the head.
    #[error("cannot restart the wal after {lsn}: head {head}, checkpoint {checkpoint}")]
    NotApplied {
        /// Requested restart point.
        lsn: u64,
        /// The head.
        head: u64,
        /// The checkpoint.
        checkpoint: u64,
    },
    /// [`Wal::restart_after`] refused: readers hold segments it would delete.
    #[error("cannot restart the wal: {pins} pins hold its segments")]
    Pinned {
        /// Live pins.
        pins: usize,
    },
    /// A pin below the tail cannot protect anything.
    #[error("cannot pin from {lsn}: entries up to the tail {tail} are recycled")]
    PinBelowTail {
        /// Requested pin point.
        lsn: u64,
        /// Current tail.
        tail: u64,
    },
}

/// What opening the WAL found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RecoveryReport {
    /// Segments kept.
    pub segments: usize,
    /// First retained LSN minus one.
    pub tail: u64,
    /// Highest LSN.
    pub head: u64,
    /// Bytes cut off a torn last frame.
    pub torn_bytes_dropped: u64,
    /// Segment files of older generations deleted.
    pub stale_segments_removed: usize,
    /// Segment files deleted because every frame in them lies at or below
    /// [`WalOptions::start_after`] (a [`Wal::restart_after`] a crash
    /// interrupted).
    pub superseded_segments_removed: usize,
}

/// What one recycle pass did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RecycleReport {
    /// Segments deleted.
    pub segments_deleted: usize,
    /// Bytes freed.
    pub bytes_freed: u64,
    /// The new tail.
    pub tail: u64,
    /// The floor: min(checkpoint, pins).
    pub floor: u64,
}

/// One pin's share of the retained WAL.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PinReport {
    /// The pin.
    pub pin: PinInfo,
    /// WAL bytes after the pin that the checkpoint alone would not keep.
    pub bytes_held: u64,
}

/// Retention state and pressure.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RetentionReport {
    /// Bytes of retained frames.
    pub retained_bytes: u64,
    /// The configured bound.
    pub max_bytes: Option<u64>,
    /// Whether `retained_bytes` is over the bound.
    pub over_limit: bool,
    /// Tail, checkpoint and head.
    pub tail: u64,
    /// Checkpoint LSN.
    pub checkpoint: u64,
    /// Head LSN.
    pub head: u64,
    /// Pins, oldest LSN first.
    pub pins: Vec<PinReport>,
}

/// Pin table summary.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PinStats {
    /// Live pins.
    pub count: usize,
    /// Lowest pinned LSN.
    pub oldest_from: Option<u64>,
    /// WAL bytes held beyond the checkpoint by the oldest pin.
    pub bytes_held: u64,
}

/// A contiguous part of one segment to read: whole frames only.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReadChunk {
    /// Segment file.
    pub path: Arc<PathBuf>,
    /// Byte offset of the first frame.
    pub offset: u64,
    /// Bytes to read.
    pub len: usize,
    /// LSN of the first frame.
    pub first_lsn: u64,
    /// LSN of the last frame.
    pub last_lsn: u64,
}

struct Writer {
    segments: Vec<Segment>,
    active: Arc<dyn FsFile>,
    /// The active segment file's length: its frames, then zeroes written
    /// ahead (see [`WalOptions::zero_ahead`]).
    allocated: u64,
    /// Bytes written since the last sync began, and between the two
    /// syncs before.
    unsynced: u64,
    synced_last: u64,
    head: u64,
    tail: u64,
    checkpoint: u64,
    scratch: BytesMut,
    /// The epoch history, as persisted in `epochs.<generation>`.
    epochs: Vec<EpochStart>,
    /// A rotation created a segment since the last sync began: the next
    /// sync makes its directory entry durable too.
    dir_unsynced: bool,
}

#[derive(Debug, Default)]
struct SyncState {
    durable: u64,
    syncing: bool,
    /// Bumped by every truncation: a sync that began before one does not
    /// publish its target (the frames it synced may be gone, and others
    /// written at their LSNs since).
    truncations: u64,
}

struct Inner {
    dir: PathBuf,
    options: WalOptions,
    writer: Mutex<Writer>,
    sync: Mutex<SyncState>,
    synced: Condvar,
    durable_tx: watch::Sender<u64>,
    pins: Arc<PinTable>,
    #[cfg(feature = "faults")]
    fail_next_sync: AtomicBool,
    /// Microseconds every sync waits first, as a slow disk would (tests).
    #[cfg(feature = "faults")]
    sync_delay_us: AtomicU64,
    syncs: AtomicU64,
    /// Why the WAL refuses everything, once a sync failed: after a failed
    /// fsync the page cache may have dropped what it could not write, so
    /// nothing written since the last good sync can be trusted. One state,
    /// read by the writer and the sync path alike; the first reason stays.
    poison: std::sync::OnceLock<String>,
}

/// A handle to one WAL. Clones share it.
#[derive(Clone)]
pub struct Wal {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Wal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Wal")
            .field("dir", &self.inner.dir)
            .finish_non_exhaustive()
    }
}

impl WalError {
    /// Whether the disk failed (an OS error, or a WAL poisoned by one)
    /// rather than the input (see [`StoreError::is_storage_failure`](crate::StoreError::is_storage_failure)).
    pub fn is_storage_failure(&self) -> bool {
        match self {
            Self::Io { .. }
            | Self::Poisoned(_)
            | Self::Corrupt { .. }
            | Self::SegmentGap { .. } => true,
            Self::Epochs(error) => {
                matches!(error, EpochError::Io { .. } | EpochError::Corrupt { .. })
            }
            _ => false,
        }
    }
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

fn io_err(op: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> WalError {
    let path = path.to_path_buf();
    move |source| WalError::Io { op, path, source }
}

impl Wal {
    fn writer(&self) -> MutexGuard<'_, Writer> {
        lock(&self.inner.writer)
    }

    /// The directory.
    pub fn dir(&self) -> &Path {
        &self.inner.dir
    }

    /// The file system it is on.
    pub fn fs(&self) -> &FsRef {
        &self.inner.options.fs
    }

    fn sync_wal_dir(&self) -> Result<(), WalError> {
        self.fs()
            .sync_dir(&self.inner.dir)
            .map_err(io_err("sync", &self.inner.dir))
    }

    /// Highest LSN written.
    pub fn head(&self) -> u64 {
        self.writer().head
    }

    /// Last recycled LSN.
    pub fn tail(&self) -> u64 {
        self.writer().tail
    }

    /// Checkpoint LSN recorded for retention.
    pub fn checkpoint(&self) -> u64 {
        self.writer().checkpoint
    }

    /// Highest LSN known durable.
    pub fn durable(&self) -> u64 {
        lock(&self.inner.sync).durable
    }

    /// Number of file syncs issued so far (group commit makes this smaller
    /// than the number of synced appends).
    pub fn sync_count(&self) -> u64 {
        self.inner.syncs.load(Ordering::Relaxed)
    }

    /// Why the WAL is poisoned, if it is.
    pub fn poisoned(&self) -> Option<String> {
        self.inner.poison.get().cloned()
    }

    /// A receiver that sees every new durable LSN.
    pub fn subscribe_durable(&self) -> watch::Receiver<u64> {
        self.inner.durable_tx.subscribe()
    }
}
