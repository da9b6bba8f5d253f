//! A TCP relay in front of a replica, to hold its acks back on the wire.

/// A TCP relay in front of a replica whose replies to the primary can be
/// held back (and later let through, in order), to delay acks on the wire.
#[derive(Debug)]
pub struct Relay {
    /// Where the primary should connect instead of the replica.
    pub addr: String,
    hold: tokio::sync::watch::Sender<bool>,
}

impl Relay {
    /// Listens on a port of its own and relays each connection to `target`.
    pub async fn start(target: &str) -> std::io::Result<Self> {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?.to_string();
        let (hold, hold_rx) = tokio::sync::watch::channel(false);
        let target = target.to_owned();
        tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let Ok(server) = tokio::net::TcpStream::connect(&target).await else {
                    continue;
                };
                let mut held = hold_rx.clone();
                tokio::spawn(async move {
                    let (mut from_primary, mut to_primary) = client.into_split();
                    let (mut from_replica, mut to_replica) = server.into_split();
                    let requests = tokio::io::copy(&mut from_primary, &mut to_replica);
                    let replies = async {
                        let mut buf = vec![0u8; 64 * 1024];
                        loop {
                            let n = from_replica.read(&mut buf).await?;
                            if n == 0 {
                                return Ok::<(), std::io::Error>(());
                            }
                            while *held.borrow_and_update() {
                                if held.changed().await.is_err() {
                                    return Ok(());
                                }
                            }
                            to_primary.write_all(&buf[..n]).await?;
                        }
                    };
                    tokio::select! {
                        _ = requests => {}
                        _ = replies => {}
                    }
                });
            }
        });
        Ok(Self { addr, hold })
    }

    /// Holds the replica's replies back (true) or lets them through (false).
    pub fn hold_replies(&self, hold: bool) {
        self.hold.send_replace(hold);
    }
}
