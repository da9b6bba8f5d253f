//! What a delta rebuild needs of a store, on real files and on the
//! page-cache model: dirty maps that cover exactly what checkpoints
//! applied after their `since`, kept across a reopen and dropped when the
//! history changes; an install in place that is either committed or says
//! the store is partial, whatever operation a crash or a power loss cuts.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use bytes::Bytes;
use std::sync::Arc;
use walship_io::fs::{Fault, PowerLoss, SimFs};
use walship_io::regions::{region_bytes, region_sums};
use walship_io::*;

const BLOCKS: u64 = 256; // 1 MiB: 16 regions of 64 KiB
const REGION_BLOCKS: u64 = 16;

fn block(fill: u8) -> Bytes {
    Bytes::from(vec![fill; BLOCK_SIZE])
}

fn write_sync(store: &Store, lba: u64, fill: u8) -> u64 {
    let lsn = store.write(1, lba, block(fill)).unwrap();
    store.sync_to(lsn).unwrap();
    lsn
}

fn dirty_regions(store: &Store, key: &str) -> Vec<u64> {
    let map = store.dirty_map(key).unwrap();
    (0..map.regions()).filter(|r| map.is_dirty(*r)).collect()
}

#[test]
fn a_dirty_map_marks_what_checkpoints_apply_after_its_since_and_survives_a_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let (store, _) = Store::open(dir.path(), StoreOptions::new(BLOCKS)).unwrap();
    // Before the map: region 0, checkpointed.
    let lsn = write_sync(&store, 0, 1);
    store.checkpoint(lsn).unwrap();
    let info = store.track_dirty("vol/a", lsn);
    assert_eq!((info.since, info.dirty, info.regions), (lsn, 0, 16));
    assert_eq!(info.region_bytes, region_bytes(BLOCKS * BLOCK_SIZE as u64));
    // A map asked for from before the checkpoint starts at it: the extent
    // already holds what came before, unmarked.
    let older = store.track_dirty("vol/b", 0);
    assert_eq!(older.since, lsn);
    // Writes to regions 2 and 5 (one straddling into 6): marked only once
    // a checkpoint applies them.
    write_sync(&store, 2 * REGION_BLOCKS + 3, 2);
    store
        .write(
            1,
            6 * REGION_BLOCKS - 1,
            Bytes::from(vec![5; 2 * BLOCK_SIZE]),
        )
        .unwrap();
    let head = write_sync(&store, 5 * REGION_BLOCKS, 5);
    assert!(dirty_regions(&store, "vol/a").is_empty(), "not applied yet");
    store.checkpoint(head).unwrap();
    assert_eq!(dirty_regions(&store, "vol/a"), vec![2, 5, 6]);
    store.forget_dirty("vol/b");
    // A checkpoint wrote the maps before its superblock: a reopen keeps them.
    let checkpointed = store.superblock().checkpoint;
    drop(store);
    let (store, report) = Store::open(dir.path(), StoreOptions::new(BLOCKS)).unwrap();
    assert_eq!(report.dirty_maps_dropped, None);
    assert_eq!(report.checkpoint, checkpointed);
    assert_eq!(dirty_regions(&store, "vol/a"), vec![2, 5, 6]);
    // Forgetting is persisted with the next checkpoint; a map that came
    // back meanwhile still covers every write since its `since`.
    assert_eq!(store.dirty_maps().len(), 2);
    store.forget_dirty("vol/b");
    let head = write_sync(&store, 9 * REGION_BLOCKS, 9);
    store.checkpoint(head).unwrap();
    assert_eq!(dirty_regions(&store, "vol/a"), vec![2, 5, 6, 9]);
    drop(store);
    let (store, _) = Store::open(dir.path(), StoreOptions::new(BLOCKS)).unwrap();
    assert_eq!(store.dirty_maps().len(), 1);
    // A replica's receiver clears them, durably.
    store.clear_dirty_maps().unwrap();
    drop(store);
    let (store, _) = Store::open(dir.path(), StoreOptions::new(BLOCKS)).unwrap();
    assert!(store.dirty_maps().is_empty());
    assert!(!dir.path().join("DIRTY").exists());
}

