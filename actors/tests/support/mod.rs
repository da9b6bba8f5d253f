//! A cluster on loopback for system tests: one primary, replicas that can be
//! stopped and restarted on the same or a new port, real files, real fsync.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use bytes::Bytes;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};
use walship_actors::*;
use walship_engine::{
    Assignment, CommitMode, Endpoint, Epoch, ReplicaAssignment, ReplicaId, ReplicaState,
};
use walship_io::{StoreOptions, BLOCK_SIZE};

pub const VOLUME: &str = "vol1";
pub const BLOCKS: u64 = 2048;

pub fn tuning() -> Tuning {
    Tuning {
        tick: Duration::from_millis(5),
        barrier_timeout_ticks: 300,
        pin_reservation_ticks: 400,
        heartbeat_every_ticks: 4,
        connect_timeout: Duration::from_millis(500),
        peer_timeout: Duration::from_secs(2),
        checkpoint_every_lsns: 64,
        network_retry: BackoffTuning {
            first: Duration::from_millis(20),
            max: Duration::from_millis(200),
        },
        storage_retry: BackoffTuning {
            first: Duration::from_millis(200),
            max: Duration::from_secs(2),
        },
        rebuild_retry: BackoffTuning {
            first: Duration::from_millis(50),
            max: Duration::from_millis(500),
        },
        ..Tuning::default()
    }
}

/// A tuning whose away replicas lose their retention hold at once: the
/// checkpointer then recycles past them, as tests of rebuilds need.
pub fn tuning_without_holds() -> Tuning {
    Tuning {
        retention_max_bytes: Some(0),
        ..tuning()
    }
}

/// No waiting for a previous instance's lock: a volume's stop returns with
/// its store released, and a reopen right after it proves that it did.
pub fn store_options() -> StoreOptions {
    StoreOptions {
        segment_bytes: 64 * 1024,
        lock_wait: Duration::ZERO,
        ..StoreOptions::new(BLOCKS)
    }
}

