//! Convergence on the engine alone: a replica behind is watched from the
//! shell's lag reports; one that does not gain on the ingest is said to be
//! `not_converging` and escalated a step per window (boost, then opt-in
//! backpressure on the volume's writes); caught up, its steps are undone;
//! gone, they are undone without a word of convergence.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use support::*;
use walship_engine::*;

const B: (&str, &str, u64) = ("b", "10.0.0.2:7000", 1);
const MIB: u64 = 1 << 20;

fn policy() -> ConvergencePolicy {
    ConvergencePolicy {
        window_ticks: 100,
        converge_within_ticks: Some(1280),
        caught_up_bytes: MIB,
        boost: true,
        backpressure_percent: Some(50),
        ticks_per_second: 128,
    }
}

fn shell(policy: ConvergencePolicy) -> Shell {
    let mut shell = Shell::new(EngineConfig {
        convergence: policy,
        ..Shell::config()
    });
    shell.wal(0, 1000, 0, true);
    shell.assign(assignment(1, CommitMode::BestEffort, &[B]));
    shell
}

/// A replica catching up from 100 to the frozen target 1000.
fn catching_up(policy: ConvergencePolicy) -> Shell {
    let mut shell = shell(policy);
    shell.connect_and_handshake("b", 100);
    shell.grant("b", 0);
    assert_eq!(shell.state("b"), ReplicaState::CatchingUp);
    shell
}

/// Reports every 20 ticks from `from` to `to` (inclusive), each covering
/// the 20 ticks before it (none at 0): the volume ingests `ingest` bytes
/// a tick, the replica's backlog moves by `growth` a tick from `backlog`.
/// Returns the commands and the last figures.
fn report(
    shell: &mut Shell,
    (from, to): (u64, u64),
    (ingested, ingest): (u64, u64),
    (backlog, growth): (u64, i64),
) -> (Vec<Command>, u64, u64) {
    let mut commands = Vec::new();
    let (mut ingested, mut backlog) = (ingested, backlog);
    for t in (from..=to).step_by(20) {
        if t > 0 {
            ingested += 20 * ingest;
            backlog = backlog.saturating_add_signed(20 * growth);
        }
        commands.extend(shell.tick(t));
        shell.engine.handle_lag(ingested, &[(rid("b"), backlog)]);
        commands.extend(shell.pump());
    }
    (commands, ingested, backlog)
}

fn boosts(commands: &[Command]) -> Vec<bool> {
    commands
        .iter()
        .filter_map(|c| match c {
            Command::BoostRecovery { boost, .. } => Some(*boost),
            _ => None,
        })
        .collect()
}

fn limits(commands: &[Command]) -> Vec<Option<u64>> {
    commands
        .iter()
        .filter_map(|c| match c {
            Command::LimitWrites { bytes_per_second } => Some(*bytes_per_second),
            _ => None,
        })
        .collect()
}

fn convergence(shell: &Shell) -> Option<ConvergenceStatus> {
    let status = shell.engine.status();
    status.senders[0].convergence.clone()
}

/// 10 MiB/s at 128 ticks a second.
const TEN_MIB_S: u64 = 10 * MIB / 128;

