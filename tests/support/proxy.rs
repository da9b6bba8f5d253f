//! A TCP proxy the test controls: it forwards to a target until paused,
//! then holds every byte (a partition, not a reset: connections stay open,
//! nothing arrives either way); or, cut, it closes every connection and
//! refuses new ones until restored (a reset).

#![allow(dead_code)]

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinSet;

/// A running proxy; its tasks end when it is dropped.
pub struct Proxy {
    /// Where clients connect.
    pub addr: SocketAddr,
    paused: Arc<watch::Sender<bool>>,
    cut: Arc<watch::Sender<bool>>,
    refused: Arc<AtomicUsize>,
    tasks: JoinSet<()>,
}

impl Proxy {
    /// Forwards 127.0.0.1:<a free port> to `target`.
    pub async fn start(target: SocketAddr) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("local addr");
        let paused = Arc::new(watch::channel(false).0);
        let cut = Arc::new(watch::channel(false).0);
        let refused = Arc::new(AtomicUsize::new(0));
        let mut tasks = JoinSet::new();
        let (gate, cutter, refusals) =
            (Arc::clone(&paused), Arc::clone(&cut), Arc::clone(&refused));
        tasks.spawn(async move {
            let mut pumps = JoinSet::new();
            while let Ok((client, _)) = listener.accept().await {
                if *cutter.borrow() {
                    refusals.fetch_add(1, Ordering::SeqCst);
                    continue; // dropped: closed at once
                }
                let Ok(server) = TcpStream::connect(target).await else {
                    continue;
                };
                let (client_read, client_write) = client.into_split();
                let (server_read, server_write) = server.into_split();
                let way = |c: &Arc<watch::Sender<bool>>| (gate.subscribe(), c.subscribe());
                pumps.spawn(pump(client_read, server_write, way(&cutter)));
                pumps.spawn(pump(server_read, client_write, way(&cutter)));
            }
        });
        Self {
            addr,
            paused,
            cut,
            refused,
            tasks,
        }
    }

    /// How many connections a cut closed as they came.
    pub fn refused(&self) -> usize {
        self.refused.load(Ordering::SeqCst)
    }

    /// Stops forwarding: what is read is held, nothing is written.
    pub fn pause(&self) {
        self.paused.send_replace(true);
    }

    /// Closes every connection and refuses new ones until
    /// [`restore`](Self::restore).
    pub fn cut(&self) {
        self.cut.send_replace(true);
    }

    /// Accepts and forwards again after a [`cut`](Self::cut) or a
    /// [`pause`](Self::pause). (What a pause held is dropped by a cut
    /// before: a dead client's requests are not delivered late.)
    pub fn restore(&self) {
        self.cut.send_replace(false);
        self.paused.send_replace(false);
    }
}

async fn pump(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    (mut paused, mut cut): (watch::Receiver<bool>, watch::Receiver<bool>),
) {
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        // Cut: both halves dropped, the connection closed.
        let n = tokio::select! {
            _ = cut.wait_for(|cut| *cut) => return,
            read = from.read(&mut buf) => match read {
                Ok(0) | Err(_) => return,
                Ok(n) => n,
            },
        };
        // Held while paused; dropped if cut meanwhile.
        tokio::select! {
            _ = cut.wait_for(|cut| *cut) => return,
            unpaused = paused.wait_for(|paused| !*paused) => if unpaused.is_err() {
                return;
            },
        }
        if to.write_all(&buf[..n]).await.is_err() {
            return;
        }
    }
}
