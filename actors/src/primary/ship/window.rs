//! The window of WAL batches shipped and not yet acknowledged durable, and
//! the request-response shipper that plans use. One window serves catch-up,
//! a rebuild's tail and live shipping.

use super::SenderContext;
use crate::error::ExecError;
use crate::transport::{recv, send_bulk, Conn};
use std::collections::VecDeque;
use walship_engine::Lsn;
use walship_io::{Envelope, Message};

/// Batches shipped and not yet acknowledged, bounded in bytes.
#[derive(Debug)]
pub(super) struct AckWindow {
    /// (last LSN, bytes) of each batch, oldest first.
    inflight: VecDeque<(u64, usize)>,
    bytes: usize,
    limit: usize,
}

impl AckWindow {
    pub(super) fn new(limit: usize) -> Self {
        Self {
            inflight: VecDeque::new(),
            bytes: 0,
            limit,
        }
    }

    /// Whether a batch of `len` bytes may go out now. An empty window takes
    /// any batch, so one larger than the limit still moves.
    pub(super) fn has_room(&self, len: usize) -> bool {
        self.inflight.is_empty() || self.bytes + len <= self.limit
    }

    /// Whether every batch shipped is acknowledged.
    pub(super) fn is_empty(&self) -> bool {
        self.inflight.is_empty()
    }

    /// Whether the window is at its limit (for a loop that reads the next
    /// batch only when it may send it).
    pub(super) fn is_full(&self) -> bool {
        self.bytes >= self.limit
    }

    /// A batch ending at `last`, of `len` bytes, went out.
    pub(super) fn shipped(&mut self, last: u64, len: usize) {
        self.inflight.push_back((last, len));
        self.bytes += len;
    }

    /// The replica holds everything up to `durable`: the batches it covers
    /// leave the window. Returns the bytes they held.
    pub(super) fn acked(&mut self, durable: u64) -> u64 {
        let mut freed = 0;
        while let Some(&(last, len)) = self.inflight.front() {
            if last > durable {
                break;
            }
            self.inflight.pop_front();
            self.bytes -= len;
            freed += len as u64;
        }
        freed
    }
}

/// Streams WAL ranges for a plan, waiting for acks when the window is full.
pub(super) struct Shipper<'a> {
    pub(super) conn: &'a mut Conn,
    c: &'a SenderContext,
    session: u64,
    epoch: u64,
    /// The replica holds everything up to here.
    pub(super) acked: u64,
    window: AckWindow,
    /// Counted as a running recovery (for the budget's floor) while shipping.
    _recovering: crate::recovery::Counted,
}

impl<'a> Shipper<'a> {
    pub(super) fn new(
        conn: &'a mut Conn,
        c: &'a SenderContext,
        session: u64,
        epoch: u64,
        acked: u64,
    ) -> Self {
        Self {
            conn,
            c,
            session,
            epoch,
            acked,
            window: AckWindow::new(c.tuning.max_inflight_bytes),
            _recovering: c.recovery.recovering(),
        }
    }

    /// Waits for the next durable ack; `on_ack(durable, entries, bytes)` reports it.
    async fn await_ack(&mut self, on_ack: &mut impl FnMut(u64, u64, u64)) -> Result<(), ExecError> {
        loop {
            let envelope = recv(self.conn, self.c.tuning.peer_timeout).await?;
            match envelope.message {
                Message::DurableAck { durable, .. } => {
                    let bytes = self.window.acked(durable);
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

    /// Ships the WAL in (`from`, `to`].
    pub(super) async fn ship(
        &mut self,
        from: Lsn,
        to: Lsn,
        on_ack: &mut impl FnMut(u64, u64, u64),
    ) -> Result<(), ExecError> {
        let mut stream = self.c.reader.stream(from.get(), to.get())?;
        while let Some(batch) = stream.next_batch().await {
            let batch = batch?;
            let len = batch.raw.len();
            while !self.window.has_room(len) {
                self.await_ack(on_ack).await?;
            }
            let message = Message::WalBatch {
                session: self.session,
                first_lsn: batch.first_lsn,
                last_lsn: batch.last_lsn,
                committed: *self.c.committed_rx.borrow(),
                frames: batch.raw,
            };
            let envelope = Envelope {
                epoch: self.epoch,
                message,
            };
            self.c.throttle(len as u64).await;
            send_bulk(self.conn, envelope).await?;
            self.c.count_sent(len);
            self.window.shipped(batch.last_lsn, len);
        }
        Ok(())
    }

    /// Waits until the replica holds everything up to `until`.
    pub(super) async fn drain(
        &mut self,
        until: Lsn,
        on_ack: &mut impl FnMut(u64, u64, u64),
    ) -> Result<(), ExecError> {
        while self.acked < until.get() {
            self.await_ack(on_ack).await?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::AckWindow;

    #[test]
    fn the_window_bounds_bytes_in_flight_and_frees_what_acks_cover() {
        let mut window = AckWindow::new(100);
        // Empty: any batch goes, even one over the limit.
        assert!(window.has_room(500));
        window.shipped(10, 60);
        assert!(window.has_room(40));
        assert!(!window.has_room(41));
        assert!(!window.is_full());
        window.shipped(20, 40);
        assert!(window.is_full());
        // An ack inside a batch frees nothing; one at its end frees it.
        assert_eq!(window.acked(9), 0);
        assert_eq!(window.acked(10), 60);
        assert!(window.has_room(60));
        // An ack past everything empties the window; a repeat frees nothing.
        assert_eq!(window.acked(25), 40);
        assert_eq!(window.acked(25), 0);
        assert!(window.has_room(500));
    }
}
