//! Acceptance criteria A1–A12 and failure classes FC1, FC2, FC4, FC5, FC8,
//! proved on the engine alone: exact states, commands and log events.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use support::*;
use walship_engine::*;

const B: (&str, &str, u64) = ("b", "10.0.0.2:7000", 1);
const C: (&str, &str, u64) = ("c", "10.0.0.3:7000", 1);

/// Primary with WAL (40, 100], trusted checkpoint at 40, one replica `b`, best effort.
fn primary_with_b() -> Shell {
    primary_with_b_and_wal(40, 100, 40, true)
}

/// Primary with WAL (tail, head], a checkpoint, one replica `b`, best effort.
fn primary_with_b_and_wal(tail: u64, head: u64, checkpoint: u64, trusted: bool) -> Shell {
    let mut shell = Shell::new(Shell::config());
    shell.wal(tail, head, checkpoint, trusted);
    shell.assign(assignment(1, CommitMode::BestEffort, &[B]));
    shell
}

fn execute_plan(commands: &[Command]) -> Option<&RecoveryPlan> {
    commands.iter().find_map(|c| match c {
        Command::Execute { plan, .. } => Some(plan),
        _ => None,
    })
}

#[test]
fn a1_committed_data_survives_failover() {
    let mut shell = Shell::new(Shell::config());
    shell.assign(assignment(1, CommitMode::SyncQuorum, &[B, C]));
    shell.in_sync("b");
    shell.in_sync("c");
    shell.wal(0, 50, 0, true);
    let barrier = shell.barrier(50);
    shell.ack("c", 30, None).unwrap();
    assert_eq!(
        shell.engine.committed(),
        Lsn(30),
        "quorum of 2: primary + c at 30"
    );
    assert!(!shell.barriers.contains_key(&barrier));
    shell.ack("b", 50, Some(barrier)).unwrap();
    assert_eq!(shell.barriers[&barrier], Ok(Lsn(50)));
    // The primary dies. Only a candidate holding everything committed may take over.
    let status = shell.engine.status();
    let candidates: Vec<PromotionCandidate> = status
        .senders
        .iter()
        .map(|s| PromotionCandidate {
            replica: s.replica.clone(),
            running: true,
            epoch: status.epoch,
            state: s.state,
            flushed: s.flushed,
            last_heartbeat: s.last_heartbeat,
        })
        .collect();
    let chosen = select_promotion(&candidates, status.epoch, shell.engine.committed()).unwrap();
    assert_eq!(chosen, rid("b"));
    let report = evaluate_promotion(&candidates, status.epoch, shell.engine.committed());
    assert_eq!(
        report.rejected,
        vec![(
            rid("c"),
            vec![Ineligibility::BehindCommitted {
                flushed: Lsn(30),
                committed: Lsn(50)
            }]
        )]
    );
}

/// A replica that knows more was committed than this primary's log holds
/// (a primary that opened without hearing from it) is neither truncated nor
/// rebuilt: the handshake records `primary_behind`, plans nothing, and the
/// session is retried after a backoff. best_effort, where committed was
/// the old primary's own disk, truncates as before.
#[test]
fn a_replica_that_knows_more_committed_than_the_primary_holds_is_never_truncated() {
    for mode in [CommitMode::SyncAll, CommitMode::SyncQuorum] {
        let mut shell = Shell::new(Shell::config());
        shell.wal(40, 100, 40, true);
        let replicas: &[(&str, &str, u64)] = if mode == CommitMode::SyncQuorum {
            &[B, C]
        } else {
            &[B]
        };
        shell.assign(assignment(1, mode, replicas));
        shell.connect("b");
        let log = ReplicaLog {
            committed: Lsn(120),
            ..ReplicaLog::single_epoch(Lsn(130), Epoch(1))
        };
        let commands = shell.handshake_with("b", log);
        assert!(execute_plan(&commands).is_none(), "{mode}: {commands:?}");
        assert!(
            !commands
                .iter()
                .any(|c| matches!(c, Command::AcquireResources { .. })),
            "{mode}: {commands:?}"
        );
        assert_eq!(
            shell.event_detail("primary_behind"),
            ["primary_behind: vol1/b knows 120 committed, this primary's log ends at 100: neither truncated nor rebuilt"],
            "{mode}"
        );
        assert_ne!(shell.state("b"), ReplicaState::InSync);
        assert_ne!(shell.state("b"), ReplicaState::NeedsRebuild);
    }
    let mut shell = primary_with_b();
    shell.connect("b");
    let log = ReplicaLog {
        committed: Lsn(120),
        ..ReplicaLog::single_epoch(Lsn(130), Epoch(1))
    };
    let commands = shell.handshake_with("b", log);
    assert!(
        matches!(execute_plan(&commands), Some(plan) if matches!(plan.kind, PlanKind::CatchUp { truncate_to: Some(Lsn(100)), .. })),
        "best_effort: {commands:?}"
    );
}

#[test]
fn a2_uncommitted_data_is_not_revived() {
    let mut shell = primary_with_b();
    // b holds 110: ten entries past committed that no one acknowledged.
    let commands = shell.connect_and_handshake("b", 110);
    let plan = execute_plan(&commands).expect("truncation needs no pin and runs at once");
    assert!(matches!(
        plan.kind,
        PlanKind::CatchUp {
            start: Lsn(100),
            frozen_target: Lsn(100),
            truncate_to: Some(Lsn(100)),
            ..
        }
    ));
    assert_eq!(
        shell.event_detail("handshake"),
        ["flushed=110 committed=100: replica_ahead: flushed=110 committed=100, truncate to 100"]
    );
    assert_eq!(
        shell.progress("b", 100),
        Err(EngineError::TruncationPending {
            replica: rid("b"),
            to: Lsn(100)
        })
    );
    let (s, e) = (shell.session("b"), shell.epoch());
    assert_eq!(
        shell.engine.handle_truncated(&rid("b"), s, e, Lsn(105)),
        Err(EngineError::TruncationMismatch {
            replica: rid("b"),
            required: Lsn(100),
            reported: Lsn(105)
        })
    );
    shell
        .engine
        .handle_truncated(&rid("b"), s, e, Lsn(100))
        .unwrap();
    shell.pump();
    assert_eq!(shell.state("b"), ReplicaState::InSync);
    assert_eq!(shell.engine.flushed(&rid("b")), Some(Lsn(100)));
    assert_eq!(shell.live[&rid("b")], Lsn(100));
}

#[test]
fn a3_stale_epoch_traffic_is_fenced() {
    let mut shell = Shell::new(Shell::config());
    shell.wal(40, 100, 40, true);
    shell.assign(assignment(1, CommitMode::SyncAll, &[B]));
    shell.in_sync("b");
    shell.wal(40, 110, 40, true);
    let pending = shell.barrier(110);
    assert!(
        !shell.barriers.contains_key(&pending),
        "sync_all waits for b"
    );
    shell.assign(assignment(2, CommitMode::SyncAll, &[B]));
    assert_eq!(
        shell.barriers[&pending],
        Err(BarrierFailure::Fenced { lsn: Lsn(110) })
    );
    let stale = EngineError::StaleEpoch {
        got: Epoch(1),
        current: Epoch(2),
    };
    assert_eq!(
        shell
            .engine
            .handle_assignment(assignment(1, CommitMode::SyncAll, &[B])),
        Err(stale.clone())
    );
    assert_eq!(
        shell.engine.handle_barrier(Lsn(110), Epoch(1)),
        Err(stale.clone())
    );
    let delayed = Ack {
        epoch: Epoch(1),
        durable: Lsn(110),
        barrier: Some(pending),
        told: Lsn(110),
    };
    assert_eq!(
        shell.engine.handle_ack(&rid("b"), delayed),
        Err(stale.clone())
    );
    shell.connect("b");
    let s = shell.session("b");
    let reply = HandshakeReply {
        replica: rid("b"),
        epoch: Epoch(1),
        log: ReplicaLog::single_epoch(Lsn(110), Epoch(1)),
    };
    assert_eq!(
        shell.engine.handle_handshake(&rid("b"), s, reply),
        Err(stale)
    );
    assert_eq!(shell.event_detail("fenced").len(), 4);
    assert_eq!(shell.engine.epoch(), Epoch(2));
    assert_ne!(
        shell.state("b"),
        ReplicaState::InSync,
        "b must re-handshake in epoch 2"
    );
}

