//! walship-io benchmarks. Every figure comes with a baseline from the same run
//! and the ratios are printed at the end.
//!
//! - `scan`: sequential scan of a WAL of `WALSHIP_BENCH_SCAN_MB` MiB (default
//!   1024) with a cold page cache (`posix_fadvise(DONTNEED)` before each
//!   iteration): raw `read_at` loop (no parsing) vs pread reader vs io_uring
//!   reader. Targets: uring >= 1.1x pread reader, >= 0.9x raw loop.
//! - `append_4k`: 4 KiB appends, each waiting for durability, at 1, 8 and 64
//!   writers with group commit vs a raw `write` + `fdatasync` loop.
//!
//! - `checkpoint`: the checkpointer's extent pass over 64 MiB of 4 KiB frames
//!   cycling over a 16 MiB hot set, then a sync: frame by frame vs coalesced.
//!
//! Run: `cargo bench -p walship-io --bench io` (knobs: `WALSHIP_BENCH_SCAN_MB`,
//! `WALSHIP_BENCH_CHUNK_KB`, `WALSHIP_BENCH_QD`, `WALSHIP_BENCH_WARM=1` to keep the cache).
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use bytes::Bytes;
use criterion::{BenchmarkId, Criterion, Throughput};
use std::fs::{self, File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};
use walship_io::*;

mod common;
use common::{build_wal, evict, segments};

const CHUNK: usize = 1 << 20;

fn scan_mb() -> u64 {
    std::env::var("WALSHIP_BENCH_SCAN_MB")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1024)
}

fn raw_scan(dir: &Path) -> u64 {
    let mut total = 0;
    let mut buf = vec![0u8; CHUNK];
    for path in segments(dir) {
        let file = File::open(&path).unwrap();
        let mut offset = 0;
        loop {
            let n = file.read_at(&mut buf, offset).unwrap();
            if n == 0 {
                break;
            }
            offset += n as u64;
            total += n as u64;
        }
    }
    total
}

fn reader_scan(reader: &LogReader, head: u64) -> u64 {
    let mut stream = reader.stream(0, head).unwrap();
    let mut frames = 0;
    while let Some(batch) = stream.blocking_next() {
        frames += batch.unwrap().frames.len() as u64;
    }
    assert_eq!(frames, head);
    frames
}

fn scan(c: &mut Criterion) {
    let dir = tempfile::tempdir().unwrap();
    let (wal, head, bytes) = build_wal(dir.path(), scan_mb());
    let options = ReaderOptions {
        chunk_bytes: CHUNK,
        queue_depth: 8,
        stream_buffer: 8,
        uring_disabled: None,
    };
    let pread = LogReader::open(wal.clone(), BackendRequest::Pread, options.clone()).unwrap();
    let uring = LogReader::open(wal.clone(), BackendRequest::Uring, options).unwrap();
    let mut group = c.benchmark_group("scan");
    group
        .sample_size(10)
        .measurement_time(Duration::from_secs(20))
        .throughput(Throughput::Bytes(bytes));
    let cold = |dir: &Path, run: &dyn Fn() -> u64, iters: u64| {
        let mut spent = Duration::ZERO;
        let warm = std::env::var_os("WALSHIP_BENCH_WARM").is_some();
        for _ in 0..iters {
            if !warm {
                evict(dir);
            }
            let start = Instant::now();
            std::hint::black_box(run());
            spent += start.elapsed();
        }
        spent
    };
    group.bench_function("raw_read_at", |b| {
        b.iter_custom(|n| cold(dir.path(), &|| raw_scan(dir.path()), n))
    });
    group.bench_function("pread_reader", |b| {
        b.iter_custom(|n| cold(dir.path(), &|| reader_scan(&pread, head), n))
    });
    group.bench_function("uring_reader", |b| {
        b.iter_custom(|n| cold(dir.path(), &|| reader_scan(&uring, head), n))
    });
    group.finish();
}

fn raw_fdatasync(dir: &Path, ops: u64) -> Duration {
    let path = dir.join("raw.dat");
    let file = OpenOptions::new()
        .create(true)
        .write(true)
        .truncate(true)
        .open(&path)
        .unwrap();
    let block = vec![0x33u8; BLOCK_SIZE + 34];
    let start = Instant::now();
    for i in 0..ops {
        file.write_all_at(&block, i * block.len() as u64).unwrap();
        file.sync_data().unwrap();
    }
    start.elapsed()
}

