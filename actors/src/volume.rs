//! The primary's `VolumeActor`: owns the store (WAL writer), the engine and
//! the resource table; executes the engine's commands and feeds results back
//! as events. Durability runs on the runtime's blocking pool (group commit) so the
//! actor never waits on an fsync.

use crate::adapt;
use crate::config::PrimaryConfig;
use crate::error::VolumeError;
use crate::metered;
use crate::metrics::{MailboxMetrics, MailboxSnapshot, Metered, MeteredAddr};
use crate::pool::Pools;
use crate::resources::{Held, ResourceTable};
use crate::sender::{self, SenderActor, SenderContext};
use actix::prelude::*;
use bytes::Bytes;
use serde::Serialize;
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use tokio::sync::{oneshot, watch};
use walship_engine::{
    Assignment, BarrierFailure, BarrierId, Command, Endpoint, Engine, EngineConfig, Epoch,
    GrantedResource, Input, Lsn, RecoveryEvent, RegistryStatus, ReplicaAssignment, ReplicaId,
    ResourceGrant, ResourceId, ResourceRequest, SessionId, Tick, WalState,
};
use walship_io::{BackendChoice, LogReader, Store, WalPin};

/// Label prefix of the WAL pins that are replicas' retention holds.
const HOLD_PIN_PREFIX: &str = "hold ";

/// Everything an operator sees of a primary.
#[derive(Debug, Clone, Serialize, MessageResponse)]
pub struct VolumeStatus {
    /// Role.
    pub role: &'static str,
    /// Engine registry: senders, sessions, plans, history.
    pub registry: RegistryStatus,
    /// WAL head.
    pub head: u64,
    /// Locally durable LSN.
    pub durable: u64,
    /// Checkpoint LSN.
    pub checkpoint: u64,
    /// WAL tail.
    pub tail: u64,
    /// WAL pins held by recovery plans (zero when no recovery runs).
    pub recovery_pins: usize,
    /// Replicas' retention holds (one per replica that has one).
    pub retention_holds: usize,
    /// Snapshot pins (the checkpointer pauses while any is held).
    pub snapshot_pins: usize,
    /// Engine resources held by the runtime.
    pub held_resources: usize,
    /// Log reader backend and why.
    pub reader_backend: String,
    /// Bytes each replica's sender has put on the wire, by replica.
    pub bytes_sent: Vec<(ReplicaId, u64)>,
    /// Mailbox metrics: the volume actor, then each sender.
    pub mailboxes: Vec<MailboxSnapshot>,
}

/// The primary volume actor.
pub struct VolumeActor {
    config: PrimaryConfig,
    store: Arc<Store>,
    reader: Arc<LogReader>,
    engine: Engine,
    senders: HashMap<ReplicaId, MeteredAddr<SenderActor>>,
    bytes_sent: HashMap<ReplicaId, Arc<AtomicU64>>,
    resources: ResourceTable,
    next_resource: u64,
    /// Each replica's retention hold, as the engine placed it.
    holds: HashMap<ReplicaId, WalPin>,
    head_tx: watch::Sender<u64>,
    committed_tx: watch::Sender<u64>,
    barriers: HashMap<BarrierId, oneshot::Sender<Result<u64, BarrierFailure>>>,
    pools: Pools,
    /// A sync runs on the runtime's blocking pool; at most one per volume.
    sync_in_flight: bool,
    /// Highest LSN a writer is waiting to see durable.
    sync_wanted: u64,
    checkpoint_in_flight: bool,
    durable_seen: u64,
    started: std::time::Instant,
    last_heartbeat: u64,
    wake: Option<(u64, SpawnHandle)>,
    poisoned: Option<String>,
    metrics: Arc<MailboxMetrics>,
    me: Option<MeteredAddr<VolumeActor>>,
}

impl std::fmt::Debug for VolumeActor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VolumeActor")
            .field("volume", &self.config.volume)
            .finish_non_exhaustive()
    }
}

