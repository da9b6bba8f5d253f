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
//!
//! Liveness belongs to the link, not to its sessions (CockroachDB's
//! heartbeats per node pair, Ceph's per peer OSD). The first stream the
//! primary's side opens (yamux stream 1) is the link's probe: the driver
//! writes 8 bytes on it every quarter of [`Liveness::silent_after`] and
//! the peer's [`serve`] echoes them. Any byte read from the peer's socket
//! counts as hearing from it; a peer silent for `silent_after` against a
//! probe it had half that long to answer (paused, partitioned, its host
//! gone) ends the link, and the link's end closes
//! every stream on it at once, so each session's executor sees its
//! connection close and the engine retries it. Sessions on a live link
//! send nothing while idle.

use crate::error::ExecError;
use crate::transport::Io;
use futures::future::poll_fn;
use futures::{AsyncRead as _, AsyncWrite as _, Future as _};
use std::collections::{HashMap, VecDeque};
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::sync::PoisonError;
use std::task::Poll;
use std::time::Duration;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tokio::sync::{mpsc, oneshot, watch, Mutex};
use tokio_util::compat::{FuturesAsyncReadCompatExt, TokioAsyncReadCompatExt};

/// Sent first on a multiplexed connection. Its first four bytes, read as
/// a plain connection's frame length, are far past the largest frame, so
/// a listener tells the two kinds apart without guessing.
/// (Version 2: its stream 1 is the link's probe. A listener of version 1
/// took `wmux`; one of either version refuses the other's preamble.)
pub(crate) const PREAMBLE: [u8; 8] = [0xff, 0xff, 0xff, 0xff, b'w', b'm', b'x', b'2'];

/// The probe stream's id: the first stream a client opens.
const PROBE_STREAM: u32 = 1;

/// How a link checks that its peer is there.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Liveness {
    /// A peer not heard from (no byte read) for this long is gone: the
    /// link ends, and every session on it with it.
    pub(crate) silent_after: Duration,
}

impl Liveness {
    /// How often the probe asks.
    fn every(self) -> Duration {
        (self.silent_after / 4).max(Duration::from_millis(1))
    }
}

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
    /// Peers found unreachable, each watched by a redial that says when
    /// it answers again (see [`when_back`](Self::when_back)).
    away: Arc<std::sync::Mutex<HashMap<String, watch::Sender<()>>>>,
    /// The thread every link's connection is driven on (and the node's
    /// listener serves them on), away from the volumes' threads: a
    /// receiver's synchronous fsyncs, thousands of them in a failover at
    /// scale, held up the probe's echo beside them past `link_timeout`,
    /// and healthy links were cut as silent. `None`: the caller's.
    thread: Option<actix::ArbiterHandle>,
    /// Per peer address, the places of sessions whose streams wait for
    /// their first answer ([`OPENING_PER_LINK`]).
    opening: std::sync::Mutex<HashMap<String, Arc<tokio::sync::Semaphore>>>,
}

/// Sessions to one peer that may wait for their first answer at once.
/// A peer acknowledges a stream with its first answer, and yamux opens no
/// more than 256 streams a peer has not acknowledged: past that, an open
/// waits in the driver, and it waited there against the session's connect
/// timeout. In a failover at 10,000 volumes, 1,667 new primaries peered
/// with one node at once; those queued behind the 256 timed out after 2
/// s, retried after a backoff, and queued again, for 20 s. Queued here
/// instead, a session's timeouts start when its turn comes, and the peer
/// answers them in the order they asked.
pub(crate) const OPENING_PER_LINK: usize = 128;

/// A stream whose session holds a place among those opening to its peer
/// ([`OPENING_PER_LINK`]) until the peer's first answer (or the end of
/// the stream, or its drop).
#[derive(Debug)]
struct Opening {
    stream: tokio_util::compat::Compat<yamux::Stream>,
    turn: Option<tokio::sync::OwnedSemaphorePermit>,
}

