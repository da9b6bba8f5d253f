//! `walship demo`: a primary and two replicas in one process, on loopback,
//! with real files, playing the recovery story:
//!
//! 1. replica 2 is cut off, writes continue, it comes back: **catch-up**
//!    (its retention hold kept the WAL it needs);
//! 2. replica 2 is cut off for longer than its retention budget: the hold is
//!    released, the checkpointer recycles the WAL past it, and it comes back
//!    by **rebuild** (snapshot + tail, since the checkpoint is trusted);
//! 3. replica 1 restarts on a new address under an **epoch bump**: its
//!    identity is kept;
//! 4. replica 2 is cut off past its retention budget again while writes
//!    keep hitting a small hot area: it comes back by a **delta rebuild**
//!    (only the regions its primary's dirty map marked move, against a
//!    whole copy), then an **online verify** compares every replica with
//!    the primary at one LSN.
//!
//! Then it verifies that every replica's readable volume has the primary's
//! checksum and that no recovery pin is left, prints one row per replica, and
//! ends with `verified: all replicas identical at lsn N`.

use anyhow::{ensure, Context as _};
use indicatif::{ProgressBar, ProgressStyle};
use std::collections::BTreeMap;
use std::io::Write;
use std::path::PathBuf;
use std::time::{Duration, Instant};
use walship_actors::testing::{ClusterOptions, Converged, LoopbackCluster};
use walship_actors::Tuning;
use walship_engine::{CommitMode, ReplicaState};
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
    /// Act 4: blocks of the hot area, and writes to it.
    hot_area: u64,
    hot_writes: u64,
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
                hot_area: mib(1) / 4,
                hot_writes: mib(40),
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
                hot_area: mib(4),
                hot_writes: mib(320),
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
            + self.hot_writes
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
    cluster: LoopbackCluster,
    next_block: u64,
    recoveries: BTreeMap<String, Vec<Recovery>>,
}

/// Long enough for the full-size story on a slow disk.
const PATIENCE: Duration = Duration::from_secs(1800);

/// A bar for `bytes` of writes, labelled.
fn progress_bar(label: &str, bytes: u64) -> anyhow::Result<ProgressBar> {
    let bar = ProgressBar::new(bytes);
    bar.set_style(
        ProgressStyle::with_template("{msg:>28} [{bar:40}] {bytes}/{total_bytes} {bytes_per_sec}")?
            .progress_chars("=> "),
    );
    bar.set_message(label.to_owned());
    Ok(bar)
}

fn mib(bytes: u64) -> f64 {
    bytes as f64 / (1 << 20) as f64
}

impl Demo {
    async fn start(plan: Plan, dir: Option<PathBuf>) -> anyhow::Result<Self> {
        // The demo checkpoints explicitly, so the story decides when the WAL
        // recycles. An away replica may hold twice the catch-up gap: the
        // first outage stays within it, the second goes past it.
        let tuning = {
            let mut made = Tuning::default();
            made.checkpoint_every_lsns = u64::MAX;
            made.retention_max_bytes = Some(2 * plan.catch_up_gap * BLOCK_SIZE as u64);
            made
        };
        let cluster = LoopbackCluster::start(ClusterOptions {
            cluster: "demo".into(),
            mode: CommitMode::BestEffort,
            tuning,
            store: StoreOptions {
                segment_bytes: plan.segment_bytes,
                ..StoreOptions::new(plan.volume_blocks)
            },
            dir,
            ..ClusterOptions::new("demo", plan.volume_blocks).with_replicas(&["r1", "r2"])
        })
        .await?;
        Ok(Self {
            cluster,
            next_block: 0,
            recoveries: BTreeMap::new(),
        })
    }

