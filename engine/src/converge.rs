//! Convergence: whether a replica that is behind is gaining on the
//! volume's ingest, and what the engine does when it is not.
//!
//! A catch-up ships to a target frozen at plan time, then live shipping
//! takes the replica the rest of the way; a replica whose link (or share
//! of the recovery budget) is slower than what the volume ingests falls
//! further behind through both, forever. So the engine watches every
//! replica that is catching up or in sync with a backlog: the shell
//! reports, at each heartbeat, the bytes the volume has ingested in total
//! and the WAL bytes after each replica's durable LSN (its backlog). Over
//! a window the engine derives the ingest rate and the rate the replica
//! drains at, and projects when the backlog reaches zero. A projection
//! that is infinite (drain ≤ ingest) or longer than the policy allows is
//! `not_converging`, in the recovery log and in status, and the engine
//! escalates one step per window while it lasts:
//! 1. `boost`: the replica's catch-up takes from the node's recovery
//!    budget first (its sends no longer wait for the rate);
//! 2. `backpressure` (opt-in): the volume's writes are held to a share of
//!    the rate the replica drains at, each write delayed by at most the
//!    shell's bound.
//!
//! The steps hold until the replica is caught up (`converged`), or until
//! it stops being watched (it disconnects, needs a rebuild, or is
//! removed); either undoes them. With no step left the replica stays
//! `not_converging` in status: it is never caught up silently forever.
//! Rebuilds are not watched: their progress is the image's, and their
//! tail is a catch-up of its own once the image is in.

use crate::engine::Engine;
use crate::events::Command;
use crate::ids::{ReplicaId, Tick};
use crate::sender::ReplicaState;
use serde::Serialize;
use std::collections::VecDeque;

/// When a replica counts as not converging and what the engine does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct ConvergencePolicy {
    /// Rates are measured over this many ticks; nothing is judged before
    /// a whole window is seen, and each step is given a window to work.
    pub window_ticks: u64,
    /// A finite projection longer than this is not converging too; `None`
    /// judges only infinite ones (drain at or below ingest).
    pub converge_within_ticks: Option<u64>,
    /// A backlog at or below this many bytes is caught up.
    pub caught_up_bytes: u64,
    /// Step 1: a catch-up that is not converging takes from the recovery
    /// budget first.
    pub boost: bool,
    /// Step 2, opt-in: the volume's writes are held to this percentage
    /// (1–100) of the rate the replica drains at.
    pub backpressure_percent: Option<u8>,
    /// Engine ticks per second: rates are reported per second.
    pub ticks_per_second: u64,
}

impl Default for ConvergencePolicy {
    /// 100-tick windows, only infinite projections judged, 1 MiB caught
    /// up, boost on, no backpressure, 100 ticks a second.
    fn default() -> Self {
        Self {
            window_ticks: 100,
            converge_within_ticks: None,
            caught_up_bytes: 1 << 20,
            boost: true,
            backpressure_percent: None,
            ticks_per_second: 100,
        }
    }
}

/// The step a watched replica is at.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ConvergenceStep {
    /// Watched, nothing done.
    Watching,
    /// Its catch-up takes from the recovery budget first.
    Boost,
    /// The volume's writes are held back for it.
    Backpressure,
}

/// One report from the shell, as the engine keeps it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct LagSample {
    /// When.
    pub at: Tick,
    /// Bytes the volume had ingested in total.
    pub ingested: u64,
    /// WAL bytes after the replica's durable LSN.
    pub backlog: u64,
}

/// What a window of samples says.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Judgement {
    /// Bytes the volume ingests per second.
    pub ingest_rate: u64,
    /// Bytes per second the replica's backlog drains at (what reaches
    /// it, new writes included).
    pub drain_rate: u64,
    /// Its backlog now.
    pub backlog: u64,
    /// Ticks until the backlog is gone at these rates; `None` is never.
    pub eta_ticks: Option<u64>,
    /// Whether that is soon enough.
    pub converging: bool,
}

