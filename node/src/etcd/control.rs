//! Progress reports and the controller.
//!
//! **Progress.** A primary writes `progress/<volume>` (no lease: it must
//! outlive the primary) when it changes: its epoch, its committed LSN, and
//! each replica's flushed LSN and state as it sees them. LSNs move with
//! every write and are written at most every [`PROGRESS_EVERY`] (or
//! `--etcd-progress-ms`); a change of the replicas' states is written at
//! once, so that a primary lost right after one is judged by it. Each replica writes its own
//! view the same way, `replicas/<volume>/<node>`: the epoch it accepts,
//! its durable LSN, whether a primary is connected to it, and the last
//! probe it answered. The controller judges a dead primary's replicas by
//! both, without talking to the dead.
//!
//! **Controller.** Every node campaigns in an etcd election on its lease;
//! the leader, alone, looks at the records every [`CONTROL_EVERY`]. A
//! volume whose primary's node entry is gone (its lease expired; a node
//! that never registered, absent for two lease times) gets the engine's
//! promotion rules over its replicas: every rejection reason is
//! recorded, the best eligible replica becomes primary in the next epoch,
//! the old primary waits under `departed` (sync_all) or stays a replica
//! (the other modes) and rejoins as one when it is back, in one
//! transaction that holds only if the record is unchanged since it was
//! read, the lost primary still unregistered and this node still the
//! controller (a stale controller's fails). The decision and its
//! reasons go to `decisions/<volume>`, which each node hosting the volume
//! shows in its status. No eligible replica: the volume stays down, with
//! the reasons; once its primary registers again in that epoch, a later
//! pass marks the decision over. The desperate path is never taken here,
//! and a best_effort volume is never promoted here: its primary
//! acknowledged writes on its own durability, so none of its replicas can
//! be known to hold them all (an operator's promotion says what it gives
//! up).
//!
//! How fresh the judgement is. The primary's report (the committed LSN,
//! each replica's state) is as old as its last write, up to a lease old
//! for a primary cut off from etcd, which acknowledges until its fence
//! lapses; it counts only for the record's primary and epoch (a promotion
//! writes the new primary's first one). A replica's durable LSN and
//! epoch come from its own report, and only from one written after the
//! controller's probe (`probes/<volume>`, written once the lost primary's
//! lease has ended, so after its last acknowledgement; each node answers
//! a probe about a volume it hosts at once). Then the best-ranked, the
//! highest durable LSN, holds every committed write if any live replica
//! does: under sync_all every in-sync replica holds them (nothing commits
//! while one is out of sync); under sync_quorum a write is committed on a
//! majority of members, so the controller promotes only when enough
//! replicas answered that every majority includes one of them, and
//! judges against the highest durable LSN among those in the epoch. A
//! live replica that has not answered is rejected for that; the volume's
//! "down" decision is written only once the primary has been lost for a
//! lease time (answers take milliseconds).

use super::{node_key, parse, prefix, stopping, volume_key, VolumeRecord};
use crate::assignment::Applied;
use crate::node::Node;
use etcd_client::{Client, Compare, CompareOp, GetOptions, Txn, TxnOp};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::watch;
use walship_actors::NodeStatus;
use walship_engine::{
    evaluate_promotion, select_desperate, CommitMode, DataLossAccepted, Epoch, Ineligibility, Lsn,
    PromotionCandidate, ReplicaId, ReplicaState, Tick,
};

/// How often a primary's progress (its LSNs) may be written by default;
/// its replicas' state changes are written at once.
pub const PROGRESS_EVERY: Duration = Duration::from_millis(250);
/// How often the elected controller looks at the records.
pub const CONTROL_EVERY: Duration = Duration::from_millis(250);
/// How soon it looks again while replicas have yet to answer its probe.
pub const ANSWER_EVERY: Duration = Duration::from_millis(20);

/// One replica as its primary last reported it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReplicaProgress {
    /// Its durable LSN.
    pub flushed: u64,
    /// Its state (`in_sync`, `catching_up`...).
    pub state: String,
}

/// A primary's report of its volume.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProgressRecord {
    /// The epoch of the assignment it is primary in.
    pub epoch: u64,
    /// The reporting node.
    pub primary: String,
    /// Its committed LSN.
    pub committed: u64,
    /// Its replicas by node name.
    pub replicas: BTreeMap<String, ReplicaProgress>,
}

/// A replica's own report of its volume (`replicas/<volume>/<node>`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReplicaReport {
    /// The epoch of the term it accepts.
    pub epoch: u64,
    /// That term (`epoch << 20 | the primary's incarnation`).
    pub term: u64,
    /// Its durable LSN.
    pub durable: u64,
    /// Whether a primary is connected to it.
    pub connected: bool,
    /// The revision of the last probe of the controller's about this
    /// volume it has seen: this report was written after it.
    #[serde(default)]
    pub answered: i64,
}

/// The controller's question to a lost primary's replicas
/// (`probes/<volume>`): each answers with a fresh report.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Probe {
    /// The epoch whose primary was lost.
    pub epoch: u64,
    /// That primary.
    pub lost_primary: String,
    /// The revision of its last start (its address key's, rewritten at
    /// each): a primary back and lost again in the same epoch is a new
    /// loss, asked again.
    pub registered: i64,
}

