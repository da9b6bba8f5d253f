//! Rebuild: a pinned image (snapshot or full base) sent in chunks, read one
//! ahead of the socket, then the WAL tail through the shared window.

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
};
use walship_io::{Envelope, ImageKind, Message, SnapshotPin};

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

    /// Takes a sent chunk's buffer back once nothing else holds it.
    fn recycle(&mut self, data: Bytes) {
        if let Ok(buf) = data.try_into_mut() {
            if self.spare.len() < 2 {
                self.spare.push(buf);
            }
        }
    }
}

pub(super) async fn rebuild(
    conn: &mut Conn,
    c: &SenderContext,
    session: SessionId,
    plan: &RecoveryPlan,
    grants: &[ResourceGrant],
    image: Arc<SnapshotPin>,
    kind: ImageKind,
) -> Result<(), ExecError> {
    let epoch = plan.epoch;
    let replica = c.replica.clone();
    let tuning = &c.tuning;
    let mut exec = RebuildExecutor::from_plan(
        plan,
        grants,
        image.image_bytes(),
        tuning.image_chunk_bytes as u64,
        STEP_ENTRIES,
    )?;
    let image_lsn = exec.image_lsn().get();
    let begin = Message::RebuildBegin {
        session: session.get(),
        kind,
        image_lsn,
        image_bytes: image.image_bytes(),
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
    let mut crc = 0u32;
    let mut images = ImageReader::new(image, tuning.image_chunk_bytes as u64);
    let mut shipper = Shipper::new(conn, c, session.get(), epoch.get(), image_lsn);
    loop {
        match exec.next_step()? {
            Step::TransferImage { offset, len } => {
                let (data, chunk_crc) = images.read(offset, len).await?;
                crc = crc32c::crc32c_combine(crc, chunk_crc, data.len());
                c.count_sent(data.len());
                let message = Message::RebuildChunk {
                    session: session.get(),
                    offset,
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
                let answer = recv(
                    shipper.conn,
                    tuning.peer_timeout.max(Duration::from_secs(30)),
                )
                .await?;
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
