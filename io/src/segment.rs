//! Segment files: naming, and scanning one segment at open.
//!
//! A segment is named `<generation>-<first lsn>.wal` (both zero-padded
//! decimal) and holds frames with consecutive LSNs starting at its first
//! LSN. The generation changes when a replica installs a new base: segments
//! of an older generation belong to a discarded history.
//!
//! Scanning decides between a torn tail and corruption: a bad or short frame
//! with no valid frame anywhere after it, in the last segment, is a torn
//! write and is cut off; anything else is corruption and an error.

use crate::frame::{self, Frame, FrameError, HEADER_LEN};
use bytes::Bytes;
use std::path::{Path, PathBuf};

/// File name of a segment.
pub(crate) fn segment_name(generation: u64, first_lsn: u64) -> String {
    format!("{generation:010}-{first_lsn:020}.wal")
}

/// Parses a segment file name into (generation, first lsn).
pub(crate) fn parse_segment_name(name: &str) -> Option<(u64, u64)> {
    let stem = name.strip_suffix(".wal")?;
    let (generation, first) = stem.split_once('-')?;
    if generation.len() != 10 || first.len() != 20 {
        return None;
    }
    Some((generation.parse().ok()?, first.parse().ok()?))
}

/// In-memory index of one segment.
#[derive(Debug, Clone)]
pub(crate) struct Segment {
    pub(crate) path: PathBuf,
    pub(crate) first: u64,
    /// Start offset of each frame: `offsets[i]` holds LSN `first + i`.
    pub(crate) offsets: Vec<u64>,
    pub(crate) bytes: u64,
}

impl Segment {
    pub(crate) fn empty(path: PathBuf, first: u64) -> Self {
        Self {
            path,
            first,
            offsets: Vec::new(),
            bytes: 0,
        }
    }

    /// Last LSN held, `first - 1` when empty.
    pub(crate) fn last(&self) -> u64 {
        self.first + self.offsets.len() as u64 - 1
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.offsets.is_empty()
    }

    /// Byte offset where `lsn` starts (or the end, for `last + 1`).
    pub(crate) fn offset_of(&self, lsn: u64) -> u64 {
        let index = (lsn - self.first) as usize;
        self.offsets.get(index).copied().unwrap_or(self.bytes)
    }

    /// Bytes of frames with LSN greater than `lsn`.
    pub(crate) fn bytes_after(&self, lsn: u64) -> u64 {
        if lsn < self.first {
            self.bytes
        } else if lsn >= self.last() {
            0
        } else {
            self.bytes - self.offset_of(lsn + 1)
        }
    }
}

/// What scanning one segment found.
#[derive(Debug)]
pub(crate) enum ScanEnd {
    /// Every byte belongs to a valid frame.
    Clean,
    /// A torn write starts at `offset`; nothing valid follows.
    Torn { offset: u64 },
}

/// Why a segment could not be trusted.
#[derive(Debug)]
pub(crate) struct ScanFailure {
    pub(crate) offset: u64,
    pub(crate) lsn: u64,
    pub(crate) error: FrameError,
}

/// Scans `data`, the whole content of a segment whose first LSN is `first`.
/// `may_be_torn` is true for the last non-empty segment. `on_frame` sees
/// every frame kept, in order.
pub(crate) fn scan(
    path: &Path,
    first: u64,
    data: &Bytes,
    may_be_torn: bool,
    mut on_frame: impl FnMut(&Frame),
) -> Result<(Segment, ScanEnd), ScanFailure> {
    let mut segment = Segment::empty(path.to_path_buf(), first);
    let mut at = 0usize;
    while at < data.len() {
        let expected = first + segment.offsets.len() as u64;
        let failure = match Frame::decode(&data.slice(at..)) {
            Ok((frame, len)) if frame.lsn == expected => {
                on_frame(&frame);
                segment.offsets.push(at as u64);
                at += len;
                continue;
            }
            Ok((frame, _)) => FrameError::Discontinuity {
                expected,
                found: frame.lsn,
            },
            Err(error) => error,
        };
        // Zeroes to the end: written ahead of appends (WalOptions::zero_ahead),
        // in any segment (a sealed one keeps them if a crash took its trim).
        if data[at..].iter().all(|b| *b == 0) {
            segment.bytes = at as u64;
            return Ok((segment, ScanEnd::Clean));
        }
        let is_discontinuity = matches!(failure, FrameError::Discontinuity { .. });
        // A frame header of zeroes in the last segment: that frame never
        // reached the disk. What follows it was written after it and synced
        // with it or not at all (a sync covers every earlier write), so it
        // was never acknowledged either: a power loss that kept a later
        // page of unsynced appends and lost an earlier one.
        let never_written = data[at..].iter().take(HEADER_LEN).all(|b| *b == 0);
        // The same when a page of the frame never reached the disk: its
        // header made it, a later page of it reads as zeroes (the segment's
        // room is zeroes until written), and its checksum fails. Frames
        // after it were written after it, so a sync that made them durable
        // made it durable too: none of them was acknowledged. Without such
        // a page a checksum failure is corruption of what may have been
        // synced, and stays an error. (A zero page can also be a client's
        // zeroed block with a flipped byte elsewhere: then synced frames
        // are cut. Open has no record of the durable point to tell; a
        // primary whose open cut a torn tail peers as if its log were short
        // and recovers what a replica holds.)
        let page_lost =
            matches!(failure, FrameError::Checksum { .. }) && page_never_written(data, at);
        if may_be_torn
            && !is_discontinuity
            && (never_written || page_lost || !valid_frame_after(data, at + 1, expected))
        {
            segment.bytes = at as u64;
            return Ok((segment, ScanEnd::Torn { offset: at as u64 }));
        }
        return Err(ScanFailure {
            offset: at as u64,
            lsn: expected,
            error: failure,
        });
    }
    segment.bytes = at as u64;
    Ok((segment, ScanEnd::Clean))
}

