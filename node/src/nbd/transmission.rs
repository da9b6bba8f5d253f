//! Transmission: requests read one after the other, carried out
//! concurrently, answered as each finishes (matched by handle).
//!
//! Bytes in flight per connection are bounded ([`INFLIGHT_BYTES`]): the
//! reader waits for room before it takes a request's payload or starts a
//! read. A reply holds its share until it is written.
//!
//! Bad input: an unaligned or oversized request, one past the end, an
//! unknown command or flag gets an error reply and the connection goes on;
//! a bad request magic, or a write payload past [`MAX_BLOCK`], closes it.
//! DISC, EOF, the server's stop or the volume's (its role changed): no more
//! requests are read, every request already read is answered, then the
//! connection closes.

use super::proto::*;
use super::{Export, NbdError};
use bytes::{Bytes, BytesMut};
use std::sync::Arc;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::{mpsc, watch, OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinSet;
use walship_actors::VolumeError;

/// Request and reply payload bytes a connection may hold at once.
const INFLIGHT_BYTES: u32 = 64 << 20;
/// The unit of [`INFLIGHT_BYTES`]' semaphore.
const PERMIT_BYTES: u32 = MIN_BLOCK;
/// The largest piece of a write handed to the volume at once: one WAL
/// frame, shipped in one batch.
const WRITE_PIECE: usize = 1 << 20;

/// How long a closing connection may take to answer what it read.
const STOP_GRACE: std::time::Duration = std::time::Duration::from_secs(10);

/// One request's header.
#[derive(Debug, Clone, Copy)]
struct Request {
    flags: u16,
    kind: u16,
    handle: u64,
    offset: u64,
    length: u32,
}

/// A reply on its way to the writer.
struct Reply {
    handle: u64,
    error: u32,
    data: Option<Bytes>,
    /// The request's share of [`INFLIGHT_BYTES`], released once written.
    _room: Option<OwnedSemaphorePermit>,
}

pub(super) async fn serve<R, W>(
    mut read: R,
    write: W,
    export: Export,
    mut stopped: watch::Receiver<bool>,
) -> Result<(), NbdError>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin + Send + 'static,
{
    tracing::info!(export = %export.name, read_only = export.read_only, "nbd client attached");
    // The server's stop, or the volume's: a volume whose role changed is
    // reopened behind a new handle, and this one answers nothing from then
    // on. The connection closes, so the client reconnects and finds the
    // export as it is now (or finds it gone).
    let (ending, mut stopped) = {
        let (tx, rx) = watch::channel(false);
        let volume = export.volume.clone();
        let name = export.name.clone();
        let ending = tokio::spawn(async move {
            tokio::select! {
                _ = stopped.wait_for(|stop| *stop) => {}
                () = volume.stopping() => {
                    tracing::info!(export = %name, "the volume stopped: closing the connection");
                }
            }
            tx.send_replace(true);
        });
        (ending, rx)
    };
    let io = Arc::new(super::metrics::IoMetrics::new(&export.name));
    let export = Arc::new(export);
    let (replies, queue) = mpsc::unbounded_channel();
    let writer = tokio::spawn(write_replies(write, queue));
    let room = Arc::new(Semaphore::new((INFLIGHT_BYTES / PERMIT_BYTES) as usize));
    let mut running = JoinSet::new();
    let ended = loop {
        // Reap finished requests as they go, so the set stays small. (Not
        // in the select below: losing that race would cancel a header read
        // halfway and lose its bytes.)
        while running.try_join_next().is_some() {}
        let header = tokio::select! {
            header = read_request(&mut read) => header,
            _ = stopped.wait_for(|stop| *stop) => break Ok(()),
        };
        let request = match header {
            Ok(Some(request)) => request,
            Ok(None) => break Ok(()),
            Err(e) => break Err(e),
        };
        if request.kind == CMD_DISC {
            break Ok(());
        }
        let payload = if request.kind == CMD_WRITE {
            request.length
        } else {
            0
        };
        if payload > MAX_BLOCK {
            break Err(NbdError::Protocol(format!(
                "write of {payload} bytes, more than {MAX_BLOCK}"
            )));
        }
        // Room for what the request carries or will carry back.
        let share = match request.kind {
            CMD_READ | CMD_WRITE => request.length.min(MAX_BLOCK).div_ceil(PERMIT_BYTES).max(1),
            _ => 1,
        };
        // A stop while waiting for room or for a payload ends the reading:
        // what was read in full is answered.
        let permit = tokio::select! {
            permit = Arc::clone(&room).acquire_many_owned(share) => match permit {
                Ok(permit) => permit,
                Err(_) => break Ok(()),
            },
            _ = stopped.wait_for(|stop| *stop) => break Ok(()),
        };
        let data = if payload > 0 {
            let mut data = BytesMut::zeroed(payload as usize);
            tokio::select! {
                read = read.read_exact(&mut data) => if let Err(e) = read {
                    break Err(e.into());
                },
                _ = stopped.wait_for(|stop| *stop) => break Ok(()),
            }
            data.freeze()
        } else {
            Bytes::new()
        };
        let (export, replies, io) = (Arc::clone(&export), replies.clone(), Arc::clone(&io));
        running.spawn(async move {
            let started = std::time::Instant::now();
            let (error, data) = match carry_out(&export, request, data).await {
                Ok(data) => (0, data),
                Err(error) => (error, None),
            };
            io.record(request.kind, request.length, error == 0, started.elapsed());
            let _ = replies.send(Reply {
                handle: request.handle,
                error,
                data,
                _room: Some(permit),
            });
        });
    };
    // Every request read is answered before the connection closes, within
    // a grace period: a client that stopped reading its replies must not
    // hold the node's stop forever.
    ending.abort();
    let abort_writer = writer.abort_handle();
    let answered = async {
        while running.join_next().await.is_some() {}
        drop(replies);
        writer.await
    };
    match tokio::time::timeout(STOP_GRACE, answered).await {
        Ok(Ok(written)) => ended.and(written.map_err(NbdError::from)),
        Ok(Err(e)) => Err(NbdError::Protocol(format!("reply writer: {e}"))),
        Err(_) => {
            // The requests still running go with the JoinSet's drop.
            abort_writer.abort();
            Err(NbdError::Protocol(format!(
                "replies not taken within {STOP_GRACE:?}; connection dropped"
            )))
        }
    }
}

/// Reads a request header; `None` at a clean EOF between requests.
async fn read_request<R: AsyncRead + Unpin>(read: &mut R) -> Result<Option<Request>, NbdError> {
    let mut header = [0u8; 28];
    match read.read_exact(&mut header[..1]).await {
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) => return Err(e.into()),
    }
    read.read_exact(&mut header[1..]).await?;
    let field = |at: usize, len: usize| {
        header[at..at + len]
            .iter()
            .fold(0u64, |acc, &b| (acc << 8) | u64::from(b))
    };
    let magic = field(0, 4) as u32;
    if magic != REQUEST_MAGIC {
        return Err(NbdError::Protocol(format!("request magic {magic:#x}")));
    }
    Ok(Some(Request {
        flags: field(4, 2) as u16,
        kind: field(6, 2) as u16,
        handle: field(8, 8),
        offset: field(16, 8),
        length: field(24, 4) as u32,
    }))
}

