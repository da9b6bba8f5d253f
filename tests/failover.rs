//! Failover to a replica that is behind another one, over loopback TCP with
//! real files: the returning replica's log is matched by epoch, its
//! divergent tail truncated (or the replica rebuilt), and it ends with the
//! new primary's content and every write acknowledged in the new epoch.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use bytes::Bytes;
use std::time::Duration;
use support::*;
use walship::engine::{CommitMode, ReplicaState};

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
    let mut cluster = Cluster::start(ClusterOptions {
        replica_checkpoint_every,
        ..options(mode, &["s1", "s2", "s3"], tuning())
    })
    .await
    .unwrap();
    cluster.wait_all_in_sync(LONG).await.unwrap();
    assert_eq!(cluster.write_blocks(0, 200).await.unwrap(), 200);
    assert_eq!(cluster.primary.barrier().await.unwrap(), 200);
    cluster.wait_converged(LONG).await.unwrap();
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
    cluster.wait_durable("s2", 300, LONG).await.unwrap();
    cluster.primary.stop().await;
    cluster.stop_replica("s2").await;
    cluster.promote("s1", mode).await.unwrap();
    cluster.restart_replica("s3", false).await.unwrap();
    cluster
        .wait_state("s3", ReplicaState::InSync, LONG)
        .await
        .unwrap();
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
    cluster.restart_replica("s2", false).await.unwrap();
    cluster
        .wait_state("s2", ReplicaState::InSync, LONG)
        .await
        .unwrap();
    assert_eq!(cluster.primary.barrier().await.unwrap(), 500);
    cluster.wait_converged(LONG).await.unwrap();
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
    let events = cluster.events().await.unwrap();
    let proof =
        format!(
        "vol1/s2 handshake flushed=300 committed={}: divergent_tail: replica epoch 1 ends at 300, \
         primary epoch 2 starts at 201: truncate to 200, {need}",
        if mode == CommitMode::SyncAll { 200 } else { 500 }
    );
    assert_logged(&events, |e| e.starts_with(&proof));
    assert_logged(&events, |e| e == "vol1/s2 truncation_recorded to 200");
    assert!(!cluster.has_event("s2", "plan_rebuild").await.unwrap());
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
    let events = cluster.events().await.unwrap();
    assert_logged(&events, |e| {
        e.starts_with("vol1/s2 handshake flushed=300 committed=500: divergent_tail: replica epoch 1 ends at 300, primary epoch 2 starts at 201: truncate to 200, below the replica's checkpoint")
    });
    assert!(cluster.has_event("s2", "rebuild_completed").await.unwrap());
}

/// A cluster under `mode` whose primary wrote 1-30, then 31-35 (blocks
/// 100-104) that both replicas made durable.
async fn a_tail_both_replicas_hold(mode: CommitMode) -> Cluster {
    let mut keep_wal = tuning();
    keep_wal.checkpoint_every_lsns = 1 << 20;
    let cluster = start_with(mode, &["r1", "r2"], keep_wal).await;
    cluster.wait_all_in_sync(LONG).await.unwrap();
    cluster.write_blocks(0, 30).await.unwrap();
    if mode == CommitMode::BestEffort {
        assert_eq!(cluster.primary.barrier().await.unwrap(), 30);
    }
    for i in 0..5 {
        cluster
            .primary
            .write(100 + i, block(7000 + i))
            .await
            .unwrap();
    }
    cluster.wait_durable("r1", 35, LONG).await.unwrap();
    cluster.wait_durable("r2", 35, LONG).await.unwrap();
    cluster
}

/// Waits until r2 knows 31-35 were committed (the heartbeat after the
/// barrier carries it).
async fn r2_knows_the_tail_committed(cluster: &Cluster) {
    let told = within(LONG, || async {
        let status = cluster.replica_status("r2").await.ok()?;
        (status.committed >= 35).then_some(())
    })
    .await;
    assert!(told.is_some(), "{:?}", cluster.replica_status("r2").await);
}

