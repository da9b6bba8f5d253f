//! Failover to a replica that is behind another one, over loopback TCP with
//! real files: the returning replica's log is matched by epoch, its
//! divergent tail truncated (or the replica rebuilt), and it ends with the
//! new primary's content and every write acknowledged in the new epoch.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use bytes::Bytes;
use std::time::Duration;
use support::*;
use walship_engine::{CommitMode, ReplicaState};

const LONG: Duration = Duration::from_secs(20);

/// Blocks only epoch 1's primary wrote, after 200; the new primary never had them.
const DIVERGENT_LBA: u64 = 1000;
/// Blocks the new primary writes in epoch 2; the first 70 overlap the divergent ones.
const EPOCH_TWO_LBA: u64 = 1030;

fn epoch_two_block(i: u64) -> Bytes {
    block(9000 + i)
}

/// The sequence of the divergence issue, in `mode`:
/// 1. the primary (epoch 1) writes 1-200, committed everywhere; then 201-300,
///    which only s2 persists: s1 and s3 are down, nothing past 200 is acknowledged;
/// 2. the primary dies, s2 goes down; s1 (flushed 200) becomes primary in
///    epoch 2 with s2 and s3, s3 returns and 201-500 are written in epoch 2;
/// 3. s2 returns.
///
/// Returns the cluster once s2 is in sync, with the writes of epoch 2
/// acknowledged (under sync_all, only once s2 is back).
async fn failover_past_a_divergent_replica(
    mode: CommitMode,
    replica_checkpoint_every: u64,
) -> Cluster {
    // The checkpointer runs every 64 LSNs: only retention holds keep the
    // new primary's WAL for the replicas it has not seen yet.
    let mut cluster = Cluster::start_checkpointing(
        mode,
        &["s1", "s2", "s3"],
        tuning(),
        replica_checkpoint_every,
    )
    .await;
    for server in ["s1", "s2", "s3"] {
        cluster.wait_state(server, ReplicaState::InSync, LONG).await;
    }
    assert_eq!(cluster.write_blocks(0, 200).await, 200);
    assert_eq!(cluster.primary.barrier().await.unwrap(), 200);
    cluster.wait_converged(LONG).await;
    cluster.stop_replica("s1").await;
    cluster.stop_replica("s3").await;
    let mut last = 0;
    for i in 0..100 {
        last = cluster
            .primary
            .write(DIVERGENT_LBA + i, block(5000 + i))
            .await
            .unwrap();
    }
    assert_eq!(last, 300);
    cluster.wait_durable("s2", 300, LONG).await;
    cluster.primary.stop().await;
    cluster.stop_replica("s2").await;
    cluster.promote("s1", mode).await;
    cluster.restart_replica("s3", false).await;
    cluster.wait_state("s3", ReplicaState::InSync, LONG).await;
    for i in 0..300 {
        let lsn = cluster
            .primary
            .write(EPOCH_TWO_LBA + i, epoch_two_block(i))
            .await
            .unwrap();
        assert_eq!(lsn, 201 + i);
    }
    if mode != CommitMode::SyncAll {
        // Acknowledged while s2 is away.
        assert_eq!(cluster.primary.barrier().await.unwrap(), 500);
    }
    cluster.restart_replica("s2", false).await;
    cluster.wait_state("s2", ReplicaState::InSync, LONG).await;
    assert_eq!(cluster.primary.barrier().await.unwrap(), 500);
    cluster.wait_converged(LONG).await;
    cluster
}

/// s2 holds exactly the new primary's blocks: epoch 2's writes, and none of
/// the entries only epoch 1's primary wrote.
async fn assert_s2_matches_the_new_primary(cluster: &Cluster) {
    let s2 = cluster.replica("s2");
    for i in 0..300 {
        let lba = EPOCH_TWO_LBA + i;
        assert_eq!(
            s2.read(lba, 1).await.unwrap(),
            epoch_two_block(i),
            "lba {lba}"
        );
    }
    let zero = Bytes::from(vec![0u8; 4096]);
    for lba in DIVERGENT_LBA..EPOCH_TWO_LBA {
        assert_eq!(
            s2.read(lba, 1).await.unwrap(),
            zero,
            "lba {lba} kept epoch 1's tail"
        );
    }
    assert_eq!(
        s2.content_checksum().await.unwrap(),
        cluster.primary.content_checksum().await.unwrap()
    );
}

async fn divergent_tail_is_truncated_then_caught_up(mode: CommitMode, need: &str) {
    // Replicas that never checkpoint past 200 can always truncate to it.
    let cluster = failover_past_a_divergent_replica(mode, 1 << 20).await;
    assert_s2_matches_the_new_primary(&cluster).await;
    let events = cluster.events().await;
    let proof =
        format!(
        "vol1/s2 handshake flushed=300 committed={}: divergent_tail: replica epoch 1 ends at 300, \
         primary epoch 2 starts at 201: truncate to 200, {need}",
        if mode == CommitMode::SyncAll { 200 } else { 500 }
    );
    assert_logged(&events, |e| e.starts_with(&proof));
    assert_logged(&events, |e| e == "vol1/s2 truncation_recorded to 200");
    assert!(!cluster.has_event("s2", "plan_rebuild").await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn divergent_tail_under_best_effort_is_truncated_then_caught_up() {
    divergent_tail_is_truncated_then_caught_up(CommitMode::BestEffort, "need 201-500").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn divergent_tail_under_sync_quorum_is_truncated_then_caught_up() {
    divergent_tail_is_truncated_then_caught_up(CommitMode::SyncQuorum, "need 201-500").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn divergent_tail_under_sync_all_is_truncated_then_live_shipped() {
    // Nothing of epoch 2 is committed while s2 is away: the catch-up is the
    // truncation alone, and live shipping sends 201-500.
    divergent_tail_is_truncated_then_caught_up(CommitMode::SyncAll, "need none").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_divergent_tail_already_checkpointed_is_rebuilt() {
    // Best effort tells replicas the primary's own durable LSN as committed,
    // so s2 checkpoints into its divergent tail and cannot truncate it.
    let cluster = failover_past_a_divergent_replica(CommitMode::BestEffort, 16).await;
    assert_s2_matches_the_new_primary(&cluster).await;
    let events = cluster.events().await;
    assert_logged(&events, |e| {
        e.starts_with("vol1/s2 handshake flushed=300 committed=500: divergent_tail: replica epoch 1 ends at 300, primary epoch 2 starts at 201: truncate to 200, below the replica's checkpoint")
    });
    assert!(cluster.has_event("s2", "rebuild_completed").await);
}