/// A controller's decision about a volume whose primary was lost.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Decision {
    /// The epoch whose primary was lost.
    pub epoch: u64,
    /// That primary.
    pub lost_primary: String,
    /// The committed LSN the candidates were judged against.
    pub committed: u64,
    /// The node promoted, in `epoch + 1`; `None`: the volume stays down.
    pub promoted: Option<String>,
    /// Every candidate rejected, with every reason.
    pub rejected: BTreeMap<String, Vec<String>>,
    /// Why nobody was promoted although a candidate was eligible (too few
    /// replicas answered for a sync_quorum volume).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub blocked: Option<String>,
    /// On the desperate path (an operator's), what was lost.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub data_loss: Option<DataLoss>,
    /// The controller that decided.
    pub by: String,
    /// For a volume left down: why that is over (its primary registered
    /// again in the same epoch), written by a later controller's pass.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub over: Option<String>,
}

/// Committed writes an operator's promotion gave up.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DataLoss {
    /// The promoted replica holds committed LSNs up to this one.
    pub after: u64,
    /// The last committed LSN reported: `(after, through]` is lost.
    pub through: u64,
    /// The promotion rules waived for it.
    pub waived: Vec<String>,
    /// What may be lost besides, that no report shows: under best_effort,
    /// writes the lost primary acknowledged after its last report.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub beyond: Option<String>,
}

/// The key of a volume's progress report.
pub fn progress_key(cluster: &str, volume: &str) -> String {
    format!("{}progress/{volume}", prefix(cluster))
}

/// The key of a replica's own report of a volume.
pub fn replica_report_key(cluster: &str, volume: &str, node: &str) -> String {
    format!("{}replicas/{volume}/{node}", prefix(cluster))
}

/// The key of the controller's probe of a volume's replicas.
pub fn probe_key(cluster: &str, volume: &str) -> String {
    format!("{}probes/{volume}", prefix(cluster))
}

/// The key of the last decision about a volume.
pub fn decision_key(cluster: &str, volume: &str) -> String {
    format!("{}decisions/{volume}", prefix(cluster))
}

/// The key of a node's replication address, kept after its lease goes (a
/// lost primary is put back as a replica at it).
pub fn address_key(cluster: &str, node: &str) -> String {
    format!("{}addresses/{node}", prefix(cluster))
}

/// Writes each hosted volume's report when it changed: a primary's
/// progress, a replica's own view.
pub(super) async fn report(
    mut client: Client,
    (cluster, every): (String, Duration),
    node: Arc<Node>,
    mut probes: watch::Receiver<BTreeMap<String, i64>>,
    mut stopped: watch::Receiver<bool>,
) -> Option<String> {
    // The last value written under each key.
    let mut last: BTreeMap<String, Vec<u8>> = BTreeMap::new();
    let mut every = tokio::time::interval(every.max(Duration::from_millis(10)));
    let mut probes_open = true;
    loop {
        // Every volume, or only primaries whose replicas changed state.
        let named = tokio::select! {
            () = stopping(&mut stopped) => return None,
            _ = every.tick() => None,
            // A probe is answered at once. Closed once the watches end
            // (so is the plane): ticks only.
            changed = probes.changed(), if probes_open => {
                probes_open = changed.is_ok();
                None
            }
            // A primary's replicas changed state: its report now, so that
            // a controller judging a primary lost right after judges the
            // states it last had.
            changed = node.replica_states_changed() => Some(changed),
        };
        // The probes asked so far, read before any status below: a report
        // says it answers a probe only if it was taken after it. A pass
        // over a few primaries leaves a new probe for the pass it starts.
        let answered = match &named {
            None => probes.borrow_and_update().clone(),
            Some(_) => probes.borrow().clone(),
        };
        let statuses = match &named {
            None => node.statuses().await,
            Some(named) => node.statuses_named(named).await,
        };
        for (name, status) in statuses {
            let (key, value) = match &status {
                NodeStatus::Primary(status) => {
                    let progress = ProgressRecord {
                        epoch: Applied::epoch_of(status.registry.epoch.get()),
                        primary: node.name().to_owned(),
                        committed: status.registry.history.committed.get(),
                        replicas: status
                            .registry
                            .senders
                            .iter()
                            .map(|s| {
                                let progress = ReplicaProgress {
                                    flushed: s.flushed.get(),
                                    state: s.state.as_str().to_owned(),
                                };
                                (s.replica.server().to_owned(), progress)
                            })
                            .collect(),
                    };
                    (progress_key(&cluster, &name), serde_json::to_vec(&progress))
                }
                NodeStatus::Replica(status) => {
                    let own = ReplicaReport {
                        epoch: Applied::epoch_of(status.epoch),
                        term: status.epoch,
                        durable: status.durable,
                        connected: status.connected,
                        answered: answered.get(&name).copied().unwrap_or(0),
                    };
                    let key = replica_report_key(&cluster, &name, node.name());
                    (key, serde_json::to_vec(&own))
                }
                // Nothing to report until it serves.
                NodeStatus::Peering(_) => continue,
            };
            let Ok(value) = value else {
                continue;
            };
            if last.get(&key) == Some(&value) {
                continue;
            }
            match client.put(key.as_str(), value.clone(), None).await {
                Ok(_) => {
                    last.insert(key, value);
                }
                Err(e) => {
                    tracing::warn!(error = %e, volume = %name, "etcd: report not written")
                }
            }
        }
    }
}

