//! Rebuild: a pinned image (snapshot or full base) sent in chunks, read one
//! ahead of the socket, then the WAL tail through the shared window.

use super::sums::{ReplicaSums, SUMS_AHEAD};
use super::window::Shipper;
use super::{SenderContext, STEP_ENTRIES};
use crate::error::ExecError;
use crate::transport::{recv, send_bulk, Conn};
use bytes::{Bytes, BytesMut};
use futures::SinkExt;
use std::sync::Arc;
use std::time::Duration;
use walship_engine::{
    Input, Lsn, RebuildExecutor, RebuildProgress, RecoveryPlan, ResourceGrant, SessionId, Step,
    Transfer,
};
use walship_io::regions::{self, DirtyMap};
use walship_io::{Envelope, ImageKind, Install, Message, SnapshotPin};

/// A chunk read on a blocking thread, with its crc32c computed there too.
type ImageRead = tokio::task::JoinHandle<Result<(BytesMut, u32), walship_io::StoreError>>;

/// Reads a pinned image for transfer: one chunk ahead of the sender, so the
/// read overlaps the send, into recycled buffers, so a transfer touches no
/// fresh memory per chunk.
struct ImageReader {
    image: Arc<SnapshotPin>,
    chunk: u64,
    /// The read of the chunk expected next: (offset, len, task).
    ahead: Option<(u64, u64, ImageRead)>,
    spare: Vec<BytesMut>,
}

impl ImageReader {
    fn new(image: Arc<SnapshotPin>, chunk: u64) -> Self {
        Self {
            image,
            chunk: chunk.max(1),
            ahead: None,
            spare: Vec::new(),
        }
    }

    fn start(&mut self, offset: u64, len: u64) -> ImageRead {
        let pin = Arc::clone(&self.image);
        let mut buf = self.spare.pop().unwrap_or_default();
        tokio::task::spawn_blocking(move || {
            pin.read_into(offset, len as usize, &mut buf)?;
            let crc = crc32c::crc32c(&buf);
            Ok((buf, crc))
        })
    }

    /// The chunk at `offset` and its crc32c; starts reading the one after it.
    async fn read(&mut self, offset: u64, len: u64) -> Result<(Bytes, u32), ExecError> {
        let task = match self.ahead.take() {
            Some((o, l, task)) if o == offset && l == len => task,
            // Not the chunk guessed: a detached read finishes on its own.
            _ => self.start(offset, len),
        };
        let (buf, crc) = task
            .await
            .map_err(|e| ExecError::Protocol(format!("image read task: {e}")))??;
        let next = offset + len;
        let total = self.image.image_bytes();
        if next < total {
            let next_len = self.chunk.min(total - next);
            let task = self.start(next, next_len);
            self.ahead = Some((next, next_len, task));
        }
        Ok((buf.freeze(), crc))
    }

    /// The chunk at `offset`, without reading ahead: a transfer that skips
    /// most chunks (a dirty map's) would read the next one for nothing.
    async fn read_only(&mut self, offset: u64, len: u64) -> Result<Bytes, ExecError> {
        let task = match self.ahead.take() {
            Some((o, l, task)) if o == offset && l == len => task,
            _ => self.start(offset, len),
        };
        let (buf, _) = task
            .await
            .map_err(|e| ExecError::Protocol(format!("image read task: {e}")))??;
        Ok(buf.freeze())
    }

    /// Takes a sent chunk's buffer back once nothing else holds it.
    fn recycle(&mut self, data: Bytes) {
        if let Ok(buf) = data.try_into_mut() {
            if self.spare.len() < 2 {
                self.spare.push(buf);
            }
        }
    }
}

/// A rebuild's image and what of it moves.
pub(crate) struct Transferring<'a> {
    /// The pinned image.
    pub(crate) image: Arc<SnapshotPin>,
    /// Snapshot or full base.
    pub(crate) kind: ImageKind,
    /// What the engine chose to move.
    pub(crate) transfer: &'a Transfer,
}

/// Which regions of the image go: below `from` (a resumed install's
/// cursor), those the dirty map marks; from there on, as `above` says.
struct Selection {
    map: Option<DirtyMap>,
    from: u64,
    above: Above,
}

