//! The log reader: streams WAL frame batches for `(from, to]`.
//!
//! Every batch is one read buffer holding whole frames (the WAL plans reads at
//! frame boundaries), so frames are zero-copy slices of it, and `raw` can be
//! forwarded to the wire as is. Every frame's crc and LSN order are checked.
//!
//! Two backends pass the same tests:
//! - **io_uring**: one dedicated thread owns the ring, multiplexes streams and
//!   keeps up to `queue_depth` reads in flight;
//! - **pread**: `FileExt::read_at` on a thread per stream.
//!
//! [`BackendRequest::Auto`] picks pread, measured faster on the project's
//! machine for one stream and for many (see `ReaderService::start`); every
//! service records which backend runs and why. Dropping a [`FrameStream`] cancels it: no more reads
//! are issued, in-flight reads are reaped before their buffers are freed or
//! reused, and the stream's thread or slot ends.

mod pool;
mod pread;
mod uring;

use crate::frame::{self, Frame, FrameError};
use crate::wal::{ReadChunk, Wal, WalError};
use bytes::Bytes;
use pool::BufferPool;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use tokio::sync::mpsc;

pub use uring::probe_uring;

/// Which backend to use.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum BackendRequest {
    /// The backend measured faster for catch-up streams: pread (BENCHMARKS,
    /// P3).
    Auto,
    /// io_uring or an error.
    Uring,
    /// Positional reads.
    Pread,
}

/// The backend in use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    /// io_uring.
    Uring,
    /// Positional reads.
    Pread,
}

/// Which backend runs and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BackendChoice {
    /// The backend.
    pub backend: Backend,
    /// Why: the probe's result, or "requested".
    pub reason: String,
}

/// Reader tuning.
#[derive(Debug, Clone)]
pub struct ReaderOptions {
    /// Target read size; chunks hold whole frames.
    pub chunk_bytes: usize,
    /// io_uring reads in flight (and completed-but-unsent batches) per reader.
    pub queue_depth: usize,
    /// Batches buffered between a stream's backend and its consumer.
    pub stream_buffer: usize,
    /// Treat io_uring as unavailable with this reason (operators set
    /// `WALSHIP_DISABLE_IO_URING`; tests set this field).
    pub uring_disabled: Option<String>,
}

impl Default for ReaderOptions {
    fn default() -> Self {
        Self {
            chunk_bytes: 1 << 20,
            queue_depth: 8,
            stream_buffer: 4,
            uring_disabled: std::env::var_os("WALSHIP_DISABLE_IO_URING")
                .map(|_| "disabled by WALSHIP_DISABLE_IO_URING".to_owned()),
        }
    }
}

/// A read that failed.
#[derive(Debug, thiserror::Error)]
pub enum ReaderError {
    /// The range cannot be planned (recycled, beyond head).
    #[error(transparent)]
    Range(#[from] WalError),
    /// io_uring was requested but cannot run here.
    #[error("io_uring unavailable: {0}")]
    UringUnavailable(String),
    /// A segment disappeared before it was read.
    #[error("segment {0} is gone (recycled or deleted mid-read)")]
    SegmentMissing(PathBuf),
    /// The read itself failed.
    #[error("read {path} at {offset}: {source}")]
    Read {
        /// Segment.
        path: PathBuf,
        /// Offset.
        offset: u64,
        /// OS error.
        #[source]
        source: std::io::Error,
    },
    /// The file ended before the planned frames (truncated under the reader).
    #[error("short read of {path} at {offset}: wanted {wanted}, got {got}")]
    ShortRead {
        /// Segment.
        path: PathBuf,
        /// Offset.
        offset: u64,
        /// Bytes planned.
        wanted: usize,
        /// Bytes read.
        got: usize,
    },
    /// A frame failed its checks.
    #[error("corrupt frame in {path} near offset {offset}, lsn {lsn}: {error}")]
    Corrupt {
        /// Segment.
        path: PathBuf,
        /// Offset of the chunk.
        offset: u64,
        /// LSN expected.
        lsn: u64,
        /// What was wrong.
        error: FrameError,
    },
    /// The backend thread could not be started or has stopped.
    #[error("reader backend unavailable: {0}")]
    Backend(String),
}

/// Whole frames read in one go.
#[derive(Debug, Clone)]
pub struct FrameBatch {
    /// First LSN.
    pub first_lsn: u64,
    /// Last LSN.
    pub last_lsn: u64,
    /// The encoded frames, exactly as on disk.
    pub raw: Bytes,
    /// The frames, sliced from `raw`.
    pub frames: Vec<Frame>,
}

/// Live counters of a reader, for leak checks and metrics.
#[derive(Debug, Default)]
pub(crate) struct ReaderCounters {
    pub(crate) inflight: AtomicI64,
    pub(crate) streams: AtomicI64,
    pub(crate) threads: AtomicI64,
}

/// A snapshot of a reader's counters.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReaderStats {
    /// Reads submitted and not yet completed.
    pub inflight_reads: i64,
    /// Streams still running.
    pub active_streams: i64,
    /// Backend threads alive (the io_uring worker, pread stream threads).
    pub threads: i64,
    /// Read buffers handed to consumers and not yet returned.
    pub buffers_lent: usize,
    /// Read buffers waiting for reuse.
    pub buffers_free: usize,
}

