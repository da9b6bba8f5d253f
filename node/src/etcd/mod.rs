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
//!   (`addresses/<node>`: its replication address, kept.)
//! - `progress/<volume>`, `decisions/<volume>`, `controller`: the
//!   primary's reports and the controller's decisions and election
//!   ([`control`]).
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

mod control;
mod terms;

pub use control::{
    address_key, decision_key, probe_key, progress_key, promote_accepting_loss, replica_report_key,
    DataLoss, Decision, ProgressRecord, PromoteError, ReplicaProgress, ReplicaReport,
    CONTROL_EVERY, FAILPOINT_ENV, FAILPOINT_HOLD_ENV, PROGRESS_EVERY,
};

use crate::config::NodeConfig;
use crate::fence::WriteFence;
use crate::node::{Node, NodeError};
use crate::Applied;
use etcd_client::{
    Client, Compare, CompareOp, ConnectOptions, EventType, GetOptions, PutOptions, Txn, TxnOp,
    TxnOpResponse, WatchOptions,
};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};
pub use terms::{term_key, EtcdTerms};
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
    /// Lost primaries waiting to come back (node → replication address):
    /// left out of the replicas, which under sync_all would stop every
    /// commit until they return; the controller adds each back, in a new
    /// epoch, once it registers again.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub departed: BTreeMap<String, String>,
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
    /// Its volumes are open and it serves (written again once they are):
    /// a lost primary back is added as a replica only then.
    #[serde(default)]
    pub ready: bool,
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

/// A connection to etcd, before the node runs: the records read, and the
/// node's lease granted and kept alive from then on (a node may take long
/// to open its volumes), its renewals holding the node's [`WriteFence`].
pub struct ControlPlane {
    client: Client,
    options: EtcdOptions,
    /// This node's registration.
    entry: NodeRecord,
    cluster: String,
    /// This node's name.
    node: String,
    /// The revision the records were read at: the watch starts after it.
    revision: i64,
    lease: i64,
    /// The lease's time to live, as granted.
    ttl: Duration,
    fence: Arc<WriteFence>,
    keeping: Task,
}

impl std::fmt::Debug for ControlPlane {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ControlPlane")
            .field("endpoints", &self.options.endpoints)
            .field("cluster", &self.cluster)
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
        let failed = |source| EtcdError::Client {
            endpoints: options.endpoints.join(","),
            source,
        };
        // etcd grants whole seconds, at least its minimum (1.5 election
        // timeouts: 2 s by default); renewals follow what it granted.
        let asked = options.lease_ttl.as_millis().div_ceil(1000).max(1) as i64;
        let fence = Arc::new(WriteFence::open());
        fence.hold();
        // A node started with (or before) etcd waits for it a while, as
        // nodes started together by a service manager would need.
        let patience = Instant::now() + CONNECT_PATIENCE;
        let (mut client, granted, sent) = loop {
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
        let renewals = client.lease_keep_alive(lease).await.map_err(failed)?;
        let keeping = Task::spawn(|stopped| {
            keep(
                lease,
                ttl,
                client.clone(),
                renewals,
                Arc::clone(&fence),
                stopped,
            )
        });
        // Registered before the records are read: a controller never takes
        // a node that is starting (and about to serve) for a lost one, and
        // a promotion away from this node either committed before the
        // registration (the reads below see it) or fails (its transaction
        // requires the lost primary unregistered).
        let entry = NodeRecord {
            replication: config.replication.to_string(),
            admin: config.admin.map(|a| a.to_string()),
            nbd: config.nbd.map(|a| a.to_string()),
            ready: false,
        };
        let value = serde_json::to_vec(&entry)?;
        let with_lease = Some(PutOptions::new().with_lease(lease));
        let key = node_key(&config.cluster, &config.node);
        client.put(key, value, with_lease).await.map_err(failed)?;
        // Kept after the lease: a lost primary is added back at it.
        let address = address_key(&config.cluster, &config.node);
        client
            .put(address, entry.replication.clone(), None)
            .await
            .map_err(failed)?;
        let revision = match read_records(&mut client, config, &failed).await {
            Ok(revision) => revision,
            Err(e) => {
                // Refused: the registration goes now, not a lease later.
                fence.close();
                keeping.stop().await;
                let revoke = client.lease_revoke(lease);
                let _ = tokio::time::timeout(STOP_GRACE, revoke).await;
                return Err(e);
            }
        };
        Ok(Self {
            client,
            options,
            entry,
            cluster: config.cluster.clone(),
            node: config.node.clone(),
            revision,
            lease,
            ttl,
            fence,
            keeping,
        })
    }

