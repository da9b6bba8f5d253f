//! What the primary's WAL can still replay, and the decisions that follow
//! from it: handshake classification and rebuild-source selection.
//! A handshake first matches the replica's log against the primary's by
//! epoch (see [`crate::epochs`]): LSNs are compared only up to the
//! divergence point.
//!
//! The WAL retains the entries `(tail, head]`; `tail` is the last recycled
//! LSN, so retention starts at `tail + 1`. Every decision comes with a
//! [`RecoverabilityProof`] whose `reason` says, in words an operator can
//! check, why it was made.

use crate::epochs::{divergence, Divergence, EpochHistory};
use crate::ids::Lsn;
use serde::Serialize;
use std::fmt;

/// The primary's retained WAL, as the engine sees it when it decides.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize)]
pub struct RetainedHistory {
    /// Highest LSN written to the WAL.
    pub head: Lsn,
    /// Last recycled LSN: entries `<= tail` are gone.
    pub tail: Lsn,
    /// Highest LSN committed under the volume's commit mode.
    pub committed: Lsn,
    /// LSN the extent (and its snapshot) is known to contain.
    pub checkpoint: Lsn,
    /// Whether the checkpoint is backed by a valid superblock.
    pub checkpoint_trusted: bool,
}

/// A history whose fields contradict each other.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HistoryError {
    /// The tail is past the head.
    #[error("tail {tail} is past head {head}")]
    TailPastHead {
        /// Reported tail.
        tail: Lsn,
        /// Reported head.
        head: Lsn,
    },
    /// The committed LSN is past the head: nothing can be committed that was not written.
    #[error("committed {committed} is past head {head}")]
    CommittedPastHead {
        /// Reported committed LSN.
        committed: Lsn,
        /// Reported head.
        head: Lsn,
    },
    /// The checkpoint is past the head.
    #[error("checkpoint {checkpoint} is past head {head}")]
    CheckpointPastHead {
        /// Reported checkpoint.
        checkpoint: Lsn,
        /// Reported head.
        head: Lsn,
    },
}

impl RetainedHistory {
    /// Checks that the fields are consistent.
    pub fn validate(&self) -> Result<(), HistoryError> {
        let head = self.head;
        if self.tail > head {
            return Err(HistoryError::TailPastHead {
                tail: self.tail,
                head,
            });
        }
        if self.committed > head {
            return Err(HistoryError::CommittedPastHead {
                committed: self.committed,
                head,
            });
        }
        if self.checkpoint > head {
            return Err(HistoryError::CheckpointPastHead {
                checkpoint: self.checkpoint,
                head,
            });
        }
        Ok(())
    }

    /// First LSN still retained (`tail + 1`).
    pub const fn retention_start(&self) -> Lsn {
        self.tail.next()
    }

    /// Whether the entries `(start_exclusive, end_inclusive]` can be replayed
    /// from the retained WAL: the range is contiguous (`start <= end`), starts
    /// at or after the tail, and ends at or before the head.
    pub fn is_recoverable(&self, start_exclusive: Lsn, end_inclusive: Lsn) -> bool {
        start_exclusive <= end_inclusive
            && start_exclusive >= self.tail
            && end_inclusive <= self.head
    }

    fn range_words(&self, start_exclusive: Lsn, end_inclusive: Lsn) -> String {
        let need = if start_exclusive < end_inclusive {
            format!("need {}-{}", start_exclusive.next(), end_inclusive)
        } else {
            "need none".to_owned()
        };
        format!("{need}, tail={} head={}", self.tail, self.head)
    }
}

/// What a replica says of its log in the handshake.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize)]
pub struct ReplicaLog {
    /// Its durable LSN.
    pub flushed: Lsn,
    /// Its checkpoint: entries up to here are in its extent and cannot be
    /// truncated away.
    pub checkpoint: Lsn,
    /// Which epoch wrote which part of its log.
    pub epochs: EpochHistory,
    /// The highest LSN it knows was committed (a primary told it so): it
    /// refuses to truncate below it, and a primary whose log ends before
    /// it must not truncate or rebuild it.
    pub committed: Lsn,
    /// An install in place it has not finished: it holds part of an
    /// image, and no log to build on.
    pub partial: Option<crate::delta::PartialImage>,
}

