//! The cluster: how it is built, its replicas' lifecycles, writes.

use super::{block, Converged, HarnessError, Relay, Result};
use crate::{
    PrimaryConfig, ReplicaConfig, ReplicaSpec, Runtime, Tuning, VolumeConfig, VolumeError,
    VolumeHandle,
};
use std::path::{Path, PathBuf};
use std::time::Duration;
use walship_engine::{
    Assignment, CommitMode, Endpoint, Epoch, ReplicaAssignment, ReplicaId, ReplicaState,
};
use walship_io::fs::FsRef;
use walship_io::StoreOptions;

/// How to build a cluster. Start from [`ClusterOptions::new`] and change
/// fields with struct update syntax.
#[derive(Debug, Clone)]
pub struct ClusterOptions {
    /// Cluster name, in every replica's identity.
    pub cluster: String,
    /// Volume name.
    pub volume: String,
    /// Replicas the cluster runs, by server name.
    pub replicas: Vec<String>,
    /// Replicas the primary is told about but the cluster does not run:
    /// `(server, address)`.
    pub outsiders: Vec<(String, String)>,
    /// The primary's commit mode.
    pub mode: CommitMode,
    /// The primary's tuning.
    pub tuning: Tuning,
    /// Every store's options (size, segments, lock wait).
    pub store: StoreOptions,
    /// Replicas checkpoint every this many committed LSNs.
    pub replica_checkpoint_every: u64,
    /// Where the data goes (`primary/`, then one directory per replica);
    /// a temporary directory, removed with the cluster, when `None`.
    pub dir: Option<PathBuf>,
    /// Replicas whose data lives elsewhere: `(server, directory)`.
    pub replica_dirs: Vec<(String, PathBuf)>,
    /// The file system under a node's store, by server name (`primary`
    /// for the primary): a page-cache model of its own per node, so one
    /// node can lose power. The others use `store.fs`.
    pub node_fs: Vec<(String, FsRef)>,
    /// Whether the primary peers before it serves, when the cluster
    /// starts it and when it is reopened (off, as for an embedder).
    pub peering: crate::config::Peering,
}

impl ClusterOptions {
    /// A best-effort volume of `blocks` 4 KiB blocks with no replicas,
    /// default tuning, stores that do not wait for a previous owner's lock
    /// (a stop returns with the lock released, and a reopen proves it).
    pub fn new(volume: &str, blocks: u64) -> Self {
        Self {
            cluster: "loopback".into(),
            volume: volume.into(),
            replicas: Vec::new(),
            outsiders: Vec::new(),
            mode: CommitMode::BestEffort,
            tuning: Tuning::default(),
            store: StoreOptions {
                lock_wait: Duration::ZERO,
                ..StoreOptions::new(blocks)
            },
            replica_checkpoint_every: 16 * 1024,
            dir: None,
            replica_dirs: Vec::new(),
            node_fs: Vec::new(),
            peering: crate::config::Peering::default(),
        }
    }

    /// The store options of the node `server` (`primary` for the primary).
    pub fn store_of(&self, server: &str) -> StoreOptions {
        let mut store = self.store.clone();
        if let Some((_, fs)) = self.node_fs.iter().find(|(s, _)| s == server) {
            store.fs = std::sync::Arc::clone(fs);
        }
        store
    }

    /// These replicas, by server name.
    pub fn with_replicas(mut self, servers: &[&str]) -> Self {
        self.replicas = servers.iter().map(|s| (*s).to_owned()).collect();
        self
    }
}

/// One replica of the cluster.
#[derive(Debug)]
pub struct Node {
    /// Server name.
    pub server: String,
    /// Its data directory.
    pub dir: PathBuf,
    /// Its handle while it runs.
    pub handle: Option<VolumeHandle>,
    /// Where it listens.
    pub addr: String,
    /// Its endpoint's version: bumps with each new address.
    pub version: u64,
}

/// A primary and its replicas on loopback.
#[derive(Debug)]
pub struct LoopbackCluster {
    /// The runtime every volume of the cluster runs on.
    pub rt: Runtime,
    /// The primary.
    pub primary: VolumeHandle,
    /// The primary's data directory.
    pub primary_dir: PathBuf,
    /// The primary's server name (`primary`, or the replica promoted).
    pub primary_server: String,
    /// The replicas, running or stopped, and the outsiders.
    pub replicas: Vec<Node>,
    /// The primary's epoch.
    pub epoch: u64,
    /// The primary's commit mode.
    pub mode: CommitMode,
    /// How the cluster was built.
    pub options: ClusterOptions,
    /// The data's root directory.
    pub dir: PathBuf,
    /// The temporary directory, when the options named none.
    temp: Option<tempfile::TempDir>,
}

