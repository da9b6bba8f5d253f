//! The `walship` command line.

mod demo;
mod promote;
mod recovery;
mod serve;
mod status;
mod store;
mod verify;

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
    /// Run a node: the volumes of a TOML config, replicated and exported
    /// over NBD, until SIGTERM or SIGINT. Logs follow RUST_LOG (default info).
    Serve {
        /// The node's config.
        #[arg(long)]
        config: PathBuf,
        /// Data directory (overrides the config's data_dir).
        #[arg(long)]
        data_dir: Option<PathBuf>,
        /// etcd client URLs (comma-separated): the volumes' assignments
        /// come from etcd (written from the config where absent) and the
        /// node registers there under a lease. Needs a walship built with
        /// `--features etcd`.
        #[arg(long, value_delimiter = ',')]
        etcd: Vec<String>,
        /// Time to live of the node's etcd lease, in milliseconds (etcd
        /// grants whole seconds, 2 s at least with its default settings).
        #[arg(long, default_value_t = 5000, value_parser = clap::value_parser!(u64).range(1000..))]
        etcd_lease_ms: u64,
        /// How often the node writes its volumes' reports to etcd when
        /// their LSNs moved, in milliseconds; a primary's replica state
        /// change and an answer to the controller's probe are written at
        /// once.
        #[arg(long, default_value_t = 250, value_parser = clap::value_parser!(u64).range(10..))]
        etcd_progress_ms: u64,
    },
    /// Offline tools for a store directory (a volume's `store/`). They only
    /// read: no lock is taken, nothing is truncated or removed.
    Store {
        #[command(subcommand)]
        command: StoreCommand,
    },
    /// The desperate path: a volume whose primary is lost and which has no
    /// eligible replica (the controller leaves it down, with the reasons)
    /// gets the running replica with the most data as primary in the next
    /// epoch. Committed writes it lacks are lost; the decision says which.
    /// Needs a walship built with `--features etcd`.
    Promote {
        /// etcd client URLs (comma-separated).
        #[arg(long, value_delimiter = ',', required = true)]
        etcd: Vec<String>,
        /// The nodes' cluster name (their config's `cluster`).
        #[arg(long)]
        cluster: String,
        /// The volume.
        #[arg(long)]
        volume: String,
        /// Required: losing committed writes is accepted.
        #[arg(long)]
        accept_data_loss: bool,
    },
    /// A running node's recovery budget, or a change of it at run time:
    /// the rate every catch-up and rebuild it sends shares, the rate what
    /// it receives shares, the floor each keeps, and how many rebuilds run
    /// at once (the rest queue). Flags
    /// left out keep their values; a refused change applies nothing.
    Recovery {
        /// The node's admin address (`host:port`).
        #[arg(long)]
        admin: String,
        /// Bytes per second all recoveries share (`200MiB`, or `unlimited`).
        #[arg(long)]
        rate: Option<String>,
        /// Bytes per second each running recovery keeps at least.
        #[arg(long)]
        floor: Option<String>,
        /// Rebuilds at once (a number, or `unlimited`).
        #[arg(long)]
        max_rebuilds: Option<String>,
        /// Bytes per second all recoveries this node receives share
        /// (`200MiB`, or `unlimited`).
        #[arg(long)]
        receive_rate: Option<String>,
    },
    /// Compares every in-sync replica of a volume with its primary at one
    /// LSN, region by region, while writes go on. Exits 1 when a region
    /// differs (or a replica could not be compared), 0 when all match.
    Verify {
        /// The admin address (`host:port`) of the volume's primary node.
        #[arg(long)]
        admin: String,
        /// The volume.
        volume: String,
        /// Rebuild a replica whose regions differ (every region compared).
        #[arg(long)]
        repair: bool,
        /// Print the JSON report instead of lines.
        #[arg(long)]
        json: bool,
    },
    /// A running node's volumes, roles, epochs, replica states and lag.
    Status {
        /// The node's admin address (`host:port`).
        #[arg(long)]
        admin: String,
        /// Print the JSON the node answered instead of a table.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Debug, Subcommand)]
enum StoreCommand {
    /// Superblock, WAL range, epoch history and torn-tail status.
    Inspect {
        /// The store directory.
        dir: PathBuf,
    },
    /// Checks the superblock and every WAL frame; fails if anything is wrong.
    Verify {
        /// The store directory.
        dir: PathBuf,
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
        Command::Serve {
            config,
            data_dir,
            etcd,
            etcd_lease_ms,
            etcd_progress_ms,
        } => {
            init_logs();
            let etcd = (!etcd.is_empty()).then(|| serve::EtcdArgs {
                endpoints: etcd,
                lease_ttl: std::time::Duration::from_millis(etcd_lease_ms),
                progress_every: std::time::Duration::from_millis(etcd_progress_ms),
            });
            serve::run(&config, data_dir.as_deref(), etcd).await
        }
        Command::Promote {
            etcd,
            cluster,
            volume,
            accept_data_loss,
        } => {
            let out = &mut std::io::stdout();
            promote::run(&etcd, &cluster, &volume, accept_data_loss, out).await
        }
        Command::Status { admin, json } => status::run(&admin, json, &mut std::io::stdout()).await,
        Command::Verify {
            admin,
            volume,
            repair,
            json,
        } => {
            let clean = verify::run(&admin, &volume, repair, json, &mut std::io::stdout()).await?;
            if !clean {
                std::process::exit(1);
            }
            Ok(())
        }
        Command::Recovery {
            admin,
            rate,
            floor,
            max_rebuilds,
            receive_rate,
        } => {
            let change = walship::node::admin::RecoveryRequest {
                rate,
                floor,
                max_rebuilds,
                receive_rate,
            };
            recovery::run(&admin, change, &mut std::io::stdout()).await
        }
        Command::Store { command } => match command {
            StoreCommand::Inspect { dir } => store::run(&dir, false, &mut std::io::stdout()),
            StoreCommand::Verify { dir } => store::run(&dir, true, &mut std::io::stdout()),
        },
    }
}

/// Logs to stderr, filtered by RUST_LOG (`info` when unset).
fn init_logs() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
}
