//! A replica whose storage fails (EIO from a failing disk, ENOSPC from a full
//! one) says so to the primary before its connection closes; the primary
//! keeps the cause in the replica's status and in the failures of the
//! barriers it holds up, and retries it with a backoff instead of in a loop.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};
use support::*;
use walship::actors::{Tuning, VolumeError};
use walship::engine::{BarrierFailure, CommitMode, FailureCause, ReplicaState};

const LONG: Duration = Duration::from_secs(20);

/// Barriers fail after 300 ms; a replica whose storage failed is retried
/// after 200 ms, then 400, 800, ... at most 2 s.
fn tuning_for_failures() -> Tuning {
    let mut made = tuning();
    made.barrier_timeout_ticks = 60;
    made
}

/// Waits until the primary counts `attempts` storage failures of `server`
/// in a row; returns how long that took from `start`.
async fn wait_storage_failures(
    cluster: &Cluster,
    server: &str,
    attempts: u32,
    start: Instant,
) -> Duration {
    let failed = within(LONG, || async {
        let status = cluster.sender_status(server).await.unwrap();
        let failure = status.failure?;
        (failure.cause == FailureCause::ReplicaStorage && failure.attempts >= attempts)
            .then(|| start.elapsed())
    });
    match failed.await {
        Some(took) => took,
        None => {
            let status = cluster.sender_status(server).await.unwrap();
            panic!("{server} never failed {attempts} times: {status:?}")
        }
    }
}

