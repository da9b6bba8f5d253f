//! A node following etcd: its volumes' records read before it opens them,
//! then every newer one applied as an assignment; the controller's
//! decisions shown in its status, its probes passed to the reporter.

use super::feed::Feed;
use super::keys::volume_key;
use super::{session::stopping, EtcdError};
use crate::config::NodeConfig;
use crate::control::VolumeRecord;
use crate::node::{Node, NodeError};
use etcd_client::{Client, Compare, CompareOp, GetOptions, Txn, TxnOp, TxnOpResponse};
use std::collections::BTreeMap;
use std::sync::Arc;
use tokio::sync::watch;

/// Brings `config`'s volumes in line with their records (creating the
/// missing ones from it); the revision to watch the records after.
pub(super) async fn read_records(
    client: &mut Client,
    config: &mut NodeConfig,
    failed: &impl Fn(etcd_client::Error) -> EtcdError,
) -> Result<i64, EtcdError> {
    // The watch starts after the oldest read: a record written between
    // two reads is seen again (and fenced, if not newer), never missed.
    let mut revision = i64::MAX;
    for spec in &mut config.volumes {
        let key = volume_key(&config.cluster, &spec.name);
        let from_config = VolumeRecord {
            assignment: spec.assignment.clone(),
            size: spec.size,
            departed: BTreeMap::new(),
        };
        let value = serde_json::to_vec(&from_config)?;
        // Written only if nobody wrote it first; read otherwise.
        let txn = Txn::new()
            .when([Compare::create_revision(key.as_str(), CompareOp::Equal, 0)])
            .and_then([TxnOp::put(key.as_str(), value, None)])
            .or_else([TxnOp::get(key.as_str(), None)]);
        let response = client.txn(txn).await.map_err(failed)?;
        revision = revision.min(response.header().map_or(0, |h| h.revision()));
        if response.succeeded() {
            tracing::info!(volume = %spec.name, epoch = spec.assignment.epoch, "etcd: record created from the config");
            continue;
        }
        let stored = response.op_responses().into_iter().find_map(|op| match op {
            TxnOpResponse::Get(get) => get.kvs().first().map(|kv| kv.value().to_vec()),
            _ => None,
        });
        let Some(stored) = stored else {
            return Err(EtcdError::Record {
                key,
                what: "exists but could not be read".into(),
            });
        };
        let record = as_assigned(parse(&key, &stored)?, &config.node);
        check(&key, &spec.name, &record, &config.node, spec.size)?;
        if record != from_config {
            tracing::info!(volume = %spec.name, epoch = record.assignment.epoch,
                primary = %record.assignment.primary, "etcd: the record overrides the config");
        }
        spec.assignment = record.assignment;
    }
    if revision == i64::MAX {
        // No volumes: watch from now.
        let now = client.get("/", None).await.map_err(failed)?;
        revision = now.header().map_or(0, |h| h.revision());
    }
    Ok(revision)
}

/// What a node takes from the controller's keys: decisions, shown in its
/// status, and probes, which its reports answer.
pub(super) struct Notes {
    pub(super) decisions: String,
    pub(super) probes: String,
    pub(super) node: Arc<Node>,
    /// Volume → the revision of the last probe about it.
    pub(super) probes_tx: watch::Sender<BTreeMap<String, i64>>,
}

impl Notes {
    /// Takes a decision or a probe about a volume this node hosts.
    fn take(&self, kv: &etcd_client::KeyValue) {
        let Ok(key) = kv.key_str() else { return };
        if let Some(volume) = key.strip_prefix(&self.decisions) {
            if self.node.volume(volume).is_some() {
                if let Ok(decision) = serde_json::from_slice(kv.value()) {
                    self.node.note_control_decision(volume, decision);
                }
            }
        } else if let Some(volume) = key.strip_prefix(&self.probes) {
            if self.node.volume(volume).is_some() {
                let revision = kv.mod_revision();
                self.probes_tx.send_modify(|probes| {
                    probes.insert(volume.to_owned(), revision);
                });
            }
        }
    }
}

/// Takes what is under `prefix` now into `notes`, then follows it.
pub(super) async fn notes_feed(
    client: &mut Client,
    notes: &Notes,
    prefix: String,
) -> Result<Feed, etcd_client::Error> {
    let known = client
        .get(prefix.as_str(), Some(GetOptions::new().with_prefix()))
        .await?;
    for kv in known.kvs() {
        notes.take(kv);
    }
    let after = known.header().map_or(0, |h| h.revision()) + 1;
    Feed::open(client, prefix, after).await
}

/// Applies each newer record of a hosted volume, and notes each decision
/// and probe about one. Ends when a watch does.
pub(super) async fn follow(
    node: Arc<Node>,
    (mut records, watch_prefix): (Feed, String),
    (notes, mut decisions, mut probes): (Notes, Feed, Feed),
    mut stopped: watch::Receiver<bool>,
) -> Option<String> {
    loop {
        tokio::select! {
            () = stopping(&mut stopped) => return None,
            puts = decisions.puts() => puts.iter().for_each(|kv| notes.take(kv)),
            puts = probes.puts() => puts.iter().for_each(|kv| notes.take(kv)),
            puts = records.puts() => {
                for kv in puts {
                    let key = String::from_utf8_lossy(kv.key()).into_owned();
                    let Some(volume) = key.strip_prefix(&watch_prefix) else { continue };
                    apply(&node, &key, volume, kv.value()).await;
                }
            },
        }
    }
}