/// Campaigns for the controller's seat on `lease`; once elected, looks at
/// the records every [`CONTROL_EVERY`].
pub(super) async fn control(
    mut client: Client,
    cluster: String,
    me: String,
    (lease, ttl): (i64, Duration),
    mut stopped: watch::Receiver<bool>,
) -> Option<String> {
    let election = format!("{}controller", prefix(&cluster));
    // A campaign waits until this node leads; the client's request timeout
    // cuts each wait short, and the node campaigns again (on the same
    // lease: the same candidacy). Losing the lease ends the node anyway.
    let leader = loop {
        let elected = tokio::select! {
            () = stopping(&mut stopped) => return None,
            elected = client.campaign(election.as_str(), me.as_str(), lease) => elected,
        };
        match elected {
            Ok(elected) => match elected.leader() {
                Some(leader) => break (leader.key().to_vec(), leader.rev()),
                None => return Some("controller election: elected without a leader key".into()),
            },
            Err(e) => {
                tracing::debug!(error = %e, "etcd: controller campaign: again");
                tokio::select! {
                    () = stopping(&mut stopped) => return None,
                    () = tokio::time::sleep(CONTROL_EVERY) => {}
                }
            }
        }
    };
    tracing::info!(controller = %me, "etcd: elected controller");
    let mut pause = CONTROL_EVERY;
    let mut nodes = Liveness {
        seen: BTreeSet::new(),
        absent_since: BTreeMap::new(),
        grace: ttl * 2,
        settle: ttl,
    };
    loop {
        tokio::select! {
            () = stopping(&mut stopped) => return None,
            () = tokio::time::sleep(pause) => {}
        }
        // Waiting for answers to a probe: look again soon.
        pause = match look(&mut client, &cluster, &me, &leader, &mut nodes).await {
            Ok(true) => ANSWER_EVERY,
            Ok(false) => CONTROL_EVERY,
            Err(e) => {
                tracing::warn!(error = %e, "etcd: controller pass failed");
                CONTROL_EVERY
            }
        };
    }
}

/// Which primaries are lost. A node that registered once (its address is
/// kept) and whose entry is gone (its lease expired, or it stopped) is
/// lost at once, whether or not this controller saw it: a controller
/// elected because the last one died with the primary must not wait. One
/// that never registered may still be starting (a cluster coming up):
/// lost only once absent for `grace`.
struct Liveness {
    seen: BTreeSet<String>,
    absent_since: BTreeMap<String, std::time::Instant>,
    grace: Duration,
    /// How long a lost primary's replicas have to settle (disconnect and
    /// report) before a "down" decision for want of it is written.
    settle: Duration,
}

impl Liveness {
    fn observe(&mut self, live: &BTreeSet<String>, registered: BTreeSet<String>) {
        self.seen.extend(live.iter().cloned());
        self.seen.extend(registered);
        self.absent_since.retain(|node, _| !live.contains(node));
    }

    /// How long `node` has been lost, if it is.
    fn lost(&mut self, node: &str, live: &BTreeSet<String>) -> Option<Duration> {
        if live.contains(node) {
            return None;
        }
        let absent = self
            .absent_since
            .entry(node.to_owned())
            .or_insert_with(std::time::Instant::now)
            .elapsed();
        if self.seen.contains(node) {
            return Some(absent);
        }
        absent.checked_sub(self.grace)
    }
}

/// One pass: every volume whose primary's node entry is gone; whether a
/// failover waits for answers to its probe.
async fn look(
    client: &mut Client,
    cluster: &str,
    me: &str,
    leader: &Leader,
    nodes: &mut Liveness,
) -> Result<bool, etcd_client::Error> {
    let mut waiting = false;
    let (live, ready) = registrations(client, cluster).await?;
    let registered = names(client, &address_key(cluster, "")).await?;
    nodes.observe(&live, registered);
    let down = down_decisions(client, cluster).await?;
    let volumes_prefix = format!("{}volumes/", prefix(cluster));
    let records = client
        .get(
            volumes_prefix.as_str(),
            Some(GetOptions::new().with_prefix()),
        )
        .await?;
    for kv in records.kvs() {
        let Some(volume) = kv
            .key_str()
            .ok()
            .and_then(|k| k.strip_prefix(&volumes_prefix))
        else {
            continue;
        };
        let key = volume_key(cluster, volume);
        let Ok(record) = parse(&key, kv.value()) else {
            continue;
        };
        if let Some((back, _)) = record
            .departed
            .iter()
            .find(|(node, _)| ready.contains(*node))
        {
            let back = back.clone();
            readmit(
                client,
                cluster,
                leader,
                volume,
                record,
                kv.mod_revision(),
                &back,
            )
            .await?;
            continue;
        }
        let Some(lost_for) = nodes.lost(&record.primary, &live) else {
            // The primary serves again (registered, and marked ready once
            // its volumes are open), in the epoch it was lost in or a
            // later one of its own (a readmission since).
            let back = |decision: &Decision| {
                ready.contains(&record.primary)
                    && decision.lost_primary == record.primary
                    && decision.epoch <= record.epoch
            };
            if let Some((decision, revision)) = down.get(volume).filter(|(d, _)| back(d)) {
                end_down(client, cluster, leader, volume, decision, *revision).await?;
            }
            continue;
        };
        let at = (kv.mod_revision(), leader);
        let settled = lost_for >= nodes.settle;
        waiting |= failover(client, cluster, me, volume, record, at, &live, settled).await?;
    }
    Ok(waiting)
}

