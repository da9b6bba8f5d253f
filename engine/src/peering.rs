//! Peering: what a primary learns from its replicas before it serves.
//!
//! A primary's own log is authoritative only if it still holds everything
//! that may have been acknowledged. A node whose disk was replaced (or
//! whose store a power loss took) opens on an empty log in good faith; if
//! it then served, the handshake would see its replicas "ahead" and
//! truncate them to nothing. So on open and on every role change, before
//! it takes a write, the primary asks every replica what it holds (Ceph's
//! peering; Raft's rule that no leader lacks a committed entry) and
//! [`decide_peering`] says, with its proof:
//!
//! - whether enough replicas answered for what may have been acknowledged
//!   to be among the answers ([`required_answers`]);
//! - whether one of them holds entries the primary lacks that may have
//!   been acknowledged, which the primary then recovers from it before it
//!   serves (never truncating them);
//! - the term to open in: newer than any term the primary's log or any
//!   answering replica has seen, so a term is never reused even when the
//!   node lost everything local.
//!
//! What "may have been acknowledged" means depends on what the primary
//! still trusts of itself:
//! - a **lost** log (empty: its store created at this open, or never
//!   written, though the volume may have existed): anything a replica holds
//!   may have been acknowledged;
//!   the most up-to-date answer (newest last term, then longest) is
//!   recovered when it holds anything;
//! - a **kept** log (found on disk, synced before every acknowledgement):
//!   entries a replica knows to be committed past the primary's head;
//!   entries of a term newer than the primary's newest (another primary
//!   wrote them); and under sync_quorum, entries past the head in the same
//!   last term (a majority of replicas commits without the primary, and a
//!   power loss takes the primary's unsynced tail while the committed LSN
//!   the replicas heard lags by a message). Under sync_all and best_effort
//!   entries past the head in its own term were never acknowledged (the
//!   primary syncs before it counts them) and the handshake truncates them
//!   as before (A2). Recovering an entry that was never acknowledged is
//!   allowed (the client never heard either way); losing one that was is
//!   not.

use crate::commit::CommitMode;
use crate::epochs::EpochHistory;
use crate::ids::{Epoch, Lsn, ReplicaId};

/// What one replica answered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerAnswer {
    /// Who answered.
    pub replica: ReplicaId,
    /// The newest term it accepted (persisted).
    pub term: Epoch,
    /// Its durable LSN.
    pub flushed: Lsn,
    /// The highest LSN it knows to be committed.
    pub committed: Lsn,
    /// Which term wrote each part of its log.
    pub epochs: EpochHistory,
    /// It holds part of an image (an install in place a cut interrupted):
    /// no log at all, not even an empty one. Its term still counts toward
    /// the terms seen; the answer does not count toward those needed (an
    /// acknowledged write it held before the install may be gone from it).
    pub partial: bool,
}

impl PeerAnswer {
    /// The newest term in its log, if it holds anything.
    fn last_term(&self) -> Option<Epoch> {
        (self.flushed > Lsn::ZERO)
            .then(|| self.epochs.newest().map(|start| start.epoch))
            .flatten()
    }

    /// Raft's "at least as up to date": newest last term, then longest.
    fn rank(&self) -> (Epoch, Lsn) {
        (self.last_term().unwrap_or(Epoch(0)), self.flushed)
    }
}

/// The primary's own log, as it opened.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LocalLog {
    /// Its durable head.
    pub head: Lsn,
    /// Its epoch history.
    pub epochs: EpochHistory,
    /// Whether the log holds nothing (its store created at this open, or
    /// never written): whatever the volume held before may be gone from
    /// this node, and an empty log is never authoritative.
    pub lost: bool,
    /// Whether opening it cut a torn tail: frames a sync may have covered
    /// could be among them (a torn tail is told from corruption by what a
    /// power loss leaves, not by a record of the durable point), so a
    /// replica's longer log in the same term may hold acknowledged entries.
    pub cut: bool,
    /// The newest term this store persisted as its own (a term chosen
    /// before is persisted before it is used, written or not).
    pub term: Epoch,
}

