//! WAL behaviour on real files: crash-style reopen, torn tails, corruption,
//! group commit, poisoning, truncation, retention pins.

#![allow(clippy::unwrap_used, clippy::expect_used)]
use bytes::Bytes;
use std::fs::{self, OpenOptions};
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::sync::Arc;
use walship_io::*;

mod common;
use common::segments;

fn block(lsn: u64) -> Bytes {
    Bytes::from(vec![(lsn % 251) as u8; BLOCK_SIZE])
}

fn options(segment_bytes: u64) -> WalOptions {
    WalOptions {
        segment_bytes,
        ..WalOptions::default()
    }
}

/// A WAL in 1 MiB segments holding `n` synced frames, closed: its
/// directory and its last segment.
fn closed_wal(n: u64) -> (tempfile::TempDir, std::path::PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let (wal, _) = Wal::open(dir.path(), options(1 << 20)).unwrap();
    write_n(&wal, n);
    drop(wal);
    let seg = segments(dir.path()).pop().unwrap();
    (dir, seg)
}

/// Overwrites `path` at `offset` with `bytes`, as a disk might have.
fn write_at(path: &std::path::Path, bytes: &[u8], offset: u64) {
    OpenOptions::new()
        .write(true)
        .open(path)
        .unwrap()
        .write_all_at(bytes, offset)
        .unwrap();
}

fn write_n(wal: &Wal, n: u64) -> u64 {
    let mut last = 0;
    for _ in 0..n {
        let lsn = wal.head() + 1;
        last = wal.append(1, FrameKind::Write, lsn, block(lsn)).unwrap();
    }
    wal.sync_to(last).unwrap();
    last
}

const FRAME: u64 = 30 + 4096 + 4;

#[test]
fn crash_style_reopen_sees_every_synced_frame() {
    let dir = tempfile::tempdir().unwrap();
    let (wal, _) = Wal::open(dir.path(), options(10 * FRAME)).unwrap();
    write_n(&wal, 35);
    drop(wal); // no close, no final sync beyond what sync_to did
    let (wal, report) = Wal::open(dir.path(), options(10 * FRAME)).unwrap();
    assert_eq!(
        (report.head, report.tail, report.torn_bytes_dropped),
        (35, 0, 0)
    );
    assert_eq!(report.segments, 4);
    let frames = wal.read_frames(0, 35).unwrap();
    assert_eq!(frames.len(), 35);
    for (i, frame) in frames.iter().enumerate() {
        assert_eq!(frame.lsn, i as u64 + 1);
        assert_eq!(frame.payload, block(frame.lsn));
    }
    assert_eq!(
        wal.append(1, FrameKind::Barrier, 0, Bytes::new()).unwrap(),
        36
    );
}

/// Rotation over a segment the group commit already made durable costs
/// no sync of its own (the writer is the thread a volume's actors share);
/// over frames not yet durable it syncs them before the next segment takes
/// a frame. The new segment's directory entry goes with the next sync.
#[test]
fn rotation_syncs_the_full_segment_only_when_the_group_commit_has_not() {
    let dir = tempfile::tempdir().unwrap();
    let (wal, _) = Wal::open(dir.path(), options(10 * FRAME)).unwrap();
    for _ in 0..25 {
        write_n(&wal, 1);
    }
    assert_eq!(segments(dir.path()).len(), 3);
    assert_eq!(
        wal.sync_count(),
        25,
        "one sync per write, none for rotations"
    );

    let dir = tempfile::tempdir().unwrap();
    let (wal, _) = Wal::open(dir.path(), options(10 * FRAME)).unwrap();
    for _ in 0..25 {
        let lsn = wal.head() + 1;
        wal.append(1, FrameKind::Write, lsn, block(lsn)).unwrap();
    }
    assert_eq!(wal.sync_count(), 2, "each full segment, before the next");
    assert_eq!(wal.durable(), 0, "a rotation makes nothing durable itself");
    wal.sync_to(25).unwrap();
    assert_eq!((wal.sync_count(), wal.durable()), (3, 25));
    drop(wal);
    let (wal, report) = Wal::open(dir.path(), options(10 * FRAME)).unwrap();
    assert_eq!((report.head, report.segments), (25, 3));
    assert_eq!(wal.read_frames(0, 25).unwrap().len(), 25);
    // What open found counts as durable: it synced it.
    assert_eq!(wal.durable(), 25);
}

