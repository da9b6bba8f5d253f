//! The assignment a node applied to a volume, persisted beside its store
//! (`<data_dir>/<volume>/assignment.json`, replaced atomically: written to
//! a temporary file, fsynced, renamed, directory fsynced), so a restart
//! never goes back to an older epoch.
//!
//! Which assignment a volume starts with is decided here: the config's,
//! when it is newer than the one applied last; else the one applied last.
//! A primary opens in a new epoch every time (its WAL may already hold the
//! last one), so restarting a primary on the same assignment bumps it.

use crate::config::VolumeSpec;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use walship_engine::{
    Assignment, CommitMode, Endpoint, Epoch, InvalidReplicaId, ReplicaAssignment, ReplicaId,
};

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
}

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
        }
    }

    /// The config's assignment.
    pub fn from_spec(spec: &VolumeSpec) -> Self {
        Self::new(spec.epoch, &spec.primary, spec.commit_mode, &spec.replicas)
    }

    /// `next` with endpoint versions carried over from `self`: kept where
    /// the address is the same, bumped where it changed.
    pub fn successor(&self, mut next: Applied) -> Applied {
        for (server, endpoint) in &mut next.replicas {
            endpoint.version = match self.replicas.get(server) {
                Some(old) if old.addr == endpoint.addr => old.version,
                Some(old) => old.version + 1,
                None => 1,
            };
        }
        next
    }

    /// Whether `node` is the primary.
    pub fn is_primary(&self, node: &str) -> bool {
        self.primary == node
    }

    /// The engine's assignment for the primary of `volume`.
    pub fn engine(&self, volume: &str) -> Result<Assignment, InvalidReplicaId> {
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
        Ok(Assignment {
            epoch: Epoch(self.epoch),
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

/// Decides `spec`'s starting assignment on `node` from the config and what
/// `dir` holds, and persists it before anything opens.
pub fn start(dir: &Path, node: &str, spec: &VolumeSpec) -> std::io::Result<Starting> {
    let configured = Applied::from_spec(spec);
    let (mut applied, mut reason) = match load(dir)? {
        None => (
            configured,
            "the config's (nothing applied before)".to_owned(),
        ),
        Some(last) if spec.epoch > last.epoch => {
            let reason = format!(
                "the config's epoch {} is newer than {}",
                spec.epoch, last.epoch
            );
            (last.successor(configured), reason)
        }
        Some(last) => {
            let reason = format!(
                "the one applied last (epoch {}; the config's epoch {} is not newer)",
                last.epoch, spec.epoch
            );
            (last, reason)
        }
    };
    let reopened = reason.starts_with("the one applied last");
    if reopened && applied.is_primary(node) {
        applied.epoch += 1;
        reason.push_str(&format!(", as primary in the next epoch {}", applied.epoch));
    }
    save(dir, &applied)?;
    Ok(Starting { applied, reason })
}

fn path(dir: &Path) -> PathBuf {
    dir.join("assignment.json")
}

/// The assignment applied last, if any.
pub fn load(dir: &Path) -> std::io::Result<Option<Applied>> {
    match std::fs::read(path(dir)) {
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
    std::fs::create_dir_all(dir)?;
    let json = serde_json::to_vec_pretty(applied).map_err(std::io::Error::other)?;
    let temp = dir.join("assignment.json.tmp");
    let mut file = std::fs::File::create(&temp)?;
    file.write_all(&json)?;
    file.sync_all()?;
    std::fs::rename(&temp, path(dir))?;
    std::fs::File::open(dir)?.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(epoch: u64, primary: &str) -> VolumeSpec {
        VolumeSpec {
            name: "vol0".into(),
            size: 1 << 20,
            commit_mode: CommitMode::SyncAll,
            epoch,
            primary: primary.into(),
            replicas: [("node2", "127.0.0.1:7402"), ("node3", "127.0.0.1:7403")]
                .into_iter()
                .filter(|(n, _)| *n != primary)
                .map(|(n, a)| (n.to_owned(), a.to_owned()))
                .collect(),
            export_replicas: false,
            line: 1,
            size_line: 2,
        }
    }

    #[test]
    fn a_restart_never_goes_back_to_an_older_epoch() {
        let dir = tempfile::tempdir().unwrap();
        let first = start(dir.path(), "node1", &spec(1, "node1")).unwrap();
        assert_eq!(first.applied.epoch, 1);
        // The same config again: the primary opens in the next epoch.
        let second = start(dir.path(), "node1", &spec(1, "node1")).unwrap();
        assert_eq!(second.applied.epoch, 2, "{}", second.reason);
        assert_eq!(load(dir.path()).unwrap().unwrap().epoch, 2);
        // A replica keeps the epoch it was given.
        let replica = tempfile::tempdir().unwrap();
        start(replica.path(), "node2", &spec(3, "node1")).unwrap();
        let again = start(replica.path(), "node2", &spec(1, "node1")).unwrap();
        assert_eq!(again.applied.epoch, 3, "{}", again.reason);
    }

    #[test]
    fn a_newer_config_wins_and_keeps_unchanged_endpoint_versions() {
        let dir = tempfile::tempdir().unwrap();
        start(dir.path(), "node1", &spec(1, "node1")).unwrap();
        let mut moved = spec(5, "node1");
        moved
            .replicas
            .insert("node3".into(), "127.0.0.1:7503".into());
        let next = start(dir.path(), "node1", &moved).unwrap();
        assert_eq!(next.applied.epoch, 5);
        assert_eq!(next.applied.replicas["node2"].version, 1);
        assert_eq!(next.applied.replicas["node3"].version, 2);
        let engine = next.applied.engine("vol0").unwrap();
        assert_eq!(engine.epoch, Epoch(5));
        assert_eq!(engine.replicas.len(), 2);
    }
}
