//! What goes into the engine ([`Input`] and its message types) and what comes
//! out of it ([`Command`]).

use crate::budget::CatchUpBudget;
use crate::commit::{BarrierFailure, CommitMode};
use crate::epochs::EpochStart;
use crate::history::ReplicaLog;
use crate::ids::{BarrierId, Endpoint, Epoch, Lsn, ReplicaId, ResourceId, SessionId, Tick};
use crate::plan::{RecoveryPlan, ResourceGrant, ResourceRequest};
use crate::retention::RetentionBudget;
use crate::retry::RetryPolicy;
use serde::Serialize;

/// Static configuration of one volume's engine.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct EngineConfig {
    /// The volume name; every replica id must be `<volume>/<server>`.
    pub volume: String,
    /// Budget for every catch-up.
    pub budget: CatchUpBudget,
    /// How much WAL, for how long, an away replica's retention hold may keep.
    pub retention: RetentionBudget,
    /// How soon a replica is retried after a failure, per cause.
    pub retry: RetryPolicy,
    /// Ticks the shell has to grant a plan's resources.
    pub pin_reservation_ticks: u64,
    /// Ticks a barrier may wait before it fails.
    pub barrier_timeout_ticks: u64,
    /// Events kept by the recovery log.
    pub log_capacity: usize,
    /// Rebuilds move only what differs, installed in place when that is
    /// safe (see [`crate::delta`]); off, every rebuild is a whole image
    /// into a staging file. Off by default here; the runtime turns it on.
    pub delta_rebuilds: bool,
    /// Rebuilds wait for a slot of the node's (`AwaitRebuildSlot`) before
    /// they pin anything. Off by default here; the runtime turns it on.
    pub rebuild_slots: bool,
    /// When a replica behind counts as not converging, and the steps
    /// taken (see [`crate::converge`]).
    pub convergence: crate::converge::ConvergencePolicy,
}

impl EngineConfig {
    /// Defaults for `volume`: no budget limits (catch-up or retention),
    /// 100-tick pin reservation and barrier timeouts.
    pub fn new(volume: impl Into<String>) -> Self {
        Self {
            volume: volume.into(),
            budget: CatchUpBudget::default(),
            retention: RetentionBudget::default(),
            retry: RetryPolicy::default(),
            pin_reservation_ticks: 100,
            barrier_timeout_ticks: 100,
            log_capacity: 4096,
            delta_rebuilds: false,
            rebuild_slots: false,
            convergence: crate::converge::ConvergencePolicy::default(),
        }
    }
}

/// One replica in an assignment.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ReplicaAssignment {
    /// Stable identity.
    pub id: ReplicaId,
    /// Where it is now.
    pub endpoint: Endpoint,
}

/// The control plane's word on who replicates this volume, in which epoch, how.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Assignment {
    /// Epoch of the assignment; older than the current one is fenced.
    pub epoch: Epoch,
    /// The commit mode.
    pub commit_mode: CommitMode,
    /// The replicas.
    pub replicas: Vec<ReplicaAssignment>,
}

/// The primary WAL's state as the shell sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize)]
pub struct WalState {
    /// Highest LSN written.
    pub head: Lsn,
    /// Last recycled LSN.
    pub tail: Lsn,
    /// Checkpoint LSN.
    pub checkpoint: Lsn,
    /// Whether the checkpoint is backed by a valid superblock.
    pub checkpoint_trusted: bool,
    /// The epoch of the newest entry and the first LSN written in it; a new
    /// one extends the primary's epoch history.
    pub newest_epoch: Option<EpochStart>,
}

/// A replica's answer to the handshake.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct HandshakeReply {
    /// Identity the peer claims.
    pub replica: ReplicaId,
    /// Epoch the peer is in.
    pub epoch: Epoch,
    /// What the peer's log holds: durable LSN, checkpoint, epoch history.
    pub log: ReplicaLog,
}

