//! `walship demo`: a primary and two replicas in one process, on loopback,
//! with real files, playing the recovery story:
//!
//! 1. replica 2 is cut off, writes continue, it comes back: **catch-up**
//!    (its retention hold kept the WAL it needs);
//! 2. replica 2 is cut off for longer than its retention budget: the hold is
//!    released, the checkpointer recycles the WAL past it, and it comes back
//!    by **rebuild** (snapshot + tail, since the checkpoint is trusted);
//! 3. replica 1 restarts on a new address under an **epoch bump**: its
//!    identity is kept.
//!
//! Then it verifies that every replica's readable volume has the primary's
//! checksum and that no recovery pin is left, prints one row per replica, and
//! ends with `verified: all replicas identical at lsn N`.

use anyhow::{bail, ensure, Context as _};
use bytes::Bytes;
use futures::future::try_join_all;
use indicatif::{ProgressBar, ProgressStyle};
use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};
use walship_actors::{
    NodeStatus, PrimaryConfig, ReplicaConfig, ReplicaSpec, Runtime, Tuning, VolumeConfig,
    VolumeHandle, VolumeStatus,
};
use walship_engine::{
    Assignment, CommitMode, Endpoint, Epoch, ReplicaAssignment, ReplicaId, ReplicaState,
};
use walship_io::{StoreOptions, BLOCK_SIZE};

/// Demo options.
#[derive(Debug, Clone, Default)]
pub struct DemoOptions {
    /// Small sizes: finishes in seconds.
    pub quick: bool,
    /// Where to keep the data (a temp dir otherwise).
    pub dir: Option<PathBuf>,
    /// Print the final primary status as JSON.
    pub json: bool,
}

/// Sizes of one run, in 4 KiB blocks.
#[derive(Debug, Clone, Copy)]
struct Plan {
    volume_blocks: u64,
    fill: u64,
    catch_up_gap: u64,
    rebuild_gap: u64,
    tail_after_checkpoint: u64,
    after_reassign: u64,
    segment_bytes: u64,
}

impl Plan {
    fn new(quick: bool) -> Self {
        let mib = |n: u64| n * 256; // blocks per MiB
        if quick {
            Plan {
                volume_blocks: mib(16),
                fill: mib(16),
                catch_up_gap: mib(8),
                rebuild_gap: mib(32),
                tail_after_checkpoint: mib(1),
                after_reassign: mib(7),
                segment_bytes: 1 << 20,
            }
        } else {
            Plan {
                volume_blocks: mib(256),
                fill: mib(256),
                catch_up_gap: mib(128),
                rebuild_gap: mib(512),
                tail_after_checkpoint: mib(8),
                after_reassign: mib(120),
                segment_bytes: 16 << 20,
            }
        }
    }

    fn total_blocks(&self) -> u64 {
        self.fill
            + self.catch_up_gap
            + self.rebuild_gap
            + self.tail_after_checkpoint
            + self.after_reassign
    }
}

/// One recovery as measured.
#[derive(Debug, Clone)]
struct Recovery {
    what: String,
    bytes: u64,
    took: Duration,
}

struct Demo {
    rt: Runtime,
    dir: PathBuf,
    plan: Plan,
    primary: VolumeHandle,
    replicas: BTreeMap<String, (VolumeHandle, String, u64)>,
    epoch: u64,
    next_block: u64,
    recoveries: BTreeMap<String, Vec<Recovery>>,
}

const VOLUME: &str = "demo";

fn block(index: u64) -> Bytes {
    let mut data = vec![(index % 251) as u8; BLOCK_SIZE];
    data[..8].copy_from_slice(&index.to_le_bytes());
    Bytes::from(data)
}

fn store_options(plan: &Plan) -> StoreOptions {
    StoreOptions {
        segment_bytes: plan.segment_bytes,
        ..StoreOptions::new(plan.volume_blocks)
    }
}

fn replica_config(plan: &Plan, dir: &Path, server: &str, listen: &str) -> VolumeConfig {
    VolumeConfig::Replica(ReplicaConfig {
        cluster: "demo".into(),
        volume: VOLUME.into(),
        server: server.into(),
        dir: dir.join(server),
        store: store_options(plan),
        listen: listen.into(),
        checkpoint_every_lsns: 16 * 1024,
    })
}

