//! etcd as the control plane: a real etcd (Debian's `etcd-server`) and
//! `walship serve --etcd` processes on loopback.

#![cfg(feature = "etcd")]
#![allow(clippy::unwrap_used, clippy::expect_used)]

#[path = "support/etcd.rs"]
mod etcd;
#[path = "support/nbd_client.rs"]
mod nbd_client;
#[path = "support/nodes.rs"]
mod nodes;
#[path = "support/proxy.rs"]
mod proxy;
#[path = "support/workload.rs"]
mod workload;

use etcd::{get, Etcd};
use nbd_client::*;
use nodes::{NodeCluster, VolumeOptions};
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use walship::actors::testing::within;
use walship::engine::ReplicaState;
use walship::node::etcd::etcd_client::{Client, PutOptions};
use walship::node::etcd::{
    decision_key, node_key, progress_key, volume_key, Decision, NodeRecord, ProgressRecord,
    ReplicaProgress, VolumeRecord, FAILPOINT_ENV, FAILPOINT_HOLD_ENV,
};
use walship::node::Assignment;
use workload::*;

const CONVERGE: Duration = Duration::from_secs(60);

/// Whether `node`'s entry is gone within `limit`.
async fn entry_gone(etcd: &Etcd, node: &str, limit: Duration) -> bool {
    within(limit, || async {
        let mut client = etcd.client().await;
        get(&mut client, &node_key("test", node))
            .await
            .is_none()
            .then_some(())
    })
    .await
    .is_some()
}

/// etcd, and three nodes on it (2 s leases) with vol0 converged.
async fn cluster_on_etcd() -> (Etcd, NodeCluster) {
    cluster_on_etcd_with(VolumeOptions::default()).await
}

/// etcd, and three nodes on it with `lease_ms` leases, vol0 converged;
/// node1 reaches etcd through a proxy the test controls, the others
/// directly.
async fn node1_through_a_proxy(lease_ms: &str) -> (Etcd, proxy::Proxy, NodeCluster) {
    node1_through_a_proxy_with(lease_ms, VolumeOptions::default()).await
}

/// [`node1_through_a_proxy`] with `volume`.
async fn node1_through_a_proxy_with(
    lease_ms: &str,
    volume: VolumeOptions,
) -> (Etcd, proxy::Proxy, NodeCluster) {
    let etcd = Etcd::start().await;
    let target: SocketAddr = etcd.endpoint.trim_start_matches("http://").parse().unwrap();
    let proxy = proxy::Proxy::start(target).await;
    let through_proxy = format!("http://{}", proxy.addr);
    let cluster = NodeCluster::start_with(volume, 3, |name| {
        let endpoint = if name == "node1" {
            through_proxy.clone()
        } else {
            etcd.endpoint.clone()
        };
        ["--etcd", &endpoint, "--etcd-lease-ms", lease_ms]
            .iter()
            .map(|a| a.to_string())
            .collect()
    })
    .await;
    cluster.wait_converged(CONVERGE).await;
    (etcd, proxy, cluster)
}

/// [`cluster_on_etcd`] with `volume`.
async fn cluster_on_etcd_with(volume: VolumeOptions) -> (Etcd, NodeCluster) {
    let etcd = Etcd::start().await;
    let args = ["--etcd", &etcd.endpoint, "--etcd-lease-ms", "2000"];
    let cluster =
        NodeCluster::start_with(volume, 3, |_| args.iter().map(|a| a.to_string()).collect()).await;
    cluster.wait_converged(CONVERGE).await;
    (etcd, cluster)
}

/// The controller's decision about vol0, once there is one.
async fn decision(etcd: &Etcd) -> Decision {
    within(Duration::from_secs(30), || async {
        let (value, _) = get(&mut etcd.client().await, &decision_key("test", "vol0")).await?;
        serde_json::from_slice::<Decision>(&value).ok()
    })
    .await
    .expect("no decision within 30 s")
}

/// Waits until node `i` serves vol0 as its primary (its export writable).
async fn wait_serving(cluster: &NodeCluster, i: usize) {
    let serving = within(Duration::from_secs(20), || async {
        let volume = cluster.status(i).await["volumes"][0].clone();
        (volume["role"] == "primary" && volume["export"] == "read-write").then_some(())
    })
    .await;
    assert!(
        serving.is_some(),
        "{:#}\n{}",
        cluster.status(i).await,
        cluster.log(i)
    );
}

/// Waits until the controller marks vol0's "down" decision over: node1,
/// its primary, serves again.
async fn decision_over(etcd: &Etcd) {
    let over = within(Duration::from_secs(20), || async {
        let (value, _) = get(&mut etcd.client().await, &decision_key("test", "vol0")).await?;
        serde_json::from_slice::<Decision>(&value)
            .ok()?
            .over()
            .map(str::to_owned)
    })
    .await;
    assert_eq!(over.as_deref(), Some("node1 serves again"));
}

/// Restarts node1, vol0's primary that was lost with nobody promoted:
/// the controller marks its "down" decision over.
async fn primary_back_in_its_epoch(etcd: &Etcd, cluster: &mut NodeCluster) {
    cluster.spawn(0);
    cluster.wait_up(0, Duration::from_secs(20)).await;
    decision_over(etcd).await;
}

/// Restarts node `i`, which must come back as vol0's replica; its status
/// of vol0.
async fn back_as_replica(cluster: &mut NodeCluster, i: usize) -> serde_json::Value {
    cluster.spawn(i);
    cluster.wait_up(i, Duration::from_secs(20)).await;
    let volume = cluster.status(i).await["volumes"][0].clone();
    assert_eq!(volume["role"], "replica", "{volume:#}");
    volume
}

/// Waits until vol0's record has `node` among its replicas again, which
/// must be in `epoch`.
async fn readmitted(client: &Client, node: &str, epoch: u64) {
    let record = within(CONVERGE, || async {
        let record = volume_record(&mut client.clone()).await;
        record
            .assignment
            .replicas
            .contains_key(node)
            .then_some(record)
    })
    .await
    .unwrap_or_else(|| panic!("{node} was not added back"));
    assert_eq!(record.assignment.epoch, epoch, "{record:?}");
}