impl Actor for VolumeActor {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Context<Self>) {
        let me = MeteredAddr::new(ctx.address(), Arc::clone(&self.metrics));
        self.me = Some(me.clone());
        let assignment = self.assignment(self.config.epoch);
        if let Err(error) = self.engine.handle_assignment(assignment) {
            tracing::error!(%error, "initial assignment refused");
        }
        self.run_commands(ctx);
    }

    fn stopped(&mut self, _: &mut Context<Self>) {
        for sender in self.senders.values() {
            sender.do_send(sender::Shutdown);
        }
        for (_, waiter) in self.barriers.drain() {
            let _ = waiter.send(Err(BarrierFailure::Fenced { lsn: Lsn::ZERO }));
        }
    }
}

impl Metered for VolumeActor {
    fn mailbox(&self) -> &MailboxMetrics {
        &self.metrics
    }
}

metered!(VolumeActor: Write, Barrier, Read, ApplyAssignment, Heartbeat, GetStatus, GetRecoveryLog, Checkpoint, CheckpointDone, ResourcesPinned, ContentChecksum, GetSender, Stop, LocalDurable, EngineInput);

impl VolumeActor {
    /// Opens the store and prepares the actor (started by the runtime).
    pub(crate) fn open(config: PrimaryConfig, pools: Pools) -> Result<Self, VolumeError> {
        let (store, report) = Store::open(&config.dir, config.store.clone())?;
        // Epochs are the primary's incarnations: LSNs written in one must
        // never be written again with other data, and a crash may have lost
        // entries that replicas already hold.
        if let Some(newest) = store.wal().newest_epoch() {
            if newest.epoch >= config.epoch {
                return Err(VolumeError::EpochNotNewer {
                    assigned: config.epoch,
                    wal: newest.epoch,
                });
            }
        }
        let store = Arc::new(store);
        let reader = LogReader::with_service(store.wal(), pools.reader(config.tuning.backend)?);
        let mut engine_config = EngineConfig::new(config.volume.clone());
        engine_config.budget = config.tuning.budget;
        engine_config.retention = config.tuning.retention_budget();
        engine_config.retry = config.tuning.retry_policy();
        engine_config.barrier_timeout_ticks = config.tuning.barrier_timeout_ticks;
        engine_config.pin_reservation_ticks = config.tuning.pin_reservation_ticks;
        let wal = store.wal();
        // After a restart the primary resumes from its durable WAL. What it
        // holds past the replicas is shipped from its WAL; nothing is revived
        // on a replica that the primary does not hold.
        let committed = wal.durable();
        let epochs =
            adapt::engine_epochs(&wal.epochs()).map_err(walship_engine::EngineError::from)?;
        let engine = Engine::restore(
            engine_config,
            Self::wal_state(&store),
            epochs,
            Lsn(committed),
        )?;
        tracing::info!(volume = %config.volume, ?report, backend = ?reader.choice(), "primary opened");
        let (head_tx, _) = watch::channel(wal.head());
        let (committed_tx, _) = watch::channel(committed);
        Ok(Self {
            metrics: MailboxMetrics::new("volume", config.volume.clone()),
            config,
            store,
            reader: Arc::new(reader),
            engine,
            senders: HashMap::new(),
            bytes_sent: HashMap::new(),
            resources: ResourceTable::default(),
            next_resource: 1,
            holds: HashMap::new(),
            head_tx,
            committed_tx,
            barriers: HashMap::new(),
            pools,
            sync_in_flight: false,
            sync_wanted: 0,
            checkpoint_in_flight: false,
            durable_seen: committed,
            started: std::time::Instant::now(),
            last_heartbeat: 0,
            wake: None,
            poisoned: None,
            me: None,
        })
    }

    pub(crate) fn metrics_arc(&self) -> Arc<MailboxMetrics> {
        Arc::clone(&self.metrics)
    }

    fn wal_state(store: &Store) -> WalState {
        let wal = store.wal();
        WalState {
            head: Lsn(wal.head()),
            tail: Lsn(wal.tail()),
            checkpoint: Lsn(store.superblock().checkpoint),
            checkpoint_trusted: true,
            newest_epoch: wal.newest_epoch().map(adapt::engine_epoch),
        }
    }

    fn assignment(&self, epoch: u64) -> Assignment {
        Assignment {
            epoch: Epoch(epoch),
            commit_mode: self.config.commit_mode,
            replicas: self
                .config
                .replicas
                .iter()
                .filter_map(|spec| {
                    let id = ReplicaId::new(&self.config.volume, &spec.server).ok()?;
                    Some(ReplicaAssignment {
                        id,
                        endpoint: Endpoint::new(spec.addr.clone(), spec.version),
                    })
                })
                .collect(),
        }
    }

