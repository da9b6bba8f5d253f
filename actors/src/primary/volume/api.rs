//! What the volume's handle asks of it: writes, barriers, reads,
//! assignments, status, checkpoints, stop.

use super::{VolumeActor, HOLD_PIN_PREFIX};
use crate::error::VolumeError;
use crate::metrics::MailboxSnapshot;
use actix::prelude::*;
use bytes::Bytes;
use serde::Serialize;
use std::sync::atomic::Ordering;
use std::time::Duration;
use tokio::sync::oneshot;
use walship_engine::{Assignment, Lsn, RecoveryEvent, RegistryStatus, ReplicaId};
use walship_io::{BackendChoice, Store, StoreError};

/// Everything an operator sees of a primary.
#[derive(Debug, Clone, Serialize, MessageResponse)]
#[non_exhaustive]
pub struct VolumeStatus {
    /// Role.
    pub role: &'static str,
    /// Engine registry: senders, sessions, plans, history.
    pub registry: RegistryStatus,
    /// WAL head.
    pub head: u64,
    /// Locally durable LSN.
    pub durable: u64,
    /// Checkpoint LSN.
    pub checkpoint: u64,
    /// WAL tail.
    pub tail: u64,
    /// WAL syncs since the WAL was opened (fewer than the writes when group
    /// commit works).
    pub wal_syncs: u64,
    /// WAL pins held by recovery plans (zero when no recovery runs).
    pub recovery_pins: usize,
    /// Replicas' retention holds (one per replica that has one).
    pub retention_holds: usize,
    /// Snapshot pins (the checkpointer pauses while any is held).
    pub snapshot_pins: usize,
    /// Engine resources held by the runtime.
    pub held_resources: usize,
    /// Log reader backend and why.
    pub reader_backend: String,
    /// Bytes each replica's sender has put on the wire, by replica.
    pub bytes_sent: Vec<(ReplicaId, u64)>,
    /// Each replica's lag in WAL bytes: the frames after its durable LSN
    /// that the primary still holds (a replica behind the WAL's tail needs
    /// a rebuild, whatever this says).
    pub lag_bytes: Vec<(ReplicaId, u64)>,
    /// The dirty map kept for each replica that is away or being rebuilt
    /// in place: (replica, writes after this LSN marked, regions marked,
    /// regions in all).
    pub dirty_maps: Vec<(String, u64, u64, u64)>,
    /// Each replica that is recovering or waits to: kind, bytes to go,
    /// rate, ETA, place in the rebuild queue.
    pub recovery: Vec<super::progress::RecoveryProgress>,
    /// The volume's writes held back for a replica that is not
    /// converging (the engine's `write_limit`), and what that cost.
    pub write_backpressure: super::converging::WriteBackpressure,
    /// Mailbox metrics: the volume actor, then each sender.
    pub mailboxes: Vec<MailboxSnapshot>,
    /// The volume sleeps: every replica holds the whole log, committed and
    /// durable, with nothing waiting, so it arms no timer and sends no
    /// heartbeat until a write (or any other input) wakes it.
    pub asleep: bool,
}

impl VolumeActor {
    pub(super) fn status(&self) -> VolumeStatus {
        let wal = self.store.wal();
        let retention = wal.retention();
        let retention_holds = retention
            .pins
            .iter()
            .filter(|p| p.pin.label.starts_with(HOLD_PIN_PREFIX))
            .count();
        let choice: &BackendChoice = self.reader.choice();
        let mut mailboxes = vec![self.metrics.snapshot()];
        let mut senders: Vec<_> = self.senders.iter().collect();
        senders.sort_by(|a, b| a.0.cmp(b.0));
        mailboxes.extend(senders.into_iter().map(|(_, s)| s.metrics().snapshot()));
        let registry = self.engine.status();
        let lag_bytes = self.backlogs();
        let dirty_maps = self
            .store
            .dirty_maps()
            .into_iter()
            .map(|(replica, map)| (replica, map.since, map.dirty, map.regions))
            .collect();
        let recovery = self.progress(&registry);
        VolumeStatus {
            role: "primary",
            recovery,
            registry,
            lag_bytes,
            write_backpressure: self.converging.status(),
            dirty_maps,
            head: wal.head(),
            durable: wal.durable(),
            checkpoint: self.store.superblock().checkpoint,
            tail: wal.tail(),
            wal_syncs: wal.sync_count(),
            recovery_pins: retention.pins.len() - retention_holds,
            retention_holds,
            snapshot_pins: self.store.snapshot_pins(),
            held_resources: self.resources.len(),
            reader_backend: format!("{:?}: {}", choice.backend, choice.reason),
            bytes_sent: {
                let mut sent: Vec<(ReplicaId, u64)> = self
                    .bytes_sent
                    .iter()
                    .map(|(r, n)| (r.clone(), n.load(Ordering::Relaxed)))
                    .collect();
                sent.sort();
                sent
            },
            mailboxes,
            asleep: self.asleep(),
        }
    }
}

