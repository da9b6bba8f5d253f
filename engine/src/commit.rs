//! Commit modes and barrier tracking.
//!
//! The committed LSN is the highest LSN whose whole prefix is durable on the
//! set of members the mode requires:
//! - `best_effort`: the primary alone;
//! - `sync_all`: the primary and every replica, all of them InSync;
//! - `sync_quorum`: `n/2 + 1` of the `n` members (primary included), counting
//!   only InSync replicas.
//!
//! The primary's own durability may be reported out of order (group commits
//! finishing in any order); only the contiguous durable prefix counts. The
//! committed LSN never decreases. A barrier resolves once committed reaches
//! its LSN or fails at its deadline; an ack naming a barrier that already
//! timed out is rejected, so a late ack can never turn a reported failure
//! into a success.

use crate::ids::{BarrierId, Lsn, ReplicaId, Tick};
use crate::sender::ReplicaState;
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::fmt;
use std::str::FromStr;

/// How many members must hold a write before it is committed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CommitMode {
    /// Durable on the primary.
    #[default]
    BestEffort,
    /// Durable on the primary and every replica.
    SyncAll,
    /// Durable on a majority of members, primary included.
    SyncQuorum,
}

impl CommitMode {
    /// The mode's name as used in configuration.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::BestEffort => "best_effort",
            Self::SyncAll => "sync_all",
            Self::SyncQuorum => "sync_quorum",
        }
    }
}

impl fmt::Display for CommitMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for CommitMode {
    type Err = CommitError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "best_effort" => Ok(Self::BestEffort),
            "sync_all" => Ok(Self::SyncAll),
            "sync_quorum" => Ok(Self::SyncQuorum),
            other => Err(CommitError::UnknownMode(other.to_owned())),
        }
    }
}

/// A replica a timed-out barrier waited on, with what is known of why.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Lagging {
    /// The replica.
    pub replica: ReplicaId,
    /// Its replication state when the barrier failed.
    pub state: ReplicaState,
    /// Why it is not in sync, when its last session failed.
    pub cause: Option<String>,
}

impl fmt::Display for Lagging {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} ({:?}", self.replica, self.state)?;
        if let Some(cause) = &self.cause {
            write!(f, ", {cause}")?;
        }
        f.write_str(")")
    }
}

struct LaggingList<'a>(&'a [Lagging]);

impl fmt::Display for LaggingList<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("[")?;
        for (i, lagging) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str(", ")?;
            }
            write!(f, "{lagging}")?;
        }
        f.write_str("]")
    }
}

/// Why a barrier failed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, thiserror::Error)]
#[serde(rename_all = "snake_case", tag = "failure")]
pub enum BarrierFailure {
    /// The deadline passed before `lsn` was committed.
    #[error(
        "barrier at {lsn} timed out ({mode}): committed={committed}, lagging={}",
        LaggingList(lagging)
    )]
    TimedOut {
        /// The barrier's LSN.
        lsn: Lsn,
        /// Committed LSN when it failed.
        committed: Lsn,
        /// The mode in force.
        mode: CommitMode,
        /// Replicas that were not InSync or not durable at `lsn`, with why.
        lagging: Vec<Lagging>,
    },
    /// The epoch changed while the barrier waited; the new primary decides.
    #[error("barrier at {lsn} fenced by an epoch change")]
    Fenced {
        /// The barrier's LSN.
        lsn: Lsn,
    },
}

/// A commit-tracking input that was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CommitError {
    /// The mode cannot be met by this membership.
    #[error("sync_quorum needs at least 3 members (primary + 2 replicas); {members} members would need {quorum} acks, so any one failure blocks or the primary alone commits")]
    ImpossibleQuorum {
        /// Members including the primary.
        members: usize,
        /// The quorum that would be needed.
        quorum: usize,
    },
    /// Unknown mode name.
    #[error("unknown commit mode {0:?}: expected best_effort, sync_all or sync_quorum")]
    UnknownMode(String),
    /// The ack came from a replica that is not a member.
    #[error("ack from {0}, which is not a member")]
    UnknownReplica(ReplicaId),
    /// The ack names a barrier that already timed out.
    #[error("late ack from {replica} for barrier {barrier}, which already timed out")]
    LateAck {
        /// Who acked.
        replica: ReplicaId,
        /// The timed-out barrier.
        barrier: BarrierId,
    },
    /// The barrier asks for an LSN that was never written.
    #[error("barrier at {lsn} is past the head {head}")]
    BarrierPastHead {
        /// Requested LSN.
        lsn: Lsn,
        /// Highest written LSN.
        head: Lsn,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize)]