    /// Waits for `server` to be in sync, a spinner saying so meanwhile.
    async fn wait_in_sync(&self, server: &str) -> anyhow::Result<()> {
        let spinner = ProgressBar::new_spinner();
        spinner.enable_steady_tick(Duration::from_millis(100));
        spinner.set_message(format!("waiting for {server} to be in sync"));
        self.cluster
            .wait_state(server, ReplicaState::InSync, PATIENCE)
            .await?;
        spinner.finish_and_clear();
        Ok(())
    }

    /// Writes `count` blocks, 64 in flight, with a progress bar.
    async fn write(&mut self, label: &str, count: u64) -> anyhow::Result<u64> {
        let bar = progress_bar(label, count * BLOCK_SIZE as u64)?;
        let last = self
            .cluster
            .write_blocks_in_flight(self.next_block, count, 64, |n| {
                bar.inc(n * BLOCK_SIZE as u64)
            })
            .await?;
        self.next_block += count;
        self.cluster.primary.barrier().await?;
        bar.finish();
        Ok(last)
    }

    /// Writes `count` blocks again and again over the `area` blocks from
    /// `base`, 64 in flight: much WAL, few regions.
    async fn write_hot(
        &mut self,
        label: &str,
        base: u64,
        area: u64,
        count: u64,
    ) -> anyhow::Result<()> {
        let bar = progress_bar(label, count * BLOCK_SIZE as u64)?;
        let primary = &self.cluster.primary;
        let mut i = 0;
        while i < count {
            let batch = (count - i).min(64);
            let mut writes = tokio::task::JoinSet::new();
            for n in i..i + batch {
                let primary = primary.clone();
                let data = walship_actors::testing::block(n);
                writes.spawn(async move { primary.write(base + n % area, data).await });
            }
            while let Some(written) = writes.join_next().await {
                written??;
            }
            bar.inc(batch * BLOCK_SIZE as u64);
            i += batch;
        }
        primary.barrier().await?;
        bar.finish();
        Ok(())
    }

