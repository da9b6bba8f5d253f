//! Where a node keeps, beyond its own disk, the newest term each volume's
//! primaries opened in: a primary that lost everything local (its store
//! and its persisted assignment) still opens in a term newer than any used
//! before, even when the replica that saw the newest one does not answer.
//! Under `--etcd` that is etcd (`terms/<volume>`); without a control plane
//! the node's own assignment file and its replicas' answers are all there
//! is.

use futures::future::BoxFuture;
use std::io;

/// A record of the newest term per volume (see the module docs).
pub trait TermKeeper: Send + Sync + std::fmt::Debug {
    /// The newest term recorded for `volume` (0: none).
    fn newest(&self, volume: &str) -> BoxFuture<'static, io::Result<u64>>;
    /// Records `term` for `volume` unless a newer one is recorded; returns
    /// once the record is durable there.
    fn record(&self, volume: &str, term: u64) -> BoxFuture<'static, io::Result<()>>;
}
