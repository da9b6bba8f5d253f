//! Local durability and checkpoints: the WAL's group-commit syncs run in a
//! loop on the runtime's blocking pool, and checkpoints there too, so the
//! actix thread never waits on an fsync.
//!
//! The loop publishes what it made durable in an atomic. The volume reads it
//! whenever it runs (before every engine input, in particular a replica's
//! ack) and asks for a `LocalDurable` message only when local durability is
//! what a waiting barrier or checkpoint lacks. With replicas, the acks
//! usually come after the local sync, and the volume thread wakes once per
//! ack instead of once more for its own sync (P4).

use super::VolumeActor;
use crate::error::VolumeError;
use crate::metrics::MeteredAddr;
use crate::pool::BlockingPool;
use actix::prelude::*;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::SeqCst};
use std::sync::Arc;
use tokio::sync::oneshot;
use tokio_util::task::TaskTracker;
use walship_engine::Lsn;
use walship_io::Store;

/// Syncs one job runs before it goes back in the pool's queue behind other
/// volumes' jobs (the pool has a fixed number of threads). It goes back
/// after one sync if other jobs wait.
const SYNCS_PER_JOB: usize = 8;

/// What the volume and its sync loop share. Every access is `SeqCst`: each
/// side stores, then loads what the other stores (`wanted`/`running` to
/// start the loop, `durable`/`wake_at` to wake the volume), so at least one
/// of them sees the other's store and no request or wake-up is lost.
#[derive(Debug)]
pub(super) struct SyncLoop {
    /// The highest LSN a writer asked to be durable.
    wanted: AtomicU64,
    /// What the loop made durable (the WAL's durable LSN after its sync).
    durable: AtomicU64,
    /// A job runs the loop (or the WAL failed, and none may run again).
    running: AtomicBool,
    /// The volume wants a `LocalDurable` once `durable` reaches this;
    /// `u64::MAX` when it does not.
    wake_at: AtomicU64,
}

impl SyncLoop {
    /// A loop with nothing to do, the WAL durable up to `durable`.
    pub(super) fn new(durable: u64) -> Self {
        Self {
            wanted: AtomicU64::new(durable),
            durable: AtomicU64::new(durable),
            running: AtomicBool::new(false),
            wake_at: AtomicU64::new(u64::MAX),
        }
    }

    /// What the loop made durable so far.
    pub(super) fn durable(&self) -> u64 {
        self.durable.load(SeqCst)
    }
}

/// One turn of the loop on the blocking pool: syncs until nothing more is
/// wanted, at most `SYNCS_PER_JOB` times and only while no other job waits
/// for a thread, then queues its next turn.
struct SyncJob {
    sync: Arc<SyncLoop>,
    store: Arc<Store>,
    me: MeteredAddr<VolumeActor>,
    sync_seconds: metrics::Histogram,
    pool: BlockingPool,
    tasks: TaskTracker,
}

impl SyncJob {
    fn run(self) {
        let sync = &self.sync;
        for _ in 0..SYNCS_PER_JOB {
            let target = sync.wanted.load(SeqCst);
            let started = std::time::Instant::now();
            let result = self.store.sync_to(target);
            self.sync_seconds.record(started.elapsed().as_secs_f64());
            let now = match result {
                Ok(now) => now,
                Err(error) => {
                    // `running` stays set: no sync runs on a poisoned WAL.
                    let result = Err(error.to_string());
                    self.me.do_send(LocalDurable { result });
                    return;
                }
            };
            sync.durable.fetch_max(now, SeqCst);
            if sync.wake_at.load(SeqCst) <= now {
                self.me.do_send(LocalDurable { result: Ok(now) });
            }
            sync.running.store(false, SeqCst);
            if sync.wanted.load(SeqCst) <= now || sync.running.swap(true, SeqCst) {
                return;
            }
            if self.pool.others_waiting() {
                break;
            }
        }
        let (pool, tasks) = (self.pool.clone(), self.tasks.clone());
        pool.run(&tasks, move || self.run());
    }
}

