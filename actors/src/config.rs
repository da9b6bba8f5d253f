//! Configuration of a volume spawned into the runtime.

use crate::replica::ReplicationListener;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;
use walship_engine::{Backoff, CatchUpBudget, CommitMode, RetentionBudget, RetryPolicy};
use walship_io::{BackendRequest, StoreOptions};

/// One replica of a primary's assignment ([`ReplicaSpec::new`]). No
/// struct literal outside this crate (a field added later breaks nobody):
///
/// ```compile_fail,E0639
/// let _ = walship_actors::ReplicaSpec {
///     server: "r1".into(),
///     addr: "127.0.0.1:1".into(),
///     version: 1,
/// };
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct ReplicaSpec {
    /// Server name; the replica id is `<volume>/<server>`.
    pub server: String,
    /// Data address (`host:port`).
    pub addr: String,
    /// Endpoint version; bump it when the address changes.
    pub version: u64,
    /// Not a knob: present only under `--cfg walship_probe_new_field`, as
    /// a field added in a later release would be. `.ci/run` builds an
    /// embedder outside the workspace (`compat/embedder`) so, to prove it
    /// compiles unchanged.
    #[cfg(walship_probe_new_field)]
    #[doc(hidden)]
    pub probe_new_field: u8,
}

/// An exponential backoff: `first`, doubling per failure in a row, at most `max`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BackoffTuning {
    /// Delay after the first failure.
    pub first: Duration,
    /// The cap.
    pub max: Duration,
}

/// Tuning shared by primaries. `#[non_exhaustive]`: an embedder starts
/// from [`Tuning::default`] and sets the fields it wants, so a new knob
/// breaks nobody; not even the struct update form compiles outside:
///
/// ```compile_fail,E0639
/// let _ = walship_actors::Tuning {
///     batch_bytes: 1 << 16,
///     ..Default::default()
/// };
/// ```
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct Tuning {
    /// Length of one engine tick.
    pub tick: Duration,
    /// Barrier timeout, in ticks.
    pub barrier_timeout_ticks: u64,
    /// Pin reservation timeout, in ticks.
    pub pin_reservation_ticks: u64,
    /// Every this many ticks, idle replicas are retried.
    pub heartbeat_every_ticks: u64,
    /// Catch-up budget.
    pub budget: CatchUpBudget,
    /// WAL bytes an away replica's retention hold may keep (after its last
    /// durable LSN) before it is released; `None` is unbounded.
    pub retention_max_bytes: Option<u64>,
    /// How long an away replica's retention hold may last; `None` is unbounded.
    pub retention_max_away: Option<Duration>,
    /// Backoff before retrying a replica whose connection failed.
    pub network_retry: BackoffTuning,
    /// Backoff before retrying a replica whose storage failed.
    pub storage_retry: BackoffTuning,
    /// Backoff before retrying a failed rebuild.
    pub rebuild_retry: BackoffTuning,
    /// Unacknowledged bytes an executor may have in flight.
    pub max_inflight_bytes: usize,
    /// Largest WAL batch sent at once.
    pub batch_bytes: usize,
    /// Rebuild image chunk size.
    pub image_chunk_bytes: usize,
    /// Checkpoint when this many LSNs are durable past the checkpoint.
    pub checkpoint_every_lsns: u64,
    /// TCP connect timeout.
    pub connect_timeout: Duration,
    /// A session waiting for its replica's answer (a batch or barrier
    /// unacknowledged), or a plain connection, hearing nothing for this
    /// long is dead.
    pub peer_timeout: Duration,
    /// A multiplexed link whose peer node sends nothing for this long is
    /// dead, and every session on it with it: the link probes every
    /// quarter of this, so a peer paused or cut off is found within it,
    /// busy or idle (sessions on a live link are silent while idle).
    pub link_timeout: Duration,
    /// Log reader backend.
    pub backend: BackendRequest,
    /// Whether rebuilds may use a snapshot of the extent at the checkpoint.
    /// When false, snapshot pins are refused and every rebuild falls back to a
    /// full base (for extents where pausing the checkpointer is too costly).
    pub snapshot_rebuilds: bool,
    /// Whether a rebuild moves only what differs (the dirty map of a
    /// replica that was away, or region checksums) and installs it in place
    /// when the replica's log is not the only other copy of what was
    /// committed. When false every rebuild sends the whole image into a
    /// staging file.
    pub delta_rebuilds: bool,
    /// Convergence: a replica behind (catching up, or in sync with a
    /// backlog) is judged over this window, and each step gets one.
    pub convergence_window: Duration,
    /// A replica whose backlog would take longer than this to go at the
    /// rates seen is not converging (one whose backlog does not shrink
    /// never converges, whatever this says); `None` judges only those.
    pub converge_within: Option<Duration>,
    /// Step 1 for a catch-up that is not converging: it takes from the
    /// node's recovery budget first.
    pub convergence_boost: bool,
    /// Step 2, opt-in: the volume's writes are held to this percentage
    /// (1–100) of the rate such a replica drains at.
    pub write_backpressure_percent: Option<u8>,
    /// No write waits longer than this for backpressure.
    pub max_write_delay: Duration,
    /// Whether sessions to replicas run as streams multiplexed over one
    /// connection per replica address (a node's listener takes both kinds;
    /// a replica listening on its own takes plain connections only).
    pub multiplex: bool,
    /// Whether an idle volume sleeps: once every replica holds the whole
    /// log, committed and durable, with nothing waiting, the volume arms
    /// no timer and heartbeats nothing until an input wakes it (DESIGN
    /// 4c). Off, it heartbeats its senders every `heartbeat_every_ticks`
    /// whatever it holds, as before issue 27.
    pub quiesce: bool,
    /// Not a knob: present only under `--cfg walship_probe_new_field`, as
    /// a field added in a later release would be. `.ci/run` builds an
    /// embedder outside the workspace (`compat/embedder`) so, to prove it
    /// compiles unchanged.
    #[cfg(walship_probe_new_field)]
    #[doc(hidden)]
    pub probe_new_field: u8,
}