/// Write whole blocks; returns the LSN, once it is committed under the
/// volume's mode if `commit` (a FUA write: one trip to the actor, not a
/// write and then a barrier).
#[derive(Debug, Message)]
#[rtype(result = "Result<u64, VolumeError>")]
pub struct Write {
    /// First block.
    pub lba: u64,
    /// Whole blocks.
    pub data: Bytes,
    /// Resolve only once the write is committed.
    pub commit: bool,
}

impl Handler<Write> for VolumeActor {
    type Result = ResponseFuture<Result<u64, VolumeError>>;

    fn handle(&mut self, msg: Write, ctx: &mut Context<Self>) -> Self::Result {
        let epoch = self.engine.epoch().get();
        let bytes = msg.data.len();
        let appended = self.append(ctx, |store| store.write(epoch, msg.lba, msg.data));
        // Held back for a replica that is not converging: the answer
        // waits, so a client with a bounded queue writes less.
        let delay = match appended {
            Ok(_) => {
                let max = self.config.tuning.max_write_delay;
                self.converging.write_delay(bytes, max)
            }
            Err(_) => Duration::ZERO,
        };
        let answer = self.then_commit(ctx, appended, msg.commit);
        if delay.is_zero() {
            return answer;
        }
        Box::pin(async move {
            tokio::time::sleep(delay).await;
            answer.await
        })
    }
}

/// Zero whole blocks (a trim frame in the WAL); returns the LSN, once it is
/// committed if `commit`.
#[derive(Debug, Message)]
#[rtype(result = "Result<u64, VolumeError>")]
pub struct Trim {
    /// First block.
    pub lba: u64,
    /// Number of blocks.
    pub blocks: u64,
    /// Resolve only once the trim is committed.
    pub commit: bool,
}

impl Handler<Trim> for VolumeActor {
    type Result = ResponseFuture<Result<u64, VolumeError>>;

    fn handle(&mut self, msg: Trim, ctx: &mut Context<Self>) -> Self::Result {
        let epoch = self.engine.epoch().get();
        let appended = self.append(ctx, |store| store.trim(epoch, msg.lba, msg.blocks));
        self.then_commit(ctx, appended, msg.commit)
    }
}

impl VolumeActor {
    /// What a write or trim answers: its LSN now, or once committed.
    fn then_commit(
        &mut self,
        ctx: &mut Context<Self>,
        appended: Result<u64, VolumeError>,
        commit: bool,
    ) -> ResponseFuture<Result<u64, VolumeError>> {
        match appended {
            Ok(lsn) if commit => {
                let committed = self.committed(ctx, lsn);
                Box::pin(async move { committed.await.map(|_| lsn) })
            }
            appended => Box::pin(std::future::ready(appended)),
        }
    }

    /// Resolves with the committed LSN once `lsn` is committed under the
    /// volume's mode: an engine barrier, with its deadline and failures.
    fn committed(
        &mut self,
        ctx: &mut Context<Self>,
        lsn: u64,
    ) -> impl std::future::Future<Output = Result<u64, VolumeError>> + 'static {
        let epoch = self.engine.epoch();
        let registered = self.engine.handle_barrier(Lsn(lsn), epoch);
        let (tx, rx) = oneshot::channel();
        if let Ok(barrier) = registered {
            self.barriers.insert(barrier, tx);
        }
        self.run_commands(ctx);
        async move {
            registered?;
            match rx.await {
                Ok(Ok(committed)) => Ok(committed),
                Ok(Err(failure)) => Err(VolumeError::Barrier(failure)),
                Err(_) => Err(VolumeError::Stopped),
            }
        }
    }

    /// Appends one frame to the WAL and ships it: a write or a trim.
    fn append(
        &mut self,
        ctx: &mut Context<Self>,
        append: impl FnOnce(&Store) -> Result<u64, StoreError>,
    ) -> Result<u64, VolumeError> {
        self.clock();
        if self.poisoned {
            return Err(self.refusal());
        }
        // The WAL's poison is read only when a write fails, off the hot path.
        let lsn = match append(&self.store) {
            Ok(lsn) => lsn,
            Err(_) if self.store.wal().poisoned().is_some() => return Err(self.refusal()),
            Err(error) => return Err(error.into()),
        };
        self.head_tx.send_replace(lsn);
        self.refresh_wal_state();
        self.want_sync(lsn);
        self.run_commands(ctx);
        Ok(lsn)
    }
}

/// Resolves when `lsn` (or the head) is committed under the volume's mode.
#[derive(Debug, Message)]
#[rtype(result = "Result<u64, VolumeError>")]
pub struct Barrier {
    /// LSN to wait for; the current head when `None`.
    pub lsn: Option<u64>,
}

impl Handler<Barrier> for VolumeActor {
    type Result = ResponseFuture<Result<u64, VolumeError>>;

    fn handle(&mut self, msg: Barrier, ctx: &mut Context<Self>) -> Self::Result {
        self.clock();
        let lsn = msg.lsn.unwrap_or_else(|| self.store.wal().head());
        Box::pin(self.committed(ctx, lsn))
    }
}

