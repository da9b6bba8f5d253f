//! Online verify, the primary's side: every in-sync replica's content is
//! compared with the primary's at one LSN, region by region, while writes
//! go on (DRBD's online verify and Ceph's deep scrub, without their false
//! positives on a live device: both sides compare their content *at that
//! LSN*, not whatever their extents hold when read).
//!
//! The primary pins its extent at its checkpoint `P`; each replica, asked
//! on a connection of its own, pins its own at its checkpoint and answers
//! the LSN `V` both compare at (`max(P, its checkpoint)`); each side lays
//! its WAL's frames in `(pin, V]` over its pinned extent
//! ([`walship_io::ContentAt`]) and the primary asks for the replica's
//! region checksums two 8 MiB spans ahead of its own.

use super::ship::connect;
use super::ship::sums::{ReplicaSums, SUMS_AHEAD};
use crate::config::Tuning;
use crate::error::ExecError;
use crate::mux::PeerLinks;
use crate::transport::{recv, Conn};
use futures::SinkExt;
use serde::Serialize;
use std::sync::Arc;
use std::time::Duration;
use walship_engine::ReplicaId;
use walship_io::{regions, ContentAt, Envelope, Message, SnapshotPin, Store, BLOCK_SIZE};

/// Blocks whose region differs, from `lba`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Mismatch {
    /// First block.
    pub lba: u64,
    /// Blocks.
    pub blocks: u64,
}

/// One replica's comparison.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ReplicaVerify {
    /// The replica.
    pub replica: ReplicaId,
    /// The LSN both copies were compared at.
    pub lsn: u64,
    /// Regions compared.
    pub regions: u64,
    /// Bytes per region.
    pub region_bytes: u64,
    /// The block ranges whose regions differ, in order.
    pub mismatches: Vec<Mismatch>,
    /// Why it could not be compared, if it could not.
    pub error: Option<String>,
    /// A rebuild of what differs was asked for (`repair`).
    pub repairing: bool,
    /// Why a repair was not asked for, though asked to.
    pub repair_refused: Option<String>,
}

impl ReplicaVerify {
    /// Regions that differ.
    pub fn mismatched_regions(&self) -> u64 {
        self.mismatches
            .iter()
            .map(|m| (m.blocks * BLOCK_SIZE as u64).div_ceil(self.region_bytes))
            .sum()
    }
}

/// What an online verify found.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct VerifyReport {
    /// The volume.
    pub volume: String,
    /// The primary's pinned LSN (each replica's comparison is at this or
    /// its own checkpoint, whichever is later).
    pub pinned: u64,
    /// Every replica in sync when it began (the others are rebuilding or
    /// away: nothing to compare yet).
    pub replicas: Vec<ReplicaVerify>,
}

impl VerifyReport {
    /// At least one replica compared, every one, and every region equal.
    pub fn clean(&self) -> bool {
        !self.replicas.is_empty()
            && self
                .replicas
                .iter()
                .all(|r| r.error.is_none() && r.mismatches.is_empty())
    }
}

/// What verifying one replica needs.
pub(crate) struct Target {
    pub(crate) replica: ReplicaId,
    pub(crate) addr: String,
    pub(crate) cluster: String,
    pub(crate) epoch: u64,
    /// The lowest LSN to compare at (the primary's pin, or past it).
    pub(crate) floor: u64,
    pub(crate) tuning: Tuning,
    pub(crate) links: Arc<PeerLinks>,
}

/// A replica not yet durable through the pin is asked again this often,
/// this many times (an in-sync replica is a round trip behind).
const NOT_YET: (Duration, u32) = (Duration::from_millis(20), 100);

/// Compares `target` with `store` pinned at `pin`.
pub(crate) async fn verify_replica(
    store: Arc<Store>,
    pin: Arc<SnapshotPin>,
    target: Target,
) -> ReplicaVerify {
    let region = regions::region_bytes(pin.image_bytes());
    let mut report = ReplicaVerify {
        replica: target.replica.clone(),
        lsn: 0,
        regions: pin.image_bytes().div_ceil(region),
        region_bytes: region,
        mismatches: Vec::new(),
        error: None,
        repairing: false,
        repair_refused: None,
    };
    match compare(&store, &pin, &target, region, &mut report).await {
        Ok(()) => {}
        Err(e) => report.error = Some(e.to_string()),
    }
    report
}

