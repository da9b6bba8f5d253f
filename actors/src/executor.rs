//! Executor futures run by a `SenderActor`: connect + hello, catch-up,
//! rebuild, live shipping. They consume only plan-bound values, step through
//! the engine's executor state machines, stream WAL frames from the log
//! reader with bounded unacknowledged bytes, and report progress to the
//! volume actor. Each ends by returning the connection (or an error, which
//! closes it).

use crate::adapt;
use crate::error::ExecError;
use crate::sender::SenderContext;
use crate::transport::{framed, recv, send_bulk, Conn};
use bytes::{Bytes, BytesMut};
use futures::{SinkExt, StreamExt};
use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use walship_engine::{
    Ack, CatchUpExecutor, CatchUpProgress, Endpoint, Epoch, HandshakeReply, Input, Lsn, PlanKind,
    RebuildExecutor, RebuildProgress, RebuildSource, RecoveryPlan, ReplicaId, ReplicaLog,
    ResourceGrant, SessionId, Step,
};
use walship_io::{Envelope, ImageKind, Message, SnapshotPin};

/// LSNs per executor step; the log reader cuts them into reads anyway.
const STEP_ENTRIES: u64 = 1 << 20;

/// Connects, says hello, returns the connection and the replica's answer.
pub(crate) async fn connect_and_hello(
    c: &SenderContext,
    session: SessionId,
    epoch: u64,
    endpoint: &Endpoint,
) -> Result<(Conn, HandshakeReply), ExecError> {
    let limit = c.tuning.connect_timeout;
    let stream = tokio::time::timeout(limit, TcpStream::connect(&endpoint.data_addr))
        .await
        .map_err(|_| ExecError::Timeout(limit))?
        .map_err(|e| ExecError::Wire(e.into()))?;
    stream
        .set_nodelay(true)
        .map_err(|e| ExecError::Wire(e.into()))?;
    let mut conn = framed(stream);
    let hello = Message::Hello {
        cluster: c.cluster.clone(),
        volume: c.replica.volume().to_owned(),
        replica: c.replica.as_str().to_owned(),
        session: session.get(),
    };
    conn.send(Envelope {
        epoch,
        message: hello,
    })
    .await?;
    let answer = recv(&mut conn, c.tuning.peer_timeout).await?;
    match answer.message {
        Message::HelloAck {
            replica,
            flushed,
            checkpoint,
            epochs,
        } => {
            let replica = ReplicaId::parse(&replica)
                .map_err(|e| ExecError::Protocol(format!("hello ack: {e}")))?;
            let epochs = adapt::engine_epochs(&epochs)
                .map_err(|e| ExecError::Protocol(format!("hello ack: {e}")))?;
            let reply = HandshakeReply {
                replica,
                epoch: Epoch(answer.epoch),
                log: ReplicaLog {
                    flushed: Lsn(flushed),
                    checkpoint: Lsn(checkpoint),
                    epochs,
                },
            };
            Ok((conn, reply))
        }
        other => Err(ExecError::Protocol(format!(
            "expected hello ack, got {other:?}"
        ))),
    }
}

/// Streams WAL ranges with a bound on unacknowledged bytes.
struct Shipper<'a> {
    conn: &'a mut Conn,
    c: &'a SenderContext,
    session: u64,
    epoch: u64,
    acked: u64,
    inflight: VecDeque<(u64, usize)>,
    inflight_bytes: usize,
}

impl<'a> Shipper<'a> {
    fn new(conn: &'a mut Conn, c: &'a SenderContext, session: u64, epoch: u64, acked: u64) -> Self {
        Self {
            conn,
            c,
            session,
            epoch,
            acked,
            inflight: VecDeque::new(),
            inflight_bytes: 0,
        }
    }

    /// Waits for the next durable ack; `on_ack(durable, entries, bytes)` reports it.
    async fn await_ack(&mut self, on_ack: &mut impl FnMut(u64, u64, u64)) -> Result<(), ExecError> {
        loop {
            let envelope = recv(self.conn, self.c.tuning.peer_timeout).await?;
            match envelope.message {
                Message::DurableAck { durable, .. } => {
                    let mut bytes = 0;
                    while self
                        .inflight
                        .front()
                        .is_some_and(|(last, _)| *last <= durable)
                    {
                        if let Some((_, len)) = self.inflight.pop_front() {
                            self.inflight_bytes -= len;
                            bytes += len as u64;
                        }
                    }
                    if durable > self.acked {
                        on_ack(durable, durable - self.acked, bytes);
                        self.acked = durable;
                    }
                    return Ok(());
                }
                Message::HeartbeatAck { .. } => {}
                other => {
                    return Err(ExecError::Protocol(format!(
                        "expected durable ack, got {other:?}"
                    )))
                }
            }
        }
    }