async fn volume_record(client: &mut Client) -> VolumeRecord {
    let (value, _) = get(client, &volume_key("test", "vol0"))
        .await
        .expect("vol0's record");
    serde_json::from_slice(&value).expect("a volume record")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn records_come_from_the_config_once_then_etcd_moves_the_primary_and_wins_over_the_config() {
    let (etcd, mut cluster) = cluster_on_etcd().await;
    let mut client = etcd.client().await;

    // One record, from the config (the nodes raced to create it).
    let replica_addrs: BTreeMap<String, String> = cluster
        .nodes
        .iter()
        .map(|n| (n.name.clone(), format!("127.0.0.1:{}", n.replication)))
        .collect();
    let record = volume_record(&mut client).await;
    assert_eq!(record.assignment.epoch, 1);
    assert_eq!(record.assignment.primary, "node1");
    assert_eq!(record.size, 64 << 20);
    let mut expected = replica_addrs.clone();
    expected.remove("node1");
    assert_eq!(record.assignment.replicas, expected);
    // Each node registered, under a lease, and says it serves.
    for node in &cluster.nodes {
        let key = node_key("test", &node.name);
        let (entry, lease) = within(Duration::from_secs(10), || async {
            let (value, lease) = get(&mut client.clone(), &key).await?;
            let entry: NodeRecord = serde_json::from_slice(&value).ok()?;
            entry.ready.then_some((entry, lease))
        })
        .await
        .unwrap_or_else(|| panic!("{} is not registered as serving", node.name));
        assert_eq!(entry.replication, format!("127.0.0.1:{}", node.replication));
        assert_ne!(lease, 0, "{}'s entry has no lease", node.name);
    }

    // Writes acknowledged (FUA) by the primary of epoch 1.
    let mut writer = Haggle::connect(nbd_addr(&cluster.nodes[0]))
        .await
        .go("vol0")
        .await;
    for block in 0..64u64 {
        let data = [block as u8 + 1; 4096];
        assert_eq!(writer.write(block * 4096, &data, FLAG_FUA).await, 0);
    }

    // A newer record moves the primary to node2, node1 running (so no
    // controller acts): the nodes watch it, node1 steps down to a replica.
    let mut replicas = replica_addrs.clone();
    replicas.remove("node2");
    let moved = VolumeRecord {
        assignment: Assignment {
            epoch: 2,
            primary: "node2".into(),
            replicas,
            ..record.assignment
        },
        ..record
    };
    client
        .put(
            volume_key("test", "vol0"),
            serde_json::to_vec(&moved).unwrap(),
            None::<PutOptions>,
        )
        .await
        .unwrap();
    let promoted = within(Duration::from_secs(10), || async {
        let volume = cluster.status(1).await["volumes"][0].clone();
        (volume["role"] == "primary" && volume["assignment"]["epoch"] == 2).then_some(())
    })
    .await;
    assert!(
        promoted.is_some(),
        "node2 did not take the record:\n{}",
        cluster.log(1)
    );

    // node1 restarts from its config, which says it is primary in epoch
    // 1: etcd's record wins, and it comes back as node2's replica. (A
    // primary killed before it heard of a failover: the next test.)
    cluster.stop_cleanly(&[0]).await;
    let volume = back_as_replica(&mut cluster, 0).await;
    assert_eq!(volume["assignment"]["epoch"], 2);
    assert!(
        cluster.log(0).contains("the record overrides the config"),
        "{}",
        cluster.log(0)
    );
    cluster.wait_converged_on(1, CONVERGE).await;
    // Every write node1 acknowledged with FUA is on the new primary.
    let mut reader = Haggle::connect(nbd_addr(&cluster.nodes[1]))
        .await
        .go("vol0")
        .await;
    for block in 0..64u64 {
        let data = reader.read(block * 4096, 4096).await.unwrap();
        assert_eq!(data, vec![block as u8 + 1; 4096], "block {block} on node2");
    }

    // A node that stops revokes its lease: its entry goes at once (its
    // lease, renewed every third of 2 s, had over a second left).
    cluster.stop_cleanly(&[2]).await;
    assert!(
        entry_gone(&etcd, "node3", Duration::from_millis(500)).await,
        "node3's entry outlived its stop:\n{}",
        cluster.log(2)
    );

    // etcd goes away for good: the nodes notice, fence their writes and
    // serve on, waiting to rejoin; asked to stop, they stop at once
    // (nothing to revoke the lease with).
    drop(etcd);
    for i in [0, 1] {
        logged_times(&cluster, i, "etcd: session lost", 1).await;
        assert!(still_running(&mut cluster, i), "node{} exited", i + 1);
    }
    cluster.stop_cleanly(&[0, 1]).await;
}

/// etcd is killed and started again under a FUA writer: the nodes ride
/// it out. Their renewal streams and watches are opened again (the
/// watches from where they were: a record written right after the
/// restart is applied by every node), and the primary acknowledges writes
/// on; every acknowledged write ends on the replicas.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_nodes_ride_out_an_etcd_restart() {
    let mut etcd = Etcd::start().await;
    let endpoint = etcd.endpoint.clone();
    let args = ["--etcd", &endpoint, "--etcd-lease-ms", "5000"];
    let mut cluster = NodeCluster::start_with(VolumeOptions::default(), 3, |_| {
        args.iter().map(|a| a.to_string()).collect()
    })
    .await;
    cluster.wait_converged(CONVERGE).await;
    let (stop, acked, writer) = fua_writer(&cluster, Duration::from_secs(60));
    wait_acked(&acked, 20, CLIENT).await;
    etcd.restart().await;
    let back = acked.load(Ordering::SeqCst);

    // A record written at once (epoch 2, the same roles), likely before
    // the nodes' watches are open again: they resume from where they
    // were, so each applies it.
    let mut client = etcd.client().await;
    let record = volume_record(&mut client).await;
    let bumped = VolumeRecord {
        assignment: Assignment {
            epoch: 2,
            ..record.assignment
        },
        ..record
    };
    let value = serde_json::to_vec(&bumped).unwrap();
    client
        .put(volume_key("test", "vol0"), value, None::<PutOptions>)
        .await
        .unwrap();
    let applied = within(Duration::from_secs(20), || async {
        for i in 0..3 {
            if cluster.status(i).await["volumes"][0]["assignment"]["epoch"] != 2 {
                return None;
            }
        }
        Some(())
    })
    .await;
    assert!(applied.is_some(), "{}\n{}", cluster.log(1), etcd.log());
    // Each node opened its renewals and its three watches again.
    for i in 0..3 {
        let log = cluster.log(i);
        assert!(
            log.contains("etcd: renewals resumed")
                && log.matches("etcd: watch resumed").count() >= 3,
            "{log}"
        );
    }
    // The primary acknowledges writes on after all this.
    wait_acked(&acked, back + 100, CLIENT).await;
    stop.store(true, Ordering::SeqCst);
    let done = writer.await.unwrap();
    cluster.wait_converged(CONVERGE).await;
    assert_blocks(nbd_addr(&cluster.nodes[2]), &done).await;
    cluster.stop_cleanly(&[0, 1, 2]).await;
}

/// With LSNs reported only every minute, a primary's replicas' state
/// changes still reach etcd at once: a replica killed is reported out of
/// sync, back in sync once it returns, and the primary killed right after
/// that is replaced (judged by those states; a report a minute old would
/// say "connecting" and leave the volume down).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replica_state_changes_are_reported_at_once() {
    let etcd = Etcd::start().await;
    let args = [
        "--etcd",
        &etcd.endpoint,
        "--etcd-lease-ms",
        "2000",
        "--etcd-progress-ms",
        "60000",
    ];
    let mut cluster = NodeCluster::start_with(VolumeOptions::default(), 3, |_| {
        args.iter().map(|a| a.to_string()).collect()
    })
    .await;
    cluster.wait_converged(CONVERGE).await;
    let node3_is = |in_sync: bool| {
        let etcd = &etcd;
        async move {
            within(Duration::from_secs(5), || async {
                let (value, _) =
                    get(&mut etcd.client().await, &progress_key("test", "vol0")).await?;
                let progress: ProgressRecord = serde_json::from_slice(&value).ok()?;
                let state = progress.replicas.get("node3")?.state;
                ((state == ReplicaState::InSync) == in_sync).then_some(())
            })
            .await
            .is_some()
        }
    };
    assert!(node3_is(true).await, "{}", cluster.log(0));
    cluster.kill(2).await;
    assert!(node3_is(false).await, "{}", cluster.log(0));
    cluster.spawn(2);
    cluster.wait_up(2, Duration::from_secs(20)).await;
    cluster.wait_converged(CONVERGE).await;
    assert!(node3_is(true).await, "{}", cluster.log(0));
    cluster.kill(0).await;
    let decision = decision(&etcd).await;
    assert!(decision.promoted().is_some(), "{decision:?}");
    cluster.stop_cleanly(&[1, 2]).await;
}

/// Nodes started together with etcd (a service manager's way): node1
/// reaches it through a proxy that refuses connections at first. node1
/// tries again until it answers, then starts and serves like the others.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_started_before_etcd_answers_waits_for_it() {
    let etcd = Etcd::start().await;
    let target: SocketAddr = etcd.endpoint.trim_start_matches("http://").parse().unwrap();
    let proxy = proxy::Proxy::start(target).await;
    proxy.cut();
    let through_proxy = format!("http://{}", proxy.addr);
    let starting = NodeCluster::start_with(VolumeOptions::default(), 3, |name| {
        let endpoint = if name == "node1" {
            through_proxy.clone()
        } else {
            etcd.endpoint.clone()
        };
        ["--etcd", &endpoint, "--etcd-lease-ms", "2000"]
            .iter()
            .map(|a| a.to_string())
            .collect()
    });
    // Once node1 has been refused, etcd answers it.
    let answering = async {
        let refused = within(Duration::from_secs(20), || async {
            (proxy.refused() > 0).then_some(())
        })
        .await;
        proxy.restore();
        refused
    };
    let (mut cluster, refused) = tokio::join!(starting, answering);
    assert!(refused.is_some(), "node1 never tried etcd");
    cluster.wait_converged(CONVERGE).await;
    let log = cluster.log(0);
    assert!(log.contains("etcd: not reachable yet"), "{log}");
    cluster.stop_cleanly(&[0, 1, 2]).await;
}