struct ReplicaDurability {
    durable: Lsn,
    in_sync: bool,
    /// The committed LSN it says it knows (its acks echo it).
    told: Lsn,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct PendingBarrier {
    lsn: Lsn,
    deadline: Tick,
    /// What was committed when it was asked for: every write acknowledged
    /// before it. It resolves only once the replicas the mode counts know
    /// that much is committed (their floor: nothing truncates below it).
    tell: Lsn,
}

/// How many timed-out barrier ids are remembered to reject late acks.
const TIMED_OUT_MEMORY: usize = 4096;

/// Tracks durability per member and resolves barriers.
#[derive(Debug, Clone)]
pub struct CommitTracker {
    mode: CommitMode,
    local_durable: Lsn,
    local_pending: BTreeMap<Lsn, Lsn>,
    replicas: BTreeMap<ReplicaId, ReplicaDurability>,
    committed: Lsn,
    barriers: BTreeMap<BarrierId, PendingBarrier>,
    timed_out: VecDeque<BarrierId>,
    timed_out_set: BTreeSet<BarrierId>,
    next_barrier: u64,
}

/// Checks that `mode` can be met by `replicas` replicas plus the primary.
pub fn check_topology(mode: CommitMode, replicas: usize) -> Result<(), CommitError> {
    let members = replicas + 1;
    if mode == CommitMode::SyncQuorum && members < 3 {
        return Err(CommitError::ImpossibleQuorum {
            members,
            quorum: members / 2 + 1,
        });
    }
    Ok(())
}

impl CommitTracker {
    /// A best-effort tracker with no replicas, starting from `committed`.
    pub fn best_effort(committed: Lsn) -> Self {
        Self {
            mode: CommitMode::BestEffort,
            local_durable: committed,
            local_pending: BTreeMap::new(),
            replicas: BTreeMap::new(),
            committed,
            barriers: BTreeMap::new(),
            timed_out: VecDeque::new(),
            timed_out_set: BTreeSet::new(),
            next_barrier: 1,
        }
    }

    /// A tracker for `mode` over `replicas`, starting from `committed`.
    pub fn new(
        mode: CommitMode,
        replicas: impl IntoIterator<Item = ReplicaId>,
        committed: Lsn,
    ) -> Result<Self, CommitError> {
        let mut tracker = Self::best_effort(committed);
        tracker.reconfigure(mode, replicas)?;
        Ok(tracker)
    }

    /// The mode.
    pub fn mode(&self) -> CommitMode {
        self.mode
    }

    /// The committed LSN.
    pub fn committed(&self) -> Lsn {
        self.committed
    }

    /// The primary's contiguous durable LSN.
    pub fn local_durable(&self) -> Lsn {
        self.local_durable
    }

    /// A replica's last acknowledged durable LSN.
    pub fn replica_durable(&self, replica: &ReplicaId) -> Option<Lsn> {
        self.replicas.get(replica).map(|r| r.durable)
    }

    /// Members (primary included) whose acks make a quorum.
    pub fn quorum(&self) -> usize {
        let members = self.replicas.len() + 1;
        members / 2 + 1
    }

    /// Number of barriers waiting.
    pub fn pending_barriers(&self) -> usize {
        self.barriers.len()
    }

    /// Changes mode and membership, keeping what is known of members that stay.
    pub fn reconfigure(
        &mut self,
        mode: CommitMode,
        replicas: impl IntoIterator<Item = ReplicaId>,
    ) -> Result<(), CommitError> {
        let wanted: BTreeSet<ReplicaId> = replicas.into_iter().collect();
        check_topology(mode, wanted.len())?;
        self.mode = mode;
        self.replicas.retain(|id, _| wanted.contains(id));
        for id in wanted {
            self.replicas.entry(id).or_default();
        }
        Ok(())
    }

