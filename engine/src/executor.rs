//! Executor state machines: what to do next for a plan, one step at a time.
//!
//! The shell's executor tasks do the IO; these machines decide the order and
//! size of the steps from plan-bound values only (never from the primary's
//! current state). Each step first passes through an optional on-step hook,
//! which tests use to inject a failure at an exact point.

use crate::history::RebuildSource;
use crate::ids::{Lsn, SessionId};
use crate::plan::{PlanKind, RecoveryPlan, ResourceGrant};
use std::fmt;

/// One unit of executor work.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    /// Tell the replica to drop everything after `to`.
    Truncate {
        /// Last LSN the replica keeps.
        to: Lsn,
    },
    /// Ship the WAL entries `(from_exclusive, to_inclusive]`.
    ShipWal {
        /// Exclusive start.
        from_exclusive: Lsn,
        /// Inclusive end.
        to_inclusive: Lsn,
    },
    /// Send `len` bytes of the image starting at `offset`.
    TransferImage {
        /// Byte offset.
        offset: u64,
        /// Byte count.
        len: u64,
    },
    /// The image is fully sent; the replica installs it at `image_lsn`.
    FinishImage {
        /// LSN the image holds.
        image_lsn: Lsn,
    },
    /// Nothing left: the replica holds everything up to `flushed`.
    Done {
        /// Final LSN.
        flushed: Lsn,
    },
}

/// What the hook saw.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StepInfo {
    /// The session executing.
    pub session: SessionId,
    /// Zero-based index of the step.
    pub index: u64,
    /// The step about to be taken.
    pub step: Step,
}

/// What the hook wants.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HookAction {
    /// Take the step.
    Proceed,
    /// Fail here with this reason.
    Fail(String),
}

/// A fault-injection hook called before every step.
pub type StepHook = Box<dyn FnMut(&StepInfo) -> HookAction + Send>;

/// An executor could not be built or refused to go on.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ExecutorError {
    /// The plan is not of the kind this executor runs.
    #[error("plan {0} is not a {1} plan")]
    WrongPlan(SessionId, &'static str),
    /// The grants do not match the plan.
    #[error("grants do not match plan {session}: {detail}")]
    BadGrants {
        /// The plan's session.
        session: SessionId,
        /// What was wrong.
        detail: String,
    },
    /// The on-step hook failed the step.
    #[error("injected failure at step {index}: {reason}")]
    Injected {
        /// Step index.
        index: u64,
        /// Hook's reason.
        reason: String,
    },
}

struct Stepper {
    session: SessionId,
    index: u64,
    hook: Option<StepHook>,
}

impl Stepper {
    fn pass(&mut self, step: Step) -> Result<Step, ExecutorError> {
        let info = StepInfo {
            session: self.session,
            index: self.index,
            step,
        };
        if let Some(hook) = self.hook.as_mut() {
            if let HookAction::Fail(reason) = hook(&info) {
                return Err(ExecutorError::Injected {
                    index: self.index,
                    reason,
                });
            }
        }
        self.index += 1;
        Ok(step)
    }
}

impl fmt::Debug for Stepper {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Stepper")
            .field("session", &self.session)
            .field("index", &self.index)
            .field("hook", &self.hook.is_some())
            .finish()
    }
}

fn next_wal_range(shipped: &mut Lsn, target: Lsn, batch_entries: u64) -> Option<Step> {
    if *shipped >= target {
        return None;
    }
    let to = Lsn(target
        .get()
        .min(shipped.get().saturating_add(batch_entries.max(1))));
    let step = Step::ShipWal {
        from_exclusive: *shipped,
        to_inclusive: to,
    };
    *shipped = to;
    Some(step)
}

/// Runs a catch-up plan: truncate if required, then ship the frozen range in batches.
#[derive(Debug)]
pub struct CatchUpExecutor {
    stepper: Stepper,
    truncate_to: Option<Lsn>,
    shipped: Lsn,
    target: Lsn,
    batch_entries: u64,
}

impl CatchUpExecutor {
    /// Builds the executor from a catch-up plan; batches hold at most `batch_entries` LSNs.
    pub fn from_plan(plan: &RecoveryPlan, batch_entries: u64) -> Result<Self, ExecutorError> {
        let PlanKind::CatchUp {
            start,
            frozen_target,
            truncate_to,
            ..
        } = &plan.kind
        else {
            return Err(ExecutorError::WrongPlan(plan.session, "catch-up"));
        };
        Ok(Self {
            stepper: Stepper {
                session: plan.session,
                index: 0,
                hook: None,
            },
            truncate_to: *truncate_to,
            shipped: *start,
            target: *frozen_target,
            batch_entries,
        })
    }

