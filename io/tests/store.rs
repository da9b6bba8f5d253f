//! The local store: reads of the newest data, checkpoints, crash points,
//! snapshot and full-base pins, atomic base install.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use bytes::{Bytes, BytesMut};
use std::fs;
use std::path::Path;
use walship_io::*;

mod common;
use common::segments;

const BLOCKS: u64 = 256;

fn options() -> StoreOptions {
    StoreOptions {
        segment_bytes: 16 * 4130,
        ..StoreOptions::new(BLOCKS)
    }
}

fn block(fill: u8) -> Bytes {
    Bytes::from(vec![fill; BLOCK_SIZE])
}

fn open(dir: &Path) -> Store {
    Store::open(dir, options()).unwrap().0
}

/// Writes `count` blocks with a pattern in epoch 1 and syncs; returns the last LSN.
fn fill(store: &Store, count: u64, seed: u8) -> u64 {
    fill_in(store, 1, count, seed)
}

/// [`fill`] in `epoch`.
fn fill_in(store: &Store, epoch: u64, count: u64, seed: u8) -> u64 {
    let mut last = 0;
    for i in 0..count {
        last = store
            .write(epoch, (i * 7) % BLOCKS, block(seed.wrapping_add(i as u8)))
            .unwrap();
    }
    store.sync_to(last).unwrap();
    last
}

#[test]
fn reads_return_the_newest_data_including_blocks_only_in_the_wal() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path());
    let lsn = store.write(1, 5, block(0xA)).unwrap();
    assert_eq!(store.read(5, 1).unwrap(), block(0xA));
    store.sync_to(lsn).unwrap();
    assert!(matches!(
        store.checkpoint(lsn).unwrap(),
        CheckpointOutcome::Done { to: 1, .. }
    ));
    store.write(1, 5, block(0xB)).unwrap();
    let two = store.read(4, 3).unwrap();
    assert_eq!(&two[..BLOCK_SIZE], &[0u8; BLOCK_SIZE][..]);
    assert_eq!(&two[BLOCK_SIZE..2 * BLOCK_SIZE], &block(0xB)[..]);
    store.trim(1, 5, 1).unwrap();
    assert_eq!(
        store.read(5, 1).unwrap(),
        Bytes::from(vec![0u8; BLOCK_SIZE])
    );
    assert!(matches!(
        store.write(1, BLOCKS, block(1)),
        Err(StoreError::Extent(ExtentError::OutOfRange { .. }))
    ));
}

#[test]
fn checkpoint_persists_and_lets_retention_advance() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path());
    let last = fill(&store, 100, 1);
    let before = store.content_checksum().unwrap();
    let CheckpointOutcome::Done { from, to, recycled } = store.checkpoint(u64::MAX).unwrap() else {
        panic!("checkpoint did nothing");
    };
    assert_eq!((from, to), (0, last));
    assert!(recycled.segments_deleted >= 5, "{recycled:?}");
    assert_eq!(store.superblock().checkpoint, last);
    assert_eq!(store.wal().tail(), recycled.tail);
    assert_eq!(store.content_checksum().unwrap(), before);
    drop(store);
    let (store, report) = Store::open(dir.path(), options()).unwrap();
    assert_eq!((report.checkpoint, report.replayed_frames), (last, 0));
    assert_eq!(store.content_checksum().unwrap(), before);
}

#[test]
fn unsynced_writes_beyond_durable_are_never_checkpointed() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path());
    let synced = fill(&store, 3, 1);
    store.write(1, 9, block(9)).unwrap();
    assert!(
        matches!(store.checkpoint(u64::MAX).unwrap(), CheckpointOutcome::Done { to, .. } if to == synced)
    );
}

