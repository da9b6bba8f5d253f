//! The runtime: an actix system on its own thread, so any tokio service (or
//! plain thread) can embed it, and the handles to the volumes spawned in it.

use crate::config::{Listen, VolumeConfig};
use crate::error::VolumeError;
use crate::metrics::{MailboxMetrics, MailboxSnapshot, MeteredAddr, Tracked};
use crate::pool::{ArbiterPool, BlockingPool, Pools};
use crate::primary::{self as volume, VolumeActor, VolumeStatus};
use crate::replica::listener::{self, ReplicationListener};
use crate::replica::receiver::{
    GetReplicaStatus, ReceiverActor, ReplicaChecksum, ReplicaRead, ReplicaStatus, StopReceiver,
};
use actix::prelude::*;
use bytes::Bytes;
use serde::Serialize;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};
use tokio::sync::{oneshot, watch};
use tokio_util::task::TaskTracker;
use walship_engine::{Assignment, RecoveryEvent, ReplicaId, ReplicaState};
use walship_io::{Store, StoreOptions};

/// Runs futures on the thread of a runtime's volume actors; it does not
/// keep the runtime alive.
#[derive(Debug, Clone)]
pub struct VolumeThread(ArbiterHandle);

impl VolumeThread {
    /// Runs `fut` there; false if the runtime has stopped.
    pub fn spawn(&self, fut: impl std::future::Future<Output = ()> + Send + 'static) -> bool {
        self.0.spawn(fut)
    }
}

/// The actix system running walship's actors. Dropping it stops every volume.
#[derive(Debug)]
pub struct Runtime {
    system: System,
    arbiter: ArbiterHandle,
    pools: Pools,
    thread: Option<JoinHandle<()>>,
    /// Each spawned volume's tasks, for a shutdown that waits for them.
    volumes: Mutex<Vec<TaskTracker>>,
}

impl Runtime {
    /// The recovery budget every catch-up and rebuild of this runtime's
    /// volumes shares: its limits change at run time
    /// ([`RecoveryBudget::set_limits`]); live shipping is never in it.
    pub fn recovery(&self) -> crate::recovery::RecoveryBudget {
        self.pools.recovery.clone()
    }

    /// Starts the actix system on a dedicated thread.
    pub fn start() -> Result<Self, VolumeError> {
        let (tx, rx) = std::sync::mpsc::channel();
        let thread = std::thread::Builder::new()
            .name("walship-actix".into())
            .spawn(move || {
                let system = System::new();
                let handles = system.block_on(async {
                    let blocking = BlockingPool::new("walship-blocking", BLOCKING_THREADS)
                        .map(|blocking| Pools::new(blocking, ArbiterPool::new(RECEIVER_ARBITERS)));
                    (System::current(), Arbiter::current(), blocking)
                });
                let _ = tx.send(handles);
                let _ = system.run();
            })
            .map_err(|e| VolumeError::Runtime(format!("spawn actix thread: {e}")))?;
        let (system, arbiter, pools) = rx
            .recv()
            .map_err(|_| VolumeError::Runtime("actix system did not start".into()))?;
        let pools = pools.map_err(|e| VolumeError::Runtime(format!("start blocking pool: {e}")))?;
        Ok(Self {
            system,
            arbiter,
            pools,
            thread: Some(thread),
            volumes: Mutex::default(),
        })
    }

    /// Spawns a primary or replica volume and returns its handle.
    pub async fn spawn_volume(&self, config: VolumeConfig) -> Result<VolumeHandle, VolumeError> {
        let (tx, rx) = oneshot::channel();
        let (pools, tasks) = (self.pools.clone(), self.volume_tasks());
        let sent = self.arbiter.spawn(async move {
            let _ = tx.send(start_volume(config, pools, tasks).await);
        });
        if !sent {
            return Err(VolumeError::Stopped);
        }
        rx.await.map_err(|_| VolumeError::Stopped)?
    }