/// Checks a read buffer against its plan and slices its frames.
pub(crate) fn slice_batch(chunk: &ReadChunk, data: Bytes) -> Result<FrameBatch, ReaderError> {
    let corrupt = |lsn, error| ReaderError::Corrupt {
        path: chunk.path.to_path_buf(),
        offset: chunk.offset,
        lsn,
        error,
    };
    let frames = frame::decode_all(&data, chunk.first_lsn).map_err(|(lsn, e)| corrupt(lsn, e))?;
    let last = frames
        .last()
        .map_or(chunk.first_lsn.wrapping_sub(1), |f| f.lsn);
    if last != chunk.last_lsn {
        let error = FrameError::Discontinuity {
            expected: chunk.last_lsn,
            found: last,
        };
        return Err(corrupt(last + 1, error));
    }
    Ok(FrameBatch {
        first_lsn: chunk.first_lsn,
        last_lsn: chunk.last_lsn,
        raw: data,
        frames,
    })
}

pub(crate) type BatchSender = mpsc::Sender<Result<FrameBatch, ReaderError>>;

/// Everything a backend needs to run one stream.
pub(crate) struct StreamJob {
    pub(crate) chunks: Vec<ReadChunk>,
    /// The WAL's file system (the pread backend opens its segments through it).
    pub(crate) fs: crate::fs::FsRef,
    pub(crate) out: BatchSender,
    pub(crate) cancel: Arc<AtomicBool>,
}

/// A stream of frame batches. Dropping it cancels the read.
#[derive(Debug)]
pub struct FrameStream {
    rx: mpsc::Receiver<Result<FrameBatch, ReaderError>>,
    cancel: Arc<AtomicBool>,
}

impl FrameStream {
    /// The next batch, `None` at the end. An error ends the stream.
    pub async fn next_batch(&mut self) -> Option<Result<FrameBatch, ReaderError>> {
        self.rx.recv().await
    }

    /// The next batch, blocking the calling (non-async) thread.
    pub fn blocking_next(&mut self) -> Option<Result<FrameBatch, ReaderError>> {
        self.rx.blocking_recv()
    }
}

impl futures_core::Stream for FrameStream {
    type Item = Result<FrameBatch, ReaderError>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        self.rx.poll_recv(cx)
    }
}

impl Drop for FrameStream {
    fn drop(&mut self) {
        self.cancel.store(true, Ordering::Release);
    }
}

enum Engine {
    Uring(uring::UringWorker),
    Pread,
}

/// The reading machinery (backend thread, buffer pool, counters), shareable
/// by the readers of many WALs: a runtime with many volumes runs one io_uring
/// worker, not one per volume.
pub struct ReaderService {
    options: ReaderOptions,
    choice: BackendChoice,
    engine: Engine,
    pool: Arc<BufferPool>,
    counters: Arc<ReaderCounters>,
}

impl std::fmt::Debug for ReaderService {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ReaderService")
            .field("choice", &self.choice)
            .finish_non_exhaustive()
    }
}

