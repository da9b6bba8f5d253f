//! What the system tests share: the loopback harness
//! (`walship::actors::testing`), sized and tuned for tests.
#![allow(dead_code, unused_imports, clippy::unwrap_used, clippy::expect_used)]

pub use walship::actors::testing::{
    block, fast_tuning as tuning, within, ClusterOptions, LoopbackCluster as Cluster, Node, Relay,
};
use walship::actors::Tuning;
use walship::engine::CommitMode;
use walship::io::StoreOptions;

pub const VOLUME: &str = "vol1";
pub const BLOCKS: u64 = 2048;
/// Replicas checkpoint this often unless a test says otherwise.
pub const REPLICA_CHECKPOINT_EVERY: u64 = 64;

/// A tuning whose away replicas lose their retention hold at once: the
/// checkpointer then recycles past them, as tests of rebuilds need.
pub fn tuning_without_holds() -> Tuning {
    let mut made = tuning();
    made.retention_max_bytes = Some(0);
    made
}

/// Small segments, and no waiting for a previous instance's lock: a
/// volume's stop returns with its store released, and a reopen right after
/// it proves that it did.
pub fn store_options() -> StoreOptions {
    StoreOptions {
        segment_bytes: 64 * 1024,
        lock_wait: std::time::Duration::ZERO,
        ..StoreOptions::new(BLOCKS)
    }
}

/// The tests' cluster: volume `vol1` of `BLOCKS` blocks, replicas on
/// `servers`, fast tuning.
pub fn options(mode: CommitMode, servers: &[&str], tuning: Tuning) -> ClusterOptions {
    ClusterOptions {
        cluster: "test".into(),
        mode,
        tuning,
        store: store_options(),
        replica_checkpoint_every: REPLICA_CHECKPOINT_EVERY,
        ..ClusterOptions::new(VOLUME, BLOCKS).with_replicas(servers)
    }
}

pub async fn start(mode: CommitMode, servers: &[&str]) -> Cluster {
    start_with(mode, servers, tuning()).await
}

pub async fn start_with(mode: CommitMode, servers: &[&str], tuning: Tuning) -> Cluster {
    Cluster::start(options(mode, servers, tuning))
        .await
        .unwrap()
}

/// The replica on `server`'s status, as an operator's JSON shows it.
pub async fn replica_json(cluster: &Cluster, server: &str) -> serde_json::Value {
    serde_json::to_value(cluster.replica_status(server).await.unwrap()).unwrap()
}

/// Fails with the whole log unless some event satisfies `matches`.
pub fn assert_logged(events: &[String], matches: impl Fn(&String) -> bool) {
    assert!(events.iter().any(matches), "{events:#?}");
}

/// The details of the primary's `event`s for `server`, in order.
pub fn logged(events: &[String], server: &str, event: &str) -> Vec<String> {
    let prefix = format!("{VOLUME}/{server} {event} ");
    events
        .iter()
        .filter_map(|e| e.strip_prefix(&prefix).map(str::to_owned))
        .collect()
}