/// Writes replies as they come, flushing when none is waiting.
async fn write_replies<W: AsyncWrite + Unpin>(
    mut write: W,
    mut queue: mpsc::UnboundedReceiver<Reply>,
) -> std::io::Result<()> {
    while let Some(reply) = queue.recv().await {
        let mut next = Some(reply);
        while let Some(reply) = next.take() {
            let mut header = [0u8; 16];
            header[..4].copy_from_slice(&SIMPLE_REPLY_MAGIC.to_be_bytes());
            header[4..8].copy_from_slice(&reply.error.to_be_bytes());
            header[8..].copy_from_slice(&reply.handle.to_be_bytes());
            write.write_all(&header).await?;
            if let Some(data) = &reply.data {
                write.write_all(data).await?;
            }
            next = queue.try_recv().ok();
        }
        write.flush().await?;
    }
    write.shutdown().await
}

/// Carries out one request; the data of a read, or the NBD error. On a
/// primary's export a request (a write, a flush, a read too) is answered
/// only while the node's write fence allows it, checked before, during and after:
/// a node held to a lease it could not renew answers EIO, whatever the
/// volume did. A read answered is then no older than any write another
/// primary could have acknowledged (none can be made before the lease
/// expires). A replica's read-only export is a lagging view anyway.
async fn carry_out(export: &Export, request: Request, data: Bytes) -> Result<Option<Bytes>, u32> {
    let fenced = !export.read_only
        && matches!(
            request.kind,
            CMD_WRITE | CMD_TRIM | CMD_WRITE_ZEROES | CMD_FLUSH | CMD_READ
        );
    let why = "this node's lease lapsed: its primary exports are fenced";
    if fenced && !export.fence.allows() {
        return refuse(export, request, EIO, why);
    }
    // A request still waiting when the fence lapses (a barrier whose
    // replicas now answer another primary) fails then, not at its timeout.
    let done = if fenced && export.fence.leased() {
        tokio::select! {
            done = carry_out_request(export, request, data) => done,
            () = export.fence.lapsed() => return refuse(export, request, EIO, why),
        }
    } else {
        carry_out_request(export, request, data).await
    };
    if fenced && done.is_ok() && !export.fence.allows() {
        return refuse(export, request, EIO, why);
    }
    done
}

