//! Catch-up budgets: how long, how much and how slowly a catch-up may run
//! before it is declared non-convergent and escalated to a rebuild.
//!
//! Every limit is optional. A violation is a value, not a panic: the engine
//! turns it into an `escalated` log event and a sticky NeedsRebuild.

use crate::ids::Tick;
use serde::Serialize;

/// Limits for one catch-up session.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize)]
pub struct CatchUpBudget {
    /// Total ticks the catch-up may take.
    pub max_duration_ticks: Option<u64>,
    /// Entries (LSNs) the catch-up may ship; checked against the frozen gap at plan time too.
    pub max_entries: Option<u64>,
    /// Payload bytes the catch-up may ship.
    pub max_bytes: Option<u64>,
    /// Ticks allowed between two progress reports before the catch-up counts as stalled.
    pub progress_deadline_ticks: Option<u64>,
}

/// Why a catch-up was judged non-convergent.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, thiserror::Error)]
#[serde(rename_all = "snake_case", tag = "limit")]
pub enum BudgetViolation {
    /// Ran longer than `max_duration_ticks`.
    #[error("budget_duration_exceeded: elapsed={elapsed} max={max}")]
    Duration {
        /// Ticks since the catch-up started.
        elapsed: u64,
        /// The limit.
        max: u64,
    },
    /// Needs or shipped more entries than `max_entries`.
    #[error("budget_entries_exceeded: entries={entries} max={max}")]
    Entries {
        /// Entries needed or shipped.
        entries: u64,
        /// The limit.
        max: u64,
    },
    /// Shipped more bytes than `max_bytes`.
    #[error("budget_bytes_exceeded: bytes={bytes} max={max}")]
    Bytes {
        /// Bytes shipped.
        bytes: u64,
        /// The limit.
        max: u64,
    },
    /// No progress for longer than `progress_deadline_ticks`.
    #[error("budget_stalled: no progress for {idle} ticks, deadline={deadline}")]
    Stalled {
        /// Ticks since the last progress.
        idle: u64,
        /// The limit.
        deadline: u64,
    },
}

/// Running account of one catch-up against its budget.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct BudgetTracker {
    budget: CatchUpBudget,
    started: Tick,
    last_progress: Tick,
    entries: u64,
    bytes: u64,
}

impl BudgetTracker {
    /// Starts the account at `now`.
    pub fn start(budget: CatchUpBudget, now: Tick) -> Self {
        Self {
            budget,
            started: now,
            last_progress: now,
            entries: 0,
            bytes: 0,
        }
    }

    /// Checks a planned gap against `max_entries` before anything is shipped.
    pub fn admit_gap(budget: &CatchUpBudget, gap_entries: u64) -> Result<(), BudgetViolation> {
        match budget.max_entries {
            Some(max) if gap_entries > max => Err(BudgetViolation::Entries {
                entries: gap_entries,
                max,
            }),
            _ => Ok(()),
        }
    }

    /// Records progress at `now` and checks the volume limits (entries, bytes).
    ///
    /// Time limits are deliberately not checked here: they fire as timer
    /// events ([`check`](Self::check) at [`next_deadline`](Self::next_deadline)),
    /// so progress that arrives in the same tick as a deadline wins the race,
    /// as every message does over a timer in that tick.
    pub fn record(&mut self, now: Tick, entries: u64, bytes: u64) -> Result<(), BudgetViolation> {
        self.entries = self.entries.saturating_add(entries);
        self.bytes = self.bytes.saturating_add(bytes);
        self.last_progress = self.last_progress.max(now);
        self.check_volume()
    }

    /// Checks every limit at `now` without recording progress.
    pub fn check(&self, now: Tick) -> Result<(), BudgetViolation> {
        let budget = &self.budget;
        if let Some(max) = budget.max_duration_ticks {
            let elapsed = now.since(self.started);
            if elapsed > max {
                return Err(BudgetViolation::Duration { elapsed, max });
            }
        }
        if let Some(deadline) = budget.progress_deadline_ticks {
            let idle = now.since(self.last_progress);
            if idle > deadline {
                return Err(BudgetViolation::Stalled { idle, deadline });
            }
        }
        self.check_volume()
    }

    fn check_volume(&self) -> Result<(), BudgetViolation> {
        let budget = &self.budget;
        if let Some(max) = budget.max_entries {
            if self.entries > max {
                return Err(BudgetViolation::Entries {
                    entries: self.entries,
                    max,
                });
            }
        }
        if let Some(max) = budget.max_bytes {
            if self.bytes > max {
                return Err(BudgetViolation::Bytes {
                    bytes: self.bytes,
                    max,
                });
            }
        }
        Ok(())
    }

    /// The earliest tick at which a time limit can next be violated, if any.
    pub fn next_deadline(&self) -> Option<Tick> {
        let duration = self
            .budget
            .max_duration_ticks
            .map(|max| self.started.after(max + 1));
        let stall = self
            .budget
            .progress_deadline_ticks
            .map(|d| self.last_progress.after(d + 1));
        match (duration, stall) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// Entries recorded so far.
    pub fn entries(&self) -> u64 {
        self.entries
    }

    /// Bytes recorded so far.
    pub fn bytes(&self) -> u64 {
        self.bytes
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn budget() -> CatchUpBudget {
        CatchUpBudget {
            max_duration_ticks: Some(100),
            max_entries: Some(50),
            max_bytes: Some(1000),
            progress_deadline_ticks: Some(10),
        }
    }

    #[test]
    fn limits_are_inclusive_and_violations_exact() {
        let mut tracker = BudgetTracker::start(budget(), Tick(0));
        assert_eq!(tracker.record(Tick(10), 50, 1000), Ok(()));
        assert_eq!(
            tracker.record(Tick(11), 1, 0),
            Err(BudgetViolation::Entries {
                entries: 51,
                max: 50
            })
        );
    }

    #[test]
    fn stall_and_duration_are_measured_from_the_right_tick() {
        let mut tracker = BudgetTracker::start(budget(), Tick(0));
        assert_eq!(tracker.check(Tick(10)), Ok(()));
        assert_eq!(
            tracker.check(Tick(11)),
            Err(BudgetViolation::Stalled {
                idle: 11,
                deadline: 10
            })
        );
        assert_eq!(tracker.next_deadline(), Some(Tick(11)));
        for t in (5..=100).step_by(5) {
            assert_eq!(tracker.record(Tick(t), 0, 0), Ok(()));
        }
        assert_eq!(
            tracker.record(Tick(101), 0, 0),
            Ok(()),
            "time limits are the timer's job"
        );
        assert_eq!(
            tracker.check(Tick(101)),
            Err(BudgetViolation::Duration {
                elapsed: 101,
                max: 100
            })
        );
    }

    #[test]
    fn admit_gap_checks_entries_before_shipping() {
        assert!(BudgetTracker::admit_gap(&budget(), 50).is_ok());
        assert!(BudgetTracker::admit_gap(&budget(), 51).is_err());
        assert!(BudgetTracker::admit_gap(&CatchUpBudget::default(), u64::MAX).is_ok());
    }
}
