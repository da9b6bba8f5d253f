//! The engine: one volume's replication and recovery decisions.
//!
//! # Calling order
//!
//! The shell (the actor runtime, or a test) drives the engine like this:
//!
//! 1. Feed every input that arrived with a `handle_*` method. Each returns
//!    `Ok(())` or a typed [`EngineError`]; a refused input is also recorded in
//!    the recovery log.
//! 2. Advance time with [`Engine::handle_tick`]. Timers (barrier, pin
//!    reservation, catch-up budget) fire only here, so within one tick
//!    **messages are handled before timers**. [`Engine::handle_batch`] does
//!    both steps for one tick and is the explicit form of that rule.
//! 3. Drain [`Engine::take_commands`] and execute the commands in order.
//!    Results come back as inputs in a later step 1.
//!
//! Getters take `&self` and never change state. The engine does no IO, reads
//! no clock and uses no randomness: the same inputs give the same commands.

use crate::commit::{check_topology, CommitError, CommitMode, CommitTracker, Lagging};
use crate::delta::DirtyMap;
use crate::epochs::EpochHistory;
use crate::error::EngineError;
use crate::events::{Ack, Assignment, Command, EngineConfig, Input, WalState};
use crate::history::RetainedHistory;
use crate::ids::{BarrierId, Endpoint, Epoch, Lsn, ReplicaId, ResourceId, SessionId, Tick};
use crate::log::RecoveryLog;
use crate::plan::ResourceGrant;
use crate::sender::{ReplicaState, Sender};
use crate::session::{SessionKind, SessionPhase, Stage, Work};
use std::collections::{BTreeMap, BTreeSet};

/// A timeout the engine is waiting for. Each is armed at most once: arming
/// it again moves it, and a timer whose reason went away (a resolved
/// barrier, a finished session) is cancelled rather than left to fire.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) enum Timer {
    Barrier(BarrierId),
    PinReservation {
        replica: ReplicaId,
        session: SessionId,
    },
    CatchUpBudget {
        replica: ReplicaId,
        session: SessionId,
    },
    RetentionHold {
        replica: ReplicaId,
    },
}

/// The pure recovery engine of one volume. See the module docs for the calling order.
#[derive(Debug)]
pub struct Engine {
    pub(crate) config: EngineConfig,
    pub(crate) epoch: Epoch,
    pub(crate) now: Tick,
    pub(crate) wal: WalState,
    /// The primary's epoch history: which epoch wrote which part of its log.
    pub(crate) epochs: EpochHistory,
    pub(crate) commit: CommitTracker,
    /// Boxed: a `Sender` holds its session inline (hundreds of bytes), and
    /// a B-tree leaf reserves room for 11 values, which for a volume with two
    /// replicas cost 5.6 KiB (heaptrack, P6).
    pub(crate) senders: BTreeMap<ReplicaId, Box<Sender>>,
    timers: BTreeMap<(Tick, u64), Timer>,
    /// Where each armed timer sits in `timers`, to cancel it.
    armed: BTreeMap<Timer, (Tick, u64)>,
    next_timer: u64,
    pub(crate) next_session: u64,
    pub(crate) commands: Vec<Command>,
    pub(crate) log: RecoveryLog,
    /// The primary store's image source id (see [`crate::delta`]).
    pub(crate) image_source: u64,
    /// The dirty maps the shell keeps, as it last reported them.
    pub(crate) dirty_maps: BTreeMap<ReplicaId, DirtyMap>,
    /// Replicas watched for convergence (see [`crate::converge`]).
    pub(crate) convergence: BTreeMap<ReplicaId, crate::converge::Watch>,
    /// The rate the volume's writes are held to, as last told.
    pub(crate) write_limit: Option<u64>,
}

impl Engine {
    /// A fresh primary: epoch 0, empty WAL, no replicas, best-effort commits.
    pub fn new(config: EngineConfig) -> Self {
        Self::build(config, WalState::default(), EpochHistory::new(), Lsn::ZERO)
    }

    /// A restarted primary (or a replica promoted to primary) resuming from
    /// its WAL state, its epoch history and its last committed LSN.
    pub fn restore(
        config: EngineConfig,
        wal: WalState,
        epochs: EpochHistory,
        committed: Lsn,
    ) -> Result<Self, EngineError> {
        RetainedHistory {
            head: wal.head,
            tail: wal.tail,
            committed,
            checkpoint: wal.checkpoint,
            checkpoint_trusted: wal.checkpoint_trusted,
        }
        .validate()?;
        let mut engine = Self::build(config, wal, epochs, committed);
        if let Some(newest) = wal.newest_epoch {
            engine.epochs.record(newest)?;
        }
        Ok(engine)
    }