/// Judges the window from `first` to `last` (at least a window apart;
/// `None` before that). Pure, and the whole rule.
pub fn judge(policy: &ConvergencePolicy, first: LagSample, last: LagSample) -> Option<Judgement> {
    let span = last.at.since(first.at);
    if span < policy.window_ticks.max(1) {
        return None;
    }
    let ingested = last.ingested.saturating_sub(first.ingested);
    // What reached the replica: what it had to take (its backlog then and
    // everything ingested since) less what it still has to.
    let drained = first
        .backlog
        .saturating_add(ingested)
        .saturating_sub(last.backlog);
    let per_second = |bytes: u64| {
        let rate =
            u128::from(bytes) * u128::from(policy.ticks_per_second.max(1)) / u128::from(span);
        u64::try_from(rate).unwrap_or(u64::MAX)
    };
    let eta_ticks = (drained > ingested).then(|| {
        let gain = u128::from(drained - ingested);
        let ticks = (u128::from(last.backlog) * u128::from(span)).div_ceil(gain);
        u64::try_from(ticks).unwrap_or(u64::MAX)
    });
    let converging = match (eta_ticks, policy.converge_within_ticks) {
        (None, _) => false,
        (Some(eta), Some(within)) => eta <= within,
        (Some(_), None) => true,
    };
    Some(Judgement {
        ingest_rate: per_second(ingested),
        drain_rate: per_second(drained),
        backlog: last.backlog,
        eta_ticks,
        converging,
    })
}

/// The next step after `step` under `policy`, if there is one. Boost is
/// skipped for a replica in sync: live shipping takes nothing from the
/// recovery budget, so there is nothing to take first.
pub fn next_step(
    policy: &ConvergencePolicy,
    step: ConvergenceStep,
    catching_up: bool,
) -> Option<ConvergenceStep> {
    let boost = policy.boost && catching_up && step < ConvergenceStep::Boost;
    let backpressure =
        policy.backpressure_percent.is_some() && step < ConvergenceStep::Backpressure;
    if boost {
        Some(ConvergenceStep::Boost)
    } else if backpressure {
        Some(ConvergenceStep::Backpressure)
    } else {
        None
    }
}

/// One watched replica.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Watch {
    samples: VecDeque<LagSample>,
    step: ConvergenceStep,
    /// When the last step was taken (the next waits a window).
    stepped_at: Tick,
    /// Whether `not_converging` was said and not yet taken back.
    flagged: bool,
    /// Whether it was ever said while watched (`converged` then says so).
    said: bool,
    /// A verdict other than the one said, and since when it holds: it is
    /// said once it has held half a window (no flapping at the edge).
    pending: Option<(bool, Tick)>,
    /// Whether the shell was told to boost its catch-up.
    boosted: bool,
    judgement: Option<Judgement>,
}

impl Watch {
    fn new(at: Tick) -> Self {
        Self {
            samples: VecDeque::new(),
            step: ConvergenceStep::Watching,
            stepped_at: at,
            flagged: false,
            said: false,
            pending: None,
            boosted: false,
            judgement: None,
        }
    }

    /// Adds `sample`, keeping one sample at least a window old (the start
    /// of the span judged) and nothing older.
    fn push(&mut self, sample: LagSample, window: u64) {
        let window = window.max(1);
        self.samples.push_back(sample);
        while self
            .samples
            .get(1)
            .is_some_and(|second| sample.at.since(second.at) >= window)
        {
            self.samples.pop_front();
        }
    }

    fn judge(&self, policy: &ConvergencePolicy) -> Option<Judgement> {
        judge(policy, *self.samples.front()?, *self.samples.back()?)
    }
}

/// A watched replica as status shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[non_exhaustive]
pub struct ConvergenceStatus {
    /// Its backlog at the last report, bytes.
    pub backlog_bytes: u64,
    /// The volume's ingest over the last window, bytes per second.
    pub ingest_rate: Option<u64>,
    /// What reached the replica over the last window, bytes per second.
    pub drain_rate: Option<u64>,
    /// Seconds until its backlog is gone at these rates, when it ever is.
    pub eta_seconds: Option<u64>,
    /// `None` until a whole window is seen.
    pub converging: Option<bool>,
    /// The step it is at.
    pub step: ConvergenceStep,
}