/// r1 stops; the primary stops and loses 31-35 (as a crash before its own
/// fsync would).
async fn the_primary_loses_the_tail(cluster: &mut Cluster) {
    cluster.stop_replica("r1").await;
    cluster.primary.stop().await;
    // The stop returned with the store's lock released.
    let (store, _) = walship::io::Store::open(&cluster.primary_dir, store_options()).unwrap();
    store.truncate_after(30).unwrap();
}

/// A primary that crashed after shipping entries it had not made durable
/// itself comes back without them, while replicas hold them. It must open
/// in a new epoch: the LSNs it writes again then carry that epoch, and a
/// replica holding the lost entries is told apart and truncated, not
/// caught up on top of them. (best_effort: what the replicas hold past the
/// primary was never acknowledged by anyone but the lost disk. Under
/// sync_quorum the same entries were committed by r1 and r2, and are never
/// truncated: the next test.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_primary_that_lost_its_tail_comes_back_in_a_new_epoch() {
    let mut cluster = a_tail_both_replicas_hold(CommitMode::BestEffort).await;
    the_primary_loses_the_tail(&mut cluster).await;
    assert!(matches!(
        cluster.reopen_primary(1).await,
        Err(walship::actors::VolumeError::EpochNotNewer { .. })
    ));
    cluster.reopen_primary(2).await.unwrap();
    cluster
        .wait_state("r2", ReplicaState::InSync, LONG)
        .await
        .unwrap();
    // Other data at the same LSNs, acknowledged by the primary and r2.
    for i in 0..10 {
        let lsn = cluster
            .primary
            .write(100 + i, block(8000 + i))
            .await
            .unwrap();
        assert_eq!(lsn, 31 + i);
    }
    assert_eq!(cluster.primary.barrier().await.unwrap(), 40);
    cluster.restart_replica("r1", false).await.unwrap();
    cluster
        .wait_state("r1", ReplicaState::InSync, LONG)
        .await
        .unwrap();
    cluster.wait_converged(LONG).await.unwrap();
    for i in 0..10 {
        assert_eq!(
            cluster.replica("r1").read(100 + i, 1).await.unwrap(),
            block(8000 + i)
        );
    }
    let events = cluster.events().await.unwrap();
    assert_logged(&events, |e| {
        e.starts_with("vol1/r2 handshake flushed=35 committed=30: replica_ahead")
    });
    assert_logged(&events, |e| {
        e.starts_with(
            "vol1/r1 handshake flushed=35 committed=40: divergent_tail: replica epoch 1 ends at 35, \
             primary epoch 2 starts at 31: truncate to 30",
        )
    });
}

/// The same loss under sync_quorum: r1 and r2 made 31-35 durable, a
/// quorum, so they were committed (a FLUSH would have been acknowledged)
/// and r2 heard so. The primary, back without them and without peering
/// (the harness's runtime has it off), must not truncate r2: the handshake
/// says `primary_behind`, plans nothing, and r2 keeps every entry.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_primary_that_lost_a_committed_tail_never_truncates_the_replica_holding_it() {
    let mut cluster = a_tail_both_replicas_hold(CommitMode::SyncQuorum).await;
    // Committed by the quorum, and r2 told so (a barrier resolves once
    // committed, and the next heartbeat carries it).
    assert!(cluster.primary.barrier().await.unwrap() >= 35);
    r2_knows_the_tail_committed(&cluster).await;
    the_primary_loses_the_tail(&mut cluster).await;
    cluster.reopen_primary(2).await.unwrap();
    let behind = within(LONG, || async {
        cluster
            .has_event("r2", "primary_behind")
            .await
            .unwrap()
            .then_some(())
    })
    .await;
    assert!(behind.is_some(), "{:#?}", cluster.events().await.unwrap());
    assert_ne!(
        cluster.primary.replica_state("r2").await.unwrap(),
        Some(ReplicaState::InSync)
    );
    assert!(!cluster
        .has_event("r2", "truncation_recorded")
        .await
        .unwrap());
    for i in 0..5 {
        assert_eq!(
            cluster.replica("r2").read(100 + i, 1).await.unwrap(),
            block(7000 + i)
        );
    }
}

