//! etcd as the control plane (`walship serve --etcd URL`), instead of the
//! static config alone.
//!
//! Keys, under `/walship/<cluster>/`:
//! - `volumes/<name>`: the volume's record ([`VolumeRecord`]): epoch,
//!   primary, replicas, commit mode, size. Created from the config when
//!   absent (in one transaction: the first node to start writes it, the
//!   others read it); from then on etcd wins over the config.
//! - `nodes/<node>`: the node's addresses, under a lease the node keeps
//!   alive: the key disappears when the node stops renewing it.
//!
//! A node reads its volumes' records before it opens them ([`connect`]),
//! so a node that was away through a failover comes back in the role etcd
//! gives it, not the one its config or its last assignment said. Running,
//! it watches the records and applies each newer one as an assignment
//! (fenced like a POSTed one: an epoch not newer is ignored).
//!
//! [`connect`]: ControlPlane::connect

/// The etcd client this module uses, for embedders and tests that talk to
/// the same etcd.
pub use etcd_client;

use crate::config::NodeConfig;
use crate::node::{Node, NodeError};
use crate::Applied;
use etcd_client::{
    Client, Compare, CompareOp, ConnectOptions, EventType, PutOptions, Txn, TxnOp, TxnOpResponse,
    WatchOptions,
};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use walship_engine::CommitMode;

/// A volume's record in etcd: its assignment.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VolumeRecord {
    /// Epoch: a newer record has a higher one.
    pub epoch: u64,
    /// The primary's node.
    pub primary: String,
    /// Commit mode.
    pub commit_mode: CommitMode,
    /// Size in bytes.
    pub size: u64,
    /// Replicas: node name → that node's replication address.
    pub replicas: BTreeMap<String, String>,
}

impl VolumeRecord {
    /// The record as the assignment a node applies.
    pub fn applied(&self) -> Applied {
        Applied::new(self.epoch, &self.primary, self.commit_mode, &self.replicas)
    }
}

/// A node's entry under `nodes/`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeRecord {
    /// Replication listener.
    pub replication: String,
    /// Admin endpoint, if any.
    pub admin: Option<String>,
    /// NBD listener, if any.
    pub nbd: Option<String>,
}

/// What went wrong with etcd.
#[derive(Debug, thiserror::Error)]
pub enum EtcdError {
    /// etcd refused or could not be reached.
    #[error("etcd at {endpoints}: {source}")]
    Client {
        /// Where.
        endpoints: String,
        /// Why.
        source: etcd_client::Error,
    },
    /// A record could not be encoded.
    #[error("encoding a record: {0}")]
    Encode(#[from] serde_json::Error),
    /// A record says something this node cannot take.
    #[error("etcd key {key}: {what}")]
    Record {
        /// The key.
        key: String,
        /// What is wrong.
        what: String,
    },
}

/// Where etcd is, and the node's lease.
#[derive(Debug, Clone)]
pub struct EtcdOptions {
    /// Client URLs (`http://127.0.0.1:2379`).
    pub endpoints: Vec<String>,
    /// Time to live of the node's lease; renewed at a third of it.
    pub lease_ttl: Duration,
}

impl EtcdOptions {
    /// `endpoints` with a lease of 5 s.
    pub fn new(endpoints: Vec<String>) -> Self {
        Self {
            endpoints,
            lease_ttl: Duration::from_secs(5),
        }
    }
}

/// The key prefix of a cluster.
pub fn prefix(cluster: &str) -> String {
    format!("/walship/{cluster}/")
}

/// The key of a volume's record.
pub fn volume_key(cluster: &str, volume: &str) -> String {
    format!("{}volumes/{volume}", prefix(cluster))
}

/// The key of a node's entry.
pub fn node_key(cluster: &str, node: &str) -> String {
    format!("{}nodes/{node}", prefix(cluster))
}

/// A connection to etcd, before the node runs.
pub struct ControlPlane {
    client: Client,
    options: EtcdOptions,
    cluster: String,
    /// The revision the records were read at: the watch starts after it.
    revision: i64,
}

impl std::fmt::Debug for ControlPlane {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ControlPlane")
            .field("endpoints", &self.options.endpoints)
            .field("cluster", &self.cluster)
            .field("revision", &self.revision)
            .finish()
    }
}

