//! The controller's rules as tables: a cluster as etcd would hold it, the
//! time, and what [`Controller::decide`] does. No etcd.

use super::judge::quorum_judgement;
use super::*;
use crate::assignment::Assignment;
use std::collections::BTreeMap;
use std::time::{Duration, Instant};
use walship_engine::{
    CommitMode, DataLossAccepted, Epoch, Lsn, PromotionCandidate, ReplicaId, ReplicaState, Tick,
};

const TTL: Duration = Duration::from_secs(2);
/// The volume record's revision.
const RECORD_REV: i64 = 100;
/// The probe's revision, once written.
const PROBE_REV: i64 = 200;
/// The primary's address's revision (its last start).
const STARTED_REV: i64 = 50;

/// A replica as the lost primary last reported it and as it answered.
#[derive(Clone, Copy)]
struct Replica {
    name: &'static str,
    /// Registered (its lease alive).
    live: bool,
    /// State in the primary's last report.
    state: &'static str,
    /// Its own report: epoch, durable LSN, the probe revision it answered
    /// (`None`: no report).
    own: Option<(u64, u64, i64)>,
}

/// The state of that name (`in_sync`...).
fn named(state: &str) -> ReplicaState {
    ReplicaState::ALL
        .into_iter()
        .find(|s| s.as_str() == state)
        .unwrap_or_else(|| panic!("no state {state}"))
}

fn replica(name: &'static str, state: &'static str, durable: u64) -> Replica {
    Replica {
        name,
        live: true,
        state,
        own: Some((3, durable, PROBE_REV)),
    }
}

/// vol0, epoch 3, primary `p` (lost unless `primary_live`), committed 40,
/// `replicas`; the probe about this loss written at [`PROBE_REV`].
fn cluster(mode: CommitMode, replicas: &[Replica]) -> ClusterView {
    let mut view = ClusterView::default();
    let record = VolumeRecord {
        assignment: Assignment {
            epoch: 3,
            primary: "p".into(),
            commit_mode: mode,
            replicas: replicas
                .iter()
                .map(|r| (r.name.to_owned(), format!("{}:1", r.name)))
                .collect(),
        },
        size: 1 << 20,
        departed: BTreeMap::new(),
    };
    view.volumes
        .insert("vol0".into(), Versioned::new(record, RECORD_REV));
    view.addresses
        .insert("p".into(), Versioned::new("p:1".into(), STARTED_REV));
    let mut progress = ProgressRecord {
        epoch: 3,
        primary: "p".into(),
        committed: 40,
        replicas: BTreeMap::new(),
    };
    for r in replicas {
        view.addresses
            .insert(r.name.into(), Versioned::new(format!("{}:1", r.name), 1));
        if r.live {
            view.nodes.insert(r.name.into(), entry(true));
        }
        progress.replicas.insert(
            r.name.into(),
            ReplicaProgress {
                flushed: 0,
                state: named(r.state),
            },
        );
        if let Some((epoch, durable, answered)) = r.own {
            let report = ReplicaReport {
                epoch,
                term: epoch << 20,
                durable,
                connected: false,
                answered,
            };
            let reports = view.reports.entry("vol0".into()).or_default();
            reports.insert(r.name.into(), report);
        }
    }
    view.progress.insert("vol0".into(), progress);
    let probe = Probe {
        epoch: 3,
        lost_primary: "p".into(),
        registered: STARTED_REV,
    };
    view.probes
        .insert("vol0".into(), Versioned::new(probe, PROBE_REV));
    view
}

fn entry(ready: bool) -> NodeRecord {
    NodeRecord {
        replication: "x:1".into(),
        admin: None,
        nbd: None,
        ready,
    }
}

/// The controller on `c`, having seen `view` first at `start`.
fn controller() -> Controller {
    Controller::new("c", TTL)
}

fn record_at() -> Guard {
    Guard::RecordAt {
        volume: "vol0".into(),
        revision: RECORD_REV,
    }
}

/// The single action decided about `view` at `now`, by a controller that
/// first saw the primary lost at `start`.
fn decide_once(view: &ClusterView, lost_for: Duration) -> Vec<Action> {
    let mut c = controller();
    let start = Instant::now();
    let _ = c.decide(view, start);
    c.decide(view, start + lost_for)
}

fn promotion_of(actions: &[Action]) -> &Promotion {
    match actions {
        [Action::Promote(p)] => p,
        other => panic!("expected one promotion, got {other:?}"),
    }
}

fn down_of(actions: &[Action]) -> &Decision {
    match actions {
        [Action::RecordDown {
            decision, guards, ..
        }] => {
            assert_eq!(guards, &[Guard::Controller, record_at()]);
            decision
        }
        other => panic!("expected one down decision, got {other:?}"),
    }
}

mod judging;
mod lifecycle;