impl ReaderService {
    /// Starts the requested backend (probing io_uring when it is asked for).
    pub fn start(
        request: BackendRequest,
        options: ReaderOptions,
    ) -> Result<Arc<Self>, ReaderError> {
        let probe = || match &options.uring_disabled {
            Some(reason) => Err(reason.clone()),
            None => probe_uring(),
        };
        let choice = match request {
            BackendRequest::Pread => BackendChoice {
                backend: Backend::Pread,
                reason: "requested".into(),
            },
            BackendRequest::Uring => match probe() {
                Ok(()) => BackendChoice {
                    backend: Backend::Uring,
                    reason: "requested; probe ok".into(),
                },
                Err(reason) => return Err(ReaderError::UringUnavailable(reason)),
            },
            // Measured on the project's 2-core machine (BENCHMARKS, P3):
            // buffered io_uring reads complete, page cache copy included,
            // on the one worker thread that reaps them, while pread copies
            // on each stream's thread. One cold stream: 0.90x pread; 16
            // at once: 0.79-0.88x, 1.1-1.5x the CPU per GiB.
            BackendRequest::Auto => BackendChoice {
                backend: Backend::Pread,
                reason: "auto: pread (faster than io_uring for one catch-up stream and for 16 at once; io_uring on request)".into(),
            },
        };
        let counters = Arc::new(ReaderCounters::default());
        let pool = Arc::new(BufferPool::new(
            options.queue_depth * 2 + options.stream_buffer,
        ));
        let engine = match choice.backend {
            Backend::Uring => Engine::Uring(uring::UringWorker::start(
                options.queue_depth,
                Arc::clone(&pool),
                Arc::clone(&counters),
            )?),
            Backend::Pread => Engine::Pread,
        };
        Ok(Arc::new(Self {
            options,
            choice,
            engine,
            pool,
            counters,
        }))
    }

    /// Which backend runs and why.
    pub fn choice(&self) -> &BackendChoice {
        &self.choice
    }

    /// Counters for leak checks; also returns unused lent buffers to the pool.
    pub fn stats(&self) -> ReaderStats {
        self.pool.reclaim();
        ReaderStats {
            inflight_reads: self.counters.inflight.load(Ordering::Acquire),
            active_streams: self.counters.streams.load(Ordering::Acquire),
            threads: self.counters.threads.load(Ordering::Acquire),
            buffers_lent: self.pool.lent(),
            buffers_free: self.pool.free(),
        }
    }

    fn stream(&self, wal: &Wal, from: u64, to: u64) -> Result<FrameStream, ReaderError> {
        let chunks = wal.plan_read(from, to, self.options.chunk_bytes)?;
        let (out, rx) = mpsc::channel(self.options.stream_buffer.max(1));
        let cancel = Arc::new(AtomicBool::new(false));
        let job = StreamJob {
            chunks,
            fs: Arc::clone(wal.fs()),
            out,
            cancel: Arc::clone(&cancel),
        };
        match &self.engine {
            // io_uring opens descriptors of the real file system.
            Engine::Uring(worker) if wal.fs().is_real() => worker.submit(job)?,
            _ => pread::spawn(job, Arc::clone(&self.pool), Arc::clone(&self.counters))?,
        }
        Ok(FrameStream { rx, cancel })
    }
}

/// Reads one WAL's ranges through a [`ReaderService`].
#[derive(Debug)]
pub struct LogReader {
    wal: Wal,
    service: Arc<ReaderService>,
}

impl LogReader {
    /// A reader over `wal` with a service of its own.
    pub fn open(
        wal: Wal,
        request: BackendRequest,
        options: ReaderOptions,
    ) -> Result<Self, ReaderError> {
        Ok(Self::with_service(
            wal,
            ReaderService::start(request, options)?,
        ))
    }

    /// A reader over `wal` sharing `service` with other readers.
    pub fn with_service(wal: Wal, service: Arc<ReaderService>) -> Self {
        Self { wal, service }
    }

    /// Which backend runs and why.
    pub fn choice(&self) -> &BackendChoice {
        self.service.choice()
    }

    /// Streams the frames `(from, to]`. A recycled or out-of-range request fails here.
    pub fn stream(&self, from: u64, to: u64) -> Result<FrameStream, ReaderError> {
        self.service.stream(&self.wal, from, to)
    }

    /// The service's counters (shared with its other readers).
    pub fn stats(&self) -> ReaderStats {
        self.service.stats()
    }
}
