//! A cluster on loopback (feature `testing`): one primary and its replicas
//! in one process, real files with fsync, real TCP on 127.0.0.1. The system
//! tests, the `walship demo`, the whole-system benchmarks and the examples
//! all build on this one harness.
//!
//! Replicas can be stopped, restarted where they were or on a new port
//! (their endpoint's version then bumps), or promoted to primary of the next
//! epoch. Every wait has a deadline and fails with what it saw and the
//! primary's recovery log. Whatever this module offers beyond the runtime's
//! own API (a sender's mailbox, injected storage failures) exists only for
//! tests and benchmarks, which is why it sits behind the feature.
//!
//! A replica named by the cluster but run by someone else (an impostor, a
//! relay) is an *outsider*: the primary is told its address, the cluster
//! does not start it.

mod cluster;
mod observe;
mod relay;

pub use cluster::{ClusterOptions, LoopbackCluster, Node};
pub use observe::Converged;
pub use relay::Relay;

use crate::{Tuning, VolumeError};
use bytes::Bytes;
use std::fmt;
use std::future::Future;
use std::time::{Duration, Instant};
use walship_io::BLOCK_SIZE;

/// A storage fault a test injects into a volume's WAL (feature `faults`).
#[cfg(feature = "faults")]
#[derive(Debug, Clone, Copy)]
pub enum StorageFault {
    /// The next sync fails with EIO: the WAL is poisoned.
    FailNextSync,
    /// Every sync takes this much longer (zero: as the disk does).
    SlowSyncs(Duration),
}

#[cfg(feature = "faults")]
impl StorageFault {
    pub(crate) fn inject(self, wal: &walship_io::Wal) {
        match self {
            Self::FailNextSync => wal.inject_sync_failure(),
            Self::SlowSyncs(delay) => wal.inject_sync_delay(delay),
        }
    }
}

/// Injects a storage fault into a volume (primary or replica).
#[cfg(feature = "faults")]
#[derive(Debug, actix::Message)]
#[rtype(result = "()")]
pub(crate) struct InjectStorageFault(pub(crate) StorageFault);

/// Ticks of 5 ms, short timeouts and backoffs: recoveries in tests take
/// milliseconds, not the seconds production tuning allows for.
pub fn fast_tuning() -> Tuning {
    use crate::BackoffTuning;
    Tuning {
        tick: Duration::from_millis(5),
        barrier_timeout_ticks: 300,
        pin_reservation_ticks: 400,
        heartbeat_every_ticks: 4,
        connect_timeout: Duration::from_millis(500),
        peer_timeout: Duration::from_secs(2),
        checkpoint_every_lsns: 64,
        network_retry: BackoffTuning {
            first: Duration::from_millis(20),
            max: Duration::from_millis(200),
        },
        storage_retry: BackoffTuning {
            first: Duration::from_millis(200),
            max: Duration::from_secs(2),
        },
        rebuild_retry: BackoffTuning {
            first: Duration::from_millis(50),
            max: Duration::from_millis(500),
        },
        ..Tuning::default()
    }
}

/// One 4 KiB block whose every byte is derived from `seed`.
pub fn block(seed: u64) -> Bytes {
    Bytes::from(vec![(seed % 251) as u8 + 1; BLOCK_SIZE])
}

/// Asks `check` every 10 ms until it answers `Some`, for at most `limit`
/// (a `check` still running at the deadline is dropped); `None` when it
/// never did (the caller fails with what it knows).
pub async fn within<T, Fut>(limit: Duration, mut check: impl FnMut() -> Fut) -> Option<T>
where
    Fut: Future<Output = Option<T>>,
{
    let deadline = Instant::now() + limit;
    loop {
        if let Ok(Some(value)) =
            tokio::time::timeout_at(tokio::time::Instant::from_std(deadline), check()).await
        {
            return Some(value);
        }
        if Instant::now() > deadline {
            return None;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// What went wrong in the harness.
#[derive(thiserror::Error)]
pub enum HarnessError {
    /// A volume operation failed.
    #[error(transparent)]
    Volume(#[from] VolumeError),
    /// The harness's own IO failed: the cluster's directories, a relay's
    /// socket.
    #[error("harness io: {0}")]
    Io(#[from] std::io::Error),
    /// A wait reached its deadline.
    #[error("{what} after {limit:?}\nrecovery log:\n{log}")]
    TimedOut {
        /// What was awaited, and what was seen last.
        what: String,
        /// How long it waited.
        limit: Duration,
        /// The primary's recovery log, one event per line.
        log: String,
    },
    /// The primary has no sender for this replica.
    #[error("the primary has no sender for {0}")]
    NoSender(String),
    /// A name the engine refuses as part of a replica id.
    #[error("replica id: {0}")]
    Name(String),
    /// A handle answered as the other role.
    #[error("{0} answered as the other role")]
    Role(String),
}

// Tests `unwrap()` these: show the message and the log, not a struct dump.
impl fmt::Debug for HarnessError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

/// The harness's results.
pub type Result<T, E = HarnessError> = std::result::Result<T, E>;
