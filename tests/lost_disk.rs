//! A node that comes back without its data (a replaced disk, a store or
//! assignment a power loss took) loses nothing: as primary it peers with
//! its replicas before it serves and recovers what they hold; as replica
//! it is rebuilt. `walship serve` processes, kill -9, real files wiped.

#![allow(clippy::unwrap_used, clippy::expect_used)]

#[path = "support/nbd_client.rs"]
mod nbd_client;
#[path = "support/nodes.rs"]
mod nodes;
#[path = "support/workload.rs"]
mod workload;

use nodes::{NodeCluster, VolumeOptions};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;
use workload::*;

const CONVERGE: Duration = Duration::from_secs(60);

/// What the primary's node loses while it is down.
#[derive(Debug, Clone, Copy)]
enum Loss {
    /// Its whole data dir: a replaced disk.
    DataDir,
    /// Only the volume's persisted assignment (its incarnation with it).
    Assignment,
    /// The volume's store, the assignment kept.
    Store,
}

/// node1, vol0's primary under `mode`, takes 1500 FUA writes (acknowledged
/// under the mode), is killed with SIGKILL and loses `loss`, and comes back
/// with the same config. Every acknowledged block reads back from every
/// export, nothing was truncated below what was committed, and the
/// primary's recovery log says what it did; it then takes more writes.
async fn primary_comes_back_without(mode: &str, loss: Loss) {
    let volume = VolumeOptions {
        commit_mode: mode.into(),
        ..VolumeOptions::default()
    };
    let mut cluster = NodeCluster::start(volume).await;
    cluster.wait_converged(CONVERGE).await;
    let primary = nbd_addr(&cluster.nodes[0]);
    let acked = write_all_fua(primary, 0..1500).await;
    let head_before = cluster.primary_volume().await["status"]["registry"]["history"]["committed"]
        .as_u64()
        .unwrap();
    assert!(head_before >= 1500, "committed {head_before}");
    let mut terms_seen = 0;
    for replica in [1, 2] {
        let term = cluster.status(replica).await["volumes"][0]["status"]["epoch"].as_u64();
        terms_seen = terms_seen.max(term.unwrap());
    }

    cluster.kill(0).await;
    let dir = cluster.nodes[0].data_dir.clone();
    match loss {
        Loss::DataDir => std::fs::remove_dir_all(&dir).unwrap(),
        Loss::Assignment => std::fs::remove_file(dir.join("vol0/assignment.json")).unwrap(),
        Loss::Store => std::fs::remove_dir_all(dir.join("vol0/store")).unwrap(),
    }
    cluster.spawn(0);
    cluster.wait_up(0, Duration::from_secs(30)).await;
    cluster.wait_converged(CONVERGE).await;

    assert_blocks(primary, &acked).await;
    for replica in [1, 2] {
        let status = cluster.status(replica).await["volumes"][0]["status"].clone();
        assert!(
            status["head"].as_u64().unwrap() >= head_before,
            "node{} truncated below what was committed: {status:#}",
            replica + 1
        );
    }
    assert_replicas_identical(&cluster, 0).await;
    let volume = cluster.primary_volume().await;
    let log = volume["recent_recovery"].as_array().unwrap().clone();
    let said = |event: &str| log.iter().find(|e| e["event"] == event).cloned();
    // Neither replica lost anything to the returning primary: no
    // truncation, no rebuild (the recovered log is theirs).
    let touched: Vec<_> = log
        .iter()
        .filter(|e| e["replica"].is_string())
        .filter(|e| {
            let event = e["event"].as_str().unwrap_or_default();
            event == "truncation_recorded" || event.starts_with("plan_rebuild")
        })
        .collect();
    assert!(touched.is_empty(), "{touched:#?}");
    match loss {
        Loss::DataDir | Loss::Store => {
            let behind = said("primary_behind").unwrap_or_else(|| panic!("{log:#?}"));
            let detail = behind["detail"].as_str().unwrap();
            assert!(
                detail.contains("this node's log was lost")
                    && detail.contains("recovering before serving"),
                "{detail}"
            );
        }
        Loss::Assignment => {
            assert!(said("peered").is_some(), "{log:#?}");
        }
    }
    // A new term, newer than any the replicas had accepted, and persisted
    // in the volume's assignment before they heard it.
    let term = volume["status"]["registry"]["epoch"].as_u64().unwrap();
    assert!(term > terms_seen, "term {term}, replicas saw {terms_seen}");
    let persisted: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.join("vol0/assignment.json")).unwrap()).unwrap();
    assert_eq!(
        persisted["incarnation"].as_u64(),
        Some(term & 0xfffff),
        "{persisted:#}"
    );

    // It serves: more writes, every one of them on every node.
    let more = write_all_fua(primary, 1500..1600).await;
    cluster.wait_converged(CONVERGE).await;
    assert_blocks(primary, &[acked, more].concat()).await;
    assert_replicas_identical(&cluster, 0).await;
    cluster.stop_cleanly(&[0, 1, 2]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sync_all_primary_whose_disk_was_replaced_recovers_from_a_replica() {
    primary_comes_back_without("sync_all", Loss::DataDir).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sync_quorum_primary_whose_disk_was_replaced_recovers_from_a_replica() {
    primary_comes_back_without("sync_quorum", Loss::DataDir).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn primary_that_lost_only_its_assignment_opens_in_a_term_nobody_saw() {
    for mode in ["sync_all", "sync_quorum"] {
        primary_comes_back_without(mode, Loss::Assignment).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn primary_that_lost_only_its_store_recovers_from_a_replica() {
    for mode in ["sync_all", "sync_quorum"] {
        primary_comes_back_without(mode, Loss::Store).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replica_whose_disk_was_replaced_is_rebuilt() {
    // Checkpoints every 500 LSNs and 1 MiB segments: the WAL no longer
    // holds the first writes by the time the replica comes back empty.
    let defaults = VolumeOptions::default();
    // sync_quorum, so writes go on while it is away.
    let volume = VolumeOptions {
        commit_mode: "sync_quorum".into(),
        tuning: format!("{}checkpoint_every_lsns = 500\n", defaults.tuning),
        ..defaults
    };
    let mut cluster = NodeCluster::start(volume).await;
    cluster.wait_converged(CONVERGE).await;
    let primary = nbd_addr(&cluster.nodes[0]);
    let acked = write_all_fua(primary, 0..1000).await;
    cluster.kill(1).await;
    std::fs::remove_dir_all(&cluster.nodes[1].data_dir).unwrap();
    // More writes while it is away: the checkpoint recycles what it lacks.
    let acked = [acked, write_all_fua(primary, 1000..1600).await].concat();
    // Writes keep flowing while it comes back and is rebuilt.
    let stop = Arc::new(AtomicBool::new(false));
    let during_acked = Arc::new(AtomicU64::new(0));
    let during = tokio::spawn(write_until(
        primary,
        2000..6000,
        Arc::clone(&stop),
        Arc::clone(&during_acked),
        Duration::from_secs(60),
    ));
    wait_acked(&during_acked, 20, CLIENT).await;
    cluster.spawn(1);
    cluster.wait_up(1, Duration::from_secs(30)).await;
    cluster
        .wait_replica_state("node2", "in_sync", CONVERGE)
        .await;
    let at_sync = during_acked.load(Ordering::SeqCst);
    wait_acked(&during_acked, at_sync + 50, CLIENT).await;
    stop.store(true, Ordering::SeqCst);
    let during = during.await.unwrap();
    cluster.wait_converged(CONVERGE).await;
    assert_blocks(primary, &[acked, during].concat()).await;
    assert_replicas_identical(&cluster, 0).await;
    let log = cluster.primary_volume().await["recent_recovery"].clone();
    assert!(
        log.as_array()
            .unwrap()
            .iter()
            .any(|e| e["replica"] == "vol0/node2"
                && e["event"].as_str().unwrap().starts_with("plan_rebuild")),
        "{log:#}"
    );
    cluster.stop_cleanly(&[0, 1, 2]).await;
}
