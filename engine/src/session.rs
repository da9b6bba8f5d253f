//! Recovery sessions: one attempt to bring one replica in sync.
//!
//! `Init → Connecting → Handshake → CatchUp → Completed | Invalidated`. The
//! `CatchUp` phase is where a plan executes (a WAL catch-up or a rebuild);
//! inside it the session first reserves the plan's resources, then runs.
//! `Completed` and `Invalidated` are terminal. A session owns the grants of
//! its plan; invalidating it hands them back exactly once, for release.

use crate::budget::BudgetTracker;
use crate::ids::{Epoch, Lsn, SessionId, Tick};
use crate::plan::{PlanKind, RecoveryPlan, ResourceGrant};
use crate::rebuild::RebuildFsm;
use serde::Serialize;

/// Why a session was created.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum SessionKind {
    /// First session of a newly assigned replica.
    Bootstrap,
    /// Reconnect of a known replica that fell behind or lost its connection.
    CatchUp,
    /// A replica that needs a rebuild.
    Rebuild,
    /// Re-established after an epoch bump or endpoint change.
    Reassign,
}

/// The phase of a session, as reported in snapshots.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum SessionPhase {
    /// Created, nothing asked of the shell yet.
    Init,
    /// The shell is connecting.
    Connecting,
    /// Connected, waiting for the replica's handshake.
    Handshake,
    /// A plan is reserving resources or executing.
    CatchUp,
    /// Terminal: the replica is in sync.
    Completed,
    /// Terminal: the session was superseded or failed.
    Invalidated,
}

/// Truncation owed by a replica that is ahead of committed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case", tag = "truncation")]
pub enum Truncation {
    /// The replica is not ahead.
    NotRequired,
    /// The replica must truncate to `to` before anything else is accepted.
    Required {
        /// Last LSN to keep.
        to: Lsn,
    },
    /// The replica reported the truncation.
    Recorded {
        /// Last LSN kept.
        to: Lsn,
    },
}

/// Execution state of a running plan.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case", tag = "work")]
pub enum Work {
    /// WAL catch-up toward a frozen target.
    CatchUp {
        /// Truncation state.
        truncation: Truncation,
        /// Highest LSN the replica reported applied and durable.
        applied: Lsn,
        /// Frozen target.
        target: Lsn,
        /// Budget account.
        budget: BudgetTracker,
    },
    /// Rebuild.
    Rebuild(RebuildFsm),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Stage {
    Init,
    Connecting,
    Handshake,
    /// A rebuild waiting for one of the node's rebuild slots (no deadline:
    /// the queue is the node's to keep); planned when its slot comes.
    Queued,
    Reserving {
        plan: RecoveryPlan,
        deadline: Tick,
    },
    Running {
        plan: RecoveryPlan,
        grants: Vec<ResourceGrant>,
        work: Work,
    },
    Completed {
        flushed: Lsn,
    },
    Invalidated {
        reason: String,
    },
}

/// A session transition that does not apply in the current phase.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("session {session}: {input} not valid in phase {phase}")]
pub struct PhaseError {
    /// The session.
    pub session: SessionId,
    /// What was attempted.
    pub input: &'static str,
    /// The phase it was attempted in.
    pub phase: &'static str,
}

/// One recovery session.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Session {
    pub(crate) id: SessionId,
    pub(crate) kind: SessionKind,
    pub(crate) epoch: Epoch,
    pub(crate) endpoint_version: u64,
    pub(crate) created: Tick,
    pub(crate) stage: Stage,
}

impl Session {
    pub(crate) fn new(
        id: SessionId,
        kind: SessionKind,
        epoch: Epoch,
        endpoint_version: u64,
        now: Tick,
    ) -> Self {
        Self {
            id,
            kind,
            epoch,
            endpoint_version,
            created: now,
            stage: Stage::Init,
        }
    }

