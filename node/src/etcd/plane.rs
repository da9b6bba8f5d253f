//! The node's membership, kept through lost sessions: what every session
//! shares ([`Plane`]), how one starts and how a node rejoins after one was
//! lost, and the supervisor that rejoins until it can.

use super::*;

/// What every session of the node with etcd shares: the client (it
/// reconnects on its own), where and who the node is, its fence.
#[derive(Clone)]
pub(super) struct Plane {
    pub(super) client: Client,
    pub(super) options: EtcdOptions,
    pub(super) cluster: String,
    /// This node's name.
    pub(super) node: String,
    /// This node's registration (not yet ready).
    pub(super) entry: NodeRecord,
    pub(super) fence: Arc<WriteFence>,
}

impl Plane {
    pub(super) fn failed(&self) -> impl Fn(etcd_client::Error) -> EtcdError + '_ {
        |source| EtcdError::Client {
            endpoints: self.options.endpoints.join(","),
            source,
        }
    }

    /// The lease asked for: etcd grants whole seconds, at least its
    /// minimum (1.5 election timeouts: 2 s by default); renewals follow
    /// what it granted.
    pub(super) fn asked(&self) -> i64 {
        self.options.lease_ttl.as_millis().div_ceil(1000).max(1) as i64
    }

    /// Registers the node on `lease` (`ready`: its volumes open and in
    /// line with their records), and its replication address, kept after
    /// the lease (a lost primary is added back at it; its revision marks
    /// this start).
    pub(super) async fn register(&self, lease: i64, ready: bool) -> Result<(), EtcdError> {
        let mut client = self.client.clone();
        let entry = NodeRecord {
            ready,
            ..self.entry.clone()
        };
        let with_lease = Some(PutOptions::new().with_lease(lease));
        let key = node_key(&self.cluster, &self.node);
        client
            .put(key, serde_json::to_vec(&entry)?, with_lease)
            .await
            .map_err(self.failed())?;
        if !ready {
            let address = address_key(&self.cluster, &self.node);
            client
                .put(address, self.entry.replication.clone(), None)
                .await
                .map_err(self.failed())?;
        }
        Ok(())
    }

    /// Follows `node`'s volumes from `revision` on, reports, campaigns for
    /// the controller's seat, and says the node serves: the session on
    /// `lease`, whose renewals `keeping` already runs.
    pub(super) async fn serve(
        &self,
        node: &Arc<Node>,
        (lease, ttl, keeping): (i64, Duration, Task),
        revision: i64,
    ) -> Result<Session, EtcdError> {
        match self.start(node, (lease, ttl), revision).await {
            Ok((watching, reporting, controlling)) => {
                let session = Session {
                    lease,
                    keeping,
                    watching,
                    reporting,
                    controlling,
                };
                // Serving: the registration says so.
                match self.register(lease, true).await {
                    Ok(()) => Ok(session),
                    Err(e) => {
                        session.abort().await;
                        Err(e)
                    }
                }
            }
            Err(e) => {
                keeping.abort().await;
                Err(e)
            }
        }
    }

    /// The follower, the reporter and the controller's campaign of the
    /// session on `lease`.
    pub(super) async fn start(
        &self,
        node: &Arc<Node>,
        (lease, ttl): (i64, Duration),
        revision: i64,
    ) -> Result<(Task, Task, Task), EtcdError> {
        let mut client = self.client.clone();
        let watch_prefix = format!("{}volumes/", prefix(&self.cluster));
        let records = Feed::open(&client, watch_prefix.clone(), revision + 1)
            .await
            .map_err(self.failed())?;
        // The decisions and probes so far, then every later one.
        let (probes_tx, probes) = watch::channel(BTreeMap::new());
        let notes = Notes {
            decisions: format!("{}decisions/", prefix(&self.cluster)),
            probes: probe_key(&self.cluster, ""),
            node: Arc::clone(node),
            probes_tx,
        };
        let decisions = notes_feed(&mut client, &notes, notes.decisions.clone())
            .await
            .map_err(self.failed())?;
        let probes_feed = notes_feed(&mut client, &notes, notes.probes.clone())
            .await
            .map_err(self.failed())?;
        let watching = Task::spawn({
            let node = Arc::clone(node);
            move |stopped| {
                follow(
                    node,
                    (records, watch_prefix),
                    (notes, decisions, probes_feed),
                    stopped,
                )
            }
        });
        let reporting = Task::spawn({
            let (client, cluster, node) = (client.clone(), self.cluster.clone(), Arc::clone(node));
            let every = self.options.progress_every;
            move |stopped| reporter::report(client, (cluster, every), node, probes, stopped)
        });
        let controlling = Task::spawn({
            let (client, cluster) = (client.clone(), self.cluster.clone());
            let me = node.name().to_owned();
            move |stopped| controller::control(client, cluster, me, (lease, ttl), stopped)
        });
        Ok((watching, reporting, controlling))
    }

    /// A new session after one was lost (the node's writes fenced since):
    /// a new lease, the node registered again (the old lease revoked: its
    /// controller candidacy goes with it), every hosted volume's record
    /// read and applied (primary again only if the record still names
    /// this node, else a replica of the one it names), and only then the
    /// fence renewed and the session served.
    pub(super) async fn rejoin(&self, node: &Arc<Node>, old: i64) -> Result<Session, EtcdError> {
        let mut client = self.client.clone();
        let granted = client
            .lease_grant(self.asked(), None)
            .await
            .map_err(self.failed())?;
        let (lease, ttl) = (
            granted.id(),
            Duration::from_secs(granted.ttl().max(1) as u64),
        );
        // Given up if this attempt fails: no registration outlives it.
        let mut guard = LeaseGuard(Some((client.clone(), lease)));
        self.register(lease, false).await?;
        let _ = tokio::time::timeout(STOP_GRACE, client.lease_revoke(old)).await;
        let revision = resync(&mut client, &self.cluster, node).await?;
        // The first renewal after the records are applied opens the fence.
        // A stream's answer has no request timeout: bounded by the lease.
        let sent = Instant::now();
        let renewal = async {
            let (mut keeper, mut renewed) = client.lease_keep_alive(lease).await?;
            keeper.keep_alive().await?;
            let answer = renewed.message().await?;
            Ok((keeper, renewed, answer))
        };
        let unanswered =
            || etcd_client::Error::LeaseKeepAliveError("no answer within the lease".into());
        let (keeper, renewed, answer) = tokio::time::timeout(ttl, renewal)
            .await
            .unwrap_or_else(|_| Err(unanswered()))
            .map_err(self.failed())?;
        let Some(answer) = answer.filter(|a| a.ttl() > 0) else {
            return Err(EtcdError::Record {
                key: node_key(&self.cluster, &self.node),
                what: format!("lease {lease} expired before the node rejoined"),
            });
        };
        self.fence
            .renewed(sent, Duration::from_secs(answer.ttl() as u64));
        let keeping = Task::spawn({
            let (client, fence) = (client.clone(), Arc::clone(&self.fence));
            move |stopped| keep(lease, ttl, client, (keeper, renewed), fence, stopped)
        });
        // The fence is open from here: an attempt that fails now holds it
        // again before its lease is revoked (`serve` has ended its
        // renewals), or the controller could promote another node while
        // this one still acknowledges.
        match self.serve(node, (lease, ttl, keeping), revision).await {
            Ok(session) => {
                guard.0 = None;
                Ok(session)
            }
            Err(e) => {
                self.fence.hold();
                Err(e)
            }
        }
    }
}