    fn build(config: EngineConfig, wal: WalState, epochs: EpochHistory, committed: Lsn) -> Self {
        let log = RecoveryLog::new(config.log_capacity);
        let commit = CommitTracker::best_effort(committed);
        Self {
            config,
            epoch: Epoch::ZERO,
            now: Tick::ZERO,
            wal,
            epochs,
            commit,
            senders: BTreeMap::new(),
            timers: BTreeMap::new(),
            armed: BTreeMap::new(),
            next_timer: 0,
            next_session: 1,
            commands: Vec::new(),
            log,
            image_source: 0,
            dirty_maps: BTreeMap::new(),
            convergence: BTreeMap::new(),
            write_limit: None,
        }
    }

    // ----- getters -------------------------------------------------------

    /// The configuration.
    pub fn config(&self) -> &EngineConfig {
        &self.config
    }

    /// The current epoch.
    pub fn epoch(&self) -> Epoch {
        self.epoch
    }

    /// The latest tick seen.
    pub fn now(&self) -> Tick {
        self.now
    }

    /// The commit mode in force.
    pub fn commit_mode(&self) -> CommitMode {
        self.commit.mode()
    }

    /// The committed LSN.
    pub fn committed(&self) -> Lsn {
        self.commit.committed()
    }

    /// The primary's contiguous durable LSN, as reported to the engine.
    pub fn local_durable(&self) -> Lsn {
        self.commit.local_durable()
    }

    /// The lowest LSN whose local durability would resolve a waiting barrier
    /// now (see [`CommitTracker::local_durable_wanted`]).
    pub fn local_durable_wanted(&self) -> Option<Lsn> {
        self.commit.local_durable_wanted()
    }

    /// The highest LSN durable on the set the commit mode requires, from current acks.
    pub fn durable_by_mode(&self) -> Lsn {
        self.commit.durable_by_mode()
    }

    /// What the retained WAL can replay, with the committed LSN.
    pub fn history(&self) -> RetainedHistory {
        RetainedHistory {
            head: self.wal.head,
            tail: self.wal.tail,
            committed: self.commit.committed(),
            checkpoint: self.wal.checkpoint,
            checkpoint_trusted: self.wal.checkpoint_trusted,
        }
    }

    /// The primary's epoch history.
    pub fn epochs(&self) -> &EpochHistory {
        &self.epochs
    }

    /// Replica ids, in order.
    pub fn replicas(&self) -> impl Iterator<Item = &ReplicaId> {
        self.senders.keys()
    }

    /// A replica's state.
    pub fn replica_state(&self, replica: &ReplicaId) -> Option<ReplicaState> {
        self.senders.get(replica).map(|s| s.state())
    }

    /// A replica's endpoint.
    pub fn endpoint(&self, replica: &ReplicaId) -> Option<&Endpoint> {
        self.senders.get(replica).map(|s| &s.endpoint)
    }

    /// A replica's last known durable LSN.
    pub fn flushed(&self, replica: &ReplicaId) -> Option<Lsn> {
        self.senders.get(replica).map(|s| s.flushed)
    }

    /// A replica's active (non-terminal) session.
    pub fn active_session(&self, replica: &ReplicaId) -> Option<SessionId> {
        self.senders.get(replica)?.active_session().map(|s| s.id)
    }

    /// The phase of a replica's latest session, live or terminal.
    pub fn session_phase(&self, replica: &ReplicaId) -> Option<SessionPhase> {
        self.senders
            .get(replica)?
            .session
            .as_ref()
            .map(|s| s.phase())
    }

    /// Every resource the engine holds on behalf of running plans.
    pub fn held_resources(&self) -> Vec<ResourceId> {
        self.senders
            .values()
            .filter_map(|s| s.session.as_ref())
            .flat_map(|session| match &session.stage {
                Stage::Running { grants, .. } => grants.iter().map(|g| g.id).collect(),
                _ => Vec::new(),
            })
            .collect()
    }

    /// The recovery log.
    pub fn log(&self) -> &RecoveryLog {
        &self.log
    }

    /// The earliest armed timer, if any: a shell that sleeps between ticks
    /// must wake by then.
    pub fn next_timer(&self) -> Option<Tick> {
        self.timers.keys().next().map(|(at, _)| *at)
    }

