//! P9: from kill -9 of the primary node to the first write acknowledged
//! by the new primary, with 1 s leases, over `--rounds` failovers (10 by
//! default): median and max.
//!
//! A real etcd (Debian's `etcd-server`, run with a 50 ms heartbeat and a
//! 500 ms election timeout, which lets it grant a 1 s lease: with its
//! defaults the shortest is 2 s) and three `walship serve --etcd` nodes on
//! loopback, vol0 under sync_all. Each round: a client writes with FUA to
//! the primary; once etcd holds a progress report with both replicas in
//! sync, the primary is killed (SIGKILL) and the client, as a multipath
//! client would, tries each other node's export (connect, GO, one FUA
//! write) until one acknowledges. The round also notes when etcd dropped
//! the dead node's entry (its lease expired) and when the record named
//! the new primary. The dead node then restarts, rejoins as a replica,
//! and the next round kills whichever node is primary.
//!
//! `cargo bench --features walship/etcd --bench failover -- --rounds 10`

#[path = "../tests/support/etcd.rs"]
mod etcd;
#[path = "../tests/support/nbd_client.rs"]
mod nbd_client;
#[path = "../tests/support/nodes.rs"]
mod nodes;
#[path = "../tests/support/workload.rs"]
#[allow(clippy::unwrap_used)] // test support: a failed read panics
mod workload;

use anyhow::Context as _;
use clap::Parser;
use etcd::Etcd;
use nbd_client::{Haggle, FLAG_FUA};
use nodes::{NodeCluster, VolumeOptions};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use walship::node::etcd::{node_key, volume_key, VolumeRecord};

#[derive(Debug, Parser)]
#[command(name = "failover")]
struct Options {
    /// Failovers measured.
    #[arg(long, default_value_t = 10)]
    rounds: usize,
    /// The nodes' lease, in milliseconds.
    #[arg(long, default_value_t = 1000)]
    lease_ms: u64,
    /// Passed by `cargo bench`; ignored.
    #[arg(long, hide = true)]
    bench: bool,
}

/// One failover's times from the kill.
#[derive(Debug, Clone, Copy)]
struct Round {
    /// The dead node's entry gone from etcd (its lease expired).
    lease: Duration,
    /// The record names another primary.
    record: Duration,
    /// The first write acknowledged by the new primary.
    ack: Duration,
}

fn nbd_addr(cluster: &NodeCluster, i: usize) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], cluster.nodes[i].nbd))
}

async fn record(etcd: &Etcd) -> anyhow::Result<VolumeRecord> {
    let value = etcd
        .value(&volume_key("test", "vol0"))
        .await
        .context("vol0 has no record")?;
    Ok(serde_json::from_slice(&value)?)
}

async fn failover(etcd: &Etcd, cluster: &mut NodeCluster) -> anyhow::Result<Round> {
    let before = record(etcd).await?;
    let primary = cluster
        .nodes
        .iter()
        .position(|n| n.name == before.assignment.primary)
        .context("the primary is not one of the nodes")?;
    // Both replicas in sync (the last round's dead node added back).
    cluster
        .wait_converged_on(primary, Duration::from_secs(60))
        .await;
    let before = record(etcd).await?;
    anyhow::ensure!(
        before.assignment.primary == cluster.nodes[primary].name,
        "{before:?}"
    );
    // Writes flow until the kill.
    let stop = Arc::new(AtomicBool::new(false));
    let writer = tokio::spawn({
        let (addr, stop) = (nbd_addr(cluster, primary), Arc::clone(&stop));
        async move {
            let Some(mut client) = Haggle::try_open(addr, "vol0").await else {
                return;
            };
            for block in 0..1_000_000u64 {
                if stop.load(Ordering::Relaxed) {
                    return;
                }
                let data = [block as u8; 4096];
                if client
                    .try_write((block % 4096) * 4096, &data, FLAG_FUA)
                    .await
                    != Some(0)
                {
                    return;
                }
            }
        }
    });
    etcd.wait_reported_in_sync(cluster, primary).await;
    let killed = Instant::now();
    cluster.kill(primary).await;
    stop.store(true, Ordering::Relaxed);
    let _ = writer.await;

    let others: Vec<usize> = (0..cluster.nodes.len()).filter(|&i| i != primary).collect();
    let (mut lease, mut moved) = (None, None);
    let deadline = killed + Duration::from_secs(30);
    let ack = 'found: {
        for block in 1..u64::MAX {
            anyhow::ensure!(
                Instant::now() < deadline,
                "no new primary acknowledged a write within 30 s"
            );
            if lease.is_none()
                && etcd
                    .value(&node_key("test", &before.assignment.primary))
                    .await
                    .is_none()
            {
                lease = Some(killed.elapsed());
            }
            if moved.is_none()
                && record(etcd)
                    .await
                    .is_ok_and(|r| r.assignment.primary != before.assignment.primary)
            {
                moved = Some(killed.elapsed());
            }
            for &i in &others {
                if workload::fua_write_acknowledged(nbd_addr(cluster, i), block).await {
                    break 'found killed.elapsed();
                }
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        anyhow::bail!("ran out of blocks");
    };
    let after = record(etcd).await?;
    anyhow::ensure!(
        after.assignment.epoch == before.assignment.epoch + 1,
        "{before:?} → {after:?}"
    );
    // The dead node restarts and rejoins as a replica.
    cluster.spawn(primary);
    cluster.wait_up(primary, Duration::from_secs(20)).await;
    Ok(Round {
        lease: lease.unwrap_or(ack),
        record: moved.unwrap_or(ack),
        ack,
    })
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> anyhow::Result<()> {
    let options = Options::parse();
    let etcd = Etcd::start_fast().await;
    let lease = options.lease_ms.to_string();
    let args = ["--etcd", etcd.endpoint.as_str(), "--etcd-lease-ms", &lease];
    let mut cluster = NodeCluster::start_with(VolumeOptions::default(), 3, |_| {
        args.iter().map(|a| a.to_string()).collect()
    })
    .await;
    println!(
        "P9: kill -9 of the primary → first FUA write acknowledged by the new primary \
         ({} ms leases, sync_all, 3 nodes)",
        options.lease_ms
    );
    println!("round  lease expired  record moved  first ack   (ms after the kill)");
    let mut rounds = Vec::new();
    for n in 0..options.rounds {
        let round = match failover(&etcd, &mut cluster).await {
            Ok(round) => round,
            Err(e) => {
                for i in 0..cluster.nodes.len() {
                    eprintln!("--- {}:\n{}", cluster.nodes[i].name, cluster.log(i));
                }
                return Err(e);
            }
        };
        println!(
            "{n:>5}  {:>13.0}  {:>12.0}  {:>9.0}",
            ms(round.lease),
            ms(round.record),
            ms(round.ack)
        );
        rounds.push(round);
    }
    let mut acks: Vec<Duration> = rounds.iter().map(|r| r.ack).collect();
    acks.sort();
    let median = (acks[(acks.len() - 1) / 2] + acks[acks.len() / 2]) / 2;
    let max = acks[acks.len() - 1];
    println!(
        "P9 over {} failovers: median {:.0} ms, max {:.0} ms (target ≤ 2000 ms)",
        acks.len(),
        ms(median),
        ms(max)
    );
    let running: Vec<usize> = (0..cluster.nodes.len()).collect();
    cluster.stop_cleanly(&running).await;
    Ok(())
}
