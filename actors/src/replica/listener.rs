//! Replica listeners: accept connections and run one task per connection
//! that decodes frames, asks the receiver what to answer, and sends it.
//!
//! A replica either listens on an address of its own, or takes its
//! connections from a node's [`ReplicationListener`], which reads each
//! connection's hello and hands it to the receiver of the volume it names.
//! Either way a connection task is tracked by its volume's tasks and ends
//! when its volume stops, so the volume's stop waits for it.

use super::receiver::{ConnClosed, Inbound, ReceiverActor};
use crate::metrics::MeteredAddr;
use crate::mux;
use crate::transport::{self, linger, Conn, Io};
use actix::ArbiterHandle;
use futures::{FutureExt, SinkExt, StreamExt};
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio_util::codec::Framed;
use tokio_util::task::TaskTracker;
use walship_io::{Envelope, Message, WireCodec, CODE_IDENTITY, CODE_UNEXPECTED, CODE_WIRE};

/// Where one replica volume's connections go: its receiver, the tasks its
/// stop waits for, and the signal that ends its connections.
#[derive(Debug, Clone)]
pub(crate) struct Route {
    pub(crate) receiver: MeteredAddr<ReceiverActor>,
    pub(crate) tasks: TaskTracker,
    pub(crate) shutdown: watch::Receiver<bool>,
    /// The receiver's arbiter: its connections' socket reads run beside
    /// its writes there.
    pub(crate) arbiter: ArbiterHandle,
    /// The runtime's recovery budget: what its connections receive for
    /// catch-ups and rebuilds passes its receive rate.
    pub(crate) recovery: crate::recovery::RecoveryBudget,
}

impl Route {
    /// Serves `framed` (whose first frame, already read, is `first`) on
    /// the current arbiter until it closes or the volume stops, tracked by
    /// the volume's tasks.
    fn spawn(&self, framed: Conn, first: Option<Envelope>, conn: u64) {
        actix::spawn(
            self.tasks
                .track_future(self.connection(framed, first, conn)),
        );
    }

    fn connection(
        &self,
        framed: Conn,
        first: Option<Envelope>,
        conn: u64,
    ) -> impl std::future::Future<Output = ()> + 'static {
        let received = Received::new(self.recovery.clone());
        let connection = serve(framed, first, self.receiver.clone(), conn, received);
        let mut stop = self.shutdown.clone();
        async move {
            tokio::select! {
                () = connection => {}
                _ = stop.wait_for(|stopped| *stopped) => {}
            }
        }
    }

    /// [`spawn`](Self::spawn) on the receiver's arbiter, for a stream of a
    /// multiplexed connection: its bytes come through the link's task,
    /// whatever the arbiter.
    fn spawn_there<C: Io>(&self, framed: Framed<C, WireCodec>, first: Envelope, conn: u64) {
        let parts = framed.into_parts();
        let io: Box<dyn Io> = Box::new(parts.io);
        let framed = transport::reframe(io, parts.codec, parts.read_buf, parts.write_buf);
        let connection = self.connection(framed, Some(first), conn);
        if !self.arbiter.spawn(self.tasks.track_future(connection)) {
            tracing::warn!("the receiver's arbiter stopped: connection dropped");
        }
    }

    /// [`spawn`](Self::spawn) on the receiver's arbiter, for a connection a
    /// node's listener accepted on its own: the socket leaves the
    /// listener's reactor and joins the receiver's, with the bytes already
    /// read past the hello.
    fn hand_over(&self, framed: Framed<TcpStream, WireCodec>, first: Envelope, conn: u64) {
        let parts = framed.into_parts();
        let stream = match parts.io.into_std() {
            Ok(stream) => stream,
            Err(e) => return tracing::warn!(error = %e, "replication connection hand-over"),
        };
        let (codec, read_buf, write_buf) = (parts.codec, parts.read_buf, parts.write_buf);
        let route = self.clone();
        let handed = self.tasks.track_future(async move {
            let stream = match TcpStream::from_std(stream) {
                Ok(stream) => stream,
                Err(e) => return tracing::warn!(error = %e, "replication connection hand-over"),
            };
            let framed = transport::boxed(transport::reframe(stream, codec, read_buf, write_buf));
            route.connection(framed, Some(first), conn).await;
        });
        if !self.arbiter.spawn(handed) {
            tracing::warn!("the receiver's arbiter stopped: connection dropped");
        }
    }
}

/// Accepts connections for one replica until it stops. The loop is
/// tracked by the replica's tasks, like every connection it starts.
pub(crate) async fn accept_loop(listener: TcpListener, route: Route) {
    let mut next_conn = 0u64;
    let mut stop = route.shutdown.clone();
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => {
                    next_conn += 1;
                    let _ = stream.set_nodelay(true);
                    route.spawn(transport::boxed(transport::framed(stream)), None, next_conn);
                }
                Err(e) => tracing::warn!(error = %e, "accept failed"),
            },
            _ = stop.wait_for(|stopped| *stopped) => return,
        }
    }
}