/// Applies the record of `volume` if this node hosts it and it is newer,
/// saying what came of it.
async fn apply(node: &Arc<Node>, key: &str, volume: &str, value: &[u8]) {
    match take(node, key, volume, value).await {
        Ok(Some(record)) => {
            tracing::info!(volume, epoch = record.assignment.epoch, primary = %record.assignment.primary,
            "etcd: assignment applied")
        }
        Ok(None) => {}
        Err(e) => tracing::error!(error = %e, volume, "etcd: record not applied"),
    }
}

/// Applies the record of `volume` if this node hosts it and it is newer:
/// the record applied; `None` if not hosted or not newer.
async fn take(
    node: &Arc<Node>,
    key: &str,
    volume: &str,
    value: &[u8],
) -> Result<Option<VolumeRecord>, String> {
    if node.volume(volume).is_none() {
        return Ok(None);
    }
    let config = node.config();
    let Some(spec) = config.volumes.iter().find(|v| v.name == volume) else {
        return Ok(None);
    };
    let record = parse(key, value).map_err(|e| e.to_string())?;
    let record = as_assigned(record, node.name());
    check(key, volume, &record, node.name(), spec.size).map_err(|e| e.to_string())?;
    // Carried out on a task of its own: a role change stops the volume and
    // opens it again, and must not be cut short when the session that
    // asked for it ends (a lost session is aborted). A later apply waits
    // for it (`Node::apply_assignment` takes one change at a time).
    let applying = tokio::spawn({
        let (node, volume, applied) = (Arc::clone(node), volume.to_owned(), record.applied());
        async move { node.apply_assignment(&volume, applied).await }
    });
    let applied = applying.await.map_err(|e| e.to_string())?;
    match applied {
        Ok(()) => Ok(Some(record)),
        Err(NodeError::Fenced { .. }) => {
            tracing::debug!(
                volume,
                epoch = record.assignment.epoch,
                "etcd: record not newer than the applied"
            );
            Ok(None)
        }
        Err(e) => Err(e.to_string()),
    }
}

/// A node whose session was lost brings every volume it hosts in line
/// with its record, whatever happened meanwhile (a promotion away from
/// it, a readmission): each applied if newer. The revision to watch the
/// records after. Fails if a record cannot be applied: the node stays
/// fenced and tries again.
pub(super) async fn resync(
    client: &mut Client,
    cluster: &str,
    node: &Arc<Node>,
) -> Result<i64, EtcdError> {
    let refused = |key: &str, what: String| EtcdError::Record {
        key: key.to_owned(),
        what,
    };
    let mut revision = i64::MAX;
    let hosted: Vec<String> = node
        .config()
        .volumes
        .iter()
        .map(|v| v.name.clone())
        .collect();
    for volume in hosted {
        let key = volume_key(cluster, &volume);
        let response = client
            .get(key.as_str(), None)
            .await
            .map_err(|e| refused(&key, e.to_string()))?;
        revision = revision.min(response.header().map_or(0, |h| h.revision()));
        let Some(kv) = response.kvs().first() else {
            continue;
        };
        if let Some(record) = take(node, &key, &volume, kv.value())
            .await
            .map_err(|what| refused(&key, what))?
        {
            tracing::info!(volume, epoch = record.assignment.epoch, primary = %record.assignment.primary,
                "etcd: assignment applied on rejoining");
        }
    }
    if revision == i64::MAX {
        let now = client
            .get("/", None)
            .await
            .map_err(|e| refused("/", e.to_string()))?;
        revision = now.header().map_or(0, |h| h.revision());
    }
    Ok(revision)
}

/// `record` as `node` takes it: a lost primary back (departed) opens as a
/// replica of the current primary, which connects to it once the
/// controller adds it back in the next epoch.
fn as_assigned(mut record: VolumeRecord, node: &str) -> VolumeRecord {
    if let Some(addr) = record.departed.get(node).cloned() {
        tracing::info!(epoch = record.assignment.epoch, primary = %record.assignment.primary,
            "etcd: this node lost the primary's seat; a replica, waiting to be added back");
        record.assignment.replicas.insert(node.to_owned(), addr);
    }
    record
}

pub(super) fn parse(key: &str, value: &[u8]) -> Result<VolumeRecord, EtcdError> {
    serde_json::from_slice(value).map_err(|e| EtcdError::Record {
        key: key.to_owned(),
        what: e.to_string(),
    })
}

/// What a record must say for `node` to open the volume from it: what the
/// config's loader checks of a volume, and the store's size.
fn check(
    key: &str,
    volume: &str,
    record: &VolumeRecord,
    node: &str,
    size: u64,
) -> Result<(), EtcdError> {
    let refuse = |what: String| {
        Err(EtcdError::Record {
            key: key.to_owned(),
            what,
        })
    };
    if record.size != size {
        return refuse(format!("size {} where the config says {size}", record.size));
    }
    record
        .applied()
        .check(volume, node)
        .or_else(|e| refuse(e.to_string()))
}