/// The "down" decisions not yet over, by volume, with their revisions.
async fn down_decisions(
    client: &mut Client,
    cluster: &str,
) -> Result<BTreeMap<String, (Decision, i64)>, etcd_client::Error> {
    let decisions = decision_key(cluster, "");
    let response = client
        .get(decisions.as_str(), Some(GetOptions::new().with_prefix()))
        .await?;
    Ok(response
        .kvs()
        .iter()
        .filter_map(|kv| {
            let volume = kv.key_str().ok()?.strip_prefix(&decisions)?.to_owned();
            let decision: Decision = serde_json::from_slice(kv.value()).ok()?;
            (decision.promoted.is_none() && decision.over.is_none())
                .then_some((volume, (decision, kv.mod_revision())))
        })
        .collect())
}

/// Marks `decision`, which left `volume` down, as over: its lost primary
/// serves again and leads the volume as before. Only if the decision is
/// as read, the primary still registered and this node still the
/// controller.
async fn end_down(
    client: &mut Client,
    cluster: &str,
    leader: &Leader,
    volume: &str,
    decision: &Decision,
    revision: i64,
) -> Result<(), etcd_client::Error> {
    let over = Decision {
        over: Some(format!("{} serves again", decision.lost_primary)),
        ..decision.clone()
    };
    let Ok(value) = serde_json::to_vec(&over) else {
        return Ok(());
    };
    let key = decision_key(cluster, volume);
    let txn = Txn::new()
        .when([
            Compare::mod_revision(key.as_str(), CompareOp::Equal, revision),
            Compare::create_revision(
                node_key(cluster, &decision.lost_primary),
                CompareOp::NotEqual,
                0,
            ),
            still_leader(leader),
        ])
        .and_then([TxnOp::put(key.as_str(), value, None)]);
    if client.txn(txn).await?.succeeded() {
        tracing::info!(volume, primary = %decision.lost_primary,
            "etcd controller: the primary is back; the volume is no longer down");
    }
    Ok(())
}

/// The names under `prefix` (keys only).
async fn names(client: &mut Client, prefix: &str) -> Result<BTreeSet<String>, etcd_client::Error> {
    let keys = GetOptions::new().with_prefix().with_keys_only();
    let response = client.get(prefix, Some(keys)).await?;
    Ok(response
        .kvs()
        .iter()
        .filter_map(|kv| kv.key_str().ok()?.strip_prefix(prefix).map(str::to_owned))
        .collect())
}

/// The registered nodes, and those of them that serve (ready).
async fn registrations(
    client: &mut Client,
    cluster: &str,
) -> Result<(BTreeSet<String>, BTreeSet<String>), etcd_client::Error> {
    let prefix = node_key(cluster, "");
    let response = client
        .get(prefix.as_str(), Some(GetOptions::new().with_prefix()))
        .await?;
    let (mut live, mut ready) = (BTreeSet::new(), BTreeSet::new());
    for kv in response.kvs() {
        let Some(node) = kv.key_str().ok().and_then(|k| k.strip_prefix(&prefix)) else {
            continue;
        };
        live.insert(node.to_owned());
        if serde_json::from_slice::<super::NodeRecord>(kv.value()).is_ok_and(|r| r.ready) {
            ready.insert(node.to_owned());
        }
    }
    Ok((live, ready))
}

/// A live replica's reason the engine does not judge: it has not
/// reported since the controller's probe (so its report may predate a
/// write the lost primary acknowledged).
const UNANSWERED: &str = "unanswered: no report of its own since the controller's probe";

/// Asks `record`'s replicas, whose primary is lost, for fresh reports:
/// `probes/<volume>`, written once per loss. The revision it was written
/// at is after the lost primary's lease ended, so after its last
/// acknowledgement: a report answering it holds every write the replica
/// acknowledged to that primary. Returns that revision.
async fn probe(
    client: &mut Client,
    cluster: &str,
    volume: &str,
    record: &VolumeRecord,
) -> Result<i64, etcd_client::Error> {
    let key = probe_key(cluster, volume);
    let registered = client
        .get(address_key(cluster, &record.primary), None)
        .await?
        .kvs()
        .first()
        .map_or(0, |kv| kv.mod_revision());
    let question = Probe {
        epoch: record.epoch,
        lost_primary: record.primary.clone(),
        registered,
    };
    let asked = client.get(key.as_str(), None).await?;
    if let Some(kv) = asked.kvs().first() {
        if serde_json::from_slice::<Probe>(kv.value()).is_ok_and(|p| p == question) {
            return Ok(kv.mod_revision());
        }
    }
    let value = serde_json::to_vec(&question).unwrap_or_default();
    let put = client.put(key.as_str(), value, None).await?;
    Ok(put.header().map_or(i64::MAX, |h| h.revision()))
}

/// A lost primary's replicas as etcd knows them.
struct Candidates {
    /// Each, for the engine's rules: the state is the primary's last
    /// judgement; the epoch and the durable LSN are the replica's own,
    /// fresher than the primary's report.
    list: Vec<PromotionCandidate>,
    /// Live replicas not yet to be judged, and why.
    unsettled: BTreeMap<String, &'static str>,
    /// The committed LSN the primary last reported.
    reported_committed: u64,
}

