//! Replication streams multiplexed over one TCP connection per peer
//! address (yamux: a stream per session, flow control per stream), so a
//! volume costs a node no socket of its own.
//!
//! The primary's node keeps [`PeerLinks`]: the first session to a peer
//! connects, sends [`PREAMBLE`], and starts the link's driver; every later
//! session opens a stream on it. A link whose connection died is replaced
//! by the next session that needs it. On a node's listener, a connection
//! that starts with the preamble is served by [`serve`]: each stream it
//! carries is one replication connection, routed by its hello like a plain
//! one.

use crate::error::ExecError;
use crate::transport::Io;
use futures::future::poll_fn;
use std::collections::{HashMap, VecDeque};
use std::task::Poll;
use std::time::Duration;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tokio::sync::{mpsc, oneshot, Mutex};
use tokio_util::compat::{FuturesAsyncReadCompatExt, TokioAsyncReadCompatExt};

/// Sent first on a multiplexed connection. Its first four bytes, read as
/// a plain connection's frame length, are far past the largest frame, so
/// a listener tells the two kinds apart without guessing.
pub(crate) const PREAMBLE: [u8; 8] = [0xff, 0xff, 0xff, 0xff, b'w', b'm', b'u', b'x'];

fn config() -> yamux::Config {
    /// Sessions one link may carry at once: every volume two nodes share.
    const STREAMS: usize = 1 << 16;
    /// yamux's default window per stream.
    const STREAM_WINDOW: usize = 256 << 10;
    let mut config = yamux::Config::default();
    // Credit, not memory: a stream buffers only what its peer sent and it
    // has not read, and the executors keep that bounded themselves.
    config.set_max_connection_receive_window(Some(STREAMS * STREAM_WINDOW));
    config.set_max_num_streams(STREAMS);
    config
}

/// A request for a new stream on a link.
type OpenRequest = oneshot::Sender<Result<yamux::Stream, String>>;

/// A node's links to its peers, one per address.
#[derive(Debug, Default)]
pub(crate) struct PeerLinks {
    links: Mutex<HashMap<String, mpsc::UnboundedSender<OpenRequest>>>,
}

impl PeerLinks {
    /// A new stream to `addr`, on its link (connected first if there is
    /// none, or if it died), within `limit`.
    pub(crate) async fn open(&self, addr: &str, limit: Duration) -> Result<Box<dyn Io>, ExecError> {
        let stream = tokio::time::timeout(limit, self.open_stream(addr))
            .await
            .map_err(|_| ExecError::Timeout(limit))??;
        Ok(Box::new(stream.compat()))
    }

    /// How many links are up.
    pub(crate) async fn count(&self) -> usize {
        let links = self.links.lock().await;
        links.values().filter(|link| !link.is_closed()).count()
    }

    async fn open_stream(&self, addr: &str) -> Result<yamux::Stream, ExecError> {
        // At most one retry: a link found dead is replaced once.
        for _ in 0..2 {
            let link = self.link(addr).await?;
            let (asked, answer) = oneshot::channel();
            if link.send(asked).is_err() {
                self.forget(addr, &link).await;
                continue;
            }
            match answer.await {
                Ok(Ok(stream)) => return Ok(stream),
                Ok(Err(e)) => {
                    self.forget(addr, &link).await;
                    return Err(ExecError::Protocol(format!("stream to {addr}: {e}")));
                }
                Err(_) => self.forget(addr, &link).await,
            }
        }
        Err(ExecError::Closed)
    }

    /// The link to `addr`, connected now if there is none alive.
    async fn link(&self, addr: &str) -> Result<mpsc::UnboundedSender<OpenRequest>, ExecError> {
        let mut links = self.links.lock().await;
        if let Some(link) = links.get(addr).filter(|link| !link.is_closed()) {
            return Ok(link.clone());
        }
        let wire = |e: std::io::Error| ExecError::Wire(e.into());
        let mut stream = TcpStream::connect(addr).await.map_err(wire)?;
        stream.set_nodelay(true).map_err(wire)?;
        stream.write_all(&PREAMBLE).await.map_err(wire)?;
        let connection = yamux::Connection::new(stream.compat(), config(), yamux::Mode::Client);
        let (link, requests) = mpsc::unbounded_channel();
        tokio::spawn(drive(connection, requests));
        links.insert(addr.to_owned(), link.clone());
        Ok(link)
    }

    async fn forget(&self, addr: &str, dead: &mpsc::UnboundedSender<OpenRequest>) {
        let mut links = self.links.lock().await;
        if links.get(addr).is_some_and(|link| link.same_channel(dead)) {
            links.remove(addr);
        }
    }
}

/// Runs a link until its connection ends: opens the streams asked for and
/// moves every stream's bytes (yamux makes progress only while polled).
async fn drive(
    mut connection: yamux::Connection<tokio_util::compat::Compat<TcpStream>>,
    mut requests: mpsc::UnboundedReceiver<OpenRequest>,
) {
    let mut waiting: VecDeque<OpenRequest> = VecDeque::new();
    let mut asking = true;
    let failure = poll_fn(|cx| {
        while asking {
            match requests.poll_recv(cx) {
                Poll::Ready(Some(request)) => waiting.push_back(request),
                // Nobody can ask any more; the streams open go on.
                Poll::Ready(None) => asking = false,
                Poll::Pending => break,
            }
        }
        while !waiting.is_empty() {
            match connection.poll_new_outbound(cx) {
                Poll::Ready(Ok(stream)) => {
                    if let Some(request) = waiting.pop_front() {
                        let _ = request.send(Ok(stream));
                    }
                }
                Poll::Ready(Err(e)) => return Poll::Ready(e.to_string()),
                Poll::Pending => break,
            }
        }
        loop {
            match connection.poll_next_inbound(cx) {
                // A peer does not open streams to the primary's side.
                Poll::Ready(Some(Ok(stream))) => drop(stream),
                Poll::Ready(Some(Err(e))) => return Poll::Ready(e.to_string()),
                Poll::Ready(None) => return Poll::Ready("closed".to_owned()),
                Poll::Pending => return Poll::Pending,
            }
        }
    })
    .await;
    tracing::debug!(%failure, "peer link ended");
    for request in waiting {
        let _ = request.send(Err(failure.clone()));
    }
}

/// Serves a multiplexed connection (its preamble already read): each
/// stream the peer opens goes to `accept`, until the connection ends.
pub(crate) async fn serve(stream: TcpStream, mut accept: impl FnMut(Box<dyn Io>)) {
    let mut connection = yamux::Connection::new(stream.compat(), config(), yamux::Mode::Server);
    loop {
        match poll_fn(|cx| connection.poll_next_inbound(cx)).await {
            Some(Ok(stream)) => accept(Box::new(stream.compat())),
            Some(Err(e)) => {
                tracing::debug!(error = %e, "multiplexed connection ended");
                return;
            }
            None => return,
        }
    }
}