#[test]
fn a4_short_gap_recovers_by_catch_up_not_rebuild() {
    let mut shell = primary_with_b();
    let commands = shell.connect_and_handshake("b", 70);
    assert!(matches!(
        commands.as_slice(),
        [Command::AcquireResources { requests, .. }] if requests == &[ResourceRequest::WalRetention { from: Lsn(70) }]
    ));
    assert_eq!(
        shell.event_detail("handshake"),
        ["flushed=70 committed=100: gap_within_retention: need 71-100, tail=40 head=100"]
    );
    assert_eq!(shell.event_detail("plan_catchup"), ["ship 71-100"]);
    shell.grant("b", 0);
    assert_eq!(shell.state("b"), ReplicaState::CatchingUp);
    // Writes continue; the catch-up target stays frozen at 100.
    shell.wal(40, 120, 40, true);
    shell.progress("b", 85).unwrap();
    assert!(matches!(
        shell.progress("b", 80),
        Err(EngineError::NonMonotonicProgress { .. })
    ));
    assert_eq!(
        shell.progress("b", 101),
        Err(EngineError::PastTarget {
            replica: rid("b"),
            reported: Lsn(101),
            target: Lsn(100)
        })
    );
    shell.progress("b", 100).unwrap();
    assert_eq!(shell.state("b"), ReplicaState::InSync);
    assert_eq!(shell.live[&rid("b")], Lsn(100));
    assert!(!shell
        .events("b")
        .iter()
        .any(|e| e.starts_with("plan_rebuild")));
    assert_eq!(
        shell.engine.session_phase(&rid("b")),
        Some(SessionPhase::Completed)
    );
    shell.assert_no_pins();
}

#[test]
fn a5_non_convergent_catch_up_escalates_to_needs_rebuild() {
    let mut config = Shell::config();
    config.budget.max_duration_ticks = Some(50);
    let mut shell = Shell::new(config);
    shell.wal(40, 100, 40, true);
    shell.assign(assignment(1, CommitMode::BestEffort, &[B]));
    shell.connect_and_handshake("b", 70);
    shell.grant("b", 0);
    let old = shell.session("b");
    shell.tick(30);
    shell.progress("b", 80).unwrap();
    assert!(
        shell.tick(50).is_empty(),
        "at the limit is still within budget"
    );
    let commands = shell.tick(51);
    assert!(matches!(commands[0], Command::CancelExecution { session, .. } if session == old));
    assert!(matches!(commands[1], Command::ReleaseResources { .. }));
    assert!(
        matches!(&commands[2], Command::ReleaseRetention { reason, .. } if reason.starts_with("needs_rebuild: budget_duration_exceeded")),
        "a replica that needs a rebuild holds no WAL"
    );
    assert!(matches!(commands[3], Command::Connect { .. }));
    assert_eq!(
        shell.event_detail("escalated"),
        ["budget_duration_exceeded: elapsed=51 max=50"]
    );
    assert_eq!(shell.state("b"), ReplicaState::NeedsRebuild);
    assert!(
        !shell.events("b").contains(&"session_completed"),
        "never a fake success"
    );
    shell.assert_no_pins();
    // Sticky: even a zero-gap handshake now plans a rebuild.
    shell.connect_and_handshake("b", 100);
    assert_eq!(shell.state("b"), ReplicaState::NeedsRebuild);
    assert_eq!(
        shell
            .events("b")
            .iter()
            .filter(|e| **e == "rebuild_required")
            .count(),
        1
    );
    assert_eq!(
        shell.event_detail("plan_rebuild_snapshot_tail"),
        ["snapshot at 40, replay 41-100"]
    );
}

#[test]
fn a5_stalled_catch_up_escalates_and_oversized_gap_is_refused_up_front() {
    let mut config = Shell::config();
    config.budget.progress_deadline_ticks = Some(10);
    config.budget.max_entries = Some(40);
    let mut shell = Shell::new(config);
    shell.wal(40, 100, 40, true);
    shell.assign(assignment(1, CommitMode::BestEffort, &[B, C]));
    shell.connect_and_handshake("b", 70);
    shell.grant("b", 0);
    shell.tick(5);
    shell.progress("b", 75).unwrap();
    shell.tick(15);
    assert_eq!(shell.state("b"), ReplicaState::CatchingUp);
    shell.tick(16);
    assert_eq!(
        shell.event_detail("escalated"),
        ["budget_stalled: no progress for 11 ticks, deadline=10"]
    );
    assert_eq!(shell.state("b"), ReplicaState::NeedsRebuild);
    // c is 50 behind with a 40-entry budget: refused before anything ships.
    shell.connect_and_handshake("c", 50);
    assert_eq!(shell.state("c"), ReplicaState::NeedsRebuild);
    assert!(shell
        .event_detail("escalated")
        .contains(&"budget_entries_exceeded: entries=50 max=40".to_owned()));
}

#[test]
fn a6_recoverability_boundary_is_exact() {
    for (flushed, expect_rebuild, reason) in [
        (
            39,
            true,
            "gap_beyond_retention: need 40-100, tail=40 head=100",
        ),
        (
            40,
            false,
            "gap_within_retention: need 41-100, tail=40 head=100",
        ),
        (
            41,
            false,
            "gap_within_retention: need 42-100, tail=40 head=100",
        ),
    ] {
        let mut shell = primary_with_b();
        shell.connect_and_handshake("b", flushed);
        assert_eq!(
            shell.event_detail("handshake"),
            [format!("flushed={flushed} committed=100: {reason}")]
        );
        let state = shell.state("b");
        if expect_rebuild {
            assert_eq!(state, ReplicaState::NeedsRebuild, "flushed={flushed}");
            assert_eq!(
                shell.event_detail("plan_rebuild_snapshot_tail"),
                ["snapshot at 40, replay 41-100"]
            );
        } else {
            assert_eq!(
                shell.event_detail("plan_catchup"),
                [format!("ship {}-100", flushed + 1)]
            );
        }
    }
}

#[test]
fn a7_snapshot_plus_tail_rebuild_matches_and_gates_tail_replay() {
    let mut shell = primary_with_b_and_wal(60, 100, 80, true);
    let commands = shell.connect_and_handshake("b", 50);
    assert!(matches!(
        commands.as_slice(),
        [Command::ReleaseRetention { .. }, Command::AcquireResources { requests, .. }]
            if requests == &[ResourceRequest::Snapshot { at: Lsn(80) }, ResourceRequest::WalRetention { from: Lsn(80) }]
    ));
    shell.grant("b", 0);
    assert_eq!(shell.state("b"), ReplicaState::Rebuilding);
    assert_eq!(
        shell.rebuild("b", RebuildProgress::TailReplayed { through: Lsn(90) }),
        Err(EngineError::Rebuild(RebuildError::TailBeforeTransfer {
            image_lsn: Lsn(80)
        }))
    );
    shell
        .rebuild("b", RebuildProgress::Transferred { bytes: 1 << 20 })
        .unwrap();
    assert_eq!(
        shell.rebuild("b", RebuildProgress::ImageInstalled { at: Lsn(95) }),
        Err(EngineError::Rebuild(RebuildError::TransferLsnMismatch {
            expected: Lsn(80),
            reported: Lsn(95)
        }))
    );
    shell
        .rebuild("b", RebuildProgress::ImageInstalled { at: Lsn(80) })
        .unwrap();
    assert_eq!(
        shell.event_detail("rebuild_image_installed"),
        ["image at 80, replaying 81-100"]
    );
    shell
        .rebuild("b", RebuildProgress::TailReplayed { through: Lsn(100) })
        .unwrap();
    assert_eq!(shell.state("b"), ReplicaState::InSync);
    assert_eq!(shell.event_detail("rebuild_completed"), ["in sync at 100"]);
    shell.assert_no_pins();
}

#[test]
fn a7_old_lsn_cannot_be_rebuilt_from_the_current_extent() {
    // The extent already holds 95 but only 90 is committed: its image is not the state at 90.
    let wal = WalState {
        head: Lsn(100),
        tail: Lsn(60),
        checkpoint: Lsn(95),
        checkpoint_trusted: true,
        newest_epoch: None,
    };
    let mut shell = Shell::new(Shell::config());
    shell.epochs = EpochHistory::single(Epoch(1));
    shell.engine = Engine::restore(Shell::config(), wal, shell.epochs.clone(), Lsn(90)).unwrap();
    shell.assign(assignment(1, CommitMode::BestEffort, &[B]));
    shell.connect_and_handshake("b", 50);
    assert_eq!(
        shell.event_detail("plan_rebuild_full_base"),
        ["full base at >= 90; because checkpoint_past_committed: checkpoint=95 committed=90"]
    );
    // A base at an older LSN than the plan bound is refused, and released.
    let s = shell.session("b");
    let stale_base = shell.make_grants(s, 85);
    assert!(matches!(
        shell
            .engine
            .handle_resources_granted(&rid("b"), s, stale_base),
        Err(EngineError::BadGrants { .. })
    ));
    shell.pump();
    shell.assert_no_pins();
    assert_eq!(shell.state("b"), ReplicaState::NeedsRebuild);
}

