//! Shipping to one replica, as futures a `SenderActor` runs: connect and
//! hello, catch-up, rebuild, live shipping. They consume only plan-bound
//! values, step through the engine's executor state machines, stream WAL
//! from the log reader through one bounded [`window`] of unacknowledged
//! bytes, and report progress as engine inputs. Each ends by returning the
//! connection (or an error, which closes it). Dropping one mid-way (a
//! cancel) closes its connection and releases whatever it holds.

mod live;
mod rebuild;
pub(crate) mod sums;
mod window;

#[cfg(test)]
mod cancel;

pub(crate) use live::{live_ship, BarrierLine};

use super::context::SenderContext;
use crate::error::ExecError;
use crate::transport::{self, framed, recv, Conn};
use futures::SinkExt;
use std::sync::Arc;
use tokio::net::TcpStream;
use walship_engine::{
    CatchUpExecutor, CatchUpProgress, Endpoint, HandshakeReply, Input, Lsn, PlanKind,
    RebuildSource, RecoveryPlan, ResourceGrant, SessionId, Step,
};
use walship_io::{Envelope, ImageKind, Message, SnapshotPin};
use window::Shipper;

/// LSNs per executor step; the log reader cuts them into reads anyway.
const STEP_ENTRIES: u64 = 1 << 20;

/// Connects, says hello, returns the connection and the replica's answer.
pub(crate) async fn connect_and_hello(
    c: &SenderContext,
    session: SessionId,
    epoch: u64,
    endpoint: &Endpoint,
) -> Result<(Conn, HandshakeReply), ExecError> {
    let mut conn = connect(&c.tuning, &c.links, &endpoint.data_addr).await?;
    let hello = Message::Hello {
        cluster: c.cluster.clone(),
        volume: c.replica.volume().to_owned(),
        replica: c.replica.as_str().to_owned(),
        session: session.get(),
        durable_commits: c.durable_commits.load(std::sync::atomic::Ordering::Relaxed),
    };
    conn.send(Envelope {
        epoch,
        message: hello,
    })
    .await?;
    let answer = recv(&mut conn, c.tuning.peer_timeout).await?;
    Ok((conn, transport::handshake_reply(answer)?))
}

/// A connection to a replica at `addr`: a stream of the link to its node
/// when the tuning multiplexes, else a TCP connection of its own.
pub(crate) async fn connect(
    tuning: &crate::config::Tuning,
    links: &crate::mux::PeerLinks,
    addr: &str,
) -> Result<Conn, ExecError> {
    let limit = tuning.connect_timeout;
    Ok(if tuning.multiplex {
        let liveness = crate::mux::Liveness {
            silent_after: tuning.link_timeout,
        };
        framed(links.open(addr, limit, liveness).await?)
    } else {
        let stream = tokio::time::timeout(limit, TcpStream::connect(addr))
            .await
            .map_err(|_| ExecError::Timeout(limit))?
            .map_err(|e| ExecError::Wire(e.into()))?;
        stream
            .set_nodelay(true)
            .map_err(|e| ExecError::Wire(e.into()))?;
        framed(Box::new(stream) as Box<dyn transport::Io>)
    })
}

/// Runs a catch-up or rebuild plan to its end.
pub(crate) async fn run_plan(
    conn: &mut Conn,
    c: &SenderContext,
    session: SessionId,
    plan: &RecoveryPlan,
    grants: &[ResourceGrant],
    image: Option<Arc<SnapshotPin>>,
) -> Result<(), ExecError> {
    match &plan.kind {
        PlanKind::CatchUp { start, .. } => catch_up(conn, c, session, plan, start.get()).await,
        PlanKind::Rebuild { source, transfer } => {
            let image =
                image.ok_or_else(|| ExecError::Protocol("rebuild without an image pin".into()))?;
            let kind = match source {
                RebuildSource::SnapshotTail { .. } => ImageKind::Snapshot,
                RebuildSource::FullBase { .. } => ImageKind::FullBase,
            };
            let transfer = rebuild::Transferring {
                image,
                kind,
                transfer,
            };
            rebuild::rebuild(conn, c, session, plan, grants, transfer).await
        }
    }
}

async fn catch_up(
    conn: &mut Conn,
    c: &SenderContext,
    session: SessionId,
    plan: &RecoveryPlan,
    start: u64,
) -> Result<(), ExecError> {
    let epoch = plan.epoch;
    let replica = c.replica.clone();
    let mut exec = CatchUpExecutor::from_plan(plan, STEP_ENTRIES)?;
    let mut report = |durable: u64, entries: u64, bytes: u64| {
        let progress = CatchUpProgress {
            applied: Lsn(durable),
            entries,
            bytes,
        };
        c.report(Input::CatchUpProgress {
            replica: replica.clone(),
            session,
            epoch,
            progress,
        });
    };
    let mut shipper = Shipper::new(conn, c, session.get(), epoch.get(), start);
    loop {
        match exec.next_step()? {
            Step::Truncate { to } => {
                let message = Message::Truncate {
                    session: session.get(),
                    to: to.get(),
                };
                shipper
                    .conn
                    .send(Envelope {
                        epoch: epoch.get(),
                        message,
                    })
                    .await?;
                let answer = recv(shipper.conn, c.tuning.peer_timeout).await?;
                match answer.message {
                    Message::Truncated { to: done, .. } if done == to.get() => {
                        shipper.acked = done;
                        c.report(Input::Truncated {
                            replica: replica.clone(),
                            session,
                            epoch,
                            to,
                        });
                    }
                    other => {
                        return Err(ExecError::Protocol(format!(
                            "expected truncated, got {other:?}"
                        )))
                    }
                }
            }
            Step::ShipWal {
                from_exclusive: from,
                to_inclusive: to,
            } => shipper.ship(from, to, &mut report).await?,
            Step::Done { flushed } => return shipper.drain(flushed, &mut report).await,
            other => return Err(ExecError::Protocol(format!("catch-up step {other:?}"))),
        }
    }
}