impl ReplicaLog {
    /// A log written in one epoch from LSN 1 up to `flushed`, nothing checkpointed.
    pub fn single_epoch(flushed: Lsn, epoch: crate::ids::Epoch) -> Self {
        Self {
            flushed,
            checkpoint: Lsn::ZERO,
            epochs: if flushed > Lsn::ZERO {
                EpochHistory::single(epoch)
            } else {
                EpochHistory::new()
            },
            committed: Lsn::ZERO,
            partial: None,
        }
    }
}

/// Which way a handshake went.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Verdict {
    /// The replica holds exactly the committed prefix.
    ZeroGap,
    /// The missing range is still in the retained WAL.
    CatchUp,
    /// The missing range is gone: only a rebuild can help.
    NeedsRebuild,
}

/// Why a recovery decision was made, with the numbers it was made from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct RecoverabilityProof {
    /// The decision.
    pub verdict: Verdict,
    /// Replica's durable (flushed) LSN at handshake.
    pub flushed: Lsn,
    /// Where the replica's log stops matching the primary's.
    pub divergence: Divergence,
    /// The history the decision was made against.
    pub history: RetainedHistory,
    /// Human-readable reason: `zero_gap`, `gap_within_retention: need a-b, tail=.. head=..`,
    /// `replica_ahead: ...`, `divergent_tail: ...`, `gap_beyond_retention: ...`.
    pub reason: String,
}

impl fmt::Display for RecoverabilityProof {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.reason)
    }
}

/// The result of classifying a handshake.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HandshakeOutcome {
    /// Nothing to ship: the replica goes straight to InSync.
    ZeroGap {
        /// Why.
        proof: RecoverabilityProof,
    },
    /// Ship `(start, target]` from the retained WAL, after truncating the
    /// replica to `truncate_to` when it holds entries past `start` (ahead of
    /// committed, or of another epoch than the primary's).
    CatchUp {
        /// Last LSN the replica keeps (exclusive start of the range to ship).
        start: Lsn,
        /// Committed LSN at handshake time; frozen for the whole catch-up.
        target: Lsn,
        /// Set when the replica must drop what it holds after `start` first.
        truncate_to: Option<Lsn>,
        /// Why.
        proof: RecoverabilityProof,
    },
    /// The gap is not in the retained WAL.
    NeedsRebuild {
        /// Why.
        proof: RecoverabilityProof,
    },
}

impl HandshakeOutcome {
    /// The proof behind the outcome.
    pub fn proof(&self) -> &RecoverabilityProof {
        match self {
            Self::ZeroGap { proof }
            | Self::CatchUp { proof, .. }
            | Self::NeedsRebuild { proof } => proof,
        }
    }
}