async fn carry_out_request(
    export: &Export,
    request: Request,
    data: Bytes,
) -> Result<Option<Bytes>, u32> {
    let Request {
        flags,
        kind,
        offset,
        length,
        ..
    } = request;
    let allowed = match kind {
        CMD_READ | CMD_FLUSH => CMD_FLAG_FUA,
        CMD_WRITE | CMD_TRIM => CMD_FLAG_FUA,
        CMD_WRITE_ZEROES => CMD_FLAG_FUA | CMD_FLAG_NO_HOLE,
        _ => return refuse(export, request, EINVAL, "unknown command"),
    };
    if flags & !allowed != 0 {
        return refuse(export, request, EINVAL, "unknown flag");
    }
    if kind == CMD_FLUSH {
        if export.read_only {
            return Ok(None);
        }
        return commit(export).await.map(|()| None);
    }
    let writes = kind != CMD_READ;
    if writes && export.read_only {
        return refuse(export, request, EPERM, "read-only export");
    }
    let end = offset.checked_add(u64::from(length));
    if end.is_none_or(|end| end > export.size) {
        let past = if matches!(kind, CMD_WRITE | CMD_WRITE_ZEROES) {
            ENOSPC
        } else {
            EINVAL
        };
        return refuse(export, request, past, "past the end");
    }
    let block = u64::from(MIN_BLOCK);
    if offset % block != 0 || u64::from(length) % block != 0 {
        return refuse(export, request, EINVAL, "not aligned to 4096");
    }
    if kind == CMD_READ && length > MAX_BLOCK {
        return refuse(
            export,
            request,
            EINVAL,
            "longer than the maximum block size",
        );
    }
    let (lba, blocks) = (offset / block, u64::from(length) / block);
    if blocks == 0 {
        return Ok(if kind == CMD_READ {
            Some(Bytes::new())
        } else {
            None
        });
    }
    let volume = &export.volume;
    // FUA: the last piece resolves once committed, and with it everything
    // before it (committed is a prefix of the WAL).
    let fua = flags & CMD_FLAG_FUA != 0;
    let done = match kind {
        CMD_READ => {
            return match volume.read(lba, blocks).await {
                Ok(data) => Ok(Some(data)),
                Err(e) => Err(failed(export, request, &e)),
            }
        }
        CMD_WRITE => {
            let pieces = data.len().div_ceil(WRITE_PIECE);
            let mut done = Ok(0);
            for (i, piece) in data.chunks(WRITE_PIECE).enumerate() {
                let at = lba + (i * WRITE_PIECE / MIN_BLOCK as usize) as u64;
                let piece = data.slice_ref(piece);
                done = if fua && i + 1 == pieces {
                    volume.write_committed(at, piece).await
                } else {
                    volume.write(at, piece).await
                };
                if done.is_err() {
                    break;
                }
            }
            done
        }
        // Zeroes either way: a trim frame reads back as zeroes everywhere.
        _ if fua => volume.trim_committed(lba, blocks).await,
        _ => volume.trim(lba, blocks).await,
    };
    done.map(|_| None).map_err(|e| failed(export, request, &e))
}

/// Waits until everything written so far is committed under the volume's
/// mode.
async fn commit(export: &Export) -> Result<(), u32> {
    export.volume.barrier().await.map(|_| ()).map_err(|e| {
        tracing::warn!(export = %export.name, error = %e, "nbd flush failed");
        errno(&e)
    })
}

fn refuse(export: &Export, request: Request, error: u32, why: &str) -> Result<Option<Bytes>, u32> {
    tracing::debug!(export = %export.name, ?request, error, why, "nbd request refused");
    Err(error)
}

fn failed(export: &Export, request: Request, error: &VolumeError) -> u32 {
    tracing::warn!(export = %export.name, ?request, %error, "nbd request failed");
    errno(error)
}

/// The NBD error for a volume's refusal.
fn errno(error: &VolumeError) -> u32 {
    match error {
        VolumeError::Stopped => ESHUTDOWN,
        VolumeError::NotPrimary => EPERM,
        _ => EIO,
    }
}