/// Reads what etcd holds of `record`'s replicas: the primary's last
/// progress report and each replica's own; a live replica's counts once
/// it answers the probe at revision `probe`.
async fn candidates(
    client: &mut Client,
    cluster: &str,
    volume: &str,
    record: &VolumeRecord,
    (live, probe): (&BTreeSet<String>, i64),
) -> Result<Candidates, etcd_client::Error> {
    // Only a report of this record's primary in its epoch: an older one
    // (a primary promoted and lost before it reported) says nothing of
    // these replicas. A promotion writes the report it starts from.
    let progress: Option<ProgressRecord> = client
        .get(progress_key(cluster, volume), None)
        .await?
        .kvs()
        .first()
        .and_then(|kv| serde_json::from_slice::<ProgressRecord>(kv.value()).ok())
        .filter(|p| p.epoch == record.epoch && p.primary == record.primary);
    let own_prefix = replica_report_key(cluster, volume, "");
    let own: BTreeMap<String, ReplicaReport> = client
        .get(own_prefix.as_str(), Some(GetOptions::new().with_prefix()))
        .await?
        .kvs()
        .iter()
        .filter_map(|kv| {
            let node = kv.key_str().ok()?.strip_prefix(&own_prefix)?.to_owned();
            Some((node, serde_json::from_slice(kv.value()).ok()?))
        })
        .collect();
    let mut list = Vec::new();
    let mut unsettled = BTreeMap::new();
    for server in record.replicas.keys() {
        let Ok(replica) = ReplicaId::new(volume, server) else {
            continue;
        };
        let state = progress
            .as_ref()
            .and_then(|p| p.replicas.get(server))
            .and_then(|r| {
                ReplicaState::ALL
                    .into_iter()
                    .find(|s| s.as_str() == r.state)
            })
            .unwrap_or(ReplicaState::Disconnected);
        let mine = own.get(server);
        let running = live.contains(server);
        if running && mine.is_none_or(|mine| mine.answered < probe) {
            unsettled.insert(server.clone(), UNANSWERED);
        }
        list.push(PromotionCandidate {
            replica,
            running,
            epoch: Epoch(mine.map_or(0, |r| r.epoch)),
            state,
            flushed: Lsn(mine.map_or(0, |r| r.durable)),
            last_heartbeat: Tick(0),
        });
    }
    Ok(Candidates {
        list,
        unsettled,
        reported_committed: progress.map_or(0, |p| p.committed),
    })
}

/// The node names of `reasons`' replicas, each with its reasons as text.
fn reasons_by_node(reasons: &[(ReplicaId, Vec<Ineligibility>)]) -> BTreeMap<String, Vec<String>> {
    reasons
        .iter()
        .map(|(replica, reasons)| {
            let reasons = reasons.iter().map(ToString::to_string).collect();
            (replica.server().to_owned(), reasons)
        })
        .collect()
}

/// Judges the replicas of `volume`, whose primary is gone, and promotes
/// the best if one is eligible; records the decision either way (a
/// "down" one only once `settled`, if a replica may yet settle).
#[allow(clippy::too_many_arguments)]
async fn failover(
    client: &mut Client,
    cluster: &str,
    me: &str,
    volume: &str,
    record: VolumeRecord,
    (revision, leader): (i64, &Leader),
    live: &BTreeSet<String>,
    settled: bool,
) -> Result<bool, etcd_client::Error> {
    let asked = probe(client, cluster, volume, &record).await?;
    let Candidates {
        list,
        unsettled,
        reported_committed,
    } = candidates(client, cluster, volume, &record, (live, asked)).await?;
    let (committed, blocked) = match record.commit_mode {
        CommitMode::SyncQuorum => quorum_judgement(&record, &list, &unsettled, reported_committed),
        CommitMode::SyncAll => (reported_committed, None),
        CommitMode::BestEffort => (
            reported_committed,
            Some(format!(
                "best_effort: the lost primary acknowledged writes once they were durable on \
                 it alone, so one acknowledged after its last report (committed \
                 {reported_committed}) may be on no replica; no automatic promotion can \
                 know. An operator's (walship promote --accept-data-loss) takes the replica \
                 with the most data and gives up the rest"
            )),
        ),
    };
    let report = evaluate_promotion(&list, Epoch(record.epoch), Lsn(committed));
    let mut rejected = reasons_by_node(&report.rejected);
    for (server, reason) in &unsettled {
        rejected
            .entry(server.clone())
            .or_default()
            .push((*reason).to_owned());
    }
    let promoted = report
        .ranked
        .iter()
        .map(|r| r.server())
        .find(|server| !unsettled.contains_key(*server))
        .filter(|_| blocked.is_none())
        .map(str::to_owned);
    let decision = Decision {
        epoch: record.epoch,
        lost_primary: record.primary.clone(),
        committed,
        promoted: promoted.clone(),
        rejected,
        blocked,
        data_loss: None,
        by: me.to_owned(),
        over: None,
    };
    // Every live replica answers within milliseconds: judged with all
    // their answers, the best is chosen, and a "down" decision is not a
    // passing one. One that does not answer for a lease time is left out.
    if !settled && !unsettled.is_empty() {
        tracing::debug!(
            volume,
            ?unsettled,
            "etcd controller: waiting for replicas to answer"
        );
        return Ok(true);
    }
    let Some(next_primary) = promoted else {
        // Down, with the reasons; written once per distinct decision.
        let decision_value = serde_json::to_vec(&decision).unwrap_or_default();
        let known = client.get(decision_key(cluster, volume), None).await?;
        let same = known
            .kvs()
            .first()
            .is_some_and(|kv| kv.value() == decision_value.as_slice());
        if !same {
            tracing::warn!(volume, epoch = record.epoch, reasons = ?decision.rejected,
                "etcd controller: no eligible replica; the volume stays down");
            // Only about the record as read: a promotion meanwhile (an
            // operator's) keeps its decision.
            let key = volume_key(cluster, volume);
            let txn = Txn::new()
                .when([
                    still_leader(leader),
                    Compare::mod_revision(key, CompareOp::Equal, revision),
                ])
                .and_then([TxnOp::put(
                    decision_key(cluster, volume),
                    decision_value,
                    None,
                )]);
            client.txn(txn).await?;
        }
        return Ok(false);
    };
    failpoint("controller-before-promote", me).await;
    // A stale controller's transaction fails.
    let guard = [still_leader(leader)];
    let at = (revision, next_primary.as_str());
    if promote(client, cluster, volume, record, at, &decision, guard).await? {
        tracing::warn!(volume, epoch = decision.epoch + 1, primary = %next_primary,
            lost = %decision.lost_primary, rejected = ?decision.rejected,
            "etcd controller: promoted");
    } else if client.get(leader.0.clone(), None).await?.kvs().is_empty() {
        tracing::warn!(
            volume,
            "etcd controller: this node is no longer the controller; not promoted"
        );
    } else {
        tracing::info!(
            volume,
            "etcd controller: the record changed or the lost primary registered again meanwhile; not promoted"
        );
    }
    Ok(false)
}