    /// Installs a fault-injection hook.
    pub fn with_hook(mut self, hook: StepHook) -> Self {
        self.stepper.hook = Some(hook);
        self
    }

    /// The next step. After `Done` it keeps returning `Done`.
    pub fn next_step(&mut self) -> Result<Step, ExecutorError> {
        let step = if let Some(to) = self.truncate_to {
            Step::Truncate { to }
        } else {
            let mut shipped = self.shipped;
            next_wal_range(&mut shipped, self.target, self.batch_entries).unwrap_or(Step::Done {
                flushed: self.target,
            })
        };
        let step = self.stepper.pass(step)?;
        match step {
            Step::Truncate { .. } => self.truncate_to = None,
            Step::ShipWal { to_inclusive, .. } => self.shipped = to_inclusive,
            _ => {}
        }
        Ok(step)
    }
}

/// Runs a rebuild plan: image chunks, finish, then (snapshot+tail) the WAL tail.
#[derive(Debug)]
pub struct RebuildExecutor {
    stepper: Stepper,
    image_lsn: Lsn,
    image_bytes: u64,
    chunk_bytes: u64,
    sent_bytes: u64,
    finished: bool,
    shipped: Lsn,
    tail_target: Lsn,
    batch_entries: u64,
}

impl RebuildExecutor {
    /// Builds the executor from a rebuild plan and its grants. `image_bytes` is the
    /// size of the image to send, `chunk_bytes` the transfer unit.
    pub fn from_plan(
        plan: &RecoveryPlan,
        grants: &[ResourceGrant],
        image_bytes: u64,
        chunk_bytes: u64,
        batch_entries: u64,
    ) -> Result<Self, ExecutorError> {
        let PlanKind::Rebuild { source, .. } = &plan.kind else {
            return Err(ExecutorError::WrongPlan(plan.session, "rebuild"));
        };
        let bad = |detail: String| ExecutorError::BadGrants {
            session: plan.session,
            detail,
        };
        let image_lsn =
            plan.check_grants(grants)
                .map_err(bad)?
                .ok_or_else(|| ExecutorError::BadGrants {
                    session: plan.session,
                    detail: "no image grant".into(),
                })?;
        let tail_target = match source {
            RebuildSource::SnapshotTail { tail_target, .. } => *tail_target,
            RebuildSource::FullBase { .. } => image_lsn,
        };
        Ok(Self {
            stepper: Stepper {
                session: plan.session,
                index: 0,
                hook: None,
            },
            image_lsn,
            image_bytes,
            chunk_bytes: chunk_bytes.max(1),
            sent_bytes: 0,
            finished: false,
            shipped: image_lsn,
            tail_target,
            batch_entries,
        })
    }

    /// Installs a fault-injection hook.
    pub fn with_hook(mut self, hook: StepHook) -> Self {
        self.stepper.hook = Some(hook);
        self
    }

    /// LSN of the image being installed.
    pub fn image_lsn(&self) -> Lsn {
        self.image_lsn
    }