/// node1 reaches etcd through a proxy the test cuts (connections reset):
/// its watches break and retry. Meanwhile a record is written and etcd
/// compacts its history past it, so node1's records watch cannot resume
/// where it was: once the proxy forwards again, node1 reads what is there
/// and applies the record; its lease (5 s) outlived the cut.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_watch_that_cannot_resume_past_a_compaction_reads_the_records_again() {
    let (etcd, proxy, mut cluster) = node1_through_a_proxy("5000").await;
    // node1 follows etcd (its registration says it serves) before the cut.
    let key = node_key("test", "node1");
    let serving = within(Duration::from_secs(10), || async {
        let (value, _) = get(&mut etcd.client().await, &key).await?;
        let entry: NodeRecord = serde_json::from_slice(&value).ok()?;
        entry.ready.then_some(())
    })
    .await;
    assert!(serving.is_some(), "{}", cluster.log(0));

    proxy.cut();
    let broken = within(Duration::from_secs(10), || async {
        cluster.log(0).contains("etcd: watch broken").then_some(())
    })
    .await;
    assert!(broken.is_some(), "{}", cluster.log(0));
    let mut client = etcd.client().await;
    let record = volume_record(&mut client).await;
    let bumped = VolumeRecord {
        assignment: Assignment {
            epoch: 2,
            ..record.assignment
        },
        ..record
    };
    let put = client
        .put(
            volume_key("test", "vol0"),
            serde_json::to_vec(&bumped).unwrap(),
            None::<PutOptions>,
        )
        .await
        .unwrap();
    let revision = put.header().unwrap().revision();
    client.compact(revision, None).await.unwrap();
    proxy.restore();

    let applied = within(Duration::from_secs(20), || async {
        (cluster.status(0).await["volumes"][0]["assignment"]["epoch"] == 2).then_some(())
    })
    .await;
    assert!(applied.is_some(), "{}", cluster.log(0));
    assert!(
        cluster
            .log(0)
            .contains("watch cannot resume past a compaction; reading the prefix again"),
        "{}",
        cluster.log(0)
    );
    wait_serving(&cluster, 0).await;
    cluster.wait_converged(CONVERGE).await;
    cluster.stop_cleanly(&[0, 1, 2]).await;
}

/// node1, the primary, reaches etcd through a proxy the test pauses (the
/// other nodes reach it directly): node1 can no longer renew its lease.
/// Its fence refuses writes (EIO, while it still runs) before etcd
/// expires that lease, which is the earliest another node could be made
/// primary; meanwhile a client tries the other nodes' exports, as a
/// multipath client would, and the first write one of them acknowledges
/// comes after node1's last. Every write node1 acknowledged is on the
/// new primary. node1 notices within its lease and serves on, fenced;
/// healed, it rejoins without a restart as a replica of the new primary
/// whose export refuses writes, and the exports end identical.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_primary_cut_off_from_etcd_is_fenced_before_its_lease_expires_then_rejoins_as_a_replica()
{
    let (etcd, proxy, mut cluster) = node1_through_a_proxy("2000").await;

    // A client writes blocks with FUA, one after the other, noting when
    // each was acknowledged, until a write fails; it returns how.
    let addr = nbd_addr(&cluster.nodes[0]);
    let count = Arc::new(AtomicU64::new(0));
    let counted = Arc::clone(&count);
    let writer = tokio::spawn(async move {
        let mut client = Haggle::connect(addr).await.go("vol0").await;
        let mut acked: Vec<(u64, Instant)> = Vec::new();
        let deadline = Instant::now() + Duration::from_secs(60);
        for i in 0.. {
            // Blocks written again after PARTITION_BLOCKS hold the same data.
            let block = i % PARTITION_BLOCKS;
            let done = tokio::time::timeout(
                Duration::from_secs(10),
                client.try_write(block * 4096, &block_of(block), FLAG_FUA),
            )
            .await;
            match done {
                Ok(Some(0)) => {
                    acked.push((block, Instant::now()));
                    counted.fetch_add(1, Ordering::Relaxed);
                }
                Ok(refused) => return (acked, refused),
                Err(_) => return (acked, None),
            }
            assert!(Instant::now() < deadline, "writes never stopped");
        }
        unreachable!()
    });
    // node1 reports its replicas' progress.
    let reported = within(Duration::from_secs(10), || async {
        let (value, _) = get(&mut etcd.client().await, &progress_key("test", "vol0")).await?;
        let progress: ProgressRecord = serde_json::from_slice(&value).ok()?;
        (progress.replicas.len() == 2
            && progress
                .replicas
                .values()
                .all(|r| r.state == ReplicaState::InSync))
        .then_some(progress)
    })
    .await;
    assert!(
        reported.is_some(),
        "no progress report:\n{}",
        cluster.log(0)
    );
    // Some writes go through before the partition.
    let flowing = within(Duration::from_secs(10), || async {
        (count.load(Ordering::Relaxed) >= 20).then_some(())
    })
    .await;
    assert!(
        flowing.is_some(),
        "no writes acknowledged before the partition"
    );
    proxy.pause();
    let paused = Instant::now();
    // When node1 says it lost its session, watched from now on.
    let log = cluster.nodes[0].log.clone();
    let noticed = tokio::spawn(within(Duration::from_secs(20), move || {
        let log = log.clone();
        async move {
            let text = std::fs::read_to_string(&log).unwrap_or_default();
            text.contains("etcd: session lost").then(Instant::now)
        }
    }));
    // The multipath client: node2's and node3's exports in turn, one FUA
    // write each, until one acknowledges (replicas' exports refuse).
    let others = [nbd_addr(&cluster.nodes[1]), nbd_addr(&cluster.nodes[2])];
    let multipath = tokio::spawn(async move {
        let mut next = PARTITION_BLOCKS;
        within(Duration::from_secs(60), || {
            let block = next;
            next += 1;
            async move {
                for (i, addr) in others.iter().enumerate() {
                    if fua_write_acknowledged(*addr, block).await {
                        return Some((i + 1, block, Instant::now()));
                    }
                }
                None
            }
        })
        .await
        .expect("no other node took a write within 60 s")
    });

    // etcd expires node1's lease (it is never revoked: node1 cannot reach
    // etcd to do it).
    let client = etcd.client().await;
    let expired = within(Duration::from_secs(30), || async {
        get(&mut client.clone(), &node_key("test", "node1"))
            .await
            .is_none()
            .then(Instant::now)
    })
    .await
    .expect("node1's lease never expired");
    let (acked, refused) = writer.await.unwrap();
    // What the pause held of node1's requests is dropped, not delivered
    // late when node1 is back.
    proxy.cut();
    // The fence refused, node1 still running: not the connection closing
    // as the node stopped.
    assert_eq!(refused, Some(EIO), "{}", cluster.log(0));
    let &(_, last) = acked
        .last()
        .expect("writes acknowledged before the partition");
    assert!(
        last < expired,
        "node1 acknowledged a write {:?} after etcd expired its lease",
        last - expired
    );
    // The new primary's first write came after node1's last: no write
    // was acknowledged by two primaries.
    let (new, first_block, first) = multipath.await.unwrap();
    assert!(
        first > last,
        "node{} acknowledged a write {:?} before node1's last",
        new + 1,
        last - first
    );
    eprintln!(
        "{} writes acknowledged by node1; the last {:?} after the partition, {:?} before etcd \
         dropped its entry and {:?} before node{}'s first",
        acked.len(),
        last.saturating_duration_since(paused),
        expired - last,
        first - last,
        new + 1
    );
    let decision = decision(&etcd).await;
    assert_eq!(
        decision.promoted(),
        Some(cluster.nodes[new].name.as_str()),
        "{decision:?}"
    );
    let node1_acked: Vec<u64> = acked.iter().map(|&(block, _)| block).collect();
    assert_blocks(
        nbd_addr(&cluster.nodes[new]),
        &[node1_acked.clone(), vec![first_block]].concat(),
    )
    .await;
    // node1 noticed within its lease that it lost it (the connection
    // blackholed, not reset: no request answered, none refused), and
    // serves on, its writes fenced.
    let noticed = noticed
        .await
        .unwrap()
        .unwrap_or_else(|| panic!("node1 never noticed:\n{}", cluster.log(0)));
    // The fence lapses at most 1.8 s after the cut (a tenth short of the
    // lease); a quarter of the lease more for a loaded machine. Before
    // issue 26 the node stopped 7.4 s after the cut.
    assert!(
        noticed - paused < Duration::from_millis(2500),
        "node1 noticed {:?} after the partition, well past its 2 s lease:\n{}",
        noticed - paused,
        cluster.log(0)
    );
    eprintln!("node1 noticed {:?} after the partition", noticed - paused);
    let log = cluster.log(0);
    assert!(log.contains("not renewed within its time to live"), "{log}");
    let node1 = cluster.nodes[0].child.as_mut().unwrap();
    assert!(
        node1.try_wait().unwrap().is_none(),
        "node1 exited:\n{}",
        cluster.log(0)
    );

    // Healed, through the proxy again: node1 rejoins without a restart and
    // becomes what its record says, a replica of the new primary, added
    // back in epoch 3, whose export refuses writes; caught up, the exports
    // are identical.
    proxy.restore();
    let rejoined = within(Duration::from_secs(30), || async {
        let volume = cluster.status(0).await["volumes"][0].clone();
        (cluster.log(0).contains("etcd: rejoined") && volume["role"] == "replica").then_some(())
    })
    .await;
    assert!(
        rejoined.is_some(),
        "{:#}\n{}",
        cluster.status(0).await,
        cluster.log(0)
    );
    let node1 = cluster.nodes[0].child.as_mut().unwrap();
    assert!(node1.try_wait().unwrap().is_none(), "node1 restarted");
    let mut stale = Haggle::connect(nbd_addr(&cluster.nodes[0]))
        .await
        .go("vol0")
        .await;
    assert_eq!(
        stale.try_write(0, &block_of(0), FLAG_FUA).await,
        Some(EPERM)
    );
    let mut client = etcd.client().await;
    readmitted(&client, "node1", 3).await;
    cluster.wait_converged_on(new, CONVERGE).await;
    assert_blocks(nbd_addr(&cluster.nodes[0]), &node1_acked).await;
    assert_replicas_identical(&cluster, new).await;
    assert_eq!(volume_record(&mut client).await.assignment.epoch, 3);
    cluster.stop_cleanly(&[0, 1, 2]).await;
}