fn mib(bytes: u64) -> f64 {
    bytes as f64 / (1 << 20) as f64
}

impl Demo {
    async fn start(plan: Plan, dir: PathBuf) -> anyhow::Result<Self> {
        let rt = Runtime::start()?;
        let mut replicas = BTreeMap::new();
        let mut specs = Vec::new();
        for server in ["r1", "r2"] {
            let handle = rt
                .spawn_volume(replica_config(&plan, &dir, server, "127.0.0.1:0"))
                .await?;
            let addr = handle.listen_addr().context("replica address")?.to_string();
            specs.push(ReplicaSpec {
                server: server.into(),
                addr: addr.clone(),
                version: 1,
            });
            replicas.insert(server.to_owned(), (handle, addr, 1));
        }
        // The demo checkpoints explicitly, so the story decides when the WAL
        // recycles. An away replica may hold twice the catch-up gap: the
        // first outage stays within it, the second goes past it.
        let tuning = Tuning {
            checkpoint_every_lsns: u64::MAX,
            retention_max_bytes: Some(2 * plan.catch_up_gap * BLOCK_SIZE as u64),
            ..Tuning::default()
        };
        let primary = rt
            .spawn_volume(VolumeConfig::Primary(PrimaryConfig {
                cluster: "demo".into(),
                volume: VOLUME.into(),
                dir: dir.join("primary"),
                store: store_options(&plan),
                epoch: 1,
                commit_mode: CommitMode::BestEffort,
                replicas: specs,
                tuning,
            }))
            .await?;
        Ok(Self {
            rt,
            dir,
            plan,
            primary,
            replicas,
            epoch: 1,
            next_block: 0,
            recoveries: BTreeMap::new(),
        })
    }

    async fn status(&self) -> anyhow::Result<VolumeStatus> {
        match self.primary.status().await? {
            NodeStatus::Primary(status) => Ok(*status),
            NodeStatus::Replica(_) => bail!("primary reported as a replica"),
        }
    }