    fn refresh_wal_state(&mut self) {
        if let Err(error) = self.engine.handle_wal_state(Self::wal_state(&self.store)) {
            tracing::error!(%error, "wal state refused by the engine");
        }
    }

    /// Asks for `lsn` to become durable. One group-commit sync at a time runs
    /// on the runtime's blocking pool; requests made meanwhile are served by
    /// the next one.
    fn want_sync(&mut self, lsn: u64) {
        self.sync_wanted = self.sync_wanted.max(lsn);
        if self.sync_in_flight || self.sync_wanted <= self.durable_seen {
            return;
        }
        let Some(me) = self.me.clone() else { return };
        self.sync_in_flight = true;
        let (store, target) = (Arc::clone(&self.store), self.sync_wanted);
        self.pools.blocking.run(move || {
            let result = store.sync_to(target).map_err(|e| e.to_string());
            me.do_send(LocalDurable { result });
        });
    }

    /// Engine time: ticks elapsed since the actor started.
    fn now_ticks(&self) -> u64 {
        let tick = self.config.tuning.tick.as_nanos().max(1);
        (self.started.elapsed().as_nanos() / tick) as u64
    }

    /// Moves the engine's clock to now before it handles a message (timers
    /// that fell due fire after the message, in `run_commands`).
    fn clock(&mut self) {
        self.engine.advance_clock(Tick(self.now_ticks()));
    }

    /// Wakes for the next armed engine timer or heartbeat, whichever is first.
    /// An idle volume wakes once per heartbeat interval, not every tick.
    fn on_wake(&mut self, ctx: &mut Context<Self>) {
        let now = self.now_ticks();
        if now >= self.last_heartbeat + self.config.tuning.heartbeat_every_ticks {
            self.last_heartbeat = now;
            self.heartbeat_senders();
            // Holds over budget go before the checkpointer recycles.
            self.report_retention(ctx);
            self.maybe_checkpoint();
        }
        self.run_commands(ctx);
    }

    fn reschedule(&mut self, ctx: &mut Context<Self>) {
        let heartbeat = self.last_heartbeat + self.config.tuning.heartbeat_every_ticks;
        let target = self
            .engine
            .next_timer()
            .map_or(heartbeat, |t| t.get().min(heartbeat));
        if self.wake.is_some_and(|(at, _)| at <= target) {
            return;
        }
        if let Some((_, handle)) = self.wake.take() {
            ctx.cancel_future(handle);
        }
        let at = self
            .config
            .tuning
            .tick
            .saturating_mul(u32::try_from(target).unwrap_or(u32::MAX));
        let delay = at.saturating_sub(self.started.elapsed());
        let handle = ctx.run_later(delay, |act, ctx| {
            act.wake = None;
            act.on_wake(ctx);
        });
        self.wake = Some((target, handle));
    }

    /// Heartbeats every replica's sender; idle ones answer and get retried.
    fn heartbeat_senders(&mut self) {
        let epoch = self.engine.epoch().get();
        let replicas: Vec<ReplicaId> = self.engine.replicas().cloned().collect();
        for replica in replicas {
            if let Some(sender) = self.sender_for(&replica) {
                sender.do_send(sender::Heartbeat { epoch });
            }
        }
    }

    /// Tells the engine how much WAL each retention hold keeps, and carries
    /// out what it decides (holds released over budget, or moved up).
    fn report_retention(&mut self, ctx: &mut Context<Self>) {
        let wal = self.store.wal();
        let usage: Vec<(ReplicaId, u64)> = self
            .holds
            .iter()
            .map(|(replica, pin)| (replica.clone(), wal.retained_after(pin.from())))
            .collect();
        self.engine.handle_retention_usage(&usage);
        self.run_commands(ctx);
    }

    fn maybe_checkpoint(&mut self) {
        let checkpoint = self.store.superblock().checkpoint;
        let durable = self.store.wal().durable();
        if self.checkpoint_in_flight
            || durable.saturating_sub(checkpoint) < self.config.tuning.checkpoint_every_lsns
        {
            return;
        }
        self.start_checkpoint(durable, None);
    }

