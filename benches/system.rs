//! Whole-system benchmarks, each against a baseline measured in the same
//! run, reported as a ratio with its target. Run them with
//! `cargo bench --bench system` (all) or `cargo bench --bench system -- p4`;
//! `-- --help` lists the sizes to change.
//!
//! - P1 catch-up of a replica N MiB behind vs a raw pipeline over the same
//!   WAL files (pread 1 MiB → loopback TCP → write + fdatasync every 16 MiB;
//!   median of three runs).
//! - P2 full-base rebuild of an N MiB volume vs the same raw pipeline over the
//!   extent file.
//! - P4 replication tax: 4 KiB write+barrier at QD 1 and QD 32, sync_all with
//!   two replicas vs the same workload on a local unreplicated volume.
//! - P5 mailbox: SenderActor heartbeat throughput vs a bare actix actor and a
//!   bare tokio mpsc channel.
//! - P6 scale: idle volumes x 2 replicas in one process: RSS and threads per
//!   volume, CPU of 1 Hz heartbeats (at a scale the per-volume threads allow).

use anyhow::{bail, ensure, Context as _};
use bytes::Bytes;
use clap::Parser;
use std::collections::BTreeMap;
use std::fs::{self, File, OpenOptions};
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};
use walship::actors::testing::{ClusterOptions, LoopbackCluster};
use walship::actors::{
    NodeStatus, PrimaryConfig, ReplicaConfig, Runtime, SenderHeartbeat, Tuning, VolumeConfig,
    VolumeHandle,
};
use walship::engine::{
    Assignment, CommitMode, Endpoint, Epoch, ReplicaAssignment, ReplicaId, ReplicaState,
};
use walship::io::{StoreOptions, BLOCK_SIZE};

#[path = "support/stats.rs"]
mod stats;
use stats::median;

/// Whole-system benchmarks against same-run baselines: P1 catch-up, P2
/// full-base rebuild, P4 replication tax (P4q: on a volume that slept),
/// P5 mailbox, P6 scale.
#[derive(Debug, Clone, Parser)]
#[command(name = "system")]
struct BenchOptions {
    /// Which: p1, p2, p4, p4q, p5, p6 (default: all but p4q).
    #[arg(value_delimiter = ',')]
    which: Vec<String>,
    /// Data size for P1 and P2, MiB.
    #[arg(long, default_value_t = 1024)]
    size_mib: u64,
    /// FUA writes per P4 run at QD1 (x4 at QD32).
    #[arg(long, default_value_t = 5000)]
    p4_ops: u64,
    /// P4's writers run on the volumes' thread (as the NBD export's
    /// connections do) instead of the bench's tokio runtime.
    #[arg(long)]
    p4_on_volume_thread: bool,
    /// Messages per P5 run.
    #[arg(long, default_value_t = 1_000_000)]
    p5_messages: u64,
    /// Idle volumes (each with 2 replicas) for P6.
    #[arg(long, default_value_t = 200)]
    p6_volumes: u64,
    /// Keep the data here instead of a temp dir.
    #[arg(long)]
    dir: Option<PathBuf>,
    /// Passed by `cargo bench`; ignored.
    #[arg(long, hide = true)]
    bench: bool,
}

fn mib_per_s(bytes: u64, took: Duration) -> f64 {
    bytes as f64 / (1 << 20) as f64 / took.as_secs_f64()
}

/// Pushes `files` through a loopback socket to a receiver that writes them
/// to `sink` (a new file, kept, like a replica's) and fdatasyncs every 16 MiB.
///
/// The sink must be a new file each run: on this VM, page cache pages
/// that were freed and handed back to the host cost ~3 ms/MiB to touch
/// again (dd of 18 GB to tmpfs: 55.9 s), while rewriting a truncated file
/// reuses the pages just freed. A replica writes new files, so the baseline
/// does too.
fn raw_pipeline(files: &[PathBuf], sink_path: PathBuf) -> anyhow::Result<Run> {
    let listener = TcpListener::bind("127.0.0.1:0")?;
    let addr = listener.local_addr()?;
    let receiver = std::thread::spawn(move || -> anyhow::Result<u64> {
        let (mut stream, _) = listener.accept()?;
        let file = OpenOptions::new()
            .create(true)
            .write(true)
            .truncate(true)
            .open(&sink_path)?;
        let mut buf = vec![0u8; 1 << 20];
        let (mut total, mut since_sync) = (0u64, 0u64);
        loop {
            let n = stream.read(&mut buf)?;
            if n == 0 {
                break;
            }
            file.write_all_at(&buf[..n], total)?;
            total += n as u64;
            since_sync += n as u64;
            if since_sync >= 16 << 20 {
                file.sync_data()?;
                since_sync = 0;
            }
        }
        file.sync_data()?;
        Ok(total)
    });
    let start = Instant::now();
    let before = usage()?;
    let mut stream = TcpStream::connect(addr)?;
    stream.set_nodelay(true)?;
    let mut buf = vec![0u8; 1 << 20];
    for path in files {
        let file = File::open(path)?;
        let mut offset = 0;
        loop {
            let n = file.read_at(&mut buf, offset)?;
            if n == 0 {
                break;
            }
            stream.write_all(&buf[..n])?;
            offset += n as u64;
        }
    }
    drop(stream);
    let total = receiver
        .join()
        .map_err(|_| anyhow::anyhow!("receiver panicked"))??;
    Ok(Run {
        bytes: total,
        took: start.elapsed(),
        spent: usage()?.minus(&before),
    })
}

/// A loopback cluster for one benchmark, its data in a directory of its own.
struct Setup {
    cluster: LoopbackCluster,
}

/// A wait no benchmark should reach.
const PATIENCE: Duration = Duration::from_secs(3600);

impl Setup {
    async fn start(
        dir: &Path,
        mode: CommitMode,
        servers: &[&str],
        blocks: u64,
        tuning: Tuning,
    ) -> anyhow::Result<Self> {
        let cluster = LoopbackCluster::start(ClusterOptions {
            cluster: "bench".into(),
            mode,
            tuning,
            store: StoreOptions {
                segment_bytes: 64 << 20,
                ..StoreOptions::new(blocks)
            },
            // As in production: the replica checkpoints what is committed every
            // 64 MiB, which also bounds the blocks it keeps in memory.
            replica_checkpoint_every: 16 * 1024,
            dir: Some(dir.to_path_buf()),
            ..ClusterOptions::new("bench", blocks).with_replicas(servers)
        })
        .await?;
        cluster.wait_all_in_sync(PATIENCE).await?;
        Ok(Self { cluster })
    }