#[test]
fn a_crash_at_any_point_reopens_to_the_same_content() {
    // 1. Crash after WAL sync, before any checkpoint.
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path());
    fill(&store, 40, 3);
    let expected = store.content_checksum().unwrap();
    drop(store);
    assert_eq!(open(dir.path()).content_checksum().unwrap(), expected);

    // 2. Crash mid-checkpoint: some frames already in the extent, superblock not yet committed.
    let store = open(dir.path());
    let wal = store.wal();
    let frames = wal.read_frames(0, 20).unwrap();
    let generation = store.superblock().generation;
    drop(store);
    let extent = ExtentFile::open(&ExtentFile::path(dir.path(), generation), BLOCKS).unwrap();
    for frame in &frames {
        extent.apply(frame).unwrap();
    }
    extent.sync().unwrap();
    drop(extent);
    assert_eq!(open(dir.path()).content_checksum().unwrap(), expected);

    // 3. Crash after the superblock commit, before recycling.
    let store = open(dir.path());
    store.checkpoint(u64::MAX).unwrap();
    drop(store);
    assert_eq!(open(dir.path()).content_checksum().unwrap(), expected);

    // 4. Crash with a torn, unsynced write at the tail: the synced content survives.
    let store = open(dir.path());
    store.write(1, 1, block(0xEE)).unwrap();
    drop(store);
    let wal_dir = dir.path().join("wal");
    let mut segments: Vec<_> = fs::read_dir(&wal_dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "wal"))
        .collect();
    segments.sort();
    let last = segments.last().unwrap();
    // The last frame's end, before the zeroes written ahead of it.
    let end = walship_io::inspect(dir.path())
        .segments
        .last()
        .unwrap()
        .bytes;
    fs::OpenOptions::new()
        .write(true)
        .open(last)
        .unwrap()
        .set_len(end - 100)
        .unwrap();
    let (store, report) = Store::open(dir.path(), options()).unwrap();
    assert!(report.torn_bytes_dropped > 0);
    assert_eq!(store.content_checksum().unwrap(), expected);
}

#[test]
fn a_snapshot_pin_keeps_its_image_while_writes_continue() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path());
    fill(&store, 30, 1);
    store.checkpoint(u64::MAX).unwrap();
    let image_before = store.content_checksum().unwrap();
    let pin = store.snapshot_pin("rebuild r2").unwrap();
    fill(&store, 30, 90);
    assert_eq!(
        store.checkpoint(u64::MAX).unwrap(),
        CheckpointOutcome::Paused { pins: 1 }
    );
    assert_eq!(pin.checksum().unwrap(), image_before);
    assert_ne!(store.content_checksum().unwrap(), image_before);
    assert_eq!(store.wal().pin_stats().count, 1);
    drop(pin);
    assert_eq!(store.wal().pin_stats().count, 0);
    assert!(matches!(
        store.checkpoint(u64::MAX).unwrap(),
        CheckpointOutcome::Done { .. }
    ));
}

/// Transfers the image as a sender does: one recycled buffer for every chunk.
fn transfer(pin: &SnapshotPin, install: &mut BaseInstall) {
    let mut buf = bytes::BytesMut::new();
    let mut allocation = None;
    let mut offset = 0;
    while offset < pin.image_bytes() {
        let len = (64 * 1024).min(pin.image_bytes() - offset) as usize;
        pin.read_into(offset, len, &mut buf).unwrap();
        assert_eq!(buf.len(), len);
        assert_eq!(&buf[..], &pin.read(offset, len).unwrap()[..]);
        // Equal-sized chunks land in the same allocation.
        if len == 64 * 1024 {
            assert_eq!(*allocation.get_or_insert(buf.as_ptr()), buf.as_ptr());
        }
        install.write_chunk(offset, &buf).unwrap();
        offset += len as u64;
    }
}

