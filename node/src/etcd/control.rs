//! Progress reports and the controller.
//!
//! **Progress.** A primary writes `progress/<volume>` (no lease: it must
//! outlive the primary) when it changes, at most every
//! [`PROGRESS_EVERY`]: its epoch, its committed LSN, and each replica's
//! flushed LSN and state as it sees them. That is what the controller
//! judges a dead primary's replicas by, without talking to the dead.
//!
//! **Controller.** Every node campaigns in an etcd election on its lease;
//! the leader, alone, looks at the records every [`CONTROL_EVERY`]. A
//! volume whose primary's node entry is gone (its lease expired; one it
//! never saw, absent for two lease times) gets the
//! engine's promotion rules over its replicas: every rejection reason is
//! recorded, the best eligible replica becomes primary in the next epoch,
//! with the old primary as a replica (back from the dead, it rejoins as
//! one), in one transaction that holds only if the record is unchanged
//! since it was read (a stale controller's fails). The decision and its
//! reasons go to `decisions/<volume>`, which each node hosting the volume
//! shows in its status. No eligible replica: the volume stays down, with
//! the reasons. The desperate path is never taken here.
//!
//! How fresh the judgement is: as fresh as the last report. Under
//! sync_all a replica in sync in a report holds everything committed
//! later too (nothing commits without it while it is in sync); under
//! sync_quorum a replica that fell behind after the last report may look
//! eligible.

use super::{node_key, parse, prefix, volume_key, VolumeRecord};
use crate::node::Node;
use etcd_client::{Client, Compare, CompareOp, GetOptions, Txn, TxnOp};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::watch;
use walship_actors::NodeStatus;
use walship_engine::{
    evaluate_promotion, Epoch, Lsn, PromotionCandidate, ReplicaId, ReplicaState, Tick,
};

/// How often a primary's progress may be written.
pub const PROGRESS_EVERY: Duration = Duration::from_millis(250);
/// How often the elected controller looks at the records.
pub const CONTROL_EVERY: Duration = Duration::from_millis(250);

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
    /// The controller that decided.
    pub by: String,
}

