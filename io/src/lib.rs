//! # walship-io
//!
//! Storage and IO for walship. It knows nothing of the recovery engine: LSNs
//! and epochs are plain integers here.
//!
//! - [`frame`]: the checksummed WAL frame format (on disk and on the wire);
//! - [`Wal`]: segmented WAL with group commit, crash recovery, retention pins;
//! - [`LogReader`]: frame batches from io_uring or positional reads;
//! - [`Store`]: extent + superblock + WAL, checkpointer, snapshots, base install;
//! - [`WireCodec`]: the replication protocol's messages over TCP;
//! - [`durable`]: directory entries that survive a power loss;
//! - [`fs`]: the file-system seam, and a page-cache model for power-loss tests;
//! - [`inspect()`]: a store directory read without changing it (offline tools).

pub mod durable;
mod epochs;
mod extent;
pub mod frame;
pub mod fs;
pub mod handles;
mod inspect;
mod pins;
mod reader;
pub mod regions;
mod segment;
mod store;
mod superblock;
mod wal;
mod wire;

pub use epochs::{EpochError, EpochStart, MAX_EPOCHS};
pub use extent::{ApplyStats, ExtentError, ExtentFile, COALESCE_BYTES};
pub use frame::{Frame, FrameError, FrameKind, BLOCK_SIZE};
pub use inspect::{inspect, Inspection, SegmentReport};
pub use pins::{PinInfo, WalPin};
pub use reader::{
    probe_uring, Backend, BackendChoice, BackendRequest, FrameBatch, FrameStream, LogReader,
    ReaderError, ReaderOptions, ReaderService, ReaderStats,
};
pub use store::{
    BaseInstall, CheckpointOutcome, ContentAt, InPlaceInstall, PartialImage, SnapshotPin, Store,
    StoreError, StoreOptions, StoreReport, DIRECT_MIN_BYTES,
};
pub use superblock::{Superblock, SuperblockError};
pub use wal::{
    plan as plan_wal_open, OpenPlan, PinReport, PinStats, ReadChunk, RecoveryReport, RecycleReport,
    RetentionReport, SyncMode, TornTail, Wal, WalError, WalOptions,
};
pub use wire::{
    Envelope, ImageKind, Install, Message, WireCodec, WireError, CODE_BASE, CODE_IDENTITY,
    CODE_OUT_OF_ORDER, CODE_STORAGE, CODE_STORE, CODE_SUPERSEDED, CODE_TRUNCATE_REFUSED,
    CODE_UNEXPECTED, CODE_WIRE, DEFAULT_MAX_FRAME, PROTOCOL_VERSION,
};
