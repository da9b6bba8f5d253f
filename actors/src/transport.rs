//! The connection: framing with the wire codec, receiving with a deadline,
//! vectored bulk sends, and a closing that lets an error message arrive.
//! Both ends use it: the primary's executors and the replica's connection
//! tasks.
//!
//! It is also the one place where io's types (the wire's and the WAL's)
//! become the engine's: LSNs and epochs are plain integers in io, newtypes
//! in the engine.

use crate::error::ExecError;
use bytes::{Buf, BytesMut};
use futures::{SinkExt, StreamExt};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_util::codec::{Framed, FramedParts};
use walship_engine::{
    Ack, BarrierId, Epoch, EpochHistory, EpochOrderError, EpochStart, HandshakeReply, Lsn,
    ReplicaId, ReplicaLog,
};
use walship_io::{Envelope, Message, WireCodec};

/// What a connection runs over: a TCP stream of its own, or a stream
/// multiplexed with others over one TCP connection per node pair.
pub(crate) trait Io:
    AsyncRead + AsyncWrite + Send + Unpin + std::fmt::Debug + 'static
{
}

impl<T: AsyncRead + AsyncWrite + Send + Unpin + std::fmt::Debug + 'static> Io for T {}

/// A framed connection, either end.
pub(crate) type Conn = Framed<Box<dyn Io>, WireCodec>;

/// Initial capacity of a connection's read and write buffers. They grow to
/// the traffic (the decoder reserves a whole frame once its length is
/// known) and keep that size; an idle connection, of which a node may hold
/// tens of thousands, stays this small instead of tokio-util's 8 KiB each.
const CONN_BUFFER: usize = 256;

/// Frames fed to a connection's sink go out in one write up to this many
/// bytes (a flush writes them all). `Framed::with_capacity` would set it to
/// the initial capacity, [`CONN_BUFFER`]: every frame of a live write then
/// went out in a write of its own, and the replica woke, synced and acked
/// once for the WAL batch and again for the barrier request behind it.
const WRITE_BATCH: usize = 64 * 1024;

/// Frames a stream with the wire codec, both ends of a connection.
pub(crate) fn framed<C: AsyncRead + AsyncWrite>(stream: C) -> Framed<C, WireCodec> {
    let mut conn = Framed::with_capacity(stream, WireCodec::default(), CONN_BUFFER);
    *conn.write_buffer_mut() = BytesMut::with_capacity(CONN_BUFFER);
    conn.set_backpressure_boundary(WRITE_BATCH);
    conn
}

/// A framed TCP stream as a [`Conn`].
pub(crate) fn boxed(framed: Framed<TcpStream, WireCodec>) -> Conn {
    let parts = framed.into_parts();
    reframe(
        Box::new(parts.io) as Box<dyn Io>,
        parts.codec,
        parts.read_buf,
        parts.write_buf,
    )
}

/// Frames `io` again with the buffers of an earlier framing (what was read
/// past the last frame goes on to the next). tokio-util's `from_parts`
/// grows each buffer back to 8 KiB; that was 16 KiB of every idle
/// replica-side connection, so they are cut back to [`CONN_BUFFER`].
pub(crate) fn reframe<C: AsyncRead + AsyncWrite>(
    io: C,
    codec: WireCodec,
    read_buf: BytesMut,
    write_buf: BytesMut,
) -> Framed<C, WireCodec> {
    let mut parts = FramedParts::new::<Envelope>(io, codec);
    parts.read_buf = read_buf;
    parts.write_buf = write_buf;
    let mut framed = Framed::from_parts(parts);
    shrink(framed.read_buffer_mut());
    shrink(framed.write_buffer_mut());
    framed.set_backpressure_boundary(WRITE_BATCH);
    framed
}

/// A buffer holding no more than [`CONN_BUFFER`] bytes, in that much
/// memory.
fn shrink(buf: &mut BytesMut) {
    if buf.capacity() > CONN_BUFFER && buf.len() <= CONN_BUFFER {
        let mut small = BytesMut::with_capacity(CONN_BUFFER);
        small.extend_from_slice(buf);
        *buf = small;
    }
}

/// How long a connection closed after an error keeps reading (and dropping)
/// what the primary still sends, so the error reaches it.
const LINGER: Duration = Duration::from_secs(1);