/// The terms the primary may open in: `[configured, ceiling)`. The
/// control plane's epoch fixes the high bits; the low bits count openings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Terms {
    /// The term the assignment names.
    pub configured: Epoch,
    /// The first term of the next epoch: a replica that saw it (or later)
    /// follows a newer assignment.
    pub ceiling: Epoch,
}

/// What the primary does next.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Peering {
    /// Not enough replicas answered yet; ask again.
    Wait {
        /// Answers so far.
        have: usize,
        /// Answers needed.
        need: usize,
        /// Why that many.
        reason: String,
    },
    /// A replica follows a newer assignment: this primary must not serve.
    Superseded {
        /// The replica.
        replica: ReplicaId,
        /// The term it accepted.
        term: Epoch,
    },
    /// The terms of this epoch are used up.
    TermsExhausted {
        /// The newest term seen.
        seen: Epoch,
    },
    /// Serve on the local log in `term`.
    Serve {
        /// The term to open in.
        term: Epoch,
        /// Why nothing needs recovering.
        proof: String,
    },
    /// Recover `from`'s log (through its durable LSN) before serving.
    Recover {
        /// The replica to recover from.
        from: ReplicaId,
        /// Its durable LSN: the primary's head once recovered.
        through: Lsn,
        /// Its log extends this one (the same entries up to this log's
        /// head): the frames after the head are enough, a reverse
        /// catch-up, if its WAL still holds them. Otherwise its image.
        catch_up: bool,
        /// The term to open in.
        term: Epoch,
        /// What the replica holds that the primary lacks.
        proof: String,
    },
}

/// How many replicas must answer before the primary may judge, of
/// `replicas`, under `mode`, and why.
///
/// An acknowledged write is durable on the members the mode counts. Under
/// sync_all that is every replica, so one answer holds it. Under
/// sync_quorum (`q = n/2 + 1` of `n` members, the primary not necessarily
/// among them) a write the primary lacks is on at least `q - 1` replicas
/// if the primary's log was lost (it may have been one of the `q`), on
/// `q` if it was kept (then the primary was not); answers from
/// `replicas - (q - 1) + 1`, resp. `replicas - q + 1`, overlap every such
/// set. best_effort acknowledges on the primary alone: a kept log holds
/// it all; a lost one still waits for one replica, so what the replicas
/// hold is never thrown away for an empty log.
pub fn required_answers(mode: CommitMode, replicas: usize, lost: bool) -> (usize, String) {
    if replicas == 0 {
        return (0, "no replicas".to_owned());
    }
    // A lost log counts only answers that hold something (or every
    // replica's answer): see `counted`.
    let (need, why) = match (mode, lost) {
        (CommitMode::SyncAll, true) => (1, "sync_all: every replica holds each acknowledged write"),
        (CommitMode::SyncAll, false) => (0, "sync_all: the kept log holds each acknowledged write"),
        (CommitMode::BestEffort, true) => (1, "best_effort: a lost log never outranks a replica"),
        (CommitMode::BestEffort, false) => (0, "best_effort: acknowledged on the kept log"),
        (CommitMode::SyncQuorum, lost) => {
            let members = replicas + 1;
            let quorum = members / 2 + 1;
            let holders = if lost { quorum - 1 } else { quorum };
            let need = (replicas + 1).saturating_sub(holders);
            return (
                need.min(replicas),
                format!(
                    "sync_quorum: {holders} of {replicas} replicas hold each write the {} log lacks",
                    if lost { "lost" } else { "kept" }
                ),
            );
        }
    };
    (need, why.to_owned())
}