impl ControlPlane {
    /// Connects and brings `config`'s volumes in line with etcd: a volume
    /// without a record gets one written from the config; a volume with
    /// one takes its assignment (epoch, primary, replicas, commit mode)
    /// from it. Call before [`Node::start`].
    pub async fn connect(options: EtcdOptions, config: &mut NodeConfig) -> Result<Self, EtcdError> {
        let failed = |source| EtcdError::Client {
            endpoints: options.endpoints.join(","),
            source,
        };
        let connect = ConnectOptions::new()
            .with_connect_timeout(Duration::from_secs(3))
            .with_timeout(Duration::from_secs(5));
        let mut client = Client::connect(&options.endpoints, Some(connect))
            .await
            .map_err(failed)?;
        let mut revision = 0;
        for spec in &mut config.volumes {
            let key = volume_key(&config.cluster, &spec.name);
            let from_config = VolumeRecord {
                epoch: spec.epoch,
                primary: spec.primary.clone(),
                commit_mode: spec.commit_mode,
                size: spec.size,
                replicas: spec.replicas.clone(),
            };
            let value = serde_json::to_vec(&from_config)?;
            // Written only if nobody wrote it first; read otherwise.
            let txn = Txn::new()
                .when([Compare::create_revision(key.as_str(), CompareOp::Equal, 0)])
                .and_then([TxnOp::put(key.as_str(), value, None)])
                .or_else([TxnOp::get(key.as_str(), None)]);
            let response = client.txn(txn).await.map_err(failed)?;
            revision = revision.max(response.header().map_or(0, |h| h.revision()));
            if response.succeeded() {
                tracing::info!(volume = %spec.name, epoch = spec.epoch, "etcd: record created from the config");
                continue;
            }
            let stored = response.op_responses().into_iter().find_map(|op| match op {
                TxnOpResponse::Get(get) => get.kvs().first().map(|kv| kv.value().to_vec()),
                _ => None,
            });
            let Some(stored) = stored else {
                return Err(EtcdError::Record {
                    key,
                    what: "exists but could not be read".into(),
                });
            };
            let record = parse(&key, &stored)?;
            check(&key, &record, &config.node, spec.size)?;
            if record != from_config {
                tracing::info!(volume = %spec.name, epoch = record.epoch,
                    primary = %record.primary, "etcd: the record overrides the config");
            }
            spec.epoch = record.epoch;
            spec.primary = record.primary;
            spec.commit_mode = record.commit_mode;
            spec.replicas = record.replicas;
        }
        Ok(Self {
            client,
            options,
            cluster: config.cluster.clone(),
            revision,
        })
    }

    /// Registers `node` under a lease it keeps alive, and applies every
    /// newer record of its volumes as it is written. Runs until
    /// [`Running::stop`].
    pub async fn run(mut self, node: Arc<Node>) -> Result<Running, EtcdError> {
        let failed = |source| EtcdError::Client {
            endpoints: self.options.endpoints.join(","),
            source,
        };
        let ttl = self.options.lease_ttl.as_secs().max(1) as i64;
        let lease = self
            .client
            .lease_grant(ttl, None)
            .await
            .map_err(failed)?
            .id();
        let entry = NodeRecord {
            replication: node.replication_addr().to_string(),
            admin: node.admin_addr().map(|a| a.to_string()),
            nbd: node.nbd_addr().map(|a| a.to_string()),
        };
        let key = node_key(&self.cluster, node.name());
        let value = serde_json::to_vec(&entry)?;
        self.client
            .put(key, value, Some(PutOptions::new().with_lease(lease)))
            .await
            .map_err(failed)?;
        let watch_prefix = format!("{}volumes/", prefix(&self.cluster));
        let watching = self
            .client
            .watch(
                watch_prefix.as_str(),
                Some(
                    WatchOptions::new()
                        .with_prefix()
                        .with_start_revision(self.revision + 1),
                ),
            )
            .await
            .map_err(failed)?;
        let (keeper, keep_alive) = self.client.lease_keep_alive(lease).await.map_err(failed)?;
        let (stop, stopped) = watch::channel(false);
        let task = tokio::spawn(serve(
            self,
            node,
            lease,
            (keeper, keep_alive),
            watching,
            watch_prefix,
            stopped,
        ));
        Ok(Running { stop, task })
    }
}

