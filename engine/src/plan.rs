//! Recovery plans and the resources they pin.
//!
//! A [`RecoveryPlan`] binds every target when it is made: the catch-up range
//! and its frozen target, the truncation point, the snapshot LSN or the
//! minimum base LSN. Executors consume only these values, so a later change
//! of the primary's state cannot move a running recovery's goalposts.
//!
//! Resources are requested from the shell with
//! [`Command::AcquireResources`](crate::Command::AcquireResources) and come
//! back as [`ResourceGrant`]s (or a failure). The engine then owns the
//! accounting: it asks for each granted resource to be released exactly once,
//! whatever way the session ends.

use crate::budget::CatchUpBudget;
use crate::delta::Transfer;
use crate::history::RebuildSource;
use crate::ids::{Epoch, Lsn, ReplicaId, ResourceId, SessionId};
use serde::Serialize;

/// What a plan does.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case", tag = "plan")]
pub enum PlanKind {
    /// Ship `(start, frozen_target]` from the retained WAL.
    CatchUp {
        /// Last LSN the replica keeps.
        start: Lsn,
        /// Committed LSN at plan time; the catch-up ends exactly here.
        frozen_target: Lsn,
        /// The replica must truncate to this LSN before anything is shipped.
        truncate_to: Option<Lsn>,
        /// Limits for the catch-up.
        budget: CatchUpBudget,
    },
    /// Install an image, then (for snapshot+tail) replay the WAL after it.
    Rebuild {
        /// The chosen source with its bound LSNs.
        source: RebuildSource,
        /// What of the image moves, and how the replica installs it.
        transfer: Transfer,
    },
}

/// A resource the shell must pin before a plan can run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case", tag = "resource")]
pub enum ResourceRequest {
    /// Keep the WAL from `from + 1` on (nothing after `from` may be recycled).
    WalRetention {
        /// Exclusive start of the range to keep.
        from: Lsn,
    },
    /// Keep the extent image at the checkpoint `at` readable.
    Snapshot {
        /// The checkpoint LSN.
        at: Lsn,
    },
    /// Keep a full base image of the extent, at an LSN of at least `at_least`,
    /// and the WAL after that base.
    FullBase {
        /// Minimum LSN the base must contain.
        at_least: Lsn,
    },
}

/// A resource the shell pinned.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct ResourceGrant {
    /// Identity used to release it.
    pub id: ResourceId,
    /// What was pinned.
    pub granted: GrantedResource,
}

/// What a grant holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case", tag = "resource")]
pub enum GrantedResource {
    /// The WAL after `from` is retained.
    WalRetention {
        /// Exclusive start.
        from: Lsn,
    },
    /// The snapshot at `at` is readable.
    Snapshot {
        /// Its LSN.
        at: Lsn,
    },
    /// A full base at exactly `base_lsn` is readable.
    FullBase {
        /// The exact LSN the base holds.
        base_lsn: Lsn,
    },
}

impl GrantedResource {
    /// Whether this grant satisfies `request`.
    pub fn satisfies(&self, request: &ResourceRequest) -> bool {
        match (self, request) {
            (Self::WalRetention { from }, ResourceRequest::WalRetention { from: want }) => {
                from <= want
            }
            (Self::Snapshot { at }, ResourceRequest::Snapshot { at: want }) => at == want,
            (Self::FullBase { base_lsn }, ResourceRequest::FullBase { at_least }) => {
                base_lsn >= at_least
            }
            _ => false,
        }
    }
}

/// A recovery plan with every target bound.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct RecoveryPlan {
    /// Session the plan belongs to.
    pub session: SessionId,
    /// Replica being recovered.
    pub replica: ReplicaId,
    /// Epoch the plan was made in.
    pub epoch: Epoch,
    /// What the plan does.
    pub kind: PlanKind,
}

impl RecoveryPlan {
    /// The resources the plan needs pinned, in the order the grants must come back.
    pub fn resources(&self) -> Vec<ResourceRequest> {
        match &self.kind {
            PlanKind::CatchUp {
                start,
                frozen_target,
                ..
            } if start < frozen_target => {
                vec![ResourceRequest::WalRetention { from: *start }]
            }
            PlanKind::CatchUp { .. } => Vec::new(),
            PlanKind::Rebuild {
                source: RebuildSource::SnapshotTail { snapshot_lsn, .. },
                ..
            } => vec![
                ResourceRequest::Snapshot { at: *snapshot_lsn },
                ResourceRequest::WalRetention {
                    from: *snapshot_lsn,
                },
            ],
            PlanKind::Rebuild {
                source: RebuildSource::FullBase { min_base_lsn, .. },
                ..
            } => {
                vec![ResourceRequest::FullBase {
                    at_least: *min_base_lsn,
                }]
            }
        }
    }

