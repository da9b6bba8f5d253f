//! Serializable snapshots of the engine for operators: registry, senders,
//! sessions. Built on demand from `&Engine`; nothing here changes state.

use crate::commit::CommitMode;
use crate::engine::Engine;
use crate::epochs::EpochHistory;
use crate::history::RetainedHistory;
use crate::ids::{Endpoint, Epoch, Lsn, ReplicaId, ResourceId, SessionId, Tick};
use crate::plan::RecoveryPlan;
use crate::retention::RetentionHold;
use crate::retry::FailureRecord;
use crate::sender::{RebuildNeed, ReplicaState};
use crate::session::{Session, SessionKind, SessionPhase, Stage, Work};
use serde::Serialize;
use std::collections::BTreeMap;

/// One session, as an operator sees it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct SessionSnapshot {
    /// Session id.
    pub id: SessionId,
    /// Why it was created.
    pub kind: SessionKind,
    /// Its phase.
    pub phase: SessionPhase,
    /// Finer stage inside the phase (`reserving`, `running`, ...).
    pub stage: &'static str,
    /// Epoch it belongs to.
    pub epoch: Epoch,
    /// Endpoint version it was created for.
    pub endpoint_version: u64,
    /// When it was created.
    pub created: Tick,
    /// Its plan, once planned.
    pub plan: Option<RecoveryPlan>,
    /// Execution progress, while running.
    pub work: Option<Work>,
    /// Resources it holds.
    pub held: Vec<ResourceId>,
    /// Why it was invalidated, if it was.
    pub invalidated: Option<String>,
}

impl SessionSnapshot {
    fn of(session: &Session) -> Self {
        let (work, held, invalidated) = match &session.stage {
            Stage::Running { work, grants, .. } => (
                Some(work.clone()),
                grants.iter().map(|g| g.id).collect(),
                None,
            ),
            Stage::Invalidated { reason } => (None, Vec::new(), Some(reason.clone())),
            _ => (None, Vec::new(), None),
        };
        Self {
            id: session.id,
            kind: session.kind,
            phase: session.phase(),
            stage: session.stage_name(),
            epoch: session.epoch,
            endpoint_version: session.endpoint_version,
            created: session.created,
            plan: session.plan().cloned(),
            work,
            held,
            invalidated,
        }
    }
}

/// One replica's sender.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[non_exhaustive]
pub struct SenderStatus {
    /// Stable identity.
    pub replica: ReplicaId,
    /// Current endpoint.
    pub endpoint: Endpoint,
    /// Replication state.
    pub state: ReplicaState,
    /// Last known durable LSN.
    pub flushed: Lsn,
    /// Last heartbeat tick.
    pub last_heartbeat: Tick,
    /// Why it needs a rebuild, while it does.
    pub rebuild_need: Option<RebuildNeed>,
    /// The WAL kept for it.
    pub retention: RetentionHold,
    /// Its failures since it was last in sync, the last cause, when it is retried.
    pub failure: Option<FailureRecord>,
    /// Latest session, live or terminal.
    pub session: Option<SessionSnapshot>,
    /// While it is behind and watched: whether it gains on the ingest.
    pub convergence: Option<crate::converge::ConvergenceStatus>,
}

/// The whole registry of one volume.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[non_exhaustive]
pub struct RegistryStatus {
    /// Volume name.
    pub volume: String,
    /// Current epoch.
    pub epoch: Epoch,
    /// Latest tick.
    pub tick: Tick,
    /// Commit mode.
    pub commit_mode: CommitMode,
    /// Retained history with committed LSN.
    pub history: RetainedHistory,
    /// The primary's epoch history.
    pub epochs: EpochHistory,
    /// Barriers waiting.
    pub pending_barriers: usize,
    /// Resources held by running plans.
    pub held_resources: Vec<ResourceId>,
    /// Per-replica status.
    pub senders: Vec<SenderStatus>,
    /// The rate the volume's writes are held to for a replica that is
    /// not converging, if they are.
    pub write_limit: Option<u64>,
    /// Events dropped from the recovery log because their class was full.
    pub log_dropped: u64,
    /// Of those, decisions (zero unless decisions alone overflowed the log).
    pub decisions_dropped: u64,
    /// Every decision recorded since the engine began, by name (plans,
    /// completions, invalidations, aborted rebuilds...): monotonic, unlike
    /// the bounded log.
    pub decision_totals: BTreeMap<&'static str, u64>,
}

impl Engine {
    /// A serializable snapshot of the registry.
    pub fn status(&self) -> RegistryStatus {
        RegistryStatus {
            volume: self.config.volume.clone(),
            epoch: self.epoch,
            tick: self.now,
            commit_mode: self.commit.mode(),
            history: self.history(),
            epochs: self.epochs.clone(),
            pending_barriers: self.commit.pending_barriers(),
            held_resources: self.held_resources(),
            senders: self
                .senders
                .values()
                .map(|s| SenderStatus {
                    replica: s.id.clone(),
                    endpoint: s.endpoint.clone(),
                    state: s.state(),
                    flushed: s.flushed,
                    last_heartbeat: s.last_heartbeat,
                    rebuild_need: s.rebuild_need().cloned(),
                    retention: s.hold.clone(),
                    failure: s.failure.clone(),
                    session: s.session.as_ref().map(SessionSnapshot::of),
                    convergence: self.convergence_status(&s.id),
                })
                .collect(),
            write_limit: self.write_limit,
            log_dropped: self.log.dropped(),
            decisions_dropped: self.log.decisions_dropped(),
            decision_totals: self.log.decision_totals().collect(),
        }
    }

    /// A snapshot of one replica's latest session.
    pub fn session_snapshot(&self, replica: &ReplicaId) -> Option<SessionSnapshot> {
        self.senders
            .get(replica)?
            .session
            .as_ref()
            .map(SessionSnapshot::of)
    }
}
