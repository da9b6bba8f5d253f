//! etcd as the control plane (`walship serve --etcd URL`), instead of the
//! static config alone.
//!
//! The rules are in [`crate::control`], pure; this module reads etcd into
//! a [`ClusterView`](crate::control::ClusterView) and carries out each
//! action as one guarded transaction. Every key is in [`keys`] (one
//! table): a volume's record (`volumes/<name>`: epoch, primary, replicas,
//! commit mode, size) is created from the config when absent, in one
//! transaction (the first node to start writes it, the others read it);
//! from then on etcd wins over the config. A node's entry (`nodes/<node>`)
//! lives under a lease the node keeps alive (`session.rs`): it disappears
//! when the node stops renewing it.
//!
//! The lease also fences the node's writes ([`WriteFence`]): an NBD write
//! or flush is acknowledged only while the last renewal etcd granted is
//! certainly still alive there (see the fence's clock assumption), so a
//! node cut off from etcd stops acknowledging before its lease can expire
//! and another node be made primary. A broken renewal stream or watch
//! (etcd restarting) is opened again, the watches from where they were
//! (or from what is there now, past a compaction); once the fence lapses
//! or etcd says the lease is gone, the control plane ends and `walship
//! serve` stops.
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

mod controller;
mod feed;
mod follower;
pub mod keys;
mod plane;
mod reporter;
mod session;
mod store;
mod terms;
mod watched;

pub use crate::control::{
    DataLoss, Decision, NodeRecord, Outcome, ProgressRecord, ReplicaProgress, ReplicaReport,
    VolumeRecord,
};
pub use controller::{
    promote_accepting_loss, PromoteError, ANSWER_EVERY, CONTROL_EVERY, FAILPOINT_ENV,
    FAILPOINT_HOLD_ENV,
};
pub use keys::{
    address_key, decision_key, node_key, prefix, probe_key, progress_key, replica_report_key,
    term_key, volume_key,
};
pub use reporter::PROGRESS_EVERY;
pub use session::CONNECT_PATIENCE;
pub use terms::EtcdTerms;

use crate::config::NodeConfig;
use crate::fence::WriteFence;
use crate::node::Node;
use etcd_client::{Client, PutOptions};
use feed::Feed;
use follower::{follow, notes_feed, read_records, resync, Notes};
use plane::{supervise, Plane};
use session::{client, keep, not_answering, stopping, Session, Task, CONNECT_RETRY, STOP_GRACE};
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::watch;

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
    /// How often the hosted volumes' reports are written when their LSNs
    /// moved ([`PROGRESS_EVERY`] by default); a replica's state change is
    /// reported at once.
    pub progress_every: Duration,
}

impl EtcdOptions {
    /// `endpoints` with a lease of 5 s, progress every [`PROGRESS_EVERY`].
    pub fn new(endpoints: Vec<String>) -> Self {
        Self {
            endpoints,
            lease_ttl: Duration::from_secs(5),
            progress_every: PROGRESS_EVERY,
        }
    }
}

/// A connection to etcd, before the node runs: the records read, and the
/// node's lease granted and kept alive from then on (a node may take long
/// to open its volumes), its renewals holding the node's [`WriteFence`].
pub struct ControlPlane {
    plane: Plane,
    /// The revision the records were read at: the watch starts after it.
    revision: i64,
    lease: i64,
    /// The lease's time to live, as granted.
    ttl: Duration,
    keeping: Task,
}

impl std::fmt::Debug for ControlPlane {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ControlPlane")
            .field("endpoints", &self.plane.options.endpoints)
            .field("cluster", &self.plane.cluster)
            .field("revision", &self.revision)
            .field("lease", &self.lease)
            .finish()
    }
}