    /// Whether the volume is quiescent: nothing for a shell to do until an
    /// input arrives. Every replica is in sync and holds the whole log
    /// durably, everything is committed and locally durable, no barrier
    /// waits, no timer is armed, no command is queued and no write limit
    /// is in force. A shell may then stop waking on its own (no heartbeat,
    /// no timer): the next write, assignment or report is what wakes it,
    /// and this turns false with it. A volume with no replicas is
    /// quiescent once its own log is durable.
    pub fn quiescent(&self) -> bool {
        let head = self.wal.head;
        self.timers.is_empty()
            && self.commands.is_empty()
            && self.commit.pending_barriers() == 0
            && self.commit.local_durable() >= head
            && self.commit.committed() >= head
            && self.write_limit.is_none()
            && self
                .senders
                .values()
                .all(|s| s.state() == ReplicaState::InSync && s.flushed >= head)
    }

    /// When the volume next has anything to do, if all it waits for is the
    /// retry of replicas without a session: every other replica in sync,
    /// holding the whole log; everything committed and locally durable; no
    /// barrier, command or write limit; each replica not in sync idle
    /// (disconnected, degraded or needing a rebuild, no session) with a
    /// failure's backoff armed. Its heartbeats would only be refused by
    /// that backoff until then (a heartbeat starts a replica's session once
    /// its retry time has come): a shell may skip them until the earliest
    /// retry time returned (with the engine's own timers, as always).
    /// Replicas for which `told` holds are the shell's to retry when it
    /// learns they can be reached (a redial of their node answering:
    /// [`handle_retry_now`](Self::handle_retry_now)); their retry times do
    /// not count, and if only they wait the answer is `Tick(u64::MAX)`.
    /// `None` otherwise, and when no replica waits to be retried (then see
    /// [`quiescent`](Self::quiescent)).
    ///
    /// With a node down at 10,000 volumes, the 6,666 volumes with a
    /// replica there heartbeated every 200 ms to be refused by a backoff
    /// of up to 5 s, then retried a connect the node's redial already
    /// knocked for: most of the surviving nodes' CPU in a failover.
    pub fn idle_until_retry(&self, told: impl Fn(&ReplicaId) -> bool) -> Option<Tick> {
        let head = self.wal.head;
        let idle = self.commands.is_empty()
            && self.commit.pending_barriers() == 0
            && self.commit.local_durable() >= head
            && self.commit.committed() >= head
            && self.write_limit.is_none();
        if !idle {
            return None;
        }
        let mut retry: Option<Tick> = None;
        for (replica, sender) in &self.senders {
            if sender.state() == ReplicaState::InSync && sender.flushed >= head {
                continue;
            }
            let waiting = sender.active_session().is_none()
                && matches!(
                    sender.state(),
                    ReplicaState::Disconnected
                        | ReplicaState::Degraded
                        | ReplicaState::NeedsRebuild
                );
            if !waiting {
                return None;
            }
            let at = match sender.failure.as_ref() {
                Some(_) if told(replica) => Tick(u64::MAX),
                Some(failure) => failure.retry_at,
                None => return None,
            };
            retry = Some(retry.map_or(at, |r| r.min(at)));
        }
        retry
    }

    /// Drains the commands to execute, in order.
    pub fn take_commands(&mut self) -> Vec<Command> {
        std::mem::take(&mut self.commands)
    }

    /// Records what peering decided before this primary served
    /// ([`decide_peering`](crate::decide_peering)): `peered` when the local
    /// log held everything, `primary_behind` when it was recovered from a
    /// replica first; the detail is the decision's proof.
    pub fn handle_peered(&mut self, peering: &crate::Peering) {
        let (replica, event, detail) = match peering {
            crate::Peering::Recover { from, proof, .. } => (Some(from), "primary_behind", proof),
            crate::Peering::Serve { proof, .. } => (None, "peered", proof),
            _ => return,
        };
        self.record(replica, None, event, detail.clone());
    }

    // ----- shared helpers ------------------------------------------------

    pub(crate) fn record(
        &mut self,
        replica: Option<&ReplicaId>,
        session: Option<SessionId>,
        event: &'static str,
        detail: impl Into<String>,
    ) {
        self.log.record(self.now, replica, session, event, detail);
    }

    /// Rejects (and logs) input from any epoch but the current one.
    pub(crate) fn fence(
        &mut self,
        replica: Option<&ReplicaId>,
        session: Option<SessionId>,
        got: Epoch,
        what: &str,
    ) -> Result<(), EngineError> {
        if got == self.epoch {
            return Ok(());
        }
        let current = self.epoch;
        self.record(
            replica,
            session,
            "fenced",
            format!("{what} from epoch {got}, current {current}"),
        );
        Err(EngineError::StaleEpoch { got, current })
    }

