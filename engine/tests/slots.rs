//! Rebuild slots on the engine alone: a rebuild waits for one of the
//! node's slots before it pins anything, for as long as the queue takes
//! (no reservation deadline runs meanwhile), then reserves as before; a
//! queued session that ends is cancelled like any other.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use support::*;
use walship_engine::*;

const B: (&str, &str, u64) = ("b", "10.0.0.2:7000", 1);

fn queued_rebuild() -> Shell {
    let mut shell = Shell::new(EngineConfig {
        rebuild_slots: true,
        ..Shell::config()
    });
    shell.wal(90, 100, 90, true);
    shell.assign(assignment(1, CommitMode::BestEffort, &[B]));
    let commands = shell.connect_and_handshake("b", 10);
    assert!(
        commands.iter().any(
            |c| matches!(c, Command::AwaitRebuildSlot { replica, .. } if *replica == rid("b"))
        ),
        "{commands:?}"
    );
    assert!(
        !commands
            .iter()
            .any(|c| matches!(c, Command::AcquireResources { .. })),
        "nothing is pinned while it waits: {commands:?}"
    );
    shell
}

#[test]
fn a_queued_rebuild_waits_without_a_deadline_then_reserves() {
    let mut shell = queued_rebuild();
    assert_eq!(shell.state("b"), ReplicaState::NeedsRebuild);
    assert_eq!(shell.events("b").last(), Some(&"rebuild_queued"));
    // Far past any reservation deadline: still waiting, nothing failed.
    shell.tick(100_000);
    assert!(!shell.events("b").contains(&"pin_reservation_timeout"));
    let status = serde_json::to_value(shell.engine.status()).unwrap();
    assert!(status.to_string().contains("\"queued\""), "{status}");
    // Meanwhile the checkpoint moved: the plan is made again when the
    // slot comes, against the snapshot there is now.
    shell.wal(95, 120, 110, true);
    let session = shell.session("b");
    shell
        .engine
        .handle_rebuild_slot(&rid("b"), session)
        .unwrap();
    let commands = shell.pump();
    assert!(
        matches!(&commands[..], [Command::AcquireResources { requests, .. }]
            if requests.first() == Some(&ResourceRequest::Snapshot { at: Lsn(110) })),
        "{commands:?}"
    );
    shell.grant("b", 0);
    assert_eq!(shell.state("b"), ReplicaState::Rebuilding);
    // A second slot for the same session is out of phase.
    assert!(shell
        .engine
        .handle_rebuild_slot(&rid("b"), session)
        .is_err());
}

#[test]
fn a_queued_session_that_ends_is_cancelled_and_a_late_slot_refused() {
    let mut shell = queued_rebuild();
    let session = shell.session("b");
    // The replica goes away while it waits.
    shell
        .engine
        .handle_disconnected(&rid("b"), &ExecutionFailure::Transient("reset".into()))
        .unwrap();
    shell.pump();
    assert!(
        shell.cancelled.contains(&session),
        "the shell drops its wait"
    );
    assert!(matches!(
        shell.engine.handle_rebuild_slot(&rid("b"), session),
        Err(EngineError::StaleSession { .. })
    ));
    shell.assert_no_pins();
}