    /// [`spawn_volume`](Self::spawn_volume) for callers outside async code.
    pub fn spawn_volume_blocking(&self, config: VolumeConfig) -> Result<VolumeHandle, VolumeError> {
        let (tx, rx) = std::sync::mpsc::channel();
        let (pools, tasks) = (self.pools.clone(), self.volume_tasks());
        let sent = self.arbiter.spawn(async move {
            let _ = tx.send(start_volume(config, pools, tasks).await);
        });
        if !sent {
            return Err(VolumeError::Stopped);
        }
        rx.recv().map_err(|_| VolumeError::Stopped)?
    }

    /// Starts a node's replication listener for `cluster` on `listen`:
    /// replicas spawned with [`Listen::Shared`] take their connections
    /// from it, routed by the volume each hello names.
    pub fn replication_listener(
        &self,
        cluster: &str,
        listen: &str,
    ) -> Result<ReplicationListener, VolumeError> {
        let (listener, run) = ReplicationListener::new(cluster.to_owned(), bind(listen)?)
            .map_err(|e| listen_error(listen, &e))?;
        // On the links' thread: it serves every multiplexed connection
        // (and its probe's echo) where the link's own driver runs.
        if !self.pools.links.spawn(run) {
            return Err(VolumeError::Stopped);
        }
        Ok(listener)
    }

    /// Multiplexed connections to peer nodes that are up (sessions of
    /// primaries with `Tuning::multiplex`).
    pub async fn peer_links(&self) -> usize {
        self.pools.links.count().await
    }

    /// The arbiter walship's actors run on, for services that want their own
    /// actors on the same system (and for benchmarks comparing against them).
    pub fn arbiter(&self) -> &ArbiterHandle {
        &self.arbiter
    }

    /// The thread the volumes' actors run on, for a service whose requests
    /// go to them (a request, the actor and the reply then share a thread).
    pub fn volume_thread(&self) -> VolumeThread {
        VolumeThread(self.arbiter.clone())
    }

    /// A new volume's task tracker, kept for shutdown (stopped volumes'
    /// trackers are let go here).
    fn volume_tasks(&self) -> TaskTracker {
        let tasks = TaskTracker::new();
        let mut volumes = self.volumes.lock().unwrap_or_else(PoisonError::into_inner);
        volumes.retain(|t| !(t.is_closed() && t.is_empty()));
        volumes.push(tasks.clone());
        tasks
    }

    /// Stops every actor and returns once every volume has stopped as
    /// [`VolumeHandle::stop`] says: listeners closed, connections and
    /// executor tasks ended, stores and their locks released.
    pub fn shutdown(mut self) {
        self.stop_and_join();
    }

    fn stop_and_join(&mut self) {
        // Stopping the system stops its arbiters, which drops every actor
        // and task on them; jobs on the blocking pool finish on their own.
        self.system.stop();
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
        let volumes =
            std::mem::take(&mut *self.volumes.lock().unwrap_or_else(PoisonError::into_inner));
        for tasks in volumes {
            tasks.close();
            futures::executor::block_on(tasks.wait());
        }
    }
}

impl Drop for Runtime {
    fn drop(&mut self) {
        self.stop_and_join();
    }
}

/// Threads running WAL syncs and checkpoints for every volume of a runtime.
const BLOCKING_THREADS: usize = 4;
/// Arbiters shared by replica receivers.
const RECEIVER_ARBITERS: usize = 2;