/// The blocks the partition test's client writes to node1 (the
/// multipath client's follow).
const PARTITION_BLOCKS: u64 = 12_000;

/// The primary is killed (SIGKILL) under a writing client. Its lease
/// expires, the controller (on one of the replicas' nodes) promotes the
/// best replica in epoch 2 with the old primary as its replica, and says
/// so; every write acknowledged with FUA before the kill is on the new
/// primary; the old primary restarts, rejoins as a replica, and the three
/// exports end identical.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_the_primary_promotes_a_replica_and_the_old_primary_rejoins_as_one() {
    let (etcd, mut cluster) = cluster_on_etcd().await;
    let acked = Arc::new(AtomicU64::new(0));
    let writer = tokio::spawn(write_blocks(
        nbd_addr(&cluster.nodes[0]),
        0..100_000,
        true,
        Arc::clone(&acked),
    ));
    wait_acked(&acked, 200, CLIENT).await;
    cluster.kill(0).await;
    let done = writer.await.unwrap();

    // The controller's decision: a promotion, in etcd and in the status.
    let mut client = etcd.client().await;
    let decision = decision(&etcd).await;
    assert_eq!(
        (decision.epoch, decision.lost_primary.as_str()),
        (1, "node1")
    );
    let promoted = decision
        .promoted()
        .map(str::to_owned)
        .unwrap_or_else(|| panic!("no replica promoted: {decision:?}"));
    let new = cluster
        .nodes
        .iter()
        .position(|n| n.name == promoted)
        .unwrap();
    assert!(decision.rejected.is_empty(), "{decision:?}");
    let record = volume_record(&mut client).await;
    assert_eq!(
        (record.assignment.epoch, record.assignment.primary.as_str()),
        (2, promoted.as_str())
    );
    // The lost primary waits outside the replicas: under sync_all a
    // replica away would stop every commit.
    assert!(
        !record.assignment.replicas.contains_key("node1"),
        "{record:?}"
    );
    assert!(record.departed.contains_key("node1"), "{record:?}");
    let shown = within(Duration::from_secs(10), || async {
        let volume = cluster.status(new).await["volumes"][0].clone();
        (volume["role"] == "primary" && volume["control_decision"]["promoted"] == promoted.as_str())
            .then_some(())
    })
    .await;
    assert!(shown.is_some(), "{:#}", cluster.status(new).await);
    wait_serving(&cluster, new).await;

    // Every acknowledged write is on the new primary, and the client,
    // reconnected there, writes on (FUA, sync_all) with node1 still down.
    assert_blocks(nbd_addr(&cluster.nodes[new]), &done).await;
    let more = write_all_fua(nbd_addr(&cluster.nodes[new]), 10_000..10_200).await;

    // The old primary comes back as a replica, is added back in epoch 3,
    // and catches up (its unreplicated tail, if any, truncated at the
    // divergence point), while the client writes on to the new primary.
    let stop = Arc::new(AtomicBool::new(false));
    let during_acked = Arc::new(AtomicU64::new(0));
    let during = tokio::spawn(write_until(
        nbd_addr(&cluster.nodes[new]),
        12_000..16_000,
        Arc::clone(&stop),
        Arc::clone(&during_acked),
        Duration::from_secs(60),
    ));
    wait_acked(&during_acked, 20, CLIENT).await;
    back_as_replica(&mut cluster, 0).await;
    let at_return = during_acked.load(Ordering::SeqCst);
    readmitted(&client, "node1", 3).await;
    // Writes go on through the readmission and node1's catch-up.
    wait_acked(&during_acked, at_return + 100, CLIENT).await;
    stop.store(true, Ordering::SeqCst);
    let during = during.await.unwrap();
    cluster.wait_converged_on(new, CONVERGE).await;
    assert_eq!(volume_record(&mut client).await.assignment.epoch, 3);
    assert_blocks(nbd_addr(&cluster.nodes[0]), &[done, more, during].concat()).await;
    assert_replicas_identical(&cluster, new).await;
    cluster.stop_cleanly(&[0, 1, 2]).await;
}