#[test]
fn a8_sync_all_is_strict() {
    let mut shell = Shell::new(Shell::config());
    shell.assign(assignment(1, CommitMode::SyncAll, &[B, C]));
    shell.in_sync("b");
    shell.in_sync("c");
    shell.wal(0, 110, 0, true);
    let first = shell.barrier(110);
    shell.ack("b", 110, Some(first)).unwrap();
    shell.ack("c", 105, Some(first)).unwrap();
    assert_eq!(shell.engine.committed(), Lsn(105));
    assert!(!shell.barriers.contains_key(&first));
    shell.ack("c", 110, Some(first)).unwrap();
    assert_eq!(shell.barriers[&first], Ok(Lsn(110)));
    // c is lost: sync_all cannot commit, and says so at the deadline.
    shell
        .engine
        .handle_disconnected(&rid("c"), &ExecutionFailure::Transient("peer reset".into()))
        .unwrap();
    shell.pump();
    shell.wal(0, 120, 0, true);
    let second = shell.barrier(120);
    shell.ack("b", 120, Some(second)).unwrap();
    assert_eq!(shell.engine.committed(), Lsn(110));
    shell.tick(100);
    assert_eq!(
        shell.barriers[&second],
        Err(BarrierFailure::TimedOut {
            lsn: Lsn(120),
            committed: Lsn(110),
            mode: CommitMode::SyncAll,
            lagging: vec![Lagging {
                replica: rid("c"),
                state: ReplicaState::Degraded,
                cause: Some("network: peer reset".into()),
            }],
        })
    );
    assert_eq!(
        shell.barriers[&second].clone().unwrap_err().to_string(),
        "barrier at 120 timed out (sync_all): committed=110, lagging=[vol1/c (Degraded, network: peer reset)]"
    );
}

#[test]
fn a8_sync_quorum_needs_a_true_durable_quorum() {
    let mut shell = Shell::new(Shell::config());
    shell.assign(assignment(1, CommitMode::SyncQuorum, &[B, C]));
    shell.in_sync("b");
    shell.wal(0, 40, 0, true);
    assert_eq!(
        shell.engine.committed(),
        Lsn(0),
        "primary alone is not a quorum of 3"
    );
    // c has not handshaken in this epoch: its durable ack does not count.
    shell.ack("c", 40, None).unwrap();
    assert_eq!(shell.state("c"), ReplicaState::Connecting);
    assert_eq!(shell.engine.committed(), Lsn(0));
    shell.ack("b", 40, None).unwrap();
    assert_eq!(shell.engine.committed(), Lsn(40));
}

#[test]
fn a8_impossible_quorum_topology_is_rejected_and_changes_nothing() {
    let mut shell = Shell::new(Shell::config());
    assert_eq!(
        shell
            .engine
            .handle_assignment(assignment(1, CommitMode::SyncQuorum, &[B])),
        Err(EngineError::Commit(CommitError::ImpossibleQuorum {
            members: 2,
            quorum: 2
        }))
    );
    assert_eq!(shell.engine.epoch(), Epoch(0));
    assert_eq!(shell.engine.replicas().count(), 0);
    assert!(shell.pump().is_empty());
}

#[test]
fn a9_promotion_uses_safe_candidate_eligibility() {
    let candidate = |server: &str, running, epoch, state, flushed| PromotionCandidate {
        replica: rid(server),
        running,
        epoch: Epoch(epoch),
        state,
        flushed: Lsn(flushed),
        last_heartbeat: Tick(1),
    };
    let candidates = [
        candidate("a", false, 5, ReplicaState::InSync, 100),
        candidate("b", true, 4, ReplicaState::InSync, 100),
        candidate("c", true, 5, ReplicaState::Rebuilding, 100),
        candidate("d", true, 5, ReplicaState::InSync, 99),
        candidate("e", true, 5, ReplicaState::Degraded, 100),
    ];
    let report = evaluate_promotion(&candidates, Epoch(5), Lsn(100));
    assert_eq!(report.ranked, vec![rid("e")]);
    assert_eq!(
        report.rejected,
        vec![
            (rid("a"), vec![Ineligibility::NotRunning]),
            (
                rid("b"),
                vec![Ineligibility::EpochMismatch {
                    candidate: Epoch(4),
                    current: Epoch(5)
                }]
            ),
            (
                rid("c"),
                vec![Ineligibility::StateIneligible {
                    state: ReplicaState::Rebuilding
                }]
            ),
            (
                rid("d"),
                vec![Ineligibility::BehindCommitted {
                    flushed: Lsn(99),
                    committed: Lsn(100)
                }]
            ),
        ]
    );
    let only_lagging = [candidates[3].clone()];
    assert!(select_promotion(&only_lagging, Epoch(5), Lsn(100)).is_err());
    let desperate = select_desperate(&only_lagging, Epoch(5), Lsn(100), DataLossAccepted).unwrap();
    assert_eq!(
        (desperate.lost_from_exclusive, desperate.lost_to_inclusive),
        (Lsn(99), Lsn(100))
    );
}

#[test]
fn a10_changed_address_restart_keeps_identity_and_rejects_stale_endpoint() {
    let mut shell = primary_with_b();
    shell.in_sync("b");
    let commands = shell.assign(assignment(
        1,
        CommitMode::BestEffort,
        &[("b", "10.0.0.9:7000", 2)],
    ));
    // Out of sync from here: what it misses is marked for a delta rebuild.
    let (tracked, commands): (Vec<Command>, Vec<Command>) = commands
        .into_iter()
        .partition(|c| matches!(c, Command::TrackDirty { .. }));
    assert!(matches!(&tracked[..], [Command::TrackDirty { replica, .. }] if *replica == rid("b")));
    assert!(
        matches!(&commands[0], Command::StopLiveShipping { reason, .. } if reason == "endpoint_changed")
    );
    assert!(matches!(
        &commands[1],
        Command::Connect { replica, endpoint, .. } if *replica == rid("b") && endpoint.data_addr == "10.0.0.9:7000"
    ));
    assert_eq!(
        shell.event_detail("endpoint_changed"),
        ["10.0.0.2:7000@v1 -> 10.0.0.9:7000@v2, identity kept"]
    );
    assert_eq!(
        shell.engine.session_snapshot(&rid("b")).unwrap().kind,
        SessionKind::Reassign
    );
    shell.connect_and_handshake("b", 100);
    assert_eq!(shell.state("b"), ReplicaState::InSync);
    assert_eq!(
        shell
            .engine
            .handle_assignment(assignment(1, CommitMode::BestEffort, &[B])),
        Err(EngineError::StaleEndpoint {
            replica: rid("b"),
            got: 1,
            current: 2
        })
    );
    assert_eq!(
        shell.engine.handle_assignment(assignment(
            1,
            CommitMode::BestEffort,
            &[("b", "10.0.0.7:1", 2)]
        )),
        Err(EngineError::EndpointConflict {
            replica: rid("b"),
            version: 2
        })
    );
    assert_eq!(
        shell.engine.endpoint(&rid("b")).unwrap().data_addr,
        "10.0.0.9:7000"
    );
    assert_eq!(shell.event_detail("stale_endpoint_rejected").len(), 1);
}

#[test]
fn a11_late_ack_after_barrier_timeout_is_rejected() {
    let mut shell = Shell::new(Shell::config());
    shell.assign(assignment(1, CommitMode::SyncAll, &[B]));
    shell.in_sync("b");
    shell.wal(0, 10, 0, true);
    shell.engine.handle_local_durable(Lsn(0), Lsn(10));
    let barrier = shell.barrier(10);
    assert_eq!(
        shell.barrier_requests,
        [(rid("b"), barrier)],
        "the replica is asked for an ack naming the barrier"
    );
    shell.tick(99);
    assert!(!shell.barriers.contains_key(&barrier));
    shell.tick(100);
    assert!(matches!(
        shell.barriers[&barrier],
        Err(BarrierFailure::TimedOut { .. })
    ));
    assert_eq!(
        shell.ack("b", 10, Some(barrier)),
        Err(EngineError::Commit(CommitError::LateAck {
            replica: rid("b"),
            barrier
        }))
    );
    assert!(
        matches!(
            shell.barriers[&barrier],
            Err(BarrierFailure::TimedOut { .. })
        ),
        "failure stands"
    );
    assert_eq!(shell.event_detail("late_ack_rejected").len(), 1);
    assert_eq!(
        shell.engine.committed(),
        Lsn(10),
        "what the late ack says of the replica's disk still counts"
    );
    // A barrier now asks for nothing new to be durable, but b must still
    // be told 10 is committed (its ack said it knew 0): one more request.
    let after = shell.barrier(10);
    assert!(!shell.barriers.contains_key(&after));
    assert_eq!(shell.barrier_requests.last(), Some(&(rid("b"), after)));
    shell.ack("b", 10, Some(after)).unwrap();
    assert_eq!(shell.barriers[&after], Ok(Lsn(10)));
}