#[test]
fn a_full_base_installs_atomically_and_the_tail_replays_on_top() {
    let primary_dir = tempfile::tempdir().unwrap();
    let replica_dir = tempfile::tempdir().unwrap();
    let primary = open(primary_dir.path());
    let replica = open(replica_dir.path());
    // Stale history the base replaces, written in an epoch the primary never had.
    let stale = replica.write(5, 1, block(0x55)).unwrap();
    replica.sync_to(stale).unwrap();
    fill(&primary, 30, 7);
    let epoch_two = primary.write(2, 3, block(9)).unwrap();
    let base_lsn = fill_in(&primary, 2, 19, 17);
    let pin = primary.full_base_pin("base for r2").unwrap();
    assert_eq!(pin.lsn(), base_lsn);
    let base_checksum = primary.content_checksum().unwrap();
    let tail_end = fill_in(&primary, 2, 20, 200);
    let mut install = replica.begin_install(pin.lsn()).unwrap();
    transfer(&pin, &mut install);
    let history = primary.wal().epochs();
    assert_eq!(
        history,
        [
            EpochStart {
                epoch: 1,
                first_lsn: 1
            },
            EpochStart {
                epoch: 2,
                first_lsn: epoch_two
            }
        ]
    );
    replica
        .commit_install(install, pin.checksum().unwrap(), 3, &history)
        .unwrap();
    drop(pin);
    assert_eq!(replica.content_checksum().unwrap(), base_checksum);
    assert_eq!(
        (replica.wal().head(), replica.superblock().checkpoint),
        (50, 50)
    );
    assert_eq!(
        replica.wal().epochs(),
        history,
        "the image's history, not the stale one"
    );
    for raw in shipped(&primary, 50, tail_end, 1 << 16) {
        // Above what it is told is committed: through the WAL.
        replica.apply_replicated(&raw, 0).unwrap();
    }
    replica.sync_to(tail_end).unwrap();
    assert_eq!(
        replica.content_checksum().unwrap(),
        primary.content_checksum().unwrap()
    );
    drop(replica);
    let replica = open(replica_dir.path());
    assert_eq!(
        replica.content_checksum().unwrap(),
        primary.content_checksum().unwrap()
    );
    assert_eq!(replica.superblock().generation, 2);
    assert_eq!(
        replica.wal().epochs(),
        history,
        "the history survives a reopen"
    );
    assert!(!replica_dir.path().join("wal/epochs.1").exists());
}

/// The primary's WAL in (`from`, `to`], as batches of encoded frames of
/// at most `bytes` the way a sender ships them.
fn shipped(primary: &Store, from: u64, to: u64, bytes: usize) -> Vec<Bytes> {
    let chunks = primary.wal().plan_read(from, to, bytes).unwrap();
    chunks
        .iter()
        .map(|chunk| {
            Bytes::from(fs::read(chunk.path.as_ref()).unwrap())
                .slice(chunk.offset as usize..chunk.offset as usize + chunk.len)
        })
        .collect()
}

/// A store whose segments hold whole catch-up batches.
fn open_large(dir: &Path) -> Store {
    let options = StoreOptions {
        segment_bytes: 4 << 20,
        ..StoreOptions::new(BLOCKS)
    };
    Store::open(dir, options).unwrap().0
}

/// Batches of 64 one-block frames: a catch-up's size, just over
/// [`DIRECT_MIN_BYTES`].
const BULK: usize = DIRECT_MIN_BYTES + 4130;

#[test]
fn committed_frames_go_straight_to_the_extent_and_are_recorded_as_a_checkpoint() {
    let primary_dir = tempfile::tempdir().unwrap();
    let replica_dir = tempfile::tempdir().unwrap();
    let primary = open_large(primary_dir.path());
    fill_in(&primary, 1, 128, 3);
    let committed = fill_in(&primary, 2, 128, 9);
    let replica = open_large(replica_dir.path());
    let batches = shipped(&primary, 0, committed, BULK);
    assert_eq!(batches.len(), 4, "several batches make one run");
    for raw in &batches {
        assert!(raw.len() >= DIRECT_MIN_BYTES);
        replica.apply_replicated(raw, committed).unwrap();
    }
    // Written, readable, not yet recorded: the WAL holds none of it.
    assert_eq!((replica.head(), replica.wal().head()), (committed, 0));
    assert_eq!(
        replica.content_checksum().unwrap(),
        primary.content_checksum().unwrap()
    );
    assert_eq!(replica.sync_to(committed).unwrap(), committed);
    assert_eq!(
        (
            replica.superblock().checkpoint,
            replica.wal().head(),
            replica.wal().tail()
        ),
        (committed, committed, committed)
    );
    assert_eq!(replica.wal().epochs(), primary.wal().epochs());
    assert_eq!(segments(&replica_dir.path().join("wal")).len(), 1);
    // Small batches (a live stream's), and frames past what the primary
    // calls committed, go to the WAL.
    let small = fill_in(&primary, 2, 5, 50);
    for raw in shipped(&primary, committed, small, 1 << 16) {
        replica.apply_replicated(&raw, small).unwrap();
    }
    let uncommitted = fill_in(&primary, 2, 64, 70);
    for raw in shipped(&primary, small, uncommitted, BULK) {
        replica.apply_replicated(&raw, small).unwrap();
    }
    assert_eq!(replica.wal().head(), uncommitted);
    replica.sync_to(uncommitted).unwrap();
    drop(replica);
    let replica = open_large(replica_dir.path());
    assert_eq!(
        replica.content_checksum().unwrap(),
        primary.content_checksum().unwrap()
    );
    assert_eq!(replica.wal().epochs(), primary.wal().epochs());
    assert_eq!(replica.superblock().checkpoint, committed);
    // Like any checkpoint: what it recorded cannot be truncated.
    assert!(matches!(
        replica.truncate_after(committed - 1),
        Err(StoreError::Wal(WalError::BelowCheckpoint { .. }))
    ));
    replica.truncate_after(committed).unwrap();
    assert_eq!(replica.head(), committed);
}