impl ControlPlane {
    /// Connects (trying for [`CONNECT_PATIENCE`] while etcd does not
    /// answer) and brings `config`'s volumes in line with etcd: a volume
    /// without a record gets one written from the config; a volume with
    /// one takes its assignment (epoch, primary, replicas, commit mode)
    /// from it. Call before [`Node::start`].
    pub async fn connect(options: EtcdOptions, config: &mut NodeConfig) -> Result<Self, EtcdError> {
        let endpoints = options.endpoints.join(",");
        let failed = |source| EtcdError::Client {
            endpoints: endpoints.clone(),
            source,
        };
        let fence = Arc::new(WriteFence::open());
        fence.hold();
        // A node started with (or before) etcd waits for it a while, as
        // nodes started together by a service manager would need.
        let patience = Instant::now() + CONNECT_PATIENCE;
        let asked = options.lease_ttl.as_millis().div_ceil(1000).max(1) as i64;
        let (client, granted, sent) = loop {
            let attempt = async {
                let mut client = client(&options.endpoints).await?;
                let sent = Instant::now();
                let granted = client.lease_grant(asked, None).await?;
                Ok((client, granted, sent))
            };
            match attempt.await {
                Ok(connected) => break connected,
                Err(e) if not_answering(&e) && Instant::now() + CONNECT_RETRY < patience => {
                    tracing::warn!(error = %e, "etcd: not reachable yet; trying again");
                    tokio::time::sleep(CONNECT_RETRY).await;
                }
                Err(e) => return Err(failed(e)),
            }
        };
        let (lease, ttl) = (
            granted.id(),
            Duration::from_secs(granted.ttl().max(1) as u64),
        );
        fence.renewed(sent, ttl);
        tracing::info!(
            lease,
            asked_ms = options.lease_ttl.as_millis() as u64,
            granted_s = ttl.as_secs(),
            "etcd: lease granted"
        );
        let mut renewing = client.clone();
        let renewals = renewing.lease_keep_alive(lease).await.map_err(failed)?;
        let keeping = Task::spawn({
            let (client, fence) = (client.clone(), Arc::clone(&fence));
            move |stopped| keep(lease, ttl, client, renewals, fence, stopped)
        });
        let plane = Plane {
            client,
            options,
            cluster: config.cluster.clone(),
            node: config.node.clone(),
            entry: NodeRecord {
                replication: config.replication.to_string(),
                admin: config.admin.map(|a| a.to_string()),
                nbd: config.nbd.map(|a| a.to_string()),
                ready: false,
            },
            fence,
        };
        // Registered before the records are read: a controller never takes
        // a node that is starting (and about to serve) for a lost one, and
        // a promotion away from this node either committed before the
        // registration (the reads below see it) or fails (its transaction
        // requires the lost primary unregistered).
        let mut client = plane.client.clone();
        let read = match plane.register(lease, false).await {
            Ok(()) => read_records(&mut client, config, &failed).await,
            Err(e) => Err(e),
        };
        let revision = match read {
            Ok(revision) => revision,
            Err(e) => {
                // Refused: the registration goes now, not a lease later.
                plane.fence.close();
                keeping.stop().await;
                let revoke = client.lease_revoke(lease);
                let _ = tokio::time::timeout(STOP_GRACE, revoke).await;
                return Err(e);
            }
        };
        Ok(Self {
            plane,
            revision,
            lease,
            ttl,
            keeping,
        })
    }

    /// The fence the lease holds: the node must acknowledge writes only
    /// while it allows them ([`Node::start_fenced`]).
    pub fn fence(&self) -> Arc<WriteFence> {
        Arc::clone(&self.plane.fence)
    }

    /// Where the node records every term its primaries open in
    /// (`terms/<volume>`), read before each opening.
    pub fn terms(&self) -> Arc<dyn crate::TermKeeper> {
        Arc::new(EtcdTerms::new(
            self.plane.client.clone(),
            &self.plane.cluster,
            &self.plane.node,
        ))
    }

    /// What the node's status calls this control plane (`etcd at URL`).
    pub fn describe(&self) -> String {
        format!("etcd at {}", self.plane.options.endpoints.join(","))
    }

    /// Follows `node`'s volumes: applies every newer record as it is
    /// written, shows decisions, answers probes, reports, and campaigns
    /// for the controller's seat. A session lost (the lease not renewed
    /// in time, a watch that cannot resume) is ridden out: the node's
    /// writes are fenced, and it rejoins as soon as etcd answers
    /// ([`Plane::rejoin`]), without a restart. Runs until
    /// [`Running::stop`].
    pub async fn run(self, node: Arc<Node>) -> Result<Running, EtcdError> {
        let Self {
            plane,
            revision,
            lease,
            ttl,
            keeping,
        } = self;
        // A session that cannot start (etcd lost meanwhile) is ridden out
        // like one lost later.
        let session = match plane.serve(&node, (lease, ttl, keeping), revision).await {
            Ok(session) => Some(session),
            Err(e) => {
                tracing::error!(why = %e, "etcd: session lost before it served; writes fenced until this node rejoins");
                None
            }
        };
        let current = Arc::new(tokio::sync::Mutex::new(session));
        let supervising = Task::spawn({
            let (plane, current) = (plane.clone(), Arc::clone(&current));
            move |stopped| supervise(plane, node, (current, lease), stopped)
        });
        Ok(Running {
            plane,
            current,
            supervising,
        })
    }

    /// Gives up before the node ran: stops renewing and revokes the lease.
    pub async fn abandon(self) {
        self.plane.fence.close();
        self.keeping.stop().await;
        let mut client = self.plane.client.clone();
        let _ = tokio::time::timeout(STOP_GRACE, client.lease_revoke(self.lease)).await;
    }
}

/// The control plane running beside a node.
pub struct Running {
    plane: Plane,
    /// The session (none while the node rejoins).
    current: Arc<tokio::sync::Mutex<Option<Session>>>,
    supervising: Task,
}

impl std::fmt::Debug for Running {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Running")
            .field("cluster", &self.plane.cluster)
            .finish_non_exhaustive()
    }
}

impl Running {
    /// Returns why, if the control plane ended on its own: not for a lost
    /// session (ridden out), only if its supervisor failed. The node is
    /// then deaf to new assignments and its writes fenced once the lease
    /// lapses: `walship serve` stops and exits non-zero.
    pub async fn ended(&mut self) -> String {
        self.supervising.ended().await
    }

    /// Stops watching and renewing, and revokes the node's lease (its
    /// entry goes at once, not a lease later).
    pub async fn stop(self) {
        // The supervisor first: it would take the fence closing below for
        // a lost session and rejoin.
        self.supervising.stop().await;
        // No write acknowledged once the lease may be gone: a revoked
        // lease lets the controller promote another node at once.
        self.plane.fence.close();
        let session = self.current.lock().await.take();
        if let Some(session) = session {
            session.stop(self.plane.client.clone()).await;
        }
    }
}