/// Reads blocks (the newest data, WAL included).
#[derive(Debug, Message)]
#[rtype(result = "Result<Bytes, VolumeError>")]
pub struct Read {
    /// First block.
    pub lba: u64,
    /// Number of blocks.
    pub blocks: u64,
}

impl Handler<Read> for VolumeActor {
    type Result = Result<Bytes, VolumeError>;

    fn handle(&mut self, msg: Read, _: &mut Context<Self>) -> Self::Result {
        Ok(self.store.read(msg.lba, msg.blocks)?)
    }
}

/// Applies a new assignment (epoch, mode, replicas).
#[derive(Debug, Message)]
#[rtype(result = "Result<(), VolumeError>")]
pub struct ApplyAssignment(pub Assignment);

impl Handler<ApplyAssignment> for VolumeActor {
    type Result = Result<(), VolumeError>;

    fn handle(&mut self, msg: ApplyAssignment, ctx: &mut Context<Self>) -> Self::Result {
        self.clock();
        // The engine cancels every session the assignment invalidates
        // (epoch bump, endpoint change, removal); its commands say so.
        if let Err(error) = self.engine.handle_assignment(msg.0) {
            match error {
                walship_engine::EngineError::StaleEpoch { .. } => self.metrics.fence(),
                _ => self.metrics.reject(),
            }
            return Err(error.into());
        }
        self.note_commit_mode();
        self.run_commands(ctx);
        Ok(())
    }
}

/// Retries every idle replica now, skipping their backoff once.
#[derive(Debug, Message)]
#[rtype(result = "()")]
pub struct Heartbeat;

impl Handler<Heartbeat> for VolumeActor {
    type Result = ();

    fn handle(&mut self, _: Heartbeat, ctx: &mut Context<Self>) {
        self.clock();
        let replicas: Vec<ReplicaId> = self.engine.replicas().cloned().collect();
        for replica in &replicas {
            let _ = self.engine.handle_retry_now(replica);
        }
        self.heartbeat_senders();
        self.run_commands(ctx);
    }
}

/// A status snapshot.
#[derive(Debug, Message)]
#[rtype(result = "VolumeStatus")]
pub struct GetStatus;

impl Handler<GetStatus> for VolumeActor {
    type Result = VolumeStatus;

    fn handle(&mut self, _: GetStatus, _: &mut Context<Self>) -> Self::Result {
        self.status()
    }
}

/// The recovery log.
#[derive(Debug, Message)]
#[rtype(result = "Result<Vec<RecoveryEvent>, VolumeError>")]
pub struct GetRecoveryLog;

impl Handler<GetRecoveryLog> for VolumeActor {
    type Result = Result<Vec<RecoveryEvent>, VolumeError>;

    fn handle(&mut self, _: GetRecoveryLog, _: &mut Context<Self>) -> Self::Result {
        Ok(self.engine.log().events().cloned().collect())
    }
}

/// Checkpoints everything written before it, once the primary's WAL holds
/// it durably (a quorum may have committed it before the primary's own sync).
#[derive(Debug, Message)]
#[rtype(result = "Result<(), VolumeError>")]
pub struct Checkpoint;

impl Handler<Checkpoint> for VolumeActor {
    type Result = ResponseFuture<Result<(), VolumeError>>;

    fn handle(&mut self, _: Checkpoint, ctx: &mut Context<Self>) -> Self::Result {
        self.clock();
        self.report_retention(ctx);
        let (tx, rx) = oneshot::channel();
        self.checkpoint_written(tx);
        Box::pin(async move { rx.await.map_err(|_| VolumeError::Stopped)? })
    }
}

/// crc32c of the readable volume.
#[derive(Debug, Message)]
#[rtype(result = "Result<u32, VolumeError>")]
pub struct ContentChecksum;

impl Handler<ContentChecksum> for VolumeActor {
    type Result = Result<u32, VolumeError>;

    fn handle(&mut self, _: ContentChecksum, _: &mut Context<Self>) -> Self::Result {
        Ok(self.store.content_checksum()?)
    }
}

/// The sender of one replica (benchmarks drive its mailbox directly).
#[cfg(feature = "testing")]
#[derive(Debug, Message)]
#[rtype(result = "Option<crate::MeteredAddr<crate::SenderActor>>")]
pub struct GetSender(pub ReplicaId);

#[cfg(feature = "testing")]
impl Handler<GetSender> for VolumeActor {
    type Result = Option<crate::MeteredAddr<crate::SenderActor>>;

    fn handle(&mut self, msg: GetSender, _: &mut Context<Self>) -> Self::Result {
        self.senders.get(&msg.0).cloned()
    }
}

/// Stops the volume.
#[derive(Debug, Message)]
#[rtype(result = "()")]
pub struct Stop;

impl Handler<Stop> for VolumeActor {
    type Result = ();

    fn handle(&mut self, _: Stop, ctx: &mut Context<Self>) {
        ctx.stop();
    }
}

#[cfg(feature = "faults")]
impl Handler<crate::testing::InjectStorageFault> for VolumeActor {
    type Result = ();

    fn handle(&mut self, msg: crate::testing::InjectStorageFault, _: &mut Context<Self>) {
        msg.0.inject(&self.store.wal());
    }
}
