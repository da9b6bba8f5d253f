//! System tests on loopback TCP and real files, named after the acceptance
//! criteria they prove. After every flow: replica content equals the
//! primary's and no pin is left.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::time::Duration;
use support::*;
use walship::actors::*;
use walship::engine::{BarrierFailure, CommitMode, EngineError, ReplicaState};
use walship::io::{BLOCK_SIZE, DIRECT_MIN_BYTES};

const LONG: Duration = Duration::from_secs(20);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn live_replication_reads_and_status() {
    let cluster = start(CommitMode::SyncAll, &["r1", "r2"]).await;
    cluster
        .wait_state("r1", ReplicaState::InSync, LONG)
        .await
        .unwrap();
    cluster
        .wait_state("r2", ReplicaState::InSync, LONG)
        .await
        .unwrap();
    let lsn = cluster.write_blocks(0, 40).await.unwrap();
    assert_eq!(cluster.primary.barrier().await.unwrap(), lsn);
    assert_eq!(cluster.primary.read(3, 1).await.unwrap(), block(3));
    assert_eq!(cluster.replica("r1").read(3, 1).await.unwrap(), block(3));
    cluster.wait_converged(LONG).await.unwrap();
    let json = serde_json::to_value(cluster.primary.status().await.unwrap()).unwrap();
    assert_eq!(json["role"], "primary");
    assert_eq!(json["head"], lsn);
    assert_eq!(json["durable"], lsn);
    // At most a sync per write, plus the rotations' own (a full segment is
    // synced when no group commit did: 64 KiB segments hold ~15 of these
    // frames) and the one at open. A loaded machine that syncs each write
    // alone reaches 41 for 40 (seen once in CI); group commit's saving is
    // P4's to measure.
    let syncs = json["wal_syncs"].as_u64().unwrap();
    let rotations = lsn.div_ceil(15);
    assert!(
        (1..=lsn + rotations + 1).contains(&syncs),
        "{syncs} syncs for {lsn} LSNs"
    );
    for gauge in ["recovery_pins", "snapshot_pins", "held_resources"] {
        assert_eq!(json[gauge], 0, "{gauge}");
    }
    assert_eq!(json["retention_holds"], 2);
    let registry = &json["registry"];
    assert_eq!(registry["commit_mode"], "sync_all");
    assert_eq!(registry["epoch"], 1);
    assert_eq!(
        registry["epochs"],
        serde_json::json!([{"epoch": 1, "first": 1}])
    );
    assert_eq!(registry["history"]["committed"], lsn);
    assert_eq!(registry["pending_barriers"], 0);
    let senders = registry["senders"].as_array().unwrap();
    assert_eq!(senders.len(), 2);
    for (sender, server) in senders.iter().zip(["vol1/r1", "vol1/r2"]) {
        assert_eq!(sender["replica"], server);
        assert_eq!(sender["state"], "in_sync");
        assert_eq!(sender["flushed"], lsn);
        assert_eq!(sender["failure"], serde_json::Value::Null);
        assert_eq!(
            sender["retention"],
            serde_json::json!({"hold": "held", "from": lsn, "away_since": null})
        );
        assert_eq!(sender["session"]["kind"], "bootstrap");
        assert_eq!(sender["session"]["phase"], "completed");
    }
    // 40 frames of 4 KiB went to each replica, with their headers.
    for (server, bytes) in json["bytes_sent"]
        .as_array()
        .unwrap()
        .iter()
        .map(|pair| (pair[0].as_str().unwrap(), pair[1].as_u64().unwrap()))
    {
        assert!(
            (lsn * 4096..lsn * 4096 * 2).contains(&bytes),
            "{server}: {bytes} bytes"
        );
    }
    let mailboxes = json["mailboxes"].as_array().unwrap();
    let kinds: Vec<(&str, &str)> = mailboxes
        .iter()
        .map(|m| (m["kind"].as_str().unwrap(), m["instance"].as_str().unwrap()))
        .collect();
    assert_eq!(
        kinds,
        [
            ("volume", "vol1"),
            ("sender", "vol1/r1"),
            ("sender", "vol1/r2")
        ]
    );
    assert!(
        mailboxes[0]["handled"].as_u64().unwrap() > 40,
        "40 writes at least"
    );
    for m in mailboxes {
        assert_eq!(m["rejected"], 0, "{m}");
        assert_eq!(m["fenced"], 0, "{m}");
        assert!(
            m["latency_p50_us"].as_u64() <= m["latency_p99_us"].as_u64(),
            "{m}"
        );
    }
    let replica = replica_json(&cluster, "r2").await;
    assert_eq!(replica["role"], "replica");
    assert_eq!(replica["replica"], "vol1/r2");
    assert_eq!(replica["epoch"], 1);
    assert_eq!(replica["head"], lsn);
    assert_eq!(replica["durable"], lsn);
    assert_eq!(replica["connected"], true);
    assert_eq!(replica["mailbox"]["kind"], "receiver");
    assert_eq!(replica["mailbox"]["rejected"], 0);
}