#[test]
fn a_damaged_dirty_maps_file_is_not_used_and_says_why() {
    let dir = tempfile::tempdir().unwrap();
    let (store, _) = Store::open(dir.path(), StoreOptions::new(BLOCKS)).unwrap();
    store.track_dirty("vol/a", 0);
    let head = write_sync(&store, 0, 1);
    store.checkpoint(head).unwrap();
    drop(store);
    let path = dir.path().join("DIRTY");
    let mut bytes = std::fs::read(&path).unwrap();
    bytes[12] ^= 1;
    std::fs::write(&path, bytes).unwrap();
    let (store, report) = Store::open(dir.path(), StoreOptions::new(BLOCKS)).unwrap();
    assert!(report.dirty_maps_dropped.unwrap().contains("damaged"));
    assert!(store.dirty_maps().is_empty());
}

/// A replica holding `fill_a` everywhere but a few blocks, and the image
/// (from another store) it must end up with.
fn replica_and_image(fs: &SimFs) -> (Store, Store) {
    let options = || StoreOptions {
        fs: Arc::new(fs.clone()),
        reset_interrupted_run: true,
        ..StoreOptions::new(BLOCKS)
    };
    let (replica, _) = Store::open("/r", options()).unwrap();
    let (primary, _) = Store::open("/p", options()).unwrap();
    for lba in (0..BLOCKS).step_by(8) {
        replica.write(1, lba, block(lba as u8)).unwrap();
        primary.write(1, lba, block(lba as u8)).unwrap();
    }
    // The primary changed regions 3 and 7; the replica has an uncommitted
    // tail of its own in region 12.
    for lba in [3 * REGION_BLOCKS + 1, 7 * REGION_BLOCKS + 15] {
        primary.write(2, lba, block(0xee)).unwrap();
    }
    replica.write(1, 12 * REGION_BLOCKS, block(0xdd)).unwrap();
    for store in [&replica, &primary] {
        let head = store.head();
        store.sync_to(head).unwrap();
        store.checkpoint(head).unwrap();
    }
    (replica, primary)
}

fn image(store: &Store) -> Vec<u8> {
    store.read(0, BLOCKS).unwrap().to_vec()
}

/// Sends `primary`'s differing regions into `replica` in place and commits.
fn install_in_place(replica: &Store, primary: &Store) -> Result<(), StoreError> {
    let pin = primary.full_base_pin("test")?;
    let region = region_bytes(BLOCKS * BLOCK_SIZE as u64);
    let theirs = replica.extent_sums(0, pin.image_bytes(), region, &mut bytes::BytesMut::new())?;
    let image = pin.read(0, pin.image_bytes() as usize)?;
    let ours = region_sums(&image, region);
    let marker = PartialImage {
        source: primary.image_source(),
        image_lsn: pin.lsn(),
        ..PartialImage::default()
    };
    let mut install = replica.begin_in_place(marker, 0)?;
    let mut crc = 0;
    for (i, _) in ours
        .iter()
        .zip(&theirs)
        .enumerate()
        .filter(|(_, (a, b))| a != b)
    {
        let at = i as u64 * region;
        let data = &image[at as usize..(at + region) as usize];
        install.write_chunk(at, data)?;
        crc = crc32c::crc32c_append(crc, data);
    }
    replica.commit_in_place(install, crc, 2, &primary.wal().epochs())
}

#[test]
fn an_install_in_place_sends_only_what_differs_and_switches_at_commit() {
    let fs = SimFs::new();
    let (replica, primary) = replica_and_image(&fs);
    let want = image(&primary);
    assert_ne!(image(&replica), want);
    install_in_place(&replica, &primary).unwrap();
    assert_eq!(image(&replica), want);
    assert_eq!(replica.partial(), None);
    let lsn = primary.superblock().checkpoint;
    assert_eq!(replica.superblock().checkpoint, lsn);
    assert_eq!(replica.head(), lsn, "its own tail is gone");
    assert_eq!(replica.wal().epochs(), primary.wal().epochs());
    // A bad checksum at commit leaves it partial, and says so after a reopen.
    let pin = primary.full_base_pin("t").unwrap();
    let marker = PartialImage {
        source: primary.image_source(),
        image_lsn: pin.lsn(),
        ..PartialImage::default()
    };
    let mut install = replica.begin_in_place(marker, 0).unwrap();
    install.write_chunk(0, &block(1)).unwrap();
    assert!(matches!(
        replica.commit_in_place(install, 0, 2, &[]),
        Err(StoreError::BaseChecksum { .. })
    ));
    let partial = replica.partial().unwrap();
    assert_eq!(
        (partial.source, partial.image_lsn),
        (primary.image_source(), pin.lsn())
    );
    // And a partial store is not checkpointed.
    assert_eq!(
        replica.checkpoint(u64::MAX).unwrap(),
        CheckpointOutcome::UpToDate
    );
}

