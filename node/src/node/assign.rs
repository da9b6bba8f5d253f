//! A new assignment: fenced if not newer, persisted, then carried out
//! (the same role, or a role change that reopens the volume).

use super::*;

/// Changes of one volume's assignment are carried out one at a time,
/// changes of different volumes at once (a failover at scale promotes
/// thousands; one at a time, the last waited for all the others' store
/// reopens and peerings). A lock exists only while its volume changes.
#[derive(Debug, Default)]
pub(super) struct ChangeLocks {
    held: Mutex<BTreeMap<String, Arc<tokio::sync::Mutex<()>>>>,
}

impl ChangeLocks {
    /// Waits until no other change of `name` is under way; holds it until
    /// the guard drops.
    async fn one(&self, name: &str) -> ChangeGuard<'_> {
        let mutex = Arc::clone(lock(&self.held).entry(name.to_owned()).or_default());
        ChangeGuard {
            locks: self,
            name: name.to_owned(),
            guard: Some(mutex.lock_owned().await),
        }
    }
}

/// A change of one volume under way; its lock goes when the last change
/// waiting for it is done.
struct ChangeGuard<'a> {
    locks: &'a ChangeLocks,
    name: String,
    guard: Option<tokio::sync::OwnedMutexGuard<()>>,
}

impl Drop for ChangeGuard<'_> {
    fn drop(&mut self) {
        let mut held = lock(&self.locks.held);
        drop(self.guard.take());
        // Only the map's own reference left: nobody waits for it.
        if held
            .get(&self.name)
            .is_some_and(|m| Arc::strong_count(m) == 1)
        {
            held.remove(&self.name);
        }
    }
}

impl Node {
    /// Applies a new assignment to volume `name`: fenced unless its epoch
    /// is newer than the one applied; persisted before it is carried out;
    /// a role change reopens the volume's store in its new role.
    pub async fn apply_assignment(&self, name: &str, next: Applied) -> Result<(), NodeError> {
        // Shared with every other change; the stop takes it whole.
        let _not_stopping = self.changing.read().await;
        if self.stopped.load(std::sync::atomic::Ordering::SeqCst) {
            return Err(NodeError::Volume {
                volume: name.into(),
                source: VolumeError::Stopped,
            });
        }
        let _one_at_a_time = self.change_locks.one(name).await;
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
        save(self.volume_dir(name), &next)
            .await
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
                        save(dir, &back)
                            .await
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

/// [`assignment::save`] on a blocking thread: its fsyncs would hold up the
/// async worker it ran on, and with it the node's etcd lease and every
/// other change under way.
async fn save(dir: PathBuf, applied: &Applied) -> std::io::Result<()> {
    let applied = applied.clone();
    tokio::task::spawn_blocking(move || assignment::save(&dir, &applied))
        .await
        .map_err(std::io::Error::other)?
}
