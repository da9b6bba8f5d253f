//! An online verify of the volume's in-sync replicas, and the repair of
//! what it finds (see [`crate::primary::verify`]).

use super::VolumeActor;
use crate::error::VolumeError;
use crate::primary::verify::{verify_replica, Target, VerifyReport};
use actix::prelude::*;
use std::sync::Arc;
use walship_engine::{ReplicaId, ReplicaState};

/// Compares every in-sync replica with the primary at one LSN; with
/// `repair`, a replica whose regions differ is rebuilt, every region
/// compared (the report says which were asked to).
#[derive(Debug, Message)]
#[rtype(result = "Result<VerifyReport, VolumeError>")]
pub struct Verify {
    /// Rebuild what differs.
    pub repair: bool,
}

impl Handler<Verify> for VolumeActor {
    type Result = ResponseFuture<Result<VerifyReport, VolumeError>>;

    fn handle(&mut self, msg: Verify, ctx: &mut Context<Self>) -> Self::Result {
        self.clock();
        if self.verify_running {
            return Box::pin(async { Err(VolumeError::VerifyRunning) });
        }
        // The checkpointer waits while this pin lives: the primary's side
        // of every comparison stays where it was.
        let pin = match self.store.snapshot_pin("verify") {
            Ok(pin) => Arc::new(pin),
            Err(e) => return Box::pin(async move { Err(e.into()) }),
        };
        let status = self.engine.status();
        let targets: Vec<Target> = status
            .senders
            .iter()
            .filter(|s| s.state == ReplicaState::InSync)
            .map(|s| Target {
                replica: s.replica.clone(),
                addr: s.endpoint.data_addr.clone(),
                cluster: self.config.cluster.clone(),
                epoch: self.engine.epoch().get(),
                // The replica compares at this or later: not below what
                // this store's content can be read at, and as late as it
                // is known to hold (what it acknowledged durable), so the
                // writes of the last checkpoint interval are compared too
                // (at the checkpoint alone, a volume that has not
                // checkpointed yet would compare nothing it was written).
                floor: pin
                    .lsn()
                    .max(self.store.content_floor())
                    .max(s.flushed.get().min(self.store.wal().head())),
                tuning: self.config.tuning.clone(),
                links: Arc::clone(&self.pools.links),
            })
            .collect();
        let store = Arc::clone(&self.store);
        let volume = self.config.volume.clone();
        // Run as the actor's own future: a stop drops it (its pin, its
        // connections) instead of waiting for every replica to be read.
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.verify_running = true;
        let comparing = async move {
            let pinned = pin.lsn();
            let mut replicas = Vec::new();
            for target in targets {
                replicas.push(verify_replica(Arc::clone(&store), Arc::clone(&pin), target).await);
            }
            drop(pin);
            VerifyReport {
                volume,
                pinned,
                replicas,
            }
        };
        ctx.spawn(comparing.into_actor(self).map(move |mut report, act, ctx| {
            act.verify_running = false;
            act.clock();
            act.verified(&mut report, msg.repair);
            act.run_commands(ctx);
            let _ = tx.send(report);
        }));
        Box::pin(async move { rx.await.map_err(|_| VolumeError::Stopped) })
    }
}

impl VolumeActor {
    /// Counts what a verify found and, with `repair`, hands each replica
    /// that differs to the engine, unless the primary may be the bad copy:
    /// with other replicas compared, a region is rebuilt only if one of
    /// them holds what the primary holds there.
    fn verified(&mut self, report: &mut VerifyReport, repair: bool) {
        let volume = report.volume.clone();
        metrics::counter!("walship_verify_runs_total", "volume" => volume.clone()).increment(1);
        let compared: Vec<(ReplicaId, Vec<(u64, u64)>)> = report
            .replicas
            .iter()
            .filter(|r| r.error.is_none())
            .map(|r| {
                (
                    r.replica.clone(),
                    r.mismatches.iter().map(|m| (m.lba, m.blocks)).collect(),
                )
            })
            .collect();
        for replica in &mut report.replicas {
            let regions = replica.mismatched_regions();
            metrics::gauge!(
                "walship_verify_mismatched_regions",
                "volume" => volume.clone(),
                "replica" => replica.replica.to_string()
            )
            .set(regions as f64);
            if !repair || replica.mismatches.is_empty() {
                continue;
            }
            let others: Vec<&Vec<(u64, u64)>> = compared
                .iter()
                .filter(|(id, _)| *id != replica.replica)
                .map(|(_, m)| m)
                .collect();
            let corroborated = others.is_empty()
                || replica.mismatches.iter().all(|m| {
                    others.iter().any(|theirs| {
                        !theirs
                            .iter()
                            .any(|(lba, blocks)| *lba < m.lba + m.blocks && m.lba < lba + blocks)
                    })
                });
            if !corroborated {
                replica.repair_refused = Some(
                    "no other replica holds what the primary holds where this one differs: the primary's copy may be the bad one; not repaired".into(),
                );
                continue;
            }
            let found = format!(
                "{regions} regions of {} differ at lsn {} (first at block {})",
                replica.regions, replica.lsn, replica.mismatches[0].lba
            );
            replica.repairing = self
                .engine
                .handle_verify_mismatch(&replica.replica, &found)
                .is_ok_and(|repairing| repairing);
        }
    }
}
