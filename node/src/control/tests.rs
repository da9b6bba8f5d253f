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
                state: r.state.into(),
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

#[test]
fn a_live_primary_is_left_alone() {
    let mut view = cluster(CommitMode::SyncAll, &[replica("a", "in_sync", 40)]);
    view.nodes.insert("p".into(), entry(true));
    assert_eq!(decide_once(&view, TTL * 10), vec![]);
}

#[test]
fn a_lost_primary_is_probed_once_per_loss() {
    let mut view = cluster(CommitMode::SyncAll, &[replica("a", "in_sync", 40)]);
    let question = Probe {
        epoch: 3,
        lost_primary: "p".into(),
        registered: STARTED_REV,
    };
    view.probes.clear();
    // Lost at once (it registered once: its address is kept).
    let actions = controller().decide(&view, Instant::now());
    assert_eq!(
        actions,
        vec![Action::Probe {
            volume: "vol0".into(),
            probe: question.clone()
        }]
    );
    assert_eq!(
        actions[0].transaction(),
        Some((
            vec![Guard::Controller],
            vec![Write::Probe("vol0".into(), question.clone())]
        ))
    );
    assert!(actions[0].soon());
    // The primary came back and was lost again in the same epoch: its
    // address was rewritten at its start, the old probe no longer counts.
    view.probes
        .insert("vol0".into(), Versioned::new(question, PROBE_REV));
    view.addresses
        .insert("p".into(), Versioned::new("p:1".into(), STARTED_REV + 500));
    let again = controller().decide(&view, Instant::now());
    assert!(
        matches!(&again[..], [Action::Probe { probe, .. }] if probe.registered == STARTED_REV + 500),
        "{again:?}"
    );
}

#[test]
fn a_live_replica_that_has_not_answered_is_awaited_until_a_lease_has_passed() {
    let mut slow = replica("b", "in_sync", 40);
    slow.own = Some((3, 40, PROBE_REV - 1));
    let view = cluster(CommitMode::SyncAll, &[replica("a", "in_sync", 40), slow]);
    let actions = decide_once(&view, TTL / 2);
    assert_eq!(
        actions,
        vec![Action::Await {
            volume: "vol0".into(),
            unanswered: vec!["b".into()]
        }]
    );
    assert_eq!(actions[0].transaction(), None);
    // After a lease, judged without it: rejected as unanswered.
    let p = promotion_of(&decide_once(&view, TTL)).clone();
    assert_eq!(p.record.assignment.primary, "a");
    assert_eq!(p.decision.rejected["b"], vec![UNANSWERED.to_owned()]);
}

#[test]
fn under_sync_all_the_best_in_sync_replica_is_promoted_and_the_lost_primary_departs() {
    let view = cluster(
        CommitMode::SyncAll,
        &[replica("a", "in_sync", 40), replica("b", "in_sync", 41)],
    );
    let actions = decide_once(&view, Duration::ZERO);
    let p = promotion_of(&actions);
    // The highest durable LSN first.
    assert_eq!(p.decision.promoted(), Some("b"));
    assert_eq!(p.record.assignment.epoch, 4);
    assert_eq!(p.record.assignment.primary, "b");
    assert_eq!(
        p.record.assignment.replicas.keys().collect::<Vec<_>>(),
        vec!["a"],
        "{p:?}"
    );
    assert_eq!(p.record.departed["p"], "p:1");
    assert!(p.lost_primary_kept);
    assert_eq!(
        p.guards,
        vec![
            record_at(),
            Guard::Unregistered("p".into()),
            Guard::Controller
        ]
    );
    assert_eq!(
        (
            p.baseline.epoch,
            p.baseline.primary.as_str(),
            p.baseline.committed
        ),
        (4, "b", 40)
    );
    let (_, writes) = actions[0].transaction().unwrap();
    assert!(matches!(
        &writes[..],
        [Write::Record(..), Write::Decision(..), Write::Progress(..)]
    ));
    assert!(!actions[0].soon());
}

