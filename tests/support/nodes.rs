//! Node processes for the system tests: `walship serve` started from
//! generated configs on free loopback ports, observed through the admin
//! endpoint, stopped with SIGTERM or killed with SIGKILL; real NBD clients
//! (qemu-io, qemu-img, fio, nbdcopy) run as processes with a time limit.
//! Every wait has a deadline; only the pids started here are signalled;
//! the data lives in a temporary directory removed with the cluster.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use serde_json::Value;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Output, Stdio};
use std::time::{Duration, Instant};
use tokio::process::{Child, Command};
use walship::actors::testing::within;
use walship::node::admin;

/// The walship binary cargo built for these tests.
pub const WALSHIP: &str = env!("CARGO_BIN_EXE_walship");

/// A port nobody listens on right now, below the kernel's ephemeral range
/// (32768 and up here): a node restarted on its port must not find it
/// taken by some connection's local end, which ports the kernel hands out
/// (`bind(0)`) can be. Each is handed out once per test process.
pub fn free_port() -> u16 {
    use std::sync::atomic::{AtomicU32, Ordering};
    const FIRST: u32 = 20_000;
    const SPAN: u32 = 12_000;
    static NEXT: AtomicU32 = AtomicU32::new(0);
    // Test binaries run one after the other; the pid spreads the start.
    let start = std::process::id() % SPAN;
    for _ in 0..SPAN {
        let port = (FIRST + (start + NEXT.fetch_add(1, Ordering::Relaxed)) % SPAN) as u16;
        if TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
    panic!("no free port in {FIRST}..{}", FIRST + SPAN);
}

/// One node of the cluster.
#[derive(Debug)]
pub struct NodeProc {
    pub name: String,
    pub config: PathBuf,
    pub data_dir: PathBuf,
    pub log: PathBuf,
    pub replication: u16,
    pub admin: u16,
    pub nbd: u16,
    /// Arguments its `walship serve` gets after its config and data dir
    /// (`--etcd URL`).
    pub args: Vec<String>,
    /// Environment variables its `walship serve` gets.
    pub env: Vec<(String, String)>,
    pub child: Option<Child>,
}

impl NodeProc {
    pub fn admin_addr(&self) -> String {
        format!("127.0.0.1:{}", self.admin)
    }

    /// The NBD URI of `export` on this node.
    pub fn uri(&self, export: &str) -> String {
        format!("nbd://127.0.0.1:{}/{export}", self.nbd)
    }
}

/// How the cluster's volume is configured.
#[derive(Debug, Clone)]
pub struct VolumeOptions {
    pub name: String,
    pub size_mib: u64,
    pub commit_mode: String,
    pub export_replicas: bool,
    /// Extra lines for each config's `[tuning]` table.
    pub tuning: String,
    /// More volumes on the same nodes, the same way: (name, size in MiB).
    pub extra_volumes: Vec<(String, u64)>,
}

impl Default for VolumeOptions {
    fn default() -> Self {
        Self {
            name: "vol0".into(),
            size_mib: 64,
            commit_mode: "sync_all".into(),
            export_replicas: true,
            tuning: "barrier_timeout_ms = 3000\nnetwork_retry_max_ms = 300\npeer_timeout_ms = 2000\nsegment_bytes = 1048576\n".into(),
            extra_volumes: Vec::new(),
        }
    }
}

/// Three nodes (node1 primary, node2 and node3 replicas) as processes, or
/// fewer.
#[derive(Debug)]
pub struct NodeCluster {
    pub nodes: Vec<NodeProc>,
    pub volume: VolumeOptions,
    dir: tempfile::TempDir,
}

impl NodeCluster {
    /// Writes the three configs and starts the three nodes; returns once
    /// every admin endpoint answers.
    pub async fn start(volume: VolumeOptions) -> Self {
        Self::start_nodes(volume, 3).await
    }

    /// [`start`](Self::start) with `count` nodes (1 to 3): node1 is the
    /// primary, the others its replicas.
    pub async fn start_nodes(volume: VolumeOptions, count: usize) -> Self {
        Self::start_with(volume, count, |_| Vec::new()).await
    }

    /// [`start_nodes`](Self::start_nodes), each `walship serve` with the
    /// arguments `args` gives for its name too.
    pub async fn start_with(
        volume: VolumeOptions,
        count: usize,
        args: impl Fn(&str) -> Vec<String>,
    ) -> Self {
        Self::start_with_env(volume, count, args, &[]).await
    }

    /// [`start_with`](Self::start_with), each node with `env` in its
    /// environment too.
    pub async fn start_with_env(
        volume: VolumeOptions,
        count: usize,
        args: impl Fn(&str) -> Vec<String>,
        env: &[(&str, &str)],
    ) -> Self {
        let dir = tempfile::tempdir().expect("temp dir");
        let names = &["node1", "node2", "node3"][..count];
        let ports: Vec<(u16, u16, u16)> = (0..names.len())
            .map(|_| (free_port(), free_port(), free_port()))
            .collect();
        let replicas = names[1..]
            .iter()
            .zip(&ports[1..])
            .map(|(name, (replication, _, _))| format!("{name} = \"127.0.0.1:{replication}\""))
            .collect::<Vec<_>>()
            .join(", ");
        let mut nodes = Vec::new();
        for (name, (replication, admin, nbd)) in names.iter().zip(&ports) {
            let config = dir.path().join(format!("{name}.toml"));
            let text = format!(
                "node = \"{name}\"\ncluster = \"test\"\nreplication = \"127.0.0.1:{replication}\"\n\
                 admin = \"127.0.0.1:{admin}\"\nnbd = \"127.0.0.1:{nbd}\"\n\n[tuning]\n{tuning}\n\
                 [[volume]]\nname = \"{volume}\"\nsize = \"{size}MiB\"\nblock_size = 4096\n\
                 commit_mode = \"{mode}\"\nprimary = \"node1\"\nreplicas = {{ {replicas} }}\n\
                 export_replicas = {export}\n",
                tuning = volume.tuning,
                volume = volume.name,
                size = volume.size_mib,
                mode = volume.commit_mode,
                export = volume.export_replicas,
            );
            let mut text = text;
            for (extra, size) in &volume.extra_volumes {
                text.push_str(&format!(
                    "\n[[volume]]\nname = \"{extra}\"\nsize = \"{size}MiB\"\nblock_size = 4096\n\
                     commit_mode = \"{mode}\"\nprimary = \"node1\"\nreplicas = {{ {replicas} }}\n\
                     export_replicas = {export}\n",
                    mode = volume.commit_mode,
                    export = volume.export_replicas,
                ));
            }
            std::fs::write(&config, text).expect("write config");
            nodes.push(NodeProc {
                name: (*name).into(),
                config,
                data_dir: dir.path().join(name),
                log: dir.path().join(format!("{name}.log")),
                replication: *replication,
                admin: *admin,
                nbd: *nbd,
                args: args(name),
                env: env
                    .iter()
                    .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                    .collect(),
                child: None,
            });
        }
        let mut cluster = Self { nodes, volume, dir };
        for i in 0..count {
            cluster.spawn(i);
        }
        for i in 0..count {
            cluster.wait_up(i, Duration::from_secs(20)).await;
        }
        cluster
    }

    /// Starts node `i` from its config (again, after a stop or a kill).
    pub fn spawn(&mut self, i: usize) {
        let node = &mut self.nodes[i];
        assert!(node.child.is_none(), "{} is running", node.name);
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&node.log)
            .expect("log file");
        let child = Command::new(WALSHIP)
            .arg("serve")
            .arg("--config")
            .arg(&node.config)
            .arg("--data-dir")
            .arg(&node.data_dir)
            .args(&node.args)
            .envs(node.env.iter().map(|(k, v)| (k, v)))
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log file"))
            .stderr(log)
            .kill_on_drop(true)
            .spawn()
            .expect("spawn walship serve");
        node.child = Some(child);
    }

    /// Waits until node `i`'s admin endpoint answers and none of its
    /// primaries is still peering with its replicas; panics with its log if
    /// it exits or is not up in time.
    pub async fn wait_up(&mut self, i: usize, limit: Duration) {
        let deadline = Instant::now() + limit;
        loop {
            let answered = admin::request(&self.nodes[i].admin_addr(), "/status", None).await;
            if let Ok((status, body)) = answered {
                let peering = serde_json::from_str::<Value>(&body).is_ok_and(|report| {
                    report["volumes"].as_array().is_some_and(|volumes| {
                        volumes.iter().any(|v| v["status"]["state"] == "peering")
                    })
                });
                if status.is_success() && !peering {
                    return;
                }
            }
            let exited = self.nodes[i]
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten());
            if let Some(status) = exited {
                panic!(
                    "{} exited with {status}:\n{}",
                    self.nodes[i].name,
                    self.log(i)
                );
            }
            assert!(
                Instant::now() < deadline,
                "{} did not answer within {limit:?}:\n{}",
                self.nodes[i].name,
                self.log(i)
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Node `i`'s log so far.
    pub fn log(&self, i: usize) -> String {
        std::fs::read_to_string(&self.nodes[i].log).unwrap_or_default()
    }

    /// Node `i`'s `/status`.
    pub async fn status(&self, i: usize) -> Value {
        let (status, body) = admin::request(&self.nodes[i].admin_addr(), "/status", None)
            .await
            .expect("GET /status");
        assert!(status.is_success(), "{status}: {body}");
        serde_json::from_str(&body).expect("status JSON")
    }

    /// The primary's (node1's) volume status.
    pub async fn primary_volume(&self) -> Value {
        self.status(0).await["volumes"][0].clone()
    }

    /// Waits until the primary has both replicas in sync with everything
    /// it holds committed and durable on them; returns the head.
    pub async fn wait_converged(&self, limit: Duration) -> u64 {
        self.wait_converged_on(0, limit).await
    }

    /// [`wait_converged`](Self::wait_converged) with node `primary` as the
    /// primary (after a failover).
    pub async fn wait_converged_on(&self, primary: usize, limit: Duration) -> u64 {
        let converged = within(limit, || async {
            let status = self.status(primary).await["volumes"][0]["status"].clone();
            let head = status["head"].as_u64()?;
            let senders = status["registry"]["senders"].as_array()?.clone();
            let synced = senders.len() == 2
                && senders
                    .iter()
                    .all(|s| s["state"] == "in_sync" && s["flushed"].as_u64() == Some(head))
                && status["registry"]["history"]["committed"].as_u64() == Some(head);
            synced.then_some(head)
        })
        .await;
        match converged {
            Some(head) => head,
            None => {
                let volume = self.status(primary).await["volumes"][0].clone();
                panic!(
                    "not converged within {limit:?}: {:#}\n--- primary log:\n{}",
                    volume["status"]["registry"]["senders"],
                    self.log(primary)
                )
            }
        }
    }

    /// Waits until the replica on `node` is in `state` as the primary sees it.
    pub async fn wait_replica_state(&self, node: &str, state: &str, limit: Duration) {
        let replica = format!("{}/{node}", self.volume.name);
        let state_now = |volume: &Value| {
            let senders = volume["status"]["registry"]["senders"].as_array()?.clone();
            let sender = senders
                .into_iter()
                .find(|s| s["replica"] == replica.as_str())?;
            Some(sender["state"].clone())
        };
        let reached = within(limit, || async {
            (state_now(&self.primary_volume().await)? == state).then_some(())
        })
        .await;
        if reached.is_none() {
            let volume = self.primary_volume().await;
            panic!(
                "{replica} is {:?}, not {state}, after {limit:?}; recovery log:\n{:#}",
                state_now(&volume),
                volume["recent_recovery"]
            );
        }
    }

    /// Sends `signal` (`TERM`, `STOP`, `CONT`) to node `i`, which must be
    /// running.
    pub async fn signal(&self, i: usize, signal: &str) {
        let child = self.nodes[i].child.as_ref().expect("running");
        let pid = child.id().expect("a running child has a pid");
        let sent = Command::new("kill")
            .arg(format!("-{signal}"))
            .arg(pid.to_string())
            .status()
            .await
            .expect("kill");
        assert!(sent.success(), "kill -{signal} {pid}");
    }

    /// SIGTERM to node `i`; its exit status once it has stopped.
    pub async fn terminate(&mut self, i: usize, limit: Duration) -> ExitStatus {
        self.signal(i, "TERM").await;
        let mut child = self.nodes[i].child.take().expect("running");
        match tokio::time::timeout(limit, child.wait()).await {
            Ok(status) => status.expect("reap"),
            Err(_) => panic!(
                "{} did not stop within {limit:?}:\n{}",
                self.nodes[i].name,
                self.log(i)
            ),
        }
    }

    /// SIGTERM to each of `nodes`; each must stop and exit 0.
    pub async fn stop_cleanly(&mut self, nodes: &[usize]) {
        for &i in nodes {
            let status = self.terminate(i, Duration::from_secs(20)).await;
            assert!(
                status.success(),
                "{} exited with {status}:\n{}",
                self.nodes[i].name,
                self.log(i)
            );
        }
    }

    /// SIGKILL to node `i`; returns once it is gone.
    pub async fn kill(&mut self, i: usize) {
        let mut child = self.nodes[i].child.take().expect("running");
        child.kill().await.expect("SIGKILL");
    }

    /// Where the data lives.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }
}

/// Runs a client program to its end within `limit` (killed past it); its
/// output.
pub async fn run(program: &str, args: &[&str], limit: Duration) -> Output {
    let child = tokio::process::Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap_or_else(|e| panic!("{program} (is it installed? .ci/run installs it): {e}"));
    match tokio::time::timeout(limit, child.wait_with_output()).await {
        Ok(output) => output.expect("wait for the client"),
        // Dropping the child killed it.
        Err(_) => panic!("{program} {args:?} did not finish within {limit:?}"),
    }
}

/// [`run`], which must succeed; its stdout.
pub async fn run_ok(program: &str, args: &[&str], limit: Duration) -> String {
    let output = run(program, args, limit).await;
    assert!(
        output.status.success(),
        "{program} {args:?}: {}\nstdout:\n{}\nstderr:\n{}",
        output.status,
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).into_owned()
}
