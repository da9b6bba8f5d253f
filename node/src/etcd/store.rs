//! The controller's store: a [`ClusterView`] read from etcd in one range
//! read (one revision), or kept by a watch after it ([`put`], [`delete`]:
//! `etcd/watched.rs`), and each [`Action`] carried out as one transaction
//! under its guards.

use super::keys::{decision_key, node_key, prefix, probe_key, progress_key, volume_key, Key};
use crate::control::{Action, ClusterView, Guard, NodeRecord, Versioned, Write};
use etcd_client::{Client, Compare, CompareOp, GetOptions, KeyValue, Txn, TxnOp, WatchOptions};
use serde::de::DeserializeOwned;

/// An elected controller's election key and its revision: a compare on
/// them holds while it is still the controller.
pub(super) type Leader = (Vec<u8>, i64);

/// A cluster's records in etcd, as the controller (or an operator) reads
/// and writes them. A clone shares its client's connection.
#[derive(Clone)]
pub(super) struct Store {
    client: Client,
    cluster: String,
    /// The controller's seat, if this store's writer holds it.
    leader: Option<Leader>,
}

impl Store {
    /// `cluster`'s records through `client`; `leader`: the seat held.
    pub(super) fn new(client: Client, cluster: &str, leader: Option<Leader>) -> Self {
        Self {
            client,
            cluster: cluster.to_owned(),
            leader,
        }
    }

    /// Every record of the cluster, at one revision. A value that does not
    /// parse is left out (and said).
    pub(super) async fn read(&mut self) -> Result<ClusterView, etcd_client::Error> {
        Ok(self.read_at().await?.0)
    }

    /// [`read`](Self::read), and the revision it read at.
    pub(super) async fn read_at(&mut self) -> Result<(ClusterView, i64), etcd_client::Error> {
        let prefix = prefix(&self.cluster);
        let (kvs, revision) = range(&mut self.client, &prefix).await?;
        let mut view = ClusterView::default();
        for kv in &kvs {
            let Ok(key) = kv.key_str() else { continue };
            put(&mut view, &prefix, key, kv.value(), kv.mod_revision());
        }
        Ok((view, revision))
    }

    /// The cluster's prefix, watched from `from` (a revision).
    pub(super) async fn watch_from(
        &mut self,
        from: i64,
    ) -> Result<etcd_client::WatchStream, etcd_client::Error> {
        let prefix = prefix(&self.cluster);
        let options = WatchOptions::new().with_prefix().with_start_revision(from);
        self.client.watch(prefix.as_str(), Some(options)).await
    }

    /// The cluster's key prefix.
    pub(super) fn prefix(&self) -> String {
        prefix(&self.cluster)
    }

    /// Carries out `action` as one transaction: its writes if every guard
    /// holds. The revision it was written at if it held; `None` if a guard
    /// failed (or it writes nothing).
    pub(super) async fn apply(
        &mut self,
        action: &Action,
    ) -> Result<Option<i64>, etcd_client::Error> {
        self.apply_all(&[action]).await
    }

    /// Carries out `actions` as one transaction: all their writes if every
    /// guard of every one holds, none otherwise. The revision they were
    /// written at if they held; `None` if a guard failed (or none writes).
    pub(super) async fn apply_all(
        &mut self,
        actions: &[&Action],
    ) -> Result<Option<i64>, etcd_client::Error> {
        let (mut when, mut puts) = (Vec::new(), Vec::new());
        for (guards, writes) in actions.iter().filter_map(|a| a.transaction()) {
            for guard in &guards {
                when.push(self.compare(guard)?);
            }
            for write in &writes {
                puts.push(self.put(write)?);
            }
        }
        if puts.is_empty() {
            return Ok(None);
        }
        let response = self
            .client
            .txn(Txn::new().when(when).and_then(puts))
            .await?;
        Ok(response
            .succeeded()
            .then(|| response.header().map_or(i64::MAX, |h| h.revision())))
    }

    /// Writes `write` whatever is there; the revision it was written at.
    pub(super) async fn write(&mut self, write: &Write) -> Result<i64, etcd_client::Error> {
        let put = self.put(write)?;
        let response = self.client.txn(Txn::new().and_then([put])).await?;
        Ok(response.header().map_or(i64::MAX, |h| h.revision()))
    }

    /// Whether this store's writer still holds the controller's seat.
    pub(super) async fn still_leader(&mut self) -> Result<bool, etcd_client::Error> {
        let Some((key, _)) = &self.leader else {
            return Ok(false);
        };
        let held = self.client.get(key.clone(), None).await?;
        Ok(!held.kvs().is_empty())
    }

    /// The compare that holds while `guard` does.
    fn compare(&self, guard: &Guard) -> Result<Compare, etcd_client::Error> {
        let cluster = &self.cluster;
        Ok(match guard {
            Guard::RecordAt { volume, revision } => {
                Compare::mod_revision(volume_key(cluster, volume), CompareOp::Equal, *revision)
            }
            Guard::DecisionAt { volume, revision } => {
                Compare::mod_revision(decision_key(cluster, volume), CompareOp::Equal, *revision)
            }
            Guard::Registered(node) => {
                Compare::create_revision(node_key(cluster, node), CompareOp::NotEqual, 0)
            }
            Guard::Unregistered(node) => {
                Compare::create_revision(node_key(cluster, node), CompareOp::Equal, 0)
            }
            Guard::Controller => {
                let Some((key, rev)) = &self.leader else {
                    return Err(etcd_client::Error::InvalidArgs(
                        "a controller's action without the controller's seat".into(),
                    ));
                };
                Compare::create_revision(key.clone(), CompareOp::Equal, *rev)
            }
        })
    }