/// Build item 3 of the lost-disk issue: by the time a barrier (a FLUSH, a
/// FUA write) is acknowledged, the replicas its mode counts know that
/// everything acknowledged before it was asked for is committed, so their
/// floor covers it. A write's own barrier costs nothing more: the request
/// it sends anyway carries what was committed before it. A FLUSH after
/// writes that were all acknowledged costs the request it would
/// otherwise not have sent.
#[test]
fn a_barrier_resolves_once_the_replicas_know_what_was_committed_before_it() {
    for mode in [CommitMode::SyncAll, CommitMode::SyncQuorum] {
        let mut shell = Shell::new(Shell::config());
        shell.assign(assignment(1, mode, &[B, C]));
        shell.in_sync("b");
        shell.in_sync("c");
        // A FUA write at 1-10: its barrier was asked for with 0 committed.
        shell.wal(0, 10, 0, true);
        shell.engine.handle_local_durable(Lsn(0), Lsn(10));
        let fua = shell.barrier(10);
        assert_eq!(shell.barrier_requests.len(), 2, "{mode:?}");
        shell.ack_knowing("b", 10, Some(fua), 0).unwrap();
        shell.ack_knowing("c", 10, Some(fua), 0).unwrap();
        assert_eq!(shell.barriers[&fua], Ok(Lsn(10)), "{mode:?}");
        // The next FUA write, 11: its request tells them 10.
        shell.wal(0, 11, 0, true);
        shell.engine.handle_local_durable(Lsn(10), Lsn(11));
        let next = shell.barrier(11);
        assert_eq!(shell.barrier_requests.len(), 4, "{mode:?}");
        shell.ack_knowing("b", 11, Some(next), 10).unwrap();
        shell.ack_knowing("c", 11, Some(next), 10).unwrap();
        assert_eq!(shell.barriers[&next], Ok(Lsn(11)), "{mode:?}");
        // A FLUSH now: 11 is committed, and durable everywhere, but nobody
        // was told. Each is asked once more; the mode's count of them must
        // answer knowing 11.
        let flush = shell.barrier(11);
        assert!(!shell.barriers.contains_key(&flush), "{mode:?}");
        assert_eq!(shell.barrier_requests.len(), 6, "{mode:?}");
        shell.ack_knowing("b", 11, Some(flush), 11).unwrap();
        match mode {
            // The primary and b are a quorum of three.
            CommitMode::SyncQuorum => assert_eq!(shell.barriers[&flush], Ok(Lsn(11))),
            _ => {
                assert!(!shell.barriers.contains_key(&flush), "c was not told yet");
                shell.ack_knowing("c", 11, Some(flush), 11).unwrap();
                assert_eq!(shell.barriers[&flush], Ok(Lsn(11)));
            }
        }
        // Once told, a FLUSH with nothing new resolves at once.
        if mode == CommitMode::SyncAll {
            let again = shell.barrier(11);
            assert_eq!(shell.barriers[&again], Ok(Lsn(11)));
            assert_eq!(shell.barrier_requests.len(), 6);
        }
    }
}

#[test]
fn a11_pin_reservation_timeout_invalidates_and_late_grant_is_released() {
    let mut shell = primary_with_b();
    shell.connect_and_handshake("b", 70);
    let old = shell.session("b");
    shell.tick(100);
    assert_eq!(
        shell.event_detail("session_invalidated"),
        ["pin_failed: pin_reservation_timeout"]
    );
    assert_eq!(shell.state("b"), ReplicaState::NeedsRebuild);
    let late = shell.make_grants(old, 0);
    let result = shell.engine.handle_resources_granted(&rid("b"), old, late);
    assert!(matches!(result, Err(EngineError::StaleSession { .. })));
    shell.pump();
    shell.assert_no_pins();
    assert!(shell
        .event_detail("exec_resources_released")
        .iter()
        .any(|d| d.ends_with("(stale_grant)")));
}

#[test]
fn a12_within_a_tick_messages_are_handled_before_timers() {
    let run = |progress_first: bool| {
        let mut config = Shell::config();
        config.budget.max_duration_ticks = Some(50);
        let mut shell = Shell::new(config);
        shell.wal(40, 100, 40, true);
        shell.assign(assignment(1, CommitMode::BestEffort, &[B]));
        shell.connect_and_handshake("b", 70);
        shell.grant("b", 0);
        let progress = Input::CatchUpProgress {
            replica: rid("b"),
            session: shell.session("b"),
            epoch: Epoch(1),
            progress: CatchUpProgress {
                applied: Lsn(100),
                entries: 30,
                bytes: 0,
            },
        };
        if progress_first {
            let results = shell.engine.handle_batch(Tick(51), vec![progress]);
            assert_eq!(results, vec![Ok(())]);
        } else {
            shell.engine.handle_tick(Tick(51));
            assert!(shell.engine.handle_input(progress).is_err());
        }
        shell.pump();
        shell
    };
    let batched = run(true);
    assert_eq!(batched.state("b"), ReplicaState::InSync);
    assert!(batched.event_detail("stale_timeout_ignored").is_empty());
    assert_eq!(
        batched.engine.next_timer(),
        None,
        "the budget timer went with the session"
    );
    let timer_first = run(false);
    assert_eq!(timer_first.state("b"), ReplicaState::NeedsRebuild);
}

#[test]
fn a12_stale_timeout_never_regresses_state() {
    let mut shell = primary_with_b();
    shell.in_sync("b");
    let barrier = shell.barrier(100);
    assert_eq!(shell.barriers[&barrier], Ok(Lsn(100)));
    assert!(
        shell.barrier_requests.is_empty(),
        "resolved at once (and best effort): no replica is asked"
    );
    // Resolving the barrier disarmed its timer: nothing fires later, and
    // nothing is logged for it (a resolved barrier is not an event).
    assert_eq!(shell.engine.next_timer(), None);
    shell.tick(500);
    assert_eq!(shell.barriers[&barrier], Ok(Lsn(100)));
    assert!(shell.event_detail("stale_timeout_ignored").is_empty());
    assert_eq!(shell.state("b"), ReplicaState::InSync);
    // Many barriers later, the log holds only what was decided.
    let before = shell.engine.log().len();
    for lsn in 101..=1100 {
        shell.wal(40, lsn, 40, true);
        shell.ack("b", lsn, None).unwrap();
        let b = shell.barrier(lsn);
        assert_eq!(shell.barriers[&b], Ok(Lsn(lsn)));
    }
    shell.tick(2000);
    assert_eq!(shell.engine.log().len(), before);
}

#[test]
fn fc1_changed_address_restart_mid_plan_releases_and_replans() {
    let mut shell = primary_with_b();
    shell.connect_and_handshake("b", 70);
    shell.grant("b", 0);
    let old = shell.session("b");
    let commands = shell.assign(assignment(
        1,
        CommitMode::BestEffort,
        &[("b", "10.0.0.9:7000", 2)],
    ));
    assert!(matches!(&commands[0], Command::CancelExecution { session, .. } if *session == old));
    assert!(
        matches!(&commands[1], Command::ReleaseResources { reason, .. } if reason == "endpoint_changed")
    );
    shell.assert_no_pins();
    let stale = shell.engine.handle_catchup_progress(
        &rid("b"),
        old,
        Epoch(1),
        CatchUpProgress {
            applied: Lsn(80),
            entries: 1,
            bytes: 1,
        },
    );
    assert!(matches!(stale, Err(EngineError::StaleSession { got, .. }) if got == old));
    shell.connect_and_handshake("b", 75);
    assert_eq!(
        shell.event_detail("plan_catchup"),
        ["ship 71-100", "ship 76-100"]
    );
    shell.grant("b", 0);
    shell.progress("b", 100).unwrap();
    assert_eq!(shell.state("b"), ReplicaState::InSync);
    shell.assert_no_pins();
}

