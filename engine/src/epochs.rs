//! Epoch histories and where two logs diverge.
//!
//! Each epoch has one primary, which writes its LSNs in order, so an entry
//! is identified by its (lsn, epoch), not by its LSN alone: after a failover
//! two logs can hold different entries at the same LSN. An [`EpochHistory`]
//! records the first LSN written in each epoch a log holds. Two logs that
//! hold an entry with the same (lsn, epoch) hold the same entries up to it
//! (Raft's log matching property), so the **divergence point** of a
//! replica's log and the primary's is the highest LSN at which both logs are
//! in the same epoch: the end of the last epoch they share. Anything the
//! replica holds after it must be truncated before anything is shipped on
//! top (Kafka's leader-epoch truncation, KIP-101 and KIP-279; DRBD's
//! generation identifiers serve the same end).
//!
//! An LSN below a history's first entry is of unknown epoch (a log opened
//! before histories were kept) and never counts as shared: the answer is
//! then lower than it might be, which costs a larger recovery, never
//! correctness.

use crate::ids::{Epoch, Lsn};
use serde::Serialize;
use std::fmt;

/// The first LSN written in one epoch.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct EpochStart {
    /// The epoch.
    pub epoch: Epoch,
    /// The first LSN written in it.
    pub first: Lsn,
}

/// A history whose entries do not follow each other.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("epoch history out of order: {entry:?} after {previous:?}")]
pub struct EpochOrderError {
    /// The earlier entry.
    pub previous: EpochStart,
    /// The entry that does not follow it.
    pub entry: EpochStart,
}

/// The first LSN of each epoch a log holds, oldest first; epochs and LSNs
/// both strictly increase.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize)]
#[serde(transparent)]
pub struct EpochHistory(Vec<EpochStart>);

/// One epoch's entries in a log: `first..=last`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Run {
    epoch: Epoch,
    first: Lsn,
    last: Lsn,
}

impl EpochHistory {
    /// An empty history (a log that holds nothing yet).
    pub fn new() -> Self {
        Self::default()
    }

    /// A history of one epoch starting at LSN 1, for logs written in a
    /// single epoch from the start.
    pub fn single(epoch: Epoch) -> Self {
        Self(vec![EpochStart {
            epoch,
            first: Lsn(1),
        }])
    }

    /// A history from its entries, checked for order.
    pub fn from_entries(entries: Vec<EpochStart>) -> Result<Self, EpochOrderError> {
        let mut history = Self::new();
        for entry in entries {
            history.record(entry)?;
        }
        Ok(history)
    }

    /// The entries, oldest first.
    pub fn entries(&self) -> &[EpochStart] {
        &self.0
    }

    /// The newest entry.
    pub fn newest(&self) -> Option<EpochStart> {
        self.0.last().copied()
    }

    /// Records that `start.epoch` began at `start.first`. Recording the newest
    /// entry again changes nothing; anything that does not follow it is refused.
    pub fn record(&mut self, start: EpochStart) -> Result<(), EpochOrderError> {
        match self.newest() {
            Some(newest) if newest == start => Ok(()),
            Some(previous) if start.epoch <= previous.epoch || start.first <= previous.first => {
                Err(EpochOrderError {
                    previous,
                    entry: start,
                })
            }
            _ => {
                self.0.push(start);
                Ok(())
            }
        }
    }

    /// The entries of epochs that start at or before `lsn`.
    pub fn through(&self, lsn: Lsn) -> Self {
        Self(self.0.iter().copied().filter(|e| e.first <= lsn).collect())
    }

    /// The epoch of the entry at `lsn` in a log that ends at `end`, if known.
    pub fn epoch_at(&self, lsn: Lsn, end: Lsn) -> Option<Epoch> {
        self.run_at(lsn, end).map(|run| run.epoch)
    }

    fn run_at(&self, lsn: Lsn, end: Lsn) -> Option<Run> {
        self.runs(end)
            .find(|run| run.first <= lsn && lsn <= run.last)
    }

    /// Each epoch's entries in a log that ends at `end`.
    fn runs(&self, end: Lsn) -> impl Iterator<Item = Run> + '_ {
        self.0.iter().enumerate().filter_map(move |(i, start)| {
            let next = self.0.get(i + 1).map_or(end, |next| Lsn(next.first.0 - 1));
            let last = next.min(end);
            (start.first <= last && start.first > Lsn::ZERO).then_some(Run {
                epoch: start.epoch,
                first: start.first,
                last,
            })
        })
    }
}

