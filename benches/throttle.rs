//! P12: what a throttled rebuild costs a client of another volume. Two
//! `walship serve` nodes share two volumes (node1 primary, node2 replica,
//! sync_all): `vola`, written by fio through node1's NBD export (4 KiB
//! random writes, a flush after each: QD 1), and `volb`, which node2
//! loses and node1 rebuilds onto it under the node's recovery budget
//! (`[recovery] rate`). Rounds alternate fio with node2 rebuilding `volb`
//! and fio with both volumes in sync, and report the write and flush p99
//! of each (medians) and their ratio (target <= 1.3x).
//!
//! `cargo bench --bench throttle` (needs fio: `apt-get install fio`);
//! `-- --seconds 8 --rounds 3 --rate-mib 64` to change it.

#[path = "support/fio.rs"]
mod fio;
#[path = "../tests/support/nodes.rs"]
mod nodes;

use anyhow::{ensure, Context as _};
use clap::Parser;
use fio::{fio, median, Figures};
use nodes::{NodeCluster, VolumeOptions};
use std::time::{Duration, Instant};

#[derive(Debug, Parser)]
#[command(name = "throttle")]
struct Options {
    /// Seconds per fio run.
    #[arg(long, default_value_t = 8)]
    seconds: u64,
    /// Rounds (each runs fio once with a rebuild and once without).
    #[arg(long, default_value_t = 3)]
    rounds: usize,
    /// The recovery rate node1 sends at, MiB/s.
    #[arg(long, default_value_t = 64)]
    rate_mib: u64,
    /// Passed by `cargo bench`; ignored.
    #[arg(long, hide = true)]
    bench: bool,
}

/// The first volume of node1's status whose name is `name`.
async fn volume(cluster: &NodeCluster, name: &str) -> serde_json::Value {
    let status = cluster.status(0).await;
    status["volumes"]
        .as_array()
        .and_then(|v| v.iter().find(|v| v["name"] == name).cloned())
        .unwrap_or_default()
}

/// Whether node1 is rebuilding `volb` onto node2 now (its progress says so).
async fn rebuilding(cluster: &NodeCluster) -> bool {
    let volb = volume(cluster, "volb").await;
    volb["status"]["recovery"].as_array().is_some_and(|r| {
        r.iter()
            .any(|p| p["kind"].as_str().is_some_and(|k| k.starts_with("rebuild")))
    })
}

/// Whether `name`'s replica on node2 is in sync.
async fn in_sync(cluster: &NodeCluster, name: &str) -> bool {
    let v = volume(cluster, name).await;
    v["status"]["registry"]["senders"]
        .as_array()
        .is_some_and(|s| !s.is_empty() && s.iter().all(|s| s["state"] == "in_sync"))
}

async fn wait(
    limit: Duration,
    what: &str,
    mut done: impl AsyncFnMut() -> bool,
) -> anyhow::Result<()> {
    let deadline = Instant::now() + limit;
    while !done().await {
        ensure!(Instant::now() < deadline, "{what} within {limit:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Ok(())
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let options = Options::parse();
    // The rebuild must outlast the fio run at the rate: a sparse volume
    // half as long again.
    let volb_mib = (options.rate_mib * options.seconds * 3 / 2).max(256);
    let volume = VolumeOptions {
        name: "vola".into(),
        size_mib: 64,
        export_replicas: false,
        // Checkpoints often: volb's WAL is recycled past a replica that
        // lost it, which then needs a rebuild.
        tuning: format!(
            "{}checkpoint_every_lsns = 256\n\n[recovery]\nrate = \"{}MiB\"\nfloor = \"8MiB\"\nmax_rebuilds = 1\n",
            VolumeOptions::default().tuning,
            options.rate_mib
        ),
        extra_volumes: vec![("volb".into(), volb_mib)],
        ..VolumeOptions::default()
    };
    let mut cluster = NodeCluster::start_nodes(volume, 2).await;
    for name in ["vola", "volb"] {
        wait(
            Duration::from_secs(120),
            "both volumes in sync",
            async || in_sync(&cluster, name).await,
        )
        .await?;
    }
    let uri = cluster.nodes[0].uri("vola");
    // volb holds something, and its WAL moves on.
    fio(&cluster.nodes[0].uri("volb"), 32, 2, 64).await?;
    println!(
        "P12: fio QD1 4 KiB randwrite + flush on vola, {} s x {} rounds; volb ({volb_mib} MiB) rebuilt onto node2 at {} MiB/s in the rebuild rounds",
        options.seconds, options.rounds, options.rate_mib
    );
    let (mut with, mut without) = (Vec::<Figures>::new(), Vec::<Figures>::new());
    for round in 0..options.rounds {
        // Alternated, both orders.
        for rebuild in [round % 2 == 0, round % 2 == 1] {
            if rebuild {
                cluster.kill(1).await;
                std::fs::remove_dir_all(cluster.nodes[1].data_dir.join("volb"))
                    .context("node2's volb")?;
                cluster.spawn(1);
                cluster.wait_up(1, Duration::from_secs(30)).await;
                wait(
                    Duration::from_secs(60),
                    "vola in sync on node2",
                    async || in_sync(&cluster, "vola").await,
                )
                .await?;
                wait(Duration::from_secs(60), "volb rebuilding", async || {
                    rebuilding(&cluster).await
                })
                .await?;
                with.push(fio(&uri, 1, options.seconds, 64).await?);
                ensure!(
                    rebuilding(&cluster).await,
                    "the rebuild of volb ended before fio did: raise --rate-mib's volume or lower --seconds"
                );
                wait(Duration::from_secs(600), "volb in sync", async || {
                    in_sync(&cluster, "volb").await
                })
                .await?;
            } else {
                without.push(fio(&uri, 1, options.seconds, 64).await?);
            }
        }
    }
    let p99 = |runs: &[Figures], f: fn(&Figures) -> f64| median(runs.iter().map(f).collect());
    for (name, runs) in [("rebuilding volb", &with), ("idle", &without)] {
        println!(
            "  {name:<16} {:>6.0} IOPS  write p50 {:>6.0} us p99 {:>6.0} us  flush p50 {:>6.0} us p99 {:>6.0} us  (medians of {})",
            p99(runs, |f| f.iops),
            p99(runs, |f| f.p50_us),
            p99(runs, |f| f.p99_us),
            p99(runs, |f| f.flush_p50_us),
            p99(runs, |f| f.flush_p99_us),
            runs.len()
        );
    }
    println!(
        "P12 write p99 with a throttled rebuild / without: {:.2}x; flush p99: {:.2}x (target <= 1.3x)",
        p99(&with, |f| f.p99_us) / p99(&without, |f| f.p99_us),
        p99(&with, |f| f.flush_p99_us) / p99(&without, |f| f.flush_p99_us),
    );
    cluster.stop_cleanly(&[0, 1]).await;
    Ok(())
}
