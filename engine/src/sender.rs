//! Per-replica sender state: identity, endpoint, replication state and the
//! one active session.
//!
//! `NeedsRebuild` is sticky: once a replica needs a rebuild, no handshake,
//! reconnect or reassignment clears it; only a completed rebuild does
//! ([`Sender::rebuild_completed`]). While it is sticky, the state stays
//! `NeedsRebuild` (or `Rebuilding` while a rebuild runs).

use crate::ids::{BarrierId, Endpoint, Lsn, ReplicaId, Tick};
use crate::retention::RetentionHold;
use crate::retry::FailureRecord;
use crate::session::Session;
use serde::Serialize;

/// Replication state of one replica, as seen by the primary.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ReplicaState {
    /// No connection and no session.
    Disconnected,
    /// A session is connecting or handshaking.
    Connecting,
    /// A WAL catch-up runs.
    CatchingUp,
    /// Receiving live traffic; counts toward commits.
    InSync,
    /// Was InSync, lost its connection; likely a short catch-up away.
    Degraded,
    /// Its gap is not recoverable from the WAL. Sticky until a rebuild completes.
    NeedsRebuild,
    /// A rebuild runs.
    Rebuilding,
}

impl ReplicaState {
    /// Every state, in lifecycle order.
    pub const ALL: [ReplicaState; 7] = [
        ReplicaState::Disconnected,
        ReplicaState::Connecting,
        ReplicaState::CatchingUp,
        ReplicaState::InSync,
        ReplicaState::Degraded,
        ReplicaState::NeedsRebuild,
        ReplicaState::Rebuilding,
    ];

    /// The state's name as in status JSON (`in_sync`).
    pub fn as_str(self) -> &'static str {
        match self {
            ReplicaState::Disconnected => "disconnected",
            ReplicaState::Connecting => "connecting",
            ReplicaState::CatchingUp => "catching_up",
            ReplicaState::InSync => "in_sync",
            ReplicaState::Degraded => "degraded",
            ReplicaState::NeedsRebuild => "needs_rebuild",
            ReplicaState::Rebuilding => "rebuilding",
        }
    }
}

/// Why a replica needs a rebuild, kept while the need lasts.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct RebuildNeed {
    /// Why it needs one.
    pub reason: String,
    /// Set when a snapshot-based rebuild was refused (pin failed or timed out):
    /// the next plan must use a full base.
    pub snapshot_refused: Option<String>,
}

#[derive(Debug, Clone)]
pub(crate) struct Sender {
    pub(crate) id: ReplicaId,
    pub(crate) endpoint: Endpoint,
    state: ReplicaState,
    rebuild_need: Option<RebuildNeed>,
    pub(crate) session: Option<Session>,
    pub(crate) flushed: Lsn,
    pub(crate) last_heartbeat: Tick,
    pub(crate) hold: RetentionHold,
    /// Failures since it was last in sync, and when it may be retried.
    pub(crate) failure: Option<FailureRecord>,
    /// The barrier its ack was last asked to name, until that ack comes.
    pub(crate) barrier_requested: Option<BarrierId>,
    /// What its last handshake said it holds, and up to where that is this
    /// primary's history: what a rebuild can build on.
    pub(crate) holds: Option<(crate::history::ReplicaLog, Lsn)>,
    /// An online verify found its content differs: no map says where, so
    /// its rebuild compares every region. Cleared when a rebuild completes.
    pub(crate) verify_mismatch: Option<String>,
}

impl Sender {
    pub(crate) fn new(id: ReplicaId, endpoint: Endpoint, now: Tick) -> Self {
        Self {
            id,
            endpoint,
            state: ReplicaState::Disconnected,
            rebuild_need: None,
            session: None,
            flushed: Lsn::ZERO,
            last_heartbeat: now,
            hold: RetentionHold::None,
            failure: None,
            barrier_requested: None,
            holds: None,
            verify_mismatch: None,
        }
    }

    pub(crate) fn state(&self) -> ReplicaState {
        self.state
    }