/// Classifies a handshake: the replica reports its `log`, the primary knows
/// its retained `history` and its epoch history `epochs`.
///
/// - First the logs are matched by epoch: a replica holding entries of
///   another epoch than the primary's at the same LSNs has a divergent tail.
///   It keeps `min(divergence point, committed)`, must truncate to it, and
///   catches up from there (`divergent_tail: ...`), or needs a rebuild when
///   that point is below its own checkpoint or below the WAL's retention;
/// - zero gap iff `flushed == committed` and the WAL still holds
///   `(committed, head]`, which live shipping will send next;
/// - a replica ahead of committed catches up with a mandatory truncation to committed
///   (what it holds past committed was never acknowledged and must not be revived);
/// - catch-up iff `(flushed, committed]` is recoverable from the retained WAL;
/// - otherwise it needs a rebuild. A replica at or ahead of committed whose
///   live tail `(committed, head]` was recycled also needs one
///   (`live_tail_beyond_retention`).
pub fn classify_handshake(
    log: &ReplicaLog,
    history: &RetainedHistory,
    epochs: &EpochHistory,
) -> HandshakeOutcome {
    let committed = history.committed;
    let flushed = log.flushed;
    let divergence = divergence(epochs, history.head, &log.epochs, flushed);
    let proof = |verdict, reason: String| RecoverabilityProof {
        verdict,
        flushed,
        divergence,
        history: *history,
        reason,
    };
    let rebuild = |reason: String| HandshakeOutcome::NeedsRebuild {
        proof: proof(Verdict::NeedsRebuild, reason),
    };
    if let Some(partial) = log.partial {
        // Its extent mixes what it held with part of an image: nothing
        // can be caught up onto it.
        return rebuild(format!(
            "rebuild_interrupted: the replica holds part of an image at {}",
            partial.image_lsn
        ));
    }
    if let Some(conflict) = divergence.conflict {
        let keep = divergence.point.min(committed);
        let prefix = format!("divergent_tail: {conflict}: truncate to {keep}");
        if keep < log.checkpoint {
            return rebuild(format!(
                "{prefix}, below the replica's checkpoint {}",
                log.checkpoint
            ));
        }
        // What it keeps must be followed by the WAL up to the head: the
        // catch-up ships (keep, committed], live shipping the rest.
        let words = history.range_words(keep, committed);
        if !history.is_recoverable(keep, history.head) {
            return rebuild(format!("{prefix}, gap_beyond_retention: {words}"));
        }
        return HandshakeOutcome::CatchUp {
            start: keep,
            target: committed,
            truncate_to: Some(keep),
            proof: proof(Verdict::CatchUp, format!("{prefix}, {words}")),
        };
    }
    // Whatever the gap, an InSync replica is then live-shipped from committed
    // on: (committed, head] must still be in the WAL.
    let live_tail_retained = history.is_recoverable(committed.min(flushed), history.head);
    if flushed >= committed && !live_tail_retained {
        let reason = format!(
            "live_tail_beyond_retention: {}",
            history.range_words(committed, history.head)
        );
        return rebuild(reason);
    }
    if flushed == committed {
        return HandshakeOutcome::ZeroGap {
            proof: proof(Verdict::ZeroGap, "zero_gap".into()),
        };
    }
    if flushed > committed {
        let reason = format!(
            "replica_ahead: flushed={flushed} committed={committed}, truncate to {committed}"
        );
        if committed < log.checkpoint {
            return rebuild(format!(
                "{reason}, below the replica's checkpoint {}",
                log.checkpoint
            ));
        }
        return HandshakeOutcome::CatchUp {
            start: committed,
            target: committed,
            truncate_to: Some(committed),
            proof: proof(Verdict::CatchUp, reason),
        };
    }
    let words = history.range_words(flushed, committed);
    if history.is_recoverable(flushed, committed) {
        HandshakeOutcome::CatchUp {
            start: flushed,
            target: committed,
            truncate_to: None,
            proof: proof(Verdict::CatchUp, format!("gap_within_retention: {words}")),
        }
    } else {
        rebuild(format!("gap_beyond_retention: {words}"))
    }
}

/// Where a rebuild takes its data from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case", tag = "source")]
pub enum RebuildSource {
    /// The extent image at the trusted checkpoint, then the WAL `(snapshot_lsn, tail_target]`.
    SnapshotTail {
        /// Checkpoint LSN the snapshot holds.
        snapshot_lsn: Lsn,
        /// Committed LSN the tail replay must reach.
        tail_target: Lsn,
    },
    /// The whole extent at a base LSN of at least `min_base_lsn`.
    FullBase {
        /// The base must contain at least this LSN (committed at plan time).
        min_base_lsn: Lsn,
        /// Why a snapshot+tail rebuild was not possible.
        reason: String,
    },
}

