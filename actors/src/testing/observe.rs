//! What the cluster shows, and waits for what it should show: each wait
//! has a deadline and fails with what it saw and the recovery log.

use super::{within, HarnessError, LoopbackCluster, Result};
use crate::{NodeStatus, ReplicaStatus, VolumeStatus};
use std::future::Future;
use std::time::{Duration, Instant};
use walship_engine::{ReplicaState, SenderStatus};

/// What [`LoopbackCluster::wait_converged`] saw.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Converged {
    /// The primary's WAL head, held by every running replica.
    pub lsn: u64,
    /// The readable volume's crc32c, the same everywhere.
    pub checksum: u32,
}

impl LoopbackCluster {
    /// The primary's status.
    pub async fn status(&self) -> Result<VolumeStatus> {
        match self.primary.status().await? {
            NodeStatus::Primary(status) => Ok(*status),
            NodeStatus::Replica(_) | NodeStatus::Peering(_) => {
                Err(HarnessError::Role("the primary".into()))
            }
        }
    }

    /// The status of the running replica on `server`.
    pub async fn replica_status(&self, server: &str) -> Result<ReplicaStatus> {
        match self.replica(server).status().await? {
            NodeStatus::Replica(status) => Ok(*status),
            NodeStatus::Primary(_) | NodeStatus::Peering(_) => {
                Err(HarnessError::Role(format!("replica {server}")))
            }
        }
    }

    /// The state of `server` as the primary sees it.
    pub async fn state(&self, server: &str) -> Result<Option<ReplicaState>> {
        match self.primary.replica_state(server).await {
            // A primary peering before it serves has no sender yet: a wait
            // for a state goes on (a reopened primary that pulls an image
            // peers for a while; failing at once made a test flaky).
            Err(crate::VolumeError::Peering(_)) => Ok(None),
            state => Ok(state?),
        }
    }

    /// The primary's view of `server`: its sender status.
    pub async fn sender_status(&self, server: &str) -> Result<SenderStatus> {
        let senders = self.status().await?.registry.senders;
        match senders.into_iter().find(|s| s.replica.server() == server) {
            Some(sender) => Ok(sender),
            None => Err(HarnessError::NoSender(server.to_owned())),
        }
    }

    /// The primary's recovery log, one `<replica> <event> <detail>` line
    /// per event (`-` for the volume's own).
    pub async fn events(&self) -> Result<Vec<String>> {
        Ok(self
            .primary
            .recovery_log()
            .await?
            .iter()
            .map(|e| {
                let replica = e.replica.as_ref().map_or("-".to_owned(), |r| r.to_string());
                format!("{} {} {}", replica, e.event, e.detail)
            })
            .collect())
    }

    /// Whether the primary logged `event` for `server`.
    pub async fn has_event(&self, server: &str, event: &str) -> Result<bool> {
        let prefix = format!("{}/{server} {event}", self.options.volume);
        Ok(self.events().await?.iter().any(|e| e.starts_with(&prefix)))
    }

    /// Sessions the primary started for `server` so far (repeats included).
    pub async fn sessions_created(&self, server: &str) -> Result<u64> {
        Ok(self
            .primary
            .recovery_log()
            .await?
            .iter()
            .filter(|e| e.event == "session_created")
            .filter(|e| e.replica.as_ref().is_some_and(|r| r.server() == server))
            .map(|e| 1 + e.repeats)
            .sum())
    }

    /// Fails with `what` and the recovery log unless `check` answers
    /// within `limit`.
    async fn wait_for<T, Fut>(
        &self,
        limit: Duration,
        mut check: impl FnMut() -> Fut,
        what: impl AsyncFnOnce() -> String,
    ) -> Result<T>
    where
        Fut: Future<Output = Result<Option<T>>>,
    {
        let answer = within(limit, || {
            let asked = check();
            async {
                match asked.await {
                    Ok(answer) => answer.map(Ok),
                    Err(error) => Some(Err(error)),
                }
            }
        })
        .await;
        if let Some(answer) = answer {
            return answer;
        }
        let what = what().await;
        let log = match self.events().await {
            Ok(events) => events.join("\n"),
            Err(error) => format!("(unavailable: {error})"),
        };
        Err(HarnessError::TimedOut { what, limit, log })
    }

