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

mod body;
mod buffer;
mod codec;

use buffer::{Received, BULK_FRAME};

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

#[cfg(test)]
mod tests;