#[test]
fn fc2_epoch_bump_mid_execution_releases_pins() {
    let mut shell = primary_with_b_and_wal(60, 100, 80, true);
    shell.connect_and_handshake("b", 10);
    shell.grant("b", 0);
    assert_eq!(shell.pins.len(), 2);
    let old = shell.session("b");
    shell
        .rebuild("b", RebuildProgress::Transferred { bytes: 4096 })
        .unwrap();
    shell.assign(assignment(2, CommitMode::BestEffort, &[B]));
    shell.assert_no_pins();
    assert_eq!(shell.cancelled, vec![old]);
    assert_eq!(
        shell
            .events("b")
            .iter()
            .filter(|e| **e == "rebuild_aborted")
            .count(),
        1
    );
    let late = shell.engine.handle_rebuild_progress(
        &rid("b"),
        old,
        Epoch(1),
        RebuildProgress::Transferred { bytes: 8192 },
    );
    assert!(matches!(late, Err(EngineError::StaleSession { .. })));
    assert_eq!(
        shell.state("b"),
        ReplicaState::NeedsRebuild,
        "still needs its rebuild"
    );
    shell.connect_and_handshake("b", 10);
    shell.grant("b", 0);
    shell
        .rebuild("b", RebuildProgress::ImageInstalled { at: Lsn(80) })
        .unwrap();
    shell
        .rebuild("b", RebuildProgress::TailReplayed { through: Lsn(100) })
        .unwrap();
    assert_eq!(shell.state("b"), ReplicaState::InSync);
    shell.assert_no_pins();
}

#[test]
fn fc4_unrecoverable_gap_after_recycle_needs_rebuild_with_proof() {
    let mut shell = primary_with_b();
    shell.wal(90, 100, 90, true);
    shell.connect_and_handshake("b", 70);
    assert_eq!(
        shell.event_detail("handshake"),
        ["flushed=70 committed=100: gap_beyond_retention: need 71-100, tail=90 head=100"]
    );
    assert_eq!(shell.state("b"), ReplicaState::NeedsRebuild);
    let need = shell.engine.status().senders[0]
        .rebuild_need
        .clone()
        .unwrap();
    assert_eq!(
        need.reason,
        "gap_beyond_retention: need 71-100, tail=90 head=100"
    );
}

#[test]
fn fc4_wal_recycled_under_a_running_catch_up_escalates() {
    let mut shell = primary_with_b();
    shell.connect_and_handshake("b", 70);
    shell.grant("b", 0);
    let s = shell.session("b");
    let failure = ExecutionFailure::Unrecoverable("wal_recycled: lsn 71 below tail 90".into());
    shell
        .engine
        .handle_execution_failed(&rid("b"), s, failure)
        .unwrap();
    shell.pump();
    assert_eq!(shell.state("b"), ReplicaState::NeedsRebuild);
    assert_eq!(
        shell.event_detail("escalated"),
        ["wal_recycled: lsn 71 below tail 90"]
    );
    assert_ne!(shell.session("b"), s);
    shell.assert_no_pins();
}

#[test]
fn fc5_trusted_base_with_unreplayable_tail_uses_full_base() {
    let mut shell = primary_with_b_and_wal(60, 100, 50, true);
    let commands = shell.connect_and_handshake("b", 20);
    assert!(matches!(
        commands.as_slice(),
        [Command::ReleaseRetention { .. }, Command::AcquireResources { requests, .. }] if requests == &[ResourceRequest::FullBase { at_least: Lsn(100) }]
    ));
    assert_eq!(
        shell.event_detail("plan_rebuild_full_base"),
        ["full base at >= 100; because tail_unreplayable: need 51-100, tail=60 head=100"]
    );
    shell.grant("b", 100);
    shell
        .rebuild("b", RebuildProgress::ImageInstalled { at: Lsn(100) })
        .unwrap();
    assert_eq!(shell.state("b"), ReplicaState::InSync);
    shell.assert_no_pins();
}

#[test]
fn fc8_snapshot_pin_failure_falls_back_to_full_base() {
    let mut shell = primary_with_b_and_wal(60, 100, 80, true);
    shell.connect_and_handshake("b", 10);
    let s = shell.session("b");
    shell
        .engine
        .handle_resources_failed(&rid("b"), s, "snapshot image evicted")
        .unwrap();
    shell.pump();
    assert_eq!(
        shell.event_detail("session_invalidated"),
        ["pin_failed: snapshot image evicted"]
    );
    assert_eq!(shell.event_detail("rebuild_fallback").len(), 1);
    shell.connect_and_handshake("b", 10);
    assert_eq!(
        shell.event_detail("plan_rebuild_full_base"),
        ["full base at >= 100; because snapshot_unavailable: snapshot image evicted"]
    );
    shell.grant("b", 100);
    shell
        .rebuild("b", RebuildProgress::ImageInstalled { at: Lsn(100) })
        .unwrap();
    assert_eq!(shell.state("b"), ReplicaState::InSync);
    assert!(shell.engine.status().senders[0].rebuild_need.is_none());
    shell.assert_no_pins();
}

#[test]
fn fc8_untrusted_checkpoint_uses_full_base() {
    let mut shell = primary_with_b_and_wal(60, 100, 80, false);
    shell.connect_and_handshake("b", 10);
    assert_eq!(
        shell.event_detail("plan_rebuild_full_base"),
        ["full base at >= 100; because checkpoint_untrusted: checkpoint=80"]
    );
}

#[test]
fn a_peer_claiming_another_identity_is_rejected_and_its_session_dropped() {
    let mut shell = primary_with_b();
    shell.connect("b");
    let s = shell.session("b");
    let reply = HandshakeReply {
        replica: rid("mallory"),
        epoch: Epoch(1),
        log: ReplicaLog::single_epoch(Lsn(100), Epoch(1)),
    };
    assert_eq!(
        shell.engine.handle_handshake(&rid("b"), s, reply),
        Err(EngineError::IdentityMismatch {
            expected: rid("b"),
            claimed: rid("mallory")
        })
    );
    assert_eq!(shell.engine.active_session(&rid("b")), None);
    assert_eq!(shell.state("b"), ReplicaState::Disconnected);
    assert!(
        matches!(shell.pump().as_slice(), [Command::CancelExecution { session, .. }] if *session == s),
        "the impostor's connection is dropped"
    );
    shell.engine.handle_heartbeat(&rid("b"), Epoch(1)).unwrap();
    assert!(
        matches!(shell.pump().as_slice(), [Command::Connect { .. }]),
        "retried on heartbeat"
    );
}

#[test]
fn removing_a_replica_releases_its_pins_and_disconnects_it() {
    let mut shell = primary_with_b();
    shell.connect_and_handshake("b", 70);
    shell.grant("b", 0);
    let commands = shell.assign(assignment(1, CommitMode::BestEffort, &[]));
    assert!(
        matches!(commands.last(), Some(Command::Disconnect { reason, .. }) if reason == "replica_removed")
    );
    shell.assert_no_pins();
    assert_eq!(shell.engine.replicas().count(), 0);
}

#[test]
fn status_serializes_with_sessions_and_plans() {
    let mut shell = primary_with_b();
    shell.connect_and_handshake("b", 70);
    shell.grant("b", 0);
    let json = serde_json::to_value(shell.engine.status()).unwrap();
    assert_eq!(json["senders"][0]["state"], "catching_up");
    assert_eq!(json["senders"][0]["session"]["phase"], "catch_up");
    assert_eq!(
        json["senders"][0]["session"]["plan"]["kind"]["frozen_target"],
        100
    );
    assert_eq!(json["held_resources"].as_array().unwrap().len(), 1);
}

#[test]
fn a12_advancing_the_clock_keeps_messages_before_timers() {
    let mut config = Shell::config();
    config.budget.max_duration_ticks = Some(50);
    let mut shell = Shell::new(config);
    shell.wal(40, 100, 40, true);
    shell.assign(assignment(1, CommitMode::BestEffort, &[B]));
    shell.connect_and_handshake("b", 70);
    shell.grant("b", 0);
    assert_eq!(shell.engine.next_timer(), Some(Tick(51)));
    // A shell that slept past the deadline: the clock moves, the message is
    // handled at the new time, and the session it completes takes its timer
    // with it: nothing fires, nothing stale is logged.
    shell.engine.advance_clock(Tick(60));
    shell.progress("b", 100).unwrap();
    shell.tick(60);
    assert_eq!(shell.state("b"), ReplicaState::InSync);
    assert!(shell.event_detail("stale_timeout_ignored").is_empty());
    assert_eq!(shell.engine.next_timer(), None);
}

