//! What crosses etcd: every record a node or the controller writes, as
//! typed values (the keys they live under are `etcd::keys`'s).

use crate::assignment::{Applied, Assignment};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use walship_engine::ReplicaState;

/// A volume's record in etcd: its [`Assignment`] (JSON: its fields, flat),
/// the volume's size, and its departed primaries.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(from = "StoredRecord")]
pub struct VolumeRecord {
    /// Who is primary in which epoch, under which mode, with which
    /// replicas.
    #[serde(flatten)]
    pub assignment: Assignment,
    /// Size in bytes.
    pub size: u64,
    /// Lost primaries waiting to come back (node → replication address):
    /// left out of the replicas, which under sync_all would stop every
    /// commit until they return; the controller adds each back, in a new
    /// epoch, once it registers again.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub departed: BTreeMap<String, String>,
}

/// A record as stored: flat, and a field this version does not know is
/// refused (a newer one's may change what the record means). Serde's
/// `flatten` cannot deny unknown fields, hence this.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct StoredRecord {
    epoch: u64,
    primary: String,
    commit_mode: walship_engine::CommitMode,
    size: u64,
    replicas: BTreeMap<String, String>,
    #[serde(default)]
    departed: BTreeMap<String, String>,
}

impl From<StoredRecord> for VolumeRecord {
    fn from(stored: StoredRecord) -> Self {
        Self {
            assignment: Assignment {
                epoch: stored.epoch,
                primary: stored.primary,
                commit_mode: stored.commit_mode,
                replicas: stored.replicas,
            },
            size: stored.size,
            departed: stored.departed,
        }
    }
}

impl VolumeRecord {
    /// The record as the assignment a node applies.
    pub fn applied(&self) -> Applied {
        self.assignment.applied()
    }
}

/// A node's entry under `nodes/`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeRecord {
    /// Replication listener.
    pub replication: String,
    /// Admin endpoint, if any.
    pub admin: Option<String>,
    /// NBD listener, if any.
    pub nbd: Option<String>,
    /// Its volumes are open and it serves (written again once they are):
    /// a lost primary back is added as a replica only then.
    #[serde(default)]
    pub ready: bool,
}

/// One replica as its primary last reported it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReplicaProgress {
    /// Its durable LSN.
    pub flushed: u64,
    /// Its state (`in_sync`, `catching_up`...), typed; one this version
    /// does not know reads as `disconnected` (never eligible).
    #[serde(deserialize_with = "known_state")]
    pub state: ReplicaState,
}

/// A replica state by its name; an unknown one as disconnected.
fn known_state<'de, D: serde::Deserializer<'de>>(names: D) -> Result<ReplicaState, D::Error> {
    let name = String::deserialize(names)?;
    Ok(ReplicaState::ALL
        .into_iter()
        .find(|state| state.as_str() == name)
        .unwrap_or(ReplicaState::Disconnected))
}

/// A primary's report of its volume (`progress/<volume>`).
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

/// A controller's decision about a volume whose primary was lost
/// (`decisions/<volume>`). Read through [`StoredDecision`]: a decision
/// written before its outcome was named reads the same.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(from = "StoredDecision")]
pub struct Decision {
    /// The epoch whose primary was lost.
    pub epoch: u64,
    /// That primary.
    pub lost_primary: String,
    /// The committed LSN the candidates were judged against.
    pub committed: u64,
    /// What was decided.
    #[serde(flatten)]
    pub outcome: Outcome,
    /// Every candidate rejected, with every reason.
    pub rejected: BTreeMap<String, Vec<String>>,
    /// The controller (or operator) that decided.
    pub by: String,
}

/// What a [`Decision`] decided: one of three outcomes, each with what
/// only it has. Flattened into the decision's JSON (`"outcome":
/// "promoted"`, `"promoted": "node2"`...).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "outcome", rename_all = "snake_case")]
pub enum Outcome {
    /// This node is primary in `epoch + 1`: it held every committed write.
    Promoted {
        /// The node promoted.
        promoted: String,
    },
    /// An operator's promotion (the desperate path): this node is primary
    /// in `epoch + 1`, and what it lacks is lost.
    AcceptedLoss {
        /// The node promoted.
        promoted: String,
        /// What was given up.
        data_loss: DataLoss,
    },
    /// Nobody was promoted: the volume stays down.
    Down {
        /// Why nobody was promoted although a candidate was eligible (too
        /// few replicas answered for a sync_quorum volume; best_effort).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        blocked: Option<String>,
        /// Why this is over (its primary serves again in the same epoch),
        /// written by a later controller's pass.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        over: Option<String>,
    },
}

/// A decision as stored, old or new: one written before the outcome was
/// named (issue 26) has the outcome's fields and no `outcome`; what it
/// decided follows from which it has.
#[derive(Deserialize)]
struct StoredDecision {
    epoch: u64,
    lost_primary: String,
    committed: u64,
    #[serde(default)]
    promoted: Option<String>,
    #[serde(default)]
    data_loss: Option<DataLoss>,
    #[serde(default)]
    blocked: Option<String>,
    #[serde(default)]
    over: Option<String>,
    rejected: BTreeMap<String, Vec<String>>,
    by: String,
}

impl From<StoredDecision> for Decision {
    fn from(stored: StoredDecision) -> Self {
        let outcome = match (stored.promoted, stored.data_loss) {
            (Some(promoted), Some(data_loss)) => Outcome::AcceptedLoss {
                promoted,
                data_loss,
            },
            (Some(promoted), None) => Outcome::Promoted { promoted },
            (None, _) => Outcome::Down {
                blocked: stored.blocked,
                over: stored.over,
            },
        };
        Self {
            epoch: stored.epoch,
            lost_primary: stored.lost_primary,
            committed: stored.committed,
            outcome,
            rejected: stored.rejected,
            by: stored.by,
        }
    }
}