    /// The fence the lease holds: the node must acknowledge writes only
    /// while it allows them ([`Node::start_fenced`]).
    pub fn fence(&self) -> Arc<WriteFence> {
        Arc::clone(&self.fence)
    }

    /// Where the node records every term its primaries open in
    /// (`terms/<volume>`), read before each opening.
    pub fn terms(&self) -> Arc<dyn crate::TermKeeper> {
        Arc::new(EtcdTerms::new(
            self.client.clone(),
            &self.cluster,
            &self.node,
        ))
    }

    /// What the node's status calls this control plane (`etcd at URL`).
    pub fn describe(&self) -> String {
        format!("etcd at {}", self.options.endpoints.join(","))
    }

    /// Follows `node`'s volumes: applies every newer record as it is
    /// written, shows decisions, answers probes, reports, and campaigns
    /// for the controller's seat. Runs until [`Running::stop`], or until
    /// the lease lapses or a watch cannot resume ([`Running::ended`]).
    pub async fn run(mut self, node: Arc<Node>) -> Result<Running, EtcdError> {
        let failed = |source| EtcdError::Client {
            endpoints: self.options.endpoints.join(","),
            source,
        };
        let watch_prefix = format!("{}volumes/", prefix(&self.cluster));
        let records = Feed::open(&self.client, watch_prefix.clone(), self.revision + 1)
            .await
            .map_err(failed)?;
        // The decisions and probes so far, then every later one.
        let (probes_tx, probes) = watch::channel(BTreeMap::new());
        let notes = Notes {
            decisions: format!("{}decisions/", prefix(&self.cluster)),
            probes: probe_key(&self.cluster, ""),
            node: Arc::clone(&node),
            probes_tx,
        };
        let decisions = notes_feed(&mut self.client, &notes, notes.decisions.clone())
            .await
            .map_err(failed)?;
        let probes_feed = notes_feed(&mut self.client, &notes, notes.probes.clone())
            .await
            .map_err(failed)?;
        let watching = Task::spawn({
            let node = Arc::clone(&node);
            move |stopped| {
                follow(
                    node,
                    (records, watch_prefix),
                    (notes, decisions, probes_feed),
                    stopped,
                )
            }
        });
        let reporting = Task::spawn({
            let (client, cluster, node) =
                (self.client.clone(), self.cluster.clone(), Arc::clone(&node));
            let every = self.options.progress_every;
            move |stopped| control::report(client, (cluster, every), node, probes, stopped)
        });
        let controlling = Task::spawn({
            let (client, cluster) = (self.client.clone(), self.cluster.clone());
            let (me, lease) = (node.name().to_owned(), (self.lease, self.ttl));
            move |stopped| control::control(client, cluster, me, lease, stopped)
        });
        // Serving: the registration says so.
        let ready = NodeRecord {
            ready: true,
            ..self.entry.clone()
        };
        let with_lease = Some(PutOptions::new().with_lease(self.lease));
        let key = node_key(&self.cluster, node.name());
        self.client
            .put(key, serde_json::to_vec(&ready)?, with_lease)
            .await
            .map_err(failed)?;
        Ok(Running {
            client: self.client,
            lease: self.lease,
            fence: self.fence,
            keeping: self.keeping,
            watching,
            reporting,
            controlling,
        })
    }
}

