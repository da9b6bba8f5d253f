//! The [`Node`]: the volumes of one config on one runtime, behind one
//! replication listener, exported over NBD.
//!
//! Each volume lives in `<data_dir>/<volume>/`: its store in `store/`, the
//! assignment applied last in `assignment.json`. A new assignment is
//! persisted before it is carried out, and one that is not newer than the
//! last is fenced, so the node never goes back to an older epoch.

use crate::assignment::{self, Applied, StartError};
use crate::config::{ConfigError, NodeConfig, VolumeSpec};
use crate::fence::WriteFence;
use crate::nbd::{Export, Exports, NbdServer};
use crate::terms::TermKeeper;
use serde::Serialize;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, PoisonError, RwLock};
use walship_actors::{
    Listen, NodeStatus, Peering, PrimaryConfig, ReplicaConfig, ReplicaSpec, ReplicaStatesChanged,
    ReplicationListener, Runtime, TermChosen, VolumeConfig, VolumeError, VolumeHandle,
};
use walship_engine::RecoveryEvent;
use walship_io::{StoreError, StoreOptions};
mod assign;
mod lifecycle;
mod status;

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
    /// Held shared by each change of assignment, whole by the stop (which
    /// waits for the changes under way).
    changing: tokio::sync::RwLock<()>,
    /// Set by the stop, under `changing`: a change that was waiting for
    /// it is refused, not carried out on a stopped node.
    stopped: std::sync::atomic::AtomicBool,
    /// Changes of one volume one at a time.
    change_locks: assign::ChangeLocks,
    nbd: Mutex<Option<Arc<NbdServer>>>,
    nbd_addr: Option<SocketAddr>,
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

    fn volume_dir(&self, volume: &str) -> PathBuf {
        self.config.data_dir.join(volume)
    }

    fn runtime(&self) -> Result<Arc<Runtime>, VolumeError> {
        lock(&self.runtime).clone().ok_or(VolumeError::Stopped)
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

    /// The handle of volume `name`.
    pub fn volume(&self, name: &str) -> Option<VolumeHandle> {
        self.table.get(name).map(|hosted| hosted.handle)
    }

    /// The size of volume `name`, if hosted (from the node's table, not a
    /// scan of the config: a failover at 10,000 volumes asks it thousands
    /// of times).
    pub fn volume_size(&self, name: &str) -> Option<u64> {
        self.table.get(name).map(|hosted| hosted.spec.size)
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
