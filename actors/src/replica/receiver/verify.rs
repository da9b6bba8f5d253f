//! The replica's side of an online verify: on a connection of its own
//! (the session's goes on), it pins its content at one LSN (its extent
//! at its checkpoint, its WAL after it) and answers region checksums of
//! that content until the primary is done or the connection closes. Its
//! checkpointer waits meanwhile (the pin), so nothing under the content
//! moves; writes keep arriving in its WAL.

use super::{error, ReceiverActor, Reply};
use bytes::Bytes;
use std::sync::Arc;
use std::time::{Duration, Instant};
use walship_io::{regions, Message, CODE_BASE, CODE_STORE, CODE_UNEXPECTED};

/// The most bytes one `SumsRequest` of a verify may cover.
const VERIFY_SUMS_MAX: u64 = 64 << 20;
/// A verify that asked nothing for this long is over (a primary gone, a
/// connection half open): its pin, which holds the checkpointer, goes.
const VERIFY_IDLE: Duration = Duration::from_secs(30);

/// A verify under way: its connection, the content it compares, when it
/// last asked for something, and the buffer its reads reuse.
#[derive(Debug)]
pub(super) struct Verifying {
    conn: u64,
    content: walship_io::ContentAt,
    last: Instant,
    buf: bytes::BytesMut,
}

impl ReceiverActor {
    /// A primary asks to compare at an LSN of at least `lsn`.
    pub(super) fn verify_begin(
        &mut self,
        conn: u64,
        epoch: u64,
        volume: &str,
        replica: &str,
        lsn: u64,
    ) -> Reply {
        if volume != self.identity.volume || replica != self.identity.replica {
            return error(
                self.epoch,
                walship_io::CODE_IDENTITY,
                format!(
                    "verify for {replica} of {volume}: this is {}",
                    self.identity.replica
                ),
            );
        }
        if epoch < self.epoch {
            self.metrics.fence();
            return Reply {
                send: vec![walship_io::Envelope {
                    epoch: self.epoch,
                    message: Message::Fence {
                        current_epoch: self.epoch,
                    },
                }],
                close: true,
            };
        }
        if self.store.partial().is_some() || self.install.is_some() {
            return error(
                self.epoch,
                CODE_BASE,
                "this replica is being rebuilt: nothing to verify",
            );
        }
        self.verify_expire();
        if self.verifying.is_some() {
            return error(
                self.epoch,
                CODE_UNEXPECTED,
                "a verify of this replica is under way: one at a time",
            );
        }
        let durable = self.store.wal().durable();
        if lsn > durable {
            return error(
                self.epoch,
                CODE_STORE,
                format!("not durable through {lsn} yet (durable through {durable}): ask again"),
            );
        }
        // At the later of the primary's LSN and the lowest this replica's
        // content can be read at (its checkpoint, or past it while its
        // extent may hold more).
        let pinned = self.store.snapshot_pin("verify").and_then(|pin| {
            let at = lsn.max(pin.lsn()).max(self.store.content_floor());
            self.store.content_at(at, Some(Arc::new(pin)), "verify")
        });
        match pinned {
            Ok(content) => {
                let at = content.lsn();
                self.verifying = Some(Verifying {
                    conn,
                    content,
                    last: Instant::now(),
                    buf: bytes::BytesMut::new(),
                });
                self.answer(Message::VerifyReady { lsn: at })
            }
            Err(e) => self.store_failed("pin for verify", &e, CODE_STORE),
        }
    }

    /// A message on the verify connection `conn`, if it is one.
    pub(super) fn verify_message(&mut self, conn: u64, message: &Message) -> Option<Reply> {
        if self.verifying.as_ref().map(|v| v.conn) != Some(conn) {
            return None;
        }
        Some(match message {
            Message::SumsRequest {
                offset,
                len,
                region_bytes,
                ..
            } if *len <= VERIFY_SUMS_MAX => {
                let verifying = self.verifying.as_mut()?;
                verifying.last = Instant::now();
                let Verifying { content, buf, .. } = verifying;
                let sums = content.sums(*offset, *len, *region_bytes, buf);
                match sums {
                    Ok(sums) => self.answer(Message::RegionSums {
                        session: 0,
                        offset: *offset,
                        sums: Bytes::from(regions::encode_sums(&sums)),
                    }),
                    Err(e) => self.store_failed("sums for verify", &e, CODE_BASE),
                }
            }
            Message::VerifyEnd => {
                self.verifying = None;
                Reply {
                    send: Vec::new(),
                    close: true,
                }
            }
            other => {
                self.verifying = None;
                error(
                    self.epoch,
                    CODE_UNEXPECTED,
                    format!("during a verify: {other:?}"),
                )
            }
        })
    }

    /// The verify connection closed: its pin goes.
    pub(super) fn verify_closed(&mut self, conn: u64) {
        if self.verifying.as_ref().map(|v| v.conn) == Some(conn) {
            self.verifying = None;
        }
    }

    /// A verify idle past [`VERIFY_IDLE`] is over (checked on every
    /// message the replica takes: the live session's heartbeats come
    /// often).
    pub(super) fn verify_expire(&mut self) {
        if self
            .verifying
            .as_ref()
            .is_some_and(|v| v.last.elapsed() > VERIFY_IDLE)
        {
            tracing::warn!(replica = %self.identity.replica, "an idle verify's pin released");
            self.verifying = None;
        }
    }
}
