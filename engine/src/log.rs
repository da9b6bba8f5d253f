//! The bounded recovery event log: why each decision was made.
//!
//! Events use the reference design's names (`session_created`,
//! `session_invalidated`, `handshake`, `plan_catchup`,
//! `plan_rebuild_full_base`, `escalated`, `exec_resources_released`, ...).
//!
//! Two things keep the decisions readable when something keeps failing:
//! - **Classes.** Decisions (handshakes, plans, escalations, completions,
//!   invalidations, epoch and membership changes, budget and barrier
//!   failures) and routine events (connects, session starts, releases,
//!   rejected stale input) are kept in rings of their own, so no amount of
//!   routine traffic evicts a decision. Each ring drops its oldest event when
//!   full and counts it.
//! - **Coalescing.** An event equal to one of the last few of its class
//!   (same replica, name and detail) is not appended: the earlier one's
//!   `repeats` grows and its `last_tick` and `session` move on. A replica
//!   refused on every retry is one line with a count, not thousands.
//!
//! Neither loses a count: every decision, folded or dropped, is counted by
//! name for the life of the engine ([`RecoveryLog::decision_totals`]), which
//! is what monitoring's counters of recoveries by outcome read.

use crate::ids::{ReplicaId, SessionId, Tick};
use serde::Serialize;
use std::collections::VecDeque;

/// One recovery event.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct RecoveryEvent {
    /// Sequence number, increasing for the life of the engine.
    pub seq: u64,
    /// When it first happened.
    pub tick: Tick,
    /// The replica concerned, if any.
    pub replica: Option<ReplicaId>,
    /// The session concerned (the latest, when repeated), if any.
    pub session: Option<SessionId>,
    /// Event name.
    pub event: &'static str,
    /// Human-readable detail with the numbers behind the decision.
    pub detail: String,
    /// Later occurrences folded into this one.
    pub repeats: u64,
    /// When it last happened.
    pub last_tick: Tick,
}

/// Events that record a decision or its outcome; everything else is routine.
const DECISIONS: &[&str] = &[
    "barrier_timeout",
    "commit_mode_changed",
    "converged",
    "convergence_escalated",
    "converging",
    "endpoint_changed",
    "epoch_bumped",
    "epoch_started",
    "escalated",
    "handshake",
    "identity_mismatch",
    "late_ack_rejected",
    "not_converging",
    "plan_catchup",
    "plan_rebuild_checksum",
    "plan_rebuild_delta",
    "plan_rebuild_full_base",
    "plan_rebuild_resume",
    "plan_rebuild_snapshot_tail",
    "plan_rebuild_staged",
    "plan_rebuild_whole",
    "peered",
    "primary_behind",
    "rebuild_aborted",
    "rebuild_completed",
    "rebuild_deferred",
    "rebuild_fallback",
    "rebuild_image_installed",
    "rebuild_queued",
    "rebuild_required",
    "replica_added",
    "replica_removed",
    "replica_storage_failed",
    "retention_budget_exceeded",
    "retention_hold_failed",
    "session_completed",
    "session_invalidated",
    "stale_endpoint_rejected",
    "truncation_recorded",
    "verify_mismatch",
];

/// Whether `event` is a decision (kept apart from routine events).
pub fn is_decision(event: &str) -> bool {
    DECISIONS.contains(&event)
}

/// How far back a repeat is looked for, per class.
const COALESCE_WINDOW: usize = 8;

#[derive(Debug, Clone, Serialize)]
struct Ring {
    capacity: usize,
    dropped: u64,
    events: VecDeque<RecoveryEvent>,
}

impl Ring {
    fn new(capacity: usize) -> Self {
        Self {
            capacity: capacity.max(1),
            dropped: 0,
            events: VecDeque::new(),
        }
    }

