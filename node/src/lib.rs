//! # walship-node
//!
//! A node: one process hosting many replicated volumes, primary for some
//! and replica for others, from a TOML config ([`config`]). It wraps the
//! actor runtime (`walship-actors`) with what a deployed server needs: one
//! replication listener routing connections by volume, NBD exports for
//! block clients ([`nbd`]), persisted assignments, and a stop that answers
//! every in-flight request before it returns.

pub mod admin;
pub mod assignment;
pub mod config;
pub mod control;
#[cfg(feature = "etcd")]
pub mod etcd;
pub mod fence;
mod help;
pub mod nbd;
mod node;
pub mod process;
mod serving;
pub mod terms;

pub use admin::{AdminClientError, AdminServer, AssignmentRequest, StatusReport};
pub use assignment::{Applied, Assignment, AssignmentError, AssignmentField, ReplicaEndpoint};
pub use config::{parse_rate, ConfigError, NodeConfig, TuningSpec, VolumeSpec};
pub use fence::WriteFence;
pub use node::{Node, NodeError, VolumeReport};
pub use process::{AssignmentSource, EtcdSource, NodeProcess, ProcessError};
pub use terms::TermKeeper;