    /// The next step. After `Done` it keeps returning `Done`.
    pub fn next_step(&mut self) -> Result<Step, ExecutorError> {
        let step = if self.sent_bytes < self.image_bytes {
            let len = self.chunk_bytes.min(self.image_bytes - self.sent_bytes);
            Step::TransferImage {
                offset: self.sent_bytes,
                len,
            }
        } else if !self.finished {
            Step::FinishImage {
                image_lsn: self.image_lsn,
            }
        } else {
            let mut shipped = self.shipped;
            next_wal_range(&mut shipped, self.tail_target, self.batch_entries).unwrap_or(
                Step::Done {
                    flushed: self.tail_target,
                },
            )
        };
        let step = self.stepper.pass(step)?;
        match step {
            Step::TransferImage { len, .. } => self.sent_bytes += len,
            Step::FinishImage { .. } => self.finished = true,
            Step::ShipWal { to_inclusive, .. } => self.shipped = to_inclusive,
            _ => {}
        }
        Ok(step)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::budget::CatchUpBudget;
    use crate::ids::{Epoch, ReplicaId, ResourceId};
    use crate::plan::GrantedResource;

    fn plan(kind: PlanKind) -> RecoveryPlan {
        RecoveryPlan {
            session: SessionId(7),
            replica: ReplicaId::parse("v/a").unwrap(),
            epoch: Epoch(1),
            kind,
        }
    }

    #[test]
    fn catch_up_truncates_first_then_ships_bounded_batches() {
        let plan = plan(PlanKind::CatchUp {
            start: Lsn(10),
            frozen_target: Lsn(25),
            truncate_to: Some(Lsn(10)),
            budget: CatchUpBudget::default(),
        });
        let mut exec = CatchUpExecutor::from_plan(&plan, 8).unwrap();
        let steps: Vec<Step> = (0..5).map(|_| exec.next_step().unwrap()).collect();
        assert_eq!(
            steps,
            vec![
                Step::Truncate { to: Lsn(10) },
                Step::ShipWal {
                    from_exclusive: Lsn(10),
                    to_inclusive: Lsn(18)
                },
                Step::ShipWal {
                    from_exclusive: Lsn(18),
                    to_inclusive: Lsn(25)
                },
                Step::Done { flushed: Lsn(25) },
                Step::Done { flushed: Lsn(25) },
            ]
        );
    }

    #[test]
    fn hook_fails_the_exact_step_and_the_step_is_not_consumed() {
        let plan = plan(PlanKind::CatchUp {
            start: Lsn(0),
            frozen_target: Lsn(30),
            truncate_to: None,
            budget: CatchUpBudget::default(),
        });
        let mut fail_once = true;
        let mut exec = CatchUpExecutor::from_plan(&plan, 10)
            .unwrap()
            .with_hook(Box::new(move |info: &StepInfo| {
                if info.index == 1 && std::mem::take(&mut fail_once) {
                    HookAction::Fail("disk pulled".into())
                } else {
                    HookAction::Proceed
                }
            }));
        exec.next_step().unwrap();
        assert_eq!(
            exec.next_step(),
            Err(ExecutorError::Injected {
                index: 1,
                reason: "disk pulled".into()
            })
        );
        assert_eq!(
            exec.next_step(),
            Ok(Step::ShipWal {
                from_exclusive: Lsn(10),
                to_inclusive: Lsn(20)
            })
        );
    }

    #[test]
    fn snapshot_rebuild_sends_image_then_tail_from_plan_values() {
        let plan = plan(PlanKind::Rebuild {
            source: RebuildSource::SnapshotTail {
                snapshot_lsn: Lsn(40),
                tail_target: Lsn(45),
            },
            transfer: crate::delta::Transfer::Staged {
                reason: "test".into(),
            },
        });
        let grants = [
            ResourceGrant {
                id: ResourceId(1),
                granted: GrantedResource::Snapshot { at: Lsn(40) },
            },
            ResourceGrant {
                id: ResourceId(2),
                granted: GrantedResource::WalRetention { from: Lsn(40) },
            },
        ];
        let mut exec = RebuildExecutor::from_plan(&plan, &grants, 10_000, 4096, 100).unwrap();
        let steps: Vec<Step> = (0..6).map(|_| exec.next_step().unwrap()).collect();
        assert_eq!(
            steps,
            vec![
                Step::TransferImage {
                    offset: 0,
                    len: 4096
                },
                Step::TransferImage {
                    offset: 4096,
                    len: 4096
                },
                Step::TransferImage {
                    offset: 8192,
                    len: 1808
                },
                Step::FinishImage { image_lsn: Lsn(40) },
                Step::ShipWal {
                    from_exclusive: Lsn(40),
                    to_inclusive: Lsn(45)
                },
                Step::Done { flushed: Lsn(45) },
            ]
        );
    }

    #[test]
    fn rebuild_executor_refuses_mismatched_grants_and_wrong_plans() {
        let plan = plan(PlanKind::Rebuild {
            source: RebuildSource::FullBase {
                min_base_lsn: Lsn(50),
                reason: "r".into(),
            },
            transfer: crate::delta::Transfer::Staged {
                reason: "test".into(),
            },
        });
        let low = [ResourceGrant {
            id: ResourceId(1),
            granted: GrantedResource::FullBase { base_lsn: Lsn(49) },
        }];
        assert!(matches!(
            RebuildExecutor::from_plan(&plan, &low, 1, 1, 1),
            Err(ExecutorError::BadGrants { .. })
        ));
        assert!(matches!(
            CatchUpExecutor::from_plan(&plan, 1),
            Err(ExecutorError::WrongPlan(..))
        ));
    }
}
