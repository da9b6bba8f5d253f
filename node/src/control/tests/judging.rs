//! How a lost primary's replicas are judged: probes, answers, the
//! engine's rules, the commit modes, the operator's promotion.

use super::*;

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