/// Writes `next_primary` as `volume`'s primary in the next epoch, and
/// `decision`, in one transaction that holds only if the record is as
/// read at `revision`, its primary still unregistered, and every one of
/// `guards` holds; whether it held.
async fn promote(
    client: &mut Client,
    cluster: &str,
    volume: &str,
    record: VolumeRecord,
    (revision, next_primary): (i64, &str),
    decision: &Decision,
    guards: impl IntoIterator<Item = Compare>,
) -> Result<bool, etcd_client::Error> {
    let mut replicas = record.replicas.clone();
    replicas.remove(next_primary);
    let lost_at = client
        .get(address_key(cluster, &record.primary), None)
        .await?
        .kvs()
        .first()
        .and_then(|kv| kv.value_str().ok().map(str::to_owned));
    // Under sync_all the lost primary waits outside the replicas until it
    // is back (a replica away stops every commit). Under the other modes
    // it is a replica at once: commits go on without it, and sync_quorum
    // needs three members.
    let mut departed = record.departed.clone();
    match lost_at {
        Some(addr) if record.commit_mode == CommitMode::SyncAll => {
            departed.insert(record.primary.clone(), addr);
        }
        Some(addr) => {
            replicas.insert(record.primary.clone(), addr);
        }
        None if record.commit_mode == CommitMode::SyncQuorum && replicas.len() < 2 => {
            // Two members cannot make a sync_quorum volume.
            tracing::warn!(volume, lost = %record.primary,
                "etcd: the lost primary's address is unknown and sync_quorum needs three members: not promoted");
            return Ok(false);
        }
        None => tracing::warn!(volume, lost = %record.primary,
            "etcd: the lost primary's address is unknown; it is left out"),
    }
    let lost_key = node_key(cluster, &record.primary);
    let next = VolumeRecord {
        epoch: record.epoch + 1,
        primary: next_primary.to_owned(),
        replicas,
        departed,
        ..record
    };
    let key = volume_key(cluster, volume);
    let mut when = vec![
        Compare::mod_revision(key.as_str(), CompareOp::Equal, revision),
        Compare::create_revision(lost_key, CompareOp::Equal, 0),
    ];
    when.extend(guards);
    let (Ok(next_value), Ok(decision_value)) =
        (serde_json::to_vec(&next), serde_json::to_vec(decision))
    else {
        return Ok(false);
    };
    // The new primary's report until it writes its own: the committed LSN
    // it holds (all that was judged; on the desperate path, what it has),
    // its replicas' states unknown.
    let baseline = ProgressRecord {
        epoch: next.epoch,
        primary: next.primary.clone(),
        committed: decision
            .data_loss
            .as_ref()
            .map_or(decision.committed, |loss| loss.after),
        replicas: BTreeMap::new(),
    };
    let Ok(baseline) = serde_json::to_vec(&baseline) else {
        return Ok(false);
    };
    let txn = Txn::new().when(when).and_then([
        TxnOp::put(key.as_str(), next_value, None),
        TxnOp::put(decision_key(cluster, volume), decision_value, None),
        TxnOp::put(progress_key(cluster, volume), baseline, None),
    ]);
    Ok(client.txn(txn).await?.succeeded())
}