#[test]
fn the_engines_rules_reject_each_ineligible_replica_with_every_reason() {
    // (replica, the reason expected in its rejection)
    let table = [
        (replica("a", "catching_up", 40), "state_ineligible"),
        (replica("a", "in_sync", 39), "behind_committed"),
        (
            Replica {
                own: Some((2, 40, PROBE_REV)),
                ..replica("a", "in_sync", 40)
            },
            "epoch_mismatch",
        ),
        (
            Replica {
                live: false,
                ..replica("a", "in_sync", 40)
            },
            "not_running",
        ),
    ];
    for (candidate, reason) in table {
        let view = cluster(CommitMode::SyncAll, &[candidate]);
        let down = down_of(&decide_once(&view, TTL)).clone();
        assert_eq!(down.promoted(), None, "{reason}");
        assert!(
            down.rejected["a"].iter().any(|r| r.starts_with(reason)),
            "{reason}: {down:?}"
        );
        assert!(down.keeps_down());
    }
}

#[test]
fn a_report_of_another_primary_or_epoch_says_nothing_of_these_replicas() {
    for (epoch, primary) in [(2, "p"), (3, "other")] {
        let mut view = cluster(CommitMode::SyncAll, &[replica("a", "in_sync", 40)]);
        let progress = view.progress.get_mut("vol0").unwrap();
        progress.epoch = epoch;
        progress.primary = primary.into();
        // The state is unknown (disconnected): not eligible.
        let down = down_of(&decide_once(&view, TTL)).clone();
        assert!(
            down.rejected["a"][0].starts_with("state_ineligible"),
            "{down:?}"
        );
        assert_eq!(down.committed, 0);
    }
}

#[test]
fn best_effort_is_never_promoted_automatically() {
    let view = cluster(CommitMode::BestEffort, &[replica("a", "in_sync", 40)]);
    let down = down_of(&decide_once(&view, Duration::ZERO)).clone();
    assert_eq!(down.promoted(), None);
    assert!(
        down.blocked().unwrap().starts_with("best_effort"),
        "{down:?}"
    );
    assert!(down.rejected.is_empty(), "{down:?}");
}

#[test]
fn sync_quorum_promotes_once_every_majority_meets_an_answer_and_keeps_the_lost_primary_a_replica() {
    let dead = Replica {
        live: false,
        ..replica("b", "in_sync", 0)
    };
    let view = cluster(CommitMode::SyncQuorum, &[replica("a", "in_sync", 40), dead]);
    let down = down_of(&decide_once(&view, TTL)).clone();
    assert!(
        down.blocked()
            .unwrap()
            .contains("1 of 2 replicas answered, 2 needed"),
        "{down:?}"
    );
    // Both answered: judged against the highest durable LSN among them.
    let view = cluster(
        CommitMode::SyncQuorum,
        &[replica("a", "in_sync", 40), replica("b", "in_sync", 45)],
    );
    let p = promotion_of(&decide_once(&view, Duration::ZERO)).clone();
    assert_eq!(
        (p.decision.promoted(), p.decision.committed),
        (Some("b"), 45)
    );
    assert!(p.decision.rejected["a"][0].starts_with("behind_committed"));
    // Not departed: a replica at once.
    assert_eq!(p.record.assignment.replicas["p"], "p:1");
    assert!(p.record.departed.is_empty());
}

#[test]
fn a_lost_primary_whose_address_is_unknown_is_left_out_unless_sync_quorum_needs_it() {
    let two = [replica("a", "in_sync", 40), replica("b", "in_sync", 40)];
    let mut view = cluster(CommitMode::SyncQuorum, &two);
    view.addresses.remove("p");
    // (Seen once: a node of the records' past; its address gone.)
    let mut c = controller();
    let start = Instant::now();
    let seen = {
        let mut v = view.clone();
        v.nodes.insert("p".into(), entry(true));
        v
    };
    let _ = c.decide(&seen, start);
    let mut probe = view.probes["vol0"].clone();
    probe.value.registered = 0;
    view.probes.insert("vol0".into(), probe);
    let down = down_of(&c.decide(&view, start)).clone();
    assert_eq!(down.blocked(), Some(ADDRESS_UNKNOWN));
    // Under sync_all it is simply left out.
    view.volumes
        .get_mut("vol0")
        .unwrap()
        .value
        .assignment
        .commit_mode = CommitMode::SyncAll;
    let p = promotion_of(&c.decide(&view, start)).clone();
    assert!(!p.lost_primary_kept);
    assert!(p.record.departed.is_empty() && !p.record.assignment.replicas.contains_key("p"));
}