/// A primary that wrote 64 blocks, then `more`, and an empty replica:
/// their directories, the stores, and the primary's LSNs after each.
fn primary_and_replica(more: u64) -> ([tempfile::TempDir; 2], Store, Store, u64, u64) {
    let dirs = [tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap()];
    let primary = open_large(dirs[0].path());
    let first = fill(&primary, 64, 1);
    let committed = fill(&primary, more, 2);
    let replica = open_large(dirs[1].path());
    (dirs, primary, replica, first, committed)
}

#[test]
fn the_wal_is_checkpointed_before_committed_frames_skip_it() {
    let (dirs, primary, replica, first, committed) = primary_and_replica(192);
    let replica_dir = &dirs[1];
    // Not committed when it arrived: in the WAL, not checkpointed.
    for raw in shipped(&primary, 0, first, BULK) {
        replica.apply_replicated(&raw, 0).unwrap();
    }
    assert_eq!(replica.superblock().checkpoint, 0);
    for raw in shipped(&primary, first, committed, BULK) {
        replica.apply_replicated(&raw, committed).unwrap();
    }
    assert_eq!(
        (
            replica.head(),
            replica.wal().head(),
            replica.superblock().checkpoint
        ),
        (committed, first, first)
    );
    assert!(replica_dir.path().join("RUN").exists());
    replica.sync_to(committed).unwrap();
    assert!(!replica_dir.path().join("RUN").exists());
    assert_eq!(
        replica.content_checksum().unwrap(),
        primary.content_checksum().unwrap()
    );
}

/// A crash before a run is recorded leaves some of its blocks in the
/// extent, past the checkpoint: a replica starts over empty (its epoch
/// kept), a primary refuses to open.
#[test]
fn a_crash_before_a_run_is_recorded_makes_a_replica_start_over() {
    let (dirs, primary, replica, first, committed) = primary_and_replica(128);
    let replica_dir = &dirs[1];
    for raw in shipped(&primary, 0, first, BULK) {
        replica.apply_replicated(&raw, first).unwrap();
    }
    replica.sync_to(first).unwrap();
    replica.persist_epoch(7).unwrap();
    for raw in shipped(&primary, first, committed, BULK) {
        replica.apply_replicated(&raw, committed).unwrap();
    }
    drop(replica);
    let options = || StoreOptions {
        segment_bytes: 4 << 20,
        ..StoreOptions::new(BLOCKS)
    };
    assert!(matches!(
        Store::open(replica_dir.path(), options()),
        Err(StoreError::InterruptedRun { checkpoint }) if checkpoint == first
    ));
    // An install a crash cut before its commit left the next generation's
    // image: the fresh start must not take it for its own.
    fs::write(
        replica_dir.path().join("extent.2"),
        vec![0xab; BLOCKS as usize * BLOCK_SIZE],
    )
    .unwrap();
    let replica_options = StoreOptions {
        reset_interrupted_run: true,
        ..options()
    };
    let (replica, report) = Store::open(replica_dir.path(), replica_options.clone()).unwrap();
    assert_eq!(report.reset_after_interrupted_run, Some(first));
    let superblock = replica.superblock();
    assert_eq!(
        (
            replica.head(),
            superblock.checkpoint,
            superblock.generation,
            superblock.epoch
        ),
        (0, 0, 2, 7)
    );
    assert!(replica.wal().epochs().is_empty());
    assert_eq!(
        replica.read(0, BLOCKS).unwrap(),
        vec![0u8; BLOCKS as usize * BLOCK_SIZE]
    );
    assert!(!replica_dir.path().join("RUN").exists());
    assert!(!replica_dir.path().join("extent.1").exists());
    // Sent everything again, it holds what the primary does.
    for raw in shipped(&primary, 0, committed, BULK) {
        replica.apply_replicated(&raw, committed).unwrap();
    }
    replica.sync_to(committed).unwrap();
    assert_eq!(
        replica.content_checksum().unwrap(),
        primary.content_checksum().unwrap()
    );
    drop(replica);
    let (_, report) = Store::open(replica_dir.path(), replica_options).unwrap();
    assert_eq!(report.reset_after_interrupted_run, None);
}