/// The failover of the divergence issue, on the engine alone: the new
/// primary ended epoch 1 at 200 and wrote 201-500 in epoch 2; `b` holds
/// epoch 1 up to 300 and has checkpointed up to `checkpoint`.
fn promoted_primary_and_divergent_b(mode: CommitMode, checkpoint: u64) -> (Shell, ReplicaLog) {
    let mut shell = Shell::new(Shell::config());
    shell.wal(0, 200, 0, true);
    shell.assign(assignment(2, mode, &[B]));
    shell.wal(0, 500, 0, true);
    assert_eq!(shell.engine.epochs().to_string(), "[1@1, 2@201]");
    let b = ReplicaLog {
        flushed: Lsn(300),
        checkpoint: Lsn(checkpoint),
        epochs: EpochHistory::single(Epoch(1)),
        committed: Lsn::ZERO,
        partial: None,
    };
    (shell, b)
}

/// A promoted primary (epoch 2 from 201) whose quorum (it and c) committed
/// up to 500, and b, which holds epoch 1 up to 300 and knows its entries up
/// to 250 were committed: the logs disagree from 201, below that. Nothing
/// is truncated or rebuilt. (Had b known only 150 committed, its tail past
/// the divergence is truncated as before.)
#[test]
fn a_divergence_below_what_the_replica_knows_committed_is_never_truncated() {
    for (known, behind) in [(250, true), (150, false)] {
        let mut shell = Shell::new(Shell::config());
        shell.wal(0, 200, 0, true);
        shell.assign(assignment(2, CommitMode::SyncQuorum, &[B, C]));
        shell.wal(0, 500, 0, true);
        shell.in_sync("c");
        shell.ack("c", 500, None).unwrap();
        assert_eq!(shell.engine.committed(), Lsn(500));
        let b = ReplicaLog {
            committed: Lsn(known),
            ..ReplicaLog::single_epoch(Lsn(300), Epoch(1))
        };
        shell.connect("b");
        let commands = shell.handshake_with("b", b);
        if behind {
            assert!(execute_plan(&commands).is_none(), "{commands:?}");
            assert_eq!(
                shell.event_detail("primary_behind"),
                ["primary_behind: vol1/b knows 250 committed, but its entry 201 is of epoch 1 and this primary's of 2: neither truncated nor rebuilt"]
            );
        } else {
            assert!(shell.event_detail("primary_behind").is_empty());
            let handshake = shell.event_detail("handshake");
            assert!(
                handshake.iter().any(|h| h.contains("divergent_tail")),
                "{handshake:?}"
            );
            assert!(!commands.is_empty(), "a plan starts");
        }
    }
}

#[test]
fn a_divergent_tail_is_truncated_to_the_divergence_point_before_anything_is_shipped() {
    let (mut shell, b) = promoted_primary_and_divergent_b(CommitMode::BestEffort, 150);
    shell.connect("b");
    shell.handshake_with("b", b);
    assert_eq!(
        shell.event_detail("handshake"),
        [
            "flushed=300 committed=500: divergent_tail: replica epoch 1 ends at 300, \
          primary epoch 2 starts at 201: truncate to 200, need 201-500, tail=0 head=500"
        ]
    );
    assert_eq!(
        shell.event_detail("plan_catchup"),
        ["ship 201-500, truncate to 200"]
    );
    let commands = shell.grant("b", 0);
    let plan = execute_plan(&commands).unwrap();
    assert!(matches!(
        plan.kind,
        PlanKind::CatchUp {
            start: Lsn(200),
            frozen_target: Lsn(500),
            truncate_to: Some(Lsn(200)),
            ..
        }
    ));
    // Nothing counts before the divergent tail is gone.
    assert_eq!(
        shell.progress("b", 300),
        Err(EngineError::TruncationPending {
            replica: rid("b"),
            to: Lsn(200)
        })
    );
    shell.truncated("b", 200).unwrap();
    assert_eq!(shell.engine.flushed(&rid("b")), Some(Lsn(200)));
    shell.progress("b", 500).unwrap();
    assert_eq!(shell.state("b"), ReplicaState::InSync);
    assert_eq!(shell.live[&rid("b")], Lsn(500));
    shell.assert_no_pins();
}

#[test]
fn a_divergent_tail_below_the_replicas_checkpoint_is_rebuilt() {
    let (mut shell, b) = promoted_primary_and_divergent_b(CommitMode::SyncAll, 250);
    shell.connect("b");
    shell.handshake_with("b", b);
    assert_eq!(
        shell.event_detail("handshake"),
        [
            "flushed=300 committed=200: divergent_tail: replica epoch 1 ends at 300, \
          primary epoch 2 starts at 201: truncate to 200, below the replica's checkpoint 250"
        ]
    );
    assert_eq!(shell.state("b"), ReplicaState::NeedsRebuild);
    assert_eq!(shell.event_detail("plan_rebuild_snapshot_tail").len(), 1);
}

#[test]
fn a_divergent_tail_under_sync_all_keeps_only_what_was_committed() {
    // Committed stalled at 200 while b was away: nothing to ship after the
    // truncation, live shipping sends 201-500.
    let (mut shell, b) = promoted_primary_and_divergent_b(CommitMode::SyncAll, 0);
    shell.connect("b");
    let commands = shell.handshake_with("b", b);
    let plan = execute_plan(&commands).expect("a truncation alone pins nothing");
    assert!(matches!(
        plan.kind,
        PlanKind::CatchUp {
            start: Lsn(200),
            frozen_target: Lsn(200),
            truncate_to: Some(Lsn(200)),
            ..
        }
    ));
    shell.truncated("b", 200).unwrap();
    assert_eq!(shell.state("b"), ReplicaState::InSync);
    assert_eq!(shell.live[&rid("b")], Lsn(200));
    shell.ack("b", 500, None).unwrap();
    assert_eq!(shell.engine.committed(), Lsn(500));
}

/// `b` in sync at 100 with its hold there, then away from tick 10.
fn b_away_at_100(retention: RetentionBudget) -> Shell {
    let mut config = Shell::config();
    config.retention = retention;
    let mut shell = Shell::new(config);
    shell.wal(40, 100, 40, true);
    shell.assign(assignment(1, CommitMode::BestEffort, &[B]));
    assert_eq!(
        shell.holds[&rid("b")],
        Lsn(40),
        "unknown position: the whole WAL"
    );
    shell.in_sync("b");
    assert_eq!(
        shell.holds[&rid("b")],
        Lsn(100),
        "in sync: at what it holds"
    );
    shell.tick(10);
    shell
        .engine
        .handle_disconnected(&rid("b"), &ExecutionFailure::Transient("peer reset".into()))
        .unwrap();
    shell.pump();
    assert_eq!(
        shell.engine.status().senders[0].retention,
        RetentionHold::Held {
            from: Lsn(100),
            away_since: Some(Tick(10))
        }
    );
    shell
}

#[test]
fn a4_a_replica_away_within_budget_keeps_its_hold_and_returns_by_catch_up() {
    let mut shell = b_away_at_100(RetentionBudget {
        max_bytes: Some(4096),
        max_away_ticks: Some(50),
    });
    shell.wal(40, 140, 40, true);
    // Exactly at both budgets: kept.
    shell.engine.handle_retention_usage(&[(rid("b"), 4096)]);
    shell.tick(59);
    assert_eq!(shell.holds[&rid("b")], Lsn(100));
    assert!(shell.event_detail("retention_budget_exceeded").is_empty());
    // The checkpointer can only recycle up to the hold.
    shell.wal(100, 140, 100, true);
    shell.heartbeat("b");
    shell.connect_and_handshake("b", 100);
    assert_eq!(
        shell.event_detail("handshake").last().unwrap(),
        "flushed=100 committed=140: gap_within_retention: need 101-140, tail=100 head=140"
    );
    shell.grant("b", 0);
    shell.progress("b", 140).unwrap();
    assert_eq!(shell.state("b"), ReplicaState::InSync);
    assert_eq!(shell.holds[&rid("b")], Lsn(140));
    shell.assert_no_pins();
}