    /// Waits until the primary sees `server` in state `want`.
    pub async fn wait_state(
        &self,
        server: &str,
        want: ReplicaState,
        limit: Duration,
    ) -> Result<()> {
        self.wait_for(
            limit,
            || async { Ok((self.state(server).await? == Some(want)).then_some(())) },
            async || {
                let state = self.state(server).await.ok().flatten();
                format!("{server} is {state:?}, wanted {want:?}")
            },
        )
        .await
    }

    /// Waits until every running replica is in sync, all within `limit`.
    pub async fn wait_all_in_sync(&self, limit: Duration) -> Result<()> {
        let deadline = Instant::now() + limit;
        for node in self.replicas.iter().filter(|n| n.handle.is_some()) {
            let left = deadline.saturating_duration_since(Instant::now());
            self.wait_state(&node.server, ReplicaState::InSync, left)
                .await?;
        }
        Ok(())
    }

    /// Waits until the primary sees every running replica in sync, each
    /// holds the primary's head and its content, and the primary holds no
    /// pin and no engine resource.
    pub async fn wait_converged(&self, limit: Duration) -> Result<Converged> {
        self.wait_for(
            limit,
            || self.converged(),
            async || match self.status().await {
                Ok(s) => format!(
                    "not converged: head {} recovery pins {} snapshot pins {} held {}",
                    s.head, s.recovery_pins, s.snapshot_pins, s.held_resources
                ),
                Err(error) => format!("not converged: {error}"),
            },
        )
        .await
    }

    /// Whether the cluster has converged, and on what. Checksums are read
    /// only once every replica is in sync and holds the head: they read
    /// whole volumes. A write meanwhile (the head moved) means not yet.
    async fn converged(&self) -> Result<Option<Converged>> {
        let status = self.status().await?;
        if status.recovery_pins + status.snapshot_pins + status.held_resources > 0 {
            return Ok(None);
        }
        let running: Vec<_> = self
            .replicas
            .iter()
            .filter(|n| n.handle.is_some())
            .collect();
        for node in &running {
            let in_sync = status
                .registry
                .senders
                .iter()
                .any(|s| s.replica.server() == node.server && s.state == ReplicaState::InSync);
            if !in_sync || self.replica_status(&node.server).await?.durable < status.head {
                return Ok(None);
            }
        }
        let checksum = self.primary.content_checksum().await?;
        for node in &running {
            if self.replica(&node.server).content_checksum().await? != checksum {
                return Ok(None);
            }
        }
        if self.status().await?.head != status.head {
            return Ok(None);
        }
        Ok(Some(Converged {
            lsn: status.head,
            checksum,
        }))
    }

    /// Waits until the replica on `server` has `lsn` durable.
    pub async fn wait_durable(&self, server: &str, lsn: u64, limit: Duration) -> Result<()> {
        let durable = async || -> Result<u64> { Ok(self.replica_status(server).await?.durable) };
        self.wait_for(
            limit,
            || async { Ok((durable().await? == lsn).then_some(())) },
            async || format!("{server} holds {:?} durable, not {lsn}", durable().await),
        )
        .await
    }

    /// Waits until the replica on `server` has made `more` LSNs durable past
    /// what it had when called.
    pub async fn wait_durable_past(&self, server: &str, more: u64, limit: Duration) -> Result<()> {
        let durable = async || -> Result<u64> { Ok(self.replica_status(server).await?.durable) };
        let target = durable().await? + more;
        self.wait_for(
            limit,
            || async { Ok((durable().await? >= target).then_some(())) },
            async || format!("{server} stalled below {target}"),
        )
        .await
    }

    /// Waits until the primary logged `event` for `server`.
    pub async fn wait_event(&self, server: &str, event: &str, limit: Duration) -> Result<()> {
        self.wait_for(
            limit,
            || async { Ok(self.has_event(server, event).await?.then_some(())) },
            async || format!("no {event} for {server}"),
        )
        .await
    }
}
