//! Local durability and checkpoints: one group-commit sync at a time on the
//! runtime's blocking pool, and checkpoints there too, so the actix thread
//! never waits on an fsync.

use super::VolumeActor;
use crate::error::VolumeError;
use actix::prelude::*;
use std::sync::Arc;
use tokio::sync::oneshot;
use walship_engine::Lsn;

/// The volume's local durability: one group-commit sync at a time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Durability {
    /// No sync runs; the WAL is durable up to `durable`.
    Idle { durable: u64 },
    /// A sync runs on the blocking pool. `wanted` is the highest LSN a
    /// writer asked for since; the next sync serves what this one does not.
    Syncing { durable: u64, wanted: u64 },
    /// A sync failed: the volume refuses writes for good. Why is the WAL's
    /// own poison ([`walship_io::Wal::poisoned`]), not kept here again.
    Poisoned,
}

impl VolumeActor {
    /// Asks for `lsn` to become durable. One group-commit sync at a time runs
    /// on the runtime's blocking pool; requests made meanwhile are served by
    /// the next one.
    pub(super) fn want_sync(&mut self, lsn: u64) {
        match &mut self.durability {
            Durability::Poisoned => {}
            Durability::Syncing { wanted, .. } => *wanted = (*wanted).max(lsn),
            Durability::Idle { durable } if lsn <= *durable => {}
            Durability::Idle { durable } => {
                let Some(me) = self.me.clone() else { return };
                self.durability = Durability::Syncing {
                    durable: *durable,
                    wanted: lsn,
                };
                let store = Arc::clone(&self.store);
                let sync_seconds = self.sync_seconds.clone();
                self.pools.blocking.run(&self.tasks, move || {
                    let started = std::time::Instant::now();
                    let result = store.sync_to(lsn).map_err(|e| e.to_string());
                    sync_seconds.record(started.elapsed().as_secs_f64());
                    me.do_send(LocalDurable { result });
                });
            }
        }
    }

    /// The volume refuses writes for good: the error says why, in the WAL's
    /// words (a failed sync or a failed segment rotation poisons it).
    pub(super) fn refusal(&mut self) -> VolumeError {
        self.durability = Durability::Poisoned;
        VolumeError::Poisoned(self.store.wal().poisoned().unwrap_or_default())
    }

    pub(super) fn maybe_checkpoint(&mut self) {
        let checkpoint = self.store.superblock().checkpoint;
        let durable = self.store.wal().durable();
        if self.checkpoint_in_flight
            || durable.saturating_sub(checkpoint) < self.config.tuning.checkpoint_every_lsns
        {
            return;
        }
        self.start_checkpoint(durable, None);
    }

    /// Checkpoints everything written so far: now if the WAL is durable that
    /// far, else once the sync it asks for gets there.
    pub(super) fn checkpoint_written(&mut self, reply: CheckpointReply) {
        let target = self.store.wal().head();
        match self.durability {
            Durability::Poisoned => {
                let _ = reply.send(Err(self.refusal()));
            }
            Durability::Idle { durable } | Durability::Syncing { durable, .. }
                if target <= durable =>
            {
                self.start_checkpoint(target, Some(reply));
            }
            Durability::Idle { .. } | Durability::Syncing { .. } => {
                self.checkpoints_waiting.push((target, reply));
                self.want_sync(target);
            }
        }
    }

    /// Starts the waiting checkpoints the WAL is now durable for; when it is
    /// poisoned, tells them why they never will be.
    fn release_checkpoints(&mut self) {
        let durable = match self.durability {
            Durability::Poisoned => {
                for (_, reply) in std::mem::take(&mut self.checkpoints_waiting) {
                    let _ = reply.send(Err(self.refusal()));
                }
                return;
            }
            Durability::Idle { durable } | Durability::Syncing { durable, .. } => durable,
        };
        let (ready, waiting) = std::mem::take(&mut self.checkpoints_waiting)
            .into_iter()
            .partition(|(target, _)| *target <= durable);
        self.checkpoints_waiting = waiting;
        for (target, reply) in ready {
            self.start_checkpoint(target, Some(reply));
        }
    }

    /// Checkpoints up to `target` on the blocking pool (the actix thread
    /// shared by every sender must not wait on it); `reply` hears the outcome.
    pub(super) fn start_checkpoint(&mut self, target: u64, reply: Option<CheckpointReply>) {
        let Some(me) = self.me.clone() else { return };
        self.checkpoint_in_flight = true;
        let store = Arc::clone(&self.store);
        self.pools.blocking.run(&self.tasks, move || {
            let result = store.checkpoint(target);
            let outcome = result.as_ref().map(|_| ()).map_err(|e| e.to_string());
            me.do_send(CheckpointDone { outcome });
            if let Some(reply) = reply {
                let _ = reply.send(result.map(|_| ()).map_err(VolumeError::from));
            }
        });
    }
}

/// Where an operator's checkpoint hears how it went.
pub(super) type CheckpointReply = oneshot::Sender<Result<(), VolumeError>>;

/// A pool checkpoint finished.
#[derive(Debug, Message)]
#[rtype(result = "()")]
pub(crate) struct CheckpointDone {
    outcome: Result<(), String>,
}

impl Handler<CheckpointDone> for VolumeActor {
    type Result = ();

    fn handle(&mut self, msg: CheckpointDone, ctx: &mut Context<Self>) {
        self.clock();
        self.checkpoint_in_flight = false;
        if let Err(error) = msg.outcome {
            tracing::error!(%error, "checkpoint failed");
        }
        self.refresh_wal_state();
        self.run_commands(ctx);
    }
}

/// A group-commit sync finished: the durable LSN, or why the WAL failed.
#[derive(Debug, Message)]
#[rtype(result = "()")]
pub(crate) struct LocalDurable {
    pub(crate) result: Result<u64, String>,
}

impl Handler<LocalDurable> for VolumeActor {
    type Result = ();

    fn handle(&mut self, msg: LocalDurable, ctx: &mut Context<Self>) {
        self.clock();
        let Durability::Syncing { durable, wanted } = self.durability else {
            return;
        };
        match msg.result {
            Ok(now) => {
                if now > durable {
                    self.engine.handle_local_durable(Lsn(durable), Lsn(now));
                }
                self.durability = Durability::Idle {
                    durable: durable.max(now),
                };
                self.want_sync(wanted);
            }
            Err(reason) => {
                tracing::error!(%reason, "wal poisoned; refusing writes");
                self.durability = Durability::Poisoned;
            }
        }
        self.release_checkpoints();
        self.run_commands(ctx);
    }
}
