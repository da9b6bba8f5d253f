//! Property tests over random event sequences. After every event:
//! - every pin the shell holds is held by the engine, and none is released twice
//!   (the test shell panics on a double or unknown release);
//! - no session makes progress after its epoch or endpoint was superseded;
//! - committed never decreases and never exceeds what the mode's durable set holds;
//! - NeedsRebuild stays until a rebuild completes;
//! - the shell holds exactly the retention holds the engine reports, an
//!   in-sync replica always has one at or below what it acknowledged, and
//!   one that needs a rebuild has none.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use proptest::prelude::*;
use proptest::test_runner::FileFailurePersistence;
use std::collections::{BTreeMap, BTreeSet};
use support::*;
use walship_engine::*;

const SERVERS: [&str; 3] = ["b", "c", "d"];

#[derive(Debug, Clone)]
enum Op {
    Write(u64),
    Recycle(u64, bool),
    EpochBump,
    MoveEndpoint(usize),
    Connect(usize),
    Handshake(usize, i64),
    Grant(usize),
    GrantFails(usize),
    Progress(usize, u64),
    Truncate(usize),
    RebuildStep(usize, u8, u64),
    Fail(usize, u8),
    Disconnect(usize),
    Heartbeat(usize),
    Ack(usize, u64),
    Barrier,
    Tick(u64),
    StaleInput(usize, u64),
    RetentionUsage(u64),
    /// The next correct step for the replica's live session, whatever its phase.
    Drive(usize, u64),
}

fn op() -> impl Strategy<Value = Op> {
    let r = 0..SERVERS.len();
    prop_oneof![
        3 => (1..30u64).prop_map(Op::Write),
        1 => (0..40u64, any::<bool>()).prop_map(|(k, t)| Op::Recycle(k, t)),
        1 => Just(Op::EpochBump),
        1 => r.clone().prop_map(Op::MoveEndpoint),
        4 => r.clone().prop_map(Op::Connect),
        4 => (r.clone(), -60..10i64).prop_map(|(i, d)| Op::Handshake(i, d)),
        4 => r.clone().prop_map(Op::Grant),
        1 => r.clone().prop_map(Op::GrantFails),
        4 => (r.clone(), 0..120u64).prop_map(|(i, p)| Op::Progress(i, p)),
        2 => r.clone().prop_map(Op::Truncate),
        4 => (r.clone(), 0..3u8, 0..120u64).prop_map(|(i, k, v)| Op::RebuildStep(i, k, v)),
        1 => (r.clone(), 0..3u8).prop_map(|(i, k)| Op::Fail(i, k)),
        1 => r.clone().prop_map(Op::Disconnect),
        2 => r.clone().prop_map(Op::Heartbeat),
        3 => (r.clone(), 0..200u64).prop_map(|(i, l)| Op::Ack(i, l)),
        1 => Just(Op::Barrier),
        2 => (1..40u64).prop_map(Op::Tick),
        2 => (r.clone(), 0..8u64).prop_map(|(i, k)| Op::StaleInput(i, k)),
        2 => (0..2000u64).prop_map(Op::RetentionUsage),
        12 => (r, 0..100u64).prop_map(|(i, v)| Op::Drive(i, v)),
    ]
}

struct Model {
    shell: Shell,
    mode: CommitMode,
    versions: BTreeMap<ReplicaId, u64>,
    superseded: Vec<(ReplicaId, SessionId, Epoch)>,
    last_session: BTreeMap<ReplicaId, SessionId>,
    max_reported: BTreeMap<ReplicaId, Lsn>,
    sticky_since: BTreeMap<ReplicaId, u64>,
    last_committed: Lsn,
    now: u64,
}

