//! `SenderActor`: one per replica on the primary.
//!
//! It carries out the engine's commands for its replica (connect, execute a
//! plan, cancel, start and stop live shipping, barriers) and reports what
//! happened as engine inputs. It decides nothing: the engine cancels every
//! session it invalidates, so the sender never compares epochs or endpoints.
//!
//! Its [`Link`] is the connection's lifecycle: `Idle` (none), `Ready` (greeted
//! for a session, waiting for its plan or live start) or `Busy` (a task owns
//! it). A task is a future spawned in the actor's context that owns the
//! connection while it runs and hands it back when it ends well. Cancelling
//! calls `ctx.cancel_future`: the future is dropped on the actor's next poll,
//! which closes the connection and drops the executor's `Lease`, releasing
//! its pins.

use super::context::SenderContext;
use super::resources::Lease;
use super::ship as executor;
use crate::error::ExecError;
use crate::metered;
use crate::metrics::{MailboxMetrics, Metered};
use crate::transport::Conn;
use actix::prelude::*;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use walship_engine::{
    Endpoint, Epoch, ExecutionFailure, Input, RecoveryPlan, ResourceGrant, SessionId,
};
use walship_io::SnapshotPin;

/// The connection to the replica, and who owns it.
#[derive(Debug)]
enum Link {
    /// No connection.
    Idle,
    /// Connected and greeted for `session`: waits for its plan or live start.
    Ready { session: SessionId, conn: Conn },
    /// A task owns the connection.
    Busy { task: Task, handle: SpawnHandle },
}

/// What owns the connection while the link is busy.
#[derive(Debug)]
enum Task {
    /// Connecting and saying hello for a session.
    Connect(SessionId),
    /// Running the session's plan; live shipping follows when the engine
    /// asked for it before the plan's future handed the connection back.
    Execute {
        session: SessionId,
        then_live: Option<StartLive>,
    },
    /// Shipping live; barrier requests reach the task through the context's
    /// barrier line.
    Live,
}

impl Link {
    /// The session the link works for, if it is one's.
    fn session(&self) -> Option<SessionId> {
        match self {
            Self::Ready { session, .. }
            | Self::Busy {
                task: Task::Connect(session) | Task::Execute { session, .. },
                ..
            } => Some(*session),
            Self::Idle | Self::Busy { .. } => None,
        }
    }
}

/// Ships one replica's WAL and runs its recovery executors.
pub struct SenderActor {
    context: SenderContext,
    link: Link,
    /// Waiting for the replica's node to answer again after a connect
    /// failed (a multiplexed link's redial says when): the engine then
    /// retries at once rather than at the end of its backoff.
    returning: Option<SpawnHandle>,
    metrics: Arc<MailboxMetrics>,
}

impl std::fmt::Debug for SenderActor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SenderActor")
            .field("replica", &self.context.replica)
            .field("link", &self.link)
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

metered!(SenderActor: Assignment, Execute, Cancel, StartLive, StopLive, Heartbeat, Shutdown);

impl SenderActor {
    pub(crate) fn new(context: SenderContext, metrics: Arc<MailboxMetrics>) -> Self {
        Self {
            context,
            link: Link::Idle,
            returning: None,
            metrics,
        }
    }

    /// After a failed connect to `addr`: once the peer answers again,
    /// tells the engine to retry the replica now (its backoff skipped
    /// once) and says the sender is idle, which starts a session.
    fn await_return(&mut self, addr: &str, epoch: u64, ctx: &mut Context<Self>) {
        let Some(mut back) = self.context.links.when_back(addr) else {
            return;
        };
        if let Some(handle) = self.returning.take() {
            ctx.cancel_future(handle);
        }
        self.context.away.store(true, Ordering::Relaxed);
        let waiting = async move { back.changed().await.is_ok() };
        let handle = ctx.spawn(actix::fut::wrap_future::<_, Self>(waiting).map(
            move |_answered, act, _| {
                act.returning = None;
                act.context.away.store(false, Ordering::Relaxed);
                // Answered, or the redial ended without saying so (it
                // went between this sender's subscribing and its last
                // word): either way retry now, since the volume may wait
                // for nothing else.
                if matches!(act.link, Link::Idle) {
                    let replica = act.context.replica.clone();
                    act.context.report(Input::RetryNow {
                        replica: replica.clone(),
                    });
                    act.context.report(Input::Heartbeat {
                        replica,
                        epoch: Epoch(epoch),
                    });
                }
            },
        ));
        self.returning = Some(handle);
    }

