//! The node's session with etcd: the client, the lease kept alive (its
//! renewals hold the node's write fence), and the tasks the control plane
//! runs beside the node.

use crate::fence::WriteFence;
use etcd_client::{Client, ConnectOptions};
use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::watch;
use tokio::task::JoinHandle;

/// How soon a broken watch or renewal stream is opened again.
pub(super) const REOPEN_EVERY: Duration = Duration::from_millis(200);

/// Resolves once a stop is asked for on `stopped` (or its sender is
/// gone): the first branch of each task's `select!`.
pub(super) async fn stopping(stopped: &mut watch::Receiver<bool>) {
    let _ = stopped.wait_for(|stop| *stop).await;
}

/// A client of `endpoints`. HTTP/2 pings every 5 s (etcd's least
/// interval it tolerates: `--grpc-keepalive-min-time`) tear down a
/// connection that went silent (blackholed), so the channel reconnects
/// instead of holding every request until its timeout.
pub(super) async fn client(endpoints: &[String]) -> Result<Client, etcd_client::Error> {
    let connect = ConnectOptions::new()
        .with_connect_timeout(Duration::from_secs(3))
        .with_timeout(Duration::from_secs(5))
        .with_keep_alive(Duration::from_secs(5), Duration::from_secs(3));
    Client::connect(endpoints, Some(connect)).await
}

/// Whether `e` says etcd did not answer (not up yet, unreachable), rather
/// than that it refused (a bad endpoint, a bad request).
pub(super) fn not_answering(e: &etcd_client::Error) -> bool {
    match e {
        etcd_client::Error::TransportError(_) | etcd_client::Error::IoError(_) => true,
        // A connection refused, reset or closed under the request comes as
        // a status (Unavailable, Unknown, Cancelled) over a transport error.
        etcd_client::Error::GRpcStatus(status) => {
            matches!(
                status.code(),
                tonic::Code::Unavailable | tonic::Code::DeadlineExceeded
            ) || std::error::Error::source(status)
                .is_some_and(|source| source.is::<tonic::transport::Error>())
        }
        _ => false,
    }
}

/// How long a starting node tries to reach etcd before it gives up (an
/// attempt under way when it runs out is finished: up to 8 s more).
pub const CONNECT_PATIENCE: Duration = Duration::from_secs(30);
/// How soon it tries again.
pub(super) const CONNECT_RETRY: Duration = Duration::from_millis(500);

/// How long a stop waits for a task or a revocation: etcd may be out of
/// reach, which is often why the node is stopping.
pub(super) const STOP_GRACE: Duration = Duration::from_secs(1);

/// A task of the control plane: stopped on request, or ending on its own
/// with the reason.
#[derive(Debug)]
pub(super) struct Task {
    stop: watch::Sender<bool>,
    handle: JoinHandle<()>,
    ended: watch::Receiver<Option<String>>,
}

impl Drop for Task {
    /// A task not stopped (a failed start) does not outlive its owner.
    fn drop(&mut self) {
        self.handle.abort();
    }
}

impl Task {
    pub(super) fn spawn<F, Fut>(body: F) -> Self
    where
        F: FnOnce(watch::Receiver<bool>) -> Fut,
        Fut: std::future::Future<Output = Option<String>> + Send + 'static,
    {
        let (stop, stopped) = watch::channel(false);
        let (ended_tx, ended) = watch::channel(None);
        let body = body(stopped);
        let handle = tokio::spawn(async move {
            let why = body.await;
            if let Some(why) = &why {
                tracing::warn!(why, "etcd: a task of the control plane ended");
            }
            ended_tx.send_replace(why);
        });
        Self {
            stop,
            handle,
            ended,
        }
    }

    /// Why it ended on its own, once it has.
    pub(super) async fn ended(&mut self) -> String {
        match self.ended.wait_for(Option::is_some).await {
            Ok(why) => why.clone().unwrap_or_default(),
            Err(_) => "the control plane's task ended".into(),
        }
    }

    /// Ends it at once, and waits until it has: nothing it does (a
    /// renewal moving the fence) happens after this returns.
    pub(super) async fn abort(mut self) {
        self.handle.abort();
        let _ = (&mut self.handle).await;
    }

    /// Stops it; a task still inside a request to an etcd it cannot reach
    /// after [`STOP_GRACE`] is dropped there.
    pub(super) async fn stop(mut self) {
        self.stop.send_replace(true);
        match tokio::time::timeout(STOP_GRACE, &mut self.handle).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => tracing::warn!(error = %e, "etcd task"),
            Err(_) => self.handle.abort(),
        }
    }
}

