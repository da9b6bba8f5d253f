//! A storage service embedding walship, written only against what the
//! crate promises: config types made with their constructors and `with_`
//! methods, tuning started from its default with a few fields set, status
//! read field by field. No struct literal of a walship type: each is
//! `#[non_exhaustive]`, so one added field (a new knob) would break such
//! code, and `.ci/run` checks this crate with a field added to each.

use std::time::Duration;
use walship::actors::{
    Listen, NodeStatus, Peering, PrimaryConfig, ReplicaConfig, ReplicaSpec, Runtime, Tuning,
    VolumeConfig,
};
use walship::engine::{CommitMode, ReplicaState};
use walship::io::{StoreOptions, BLOCK_SIZE};

/// The service's own tuning: the defaults, two knobs changed.
fn tuning() -> Tuning {
    let mut tuning = Tuning::default();
    tuning.peer_timeout = Duration::from_secs(3);
    tuning.retention_max_bytes = Some(256 << 20);
    tuning
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let dir = std::env::temp_dir().join(format!("walship-embedder-{}", std::process::id()));
    let runtime = Runtime::start()?;
    let store = StoreOptions::new(256);
    let replica = ReplicaConfig::new(
        ("svc", "vol", "r1"),
        dir.join("r1"),
        store.clone(),
        Listen::Addr("127.0.0.1:0".into()),
    )
    .with_checkpoint_every_lsns(512);
    let replica = runtime.spawn_volume(VolumeConfig::Replica(replica)).await?;
    let addr = replica
        .listen_addr()
        .map(|a| a.to_string())
        .unwrap_or_default();
    let primary = PrimaryConfig::new(
        ("svc", "vol"),
        dir.join("primary"),
        store,
        1,
        CommitMode::SyncAll,
        vec![ReplicaSpec::new("r1", addr, 1)],
    )
    .with_tuning(tuning())
    .with_peering(Peering::default());
    let primary = runtime.spawn_volume(VolumeConfig::Primary(primary)).await?;
    primary
        .wait_replica_state("r1", ReplicaState::InSync, Duration::from_secs(10))
        .await?;
    let lsn = primary
        .write(0, bytes::Bytes::from(vec![1u8; BLOCK_SIZE]))
        .await?;
    let committed = primary.barrier().await?;
    println!("lsn {lsn} committed {committed}");
    if let NodeStatus::Primary(status) = primary.status().await? {
        println!("head {}, durable {}", status.head, status.durable);
    }
    primary.stop().await;
    replica.stop().await;
    runtime.shutdown();
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}
