//! A volume's life around a loss: liveness, "down" decisions written
//! and ended, departed primaries readmitted.

use super::*;

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
        .state = ReplicaState::Rebuilding;
    let second = down_of(&decide_once(&view, TTL)).clone();
    assert_ne!(second, first);
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
