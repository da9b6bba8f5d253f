//! Quiet at scale, over node processes: liveness belongs to the link
//! between two nodes (one probe per node pair; sessions on a live link
//! silent while idle), and a volume whose replicas hold everything sleeps
//! until a write wakes it.
#![allow(clippy::unwrap_used, clippy::expect_used)]

#[cfg(feature = "etcd")]
#[path = "support/etcd.rs"]
mod etcd;
#[path = "support/nbd_client.rs"]
mod nbd_client;
#[path = "support/nodes.rs"]
mod nodes;
#[path = "support/workload.rs"]
mod workload;

use nodes::{run_ok, NodeCluster, VolumeOptions};
use serde_json::Value;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};
use walship::actors::testing::within;
use workload::{assert_replicas_identical, fua_writer, wait_acked};

const CLIENT: Duration = Duration::from_secs(60);
const VOLUMES: usize = 12;

/// `VOLUMES` volumes (vol0 and v1..), node1 primary of all, node2 and
/// node3 replicas, with `tuning` in each node's `[tuning]`.
async fn cluster(commit_mode: &str, tuning: &str) -> NodeCluster {
    NodeCluster::start(volumes(commit_mode, tuning)).await
}

/// The volumes [`cluster`] starts.
fn volumes(commit_mode: &str, tuning: &str) -> VolumeOptions {
    VolumeOptions {
        size_mib: 4,
        commit_mode: commit_mode.into(),
        export_replicas: false,
        tuning: tuning.into(),
        extra_volumes: (1..VOLUMES).map(|i| (format!("v{i}"), 4)).collect(),
        ..VolumeOptions::default()
    }
}

/// node1's primary volumes, from its status.
async fn primaries(cluster: &NodeCluster) -> Vec<Value> {
    let status = cluster.status(0).await;
    status["volumes"]
        .as_array()
        .map(|v| {
            v.iter()
                .filter(|v| v["role"] == "primary")
                .cloned()
                .collect()
        })
        .unwrap_or_default()
}

/// The state node1 sees for `node`'s replica of each primary volume.
async fn states_of(cluster: &NodeCluster, node: &str) -> Vec<String> {
    primaries(cluster)
        .await
        .iter()
        .filter_map(|v| {
            let senders = v["status"]["registry"]["senders"].as_array()?;
            let suffix = format!("/{node}");
            let sender = senders
                .iter()
                .find(|s| s["replica"].as_str().is_some_and(|r| r.ends_with(&suffix)))?;
            Some(sender["state"].as_str()?.to_owned())
        })
        .collect()
}

/// Waits until every one of the volumes has both replicas in sync, each
/// holding everything, and sleeps.
async fn wait_all_asleep(cluster: &NodeCluster, limit: Duration) -> Vec<Value> {
    let asleep = within(limit, || async {
        let volumes = primaries(cluster).await;
        let all = volumes.len() == VOLUMES
            && volumes.iter().all(|v| {
                let status = &v["status"];
                let head = status["head"].as_u64();
                let senders = status["registry"]["senders"].as_array();
                status["asleep"] == true
                    && senders.is_some_and(|s| {
                        s.len() == 2
                            && s.iter()
                                .all(|s| s["state"] == "in_sync" && s["flushed"].as_u64() == head)
                    })
            });
        all.then_some(volumes)
    })
    .await;
    match asleep {
        Some(volumes) => volumes,
        None => panic!(
            "not every volume asleep within {limit:?}: {}",
            primaries(cluster)
                .await
                .iter()
                .map(|v| format!("{}: {}", v["name"], v["status"]["asleep"]))
                .collect::<Vec<_>>()
                .join(", ")
        ),
    }
}

/// Messages each actor has handled, by (kind, instance), on node `i`.
async fn handled(cluster: &NodeCluster, i: usize) -> Vec<(String, u64)> {
    let status = cluster.status(i).await;
    let mut counts = Vec::new();
    for volume in status["volumes"].as_array().into_iter().flatten() {
        let status = &volume["status"];
        let boxes: Vec<Value> = match status["mailboxes"].as_array() {
            Some(boxes) => boxes.clone(),
            None => vec![status["mailbox"].clone()],
        };
        for mailbox in boxes {
            let kind = mailbox["kind"].as_str().unwrap_or("?");
            let name = format!("{kind} {}", mailbox["instance"]);
            counts.push((name, mailbox["handled"].as_u64().unwrap_or(0)));
        }
    }
    counts.sort();
    counts
}

