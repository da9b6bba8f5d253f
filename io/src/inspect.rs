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
use crate::frame::BLOCK_SIZE;
use crate::superblock::Superblock;
use crate::wal::{TornTail, WalError};
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
    /// Segments of older generations (`open` removes them, unless it
    /// refuses the store: then it changes nothing).
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
    let restarts = scan_wal(
        &wal,
        superblock.generation,
        superblock.checkpoint,
        &mut report,
    );
    match epochs::load(crate::fs::real(), &wal, superblock.generation) {
        Ok(history) => report.epochs = history,
        Err(e) => report.problems.push(format!("epoch history: {e}")),
    }
    if restarts {
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

/// Fills `report` with what opening the WAL in `wal` would find and do:
/// the WAL's own open plan ([`crate::wal::plan`]), one set of rules.
/// Whether open starts the log over after the checkpoint (every frame
/// found is at or below it).
fn scan_wal(wal: &Path, generation: u64, checkpoint: u64, report: &mut Inspection) -> bool {
    let plan = crate::wal::plan(crate::fs::real(), wal, generation, checkpoint);
    let name = |path: &Path| {
        path.file_name()
            .map_or_else(String::new, |n| n.to_string_lossy().into_owned())
    };
    report.other_generations = plan.stale.iter().map(|p| name(p)).collect();
    report.segments = plan
        .segments()
        .map(|(path, first, frames, bytes)| SegmentReport {
            name: name(path),
            first,
            frames,
            bytes,
        })
        .collect();
    report.tail = plan.tail();
    report.head = plan.head();
    report.frames_by_kind = plan.frames_by_kind;
    report.epochs_in_frames = plan.runs.clone();
    report.torn = plan.torn.clone();
    if let Some(first_kept) = report
        .segments
        .first()
        .filter(|_| !plan.superseded.is_empty())
    {
        report.notes.push(format!(
            "segments before {} end below the checkpoint {checkpoint}: open removes them",
            first_kept.name
        ));
    }
    if let Some(refused) = &plan.refused {
        report.problems.push(match refused {
            WalError::Corrupt {
                path,
                offset,
                lsn,
                error,
            } => format!(
                "{}: corrupt at offset {offset} (LSN {lsn}): {error}",
                name(path)
            ),
            WalError::SegmentGap {
                path,
                expected,
                found,
            } => format!(
                "{}: starts at {found}, the previous segment ends at {}",
                name(path),
                expected - 1
            ),
            other => other.to_string(),
        });
    }
    let empty = plan.segments().next().is_none();
    plan.refused.is_none() && (plan.restarts || (empty && checkpoint > 0))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Store, StoreOptions};
    use bytes::Bytes;
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

    /// Writes `bytes` of garbage where the last segment's next frame
    /// would have gone (before the zeroes written ahead): a torn write.
    /// The segment, and where its valid frames end.
    fn tear_last_segment(dir: &Path, bytes: usize) -> (PathBuf, u64) {
        let (last, _) = segment_files(dir).last().unwrap().clone();
        let end = inspect(dir).segments.last().unwrap().bytes;
        let mut data = fs::read(&last).unwrap();
        data.truncate(end as usize);
        data.extend(std::iter::repeat_n(0xab, bytes));
        fs::write(&last, &data).unwrap();
        (last, end)
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
        let (last, end) = tear_last_segment(dir.path(), 100);
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

    /// The inspection is the WAL's own open plan: a torn tail and a
    /// segment of an older generation are reported as what open then cuts
    /// and removes, byte for byte.
    #[test]
    fn what_inspect_reports_is_what_open_then_does() {
        let dir = tempfile::tempdir().unwrap();
        store_with_frames(dir.path(), &[(1, 40)]);
        tear_last_segment(dir.path(), 77);
        let generation = Superblock::load(dir.path()).unwrap().generation;
        let stale = format!("{:010}-{:020}.wal", generation - 1, 1);
        fs::write(dir.path().join("wal").join(&stale), b"").unwrap();
        let report = inspect(dir.path());
        assert!(report.problems.is_empty(), "{:?}", report.problems);
        assert_eq!(report.other_generations, vec![stale.clone()]);
        let torn = report.torn.clone().expect("a torn tail");
        let options = StoreOptions {
            segment_bytes: 64 << 10,
            lock_wait: Duration::ZERO,
            ..StoreOptions::new(64)
        };
        let (_store, opened) = Store::open(dir.path(), options).unwrap();
        assert_eq!(opened.torn_bytes_dropped, torn.bytes);
        assert_eq!(opened.head, report.head);
        assert_eq!(fs::metadata(&torn.path).unwrap().len(), torn.offset);
        assert!(!dir.path().join("wal").join(&stale).exists());
    }

    /// A segment of a newer generation: open refuses the store and
    /// changes nothing; inspect says so, still lists the older ones, and
    /// notes no restart.
    #[test]
    fn a_newer_generation_is_refused_as_open_refuses_it() {
        let dir = tempfile::tempdir().unwrap();
        store_with_frames(dir.path(), &[(1, 10)]);
        let generation = Superblock::load(dir.path()).unwrap().generation;
        let wal = dir.path().join("wal");
        let stale = format!("{:010}-{:020}.wal", generation - 1, 1);
        fs::write(wal.join(&stale), b"").unwrap();
        fs::write(
            wal.join(format!("{:010}-{:020}.wal", generation + 1, 1)),
            b"",
        )
        .unwrap();
        let report = inspect(dir.path());
        assert!(
            report.problems.iter().any(|p| p.contains("newer")),
            "{:?}",
            report.problems
        );
        assert_eq!(report.other_generations, vec![stale.clone()]);
        assert!(
            report.notes.iter().all(|n| !n.contains("restarts")),
            "{:?}",
            report.notes
        );
        let options = StoreOptions {
            lock_wait: Duration::ZERO,
            ..StoreOptions::new(64)
        };
        assert!(Store::open(dir.path(), options).is_err());
        assert!(wal.join(&stale).exists(), "a refused open removed nothing");
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