/// A barrier that fails because of `server`, naming its storage failure.
async fn assert_barrier_names_the_cause(cluster: &Cluster, server: &str, cause: &str) {
    let error = cluster.primary.barrier().await.unwrap_err();
    let VolumeError::Barrier(BarrierFailure::TimedOut { lagging, .. }) = &error else {
        panic!("{error}");
    };
    let lagging = lagging
        .iter()
        .find(|l| l.replica.server() == server)
        .unwrap_or_else(|| panic!("{error}"));
    let said = lagging.cause.clone().unwrap_or_default();
    assert!(
        said.starts_with("replica storage failed: ") && said.contains(cause),
        "{error}"
    );
    assert!(error.to_string().contains(cause), "{error}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_whose_disk_fails_says_so_and_is_retried_with_backoff() {
    let mut cluster = start_with(CommitMode::SyncAll, &["r1", "r2"], tuning_for_failures()).await;
    cluster
        .wait_state("r1", ReplicaState::InSync, LONG)
        .await
        .unwrap();
    cluster
        .wait_state("r2", ReplicaState::InSync, LONG)
        .await
        .unwrap();
    cluster.write_blocks(0, 10).await.unwrap();
    cluster.primary.barrier().await.unwrap();
    // r2's next fsync fails with EIO: its WAL is poisoned.
    let start = Instant::now();
    cluster
        .replica("r2")
        .inject_storage_failure()
        .await
        .unwrap();
    let sessions = cluster.sessions_created("r2").await.unwrap();
    cluster.write_blocks(10, 1).await.unwrap();
    assert_barrier_names_the_cause(&cluster, "r2", "Input/output error").await;
    cluster
        .wait_event("r2", "replica_storage_failed", LONG)
        .await
        .unwrap();
    // Every hello fails the same way (the WAL stays poisoned): retried after
    // 200, 400 and 800 ms, not at every 20 ms heartbeat. The engine counts
    // them in ticks from the tick it saw the failure in, so each may fire
    // up to one tick (5 ms) early in real time (seen: 1.3991 s).
    let took = wait_storage_failures(&cluster, "r2", 4, start).await;
    assert!(
        took >= Duration::from_millis(1400 - 3 * 5),
        "4 failures in {took:?}"
    );
    let retries = cluster.sessions_created("r2").await.unwrap() - sessions;
    assert!(
        (3..=5).contains(&retries),
        "{retries} sessions for 4 failures"
    );
    let status = cluster.sender_status("r2").await.unwrap();
    let failure = status.failure.unwrap();
    assert!(failure.reason.contains("os error 5"), "{}", failure.reason);
    let events = cluster.events().await.unwrap();
    assert_logged(&events, |e| {
        e.starts_with("vol1/r2 replica_storage_failed")
            && e.contains("storage failure: sync")
            && e.contains("Input/output error")
    });
    // A new disk (here: a restart, which reopens the store): back in sync,
    // the failure forgotten, the writes committed.
    cluster.stop_replica("r2").await;
    cluster.restart_replica("r2", false).await.unwrap();
    cluster.primary.heartbeat().await.unwrap();
    cluster
        .wait_state("r2", ReplicaState::InSync, LONG)
        .await
        .unwrap();
    assert!(cluster.primary.barrier().await.unwrap() >= 11);
    cluster.wait_converged(LONG).await.unwrap();
    assert_eq!(cluster.sender_status("r2").await.unwrap().failure, None);
}

/// A small tmpfs mounted for one test, unmounted when dropped.
struct Tmpfs {
    path: PathBuf,
    _dir: tempfile::TempDir,
}

impl Tmpfs {
    /// `None` where this process may not mount (not root, no CAP_SYS_ADMIN).
    fn mount(bytes: u64) -> Option<Self> {
        let dir = tempfile::tempdir().ok()?;
        let path = dir.path().join("disk");
        std::fs::create_dir(&path).ok()?;
        let mounted = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={bytes}"), "tmpfs"])
            .arg(&path)
            .status()
            .is_ok_and(|s| s.success());
        mounted.then_some(Self { path, _dir: dir })
    }

    fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.path).status();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_out_of_space_on_a_real_tmpfs_says_so_and_nobody_storms_it() {
    // 6 MiB for a volume of 8 MiB: the replica fills its disk.
    let Some(disk) = Tmpfs::mount(6 << 20) else {
        eprintln!(
            "skipped: this process cannot mount a tmpfs (the fault-injection test covers the path)"
        );
        return;
    };
    let mut cluster = Cluster::start(ClusterOptions {
        replica_dirs: vec![("r2".into(), disk.path().join("r2"))],
        ..options(CommitMode::SyncAll, &["r1", "r2"], tuning_for_failures())
    })
    .await
    .unwrap();
    cluster
        .wait_state("r2", ReplicaState::InSync, LONG)
        .await
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut lba = 0;
    let error = loop {
        cluster.write_blocks(lba, 16).await.unwrap();
        lba += 16;
        match cluster.primary.barrier().await {
            Err(error) if error.to_string().contains("No space left on device") => break error,
            // A barrier may also time out on r1 alone, on a machine busy
            // enough that its fsync takes longer than the barrier timeout
            // (seen once in CI, with r1 in sync and lagging 4 LSNs): not
            // what this test is about, so the writes go on.
            Err(other) => eprintln!("barrier failed without ENOSPC, going on: {other}"),
            Ok(_) => {}
        }
        assert!(Instant::now() < deadline, "r2 never ran out of space");
    };
    // It failed at most a barrier timeout ago.
    let failed_at = Instant::now() - Duration::from_millis(300);
    assert!(
        error.to_string().contains("No space left on device"),
        "{error}"
    );
    let took = wait_storage_failures(&cluster, "r2", 3, failed_at).await;
    assert!(took >= Duration::from_millis(500), "3 failures in {took:?}");
    let events = cluster.events().await.unwrap();
    assert_logged(&events, |e| {
        e.starts_with("vol1/r2 replica_storage_failed") && e.contains("No space left on device")
    });
    let sessions = cluster.sessions_created("r2").await.unwrap();
    assert!(sessions <= 8, "{sessions} sessions: a storm\n{events:#?}");
    assert_barrier_names_the_cause(&cluster, "r2", "No space left on device").await;
    cluster.stop_replica("r2").await;
    drop(cluster);
    drop(disk);
}

/// A primary whose WAL sync fails refuses every write after it, and neither
/// reports the unsynced write durable nor commits it.
#[tokio::test]
async fn a_primary_whose_sync_fails_refuses_writes_and_commits_nothing_more() {
    let cluster = start_with(CommitMode::BestEffort, &[], tuning_for_failures()).await;
    let good = cluster.write_blocks(0, 4).await.unwrap();
    assert_eq!(cluster.primary.barrier().await.unwrap(), good);
    cluster.primary.inject_storage_failure().await.unwrap();
    let lost = cluster.primary.write(10, block(10)).await.unwrap();
    // The failed sync runs on the pool; once it is back, writes are refused.
    let reason = within(LONG, || async {
        match cluster.primary.write(11, block(11)).await {
            Err(VolumeError::Poisoned(reason)) => Some(reason),
            Ok(_) => None,
            Err(other) => panic!("expected a poisoned volume, got {other}"),
        }
    })
    .await
    .expect("writes refused once the sync failed");
    assert!(reason.contains("fdatasync"), "{reason}");
    assert!(matches!(
        cluster.primary.barrier_at(lost).await,
        Err(VolumeError::Barrier(_))
    ));
    let status = cluster.status().await.unwrap();
    assert_eq!(
        status.durable, good,
        "nothing past the last good sync is durable"
    );
    assert_eq!(status.registry.history.committed.get(), good);
    assert!(matches!(
        cluster.primary.checkpoint().await,
        Err(VolumeError::Poisoned(_))
    ));
}

/// A checkpoint asked for right after a write covers it, though the write
/// returned before its sync did: the checkpoint waits for the WAL.
#[tokio::test]
async fn a_checkpoint_covers_every_write_before_it() {
    let cluster = start_with(CommitMode::BestEffort, &[], tuning()).await;
    for round in 0..8 {
        let last = cluster.write_blocks(round * 4, 4).await.unwrap();
        cluster.primary.checkpoint().await.unwrap();
        let status = cluster.status().await.unwrap();
        assert_eq!(status.checkpoint, last, "round {round}");
        assert!(status.durable >= last);
    }
}
