//! Threads shared by every volume of a runtime, for work that blocks on the
//! disk (WAL syncs, checkpoints) and for replica receivers.
//!
//! Volumes keep no threads of their own, so an idle volume costs memory, not
//! threads. Callers coalesce their own requests (at most one sync in flight
//! per volume), so a queue never holds more than one job per volume and kind.

use actix::{Arbiter, ArbiterHandle};
use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc::{self, Receiver, Sender};
use std::sync::{Arc, Mutex, PoisonError};
use tokio_util::task::TaskTracker;
use walship_io::{BackendRequest, ReaderError, ReaderOptions, ReaderService};

type Job = Box<dyn FnOnce() + Send>;

/// A fixed set of threads running blocking jobs in submission order.
#[derive(Debug, Clone)]
pub(crate) struct BlockingPool {
    tx: Sender<Job>,
}

impl BlockingPool {
    pub(crate) fn new(name: &str, threads: usize) -> std::io::Result<Self> {
        let (tx, rx) = mpsc::channel::<Job>();
        let rx = Arc::new(Mutex::new(rx));
        for i in 0..threads.max(1) {
            let rx: Arc<Mutex<Receiver<Job>>> = Arc::clone(&rx);
            std::thread::Builder::new()
                .name(format!("{name}-{i}"))
                .spawn(move || loop {
                    let job = rx.lock().unwrap_or_else(PoisonError::into_inner).recv();
                    match job {
                        Ok(job) => job(),
                        Err(_) => return,
                    }
                })?;
        }
        Ok(Self { tx })
    }

    /// Runs `job` on a pool thread for a volume whose stop waits for it
    /// (`tasks`): the job holds one of its tokens until it ends. Dropped if
    /// the pool has shut down.
    pub(crate) fn run(&self, tasks: &TaskTracker, job: impl FnOnce() + Send + 'static) {
        let alive = tasks.token();
        let _ = self.tx.send(Box::new(move || {
            job();
            drop(alive);
        }));
    }
}

/// Arbiters (event-loop threads) shared by replica receivers, round-robin.
#[derive(Debug, Clone)]
pub(crate) struct ArbiterPool {
    arbiters: Arc<Vec<ArbiterHandle>>,
    next: Arc<AtomicUsize>,
}

impl ArbiterPool {
    /// Starts `count` arbiters; must run inside the actix system.
    pub(crate) fn new(count: usize) -> Self {
        let arbiters = (0..count.max(1)).map(|_| Arbiter::new().handle()).collect();
        Self {
            arbiters: Arc::new(arbiters),
            next: Arc::new(AtomicUsize::new(0)),
        }
    }

    pub(crate) fn pick(&self) -> &ArbiterHandle {
        let i = self.next.fetch_add(1, Ordering::Relaxed) % self.arbiters.len();
        &self.arbiters[i]
    }
}

/// Everything a volume borrows from its runtime.
#[derive(Debug, Clone)]
pub(crate) struct Pools {
    pub(crate) blocking: BlockingPool,
    pub(crate) receivers: ArbiterPool,
    /// One log reader service (one io_uring worker) per backend request.
    pub(crate) readers: Arc<Mutex<HashMap<BackendRequest, Arc<ReaderService>>>>,
    /// Multiplexed links to peer nodes, shared by every primary.
    pub(crate) links: Arc<crate::mux::PeerLinks>,
}

impl Pools {
    pub(crate) fn new(blocking: BlockingPool, receivers: ArbiterPool) -> Self {
        Self {
            blocking,
            receivers,
            readers: Arc::default(),
            links: Arc::default(),
        }
    }

    /// The runtime's reader service for `request`, started on first use.
    pub(crate) fn reader(
        &self,
        request: BackendRequest,
    ) -> Result<Arc<ReaderService>, ReaderError> {
        let mut readers = self.readers.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(service) = readers.get(&request) {
            return Ok(Arc::clone(service));
        }
        let service = ReaderService::start(request, ReaderOptions::default())?;
        readers.insert(request, Arc::clone(&service));
        Ok(service)
    }
}