async fn start_volume(
    config: VolumeConfig,
    pools: Pools,
    tasks: TaskTracker,
) -> Result<VolumeHandle, VolumeError> {
    if let VolumeConfig::Primary(config) = &config {
        crate::primary::check_assignment(config)?;
    }
    let activity = crate::activity::Activity::default();
    match config {
        VolumeConfig::Primary(config) if !config.peering.enabled => {
            let opened = open_store(&config.dir, config.store.clone()).await?;
            let actor = VolumeActor::with_store(
                config,
                (Arc::new(opened.0), opened.1),
                pools,
                tasks.clone(),
            )?
            .with_activity(activity.clone());
            let metrics = actor.metrics_arc();
            let addr = MeteredAddr::new(actor.start(), metrics);
            let (_, opening) = watch::channel(Opening::Open(addr));
            Ok(VolumeHandle {
                inner: Inner::Primary(PrimaryRef::new(opening, Duration::ZERO)),
                activity,
                tasks,
                stopping: Arc::new(watch::channel(false).0),
            })
        }
        VolumeConfig::Primary(config) => {
            // Errors the store finds (size, corruption) are the caller's at once.
            let opened = open_store(&config.dir, config.store.clone()).await?;
            let ticks = u32::try_from(config.tuning.barrier_timeout_ticks).unwrap_or(u32::MAX);
            let patience = config.tuning.tick.saturating_mul(ticks);
            let (opening_tx, opening) =
                watch::channel(Opening::Peering(PeeringStatus::new(&config.volume)));
            let stopping = Arc::new(watch::channel(false).0);
            let mut stop = stopping.subscribe();
            let token = tasks.token();
            let volume_tasks = tasks.clone();
            let opened_activity = activity.clone();
            actix::spawn(async move {
                let _token = token;
                let volume = config.volume.clone();
                let open = open_after_peering(
                    config,
                    opened,
                    (pools, volume_tasks),
                    opened_activity,
                    &opening_tx,
                );
                tokio::select! {
                    opened = open => {
                        let _ = opening_tx.send(match opened {
                            Ok(addr) => Opening::Open(addr),
                            Err(error) => {
                                tracing::error!(%volume, %error, "primary did not open");
                                let mut failed = PeeringStatus::new(&volume);
                                failed.state = "failed";
                                failed.reason = error.to_string();
                                Opening::Failed(failed)
                            }
                        });
                    }
                    _ = stop.wait_for(|stopping| *stopping) => {}
                }
            });
            Ok(VolumeHandle {
                inner: Inner::Primary(PrimaryRef::new(opening, patience)),
                activity,
                tasks,
                stopping,
            })
        }
        VolumeConfig::Replica(config) => {
            let id = ReplicaId::new(&config.volume, &config.server)
                .map_err(|e| VolumeError::Runtime(e.to_string()))?;
            // A replica whose catch-up a crash interrupted starts over.
            let options = StoreOptions {
                reset_interrupted_run: true,
                ..config.store.clone()
            };
            let (store, report) = open_store(&config.dir, options).await?;
            if let Some(checkpoint) = report.reset_after_interrupted_run {
                tracing::warn!(replica = %id, checkpoint, "a crash interrupted committed frames written straight to the extent after this checkpoint: the replica starts over empty");
            }
            let store = Arc::new(store);
            let metrics = MailboxMetrics::new("receiver", id.as_str());
            let actor = ReceiverActor::new(
                store,
                config.volume.clone(),
                id.as_str().to_owned(),
                config.checkpoint_every_lsns,
                Arc::clone(&metrics),
                pools.blocking.clone(),
                tasks.clone(),
            )
            .with_activity(activity.clone());
            // The receiver, its accept loop and its connection tasks share
            // one arbiter: the connection task's socket reads then run beside
            // the receiver's writes instead of on the thread of the primaries
            // and senders (which, in one process, also does their sends).
            let arbiter = pools.receivers.pick();
            let addr = ReceiverActor::start_in_arbiter(arbiter, move |_| actor);
            let receiver = MeteredAddr::new(addr, metrics);
            let (shutdown, shutdown_rx) = watch::channel(false);
            let route = listener::Route {
                receiver: receiver.clone(),
                tasks: tasks.clone(),
                shutdown: shutdown_rx,
                arbiter: arbiter.clone(),
                recovery: pools.recovery.clone(),
            };
            let (listen, shared) = match config.listen {
                Listen::Addr(listen) => {
                    let listener = bind(&listen)?;
                    let local = listener
                        .local_addr()
                        .map_err(|e| VolumeError::Runtime(format!("listen on {listen}: {e}")))?;
                    let spawned = arbiter.spawn(tasks.track_future(async move {
                        // Registered with the arbiter's reactor, where it is polled.
                        match tokio::net::TcpListener::from_std(listener) {
                            Ok(listener) => listener::accept_loop(listener, route).await,
                            Err(e) => tracing::error!(error = %e, "replica listener"),
                        }
                    }));
                    if !spawned {
                        return Err(VolumeError::Runtime("receiver arbiter stopped".into()));
                    }
                    (local, None)
                }
                Listen::Shared(shared) => {
                    if !shared.register(&config.volume, route) {
                        receiver.do_send(StopReceiver);
                        return Err(VolumeError::Runtime(format!(
                            "the node already hosts a replica of volume {}",
                            config.volume
                        )));
                    }
                    (shared.local_addr(), Some((shared, config.volume)))
                }
            };
            Ok(VolumeHandle {
                inner: Inner::Replica {
                    receiver,
                    listen,
                    shared: shared.map(Arc::new),
                },
                activity,
                tasks,
                stopping: Arc::new(shutdown),
            })
        }
    }
}

