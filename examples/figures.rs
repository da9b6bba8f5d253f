//! Quick figures for the runtime on this machine (real files, real fsync,
//! loopback TCP): 4 KiB sync_all write+barrier latency with two replicas, and
//! catch-up throughput for a replica 256 MiB behind. The formal benchmarks
//! with same-run baselines are `cargo bench --bench system`.
//!
//! Run: `cargo run --release --example figures`

use std::time::{Duration, Instant};
use walship::actors::testing::{ClusterOptions, LoopbackCluster};
use walship::actors::Tuning;
use walship::engine::{CommitMode, ReplicaState};
use walship::io::{StoreOptions, BLOCK_SIZE};

const BLOCKS: u64 = 65536; // 256 MiB volume
const PATIENCE: Duration = Duration::from_secs(600);

/// A cluster that never checkpoints on its own, every replica in sync.
async fn cluster(mode: CommitMode, servers: &[&str]) -> anyhow::Result<LoopbackCluster> {
    let cluster = LoopbackCluster::start(ClusterOptions {
        cluster: "figures".into(),
        mode,
        tuning: {
            let mut made = Tuning::default();
            made.checkpoint_every_lsns = 1 << 30;
            made
        },
        store: StoreOptions::new(BLOCKS),
        replica_checkpoint_every: 1 << 30,
        ..ClusterOptions::new("vol", BLOCKS).with_replicas(servers)
    })
    .await?;
    cluster.wait_all_in_sync(PATIENCE).await?;
    Ok(cluster)
}

fn percentile(sorted: &[Duration], q: f64) -> Duration {
    sorted[((sorted.len() as f64 * q) as usize).min(sorted.len() - 1)]
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let block = bytes::Bytes::from(vec![0x5Au8; BLOCK_SIZE]);

    let sync_all = cluster(CommitMode::SyncAll, &["r1", "r2"]).await?;
    let mut latencies = Vec::new();
    for i in 0..3000u64 {
        let start = Instant::now();
        sync_all.primary.write(i % BLOCKS, block.clone()).await?;
        sync_all.primary.barrier().await?;
        latencies.push(start.elapsed());
    }
    latencies.sort();
    println!(
        "sync_all 4 KiB write+barrier, 2 replicas, QD1, {} ops: p50 {:?} p99 {:?}",
        latencies.len(),
        percentile(&latencies, 0.50),
        percentile(&latencies, 0.99)
    );
    sync_all.shutdown().await;

    let mut behind = cluster(CommitMode::BestEffort, &["r1"]).await?;
    behind.stop_replica("r1").await;
    for i in 0..BLOCKS {
        behind.primary.write(i, block.clone()).await?;
    }
    behind.primary.barrier().await?;
    let start = Instant::now();
    behind.restart_replica("r1", false).await?;
    behind.primary.heartbeat().await?;
    behind
        .wait_state("r1", ReplicaState::InSync, PATIENCE)
        .await?;
    let elapsed = start.elapsed();
    let mib = (BLOCKS * BLOCK_SIZE as u64) as f64 / (1 << 20) as f64;
    println!(
        "catch-up of {mib:.0} MiB over loopback: {elapsed:?} = {:.0} MiB/s",
        mib / elapsed.as_secs_f64()
    );
    let log = behind.primary.recovery_log().await?;
    let plan = log
        .iter()
        .find(|e| e.event.starts_with("plan_"))
        .map(|e| format!("{} {}", e.event, e.detail));
    println!("plan: {}", plan.unwrap_or_default());
    let converged = behind.wait_converged(PATIENCE).await?;
    println!("converged at lsn {}", converged.lsn);
    behind.shutdown().await;
    Ok(())
}
