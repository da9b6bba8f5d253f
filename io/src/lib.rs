//! # walship-io
//!
//! Storage and IO for walship. It knows nothing of the recovery engine: LSNs
//! and epochs are plain integers here.
//!
//! - [`frame`]: the checksummed WAL frame format (on disk and on the wire);
//! - [`Wal`]: segmented WAL with group commit, crash recovery, retention pins;

pub mod frame;
mod pins;
mod segment;
mod wal;

pub use frame::{Frame, FrameError, FrameKind, BLOCK_SIZE};
pub use pins::{PinInfo, WalPin};
pub use wal::{
    sync_dir, PinReport, PinStats, ReadChunk, RecoveryReport, RecycleReport, RetentionReport,
    SyncMode, Wal, WalError, WalOptions,
};