/// For the desperate path. A best_effort volume: both replicas are
/// killed, the primary
/// acknowledges blocks 64..128 alone (0..64 are on every node), then it
/// is killed too; node2, a replica without those writes, comes back
/// alone. Returns the blocks acknowledged (0..128).
async fn down_without_an_eligible_replica() -> (Etcd, NodeCluster, Vec<u64>) {
    let volume = VolumeOptions {
        commit_mode: "best_effort".into(),
        ..VolumeOptions::default()
    };
    let (etcd, mut cluster) = cluster_on_etcd_with(volume).await;
    let mut done = write_all_fua(nbd_addr(&cluster.nodes[0]), 0..64).await;
    // best_effort acknowledges before the replicas hold a write: these are
    // on them once they are in sync again.
    cluster.wait_converged(CONVERGE).await;
    cluster.kill(1).await;
    cluster.kill(2).await;
    done.extend(write_all_fua(nbd_addr(&cluster.nodes[0]), 64..128).await);
    // node1 has reported committing them without its replicas.
    let head = cluster.primary_volume().await["status"]["head"]
        .as_u64()
        .unwrap();
    let reported = within(Duration::from_secs(20), || async {
        let (value, _) = get(&mut etcd.client().await, &progress_key("test", "vol0")).await?;
        let progress: ProgressRecord = serde_json::from_slice(&value).ok()?;
        (progress.committed >= head).then_some(())
    })
    .await;
    assert!(reported.is_some(), "{}", cluster.log(0));
    cluster.kill(0).await;
    cluster.spawn(1);
    cluster.wait_up(1, Duration::from_secs(20)).await;
    (etcd, cluster, done)
}

/// sync_all: both replicas are killed and node1 reports them out of
/// sync; then node1 is killed too and node2 comes back alone. node2 holds
/// every committed write (sync_all commits nothing without it), but the
/// engine's rules take only a replica its primary last saw in sync:
/// nobody is eligible and nobody is promoted. The decision says why for
/// each replica, in etcd, in node2's status and in `walship status`.
/// node1 returns in epoch 1, the decision is marked over, and the
/// replicas catch up.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_no_eligible_replica_nobody_is_promoted_and_the_status_says_why() {
    let (etcd, mut cluster) = cluster_on_etcd().await;
    let done = write_all_fua(nbd_addr(&cluster.nodes[0]), 0..64).await;
    etcd.wait_reported_in_sync(&cluster, 0).await;
    cluster.kill(1).await;
    cluster.kill(2).await;
    let reported = within(Duration::from_secs(20), || async {
        let (value, _) = get(&mut etcd.client().await, &progress_key("test", "vol0")).await?;
        let progress: ProgressRecord = serde_json::from_slice(&value).ok()?;
        let out = |r: &ReplicaProgress| {
            r.state != ReplicaState::InSync && r.state != ReplicaState::Degraded
        };
        (progress.replicas.len() == 2 && progress.replicas.values().all(out)).then_some(())
    })
    .await;
    assert!(reported.is_some(), "{}", cluster.log(0));
    cluster.kill(0).await;
    cluster.spawn(1);
    cluster.wait_up(1, Duration::from_secs(20)).await;

    let decision = decision(&etcd).await;
    assert_eq!(
        (decision.promoted(), decision.blocked()),
        (None, None),
        "{decision:?}"
    );
    assert_eq!(
        (
            decision.epoch,
            decision.lost_primary.as_str(),
            decision.by.as_str()
        ),
        (1, "node1", "node2")
    );
    let reasons = |node: &str| decision.rejected.get(node).cloned().unwrap_or_default();
    assert!(
        reasons("node2")
            .iter()
            .any(|r| r.starts_with("state_ineligible")),
        "{decision:?}"
    );
    assert!(
        reasons("node3").iter().any(|r| r == "not_running"),
        "{decision:?}"
    );
    let mut client = etcd.client().await;
    let record = volume_record(&mut client).await;
    assert_eq!(
        (record.assignment.epoch, record.assignment.primary.as_str()),
        (1, "node1")
    );
    // node2's status shows the decision with the volume it hosts.
    let shown = within(Duration::from_secs(10), || async {
        let volume = cluster.status(1).await["volumes"][0].clone();
        let rejected = volume["control_decision"]["rejected"].clone();
        (rejected["node2"].is_array() && rejected["node3"].is_array()).then_some(())
    })
    .await;
    assert!(shown.is_some(), "{:#}", cluster.status(1).await);
    let admin = cluster.nodes[1].admin_addr();
    let table = nodes::run_ok(nodes::WALSHIP, &["status", "--admin", &admin], CLIENT).await;
    assert!(
        table.contains("vol0: primary node1 lost in epoch 1")
            && table.contains("nobody promoted: the volume stays down")
            && table.contains("node2 rejected: state_ineligible")
            && table.contains("node3 rejected: not_running"),
        "{table}"
    );

    // The primary comes back in epoch 1: the decision is over, and the
    // replicas catch up.
    primary_back_in_its_epoch(&etcd, &mut cluster).await;
    cluster.spawn(2);
    cluster.wait_up(2, Duration::from_secs(20)).await;
    cluster.wait_converged(CONVERGE).await;
    assert_eq!(volume_record(&mut client).await.assignment.epoch, 1);
    assert_blocks(nbd_addr(&cluster.nodes[1]), &done).await;
    assert_replicas_identical(&cluster, 0).await;
    cluster.stop_cleanly(&[0, 1, 2]).await;
}

/// The controller stops (SIGSTOP) between its decision and its
/// transaction (a failpoint holds every node there while its hold file
/// exists). Its lease expires and another node is elected, decides the
/// same failover and is held too. The first, resumed and released, has
/// lost its session with its lease: its pass ends with the session (or
/// its transaction is refused although the record has not moved: it is no
/// longer the controller), and it rejoins as a plain member; the second,
/// released, promotes. The epoch moves exactly once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_controller_stopped_mid_failover_is_replaced_and_the_epoch_moves_once() {
    let etcd = Etcd::start().await;
    let args = ["--etcd", &etcd.endpoint, "--etcd-lease-ms", "2000"];
    let holds = tempfile::tempdir().unwrap();
    let hold = holds.path().join("hold");
    let hold_of = |node: &str| std::path::PathBuf::from(format!("{}.{node}", hold.display()));
    for node in ["node1", "node2", "node3"] {
        std::fs::write(hold_of(node), b"").unwrap();
    }
    let mut cluster = NodeCluster::start_with_env(
        VolumeOptions::default(),
        3,
        |_| args.iter().map(|a| a.to_string()).collect(),
        &[
            (FAILPOINT_ENV, "controller-before-promote"),
            (FAILPOINT_HOLD_ENV, hold.to_str().unwrap()),
        ],
    )
    .await;
    cluster.wait_converged(CONVERGE).await;
    let mut client = etcd.client().await;
    let controller = within(Duration::from_secs(20), || async {
        let leader = client
            .clone()
            .leader("/walship/test/controller")
            .await
            .ok()?;
        let name = leader.kv()?.value_str().ok()?.to_owned();
        cluster.nodes.iter().position(|n| n.name == name)
    })
    .await
    .expect("no controller elected");
    // The primary must be another node: if the controller is node1, the
    // record moves the primary to node2 (epoch 2).
    let mut record = volume_record(&mut client).await;
    let primary = if controller == 0 {
        let mut replicas = record.assignment.replicas.clone();
        replicas.remove("node2");
        replicas.insert(
            "node1".into(),
            format!("127.0.0.1:{}", cluster.nodes[0].replication),
        );
        record = VolumeRecord {
            assignment: Assignment {
                epoch: 2,
                primary: "node2".into(),
                replicas,
                ..record.assignment
            },
            ..record
        };
        let value = serde_json::to_vec(&record).unwrap();
        client
            .put(volume_key("test", "vol0"), value, None::<PutOptions>)
            .await
            .unwrap();
        cluster.wait_converged_on(1, CONVERGE).await;
        1
    } else {
        0
    };
    let other = (0..3).find(|&i| i != primary && i != controller).unwrap();
    let before = client
        .get(volume_key("test", "vol0"), None)
        .await
        .unwrap()
        .kvs()[0]
        .version();
    let done = write_all_fua(nbd_addr(&cluster.nodes[primary]), 0..64).await;
    etcd.wait_reported_in_sync(&cluster, primary).await;

    cluster.kill(primary).await;
    let held = |i: usize| {
        let cluster = &cluster;
        async move {
            within(Duration::from_secs(30), || async {
                cluster.log(i).contains("failpoint reached").then_some(())
            })
            .await
            .unwrap_or_else(|| panic!("{} never held:\n{}", cluster.nodes[i].name, cluster.log(i)))
        }
    };
    held(controller).await;
    cluster.signal(controller, "STOP").await;
    // Its lease expires; `other` is elected and holds at the same point.
    held(other).await;
    let epoch = record.assignment.epoch;
    assert_eq!(volume_record(&mut client).await.assignment.epoch, epoch);

    // Resumed and released, the stale controller's transaction is refused
    // with the record as it read it: by the leadership guard alone. Its
    // lease is gone, so it stops.
    std::fs::remove_file(hold_of(&cluster.nodes[controller].name)).unwrap();
    cluster.signal(controller, "CONT").await;
    // Its session went with its lease: it notices and rejoins. Its pass
    // ends with the session, or, if its transaction runs first, the
    // transaction is refused by the leadership guard; the record does
    // not move either way.
    logged_times(&cluster, controller, "etcd: rejoined", 1).await;
    let log = cluster.log(controller);
    assert!(!log.contains("etcd controller: promoted"), "{log}");
    assert!(still_running(&mut cluster, controller), "{log}");
    assert_eq!(volume_record(&mut client).await.assignment.epoch, epoch);

    // Released, the new controller promotes `other` in the next epoch.
    std::fs::remove_file(hold_of(&cluster.nodes[other].name)).unwrap();
    let promoted = within(Duration::from_secs(20), || async {
        let record = volume_record(&mut client.clone()).await;
        (record.assignment.epoch > epoch).then_some(record)
    })
    .await
    .unwrap_or_else(|| panic!("nobody finished the failover:\n{}", cluster.log(other)));
    assert_eq!(
        (
            promoted.assignment.epoch,
            promoted.assignment.primary.as_str()
        ),
        (epoch + 1, cluster.nodes[other].name.as_str())
    );
    let decision = decision(&etcd).await;
    assert_eq!(decision.by, cluster.nodes[other].name, "{decision:?}");
    wait_serving(&cluster, other).await;
    // Exactly one write of the record since the kill: the promotion.
    let response = client.get(volume_key("test", "vol0"), None).await.unwrap();
    assert_eq!(response.kvs()[0].version(), before + 1);
    assert_eq!(volume_record(&mut client).await, promoted);
    assert_blocks(nbd_addr(&cluster.nodes[other]), &done).await;
    cluster.stop_cleanly(&[controller, other]).await;
}

