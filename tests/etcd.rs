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

use etcd::Etcd;
use nbd_client::*;
use nodes::{NodeCluster, VolumeOptions};
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::Duration;
use walship::actors::testing::within;
use walship::node::etcd::etcd_client::{Client, PutOptions};
use walship::node::etcd::{node_key, volume_key, NodeRecord, VolumeRecord};

const CONVERGE: Duration = Duration::from_secs(60);

fn nbd_addr(node: &nodes::NodeProc) -> SocketAddr {
    format!("127.0.0.1:{}", node.nbd).parse().unwrap()
}

/// The value at `key` and its lease, if it is there.
async fn get(client: &mut Client, key: &str) -> Option<(Vec<u8>, i64)> {
    let response = client.get(key, None).await.expect("etcd get");
    let kv = response.kvs().first()?;
    Some((kv.value().to_vec(), kv.lease()))
}

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

async fn volume_record(client: &mut Client) -> VolumeRecord {
    let (value, _) = get(client, &volume_key("test", "vol0"))
        .await
        .expect("vol0's record");
    serde_json::from_slice(&value).expect("a volume record")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn records_come_from_the_config_once_and_a_primary_back_from_the_dead_takes_etcds_word() {
    let etcd = Etcd::start().await;
    let args = ["--etcd", &etcd.endpoint, "--etcd-lease-ms", "2000"];
    let mut cluster = NodeCluster::start_with(
        VolumeOptions::default(),
        3,
        args.iter().map(|a| a.to_string()).collect(),
    )
    .await;
    cluster.wait_converged(CONVERGE).await;
    let mut client = etcd.client().await;

    // One record, from the config (the nodes raced to create it).
    let replica_addrs: BTreeMap<String, String> = cluster
        .nodes
        .iter()
        .map(|n| (n.name.clone(), format!("127.0.0.1:{}", n.replication)))
        .collect();
    let record = volume_record(&mut client).await;
    assert_eq!(record.epoch, 1);
    assert_eq!(record.primary, "node1");
    assert_eq!(record.size, 64 << 20);
    let mut expected = replica_addrs.clone();
    expected.remove("node1");
    assert_eq!(record.replicas, expected);
    // Each node registered, under a lease.
    for node in &cluster.nodes {
        let (value, lease) = get(&mut client, &node_key("test", &node.name))
            .await
            .unwrap_or_else(|| panic!("{} is not registered", node.name));
        let entry: NodeRecord = serde_json::from_slice(&value).unwrap();
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

    // The primary dies (SIGKILL: its lease is not revoked, it expires).
    cluster.kill(0).await;
    assert!(
        entry_gone(&etcd, "node1", Duration::from_secs(10)).await,
        "node1's entry outlived its lease"
    );

    // A newer record moves the primary to node2 (the running nodes watch
    // it), with node1 as a replica.
    let mut replicas = replica_addrs.clone();
    replicas.remove("node2");
    let moved = VolumeRecord {
        epoch: 2,
        primary: "node2".into(),
        replicas,
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

    // node1 restarts from its config and its own last assignment, which
    // both say it is primary in epoch 1: etcd's record wins, read before
    // any volume opens, and it comes back as node2's replica.
    cluster.spawn(0);
    cluster.wait_up(0, Duration::from_secs(20)).await;
    let volume = cluster.status(0).await["volumes"][0].clone();
    assert_eq!(volume["role"], "replica", "{volume:#}");
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

    // A node that stops revokes its lease: its entry goes at once.
    assert!(cluster
        .terminate(2, Duration::from_secs(20))
        .await
        .success());
    assert!(
        entry_gone(&etcd, "node3", Duration::from_secs(5)).await,
        "node3's entry outlived its stop"
    );
    for i in [0, 1] {
        assert!(cluster
            .terminate(i, Duration::from_secs(20))
            .await
            .success());
    }
}