/// Renews the lease at a third of its time to live; each renewal etcd
/// grants moves the write fence on. A broken renewal stream is opened
/// again; ends when the fence lapses (no renewal granted within the
/// lease: a partition from etcd, or etcd away too long) or etcd says the
/// lease is gone.
pub(super) async fn keep(
    lease: i64,
    ttl: Duration,
    mut client: Client,
    renewals: (etcd_client::LeaseKeeper, etcd_client::LeaseKeepAliveStream),
    fence: Arc<WriteFence>,
    mut stopped: watch::Receiver<bool>,
) -> Option<String> {
    let mut renew = tokio::time::interval(ttl / 3);
    // When each renewal still unanswered on this stream was sent.
    let mut sent: VecDeque<Instant> = VecDeque::new();
    let mut stream = Some(renewals);
    let mut trouble = String::new();
    // Noticed when the fence lapses, whatever the renewals wait for: a
    // connection blackholed (no reset) holds a request until the client's
    // timeout, longer than a short lease.
    let lost = |trouble: &str| {
        let why = if trouble.is_empty() {
            String::new()
        } else {
            format!(" ({trouble})")
        };
        Some(format!(
            "lease {lease} not renewed within its time to live{why}: writes fenced"
        ))
    };
    loop {
        // A broken stream (etcd restarting) is opened again for as long as
        // the lease may be alive: the fence says until when.
        let Some((keeper, renewed)) = stream.as_mut() else {
            let reopened = tokio::select! {
                () = stopping(&mut stopped) => return None,
                () = fence.lapsed() => return lost(&trouble),
                reopened = async {
                    tokio::time::sleep(REOPEN_EVERY).await;
                    client.lease_keep_alive(lease).await
                } => reopened,
            };
            match reopened {
                Ok(reopened) => {
                    tracing::info!(lease, "etcd: renewals resumed");
                    sent.clear();
                    stream = Some(reopened);
                    renew.reset_immediately();
                }
                Err(e) => trouble = format!("renewals not resumed: {e}"),
            }
            continue;
        };
        tokio::select! {
            () = stopping(&mut stopped) => return None,
            () = fence.lapsed() => return lost(&trouble),
            _ = renew.tick() => {
                let at = Instant::now();
                match keeper.keep_alive().await {
                    Ok(()) => sent.push_back(at),
                    Err(e) => {
                        trouble = format!("renewal not sent: {e}");
                        tracing::warn!(lease, error = %e, "etcd: renewal not sent; reopening");
                        stream = None;
                    }
                }
            }
            answer = renewed.message() => match answer {
                Ok(Some(answer)) if answer.ttl() > 0 => {
                    // Answers come in the order of the renewals.
                    if let Some(at) = sent.pop_front() {
                        fence.renewed(at, Duration::from_secs(answer.ttl() as u64));
                    }
                }
                Ok(Some(_)) => {
                    // Gone at etcd: another node may be promoted now.
                    fence.hold();
                    return Some(format!("lease {lease} expired"));
                }
                Ok(None) => {
                    trouble = "renewals closed".into();
                    tracing::warn!(lease, "etcd: renewals closed; reopening");
                    stream = None;
                }
                Err(e) => {
                    trouble = format!("renewal failed: {e}");
                    tracing::warn!(lease, error = %e, "etcd: renewal failed; reopening");
                    stream = None;
                }
            },
        }
    }
}

/// One session of the node with etcd, on one lease: its renewals, the
/// follower, the reporter and the controller's campaign. Aborted, every
/// task ends at once (a lost session); stopped, each is given
/// [`STOP_GRACE`] and the lease is revoked.
pub(super) struct Session {
    /// Its lease.
    pub(super) lease: i64,
    pub(super) keeping: Task,
    pub(super) watching: Task,
    pub(super) reporting: Task,
    pub(super) controlling: Task,
}

impl Session {
    /// Why it ended on its own: its lease not renewed in time, a watch
    /// that cannot resume, the controller's election.
    pub(super) async fn ended(&mut self) -> String {
        tokio::select! {
            why = self.keeping.ended() => why,
            why = self.watching.ended() => why,
            why = self.controlling.ended() => why,
        }
    }

    /// Ends every task at once (a lost session), and waits until each
    /// has: no renewal of this session moves the fence afterwards.
    pub(super) async fn abort(self) {
        self.keeping.abort().await;
        self.watching.abort().await;
        self.reporting.abort().await;
        self.controlling.abort().await;
    }

    /// Stops every task, then revokes the lease (the node's entry goes at
    /// once, not a lease later).
    pub(super) async fn stop(self, mut client: Client) {
        let Self {
            lease,
            keeping,
            watching,
            reporting,
            controlling,
        } = self;
        controlling.stop().await;
        reporting.stop().await;
        watching.stop().await;
        keeping.stop().await;
        let revoked = tokio::time::timeout(STOP_GRACE, client.lease_revoke(lease)).await;
        if !matches!(revoked, Ok(Ok(_))) {
            tracing::warn!(lease, "etcd: lease not revoked (it expires)");
        }
    }
}
