//! The primary's `VolumeActor`: owns the store (WAL writer), the engine and
//! the resource table; executes the engine's commands and feeds results back
//! as events.
//!
//! - [`api`]: what the volume's handle asks (writes, barriers, reads, ...).
//! - [`durability`]: group commit and checkpoints on the blocking pool, so
//!   the actor never waits on an fsync.
//! - [`pins`]: pinning what the engine's plans ask for.

pub(crate) mod api;
mod converging;
mod durability;
pub(in crate::primary) mod pins;
pub(crate) mod progress;
mod slots;
pub(crate) mod verifying;

use super::context::{EngineInput, SenderContext};
use super::resources::ResourceTable;
use super::sender::{self, SenderActor};
use super::ship::BarrierLine;
use crate::config::PrimaryConfig;
use crate::error::VolumeError;
use crate::metered;
use crate::metrics::{MailboxMetrics, Metered, MeteredAddr};
use crate::pool::Pools;
use crate::transport;
use actix::prelude::*;
use api::*;
use durability::{CheckpointDone, CheckpointReply, LocalDurable, SyncLoop};
use pins::ResourcesPinned;
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use tokio::sync::{oneshot, watch};
use tokio_util::task::task_tracker::{TaskTracker, TaskTrackerToken};
use walship_engine::{
    Assignment, BarrierFailure, BarrierId, Command, Endpoint, Engine, EngineConfig, Epoch, Input,
    Lsn, ReplicaAssignment, ReplicaId, ReplicaState, ResourceId, Tick, WalState,
};
use walship_io::{LogReader, Store, WalPin};

/// Heartbeats in a row that must find a volume quiescent before it
/// sleeps: the first after the last write still samples what it ingested
/// (convergence) and what its senders sent.
const QUIET_HEARTBEATS: u32 = 2;

/// Label prefix of the WAL pins that are replicas' retention holds.
const HOLD_PIN_PREFIX: &str = "hold ";

