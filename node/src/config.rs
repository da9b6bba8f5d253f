//! The node's configuration: a TOML file, read with serde and checked as a
//! whole before anything starts. A refusal names the line and what is wrong.
//!
//! ```toml
//! node = "node1"                      # this node's name, a server name in replica ids
//! cluster = "walship"                 # sent in every hello; nodes of one cluster agree
//! data_dir = "/var/lib/walship"       # or --data-dir
//! replication = "127.0.0.1:7401"      # the one replication listener
//! admin = "127.0.0.1:9401"            # admin HTTP (optional)
//! nbd = "127.0.0.1:10809"             # NBD exports (optional)
//!
//! [[volume]]
//! name = "vol0"
//! size = "256MiB"                     # or bytes; a multiple of the block size
//! block_size = 4096                   # the only block size
//! commit_mode = "sync_all"            # best_effort | sync_all | sync_quorum
//! epoch = 1                           # the assignment's epoch
//! primary = "node1"
//! replicas = { node2 = "127.0.0.1:7402", node3 = "127.0.0.1:7403" }
//! export_replicas = true              # replicas export it read-only over NBD
//!
//! [recovery]                          # optional: the node's recovery budget
//! rate = "200MiB"                     # per second, every catch-up and rebuild it sends
//! floor = "32MiB"                     # per second each running recovery keeps at least
//! max_rebuilds = 2                    # rebuilds at once; the rest queue
//! ```

use crate::assignment::{Assignment, AssignmentField};
use serde::Deserialize;
use std::collections::{BTreeMap, HashSet};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;
use toml::Spanned;
use walship_engine::{CommitMode, ReplicaId};
use walship_io::BLOCK_SIZE;

/// A configuration the node refuses to start with.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("read {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The file is not valid TOML for a node, or a value is wrong: the line
    /// (1-based; 0 when the whole file is meant) and what is wrong.
    #[error("{file}:{line}: {what}")]
    Invalid {
        /// The file, as given.
        file: String,
        /// The line.
        line: usize,
        /// What is wrong.
        what: String,
    },
}

/// A node's configuration, checked.
#[derive(Debug, Clone)]
pub struct NodeConfig {
    /// Where it was read from (for messages).
    pub file: String,
    /// This node's name: the server name in replica ids (`<volume>/<node>`).
    pub node: String,
    /// Cluster name, in every hello.
    pub cluster: String,
    /// Data directory: one directory per volume below it.
    pub data_dir: PathBuf,
    /// The replication listener's address.
    pub replication: SocketAddr,
    /// The admin HTTP address, if any.
    pub admin: Option<SocketAddr>,
    /// The NBD address, if any.
    pub nbd: Option<SocketAddr>,
    /// The volumes.
    pub volumes: Vec<VolumeSpec>,
    /// Tuning for every primary of the node.
    pub tuning: TuningSpec,
    /// The node's recovery budget (`[recovery]`), checked.
    pub recovery: walship_actors::RecoveryLimits,
}

/// One volume of the node's config.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VolumeSpec {
    /// Name; also its NBD export name.
    pub name: String,
    /// Size in bytes, a multiple of 4 KiB.
    pub size: u64,
    /// Its assignment (epoch, primary, commit mode, replicas).
    pub assignment: Assignment,
    /// Whether replicas export the volume read-only over NBD.
    pub export_replicas: bool,
    /// Line of the volume's `name`, for messages.
    pub line: usize,
    /// Line of its `size`, for a size the store on disk contradicts.
    pub size_line: usize,
}

impl VolumeSpec {
    /// Size in 4 KiB blocks.
    pub fn blocks(&self) -> u64 {
        self.size / BLOCK_SIZE as u64
    }
}