/// Chooses the rebuild source: snapshot+tail only with a trusted checkpoint whose
/// tail `(checkpoint, committed]` is still replayable; otherwise full base, with
/// the causal reason.
pub fn select_rebuild_source(history: &RetainedHistory) -> RebuildSource {
    let committed = history.committed;
    if !history.checkpoint_trusted {
        return RebuildSource::FullBase {
            min_base_lsn: committed,
            reason: format!("checkpoint_untrusted: checkpoint={}", history.checkpoint),
        };
    }
    if history.checkpoint > committed {
        // The extent holds data past committed; shipping it would revive uncommitted writes.
        return RebuildSource::FullBase {
            min_base_lsn: committed,
            reason: format!(
                "checkpoint_past_committed: checkpoint={} committed={committed}",
                history.checkpoint
            ),
        };
    }
    if history.is_recoverable(history.checkpoint, committed) {
        RebuildSource::SnapshotTail {
            snapshot_lsn: history.checkpoint,
            tail_target: committed,
        }
    } else {
        RebuildSource::FullBase {
            min_base_lsn: committed,
            reason: format!(
                "tail_unreplayable: {}",
                history.range_words(history.checkpoint, committed)
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::epochs::EpochStart;
    use crate::ids::Epoch;

    /// A replica and a primary that both wrote only in epoch 1.
    fn classify(flushed: Lsn, h: &RetainedHistory) -> HandshakeOutcome {
        let log = ReplicaLog::single_epoch(flushed, Epoch(1));
        classify_handshake(&log, h, &EpochHistory::single(Epoch(1)))
    }

    /// The failover: the primary ended epoch 1 at 200 and wrote
    /// 201-500 in epoch 2; the replica holds epoch 1 up to 300.
    fn divergent(checkpoint: u64, tail: u64, committed: u64) -> HandshakeOutcome {
        let primary = EpochHistory::from_entries(vec![
            EpochStart {
                epoch: Epoch(1),
                first: Lsn(1),
            },
            EpochStart {
                epoch: Epoch(2),
                first: Lsn(201),
            },
        ])
        .unwrap();
        let log = ReplicaLog {
            flushed: Lsn(300),
            checkpoint: Lsn(checkpoint),
            epochs: EpochHistory::single(Epoch(1)),
            committed: Lsn::ZERO,
            partial: None,
        };
        classify_handshake(&log, &history(tail, 500, committed), &primary)
    }

    fn history(tail: u64, head: u64, committed: u64) -> RetainedHistory {
        RetainedHistory {
            head: Lsn(head),
            tail: Lsn(tail),
            committed: Lsn(committed),
            checkpoint: Lsn(tail),
            checkpoint_trusted: true,
        }
    }

    #[test]
    fn zero_gap_only_on_exact_equality() {
        let h = history(10, 100, 90);
        assert!(matches!(
            classify(Lsn(90), &h),
            HandshakeOutcome::ZeroGap { .. }
        ));
        assert!(matches!(
            classify(Lsn(89), &h),
            HandshakeOutcome::CatchUp { .. }
        ));
        assert!(matches!(
            classify(Lsn(91), &h),
            HandshakeOutcome::CatchUp { .. }
        ));
    }

    #[test]
    fn recoverable_needs_contiguous_range_inside_retention() {
        let h = history(10, 100, 90);
        assert!(h.is_recoverable(Lsn(10), Lsn(100)));
        assert!(!h.is_recoverable(Lsn(9), Lsn(100)));
        assert!(!h.is_recoverable(Lsn(10), Lsn(101)));
        assert!(!h.is_recoverable(Lsn(50), Lsn(40)));
        assert!(h.is_recoverable(Lsn(50), Lsn(50)));
    }

    #[test]
    fn proof_reasons_name_the_range_and_bounds() {
        let h = history(10, 100, 90);
        let within = classify(Lsn(10), &h);
        assert_eq!(
            within.proof().reason,
            "gap_within_retention: need 11-90, tail=10 head=100"
        );
        let beyond = classify(Lsn(9), &h);
        assert_eq!(
            beyond.proof().reason,
            "gap_beyond_retention: need 10-90, tail=10 head=100"
        );
        assert_eq!(beyond.proof().verdict, Verdict::NeedsRebuild);
    }

    #[test]
    fn zero_gap_needs_the_live_tail_in_the_wal() {
        // Committed stalled at 10 (sync_all, a replica lost) while the WAL recycled to 105.
        let h = history(105, 200, 10);
        let outcome = classify(Lsn(10), &h);
        assert_eq!(
            outcome.proof().reason,
            "live_tail_beyond_retention: need 11-200, tail=105 head=200"
        );
        assert_eq!(outcome.proof().verdict, Verdict::NeedsRebuild);
        assert!(matches!(
            classify(Lsn(12), &h),
            HandshakeOutcome::NeedsRebuild { .. }
        ));
    }

    #[test]
    fn validate_rejects_contradictions() {
        assert!(history(10, 100, 90).validate().is_ok());
        assert!(matches!(
            history(101, 100, 90).validate(),
            Err(HistoryError::TailPastHead { .. })
        ));
        assert!(matches!(
            history(10, 100, 101).validate(),
            Err(HistoryError::CommittedPastHead { .. })
        ));
    }

    #[test]
    fn rebuild_source_prefers_trusted_snapshot_with_replayable_tail() {
        let mut h = history(10, 100, 90);
        h.checkpoint = Lsn(40);
        assert_eq!(
            select_rebuild_source(&h),
            RebuildSource::SnapshotTail {
                snapshot_lsn: Lsn(40),
                tail_target: Lsn(90)
            }
        );
        h.checkpoint_trusted = false;
        assert!(matches!(
            select_rebuild_source(&h),
            RebuildSource::FullBase { ref reason, .. } if reason.starts_with("checkpoint_untrusted")
        ));
        h.checkpoint_trusted = true;
        h.checkpoint = Lsn(5);
        assert!(matches!(
            select_rebuild_source(&h),
            RebuildSource::FullBase { ref reason, .. }
                if reason == "tail_unreplayable: need 6-90, tail=10 head=100"
        ));
    }

    #[test]
    fn a_divergent_tail_is_truncated_to_the_divergence_point_then_caught_up() {
        let outcome = divergent(150, 0, 500);
        assert_eq!(
            outcome.proof().reason,
            "divergent_tail: replica epoch 1 ends at 300, primary epoch 2 starts at 201: \
             truncate to 200, need 201-500, tail=0 head=500"
        );
        assert_eq!(
            outcome,
            HandshakeOutcome::CatchUp {
                start: Lsn(200),
                target: Lsn(500),
                truncate_to: Some(Lsn(200)),
                proof: outcome.proof().clone(),
            }
        );
        assert_eq!(outcome.proof().divergence.point, Lsn(200));
        // Committed below the divergence point: keep only what is committed.
        let outcome = divergent(0, 0, 150);
        assert!(matches!(
            outcome,
            HandshakeOutcome::CatchUp {
                start: Lsn(150),
                target: Lsn(150),
                truncate_to: Some(Lsn(150)),
                ..
            }
        ));
        assert!(outcome
            .proof()
            .reason
            .ends_with("truncate to 150, need none, tail=0 head=500"));
    }

    #[test]
    fn a_divergent_tail_rebuilds_at_the_boundaries() {
        // The replica's checkpoint is exactly the divergence point: truncation works.
        assert!(matches!(
            divergent(200, 0, 500),
            HandshakeOutcome::CatchUp { .. }
        ));
        // One past it: the replica cannot drop what its extent holds.
        let outcome = divergent(201, 0, 500);
        assert_eq!(outcome.proof().verdict, Verdict::NeedsRebuild);
        assert!(outcome
            .proof()
            .reason
            .ends_with("truncate to 200, below the replica's checkpoint 201"));
        // The WAL still holds 201 on: catch-up. Recycled through 201: rebuild.
        assert!(matches!(
            divergent(0, 200, 500),
            HandshakeOutcome::CatchUp { .. }
        ));
        let outcome = divergent(0, 201, 500);
        assert_eq!(
            outcome.proof().reason,
            "divergent_tail: replica epoch 1 ends at 300, primary epoch 2 starts at 201: \
             truncate to 200, gap_beyond_retention: need 201-500, tail=201 head=500"
        );
    }

    #[test]
    fn a_replica_ahead_of_committed_cannot_truncate_below_its_checkpoint() {
        let h = history(10, 100, 90);
        let log = ReplicaLog {
            flushed: Lsn(100),
            checkpoint: Lsn(95),
            epochs: EpochHistory::single(Epoch(1)),
            committed: Lsn::ZERO,
            partial: None,
        };
        let outcome = classify_handshake(&log, &h, &EpochHistory::single(Epoch(1)));
        assert_eq!(
            outcome.proof().reason,
            "replica_ahead: flushed=100 committed=90, truncate to 90, below the replica's checkpoint 95"
        );
        assert_eq!(outcome.proof().verdict, Verdict::NeedsRebuild);
    }
}
