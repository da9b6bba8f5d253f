//! The controller's rules: from a [`ClusterView`] and the time, the
//! actions to take, each a transaction with the guards it must hold
//! under. Nothing here reads or writes etcd.

use super::judge::{asked, judge, probe_of};
use super::records::{Decision, Outcome, Probe, ProgressRecord, VolumeRecord};
use super::view::{ClusterView, Versioned};
use crate::assignment::Assignment;
use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};
use walship_engine::CommitMode;

/// What must still hold when an action's transaction runs: each is one
/// compare in it, and the transaction writes nothing unless all hold.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Guard {
    /// The volume's record is as read (unchanged since `revision`).
    RecordAt {
        /// The volume.
        volume: String,
        /// The record's revision when read.
        revision: i64,
    },
    /// The volume's decision is as read.
    DecisionAt {
        /// The volume.
        volume: String,
        /// The decision's revision when read.
        revision: i64,
    },
    /// The node is registered (its lease alive).
    Registered(String),
    /// The node is not registered (its lease ended, or it never started).
    Unregistered(String),
    /// The node deciding is still the elected controller: a stale
    /// controller's transaction fails.
    Controller,
}

/// One value an action writes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Write {
    /// A volume's record (its assignment).
    Record(String, VolumeRecord),
    /// The decision about a volume.
    Decision(String, Decision),
    /// A volume's primary's report.
    Progress(String, ProgressRecord),
    /// The probe of a volume's replicas.
    Probe(String, Probe),
}

/// A promotion: the next record, the decision that made it and the new
/// primary's first report, written together.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Promotion {
    /// The volume.
    pub volume: String,
    /// Its record in the next epoch, the promoted node its primary.
    pub record: VolumeRecord,
    /// Why.
    pub decision: Decision,
    /// The new primary's report until it writes its own: the committed
    /// LSN it holds (all that was judged; on the desperate path, what it
    /// has), its replicas' states unknown.
    pub baseline: ProgressRecord,
    /// What the transaction holds under.
    pub guards: Vec<Guard>,
    /// Whether the lost primary's address is known: without it, it is
    /// left out of the next record.
    pub lost_primary_kept: bool,
}

/// What the controller does about one volume.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Ask a lost primary's replicas for fresh reports (`probes/<volume>`):
    /// its revision, after the lost primary's lease ended, is after its
    /// last acknowledgement, so a report answering it holds every write
    /// the replica acknowledged to that primary.
    Probe {
        /// The volume.
        volume: String,
        /// The question.
        probe: Probe,
    },
    /// Live replicas have yet to answer the probe: judge again soon
    /// (answers take milliseconds; one that does not answer for a lease
    /// time is left out).
    Await {
        /// The volume.
        volume: String,
        /// Who has not answered.
        unanswered: Vec<String>,
    },
    /// Promote the best eligible replica.
    Promote(Promotion),
    /// Record that the volume stays down, and why (written once per
    /// distinct decision, and only about the record as read: a promotion
    /// meanwhile, an operator's, keeps its decision).
    RecordDown {
        /// The volume.
        volume: String,
        /// Why nobody was promoted.
        decision: Decision,
        /// What the transaction holds under.
        guards: Vec<Guard>,
    },
    /// Mark a "down" decision over: its lost primary serves again and
    /// leads the volume as before.
    EndDown {
        /// The volume.
        volume: String,
        /// The decision, marked over.
        decision: Decision,
        /// What the transaction holds under.
        guards: Vec<Guard>,
    },
    /// Add a lost primary, registered again, back to the replicas in the
    /// next epoch: the primary connects to it and brings it in sync (its
    /// unreplicated tail truncated at the divergence point).
    Readmit {
        /// The volume.
        volume: String,
        /// The node added back.
        node: String,
        /// The next record.
        record: VolumeRecord,
        /// What the transaction holds under.
        guards: Vec<Guard>,
    },
}

impl Action {
    /// The volume it is about.
    pub fn volume(&self) -> &str {
        match self {
            Self::Probe { volume, .. }
            | Self::Await { volume, .. }
            | Self::RecordDown { volume, .. }
            | Self::EndDown { volume, .. }
            | Self::Readmit { volume, .. } => volume,
            Self::Promote(p) => &p.volume,
        }
    }

    /// Its transaction: what must hold, and what it writes then. `None`:
    /// nothing to write (waiting).
    pub fn transaction(&self) -> Option<(Vec<Guard>, Vec<Write>)> {
        Some(match self {
            Self::Await { .. } => return None,
            Self::Probe { volume, probe } => (
                vec![Guard::Controller],
                vec![Write::Probe(volume.clone(), probe.clone())],
            ),
            Self::Promote(p) => (
                p.guards.clone(),
                vec![
                    Write::Record(p.volume.clone(), p.record.clone()),
                    Write::Decision(p.volume.clone(), p.decision.clone()),
                    Write::Progress(p.volume.clone(), p.baseline.clone()),
                ],
            ),
            Self::RecordDown {
                volume,
                decision,
                guards,
            }
            | Self::EndDown {
                volume,
                decision,
                guards,
            } => (
                guards.clone(),
                vec![Write::Decision(volume.clone(), decision.clone())],
            ),
            Self::Readmit {
                volume,
                record,
                guards,
                ..
            } => (
                guards.clone(),
                vec![Write::Record(volume.clone(), record.clone())],
            ),
        })
    }

