//! Threads shared by every volume of a runtime, for work that blocks on the
//! disk (WAL syncs, checkpoints) and for replica receivers.
//!
//! Volumes keep no threads of their own, so an idle volume costs memory, not
//! threads. Callers coalesce their own requests (at most one sync in flight
//! per volume), so a queue never holds more than one job per volume and kind.

use actix::{Arbiter, ArbiterHandle};
use std::collections::HashMap;
use std::collections::VecDeque;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, PoisonError};
use tokio_util::task::TaskTracker;
use walship_io::{BackendRequest, ReaderError, ReaderOptions, ReaderService};

type Job = Box<dyn FnOnce() + Send>;

/// A fixed set of threads running blocking jobs in submission order.
///
/// One queue under a mutex, idle threads on a condvar woken one per job:
/// a job wakes exactly one thread. (A shared `mpsc::Receiver` behind a
/// mutex woke two per job, the taker and the next thread queued on the
/// mutex: 2-3 context switches more per WAL sync, seen in P4.)
#[derive(Debug, Clone)]
pub(crate) struct BlockingPool {
    queue: Arc<JobQueue>,
    /// Shared by the handles only (not the threads): the last one to go
    /// closes the queue.
    _close: Arc<CloseOnDrop>,
}

#[derive(Default)]
struct JobQueue {
    jobs: Mutex<Jobs>,
    ready: Condvar,
}

impl std::fmt::Debug for JobQueue {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JobQueue").finish_non_exhaustive()
    }
}

#[derive(Default)]
struct Jobs {
    queue: VecDeque<Job>,
    /// Set when the last handle is dropped: threads finish what is queued
    /// and end.
    closed: bool,
}

impl JobQueue {
    fn lock(&self) -> std::sync::MutexGuard<'_, Jobs> {
        self.jobs.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The next job, waiting for one; `None` once closed and drained.
    fn next(&self) -> Option<Job> {
        let mut jobs = self.lock();
        loop {
            if let Some(job) = jobs.queue.pop_front() {
                return Some(job);
            }
            if jobs.closed {
                return None;
            }
            jobs = self
                .ready
                .wait(jobs)
                .unwrap_or_else(PoisonError::into_inner);
        }
    }
}

/// Closes the queue when the last pool handle goes.
#[derive(Debug)]
struct CloseOnDrop(Arc<JobQueue>);

impl Drop for CloseOnDrop {
    fn drop(&mut self) {
        self.0.lock().closed = true;
        self.0.ready.notify_all();
    }
}

impl BlockingPool {
    pub(crate) fn new(name: &str, threads: usize) -> std::io::Result<Self> {
        let queue = Arc::new(JobQueue::default());
        // Before the threads: if one fails to start, those started end.
        let close = Arc::new(CloseOnDrop(Arc::clone(&queue)));
        for i in 0..threads.max(1) {
            let queue = Arc::clone(&queue);
            std::thread::Builder::new()
                .name(format!("{name}-{i}"))
                .spawn(move || {
                    while let Some(job) = queue.next() {
                        job();
                    }
                })?;
        }
        Ok(Self {
            queue,
            _close: close,
        })
    }

    /// Whether jobs wait for a thread: a job that could go on may then
    /// queue its rest behind them instead.
    pub(crate) fn others_waiting(&self) -> bool {
        !self.queue.lock().queue.is_empty()
    }

    /// Runs `job` on a pool thread for a volume whose stop waits for it
    /// (`tasks`): the job holds one of its tokens until it ends. Dropped if
    /// the pool has shut down.
    pub(crate) fn run(&self, tasks: &TaskTracker, job: impl FnOnce() + Send + 'static) {
        let alive = tasks.token();
        let mut jobs = self.queue.lock();
        if jobs.closed {
            return;
        }
        jobs.queue.push_back(Box::new(move || {
            job();
            drop(alive);
        }));
        drop(jobs);
        self.queue.ready.notify_one();
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
    /// The recovery budget every catch-up and rebuild shares.
    pub(crate) recovery: crate::recovery::RecoveryBudget,
}

impl Pools {
    pub(crate) fn new(blocking: BlockingPool, receivers: ArbiterPool) -> Self {
        Self {
            blocking,
            receivers,
            readers: Arc::default(),
            links: Arc::new(crate::mux::PeerLinks::on(actix::Arbiter::new().handle())),
            recovery: crate::recovery::RecoveryBudget::default(),
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    /// Every job runs, those queued when the last handle goes included, and
    /// the threads end then (their clone of the queue is dropped).
    #[test]
    fn jobs_queued_before_the_last_handle_goes_still_run_and_the_threads_end() {
        let pool = BlockingPool::new("test-pool", 3).expect("pool");
        let queue = Arc::downgrade(&pool.queue);
        let tasks = TaskTracker::new();
        let (tx, rx) = std::sync::mpsc::channel();
        for i in 0..100 {
            let tx = tx.clone();
            pool.run(&tasks, move || {
                let _ = tx.send(i);
            });
        }
        drop(pool);
        let mut done: Vec<i32> = (0..100)
            .map(|_| rx.recv_timeout(Duration::from_secs(10)).expect("a job ran"))
            .collect();
        done.sort_unstable();
        assert_eq!(done, (0..100).collect::<Vec<_>>());
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while queue.strong_count() > 0 {
            assert!(
                std::time::Instant::now() < deadline,
                "pool threads still running"
            );
            std::thread::yield_now();
        }
    }
}