/// How long a connection to a node's listener may take to say hello.
const HELLO_WAIT: Duration = Duration::from_secs(10);

/// A node's one replication listener: every replica volume of the node
/// takes its connections here, routed by the volume the hello names.
/// Cheap to clone; [`close`](Self::close) stops accepting.
#[derive(Debug, Clone)]
pub struct ReplicationListener {
    shared: Arc<Shared>,
}

#[derive(Debug)]
struct Shared {
    cluster: String,
    local: SocketAddr,
    routes: Mutex<HashMap<String, Route>>,
    next_conn: AtomicU64,
    closed: watch::Sender<bool>,
    /// Bumped at each volume routed; while `starting`, a hello naming a
    /// volume not routed yet waits on it.
    registered: watch::Sender<u64>,
    starting: std::sync::atomic::AtomicBool,
    /// Hellos waiting for their volume to be routed.
    held: AtomicU64,
    /// The accept loop and the tasks reading hellos.
    tasks: TaskTracker,
}

impl ReplicationListener {
    /// Binds `listener` for `cluster`; the caller spawns the returned
    /// future (the accept loop) where it should run.
    pub(crate) fn new(
        cluster: String,
        listener: std::net::TcpListener,
    ) -> std::io::Result<(Self, impl std::future::Future<Output = ()>)> {
        let local = listener.local_addr()?;
        let (closed, _) = watch::channel(false);
        let shared = Arc::new(Shared {
            cluster,
            local,
            routes: Mutex::default(),
            next_conn: AtomicU64::new(0),
            closed,
            registered: watch::channel(0).0,
            starting: std::sync::atomic::AtomicBool::new(false),
            held: AtomicU64::new(0),
            tasks: TaskTracker::new(),
        });
        let accepting = Arc::clone(&shared);
        let run = shared.tasks.track_future(async move {
            // Registered with the reactor of the arbiter it is spawned on.
            match TcpListener::from_std(listener) {
                Ok(listener) => accepting.accept_loop(listener).await,
                Err(e) => tracing::error!(error = %e, "replication listener"),
            }
        });
        Ok((Self { shared }, run))
    }

    /// The address it listens on.
    pub fn local_addr(&self) -> SocketAddr {
        self.shared.local
    }

    /// The cluster whose hellos it takes.
    pub fn cluster(&self) -> &str {
        &self.shared.cluster
    }

    /// Stops accepting and returns once the accept loop and every
    /// connection still saying hello have ended. Connections already
    /// handed to a volume end with the volume.
    pub async fn close(&self) {
        // Hellos held for volumes still opening are refused now.
        self.volumes_started();
        // send_replace: the value changes even before the loop subscribed.
        self.shared.closed.send_replace(true);
        self.shared.tasks.close();
        self.shared.tasks.wait().await;
    }

    /// Routes `volume`'s connections to `route`; false if another
    /// replica of that volume is already routed here.
    pub(crate) fn register(&self, volume: &str, route: Route) -> bool {
        let mut routes = self.shared.routes();
        if routes.contains_key(volume) {
            return false;
        }
        routes.insert(volume.to_owned(), route);
        drop(routes);
        self.shared.registered.send_modify(|n| *n += 1);
        true
    }

    /// Until [`volumes_started`](Self::volumes_started), a hello naming a
    /// volume not routed here yet waits for it (as long as a hello may
    /// take) rather than being refused: a node opens its listener before
    /// its volumes, so that a peer whose link is back is answered at
    /// once, and a primary that says hello to a replica still opening
    /// waits for it instead of backing off.
    pub fn wait_for_volumes(&self) {
        self.shared.starting.store(true, Ordering::SeqCst);
    }

    /// Hellos waiting now for a volume still opening.
    pub fn hellos_held(&self) -> u64 {
        self.shared.held.load(Ordering::SeqCst)
    }

    /// Every volume the node starts with is routed: a hello naming
    /// another is refused at once from now on.
    pub fn volumes_started(&self) {
        self.shared.starting.store(false, Ordering::SeqCst);
        self.shared.registered.send_modify(|n| *n += 1);
    }

    /// Stops routing `volume`'s connections.
    pub(crate) fn unregister(&self, volume: &str) {
        self.shared.routes().remove(volume);
    }
}