/// Opens (or creates) a store on a blocking thread: a store created is
/// several files and directories, each synced, and the arbiter the
/// volumes start on runs every actor meanwhile. Opened this way, a node
/// starts many volumes at once (issue 27: 10,000 volumes' stores one
/// after the other on the actor thread took most of a minute).
async fn open_store(
    dir: &std::path::Path,
    options: walship_io::StoreOptions,
) -> Result<(Store, walship_io::StoreReport), VolumeError> {
    let dir = dir.to_path_buf();
    tokio::task::spawn_blocking(move || Store::open(&dir, options))
        .await
        .map_err(|e| VolumeError::Runtime(format!("store open: {e}")))?
        .map_err(VolumeError::from)
}

/// Peers with the replicas (recovering what they hold that this store
/// lacks), then opens the volume actor in the term peering chose.
async fn open_after_peering(
    mut config: crate::config::PrimaryConfig,
    (store, report): (Store, walship_io::StoreReport),
    (pools, tasks): (Pools, TaskTracker),
    activity: crate::activity::Activity,
    opening: &watch::Sender<Opening>,
) -> Result<MeteredAddr<VolumeActor>, VolumeError> {
    let waiting = |round, have, need, reason: &str| {
        opening.send_modify(|opening| {
            if let Opening::Peering(status) = opening {
                status.round = round;
                status.have = have;
                status.need = need;
                status.reason = reason.to_owned();
            }
        });
    };
    let store = Arc::new(store);
    let peered = crate::primary::peering::peer_before_serving(
        &mut config,
        &pools.links,
        &store,
        &tasks,
        report.torn_bytes_dropped > 0,
        waiting,
    )
    .await?;
    let mut actor =
        VolumeActor::with_store(config, (store, report), pools, tasks)?.with_activity(activity);
    actor.note_peered(&peered);
    let metrics = actor.metrics_arc();
    Ok(MeteredAddr::new(actor.start(), metrics))
}

fn listen_error(listen: &str, error: &std::io::Error) -> VolumeError {
    VolumeError::Runtime(format!("listen on {listen}: {error}"))
}

/// Binds a nonblocking std listener, to be registered with the reactor of
/// the arbiter that polls it.
fn bind(listen: &str) -> Result<std::net::TcpListener, VolumeError> {
    let listener = std::net::TcpListener::bind(listen).map_err(|e| listen_error(listen, &e))?;
    listener
        .set_nonblocking(true)
        .map_err(|e| listen_error(listen, &e))?;
    Ok(listener)
}

/// Where a primary's opening stands: it peers with its replicas before
/// its actor exists (see `primary::peering`).
#[derive(Debug, Clone)]
enum Opening {
    Peering(PeeringStatus),
    Open(MeteredAddr<VolumeActor>),
    /// It did not open (`state: failed`, the reason why): for good.
    Failed(PeeringStatus),
}

/// A primary still peering with its replicas, for operators: it takes no
/// request until it has heard from the replicas its mode needs.
#[derive(Debug, Clone, Serialize)]
#[non_exhaustive]
pub struct PeeringStatus {
    /// Role (`primary`).
    pub role: &'static str,
    /// The volume.
    pub volume: String,
    /// What it is doing: `peering`, or `failed` (for good: why is the
    /// reason; a restart or a new assignment opens it again).
    pub state: &'static str,
    /// Rounds of asking so far that did not end in serving.
    pub round: u64,
    /// Answers in the last round.
    pub have: usize,
    /// Answers needed.
    pub need: usize,
    /// Why that many.
    pub reason: String,
}

