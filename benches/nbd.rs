//! P8: the replication tax as a block client sees it. fio's nbd engine
//! writes 4 KiB blocks at random, made durable (QD 1: a flush after every
//! write; QD 32: a flush after every 32), against three exports in turn,
//! round after round, on the same disk:
//!
//! - `replicated`: `walship serve` ×3, sync_all, two replicas (node1's export);
//! - `local`: one `walship serve` node, the same volume without replicas;
//! - `nbdkit`: nbdkit's file plugin on a file (an outside reference).
//!
//! Reports IOPS, p50 and p99 of write and of flush latency (medians over
//! the rounds) and
//! the tax: 1 - replicated IOPS / local IOPS (target ≤ 20%).
//!
//! `cargo bench --bench nbd` (needs fio and nbdkit: `apt-get install fio
//! nbdkit`); `-- --seconds 5 --rounds 3` to change the length.

#[path = "support/fio.rs"]
mod fio;
#[path = "../tests/support/nodes.rs"]
mod nodes;

use anyhow::{bail, Context as _};
use clap::Parser;
use fio::{fio, median, Figures};
use nodes::{free_port, run, NodeCluster, VolumeOptions};
use std::time::Duration;

#[derive(Debug, Parser)]
#[command(name = "nbd")]
struct Options {
    /// Seconds per fio run.
    #[arg(long, default_value_t = 10)]
    seconds: u64,
    /// Rounds (each runs every export once per queue depth).
    #[arg(long, default_value_t = 3)]
    rounds: usize,
    /// Passed by `cargo bench`; ignored.
    #[arg(long, hide = true)]
    bench: bool,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let options = Options::parse();
    let volume = || VolumeOptions {
        size_mib: 256,
        tuning: String::new(),
        ..VolumeOptions::default()
    };
    let replicated = NodeCluster::start(volume()).await;
    replicated.wait_converged(Duration::from_secs(30)).await;
    let local = NodeCluster::start_nodes(volume(), 1).await;
    let file = local.dir().join("nbdkit.img");
    std::fs::File::create(&file)?.set_len(256 << 20)?;
    let nbdkit_port = free_port();
    let _nbdkit = tokio::process::Command::new("nbdkit")
        .args([
            "-f",
            "-i",
            "127.0.0.1",
            "-p",
            &nbdkit_port.to_string(),
            "file",
        ])
        .arg(format!("file={}", file.display()))
        .kill_on_drop(true)
        .spawn()
        .context("nbdkit (apt-get install nbdkit)")?;
    let targets = [
        ("replicated", replicated.nodes[0].uri("vol0")),
        ("local", local.nodes[0].uri("vol0")),
        ("nbdkit", format!("nbd://127.0.0.1:{nbdkit_port}/")),
    ];
    // nbdkit needs a moment to listen: wait for its first answer.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while run(
        "nbdinfo",
        &["--size", &targets[2].1],
        Duration::from_secs(5),
    )
    .await
    .status
    .code()
        != Some(0)
    {
        if tokio::time::Instant::now() > deadline {
            bail!("nbdkit did not answer within 10 s");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    println!(
        "P8: fio nbd 4 KiB randwrite, durable (flush every QD writes), {} s x {} rounds, medians",
        options.seconds, options.rounds
    );
    for depth in [1u32, 32] {
        let mut runs: Vec<Vec<Figures>> = vec![Vec::new(); targets.len()];
        for _ in 0..options.rounds {
            for (i, (_, uri)) in targets.iter().enumerate() {
                runs[i].push(fio(uri, depth, options.seconds, 256).await?);
            }
        }
        let median_of =
            |runs: &[Figures], field: fn(&Figures) -> f64| median(runs.iter().map(field).collect());
        let summary: Vec<Figures> = runs
            .iter()
            .map(|r| Figures {
                iops: median_of(r, |f| f.iops),
                p50_us: median_of(r, |f| f.p50_us),
                p99_us: median_of(r, |f| f.p99_us),
                flush_p50_us: median_of(r, |f| f.flush_p50_us),
                flush_p99_us: median_of(r, |f| f.flush_p99_us),
            })
            .collect();
        for ((name, _), f) in targets.iter().zip(&summary) {
            println!(
                "  QD{depth:<2} {name:<10} {:>7.0} IOPS  write p50 {:>6.0} us p99 {:>6.0} us  flush p50 {:>6.0} us p99 {:>6.0} us",
                f.iops, f.p50_us, f.p99_us, f.flush_p50_us, f.flush_p99_us
            );
        }
        let tax = 1.0 - summary[0].iops / summary[1].iops;
        let reference = summary[1].iops / summary[2].iops;
        println!(
            "  QD{depth:<2} replication tax {:.0}% (target <= 20%); local walship / nbdkit {:.2}x",
            tax * 100.0,
            reference
        );
    }
    Ok(())
}
