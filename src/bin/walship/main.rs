//! The `walship` command line.

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
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Command::Demo { quick, dir, json } => {
            let options = demo::DemoOptions { quick, dir, json };
            demo::run(options, &mut std::io::stdout()).await
        }
    }
}
