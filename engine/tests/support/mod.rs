//! A test shell for the engine: executes its commands the way the actor
//! runtime will, with a pin table that catches double and unknown releases.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::collections::{BTreeMap, BTreeSet};
use walship_engine::*;

pub const VOLUME: &str = "vol1";

pub fn rid(server: &str) -> ReplicaId {
    ReplicaId::new(VOLUME, server).unwrap()
}

pub fn assignment(epoch: u64, mode: CommitMode, replicas: &[(&str, &str, u64)]) -> Assignment {
    Assignment {
        epoch: Epoch(epoch),
        commit_mode: mode,
        replicas: replicas
            .iter()
            .map(|(server, addr, version)| ReplicaAssignment {
                id: rid(server),
                endpoint: Endpoint::new(*addr, *version),
            })
            .collect(),
    }
}

/// Drives an engine and keeps the shell-side state tests assert on.
pub struct Shell {
    pub engine: Engine,
    pub pins: BTreeMap<ResourceId, GrantedResource>,
    pub released: BTreeSet<ResourceId>,
    next_resource: u64,
    pub acquires: BTreeMap<SessionId, Vec<ResourceRequest>>,
    pub executing: BTreeMap<ReplicaId, (SessionId, RecoveryPlan, Vec<ResourceGrant>)>,
    pub cancelled: Vec<SessionId>,
    pub live: BTreeMap<ReplicaId, Lsn>,
    pub barriers: BTreeMap<BarrierId, Result<Lsn, BarrierFailure>>,
    pub all_commands: Vec<Command>,
    /// The primary's epoch history as its WAL would report it.
    pub epochs: EpochHistory,
    /// Retention holds the shell keeps, by replica.
    pub holds: BTreeMap<ReplicaId, Lsn>,
    /// Barriers the shell was asked to send, in order.
    pub barrier_requests: Vec<(ReplicaId, BarrierId)>,
}

impl Shell {
    pub fn new(config: EngineConfig) -> Self {
        Self {
            engine: Engine::new(config),
            pins: BTreeMap::new(),
            released: BTreeSet::new(),
            next_resource: 1,
            acquires: BTreeMap::new(),
            executing: BTreeMap::new(),
            cancelled: Vec::new(),
            live: BTreeMap::new(),
            barriers: BTreeMap::new(),
            all_commands: Vec::new(),
            epochs: EpochHistory::new(),
            holds: BTreeMap::new(),
            barrier_requests: Vec::new(),
        }
    }

    pub fn config() -> EngineConfig {
        EngineConfig::new(VOLUME)
    }

    /// Drains and executes the engine's commands; returns them.
    pub fn pump(&mut self) -> Vec<Command> {
        let commands = self.engine.take_commands();
        for command in &commands {
            match command {
                Command::AcquireResources {
                    session, requests, ..
                } => {
                    self.acquires.insert(*session, requests.clone());
                }
                Command::ReleaseResources { resources, .. } => {
                    for id in resources {
                        assert!(self.pins.remove(id).is_some(), "release of unheld {id}");
                        assert!(self.released.insert(*id), "double release of {id}");
                    }
                }
                Command::Execute {
                    replica,
                    session,
                    plan,
                    grants,
                } => {
                    self.executing
                        .insert(replica.clone(), (*session, plan.clone(), grants.clone()));
                }
                Command::CancelExecution {
                    replica, session, ..
                } => {
                    self.cancelled.push(*session);
                    self.executing.remove(replica);
                }
                Command::StartLiveShipping { replica, from, .. } => {
                    self.live.insert(replica.clone(), *from);
                }
                Command::StopLiveShipping { replica, .. } | Command::Disconnect { replica, .. } => {
                    self.live.remove(replica);
                }
                Command::ResolveBarrier { barrier, outcome } => {
                    self.barriers.insert(*barrier, outcome.clone());
                }
                Command::TrackDirty { .. }
                | Command::ForgetDirty { .. }
                | Command::AwaitRebuildSlot { .. }
                | Command::BoostRecovery { .. }
                | Command::LimitWrites { .. } => {}
                Command::SendBarrier {
                    replica, barrier, ..
                } => {
                    self.barrier_requests.push((replica.clone(), *barrier));
                }
                Command::HoldRetention { replica, from } => {
                    self.holds.insert(replica.clone(), *from);
                }
                Command::ReleaseRetention { replica, .. } => {
                    assert!(self.holds.remove(replica).is_some(), "release of no hold");
                }
                Command::Connect { .. } => {}
            }
        }
        self.all_commands.extend(commands.iter().cloned());
        commands
    }