/// Brings `config`'s volumes in line with their records (creating the
/// missing ones from it); the revision to watch the records after.
async fn read_records(
    client: &mut Client,
    config: &mut NodeConfig,
    failed: &impl Fn(etcd_client::Error) -> EtcdError,
) -> Result<i64, EtcdError> {
    // The watch starts after the oldest read: a record written between
    // two reads is seen again (and fenced, if not newer), never missed.
    let mut revision = i64::MAX;
    for spec in &mut config.volumes {
        let key = volume_key(&config.cluster, &spec.name);
        let from_config = VolumeRecord {
            epoch: spec.epoch,
            primary: spec.primary.clone(),
            commit_mode: spec.commit_mode,
            size: spec.size,
            replicas: spec.replicas.clone(),
            departed: BTreeMap::new(),
        };
        let value = serde_json::to_vec(&from_config)?;
        // Written only if nobody wrote it first; read otherwise.
        let txn = Txn::new()
            .when([Compare::create_revision(key.as_str(), CompareOp::Equal, 0)])
            .and_then([TxnOp::put(key.as_str(), value, None)])
            .or_else([TxnOp::get(key.as_str(), None)]);
        let response = client.txn(txn).await.map_err(failed)?;
        revision = revision.min(response.header().map_or(0, |h| h.revision()));
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
        let mut record = parse(&key, &stored)?;
        if let Some(addr) = record.departed.get(&config.node).cloned() {
            // A lost primary back: it opens as a replica of the current
            // primary, which connects to it once the controller adds it
            // back in the next epoch.
            tracing::info!(volume = %spec.name, epoch = record.epoch, primary = %record.primary,
                "etcd: this node lost the primary's seat; back as a replica, waiting to be added");
            record.replicas.insert(config.node.clone(), addr);
        }
        check(&key, &spec.name, &record, &config.node, spec.size)?;
        if record != from_config {
            tracing::info!(volume = %spec.name, epoch = record.epoch,
                primary = %record.primary, "etcd: the record overrides the config");
        }
        spec.epoch = record.epoch;
        spec.primary = record.primary;
        spec.commit_mode = record.commit_mode;
        spec.replicas = record.replicas;
    }
    if revision == i64::MAX {
        // No volumes: watch from now.
        let now = client.get("/", None).await.map_err(failed)?;
        revision = now.header().map_or(0, |h| h.revision());
    }
    Ok(revision)
}

/// Resolves once a stop is asked for on `stopped` (or its sender is
/// gone): the first branch of each task's `select!`.
pub(super) async fn stopping(stopped: &mut watch::Receiver<bool>) {
    let _ = stopped.wait_for(|stop| *stop).await;
}

/// A client of `endpoints`.
async fn client(endpoints: &[String]) -> Result<Client, etcd_client::Error> {
    let connect = ConnectOptions::new()
        .with_connect_timeout(Duration::from_secs(3))
        .with_timeout(Duration::from_secs(5));
    Client::connect(endpoints, Some(connect)).await
}

/// Whether `e` says etcd did not answer (not up yet, unreachable), rather
/// than that it refused (a bad endpoint, a bad request).
fn not_answering(e: &etcd_client::Error) -> bool {
    match e {
        etcd_client::Error::TransportError(_) | etcd_client::Error::IoError(_) => true,
        // A connection refused, reset or closed under the request comes as
        // a status (Unavailable, Unknown, Cancelled) over a transport error.
        etcd_client::Error::GRpcStatus(status) => {
            matches!(
                status.code(),
                tonic::Code::Unavailable | tonic::Code::DeadlineExceeded
            ) || std::error::Error::source(status)
                .is_some_and(|source| source.is::<tonic::transport::Error>())
        }
        _ => false,
    }
}

/// How long a starting node tries to reach etcd before it gives up (an
/// attempt under way when it runs out is finished: up to 8 s more).
pub const CONNECT_PATIENCE: Duration = Duration::from_secs(30);
/// How soon it tries again.
const CONNECT_RETRY: Duration = Duration::from_millis(500);

/// How long a stop waits for a task or a revocation: etcd may be out of
/// reach, which is often why the node is stopping.
const STOP_GRACE: Duration = Duration::from_secs(1);

/// A task of the control plane: stopped on request, or ending on its own
/// with the reason.
#[derive(Debug)]
struct Task {
    stop: watch::Sender<bool>,
    handle: JoinHandle<()>,
    ended: watch::Receiver<Option<String>>,
}

impl Drop for Task {
    /// A task not stopped (a failed start) does not outlive its owner.
    fn drop(&mut self) {
        self.handle.abort();
    }
}

impl Task {
    fn spawn<F, Fut>(body: F) -> Self
    where
        F: FnOnce(watch::Receiver<bool>) -> Fut,
        Fut: std::future::Future<Output = Option<String>> + Send + 'static,
    {
        let (stop, stopped) = watch::channel(false);
        let (ended_tx, ended) = watch::channel(None);
        let body = body(stopped);
        let handle = tokio::spawn(async move {
            let why = body.await;
            if let Some(why) = &why {
                tracing::error!(why, "etcd: the control plane ended");
            }
            ended_tx.send_replace(why);
        });
        Self {
            stop,
            handle,
            ended,
        }
    }