    /// Marks whether a replica counts toward commits.
    pub fn set_in_sync(&mut self, replica: &ReplicaId, in_sync: bool) {
        if let Some(r) = self.replicas.get_mut(replica) {
            r.in_sync = in_sync;
            if !in_sync {
                // It may come back knowing less (a restart keeps only what
                // its last checkpoint persisted): its acks say again.
                r.told = Lsn::ZERO;
            }
        }
    }

    /// Sets a replica's durable LSN outright (after truncation or rebuild its
    /// durable point may legitimately move backwards).
    pub fn reset_replica_durable(&mut self, replica: &ReplicaId, durable: Lsn) {
        if let Some(r) = self.replicas.get_mut(replica) {
            r.durable = durable;
        }
    }

    /// Records that the primary made `(from_exclusive, to_inclusive]` durable.
    /// Ranges may arrive in any order; only the contiguous prefix counts.
    pub fn record_local_durable(&mut self, from_exclusive: Lsn, to_inclusive: Lsn) {
        if to_inclusive <= self.local_durable {
            return;
        }
        let entry = self
            .local_pending
            .entry(from_exclusive)
            .or_insert(to_inclusive);
        *entry = (*entry).max(to_inclusive);
        while let Some((&from, &to)) = self.local_pending.first_key_value() {
            if from > self.local_durable {
                break;
            }
            self.local_pending.pop_first();
            self.local_durable = self.local_durable.max(to);
        }
    }

    /// Records a replica's durable ack (with the committed LSN it knows),
    /// optionally naming the barrier it answers.
    ///
    /// An ack naming a barrier that already timed out is refused as an answer
    /// (`LateAck`: that barrier's failure stands), but what it says about the
    /// replica's disk is still true and is recorded first: it may commit later
    /// writes and resolve barriers that are still waiting.
    pub fn record_ack(
        &mut self,
        replica: &ReplicaId,
        durable: Lsn,
        told: Lsn,
        barrier: Option<BarrierId>,
    ) -> Result<(), CommitError> {
        let r = self
            .replicas
            .get_mut(replica)
            .ok_or_else(|| CommitError::UnknownReplica(replica.clone()))?;
        r.durable = r.durable.max(durable);
        if r.in_sync {
            // (An ack of a session that ended says nothing of the next:
            // its hello does, see `note_told`.)
            r.told = r.told.max(told);
        }
        match barrier {
            Some(barrier) if self.timed_out_set.contains(&barrier) => Err(CommitError::LateAck {
                replica: replica.clone(),
                barrier,
            }),
            _ => Ok(()),
        }
    }

    /// The highest LSN durable on the set the mode requires, from current acks.
    pub fn durable_by_mode(&self) -> Lsn {
        self.durable_with_local(self.local_durable)
    }

    /// The lowest LSN whose local durability would resolve a waiting barrier
    /// now: one the replicas the mode counts already hold. `None` when every
    /// waiting barrier also waits on a replica's ack (local durability can be
    /// read when that ack comes) or none waits. A runtime whose syncs finish
    /// off its thread asks to be woken for local durability only then.
    pub fn local_durable_wanted(&self) -> Option<Lsn> {
        let others = self.durable_with_local(Lsn(u64::MAX));
        let told = self.told_by_mode();
        self.barriers
            .values()
            .filter(|b| b.tell <= told)
            .map(|b| b.lsn)
            .filter(|lsn| *lsn <= others && *lsn > self.local_durable)
            .min()
    }

    /// The committed LSN the replicas the mode counts all know (the
    /// primary knows everything; best_effort asks nothing of replicas).
    pub(crate) fn told_by_mode(&self) -> Lsn {
        let in_sync = || self.replicas.values().filter(|r| r.in_sync).map(|r| r.told);
        match self.mode {
            CommitMode::BestEffort => Lsn(u64::MAX),
            CommitMode::SyncAll => in_sync().fold(Lsn(u64::MAX), Lsn::min),
            CommitMode::SyncQuorum => {
                let mut told: Vec<Lsn> = std::iter::once(Lsn(u64::MAX)).chain(in_sync()).collect();
                told.sort_unstable_by(|a, b| b.cmp(a));
                told.get(self.quorum() - 1).copied().unwrap_or(Lsn::ZERO)
            }
        }
    }

