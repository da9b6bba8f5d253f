//! The runtime's errors.

use walship_engine::{BarrierFailure, EngineError};
use walship_io::{ReaderError, StoreError, WalError, WireError};

/// A volume operation that failed.
#[derive(Debug, thiserror::Error)]
pub enum VolumeError {
    /// The store refused.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The engine refused.
    #[error(transparent)]
    Engine(#[from] EngineError),
    /// The log reader could not start.
    #[error(transparent)]
    Reader(#[from] ReaderError),
    /// The barrier failed; the write is not committed under the volume's mode.
    #[error("barrier failed: {0}")]
    Barrier(BarrierFailure),
    /// The operation needs a primary.
    #[error("this volume is a replica")]
    NotPrimary,
    /// The volume's actor has stopped.
    #[error("volume actor stopped")]
    Stopped,
    /// The WAL refused writes after a failed sync.
    #[error("volume poisoned: {0}")]
    Poisoned(String),
    /// A primary must open in an epoch newer than any its WAL holds. One
    /// reopened in the same epoch after a crash could write new data at LSNs
    /// it had shipped to replicas but lost itself, and no handshake could
    /// tell the two apart.
    #[error(
        "epoch {assigned} is not newer than epoch {wal} already in the WAL: a primary that opens needs a new epoch from its control plane"
    )]
    EpochNotNewer {
        /// The epoch the primary was given.
        assigned: u64,
        /// The newest epoch its WAL holds.
        wal: u64,
    },
    /// An online verify of this volume is under way: one at a time.
    #[error("a verify of this volume is under way: one at a time")]
    VerifyRunning,
    /// The store holds part of an image (a rebuild in place a crash cut):
    /// its extent mixes two states and its log is not to be trusted.
    #[error("the store holds part of an image at {image_lsn} (an interrupted rebuild): it cannot serve; open it as a replica to finish its rebuild, or peer (PrimaryConfig::peering) to recover a replica's image first")]
    PartialImage {
        /// The image's LSN.
        image_lsn: u64,
    },
    /// Peering found a replica that follows a newer assignment: this
    /// primary must not serve.
    #[error("replica {replica} accepted term {term}, newer than this primary's epoch: it follows a newer assignment")]
    Superseded {
        /// The replica.
        replica: String,
        /// The term it accepted.
        term: u64,
    },
    /// Peering could not recover what a replica holds and this primary lacks.
    #[error("peering: recovering from {replica} failed: {reason}")]
    PeeringFailed {
        /// The replica.
        replica: String,
        /// Why.
        reason: String,
    },
    /// The primary is still peering with its replicas: a request waited
    /// as long as a barrier would, and nothing was served.
    #[error("the primary is peering with its replicas before it serves: {0}")]
    Peering(String),
    /// The primary did not open (peering or its store failed); the
    /// volume's log says why.
    #[error("the primary did not open: {0}")]
    OpenFailed(String),
    /// A replica of the primary's config whose server name cannot name a
    /// replica (empty, or with a `/`).
    #[error("replica: {0}")]
    InvalidReplica(String),
    /// Starting the runtime or a listener failed.
    #[error("runtime: {0}")]
    Runtime(String),
}

/// Why an executor or connection stopped.
#[derive(Debug, thiserror::Error)]
pub enum ExecError {
    /// The socket failed or the peer sent bytes that do not decode.
    #[error("wire: {0}")]
    Wire(#[from] WireError),
    /// The peer closed the connection.
    #[error("peer closed the connection")]
    Closed,
    /// The peer went silent.
    #[error("peer silent for {0:?}")]
    Timeout(std::time::Duration),
    /// The peer refused.
    #[error("peer error {code}: {message}")]
    Peer {
        /// Code.
        code: u16,
        /// Message.
        message: String,
    },
    /// The peer is in a newer epoch: we are fenced.
    #[error("fenced by peer epoch {0}")]
    Fenced(u64),
    /// The peer broke the protocol.
    #[error("protocol: {0}")]
    Protocol(String),
    /// Reading the WAL failed.
    #[error(transparent)]
    Reader(#[from] ReaderError),
    /// Reading the WAL failed.
    #[error(transparent)]
    Wal(#[from] WalError),
    /// Reading the image failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The executor state machine refused.
    #[error(transparent)]
    Executor(#[from] walship_engine::ExecutorError),
}

impl ExecError {
    /// Whether the replica said its storage failed (it cannot take writes).
    pub fn is_replica_storage(&self) -> bool {
        matches!(
            self,
            Self::Peer {
                code: walship_io::CODE_STORAGE,
                ..
            }
        )
    }

    /// Whether retrying from a new session cannot help (the replica needs a rebuild).
    pub fn is_unrecoverable(&self) -> bool {
        matches!(
            self,
            Self::Reader(ReaderError::Range(WalError::Recycled { .. }))
                | Self::Wal(WalError::Recycled { .. })
                | Self::Peer {
                    code: walship_io::CODE_TRUNCATE_REFUSED,
                    ..
                }
        )
    }
}