#[test]
fn torn_tail_mid_frame_is_truncated_and_reported() {
    let (dir, seg) = closed_wal(5);
    let file = OpenOptions::new().write(true).open(&seg).unwrap();
    file.set_len(4 * FRAME + 1000).unwrap();
    let (wal, report) = Wal::open(dir.path(), options(1 << 20)).unwrap();
    assert_eq!(report.head, 4);
    assert_eq!(report.torn_bytes_dropped, 1000);
    assert_eq!(fs::metadata(&seg).unwrap().len(), 4 * FRAME);
    assert_eq!(write_n(&wal, 1), 5, "the next append reuses the torn LSN");
}

#[test]
fn garbage_written_after_the_last_frame_is_a_torn_tail() {
    let (dir, seg) = closed_wal(3);
    // Where the next frame would go, into the zeroes written ahead.
    write_at(&seg, &[0xAB; 777], 3 * FRAME);
    let (_, report) = Wal::open(dir.path(), options(1 << 20)).unwrap();
    assert_eq!((report.head, report.torn_bytes_dropped), (3, 777));
    assert_eq!(fs::metadata(&seg).unwrap().len(), 3 * FRAME, "cut there");
}

/// A power loss can keep a later page of unsynced appends and lose an
/// earlier one: the lost frame reads as zeroes (written ahead), the later
/// one is whole. Neither was acknowledged (a sync covers every earlier
/// write): both are cut, and the WAL opens.
#[test]
fn a_later_frame_past_a_frame_that_never_reached_the_disk_is_cut_with_it() {
    let (dir, seg) = closed_wal(5);
    write_at(&seg, &vec![0u8; FRAME as usize], 3 * FRAME);
    let (wal, report) = Wal::open(dir.path(), options(1 << 20)).unwrap();
    assert_eq!((report.head, report.torn_bytes_dropped), (3, 2 * FRAME));
    assert_eq!(fs::metadata(&seg).unwrap().len(), 3 * FRAME);
    assert_eq!(write_n(&wal, 1), 4);
    assert_eq!(wal.read_frames(0, 4).unwrap()[3].payload, block(4));
}

/// The power loss of the lost-disk issue: a frame's first page kept, the
/// page after it lost (the frame's end and its checksum read as zeroes),
/// a later frame kept whole. Nothing after the last sync was acknowledged:
/// the WAL opens at the frame before, as for any torn tail. The same bytes
/// flipped rather than lost (no page of zeroes) are corruption and refuse.
#[test]
fn a_frame_whose_second_page_was_lost_ends_the_log_but_a_flipped_one_refuses() {
    let (dir, seg) = closed_wal(6);
    // Frame 4 (index 3) starts at 3 * FRAME and ends inside the page at
    // 16384, whose loss also takes frame 5's start; frame 6 is whole.
    const { assert!(3 * FRAME < 16384 && 4 * FRAME > 16384 && 5 * FRAME > 20480) };
    write_at(&seg, &[0u8; 4096], 16384);
    let (wal, report) = Wal::open(dir.path(), options(1 << 20)).unwrap();
    assert_eq!(report.head, 3, "{report:?}");
    assert_eq!(fs::metadata(&seg).unwrap().len(), 3 * FRAME);
    assert_eq!(write_n(&wal, 1), 4);
    drop(wal);

    let (dir, seg) = closed_wal(6);
    write_at(&seg, &[0x5A; 16], 3 * FRAME + 2000);
    let refused = Wal::open(dir.path(), options(1 << 20));
    assert!(
        matches!(refused, Err(WalError::Corrupt { lsn: 4, .. })),
        "{refused:?}"
    );
}

/// A 64 KiB write's frame spans 17 pages; a power loss can drop one in its
/// middle and keep its last page and a later frame: the log ends there.
/// The price of having no record of the durable point: a page of zeroes
/// can also be a client's zeroed block, so a synced frame of zeroes with a
/// flipped byte is taken for torn too, cut and reported (a primary that
/// cut a torn tail peers as if short, and recovers it from a replica).
#[test]
fn a_frame_with_a_lost_middle_page_ends_the_log_and_so_does_a_flipped_frame_of_zeroes() {
    let dir = tempfile::tempdir().unwrap();
    let (wal, _) = Wal::open(dir.path(), options(1 << 20)).unwrap();
    let big = Bytes::from(vec![0x5Au8; 16 * BLOCK_SIZE]);
    for lsn in 1..=3 {
        wal.append(1, FrameKind::Write, lsn, big.clone()).unwrap();
    }
    wal.sync_to(3).unwrap();
    drop(wal);
    let seg = segments(dir.path()).pop().unwrap();
    // Frame 2 spans [65570, 131140): the page at 90112 is in its middle.
    write_at(&seg, &[0u8; 4096], 90112);
    let (_, report) = Wal::open(dir.path(), options(1 << 20)).unwrap();
    assert_eq!(report.head, 1, "{report:?}");
    assert!(report.torn_bytes_dropped > 0);
}

