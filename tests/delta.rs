//! Delta rebuilds over loopback TCP with real files: a replica away past
//! retention is rebuilt from the primary's dirty map and moves about what
//! changed; after a failover (no map) the regions whose checksums differ
//! move, with writes flowing; a whole rebuild cut part way resumes from what
//! the replica installed. Every case ends with the replica's content equal
//! to the primary's.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use bytes::Bytes;
use std::time::{Duration, Instant};
use support::*;
use walship::engine::{CommitMode, ReplicaState};
use walship::io::StoreOptions;

const LONG: Duration = Duration::from_secs(60);
/// 64 KiB: one region of a volume this size.
const REGION_BLOCKS: u64 = 16;
const REGION: u64 = REGION_BLOCKS * 4096;

fn cluster_options(blocks: u64, mode: CommitMode, servers: &[&str]) -> ClusterOptions {
    ClusterOptions {
        store: StoreOptions {
            // Three 64 KiB writes a segment: a checkpoint recycles soon
            // after a replica leaves.
            segment_bytes: 256 << 10,
            block_count: blocks,
            ..store_options()
        },
        ..options(mode, servers, {
            let mut made = tuning();
            // Away replicas lose their hold at once: the WAL moves on.
            made.retention_max_bytes = Some(0);
            made
        })
    }
}

fn region_data(region: u64, round: u64) -> Bytes {
    let mut data = vec![0u8; REGION as usize];
    for (i, byte) in data.iter_mut().enumerate() {
        *byte = (region * 31 + round * 7 + i as u64 / 4096) as u8;
    }
    Bytes::from(data)
}

/// Writes every region once.
async fn fill(cluster: &Cluster, blocks: u64) {
    for region in 0..blocks / REGION_BLOCKS {
        cluster
            .primary
            .write(region * REGION_BLOCKS, region_data(region, 0))
            .await
            .unwrap();
    }
    cluster.primary.barrier().await.unwrap();
}

/// Rewrites `count` regions spread over the volume; returns the bytes changed.
async fn change(cluster: &Cluster, blocks: u64, count: u64, round: u64) -> u64 {
    let regions = blocks / REGION_BLOCKS;
    for i in 0..count {
        let region = (i * 7919 + round * 13) % regions;
        cluster
            .primary
            .write(region * REGION_BLOCKS, region_data(region, round))
            .await
            .unwrap();
    }
    count * REGION
}