/// A replica that holds the primary's history up to `K`, the last of it
/// (region 5) in its WAL only, and the primary's image further on
/// (regions 3 and 7 rewritten after `K`). Returns (replica, primary, K).
fn replica_behind(fs: &SimFs) -> (Store, Store, u64) {
    let options = || StoreOptions {
        fs: Arc::new(fs.clone()),
        reset_interrupted_run: true,
        ..StoreOptions::new(BLOCKS)
    };
    let (replica, _) = Store::open("/r", options()).unwrap();
    let (primary, _) = Store::open("/p", options()).unwrap();
    for store in [&replica, &primary] {
        for lba in (0..BLOCKS).step_by(8) {
            store.write(1, lba, block(lba as u8)).unwrap();
        }
        let head = store.head();
        store.sync_to(head).unwrap();
        store.checkpoint(head).unwrap();
        let shared = store.write(1, 5 * REGION_BLOCKS + 2, block(0x55)).unwrap();
        store.sync_to(shared).unwrap();
    }
    let agreed = replica.head();
    for lba in [3 * REGION_BLOCKS + 1, 7 * REGION_BLOCKS + 15] {
        primary.write(1, lba, block(0xee)).unwrap();
    }
    let head = primary.head();
    primary.sync_to(head).unwrap();
    primary.checkpoint(head).unwrap();
    (replica, primary, agreed)
}

/// The regions the primary's dirty map since `K` marks (3 and 7), sent
/// into `replica` after it applied its own log through `K`.
fn install_by_map(replica: &Store, primary: &Store, agreed: u64) -> Result<(), StoreError> {
    let pin = primary.full_base_pin("test")?;
    let region = region_bytes(BLOCKS * BLOCK_SIZE as u64);
    let image = pin.read(0, pin.image_bytes() as usize)?;
    let marker = PartialImage {
        source: primary.image_source(),
        since: Some(agreed),
        image_lsn: pin.lsn(),
        cursor: 0,
        by_map: true,
    };
    let mut install = replica.begin_in_place(marker, agreed)?;
    let mut crc = 0;
    for r in [3u64, 7] {
        let data = &image[(r * region) as usize..((r + 1) * region) as usize];
        install.write_chunk(r * region, data)?;
        crc = crc32c::crc32c_append(crc, data);
    }
    replica.commit_in_place(install, crc, 2, &primary.wal().epochs())
}

/// Checks what a reopened replica holds after a crash or a power loss at
/// some point of an install in place: partial (every region the image's
/// or what it held, the image's below the cursor), switched (the image,
/// its WAL after it), or as it was.
fn crash_everywhere(
    setup: fn(&SimFs) -> (Store, Store, u64),
    install: fn(&Store, &Store, u64) -> Result<(), StoreError>,
) {
    let region = region_bytes(BLOCKS * BLOCK_SIZE as u64) as usize;
    let (mut cases, mut switched, mut partial) = (0, 0, 0);
    for op in 0.. {
        for fault in [Fault::Crash, Fault::Eio] {
            let fs = SimFs::new();
            let (replica, primary, agreed) = setup(&fs);
            let before = image(&replica);
            let want = image(&primary);
            let lsn = primary.superblock().checkpoint;
            let start = fs.ops();
            fs.inject(start + op, fault);
            let done = install(&replica, &primary, agreed);
            if done.is_ok() && fs.ops() < start + op {
                // Past the last operation: every boundary was tried.
                eprintln!("{cases} cases: {switched} switched, {partial} partial");
                assert!(switched > 0 && partial > 0);
                return;
            }
            drop((replica, primary));
            for mode in [PowerLoss::DropUnsynced, PowerLoss::Seeded(op)] {
                let case = format!("op {op} {fault:?} {mode:?}");
                fs.clear_fault();
                fs.power_loss(mode);
                let options = StoreOptions {
                    fs: Arc::new(fs.clone()),
                    reset_interrupted_run: true,
                    ..StoreOptions::new(BLOCKS)
                };
                let (replica, _) = Store::open("/r", options)
                    .unwrap_or_else(|e| panic!("{case}: reopen: {e}\n{}", fs.history().join("\n")));
                cases += 1;
                let held = image(&replica);
                match replica.partial() {
                    Some(marker) => {
                        partial += 1;
                        for (r, got) in held.chunks(region).enumerate() {
                            let (old, new) = (
                                &before[r * region..][..region],
                                &want[r * region..][..region],
                            );
                            assert!(
                                got == new
                                    || (got == old && ((r * region) as u64) >= marker.cursor),
                                "{case}: region {r} holds neither the image's nor what it held\n{}",
                                fs.history().join("\n")
                            );
                        }
                    }
                    None if replica.superblock().checkpoint == lsn => {
                        assert_eq!(held, want, "{case}");
                        assert_eq!(replica.head(), lsn);
                        switched += 1;
                    }
                    None => assert_eq!(
                        held, before,
                        "{case}: neither partial nor switched nor as it was"
                    ),
                }
            }
        }
        assert!(op < 500, "the install never ran out of operations");
    }
}

