//! The replica's `ReceiverActor`: applies a primary's stream to its store.
//!
//! It runs on one of the runtime's receiver arbiters, with its listener and
//! connection tasks: appends, fsyncs and truncations block there, never on
//! the arbiter that runs primaries and senders. Checkpoints run on the
//! blocking pool; a base image being received is written by a thread of its
//! own ([`InstallWriter`]). Every frame passes [`admission`] first; a refusal
//! gets a typed message and the connection closes; the replica keeps serving.

use super::admission::{self, Identity, Refusal};
use super::install::{InstallWriter, Sink};

mod verify;
use crate::metered;
use crate::metrics::{MailboxMetrics, MailboxSnapshot, Metered};
use crate::pool::BlockingPool;
use actix::prelude::*;
use bytes::Bytes;
use serde::Serialize;
use std::sync::Arc;
use tokio_util::task::task_tracker::{TaskTracker, TaskTrackerToken};
use walship_io::{
    Envelope, Install, Message, PartialImage, Store, StoreError, WalError, BLOCK_SIZE, CODE_BASE,
    CODE_STORAGE, CODE_STORE, CODE_TRUNCATE_REFUSED, CODE_UNEXPECTED,
};

/// A replica's state, for operators.
#[derive(Debug, Clone, Serialize, MessageResponse)]
#[non_exhaustive]
pub struct ReplicaStatus {
    /// Role.
    pub role: &'static str,
    /// Replica id.
    pub replica: String,
    /// Epoch it accepts.
    pub epoch: u64,
    /// Highest LSN applied (the WAL head, or the end of committed frames
    /// written straight to the extent).
    pub head: u64,
    /// Durable LSN.
    pub durable: u64,
    /// Checkpoint.
    pub checkpoint: u64,
    /// The highest LSN a primary said was committed (sync modes): it
    /// refuses to truncate below it.
    pub committed: u64,
    /// Store generation (bumps on each base install).
    pub generation: u64,
    /// Whether a primary connection is active.
    pub connected: bool,
    /// WAL syncs since the WAL was opened (fewer than the batches it
    /// acknowledged when group commit works).
    pub wal_syncs: u64,
    /// Mailbox metrics.
    pub mailbox: MailboxSnapshot,
}

/// Receives and applies a primary's stream.
pub struct ReceiverActor {
    store: Arc<Store>,
    identity: Identity,
    epoch: u64,
    active_conn: Option<u64>,
    install: Option<InstallWriter>,
    /// An online verify's connection and the content it compares (pinned).
    verifying: Option<verify::Verifying>,
    /// Where region checksums are read: a MiB, kept while an install in
    /// place compares (a fresh buffer per request cost more than the read).
    sums_buf: bytes::BytesMut,
    checkpoint_every: u64,
    checkpoint_requested: u64,
    blocking: BlockingPool,
    /// What the replica's stop waits for: this actor, the listener, every
    /// connection task and checkpoint job hold a token.
    tasks: TaskTracker,
    _alive: TaskTrackerToken,
    committed: u64,
    /// The highest LSN a primary whose commits are durable on replicas
    /// (sync_all, sync_quorum) said was committed: what may have been
    /// acknowledged to a client. Nothing truncates below it, and a primary
    /// that peers or says hello learns it. Persisted with each
    /// checkpoint (`Store::raise_committed_floor`), so a restart starts
    /// from at most one checkpoint's worth behind; never taken from the
    /// checkpoint itself: a node that was primary checkpointed up to its
    /// own head, committed or not.
    committed_floor: u64,
    /// Whether the current connection's primary said its commits are
    /// durable on replicas (its hello): only then does its committed raise
    /// the floor.
    floor_applies: bool,
    /// A pull a primary that lost its log is making of this replica's image.
    pull: Option<Pull>,
    metrics: Arc<MailboxMetrics>,
    /// Moves with every burst received and connection closed.
    activity: crate::activity::Activity,
    /// Seconds each WAL sync took (`walship_wal_sync_seconds`).
    sync_seconds: metrics::Histogram,
}

