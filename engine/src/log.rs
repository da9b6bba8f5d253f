//! The bounded recovery event log: why each decision was made.
//!
//! Events use the reference design's names (`session_created`,
//! `session_invalidated`, `handshake`, `plan_catchup`,
//! `plan_rebuild_full_base`, `escalated`, `exec_resources_released`, ...).
//! When full, the oldest event is dropped and counted.

use crate::ids::{ReplicaId, SessionId, Tick};
use serde::Serialize;
use std::collections::VecDeque;

/// One recovery event.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct RecoveryEvent {
    /// Sequence number, increasing for the life of the engine.
    pub seq: u64,
    /// When it happened.
    pub tick: Tick,
    /// The replica concerned, if any.
    pub replica: Option<ReplicaId>,
    /// The session concerned, if any.
    pub session: Option<SessionId>,
    /// Event name.
    pub event: &'static str,
    /// Human-readable detail with the numbers behind the decision.
    pub detail: String,
}

/// A bounded ring of recovery events.
#[derive(Debug, Clone, Serialize)]
pub struct RecoveryLog {
    capacity: usize,
    next_seq: u64,
    dropped: u64,
    events: VecDeque<RecoveryEvent>,
}

impl RecoveryLog {
    /// A log keeping at most `capacity` events (at least one).
    pub fn new(capacity: usize) -> Self {
        Self {
            capacity: capacity.max(1),
            next_seq: 0,
            dropped: 0,
            events: VecDeque::new(),
        }
    }

    /// Appends an event, dropping the oldest when full.
    pub fn record(
        &mut self,
        tick: Tick,
        replica: Option<&ReplicaId>,
        session: Option<SessionId>,
        event: &'static str,
        detail: impl Into<String>,
    ) {
        if self.events.len() == self.capacity {
            self.events.pop_front();
            self.dropped += 1;
        }
        self.events.push_back(RecoveryEvent {
            seq: self.next_seq,
            tick,
            replica: replica.cloned(),
            session,
            event,
            detail: detail.into(),
        });
        self.next_seq += 1;
    }

    /// Events held, oldest first.
    pub fn events(&self) -> impl Iterator<Item = &RecoveryEvent> {
        self.events.iter()
    }

    /// Events with sequence number `>= seq`, for incremental readers.
    pub fn since(&self, seq: u64) -> impl Iterator<Item = &RecoveryEvent> {
        self.events.iter().filter(move |e| e.seq >= seq)
    }

    /// How many events were dropped because the log was full.
    pub fn dropped(&self) -> u64 {
        self.dropped
    }

    /// Number of events held.
    pub fn len(&self) -> usize {
        self.events.len()
    }

    /// Whether no event is held.
    pub fn is_empty(&self) -> bool {
        self.events.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn full_log_drops_oldest_and_counts_it() {
        let mut log = RecoveryLog::new(2);
        for i in 0..3 {
            log.record(Tick(i), None, None, "handshake", format!("n={i}"));
        }
        let seqs: Vec<u64> = log.events().map(|e| e.seq).collect();
        assert_eq!(seqs, [1, 2]);
        assert_eq!(log.dropped(), 1);
        assert_eq!(log.since(2).count(), 1);
    }
}