/// A run marker naming `lsn`, as the store writes it.
fn run_marker(lsn: u64) -> Vec<u8> {
    let mut bytes = lsn.to_le_bytes().to_vec();
    bytes.extend_from_slice(&crc32c::crc32c(&bytes).to_le_bytes());
    bytes
}

/// A closed store of `count` writes, all checkpointed: its directory and
/// its last LSN.
fn checkpointed(count: u64) -> (tempfile::TempDir, u64) {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path());
    let last = fill(&store, count, 1);
    store.checkpoint(last).unwrap();
    (dir, last)
}

/// A marker whose run was recorded (a crash came before it was removed),
/// or whose own write a crash cut, changes nothing.
#[test]
fn a_stale_or_torn_run_marker_is_removed() {
    let (dir, last) = checkpointed(20);
    let before = open(dir.path()).content_checksum().unwrap();
    // A live marker with one bit flipped in its crc: torn.
    let mut torn = run_marker(last);
    torn[11] ^= 1;
    for marker in [run_marker(last - 1), torn, vec![0u8; 5], Vec::new()] {
        fs::write(dir.path().join("RUN"), marker).unwrap();
        let (store, report) = Store::open(dir.path(), options()).unwrap();
        assert_eq!(report.reset_after_interrupted_run, None);
        assert_eq!(store.content_checksum().unwrap(), before);
        assert!(!dir.path().join("RUN").exists());
    }
}

#[test]
fn a_bad_or_interrupted_base_changes_nothing() {
    let primary_dir = tempfile::tempdir().unwrap();
    let replica_dir = tempfile::tempdir().unwrap();
    let primary = open(primary_dir.path());
    let replica = open(replica_dir.path());
    fill(&primary, 20, 7);
    fill(&replica, 5, 1);
    let before = replica.content_checksum().unwrap();
    let pin = primary.full_base_pin("base").unwrap();
    let mut install = replica.begin_install(pin.lsn()).unwrap();
    assert!(matches!(
        install.write_chunk(4096, &[0; 10]),
        Err(StoreError::ChunkOutOfOrder {
            expected: 0,
            got: 4096
        })
    ));
    transfer(&pin, &mut install);
    let wrong = pin.checksum().unwrap() ^ 1;
    assert!(matches!(
        replica.commit_install(install, wrong, 3, &primary.wal().epochs()),
        Err(StoreError::BaseChecksum { .. })
    ));
    assert_eq!(replica.content_checksum().unwrap(), before);
    // Interrupted: staging written, never committed, then a restart.
    let mut install = replica.begin_install(pin.lsn()).unwrap();
    transfer(&pin, &mut install);
    drop(install);
    drop(replica);
    let replica = open(replica_dir.path());
    assert_eq!(replica.content_checksum().unwrap(), before);
    assert!(!replica_dir.path().join("extent.2.staging").exists());
}

#[test]
fn truncation_drops_uncommitted_blocks_and_is_refused_below_the_checkpoint() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path());
    let committed = fill(&store, 5, 1);
    let before = store.content_checksum().unwrap();
    fill(&store, 5, 100);
    store.truncate_after(committed).unwrap();
    assert_eq!(store.content_checksum().unwrap(), before);
    store.checkpoint(u64::MAX).unwrap();
    assert!(matches!(
        store.truncate_after(committed - 1),
        Err(StoreError::Wal(WalError::BelowCheckpoint { .. }))
    ));
}

