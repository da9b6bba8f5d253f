//! # walship-actors
//!
//! The actor runtime that binds the pure engine (`walship-engine`) to storage
//! and IO (`walship-io`): a [`Runtime`] running actix on its own thread, a
//! `VolumeActor` per primary volume, a `SenderActor` per replica, a
//! `ReceiverActor` on replicas, executor futures that stream WAL frames over
//! TCP, and mailbox metrics for every actor.
//!
//! It is the only crate that knows both the engine and io.

mod activity;
mod config;
mod error;
pub mod metrics;
mod mux;
mod pool;
mod primary;
mod recovery;
mod replica;
mod runtime;
#[cfg(feature = "testing")]
pub mod testing;
mod transport;

pub use config::{
    BackoffTuning, Listen, Peering, PrimaryConfig, ReplicaConfig, ReplicaSpec,
    ReplicaStatesChanged, TermChosen, Tuning, VolumeConfig,
};
pub use error::{ExecError, VolumeError};
pub use metrics::MeteredAddr;
pub use metrics::{MailboxMetrics, MailboxSnapshot};
#[cfg(feature = "testing")]
pub use primary::SenderHeartbeat;
pub use primary::{Mismatch, RecoveryProgress, ReplicaVerify, VerifyReport};
pub use primary::{SenderActor, VolumeActor, VolumeStatus};
pub use recovery::{
    LimitsError, RebuildSlot, RecoveryBudget, RecoveryLimits, RecoveryStatus, MIN_FLOOR_BYTES,
};
pub use replica::{ReplicaStatus, ReplicationListener};
pub use runtime::{NodeStatus, PeeringStatus, Runtime, VolumeHandle, VolumeThread};
