//! Retention holds: the WAL a replica keeps from being recycled while it is
//! away, so that a short outage comes back by catch-up, not by a copy of the
//! whole volume.
//!
//! Every replica in the assignment has a hold at its last known durable LSN
//! (at the WAL's tail for a replica not seen yet, whose position is unknown).
//! While the replica is in sync the hold follows its acknowledgements (lazily,
//! at each [`Engine::handle_retention_usage`]); while it is away the hold
//! stays where it was, bounded by the volume's [`RetentionBudget`] in WAL
//! bytes and in time, like PostgreSQL's `max_slot_wal_keep_size`. Past the
//! budget the hold is released, logged as `retention_budget_exceeded`, and
//! the replica will rebuild unless it returns before the WAL is recycled.
//! A replica that needs a rebuild holds nothing: no catch-up would use it.
//!
//! The shell carries holds out with [`Command::HoldRetention`] (place or
//! move) and [`Command::ReleaseRetention`]; it reports each hold's size with
//! [`Engine::handle_retention_usage`] and a hold it could not place with
//! [`Engine::handle_retention_failed`].

use crate::engine::{Engine, Timer};
use crate::error::EngineError;
use crate::events::Command;
use crate::ids::{Lsn, ReplicaId, Tick};
use crate::sender::ReplicaState;
use serde::Serialize;

/// How much WAL, and for how long, a replica that is away may hold.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize)]
pub struct RetentionBudget {
    /// WAL bytes after the hold's LSN; `None` is unbounded.
    pub max_bytes: Option<u64>,
    /// Ticks away; `None` is unbounded.
    pub max_away_ticks: Option<u64>,
}

/// A replica's retention hold.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize)]
#[serde(rename_all = "snake_case", tag = "hold")]
pub enum RetentionHold {
    /// No hold (not placed yet).
    #[default]
    None,
    /// The WAL after `from` is kept.
    Held {
        /// Exclusive start of what is kept.
        from: Lsn,
        /// Since when the replica is away (not in sync); `None` while in sync.
        away_since: Option<Tick>,
    },
    /// Released: past the budget, not needed (a rebuild), or not placeable.
    Released {
        /// Why.
        reason: String,
    },
}

impl Engine {
    /// Places (or moves) the replica's hold at `from`; `away` says whether
    /// the replica is away from now on (an away replica's clock keeps running).
    pub(crate) fn hold_retention(&mut self, replica: &ReplicaId, from: Lsn, away: bool) {
        let now = self.now;
        let Some(sender) = self.senders.get_mut(replica) else {
            return;
        };
        let away_since = match (&sender.hold, away) {
            (_, false) => None,
            (
                RetentionHold::Held {
                    away_since: Some(since),
                    ..
                },
                true,
            ) => Some(*since),
            (_, true) => Some(now),
        };
        let moved = !matches!(sender.hold, RetentionHold::Held { from: f, .. } if f == from);
        sender.hold = RetentionHold::Held { from, away_since };
        if moved {
            self.commands.push(Command::HoldRetention {
                replica: replica.clone(),
                from,
            });
        }
        self.arm_away_timer(replica, away_since);
    }

    /// The replica went away: its hold stays where it is and its time away
    /// starts. One that leaves sync without a hold (it could not be placed,
    /// or it went in sync since the last usage report) gets one at what it
    /// acknowledged; one that was already away keeps what it has, so a hold
    /// released past the budget stays released.
    pub(crate) fn hold_while_away(&mut self, replica: &ReplicaId, was_in_sync: bool) {
        let now = self.now;
        let Some(sender) = self.senders.get_mut(replica) else {
            return;
        };
        let RetentionHold::Held { away_since, .. } = &mut sender.hold else {
            if was_in_sync {
                let flushed = sender.flushed;
                self.hold_retention(replica, flushed, true);
            }
            return;
        };
        if away_since.is_some() {
            return;
        }
        *away_since = Some(now);
        self.arm_away_timer(replica, Some(now));
    }