    /// Folds the event into a recent equal one; returns whether it did.
    fn fold(
        &mut self,
        tick: Tick,
        replica: Option<&ReplicaId>,
        session: Option<SessionId>,
        event: &'static str,
        detail: &str,
    ) -> bool {
        let recent = self.events.iter_mut().rev().take(COALESCE_WINDOW);
        for earlier in recent {
            if earlier.event == event
                && earlier.replica.as_ref() == replica
                && earlier.detail == detail
            {
                earlier.repeats += 1;
                earlier.last_tick = tick;
                earlier.session = session.or(earlier.session);
                return true;
            }
        }
        false
    }

    fn push(&mut self, event: RecoveryEvent) {
        if self.events.len() == self.capacity {
            self.events.pop_front();
            self.dropped += 1;
        }
        self.events.push_back(event);
    }
}

/// Bounded rings of recovery events: decisions and routine events apart.
#[derive(Debug, Clone, Serialize)]
pub struct RecoveryLog {
    next_seq: u64,
    decisions: Ring,
    routine: Ring,
    /// Every decision recorded, by name (a few names per volume: a vector).
    totals: Vec<(&'static str, u64)>,
}

impl RecoveryLog {
    /// A log keeping at most `capacity` decisions and `capacity` routine events.
    pub fn new(capacity: usize) -> Self {
        Self {
            next_seq: 0,
            decisions: Ring::new(capacity),
            routine: Ring::new(capacity),
            totals: Vec::new(),
        }
    }

    /// Records an event: folded into a recent equal one of its class, or
    /// appended (dropping that class's oldest when full).
    pub fn record(
        &mut self,
        tick: Tick,
        replica: Option<&ReplicaId>,
        session: Option<SessionId>,
        event: &'static str,
        detail: impl Into<String>,
    ) {
        let detail = detail.into();
        let decision = is_decision(event);
        if decision {
            match self.totals.iter_mut().find(|(name, _)| *name == event) {
                Some((_, count)) => *count += 1,
                None => self.totals.push((event, 1)),
            }
        }
        let ring = if decision {
            &mut self.decisions
        } else {
            &mut self.routine
        };
        if ring.fold(tick, replica, session, event, &detail) {
            return;
        }
        ring.push(RecoveryEvent {
            seq: self.next_seq,
            tick,
            replica: replica.cloned(),
            session,
            event,
            detail,
            repeats: 0,
            last_tick: tick,
        });
        self.next_seq += 1;
    }

    /// Events held, oldest first (both classes, in sequence order).
    pub fn events(&self) -> impl Iterator<Item = &RecoveryEvent> {
        Merge {
            a: self.decisions.events.iter().peekable(),
            b: self.routine.events.iter().peekable(),
        }
    }

    /// Decisions held, oldest first.
    pub fn decisions(&self) -> impl Iterator<Item = &RecoveryEvent> {
        self.decisions.events.iter()
    }

    /// Events with sequence number `>= seq`, for incremental readers. A
    /// repeat folded into an older event does not show up here again.
    pub fn since(&self, seq: u64) -> impl Iterator<Item = &RecoveryEvent> {
        self.events().filter(move |e| e.seq >= seq)
    }

    /// How many events were dropped because their class's ring was full.
    pub fn dropped(&self) -> u64 {
        self.decisions.dropped + self.routine.dropped
    }