#[test]
fn a_flipped_byte_in_a_frame_of_zeroes_is_taken_for_torn() {
    let dir = tempfile::tempdir().unwrap();
    let (wal, _) = Wal::open(dir.path(), options(1 << 20)).unwrap();
    let zeroes = Bytes::from(vec![0u8; 2 * BLOCK_SIZE]);
    for lsn in 1..=4 {
        wal.append(1, FrameKind::Write, lsn, zeroes.clone())
            .unwrap();
    }
    wal.sync_to(4).unwrap();
    drop(wal);
    let seg = segments(dir.path()).pop().unwrap();
    // Frame 2 spans [8226, 16452): the page at 12288 is all zeroes.
    write_at(&seg, &[0x01], 8226 + 100);
    let (_, report) = Wal::open(dir.path(), options(1 << 20)).unwrap();
    assert_eq!(report.head, 1, "{report:?}");
    assert!(report.torn_bytes_dropped > 0, "reported: {report:?}");
}

#[test]
fn garbage_appended_past_the_zeroes_written_ahead_is_a_torn_tail() {
    let (dir, seg) = closed_wal(3);
    let len = fs::metadata(&seg).unwrap().len();
    assert!(len > 3 * FRAME, "zeroes written ahead: {len}");
    OpenOptions::new()
        .append(true)
        .open(&seg)
        .unwrap()
        .write_all(&[0xAB; 777])
        .unwrap();
    let (wal, report) = Wal::open(dir.path(), options(1 << 20)).unwrap();
    assert_eq!(
        (report.head, report.torn_bytes_dropped),
        (3, len - 3 * FRAME + 777),
        "the zeroes before the garbage count as dropped"
    );
    assert_eq!(fs::metadata(&seg).unwrap().len(), 3 * FRAME);
    assert_eq!(write_n(&wal, 1), 4);
}

/// Appends land in zeroes written ahead; a reopen (a crash after the
/// syncs) sees exactly the frames, in the active segment and in sealed
/// ones that kept their zeroes (their trim lost), and appends go on.
#[test]
fn zeroes_written_ahead_read_as_the_end_of_every_segment() {
    let dir = tempfile::tempdir().unwrap();
    let (wal, _) = Wal::open(dir.path(), options(10 * FRAME)).unwrap();
    write_n(&wal, 25);
    drop(wal);
    let files = segments(dir.path());
    assert_eq!(files.len(), 3);
    // Sealed segments were trimmed to their frames; the active one was not.
    assert_eq!(fs::metadata(&files[0]).unwrap().len(), 10 * FRAME);
    assert!(fs::metadata(&files[2]).unwrap().len() > 5 * FRAME);
    // A sealed segment whose trim a crash took.
    fs::OpenOptions::new()
        .write(true)
        .open(&files[1])
        .unwrap()
        .set_len(10 * FRAME + 4096)
        .unwrap();
    let (wal, report) = Wal::open(dir.path(), options(10 * FRAME)).unwrap();
    assert_eq!((report.head, report.torn_bytes_dropped), (25, 0));
    assert_eq!(wal.read_frames(0, 25).unwrap().len(), 25);
    assert_eq!(write_n(&wal, 10), 35);
    drop(wal);
    let (wal, _) = Wal::open(dir.path(), options(10 * FRAME)).unwrap();
    let frames = wal.read_frames(0, 35).unwrap();
    assert!(frames
        .iter()
        .enumerate()
        .all(|(i, f)| f.lsn == i as u64 + 1 && f.payload == block(f.lsn)));
}

/// With zeroing ahead off, the file grows with each append, as it did.
#[test]
fn without_zeroes_ahead_a_segment_holds_only_its_frames() {
    let dir = tempfile::tempdir().unwrap();
    let opts = WalOptions {
        zero_ahead: 0,
        ..options(1 << 20)
    };
    let (wal, _) = Wal::open(dir.path(), opts.clone()).unwrap();
    write_n(&wal, 3);
    drop(wal);
    let seg = segments(dir.path()).pop().unwrap();
    assert_eq!(fs::metadata(&seg).unwrap().len(), 3 * FRAME);
}