/// Idle volumes cost no messages: once every replica holds everything,
/// each primary volume sleeps (no heartbeat to its senders), each sender
/// sits in its live state sending nothing, and each replica's receiver
/// gets nothing. A write wakes its volume: acknowledged, shipped, and the
/// volume sleeps again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_volumes_sleep_their_actors_handle_nothing_and_a_write_wakes_one() {
    let cluster = cluster(
        "sync_all",
        "peer_timeout_ms = 2000\nsegment_bytes = 1048576\n",
    )
    .await;
    cluster.wait_converged(Duration::from_secs(60)).await;
    wait_all_asleep(&cluster, Duration::from_secs(30)).await;

    asked_nothing_for(&cluster, Duration::from_secs(1)).await;

    // One write with FUA to vol0 wakes it; it is acknowledged (sync_all:
    // both replicas hold it), and the volume sleeps again.
    let head = fua_write(&cluster).await;
    let volumes = wait_all_asleep(&cluster, Duration::from_secs(30)).await;
    let vol0 = volumes.iter().find(|v| v["name"] == "vol0").unwrap();
    assert!(vol0["status"]["head"].as_u64().unwrap() > head, "{vol0:#}");
}

/// Over `window`, asleep: only the status request itself reaches the
/// volume actors (its status and its recovery log) and receivers on
/// each node; senders get nothing.
async fn asked_nothing_for(cluster: &NodeCluster, window: Duration) {
    let mut counts = Vec::new();
    for i in 0..3 {
        counts.push(handled(cluster, i).await);
    }
    let started = Instant::now();
    tokio::time::sleep(window).await;
    for (i, first) in counts.iter().enumerate() {
        let second = handled(cluster, i).await;
        assert_eq!(
            first.len(),
            second.len(),
            "node{}: the actors changed",
            i + 1
        );
        for ((name, a), (_, b)) in first.iter().zip(&second) {
            let allowed = match name.split(' ').next() {
                Some("sender") => 0,
                Some("volume") => 2,
                _ => 1,
            };
            assert!(
                b - a <= allowed,
                "node{}: {name} handled {} messages in {:?} asleep",
                i + 1,
                b - a,
                started.elapsed()
            );
        }
    }
}

/// A replica node killed: the primaries with a replica there wait for it
/// without waking. Each sender to it, refused once, waits on the node's
/// redial (one knock every 100 ms for all of them) and ignores heartbeats;
/// each volume, with nothing else to do, arms no heartbeat: node1's actors
/// handle only the status requests. Before, every volume heartbeated its
/// senders every 200 ms and retried a connect at each backoff's end:
/// with a node down at 10,000 volumes, most of a surviving node's CPU.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_a_replica_node_down_its_volumes_wait_for_it_without_waking() {
    let mut cluster = cluster(
        "sync_all",
        "peer_timeout_ms = 2000\nsegment_bytes = 1048576\n",
    )
    .await;
    cluster.wait_converged(Duration::from_secs(60)).await;
    wait_all_asleep(&cluster, Duration::from_secs(30)).await;
    cluster.kill(2).await;
    let lost = within(Duration::from_secs(20), || async {
        let states = states_of(&cluster, "node3").await;
        (states.len() == VOLUMES && states.iter().all(|s| s != "in_sync")).then_some(())
    })
    .await;
    assert!(lost.is_some(), "{:?}", states_of(&cluster, "node3").await);
    // Settled: a second in which no sender on node1 handled anything (the
    // first retries, refused, are behind them), within 20 s.
    let settled = within(Duration::from_secs(20), || async {
        let before = handled(&cluster, 0).await;
        tokio::time::sleep(Duration::from_secs(1)).await;
        let after = handled(&cluster, 0).await;
        let quiet = before.len() == after.len()
            && before
                .iter()
                .zip(&after)
                .all(|((name, a), (_, b))| !name.starts_with("sender") || a == b);
        quiet.then_some(())
    })
    .await;
    assert!(settled.is_some(), "node1's senders kept handling messages");
    let before = handled(&cluster, 0).await;
    let window = Duration::from_secs(2);
    tokio::time::sleep(window).await;
    let after = handled(&cluster, 0).await;
    assert_eq!(before.len(), after.len(), "node1's actors changed");
    for ((name, a), (_, b)) in before.iter().zip(&after) {
        // A volume: the status requests (2). Margin for one retry still
        // due from the backoff of a failure before the kill (a quiet second
        // cannot tell it from waiting on the redial): one heartbeat to each
        // sender, and the refused connect's reports to the volume. Without
        // the skip, each sender gets 10 heartbeats in the window.
        let allowed = if name.starts_with("volume") { 4 } else { 1 };
        assert!(
            b - a <= allowed,
            "node1: {name} handled {} messages in {window:?} with node3 down",
            b - a
        );
    }
    // node3 back: every volume retries it at once and is in sync again.
    cluster.spawn(2);
    cluster.wait_converged(Duration::from_secs(60)).await;
}