    /// Restarts a replica (on a new port if `new_address`, which comes with
    /// an epoch bump) and measures its recovery.
    async fn bring_back(
        &mut self,
        server: &str,
        new_address: bool,
        what: &str,
    ) -> anyhow::Result<()> {
        let primary = self.cluster.primary.clone();
        // Measured from before the restart: a heartbeat may start the recovery
        // as soon as the replica listens.
        let before = primary.bytes_sent(server).await?;
        let start = Instant::now();
        self.cluster
            .restart_replica(server, new_address)
            .await
            .context("replica did not restart")?;
        if new_address {
            self.cluster.epoch += 1;
            self.cluster.reassign().await?;
        } else {
            primary.heartbeat().await?;
        }
        self.wait_in_sync(server).await?;
        let took = start.elapsed();
        let bytes = primary.bytes_sent(server).await? - before;
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
    let mut demo = Demo::start(plan, options.dir.clone()).await?;
    writeln!(
        out,
        "walship demo: primary + 2 replicas on loopback, real files in {}; {} MiB volume, {} MiB of 4 KiB writes",
        demo.cluster.dir.display(),
        mib(plan.volume_blocks * BLOCK_SIZE as u64),
        mib(plan.total_blocks() * BLOCK_SIZE as u64)
    )?;
    demo.wait_in_sync("r1").await?;
    demo.wait_in_sync("r2").await?;
    demo.write("fill", plan.fill).await?;
    demo.cluster.primary.checkpoint().await?;

    writeln!(out, "1. r2 cut off; writes continue; r2 comes back")?;
    demo.cluster.stop_replica("r2").await;
    demo.write("writes while r2 is away", plan.catch_up_gap)
        .await?;
    demo.bring_back("r2", false, "catch-up").await?;

    writeln!(
        out,
        "2. r2 cut off past its retention budget; the checkpointer recycles the WAL past it"
    )?;
    demo.cluster.stop_replica("r2").await;
    demo.write("writes while r2 is away", plan.rebuild_gap)
        .await?;
    demo.cluster.primary.checkpoint().await?;
    demo.write("writes after the checkpoint", plan.tail_after_checkpoint)
        .await?;
    demo.bring_back("r2", false, "rebuild").await?;

    writeln!(out, "3. epoch bump with an endpoint change for r1")?;
    demo.cluster.stop_replica("r1").await;
    demo.bring_back("r1", true, "reassigned").await?;
    demo.write("writes in epoch 2", plan.after_reassign).await?;

    writeln!(
        out,
        "4. r2 cut off past its retention budget again, writes hitting a hot area of {:.2} MiB; then an online verify",
        mib(plan.hot_area * BLOCK_SIZE as u64)
    )?;
    demo.cluster.stop_replica("r2").await;
    demo.write_hot(
        "hot writes while r2 is away",
        plan.volume_blocks / 3,
        plan.hot_area,
        plan.hot_writes,
    )
    .await?;
    demo.cluster.primary.checkpoint().await?;
    demo.bring_back("r2", false, "delta rebuild").await?;
    let delta = demo
        .recoveries
        .get("r2")
        .and_then(|r| r.last())
        .map_or(0, |r| r.bytes);
    let whole = plan.volume_blocks * BLOCK_SIZE as u64;
    writeln!(
        out,
        "  r2 delta rebuild moved {:.1} MiB; a whole copy moves {:.0} MiB ({:.0}x more)",
        mib(delta),
        mib(whole),
        whole as f64 / delta.max(1) as f64
    )?;
    let verified = demo.cluster.primary.verify(false).await?;
    for replica in &verified.replicas {
        writeln!(
            out,
            "  verify {}: {} regions compared at lsn {}: {}",
            replica.replica,
            replica.regions,
            replica.lsn,
            match (&replica.error, replica.mismatches.is_empty()) {
                (Some(error), _) => format!("not compared: {error}"),
                (None, true) => "identical".to_owned(),
                (None, false) => format!("{} ranges DIFFER", replica.mismatches.len()),
            }
        )?;
    }

    let Converged { lsn, checksum } = demo.cluster.wait_converged(PATIENCE).await?;
    let log = demo.cluster.primary.recovery_log().await?;
    for server in ["r1", "r2"] {
        writeln!(out, "  {server} decisions:")?;
        for line in plan_events(&log, server) {
            writeln!(out, "{line}")?;
        }
    }
    writeln!(
        out,
        "\n{:<8} {:<46} {:>12} {:>10} {:>12}",
        "replica", "outcome", "moved MiB", "time", "MiB/s"
    )?;
    let mut identical = true;
    for node in &demo.cluster.replicas {
        let server = &node.server;
        let handle = node.handle.as_ref().context("a replica is not running")?;
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
            "{:<8} {:<46} {:>12.1} {:>9.2}s {:>12.1}",
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
                    "{:<8} {:<46} {:>12.1} {:>9.2}s {:>12.1}",
                    "",
                    format!("  {}", r.what),
                    mib(r.bytes),
                    r.took.as_secs_f64(),
                    rate
                )?;
            }
        }
    }
    let status = demo.cluster.status().await?;
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
    ensure!(
        log.iter().any(|e| e.event == "plan_rebuild_delta"),
        "the story did not rebuild by the dirty map"
    );
    ensure!(
        verified.clean() && verified.replicas.len() == 2,
        "the online verify did not find both replicas identical: {verified:?}"
    );
    demo.cluster.shutdown().await;
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
        assert!(text.contains("plan_rebuild_delta regions="), "{text}");
        assert!(text.contains("r2 delta rebuild moved"), "{text}");
        assert!(
            text.contains("verify vol1/r1") || text.contains("verify demo/r1"),
            "{text}"
        );
        assert!(text.contains("identity kept"), "{text}");
        let last = text.lines().last().unwrap();
        assert!(
            last.starts_with("verified: all replicas identical at lsn "),
            "{last}"
        );
    }
}