    /// Checkpoints up to `target` on the blocking pool (the actix thread
    /// shared by every sender must not wait on it); `reply` hears the outcome.
    fn start_checkpoint(
        &mut self,
        target: u64,
        reply: Option<oneshot::Sender<Result<(), VolumeError>>>,
    ) {
        let Some(me) = self.me.clone() else { return };
        self.checkpoint_in_flight = true;
        let store = Arc::clone(&self.store);
        self.pools.blocking.run(move || {
            let result = store.checkpoint(target);
            let outcome = result.as_ref().map(|_| ()).map_err(|e| e.to_string());
            me.do_send(CheckpointDone { outcome });
            if let Some(reply) = reply {
                let _ = reply.send(result.map(|_| ()).map_err(VolumeError::from));
            }
        });
    }

    fn sender_context(&self, replica: &ReplicaId) -> Option<SenderContext> {
        Some(SenderContext {
            replica: replica.clone(),
            cluster: self.config.cluster.clone(),
            volume_addr: self.me.clone()?,
            reader: Arc::clone(&self.reader),
            store: Arc::clone(&self.store),
            head_rx: self.head_tx.subscribe(),
            committed_rx: self.committed_tx.subscribe(),
            tuning: self.config.tuning.clone(),
            bytes_sent: Arc::clone(self.bytes_sent.get(replica)?),
        })
    }

    fn sender_for(&mut self, replica: &ReplicaId) -> Option<MeteredAddr<SenderActor>> {
        if let Some(sender) = self.senders.get(replica).filter(|s| s.connected()) {
            return Some(sender.clone());
        }
        self.bytes_sent.entry(replica.clone()).or_default();
        let context = self.sender_context(replica)?;
        let metrics = MailboxMetrics::new("sender", replica.as_str());
        let addr = SenderActor::new(context, Arc::clone(&metrics)).start();
        let sender = MeteredAddr::new(addr, metrics);
        self.senders.insert(replica.clone(), sender.clone());
        Some(sender)
    }

    /// Executes every command the engine emits, including those that
    /// executing commands produces.
    /// Fires the timers due by now (after whatever message was just handled),
    /// executes every command the engine emits, and re-arms the wake-up.
    fn run_commands(&mut self, ctx: &mut Context<Self>) {
        let now = self.now_ticks();
        self.engine.handle_tick(Tick(now));
        loop {
            let commands = self.engine.take_commands();
            if commands.is_empty() {
                break;
            }
            for command in commands {
                self.execute(command);
            }
        }
        self.committed_tx
            .send_replace(self.engine.committed().get());
        self.reschedule(ctx);
    }