    pub(crate) fn phase(&self) -> SessionPhase {
        match self.stage {
            Stage::Init => SessionPhase::Init,
            Stage::Connecting => SessionPhase::Connecting,
            Stage::Handshake => SessionPhase::Handshake,
            Stage::Queued | Stage::Reserving { .. } | Stage::Running { .. } => {
                SessionPhase::CatchUp
            }
            Stage::Completed { .. } => SessionPhase::Completed,
            Stage::Invalidated { .. } => SessionPhase::Invalidated,
        }
    }

    pub(crate) fn stage_name(&self) -> &'static str {
        match self.stage {
            Stage::Init => "init",
            Stage::Connecting => "connecting",
            Stage::Handshake => "handshake",
            Stage::Queued => "queued",
            Stage::Reserving { .. } => "reserving",
            Stage::Running { .. } => "running",
            Stage::Completed { .. } => "completed",
            Stage::Invalidated { .. } => "invalidated",
        }
    }

    pub(crate) fn is_terminal(&self) -> bool {
        matches!(
            self.stage,
            Stage::Completed { .. } | Stage::Invalidated { .. }
        )
    }

    pub(crate) fn plan(&self) -> Option<&RecoveryPlan> {
        match &self.stage {
            Stage::Reserving { plan, .. } | Stage::Running { plan, .. } => Some(plan),
            _ => None,
        }
    }

    fn wrong(&self, input: &'static str) -> PhaseError {
        PhaseError {
            session: self.id,
            input,
            phase: self.stage_name(),
        }
    }

    pub(crate) fn start_connecting(&mut self) -> Result<(), PhaseError> {
        match self.stage {
            Stage::Init => {
                self.stage = Stage::Connecting;
                Ok(())
            }
            _ => Err(self.wrong("connect")),
        }
    }

    pub(crate) fn connected(&mut self) -> Result<(), PhaseError> {
        match self.stage {
            Stage::Connecting => {
                self.stage = Stage::Handshake;
                Ok(())
            }
            _ => Err(self.wrong("connected")),
        }
    }

    pub(crate) fn expect_handshake(&self) -> Result<(), PhaseError> {
        match self.stage {
            Stage::Handshake => Ok(()),
            _ => Err(self.wrong("handshake")),
        }
    }

    pub(crate) fn reserve(&mut self, plan: RecoveryPlan, deadline: Tick) -> Result<(), PhaseError> {
        match self.stage {
            Stage::Handshake | Stage::Queued => {
                self.stage = Stage::Reserving { plan, deadline };
                Ok(())
            }
            _ => Err(self.wrong("reserve")),
        }
    }

    /// A rebuild waits for a rebuild slot.
    pub(crate) fn queue(&mut self) -> Result<(), PhaseError> {
        match self.stage {
            Stage::Handshake => {
                self.stage = Stage::Queued;
                Ok(())
            }
            _ => Err(self.wrong("queue")),
        }
    }

    /// Its slot came: it must be waiting for one.
    pub(crate) fn expect_queued(&self) -> Result<(), PhaseError> {
        match self.stage {
            Stage::Queued => Ok(()),
            _ => Err(self.wrong("rebuild_slot")),
        }
    }

    /// Moves a reserving session to running with its grants; the work state is
    /// built from plan-bound values only.
    pub(crate) fn run(
        &mut self,
        grants: Vec<ResourceGrant>,
        image_lsn: Option<Lsn>,
        now: Tick,
    ) -> Result<(), PhaseError> {
        let Stage::Reserving { plan, .. } = &self.stage else {
            return Err(self.wrong("run"));
        };
        let work = match &plan.kind {
            PlanKind::CatchUp {
                start,
                frozen_target,
                truncate_to,
                budget,
            } => Work::CatchUp {
                truncation: truncate_to
                    .map_or(Truncation::NotRequired, |to| Truncation::Required { to }),
                applied: *start,
                target: *frozen_target,
                budget: BudgetTracker::start(*budget, now),
            },
            PlanKind::Rebuild { source, .. } => {
                let mut fsm = RebuildFsm::new();
                let image = image_lsn.ok_or_else(|| self.wrong("run without image grant"))?;
                fsm.select(source.clone(), image)
                    .map_err(|_| self.wrong("select source"))?;
                Work::Rebuild(fsm)
            }
        };
        let plan = plan.clone();
        self.stage = Stage::Running { plan, grants, work };
        Ok(())
    }

    pub(crate) fn work_mut(&mut self, input: &'static str) -> Result<&mut Work, PhaseError> {
        if !matches!(self.stage, Stage::Running { .. }) {
            return Err(self.wrong(input));
        }
        match &mut self.stage {
            Stage::Running { work, .. } => Ok(work),
            _ => Err(PhaseError {
                session: self.id,
                input,
                phase: "running",
            }),
        }
    }

    /// Completes the session; returns the grants to release.
    pub(crate) fn complete(&mut self, flushed: Lsn) -> Result<Vec<ResourceGrant>, PhaseError> {
        match &mut self.stage {
            Stage::Handshake => {
                self.stage = Stage::Completed { flushed };
                Ok(Vec::new())
            }
            Stage::Running { grants, .. } => {
                let grants = std::mem::take(grants);
                self.stage = Stage::Completed { flushed };
                Ok(grants)
            }
            _ => Err(self.wrong("complete")),
        }
    }

    /// Invalidates a live session; returns the grants to release and whether
    /// an execution was running (and must be cancelled).
    pub(crate) fn invalidate(
        &mut self,
        reason: &str,
    ) -> Result<(Vec<ResourceGrant>, bool), PhaseError> {
        let (grants, was_running) = match &mut self.stage {
            Stage::Completed { .. } | Stage::Invalidated { .. } => {
                return Err(self.wrong("invalidate"))
            }
            Stage::Running { grants, .. } => (std::mem::take(grants), true),
            _ => (Vec::new(), false),
        };
        self.stage = Stage::Invalidated {
            reason: reason.to_owned(),
        };
        Ok((grants, was_running))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::budget::CatchUpBudget;
    use crate::ids::{ReplicaId, ResourceId};
    use crate::plan::GrantedResource;

    fn session() -> Session {
        Session::new(SessionId(1), SessionKind::Bootstrap, Epoch(1), 1, Tick(0))
    }

    fn plan() -> RecoveryPlan {
        RecoveryPlan {
            session: SessionId(1),
            replica: ReplicaId::parse("v/a").unwrap(),
            epoch: Epoch(1),
            kind: PlanKind::CatchUp {
                start: Lsn(1),
                frozen_target: Lsn(5),
                truncate_to: None,
                budget: CatchUpBudget::default(),
            },
        }
    }

    #[test]
    fn phases_advance_in_order_and_refuse_skips() {
        let mut s = session();
        assert_eq!(s.connected().unwrap_err().phase, "init");
        s.start_connecting().unwrap();
        assert!(s.reserve(plan(), Tick(5)).is_err());
        s.connected().unwrap();
        s.reserve(plan(), Tick(5)).unwrap();
        assert_eq!(s.phase(), SessionPhase::CatchUp);
        let grant = ResourceGrant {
            id: ResourceId(9),
            granted: GrantedResource::WalRetention { from: Lsn(1) },
        };
        s.run(vec![grant], None, Tick(1)).unwrap();
        assert_eq!(s.complete(Lsn(5)).unwrap(), vec![grant]);
        assert!(s.is_terminal());
        assert!(
            s.invalidate("late").is_err(),
            "terminal sessions stay terminal"
        );
    }

    #[test]
    fn invalidate_hands_back_grants_once() {
        let mut s = session();
        s.start_connecting().unwrap();
        s.connected().unwrap();
        s.reserve(plan(), Tick(5)).unwrap();
        let grant = ResourceGrant {
            id: ResourceId(3),
            granted: GrantedResource::WalRetention { from: Lsn(1) },
        };
        s.run(vec![grant], None, Tick(1)).unwrap();
        assert_eq!(s.invalidate("epoch_bumped").unwrap(), (vec![grant], true));
        assert!(s.invalidate("again").is_err());
    }
}