    fn primary(&self) -> &VolumeHandle {
        &self.cluster.primary
    }

    /// WAL syncs so far: the primary's, then each replica's.
    async fn wal_syncs(&self) -> anyhow::Result<Vec<u64>> {
        let mut syncs = Vec::new();
        let replicas = self
            .cluster
            .replicas
            .iter()
            .filter_map(|n| n.handle.as_ref());
        for volume in std::iter::once(self.primary()).chain(replicas) {
            syncs.push(match volume.status().await? {
                NodeStatus::Primary(status) => status.wal_syncs,
                NodeStatus::Replica(status) => status.wal_syncs,
                NodeStatus::Peering(_) => 0,
            });
        }
        Ok(syncs)
    }

    /// Writes `blocks` blocks, 64 in flight, and waits for their commit.
    async fn fill(&self, blocks: u64) -> anyhow::Result<()> {
        self.cluster
            .write_blocks_in_flight(0, blocks, 64, |_| {})
            .await?;
        self.primary().barrier().await?;
        Ok(())
    }

    /// Restarts `server` on its address and times its recovery (then checks
    /// its content, untimed).
    async fn recover(&mut self, server: &str) -> anyhow::Result<Run> {
        let primary = self.primary().clone();
        let before = primary.bytes_sent(server).await?;
        let start = Instant::now();
        let used = usage()?;
        self.cluster
            .restart_replica(server, false)
            .await
            .context("replica restart")?;
        primary.heartbeat().await?;
        self.cluster
            .wait_state(server, ReplicaState::InSync, PATIENCE)
            .await?;
        let took = start.elapsed();
        let spent = usage()?.minus(&used);
        let bytes = primary.bytes_sent(server).await? - before;
        ensure!(
            primary.content_checksum().await?
                == self.cluster.replica(server).content_checksum().await?,
            "{server} differs after recovery"
        );
        Ok(Run { bytes, took, spent })
    }

    async fn stop(self) {
        self.cluster.shutdown().await;
    }
}

fn segment_files(dir: &Path) -> anyhow::Result<Vec<PathBuf>> {
    let mut files: Vec<PathBuf> = fs::read_dir(dir)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "wal"))
        .collect();
    files.sort();
    Ok(files)
}

fn report(
    name: &str,
    ours: f64,
    base: f64,
    unit: &str,
    target: &str,
    out: &mut impl Write,
) -> anyhow::Result<()> {
    writeln!(out, "{name}: walship {ours:.1} {unit}, baseline {base:.1} {unit}, ratio {:.2}x (target {target})", ours / base)?;
    Ok(())
}

/// One timed transfer.
#[derive(Debug, Clone)]
struct Run {
    bytes: u64,
    took: Duration,
    /// What the whole process spent during the run.
    spent: Usage,
}

impl Run {
    fn rate(&self) -> f64 {
        mib_per_s(self.bytes, self.took)
    }

    fn gib(&self) -> f64 {
        self.bytes as f64 / (1u64 << 30) as f64
    }

    /// CPU seconds per GiB moved.
    fn cpu_per_gib(&self) -> f64 {
        (self.spent.user + self.spent.system).as_secs_f64() / self.gib()
    }

    fn user_per_gib(&self) -> f64 {
        self.spent.user.as_secs_f64() / self.gib()
    }

    fn system_per_gib(&self) -> f64 {
        self.spent.system.as_secs_f64() / self.gib()
    }

    /// Bytes through read and write syscalls (`rchar` + `wchar`) per byte
    /// moved: the copies the syscalls make, whatever the page state. The
    /// kernel counts read/pread/readv and write/pwrite/writev, not
    /// send/recv (std's sockets) nor io_uring: walship's vectored socket
    /// writes count, the raw pipeline's sends do not.
    fn syscall_bytes_per_byte(&self) -> f64 {
        (self.spent.io.rchar + self.spent.io.wchar) as f64 / self.bytes as f64
    }

    /// Read and write syscalls (`syscr` + `syscw`) per MiB moved.
    fn syscalls_per_mib(&self) -> f64 {
        (self.spent.io.syscr + self.spent.io.syscw) as f64 / (self.bytes as f64 / 1048576.0)
    }
}

/// Touches `bytes` of anonymous memory and frees it, so the run that
/// follows finds that many recently freed pages. On this VM a page the
/// guest freed long ago (and handed back to the host) costs ~3 ms/MiB to
/// touch again, a page freed just now nothing extra: whichever side of P1/P2
/// ran on the other's freed pages looked 4x cheaper. Every run, either
/// side, gets the same pre-touch, more than either writes.
fn pretouch(bytes: u64) {
    let pages = vec![1u8; bytes as usize];
    std::hint::black_box(&pages);
}

/// Alternates the raw pipeline with walship recovering each of `servers`
/// (stopped, equally far behind), so both see the same drift of this VM's
/// disk and page cache. Returns (raw runs, walship runs).
async fn alternate(
    setup: &mut Setup,
    servers: &[&str],
    files: &[PathBuf],
    dir: &Path,
) -> anyhow::Result<(Vec<Run>, Vec<Run>)> {
    let (mut raw, mut ours) = (Vec::new(), Vec::new());
    // Three times what is moved: walship's replica writes it twice (WAL,
    // then extent), the raw sink once.
    let mut touch = 0;
    for file in files {
        touch += 3 * fs::metadata(file)?.len();
    }
    for (i, server) in servers.iter().enumerate() {
        // Whoever goes first inherits the pages freed just before (see
        // `raw_pipeline`), so the order alternates too.
        let sink = dir.join(format!("raw-sink-{server}.dat"));
        if i % 2 == 0 {
            pretouch(touch);
            raw.push(raw_pipeline(files, sink)?);
            pretouch(touch);
            ours.push(setup.recover(server).await?);
        } else {
            pretouch(touch);
            ours.push(setup.recover(server).await?);
            pretouch(touch);
            raw.push(raw_pipeline(files, sink)?);
        }
    }
    Ok((raw, ours))
}

