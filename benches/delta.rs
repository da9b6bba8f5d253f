//! P10 and P11: what a rebuild moves, against what changed and against
//! its same-run baselines. Run with `cargo bench --bench delta` (both) or
//! `cargo bench --bench delta -- p10`; `-- --help` lists the sizes.
//!
//! - P10 dirty map: a replica away past retention while 1%, 10% and 50% of
//!   a volume (64 KiB writes at region-aligned offsets, as a file system's
//!   extents would) changes, brought back: bytes moved / bytes changed
//!   (target <= 1.1x; the map is the primary's and never moves), next to
//!   what a whole copy moves.
//! - P10 checksums: the same with the primary's map lost (its `DIRTY` file
//!   removed before a restart), so the regions are compared: bytes moved,
//!   and process CPU per GiB of volume, alternated with a raw read +
//!   xxh3-128 of both copies' extent files (what comparing needs at least).
//! - P11 resume: a replica with an empty disk rebuilt whole, its link cut
//!   once ~60% went, then resumed: bytes moved in all / volume (target <=
//!   1.1x; without a resume it is 1.6x).

use anyhow::{ensure, Context as _};
use bytes::Bytes;
use clap::Parser;
use std::fs::File;
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::time::{Duration, Instant};
use walship::actors::testing::{ClusterOptions, LoopbackCluster};
use walship::actors::Tuning;
use walship::engine::{CommitMode, ReplicaState};
use walship::io::regions::region_sums;
use walship::io::StoreOptions;

#[path = "support/stats.rs"]
mod stats;
use stats::median;

/// P10 (delta rebuilds) and P11 (resumed rebuilds), with same-run baselines.
#[derive(Debug, Clone, Parser)]
#[command(name = "delta")]
struct BenchOptions {
    /// Which: p10, p11 (default: both).
    #[arg(value_delimiter = ',')]
    which: Vec<String>,
    /// Volume size, MiB.
    #[arg(long, default_value_t = 1024)]
    size_mib: u64,
    /// Rounds of the checksum path and of P11.
    #[arg(long, default_value_t = 3)]
    rounds: u64,
    /// Keep the data here instead of a temp dir.
    #[arg(long)]
    dir: Option<std::path::PathBuf>,
    /// Passed by `cargo bench`; ignored.
    #[arg(long, hide = true)]
    bench: bool,
}

const PATIENCE: Duration = Duration::from_secs(3600);
const REGION: u64 = 64 << 10;
const REGION_BLOCKS: u64 = REGION / 4096;
const MIB: f64 = 1048576.0;

/// Process CPU (user + system) so far, from `/proc/self/stat` (100 Hz ticks).
fn cpu_time() -> anyhow::Result<Duration> {
    let stat = std::fs::read_to_string("/proc/self/stat")?;
    let after = stat.rsplit_once(')').context("stat")?.1;
    let fields: Vec<&str> = after.split_whitespace().collect();
    let ticks: u64 = fields[11].parse::<u64>()? + fields[12].parse::<u64>()?;
    Ok(Duration::from_millis(ticks * 10))
}

fn region_data(region: u64, round: u64) -> Bytes {
    let mut data = vec![0u8; REGION as usize];
    for (i, byte) in data.iter_mut().enumerate() {
        *byte = (region.wrapping_mul(31) ^ round.wrapping_mul(0x9e37) ^ (i as u64 / 512)) as u8;
    }
    Bytes::from(data)
}

struct Bench {
    cluster: LoopbackCluster,
    blocks: u64,
    round: u64,
}