    async fn ship(
        &mut self,
        from: u64,
        to: u64,
        on_ack: &mut impl FnMut(u64, u64, u64),
    ) -> Result<(), ExecError> {
        let mut stream = self.c.reader.stream(from, to)?;
        while let Some(batch) = stream.next_batch().await {
            let batch = batch?;
            let len = batch.raw.len();
            while !self.inflight.is_empty()
                && self.inflight_bytes + len > self.c.tuning.max_inflight_bytes
            {
                self.await_ack(on_ack).await?;
            }
            let message = Message::WalBatch {
                session: self.session,
                first_lsn: batch.first_lsn,
                last_lsn: batch.last_lsn,
                committed: *self.c.committed_rx.borrow(),
                frames: batch.raw,
            };
            send_bulk(
                self.conn,
                Envelope {
                    epoch: self.epoch,
                    message,
                },
            )
            .await?;
            self.c.count_sent(len);
            self.inflight.push_back((batch.last_lsn, len));
            self.inflight_bytes += len;
        }
        Ok(())
    }

    async fn drain(
        &mut self,
        until: u64,
        on_ack: &mut impl FnMut(u64, u64, u64),
    ) -> Result<(), ExecError> {
        while self.acked < until {
            self.await_ack(on_ack).await?;
        }
        Ok(())
    }
}

/// Runs a catch-up or rebuild plan to its end.
pub(crate) async fn run_plan(
    conn: &mut Conn,
    c: &SenderContext,
    session: SessionId,
    plan: &RecoveryPlan,
    grants: &[ResourceGrant],
    image: Option<Arc<SnapshotPin>>,
) -> Result<(), ExecError> {
    match &plan.kind {
        PlanKind::CatchUp { start, .. } => catch_up(conn, c, session, plan, start.get()).await,
        PlanKind::Rebuild { source } => {
            let image =
                image.ok_or_else(|| ExecError::Protocol("rebuild without an image pin".into()))?;
            let kind = match source {
                RebuildSource::SnapshotTail { .. } => ImageKind::Snapshot,
                RebuildSource::FullBase { .. } => ImageKind::FullBase,
            };
            rebuild(conn, c, session, plan, grants, image, kind).await
        }
    }
}

async fn catch_up(
    conn: &mut Conn,
    c: &SenderContext,
    session: SessionId,
    plan: &RecoveryPlan,
    start: u64,
) -> Result<(), ExecError> {
    let epoch = plan.epoch;
    let replica = c.replica.clone();
    let mut exec = CatchUpExecutor::from_plan(plan, STEP_ENTRIES)?;
    let mut report = |durable: u64, entries: u64, bytes: u64| {
        let progress = CatchUpProgress {
            applied: Lsn(durable),
            entries,
            bytes,
        };
        c.report(Input::CatchUpProgress {
            replica: replica.clone(),
            session,
            epoch,
            progress,
        });
    };
    let mut shipper = Shipper::new(conn, c, session.get(), epoch.get(), start);
    loop {
        match exec.next_step()? {
            Step::Truncate { to } => {
                let message = Message::Truncate {
                    session: session.get(),
                    to: to.get(),
                };
                shipper
                    .conn
                    .send(Envelope {
                        epoch: epoch.get(),
                        message,
                    })
                    .await?;
                let answer = recv(shipper.conn, c.tuning.peer_timeout).await?;
                match answer.message {
                    Message::Truncated { to: done, .. } if done == to.get() => {
                        shipper.acked = done;
                        c.report(Input::Truncated {
                            replica: replica.clone(),
                            session,
                            epoch,
                            to,
                        });
                    }
                    other => {
                        return Err(ExecError::Protocol(format!(
                            "expected truncated, got {other:?}"
                        )))
                    }
                }
            }
            Step::ShipWal {
                from_exclusive,
                to_inclusive,
            } => {
                shipper
                    .ship(from_exclusive.get(), to_inclusive.get(), &mut report)
                    .await?;
            }
            Step::Done { flushed } => return shipper.drain(flushed.get(), &mut report).await,
            other => return Err(ExecError::Protocol(format!("catch-up step {other:?}"))),
        }
    }
}

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

