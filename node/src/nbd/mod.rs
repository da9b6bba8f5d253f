//! The NBD export: block clients (fio, qemu, nbdcopy, the kernel's
//! nbd-client) read and write a volume over the NBD protocol.
//!
//! - [`handshake`]: fixed newstyle; `NBD_OPT_GO`, `INFO`, `LIST`,
//!   `EXPORT_NAME`, `ABORT`; every other option gets `NBD_REP_ERR_UNSUP`.
//! - [`transmission`]: READ, WRITE (FUA), FLUSH, TRIM, WRITE_ZEROES, DISC,
//!   pipelined, answered out of order with simple replies.
//!
//! Durability: a WRITE is answered once the volume's WAL holds it; FLUSH,
//! and any command with FUA, only once it is committed under the volume's
//! commit mode (under sync_all: durable on every in-sync replica). A write
//! the volume cannot take gets an error reply, never a silent drop.
//!
//! Alignment: the minimum block size is 4096 and it is advertised in every
//! `NBD_INFO_BLOCK_SIZE`; a request that is not 4 KiB-aligned gets
//! `NBD_EINVAL` and changes nothing (clients that negotiated block sizes,
//! like qemu, align on their side).

mod handshake;
pub(crate) mod metrics;
mod proto;
mod transmission;

use crate::fence::WriteFence;
use crate::serving::Serving;
use std::net::SocketAddr;
use std::sync::Arc;
use tokio::net::TcpListener;
use tokio::sync::{oneshot, watch};
use walship_actors::{VolumeHandle, VolumeThread};

/// One export: a volume, its size, and whether clients may write.
#[derive(Debug, Clone)]
pub struct Export {
    /// Export name (the volume's name).
    pub name: String,
    /// The volume.
    pub volume: VolumeHandle,
    /// Size in bytes.
    pub size: u64,
    /// Whether writes are refused (`NBD_EPERM`).
    pub read_only: bool,
    /// Whether the node may acknowledge writes now.
    pub fence: Arc<WriteFence>,
}

/// What clients can open, asked at each handshake (so an export follows
/// its volume's role changes).
pub trait Exports: Send + Sync + 'static {
    /// Every export's name, for `NBD_OPT_LIST`.
    fn names(&self) -> Vec<String>;
    /// The export called `name`, if there is one.
    fn export(&self, name: &str) -> Option<Export>;
}

/// A running NBD server. [`stop`](NbdServer::stop) stops accepting,
/// answers every request already read, and returns once every connection
/// has ended.
#[derive(Debug)]
pub struct NbdServer(Serving);

impl NbdServer {
    /// Serves `exports` to the clients of `listener`. Each connection runs
    /// on `volumes`, the thread of the volume actors it sends requests to:
    /// reading a request, carrying it out and writing the reply then wake
    /// no other thread (from the node's tokio threads, a 4 KiB write crossed
    /// to the volume's thread and back, and between tasks on either side).
    pub fn start(
        listener: TcpListener,
        exports: Arc<dyn Exports>,
        volumes: VolumeThread,
    ) -> std::io::Result<Self> {
        let serving = Serving::start("nbd", listener, move |stream, peer, stopped| {
            let (exports, volumes) = (Arc::clone(&exports), volumes.clone());
            async move {
                let _ = stream.set_nodelay(true);
                if let Err(e) = serve_on(&volumes, stream, exports, stopped).await {
                    tracing::info!(%peer, error = %e, "nbd connection closed");
                }
            }
        })?;
        Ok(Self(serving))
    }

    /// Where it listens.
    pub fn local_addr(&self) -> SocketAddr {
        self.0.local_addr()
    }

    /// Stops accepting; connections still negotiating close, connections
    /// transmitting stop reading requests, answer the ones they read, and
    /// close. Returns when the last one has.
    pub async fn stop(&self) {
        self.0.stop().await;
    }
}

/// [`serve`] on `volumes`; returns when the connection has ended there
/// (or the runtime stopped under it).
async fn serve_on(
    volumes: &VolumeThread,
    stream: tokio::net::TcpStream,
    exports: Arc<dyn Exports>,
    stopped: watch::Receiver<bool>,
) -> Result<(), NbdError> {
    // A socket belongs to the reactor that registered it: handed over as a
    // std socket, registered again there.
    let stream = stream.into_std()?;
    let (done, ended) = oneshot::channel();
    let spawned = volumes.spawn(async move {
        let served = match tokio::net::TcpStream::from_std(stream) {
            Ok(stream) => serve(stream, exports, stopped).await,
            Err(e) => Err(e.into()),
        };
        let _ = done.send(served);
    });
    if !spawned {
        return Err(NbdError::Io(std::io::Error::other(
            "the volumes' runtime has stopped",
        )));
    }
    ended.await.unwrap_or_else(|_| {
        Err(NbdError::Io(std::io::Error::other(
            "the connection's task ended without a word (a panic, or the runtime stopped)",
        )))
    })
}

async fn serve(
    stream: tokio::net::TcpStream,
    exports: Arc<dyn Exports>,
    stopped: watch::Receiver<bool>,
) -> Result<(), NbdError> {
    let (read, write) = stream.into_split();
    let mut read = tokio::io::BufReader::new(read);
    let mut write = tokio::io::BufWriter::new(write);
    let mut stop = stopped.clone();
    let negotiated = tokio::select! {
        negotiated = handshake::negotiate(&mut read, &mut write, exports.as_ref()) => negotiated?,
        _ = stop.wait_for(|stop| *stop) => return Ok(()),
    };
    match negotiated {
        Some(export) => transmission::serve(read, write, export, stopped).await,
        None => Ok(()),
    }
}

/// Why a connection ended before its client said goodbye.
#[derive(Debug, thiserror::Error)]
pub(crate) enum NbdError {
    /// The socket failed.
    #[error(transparent)]
    Io(#[from] std::io::Error),
    /// The client broke the protocol; the connection is closed.
    #[error("protocol: {0}")]
    Protocol(String),
}
