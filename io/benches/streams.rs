//! P3: many replicas catching up at once. `WALSHIP_BENCH_STREAMS` volumes'
//! WALs (default 16, each `WALSHIP_BENCH_STREAM_MB` MiB, default 32) are
//! read from a cold page cache, all at once, one catch-up stream each: the
//! io_uring reader (one worker for every stream, as a runtime runs it)
//! against the pread reader (a thread per stream). The order alternates
//! round by round (`WALSHIP_BENCH_ROUNDS`, default 4); the figures are the
//! medians of each round's ratio. Target: io_uring >= 1.2x pread.
//!
//! Run: `cargo bench -p walship-io --bench streams`.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::path::PathBuf;
use std::time::{Duration, Instant};
use walship_io::*;

mod common;
use common::{build_wal, evict};
#[path = "../../benches/support/stats.rs"]
mod stats;
use stats::median;

fn knob(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// CPU time (user + system) of this process, ended threads included.
fn cpu_time() -> Duration {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap();
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .unwrap()
        .1
        .split_whitespace()
        .collect();
    let ticks: u64 = fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap();
    Duration::from_millis(ticks * 10) // USER_HZ is 100 on Linux
}

#[derive(Debug, Clone, Copy)]
struct Run {
    took: Duration,
    cpu: Duration,
}

/// Every reader streams its whole WAL at once, each from a thread of its
/// own (what a catch-up sender does with its stream), from a cold cache.
fn read_all(readers: &[LogReader], heads: &[u64], dirs: &[PathBuf]) -> Run {
    for dir in dirs {
        evict(dir);
    }
    let cpu = cpu_time();
    let start = Instant::now();
    std::thread::scope(|scope| {
        for (reader, head) in readers.iter().zip(heads) {
            scope.spawn(move || {
                let mut stream = reader.stream(0, *head).unwrap();
                let mut frames = 0;
                while let Some(batch) = stream.blocking_next() {
                    frames += batch.unwrap().frames.len() as u64;
                }
                assert_eq!(frames, *head, "a stream ended early");
            });
        }
    });
    Run {
        took: start.elapsed(),
        cpu: cpu_time() - cpu,
    }
}

fn main() {
    let streams = knob("WALSHIP_BENCH_STREAMS", 16);
    let mb = knob("WALSHIP_BENCH_STREAM_MB", 32);
    let rounds = knob("WALSHIP_BENCH_ROUNDS", 4);
    let root = tempfile::tempdir().unwrap();
    let mut wals = Vec::new();
    let mut heads = Vec::new();
    let mut dirs = Vec::new();
    let mut bytes = 0;
    for i in 0..streams {
        let dir = root.path().join(format!("wal-{i}"));
        let (wal, head, size) = build_wal(&dir, mb);
        wals.push(wal);
        heads.push(head);
        dirs.push(dir);
        bytes += size;
    }
    let options = ReaderOptions::default();
    let uring = match ReaderService::start(BackendRequest::Uring, options.clone()) {
        Ok(service) => service,
        Err(error) => {
            println!("P3: io_uring unavailable here ({error}); nothing to compare");
            return;
        }
    };
    let pread = ReaderService::start(BackendRequest::Pread, options).unwrap();
    let readers = |service: &std::sync::Arc<ReaderService>| -> Vec<LogReader> {
        wals.iter()
            .map(|wal| LogReader::with_service(wal.clone(), service.clone()))
            .collect()
    };
    let (by_uring, by_pread) = (readers(&uring), readers(&pread));
    let gib = bytes as f64 / (1u64 << 30) as f64;
    let (mut rate_ratios, mut cpu_ratios) = (Vec::new(), Vec::new());
    println!(
        "P3: {streams} streams of {mb} MiB, cold, {rounds} rounds alternating; MiB/s and CPU s/GiB:"
    );
    // Once each, not counted: the first reads of a run land on pages the VM
    // has not handed out for a while, which costs several times more.
    read_all(&by_uring, &heads, &dirs);
    read_all(&by_pread, &heads, &dirs);
    for round in 0..rounds {
        let (u, p) = if round % 2 == 0 {
            let u = read_all(&by_uring, &heads, &dirs);
            (u, read_all(&by_pread, &heads, &dirs))
        } else {
            let p = read_all(&by_pread, &heads, &dirs);
            (read_all(&by_uring, &heads, &dirs), p)
        };
        let rate = |r: &Run| bytes as f64 / 1048576.0 / r.took.as_secs_f64();
        let cpu = |r: &Run| r.cpu.as_secs_f64() / gib;
        println!(
            "  round {round}: io_uring {:.0} MiB/s {:.2} s/GiB; pread {:.0} MiB/s {:.2} s/GiB",
            rate(&u),
            cpu(&u),
            rate(&p),
            cpu(&p)
        );
        rate_ratios.push(rate(&u) / rate(&p));
        cpu_ratios.push(cpu(&u) / cpu(&p));
    }
    println!(
        "P3 {streams} concurrent catch-up streams: io_uring {:.2}x pread throughput (target >= 1.2x), {:.2}x its CPU per GiB (medians of per-round ratios)",
        median(rate_ratios),
        median(cpu_ratios)
    );
    let stats = uring.stats();
    assert_eq!(stats.inflight_reads, 0, "{stats:?}");
}