fn report_transfer(
    name: &str,
    raw: &[Run],
    ours: &[Run],
    out: &mut impl Write,
) -> anyhow::Result<()> {
    let list = |runs: &[Run], f: fn(&Run) -> f64| {
        runs.iter()
            .map(|r| format!("{:.2}", f(r)))
            .collect::<Vec<_>>()
            .join(" / ")
    };
    writeln!(
        out,
        "{name}: {:.0} MiB per run, alternating; MiB/s walship {} raw {}; CPU s/GiB walship {} raw {}",
        ours[0].bytes as f64 / 1048576.0,
        list(ours, Run::rate),
        list(raw, Run::rate),
        list(ours, Run::cpu_per_gib),
        list(raw, Run::cpu_per_gib),
    )?;
    let cpu = |runs: &[Run]| median(runs.iter().map(Run::cpu_per_gib).collect());
    writeln!(
        out,
        "{name} CPU: walship {:.2} s/GiB, raw pipeline {:.2} s/GiB (medians): {:.2}x the raw CPU",
        cpu(ours),
        cpu(raw),
        cpu(ours) / cpu(raw)
    )?;
    // Figures that do not depend on page state, medians, walship / raw.
    let both = |f: fn(&Run) -> f64| {
        let (o, r) = (
            median(ours.iter().map(f).collect()),
            median(raw.iter().map(f).collect()),
        );
        if r > 0.0 {
            format!("{o:.2} / {r:.2} ({:.2}x)", o / r)
        } else {
            // Below the 10 ms tick of /proc/self/stat.
            format!("{o:.2} / {r:.2}")
        }
    };
    writeln!(
        out,
        "{name} per GiB, walship / raw (medians): user CPU s {}; system CPU s {}; read+write syscall bytes per byte moved {}; read+write syscalls per MiB {}",
        both(Run::user_per_gib),
        both(Run::system_per_gib),
        both(Run::syscall_bytes_per_byte),
        both(Run::syscalls_per_mib),
    )?;
    let rate = |runs: &[Run]| median(runs.iter().map(Run::rate).collect());
    report(
        name,
        rate(ours),
        rate(raw),
        "MiB/s (medians)",
        ">= 0.9x",
        out,
    )
}

/// Six replicas: the measurement alternates with the baseline in both
/// orders, and six runs a side keep the median CPU ratio within ±10%
/// across benches (four did not: P1 1.89-2.54x).
const TRANSFER_REPLICAS: [&str; 6] = ["r1", "r2", "r3", "r4", "r5", "r6"];

async fn p1(options: &BenchOptions, dir: &Path, out: &mut impl Write) -> anyhow::Result<()> {
    let blocks = options.size_mib * 256;
    let volume_blocks = blocks.min(256 * 256);
    let tuning = {
        let mut made = Tuning::default();
        made.checkpoint_every_lsns = u64::MAX;
        made
    };
    let servers = TRANSFER_REPLICAS;
    let mut setup =
        Setup::start(dir, CommitMode::BestEffort, &servers, volume_blocks, tuning).await?;
    for server in servers {
        setup.cluster.stop_replica(server).await;
    }
    setup.fill(blocks).await?;
    let files = segment_files(&setup.cluster.primary_dir.join("wal"))?;
    let (raw, ours) = alternate(&mut setup, &servers, &files, dir).await?;
    report_transfer("P1 catch-up", &raw, &ours, out)?;
    setup.stop().await;
    Ok(())
}

async fn p2(options: &BenchOptions, dir: &Path, out: &mut impl Write) -> anyhow::Result<()> {
    let blocks = options.size_mib * 256;
    // Replaced disks hold nothing: no retention hold keeps the WAL for them,
    // so the checkpoint below recycles it and each comes back by full base.
    let tuning = {
        let mut made = Tuning::default();
        made.checkpoint_every_lsns = u64::MAX;
        made.snapshot_rebuilds = false;
        made.retention_max_bytes = Some(0);
        made
    };
    let servers = TRANSFER_REPLICAS;
    let mut setup = Setup::start(dir, CommitMode::BestEffort, &servers, blocks, tuning).await?;
    for server in servers {
        setup.cluster.stop_replica(server).await;
        // A replaced disk: nothing left.
        fs::remove_dir_all(&setup.cluster.node(server).dir)?;
    }
    setup.fill(blocks).await?;
    setup.primary().checkpoint().await?;
    let extent = fs::read_dir(&setup.cluster.primary_dir)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .find(|p| {
            p.file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with("extent."))
        })
        .context("extent file")?;
    let (raw, ours) = alternate(&mut setup, &servers, &[extent], dir).await?;
    let log = setup.primary().recovery_log().await?;
    let full_bases = log
        .iter()
        .filter(|e| e.event == "plan_rebuild_full_base")
        .count();
    ensure!(
        full_bases >= servers.len(),
        "P2 ran {full_bases} full-base rebuilds, expected {}",
        servers.len()
    );
    report_transfer("P2 full base", &raw, &ours, out)?;
    setup.stop().await;
    Ok(())
}

/// Completed operations: each one's latency, and the wall time they took.
#[derive(Debug, Default)]
struct Latencies {
    all: Vec<Duration>,
    took: Duration,
    /// What the process spent meanwhile (every thread).
    spent: Usage,
    /// WAL syncs each node issued meanwhile: the primary, then its
    /// replicas (empty for the hand-written baseline).
    syncs: Vec<u64>,
}

impl Latencies {
    fn new(mut all: Vec<Duration>, took: Duration) -> Self {
        all.sort();
        Self {
            all,
            took,
            spent: Usage::default(),
            syncs: Vec::new(),
        }
    }

    fn merge(&mut self, other: Latencies) {
        self.all.extend(other.all);
        self.all.sort();
        self.took += other.took;
        self.spent = self.spent.plus(&other.spent);
        self.syncs
            .resize(self.syncs.len().max(other.syncs.len()), 0);
        for (sum, n) in self.syncs.iter_mut().zip(other.syncs) {
            *sum += n;
        }
    }

