//! One test suite, run against both log reader backends.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use bytes::Bytes;
use std::fs;
use std::time::{Duration, Instant};
use walship_io::*;

mod common;
use common::segments;

const FRAME: u64 = 30 + 4096 + 4;

fn payload(lsn: u64) -> Bytes {
    Bytes::from(vec![(lsn % 251) as u8; BLOCK_SIZE])
}

/// A WAL of `count` frames in segments of `per_segment` frames.
fn wal_with(count: u64, per_segment: u64) -> (tempfile::TempDir, Wal) {
    let dir = tempfile::tempdir().unwrap();
    let options = WalOptions {
        segment_bytes: per_segment * FRAME,
        ..WalOptions::default()
    };
    let (wal, _) = Wal::open(dir.path(), options).unwrap();
    for lsn in 1..=count {
        wal.append(1, FrameKind::Write, lsn, payload(lsn)).unwrap();
    }
    wal.sync_to(count).unwrap();
    (dir, wal)
}

fn reader(wal: &Wal, backend: BackendRequest, chunk_frames: u64) -> LogReader {
    let options = ReaderOptions {
        chunk_bytes: (chunk_frames * FRAME) as usize,
        queue_depth: 4,
        stream_buffer: 1,
        uring_disabled: None,
    };
    LogReader::open(wal.clone(), backend, options).unwrap()
}

fn collect(stream: &mut FrameStream) -> Result<Vec<Frame>, ReaderError> {
    let mut frames = Vec::new();
    while let Some(batch) = stream.blocking_next() {
        let batch = batch?;
        assert_eq!(batch.frames.first().map(|f| f.lsn), Some(batch.first_lsn));
        assert_eq!(
            batch.raw.len(),
            batch.frames.iter().map(Frame::encoded_len).sum::<usize>()
        );
        frames.extend(batch.frames);
    }
    Ok(frames)
}