impl Default for Tuning {
    fn default() -> Self {
        Self {
            tick: Duration::from_millis(10),
            barrier_timeout_ticks: 500,
            pin_reservation_ticks: 500,
            heartbeat_every_ticks: 20,
            budget: CatchUpBudget::default(),
            retention_max_bytes: Some(1 << 30),
            retention_max_away: Some(Duration::from_secs(15 * 60)),
            network_retry: BackoffTuning {
                first: Duration::from_millis(100),
                max: Duration::from_secs(5),
            },
            storage_retry: BackoffTuning {
                first: Duration::from_secs(1),
                max: Duration::from_secs(60),
            },
            rebuild_retry: BackoffTuning {
                first: Duration::from_secs(1),
                max: Duration::from_secs(60),
            },
            max_inflight_bytes: 8 << 20,
            batch_bytes: 1 << 20,
            image_chunk_bytes: 1 << 20,
            checkpoint_every_lsns: 16 * 1024,
            connect_timeout: Duration::from_secs(2),
            peer_timeout: Duration::from_secs(5),
            link_timeout: Duration::from_secs(2),
            backend: BackendRequest::Auto,
            snapshot_rebuilds: true,
            delta_rebuilds: true,
            convergence_window: Duration::from_secs(5),
            converge_within: Some(Duration::from_secs(10 * 60)),
            convergence_boost: true,
            write_backpressure_percent: None,
            max_write_delay: Duration::from_millis(20),
            multiplex: false,
            quiesce: true,
            #[cfg(walship_probe_new_field)]
            probe_new_field: 0,
        }
    }
}