    /// Why it ended on its own, once it has.
    async fn ended(&mut self) -> String {
        match self.ended.wait_for(Option::is_some).await {
            Ok(why) => why.clone().unwrap_or_default(),
            Err(_) => "the control plane's task ended".into(),
        }
    }

    /// Stops it; a task still inside a request to an etcd it cannot reach
    /// after [`STOP_GRACE`] is dropped there.
    async fn stop(mut self) {
        self.stop.send_replace(true);
        match tokio::time::timeout(STOP_GRACE, &mut self.handle).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => tracing::warn!(error = %e, "etcd task"),
            Err(_) => self.handle.abort(),
        }
    }
}

/// The control plane running beside a node.
pub struct Running {
    client: Client,
    lease: i64,
    fence: Arc<WriteFence>,
    keeping: Task,
    watching: Task,
    reporting: Task,
    controlling: Task,
}

impl std::fmt::Debug for Running {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Running")
            .field("lease", &self.lease)
            .finish()
    }
}

impl Running {
    /// Returns why, once the control plane ended on its own: the lease
    /// could not be kept or the watch failed. The node is then neither
    /// registered nor told of new assignments, and its writes are fenced
    /// once the lease lapses: it must not go on serving as if it were in
    /// the cluster (`walship serve` stops and exits non-zero).
    pub async fn ended(&mut self) -> String {
        tokio::select! {
            why = self.keeping.ended() => why,
            why = self.watching.ended() => why,
            why = self.controlling.ended() => why,
        }
    }

    /// Stops watching and renewing, and revokes the node's lease (its
    /// entry goes at once, not a lease later).
    pub async fn stop(mut self) {
        // No write acknowledged once the lease may be gone: a revoked
        // lease lets the controller promote another node at once.
        self.fence.close();
        self.controlling.stop().await;
        self.reporting.stop().await;
        self.watching.stop().await;
        self.keeping.stop().await;
        let revoked = tokio::time::timeout(STOP_GRACE, self.client.lease_revoke(self.lease)).await;
        if !matches!(revoked, Ok(Ok(_))) {
            tracing::warn!(lease = self.lease, "etcd: lease not revoked (it expires)");
        }
    }
}

impl ControlPlane {
    /// Gives up before the node ran: stops renewing and revokes the lease.
    pub async fn abandon(mut self) {
        self.fence.close();
        self.keeping.stop().await;
        let _ = tokio::time::timeout(STOP_GRACE, self.client.lease_revoke(self.lease)).await;
    }
}

/// Renews the lease at a third of its time to live; each renewal etcd
/// grants moves the write fence on. A broken renewal stream is opened
/// again; ends when the fence lapses (no renewal granted within the
/// lease: a partition from etcd, or etcd away too long) or etcd says the
/// lease is gone.
async fn keep(
    lease: i64,
    ttl: Duration,
    mut client: Client,
    renewals: (etcd_client::LeaseKeeper, etcd_client::LeaseKeepAliveStream),
    fence: Arc<WriteFence>,
    mut stopped: watch::Receiver<bool>,
) -> Option<String> {
    let mut renew = tokio::time::interval(ttl / 3);
    // When each renewal still unanswered on this stream was sent.
    let mut sent: VecDeque<Instant> = VecDeque::new();
    let mut stream = Some(renewals);
    let mut trouble = String::new();
    loop {
        // A broken stream (etcd restarting) is opened again for as long as
        // the lease may be alive: the fence says until when.
        let Some((keeper, renewed)) = stream.as_mut() else {
            if !fence.allows() {
                return Some(format!(
                    "lease {lease} not renewed within its time to live ({trouble}): writes fenced"
                ));
            }
            tokio::select! {
                () = stopping(&mut stopped) => return None,
                () = tokio::time::sleep(REOPEN_EVERY) => {}
            }
            let reopened = tokio::select! {
                () = stopping(&mut stopped) => return None,
                reopened = client.lease_keep_alive(lease) => reopened,
            };
            match reopened {
                Ok(reopened) => {
                    tracing::info!(lease, "etcd: renewals resumed");
                    sent.clear();
                    stream = Some(reopened);
                    renew.reset_immediately();
                }
                Err(e) => trouble = format!("renewals not resumed: {e}"),
            }
            continue;
        };
        tokio::select! {
            () = stopping(&mut stopped) => return None,
            _ = renew.tick() => {
                if !fence.allows() {
                    return Some(format!("lease {lease} not renewed within its time to live: writes fenced"));
                }
                let at = Instant::now();
                match keeper.keep_alive().await {
                    Ok(()) => sent.push_back(at),
                    Err(e) => {
                        trouble = format!("renewal not sent: {e}");
                        tracing::warn!(lease, error = %e, "etcd: renewal not sent; reopening");
                        stream = None;
                    }
                }
            }
            answer = renewed.message() => match answer {
                Ok(Some(answer)) if answer.ttl() > 0 => {
                    // Answers come in the order of the renewals.
                    if let Some(at) = sent.pop_front() {
                        fence.renewed(at, Duration::from_secs(answer.ttl() as u64));
                    }
                }
                Ok(Some(_)) => return Some(format!("lease {lease} expired")),
                Ok(None) => {
                    trouble = "renewals closed".into();
                    tracing::warn!(lease, "etcd: renewals closed; reopening");
                    stream = None;
                }
                Err(e) => {
                    trouble = format!("renewal failed: {e}");
                    tracing::warn!(lease, error = %e, "etcd: renewal failed; reopening");
                    stream = None;
                }
            },
        }
    }
}