/// Catch-up progress from an executor.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct CatchUpProgress {
    /// Highest LSN the replica applied and made durable.
    pub applied: Lsn,
    /// Entries shipped since the previous report.
    pub entries: u64,
    /// Payload bytes shipped since the previous report.
    pub bytes: u64,
}

/// Rebuild progress from an executor.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case", tag = "progress")]
pub enum RebuildProgress {
    /// `bytes` of the image transferred in total.
    Transferred {
        /// Total bytes so far.
        bytes: u64,
    },
    /// The image is installed at `at`.
    ImageInstalled {
        /// The image's LSN.
        at: Lsn,
    },
    /// The tail is replayed through `through`.
    TailReplayed {
        /// Highest LSN replayed.
        through: Lsn,
    },
}

/// How an execution failed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case", tag = "failure")]
pub enum ExecutionFailure {
    /// Retry later from a new session (connection reset, peer restart).
    Transient(String),
    /// The replica cannot write (ENOSPC, EIO, a poisoned WAL) and said so:
    /// retry much later.
    ReplicaStorage(String),
    /// The plan cannot succeed (WAL recycled under the reader, truncation refused):
    /// the replica needs a rebuild.
    Unrecoverable(String),
}

/// A replica's durable acknowledgement.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Ack {
    /// Epoch the ack was sent in.
    pub epoch: Epoch,
    /// The replica's contiguous durable LSN.
    pub durable: Lsn,
    /// The barrier this ack answers, if any.
    pub barrier: Option<BarrierId>,
    /// The committed LSN the replica knows (what primaries told it, in
    /// batches and barriers): a barrier resolves only once the replicas
    /// its mode counts know what was committed when it was asked for.
    pub told: Lsn,
}

/// Every input, for [`Engine::handle_batch`](crate::Engine::handle_batch).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Input {
    /// See [`Engine::handle_assignment`](crate::Engine::handle_assignment).
    Assignment(Assignment),
    /// See [`Engine::handle_wal_state`](crate::Engine::handle_wal_state).
    WalState(WalState),
    /// See [`Engine::handle_local_durable`](crate::Engine::handle_local_durable).
    LocalDurable {
        /// Exclusive start.
        from_exclusive: Lsn,
        /// Inclusive end.
        to_inclusive: Lsn,
    },
    /// See [`Engine::handle_connected`](crate::Engine::handle_connected).
    Connected {
        /// Replica.
        replica: ReplicaId,
        /// Session.
        session: SessionId,
    },
    /// See [`Engine::handle_handshake`](crate::Engine::handle_handshake).
    Handshake {
        /// Replica.
        replica: ReplicaId,
        /// Session.
        session: SessionId,
        /// The reply.
        reply: HandshakeReply,
    },
    /// See [`Engine::handle_resources_granted`](crate::Engine::handle_resources_granted).
    ResourcesGranted {
        /// Replica.
        replica: ReplicaId,
        /// Session.
        session: SessionId,
        /// The grants.
        grants: Vec<ResourceGrant>,
    },
    /// See [`Engine::handle_resources_failed`](crate::Engine::handle_resources_failed).
    ResourcesFailed {
        /// Replica.
        replica: ReplicaId,
        /// Session.
        session: SessionId,
        /// Why.
        reason: String,
    },
    /// See [`Engine::handle_truncated`](crate::Engine::handle_truncated).
    Truncated {
        /// Replica.
        replica: ReplicaId,
        /// Session.
        session: SessionId,
        /// Epoch.
        epoch: Epoch,
        /// Last LSN kept.
        to: Lsn,
    },
    /// See [`Engine::handle_catchup_progress`](crate::Engine::handle_catchup_progress).
    CatchUpProgress {
        /// Replica.
        replica: ReplicaId,
        /// Session.
        session: SessionId,
        /// Epoch.
        epoch: Epoch,
        /// Progress.
        progress: CatchUpProgress,
    },
    /// See [`Engine::handle_rebuild_progress`](crate::Engine::handle_rebuild_progress).
    RebuildProgress {
        /// Replica.
        replica: ReplicaId,
        /// Session.
        session: SessionId,
        /// Epoch.
        epoch: Epoch,
        /// Progress.
        progress: RebuildProgress,
    },
    /// See [`Engine::handle_execution_failed`](crate::Engine::handle_execution_failed).
    ExecutionFailed {
        /// Replica.
        replica: ReplicaId,
        /// Session.
        session: SessionId,
        /// What failed.
        failure: ExecutionFailure,
    },
    /// See [`Engine::handle_disconnected`](crate::Engine::handle_disconnected).
    Disconnected {
        /// Replica.
        replica: ReplicaId,
        /// Why.
        failure: ExecutionFailure,
    },
    /// See [`Engine::handle_retry_now`](crate::Engine::handle_retry_now).
    RetryNow {
        /// Replica.
        replica: ReplicaId,
    },
    /// See [`Engine::handle_heartbeat`](crate::Engine::handle_heartbeat).
    Heartbeat {
        /// Replica.
        replica: ReplicaId,
        /// Epoch the replica reports.
        epoch: Epoch,
    },
    /// See [`Engine::handle_ack`](crate::Engine::handle_ack).
    Ack {
        /// Replica.
        replica: ReplicaId,
        /// The ack.
        ack: Ack,
    },
    /// See [`Engine::handle_retention_usage`](crate::Engine::handle_retention_usage).
    RetentionUsage {
        /// WAL bytes each replica's hold keeps.
        usage: Vec<(ReplicaId, u64)>,
    },
    /// See [`Engine::handle_lag`](crate::Engine::handle_lag).
    Lag {
        /// Bytes the volume has ingested in total.
        ingested: u64,
        /// WAL bytes after each replica's durable LSN.
        backlogs: Vec<(ReplicaId, u64)>,
    },
    /// See [`Engine::handle_retention_failed`](crate::Engine::handle_retention_failed).
    RetentionFailed {
        /// Replica.
        replica: ReplicaId,
        /// Why the hold could not be placed.
        reason: String,
    },
}

