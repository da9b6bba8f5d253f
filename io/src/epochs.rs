//! The WAL's epoch history: the first LSN written in each epoch.
//!
//! One primary writes each epoch, in LSN order, so an entry is known by its
//! (lsn, epoch) and two logs that hold the same (lsn, epoch) hold the same
//! entries up to it. The history is what lets a replica's log be matched
//! against the primary's before anything is shipped on top of it.
//!
//! It is kept beside the segments, in `epochs.<generation>`, because the
//! segments that carried the first frame of an old epoch are recycled while
//! the history must outlive them. Layout (little-endian):
//!
//! | offset | size | field |
//! | --- | --- | --- |
//! | 0 | 8 | magic `WSEPOCH1` |
//! | 8 | 4 | entry count `n` |
//! | 12 | 16 `n` | entries: epoch u64, first lsn u64; both strictly increasing |
//! | 12 + 16 `n` | 4 | crc32c over bytes `[0, 12 + 16 n)` |
//!
//! It is replaced atomically (temp file, fsync, rename, directory fsync).
//! On open the part after the WAL tail is checked against, and completed
//! from, the frames themselves, so a crash between a frame write and the
//! history write loses nothing. A base install writes the new generation's
//! file before the superblock commit that switches to it, so the history
//! and the data it describes change together.

use crate::fs::Fs;
use std::path::{Path, PathBuf};

const MAGIC: &[u8; 8] = b"WSEPOCH1";
const FILE_PREFIX: &str = "epochs.";
/// Entries a history file may hold: far more than any volume sees epochs,
/// small enough that a damaged count cannot make a reader allocate much.
pub const MAX_EPOCHS: usize = 1 << 16;

/// The first LSN written in one epoch.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct EpochStart {
    /// The epoch.
    pub epoch: u64,
    /// The first LSN written in it.
    pub first_lsn: u64,
}

/// Why an epoch history cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum EpochError {
    /// The file exists but fails its checks.
    #[error("epoch history {path} is not trustworthy: {reason}")]
    Corrupt {
        /// The file.
        path: PathBuf,
        /// What failed.
        reason: String,
    },
    /// An entry does not follow the one before it.
    #[error("epoch history out of order: {entry:?} after {previous:?}")]
    OutOfOrder {
        /// The earlier entry.
        previous: EpochStart,
        /// The entry that does not follow it.
        entry: EpochStart,
    },
    /// A frame carries an epoch older than the log's newest.
    #[error("frame at lsn {lsn} carries epoch {epoch}, but the log is already in epoch {newest}")]
    Regressed {
        /// The frame's LSN.
        lsn: u64,
        /// The frame's epoch.
        epoch: u64,
        /// The newest epoch in the log.
        newest: u64,
    },
    /// The history already holds [`MAX_EPOCHS`] entries: a new epoch cannot
    /// be written into this log (rebuild the volume from a fresh base).
    #[error("epoch history full: {MAX_EPOCHS} epochs, cannot start epoch {epoch} at lsn {lsn}")]
    Full {
        /// The epoch that could not start.
        epoch: u64,
        /// Its first LSN.
        lsn: u64,
    },
    /// A filesystem call failed.
    #[error("epoch history {op} {path}: {source}")]
    Io {
        /// What was being done.
        op: &'static str,
        /// The file.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
}

/// Checks that `entries` increase strictly in both epoch and first LSN, and
/// that there are no more than [`MAX_EPOCHS`].
pub fn validate(entries: &[EpochStart]) -> Result<(), EpochError> {
    if let Some(first_over) = entries.get(MAX_EPOCHS) {
        return Err(EpochError::Full {
            epoch: first_over.epoch,
            lsn: first_over.first_lsn,
        });
    }
    for pair in entries.windows(2) {
        if pair[1].epoch <= pair[0].epoch || pair[1].first_lsn <= pair[0].first_lsn {
            return Err(EpochError::OutOfOrder {
                previous: pair[0],
                entry: pair[1],
            });
        }
    }
    Ok(())
}

