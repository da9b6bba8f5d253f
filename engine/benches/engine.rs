//! Engine costs: assignment → plan, and per-event handling.
//!
//! Baseline in the same run: the bare decision (`classify_handshake` +
//! building the plan's resource list) with no engine around it, so the
//! engine's bookkeeping overhead shows as a ratio.
#![allow(clippy::unwrap_used, missing_docs)]

use criterion::{criterion_group, criterion_main, BatchSize, Criterion};
use std::hint::black_box;
use walship_engine::*;

fn rid(server: &str) -> ReplicaId {
    ReplicaId::new("vol", server).unwrap()
}

fn assignment(epoch: u64, mode: CommitMode, servers: &[&str]) -> Assignment {
    Assignment {
        epoch: Epoch(epoch),
        commit_mode: mode,
        replicas: servers
            .iter()
            .map(|s| ReplicaAssignment {
                id: rid(s),
                endpoint: Endpoint::new(format!("{s}:7000"), 1),
            })
            .collect(),
    }
}

fn primary() -> Engine {
    let mut engine = Engine::new(EngineConfig::new("vol"));
    let wal = WalState {
        head: Lsn(1_000_000),
        tail: Lsn(1000),
        checkpoint: Lsn(1000),
        checkpoint_trusted: true,
        newest_epoch: Some(EpochStart {
            epoch: Epoch(1),
            first: Lsn(1),
        }),
    };
    engine.handle_wal_state(wal).unwrap();
    engine.handle_local_durable(Lsn(0), Lsn(1_000_000));
    engine
}

/// Assignment, connect and handshake: everything up to the AcquireResources command.
fn assignment_to_plan(mut engine: Engine) -> Vec<Command> {
    let b = rid("b");
    engine
        .handle_assignment(assignment(1, CommitMode::BestEffort, &["b"]))
        .unwrap();
    let s = engine.active_session(&b).unwrap();
    engine.handle_connected(&b, s).unwrap();
    let reply = HandshakeReply {
        replica: b.clone(),
        epoch: Epoch(1),
        log: ReplicaLog::single_epoch(Lsn(900_000), Epoch(1)),
    };
    engine.handle_handshake(&b, s, reply).unwrap();
    engine.take_commands()
}

/// An engine with `b` running a catch-up over (0.5M, 1M].
fn running_catch_up() -> (Engine, SessionId) {
    let mut engine = primary();
    let b = rid("b");
    engine
        .handle_assignment(assignment(1, CommitMode::BestEffort, &["b"]))
        .unwrap();
    let s = engine.active_session(&b).unwrap();
    engine.handle_connected(&b, s).unwrap();
    let reply = HandshakeReply {
        replica: b.clone(),
        epoch: Epoch(1),
        log: ReplicaLog::single_epoch(Lsn(500_000), Epoch(1)),
    };
    engine.handle_handshake(&b, s, reply).unwrap();
    let grant = ResourceGrant {
        id: ResourceId(1),
        granted: GrantedResource::WalRetention { from: Lsn(500_000) },
    };
    engine.handle_resources_granted(&b, s, vec![grant]).unwrap();
    engine.take_commands();
    (engine, s)
}

fn benches(c: &mut Criterion) {
    let mut group = c.benchmark_group("plan");
    group.bench_function("baseline_bare_decision", |bench| {
        let primary = primary();
        let history = primary.history();
        let log = ReplicaLog::single_epoch(Lsn(900_000), Epoch(1));
        bench.iter(|| {
            let outcome = classify_handshake(black_box(&log), &history, primary.epochs());
            let plan = match outcome {
                HandshakeOutcome::CatchUp {
                    start,
                    target,
                    truncate_to,
                    ..
                } => RecoveryPlan {
                    session: SessionId(1),
                    replica: rid("b"),
                    epoch: Epoch(1),
                    kind: PlanKind::CatchUp {
                        start,
                        frozen_target: target,
                        truncate_to,
                        budget: CatchUpBudget::default(),
                    },
                },
                _ => unreachable!(),
            };
            black_box(plan.resources())
        });
    });
    group.bench_function("assignment_to_plan", |bench| {
        bench.iter_batched(primary, assignment_to_plan, BatchSize::SmallInput);
    });
    group.finish();

    let mut group = c.benchmark_group("events");
    group.bench_function("catchup_progress", |bench| {
        bench.iter_batched_ref(
            running_catch_up,
            |(engine, s)| {
                for step in 1..=100u64 {
                    let progress = CatchUpProgress {
                        applied: Lsn(500_000 + step),
                        entries: 1,
                        bytes: 4096,
                    };
                    engine
                        .handle_catchup_progress(&rid("b"), *s, Epoch(1), progress)
                        .unwrap();
                }
            },
            BatchSize::SmallInput,
        );
    });
    group.bench_function("sync_quorum_ack", |bench| {
        let mut engine = primary();
        engine
            .handle_assignment(assignment(1, CommitMode::SyncQuorum, &["b", "c"]))
            .unwrap();
        for server in ["b", "c"] {
            let id = rid(server);
            let s = engine.active_session(&id).unwrap();
            engine.handle_connected(&id, s).unwrap();
            let reply = HandshakeReply {
                replica: id.clone(),
                epoch: Epoch(1),
                log: ReplicaLog::single_epoch(Lsn(1_000_000), Epoch(1)),
            };
            engine.handle_handshake(&id, s, reply).unwrap();
        }
        let mut lsn = 1_000_000u64;
        let b = rid("b");
        bench.iter(|| {
            lsn += 1;
            engine
                .handle_wal_state(WalState {
                    head: Lsn(lsn),
                    ..WalState::default()
                })
                .unwrap();
            engine.handle_local_durable(Lsn(lsn - 1), Lsn(lsn));
            engine
                .handle_ack(
                    &b,
                    Ack {
                        epoch: Epoch(1),
                        durable: Lsn(lsn),
                        barrier: None,
                        told: Lsn(lsn),
                    },
                )
                .unwrap();
            black_box(engine.take_commands())
        });
    });
    group.finish();
}

criterion_group!(engine_benches, benches);
criterion_main!(engine_benches);
