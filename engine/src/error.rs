//! The engine's typed errors. Every refused input gets one of these; the
//! engine's state is unchanged by a refused input unless the variant says so.

use crate::commit::CommitError;
use crate::epochs::EpochOrderError;
use crate::history::HistoryError;
use crate::ids::{Epoch, Lsn, ReplicaId, SessionId};
use crate::rebuild::RebuildError;
use crate::session::PhaseError;

/// An input the engine refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EngineError {
    /// The replica is not assigned to this volume.
    #[error("unknown replica {0}")]
    UnknownReplica(ReplicaId),
    /// The replica id names another volume.
    #[error("replica {replica} does not belong to volume {volume}")]
    WrongVolume {
        /// The replica.
        replica: ReplicaId,
        /// This engine's volume.
        volume: String,
    },
    /// The same replica appears twice in one assignment.
    #[error("replica {0} assigned twice")]
    DuplicateReplica(ReplicaId),
    /// The input carries an epoch other than the current one. Fenced.
    #[error("fenced: input from epoch {got}, current epoch is {current}")]
    StaleEpoch {
        /// The input's epoch.
        got: Epoch,
        /// The engine's epoch.
        current: Epoch,
    },
    /// The input names a session that is not the replica's active session.
    #[error("stale session {got} for {replica}; active session is {}", active.map_or_else(|| "none".to_owned(), |s| s.to_string()))]
    StaleSession {
        /// The replica.
        replica: ReplicaId,
        /// The session named by the input.
        got: SessionId,
        /// The replica's active session, if any.
        active: Option<SessionId>,
    },
    /// The session is not in a phase where this input applies.
    #[error(transparent)]
    Phase(#[from] PhaseError),
    /// The endpoint's version is older than the one in force.
    #[error("stale endpoint for {replica}: version {got} < current {current}")]
    StaleEndpoint {
        /// The replica.
        replica: ReplicaId,
        /// Version offered.
        got: u64,
        /// Version in force.
        current: u64,
    },
    /// Same endpoint version, different addresses: the control plane contradicts itself.
    #[error("conflicting endpoint for {replica} at version {version}")]
    EndpointConflict {
        /// The replica.
        replica: ReplicaId,
        /// The version both claim.
        version: u64,
    },
    /// A peer answered the handshake with another replica's identity.
    #[error("identity mismatch: session is for {expected}, peer claims {claimed}")]
    IdentityMismatch {
        /// Identity the session is for.
        expected: ReplicaId,
        /// Identity the peer claimed.
        claimed: ReplicaId,
    },
    /// Catch-up progress went backwards.
    #[error("progress went backwards for {replica}: {from} -> {to}")]
    NonMonotonicProgress {
        /// The replica.
        replica: ReplicaId,
        /// Recorded progress.
        from: Lsn,
        /// Reported progress.
        to: Lsn,
    },
    /// Catch-up progress went past the frozen target.
    #[error("progress {reported} past frozen target {target} for {replica}")]
    PastTarget {
        /// The replica.
        replica: ReplicaId,
        /// Reported progress.
        reported: Lsn,
        /// The frozen target.
        target: Lsn,
    },
    /// Progress arrived before the required truncation was recorded.
    #[error("{replica} must truncate to {to} before progress is accepted")]
    TruncationPending {
        /// The replica.
        replica: ReplicaId,
        /// The required truncation point.
        to: Lsn,
    },
    /// The replica truncated to another point than required.
    #[error("{replica} truncated to {reported}, plan required {required}")]
    TruncationMismatch {
        /// The replica.
        replica: ReplicaId,
        /// Required point.
        required: Lsn,
        /// Reported point.
        reported: Lsn,
    },
    /// A truncation was reported, but the plan requires none (or it was already recorded).
    #[error("{replica} reported a truncation the plan does not require")]
    TruncationNotRequired {
        /// The replica.
        replica: ReplicaId,
    },
    /// The input applies to another kind of plan.
    #[error("session {session} runs a {runs} plan, not {input}")]
    WrongWork {
        /// The session.
        session: SessionId,
        /// What it runs.
        runs: &'static str,
        /// What the input was for.
        input: &'static str,
    },
    /// The grants do not match the plan; they were released and the session invalidated.
    #[error("grants for session {session} do not match its plan: {detail}")]
    BadGrants {
        /// The session.
        session: SessionId,
        /// What was wrong.
        detail: String,
    },
    /// Rebuild progress refused by the rebuild FSM.
    #[error(transparent)]
    Rebuild(#[from] RebuildError),
    /// Commit tracking refused the input.
    #[error(transparent)]
    Commit(#[from] CommitError),
    /// The WAL state reported by the shell is inconsistent.
    #[error(transparent)]
    History(#[from] HistoryError),
    /// The reported epoch history does not follow the one known.
    #[error(transparent)]
    Epochs(#[from] EpochOrderError),
    /// The head moved backwards.
    #[error("wal head moved backwards: {from} -> {to}")]
    HeadRegressed {
        /// Previous head.
        from: Lsn,
        /// Reported head.
        to: Lsn,
    },
}