    /// Drops the link: a running task's future (with its connection and
    /// lease) is dropped on the actor's next poll, a held connection now.
    fn drop_link(&mut self, ctx: &mut Context<Self>) {
        if let Some(handle) = self.returning.take() {
            ctx.cancel_future(handle);
            self.context.away.store(false, Ordering::Relaxed);
        }
        if let Link::Busy { handle, .. } = std::mem::replace(&mut self.link, Link::Idle) {
            ctx.cancel_future(handle);
        }
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

    fn start_live(&mut self, conn: Conn, live: StartLive, ctx: &mut Context<Self>) {
        let StartLive { from, epoch, .. } = live;
        let context = self.context.clone();
        let requests = self.context.barrier_line.open();
        let fut = async move { executor::live_ship(conn, context, from, epoch, requests).await };
        let handle = ctx.spawn(
            actix::fut::wrap_future::<_, Self>(fut).map(|error, act, _| {
                act.link = Link::Idle;
                let failure = act.failure("live", &error);
                act.context.disconnected(failure);
            }),
        );
        self.link = Link::Busy {
            task: Task::Live,
            handle,
        };
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
        self.drop_link(ctx);
        let context = self.context.clone();
        let Assignment {
            session,
            epoch,
            endpoint,
        } = msg;
        let addr = endpoint.data_addr.clone();
        let fut =
            async move { executor::connect_and_hello(&context, session, epoch, &endpoint).await };
        let handle = ctx.spawn(actix::fut::wrap_future::<_, Self>(fut).map(
            move |result, act, ctx| match result {
                Ok((conn, reply)) => {
                    act.link = Link::Ready { session, conn };
                    let replica = act.context.replica.clone();
                    act.context.report(Input::Connected {
                        replica: replica.clone(),
                        session,
                    });
                    act.context.report(Input::Handshake {
                        replica,
                        session,
                        reply,
                    });
                }
                Err(error) => {
                    act.link = Link::Idle;
                    let failure = act.failure("connect", &error);
                    act.context.failed(session, failure);
                    act.await_return(&addr, epoch, ctx);
                }
            },
        ));
        self.link = Link::Busy {
            task: Task::Connect(session),
            handle,
        };
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
        let mut conn = match std::mem::replace(&mut self.link, Link::Idle) {
            Link::Ready { session: s, conn } if s == session => conn,
            other => {
                self.link = other;
                drop(lease);
                let failure = ExecutionFailure::Transient("no connection for the plan".into());
                self.context.failed(session, failure);
                return;
            }
        };
        let context = self.context.clone();
        let fut = async move {
            let result =
                executor::run_plan(&mut conn, &context, session, &plan, &grants, image).await;
            drop(lease);
            (conn, result)
        };
        let handle = ctx.spawn(actix::fut::wrap_future::<_, Self>(fut).map(
            move |(conn, result), act, ctx| {
                let then_live = match std::mem::replace(&mut act.link, Link::Idle) {
                    Link::Busy {
                        task: Task::Execute { then_live, .. },
                        ..
                    } => then_live,
                    _ => None,
                };
                match result {
                    Ok(()) => match then_live {
                        Some(live) => act.start_live(conn, live, ctx),
                        None => act.link = Link::Ready { session, conn },
                    },
                    Err(error) => {
                        let failure = act.failure("plan", &error);
                        act.context.failed(session, failure);
                    }
                }
            },
        ));
        self.link = Link::Busy {
            task: Task::Execute {
                session,
                then_live: None,
            },
            handle,
        };
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
        if self.link.session() == Some(msg.session) {
            tracing::debug!(replica = %self.context.replica, session = %msg.session, reason = %msg.reason, "cancel");
            self.drop_link(ctx);
        }
    }
}

/// Start live shipping from `from` on the connection the session brought
/// in sync (the replica's retention hold keeps the WAL after `from`).
#[derive(Debug, Message)]
#[rtype(result = "()")]
pub(crate) struct StartLive {
    pub(crate) session: SessionId,
    pub(crate) from: u64,
    pub(crate) epoch: u64,
}

impl Handler<StartLive> for SenderActor {
    type Result = ();

    fn handle(&mut self, msg: StartLive, ctx: &mut Context<Self>) {
        match std::mem::replace(&mut self.link, Link::Idle) {
            // The executor hands the connection back when its future ends.
            Link::Busy {
                task: Task::Execute { session, .. },
                handle,
            } if session == msg.session => {
                self.link = Link::Busy {
                    task: Task::Execute {
                        session,
                        then_live: Some(msg),
                    },
                    handle,
                };
            }
            Link::Ready { session, conn } if session == msg.session => {
                self.start_live(conn, msg, ctx);
            }
            other => {
                self.link = other;
                if self.link.session().is_some() {
                    // Another session owns the link: this start is stale.
                    tracing::debug!(replica = %self.context.replica, session = %msg.session, "stale live start ignored");
                    return;
                }
                self.drop_link(ctx);
                let failure = ExecutionFailure::Transient("live: no connection".into());
                self.context.disconnected(failure);
            }
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
        match &mut self.link {
            Link::Busy {
                task: Task::Live, ..
            } => {
                tracing::debug!(replica = %self.context.replica, reason = %msg.reason, "stop live shipping");
                self.drop_link(ctx);
            }
            Link::Busy {
                task: Task::Execute { then_live, .. },
                ..
            } => *then_live = None,
            _ => {}
        }
    }
}

/// Periodic liveness tick from the volume. A sender with no task running
/// reports it, so the engine can retry a replica that has no session (the
/// engine fences an old epoch's).
#[derive(Debug, Message)]
#[rtype(result = "()")]
pub struct Heartbeat {
    /// The volume's epoch.
    pub epoch: u64,
}

impl Handler<Heartbeat> for SenderActor {
    type Result = ();

    fn handle(&mut self, msg: Heartbeat, _: &mut Context<Self>) {
        // While its node is away the redial knocks for it, and its return
        // retries the replica: a session now would only be refused.
        if !matches!(self.link, Link::Busy { .. }) && self.returning.is_none() {
            let replica = self.context.replica.clone();
            self.context.report(Input::Heartbeat {
                replica,
                epoch: Epoch(msg.epoch),
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
        self.drop_link(ctx);
        ctx.stop();
    }
}