/// Receives the next message, within `limit`; a fence or a peer's error
/// ends the exchange as an error.
pub(crate) async fn recv(conn: &mut Conn, limit: Duration) -> Result<Envelope, ExecError> {
    let envelope = match tokio::time::timeout(limit, conn.next()).await {
        Err(_) => return Err(ExecError::Timeout(limit)),
        Ok(None) => return Err(ExecError::Closed),
        Ok(Some(frame)) => frame?,
    };
    match envelope.message {
        Message::Fence { current_epoch } => Err(ExecError::Fenced(current_epoch)),
        Message::Error { code, message } => Err(ExecError::Peer { code, message }),
        _ => Ok(envelope),
    }
}

/// Sends a bulk message (`WalBatch`, `RebuildChunk`) with its payload
/// written straight from its buffer, vectored after the head, instead of
/// copied into the connection's write buffer: one memcpy less per byte
/// shipped. Anything the framed sink holds goes first, so order is kept.
pub(crate) async fn send_bulk(conn: &mut Conn, envelope: Envelope) -> Result<(), ExecError> {
    conn.flush().await?;
    let mut head = BytesMut::with_capacity(64);
    let payload = conn.codec().encode_head(envelope, &mut head)?;
    let mut wire = head.freeze().chain(payload.unwrap_or_default());
    conn.get_mut()
        .write_all_buf(&mut wire)
        .await
        .map_err(|e| ExecError::Wire(e.into()))
}

/// Ends a connection after an error message so that the message arrives:
/// closing a socket with unread bytes makes the kernel reset the connection,
/// and a reset discards what the primary had not read yet (the error with
/// it). So the write side is shut (after the error) and whatever the primary
/// still sends is read and dropped until it closes, for at most [`LINGER`].
pub(crate) async fn linger<C: AsyncRead + AsyncWrite + Unpin>(framed: &mut Framed<C, WireCodec>) {
    let stream = framed.get_mut();
    let _ = stream.shutdown().await;
    let mut sink = vec![0u8; 64 * 1024];
    let drain = async {
        while let Ok(n) = stream.read(&mut sink).await {
            if n == 0 {
                return;
            }
        }
    };
    let _ = tokio::time::timeout(LINGER, drain).await;
}

/// io's epoch history (from a WAL or the wire) as the engine's.
pub(crate) fn engine_epochs(
    entries: &[walship_io::EpochStart],
) -> Result<EpochHistory, EpochOrderError> {
    EpochHistory::from_entries(entries.iter().copied().map(engine_epoch).collect())
}

/// One io epoch start as the engine's.
pub(crate) fn engine_epoch(entry: walship_io::EpochStart) -> EpochStart {
    EpochStart {
        epoch: Epoch(entry.epoch),
        first: Lsn(entry.first_lsn),
    }
}

/// The replica's answer to hello as the engine's handshake reply.
pub(crate) fn handshake_reply(answer: Envelope) -> Result<HandshakeReply, ExecError> {
    let Message::HelloAck {
        replica,
        flushed,
        checkpoint,
        epochs,
        committed,
        partial,
    } = answer.message
    else {
        return Err(ExecError::Protocol(format!(
            "expected hello ack, got {:?}",
            answer.message
        )));
    };
    let replica =
        ReplicaId::parse(&replica).map_err(|e| ExecError::Protocol(format!("hello ack: {e}")))?;
    let epochs =
        engine_epochs(&epochs).map_err(|e| ExecError::Protocol(format!("hello ack: {e}")))?;
    Ok(HandshakeReply {
        replica,
        epoch: Epoch(answer.epoch),
        log: ReplicaLog {
            flushed: Lsn(flushed),
            checkpoint: Lsn(checkpoint),
            epochs,
            committed: Lsn(committed),
            partial: partial.map(|p| walship_engine::PartialImage {
                source: p.source,
                since: p.since.map(Lsn),
                image_lsn: Lsn(p.image_lsn),
                cursor: p.cursor,
                by_map: p.by_map,
            }),
        },
    })
}

/// A durable ack received in `epoch` as the engine's.
pub(crate) fn engine_ack(epoch: u64, durable: u64, barrier: Option<u64>, told: u64) -> Ack {
    Ack {
        epoch: Epoch(epoch),
        durable: Lsn(durable),
        barrier: barrier.map(BarrierId),
        told: Lsn(told),
    }
}
