//! Rebuild slots: a queued rebuild waits for one of the runtime's (see
//! [`crate::recovery`]) before its resources are asked for, and holds it
//! until its execution ends.

use super::VolumeActor;
use crate::recovery::RebuildSlot;
use actix::prelude::*;
use std::collections::HashMap;
use walship_engine::{ReplicaId, SessionId};

/// A session's slot, or its place in the queue. Dropping it leaves the
/// queue, or gives the slot back.
#[derive(Debug)]
pub(super) enum Slot {
    /// Waiting in the queue (held for its `Drop`).
    Waiting(#[allow(dead_code)] Waiting),
    /// Held until the session's execution takes it, or the session ends.
    Held(RebuildSlot),
}

/// The task waiting in the queue; dropping it aborts the task, which
/// leaves the queue (or gives back a slot it got meanwhile).
#[derive(Debug)]
pub(super) struct Waiting(tokio::task::JoinHandle<()>);

impl Drop for Waiting {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// The sessions' slots.
pub(super) type Slots = HashMap<SessionId, Slot>;

impl VolumeActor {
    /// Joins the runtime's queue for `session`'s rebuild.
    pub(super) fn await_rebuild_slot(&mut self, replica: ReplicaId, session: SessionId) {
        let Some(me) = self.me.clone() else {
            return;
        };
        let budget = self.pools.recovery.clone();
        let who = replica.to_string();
        let task = actix::spawn(async move {
            let slot = budget.rebuild_slot(who).await;
            // If the volume stopped meanwhile, the slot drops with the message.
            me.do_send(SlotGranted {
                replica,
                session,
                slot,
            });
        });
        self.slots.insert(session, Slot::Waiting(Waiting(task)));
    }

    /// The slot `session` holds, for its execution's lease.
    pub(super) fn take_slot(&mut self, session: SessionId) -> Option<RebuildSlot> {
        match self.slots.remove(&session)? {
            Slot::Held(slot) => Some(slot),
            Slot::Waiting(_) => None,
        }
    }
}

/// A queued rebuild's slot came.
#[derive(Debug, Message)]
#[rtype(result = "()")]
pub(crate) struct SlotGranted {
    replica: ReplicaId,
    session: SessionId,
    slot: RebuildSlot,
}

impl Handler<SlotGranted> for VolumeActor {
    type Result = ();

    fn handle(&mut self, msg: SlotGranted, ctx: &mut Context<Self>) {
        self.clock();
        if !self.slots.contains_key(&msg.session) {
            return; // the session ended meanwhile: the slot goes back
        }
        self.slots.insert(msg.session, Slot::Held(msg.slot));
        if self
            .engine
            .handle_rebuild_slot(&msg.replica, msg.session)
            .is_err()
        {
            self.slots.remove(&msg.session);
        }
        self.run_commands(ctx);
    }
}
