//! A power loss of one node, or of every node at once, under a cluster
//! that is writing: each node's store sits on the io crate's page-cache
//! model (`SimFs`), so a power loss keeps only what was synced (or a
//! seeded part of the rest), as a real one would. Writers keep writing
//! with `write_committed` until the node dies; afterwards every write that
//! was acknowledged reads back from the primary, every block holds a value
//! some writer wrote there, and every replica converges on the primary's
//! content. The primary peers before it serves, as a node's does.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use support::*;
use walship::actors::Peering;
use walship::engine::CommitMode;
use walship::io::fs::{Fault, FsRef, PowerLoss, SimFs};

const LONG: Duration = Duration::from_secs(30);
const WRITERS: u64 = 4;
/// Blocks each writer cycles over.
const SPAN: u64 = 64;

/// What the writers did to each block.
#[derive(Debug, Default)]
struct Block {
    /// The seed of the last write acknowledged.
    acked: Option<u64>,
    /// Seeds written after it and not acknowledged: any may be there.
    after: Vec<u64>,
}

/// Every block the writers wrote, and how many writes were acknowledged.
#[derive(Debug, Default)]
struct Log {
    blocks: BTreeMap<u64, Block>,
    acks: usize,
}

type Blocks = Arc<Mutex<Log>>;

/// Writer `w` writes its blocks (`w`, `w + WRITERS`, ...) in turn, each
/// with a new seed, until a write fails or it is told to stop.
async fn writer(cluster: Arc<Cluster>, w: u64, blocks: Blocks, from: u64, stop: Arc<AtomicBool>) {
    for i in from.. {
        if stop.load(Ordering::Relaxed) {
            return;
        }
        let lba = w + WRITERS * (i % SPAN);
        let seed = 1 + i * WRITERS + w;
        blocks
            .lock()
            .unwrap()
            .blocks
            .entry(lba)
            .or_default()
            .after
            .push(seed);
        let Ok(_) = cluster.primary.write_committed(lba, block(seed)).await else {
            return;
        };
        let mut log = blocks.lock().unwrap();
        log.acks += 1;
        let entry = log.blocks.entry(lba).or_default();
        entry.acked = Some(seed);
        entry.after.clear();
    }
}

/// Writers running.
struct Writers {
    tasks: Vec<tokio::task::JoinHandle<()>>,
    stop: Arc<AtomicBool>,
}

impl Writers {
    /// Tells them to stop and waits until they have.
    async fn stop(self) {
        self.stop.store(true, Ordering::Relaxed);
        for task in self.tasks {
            tokio::time::timeout(LONG, task)
                .await
                .expect("a writer did not stop")
                .unwrap();
        }
    }
}

/// Starts the writers (seeds from `from`), waits until `at_least` blocks
/// have an acknowledged write, and returns them running.
async fn write_until(
    cluster: &Arc<Cluster>,
    blocks: &Blocks,
    from: u64,
    at_least: usize,
) -> Writers {
    let stop = Arc::new(AtomicBool::new(false));
    let tasks = (0..WRITERS)
        .map(|w| {
            let (cluster, blocks, stop) =
                (Arc::clone(cluster), Arc::clone(blocks), Arc::clone(&stop));
            tokio::spawn(writer(cluster, w, blocks, from, stop))
        })
        .collect();
    wait_acknowledged(blocks, at_least).await;
    Writers { tasks, stop }
}

async fn wait_acknowledged(blocks: &Blocks, at_least: usize) {
    within(LONG, || async { (acks(blocks) >= at_least).then_some(()) })
        .await
        .unwrap_or_else(|| panic!("fewer than {at_least} blocks acknowledged"));
}

/// How many writes were acknowledged so far.
fn acks(blocks: &Blocks) -> usize {
    blocks.lock().unwrap().acks
}

/// Every acknowledged write reads back from the primary, and every block
/// holds something its writer wrote.
async fn assert_acknowledged_blocks(cluster: &Cluster, blocks: &Blocks, case: &str) {
    let blocks: Vec<(u64, Option<u64>, Vec<u64>)> = blocks
        .lock()
        .unwrap()
        .blocks
        .iter()
        .map(|(lba, b)| (*lba, b.acked, b.after.clone()))
        .collect();
    for (lba, acked, after) in blocks {
        let found = cluster.primary.read(lba, 1).await.unwrap();
        let may = acked.iter().chain(&after).any(|s| found == block(*s));
        let unwritten = acked.is_none() && found.iter().all(|b| *b == 0);
        assert!(
            may || unwritten,
            "{case}: block {lba} holds neither its acknowledged write {acked:?} nor a later one {after:?}"
        );
    }
}

/// The node (or nodes) on `fs` die at their next file operation, and
/// every later one fails: returns once one has.
async fn crash(fs: &SimFs) {
    fs.inject_next(Fault::Crash);
    within(LONG, || async { fs.crashed().then_some(()) })
        .await
        .expect("no file operation came to crash");
}

fn sim_options(mode: CommitMode, dir: &std::path::Path, fs: &SimFs) -> ClusterOptions {
    let mut options = options(mode, &["r1", "r2"], tuning());
    options.store.fs = Arc::new(fs.clone()) as FsRef;
    options.dir = Some(dir.to_path_buf());
    options.peering = Peering::enabled(0, None);
    options
}

