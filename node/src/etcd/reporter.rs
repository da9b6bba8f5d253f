//! Each hosted volume's report, written when it changed: a primary's
//! progress (`progress/<volume>`: its epoch, its committed LSN, each
//! replica's flushed LSN and state as it sees them), a replica's own view
//! (`replicas/<volume>/<node>`: the epoch it accepts, its durable LSN,
//! whether a primary is connected, the last probe it answered). Neither
//! has a lease: each must outlive its writer, whom the controller judges
//! by them without talking to the dead. LSNs move with every write and
//! are written at most every [`PROGRESS_EVERY`] (or `--etcd-progress-ms`);
//! a change of a primary's replicas' states is written at once, so that a
//! primary lost right after one is judged by it; a probe is answered at
//! once.
//!
//! At 10,000 volumes a node asks only the volumes whose activity count
//! moved since it last looked (`VolumeHandle::activity`): an idle volume
//! is asked nothing and written nothing. What changed in one pass goes
//! out as one transaction (of at most [`PUTS_PER_TXN`] puts, under etcd's
//! default limit of 128 operations), not a put per volume.

use super::keys::{progress_key, replica_report_key};
use super::session::stopping;
use crate::assignment::Applied;
use crate::control::{ProgressRecord, ReplicaProgress, ReplicaReport};
use crate::node::Node;
use etcd_client::{Client, Txn, TxnOp};
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::watch;
use walship_actors::NodeStatus;

/// How often a primary's progress (its LSNs) may be written by default;
/// its replicas' state changes are written at once.
pub const PROGRESS_EVERY: Duration = Duration::from_millis(250);

/// Puts in one transaction of reports (etcd refuses more than 128
/// operations in one by default).
pub const PUTS_PER_TXN: usize = 100;

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
    // Each volume's activity count when it was last asked.
    let mut seen: HashMap<String, u64> = HashMap::new();
    // The probes answered so far, by volume.
    let mut probed: BTreeMap<String, i64> = BTreeMap::new();
    let mut every = tokio::time::interval(every.max(Duration::from_millis(10)));
    let mut probes_open = true;
    loop {
        // The volumes to ask: those whose activity moved (a tick), those
        // a new probe names, or primaries whose replicas changed state.
        let states_changed = tokio::select! {
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
        let answered = match &states_changed {
            None => probes.borrow_and_update().clone(),
            Some(_) => probes.borrow().clone(),
        };
        let names: BTreeSet<String> = match states_changed {
            Some(named) => named,
            None => {
                let mut names = node.moved_since(&mut seen);
                names.extend(
                    answered
                        .iter()
                        .filter(|(volume, probe)| probed.get(*volume) != Some(probe))
                        .map(|(volume, _)| volume.clone()),
                );
                probed.clone_from(&answered);
                names
            }
        };
        if names.is_empty() {
            continue;
        }
        let mut puts = Vec::new();
        let statuses = node.statuses_named(&names).await;
        // A volume asked that gave no status (stopping, mid role change)
        // is asked again at the next pass, and so is its probe.
        for name in &names {
            if !statuses.iter().any(|(asked, _)| asked == name) {
                seen.remove(name);
                probed.remove(name);
            }
        }
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
                                    state: s.state,
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
                // Nothing to report until it serves (its opening moves
                // its activity).
                NodeStatus::Peering(_) => {
                    seen.remove(&name);
                    continue;
                }
            };
            let Ok(value) = value else {
                continue;
            };
            if last.get(&key) != Some(&value) {
                puts.push((name, key, value));
            }
        }
        for batch in puts.chunks(PUTS_PER_TXN) {
            let ops: Vec<TxnOp> = batch
                .iter()
                .map(|(_, key, value)| TxnOp::put(key.as_str(), value.clone(), None))
                .collect();
            match client.txn(Txn::new().and_then(ops)).await {
                Ok(_) => {
                    for (_, key, value) in batch {
                        last.insert(key.clone(), value.clone());
                    }
                }
                Err(e) => {
                    tracing::warn!(error = %e, volumes = batch.len(), "etcd: reports not written");
                    // Asked again at the next pass.
                    for (name, _, _) in batch {
                        seen.remove(name);
                    }
                }
            }
        }
    }
}