    async fn wait_in_sync(&self, server: &str, spinner: &ProgressBar) -> anyhow::Result<()> {
        let deadline = Instant::now() + Duration::from_secs(1800);
        loop {
            let state = self.primary.replica_state(server).await?;
            if state == Some(ReplicaState::InSync) {
                return Ok(());
            }
            spinner.set_message(format!("{server}: {state:?}"));
            ensure!(
                Instant::now() < deadline,
                "{server} did not get back in sync"
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    /// Writes `count` blocks, 64 in flight, with a progress bar.
    async fn write(&mut self, label: &str, count: u64) -> anyhow::Result<u64> {
        let bar = ProgressBar::new(count * BLOCK_SIZE as u64);
        bar.set_style(
            ProgressStyle::with_template(
                "{msg:>28} [{bar:40}] {bytes}/{total_bytes} {bytes_per_sec}",
            )?
            .progress_chars("=> "),
        );
        bar.set_message(label.to_owned());
        let mut last = 0;
        let end = self.next_block + count;
        while self.next_block < end {
            let batch = (end - self.next_block).min(64);
            let writes = (self.next_block..self.next_block + batch)
                .map(|i| self.primary.write(i % self.plan.volume_blocks, block(i)));
            last = try_join_all(writes)
                .await?
                .into_iter()
                .max()
                .unwrap_or(last);
            self.next_block += batch;
            bar.inc(batch * BLOCK_SIZE as u64);
        }
        self.primary.barrier().await?;
        bar.finish();
        Ok(last)
    }

    async fn cut_off(&mut self, server: &str) -> anyhow::Result<()> {
        let (handle, _, _) = self.replicas.get(server).context("no such replica")?;
        // Returns with its listener closed and its store released.
        handle.stop().await;
        Ok(())
    }

    /// Restarts a replica (on a new port if `new_address`) and measures its recovery.
    async fn bring_back(
        &mut self,
        server: &str,
        new_address: bool,
        what: &str,
    ) -> anyhow::Result<()> {
        let (_, addr, version) = self
            .replicas
            .get(server)
            .cloned()
            .context("no such replica")?;
        // Measured from before the restart: a heartbeat may start the recovery
        // as soon as the replica listens.
        let before = self.primary.bytes_sent(server).await?;
        let start = Instant::now();
        let listen = if new_address {
            "127.0.0.1:0".to_owned()
        } else {
            addr.clone()
        };
        let handle = self
            .rt
            .spawn_volume(replica_config(&self.plan, &self.dir, server, &listen))
            .await
            .context("replica did not restart")?;
        let addr = handle.listen_addr().context("replica address")?.to_string();
        let version = if new_address { version + 1 } else { version };
        self.replicas
            .insert(server.to_owned(), (handle, addr, version));
        if new_address {
            self.epoch += 1;
            self.primary.apply_assignment(self.assignment()?).await?;
        } else {
            self.primary.heartbeat().await?;
        }
        let spinner = ProgressBar::new_spinner();
        spinner.enable_steady_tick(Duration::from_millis(100));
        self.wait_in_sync(server, &spinner).await?;
        spinner.finish_and_clear();
        let took = start.elapsed();
        let bytes = self.primary.bytes_sent(server).await? - before;
        self.recoveries
            .entry(server.to_owned())
            .or_default()
            .push(Recovery {
                what: what.to_owned(),
                bytes,
                took,
            });
        Ok(())
    }

    fn assignment(&self) -> anyhow::Result<Assignment> {
        let mut replicas = Vec::new();
        for (server, (_, addr, version)) in &self.replicas {
            replicas.push(ReplicaAssignment {
                id: ReplicaId::new(VOLUME, server)?,
                endpoint: Endpoint::new(addr.clone(), *version),
            });
        }
        Ok(Assignment {
            epoch: Epoch(self.epoch),
            commit_mode: CommitMode::BestEffort,
            replicas,
        })
    }

    /// Waits until every replica holds the primary's head and no recovery pin is left.
    async fn converge(&self) -> anyhow::Result<(u64, u32)> {
        let deadline = Instant::now() + Duration::from_secs(600);
        loop {
            let status = self.status().await?;
            let mut caught_up = status.recovery_pins == 0
                && status.snapshot_pins == 0
                && status.held_resources == 0;
            for (handle, _, _) in self.replicas.values() {
                if let NodeStatus::Replica(r) = handle.status().await? {
                    caught_up &= r.durable == status.head;
                }
            }
            if caught_up {
                let checksum = self.primary.content_checksum().await?;
                return Ok((status.head, checksum));
            }
            ensure!(
                Instant::now() < deadline,
                "replicas did not converge: recovery pins {}, snapshot pins {}, held {}",
                status.recovery_pins,
                status.snapshot_pins,
                status.held_resources
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

fn plan_events(log: &[walship_engine::RecoveryEvent], server: &str) -> Vec<String> {
    log.iter()
        .filter(|e| e.replica.as_ref().is_some_and(|r| r.server() == server))
        .filter(|e| {
            e.event.starts_with("plan_")
                || e.event == "handshake"
                || e.event == "endpoint_changed"
                || e.event == "retention_budget_exceeded"
        })
        .map(|e| format!("    {} {}", e.event, e.detail))
        .collect()
}

/// Plays the story; returns an error on any mismatch or leaked pin.
pub async fn run(options: DemoOptions, out: &mut (impl Write + Send)) -> anyhow::Result<()> {
    let plan = Plan::new(options.quick);
    let temp = tempfile::tempdir()?;
    let dir = options
        .dir
        .clone()
        .unwrap_or_else(|| temp.path().to_path_buf());
    writeln!(
        out,
        "walship demo: primary + 2 replicas on loopback, real files in {}; {} MiB volume, {} MiB of 4 KiB writes",
        dir.display(),
        mib(plan.volume_blocks * BLOCK_SIZE as u64),
        mib(plan.total_blocks() * BLOCK_SIZE as u64)
    )?;
    let mut demo = Demo::start(plan, dir).await?;
    let startup = ProgressBar::new_spinner();
    demo.wait_in_sync("r1", &startup).await?;
    demo.wait_in_sync("r2", &startup).await?;
    startup.finish_and_clear();
    demo.write("fill", plan.fill).await?;
    demo.primary.checkpoint().await?;

    writeln!(out, "1. r2 cut off; writes continue; r2 comes back")?;
    demo.cut_off("r2").await?;
    demo.write("writes while r2 is away", plan.catch_up_gap)
        .await?;
    demo.bring_back("r2", false, "catch-up").await?;

    writeln!(
        out,
        "2. r2 cut off past its retention budget; the checkpointer recycles the WAL past it"
    )?;
    demo.cut_off("r2").await?;
    demo.write("writes while r2 is away", plan.rebuild_gap)
        .await?;
    demo.primary.checkpoint().await?;
    demo.write("writes after the checkpoint", plan.tail_after_checkpoint)
        .await?;
    demo.bring_back("r2", false, "rebuild").await?;

    writeln!(out, "3. epoch bump with an endpoint change for r1")?;
    demo.cut_off("r1").await?;
    demo.bring_back("r1", true, "reassigned").await?;
    demo.write("writes in epoch 2", plan.after_reassign).await?;

    let (lsn, checksum) = demo.converge().await?;
    let log = demo.primary.recovery_log().await?;
    for server in ["r1", "r2"] {
        writeln!(out, "  {server} decisions:")?;
        for line in plan_events(&log, server) {
            writeln!(out, "{line}")?;
        }
    }
    writeln!(
        out,
        "\n{:<8} {:<34} {:>12} {:>10} {:>12}",
        "replica", "outcome", "moved MiB", "time", "MiB/s"
    )?;
    let mut identical = true;
    for (server, (handle, _, _)) in &demo.replicas {
        let replica_checksum = handle.content_checksum().await?;
        identical &= replica_checksum == checksum;
        let recoveries = demo.recoveries.get(server).cloned().unwrap_or_default();
        let outcome = recoveries
            .iter()
            .map(|r| r.what.as_str())
            .collect::<Vec<_>>()
            .join(" + ");
        let bytes: u64 = recoveries.iter().map(|r| r.bytes).sum();
        let took: Duration = recoveries.iter().map(|r| r.took).sum();
        let rate = if took.is_zero() {
            0.0
        } else {
            mib(bytes) / took.as_secs_f64()
        };
        let verdict = if replica_checksum == checksum {
            "identical"
        } else {
            "DIFFERS"
        };
        writeln!(
            out,
            "{:<8} {:<34} {:>12.1} {:>9.2}s {:>12.1}",
            server,
            format!("{outcome}; {verdict}"),
            mib(bytes),
            took.as_secs_f64(),
            rate
        )?;
        // One line per recovery under the replica's row, same columns.
        if recoveries.len() > 1 {
            for r in &recoveries {
                let rate = if r.took.is_zero() {
                    0.0
                } else {
                    mib(r.bytes) / r.took.as_secs_f64()
                };
                writeln!(
                    out,
                    "{:<8} {:<34} {:>12.1} {:>9.2}s {:>12.1}",
                    "",
                    format!("  {}", r.what),
                    mib(r.bytes),
                    r.took.as_secs_f64(),
                    rate
                )?;
            }
        }
    }
    let status = demo.status().await?;
    let pins = status.recovery_pins + status.snapshot_pins + status.held_resources;
    writeln!(
        out,
        "pins left: {pins}; primary checksum {checksum:#010x}; reader {}",
        status.reader_backend
    )?;
    if options.json {
        writeln!(out, "{}", serde_json::to_string_pretty(&status)?)?;
    }
    ensure!(identical, "a replica differs from the primary");
    ensure!(pins == 0, "{pins} pins left");
    ensure!(
        log.iter().any(|e| e.event == "plan_catchup"),
        "the story did not catch up"
    );
    ensure!(
        log.iter().any(|e| e.event.starts_with("plan_rebuild")),
        "the story did not rebuild"
    );
    demo.primary.stop().await;
    for (handle, _, _) in demo.replicas.values() {
        handle.stop().await;
    }
    demo.rt.shutdown();
    writeln!(out, "verified: all replicas identical at lsn {lsn}")?;
    Ok(())
}

#[cfg(test)]
mod tests {
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn quick_demo_catches_up_rebuilds_reassigns_and_verifies() {
        let mut out = Vec::new();
        super::run(
            super::DemoOptions {
                quick: true,
                ..Default::default()
            },
            &mut out,
        )
        .await
        .unwrap();
        let text = String::from_utf8(out).unwrap();
        assert!(text.contains("plan_catchup"), "{text}");
        assert!(text.contains("plan_rebuild_snapshot_tail"), "{text}");
        assert!(text.contains("identity kept"), "{text}");
        let last = text.lines().last().unwrap();
        assert!(
            last.starts_with("verified: all replicas identical at lsn "),
            "{last}"
        );
    }
}
