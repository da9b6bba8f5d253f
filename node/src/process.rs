//! The composition root of `walship serve`: a [`NodeProcess`] puts a node
//! together from its config and an [`AssignmentSource`] (the config
//! alone, or etcd), runs it with its admin endpoint until a signal asks
//! it to stop, and stops it in order. The node does not know the admin
//! endpoint (which holds the node), nor where its assignments come from
//! beyond a name for its status.

use crate::admin::AdminServer;
use crate::config::NodeConfig;
use crate::node::{Node, NodeError};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

/// Where a node's assignments come from.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub enum AssignmentSource {
    /// Its config, then the admin API (`POST /volumes/{name}/assignment`).
    Static,
    /// etcd (`--etcd`): the records, the node's lease and its write fence,
    /// the controller. Only in a build with the feature `etcd`; without
    /// it, [`NodeProcess::start`] refuses ([`ProcessError::EtcdNotBuilt`]).
    Etcd(EtcdSource),
}

/// Where etcd is, and the node's lease ([`EtcdSource::new`]).
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct EtcdSource {
    /// Client URLs (`http://127.0.0.1:2379`).
    pub endpoints: Vec<String>,
    /// The lease's time to live; renewed at a third of it.
    pub lease_ttl: Duration,
    /// How often the hosted volumes' LSNs are reported.
    pub progress_every: Duration,
}

impl EtcdSource {
    /// etcd at `endpoints`, a lease of `lease_ttl`, LSNs reported every
    /// `progress_every`.
    pub fn new(endpoints: Vec<String>, lease_ttl: Duration, progress_every: Duration) -> Self {
        Self {
            endpoints,
            lease_ttl,
            progress_every,
        }
    }
}

/// Why a node process could not start or run.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ProcessError {
    /// The node refused (its config, its stores).
    #[error(transparent)]
    Node(#[from] NodeError),
    /// A listener or a signal handler could not be set up.
    #[error("{what}: {source}")]
    Io {
        /// What.
        what: String,
        /// Why.
        source: std::io::Error,
    },
    /// etcd refused or could not be reached.
    #[cfg(feature = "etcd")]
    #[error(transparent)]
    Etcd(#[from] crate::etcd::EtcdError),
    /// `--etcd` in a build without the feature `etcd`.
    #[error("--etcd: this walship was built without etcd (cargo build --features etcd)")]
    EtcdNotBuilt,
}

/// Why a node process stopped serving.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Ended {
    /// A signal asked it to (`SIGTERM`, `SIGINT`).
    Signal(&'static str),
    /// Its control plane ended on its own (not a lost session, which it
    /// rides out: its supervisor failed). It must not serve on deaf to
    /// assignments.
    ControlPlane(String),
}

/// The control plane beside a running node.
enum Control {
    Static,
    #[cfg(feature = "etcd")]
    Etcd(Box<crate::etcd::Running>),
}

impl Control {
    /// Why it ended on its own, once it has; never for the config alone.
    async fn ended(&mut self) -> String {
        match self {
            Self::Static => std::future::pending().await,
            #[cfg(feature = "etcd")]
            Self::Etcd(running) => running.ended().await,
        }
    }

    /// Stops it: the node's lease revoked, its writes fenced first.
    async fn stop(self) {
        match self {
            Self::Static => {}
            #[cfg(feature = "etcd")]
            Self::Etcd(running) => running.stop().await,
        }
    }
}

/// A node with its admin endpoint and control plane, as `walship serve`
/// runs it.
pub struct NodeProcess {
    node: Arc<Node>,
    admin: Option<AdminServer>,
    control: Control,
    /// Installed before anything starts: a signal during a long start is
    /// kept, and the stop that follows is an orderly one.
    signals: Signals,
}

/// `SIGTERM` and `SIGINT`.
struct Signals {
    terminate: tokio::signal::unix::Signal,
    interrupt: tokio::signal::unix::Signal,
}

impl Signals {
    fn install() -> Result<Self, ProcessError> {
        use tokio::signal::unix::{signal, SignalKind};
        let handler = |kind, what: &str| {
            signal(kind).map_err(|source| ProcessError::Io {
                what: format!("{what} handler"),
                source,
            })
        };
        Ok(Self {
            terminate: handler(SignalKind::terminate(), "SIGTERM")?,
            interrupt: handler(SignalKind::interrupt(), "SIGINT")?,
        })
    }

    /// The next one.
    async fn next(&mut self) -> &'static str {
        tokio::select! {
            _ = self.terminate.recv() => "SIGTERM",
            _ = self.interrupt.recv() => "SIGINT",
        }
    }
}