/// r2 stops after 30 blocks, misses `behind` more, comes back and catches
/// up (its content is checked against the primary's).
async fn catch_up_after_a_gap(mut cluster: Cluster, behind: u64) {
    cluster
        .wait_state("r2", ReplicaState::InSync, LONG)
        .await
        .unwrap();
    cluster.write_blocks(0, 30).await.unwrap();
    cluster.primary.barrier().await.unwrap();
    cluster.stop_replica("r2").await;
    cluster.write_blocks(30, behind).await.unwrap();
    cluster.bring_back("r2", LONG).await.unwrap();
    assert!(cluster.has_event("r2", "plan_catchup").await.unwrap());
    assert!(!cluster.has_event("r2", "plan_rebuild").await.unwrap());
    // Committed frames in catch-up-sized batches went straight to the
    // extent, recorded as a checkpoint (after the 30 blocks the WAL held).
    let NodeStatus::Replica(status) = cluster.replica("r2").status().await.unwrap() else {
        panic!("r2's status")
    };
    let direct = behind * BLOCK_SIZE as u64 >= 2 * DIRECT_MIN_BYTES as u64;
    assert_eq!(status.checkpoint > 30, direct, "{status:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a4_short_gap_recovers_by_catch_up_over_tcp() {
    catch_up_after_a_gap(start(CommitMode::BestEffort, &["r1", "r2"]).await, 30).await;
}

/// `Auto` picks pread (measured faster here); the io_uring reader still
/// carries a whole catch-up when asked for.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a4_catch_up_through_the_io_uring_reader() {
    let tuning = {
        let mut made = support::tuning();
        made.backend = walship::io::BackendRequest::Uring;
        made
    };
    let cluster = start_with(CommitMode::BestEffort, &["r1", "r2"], tuning).await;
    let NodeStatus::Primary(status) = cluster.primary.status().await.unwrap() else {
        panic!("the primary's status")
    };
    assert!(
        status.reader_backend.starts_with("Uring"),
        "io_uring is available on the project's machines: {}",
        status.reader_backend
    );
    catch_up_after_a_gap(cluster, 300).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a7_fc4_recycled_wal_rebuilds_from_snapshot_plus_tail() {
    let mut cluster = start_with(
        CommitMode::BestEffort,
        &["r1", "r2"],
        tuning_without_holds(),
    )
    .await;
    cluster
        .wait_state("r2", ReplicaState::InSync, LONG)
        .await
        .unwrap();
    cluster.write_blocks(0, 20).await.unwrap();
    cluster.primary.barrier().await.unwrap();
    cluster.stop_replica("r2").await;
    cluster.write_blocks(20, 400).await.unwrap();
    cluster.primary.barrier().await.unwrap();
    cluster.primary.checkpoint().await.unwrap();
    cluster.write_blocks(420, 10).await.unwrap();
    cluster.bring_back("r2", LONG).await.unwrap();
    let events = cluster.events().await.unwrap();
    assert_logged(&events, |e| {
        e.contains("handshake")
            && e.contains("gap_beyond_retention")
            && e.contains("(its retention hold was released: retention_budget_exceeded: holds")
    });
    assert!(cluster
        .has_event("r2", "plan_rebuild_snapshot_tail")
        .await
        .unwrap());
    assert!(cluster.has_event("r2", "rebuild_completed").await.unwrap());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a8_sync_all_fails_clearly_when_a_replica_is_lost_then_full_base_brings_it_back() {
    let mut cluster = start_with(CommitMode::SyncAll, &["r1", "r2"], tuning_without_holds()).await;
    cluster
        .wait_state("r2", ReplicaState::InSync, LONG)
        .await
        .unwrap();
    cluster.write_blocks(0, 10).await.unwrap();
    cluster.primary.barrier().await.unwrap();
    cluster.stop_replica("r2").await;
    cluster.write_blocks(10, 100).await.unwrap();
    let error = cluster.primary.barrier().await.unwrap_err();
    assert!(
        matches!(&error, VolumeError::Barrier(BarrierFailure::TimedOut { lagging, .. }) if lagging.iter().any(|r| r.replica.server() == "r2")),
        "{error}"
    );
    // The checkpoint moves past what sync_all committed, so r2 needs a full base.
    cluster.primary.checkpoint().await.unwrap();
    cluster.bring_back("r2", LONG).await.unwrap();
    assert!(cluster
        .has_event("r2", "plan_rebuild_full_base")
        .await
        .unwrap());
    cluster.write_blocks(110, 5).await.unwrap();
    cluster.primary.barrier().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a8_sync_quorum_commits_with_one_replica_lost() {
    let mut cluster = start(CommitMode::SyncQuorum, &["r1", "r2"]).await;
    cluster.wait_all_in_sync(LONG).await.unwrap();
    cluster.stop_replica("r2").await;
    let lsn = cluster.write_blocks(0, 20).await.unwrap();
    assert!(cluster.primary.barrier().await.unwrap() >= lsn);
    cluster.bring_back("r2", LONG).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a5_non_convergent_catch_up_escalates_to_rebuild() {
    let mut tuning = tuning();
    tuning.budget.max_entries = Some(50);
    tuning.checkpoint_every_lsns = 1 << 20; // keep the WAL: the gap stays catch-up-able
    let mut cluster = start_with(CommitMode::BestEffort, &["r1", "r2"], tuning).await;
    cluster
        .wait_state("r2", ReplicaState::InSync, LONG)
        .await
        .unwrap();
    cluster.stop_replica("r2").await;
    cluster.write_blocks(0, 200).await.unwrap();
    cluster.primary.barrier().await.unwrap();
    cluster.bring_back("r2", LONG).await.unwrap();
    let events = cluster.events().await.unwrap();
    assert_logged(&events, |e| e.contains("escalated budget_entries_exceeded"));
    assert!(cluster.has_event("r2", "rebuild_completed").await.unwrap());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a10_changed_address_restart_keeps_identity_and_rejects_stale_endpoint() {
    let mut cluster = start(CommitMode::BestEffort, &["r1", "r2"]).await;
    cluster
        .wait_state("r1", ReplicaState::InSync, LONG)
        .await
        .unwrap();
    cluster.write_blocks(0, 20).await.unwrap();
    cluster.primary.barrier().await.unwrap();
    cluster.stop_replica("r1").await;
    cluster.write_blocks(20, 10).await.unwrap();
    cluster.restart_replica("r1", true).await.unwrap();
    cluster.reassign().await.unwrap();
    cluster
        .wait_state("r1", ReplicaState::InSync, LONG)
        .await
        .unwrap();
    cluster.wait_converged(LONG).await.unwrap();
    assert!(cluster.has_event("r1", "endpoint_changed").await.unwrap());
    let mut stale = cluster.assignment().unwrap();
    stale.replicas[0].endpoint.version -= 1;
    let error = cluster.primary.apply_assignment(stale).await.unwrap_err();
    assert!(
        matches!(
            error,
            VolumeError::Engine(EngineError::StaleEndpoint { .. })
        ),
        "{error}"
    );
}

/// A cluster whose r2 is in the middle of a slow catch-up (one frame per
/// round trip, 3000 frames behind, WAL kept).
async fn r2_mid_catch_up() -> Cluster {
    let mut slow = tuning();
    slow.batch_bytes = 4 * 1024;
    slow.max_inflight_bytes = 4 * 1024; // one frame per round trip: a catch-up that takes a while
    slow.checkpoint_every_lsns = 1 << 20; // keep the WAL: the gap stays catch-up-able
    let mut cluster = start_with(CommitMode::BestEffort, &["r1", "r2"], slow).await;
    cluster
        .wait_state("r2", ReplicaState::InSync, LONG)
        .await
        .unwrap();
    cluster.stop_replica("r2").await;
    cluster.write_blocks(0, 3000).await.unwrap();
    cluster.primary.barrier().await.unwrap();
    cluster.restart_replica("r2", false).await.unwrap();
    cluster
        .wait_state("r2", ReplicaState::CatchingUp, LONG)
        .await
        .unwrap();
    cluster
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a3_fc2_epoch_bump_mid_catch_up_releases_pins_and_fences_the_old_epoch() {
    let mut cluster = r2_mid_catch_up().await;
    cluster.epoch += 1;
    cluster.reassign().await.unwrap();
    cluster
        .wait_state("r2", ReplicaState::InSync, LONG)
        .await
        .unwrap();
    cluster.wait_converged(LONG).await.unwrap();
    let events = cluster.events().await.unwrap();
    assert_logged(&events, |e| {
        e.starts_with("vol1/r2 session_invalidated epoch_bumped")
    });
    assert_logged(&events, |e| {
        e.starts_with("vol1/r2 exec_resources_released") && e.ends_with("(epoch_bumped)")
    });
    cluster.epoch -= 1;
    let error = cluster
        .primary
        .apply_assignment(cluster.assignment().unwrap())
        .await
        .unwrap_err();
    assert!(
        matches!(error, VolumeError::Engine(EngineError::StaleEpoch { .. })),
        "{error}"
    );
    let replica = replica_json(&cluster, "r2").await;
    assert_eq!(replica["epoch"], 2, "the replica persisted the new epoch");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fc1_restart_on_a_new_address_mid_catch_up_recovers_with_identity_kept() {
    let mut cluster = r2_mid_catch_up().await;
    cluster.stop_replica("r2").await;
    cluster.restart_replica("r2", true).await.unwrap();
    cluster.reassign().await.unwrap();
    cluster
        .wait_state("r2", ReplicaState::InSync, LONG)
        .await
        .unwrap();
    cluster.wait_converged(LONG).await.unwrap();
    assert!(cluster.has_event("r2", "endpoint_changed").await.unwrap());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a1_committed_data_survives_failover_to_a_replica() {
    let mut cluster = start(CommitMode::SyncQuorum, &["r1", "r2"]).await;
    cluster.wait_all_in_sync(LONG).await.unwrap();
    let lsn = cluster.write_blocks(0, 50).await.unwrap();
    assert!(cluster.primary.barrier().await.unwrap() >= lsn);
    cluster.wait_converged(LONG).await.unwrap();
    let expected = cluster.primary.content_checksum().await.unwrap();
    // The primary dies; r1 is promoted in epoch 2 with r2 as its replica.
    cluster.primary.stop().await;
    cluster.stop_replica("r1").await;
    cluster.promote("r1", CommitMode::BestEffort).await.unwrap();
    assert_eq!(cluster.primary.content_checksum().await.unwrap(), expected);
    cluster
        .wait_state("r2", ReplicaState::InSync, LONG)
        .await
        .unwrap();
    cluster.write_blocks(50, 5).await.unwrap();
    cluster.primary.barrier().await.unwrap();
    cluster.wait_converged(LONG).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn primary_restart_resumes_replication() {
    let mut cluster = start(CommitMode::SyncAll, &["r1", "r2"]).await;
    cluster.wait_all_in_sync(LONG).await.unwrap();
    cluster.write_blocks(0, 30).await.unwrap();
    cluster.primary.barrier().await.unwrap();
    // Reopening waits for the old instance's store lock.
    cluster.primary.stop().await;
    // Not in the epoch it wrote: it may have lost entries it had shipped.
    assert!(matches!(
        cluster.reopen_primary(1).await,
        Err(VolumeError::EpochNotNewer {
            assigned: 1,
            wal: 1
        })
    ));
    cluster.reopen_primary(2).await.unwrap();
    cluster.wait_all_in_sync(LONG).await.unwrap();
    cluster.write_blocks(30, 10).await.unwrap();
    cluster.primary.barrier().await.unwrap();
    cluster.wait_converged(LONG).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a2_uncommitted_data_is_not_revived_after_failover() {
    let mut keep_wal = tuning();
    keep_wal.checkpoint_every_lsns = 1 << 20;
    let mut cluster = start_with(CommitMode::BestEffort, &["r1", "r2"], keep_wal).await;
    cluster.wait_all_in_sync(LONG).await.unwrap();
    cluster.write_blocks(0, 20).await.unwrap();
    cluster.primary.barrier().await.unwrap();
    cluster.wait_converged(LONG).await.unwrap();
    // r1 misses the next writes; r2 receives them; then the primary dies.
    cluster.stop_replica("r1").await;
    let ahead = cluster.write_blocks(1000, 20).await.unwrap();
    cluster.primary.barrier().await.unwrap();
    cluster.wait_durable("r2", ahead, LONG).await.unwrap();
    cluster.primary.stop().await;
    // r1 is promoted with what it has; r2 holds 20 entries r1 never had.
    cluster.promote("r1", CommitMode::BestEffort).await.unwrap();
    cluster
        .wait_state("r2", ReplicaState::InSync, LONG)
        .await
        .unwrap();
    cluster.wait_converged(LONG).await.unwrap();
    let events = cluster.events().await.unwrap();
    assert_logged(&events, |e| {
        e.contains("replica_ahead: flushed=40 committed=20")
    });
    // Under best_effort committed was the old primary's own disk, not a
    // floor on r2 (its hello said so): r2's tail is truncated.
    assert!(cluster
        .has_event("r2", "truncation_recorded")
        .await
        .unwrap());
    assert_eq!(
        cluster.replica("r2").read(1000 % BLOCKS, 1).await.unwrap(),
        bytes::Bytes::from(vec![0u8; 4096])
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fc8_refused_snapshot_pin_falls_back_to_full_base() {
    let mut no_snapshots = tuning_without_holds();
    no_snapshots.snapshot_rebuilds = false;
    let mut cluster = start_with(CommitMode::BestEffort, &["r1", "r2"], no_snapshots).await;
    cluster
        .wait_state("r2", ReplicaState::InSync, LONG)
        .await
        .unwrap();
    cluster.stop_replica("r2").await;
    cluster.write_blocks(0, 400).await.unwrap();
    cluster.primary.barrier().await.unwrap();
    cluster.primary.checkpoint().await.unwrap();
    cluster.bring_back("r2", LONG).await.unwrap();
    let events = cluster.events().await.unwrap();
    assert_logged(&events, |e| {
        e.contains("session_invalidated pin_failed: snapshot rebuilds disabled")
    });
    assert_logged(&events, |e| {
        e.contains("plan_rebuild_full_base") && e.contains("snapshot_unavailable")
    });
}

/// FUA writes, one at a time and four at once, then with the primary's
/// syncs slowed so the replicas' acks come first; and an operator's
/// checkpoint that has to wait for a sync. Each resolves when the last
/// durability it needs arrives, in every mode. Heartbeats are off, the
/// barrier deadline far and the peer timeout long, so nothing but that
/// arrival wakes the volume: a wake-up the sync loop owed and did not send
/// leaves a write (or the checkpoint) waiting, and it fails here.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fua_writes_resolve_on_the_last_durability_without_other_wake_ups() {
    const DEADLINE: Duration = Duration::from_secs(5);
    let tuning = {
        let mut made = tuning();
        made.heartbeat_every_ticks = 1_000_000;
        made.barrier_timeout_ticks = 3_000;
        made.peer_timeout = Duration::from_secs(30);
        made
    };
    for (mode, servers) in [
        (CommitMode::BestEffort, &[][..]),
        (CommitMode::SyncAll, &["r1", "r2"][..]),
        (CommitMode::SyncQuorum, &["r1", "r2"][..]),
    ] {
        let cluster = start_with(mode, servers, tuning.clone()).await;
        for server in servers {
            cluster
                .wait_state(server, ReplicaState::InSync, LONG)
                .await
                .unwrap();
        }
        let primary = &cluster.primary;
        let fua = |lba: u64| {
            let write = primary.write_committed(lba, block(lba));
            async move {
                tokio::time::timeout(DEADLINE, write)
                    .await
                    .unwrap_or_else(|_| panic!("{mode}: the write at {lba} never woke"))
                    .unwrap()
            }
        };
        let mut last = 0;
        for lba in 0..100 {
            let lsn = fua(lba).await;
            assert!(lsn > last);
            last = lsn;
        }
        let writers: Vec<_> = (0..4u64)
            .map(|w| {
                let primary = primary.clone();
                tokio::spawn(async move {
                    for lba in 100 + w * 50..150 + w * 50 {
                        let write = primary.write_committed(lba, block(lba));
                        tokio::time::timeout(DEADLINE, write)
                            .await
                            .unwrap_or_else(|_| panic!("{mode}: the write at {lba} never woke"))
                            .unwrap();
                    }
                })
            })
            .collect();
        for writer in writers {
            writer.await.unwrap();
        }
        // The primary's own sync is now the last to arrive.
        primary.slow_syncs(Duration::from_millis(10)).await.unwrap();
        for lba in 300..320 {
            fua(lba).await;
        }
        // A checkpoint asked for while the write before it is not durable.
        primary.write(320, block(320)).await.unwrap();
        tokio::time::timeout(DEADLINE, primary.checkpoint())
            .await
            .unwrap_or_else(|_| panic!("{mode}: the checkpoint never woke"))
            .unwrap();
        primary.slow_syncs(Duration::ZERO).await.unwrap();
        if !servers.is_empty() {
            cluster.wait_converged(LONG).await.unwrap();
        }
        cluster.shutdown().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a11_a_barrier_ack_that_arrives_after_the_timeout_is_rejected_over_the_wire() {
    let mut short = tuning();
    short.barrier_timeout_ticks = 40; // 200 ms
    let mut cluster = start_with(CommitMode::SyncAll, &["r1"], short).await;
    cluster
        .wait_state("r1", ReplicaState::InSync, LONG)
        .await
        .unwrap();
    // Put a relay between the primary and r1 (a new endpoint for it).
    let relay = cluster.relay("r1").await.unwrap();
    cluster
        .wait_state("r1", ReplicaState::InSync, LONG)
        .await
        .unwrap();
    cluster.write_blocks(0, 1).await.unwrap();
    cluster.primary.barrier().await.unwrap();
    // r1 persists the next write and acks the barrier by id, but the ack is
    // held on the wire past the barrier's deadline.
    relay.hold_replies(true);
    let lsn = cluster.write_blocks(1, 1).await.unwrap();
    let error = cluster.primary.barrier().await.unwrap_err();
    assert!(
        matches!(&error, VolumeError::Barrier(BarrierFailure::TimedOut { lsn: l, .. }) if l.get() == lsn),
        "{error}"
    );
    cluster.wait_durable("r1", lsn, LONG).await.unwrap();
    relay.hold_replies(false);
    cluster
        .wait_event("r1", "late_ack_rejected", LONG)
        .await
        .unwrap();
    let events = cluster.events().await.unwrap();
    assert_logged(&events, |e| {
        e.starts_with("vol1/r1 late_ack_rejected late ack from vol1/r1 for barrier b")
            && e.ends_with("which already timed out")
    });
    // The failure stands; the next barrier, acked in time, commits the write.
    assert!(cluster.primary.barrier().await.unwrap() >= lsn);
    cluster.wait_converged(LONG).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_recovery_log_keeps_its_decisions_through_barriers_and_refused_reconnects() {
    let mut cluster = start(CommitMode::SyncQuorum, &["r1", "r2"]).await;
    cluster.wait_all_in_sync(LONG).await.unwrap();
    // r2 refuses every reconnect while a thousand barriers resolve.
    cluster.stop_replica("r2").await;
    let sessions = cluster.sessions_created("r2").await.unwrap();
    for i in 0..1000 {
        cluster.write_blocks(i, 1).await.unwrap();
        cluster.primary.barrier().await.unwrap();
    }
    assert!(
        cluster.sessions_created("r2").await.unwrap() > sessions + 2,
        "r2 was retried meanwhile"
    );
    cluster.restart_replica("r2", false).await.unwrap();
    cluster
        .wait_state("r2", ReplicaState::InSync, LONG)
        .await
        .unwrap();
    let log = cluster.primary.recovery_log().await.unwrap();
    let events = cluster.events().await.unwrap();
    assert!(
        log.iter().all(|e| e.event != "stale_timeout_ignored"),
        "{events:#?}"
    );
    // Every decision is still there, from the first handshakes on.
    assert_logged(&events, |e| {
        e == "vol1/r1 handshake flushed=0 committed=0: zero_gap"
    });
    assert_logged(&events, |e| {
        e == "vol1/r2 handshake flushed=0 committed=0: zero_gap"
    });
    assert!(cluster.has_event("r2", "plan_catchup").await.unwrap());
    // The refused reconnects are one line each, with a count.
    let refused = log
        .iter()
        .find(|e| e.event == "session_invalidated" && e.detail.contains("Connection refused"))
        .unwrap();
    assert!(refused.repeats > 0, "{refused:?}");
    assert!(log.len() < 60, "{} events:\n{events:#?}", log.len());
    assert_eq!(cluster.status().await.unwrap().registry.log_dropped, 0);
}