    fn execute(&mut self, command: Command) {
        match command {
            Command::Connect {
                replica,
                session,
                epoch,
                endpoint,
            } => {
                if let Some(sender) = self.sender_for(&replica) {
                    sender.do_send(sender::Assignment {
                        session,
                        epoch: epoch.get(),
                        endpoint,
                    });
                }
            }
            Command::Disconnect { replica, .. } => {
                if let Some(sender) = self.senders.remove(&replica) {
                    sender.do_send(sender::Shutdown);
                }
            }
            Command::AcquireResources {
                replica,
                session,
                requests,
                ..
            } => {
                self.acquire(&replica, session, &requests);
            }
            Command::ReleaseResources { resources, .. } => self.resources.release(&resources),
            Command::Execute {
                replica,
                session,
                plan,
                grants,
            } => {
                let ids: Vec<ResourceId> = grants.iter().map(|g| g.id).collect();
                let image = self.resources.image(&ids);
                let lease = self.resources.lease(ids);
                if let Some(sender) = self.sender_for(&replica) {
                    sender.do_send(sender::Execute {
                        session,
                        plan,
                        grants,
                        image,
                        lease,
                    });
                }
            }
            Command::CancelExecution {
                replica,
                session,
                reason,
            } => {
                if let Some(sender) = self.senders.get(&replica) {
                    sender.do_send(sender::Cancel { session, reason });
                }
            }
            Command::StartLiveShipping {
                replica,
                session,
                epoch,
                from,
            } => {
                if let Some(sender) = self.sender_for(&replica) {
                    sender.do_send(sender::StartLive {
                        session,
                        from: from.get(),
                        epoch: epoch.get(),
                    });
                }
            }
            Command::SendBarrier {
                replica,
                barrier,
                lsn,
            } => {
                if let Some(sender) = self.senders.get(&replica) {
                    sender.do_send(sender::SendBarrier {
                        id: barrier.get(),
                        lsn: lsn.get(),
                    });
                }
            }
            Command::HoldRetention { replica, from } => {
                let label = format!("{HOLD_PIN_PREFIX}{replica}");
                // The new pin is in place before the old one drops.
                match self.store.wal().pin_from(from.get(), &label) {
                    Ok(pin) => {
                        self.holds.insert(replica, pin);
                    }
                    Err(error) => {
                        self.holds.remove(&replica);
                        tracing::warn!(%replica, %error, "retention hold not placed");
                        let _ = self
                            .engine
                            .handle_retention_failed(&replica, &error.to_string());
                    }
                }
            }
            Command::ReleaseRetention { replica, reason } => {
                if self.holds.remove(&replica).is_some() {
                    tracing::info!(%replica, %reason, "retention hold released");
                }
            }
            Command::StopLiveShipping { replica, reason } => {
                if let Some(sender) = self.senders.get(&replica) {
                    sender.do_send(sender::StopLive { reason });
                }
            }
            Command::ResolveBarrier { barrier, outcome } => {
                if let Some(waiter) = self.barriers.remove(&barrier) {
                    let _ = waiter.send(outcome.map(|lsn| lsn.get()));
                }
            }
        }
    }

    /// Pins every requested resource, or none: a failure drops what was taken.
    /// Pins what a plan asks for. A full base checkpoints first (writes and
    /// fsyncs the dirty blocks), so it is pinned on the blocking pool and
    /// granted when `ResourcesPinned` comes back: the actix thread that every
    /// volume and sender shares must not wait on it. The engine's reservation
    /// timer covers the wait; a grant arriving after the session moved on is
    /// released (`stale_grant`).
    fn acquire(&mut self, replica: &ReplicaId, session: SessionId, requests: &[ResourceRequest]) {
        let label = format!("{replica} {session}");
        let snapshots = self.config.tuning.snapshot_rebuilds;
        let slow = requests
            .iter()
            .any(|r| matches!(r, ResourceRequest::FullBase { .. }));
        match self.me.clone() {
            Some(me) if slow => {
                let store = Arc::clone(&self.store);
                let requests = requests.to_vec();
                let replica = replica.clone();
                self.pools.blocking.run(move || {
                    let pinned = pin_resources(&store, snapshots, &label, &requests);
                    // If the volume stopped meanwhile, the pins drop with the message.
                    me.do_send(ResourcesPinned {
                        replica,
                        session,
                        pinned,
                    });
                });
            }
            _ => {
                let pinned = pin_resources(&self.store, snapshots, &label, requests);
                self.grant(replica, session, pinned);
            }
        }
    }

    /// Hands pinned resources (or why they could not be) to the engine.
    fn grant(&mut self, replica: &ReplicaId, session: SessionId, pinned: Pinned) {
        self.refresh_wal_state();
        let taken = match pinned {
            Ok(taken) => taken,
            Err(reason) => {
                let _ = self
                    .engine
                    .handle_resources_failed(replica, session, &reason);
                return;
            }
        };
        let mut grants = Vec::new();
        for (granted, held) in taken {
            let id = ResourceId(self.next_resource);
            self.next_resource += 1;
            self.resources.insert(id, held);
            grants.push(ResourceGrant { id, granted });
        }
        if self
            .engine
            .handle_resources_granted(replica, session, grants.clone())
            .is_err()
        {
            // The engine released them already (stale grant); make sure the guards go too.
            let ids: Vec<ResourceId> = grants.iter().map(|g| g.id).collect();
            self.resources.release(&ids);
        }
    }