impl PeeringStatus {
    fn new(volume: &str) -> Self {
        Self {
            role: "primary",
            volume: volume.to_owned(),
            state: "peering",
            round: 0,
            have: 0,
            need: 0,
            reason: "asking the replicas".to_owned(),
        }
    }
}

/// A primary's side of the handle: its actor once open (read without a
/// lock on every request), where its opening stands, and how long a request
/// waits for it (the barrier timeout).
#[derive(Debug)]
struct PrimaryRef {
    open: std::sync::OnceLock<MeteredAddr<VolumeActor>>,
    opening: watch::Receiver<Opening>,
    patience: Duration,
}

impl PrimaryRef {
    fn new(opening: watch::Receiver<Opening>, patience: Duration) -> Arc<Self> {
        let open = std::sync::OnceLock::new();
        if let Opening::Open(addr) = &*opening.borrow() {
            let _ = open.set(addr.clone());
        }
        Arc::new(Self {
            open,
            opening,
            patience,
        })
    }
}

#[derive(Debug, Clone)]
enum Inner {
    Primary(Arc<PrimaryRef>),
    Replica {
        receiver: MeteredAddr<ReceiverActor>,
        listen: SocketAddr,
        /// The node's listener routing to it, and the volume it routes by.
        shared: Option<Arc<(ReplicationListener, String)>>,
    },
}

/// A volume's status, primary or replica.
#[derive(Debug, Clone, Serialize)]
#[serde(untagged)]
pub enum NodeStatus {
    /// A primary.
    Primary(Box<VolumeStatus>),
    /// A replica.
    Replica(Box<ReplicaStatus>),
    /// A primary still peering with its replicas before it serves.
    Peering(Box<PeeringStatus>),
}

impl NodeStatus {
    /// The mailboxes of the volume's actors.
    pub fn mailboxes(&self) -> &[MailboxSnapshot] {
        match self {
            Self::Primary(status) => &status.mailboxes,
            Self::Replica(status) => std::slice::from_ref(&status.mailbox),
            Self::Peering(_) => &[],
        }
    }
}

/// The handle to a spawned volume. Cheap to clone; usable from any thread.
#[derive(Debug, Clone)]
pub struct VolumeHandle {
    inner: Inner,
    /// Moves when what the volume's status reports may have changed.
    activity: crate::activity::Activity,
    /// Everything that holds the volume's store or a connection holds a
    /// token of it: [`stop`](VolumeHandle::stop) waits for the last one.
    tasks: TaskTracker,
    /// Set when [`stop`](VolumeHandle::stop) begins: a replica's connection
    /// tasks end on it, and whoever serves the volume to clients (an NBD
    /// connection) learns that this handle is done.
    stopping: Arc<watch::Sender<bool>>,
}

fn stopped<T>(_: T) -> VolumeError {
    VolumeError::Stopped
}

impl VolumeHandle {
    /// The primary's actor, once peering opened it: requests made while
    /// it peers wait (a client's reads too: the store may not hold the
    /// volume's data yet).
    async fn primary(&self) -> Result<&MeteredAddr<VolumeActor>, VolumeError> {
        let Inner::Primary(primary) = &self.inner else {
            return Err(VolumeError::NotPrimary);
        };
        if let Some(addr) = primary.open.get() {
            return Ok(addr);
        }
        let mut opening = primary.opening.clone();
        let mut stopping = self.stopping.subscribe();
        let deadline = tokio::time::sleep(primary.patience);
        tokio::pin!(deadline);
        loop {
            let peering = match &*opening.borrow_and_update() {
                Opening::Open(addr) => return Ok(primary.open.get_or_init(|| addr.clone())),
                Opening::Failed(failed) => {
                    return Err(VolumeError::OpenFailed(failed.reason.clone()))
                }
                Opening::Peering(status) => status.clone(),
            };
            tokio::select! {
                changed = opening.changed() => changed.map_err(stopped)?,
                _ = stopping.wait_for(|stopping| *stopping) => return Err(VolumeError::Stopped),
                () = &mut deadline => {
                    return Err(VolumeError::Peering(format!(
                        "{} of {} needed answered ({})",
                        peering.have, peering.need, peering.reason
                    )))
                }
            }
        }
    }