/// Tuning that operators may change (`[tuning]`); the rest keeps the
/// runtime's defaults.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TuningSpec {
    /// A barrier not committed within this long fails (the client's
    /// FLUSH/FUA gets an error).
    pub barrier_timeout_ms: u64,
    /// A replica that leaves a batch or barrier unanswered for this long
    /// is taken as lost.
    pub peer_timeout_ms: u64,
    /// A peer node that sends nothing on its link for this long is lost,
    /// with every session on the link (the link probes it every quarter
    /// of this; idle sessions send nothing).
    pub link_timeout_ms: u64,
    /// The longest wait before retrying a replica that went away.
    pub network_retry_max_ms: u64,
    /// WAL segment size.
    pub segment_bytes: u64,
    /// WAL bytes an away replica's retention hold may keep before it is
    /// released (that replica then rebuilds when it returns).
    pub retention_max_bytes: u64,
    /// Unacknowledged bytes a stream to one replica (live, catch-up or
    /// rebuild) may have in flight; batches and image chunks are at most
    /// this big.
    pub inflight_bytes: u64,
    /// Checkpoint when this many LSNs are durable past the checkpoint (the
    /// WAL before a checkpoint can be recycled).
    pub checkpoint_every_lsns: u64,
    /// Sessions to one peer node run as streams over one connection
    /// (false: a connection per session, as an embedded runtime does).
    pub multiplex: bool,
    /// A rebuild moves only what differs (a returning replica's dirty
    /// regions, or the regions whose checksums differ) and a cut one
    /// resumes (false: every rebuild copies the whole volume).
    pub delta_rebuilds: bool,
    /// A replica behind (catching up, or in sync with a backlog) is judged
    /// over this window, and each escalation step gets one.
    pub converge_window_ms: u64,
    /// A replica whose backlog would take longer than this to go is not
    /// converging (0: only one whose backlog does not shrink).
    pub converge_within_ms: u64,
    /// Step 1 for a catch-up that is not converging: it takes from the
    /// node's recovery budget first.
    pub converge_boost: bool,
    /// Step 2, opt-in (0 is off): the volume's writes are held to this
    /// percentage of the rate such a replica drains at.
    pub write_backpressure_percent: u8,
    /// No write waits longer than this for backpressure.
    pub max_write_delay_ms: u64,
}

impl Default for TuningSpec {
    fn default() -> Self {
        Self {
            barrier_timeout_ms: 5_000,
            peer_timeout_ms: 5_000,
            link_timeout_ms: 2_000,
            network_retry_max_ms: 2_000,
            segment_bytes: 64 << 20,
            retention_max_bytes: 1 << 30,
            inflight_bytes: 8 << 20,
            checkpoint_every_lsns: 16 * 1024,
            multiplex: true,
            delta_rebuilds: true,
            converge_window_ms: 5_000,
            converge_within_ms: 600_000,
            converge_boost: true,
            write_backpressure_percent: 0,
            max_write_delay_ms: 20,
        }
    }
}

impl TuningSpec {
    /// The runtime's tuning with these values.
    pub fn tuning(&self) -> walship_actors::Tuning {
        let mut tuning = walship_actors::Tuning::default();
        tuning.barrier_timeout_ticks = tuning.ticks(Duration::from_millis(self.barrier_timeout_ms));
        tuning.peer_timeout = Duration::from_millis(self.peer_timeout_ms);
        tuning.link_timeout = Duration::from_millis(self.link_timeout_ms.max(1));
        tuning.network_retry.max =
            Duration::from_millis(self.network_retry_max_ms).max(tuning.network_retry.first);
        tuning.retention_max_bytes = Some(self.retention_max_bytes);
        let inflight = usize::try_from(self.inflight_bytes)
            .unwrap_or(usize::MAX)
            .max(walship_io::BLOCK_SIZE);
        tuning.max_inflight_bytes = inflight;
        tuning.batch_bytes = tuning.batch_bytes.min(inflight);
        tuning.image_chunk_bytes = tuning.image_chunk_bytes.min(inflight);
        tuning.checkpoint_every_lsns = self.checkpoint_every_lsns.max(1);
        tuning.multiplex = self.multiplex;
        tuning.delta_rebuilds = self.delta_rebuilds;
        tuning.convergence_window = Duration::from_millis(self.converge_window_ms);
        tuning.converge_within =
            (self.converge_within_ms > 0).then(|| Duration::from_millis(self.converge_within_ms));
        tuning.convergence_boost = self.converge_boost;
        tuning.write_backpressure_percent =
            (self.write_backpressure_percent > 0).then_some(self.write_backpressure_percent);
        tuning.max_write_delay = Duration::from_millis(self.max_write_delay_ms);
        tuning
    }