/// The key of a volume's progress report.
pub fn progress_key(cluster: &str, volume: &str) -> String {
    format!("{}progress/{volume}", prefix(cluster))
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

/// Writes each primary volume's progress when it changed.
pub(super) async fn report(
    mut client: Client,
    cluster: String,
    node: Arc<Node>,
    mut stopped: watch::Receiver<bool>,
) -> Option<String> {
    let mut last: BTreeMap<String, ProgressRecord> = BTreeMap::new();
    let mut every = tokio::time::interval(PROGRESS_EVERY);
    loop {
        tokio::select! {
            () = async { let _ = stopped.wait_for(|stop| *stop).await; } => return None,
            _ = every.tick() => {}
        }
        for (name, epoch, status) in node.primary_statuses().await {
            let NodeStatus::Primary(status) = &status else {
                continue;
            };
            let progress = ProgressRecord {
                epoch,
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
            if last.get(&name) == Some(&progress) {
                continue;
            }
            let Ok(value) = serde_json::to_vec(&progress) else {
                continue;
            };
            match client.put(progress_key(&cluster, &name), value, None).await {
                Ok(_) => {
                    last.insert(name.clone(), progress);
                }
                Err(e) => {
                    tracing::warn!(error = %e, volume = %name, "etcd: progress not written")
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
            () = async { let _ = stopped.wait_for(|stop| *stop).await; } => return None,
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
                    () = async { let _ = stopped.wait_for(|stop| *stop).await; } => return None,
                    () = tokio::time::sleep(CONTROL_EVERY) => {}
                }
            }
        }
    };
    tracing::info!(controller = %me, "etcd: elected controller");
    let mut every = tokio::time::interval(CONTROL_EVERY);
    let mut nodes = Liveness {
        seen: BTreeSet::new(),
        absent_since: BTreeMap::new(),
        grace: ttl * 2,
    };
    loop {
        tokio::select! {
            () = async { let _ = stopped.wait_for(|stop| *stop).await; } => return None,
            _ = every.tick() => {}
        }
        if let Err(e) = look(&mut client, &cluster, &me, &leader, &mut nodes).await {
            tracing::warn!(error = %e, "etcd: controller pass failed");
        }
    }
}

/// Which primaries are lost. A node whose entry this controller saw go
/// (its lease expired, or it stopped) is lost at once. One it never saw
/// may still be starting (a cluster coming up, a controller elected
/// before the primary registered): lost only once absent for `grace`.
struct Liveness {
    seen: BTreeSet<String>,
    absent_since: BTreeMap<String, std::time::Instant>,
    grace: Duration,
}

impl Liveness {
    fn observe(&mut self, live: &BTreeSet<String>) {
        self.seen.extend(live.iter().cloned());
        self.absent_since.retain(|node, _| !live.contains(node));
    }

    fn lost(&mut self, node: &str, live: &BTreeSet<String>) -> bool {
        if live.contains(node) {
            return false;
        }
        if self.seen.contains(node) {
            return true;
        }
        let since = *self
            .absent_since
            .entry(node.to_owned())
            .or_insert_with(std::time::Instant::now);
        since.elapsed() >= self.grace
    }
}

/// One pass: every volume whose primary's node entry is gone.
async fn look(
    client: &mut Client,
    cluster: &str,
    me: &str,
    leader: &Leader,
    nodes: &mut Liveness,
) -> Result<(), etcd_client::Error> {
    let nodes_prefix = format!("{}nodes/", prefix(cluster));
    let live: BTreeSet<String> = client
        .get(
            nodes_prefix.as_str(),
            Some(GetOptions::new().with_prefix().with_keys_only()),
        )
        .await?
        .kvs()
        .iter()
        .filter_map(|kv| {
            kv.key_str()
                .ok()?
                .strip_prefix(&nodes_prefix)
                .map(str::to_owned)
        })
        .collect();
    nodes.observe(&live);
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
            .find(|(node, _)| live.contains(*node))
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
        if !nodes.lost(&record.primary, &live) {
            continue;
        }
        let at = (kv.mod_revision(), leader);
        failover(client, cluster, me, volume, record, at, &live).await?;
    }
    Ok(())
}

/// Judges the replicas of `volume`, whose primary is gone, and promotes
/// the best if one is eligible; records the decision either way.
async fn failover(
    client: &mut Client,
    cluster: &str,
    me: &str,
    volume: &str,
    record: VolumeRecord,
    (revision, leader): (i64, &Leader),
    live: &BTreeSet<String>,
) -> Result<(), etcd_client::Error> {
    let progress: Option<ProgressRecord> = client
        .get(progress_key(cluster, volume), None)
        .await?
        .kvs()
        .first()
        .and_then(|kv| serde_json::from_slice(kv.value()).ok());
    let committed = progress.as_ref().map_or(0, |p| p.committed);
    let mut candidates = Vec::new();
    for server in record.replicas.keys() {
        let Ok(replica) = ReplicaId::new(volume, server) else {
            continue;
        };
        let reported = progress
            .as_ref()
            .and_then(|p| Some((p.epoch, p.replicas.get(server)?)));
        let state = reported
            .and_then(|(_, r)| {
                ReplicaState::ALL
                    .into_iter()
                    .find(|s| s.as_str() == r.state)
            })
            .unwrap_or(ReplicaState::Disconnected);
        candidates.push(PromotionCandidate {
            replica,
            running: live.contains(server),
            epoch: Epoch(reported.map_or(0, |(epoch, _)| epoch)),
            state,
            flushed: Lsn(reported.map_or(0, |(_, r)| r.flushed)),
            last_heartbeat: Tick(0),
        });
    }
    let report = evaluate_promotion(&candidates, Epoch(record.epoch), Lsn(committed));
    let rejected: BTreeMap<String, Vec<String>> = report
        .rejected
        .iter()
        .map(|(replica, reasons)| {
            let reasons = reasons.iter().map(ToString::to_string).collect();
            (replica.server().to_owned(), reasons)
        })
        .collect();
    let promoted = report.ranked.first().map(|r| r.server().to_owned());
    let decision = Decision {
        epoch: record.epoch,
        lost_primary: record.primary.clone(),
        committed,
        promoted: promoted.clone(),
        rejected,
        by: me.to_owned(),
    };
    let decision_value = serde_json::to_vec(&decision).unwrap_or_default();
    let key = volume_key(cluster, volume);
    let Some(next_primary) = promoted else {
        // Down, with the reasons; written once per distinct decision.
        let known = client.get(decision_key(cluster, volume), None).await?;
        let same = known
            .kvs()
            .first()
            .is_some_and(|kv| kv.value() == decision_value.as_slice());
        if !same {
            tracing::warn!(volume, epoch = record.epoch, reasons = ?decision.rejected,
                "etcd controller: no eligible replica; the volume stays down");
            let txn = Txn::new()
                .when([still_leader(leader)])
                .and_then([TxnOp::put(
                    decision_key(cluster, volume),
                    decision_value,
                    None,
                )]);
            client.txn(txn).await?;
        }
        return Ok(());
    };
    let mut replicas = record.replicas.clone();
    replicas.remove(&next_primary);
    let lost_at = client
        .get(address_key(cluster, &record.primary), None)
        .await?
        .kvs()
        .first()
        .and_then(|kv| kv.value_str().ok().map(str::to_owned));
    // The lost primary waits outside the replicas until it is back (under
    // sync_all a replica away stops every commit).
    let mut departed = record.departed.clone();
    match lost_at {
        Some(addr) => {
            departed.insert(record.primary.clone(), addr);
        }
        None => tracing::warn!(volume, lost = %record.primary,
            "etcd controller: the lost primary's address is unknown; it is left out"),
    }
    let next = VolumeRecord {
        epoch: record.epoch + 1,
        primary: next_primary.clone(),
        replicas,
        departed,
        ..record
    };
    let Ok(next_value) = serde_json::to_vec(&next) else {
        return Ok(());
    };
    // Holds only if the record is as read, the primary still unregistered,
    // and this node still the controller: a stale controller's fails.
    let lost_key = node_key(cluster, &decision.lost_primary);
    let txn = Txn::new()
        .when([
            Compare::mod_revision(key.as_str(), CompareOp::Equal, revision),
            Compare::create_revision(lost_key, CompareOp::Equal, 0),
            still_leader(leader),
        ])
        .and_then([
            TxnOp::put(key.as_str(), next_value, None),
            TxnOp::put(decision_key(cluster, volume), decision_value, None),
        ]);
    if client.txn(txn).await?.succeeded() {
        tracing::warn!(volume, epoch = next.epoch, primary = %next_primary,
            lost = %decision.lost_primary, rejected = ?decision.rejected,
            "etcd controller: promoted");
    } else {
        tracing::info!(
            volume,
            "etcd controller: the record changed meanwhile; not promoted"
        );
    }
    Ok(())
}

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