impl Model {
    fn new(mode: CommitMode) -> Self {
        let mut config = Shell::config();
        config.budget.max_duration_ticks = Some(200);
        config.budget.progress_deadline_ticks = Some(60);
        config.pin_reservation_ticks = 30;
        config.barrier_timeout_ticks = 50;
        config.retention = RetentionBudget {
            max_bytes: Some(1000),
            max_away_ticks: Some(150),
        };
        let shell = Shell::new(config);
        let mut model = Self {
            shell,
            mode,
            versions: SERVERS.iter().map(|s| (rid(s), 1)).collect(),
            superseded: Vec::new(),
            last_session: BTreeMap::new(),
            max_reported: BTreeMap::new(),
            sticky_since: BTreeMap::new(),
            last_committed: Lsn::ZERO,
            now: 0,
        };
        model.assign(1);
        model.shell.wal(0, 20, 0, true);
        model
    }

    fn assign(&mut self, epoch: u64) {
        let replicas: Vec<(String, String, u64)> = self
            .versions
            .iter()
            .map(|(id, v)| (id.server().to_owned(), format!("10.0.0.{v}:7000"), *v))
            .collect();
        let refs: Vec<(&str, &str, u64)> = replicas
            .iter()
            .map(|(s, a, v)| (s.as_str(), a.as_str(), *v))
            .collect();
        self.shell.assign(assignment(epoch, self.mode, &refs));
    }

    fn report(&mut self, replica: &ReplicaId, lsn: Lsn) {
        let entry = self.max_reported.entry(replica.clone()).or_default();
        *entry = (*entry).max(lsn);
    }