/// The control plane running beside a node.
#[derive(Debug)]
pub struct Running {
    stop: watch::Sender<bool>,
    task: JoinHandle<()>,
}

impl Running {
    /// Stops watching, and revokes the node's lease (its entry goes at
    /// once, not a lease later).
    pub async fn stop(self) {
        self.stop.send_replace(true);
        if let Err(e) = self.task.await {
            tracing::warn!(error = %e, "etcd task");
        }
    }
}

/// The lease kept alive at a third of its time to live; each record event
/// of a hosted volume applied.
async fn serve(
    mut plane: ControlPlane,
    node: Arc<Node>,
    lease: i64,
    (mut keeper, mut keep_alive): (etcd_client::LeaseKeeper, etcd_client::LeaseKeepAliveStream),
    mut watching: etcd_client::WatchStream,
    watch_prefix: String,
    mut stopped: watch::Receiver<bool>,
) {
    let mut renew = tokio::time::interval(plane.options.lease_ttl / 3);
    loop {
        tokio::select! {
            () = async { let _ = stopped.wait_for(|stop| *stop).await; } => break,
            _ = renew.tick() => {
                if let Err(e) = keeper.keep_alive().await {
                    tracing::error!(error = %e, lease, "etcd: lease renewal not sent");
                }
            }
            renewed = keep_alive.message() => match renewed {
                Ok(Some(renewed)) if renewed.ttl() > 0 => {}
                Ok(Some(_)) => tracing::error!(lease, "etcd: the lease expired"),
                Ok(None) => {
                    tracing::error!(lease, "etcd: lease renewals closed");
                    break;
                }
                Err(e) => {
                    tracing::error!(error = %e, lease, "etcd: lease renewal failed");
                    break;
                }
            },
            event = watching.message() => match event {
                Ok(Some(response)) => {
                    for event in response.events() {
                        if event.event_type() != EventType::Put {
                            continue;
                        }
                        let Some(kv) = event.kv() else { continue };
                        let key = String::from_utf8_lossy(kv.key()).into_owned();
                        let Some(volume) = key.strip_prefix(&watch_prefix) else { continue };
                        apply(&node, &key, volume, kv.value()).await;
                    }
                }
                Ok(None) => {
                    tracing::error!("etcd: the watch of the volume records ended");
                    break;
                }
                Err(e) => {
                    tracing::error!(error = %e, "etcd: the watch of the volume records failed");
                    break;
                }
            },
        }
    }
    if let Err(e) = plane.client.lease_revoke(lease).await {
        tracing::warn!(error = %e, lease, "etcd: lease not revoked (it expires)");
    }
}

/// Applies the record of `volume` if this node hosts it and it is newer.
async fn apply(node: &Node, key: &str, volume: &str, value: &[u8]) {
    if node.volume(volume).is_none() {
        return;
    }
    let record = match parse(key, value) {
        Ok(record) => record,
        Err(e) => return tracing::error!(error = %e, "etcd: record ignored"),
    };
    match node.apply_assignment(volume, record.applied()).await {
        Ok(()) => tracing::info!(volume, epoch = record.epoch, primary = %record.primary,
            "etcd: assignment applied"),
        Err(NodeError::Fenced { .. }) => {
            tracing::debug!(
                volume,
                epoch = record.epoch,
                "etcd: record not newer than the applied"
            )
        }
        Err(e) => tracing::error!(error = %e, volume, "etcd: assignment refused"),
    }
}

fn parse(key: &str, value: &[u8]) -> Result<VolumeRecord, EtcdError> {
    serde_json::from_slice(value).map_err(|e| EtcdError::Record {
        key: key.to_owned(),
        what: e.to_string(),
    })
}

/// What a record must say for `node` to open the volume from it.
fn check(key: &str, record: &VolumeRecord, node: &str, size: u64) -> Result<(), EtcdError> {
    let refuse = |what: String| {
        Err(EtcdError::Record {
            key: key.to_owned(),
            what,
        })
    };
    if record.size != size {
        return refuse(format!("size {} where the config says {size}", record.size));
    }
    if record.replicas.contains_key(&record.primary) {
        return refuse(format!("{} is primary and replica", record.primary));
    }
    if record.primary != node && !record.replicas.contains_key(node) {
        return refuse(format!("it leaves out this node ({node})"));
    }
    Ok(())
}