/// Why an operator's promotion was refused.
#[derive(Debug, thiserror::Error)]
pub enum PromoteError {
    /// etcd refused or could not be reached.
    #[error(transparent)]
    Etcd(#[from] etcd_client::Error),
    /// The volume has no record.
    #[error("volume {0} has no record in etcd")]
    NoRecord(String),
    /// The primary is registered: nothing to fail over.
    #[error("{volume}'s primary {primary} is registered (alive): nothing to fail over")]
    PrimaryAlive {
        /// The volume.
        volume: String,
        /// Its primary.
        primary: String,
    },
    /// No replica can take it, not even losing data.
    #[error("{volume}: {source}")]
    NoCandidate {
        /// The volume.
        volume: String,
        /// Why, for each replica.
        source: walship_engine::PromotionError,
    },
    /// The record or the registrations changed while deciding.
    #[error("{0}: the record changed or the primary registered meanwhile; nothing written")]
    Raced(String),
}

/// The desperate path, an operator's explicit act (`walship promote
/// --accept-data-loss`), never the controller's: `volume`'s primary is
/// lost and no replica is eligible; the running replica with the most
/// data, whatever its state or epoch short of a partial image, becomes
/// primary in the next epoch. The decision, written with it, says which
/// committed LSNs it lacks (lost) and which rules were waived.
pub async fn promote_accepting_loss(
    client: &mut Client,
    cluster: &str,
    volume: &str,
    by: &str,
    accepted: DataLossAccepted,
) -> Result<Decision, PromoteError> {
    let key = volume_key(cluster, volume);
    let response = client.get(key.as_str(), None).await?;
    let Some(kv) = response.kvs().first() else {
        return Err(PromoteError::NoRecord(volume.to_owned()));
    };
    let revision = kv.mod_revision();
    let record: VolumeRecord = serde_json::from_slice(kv.value())
        .map_err(|_| PromoteError::NoRecord(volume.to_owned()))?;
    let live = names(client, &node_key(cluster, "")).await?;
    if live.contains(&record.primary) {
        return Err(PromoteError::PrimaryAlive {
            volume: volume.to_owned(),
            primary: record.primary,
        });
    }
    // Fresh answers from the live replicas, as the controller asks; after
    // a few seconds, what there is.
    let asked = probe(client, cluster, volume, &record).await?;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    let Candidates {
        list,
        reported_committed,
        ..
    } = loop {
        let known = candidates(client, cluster, volume, &record, (&live, asked)).await?;
        if known.unsettled.is_empty() || tokio::time::Instant::now() >= deadline {
            break known;
        }
        tokio::time::sleep(ANSWER_EVERY).await;
    };
    let committed = Lsn(reported_committed);
    let report = evaluate_promotion(&list, Epoch(record.epoch), committed);
    let pick =
        select_desperate(&list, Epoch(record.epoch), committed, accepted).map_err(|source| {
            PromoteError::NoCandidate {
                volume: volume.to_owned(),
                source,
            }
        })?;
    let chosen = pick.replica.server().to_owned();
    let decision = Decision {
        epoch: record.epoch,
        lost_primary: record.primary.clone(),
        committed: committed.get(),
        promoted: Some(chosen.clone()),
        rejected: reasons_by_node(&report.rejected),
        blocked: None,
        data_loss: Some(DataLoss {
            after: pick.lost_from_exclusive.get(),
            through: pick.lost_to_inclusive.get(),
            waived: pick.waived.iter().map(ToString::to_string).collect(),
            beyond: (record.commit_mode == CommitMode::BestEffort).then(|| {
                format!(
                    "best_effort: any write {} acknowledged after its last report (committed \
                     {}), on its own disk alone; how many, no report shows",
                    record.primary,
                    committed.get()
                )
            }),
        }),
        by: by.to_owned(),
        over: None,
    };
    if promote(
        client,
        cluster,
        volume,
        record,
        (revision, &chosen),
        &decision,
        [],
    )
    .await?
    {
        tracing::warn!(volume, primary = %chosen, loss = ?decision.data_loss,
            "etcd: promoted by an operator, accepting data loss");
        Ok(decision)
    } else {
        Err(PromoteError::Raced(volume.to_owned()))
    }
}

/// Under sync_quorum a committed write is durable on a majority of the
/// members, so on at least `quorum − 1` replicas; the replicas that
/// answered (running, reported, settled) must be enough that every such
/// set includes one of them, or a write could be on dead replicas only.
/// Those answers bound what may have been committed: the committed LSN
/// judged against is the highest durable LSN among them in the current
/// epoch, so only a replica holding all of it is eligible.
fn quorum_judgement(
    record: &VolumeRecord,
    candidates: &[PromotionCandidate],
    unsettled: &BTreeMap<String, &str>,
    reported_committed: u64,
) -> (u64, Option<String>) {
    let replicas = record.replicas.len();
    let members = replicas + 1;
    let quorum = members / 2 + 1;
    let needed = replicas + 2 - quorum;
    let answered: Vec<&PromotionCandidate> = candidates
        .iter()
        .filter(|c| c.running && !unsettled.contains_key(c.replica.server()))
        .collect();
    let highest = answered
        .iter()
        .filter(|c| c.epoch == Epoch(record.epoch))
        .map(|c| c.flushed.get())
        .fold(reported_committed, u64::max);
    let blocked = (answered.len() < needed).then(|| {
        format!(
            "sync_quorum: {} of {replicas} replicas answered, {needed} needed so that one \
             holds every committed write",
            answered.len()
        )
    });
    (highest, blocked)
}

/// The environment variable that names a [`failpoint`] to stop at.
pub const FAILPOINT_ENV: &str = "WALSHIP_FAILPOINT";

/// With [`FAILPOINT_ENV`] set, where node `<me>` holds at the failpoint:
/// for as long as `<this path>.<me>` exists (at most a minute).
pub const FAILPOINT_HOLD_ENV: &str = "WALSHIP_FAILPOINT_HOLD";

/// A test hook: with [`FAILPOINT_ENV`] set to `name`, node `me` says it
/// reached `name` and stalls there (three seconds, or while its
/// [`FAILPOINT_HOLD_ENV`] file exists), for a test to stop, kill or hold
/// it at a known point (the controller between its decision and its
/// transaction). Compiled only with the feature `failpoints` (the tests
/// turn it on); a release binary carries none.
#[cfg(feature = "failpoints")]
async fn failpoint(name: &str, me: &str) {
    if std::env::var(FAILPOINT_ENV).is_ok_and(|v| v == name) {
        tracing::warn!(failpoint = name, "failpoint reached");
        let Ok(hold) = std::env::var(FAILPOINT_HOLD_ENV) else {
            tokio::time::sleep(Duration::from_secs(3)).await;
            return;
        };
        let file = std::path::PathBuf::from(format!("{hold}.{me}"));
        let until = tokio::time::Instant::now() + Duration::from_secs(60);
        while file.exists() && tokio::time::Instant::now() < until {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        tracing::warn!(failpoint = name, "failpoint released");
    }
}

/// Without the feature `failpoints`, nothing.
#[cfg(not(feature = "failpoints"))]
async fn failpoint(_name: &str, _me: &str) {}

/// This controller's election key and its revision.
type Leader = (Vec<u8>, i64);

/// The compare that holds while this node is still the controller.
fn still_leader((key, rev): &Leader) -> Compare {
    Compare::create_revision(key.clone(), CompareOp::Equal, *rev)
}

/// Adds `back`, a lost primary registered again, to the replicas in the
/// next epoch: the primary connects to it and brings it in sync (its
/// unreplicated tail truncated at the divergence point).
async fn readmit(
    client: &mut Client,
    cluster: &str,
    leader: &Leader,
    volume: &str,
    record: VolumeRecord,
    revision: i64,
    back: &str,
) -> Result<(), etcd_client::Error> {
    let mut next = record;
    let Some(addr) = next.departed.remove(back) else {
        return Ok(());
    };
    next.replicas.insert(back.to_owned(), addr);
    next.epoch += 1;
    let Ok(value) = serde_json::to_vec(&next) else {
        return Ok(());
    };
    let key = volume_key(cluster, volume);
    let txn = Txn::new()
        .when([
            Compare::mod_revision(key.as_str(), CompareOp::Equal, revision),
            still_leader(leader),
        ])
        .and_then([TxnOp::put(key.as_str(), value, None)]);
    if client.txn(txn).await?.succeeded() {
        tracing::info!(
            volume,
            epoch = next.epoch,
            node = back,
            "etcd controller: added back as a replica"
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(replicas: &[&str]) -> VolumeRecord {
        VolumeRecord {
            epoch: 3,
            primary: "p".into(),
            commit_mode: CommitMode::SyncQuorum,
            size: 1 << 20,
            replicas: replicas
                .iter()
                .map(|r| ((*r).to_owned(), format!("{r}:1")))
                .collect(),
            departed: BTreeMap::new(),
        }
    }

    fn candidate(server: &str, running: bool, epoch: u64, flushed: u64) -> PromotionCandidate {
        PromotionCandidate {
            replica: ReplicaId::new("v", server).unwrap(),
            running,
            epoch: Epoch(epoch),
            state: ReplicaState::InSync,
            flushed: Lsn(flushed),
            last_heartbeat: Tick(0),
        }
    }

    #[test]
    fn sync_quorum_needs_enough_answers_that_every_majority_meets_one() {
        // Three members: a write is committed on the primary and one
        // replica, so both replicas must answer.
        let two = record(&["a", "b"]);
        let one_down = [candidate("a", true, 3, 10), candidate("b", false, 3, 0)];
        let (_, blocked) = quorum_judgement(&two, &one_down, &BTreeMap::new(), 5);
        assert!(blocked
            .unwrap()
            .contains("1 of 2 replicas answered, 2 needed"));
        let unsettled = BTreeMap::from([("b".to_owned(), UNANSWERED)]);
        let both_up = [candidate("a", true, 3, 10), candidate("b", true, 3, 12)];
        assert!(quorum_judgement(&two, &both_up, &unsettled, 5).1.is_some());
        // Both answered: judged against the highest durable LSN among them
        // in the current epoch, so only the one holding it is eligible.
        let (committed, blocked) = quorum_judgement(&two, &both_up, &BTreeMap::new(), 5);
        assert_eq!((committed, blocked), (12, None));
        let older = [candidate("a", true, 3, 10), candidate("b", true, 2, 50)];
        assert_eq!(quorum_judgement(&two, &older, &BTreeMap::new(), 5).0, 10);
        // Five members: committed on three, so on two of four replicas;
        // three answers always include one of those.
        let four = record(&["a", "b", "c", "d"]);
        let three_up = [
            candidate("a", true, 3, 10),
            candidate("b", true, 3, 10),
            candidate("c", true, 3, 10),
            candidate("d", false, 3, 0),
        ];
        assert_eq!(
            quorum_judgement(&four, &three_up, &BTreeMap::new(), 5),
            (10, None)
        );
        let two_up = [&three_up[..2], &three_up[3..]].concat();
        assert!(quorum_judgement(&four, &two_up, &BTreeMap::new(), 5)
            .1
            .is_some());
    }
}
