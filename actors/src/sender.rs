//! `SenderActor`: one per replica on the primary.
//!
//! It receives `Assignment`, `Heartbeat`, `EpochChanged` and `EndpointChanged`
//! from its volume, owns the connection to its replica and runs one task at a time in its
//! context: connect + hello, a recovery executor, or live shipping. Each task
//! is a future that owns the connection while it runs and hands it back when
//! it ends well. `Cancel` (epoch bump, endpoint change) calls
//! `ctx.cancel_future`: the future is dropped on the actor's next poll, which
//! closes the connection and drops the executor's `Lease`, releasing its pins.

use crate::config::Tuning;
use crate::error::ExecError;
use crate::executor::{self, BarrierRequest};
use crate::metered;
use crate::metrics::{MailboxMetrics, Metered, MeteredAddr};
use crate::resources::Lease;
use crate::transport::Conn;
use crate::volume::{SenderEvent, VolumeActor};
use actix::prelude::*;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use tokio::sync::{mpsc, watch};
use walship_engine::{
    Endpoint, ExecutionFailure, RecoveryPlan, ReplicaId, ResourceGrant, SessionId,
};
use walship_io::{LogReader, SnapshotPin, Store};

/// What a sender needs from its volume.
#[derive(Debug, Clone)]
pub(crate) struct SenderContext {
    pub(crate) replica: ReplicaId,
    pub(crate) cluster: String,
    pub(crate) volume_addr: MeteredAddr<VolumeActor>,
    pub(crate) reader: Arc<LogReader>,
    pub(crate) store: Arc<Store>,
    pub(crate) head_rx: watch::Receiver<u64>,
    pub(crate) committed_rx: watch::Receiver<u64>,
    pub(crate) tuning: Tuning,
    /// Bytes this sender put on the wire (WAL batches and image chunks).
    pub(crate) bytes_sent: Arc<AtomicU64>,
}

impl SenderContext {
    pub(crate) fn count_sent(&self, bytes: usize) {
        self.bytes_sent.fetch_add(bytes as u64, Ordering::Relaxed);
    }

    pub(crate) fn report(&self, event: SenderEvent) {
        self.volume_addr.do_send(event);
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum TaskKind {
    Connect(SessionId),
    Execute(SessionId),
    Live,
}

/// Ships one replica's WAL and runs its recovery executors.
pub struct SenderActor {
    context: SenderContext,
    conn: Option<Conn>,
    task: Option<(TaskKind, SpawnHandle)>,
    pending_live: Option<StartLive>,
    /// Barrier requests for the live task, while one runs.
    live_barriers: Option<mpsc::UnboundedSender<BarrierRequest>>,
    epoch: u64,
    metrics: Arc<MailboxMetrics>,
}

impl std::fmt::Debug for SenderActor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SenderActor")
            .field("replica", &self.context.replica)
            .finish_non_exhaustive()
    }
}

impl Actor for SenderActor {
    type Context = Context<Self>;
}

impl Metered for SenderActor {
    fn mailbox(&self) -> &MailboxMetrics {
        &self.metrics
    }
}

metered!(SenderActor: Assignment, Execute, Cancel, StartLive, StopLive, SendBarrier, EpochChanged, EndpointChanged, Heartbeat, Shutdown);

impl SenderActor {
    pub(crate) fn new(context: SenderContext, metrics: Arc<MailboxMetrics>) -> Self {
        Self {
            context,
            conn: None,
            task: None,
            pending_live: None,
            live_barriers: None,
            epoch: 0,
            metrics,
        }
    }

    fn cancel_task(&mut self, ctx: &mut Context<Self>) {
        if let Some((_, handle)) = self.task.take() {
            ctx.cancel_future(handle);
        }
        self.live_barriers = None;
    }

    /// Cancels the task (its future, connection and lease are dropped on the
    /// actor's next poll) and forgets any connection and pending live start.
    fn drop_connection(&mut self, ctx: &mut Context<Self>) {
        self.cancel_task(ctx);
        self.conn = None;
        self.pending_live = None;
    }

    /// How the engine should take `error` (from `what`: connect, a plan,
    /// live shipping). A replica whose storage failed is said loudly here.
    fn failure(&self, what: &str, error: &ExecError) -> ExecutionFailure {
        let reason = format!("{what}: {error}");
        if error.is_unrecoverable() {
            ExecutionFailure::Unrecoverable(reason)
        } else if error.is_replica_storage() {
            tracing::error!(replica = %self.context.replica, %reason, "replica storage failed");
            ExecutionFailure::ReplicaStorage(reason)
        } else {
            ExecutionFailure::Transient(reason)
        }
    }