impl std::fmt::Debug for ReceiverActor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ReceiverActor")
            .field("identity", &self.identity.replica)
            .finish_non_exhaustive()
    }
}

impl Actor for ReceiverActor {
    type Context = Context<Self>;

    /// Records committed frames a connection that broke mid-burst left
    /// written straight to the extent: unrecorded, the next open would
    /// start the replica over (see `Store::apply_replicated`).
    fn stopped(&mut self, _: &mut Self::Context) {
        if let Err(e) = self.store.sync_to(self.store.head()) {
            tracing::error!(replica = %self.identity.replica, error = %e, "replica sync at stop failed");
        }
    }
}

impl Metered for ReceiverActor {
    fn mailbox(&self) -> &MailboxMetrics {
        &self.metrics
    }
}

metered!(ReceiverActor: Inbound, ConnClosed, GetReplicaStatus, ReplicaRead, ReplicaChecksum, #[cfg(feature = "faults")] crate::testing::InjectStorageFault, StopReceiver);

/// A primary pulling this replica's whole volume at its durable LSN (see
/// `Message::PullImage`): chunks go out in order, their crc32c kept.
#[derive(Debug)]
struct Pull {
    image_lsn: u64,
    image_bytes: u64,
    next: u64,
    crc: u32,
}

/// The most bytes one `SumsRequest` may cover (the replica reads them at
/// once).
const SUMS_MAX: u64 = 64 << 20;

/// The largest chunk a pull may ask for.
const PULL_CHUNK_MAX: u32 = 8 << 20;

/// WAL bytes one answer to `PullFrames` carries at most (a frame's length
/// limit leaves room for the batch's header).
const PULL_FRAMES_MAX: usize = 16 << 20;

/// What a connection task must send back, and whether to close after.
#[derive(Debug, Default, MessageResponse)]
pub(crate) struct Reply {
    pub(crate) send: Vec<Envelope>,
    pub(crate) close: bool,
}

fn error(epoch: u64, code: u16, message: impl Into<String>) -> Reply {
    Reply {
        send: vec![Envelope {
            epoch,
            message: Message::Error {
                code,
                message: message.into(),
            },
        }],
        close: true,
    }
}

impl ReceiverActor {
    pub(crate) fn new(
        store: Arc<Store>,
        volume: String,
        identity: String,
        checkpoint_every: u64,
        metrics: Arc<MailboxMetrics>,
        blocking: BlockingPool,
        tasks: TaskTracker,
    ) -> Self {
        let epoch = store.superblock().epoch;
        // A replica's writes are not marked: a map kept from when this
        // store was a primary would miss them (see `Store::track_dirty`).
        if let Err(e) = store.clear_dirty_maps() {
            tracing::error!(error = %e, "clearing the dirty maps of a former primary");
        }
        Self {
            // What primaries said was committed, as of the last checkpoint
            // (never the checkpoint itself: a former primary's is its own
            // head).
            committed_floor: store.committed_floor(),
            floor_applies: false,
            pull: None,
            blocking,
            _alive: tasks.token(),
            tasks,
            store,
            identity: Identity {
                volume,
                replica: identity,
            },
            epoch,
            active_conn: None,
            install: None,
            sums_buf: bytes::BytesMut::new(),
            verifying: None,
            checkpoint_every,
            checkpoint_requested: 0,
            committed: 0,
            sync_seconds: metrics::histogram!("walship_wal_sync_seconds", "role" => "replica"),
            metrics,
            activity: crate::activity::Activity::default(),
        }
    }

    /// Shares `activity` with the volume's handle (before it starts).
    pub(crate) fn with_activity(mut self, activity: crate::activity::Activity) -> Self {
        self.activity = activity;
        self
    }

    /// Makes the WAL durable up to `lsn`, timing the sync.
    fn sync_to(&self, lsn: u64) -> Result<u64, StoreError> {
        let started = std::time::Instant::now();
        let synced = self.store.sync_to(lsn);
        self.sync_seconds.record(started.elapsed().as_secs_f64());
        synced
    }

    /// The store refused what the primary asked. A storage failure (the
    /// disk, not the input) is said loudly here and sent to the primary
    /// under its own code, with the cause, before the connection closes;
    /// anything else gets `otherwise`.
    fn store_failed(&self, what: &str, e: &StoreError, otherwise: u16) -> Reply {
        if e.is_storage_failure() {
            tracing::error!(replica = %self.identity.replica, error = %e, "replica storage failed: {what}");
            return error(
                self.epoch,
                CODE_STORAGE,
                format!("storage failure: {what}: {e}"),
            );
        }
        error(self.epoch, otherwise, format!("{what}: {e}"))
    }

    fn answer(&self, message: Message) -> Reply {
        Reply {
            send: vec![Envelope {
                epoch: self.epoch,
                message,
            }],
            close: false,
        }
    }

    /// Counts the refusal and closes the connection with what says why.
    fn refuse(&self, refusal: &Refusal) -> Reply {
        if refusal.is_fence() {
            self.metrics.fence();
        } else {
            self.metrics.reject();
        }
        Reply {
            send: vec![Envelope {
                epoch: self.epoch,
                message: refusal.message(),
            }],
            close: true,
        }
    }

    fn hello(&mut self, conn: u64, epoch: u64, volume: &str, replica: &str) -> Reply {
        let epoch = match admission::hello(&self.identity, self.epoch, volume, replica, epoch) {
            Ok(epoch) => epoch,
            Err(refusal) => return self.refuse(&refusal),
        };
        if epoch > self.epoch {
            if let Err(e) = self.store.persist_epoch(epoch) {
                return self.store_failed("persist epoch", &e, CODE_STORE);
            }
            self.epoch = epoch;
        }
        self.active_conn = Some(conn);
        self.install = None;
        self.pull = None;
        // A new session: whatever a verify compared is not in sync any more
        // (and its pin would hold the checkpointer, and an install's apply).
        self.verifying = None;
        // Only this primary's word counts for what is committed: an earlier
        // one's, after a failover, may name frames the new one lacks.
        self.committed = self.store.superblock().checkpoint;
        // Frames applied before a connection broke may not be synced yet:
        // report only what is durable, after making the head durable.
        if let Err(e) = self.sync_to(self.store.head()) {
            return self.store_failed("sync before hello", &e, CODE_STORE);
        }
        self.answer(self.hello_ack())
    }

    /// What the replica holds: its durable LSN, checkpoint, epoch history
    /// and the committed LSN it knows.
    fn hello_ack(&self) -> Message {
        let replica = self.identity.replica.clone();
        let committed = self.committed_floor;
        if let Some(partial) = self.store.partial() {
            // Part of an image over what it held: no log to build on.
            return Message::HelloAck {
                replica,
                flushed: 0,
                checkpoint: 0,
                epochs: Vec::new(),
                committed,
                partial: Some(partial),
            };
        }
        let wal = self.store.wal();
        Message::HelloAck {
            replica,
            flushed: wal.durable(),
            checkpoint: self.store.superblock().checkpoint,
            epochs: wal.epochs(),
            committed,
            partial: None,
        }
    }

    /// A primary about to serve asks what this replica holds; nothing on
    /// the replica changes (no epoch taken, no session), and an older
    /// primary is answered too: the epoch of the answer tells it.
    fn peer(&mut self, volume: &str, replica: &str) -> Reply {
        if let Err(refusal) = admission::hello(&self.identity, 0, volume, replica, 0) {
            return self.refuse(&refusal);
        }
        Reply {
            send: vec![Envelope {
                epoch: self.epoch,
                message: self.hello_ack(),
            }],
            close: true,
        }
    }

    /// Notes what a primary says is committed.
    fn heard_committed(&mut self, committed: u64) {
        self.committed = self.committed.max(committed);
        if self.floor_applies {
            self.committed_floor = self.committed_floor.max(committed);
        }
    }

    /// Serves a pull of the whole volume at the durable head (the primary
    /// that lost its log, after its hello in a newer term: nothing else
    /// writes here meanwhile).
    fn pull(&mut self, message: Message) -> Reply {
        let epoch = self.epoch;
        match message {
            Message::PullImage => {
                let head = self.store.head();
                let image_lsn = match self.sync_to(head) {
                    Ok(durable) => durable,
                    Err(e) => return self.store_failed("sync before pull", &e, CODE_STORE),
                };
                let image_bytes = self.store.block_count() * BLOCK_SIZE as u64;
                self.pull = Some(Pull {
                    image_lsn,
                    image_bytes,
                    next: 0,
                    crc: 0,
                });
                tracing::info!(replica = %self.identity.replica, image_lsn,
                    "a primary pulls this replica's image");
                self.answer(Message::RebuildBegin {
                    session: 0,
                    kind: walship_io::ImageKind::FullBase,
                    image_lsn,
                    image_bytes,
                    install: Install::Staging,
                })
            }
            Message::PullChunk { offset, len } => {
                let Some(pull) = self.pull.as_mut() else {
                    return error(epoch, CODE_UNEXPECTED, "pull chunk without a pull");
                };
                let block = BLOCK_SIZE as u64;
                let len = u64::from(len);
                if offset != pull.next
                    || len == 0
                    || len > u64::from(PULL_CHUNK_MAX)
                    || len % block != 0
                    || offset + len > pull.image_bytes
                {
                    return error(
                        epoch,
                        CODE_BASE,
                        format!(
                            "pull chunk {offset}+{len}: expected {} onwards, whole blocks, at most {PULL_CHUNK_MAX} bytes, within {}",
                            pull.next, pull.image_bytes
                        ),
                    );
                }
                match self.store.read(offset / block, len / block) {
                    Ok(data) => {
                        if let Some(pull) = self.pull.as_mut() {
                            pull.crc = crc32c::crc32c_append(pull.crc, &data);
                            pull.next += len;
                        }
                        self.answer(Message::RebuildChunk {
                            session: 0,
                            offset,
                            data,
                        })
                    }
                    Err(e) => self.store_failed("read for pull", &e, CODE_STORE),
                }
            }
            Message::PullFrames { after } => {
                let head = self.store.head();
                let durable = match self.sync_to(head) {
                    Ok(durable) => durable,
                    Err(e) => return self.store_failed("sync before pull", &e, CODE_STORE),
                };
                let wal = self.store.wal();
                if after < wal.tail() || after > durable {
                    return error(
                        epoch,
                        CODE_BASE,
                        format!(
                            "frames after {after}: this WAL holds {}-{durable}",
                            wal.tail() + 1
                        ),
                    );
                }
                let (frames, last) = if after == durable {
                    (Bytes::new(), after)
                } else {
                    match wal.read_raw(after, durable, PULL_FRAMES_MAX) {
                        Ok(read) => read,
                        Err(e) => {
                            return self.store_failed(
                                "read for pull",
                                &StoreError::Wal(e),
                                CODE_STORE,
                            )
                        }
                    }
                };
                self.answer(Message::WalBatch {
                    session: 0,
                    first_lsn: after + 1,
                    last_lsn: last,
                    committed: 0,
                    frames,
                })
            }
            Message::PullDone => match self.pull.take() {
                Some(pull) if pull.next == pull.image_bytes => {
                    let mut epochs = self.store.wal().epochs();
                    epochs.retain(|start| start.first_lsn <= pull.image_lsn);
                    self.answer(Message::RebuildDone {
                        session: 0,
                        image_lsn: pull.image_lsn,
                        checksum: pull.crc,
                        epochs,
                    })
                }
                _ => error(epoch, CODE_UNEXPECTED, "pull done before the whole image"),
            },
            _ => error(epoch, CODE_UNEXPECTED, "not a pull message"),
        }
    }

    /// Applies a batch without syncing; `unsynced` remembers that a sync
    /// (and one ack for everything applied) is owed. Frames the primary
    /// calls committed may go straight to the extent (see
    /// [`Store::apply_replicated`]).
    fn batch(
        &mut self,
        first_lsn: u64,
        last_lsn: u64,
        committed: u64,
        frames: &Bytes,
        unsynced: &mut bool,
    ) -> Reply {
        if let Err(refusal) = admission::batch(self.store.head(), first_lsn) {
            return self.refuse(&refusal);
        }
        if self.store.partial().is_some() {
            self.metrics.reject();
            return error(
                self.epoch,
                CODE_BASE,
                "this replica holds part of an image (an interrupted rebuild): it takes frames only after a rebuild",
            );
        }
        self.heard_committed(committed);
        match self.store.apply_replicated(frames, self.committed) {
            Ok(new_head) if new_head == last_lsn => {
                *unsynced = true;
                Reply::default()
            }
            Ok(new_head) => {
                self.metrics.reject();
                error(
                    self.epoch,
                    CODE_STORE,
                    format!("batch claimed last lsn {last_lsn}, frames end at {new_head}"),
                )
            }
            Err(e) => {
                self.metrics.reject();
                self.store_failed("append", &e, CODE_STORE)
            }
        }
    }

    /// Syncs everything appended (one fsync for every batch since the last)
    /// and acknowledges the durable LSN.
    fn flush(&mut self, unsynced: &mut bool) -> Option<Reply> {
        if !std::mem::take(unsynced) {
            return None;
        }
        let head = self.store.head();
        Some(match self.sync_to(head) {
            Ok(durable) => {
                self.maybe_checkpoint(durable);
                self.answer(Message::DurableAck {
                    durable,
                    barrier: None,
                    committed: self.committed_floor,
                })
            }
            Err(e) => self.store_failed("sync", &e, CODE_STORE),
        })
    }

    /// Checkpoints only up to what the primary says is committed, so a later
    /// truncation of uncommitted entries stays possible.
    ///
    /// The checkpoint itself runs on the runtime's blocking pool, off the ack
    /// path; a new one is asked for only every `checkpoint_every` LSNs.
    fn maybe_checkpoint(&mut self, durable: u64) {
        let floor = self
            .store
            .superblock()
            .checkpoint
            .max(self.checkpoint_requested);
        let target = durable.min(self.committed);
        if target.saturating_sub(floor) >= self.checkpoint_every {
            self.checkpoint_requested = target;
            let store = Arc::clone(&self.store);
            let (committed_floor, generation) =
                (self.committed_floor, self.store.superblock().generation);
            self.blocking.run(&self.tasks, move || {
                // The floor goes with each checkpoint: at most one
                // checkpoint's worth behind after a restart.
                let done = store
                    .checkpoint(target)
                    .and_then(|_| store.raise_committed_floor(committed_floor, generation));
                if let Err(e) = done {
                    tracing::error!(error = %e, "replica checkpoint failed");
                }
            });
        }
    }

    /// The install's writer, done; idle replicas keep no sums buffer.
    fn finish_install(&mut self) -> Option<Result<Sink, StoreError>> {
        self.sums_buf = bytes::BytesMut::new();
        self.install.take().map(InstallWriter::finish)
    }

    fn rebuild(&mut self, message: Message) -> Reply {
        let epoch = self.epoch;
        match message {
            Message::RebuildBegin {
                image_lsn,
                image_bytes,
                install,
                ..
            } => {
                let expected = self.store.block_count() * BLOCK_SIZE as u64;
                if image_bytes != expected {
                    return error(
                        epoch,
                        CODE_BASE,
                        format!("image of {image_bytes} bytes, volume is {expected}"),
                    );
                }
                // The writer of an earlier attempt is done before this one
                // touches the files.
                self.install = None;
                let begun = match install {
                    Install::Staging => self.store.begin_install(image_lsn).map(Sink::Staging),
                    Install::InPlace {
                        source,
                        since,
                        apply_through,
                        by_map,
                    } => {
                        let marker = PartialImage {
                            source,
                            since,
                            image_lsn,
                            cursor: 0,
                            by_map,
                        };
                        self.store
                            .begin_in_place(marker, apply_through)
                            .map(Sink::InPlace)
                    }
                };
                match begun {
                    Ok(sink) => {
                        self.install = Some(InstallWriter::start(sink));
                        Reply::default()
                    }
                    Err(e) => self.store_failed("begin install", &e, CODE_BASE),
                }
            }
            Message::SumsRequest {
                session,
                offset,
                len,
                region_bytes,
            } => {
                if len > SUMS_MAX || region_bytes < BLOCK_SIZE as u64 || self.install.is_none() {
                    return error(
                        epoch,
                        CODE_UNEXPECTED,
                        format!("sums of {len} bytes in regions of {region_bytes}: at most {SUMS_MAX}, regions of whole blocks, during an install"),
                    );
                }
                let mut buf = std::mem::take(&mut self.sums_buf);
                let sums = self.store.extent_sums(offset, len, region_bytes, &mut buf);
                self.sums_buf = buf;
                match sums {
                    Ok(sums) => self.answer(Message::RegionSums {
                        session,
                        offset,
                        sums: Bytes::from(walship_io::regions::encode_sums(&sums)),
                    }),
                    Err(e) => self.store_failed("region sums", &e, CODE_BASE),
                }
            }
            Message::RebuildChunk { offset, data, .. } => match self.install.as_mut() {
                Some(install) => match install.write(offset, data) {
                    Ok(()) => Reply::default(),
                    Err(e) => self.store_failed("install chunk", &e, CODE_BASE),
                },
                None => error(epoch, CODE_UNEXPECTED, "rebuild chunk without begin"),
            },
            Message::RebuildDone {
                session,
                image_lsn,
                checksum,
                epochs,
            } => match self.finish_install() {
                Some(Err(e)) => self.store_failed("install", &e, CODE_BASE),
                Some(Ok(install)) if install.image_lsn() == image_lsn => {
                    let committed = match install {
                        Sink::Staging(install) => {
                            self.store.commit_install(install, checksum, epoch, &epochs)
                        }
                        Sink::InPlace(install) => self
                            .store
                            .commit_in_place(install, checksum, epoch, &epochs),
                    };
                    match committed {
                        Ok(()) => {
                            // As after a truncation: only this primary's word counts past the image.
                            self.committed = self.committed.min(image_lsn);
                            self.committed_floor = self.committed_floor.min(image_lsn);
                            if let Err(e) = self.store.lower_committed_floor(self.committed_floor) {
                                return self.store_failed("persist the floor", &e, CODE_BASE);
                            }
                            self.answer(Message::RebuildInstalled { session, image_lsn })
                        }
                        Err(e) => self.store_failed("commit install", &e, CODE_BASE),
                    }
                }
                _ => error(
                    epoch,
                    CODE_UNEXPECTED,
                    "rebuild done without a matching begin",
                ),
            },
            _ => error(epoch, CODE_UNEXPECTED, "not a rebuild message"),
        }
    }
}

#[derive(Debug, Message)]
#[rtype(result = "Reply")]
pub(crate) struct Inbound {
    pub(crate) conn: u64,
    /// Frames that arrived together: consecutive WAL batches share one fsync.
    pub(crate) envelopes: Vec<Envelope>,
}

impl Handler<Inbound> for ReceiverActor {
    type Result = Reply;

    fn handle(&mut self, msg: Inbound, _: &mut Context<Self>) -> Self::Result {
        self.activity.bump();
        let mut out = Reply::default();
        let mut unsynced = false;
        for envelope in msg.envelopes {
            // A barrier's own ack covers what the batches before it owe.
            if !matches!(
                envelope.message,
                Message::WalBatch { .. } | Message::Barrier { .. }
            ) {
                if let Some(ack) = self.flush(&mut unsynced) {
                    out.send.extend(ack.send);
                    out.close |= ack.close;
                }
            }
            if out.close {
                return out;
            }
            let reply = self.one(msg.conn, envelope, &mut unsynced);
            out.send.extend(reply.send);
            if reply.close {
                out.close = true;
                return out;
            }
        }
        if let Some(ack) = self.flush(&mut unsynced) {
            out.send.extend(ack.send);
            out.close |= ack.close;
        }
        out
    }
}

impl ReceiverActor {
    fn one(&mut self, conn: u64, envelope: Envelope, unsynced: &mut bool) -> Reply {
        let Envelope { epoch, message } = envelope;
        if let Message::Hello {
            volume,
            replica,
            durable_commits,
            ..
        } = &message
        {
            let reply = self.hello(conn, epoch, volume, replica);
            if !reply.close {
                self.floor_applies = *durable_commits;
            }
            return reply;
        }
        if let Message::Peer {
            volume, replica, ..
        } = &message
        {
            return self.peer(volume, replica);
        }
        if let Message::VerifyBegin {
            volume,
            replica,
            lsn,
            ..
        } = &message
        {
            return self.verify_begin(conn, epoch, volume, replica, *lsn);
        }
        if let Some(reply) = self.verify_message(conn, &message) {
            return reply;
        }
        self.verify_expire();
        if let Err(refusal) = admission::frame(self.epoch, self.active_conn, conn, epoch) {
            return self.refuse(&refusal);
        }
        let reply = match message {
            Message::WalBatch {
                first_lsn,
                last_lsn,
                committed,
                frames,
                ..
            } => self.batch(first_lsn, last_lsn, committed, &frames, unsynced),
            Message::Barrier { id, committed, .. } => {
                // What was committed when the barrier was asked for: known
                // (its floor) before the ack says so. Only a primary whose
                // commits are durable on replicas asks for barriers, so this
                // raises the floor whatever its hello said (its mode may
                // have changed since).
                self.heard_committed(committed);
                self.committed_floor = self.committed_floor.max(committed);
                // Everything appended so far, the barrier's LSN included (the
                // primary asks once it has shipped it): one sync, one ack.
                *unsynced = false;
                let head = self.store.head();
                match self.sync_to(head) {
                    Ok(durable) => {
                        self.maybe_checkpoint(durable);
                        self.answer(Message::DurableAck {
                            durable,
                            barrier: Some(id),
                            committed: self.committed_floor,
                        })
                    }
                    Err(e) => self.store_failed("sync", &e, CODE_STORE),
                }
            }
            Message::Heartbeat { seq, committed } => {
                self.heard_committed(committed);
                self.answer(Message::HeartbeatAck {
                    seq,
                    durable: self.store.wal().durable(),
                })
            }
            Message::Truncate { to, .. } if to < self.committed_floor.min(self.store.head()) => {
                tracing::error!(replica = %self.identity.replica, to, committed = self.committed_floor,
                    "truncation below the committed LSN refused");
                error(
                    self.epoch,
                    CODE_TRUNCATE_REFUSED,
                    format!(
                        "cannot truncate to {to}: a primary said {} was committed (acknowledged writes would be lost)",
                        self.committed_floor
                    ),
                )
            }
            Message::Truncate { session, to } => match self.store.truncate_after(to) {
                Ok(()) => {
                    // What an earlier primary called committed past `to` is
                    // gone: the LSNs after it will be another epoch's writes,
                    // not committed until this primary says so.
                    self.committed = self.committed.min(to);
                    self.answer(Message::Truncated { session, to })
                }
                Err(StoreError::Wal(WalError::BelowCheckpoint { .. })) => error(
                    self.epoch,
                    CODE_TRUNCATE_REFUSED,
                    format!("cannot truncate to {to}: below the checkpoint"),
                ),
                Err(e) => self.store_failed("truncate", &e, CODE_STORE),
            },
            message @ (Message::RebuildBegin { .. }
            | Message::RebuildChunk { .. }
            | Message::SumsRequest { .. }
            | Message::RebuildDone { .. }) => self.rebuild(message),
            message @ (Message::PullImage
            | Message::PullChunk { .. }
            | Message::PullDone
            | Message::PullFrames { .. }) => self.pull(message),
            other => error(
                self.epoch,
                CODE_UNEXPECTED,
                format!("unexpected message {other:?}"),
            ),
        };
        reply
    }
}

#[derive(Debug, Message)]
#[rtype(result = "()")]
pub(crate) struct ConnClosed(pub(crate) u64);

impl Handler<ConnClosed> for ReceiverActor {
    type Result = ();

    fn handle(&mut self, msg: ConnClosed, _: &mut Context<Self>) {
        self.verify_closed(msg.0);
        if self.active_conn == Some(msg.0) {
            self.active_conn = None;
            self.install = None;
            self.activity.bump();
        }
    }
}

/// A replica status snapshot.
#[derive(Debug, Message)]
#[rtype(result = "ReplicaStatus")]
pub struct GetReplicaStatus;

impl Handler<GetReplicaStatus> for ReceiverActor {
    type Result = ReplicaStatus;

    fn handle(&mut self, _: GetReplicaStatus, _: &mut Context<Self>) -> Self::Result {
        let wal = self.store.wal();
        let superblock = self.store.superblock();
        ReplicaStatus {
            role: "replica",
            replica: self.identity.replica.clone(),
            epoch: self.epoch,
            head: self.store.head(),
            durable: wal.durable(),
            checkpoint: superblock.checkpoint,
            committed: self.committed_floor,
            generation: superblock.generation,
            connected: self.active_conn.is_some(),
            wal_syncs: wal.sync_count(),
            mailbox: self.metrics.snapshot(),
        }
    }
}

/// Reads blocks from the replica's store.
#[derive(Debug, Message)]
#[rtype(result = "Result<Bytes, StoreError>")]
pub struct ReplicaRead {
    /// First block.
    pub lba: u64,
    /// Blocks.
    pub blocks: u64,
}

impl Handler<ReplicaRead> for ReceiverActor {
    type Result = Result<Bytes, StoreError>;

    fn handle(&mut self, msg: ReplicaRead, _: &mut Context<Self>) -> Self::Result {
        self.store.read(msg.lba, msg.blocks)
    }
}

/// crc32c of the replica's readable volume.
#[derive(Debug, Message)]
#[rtype(result = "Result<u32, StoreError>")]
pub struct ReplicaChecksum;

impl Handler<ReplicaChecksum> for ReceiverActor {
    type Result = Result<u32, StoreError>;

    fn handle(&mut self, _: ReplicaChecksum, _: &mut Context<Self>) -> Self::Result {
        self.store.content_checksum()
    }
}

#[cfg(feature = "faults")]
impl Handler<crate::testing::InjectStorageFault> for ReceiverActor {
    type Result = ();

    fn handle(&mut self, msg: crate::testing::InjectStorageFault, _: &mut Context<Self>) {
        msg.0.inject(&self.store.wal());
    }
}

/// Stops the receiver.
#[derive(Debug, Message)]
#[rtype(result = "()")]
pub struct StopReceiver;

impl Handler<StopReceiver> for ReceiverActor {
    type Result = ();

    fn handle(&mut self, _: StopReceiver, ctx: &mut Context<Self>) {
        ctx.stop();
    }
}
