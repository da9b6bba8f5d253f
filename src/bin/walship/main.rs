//! The `walship` command line.

mod bench;
mod demo;

use clap::{Parser, Subcommand};
use std::path::PathBuf;

#[derive(Debug, Parser)]
#[command(
    name = "walship",
    version,
    about = "WAL replication and replica recovery"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// A primary and two replicas on loopback play the recovery story:
    /// catch-up, rebuild, epoch bump with an endpoint change; then verify.
    Demo {
        /// Small sizes (finishes in well under 30 s).
        #[arg(long)]
        quick: bool,
        /// Keep the data here instead of a temp dir.
        #[arg(long)]
        dir: Option<PathBuf>,
        /// Print the final primary status as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Whole-system benchmarks against same-run baselines (P1 catch-up,
    /// P2 full-base rebuild, P4 replication tax, P5 mailbox, P6 scale).
    Bench {
        /// Which: p1, p2, p4, p5 (default: all).
        #[arg(value_delimiter = ',')]
        which: Vec<String>,
        /// Data size for P1 and P2, MiB.
        #[arg(long, default_value_t = 1024)]
        size_mib: u64,
        /// Write+barrier operations per P4 run at QD1 (x4 at QD32).
        #[arg(long, default_value_t = 5000)]
        p4_ops: u64,
        /// Messages per P5 run.
        #[arg(long, default_value_t = 1_000_000)]
        p5_messages: u64,
        /// Idle volumes (each with 2 replicas) for P6.
        #[arg(long, default_value_t = 200)]
        p6_volumes: u64,
        /// Keep the data here instead of a temp dir.
        #[arg(long)]
        dir: Option<PathBuf>,
    },
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Command::Demo { quick, dir, json } => {
            let options = demo::DemoOptions { quick, dir, json };
            demo::run(options, &mut std::io::stdout()).await
        }
        Command::Bench {
            which,
            size_mib,
            p4_ops,
            p5_messages,
            p6_volumes,
            dir,
        } => {
            let which = if which.is_empty() {
                ["p1", "p2", "p4", "p5", "p6"].map(String::from).to_vec()
            } else {
                which
            };
            let options = bench::BenchOptions {
                which,
                size_mib,
                p4_ops,
                p5_messages,
                p6_volumes,
                dir,
            };
            bench::run(options, &mut std::io::stdout()).await
        }
    }
}