#[test]
fn a_replicated_frame_outside_the_volume_is_refused_before_it_reaches_the_wal() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path());
    let mut raw = BytesMut::new();
    Frame::write(1, 1, 0, block(1)).encode(&mut raw);
    Frame::write(2, 1, BLOCKS + 10, block(2)).encode(&mut raw);
    assert!(matches!(
        store.apply_replicated(&raw.freeze(), u64::MAX),
        Err(StoreError::Extent(ExtentError::OutOfRange { .. }))
    ));
    assert_eq!((store.head(), store.wal().head()), (0, 0));
}

#[test]
fn a_corrupt_superblock_or_wrong_size_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    drop(open(dir.path()));
    assert!(matches!(
        Store::open(dir.path(), StoreOptions::new(BLOCKS * 2)),
        Err(StoreError::SizeMismatch {
            on_disk: BLOCKS,
            ..
        })
    ));
    let path = dir.path().join("superblock");
    let mut data = fs::read(&path).unwrap();
    data[41] ^= 1;
    fs::write(&path, data).unwrap();
    assert!(matches!(
        Store::open(dir.path(), options()),
        Err(StoreError::Superblock(SuperblockError::Corrupt { .. }))
    ));
}

#[test]
fn a_second_instance_on_the_same_directory_waits_then_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let first = open(dir.path());
    let wait = std::time::Duration::from_millis(50);
    let started = std::time::Instant::now();
    let second = Store::open(
        dir.path(),
        StoreOptions {
            lock_wait: wait,
            ..options()
        },
    )
    .map(|_| ());
    assert!(matches!(second, Err(StoreError::Locked(_))), "{second:?}");
    assert!(started.elapsed() >= wait);
    // An open that waits long enough gets the directory once the first
    // instance is gone.
    let path = dir.path().to_path_buf();
    let opener = std::thread::spawn(move || Store::open(&path, options()).map(|_| ()));
    std::thread::sleep(std::time::Duration::from_millis(100));
    assert!(!opener.is_finished());
    drop(first);
    opener.join().unwrap().unwrap();
}

/// The crash window between a run's superblock commit and its WAL restart:
/// the WAL ends below the checkpoint. `inspect` calls it no problem, and
/// `open` restarts the WAL after the checkpoint. A live run marker is a
/// problem `inspect` names.
#[test]
fn inspect_agrees_with_open_on_a_restart_and_a_run_marker() {
    let (dir, last) = checkpointed(10);
    let superblock = open(dir.path()).superblock();
    Superblock {
        checkpoint: last + 40,
        ..superblock
    }
    .store(dir.path())
    .unwrap();
    let report = inspect(dir.path());
    assert!(report.problems.is_empty(), "{:?}", report.problems);
    assert_eq!(report.notes.len(), 1, "{:?}", report.notes);
    let store = open(dir.path());
    assert_eq!(
        (
            store.head(),
            store.wal().tail(),
            store.superblock().checkpoint
        ),
        (last + 40, last + 40, last + 40)
    );
    drop(store);
    fs::write(dir.path().join("RUN"), run_marker(last + 40)).unwrap();
    let report = inspect(dir.path());
    assert_eq!(report.problems.len(), 1, "{:?}", report.problems);
    assert!(report.problems[0].starts_with("RUN:"));
}

#[test]
fn the_committed_floor_only_rises_unless_an_install_lowers_it_and_outlives_a_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path());
    let generation = store.superblock().generation;
    assert_eq!(store.committed_floor(), 0);
    store.raise_committed_floor(40, generation).unwrap();
    store.raise_committed_floor(30, generation).unwrap();
    assert_eq!(
        store.committed_floor(),
        40,
        "a lower value does not lower it"
    );
    // A job that read it before the store changed generation is too late.
    store.raise_committed_floor(90, generation + 1).unwrap();
    assert_eq!(store.committed_floor(), 40);
    store.lower_committed_floor(50).unwrap();
    assert_eq!(store.committed_floor(), 40, "lowering never raises");
    store.lower_committed_floor(25).unwrap();
    drop(store);
    assert_eq!(open(dir.path()).committed_floor(), 25);
}
