//! When a volume may sleep: `Engine::quiescent`, case by case, and when
//! all it waits for is a replica's retry (`Engine::idle_until_retry`). A
//! shell stops waking on its own only while the first holds, and skips
//! heartbeats only until the time the second says, so each case that must
//! keep it awake is here.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use support::*;
use walship_engine::*;

const B: (&str, &str, u64) = ("b", "10.0.0.2:7000", 1);
const C: (&str, &str, u64) = ("c", "10.0.0.3:7000", 1);

/// sync_all with b and c in sync, holding a durable, committed log to 50.
fn settled() -> Shell {
    let mut shell = Shell::new(Shell::config());
    shell.assign(assignment(1, CommitMode::SyncAll, &[B, C]));
    shell.in_sync("b");
    shell.in_sync("c");
    shell.wal(0, 50, 0, true);
    shell.ack("b", 50, None).unwrap();
    shell.ack("c", 50, None).unwrap();
    shell
}

#[test]
fn a_volume_whose_replicas_hold_everything_committed_is_quiescent() {
    let shell = settled();
    assert_eq!(shell.engine.committed(), Lsn(50));
    assert!(shell.engine.quiescent());
    assert_eq!(shell.engine.next_timer(), None);
}

#[test]
fn a_write_wakes_the_volume_until_every_replica_holds_it() {
    let mut shell = settled();
    shell.wal(0, 51, 0, true);
    assert!(!shell.engine.quiescent(), "a write not yet shipped");
    shell.ack("b", 51, None).unwrap();
    assert!(!shell.engine.quiescent(), "c does not hold it yet");
    shell.ack("c", 51, None).unwrap();
    assert!(
        shell.engine.quiescent(),
        "both hold it, and it is committed"
    );
}

#[test]
fn a_write_not_yet_durable_on_the_primary_keeps_the_volume_awake() {
    let mut shell = settled();
    // Appended (the head moved) but the primary's own sync has not run.
    shell
        .engine
        .handle_wal_state(WalState {
            head: Lsn(51),
            tail: Lsn(0),
            checkpoint: Lsn(0),
            checkpoint_trusted: true,
            newest_epoch: shell.epochs.newest(),
        })
        .unwrap();
    shell.pump();
    shell.ack("b", 51, None).unwrap();
    shell.ack("c", 51, None).unwrap();
    assert!(!shell.engine.quiescent(), "not locally durable");
    shell.engine.handle_local_durable(Lsn(50), Lsn(51));
    shell.pump();
    assert!(shell.engine.quiescent());
}

#[test]
fn a_waiting_barrier_and_its_timer_keep_the_volume_awake() {
    let mut shell = settled();
    shell.wal(0, 52, 0, true);
    let barrier = shell.barrier(52);
    assert!(
        shell.engine.next_timer().is_some(),
        "the barrier's deadline"
    );
    shell.ack("b", 52, Some(barrier)).unwrap();
    assert!(!shell.engine.quiescent(), "the barrier waits for c");
    shell.ack("c", 52, Some(barrier)).unwrap();
    assert_eq!(shell.barriers[&barrier], Ok(Lsn(52)));
    assert_eq!(shell.engine.next_timer(), None, "its timer cancelled");
    assert!(shell.engine.quiescent());
}

#[test]
fn a_lost_replica_keeps_the_volume_awake_until_it_is_back_in_sync() {
    let mut shell = settled();
    shell
        .engine
        .handle_disconnected(&rid("c"), &ExecutionFailure::Transient("peer reset".into()))
        .unwrap();
    shell.pump();
    assert!(
        !shell.engine.quiescent(),
        "c must be retried: heartbeats drive it"
    );
    shell.engine.handle_retry_now(&rid("c")).unwrap();
    shell.heartbeat("c");
    shell.connect_and_handshake("c", 50);
    assert_eq!(shell.state("c"), ReplicaState::InSync);
    assert!(shell.engine.quiescent());
}

#[test]
fn a_volume_with_no_replicas_sleeps_once_its_log_is_durable() {
    let mut shell = Shell::new(Shell::config());
    shell.assign(assignment(1, CommitMode::BestEffort, &[]));
    shell.wal(0, 10, 0, true);
    assert!(shell.engine.quiescent());
}

/// `c` lost (its connection refused): the failure's backoff armed.
fn c_away() -> Shell {
    let mut shell = settled();
    shell.tick(100);
    shell
        .engine
        .handle_disconnected(
            &rid("c"),
            &ExecutionFailure::Transient("connection refused".into()),
        )
        .unwrap();
    shell.pump();
    shell
}

#[test]
fn a_volume_in_sync_waits_for_no_retry() {
    let shell = settled();
    assert!(shell.engine.quiescent());
    assert_eq!(shell.engine.idle_until_retry(|_| false), None);
}

#[test]
fn a_volume_waiting_only_for_a_replicas_retry_needs_no_heartbeat_before_it() {
    let mut shell = c_away();
    assert!(!shell.engine.quiescent());
    let retry = shell
        .engine
        .idle_until_retry(|_| false)
        .expect("all it waits for is c's retry");
    assert!(retry > shell.engine.now(), "{retry:?}");
    // A heartbeat before then starts nothing: the backoff refuses it.
    let away = shell.state("c");
    shell.heartbeat("c");
    assert_eq!(shell.state("c"), away);
    assert_eq!(shell.engine.idle_until_retry(|_| false), Some(retry));
    // At the retry time, the heartbeat starts a session: it runs now.
    shell.tick(retry.get());
    shell.heartbeat("c");
    assert_eq!(shell.state("c"), ReplicaState::Connecting);
    assert_eq!(
        shell.engine.idle_until_retry(|_| false),
        None,
        "a session runs"
    );
}

#[test]
fn a_write_with_a_replica_away_keeps_the_heartbeats() {
    let mut shell = c_away();
    assert!(shell.engine.idle_until_retry(|_| false).is_some());
    shell.wal(0, 51, 0, true);
    assert_eq!(shell.engine.idle_until_retry(|_| false), None, "b lacks it");
    shell.ack("b", 51, None).unwrap();
    assert_eq!(
        shell.engine.idle_until_retry(|_| false),
        None,
        "not committed without c (sync_all)"
    );
    shell.barrier(51);
    assert_eq!(
        shell.engine.idle_until_retry(|_| false),
        None,
        "a barrier waits"
    );
}

#[test]
fn a_replica_the_shell_retries_when_its_node_answers_waits_for_no_time() {
    let shell = c_away();
    let c = rid("c");
    assert_eq!(
        shell.engine.idle_until_retry(|r| *r == c),
        Some(Tick(u64::MAX)),
        "only c waits, and the shell says when to retry it"
    );
    assert!(
        matches!(shell.engine.idle_until_retry(|_| false), Some(t) if t < Tick(u64::MAX)),
        "its own retry time, when the shell does not retry it"
    );
}
