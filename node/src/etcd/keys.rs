//! Every key the control plane uses, under `/walship/<cluster>/`:
//!
//! | key | written by | lease | what |
//! |---|---|---|---|
//! | `volumes/<volume>` | the first node to start it; the controller | none | [`VolumeRecord`](crate::control::VolumeRecord): the assignment |
//! | `nodes/<node>` | the node | the node's | [`NodeRecord`](crate::control::NodeRecord): its addresses, whether it serves |
//! | `addresses/<node>` | the node, at each start | none | its replication address (a lost primary is put back at it) |
//! | `progress/<volume>` | the primary; a promotion | none | [`ProgressRecord`](crate::control::ProgressRecord) |
//! | `replicas/<volume>/<node>` | each replica | none | [`ReplicaReport`](crate::control::ReplicaReport) |
//! | `probes/<volume>` | the controller | none | [`Probe`](crate::control::Probe) |
//! | `decisions/<volume>` | the controller; an operator | none | [`Decision`](crate::control::Decision) |
//! | `terms/<volume>` | each primary, before it opens | none | the newest term opened ([`EtcdTerms`](super::EtcdTerms)) |
//! | `controller/…` | etcd's election | each candidate's | who controls |

/// The key prefix of a cluster.
pub fn prefix(cluster: &str) -> String {
    format!("/walship/{cluster}/")
}

/// The key of a volume's record.
pub fn volume_key(cluster: &str, volume: &str) -> String {
    format!("{}volumes/{volume}", prefix(cluster))
}

/// The key of a node's entry.
pub fn node_key(cluster: &str, node: &str) -> String {
    format!("{}nodes/{node}", prefix(cluster))
}

/// The key of a node's replication address, kept after its lease goes (a
/// lost primary is put back as a replica at it).
pub fn address_key(cluster: &str, node: &str) -> String {
    format!("{}addresses/{node}", prefix(cluster))
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

/// The key of the newest term a volume's primaries opened in.
pub fn term_key(cluster: &str, volume: &str) -> String {
    format!("{}terms/{volume}", prefix(cluster))
}

/// The controller's election.
pub fn election_key(cluster: &str) -> String {
    format!("{}controller", prefix(cluster))
}

/// What a key under a cluster's prefix names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Key<'a> {
    /// `volumes/<volume>`.
    Volume(&'a str),
    /// `nodes/<node>`.
    Node(&'a str),
    /// `addresses/<node>`.
    Address(&'a str),
    /// `progress/<volume>`.
    Progress(&'a str),
    /// `replicas/<volume>/<node>`.
    Report(&'a str, &'a str),
    /// `probes/<volume>`.
    Probe(&'a str),
    /// `decisions/<volume>`.
    Decision(&'a str),
    /// Anything else (terms, the election).
    Other,
}

impl<'a> Key<'a> {
    /// What `key` names, if it is under `prefix` (a cluster's).
    pub fn parse(prefix: &str, key: &'a str) -> Option<Self> {
        let rest = key.strip_prefix(prefix)?;
        let (kind, name) = rest.split_once('/').unwrap_or((rest, ""));
        if name.is_empty() {
            return Some(Self::Other);
        }
        Some(match kind {
            "volumes" => Self::Volume(name),
            "nodes" => Self::Node(name),
            "addresses" => Self::Address(name),
            "progress" => Self::Progress(name),
            "replicas" => match name.split_once('/') {
                Some((volume, node)) if !node.is_empty() => Self::Report(volume, node),
                _ => Self::Other,
            },
            "probes" => Self::Probe(name),
            "decisions" => Self::Decision(name),
            _ => Self::Other,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_key_parses_back_to_what_it_names() {
        let p = prefix("c");
        let cases = [
            (volume_key("c", "v"), Key::Volume("v")),
            (node_key("c", "n"), Key::Node("n")),
            (address_key("c", "n"), Key::Address("n")),
            (progress_key("c", "v"), Key::Progress("v")),
            (replica_report_key("c", "v", "n"), Key::Report("v", "n")),
            (probe_key("c", "v"), Key::Probe("v")),
            (decision_key("c", "v"), Key::Decision("v")),
            (term_key("c", "v"), Key::Other),
            (election_key("c"), Key::Other),
            (format!("{p}replicas/v"), Key::Other),
        ];
        for (key, named) in cases {
            assert_eq!(Key::parse(&p, &key), Some(named), "{key}");
        }
        assert_eq!(Key::parse(&p, "/walship/other/volumes/v"), None);
    }
}
