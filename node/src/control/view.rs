//! What the controller knows of the cluster at one revision: every record
//! under the cluster's prefix, typed, each with the revision it was last
//! written at (the guards of a transaction compare those).

use super::records::{Decision, NodeRecord, Probe, ProgressRecord, ReplicaReport, VolumeRecord};
use std::collections::{BTreeMap, BTreeSet};

/// A value and the revision it was last written at (etcd's
/// `mod_revision`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Versioned<T> {
    /// The value.
    pub value: T,
    /// Its revision.
    pub revision: i64,
}

impl<T> Versioned<T> {
    /// `value` written at `revision`.
    pub fn new(value: T, revision: i64) -> Self {
        Self { value, revision }
    }
}

/// The cluster as one read saw it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ClusterView {
    /// Each volume's record (`volumes/<volume>`).
    pub volumes: BTreeMap<String, Versioned<VolumeRecord>>,
    /// The registered nodes (`nodes/<node>`, under their leases).
    pub nodes: BTreeMap<String, NodeRecord>,
    /// Each node's replication address, kept after its lease
    /// (`addresses/<node>`, rewritten at each start).
    pub addresses: BTreeMap<String, Versioned<String>>,
    /// Each volume's primary's last report (`progress/<volume>`).
    pub progress: BTreeMap<String, ProgressRecord>,
    /// Each volume's replicas' own reports, by node
    /// (`replicas/<volume>/<node>`).
    pub reports: BTreeMap<String, BTreeMap<String, ReplicaReport>>,
    /// The controller's last probe of each volume (`probes/<volume>`).
    pub probes: BTreeMap<String, Versioned<Probe>>,
    /// The last decision about each volume (`decisions/<volume>`).
    pub decisions: BTreeMap<String, Versioned<Decision>>,
}

impl ClusterView {
    /// The registered nodes.
    pub fn live(&self) -> BTreeSet<String> {
        self.nodes.keys().cloned().collect()
    }

    /// Whether `node` is registered and serves (its volumes are open).
    pub fn ready(&self, node: &str) -> bool {
        self.nodes.get(node).is_some_and(|n| n.ready)
    }

    /// Whether `node` is registered.
    pub fn registered(&self, node: &str) -> bool {
        self.nodes.contains_key(node)
    }
}