    /// CPU (user + system) and context switches per operation, the
    /// switches by thread name.
    fn per_op(&self) -> String {
        let n = self.all.len().max(1) as f64;
        let by_thread: Vec<String> = self
            .spent
            .switches
            .iter()
            .filter(|(_, count)| **count as f64 / n >= 0.05)
            .map(|(name, count)| format!("{name} {:.1}", *count as f64 / n))
            .collect();
        let syncs = if self.syncs.is_empty() {
            String::new()
        } else {
            let each: Vec<String> = self
                .syncs
                .iter()
                .map(|s| format!("{:.2}", *s as f64 / n))
                .collect();
            format!(
                "; WAL syncs per write, primary then replicas: {}",
                each.join(", ")
            )
        };
        format!(
            "CPU {:.0} µs user + {:.0} µs system, {:.1} context switches per write ({}){syncs}",
            self.spent.user.as_secs_f64() * 1e6 / n,
            self.spent.system.as_secs_f64() * 1e6 / n,
            self.spent.switches.values().sum::<u64>() as f64 / n,
            by_thread.join(", ")
        )
    }

    fn iops(&self) -> f64 {
        self.all.len() as f64 / self.took.as_secs_f64()
    }

    fn p50(&self) -> Duration {
        self.all[self.all.len() / 2]
    }

    fn p99(&self) -> Duration {
        self.all[(self.all.len() * 99 / 100).min(self.all.len() - 1)]
    }
}

/// `run`'s latencies with what the process spent meanwhile.
async fn measured(
    setup: &Setup,
    run: impl std::future::Future<Output = anyhow::Result<Latencies>>,
) -> anyhow::Result<Latencies> {
    let syncs = setup.wal_syncs().await?;
    let before = usage()?;
    let mut latencies = run.await?;
    latencies.spent = usage()?.minus(&before);
    let after = setup.wal_syncs().await?;
    latencies.syncs = after.iter().zip(syncs).map(|(a, b)| a - b).collect();
    Ok(latencies)
}

/// [`fua_write_load`] from the bench's tokio runtime, or, `on_volumes`, from
/// the thread of the volumes' actors.
async fn writers(
    setup: &Setup,
    ops: u64,
    depth: u64,
    on_volumes: bool,
) -> anyhow::Result<Latencies> {
    if !on_volumes {
        return fua_write_load(setup.primary(), ops, depth).await;
    }
    let primary = setup.primary().clone();
    let (tx, rx) = tokio::sync::oneshot::channel();
    setup.cluster.rt.volume_thread().spawn(async move {
        let _ = tx.send(
            fua_write_load(&primary, ops, depth)
                .await
                .map_err(|e| e.to_string()),
        );
    });
    rx.await?.map_err(|e| anyhow::anyhow!(e))
}

async fn fua_write_load(primary: &VolumeHandle, ops: u64, depth: u64) -> anyhow::Result<Latencies> {
    let per_task = ops / depth;
    let start = Instant::now();
    let tasks: Vec<_> = (0..depth)
        .map(|task| {
            let primary = primary.clone();
            tokio::spawn(async move {
                let data = Bytes::from(vec![0x11u8; BLOCK_SIZE]);
                let mut latencies = Vec::with_capacity(per_task as usize);
                for i in 0..per_task {
                    let t = Instant::now();
                    // A FUA write: resolves once committed under the mode.
                    primary
                        .write_committed((task * per_task + i) % 4096, data.clone())
                        .await?;
                    latencies.push(t.elapsed());
                }
                Ok::<_, walship_actors::VolumeError>(latencies)
            })
        })
        .collect();
    let mut all = Vec::new();
    for task in tasks {
        all.extend(task.await??);
    }
    Ok(Latencies::new(all, start.elapsed()))
}

/// Slots of the P4 baseline's files: writes wrap around them.
const RAW_SLOTS: u64 = 4096;

/// A new file for the P4 baseline, its `RAW_SLOTS` blocks written with
/// zeroes and synced: its writes then overwrite allocated blocks, as
/// walship's WAL appends do into the zeroes it writes ahead.
fn zeroed_file(path: &Path) -> anyhow::Result<File> {
    let file = OpenOptions::new()
        .create(true)
        .write(true)
        .truncate(true)
        .open(path)?;
    file.write_all_at(&vec![0u8; (RAW_SLOTS as usize) * BLOCK_SIZE], 0)?;
    file.sync_all()?;
    Ok(file)
}

/// One raw replica for the P4 device baseline: reads 4 KiB writes, writes
/// and fdatasyncs each, acks it with one byte (and with one when its file
/// is ready).
fn raw_ack_receiver(listener: TcpListener, path: PathBuf) -> anyhow::Result<()> {
    let (mut stream, _) = listener.accept()?;
    stream.set_nodelay(true)?;
    let file = zeroed_file(&path)?;
    stream.write_all(&[1])?;
    let mut block = vec![0u8; BLOCK_SIZE];
    let mut slot = 0u64;
    while stream.read_exact(&mut block).is_ok() {
        file.write_all_at(&block, (slot % RAW_SLOTS) * BLOCK_SIZE as u64)?;
        file.sync_data()?;
        stream.write_all(&[1])?;
        slot += 1;
    }
    Ok(())
}

