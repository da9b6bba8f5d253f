//! Convergence over loopback TCP: a writer faster than a deliberately
//! slowed link (a relay passing the primary's stream at a fixed rate).
//! Without backpressure the replica is reported `not_converging` within
//! the budget, with its rates in status; with the opt-in backpressure the
//! writes are held to a share of what the link passes, the writer keeps
//! writing, and the replica catches up while it does. A catch-up held back
//! by the node's recovery rate gets first call on it, and the rate holds.
//! Every case ends with the replica's content equal to the primary's.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use bytes::Bytes;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use support::*;
use walship::actors::{RecoveryLimits, Tuning, VolumeHandle};
use walship::engine::{CommitMode, ConvergenceStep, ReplicaState};

const LONG: Duration = Duration::from_secs(60);
const KIB: u64 = 1024;
/// What the slowed link passes.
const LINK: u64 = 512 * KIB;
/// What is judged "within the budget": a backlog that would take longer
/// to go is not converging.
const BUDGET: Duration = Duration::from_secs(4);

fn converge_tuning(backpressure: Option<u8>) -> Tuning {
    let mut made = tuning();
    // Little in flight: the backlog waits in the WAL, where it is
    // measured (caught up at 2 x 64 KiB).
    made.max_inflight_bytes = 64 * KIB as usize;
    made.batch_bytes = 32 * KIB as usize;
    made.convergence_window = Duration::from_millis(500);
    made.converge_within = Some(BUDGET);
    made.write_backpressure_percent = backpressure;
    made.max_write_delay = Duration::from_millis(60);
    made
}

/// Writes 16 KiB every 5 ms (about 3 MiB/s, six times the link) until
/// stopped, each answered before the next; counts the writes.
struct Writer {
    stop: Arc<AtomicBool>,
    writes: Arc<AtomicU64>,
    task: tokio::task::JoinHandle<()>,
}

impl Writer {
    fn start(primary: VolumeHandle) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let writes = Arc::new(AtomicU64::new(0));
        let (flag, count) = (Arc::clone(&stop), Arc::clone(&writes));
        let task = tokio::spawn(async move {
            let mut i = 0u64;
            while !flag.load(Ordering::Relaxed) {
                let lba = (i * 4) % BLOCKS;
                let data = Bytes::from(vec![(i % 251) as u8; 16 * KIB as usize]);
                primary.write(lba, data).await.unwrap();
                count.fetch_add(1, Ordering::Relaxed);
                i += 1;
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        });
        Self { stop, writes, task }
    }

    fn writes(&self) -> u64 {
        self.writes.load(Ordering::Relaxed)
    }

    async fn stop(self) -> u64 {
        self.stop.store(true, Ordering::Relaxed);
        self.task.await.unwrap();
        self.writes.load(Ordering::Relaxed)
    }
}

/// A cluster with r1 in sync behind a relay passing `LINK` bytes a second.
async fn behind_a_slow_link(tuning: Tuning) -> (Cluster, Relay) {
    let mut cluster = start_with(CommitMode::BestEffort, &["r1"], tuning).await;
    cluster.wait_all_in_sync(LONG).await.unwrap();
    let relay = cluster.relay("r1").await.unwrap();
    relay.limit_rate(Some(LINK));
    cluster
        .wait_state("r1", ReplicaState::InSync, LONG)
        .await
        .unwrap();
    (cluster, relay)
}