/// Applies each record event of a hosted volume, and notes each decision
/// about one. Ends when a watch does.
/// What a node takes from the controller's keys: decisions, shown in its
/// status, and probes, which its reports answer.
struct Notes {
    decisions: String,
    probes: String,
    node: Arc<Node>,
    /// Volume → the revision of the last probe about it.
    probes_tx: watch::Sender<BTreeMap<String, i64>>,
}

impl Notes {
    /// Takes a decision or a probe about a volume this node hosts.
    fn take(&self, kv: &etcd_client::KeyValue) {
        let Ok(key) = kv.key_str() else { return };
        if let Some(volume) = key.strip_prefix(&self.decisions) {
            if self.node.volume(volume).is_some() {
                if let Ok(decision) = serde_json::from_slice(kv.value()) {
                    self.node.note_control_decision(volume, decision);
                }
            }
        } else if let Some(volume) = key.strip_prefix(&self.probes) {
            if self.node.volume(volume).is_some() {
                let revision = kv.mod_revision();
                self.probes_tx.send_modify(|probes| {
                    probes.insert(volume.to_owned(), revision);
                });
            }
        }
    }
}

/// Takes what is under `prefix` now into `notes`, then follows it.
async fn notes_feed(
    client: &mut Client,
    notes: &Notes,
    prefix: String,
) -> Result<Feed, etcd_client::Error> {
    let known = client
        .get(prefix.as_str(), Some(GetOptions::new().with_prefix()))
        .await?;
    for kv in known.kvs() {
        notes.take(kv);
    }
    let after = known.header().map_or(0, |h| h.revision()) + 1;
    Feed::open(client, prefix, after).await
}

/// How soon a broken watch or renewal stream is opened again.
const REOPEN_EVERY: Duration = Duration::from_millis(200);

/// A watch of a prefix that resumes where it was when its stream breaks
/// (etcd restarting, a connection reset): each put under the prefix is
/// seen, in order; if etcd compacted its history past the point to resume
/// from, what is under the prefix then is seen instead.
struct Feed {
    client: Client,
    prefix: String,
    /// The revision to resume from.
    next: i64,
    stream: Option<etcd_client::WatchStream>,
    /// When a broken stream is opened again.
    retry_at: tokio::time::Instant,
}

impl Feed {
    async fn open(client: &Client, prefix: String, from: i64) -> Result<Self, etcd_client::Error> {
        let mut feed = Self {
            client: client.clone(),
            prefix,
            next: from,
            stream: None,
            retry_at: tokio::time::Instant::now(),
        };
        feed.stream = Some(feed.watch().await?);
        Ok(feed)
    }

    async fn watch(&mut self) -> Result<etcd_client::WatchStream, etcd_client::Error> {
        let from = WatchOptions::new()
            .with_prefix()
            .with_start_revision(self.next);
        self.client.watch(self.prefix.as_str(), Some(from)).await
    }