    fn status(&self) -> VolumeStatus {
        let wal = self.store.wal();
        let retention = wal.retention();
        let retention_holds = retention
            .pins
            .iter()
            .filter(|p| p.pin.label.starts_with(HOLD_PIN_PREFIX))
            .count();
        let choice: &BackendChoice = self.reader.choice();
        let mut mailboxes = vec![self.metrics.snapshot()];
        let mut senders: Vec<_> = self.senders.iter().collect();
        senders.sort_by(|a, b| a.0.cmp(b.0));
        mailboxes.extend(senders.into_iter().map(|(_, s)| s.metrics().snapshot()));
        VolumeStatus {
            role: "primary",
            registry: self.engine.status(),
            head: wal.head(),
            durable: wal.durable(),
            checkpoint: self.store.superblock().checkpoint,
            tail: wal.tail(),
            recovery_pins: retention.pins.len() - retention_holds,
            retention_holds,
            snapshot_pins: self.store.snapshot_pins(),
            held_resources: self.resources.len(),
            reader_backend: format!("{:?}: {}", choice.backend, choice.reason),
            bytes_sent: {
                let mut sent: Vec<(ReplicaId, u64)> = self
                    .bytes_sent
                    .iter()
                    .map(|(r, n)| (r.clone(), n.load(Ordering::Relaxed)))
                    .collect();
                sent.sort();
                sent
            },
            mailboxes,
        }
    }
}

// ----- messages from the handle ------------------------------------------

/// Write whole blocks; returns the LSN.
#[derive(Debug, Message)]
#[rtype(result = "Result<u64, VolumeError>")]
pub struct Write {
    /// First block.
    pub lba: u64,
    /// Whole blocks.
    pub data: Bytes,
}

impl Handler<Write> for VolumeActor {
    type Result = Result<u64, VolumeError>;

    fn handle(&mut self, msg: Write, ctx: &mut Context<Self>) -> Self::Result {
        self.clock();
        if let Some(reason) = &self.poisoned {
            return Err(VolumeError::Poisoned(reason.clone()));
        }
        let lsn = self
            .store
            .write(self.engine.epoch().get(), msg.lba, msg.data)?;
        self.head_tx.send_replace(lsn);
        self.refresh_wal_state();
        self.want_sync(lsn);
        self.run_commands(ctx);
        Ok(lsn)
    }
}

/// Resolves when `lsn` (or the head) is committed under the volume's mode.
#[derive(Debug, Message)]
#[rtype(result = "Result<u64, VolumeError>")]
pub struct Barrier {
    /// LSN to wait for; the current head when `None`.
    pub lsn: Option<u64>,
}

impl Handler<Barrier> for VolumeActor {
    type Result = ResponseFuture<Result<u64, VolumeError>>;

    fn handle(&mut self, msg: Barrier, ctx: &mut Context<Self>) -> Self::Result {
        self.clock();
        let lsn = msg.lsn.unwrap_or_else(|| self.store.wal().head());
        let epoch = self.engine.epoch();
        let registered = self.engine.handle_barrier(Lsn(lsn), epoch);
        let (tx, rx) = oneshot::channel();
        if let Ok(barrier) = registered {
            self.barriers.insert(barrier, tx);
        }
        self.run_commands(ctx);
        Box::pin(async move {
            registered?;
            match rx.await {
                Ok(Ok(committed)) => Ok(committed),
                Ok(Err(failure)) => Err(VolumeError::Barrier(failure)),
                Err(_) => Err(VolumeError::Stopped),
            }
        })
    }
}

/// Reads blocks (the newest data, WAL included).
#[derive(Debug, Message)]
#[rtype(result = "Result<Bytes, VolumeError>")]
pub struct Read {
    /// First block.
    pub lba: u64,
    /// Number of blocks.
    pub blocks: u64,
}

impl Handler<Read> for VolumeActor {
    type Result = Result<Bytes, VolumeError>;

    fn handle(&mut self, msg: Read, _: &mut Context<Self>) -> Self::Result {
        Ok(self.store.read(msg.lba, msg.blocks)?)
    }
}

/// Applies a new assignment (epoch, mode, replicas).
#[derive(Debug, Message)]
#[rtype(result = "Result<(), VolumeError>")]
pub struct ApplyAssignment(pub Assignment);

impl Handler<ApplyAssignment> for VolumeActor {
    type Result = Result<(), VolumeError>;

