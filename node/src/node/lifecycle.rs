//! A node's life: its volumes opened (each in the term it chose), the
//! NBD listener started; and its stop. (The admin endpoint, which holds
//! the node, is the [`NodeProcess`](crate::NodeProcess)'s.)

use super::*;
use futures::StreamExt;

/// Assignments read and persisted at once while a node starts (each its
/// own fsyncs; 4 to 16 at once made them 2 to 2.5 times faster on this
/// machine's disk than one at a time).
const ASSIGNMENTS_AT_ONCE: usize = 16;
/// Volumes opened at once while a node starts (their stores created or
/// opened on blocking threads).
const VOLUMES_AT_ONCE: usize = 16;

impl Node {
    /// Starts every volume of `config`, the replication listener and the
    /// NBD server. Refuses a config the stores on disk contradict.
    pub async fn start(config: NodeConfig) -> Result<Arc<Self>, NodeError> {
        Self::start_fenced(config, Arc::new(WriteFence::open()), None, None).await
    }

    /// [`start`](Self::start), with NBD clients' writes acknowledged only
    /// while `fence` allows them (a control plane's lease), assignments
    /// from `control_plane` (named: `etcd at URL`) rather than the admin
    /// API, when there is one, and every term a primary opens in recorded
    /// with `terms` (the control plane's) before any replica hears it.
    pub async fn start_fenced(
        config: NodeConfig,
        fence: Arc<WriteFence>,
        control_plane: Option<String>,
        terms: Option<Arc<dyn TermKeeper>>,
    ) -> Result<Arc<Self>, NodeError> {
        if config.admin.is_some() {
            // Before any actor registers a metric with the recorder.
            crate::admin::prometheus();
        }
        walship_io::durable::create_dir_all(&config.data_dir)
            .map_err(io(format!("create {}", config.data_dir.display())))?;
        let data_dir_lock = lock_data_dir(&config.data_dir).await?;
        let runtime = Runtime::start().map_err(|source| NodeError::Volume {
            volume: "(runtime)".into(),
            source,
        })?;
        let recovery = runtime.recovery();
        recovery.set_limits(config.recovery).map_err(|e| {
            NodeError::Config(crate::config::ConfigError::Invalid {
                file: config.file.clone(),
                line: 0,
                what: format!("[recovery]: {e}"),
            })
        })?;
        let listener = runtime
            .replication_listener(&config.cluster, &config.replication.to_string())
            .map_err(|source| NodeError::Volume {
                volume: "(replication listener)".into(),
                source,
            })?;
        // Open before the volumes: a hello for one still opening waits.
        listener.wait_for_volumes();
        let mut node = Self {
            recovery,
            runtime: Mutex::new(Some(Arc::new(runtime))),
            listener,
            table: Arc::default(),
            changing: tokio::sync::RwLock::new(()),
            stopped: std::sync::atomic::AtomicBool::new(false),
            change_locks: assign::ChangeLocks::default(),
            nbd: Mutex::new(None),
            nbd_addr: None,
            data_dir_lock: Mutex::new(Some(data_dir_lock)),
            control_decisions: Mutex::default(),
            replica_states: Arc::default(),
            control_plane,
            terms,
            config,
        };
        // Each volume's assignment is read and persisted (fsyncs) on a
        // blocking thread, several at once: one after the other, 10,000
        // volumes took 20 s of a node's start (three nodes on one disk).
        let node_name = node.config.node.clone();
        let persisted: Vec<_> = futures::stream::iter(node.config.volumes.clone())
            .map(|spec| {
                let dir = node.volume_dir(&spec.name);
                let me = node_name.clone();
                async move {
                    let started = tokio::task::spawn_blocking({
                        let spec = spec.clone();
                        move || assignment::start(&dir, &me, &spec)
                    })
                    .await;
                    (spec, started)
                }
            })
            .buffered(ASSIGNMENTS_AT_ONCE)
            .collect()
            .await;
        let mut startings = Vec::new();
        for (spec, started) in persisted {
            let started = started.unwrap_or_else(|e| Err(StartError::Io(std::io::Error::other(e))));
            let starting = match started {
                Ok(starting) => starting,
                Err(e) => {
                    node.stop().await;
                    return Err(match e {
                        StartError::Io(e) => io(format!("assignment of {}", spec.name))(e),
                        refusal => NodeError::Config(ConfigError::Invalid {
                            file: node.config.file.clone(),
                            line: spec.line,
                            what: refusal.to_string(),
                        }),
                    });
                }
            };
            tracing::info!(volume = %spec.name, epoch = starting.applied.epoch,
                primary = %starting.applied.primary, "assignment: {}", starting.reason);
            startings.push((spec, starting.applied));
        }
        // Replicas first: a primary peers with its replicas before it
        // serves, and another node's primary may be waiting for ours.
        // Within each, several at once: a store created is its fsyncs, on
        // a blocking thread (one after the other, 10,000 took a minute).
        let me = node.config.node.clone();
        let (replicas, primaries): (Vec<_>, Vec<_>) = startings
            .into_iter()
            .partition(|(_, applied)| !applied.is_primary(&me));
        for group in [replicas, primaries] {
            // Once one fails, no other starts opening (those opening
            // finish, and are stopped with the rest); the failure said is
            // the earliest in the config's order of those tried.
            let failing = std::sync::atomic::AtomicBool::new(false);
            let opened: Vec<_> = futures::stream::iter(group.into_iter().enumerate())
                .map(|(at, (spec, applied))| {
                    let (node, failing) = (&node, &failing);
                    async move {
                        if failing.load(std::sync::atomic::Ordering::SeqCst) {
                            return (at, spec, applied, None);
                        }
                        let opened = node.open(&spec, &applied).await;
                        if opened.is_err() {
                            failing.store(true, std::sync::atomic::Ordering::SeqCst);
                        }
                        (at, spec, applied, Some(opened))
                    }
                })
                .buffer_unordered(VOLUMES_AT_ONCE)
                .collect()
                .await;
            let mut failed: Option<(usize, NodeError)> = None;
            for (at, spec, applied, opened) in opened {
                match opened {
                    Some(Ok(handle)) => node.table.put(Hosted {
                        spec,
                        applied,
                        handle,
                    }),
                    Some(Err(e)) if failed.as_ref().is_none_or(|(first, _)| at < *first) => {
                        failed = Some((at, e));
                    }
                    Some(Err(_)) | None => {}
                }
            }
            if let Some((_, e)) = failed {
                node.stop().await;
                return Err(e);
            }
        }
        node.listener.volumes_started();
        if let Some(addr) = node.config.nbd {
            let exports = Arc::new(NodeExports {
                node: node.config.node.clone(),
                table: Arc::clone(&node.table),
                fence,
            });
            let volumes = node.runtime().ok().map(|runtime| runtime.volume_thread());
            let started = match (tokio::net::TcpListener::bind(addr).await, volumes) {
                (Ok(listener), Some(volumes)) => NbdServer::start(listener, exports, volumes),
                (Err(e), _) => Err(e),
                (Ok(_), None) => Err(std::io::Error::other("the runtime has stopped")),
            };
            match started {
                Ok(server) => {
                    node.nbd_addr = Some(server.local_addr());
                    node.nbd = Mutex::new(Some(Arc::new(server)));
                }
                Err(e) => {
                    node.stop().await;
                    return Err(io(format!("nbd listener on {addr}"))(e));
                }
            }
        }
        Ok(Arc::new(node))
    }

