//! `walship serve`: a node from its config, until SIGTERM or SIGINT.

use anyhow::Context;
use std::path::Path;
use walship::node::process::Ended;
use walship::node::{config, AssignmentSource, EtcdSource, NodeProcess};

/// `--etcd` and its lease.
#[derive(Debug, Clone)]
pub struct EtcdArgs {
    /// Client URLs.
    pub endpoints: Vec<String>,
    /// The node's lease.
    pub lease_ttl: std::time::Duration,
    /// How often LSNs are reported.
    pub progress_every: std::time::Duration,
}

/// Runs the node of `config_path` until a signal asks it to stop; returns
/// once it has stopped (every NBD request answered, every volume stopped).
/// With `etcd`, the volumes' assignments come from there.
pub async fn run(
    config_path: &Path,
    data_dir: Option<&Path>,
    etcd: Option<EtcdArgs>,
) -> anyhow::Result<()> {
    let config = config::load(config_path, data_dir)?;
    let source = match etcd {
        Some(args) => AssignmentSource::Etcd(EtcdSource::new(
            args.endpoints,
            args.lease_ttl,
            args.progress_every,
        )),
        None => AssignmentSource::Static,
    };
    // Every volume holds files and connections: take all the descriptors
    // the hard limit allows.
    let descriptors = rlimit::increase_nofile_limit(u64::MAX).context("raise RLIMIT_NOFILE")?;
    let mut process = NodeProcess::start(config, source).await?;
    let node = process.node();
    tracing::info!(
        node = node.name(),
        replication = %node.replication_addr(),
        nbd = ?node.nbd_addr(),
        admin = ?process.admin_addr(),
        volumes = node.config().volumes.len(),
        descriptors,
        "serving"
    );
    // A lost etcd session is ridden out; only the control plane failing
    // (its supervisor) stops the node: deaf to assignments, it must not
    // serve on.
    let ended = process.serve_until_signal().await;
    match &ended {
        Ended::Signal(signal) => tracing::info!(signal, "stopping"),
        Ended::ControlPlane(why) => tracing::error!(why, "etcd control plane ended: stopping"),
        other => tracing::error!(?other, "stopping"),
    }
    process.stop().await;
    tracing::info!("stopped");
    match ended {
        Ended::ControlPlane(why) => anyhow::bail!("the etcd control plane ended: {why}"),
        _ => Ok(()),
    }
}