/// Decides what the primary does with the `answers` one round of asking
/// brought (every replica answered, or the round's time ran out); with
/// fewer than needed the primary asks again.
pub fn decide_peering(
    mode: CommitMode,
    replicas: usize,
    local: &LocalLog,
    terms: Terms,
    answers: &[PeerAnswer],
) -> Peering {
    if let Some(newer) = answers.iter().find(|a| a.term >= terms.ceiling) {
        return Peering::Superseded {
            replica: newer.replica.clone(),
            term: newer.term,
        };
    }
    let (need, reason) = required_answers(mode, replicas, local.lost);
    let (need, reason) = if local.cut && need == 0 {
        (
            1,
            "a torn tail was cut: a replica may hold what a sync covered".to_owned(),
        )
    } else {
        (need, reason)
    };
    let have = counted(local, replicas, answers);
    if have < need {
        return Peering::Wait { have, need, reason };
    }
    let seen = answers
        .iter()
        .map(|a| a.term.max(a.epochs.newest().map_or(Epoch(0), |s| s.epoch)))
        .chain(local.epochs.newest().map(|s| s.epoch))
        .chain([local.term])
        .max()
        .unwrap_or(Epoch(0));
    let term = if seen < terms.configured {
        terms.configured
    } else if Epoch(seen.0 + 1) < terms.ceiling {
        Epoch(seen.0 + 1)
    } else {
        return Peering::TermsExhausted { seen };
    };
    let heard = format!("{} of {replicas} answered ({reason})", answers.len());
    let behind = answers
        .iter()
        .filter_map(|a| may_be_acknowledged(mode, local, a).map(|why| (a, why)))
        .max_by(|(a, _), (b, _)| a.rank().cmp(&b.rank()).then(b.replica.cmp(&a.replica)));
    match behind {
        Some((from, why)) => {
            let shared =
                crate::epochs::divergence(&local.epochs, local.head, &from.epochs, from.flushed);
            let catch_up = !local.lost && shared.point == local.head;
            Peering::Recover {
            from: from.replica.clone(),
            through: from.flushed,
            catch_up,
            term,
            proof: format!(
                "primary_behind: {} holds {}-{} in term e{} (committed {}), this log ends at {}: {why}; {heard}; recovering before serving{}",
                from.replica,
                local.head.0 + 1,
                from.flushed.0,
                from.last_term().map_or(0, |e| e.0),
                from.committed.0,
                local.head.0,
                if catch_up { ", by catch-up" } else { "" }
            ),
        }
        }
        None => Peering::Serve {
            term,
            proof: format!(
                "peered: {heard}; none holds acknowledged entries past {}; term e{}",
                local.head.0, term.0
            ),
        },
    }
}

/// The answers that count toward what the mode needs. For a lost log an
/// empty answer (a wiped or new replica) proves nothing while another
/// replica may hold the volume, so it counts only once every replica
/// answered (a new volume: nobody holds anything).
/// A partial image never counts.
fn counted(local: &LocalLog, replicas: usize, answers: &[PeerAnswer]) -> usize {
    let whole = answers.iter().filter(|a| !a.partial);
    if !local.lost || answers.len() >= replicas {
        return whole.count();
    }
    whole.filter(|a| a.last_term().is_some()).count()
}