/// `bytes` per second for the log: `40.0 MiB/s`.
fn rate(bytes: u64) -> String {
    format!("{:.1} MiB/s", bytes as f64 / f64::from(1u32 << 20))
}

impl Engine {
    /// The shell's report at each heartbeat: the bytes the volume has
    /// ingested in total and each replica's backlog (WAL bytes after its
    /// durable LSN). Replicas catching up or in sync with a backlog past
    /// `caught_up_bytes` are watched; see the module docs.
    pub fn handle_lag(&mut self, ingested: u64, backlogs: &[(ReplicaId, u64)]) {
        let now = self.now;
        let policy = self.config.convergence;
        let gone: Vec<ReplicaId> = self
            .convergence
            .keys()
            .filter(|r| {
                !self.senders.get(*r).is_some_and(|s| {
                    matches!(s.state(), ReplicaState::CatchingUp | ReplicaState::InSync)
                })
            })
            .cloned()
            .collect();
        for replica in gone {
            self.unwatch(&replica, None);
        }
        for (replica, backlog) in backlogs {
            let Some(state) = self.senders.get(replica).map(|s| s.state()) else {
                continue;
            };
            if !matches!(state, ReplicaState::CatchingUp | ReplicaState::InSync) {
                continue;
            }
            // Watched past `caught_up_bytes`, let go at half of it: a
            // backlog at the edge neither comes nor goes each heartbeat.
            let caught_up = policy.caught_up_bytes;
            if *backlog <= caught_up / 2 {
                self.unwatch(replica, Some(*backlog));
                continue;
            }
            if *backlog <= caught_up && !self.convergence.contains_key(replica) {
                continue;
            }
            let watch = self
                .convergence
                .entry(replica.clone())
                .or_insert_with(|| Watch::new(now));
            let sample = LagSample {
                at: now,
                ingested,
                backlog: *backlog,
            };
            watch.push(sample, policy.window_ticks);
            watch.judgement = watch.judge(&policy);
            let Some(mut judgement) = watch.judgement else {
                continue;
            };
            // Within what live shipping keeps in flight, nothing is wrong.
            judgement.converging |= *backlog <= caught_up;
            self.judged(replica, state == ReplicaState::CatchingUp, judgement);
        }
        self.set_backpressure();
    }

    /// Acts on a judgement: says when the verdict changes, and takes the
    /// next step when the last one had a window to work.
    fn judged(&mut self, replica: &ReplicaId, catching_up: bool, judgement: Judgement) {
        let now = self.now;
        let policy = self.config.convergence;
        let Some(watch) = self.convergence.get_mut(replica) else {
            return;
        };
        let what = if catching_up { "catch-up" } else { "live" };
        let drain = rate(judgement.drain_rate);
        let ingest = rate(judgement.ingest_rate);
        let backlog = judgement.backlog;
        // A verdict is acted on once it has held half a window.
        if judgement.converging == watch.flagged {
            let since = match watch.pending {
                Some((verdict, since)) if verdict == judgement.converging => since,
                _ => {
                    watch.pending = Some((judgement.converging, now));
                    now
                }
            };
            if now.since(since) < policy.window_ticks / 2 {
                return;
            }
        } else {
            watch.pending = None;
        }
        if judgement.converging {
            if watch.flagged {
                watch.flagged = false;
                watch.pending = None;
                let eta = judgement.eta_ticks.unwrap_or(0) / policy.ticks_per_second.max(1);
                let detail = format!(
                    "{what} {drain} > ingest {ingest}, backlog {backlog} bytes gone in {eta} s"
                );
                self.record(Some(replica), None, "converging", detail);
            }
            return;
        }
        let why = match (judgement.eta_ticks, policy.converge_within_ticks) {
            (Some(eta), Some(within)) => {
                let tps = policy.ticks_per_second.max(1);
                format!(
                    "{what} {drain} > ingest {ingest}, but backlog {backlog} bytes takes {} s, budget {} s",
                    eta / tps,
                    within / tps
                )
            }
            _ => format!("{what} {drain} <= ingest {ingest}, backlog {backlog} bytes"),
        };
        if !watch.flagged {
            watch.flagged = true;
            watch.said = true;
            watch.pending = None;
            self.record(Some(replica), None, "not_converging", why.clone());
        }
        let Some(watch) = self.convergence.get_mut(replica) else {
            return;
        };
        if now.since(watch.stepped_at) < policy.window_ticks {
            return;
        }
        let Some(step) = next_step(&policy, watch.step, catching_up) else {
            return;
        };
        watch.step = step;
        watch.stepped_at = now;
        let detail = match step {
            ConvergenceStep::Boost => {
                format!("boost: its catch-up takes from the recovery budget first ({why})")
            }
            ConvergenceStep::Backpressure | ConvergenceStep::Watching => format!(
                "backpressure: the volume's writes held to {}% of {drain} ({why})",
                policy.backpressure_percent.unwrap_or(100)
            ),
        };
        if step == ConvergenceStep::Boost {
            watch.boosted = true;
            self.commands.push(Command::BoostRecovery {
                replica: replica.clone(),
                boost: true,
            });
        }
        self.record(Some(replica), None, "convergence_escalated", detail);
    }