    /// The put that writes `write`.
    fn put(&self, write: &Write) -> Result<TxnOp, etcd_client::Error> {
        let cluster = &self.cluster;
        let (key, value) = match write {
            Write::Record(volume, record) => (volume_key(cluster, volume), json(record)?),
            Write::Decision(volume, decision) => (decision_key(cluster, volume), json(decision)?),
            Write::Progress(volume, progress) => (progress_key(cluster, volume), json(progress)?),
            Write::Probe(volume, probe) => (probe_key(cluster, volume), json(probe)?),
        };
        Ok(TxnOp::put(key, value, None))
    }
}

/// Keys a range read asks for at once. A cluster of 10,000 volumes holds
/// some 50,000 keys, over 4 MiB: more than one gRPC message may carry.
const PAGE: i64 = 1000;

/// Everything under `prefix`, at one revision (read a [`PAGE`] at a
/// time), and that revision.
pub(super) async fn range(
    client: &mut Client,
    prefix: &str,
) -> Result<(Vec<KeyValue>, i64), etcd_client::Error> {
    // The end of the prefix's range: its last byte one higher (a prefix
    // of ours ends in '/').
    let mut end = prefix.as_bytes().to_vec();
    if let Some(last) = end.last_mut() {
        *last += 1;
    }
    let mut kvs: Vec<KeyValue> = Vec::new();
    let mut from = prefix.as_bytes().to_vec();
    let mut revision = 0;
    loop {
        let mut options = GetOptions::new().with_range(end.clone()).with_limit(PAGE);
        if revision > 0 {
            options = options.with_revision(revision);
        }
        let page = client.get(from.clone(), Some(options)).await?;
        if revision == 0 {
            revision = page.header().map_or(0, |h| h.revision());
        }
        kvs.extend_from_slice(page.kvs());
        match kvs.last() {
            Some(last) if page.more() => {
                // Just after the last key read.
                from = last.key().to_vec();
                from.push(0);
            }
            _ => return Ok((kvs, revision)),
        }
    }
}

/// `key` (under `prefix`) now holds `value`, written at `revision`: the
/// view takes it as one range read would.
pub(super) fn put(view: &mut ClusterView, prefix: &str, key: &str, value: &[u8], revision: i64) {
    // A value that does not parse leaves the key out, as a range read
    // would, not the value it replaced.
    delete(view, prefix, key);
    match Key::parse(prefix, key) {
        Some(Key::Volume(volume)) => {
            if let Some(record) = typed(key, value) {
                let record = Versioned::new(record, revision);
                view.volumes.insert(volume.to_owned(), record);
            }
        }
        Some(Key::Node(node)) => {
            // Registered whatever its value says: an entry that does not
            // parse is a live node all the same (not one to fail over
            // from), only not known to serve.
            let entry = typed(key, value).unwrap_or(NodeRecord {
                replication: String::new(),
                admin: None,
                nbd: None,
                ready: false,
            });
            view.nodes.insert(node.to_owned(), entry);
        }
        Some(Key::Address(node)) => {
            let address = String::from_utf8_lossy(value).into_owned();
            let address = Versioned::new(address, revision);
            view.addresses.insert(node.to_owned(), address);
        }
        Some(Key::Progress(volume)) => {
            if let Some(progress) = typed(key, value) {
                view.progress.insert(volume.to_owned(), progress);
            }
        }
        Some(Key::Report(volume, node)) => {
            if let Some(report) = typed(key, value) {
                let reports = view.reports.entry(volume.to_owned()).or_default();
                reports.insert(node.to_owned(), report);
            }
        }
        Some(Key::Probe(volume)) => {
            if let Some(probe) = typed(key, value) {
                let probe = Versioned::new(probe, revision);
                view.probes.insert(volume.to_owned(), probe);
            }
        }
        Some(Key::Decision(volume)) => {
            if let Some(decision) = typed(key, value) {
                let decision = Versioned::new(decision, revision);
                view.decisions.insert(volume.to_owned(), decision);
            }
        }
        Some(Key::Other) | None => {}
    }
}

/// `key` (under `prefix`) is gone: a node's lease ended, most often.
pub(super) fn delete(view: &mut ClusterView, prefix: &str, key: &str) {
    match Key::parse(prefix, key) {
        Some(Key::Volume(volume)) => drop(view.volumes.remove(volume)),
        Some(Key::Node(node)) => drop(view.nodes.remove(node)),
        Some(Key::Address(node)) => drop(view.addresses.remove(node)),
        Some(Key::Progress(volume)) => drop(view.progress.remove(volume)),
        Some(Key::Report(volume, node)) => {
            if let Some(reports) = view.reports.get_mut(volume) {
                reports.remove(node);
                if reports.is_empty() {
                    view.reports.remove(volume);
                }
            }
        }
        Some(Key::Probe(volume)) => drop(view.probes.remove(volume)),
        Some(Key::Decision(volume)) => drop(view.decisions.remove(volume)),
        Some(Key::Other) | None => {}
    }
}

/// `value` as JSON.
fn json(value: &impl serde::Serialize) -> Result<Vec<u8>, etcd_client::Error> {
    serde_json::to_vec(value).map_err(|e| etcd_client::Error::InvalidArgs(e.to_string()))
}

/// `value` read as a `T`; `None`, said, if it is not one.
fn typed<T: DeserializeOwned>(key: &str, value: &[u8]) -> Option<T> {
    serde_json::from_slice(value)
        .inspect_err(
            |e| tracing::debug!(key, error = %e, "etcd: a record that does not parse is left out"),
        )
        .ok()
}
