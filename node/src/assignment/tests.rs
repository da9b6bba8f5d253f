use super::*;

/// Every rule of [`Assignment::validate`], each broken once, with the
/// field a config's refusal points at.
#[test]
fn validate_refuses_each_broken_rule_and_names_its_field() {
    let good = Assignment {
        epoch: 2,
        primary: "n1".into(),
        commit_mode: CommitMode::SyncQuorum,
        replicas: [("n2", "127.0.0.1:1"), ("n3", "127.0.0.1:2")]
            .into_iter()
            .map(|(n, a)| (n.to_owned(), a.to_owned()))
            .collect(),
    };
    assert_eq!(good.validate("v", "n1"), Ok(()));
    assert_eq!(good.validate("v", "n3"), Ok(()));
    let with = |change: &dyn Fn(&mut Assignment)| {
        let mut a = good.clone();
        change(&mut a);
        a
    };
    let table: Vec<(Assignment, &str, AssignmentField, &str)> = vec![
        (
            with(&|a| a.epoch = 0),
            "n1",
            AssignmentField::Epoch,
            "epochs start at 1",
        ),
        (
            with(&|a| a.primary = "a/b".into()),
            "n2",
            AssignmentField::Primary,
            "primary \"a/b\"",
        ),
        (
            with(&|a| {
                a.replicas.insert("n1".into(), "127.0.0.1:3".into());
            }),
            "n1",
            AssignmentField::Replicas,
            "n1 is its primary",
        ),
        (
            with(&|a| {
                a.replicas.insert("x/y".into(), "127.0.0.1:3".into());
            }),
            "n1",
            AssignmentField::Replicas,
            "replica \"x/y\"",
        ),
        (
            with(&|a| {
                a.replicas.insert("n4".into(), "nowhere".into());
            }),
            "n1",
            AssignmentField::Replicas,
            "replica n4 at \"nowhere\"",
        ),
        (
            with(&|a| {
                a.replicas.remove("n3");
            }),
            "n1",
            AssignmentField::CommitMode,
            "quorum",
        ),
        (
            good.clone(),
            "n9",
            AssignmentField::Volume,
            "this node (n9)",
        ),
    ];
    for (assignment, node, field, says) in table {
        let refused = assignment.validate("v", node).unwrap_err();
        assert_eq!(refused.field(), field, "{refused}");
        assert!(refused.to_string().contains(says), "{refused}");
    }
}

fn spec(epoch: u64, primary: &str) -> VolumeSpec {
    VolumeSpec {
        assignment: Assignment {
            commit_mode: CommitMode::SyncAll,
            epoch,
            primary: primary.into(),
            replicas: [("node2", "127.0.0.1:7402"), ("node3", "127.0.0.1:7403")]
                .into_iter()
                .filter(|(n, _)| *n != primary)
                .map(|(n, a)| (n.to_owned(), a.to_owned()))
                .collect(),
        },
        name: "vol0".into(),
        size: 1 << 20,
        export_replicas: false,
        line: 1,
        size_line: 2,
    }
}

#[test]
fn a_restart_never_goes_back_to_an_older_epoch() {
    let dir = tempfile::tempdir().unwrap();
    let first = start(dir.path(), "node1", &spec(1, "node1")).unwrap();
    assert_eq!(first.applied.epoch, 1);
    // The same config again: the primary opens in a new term, the
    // epoch stays the control plane's.
    let second = start(dir.path(), "node1", &spec(1, "node1")).unwrap();
    assert_eq!(second.applied.epoch, 1, "{}", second.reason);
    assert_eq!(second.applied.incarnation, 1);
    assert!(second.applied.term() > first.applied.term());
    assert_eq!(load(dir.path()).unwrap().unwrap().incarnation, 1);
    // Any newer epoch outranks every incarnation of the older one.
    let mut next = second.applied.clone();
    next.epoch = 2;
    next.incarnation = 0;
    assert!(next.term() > second.applied.term());
    // A config that says something else at the applied epoch is refused.
    let moved = spec(1, "node2");
    assert!(matches!(
        start(dir.path(), "node1", &moved),
        Err(StartError::Conflict(_))
    ));
    // A replica keeps the epoch it was given.
    let replica = tempfile::tempdir().unwrap();
    start(replica.path(), "node2", &spec(3, "node1")).unwrap();
    let again = start(replica.path(), "node2", &spec(1, "node1")).unwrap();
    assert_eq!(again.applied.epoch, 3, "{}", again.reason);
}

#[test]
fn the_persisted_assignment_survives_a_power_loss_at_every_boundary() {
    use walship_io::fs::{Fault, PowerLoss, SimFs};
    let real = tempfile::tempdir().unwrap();
    let old = start(real.path(), "node1", &spec(1, "node1"))
        .unwrap()
        .applied;
    let new = start(real.path(), "node1", &spec(1, "node1"))
        .unwrap()
        .applied;
    assert!(new.term() > old.term());
    let dir = Path::new("/data/node1/vol0");
    let setup = |fs: &SimFs| save_in(fs, dir, &old).unwrap();
    let probe = SimFs::new();
    setup(&probe);
    let first = probe.ops();
    save_in(&probe, dir, &new).unwrap();
    let ops = probe.ops() - first;
    for at in 1..=ops + 1 {
        for mode in [
            PowerLoss::DropUnsynced,
            PowerLoss::Seeded(at),
            PowerLoss::Seeded(!at),
        ] {
            let fs = SimFs::new();
            setup(&fs);
            fs.power_loss(PowerLoss::DropUnsynced);
            fs.inject(fs.ops() + at, Fault::Crash);
            let saved = save_in(&fs, dir, &new).is_ok();
            fs.power_loss(mode);
            let case = format!("crash before op {at} of {ops}, {mode:?}");
            let loaded = load_in(&fs, dir)
                .unwrap_or_else(|e| panic!("{case}: {e}"))
                .unwrap_or_else(|| panic!("{case}: the assignment is gone"));
            assert!(
                loaded.term() == new.term() || (!saved && loaded.term() == old.term()),
                "{case}: saved {saved}, term {} (old {}, new {})",
                loaded.term(),
                old.term(),
                new.term()
            );
        }
    }
}

#[test]
fn a_newer_config_wins_and_keeps_unchanged_endpoint_versions() {
    let dir = tempfile::tempdir().unwrap();
    start(dir.path(), "node1", &spec(1, "node1")).unwrap();
    let mut moved = spec(5, "node1");
    moved
        .assignment
        .replicas
        .insert("node3".into(), "127.0.0.1:7503".into());
    let next = start(dir.path(), "node1", &moved).unwrap();
    assert_eq!(next.applied.epoch, 5);
    assert_eq!(next.applied.replicas["node2"].version, 1);
    assert_eq!(next.applied.replicas["node3"].version, 2);
    let engine = next.applied.engine("vol0").unwrap();
    assert_eq!(engine.epoch, Epoch(5 << 20));
    assert_eq!(engine.replicas.len(), 2);
}