async fn rebuild(
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
                from_exclusive,
                to_inclusive,
            } => {
                shipper
                    .ship(from_exclusive.get(), to_inclusive.get(), &mut report)
                    .await?;
            }
            Step::Done { flushed } => return shipper.drain(flushed.get(), &mut report).await,
            other => return Err(ExecError::Protocol(format!("rebuild step {other:?}"))),
        }
    }
}

/// Ships new WAL frames to an InSync replica as they are written, relays its
/// durable acks, and probes it when idle. Returns why it stopped.
pub(crate) async fn live_ship(
    conn: Conn,
    c: SenderContext,
    from: u64,
    epoch: u64,
    barriers: mpsc::UnboundedReceiver<BarrierRequest>,
) -> ExecError {
    match live_loop(conn, &c, from, epoch, barriers).await {
        Ok(never) => match never {},
        Err(error) => error,
    }
}

enum Never {}

/// A barrier the replica is asked to acknowledge by id: (barrier id, lsn).
pub(crate) type BarrierRequest = (u64, u64);

/// The replica's retention hold (the volume's) keeps the WAL after what it
/// acknowledged, so what is shipped next is never recycled under the loop.
/// A barrier request goes out once the WAL up to its LSN is shipped, so the
/// ack that names it covers that LSN.
async fn live_loop(
    conn: Conn,
    c: &SenderContext,
    from: u64,
    epoch: u64,
    mut barriers: mpsc::UnboundedReceiver<BarrierRequest>,
) -> Result<Never, ExecError> {
    let (mut sink, mut stream) = conn.split();
    let mut head_rx = c.head_rx.clone();
    let wal = c.store.wal();
    let mut shipped = from;
    let mut inflight: VecDeque<(u64, usize)> = VecDeque::new();
    let mut inflight_bytes = 0usize;
    let mut last_heard = Instant::now();
    let mut probe = tokio::time::interval(c.tuning.peer_timeout / 4);
    let mut seq = 0u64;
    let mut waiting: VecDeque<BarrierRequest> = VecDeque::new();
    let mut barriers_open = true;
    loop {
        let head = *head_rx.borrow_and_update();
        while shipped < head && inflight_bytes < c.tuning.max_inflight_bytes {
            let (frames, last) = wal.read_raw(shipped, head, c.tuning.batch_bytes)?;
            let len = frames.len();
            let message = Message::WalBatch {
                session: 0,
                first_lsn: shipped + 1,
                last_lsn: last,
                committed: *c.committed_rx.borrow(),
                frames,
            };
            sink.send(Envelope { epoch, message }).await?;
            c.count_sent(len);
            inflight.push_back((last, len));
            inflight_bytes += len;
            shipped = last;
        }
        while let Some(&(id, lsn)) = waiting.front().filter(|(_, lsn)| *lsn <= shipped) {
            waiting.pop_front();
            sink.send(Envelope {
                epoch,
                message: Message::Barrier { id, lsn },
            })
            .await?;
        }
        tokio::select! {
            request = barriers.recv(), if barriers_open => match request {
                Some(request) => waiting.push_back(request),
                None => barriers_open = false,
            },
            changed = head_rx.changed() => {
                if changed.is_err() {
                    return Err(ExecError::Closed);
                }
            }
            frame = stream.next() => {
                let envelope = match frame {
                    None => return Err(ExecError::Closed),
                    Some(frame) => frame?,
                };
                last_heard = Instant::now();
                match envelope.message {
                    Message::DurableAck { durable, barrier } => {
                        while inflight.front().is_some_and(|(last, _)| *last <= durable) {
                            if let Some((_, len)) = inflight.pop_front() {
                                inflight_bytes -= len;
                            }
                        }
                        let ack = Ack { epoch: Epoch(envelope.epoch), durable: Lsn(durable), barrier: barrier.map(walship_engine::BarrierId) };
                        c.report(Input::Ack { replica: c.replica.clone(), ack });
                    }
                    Message::HeartbeatAck { .. } => {}
                    Message::Fence { current_epoch } => return Err(ExecError::Fenced(current_epoch)),
                    Message::Error { code, message } => return Err(ExecError::Peer { code, message }),
                    other => return Err(ExecError::Protocol(format!("unexpected {other:?} while live"))),
                }
            }
            _ = probe.tick() => {
                if last_heard.elapsed() > c.tuning.peer_timeout {
                    return Err(ExecError::Timeout(c.tuning.peer_timeout));
                }
                seq += 1;
                let message = Message::Heartbeat { seq, committed: *c.committed_rx.borrow() };
                sink.send(Envelope { epoch, message }).await?;
            }
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