fn group_commit(dir: &Path, writers: u64, ops: u64) -> Duration {
    let sub = dir.join(format!(
        "wal-{writers}-{}",
        Instant::now().elapsed().as_nanos()
    ));
    let (wal, _) = Wal::open(&sub, WalOptions::default()).unwrap();
    let wal = Arc::new(wal);
    let per_writer = ops / writers;
    let start = Instant::now(); // after open: setup is not measured
    let threads: Vec<_> = (0..writers)
        .map(|_| {
            let wal = Arc::clone(&wal);
            std::thread::spawn(move || {
                let block = Bytes::from(vec![0x44u8; BLOCK_SIZE]);
                for _ in 0..per_writer {
                    let lsn = wal.append(1, FrameKind::Write, 0, block.clone()).unwrap();
                    wal.sync_to(lsn).unwrap();
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    let spent = start.elapsed();
    drop(wal);
    let _ = fs::remove_dir_all(sub);
    spent
}

fn append(c: &mut Criterion) {
    let dir = tempfile::tempdir().unwrap();
    const OPS: u64 = 1024;
    let mut group = c.benchmark_group("append_4k");
    group
        .sample_size(10)
        .measurement_time(Duration::from_secs(10))
        .throughput(Throughput::Elements(OPS));
    group.bench_function("raw_write_fdatasync", |b| {
        b.iter_custom(|n| (0..n).map(|_| raw_fdatasync(dir.path(), OPS)).sum())
    });
    for writers in [1u64, 8, 64] {
        group.bench_with_input(
            BenchmarkId::new("group_commit", writers),
            &writers,
            |b, &w| b.iter_custom(|n| (0..n).map(|_| group_commit(dir.path(), w, OPS)).sum()),
        );
    }
    group.finish();
}

/// A checkpoint's worth of P4-like frames: `frames` 4 KiB writes cycling
/// over a hot set of `hot` blocks.
fn hot_frames(frames: u64, hot: u64) -> Vec<Frame> {
    (0..frames)
        .map(|i| Frame {
            lsn: i + 1,
            epoch: 1,
            kind: FrameKind::Write,
            flags: 0,
            lba: (i * 7) % hot,
            payload: Bytes::from(vec![i as u8; BLOCK_SIZE]),
        })
        .collect()
}

/// Applies `frames` to a fresh extent and syncs it, as a checkpoint does.
fn checkpoint_apply(dir: &Path, frames: &[Frame], blocks: u64, coalesce: bool) -> Duration {
    let path = dir.join("extent.bench");
    let _ = fs::remove_file(&path);
    let extent = ExtentFile::open(&path, blocks).unwrap();
    let start = Instant::now();
    if coalesce {
        extent.apply_all(frames).unwrap();
    } else {
        for frame in frames {
            extent.apply(frame).unwrap();
        }
    }
    extent.sync().unwrap();
    start.elapsed()
}

/// The checkpointer's extent pass: 64 MiB of 4 KiB frames over a 16 MiB hot
/// set, frame by frame (the baseline) vs coalesced.
fn checkpoint(c: &mut Criterion) {
    let dir = tempfile::tempdir().unwrap();
    const BLOCKS: u64 = 4096;
    let frames = hot_frames(16 * 1024, BLOCKS);
    let mut group = c.benchmark_group("checkpoint");
    group
        .sample_size(10)
        .measurement_time(Duration::from_secs(10))
        .throughput(Throughput::Bytes(frames.len() as u64 * BLOCK_SIZE as u64));
    for (name, coalesce) in [("frame_by_frame", false), ("coalesced", true)] {
        group.bench_function(name, |b| {
            b.iter_custom(|n| {
                (0..n)
                    .map(|_| checkpoint_apply(dir.path(), &frames, BLOCKS, coalesce))
                    .sum()
            })
        });
    }
    group.finish();
}

/// Mean time per iteration from criterion's saved estimates, in ns.
fn mean_ns(group: &str, function: &str) -> Option<f64> {
    let root = std::env::var("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|_| Path::new(env!("CARGO_MANIFEST_DIR")).join("../target"));
    let path = root
        .join("criterion")
        .join(group)
        .join(function)
        .join("new/estimates.json");
    let json: serde_json::Value = serde_json::from_str(&fs::read_to_string(path).ok()?).ok()?;
    json["mean"]["point_estimate"].as_f64()
}

fn report() {
    println!("\n== ratios (same run) ==");
    let ratio = |group: &str, a: &str, b: &str| match (mean_ns(group, a), mean_ns(group, b)) {
        (Some(ta), Some(tb)) => println!("{group}: {a} / {b} = {:.2}x throughput", tb / ta),
        _ => println!("{group}: {a} or {b} not measured in this run"),
    };
    ratio("scan", "uring_reader", "pread_reader");
    ratio("scan", "uring_reader", "raw_read_at");
    ratio("scan", "pread_reader", "raw_read_at");
    ratio("checkpoint", "coalesced", "frame_by_frame");
    for writers in ["1", "8", "64"] {
        ratio(
            "append_4k",
            &format!("group_commit/{writers}"),
            "raw_write_fdatasync",
        );
    }
}

fn main() {
    let mut c = Criterion::default().configure_from_args();
    scan(&mut c);
    append(&mut c);
    checkpoint(&mut c);
    c.final_summary();
    report();
}
