//! A stop that knows: `VolumeHandle::stop` and `Runtime::shutdown` return
//! only once listeners are closed, connections and executor tasks have
//! ended, and stores (with their directory locks) are released, so whatever
//! comes next reuses the port and the directory at once: no sleep, no retry.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::time::Duration;
use support::*;
use walship::engine::CommitMode;
use walship::io::Store;

const LONG: Duration = Duration::from_secs(20);

#[tokio::test]
async fn a_stopped_replica_frees_its_port_and_its_directory_at_once() {
    let mut cluster = start(CommitMode::SyncAll, &["r1", "r2"]).await;
    cluster.wait_all_in_sync(LONG).await.unwrap();
    // Live shipping runs: the replica has a connection and acks in flight.
    cluster.write_blocks(0, 64).await.unwrap();
    let (dir, addr) = {
        let node = cluster.node("r1");
        (node.dir.clone(), node.addr.clone())
    };
    cluster.stop_replica("r1").await;
    let listener = std::net::TcpListener::bind(&addr).expect("the listener is closed");
    drop(listener);
    // `store_options` does not wait for a lock: the store is released.
    let (store, _) = Store::open(&dir, store_options()).expect("the store is released");
    drop(store);
    // And the replica comes back where it was, at once.
    cluster.bring_back("r1", LONG).await.unwrap();
}

#[tokio::test]
async fn a_stopped_primary_releases_its_store_with_recovery_running() {
    let mut cluster = start(CommitMode::BestEffort, &["r1"]).await;
    cluster.wait_all_in_sync(LONG).await.unwrap();
    cluster.stop_replica("r1").await;
    cluster.write_blocks(0, 2000).await.unwrap();
    // r1 comes back and catches up from the WAL while the primary stops.
    cluster.restart_replica("r1", false).await.unwrap();
    cluster
        .wait_event("r1", "session_created", LONG)
        .await
        .unwrap();
    cluster.primary.stop().await;
    let (store, _) = Store::open(&cluster.primary_dir, store_options())
        .expect("the primary's store is released");
    drop(store);
}

#[tokio::test]
async fn shutdown_returns_with_every_store_released() {
    // The data outlives the cluster: the stores are opened after it.
    let tmp = tempfile::tempdir().unwrap();
    let cluster = Cluster::start(ClusterOptions {
        dir: Some(tmp.path().to_path_buf()),
        ..options(CommitMode::SyncAll, &["r1", "r2"], tuning())
    })
    .await
    .unwrap();
    cluster.wait_all_in_sync(LONG).await.unwrap();
    cluster.write_blocks(0, 64).await.unwrap();
    let dirs: Vec<_> = cluster
        .replicas
        .iter()
        .map(|n| n.dir.clone())
        .chain([cluster.primary_dir.clone()])
        .collect();
    // The runtime's own shutdown, volumes still running.
    let Cluster { rt, .. } = cluster;
    tokio::task::spawn_blocking(move || rt.shutdown())
        .await
        .unwrap();
    for dir in &dirs {
        let opened = Store::open(dir, store_options());
        assert!(opened.is_ok(), "{}: {:?}", dir.display(), opened.err());
    }
    drop(tmp);
}