    /// Opens `spec`'s volume in the role `applied` gives this node. A
    /// primary peers with its replicas first (see `walship_engine::
    /// decide_peering`, after this returns: the handle's requests wait for
    /// it); the term it chooses is persisted in the volume's assignment
    /// before any replica hears it.
    pub(super) async fn open(
        &self,
        spec: &VolumeSpec,
        applied: &Applied,
    ) -> Result<VolumeHandle, NodeError> {
        let config = &self.config;
        let store = StoreOptions {
            segment_bytes: config.tuning.segment_bytes,
            // The node's lock on its data dir covers every store, and the
            // node never opens a store before its previous instance stopped.
            lock: false,
            ..StoreOptions::new(spec.blocks())
        };
        let dir = self.volume_dir(&spec.name).join("store");
        let volume = if applied.is_primary(&config.node) {
            // The newest term the control plane knows was used: one this
            // node's disk may have lost, or another node's.
            let floor = match &self.terms {
                Some(terms) => terms
                    .newest(&spec.name)
                    .await
                    .map_err(io(format!("read the newest term of {}", spec.name)))?,
                None => 0,
            };
            let replicas = applied
                .replicas
                .iter()
                .map(|(server, endpoint)| {
                    ReplicaSpec::new(server.clone(), endpoint.addr.clone(), endpoint.version)
                })
                .collect();
            let peering = Peering::enabled(
                Applied::term_ceiling(applied.epoch),
                Some(self.persist_term(&spec.name, applied)),
            )
            .with_term_floor(floor);
            let primary = PrimaryConfig::new(
                (config.cluster.clone(), spec.name.clone()),
                dir,
                store,
                applied.term(),
                applied.commit_mode,
                replicas,
            );
            VolumeConfig::Primary(
                primary
                    .with_server(config.node.clone())
                    .with_tuning(config.tuning.tuning())
                    .with_replica_states(self.replica_states.signal(&spec.name))
                    .with_peering(peering),
            )
        } else {
            let replica = ReplicaConfig::new(
                (
                    config.cluster.clone(),
                    spec.name.clone(),
                    config.node.clone(),
                ),
                dir,
                store,
                Listen::Shared(self.listener.clone()),
            );
            VolumeConfig::Replica(
                replica.with_checkpoint_every_lsns(config.tuning.tuning().checkpoint_every_lsns),
            )
        };
        let spawned = match self.runtime() {
            Ok(runtime) => runtime.spawn_volume(volume).await,
            Err(e) => Err(e),
        };
        spawned.map_err(|source| match source {
            VolumeError::Store(StoreError::SizeMismatch {
                on_disk,
                configured,
            }) => NodeError::Config(ConfigError::Invalid {
                file: config.file.clone(),
                line: spec.size_line,
                what: format!(
                    "volume {}: size {} bytes, but its store on disk holds {} bytes",
                    spec.name,
                    configured * walship_io::BLOCK_SIZE as u64,
                    on_disk * walship_io::BLOCK_SIZE as u64
                ),
            }),
            source => NodeError::Volume {
                volume: spec.name.clone(),
                source,
            },
        })
    }