    pub(crate) fn sender(&self, replica: &ReplicaId) -> Result<&Sender, EngineError> {
        self.senders
            .get(replica)
            .map(|s| &**s)
            .ok_or_else(|| EngineError::UnknownReplica(replica.clone()))
    }

    pub(crate) fn sender_mut(&mut self, replica: &ReplicaId) -> Result<&mut Sender, EngineError> {
        self.senders
            .get_mut(replica)
            .map(|s| &mut **s)
            .ok_or_else(|| EngineError::UnknownReplica(replica.clone()))
    }

    /// Rejects (and logs) input naming a session that is not the replica's active one.
    pub(crate) fn check_session(
        &mut self,
        replica: &ReplicaId,
        session: SessionId,
        what: &str,
    ) -> Result<(), EngineError> {
        let active = self.sender(replica)?.active_session().map(|s| s.id);
        if active == Some(session) {
            return Ok(());
        }
        let detail = format!("{what} for {session}, active {active:?}");
        self.record(
            Some(replica),
            Some(session),
            "stale_session_rejected",
            detail,
        );
        Err(EngineError::StaleSession {
            replica: replica.clone(),
            got: session,
            active,
        })
    }

    pub(crate) fn schedule(&mut self, at: Tick, timer: Timer) {
        let key = (at, self.next_timer);
        self.next_timer += 1;
        if let Some(old) = self.armed.insert(timer.clone(), key) {
            self.timers.remove(&old);
        }
        self.timers.insert(key, timer);
    }

    /// Disarms `timer` if it is armed.
    pub(crate) fn cancel(&mut self, timer: &Timer) {
        if let Some(key) = self.armed.remove(timer) {
            self.timers.remove(&key);
        }
    }

    /// Disarms the timers of a session that ended or moved on.
    pub(crate) fn cancel_session_timers(&mut self, replica: &ReplicaId, session: SessionId) {
        let replica = replica.clone();
        self.cancel(&Timer::PinReservation {
            replica: replica.clone(),
            session,
        });
        self.cancel(&Timer::CatchUpBudget { replica, session });
    }

    /// Asks the shell to release `grants`, exactly once, and logs it.
    pub(crate) fn release(
        &mut self,
        replica: &ReplicaId,
        session: SessionId,
        grants: Vec<ResourceGrant>,
        reason: &str,
    ) {
        if grants.is_empty() {
            return;
        }
        let resources: Vec<ResourceId> = grants.iter().map(|g| g.id).collect();
        let names: Vec<String> = resources.iter().map(ToString::to_string).collect();
        self.record(
            Some(replica),
            Some(session),
            "exec_resources_released",
            format!("{} ({reason})", names.join(",")),
        );
        self.commands.push(Command::ReleaseResources {
            replica: replica.clone(),
            session,
            resources,
            reason: reason.to_owned(),
        });
    }

    /// Advances committed and resolves the barriers it satisfies.
    pub(crate) fn advance_commit(&mut self) {
        for (barrier, committed) in self.commit.advance() {
            self.cancel(&Timer::Barrier(barrier));
            self.barrier_done(barrier);
            self.commands.push(Command::ResolveBarrier {
                barrier,
                outcome: Ok(committed),
            });
        }
        self.request_barrier_acks();
    }

    /// A barrier resolved or failed: a request naming it has done its work
    /// (its ack, whenever it comes, is judged by the barrier's outcome), so
    /// the replica may be asked about a newer one.
    fn barrier_done(&mut self, barrier: BarrierId) {
        for sender in self.senders.values_mut() {
            if sender.barrier_requested == Some(barrier) {
                sender.barrier_requested = None;
            }
        }
    }

    // ----- assignment ------------------------------------------------------

