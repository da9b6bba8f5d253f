//! A new assignment: fenced if not newer, persisted, then carried out
//! (the same role, or a role change that reopens the volume).

use super::*;

impl Node {
    /// Applies a new assignment to volume `name`: fenced unless its epoch
    /// is newer than the one applied; persisted before it is carried out;
    /// a role change reopens the volume's store in its new role.
    pub async fn apply_assignment(&self, name: &str, next: Applied) -> Result<(), NodeError> {
        let _one_at_a_time = self.changing.lock().await;
        let hosted = self
            .table
            .get(name)
            .ok_or_else(|| NodeError::NoSuchVolume(name.into()))?;
        if next.epoch <= hosted.applied.epoch {
            return Err(NodeError::Fenced {
                volume: name.into(),
                applied: hosted.applied.epoch,
                offered: next.epoch,
            });
        }
        let node = &self.config.node;
        let bad = |what: String| NodeError::BadAssignment {
            volume: name.into(),
            what,
        };
        next.check(name, node).map_err(|e| bad(e.to_string()))?;
        let next = hosted.applied.successor(next);
        let engine = next
            .engine(name)
            .map_err(|e| bad(format!("replica id: {e}")))?;
        assignment::save(&self.volume_dir(name), &next)
            .map_err(io(format!("persist the assignment of {name}")))?;
        let was_primary = hosted.applied.is_primary(node);
        // A primary still peering (or that failed to open) reopens in the
        // new assignment rather than wait to be told it.
        let opened = hosted.handle.has_opened();
        let handle = match (was_primary, next.is_primary(node)) {
            (true, true) if opened => {
                // The running primary goes on in the new epoch's term:
                // recorded with the control plane first, as every
                // opening's is, before any replica hears it.
                if let Some(terms) = &self.terms {
                    terms
                        .record(name, next.term())
                        .await
                        .map_err(io(format!("record the term of {name}")))?;
                }
                hosted
                    .handle
                    .apply_assignment(engine)
                    .await
                    .map_err(|source| NodeError::Volume {
                        volume: name.into(),
                        source,
                    })?;
                hosted.handle
            }
            // A replica learns its new epoch from its primary's hello.
            (false, false) => hosted.handle,
            // A role change: the store reopens in the new role. If it
            // cannot, the volume goes back to the assignment it had (as a
            // primary in a new term), so it is not left stopped.
            _ => {
                hosted.handle.stop().await;
                match self.open(&hosted.spec, &next).await {
                    Ok(handle) => handle,
                    Err(refused) => {
                        let dir = self.volume_dir(name);
                        let mut back = hosted.applied.clone();
                        if back.is_primary(node) {
                            // From the newest incarnation persisted (peering
                            // may have chosen one past the table's).
                            let persisted = assignment::load(&dir)
                                .ok()
                                .flatten()
                                .filter(|a| a.epoch == back.epoch)
                                .map_or(0, |a| a.incarnation);
                            back.incarnation = back.incarnation.max(persisted) + 1;
                        }
                        assignment::save(&dir, &back)
                            .map_err(io(format!("persist the assignment of {name}")))?;
                        let handle = self.open(&hosted.spec, &back).await?;
                        self.table.put(Hosted {
                            spec: hosted.spec,
                            applied: back,
                            handle,
                        });
                        return Err(refused);
                    }
                }
            }
        };
        tracing::info!(volume = name, epoch = next.epoch, primary = %next.primary,
            "assignment applied");
        self.table.put(Hosted {
            spec: hosted.spec,
            applied: next,
            handle,
        });
        Ok(())
    }
}
