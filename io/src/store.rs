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
mod checkpoint;
mod delta;
mod open;
mod snapshot;
mod write;
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

    /// The file system it is on.
    fn fs(&self) -> &dyn Fs {
        self.options.fs.as_ref()
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