    /// Stops watching `replica`, undoing its steps; `caught_up` is its
    /// backlog when that is why.
    fn unwatch(&mut self, replica: &ReplicaId, caught_up: Option<u64>) {
        let Some(watch) = self.convergence.remove(replica) else {
            return;
        };
        let escalated = watch.step > ConvergenceStep::Watching;
        if let (Some(backlog), true) = (caught_up, watch.said || escalated) {
            let detail = format!(
                "backlog {backlog} bytes; {}",
                if escalated {
                    "steps undone"
                } else {
                    "no step taken"
                }
            );
            self.record(Some(replica), None, "converged", detail);
        }
        if watch.boosted {
            self.commands.push(Command::BoostRecovery {
                replica: replica.clone(),
                boost: false,
            });
        }
    }

    /// Holds the volume's writes to the lowest share any replica at the
    /// backpressure step asks for, or lets them go; tells the shell when
    /// that changes by a tenth or more.
    fn set_backpressure(&mut self) {
        let percent = u64::from(self.config.convergence.backpressure_percent.unwrap_or(100));
        let wanted = self
            .convergence
            .values()
            .filter(|w| w.step == ConvergenceStep::Backpressure)
            .filter_map(|w| w.judgement)
            .map(|j| j.drain_rate.saturating_mul(percent) / 100)
            .min();
        let changed = match (self.write_limit, wanted) {
            (None, None) => false,
            (Some(old), Some(new)) => old.abs_diff(new).saturating_mul(10) >= old.max(1),
            _ => true,
        };
        if changed {
            self.write_limit = wanted;
            self.commands.push(Command::LimitWrites {
                bytes_per_second: wanted,
            });
        }
    }

    /// A watched replica's convergence, for status.
    pub(crate) fn convergence_status(&self, replica: &ReplicaId) -> Option<ConvergenceStatus> {
        let watch = self.convergence.get(replica)?;
        let tps = self.config.convergence.ticks_per_second.max(1);
        let judgement = watch.judgement;
        Some(ConvergenceStatus {
            backlog_bytes: watch.samples.back().map_or(0, |s| s.backlog),
            ingest_rate: judgement.map(|j| j.ingest_rate),
            drain_rate: judgement.map(|j| j.drain_rate),
            eta_seconds: judgement.and_then(|j| j.eta_ticks).map(|t| t.div_ceil(tps)),
            converging: judgement.map(|j| j.converging),
            step: watch.step,
        })
    }