impl tokio::io::AsyncRead for Opening {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let read = Pin::new(&mut self.stream).poll_read(cx, buf);
        if read.is_ready() {
            // Answered (or ended): the peer acknowledged the stream.
            self.turn = None;
        }
        read
    }
}

impl tokio::io::AsyncWrite for Opening {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write(cx, buf)
    }

    fn poll_flush(
        mut self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.stream).poll_flush(cx)
    }

    fn poll_shutdown(
        mut self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }
}

/// How often a redial knocks on an unreachable peer's port.
const REDIAL_EVERY: Duration = Duration::from_millis(100);
/// How long a redial goes on with nobody waiting for its answer.
const REDIAL_UNWATCHED: Duration = Duration::from_secs(2);

impl PeerLinks {
    /// Links driven on `thread` (an arbiter of their own).
    pub(crate) fn on(thread: actix::ArbiterHandle) -> Self {
        Self {
            thread: Some(thread),
            ..Self::default()
        }
    }

    /// Runs `fut` on the links' thread; false if it has stopped.
    pub(crate) fn spawn(
        &self,
        fut: impl std::future::Future<Output = ()> + Send + 'static,
    ) -> bool {
        match &self.thread {
            Some(thread) => thread.spawn(fut),
            None => {
                tokio::spawn(fut);
                true
            }
        }
    }

    /// A new stream to `addr`, on its link (connected first if there is
    /// none, or if it died), within `limit` once its turn came: at most
    /// [`OPENING_PER_LINK`] sessions to one peer wait for their first
    /// answer at once, the others queue, unhurried, for a place.
    /// A link made for it checks its peer as `liveness` says.
    pub(crate) async fn open(
        &self,
        addr: &str,
        limit: Duration,
        liveness: Liveness,
    ) -> Result<Box<dyn Io>, ExecError> {
        let turn = self.opening(addr).acquire_owned().await;
        let turn = turn.map_err(|_| ExecError::Closed)?;
        let stream = tokio::time::timeout(limit, self.open_stream(addr, limit, liveness))
            .await
            .map_err(|_| ExecError::Timeout(limit))??;
        Ok(Box::new(Opening {
            stream: stream.compat(),
            turn: Some(turn),
        }))
    }

    /// The places of sessions opening to `addr`.
    fn opening(&self, addr: &str) -> Arc<tokio::sync::Semaphore> {
        let mut opening = self.opening.lock().unwrap_or_else(PoisonError::into_inner);
        let places = opening
            .entry(addr.to_owned())
            .or_insert_with(|| Arc::new(tokio::sync::Semaphore::new(OPENING_PER_LINK)));
        Arc::clone(places)
    }

    /// How many links are up.
    pub(crate) async fn count(&self) -> usize {
        let links = self.links.lock().await;
        links.values().filter(|link| !link.is_closed()).count()
    }