impl fmt::Display for EpochHistory {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("[")?;
        for (i, entry) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str(", ")?;
            }
            write!(f, "{}@{}", entry.epoch.get(), entry.first)?;
        }
        f.write_str("]")
    }
}

/// Where a replica's log stops matching the primary's.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Divergence {
    /// The highest LSN up to which both logs hold the same entries.
    pub point: Lsn,
    /// Set when the logs disagree about the entry after `point` (both hold
    /// one, of different epochs); unset when `point` is simply where the
    /// shorter log ends.
    pub conflict: Option<Conflict>,
}

/// The first entry two logs disagree about, with the epochs around it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Conflict {
    /// The first LSN the logs disagree about.
    pub lsn: Lsn,
    /// The replica's epoch at `lsn` (unknown below its history).
    pub replica_epoch: Option<Epoch>,
    /// Where that epoch ends in the replica's log.
    pub replica_epoch_end: Lsn,
    /// The primary's epoch at `lsn` (unknown below its history).
    pub primary_epoch: Option<Epoch>,
    /// Where that epoch starts in the primary's log.
    pub primary_epoch_start: Lsn,
}

impl fmt::Display for Conflict {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.replica_epoch {
            Some(epoch) => write!(
                f,
                "replica epoch {} ends at {}",
                epoch.get(),
                self.replica_epoch_end
            )?,
            None => write!(f, "replica epoch at {} unknown", self.lsn)?,
        }
        match self.primary_epoch {
            Some(epoch) => write!(
                f,
                ", primary epoch {} starts at {}",
                epoch.get(),
                self.primary_epoch_start
            ),
            None => write!(f, ", primary epoch at {} unknown", self.lsn),
        }
    }
}

/// The divergence point of a replica's log (history `replica`, ending at
/// `replica_end`) and the primary's (history `primary`, ending at `head`):
/// the end of the last epoch both logs share, at most where either ends.
pub fn divergence(
    primary: &EpochHistory,
    head: Lsn,
    replica: &EpochHistory,
    replica_end: Lsn,
) -> Divergence {
    let mut point = Lsn::ZERO;
    for ours in replica.runs(replica_end) {
        for theirs in primary.runs(head).filter(|run| run.epoch == ours.epoch) {
            let overlap_first = ours.first.max(theirs.first);
            let overlap_last = ours.last.min(theirs.last);
            if overlap_first <= overlap_last {
                point = point.max(overlap_last);
            }
        }
    }
    let common_end = replica_end.min(head);
    let conflict = (point < common_end).then(|| {
        let lsn = point.next();
        let ours = replica.run_at(lsn, replica_end);
        let theirs = primary.run_at(lsn, head);
        Conflict {
            lsn,
            replica_epoch: ours.map(|run| run.epoch),
            replica_epoch_end: ours.map_or(replica_end, |run| run.last),
            primary_epoch: theirs.map(|run| run.epoch),
            primary_epoch_start: theirs.map_or(lsn, |run| run.first),
        }
    });
    Divergence { point, conflict }
}