impl VolumeActor {
    /// Asks for `lsn` to become durable: the sync loop serves it with the
    /// next group commit, starting if it is not running.
    pub(super) fn want_sync(&mut self, lsn: u64) {
        if self.poisoned {
            return;
        }
        let sync = &self.sync;
        sync.wanted.fetch_max(lsn, SeqCst);
        if sync.durable.load(SeqCst) >= lsn || sync.running.swap(true, SeqCst) {
            return;
        }
        let Some(me) = self.me.clone() else {
            sync.running.store(false, SeqCst);
            return;
        };
        let job = SyncJob {
            sync: Arc::clone(sync),
            store: Arc::clone(&self.store),
            me,
            sync_seconds: self.sync_seconds.clone(),
            pool: self.pools.blocking.clone(),
            tasks: self.tasks.clone(),
        };
        self.pools.blocking.run(&self.tasks, move || job.run());
    }

    /// Tells the engine what the sync loop made durable since it last heard,
    /// and starts the checkpoints that waited for it.
    pub(super) fn read_local_durable(&mut self) {
        let (told, durable) = (self.engine.local_durable(), Lsn(self.sync.durable()));
        if durable <= told {
            return;
        }
        self.engine.handle_local_durable(told, durable);
        if !self.checkpoints_waiting.is_empty() {
            self.release_checkpoints();
        }
    }

    /// Asks the sync loop for a `LocalDurable` once it reaches what a waiting
    /// barrier or checkpoint lacks, and none otherwise. If the loop got there
    /// already, asks the volume itself.
    pub(super) fn arm_local_wake(&mut self) {
        let barrier = self
            .engine
            .local_durable_wanted()
            .map_or(u64::MAX, Lsn::get);
        let checkpoint = self
            .checkpoints_waiting
            .iter()
            .map(|(target, _)| *target)
            .min();
        let at = barrier.min(checkpoint.unwrap_or(u64::MAX));
        self.sync.wake_at.store(at, SeqCst);
        let durable = self.sync.durable.load(SeqCst);
        if at <= durable {
            if let Some(me) = &self.me {
                me.do_send(LocalDurable {
                    result: Ok(durable),
                });
            }
        }
    }

    /// The volume refuses writes for good: the error says why, in the WAL's
    /// words (a failed sync or a failed segment rotation poisons it).
    pub(super) fn refusal(&mut self) -> VolumeError {
        self.poisoned = true;
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
        if self.poisoned {
            let _ = reply.send(Err(self.refusal()));
        } else if target <= self.engine.local_durable().get() {
            self.start_checkpoint(target, Some(reply));
        } else {
            self.checkpoints_waiting.push((target, reply));
            self.want_sync(target);
            // The sync loop must hear that this waits too.
            self.arm_local_wake();
        }
    }

    /// Starts the waiting checkpoints the WAL is now durable for; when it is
    /// poisoned, tells them why they never will be.
    fn release_checkpoints(&mut self) {
        if self.poisoned {
            for (_, reply) in std::mem::take(&mut self.checkpoints_waiting) {
                let _ = reply.send(Err(self.refusal()));
            }
            return;
        }
        let durable = self.engine.local_durable().get();
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

/// The sync loop got where the volume asked to hear of (the durable LSN), or
/// the WAL failed (why).
#[derive(Debug, Message)]
#[rtype(result = "()")]
pub(crate) struct LocalDurable {
    pub(crate) result: Result<u64, String>,
}

impl Handler<LocalDurable> for VolumeActor {
    type Result = ();

    fn handle(&mut self, msg: LocalDurable, ctx: &mut Context<Self>) {
        self.clock();
        if let Err(reason) = msg.result {
            tracing::error!(%reason, "wal poisoned; refusing writes");
            self.poisoned = true;
            self.release_checkpoints();
        }
        // `clock` read what the loop made durable.
        self.run_commands(ctx);
    }
}
