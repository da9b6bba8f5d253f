//! The [`Node`]: the volumes of one config on one runtime, behind one
//! replication listener, exported over NBD.
//!
//! Each volume lives in `<data_dir>/<volume>/`: its store in `store/`, the
//! assignment applied last in `assignment.json`. A new assignment is
//! persisted before it is carried out, and one that is not newer than the
//! last is fenced, so the node never goes back to an older epoch.

use crate::admin::AdminServer;
use crate::assignment::{self, Applied, StartError};
use crate::config::{ConfigError, NodeConfig, VolumeSpec};
use crate::fence::WriteFence;
use crate::nbd::{Export, Exports, NbdServer};
use crate::terms::TermKeeper;
use serde::Serialize;
use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, PoisonError, RwLock};
use walship_actors::{
    Listen, NodeStatus, Peering, PrimaryConfig, ReplicaConfig, ReplicaSpec, ReplicaStatesChanged,
    ReplicationListener, Runtime, TermChosen, VolumeConfig, VolumeError, VolumeHandle,
};
use walship_engine::RecoveryEvent;
use walship_io::{StoreError, StoreOptions};

/// Why a node, or a change to it, was refused.
#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    /// The config is inconsistent (with itself or with the stores on disk).
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// A file or socket could not be used.
    #[error("{what}: {source}")]
    Io {
        /// What was being done.
        what: String,
        /// Why it failed.
        source: std::io::Error,
    },
    /// A volume refused.
    #[error("volume {volume}: {source}")]
    Volume {
        /// The volume.
        volume: String,
        /// Its refusal.
        source: VolumeError,
    },
    /// The node hosts no such volume.
    #[error("no volume named {0}")]
    NoSuchVolume(String),
    /// What was asked is the primary's to do, and this node is not it.
    #[error("volume {volume}: this node is a replica; its primary is {primary}: ask there")]
    NotPrimary {
        /// The volume.
        volume: String,
        /// The node that is its primary.
        primary: String,
    },
    /// The assignment is not newer than the one applied.
    #[error(
        "volume {volume}: assignment epoch {offered} is not newer than the applied epoch {applied}"
    )]
    Fenced {
        /// The volume.
        volume: String,
        /// The epoch applied.
        applied: u64,
        /// The epoch offered.
        offered: u64,
    },
    /// The assignment makes no sense for this node.
    #[error("volume {volume}: {what}")]
    BadAssignment {
        /// The volume.
        volume: String,
        /// What is wrong.
        what: String,
    },
}

/// The lock file a node holds in its data dir.
pub const NODE_LOCK: &str = "walship-node.lock";