    /// Applies the control plane's assignment: epoch, commit mode and replica set.
    ///
    /// An older epoch is fenced. A newer epoch invalidates every session (pins
    /// released, executions cancelled, barriers failed) and re-handshakes every
    /// replica. A replica whose endpoint changed keeps its identity and sender;
    /// its session is invalidated and a `Reassign` session starts. An endpoint
    /// with an older version is rejected. Nothing changes when the assignment
    /// is refused.
    pub fn handle_assignment(&mut self, assignment: Assignment) -> Result<(), EngineError> {
        self.fence_assignment(assignment.epoch)?;
        self.validate_assignment(&assignment)?;
        let bumped = assignment.epoch > self.epoch;
        if bumped {
            let detail = format!("{} -> {}", self.epoch, assignment.epoch);
            self.record(None, None, "epoch_bumped", detail);
            self.epoch = assignment.epoch;
            for (barrier, failure) in self.commit.fence_all() {
                self.cancel(&Timer::Barrier(barrier));
                self.barrier_done(barrier);
                self.commands.push(Command::ResolveBarrier {
                    barrier,
                    outcome: Err(failure),
                });
            }
        }
        let wanted: BTreeMap<ReplicaId, Endpoint> = assignment
            .replicas
            .iter()
            .map(|r| (r.id.clone(), r.endpoint.clone()))
            .collect();
        let removed: Vec<ReplicaId> = self
            .senders
            .keys()
            .filter(|id| !wanted.contains_key(*id))
            .cloned()
            .collect();
        for id in removed {
            self.invalidate(&id, "replica_removed");
            self.release_retention(&id, "replica_removed");
            self.forget_dirty(&id);
            self.senders.remove(&id);
            self.record(Some(&id), None, "replica_removed", "left the assignment");
            self.commands.push(Command::Disconnect {
                replica: id,
                reason: "replica_removed".into(),
            });
        }
        if self.commit.mode() != assignment.commit_mode {
            let detail = format!("{} -> {}", self.commit.mode(), assignment.commit_mode);
            self.record(None, None, "commit_mode_changed", detail);
        }
        self.commit
            .reconfigure(assignment.commit_mode, wanted.keys().cloned())?;
        for (id, endpoint) in wanted {
            self.reconcile_replica(id, endpoint, bumped);
        }
        self.advance_commit();
        Ok(())
    }

    fn fence_assignment(&mut self, epoch: Epoch) -> Result<(), EngineError> {
        if epoch >= self.epoch {
            return Ok(());
        }
        self.fence(None, None, epoch, "assignment")
    }

    fn validate_assignment(&mut self, assignment: &Assignment) -> Result<(), EngineError> {
        let mut seen = BTreeSet::new();
        for r in &assignment.replicas {
            if r.id.volume() != self.config.volume {
                return Err(EngineError::WrongVolume {
                    replica: r.id.clone(),
                    volume: self.config.volume.clone(),
                });
            }
            if !seen.insert(&r.id) {
                return Err(EngineError::DuplicateReplica(r.id.clone()));
            }
            let Some(sender) = self.senders.get(&r.id) else {
                continue;
            };
            let current = sender.endpoint.version;
            if r.endpoint.version < current {
                let detail = format!(
                    "offered {} while {} is in force",
                    r.endpoint, sender.endpoint
                );
                self.record(Some(&r.id), None, "stale_endpoint_rejected", detail);
                return Err(EngineError::StaleEndpoint {
                    replica: r.id.clone(),
                    got: r.endpoint.version,
                    current,
                });
            }
            if r.endpoint.version == current && r.endpoint != sender.endpoint {
                return Err(EngineError::EndpointConflict {
                    replica: r.id.clone(),
                    version: current,
                });
            }
        }
        check_topology(assignment.commit_mode, assignment.replicas.len())?;
        Ok(())
    }

    fn reconcile_replica(&mut self, id: ReplicaId, endpoint: Endpoint, bumped: bool) {
        let Some(sender) = self.senders.get_mut(&id) else {
            let detail = format!("endpoint {endpoint}");
            self.senders.insert(
                id.clone(),
                Box::new(Sender::new(id.clone(), endpoint, self.now)),
            );
            self.record(Some(&id), None, "replica_added", detail);
            // Where it stands is unknown until it answers: keep everything.
            let tail = self.wal.tail;
            self.hold_retention(&id, tail, true);
            self.start_session(&id, SessionKind::Bootstrap);
            return;
        };
        let endpoint_changed = sender.endpoint != endpoint;
        if endpoint_changed {
            let detail = format!("{} -> {endpoint}, identity kept", sender.endpoint);
            sender.endpoint = endpoint;
            self.record(Some(&id), None, "endpoint_changed", detail);
        }
        if !(endpoint_changed || bumped) {
            return;
        }
        let reason = if endpoint_changed {
            "endpoint_changed"
        } else {
            "epoch_bumped"
        };
        self.leave_sync(&id, reason);
        self.invalidate(&id, reason);
        self.start_session(&id, SessionKind::Reassign);
    }

    /// Stops live shipping to an InSync replica and stops counting it toward commits.
    pub(crate) fn leave_sync(&mut self, replica: &ReplicaId, reason: &str) {
        let Some(sender) = self.senders.get_mut(replica) else {
            return;
        };
        let was_in_sync = sender.state() == ReplicaState::InSync;
        sender.connection_lost();
        sender.barrier_requested = None;
        let durable = sender.flushed;
        self.hold_while_away(replica, was_in_sync);
        self.commit.set_in_sync(replica, false);
        if was_in_sync {
            // From here on, what it misses is marked: a rebuild, if the
            // WAL no longer covers its return, moves only that.
            self.track_dirty(replica, durable);
        }
        if was_in_sync {
            self.commands.push(Command::StopLiveShipping {
                replica: replica.clone(),
                reason: reason.to_owned(),
            });
        }
    }