    fn apply(&mut self, op: &Op) {
        let e = &mut self.shell.engine;
        let epoch = e.epoch();
        match *op {
            Op::Write(n) => {
                let h = e.history();
                self.shell.wal(
                    h.tail.get(),
                    h.head.get() + n,
                    h.checkpoint.get(),
                    h.checkpoint_trusted,
                );
            }
            Op::Recycle(k, trusted) => {
                let h = e.history();
                let tail = (h.tail.get() + k).min(h.head.get());
                self.shell.wal(tail, h.head.get(), tail, trusted);
            }
            Op::EpochBump => self.assign(epoch.get() + 1),
            Op::MoveEndpoint(i) => {
                *self.versions.get_mut(&rid(SERVERS[i])).unwrap() += 1;
                self.assign(epoch.get());
            }
            Op::Connect(i) => {
                if let Some(s) = e.active_session(&rid(SERVERS[i])) {
                    let _ = e.handle_connected(&rid(SERVERS[i]), s);
                }
            }
            Op::Handshake(i, delta) => {
                let id = rid(SERVERS[i]);
                if let Some(s) = e.active_session(&id) {
                    let flushed = Lsn(e.committed().get().saturating_add_signed(delta));
                    let reply = HandshakeReply {
                        replica: id.clone(),
                        epoch,
                        log: ReplicaLog {
                            flushed,
                            checkpoint: Lsn::ZERO,
                            epochs: self.shell.epochs.through(flushed),
                            committed: Lsn::ZERO,
                            partial: None,
                        },
                    };
                    if e.handle_handshake(&id, s, reply).is_ok() {
                        self.report(&id, flushed);
                    }
                }
            }
            Op::Grant(i) => {
                let id = rid(SERVERS[i]);
                let latest = self.shell.acquires.keys().rev().find(|s| {
                    self.shell.all_commands.iter().any(|c| {
                        matches!(c, Command::AcquireResources { replica, session, .. } if *replica == id && session == *s)
                    })
                });
                if let Some(&s) = latest {
                    let base = self.shell.engine.history().head.get();
                    let grants = self.shell.make_grants(s, base);
                    let _ = self.shell.engine.handle_resources_granted(&id, s, grants);
                }
            }
            Op::GrantFails(i) => {
                if let Some(s) = e.active_session(&rid(SERVERS[i])) {
                    let _ = e.handle_resources_failed(&rid(SERVERS[i]), s, "pin refused");
                }
            }
            Op::Progress(i, value) => {
                let id = rid(SERVERS[i]);
                if let (Some(s), Some((_, plan, _))) =
                    (e.active_session(&id), self.shell.executing.get(&id))
                {
                    if let PlanKind::CatchUp { start, .. } = plan.kind {
                        let applied = Lsn(start.get() + value % 60);
                        let progress = CatchUpProgress {
                            applied,
                            entries: value % 7,
                            bytes: value * 512,
                        };
                        if e.handle_catchup_progress(&id, s, epoch, progress).is_ok() {
                            self.report(&id, applied);
                        }
                    }
                }
            }
            Op::Truncate(i) => {
                let id = rid(SERVERS[i]);
                if let (Some(s), Some((_, plan, _))) =
                    (e.active_session(&id), self.shell.executing.get(&id))
                {
                    if let PlanKind::CatchUp {
                        truncate_to: Some(to),
                        ..
                    } = plan.kind
                    {
                        let _ = e.handle_truncated(&id, s, epoch, to);
                    }
                }
            }
            Op::RebuildStep(i, kind, value) => {
                let id = rid(SERVERS[i]);
                if let (Some(s), Some((_, plan, grants))) =
                    (e.active_session(&id), self.shell.executing.get(&id))
                {
                    let image = plan
                        .check_grants(grants)
                        .ok()
                        .flatten()
                        .unwrap_or(Lsn::ZERO);
                    let progress = match kind {
                        0 => RebuildProgress::Transferred {
                            bytes: value * 4096,
                        },
                        1 => RebuildProgress::ImageInstalled {
                            at: Lsn(image.get() + value % 2),
                        },
                        _ => RebuildProgress::TailReplayed {
                            through: Lsn(image.get() + value % 40),
                        },
                    };
                    if e.handle_rebuild_progress(&id, s, epoch, progress).is_ok() {
                        if let Some(Lsn(v)) = e
                            .flushed(&id)
                            .filter(|_| e.replica_state(&id) == Some(ReplicaState::InSync))
                        {
                            self.report(&id, Lsn(v));
                        }
                    }
                }
            }
            Op::Fail(i, kind) => {
                let id = rid(SERVERS[i]);
                if let Some(s) = e.active_session(&id) {
                    let failure = match kind {
                        0 => ExecutionFailure::Unrecoverable("boom".into()),
                        1 => ExecutionFailure::ReplicaStorage("No space left on device".into()),
                        _ => ExecutionFailure::Transient("reset".into()),
                    };
                    let _ = e.handle_execution_failed(&id, s, failure);
                }
            }
            Op::Disconnect(i) => {
                let failure = ExecutionFailure::Transient("reset".into());
                let _ = e.handle_disconnected(&rid(SERVERS[i]), &failure);
            }
            Op::Heartbeat(i) => {
                let _ = e.handle_heartbeat(&rid(SERVERS[i]), epoch);
            }
            Op::Ack(i, lsn) => {
                let id = rid(SERVERS[i]);
                let durable = Lsn(lsn.min(e.history().head.get()));
                if e.replica_state(&id) == Some(ReplicaState::InSync) {
                    let ack = Ack {
                        epoch,
                        durable,
                        barrier: None,
                        told: e.committed(),
                    };
                    if e.handle_ack(&id, ack).is_ok() {
                        self.report(&id, durable);
                    }
                }
            }
            Op::Barrier => {
                let head = e.history().head;
                let _ = e.handle_barrier(head, epoch);
            }
            Op::Tick(dt) => {
                self.now += dt;
                e.handle_tick(Tick(self.now));
            }
            Op::Drive(i, v) => {
                let id = rid(SERVERS[i]);
                let Some(snapshot) = e.session_snapshot(&id) else {
                    return self.shell.pump_unit();
                };
                let s = snapshot.id;
                match (snapshot.stage, snapshot.work) {
                    ("connecting", _) => drop(e.handle_connected(&id, s)),
                    ("handshake", _) => {
                        let flushed = Lsn(e.committed().get().saturating_sub(v % 50));
                        let reply = HandshakeReply {
                            replica: id.clone(),
                            epoch,
                            log: ReplicaLog {
                                flushed,
                                checkpoint: Lsn::ZERO,
                                epochs: self.shell.epochs.through(flushed),
                                committed: Lsn::ZERO,
                                partial: None,
                            },
                        };
                        if e.handle_handshake(&id, s, reply).is_ok() {
                            self.report(&id, flushed);
                        }
                    }
                    ("reserving", _) => {
                        let base = e.history().head.get();
                        let grants = self.shell.make_grants(s, base);
                        let _ = self.shell.engine.handle_resources_granted(&id, s, grants);
                    }
                    (
                        "running",
                        Some(Work::CatchUp {
                            truncation: Truncation::Required { to },
                            ..
                        }),
                    ) => {
                        let _ = e.handle_truncated(&id, s, epoch, to);
                    }
                    (
                        "running",
                        Some(Work::CatchUp {
                            applied, target, ..
                        }),
                    ) => {
                        let next = Lsn(target.get().min(applied.get() + 1 + v % 30));
                        let progress = CatchUpProgress {
                            applied: next,
                            entries: 1,
                            bytes: 4096,
                        };
                        if e.handle_catchup_progress(&id, s, epoch, progress).is_ok() {
                            self.report(&id, next);
                        }
                    }
                    ("running", Some(Work::Rebuild(fsm))) => {
                        let progress = match fsm.state() {
                            RebuildState::Transfer {
                                transferred_bytes, ..
                            } if v % 3 == 0 => RebuildProgress::Transferred {
                                bytes: transferred_bytes + 4096,
                            },
                            RebuildState::Transfer { image_lsn, .. } => {
                                RebuildProgress::ImageInstalled { at: *image_lsn }
                            }
                            RebuildState::TailReplay { target, .. } => {
                                RebuildProgress::TailReplayed { through: *target }
                            }
                            _ => return self.shell.pump_unit(),
                        };
                        if e.handle_rebuild_progress(&id, s, epoch, progress).is_ok() {
                            if let Some(flushed) = e
                                .flushed(&id)
                                .filter(|_| e.replica_state(&id) == Some(ReplicaState::InSync))
                            {
                                self.report(&id, flushed);
                            }
                        }
                    }
                    _ => {}
                }
            }
            Op::RetentionUsage(bytes) => {
                let usage: Vec<(ReplicaId, u64)> = self
                    .shell
                    .holds
                    .keys()
                    .map(|r| (r.clone(), bytes))
                    .collect();
                e.handle_retention_usage(&usage);
            }
            Op::StaleInput(i, k) => {
                let id = rid(SERVERS[i]);
                let stale: Vec<_> = self
                    .superseded
                    .iter()
                    .filter(|(r, _, _)| *r == id)
                    .collect();
                if let Some((_, session, old_epoch)) = stale.get(k as usize % stale.len().max(1)) {
                    let progress = CatchUpProgress {
                        applied: Lsn(1),
                        entries: 1,
                        bytes: 1,
                    };
                    let a = e.handle_catchup_progress(&id, *session, *old_epoch, progress);
                    let b = e.handle_rebuild_progress(
                        &id,
                        *session,
                        *old_epoch,
                        RebuildProgress::Transferred { bytes: 1 },
                    );
                    let c = e.handle_truncated(&id, *session, *old_epoch, Lsn(0));
                    let d = e.handle_connected(&id, *session);
                    assert!(
                        a.is_err() && b.is_err() && c.is_err() && d.is_err(),
                        "superseded {session} made progress"
                    );
                }
            }
        }
        self.shell.pump();
    }