/// The same committed tail lost, and the primary peers before it serves (as
/// a node's does): r2's log extends its own, so it takes the frames after
/// its head from r2's WAL (a reverse catch-up, not the whole volume) and
/// opens with them; r2 is in sync at once, nothing truncated or rebuilt.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_primary_that_lost_a_committed_tail_takes_it_back_by_catch_up() {
    let mut cluster = a_tail_both_replicas_hold(CommitMode::SyncQuorum).await;
    assert!(cluster.primary.barrier().await.unwrap() >= 35);
    r2_knows_the_tail_committed(&cluster).await;
    the_primary_loses_the_tail(&mut cluster).await;
    cluster
        .reopen_primary_with(2, walship::actors::Peering::enabled(0, None))
        .await
        .unwrap();
    cluster
        .wait_state("r2", ReplicaState::InSync, LONG)
        .await
        .unwrap();
    for i in 0..5 {
        assert_eq!(
            cluster.primary.read(100 + i, 1).await.unwrap(),
            block(7000 + i)
        );
    }
    let events = cluster.events().await.unwrap();
    assert_logged(&events, |e| {
        e.starts_with("vol1/r2 primary_behind primary_behind: vol1/r2 holds 31-35")
            && e.ends_with("recovering before serving, by catch-up")
    });
    assert_logged(&events, |e| {
        e.starts_with("vol1/r2 handshake flushed=35 committed=35: zero_gap")
    });
    assert!(!cluster
        .has_event("r2", "truncation_recorded")
        .await
        .unwrap());
    assert!(!cluster
        .has_event("r2", "plan_rebuild_full_base")
        .await
        .unwrap());
    // Frames, not an image: an installed image would be a new generation.
    let inspected = walship::io::inspect(&cluster.primary_dir);
    assert_eq!(inspected.superblock.unwrap().generation, 1);
}

/// The committed floor a replica persists with each checkpoint outlives
/// its restart: a primary that comes back without what was committed
/// still cannot truncate it below that.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_keeps_its_committed_floor_across_a_restart() {
    let mut cluster = start(CommitMode::SyncAll, &["r1", "r2"]).await;
    cluster.wait_all_in_sync(LONG).await.unwrap();
    for i in 0..3 * REPLICA_CHECKPOINT_EVERY {
        cluster
            .primary
            .write_committed(i % BLOCKS, block(i))
            .await
            .unwrap();
    }
    let checkpoint = within(LONG, || async {
        let status = cluster.replica_status("r1").await.ok()?;
        (status.checkpoint >= 2 * REPLICA_CHECKPOINT_EVERY).then_some(status.checkpoint)
    })
    .await
    .expect("r1 never checkpointed");
    // Nobody tells it anything after its restart.
    cluster.primary.stop().await;
    cluster.stop_replica("r1").await;
    let (store, _) = walship::io::Store::open(&cluster.node("r1").dir, store_options()).unwrap();
    let floor = store.committed_floor();
    assert!(
        floor >= checkpoint,
        "persisted floor {floor}, checkpoint {checkpoint}"
    );
    drop(store);
    cluster.restart_replica("r1", false).await.unwrap();
    let status = cluster.replica_status("r1").await.unwrap();
    assert_eq!(status.committed, floor, "what r1 knows after its restart");
    cluster.shutdown().await;
}