impl Shared {
    fn routes(&self) -> std::sync::MutexGuard<'_, HashMap<String, Route>> {
        self.routes.lock().unwrap_or_else(PoisonError::into_inner)
    }

    async fn accept_loop(self: Arc<Self>, listener: TcpListener) {
        let mut closed = self.closed.subscribe();
        loop {
            tokio::select! {
                accepted = listener.accept() => match accepted {
                    Ok((stream, _)) => {
                        let routing = Arc::clone(&self);
                        let mut closed = self.closed.subscribe();
                        actix::spawn(self.tasks.track_future(async move {
                            tokio::select! {
                                () = routing.accepted(stream) => {}
                                _ = closed.wait_for(|closed| *closed) => {}
                            }
                        }));
                    }
                    Err(e) => tracing::warn!(error = %e, "accept failed"),
                },
                _ = closed.wait_for(|closed| *closed) => return,
            }
        }
    }

    /// A new connection: multiplexed (it starts with the preamble), each
    /// of its streams routed on its own; or plain, routed itself.
    async fn accepted(self: &Arc<Self>, mut stream: TcpStream) {
        let _ = stream.set_nodelay(true);
        let mut head = [0u8; 8];
        match tokio::time::timeout(HELLO_WAIT, stream.read_exact(&mut head)).await {
            Ok(Ok(_)) => {}
            _ => return,
        }
        if head == mux::PREAMBLE {
            let routing = Arc::clone(self);
            mux::serve(stream, move |io| {
                let routing = Arc::clone(&routing);
                let streams = routing.tasks.clone();
                actix::spawn(streams.track_future(async move {
                    routing
                        .route(transport::framed(io), |route, framed, first, conn| {
                            route.spawn_there(framed, first, conn);
                        })
                        .await;
                }));
            })
            .await;
            return;
        }
        let mut framed = transport::framed(stream);
        framed.read_buffer_mut().extend_from_slice(&head);
        self.route(framed, |route, framed, first, conn| {
            route.hand_over(framed, first, conn);
        })
        .await;
    }

    /// Reads the hello and hands the connection (`hand`) to the volume it
    /// names; anything else gets a typed error and the connection closes.
    async fn route<C: AsyncRead + AsyncWrite + Unpin>(
        &self,
        mut framed: Framed<C, WireCodec>,
        hand: impl FnOnce(&Route, Framed<C, WireCodec>, Envelope, u64),
    ) {
        let refusal = match tokio::time::timeout(HELLO_WAIT, framed.next()).await {
            Err(_) | Ok(None) => return,
            Ok(Some(Err(e))) => (CODE_WIRE, e.to_string()),
            Ok(Some(Ok(envelope))) => {
                let named = match &envelope.message {
                    Message::Hello {
                        cluster, volume, ..
                    }
                    | Message::Peer {
                        cluster, volume, ..
                    }
                    | Message::VerifyBegin {
                        cluster, volume, ..
                    } => Some((cluster.clone(), volume.clone())),
                    _ => None,
                };
                match named {
                    None => (
                        CODE_UNEXPECTED,
                        "a replication connection starts with hello".to_owned(),
                    ),
                    Some((cluster, _)) if cluster != self.cluster => (
                        CODE_IDENTITY,
                        format!(
                            "hello for cluster {cluster}, this node is in {}",
                            self.cluster
                        ),
                    ),
                    Some((_, volume)) => {
                        let Some(route) = self.route_of(&volume).await else {
                            let refusal = format!("this node has no replica of volume {volume}");
                            return self.refuse(framed, CODE_IDENTITY, refusal).await;
                        };
                        let conn = self.next_conn.fetch_add(1, Ordering::Relaxed) + 1;
                        return hand(&route, framed, envelope, conn);
                    }
                }
            }
        };
        self.refuse(framed, refusal.0, refusal.1).await;
    }

    /// Where `volume`'s connections go; while the node starts, once the
    /// volume is routed (within [`HELLO_WAIT`]).
    async fn route_of(&self, volume: &str) -> Option<Route> {
        let mut registered = self.registered.subscribe();
        if let Some(route) = self.routes().get(volume).cloned() {
            return Some(route);
        }
        /// Counts a hello as held while it waits.
        struct Held<'a>(&'a AtomicU64);
        impl Drop for Held<'_> {
            fn drop(&mut self) {
                self.0.fetch_sub(1, Ordering::SeqCst);
            }
        }
        self.held.fetch_add(1, Ordering::SeqCst);
        let _held = Held(&self.held);
        let wait = async {
            loop {
                if let Some(route) = self.routes().get(volume).cloned() {
                    return Some(route);
                }
                if !self.starting.load(Ordering::SeqCst) {
                    return None;
                }
                registered.changed().await.ok()?;
            }
        };
        tokio::time::timeout(HELLO_WAIT, wait).await.ok().flatten()
    }

    async fn refuse<C: AsyncRead + AsyncWrite + Unpin>(
        &self,
        mut framed: Framed<C, WireCodec>,
        code: u16,
        message: String,
    ) {
        tracing::warn!(code, %message, "replication connection refused");
        let message = Message::Error { code, message };
        let _ = framed.send(Envelope { epoch: 0, message }).await;
        linger(&mut framed).await;
    }
}