    // ----- WAL, durability and barriers -------------------------------------

    /// What the shell's dirty maps cover now (it reports them before a
    /// handshake is classified, and after carrying out `TrackDirty`), and
    /// which store the primary's images come from. Replaces what was known.
    pub fn handle_dirty_maps(&mut self, image_source: u64, maps: Vec<(ReplicaId, DirtyMap)>) {
        self.image_source = image_source;
        let (known, strays): (Vec<_>, Vec<_>) = maps
            .into_iter()
            .partition(|(id, _)| self.senders.contains_key(id));
        self.dirty_maps = known.into_iter().collect();
        // A map of a replica no longer assigned (removed before the map was
        // first reported, or from an earlier run) marks for nobody.
        for (replica, _) in strays {
            self.commands.push(Command::ForgetDirty { replica });
        }
    }

    /// Tells the shell to mark what `replica` misses after `since`, unless
    /// a map is kept for it already (an older one covers more).
    pub(crate) fn track_dirty(&mut self, replica: &ReplicaId, since: Lsn) {
        if self.dirty_maps.contains_key(replica) {
            return;
        }
        // Known as asked for until the shell reports what it keeps.
        let asked = DirtyMap {
            since,
            dirty: 0,
            regions: 0,
        };
        self.dirty_maps.insert(replica.clone(), asked);
        self.commands.push(Command::TrackDirty {
            replica: replica.clone(),
            since,
        });
    }

    /// Tells the shell to stop marking for `replica`, if a map is kept.
    pub(crate) fn forget_dirty(&mut self, replica: &ReplicaId) {
        if self.dirty_maps.remove(replica).is_some() {
            self.commands.push(Command::ForgetDirty {
                replica: replica.clone(),
            });
        }
    }

    /// Records the primary WAL's head, tail, checkpoint and newest epoch.
    pub fn handle_wal_state(&mut self, wal: WalState) -> Result<(), EngineError> {
        if wal.head < self.wal.head {
            return Err(EngineError::HeadRegressed {
                from: self.wal.head,
                to: wal.head,
            });
        }
        RetainedHistory {
            head: wal.head,
            tail: wal.tail,
            committed: Lsn::ZERO,
            checkpoint: wal.checkpoint,
            checkpoint_trusted: wal.checkpoint_trusted,
        }
        .validate()?;
        if let Some(newest) = wal
            .newest_epoch
            .filter(|n| Some(*n) != self.epochs.newest())
        {
            self.epochs.record(newest)?;
            let detail = format!("epoch {} starts at {}", newest.epoch.get(), newest.first);
            self.record(None, None, "epoch_started", detail);
        }
        self.wal = wal;
        Ok(())
    }

    /// Records that the primary made `(from_exclusive, to_inclusive]` durable.
    pub fn handle_local_durable(&mut self, from_exclusive: Lsn, to_inclusive: Lsn) {
        self.commit
            .record_local_durable(from_exclusive, to_inclusive);
        self.advance_commit();
    }

    /// Records a replica's durable ack. Stale epochs are rejected outright. An
    /// ack naming a barrier that already timed out is rejected as that
    /// barrier's answer (its failure stands), though the durability it
    /// reports still counts toward later commits.
    pub fn handle_ack(&mut self, replica: &ReplicaId, ack: Ack) -> Result<(), EngineError> {
        self.fence(Some(replica), None, ack.epoch, "ack")?;
        let sender = self.sender_mut(replica)?;
        if ack.barrier.is_some() && ack.barrier == sender.barrier_requested {
            sender.barrier_requested = None;
        }
        let late = match self
            .commit
            .record_ack(replica, ack.durable, ack.told, ack.barrier)
        {
            Ok(()) => None,
            Err(error @ CommitError::LateAck { .. }) => Some(error),
            Err(error) => return Err(error.into()),
        };
        let sender = self.sender_mut(replica)?;
        if sender.state() == ReplicaState::InSync {
            if ack.durable > sender.flushed {
                // It took writes: whatever failed before is over. (Going in
                // sync is not proof enough: a full disk still says hello.)
                sender.failure = None;
            }
            sender.flushed = sender.flushed.max(ack.durable);
        }
        self.advance_commit();
        match late {
            None => Ok(()),
            Some(error) => {
                self.record(Some(replica), None, "late_ack_rejected", error.to_string());
                Err(error.into())
            }
        }
    }