    /// Whether the controller should look again soon (answers awaited),
    /// rather than at its usual pace.
    pub fn soon(&self) -> bool {
        matches!(self, Self::Probe { .. } | Self::Await { .. })
    }
}

/// Why a judged promotion cannot be written.
pub const ADDRESS_UNKNOWN: &str = "the lost primary's address is unknown and sync_quorum needs \
                                   three members: it cannot be left out";

/// `decision`'s promotion of `next_primary` as a transaction: the record
/// in the next epoch, held only while `record` is as read, its primary
/// still unregistered, and every one of `guards`. Under sync_all the lost
/// primary waits outside the replicas until it is back (a replica away
/// stops every commit); under the other modes it is a replica at once
/// (commits go on without it, and sync_quorum needs three members).
/// `Err`: why it cannot be written.
pub fn promotion(
    view: &ClusterView,
    volume: &str,
    record: &Versioned<VolumeRecord>,
    decision: Decision,
    guards: impl IntoIterator<Item = Guard>,
) -> Result<Promotion, &'static str> {
    let current = &record.value;
    let next_primary = decision.promoted().unwrap_or_default().to_owned();
    let mut replicas = current.assignment.replicas.clone();
    replicas.remove(&next_primary);
    let mut departed = current.departed.clone();
    let lost_at = view
        .addresses
        .get(&current.assignment.primary)
        .map(|a| a.value.clone());
    let lost_primary_kept = lost_at.is_some();
    match lost_at {
        Some(addr) if current.assignment.commit_mode == CommitMode::SyncAll => {
            departed.insert(current.assignment.primary.clone(), addr);
        }
        Some(addr) => {
            replicas.insert(current.assignment.primary.clone(), addr);
        }
        None if current.assignment.commit_mode == CommitMode::SyncQuorum && replicas.len() < 2 => {
            return Err(ADDRESS_UNKNOWN);
        }
        None => {}
    }
    let next = VolumeRecord {
        assignment: Assignment {
            epoch: current.assignment.epoch + 1,
            primary: next_primary,
            replicas,
            ..current.assignment.clone()
        },
        departed,
        ..current.clone()
    };
    let baseline = ProgressRecord {
        epoch: next.assignment.epoch,
        primary: next.assignment.primary.clone(),
        committed: decision
            .data_loss()
            .map_or(decision.committed, |loss| loss.after),
        replicas: BTreeMap::new(),
    };
    let mut held = vec![
        Guard::RecordAt {
            volume: volume.to_owned(),
            revision: record.revision,
        },
        Guard::Unregistered(current.assignment.primary.clone()),
    ];
    held.extend(guards);
    Ok(Promotion {
        volume: volume.to_owned(),
        record: next,
        decision,
        baseline,
        guards: held,
        lost_primary_kept,
    })
}

/// The elected controller's memory between passes: which nodes it knows
/// registered once, and since when each is absent.
#[derive(Debug, Clone)]
pub struct Controller {
    me: String,
    seen: BTreeSet<String>,
    absent_since: BTreeMap<String, Instant>,
    /// How long a node that never registered may be absent before its
    /// volumes' primaries count as lost (a cluster coming up).
    grace: Duration,
    /// How long a lost primary's replicas have to settle (disconnect and
    /// report) before a "down" decision for want of it is written.
    settle: Duration,
}

impl Controller {
    /// The controller on node `me`, in a cluster whose leases live `ttl`.
    pub fn new(me: &str, ttl: Duration) -> Self {
        Self {
            me: me.to_owned(),
            seen: BTreeSet::new(),
            absent_since: BTreeMap::new(),
            grace: ttl * 2,
            settle: ttl,
        }
    }

    /// One pass over `view` at `now`: what to do about each volume.
    pub fn decide(&mut self, view: &ClusterView, now: Instant) -> Vec<Action> {
        self.seen.extend(view.nodes.keys().cloned());
        self.seen.extend(view.addresses.keys().cloned());
        self.absent_since
            .retain(|node, _| !view.nodes.contains_key(node));
        let mut actions = Vec::new();
        for (volume, record) in &view.volumes {
            let current = &record.value;
            if let Some((back, _)) = current.departed.iter().find(|(node, _)| view.ready(node)) {
                actions.push(readmit(volume, record, back));
                continue;
            }
            let Some(lost_for) = self.lost(&current.assignment.primary, view, now) else {
                // The primary serves again (registered, and marked ready
                // once its volumes are open), in the epoch it was lost in
                // or a later one of its own (a readmission since).
                let down = view.decisions.get(volume).filter(|d| {
                    d.value.keeps_down()
                        && view.ready(&current.assignment.primary)
                        && d.value.lost_primary == current.assignment.primary
                        && d.value.epoch <= current.assignment.epoch
                });
                if let Some(down) = down {
                    actions.push(end_down(volume, down));
                }
                continue;
            };
            let settled = lost_for >= self.settle;
            actions.extend(self.failover(view, volume, record, settled));
        }
        actions
    }