/// What the engine asks the shell to do. Drained with
/// [`Engine::take_commands`](crate::Engine::take_commands), executed in order.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case", tag = "command")]
pub enum Command {
    /// Connect (or reuse the connection) to `endpoint` for `session`, then
    /// report `handle_connected` and the handshake reply.
    Connect {
        /// Replica.
        replica: ReplicaId,
        /// Session.
        session: SessionId,
        /// Epoch to present.
        epoch: Epoch,
        /// Where.
        endpoint: Endpoint,
    },
    /// Wait for one of the node's rebuild slots for this session's rebuild,
    /// then report `handle_rebuild_slot`; the slot is held until the
    /// session's execution ends (or it is cancelled).
    AwaitRebuildSlot {
        /// Replica.
        replica: ReplicaId,
        /// Session.
        session: SessionId,
    },
    /// Mark, from now on, every region a write applied after `since`
    /// touches, for `replica` (it left sync durable through `since`); then
    /// report the maps (`handle_dirty_maps`).
    TrackDirty {
        /// Replica.
        replica: ReplicaId,
        /// Its durable LSN when it left.
        since: Lsn,
    },
    /// Stop marking for `replica` (in sync again, or removed).
    ForgetDirty {
        /// Replica.
        replica: ReplicaId,
    },
    /// The replica left the assignment: close its connection and drop its sender.
    Disconnect {
        /// Replica.
        replica: ReplicaId,
        /// Why.
        reason: String,
    },
    /// Pin these resources, in order, and report the grants or the failure.
    AcquireResources {
        /// Replica.
        replica: ReplicaId,
        /// Session.
        session: SessionId,
        /// What to pin.
        requests: Vec<ResourceRequest>,
        /// The reservation fails if not granted by then.
        deadline: Tick,
    },
    /// Release these resources now. Each id is named exactly once over the engine's life.
    ReleaseResources {
        /// Replica.
        replica: ReplicaId,
        /// Session that held them.
        session: SessionId,
        /// Resources.
        resources: Vec<ResourceId>,
        /// Why.
        reason: String,
    },
    /// Run the plan with these grants and report progress.
    Execute {
        /// Replica.
        replica: ReplicaId,
        /// Session.
        session: SessionId,
        /// The plan.
        plan: RecoveryPlan,
        /// Its grants.
        grants: Vec<ResourceGrant>,
    },
    /// The session is invalidated (epoch bump, endpoint change, supersede,
    /// removal, escalation): stop whatever it has under way now, whether a
    /// connect, a handshake, a connection held for its plan or the plan
    /// itself, and drop its connection. Emitted for every live session the
    /// engine invalidates, so the shell never compares epochs or endpoints.
    CancelExecution {
        /// Replica.
        replica: ReplicaId,
        /// Session.
        session: SessionId,
        /// Why.
        reason: String,
    },
    /// Ship live WAL traffic to an InSync replica from `from` on.
    StartLiveShipping {
        /// Replica.
        replica: ReplicaId,
        /// Session that brought it in sync.
        session: SessionId,
        /// Epoch to present.
        epoch: Epoch,
        /// The replica holds everything up to here.
        from: Lsn,
    },
    /// Stop live shipping to the replica.
    StopLiveShipping {
        /// Replica.
        replica: ReplicaId,
        /// Why.
        reason: String,
    },
    /// Ask the in-sync replica for a durable ack of everything up to `lsn`
    /// that names `barrier` (after the WAL up to `lsn` is shipped to it).
    SendBarrier {
        /// Replica.
        replica: ReplicaId,
        /// The barrier its ack answers.
        barrier: BarrierId,
        /// What must be durable.
        lsn: Lsn,
        /// The committed LSN to tell it (its ack says it knows it).
        committed: Lsn,
    },
    /// Keep the WAL after `from` for the replica, replacing its previous hold
    /// (place the new one before dropping the old). Report a failure with
    /// `handle_retention_failed`.
    HoldRetention {
        /// Replica.
        replica: ReplicaId,
        /// Exclusive start of the WAL to keep.
        from: Lsn,
    },
    /// Drop the replica's retention hold.
    ReleaseRetention {
        /// Replica.
        replica: ReplicaId,
        /// Why.
        reason: String,
    },
    /// Let the replica's catch-up take from the node's recovery budget
    /// first (its sends do not wait for the rate), or stop.
    BoostRecovery {
        /// Replica.
        replica: ReplicaId,
        /// On or off.
        boost: bool,
    },
    /// Hold the volume's writes to this rate (each write delayed by at
    /// most the shell's bound), or let them go (`None`).
    LimitWrites {
        /// Bytes per second.
        bytes_per_second: Option<u64>,
    },
    /// A barrier finished: committed LSN on success, the failure otherwise.
    ResolveBarrier {
        /// Barrier.
        barrier: BarrierId,
        /// Outcome.
        outcome: Result<Lsn, BarrierFailure>,
    },
}

impl Command {
    /// The replica the command concerns, if any.
    pub fn replica(&self) -> Option<&ReplicaId> {
        match self {
            Self::Connect { replica, .. }
            | Self::Disconnect { replica, .. }
            | Self::TrackDirty { replica, .. }
            | Self::AwaitRebuildSlot { replica, .. }
            | Self::ForgetDirty { replica }
            | Self::AcquireResources { replica, .. }
            | Self::ReleaseResources { replica, .. }
            | Self::Execute { replica, .. }
            | Self::CancelExecution { replica, .. }
            | Self::StartLiveShipping { replica, .. }
            | Self::StopLiveShipping { replica, .. }
            | Self::SendBarrier { replica, .. }
            | Self::HoldRetention { replica, .. }
            | Self::ReleaseRetention { replica, .. }
            | Self::BoostRecovery { replica, .. } => Some(replica),
            Self::ResolveBarrier { .. } | Self::LimitWrites { .. } => None,
        }
    }
}
