//! What a node says of its volumes: statuses, reports, online verify.

use super::*;

impl Node {
    /// Each hosted volume: its name, the epoch of its assignment, and its
    /// runtime status, primary or replica (no recovery log, unlike
    /// [`report`](Self::report): the control plane asks every 250 ms).
    pub async fn statuses(&self) -> Vec<(String, NodeStatus)> {
        self.statuses_of(self.table.all()).await
    }

    /// [`statuses`](Self::statuses) of the volumes named in `names` this
    /// node hosts.
    pub async fn statuses_named(&self, names: &BTreeSet<String>) -> Vec<(String, NodeStatus)> {
        let hosted = names.iter().filter_map(|name| self.table.get(name));
        self.statuses_of(hosted.collect()).await
    }

    /// The volumes whose activity count moved since `seen` last recorded
    /// it (every volume `seen` does not know yet); records the counts
    /// read, before any status is asked, so a change after this is seen
    /// by the next call. Forgets volumes no longer hosted.
    pub fn moved_since(&self, seen: &mut HashMap<String, u64>) -> BTreeSet<String> {
        let volumes = self
            .table
            .volumes
            .read()
            .unwrap_or_else(PoisonError::into_inner);
        if seen.len() > volumes.len() {
            seen.retain(|name, _| volumes.contains_key(name));
        }
        let mut moved = BTreeSet::new();
        for (name, hosted) in volumes.iter() {
            let now = hosted.handle.activity();
            match seen.get_mut(name) {
                Some(count) if *count == now => continue,
                Some(count) => *count = now,
                None => {
                    seen.insert(name.clone(), now);
                }
            }
            moved.insert(name.clone());
        }
        moved
    }

    pub(super) async fn statuses_of(&self, hosted: Vec<Hosted>) -> Vec<(String, NodeStatus)> {
        let mut statuses = Vec::new();
        for hosted in hosted {
            if let Ok(status) = hosted.handle.status().await {
                statuses.push((hosted.spec.name.clone(), status));
            }
        }
        statuses
    }

    /// Every volume's state.
    pub async fn report(&self) -> Vec<VolumeReport> {
        let mut reports = Vec::new();
        for hosted in self.table.all() {
            if let Ok(report) = self.volume_report(&hosted).await {
                reports.push(report);
            }
        }
        reports
    }

    /// Volume `name`'s state.
    pub async fn volume_status(&self, name: &str) -> Result<VolumeReport, NodeError> {
        let hosted = self
            .table
            .get(name)
            .ok_or_else(|| NodeError::NoSuchVolume(name.into()))?;
        self.volume_report(&hosted).await
    }

    /// The assignment `hosted` runs: a primary's incarnation is the one of
    /// the term it opened in (peering may have chosen a newer one than the
    /// node started it with, and persisted it).
    pub(super) fn running_assignment(&self, hosted: &Hosted, status: &NodeStatus) -> Applied {
        let mut applied = hosted.applied.clone();
        if let NodeStatus::Primary(status) = status {
            let term = status.registry.epoch.get();
            if Applied::epoch_of(term) == applied.epoch {
                applied.incarnation = Applied::incarnation_of(term);
            }
        }
        applied
    }

    /// An online verify of `name`'s replicas (see
    /// [`VolumeHandle::verify`]); only where this node is its primary.
    pub async fn verify(
        &self,
        name: &str,
        repair: bool,
    ) -> Result<walship_actors::VerifyReport, NodeError> {
        let hosted = self
            .table
            .get(name)
            .ok_or_else(|| NodeError::NoSuchVolume(name.into()))?;
        if !hosted.applied.is_primary(&self.config.node) {
            return Err(NodeError::NotPrimary {
                volume: name.into(),
                primary: hosted.applied.primary.clone(),
            });
        }
        hosted
            .handle
            .verify(repair)
            .await
            .map_err(|source| NodeError::Volume {
                volume: name.into(),
                source,
            })
    }

    pub(super) async fn volume_report(&self, hosted: &Hosted) -> Result<VolumeReport, NodeError> {
        let failed = |source| NodeError::Volume {
            volume: hosted.spec.name.clone(),
            source,
        };
        let status = hosted.handle.status().await.map_err(failed)?;
        let mut recent_recovery = hosted.handle.recovery_log().await.map_err(failed)?;
        let keep = recent_recovery.len().saturating_sub(RECENT_RECOVERY);
        recent_recovery.drain(..keep);
        let primary = hosted.applied.is_primary(&self.config.node);
        Ok(VolumeReport {
            name: hosted.spec.name.clone(),
            role: if primary { "primary" } else { "replica" },
            size: hosted.spec.size,
            export: match (
                self.nbd_addr.is_some(),
                primary,
                hosted.spec.export_replicas,
            ) {
                (false, _, _) | (true, false, false) => None,
                (true, true, _) => Some("read-write"),
                (true, false, true) => Some("read-only"),
            },
            assignment: self.running_assignment(hosted, &status),
            status,
            recent_recovery,
            control_decision: self
                .control_decisions
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .get(&hosted.spec.name)
                .cloned(),
        })
    }
}