/// [`down_without_an_eligible_replica`], then the desperate path, which
/// only an operator takes: `walship promote --accept-data-loss` makes
/// node2, the running replica with the most data, primary in epoch 2, and
/// says which committed LSNs it lacks. It takes writes; node1 returns as
/// its replica with its unreplicated tail (blocks 64..128) truncated at
/// the divergence point, not revived; the three exports end identical.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_desperate_path_is_an_operators_promotion_that_says_what_is_lost() {
    let (etcd, mut cluster, done) = down_without_an_eligible_replica().await;
    let down = decision(&etcd).await;
    assert_eq!(down.promoted(), None, "{down:?}");
    let promote = [
        "promote",
        "--etcd",
        &etcd.endpoint,
        "--cluster",
        "test",
        "--volume",
        "vol0",
    ];
    let limit = Duration::from_secs(20);
    let refused = nodes::run(nodes::WALSHIP, &promote, limit).await;
    assert!(!refused.status.success());
    assert!(String::from_utf8_lossy(&refused.stderr).contains("--accept-data-loss"));

    let accepting = [&promote[..], &["--accept-data-loss"]].concat();
    let printed = nodes::run_ok(nodes::WALSHIP, &accepting, limit).await;
    let promoted: Decision = serde_json::from_str(&printed).unwrap();
    assert_eq!(promoted.promoted(), Some("node2"), "{promoted:?}");
    assert_eq!(promoted.by, "operator");
    let loss = promoted.data_loss().cloned().expect("the loss is stated");
    assert!(loss.after < loss.through, "{loss:?}");
    assert_eq!(loss.through, down.committed);
    assert!(!loss.waived.is_empty(), "{loss:?}");
    // best_effort: what node1 acknowledged after its last report is lost
    // too, and no report says how much.
    assert!(
        loss.beyond
            .as_deref()
            .is_some_and(|b| b.starts_with("best_effort")),
        "{loss:?}"
    );
    let mut client = etcd.client().await;
    let record = volume_record(&mut client).await;
    assert_eq!(
        (record.assignment.epoch, record.assignment.primary.as_str()),
        (2, "node2")
    );
    // Shown with the volume, and the controller leaves it be.
    wait_serving(&cluster, 1).await;
    let shown = within(Duration::from_secs(10), || async {
        let volume = cluster.status(1).await["volumes"][0].clone();
        (volume["control_decision"]["by"] == "operator").then_some(())
    })
    .await;
    assert!(shown.is_some(), "{:#}", cluster.status(1).await);
    let table = nodes::run_ok(
        nodes::WALSHIP,
        &["status", "--admin", &cluster.nodes[1].admin_addr()],
        Duration::from_secs(20),
    )
    .await;
    assert!(
        table.contains("data loss accepted") && table.contains("lost besides: best_effort"),
        "{table}"
    );

    // node2 takes writes; node1 and node3 come back as its replicas.
    let more = write_all_fua(nbd_addr(&cluster.nodes[1]), 200..264).await;
    cluster.spawn(0);
    cluster.wait_up(0, Duration::from_secs(20)).await;
    cluster.spawn(2);
    cluster.wait_up(2, Duration::from_secs(20)).await;
    cluster.wait_converged_on(1, CONVERGE).await;
    assert_eq!(volume_record(&mut client).await.assignment.epoch, 2);
    let kept: Vec<u64> = done.iter().copied().filter(|&b| b < 64).collect();
    assert_blocks(nbd_addr(&cluster.nodes[0]), &[kept, more].concat()).await;
    // Blocks 64..128, acknowledged by node1 alone, are gone everywhere.
    let mut reader = Haggle::connect(nbd_addr(&cluster.nodes[0]))
        .await
        .go("vol0")
        .await;
    for block in 64..128u64 {
        let data = reader.read(block * 4096, 4096).await.unwrap();
        assert_ne!(data, block_of(block), "block {block} revived on node1");
    }
    assert_replicas_identical(&cluster, 1).await;
    cluster.stop_cleanly(&[0, 1, 2]).await;
}

/// sync_quorum: node3 (a replica) is killed and node1 acknowledges more
/// writes with node2 alone (a majority), then node1 is killed too. node2
/// alone cannot know that no write is on node3 only, so nobody is
/// promoted: the decision says how many replicas answered. Once node3 is
/// back and answers, node2, which holds every acknowledged write, is
/// promoted (node3, lacking them, is judged behind), node1 rejoins as a
/// replica and the exports end identical.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn under_sync_quorum_a_promotion_waits_until_every_majority_meets_an_answer() {
    let volume = VolumeOptions {
        commit_mode: "sync_quorum".into(),
        ..VolumeOptions::default()
    };
    let (etcd, mut cluster) = cluster_on_etcd_with(volume).await;
    let mut done = write_all_fua(nbd_addr(&cluster.nodes[0]), 0..64).await;
    etcd.wait_reported_in_sync(&cluster, 0).await;
    cluster.kill(2).await;
    done.extend(write_all_fua(nbd_addr(&cluster.nodes[0]), 64..128).await);
    cluster.kill(0).await;

    let blocked = decision(&etcd).await;
    assert_eq!(blocked.promoted(), None, "{blocked:?}");
    assert!(
        blocked
            .blocked()
            .is_some_and(|why| why.contains("1 of 2 replicas answered, 2 needed")),
        "{blocked:?}"
    );
    assert!(
        blocked.rejected["node3"].iter().any(|r| r == "not_running"),
        "{blocked:?}"
    );
    let mut client = etcd.client().await;
    assert_eq!(volume_record(&mut client).await.assignment.epoch, 1);

    // node3 comes back and answers: node2 has the most, and is promoted.
    cluster.spawn(2);
    cluster.wait_up(2, Duration::from_secs(20)).await;
    let record = within(Duration::from_secs(30), || async {
        let record = volume_record(&mut client.clone()).await;
        (record.assignment.epoch == 2).then_some(record)
    })
    .await
    .unwrap_or_else(|| panic!("no promotion:\n{}", cluster.log(1)));
    assert_eq!(record.assignment.primary, "node2", "{record:?}");
    // The lost primary stays a replica (sync_quorum needs three members).
    assert!(
        record.assignment.replicas.contains_key("node1"),
        "{record:?}"
    );
    let promoted = decision(&etcd).await;
    assert!(promoted.blocked().is_none(), "{promoted:?}");
    assert!(
        promoted.rejected["node3"]
            .iter()
            .any(|r| r.starts_with("behind_committed")),
        "{promoted:?}"
    );
    wait_serving(&cluster, 1).await;
    assert_blocks(nbd_addr(&cluster.nodes[1]), &done).await;

    cluster.spawn(0);
    cluster.wait_up(0, Duration::from_secs(20)).await;
    cluster.wait_converged_on(1, CONVERGE).await;
    assert_blocks(nbd_addr(&cluster.nodes[0]), &done).await;
    assert_replicas_identical(&cluster, 1).await;
    cluster.stop_cleanly(&[0, 1, 2]).await;
}