impl LoopbackCluster {
    /// Starts the replicas on ports of their own, then the primary.
    pub async fn start(options: ClusterOptions) -> Result<Self> {
        let rt = Runtime::start()?;
        let (temp, dir) = match &options.dir {
            Some(dir) => {
                std::fs::create_dir_all(dir)?;
                (None, dir.clone())
            }
            None => {
                let temp = tempfile::tempdir()?;
                let dir = temp.path().to_path_buf();
                (Some(temp), dir)
            }
        };
        let mut replicas = Vec::new();
        for server in &options.replicas {
            let dir = options
                .replica_dirs
                .iter()
                .find(|(s, _)| s == server)
                .map_or_else(|| dir.join(server), |(_, d)| d.clone());
            let handle = rt
                .spawn_volume(replica_config(&options, server, &dir, "127.0.0.1:0"))
                .await?;
            let addr = listen_addr(&handle)?;
            replicas.push(Node {
                server: server.clone(),
                dir,
                handle: Some(handle),
                addr,
                version: 1,
            });
        }
        for (server, addr) in &options.outsiders {
            replicas.push(Node {
                server: server.clone(),
                dir: dir.join(server),
                handle: None,
                addr: addr.clone(),
                version: 1,
            });
        }
        let primary_dir = dir.join("primary");
        let config = primary_config(
            &options,
            "primary",
            &primary_dir,
            1,
            options.mode,
            &replicas,
        );
        let primary = rt.spawn_volume(config).await?;
        Ok(Self {
            rt,
            primary,
            primary_dir,
            primary_server: "primary".into(),
            replicas,
            epoch: 1,
            mode: options.mode,
            options,
            dir,
            temp,
        })
    }

    /// The replica config of `server`, listening on `listen`.
    pub fn replica_config(&self, server: &str, listen: &str) -> VolumeConfig {
        replica_config(&self.options, server, &self.node(server).dir, listen)
    }

    /// The cluster's current assignment: its epoch, mode and endpoints.
    pub fn assignment(&self) -> Result<Assignment> {
        let replicas = self
            .replicas
            .iter()
            .map(|n| {
                Ok(ReplicaAssignment {
                    id: ReplicaId::new(&self.options.volume, &n.server)
                        .map_err(|e| HarnessError::Name(e.to_string()))?,
                    endpoint: Endpoint::new(n.addr.clone(), n.version),
                })
            })
            .collect::<Result<_>>()?;
        Ok(Assignment {
            epoch: Epoch(self.epoch),
            commit_mode: self.mode,
            replicas,
        })
    }

    /// Sends the primary the cluster's current assignment (after a change
    /// to its epoch or to a replica's endpoint).
    pub async fn reassign(&self) -> Result<()> {
        Ok(self.primary.apply_assignment(self.assignment()?).await?)
    }

    /// The replica on `server`.
    ///
    /// # Panics
    /// When the cluster has no such replica: the caller named it wrong.
    pub fn node(&self, server: &str) -> &Node {
        match self.replicas.iter().find(|n| n.server == server) {
            Some(node) => node,
            None => panic!("the cluster has no replica {server}"),
        }
    }

    /// The replica on `server`, to change.
    ///
    /// # Panics
    /// When the cluster has no such replica.
    pub fn node_mut(&mut self, server: &str) -> &mut Node {
        match self.replicas.iter_mut().find(|n| n.server == server) {
            Some(node) => node,
            None => panic!("the cluster has no replica {server}"),
        }
    }

    /// The handle of the running replica on `server`.
    ///
    /// # Panics
    /// When the cluster has no such replica or it is stopped.
    pub fn replica(&self, server: &str) -> &VolumeHandle {
        match &self.node(server).handle {
            Some(handle) => handle,
            None => panic!("replica {server} is not running"),
        }
    }

    /// Stops the replica on `server`; returns once its port and its
    /// directory are free.
    pub async fn stop_replica(&mut self, server: &str) {
        if let Some(handle) = self.node_mut(server).handle.take() {
            handle.stop().await;
        }
    }

    /// Starts the replica on `server` again on its address, or on a new
    /// port with its endpoint's version bumped (`new_port`). The primary
    /// learns a new address only from [`reassign`](Self::reassign).
    pub async fn restart_replica(&mut self, server: &str, new_port: bool) -> Result<()> {
        let listen = if new_port {
            "127.0.0.1:0".to_owned()
        } else {
            self.node(server).addr.clone()
        };
        let handle = self
            .rt
            .spawn_volume(self.replica_config(server, &listen))
            .await?;
        let addr = listen_addr(&handle)?;
        let node = self.node_mut(server);
        if new_port {
            node.addr = addr;
            node.version += 1;
        }
        node.handle = Some(handle);
        Ok(())
    }

    /// Puts a [`Relay`] between the primary and the replica on `server`: a
    /// new endpoint for it (version bumped), sent to the primary.
    pub async fn relay(&mut self, server: &str) -> Result<Relay> {
        let relay = Relay::start(&self.node(server).addr).await?;
        let node = self.node_mut(server);
        node.addr = relay.addr.clone();
        node.version += 1;
        self.reassign().await?;
        Ok(relay)
    }

    /// Restarts `server` where it was and waits until it is in sync and
    /// every replica holds the primary's content, with no pin left.
    pub async fn bring_back(&mut self, server: &str, limit: Duration) -> Result<Converged> {
        self.restart_replica(server, false).await?;
        self.wait_state(server, ReplicaState::InSync, limit).await?;
        self.wait_converged(limit).await
    }