/// One 64 KiB write with FUA to vol0 on node1, read back; returns vol0's
/// head before it.
async fn fua_write(cluster: &NodeCluster) -> u64 {
    let head = cluster.primary_volume().await["status"]["head"]
        .as_u64()
        .unwrap();
    let out = run_ok(
        "qemu-io",
        &[
            "-f",
            "raw",
            "-c",
            "write -f -P 0x5c 0 64k",
            "-c",
            "read -P 0x5c 0 64k",
            &cluster.nodes[0].uri("vol0"),
        ],
        CLIENT,
    )
    .await;
    assert!(!out.contains("Pattern verification failed"), "{out}");
    head
}

/// A replica node paused (SIGSTOP) is found by every volume on it within
/// the link's timeout, whatever the sessions' own timeout (30 s here):
/// the link's probe goes unanswered, the link ends, and each session on
/// it sees its stream close at once. Woken, the node's replicas all come
/// back in sync.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_paused_node_is_found_by_every_volume_on_it_within_the_link_timeout() {
    let cluster = cluster(
        "sync_quorum",
        "peer_timeout_ms = 30000\nlink_timeout_ms = 2000\nnetwork_retry_max_ms = 300\n\
         segment_bytes = 1048576\n",
    )
    .await;
    cluster.wait_converged(Duration::from_secs(60)).await;
    wait_all_asleep(&cluster, Duration::from_secs(30)).await;

    cluster.signal(2, "STOP").await;
    let paused = Instant::now();
    let found = within(Duration::from_secs(10), || async {
        let states = states_of(&cluster, "node3").await;
        (states.len() == VOLUMES && states.iter().all(|s| s != "in_sync")).then_some(states)
    })
    .await;
    let took = paused.elapsed();
    cluster.signal(2, "CONT").await;
    let states =
        found.unwrap_or_else(|| panic!("node3's replicas still in sync 10 s after it was paused"));
    eprintln!("{VOLUMES} volumes found node3 paused after {took:?}: {states:?}");
    // 2 s of silence after the last byte heard (up to a probe interval
    // before the pause), and the status polls' own pace on a loaded
    // machine.
    assert!(
        took < Duration::from_millis(3_000),
        "found after {took:?}, well past the 2 s link timeout"
    );

    let back = within(Duration::from_secs(30), || async {
        let states = states_of(&cluster, "node3").await;
        (states.len() == VOLUMES && states.iter().all(|s| s == "in_sync")).then_some(())
    })
    .await;
    assert!(
        back.is_some(),
        "node3's replicas not back in sync: {:?}",
        states_of(&cluster, "node3").await
    );
}

