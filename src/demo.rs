//! `walship demo`, engine edition: a scripted recovery story driven through
//! the pure engine by a simulated shell.
//!
//! This is not the real cluster. No file is written and no socket opened: the
//! simulated shell answers the engine's commands the way the actor runtime
//! will (connect, handshake, pin, execute with the engine's own executors,
//! release), so every decision, proof and log line is the engine's real
//! output. The runtime issue replaces this with a primary and two replicas
//! on loopback.

use std::collections::BTreeMap;
use std::io::Write;
use walship_engine::{
    Ack, Assignment, CatchUpExecutor, CatchUpProgress, Command, CommitMode, Endpoint, Engine,
    EngineConfig, GrantedResource, HandshakeReply, Lsn, RebuildExecutor, RebuildProgress,
    RecoveryPlan, RegistryStatus, ReplicaAssignment, ReplicaId, ReplicaState, ResourceGrant,
    ResourceId, ResourceRequest, Step, Tick, WalState,
};

/// What the simulated shell knows of one replica.
#[derive(Debug, Default)]
struct SimReplica {
    flushed: Lsn,
    reachable: bool,
}

/// Answers engine commands in memory.
#[derive(Debug)]
struct SimShell {
    engine: Engine,
    replicas: BTreeMap<ReplicaId, SimReplica>,
    pins: BTreeMap<ResourceId, GrantedResource>,
    next_pin: u64,
    wal: WalState,
    now: u64,
}

impl SimShell {
    fn write(&mut self, entries: u64) -> anyhow::Result<()> {
        let from = self.wal.head;
        self.wal.head = Lsn(from.get() + entries);
        self.engine.handle_wal_state(self.wal)?;
        self.engine.handle_local_durable(from, self.wal.head);
        // Live shipping: every reachable InSync replica receives and acks the new entries.
        for (id, replica) in &mut self.replicas {
            if replica.reachable && self.engine.replica_state(id) == Some(ReplicaState::InSync) {
                replica.flushed = self.wal.head;
                let ack = Ack {
                    epoch: self.engine.epoch(),
                    durable: self.wal.head,
                    barrier: None,
                };
                self.engine.handle_ack(id, ack)?;
            }
        }
        self.settle()
    }

    fn recycle_to(&mut self, lsn: u64) -> anyhow::Result<()> {
        self.wal.tail = Lsn(lsn);
        self.wal.checkpoint = Lsn(lsn);
        self.wal.checkpoint_trusted = true;
        self.engine.handle_wal_state(self.wal)?;
        Ok(())
    }

    fn set_reachable(&mut self, id: &ReplicaId, reachable: bool) -> anyhow::Result<()> {
        if let Some(replica) = self.replicas.get_mut(id) {
            replica.reachable = reachable;
        }
        if reachable {
            self.engine.handle_heartbeat(id, self.engine.epoch())?;
        } else {
            self.engine.handle_disconnected(id, "cut off")?;
        }
        self.settle()
    }

    /// Executes commands until the engine has nothing more to ask.
    fn settle(&mut self) -> anyhow::Result<()> {
        loop {
            let commands = self.engine.take_commands();
            if commands.is_empty() {
                return Ok(());
            }
            for command in commands {
                self.execute(command)?;
            }
            self.now += 1;
            self.engine.handle_tick(Tick(self.now));
        }
    }