#[test]
fn a_primary_that_never_registered_is_lost_only_after_two_lease_times() {
    let mut view = cluster(CommitMode::SyncAll, &[replica("a", "in_sync", 40)]);
    view.addresses.remove("p");
    let mut probe = view.probes["vol0"].clone();
    probe.value.registered = 0;
    view.probes.insert("vol0".into(), probe);
    let mut c = controller();
    let start = Instant::now();
    assert_eq!(c.decide(&view, start), vec![]);
    assert_eq!(
        c.decide(&view, start + TTL * 2 - Duration::from_millis(1)),
        vec![]
    );
    let p = promotion_of(&c.decide(&view, start + TTL * 2)).clone();
    assert_eq!(p.record.assignment.primary, "a");
}

#[test]
fn a_down_decision_is_written_once_and_ended_when_its_primary_serves_again() {
    let mut view = cluster(CommitMode::BestEffort, &[replica("a", "in_sync", 40)]);
    let down = down_of(&decide_once(&view, TTL)).clone();
    assert_eq!(down.by, "c");
    view.decisions
        .insert("vol0".into(), Versioned::new(down.clone(), 300));
    // The same decision again: nothing to write.
    assert_eq!(decide_once(&view, TTL), vec![]);
    // Registered, not serving yet: still down.
    view.nodes.insert("p".into(), entry(false));
    assert_eq!(decide_once(&view, TTL), vec![]);
    // Serving: the decision is over, only if it is as read and the
    // primary still registered.
    view.nodes.insert("p".into(), entry(true));
    let actions = decide_once(&view, TTL);
    let [Action::EndDown {
        decision, guards, ..
    }] = &actions[..]
    else {
        panic!("{actions:?}")
    };
    assert_eq!(decision.over(), Some("p serves again"));
    assert_eq!(decision.blocked(), down.blocked());
    assert_eq!(
        guards,
        &vec![
            Guard::Controller,
            Guard::DecisionAt {
                volume: "vol0".into(),
                revision: 300
            },
            Guard::Registered("p".into()),
        ]
    );
    // Over: nothing more.
    view.decisions
        .insert("vol0".into(), Versioned::new(decision.clone(), 301));
    assert_eq!(decide_once(&view, TTL), vec![]);
    // A promotion's decision is never ended.
    let promoted = Decision {
        outcome: Outcome::Promoted {
            promoted: "a".into(),
        },
        ..down
    };
    view.decisions
        .insert("vol0".into(), Versioned::new(promoted, 302));
    assert_eq!(decide_once(&view, TTL), vec![]);
}

#[test]
fn a_departed_primary_is_readmitted_in_the_next_epoch_once_it_serves() {
    let mut view = cluster(CommitMode::SyncAll, &[replica("a", "in_sync", 40)]);
    // a is primary now; p departed.
    {
        let record = &mut view.volumes.get_mut("vol0").unwrap().value;
        record.assignment.primary = "a".into();
        record.assignment.replicas.clear();
        record.departed.insert("p".into(), "p:1".into());
    }
    view.nodes.insert("p".into(), entry(false));
    assert_eq!(decide_once(&view, TTL), vec![], "not serving yet");
    view.nodes.insert("p".into(), entry(true));
    let actions = decide_once(&view, TTL);
    let [Action::Readmit {
        node,
        record,
        guards,
        ..
    }] = &actions[..]
    else {
        panic!("{actions:?}")
    };
    assert_eq!(node, "p");
    assert_eq!(record.assignment.epoch, 4);
    assert_eq!(record.assignment.replicas["p"], "p:1");
    assert!(record.departed.is_empty());
    assert_eq!(guards, &vec![Guard::Controller, record_at()]);
}