    /// What persists a term peering chose for `volume`: its assignment,
    /// with the term's incarnation, replaced durably, then the control
    /// plane's record of terms, if there is one.
    /// The assignment on disk is read again when the term is chosen: a
    /// newer one may have been persisted meanwhile, and is never replaced
    /// by the one this opening started with.
    pub(super) fn persist_term(&self, volume: &str, applied: &Applied) -> TermChosen {
        let dir = self.volume_dir(volume);
        let applied = applied.clone();
        let (volume, terms) = (volume.to_owned(), self.terms.clone());
        TermChosen(Arc::new(move |term| {
            let (dir, applied) = (dir.clone(), applied.clone());
            // The file's fsyncs block: off the volume's thread.
            let local = tokio::task::spawn_blocking(move || {
                let loaded = assignment::load(&dir)?;
                let mut chosen = loaded.clone().unwrap_or(applied);
                if chosen.epoch != Applied::epoch_of(term) {
                    return Ok(());
                }
                chosen.incarnation = chosen.incarnation.max(Applied::incarnation_of(term));
                match loaded == Some(chosen.clone()) {
                    true => Ok(()),
                    false => assignment::save(&dir, &chosen),
                }
            });
            let recorded = terms.as_ref().map(|terms| terms.record(&volume, term));
            Box::pin(async move {
                local.await.map_err(std::io::Error::other)??;
                match recorded {
                    Some(recorded) => recorded.await,
                    None => Ok(()),
                }
            })
        }))
    }

    /// Stops the node (its admin endpoint, a [`NodeProcess`](crate::NodeProcess)'s, stopped
    /// first): the NBD server stops accepting and answers every
    /// request it read, each primary checkpoints what it holds (an fsync),
    /// then every volume stops, the replication listener closes, and the
    /// runtime ends. Returns when all of it has.
    pub async fn stop(&self) {
        let _no_more_changes = self.changing.write().await;
        self.stopped
            .store(true, std::sync::atomic::Ordering::SeqCst);
        // A primary still peering has nothing to checkpoint, and the NBD
        // requests waiting for it are answered ESHUTDOWN once it stops.
        for hosted in self.table.all() {
            if hosted.handle.is_peering() {
                hosted.handle.stop().await;
            }
        }
        let nbd = lock(&self.nbd).take();
        if let Some(nbd) = nbd {
            nbd.stop().await;
        }
        let volumes = self.table.all();
        for hosted in &volumes {
            if hosted.handle.is_primary() && !hosted.handle.is_stopping() {
                if let Err(e) = hosted.handle.checkpoint().await {
                    tracing::warn!(volume = %hosted.spec.name, error = %e, "final checkpoint");
                }
            }
        }
        self.listener.close().await;
        for hosted in &volumes {
            hosted.handle.stop().await;
        }
        let runtime = lock(&self.runtime).take();
        if let Some(runtime) = runtime {
            // The last clone's drop joins the runtime's thread: not on an
            // async worker.
            let _ = tokio::task::spawn_blocking(move || drop(runtime)).await;
        }
        lock(&self.data_dir_lock).take();
    }
}
