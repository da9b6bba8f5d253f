//! `walship serve`: a node from its config, until SIGTERM or SIGINT.

use anyhow::Context;
use std::path::Path;
use tokio::signal::unix::{signal, SignalKind};
use walship::node::{config, Node};

/// `--etcd` and its lease.
#[derive(Debug, Clone)]
#[cfg_attr(not(feature = "etcd"), allow(dead_code))]
pub struct EtcdArgs {
    /// Client URLs.
    pub endpoints: Vec<String>,
    /// The node's lease.
    pub lease_ttl: std::time::Duration,
}

/// Runs the node of `config_path` until a signal asks it to stop; returns
/// once it has stopped (every NBD request answered, every volume stopped).
/// With `etcd`, the volumes' assignments come from there.
pub async fn run(
    config_path: &Path,
    data_dir: Option<&Path>,
    etcd: Option<EtcdArgs>,
) -> anyhow::Result<()> {
    #[cfg_attr(not(feature = "etcd"), allow(unused_mut))]
    let mut config = config::load(config_path, data_dir)?;
    #[cfg(not(feature = "etcd"))]
    if etcd.is_some() {
        anyhow::bail!("--etcd: this walship was built without etcd (cargo build --features etcd)");
    }
    #[cfg(feature = "etcd")]
    let plane = match etcd {
        Some(args) => {
            let options = walship::node::etcd::EtcdOptions {
                endpoints: args.endpoints,
                lease_ttl: args.lease_ttl,
            };
            Some(walship::node::etcd::ControlPlane::connect(options, &mut config).await?)
        }
        None => None,
    };
    // Every volume holds files and connections: take all the descriptors
    // the hard limit allows.
    let descriptors = rlimit::increase_nofile_limit(u64::MAX).context("raise RLIMIT_NOFILE")?;
    let mut terminate = signal(SignalKind::terminate()).context("SIGTERM handler")?;
    let mut interrupt = signal(SignalKind::interrupt()).context("SIGINT handler")?;
    let node = Node::start(config).await?;
    #[cfg(feature = "etcd")]
    let plane = match plane {
        Some(plane) => match plane.run(std::sync::Arc::clone(&node)).await {
            Ok(running) => Some(running),
            Err(e) => {
                node.stop().await;
                return Err(e.into());
            }
        },
        None => None,
    };
    tracing::info!(
        node = node.name(),
        replication = %node.replication_addr(),
        nbd = ?node.nbd_addr(),
        admin = ?node.admin_addr(),
        volumes = node.config().volumes.len(),
        descriptors,
        "serving"
    );
    let signal = tokio::select! {
        _ = terminate.recv() => "SIGTERM",
        _ = interrupt.recv() => "SIGINT",
    };
    tracing::info!(signal, "stopping");
    #[cfg(feature = "etcd")]
    if let Some(plane) = plane {
        plane.stop().await;
    }
    node.stop().await;
    tracing::info!("stopped");
    Ok(())
}