/// What goes at and past the cursor.
enum Above {
    /// Every region.
    All,
    /// The regions the dirty map marks.
    Dirty,
    /// The regions whose checksums differ from the replica's.
    Compared(ReplicaSums),
}

impl Selection {
    fn dirty(&self, region: u64) -> bool {
        self.map.as_ref().is_some_and(|m| m.is_dirty(region))
    }
}

/// The parts of `data` (the image at `offset`) to send: runs of adjacent
/// chosen regions, each as (offset, bytes).
fn chosen_runs(
    data: &Bytes,
    offset: u64,
    region: u64,
    chosen: impl Fn(u64) -> bool,
) -> Vec<(u64, Bytes)> {
    let mut runs: Vec<(u64, Bytes)> = Vec::new();
    let mut at = 0u64;
    let len = data.len() as u64;
    while at < len {
        let end = (at + region).min(len);
        if chosen((offset + at) / region) {
            match runs.last_mut() {
                Some((start, run)) if *start - offset + run.len() as u64 == at => {
                    *run = data.slice((*start - offset) as usize..end as usize);
                }
                _ => runs.push((offset + at, data.slice(at as usize..end as usize))),
            }
        }
        at = end;
    }
    runs
}

/// How the replica installs the image and which regions of it go.
fn select(
    c: &SenderContext,
    transfer: &Transfer,
    image_lsn: u64,
    image_bytes: u64,
    region: u64,
) -> Result<(Install, Selection), ExecError> {
    let all = |from| Selection {
        map: None,
        from,
        above: Above::All,
    };
    let compare = |from| ReplicaSums::new(region, image_bytes, from);
    // The map as the checkpointer left it at the image (a pin holds the
    // checkpointer still); one since after the image covers too little.
    let replica = &c.replica;
    let map = c
        .store
        .dirty_map(replica.as_str())
        .filter(|m| m.since() <= image_lsn);
    let need_map = |since: Lsn| {
        map.clone()
            .filter(|m| m.since() <= since.get())
            .ok_or_else(|| {
                ExecError::Protocol(format!("the dirty map since {since} for {replica} is gone"))
            })
    };
    let (apply_through, by_map, selection) = match transfer {
        Transfer::Staged { .. } => return Ok((Install::Staging, all(0))),
        Transfer::Whole { .. } => (Lsn::ZERO, false, all(0)),
        Transfer::Compared { apply_through, .. } => (
            *apply_through,
            false,
            Selection {
                map: None,
                from: 0,
                above: Above::Compared(compare(0)),
            },
        ),
        Transfer::Dirty {
            since,
            apply_through,
            ..
        } => (
            *apply_through,
            true,
            Selection {
                map: Some(need_map(*since)?),
                from: 0,
                above: Above::Dirty,
            },
        ),
        Transfer::Resume {
            since, from, above, ..
        } => {
            let from = (*from).min(image_bytes) / region * region;
            let (by_map, above) = match above {
                walship_engine::Above::Dirty => (true, Above::Dirty),
                walship_engine::Above::Compared => (false, Above::Compared(compare(from))),
            };
            let selection = Selection {
                map: Some(need_map(*since)?),
                from,
                above,
            };
            (Lsn::ZERO, by_map, selection)
        }
    };
    let install = Install::InPlace {
        source: c.store.image_source(),
        // What a cut of this install resumes by: the map, if one covers it.
        since: map.as_ref().map(DirtyMap::since),
        apply_through: apply_through.get().min(image_lsn),
        by_map,
    };
    Ok((install, selection))
}