/// A history from (epoch, first LSN) pairs, for the crate's tests.
#[cfg(test)]
#[allow(clippy::unwrap_used)]
pub(crate) fn history(entries: &[(u64, u64)]) -> EpochHistory {
    EpochHistory::from_entries(
        entries
            .iter()
            .map(|&(epoch, first)| EpochStart {
                epoch: Epoch(epoch),
                first: Lsn(first),
            })
            .collect(),
    )
    .unwrap()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_replica_ahead_in_an_epoch_the_primary_ended_diverges_where_it_ended() {
        // The failover: s2 holds epoch 1 up to 300, the new primary
        // ended epoch 1 at 200 and wrote 201-500 in epoch 2.
        let d = divergence(
            &history(&[(1, 1), (2, 201)]),
            Lsn(500),
            &history(&[(1, 1)]),
            Lsn(300),
        );
        assert_eq!(d.point, Lsn(200));
        let conflict = d.conflict.unwrap();
        assert_eq!(
            conflict.to_string(),
            "replica epoch 1 ends at 300, primary epoch 2 starts at 201"
        );
        assert_eq!(conflict.lsn, Lsn(201));
    }

    #[test]
    fn boundaries_are_exact() {
        let primary = history(&[(1, 1), (2, 201)]);
        let replica = history(&[(1, 1)]);
        // The replica ends exactly where epoch 1 ended: nothing diverges.
        let at = divergence(&primary, Lsn(500), &replica, Lsn(200));
        assert_eq!((at.point, at.conflict), (Lsn(200), None));
        // One entry past it diverges at 200.
        let past = divergence(&primary, Lsn(500), &replica, Lsn(201));
        assert_eq!(past.point, Lsn(200));
        assert_eq!(past.conflict.unwrap().lsn, Lsn(201));
        // One entry short of it is behind, not divergent.
        let short = divergence(&primary, Lsn(500), &replica, Lsn(199));
        assert_eq!((short.point, short.conflict), (Lsn(199), None));
        // The primary has not written in its new epoch: a replica ahead in
        // epoch 1 matches up to the primary's head, without a conflict.
        let ahead = divergence(&history(&[(1, 1)]), Lsn(200), &replica, Lsn(300));
        assert_eq!((ahead.point, ahead.conflict), (Lsn(200), None));
    }

    #[test]
    fn shared_epochs_match_even_when_the_replica_joined_late() {
        // Both logs went through epochs 1, 2 and 3 at the same LSNs.
        let primary = history(&[(1, 1), (2, 50), (3, 90)]);
        let d = divergence(&primary, Lsn(120), &primary.clone(), Lsn(100));
        assert_eq!((d.point, d.conflict), (Lsn(100), None));
        // A replica rebuilt from the primary at 70 carries its history up to 70.
        let rebuilt = primary.through(Lsn(70));
        assert_eq!(rebuilt, history(&[(1, 1), (2, 50)]));
        let d = divergence(&primary, Lsn(120), &rebuilt, Lsn(70));
        assert_eq!((d.point, d.conflict), (Lsn(70), None));
    }

    #[test]
    fn an_epoch_the_primary_never_saw_diverges_where_the_shared_one_ended() {
        // s2 saw a short-lived primary of epoch 2 (151-300); the primary
        // of epoch 3 came from a replica that never did.
        let primary = history(&[(1, 1), (3, 201)]);
        let replica = history(&[(1, 1), (2, 151)]);
        let d = divergence(&primary, Lsn(500), &replica, Lsn(300));
        assert_eq!(d.point, Lsn(150));
        assert_eq!(
            d.conflict.unwrap().to_string(),
            "replica epoch 2 ends at 300, primary epoch 1 starts at 1"
        );
        // The replica is the one that missed an epoch: the same answer.
        let d = divergence(&replica, Lsn(300), &primary, Lsn(500));
        assert_eq!(d.point, Lsn(150));
    }

    #[test]
    fn unknown_epochs_never_count_as_shared() {
        let primary = history(&[(1, 1)]);
        let d = divergence(&primary, Lsn(100), &EpochHistory::new(), Lsn(40));
        assert_eq!(d.point, Lsn::ZERO);
        assert_eq!(
            d.conflict.unwrap().to_string(),
            "replica epoch at 1 unknown, primary epoch 1 starts at 1"
        );
        // A replica with nothing has nothing to disagree about.
        let empty = divergence(&primary, Lsn(100), &EpochHistory::new(), Lsn::ZERO);
        assert_eq!((empty.point, empty.conflict), (Lsn::ZERO, None));
        // A history that starts after LSN 1 knows nothing below its start.
        let late = history(&[(2, 60)]);
        let d = divergence(&history(&[(1, 1), (2, 60)]), Lsn(100), &late, Lsn(90));
        assert_eq!((d.point, d.conflict), (Lsn(90), None));
        assert_eq!(late.epoch_at(Lsn(59), Lsn(90)), None);
        assert_eq!(late.epoch_at(Lsn(60), Lsn(90)), Some(Epoch(2)));
    }

    #[test]
    fn records_only_what_follows() {
        let mut h = history(&[(1, 1)]);
        h.record(EpochStart {
            epoch: Epoch(1),
            first: Lsn(1),
        })
        .unwrap();
        assert!(h
            .record(EpochStart {
                epoch: Epoch(1),
                first: Lsn(5),
            })
            .is_err());
        assert!(h
            .record(EpochStart {
                epoch: Epoch(2),
                first: Lsn(1),
            })
            .is_err());
        h.record(EpochStart {
            epoch: Epoch(4),
            first: Lsn(9),
        })
        .unwrap();
        assert_eq!(h.to_string(), "[1@1, 4@9]");
        assert_eq!(h.epoch_at(Lsn(8), Lsn(20)), Some(Epoch(1)));
        assert_eq!(h.epoch_at(Lsn(21), Lsn(20)), None);
    }
}