#[test]
fn a_crash_or_a_power_loss_anywhere_in_an_install_in_place_leaves_it_partial_or_switched() {
    crash_everywhere(
        |fs| {
            let (replica, primary) = replica_and_image(fs);
            (replica, primary, 0)
        },
        |replica, primary, _| install_in_place(replica, primary),
    );
}

#[test]
fn a_crash_or_a_power_loss_anywhere_in_an_install_by_the_map_leaves_every_region_old_or_new() {
    crash_everywhere(replica_behind, install_by_map);
}

#[test]
fn an_install_in_place_persists_its_cursor_as_it_goes_and_refuses_to_go_back() {
    let dir = tempfile::tempdir().unwrap();
    let blocks = 96 << 8; // 96 MiB
    let (store, _) = Store::open(dir.path(), StoreOptions::new(blocks)).unwrap();
    let marker = PartialImage {
        source: 5,
        since: Some(40),
        image_lsn: 50,
        cursor: 0,
        by_map: true,
    };
    let mut install = store.begin_in_place(marker, 0).unwrap();
    let chunk = vec![3u8; 1 << 20];
    for i in 0..70u64 {
        install.write_chunk(i << 20, &chunk).unwrap();
    }
    assert_eq!(
        install.cursor(),
        64 << 20,
        "persisted each time it moved 32 MiB"
    );
    assert!(matches!(
        install.write_chunk(10 << 20, &chunk),
        Err(StoreError::ChunkOutOfOrder { .. })
    ));
    // Cut here: a reopen says what the extent holds, and where.
    drop(install);
    drop(store);
    let (store, _) = Store::open(dir.path(), StoreOptions::new(blocks)).unwrap();
    assert_eq!(
        store.partial(),
        Some(PartialImage {
            cursor: 64 << 20,
            ..marker
        })
    );
    assert_eq!(
        store.read(0, 1).unwrap(),
        Bytes::from(vec![3u8; BLOCK_SIZE])
    );
}

#[test]
fn a_whole_image_installed_staged_ends_a_partial_install() {
    let dir = tempfile::tempdir().unwrap();
    let (store, _) = Store::open(dir.path(), StoreOptions::new(BLOCKS)).unwrap();
    let marker = PartialImage {
        image_lsn: 7,
        ..PartialImage::default()
    };
    drop(store.begin_in_place(marker, 0).unwrap());
    assert!(store.partial().is_some());
    let mut install = store.begin_install(7).unwrap();
    let data = vec![4u8; (BLOCKS * BLOCK_SIZE as u64) as usize];
    install.write_chunk(0, &data).unwrap();
    store
        .commit_install(install, crc32c::crc32c(&data), 1, &[])
        .unwrap();
    assert_eq!(store.partial(), None);
    drop(store);
    let (store, _) = Store::open(dir.path(), StoreOptions::new(BLOCKS)).unwrap();
    assert_eq!(store.partial(), None, "and durably");
    assert_eq!(
        store.read(0, 1).unwrap(),
        Bytes::from(vec![4u8; BLOCK_SIZE])
    );
}