/// Notes that the frame at `lsn` was written in `epoch`: a new epoch adds
/// an entry. Returns whether the history changed. An epoch older than the
/// newest is refused: the log would go back in time.
pub(crate) fn note(
    entries: &mut Vec<EpochStart>,
    lsn: u64,
    epoch: u64,
) -> Result<bool, EpochError> {
    match entries.last() {
        Some(last) if last.epoch == epoch => Ok(false),
        Some(last) if last.epoch > epoch => Err(EpochError::Regressed {
            lsn,
            epoch,
            newest: last.epoch,
        }),
        _ if entries.len() >= MAX_EPOCHS => Err(EpochError::Full { epoch, lsn }),
        _ => {
            entries.push(EpochStart {
                epoch,
                first_lsn: lsn,
            });
            Ok(true)
        }
    }
}

/// Drops the entries of epochs that start after `lsn`. Returns whether any went.
pub(crate) fn cut_after(entries: &mut Vec<EpochStart>, lsn: u64) -> bool {
    let keep = entries.partition_point(|e| e.first_lsn <= lsn);
    let cut = keep < entries.len();
    entries.truncate(keep);
    cut
}

fn path(dir: &Path, generation: u64) -> PathBuf {
    dir.join(format!("{FILE_PREFIX}{generation}"))
}

