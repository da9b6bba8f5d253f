//! Production never pauses for a replica: a writer keeps writing, with
//! barriers in flight, while a replica catches up, rebuilds from a snapshot
//! plus the WAL tail, or rebuilds from a full base. Each ends with the
//! replica in sync, its content equal to the primary's, every acknowledged
//! write present on both, and no pin left.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;
use support::*;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use walship::actors::{Tuning, VolumeHandle};
use walship::engine::{CommitMode, ReplicaState};

const LONG: Duration = Duration::from_secs(30);
/// Blocks written before the load, from LBA 0; the load writes after them.
const BEFORE: u64 = 300;

/// A writer (one 4 KiB write per millisecond, each to a block of its own)
/// and a task issuing barriers back to back.
struct Load {
    stop: watch::Sender<bool>,
    writer: JoinHandle<Vec<(u64, u64)>>,
    barriers: JoinHandle<(u64, u64)>,
}

impl Load {
    fn start(primary: &VolumeHandle, first_lba: u64) -> Self {
        let (stop, stopped) = watch::channel(false);
        let written = Arc::new(AtomicU64::new(0));
        let writer = {
            let primary = primary.clone();
            let stopped = stopped.clone();
            let written = Arc::clone(&written);
            tokio::spawn(async move {
                let mut writes = Vec::new();
                let mut pace = tokio::time::interval(Duration::from_millis(1));
                let mut lba = first_lba;
                while !*stopped.borrow() && lba < BLOCKS {
                    pace.tick().await;
                    let lsn = primary.write(lba, block(lba)).await.unwrap();
                    writes.push((lsn, lba));
                    written.store(lsn, Ordering::Relaxed);
                    lba += 1;
                }
                writes
            })
        };
        let barriers = {
            let primary = primary.clone();
            let mut stopped = stopped;
            tokio::spawn(async move {
                let (mut acked, mut failed) = (0, 0);
                while !*stopped.borrow() {
                    match primary.barrier().await {
                        Ok(committed) => acked = acked.max(committed),
                        // sync_all waits for the recovering replica: a
                        // barrier may time out; the writes go on. One that
                        // fails at once is not asked again in a tight loop.
                        Err(_) => {
                            failed += 1;
                            let pause = Duration::from_millis(10);
                            let _ = tokio::time::timeout(pause, stopped.changed()).await;
                        }
                    }
                }
                (acked, failed)
            })
        };
        Self {
            stop,
            writer,
            barriers,
        }
    }

    /// Stops the load; returns the (lsn, lba) of every write and the highest
    /// LSN a barrier acknowledged while it ran.
    async fn stop(self) -> (Vec<(u64, u64)>, u64) {
        self.stop.send_replace(true);
        let writes = self.writer.await.unwrap();
        let (acked, _failed) = self.barriers.await.unwrap();
        (writes, acked)
    }
}

/// `take_down` stops r2 (and writes meanwhile); r2 restarts under load and
/// must recover in a way that logs `expected` (`<event> <detail>` prefix).
async fn recover_under_load(
    mode: CommitMode,
    tuning: Tuning,
    take_down: impl AsyncFnOnce(&mut Cluster),
    expected: &str,
) {
    let mut cluster = start_with(mode, &["r1", "r2"], tuning).await;
    cluster.wait_all_in_sync(LONG).await.unwrap();
    cluster.write_blocks(0, 20).await.unwrap();
    cluster.primary.barrier().await.unwrap();
    take_down(&mut cluster).await;
    let load = Load::start(&cluster.primary, BEFORE);
    cluster.restart_replica("r2", false).await.unwrap();
    cluster
        .wait_state("r2", ReplicaState::InSync, LONG)
        .await
        .unwrap();
    // Some writes land after it is back in sync too.
    cluster.wait_durable_past("r2", 50, LONG).await.unwrap();
    let (writes, acked_under_load) = load.stop().await;
    let last = writes.last().unwrap().0;
    assert!(cluster.primary.barrier().await.unwrap() >= last);
    cluster.wait_converged(LONG).await.unwrap();
    let events = cluster.events().await.unwrap();
    assert_logged(&events, |e| e.starts_with(&format!("vol1/r2 {expected}")));
    if !expected.starts_with("plan_rebuild") {
        assert!(
            !cluster.has_event("r2", "plan_rebuild").await.unwrap(),
            "{events:#?}"
        );
    }
    if mode == CommitMode::SyncQuorum {
        assert!(acked_under_load > 0, "the quorum kept acknowledging writes");
    }
    for (lsn, lba) in writes {
        for handle in [&cluster.primary, cluster.replica("r2")] {
            assert_eq!(
                handle.read(lba, 1).await.unwrap(),
                block(lba),
                "write at lsn {lsn} (lba {lba})"
            );
        }
    }
    for lba in 0..20 {
        assert_eq!(
            cluster.replica("r2").read(lba, 1).await.unwrap(),
            block(lba)
        );
    }
}