#[test]
fn flipped_byte_before_valid_frames_is_an_error_and_nothing_is_truncated() {
    let (dir, seg) = closed_wal(5);
    let mut data = fs::read(&seg).unwrap();
    let len = data.len();
    data[(2 * FRAME + 100) as usize] ^= 0x01; // payload of lsn 3
    fs::write(&seg, &data).unwrap();
    let error = Wal::open(dir.path(), options(1 << 20)).unwrap_err();
    assert!(
        matches!(error, WalError::Corrupt { lsn: 3, offset, .. } if offset == 2 * FRAME),
        "{error}"
    );
    assert_eq!(fs::metadata(&seg).unwrap().len() as usize, len);
}

#[test]
fn corruption_in_an_earlier_segment_is_an_error() {
    let dir = tempfile::tempdir().unwrap();
    let (wal, _) = Wal::open(dir.path(), options(3 * FRAME)).unwrap();
    write_n(&wal, 7);
    drop(wal);
    let first = segments(dir.path()).remove(0);
    let file = OpenOptions::new().write(true).open(&first).unwrap();
    file.set_len(2 * FRAME + 10).unwrap(); // torn, but not the last segment
    assert!(matches!(
        Wal::open(dir.path(), options(3 * FRAME)),
        Err(WalError::Corrupt { .. })
    ));
}

#[test]
fn a_deleted_middle_segment_is_a_gap_error() {
    let dir = tempfile::tempdir().unwrap();
    let (wal, _) = Wal::open(dir.path(), options(3 * FRAME)).unwrap();
    write_n(&wal, 9);
    drop(wal);
    fs::remove_file(&segments(dir.path())[1]).unwrap();
    assert!(matches!(
        Wal::open(dir.path(), options(3 * FRAME)),
        Err(WalError::SegmentGap {
            expected: 4,
            found: 7,
            ..
        })
    ));
}

#[test]
fn failed_sync_poisons_and_nothing_more_is_acknowledged() {
    let dir = tempfile::tempdir().unwrap();
    let (wal, _) = Wal::open(dir.path(), options(1 << 20)).unwrap();
    write_n(&wal, 2);
    let lsn = wal.append(1, FrameKind::Write, 0, block(0)).unwrap();
    wal.inject_sync_failure();
    assert!(matches!(wal.sync_to(lsn), Err(WalError::Poisoned(_))));
    assert_eq!(wal.durable(), 2, "lsn 3 was never acknowledged");
    assert!(matches!(
        wal.append(1, FrameKind::Write, 0, block(0)),
        Err(WalError::Poisoned(_))
    ));
    assert!(matches!(wal.sync_to(3), Err(WalError::Poisoned(_))));
    assert!(wal.poisoned().unwrap().contains("Input/output error"));
}