    pub(crate) fn rebuild_need(&self) -> Option<&RebuildNeed> {
        self.rebuild_need.as_ref()
    }

    /// The session, if it is still live.
    pub(crate) fn active_session(&self) -> Option<&Session> {
        self.session.as_ref().filter(|s| !s.is_terminal())
    }

    pub(crate) fn active_session_mut(&mut self) -> Option<&mut Session> {
        self.session.as_mut().filter(|s| !s.is_terminal())
    }

    pub(crate) fn become_connecting(&mut self) {
        if self.rebuild_need.is_none() {
            self.state = ReplicaState::Connecting;
        } else {
            self.state = ReplicaState::NeedsRebuild;
        }
    }

    pub(crate) fn become_catching_up(&mut self) {
        debug_assert!(
            self.rebuild_need.is_none(),
            "a replica needing a rebuild never catches up"
        );
        self.state = ReplicaState::CatchingUp;
    }

    /// Enters InSync after a zero-gap handshake or a converged catch-up.
    /// Refused while a rebuild is needed: returns false and changes nothing.
    pub(crate) fn become_in_sync(&mut self) -> bool {
        if self.rebuild_need.is_some() {
            return false;
        }
        self.state = ReplicaState::InSync;
        true
    }

    pub(crate) fn become_needs_rebuild(&mut self, reason: &str) {
        match &mut self.rebuild_need {
            Some(_) => {}
            None => {
                self.rebuild_need = Some(RebuildNeed {
                    reason: reason.to_owned(),
                    snapshot_refused: None,
                })
            }
        }
        self.state = ReplicaState::NeedsRebuild;
    }

    pub(crate) fn refuse_snapshot(&mut self, reason: &str) {
        if let Some(need) = &mut self.rebuild_need {
            need.snapshot_refused = Some(reason.to_owned());
        }
    }

    pub(crate) fn become_rebuilding(&mut self) {
        debug_assert!(self.rebuild_need.is_some());
        self.state = ReplicaState::Rebuilding;
    }

    /// The only way out of the sticky NeedsRebuild.
    pub(crate) fn rebuild_completed(&mut self, flushed: Lsn) {
        self.rebuild_need = None;
        self.verify_mismatch = None;
        self.flushed = flushed;
        self.state = ReplicaState::InSync;
    }

    /// Connection or session lost: InSync degrades, a sticky need stays, anything else disconnects.
    pub(crate) fn connection_lost(&mut self) {
        self.state = match (self.state, &self.rebuild_need) {
            (_, Some(_)) => ReplicaState::NeedsRebuild,
            (ReplicaState::InSync | ReplicaState::Degraded, None) => ReplicaState::Degraded,
            _ => ReplicaState::Disconnected,
        };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn needs_rebuild_is_sticky_until_a_rebuild_completes() {
        let mut s = Sender::new(
            ReplicaId::parse("v/a").unwrap(),
            Endpoint::new("x", 1),
            Tick(0),
        );
        s.become_needs_rebuild("gap_beyond_retention");
        s.become_connecting();
        assert_eq!(s.state(), ReplicaState::NeedsRebuild);
        assert!(!s.become_in_sync());
        s.connection_lost();
        assert_eq!(s.state(), ReplicaState::NeedsRebuild);
        s.become_needs_rebuild("second reason does not replace the first");
        assert_eq!(s.rebuild_need().unwrap().reason, "gap_beyond_retention");
        s.become_rebuilding();
        s.rebuild_completed(Lsn(9));
        assert_eq!(s.state(), ReplicaState::InSync);
        assert!(s.rebuild_need().is_none());
    }

    #[test]
    fn in_sync_degrades_on_connection_loss() {
        let mut s = Sender::new(
            ReplicaId::parse("v/a").unwrap(),
            Endpoint::new("x", 1),
            Tick(0),
        );
        assert!(s.become_in_sync());
        s.connection_lost();
        assert_eq!(s.state(), ReplicaState::Degraded);
        s.become_connecting();
        s.connection_lost();
        assert_eq!(s.state(), ReplicaState::Disconnected);
    }
}