    /// Asks for a barrier at `lsn`. It resolves with a `ResolveBarrier`
    /// command: at once if already committed, later when committed, or with a
    /// failure at its deadline. While it waits on replicas, in-sync ones are
    /// asked (`SendBarrier`) for a durable ack naming it, so that an ack that
    /// arrives after the deadline can be told apart and refused.
    pub fn handle_barrier(&mut self, lsn: Lsn, epoch: Epoch) -> Result<BarrierId, EngineError> {
        self.fence(None, None, epoch, "barrier")?;
        let deadline = self.now.after(self.config.barrier_timeout_ticks);
        let barrier = self.commit.register_barrier(lsn, self.wal.head, deadline)?;
        self.schedule(deadline, Timer::Barrier(barrier));
        self.advance_commit();
        Ok(barrier)
    }

    /// Asks each in-sync replica that has no request in flight, and has not
    /// already acknowledged the barrier's LSN as durable, for an ack naming
    /// the newest waiting barrier. One request at a time per replica is
    /// enough: the acks of its flushes are what commits, and a request's
    /// ack covers every LSN up to its barrier; it names one so that it can
    /// be refused if it comes after that barrier's deadline. A replica
    /// durable past the LSN has nothing left to say about it (asking it
    /// again, while the barrier waited on others, cost a round trip and a
    /// replica wake per write), unless it must still learn what was
    /// committed when the barrier was asked for and holds the whole log:
    /// no batch is coming to tell it (a FLUSH after writes that were all
    /// acknowledged; the request carries the committed LSN).
    fn request_barrier_acks(&mut self) {
        if self.commit.mode() == CommitMode::BestEffort {
            return;
        }
        let Some((barrier, lsn, tell)) = self.commit.newest_pending() else {
            return;
        };
        let (committed, head) = (self.commit.committed(), self.wal.head);
        // Enough replicas know it already: none needs asking for that.
        let told_enough = self.commit.told_by_mode() >= tell;
        for sender in self.senders.values_mut() {
            if sender.state() != ReplicaState::InSync || sender.barrier_requested.is_some() {
                continue;
            }
            let durable = self.commit.replica_durable(&sender.id);
            let behind = durable.is_none_or(|d| d < lsn);
            let untold =
                !told_enough && self.commit.must_tell(&sender.id, tell) && durable >= Some(head);
            if behind || untold {
                sender.barrier_requested = Some(barrier);
                self.commands.push(Command::SendBarrier {
                    replica: sender.id.clone(),
                    barrier,
                    lsn,
                    committed,
                });
            }
        }
    }

    // ----- time ------------------------------------------------------------

    /// Moves the clock to `now` without firing timers, so the messages that
    /// follow are handled at the right time; the next [`handle_tick`](Self::handle_tick)
    /// fires what fell due (messages first, then timers, as within a batch).
    pub fn advance_clock(&mut self, now: Tick) {
        self.now = self.now.max(now);
    }

    /// Advances time to `now` and fires every timer due by then, oldest first.
    /// A timer whose session or barrier has moved on is ignored and logged,
    /// never applied.
    pub fn handle_tick(&mut self, now: Tick) {
        self.now = self.now.max(now);
        while let Some(entry) = self.timers.first_entry() {
            if entry.key().0 > self.now {
                break;
            }
            let timer = entry.remove();
            self.armed.remove(&timer);
            self.fire(timer);
        }
    }

    /// Handles one tick's inputs: every message first, in order, then the
    /// timers due at `now`. Returns each message's result in order.
    pub fn handle_batch(&mut self, now: Tick, inputs: Vec<Input>) -> Vec<Result<(), EngineError>> {
        self.now = self.now.max(now);
        let results = inputs
            .into_iter()
            .map(|input| self.handle_input(input))
            .collect();
        self.handle_tick(now);
        results
    }

