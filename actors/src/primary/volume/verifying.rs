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

    fn handle(&mut self, msg: Verify, _: &mut Context<Self>) -> Self::Result {
        self.clock();
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
                tuning: self.config.tuning.clone(),
                links: Arc::clone(&self.pools.links),
            })
            .collect();
        let (store, me, volume) = (
            Arc::clone(&self.store),
            self.me.clone(),
            self.config.volume.clone(),
        );
        let token = self.tasks.token();
        Box::pin(async move {
            let _token = token;
            let pinned = pin.lsn();
            let mut replicas = Vec::new();
            for target in targets {
                replicas.push(verify_replica(Arc::clone(&store), Arc::clone(&pin), target).await);
            }
            drop(pin);
            for replica in &mut replicas {
                let regions = replica.mismatched_regions();
                metrics::gauge!(
                    "walship_verify_mismatched_regions",
                    "volume" => volume.clone(),
                    "replica" => replica.replica.to_string()
                )
                .set(regions as f64);
                if !msg.repair || replica.mismatches.is_empty() {
                    continue;
                }
                let found = format!(
                    "{regions} regions of {} differ at lsn {} (first at block {})",
                    replica.regions, replica.lsn, replica.mismatches[0].lba
                );
                if let Some(me) = &me {
                    let asked = me
                        .send(VerifyMismatch {
                            replica: replica.replica.clone(),
                            found,
                        })
                        .await;
                    replica.repairing = matches!(asked, Ok(Ok(())));
                }
            }
            metrics::counter!("walship_verify_runs_total", "volume" => volume.clone()).increment(1);
            Ok(VerifyReport {
                volume,
                pinned,
                replicas,
            })
        })
    }
}

/// A verify found `replica`'s content differs: the engine rebuilds it.
#[derive(Debug, Message)]
#[rtype(result = "Result<(), VolumeError>")]
pub(crate) struct VerifyMismatch {
    replica: ReplicaId,
    found: String,
}

impl Handler<VerifyMismatch> for VolumeActor {
    type Result = Result<(), VolumeError>;

    fn handle(&mut self, msg: VerifyMismatch, ctx: &mut Context<Self>) -> Self::Result {
        self.clock();
        let done = self
            .engine
            .handle_verify_mismatch(&msg.replica, &msg.found)
            .map_err(VolumeError::from);
        self.run_commands(ctx);
        done
    }
}
