//! The replication protocol's wire format: a tokio-util codec.
//!
//! Every message is one frame:
//!
//! | offset | size | field |
//! | --- | --- | --- |
//! | 0 | 4 | `len`: bytes after this field, little-endian |
//! | 4 | 1 | protocol version ([`PROTOCOL_VERSION`]) |
//! | 5 | 1 | message type |
//! | 6 | 8 | epoch of the sender |
//! | 14 | `len - 10` | body |
//!
//! `len` is checked against the codec's maximum before any buffer is grown,
//! so a hostile length costs nothing. Strings are u16-length-prefixed UTF-8;
//! byte blobs are u32-length-prefixed and decoded as zero-copy slices of the
//! received frame. An epoch history is a u32 count (at most
//! [`MAX_EPOCHS`]) of (epoch u64, first lsn u64) pairs. A frame must be
//! consumed exactly: trailing bytes are an error. Every failure is a typed [`WireError`]; the caller closes the
//! connection.

use crate::epochs::{EpochStart, MAX_EPOCHS};
use bytes::{Buf, BufMut, Bytes, BytesMut};
use std::sync::{Mutex, MutexGuard, PoisonError};
use tokio_util::codec::{Decoder, Encoder};

/// Version spoken by this build. 2: the hello ack and the end of a rebuild
/// carry an epoch history. 3: the hello ack carries the committed LSN the
/// replica knows; a primary peers (`Peer`) and pulls an image from a
/// replica (`PullImage`, `PullChunk`, `PullDone`) before it serves; a
/// barrier request carries the committed LSN and a durable ack the
/// replica's floor (3 was not released before these were added). 4: a
/// rebuild says how the replica installs it (`Install`: into a staging
/// file, or in place over what it holds), the hello ack says what an
/// install in place left (`partial`), and a rebuild may compare region
/// checksums (`SumsRequest`, `RegionSums`); an online verify compares a
/// replica's content at one LSN with the primary's (`VerifyBegin`,
/// `VerifyReady`, `VerifyEnd`, and the same checksums).
pub const PROTOCOL_VERSION: u8 = 4;
/// Default largest frame accepted: a 16 MiB WAL batch plus headers.
pub const DEFAULT_MAX_FRAME: usize = 17 << 20;
const HEADER: usize = 10;
/// Bytes the decoder keeps room for beyond what it knows it needs: one
/// read then brings in a frame's header (and acks and heartbeats whole)
/// without making idle connections' buffers large.
const READ_AHEAD: usize = 256;

/// Frames at least this large (catch-up batches, image chunks) are copied
/// out of the read buffer into a [`Received`] buffer.
const BULK_FRAME: usize = 64 << 10;

/// Received buffers kept for reuse, at most [`FREE_BYTES`] in all, none
/// larger than [`FREE_BUFFER_MAX`].
const FREE_BYTES: usize = 32 << 20;
const FREE_BUFFER_MAX: usize = 4 << 20;

/// The free received buffers of the whole process.
fn free_received() -> MutexGuard<'static, Vec<Vec<u8>>> {
    static FREE: Mutex<Vec<Vec<u8>>> = Mutex::new(Vec::new());
    FREE.lock().unwrap_or_else(PoisonError::into_inner)
}

/// A large received frame's buffer, back on the free list when the last
/// `Bytes` of it drops.
///
/// Splitting a frame off the read buffer shares that buffer's allocation,
/// so the next frame's room was a new allocation whenever a consumer still
/// held the last one (a base install's writer queue, a batch in the dirty
/// map): glibc handed a freed MiB back to the kernel, and the next one
/// faulted in fresh zeroed pages. Measured on the project's VM (P2, a
/// 512 MiB full base): glibc tuned to keep freed memory
/// (`MALLOC_TRIM_THRESHOLD_`, `MALLOC_MMAP_THRESHOLD_`) took walship's
/// system CPU from 1.7-2.1 to ~1.0 s/GiB, the raw pipeline's figure. One
/// copy per byte received (user CPU) avoids the churn without tuning, and
/// the read buffer is reused in place.
struct Received(Vec<u8>);

impl Received {
    /// `bytes` in the smallest free buffer that holds them, or a new one.
    fn copy(bytes: &[u8]) -> Bytes {
        let reused = {
            let mut free = free_received();
            let best = (0..free.len())
                .filter(|&i| free[i].capacity() >= bytes.len())
                .min_by_key(|&i| free[i].capacity());
            best.map(|i| free.swap_remove(i))
        };
        let mut buf = reused.unwrap_or_else(|| Vec::with_capacity(bytes.len()));
        buf.clear();
        buf.extend_from_slice(bytes);
        Bytes::from_owner(Received(buf))
    }
}

impl AsRef<[u8]> for Received {
    fn as_ref(&self) -> &[u8] {
        &self.0
    }
}

impl Drop for Received {
    fn drop(&mut self) {
        let buf = std::mem::take(&mut self.0);
        if buf.capacity() > FREE_BUFFER_MAX {
            return;
        }
        let mut free = free_received();
        let held: usize = free.iter().map(Vec::capacity).sum();
        if held + buf.capacity() <= FREE_BYTES {
            free.push(buf);
        }
    }
}

const MAX_STRING: usize = 1024;

// Codes of `Message::Error`, the reasons a peer refuses and closes.

/// The peer claims another volume or replica.
pub const CODE_IDENTITY: u16 = 1;
/// A newer primary connection took over.
pub const CODE_SUPERSEDED: u16 = 2;
/// A batch does not start right after the replica's head.
pub const CODE_OUT_OF_ORDER: u16 = 3;
/// Truncation below the checkpoint: the replica needs a rebuild.
pub const CODE_TRUNCATE_REFUSED: u16 = 4;
/// A base transfer failed (size, order, checksum).
pub const CODE_BASE: u16 = 5;
/// The store refused (bad frame, IO error).
pub const CODE_STORE: u16 = 6;
/// A message that makes no sense here.
pub const CODE_UNEXPECTED: u16 = 7;
/// Bytes that do not decode.
pub const CODE_WIRE: u16 = 8;
/// The replica's storage failed (ENOSPC, EIO, a poisoned WAL): it cannot
/// take writes until its disk is fixed. The message carries the cause.
pub const CODE_STORAGE: u16 = 9;