    /// How many times each decision was recorded since the engine began,
    /// repeats and dropped ones included; names never recorded are absent.
    pub fn decision_totals(&self) -> impl Iterator<Item = (&'static str, u64)> + '_ {
        self.totals.iter().copied()
    }

    /// How many decisions were dropped (the decision ring was full).
    pub fn decisions_dropped(&self) -> u64 {
        self.decisions.dropped
    }

    /// Number of events held.
    pub fn len(&self) -> usize {
        self.decisions.events.len() + self.routine.events.len()
    }

    /// Whether no event is held.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Two sequence-ordered iterators merged by sequence number.
struct Merge<'a, I: Iterator<Item = &'a RecoveryEvent>> {
    a: std::iter::Peekable<I>,
    b: std::iter::Peekable<I>,
}

impl<'a, I: Iterator<Item = &'a RecoveryEvent>> Iterator for Merge<'a, I> {
    type Item = &'a RecoveryEvent;

    fn next(&mut self) -> Option<Self::Item> {
        match (self.a.peek(), self.b.peek()) {
            (Some(a), Some(b)) if a.seq <= b.seq => self.a.next(),
            (Some(_), Some(_)) => self.b.next(),
            (Some(_), None) => self.a.next(),
            (None, _) => self.b.next(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rid(server: &str) -> ReplicaId {
        ReplicaId::new("v", server).unwrap()
    }

    #[test]
    fn a_full_ring_drops_its_oldest_and_counts_it() {
        let mut log = RecoveryLog::new(2);
        for i in 0..3 {
            log.record(Tick(i), None, None, "handshake", format!("n={i}"));
        }
        let seqs: Vec<u64> = log.events().map(|e| e.seq).collect();
        assert_eq!(seqs, [1, 2]);
        assert_eq!(log.dropped(), 1);
        assert_eq!(log.since(2).count(), 1);
    }

    #[test]
    fn routine_events_never_evict_a_decision() {
        let mut log = RecoveryLog::new(4);
        log.record(Tick(0), Some(&rid("a")), None, "handshake", "zero_gap");
        for i in 0..1000 {
            let detail = format!("barrier b{i} already resolved");
            log.record(Tick(i), None, None, "stale_timeout_ignored", detail);
        }
        assert_eq!(log.decisions().count(), 1);
        assert_eq!(log.decisions_dropped(), 0);
        assert_eq!(log.len(), 5);
        // In sequence order across both classes.
        let seqs: Vec<u64> = log.events().map(|e| e.seq).collect();
        let mut sorted = seqs.clone();
        sorted.sort_unstable();
        assert_eq!(seqs, sorted);
        assert_eq!(seqs[0], 0);
    }

    #[test]
    fn repeats_fold_into_one_event_with_a_count() {
        let mut log = RecoveryLog::new(16);
        for i in 0..500 {
            let session = Some(SessionId(i));
            let refused = "transient: connect: Connection refused";
            log.record(
                Tick(i),
                Some(&rid("a")),
                session,
                "session_created",
                "kind=CatchUp",
            );
            log.record(
                Tick(i),
                Some(&rid("a")),
                session,
                "session_invalidated",
                refused,
            );
        }
        let events: Vec<&RecoveryEvent> = log.events().collect();
        assert_eq!(events.len(), 2);
        assert_eq!(events[1].repeats, 499);
        assert_eq!(
            (events[1].tick, events[1].last_tick, events[1].session),
            (Tick(0), Tick(499), Some(SessionId(499)))
        );
        // Another replica's, or another detail, is an event of its own.
        log.record(
            Tick(600),
            Some(&rid("b")),
            None,
            "session_created",
            "kind=CatchUp",
        );
        log.record(
            Tick(601),
            Some(&rid("a")),
            None,
            "session_created",
            "kind=Rebuild",
        );
        assert_eq!(log.len(), 4);
        assert_eq!(log.dropped(), 0);
    }

    #[test]
    fn decision_totals_count_what_the_rings_fold_and_drop() {
        let mut log = RecoveryLog::new(2);
        for i in 0..10 {
            // Folded into one event each: the ring holds 2, the totals 10.
            log.record(Tick(i), Some(&rid("a")), None, "plan_catchup", "gap 5");
            log.record(
                Tick(i),
                Some(&rid("a")),
                None,
                "session_completed",
                "in sync",
            );
            // Each one new: dropped from the ring, counted all the same.
            log.record(
                Tick(i),
                Some(&rid("b")),
                None,
                "session_invalidated",
                format!("attempt {i}"),
            );
            // Routine events are not decisions and are not counted.
            log.record(Tick(i), Some(&rid("a")), None, "session_created", "x");
        }
        let totals: Vec<_> = log.decision_totals().collect();
        assert_eq!(
            totals,
            [
                ("plan_catchup", 10),
                ("session_completed", 10),
                ("session_invalidated", 10)
            ]
        );
        assert!(log.decisions_dropped() > 0);
    }
}