    fn handle(&mut self, msg: ApplyAssignment, ctx: &mut Context<Self>) -> Self::Result {
        self.clock();
        // The engine cancels every session the assignment invalidates
        // (epoch bump, endpoint change, removal); its commands say so.
        if let Err(error) = self.engine.handle_assignment(msg.0) {
            match error {
                walship_engine::EngineError::StaleEpoch { .. } => self.metrics.fence(),
                _ => self.metrics.reject(),
            }
            return Err(error.into());
        }
        self.run_commands(ctx);
        Ok(())
    }
}

/// Retries every idle replica now, skipping their backoff once.
#[derive(Debug, Message)]
#[rtype(result = "()")]
pub struct Heartbeat;

impl Handler<Heartbeat> for VolumeActor {
    type Result = ();

    fn handle(&mut self, _: Heartbeat, ctx: &mut Context<Self>) {
        self.clock();
        let replicas: Vec<ReplicaId> = self.engine.replicas().cloned().collect();
        for replica in &replicas {
            let _ = self.engine.handle_retry_now(replica);
        }
        self.heartbeat_senders();
        self.run_commands(ctx);
    }
}

/// A status snapshot.
#[derive(Debug, Message)]
#[rtype(result = "VolumeStatus")]
pub struct GetStatus;

impl Handler<GetStatus> for VolumeActor {
    type Result = VolumeStatus;

    fn handle(&mut self, _: GetStatus, _: &mut Context<Self>) -> Self::Result {
        self.status()
    }
}

/// The recovery log.
#[derive(Debug, Message)]
#[rtype(result = "Result<Vec<RecoveryEvent>, VolumeError>")]
pub struct GetRecoveryLog;

impl Handler<GetRecoveryLog> for VolumeActor {
    type Result = Result<Vec<RecoveryEvent>, VolumeError>;

    fn handle(&mut self, _: GetRecoveryLog, _: &mut Context<Self>) -> Self::Result {
        Ok(self.engine.log().events().cloned().collect())
    }
}

/// Checkpoints everything durable now.
#[derive(Debug, Message)]
#[rtype(result = "Result<(), VolumeError>")]
pub struct Checkpoint;

impl Handler<Checkpoint> for VolumeActor {
    type Result = ResponseFuture<Result<(), VolumeError>>;

    fn handle(&mut self, _: Checkpoint, ctx: &mut Context<Self>) -> Self::Result {
        self.clock();
        self.report_retention(ctx);
        let (tx, rx) = oneshot::channel();
        self.start_checkpoint(self.store.wal().durable(), Some(tx));
        Box::pin(async move { rx.await.map_err(|_| VolumeError::Stopped)? })
    }
}

/// Resources pinned for one plan, or why not.
type Pinned = Result<Vec<(GrantedResource, Held)>, String>;

/// Pins `requests` in order; on the first failure, drops what it took.
fn pin_resources(
    store: &Store,
    snapshot_rebuilds: bool,
    label: &str,
    requests: &[ResourceRequest],
) -> Pinned {
    requests
        .iter()
        .map(|request| match *request {
            ResourceRequest::WalRetention { from } => store
                .wal()
                .pin_from(from.get(), label)
                .map(|pin| (GrantedResource::WalRetention { from }, Held::Wal(pin)))
                .map_err(|e| e.to_string()),
            ResourceRequest::Snapshot { .. } if !snapshot_rebuilds => {
                Err("snapshot rebuilds disabled by configuration".to_owned())
            }
            ResourceRequest::Snapshot { at } => match store.snapshot_pin(label) {
                Ok(pin) if pin.lsn() == at.get() => {
                    Ok((GrantedResource::Snapshot { at }, Held::Image(Arc::new(pin))))
                }
                Ok(pin) => Err(format!(
                    "snapshot moved: checkpoint is {} not {at}",
                    pin.lsn()
                )),
                Err(e) => Err(e.to_string()),
            },
            ResourceRequest::FullBase { .. } => store
                .full_base_pin(label)
                .map(|pin| {
                    let base_lsn = Lsn(pin.lsn());
                    (
                        GrantedResource::FullBase { base_lsn },
                        Held::Image(Arc::new(pin)),
                    )
                })
                .map_err(|e| e.to_string()),
        })
        .collect()
}