    /// What `replica` said it knows is committed when it said hello: where
    /// its `told` starts for the session.
    pub fn note_told(&mut self, replica: &ReplicaId, told: Lsn) {
        if let Some(r) = self.replicas.get_mut(replica) {
            r.told = told;
        }
    }

    /// Whether `replica` must still be told that `lsn` is committed for a
    /// waiting barrier (it is in sync and says it knows less).
    pub fn must_tell(&self, replica: &ReplicaId, lsn: Lsn) -> bool {
        self.mode != CommitMode::BestEffort
            && self
                .replicas
                .get(replica)
                .is_some_and(|r| r.in_sync && r.told < lsn)
    }

    /// `durable_by_mode` had the primary been durable up to `local`.
    fn durable_with_local(&self, local: Lsn) -> Lsn {
        match self.mode {
            CommitMode::BestEffort => local,
            CommitMode::SyncAll => {
                if self.replicas.values().any(|r| !r.in_sync) {
                    return Lsn::ZERO;
                }
                self.replicas
                    .values()
                    .map(|r| r.durable)
                    .fold(local, Lsn::min)
            }
            CommitMode::SyncQuorum => {
                let mut durable: Vec<Lsn> = std::iter::once(local)
                    .chain(
                        self.replicas
                            .values()
                            .filter(|r| r.in_sync)
                            .map(|r| r.durable),
                    )
                    .collect();
                durable.sort_unstable_by(|a, b| b.cmp(a));
                durable.get(self.quorum() - 1).copied().unwrap_or(Lsn::ZERO)
            }
        }
    }

    /// Registers a barrier for `lsn` failing at `deadline`.
    pub fn register_barrier(
        &mut self,
        lsn: Lsn,
        head: Lsn,
        deadline: Tick,
    ) -> Result<BarrierId, CommitError> {
        if lsn > head {
            return Err(CommitError::BarrierPastHead { lsn, head });
        }
        let id = BarrierId(self.next_barrier);
        self.next_barrier += 1;
        let tell = match self.mode {
            CommitMode::BestEffort => Lsn::ZERO,
            _ => self.committed,
        };
        self.barriers.insert(
            id,
            PendingBarrier {
                lsn,
                deadline,
                tell,
            },
        );
        Ok(id)
    }

    /// Whether a barrier is still waiting.
    pub fn is_pending(&self, id: BarrierId) -> bool {
        self.barriers.contains_key(&id)
    }

    /// The newest barrier still waiting, with its LSN and what its
    /// replicas must be told is committed.
    pub fn newest_pending(&self) -> Option<(BarrierId, Lsn, Lsn)> {
        self.barriers
            .last_key_value()
            .map(|(id, b)| (*id, b.lsn, b.tell))
    }

    /// The deadline of a pending barrier.
    pub fn barrier_deadline(&self, id: BarrierId) -> Option<Tick> {
        self.barriers.get(&id).map(|b| b.deadline)
    }

    /// Advances committed over what is durable and returns the barriers that resolved.
    pub fn advance(&mut self) -> Vec<(BarrierId, Lsn)> {
        self.committed = self.committed.max(self.durable_by_mode());
        if self.barriers.is_empty() {
            return Vec::new();
        }
        let (committed, told) = (self.committed, self.told_by_mode());
        let done: Vec<BarrierId> = self
            .barriers
            .iter()
            .filter(|(_, b)| b.lsn <= committed && b.tell <= told)
            .map(|(id, _)| *id)
            .collect();
        done.into_iter()
            .map(|id| {
                self.barriers.remove(&id);
                (id, committed)
            })
            .collect()
    }

    /// Fails a barrier whose deadline passed. Returns `None` if it already
    /// resolved (a stale timer); its id is remembered so late acks are
    /// rejected. `describe` says what is known of each lagging replica.
    pub fn expire(
        &mut self,
        id: BarrierId,
        describe: impl Fn(&ReplicaId) -> Lagging,
    ) -> Option<BarrierFailure> {
        let barrier = self.barriers.remove(&id)?;
        self.remember_timed_out(id);
        let lagging = self
            .replicas
            .iter()
            .filter(|(_, r)| !r.in_sync || r.durable < barrier.lsn || r.told < barrier.tell)
            .map(|(id, _)| describe(id))
            .collect();
        Some(BarrierFailure::TimedOut {
            lsn: barrier.lsn,
            committed: self.committed,
            mode: self.mode,
            lagging,
        })
    }