#[test]
fn a_catch_up_behind_the_ingest_is_boosted_then_backpressured_then_released() {
    let mut shell = catching_up(policy());
    // Ingest 10 MiB/s, the replica takes 5 MiB/s: it falls behind.
    // Judged from tick 100 (a whole window), said at 160 (the verdict
    // held half a window).
    let (commands, ingested, backlog) = report(
        &mut shell,
        (0, 160),
        (0, TEN_MIB_S),
        (100 * MIB, TEN_MIB_S as i64 / 2),
    );
    assert_eq!(
        shell.events("b")[shell.events("b").len() - 2..],
        ["not_converging", "convergence_escalated"]
    );
    let said = shell.event_detail("not_converging");
    assert_eq!(
        said,
        ["catch-up 5.0 MiB/s <= ingest 10.0 MiB/s, backlog 111411200 bytes"]
    );
    assert!(shell.event_detail("convergence_escalated")[0].starts_with("boost: "));
    assert_eq!(boosts(&commands), [true]);
    assert!(limits(&commands).is_empty());
    let status = convergence(&shell).unwrap();
    assert_eq!(
        (status.converging, status.step, status.eta_seconds),
        (Some(false), ConvergenceStep::Boost, None)
    );
    // Boosted, it still falls behind: a window later, backpressure at
    // half of what it drains.
    let (commands, ingested, backlog) = report(
        &mut shell,
        (180, 260),
        (ingested, TEN_MIB_S),
        (backlog, TEN_MIB_S as i64 / 2),
    );
    assert_eq!(limits(&commands), [Some(5 * MIB / 2)]);
    assert!(boosts(&commands).is_empty());
    assert_eq!(shell.engine.write_limit(), Some(5 * MIB / 2));
    assert!(shell.event_detail("convergence_escalated")[1]
        .starts_with("backpressure: the volume's writes held to 50% of 5.0 MiB/s"));
    // Writes held back, it gains: `converging` said once, steps kept.
    let (commands, ingested, _) = report(
        &mut shell,
        (280, 460),
        (ingested, TEN_MIB_S / 4),
        (backlog, -(TEN_MIB_S as i64)),
    );
    assert!(boosts(&commands).is_empty());
    // The limit follows what it drains (now 12.5 MiB/s), still held.
    assert_eq!(shell.engine.write_limit(), Some(25 * MIB / 4));
    assert!(limits(&commands).iter().all(Option::is_some));
    assert_eq!(
        shell
            .events("b")
            .iter()
            .filter(|e| **e == "converging")
            .count(),
        1
    );
    assert_eq!(
        convergence(&shell).unwrap().step,
        ConvergenceStep::Backpressure
    );
    // Caught up: converged, boost off, writes go.
    shell.tick(480);
    // (Let go at half of `caught_up_bytes`: at the edge it stays watched.)
    shell.engine.handle_lag(ingested, &[(rid("b"), MIB)]);
    assert!(boosts(&shell.pump()).is_empty());
    assert!(convergence(&shell).is_some());
    assert!(!shell.events("b").contains(&"converged"));
    shell.tick(500);
    shell.engine.handle_lag(ingested, &[(rid("b"), MIB / 2)]);
    let commands = shell.pump();
    assert_eq!(boosts(&commands), [false]);
    assert_eq!(limits(&commands), [None]);
    assert_eq!(shell.events("b").last(), Some(&"converged"));
    assert_eq!(convergence(&shell), None);
    assert_eq!(shell.engine.write_limit(), None);
}

#[test]
fn a_replica_in_sync_falling_behind_skips_the_boost_and_a_disconnect_undoes_backpressure() {
    let mut shell = shell(policy());
    shell.in_sync("b");
    let (commands, ..) = report(
        &mut shell,
        (0, 160),
        (0, TEN_MIB_S),
        (10 * MIB, TEN_MIB_S as i64 / 2),
    );
    assert!(shell.event_detail("not_converging")[0].starts_with("live 5.0 MiB/s <= ingest"));
    assert!(
        boosts(&commands).is_empty(),
        "live shipping takes no budget"
    );
    assert_eq!(limits(&commands), [Some(5 * MIB / 2)]);
    shell
        .engine
        .handle_disconnected(&rid("b"), &ExecutionFailure::Transient("reset".into()))
        .unwrap();
    shell.pump();
    shell.tick(180);
    shell.engine.handle_lag(0, &[(rid("b"), 100 * MIB)]);
    let commands = shell.pump();
    assert_eq!(limits(&commands), [None]);
    assert!(boosts(&commands).is_empty());
    assert!(!shell.events("b").contains(&"converged"));
    assert_eq!(convergence(&shell), None);
}