/// Lets the link go, waits until r1 holds the primary's content.
async fn heal(cluster: &Cluster, relay: &Relay) {
    relay.limit_rate(None);
    cluster
        .wait_state("r1", ReplicaState::InSync, LONG)
        .await
        .unwrap();
    cluster.wait_converged(LONG).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_writer_faster_than_a_slow_link_is_reported_not_converging_within_the_budget() {
    let (cluster, relay) = behind_a_slow_link(converge_tuning(None)).await;
    let writer = Writer::start(cluster.primary.clone());
    let started = Instant::now();
    cluster
        .wait_event("r1", "not_converging", LONG)
        .await
        .unwrap();
    let reported = started.elapsed();
    assert!(
        reported < BUDGET,
        "not_converging said after {reported:?}, budget {BUDGET:?}"
    );
    let events = cluster.events().await.unwrap();
    let said = logged(&events, "r1", "not_converging");
    assert!(
        said[0].starts_with("live ") && said[0].contains(" <= ingest "),
        "{said:?}"
    );
    // Status says so, with the rates behind it: what reaches r1 is about
    // the link's rate, below what the volume ingests.
    let status = cluster.sender_status("r1").await.unwrap();
    let c = status.convergence.expect("watched");
    assert_eq!(c.converging, Some(false), "{c:?}");
    assert_eq!(c.step, ConvergenceStep::Watching, "no step is configured");
    let (drain, ingest) = (c.drain_rate.unwrap(), c.ingest_rate.unwrap());
    assert!(drain < 2 * LINK && ingest > drain, "{c:?}");
    // No write was held back: backpressure is opt-in.
    let volume = cluster.status().await.unwrap();
    assert_eq!(volume.write_backpressure.limit, None);
    assert_eq!(volume.write_backpressure.delayed_writes, 0);
    writer.stop().await;
    heal(&cluster, &relay).await;
    cluster.wait_event("r1", "converged", LONG).await.unwrap();
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backpressure_holds_the_writes_to_a_share_of_the_link_and_the_replica_catches_up() {
    let (cluster, relay) = behind_a_slow_link(converge_tuning(Some(50))).await;
    let writer = Writer::start(cluster.primary.clone());
    cluster
        .wait_event("r1", "convergence_escalated", LONG)
        .await
        .unwrap();
    let held_at = writer.writes();
    let volume = cluster.status().await.unwrap();
    let limit = volume.write_backpressure.limit.expect("writes held");
    assert!(limit < LINK, "half of what reaches r1: {limit}");
    // Caught up while the writer still writes: production slowed, never
    // stopped.
    cluster.wait_event("r1", "converged", LONG).await.unwrap();
    assert!(writer.writes() > held_at, "the writer was paused");
    let written = writer.stop().await;
    let events = cluster.events().await.unwrap();
    let steps = logged(&events, "r1", "convergence_escalated");
    assert!(
        steps[0].starts_with("backpressure: the volume's writes held to 50% of "),
        "an in-sync replica's first step (no boost for live shipping): {steps:?}"
    );
    let volume = cluster.status().await.unwrap();
    let delayed = volume.write_backpressure.delayed_writes;
    assert!(delayed > 0 && delayed <= written, "{delayed} of {written}");
    heal(&cluster, &relay).await;
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_catch_up_held_back_by_the_recovery_rate_gets_first_call_on_it_and_the_rate_holds() {
    let mut cluster = start_with(CommitMode::BestEffort, &["r1"], converge_tuning(None)).await;
    cluster.wait_all_in_sync(LONG).await.unwrap();
    // The node's recovery budget: 1 MiB/s, the lowest floor there is.
    let budget = cluster.rt.recovery();
    let rate = walship::actors::MIN_FLOOR_BYTES;
    let limits = RecoveryLimits::default()
        .with_floor(rate)
        .with_rate(Some(rate));
    budget.set_limits(limits).unwrap();
    cluster.stop_replica("r1").await;
    // A gap of 2 MiB, then r1 returns while the writer adds 3 MiB/s: its
    // catch-up, held to 1 MiB/s, falls behind.
    for i in 0..128u64 {
        let data = Bytes::from(vec![i as u8; 16 * KIB as usize]);
        cluster.primary.write((i * 4) % BLOCKS, data).await.unwrap();
    }
    let writer = Writer::start(cluster.primary.clone());
    let sent_before = budget.status().bytes_sent;
    let returned = Instant::now();
    cluster.restart_replica("r1", false).await.unwrap();
    cluster
        .wait_event("r1", "convergence_escalated", LONG)
        .await
        .unwrap();
    let events = cluster.events().await.unwrap();
    let steps = logged(&events, "r1", "convergence_escalated");
    assert!(
        steps[0].starts_with("boost: its catch-up takes from the recovery budget first (catch-up "),
        "{steps:?}"
    );
    writer.stop().await;
    cluster
        .wait_state("r1", ReplicaState::InSync, LONG)
        .await
        .unwrap();
    // Boosted, its sends went through the first-call lane, and the
    // node's rate still held (a tenth of a second's burst aside).
    let took = returned.elapsed().as_secs_f64();
    let status = budget.status();
    assert!(status.boosted_bytes > 0, "the boost was not carried out");
    let sent = (status.bytes_sent - sent_before) as f64;
    assert!(
        sent <= rate as f64 * (took + 0.2),
        "{sent} bytes in {took:.2} s at {rate} bytes/s"
    );
    cluster.wait_converged(LONG).await.unwrap();
    cluster.wait_event("r1", "converged", LONG).await.unwrap();
    cluster.shutdown().await;
}