async fn begin(target: &Target) -> Result<(Conn, u64), ExecError> {
    let mut last = String::new();
    for _ in 0..NOT_YET.1 {
        let mut conn = connect(&target.tuning, &target.links, &target.addr).await?;
        let message = Message::VerifyBegin {
            cluster: target.cluster.clone(),
            volume: target.replica.volume().to_owned(),
            replica: target.replica.as_str().to_owned(),
            lsn: target.floor,
        };
        conn.send(Envelope {
            epoch: target.epoch,
            message,
        })
        .await?;
        match recv(&mut conn, target.tuning.peer_timeout).await?.message {
            Message::VerifyReady { lsn } => return Ok((conn, lsn)),
            Message::Error { message, .. } if message.contains("ask again") => {
                last = message;
                tokio::time::sleep(NOT_YET.0).await;
            }
            other => return Err(ExecError::Protocol(format!("verify: got {other:?}"))),
        }
    }
    Err(ExecError::Protocol(format!("verify: {last}")))
}

async fn compare(
    store: &Arc<Store>,
    pin: &Arc<SnapshotPin>,
    target: &Target,
    region: u64,
    report: &mut ReplicaVerify,
) -> Result<(), ExecError> {
    let (mut conn, lsn) = begin(target).await?;
    report.lsn = lsn;
    let content = {
        let (store, pin) = (Arc::clone(store), Arc::clone(pin));
        tokio::task::spawn_blocking(move || store.content_at(lsn, Some(pin), "verify"))
            .await
            .map_err(|e| ExecError::Protocol(format!("verify task: {e}")))??
    };
    let content = Arc::new(content);
    let total = content.bytes();
    let timeout = target.tuning.peer_timeout.max(Duration::from_secs(30));
    let mut sums = ReplicaSums::new(region, total, 0);
    let span = sums.span();
    let mut offset = 0;
    let mut differ = Vec::new();
    while offset < total {
        sums.ask(&mut conn, 0, target.epoch, offset + SUMS_AHEAD * span)
            .await?;
        let len = span.min(total - offset);
        let ours = ours(&content, offset, len, region).await?;
        let theirs = sums.take(&mut conn, timeout, offset, len).await?;
        let first = offset / region;
        differ.extend(
            (0..ours.len())
                .filter(|i| ours.get(*i) != theirs.get(*i))
                .map(|i| first + i as u64),
        );
        offset += len;
    }
    let _ = conn
        .send(Envelope {
            epoch: target.epoch,
            message: Message::VerifyEnd,
        })
        .await;
    report.mismatches = ranges(&differ, region, total);
    Ok(())
}

async fn ours(
    content: &Arc<ContentAt>,
    offset: u64,
    len: u64,
    region: u64,
) -> Result<Vec<u128>, ExecError> {
    let content = Arc::clone(content);
    tokio::task::spawn_blocking(move || {
        let mut buf = bytes::BytesMut::new();
        content.sums(offset, len, region, &mut buf)
    })
    .await
    .map_err(|e| ExecError::Protocol(format!("verify task: {e}")))?
    .map_err(ExecError::from)
}

/// Runs of adjacent regions as block ranges (the last cut at the volume's end).
fn ranges(regions: &[u64], region: u64, total: u64) -> Vec<Mismatch> {
    let block = BLOCK_SIZE as u64;
    let mut out: Vec<Mismatch> = Vec::new();
    for &r in regions {
        let start = r * region;
        let blocks = (region.min(total - start)) / block;
        match out.last_mut() {
            Some(last) if (last.lba + last.blocks) * block == start => last.blocks += blocks,
            _ => out.push(Mismatch {
                lba: start / block,
                blocks,
            }),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn adjacent_regions_make_one_range_cut_at_the_end() {
        let region = 64 << 10;
        let total = 10 * region - 4096;
        let got = ranges(&[1, 2, 3, 7, 9], region, total);
        assert_eq!(
            got,
            vec![
                Mismatch {
                    lba: 16,
                    blocks: 48
                },
                Mismatch {
                    lba: 112,
                    blocks: 16
                },
                Mismatch {
                    lba: 144,
                    blocks: 15
                },
            ]
        );
        let report = ReplicaVerify {
            replica: ReplicaId::parse("v/a").unwrap(),
            lsn: 1,
            regions: 10,
            region_bytes: region,
            mismatches: got,
            error: None,
            repairing: false,
            repair_refused: None,
        };
        assert_eq!(report.mismatched_regions(), 5);
    }
}
