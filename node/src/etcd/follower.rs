//! A node following etcd: its volumes' records read before it opens them,
//! then every newer one applied as an assignment; the controller's
//! decisions shown in its status, its probes passed to the reporter.

use super::feed::Feed;
use super::keys::volume_key;
use super::store::range;
use super::{session::stopping, EtcdError};
use crate::config::{NodeConfig, VolumeSpec};
use crate::control::VolumeRecord;
use crate::node::{Node, NodeError};
use etcd_client::{Client, Compare, CompareOp, Txn, TxnOp, TxnOpResponse};
use futures::{StreamExt, TryStreamExt};
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;
use tokio::sync::watch;

/// Brings `config`'s volumes in line with their records (creating the
/// missing ones from it); the revision to watch the records after.
pub(super) async fn read_records(
    client: &mut Client,
    config: &mut NodeConfig,
    failed: &impl Fn(etcd_client::Error) -> EtcdError,
) -> Result<i64, EtcdError> {
    // Every record in one range read (10,000 reads one after the other
    // took a node's start 30 s at 10,000 volumes). The watch starts after
    // it: a record written since is seen again (and fenced, if not
    // newer), never missed.
    let prefix = volume_key(&config.cluster, "");
    let (kvs, revision) = range(client, &prefix).await.map_err(failed)?;
    let mut stored: HashMap<String, Vec<u8>> = kvs
        .into_iter()
        .filter_map(|kv| {
            let volume = kv.key_str().ok()?.strip_prefix(&prefix)?.to_owned();
            Some((volume, kv.value().to_vec()))
        })
        .collect();
    // The missing ones written from the config, a few at a time; one
    // another node wrote first is read instead.
    let missing: Vec<(String, VolumeRecord)> = config
        .volumes
        .iter()
        .filter(|spec| !stored.contains_key(&spec.name))
        .map(|spec| (spec.name.clone(), from_config(spec)))
        .collect();
    let created: Vec<(String, Option<Vec<u8>>)> =
        futures::stream::iter(missing.into_iter().map(|(volume, record)| {
            let (mut client, key) = (client.clone(), volume_key(&config.cluster, &volume));
            async move {
                let found = create(&mut client, &key, &record, failed).await?;
                Ok::<_, EtcdError>((volume, found))
            }
        }))
        .buffer_unordered(RECORDS_AT_ONCE)
        .try_collect()
        .await?;
    for (volume, found) in created {
        match found {
            Some(value) => drop(stored.insert(volume, value)),
            None => tracing::info!(volume, "etcd: record created from the config"),
        }
    }
    for spec in &mut config.volumes {
        let Some(value) = stored.get(&spec.name) else {
            continue;
        };
        let key = volume_key(&config.cluster, &spec.name);
        let record = as_assigned(parse(&key, value)?, &config.node);
        check(&key, &spec.name, &record, &config.node, spec.size)?;
        if record != from_config(spec) {
            tracing::info!(volume = %spec.name, epoch = record.assignment.epoch,
                primary = %record.assignment.primary, "etcd: the record overrides the config");
        }
        spec.assignment = record.assignment;
    }
    Ok(revision)
}

/// How many records a node creates, or applies, at once.
const RECORDS_AT_ONCE: usize = 16;

/// A volume's record as its config says it.
fn from_config(spec: &VolumeSpec) -> VolumeRecord {
    VolumeRecord {
        assignment: spec.assignment.clone(),
        size: spec.size,
        departed: BTreeMap::new(),
    }
}

/// Writes `record` at `key` unless there is one: `None` if written, the
/// value there if not.
async fn create(
    client: &mut Client,
    key: &str,
    record: &VolumeRecord,
    failed: &impl Fn(etcd_client::Error) -> EtcdError,
) -> Result<Option<Vec<u8>>, EtcdError> {
    let value = serde_json::to_vec(record)?;
    let txn = Txn::new()
        .when([Compare::create_revision(key, CompareOp::Equal, 0)])
        .and_then([TxnOp::put(key, value, None)])
        .or_else([TxnOp::get(key, None)]);
    let response = client.txn(txn).await.map_err(failed)?;
    if response.succeeded() {
        return Ok(None);
    }
    let stored = response.op_responses().into_iter().find_map(|op| match op {
        TxnOpResponse::Get(get) => get.kvs().first().map(|kv| kv.value().to_vec()),
        _ => None,
    });
    match stored {
        Some(stored) => Ok(Some(stored)),
        None => Err(EtcdError::Record {
            key: key.to_owned(),
            what: "exists but could not be read".into(),
        }),
    }
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
    let (known, revision) = range(client, &prefix).await?;
    for kv in &known {
        notes.take(kv);
    }
    Feed::open(client, prefix, revision + 1).await
}