impl Bench {
    async fn start(dir: &Path, blocks: u64) -> anyhow::Result<Self> {
        let tuning = {
            let mut made = Tuning::default();
            // A replica away loses its hold at once: the WAL moves on.
            made.retention_max_bytes = Some(0);
            made
        };
        let cluster = LoopbackCluster::start(ClusterOptions {
            cluster: "bench".into(),
            mode: CommitMode::BestEffort,
            tuning,
            store: StoreOptions {
                // Small segments: a checkpoint recycles past a replica
                // that left a few writes ago.
                segment_bytes: 1 << 20,
                ..StoreOptions::new(blocks)
            },
            replica_checkpoint_every: 16 * 1024,
            dir: Some(dir.to_path_buf()),
            ..ClusterOptions::new("bench", blocks).with_replicas(&["r1"])
        })
        .await?;
        cluster.wait_all_in_sync(PATIENCE).await?;
        let bench = Self {
            cluster,
            blocks,
            round: 0,
        };
        let last = bench.write_regions(0..bench.regions()).await?;
        bench.cluster.wait_durable("r1", last, PATIENCE).await?;
        Ok(bench)
    }

    fn regions(&self) -> u64 {
        self.blocks / REGION_BLOCKS
    }

    fn volume_bytes(&self) -> u64 {
        self.blocks * 4096
    }

    /// Writes the regions (32 in flight) and returns the last LSN.
    async fn write_regions(&self, regions: impl Iterator<Item = u64>) -> anyhow::Result<u64> {
        let primary = &self.cluster.primary;
        let mut pending = Vec::new();
        for region in regions {
            pending.push(primary.write(region * REGION_BLOCKS, region_data(region, self.round)));
            if pending.len() == 32 {
                futures::future::try_join_all(pending.drain(..)).await?;
            }
        }
        futures::future::try_join_all(pending).await?;
        Ok(primary.barrier().await?)
    }

    /// Takes r1 away, changes `percent` of the regions (spread evenly), and
    /// checkpoints so the WAL no longer covers it. Returns bytes changed.
    async fn away_while_changing(&mut self, percent: u64) -> anyhow::Result<u64> {
        // Only what changes while it is away differs (best_effort commits
        // without it: it may still be receiving).
        let head = self.cluster.primary.barrier().await?;
        self.cluster.wait_durable("r1", head, PATIENCE).await?;
        self.cluster.stop_replica("r1").await;
        self.round += 1;
        let regions = self.regions();
        let count = (regions * percent / 100).max(1);
        let step = regions / count;
        let offset = self.round % step.max(1);
        self.write_regions((0..count).map(|i| i * step + offset))
            .await?;
        self.cluster.primary.checkpoint().await?;
        Ok(count * REGION)
    }

    /// Brings r1 back; returns bytes moved and CPU spent until it is in
    /// sync, after checking both copies hold the same.
    async fn bring_back(&mut self) -> anyhow::Result<(u64, Duration)> {
        let primary = self.cluster.primary.clone();
        let before = primary.bytes_sent("r1").await?;
        let cpu = cpu_time()?;
        self.cluster.restart_replica("r1", false).await?;
        self.cluster
            .wait_state("r1", ReplicaState::InSync, PATIENCE)
            .await?;
        let spent = cpu_time()? - cpu;
        let moved = primary.bytes_sent("r1").await? - before;
        ensure!(
            primary.content_checksum().await?
                == self.cluster.replica("r1").content_checksum().await?,
            "r1 differs after its rebuild"
        );
        Ok((moved, spent))
    }

    async fn plans(&self, event: &str) -> anyhow::Result<usize> {
        let log = self.cluster.primary.recovery_log().await?;
        Ok(log.iter().filter(|e| e.event == event).count())
    }

    /// The newest decisions about r1, for a failure's message.
    async fn trail(&self) -> anyhow::Result<String> {
        let log = self.cluster.primary.recovery_log().await?;
        let lines: Vec<String> = log
            .iter()
            .filter(|e| e.event.starts_with("plan") || e.event == "handshake")
            .map(|e| format!("{} {}", e.event, e.detail))
            .collect();
        Ok(lines[lines.len().saturating_sub(6)..].join("\n"))
    }

    /// Restarts the primary without its dirty maps (a lost map).
    async fn lose_the_map(&mut self) -> anyhow::Result<()> {
        self.cluster.primary.stop().await;
        let dirty = self.cluster.primary_dir.join("DIRTY");
        if dirty.exists() {
            std::fs::remove_file(&dirty)?;
        }
        let epoch = self.cluster.epoch + 1;
        self.cluster.reopen_primary(epoch).await?;
        Ok(())
    }

