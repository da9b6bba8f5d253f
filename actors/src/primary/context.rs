//! What a sender and its executors share with their volume: the WAL, the
//! volume's head and committed LSN, tuning, and where to report. Reports are
//! engine inputs, handed to the volume's engine as they are.

use crate::config::Tuning;
use crate::metrics::MeteredRecipient;
use actix::Message;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use tokio::sync::watch;
use tokio_util::task::task_tracker::TaskTrackerToken;
use walship_engine::{ExecutionFailure, Input, ReplicaId, SessionId};
use walship_io::{LogReader, Store};

/// What a sender or its executor reports about its replica: an engine input,
/// handed to the engine as is (the engine fences stale sessions and epochs).
#[derive(Debug, Message)]
#[rtype(result = "()")]
pub(crate) struct EngineInput(pub(crate) Input);

/// What a sender needs from its volume.
#[derive(Debug, Clone)]
pub(crate) struct SenderContext {
    pub(crate) replica: ReplicaId,
    pub(crate) cluster: String,
    pub(crate) volume: MeteredRecipient<EngineInput>,
    pub(crate) reader: Arc<LogReader>,
    pub(crate) store: Arc<Store>,
    /// The runtime's recovery budget: catch-ups and rebuilds send through it.
    pub(crate) recovery: crate::recovery::RecoveryBudget,
    pub(crate) head_rx: watch::Receiver<u64>,
    pub(crate) committed_rx: watch::Receiver<u64>,
    /// Whether the volume's commit mode makes committed durable on the
    /// replicas (sync_all, sync_quorum); said in every hello.
    pub(crate) durable_commits: Arc<std::sync::atomic::AtomicBool>,
    pub(crate) tuning: Tuning,
    /// Links to peer nodes, when sessions are multiplexed.
    pub(crate) links: Arc<crate::mux::PeerLinks>,
    /// Bytes this sender put on the wire (WAL batches and image chunks).
    pub(crate) bytes_sent: Arc<AtomicU64>,
    /// Set while the engine boosts this replica's catch-up (it is not
    /// converging): its sends take from the recovery budget first.
    pub(crate) boosted: Arc<std::sync::atomic::AtomicBool>,
    /// Where the volume's barrier requests reach this sender's live task.
    pub(crate) barrier_line: Arc<crate::primary::ship::BarrierLine>,
    /// Set while the replica's node is away and the sender waits for it to
    /// answer again (its volume need not heartbeat it meanwhile).
    pub(crate) away: Arc<std::sync::atomic::AtomicBool>,
    /// Held by the sender and every executor future (each has a clone of
    /// the context): the volume's stop waits until all of them are gone.
    pub(crate) _alive: Arc<TaskTrackerToken>,
}

impl SenderContext {
    pub(crate) fn count_sent(&self, bytes: usize) {
        self.bytes_sent.fetch_add(bytes as u64, Ordering::Relaxed);
    }

    /// Waits until `bytes` of recovery traffic may go under the node's
    /// recovery budget; a boosted replica's have first call on it.
    pub(crate) async fn throttle(&self, bytes: u64) {
        if self.boosted.load(Ordering::Relaxed) {
            self.recovery.throttle_first(bytes).await;
        } else {
            self.recovery.throttle(bytes).await;
        }
    }

    /// Hands `input` to the volume's engine.
    pub(crate) fn report(&self, input: Input) {
        self.volume.do_send(EngineInput(input));
    }

    /// Reports that the session's connect or plan failed.
    pub(crate) fn failed(&self, session: SessionId, failure: ExecutionFailure) {
        let replica = self.replica.clone();
        self.report(Input::ExecutionFailed {
            replica,
            session,
            failure,
        });
    }

    /// Reports that the live connection is gone.
    pub(crate) fn disconnected(&self, failure: ExecutionFailure) {
        let replica = self.replica.clone();
        self.report(Input::Disconnected { replica, failure });
    }
}
