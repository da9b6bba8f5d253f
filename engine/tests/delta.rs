//! Delta rebuilds on the engine alone: a replica that leaves sync gets a
//! dirty map, a return past retention is rebuilt from it (or by checksums,
//! or staged when its log may be the only other copy), the choice is in
//! the recovery log with its numbers, and the map goes once it is in sync.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use support::*;
use walship_engine::*;

const B: (&str, &str, u64) = ("b", "10.0.0.2:7000", 1);
const C: (&str, &str, u64) = ("c", "10.0.0.3:7000", 1);
const SOURCE: u64 = 77;

fn delta_shell(mode: CommitMode, replicas: &[(&str, &str, u64)]) -> Shell {
    let mut shell = Shell::new(EngineConfig {
        delta_rebuilds: true,
        ..Shell::config()
    });
    shell.wal(0, 100, 0, true);
    shell.assign(assignment(1, mode, replicas));
    shell
}

fn map(since: u64) -> DirtyMap {
    DirtyMap {
        since: Lsn(since),
        dirty: 37,
        regions: 4096,
    }
}

fn transfer(shell: &Shell, server: &str) -> Transfer {
    match &shell.executing[&rid(server)].1.kind {
        PlanKind::Rebuild { transfer, .. } => transfer.clone(),
        other => panic!("not a rebuild: {other:?}"),
    }
}

/// `b` in sync at 100, then its connection drops: returns the commands.
fn b_leaves(shell: &mut Shell) -> Vec<Command> {
    shell.in_sync("b");
    shell.ack("b", 100, None).unwrap();
    shell
        .engine
        .handle_disconnected(&rid("b"), &ExecutionFailure::Transient("reset".into()))
        .unwrap();
    shell.pump()
}

/// `b` comes back: a new session, then its handshake.
fn b_returns(shell: &mut Shell, log: ReplicaLog) {
    shell.engine.handle_retry_now(&rid("b")).unwrap();
    shell.heartbeat("b");
    shell.connect("b");
    shell.handshake_with("b", log);
}

fn log_at(shell: &Shell, flushed: u64) -> ReplicaLog {
    ReplicaLog {
        epochs: shell.epochs.through(Lsn(flushed)),
        ..ReplicaLog::single_epoch(Lsn(flushed), Epoch(1))
    }
}

#[test]
fn a_replica_away_past_retention_is_rebuilt_from_its_dirty_map_which_goes_once_it_is_in_sync() {
    let mut shell = delta_shell(CommitMode::BestEffort, &[B]);
    let commands = b_leaves(&mut shell);
    assert!(
        commands.iter().any(|c| matches!(c, Command::TrackDirty { replica, since } if *replica == rid("b") && *since == Lsn(100))),
        "{commands:?}"
    );
    // The shell keeps the map; the WAL moves on past what b holds.
    shell
        .engine
        .handle_dirty_maps(SOURCE, vec![(rid("b"), map(100))]);
    shell.wal(150, 300, 150, true);
    let log = log_at(&shell, 100);
    b_returns(&mut shell, log);
    assert_eq!(
        shell.event_detail("plan_rebuild_delta"),
        ["regions=37 of 4096 (dirty map since lsn 100; the replica applies its log through 100)"]
    );
    shell.grant("b", 0);
    assert_eq!(
        transfer(&shell, "b"),
        Transfer::Dirty {
            since: Lsn(100),
            apply_through: Lsn(100),
            regions: 37,
            of: 4096
        }
    );
    shell
        .rebuild("b", RebuildProgress::ImageInstalled { at: Lsn(150) })
        .unwrap();
    shell
        .rebuild("b", RebuildProgress::TailReplayed { through: Lsn(300) })
        .unwrap();
    assert_eq!(shell.state("b"), ReplicaState::InSync);
    let forgot = shell
        .all_commands
        .iter()
        .filter(|c| matches!(c, Command::ForgetDirty { replica } if *replica == rid("b")))
        .count();
    assert_eq!(forgot, 1, "the map goes once b is in sync");
    shell.assert_no_pins();
}

#[test]
fn without_a_usable_map_the_rebuild_compares_checksums_and_says_why() {
    for (what, reported, flushed, why) in [
        (
            "no map (a failover)",
            None,
            100,
            "no dirty map for this replica",
        ),
        (
            "a map newer than what it holds",
            Some(map(120)),
            100,
            "dirty map since lsn 120 is past what the replica shares with this log (100)",
        ),
    ] {
        let mut shell = delta_shell(CommitMode::BestEffort, &[B]);
        b_leaves(&mut shell);
        shell.engine.handle_dirty_maps(
            SOURCE,
            reported.map(|m| (rid("b"), m)).into_iter().collect(),
        );
        shell.wal(150, 300, 150, true);
        let log = log_at(&shell, flushed);
        b_returns(&mut shell, log);
        let detail = shell.event_detail("plan_rebuild_checksum");
        assert_eq!(detail.len(), 1, "{what}");
        assert!(detail[0].contains(why), "{what}: {detail:?}");
    }
}