/// Why `answer` may hold acknowledged entries that `local` lacks, if it
/// may: the primary then recovers them from it.
fn may_be_acknowledged(
    mode: CommitMode,
    local: &LocalLog,
    answer: &PeerAnswer,
) -> Option<&'static str> {
    let last_term = answer.last_term()?;
    if local.lost {
        return Some("this node's log was lost");
    }
    let local_term = local.epochs.newest().map_or(Epoch(0), |start| start.epoch);
    if last_term > local_term {
        // Another primary wrote them, after this log's newest term: they
        // lie past where the logs diverge, whichever log is longer.
        return Some("they are of a newer term than this log's");
    }
    if answer.committed > local.head && answer.flushed >= answer.committed {
        return Some("it knows them committed");
    }
    if last_term < local_term || answer.flushed <= local.head {
        return None;
    }
    // Raft's "at least as up to date": same last term, longer. Under
    // sync_quorum a majority of replicas may have acknowledged them
    // without this primary; after a torn tail was cut, a sync may have
    // covered them; otherwise (sync_all, best_effort) an entry counted
    // only once this primary had it durably, so they never were.
    if local.cut {
        return Some("this log's torn tail was cut");
    }
    (mode == CommitMode::SyncQuorum)
        .then_some("a quorum without this node may have acknowledged them")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::epochs::history;

    const E: u64 = 1 << 20;

    fn answer(server: &str, term: u64, flushed: u64, committed: u64) -> PeerAnswer {
        PeerAnswer {
            replica: ReplicaId::new("vol0", server).unwrap(),
            term: Epoch(term),
            flushed: Lsn(flushed),
            committed: Lsn(committed),
            epochs: if flushed > 0 {
                history(&[(term, 1)])
            } else {
                EpochHistory::new()
            },
            partial: false,
        }
    }

    fn empty(lost: bool) -> LocalLog {
        LocalLog {
            head: Lsn(0),
            epochs: EpochHistory::new(),
            lost,
            cut: false,
            term: Epoch(0),
        }
    }

    fn kept(head: u64, epochs: &[(u64, u64)]) -> LocalLog {
        LocalLog {
            head: Lsn(head),
            epochs: history(epochs),
            lost: false,
            cut: false,
            term: Epoch(0),
        }
    }

    fn terms() -> Terms {
        Terms {
            configured: Epoch(E),
            ceiling: Epoch(2 * E),
        }
    }

    #[test]
    fn answers_needed_overlap_every_set_that_acknowledges() {
        use CommitMode::*;
        let table = [
            (SyncAll, 2, true, 1),
            (SyncAll, 2, false, 0),
            (BestEffort, 2, true, 1),
            (BestEffort, 2, false, 0),
            // n = 3, q = 2: a lost primary may have been one of the two.
            (SyncQuorum, 2, true, 2),
            (SyncQuorum, 2, false, 1),
            // n = 5, q = 3.
            (SyncQuorum, 4, true, 3),
            (SyncQuorum, 4, false, 2),
            (SyncAll, 0, true, 0),
        ];
        for (mode, replicas, lost, need) in table {
            assert_eq!(
                required_answers(mode, replicas, lost).0,
                need,
                "{mode} {replicas} lost={lost}"
            );
        }
    }

    #[test]
    fn a_replica_holding_a_partial_image_never_counts_but_its_term_does() {
        // sync_quorum, 4 members (q = 3), a kept log: one answer is needed,
        // and a replica rebuilt in place part way is not it (what it held
        // of an acknowledged write may be gone).
        let local = kept(100, &[(E, 1)]);
        let partial = PeerAnswer {
            partial: true,
            ..answer("r2", E + 5, 0, 0)
        };
        let decided = decide_peering(
            CommitMode::SyncQuorum,
            3,
            &local,
            terms(),
            std::slice::from_ref(&partial),
        );
        assert!(
            matches!(
                decided,
                Peering::Wait {
                    have: 0,
                    need: 1,
                    ..
                }
            ),
            "{decided:?}"
        );
        let whole = answer("r1", E, 120, 110);
        match decide_peering(
            CommitMode::SyncQuorum,
            3,
            &local,
            terms(),
            &[partial, whole],
        ) {
            Peering::Recover { from, term, .. } => {
                assert_eq!(from.server(), "r1");
                assert_eq!(term, Epoch(E + 6), "past the partial replica's term");
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn a_lost_log_recovers_from_the_replica_that_holds_the_data() {
        // The scenario: node1's data dir wiped, both replicas hold
        // 1-512 in the term node1 last opened in (its assignment is gone
        // too, so it comes back configured in that same term).
        let answers = [answer("node2", E, 512, 448), answer("node3", E, 512, 0)];
        let decided = decide_peering(CommitMode::SyncAll, 2, &empty(true), terms(), &answers);
        let Peering::Recover {
            from,
            through,
            term,
            proof,
            catch_up,
        } = decided
        else {
            panic!("{decided:?}");
        };
        assert_eq!(through, Lsn(512));
        assert!(!catch_up, "a lost log takes the whole image");
        assert_eq!(from.server(), "node2", "ties go to the lower id");
        assert_eq!(term, Epoch(E + 1), "never the term the replicas saw");
        assert!(proof.starts_with("primary_behind: vol0/node2 holds 1-512 in term e1048576"));
    }

    #[test]
    fn a_lost_log_waits_for_the_answers_its_mode_needs() {
        let one = [answer("node2", E, 512, 512)];
        assert!(matches!(
            decide_peering(CommitMode::SyncQuorum, 2, &empty(true), terms(), &one),
            Peering::Wait {
                have: 1,
                need: 2,
                ..
            }
        ));
        assert!(matches!(
            decide_peering(CommitMode::SyncAll, 2, &empty(true), terms(), &[]),
            Peering::Wait {
                have: 0,
                need: 1,
                ..
            }
        ));
        assert!(matches!(
            decide_peering(CommitMode::SyncAll, 2, &empty(true), terms(), &one),
            Peering::Recover { .. }
        ));
    }

    #[test]
    fn the_most_up_to_date_answer_wins_newest_term_then_longest() {
        let mut older = answer("node2", E, 900, 0);
        older.epochs = history(&[(E, 1)]);
        let mut newer = answer("node3", E + 3, 700, 0);
        newer.epochs = history(&[(E, 1), (E + 3, 600)]);
        let decided = decide_peering(
            CommitMode::SyncAll,
            2,
            &empty(true),
            terms(),
            &[older, newer],
        );
        assert!(
            matches!(&decided, Peering::Recover { from, through: Lsn(700), term: Epoch(t), .. }
                if from.server() == "node3" && *t == E + 4),
            "{decided:?}"
        );
    }

    #[test]
    fn a_new_volume_serves_in_its_configured_term() {
        let answers = [answer("node2", 0, 0, 0), answer("node3", 0, 0, 0)];
        let decided = decide_peering(CommitMode::SyncAll, 2, &empty(true), terms(), &answers);
        assert!(
            matches!(decided, Peering::Serve { term: Epoch(t), .. } if t == E),
            "{decided:?}"
        );
    }

    #[test]
    fn a_kept_log_truncates_an_unacknowledged_tail_but_recovers_a_committed_one() {
        let log = kept(400, &[(E, 1)]);
        // sync_all: node2 holds 401-512 the primary never synced, so never
        // acknowledged; the handshake truncates them as before.
        let unacked = [answer("node2", E, 512, 390)];
        let decided = decide_peering(CommitMode::SyncAll, 2, &log, terms(), &unacked);
        assert!(
            matches!(decided, Peering::Serve { term: Epoch(t), .. } if t == E + 1),
            "{decided:?}"
        );
        // sync_quorum: node2 and node3 committed 401-480 without the primary.
        let committed = [answer("node2", E, 512, 480)];
        let decided = decide_peering(CommitMode::SyncQuorum, 2, &log, terms(), &committed);
        assert!(
            matches!(&decided, Peering::Recover { from, through: Lsn(512), catch_up: true, .. } if from.server() == "node2"),
            "{decided:?}: its log extends this one, so the frames after 400 are enough"
        );
        // ... even when the last committed LSN they heard is older than the
        // primary's head: the message that would have said more was lost
        // with the primary's power.
        let lagging = [answer("node2", E, 512, 390)];
        let decided = decide_peering(CommitMode::SyncQuorum, 2, &log, terms(), &lagging);
        assert!(
            matches!(&decided, Peering::Recover { proof, .. } if proof.contains("a quorum without this node")),
            "{decided:?}"
        );
        // A replica with entries of a newer term than the primary's log
        // (another primary wrote them): recovered under any mode.
        let mut newer = answer("node3", E + 2, 450, 0);
        newer.epochs = history(&[(E, 1), (E + 2, 380)]);
        let decided = decide_peering(CommitMode::SyncAll, 2, &log, terms(), &[newer]);
        assert!(
            matches!(&decided, Peering::Recover { from, term: Epoch(t), .. } if from.server() == "node3" && *t == E + 3),
            "{decided:?}"
        );
        // A replica whose tail is of an older term than the primary's
        // newest is behind, not ahead: truncated by the handshake.
        let newer_local = kept(400, &[(E, 1), (E + 1, 350)]);
        let stale = [answer("node2", E, 512, 340)];
        let decided = decide_peering(CommitMode::SyncQuorum, 2, &newer_local, terms(), &stale);
        assert!(matches!(decided, Peering::Serve { .. }), "{decided:?}");
    }

    #[test]
    fn a_shorter_log_of_a_newer_term_is_recovered_not_cut_at_the_divergence() {
        // The primary's kept log is E 1-500; node2 was promoted in E+2 at
        // 380 and wrote 380-450 (maybe acknowledged) while this node was
        // away: shorter, but newer past where the logs diverge.
        let mut newer = answer("node2", E + 2, 450, 0);
        newer.epochs = history(&[(E, 1), (E + 2, 380)]);
        let decided = decide_peering(
            CommitMode::SyncAll,
            2,
            &kept(500, &[(E, 1)]),
            terms(),
            &[newer],
        );
        assert!(
            matches!(&decided, Peering::Recover { through: Lsn(450), proof, catch_up: false, .. }
                if proof.contains("newer term")),
            "{decided:?}"
        );
    }

    #[test]
    fn a_lost_log_does_not_count_an_empty_answer_while_another_replica_is_silent() {
        // node3 was wiped (or is new): its answer proves nothing while
        // node2, which may hold the volume, has not answered.
        let wiped = [answer("node3", E, 0, 0)];
        assert!(matches!(
            decide_peering(CommitMode::SyncAll, 2, &empty(true), terms(), &wiped),
            Peering::Wait {
                have: 0,
                need: 1,
                ..
            }
        ));
        // Once both answered empty, the volume is new.
        let both = [answer("node2", 0, 0, 0), answer("node3", E, 0, 0)];
        assert!(matches!(
            decide_peering(CommitMode::SyncAll, 2, &empty(true), terms(), &both),
            Peering::Serve { .. }
        ));
    }

    #[test]
    fn a_cut_torn_tail_waits_for_an_answer_and_recovers_a_longer_log_in_its_term() {
        let mut cut = kept(400, &[(E, 1)]);
        cut.cut = true;
        assert!(matches!(
            decide_peering(CommitMode::SyncAll, 2, &cut, terms(), &[]),
            Peering::Wait {
                have: 0,
                need: 1,
                ..
            }
        ));
        let longer = [answer("node2", E, 512, 390)];
        assert!(matches!(
            decide_peering(CommitMode::SyncAll, 2, &cut, terms(), &longer),
            Peering::Recover {
                through: Lsn(512),
                ..
            }
        ));
    }

    #[test]
    fn a_term_the_store_persisted_is_never_chosen_again() {
        // The assignment was lost; the store remembers it opened in E+5
        // (no write made it to the WAL) and no replica answered yet.
        let mut local = kept(400, &[(E, 1)]);
        local.term = Epoch(E + 5);
        assert!(matches!(
            decide_peering(CommitMode::SyncAll, 2, &local, terms(), &[]),
            Peering::Serve { term: Epoch(t), .. } if t == E + 6
        ));
    }

    #[test]
    fn a_replica_of_a_newer_assignment_supersedes_the_primary() {
        let answers = [answer("node2", 2 * E, 512, 512)];
        assert!(matches!(
            decide_peering(CommitMode::SyncAll, 2, &empty(false), terms(), &answers),
            Peering::Superseded { term: Epoch(t), .. } if t == 2 * E
        ));
    }

    #[test]
    fn terms_run_out_at_the_ceiling() {
        let answers = [answer("node2", 2 * E - 1, 0, 0)];
        assert!(matches!(
            decide_peering(CommitMode::SyncAll, 2, &empty(false), terms(), &answers),
            Peering::TermsExhausted { .. }
        ));
    }
}