    pub fn pump_unit(&mut self) {
        self.pump();
    }

    pub fn assign(&mut self, a: Assignment) -> Vec<Command> {
        self.engine.handle_assignment(a).unwrap();
        self.pump()
    }

    /// Writes up to `head` in the current epoch (epoch 1 before any
    /// assignment), durable on the primary, with the given retention.
    pub fn wal(&mut self, tail: u64, head: u64, checkpoint: u64, trusted: bool) {
        let prev = self.engine.history().head;
        let epoch = self.engine.epoch().max(Epoch(1));
        if head > prev.get() && self.epochs.newest().map(|e| e.epoch) != Some(epoch) {
            let start = EpochStart {
                epoch,
                first: prev.next(),
            };
            self.epochs.record(start).unwrap();
        }
        self.engine
            .handle_wal_state(WalState {
                head: Lsn(head),
                tail: Lsn(tail),
                checkpoint: Lsn(checkpoint),
                checkpoint_trusted: trusted,
                newest_epoch: self.epochs.newest(),
            })
            .unwrap();
        self.engine.handle_local_durable(prev, Lsn(head));
        self.pump();
    }

    pub fn session(&self, server: &str) -> SessionId {
        self.engine
            .active_session(&rid(server))
            .expect("active session")
    }

    pub fn epoch(&self) -> Epoch {
        self.engine.epoch()
    }

    pub fn connect(&mut self, server: &str) {
        let s = self.session(server);
        self.engine.handle_connected(&rid(server), s).unwrap();
        self.pump();
    }

    /// The replica answers with a log that is a prefix of the primary's
    /// (or runs past its head in the primary's newest epoch).
    pub fn handshake(&mut self, server: &str, flushed: u64) -> Vec<Command> {
        let log = ReplicaLog {
            flushed: Lsn(flushed),
            checkpoint: Lsn::ZERO,
            epochs: self.epochs.through(Lsn(flushed)),
            committed: Lsn::ZERO,
            partial: None,
        };
        self.handshake_with(server, log)
    }

    /// The replica answers with `log`.
    pub fn handshake_with(&mut self, server: &str, log: ReplicaLog) -> Vec<Command> {
        let s = self.session(server);
        let reply = HandshakeReply {
            replica: rid(server),
            epoch: self.epoch(),
            log,
        };
        self.engine
            .handle_handshake(&rid(server), s, reply)
            .unwrap();
        self.pump()
    }

    pub fn connect_and_handshake(&mut self, server: &str, flushed: u64) -> Vec<Command> {
        self.connect(server);
        self.handshake(server, flushed)
    }

    /// Grants what the session asked for. `base_lsn` is used for a full base.
    pub fn grant(&mut self, server: &str, base_lsn: u64) -> Vec<Command> {
        let s = self.session(server);
        let grants = self.make_grants(s, base_lsn);
        self.engine
            .handle_resources_granted(&rid(server), s, grants)
            .unwrap();
        self.pump()
    }

    pub fn make_grants(&mut self, session: SessionId, base_lsn: u64) -> Vec<ResourceGrant> {
        let requests = self
            .acquires
            .get(&session)
            .cloned()
            .expect("acquire requested");
        requests
            .iter()
            .map(|request| {
                let granted = match *request {
                    ResourceRequest::WalRetention { from } => {
                        GrantedResource::WalRetention { from }
                    }
                    ResourceRequest::Snapshot { at } => GrantedResource::Snapshot { at },
                    ResourceRequest::FullBase { .. } => GrantedResource::FullBase {
                        base_lsn: Lsn(base_lsn),
                    },
                };
                let id = ResourceId(self.next_resource);
                self.next_resource += 1;
                self.pins.insert(id, granted);
                ResourceGrant { id, granted }
            })
            .collect()
    }

