//! The replica: its [`ReceiverActor`](receiver::ReceiverActor), the
//! [`admission`] checks every frame passes (pure functions), base-image
//! [`install`], and the [`listener`] whose connection tasks feed it.
//!
//! Dependencies point one way: `listener` → `receiver` → `admission`, `install`.

mod admission;
pub(crate) mod install;
pub(crate) mod listener;
pub(crate) mod receiver;

pub use listener::ReplicationListener;
pub use receiver::ReplicaStatus;
