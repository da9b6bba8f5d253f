//! # walship
//!
//! Replicates a block volume's write-ahead log from a primary to its replicas
//! and brings lagging or returning replicas back in sync: by catch-up from the
//! retained WAL when it still covers the gap, by rebuild when it does not.
//!
//! This facade re-exports the parts:
//! - [`engine`]: the pure recovery engine (decisions, no IO);
//! - [`io`]: storage and IO (WAL, log reader, extent store, wire codec);
//! - [`actors`]: the actor runtime that binds them;
//! - [`node`]: a node hosting many volumes from a TOML config, with one
//!   replication listener and NBD exports (what `walship serve` runs).
//!
//! The `walship` command (`demo`) is a separate binary behind the default
//! `cli` feature: an embedder depending on `walship` with
//! `default-features = false` gets the library alone, without the command
//! line's crates (clap, indicatif, anyhow, tempfile) or the loopback test
//! harness (`walship::actors::testing`).

#![forbid(unsafe_code)]

pub use walship_actors as actors;
pub use walship_engine as engine;
pub use walship_io as io;
pub use walship_node as node;