    fn start_live(&mut self, live: StartLive, ctx: &mut Context<Self>) {
        let StartLive { from, epoch } = live;
        let Some(conn) = self.conn.take() else {
            let replica = self.context.replica.clone();
            self.context.report(SenderEvent::LiveLost {
                replica,
                failure: ExecutionFailure::Transient("live: no connection".into()),
            });
            return;
        };
        let context = self.context.clone();
        let (barriers, requests) = mpsc::unbounded_channel();
        self.live_barriers = Some(barriers);
        let fut = async move { executor::live_ship(conn, context, from, epoch, requests).await };
        let handle = ctx.spawn(
            actix::fut::wrap_future::<_, Self>(fut).map(|error, act, _| {
                act.task = None;
                act.live_barriers = None;
                let replica = act.context.replica.clone();
                let failure = act.failure("live", &error);
                act.context
                    .report(SenderEvent::LiveLost { replica, failure });
            }),
        );
        self.task = Some((TaskKind::Live, handle));
    }
}

/// The engine assigned a session: connect (or reconnect) to `endpoint` in
/// `epoch` and say hello. Any running task is cancelled first.
#[derive(Debug, Message)]
#[rtype(result = "()")]
pub struct Assignment {
    /// Engine session.
    pub session: SessionId,
    /// Epoch to present.
    pub epoch: u64,
    /// Where.
    pub endpoint: Endpoint,
}

impl Handler<Assignment> for SenderActor {
    type Result = ();

    fn handle(&mut self, msg: Assignment, ctx: &mut Context<Self>) {
        self.drop_connection(ctx);
        self.epoch = self.epoch.max(msg.epoch);
        let context = self.context.clone();
        let Assignment {
            session,
            epoch,
            endpoint,
        } = msg;
        let fut =
            async move { executor::connect_and_hello(&context, session, epoch, &endpoint).await };
        let handle = ctx.spawn(actix::fut::wrap_future::<_, Self>(fut).map(
            move |result, act, _| {
                act.task = None;
                let replica = act.context.replica.clone();
                match result {
                    Ok((conn, reply)) => {
                        act.conn = Some(conn);
                        act.context.report(SenderEvent::Handshaked {
                            replica,
                            session,
                            reply,
                        });
                    }
                    Err(error) => {
                        let failure = act.failure("connect", &error);
                        act.context.report(SenderEvent::Failed {
                            replica,
                            session,
                            failure,
                        });
                    }
                }
            },
        ));
        self.task = Some((TaskKind::Connect(session), handle));
    }
}

/// Run a recovery plan.
#[derive(Debug, Message)]
#[rtype(result = "()")]
pub(crate) struct Execute {
    pub(crate) session: SessionId,
    pub(crate) plan: RecoveryPlan,
    pub(crate) grants: Vec<ResourceGrant>,
    pub(crate) image: Option<Arc<SnapshotPin>>,
    pub(crate) lease: Lease,
}

impl Handler<Execute> for SenderActor {
    type Result = ();

    fn handle(&mut self, msg: Execute, ctx: &mut Context<Self>) {
        let Execute {
            session,
            plan,
            grants,
            image,
            lease,
        } = msg;
        let Some(mut conn) = self.conn.take() else {
            drop(lease);
            let replica = self.context.replica.clone();
            let failure = ExecutionFailure::Transient("no connection for the plan".into());
            self.context.report(SenderEvent::Failed {
                replica,
                session,
                failure,
            });
            return;
        };
        self.cancel_task(ctx);
        let context = self.context.clone();
        let fut = async move {
            let result =
                executor::run_plan(&mut conn, &context, session, &plan, &grants, image).await;
            drop(lease);
            (conn, result)
        };
        let handle = ctx.spawn(actix::fut::wrap_future::<_, Self>(fut).map(
            move |(conn, result), act, ctx| {
                act.task = None;
                match result {
                    Ok(()) => {
                        act.conn = Some(conn);
                        if let Some(live) = act.pending_live.take() {
                            act.start_live(live, ctx);
                        }
                    }
                    Err(error) => {
                        let replica = act.context.replica.clone();
                        let failure = act.failure("plan", &error);
                        act.context.report(SenderEvent::Failed {
                            replica,
                            session,
                            failure,
                        });
                    }
                }
            },
        ));
        self.task = Some((TaskKind::Execute(session), handle));
    }
}

/// Stop the session's task now.
#[derive(Debug, Message)]
#[rtype(result = "()")]
pub(crate) struct Cancel {
    pub(crate) session: SessionId,
    pub(crate) reason: String,
}

impl Handler<Cancel> for SenderActor {
    type Result = ();