/// r2 loses its disk: everything up to here committed and checkpointed
/// (the checkpoint is the snapshot a rebuild can use), the WAL recycled
/// past where the new disk starts.
async fn r2_loses_its_disk(cluster: &mut Cluster) {
    let last = cluster.write_blocks(20, BEFORE - 20).await.unwrap();
    cluster.primary.barrier().await.unwrap();
    // Under sync_quorum the barrier may return before the primary's own
    // sync does; the checkpoint still covers every write before it.
    cluster.primary.checkpoint().await.unwrap();
    assert_eq!(cluster.status().await.unwrap().checkpoint, last);
    cluster.stop_replica("r2").await;
    std::fs::remove_dir_all(&cluster.node("r2").dir).unwrap();
}

async fn catch_up_under_load(mode: CommitMode, expected: &str) {
    let away = async |cluster: &mut Cluster| {
        cluster.stop_replica("r2").await;
        cluster.write_blocks(20, BEFORE - 20).await.unwrap();
    };
    recover_under_load(mode, tuning(), away, expected).await;
}

/// Only explicit checkpoints: the snapshot a plan binds stays where it is.
fn snapshot_tuning() -> Tuning {
    let mut made = tuning_without_holds();
    made.checkpoint_every_lsns = 1 << 20;
    made
}

fn full_base_tuning() -> Tuning {
    let mut made = tuning_without_holds();
    made.snapshot_rebuilds = false;
    made
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_go_on_while_a_replica_catches_up_under_sync_all() {
    // Nothing commits without r2: it holds everything committed, and what
    // was written since reaches it as the live tail.
    catch_up_under_load(
        CommitMode::SyncAll,
        "handshake flushed=20 committed=20: zero_gap",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_go_on_while_a_replica_catches_up_under_sync_quorum() {
    catch_up_under_load(CommitMode::SyncQuorum, "plan_catchup ship ").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_go_on_while_a_replica_rebuilds_from_snapshot_and_tail_under_sync_all() {
    recover_under_load(
        CommitMode::SyncAll,
        snapshot_tuning(),
        r2_loses_its_disk,
        "plan_rebuild_snapshot_tail snapshot at 300",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_go_on_while_a_replica_rebuilds_from_snapshot_and_tail_under_sync_quorum() {
    recover_under_load(
        CommitMode::SyncQuorum,
        snapshot_tuning(),
        r2_loses_its_disk,
        "plan_rebuild_snapshot_tail snapshot at 300",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_go_on_while_a_replica_rebuilds_from_a_full_base_under_sync_all() {
    recover_under_load(
        CommitMode::SyncAll,
        full_base_tuning(),
        r2_loses_its_disk,
        "plan_rebuild_full_base",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_go_on_while_a_replica_rebuilds_from_a_full_base_under_sync_quorum() {
    recover_under_load(
        CommitMode::SyncQuorum,
        full_base_tuning(),
        r2_loses_its_disk,
        "plan_rebuild_full_base",
    )
    .await;
}
