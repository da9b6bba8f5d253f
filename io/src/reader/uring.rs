//! The io_uring backend. One dedicated thread owns the ring and serves every
//! stream of its reader: it keeps up to `queue_depth` reads in flight,
//! round-robin across streams, emits each stream's batches in order, and
//! reuses buffers through the pool.
//!
//! Safety rule for the whole module: a buffer given to the kernel lives in
//! `ops` (heap memory that never moves) until its completion is reaped.
//! Streams are removed, and the thread exits, only when no read of theirs is
//! in flight, so no completion can ever land in freed memory.
#![allow(unsafe_code)]

use super::pool::BufferPool;
use super::{slice_batch, FrameBatch, ReaderCounters, ReaderError, StreamJob};
use bytes::{Bytes, BytesMut};
use io_uring::{opcode, types, IoUring};
use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::os::fd::AsRawFd;
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::mpsc::{self, TryRecvError};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;
use tokio::sync::mpsc::error::TrySendError;

/// Checks that io_uring works here: ring setup and one NOP round trip.
/// The error says why not, in words an operator can act on.
pub fn probe_uring() -> Result<(), String> {
    if let Ok(text) = std::fs::read_to_string("/proc/sys/kernel/io_uring_disabled") {
        if text.trim() == "2" {
            return Err("kernel.io_uring_disabled=2: io_uring is disabled system-wide".into());
        }
    }
    let mut ring = IoUring::new(4).map_err(|e| describe_setup_error(&e))?;
    let nop = opcode::Nop::new().build().user_data(7);
    // SAFETY: a NOP references no memory.
    unsafe { ring.submission().push(&nop) }.map_err(|_| "submission queue full".to_owned())?;
    ring.submit_and_wait(1)
        .map_err(|e| format!("io_uring_enter failed: {e}"))?;
    let completed = ring.completion().next().map(|c| c.result());
    match completed {
        Some(result) if result >= 0 => Ok(()),
        Some(result) => Err(format!(
            "NOP completed with {}",
            std::io::Error::from_raw_os_error(-result)
        )),
        None => Err("NOP produced no completion".into()),
    }
}

fn describe_setup_error(error: &std::io::Error) -> String {
    match error.raw_os_error() {
        Some(libc::EPERM) => {
            "EPERM from io_uring_setup: blocked by a seccomp/container policy, or \
                              kernel.io_uring_disabled=1 for this user"
                .into()
        }
        Some(libc::ENOSYS) => "ENOSYS: this kernel has no io_uring".into(),
        Some(libc::ENOMEM) => "ENOMEM: RLIMIT_MEMLOCK too low to map the ring".into(),
        _ => format!("io_uring_setup failed: {error}"),
    }
}

enum Request {
    Stream(StreamJob),
    Shutdown,
}

/// Handle to the ring thread. Dropping it stops the thread after every
/// in-flight read completed.
pub(crate) struct UringWorker {
    tx: mpsc::Sender<Request>,
    thread: Option<JoinHandle<()>>,
}

impl UringWorker {
    pub(crate) fn start(
        queue_depth: usize,
        pool: Arc<BufferPool>,
        counters: Arc<ReaderCounters>,
    ) -> Result<Self, ReaderError> {
        let depth = queue_depth.max(1);
        let ring = IoUring::new((depth as u32 * 2).next_power_of_two().max(8))
            .map_err(|e| ReaderError::UringUnavailable(describe_setup_error(&e)))?;
        let (tx, rx) = mpsc::channel();
        counters.threads.fetch_add(1, Ordering::AcqRel);
        let thread_counters = Arc::clone(&counters);
        let thread = std::thread::Builder::new()
            .name("walship-uring".into())
            .spawn(move || {
                let worker = Worker {
                    ring,
                    depth,
                    pool,
                    counters: Arc::clone(&thread_counters),
                    streams: BTreeMap::new(),
                    ops: HashMap::new(),
                    next_stream: 0,
                    next_op: 0,
                    shutting_down: false,
                };
                worker.run(rx);
                thread_counters.threads.fetch_sub(1, Ordering::AcqRel);
            })
            .map_err(|e| {
                counters.threads.fetch_sub(1, Ordering::AcqRel);
                ReaderError::Backend(format!("spawn io_uring thread: {e}"))
            })?;
        Ok(Self {
            tx,
            thread: Some(thread),
        })
    }

