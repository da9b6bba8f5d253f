//! A replica's region checksums, as a rebuild that compares and an online
//! verify ask for them: whole-region spans asked ahead of the one being
//! compared (the replica's reads overlap the primary's), answers checked
//! against what was asked.

use crate::error::ExecError;
use crate::transport::{recv, Conn};
use futures::SinkExt;
use std::collections::BTreeMap;
use std::time::Duration;
use walship_io::{regions, Envelope, Message};

/// The replica's region checksums, asked for `SPAN` bytes at a time and
/// `AHEAD` spans ahead of the chunk being sent, so its reads overlap ours.
pub(crate) struct ReplicaSums {
    region: u64,
    image_bytes: u64,
    requested_to: u64,
    sums: BTreeMap<u64, u128>,
}

const SUMS_BYTES: u64 = 8 << 20;
/// Spans asked for ahead of the one being compared.
pub(crate) const SUMS_AHEAD: u64 = 2;

impl ReplicaSums {
    /// For a volume of `image_bytes` in regions of `region`, asking from `from`.
    pub(crate) fn new(region: u64, image_bytes: u64, from: u64) -> Self {
        Self {
            region,
            image_bytes,
            requested_to: from,
            sums: BTreeMap::new(),
        }
    }

    /// Bytes one request covers: whole regions, about `SUMS_BYTES`.
    pub(crate) fn span(&self) -> u64 {
        (SUMS_BYTES / self.region).max(1) * self.region
    }

    /// Asks for every span up to `to` not asked for yet.
    pub(crate) async fn ask(
        &mut self,
        conn: &mut Conn,
        session: u64,
        epoch: u64,
        to: u64,
    ) -> Result<(), ExecError> {
        let to = to.min(self.image_bytes);
        while self.requested_to < to {
            let len = self.span().min(self.image_bytes - self.requested_to);
            let message = Message::SumsRequest {
                session,
                offset: self.requested_to,
                len,
                region_bytes: self.region,
            };
            conn.send(Envelope { epoch, message }).await?;
            self.requested_to += len;
        }
        Ok(())
    }

    /// The replica's checksums of the regions in `[offset, offset + len)`.
    pub(crate) async fn take(
        &mut self,
        conn: &mut Conn,
        timeout: Duration,
        offset: u64,
        len: u64,
    ) -> Result<Vec<u128>, ExecError> {
        let regions = offset / self.region..(offset + len).div_ceil(self.region);
        while !self.sums.contains_key(&(regions.end - 1)) {
            let answer = recv(conn, timeout).await?;
            let Message::RegionSums { offset, sums, .. } = answer.message else {
                return Err(ExecError::Protocol(format!(
                    "expected region sums, got {:?}",
                    answer.message
                )));
            };
            let sums = regions::decode_sums(&sums)
                .ok_or_else(|| ExecError::Protocol("region sums of a bad length".into()))?;
            // Only what was asked for: whole regions, before what was asked.
            let first = offset / self.region;
            let asked = self.requested_to.div_ceil(self.region);
            if !offset.is_multiple_of(self.region) || first + sums.len() as u64 > asked {
                return Err(ExecError::Protocol(format!(
                    "region sums at {offset} for {} regions: not what was asked (up to {})",
                    sums.len(),
                    self.requested_to
                )));
            }
            self.sums.extend(
                sums.into_iter()
                    .enumerate()
                    .map(|(i, s)| (first + i as u64, s)),
            );
        }
        let wanted = regions.clone().map(|r| self.sums.remove(&r));
        wanted
            .collect::<Option<Vec<u128>>>()
            .ok_or_else(|| ExecError::Protocol(format!("region sums missing in {regions:?}")))
    }
}
