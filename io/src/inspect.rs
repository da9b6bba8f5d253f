//! Offline inspection of a store directory: what `walship store inspect`
//! and `walship store verify` print.
//!
//! It only reads. It takes no lock (it asks, without waiting, whether a
//! running process holds one, and lets go at once), truncates nothing,
//! removes nothing: a torn tail is reported where [`Store::open`] would cut
//! it, corruption where `open` would refuse.
//!
//! [`Store::open`]: crate::Store::open

use crate::epochs::{self, EpochStart};
use crate::extent::ExtentFile;
use crate::frame::{FrameKind, BLOCK_SIZE};
use crate::segment::{self, ScanEnd};
use crate::superblock::Superblock;
use bytes::Bytes;
use std::fs::{self, File};
use std::path::{Path, PathBuf};

/// One WAL segment of the current generation.
#[derive(Debug, Clone)]
pub struct SegmentReport {
    /// File name.
    pub name: String,
    /// First LSN it holds (by its name).
    pub first: u64,
    /// Frames kept (before a torn tail or a corrupt frame).
    pub frames: u64,
    /// Bytes of its frames (zeroes written ahead after them not counted).
    pub bytes: u64,
}

/// A torn tail: where the last segment's valid frames end.
#[derive(Debug, Clone)]
pub struct TornTail {
    /// The segment.
    pub path: PathBuf,
    /// Offset of the first byte `open` would cut.
    pub offset: u64,
    /// Bytes it would cut.
    pub bytes: u64,
}

/// What a store directory holds.
#[derive(Debug, Clone)]
pub struct Inspection {
    /// The directory.
    pub dir: PathBuf,
    /// Whether a running process holds the store's lock.
    pub in_use: bool,
    /// The superblock, if it loads.
    pub superblock: Option<Superblock>,
    /// WAL segments of the superblock's generation, in LSN order.
    pub segments: Vec<SegmentReport>,
    /// Segments of other generations (`open` removes older ones).
    pub other_generations: Vec<String>,
    /// The WAL's tail (last recycled LSN) and head (last valid frame).
    pub tail: u64,
    /// The WAL's head.
    pub head: u64,
    /// Frames by kind: writes, trims, barriers.
    pub frames_by_kind: [u64; 3],
    /// The torn tail, if any.
    pub torn: Option<TornTail>,
    /// The persisted epoch history.
    pub epochs: Vec<EpochStart>,
    /// Where each run of one epoch starts among the frames.
    pub epochs_in_frames: Vec<EpochStart>,
    /// The extent file and its length.
    pub extent: Option<(PathBuf, u64)>,
    /// What is wrong: empty when the store would open as it is (a torn
    /// tail is not wrong: `open` cuts it).
    pub problems: Vec<String>,
    /// What `open` will change that is not wrong: segments wholly below
    /// the checkpoint after a WAL restart a crash interrupted, a stale run
    /// marker.
    pub notes: Vec<String>,
}

/// Inspects the store in `dir`, reading every frame of its WAL.
pub fn inspect(dir: &Path) -> Inspection {
    let mut report = Inspection {
        dir: dir.to_path_buf(),
        in_use: in_use(dir),
        superblock: None,
        segments: Vec::new(),
        other_generations: Vec::new(),
        tail: 0,
        head: 0,
        frames_by_kind: [0; 3],
        torn: None,
        epochs: Vec::new(),
        epochs_in_frames: Vec::new(),
        extent: None,
        problems: Vec::new(),
        notes: Vec::new(),
    };
    let superblock = match Superblock::load(dir) {
        Ok(superblock) => superblock,
        Err(e) => {
            report.problems.push(format!("superblock: {e}"));
            return report;
        }
    };
    report.superblock = Some(superblock);
    let extent = ExtentFile::path(dir, superblock.generation);
    match fs::metadata(&extent) {
        Ok(meta) => {
            let expected = superblock.block_count * BLOCK_SIZE as u64;
            if meta.len() != expected {
                report.problems.push(format!(
                    "extent {} is {} bytes, the superblock says {expected}",
                    extent.display(),
                    meta.len()
                ));
            }
            report.extent = Some((extent, meta.len()));
        }
        Err(e) => report
            .problems
            .push(format!("extent {}: {e}", extent.display())),
    }
    let wal = dir.join("wal");
    scan_wal(
        &wal,
        superblock.generation,
        superblock.checkpoint,
        &mut report,
    );
    match epochs::load(crate::fs::real(), &wal, superblock.generation) {
        Ok(history) => report.epochs = history,
        Err(e) => report.problems.push(format!("epoch history: {e}")),
    }
    if report.head < superblock.checkpoint {
        // Committed frames went straight to the extent and the WAL's
        // restart after them was cut by a crash (`Wal::restart_after`).
        report.notes.push(format!(
            "the WAL ends at {} before the checkpoint {}: open restarts it after the checkpoint",
            report.head, superblock.checkpoint
        ));
    }
    match fs::read(dir.join("RUN")).map(|bytes| crate::store::decode_run_marker(&bytes)) {
        Ok(Some(from)) if from == superblock.checkpoint => report.problems.push(format!(
            "RUN: committed frames written straight to the extent after {from} were never recorded; some may be in it: a replica's open starts over empty, a primary's refuses"
        )),
        Ok(_) => report
            .notes
            .push("RUN: a run marker already recorded or torn: open removes it".into()),
        Err(_) => {}
    }
    if report.tail > superblock.checkpoint {
        report.problems.push(format!(
            "the WAL starts after {}, past the checkpoint {}: frames were recycled before they were checkpointed",
            report.tail, superblock.checkpoint
        ));
    }
    for run in report.epochs_in_frames.clone() {
        let persisted = report
            .epochs
            .iter()
            .rev()
            .find(|e| e.first_lsn <= run.first_lsn)
            .map(|e| e.epoch);
        if persisted.is_some_and(|epoch| epoch > run.epoch) {
            report.problems.push(format!(
                "frames from {} are in epoch {}, older than the history's {}",
                run.first_lsn,
                run.epoch,
                persisted.unwrap_or_default()
            ));
        }
    }
    report
}