    fn extent_of(dir: &Path) -> anyhow::Result<std::path::PathBuf> {
        std::fs::read_dir(dir)?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .find(|p| {
                p.file_name().is_some_and(|n| {
                    n.to_string_lossy().starts_with("extent.")
                        && !n.to_string_lossy().ends_with("staging")
                })
            })
            .context("extent file")
    }

    /// The baseline of comparing: both extent files read and hashed per
    /// region. Returns CPU spent.
    fn raw_compare(&self) -> anyhow::Result<Duration> {
        let cpu = cpu_time()?;
        let mut differ = 0;
        let files = [
            File::open(Self::extent_of(&self.cluster.primary_dir)?)?,
            File::open(Self::extent_of(&self.cluster.node("r1").dir)?)?,
        ];
        let mut bufs = [vec![0u8; 1 << 20], vec![0u8; 1 << 20]];
        let mut offset = 0;
        while offset < self.volume_bytes() {
            let mut sums = Vec::new();
            for (file, buf) in files.iter().zip(bufs.iter_mut()) {
                file.read_exact_at(buf, offset)?;
                sums.push(region_sums(buf, REGION));
            }
            differ += sums[0].iter().zip(&sums[1]).filter(|(a, b)| a != b).count();
            offset += 1 << 20;
        }
        std::hint::black_box(differ);
        Ok(cpu_time()? - cpu)
    }
}

async fn p10(options: &BenchOptions, dir: &Path, out: &mut impl Write) -> anyhow::Result<()> {
    let mut bench = Bench::start(dir, options.size_mib * 256).await?;
    let volume = bench.volume_bytes() as f64;
    for percent in [1, 10, 50] {
        let changed = bench.away_while_changing(percent).await?;
        let deltas = bench.plans("plan_rebuild_delta").await?;
        let (moved, cpu) = bench.bring_back().await?;
        ensure!(
            bench.plans("plan_rebuild_delta").await? == deltas + 1,
            "P10 {percent}%: not a delta rebuild:\n{}",
            bench.trail().await?
        );
        writeln!(
            out,
            "P10 dirty map, {percent}% changed: {:.1} MiB changed, {:.1} MiB moved: {:.3}x (target <= 1.1x); a whole copy moves {:.0} MiB ({:.1}x what changed); CPU {:.2} s",
            changed as f64 / MIB,
            moved as f64 / MIB,
            moved as f64 / changed as f64,
            volume / MIB,
            volume / changed as f64,
            cpu.as_secs_f64(),
        )?;
    }
    // Checksums: the map lost, the regions compared; alternated with the
    // raw read + hash of both copies.
    let gib = volume / (1u64 << 30) as f64;
    let (mut ours, mut raw) = (Vec::new(), Vec::new());
    for round in 0..options.rounds {
        let changed = bench.away_while_changing(1).await?;
        bench.lose_the_map().await?;
        let compared = bench.plans("plan_rebuild_checksum").await?;
        let raw_first = round % 2 == 1;
        if raw_first {
            raw.push(bench.raw_compare()?);
        }
        let (moved, cpu) = bench.bring_back().await?;
        ensure!(
            bench.plans("plan_rebuild_checksum").await? == compared + 1,
            "P10 checksums: not a compared rebuild:\n{}",
            bench.trail().await?
        );
        if !raw_first {
            raw.push(bench.raw_compare()?);
        }
        ours.push(cpu);
        // The replica's checksums, 16 bytes a region, come the other way.
        let sums = bench.regions() * 16;
        writeln!(
            out,
            "P10 checksums round {round}: {:.1} MiB changed, {:.1} MiB moved + {:.2} MiB of checksums: {:.3}x; CPU {:.2} s/GiB, raw read + hash of both copies {:.2} s/GiB",
            changed as f64 / MIB,
            moved as f64 / MIB,
            sums as f64 / MIB,
            (moved + sums) as f64 / changed as f64,
            cpu.as_secs_f64() / gib,
            raw.last().map_or(0.0, |d| d.as_secs_f64() / gib),
        )?;
    }
    let secs = |runs: &[Duration]| median(runs.iter().map(Duration::as_secs_f64).collect());
    writeln!(
        out,
        "P10 checksum CPU (medians of {} alternating rounds): walship {:.2} s/GiB, raw read + hash of both copies {:.2} s/GiB: {:.2}x",
        options.rounds,
        secs(&ours) / gib,
        secs(&raw) / gib,
        secs(&ours) / secs(&raw).max(1e-9),
    )?;
    bench.cluster.shutdown().await;
    Ok(())
}