/// What one connection receives for recoveries, under the runtime's
/// receive rate: catch-up and rebuild-tail batches (their session is not
/// 0), image chunks. Live batches never wait.
struct Received {
    budget: crate::recovery::RecoveryBudget,
    /// Held while the connection carries a recovery (for the floor): from
    /// its first recovery frame until live shipping begins (only the live
    /// loop sends heartbeats, barriers and batches of session 0, and it
    /// probes at once), a frame with no recovery in it a second after the
    /// last that had one, or the end.
    counted: Option<(crate::recovery::Counted, std::time::Instant)>,
}

impl Received {
    fn new(budget: crate::recovery::RecoveryBudget) -> Self {
        Self {
            budget,
            counted: None,
        }
    }

    /// The recovery bytes `envelope` carries: a catch-up or rebuild-tail
    /// batch's frames (session not 0), an image chunk's data.
    fn recovery_bytes(envelope: &Envelope) -> u64 {
        match &envelope.message {
            Message::WalBatch { session: 0, .. } => 0,
            Message::WalBatch { frames, .. } => frames.len() as u64,
            Message::RebuildChunk { data, .. } => data.len() as u64,
            _ => 0,
        }
    }

    /// Waits until `envelopes` may go to the receiver.
    async fn throttle(&mut self, envelopes: &[Envelope]) {
        let mut bytes = 0u64;
        for envelope in envelopes {
            if matches!(
                &envelope.message,
                Message::WalBatch { session: 0, .. }
                    | Message::Heartbeat { .. }
                    | Message::Barrier { .. }
            ) {
                self.counted = None;
            }
            bytes += Self::recovery_bytes(envelope);
        }
        let now = std::time::Instant::now();
        if bytes == 0 {
            let quiet = |(_, last): &(_, std::time::Instant)| {
                now.duration_since(*last) >= Duration::from_secs(1)
            };
            if self.counted.as_ref().is_some_and(quiet) {
                self.counted = None;
            }
            return;
        }
        match &mut self.counted {
            Some((_, last)) => *last = now,
            None => self.counted = Some((self.budget.receiving(), now)),
        }
        self.budget.throttle_received(bytes).await;
    }
}

async fn serve(
    mut framed: Conn,
    first: Option<Envelope>,
    receiver: MeteredAddr<ReceiverActor>,
    conn: u64,
    mut received: Received,
) {
    /// Frames handed to the receiver at once (they share one fsync).
    const DRAIN: usize = 64;
    let mut first = first.map(Ok);
    'conn: loop {
        let frame = match first.take() {
            Some(frame) => frame,
            None => match framed.next().await {
                Some(frame) => frame,
                None => break,
            },
        };
        let mut envelopes = Vec::new();
        let mut broken = None;
        match frame {
            Ok(envelope) => envelopes.push(envelope),
            Err(e) => broken = Some(e),
        }
        // Take whatever else is already here without waiting. Under a
        // receive rate a recovery frame ends the group: each waits its
        // turn and is answered before the next is read, so the sender
        // hears within a batch's time at the rate (a second at most, at
        // the lowest floor), not after a whole window's. Live frames
        // still share one fsync.
        let limited = received.budget.receive_limited();
        let ends = |envelopes: &[Envelope]| {
            limited
                && envelopes
                    .last()
                    .is_some_and(|e| Received::recovery_bytes(e) > 0)
        };
        while broken.is_none() && envelopes.len() < DRAIN && !ends(&envelopes) {
            match framed.next().now_or_never() {
                Some(Some(Ok(envelope))) => envelopes.push(envelope),
                Some(Some(Err(e))) => broken = Some(e),
                _ => break,
            }
        }
        if !envelopes.is_empty() {
            received.throttle(&envelopes).await;
            let Ok(reply) = receiver.send(Inbound { conn, envelopes }).await else {
                break;
            };
            for envelope in reply.send {
                if framed.send(envelope).await.is_err() {
                    break 'conn;
                }
            }
            if reply.close {
                linger(&mut framed).await;
                break;
            }
        }
        if let Some(e) = broken {
            receiver.metrics().reject();
            let message = Message::Error {
                code: CODE_WIRE,
                message: e.to_string(),
            };
            let _ = framed.send(Envelope { epoch: 0, message }).await;
            linger(&mut framed).await;
            break;
        }
    }
    receiver.do_send(ConnClosed(conn));
}