    /// The primary is gone: the stopped replica `server` becomes the primary
    /// of the next epoch, with the remaining replicas.
    pub async fn promote(&mut self, server: &str, mode: CommitMode) -> Result<()> {
        let dir = self.node(server).dir.clone();
        self.replicas.retain(|n| n.server != server);
        self.epoch += 1;
        self.mode = mode;
        let config = primary_config(
            &self.options,
            server,
            &dir,
            self.epoch,
            mode,
            &self.replicas,
        );
        self.primary = self.rt.spawn_volume(config).await?;
        self.primary_dir = dir;
        self.primary_server = server.into();
        Ok(())
    }

    /// Opens the primary again on its own directory in `epoch` (the old one
    /// must have been stopped), peering as the options say; the volume's
    /// own refusal when it must.
    pub async fn reopen_primary(&mut self, epoch: u64) -> Result<(), VolumeError> {
        self.reopen_primary_with(epoch, self.options.peering.clone())
            .await
    }

    /// [`reopen_primary`](Self::reopen_primary) with `peering` (a node's
    /// primaries peer before they serve; the harness's do not unless told).
    pub async fn reopen_primary_with(
        &mut self,
        epoch: u64,
        peering: crate::config::Peering,
    ) -> Result<(), VolumeError> {
        let mut config = primary_config(
            &self.options,
            &self.primary_server,
            &self.primary_dir,
            epoch,
            self.mode,
            &self.replicas,
        );
        if let VolumeConfig::Primary(primary) = &mut config {
            primary.peering = peering;
        }
        self.primary = self.rt.spawn_volume(config).await?;
        self.epoch = epoch;
        Ok(())
    }

    /// Writes `count` blocks one after the other, block `i` (from `from`)
    /// at `i` modulo the volume's size; returns the last LSN.
    pub async fn write_blocks(&self, from: u64, count: u64) -> Result<u64> {
        let mut lsn = 0;
        for i in from..from + count {
            lsn = self
                .primary
                .write(i % self.options.store.block_count, block(i))
                .await?;
        }
        Ok(lsn)
    }

    /// [`write_blocks`](Self::write_blocks) with `depth` writes in flight;
    /// `progress` hears how many blocks each finished batch wrote.
    pub async fn write_blocks_in_flight(
        &self,
        from: u64,
        count: u64,
        depth: u64,
        mut progress: impl FnMut(u64),
    ) -> Result<u64> {
        let (mut next, end, mut last) = (from, from + count, 0);
        let blocks = self.options.store.block_count;
        while next < end {
            let batch = (end - next).min(depth.max(1));
            let writes = (next..next + batch).map(|i| self.primary.write(i % blocks, block(i)));
            let lsns = futures::future::try_join_all(writes).await?;
            last = lsns.into_iter().max().unwrap_or(last);
            next += batch;
            progress(batch);
        }
        Ok(last)
    }

    /// Stops every volume, then the runtime; returns once all have let go
    /// of their ports and directories. The data stays when the options
    /// named a directory.
    pub async fn shutdown(mut self) {
        self.primary.stop().await;
        for node in &mut self.replicas {
            if let Some(handle) = node.handle.take() {
                handle.stop().await;
            }
        }
        let Self { rt, temp, .. } = self;
        // The runtime's shutdown joins its thread: not on an async worker.
        if let Err(error) = tokio::task::spawn_blocking(move || rt.shutdown()).await {
            if error.is_panic() {
                std::panic::resume_unwind(error.into_panic());
            }
        }
        drop(temp);
    }
}

fn listen_addr(handle: &VolumeHandle) -> Result<String> {
    match handle.listen_addr() {
        Some(addr) => Ok(addr.to_string()),
        None => Err(HarnessError::Role("a replica".into())),
    }
}

fn replica_config(
    options: &ClusterOptions,
    server: &str,
    dir: &Path,
    listen: &str,
) -> VolumeConfig {
    VolumeConfig::Replica({
        let mut made = ReplicaConfig::new(
            (options.cluster.clone(), options.volume.clone(), server),
            dir.to_path_buf(),
            options.store_of(server),
            listen,
        );
        made.checkpoint_every_lsns = options.replica_checkpoint_every;
        made
    })
}

fn primary_config(
    options: &ClusterOptions,
    server: &str,
    dir: &Path,
    epoch: u64,
    mode: CommitMode,
    replicas: &[Node],
) -> VolumeConfig {
    VolumeConfig::Primary({
        let mut made = PrimaryConfig::new(
            (options.cluster.clone(), options.volume.clone()),
            dir.to_path_buf(),
            options.store_of(server),
            epoch,
            mode,
            replicas
                .iter()
                .map(|n| ReplicaSpec::new(n.server.clone(), n.addr.clone(), n.version))
                .collect(),
        );
        made.tuning = options.tuning.clone();
        made.peering = options.peering.clone();
        made
    })
}