/// Every node loses power at once in the middle of writes: each dies (its
/// next file operation and every later one fail), then the power goes.
async fn every_node_loses_power(mode: CommitMode, seed: u64) {
    let root = tempfile::tempdir().unwrap();
    let fs = SimFs::new();
    let options = sim_options(mode, root.path(), &fs);
    let cluster = Arc::new(Cluster::start(options.clone()).await.unwrap());
    cluster.wait_all_in_sync(LONG).await.unwrap();
    let blocks = Blocks::default();
    let writers = write_until(&cluster, &blocks, 0, 100).await;
    crash(&fs).await;
    writers.stop().await;
    Arc::into_inner(cluster).unwrap().shutdown().await;
    assert!(
        fs.power_loss(PowerLoss::Seeded(seed)) > 0,
        "nothing unsynced"
    );

    let cluster = Arc::new(Cluster::start(options).await.unwrap());
    let case = format!("{mode:?}, every node, seed {seed}");
    cluster.wait_all_in_sync(LONG).await.unwrap();
    assert_acknowledged_blocks(&cluster, &blocks, &case).await;
    // Writes go on, and every replica ends with the primary's content.
    let writers = write_until(&cluster, &blocks, 1 << 20, acks(&blocks) + 1).await;
    writers.stop().await;
    cluster.wait_converged(LONG).await.unwrap();
    assert_acknowledged_blocks(&cluster, &blocks, &case).await;
    Arc::into_inner(cluster).unwrap().shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn every_node_losing_power_at_once_loses_no_acknowledged_write_under_sync_all() {
    for seed in 1..=2 {
        every_node_loses_power(CommitMode::SyncAll, seed).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn every_node_losing_power_at_once_loses_no_acknowledged_write_under_sync_quorum() {
    for seed in 1..=2 {
        every_node_loses_power(CommitMode::SyncQuorum, seed).await;
    }
}

/// The primary alone loses power (the replicas keep running): it comes
/// back, peers, and takes back from them what it acknowledged and lost.
async fn the_primary_loses_power(mode: CommitMode, seed: u64) {
    let root = tempfile::tempdir().unwrap();
    let replicas = SimFs::new();
    let primary_fs = SimFs::new();
    let mut options = sim_options(mode, root.path(), &replicas);
    options.node_fs = vec![("primary".into(), Arc::new(primary_fs.clone()) as FsRef)];
    let mut cluster = Cluster::start(options).await.unwrap();
    cluster.wait_all_in_sync(LONG).await.unwrap();
    // The primary's own syncs lag its replicas' acks: under sync_quorum it
    // acknowledges writes its disk does not hold yet, and loses them.
    cluster
        .primary
        .slow_syncs(Duration::from_millis(5))
        .await
        .unwrap();
    let shared = Arc::new(cluster);
    let blocks = Blocks::default();
    let writers = write_until(&shared, &blocks, 0, 100).await;
    crash(&primary_fs).await;
    writers.stop().await;
    cluster = Arc::into_inner(shared).unwrap();
    cluster.primary.stop().await;
    assert!(
        primary_fs.power_loss(PowerLoss::Seeded(seed)) > 0,
        "nothing unsynced"
    );
    cluster.reopen_primary(1).await.unwrap();
    let case = format!("{mode:?}, the primary, seed {seed}");
    cluster.wait_all_in_sync(LONG).await.unwrap();
    assert_acknowledged_blocks(&cluster, &blocks, &case).await;
    cluster.wait_converged(LONG).await.unwrap();
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_primary_losing_power_loses_no_acknowledged_write() {
    for (mode, seed) in [(CommitMode::SyncAll, 3), (CommitMode::SyncQuorum, 4)] {
        the_primary_loses_power(mode, seed).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_replica_losing_power_while_writes_flow_comes_back_with_the_primarys_content() {
    let root = tempfile::tempdir().unwrap();
    let others = SimFs::new();
    let r1 = SimFs::new();
    let mut options = sim_options(CommitMode::SyncQuorum, root.path(), &others);
    options.node_fs = vec![("r1".into(), Arc::new(r1.clone()) as FsRef)];
    let cluster = Arc::new(Cluster::start(options).await.unwrap());
    cluster.wait_all_in_sync(LONG).await.unwrap();
    let blocks = Blocks::default();
    let writers = write_until(&cluster, &blocks, 0, 100).await;
    crash(&r1).await;
    // Writes flow on through r2 while r1 is dead.
    wait_acknowledged(&blocks, acks(&blocks) + 1).await;
    writers.stop().await;
    let mut cluster = Arc::into_inner(cluster).unwrap();
    cluster.stop_replica("r1").await;
    assert!(r1.power_loss(PowerLoss::Seeded(5)) > 0, "nothing unsynced");
    cluster.restart_replica("r1", false).await.unwrap();
    let cluster = Arc::new(cluster);
    let writers = write_until(&cluster, &blocks, 1 << 20, acks(&blocks) + 1).await;
    cluster
        .wait_state("r1", walship::engine::ReplicaState::InSync, LONG)
        .await
        .unwrap();
    writers.stop().await;
    cluster.wait_converged(LONG).await.unwrap();
    assert_acknowledged_blocks(&cluster, &blocks, "sync_quorum, r1").await;
    Arc::into_inner(cluster).unwrap().shutdown().await;
}