/// Locks `<dir>/walship-node.lock`, waiting up to 3 s for a node that is
/// stopping (a crashed one holds nothing).
async fn lock_data_dir(dir: &std::path::Path) -> Result<std::fs::File, NodeError> {
    let path = dir.join(NODE_LOCK);
    let (file, _) = walship_io::durable::open_or_create(&path)
        .map_err(io(format!("open {}", path.display())))?;
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(3);
    loop {
        match file.try_lock() {
            Ok(()) => return Ok(file),
            Err(std::fs::TryLockError::WouldBlock) if tokio::time::Instant::now() < deadline => {
                tokio::time::sleep(std::time::Duration::from_millis(20)).await;
            }
            Err(std::fs::TryLockError::WouldBlock) => {
                return Err(NodeError::Io {
                    what: format!("lock {}", path.display()),
                    source: std::io::Error::other("another node runs on this data dir"),
                })
            }
            Err(std::fs::TryLockError::Error(e)) => {
                return Err(io(format!("lock {}", path.display()))(e))
            }
        }
    }
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> NodeError {
    let what = what.into();
    move |source| NodeError::Io { what, source }
}

/// A volume the node hosts.
#[derive(Debug, Clone)]
struct Hosted {
    spec: VolumeSpec,
    applied: Applied,
    handle: VolumeHandle,
}

/// The volumes, looked up by NBD handshakes and the admin API.
#[derive(Debug, Default)]
struct Table {
    volumes: RwLock<BTreeMap<String, Hosted>>,
}

impl Table {
    fn get(&self, name: &str) -> Option<Hosted> {
        let volumes = self.volumes.read().unwrap_or_else(PoisonError::into_inner);
        volumes.get(name).cloned()
    }

    fn all(&self) -> Vec<Hosted> {
        let volumes = self.volumes.read().unwrap_or_else(PoisonError::into_inner);
        volumes.values().cloned().collect()
    }

    fn put(&self, hosted: Hosted) {
        let mut volumes = self.volumes.write().unwrap_or_else(PoisonError::into_inner);
        volumes.insert(hosted.spec.name.clone(), hosted);
    }
}

/// What NBD clients see: every volume this node is primary for, read-write,
/// and the replicas whose config asks for it, read-only.
#[derive(Debug)]
struct NodeExports {
    node: String,
    table: Arc<Table>,
    fence: Arc<WriteFence>,
}

impl NodeExports {
    fn exported(&self, hosted: &Hosted) -> Option<Export> {
        let primary = hosted.applied.is_primary(&self.node);
        // Mid role change the table still holds the stopped handle: a
        // client that reconnects then finds no export, not a dead one.
        let serving = !hosted.handle.is_stopping();
        (serving && (primary || hosted.spec.export_replicas)).then(|| Export {
            name: hosted.spec.name.clone(),
            volume: hosted.handle.clone(),
            size: hosted.spec.size,
            read_only: !primary,
            fence: Arc::clone(&self.fence),
        })
    }
}

impl Exports for NodeExports {
    fn names(&self) -> Vec<String> {
        self.table
            .all()
            .iter()
            .filter_map(|hosted| self.exported(hosted))
            .map(|export| export.name)
            .collect()
    }

    fn export(&self, name: &str) -> Option<Export> {
        self.exported(&self.table.get(name)?)
    }
}

/// One volume's state, for operators.
#[derive(Debug, Clone, Serialize)]
pub struct VolumeReport {
    /// Name.
    pub name: String,
    /// `primary` or `replica`.
    pub role: &'static str,
    /// Size in bytes.
    pub size: u64,
    /// Whether it is exported over NBD, and how.
    pub export: Option<&'static str>,
    /// The assignment applied.
    pub assignment: Applied,
    /// The runtime's status of it.
    pub status: NodeStatus,
    /// The most recent recovery decisions, with their proofs (primaries).
    pub recent_recovery: Vec<RecoveryEvent>,
    /// The control plane's last decision about the volume (a failover, or
    /// why there was none), when it made one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub control_decision: Option<serde_json::Value>,
}

/// Recovery events a report carries.
const RECENT_RECOVERY: usize = 32;

/// A node: volumes from a config, served to replicas and clients.
/// [`stop`](Node::stop) it; dropping it stops the runtime without
/// answering clients first. Share it (`Arc<Node>`) with what serves it.
#[derive(Debug)]
pub struct Node {
    config: NodeConfig,
    /// Taken by the stop; the last clone's drop ends the runtime.
    runtime: Mutex<Option<Arc<Runtime>>>,
    /// The runtime's recovery budget: every catch-up and rebuild this
    /// node sends shares it.
    recovery: walship_actors::RecoveryBudget,
    listener: ReplicationListener,
    table: Arc<Table>,
    /// Serialises changes of assignment (and the stop, after them).
    changing: tokio::sync::Mutex<()>,
    nbd: Mutex<Option<Arc<NbdServer>>>,
    nbd_addr: Option<SocketAddr>,
    /// The admin endpoint holds the node: the stop takes it, which ends
    /// the cycle.
    admin: Mutex<Option<Arc<AdminServer>>>,
    admin_addr: Mutex<Option<SocketAddr>>,
    /// `<data_dir>/walship-node.lock`, locked while the node runs: one
    /// lock for all its stores (which then hold no descriptor for one each).
    /// Released by the stop, after every store has closed.
    data_dir_lock: Mutex<Option<std::fs::File>>,
    /// The control plane's last decision per volume, for the status.
    control_decisions: Mutex<BTreeMap<String, serde_json::Value>>,
    /// The primaries whose replicas' states changed since a control plane
    /// last asked.
    replica_states: Arc<ChangedVolumes>,
    /// The control plane assignments come from, when not this node's
    /// config and admin API (`etcd at URL`): the admin API's POST is
    /// refused from the start.
    control_plane: Option<String>,
    /// Where terms are recorded beyond this node's disk (a control plane).
    terms: Option<Arc<dyn TermKeeper>>,
}

impl Node {
    /// The node's recovery budget (limits, running and queued rebuilds).
    pub fn recovery(&self) -> &walship_actors::RecoveryBudget {
        &self.recovery
    }

    /// The primaries whose replicas' states changed since the last call,
    /// once there is one: a control plane reports them at once.
    pub async fn replica_states_changed(&self) -> BTreeSet<String> {
        self.replica_states.next().await
    }

    /// Where assignments come from, when not the admin API.
    pub fn control_plane(&self) -> Option<String> {
        self.control_plane.clone()
    }

    /// Notes the control plane's decision about `volume` (a failover, or
    /// why none), shown in its status.
    pub fn note_control_decision(&self, volume: &str, decision: serde_json::Value) {
        self.control_decisions
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(volume.to_owned(), decision);
    }

    /// Starts every volume of `config`, the replication listener and the
    /// NBD server. Refuses a config the stores on disk contradict.
    pub async fn start(config: NodeConfig) -> Result<Arc<Self>, NodeError> {
        Self::start_fenced(config, Arc::new(WriteFence::open()), None, None).await
    }

    /// [`start`](Self::start), with NBD clients' writes acknowledged only
    /// while `fence` allows them (a control plane's lease), assignments
    /// from `control_plane` (named: `etcd at URL`) rather than the admin
    /// API, when there is one, and every term a primary opens in recorded
    /// with `terms` (the control plane's) before any replica hears it.
    pub async fn start_fenced(
        config: NodeConfig,
        fence: Arc<WriteFence>,
        control_plane: Option<String>,
        terms: Option<Arc<dyn TermKeeper>>,
    ) -> Result<Arc<Self>, NodeError> {
        if config.admin.is_some() {
            // Before any actor registers a metric with the recorder.
            crate::admin::prometheus();
        }
        walship_io::durable::create_dir_all(&config.data_dir)
            .map_err(io(format!("create {}", config.data_dir.display())))?;
        let data_dir_lock = lock_data_dir(&config.data_dir).await?;
        let runtime = Runtime::start().map_err(|source| NodeError::Volume {
            volume: "(runtime)".into(),
            source,
        })?;
        let recovery = runtime.recovery();
        recovery.set_limits(config.recovery).map_err(|e| {
            NodeError::Config(crate::config::ConfigError::Invalid {
                file: config.file.clone(),
                line: 0,
                what: format!("[recovery]: {e}"),
            })
        })?;
        let listener = runtime
            .replication_listener(&config.cluster, &config.replication.to_string())
            .map_err(|source| NodeError::Volume {
                volume: "(replication listener)".into(),
                source,
            })?;
        let mut node = Self {
            recovery,
            runtime: Mutex::new(Some(Arc::new(runtime))),
            listener,
            table: Arc::default(),
            changing: tokio::sync::Mutex::new(()),
            nbd: Mutex::new(None),
            nbd_addr: None,
            admin: Mutex::new(None),
            admin_addr: Mutex::new(None),
            data_dir_lock: Mutex::new(Some(data_dir_lock)),
            control_decisions: Mutex::default(),
            replica_states: Arc::default(),
            control_plane,
            terms,
            config,
        };
        let mut startings = Vec::new();
        for spec in node.config.volumes.clone() {
            let dir = node.volume_dir(&spec.name);
            let starting = match assignment::start(&dir, &node.config.node, &spec) {
                Ok(starting) => starting,
                Err(e) => {
                    node.stop().await;
                    return Err(match e {
                        StartError::Io(e) => io(format!("assignment of {}", spec.name))(e),
                        refusal => NodeError::Config(ConfigError::Invalid {
                            file: node.config.file.clone(),
                            line: spec.line,
                            what: refusal.to_string(),
                        }),
                    });
                }
            };
            tracing::info!(volume = %spec.name, epoch = starting.applied.epoch,
                primary = %starting.applied.primary, "assignment: {}", starting.reason);
            startings.push((spec, starting.applied));
        }
        // Replicas first: a primary peers with its replicas before it
        // serves, and another node's primary may be waiting for ours.
        startings.sort_by_key(|(_, applied)| applied.is_primary(&node.config.node));
        for (spec, applied) in startings {
            let handle = match node.open(&spec, &applied).await {
                Ok(handle) => handle,
                Err(e) => {
                    node.stop().await;
                    return Err(e);
                }
            };
            node.table.put(Hosted {
                spec,
                applied,
                handle,
            });
        }
        if let Some(addr) = node.config.nbd {
            let exports = Arc::new(NodeExports {
                node: node.config.node.clone(),
                table: Arc::clone(&node.table),
                fence,
            });
            let volumes = node.runtime().ok().map(|runtime| runtime.volume_thread());
            let started = match (tokio::net::TcpListener::bind(addr).await, volumes) {
                (Ok(listener), Some(volumes)) => NbdServer::start(listener, exports, volumes),
                (Err(e), _) => Err(e),
                (Ok(_), None) => Err(std::io::Error::other("the runtime has stopped")),
            };
            match started {
                Ok(server) => {
                    node.nbd_addr = Some(server.local_addr());
                    node.nbd = Mutex::new(Some(Arc::new(server)));
                }
                Err(e) => {
                    node.stop().await;
                    return Err(io(format!("nbd listener on {addr}"))(e));
                }
            }
        }
        let node = Arc::new(node);
        if let Some(addr) = node.config.admin {
            let started = match tokio::net::TcpListener::bind(addr).await {
                Ok(listener) => AdminServer::start(listener, Arc::clone(&node)),
                Err(e) => Err(e),
            };
            match started {
                Ok(server) => {
                    *lock(&node.admin_addr) = Some(server.local_addr());
                    *lock(&node.admin) = Some(Arc::new(server));
                }
                Err(e) => {
                    node.stop().await;
                    return Err(io(format!("admin listener on {addr}"))(e));
                }
            }
        }
        Ok(node)
    }

    fn volume_dir(&self, volume: &str) -> PathBuf {
        self.config.data_dir.join(volume)
    }

    fn runtime(&self) -> Result<Arc<Runtime>, VolumeError> {
        lock(&self.runtime).clone().ok_or(VolumeError::Stopped)
    }

    /// Opens `spec`'s volume in the role `applied` gives this node. A
    /// primary peers with its replicas first (see `walship_engine::
    /// decide_peering`, after this returns: the handle's requests wait for
    /// it); the term it chooses is persisted in the volume's assignment
    /// before any replica hears it.
    async fn open(&self, spec: &VolumeSpec, applied: &Applied) -> Result<VolumeHandle, NodeError> {
        let config = &self.config;
        let store = StoreOptions {
            segment_bytes: config.tuning.segment_bytes,
            // The node's lock on its data dir covers every store, and the
            // node never opens a store before its previous instance stopped.
            lock: false,
            ..StoreOptions::new(spec.blocks())
        };
        let dir = self.volume_dir(&spec.name).join("store");
        let volume = if applied.is_primary(&config.node) {
            // The newest term the control plane knows was used: one this
            // node's disk may have lost, or another node's.
            let floor = match &self.terms {
                Some(terms) => terms
                    .newest(&spec.name)
                    .await
                    .map_err(io(format!("read the newest term of {}", spec.name)))?,
                None => 0,
            };
            VolumeConfig::Primary(PrimaryConfig {
                cluster: config.cluster.clone(),
                volume: spec.name.clone(),
                dir,
                store,
                epoch: applied.term(),
                commit_mode: applied.commit_mode,
                replicas: applied
                    .replicas
                    .iter()
                    .map(|(server, endpoint)| ReplicaSpec {
                        server: server.clone(),
                        addr: endpoint.addr.clone(),
                        version: endpoint.version,
                    })
                    .collect(),
                tuning: config.tuning.tuning(),
                on_replica_states: Some(self.replica_states.signal(&spec.name)),
                peering: Peering::enabled(
                    Applied::term_ceiling(applied.epoch),
                    Some(self.persist_term(&spec.name, applied)),
                )
                .with_term_floor(floor),
            })
        } else {
            VolumeConfig::Replica(ReplicaConfig {
                cluster: config.cluster.clone(),
                volume: spec.name.clone(),
                server: config.node.clone(),
                dir,
                store,
                listen: Listen::Shared(self.listener.clone()),
                checkpoint_every_lsns: config.tuning.tuning().checkpoint_every_lsns,
            })
        };
        let spawned = match self.runtime() {
            Ok(runtime) => runtime.spawn_volume(volume).await,
            Err(e) => Err(e),
        };
        spawned.map_err(|source| match source {
            VolumeError::Store(StoreError::SizeMismatch {
                on_disk,
                configured,
            }) => NodeError::Config(ConfigError::Invalid {
                file: config.file.clone(),
                line: spec.size_line,
                what: format!(
                    "volume {}: size {} bytes, but its store on disk holds {} bytes",
                    spec.name,
                    configured * walship_io::BLOCK_SIZE as u64,
                    on_disk * walship_io::BLOCK_SIZE as u64
                ),
            }),
            source => NodeError::Volume {
                volume: spec.name.clone(),
                source,
            },
        })
    }

    /// What persists a term peering chose for `volume`: its assignment,
    /// with the term's incarnation, replaced durably, then the control
    /// plane's record of terms, if there is one.
    /// The assignment on disk is read again when the term is chosen: a
    /// newer one may have been persisted meanwhile, and is never replaced
    /// by the one this opening started with.
    fn persist_term(&self, volume: &str, applied: &Applied) -> TermChosen {
        let dir = self.volume_dir(volume);
        let applied = applied.clone();
        let (volume, terms) = (volume.to_owned(), self.terms.clone());
        TermChosen(Arc::new(move |term| {
            let (dir, applied) = (dir.clone(), applied.clone());
            // The file's fsyncs block: off the volume's thread.
            let local = tokio::task::spawn_blocking(move || {
                let loaded = assignment::load(&dir)?;
                let mut chosen = loaded.clone().unwrap_or(applied);
                if chosen.epoch != Applied::epoch_of(term) {
                    return Ok(());
                }
                chosen.incarnation = chosen.incarnation.max(Applied::incarnation_of(term));
                match loaded == Some(chosen.clone()) {
                    true => Ok(()),
                    false => assignment::save(&dir, &chosen),
                }
            });
            let recorded = terms.as_ref().map(|terms| terms.record(&volume, term));
            Box::pin(async move {
                local.await.map_err(std::io::Error::other)??;
                match recorded {
                    Some(recorded) => recorded.await,
                    None => Ok(()),
                }
            })
        }))
    }

    /// The node's name.
    pub fn name(&self) -> &str {
        &self.config.node
    }

    /// Its config.
    pub fn config(&self) -> &NodeConfig {
        &self.config
    }

    /// Where the replication listener listens.
    pub fn replication_addr(&self) -> SocketAddr {
        self.listener.local_addr()
    }

    /// Where the NBD server listens, if it runs.
    pub fn nbd_addr(&self) -> Option<SocketAddr> {
        self.nbd_addr
    }

    /// Multiplexed connections to peer nodes that are up.
    pub async fn peer_links(&self) -> usize {
        match self.runtime() {
            Ok(runtime) => runtime.peer_links().await,
            Err(_) => 0,
        }
    }

    /// Where the admin endpoint listens, if it runs.
    pub fn admin_addr(&self) -> Option<SocketAddr> {
        *lock(&self.admin_addr)
    }

    /// The handle of volume `name`.
    pub fn volume(&self, name: &str) -> Option<VolumeHandle> {
        self.table.get(name).map(|hosted| hosted.handle)
    }

    /// Each hosted volume: its name, the epoch of its assignment, and its
    /// runtime status, primary or replica (no recovery log, unlike
    /// [`report`](Self::report): the control plane asks every 250 ms).
    pub async fn statuses(&self) -> Vec<(String, NodeStatus)> {
        self.statuses_of(self.table.all()).await
    }

    /// [`statuses`](Self::statuses) of the volumes named in `names` this
    /// node hosts.
    pub async fn statuses_named(&self, names: &BTreeSet<String>) -> Vec<(String, NodeStatus)> {
        let hosted = names.iter().filter_map(|name| self.table.get(name));
        self.statuses_of(hosted.collect()).await
    }

    async fn statuses_of(&self, hosted: Vec<Hosted>) -> Vec<(String, NodeStatus)> {
        let mut statuses = Vec::new();
        for hosted in hosted {
            if let Ok(status) = hosted.handle.status().await {
                statuses.push((hosted.spec.name.clone(), status));
            }
        }
        statuses
    }

    /// Every volume's state.
    pub async fn report(&self) -> Vec<VolumeReport> {
        let mut reports = Vec::new();
        for hosted in self.table.all() {
            if let Ok(report) = self.volume_report(&hosted).await {
                reports.push(report);
            }
        }
        reports
    }

    /// Volume `name`'s state.
    pub async fn volume_status(&self, name: &str) -> Result<VolumeReport, NodeError> {
        let hosted = self
            .table
            .get(name)
            .ok_or_else(|| NodeError::NoSuchVolume(name.into()))?;
        self.volume_report(&hosted).await
    }

    /// The assignment `hosted` runs: a primary's incarnation is the one of
    /// the term it opened in (peering may have chosen a newer one than the
    /// node started it with, and persisted it).
    fn running_assignment(&self, hosted: &Hosted, status: &NodeStatus) -> Applied {
        let mut applied = hosted.applied.clone();
        if let NodeStatus::Primary(status) = status {
            let term = status.registry.epoch.get();
            if Applied::epoch_of(term) == applied.epoch {
                applied.incarnation = Applied::incarnation_of(term);
            }
        }
        applied
    }

    /// An online verify of `name`'s replicas (see
    /// [`VolumeHandle::verify`]); only where this node is its primary.
    pub async fn verify(
        &self,
        name: &str,
        repair: bool,
    ) -> Result<walship_actors::VerifyReport, NodeError> {
        let hosted = self
            .table
            .get(name)
            .ok_or_else(|| NodeError::NoSuchVolume(name.into()))?;
        if !hosted.applied.is_primary(&self.config.node) {
            return Err(NodeError::NotPrimary {
                volume: name.into(),
                primary: hosted.applied.primary.clone(),
            });
        }
        hosted
            .handle
            .verify(repair)
            .await
            .map_err(|source| NodeError::Volume {
                volume: name.into(),
                source,
            })
    }

    async fn volume_report(&self, hosted: &Hosted) -> Result<VolumeReport, NodeError> {
        let failed = |source| NodeError::Volume {
            volume: hosted.spec.name.clone(),
            source,
        };
        let status = hosted.handle.status().await.map_err(failed)?;
        let mut recent_recovery = hosted.handle.recovery_log().await.map_err(failed)?;
        let keep = recent_recovery.len().saturating_sub(RECENT_RECOVERY);
        recent_recovery.drain(..keep);
        let primary = hosted.applied.is_primary(&self.config.node);
        Ok(VolumeReport {
            name: hosted.spec.name.clone(),
            role: if primary { "primary" } else { "replica" },
            size: hosted.spec.size,
            export: match (
                self.nbd_addr.is_some(),
                primary,
                hosted.spec.export_replicas,
            ) {
                (false, _, _) | (true, false, false) => None,
                (true, true, _) => Some("read-write"),
                (true, false, true) => Some("read-only"),
            },
            assignment: self.running_assignment(hosted, &status),
            status,
            recent_recovery,
            control_decision: self
                .control_decisions
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .get(&hosted.spec.name)
                .cloned(),
        })
    }

    /// Applies a new assignment to volume `name`: fenced unless its epoch
    /// is newer than the one applied; persisted before it is carried out;
    /// a role change reopens the volume's store in its new role.
    pub async fn apply_assignment(&self, name: &str, next: Applied) -> Result<(), NodeError> {
        let _one_at_a_time = self.changing.lock().await;
        let hosted = self
            .table
            .get(name)
            .ok_or_else(|| NodeError::NoSuchVolume(name.into()))?;
        if next.epoch <= hosted.applied.epoch {
            return Err(NodeError::Fenced {
                volume: name.into(),
                applied: hosted.applied.epoch,
                offered: next.epoch,
            });
        }
        let node = &self.config.node;
        let bad = |what: String| NodeError::BadAssignment {
            volume: name.into(),
            what,
        };
        next.check(name, node).map_err(bad)?;
        let next = hosted.applied.successor(next);
        let engine = next
            .engine(name)
            .map_err(|e| bad(format!("replica id: {e}")))?;
        assignment::save(&self.volume_dir(name), &next)
            .map_err(io(format!("persist the assignment of {name}")))?;
        let was_primary = hosted.applied.is_primary(node);
        // A primary still peering (or that failed to open) reopens in the
        // new assignment rather than wait to be told it.
        let opened = hosted.handle.has_opened();
        let handle = match (was_primary, next.is_primary(node)) {
            (true, true) if opened => {
                // The running primary goes on in the new epoch's term:
                // recorded with the control plane first, as every
                // opening's is, before any replica hears it.
                if let Some(terms) = &self.terms {
                    terms
                        .record(name, next.term())
                        .await
                        .map_err(io(format!("record the term of {name}")))?;
                }
                hosted
                    .handle
                    .apply_assignment(engine)
                    .await
                    .map_err(|source| NodeError::Volume {
                        volume: name.into(),
                        source,
                    })?;
                hosted.handle
            }
            // A replica learns its new epoch from its primary's hello.
            (false, false) => hosted.handle,
            // A role change: the store reopens in the new role. If it
            // cannot, the volume goes back to the assignment it had (as a
            // primary in a new term), so it is not left stopped.
            _ => {
                hosted.handle.stop().await;
                match self.open(&hosted.spec, &next).await {
                    Ok(handle) => handle,
                    Err(refused) => {
                        let dir = self.volume_dir(name);
                        let mut back = hosted.applied.clone();
                        if back.is_primary(node) {
                            // From the newest incarnation persisted (peering
                            // may have chosen one past the table's).
                            let persisted = assignment::load(&dir)
                                .ok()
                                .flatten()
                                .filter(|a| a.epoch == back.epoch)
                                .map_or(0, |a| a.incarnation);
                            back.incarnation = back.incarnation.max(persisted) + 1;
                        }
                        assignment::save(&dir, &back)
                            .map_err(io(format!("persist the assignment of {name}")))?;
                        let handle = self.open(&hosted.spec, &back).await?;
                        self.table.put(Hosted {
                            spec: hosted.spec,
                            applied: back,
                            handle,
                        });
                        return Err(refused);
                    }
                }
            }
        };
        tracing::info!(volume = name, epoch = next.epoch, primary = %next.primary,
            "assignment applied");
        self.table.put(Hosted {
            spec: hosted.spec,
            applied: next,
            handle,
        });
        Ok(())
    }

    /// Stops the node: the admin endpoint stops, the NBD server stops accepting and answers every
    /// request it read, each primary checkpoints what it holds (an fsync),
    /// then every volume stops, the replication listener closes, and the
    /// runtime ends. Returns when all of it has.
    pub async fn stop(&self) {
        let admin = lock(&self.admin).take();
        if let Some(admin) = admin {
            admin.stop().await;
        }
        let _no_more_changes = self.changing.lock().await;
        // A primary still peering has nothing to checkpoint, and the NBD
        // requests waiting for it are answered ESHUTDOWN once it stops.
        for hosted in self.table.all() {
            if hosted.handle.is_peering() {
                hosted.handle.stop().await;
            }
        }
        let nbd = lock(&self.nbd).take();
        if let Some(nbd) = nbd {
            nbd.stop().await;
        }
        let volumes = self.table.all();
        for hosted in &volumes {
            if hosted.handle.is_primary() && !hosted.handle.is_stopping() {
                if let Err(e) = hosted.handle.checkpoint().await {
                    tracing::warn!(volume = %hosted.spec.name, error = %e, "final checkpoint");
                }
            }
        }
        self.listener.close().await;
        for hosted in &volumes {
            hosted.handle.stop().await;
        }
        let runtime = lock(&self.runtime).take();
        if let Some(runtime) = runtime {
            // The last clone's drop joins the runtime's thread: not on an
            // async worker.
            let _ = tokio::task::spawn_blocking(move || drop(runtime)).await;
        }
        lock(&self.data_dir_lock).take();
    }
}

/// The volumes whose primaries said their replicas' states changed
/// ([`ReplicaStatesChanged`]), gathered until someone takes them.
#[derive(Debug, Default)]
struct ChangedVolumes {
    names: Mutex<BTreeSet<String>>,
    notify: tokio::sync::Notify,
}

impl ChangedVolumes {
    /// The signal `volume`'s primary gives.
    fn signal(self: &Arc<Self>, volume: &str) -> ReplicaStatesChanged {
        let (changed, volume) = (Arc::clone(self), volume.to_owned());
        ReplicaStatesChanged(Arc::new(move || {
            changed
                .names
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .insert(volume.clone());
            // A permit is kept when nobody waits: no change is missed.
            changed.notify.notify_one();
        }))
    }

    /// The volumes named since the last call, once there is one.
    async fn next(&self) -> BTreeSet<String> {
        loop {
            let taken =
                std::mem::take(&mut *self.names.lock().unwrap_or_else(PoisonError::into_inner));
            if !taken.is_empty() {
                return taken;
            }
            self.notify.notified().await;
        }
    }
}