/// A replica node killed (SIGKILL) under a sync_all writer and started
/// again 1.6 s later: the primary's redial finds its listener back within
/// a knock, every session waiting out its backoff retries at once, the
/// listener holds their hellos until the replica is open, and the writes
/// resume within half a second of the listener answering (before: 3.1 to
/// 3.3 s after the kill, the backoff's pace).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_resume_at_once_when_a_killed_replica_nodes_listener_is_back() {
    let volume = VolumeOptions {
        tuning: "barrier_timeout_ms = 10000\npeer_timeout_ms = 2000\nsegment_bytes = 1048576\n"
            .into(),
        ..VolumeOptions::default()
    };
    let mut cluster = NodeCluster::start(volume).await;
    cluster.wait_converged(Duration::from_secs(60)).await;
    let (stop, acked, writer) = fua_writer(&cluster, Duration::from_secs(120));
    wait_acked(&acked, 20, Duration::from_secs(20)).await;

    cluster.kill(2).await;
    // The outage: long enough for the backoff to have grown past a
    // second (100, 200, 400, 800 ms).
    tokio::time::sleep(Duration::from_millis(1_600)).await;
    cluster.spawn(2);
    let replication = format!("127.0.0.1:{}", cluster.nodes[2].replication);
    let back = within(Duration::from_secs(20), || async {
        tokio::net::TcpStream::connect(&replication).await.ok()?;
        Some(Instant::now())
    })
    .await
    .expect("node3's listener back");
    let before = acked.load(Ordering::SeqCst);
    let resumed = within(Duration::from_secs(20), || async {
        (acked.load(Ordering::SeqCst) > before).then(Instant::now)
    })
    .await
    .expect("writes resumed");
    let took = resumed.saturating_duration_since(back);
    eprintln!("writes resumed {took:?} after node3's listener was back");
    assert!(
        took < Duration::from_millis(1_000),
        "writes resumed {took:?} after the listener was back (target 0.5 s)"
    );
    wait_acked(&acked, before + 20, Duration::from_secs(20)).await;
    stop.store(true, Ordering::SeqCst);
    writer.await.unwrap();
    cluster.wait_converged(Duration::from_secs(60)).await;
    assert_replicas_identical(&cluster, 0).await;
}

/// Under etcd, idle volumes are asked nothing by the node's reporter and
/// write nothing: etcd's revision stands still (lease renewals do not
/// move it). A write is reported at the next pass, in one transaction.
#[cfg(feature = "etcd")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn under_etcd_idle_volumes_are_asked_nothing_and_write_nothing() {
    use walship::node::etcd::{progress_key, ProgressRecord};
    let etcd = etcd::Etcd::start().await;
    let args = ["--etcd", &etcd.endpoint, "--etcd-lease-ms", "2000"];
    let volume = volumes(
        "sync_all",
        "peer_timeout_ms = 2000\nsegment_bytes = 1048576\n",
    );
    let cluster =
        NodeCluster::start_with(volume, 3, |_| args.iter().map(|a| a.to_string()).collect()).await;
    cluster.wait_converged(Duration::from_secs(60)).await;
    wait_all_asleep(&cluster, Duration::from_secs(30)).await;
    // The reports of the last writes may still be on their way: from
    // when etcd's revision stands still for a pass or two.
    let revision = || async {
        let mut client = etcd.client().await;
        let response = client.get("revision", None).await.ok()?;
        Some(response.header()?.revision())
    };
    let before = within(Duration::from_secs(10), || async {
        let first = revision().await?;
        tokio::time::sleep(Duration::from_millis(600)).await;
        (revision().await? == first).then_some(first)
    })
    .await
    .expect("etcd's revision never stood still");
    let ranges_before = ranges(&etcd).await;
    asked_nothing_for(&cluster, Duration::from_secs(2)).await;
    let after = revision().await.expect("etcd answers");
    let ranges_after = ranges(&etcd).await;
    assert_eq!(before, after, "etcd written while every volume slept");
    // The controller keeps its view by a watch: no range read per pass
    // (8 in 2 s before), only the test's own read of the revision.
    assert!(
        ranges_after - ranges_before <= 2,
        "{} range reads of etcd in 2 s idle",
        ranges_after - ranges_before
    );

    let head = fua_write(&cluster).await;
    let reported = within(Duration::from_secs(5), || async {
        let mut client = etcd.client().await;
        let (value, _) = etcd::get(&mut client, &progress_key("test", "vol0")).await?;
        let progress: ProgressRecord = serde_json::from_slice(&value).ok()?;
        (progress.committed > head).then_some(())
    })
    .await;
    assert!(reported.is_some(), "the write's progress was not reported");
}

/// The range reads etcd has served (`etcd_mvcc_range_total`).
#[cfg(feature = "etcd")]
async fn ranges(etcd: &etcd::Etcd) -> u64 {
    let addr = etcd.endpoint.trim_start_matches("http://");
    let (_, body) = walship::node::admin::request(addr, "/metrics", None)
        .await
        .expect("etcd's metrics");
    body.lines()
        .find_map(|line| line.strip_prefix("etcd_mvcc_range_total "))
        .and_then(|n| n.trim().parse::<f64>().ok())
        .expect("etcd_mvcc_range_total") as u64
}
