//! A block workload through NBD for the crash tests: blocks whose content
//! names them, written one after the other with FUA, read back and
//! compared across the nodes' exports.

#![allow(dead_code)]

use crate::nbd_client::*;
use crate::nodes::{run_ok, NodeCluster, NodeProc};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::io::AsyncReadExt;
use walship::actors::testing::within;

/// How long a client command may take.
pub const CLIENT: Duration = Duration::from_secs(120);

/// The content of block `i` as the crash tests write it.
pub fn block_of(i: u64) -> Vec<u8> {
    let mut data: Vec<u8> = (0..4096u64)
        .map(|j| (i.wrapping_mul(131) + j * 7) as u8)
        .collect();
    data[..8].copy_from_slice(&i.to_le_bytes());
    data
}

/// Writes block `i` at block `i` for `i` in `range`, each with FUA when
/// `fua`, one after the other, until the range ends or the connection
/// fails; returns the blocks the server acknowledged (`acked` hears each
/// as it is).
pub async fn write_blocks(
    addr: std::net::SocketAddr,
    range: std::ops::Range<u64>,
    fua: bool,
    acked: Arc<AtomicU64>,
) -> Vec<u64> {
    let mut client = Haggle::connect(addr).await.go("vol0").await;
    let mut done = Vec::new();
    for i in range {
        let data = block_of(i);
        let flags = if fua { FLAG_FUA } else { 0 };
        let sent = tokio::time::timeout(Duration::from_secs(10), async {
            client
                .send(CMD_WRITE, flags, i, i * 4096, 4096, &data)
                .await;
            let magic = client.0.read_u32().await?;
            let error = client.0.read_u32().await?;
            let handle = client.0.read_u64().await?;
            Ok::<_, std::io::Error>((magic, error, handle))
        })
        .await;
        match sent {
            Ok(Ok((SIMPLE_REPLY_MAGIC, 0, handle))) if handle == i => {
                done.push(i);
                acked.store(done.len() as u64, Ordering::SeqCst);
            }
            _ => break,
        }
    }
    done
}

/// [`write_blocks`] with FUA, every one of which must be acknowledged;
/// returns them.
pub async fn write_all_fua(addr: std::net::SocketAddr, range: std::ops::Range<u64>) -> Vec<u64> {
    let want = range.end.saturating_sub(range.start) as usize;
    let done = write_blocks(addr, range, true, Arc::new(AtomicU64::new(0))).await;
    assert_eq!(done.len(), want, "{addr}: writes refused");
    done
}

/// Writes blocks from `range` with FUA to `addr` until `stop` is set,
/// reconnecting (within `limit` in all) when the connection fails or a
/// write is refused, as a client riding out a primary's role change
/// would; returns the blocks acknowledged. A block whose write failed is
/// written again, so a block is acknowledged once.
pub async fn write_until(
    addr: std::net::SocketAddr,
    range: std::ops::Range<u64>,
    stop: Arc<std::sync::atomic::AtomicBool>,
    acked: Arc<AtomicU64>,
    limit: Duration,
) -> Vec<u64> {
    let deadline = std::time::Instant::now() + limit;
    let mut done = Vec::new();
    let mut next = range.start;
    while next < range.end && !stop.load(Ordering::SeqCst) {
        // A connection on which `next` was acknowledged (or the stop).
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        let block = next;
        let stop_now = &stop;
        let opened = within(left, || async move {
            if stop_now.load(Ordering::SeqCst) {
                return Some(None);
            }
            let mut client = Haggle::try_open(addr, "vol0").await?;
            let data = block_of(block);
            let sent = client.try_write(block * 4096, &data, FLAG_FUA);
            let ok = tokio::time::timeout(Duration::from_secs(10), sent).await;
            (ok == Ok(Some(0))).then_some(Some(client))
        })
        .await;
        let Some(opened) = opened else {
            panic!("writes failed for {limit:?}; acknowledged {}", done.len());
        };
        let Some(mut client) = opened else { break };
        done.push(next);
        acked.store(done.len() as u64, Ordering::SeqCst);
        next += 1;
        while next < range.end && !stop.load(Ordering::SeqCst) {
            let data = block_of(next);
            let sent = client.try_write(next * 4096, &data, FLAG_FUA);
            match tokio::time::timeout(Duration::from_secs(10), sent).await {
                Ok(Some(0)) => {
                    done.push(next);
                    acked.store(done.len() as u64, Ordering::SeqCst);
                    next += 1;
                }
                _ => break,
            }
        }
    }
    done
}

