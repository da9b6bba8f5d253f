//! How a storage service embeds walship: a `#[tokio::main]` service starts
//! the runtime (actix runs on its own thread), spawns a replica and a primary
//! on loopback, writes, waits for commit under sync_all, and reads the status.
//!
//! Run: `cargo run --example embed`

use std::time::Duration;
use walship::actors::{PrimaryConfig, ReplicaConfig, ReplicaSpec, Runtime, Tuning, VolumeConfig};
use walship::engine::CommitMode;
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
        }))
        .await?;

    // The first barrier waits until r1 handshakes and acknowledges.
    let mut committed = 0;
    for attempt in 0..50 {
        let lsn = primary
            .write(attempt % 1024, bytes::Bytes::from(vec![7u8; BLOCK_SIZE]))
            .await?;
        match primary.barrier().await {
            Ok(c) => {
                committed = c;
                println!("lsn {lsn} committed under sync_all (committed={c})");
                break;
            }
            Err(e) => {
                println!("not yet committed: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
    anyhow::ensure!(committed > 0, "never committed");
    let status = primary.status().await?;
    println!("{}", serde_json::to_string_pretty(&status)?);
    primary.stop().await;
    replica.stop().await;
    runtime.shutdown();
    Ok(())
}