impl std::fmt::Debug for NodeProcess {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NodeProcess")
            .field("node", &self.node.name())
            .field("admin", &self.admin_addr())
            .finish_non_exhaustive()
    }
}

impl NodeProcess {
    /// Starts the node of `config` with its assignments from `source`:
    /// with etcd, the records are read (and the lease taken) before any
    /// volume opens; then the node, its admin endpoint, and the control
    /// plane's follower, reporter and campaign. Whatever started is
    /// stopped again if a later part fails.
    pub async fn start(config: NodeConfig, source: AssignmentSource) -> Result<Self, ProcessError> {
        let signals = Signals::install()?;
        // Bound before anything is announced: a port in use refuses the
        // start before the cluster hears of this node.
        let admin =
            match config.admin {
                Some(addr) => Some(tokio::net::TcpListener::bind(addr).await.map_err(
                    |source| ProcessError::Io {
                        what: format!("admin listener on {addr}"),
                        source,
                    },
                )?),
                None => None,
            };
        let (node, control) = match source {
            AssignmentSource::Static => (Node::start(config).await?, Control::Static),
            #[cfg(feature = "etcd")]
            AssignmentSource::Etcd(etcd) => start_on_etcd(config, etcd).await?,
            #[cfg(not(feature = "etcd"))]
            AssignmentSource::Etcd(_) => return Err(ProcessError::EtcdNotBuilt),
        };
        let mut process = Self {
            node,
            admin: None,
            control,
            signals,
        };
        if let Some(listener) = admin {
            let at = listener.local_addr().ok();
            match AdminServer::start(listener, Arc::clone(&process.node)) {
                Ok(admin) => process.admin = Some(admin),
                Err(source) => {
                    process.stop().await;
                    return Err(ProcessError::Io {
                        what: format!("admin endpoint on {at:?}"),
                        source,
                    });
                }
            }
        }
        Ok(process)
    }

    /// The node.
    pub fn node(&self) -> &Arc<Node> {
        &self.node
    }

    /// Where the admin endpoint listens, if it runs.
    pub fn admin_addr(&self) -> Option<SocketAddr> {
        self.admin.as_ref().map(AdminServer::local_addr)
    }

    /// Serves until `SIGTERM` or `SIGINT` (one received while it started
    /// included), or until the control plane ends on its own; says which.
    pub async fn serve_until_signal(&mut self) -> Ended {
        tokio::select! {
            signal = self.signals.next() => Ended::Signal(signal),
            why = self.control.ended() => Ended::ControlPlane(why),
        }
    }

    /// Stops everything, in order: the control plane (writes fenced, the
    /// lease revoked), the admin endpoint (it holds the node), then the
    /// node (NBD answered, primaries checkpointed, volumes stopped).
    pub async fn stop(self) {
        self.control.stop().await;
        if let Some(admin) = &self.admin {
            admin.stop().await;
        }
        self.node.stop().await;
    }
}

/// The node of `config` on etcd: connected and its records read first,
/// its writes held to the lease, then followed.
#[cfg(feature = "etcd")]
async fn start_on_etcd(
    mut config: NodeConfig,
    etcd: EtcdSource,
) -> Result<(Arc<Node>, Control), ProcessError> {
    use crate::etcd::{ControlPlane, EtcdOptions};
    let options = EtcdOptions {
        endpoints: etcd.endpoints,
        lease_ttl: etcd.lease_ttl,
        progress_every: etcd.progress_every,
    };
    let plane = ControlPlane::connect(options, &mut config).await?;
    let started = Node::start_fenced(
        config,
        plane.fence(),
        Some(plane.describe()),
        Some(plane.terms()),
    )
    .await;
    let node = match started {
        Ok(node) => node,
        Err(e) => {
            plane.abandon().await;
            return Err(e.into());
        }
    };
    match plane.run(Arc::clone(&node)).await {
        Ok(running) => Ok((node, Control::Etcd(Box::new(running)))),
        Err(e) => {
            node.stop().await;
            Err(e.into())
        }
    }
}