/// Resources pinned on the blocking pool for `session`.
#[derive(Debug, Message)]
#[rtype(result = "()")]
pub(crate) struct ResourcesPinned {
    replica: ReplicaId,
    session: SessionId,
    pinned: Pinned,
}

impl Handler<ResourcesPinned> for VolumeActor {
    type Result = ();

    fn handle(&mut self, msg: ResourcesPinned, ctx: &mut Context<Self>) {
        self.clock();
        self.grant(&msg.replica, msg.session, msg.pinned);
        self.run_commands(ctx);
    }
}

/// A pool checkpoint finished.
#[derive(Debug, Message)]
#[rtype(result = "()")]
pub(crate) struct CheckpointDone {
    outcome: Result<(), String>,
}

impl Handler<CheckpointDone> for VolumeActor {
    type Result = ();

    fn handle(&mut self, msg: CheckpointDone, ctx: &mut Context<Self>) {
        self.clock();
        self.checkpoint_in_flight = false;
        if let Err(error) = msg.outcome {
            tracing::error!(%error, "checkpoint failed");
        }
        self.refresh_wal_state();
        self.run_commands(ctx);
    }
}

/// crc32c of the readable volume.
#[derive(Debug, Message)]
#[rtype(result = "Result<u32, VolumeError>")]
pub struct ContentChecksum;

impl Handler<ContentChecksum> for VolumeActor {
    type Result = Result<u32, VolumeError>;

    fn handle(&mut self, _: ContentChecksum, _: &mut Context<Self>) -> Self::Result {
        Ok(self.store.content_checksum()?)
    }
}

/// The sender of one replica (benchmarks drive its mailbox directly).
#[derive(Debug, Message)]
#[rtype(result = "Option<MeteredAddr<SenderActor>>")]
pub struct GetSender(pub ReplicaId);

impl Handler<GetSender> for VolumeActor {
    type Result = Option<MeteredAddr<SenderActor>>;

    fn handle(&mut self, msg: GetSender, _: &mut Context<Self>) -> Self::Result {
        self.senders.get(&msg.0).cloned()
    }
}

/// Stops the volume.
#[derive(Debug, Message)]
#[rtype(result = "()")]
pub struct Stop;

impl Handler<Stop> for VolumeActor {
    type Result = ();

    fn handle(&mut self, _: Stop, ctx: &mut Context<Self>) {
        ctx.stop();
    }
}

// ----- internal events ------------------------------------------------------

#[derive(Debug, Message)]
#[rtype(result = "()")]
pub(crate) struct LocalDurable {
    pub(crate) result: Result<u64, String>,
}

impl Handler<LocalDurable> for VolumeActor {
    type Result = ();

    fn handle(&mut self, msg: LocalDurable, ctx: &mut Context<Self>) {
        self.clock();
        self.sync_in_flight = false;
        match msg.result {
            Ok(durable) if durable > self.durable_seen => {
                self.engine
                    .handle_local_durable(Lsn(self.durable_seen), Lsn(durable));
                self.durable_seen = durable;
            }
            Ok(_) => {}
            Err(reason) => {
                tracing::error!(%reason, "wal poisoned; refusing writes");
                self.poisoned = Some(reason);
            }
        }
        if self.poisoned.is_none() {
            self.want_sync(self.sync_wanted);
        }
        self.run_commands(ctx);
    }
}

/// What a sender or its executor reports about its replica: an engine input,
/// handed to the engine as is (the engine fences stale sessions and epochs).
#[derive(Debug, Message)]
#[rtype(result = "()")]
pub(crate) struct EngineInput(pub(crate) Input);

impl Handler<EngineInput> for VolumeActor {
    type Result = ();

    fn handle(&mut self, EngineInput(input): EngineInput, ctx: &mut Context<Self>) {
        self.clock();
        if matches!(input, Input::Handshake { .. }) {
            // Plan against the WAL as it is now: a checkpoint that finished
            // on the pool meanwhile moved the snapshot a plan would bind.
            self.refresh_wal_state();
        }
        match self.engine.handle_input(input) {
            Err(walship_engine::EngineError::StaleEpoch { .. }) => self.metrics.fence(),
            Err(error) => {
                tracing::debug!(%error, "sender report refused");
                self.metrics.reject();
            }
            Ok(()) => {}
        }
        self.run_commands(ctx);
    }
}