/// sync_quorum with r1 and r2, every region written and held by both;
/// then r2 goes away.
async fn filled_then_r2_away(blocks: u64) -> Cluster {
    let mut cluster = Cluster::start(cluster_options(
        blocks,
        CommitMode::SyncQuorum,
        &["r1", "r2"],
    ))
    .await
    .unwrap();
    cluster.wait_all_in_sync(LONG).await.unwrap();
    fill(&cluster, blocks).await;
    cluster.wait_converged(LONG).await.unwrap();
    cluster.stop_replica("r2").await;
    cluster
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_away_past_retention_is_rebuilt_from_the_dirty_map_moving_what_changed() {
    let blocks = 16384; // 64 MiB, 1024 regions
    let mut cluster = filled_then_r2_away(blocks).await;
    let changed = change(&cluster, blocks, 20, 1).await;
    cluster.primary.barrier().await.unwrap();
    // The checkpointer marks the map and recycles past r2 (no hold).
    cluster.primary.checkpoint().await.unwrap();
    let away = cluster.status().await.unwrap().dirty_maps;
    assert!(
        matches!(&away[..], [(replica, since, 20, 1024)] if replica == "vol1/r2" && *since > 0),
        "{away:?}"
    );
    let before = cluster.primary.bytes_sent("r2").await.unwrap();
    cluster.bring_back("r2", LONG).await.unwrap();
    let moved = cluster.primary.bytes_sent("r2").await.unwrap() - before;
    eprintln!("dirty map rebuild: moved {moved} bytes for {changed} changed");
    let events = cluster.events().await.unwrap();
    let delta = logged(&events, "r2", "plan_rebuild_delta");
    assert_eq!(delta.len(), 1, "{events:#?}");
    assert!(
        delta[0].starts_with("regions=20 of 1024 (dirty map since lsn "),
        "{delta:?}"
    );
    assert!(
        moved as f64 <= changed as f64 * 1.1,
        "moved {moved} bytes for {changed} changed"
    );
    assert!(
        moved >= changed,
        "moved {moved} bytes, less than the {changed} changed"
    );
    // Its map is gone once it is in sync.
    assert_eq!(cluster.status().await.unwrap().dirty_maps, Vec::new());
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_a_failover_the_returning_replica_gets_the_regions_whose_checksums_differ_while_writes_flow(
) {
    let blocks = 16384;
    let mut cluster = filled_then_r2_away(blocks).await;
    change(&cluster, blocks, 20, 1).await;
    let last = cluster.primary.barrier().await.unwrap();
    cluster.wait_durable("r1", last, LONG).await.unwrap();
    // The primary is lost; r1 takes over. It holds no map for r2.
    cluster.primary.stop().await;
    cluster.stop_replica("r1").await;
    cluster.promote("r1", CommitMode::BestEffort).await.unwrap();
    change(&cluster, blocks, 10, 2).await;
    cluster.primary.barrier().await.unwrap();
    cluster.primary.checkpoint().await.unwrap();
    let before = cluster.primary.bytes_sent("r2").await.unwrap();
    cluster.restart_replica("r2", false).await.unwrap();
    // Writes keep flowing while r2 is rebuilt.
    let (state, written) = tokio::join!(
        cluster.wait_state("r2", ReplicaState::InSync, LONG),
        async {
            let started = Instant::now();
            let mut round = 3;
            while started.elapsed() < Duration::from_millis(500) {
                change(&cluster, blocks, 5, round).await;
                round += 1;
            }
            round
        }
    );
    state.unwrap();
    assert!(written > 3, "no write went in during the rebuild");
    cluster.primary.barrier().await.unwrap();
    cluster.wait_converged(LONG).await.unwrap();
    let moved = cluster.primary.bytes_sent("r2").await.unwrap() - before;
    eprintln!("checksum rebuild after a failover: moved {moved} bytes, {written} rounds of writes during it");
    let events = cluster.events().await.unwrap();
    let compared = logged(&events, "r2", "plan_rebuild_checksum");
    assert_eq!(compared.len(), 1, "{events:#?}");
    assert!(compared[0].contains("no dirty map"), "{compared:?}");
    // What differs: the 30 regions r2 missed, and those written while it
    // came back (some twice: as a region, then in the tail).
    let differs = (30 + 5 * (written - 3)) * REGION;
    assert!(
        (moved as f64) <= differs as f64 * 1.3,
        "moved {moved} bytes, {differs} differ (a {}-byte volume)",
        blocks * 4096
    );
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_whole_rebuild_cut_part_way_resumes_from_what_the_replica_installed() {
    let blocks = 32768; // 128 MiB
    let volume = blocks * 4096;
    let mut cluster = Cluster::start(cluster_options(blocks, CommitMode::BestEffort, &["r1"]))
        .await
        .unwrap();
    cluster.wait_all_in_sync(LONG).await.unwrap();
    // r1 loses its disk while the volume fills.
    cluster.stop_replica("r1").await;
    std::fs::remove_dir_all(&cluster.node("r1").dir).unwrap();
    fill(&cluster, blocks).await;
    cluster.primary.checkpoint().await.unwrap();
    // The primary reaches r1 through a relay, which listens where r1 did.
    let real = cluster.node("r1").addr.clone();
    let relay = cluster.relay("r1").await.unwrap();
    let through = std::mem::replace(&mut cluster.node_mut("r1").addr, real);
    cluster.restart_replica("r1", false).await.unwrap();
    cluster.node_mut("r1").addr = through;
    // Cut the transfer once about 60% went.
    let deadline = Instant::now() + LONG;
    while cluster.primary.bytes_sent("r1").await.unwrap() < volume * 6 / 10 {
        assert!(Instant::now() < deadline, "the rebuild never got to 60%");
        tokio::task::yield_now().await;
    }
    relay.cut_next_batch();
    while !relay.is_cut() {
        assert!(Instant::now() < deadline, "never cut");
        tokio::task::yield_now().await;
    }
    let at_cut = cluster.primary.bytes_sent("r1").await.unwrap();
    assert!(at_cut < volume, "the rebuild finished before the cut");
    relay.resume();
    cluster
        .wait_state("r1", ReplicaState::InSync, LONG)
        .await
        .unwrap();
    cluster.wait_converged(LONG).await.unwrap();
    let moved = cluster.primary.bytes_sent("r1").await.unwrap();
    eprintln!("whole rebuild cut at {at_cut} of {volume} bytes, resumed: {moved} moved in all");
    let events = cluster.events().await.unwrap();
    assert_eq!(
        logged(&events, "r1", "plan_rebuild_whole").len(),
        1,
        "{events:#?}"
    );
    // It resumes at its cursor (persisted every 32 MiB): below, nothing
    // changed since (the map started with the install says so); above,
    // it compares, and sends at most what is above the cursor (what was
    // in flight at the cut, lost with the link, again).
    let resumed = logged(&events, "r1", "plan_rebuild_resume");
    let cursor: u64 = resumed
        .iter()
        .find_map(|e| {
            let rest = e.strip_prefix("rebuild_interrupted at byte ")?;
            let (at, rest) = rest.split_once(':')?;
            (rest.contains("below it regions=0 of 2048")
                && rest.ends_with("above it compare region checksums"))
            .then(|| at.parse().ok())?
        })
        .unwrap_or_else(|| panic!("{events:#?}"));
    assert!(
        cursor > 0 && cursor.is_multiple_of(32 << 20),
        "cursor {cursor}"
    );
    assert!(
        moved - at_cut <= volume - cursor,
        "moved {moved} bytes for a {volume}-byte volume, cut at {at_cut}, resumed at {cursor}"
    );
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_store_holding_part_of_an_image_does_not_serve_as_a_primary() {
    use walship::actors::{PrimaryConfig, Runtime, VolumeConfig, VolumeError};
    use walship::io::{PartialImage, Store};
    let dir = tempfile::tempdir().unwrap();
    {
        let (store, _) = Store::open(dir.path(), store_options()).unwrap();
        let lsn = store.write(1, 0, block(1)).unwrap();
        store.sync_to(lsn).unwrap();
        let marker = PartialImage {
            image_lsn: 9,
            ..PartialImage::default()
        };
        let _cut = store.begin_in_place(marker, 0).unwrap();
    }
    let rt = Runtime::start().unwrap();
    let opened = rt
        .spawn_volume(VolumeConfig::Primary({
            let mut made = PrimaryConfig::new(
                ("test", VOLUME),
                dir.path().to_path_buf(),
                store_options(),
                2,
                CommitMode::BestEffort,
                Vec::new(),
            );
            made.tuning = tuning();
            made
        }))
        .await;
    assert!(
        matches!(opened, Err(VolumeError::PartialImage { image_lsn: 9 })),
        "{opened:?}"
    );
    rt.shutdown();
}

/// The replica's extent file (whatever its generation).
fn extent_file(dir: &std::path::Path) -> std::path::PathBuf {
    std::fs::read_dir(dir)
        .unwrap()
        .filter_map(|e| e.ok().map(|e| e.path()))
        .find(|p| {
            p.file_name().is_some_and(|n| {
                let n = n.to_string_lossy();
                n.starts_with("extent.") && !n.ends_with("staging")
            })
        })
        .expect("an extent file")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_online_verify_finds_bytes_flipped_behind_a_replica_and_repair_fixes_them() {
    use std::os::unix::fs::FileExt;
    let blocks = 2048; // 8 MiB, 128 regions
    let cluster = Cluster::start(ClusterOptions {
        replica_checkpoint_every: 8,
        ..cluster_options(blocks, CommitMode::SyncQuorum, &["r1", "r2"])
    })
    .await
    .unwrap();
    cluster.wait_all_in_sync(LONG).await.unwrap();
    fill(&cluster, blocks).await;
    cluster.wait_converged(LONG).await.unwrap();
    let clean = cluster.primary.verify(false).await.unwrap();
    assert!(clean.clean(), "{clean:?}");
    assert_eq!(clean.replicas.len(), 2);
    // Bytes flipped in r1's extent behind the running process: region 2.
    let file = std::fs::OpenOptions::new()
        .write(true)
        .open(extent_file(&cluster.node("r1").dir))
        .unwrap();
    file.write_all_at(b"flipped", 2 * REGION + 100).unwrap();
    let found = cluster.primary.verify(false).await.unwrap();
    assert!(!found.clean());
    let r1 = found
        .replicas
        .iter()
        .find(|r| r.replica.server() == "r1")
        .unwrap();
    assert_eq!(
        r1.mismatches,
        vec![walship::actors::Mismatch {
            lba: 2 * REGION_BLOCKS,
            blocks: REGION_BLOCKS
        }],
        "{found:?}"
    );
    let r2 = found.replicas.iter().find(|r| r.replica.server() == "r2");
    assert!(r2.is_some_and(|r| r.mismatches.is_empty() && r.error.is_none()));
    // Repair: r1 is rebuilt, every region compared; then it verifies clean.
    let repaired = cluster.primary.verify(true).await.unwrap();
    assert!(repaired.replicas.iter().any(|r| r.repairing));
    cluster.wait_all_in_sync(LONG).await.unwrap();
    cluster.wait_converged(LONG).await.unwrap();
    let events = cluster.events().await.unwrap();
    assert_eq!(
        logged(&events, "r1", "verify_mismatch").len(),
        1,
        "{events:#?}"
    );
    assert!(
        logged(&events, "r1", "plan_rebuild_checksum")
            .iter()
            .any(|e| e.contains("an online verify found 1 regions of 128 differ")),
        "{events:#?}"
    );
    let after = cluster.primary.verify(false).await.unwrap();
    assert!(after.clean(), "{after:?}");
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_healthy_volume_verifies_clean_twenty_times_while_writes_flow() {
    let blocks = 2048;
    let cluster = Cluster::start(ClusterOptions {
        replica_checkpoint_every: 16,
        ..cluster_options(blocks, CommitMode::SyncAll, &["r1", "r2"])
    })
    .await
    .unwrap();
    cluster.wait_all_in_sync(LONG).await.unwrap();
    fill(&cluster, blocks).await;
    let stop = std::sync::atomic::AtomicBool::new(false);
    let (verified, written) = tokio::join!(
        async {
            let mut reports = Vec::new();
            for _ in 0..20 {
                let started = Instant::now();
                reports.push(cluster.primary.verify(false).await.unwrap());
                eprintln!("verify took {:?}", started.elapsed());
            }
            stop.store(true, std::sync::atomic::Ordering::Relaxed);
            reports
        },
        async {
            let mut round = 1;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                change(&cluster, blocks, 8, round).await;
                round += 1;
            }
            round
        }
    );
    assert!(written > 2, "writes flowed: {written} rounds");
    for (i, report) in verified.iter().enumerate() {
        assert!(report.clean(), "verify {i}: {report:?}");
        assert_eq!(report.replicas.len(), 2, "verify {i}: both compared");
    }
    // Compared at LSNs that moved with the writes (each replica's own
    // checkpoint, past the primary's pinned one).
    let lsns: std::collections::BTreeSet<u64> = verified
        .iter()
        .flat_map(|r| r.replicas.iter().map(|r| r.lsn))
        .collect();
    assert!(
        lsns.len() > 5,
        "the verifies ran at different LSNs: {lsns:?}"
    );
    cluster.shutdown().await;
}
