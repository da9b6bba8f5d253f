//! Choosing a replica to promote when the primary is gone.
//!
//! A candidate is eligible only when it is running, in the current epoch, in
//! an eligible state (InSync or Degraded) and holds the committed prefix
//! (`flushed >= committed`). Every rejection carries each reason that applies.
//! Eligible candidates rank by flushed LSN, then freshest heartbeat, then a
//! fixed hash of their id (so that equal replicas share a lost node's
//! volumes), then id: the choice is deterministic.
//!
//! The "desperate" path is separate and explicit: it needs a
//! [`DataLossAccepted`] token, never considers a replica with a partial image
//! (NeedsRebuild, Rebuilding), and reports the committed range that is lost.

use crate::ids::{Epoch, Lsn, ReplicaId, Tick};
use crate::sender::ReplicaState;
use serde::Serialize;

/// What is known of one replica when choosing.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct PromotionCandidate {
    /// The replica.
    pub replica: ReplicaId,
    /// Whether its process answers.
    pub running: bool,
    /// The epoch it last acknowledged.
    pub epoch: Epoch,
    /// Its replication state.
    pub state: ReplicaState,
    /// Its durable LSN.
    pub flushed: Lsn,
    /// When it was last heard from.
    pub last_heartbeat: Tick,
}

/// One reason a candidate cannot be promoted safely.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, thiserror::Error)]
#[serde(rename_all = "snake_case", tag = "reason")]
pub enum Ineligibility {
    /// The replica does not answer.
    #[error("not_running")]
    NotRunning,
    /// The replica is in another epoch.
    #[error("epoch_mismatch: candidate={candidate} current={current}")]
    EpochMismatch {
        /// Candidate's epoch.
        candidate: Epoch,
        /// Current epoch.
        current: Epoch,
    },
    /// The state does not guarantee a consistent image.
    #[error("state_ineligible: {state:?}")]
    StateIneligible {
        /// The state.
        state: ReplicaState,
    },
    /// The replica lacks committed data.
    #[error("behind_committed: flushed={flushed} committed={committed}")]
    BehindCommitted {
        /// Candidate's flushed LSN.
        flushed: Lsn,
        /// Committed LSN.
        committed: Lsn,
    },
}

/// The outcome of evaluating every candidate.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize)]
pub struct PromotionReport {
    /// Eligible candidates, best first.
    pub ranked: Vec<ReplicaId>,
    /// Rejected candidates with every reason.
    pub rejected: Vec<(ReplicaId, Vec<Ineligibility>)>,
}

/// `v/s1 (reason, reason); v/s2 (reason)`.
fn rejections(rejected: &[(ReplicaId, Vec<Ineligibility>)]) -> String {
    let each = rejected.iter().map(|(replica, reasons)| {
        let reasons: Vec<String> = reasons.iter().map(ToString::to_string).collect();
        format!("{replica} ({})", reasons.join(", "))
    });
    each.collect::<Vec<_>>().join("; ")
}

/// No candidate can be promoted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PromotionError {
    /// Nobody is eligible; the report says why for each.
    #[error("no eligible promotion candidate: {}", rejections(.0))]
    NoEligibleCandidate(Vec<(ReplicaId, Vec<Ineligibility>)>),
    /// Not even the desperate path has a candidate.
    #[error("no running candidate with a complete image")]
    NoDesperateCandidate,
}

/// Every reason `candidate` is not safely promotable; empty when it is.
pub fn ineligibility(
    candidate: &PromotionCandidate,
    current_epoch: Epoch,
    committed: Lsn,
) -> Vec<Ineligibility> {
    let mut reasons = Vec::new();
    if !candidate.running {
        reasons.push(Ineligibility::NotRunning);
    }
    if candidate.epoch != current_epoch {
        reasons.push(Ineligibility::EpochMismatch {
            candidate: candidate.epoch,
            current: current_epoch,
        });
    }
    if !matches!(
        candidate.state,
        ReplicaState::InSync | ReplicaState::Degraded
    ) {
        reasons.push(Ineligibility::StateIneligible {
            state: candidate.state,
        });
    }
    if candidate.flushed < committed {
        reasons.push(Ineligibility::BehindCommitted {
            flushed: candidate.flushed,
            committed,
        });
    }
    reasons
}

fn rank(candidates: &mut [&PromotionCandidate]) {
    candidates.sort_by(|a, b| {
        b.flushed
            .cmp(&a.flushed)
            .then(b.last_heartbeat.cmp(&a.last_heartbeat))
            .then(spread(&a.replica).cmp(&spread(&b.replica)))
            .then(a.replica.cmp(&b.replica))
    });
}

/// Where a tie between equal candidates falls: a fixed hash (FNV-1a, 64
/// bits) of the replica's id, which names its volume. Tied by id alone,
/// the node whose name sorts first took every volume a lost node was
/// primary for (all 3,334 at 10,000 volumes, and the failover's tail with
/// them); by this, each surviving node takes its share. The same on every
/// controller and every release: no per-process seed.
fn spread(replica: &ReplicaId) -> u64 {
    replica
        .as_str()
        .bytes()
        .fold(0xcbf2_9ce4_8422_2325, |hash, byte| {
            (hash ^ u64::from(byte)).wrapping_mul(0x0000_0100_0000_01b3)
        })
}