/// The term node `i`'s primary of vol0 runs in, from its status.
async fn primary_term(cluster: &NodeCluster, i: usize) -> u64 {
    let assignment = cluster.status(i).await["volumes"][0]["assignment"].clone();
    let (epoch, incarnation) = (
        assignment["epoch"].as_u64(),
        assignment["incarnation"].as_u64(),
    );
    (epoch.unwrap() << 20) | incarnation.unwrap()
}

/// The term etcd records for vol0 and who opened in it ("": none).
async fn recorded_term(etcd: &Etcd) -> (u64, String) {
    let Some(value) = etcd
        .value(&walship::node::etcd::term_key("test", "vol0"))
        .await
    else {
        return (0, String::new());
    };
    let text = String::from_utf8(value).unwrap();
    let (term, node) = text.split_once(' ').unwrap();
    (term.parse().unwrap(), node.to_owned())
}

/// The lost-disk issue under etcd: node1, vol0's primary, is killed with
/// SIGKILL after 1500 acknowledged FUA writes, its data dir wiped, and
/// restarted at once, within its lease: its record still names it
/// primary, so it peers with its replicas and recovers their log before it
/// serves. Every acknowledged block reads back from every export.
///
/// Its term comes from etcd too: every term a primary opens in is
/// recorded there first, and a term recorded that neither node1's disk
/// (gone) nor its replicas saw (incarnation 40 of epoch 1, as a node whose
/// replicas were down at the time would have left) is not used again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_primary_back_within_its_lease_without_its_data_recovers_it_from_a_replica() {
    // 10 s leases: node1 is back well within its own.
    let etcd = Etcd::start().await;
    let args = ["--etcd", &etcd.endpoint, "--etcd-lease-ms", "10000"];
    let mut cluster = NodeCluster::start_with(VolumeOptions::default(), 3, |_| {
        args.iter().map(|a| a.to_string()).collect()
    })
    .await;
    cluster.wait_converged(CONVERGE).await;
    let first = primary_term(&cluster, 0).await;
    assert_eq!(recorded_term(&etcd).await, (first, "node1".to_owned()));
    let acked = write_all_fua(nbd_addr(&cluster.nodes[0]), 0..1500).await;
    cluster.kill(0).await;
    std::fs::remove_dir_all(&cluster.nodes[0].data_dir).unwrap();
    let unseen = (1 << 20) | 40;
    assert!(unseen > first);
    let mut client = etcd.client().await;
    client
        .put(
            walship::node::etcd::term_key("test", "vol0"),
            format!("{unseen} node1"),
            None,
        )
        .await
        .unwrap();
    cluster.spawn(0);
    cluster.wait_up(0, Duration::from_secs(30)).await;
    let record = volume_record(&mut client).await;
    assert_eq!(
        (record.assignment.epoch, record.assignment.primary.as_str()),
        (1, "node1")
    );
    wait_serving(&cluster, 0).await;
    cluster.wait_converged_on(0, CONVERGE).await;
    for node in &cluster.nodes {
        assert_blocks(nbd_addr(node), &acked).await;
    }
    assert_replicas_identical(&cluster, 0).await;
    let term = primary_term(&cluster, 0).await;
    assert_eq!(
        term,
        unseen + 1,
        "the term after {unseen}, which etcd recorded"
    );
    assert_eq!(recorded_term(&etcd).await, (term, "node1".to_owned()));
    let log = cluster.primary_volume().await["recent_recovery"].clone();
    assert!(
        log.as_array()
            .unwrap()
            .iter()
            .any(|e| e["event"] == "primary_behind"),
        "{log:#}"
    );
    cluster.stop_cleanly(&[0, 1, 2]).await;
}

/// Whether node `i`'s process is still the one started (it has not
/// exited).
fn still_running(cluster: &mut NodeCluster, i: usize) -> bool {
    let child = cluster.nodes[i].child.as_mut().expect("started");
    child.try_wait().expect("wait").is_none()
}

/// Waits until node `i` has logged `what` at least `times` times.
async fn logged_times(cluster: &NodeCluster, i: usize, what: &str, times: usize) {
    let seen = within(Duration::from_secs(30), || async {
        (cluster.log(i).matches(what).count() >= times).then_some(())
    })
    .await;
    assert!(
        seen.is_some(),
        "node{} never logged {what:?}:\n{}",
        i + 1,
        cluster.log(i)
    );
}

/// best_effort: a primary cut off from etcd past its lease is never
/// replaced automatically, so its record still names it. Healed, it
/// rejoins without a restart as the primary again, acknowledges writes
/// again, and the controller marks its "down" decision over.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_primary_cut_off_past_its_lease_that_nobody_replaced_rejoins_as_the_primary() {
    let volume = VolumeOptions {
        commit_mode: "best_effort".into(),
        ..VolumeOptions::default()
    };
    let (etcd, proxy, mut cluster) = node1_through_a_proxy_with("2000", volume).await;
    let before = write_all_fua(nbd_addr(&cluster.nodes[0]), 0..32).await;
    proxy.pause();
    logged_times(&cluster, 0, "etcd: session lost", 1).await;
    // Its entry expires at etcd; the controller finds nobody to promote.
    assert!(entry_gone(&etcd, "node1", Duration::from_secs(20)).await);
    let down = decision(&etcd).await;
    assert!(
        down.blocked().is_some_and(|b| b.starts_with("best_effort")),
        "{down:?}"
    );
    // Fenced meanwhile: a write is refused, the node still runs.
    let mut client = Haggle::connect(nbd_addr(&cluster.nodes[0]))
        .await
        .go("vol0")
        .await;
    assert_eq!(client.try_write(0, &block_of(0), FLAG_FUA).await, Some(EIO));
    assert!(still_running(&mut cluster, 0));

    proxy.cut();
    proxy.restore();
    logged_times(&cluster, 0, "etcd: rejoined", 1).await;
    wait_serving(&cluster, 0).await;
    let after = write_all_fua(nbd_addr(&cluster.nodes[0]), 32..64).await;
    decision_over(&etcd).await;
    assert!(still_running(&mut cluster, 0), "node1 restarted");
    assert_eq!(
        volume_record(&mut etcd.client().await)
            .await
            .assignment
            .epoch,
        1
    );
    cluster.wait_converged(CONVERGE).await;
    assert_blocks(nbd_addr(&cluster.nodes[1]), &[before, after].concat()).await;
    cluster.stop_cleanly(&[0, 1, 2]).await;
}

