//! The positional-read backend: one thread per stream reads its chunks in
//! order with `read_exact_at` and sends batches, stopping as soon as the
//! consumer is gone or the stream is cancelled.

use super::pool::BufferPool;
use super::{slice_batch, ReaderCounters, ReaderError, StreamJob};
use crate::fs::FsFile;
use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::Arc;

struct ThreadGuard(Arc<ReaderCounters>);

impl Drop for ThreadGuard {
    fn drop(&mut self) {
        self.0.streams.fetch_sub(1, Ordering::AcqRel);
        self.0.threads.fetch_sub(1, Ordering::AcqRel);
    }
}

pub(crate) fn spawn(
    job: StreamJob,
    pool: Arc<BufferPool>,
    counters: Arc<ReaderCounters>,
) -> Result<(), ReaderError> {
    counters.streams.fetch_add(1, Ordering::AcqRel);
    counters.threads.fetch_add(1, Ordering::AcqRel);
    let guard = ThreadGuard(Arc::clone(&counters));
    std::thread::Builder::new()
        .name("walship-pread".into())
        .spawn(move || {
            let _guard = guard;
            run(job, &pool, &counters);
        })
        .map(|_| ())
        .map_err(|e| ReaderError::Backend(format!("spawn pread thread: {e}")))
}

fn run(job: StreamJob, pool: &BufferPool, counters: &ReaderCounters) {
    let mut files: HashMap<Arc<PathBuf>, Box<dyn FsFile>> = HashMap::new();
    for chunk in &job.chunks {
        if job.cancel.load(Ordering::Acquire) || job.out.is_closed() {
            return;
        }
        let file = match files.get(&chunk.path) {
            Some(file) => file,
            None => match job.fs.open(chunk.path.as_ref()) {
                Ok(file) => files.entry(Arc::clone(&chunk.path)).or_insert(file),
                Err(_) => {
                    let _ = job
                        .out
                        .blocking_send(Err(ReaderError::SegmentMissing(chunk.path.to_path_buf())));
                    return;
                }
            },
        };
        let mut buf = pool.take(chunk.len);
        counters.inflight.fetch_add(1, Ordering::AcqRel);
        let read = read_fully(file.as_ref(), &mut buf, chunk.offset);
        counters.inflight.fetch_sub(1, Ordering::AcqRel);
        let result = match read {
            Ok(got) if got == chunk.len => {
                let bytes = buf.freeze();
                pool.lend(&bytes);
                slice_batch(chunk, bytes)
            }
            Ok(got) => {
                pool.give_back(buf);
                Err(ReaderError::ShortRead {
                    path: chunk.path.to_path_buf(),
                    offset: chunk.offset,
                    wanted: chunk.len,
                    got,
                })
            }
            Err(source) => {
                pool.give_back(buf);
                Err(ReaderError::Read {
                    path: chunk.path.to_path_buf(),
                    offset: chunk.offset,
                    source,
                })
            }
        };
        let failed = result.is_err();
        if job.out.blocking_send(result).is_err() || failed {
            return;
        }
    }
}

/// Reads until `buf` is full or the file ends; returns the bytes read.
fn read_fully(file: &dyn FsFile, buf: &mut [u8], offset: u64) -> std::io::Result<usize> {
    let mut done = 0;
    while done < buf.len() {
        match file.read_at(&mut buf[done..], offset + done as u64) {
            Ok(0) => break,
            Ok(n) => done += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(done)
}
