//! A TCP relay between a primary and a replica, to misbehave on the wire
//! on cue: hold the replica's acks back, cut the primary's stream in the
//! middle of a frame, or pass it at a slow link's rate.

use std::sync::Arc;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinSet;

/// What the relay does to the traffic.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    /// Passes everything both ways.
    Pass,
    /// Holds the replica's replies back (in order, until passing again).
    HoldReplies,
    /// Forwards half of the next read from the primary that carries data (a
    /// WAL batch), then drops the connection at both ends.
    CutNextBulk,
    /// Cut: every new connection is dropped at once, until resumed.
    Down,
}

/// Reads from the primary larger than this carry data: heartbeats and
/// other control messages are tens of bytes.
const BULK: usize = 1024;

/// A TCP relay in front of a replica. Point the primary at [`Relay::addr`]
/// (a new endpoint for the replica). Its tasks end when it is dropped.
#[derive(Debug)]
pub struct Relay {
    /// Where the primary should connect instead of the replica.
    pub addr: String,
    mode: Arc<watch::Sender<Mode>>,
    /// Bytes per second the primary's stream passes at (`None`: as fast
    /// as it comes).
    rate: Arc<watch::Sender<Option<u64>>>,
    _tasks: JoinSet<()>,
}

impl Relay {
    /// Listens on a port of its own and relays each connection to `target`.
    pub async fn start(target: &str) -> std::io::Result<Self> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?.to_string();
        let mode = Arc::new(watch::Sender::new(Mode::Pass));
        let target = target.to_owned();
        let mut tasks = JoinSet::new();
        let modes = Arc::clone(&mode);
        let rate = Arc::new(watch::Sender::new(None));
        let rates = Arc::clone(&rate);
        tasks.spawn(async move {
            // Connection tasks end with the accept loop (the set drops).
            let mut connections = JoinSet::new();
            while let Ok((client, _)) = listener.accept().await {
                if *modes.borrow() == Mode::Down {
                    continue; // dropped: the primary sees a closed connection
                }
                // The replica not listening is the primary's to see too.
                let Ok(server) = TcpStream::connect(&target).await else {
                    continue;
                };
                connections.spawn(relay(client, server, Arc::clone(&modes), rates.subscribe()));
            }
        });
        Ok(Self {
            addr,
            mode,
            rate,
            _tasks: tasks,
        })
    }

    /// Holds the replica's replies back (true) or lets them through (false).
    pub fn hold_replies(&self, hold: bool) {
        self.mode
            .send_replace(if hold { Mode::HoldReplies } else { Mode::Pass });
    }

    /// Cuts the connection in the middle of the next WAL batch that
    /// carries data: the replica gets half of it, then the end of the
    /// stream. New connections are refused until [`resume`](Self::resume).
    pub fn cut_next_batch(&self) {
        self.mode.send_replace(Mode::CutNextBulk);
    }

    /// Whether the cut has happened.
    pub fn is_cut(&self) -> bool {
        *self.mode.borrow() == Mode::Down
    }

    /// Passes what the primary sends at `bytes_per_second` at most (a
    /// slow link), or as fast as it comes (`None`); applies at once to
    /// every connection.
    pub fn limit_rate(&self, bytes_per_second: Option<u64>) {
        self.rate.send_replace(bytes_per_second);
    }

    /// Passes everything again, and accepts connections.
    pub fn resume(&self) {
        self.mode.send_replace(Mode::Pass);
    }
}

/// Relays one connection until either side closes or the mode cuts it.
async fn relay(
    client: TcpStream,
    server: TcpStream,
    mode: Arc<watch::Sender<Mode>>,
    rate: watch::Receiver<Option<u64>>,
) {
    let (mut from_primary, mut to_primary) = client.into_split();
    let (mut from_replica, mut to_replica) = server.into_split();
    let requests = async {
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            let n = from_primary.read(&mut buf).await?;
            if n == 0 {
                return Ok::<(), std::io::Error>(());
            }
            if n > BULK && *mode.borrow() == Mode::CutNextBulk {
                to_replica.write_all(&buf[..n / 2]).await?;
                to_replica.flush().await?;
                mode.send_replace(Mode::Down);
                return Ok(());
            }
            // A slow link: what was read passes after its time at the
            // rate (reads are at most 64 KiB, so it flows, not bursts).
            let limit = *rate.borrow();
            if let Some(limit) = limit.filter(|r| *r > 0) {
                let time = std::time::Duration::from_secs_f64(n as f64 / limit as f64);
                tokio::time::sleep(time).await;
            }
            to_replica.write_all(&buf[..n]).await?;
        }
    };
    let replies = async {
        let mut held = mode.subscribe();
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            let n = from_replica.read(&mut buf).await?;
            if n == 0 {
                return Ok::<(), std::io::Error>(());
            }
            while *held.borrow_and_update() == Mode::HoldReplies {
                if held.changed().await.is_err() {
                    return Ok(());
                }
            }
            to_primary.write_all(&buf[..n]).await?;
        }
    };
    // Whichever ends first ends both: the halves drop, the sockets close.
    tokio::select! {
        _ = requests => {}
        _ = replies => {}
    }
}
