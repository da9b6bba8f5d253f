//! What the walship-io benchmarks share: WALs built for them, and a cold
//! page cache (`posix_fadvise(DONTNEED)`).
#![allow(dead_code, clippy::unwrap_used)]

use bytes::Bytes;
use std::fs::{self, File};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use walship_io::*;

/// The files in `dir`, sorted (a WAL's segments, in order).
pub fn segments(dir: &Path) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    files.sort();
    files
}

/// Syncs and drops `dir`'s files from the page cache.
pub fn evict(dir: &Path) {
    for path in segments(dir) {
        let file = File::open(&path).unwrap();
        file.sync_all().unwrap();
        let rc = fadvise_dontneed(&file);
        assert_eq!(rc, 0, "posix_fadvise failed on {}", path.display());
    }
}

#[allow(unsafe_code)]
fn fadvise_dontneed(file: &File) -> i32 {
    // SAFETY: the fd is valid for the call; DONTNEED only drops clean cached pages.
    unsafe { libc::posix_fadvise(file.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) }
}

/// A WAL of `mb` MiB of 4 KiB writes in 64 MiB segments, unsynced:
/// (the WAL, its frames, its files' bytes).
pub fn build_wal(dir: &Path, mb: u64) -> (Wal, u64, u64) {
    let options = WalOptions {
        segment_bytes: 64 << 20,
        sync: SyncMode::None,
        ..WalOptions::default()
    };
    let (wal, _) = Wal::open(dir, options).unwrap();
    let block = Bytes::from(vec![0x5A; BLOCK_SIZE]);
    let frames = mb * (1 << 20) / BLOCK_SIZE as u64;
    for lba in 0..frames {
        wal.append(1, FrameKind::Write, lba, block.clone()).unwrap();
    }
    let bytes: u64 = segments(dir)
        .iter()
        .map(|p| fs::metadata(p).unwrap().len())
        .sum();
    (wal, frames, bytes)
}