    fn arm_away_timer(&mut self, replica: &ReplicaId, away_since: Option<Tick>) {
        let timer = Timer::RetentionHold {
            replica: replica.clone(),
        };
        match (away_since, self.config.retention.max_away_ticks) {
            (Some(since), Some(max)) => self.schedule(since.after(max), timer),
            _ => self.cancel(&timer),
        }
    }

    /// Releases the replica's hold, if it has one, for `reason`.
    pub(crate) fn release_retention(&mut self, replica: &ReplicaId, reason: &str) {
        let Some(sender) = self.senders.get_mut(replica) else {
            return;
        };
        if !matches!(sender.hold, RetentionHold::Held { .. }) {
            return;
        }
        sender.hold = RetentionHold::Released {
            reason: reason.to_owned(),
        };
        self.cancel(&Timer::RetentionHold {
            replica: replica.clone(),
        });
        self.commands.push(Command::ReleaseRetention {
            replica: replica.clone(),
            reason: reason.to_owned(),
        });
    }

    fn exceed_budget(&mut self, replica: &ReplicaId, why: String) {
        let reason = format!("retention_budget_exceeded: {why}");
        let detail = format!("{why}; hold released, the replica will rebuild unless it returns before the WAL is recycled");
        self.record(Some(replica), None, "retention_budget_exceeded", detail);
        self.release_retention(replica, &reason);
    }

    /// The shell's periodic report of how many WAL bytes each hold keeps
    /// (the bytes after its LSN). An away replica over the byte budget loses
    /// its hold; an in-sync one has its hold moved up to what it acknowledged
    /// (or placed again, if it could not be placed before).
    pub fn handle_retention_usage(&mut self, usage: &[(ReplicaId, u64)]) {
        let unheld: Vec<(ReplicaId, Lsn)> = self
            .senders
            .values()
            .filter(|s| s.state() == ReplicaState::InSync)
            .filter(|s| !matches!(s.hold, RetentionHold::Held { .. }))
            .map(|s| (s.id.clone(), s.flushed))
            .collect();
        for (replica, flushed) in unheld {
            self.hold_retention(&replica, flushed, false);
        }
        for (replica, bytes) in usage {
            let Some(sender) = self.senders.get(replica) else {
                continue;
            };
            let RetentionHold::Held { from, away_since } = sender.hold else {
                continue;
            };
            let in_sync = sender.state() == ReplicaState::InSync;
            if in_sync && sender.flushed > from {
                let flushed = sender.flushed;
                self.hold_retention(replica, flushed, false);
                continue;
            }
            let over = self.config.retention.max_bytes.filter(|max| bytes > max);
            if let (Some(max), Some(_)) = (over, away_since) {
                let why = format!("holds {bytes} bytes of WAL after {from}, budget {max} bytes");
                self.exceed_budget(replica, why);
            }
        }
    }

    /// The shell could not place the replica's hold (the WAL after `from`
    /// was already recycled): the replica holds nothing.
    pub fn handle_retention_failed(
        &mut self,
        replica: &ReplicaId,
        reason: &str,
    ) -> Result<(), EngineError> {
        self.sender(replica)?;
        self.record(Some(replica), None, "retention_hold_failed", reason);
        self.release_retention(replica, &format!("hold_failed: {reason}"));
        Ok(())
    }

    /// The time budget of an away replica ran out.
    pub(crate) fn fire_retention_timer(&mut self, replica: &ReplicaId) {
        let now = self.now;
        let Some(RetentionHold::Held {
            from,
            away_since: Some(since),
        }) = self.senders.get(replica).map(|s| s.hold.clone())
        else {
            return;
        };
        let Some(max) = self.config.retention.max_away_ticks else {
            return;
        };
        let away = now.since(since);
        if away >= max {
            let why = format!(
                "away for {away} ticks since {since} holding the WAL after {from}, budget {max} ticks"
            );
            self.exceed_budget(replica, why);
        }
    }
}
