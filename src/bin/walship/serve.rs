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
                progress_every: args.progress_every,
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
    #[cfg(feature = "etcd")]
    let fence = plane
        .as_ref()
        .map(|plane| (plane.fence(), plane.describe(), plane.terms()));
    #[cfg(not(feature = "etcd"))]
    let fence: Option<(
        std::sync::Arc<walship::node::WriteFence>,
        String,
        std::sync::Arc<dyn walship::node::TermKeeper>,
    )> = None;
    let started = match fence {
        Some((fence, plane, terms)) => {
            Node::start_fenced(config, fence, Some(plane), Some(terms)).await
        }
        None => Node::start(config).await,
    };
    let node = match started {
        Ok(node) => node,
        Err(e) => {
            #[cfg(feature = "etcd")]
            if let Some(plane) = plane {
                plane.abandon().await;
            }
            return Err(e.into());
        }
    };
    #[cfg(feature = "etcd")]
    let mut plane = match plane {
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
    // With etcd, a lost session (a lease not renewed in time, a watch that
    // cannot resume) is ridden out: writes fenced, the node rejoins once
    // etcd answers. Only the control plane failing (its supervisor) stops
    // the node: deaf to new assignments, it must not serve on.
    #[cfg(feature = "etcd")]
    let plane_ended = async {
        match plane.as_mut() {
            Some(plane) => Some(plane.ended().await),
            None => std::future::pending().await,
        }
    };
    #[cfg(not(feature = "etcd"))]
    let plane_ended = std::future::pending::<Option<String>>();
    let ended = tokio::select! {
        _ = terminate.recv() => Err("SIGTERM"),
        _ = interrupt.recv() => Err("SIGINT"),
        why = plane_ended => Ok(why.unwrap_or_default()),
    };
    match &ended {
        Err(signal) => tracing::info!(signal, "stopping"),
        Ok(why) => tracing::error!(why, "etcd control plane ended: stopping"),
    }
    #[cfg(feature = "etcd")]
    if let Some(plane) = plane {
        plane.stop().await;
    }
    node.stop().await;
    tracing::info!("stopped");
    match ended {
        Err(_) => Ok(()),
        Ok(why) => anyhow::bail!("the etcd control plane ended: {why}"),
    }
}