/// Applies each newer record of a hosted volume, and notes each decision
/// and probe about one. Ends when a watch does.
pub(super) async fn follow(
    node: Arc<Node>,
    (mut records, watch_prefix): (Feed, String),
    (notes, mut decisions, mut probes): (Notes, Feed, Feed),
    mut stopped: watch::Receiver<bool>,
) -> Option<String> {
    // Records are applied [`RECORDS_AT_ONCE`] at a time, each on a task of
    // its own: a failover at 10,000 volumes hands a node 1,667 promotions,
    // and one after the other (a store reopened, peered, its term
    // recorded) the last waited 33 s. Two records of one volume need no
    // order: the node takes one change of a volume at a time, and one not
    // newer than the applied is refused.
    let at_once = Arc::new(tokio::sync::Semaphore::new(RECORDS_AT_ONCE));
    loop {
        tokio::select! {
            () = stopping(&mut stopped) => return None,
            puts = decisions.puts() => puts.iter().for_each(|kv| notes.take(kv)),
            puts = probes.puts() => puts.iter().for_each(|kv| notes.take(kv)),
            puts = records.puts() => {
                for kv in puts {
                    let key = String::from_utf8_lossy(kv.key()).into_owned();
                    let Some(volume) = key.strip_prefix(&watch_prefix).map(str::to_owned) else { continue };
                    let Ok(permit) = Arc::clone(&at_once).acquire_owned().await else { continue };
                    let node = Arc::clone(&node);
                    tokio::spawn(async move {
                        apply(&node, &key, &volume, kv.value()).await;
                        drop(permit);
                    });
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
    let Some(size) = node.volume_size(volume) else {
        return Ok(None);
    };
    let record = parse(key, value).map_err(|e| e.to_string())?;
    let record = as_assigned(record, node.name());
    check(key, volume, &record, node.name(), size).map_err(|e| e.to_string())?;
    // Carried out on a task of its own: a role change stops the volume and
    // opens it again, and must not be cut short when the session that
    // asked for it ends (a lost session is aborted). A later apply waits
    // for it (`Node::apply_assignment` takes one change of a volume at a
    // time).
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
    let prefix = volume_key(cluster, "");
    let (kvs, revision) = range(client, &prefix)
        .await
        .map_err(|e| EtcdError::Record {
            key: prefix.clone(),
            what: e.to_string(),
        })?;
    let hosted: BTreeSet<&str> = node
        .config()
        .volumes
        .iter()
        .map(|v| v.name.as_str())
        .collect();
    // Owned, and collected first: a stream over borrowing closures is not
    // known to be Send for every lifetime (rust#102211).
    let applying: Vec<_> = kvs
        .into_iter()
        .filter_map(|kv| {
            let key = kv.key_str().ok()?.to_owned();
            let volume = key.strip_prefix(&prefix).filter(|v| hosted.contains(v))?;
            let volume = volume.to_owned();
            Some(rejoin(Arc::clone(node), key, volume, kv.value().to_vec()))
        })
        .collect();
    futures::stream::iter(applying)
        .buffer_unordered(RECORDS_AT_ONCE)
        .try_collect::<()>()
        .await?;
    Ok(revision)
}

/// Applies `volume`'s record (`value`, at `key`) on rejoining, if newer.
async fn rejoin(
    node: Arc<Node>,
    key: String,
    volume: String,
    value: Vec<u8>,
) -> Result<(), EtcdError> {
    let record = take(&node, &key, &volume, &value)
        .await
        .map_err(|what| EtcdError::Record { key, what })?;
    if let Some(record) = record {
        tracing::info!(volume, epoch = record.assignment.epoch, primary = %record.assignment.primary,
            "etcd: assignment applied on rejoining");
    }
    Ok(())
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