impl Tuning {
    /// Ticks in `duration`, rounded up.
    pub fn ticks(&self, duration: Duration) -> u64 {
        let tick = self.tick.as_nanos().max(1);
        u64::try_from(duration.as_nanos().div_ceil(tick)).unwrap_or(u64::MAX)
    }

    /// The convergence policy in the engine's terms. A backlog within
    /// two windows of bytes in flight is caught up: live shipping keeps
    /// about that much unacknowledged under load, and that is no lag.
    pub fn convergence_policy(&self) -> walship_engine::ConvergencePolicy {
        let inflight = u64::try_from(self.max_inflight_bytes).unwrap_or(u64::MAX);
        walship_engine::ConvergencePolicy {
            window_ticks: self.ticks(self.convergence_window).max(1),
            converge_within_ticks: self.converge_within.map(|d| self.ticks(d)),
            caught_up_bytes: inflight.saturating_mul(2),
            boost: self.convergence_boost,
            backpressure_percent: self.write_backpressure_percent.map(|p| p.clamp(1, 100)),
            ticks_per_second: self.ticks(Duration::from_secs(1)).max(1),
        }
    }

    /// The retry backoffs in the engine's terms.
    pub fn retry_policy(&self) -> RetryPolicy {
        let backoff = |b: BackoffTuning| Backoff {
            first_ticks: self.ticks(b.first),
            max_ticks: self.ticks(b.max),
        };
        RetryPolicy {
            network: backoff(self.network_retry),
            storage: backoff(self.storage_retry),
            rebuild: backoff(self.rebuild_retry),
        }
    }

    /// The retention budget in the engine's terms.
    pub fn retention_budget(&self) -> RetentionBudget {
        RetentionBudget {
            max_bytes: self.retention_max_bytes,
            max_away_ticks: self.retention_max_away.map(|d| self.ticks(d)),
        }
    }
}

/// Called whenever a primary's replicas or one's state change (checked
/// after the engine's commands run), on the volume's thread: it must not
/// block. A control plane reports the states at once with it, while it
/// reports LSNs, which move with every write, on a timer.
#[derive(Clone)]
pub struct ReplicaStatesChanged(pub Arc<dyn Fn() + Send + Sync>);

impl std::fmt::Debug for ReplicaStatesChanged {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ReplicaStatesChanged")
    }
}

/// Persists the term a peering primary opens in, before any replica hears
/// it (a node writes it into its persisted assignment, and under a control
/// plane into the control plane's record too), so no later opening picks
/// it again. Called for every opening, the configured term included; the
/// opening fails if the future does.
#[derive(Clone)]
pub struct TermChosen(
    pub Arc<dyn Fn(u64) -> futures::future::BoxFuture<'static, std::io::Result<()>> + Send + Sync>,
);

impl std::fmt::Debug for TermChosen {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("TermChosen")
    }
}

/// Whether and how a primary peers with its replicas before it serves
/// (`walship_engine::decide_peering`): it asks each what it holds, waits
/// for the answers its commit mode needs, recovers what a replica holds
/// that its own log lacks and may have been acknowledged, and opens in a
/// term newer than any seen.
#[derive(Debug, Clone, Default)]
#[non_exhaustive]
pub struct Peering {
    /// Peer before serving. Off (the default for an embedder), the local
    /// log is taken as holding everything acknowledged: right only if the
    /// embedder never opens a primary on a replaced or lost disk.
    pub enabled: bool,
    /// The first term the primary must not reach (the next control-plane
    /// epoch's); 0 for none.
    pub term_ceiling: u64,
    /// Persists a chosen term before it is used.
    pub on_term: Option<TermChosen>,
    /// A term some primary of the volume is known to have opened in,
    /// beyond what the store and the replicas say (a control plane's
    /// record): the opening's term is newer. 0 for none.
    pub term_floor: u64,
}

impl Peering {
    /// Peering on, terms below `term_ceiling` (0: unbounded), each chosen
    /// term persisted by `on_term` first.
    pub fn enabled(term_ceiling: u64, on_term: Option<TermChosen>) -> Self {
        Self {
            enabled: true,
            term_ceiling,
            on_term,
            term_floor: 0,
        }
    }