    fn execute(&mut self, command: Command) -> anyhow::Result<()> {
        let epoch = self.engine.epoch();
        match command {
            Command::Connect {
                replica, session, ..
            } => {
                let Some(sim) = self.replicas.get(&replica).filter(|r| r.reachable) else {
                    return Ok(());
                };
                let reply = HandshakeReply {
                    replica: replica.clone(),
                    epoch,
                    flushed: sim.flushed,
                };
                self.engine.handle_connected(&replica, session)?;
                self.engine.handle_handshake(&replica, session, reply)?;
            }
            Command::AcquireResources {
                replica,
                session,
                requests,
                ..
            } => {
                let grants = requests.iter().map(|request| self.pin(request)).collect();
                self.engine
                    .handle_resources_granted(&replica, session, grants)?;
            }
            Command::ReleaseResources { resources, .. } => {
                for id in resources {
                    self.pins.remove(&id);
                }
            }
            Command::Execute {
                replica,
                session,
                plan,
                grants,
            } => {
                self.run_plan(&replica, session, &plan, &grants)?;
            }
            Command::StartLiveShipping { replica, from, .. } => {
                if let Some(sim) = self.replicas.get_mut(&replica) {
                    sim.flushed = from;
                }
            }
            Command::Disconnect { .. }
            | Command::CancelExecution { .. }
            | Command::StopLiveShipping { .. }
            | Command::ResolveBarrier { .. } => {}
        }
        Ok(())
    }

    fn pin(&mut self, request: &ResourceRequest) -> ResourceGrant {
        let granted = match *request {
            ResourceRequest::WalRetention { from } => GrantedResource::WalRetention { from },
            ResourceRequest::Snapshot { at } => GrantedResource::Snapshot { at },
            ResourceRequest::FullBase { .. } => GrantedResource::FullBase {
                base_lsn: self.wal.head,
            },
        };
        let id = ResourceId(self.next_pin);
        self.next_pin += 1;
        self.pins.insert(id, granted);
        ResourceGrant { id, granted }
    }

    /// Runs a plan step by step with the engine's executors, reporting progress.
    fn run_plan(
        &mut self,
        replica: &ReplicaId,
        session: walship_engine::SessionId,
        plan: &RecoveryPlan,
        grants: &[ResourceGrant],
    ) -> anyhow::Result<()> {
        let epoch = self.engine.epoch();
        const BATCH: u64 = 256;
        if let Ok(mut exec) = CatchUpExecutor::from_plan(plan, BATCH) {
            loop {
                match exec.next_step()? {
                    Step::Truncate { to } => {
                        self.engine.handle_truncated(replica, session, epoch, to)?
                    }
                    Step::ShipWal {
                        from_exclusive,
                        to_inclusive,
                    } => {
                        let entries = from_exclusive.entries_to(to_inclusive);
                        let progress = CatchUpProgress {
                            applied: to_inclusive,
                            entries,
                            bytes: entries * 4096,
                        };
                        self.engine
                            .handle_catchup_progress(replica, session, epoch, progress)?;
                    }
                    _ => return Ok(()),
                }
            }
        }
        let image_bytes = 64 << 20;
        let mut exec = RebuildExecutor::from_plan(plan, grants, image_bytes, 4 << 20, BATCH)?;
        loop {
            let progress = match exec.next_step()? {
                Step::TransferImage { offset, len } => RebuildProgress::Transferred {
                    bytes: offset + len,
                },
                Step::FinishImage { image_lsn } => {
                    RebuildProgress::ImageInstalled { at: image_lsn }
                }
                Step::ShipWal { to_inclusive, .. } => RebuildProgress::TailReplayed {
                    through: to_inclusive,
                },
                _ => return Ok(()),
            };
            self.engine
                .handle_rebuild_progress(replica, session, epoch, progress)?;
        }
    }
}

fn assignment(epoch: u64, b_addr: &str, b_version: u64) -> anyhow::Result<Assignment> {
    Ok(Assignment {
        epoch: walship_engine::Epoch(epoch),
        commit_mode: CommitMode::BestEffort,
        replicas: vec![
            ReplicaAssignment {
                id: ReplicaId::new("vol1", "r1")?,
                endpoint: Endpoint::new(b_addr, b_version),
            },
            ReplicaAssignment {
                id: ReplicaId::new("vol1", "r2")?,
                endpoint: Endpoint::new("127.0.0.1:7102", 1),
            },
        ],
    })
}