/// A primary that lost its store is stopped while it pulls a replica's
/// image: the stop returns with nothing left writing its store, the next
/// opening pulls again from the start, and every acknowledged block reads
/// back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_primary_stopped_mid_pull_pulls_again_when_it_reopens() {
    // 256 MiB: the image takes a while to come (a 64 MiB one took 0.3 s).
    const LARGE: u64 = 64 * 1024;
    let mut options = options(CommitMode::SyncAll, &["r1", "r2"], tuning());
    options.store.block_count = LARGE;
    options.peering = walship::actors::Peering::enabled(0, None);
    let mut cluster = Cluster::start(options).await.unwrap();
    cluster.wait_all_in_sync(LONG).await.unwrap();
    let last = cluster.write_blocks(0, 200).await.unwrap();
    assert_eq!(cluster.primary.barrier().await.unwrap(), last);
    cluster.primary.stop().await;
    std::fs::remove_dir_all(&cluster.primary_dir).unwrap();
    cluster.reopen_primary(1).await.unwrap();
    let dir = cluster.primary_dir.clone();
    let staging = move || {
        std::fs::read_dir(&dir)
            .ok()?
            .filter_map(Result::ok)
            .find(|e| e.file_name().to_string_lossy().ends_with(".staging"))
            .map(|e| e.path())
    };
    let pulling = within(LONG, || async { staging() }).await;
    assert!(pulling.is_some(), "the primary never began to pull");
    assert!(cluster.primary.is_peering());
    cluster.primary.stop().await;
    // The stop returned with the store let go of: the store's lock is
    // taken again at once (the harness's stores do not wait for it).
    cluster.reopen_primary(1).await.unwrap();
    cluster.wait_all_in_sync(LONG).await.unwrap();
    cluster.wait_converged(LONG).await.unwrap();
    for i in 0..200 {
        assert_eq!(
            cluster.primary.read(i, 1).await.unwrap(),
            block(i),
            "block {i}"
        );
    }
    assert!(staging().is_none(), "a staging file was left");
    cluster.shutdown().await;
}

/// By the time a FLUSH is acknowledged, every replica knows that what was
/// acknowledged before it is committed (its floor covers it), with no
/// wait: under sync_all both, under sync_quorum at least one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flush_is_acknowledged_once_the_replicas_know_what_was_committed_before_it() {
    for mode in [CommitMode::SyncAll, CommitMode::SyncQuorum] {
        let cluster = start(mode, &["r1", "r2"]).await;
        cluster.wait_all_in_sync(LONG).await.unwrap();
        let mut last = 0;
        for i in 0..20 {
            last = cluster.primary.write_committed(i, block(i)).await.unwrap();
        }
        cluster.primary.flush().await.unwrap();
        let mut knowing = 0;
        for server in ["r1", "r2"] {
            let status = cluster.replica_status(server).await.unwrap();
            knowing += usize::from(status.committed >= last);
        }
        let needed = match mode {
            CommitMode::SyncQuorum => 1,
            _ => 2,
        };
        assert!(
            knowing >= needed,
            "{mode:?}: {knowing} replicas know {last} committed"
        );
        cluster.shutdown().await;
    }
}

/// A barrier waiting when a replica comes back in sync resolves with it,
/// also when the replica is caught up to the head before it ships live
/// (no live batch will tell it what was committed): it is asked once it
/// ships live, and its hello already said what it knew.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flush_waiting_for_a_returning_replica_is_acknowledged_once_it_is_back() {
    let mut cluster = start(CommitMode::SyncAll, &["r1", "r2"]).await;
    cluster.wait_all_in_sync(LONG).await.unwrap();
    for i in 0..20 {
        cluster.primary.write_committed(i, block(i)).await.unwrap();
    }
    cluster.stop_replica("r2").await;
    cluster
        .wait_state("r2", ReplicaState::Disconnected, LONG)
        .await
        .unwrap();
    // Written while r2 is away (not waiting to be committed): r2 catches
    // up on them when it is back, to the head.
    let mut head = 0;
    for i in 20..120 {
        head = cluster.primary.write(i, block(i)).await.unwrap();
    }
    let primary = cluster.primary.clone();
    let flush = tokio::spawn(async move { primary.flush().await });
    cluster.restart_replica("r2", false).await.unwrap();
    cluster.primary.heartbeat().await.unwrap();
    let flushed = tokio::time::timeout(LONG, flush).await.unwrap().unwrap();
    assert_eq!(flushed.unwrap(), head);
    let status = cluster.replica_status("r2").await.unwrap();
    assert!(status.committed >= 20, "r2 knows {}", status.committed);
    cluster.shutdown().await;
}