    /// The same, opening in a term newer than `floor` too.
    pub fn with_term_floor(mut self, floor: u64) -> Self {
        self.term_floor = floor;
        self
    }
}

/// A primary volume. Made with [`PrimaryConfig::new`] and the `with_`
/// methods; `#[non_exhaustive]`, so a field added later breaks no
/// embedder (its default applies):
///
/// ```compile_fail,E0639
/// let _ = walship_actors::PrimaryConfig {
///     cluster: "c".into(),
///     volume: "v".into(),
///     dir: "/tmp/v".into(),
///     store: walship_io::StoreOptions::new(16),
///     epoch: 1,
///     commit_mode: walship_engine::CommitMode::BestEffort,
///     replicas: Vec::new(),
///     tuning: Default::default(),
///     on_replica_states: None,
///     peering: Default::default(),
///     server: None,
/// };
/// ```
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct PrimaryConfig {
    /// Cluster name, sent in every hello.
    pub cluster: String,
    /// Volume name.
    pub volume: String,
    /// Data directory.
    pub dir: PathBuf,
    /// Store options.
    pub store: StoreOptions,
    /// Epoch of the first assignment. It must be newer than any epoch the
    /// directory's WAL holds ([`VolumeError::EpochNotNewer`] otherwise): each
    /// time a primary opens, restarted or promoted, is a new epoch.
    ///
    /// [`VolumeError::EpochNotNewer`]: crate::VolumeError::EpochNotNewer
    pub epoch: u64,
    /// Commit mode.
    pub commit_mode: CommitMode,
    /// Replicas.
    pub replicas: Vec<ReplicaSpec>,
    /// Tuning.
    pub tuning: Tuning,
    /// Told when the replicas' states change, if anyone wants to know.
    pub on_replica_states: Option<ReplicaStatesChanged>,
    /// Peering before serving (off by default).
    pub peering: Peering,
    /// This primary's own server name, if it has one (a node's name): a
    /// replica named like it is refused at spawn. Added after the config
    /// types became `#[non_exhaustive]`: no embedder had to change.
    pub server: Option<String>,
    /// Not a knob: present only under `--cfg walship_probe_new_field`, as
    /// a field added in a later release would be. `.ci/run` builds an
    /// embedder outside the workspace (`compat/embedder`) so, to prove it
    /// compiles unchanged.
    #[cfg(walship_probe_new_field)]
    #[doc(hidden)]
    pub probe_new_field: u8,
}

/// A replica volume. Made with [`ReplicaConfig::new`];
/// `#[non_exhaustive]`, so a field added later breaks no embedder:
///
/// ```compile_fail,E0639
/// let _ = walship_actors::ReplicaConfig {
///     cluster: "c".into(),
///     volume: "v".into(),
///     server: "r1".into(),
///     dir: "/tmp/r1".into(),
///     store: walship_io::StoreOptions::new(16),
///     listen: "127.0.0.1:0".into(),
///     checkpoint_every_lsns: 64,
/// };
/// ```
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct ReplicaConfig {
    /// Cluster name.
    pub cluster: String,
    /// Volume name.
    pub volume: String,
    /// This server's name; the replica id is `<volume>/<server>`.
    pub server: String,
    /// Data directory.
    pub dir: PathBuf,
    /// Store options.
    pub store: StoreOptions,
    /// Where it takes its primary's connections.
    pub listen: Listen,
    /// Checkpoint when this many committed LSNs are past the checkpoint.
    pub checkpoint_every_lsns: u64,
    /// Not a knob: present only under `--cfg walship_probe_new_field`, as
    /// a field added in a later release would be. `.ci/run` builds an
    /// embedder outside the workspace (`compat/embedder`) so, to prove it
    /// compiles unchanged.
    #[cfg(walship_probe_new_field)]
    #[doc(hidden)]
    pub probe_new_field: u8,
}

