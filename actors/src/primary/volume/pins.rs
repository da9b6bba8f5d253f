//! Pinning what the engine's plans ask for (WAL ranges, snapshots, full
//! bases) and granting it back to the engine.

use super::VolumeActor;
use crate::primary::resources::Held;
use actix::prelude::*;
use std::sync::Arc;
use walship_engine::{
    GrantedResource, Lsn, ReplicaId, ResourceGrant, ResourceId, ResourceRequest, SessionId,
};
use walship_io::Store;

impl VolumeActor {
    /// Pins every requested resource, or none: a failure drops what was taken.
    /// Pins what a plan asks for. A full base checkpoints first (writes and
    /// fsyncs the dirty blocks), so it is pinned on the blocking pool and
    /// granted when `ResourcesPinned` comes back: the actix thread that every
    /// volume and sender shares must not wait on it. The engine's reservation
    /// timer covers the wait; a grant arriving after the session moved on is
    /// released (`stale_grant`).
    pub(super) fn acquire(
        &mut self,
        replica: &ReplicaId,
        session: SessionId,
        requests: &[ResourceRequest],
    ) {
        let label = format!("{replica} {session}");
        let snapshots = self.config.tuning.snapshot_rebuilds;
        let slow = requests
            .iter()
            .any(|r| matches!(r, ResourceRequest::FullBase { .. }));
        match self.me.clone() {
            Some(me) if slow => {
                let store = Arc::clone(&self.store);
                let requests = requests.to_vec();
                let replica = replica.clone();
                self.pools.blocking.run(&self.tasks, move || {
                    let pinned = pin_resources(&store, snapshots, &label, &requests);
                    // If the volume stopped meanwhile, the pins drop with the message.
                    me.do_send(ResourcesPinned {
                        replica,
                        session,
                        pinned,
                    });
                });
            }
            _ => {
                let pinned = pin_resources(&self.store, snapshots, &label, requests);
                self.grant(replica, session, pinned);
            }
        }
    }

    /// Hands pinned resources (or why they could not be) to the engine.
    fn grant(&mut self, replica: &ReplicaId, session: SessionId, pinned: Pinned) {
        self.refresh_wal_state();
        let taken = match pinned {
            Ok(taken) => taken,
            Err(reason) => {
                let _ = self
                    .engine
                    .handle_resources_failed(replica, session, &reason);
                return;
            }
        };
        let mut grants = Vec::new();
        for (granted, held) in taken {
            let id = ResourceId(self.next_resource);
            self.next_resource += 1;
            self.resources.insert(id, held);
            grants.push(ResourceGrant { id, granted });
        }
        if self
            .engine
            .handle_resources_granted(replica, session, grants.clone())
            .is_err()
        {
            // The engine released them already (stale grant); make sure the guards go too.
            let ids: Vec<ResourceId> = grants.iter().map(|g| g.id).collect();
            self.resources.release(&ids);
        }
    }
}

/// Resources pinned for one plan, or why not.
pub(in crate::primary) type Pinned = Result<Vec<(GrantedResource, Held)>, String>;

/// Pins `requests` in order; on the first failure, drops what it took.
pub(in crate::primary) fn pin_resources(
    store: &Store,
    snapshot_rebuilds: bool,
    label: &str,
    requests: &[ResourceRequest],
) -> Pinned {
    requests
        .iter()
        .map(|request| match *request {
            ResourceRequest::WalRetention { from } => store
                .wal()
                .pin_from(from.get(), label)
                .map(|pin| (GrantedResource::WalRetention { from }, Held::Wal(pin)))
                .map_err(|e| e.to_string()),
            ResourceRequest::Snapshot { .. } if !snapshot_rebuilds => {
                Err("snapshot rebuilds disabled by configuration".to_owned())
            }
            ResourceRequest::Snapshot { at } => match store.snapshot_pin(label) {
                Ok(pin) if pin.lsn() == at.get() => {
                    Ok((GrantedResource::Snapshot { at }, Held::Image(Arc::new(pin))))
                }
                Ok(pin) => Err(format!(
                    "snapshot moved: checkpoint is {} not {at}",
                    pin.lsn()
                )),
                Err(e) => Err(e.to_string()),
            },
            ResourceRequest::FullBase { .. } => store
                .full_base_pin(label)
                .map(|pin| {
                    let base_lsn = Lsn(pin.lsn());
                    (
                        GrantedResource::FullBase { base_lsn },
                        Held::Image(Arc::new(pin)),
                    )
                })
                .map_err(|e| e.to_string()),
        })
        .collect()
}

/// Resources pinned on the blocking pool for `session`.
#[derive(Debug, Message)]
#[rtype(result = "()")]
pub(crate) struct ResourcesPinned {
    replica: ReplicaId,
    session: SessionId,
    pinned: Pinned,
}

impl Handler<ResourcesPinned> for VolumeActor {
    type Result = ();

    fn handle(&mut self, msg: ResourcesPinned, ctx: &mut Context<Self>) {
        self.clock();
        self.grant(&msg.replica, msg.session, msg.pinned);
        self.run_commands(ctx);
    }
}