    /// What the types do not say: a window is not empty, a share is a
    /// percentage.
    fn check(&self) -> Result<(), String> {
        if self.converge_window_ms == 0 {
            return Err("[tuning] converge_window_ms = 0: the window must be longer".into());
        }
        if self.write_backpressure_percent > 0 && self.max_write_delay_ms == 0 {
            return Err(
                "[tuning] max_write_delay_ms = 0 with write_backpressure_percent: no write could be held"
                    .into(),
            );
        }
        if self.write_backpressure_percent > 100 {
            return Err(format!(
                "[tuning] write_backpressure_percent = {}: a percentage, 1 to 100 (0 is off)",
                self.write_backpressure_percent
            ));
        }
        Ok(())
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawNode {
    node: Spanned<String>,
    #[serde(default = "default_cluster")]
    cluster: String,
    data_dir: Option<PathBuf>,
    replication: Spanned<String>,
    admin: Option<Spanned<String>>,
    nbd: Option<Spanned<String>>,
    #[serde(default)]
    tuning: TuningSpec,
    recovery: Option<Spanned<RawRecovery>>,
    #[serde(rename = "volume", default)]
    volumes: Vec<RawVolume>,
}

/// `[recovery]` as written: sizes per second, or `"unlimited"`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRecovery {
    rate: Option<RawSize>,
    floor: Option<RawSize>,
    max_rebuilds: Option<RawSize>,
    receive_rate: Option<RawSize>,
}

fn default_cluster() -> String {
    "walship".into()
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawVolume {
    name: Spanned<String>,
    size: Spanned<RawSize>,
    block_size: Option<Spanned<u64>>,
    commit_mode: Spanned<String>,
    #[serde(default = "first_epoch")]
    epoch: Spanned<u64>,
    primary: Spanned<String>,
    #[serde(default = "no_replicas")]
    replicas: Spanned<BTreeMap<String, String>>,
    #[serde(default)]
    export_replicas: bool,
}

fn no_replicas() -> Spanned<BTreeMap<String, String>> {
    Spanned::new(0..0, BTreeMap::new())
}

fn first_epoch() -> Spanned<u64> {
    Spanned::new(0..0, 1)
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum RawSize {
    Bytes(u64),
    Text(String),
}

/// Reads and checks a node's config; `data_dir` (from the command line)
/// wins over the file's.
pub fn load(path: &Path, data_dir: Option<&Path>) -> Result<NodeConfig, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    parse(&path.display().to_string(), &text, data_dir)
}

/// Parses and checks a node's config from `text` (named `file` in messages).
pub fn parse(file: &str, text: &str, data_dir: Option<&Path>) -> Result<NodeConfig, ConfigError> {
    let source = Source::new(file, text);
    let at = |span: Span, what: String| source.refuse(span, what);
    let raw: RawNode = toml::from_str(text)
        .map_err(|e| at(e.span().unwrap_or(0..0), e.message().trim_end().to_owned()))?;
    let node = server_name(&raw.node, "node").map_err(|what| at(raw.node.span(), what))?;
    let address = |value: &Spanned<String>, key: &str| {
        value
            .get_ref()
            .parse::<SocketAddr>()
            .map_err(|e| at(value.span(), format!("{key} = {:?}: {e}", value.get_ref())))
    };
    let replication = address(&raw.replication, "replication")?;
    let admin = raw
        .admin
        .as_ref()
        .map(|a| address(a, "admin"))
        .transpose()?;
    let nbd = raw.nbd.as_ref().map(|a| address(a, "nbd")).transpose()?;
    let data_dir = match (data_dir, raw.data_dir) {
        (Some(dir), _) => dir.to_path_buf(),
        (None, Some(dir)) => dir,
        (None, None) => {
            return Err(at(
                0..0,
                "no data_dir: set it in the file or pass --data-dir".into(),
            ))
        }
    };
    let mut names = HashSet::new();
    let mut volumes = Vec::new();
    for raw in raw.volumes {
        let name_at = raw.name.span();
        let volume = check_volume(raw, &node, &source)?;
        if !names.insert(volume.name.clone()) {
            return Err(at(
                name_at,
                format!("volume {} is configured twice", volume.name),
            ));
        }
        volumes.push(volume);
    }
    raw.tuning.check().map_err(|what| at(0..0, what))?;
    let recovery = match &raw.recovery {
        None => walship_actors::RecoveryLimits::default(),
        Some(spanned) => {
            check_recovery(spanned.get_ref()).map_err(|what| at(spanned.span(), what))?
        }
    };
    Ok(NodeConfig {
        recovery,
        file: file.to_owned(),
        node,
        cluster: raw.cluster,
        data_dir,
        replication,
        admin,
        nbd,
        volumes,
        tuning: raw.tuning,
    })
}

type Span = std::ops::Range<usize>;

/// The text being parsed, to turn byte spans into lines.
struct Source<'a> {
    file: &'a str,
    /// Where each newline is: a span's line is a binary search, not a
    /// scan from the start (a config of 10,000 volumes took seconds).
    newlines: Vec<usize>,
}

impl<'a> Source<'a> {
    fn new(file: &'a str, text: &str) -> Self {
        let newlines = text
            .bytes()
            .enumerate()
            .filter(|&(_, b)| b == b'\n')
            .map(|(at, _)| at)
            .collect();
        Self { file, newlines }
    }

    /// 1-based line of the span's start.
    fn line(&self, span: Span) -> usize {
        self.newlines.partition_point(|&at| at < span.start) + 1
    }

