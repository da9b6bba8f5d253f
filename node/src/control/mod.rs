//! The control plane's decisions, pure: no IO, no clock of its own, no
//! feature gate. `etcd/` reads a [`ClusterView`] and carries out each
//! [`Action`] as one guarded transaction; every rule is here, tested by
//! tables without etcd.
//!
//! **What is judged.** A volume whose primary's node entry is gone (its
//! lease expired; a node that never registered, absent for two lease
//! times) gets the engine's promotion rules over its replicas: every
//! rejection reason is recorded, the best eligible replica becomes
//! primary in the next epoch, the old primary waits under `departed`
//! (sync_all) or stays a replica (the other modes) and rejoins as one
//! when it is back, in one transaction that holds only if the record is
//! unchanged since it was read, the lost primary still unregistered and
//! this node still the controller (a stale controller's fails). The
//! decision and its reasons go to `decisions/<volume>`, which each node
//! hosting the volume shows in its status. No eligible replica: the
//! volume stays down, with the reasons; once its primary registers again
//! in that epoch, a later pass marks the decision over. The desperate
//! path is never taken here, and a best_effort volume is never promoted
//! here: its primary acknowledged writes on its own durability, so none
//! of its replicas can be known to hold them all (an operator's
//! promotion, [`accept_loss`], says what it gives up).
//!
//! **How fresh the judgement is.** The primary's report (the committed
//! LSN, each replica's state) is as old as its last write, up to a lease
//! old for a primary cut off from etcd, which acknowledges until its
//! fence lapses; it counts only for the record's primary and epoch (a
//! promotion writes the new primary's first one). A replica's durable
//! LSN and epoch come from its own report, and only from one written
//! after the controller's probe ([`Action::Probe`], written once the lost
//! primary's lease has ended, so after its last acknowledgement; each
//! node answers a probe about a volume it hosts at once). Then the
//! best-ranked, the highest durable LSN, holds every committed write if
//! any live replica does: under sync_all every in-sync replica holds them
//! (nothing commits while one is out of sync); under sync_quorum a write
//! is committed on a majority of members, so the controller promotes only
//! when enough replicas answered that every majority includes one of
//! them, and judges against the highest durable LSN among those in the
//! epoch. A live replica that has not answered is rejected for that; the
//! volume's "down" decision is written only once the primary has been
//! lost for a lease time (answers take milliseconds).

mod decide;
mod judge;
mod records;
mod view;

#[cfg(test)]
mod tests;

pub use decide::promotion;
pub use decide::{Action, Controller, Guard, Promotion, Write, ADDRESS_UNKNOWN};
pub use judge::{
    accept_loss, asked, candidates, judge, probe_of, Candidates, Judgement, UNANSWERED,
};
pub use records::{
    DataLoss, Decision, NodeRecord, Outcome, Probe, ProgressRecord, ReplicaProgress, ReplicaReport,
    VolumeRecord,
};
pub use view::{ClusterView, Versioned};