#[test]
fn a_converging_catch_up_is_watched_in_silence_and_a_slow_one_is_named() {
    let mut shell = catching_up(policy());
    // 10 MiB/s net gain on 50 MiB: 5 s, within the 10 s budget.
    let (commands, ..) = report(
        &mut shell,
        (0, 100),
        (0, TEN_MIB_S),
        (50 * MIB + 100 * TEN_MIB_S, -(TEN_MIB_S as i64)),
    );
    assert!(boosts(&commands).is_empty() && limits(&commands).is_empty());
    let status = convergence(&shell).unwrap();
    assert_eq!(
        (
            status.converging,
            status.eta_seconds,
            status.ingest_rate,
            status.drain_rate
        ),
        (Some(true), Some(5), Some(10 * MIB), Some(20 * MIB))
    );
    assert!(!shell.events("b").iter().any(|e| e.contains("converg")));
    // The same gain on 200 MiB takes 20 s: past the budget.
    let mut shell = catching_up(policy());
    report(
        &mut shell,
        (0, 160),
        (0, TEN_MIB_S),
        (200 * MIB + 100 * TEN_MIB_S, -(TEN_MIB_S as i64)),
    );
    assert_eq!(
        shell.event_detail("not_converging"),
        ["catch-up 20.0 MiB/s > ingest 10.0 MiB/s, but backlog 204800000 bytes takes 19 s, budget 10 s"]
    );
}

#[test]
fn with_no_step_left_the_replica_stays_not_converging() {
    let mut shell = catching_up(ConvergencePolicy {
        boost: false,
        backpressure_percent: None,
        ..policy()
    });
    let (commands, ..) = report(
        &mut shell,
        (0, 1000),
        (0, TEN_MIB_S),
        (10 * MIB, TEN_MIB_S as i64 / 2),
    );
    assert!(boosts(&commands).is_empty() && limits(&commands).is_empty());
    assert_eq!(
        shell
            .events("b")
            .iter()
            .filter(|e| **e == "not_converging")
            .count(),
        1
    );
    assert!(!shell.events("b").contains(&"convergence_escalated"));
    let status = convergence(&shell).unwrap();
    assert_eq!(
        (status.converging, status.step),
        (Some(false), ConvergenceStep::Watching)
    );
}

#[test]
fn a_verdict_at_the_edge_is_said_only_once_it_holds_half_a_window() {
    let mut shell = catching_up(policy());
    // Keeping pace for a window (never converging at that), then a
    // burst of progress: not converging for one judgement, nothing said.
    let (_, ingested, backlog) = report(&mut shell, (0, 100), (0, TEN_MIB_S), (100 * MIB, 0));
    assert_eq!(convergence(&shell).unwrap().converging, Some(false));
    report(
        &mut shell,
        (120, 400),
        (ingested, TEN_MIB_S),
        (backlog - 40 * MIB, -(TEN_MIB_S as i64)),
    );
    assert!(!shell.events("b").iter().any(|e| e.contains("converg")));
    assert_eq!(convergence(&shell).unwrap().converging, Some(true));
}

#[test]
fn a_small_backlog_and_a_rebuilding_replica_are_not_watched() {
    let mut shell = catching_up(policy());
    report(&mut shell, (0, 200), (0, TEN_MIB_S), (MIB, 0));
    assert_eq!(convergence(&shell), None);
    // A replica that needs a rebuild: nothing to watch.
    let mut shell = shell_needing_rebuild();
    report(
        &mut shell,
        (0, 200),
        (0, TEN_MIB_S),
        (100 * MIB, TEN_MIB_S as i64),
    );
    assert_eq!(convergence(&shell), None);
    assert!(!shell.events("b").contains(&"not_converging"));
}

fn shell_needing_rebuild() -> Shell {
    let mut shell = Shell::new(EngineConfig {
        convergence: policy(),
        ..Shell::config()
    });
    shell.wal(500, 1000, 500, true);
    shell.assign(assignment(1, CommitMode::BestEffort, &[B]));
    shell.connect_and_handshake("b", 100);
    assert!(matches!(
        shell.state("b"),
        ReplicaState::NeedsRebuild | ReplicaState::Rebuilding
    ));
    shell
}