/// The smallest synchronous 3-way replication, hand-written: each 4 KiB
/// write goes to two raw replicas over loopback while the writer writes and
/// fdatasyncs it locally, and completes when all three are durable. Same
/// disk, same fsync count as walship's sync_all at QD1, nothing else; the
/// gap between it and the local run is what the one disk costs.
fn raw_replicated_qd1(dir: &Path, ops: u64) -> anyhow::Result<Latencies> {
    let mut streams = Vec::new();
    let mut receivers = Vec::new();
    for r in 0..2 {
        let listener = TcpListener::bind("127.0.0.1:0")?;
        let addr = listener.local_addr()?;
        let path = dir.join(format!("p4-raw-replica-{r}.dat"));
        receivers.push(std::thread::spawn(move || raw_ack_receiver(listener, path)));
        let stream = TcpStream::connect(addr)?;
        stream.set_nodelay(true)?;
        streams.push(stream);
    }
    let file = zeroed_file(&dir.join("p4-raw-primary.dat"))?;
    for stream in &mut streams {
        let mut ready = [0u8; 1];
        stream.read_exact(&mut ready)?;
    }
    let block = vec![0x11u8; BLOCK_SIZE];
    let mut latencies = Vec::with_capacity(ops as usize);
    let before = usage()?;
    let start = Instant::now();
    for i in 0..ops {
        let t = Instant::now();
        for stream in &mut streams {
            stream.write_all(&block)?;
        }
        file.write_all_at(&block, (i % RAW_SLOTS) * BLOCK_SIZE as u64)?;
        file.sync_data()?;
        let mut ack = [0u8; 1];
        for stream in &mut streams {
            stream.read_exact(&mut ack)?;
        }
        latencies.push(t.elapsed());
    }
    let took = start.elapsed();
    // Before the replica threads end and take their counts with them.
    let spent = usage()?.minus(&before);
    drop(streams);
    for receiver in receivers {
        receiver
            .join()
            .map_err(|_| anyhow::anyhow!("raw replica panicked"))??;
    }
    let mut latencies = Latencies::new(latencies, took);
    latencies.spent = spent;
    Ok(latencies)
}

/// Rounds P4 splits each workload into; the order of the runs rotates
/// every round, so the disk's drift (2x on this VM) hits all of them alike.
const P4_ROUNDS: u64 = 4;

async fn p4(options: &BenchOptions, dir: &Path, out: &mut impl Write) -> anyhow::Result<()> {
    let on_thread = options.p4_on_volume_thread;
    if on_thread {
        writeln!(out, "P4 writers on the volumes' thread")?;
    }
    for depth in [1u64, 32] {
        let ops = options.p4_ops * if depth == 1 { 1 } else { 4 };
        let per_round = (ops / P4_ROUNDS).max(depth);
        let local = Setup::start(
            &dir.join(format!("p4-local-{depth}")),
            CommitMode::SyncAll,
            &[],
            4096,
            Tuning::default(),
        )
        .await?;
        let replicated = Setup::start(
            &dir.join(format!("p4-repl-{depth}")),
            CommitMode::SyncAll,
            &["r1", "r2"],
            4096,
            Tuning::default(),
        )
        .await?;
        // The hand-written baseline is a single writer: QD1 only.
        let runs = if depth == 1 { 3 } else { 2 };
        let mut results: Vec<Latencies> = (0..runs).map(|_| Latencies::default()).collect();
        for round in 0..P4_ROUNDS {
            for k in 0..runs {
                let which = (round as usize + k) % runs;
                let samples = match which {
                    0 => measured(&local, writers(&local, per_round, depth, on_thread)).await?,
                    1 => {
                        let run = writers(&replicated, per_round, depth, on_thread);
                        measured(&replicated, run).await?
                    }
                    _ => raw_replicated_qd1(dir, per_round)?,
                };
                results[which].merge(samples);
            }
        }
        local.stop().await;
        replicated.stop().await;
        let (base, ours) = (&results[0], &results[1]);
        // The targets: 25% at QD1, 15% at QD32 (group commit).
        let target = if depth == 1 { 25 } else { 15 };
        writeln!(
            out,
            "P4 QD{depth}: replicated {:.0} IOPS p50 {:?} p99 {:?}; local {:.0} IOPS p50 {:?} p99 {:?}; tax {:.0}% (target <= {target}%; {P4_ROUNDS} alternating rounds)",
            ours.iops(), ours.p50(), ours.p99(), base.iops(), base.p50(), base.p99(), (1.0 - ours.iops() / base.iops()) * 100.0
        )?;
        writeln!(out, "P4 QD{depth} replicated: {}", ours.per_op())?;
        writeln!(out, "P4 QD{depth} local: {}", base.per_op())?;
        if let Some(raw) = results.get(2) {
            writeln!(
                out,
                "P4 QD{depth} device baseline: hand-written 3-way sync replication {:.0} IOPS p50 {:?} p99 {:?} (its own tax vs local {:.0}%); walship vs it: {:.2}x IOPS",
                raw.iops(), raw.p50(), raw.p99(), (1.0 - raw.iops() / base.iops()) * 100.0, ours.iops() / raw.iops()
            )?;
            writeln!(out, "P4 QD{depth} hand-written: {}", raw.per_op())?;
        }
    }
    Ok(())
}

/// P4 on a volume that slept: QD1 FUA writes to a replicated sync_all
/// volume, each made once the volume fell asleep (its replicas hold
/// everything; it arms no timer, its senders send nothing), against the
/// same writes on a volume that may not sleep (`Tuning::quiesce` off),
/// made after the same idle gap (so both pay what idle threads cost this
/// machine), and against a busy volume; alternated round by round. A
/// write that wakes a volume should cost no more than one extra wake
/// (target: p50 within 10% of the awake volume's).
async fn p4q(options: &BenchOptions, dir: &Path, out: &mut impl Write) -> anyhow::Result<()> {
    const ROUNDS: u64 = 6;
    const GAPPED_PER_ROUND: usize = 10;
    /// Past two heartbeats (400 ms): long enough for a volume to sleep.
    const GAP: Duration = Duration::from_millis(600);
    let start = |name: &str, quiesce: bool| {
        let mut tuning = Tuning::default();
        tuning.quiesce = quiesce;
        let dir = dir.join(name);
        async move { Setup::start(&dir, CommitMode::SyncAll, &["r1", "r2"], 4096, tuning).await }
    };
    let sleeping = start("sleeping", true).await?;
    let awake = start("awake", false).await?;
    let busy_per_round = (options.p4_ops / ROUNDS).max(50);
    let mut busy = Latencies::default();
    let (mut woken, mut idle) = (Vec::new(), Vec::new());
    let data = Bytes::from(vec![0x22u8; BLOCK_SIZE]);
    let began = Instant::now();
    for round in 0..ROUNDS {
        for k in 0..3 {
            match (round + k) % 3 {
                0 => busy.merge(fua_write_load(awake.primary(), busy_per_round, 1).await?),
                1 => {
                    for i in 0..GAPPED_PER_ROUND {
                        tokio::time::sleep(GAP).await;
                        asleep(sleeping.primary()).await?;
                        let t = Instant::now();
                        sleeping
                            .primary()
                            .write_committed(i as u64, data.clone())
                            .await?;
                        woken.push(t.elapsed());
                    }
                }
                _ => {
                    for i in 0..GAPPED_PER_ROUND {
                        tokio::time::sleep(GAP).await;
                        let t = Instant::now();
                        awake
                            .primary()
                            .write_committed(i as u64, data.clone())
                            .await?;
                        idle.push(t.elapsed());
                    }
                }
            }
        }
    }
    let woken = Latencies::new(woken, began.elapsed());
    let idle = Latencies::new(idle, began.elapsed());
    sleeping.stop().await;
    awake.stop().await;
    writeln!(
        out,
        "P4q QD1, {} writes each {GAP:?} after the last: on a volume that slept p50 {:?} p99 {:?}; \
         on one kept awake p50 {:?} p99 {:?}; ratio of p50s {:.3} (target <= 1.10); \
         busy (back to back) p50 {:?} p99 {:?}; {ROUNDS} alternating rounds",
        woken.all.len(),
        woken.p50(),
        woken.p99(),
        idle.p50(),
        idle.p99(),
        woken.p50().as_secs_f64() / idle.p50().as_secs_f64(),
        busy.p50(),
        busy.p99(),
    )?;
    Ok(())
}