    /// Returns once [`stop`](Self::stop) has begun on this volume (at once
    /// if it has): the handle answers nothing from then on.
    pub async fn stopping(&self) {
        let mut stopping = self.stopping.subscribe();
        let _ = stopping.wait_for(|stopping| *stopping).await;
    }

    /// A count that moves whenever what this volume's
    /// [`status`](Self::status) reports may have changed: a primary's
    /// committed LSN, its replicas' states or acknowledgements, its
    /// opening after peering; a replica's frames received or connection
    /// closed. An idle volume's stays put, so a reporter that compares it
    /// with what it last saw asks idle volumes nothing.
    pub fn activity(&self) -> u64 {
        self.activity.get()
    }

    /// Whether [`stop`](Self::stop) has begun.
    pub fn is_stopping(&self) -> bool {
        *self.stopping.borrow()
    }

    /// Whether this is a primary still peering with its replicas: it
    /// takes requests, but answers none until it has opened.
    pub fn is_peering(&self) -> bool {
        matches!(&self.inner, Inner::Primary(primary) if matches!(*primary.opening.borrow(), Opening::Peering(_)))
    }

    /// Whether the volume's actor is running: a replica's always, a
    /// primary's once peering opened it (not while it peers, nor if it
    /// failed to open).
    pub fn has_opened(&self) -> bool {
        match &self.inner {
            Inner::Primary(primary) => matches!(*primary.opening.borrow(), Opening::Open(_)),
            Inner::Replica { .. } => true,
        }
    }

    /// Whether this is a primary.
    pub fn is_primary(&self) -> bool {
        matches!(self.inner, Inner::Primary(..))
    }

    /// Where a replica listens.
    pub fn listen_addr(&self) -> Option<SocketAddr> {
        match &self.inner {
            Inner::Replica { listen, .. } => Some(*listen),
            Inner::Primary(..) => None,
        }
    }

    /// Asks the primary's volume actor; its answer is the volume's.
    async fn ask<M>(&self, msg: M) -> Result<u64, VolumeError>
    where
        M: Message<Result = Result<u64, VolumeError>> + Send + 'static,
        VolumeActor: Handler<Tracked<M>>,
    {
        self.primary().await?.send(msg).await.map_err(stopped)?
    }

    /// Writes whole 4 KiB blocks at `lba`; returns the LSN (not yet committed).
    pub async fn write(&self, lba: u64, data: Bytes) -> Result<u64, VolumeError> {
        let commit = false;
        self.ask(volume::Write { lba, data, commit }).await
    }

    /// [`write`](Self::write), resolving once the write is committed under
    /// the volume's mode (a FUA write): [`barrier_at`](Self::barrier_at) its
    /// LSN, in one trip to the volume instead of two.
    pub async fn write_committed(&self, lba: u64, data: Bytes) -> Result<u64, VolumeError> {
        let commit = true;
        self.ask(volume::Write { lba, data, commit }).await
    }

    /// Zeroes `blocks` whole blocks at `lba`; returns the LSN (not yet committed).
    pub async fn trim(&self, lba: u64, blocks: u64) -> Result<u64, VolumeError> {
        let commit = false;
        self.ask(volume::Trim {
            lba,
            blocks,
            commit,
        })
        .await
    }

    /// [`trim`](Self::trim), resolving once the trim is committed.
    pub async fn trim_committed(&self, lba: u64, blocks: u64) -> Result<u64, VolumeError> {
        let commit = true;
        self.ask(volume::Trim {
            lba,
            blocks,
            commit,
        })
        .await
    }

    /// Resolves when everything written so far is committed under the volume's mode.
    pub async fn barrier(&self) -> Result<u64, VolumeError> {
        self.ask(volume::Barrier { lsn: None }).await
    }