    fn refuse(&self, span: Span, what: String) -> ConfigError {
        ConfigError::Invalid {
            file: self.file.to_owned(),
            line: self.line(span),
            what,
        }
    }
}

fn check_volume(
    raw: RawVolume,
    node: &str,
    source: &Source<'_>,
) -> Result<VolumeSpec, ConfigError> {
    let at = |span: Span, what: String| source.refuse(span, what);
    let name = raw.name.get_ref().clone();
    // A volume name is the first half of every replica id and an export name.
    if let Err(e) = ReplicaId::new(&name, node) {
        return Err(at(raw.name.span(), format!("volume name {name:?}: {e}")));
    }
    let size = match raw.size.get_ref() {
        RawSize::Bytes(bytes) => Some(*bytes),
        RawSize::Text(text) => parse_size(text),
    };
    let block = BLOCK_SIZE as u64;
    let size = match size {
        Some(size) if size > 0 && size % block == 0 => size,
        _ => {
            return Err(at(
                raw.size.span(),
                format!(
                    "volume {name}: size must be a positive multiple of {block} bytes (\"256MiB\", \"1GiB\" or bytes)"
                ),
            ))
        }
    };
    if let Some(block_size) = &raw.block_size {
        if *block_size.get_ref() != block {
            return Err(at(
                block_size.span(),
                format!("volume {name}: block_size must be {block}"),
            ));
        }
    }
    let commit_mode = raw
        .commit_mode
        .get_ref()
        .parse::<CommitMode>()
        .map_err(|e| {
            at(
                raw.commit_mode.span(),
                format!("volume {name}: commit_mode: {e}"),
            )
        })?;
    let assignment = Assignment {
        epoch: *raw.epoch.get_ref(),
        primary: raw.primary.get_ref().clone(),
        commit_mode,
        replicas: raw.replicas.get_ref().clone(),
    };
    // One set of rules for every assignment (the admin API's and etcd's
    // too); the refusal points at the key at fault.
    if let Err(e) = assignment.validate(&name, node) {
        let span = match e.field() {
            AssignmentField::Epoch => raw.epoch.span(),
            AssignmentField::Primary => raw.primary.span(),
            AssignmentField::Replicas => raw.replicas.span(),
            AssignmentField::CommitMode => raw.commit_mode.span(),
            AssignmentField::Volume => raw.name.span(),
        };
        return Err(at(span, format!("volume {name}: {e}")));
    }
    Ok(VolumeSpec {
        line: source.line(raw.name.span()),
        size_line: source.line(raw.size.span()),
        name,
        size,
        assignment,
        export_replicas: raw.export_replicas,
    })
}

fn server_name(value: &Spanned<String>, key: &str) -> Result<String, String> {
    let name = value.get_ref();
    ReplicaId::new("v", name).map_err(|e| format!("{key} = {name:?}: {e}"))?;
    Ok(name.clone())
}

/// The limits `[recovery]` asks for, checked as a whole.
fn check_recovery(raw: &RawRecovery) -> Result<walship_actors::RecoveryLimits, String> {
    let value = |v: &Option<RawSize>, key: &str, unit: fn(&str) -> Option<u64>| match v {
        None => Ok(None),
        Some(RawSize::Bytes(n)) => Ok(Some(*n)),
        Some(RawSize::Text(t)) if t.trim() == "unlimited" => Ok(None),
        Some(RawSize::Text(t)) => unit(t).map(Some).ok_or_else(|| {
            format!("recovery {key} = {t:?}: not a size like \"200MiB\" or \"unlimited\"")
        }),
    };
    let defaults = walship_actors::RecoveryLimits::default();
    let rate = value(&raw.rate, "rate", parse_rate)?;
    let floor = value(&raw.floor, "floor", parse_rate)?.unwrap_or(defaults.floor);
    let max = value(&raw.max_rebuilds, "max_rebuilds", |t| t.trim().parse().ok())?;
    let receive_rate = value(&raw.receive_rate, "receive_rate", parse_rate)?;
    let limits = defaults
        .with_rate(rate)
        .with_receive_rate(receive_rate)
        .with_floor(floor)
        .with_max_rebuilds(max.map(|n| usize::try_from(n).unwrap_or(usize::MAX)));
    limits.validate().map_err(|e| e.to_string())?;
    Ok(limits)
}

/// A rate: a size per second (`"200MiB"` or `"200MiB/s"`).
pub fn parse_rate(text: &str) -> Option<u64> {
    parse_size(text.trim().trim_end_matches("/s"))
}

/// `"256MiB"`, `"1 GiB"`, `"4096"`, `"64KiB"` → bytes.
fn parse_size(text: &str) -> Option<u64> {
    let text = text.trim();
    let digits = text
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(digits);
    let number: u64 = number.parse().ok()?;
    let shift = match unit.trim() {
        "" | "B" => 0,
        "KiB" => 10,
        "MiB" => 20,
        "GiB" => 30,
        "TiB" => 40,
        _ => return None,
    };
    number.checked_mul(1u64 << shift)
}

#[cfg(test)]
mod tests;