    async fn open_stream(
        &self,
        addr: &str,
        limit: Duration,
        liveness: Liveness,
    ) -> Result<yamux::Stream, ExecError> {
        // At most one retry: a link found dead is replaced once.
        for _ in 0..2 {
            let link = self.link(addr, limit, liveness).await?;
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
    async fn link(
        &self,
        addr: &str,
        limit: Duration,
        liveness: Liveness,
    ) -> Result<mpsc::UnboundedSender<OpenRequest>, ExecError> {
        let mut links = self.links.lock().await;
        if let Some(link) = links.get(addr).filter(|link| !link.is_closed()) {
            return Ok(link.clone());
        }
        // Connected on the links' thread, so the socket is registered with
        // its reactor, and driven there.
        let (made, connected) = oneshot::channel();
        let dialing = dial(addr.to_owned(), limit, liveness);
        let spawned = self.spawn(async move {
            match dialing.await {
                Ok((link, driving)) => {
                    // Nobody waits for it (timed out): no link.
                    if made.send(Ok(link)).is_ok() {
                        driving.await;
                    }
                }
                Err(e) => drop(made.send(Err(e))),
            }
        });
        if !spawned {
            return Err(ExecError::Closed);
        }
        match connected.await.map_err(|_| ExecError::Closed)? {
            Ok(link) => {
                links.insert(addr.to_owned(), link.clone());
                Ok(link)
            }
            Err((refused, e)) => {
                if refused {
                    self.redial(addr);
                }
                Err(ExecError::Wire(e.into()))
            }
        }
    }

    /// A watch that changes once `addr`, found unreachable, answers again
    /// (a TCP connect to it succeeds): a session waiting out its backoff
    /// retries then, not at the end of it. `None` if `addr` is not known
    /// to be away.
    pub(crate) fn when_back(&self, addr: &str) -> Option<watch::Receiver<()>> {
        let away = self.away.lock().unwrap_or_else(PoisonError::into_inner);
        away.get(addr).map(watch::Sender::subscribe)
    }

    /// Starts watching for `addr`'s return, unless a redial already does:
    /// one per address, however many sessions wait for it.
    fn redial(&self, addr: &str) {
        let mut away = self.away.lock().unwrap_or_else(PoisonError::into_inner);
        if away.contains_key(addr) {
            return;
        }
        let (back, _) = watch::channel(());
        away.insert(addr.to_owned(), back.clone());
        tokio::spawn(redial(addr.to_owned(), back, Arc::clone(&self.away)));
    }

    async fn forget(&self, addr: &str, dead: &mpsc::UnboundedSender<OpenRequest>) {
        let mut links = self.links.lock().await;
        if links.get(addr).is_some_and(|link| link.same_channel(dead)) {
            links.remove(addr);
        }
    }
}

/// A new link to `addr`: its handle, and its driver to run where the
/// connection was made. An error says whether the connect itself failed
/// (the peer is away: a redial watches for it).
/// The connect is given up after `limit` (it runs on the links' thread,
/// where the caller's own timeout does not reach).
async fn dial(
    addr: String,
    limit: Duration,
    liveness: Liveness,
) -> Result<
    (
        mpsc::UnboundedSender<OpenRequest>,
        impl std::future::Future<Output = ()>,
    ),
    (bool, std::io::Error),
> {
    let failed = |e| (false, e);
    let connect = tokio::time::timeout(limit, TcpStream::connect(&addr)).await;
    let connected = connect.map_err(|_| failed(std::io::ErrorKind::TimedOut.into()))?;
    let mut stream = connected.map_err(|e| (true, e))?;
    stream.set_nodelay(true).map_err(failed)?;
    stream.write_all(&PREAMBLE).await.map_err(failed)?;
    let socket = Heard::new(stream);
    let heard = socket.clock();
    let connection = yamux::Connection::new(socket.compat(), config(), yamux::Mode::Client);
    let (link, requests) = mpsc::unbounded_channel();
    Ok((link, drive(connection, requests, heard, liveness)))
}

/// Knocks on `addr` every [`REDIAL_EVERY`] until it answers (then tells
/// `back`'s watchers) or nobody has waited for it for
/// [`REDIAL_UNWATCHED`]; either way it leaves `away`.
async fn redial(
    addr: String,
    back: watch::Sender<()>,
    away: Arc<std::sync::Mutex<HashMap<String, watch::Sender<()>>>>,
) {
    let mut unwatched_since = tokio::time::Instant::now();
    loop {
        tokio::time::sleep(REDIAL_EVERY).await;
        if back.receiver_count() > 0 {
            unwatched_since = tokio::time::Instant::now();
        } else if unwatched_since.elapsed() >= REDIAL_UNWATCHED {
            break;
        }
        // A peer that drops packets rather than refusing: one knock at a
        // time, each within the knocking interval's tenfold.
        let knock = tokio::time::timeout(REDIAL_EVERY * 10, TcpStream::connect(&addr)).await;
        if let Ok(Ok(stream)) = knock {
            // The listener reads a preamble first: a bare close is
            // nothing to it.
            drop(stream);
            tracing::info!(%addr, "peer answers again");
            back.send_replace(());
            break;
        }
    }
    let mut away = away.lock().unwrap_or_else(PoisonError::into_inner);
    if away
        .get(&addr)
        .is_some_and(|watched| watched.same_channel(&back))
    {
        away.remove(&addr);
    }
}

/// Runs a link until its connection ends or its peer falls silent: opens
/// the streams asked for, moves every stream's bytes (yamux makes
/// progress only while polled) and probes the peer. Returning drops the
/// connection, which closes every stream on it.
async fn drive(
    mut connection: yamux::Connection<tokio_util::compat::Compat<Heard>>,
    mut requests: mpsc::UnboundedReceiver<OpenRequest>,
    heard: HeardClock,
    liveness: Liveness,
) {
    let mut waiting: VecDeque<OpenRequest> = VecDeque::new();
    let mut asking = true;
    // Opened first, so it is stream 1, whatever opens next.
    let mut probe = match poll_fn(|cx| connection.poll_new_outbound(cx)).await {
        Ok(probe) => probe,
        Err(e) => return fail_waiting(&mut requests, waiting, e.to_string()),
    };
    let mut ping = tokio::time::interval(liveness.every());
    ping.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut pings = 0u64;
    let mut echoes = [0u8; 64];
    let mut silence = std::pin::pin!(tokio::time::sleep(liveness.silent_after));
    // When the oldest probe not yet answered (nothing heard since) went out.
    let mut asked: Option<tokio::time::Instant> = None;
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
        while ping.poll_tick(cx).is_ready() {
            pings += 1;
            // A probe the stream cannot take now (its window full: the
            // peer reads nothing) is skipped; the silence says the rest.
            match Pin::new(&mut probe).poll_write(cx, &pings.to_be_bytes()) {
                Poll::Ready(Ok(_)) => {
                    asked.get_or_insert_with(tokio::time::Instant::now);
                }
                Poll::Ready(Err(e)) => return Poll::Ready(format!("probe: {e}")),
                Poll::Pending => {}
            }
        }
        // The echoes only keep the probe's window open: the socket's
        // clock already heard them.
        loop {
            match Pin::new(&mut probe).poll_read(cx, &mut echoes) {
                Poll::Ready(Ok(0)) => return Poll::Ready("probe closed".to_owned()),
                Poll::Ready(Ok(_)) => {}
                Poll::Ready(Err(e)) => return Poll::Ready(format!("probe: {e}")),
                Poll::Pending => break,
            }
        }
        loop {
            match connection.poll_next_inbound(cx) {
                // A peer does not open streams to the primary's side.
                Poll::Ready(Some(Ok(stream))) => drop(stream),
                Poll::Ready(Some(Err(e))) => return Poll::Ready(e.to_string()),
                Poll::Ready(None) => return Poll::Ready("closed".to_owned()),
                Poll::Pending => break,
            }
        }
        // After the socket was read: a driver polled late does not take
        // what waits in the socket for silence. The peer is silent only
        // against a probe it was sent and had time to answer (half the
        // timeout): a driver that was itself stalled (its thread busy)
        // sends one first, and does not take its own silence for the
        // peer's.
        let now = tokio::time::Instant::now();
        match judge(heard.last(), &mut asked, now, liveness.silent_after) {
            Verdict::Alive => {}
            Verdict::Silent(for_) => return Poll::Ready(format!("peer silent for {for_:?}")),
            Verdict::Due(due) => {
                if silence.deadline() != due {
                    silence.as_mut().reset(due);
                }
                if silence.as_mut().poll(cx).is_ready() {
                    cx.waker().wake_by_ref();
                }
            }
        }
        Poll::Pending
    })
    .await;
    // Every session on the link ends with it: worth an operator's line.
    tracing::warn!(%failure, "peer link ended");
    fail_waiting(&mut requests, waiting, failure);
}