    /// Fails every pending barrier because the epoch changed.
    pub fn fence_all(&mut self) -> Vec<(BarrierId, BarrierFailure)> {
        let pending = std::mem::take(&mut self.barriers);
        pending
            .into_iter()
            .map(|(id, barrier)| {
                self.remember_timed_out(id);
                (id, BarrierFailure::Fenced { lsn: barrier.lsn })
            })
            .collect()
    }

    fn remember_timed_out(&mut self, id: BarrierId) {
        self.timed_out.push_back(id);
        self.timed_out_set.insert(id);
        if self.timed_out.len() > TIMED_OUT_MEMORY {
            if let Some(old) = self.timed_out.pop_front() {
                self.timed_out_set.remove(&old);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ids(names: &[&str]) -> Vec<ReplicaId> {
        names
            .iter()
            .map(|n| ReplicaId::new("v", n).unwrap())
            .collect()
    }

    #[test]
    fn local_durability_advances_only_over_a_contiguous_prefix() {
        let mut t = CommitTracker::new(CommitMode::BestEffort, [], Lsn(0)).unwrap();
        t.record_local_durable(Lsn(5), Lsn(10));
        assert_eq!(t.local_durable(), Lsn(0));
        t.record_local_durable(Lsn(0), Lsn(5));
        assert_eq!(t.local_durable(), Lsn(10));
        t.advance();
        assert_eq!(t.committed(), Lsn(10));
    }

    #[test]
    fn sync_quorum_with_fewer_than_three_members_is_rejected() {
        assert_eq!(
            CommitTracker::new(CommitMode::SyncQuorum, ids(&["a"]), Lsn(0)).err(),
            Some(CommitError::ImpossibleQuorum {
                members: 2,
                quorum: 2
            })
        );
        assert!(CommitTracker::new(CommitMode::SyncQuorum, ids(&["a", "b"]), Lsn(0)).is_ok());
        assert_eq!(
            "sync_quorum".parse::<CommitMode>(),
            Ok(CommitMode::SyncQuorum)
        );
        assert!("quorum".parse::<CommitMode>().is_err());
    }

    #[test]
    fn quorum_counts_only_in_sync_replicas() {
        let r = ids(&["a", "b"]);
        let mut t = CommitTracker::new(CommitMode::SyncQuorum, r.clone(), Lsn(0)).unwrap();
        t.record_local_durable(Lsn(0), Lsn(10));
        t.record_ack(&r[0], Lsn(10), Lsn(u64::MAX), None).unwrap();
        t.advance();
        assert_eq!(
            t.committed(),
            Lsn(0),
            "a is not InSync, so it does not count"
        );
        t.set_in_sync(&r[0], true);
        t.advance();
        assert_eq!(t.committed(), Lsn(10));
    }

    #[test]
    fn sync_all_needs_every_replica_in_sync_and_durable() {
        let r = ids(&["a", "b"]);
        let mut t = CommitTracker::new(CommitMode::SyncAll, r.clone(), Lsn(0)).unwrap();
        t.set_in_sync(&r[0], true);
        t.set_in_sync(&r[1], true);
        t.record_local_durable(Lsn(0), Lsn(10));
        t.record_ack(&r[0], Lsn(10), Lsn(u64::MAX), None).unwrap();
        t.record_ack(&r[1], Lsn(7), Lsn(u64::MAX), None).unwrap();
        t.advance();
        assert_eq!(t.committed(), Lsn(7));
        t.set_in_sync(&r[1], false);
        t.record_ack(&r[1], Lsn(10), Lsn(u64::MAX), None).unwrap();
        t.advance();
        assert_eq!(
            t.committed(),
            Lsn(7),
            "committed never decreases and b is out"
        );
    }

    #[test]
    fn local_durability_is_wanted_only_for_barriers_the_replicas_already_hold() {
        let r = ids(&["a", "b"]);
        let mut t = CommitTracker::new(CommitMode::SyncAll, r.clone(), Lsn(0)).unwrap();
        t.set_in_sync(&r[0], true);
        t.set_in_sync(&r[1], true);
        t.register_barrier(Lsn(5), Lsn(9), Tick(10)).unwrap();
        t.register_barrier(Lsn(9), Lsn(9), Tick(10)).unwrap();
        assert_eq!(t.local_durable_wanted(), None, "both wait on acks");
        t.record_ack(&r[0], Lsn(9), Lsn(u64::MAX), None).unwrap();
        t.record_ack(&r[1], Lsn(6), Lsn(u64::MAX), None).unwrap();
        assert_eq!(t.local_durable_wanted(), Some(Lsn(5)));
        t.record_local_durable(Lsn(0), Lsn(5));
        assert_eq!(t.advance(), [(BarrierId(1), Lsn(5))]);
        assert_eq!(t.local_durable_wanted(), None, "9 waits on b");
        t.record_ack(&r[1], Lsn(9), Lsn(u64::MAX), None).unwrap();
        assert_eq!(t.local_durable_wanted(), Some(Lsn(9)));
        t.set_in_sync(&r[1], false);
        assert_eq!(t.local_durable_wanted(), None, "sync_all waits for b");

        let mut q = CommitTracker::new(CommitMode::SyncQuorum, r.clone(), Lsn(0)).unwrap();
        q.set_in_sync(&r[0], true);
        q.register_barrier(Lsn(4), Lsn(4), Tick(10)).unwrap();
        assert_eq!(q.local_durable_wanted(), None, "no replica holds 4");
        q.record_ack(&r[0], Lsn(4), Lsn(u64::MAX), None).unwrap();
        assert_eq!(q.local_durable_wanted(), Some(Lsn(4)), "a and the primary");

        q.set_in_sync(&r[0], false);
        q.record_ack(&r[1], Lsn(4), Lsn(u64::MAX), None).unwrap();
        assert_eq!(
            q.local_durable_wanted(),
            None,
            "b holds 4 but is not InSync"
        );

        let mut e = CommitTracker::new(CommitMode::BestEffort, r, Lsn(0)).unwrap();
        e.register_barrier(Lsn(2), Lsn(2), Tick(10)).unwrap();
        assert_eq!(e.local_durable_wanted(), Some(Lsn(2)), "the primary alone");
        let mut alone = CommitTracker::new(CommitMode::SyncAll, [], Lsn(0)).unwrap();
        alone.register_barrier(Lsn(3), Lsn(3), Tick(10)).unwrap();
        assert_eq!(
            alone.local_durable_wanted(),
            Some(Lsn(3)),
            "sync_all of one"
        );
    }

    #[test]
    fn barrier_times_out_and_late_ack_is_rejected() {
        let r = ids(&["a"]);
        let mut t = CommitTracker::new(CommitMode::SyncAll, r.clone(), Lsn(0)).unwrap();
        t.set_in_sync(&r[0], true);
        t.record_local_durable(Lsn(0), Lsn(3));
        let b = t.register_barrier(Lsn(3), Lsn(3), Tick(10)).unwrap();
        assert!(t.advance().is_empty());
        let describe = |replica: &ReplicaId| Lagging {
            replica: replica.clone(),
            state: ReplicaState::InSync,
            cause: None,
        };
        let failure = t.expire(b, describe).unwrap();
        assert!(
            matches!(failure, BarrierFailure::TimedOut { ref lagging, .. } if lagging[0].replica == r[0])
        );
        assert_eq!(
            failure.to_string(),
            "barrier at 3 timed out (sync_all): committed=0, lagging=[v/a (InSync)]"
        );
        assert_eq!(
            t.record_ack(&r[0], Lsn(3), Lsn(u64::MAX), Some(b)),
            Err(CommitError::LateAck {
                replica: r[0].clone(),
                barrier: b
            })
        );
        assert_eq!(
            t.advance(),
            [],
            "nothing waits, yet the late ack's durability is recorded"
        );
        assert_eq!(t.durable_by_mode(), Lsn(3));
        assert_eq!(t.expire(b, describe), None, "a second expiry is stale");
        assert_eq!(
            t.register_barrier(Lsn(4), Lsn(3), Tick(10)),
            Err(CommitError::BarrierPastHead {
                lsn: Lsn(4),
                head: Lsn(3)
            })
        );
    }
}