/// What a rebuild transfers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ImageKind {
    /// The extent at a trusted checkpoint; a WAL tail follows.
    Snapshot,
    /// The whole extent at a base LSN.
    FullBase,
}

/// How a replica installs a rebuild's image.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Install {
    /// Every chunk, in order, into a staging file; the switch is atomic
    /// and what the replica held stays whole until it (its log may be the
    /// only other copy of what was committed).
    Staging,
    /// The chunks sent (any regions, in ascending order) over the
    /// replica's own extent; the store is partial until the image is
    /// committed (see `Store::begin_in_place`).
    InPlace {
        /// The primary store's [`crate::Store::image_source`].
        source: u64,
        /// The primary's dirty map for the replica marks every write after
        /// this, at most the image's LSN (a cut install resumes by it).
        since: Option<u64>,
        /// The replica applies its own log through this LSN first (the
        /// dirty map covers what came after it), or 0.
        apply_through: u64,
        /// The regions are chosen by that dirty map (a cut install then
        /// holds the replica's own history wherever it sent nothing).
        by_map: bool,
    },
}

/// One protocol message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Message {
    /// Primary → replica: open a session with the replica the primary believes it is talking to.
    Hello {
        /// Cluster name.
        cluster: String,
        /// Volume name.
        volume: String,
        /// Replica identity (`volume/server`).
        replica: String,
        /// Engine session id.
        session: u64,
        /// Whether what this primary calls committed is durable on its
        /// replicas (sync_all, sync_quorum): only then is it a floor the
        /// replica refuses to truncate below. Under best_effort it is the
        /// primary's own durability, which a failover may lose.
        durable_commits: bool,
    },
    /// Replica → primary: who it is and what it holds.
    HelloAck {
        /// Replica identity.
        replica: String,
        /// Durable LSN.
        flushed: u64,
        /// Checkpoint LSN: the replica cannot truncate below it.
        checkpoint: u64,
        /// The replica's epoch history: which epoch wrote each part of its log.
        epochs: Vec<EpochStart>,
        /// The highest LSN the replica knows to be committed (a primary
        /// said so, or it is checkpointed): it never truncates below it.
        committed: u64,
        /// An install in place it has not finished: its extent partly
        /// holds that image and its log is not to be trusted (`flushed`
        /// and `checkpoint` are then 0 and `epochs` empty).
        partial: Option<crate::PartialImage>,
    },
    /// A primary that is about to serve → replica: what do you hold?
    /// Answered with a `HelloAck` under the replica's own epoch, changing
    /// nothing on the replica (unlike `Hello`, it takes no session).
    Peer {
        /// Cluster name.
        cluster: String,
        /// Volume name.
        volume: String,
        /// Replica identity (`volume/server`).
        replica: String,
    },
    /// Primary → replica, after a `Hello` in the primary's new term: send
    /// me your whole volume as it is at your durable LSN (the primary lost
    /// what the replica holds). Answered with a `RebuildBegin`.
    PullImage,
    /// Primary → replica during a pull: the image's bytes at `offset`
    /// (requests come in order). Answered with a `RebuildChunk`.
    PullChunk {
        /// Byte offset.
        offset: u64,
        /// Bytes wanted.
        len: u32,
    },
    /// Primary → replica: the pull is over; answered with a `RebuildDone`
    /// carrying the crc32c of what was sent and the replica's epoch history.
    PullDone,
    /// Primary → replica, after a `Hello` in the primary's new term: the
    /// replica's WAL frames after `after` (a reverse catch-up: the primary
    /// lacks only a tail the replica holds). Answered with a `WalBatch`
    /// (empty when the replica holds nothing more), or an error when its
    /// WAL no longer holds them.
    PullFrames {
        /// The primary's head: frames after it are wanted.
        after: u64,
    },
    /// Encoded WAL frames `first_lsn..=last_lsn`, exactly as on disk.
    WalBatch {
        /// Session the batch belongs to (0 for live shipping).
        session: u64,
        /// First LSN.
        first_lsn: u64,
        /// Last LSN.
        last_lsn: u64,
        /// Primary's committed LSN when sent.
        committed: u64,
        /// The frames.
        frames: Bytes,
    },
    /// Primary → replica: ack once everything up to `lsn` is durable.
    Barrier {
        /// Barrier id.
        id: u64,
        /// LSN.
        lsn: u64,
        /// The primary's committed LSN when it asked: the replica knows it
        /// before it answers.
        committed: u64,
    },
    /// Replica → primary: everything up to `durable` is durable.
    DurableAck {
        /// Contiguous durable LSN.
        durable: u64,
        /// The barrier answered, if any.
        barrier: Option<u64>,
        /// The committed LSN the replica knows (its floor): a barrier
        /// resolves once the replicas counted know what was committed
        /// when it was asked for.
        committed: u64,
    },
    /// Liveness probe with the primary's committed LSN.
    Heartbeat {
        /// Sequence number.
        seq: u64,
        /// Committed LSN.
        committed: u64,
    },
    /// Answer to a heartbeat.
    HeartbeatAck {
        /// Sequence echoed.
        seq: u64,
        /// Durable LSN.
        durable: u64,
    },
    /// A rebuild image follows.
    RebuildBegin {
        /// Session.
        session: u64,
        /// Image kind.
        kind: ImageKind,
        /// LSN the image holds.
        image_lsn: u64,
        /// Image size.
        image_bytes: u64,
        /// How the replica installs it.
        install: Install,
    },
    /// Primary → replica during a rebuild installed in place: the
    /// checksums of your extent's regions in `[offset, offset + len)`.
    /// Answered with `RegionSums`.
    SumsRequest {
        /// Session.
        session: u64,
        /// First byte (region-aligned).
        offset: u64,
        /// Bytes (whole regions, but at the volume's end).
        len: u64,
        /// Bytes per region.
        region_bytes: u64,
    },
    /// Replica → primary: xxh3-128 of each region asked for, 16 bytes
    /// each, little-endian.
    RegionSums {
        /// Session.
        session: u64,
        /// First byte.
        offset: u64,
        /// The checksums.
        sums: Bytes,
    },
    /// Primary → replica, on a connection of its own while the session
    /// goes on: compare your content at one LSN, at least `lsn` (the
    /// primary's pinned checkpoint), with mine. Answered with
    /// `VerifyReady` (the LSN both compare at), or an error when this
    /// replica is not durable through `lsn` yet. `SumsRequest`s follow.
    VerifyBegin {
        /// Cluster name.
        cluster: String,
        /// Volume name.
        volume: String,
        /// Replica identity (`volume/server`).
        replica: String,
        /// The primary's pinned LSN.
        lsn: u64,
    },
    /// Replica → primary: the LSN the comparison is at (its own
    /// checkpoint, when that is past the primary's).
    VerifyReady {
        /// The LSN.
        lsn: u64,
    },
    /// Primary → replica: the comparison is over (also when the
    /// connection closes).
    VerifyEnd,
    /// One chunk of the image.
    RebuildChunk {
        /// Session.
        session: u64,
        /// Byte offset.
        offset: u64,
        /// Data.
        data: Bytes,
    },
    /// The image is complete; `checksum` is its crc32c.
    RebuildDone {
        /// Session.
        session: u64,
        /// LSN the image holds.
        image_lsn: u64,
        /// crc32c of the whole image.
        checksum: u32,
        /// The sender's epoch history up to the image: the replica's history
        /// once it installs it.
        epochs: Vec<EpochStart>,
    },
    /// Replica → primary: the image is installed.
    RebuildInstalled {
        /// Session.
        session: u64,
        /// LSN installed.
        image_lsn: u64,
    },
    /// Primary → replica: drop everything after `to`.
    Truncate {
        /// Session.
        session: u64,
        /// Last LSN kept.
        to: u64,
    },
    /// Replica → primary: truncated.
    Truncated {
        /// Session.
        session: u64,
        /// Last LSN kept.
        to: u64,
    },
    /// The receiver's epoch is newer: the peer is fenced.
    Fence {
        /// The newer epoch.
        current_epoch: u64,
    },
    /// The peer refused something; the connection closes after this.
    Error {
        /// Machine-readable code.
        code: u16,
        /// Human-readable message.
        message: String,
    },
}