/// What a link's clock says of its peer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Verdict {
    /// Heard since the last probe went out, or no probe out.
    Alive,
    /// A probe is out: silent if nothing is heard by then.
    Due(tokio::time::Instant),
    /// Silent this long, against a probe it had time to answer.
    Silent(Duration),
}

/// Judges a link's peer at `now`: `last`, when a byte of it was last
/// read; `asked`, when the oldest probe not answered since went out
/// (cleared here once something was heard after it). The peer is silent
/// only once nothing was heard for `silent_after` and the probe has been
/// out for half of that: a driver that was itself stalled (its thread
/// busy) sends a probe first and does not take its own silence for the
/// peer's.
fn judge(
    last: tokio::time::Instant,
    asked: &mut Option<tokio::time::Instant>,
    now: tokio::time::Instant,
    silent_after: Duration,
) -> Verdict {
    if asked.is_some_and(|sent| last >= sent) {
        *asked = None;
    }
    let Some(sent) = *asked else {
        return Verdict::Alive;
    };
    let due = (last + silent_after).max(sent + silent_after / 2);
    if due <= now {
        Verdict::Silent(now.saturating_duration_since(last))
    } else {
        Verdict::Due(due)
    }
}

/// Answers every open request waiting, or already asked, with `failure`.
fn fail_waiting(
    requests: &mut mpsc::UnboundedReceiver<OpenRequest>,
    mut waiting: VecDeque<OpenRequest>,
    failure: String,
) {
    requests.close();
    while let Ok(request) = requests.try_recv() {
        waiting.push_back(request);
    }
    for request in waiting {
        let _ = request.send(Err(failure.clone()));
    }
}