#[test]
fn a6_a_replica_away_past_its_byte_budget_loses_its_hold_and_rebuilds() {
    let mut shell = b_away_at_100(RetentionBudget {
        max_bytes: Some(4096),
        max_away_ticks: None,
    });
    shell.wal(40, 140, 40, true);
    shell.engine.handle_retention_usage(&[(rid("b"), 4097)]);
    shell.pump();
    assert!(!shell.holds.contains_key(&rid("b")));
    assert_eq!(
        shell.event_detail("retention_budget_exceeded"),
        [
            "holds 4097 bytes of WAL after 100, budget 4096 bytes; hold released, \
          the replica will rebuild unless it returns before the WAL is recycled"
        ]
    );
    // Released, the checkpointer recycles past it; the return says why.
    shell.wal(120, 140, 120, true);
    shell.tick(30); // past the reconnect backoff
    shell.heartbeat("b");
    shell.connect_and_handshake("b", 100);
    assert_eq!(
        shell.event_detail("handshake").last().unwrap(),
        "flushed=100 committed=140: gap_beyond_retention: need 101-140, tail=120 head=140 \
         (its retention hold was released: retention_budget_exceeded: holds 4097 bytes of WAL \
         after 100, budget 4096 bytes)"
    );
    assert_eq!(shell.state("b"), ReplicaState::NeedsRebuild);
}

#[test]
fn a6_a_replica_away_past_its_time_budget_loses_its_hold() {
    let mut shell = b_away_at_100(RetentionBudget {
        max_bytes: None,
        max_away_ticks: Some(50),
    });
    shell.tick(59);
    assert!(shell.holds.contains_key(&rid("b")));
    let commands = shell.tick(60);
    assert!(matches!(
        commands.as_slice(),
        [Command::ReleaseRetention { reason, .. }] if reason.starts_with("retention_budget_exceeded: away for 50 ticks")
    ));
    assert!(!shell.holds.contains_key(&rid("b")));
    // Back by catch-up while the WAL still happens to be there: the hold returns.
    shell.heartbeat("b");
    shell.connect_and_handshake("b", 100);
    assert_eq!(shell.state("b"), ReplicaState::InSync);
    assert_eq!(shell.holds[&rid("b")], Lsn(100));
    assert_eq!(
        shell.engine.next_timer(),
        None,
        "in sync: no time budget runs"
    );
}

#[test]
fn in_sync_holds_follow_acks_and_an_unplaceable_hold_is_released() {
    let mut shell = primary_with_b();
    shell.in_sync("b");
    shell.wal(40, 130, 40, true);
    shell.ack("b", 120, None).unwrap();
    assert_eq!(
        shell.holds[&rid("b")],
        Lsn(100),
        "moved lazily, not per ack"
    );
    let commands = {
        shell.engine.handle_retention_usage(&[(rid("b"), 1 << 30)]);
        shell.pump()
    };
    assert!(matches!(
        commands.as_slice(),
        [Command::HoldRetention { from: Lsn(120), .. }]
    ));
    assert!(
        shell.event_detail("retention_budget_exceeded").is_empty(),
        "no budget applies while in sync"
    );
    shell
        .engine
        .handle_retention_failed(&rid("b"), "cannot pin from 120: tail is 125")
        .unwrap();
    shell.pump();
    assert!(!shell.holds.contains_key(&rid("b")));
    assert_eq!(
        shell.engine.status().senders[0].retention,
        RetentionHold::Released {
            reason: "hold_failed: cannot pin from 120: tail is 125".into()
        }
    );
    // Leaving sync before the next report: it is held where it acknowledged.
    shell.tick(5);
    shell.ack("b", 130, None).unwrap();
    shell
        .engine
        .handle_disconnected(&rid("b"), &ExecutionFailure::Transient("peer reset".into()))
        .unwrap();
    shell.pump();
    assert_eq!(shell.holds[&rid("b")], Lsn(130));
    assert_eq!(
        shell.engine.status().senders[0].retention,
        RetentionHold::Held {
            from: Lsn(130),
            away_since: Some(Tick(5))
        },
        "away: its time budget runs"
    );
}

#[test]
fn an_in_sync_replica_without_a_hold_gets_one_at_the_next_report() {
    let mut shell = primary_with_b();
    shell.in_sync("b");
    shell.wal(40, 130, 40, true);
    shell
        .engine
        .handle_retention_failed(&rid("b"), "cannot pin from 100: tail is 105")
        .unwrap();
    shell.pump();
    assert!(!shell.holds.contains_key(&rid("b")));
    shell.ack("b", 130, None).unwrap();
    shell.engine.handle_retention_usage(&[]);
    shell.pump();
    assert_eq!(shell.holds[&rid("b")], Lsn(130));
}

#[test]
fn a_hold_released_past_the_budget_stays_released_while_away() {
    let mut shell = b_away_at_100(RetentionBudget {
        max_bytes: Some(4096),
        max_away_ticks: None,
    });
    shell.engine.handle_retention_usage(&[(rid("b"), 4097)]);
    shell.pump();
    assert!(!shell.holds.contains_key(&rid("b")));
    // Failed reconnects do not bring it back.
    shell.tick(30);
    shell.heartbeat("b");
    shell
        .engine
        .handle_disconnected(&rid("b"), &ExecutionFailure::Transient("refused".into()))
        .unwrap();
    shell.pump();
    assert!(!shell.holds.contains_key(&rid("b")));
    assert!(matches!(
        shell.engine.status().senders[0].retention,
        RetentionHold::Released { .. }
    ));
}

/// Sessions the engine started for `server` so far (repeats included).
fn sessions_created(shell: &Shell, server: &str) -> u64 {
    let id = rid(server);
    shell
        .engine
        .log()
        .events()
        .filter(|e| e.event == "session_created" && e.replica.as_ref() == Some(&id))
        .map(|e| 1 + e.repeats)
        .sum()
}

#[test]
fn a_replica_whose_storage_fails_is_retried_with_backoff_and_named_by_barriers() {
    let mut config = Shell::config();
    config.retry = RetryPolicy {
        network: Backoff {
            first_ticks: 2,
            max_ticks: 20,
        },
        storage: Backoff {
            first_ticks: 20,
            max_ticks: 200,
        },
        rebuild: Backoff {
            first_ticks: 20,
            max_ticks: 200,
        },
    };
    config.barrier_timeout_ticks = 50;
    let mut shell = Shell::new(config);
    shell.assign(assignment(1, CommitMode::SyncAll, &[B]));
    shell.in_sync("b");
    shell.wal(0, 10, 0, true);
    let before = sessions_created(&shell, "b");
    let enospc = "storage failure: wal write: No space left on device (os error 28)";
    shell
        .engine
        .handle_disconnected(&rid("b"), &ExecutionFailure::ReplicaStorage(enospc.into()))
        .unwrap();
    shell.pump();
    let barrier = shell.barrier(10);
    // The replica answers every heartbeat, and every hello says the same.
    for t in 1..=1000 {
        shell.engine.handle_tick(Tick(t));
        shell.pump();
        shell.heartbeat("b");
        if let Some(s) = shell.engine.active_session(&rid("b")) {
            let failure = ExecutionFailure::ReplicaStorage(enospc.into());
            shell
                .engine
                .handle_execution_failed(&rid("b"), s, failure)
                .unwrap();
            shell.pump();
        }
    }
    // Retried at 20, 60, 140, 300, 500, 700, 900 ticks: not once per heartbeat.
    let retries = sessions_created(&shell, "b") - before;
    assert_eq!(
        retries,
        7,
        "{:#?}",
        shell.engine.log().events().collect::<Vec<_>>()
    );
    let failure = shell.engine.status().senders[0].failure.clone().unwrap();
    assert_eq!(
        (failure.cause, failure.attempts, failure.retry_at),
        (FailureCause::ReplicaStorage, 8, Tick(1100))
    );
    // Writes fail with the real reason.
    let error = shell.barriers[&barrier].clone().unwrap_err().to_string();
    assert_eq!(
        error,
        format!(
            "barrier at 10 timed out (sync_all): committed=0, lagging=[vol1/b (Disconnected, \
             replica storage failed: {enospc})]"
        )
    );
    // Loudly, once per failure, folded into one line.
    let logged: Vec<_> = shell
        .engine
        .log()
        .decisions()
        .filter(|e| e.event == "replica_storage_failed")
        .collect();
    assert_eq!(logged.len(), 1, "{logged:#?}");
    assert_eq!(logged[0].detail, enospc);
    assert_eq!(logged[0].repeats, 7, "8 failures, one line");
    // An operator may retry at once. In sync is not enough to forget the
    // failures (a full disk still answers hellos); acknowledged writes are.
    shell.engine.handle_retry_now(&rid("b")).unwrap();
    shell.heartbeat("b");
    shell.connect_and_handshake("b", 0);
    assert_eq!(shell.state("b"), ReplicaState::InSync);
    assert_eq!(
        shell.engine.status().senders[0]
            .failure
            .as_ref()
            .unwrap()
            .attempts,
        8
    );
    shell.ack("b", 10, None).unwrap();
    assert_eq!(shell.engine.status().senders[0].failure, None);
}

