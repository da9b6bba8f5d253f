//! What the node's servers (NBD, admin HTTP) share: an accept loop that
//! runs each connection as a tracked task, and a stop that returns once
//! every connection has ended. Each connection hears the stop through the
//! `watch` it is given and decides how to end (answer what it read, let a
//! response finish).

use std::future::Future;
use std::net::SocketAddr;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio_util::task::TaskTracker;

/// A listener's accept loop and its connections.
#[derive(Debug)]
pub(crate) struct Serving {
    local: SocketAddr,
    stop: watch::Sender<bool>,
    tasks: TaskTracker,
}

impl Serving {
    /// Accepts on `listener` until stopped, running `connection(stream,
    /// peer, stopped)` for each client.
    pub(crate) fn start<F, Fut>(
        what: &'static str,
        listener: TcpListener,
        connection: F,
    ) -> std::io::Result<Self>
    where
        F: Fn(TcpStream, SocketAddr, watch::Receiver<bool>) -> Fut + Send + 'static,
        Fut: Future<Output = ()> + Send + 'static,
    {
        let local = listener.local_addr()?;
        let (stop, stopped) = watch::channel(false);
        let tasks = TaskTracker::new();
        let accepting = tasks.clone();
        tasks.spawn(async move {
            let mut stop = stopped.clone();
            loop {
                tokio::select! {
                    accepted = listener.accept() => match accepted {
                        Ok((stream, peer)) => {
                            accepting.spawn(connection(stream, peer, stopped.clone()));
                        }
                        Err(e) => tracing::warn!(error = %e, "{what} accept failed"),
                    },
                    _ = stop.wait_for(|stop| *stop) => return,
                }
            }
        });
        Ok(Self { local, stop, tasks })
    }

    /// Where it listens.
    pub(crate) fn local_addr(&self) -> SocketAddr {
        self.local
    }

    /// Stops accepting, tells every connection, and returns once the last
    /// one has ended.
    pub(crate) async fn stop(&self) {
        self.stop.send_replace(true);
        self.tasks.close();
        self.tasks.wait().await;
    }
}