/// Plays the story, writing narration and the recovery log to `out`.
pub fn run(out: &mut impl Write) -> anyhow::Result<RegistryStatus> {
    writeln!(
        out,
        "walship demo (engine simulation): no files, no sockets. The simulated shell"
    )?;
    writeln!(
        out,
        "answers the engine's commands; every decision and log line is the real engine's."
    )?;
    writeln!(
        out,
        "The real cluster on loopback replaces this once the actor runtime lands.\n"
    )?;
    let r1 = ReplicaId::new("vol1", "r1")?;
    let r2 = ReplicaId::new("vol1", "r2")?;
    let mut shell = SimShell {
        engine: Engine::new(EngineConfig::new("vol1")),
        replicas: [
            (
                r1.clone(),
                SimReplica {
                    reachable: true,
                    ..SimReplica::default()
                },
            ),
            (
                r2.clone(),
                SimReplica {
                    reachable: true,
                    ..SimReplica::default()
                },
            ),
        ]
        .into_iter()
        .collect(),
        pins: BTreeMap::new(),
        next_pin: 1,
        wal: WalState {
            checkpoint_trusted: true,
            ..WalState::default()
        },
        now: 0,
    };
    shell
        .engine
        .handle_assignment(assignment(1, "127.0.0.1:7101", 1)?)?;
    shell.settle()?;
    shell.write(1000)?;
    writeln!(out, "1. r2 is cut off; 500 writes; r2 returns: catch-up")?;
    shell.set_reachable(&r2, false)?;
    shell.write(500)?;
    shell.set_reachable(&r2, true)?;
    writeln!(
        out,
        "2. r2 is cut off; 3500 writes; the WAL recycles to 4000; r2 returns: rebuild"
    )?;
    shell.set_reachable(&r2, false)?;
    shell.write(3500)?;
    shell.recycle_to(4000)?;
    shell.set_reachable(&r2, true)?;
    writeln!(
        out,
        "3. epoch bump with an endpoint change for r1: identity kept"
    )?;
    shell
        .engine
        .handle_assignment(assignment(2, "127.0.0.1:7201", 2)?)?;
    shell.settle()?;
    shell.write(100)?;
    writeln!(out, "\nrecovery log:")?;
    for event in shell.engine.log().events() {
        let replica = event.replica.as_ref().map_or("-", |r| r.as_str());
        let session = event
            .session
            .map_or_else(|| "-".to_owned(), |s| s.to_string());
        writeln!(
            out,
            "  {:>4} {:<9} {:<4} {:<28} {}",
            event.tick.get(),
            replica,
            session,
            event.event,
            event.detail
        )?;
    }
    let status = shell.engine.status();
    writeln!(
        out,
        "\nfinal states (committed {}):",
        status.history.committed
    )?;
    for sender in &status.senders {
        writeln!(
            out,
            "  {:<9} {:?} flushed={} endpoint={}",
            sender.replica, sender.state, sender.flushed, sender.endpoint
        )?;
    }
    let all_in_sync = status
        .senders
        .iter()
        .all(|s| s.state == ReplicaState::InSync);
    anyhow::ensure!(all_in_sync, "a replica did not end InSync");
    anyhow::ensure!(shell.pins.is_empty(), "pins left: {:?}", shell.pins);
    writeln!(out, "pins held: 0; every replica InSync (simulated)")?;
    Ok(status)
}

#[cfg(test)]
mod tests {
    #[test]
    #[allow(clippy::unwrap_used)]
    fn demo_story_runs_and_shows_catch_up_and_rebuild() {
        let mut out = Vec::new();
        let status = super::run(&mut out).unwrap();
        let text = String::from_utf8(out).unwrap();
        assert!(text.contains("plan_catchup"));
        assert!(text.contains("plan_rebuild_snapshot_tail"));
        assert!(text.contains("identity kept"));
        assert_eq!(status.epoch.get(), 2);
    }
}