/// Revokes a lease granted by an attempt that failed.
struct LeaseGuard(Option<(Client, i64)>);

impl Drop for LeaseGuard {
    fn drop(&mut self) {
        if let Some((mut client, lease)) = self.0.take() {
            tokio::spawn(async move {
                let _ = tokio::time::timeout(STOP_GRACE, client.lease_revoke(lease)).await;
            });
        }
    }
}

/// How soon a node whose session was lost tries to rejoin, at first; each
/// failed attempt doubles it, up to [`REJOIN_AT_MOST`].
const REJOIN_FIRST: Duration = Duration::from_millis(200);
/// The longest wait between two attempts to rejoin.
const REJOIN_AT_MOST: Duration = Duration::from_secs(5);

/// Keeps the node in the cluster: when its session ends on its own (or
/// never started: `current` empty, on lease `first`), fences the node's
/// writes, ends the session, and rejoins until it can.
pub(super) async fn supervise(
    plane: Plane,
    node: Arc<Node>,
    (current, first): (Arc<tokio::sync::Mutex<Option<Session>>>, i64),
    mut stopped: watch::Receiver<bool>,
) -> Option<String> {
    let mut session = current.lock().await;
    let mut old = first;
    loop {
        if let Some(live) = session.as_mut() {
            let why = tokio::select! {
                () = stopping(&mut stopped) => return None,
                why = live.ended() => why,
            };
            old = live.lease;
            // Every task of the lost session ends here, its renewals
            // first: none moves the fence once it is held.
            if let Some(lost) = session.take() {
                lost.abort().await;
            }
            tracing::error!(
                why,
                "etcd: session lost; writes fenced until this node rejoins"
            );
        }
        plane.fence.hold();
        let lost = Instant::now();
        let mut wait = REJOIN_FIRST;
        let rejoined = loop {
            let attempt = tokio::select! {
                () = stopping(&mut stopped) => return None,
                attempt = plane.rejoin(&node, old) => attempt,
            };
            match attempt {
                Ok(rejoined) => break rejoined,
                Err(e) => tracing::warn!(error = %e, "etcd: not rejoined yet; trying again"),
            }
            tokio::select! {
                () = stopping(&mut stopped) => return None,
                () = tokio::time::sleep(wait) => {}
            }
            wait = (wait * 2).min(REJOIN_AT_MOST);
        };
        tracing::info!(
            lease = rejoined.lease,
            after_ms = lost.elapsed().as_millis() as u64,
            "etcd: rejoined; serving as the records say"
        );
        old = rejoined.lease;
        *session = Some(rejoined);
    }
}
