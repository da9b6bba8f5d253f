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
use crate::fs::{Fs, FsFile, FsRef};
use crate::pins::{PinInfo, PinTable, WalPin};
use crate::segment::{self, ScanEnd, Segment};
use bytes::{Bytes, BytesMut};
use std::path::{Path, PathBuf};
#[cfg(feature = "faults")]
use std::sync::atomic::AtomicBool;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use tokio::sync::watch;

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
    /// Opens (or creates) the WAL in `dir`, recovering from a crash: a torn
    /// last frame is cut off and reported; corruption anywhere else is an error
    /// and nothing is truncated.
    pub fn open(
        dir: impl AsRef<Path>,
        options: WalOptions,
    ) -> Result<(Wal, RecoveryReport), WalError> {
        let dir = dir.as_ref().to_path_buf();
        let fs = Arc::clone(&options.fs);
        let fs = fs.as_ref();
        crate::durable::create_dir_all_in(fs, &dir).map_err(io_err("create", &dir))?;
        let mut stale = 0;
        let mut found = Vec::new();
        for name in fs.list(&dir).map_err(io_err("list", &dir))? {
            let Some((generation, first)) = segment::parse_segment_name(&name) else {
                continue;
            };
            if generation > options.generation {
                return Err(WalError::NewerGeneration {
                    expected: options.generation,
                    found: generation,
                });
            }
            let path = dir.join(&name);
            if generation < options.generation {
                fs.remove_file(&path)
                    .map_err(io_err("remove stale", &path))?;
                stale += 1;
                continue;
            }
            found.push((first, path));
        }
        found.sort();
        let stale_history = epochs::remove_others(fs, &dir, options.generation)?;
        if stale > 0 || stale_history {
            fs.sync_dir(&dir).map_err(io_err("sync", &dir))?;
        }
        let (segments, torn, frame_epochs, superseded) =
            Self::scan_all(fs, &found, options.start_after)?;
        let mut segments = segments;
        let mut superseded = superseded;
        // Every frame at or below what the caller already holds: a restart
        // after `start_after` (see `restart_after`) that a crash interrupted.
        if segments
            .last()
            .is_some_and(|s| s.last() < options.start_after)
        {
            superseded.extend(segments.drain(..).map(|s| s.path));
        }
        for path in &superseded {
            fs.remove_file(path)
                .map_err(io_err("remove superseded", path))?;
        }
        if !superseded.is_empty() {
            fs.sync_dir(&dir).map_err(io_err("sync", &dir))?;
        }
        if segments.is_empty() {
            let first = options.start_after + 1;
            let path = dir.join(segment::segment_name(options.generation, first));
            fs.create(&path).map_err(io_err("create", &path))?;
            fs.sync_dir(&dir).map_err(io_err("sync", &dir))?;
            segments.push(Segment::empty(path, first));
        }
        let tail = segments[0].first - 1;
        let head = segments.last().map_or(tail, Segment::last);
        let persisted = epochs::load(fs, &dir, options.generation)?;
        let history = Self::reconcile_epochs(persisted.clone(), tail, head, &frame_epochs)?;
        if history != persisted {
            epochs::store(fs, &dir, options.generation, &history)?;
        }
        let active_path = segments.last().map(|s| s.path.clone()).unwrap_or_default();
        let active: Arc<dyn FsFile> = fs
            .open(&active_path)
            .map_err(io_err("open", &active_path))?
            .into();
        let allocated = active.size().map_err(io_err("stat", &active_path))?;
        // What was found counts as durable from here on: a process that died
        // may have left frames it never synced, and a segment whose entry it
        // never synced. Only the last segments can hold either (a rotation
        // makes the full one durable, and its entry waits for the next sync
        // at most). Rotation skips its sync when everything is durable, so
        // this must be true.
        if options.sync != SyncMode::None {
            let last_frames = segments.iter().rev().find(|s| !s.is_empty());
            if let Some(last) = last_frames.filter(|s| s.path != active_path) {
                let file = fs.open(&last.path).map_err(io_err("open", &last.path))?;
                options
                    .sync
                    .sync(file.as_ref())
                    .map_err(io_err("sync", &last.path))?;
            }
            options
                .sync
                .sync(active.as_ref())
                .map_err(io_err("sync", &active_path))?;
            fs.sync_dir(&dir).map_err(io_err("sync", &dir))?;
        }
        let report = RecoveryReport {
            segments: segments.len(),
            tail,
            head,
            torn_bytes_dropped: torn,
            stale_segments_removed: stale,
            superseded_segments_removed: superseded.len(),
        };
        let (durable_tx, _) = watch::channel(head);
        let wal = Wal {
            inner: Arc::new(Inner {
                dir,
                options,
                writer: Mutex::new(Writer {
                    segments,
                    active,
                    allocated,
                    unsynced: 0,
                    synced_last: 0,
                    head,
                    tail,
                    checkpoint: tail,
                    scratch: BytesMut::new(),
                    epochs: history,
                    dir_unsynced: false,
                }),
                sync: Mutex::new(SyncState {
                    durable: head,
                    ..SyncState::default()
                }),
                synced: Condvar::new(),
                durable_tx,
                pins: Arc::new(PinTable::default()),
                #[cfg(feature = "faults")]
                fail_next_sync: AtomicBool::new(false),
                #[cfg(feature = "faults")]
                sync_delay_us: AtomicU64::new(0),
                syncs: AtomicU64::new(0),
                poison: std::sync::OnceLock::new(),
            }),
        };
        Ok((wal, report))
    }

    /// The history to trust after a crash: persisted entries up to the
    /// tail (their frames may be recycled), then what the frames after the
    /// tail say. Entries for frames a crash took are dropped; frames whose
    /// epoch contradicts the persisted history are an error.
    fn reconcile_epochs(
        mut history: Vec<EpochStart>,
        tail: u64,
        head: u64,
        frame_epochs: &[EpochStart],
    ) -> Result<Vec<EpochStart>, EpochError> {
        epochs::cut_after(&mut history, tail.min(head));
        for start in frame_epochs.iter().filter(|e| e.first_lsn > tail) {
            epochs::note(&mut history, start.first_lsn, start.epoch)?;
        }
        Ok(history)
    }

    /// Scans every segment; cuts a torn tail off the last non-empty one.
    /// Also returns where each run of one epoch starts among the frames
    /// kept, and the segments before a gap that ends at or below
    /// `start_after + 1` (all their frames are held elsewhere; any other gap
    /// is an error).
    #[allow(clippy::type_complexity)]
    fn scan_all(
        fs: &dyn Fs,
        found: &[(u64, PathBuf)],
        start_after: u64,
    ) -> Result<(Vec<Segment>, u64, Vec<EpochStart>, Vec<PathBuf>), WalError> {
        let last_non_empty = found
            .iter()
            .rposition(|(_, path)| fs.len(path).map(|len| len > 0).unwrap_or(true));
        let mut segments: Vec<Segment> = Vec::new();
        let mut superseded = Vec::new();
        let mut torn_bytes = 0;
        let mut runs: Vec<EpochStart> = Vec::new();
        let mut note_run = |frame: &Frame| {
            if runs.last().is_none_or(|run| run.epoch != frame.epoch) {
                runs.push(EpochStart {
                    epoch: frame.epoch,
                    first_lsn: frame.lsn,
                });
            }
        };
        for (index, (first, path)) in found.iter().enumerate() {
            if let Some(previous) = segments.last() {
                if *first != previous.last() + 1 && *first <= start_after + 1 {
                    superseded.extend(segments.drain(..).map(|s| s.path));
                } else if *first != previous.last() + 1 {
                    return Err(WalError::SegmentGap {
                        path: path.clone(),
                        expected: previous.last() + 1,
                        found: *first,
                    });
                }
            }
            let data = Bytes::from(fs.read(path).map_err(io_err("read", path))?);
            let may_be_torn = Some(index) == last_non_empty;
            let (segment, end) = segment::scan(path, *first, &data, may_be_torn, &mut note_run)
                .map_err(|f| WalError::Corrupt {
                    path: path.clone(),
                    offset: f.offset,
                    lsn: f.lsn,
                    error: f.error,
                })?;
            if let ScanEnd::Torn { offset } = end {
                let file = fs.open(path).map_err(io_err("open", path))?;
                file.set_len(offset)
                    .map_err(io_err("truncate torn tail", path))?;
                file.sync_all().map_err(io_err("sync", path))?;
                torn_bytes += segment::torn_bytes(&data, offset);
            }
            segments.push(segment);
        }
        Ok((segments, torn_bytes, runs, superseded))
    }

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
    fn record_epochs(
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

    /// Writes encoded frames (of `lens` bytes, from `first_lsn`) to the active
    /// segment: `raw` as received, or the primary's freshly encoded `scratch`.
    fn write_encoded(
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

    fn rotate(&self, writer: &mut Writer, next_first: u64) -> Result<(), WalError> {
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

    /// Makes a rotated-in segment's directory entry durable (as the sync
    /// mode asks).
    fn sync_dir_after_rotation(&self) -> Result<(), String> {
        if self.inner.options.sync == SyncMode::None {
            return Ok(());
        }
        self.inner
            .options
            .fs
            .sync_dir(&self.inner.dir)
            .map_err(|error| {
                format!(
                    "fsync of {} after a rotation: {error}",
                    self.inner.dir.display()
                )
            })
    }

    fn sync_file(&self, file: &dyn FsFile) -> std::io::Result<()> {
        self.inner.syncs.fetch_add(1, Ordering::Relaxed);
        #[cfg(feature = "faults")]
        {
            if self.inner.fail_next_sync.swap(false, Ordering::SeqCst) {
                return Err(std::io::Error::from_raw_os_error(libc::EIO));
            }
            let delay = self.inner.sync_delay_us.load(Ordering::Relaxed);
            if delay > 0 {
                std::thread::sleep(std::time::Duration::from_micros(delay));
            }
        }
        self.inner.options.sync.sync(file)
    }

    /// Makes the next sync fail with EIO, as a disk error would. For tests of
    /// the poisoning path (feature `faults`).
    #[cfg(feature = "faults")]
    pub fn inject_sync_failure(&self) {
        self.inner.fail_next_sync.store(true, Ordering::SeqCst);
    }

    /// Makes every sync from now on take `delay` longer, as a slow disk
    /// would (zero: as fast as the disk). For tests of what waits on a sync
    /// (feature `faults`).
    #[cfg(feature = "faults")]
    pub fn inject_sync_delay(&self, delay: std::time::Duration) {
        let micros = u64::try_from(delay.as_micros()).unwrap_or(u64::MAX);
        self.inner.sync_delay_us.store(micros, Ordering::Relaxed);
    }

    /// Returns once every LSN up to `lsn` is durable. One caller syncs for all
    /// waiting callers (group commit).
    ///
    /// Lock order is writer → sync everywhere; this function never holds the
    /// sync lock while taking the writer lock.
    pub fn sync_to(&self, lsn: u64) -> Result<u64, WalError> {
        loop {
            let mut state = lock(&self.inner.sync);
            if let Some(reason) = self.inner.poison.get() {
                return Err(WalError::Poisoned(reason.clone()));
            }
            if state.durable >= lsn {
                return Ok(state.durable);
            }
            if state.syncing {
                drop(
                    self.inner
                        .synced
                        .wait(state)
                        .unwrap_or_else(PoisonError::into_inner),
                );
                continue;
            }
            state.syncing = true;
            let truncations = state.truncations;
            drop(state);
            let (target, file, new_segment) = {
                let mut writer = self.writer();
                writer.synced_last = std::mem::take(&mut writer.unsynced);
                let new_segment = std::mem::take(&mut writer.dir_unsynced);
                (writer.head, Arc::clone(&writer.active), new_segment)
            };
            let result = self
                .sync_file(file.as_ref())
                .map_err(|error| format!("fdatasync: {error}"))
                .and_then(|()| match new_segment {
                    true => self.sync_dir_after_rotation(),
                    false => Ok(()),
                });
            let failed = result.err().map(|reason| self.poison(reason));
            let mut state = lock(&self.inner.sync);
            state.syncing = false;
            if failed.is_none() && state.truncations == truncations {
                state.durable = state.durable.max(target);
                self.inner.durable_tx.send_replace(state.durable);
            }
            self.inner.synced.notify_all();
            // Waiters (and this caller, on the next turn) see the poison.
            if failed.is_none() && target < lsn {
                return Err(WalError::BeyondHead {
                    to: lsn,
                    head: target,
                });
            }
        }
    }

    /// Poisons the WAL: a write it does not hold failed to sync (the
    /// store's run of committed frames written to the extent).
    pub(crate) fn poison_now(&self, reason: String) -> WalError {
        self.poison(reason)
    }

    /// Poisons the WAL (the first reason stays) and returns the error that says so.
    fn poison(&self, reason: String) -> WalError {
        let _ = self.inner.poison.set(reason);
        WalError::Poisoned(self.poisoned().unwrap_or_default())
    }

    /// Records the checkpoint: entries up to it are in the extent.
    pub fn set_checkpoint(&self, lsn: u64) {
        let mut writer = self.writer();
        writer.checkpoint = writer.checkpoint.max(lsn.min(writer.head));
    }

    /// Restarts the log after `lsn`, with `history` as its epoch history:
    /// every frame it holds, and everything up to `lsn`, is held elsewhere
    /// (a store applied it to its extent and committed a checkpoint at
    /// `lsn` before calling this). All segments are replaced by an empty one
    /// whose first LSN is `lsn + 1`; head, tail, checkpoint and durable all
    /// become `lsn`.
    ///
    /// Crash-safe with [`WalOptions::start_after`] at `lsn`: whether the new
    /// segment, the old ones, both or neither survive, the next open starts
    /// after `lsn`. Refused while frames after the checkpoint exist, or
    /// while pins hold segments.
    pub fn restart_after(&self, lsn: u64, history: &[EpochStart]) -> Result<(), WalError> {
        let mut writer = self.writer();
        if let Some(reason) = self.inner.poison.get() {
            return Err(WalError::Poisoned(reason.clone()));
        }
        if writer.head > writer.checkpoint || lsn < writer.head {
            return Err(WalError::NotApplied {
                lsn,
                head: writer.head,
                checkpoint: writer.checkpoint,
            });
        }
        let pins = self.inner.pins.len();
        if pins > 0 {
            return Err(WalError::Pinned { pins });
        }
        self.replace_epochs(&mut writer, history)?;
        let already = writer.head == lsn
            && writer.segments.len() == 1
            && writer.segments[0].is_empty()
            && writer.segments[0].first == lsn + 1;
        if !already {
            let path = self.inner.dir.join(segment::segment_name(
                self.inner.options.generation,
                lsn + 1,
            ));
            let file = self.fs().create(&path).map_err(io_err("create", &path))?;
            let old = std::mem::replace(
                &mut writer.segments,
                vec![Segment::empty(path.clone(), lsn + 1)],
            );
            writer.active = file.into();
            writer.allocated = 0;
            writer.unsynced = 0;
            writer.synced_last = 0;
            writer.head = lsn;
            writer.tail = lsn;
            writer.checkpoint = lsn;
            // An empty last segment (a rotation whose write failed) may
            // carry the new one's name: it is the new one now.
            for segment in old.iter().filter(|s| s.path != path) {
                self.fs()
                    .remove_file(&segment.path)
                    .map_err(io_err("remove", &segment.path))?;
            }
        }
        // Every time: a retry after a failed removal finds the switch made,
        // and the new segment's name must still become durable.
        self.sync_wal_dir()?;
        let mut state = lock(&self.inner.sync);
        state.durable = state.durable.max(lsn);
        self.inner.durable_tx.send_replace(state.durable);
        Ok(())
    }

    /// Persists `history` as the epoch history (it may run past the head:
    /// see [`Wal::restart_after`]; an open cuts what the frames do not
    /// reach).
    pub fn store_epochs(&self, history: &[EpochStart]) -> Result<(), WalError> {
        self.replace_epochs(&mut self.writer(), history)
    }

    fn replace_epochs(&self, writer: &mut Writer, history: &[EpochStart]) -> Result<(), WalError> {
        epochs::validate(history)?;
        if history != writer.epochs.as_slice() {
            self.persist_epochs(writer, history.to_vec())?;
        }
        Ok(())
    }

    /// Replaces the persisted epoch history with `history`, then the
    /// writer's.
    fn persist_epochs(
        &self,
        writer: &mut Writer,
        history: Vec<EpochStart>,
    ) -> Result<(), EpochError> {
        let generation = self.inner.options.generation;
        epochs::store(self.fs().as_ref(), &self.inner.dir, generation, &history)?;
        writer.epochs = history;
        Ok(())
    }

    /// Pins the WAL after `lsn`: nothing after it is recycled while the pin lives.
    pub fn pin_from(&self, lsn: u64, label: &str) -> Result<WalPin, WalError> {
        let writer = self.writer();
        if lsn < writer.tail {
            return Err(WalError::PinBelowTail {
                lsn,
                tail: writer.tail,
            });
        }
        Ok(self.inner.pins.add(lsn, label))
    }

    /// Deletes whole segments at or below min(checkpoint, every pin).
    /// The active segment is never deleted.
    pub fn recycle(&self) -> Result<RecycleReport, WalError> {
        // The index changes under the lock; the files go after it is released,
        // so appends never wait on unlink and directory fsync.
        let (removed, report) = {
            let mut writer = self.writer();
            let floor = self
                .inner
                .pins
                .min_from()
                .map_or(writer.checkpoint, |p| p.min(writer.checkpoint));
            let mut report = RecycleReport {
                segments_deleted: 0,
                bytes_freed: 0,
                tail: writer.tail,
                floor,
            };
            let mut removed = Vec::new();
            while writer.segments.len() > 1 && writer.segments[0].last() <= floor {
                let segment = writer.segments.remove(0);
                writer.tail = segment.last();
                report.segments_deleted += 1;
                report.bytes_freed += segment.bytes;
                removed.push(segment.path);
            }
            report.tail = writer.tail;
            (removed, report)
        };
        for path in &removed {
            self.fs()
                .remove_file(path)
                .map_err(io_err("remove", path))?;
        }
        if !removed.is_empty() {
            self.sync_wal_dir()?;
        }
        Ok(report)
    }

    /// Drops every entry after `lsn` (a replica ahead of committed). Refused
    /// below the checkpoint, whose entries are already in the extent.
    pub fn truncate_after(&self, lsn: u64) -> Result<(), WalError> {
        let mut writer = self.writer();
        if let Some(reason) = self.inner.poison.get() {
            return Err(WalError::Poisoned(reason.clone()));
        }
        if lsn < writer.checkpoint {
            return Err(WalError::BelowCheckpoint {
                lsn,
                checkpoint: writer.checkpoint,
            });
        }
        if lsn >= writer.head {
            return Ok(());
        }
        if lsn < writer.tail {
            return Err(WalError::Recycled {
                from: lsn,
                tail: writer.tail,
            });
        }
        // Newest first, each removal durable before the next: a power loss
        // may keep any subset of unsynced removals, and one that kept an
        // older segment's removal but not a newer one's would leave a gap
        // that open refuses.
        while writer.segments.len() > 1 && writer.segments.last().is_some_and(|s| s.first > lsn + 1)
        {
            if let Some(segment) = writer.segments.pop() {
                self.fs()
                    .remove_file(&segment.path)
                    .map_err(io_err("remove", &segment.path))?;
                self.sync_wal_dir()?;
            }
        }
        let Some(segment) = writer.segments.last_mut() else {
            return Err(WalError::Poisoned("no active segment".into()));
        };
        let cut = segment.offset_of(lsn + 1);
        segment.offsets.truncate((lsn + 1 - segment.first) as usize);
        segment.bytes = cut;
        let path = segment.path.clone();
        let file = self.fs().open(&path).map_err(io_err("open", &path))?;
        file.set_len(cut).map_err(io_err("truncate", &path))?;
        file.sync_all().map_err(io_err("sync", &path))?;
        self.sync_wal_dir()?;
        writer.active = file.into();
        writer.allocated = cut;
        writer.head = lsn;
        let mut history = writer.epochs.clone();
        if epochs::cut_after(&mut history, lsn) {
            self.persist_epochs(&mut writer, history)?;
        }
        let mut state = lock(&self.inner.sync);
        state.durable = state.durable.min(lsn);
        state.truncations += 1;
        self.inner.durable_tx.send_replace(state.durable);
        Ok(())
    }

    /// Splits `(from, to]` into reads of whole frames, each at most `chunk_bytes`
    /// (or one frame, if a frame is larger).
    pub fn plan_read(
        &self,
        from: u64,
        to: u64,
        chunk_bytes: usize,
    ) -> Result<Vec<ReadChunk>, WalError> {
        let writer = self.writer();
        if from < writer.tail {
            return Err(WalError::Recycled {
                from,
                tail: writer.tail,
            });
        }
        if to > writer.head {
            return Err(WalError::BeyondHead {
                to,
                head: writer.head,
            });
        }
        let mut chunks = Vec::new();
        for segment in &writer.segments {
            if segment.is_empty() || segment.last() <= from || segment.first > to {
                continue;
            }
            let path = Arc::new(segment.path.clone());
            let mut lsn = (from + 1).max(segment.first);
            let end = to.min(segment.last());
            while lsn <= end {
                let start = segment.offset_of(lsn);
                let limit = start + chunk_bytes as u64;
                // Last frame that ends within the limit; at least one frame.
                let first_index = (lsn - segment.first) as usize;
                let end_index = (end - segment.first) as usize;
                let fits = segment.offsets[first_index + 1..=end_index]
                    .partition_point(|&offset| offset <= limit);
                let mut last = lsn + fits as u64;
                if segment.offset_of(last + 1) > limit && last > lsn {
                    last -= 1;
                }
                let stop = segment.offset_of(last + 1);
                chunks.push(ReadChunk {
                    path: Arc::clone(&path),
                    offset: start,
                    len: (stop - start) as usize,
                    first_lsn: lsn,
                    last_lsn: last,
                });
                lsn = last + 1;
            }
        }
        Ok(chunks)
    }

    /// Reads the encoded frames after `from`, up to `to`, as one buffer of at
    /// most `max_bytes` (at least one frame). Returns the bytes and the last
    /// LSN they hold. Frames are not decoded: whoever applies them checks them.
    pub fn read_raw(&self, from: u64, to: u64, max_bytes: usize) -> Result<(Bytes, u64), WalError> {
        let chunks = self.plan_read(from, to, max_bytes)?;
        let mut buf = BytesMut::new();
        let mut last = from;
        for chunk in chunks {
            if !buf.is_empty() && buf.len() + chunk.len > max_bytes {
                break;
            }
            let file = self
                .fs()
                .open(chunk.path.as_ref())
                .map_err(io_err("open", &chunk.path))?;
            let start = buf.len();
            buf.resize(start + chunk.len, 0);
            file.read_exact_at(&mut buf[start..], chunk.offset)
                .map_err(io_err("read", &chunk.path))?;
            last = chunk.last_lsn;
        }
        Ok((buf.freeze(), last))
    }

    /// Reads `(from, to]` with positional reads on the calling thread.
    pub fn read_frames(&self, from: u64, to: u64) -> Result<Vec<Frame>, WalError> {
        let mut frames = Vec::new();
        for chunk in self.plan_read(from, to, 4 << 20)? {
            frames.extend(self.read_chunk_frames(&chunk)?);
        }
        Ok(frames)
    }

    /// Reads `(from, to]` like [`Wal::read_frames`], handing the frames to
    /// `f` in batches of about `batch_bytes`, so a caller walking a long log
    /// (a checkpoint after a long pause) holds one batch, not the log.
    pub fn read_frames_batched<E: From<WalError>>(
        &self,
        from: u64,
        to: u64,
        batch_bytes: usize,
        mut f: impl FnMut(Vec<Frame>) -> Result<(), E>,
    ) -> Result<(), E> {
        let mut batch = Vec::new();
        let mut bytes = 0;
        for chunk in self.plan_read(from, to, 4 << 20)? {
            batch.extend(self.read_chunk_frames(&chunk)?);
            bytes += chunk.len;
            if bytes >= batch_bytes {
                f(std::mem::take(&mut batch))?;
                bytes = 0;
            }
        }
        if !batch.is_empty() {
            f(batch)?;
        }
        Ok(())
    }

    fn read_chunk_frames(&self, chunk: &ReadChunk) -> Result<Vec<Frame>, WalError> {
        let file = self
            .fs()
            .open(chunk.path.as_ref())
            .map_err(io_err("open", &chunk.path))?;
        let mut buf = vec![0u8; chunk.len];
        file.read_exact_at(&mut buf, chunk.offset)
            .map_err(io_err("read", &chunk.path))?;
        frame::decode_all(&Bytes::from(buf), chunk.first_lsn).map_err(|(lsn, error)| {
            WalError::Corrupt {
                path: chunk.path.to_path_buf(),
                offset: chunk.offset,
                lsn,
                error,
            }
        })
    }

    /// Bytes of retained frames after `lsn`.
    fn bytes_after(writer: &Writer, lsn: u64) -> u64 {
        writer.segments.iter().map(|s| s.bytes_after(lsn)).sum()
    }

    /// Bytes of retained frames after `lsn`: what a pin at `lsn` keeps
    /// from being recycled, at most.
    pub fn retained_after(&self, lsn: u64) -> u64 {
        Self::bytes_after(&self.writer(), lsn)
    }

    /// Retention and pin pressure.
    pub fn retention(&self) -> RetentionReport {
        let writer = self.writer();
        let retained_bytes = Self::bytes_after(&writer, writer.tail);
        let beyond_checkpoint = Self::bytes_after(&writer, writer.checkpoint);
        let pins = self
            .inner
            .pins
            .list()
            .into_iter()
            .map(|pin| {
                let bytes_held =
                    Self::bytes_after(&writer, pin.from).saturating_sub(beyond_checkpoint);
                PinReport { pin, bytes_held }
            })
            .collect();
        let max_bytes = self.inner.options.max_retained_bytes;
        RetentionReport {
            retained_bytes,
            max_bytes,
            over_limit: max_bytes.is_some_and(|max| retained_bytes > max),
            tail: writer.tail,
            checkpoint: writer.checkpoint,
            head: writer.head,
            pins,
        }
    }

    /// Pin table summary.
    pub fn pin_stats(&self) -> PinStats {
        let report = self.retention();
        PinStats {
            count: self.inner.pins.len(),
            oldest_from: report.pins.first().map(|p| p.pin.from),
            bytes_held: report.pins.first().map_or(0, |p| p.bytes_held),
        }
    }
}
