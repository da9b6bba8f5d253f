//! How a storage service embeds walship: a `#[tokio::main]` service starts
//! the runtime (actix runs on its own thread), spawns a replica and a primary
//! on loopback, writes, waits for commit under sync_all, and reads the status.
//!
//! Run: `cargo run --example embed`

use std::time::Duration;
use walship::actors::{PrimaryConfig, ReplicaConfig, ReplicaSpec, Runtime, VolumeConfig};
use walship::engine::{CommitMode, ReplicaState};
use walship::io::{StoreOptions, BLOCK_SIZE};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let runtime = Runtime::start()?;
    let store = StoreOptions::new(1024);

    let replica = runtime
        .spawn_volume(VolumeConfig::Replica(ReplicaConfig::new(
            ("demo", "vol1", "r1"),
            dir.path().join("r1"),
            store.clone(),
            "127.0.0.1:0",
        )))
        .await?;
    let replica_addr = replica
        .listen_addr()
        .map(|a| a.to_string())
        .unwrap_or_default();

    let primary = runtime
        .spawn_volume(VolumeConfig::Primary(PrimaryConfig::new(
            ("demo", "vol1"),
            dir.path().join("primary"),
            store,
            1,
            CommitMode::SyncAll,
            vec![ReplicaSpec::new("r1", replica_addr, 1)],
        )))
        .await?;

    // Under sync_all a write commits once r1 holds it durably: wait until
    // r1 has said hello and is in sync, then write and wait for the barrier.
    primary
        .wait_replica_state("r1", ReplicaState::InSync, Duration::from_secs(10))
        .await?;
    let lsn = primary
        .write(0, bytes::Bytes::from(vec![7u8; BLOCK_SIZE]))
        .await?;
    let committed = primary.barrier().await?;
    anyhow::ensure!(committed >= lsn, "committed {committed} < lsn {lsn}");
    println!("lsn {lsn} committed under sync_all (committed={committed})");
    let status = primary.status().await?;
    println!("{}", serde_json::to_string_pretty(&status)?);
    primary.stop().await;
    replica.stop().await;
    runtime.shutdown();
    Ok(())
}
