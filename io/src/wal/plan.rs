//! What opening a WAL finds and will do, computed by reading alone:
//! [`Wal::open`](super::Wal::open) carries the plan out, and `store
//! inspect|verify` ([`crate::inspect`]) reports it. One set of rules for
//! both: the offline tool cannot drift from what open does.

use super::{io_err, WalError};
use crate::epochs::EpochStart;
use crate::frame::FrameKind;
use crate::fs::Fs;
use crate::segment::{self, ScanEnd, Segment};
use bytes::Bytes;
use std::path::{Path, PathBuf};

/// A torn tail: where the last segment's valid frames end.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TornTail {
    /// The segment.
    pub path: PathBuf,
    /// Offset of the first byte `open` cuts.
    pub offset: u64,
    /// Bytes it cuts.
    pub bytes: u64,
}

/// What opening the WAL in a directory finds, and what it will change.
#[derive(Debug)]
pub struct OpenPlan {
    /// Segments of older generations: removed.
    pub stale: Vec<PathBuf>,
    /// Segments of the generation opened, in LSN order, each as scanned
    /// (frames before a torn tail).
    pub(crate) segments: Vec<Segment>,
    /// Segments whose every frame is at or below `start_after` (held
    /// elsewhere: a restart after a checkpoint that a crash interrupted):
    /// removed.
    pub superseded: Vec<PathBuf>,
    /// Whether every frame found is at or below `start_after`: the log
    /// starts over after it.
    pub restarts: bool,
    /// The last segment's torn tail: cut.
    pub torn: Option<TornTail>,
    /// Where each run of one epoch starts among the frames kept.
    pub runs: Vec<EpochStart>,
    /// Frames kept, by kind: writes, trims, barriers.
    pub frames_by_kind: [u64; 3],
    /// Why open refuses, if it does (the plan holds what was found
    /// before).
    pub refused: Option<WalError>,
}

impl OpenPlan {
    /// The LSN before the first frame found (0 without segments).
    pub fn tail(&self) -> u64 {
        self.segments.first().map_or(0, |s| s.first - 1)
    }

    /// The last LSN found.
    pub fn head(&self) -> u64 {
        self.segments.last().map_or(self.tail(), Segment::last)
    }

    /// Each kept segment: its file name, first LSN, frames and bytes.
    pub fn segments(&self) -> impl Iterator<Item = (&Path, u64, u64, u64)> {
        self.segments
            .iter()
            .map(|s| (s.path.as_path(), s.first, s.offsets.len() as u64, s.bytes))
    }
}

/// Reads the WAL in `dir` as [`Wal::open`](super::Wal::open) would open it
/// for `generation`, the caller holding every frame up to `start_after`;
/// changes nothing.
pub fn plan(fs: &dyn Fs, dir: &Path, generation: u64, start_after: u64) -> OpenPlan {
    let mut plan = OpenPlan {
        stale: Vec::new(),
        segments: Vec::new(),
        superseded: Vec::new(),
        restarts: false,
        torn: None,
        runs: Vec::new(),
        frames_by_kind: [0; 3],
        refused: None,
    };
    if let Err(e) = scan(fs, dir, (generation, start_after), &mut plan) {
        plan.refused = Some(e);
    }
    plan
}

fn scan(
    fs: &dyn Fs,
    dir: &Path,
    (generation, start_after): (u64, u64),
    plan: &mut OpenPlan,
) -> Result<(), WalError> {
    let mut found = Vec::new();
    let mut newer = None;
    for name in fs.list(dir).map_err(io_err("list", dir))? {
        let Some((found_generation, first)) = segment::parse_segment_name(&name) else {
            continue;
        };
        let path = dir.join(&name);
        if found_generation > generation {
            newer = newer.max(Some(found_generation));
        } else if found_generation < generation {
            plan.stale.push(path);
        } else {
            found.push((first, path));
        }
    }
    plan.stale.sort();
    // Refused, with every older segment listed (open removes nothing).
    if let Some(found) = newer {
        return Err(WalError::NewerGeneration {
            expected: generation,
            found,
        });
    }
    found.sort();
    let last_non_empty = found
        .iter()
        .rposition(|(_, path)| fs.len(path).map(|len| len > 0).unwrap_or(true));
    for (index, (first, path)) in found.iter().enumerate() {
        if let Some(previous) = plan.segments.last() {
            let expected = previous.last() + 1;
            if *first != expected && *first <= start_after + 1 {
                // What comes before is held elsewhere.
                plan.superseded
                    .extend(plan.segments.drain(..).map(|s| s.path));
                plan.runs.clear();
                plan.frames_by_kind = [0; 3];
                plan.torn = None;
            } else if *first != expected {
                return Err(WalError::SegmentGap {
                    path: path.clone(),
                    expected,
                    found: *first,
                });
            }
        }
        let data = Bytes::from(fs.read(path).map_err(io_err("read", path))?);
        let may_be_torn = Some(index) == last_non_empty;
        let (kinds, runs) = (&mut plan.frames_by_kind, &mut plan.runs);
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
        let (segment, end) = scanned.map_err(|f| WalError::Corrupt {
            path: path.clone(),
            offset: f.offset,
            lsn: f.lsn,
            error: f.error,
        })?;
        if let ScanEnd::Torn { offset } = end {
            plan.torn = Some(TornTail {
                path: path.clone(),
                offset,
                bytes: segment::torn_bytes(&data, offset),
            });
        }
        plan.segments.push(segment);
    }
    // Every frame at or below what the caller already holds: a restart
    // after `start_after` (see `restart_after`) that a crash interrupted.
    plan.restarts = plan.segments.last().is_some_and(|s| s.last() < start_after);
    Ok(())
}