fn io_err(op: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> EpochError {
    let path = path.to_path_buf();
    move |source| EpochError::Io { op, path, source }
}

/// Encodes entries with their crc.
pub(crate) fn encode(entries: &[EpochStart]) -> Vec<u8> {
    let mut buf = Vec::with_capacity(16 + 16 * entries.len());
    buf.extend_from_slice(MAGIC);
    buf.extend_from_slice(&(entries.len() as u32).to_le_bytes());
    for entry in entries {
        buf.extend_from_slice(&entry.epoch.to_le_bytes());
        buf.extend_from_slice(&entry.first_lsn.to_le_bytes());
    }
    let crc = crc32c::crc32c(&buf);
    buf.extend_from_slice(&crc.to_le_bytes());
    buf
}

/// Decodes and verifies an encoded history.
pub(crate) fn decode(buf: &[u8]) -> Result<Vec<EpochStart>, String> {
    let u64_at = |at: usize| {
        let mut raw = [0u8; 8];
        raw.copy_from_slice(&buf[at..at + 8]);
        u64::from_le_bytes(raw)
    };
    if buf.len() < 16 || &buf[..8] != MAGIC {
        return Err("bad magic or short file".into());
    }
    let count = u32::from_le_bytes([buf[8], buf[9], buf[10], buf[11]]) as usize;
    if count > MAX_EPOCHS {
        return Err(format!("{count} entries, more than {MAX_EPOCHS}"));
    }
    let end = 12 + 16 * count;
    if buf.len() != end + 4 {
        return Err(format!("{} bytes for {count} entries", buf.len()));
    }
    let stored = u32::from_le_bytes([buf[end], buf[end + 1], buf[end + 2], buf[end + 3]]);
    let computed = crc32c::crc32c(&buf[..end]);
    if stored != computed {
        return Err(format!(
            "crc mismatch: stored {stored:#010x}, computed {computed:#010x}"
        ));
    }
    Ok((0..count)
        .map(|i| EpochStart {
            epoch: u64_at(12 + 16 * i),
            first_lsn: u64_at(20 + 16 * i),
        })
        .collect())
}

/// Reads the history of `generation` in `dir`; a missing file is an empty history.
pub(crate) fn load(
    fs: &dyn Fs,
    dir: &Path,
    generation: u64,
) -> Result<Vec<EpochStart>, EpochError> {
    let path = path(dir, generation);
    let buf = match fs.read(&path) {
        Ok(buf) => buf,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(io_err("read", &path)(e)),
    };
    let entries = decode(&buf).map_err(|reason| EpochError::Corrupt {
        path: path.clone(),
        reason,
    })?;
    validate(&entries)?;
    Ok(entries)
}

/// Replaces the history of `generation` in `dir` atomically
/// ([`rewrite_atomic`](crate::durable::rewrite_atomic)).
pub(crate) fn store(
    fs: &dyn Fs,
    dir: &Path,
    generation: u64,
    entries: &[EpochStart],
) -> Result<(), EpochError> {
    let name = format!("{FILE_PREFIX}{generation}");
    crate::durable::rewrite_atomic(fs, dir, &name, &encode(entries))
        .map_err(io_err("replace", &path(dir, generation)))
}

/// Removes the history files of every generation but `generation`: older
/// ones belong to a discarded history, a newer one to a base install that
/// crashed before its superblock commit. Returns whether any was removed.
pub(crate) fn remove_others(fs: &dyn Fs, dir: &Path, generation: u64) -> Result<bool, EpochError> {
    let keep = format!("{FILE_PREFIX}{generation}");
    let mut removed = false;
    for name in fs.list(dir).map_err(io_err("list", dir))? {
        if name.starts_with(FILE_PREFIX) && name != keep {
            let path = dir.join(&name);
            fs.remove_file(&path).map_err(io_err("remove", &path))?;
            removed = true;
        }
    }
    Ok(removed)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entries() -> Vec<EpochStart> {
        vec![
            EpochStart {
                epoch: 1,
                first_lsn: 1,
            },
            EpochStart {
                epoch: 3,
                first_lsn: 201,
            },
        ]
    }

    #[test]
    fn store_and_load_round_trip_and_missing_is_empty() {
        let dir = tempfile::tempdir().unwrap();
        assert!(load(crate::fs::real(), dir.path(), 1).unwrap().is_empty());
        store(crate::fs::real(), dir.path(), 1, &entries()).unwrap();
        assert_eq!(load(crate::fs::real(), dir.path(), 1).unwrap(), entries());
        assert!(!dir.path().join("epochs.1.tmp").exists());
        store(crate::fs::real(), dir.path(), 2, &entries()[..1]).unwrap();
        assert!(remove_others(crate::fs::real(), dir.path(), 2).unwrap());
        assert!(load(crate::fs::real(), dir.path(), 1).unwrap().is_empty());
        assert_eq!(
            load(crate::fs::real(), dir.path(), 2).unwrap(),
            entries()[..1]
        );
    }

    #[test]
    fn any_flipped_byte_is_refused() {
        let encoded = encode(&entries());
        for i in 0..encoded.len() {
            let mut bad = encoded.clone();
            bad[i] ^= 0x10;
            assert!(decode(&bad).is_err(), "flip at {i}");
        }
        assert!(decode(&encoded[..encoded.len() - 1]).is_err());
    }

    #[test]
    fn notes_new_epochs_refuses_older_ones_and_cuts() {
        let mut history = Vec::new();
        assert!(note(&mut history, 1, 1).unwrap());
        assert!(!note(&mut history, 2, 1).unwrap());
        assert!(note(&mut history, 201, 3).unwrap());
        assert_eq!(history, entries());
        assert!(matches!(
            note(&mut history, 202, 2),
            Err(EpochError::Regressed {
                lsn: 202,
                epoch: 2,
                newest: 3
            })
        ));
        assert!(!cut_after(&mut history, 201));
        assert!(cut_after(&mut history, 200));
        assert_eq!(history, entries()[..1]);
        assert!(validate(&entries()).is_ok());
        let mut reversed = entries();
        reversed.reverse();
        assert!(validate(&reversed).is_err());
    }

    #[test]
    fn a_full_history_refuses_another_epoch() {
        let mut history: Vec<EpochStart> = (1..=MAX_EPOCHS as u64)
            .map(|e| EpochStart {
                epoch: e,
                first_lsn: e,
            })
            .collect();
        assert!(validate(&history).is_ok());
        let last = MAX_EPOCHS as u64;
        assert!(!note(&mut history, last + 1, last).unwrap(), "same epoch");
        assert!(matches!(
            note(&mut history, last + 1, last + 1),
            Err(EpochError::Full { epoch, lsn }) if epoch == last + 1 && lsn == last + 1
        ));
        assert_eq!(history.len(), MAX_EPOCHS);
        history.push(EpochStart {
            epoch: last + 1,
            first_lsn: last + 1,
        });
        assert!(matches!(validate(&history), Err(EpochError::Full { .. })));
    }
}