#[test]
fn a_replica_whose_log_may_be_the_only_other_copy_is_rebuilt_staged_unless_another_holds_it() {
    // sync_all with b alone: b's log is the only other copy of what was
    // committed; a rebuild in place would mix it with the image.
    let mut shell = delta_shell(CommitMode::SyncAll, &[B]);
    b_leaves(&mut shell);
    shell
        .engine
        .handle_dirty_maps(SOURCE, vec![(rid("b"), map(100))]);
    shell.wal(150, 300, 150, true);
    let log = log_at(&shell, 100);
    b_returns(&mut shell, log);
    assert_eq!(
        shell.event_detail("plan_rebuild_staged"),
        ["its log may be the only other copy of what was committed: staged, not in place"]
    );
    // With c in sync and durable through committed, b's log is not needed.
    let mut shell = delta_shell(CommitMode::SyncAll, &[B, C]);
    shell.in_sync("c");
    shell.ack("c", 100, None).unwrap();
    b_leaves(&mut shell);
    shell
        .engine
        .handle_dirty_maps(SOURCE, vec![(rid("b"), map(100))]);
    shell.wal(150, 300, 150, true);
    shell.ack("c", 300, None).unwrap();
    let log = log_at(&shell, 100);
    b_returns(&mut shell, log);
    assert_eq!(shell.event_detail("plan_rebuild_delta").len(), 1);
}

#[test]
fn a_rebuild_in_place_without_a_map_starts_one_so_a_cut_can_resume() {
    let mut shell = delta_shell(CommitMode::BestEffort, &[B]);
    shell.wal(150, 300, 150, true);
    // b is new and empty: the whole image goes in place, and from now on
    // what changes after the image is marked.
    shell.connect_and_handshake("b", 0);
    assert_eq!(shell.event_detail("plan_rebuild_whole").len(), 1);
    let tracked: Vec<&Command> = shell
        .all_commands
        .iter()
        .filter(|c| matches!(c, Command::TrackDirty { .. }))
        .collect();
    assert!(
        matches!(tracked[..], [Command::TrackDirty { replica, since }] if *replica == rid("b") && *since == Lsn::ZERO),
        "{tracked:?}"
    );
    // Asked before the image is pinned: the map's since is at most the image's.
    let track = shell
        .all_commands
        .iter()
        .position(|c| matches!(c, Command::TrackDirty { .. }))
        .unwrap();
    let acquire = shell
        .all_commands
        .iter()
        .position(|c| matches!(c, Command::AcquireResources { .. }))
        .unwrap();
    assert!(track < acquire);
}

#[test]
fn a_replica_with_a_partial_image_is_rebuilt_never_caught_up() {
    let mut shell = delta_shell(CommitMode::BestEffort, &[B]);
    b_leaves(&mut shell);
    shell
        .engine
        .handle_dirty_maps(SOURCE, vec![(rid("b"), map(90))]);
    // Even with the whole WAL retained, a partial image cannot be caught up.
    shell.wal(0, 300, 0, true);
    let partial = |source| ReplicaLog {
        partial: Some(PartialImage {
            source,
            since: Some(Lsn(100)),
            image_lsn: Lsn(150),
            cursor: 5 << 20,
            by_map: true,
        }),
        ..ReplicaLog::default()
    };
    b_returns(&mut shell, partial(SOURCE));
    assert_eq!(
        shell.event_detail("handshake").last().unwrap(),
        "flushed=0 committed=300: rebuild_interrupted: the replica holds part of an image at 150"
    );
    assert_eq!(shell.state("b"), ReplicaState::NeedsRebuild);
    // The same primary's map, older than the one the image was chosen by:
    // it still covers every region that can differ.
    assert_eq!(
        shell.event_detail("plan_rebuild_resume"),
        ["rebuild_interrupted at byte 5242880: below it regions=37 of 4096 (dirty map since lsn 90); above it the same map"]
    );
    // From another primary: compared, from the start.
    let mut shell = delta_shell(CommitMode::BestEffort, &[B]);
    b_leaves(&mut shell);
    shell
        .engine
        .handle_dirty_maps(SOURCE, vec![(rid("b"), map(90))]);
    b_returns(&mut shell, partial(SOURCE + 1));
    assert!(shell.event_detail("plan_rebuild_checksum")[0].starts_with(
        "rebuild_interrupted: the replica holds part of an image at 150 from another primary"
    ));
}

#[test]
fn a_verify_mismatch_rebuilds_the_replica_comparing_every_region_even_with_a_map() {
    let mut shell = delta_shell(CommitMode::BestEffort, &[B]);
    shell.in_sync("b");
    shell.ack("b", 100, None).unwrap();
    // A map the shell still reports for b (say, from before it came back).
    shell
        .engine
        .handle_dirty_maps(SOURCE, vec![(rid("b"), map(100))]);
    shell
        .engine
        .handle_verify_mismatch(&rid("b"), "1 regions of 4096 differ at lsn 90")
        .unwrap();
    let commands = shell.pump();
    assert!(commands
        .iter()
        .any(|c| matches!(c, Command::ForgetDirty { replica } if *replica == rid("b"))));
    assert_eq!(shell.state("b"), ReplicaState::NeedsRebuild);
    shell.wal(150, 300, 150, true);
    shell.connect("b");
    let log = ReplicaLog {
        epochs: shell.epochs.through(Lsn(100)),
        ..ReplicaLog::single_epoch(Lsn(100), Epoch(1))
    };
    shell.handshake_with("b", log);
    assert_eq!(
        shell.event_detail("plan_rebuild_checksum"),
        ["compare region checksums: an online verify found 1 regions of 4096 differ at lsn 90"]
    );
    assert!(shell.event_detail("plan_rebuild_delta").is_empty());
}