#[test]
fn an_operators_promotion_takes_the_most_data_and_says_what_is_lost() {
    for (mode, beyond) in [(CommitMode::SyncAll, false), (CommitMode::BestEffort, true)] {
        let view = cluster(
            mode,
            &[
                replica("a", "catching_up", 30),
                replica("b", "catching_up", 35),
            ],
        );
        let record = &view.volumes["vol0"];
        let decision = accept_loss(
            &view,
            "vol0",
            &record.value,
            PROBE_REV,
            ("operator", DataLossAccepted),
        )
        .unwrap();
        assert_eq!(decision.promoted(), Some("b"));
        let loss = decision.data_loss().unwrap();
        assert_eq!((loss.after, loss.through), (35, 40));
        assert_eq!(loss.beyond.is_some(), beyond);
        // Written with the baseline at what it holds, without the
        // controller's seat.
        let p = promotion(&view, "vol0", record, decision, []).unwrap();
        assert_eq!(p.baseline.committed, 35);
        assert_eq!(p.guards, vec![record_at(), Guard::Unregistered("p".into())]);
    }
    // Nobody running: no candidate.
    let dead = Replica {
        live: false,
        ..replica("a", "in_sync", 40)
    };
    let view = cluster(CommitMode::SyncAll, &[dead]);
    let record = &view.volumes["vol0"].value;
    assert!(accept_loss(&view, "vol0", record, PROBE_REV, ("op", DataLossAccepted)).is_err());
}

fn candidate(server: &str, running: bool, epoch: u64, flushed: u64) -> PromotionCandidate {
    PromotionCandidate {
        replica: ReplicaId::new("v", server).unwrap(),
        running,
        epoch: Epoch(epoch),
        state: ReplicaState::InSync,
        flushed: Lsn(flushed),
        last_heartbeat: Tick(0),
    }
}

fn quorum_record(replicas: &[&str]) -> VolumeRecord {
    VolumeRecord {
        assignment: Assignment {
            epoch: 3,
            primary: "p".into(),
            commit_mode: CommitMode::SyncQuorum,
            replicas: replicas
                .iter()
                .map(|r| ((*r).to_owned(), format!("{r}:1")))
                .collect(),
        },
        size: 1 << 20,
        departed: BTreeMap::new(),
    }
}

#[test]
fn sync_quorum_needs_enough_answers_that_every_majority_meets_one() {
    // Three members: a write is committed on the primary and one
    // replica, so both replicas must answer.
    let two = quorum_record(&["a", "b"]);
    let one_down = [candidate("a", true, 3, 10), candidate("b", false, 3, 0)];
    let (_, blocked) = quorum_judgement(&two, &one_down, &BTreeMap::new(), 5);
    assert!(blocked
        .unwrap()
        .contains("1 of 2 replicas answered, 2 needed"));
    let unsettled = BTreeMap::from([("b".to_owned(), UNANSWERED)]);
    let both_up = [candidate("a", true, 3, 10), candidate("b", true, 3, 12)];
    assert!(quorum_judgement(&two, &both_up, &unsettled, 5).1.is_some());
    // Both answered: judged against the highest durable LSN among them
    // in the current epoch, so only the one holding it is eligible.
    let (committed, blocked) = quorum_judgement(&two, &both_up, &BTreeMap::new(), 5);
    assert_eq!((committed, blocked), (12, None));
    let older = [candidate("a", true, 3, 10), candidate("b", true, 2, 50)];
    assert_eq!(quorum_judgement(&two, &older, &BTreeMap::new(), 5).0, 10);
    // Five members: committed on three, so on two of four replicas;
    // three answers always include one of those.
    let four = quorum_record(&["a", "b", "c", "d"]);
    let three_up = [
        candidate("a", true, 3, 10),
        candidate("b", true, 3, 10),
        candidate("c", true, 3, 10),
        candidate("d", false, 3, 0),
    ];
    assert_eq!(
        quorum_judgement(&four, &three_up, &BTreeMap::new(), 5),
        (10, None)
    );
    let two_up = [&three_up[..2], &three_up[3..]].concat();
    assert!(quorum_judgement(&four, &two_up, &BTreeMap::new(), 5)
        .1
        .is_some());
}