    pub fn progress(&mut self, server: &str, applied: u64) -> Result<(), EngineError> {
        let s = self.session(server);
        let progress = CatchUpProgress {
            applied: Lsn(applied),
            entries: 1,
            bytes: 4096,
        };
        let result = self
            .engine
            .handle_catchup_progress(&rid(server), s, self.epoch(), progress);
        self.pump();
        result
    }

    /// The replica reports it truncated to `to`.
    pub fn truncated(&mut self, server: &str, to: u64) -> Result<(), EngineError> {
        let (s, e) = (self.session(server), self.epoch());
        let result = self.engine.handle_truncated(&rid(server), s, e, Lsn(to));
        self.pump();
        result
    }

    pub fn rebuild(&mut self, server: &str, progress: RebuildProgress) -> Result<(), EngineError> {
        let s = self.session(server);
        let result = self
            .engine
            .handle_rebuild_progress(&rid(server), s, self.epoch(), progress);
        self.pump();
        result
    }

    pub fn state(&self, server: &str) -> ReplicaState {
        self.engine.replica_state(&rid(server)).unwrap()
    }

    pub fn events(&self, server: &str) -> Vec<&'static str> {
        let id = rid(server);
        self.engine
            .log()
            .events()
            .filter(|e| e.replica.as_ref() == Some(&id))
            .map(|e| e.event)
            .collect()
    }

    pub fn event_detail(&self, event: &str) -> Vec<String> {
        self.engine
            .log()
            .events()
            .filter(|e| e.event == event)
            .map(|e| e.detail.clone())
            .collect()
    }

    /// Every granted pin was released exactly once and the engine holds none.
    pub fn assert_no_pins(&self) {
        assert!(self.pins.is_empty(), "pins still held: {:?}", self.pins);
        assert!(self.engine.held_resources().is_empty());
    }

    /// Brings one replica to InSync through a zero-gap handshake.
    pub fn in_sync(&mut self, server: &str) {
        let committed = self.engine.committed().get();
        self.connect_and_handshake(server, committed);
        assert_eq!(self.state(server), ReplicaState::InSync);
    }

    pub fn ack(
        &mut self,
        server: &str,
        durable: u64,
        barrier: Option<BarrierId>,
    ) -> Result<(), EngineError> {
        // The replica knows what the primary committed so far (batches
        // carry it); `ack_knowing` says otherwise.
        let told = self.engine.committed();
        self.ack_knowing(server, durable, barrier, told.get())
    }

    /// An ack from a replica that knows `told` is committed.
    pub fn ack_knowing(
        &mut self,
        server: &str,
        durable: u64,
        barrier: Option<BarrierId>,
        told: u64,
    ) -> Result<(), EngineError> {
        let ack = Ack {
            epoch: self.epoch(),
            durable: Lsn(durable),
            barrier,
            told: Lsn(told),
        };
        let r = self.engine.handle_ack(&rid(server), ack);
        self.pump();
        r
    }

    pub fn barrier(&mut self, lsn: u64) -> BarrierId {
        let b = self.engine.handle_barrier(Lsn(lsn), self.epoch()).unwrap();
        self.pump();
        b
    }

    /// The replica is reachable again: an idle one gets a session.
    pub fn heartbeat(&mut self, server: &str) -> Vec<Command> {
        let epoch = self.epoch();
        self.engine.handle_heartbeat(&rid(server), epoch).unwrap();
        self.pump()
    }

    pub fn tick(&mut self, t: u64) -> Vec<Command> {
        self.engine.handle_tick(Tick(t));
        self.pump()
    }
}
