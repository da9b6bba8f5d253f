//! The checkpoint's coalesced apply against applying frame by frame.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use bytes::Bytes;
use proptest::prelude::*;
use proptest::test_runner::FileFailurePersistence;
use walship_io::{ExtentFile, Frame, FrameKind, BLOCK_SIZE, COALESCE_BYTES};

const BLOCKS: u64 = 600; // more than one coalesced write (256 blocks) wide

#[derive(Debug, Clone)]
enum Op {
    Write { lba: u64, blocks: u64, fill: u8 },
    Trim { lba: u64, blocks: u64 },
    Barrier,
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        6 => (0..BLOCKS, 1..8u64, any::<u8>()).prop_map(|(lba, blocks, fill)| Op::Write {
            lba: lba.min(BLOCKS - blocks),
            blocks,
            fill,
        }),
        1 => (0..BLOCKS, 1..300u64).prop_map(|(lba, blocks)| Op::Trim {
            lba: lba.min(BLOCKS - blocks.min(BLOCKS)),
            blocks: blocks.min(BLOCKS),
        }),
        1 => Just(Op::Barrier),
    ]
}

fn frames(ops: &[Op]) -> Vec<Frame> {
    ops.iter()
        .enumerate()
        .map(|(i, op)| {
            let (kind, lba, payload) = match *op {
                Op::Write { lba, blocks, fill } => (
                    FrameKind::Write,
                    lba,
                    // Each block distinct, so a misplaced block shows.
                    Bytes::from(
                        (0..blocks)
                            .flat_map(|b| vec![fill.wrapping_add(b as u8); BLOCK_SIZE])
                            .collect::<Vec<u8>>(),
                    ),
                ),
                Op::Trim { lba, blocks } => (
                    FrameKind::Trim,
                    lba,
                    Bytes::copy_from_slice(&blocks.to_le_bytes()),
                ),
                Op::Barrier => (FrameKind::Barrier, 0, Bytes::new()),
            };
            Frame {
                lsn: i as u64 + 1,
                epoch: 1,
                kind,
                flags: 0,
                lba,
                payload,
            }
        })
        .collect()
}

fn contents(extent: &ExtentFile) -> Vec<u8> {
    extent.read(0, BLOCKS).unwrap()
}

proptest! {
    // Replays `extent.proptest-regressions` (beside this file) first.
    #![proptest_config(ProptestConfig {
        cases: 64,
        failure_persistence: Some(Box::new(FileFailurePersistence::WithSource("proptest-regressions"))),
        ..ProptestConfig::default()
    })]

    #[test]
    fn coalesced_apply_equals_frame_by_frame(ops in proptest::collection::vec(op(), 1..120)) {
        let dir = tempfile::tempdir().unwrap();
        let one_by_one = ExtentFile::open(&dir.path().join("a"), BLOCKS).unwrap();
        let coalesced = ExtentFile::open(&dir.path().join("b"), BLOCKS).unwrap();
        let frames = frames(&ops);
        for frame in &frames {
            one_by_one.apply(frame).unwrap();
        }
        let stats = coalesced.apply_all(&frames).unwrap();
        prop_assert!(contents(&one_by_one) == contents(&coalesced));
        prop_assert!(stats.written_blocks <= stats.frame_blocks);
    }
}

#[test]
fn a_hot_block_is_written_once_and_neighbours_join_up() {
    let dir = tempfile::tempdir().unwrap();
    let extent = ExtentFile::open(&dir.path().join("e"), BLOCKS).unwrap();
    let mut ops: Vec<Op> = (0..100)
        .map(|i| Op::Write {
            lba: 7,
            blocks: 1,
            fill: i,
        })
        .collect();
    // 300 adjacent blocks written back to front, one frame each.
    ops.extend((0..300).rev().map(|lba| Op::Write {
        lba: 200 + lba,
        blocks: 1,
        fill: 1,
    }));
    let stats = extent.apply_all(&frames(&ops)).unwrap();
    assert_eq!(stats.frame_blocks, 400);
    assert_eq!(stats.written_blocks, 301);
    // Block 7 alone, then 300 blocks in writes of at most 1 MiB (256 blocks).
    let per_write = (COALESCE_BYTES / BLOCK_SIZE) as u64;
    assert_eq!(stats.write_calls, 1 + 300u64.div_ceil(per_write));
    assert_eq!(extent.read(7, 1).unwrap(), vec![99u8; BLOCK_SIZE]);
}

#[test]
fn a_write_outside_the_volume_is_refused_before_anything_is_written() {
    let dir = tempfile::tempdir().unwrap();
    let extent = ExtentFile::open(&dir.path().join("e"), BLOCKS).unwrap();
    let ops = [
        Op::Write {
            lba: 0,
            blocks: 1,
            fill: 5,
        },
        Op::Write {
            lba: BLOCKS,
            blocks: 1,
            fill: 6,
        },
    ];
    assert!(extent.apply_all(&frames(&ops)).is_err());
    assert_eq!(extent.read(0, 1).unwrap(), vec![0u8; BLOCK_SIZE]);
}
