//! The assignment a node applied to a volume, persisted beside its store
//! (`<data_dir>/<volume>/assignment.json`, replaced atomically: written to
//! a temporary file, fsynced, renamed, directory fsynced), so a restart
//! never goes back to an older epoch.
//!
//! Which assignment a volume starts with is decided here: the config's,
//! when it is newer than the one applied last; else the one applied last.
//! A config that says something else at the epoch already applied is
//! refused: an assignment changes only with a newer epoch.
//!
//! The epoch the runtime runs in (the term, in every frame and hello) is
//! `epoch << 20 | incarnation`. A primary must open in a term its WAL has
//! not seen, so reopening on the same assignment (a restart) bumps the
//! incarnation, never the epoch: the epochs stay the control plane's, and
//! any newer assignment outranks every incarnation of the older ones.

use crate::config::VolumeSpec;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use walship_engine::{
    Assignment as EngineAssignment, CommitError, CommitMode, Endpoint, Epoch, InvalidReplicaId,
    ReplicaAssignment, ReplicaId,
};
use walship_io::fs::Fs;

/// A volume's assignment: who is primary in which epoch, under which
/// commit mode, with which replicas (node → replication address). The one
/// type a config's `[[volume]]`, the admin API (`POST
/// /volumes/{name}/assignment`) and etcd's records (`volumes/<name>`)
/// carry, checked by one [`validate`](Self::validate); [`Applied`] is what
/// a node made of one (endpoint versions, incarnation), persisted.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Assignment {
    /// Epoch: a newer assignment has a higher one.
    pub epoch: u64,
    /// The primary's node.
    pub primary: String,
    /// Commit mode.
    pub commit_mode: CommitMode,
    /// Replicas: node name → that node's replication address.
    pub replicas: BTreeMap<String, String>,
}

/// Why an assignment cannot be taken.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum AssignmentError {
    /// Epoch 0.
    #[error("epochs start at 1")]
    EpochZero,
    /// The primary's name cannot name a replica.
    #[error("primary {name:?}: {why}")]
    PrimaryName {
        /// The name.
        name: String,
        /// Why not.
        why: String,
    },
    /// The primary is among the replicas.
    #[error("{0} is its primary and cannot also be a replica")]
    PrimaryIsReplica(String),
    /// A replica's name cannot name a replica.
    #[error("replica {name:?}: {why}")]
    ReplicaName {
        /// The name.
        name: String,
        /// Why not.
        why: String,
    },
    /// A replica's address is not `host:port`.
    #[error("replica {name} at {addr:?}: {why}")]
    ReplicaAddress {
        /// The replica.
        name: String,
        /// Its address.
        addr: String,
        /// Why it does not parse.
        why: String,
    },
    /// The commit mode cannot be met by these members.
    #[error(transparent)]
    Topology(#[from] CommitError),
    /// The node taking it is neither primary nor replica.
    #[error("this node ({0}) is neither its primary nor one of its replicas")]
    LeavesOut(String),
}

/// The part of an assignment an [`AssignmentError`] is about: where a
/// config's refusal points.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum AssignmentField {
    /// `epoch`.
    Epoch,
    /// `primary`.
    Primary,
    /// `replicas`.
    Replicas,
    /// `commit_mode`.
    CommitMode,
    /// The volume as a whole (this node's place in it).
    Volume,
}

impl AssignmentError {
    /// The part of the assignment it is about.
    pub fn field(&self) -> AssignmentField {
        match self {
            Self::EpochZero => AssignmentField::Epoch,
            Self::PrimaryName { .. } => AssignmentField::Primary,
            Self::PrimaryIsReplica(_) | Self::ReplicaName { .. } | Self::ReplicaAddress { .. } => {
                AssignmentField::Replicas
            }
            Self::Topology(_) => AssignmentField::CommitMode,
            Self::LeavesOut(_) => AssignmentField::Volume,
        }
    }
}

impl Assignment {
    /// Whether node `node` can take this assignment of `volume`: epochs
    /// start at 1; every member's name makes a replica id with the
    /// volume's; the primary is not a replica; every replica's address is
    /// `host:port`; the commit mode can be met by the members
    /// (sync_quorum needs three); `node` is primary or a replica.
    pub fn validate(&self, volume: &str, node: &str) -> Result<(), AssignmentError> {
        if self.epoch == 0 {
            return Err(AssignmentError::EpochZero);
        }
        if let Err(e) = ReplicaId::new(volume, &self.primary) {
            return Err(AssignmentError::PrimaryName {
                name: self.primary.clone(),
                why: e.to_string(),
            });
        }
        for (name, addr) in &self.replicas {
            if *name == self.primary {
                return Err(AssignmentError::PrimaryIsReplica(name.clone()));
            }
            if let Err(e) = ReplicaId::new(volume, name) {
                return Err(AssignmentError::ReplicaName {
                    name: name.clone(),
                    why: e.to_string(),
                });
            }
            if let Err(e) = addr.parse::<std::net::SocketAddr>() {
                return Err(AssignmentError::ReplicaAddress {
                    name: name.clone(),
                    addr: addr.clone(),
                    why: e.to_string(),
                });
            }
        }
        walship_engine::check_topology(self.commit_mode, self.replicas.len())?;
        if self.primary != node && !self.replicas.contains_key(node) {
            return Err(AssignmentError::LeavesOut(node.to_owned()));
        }
        Ok(())
    }