/// Waits until `primary` sleeps (within 10 s).
async fn asleep(primary: &VolumeHandle) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if let walship_actors::NodeStatus::Primary(status) = primary.status().await? {
            if status.asleep {
                return Ok(());
            }
        }
        if Instant::now() > deadline {
            bail!("the volume did not fall asleep within 10 s");
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[derive(Debug)]
struct Count(u64);

impl actix::Actor for Count {
    type Context = actix::Context<Self>;
}

#[derive(Debug, actix::Message)]
#[rtype(result = "u64")]
struct Ping;

impl actix::Handler<Ping> for Count {
    type Result = u64;
    fn handle(&mut self, _: Ping, _: &mut actix::Context<Self>) -> u64 {
        self.0 += 1;
        self.0
    }
}

/// Alternating runs of each P5 mailbox.
const P5_RUNS: usize = 7;

async fn p5(options: &BenchOptions, dir: &Path, out: &mut impl Write) -> anyhow::Result<()> {
    let n = options.p5_messages;
    // Bare tokio mpsc.
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<u64>();
    let start = Instant::now();
    let consumer = tokio::spawn(async move {
        let mut seen = 0;
        while rx.recv().await.is_some() {
            seen += 1;
        }
        seen
    });
    for i in 0..n {
        tx.send(i)?;
    }
    drop(tx);
    ensure!(consumer.await? == n, "mpsc lost messages");
    let mpsc = start.elapsed();

    let setup = Setup::start(
        dir,
        CommitMode::BestEffort,
        &["r1"],
        1024,
        Tuning::default(),
    )
    .await?;
    // Bare actix actor on the same system.
    let (tx, rx) = tokio::sync::oneshot::channel();
    let spawned = setup.cluster.rt.arbiter().spawn(async move {
        let _ = tx.send(actix::Actor::start(Count(0)));
    });
    let addr = if spawned {
        rx.await?
    } else {
        bail!("no actix system on this thread")
    };
    // The SenderActor of an InSync replica, through its metered mailbox.
    let sender = setup
        .primary()
        .sender(ReplicaId::new("bench", "r1")?)
        .await
        .context("sender")?;
    // Runs of each, alternating: one run of either can lose or gain 2-4x
    // on this VM (1.4 to 9.8 M msg/s seen within one bench).
    let (mut bares, mut ourses) = (Vec::new(), Vec::new());
    let mut expected = 0;
    for _ in 0..P5_RUNS {
        let start = Instant::now();
        for _ in 0..n {
            addr.do_send(Ping);
        }
        expected += n + 1;
        ensure!(addr.send(Ping).await? == expected, "actix lost messages");
        bares.push(start.elapsed());
        let before = sender.metrics().snapshot().handled;
        let start = Instant::now();
        for _ in 0..n {
            sender.do_send(SenderHeartbeat { epoch: 1 });
        }
        sender.send(SenderHeartbeat { epoch: 1 }).await?;
        ourses.push(start.elapsed());
        let handled = sender.metrics().snapshot().handled - before;
        ensure!(handled > n, "sender handled {handled} of {}", n + 1);
    }
    let list = |runs: &[Duration]| {
        runs.iter()
            .map(|d| format!("{:.2}", n as f64 / d.as_secs_f64() / 1e6))
            .collect::<Vec<_>>()
            .join(" / ")
    };
    writeln!(
        out,
        "P5 runs, M msg/s: SenderActor {}; bare actix {}",
        list(&ourses),
        list(&bares)
    )?;
    // Each SenderActor run against the bare run just before it: neighbours
    // share the machine's mood; the median of those ratios is the figure.
    let pair_ratio = median(
        bares
            .iter()
            .zip(&ourses)
            .map(|(bare, ours)| bare.as_secs_f64() / ours.as_secs_f64())
            .collect(),
    );
    bares.sort();
    ourses.sort();
    let (bare, ours) = (bares[bares.len() / 2], ourses[ourses.len() / 2]);
    let rate = |d: Duration| n as f64 / d.as_secs_f64() / 1e6;
    writeln!(out, "P5 mailbox (medians of {P5_RUNS} alternating runs): SenderActor {:.2} M msg/s, bare actix {:.2} M msg/s, bare tokio mpsc {:.2} M msg/s", rate(ours), rate(bare), rate(mpsc))?;
    writeln!(
        out,
        "P5 vs bare actix: median of paired ratios {pair_ratio:.2}x (target >= 0.9x); ratio of medians {:.2}x",
        rate(ours) / rate(bare)
    )?;
    setup.stop().await;
    Ok(())
}

/// Resident set size and thread count of this process, from /proc.
fn rss_and_threads() -> anyhow::Result<(u64, u64)> {
    let status = fs::read_to_string("/proc/self/status")?;
    let field = |name: &str| -> anyhow::Result<u64> {
        let line = status
            .lines()
            .find(|l| l.starts_with(name))
            .context("proc status field")?;
        Ok(line.split_whitespace().nth(1).context("value")?.parse()?)
    };
    Ok((field("VmRSS:")? * 1024, field("Threads:")?))
}

/// CPU time (user + system) this process has used.
fn cpu_time() -> anyhow::Result<Duration> {
    let used = usage()?;
    Ok(used.user + used.system)
}

/// What a process used: CPU by mode, and context switches (voluntary and
/// not) by thread name.
#[derive(Debug, Default, Clone)]
struct Usage {
    user: Duration,
    system: Duration,
    switches: BTreeMap<String, u64>,
    io: IoCounts,
}

/// `/proc/self/io`'s syscall counters (every thread, ended ones too).
#[derive(Debug, Default, Clone, Copy)]
struct IoCounts {
    /// Bytes read through read-family syscalls.
    rchar: u64,
    /// Bytes written through write-family syscalls.
    wchar: u64,
    /// Read-family syscalls.
    syscr: u64,
    /// Write-family syscalls.
    syscw: u64,
}

impl IoCounts {
    fn read() -> anyhow::Result<Self> {
        let text = fs::read_to_string("/proc/self/io")?;
        let field = |name: &str| -> anyhow::Result<u64> {
            let line = text
                .lines()
                .find_map(|l| l.strip_prefix(name))
                .with_context(|| format!("{name} in /proc/self/io"))?;
            Ok(line.trim().parse()?)
        };
        Ok(Self {
            rchar: field("rchar:")?,
            wchar: field("wchar:")?,
            syscr: field("syscr:")?,
            syscw: field("syscw:")?,
        })
    }

    fn combine(self, other: Self, f: fn(u64, u64) -> u64) -> Self {
        Self {
            rchar: f(self.rchar, other.rchar),
            wchar: f(self.wchar, other.wchar),
            syscr: f(self.syscr, other.syscr),
            syscw: f(self.syscw, other.syscw),
        }
    }
}

impl Usage {
    fn plus(&self, other: &Usage) -> Usage {
        let mut switches = self.switches.clone();
        for (name, count) in &other.switches {
            *switches.entry(name.clone()).or_default() += count;
        }
        Usage {
            user: self.user + other.user,
            system: self.system + other.system,
            switches,
            io: self.io.combine(other.io, u64::saturating_add),
        }
    }

    fn minus(&self, before: &Usage) -> Usage {
        let switches = self
            .switches
            .iter()
            .map(|(name, count)| {
                let was = before.switches.get(name).copied().unwrap_or(0);
                (name.clone(), count.saturating_sub(was))
            })
            .collect();
        Usage {
            user: self.user.saturating_sub(before.user),
            system: self.system.saturating_sub(before.system),
            switches,
            io: self.io.combine(before.io, u64::saturating_sub),
        }
    }
}

/// This process's [`Usage`] so far: CPU from `/proc/self/stat` (ended
/// threads included, in 10 ms ticks), context switches summed over the
/// threads alive now (`/proc/self/task/*/status`: measure before a
/// thread of interest ends).
fn usage() -> anyhow::Result<Usage> {
    let stat = fs::read_to_string("/proc/self/stat")?;
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .context("stat")?
        .1
        .split_whitespace()
        .collect();
    // USER_HZ is 100 on Linux.
    let ticks = |i: usize| -> anyhow::Result<Duration> {
        Ok(Duration::from_millis(fields[i].parse::<u64>()? * 10))
    };
    let mut switches = BTreeMap::new();
    for task in fs::read_dir("/proc/self/task")? {
        let task = task?.path();
        // A thread may end between the listing and the reads.
        let (Ok(status), Ok(name)) = (
            fs::read_to_string(task.join("status")),
            fs::read_to_string(task.join("comm")),
        ) else {
            continue;
        };
        // Pool threads by their pool's name (comm keeps 15 bytes).
        let name = name
            .trim()
            .trim_end_matches(|c: char| c.is_ascii_digit() || c == '-');
        for line in status.lines() {
            if let Some(n) = line
                .strip_prefix("voluntary_ctxt_switches:")
                .or_else(|| line.strip_prefix("nonvoluntary_ctxt_switches:"))
            {
                *switches.entry(name.to_owned()).or_default() += n.trim().parse::<u64>()?;
            }
        }
    }
    Ok(Usage {
        user: ticks(11)?,
        system: ticks(12)?,
        switches,
        io: IoCounts::read()?,
    })
}

/// Open file descriptors of this process.
fn open_fds() -> anyhow::Result<u64> {
    Ok(fs::read_dir("/proc/self/fd")?.count() as u64)
}

/// Raises this process's open-file limit to at least `want`: the soft limit
/// up to the hard one, and the hard one too where permitted (root).
fn raise_fd_limit(want: u64) -> anyhow::Result<u64> {
    let (soft, hard) = rlimit::Resource::NOFILE.get()?;
    if want <= soft {
        return Ok(soft);
    }
    if want > hard && rlimit::Resource::NOFILE.set(want, want).is_ok() {
        return Ok(want);
    }
    let raised = rlimit::increase_nofile_limit(want)?;
    ensure!(
        raised >= want,
        "needs {want} open files, the limit is {raised} (hard {hard}); raise `ulimit -n` or run as root"
    );
    Ok(raised)
}

/// P6 volumes' replica config.
fn p6_replica(dir: &Path, volume: u64, server: &str, store: &StoreOptions) -> VolumeConfig {
    VolumeConfig::Replica({
        let mut made = ReplicaConfig::new(
            ("bench", format!("v{volume}"), server),
            dir.join(format!("v{volume}")).join(server),
            store.clone(),
            "127.0.0.1:0",
        );
        made.checkpoint_every_lsns = 16 * 1024;
        made
    })
}

/// Idle volumes, measured in three steps so the senders' share is visible:
/// replicas (receivers and their stores), then primaries without replicas
/// (volume actors and stores), then the assignment that creates each
/// primary's two senders, which connect and go live.
async fn p6(options: &BenchOptions, dir: &Path, out: &mut impl Write) -> anyhow::Result<()> {
    const SERVERS: [&str; 2] = ["r1", "r2"];
    let volumes = options.p6_volumes;
    // 12 descriptors per volume: 3 stores with a WAL segment and an extent
    // each, 2 replica listeners, 2 connections with both ends here.
    let limit = raise_fd_limit(volumes * 12 + 512)?;
    let rt = Runtime::start()?;
    let tuning = {
        let mut made = Tuning::default();
        made.heartbeat_every_ticks = 100;
        made
    };
    let store = StoreOptions {
        segment_bytes: 1 << 20,
        ..StoreOptions::new(256)
    };
    let (rss_start, threads_start) = rss_and_threads()?;
    let (fds_start, started) = (open_fds()?, Instant::now());
    let mut replicas = Vec::new();
    let mut addrs = Vec::new();
    for v in 0..volumes {
        for server in SERVERS {
            let handle = rt.spawn_volume(p6_replica(dir, v, server, &store)).await?;
            addrs.push(handle.listen_addr().context("addr")?.to_string());
            replicas.push(handle);
        }
    }
    let (rss_replicas, _) = rss_and_threads()?;
    let mut primaries = Vec::new();
    for v in 0..volumes {
        let primary = rt
            .spawn_volume(VolumeConfig::Primary({
                let mut made = PrimaryConfig::new(
                    ("bench", format!("v{v}")),
                    dir.join(format!("v{v}")).join("primary"),
                    store.clone(),
                    1,
                    CommitMode::BestEffort,
                    Vec::new(),
                );
                made.tuning = tuning.clone();
                made
            }))
            .await?;
        primaries.push(primary);
    }
    let (rss_primaries, _) = rss_and_threads()?;
    for (v, primary) in primaries.iter().enumerate() {
        let replicas = SERVERS
            .iter()
            .zip(&addrs[v * 2..v * 2 + 2])
            .map(|(server, addr)| {
                Ok(ReplicaAssignment {
                    id: ReplicaId::new(&format!("v{v}"), server)?,
                    endpoint: Endpoint::new(addr.clone(), 1),
                })
            })
            .collect::<anyhow::Result<Vec<_>>>()?;
        primary
            .apply_assignment(Assignment {
                epoch: Epoch(1),
                commit_mode: CommitMode::BestEffort,
                replicas,
            })
            .await?;
    }
    for primary in &primaries {
        for server in SERVERS {
            primary
                .wait_replica_state(server, ReplicaState::InSync, Duration::from_secs(1800))
                .await?;
        }
    }
    let setup_took = started.elapsed();
    let (rss_live, threads_live) = rss_and_threads()?;
    let log = primaries[0].recovery_log().await?;
    let log_bytes: usize = log
        .iter()
        .map(|e| {
            std::mem::size_of_val(e)
                + e.detail.capacity()
                + e.replica.as_ref().map_or(0, |r| r.as_str().len())
        })
        .sum();
    let fds = open_fds()? - fds_start;
    let cpu_before = cpu_time()?;
    let idle = Duration::from_secs(10);
    tokio::time::sleep(idle).await;
    let cpu = cpu_time()? - cpu_before;
    let (rss_idle, _) = rss_and_threads()?;
    let kib = |bytes: u64, per: u64| bytes as f64 / 1024.0 / per as f64;
    let senders = volumes * 2;
    writeln!(
        out,
        "P6 scale: {volumes} idle volumes x 2 replicas in one process (set up in {setup_took:.0?}; {fds} fds, limit {limit}; {} threads added in all)",
        threads_live - threads_start
    )?;
    writeln!(
        out,
        "P6 RSS: {:.1} KiB per replica (receiver + store), {:.1} KiB per primary volume (actor + store), {:.1} KiB per sender (actor, mailbox, its live connection at both ends); {:.1} KiB per volume in all, {:.1} after {idle:?} idle",
        kib(rss_replicas.saturating_sub(rss_start), senders),
        kib(rss_primaries.saturating_sub(rss_replicas), volumes),
        kib(rss_live.saturating_sub(rss_primaries), senders),
        kib(rss_live.saturating_sub(rss_start), volumes),
        kib(rss_idle.saturating_sub(rss_start), volumes),
    )?;
    writeln!(
        out,
        "P6 decision trail: {} recovery log events per volume, {:.1} KiB (counted in the senders' share)",
        log.len(),
        kib(log_bytes as u64, 1)
    )?;
    writeln!(
        out,
        "P6 CPU: {:.1}% of one core for {senders} senders' 1 Hz heartbeats and live probes, {:.1} us per sender per second",
        cpu.as_secs_f64() / idle.as_secs_f64() * 100.0,
        cpu.as_secs_f64() * 1e6 / idle.as_secs_f64() / senders as f64,
    )?;
    report(
        "P6 RSS per sender",
        kib(rss_live.saturating_sub(rss_primaries), senders),
        4.0,
        "KiB",
        "<= 4 KiB, i.e. ratio <= 1.0",
        out,
    )?;
    for handle in primaries.iter().chain(&replicas) {
        handle.stop().await;
    }
    rt.shutdown();
    Ok(())
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let mut options = BenchOptions::parse();
    if options.which.is_empty() {
        options.which = ["p1", "p2", "p4", "p5", "p6"].map(String::from).to_vec();
    }
    run(options, &mut std::io::stdout()).await
}

/// Runs the selected benchmarks.
async fn run(options: BenchOptions, out: &mut impl Write) -> anyhow::Result<()> {
    let temp = tempfile::tempdir()?;
    let root = options
        .dir
        .clone()
        .unwrap_or_else(|| temp.path().to_path_buf());
    writeln!(
        out,
        "walship system benchmarks on {} cores; data in {}",
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        root.display()
    )?;
    for which in &options.which {
        let dir = root.join(which);
        fs::create_dir_all(&dir)?;
        match which.as_str() {
            "p1" => p1(&options, &dir, out).await?,
            "p2" => p2(&options, &dir, out).await?,
            "p4" => p4(&options, &dir, out).await?,
            "p4q" => p4q(&options, &dir, out).await?,
            "p5" => p5(&options, &dir, out).await?,
            "p6" => p6(&options, &dir, out).await?,
            other => bail!("unknown benchmark {other}: expected p1, p2, p4, p4q, p5, p6"),
        }
        let _ = fs::remove_dir_all(&dir);
    }
    Ok(())
}