async fn p11(options: &BenchOptions, dir: &Path, out: &mut impl Write) -> anyhow::Result<()> {
    let mut bench = Bench::start(dir, options.size_mib * 256).await?;
    let volume = bench.volume_bytes();
    // The primary reaches r1 through a relay listening where r1 did not.
    let real = bench.cluster.node("r1").addr.clone();
    let relay = bench.cluster.relay("r1").await?;
    let through = std::mem::replace(&mut bench.cluster.node_mut("r1").addr, real);
    let mut ratios = Vec::new();
    for round in 0..options.rounds {
        bench.cluster.stop_replica("r1").await;
        std::fs::remove_dir_all(&bench.cluster.node("r1").dir)?;
        // The WAL moves past it: it comes back by a rebuild.
        bench.cluster.primary.checkpoint().await?;
        let primary = bench.cluster.primary.clone();
        let before = primary.bytes_sent("r1").await?;
        let resumes = bench.plans("plan_rebuild_resume").await?;
        bench.cluster.restart_replica("r1", false).await?;
        let deadline = Instant::now() + PATIENCE;
        while primary.bytes_sent("r1").await? - before < volume * 6 / 10 {
            ensure!(Instant::now() < deadline, "P11: never reached 60%");
            tokio::task::yield_now().await;
        }
        relay.cut_next_batch();
        while !relay.is_cut() {
            tokio::task::yield_now().await;
        }
        let at_cut = primary.bytes_sent("r1").await? - before;
        relay.resume();
        bench
            .cluster
            .wait_state("r1", ReplicaState::InSync, PATIENCE)
            .await?;
        let moved = primary.bytes_sent("r1").await? - before;
        ensure!(
            primary.content_checksum().await?
                == bench.cluster.replica("r1").content_checksum().await?,
            "P11: r1 differs after its rebuild"
        );
        ensure!(
            bench.plans("plan_rebuild_resume").await? > resumes,
            "P11 round {round}: the rebuild did not resume (cut at {at_cut}):\n{}",
            bench.trail().await?
        );
        let ratio = moved as f64 / volume as f64;
        ratios.push(ratio);
        writeln!(
            out,
            "P11 round {round}: cut at {:.0}%, {:.0} MiB moved in all for a {:.0} MiB volume: {ratio:.3}x",
            at_cut as f64 * 100.0 / volume as f64,
            moved as f64 / MIB,
            volume as f64 / MIB,
        )?;
    }
    bench.cluster.node_mut("r1").addr = through;
    writeln!(
        out,
        "P11 resumed rebuild (median of {}): {:.3}x the volume moved in all (target <= 1.1x; a rebuild started over after a cut at 60% moves 1.6x)",
        options.rounds,
        median(ratios),
    )?;
    bench.cluster.shutdown().await;
    Ok(())
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let mut options = BenchOptions::parse();
    if options.which.is_empty() {
        options.which = vec!["p10".into(), "p11".into()];
    }
    let temp = tempfile::tempdir()?;
    let root = options
        .dir
        .clone()
        .unwrap_or_else(|| temp.path().to_path_buf());
    let mut out = std::io::stdout();
    for which in &options.which {
        let dir = root.join(which);
        std::fs::create_dir_all(&dir)?;
        match which.as_str() {
            "p10" => p10(&options, &dir, &mut out).await?,
            "p11" => p11(&options, &dir, &mut out).await?,
            other => anyhow::bail!("unknown benchmark {other}: expected p10 or p11"),
        }
        let _ = std::fs::remove_dir_all(&dir);
    }
    Ok(())
}