/// Evaluates and ranks every candidate.
pub fn evaluate(
    candidates: &[PromotionCandidate],
    current_epoch: Epoch,
    committed: Lsn,
) -> PromotionReport {
    let mut eligible = Vec::new();
    let mut rejected = Vec::new();
    for candidate in candidates {
        let reasons = ineligibility(candidate, current_epoch, committed);
        if reasons.is_empty() {
            eligible.push(candidate);
        } else {
            rejected.push((candidate.replica.clone(), reasons));
        }
    }
    rank(&mut eligible);
    PromotionReport {
        ranked: eligible.into_iter().map(|c| c.replica.clone()).collect(),
        rejected,
    }
}

/// Picks the best safely promotable candidate.
pub fn select(
    candidates: &[PromotionCandidate],
    current_epoch: Epoch,
    committed: Lsn,
) -> Result<ReplicaId, PromotionError> {
    let report = evaluate(candidates, current_epoch, committed);
    report
        .ranked
        .into_iter()
        .next()
        .ok_or(PromotionError::NoEligibleCandidate(report.rejected))
}

/// Proof that the operator accepted losing committed data. Only this path takes it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DataLossAccepted;

/// A promotion made on the desperate path.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct DesperatePromotion {
    /// The chosen replica.
    pub replica: ReplicaId,
    /// Committed LSNs it does not hold: `(flushed, committed]`, empty when none.
    pub lost_from_exclusive: Lsn,
    /// End of the lost range.
    pub lost_to_inclusive: Lsn,
    /// Why it was not safely eligible.
    pub waived: Vec<Ineligibility>,
}

/// Picks the running candidate with the most data, whatever its epoch or lag,
/// excluding partial images. Says exactly what is lost.
pub fn select_desperate(
    candidates: &[PromotionCandidate],
    current_epoch: Epoch,
    committed: Lsn,
    _accepted: DataLossAccepted,
) -> Result<DesperatePromotion, PromotionError> {
    let mut usable: Vec<&PromotionCandidate> = candidates
        .iter()
        .filter(|c| c.running)
        .filter(|c| {
            !matches!(
                c.state,
                ReplicaState::NeedsRebuild | ReplicaState::Rebuilding
            )
        })
        .collect();
    rank(&mut usable);
    let best = usable.first().ok_or(PromotionError::NoDesperateCandidate)?;
    Ok(DesperatePromotion {
        replica: best.replica.clone(),
        lost_from_exclusive: best.flushed.min(committed),
        lost_to_inclusive: committed,
        waived: ineligibility(best, current_epoch, committed),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn candidate(name: &str, state: ReplicaState, flushed: u64) -> PromotionCandidate {
        PromotionCandidate {
            replica: ReplicaId::new("v", name).unwrap(),
            running: true,
            epoch: Epoch(3),
            state,
            flushed: Lsn(flushed),
            last_heartbeat: Tick(10),
        }
    }

    #[test]
    fn ranking_prefers_more_data_then_fresher_heartbeat_then_id() {
        let mut b = candidate("b", ReplicaState::InSync, 100);
        b.last_heartbeat = Tick(20);
        let cands = [
            candidate("a", ReplicaState::InSync, 100),
            b,
            candidate("c", ReplicaState::Degraded, 120),
        ];
        let report = evaluate(&cands, Epoch(3), Lsn(100));
        let names: Vec<&str> = report.ranked.iter().map(|r| r.server()).collect();
        assert_eq!(names, ["c", "b", "a"]);
    }

    #[test]
    fn equal_candidates_share_the_volumes_of_a_lost_primary() {
        let mut chosen: std::collections::BTreeMap<String, usize> = Default::default();
        for v in 0..1000 {
            let volume = format!("v{v}");
            let cands: Vec<PromotionCandidate> = ["node2", "node3"]
                .iter()
                .map(|node| PromotionCandidate {
                    replica: ReplicaId::new(&volume, node).unwrap(),
                    ..candidate(node, ReplicaState::InSync, 100)
                })
                .collect();
            let pick = select(&cands, Epoch(3), Lsn(100)).unwrap();
            // The same choice whatever order they come in.
            let reversed: Vec<PromotionCandidate> = cands.iter().rev().cloned().collect();
            assert_eq!(select(&reversed, Epoch(3), Lsn(100)).unwrap(), pick);
            *chosen.entry(pick.server().to_owned()).or_default() += 1;
        }
        assert!(
            chosen.values().all(|&n| (400..=600).contains(&n)),
            "{chosen:?}"
        );
    }

    #[test]
    fn desperate_path_reports_loss_and_skips_partial_images() {
        let cands = [
            candidate("a", ReplicaState::CatchingUp, 80),
            candidate("b", ReplicaState::Rebuilding, 95),
        ];
        assert!(matches!(
            select(&cands, Epoch(3), Lsn(100)),
            Err(PromotionError::NoEligibleCandidate(_))
        ));
        let pick = select_desperate(&cands, Epoch(3), Lsn(100), DataLossAccepted).unwrap();
        assert_eq!(pick.replica.server(), "a");
        assert_eq!(
            (pick.lost_from_exclusive, pick.lost_to_inclusive),
            (Lsn(80), Lsn(100))
        );
        assert_eq!(pick.waived.len(), 2);
    }
}