fn wait_idle(reader: &LogReader) -> ReaderStats {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let stats = reader.stats();
        if stats.inflight_reads == 0 && stats.active_streams == 0 {
            return stats;
        }
        assert!(
            Instant::now() < deadline,
            "reader did not settle: {stats:?}"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
}

macro_rules! backend_suite {
    ($name:ident, $backend:expr, $threads_when_idle:expr) => {
        mod $name {
            use super::*;

            #[test]
            fn reads_ranges_across_segment_boundaries_and_mid_segment() {
                let (_dir, wal) = wal_with(60, 7);
                let reader = reader(&wal, $backend, 3);
                for (from, to) in [(0, 60), (3, 47), (6, 7), (13, 14), (59, 60), (20, 20)] {
                    let frames = collect(&mut reader.stream(from, to).unwrap()).unwrap();
                    let lsns: Vec<u64> = frames.iter().map(|f| f.lsn).collect();
                    assert_eq!(lsns, (from + 1..=to).collect::<Vec<_>>(), "({from}, {to}]");
                    assert!(frames.iter().all(|f| f.payload == payload(f.lsn)));
                }
                assert_eq!(wait_idle(&reader).threads, $threads_when_idle);
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn async_consumers_get_the_same_frames() {
                let (_dir, wal) = wal_with(30, 10);
                let reader = reader(&wal, $backend, 4);
                let mut stream = reader.stream(5, 30).unwrap();
                let mut next = 6;
                while let Some(batch) = stream.next_batch().await {
                    for frame in batch.unwrap().frames {
                        assert_eq!(frame.lsn, next);
                        next += 1;
                    }
                }
                assert_eq!(next, 31);
            }

            #[test]
            fn a_slow_consumer_still_gets_every_batch_in_order() {
                let (_dir, wal) = wal_with(40, 10);
                let reader = reader(&wal, $backend, 1);
                let mut stream = reader.stream(0, 40).unwrap();
                let mut next = 1;
                while let Some(batch) = stream.blocking_next() {
                    std::thread::sleep(Duration::from_millis(2)); // the channel stays full
                    for frame in batch.unwrap().frames {
                        assert_eq!(frame.lsn, next);
                        next += 1;
                    }
                }
                assert_eq!(next, 41, "the batch parked while the channel was full was delivered");
            }

            #[test]
            fn recycled_range_is_a_typed_error() {
                let (_dir, wal) = wal_with(30, 5);
                wal.set_checkpoint(20);
                wal.recycle().unwrap();
                let reader = reader(&wal, $backend, 2);
                assert!(matches!(
                    reader.stream(9, 30),
                    Err(ReaderError::Range(WalError::Recycled { from: 9, tail: 20 }))
                ));
                assert!(matches!(reader.stream(20, 31), Err(ReaderError::Range(WalError::BeyondHead { .. }))));
            }

            #[test]
            fn segment_deleted_mid_read_is_a_typed_error() {
                let (dir, wal) = wal_with(30, 10);
                let reader = reader(&wal, $backend, 1);
                let mut stream = reader.stream(0, 30).unwrap();
                let first = stream.blocking_next().unwrap().unwrap();
                assert_eq!(first.first_lsn, 1);
                let mut segments = segments(dir.path());
                segments.sort();
                fs::remove_file(&segments[2]).unwrap();
                let error = collect(&mut stream).unwrap_err();
                assert!(matches!(error, ReaderError::SegmentMissing(ref p) if *p == segments[2]), "{error}");
                wait_idle(&reader);
            }

            #[test]
            fn segment_corrupted_mid_read_is_a_typed_error() {
                let (dir, wal) = wal_with(20, 10);
                let mut segments = segments(dir.path());
                segments.sort();
                let mut data = fs::read(&segments[1]).unwrap();
                data[(4 * FRAME + 200) as usize] ^= 0x10; // lsn 15
                fs::write(&segments[1], data).unwrap();
                let reader = reader(&wal, $backend, 2);
                let error = collect(&mut reader.stream(0, 20).unwrap()).unwrap_err();
                assert!(matches!(error, ReaderError::Corrupt { lsn: 15, .. }), "{error}");
            }

            #[test]
            fn segment_truncated_under_the_reader_is_a_short_read() {
                let (dir, wal) = wal_with(10, 10);
                let reader = reader(&wal, $backend, 10);
                let segment = segments(dir.path()).remove(0);
                fs::OpenOptions::new().write(true).open(&segment).unwrap().set_len(5 * FRAME).unwrap();
                let error = collect(&mut reader.stream(0, 10).unwrap()).unwrap_err();
                assert!(matches!(error, ReaderError::ShortRead { got, .. } if got == (5 * FRAME) as usize), "{error}");
            }

            #[test]
            fn dropping_the_stream_mid_read_leaks_no_buffer_thread_or_read() {
                let (_dir, wal) = wal_with(400, 50);
                let reader = reader(&wal, $backend, 2);
                for _ in 0..5 {
                    let mut stream = reader.stream(0, 400).unwrap();
                    let batch = stream.blocking_next().unwrap().unwrap();
                    drop(stream);
                    drop(batch);
                }
                let stats = wait_idle(&reader);
                assert_eq!(stats.threads, $threads_when_idle);
                assert_eq!(stats.buffers_lent, 0, "{stats:?}");
                assert!(stats.buffers_free <= 4 * 2 + 1, "pool is bounded: {stats:?}");
            }
        }
    };
}

backend_suite!(uring, BackendRequest::Uring, 1);
backend_suite!(pread, BackendRequest::Pread, 0);

#[test]
fn auto_records_the_backend_and_why() {
    let (_dir, wal) = wal_with(1, 10);
    // Auto picks what P3 measured faster here, and says so.
    let auto =
        LogReader::open(wal.clone(), BackendRequest::Auto, ReaderOptions::default()).unwrap();
    assert_eq!(auto.choice().backend, Backend::Pread);
    assert!(auto.choice().reason.starts_with("auto: pread"));
    let disabled = ReaderOptions {
        uring_disabled: Some("policy says no".into()),
        ..ReaderOptions::default()
    };
    assert!(matches!(
        LogReader::open(wal, BackendRequest::Uring, disabled),
        Err(ReaderError::UringUnavailable(reason)) if reason == "policy says no"
    ));
}