    /// Resolves when `lsn` is committed under the volume's mode.
    pub async fn barrier_at(&self, lsn: u64) -> Result<u64, VolumeError> {
        self.ask(volume::Barrier { lsn: Some(lsn) }).await
    }

    /// Same as [`barrier`](Self::barrier).
    pub async fn flush(&self) -> Result<u64, VolumeError> {
        self.barrier().await
    }

    /// Reads `blocks` blocks at `lba`: the newest data.
    pub async fn read(&self, lba: u64, blocks: u64) -> Result<Bytes, VolumeError> {
        match &self.inner {
            Inner::Primary(..) => self
                .primary()
                .await?
                .send(volume::Read { lba, blocks })
                .await
                .map_err(stopped)?,
            Inner::Replica { receiver, .. } => Ok(receiver
                .send(ReplicaRead { lba, blocks })
                .await
                .map_err(stopped)??),
        }
    }

    /// Applies a new assignment (primary).
    pub async fn apply_assignment(&self, assignment: Assignment) -> Result<(), VolumeError> {
        self.primary()
            .await?
            .send(volume::ApplyAssignment(assignment))
            .await
            .map_err(stopped)?
    }

    /// Retries idle replicas now (primary).
    pub async fn heartbeat(&self) -> Result<(), VolumeError> {
        self.primary()
            .await?
            .send(volume::Heartbeat)
            .await
            .map_err(stopped)
    }

    /// The status, serializable to JSON.
    pub async fn status(&self) -> Result<NodeStatus, VolumeError> {
        match &self.inner {
            Inner::Primary(primary) => {
                let peering = match &*primary.opening.borrow() {
                    Opening::Peering(status) | Opening::Failed(status) => Some(status.clone()),
                    Opening::Open(_) => None,
                };
                match peering {
                    Some(status) => Ok(NodeStatus::Peering(Box::new(status))),
                    None => Ok(NodeStatus::Primary(Box::new(self.primary_status().await?))),
                }
            }
            Inner::Replica { receiver, .. } => Ok(NodeStatus::Replica(Box::new(
                receiver.send(GetReplicaStatus).await.map_err(stopped)?,
            ))),
        }
    }

    async fn primary_status(&self) -> Result<VolumeStatus, VolumeError> {
        self.primary()
            .await?
            .send(volume::GetStatus)
            .await
            .map_err(stopped)
    }

    /// The replication state of the replica on `server`, as the primary sees it.
    pub async fn replica_state(&self, server: &str) -> Result<Option<ReplicaState>, VolumeError> {
        let status = self.primary_status().await?;
        Ok(status
            .registry
            .senders
            .iter()
            .find(|s| s.replica.server() == server)
            .map(|s| s.state))
    }

