//! Quick figures for the runtime on this machine (real files, real fsync,
//! loopback TCP): 4 KiB sync_all write+barrier latency with two replicas, and
//! catch-up throughput for a replica 256 MiB behind. The formal benchmarks
//! with same-run baselines live with the benchmark suite.
//!
//! Run: `cargo run --release --example figures`

use std::path::Path;
use std::time::{Duration, Instant};
use walship::actors::{
    PrimaryConfig, ReplicaConfig, ReplicaSpec, Runtime, Tuning, VolumeConfig, VolumeHandle,
};
use walship::engine::{CommitMode, ReplicaState};
use walship::io::{StoreOptions, BLOCK_SIZE};

const BLOCKS: u64 = 65536; // 256 MiB volume

fn replica_config(server: &str, dir: &Path, listen: &str) -> VolumeConfig {
    VolumeConfig::Replica(ReplicaConfig {
        cluster: "figures".into(),
        volume: "vol".into(),
        server: server.into(),
        dir: dir.join(server),
        store: StoreOptions::new(BLOCKS),
        listen: listen.into(),
        checkpoint_every_lsns: 1 << 30,
    })
}

async fn wait_in_sync(primary: &VolumeHandle, server: &str) -> anyhow::Result<()> {
    Ok(primary
        .wait_replica_state(server, ReplicaState::InSync, Duration::from_secs(600))
        .await?)
}

async fn cluster(
    rt: &Runtime,
    dir: &Path,
    mode: CommitMode,
    servers: &[&str],
) -> anyhow::Result<(VolumeHandle, Vec<VolumeHandle>)> {
    let mut replicas = Vec::new();
    let mut specs = Vec::new();
    for server in servers {
        let handle = rt
            .spawn_volume(replica_config(server, dir, "127.0.0.1:0"))
            .await?;
        specs.push(ReplicaSpec {
            server: server.to_string(),
            addr: handle
                .listen_addr()
                .map(|a| a.to_string())
                .unwrap_or_default(),
            version: 1,
        });
        replicas.push(handle);
    }
    let tuning = Tuning {
        checkpoint_every_lsns: 1 << 30,
        ..Tuning::default()
    };
    let primary = rt
        .spawn_volume(VolumeConfig::Primary(PrimaryConfig {
            cluster: "figures".into(),
            volume: "vol".into(),
            dir: dir.join("primary"),
            store: StoreOptions::new(BLOCKS),
            epoch: 1,
            commit_mode: mode,
            replicas: specs,
            tuning,
        }))
        .await?;
    for server in servers {
        wait_in_sync(&primary, server).await?;
    }
    Ok((primary, replicas))
}

fn percentile(sorted: &[Duration], q: f64) -> Duration {
    sorted[((sorted.len() as f64 * q) as usize).min(sorted.len() - 1)]
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let rt = Runtime::start()?;
    let block = bytes::Bytes::from(vec![0x5Au8; BLOCK_SIZE]);

    let dir = tempfile::tempdir()?;
    let (primary, _replicas) = cluster(&rt, dir.path(), CommitMode::SyncAll, &["r1", "r2"]).await?;
    let mut latencies = Vec::new();
    for i in 0..3000u64 {
        let start = Instant::now();
        primary.write(i % BLOCKS, block.clone()).await?;
        primary.barrier().await?;
        latencies.push(start.elapsed());
    }
    latencies.sort();
    println!(
        "sync_all 4 KiB write+barrier, 2 replicas, QD1, {} ops: p50 {:?} p99 {:?}",
        latencies.len(),
        percentile(&latencies, 0.50),
        percentile(&latencies, 0.99)
    );
    primary.stop().await;

    let dir = tempfile::tempdir()?;
    let (primary, mut replicas) = cluster(&rt, dir.path(), CommitMode::BestEffort, &["r1"]).await?;
    let addr = replicas[0]
        .listen_addr()
        .map(|a| a.to_string())
        .unwrap_or_default();
    replicas[0].stop().await;
    for i in 0..BLOCKS {
        primary.write(i, block.clone()).await?;
    }
    primary.barrier().await?;
    let start = Instant::now();
    replicas[0] = rt
        .spawn_volume(replica_config("r1", dir.path(), &addr))
        .await?;
    primary.heartbeat().await?;
    wait_in_sync(&primary, "r1").await?;
    let elapsed = start.elapsed();
    let mib = (BLOCKS * BLOCK_SIZE as u64) as f64 / (1 << 20) as f64;
    println!(
        "catch-up of {mib:.0} MiB over loopback: {elapsed:?} = {:.0} MiB/s",
        mib / elapsed.as_secs_f64()
    );
    let log = primary.recovery_log().await?;
    let plan = log
        .iter()
        .find(|e| e.event.starts_with("plan_"))
        .map(|e| format!("{} {}", e.event, e.detail));
    println!("plan: {}", plan.unwrap_or_default());
    anyhow::ensure!(
        primary.content_checksum().await? == replicas[0].content_checksum().await?,
        "content differs"
    );
    primary.stop().await;
    rt.shutdown();
    Ok(())
}