#[test]
fn a11_one_barrier_request_is_in_flight_per_replica() {
    let mut shell = Shell::new(Shell::config());
    shell.assign(assignment(1, CommitMode::SyncAll, &[B]));
    shell.in_sync("b");
    shell.wal(0, 10, 0, true);
    let first = shell.barrier(10);
    shell.wal(0, 20, 0, true);
    let second = shell.barrier(20);
    let third = shell.barrier(20);
    assert_eq!(shell.barrier_requests, [(rid("b"), first)]);
    // Its ack commits what it covers and frees the slot for the newest waiting.
    shell.ack("b", 10, Some(first)).unwrap();
    assert_eq!(shell.barriers[&first], Ok(Lsn(10)));
    assert_eq!(shell.barrier_requests[1..], [(rid("b"), third)]);
    // Plain acks commit too; a barrier resolved without its named ack frees
    // the slot all the same (the ack, when it comes, changes nothing).
    shell.ack("b", 20, None).unwrap();
    assert_eq!(shell.barriers[&second], Ok(Lsn(20)));
    assert_eq!(shell.barriers[&third], Ok(Lsn(20)));
    shell.wal(0, 30, 0, true);
    let fourth = shell.barrier(30);
    assert_eq!(shell.barrier_requests[2..], [(rid("b"), fourth)]);
    shell.wal(0, 31, 0, true);
    let fifth = shell.barrier(31);
    assert_eq!(shell.barrier_requests.len(), 3, "fourth is still in flight");
    // Both time out (fifth is asked about as fourth fails, then fails too);
    // a new barrier is asked about at once.
    shell.tick(100);
    assert!(shell.barriers[&fourth].is_err() && shell.barriers[&fifth].is_err());
    shell.ack("b", 31, Some(third)).unwrap();
    shell.wal(0, 32, 0, true);
    let sixth = shell.barrier(32);
    assert_eq!(
        shell.barrier_requests[3..],
        [(rid("b"), fifth), (rid("b"), sixth)]
    );
}

/// Every live session an assignment invalidates is cancelled by command, in
/// every stage, so the shell never compares epochs or endpoints itself.
#[test]
fn an_assignment_cancels_every_session_it_invalidates() {
    let cancelled = |commands: &[Command], s: SessionId, why: &str| {
        commands.iter().any(|c| {
            matches!(c, Command::CancelExecution { session, reason, .. } if *session == s && reason == why)
        })
    };
    // Connecting, in a new epoch.
    let mut shell = primary_with_b();
    let s = shell.session("b");
    let commands = shell.assign(assignment(2, CommitMode::BestEffort, &[B]));
    assert!(cancelled(&commands, s, "epoch_bumped"), "{commands:?}");
    assert!(
        matches!(
            commands.last(),
            Some(Command::Connect {
                epoch: Epoch(2),
                ..
            })
        ),
        "the cancel comes before the new session's connect: {commands:?}"
    );
    // Connected, waiting for a handshake, at a new address.
    let mut shell = primary_with_b();
    shell.connect("b");
    let s = shell.session("b");
    let commands = shell.assign(assignment(
        1,
        CommitMode::BestEffort,
        &[("b", "10.0.0.9:7000", 2)],
    ));
    assert!(cancelled(&commands, s, "endpoint_changed"), "{commands:?}");
    // Waiting for its grants, removed from the assignment.
    let mut shell = primary_with_b();
    shell.connect_and_handshake("b", 70);
    let s = shell.session("b");
    let commands = shell.assign(assignment(1, CommitMode::BestEffort, &[]));
    assert!(cancelled(&commands, s, "replica_removed"), "{commands:?}");
    // Unchanged: nothing is cancelled.
    let mut shell = primary_with_b();
    shell.connect_and_handshake("b", 70);
    let commands = shell.assign(assignment(1, CommitMode::BestEffort, &[B]));
    assert!(
        !commands
            .iter()
            .any(|c| matches!(c, Command::CancelExecution { .. })),
        "{commands:?}"
    );
}

/// A replica that has acknowledged a barrier's LSN as durable is not asked
/// about it again while the barrier waits on another replica: its answer
/// could not move the barrier, and the request cost a round trip per write.
#[test]
fn a11_a_replica_durable_past_a_barrier_is_not_asked_again() {
    let mut shell = Shell::new(Shell::config());
    shell.assign(assignment(1, CommitMode::SyncAll, &[B, C]));
    shell.in_sync("b");
    shell.in_sync("c");
    shell.wal(0, 10, 0, true);
    let first = shell.barrier(10);
    assert_eq!(
        shell.barrier_requests.len(),
        2,
        "both asked: {:?}",
        shell.barrier_requests
    );
    shell.ack("b", 10, Some(first)).unwrap();
    assert!(!shell.barriers.contains_key(&first), "waits on c");
    assert_eq!(shell.barrier_requests.len(), 2, "b is not asked again");
    // A newer barrier past what b holds is asked of b (c's request is
    // still in flight).
    shell.wal(0, 20, 0, true);
    let second = shell.barrier(20);
    assert_eq!(shell.barrier_requests[2..], [(rid("b"), second)]);
    shell.ack("c", 20, Some(first)).unwrap();
    assert_eq!(shell.barriers[&first], Ok(Lsn(10)), "b bounds the commit");
    assert!(!shell.barriers.contains_key(&second), "waits on b");
}

/// A FLUSH waiting while a replica is away and comes back: under
/// sync_quorum the replica that stayed is asked to learn the commit; the
/// one that returns starts from what its hello said it knew, and is asked
/// only if that is short of the FLUSH's.
#[test]
fn a_returning_replica_starts_from_what_its_hello_said_it_knew() {
    for knew in [10, 20] {
        let mut shell = Shell::new(Shell::config());
        shell.assign(assignment(1, CommitMode::SyncQuorum, &[B, C]));
        shell.in_sync("b");
        shell.in_sync("c");
        shell.wal(0, 10, 0, true);
        shell.engine.handle_local_durable(Lsn(0), Lsn(10));
        let first = shell.barrier(10);
        shell.ack_knowing("b", 10, Some(first), 0).unwrap();
        shell.ack_knowing("c", 10, Some(first), 0).unwrap();
        assert_eq!(shell.barriers[&first], Ok(Lsn(10)));
        shell
            .engine
            .handle_disconnected(&rid("b"), &ExecutionFailure::Transient("peer reset".into()))
            .unwrap();
        shell.pump();
        // Written while b is away, committed by the primary and c.
        shell.wal(0, 20, 0, true);
        shell.engine.handle_local_durable(Lsn(10), Lsn(20));
        let write = shell.barrier(20);
        shell.ack_knowing("c", 20, Some(write), 10).unwrap();
        assert_eq!(shell.barriers[&write], Ok(Lsn(20)));
        // A FLUSH: c must learn 20 is committed; it is asked, and does not
        // answer yet.
        let flush = shell.barrier(20);
        let asked = shell.barrier_requests.len();
        assert_eq!(shell.barrier_requests.last(), Some(&(rid("c"), flush)));
        // b is back (its retry is due well before the FLUSH's deadline),
        // having learned 20 was committed or not.
        shell.tick(50);
        assert!(!shell.barriers.contains_key(&flush));
        shell.heartbeat("b");
        shell.connect("b");
        shell.handshake_with(
            "b",
            ReplicaLog {
                flushed: Lsn(10),
                checkpoint: Lsn::ZERO,
                epochs: shell.epochs.through(Lsn(10)),
                committed: Lsn(knew),
                partial: None,
            },
        );
        shell.grant("b", 0);
        shell.progress("b", 20).unwrap();
        assert_eq!(shell.state("b"), ReplicaState::InSync);
        if knew == 20 {
            // The primary and b are a quorum that knows.
            assert_eq!(shell.barriers[&flush], Ok(Lsn(20)), "knew {knew}");
            assert_eq!(shell.barrier_requests.len(), asked);
        } else {
            assert!(!shell.barriers.contains_key(&flush), "knew {knew}");
            assert_eq!(shell.barrier_requests.last(), Some(&(rid("b"), flush)));
            shell.ack_knowing("b", 20, Some(flush), 20).unwrap();
            assert_eq!(shell.barriers[&flush], Ok(Lsn(20)));
        }
    }
}