    /// How long `node` has been lost, if it is. A node that registered
    /// once (its address is kept) and whose entry is gone (its lease
    /// expired, or it stopped) is lost at once, whether or not this
    /// controller saw it: a controller elected because the last one died
    /// with the primary must not wait. One that never registered may
    /// still be starting: lost only once absent for the grace.
    fn lost(&mut self, node: &str, view: &ClusterView, now: Instant) -> Option<Duration> {
        if view.registered(node) {
            return None;
        }
        let since = *self.absent_since.entry(node.to_owned()).or_insert(now);
        let absent = now.saturating_duration_since(since);
        if self.seen.contains(node) {
            return Some(absent);
        }
        absent.checked_sub(self.grace)
    }

    /// What to do about `volume`, whose primary is lost: probe, wait for
    /// answers, promote the best eligible replica, or record it down (a
    /// "down" decision only once `settled`, if a replica may yet answer).
    fn failover(
        &self,
        view: &ClusterView,
        volume: &str,
        record: &Versioned<VolumeRecord>,
        settled: bool,
    ) -> Option<Action> {
        let current = &record.value;
        let Some(asked) = asked(view, volume, current) else {
            return Some(Action::Probe {
                volume: volume.to_owned(),
                probe: probe_of(view, current),
            });
        };
        let judgement = judge(view, volume, current, asked, &self.me);
        // Every live replica answers within milliseconds: judged with all
        // their answers, the best is chosen, and a "down" decision is not
        // a passing one.
        if !settled && !judgement.unsettled.is_empty() {
            return Some(Action::Await {
                volume: volume.to_owned(),
                unanswered: judgement.unsettled.into_keys().collect(),
            });
        }
        let decision = judgement.decision;
        if decision.promoted().is_none() {
            return down(view, volume, record, decision);
        }
        match promotion(view, volume, record, decision.clone(), [Guard::Controller]) {
            Ok(promotion) => Some(Action::Promote(promotion)),
            Err(why) => {
                let blocked = Outcome::Down {
                    blocked: Some(why.to_owned()),
                    over: None,
                };
                let decision = Decision {
                    outcome: blocked,
                    ..decision
                };
                down(view, volume, record, decision)
            }
        }
    }
}

/// Records `volume` down by `decision`, unless that decision is already
/// the one recorded.
fn down(
    view: &ClusterView,
    volume: &str,
    record: &Versioned<VolumeRecord>,
    decision: Decision,
) -> Option<Action> {
    if view
        .decisions
        .get(volume)
        .is_some_and(|known| known.value == decision)
    {
        return None;
    }
    Some(Action::RecordDown {
        volume: volume.to_owned(),
        decision,
        guards: vec![
            Guard::Controller,
            Guard::RecordAt {
                volume: volume.to_owned(),
                revision: record.revision,
            },
        ],
    })
}

/// Marks `down` over: its lost primary serves again. Only if the decision
/// is as read and the primary still registered.
fn end_down(volume: &str, down: &Versioned<Decision>) -> Action {
    let lost = down.value.lost_primary.clone();
    let blocked = down.value.blocked().map(str::to_owned);
    Action::EndDown {
        volume: volume.to_owned(),
        decision: Decision {
            outcome: Outcome::Down {
                blocked,
                over: Some(format!("{lost} serves again")),
            },
            ..down.value.clone()
        },
        guards: vec![
            Guard::Controller,
            Guard::DecisionAt {
                volume: volume.to_owned(),
                revision: down.revision,
            },
            Guard::Registered(lost),
        ],
    }
}

/// Adds `back` to `record`'s replicas in the next epoch, only if the
/// record is as read.
fn readmit(volume: &str, record: &Versioned<VolumeRecord>, back: &str) -> Action {
    let mut next = record.value.clone();
    if let Some(addr) = next.departed.remove(back) {
        next.assignment.replicas.insert(back.to_owned(), addr);
    }
    next.assignment.epoch += 1;
    Action::Readmit {
        volume: volume.to_owned(),
        node: back.to_owned(),
        record: next,
        guards: vec![
            Guard::Controller,
            Guard::RecordAt {
                volume: volume.to_owned(),
                revision: record.revision,
            },
        ],
    }
}