    /// As a node applies it, every replica at endpoint version 1
    /// ([`Applied::successor`] carries versions on).
    pub fn applied(&self) -> Applied {
        Applied::new(self.epoch, &self.primary, self.commit_mode, &self.replicas)
    }
}

/// One replica's endpoint in an applied assignment.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReplicaEndpoint {
    /// Its node's replication address.
    pub addr: String,
    /// Bumped each time the address changes.
    pub version: u64,
}

/// An assignment as a node applies it: who is primary in which epoch,
/// under which mode, with which replicas.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Applied {
    /// Epoch.
    pub epoch: u64,
    /// The primary's node.
    pub primary: String,
    /// Commit mode.
    pub commit_mode: CommitMode,
    /// Replicas by node name.
    pub replicas: BTreeMap<String, ReplicaEndpoint>,
    /// How many times this node reopened as primary in this epoch.
    #[serde(default)]
    pub incarnation: u64,
}

/// Incarnations of a primary within one epoch: the term's low bits.
const INCARNATION_BITS: u32 = 20;

impl Applied {
    /// An assignment whose replicas (node → replication address) are all
    /// at endpoint version 1; [`successor`](Self::successor) carries the
    /// versions on from the assignment it follows.
    pub fn new(
        epoch: u64,
        primary: &str,
        commit_mode: CommitMode,
        replicas: &BTreeMap<String, String>,
    ) -> Self {
        Self {
            epoch,
            primary: primary.to_owned(),
            commit_mode,
            replicas: replicas
                .iter()
                .map(|(server, addr)| {
                    let endpoint = ReplicaEndpoint {
                        addr: addr.clone(),
                        version: 1,
                    };
                    (server.clone(), endpoint)
                })
                .collect(),
            incarnation: 0,
        }
    }

    /// The term the runtime runs in: `epoch << 20 | incarnation`.
    pub fn term(&self) -> u64 {
        (self.epoch << INCARNATION_BITS) | self.incarnation
    }

    /// The first term of the epoch after `epoch`: no opening in `epoch`
    /// may reach it.
    pub fn term_ceiling(epoch: u64) -> u64 {
        (epoch + 1) << INCARNATION_BITS
    }

    /// The incarnation of `term`.
    pub fn incarnation_of(term: u64) -> u64 {
        term & ((1 << INCARNATION_BITS) - 1)
    }

    /// The epoch of `term`.
    pub fn epoch_of(term: u64) -> u64 {
        term >> INCARNATION_BITS
    }

    /// Whether `other` says the same as `self` (epoch, primary, mode and
    /// replica addresses; endpoint versions and incarnations aside).
    pub fn same_as(&self, other: &Applied) -> bool {
        let addrs = |a: &Applied| -> BTreeMap<String, String> {
            a.replicas
                .iter()
                .map(|(s, e)| (s.clone(), e.addr.clone()))
                .collect()
        };
        self.epoch == other.epoch
            && self.primary == other.primary
            && self.commit_mode == other.commit_mode
            && addrs(self) == addrs(other)
    }

    /// The config's assignment.
    pub fn from_spec(spec: &VolumeSpec) -> Self {
        Self::new(
            spec.assignment.epoch,
            &spec.assignment.primary,
            spec.assignment.commit_mode,
            &spec.assignment.replicas,
        )
    }

    /// `next` with endpoint versions carried over from `self`: kept where
    /// the address is the same, bumped where it changed.
    pub fn successor(&self, mut next: Applied) -> Applied {
        next.incarnation = 0;
        for (server, endpoint) in &mut next.replicas {
            endpoint.version = match self.replicas.get(server) {
                Some(old) if old.addr == endpoint.addr => old.version,
                Some(old) => old.version + 1,
                None => 1,
            };
        }
        next
    }

    /// What `node` refuses of an assignment of `volume` before anything is
    /// persisted: what the engine would refuse, and one that leaves `node`
    /// out. (The config's loader checks the same of each volume, with the
    /// line of the key at fault.)
    pub fn check(&self, volume: &str, node: &str) -> Result<(), AssignmentError> {
        self.assignment().validate(volume, node)
    }