    /// The rate the volume's writes are held to, if they are.
    pub fn write_limit(&self) -> Option<u64> {
        self.write_limit
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = 1 << 20;

    fn policy() -> ConvergencePolicy {
        ConvergencePolicy {
            window_ticks: 100,
            converge_within_ticks: Some(1000),
            caught_up_bytes: MIB,
            boost: true,
            backpressure_percent: Some(50),
            ticks_per_second: 100,
        }
    }

    fn sample(at: u64, ingested: u64, backlog: u64) -> LagSample {
        LagSample {
            at: Tick(at),
            ingested,
            backlog,
        }
    }

    #[test]
    fn judgements_by_table() {
        // (first, last, ingest/s, drain/s, eta ticks, converging)
        let table = [
            // Ingest 10 MiB/s, drain 20 MiB/s, 100 MiB left: 10 s = 1000 ticks.
            (
                sample(0, 0, 110 * MIB),
                sample(100, 10 * MIB, 100 * MIB),
                10 * MIB,
                20 * MIB,
                Some(1000),
                true,
            ),
            // The same at 101 MiB left: past the budget.
            (
                sample(0, 0, 111 * MIB),
                sample(100, 10 * MIB, 101 * MIB),
                10 * MIB,
                20 * MIB,
                Some(1010),
                false,
            ),
            // Drain equals ingest: never.
            (
                sample(0, 0, 50 * MIB),
                sample(100, 10 * MIB, 50 * MIB),
                10 * MIB,
                10 * MIB,
                None,
                false,
            ),
            // Falling behind: never.
            (
                sample(0, 0, 50 * MIB),
                sample(100, 55 * MIB, 60 * MIB),
                55 * MIB,
                45 * MIB,
                None,
                false,
            ),
            // Idle volume, draining: converging.
            (
                sample(0, 7, 20 * MIB),
                sample(200, 7, 10 * MIB),
                0,
                5 * MIB,
                Some(200),
                true,
            ),
            // Nothing drained, nothing ingested: never.
            (
                sample(0, 0, 20 * MIB),
                sample(100, 0, 20 * MIB),
                0,
                0,
                None,
                false,
            ),
        ];
        for (i, (first, last, ingest, drain, eta, converging)) in table.into_iter().enumerate() {
            let j = judge(&policy(), first, last).expect("a whole window");
            assert_eq!(
                (j.ingest_rate, j.drain_rate, j.eta_ticks, j.converging),
                (ingest, drain, eta, converging),
                "row {i}"
            );
        }
    }

    #[test]
    fn nothing_is_judged_before_a_whole_window() {
        assert_eq!(
            judge(&policy(), sample(0, 0, 9 * MIB), sample(99, 0, 9 * MIB)),
            None
        );
    }

    #[test]
    fn a_finite_projection_converges_when_no_budget_is_set() {
        let policy = ConvergencePolicy {
            converge_within_ticks: None,
            ..policy()
        };
        let j = judge(
            &policy,
            sample(0, 0, 10_000 * MIB),
            sample(100, 0, 9_999 * MIB),
        )
        .unwrap();
        assert!(j.converging);
        assert_eq!(j.eta_ticks, Some(999_900));
    }

    #[test]
    fn steps_by_table() {
        use ConvergenceStep::*;
        let only_boost = ConvergencePolicy {
            backpressure_percent: None,
            ..policy()
        };
        let nothing = ConvergencePolicy {
            boost: false,
            ..only_boost
        };
        // (policy, step, catching up, next)
        let table = [
            (policy(), Watching, true, Some(Boost)),
            (policy(), Boost, true, Some(Backpressure)),
            (policy(), Backpressure, true, None),
            // In sync: live shipping takes nothing from the budget.
            (policy(), Watching, false, Some(Backpressure)),
            (only_boost, Watching, true, Some(Boost)),
            (only_boost, Boost, true, None),
            (only_boost, Watching, false, None),
            (nothing, Watching, true, None),
        ];
        for (i, (policy, step, catching_up, next)) in table.into_iter().enumerate() {
            assert_eq!(next_step(&policy, step, catching_up), next, "row {i}");
        }
    }

    #[test]
    fn the_window_keeps_one_sample_at_least_a_window_old() {
        let mut watch = Watch::new(Tick(0));
        for t in (0..=300).step_by(20) {
            watch.push(sample(t, t, 10 * MIB), 100);
        }
        let first = watch.samples.front().unwrap().at;
        assert_eq!(first, Tick(200), "{:?}", watch.samples);
        assert!(watch.samples.len() <= 7);
    }
}