/// One FUA write of block `block` through a fresh connection to `addr`'s
/// vol0: whether it was acknowledged within half a second (a replica's
/// export refuses writes; a node down or changing roles does not answer).
/// How a multipath client finds the primary.
pub async fn fua_write_acknowledged(addr: std::net::SocketAddr, block: u64) -> bool {
    fua_write_acknowledged_to(addr, "vol0", block).await
}

/// [`fua_write_acknowledged`] to `export`.
pub async fn fua_write_acknowledged_to(
    addr: std::net::SocketAddr,
    export: &str,
    block: u64,
) -> bool {
    let attempt = async {
        let mut client = Haggle::try_open(addr, export).await?;
        client
            .try_write(block * 4096, &block_of(block), FLAG_FUA)
            .await
    };
    matches!(
        tokio::time::timeout(Duration::from_millis(500), attempt).await,
        Ok(Some(0))
    )
}

/// Every block in `blocks` reads back through `uri`'s export as written.
pub async fn assert_blocks(addr: std::net::SocketAddr, blocks: &[u64]) {
    let mut client = Haggle::connect(addr).await.go("vol0").await;
    for &i in blocks {
        let data = client.read(i * 4096, 4096).await.unwrap();
        assert!(
            data == block_of(i),
            "block {i} lost or wrong after the crash"
        );
    }
}

/// Every replica's export equals the export of node `primary`.
pub async fn assert_replicas_identical(cluster: &NodeCluster, primary: usize) {
    let replicas = (0..3).filter(|&i| i != primary);
    let primary = cluster.nodes[primary].uri("vol0");
    for replica in replicas {
        let uri = cluster.nodes[replica].uri("vol0");
        let out = run_ok(
            "qemu-img",
            &["compare", "-f", "raw", "-F", "raw", &primary, &uri],
            CLIENT,
        )
        .await;
        assert!(out.contains("Images are identical"), "{uri}: {out}");
    }
}

pub fn nbd_addr(node: &NodeProc) -> std::net::SocketAddr {
    format!("127.0.0.1:{}", node.nbd).parse().unwrap()
}

/// Waits until `acked` reaches `at_least`.
pub async fn wait_acked(acked: &AtomicU64, at_least: u64, limit: Duration) {
    let reached = within(limit, || async {
        (acked.load(Ordering::SeqCst) >= at_least).then_some(())
    })
    .await;
    assert!(
        reached.is_some(),
        "{} writes acknowledged, wanted {at_least}",
        acked.load(Ordering::SeqCst)
    );
}

/// A FUA writer on node1's vol0 (blocks 0..16000, reconnecting after a
/// failure, for at most `limit`): its stop switch, its count of
/// acknowledged blocks, and its task (the blocks acknowledged).
pub fn fua_writer(
    cluster: &NodeCluster,
    limit: Duration,
) -> (
    Arc<AtomicBool>,
    Arc<AtomicU64>,
    tokio::task::JoinHandle<Vec<u64>>,
) {
    let stop = Arc::new(AtomicBool::new(false));
    let acked = Arc::new(AtomicU64::new(0));
    let writer = tokio::spawn(write_until(
        nbd_addr(&cluster.nodes[0]),
        0..16_000,
        Arc::clone(&stop),
        Arc::clone(&acked),
        limit,
    ));
    (stop, acked, writer)
}