#[test]
fn concurrent_appends_share_fsyncs() {
    let dir = tempfile::tempdir().unwrap();
    let (wal, _) = Wal::open(dir.path(), options(64 << 20)).unwrap();
    let mut durable = wal.subscribe_durable();
    let threads: Vec<_> = (0..16)
        .map(|_| {
            let wal = wal.clone();
            std::thread::spawn(move || {
                for _ in 0..20 {
                    let lsn = wal.append(1, FrameKind::Write, 0, block(1)).unwrap();
                    assert!(wal.sync_to(lsn).unwrap() >= lsn);
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    assert_eq!(wal.durable(), 320);
    assert!(
        wal.sync_count() < 320,
        "group commit: {} syncs for 320 appends",
        wal.sync_count()
    );
    assert_eq!(*durable.borrow_and_update(), 320);
}

#[test]
fn truncate_after_is_refused_below_the_checkpoint_and_survives_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let (wal, _) = Wal::open(dir.path(), options(4 * FRAME)).unwrap();
    write_n(&wal, 10);
    wal.set_checkpoint(3);
    assert!(matches!(
        wal.truncate_after(2),
        Err(WalError::BelowCheckpoint {
            lsn: 2,
            checkpoint: 3
        })
    ));
    wal.truncate_after(5).unwrap();
    assert_eq!(wal.head(), 5);
    assert_eq!(write_n(&wal, 1), 6);
    drop(wal);
    let (wal, report) = Wal::open(dir.path(), options(4 * FRAME)).unwrap();
    assert_eq!(report.head, 6);
    assert_eq!(wal.read_frames(4, 6).unwrap().len(), 2);
}

#[test]
fn replicated_appends_must_carry_the_next_lsn() {
    let dir = tempfile::tempdir().unwrap();
    let (wal, _) = Wal::open(dir.path(), options(1 << 20)).unwrap();
    let mut raw = bytes::BytesMut::new();
    Frame::write(1, 4, 0, block(1)).encode(&mut raw);
    Frame::write(2, 4, 1, block(2)).encode(&mut raw);
    assert_eq!(
        wal.append_replicated(&raw.clone().freeze()).unwrap().len(),
        2
    );
    assert_eq!(wal.head(), 2);
    assert!(matches!(
        wal.append_replicated(&raw.freeze()),
        Err(WalError::OutOfOrder {
            expected: 3,
            got: 1
        })
    ));
    let mut bad = bytes::BytesMut::new();
    Frame::write(3, 4, 0, block(3)).encode(&mut bad);
    let last = bad.len() - 1;
    bad[last] ^= 1;
    assert!(matches!(
        wal.append_replicated(&bad.freeze()),
        Err(WalError::Frame(_))
    ));
    assert_eq!(wal.head(), 2);
}

#[test]
fn retention_follows_checkpoint_and_pins() {
    let dir = tempfile::tempdir().unwrap();
    let mut opts = options(4 * FRAME);
    opts.max_retained_bytes = Some(10 * FRAME);
    let (wal, _) = Wal::open(dir.path(), opts).unwrap();
    write_n(&wal, 20);
    let pin = wal.pin_from(6, "replica b catch-up").unwrap();
    wal.set_checkpoint(16);
    let report = wal.recycle().unwrap();
    assert_eq!(
        (report.floor, report.tail, report.segments_deleted),
        (6, 4, 1)
    );
    let retention = wal.retention();
    assert!(
        retention.over_limit,
        "{} retained",
        retention.retained_bytes
    );
    assert_eq!(
        retention.pins[0].bytes_held,
        10 * FRAME,
        "lsns 7..=16 kept only by the pin"
    );
    assert_eq!(wal.pin_stats().count, 1);
    assert!(matches!(
        wal.pin_from(3, "too old"),
        Err(WalError::PinBelowTail { lsn: 3, tail: 4 })
    ));
    drop(pin);
    assert_eq!(wal.pin_stats().count, 0);
    assert_eq!(wal.recycle().unwrap().tail, 16);
    assert!(matches!(
        wal.plan_read(10, 20, 1 << 20),
        Err(WalError::Recycled { from: 10, tail: 16 })
    ));
}

#[test]
fn pins_are_released_on_early_return_and_on_panic() {
    let dir = tempfile::tempdir().unwrap();
    let (wal, _) = Wal::open(dir.path(), options(1 << 20)).unwrap();
    write_n(&wal, 4);
    let early = |wal: &Wal| -> Result<(), WalError> {
        let _pin = wal.pin_from(1, "early")?;
        wal.plan_read(0, 99, 1024)?; // fails: beyond head
        Ok(())
    };
    assert!(early(&wal).is_err());
    assert_eq!(wal.pin_stats().count, 0);
    let shared = Arc::new(wal.clone());
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        let _pin = shared.pin_from(2, "panicking").unwrap();
        panic!("executor crashed");
    }));
    assert!(result.is_err());
    assert_eq!(wal.pin_stats().count, 0);
}

#[test]
fn older_generations_are_removed_and_newer_ones_refused() {
    let dir = tempfile::tempdir().unwrap();
    let (wal, _) = Wal::open(
        dir.path(),
        WalOptions {
            generation: 1,
            ..options(1 << 20)
        },
    )
    .unwrap();
    write_n(&wal, 3);
    drop(wal);
    let opts = WalOptions {
        generation: 2,
        start_after: 100,
        ..options(1 << 20)
    };
    let (wal, report) = Wal::open(dir.path(), opts).unwrap();
    assert_eq!(
        (report.stale_segments_removed, report.head, report.tail),
        (1, 100, 100)
    );
    assert_eq!(write_n(&wal, 1), 101);
    drop(wal);
    assert!(matches!(
        Wal::open(
            dir.path(),
            WalOptions {
                generation: 1,
                ..options(1 << 20)
            }
        ),
        Err(WalError::NewerGeneration {
            expected: 1,
            found: 2
        })
    ));
}

#[test]
fn read_plan_cuts_at_frame_boundaries_across_segments() {
    let dir = tempfile::tempdir().unwrap();
    let (wal, _) = Wal::open(dir.path(), options(5 * FRAME)).unwrap();
    write_n(&wal, 12);
    let chunks = wal.plan_read(2, 11, (2 * FRAME) as usize).unwrap();
    let ranges: Vec<(u64, u64)> = chunks.iter().map(|c| (c.first_lsn, c.last_lsn)).collect();
    assert_eq!(
        ranges,
        vec![(3, 4), (5, 5), (6, 7), (8, 9), (10, 10), (11, 11)]
    );
    assert!(chunks
        .iter()
        .all(|c| c.len as u64 == (c.last_lsn - c.first_lsn + 1) * FRAME));
    assert!(matches!(
        wal.plan_read(0, 13, 1024),
        Err(WalError::BeyondHead { to: 13, head: 12 })
    ));
}

#[test]
fn batched_reads_hand_over_the_log_in_bounded_batches_and_stop_on_error() {
    let dir = tempfile::tempdir().unwrap();
    let (wal, _) = Wal::open(dir.path(), options(10 * FRAME)).unwrap();
    write_n(&wal, 35); // 4 segments: a read chunk never crosses one
    let mut batches = Vec::new();
    wal.read_frames_batched(3, 35, 2 * FRAME as usize, |frames| {
        batches.push(frames.iter().map(|f| f.lsn).collect::<Vec<_>>());
        Ok::<_, WalError>(())
    })
    .unwrap();
    let lsns: Vec<u64> = batches.iter().flatten().copied().collect();
    assert_eq!(lsns, (4..=35).collect::<Vec<_>>());
    // A batch closes once it reaches the budget: at most one chunk (here one
    // segment's frames) past it.
    assert!(batches.len() >= 4, "{} batches", batches.len());
    assert!(batches.iter().all(|b| b.len() <= 2 + 10), "{batches:?}");
    // An error from the consumer ends the walk.
    let mut seen = 0;
    let result = wal.read_frames_batched(0, 35, 1, |_| {
        seen += 1;
        Err(WalError::Poisoned("consumer gave up".into()))
    });
    assert!(result.is_err());
    assert_eq!(seen, 1);
}

fn start(epoch: u64, first_lsn: u64) -> EpochStart {
    EpochStart { epoch, first_lsn }
}

fn write_in(wal: &Wal, epoch: u64, n: u64) -> u64 {
    let mut last = 0;
    for _ in 0..n {
        let lsn = wal.head() + 1;
        last = wal
            .append(epoch, FrameKind::Write, lsn, block(lsn))
            .unwrap();
    }
    wal.sync_to(last).unwrap();
    last
}

#[test]
fn the_epoch_history_is_kept_durably_and_outlives_recycled_segments() {
    let dir = tempfile::tempdir().unwrap();
    let (wal, _) = Wal::open(dir.path(), options(5 * FRAME)).unwrap();
    write_in(&wal, 1, 12);
    write_in(&wal, 3, 8);
    assert_eq!(wal.epochs(), [start(1, 1), start(3, 13)]);
    assert_eq!(wal.newest_epoch(), Some(start(3, 13)));
    // An append from an older epoch is refused and writes nothing.
    assert!(matches!(
        wal.append(2, FrameKind::Write, 0, block(0)),
        Err(WalError::Epochs(EpochError::Regressed {
            lsn: 21,
            epoch: 2,
            newest: 3
        }))
    ));
    assert_eq!(wal.head(), 20);
    // The segments holding epoch 1's first frames go; the history stays.
    wal.set_checkpoint(15);
    assert!(wal.recycle().unwrap().tail >= 10);
    drop(wal);
    let (wal, report) = Wal::open(dir.path(), options(5 * FRAME)).unwrap();
    assert!(report.tail >= 10);
    assert_eq!(wal.epochs(), [start(1, 1), start(3, 13)]);
    // Truncation drops the epochs that start after the cut.
    wal.truncate_after(15).unwrap();
    assert_eq!(wal.epochs(), [start(1, 1), start(3, 13)]);
    wal.set_checkpoint(10);
    drop(wal);
    let (wal, _) = Wal::open(dir.path(), options(5 * FRAME)).unwrap();
    assert_eq!(wal.epochs(), [start(1, 1), start(3, 13)]);
}

#[test]
fn truncation_below_an_epoch_forgets_it_durably() {
    let dir = tempfile::tempdir().unwrap();
    let (wal, _) = Wal::open(dir.path(), options(1 << 20)).unwrap();
    write_in(&wal, 1, 5);
    write_in(&wal, 2, 5);
    wal.truncate_after(5).unwrap();
    assert_eq!(wal.epochs(), [start(1, 1)]);
    // The next epoch's frames take the truncated LSNs.
    write_in(&wal, 4, 2);
    assert_eq!(wal.epochs(), [start(1, 1), start(4, 6)]);
    drop(wal);
    let (wal, _) = Wal::open(dir.path(), options(1 << 20)).unwrap();
    assert_eq!(wal.epochs(), [start(1, 1), start(4, 6)]);
}

#[test]
fn after_a_crash_the_history_is_checked_against_the_frames() {
    let dir = tempfile::tempdir().unwrap();
    let (wal, _) = Wal::open(dir.path(), options(1 << 20)).unwrap();
    write_in(&wal, 1, 3);
    write_in(&wal, 2, 3);
    drop(wal);
    // A crash before the history was written: the frames say it.
    fs::remove_file(dir.path().join("epochs.1")).unwrap();
    let (wal, _) = Wal::open(dir.path(), options(1 << 20)).unwrap();
    assert_eq!(wal.epochs(), [start(1, 1), start(2, 4)]);
    drop(wal);
    assert!(dir.path().join("epochs.1").exists(), "rewritten on open");
    // A crash that took epoch 2's frames: its entry goes with them.
    let segment = segments(dir.path()).pop().unwrap();
    let file = OpenOptions::new().write(true).open(&segment).unwrap();
    file.set_len(3 * FRAME).unwrap();
    let (wal, report) = Wal::open(dir.path(), options(1 << 20)).unwrap();
    assert_eq!(report.head, 3);
    assert_eq!(wal.epochs(), [start(1, 1)]);
    // A damaged history file is an error, not a silent reset.
    drop(wal);
    let path = dir.path().join("epochs.1");
    let mut bytes = fs::read(&path).unwrap();
    bytes[12] ^= 1;
    fs::write(&path, bytes).unwrap();
    assert!(matches!(
        Wal::open(dir.path(), options(1 << 20)),
        Err(WalError::Epochs(EpochError::Corrupt { .. }))
    ));
}

#[test]
fn replicated_batches_record_every_epoch_they_carry() {
    let primary_dir = tempfile::tempdir().unwrap();
    let replica_dir = tempfile::tempdir().unwrap();
    let (primary, _) = Wal::open(primary_dir.path(), options(1 << 20)).unwrap();
    let (replica, _) = Wal::open(replica_dir.path(), options(1 << 20)).unwrap();
    write_in(&primary, 2, 4);
    write_in(&primary, 5, 4);
    write_in(&primary, 6, 1);
    let (raw, last) = primary.read_raw(0, 9, 1 << 20).unwrap();
    assert_eq!(last, 9);
    replica.append_replicated(&raw).unwrap();
    assert_eq!(replica.epochs(), primary.epochs());
    assert_eq!(replica.epochs(), [start(2, 1), start(5, 5), start(6, 9)]);
}

/// A WAL of 1 MiB segments holding ten frames, every one applied elsewhere
/// (the checkpoint at its head).
fn applied_wal() -> (tempfile::TempDir, Wal) {
    let dir = tempfile::tempdir().unwrap();
    let (wal, _) = Wal::open(dir.path(), options(1 << 20)).unwrap();
    write_n(&wal, 10);
    wal.set_checkpoint(10);
    (dir, wal)
}

fn started_after(lsn: u64) -> WalOptions {
    WalOptions {
        start_after: lsn,
        ..options(1 << 20)
    }
}

#[test]
fn a_restart_after_an_applied_lsn_replaces_every_segment() {
    let (dir, wal) = applied_wal();
    let history = [
        EpochStart {
            epoch: 1,
            first_lsn: 1,
        },
        EpochStart {
            epoch: 4,
            first_lsn: 20,
        },
    ];
    wal.restart_after(30, &history).unwrap();
    assert_eq!(
        (wal.head(), wal.tail(), wal.checkpoint(), wal.durable()),
        (30, 30, 30, 30)
    );
    assert_eq!(wal.epochs(), history);
    // Repeating it (a retry after a failure) changes nothing.
    wal.restart_after(30, &history).unwrap();
    assert_eq!(
        segments(dir.path()),
        [dir.path().join("0000000001-00000000000000000031.wal")]
    );
    let last = wal.append(4, FrameKind::Write, 3, block(31)).unwrap();
    assert_eq!(last, 31);
    wal.sync_to(31).unwrap();
    drop(wal);
    let (wal, report) = Wal::open(dir.path(), started_after(30)).unwrap();
    assert_eq!((report.head, report.tail), (31, 30));
    assert_eq!(wal.epochs(), history);
    assert_eq!(wal.read_frames(30, 31).unwrap()[0].payload, block(31));
}

#[test]
fn a_restart_is_refused_over_unapplied_frames_or_pins() {
    let (_dir, wal) = applied_wal();
    let history = wal.epochs();
    assert!(matches!(
        wal.restart_after(9, &history),
        Err(WalError::NotApplied { head: 10, .. })
    ));
    let pin = wal.pin_from(5, "reader").unwrap();
    assert!(matches!(
        wal.restart_after(20, &history),
        Err(WalError::Pinned { pins: 1 })
    ));
    drop(pin);
    write_n(&wal, 1);
    assert!(matches!(
        wal.restart_after(20, &history),
        Err(WalError::NotApplied {
            head: 11,
            checkpoint: 10,
            ..
        })
    ));
    assert_eq!(wal.head(), 11, "nothing changed");
}

/// The crash windows of a restart after 30, the checkpoint already at 30:
/// old segments only (the restart never began), old and new (the old not
/// yet deleted), none (deleted, the new never created). Each reopens after
/// 30 with the history up to it.
#[test]
fn an_interrupted_restart_reopens_after_the_checkpoint() {
    for window in ["old only", "old and new", "none"] {
        let (dir, wal) = applied_wal();
        let mut history = wal.epochs();
        history.push(EpochStart {
            epoch: 2,
            first_lsn: 25,
        });
        // As the store does: the history first, then the checkpoint.
        wal.store_epochs(&history).unwrap();
        drop(wal);
        match window {
            "old and new" => {
                fs::File::create(dir.path().join("0000000001-00000000000000000031.wal")).unwrap();
            }
            "none" => {
                for segment in segments(dir.path()) {
                    fs::remove_file(segment).unwrap();
                }
            }
            _ => {}
        }
        let (wal, report) = Wal::open(dir.path(), started_after(30)).unwrap();
        assert_eq!((report.head, report.tail), (30, 30), "{window}");
        assert_eq!(
            report.superseded_segments_removed,
            usize::from(window != "none"),
            "{window}"
        );
        assert_eq!(wal.epochs(), history, "{window}");
        assert_eq!(segments(dir.path()).len(), 1, "{window}");
        assert_eq!(
            wal.append(2, FrameKind::Write, 0, block(31)).unwrap(),
            31,
            "{window}"
        );
    }
}

#[test]
fn a_gap_above_the_checkpoint_is_still_an_error() {
    let (dir, wal) = applied_wal();
    drop(wal);
    fs::File::create(dir.path().join("0000000001-00000000000000000031.wal")).unwrap();
    assert!(matches!(
        Wal::open(dir.path(), started_after(20)),
        Err(WalError::SegmentGap {
            expected: 11,
            found: 31,
            ..
        })
    ));
    // With the checkpoint at 30, the same gap is a restart a crash
    // interrupted: the old segment goes.
    let (wal, report) = Wal::open(dir.path(), started_after(30)).unwrap();
    assert_eq!(
        (
            report.head,
            report.superseded_segments_removed,
            wal.epochs().len()
        ),
        (30, 1, 1)
    );
}

/// A rotation whose write failed leaves an empty last segment named for
/// the next LSN: a restart there keeps it as the new segment.
#[test]
fn a_restart_onto_an_empty_last_segment_keeps_it() {
    let (dir, wal) = applied_wal();
    drop(wal);
    let empty = dir.path().join("0000000001-00000000000000000011.wal");
    fs::File::create(&empty).unwrap();
    let (wal, _) = Wal::open(dir.path(), options(1 << 20)).unwrap();
    wal.set_checkpoint(10);
    wal.restart_after(10, &wal.epochs()).unwrap();
    assert_eq!(segments(dir.path()), [empty]);
    assert_eq!(write_n(&wal, 1), 11);
    drop(wal);
    let (wal, report) = Wal::open(dir.path(), started_after(10)).unwrap();
    assert_eq!((report.head, report.tail), (11, 10));
    assert_eq!(wal.read_frames(10, 11).unwrap()[0].payload, block(11));
}