    /// The next puts (after a compaction, everything under the prefix).
    /// Cancel-safe: nothing is lost if the future is dropped.
    async fn puts(&mut self) -> Vec<etcd_client::KeyValue> {
        loop {
            let Some(stream) = self.stream.as_mut() else {
                // A deadline, not a pause: the other watches' answers cancel
                // this future often.
                tokio::time::sleep_until(self.retry_at).await;
                match self.watch().await {
                    Ok(stream) => {
                        tracing::info!(prefix = %self.prefix, from = self.next, "etcd: watch resumed");
                        self.stream = Some(stream);
                    }
                    Err(e) => {
                        self.retry_at = tokio::time::Instant::now() + REOPEN_EVERY;
                        tracing::warn!(prefix = %self.prefix, error = %e, "etcd: watch not resumed yet")
                    }
                }
                continue;
            };
            let why = match stream.message().await {
                Ok(Some(response)) if response.compact_revision() > 0 => {
                    // The history to resume from is gone: what is there now
                    // (every taker is fenced by epoch or idempotent), then on.
                    tracing::warn!(prefix = %self.prefix, from = self.next,
                        compacted = response.compact_revision(),
                        "etcd: watch cannot resume past a compaction; reading the prefix again");
                    let all = Some(GetOptions::new().with_prefix());
                    match self.client.get(self.prefix.as_str(), all).await {
                        Ok(now) => {
                            self.next = now.header().map_or(self.next, |h| h.revision() + 1);
                            self.stream = None;
                            self.retry_at = tokio::time::Instant::now();
                            let kvs = now.kvs().to_vec();
                            if kvs.is_empty() {
                                continue;
                            }
                            return kvs;
                        }
                        Err(e) => format!("read after a compaction failed: {e}"),
                    }
                }
                Ok(Some(response)) if response.canceled() => {
                    format!("canceled: {}", response.cancel_reason())
                }
                Ok(Some(response)) => {
                    // Resumed after the last event seen, never the header's
                    // revision: the answer that creates a watch carries the
                    // current one, ahead of the events still to come.
                    for kv in response.events().iter().filter_map(|e| e.kv()) {
                        self.next = self.next.max(kv.mod_revision() + 1);
                    }
                    let puts: Vec<etcd_client::KeyValue> = response
                        .events()
                        .iter()
                        .filter(|e| e.event_type() == EventType::Put)
                        .filter_map(|e| e.kv().cloned())
                        .collect();
                    if puts.is_empty() {
                        continue;
                    }
                    return puts;
                }
                Ok(None) => "ended".to_owned(),
                Err(e) => e.to_string(),
            };
            tracing::warn!(prefix = %self.prefix, why, "etcd: watch broken; resuming");
            self.stream = None;
            self.retry_at = tokio::time::Instant::now() + REOPEN_EVERY;
        }
    }
}

async fn follow(
    node: Arc<Node>,
    (mut records, watch_prefix): (Feed, String),
    (notes, mut decisions, mut probes): (Notes, Feed, Feed),
    mut stopped: watch::Receiver<bool>,
) -> Option<String> {
    loop {
        tokio::select! {
            () = stopping(&mut stopped) => return None,
            puts = decisions.puts() => puts.iter().for_each(|kv| notes.take(kv)),
            puts = probes.puts() => puts.iter().for_each(|kv| notes.take(kv)),
            puts = records.puts() => {
                for kv in puts {
                    let key = String::from_utf8_lossy(kv.key()).into_owned();
                    let Some(volume) = key.strip_prefix(&watch_prefix) else { continue };
                    apply(&node, &key, volume, kv.value()).await;
                }
            },
        }
    }
}

/// Applies the record of `volume` if this node hosts it and it is newer.
async fn apply(node: &Node, key: &str, volume: &str, value: &[u8]) {
    if node.volume(volume).is_none() {
        return;
    }
    let config = node.config();
    let Some(spec) = config.volumes.iter().find(|v| v.name == volume) else {
        return;
    };
    let checked = parse(key, value).and_then(|record| {
        check(key, volume, &record, node.name(), spec.size)?;
        Ok(record)
    });
    let record = match checked {
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

/// What a record must say for `node` to open the volume from it: what the
/// config's loader checks of a volume, and the store's size.
fn check(
    key: &str,
    volume: &str,
    record: &VolumeRecord,
    node: &str,
    size: u64,
) -> Result<(), EtcdError> {
    let refuse = |what: String| {
        Err(EtcdError::Record {
            key: key.to_owned(),
            what,
        })
    };
    if record.size != size {
        return refuse(format!("size {} where the config says {size}", record.size));
    }
    record.applied().check(volume, node).or_else(refuse)
}
