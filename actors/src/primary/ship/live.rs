//! Live shipping to an in-sync replica: new WAL as it is written, barrier
//! requests once what they cover is shipped, the replica's durable acks back
//! to the engine; silent when idle on a multiplexed link (the link probes).

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

/// Ships new WAL frames to an InSync replica as they are written and relays
/// its durable acks. Returns why it stopped.
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
///
/// Idle, the loop arms no timer: on a multiplexed link, liveness is the
/// link's (`mux`: one probe per node pair, and a link found dead closes
/// every stream on it, this one's too). It keeps one check only while it
/// waits for an answer (batches or barriers unacknowledged: silent past
/// `peer_timeout`, the replica is taken as lost) or owes the replica the
/// committed LSN (what it holds was committed after it was shipped: one
/// heartbeat tells it, a quarter of `peer_timeout` later). A plain connection is
/// its own link: there the loop probes every quarter of `peer_timeout`,
/// idle or not.
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
    let probing = !c.tuning.multiplex;
    // The pace of the probes before issue 27, also for telling committed:
    // a busy session's batches carry it, so a heartbeat for it goes out
    // at most this often.
    let every = c.tuning.peer_timeout / 4;
    // Silence is measured from here: the last frame heard, or when the
    // loop began to wait for one.
    let mut heard = Instant::now();
    let mut check = std::pin::pin!(tokio::time::sleep(every));
    let mut armed = true;
    let mut seq = 1u64;
    // The first heartbeat goes out at once: it tells the replica what is
    // committed, and ends its count of this connection as a recovery.
    let mut told = *c.committed_rx.borrow();
    sink.send(Envelope {
        epoch,
        message: Message::Heartbeat {
            seq,
            committed: told,
        },
    })
    .await?;
    let mut barriers_sent = 0u64;
    let mut barriers_answered = 0u64;
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
        let answered = window.is_empty() && barriers_sent == barriers_answered;
        // Everything due is fed, then written with one flush.
        let mut fed = false;
        let head = *head_rx.borrow_and_update();
        while shipped < head && !window.is_full() {
            let (frames, last) = wal.read_raw(shipped, head, c.tuning.batch_bytes)?;
            let len = frames.len();
            let committed = *c.committed_rx.borrow();
            let message = Message::WalBatch {
                session: 0,
                first_lsn: shipped + 1,
                last_lsn: last,
                committed,
                frames,
            };
            sink.feed(Envelope { epoch, message }).await?;
            fed = true;
            told = told.max(committed);
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
            told = told.max(committed);
            barriers_sent = barriers_sent.max(id);
        }
        if fed {
            sink.flush().await?;
            if answered {
                heard = Instant::now();
            }
        }
        let owed = window.is_empty() && barriers_sent == barriers_answered;
        if !armed && (probing || !owed || told < shipped) {
            check.as_mut().reset(tokio::time::Instant::now() + every);
            armed = true;
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
                heard = Instant::now();
                match envelope.message {
                    Message::DurableAck { durable, barrier, committed } => {
                        window.acked(durable);
                        if let Some(id) = barrier {
                            barriers_answered = barriers_answered.max(id);
                        }
                        let ack = transport::engine_ack(envelope.epoch, durable, barrier, committed);
                        c.report(Input::Ack { replica: c.replica.clone(), ack });
                    }
                    Message::HeartbeatAck { .. } => {}
                    Message::Fence { current_epoch } => return Err(ExecError::Fenced(current_epoch)),
                    Message::Error { code, message } => return Err(ExecError::Peer { code, message }),
                    other => return Err(ExecError::Protocol(format!("unexpected {other:?} while live"))),
                }
            }
            () = check.as_mut(), if armed => {
                armed = false;
                let waits = !(window.is_empty() && barriers_sent == barriers_answered);
                if (probing || waits) && heard.elapsed() > c.tuning.peer_timeout {
                    return Err(ExecError::Timeout(c.tuning.peer_timeout));
                }
                let committed = *c.committed_rx.borrow();
                if probing || committed > told {
                    seq += 1;
                    told = told.max(committed);
                    let message = Message::Heartbeat { seq, committed };
                    sink.send(Envelope { epoch, message }).await?;
                }
            }
        }
    }
}
