//! Retries after a failed session: backed off exponentially, with a cap, per
//! cause. A network failure is retried soon; a replica whose storage failed
//! (ENOSPC, EIO, a poisoned WAL) or a rebuild that failed waits longer. No
//! recovery is retried in a tight loop: a heartbeat starts a new session only
//! once the replica's retry time has come.
//!
//! The cause is kept for operators (in the replica's status) and for writes
//! (a barrier that times out names each lagging replica's cause).

use crate::engine::Engine;
use crate::error::EngineError;
use crate::events::ExecutionFailure;
use crate::ids::{ReplicaId, Tick};
use serde::Serialize;
use std::fmt;

/// Exponential backoff: `first_ticks`, doubling per attempt, at most `max_ticks`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Backoff {
    /// Delay after the first failure.
    pub first_ticks: u64,
    /// The cap.
    pub max_ticks: u64,
}

impl Backoff {
    /// The delay before retrying after the `attempts`-th failure in a row.
    pub fn delay(&self, attempts: u32) -> u64 {
        let doublings = attempts.saturating_sub(1).min(63);
        self.first_ticks
            .saturating_mul(1u64 << doublings)
            .min(self.max_ticks)
    }
}

/// Backoff per cause of failure.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct RetryPolicy {
    /// Connections refused, reset or timed out.
    pub network: Backoff,
    /// The replica cannot write (it said so with a typed error).
    pub storage: Backoff,
    /// A rebuild failed or could not get its base.
    pub rebuild: Backoff,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        Self {
            network: Backoff {
                first_ticks: 10,
                max_ticks: 500,
            },
            storage: Backoff {
                first_ticks: 100,
                max_ticks: 6000,
            },
            rebuild: Backoff {
                first_ticks: 100,
                max_ticks: 6000,
            },
        }
    }
}

/// Why a replica's last session failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum FailureCause {
    /// The connection failed.
    Network,
    /// The replica's storage failed.
    ReplicaStorage,
    /// The rebuild failed, or its base could not be pinned.
    Rebuild,
}

impl fmt::Display for FailureCause {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Network => "network",
            Self::ReplicaStorage => "replica storage failed",
            Self::Rebuild => "rebuild failed",
        })
    }
}

/// A replica's consecutive failures, and when it may be tried again. It is
/// forgotten once the replica, in sync, acknowledges new writes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct FailureRecord {
    /// The last failure's cause.
    pub cause: FailureCause,
    /// What it said.
    pub reason: String,
    /// Failures in a row (until it acknowledges new writes in sync).
    pub attempts: u32,
    /// No new session starts before this tick.
    pub retry_at: Tick,
}

impl fmt::Display for FailureRecord {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.cause, self.reason)
    }
}

impl ExecutionFailure {
    /// The cause a failure is retried under (an unrecoverable one escalates
    /// to a rebuild at once; when a rebuild itself fails it waits as one).
    pub fn cause(&self) -> FailureCause {
        match self {
            Self::Transient(_) => FailureCause::Network,
            Self::ReplicaStorage(_) => FailureCause::ReplicaStorage,
            Self::Unrecoverable(_) => FailureCause::Rebuild,
        }
    }

    /// What the failure said.
    pub fn reason(&self) -> &str {
        match self {
            Self::Transient(reason)
            | Self::ReplicaStorage(reason)
            | Self::Unrecoverable(reason) => reason,
        }
    }
}

impl Engine {
    /// Counts a failure of the replica and sets when it may be retried.
    pub(crate) fn record_failure(
        &mut self,
        replica: &ReplicaId,
        cause: FailureCause,
        reason: &str,
    ) {
        let now = self.now;
        let policy = self.config.retry;
        let Some(sender) = self.senders.get_mut(replica) else {
            return;
        };
        let attempts = sender.failure.as_ref().map_or(0, |f| f.attempts) + 1;
        let backoff = match cause {
            FailureCause::Network => policy.network,
            FailureCause::ReplicaStorage => policy.storage,
            FailureCause::Rebuild => policy.rebuild,
        };
        let retry_at = now.after(backoff.delay(attempts));
        sender.failure = Some(FailureRecord {
            cause,
            reason: reason.to_owned(),
            attempts,
            retry_at,
        });
        if cause == FailureCause::ReplicaStorage {
            // The reason alone, so that repeats fold into one line with a
            // count; the attempt and retry tick are in the replica's status.
            self.record(Some(replica), None, "replica_storage_failed", reason);
        }
    }

    /// Whether the replica may get a new session now.
    pub(crate) fn may_retry(&self, replica: &ReplicaId) -> bool {
        self.senders
            .get(replica)
            .and_then(|s| s.failure.as_ref())
            .is_none_or(|f| f.retry_at <= self.now)
    }

    /// An operator asks for the replica to be retried now: its backoff is
    /// skipped once (its failure count stays).
    pub fn handle_retry_now(&mut self, replica: &ReplicaId) -> Result<(), EngineError> {
        let now = self.now;
        if let Some(failure) = self.sender_mut(replica)?.failure.as_mut() {
            failure.retry_at = failure.retry_at.min(now);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_up_to_its_cap() {
        let b = Backoff {
            first_ticks: 10,
            max_ticks: 100,
        };
        let delays: Vec<u64> = (1..=6).map(|n| b.delay(n)).collect();
        assert_eq!(delays, [10, 20, 40, 80, 100, 100]);
        assert_eq!(b.delay(u32::MAX), 100);
    }
}