    /// The log event name for this plan.
    pub fn event_name(&self) -> &'static str {
        match &self.kind {
            PlanKind::CatchUp { .. } => "plan_catchup",
            PlanKind::Rebuild {
                source: RebuildSource::SnapshotTail { .. },
                ..
            } => "plan_rebuild_snapshot_tail",
            PlanKind::Rebuild {
                source: RebuildSource::FullBase { .. },
                ..
            } => "plan_rebuild_full_base",
        }
    }

    /// A one-line description with the bound targets, for logs.
    pub fn describe(&self) -> String {
        match &self.kind {
            PlanKind::CatchUp {
                start,
                frozen_target,
                truncate_to,
                ..
            } => {
                let truncate = truncate_to
                    .map(|t| format!(", truncate to {t}"))
                    .unwrap_or_default();
                format!("ship {}-{}{truncate}", start.next(), frozen_target)
            }
            PlanKind::Rebuild {
                source:
                    RebuildSource::SnapshotTail {
                        snapshot_lsn,
                        tail_target,
                    },
                ..
            } => {
                format!(
                    "snapshot at {snapshot_lsn}, replay {}-{tail_target}",
                    snapshot_lsn.next()
                )
            }
            PlanKind::Rebuild {
                source:
                    RebuildSource::FullBase {
                        min_base_lsn,
                        reason,
                    },
                ..
            } => {
                format!("full base at >= {min_base_lsn}; because {reason}")
            }
        }
    }

    /// Checks grants against the requests, one for one and in order. Returns the
    /// LSN of the image a rebuild will install, when the plan has one.
    pub fn check_grants(&self, grants: &[ResourceGrant]) -> Result<Option<Lsn>, String> {
        let requests = self.resources();
        if grants.len() != requests.len() {
            return Err(format!(
                "expected {} grants, got {}",
                requests.len(),
                grants.len()
            ));
        }
        let mut image_lsn = None;
        for (grant, request) in grants.iter().zip(&requests) {
            if !grant.granted.satisfies(request) {
                return Err(format!(
                    "grant {:?} does not satisfy {:?}",
                    grant.granted, request
                ));
            }
            match grant.granted {
                GrantedResource::Snapshot { at } => image_lsn = Some(at),
                GrantedResource::FullBase { base_lsn } => image_lsn = Some(base_lsn),
                GrantedResource::WalRetention { .. } => {}
            }
        }
        Ok(image_lsn)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn plan(kind: PlanKind) -> RecoveryPlan {
        RecoveryPlan {
            session: SessionId(1),
            replica: ReplicaId::parse("v/a").unwrap(),
            epoch: Epoch(1),
            kind,
        }
    }

    #[test]
    fn resources_follow_the_plan_kind() {
        let catch_up = plan(PlanKind::CatchUp {
            start: Lsn(10),
            frozen_target: Lsn(20),
            truncate_to: None,
            budget: CatchUpBudget::default(),
        });
        assert_eq!(
            catch_up.resources(),
            vec![ResourceRequest::WalRetention { from: Lsn(10) }]
        );
        let truncate_only = plan(PlanKind::CatchUp {
            start: Lsn(20),
            frozen_target: Lsn(20),
            truncate_to: Some(Lsn(20)),
            budget: CatchUpBudget::default(),
        });
        assert!(truncate_only.resources().is_empty());
        let full = plan(PlanKind::Rebuild {
            source: RebuildSource::FullBase {
                min_base_lsn: Lsn(20),
                reason: "r".into(),
            },
            transfer: crate::delta::Transfer::Staged {
                reason: "test".into(),
            },
        });
        assert_eq!(full.event_name(), "plan_rebuild_full_base");
        assert_eq!(
            full.resources(),
            vec![ResourceRequest::FullBase { at_least: Lsn(20) }]
        );
    }

    #[test]
    fn grants_must_match_requests_in_order() {
        let snap = plan(PlanKind::Rebuild {
            source: RebuildSource::SnapshotTail {
                snapshot_lsn: Lsn(5),
                tail_target: Lsn(9),
            },
            transfer: crate::delta::Transfer::Staged {
                reason: "test".into(),
            },
        });
        let good = [
            ResourceGrant {
                id: ResourceId(1),
                granted: GrantedResource::Snapshot { at: Lsn(5) },
            },
            ResourceGrant {
                id: ResourceId(2),
                granted: GrantedResource::WalRetention { from: Lsn(5) },
            },
        ];
        assert_eq!(snap.check_grants(&good), Ok(Some(Lsn(5))));
        let mut swapped = good;
        swapped.swap(0, 1);
        assert!(snap.check_grants(&swapped).is_err());
        assert!(snap.check_grants(&good[..1]).is_err());
    }
}