/// Everything an operator sees of a primary.
/// The primary volume actor.
pub struct VolumeActor {
    config: PrimaryConfig,
    store: Arc<Store>,
    reader: Arc<LogReader>,
    engine: Engine,
    senders: HashMap<ReplicaId, MeteredAddr<SenderActor>>,
    bytes_sent: HashMap<ReplicaId, Arc<AtomicU64>>,
    /// Each sender's barrier line (a new sender gets a new one).
    barrier_lines: HashMap<ReplicaId, Arc<BarrierLine>>,
    /// Set by each sender while its replica's node is away (a redial of it
    /// watched): the sender says when it answers again, so the volume
    /// heartbeats nothing for that replica meanwhile.
    away: HashMap<ReplicaId, Arc<std::sync::atomic::AtomicBool>>,
    resources: ResourceTable,
    next_resource: u64,
    /// Each replica's retention hold, as the engine placed it.
    holds: HashMap<ReplicaId, WalPin>,
    head_tx: watch::Sender<u64>,
    committed_tx: watch::Sender<u64>,
    /// Whether the commit mode makes committed durable on the replicas
    /// (senders say so in their hellos); set with each assignment.
    durable_commits: Arc<std::sync::atomic::AtomicBool>,
    /// The replicas and their states as last told to
    /// `config.on_replica_states`.
    states_told: Vec<(ReplicaId, Option<ReplicaState>)>,
    barriers: HashMap<BarrierId, oneshot::Sender<Result<u64, BarrierFailure>>>,
    pools: Pools,
    /// The WAL's sync loop on the blocking pool.
    sync: Arc<SyncLoop>,
    /// The WAL failed: the volume refuses writes for good.
    poisoned: bool,
    checkpoint_in_flight: bool,
    /// Operators' checkpoints waiting for the WAL to be durable up to their
    /// target (a quorum may commit before the primary's own sync finishes).
    checkpoints_waiting: Vec<(u64, CheckpointReply)>,
    started: std::time::Instant,
    last_heartbeat: u64,
    /// The WAL head at the last heartbeat that judged the checkpoint of
    /// all of it (durable, no checkpoint running): a volume whose head
    /// moved since heartbeats on (its checkpoint and retention budget are
    /// judged there) before it waits out a retry without them.
    heartbeat_head: u64,
    /// Heartbeats in a row that found the volume quiescent; from
    /// [`QUIET_HEARTBEATS`] on, the volume sleeps (no wake armed).
    quiet_heartbeats: u32,
    wake: Option<(u64, SpawnHandle)>,
    /// Queued rebuilds' places, and slots not yet taken by an execution.
    slots: slots::Slots,
    /// What each sender has sent, sampled for rates.
    send_rates: progress::SendRates,
    /// An online verify is under way (one at a time).
    verify_running: bool,
    /// What the volume ingests, each replica's boost, the writes' limit.
    converging: converging::Converging,
    metrics: Arc<MailboxMetrics>,
    /// Moves when what the volume's status reports may have changed.
    activity: crate::activity::Activity,
    /// Seconds each group-commit sync of the WAL took (`walship_wal_sync_seconds`).
    sync_seconds: metrics::Histogram,
    me: Option<MeteredAddr<VolumeActor>>,
    /// What the volume's stop waits for: this actor, its senders and their
    /// executors, its jobs on the blocking pool each hold a token.
    tasks: TaskTracker,
    _alive: TaskTrackerToken,
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
        // Checked before the store was opened (`check_assignment`): taken.
        let applied = assignment_of(&self.config)
            .and_then(|assignment| Ok(self.engine.handle_assignment(assignment)?));
        if let Err(error) = applied {
            tracing::error!(%error, "initial assignment refused");
        }
        self.note_commit_mode();
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

metered!(VolumeActor: Write, Trim, Barrier, Read, ApplyAssignment, Heartbeat, GetStatus, GetRecoveryLog, Checkpoint, CheckpointDone, ResourcesPinned, slots::SlotGranted, verifying::Verify, ContentChecksum, #[cfg(feature = "testing")] GetSender, Stop, LocalDurable, EngineInput, #[cfg(feature = "faults")] crate::testing::InjectStorageFault);

impl VolumeActor {
    /// Prepares the actor on its store, opened (the runtime opens it off
    /// the actor thread; peering opens it first).
    pub(crate) fn with_store(
        config: PrimaryConfig,
        (store, report): (Arc<Store>, walship_io::StoreReport),
        pools: Pools,
        tasks: TaskTracker,
    ) -> Result<Self, VolumeError> {
        if let Some(partial) = store.partial() {
            return Err(VolumeError::PartialImage {
                image_lsn: partial.image_lsn,
            });
        }
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
        let reader = LogReader::with_service(store.wal(), pools.reader(config.tuning.backend)?);
        let mut engine_config = EngineConfig::new(config.volume.clone());
        engine_config.budget = config.tuning.budget;
        engine_config.retention = config.tuning.retention_budget();
        engine_config.retry = config.tuning.retry_policy();
        engine_config.barrier_timeout_ticks = config.tuning.barrier_timeout_ticks;
        engine_config.pin_reservation_ticks = config.tuning.pin_reservation_ticks;
        engine_config.delta_rebuilds = config.tuning.delta_rebuilds;
        engine_config.rebuild_slots = true;
        engine_config.convergence = config.tuning.convergence_policy();
        let wal = store.wal();
        // After a restart the primary resumes from its durable WAL. What it
        // holds past the replicas is shipped from its WAL; nothing is revived
        // on a replica that the primary does not hold.
        let committed = wal.durable();
        let epochs =
            transport::engine_epochs(&wal.epochs()).map_err(walship_engine::EngineError::from)?;
        let engine = Engine::restore(
            engine_config,
            Self::wal_state(&store),
            epochs,
            Lsn(committed),
        )?;
        tracing::info!(volume = %config.volume, ?report, backend = ?reader.choice(), "primary opened");
        let converging = converging::Converging::new(&config.volume, wal.head());
        let (head_tx, _) = watch::channel(wal.head());
        let (committed_tx, _) = watch::channel(committed);
        Ok(Self {
            metrics: MailboxMetrics::new("volume", config.volume.clone()),
            activity: crate::activity::Activity::default(),
            sync_seconds: metrics::histogram!("walship_wal_sync_seconds", "role" => "primary"),
            config,
            store,
            reader: Arc::new(reader),
            engine,
            senders: HashMap::new(),
            bytes_sent: HashMap::new(),
            away: HashMap::new(),
            barrier_lines: HashMap::new(),
            resources: ResourceTable::default(),
            next_resource: 1,
            holds: HashMap::new(),
            head_tx,
            committed_tx,
            durable_commits: Arc::default(),
            states_told: Vec::new(),
            barriers: HashMap::new(),
            pools,
            sync: Arc::new(SyncLoop::new(committed)),
            poisoned: false,
            checkpoint_in_flight: false,
            checkpoints_waiting: Vec::new(),
            started: std::time::Instant::now(),
            last_heartbeat: 0,
            heartbeat_head: 0,
            quiet_heartbeats: 0,
            wake: None,
            slots: slots::Slots::new(),
            send_rates: progress::SendRates::default(),
            verify_running: false,
            converging,
            me: None,
            _alive: tasks.token(),
            tasks,
        })
    }

    /// Shares `activity` with the volume's handle (before it starts).
    pub(crate) fn with_activity(mut self, activity: crate::activity::Activity) -> Self {
        activity.bump();
        self.activity = activity;
        self
    }

    /// Tells the senders' hellos whether committed is durable on replicas.
    pub(crate) fn note_commit_mode(&self) {
        let durable = self.engine.commit_mode() != walship_engine::CommitMode::BestEffort;
        self.durable_commits
            .store(durable, std::sync::atomic::Ordering::Relaxed);
    }

    /// Records what peering decided before the volume opened.
    pub(crate) fn note_peered(&mut self, peered: &walship_engine::Peering) {
        self.engine.handle_peered(peered);
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
            newest_epoch: wal.newest_epoch().map(transport::engine_epoch),
        }
    }

    fn refresh_wal_state(&mut self) {
        if let Err(error) = self.engine.handle_wal_state(Self::wal_state(&self.store)) {
            tracing::error!(%error, "wal state refused by the engine");
        }
    }

    /// Engine time: ticks elapsed since the actor started.
    fn now_ticks(&self) -> u64 {
        let tick = self.config.tuning.tick.as_nanos().max(1);
        (self.started.elapsed().as_nanos() / tick) as u64
    }

    /// Moves the engine's clock to now before it handles a message (timers
    /// that fell due fire after the message, in `run_commands`), and tells
    /// it what the WAL's sync loop made durable meanwhile.
    fn clock(&mut self) {
        self.engine.advance_clock(Tick(self.now_ticks()));
        self.read_local_durable();
    }

    /// Wakes for the next armed engine timer or heartbeat, whichever is first.
    /// An idle volume wakes once per heartbeat interval, not every tick.
    fn on_wake(&mut self, ctx: &mut Context<Self>) {
        let now = self.now_ticks();
        if now >= self.last_heartbeat + self.config.tuning.heartbeat_every_ticks {
            self.last_heartbeat = now;
            // This heartbeat judges the checkpoint (and the retention
            // budget) of everything written so far only if the WAL is
            // durable that far and no checkpoint runs: then the volume may
            // wait out a retry without heartbeats (`idle_until_retry`).
            let head = *self.head_tx.borrow();
            let judged = !self.checkpoint_in_flight && self.store.wal().durable() >= head;
            self.heartbeat_senders();
            self.sample_send_rates();
            self.report_lag();
            // Holds over budget go before the checkpointer recycles.
            self.report_retention(ctx);
            self.maybe_checkpoint();
            if judged {
                self.heartbeat_head = head;
            }
            if self.quiescent() {
                self.quiet_heartbeats = self.quiet_heartbeats.saturating_add(1);
            } else {
                self.quiet_heartbeats = 0;
            }
        }
        self.run_commands(ctx);
    }

    /// The engine finds nothing to do (every replica holds the whole log,
    /// all of it committed and durable, no barrier, no timer) and neither
    /// does the actor (no checkpoint or verify running).
    fn quiescent(&self) -> bool {
        self.config.tuning.quiesce
            && self.engine.quiescent()
            && !self.checkpoint_in_flight
            && self.checkpoints_waiting.is_empty()
            && !self.verify_running
            && !self.poisoned
    }

    /// The tick of the earliest retry, if that is all the volume waits
    /// for (`Engine::idle_until_retry`), the actor has nothing running
    /// either, and no write came since the last heartbeat (which runs the
    /// checkpointer and the retention budget).
    fn idle_until_retry(&self) -> Option<u64> {
        let still = self.config.tuning.quiesce
            && *self.head_tx.borrow() == self.heartbeat_head
            && !self.checkpoint_in_flight
            && self.checkpoints_waiting.is_empty()
            && !self.verify_running
            && !self.poisoned;
        let told = |replica: &ReplicaId| {
            self.away
                .get(replica)
                .is_some_and(|away| away.load(Ordering::Relaxed))
        };
        still
            .then(|| self.engine.idle_until_retry(told))?
            .map(|t| t.get())
    }

    /// Whether the volume sleeps: quiescent for [`QUIET_HEARTBEATS`]
    /// heartbeats in a row and still. It then arms no wake: a write, an
    /// assignment, a sender's report or a status is what it handles next.
    pub(super) fn asleep(&self) -> bool {
        self.quiet_heartbeats >= QUIET_HEARTBEATS
    }

    fn reschedule(&mut self, ctx: &mut Context<Self>) {
        if self.asleep() {
            if self.quiescent() {
                if let Some((_, handle)) = self.wake.take() {
                    ctx.cancel_future(handle);
                }
                return;
            }
            // Woken (a write, most often): heartbeats resume one interval
            // from now, so the write that woke it is not followed at once
            // by a heartbeat's round of messages.
            self.last_heartbeat = self.now_ticks();
            tracing::trace!(volume = %self.config.volume, "volume woken");
        }
        if !self.quiescent() {
            self.quiet_heartbeats = 0;
        }
        let mut heartbeat = self.last_heartbeat + self.config.tuning.heartbeat_every_ticks;
        if let Some(retry) = self.idle_until_retry() {
            // Nothing for a heartbeat to do before a replica's retry falls
            // due (the sender waiting on its peer's return says so sooner).
            heartbeat = heartbeat.max(retry);
        }
        let target = self
            .engine
            .next_timer()
            .map_or(heartbeat, |t| t.get().min(heartbeat));
        if target == u64::MAX {
            // Only replicas whose node is away wait (and no engine timer
            // is armed): their senders say when it answers (a retry,
            // which wakes the volume).
            if let Some((_, handle)) = self.wake.take() {
                ctx.cancel_future(handle);
            }
            return;
        }
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

    /// Tells the engine what the store's dirty maps cover now.
    fn report_dirty_maps(&mut self) {
        let maps = self
            .store
            .dirty_maps()
            .into_iter()
            .filter_map(|(key, info)| {
                let replica = ReplicaId::parse(&key).ok()?;
                let map = walship_engine::DirtyMap {
                    since: Lsn(info.since),
                    dirty: info.dirty,
                    regions: info.regions,
                };
                Some((replica, map))
            })
            .collect();
        self.engine
            .handle_dirty_maps(self.store.image_source(), maps);
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

    fn sender_context(
        &self,
        replica: &ReplicaId,
        (barrier_line, away): (Arc<BarrierLine>, Arc<std::sync::atomic::AtomicBool>),
    ) -> Option<SenderContext> {
        Some(SenderContext {
            replica: replica.clone(),
            cluster: self.config.cluster.clone(),
            volume: self.me.as_ref()?.recipient(),
            reader: Arc::clone(&self.reader),
            store: Arc::clone(&self.store),
            recovery: self.pools.recovery.clone(),
            head_rx: self.head_tx.subscribe(),
            committed_rx: self.committed_tx.subscribe(),
            durable_commits: Arc::clone(&self.durable_commits),
            tuning: self.config.tuning.clone(),
            links: Arc::clone(&self.pools.links),
            bytes_sent: Arc::clone(self.bytes_sent.get(replica)?),
            boosted: self.converging.boost_flag_made(replica)?,
            barrier_line,
            away,
            _alive: Arc::new(self.tasks.token()),
        })
    }

    fn sender_for(&mut self, replica: &ReplicaId) -> Option<MeteredAddr<SenderActor>> {
        if let Some(sender) = self.senders.get(replica).filter(|s| s.connected()) {
            return Some(sender.clone());
        }
        self.bytes_sent.entry(replica.clone()).or_default();
        self.converging.boost_flag(replica);
        let line = Arc::new(BarrierLine::default());
        let away = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let context = self.sender_context(replica, (Arc::clone(&line), Arc::clone(&away)))?;
        let metrics = MailboxMetrics::new("sender", replica.as_str());
        let addr = SenderActor::new(context, Arc::clone(&metrics)).start();
        let sender = MeteredAddr::new(addr, metrics);
        self.senders.insert(replica.clone(), sender.clone());
        self.barrier_lines.insert(replica.clone(), line);
        self.away.insert(replica.clone(), away);
        Some(sender)
    }

    /// Executes every command the engine emits, including those that
    /// executing commands produces.
    /// Fires the timers due by now (after whatever message was just handled),
    /// executes every command the engine emits, and re-arms the wake-up.
    fn run_commands(&mut self, ctx: &mut Context<Self>) {
        let now = self.now_ticks();
        self.read_local_durable();
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
        let committed = self.engine.committed().get();
        if self.committed_tx.send_replace(committed) != committed {
            self.activity.bump();
        }
        self.tell_replica_states();
        self.arm_local_wake();
        self.reschedule(ctx);
    }

    /// Tells `on_replica_states`, if set, when the replicas or their
    /// states differ from what it was last told.
    /// (The activity count moves with them.)
    fn tell_replica_states(&mut self) {
        let engine = &self.engine;
        let now = || engine.replicas().map(|r| (r, engine.replica_state(r)));
        let told = self.states_told.iter().map(|(r, state)| (r, *state));
        if now().eq(told) {
            return;
        }
        self.states_told = now().map(|(r, state)| (r.clone(), state)).collect();
        self.activity.bump();
        if let Some(changed) = &self.config.on_replica_states {
            (changed.0)();
        }
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
            Command::AwaitRebuildSlot { replica, session } => {
                self.await_rebuild_slot(replica, session);
            }
            Command::TrackDirty { replica, since } => {
                self.store.track_dirty(replica.as_str(), since.get());
                self.report_dirty_maps();
            }
            Command::ForgetDirty { replica } => self.store.forget_dirty(replica.as_str()),
            Command::Disconnect { replica, .. } => {
                self.barrier_lines.remove(&replica);
                self.away.remove(&replica);
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
                let slot = self.take_slot(session);
                let lease = self.resources.lease(ids).with_slot(slot);
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
                // Out of the queue, or the slot given back.
                self.slots.remove(&session);
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
                committed,
            } => {
                if let Some(line) = self.barrier_lines.get(&replica) {
                    line.send((barrier.get(), lsn.get(), committed.get()));
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
            Command::BoostRecovery { replica, boost } => {
                self.converging.boost(&replica, boost);
            }
            Command::LimitWrites { bytes_per_second } => {
                self.converging.limit_writes(bytes_per_second);
            }
            Command::ResolveBarrier { barrier, outcome } => {
                if let Some(waiter) = self.barriers.remove(&barrier) {
                    let _ = waiter.send(outcome.map(|lsn| lsn.get()));
                }
            }
        }
    }
}

impl Handler<EngineInput> for VolumeActor {
    type Result = ();

    fn handle(&mut self, EngineInput(input): EngineInput, ctx: &mut Context<Self>) {
        self.clock();
        // An ack moves a replica's flushed LSN, which reports carry.
        self.activity.bump();
        if matches!(input, Input::Handshake { .. }) {
            // Plan against the WAL as it is now: a checkpoint that finished
            // on the pool meanwhile moved the snapshot a plan would bind,
            // and marked the dirty maps.
            self.refresh_wal_state();
            self.report_dirty_maps();
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

/// Refuses, typed, an assignment the engine would refuse (an impossible
/// quorum, a replica twice, a name that cannot name a replica), before
/// the volume's store is opened: an engine as new as the volume's (epoch
/// 0, no replicas yet) takes it, so the rules are the engine's own. Taken
/// as it was, the refusal was only logged, and every write then failed.
pub(crate) fn check_assignment(config: &PrimaryConfig) -> Result<(), VolumeError> {
    let assignment = assignment_of(config)?;
    Engine::new(EngineConfig::new(config.volume.clone())).handle_assignment(assignment)?;
    Ok(())
}

/// The assignment `config` describes; a replica whose server name cannot
/// make a replica id is refused (it was dropped without a word before),
/// as is one named like the primary itself.
fn assignment_of(config: &PrimaryConfig) -> Result<Assignment, VolumeError> {
    let replicas = config
        .replicas
        .iter()
        .map(|spec| {
            if config.server.as_deref() == Some(spec.server.as_str()) {
                return Err(VolumeError::InvalidReplica(format!(
                    "{} is the primary's own name",
                    spec.server
                )));
            }
            let id = ReplicaId::new(&config.volume, &spec.server)
                .map_err(|e| VolumeError::InvalidReplica(e.to_string()))?;
            Ok(ReplicaAssignment {
                id,
                endpoint: Endpoint::new(spec.addr.clone(), spec.version),
            })
        })
        .collect::<Result<_, VolumeError>>()?;
    Ok(Assignment {
        epoch: Epoch(config.epoch),
        commit_mode: config.commit_mode,
        replicas,
    })
}