impl PrimaryConfig {
    /// The primary of `volume` in `cluster`, its store in `dir`, opening in
    /// `epoch` under `commit_mode` with `replicas`: default tuning, no
    /// peering, nobody told of its replicas' states.
    pub fn new(
        (cluster, volume): (impl Into<String>, impl Into<String>),
        dir: impl Into<PathBuf>,
        store: StoreOptions,
        epoch: u64,
        commit_mode: CommitMode,
        replicas: Vec<ReplicaSpec>,
    ) -> Self {
        Self {
            cluster: cluster.into(),
            volume: volume.into(),
            dir: dir.into(),
            store,
            epoch,
            commit_mode,
            replicas,
            tuning: Tuning::default(),
            on_replica_states: None,
            peering: Peering::default(),
            server: None,
            #[cfg(walship_probe_new_field)]
            probe_new_field: 0,
        }
    }

    /// With `tuning`.
    pub fn with_tuning(mut self, tuning: Tuning) -> Self {
        self.tuning = tuning;
        self
    }

    /// Peering before it serves ([`Peering::enabled`]).
    pub fn with_peering(mut self, peering: Peering) -> Self {
        self.peering = peering;
        self
    }

    /// Named `server` (its node's name): no replica may be named so.
    pub fn with_server(mut self, server: impl Into<String>) -> Self {
        self.server = Some(server.into());
        self
    }

    /// Telling `on` when its replicas' states change.
    pub fn with_replica_states(mut self, on: ReplicaStatesChanged) -> Self {
        self.on_replica_states = Some(on);
        self
    }
}

impl ReplicaConfig {
    /// Replica `server` of `volume` in `cluster`, its store in `dir`,
    /// taking its primary's connections at `listen`; a checkpoint every
    /// 1024 committed LSNs.
    pub fn new(
        (cluster, volume, server): (impl Into<String>, impl Into<String>, impl Into<String>),
        dir: impl Into<PathBuf>,
        store: StoreOptions,
        listen: impl Into<Listen>,
    ) -> Self {
        Self {
            cluster: cluster.into(),
            volume: volume.into(),
            server: server.into(),
            dir: dir.into(),
            store,
            listen: listen.into(),
            checkpoint_every_lsns: 1024,
            #[cfg(walship_probe_new_field)]
            probe_new_field: 0,
        }
    }

    /// Checkpointing when `lsns` committed LSNs are past the checkpoint.
    pub fn with_checkpoint_every_lsns(mut self, lsns: u64) -> Self {
        self.checkpoint_every_lsns = lsns;
        self
    }
}

impl ReplicaSpec {
    /// Replica `server` at `addr`, endpoint version `version`.
    pub fn new(server: impl Into<String>, addr: impl Into<String>, version: u64) -> Self {
        Self {
            server: server.into(),
            addr: addr.into(),
            version,
            #[cfg(walship_probe_new_field)]
            probe_new_field: 0,
        }
    }
}

/// Where a replica takes its primary's connections.
#[derive(Debug, Clone)]
pub enum Listen {
    /// A listener of its own on this address (`127.0.0.1:0` picks a port).
    Addr(String),
    /// A node's listener, shared by all its replica volumes, which hands
    /// each connection to the volume its hello names.
    Shared(ReplicationListener),
}

impl From<&str> for Listen {
    fn from(addr: &str) -> Self {
        Self::Addr(addr.to_owned())
    }
}

impl From<String> for Listen {
    fn from(addr: String) -> Self {
        Self::Addr(addr)
    }
}

/// What to spawn.
// Built once per volume and moved into the runtime: its size does not matter,
// and boxing the primary's would only make it clumsier to write.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone)]
pub enum VolumeConfig {
    /// A primary.
    Primary(PrimaryConfig),
    /// A replica.
    Replica(ReplicaConfig),
}