/// Asks `check` every 10 ms until it answers `Some`, for at most `limit`;
/// `None` when it never did (the caller fails with what it knows).
pub async fn within<T, Fut>(limit: Duration, mut check: impl FnMut() -> Fut) -> Option<T>
where
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = Instant::now() + limit;
    loop {
        if let Some(value) = check().await {
            return Some(value);
        }
        if Instant::now() > deadline {
            return None;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Fails with the whole log unless some event satisfies `matches`.
pub fn assert_logged(events: &[String], matches: impl Fn(&String) -> bool) {
    assert!(events.iter().any(matches), "{events:#?}");
}

pub fn block(seed: u64) -> Bytes {
    Bytes::from(vec![(seed % 251) as u8 + 1; BLOCK_SIZE])
}

#[derive(Debug)]
pub struct Node {
    pub server: String,
    pub dir: PathBuf,
    pub handle: Option<VolumeHandle>,
    pub addr: String,
    pub version: u64,
}

#[derive(Debug)]
pub struct Cluster {
    pub rt: Runtime,
    pub tmp: tempfile::TempDir,
    pub primary: VolumeHandle,
    pub primary_dir: PathBuf,
    pub replicas: Vec<Node>,
    pub epoch: u64,
    pub mode: CommitMode,
    pub tuning: Tuning,
    /// Replicas checkpoint every this many committed LSNs.
    pub replica_checkpoint_every: u64,
}

/// Replicas checkpoint this often unless a test says otherwise.
pub const REPLICA_CHECKPOINT_EVERY: u64 = 64;

pub fn replica_config(server: &str, dir: &Path, listen: &str) -> VolumeConfig {
    replica_config_with(server, dir, listen, REPLICA_CHECKPOINT_EVERY)
}

pub fn replica_config_with(
    server: &str,
    dir: &Path,
    listen: &str,
    checkpoint_every_lsns: u64,
) -> VolumeConfig {
    VolumeConfig::Replica(ReplicaConfig {
        cluster: "test".into(),
        volume: VOLUME.into(),
        server: server.into(),
        dir: dir.to_path_buf(),
        store: store_options(),
        listen: listen.into(),
        checkpoint_every_lsns,
    })
}

impl Cluster {
    pub async fn start(mode: CommitMode, servers: &[&str]) -> Self {
        Self::start_with(mode, servers, tuning()).await
    }

    pub async fn start_with(mode: CommitMode, servers: &[&str], tuning: Tuning) -> Self {
        Self::start_checkpointing(mode, servers, tuning, REPLICA_CHECKPOINT_EVERY).await
    }

    /// A cluster whose replicas checkpoint every `replica_checkpoint_every` committed LSNs.
    pub async fn start_checkpointing(
        mode: CommitMode,
        servers: &[&str],
        tuning: Tuning,
        replica_checkpoint_every: u64,
    ) -> Self {
        Self::start_in(mode, servers, tuning, replica_checkpoint_every, &[]).await
    }

    /// [`start_checkpointing`](Self::start_checkpointing) with some replicas'
    /// data in directories of the test's choosing (`(server, dir)`).
    pub async fn start_in(
        mode: CommitMode,
        servers: &[&str],
        tuning: Tuning,
        replica_checkpoint_every: u64,
        dirs: &[(&str, PathBuf)],
    ) -> Self {
        let rt = Runtime::start().unwrap();
        let tmp = tempfile::tempdir().unwrap();
        let mut replicas = Vec::new();
        for server in servers {
            let dir = dirs
                .iter()
                .find(|(s, _)| s == server)
                .map_or_else(|| tmp.path().join(server), |(_, d)| d.clone());
            let config = replica_config_with(server, &dir, "127.0.0.1:0", replica_checkpoint_every);
            let handle = rt.spawn_volume(config).await.unwrap();
            let addr = handle.listen_addr().unwrap().to_string();
            replicas.push(Node {
                server: server.to_string(),
                dir,
                handle: Some(handle),
                addr,
                version: 1,
            });
        }
        let mut cluster = Self::with_primary(rt, tmp, replicas, mode, tuning).await;
        cluster.replica_checkpoint_every = replica_checkpoint_every;
        cluster
    }

    /// Spawns the primary for `replicas` (already listening, or impostors) and
    /// assembles the cluster.
    pub async fn with_primary(
        rt: Runtime,
        tmp: tempfile::TempDir,
        replicas: Vec<Node>,
        mode: CommitMode,
        tuning: Tuning,
    ) -> Self {
        let primary_dir = tmp.path().join("primary");
        let config = Self::primary_config(&primary_dir, 1, mode, &replicas, tuning.clone());
        let primary = rt.spawn_volume(config).await.unwrap();
        Self {
            rt,
            tmp,
            primary,
            primary_dir,
            replicas,
            epoch: 1,
            mode,
            tuning,
            replica_checkpoint_every: REPLICA_CHECKPOINT_EVERY,
        }
    }

    pub fn primary_config(
        dir: &Path,
        epoch: u64,
        mode: CommitMode,
        replicas: &[Node],
        tuning: Tuning,
    ) -> VolumeConfig {
        VolumeConfig::Primary(PrimaryConfig {
            cluster: "test".into(),
            volume: VOLUME.into(),
            dir: dir.to_path_buf(),
            store: store_options(),
            epoch,
            commit_mode: mode,
            replicas: replicas
                .iter()
                .map(|n| ReplicaSpec {
                    server: n.server.clone(),
                    addr: n.addr.clone(),
                    version: n.version,
                })
                .collect(),
            tuning,
        })
    }

    pub fn assignment(&self) -> Assignment {
        Assignment {
            epoch: Epoch(self.epoch),
            commit_mode: self.mode,
            replicas: self
                .replicas
                .iter()
                .map(|n| ReplicaAssignment {
                    id: ReplicaId::new(VOLUME, &n.server).unwrap(),
                    endpoint: Endpoint::new(n.addr.clone(), n.version),
                })
                .collect(),
        }
    }

    /// Sends the primary the cluster's current assignment (after a change
    /// to its epoch or to a replica's endpoint).
    pub async fn reassign(&self) {
        self.primary
            .apply_assignment(self.assignment())
            .await
            .unwrap();
    }

    pub fn node(&mut self, server: &str) -> &mut Node {
        self.replicas
            .iter_mut()
            .find(|n| n.server == server)
            .unwrap()
    }

    pub fn replica(&self, server: &str) -> &VolumeHandle {
        self.replicas
            .iter()
            .find(|n| n.server == server)
            .unwrap()
            .handle
            .as_ref()
            .unwrap()
    }

    pub async fn stop_replica(&mut self, server: &str) {
        let node = self.node(server);
        if let Some(handle) = node.handle.take() {
            handle.stop().await;
        }
    }

    /// Restarts on the same address (or a new one with `new_port`).
    pub async fn restart_replica(&mut self, server: &str, new_port: bool) {
        let (dir, addr) = {
            let node = self.node(server);
            (
                node.dir.clone(),
                if new_port {
                    "127.0.0.1:0".to_owned()
                } else {
                    node.addr.clone()
                },
            )
        };
        // The stop returned with the listener closed and the store released.
        let config = replica_config_with(server, &dir, &addr, self.replica_checkpoint_every);
        let handle = self
            .rt
            .spawn_volume(config)
            .await
            .expect("replica restarted");
        let node = self.node(server);
        if new_port {
            node.addr = handle.listen_addr().unwrap().to_string();
            node.version += 1;
        }
        node.handle = Some(handle);
    }

    /// Restarts `server` where it was and waits until it is in sync and
    /// every replica holds the primary's content, with no pin left.
    pub async fn bring_back(&mut self, server: &str, limit: Duration) {
        self.restart_replica(server, false).await;
        self.wait_state(server, ReplicaState::InSync, limit).await;
        self.wait_converged(limit).await;
    }

    /// The primary is gone: the stopped replica `server` becomes the primary
    /// of the next epoch, with the remaining replicas.
    pub async fn promote(&mut self, server: &str, mode: CommitMode) {
        let dir = self.node(server).dir.clone();
        self.replicas.retain(|n| n.server != server);
        self.epoch += 1;
        self.mode = mode;
        let config =
            Self::primary_config(&dir, self.epoch, mode, &self.replicas, self.tuning.clone());
        self.primary = self.rt.spawn_volume(config).await.unwrap();
    }

    /// Opens the primary again, on its own directory, in `epoch` (the old
    /// one must have been stopped).
    pub async fn reopen_primary(&mut self, epoch: u64) -> Result<(), VolumeError> {
        let config = Self::primary_config(
            &self.primary_dir,
            epoch,
            self.mode,
            &self.replicas,
            self.tuning.clone(),
        );
        self.primary = self.rt.spawn_volume(config).await?;
        self.epoch = epoch;
        Ok(())
    }

    pub async fn write_blocks(&self, from: u64, count: u64) -> u64 {
        let mut lsn = 0;
        for i in from..from + count {
            lsn = self.primary.write(i % BLOCKS, block(i)).await.unwrap();
        }
        lsn
    }

    pub async fn status(&self) -> VolumeStatus {
        match self.primary.status().await.unwrap() {
            NodeStatus::Primary(status) => *status,
            NodeStatus::Replica(_) => panic!("primary reported as replica"),
        }
    }

    pub async fn state(&self, server: &str) -> Option<ReplicaState> {
        self.primary.replica_state(server).await.unwrap()
    }

    pub async fn wait_state(&self, server: &str, want: ReplicaState, limit: Duration) {
        let reached = within(limit, || async {
            (self.state(server).await == Some(want)).then_some(())
        });
        if reached.await.is_none() {
            let state = self.state(server).await;
            let log = self.events().await.join("\n");
            panic!("{server} is {state:?}, wanted {want:?}\nrecovery log:\n{log}");
        }
    }

    /// Waits until every running replica is in sync.
    pub async fn wait_all_in_sync(&self, limit: Duration) {
        for node in &self.replicas {
            if node.handle.is_some() {
                self.wait_state(&node.server, ReplicaState::InSync, limit)
                    .await;
            }
        }
    }

    /// Waits until every replica holds the primary's content and no pin is left.
    pub async fn wait_converged(&self, limit: Duration) {
        let converged = within(limit, || async {
            let primary = self.primary.content_checksum().await.unwrap();
            let status = self.status().await;
            let mut same = status.recovery_pins == 0
                && status.snapshot_pins == 0
                && status.held_resources == 0;
            for node in &self.replicas {
                if let Some(handle) = &node.handle {
                    same &= handle.content_checksum().await.unwrap() == primary;
                }
            }
            same.then_some(())
        });
        if converged.await.is_none() {
            let status = self.status().await;
            let log = self.events().await.join("\n");
            panic!(
                "not converged: pins={} snaps={} held={}\n{log}",
                status.recovery_pins, status.snapshot_pins, status.held_resources
            );
        }
    }

    /// The replica on `server`'s status, as JSON.
    pub async fn replica_json(&self, server: &str) -> serde_json::Value {
        serde_json::to_value(self.replica(server).status().await.unwrap()).unwrap()
    }

    /// Waits until the replica on `server` has made `more` LSNs durable past
    /// what it had when called.
    pub async fn wait_durable_past(&self, server: &str, more: u64, limit: Duration) {
        let durable = async || self.replica_json(server).await["durable"].as_u64().unwrap();
        let target = durable().await + more;
        let reached = within(limit, || async {
            (durable().await >= target).then_some(())
        });
        assert!(reached.await.is_some(), "{server} stalled below {target}");
    }

    /// Waits until the replica on `server` has `lsn` durable.
    pub async fn wait_durable(&self, server: &str, lsn: u64, limit: Duration) {
        let reached = within(limit, || async {
            (self.replica_json(server).await["durable"].as_u64() == Some(lsn)).then_some(())
        });
        if reached.await.is_none() {
            let status = self.replica_json(server).await;
            panic!("{server} never made {lsn} durable: {status}");
        }
    }

    pub async fn events(&self) -> Vec<String> {
        self.primary
            .recovery_log()
            .await
            .unwrap()
            .iter()
            .map(|e| {
                let replica = e.replica.as_ref().map_or("-".to_owned(), |r| r.to_string());
                format!("{} {} {}", replica, e.event, e.detail)
            })
            .collect()
    }

    /// Waits until the primary logged `event` for `server`.
    pub async fn wait_event(&self, server: &str, event: &str, limit: Duration) {
        let logged = within(limit, || async {
            self.has_event(server, event).await.then_some(())
        });
        if logged.await.is_none() {
            let log = self.events().await.join("\n");
            panic!("no {event} for {server} after {limit:?}\nrecovery log:\n{log}");
        }
    }

    /// The primary's view of `server`: its sender status.
    pub async fn sender_status(&self, server: &str) -> walship_engine::SenderStatus {
        self.status()
            .await
            .registry
            .senders
            .into_iter()
            .find(|s| s.replica.server() == server)
            .unwrap()
    }

    /// Sessions the primary started for `server` so far (repeats included).
    pub async fn sessions_created(&self, server: &str) -> u64 {
        self.primary
            .recovery_log()
            .await
            .unwrap()
            .iter()
            .filter(|e| e.event == "session_created")
            .filter(|e| e.replica.as_ref().is_some_and(|r| r.server() == server))
            .map(|e| 1 + e.repeats)
            .sum()
    }

    pub async fn has_event(&self, server: &str, event: &str) -> bool {
        let prefix = format!("{VOLUME}/{server} {event}");
        self.events().await.iter().any(|e| e.starts_with(&prefix))
    }
}

/// A TCP relay in front of a replica whose replies to the primary can be
/// held back (and later let through, in order), to delay acks on the wire.
#[derive(Debug)]
pub struct Relay {
    pub addr: String,
    hold: tokio::sync::watch::Sender<bool>,
}

impl Relay {
    pub async fn start(target: &str) -> Self {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let (hold, hold_rx) = tokio::sync::watch::channel(false);
        let target = target.to_owned();
        tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let Ok(server) = tokio::net::TcpStream::connect(&target).await else {
                    continue;
                };
                let mut held = hold_rx.clone();
                tokio::spawn(async move {
                    let (mut from_primary, mut to_primary) = client.into_split();
                    let (mut from_replica, mut to_replica) = server.into_split();
                    let requests = tokio::io::copy(&mut from_primary, &mut to_replica);
                    let replies = async {
                        let mut buf = vec![0u8; 64 * 1024];
                        loop {
                            let n = from_replica.read(&mut buf).await?;
                            if n == 0 {
                                return Ok::<(), std::io::Error>(());
                            }
                            while *held.borrow_and_update() {
                                if held.changed().await.is_err() {
                                    return Ok(());
                                }
                            }
                            to_primary.write_all(&buf[..n]).await?;
                        }
                    };
                    tokio::select! {
                        _ = requests => {}
                        _ = replies => {}
                    }
                });
            }
        });
        Self { addr, hold }
    }

    /// Holds the replica's replies back (true) or lets them through (false).
    pub fn hold_replies(&self, hold: bool) {
        self.hold.send_replace(hold);
    }
}