    /// The assignment this applies (addresses without their versions).
    pub fn assignment(&self) -> Assignment {
        Assignment {
            epoch: self.epoch,
            primary: self.primary.clone(),
            commit_mode: self.commit_mode,
            replicas: self
                .replicas
                .iter()
                .map(|(name, endpoint)| (name.clone(), endpoint.addr.clone()))
                .collect(),
        }
    }

    /// Whether `node` is the primary.
    pub fn is_primary(&self, node: &str) -> bool {
        self.primary == node
    }

    /// The engine's assignment for the primary of `volume`.
    pub fn engine(&self, volume: &str) -> Result<EngineAssignment, InvalidReplicaId> {
        let replicas = self
            .replicas
            .iter()
            .map(|(server, endpoint)| {
                Ok(ReplicaAssignment {
                    id: ReplicaId::new(volume, server)?,
                    endpoint: Endpoint::new(endpoint.addr.clone(), endpoint.version),
                })
            })
            .collect::<Result<_, InvalidReplicaId>>()?;
        Ok(EngineAssignment {
            epoch: Epoch(self.term()),
            commit_mode: self.commit_mode,
            replicas,
        })
    }
}

/// What a volume starts with, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Starting {
    /// The assignment (already persisted by [`start`]).
    pub applied: Applied,
    /// Why this one, for the log.
    pub reason: String,
}

/// Why a volume cannot start on its assignment.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// The assignment file could not be read or written.
    #[error(transparent)]
    Io(#[from] std::io::Error),
    /// The config says something else at the epoch already applied.
    #[error("{0}")]
    Conflict(String),
    /// The primary reopened more times in one epoch than a term can count.
    #[error("volume reopened as primary {0} times in one epoch: give it a newer epoch")]
    Incarnations(u64),
}

/// Decides `spec`'s starting assignment on `node` from the config and what
/// `dir` holds, and persists it before anything opens.
pub fn start(dir: &Path, node: &str, spec: &VolumeSpec) -> Result<Starting, StartError> {
    let configured = Applied::from_spec(spec);
    let Some(last) = load(dir)? else {
        save(dir, &configured)?;
        return Ok(Starting {
            applied: configured,
            reason: "the config's (nothing applied before)".to_owned(),
        });
    };
    if spec.assignment.epoch > last.epoch {
        let applied = last.successor(configured);
        save(dir, &applied)?;
        let reason = format!(
            "the config's epoch {} is newer than {}",
            spec.assignment.epoch, last.epoch
        );
        return Ok(Starting { applied, reason });
    }
    if spec.assignment.epoch == last.epoch && !last.same_as(&configured) {
        return Err(StartError::Conflict(format!(
            "volume {}: the config's assignment differs from the one applied at epoch {} (primary {}); an assignment changes only with a newer epoch",
            spec.name, last.epoch, last.primary
        )));
    }
    let mut applied = last;
    let mut reason = format!(
        "the one applied last (epoch {}; the config's epoch {} is not newer)",
        applied.epoch, spec.assignment.epoch
    );
    if applied.is_primary(node) {
        applied.incarnation += 1;
        if applied.incarnation >= 1 << INCARNATION_BITS {
            return Err(StartError::Incarnations(applied.incarnation));
        }
        reason.push_str(&format!(
            ", reopened as primary: incarnation {}, term {}",
            applied.incarnation,
            applied.term()
        ));
    }
    save(dir, &applied)?;
    Ok(Starting { applied, reason })
}

/// The assignment's file name in a volume's directory.
const FILE: &str = "assignment.json";

fn path(dir: &Path) -> PathBuf {
    dir.join(FILE)
}

/// The assignment applied last, if any.
pub fn load(dir: &Path) -> std::io::Result<Option<Applied>> {
    load_in(walship_io::fs::real(), dir)
}

/// [`load`] through `fs`.
pub fn load_in(fs: &dyn Fs, dir: &Path) -> std::io::Result<Option<Applied>> {
    match fs.read(&path(dir)) {
        Ok(bytes) => serde_json::from_slice(&bytes).map(Some).map_err(|e| {
            std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                format!("{}: {e}", path(dir).display()),
            )
        }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e),
    }
}

/// Persists `applied` atomically and durably.
pub fn save(dir: &Path, applied: &Applied) -> std::io::Result<()> {
    save_in(walship_io::fs::real(), dir, applied)
}

/// [`save`] through `fs`.
pub fn save_in(fs: &dyn Fs, dir: &Path, applied: &Applied) -> std::io::Result<()> {
    walship_io::durable::create_dir_all_in(fs, dir)?;
    let json = serde_json::to_vec_pretty(applied).map_err(std::io::Error::other)?;
    walship_io::durable::rewrite_atomic(fs, dir, FILE, &json)
}

#[cfg(test)]
mod tests;
