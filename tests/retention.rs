//! Retention holds over loopback TCP with real files: a replica that is away
//! keeps the WAL it needs while it stays within the volume's budget, in
//! bytes and in time, and comes back by catch-up however often the
//! checkpointer runs; past the budget its hold is released with the reason
//! logged, and it comes back by rebuild.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::time::Duration;
use support::*;
use walship::actors::Tuning;
use walship::engine::{CommitMode, ReplicaState};

const LONG: Duration = Duration::from_secs(20);

/// Checkpoints (and recycles) every 16 LSNs; segments hold about 15 frames.
fn eager_checkpoints() -> Tuning {
    let mut made = tuning();
    made.checkpoint_every_lsns = 16;
    made
}

async fn away_and_back(cluster: &mut Cluster, server: &str, from: u64, writes: u64) {
    cluster.stop_replica(server).await;
    cluster.write_blocks(from, writes).await.unwrap();
    cluster.primary.barrier().await.unwrap();
    // Whatever the checkpointer may recycle, it does now.
    cluster.primary.checkpoint().await.unwrap();
    cluster.restart_replica(server, false).await.unwrap();
    cluster
        .wait_state(server, ReplicaState::InSync, LONG)
        .await
        .unwrap();
}

fn count(events: &[String], prefix: &str) -> usize {
    events.iter().filter(|e| e.starts_with(prefix)).count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a4_short_outages_always_come_back_by_catch_up() {
    let mut cluster = start_with(CommitMode::BestEffort, &["r1", "r2"], eager_checkpoints()).await;
    cluster
        .wait_state("r2", ReplicaState::InSync, LONG)
        .await
        .unwrap();
    for round in 0..10 {
        away_and_back(&mut cluster, "r2", round * 36, 36).await;
    }
    cluster.wait_converged(LONG).await.unwrap();
    let events = cluster.events().await.unwrap();
    let tail = serde_json::to_value(cluster.status().await.unwrap()).unwrap()["tail"]
        .as_u64()
        .unwrap();
    assert!(tail > 0, "the checkpointer did recycle: tail {tail}");
    assert!(
        !cluster.has_event("r2", "plan_rebuild").await.unwrap(),
        "{events:#?}"
    );
    assert!(!cluster
        .has_event("r2", "retention_budget_exceeded")
        .await
        .unwrap());
    let catch_ups: u64 = cluster
        .primary
        .recovery_log()
        .await
        .unwrap()
        .iter()
        .filter(|e| {
            e.event == "plan_catchup" && e.replica.as_ref().is_some_and(|r| r.server() == "r2")
        })
        .map(|e| 1 + e.repeats)
        .sum();
    assert_eq!(catch_ups, 10, "{events:#?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a6_an_outage_within_the_byte_budget_catches_up_and_one_past_it_rebuilds() {
    // 100 frames of 4 KiB fit in the budget, 300 do not.
    let tuning = {
        let mut made = eager_checkpoints();
        made.retention_max_bytes = Some(200 * 4130);
        made
    };
    let mut cluster = start_with(CommitMode::BestEffort, &["r1", "r2"], tuning).await;
    cluster
        .wait_state("r2", ReplicaState::InSync, LONG)
        .await
        .unwrap();
    away_and_back(&mut cluster, "r2", 0, 100).await;
    assert!(cluster.has_event("r2", "plan_catchup").await.unwrap());
    assert!(!cluster
        .has_event("r2", "retention_budget_exceeded")
        .await
        .unwrap());
    cluster.stop_replica("r2").await;
    cluster.write_blocks(100, 300).await.unwrap();
    cluster.primary.barrier().await.unwrap();
    cluster
        .wait_event("r2", "retention_budget_exceeded", LONG)
        .await
        .unwrap();
    cluster.primary.checkpoint().await.unwrap();
    cluster.bring_back("r2", LONG).await.unwrap();
    let events = cluster.events().await.unwrap();
    assert_logged(&events, |e| {
        e.starts_with("vol1/r2 retention_budget_exceeded holds ")
            && e.contains("budget 826000 bytes")
    });
    assert_logged(&events, |e| {
        e.starts_with("vol1/r2 handshake")
            && e.contains("gap_beyond_retention")
            && e.contains("(its retention hold was released: retention_budget_exceeded")
    });
    assert!(cluster.has_event("r2", "rebuild_completed").await.unwrap());
    assert_eq!(count(&events, "vol1/r2 plan_catchup"), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a6_an_outage_past_the_time_budget_rebuilds() {
    let tuning = {
        let mut made = eager_checkpoints();
        // Wide enough that the first outage (~100 ms here) stays within it
        // on a loaded CI machine too; the second waits it out.
        made.retention_max_away = Some(Duration::from_secs(4));
        made
    };
    let mut cluster = start_with(CommitMode::BestEffort, &["r1", "r2"], tuning).await;
    cluster
        .wait_state("r2", ReplicaState::InSync, LONG)
        .await
        .unwrap();
    // Back well within 4 s (a restart on loopback): catch-up.
    away_and_back(&mut cluster, "r2", 0, 20).await;
    assert!(!cluster
        .has_event("r2", "retention_budget_exceeded")
        .await
        .unwrap());
    // Away past it: the hold goes while it is away, even with few writes.
    cluster.stop_replica("r2").await;
    cluster.write_blocks(20, 10).await.unwrap();
    cluster
        .wait_event("r2", "retention_budget_exceeded", LONG)
        .await
        .unwrap();
    // Released: nothing keeps the checkpointer from recycling past it now.
    cluster.write_blocks(30, 100).await.unwrap();
    cluster.primary.barrier().await.unwrap();
    cluster.primary.checkpoint().await.unwrap();
    cluster.bring_back("r2", LONG).await.unwrap();
    let events = cluster.events().await.unwrap();
    assert_logged(&events, |e| {
        e.starts_with("vol1/r2 retention_budget_exceeded away for ")
            && e.contains("budget 800 ticks")
    });
    assert!(cluster.has_event("r2", "rebuild_completed").await.unwrap());
}