/// Whether a file page (4 KiB aligned) of the frame at `at` (its length
/// from its header), other than its header's, reads as zeroes: a whole one
/// inside it, or the last one from its start to the frame's end (the crc
/// with it). A page written after the last sync that a power loss dropped.
fn page_never_written(data: &[u8], at: usize) -> bool {
    const PAGE: usize = 4096;
    let Ok(len) = frame::check(&data[at..]) else {
        return false;
    };
    let end = at + len;
    let mut page = at.div_ceil(PAGE) * PAGE;
    while page < end {
        let until = (page + PAGE).min(end);
        if data[page..until].iter().all(|b| *b == 0) {
            return true;
        }
        page += PAGE;
    }
    false
}

/// Bytes a torn tail at `offset` held: up to the last non-zero byte, not
/// the zeroes written ahead after it.
pub(crate) fn torn_bytes(data: &[u8], offset: u64) -> u64 {
    let end = data.iter().rposition(|b| *b != 0).map_or(0, |i| i + 1);
    (end as u64).saturating_sub(offset)
}

/// Whether any valid frame with a plausible LSN (at or after `expected`)
/// starts at or after `from`. Used to tell a torn tail from corruption.
fn valid_frame_after(data: &Bytes, from: usize, expected: u64) -> bool {
    const PLAUSIBLE_LSN_WINDOW: u64 = 1 << 24;
    let mut at = from;
    while at + HEADER_LEN <= data.len() {
        let plausible = frame::peek_lsn(&data[at..])
            .is_some_and(|lsn| lsn >= expected && lsn < expected + PLAUSIBLE_LSN_WINDOW);
        if plausible && Frame::decode(&data.slice(at..)).is_ok() {
            return true;
        }
        at += 1;
    }
    false
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::BytesMut;

    fn frames(first: u64, count: u64) -> BytesMut {
        let mut buf = BytesMut::new();
        for lsn in first..first + count {
            Frame::write(lsn, 1, lsn, Bytes::from(vec![lsn as u8; 4096])).encode(&mut buf);
        }
        buf
    }

    #[test]
    fn names_round_trip_and_reject_strangers() {
        let name = segment_name(3, 1025);
        assert_eq!(name, "0000000003-00000000000000001025.wal");
        assert_eq!(parse_segment_name(&name), Some((3, 1025)));
        assert_eq!(parse_segment_name("notes.txt"), None);
        assert_eq!(parse_segment_name("3-1025.wal"), None);
    }

    #[test]
    fn short_last_frame_is_a_torn_tail() {
        let mut buf = frames(10, 3);
        let full = buf.len();
        buf.truncate(full - 100);
        let (segment, end) = scan(Path::new("x"), 10, &buf.freeze(), true, |_| {}).unwrap();
        assert_eq!(segment.last(), 11);
        assert!(matches!(end, ScanEnd::Torn { offset } if offset == segment.bytes));
    }

    #[test]
    fn corruption_followed_by_valid_frames_is_an_error() {
        let mut buf = frames(10, 3);
        buf[HEADER_LEN + 5] ^= 0xff; // payload of lsn 10
        let failure = scan(Path::new("x"), 10, &buf.freeze(), true, |_| {}).unwrap_err();
        assert_eq!((failure.offset, failure.lsn), (0, 10));
        assert!(matches!(failure.error, FrameError::Checksum { .. }));
    }
}
