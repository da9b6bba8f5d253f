//! Live shipping to an in-sync replica: new WAL as it is written, barrier
//! requests once what they cover is shipped, the replica's durable acks back
//! to the engine, probes when idle.

use super::window::AckWindow;
use super::SenderContext;
use crate::error::ExecError;
use crate::transport::{self, Conn};
use futures::{SinkExt, StreamExt};
use std::collections::VecDeque;
use std::sync::{Mutex, PoisonError};
use std::time::Instant;
use tokio::sync::mpsc;
use tokio::sync::mpsc::error::TryRecvError;
use walship_engine::Input;
use walship_io::{Envelope, Message};

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
/// A barrier's id, its LSN, and the committed LSN to tell the replica.
pub(crate) type BarrierRequest = (u64, u64, u64);

/// Where the volume hands barrier requests for one replica straight to its
/// live task, not through the sender's mailbox: a request made by the write
/// that the task is about to ship then goes out in the same socket write as
/// its frames, and the replica answers both with one sync and one ack. A
/// request made while nothing ships live waits for the next live task (the
/// newest one only): a replica that comes back in sync holding the whole
/// log is asked before its live task starts, and no batch would tell it
/// what was committed otherwise.
#[derive(Debug, Default)]
pub(crate) struct BarrierLine(Mutex<Line>);

#[derive(Debug, Default)]
struct Line {
    tx: Option<mpsc::UnboundedSender<BarrierRequest>>,
    pending: Option<BarrierRequest>,
}

impl BarrierLine {
    fn line(&self) -> std::sync::MutexGuard<'_, Line> {
        self.0.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// A new live task's end of the line, with the request that waited
    /// for it; a previous task's closes.
    pub(crate) fn open(&self) -> mpsc::UnboundedReceiver<BarrierRequest> {
        let (tx, rx) = mpsc::unbounded_channel();
        let mut line = self.line();
        if let Some(request) = line.pending.take() {
            let _ = tx.send(request);
        }
        line.tx = Some(tx);
        rx
    }

    /// Hands `request` to the live task, or keeps it for the next one.
    pub(crate) fn send(&self, request: BarrierRequest) {
        let mut line = self.line();
        let unsent = match &line.tx {
            Some(tx) => tx.send(request).err().map(|e| e.0),
            None => Some(request),
        };
        if let Some(request) = unsent {
            line.tx = None;
            line.pending = Some(request);
        }
    }
}

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
    let mut window = AckWindow::new(c.tuning.max_inflight_bytes);
    let mut last_heard = Instant::now();
    let mut probe = tokio::time::interval(c.tuning.peer_timeout / 4);
    let mut seq = 0u64;
    let mut waiting: VecDeque<BarrierRequest> = VecDeque::new();
    let mut barriers_open = true;
    loop {
        // Requests made by the writes about to ship go out with them.
        while barriers_open {
            match barriers.try_recv() {
                Ok(request) => waiting.push_back(request),
                Err(TryRecvError::Empty) => break,
                Err(TryRecvError::Disconnected) => barriers_open = false,
            }
        }
        // Everything due is fed, then written with one flush.
        let mut fed = false;
        let head = *head_rx.borrow_and_update();
        while shipped < head && !window.is_full() {
            let (frames, last) = wal.read_raw(shipped, head, c.tuning.batch_bytes)?;
            let len = frames.len();
            let message = Message::WalBatch {
                session: 0,
                first_lsn: shipped + 1,
                last_lsn: last,
                committed: *c.committed_rx.borrow(),
                frames,
            };
            sink.feed(Envelope { epoch, message }).await?;
            fed = true;
            c.count_sent(len);
            window.shipped(last, len);
            shipped = last;
        }
        while let Some(&(id, lsn, committed)) =
            waiting.front().filter(|(_, lsn, _)| *lsn <= shipped)
        {
            waiting.pop_front();
            sink.feed(Envelope {
                epoch,
                message: Message::Barrier { id, lsn, committed },
            })
            .await?;
            fed = true;
        }
        if fed {
            sink.flush().await?;
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
                    Message::DurableAck { durable, barrier, committed } => {
                        window.acked(durable);
                        let ack = transport::engine_ack(envelope.epoch, durable, barrier, committed);
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