/// A link's socket, noting when a byte last came from the peer.
struct Heard {
    socket: TcpStream,
    clock: HeardClock,
}

/// When a link last heard from its peer, shared by its socket and driver.
#[derive(Clone)]
struct HeardClock {
    since: tokio::time::Instant,
    /// Microseconds after `since`.
    last_us: Arc<AtomicU64>,
}

impl HeardClock {
    fn last(&self) -> tokio::time::Instant {
        self.since + Duration::from_micros(self.last_us.load(Ordering::Relaxed))
    }

    fn now(&self) {
        let us = u64::try_from(self.since.elapsed().as_micros()).unwrap_or(u64::MAX);
        self.last_us.store(us, Ordering::Relaxed);
    }
}

impl Heard {
    fn new(socket: TcpStream) -> Self {
        let clock = HeardClock {
            since: tokio::time::Instant::now(),
            last_us: Arc::default(),
        };
        Self { socket, clock }
    }

    fn clock(&self) -> HeardClock {
        self.clock.clone()
    }
}

impl tokio::io::AsyncRead for Heard {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let read = Pin::new(&mut self.socket).poll_read(cx, buf);
        if matches!(read, Poll::Ready(Ok(()))) && buf.filled().len() > before {
            self.clock.now();
        }
        read
    }
}

impl tokio::io::AsyncWrite for Heard {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.socket).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.socket).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.socket.is_write_vectored()
    }

    fn poll_flush(
        mut self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.socket).poll_flush(cx)
    }

    fn poll_shutdown(
        mut self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.socket).poll_shutdown(cx)
    }
}

