//! The rebuild state machine.
//!
//! `SourceSelect → Transfer → TailReplay → Completed`, or `Aborted` from any
//! live state. Tail replay exists only for snapshot+tail rebuilds and may only
//! start once the transfer reached the snapshot LSN. Progress is monotonic:
//! a report that goes backwards or past the target is a typed error and
//! changes nothing.

use crate::history::RebuildSource;
use crate::ids::Lsn;
use serde::Serialize;

/// Where a rebuild is.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case", tag = "state")]
pub enum RebuildState {
    /// Waiting for the source to be chosen and its resources granted.
    SourceSelect,
    /// Streaming the snapshot or base image.
    Transfer {
        /// The chosen source.
        source: RebuildSource,
        /// LSN the transferred image holds when complete.
        image_lsn: Lsn,
        /// Bytes transferred so far.
        transferred_bytes: u64,
    },
    /// Replaying the WAL `(image_lsn, target]` on top of the installed snapshot.
    TailReplay {
        /// LSN of the installed image.
        image_lsn: Lsn,
        /// LSN replayed so far.
        replayed: Lsn,
        /// LSN the replay must reach.
        target: Lsn,
    },
    /// The replica holds everything up to `flushed`.
    Completed {
        /// What the replica now holds.
        flushed: Lsn,
    },
    /// The rebuild stopped; the replica still needs one.
    Aborted {
        /// Why.
        reason: String,
    },
}

/// An input the rebuild FSM refused. The state is unchanged.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RebuildError {
    /// The input does not apply in the current state.
    #[error("rebuild input {input} not valid in state {state}")]
    WrongState {
        /// What was attempted.
        input: &'static str,
        /// The state it was attempted in.
        state: &'static str,
    },
    /// Progress went backwards.
    #[error("rebuild progress went backwards: {from} -> {to}")]
    NonMonotonic {
        /// Previous progress.
        from: u64,
        /// Reported progress.
        to: u64,
    },
    /// Tail replay was reported before the transfer reached the snapshot LSN.
    #[error("tail replay before transfer reached the snapshot lsn {image_lsn}")]
    TailBeforeTransfer {
        /// The snapshot LSN the transfer must reach first.
        image_lsn: Lsn,
    },
    /// The transfer finished at an LSN other than the one planned.
    #[error("transfer finished at {reported}, plan bound {expected}")]
    TransferLsnMismatch {
        /// LSN the plan bound.
        expected: Lsn,
        /// LSN reported.
        reported: Lsn,
    },
    /// Replay went past the frozen target.
    #[error("tail replay reported {reported}, past target {target}")]
    PastTarget {
        /// Reported LSN.
        reported: Lsn,
        /// The target.
        target: Lsn,
    },
}

/// The rebuild FSM of one session.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct RebuildFsm {
    state: RebuildState,
    tail_target: Lsn,
}

impl Default for RebuildFsm {
    fn default() -> Self {
        Self::new()
    }
}

impl RebuildFsm {
    /// A rebuild waiting for its source.
    pub fn new() -> Self {
        Self {
            state: RebuildState::SourceSelect,
            tail_target: Lsn::ZERO,
        }
    }

    /// The current state.
    pub fn state(&self) -> &RebuildState {
        &self.state
    }