    /// Waits until the replica on `server` is in `state`, polling every millisecond.
    pub async fn wait_replica_state(
        &self,
        server: &str,
        state: ReplicaState,
        limit: Duration,
    ) -> Result<(), VolumeError> {
        let deadline = Instant::now() + limit;
        loop {
            let now = self.replica_state(server).await?;
            if now == Some(state) {
                return Ok(());
            }
            if Instant::now() > deadline {
                return Err(VolumeError::Runtime(format!(
                    "{server} is {now:?} after {limit:?}, wanted {state:?}"
                )));
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    }

    /// Bytes the primary's sender has put on the wire for the replica on `server`.
    pub async fn bytes_sent(&self, server: &str) -> Result<u64, VolumeError> {
        let status = self.primary_status().await?;
        Ok(status
            .bytes_sent
            .iter()
            .find(|(r, _)| r.server() == server)
            .map_or(0, |(_, n)| *n))
    }

    /// The recovery log (primary; empty on replicas).
    pub async fn recovery_log(&self) -> Result<Vec<RecoveryEvent>, VolumeError> {
        match &self.inner {
            Inner::Primary(..) if self.is_peering() => Ok(Vec::new()),
            Inner::Primary(..) => self
                .primary()
                .await?
                .send(volume::GetRecoveryLog)
                .await
                .map_err(stopped)?,
            Inner::Replica { .. } => Ok(Vec::new()),
        }
    }

    /// Checkpoints everything written before the call (primary), waiting
    /// for the WAL to hold it durably first.
    pub async fn checkpoint(&self) -> Result<(), VolumeError> {
        self.primary()
            .await?
            .send(volume::Checkpoint)
            .await
            .map_err(stopped)?
    }

    /// Compares every in-sync replica's content with the primary's at one
    /// LSN, region by region, while writes go on (primary only); with
    /// `repair`, a replica whose regions differ is rebuilt, every region
    /// compared. [`VerifyReport::clean`] when nothing differs.
    pub async fn verify(&self, repair: bool) -> Result<crate::VerifyReport, VolumeError> {
        self.primary()
            .await?
            .send(crate::primary::Verify { repair })
            .await
            .map_err(stopped)?
    }

    /// crc32c of the whole readable volume.
    pub async fn content_checksum(&self) -> Result<u32, VolumeError> {
        match &self.inner {
            Inner::Primary(..) => self
                .primary()
                .await?
                .send(volume::ContentChecksum)
                .await
                .map_err(stopped)?,
            Inner::Replica { receiver, .. } => {
                Ok(receiver.send(ReplicaChecksum).await.map_err(stopped)??)
            }
        }
    }

    /// The metered address of a replica's sender on a primary. For benchmarks
    /// that drive the sender's mailbox directly (feature `testing`).
    #[cfg(feature = "testing")]
    pub async fn sender(&self, replica: ReplicaId) -> Option<MeteredAddr<crate::SenderActor>> {
        self.primary()
            .await
            .ok()?
            .send(volume::GetSender(replica))
            .await
            .ok()?
    }

    /// Makes the volume's next WAL sync fail with EIO, as a failing disk
    /// would. For tests of the storage-failure path (feature `faults`).
    #[cfg(feature = "faults")]
    pub async fn inject_storage_failure(&self) -> Result<(), VolumeError> {
        self.inject(crate::testing::StorageFault::FailNextSync)
            .await
    }

    /// Makes every WAL sync of the volume take `delay` longer, as a slow
    /// disk would. For tests of what waits on a sync (feature `faults`).
    #[cfg(feature = "faults")]
    pub async fn slow_syncs(&self, delay: std::time::Duration) -> Result<(), VolumeError> {
        self.inject(crate::testing::StorageFault::SlowSyncs(delay))
            .await
    }

    #[cfg(feature = "faults")]
    async fn inject(&self, fault: crate::testing::StorageFault) -> Result<(), VolumeError> {
        let msg = crate::testing::InjectStorageFault(fault);
        match &self.inner {
            Inner::Replica { receiver, .. } => receiver.send(msg).await.map_err(stopped),
            Inner::Primary(..) => self.primary().await?.send(msg).await.map_err(stopped),
        }
    }

    /// Stops the volume and returns once it has stopped: its listener is
    /// closed, every connection and executor task has ended, every job it
    /// had on the blocking pool is done, and its store (with the directory's
    /// lock) is released, so the volume can be opened again at once.
    pub async fn stop(&self) {
        self.stopping.send_replace(true);
        match &self.inner {
            Inner::Primary(primary) => {
                // Peering ends on the stop; an actor it opened just before
                // is stopped like any other.
                let mut opening = primary.opening.clone();
                loop {
                    let addr = match &*opening.borrow_and_update() {
                        Opening::Open(addr) => Some(addr.clone()),
                        Opening::Failed(_) => break,
                        Opening::Peering(_) => None,
                    };
                    if let Some(addr) = addr {
                        let _ = addr.send(volume::Stop).await;
                        break;
                    }
                    if opening.changed().await.is_err() {
                        break;
                    }
                }
            }
            Inner::Replica {
                receiver, shared, ..
            } => {
                if let Some(shared) = shared {
                    let (listener, volume) = &**shared;
                    listener.unregister(volume);
                }
                let _ = receiver.send(StopReceiver).await;
            }
        }
        self.tasks.close();
        self.tasks.wait().await;
    }
}