    /// Dispatches one input to its `handle_*` method.
    pub fn handle_input(&mut self, input: Input) -> Result<(), EngineError> {
        match input {
            Input::Assignment(a) => self.handle_assignment(a),
            Input::WalState(w) => self.handle_wal_state(w),
            Input::LocalDurable {
                from_exclusive,
                to_inclusive,
            } => {
                self.handle_local_durable(from_exclusive, to_inclusive);
                Ok(())
            }
            Input::Connected { replica, session } => self.handle_connected(&replica, session),
            Input::Handshake {
                replica,
                session,
                reply,
            } => self.handle_handshake(&replica, session, reply),
            Input::ResourcesGranted {
                replica,
                session,
                grants,
            } => self.handle_resources_granted(&replica, session, grants),
            Input::ResourcesFailed {
                replica,
                session,
                reason,
            } => self.handle_resources_failed(&replica, session, &reason),
            Input::Truncated {
                replica,
                session,
                epoch,
                to,
            } => self.handle_truncated(&replica, session, epoch, to),
            Input::CatchUpProgress {
                replica,
                session,
                epoch,
                progress,
            } => self.handle_catchup_progress(&replica, session, epoch, progress),
            Input::RebuildProgress {
                replica,
                session,
                epoch,
                progress,
            } => self.handle_rebuild_progress(&replica, session, epoch, progress),
            Input::ExecutionFailed {
                replica,
                session,
                failure,
            } => self.handle_execution_failed(&replica, session, failure),
            Input::Disconnected { replica, failure } => {
                self.handle_disconnected(&replica, &failure)
            }
            Input::RetryNow { replica } => self.handle_retry_now(&replica),
            Input::Heartbeat { replica, epoch } => self.handle_heartbeat(&replica, epoch),
            Input::Ack { replica, ack } => self.handle_ack(&replica, ack),
            Input::RetentionUsage { usage } => {
                self.handle_retention_usage(&usage);
                Ok(())
            }
            Input::RetentionFailed { replica, reason } => {
                self.handle_retention_failed(&replica, &reason)
            }
            Input::Lag { ingested, backlogs } => {
                self.handle_lag(ingested, &backlogs);
                Ok(())
            }
        }
    }

    fn fire(&mut self, timer: Timer) {
        match timer {
            Timer::Barrier(barrier) => {
                self.barrier_done(barrier);
                self.expire_barrier(barrier);
                self.request_barrier_acks();
            }
            Timer::PinReservation { replica, session } => {
                let reserving = self
                    .senders
                    .get(&replica)
                    .and_then(|s| s.active_session())
                    .is_some_and(|s| s.id == session && matches!(s.stage, Stage::Reserving { .. }));
                if reserving {
                    self.record(Some(&replica), Some(session), "pin_reservation_timeout", "");
                    self.fail_reservation(&replica, "pin_reservation_timeout");
                } else {
                    self.stale_timer(&replica, session, "pin_reservation");
                }
            }
            Timer::CatchUpBudget { replica, session } => self.check_budget(&replica, session),
            Timer::RetentionHold { replica } => self.fire_retention_timer(&replica),
        }
    }

    /// Fails a barrier at its deadline, naming each lagging replica with
    /// its state and the cause of its last failure.
    fn expire_barrier(&mut self, barrier: BarrierId) {
        let senders = &self.senders;
        let expired = self.commit.expire(barrier, |replica| {
            let sender = senders.get(replica);
            Lagging {
                replica: replica.clone(),
                state: sender.map_or(ReplicaState::Disconnected, |s| s.state()),
                cause: sender
                    .and_then(|s| s.failure.as_ref())
                    .map(ToString::to_string),
            }
        });
        match expired {
            Some(failure) => {
                self.record(None, None, "barrier_timeout", failure.to_string());
                self.commands.push(Command::ResolveBarrier {
                    barrier,
                    outcome: Err(failure),
                });
            }
            None => {
                let detail = format!("barrier {barrier} already resolved");
                self.record(None, None, "stale_timeout_ignored", detail);
            }
        }
    }

    pub(crate) fn stale_timer(&mut self, replica: &ReplicaId, session: SessionId, what: &str) {
        let detail = format!("{what} timer for {session}, which has moved on");
        self.record(
            Some(replica),
            Some(session),
            "stale_timeout_ignored",
            detail,
        );
    }

    fn check_budget(&mut self, replica: &ReplicaId, session: SessionId) {
        let now = self.now;
        let verdict = self
            .senders
            .get(replica)
            .and_then(|s| s.active_session())
            .filter(|s| s.id == session)
            .and_then(|s| match &s.stage {
                Stage::Running {
                    work: Work::CatchUp { budget, .. },
                    ..
                } => Some(budget.check(now).map(|()| budget.next_deadline())),
                _ => None,
            });
        match verdict {
            None => self.stale_timer(replica, session, "catch_up_budget"),
            Some(Err(violation)) => self.escalate(replica, &violation.to_string()),
            Some(Ok(next)) => {
                if let Some(at) = next.filter(|at| *at > now) {
                    self.schedule(
                        at,
                        Timer::CatchUpBudget {
                            replica: replica.clone(),
                            session,
                        },
                    );
                }
            }
        }
    }
}