/// Serves a multiplexed connection (its preamble already read): stream 1
/// is the link's probe, echoed here; every other stream the peer opens
/// goes to `accept`, until the connection ends.
pub(crate) async fn serve(stream: TcpStream, mut accept: impl FnMut(Box<dyn Io>)) {
    let mut connection = yamux::Connection::new(stream.compat(), config(), yamux::Mode::Server);
    let mut probe: Option<Echo> = None;
    let ended = poll_fn(|cx| loop {
        if let Some(echo) = probe.as_mut() {
            if let Err(e) = echo.poll(cx) {
                tracing::debug!(error = %e, "link probe ended");
                probe = None;
            }
        }
        match connection.poll_next_inbound(cx) {
            Poll::Ready(Some(Ok(stream))) if stream.id().val() == PROBE_STREAM => {
                probe = Some(Echo::new(stream));
            }
            Poll::Ready(Some(Ok(stream))) => accept(Box::new(stream.compat())),
            Poll::Ready(Some(Err(e))) => return Poll::Ready(e.to_string()),
            Poll::Ready(None) => return Poll::Ready("closed".to_owned()),
            Poll::Pending => return Poll::Pending,
        }
    })
    .await;
    tracing::debug!(%ended, "multiplexed connection ended");
}

/// The probe's far end: writes back what it reads.
struct Echo {
    stream: yamux::Stream,
    buf: [u8; 64],
    /// What was read and is not yet written back.
    unsent: std::ops::Range<usize>,
}

impl Echo {
    fn new(stream: yamux::Stream) -> Self {
        Self {
            stream,
            buf: [0; 64],
            unsent: 0..0,
        }
    }

    /// Echoes what it can; an error or the stream's end ends the probe.
    fn poll(&mut self, cx: &mut std::task::Context<'_>) -> std::io::Result<()> {
        loop {
            if !self.unsent.is_empty() {
                match Pin::new(&mut self.stream).poll_write(cx, &self.buf[self.unsent.clone()]) {
                    Poll::Ready(Ok(n)) => self.unsent.start += n,
                    Poll::Ready(Err(e)) => return Err(e),
                    Poll::Pending => return Ok(()),
                }
                continue;
            }
            match Pin::new(&mut self.stream).poll_read(cx, &mut self.buf) {
                Poll::Ready(Ok(0)) => return Err(std::io::ErrorKind::UnexpectedEof.into()),
                Poll::Ready(Ok(n)) => self.unsent = 0..n,
                Poll::Ready(Err(e)) => return Err(e),
                Poll::Pending => return Ok(()),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TIMEOUT: Duration = Duration::from_secs(2);

    fn at(ms: u64) -> tokio::time::Instant {
        static ZERO: std::sync::OnceLock<tokio::time::Instant> = std::sync::OnceLock::new();
        *ZERO.get_or_init(tokio::time::Instant::now) + Duration::from_millis(ms)
    }

    #[test]
    fn a_peer_is_silent_only_against_a_probe_it_had_time_to_answer() {
        // (last heard, probe out since, now) -> verdict, probe still out
        let cases = [
            // No probe out: a driver stalled for 5 s judges nobody.
            (0, None, 5_000, Verdict::Alive, None),
            // Its first probe after the stall: due half a timeout later.
            (0, Some(5_000), 5_000, Verdict::Due(at(6_000)), Some(5_000)),
            (0, Some(5_000), 5_999, Verdict::Due(at(6_000)), Some(5_000)),
            (
                0,
                Some(5_000),
                6_000,
                Verdict::Silent(Duration::from_secs(6)),
                Some(5_000),
            ),
            // Answered: alive, the probe no longer out.
            (5_010, Some(5_000), 6_000, Verdict::Alive, None),
            // A paused peer: last heard at 1 s, the next probe at 1.5 s
            // unanswered: silent at 3 s, 2 s after the last byte.
            (
                1_000,
                Some(1_500),
                2_999,
                Verdict::Due(at(3_000)),
                Some(1_500),
            ),
            (
                1_000,
                Some(1_500),
                3_000,
                Verdict::Silent(TIMEOUT),
                Some(1_500),
            ),
        ];
        for (last, sent, now, verdict, left) in cases {
            let mut asked = sent.map(at);
            let judged = judge(at(last), &mut asked, at(now), TIMEOUT);
            assert_eq!(judged, verdict, "last {last}, sent {sent:?}, now {now}");
            assert_eq!(asked, left.map(at), "last {last}, sent {sent:?}, now {now}");
        }
    }
}
