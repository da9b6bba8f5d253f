//! A real etcd (Debian's `etcd-server`) for the tests: one member on
//! 127.0.0.1, free ports, a temp data dir, killed by its pid when dropped.

#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use crate::nodes::{free_port, NodeCluster};
use std::process::Stdio;
use std::time::Duration;
use tokio::process::{Child, Command};
use walship::actors::testing::within;
use walship::engine::ReplicaState;
use walship::node::etcd::etcd_client::Client;
use walship::node::etcd::{progress_key, ProgressRecord};

/// etcd with `args`, logging to `dir`/etcd.log.
fn spawn(args: &[String], dir: &std::path::Path) -> Child {
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(dir.join("etcd.log"))
        .expect("etcd log");
    Command::new("etcd")
        .args(args)
        .stdin(Stdio::null())
        .stdout(log.try_clone().expect("etcd log"))
        .stderr(log)
        .kill_on_drop(true)
        .spawn()
        .expect("etcd (Debian's etcd-server) is installed")
}

/// A temp dir for a member's data, on tmpfs where the machine has one:
/// each member preallocates a 64 MiB WAL segment, the tests start several
/// at once, and a CI machine's disk is shared (a run there failed with
/// ENOSPC inside etcd). The tests kill etcd, never the machine, so tmpfs
/// loses nothing they rely on.
fn data_dir() -> tempfile::TempDir {
    let shm = std::path::Path::new("/dev/shm");
    if shm.is_dir() {
        if let Ok(dir) = tempfile::Builder::new()
            .prefix("walship-etcd")
            .tempdir_in(shm)
        {
            return dir;
        }
    }
    tempfile::tempdir().expect("temp dir")
}

/// The value at `key` and its lease, if it is there.
pub async fn get(client: &mut Client, key: &str) -> Option<(Vec<u8>, i64)> {
    let response = client.get(key, None).await.expect("etcd get");
    let kv = response.kvs().first()?;
    Some((kv.value().to_vec(), kv.lease()))
}

/// A running etcd.
pub struct Etcd {
    child: Child,
    /// Its client URL.
    pub endpoint: String,
    /// Its command line after `etcd`.
    args: Vec<String>,
    dir: tempfile::TempDir,
}

impl Etcd {
    /// Its process id (for what it costs: `/proc/<pid>`).
    pub fn pid(&self) -> Option<u32> {
        self.child.id()
    }

    /// Starts etcd and returns once it answers a read.
    pub async fn start() -> Self {
        Self::start_with(&[]).await
    }

    /// [`start`](Self::start) with a 50 ms heartbeat and a 500 ms election
    /// timeout: etcd's shortest lease is 1.5 election timeouts rounded up
    /// to a second, so 1 s here (2 s with the defaults).
    pub async fn start_fast() -> Self {
        Self::start_with(&["--heartbeat-interval", "50", "--election-timeout", "500"]).await
    }

    /// [`start`](Self::start) with `extra` arguments.
    pub async fn start_with(extra: &[&str]) -> Self {
        let dir = data_dir();
        let (client, peer) = (free_port(), free_port());
        let endpoint = format!("http://127.0.0.1:{client}");
        let peer_url = format!("http://127.0.0.1:{peer}");
        let data = dir.path().join("data").display().to_string();
        let mut args: Vec<String> = [
            "--name",
            "walship-test",
            "--data-dir",
            &data,
            "--listen-client-urls",
            &endpoint,
            "--advertise-client-urls",
            &endpoint,
            "--listen-peer-urls",
            &peer_url,
            "--initial-advertise-peer-urls",
            &peer_url,
            "--initial-cluster",
            &format!("walship-test={peer_url}"),
        ]
        .iter()
        .map(|a| a.to_string())
        .collect();
        args.extend(extra.iter().map(|a| a.to_string()));
        let child = spawn(&args, dir.path());
        let etcd = Self {
            child,
            endpoint,
            args,
            dir,
        };
        etcd.wait_answering().await;
        etcd
    }

    /// Kills etcd (SIGKILL) and starts it again on the same ports and data;
    /// returns once it answers.
    pub async fn restart(&mut self) {
        self.kill().await;
        self.start_again().await;
    }

    /// Kills etcd (SIGKILL).
    pub async fn kill(&mut self) {
        self.child.kill().await.expect("kill etcd");
    }

    /// Starts etcd again after a [`kill`](Self::kill), on the same ports
    /// and data; returns once it answers.
    pub async fn start_again(&mut self) {
        self.child = spawn(&self.args, self.dir.path());
        self.wait_answering().await;
    }

    async fn wait_answering(&self) {
        let up = within(Duration::from_secs(20), || async {
            let mut client = Client::connect([&self.endpoint], None).await.ok()?;
            client.get("/", None).await.ok().map(|_| ())
        })
        .await;
        assert!(up.is_some(), "etcd did not answer:\n{}", self.log());
    }

    /// A client of it.
    pub async fn client(&self) -> Client {
        Client::connect([&self.endpoint], None)
            .await
            .expect("connect to etcd")
    }

    /// The value at `key`, if there is one.
    pub async fn value(&self, key: &str) -> Option<Vec<u8>> {
        Some(get(&mut self.client().await, key).await?.0)
    }

    /// Waits until node `primary` of `cluster` has reported both replicas
    /// of vol0 in sync and everything it holds committed: what a
    /// controller judges by if it dies next (a primary killed within a
    /// report's time of a change leaves an older report, by which its
    /// replicas may not be eligible).
    pub async fn wait_reported_in_sync(&self, cluster: &NodeCluster, primary: usize) {
        let head = cluster.status(primary).await["volumes"][0]["status"]["head"]
            .as_u64()
            .expect("the primary's head");
        let reported = within(Duration::from_secs(10), || async {
            let value = self.value(&progress_key("test", "vol0")).await?;
            let progress: ProgressRecord = serde_json::from_slice(&value).ok()?;
            let synced = progress.committed >= head
                && progress.replicas.len() == 2
                && progress
                    .replicas
                    .values()
                    .all(|r| r.state == ReplicaState::InSync);
            synced.then_some(())
        })
        .await;
        assert!(reported.is_some(), "{}", cluster.log(primary));
    }

    /// Its log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("etcd.log")).unwrap_or_default()
    }
}

impl Drop for Etcd {
    fn drop(&mut self) {
        let _ = self.child.start_kill();
    }
}
