//! `walship serve`: a node from its config, until SIGTERM or SIGINT.

use anyhow::Context;
use std::path::Path;
use tokio::signal::unix::{signal, SignalKind};
use walship::node::{config, Node};

/// Runs the node of `config_path` until a signal asks it to stop; returns
/// once it has stopped (every NBD request answered, every volume stopped).
pub async fn run(config_path: &Path, data_dir: Option<&Path>) -> anyhow::Result<()> {
    let config = config::load(config_path, data_dir)?;
    // Every volume holds files and connections: take all the descriptors
    // the hard limit allows.
    let descriptors = rlimit::increase_nofile_limit(u64::MAX).context("raise RLIMIT_NOFILE")?;
    let mut terminate = signal(SignalKind::terminate()).context("SIGTERM handler")?;
    let mut interrupt = signal(SignalKind::interrupt()).context("SIGINT handler")?;
    let node = Node::start(config).await?;
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
    node.stop().await;
    tracing::info!("stopped");
    Ok(())
}
