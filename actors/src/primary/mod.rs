//! The primary: its [`VolumeActor`] (store, engine, resources, durability)
//! and, per replica, a [`SenderActor`] that carries out the engine's
//! commands by running the shipping futures in [`ship`].
//!
//! Dependencies point one way: `volume` → `sender` → `ship` → `context`;
//! senders and executors report to the volume through `context`'s
//! [`EngineInput`](context::EngineInput), never by naming the volume.

mod context;
pub(crate) mod peering;
mod resources;
mod sender;
mod ship;
pub(crate) mod verify;
mod volume;

#[cfg(feature = "testing")]
pub use sender::Heartbeat as SenderHeartbeat;
pub use sender::SenderActor;
pub use verify::{Mismatch, ReplicaVerify, VerifyReport};
pub use volume::api::*;
pub(crate) use volume::check_assignment;
pub use volume::progress::RecoveryProgress;
pub(crate) use volume::verifying::Verify;
pub use volume::VolumeActor;