    fn check(&mut self) {
        let engine = &self.shell.engine;
        // Pins: what the shell holds is exactly what the engine accounts for.
        let held: BTreeSet<ResourceId> = engine.held_resources().into_iter().collect();
        let shell_held: BTreeSet<ResourceId> = self.shell.pins.keys().copied().collect();
        assert_eq!(held, shell_held, "pin accounting diverged");
        // Sessions superseded by a new one must stay dead.
        for replica in SERVERS.iter().map(|s| rid(s)) {
            if let Some(snapshot) = engine.session_snapshot(&replica) {
                if let Some(previous) = self.last_session.insert(replica.clone(), snapshot.id) {
                    if previous != snapshot.id {
                        self.superseded
                            .push((replica.clone(), previous, snapshot.epoch));
                        self.superseded.push((
                            replica.clone(),
                            previous,
                            Epoch(snapshot.epoch.get().saturating_sub(1)),
                        ));
                    }
                }
            }
        }
        // Committed: monotonic and backed by the mode's durable set.
        let committed = engine.committed();
        assert!(committed >= self.last_committed, "committed went back");
        self.last_committed = committed;
        let head = engine.history().head;
        assert!(committed <= head);
        let reported: Vec<Lsn> = SERVERS
            .iter()
            .map(|s| self.max_reported.get(&rid(s)).copied().unwrap_or_default())
            .collect();
        let bound = match self.mode {
            CommitMode::BestEffort => head,
            CommitMode::SyncAll => reported.iter().copied().fold(head, Lsn::min),
            CommitMode::SyncQuorum => {
                let mut all: Vec<Lsn> = reported.iter().copied().chain([head]).collect();
                all.sort_unstable_by(|a, b| b.cmp(a));
                all[2]
            }
        };
        assert!(
            committed <= bound,
            "committed {committed} beyond durable bound {bound}"
        );
        // Retention holds: the shell holds what the engine says, where it says.
        for sender in engine.status().senders {
            let shell_hold = self.shell.holds.get(&sender.replica).copied();
            match &sender.retention {
                RetentionHold::Held { from, away_since } => {
                    assert_eq!(shell_hold, Some(*from), "{}", sender.replica);
                    if sender.state == ReplicaState::InSync {
                        assert!(away_since.is_none() && *from <= sender.flushed);
                    }
                }
                _ => assert_eq!(
                    shell_hold, None,
                    "{} holds WAL it should not",
                    sender.replica
                ),
            }
            match sender.state {
                ReplicaState::NeedsRebuild | ReplicaState::Rebuilding => assert!(
                    !matches!(sender.retention, RetentionHold::Held { .. }),
                    "{} needs a rebuild yet holds WAL",
                    sender.replica
                ),
                ReplicaState::InSync => assert!(
                    matches!(sender.retention, RetentionHold::Held { .. }),
                    "{} in sync without a hold",
                    sender.replica
                ),
                _ => {}
            }
        }
        // NeedsRebuild is sticky until a rebuild completes.
        for replica in SERVERS.iter().map(|s| rid(s)) {
            let state = engine.replica_state(&replica).unwrap();
            let rebuilds = engine
                .log()
                .events()
                .filter(|e| e.event == "rebuild_completed" && e.replica.as_ref() == Some(&replica))
                .map(|e| 1 + e.repeats)
                .sum::<u64>();
            match self.sticky_since.get(&replica) {
                Some(&since) if rebuilds == since => assert!(
                    matches!(state, ReplicaState::NeedsRebuild | ReplicaState::Rebuilding),
                    "{replica} left NeedsRebuild for {state:?} without a rebuild"
                ),
                Some(_) => {
                    self.sticky_since.remove(&replica);
                }
                None => {}
            }
            if state == ReplicaState::NeedsRebuild {
                self.sticky_since.entry(replica).or_insert(rebuilds);
            }
        }
    }
}

fn mode() -> impl Strategy<Value = CommitMode> {
    prop_oneof![
        Just(CommitMode::BestEffort),
        Just(CommitMode::SyncAll),
        Just(CommitMode::SyncQuorum)
    ]
}

proptest! {
    // Replays `properties.proptest-regressions` (beside this file) first:
    // named here, because the default looks for a lib.rs or main.rs above
    // the test and only falls back to this with a warning.
    #![proptest_config(ProptestConfig {
        cases: 256,
        failure_persistence: Some(Box::new(FileFailurePersistence::WithSource("proptest-regressions"))),
        ..ProptestConfig::default()
    })]

    #[test]
    fn invariants_hold_over_random_event_sequences(mode in mode(), ops in proptest::collection::vec(op(), 1..150)) {
        let mut model = Model::new(mode);
        model.check();
        for op in &ops {
            model.apply(op);
            model.check();
        }
        // Removing every replica releases everything still pinned.
        model.shell.assign(assignment(model.shell.epoch().get(), CommitMode::BestEffort, &[]));
        model.shell.assert_no_pins();
        prop_assert!(model.shell.holds.is_empty(), "holds left: {:?}", model.shell.holds);
    }
}