#[test]
fn the_content_at_an_lsn_ignores_later_writes_and_where_the_checkpoint_is() {
    let dir = tempfile::tempdir().unwrap();
    let (store, _) = Store::open(dir.path(), StoreOptions::new(BLOCKS)).unwrap();
    let mut expected = vec![0u8; (BLOCKS * BLOCK_SIZE as u64) as usize];
    let put = |lba: u64, fill: u8, expected: &mut Vec<u8>| {
        let lsn = store.write(1, lba, block(fill)).unwrap();
        expected[lba as usize * BLOCK_SIZE..][..BLOCK_SIZE].fill(fill);
        lsn
    };
    put(3, 1, &mut expected);
    let lsn = put(40, 2, &mut expected);
    store.sync_to(lsn).unwrap();
    store.checkpoint(lsn).unwrap();
    put(3, 3, &mut expected); // after the checkpoint, in the WAL only
    let trim = store.trim(1, 40, 1).unwrap();
    expected[40 * BLOCK_SIZE..][..BLOCK_SIZE].fill(0);
    let at = trim;
    let want = expected.clone();
    put(3, 9, &mut expected); // after the LSN asked for
    let head = store.head();
    store.sync_to(head).unwrap();
    let content = store.content_at(at, None, "verify").unwrap();
    assert_eq!(content.lsn(), at);
    // A checkpoint meanwhile is paused by the pin: the content stays.
    assert!(matches!(
        store.checkpoint(head).unwrap(),
        CheckpointOutcome::Paused { .. }
    ));
    let mut buf = bytes::BytesMut::new();
    content
        .read_into(0, BLOCKS * BLOCK_SIZE as u64, &mut buf)
        .unwrap();
    assert!(buf[..] == want[..], "content at {at}");
    let region = region_bytes(BLOCKS * BLOCK_SIZE as u64);
    let sums = content
        .sums(0, BLOCKS * BLOCK_SIZE as u64, region, &mut buf)
        .unwrap();
    assert_eq!(sums, region_sums(&want, region));
    // Past what is durable, or before the pinned checkpoint: refused.
    assert!(matches!(
        store.content_at(head + 1, None, "x"),
        Err(StoreError::NotAt { .. })
    ));
}

#[test]
fn an_install_in_place_refuses_to_start_while_a_pin_holds_the_extent() {
    let dir = tempfile::tempdir().unwrap();
    let (store, _) = Store::open(dir.path(), StoreOptions::new(BLOCKS)).unwrap();
    let lsn = store.write(1, 0, block(1)).unwrap();
    store.sync_to(lsn).unwrap();
    // A verify holds the extent: the replica's own log cannot be applied,
    // so an install by the map must not start (it would promise it was).
    let pin = store.snapshot_pin("verify").unwrap();
    let marker = PartialImage {
        since: Some(0),
        by_map: true,
        ..PartialImage::default()
    };
    assert!(matches!(
        store.begin_in_place(marker, lsn),
        Err(StoreError::Pinned { pins: 1 })
    ));
    assert_eq!(store.partial(), None, "nothing begun");
    drop(pin);
    store.begin_in_place(marker, lsn).unwrap();
    assert_eq!(store.superblock().checkpoint, lsn, "applied first");
}

#[test]
fn after_a_checkpoint_a_crash_cut_the_content_is_read_only_at_or_past_what_the_extent_may_hold() {
    let mut checked = 0;
    for op in 0..40 {
        let fs = SimFs::new();
        let options = || StoreOptions {
            fs: Arc::new(fs.clone()),
            ..StoreOptions::new(BLOCKS)
        };
        let (store, _) = Store::open("/s", options()).unwrap();
        let first = store.write(1, 0, block(1)).unwrap();
        store.sync_to(first).unwrap();
        store.checkpoint(first).unwrap();
        store.write(1, 0, block(2)).unwrap();
        let head = store.write(1, 9, block(3)).unwrap();
        store.sync_to(head).unwrap();
        let start = fs.ops();
        fs.inject(start + op, Fault::Crash);
        let done = store.checkpoint(head);
        drop(store);
        if done.is_ok() && fs.ops() <= start + op {
            break;
        }
        // The process died; its page cache lives on (kill -9).
        fs.clear_fault();
        fs.restart();
        let (store, _) = Store::open("/s", options()).unwrap();
        let floor = store.content_floor();
        assert!(
            floor == head,
            "op {op}: floor {floor}, checkpoint {}",
            store.superblock().checkpoint
        );
        let content = store.content_at(floor, None, "verify").unwrap();
        let mut buf = bytes::BytesMut::new();
        content
            .read_into(0, 16 * BLOCK_SIZE as u64, &mut buf)
            .unwrap();
        assert_eq!(&buf[..BLOCK_SIZE], &block(2)[..], "op {op}");
        assert_eq!(
            &buf[9 * BLOCK_SIZE..10 * BLOCK_SIZE],
            &block(3)[..],
            "op {op}"
        );
        drop(content);
        if store.superblock().checkpoint < head {
            assert!(
                matches!(
                    store.content_at(first, None, "x"),
                    Err(StoreError::NotAt { .. })
                ),
                "op {op}: below the floor"
            );
            checked += 1;
        }
    }
    assert!(
        checked > 0,
        "no crash landed between the extent and the superblock"
    );
}