#[test]
fn a_departed_node_back_is_readmitted_before_a_lost_primary_is_judged() {
    let mut view = cluster(CommitMode::SyncAll, &[replica("a", "in_sync", 40)]);
    view.volumes
        .get_mut("vol0")
        .unwrap()
        .value
        .departed
        .insert("d".into(), "d:1".into());
    view.nodes.insert("d".into(), entry(true));
    // The primary p is lost too: the readmission comes first, alone (the
    // next pass judges the record it wrote).
    let actions = decide_once(&view, TTL);
    assert!(
        matches!(&actions[..], [Action::Readmit { node, .. }] if node == "d"),
        "{actions:?}"
    );
}

#[test]
fn a_down_decision_about_another_primary_or_a_later_epoch_is_not_ended() {
    let mut view = cluster(CommitMode::BestEffort, &[replica("a", "in_sync", 40)]);
    let down = down_of(&decide_once(&view, TTL)).clone();
    view.nodes.insert("p".into(), entry(true));
    for stale in [
        Decision {
            lost_primary: "someone-else".into(),
            ..down.clone()
        },
        Decision {
            epoch: 4,
            ..down.clone()
        },
    ] {
        view.decisions
            .insert("vol0".into(), Versioned::new(stale.clone(), 300));
        assert_eq!(decide_once(&view, TTL), vec![], "{stale:?}");
    }
}

#[test]
fn a_changed_down_decision_is_written_again() {
    let mut view = cluster(CommitMode::SyncAll, &[replica("a", "catching_up", 40)]);
    let first = down_of(&decide_once(&view, TTL)).clone();
    view.decisions
        .insert("vol0".into(), Versioned::new(first.clone(), 300));
    assert_eq!(decide_once(&view, TTL), vec![]);
    // The replica now reports another state: other reasons, written.
    view.progress
        .get_mut("vol0")
        .unwrap()
        .replicas
        .get_mut("a")
        .unwrap()
        .state = "rebuilding".into();
    let second = down_of(&decide_once(&view, TTL)).clone();
    assert_ne!(second, first);
}

#[test]
fn a_live_replica_without_any_report_is_unanswered() {
    let silent = Replica {
        own: None,
        ..replica("b", "in_sync", 40)
    };
    let view = cluster(CommitMode::SyncAll, &[replica("a", "in_sync", 40), silent]);
    let actions = decide_once(&view, Duration::ZERO);
    assert!(
        matches!(&actions[..], [Action::Await { unanswered, .. }] if unanswered == &["b".to_owned()]),
        "{actions:?}"
    );
}

#[test]
fn a_primary_that_registers_again_is_lost_afresh_when_it_goes_again() {
    let mut view = cluster(
        CommitMode::SyncAll,
        &[replica("a", "in_sync", 40), {
            let mut slow = replica("b", "in_sync", 40);
            slow.own = None;
            slow
        }],
    );
    let mut c = controller();
    let start = Instant::now();
    // Lost a lease ago: settled, judged without the silent replica.
    let _ = c.decide(&view, start);
    assert!(matches!(
        &c.decide(&view, start + TTL)[..],
        [Action::Promote(_)]
    ));
    // Back, then gone again: its absence counts from then.
    view.nodes.insert("p".into(), entry(true));
    let _ = c.decide(&view, start + TTL * 2);
    view.nodes.remove("p");
    let again = c.decide(&view, start + TTL * 2 + Duration::from_millis(1));
    assert!(matches!(&again[..], [Action::Await { .. }]), "{again:?}");
}