/// Asks, without waiting and without keeping it, whether another process
/// holds the store's lock, or the lock of a node whose data dir holds it
/// (`<data_dir>/<volume>/store`).
fn in_use(dir: &Path) -> bool {
    let node_lock = dir
        .parent()
        .and_then(Path::parent)
        .map(|d| d.join("walship-node.lock"));
    [Some(dir.join("LOCK")), node_lock]
        .into_iter()
        .flatten()
        .any(|path| locked(&path))
}

fn locked(path: &Path) -> bool {
    let Ok(file) = File::open(path) else {
        return false;
    };
    match file.try_lock_shared() {
        Ok(()) => {
            let _ = file.unlock();
            false
        }
        Err(_) => true,
    }
}

fn scan_wal(wal: &Path, generation: u64, checkpoint: u64, report: &mut Inspection) {
    let entries = match fs::read_dir(wal) {
        Ok(entries) => entries,
        Err(e) => {
            report.problems.push(format!("wal {}: {e}", wal.display()));
            return;
        }
    };
    let mut found = Vec::new();
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        match segment::parse_segment_name(&name) {
            Some((g, first)) if g == generation => found.push((first, entry.path(), name)),
            Some(_) => report.other_generations.push(name),
            None => {}
        }
    }
    found.sort();
    let last_non_empty = found
        .iter()
        .rposition(|(_, path, _)| fs::metadata(path).map(|m| m.len() > 0).unwrap_or(true));
    report.tail = found.first().map_or(0, |(first, _, _)| first - 1);
    report.head = report.tail;
    let mut expected_first = None;
    for (index, (first, path, name)) in found.iter().enumerate() {
        if let Some(expected) = expected_first {
            if *first != expected && *first <= checkpoint + 1 {
                // As `Wal::open`: what comes before is below the checkpoint.
                report.notes.push(format!(
                    "segments before {name} end below the checkpoint {checkpoint}: open removes them"
                ));
                report.segments.clear();
                report.frames_by_kind = [0; 3];
                report.epochs_in_frames.clear();
                report.torn = None;
                report.tail = first - 1;
                report.head = report.tail;
            } else if *first != expected {
                report.problems.push(format!(
                    "{name}: starts at {first}, the previous segment ends at {}",
                    expected - 1
                ));
                return;
            }
        }
        let data = match fs::read(path) {
            Ok(data) => Bytes::from(data),
            Err(e) => {
                report.problems.push(format!("{name}: {e}"));
                return;
            }
        };
        let kinds = &mut report.frames_by_kind;
        let runs = &mut report.epochs_in_frames;
        let may_be_torn = Some(index) == last_non_empty;
        let scanned = segment::scan(path, *first, &data, may_be_torn, |frame| {
            let kind = match frame.kind {
                FrameKind::Write => 0,
                FrameKind::Trim => 1,
                FrameKind::Barrier => 2,
            };
            kinds[kind] += 1;
            if runs.last().is_none_or(|run| run.epoch != frame.epoch) {
                runs.push(EpochStart {
                    epoch: frame.epoch,
                    first_lsn: frame.lsn,
                });
            }
        });
        match scanned {
            Ok((segment, end)) => {
                report.segments.push(SegmentReport {
                    name: name.clone(),
                    first: *first,
                    frames: segment.offsets.len() as u64,
                    bytes: segment.bytes,
                });
                report.head = segment.last();
                expected_first = Some(segment.last() + 1);
                if let ScanEnd::Torn { offset } = end {
                    report.torn = Some(TornTail {
                        path: path.clone(),
                        offset,
                        bytes: segment::torn_bytes(&data, offset),
                    });
                }
            }
            Err(failure) => {
                report.problems.push(format!(
                    "{name}: corrupt at offset {} (LSN {}): {}",
                    failure.offset, failure.lsn, failure.error
                ));
                return;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Store, StoreOptions};
    use std::time::Duration;

    fn store_with_frames(dir: &Path, epochs: &[(u64, u64)]) {
        let options = StoreOptions {
            segment_bytes: 64 << 10,
            lock_wait: Duration::ZERO,
            ..StoreOptions::new(64)
        };
        let (store, _) = Store::open(dir, options).unwrap();
        let mut lsn = 0;
        for &(epoch, frames) in epochs {
            store.persist_epoch(epoch).unwrap();
            for i in 0..frames {
                lsn = store
                    .write(epoch, i % 64, Bytes::from(vec![i as u8; BLOCK_SIZE]))
                    .unwrap();
            }
        }
        store.sync_to(lsn).unwrap();
        store.checkpoint(lsn / 2).unwrap();
    }

    fn segment_files(dir: &Path) -> Vec<(PathBuf, u64)> {
        let mut files: Vec<_> = fs::read_dir(dir.join("wal"))
            .unwrap()
            .flatten()
            .filter(|e| e.file_name().to_string_lossy().ends_with(".wal"))
            .map(|e| (e.path(), e.metadata().unwrap().len()))
            .collect();
        files.sort();
        files
    }

    #[test]
    fn a_clean_store_is_described_and_left_as_it_was() {
        let dir = tempfile::tempdir().unwrap();
        store_with_frames(dir.path(), &[(1, 30), (3, 20)]);
        let before = segment_files(dir.path());
        let report = inspect(dir.path());
        assert!(report.problems.is_empty(), "{:?}", report.problems);
        assert!(!report.in_use);
        assert_eq!(report.head, 50);
        assert_eq!(report.frames_by_kind, [50 - report.tail, 0, 0]);
        assert_eq!(report.superblock.unwrap().checkpoint, 25);
        assert_eq!(
            report.epochs_in_frames.last().copied(),
            Some(EpochStart {
                epoch: 3,
                first_lsn: 31
            })
        );
        assert_eq!(report.epochs.last().map(|e| e.epoch), Some(3));
        assert!(report.torn.is_none());
        assert_eq!(segment_files(dir.path()), before);
    }

    #[test]
    fn a_torn_tail_is_reported_not_cut_and_corruption_is_a_problem() {
        let dir = tempfile::tempdir().unwrap();
        store_with_frames(dir.path(), &[(1, 40)]);
        let files = segment_files(dir.path());
        let (last, _) = files.last().unwrap().clone();
        // Where the next frame would have gone (before zeroes written ahead).
        let end = inspect(dir.path()).segments.last().unwrap().bytes;
        let mut data = fs::read(&last).unwrap();
        data.truncate(end as usize);
        data.extend_from_slice(&[0xab; 100]);
        fs::write(&last, &data).unwrap();
        let report = inspect(dir.path());
        let torn = report.torn.expect("a torn tail");
        assert_eq!((torn.offset, torn.bytes), (end, 100));
        assert!(report.problems.is_empty(), "{:?}", report.problems);
        assert_eq!(fs::metadata(&last).unwrap().len(), end + 100, "nothing cut");

        // A flipped byte in a frame that valid frames follow: corruption.
        let (first, _) = files.first().unwrap().clone();
        let mut data = fs::read(&first).unwrap();
        data[60] ^= 0xff;
        fs::write(&first, &data).unwrap();
        let report = inspect(dir.path());
        assert!(
            report
                .problems
                .iter()
                .any(|p| p.contains("corrupt at offset 0")),
            "{:?}",
            report.problems
        );
    }

    #[test]
    fn a_store_in_use_is_seen_without_taking_its_lock() {
        let dir = tempfile::tempdir().unwrap();
        store_with_frames(dir.path(), &[(1, 5)]);
        let options = StoreOptions {
            lock_wait: Duration::ZERO,
            ..StoreOptions::new(64)
        };
        let (open, _) = Store::open(dir.path(), options.clone()).unwrap();
        assert!(inspect(dir.path()).in_use);
        drop(open);
        assert!(!inspect(dir.path()).in_use);
        // And the inspection kept nothing: the store opens at once.
        Store::open(dir.path(), options).unwrap();
    }
}