    fn handle(&mut self, msg: Cancel, ctx: &mut Context<Self>) {
        let running = self.task.map(|(kind, _)| kind);
        if matches!(running, Some(TaskKind::Execute(s) | TaskKind::Connect(s)) if s == msg.session)
        {
            tracing::debug!(replica = %self.context.replica, session = %msg.session, reason = %msg.reason, "cancel");
            self.cancel_task(ctx);
            self.conn = None;
        }
    }
}

/// Start live shipping from `from` (the replica's retention hold keeps the
/// WAL after it).
#[derive(Debug, Message)]
#[rtype(result = "()")]
pub(crate) struct StartLive {
    pub(crate) from: u64,
    pub(crate) epoch: u64,
}

impl Handler<StartLive> for SenderActor {
    type Result = ();

    fn handle(&mut self, msg: StartLive, ctx: &mut Context<Self>) {
        match self.task.map(|(kind, _)| kind) {
            // The executor hands the connection back when its future ends.
            Some(TaskKind::Execute(_)) => self.pending_live = Some(msg),
            _ => {
                self.cancel_task(ctx);
                self.start_live(msg, ctx);
            }
        }
    }
}

/// Ask the in-sync replica for a durable ack naming barrier `id` once the
/// WAL up to `lsn` is shipped. Dropped when nothing ships live: the barrier
/// then waits on the replica's next session, or times out.
#[derive(Debug, Message)]
#[rtype(result = "()")]
pub(crate) struct SendBarrier {
    pub(crate) id: u64,
    pub(crate) lsn: u64,
}

impl Handler<SendBarrier> for SenderActor {
    type Result = ();

    fn handle(&mut self, msg: SendBarrier, _: &mut Context<Self>) {
        if let Some(barriers) = &self.live_barriers {
            let _ = barriers.send((msg.id, msg.lsn));
        }
    }
}

/// Stop live shipping.
#[derive(Debug, Message)]
#[rtype(result = "()")]
pub(crate) struct StopLive {
    pub(crate) reason: String,
}

impl Handler<StopLive> for SenderActor {
    type Result = ();

    fn handle(&mut self, msg: StopLive, ctx: &mut Context<Self>) {
        if matches!(self.task, Some((TaskKind::Live, _))) {
            tracing::debug!(replica = %self.context.replica, reason = %msg.reason, "stop live shipping");
            self.cancel_task(ctx);
            self.conn = None;
        }
        self.pending_live = None;
    }
}

/// The volume moved to a newer epoch: whatever runs belongs to the old one
/// and stops now, before the engine's new assignment arrives.
#[derive(Debug, Message)]
#[rtype(result = "()")]
pub struct EpochChanged {
    /// The new epoch.
    pub epoch: u64,
}

impl Handler<EpochChanged> for SenderActor {
    type Result = ();

    fn handle(&mut self, msg: EpochChanged, ctx: &mut Context<Self>) {
        if msg.epoch <= self.epoch {
            self.metrics.fence();
            return;
        }
        self.epoch = msg.epoch;
        self.drop_connection(ctx);
    }
}

/// The replica moved: the connection to the old address is dropped (its
/// identity is unchanged; the engine assigns a session to the new address).
#[derive(Debug, Message)]
#[rtype(result = "()")]
pub struct EndpointChanged {
    /// The new endpoint.
    pub endpoint: Endpoint,
}

impl Handler<EndpointChanged> for SenderActor {
    type Result = ();

    fn handle(&mut self, msg: EndpointChanged, ctx: &mut Context<Self>) {
        tracing::debug!(replica = %self.context.replica, endpoint = %msg.endpoint, "endpoint changed");
        self.drop_connection(ctx);
    }
}

/// Periodic liveness tick from the volume. An idle sender reports it, so the
/// engine can retry a replica that has no session.
#[derive(Debug, Message)]
#[rtype(result = "()")]
pub struct Heartbeat {
    /// The volume's epoch.
    pub epoch: u64,
}

impl Handler<Heartbeat> for SenderActor {
    type Result = ();

    fn handle(&mut self, msg: Heartbeat, _: &mut Context<Self>) {
        if msg.epoch < self.epoch {
            self.metrics.fence();
            return;
        }
        if self.task.is_none() {
            let replica = self.context.replica.clone();
            self.context.report(SenderEvent::Idle {
                replica,
                epoch: msg.epoch,
            });
        }
    }
}

/// Stop the actor (the replica left the assignment, or the volume stops).
#[derive(Debug, Message)]
#[rtype(result = "()")]
pub(crate) struct Shutdown;

impl Handler<Shutdown> for SenderActor {
    type Result = ();

    fn handle(&mut self, _: Shutdown, ctx: &mut Context<Self>) {
        self.drop_connection(ctx);
        ctx.stop();
    }
}