pub(super) async fn rebuild(
    conn: &mut Conn,
    c: &SenderContext,
    session: SessionId,
    plan: &RecoveryPlan,
    grants: &[ResourceGrant],
    what: Transferring<'_>,
) -> Result<(), ExecError> {
    let Transferring {
        image,
        kind,
        transfer,
    } = what;
    let epoch = plan.epoch;
    let replica = c.replica.clone();
    let tuning = &c.tuning;
    let image_bytes = image.image_bytes();
    let region = regions::region_bytes(image_bytes);
    // In place, a chunk is whole regions: each region is chosen (by the
    // map, or by comparing its checksum) exactly once.
    let chunk = match transfer.in_place() {
        true => (tuning.image_chunk_bytes as u64).div_ceil(region).max(1) * region,
        false => tuning.image_chunk_bytes as u64,
    };
    let mut exec = RebuildExecutor::from_plan(plan, grants, image_bytes, chunk, STEP_ENTRIES)?;
    let image_lsn = exec.image_lsn().get();
    let (install, mut chosen) = select(c, transfer, image_lsn, image_bytes, region)?;
    let begin = Message::RebuildBegin {
        session: session.get(),
        kind,
        image_lsn,
        image_bytes,
        install,
    };
    conn.send(Envelope {
        epoch: epoch.get(),
        message: begin,
    })
    .await?;
    let send_progress = |progress: RebuildProgress| {
        c.report(Input::RebuildProgress {
            replica: replica.clone(),
            session,
            epoch,
            progress,
        });
    };
    let mut report = |durable: u64, _: u64, _: u64| {
        send_progress(RebuildProgress::TailReplayed {
            through: Lsn(durable),
        })
    };
    let timeout = tuning.peer_timeout.max(Duration::from_secs(30));
    let mut crc = 0u32;
    let mut images = ImageReader::new(Arc::clone(&image), chunk);
    let mut shipper = Shipper::new(conn, c, session.get(), epoch.get(), image_lsn);
    loop {
        match exec.next_step()? {
            Step::TransferImage { offset, len } => {
                let runs = match &mut chosen.above {
                    Above::All => {
                        let data = images.read(offset, len).await?.0;
                        let (from, map) = (chosen.from, chosen.map.as_ref());
                        chosen_runs(&data, offset, region, |r| {
                            r * region >= from || map.is_some_and(|m| m.is_dirty(r))
                        })
                    }
                    Above::Compared(sums) if offset + len > chosen.from => {
                        let first = chosen.from.max(offset);
                        let ahead = first + SUMS_AHEAD * sums.span();
                        sums.ask(shipper.conn, session.get(), epoch.get(), ahead)
                            .await?;
                        let (data, _) = images.read(offset, len).await?;
                        let ours = regions::region_sums(&data, region);
                        let theirs = sums
                            .take(shipper.conn, timeout, first, offset + len - first)
                            .await?;
                        let (chunk_first, their_first) = (offset / region, first / region);
                        let map = chosen.map.as_ref();
                        chosen_runs(&data, offset, region, |r| {
                            match r.checked_sub(their_first) {
                                Some(i) => {
                                    ours.get((r - chunk_first) as usize) != theirs.get(i as usize)
                                }
                                None => map.is_some_and(|m| m.is_dirty(r)),
                            }
                        })
                    }
                    // Below the cursor, or everywhere by the map: read only
                    // a chunk that holds a marked region.
                    Above::Dirty | Above::Compared(_) => {
                        let regions = offset / region..(offset + len).div_ceil(region);
                        if regions.clone().any(|r| chosen.dirty(r)) {
                            let data = images.read_only(offset, len).await?;
                            chosen_runs(&data, offset, region, |r| chosen.dirty(r))
                        } else {
                            Vec::new()
                        }
                    }
                };
                for (at, data) in runs {
                    c.throttle(data.len() as u64).await;
                    crc = crc32c::crc32c_append(crc, &data);
                    c.count_sent(data.len());
                    let message = Message::RebuildChunk {
                        session: session.get(),
                        offset: at,
                        data: data.clone(),
                    };
                    send_bulk(
                        shipper.conn,
                        Envelope {
                            epoch: epoch.get(),
                            message,
                        },
                    )
                    .await?;
                    // Written: nothing but `data` holds the buffer now.
                    images.recycle(data);
                }
                send_progress(RebuildProgress::Transferred {
                    bytes: offset + len,
                });
            }
            Step::FinishImage { image_lsn } => {
                // The replica's history becomes ours up to the image.
                let mut epochs = c.store.wal().epochs();
                epochs.retain(|e| e.first_lsn <= image_lsn.get());
                let message = Message::RebuildDone {
                    session: session.get(),
                    image_lsn: image_lsn.get(),
                    checksum: crc,
                    epochs,
                };
                shipper
                    .conn
                    .send(Envelope {
                        epoch: epoch.get(),
                        message,
                    })
                    .await?;
                let answer = recv(shipper.conn, timeout).await?;
                match answer.message {
                    Message::RebuildInstalled {
                        image_lsn: done, ..
                    } if done == image_lsn.get() => {
                        send_progress(RebuildProgress::ImageInstalled { at: image_lsn });
                    }
                    other => {
                        return Err(ExecError::Protocol(format!(
                            "expected rebuild installed, got {other:?}"
                        )))
                    }
                }
            }
            Step::ShipWal {
                from_exclusive: from,
                to_inclusive: to,
            } => shipper.ship(from, to, &mut report).await?,
            Step::Done { flushed } => return shipper.drain(flushed, &mut report).await,
            other => return Err(ExecError::Protocol(format!("rebuild step {other:?}"))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use walship_io::{Store, StoreOptions, BLOCK_SIZE};

    /// A pinned full base of 64 blocks, each filled with its own number.
    fn pinned_image(dir: &std::path::Path) -> (Store, Arc<SnapshotPin>) {
        let (store, _) = Store::open(dir, StoreOptions::new(64)).unwrap();
        let mut last = 0;
        for lba in 0..64u64 {
            let data = Bytes::from(vec![lba as u8; BLOCK_SIZE]);
            last = store.write(1, lba, data).unwrap();
        }
        store.sync_to(last).unwrap();
        let pin = store.full_base_pin("test").unwrap();
        (store, Arc::new(pin))
    }

    fn expected(offset: u64, len: u64) -> Vec<u8> {
        (offset..offset + len)
            .map(|at| (at / BLOCK_SIZE as u64) as u8)
            .collect()
    }

    #[tokio::test]
    async fn image_reader_reads_ahead_recycles_and_survives_a_wrong_guess() {
        let dir = tempfile::tempdir().unwrap();
        let (_store, image) = pinned_image(dir.path());
        let chunk = 3 * BLOCK_SIZE as u64; // the last chunk is shorter
        let total = image.image_bytes();
        let mut reader = ImageReader::new(Arc::clone(&image), chunk);
        let mut buffers = std::collections::BTreeSet::new();
        let mut whole = 0;
        let mut offset = 0;
        while offset < total {
            let len = chunk.min(total - offset);
            let (data, crc) = reader.read(offset, len).await.unwrap();
            assert_eq!(&data[..], &expected(offset, len)[..], "chunk at {offset}");
            assert_eq!(crc, crc32c::crc32c(&data));
            whole = crc32c::crc32c_combine(whole, crc, data.len());
            buffers.insert(data.as_ptr() as usize);
            reader.recycle(data);
            // Back in the pool; the read ahead, if any, holds the other one.
            let ahead = usize::from(offset + len < total);
            assert_eq!(reader.spare.len() + ahead, 2);
            offset += len;
        }
        // The chunks' crcs combine into the image's.
        assert_eq!(whole, image.checksum().unwrap());
        // Nothing read past the end; two buffers served every chunk.
        assert!(reader.ahead.is_none());
        assert!(buffers.len() <= 2, "{} buffers", buffers.len());
        drop(reader);
        // Out of order (the executor restarted the transfer): the guessed
        // read is abandoned and the right bytes come back.
        let mut reader = ImageReader::new(Arc::clone(&image), chunk);
        let _ = reader.read(0, chunk).await.unwrap();
        let (data, _) = reader.read(10 * chunk, chunk).await.unwrap();
        assert_eq!(&data[..], &expected(10 * chunk, chunk)[..]);
        drop(reader);
        // An abandoned read lets go of its pin when it finishes.
        tokio::time::timeout(Duration::from_secs(5), async {
            while Arc::strong_count(&image) > 1 {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        })
        .await
        .unwrap();
    }
}