    /// Short state name for logs.
    pub fn state_name(&self) -> &'static str {
        match self.state {
            RebuildState::SourceSelect => "source_select",
            RebuildState::Transfer { .. } => "transfer",
            RebuildState::TailReplay { .. } => "tail_replay",
            RebuildState::Completed { .. } => "completed",
            RebuildState::Aborted { .. } => "aborted",
        }
    }

    fn wrong(&self, input: &'static str) -> RebuildError {
        RebuildError::WrongState {
            input,
            state: self.state_name(),
        }
    }

    /// Chooses the source; `image_lsn` is the LSN the image holds (snapshot LSN,
    /// or the exact base LSN the shell granted).
    pub fn select(&mut self, source: RebuildSource, image_lsn: Lsn) -> Result<(), RebuildError> {
        if !matches!(self.state, RebuildState::SourceSelect) {
            return Err(self.wrong("select"));
        }
        self.tail_target = match &source {
            RebuildSource::SnapshotTail { tail_target, .. } => *tail_target,
            RebuildSource::FullBase { .. } => image_lsn,
        };
        self.state = RebuildState::Transfer {
            source,
            image_lsn,
            transferred_bytes: 0,
        };
        Ok(())
    }

    /// Records that `bytes` in total have been transferred.
    pub fn transferred(&mut self, bytes: u64) -> Result<(), RebuildError> {
        match &mut self.state {
            RebuildState::Transfer {
                transferred_bytes, ..
            } => {
                if bytes < *transferred_bytes {
                    return Err(RebuildError::NonMonotonic {
                        from: *transferred_bytes,
                        to: bytes,
                    });
                }
                *transferred_bytes = bytes;
                Ok(())
            }
            _ => Err(self.wrong("transferred")),
        }
    }

    /// Records that the image is installed at `at`. A full base completes here;
    /// a snapshot moves on to tail replay (or completes if its tail is empty).
    pub fn transfer_done(&mut self, at: Lsn) -> Result<(), RebuildError> {
        let RebuildState::Transfer {
            source, image_lsn, ..
        } = &self.state
        else {
            return Err(self.wrong("transfer_done"));
        };
        if at != *image_lsn {
            return Err(RebuildError::TransferLsnMismatch {
                expected: *image_lsn,
                reported: at,
            });
        }
        self.state = match source {
            RebuildSource::SnapshotTail { .. } if self.tail_target > at => {
                RebuildState::TailReplay {
                    image_lsn: at,
                    replayed: at,
                    target: self.tail_target,
                }
            }
            _ => RebuildState::Completed { flushed: at },
        };
        Ok(())
    }

    /// Records that the tail is replayed through `lsn`.
    pub fn tail_replayed(&mut self, lsn: Lsn) -> Result<(), RebuildError> {
        match &mut self.state {
            RebuildState::Transfer { image_lsn, .. } => Err(RebuildError::TailBeforeTransfer {
                image_lsn: *image_lsn,
            }),
            RebuildState::TailReplay {
                replayed, target, ..
            } => {
                if lsn < *replayed {
                    return Err(RebuildError::NonMonotonic {
                        from: replayed.get(),
                        to: lsn.get(),
                    });
                }
                if lsn > *target {
                    return Err(RebuildError::PastTarget {
                        reported: lsn,
                        target: *target,
                    });
                }
                *replayed = lsn;
                if lsn == *target {
                    self.state = RebuildState::Completed { flushed: lsn };
                }
                Ok(())
            }
            _ => Err(self.wrong("tail_replayed")),
        }
    }

    /// Stops the rebuild. Aborting a finished rebuild is refused.
    pub fn abort(&mut self, reason: impl Into<String>) -> Result<(), RebuildError> {
        if matches!(
            self.state,
            RebuildState::Completed { .. } | RebuildState::Aborted { .. }
        ) {
            return Err(self.wrong("abort"));
        }
        self.state = RebuildState::Aborted {
            reason: reason.into(),
        };
        Ok(())
    }

    /// What the replica holds when the rebuild completed.
    pub fn completed_at(&self) -> Option<Lsn> {
        match self.state {
            RebuildState::Completed { flushed } => Some(flushed),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn snapshot(at: u64, target: u64) -> RebuildSource {
        RebuildSource::SnapshotTail {
            snapshot_lsn: Lsn(at),
            tail_target: Lsn(target),
        }
    }

    #[test]
    fn snapshot_tail_walks_every_state_in_order() {
        let mut fsm = RebuildFsm::new();
        fsm.select(snapshot(40, 90), Lsn(40)).unwrap();
        fsm.transferred(4096).unwrap();
        assert_eq!(
            fsm.tail_replayed(Lsn(50)),
            Err(RebuildError::TailBeforeTransfer { image_lsn: Lsn(40) })
        );
        fsm.transfer_done(Lsn(40)).unwrap();
        fsm.tail_replayed(Lsn(60)).unwrap();
        assert_eq!(
            fsm.tail_replayed(Lsn(59)),
            Err(RebuildError::NonMonotonic { from: 60, to: 59 })
        );
        assert_eq!(
            fsm.tail_replayed(Lsn(91)),
            Err(RebuildError::PastTarget {
                reported: Lsn(91),
                target: Lsn(90)
            })
        );
        fsm.tail_replayed(Lsn(90)).unwrap();
        assert_eq!(fsm.completed_at(), Some(Lsn(90)));
        assert!(fsm.abort("late").is_err());
    }

    #[test]
    fn full_base_completes_at_transfer_without_tail_replay() {
        let mut fsm = RebuildFsm::new();
        let source = RebuildSource::FullBase {
            min_base_lsn: Lsn(90),
            reason: "x".into(),
        };
        fsm.select(source, Lsn(95)).unwrap();
        assert_eq!(
            fsm.transfer_done(Lsn(94)),
            Err(RebuildError::TransferLsnMismatch {
                expected: Lsn(95),
                reported: Lsn(94)
            })
        );
        fsm.transfer_done(Lsn(95)).unwrap();
        assert_eq!(fsm.completed_at(), Some(Lsn(95)));
    }

    #[test]
    fn transfer_progress_is_monotonic_and_abort_is_terminal() {
        let mut fsm = RebuildFsm::new();
        assert!(matches!(
            fsm.transferred(1),
            Err(RebuildError::WrongState { .. })
        ));
        fsm.select(snapshot(10, 10), Lsn(10)).unwrap();
        fsm.transferred(100).unwrap();
        assert_eq!(
            fsm.transferred(99),
            Err(RebuildError::NonMonotonic { from: 100, to: 99 })
        );
        fsm.abort("epoch_bumped").unwrap();
        assert!(
            matches!(fsm.state(), RebuildState::Aborted { reason } if reason == "epoch_bumped")
        );
        assert!(fsm.transfer_done(Lsn(10)).is_err());
    }
}