impl Decision {
    /// The node promoted, if one was.
    pub fn promoted(&self) -> Option<&str> {
        match &self.outcome {
            Outcome::Promoted { promoted } | Outcome::AcceptedLoss { promoted, .. } => {
                Some(promoted)
            }
            Outcome::Down { .. } => None,
        }
    }

    /// Why an eligible replica was not promoted, if that is why the volume
    /// is down.
    pub fn blocked(&self) -> Option<&str> {
        match &self.outcome {
            Outcome::Down { blocked, .. } => blocked.as_deref(),
            _ => None,
        }
    }

    /// Why a "down" decision is over, once it is.
    pub fn over(&self) -> Option<&str> {
        match &self.outcome {
            Outcome::Down { over, .. } => over.as_deref(),
            _ => None,
        }
    }

    /// What an operator's promotion gave up.
    pub fn data_loss(&self) -> Option<&DataLoss> {
        match &self.outcome {
            Outcome::AcceptedLoss { data_loss, .. } => Some(data_loss),
            _ => None,
        }
    }

    /// Whether the volume is down by this decision, and still is.
    pub fn keeps_down(&self) -> bool {
        matches!(self.outcome, Outcome::Down { over: None, .. })
    }
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_decision_is_flat_json_with_its_outcome_named() {
        let decision = Decision {
            epoch: 3,
            lost_primary: "node1".into(),
            committed: 40,
            outcome: Outcome::Down {
                blocked: Some("why".into()),
                over: None,
            },
            rejected: BTreeMap::new(),
            by: "node2".into(),
        };
        let json: serde_json::Value = serde_json::to_value(&decision).unwrap();
        assert_eq!(json["outcome"], "down");
        assert_eq!(json["blocked"], "why");
        assert!(json.get("over").is_none(), "{json}");
        let back: Decision = serde_json::from_value(json).unwrap();
        assert_eq!(back, decision);
        let promoted = Decision {
            outcome: Outcome::Promoted {
                promoted: "node3".into(),
            },
            ..decision
        };
        let json = serde_json::to_value(&promoted).unwrap();
        assert_eq!(
            (&json["outcome"], &json["promoted"]),
            (&"promoted".into(), &"node3".into())
        );
        assert_eq!(serde_json::from_value::<Decision>(json).unwrap(), promoted);
    }

    /// A record is its assignment's fields, flat, with the size and the
    /// departed beside them, as before the assignment was one type; a
    /// field nobody knows is refused.
    #[test]
    fn a_volume_record_is_flat_json_and_refuses_unknown_fields() {
        let json = r#"{"epoch":2,"primary":"n1","commit_mode":"sync_all","size":4096,"replicas":{"n2":"127.0.0.1:1"},"departed":{"n3":"127.0.0.1:2"}}"#;
        let record: VolumeRecord = serde_json::from_str(json).unwrap();
        assert_eq!(
            (record.assignment.epoch, record.size, record.departed.len()),
            (2, 4096, 1)
        );
        let back = serde_json::to_value(&record).unwrap();
        assert_eq!(
            back,
            serde_json::from_str::<serde_json::Value>(json).unwrap()
        );
        let unknown = json.replace(r#""size":4096"#, r#""size":4096,"sise":1"#);
        assert!(serde_json::from_str::<VolumeRecord>(&unknown).is_err());
    }

    /// A replica's state crosses etcd typed, by the same name as in the
    /// status; a name this version does not know is never eligible.
    #[test]
    fn replica_states_cross_etcd_typed() {
        let known: ReplicaProgress =
            serde_json::from_str(r#"{"flushed":3,"state":"in_sync"}"#).unwrap();
        assert_eq!(known.state, ReplicaState::InSync);
        assert_eq!(
            serde_json::to_string(&known).unwrap(),
            r#"{"flushed":3,"state":"in_sync"}"#
        );
        let unknown: ReplicaProgress =
            serde_json::from_str(r#"{"flushed":3,"state":"resting"}"#).unwrap();
        assert_eq!(unknown.state, ReplicaState::Disconnected);
    }

    /// Decisions written before the outcome was named (four options)
    /// read as the outcome they were.
    #[test]
    fn a_decision_written_before_outcomes_were_named_reads_the_same() {
        let old = |extra: &str| {
            let json = format!(
                r#"{{"epoch":1,"lost_primary":"node1","committed":9,"promoted":null,"rejected":{{}},"by":"node2"{extra}}}"#
            );
            serde_json::from_str::<Decision>(&json).unwrap().outcome
        };
        assert_eq!(
            old(r#","over":"node1 serves again""#),
            Outcome::Down {
                blocked: None,
                over: Some("node1 serves again".into())
            }
        );
        assert_eq!(
            old(r#","blocked":"best_effort: …""#),
            Outcome::Down {
                blocked: Some("best_effort: …".into()),
                over: None
            }
        );
        let promoted = r#"{"epoch":1,"lost_primary":"node1","committed":9,"promoted":"node3","rejected":{},"by":"node2"}"#;
        assert_eq!(
            serde_json::from_str::<Decision>(promoted)
                .unwrap()
                .promoted(),
            Some("node3")
        );
        let desperate = r#"{"epoch":1,"lost_primary":"node1","committed":9,"promoted":"node3","rejected":{},"by":"operator","data_loss":{"after":5,"through":9,"waived":[]}}"#;
        let loss = serde_json::from_str::<Decision>(desperate).unwrap();
        assert_eq!(loss.data_loss().map(|l| (l.after, l.through)), Some((5, 9)));
    }
}