/// A message with the sender's epoch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Envelope {
    /// Sender's epoch.
    pub epoch: u64,
    /// The message.
    pub message: Message,
}

/// A frame that cannot be decoded or encoded.
#[derive(Debug, thiserror::Error)]
pub enum WireError {
    /// Declared length over the maximum; refused before allocating.
    #[error("frame of {len} bytes exceeds the maximum {max}")]
    TooLarge {
        /// Declared length.
        len: usize,
        /// The maximum.
        max: usize,
    },
    /// Declared length shorter than the header.
    #[error("frame of {0} bytes is shorter than its header")]
    TooShort(usize),
    /// Unsupported protocol version.
    #[error("protocol version {0} not supported (this build speaks {PROTOCOL_VERSION})")]
    Version(u8),
    /// Unknown message type.
    #[error("unknown message type {0}")]
    UnknownType(u8),
    /// The body ended inside a field.
    #[error("message body truncated in {0}")]
    Truncated(&'static str),
    /// The body has bytes after its last field.
    #[error("{0} trailing bytes after the message body")]
    Trailing(usize),
    /// A string is not UTF-8.
    #[error("field {0} is not UTF-8")]
    BadUtf8(&'static str),
    /// A string longer than the protocol allows.
    #[error("field {field} is {len} bytes, more than {MAX_STRING}")]
    StringTooLong {
        /// Field.
        field: &'static str,
        /// Length.
        len: usize,
    },
    /// An epoch history longer than the protocol allows.
    #[error("epoch history of {0} entries, more than {MAX_EPOCHS}")]
    TooManyEpochs(usize),
    /// An enum byte out of range.
    #[error("field {field} has invalid value {value}")]
    BadValue {
        /// Field.
        field: &'static str,
        /// Value.
        value: u8,
    },
    /// The socket failed.
    #[error(transparent)]
    Io(#[from] std::io::Error),
}

/// The codec. `max_frame` bounds what is accepted and sent.
#[derive(Debug, Clone, Copy)]
pub struct WireCodec {
    max_frame: usize,
}

impl Default for WireCodec {
    fn default() -> Self {
        Self {
            max_frame: DEFAULT_MAX_FRAME,
        }
    }
}

impl WireCodec {
    /// A codec accepting frames up to `max_frame` bytes.
    pub fn new(max_frame: usize) -> Self {
        Self { max_frame }
    }
}

struct Reader {
    body: Bytes,
}

impl Reader {
    fn need(&self, n: usize, what: &'static str) -> Result<(), WireError> {
        if self.body.remaining() < n {
            return Err(WireError::Truncated(what));
        }
        Ok(())
    }

    fn u8(&mut self, what: &'static str) -> Result<u8, WireError> {
        self.need(1, what)?;
        Ok(self.body.get_u8())
    }

    fn u16(&mut self, what: &'static str) -> Result<u16, WireError> {
        self.need(2, what)?;
        Ok(self.body.get_u16_le())
    }

    fn u32(&mut self, what: &'static str) -> Result<u32, WireError> {
        self.need(4, what)?;
        Ok(self.body.get_u32_le())
    }

    fn u64(&mut self, what: &'static str) -> Result<u64, WireError> {
        self.need(8, what)?;
        Ok(self.body.get_u64_le())
    }

    fn string(&mut self, what: &'static str) -> Result<String, WireError> {
        let len = self.u16(what)? as usize;
        if len > MAX_STRING {
            return Err(WireError::StringTooLong { field: what, len });
        }
        self.need(len, what)?;
        let raw = self.body.split_to(len);
        String::from_utf8(raw.to_vec()).map_err(|_| WireError::BadUtf8(what))
    }

    fn epochs(&mut self, what: &'static str) -> Result<Vec<EpochStart>, WireError> {
        let count = self.u32(what)? as usize;
        if count > MAX_EPOCHS {
            return Err(WireError::TooManyEpochs(count));
        }
        self.need(16 * count, what)?;
        Ok((0..count)
            .map(|_| EpochStart {
                epoch: self.body.get_u64_le(),
                first_lsn: self.body.get_u64_le(),
            })
            .collect())
    }

    fn blob(&mut self, what: &'static str) -> Result<Bytes, WireError> {
        let len = self.u32(what)? as usize;
        self.need(len, what)?;
        Ok(self.body.split_to(len))
    }

    fn finish(self) -> Result<(), WireError> {
        match self.body.remaining() {
            0 => Ok(()),
            n => Err(WireError::Trailing(n)),
        }
    }
}

/// Writes a string, cut to [`MAX_STRING`] bytes at a character boundary
/// (only free text such as an error's detail can be that long).
fn put_string(dst: &mut BytesMut, value: &str) {
    let mut len = value.len().min(MAX_STRING);
    while !value.is_char_boundary(len) {
        len -= 1;
    }
    dst.put_u16_le(len as u16);
    dst.put_slice(&value.as_bytes()[..len]);
}

/// Writes an epoch history. One longer than [`MAX_EPOCHS`] is refused, not
/// cut: a history missing its newest epochs would match the wrong log.
fn put_epochs(dst: &mut BytesMut, epochs: &[EpochStart]) -> Result<(), WireError> {
    if epochs.len() > MAX_EPOCHS {
        return Err(WireError::TooManyEpochs(epochs.len()));
    }
    dst.put_u32_le(epochs.len() as u32);
    for entry in epochs {
        dst.put_u64_le(entry.epoch);
        dst.put_u64_le(entry.first_lsn);
    }
    Ok(())
}

fn put_blob(dst: &mut BytesMut, value: &Bytes) {
    dst.put_u32_le(value.len() as u32);
    dst.put_slice(value);
}

impl Message {
    fn type_byte(&self) -> u8 {
        match self {
            Self::Hello { .. } => 1,
            Self::HelloAck { .. } => 2,
            Self::WalBatch { .. } => 3,
            Self::Barrier { .. } => 4,
            Self::DurableAck { .. } => 5,
            Self::Heartbeat { .. } => 6,
            Self::HeartbeatAck { .. } => 7,
            Self::RebuildBegin { .. } => 8,
            Self::RebuildChunk { .. } => 9,
            Self::RebuildDone { .. } => 10,
            Self::RebuildInstalled { .. } => 11,
            Self::Truncate { .. } => 12,
            Self::Truncated { .. } => 13,
            Self::Fence { .. } => 14,
            Self::Error { .. } => 15,
            Self::Peer { .. } => 16,
            Self::PullImage => 17,
            Self::PullChunk { .. } => 18,
            Self::PullDone => 19,
            Self::PullFrames { .. } => 20,
            Self::SumsRequest { .. } => 21,
            Self::RegionSums { .. } => 22,
            Self::VerifyBegin { .. } => 23,
            Self::VerifyReady { .. } => 24,
            Self::VerifyEnd => 25,
        }
    }

    fn encode_body(&self, dst: &mut BytesMut) -> Result<(), WireError> {
        match self {
            Self::Hello {
                cluster,
                volume,
                replica,
                session,
                durable_commits,
            } => {
                put_string(dst, cluster);
                put_string(dst, volume);
                put_string(dst, replica);
                dst.put_u64_le(*session);
                dst.put_u8(u8::from(*durable_commits));
            }
            Self::HelloAck {
                replica,
                flushed,
                checkpoint,
                epochs,
                committed,
                partial,
            } => {
                put_string(dst, replica);
                dst.put_u64_le(*flushed);
                dst.put_u64_le(*checkpoint);
                put_epochs(dst, epochs)?;
                dst.put_u64_le(*committed);
                // 0: none; else 1, | 2 chosen by a dirty map, | 4 since known.
                dst.put_u8(match partial {
                    None => 0,
                    Some(p) => 1 | u8::from(p.by_map) << 1 | u8::from(p.since.is_some()) << 2,
                });
                let p = partial.unwrap_or_default();
                dst.put_u64_le(p.source);
                dst.put_u64_le(p.since.unwrap_or(0));
                dst.put_u64_le(p.image_lsn);
                dst.put_u64_le(p.cursor);
            }
            Self::Peer {
                cluster,
                volume,
                replica,
            } => {
                put_string(dst, cluster);
                put_string(dst, volume);
                put_string(dst, replica);
            }
            Self::PullImage | Self::PullDone | Self::VerifyEnd => {}
            Self::VerifyBegin {
                cluster,
                volume,
                replica,
                lsn,
            } => {
                put_string(dst, cluster);
                put_string(dst, volume);
                put_string(dst, replica);
                dst.put_u64_le(*lsn);
            }
            Self::VerifyReady { lsn } => dst.put_u64_le(*lsn),
            Self::PullFrames { after } => dst.put_u64_le(*after),
            Self::PullChunk { offset, len } => {
                dst.put_u64_le(*offset);
                dst.put_u32_le(*len);
            }
            Self::WalBatch {
                session,
                first_lsn,
                last_lsn,
                committed,
                frames,
            } => {
                dst.put_u64_le(*session);
                dst.put_u64_le(*first_lsn);
                dst.put_u64_le(*last_lsn);
                dst.put_u64_le(*committed);
                put_blob(dst, frames);
            }
            Self::Barrier { id, lsn, committed } => {
                dst.put_u64_le(*id);
                dst.put_u64_le(*lsn);
                dst.put_u64_le(*committed);
            }
            Self::DurableAck {
                durable,
                barrier,
                committed,
            } => {
                dst.put_u64_le(*durable);
                dst.put_u8(u8::from(barrier.is_some()));
                dst.put_u64_le(barrier.unwrap_or(0));
                dst.put_u64_le(*committed);
            }
            Self::Heartbeat { seq, committed } => {
                dst.put_u64_le(*seq);
                dst.put_u64_le(*committed);
            }
            Self::HeartbeatAck { seq, durable } => {
                dst.put_u64_le(*seq);
                dst.put_u64_le(*durable);
            }
            Self::RebuildBegin {
                session,
                kind,
                image_lsn,
                image_bytes,
                install,
            } => {
                dst.put_u64_le(*session);
                dst.put_u8(match kind {
                    ImageKind::Snapshot => 1,
                    ImageKind::FullBase => 2,
                });
                dst.put_u64_le(*image_lsn);
                dst.put_u64_le(*image_bytes);
                match install {
                    Install::Staging => dst.put_u8(0),
                    Install::InPlace {
                        source,
                        since,
                        apply_through,
                        by_map,
                    } => {
                        dst.put_u8(1 | u8::from(*by_map) << 1 | u8::from(since.is_some()) << 2);
                        dst.put_u64_le(*source);
                        dst.put_u64_le(since.unwrap_or(0));
                        dst.put_u64_le(*apply_through);
                    }
                }
            }
            Self::SumsRequest {
                session,
                offset,
                len,
                region_bytes,
            } => {
                dst.put_u64_le(*session);
                dst.put_u64_le(*offset);
                dst.put_u64_le(*len);
                dst.put_u64_le(*region_bytes);
            }
            Self::RegionSums {
                session,
                offset,
                sums,
            } => {
                dst.put_u64_le(*session);
                dst.put_u64_le(*offset);
                put_blob(dst, sums);
            }
            Self::RebuildChunk {
                session,
                offset,
                data,
            } => {
                dst.put_u64_le(*session);
                dst.put_u64_le(*offset);
                put_blob(dst, data);
            }
            Self::RebuildDone {
                session,
                image_lsn,
                checksum,
                epochs,
            } => {
                dst.put_u64_le(*session);
                dst.put_u64_le(*image_lsn);
                dst.put_u32_le(*checksum);
                put_epochs(dst, epochs)?;
            }
            Self::RebuildInstalled { session, image_lsn } => {
                dst.put_u64_le(*session);
                dst.put_u64_le(*image_lsn);
            }
            Self::Truncate { session, to } | Self::Truncated { session, to } => {
                dst.put_u64_le(*session);
                dst.put_u64_le(*to);
            }
            Self::Fence { current_epoch } => dst.put_u64_le(*current_epoch),
            Self::Error { code, message } => {
                dst.put_u16_le(*code);
                put_string(dst, message);
            }
        }
        Ok(())
    }

    fn decode_body(kind: u8, r: &mut Reader) -> Result<Self, WireError> {
        Ok(match kind {
            1 => Self::Hello {
                cluster: r.string("cluster")?,
                volume: r.string("volume")?,
                replica: r.string("replica")?,
                session: r.u64("session")?,
                durable_commits: match r.u8("durable_commits")? {
                    0 => false,
                    1 => true,
                    value => {
                        return Err(WireError::BadValue {
                            field: "durable_commits",
                            value,
                        })
                    }
                },
            },
            2 => Self::HelloAck {
                replica: r.string("replica")?,
                flushed: r.u64("flushed")?,
                checkpoint: r.u64("checkpoint")?,
                epochs: r.epochs("epochs")?,
                committed: r.u64("committed")?,
                partial: {
                    let flag = r.u8("partial flag")?;
                    let source = r.u64("partial source")?;
                    let since = r.u64("partial since")?;
                    let image = crate::PartialImage {
                        source,
                        since: (flag & 4 != 0).then_some(since),
                        image_lsn: r.u64("partial image lsn")?,
                        cursor: r.u64("partial cursor")?,
                        by_map: flag & 2 != 0,
                    };
                    match flag {
                        0 => None,
                        1..=7 if flag & 1 == 1 => Some(image),
                        value => {
                            return Err(WireError::BadValue {
                                field: "partial flag",
                                value,
                            })
                        }
                    }
                },
            },
            3 => Self::WalBatch {
                session: r.u64("session")?,
                first_lsn: r.u64("first_lsn")?,
                last_lsn: r.u64("last_lsn")?,
                committed: r.u64("committed")?,
                frames: r.blob("frames")?,
            },
            4 => Self::Barrier {
                id: r.u64("id")?,
                lsn: r.u64("lsn")?,
                committed: r.u64("committed")?,
            },
            5 => {
                let durable = r.u64("durable")?;
                let has_barrier = r.u8("barrier flag")?;
                let barrier = r.u64("barrier")?;
                let barrier = match has_barrier {
                    0 => None,
                    1 => Some(barrier),
                    value => {
                        return Err(WireError::BadValue {
                            field: "barrier flag",
                            value,
                        })
                    }
                };
                Self::DurableAck {
                    durable,
                    barrier,
                    committed: r.u64("committed")?,
                }
            }
            6 => Self::Heartbeat {
                seq: r.u64("seq")?,
                committed: r.u64("committed")?,
            },
            7 => Self::HeartbeatAck {
                seq: r.u64("seq")?,
                durable: r.u64("durable")?,
            },
            8 => {
                let session = r.u64("session")?;
                let kind = match r.u8("image kind")? {
                    1 => ImageKind::Snapshot,
                    2 => ImageKind::FullBase,
                    value => {
                        return Err(WireError::BadValue {
                            field: "image kind",
                            value,
                        })
                    }
                };
                let image_lsn = r.u64("image_lsn")?;
                let image_bytes = r.u64("image_bytes")?;
                let install = match r.u8("install")? {
                    0 => Install::Staging,
                    flag @ 1..=7 if flag & 1 == 1 => Install::InPlace {
                        source: r.u64("source")?,
                        since: {
                            let since = r.u64("since")?;
                            (flag & 4 != 0).then_some(since)
                        },
                        apply_through: r.u64("apply_through")?,
                        by_map: flag & 2 != 0,
                    },
                    value => {
                        return Err(WireError::BadValue {
                            field: "install",
                            value,
                        })
                    }
                };
                Self::RebuildBegin {
                    session,
                    kind,
                    image_lsn,
                    image_bytes,
                    install,
                }
            }
            9 => Self::RebuildChunk {
                session: r.u64("session")?,
                offset: r.u64("offset")?,
                data: r.blob("data")?,
            },
            10 => Self::RebuildDone {
                session: r.u64("session")?,
                image_lsn: r.u64("image_lsn")?,
                checksum: r.u32("checksum")?,
                epochs: r.epochs("epochs")?,
            },
            11 => Self::RebuildInstalled {
                session: r.u64("session")?,
                image_lsn: r.u64("image_lsn")?,
            },
            12 => Self::Truncate {
                session: r.u64("session")?,
                to: r.u64("to")?,
            },
            13 => Self::Truncated {
                session: r.u64("session")?,
                to: r.u64("to")?,
            },
            14 => Self::Fence {
                current_epoch: r.u64("current_epoch")?,
            },
            15 => Self::Error {
                code: r.u16("code")?,
                message: r.string("message")?,
            },
            16 => Self::Peer {
                cluster: r.string("cluster")?,
                volume: r.string("volume")?,
                replica: r.string("replica")?,
            },
            17 => Self::PullImage,
            18 => Self::PullChunk {
                offset: r.u64("offset")?,
                len: r.u32("len")?,
            },
            19 => Self::PullDone,
            20 => Self::PullFrames {
                after: r.u64("after")?,
            },
            21 => Self::SumsRequest {
                session: r.u64("session")?,
                offset: r.u64("offset")?,
                len: r.u64("len")?,
                region_bytes: r.u64("region_bytes")?,
            },
            23 => Self::VerifyBegin {
                cluster: r.string("cluster")?,
                volume: r.string("volume")?,
                replica: r.string("replica")?,
                lsn: r.u64("lsn")?,
            },
            24 => Self::VerifyReady { lsn: r.u64("lsn")? },
            25 => Self::VerifyEnd,
            22 => Self::RegionSums {
                session: r.u64("session")?,
                offset: r.u64("offset")?,
                sums: r.blob("sums")?,
            },
            other => return Err(WireError::UnknownType(other)),
        })
    }
}

impl Decoder for WireCodec {
    type Item = Envelope;
    type Error = WireError;

    fn decode(&mut self, src: &mut BytesMut) -> Result<Option<Envelope>, WireError> {
        if src.len() < 4 {
            // Room for a header and a small message, so the next read takes
            // them in one call rather than a byte or a few at a time.
            src.reserve(READ_AHEAD);
            return Ok(None);
        }
        let len = u32::from_le_bytes([src[0], src[1], src[2], src[3]]) as usize;
        if len > self.max_frame {
            return Err(WireError::TooLarge {
                len,
                max: self.max_frame,
            });
        }
        if len < HEADER {
            return Err(WireError::TooShort(len));
        }
        if src.len() < 4 + len {
            // The whole frame, and room after it for the next header.
            src.reserve(4 + len - src.len() + READ_AHEAD);
            return Ok(None);
        }
        src.advance(4);
        let mut frame = if len >= BULK_FRAME {
            // Copied out: the read buffer stays its own, and is reused in
            // place for the next frame (see `Received`).
            let frame = Received::copy(&src[..len]);
            src.advance(len);
            frame
        } else {
            src.split_to(len).freeze()
        };
        let version = frame.get_u8();
        if version != PROTOCOL_VERSION {
            return Err(WireError::Version(version));
        }
        let kind = frame.get_u8();
        let epoch = frame.get_u64_le();
        let mut reader = Reader { body: frame };
        let message = Message::decode_body(kind, &mut reader)?;
        reader.finish()?;
        Ok(Some(Envelope { epoch, message }))
    }
}

impl WireCodec {
    /// Encodes `item` into `dst` like [`Encoder::encode`], except for the
    /// payload of a `WalBatch` or `RebuildChunk`, which it returns instead of
    /// copying: the caller writes `dst` and then the payload (vectored), and
    /// the bytes on the wire are the same. Other messages are encoded whole
    /// and return `None`.
    pub fn encode_head(
        &self,
        item: Envelope,
        dst: &mut BytesMut,
    ) -> Result<Option<Bytes>, WireError> {
        let Envelope { epoch, mut message } = item;
        let payload = match &mut message {
            Message::WalBatch { frames, .. } => std::mem::take(frames),
            Message::RebuildChunk { data, .. } => std::mem::take(data),
            _ => {
                let mut codec = *self;
                codec.encode(Envelope { epoch, message }, dst)?;
                return Ok(None);
            }
        };
        let start = dst.len();
        let mut codec = *self;
        codec.encode(Envelope { epoch, message }, dst)?;
        // The blob is the body's last field: its u32 length ends the head.
        let len = dst.len() - start - 4 + payload.len();
        if len > self.max_frame {
            dst.truncate(start);
            return Err(WireError::TooLarge {
                len,
                max: self.max_frame,
            });
        }
        dst[start..start + 4].copy_from_slice(&(len as u32).to_le_bytes());
        let end = dst.len();
        dst[end - 4..].copy_from_slice(&(payload.len() as u32).to_le_bytes());
        Ok(Some(payload))
    }
}

impl Encoder<Envelope> for WireCodec {
    type Error = WireError;

    fn encode(&mut self, item: Envelope, dst: &mut BytesMut) -> Result<(), WireError> {
        let start = dst.len();
        dst.put_u32_le(0);
        dst.put_u8(PROTOCOL_VERSION);
        dst.put_u8(item.message.type_byte());
        dst.put_u64_le(item.epoch);
        if let Err(error) = item.message.encode_body(dst) {
            dst.truncate(start);
            return Err(error);
        }
        let len = dst.len() - start - 4;
        if len > self.max_frame {
            dst.truncate(start);
            return Err(WireError::TooLarge {
                len,
                max: self.max_frame,
            });
        }
        dst[start..start + 4].copy_from_slice(&(len as u32).to_le_bytes());
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chunk(fill: u8) -> Envelope {
        Envelope {
            epoch: 1,
            message: Message::RebuildChunk {
                session: 1,
                offset: 0,
                data: Bytes::from(vec![fill; BULK_FRAME * 2]),
            },
        }
    }

    /// Large frames are copied into reused buffers: one still held keeps
    /// its bytes while later frames are decoded into buffers freed before.
    #[test]
    fn large_frames_held_by_consumers_are_never_reused_under_them() {
        let mut codec = WireCodec::default();
        let mut wire = BytesMut::new();
        for fill in 1..=40u8 {
            codec.encode(chunk(fill), &mut wire).unwrap();
        }
        let mut held = Vec::new();
        for fill in 1..=40u8 {
            let envelope = codec.decode(&mut wire).unwrap().unwrap();
            assert_eq!(envelope, chunk(fill));
            // Every other one dropped at once, its buffer free for the next.
            if fill % 2 == 0 {
                held.push((fill, envelope));
            }
        }
        for (fill, envelope) in held {
            assert_eq!(
                envelope,
                chunk(fill),
                "frame {fill} changed under its holder"
            );
        }
        assert!(wire.is_empty());
    }

    fn round_trip(message: Message) {
        let mut codec = WireCodec::default();
        let mut buf = BytesMut::new();
        let envelope = Envelope { epoch: 9, message };
        codec.encode(envelope.clone(), &mut buf).unwrap();
        // Byte by byte: Incomplete until the last byte, then exactly one message.
        let mut partial = BytesMut::new();
        let encoded = buf.clone();
        for (i, byte) in encoded.iter().enumerate() {
            partial.put_u8(*byte);
            let decoded = codec.decode(&mut partial).unwrap();
            if i + 1 < encoded.len() {
                assert!(decoded.is_none());
            } else {
                assert_eq!(decoded, Some(envelope.clone()));
            }
        }
        assert!(partial.is_empty());
    }

    #[test]
    fn every_message_round_trips_even_byte_by_byte() {
        round_trip(Message::Hello {
            cluster: "c".into(),
            volume: "v".into(),
            replica: "v/r".into(),
            session: 3,
            durable_commits: true,
        });
        round_trip(Message::DurableAck {
            durable: 5,
            barrier: Some(2),
            committed: 4,
        });
        round_trip(Message::DurableAck {
            durable: 5,
            barrier: None,
            committed: 0,
        });
        round_trip(Message::WalBatch {
            session: 1,
            first_lsn: 2,
            last_lsn: 3,
            committed: 1,
            frames: Bytes::from_static(b"frames"),
        });
        round_trip(Message::RebuildBegin {
            session: 1,
            kind: ImageKind::FullBase,
            image_lsn: 7,
            image_bytes: 8,
            install: Install::Staging,
        });
        round_trip(Message::RebuildBegin {
            session: 1,
            kind: ImageKind::Snapshot,
            image_lsn: 7,
            image_bytes: 8,
            install: Install::InPlace {
                source: 9,
                since: Some(3),
                apply_through: 5,
                by_map: true,
            },
        });
        round_trip(Message::SumsRequest {
            session: 1,
            offset: 64 << 10,
            len: 1 << 20,
            region_bytes: 64 << 10,
        });
        round_trip(Message::RegionSums {
            session: 1,
            offset: 64 << 10,
            sums: Bytes::from(vec![7; 32]),
        });
        round_trip(Message::Error {
            code: 4,
            message: "stale epoch".into(),
        });
        let epochs = vec![
            EpochStart {
                epoch: 1,
                first_lsn: 1,
            },
            EpochStart {
                epoch: 2,
                first_lsn: 201,
            },
        ];
        round_trip(Message::HelloAck {
            replica: "v/r".into(),
            flushed: 300,
            checkpoint: 100,
            epochs: epochs.clone(),
            committed: 250,
            partial: None,
        });
        round_trip(Message::HelloAck {
            replica: "v/r".into(),
            flushed: 0,
            checkpoint: 0,
            epochs: Vec::new(),
            committed: 250,
            partial: Some(crate::PartialImage {
                source: 11,
                since: Some(12),
                image_lsn: 13,
                cursor: 14 << 20,
                by_map: true,
            }),
        });
        round_trip(Message::Peer {
            cluster: "c".into(),
            volume: "v".into(),
            replica: "v/r".into(),
        });
        round_trip(Message::PullImage);
        round_trip(Message::PullChunk {
            offset: 1 << 20,
            len: 4096,
        });
        round_trip(Message::PullDone);
        round_trip(Message::VerifyBegin {
            cluster: "c".into(),
            volume: "v".into(),
            replica: "v/r".into(),
            lsn: 12,
        });
        round_trip(Message::VerifyReady { lsn: 13 });
        round_trip(Message::VerifyEnd);
        round_trip(Message::PullFrames { after: 30 });
        round_trip(Message::RebuildDone {
            session: 4,
            image_lsn: 250,
            checksum: 0xdead_beef,
            epochs,
        });
    }

    #[test]
    fn a_head_plus_its_payload_is_the_whole_frame() {
        let payload = Bytes::from(vec![0xA5u8; 3000]);
        let messages = [
            Message::WalBatch {
                session: 1,
                first_lsn: 2,
                last_lsn: 3,
                committed: 1,
                frames: payload.clone(),
            },
            Message::RebuildChunk {
                session: 4,
                offset: 8192,
                data: payload.clone(),
            },
            Message::Heartbeat {
                seq: 9,
                committed: 2,
            },
        ];
        for message in messages {
            let envelope = Envelope { epoch: 6, message };
            let mut whole = BytesMut::new();
            WireCodec::default()
                .encode(envelope.clone(), &mut whole)
                .unwrap();
            let mut head = BytesMut::new();
            let rest = WireCodec::default()
                .encode_head(envelope.clone(), &mut head)
                .unwrap();
            if matches!(envelope.message, Message::Heartbeat { .. }) {
                assert!(rest.is_none());
            } else {
                // The payload is not copied: the very same bytes come back.
                assert_eq!(rest.as_ref().unwrap().as_ptr(), payload.as_ptr());
            }
            head.extend_from_slice(&rest.unwrap_or_default());
            assert_eq!(head, whole);
            let decoded = WireCodec::default().decode(&mut head).unwrap();
            assert_eq!(decoded, Some(envelope));
        }
        // The frame limit counts the payload.
        let big = Envelope {
            epoch: 1,
            message: Message::RebuildChunk {
                session: 1,
                offset: 0,
                data: Bytes::from(vec![0u8; 2048]),
            },
        };
        let mut head = BytesMut::new();
        assert!(matches!(
            WireCodec::new(1024).encode_head(big, &mut head),
            Err(WireError::TooLarge { max: 1024, .. })
        ));
        assert!(head.is_empty());
    }

    #[test]
    fn oversized_length_is_refused_before_allocating() {
        let mut codec = WireCodec::new(1024);
        let mut buf = BytesMut::from(&(u32::MAX).to_le_bytes()[..]);
        let capacity = buf.capacity();
        assert!(
            matches!(codec.decode(&mut buf), Err(WireError::TooLarge { len, max: 1024 }) if len == u32::MAX as usize)
        );
        assert_eq!(buf.capacity(), capacity);
    }

    #[test]
    fn malformed_frames_get_typed_errors() {
        let mut codec = WireCodec::default();
        let frame = |version: u8, kind: u8, body: &[u8]| {
            let mut buf = BytesMut::new();
            buf.put_u32_le((HEADER + body.len()) as u32);
            buf.put_u8(version);
            buf.put_u8(kind);
            buf.put_u64_le(1);
            buf.put_slice(body);
            buf
        };
        const V: u8 = PROTOCOL_VERSION;
        assert!(matches!(
            codec.decode(&mut frame(1, 1, &[])),
            Err(WireError::Version(1))
        ));
        assert!(matches!(
            codec.decode(&mut frame(V, 99, &[])),
            Err(WireError::UnknownType(99))
        ));
        assert!(matches!(
            codec.decode(&mut frame(V, 4, &[0; 15])),
            Err(WireError::Truncated("lsn"))
        ));
        assert!(matches!(
            codec.decode(&mut frame(V, 4, &[0; 23])),
            Err(WireError::Truncated("committed"))
        ));
        assert!(matches!(
            codec.decode(&mut frame(V, 4, &[0; 25])),
            Err(WireError::Trailing(1))
        ));
        assert!(matches!(
            codec.decode(&mut frame(V, 2, &[2, 0, 0xff, 0xfe])),
            Err(WireError::BadUtf8("replica"))
        ));
        // A hello ack claiming more epochs than the protocol allows is
        // refused before anything is allocated for them; fewer bytes than
        // the count says is a truncation.
        let mut body = vec![1, 0, b'r'];
        body.extend_from_slice(&[0; 16]);
        body.extend_from_slice(&u32::MAX.to_le_bytes());
        assert!(matches!(
            codec.decode(&mut frame(V, 2, &body)),
            Err(WireError::TooManyEpochs(n)) if n == u32::MAX as usize
        ));
        let mut body = vec![1, 0, b'r'];
        body.extend_from_slice(&[0; 16]);
        body.extend_from_slice(&2u32.to_le_bytes());
        body.extend_from_slice(&[0; 24]);
        assert!(matches!(
            codec.decode(&mut frame(V, 2, &body)),
            Err(WireError::Truncated("epochs"))
        ));
        // Nor is one encoded: it is refused whole, and nothing is left behind.
        let mut buf = BytesMut::from(&b"kept"[..]);
        let too_many = vec![
            EpochStart {
                epoch: 1,
                first_lsn: 1
            };
            MAX_EPOCHS + 1
        ];
        let ack = Message::HelloAck {
            replica: "r".into(),
            flushed: 0,
            checkpoint: 0,
            epochs: too_many,
            committed: 0,
            partial: None,
        };
        assert!(matches!(
            codec.encode(Envelope { epoch: 1, message: ack }, &mut buf),
            Err(WireError::TooManyEpochs(n)) if n == MAX_EPOCHS + 1
        ));
        assert_eq!(&buf[..], b"kept");
        // A long free-text field is cut at a character boundary, still UTF-8.
        let mut buf = BytesMut::new();
        let message = Message::Error {
            code: 1,
            message: "é".repeat(MAX_STRING),
        };
        codec
            .encode(Envelope { epoch: 1, message }, &mut buf)
            .unwrap();
        match codec.decode(&mut buf).unwrap().unwrap().message {
            Message::Error { message, .. } => {
                assert_eq!(message.len(), MAX_STRING - MAX_STRING % 2);
            }
            other => panic!("{other:?}"),
        }
        let mut short = BytesMut::new();
        short.put_u32_le(3);
        short.put_slice(&[1, 2, 3]);
        assert!(matches!(
            codec.decode(&mut short),
            Err(WireError::TooShort(3))
        ));
    }
}