/// etcd is down for longer than the nodes' leases while a client writes:
/// every node notices, its writes fenced (the client's writes fail, the
/// nodes run on); etcd back, every node rejoins without a restart, the
/// primary (its record unchanged) acknowledges writes again, and every
/// acknowledged write ends on the replicas.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd_down_past_the_leases_under_load_fences_writes_and_every_node_rejoins() {
    let (mut etcd, mut cluster) = cluster_on_etcd().await;
    let (stop, acked, writer) = fua_writer(&cluster, Duration::from_secs(90));
    wait_acked(&acked, 20, CLIENT).await;
    etcd.kill().await;
    for i in 0..3 {
        logged_times(&cluster, i, "etcd: session lost", 1).await;
    }
    // Fenced: nothing is acknowledged while etcd is away (a write in
    // flight when the primary noticed may just have been), for a second
    // of the writer trying.
    let fenced = acked.load(Ordering::SeqCst);
    let mut client = Haggle::connect(nbd_addr(&cluster.nodes[0]))
        .await
        .go("vol0")
        .await;
    assert_eq!(client.try_write(0, &block_of(0), FLAG_FUA).await, Some(EIO));
    let moved = within(Duration::from_secs(1), || async {
        (acked.load(Ordering::SeqCst) > fenced + 1).then_some(())
    })
    .await;
    assert!(moved.is_none(), "a write was acknowledged with etcd away");
    for i in 0..3 {
        assert!(still_running(&mut cluster, i), "node{} exited", i + 1);
    }

    etcd.start_again().await;
    for i in 0..3 {
        logged_times(&cluster, i, "etcd: rejoined", 1).await;
    }
    wait_acked(&acked, fenced + 100, CLIENT).await;
    stop.store(true, Ordering::SeqCst);
    let done = writer.await.unwrap();
    for i in 0..3 {
        assert!(still_running(&mut cluster, i), "node{} restarted", i + 1);
    }
    let record = volume_record(&mut etcd.client().await).await;
    assert_eq!(
        (record.assignment.epoch, record.assignment.primary.as_str()),
        (1, "node1")
    );
    cluster.wait_converged(CONVERGE).await;
    assert_blocks(nbd_addr(&cluster.nodes[2]), &done).await;
    cluster.stop_cleanly(&[0, 1, 2]).await;
}

/// The primary is paused (SIGSTOP) under a writing client until another
/// node is promoted. Woken (SIGCONT), its lease long lapsed, it fails the
/// client's write at once with the fence's error (EIO); it notices its
/// lost session, steps down without a restart to what its record says
/// (a replica of the new primary), is added back, and the exports end
/// identical. (A write that waits on a barrier when the fence lapses:
/// the next test.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deposed_primary_woken_from_a_pause_fails_its_writes_at_once_and_rejoins_as_a_replica() {
    let (etcd, mut cluster) = cluster_on_etcd().await;
    let addr = nbd_addr(&cluster.nodes[0]);
    let writer = fua_until_refused(addr);
    etcd.wait_reported_in_sync(&cluster, 0).await;
    cluster.signal(0, "STOP").await;
    let promoted = decision(&etcd).await;
    let new = match promoted.promoted() {
        Some("node2") => 1,
        Some("node3") => 2,
        other => panic!("promoted {other:?}"),
    };
    wait_serving(&cluster, new).await;
    let woken = Instant::now();
    cluster.signal(0, "CONT").await;
    let (acked, refused, at) = writer.await.unwrap();
    assert_eq!(refused, Some(EIO), "{}", cluster.log(0));
    assert!(
        at - woken < Duration::from_secs(2),
        "the write was failed {:?} after node1 woke",
        at - woken
    );
    eprintln!("node1's write failed {:?} after it woke", at - woken);
    logged_times(&cluster, 0, "etcd: rejoined", 1).await;
    let replica = within(Duration::from_secs(20), || async {
        (cluster.status(0).await["volumes"][0]["role"] == "replica").then_some(())
    })
    .await;
    assert!(replica.is_some(), "{:#}", cluster.status(0).await);
    assert!(still_running(&mut cluster, 0), "node1 restarted");
    let mut client = etcd.client().await;
    readmitted(&client, "node1", 3).await;
    cluster.wait_converged_on(new, CONVERGE).await;
    assert_blocks(nbd_addr(&cluster.nodes[new]), &acked).await;
    assert_replicas_identical(&cluster, new).await;
    assert_eq!(volume_record(&mut client).await.assignment.epoch, 3);
    cluster.stop_cleanly(&[0, 1, 2]).await;
}

/// A FUA write waits for a barrier that cannot complete (a replica
/// paused, SIGSTOP; sync_all waits for it up to the barrier timeout, 10 s)
/// when the primary is cut off from etcd: the write fails with EIO once
/// the primary's fence lapses, within its 2 s lease, not when the
/// barrier times out.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_waiting_on_a_barrier_fails_when_the_fence_lapses_not_at_the_barriers_timeout() {
    // Barriers and peers given 10 s: a write failing sooner was failed by
    // the fence.
    let volume = VolumeOptions {
        tuning: "barrier_timeout_ms = 10000\nnetwork_retry_max_ms = 300\npeer_timeout_ms = 10000\n\
                 segment_bytes = 1048576\n"
            .into(),
        ..VolumeOptions::default()
    };
    let (etcd, proxy, mut cluster) = node1_through_a_proxy_with("2000", volume).await;
    let addr = nbd_addr(&cluster.nodes[0]);
    let writer = fua_until_refused(addr);
    etcd.wait_reported_in_sync(&cluster, 0).await;
    // From now on each write waits for node3.
    cluster.signal(2, "STOP").await;
    proxy.pause();
    let cut = Instant::now();
    let (acked, refused, at) = writer.await.unwrap();
    proxy.cut();
    assert_eq!(refused, Some(EIO), "{}", cluster.log(0));
    assert!(
        at - cut < Duration::from_millis(2500),
        "the waiting write failed {:?} after the partition",
        at - cut
    );
    eprintln!(
        "the waiting write failed {:?} after the partition",
        at - cut
    );
    // Healed, every node in the cluster again: every write node1
    // acknowledged is on the primary the records name, and the exports
    // end identical.
    cluster.signal(2, "CONT").await;
    proxy.restore();
    logged_times(&cluster, 0, "etcd: rejoined", 1).await;
    let record = within(CONVERGE, || async {
        let record = volume_record(&mut etcd.client().await).await;
        (record.assignment.replicas.len() == 2).then_some(record)
    })
    .await
    .expect("every node a member again");
    let primary = cluster
        .nodes
        .iter()
        .position(|n| n.name == record.assignment.primary)
        .unwrap();
    cluster.wait_converged_on(primary, CONVERGE).await;
    assert_blocks(nbd_addr(&cluster.nodes[primary]), &acked).await;
    assert_replicas_identical(&cluster, primary).await;
    for i in 0..3 {
        assert!(still_running(&mut cluster, i), "node{} exited", i + 1);
    }
    cluster.stop_cleanly(&[0, 1, 2]).await;
}

/// A client writing blocks with FUA to `addr`'s vol0, one after the
/// other, until a write fails: the blocks acknowledged, how the last one
/// failed (`None`: no answer within 30 s) and when.
fn fua_until_refused(
    addr: SocketAddr,
) -> tokio::task::JoinHandle<(Vec<u64>, Option<u32>, Instant)> {
    tokio::spawn(async move {
        let mut client = Haggle::connect(addr).await.go("vol0").await;
        let mut acked = Vec::new();
        for block in 0..PARTITION_BLOCKS {
            let data = block_of(block);
            let done = client.try_write(block * 4096, &data, FLAG_FUA);
            match tokio::time::timeout(Duration::from_secs(30), done).await {
                Ok(Some(0)) => acked.push(block),
                Ok(refused) => return (acked, refused, Instant::now()),
                Err(_) => return (acked, None, Instant::now()),
            }
        }
        panic!("writes never stopped");
    })
}
