//! How a storage service embeds walship: a `#[tokio::main]` service starts
//! the runtime (actix runs on its own thread), spawns a replica and a primary
//! on loopback, writes, waits for commit under sync_all, and reads the status.
//!
//! Run: `cargo run --example embed`

use std::time::Duration;
use walship::actors::{PrimaryConfig, ReplicaConfig, ReplicaSpec, Runtime, Tuning, VolumeConfig};
use walship::engine::{CommitMode, ReplicaState};
use walship::io::{StoreOptions, BLOCK_SIZE};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let runtime = Runtime::start()?;
    let store = StoreOptions::new(1024);

    let replica = runtime
        .spawn_volume(VolumeConfig::Replica(ReplicaConfig {
            cluster: "demo".into(),
            volume: "vol1".into(),
            server: "r1".into(),
            dir: dir.path().join("r1"),
            store: store.clone(),
            listen: "127.0.0.1:0".into(),
            checkpoint_every_lsns: 1024,
        }))
        .await?;
    let replica_addr = replica
        .listen_addr()
        .map(|a| a.to_string())
        .unwrap_or_default();

    let primary = runtime
        .spawn_volume(VolumeConfig::Primary(PrimaryConfig {
            cluster: "demo".into(),
            volume: "vol1".into(),
            dir: dir.path().join("primary"),
            store,
            epoch: 1,
            commit_mode: CommitMode::SyncAll,
            replicas: vec![ReplicaSpec {
                server: "r1".into(),
                addr: replica_addr,
                version: 1,
            }],
            tuning: Tuning::default(),
            on_replica_states: None,
            peering: Default::default(),
        }))
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
