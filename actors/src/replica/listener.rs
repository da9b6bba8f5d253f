//! The replica's listener: accepts connections and runs one task per
//! connection that decodes frames, asks the receiver what to answer, and
//! sends it.

use super::receiver::{ConnClosed, Inbound, ReceiverActor};
use crate::metrics::MeteredAddr;
use crate::transport::{self, linger};
use futures::{FutureExt, SinkExt, StreamExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio_util::task::TaskTracker;
use walship_io::{Envelope, Message, CODE_WIRE};

/// Accepts connections until `shutdown` turns true. The loop and every
/// connection task it starts are tracked by `tasks`, and every connection
/// closes at shutdown, so the replica's stop can wait for all of them.
pub(crate) async fn accept_loop(
    listener: TcpListener,
    receiver: MeteredAddr<ReceiverActor>,
    shutdown: watch::Receiver<bool>,
    tasks: TaskTracker,
) {
    let mut next_conn = 0u64;
    let mut stop = shutdown.clone();
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => {
                    next_conn += 1;
                    let connection = serve(stream, receiver.clone(), next_conn);
                    let mut stop = shutdown.clone();
                    actix::spawn(tasks.track_future(async move {
                        tokio::select! {
                            () = connection => {}
                            _ = stop.wait_for(|stopped| *stopped) => {}
                        }
                    }));
                }
                Err(e) => tracing::warn!(error = %e, "accept failed"),
            },
            _ = stop.wait_for(|stopped| *stopped) => return,
        }
    }
}

async fn serve(stream: TcpStream, receiver: MeteredAddr<ReceiverActor>, conn: u64) {
    /// Frames handed to the receiver at once (they share one fsync).
    const DRAIN: usize = 64;
    let _ = stream.set_nodelay(true);
    let mut framed = transport::framed(stream);
    'conn: while let Some(frame) = framed.next().await {
        let mut envelopes = Vec::new();
        let mut broken = None;
        match frame {
            Ok(envelope) => envelopes.push(envelope),
            Err(e) => broken = Some(e),
        }
        // Take whatever else is already here without waiting.
        while broken.is_none() && envelopes.len() < DRAIN {
            match framed.next().now_or_never() {
                Some(Some(Ok(envelope))) => envelopes.push(envelope),
                Some(Some(Err(e))) => broken = Some(e),
                _ => break,
            }
        }
        if !envelopes.is_empty() {
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