    pub(crate) fn submit(&self, job: StreamJob) -> Result<(), ReaderError> {
        self.tx
            .send(Request::Stream(job))
            .map_err(|_| ReaderError::Backend("io_uring thread has stopped".into()))
    }
}

impl Drop for UringWorker {
    fn drop(&mut self) {
        let _ = self.tx.send(Request::Shutdown);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

struct ActiveStream {
    job: StreamJob,
    next_submit: usize,
    next_emit: usize,
    inflight: usize,
    ready: BTreeMap<usize, Result<Bytes, ReaderError>>,
    unsent: Option<Result<FrameBatch, ReaderError>>,
    files: HashMap<Arc<PathBuf>, File>,
    stopped: bool,
}

impl ActiveStream {
    fn finished(&self) -> bool {
        let all_sent = self.next_emit == self.job.chunks.len() && self.unsent.is_none();
        self.inflight == 0 && (self.stopped || all_sent)
    }
}

struct Op {
    stream: u64,
    chunk: usize,
    buf: BytesMut,
}

struct Worker {
    ring: IoUring,
    depth: usize,
    pool: Arc<BufferPool>,
    counters: Arc<ReaderCounters>,
    streams: BTreeMap<u64, ActiveStream>,
    ops: HashMap<u64, Op>,
    next_stream: u64,
    next_op: u64,
    shutting_down: bool,
}

impl Worker {
    fn run(mut self, rx: mpsc::Receiver<Request>) {
        loop {
            if !self.intake(&rx) {
                break;
            }
            // Refill the ring first, so reads are in flight while the
            // completed chunks are checked and sent.
            self.submit();
            self.emit();
            self.submit();
            self.retire();
            if self.shutting_down && self.ops.is_empty() && self.streams.is_empty() {
                break;
            }
            if !self.ops.is_empty() {
                self.reap();
            } else if !self.streams.is_empty() {
                // Every live stream waits for its consumer to make room.
                std::thread::park_timeout(Duration::from_micros(200));
            }
        }
    }

    /// Takes new requests; blocks when idle. Returns false to exit.
    fn intake(&mut self, rx: &mpsc::Receiver<Request>) -> bool {
        if self.streams.is_empty() && self.ops.is_empty() && !self.shutting_down {
            match rx.recv() {
                Ok(Request::Stream(job)) => self.add(job),
                Ok(Request::Shutdown) | Err(_) => return false,
            }
        }
        loop {
            match rx.try_recv() {
                Ok(Request::Stream(job)) => self.add(job),
                Ok(Request::Shutdown) | Err(TryRecvError::Disconnected) => {
                    self.shutting_down = true;
                    for stream in self.streams.values_mut() {
                        stream.stopped = true;
                    }
                    return true;
                }
                Err(TryRecvError::Empty) => return true,
            }
        }
    }

    fn add(&mut self, job: StreamJob) {
        self.counters.streams.fetch_add(1, Ordering::AcqRel);
        let stream = ActiveStream {
            job,
            next_submit: 0,
            next_emit: 0,
            inflight: 0,
            ready: BTreeMap::new(),
            unsent: None,
            files: HashMap::new(),
            stopped: self.shutting_down,
        };
        self.streams.insert(self.next_stream, stream);
        self.next_stream += 1;
    }

    /// Sends every batch that is next in order and fits in its channel.
    fn emit(&mut self) {
        for stream in self.streams.values_mut() {
            if stream.job.cancel.load(Ordering::Acquire) || stream.job.out.is_closed() {
                stream.stopped = true;
            }
            if stream.stopped {
                stream.ready.clear();
                stream.unsent = None;
                continue;
            }
            loop {
                let batch = match stream.unsent.take() {
                    Some(batch) => batch,
                    None => {
                        let Some(data) = stream.ready.remove(&stream.next_emit) else {
                            break;
                        };
                        let chunk = &stream.job.chunks[stream.next_emit];
                        stream.next_emit += 1;
                        data.and_then(|bytes| {
                            self.pool.lend(&bytes);
                            slice_batch(chunk, bytes)
                        })
                    }
                };
                let failed = batch.is_err();
                match stream.job.out.try_send(batch) {
                    Ok(()) if failed => {
                        stream.stopped = true;
                        break;
                    }
                    Ok(()) => {}
                    Err(TrySendError::Full(batch)) => {
                        stream.unsent = Some(batch);
                        break;
                    }
                    Err(TrySendError::Closed(_)) => {
                        stream.stopped = true;
                        break;
                    }
                }
            }
        }
    }

    /// Submits reads round-robin until `depth` are in flight.
    fn submit(&mut self) {
        let mut total: usize = self.streams.values().map(|s| s.inflight).sum();
        let mut progressed = true;
        while total < self.depth && progressed {
            progressed = false;
            for (&id, stream) in self.streams.iter_mut() {
                if total >= self.depth {
                    break;
                }
                let more = stream.next_submit < stream.job.chunks.len();
                let waiting = stream.ready.len() + usize::from(stream.unsent.is_some());
                if stream.stopped || !more || stream.inflight >= self.depth || waiting >= self.depth
                {
                    continue;
                }
                let index = stream.next_submit;
                let chunk = &stream.job.chunks[index];
                let fd = match stream.files.get(&chunk.path) {
                    Some(file) => file.as_raw_fd(),
                    None => match File::open(chunk.path.as_ref()) {
                        Ok(file) => {
                            let fd = file.as_raw_fd();
                            stream.files.insert(Arc::clone(&chunk.path), file);
                            fd
                        }
                        Err(_) => {
                            let missing = ReaderError::SegmentMissing(chunk.path.to_path_buf());
                            stream.ready.insert(index, Err(missing));
                            stream.next_submit = stream.job.chunks.len();
                            continue;
                        }
                    },
                };
                let mut buf = self.pool.take(chunk.len);
                let user_data = self.next_op;
                let entry = opcode::Read::new(types::Fd(fd), buf.as_mut_ptr(), chunk.len as u32)
                    .offset(chunk.offset)
                    .build()
                    .user_data(user_data);
                // SAFETY: `buf` is moved into `self.ops` below and stays there,
                // unmoved on the heap, until this read's completion is reaped;
                // the file stays open in `stream.files` until the stream retires,
                // which waits for inflight == 0.
                let pushed = unsafe { self.ring.submission().push(&entry) };
                if pushed.is_err() {
                    self.pool.give_back(buf);
                    if self.ring.submit().is_err() {
                        return;
                    }
                    continue;
                }
                self.ops.insert(
                    user_data,
                    Op {
                        stream: id,
                        chunk: index,
                        buf,
                    },
                );
                self.next_op += 1;
                stream.next_submit += 1;
                stream.inflight += 1;
                total += 1;
                progressed = true;
                self.counters.inflight.fetch_add(1, Ordering::AcqRel);
            }
        }
    }

    /// Waits for at least one completion and files every completion reaped.
    fn reap(&mut self) {
        if let Err(error) = self.ring.submit_and_wait(1) {
            // EINTR and EBUSY are retried at once; anything else is retried
            // after a pause: buffers in flight cannot be freed until the
            // kernel gives them back, so giving up is not an option.
            if !matches!(error.raw_os_error(), Some(libc::EINTR | libc::EBUSY)) {
                std::thread::sleep(Duration::from_millis(1));
            }
        }
        let completions: Vec<(u64, i32)> = self
            .ring
            .completion()
            .map(|c| (c.user_data(), c.result()))
            .collect();
        for (user_data, result) in completions {
            let Some(Op { stream, chunk, buf }) = self.ops.remove(&user_data) else {
                continue;
            };
            self.counters.inflight.fetch_sub(1, Ordering::AcqRel);
            let Some(active) = self.streams.get_mut(&stream) else {
                self.pool.give_back(buf);
                continue;
            };
            active.inflight -= 1;
            if active.stopped {
                self.pool.give_back(buf);
                continue;
            }
            let plan = &active.job.chunks[chunk];
            let outcome = if result < 0 {
                self.pool.give_back(buf);
                Err(ReaderError::Read {
                    path: plan.path.to_path_buf(),
                    offset: plan.offset,
                    source: std::io::Error::from_raw_os_error(-result),
                })
            } else if result as usize != plan.len {
                self.pool.give_back(buf);
                Err(ReaderError::ShortRead {
                    path: plan.path.to_path_buf(),
                    offset: plan.offset,
                    wanted: plan.len,
                    got: result as usize,
                })
            } else {
                Ok(buf.freeze())
            };
            active.ready.insert(chunk, outcome);
        }
    }

    /// Drops streams that are done and have nothing in flight.
    fn retire(&mut self) {
        let done: Vec<u64> = self
            .streams
            .iter()
            .filter(|(_, s)| s.finished())
            .map(|(id, _)| *id)
            .collect();
        for id in done {
            self.streams.remove(&id);
            self.counters.streams.fetch_sub(1, Ordering::AcqRel);
        }
    }
}
