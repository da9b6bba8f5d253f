//! Power loss at every boundary: each small workload on the durable
//! metadata runs on a [`SimFs`] that crashes before its first, second, ...
//! operation (and once not at all), then loses power (every unsynced page,
//! size and entry dropped, and several seeded choices of what survives),
//! and the files' promises are checked: what a replace returned for is
//! there; otherwise the old content or the new, never neither.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use super::{Fault, Fs, PowerLoss, SimFs};
use crate::durable::{create_dir_all_in, rewrite_atomic};
use crate::epochs::{self, EpochStart};
use crate::superblock::Superblock;
use std::io;
use std::path::Path;

/// Power-loss modes each crash point is checked under.
fn modes() -> impl Iterator<Item = PowerLoss> {
    std::iter::once(PowerLoss::DropUnsynced).chain((1..=16).map(PowerLoss::Seeded))
}

/// Runs `work` after `setup` with a crash before each of its operations in
/// turn (and once without one), a power loss in each mode, then `check`
/// with whether `work` returned `Ok`. Returns how many cases ran.
fn at_every_boundary(
    setup: impl Fn(&SimFs),
    work: impl Fn(&SimFs) -> io::Result<()>,
    check: impl Fn(&SimFs, bool, &str),
) -> usize {
    let probe = SimFs::new();
    setup(&probe);
    let before = probe.ops();
    work(&probe).unwrap();
    let ops = probe.ops() - before;
    assert!(ops > 0, "the workload does nothing");
    let mut cases = 0;
    for crash in 1..=ops + 1 {
        for mode in modes() {
            let fs = SimFs::new();
            setup(&fs);
            fs.power_loss(PowerLoss::DropUnsynced);
            fs.inject(fs.ops() + crash, Fault::Crash);
            let returned = work(&fs).is_ok();
            assert_eq!(returned, crash > ops, "crash before op {crash} of {ops}");
            fs.power_loss(mode);
            check(
                &fs,
                returned,
                &format!("crash before op {crash} of {ops}, {mode:?}"),
            );
            cases += 1;
        }
    }
    cases
}

#[test]
fn a_replaced_file_holds_the_old_bytes_or_the_new_and_the_new_once_replaced() {
    let dir = Path::new("/data/vol0");
    let cases = at_every_boundary(
        |fs| {
            create_dir_all_in(fs, dir).unwrap();
            rewrite_atomic(fs, dir, "f", b"old").unwrap();
        },
        |fs| rewrite_atomic(fs, dir, "f", &[7u8; 10_000]),
        |fs, returned, case| {
            let now = fs
                .read(&dir.join("f"))
                .unwrap_or_else(|e| panic!("{case}: {e}"));
            let new = now == [7u8; 10_000];
            assert!(new || now == b"old", "{case}: {} bytes", now.len());
            assert!(new || !returned, "{case}: replaced, then lost");
        },
    );
    assert!(cases > 50, "{cases}");
}

#[test]
fn directories_created_are_there_after_a_power_loss_once_created() {
    let dir = Path::new("/data/node1/vol0/store/wal");
    at_every_boundary(
        |fs| create_dir_all_in(fs, Path::new("/data")).unwrap(),
        |fs| create_dir_all_in(fs, dir),
        |fs, returned, case| {
            if returned {
                assert!(fs.is_dir(dir), "{case}");
            }
        },
    );
}

fn superblock(checkpoint: u64) -> Superblock {
    Superblock {
        uuid: [9; 16],
        block_count: 1024,
        checkpoint,
        epoch: 1 << 20,
        generation: 1,
    }
}

#[test]
fn a_superblock_commit_is_the_old_or_the_new_and_the_new_once_committed() {
    let dir = Path::new("/store");
    at_every_boundary(
        |fs| {
            create_dir_all_in(fs, dir).unwrap();
            superblock(100).store_in(fs, dir).unwrap();
        },
        |fs| {
            superblock(200)
                .store_in(fs, dir)
                .map_err(|e| io::Error::other(e.to_string()))
        },
        |fs, returned, case| {
            let loaded = Superblock::load_in(fs, dir).unwrap_or_else(|e| panic!("{case}: {e}"));
            assert!(
                loaded == superblock(200) || (loaded == superblock(100) && !returned),
                "{case}: {loaded:?}"
            );
        },
    );
}

#[test]
fn an_epoch_history_is_the_old_or_the_new_and_the_new_once_stored() {
    let dir = Path::new("/store/wal");
    let old = vec![EpochStart {
        epoch: 1,
        first_lsn: 1,
    }];
    let new = vec![
        EpochStart {
            epoch: 1,
            first_lsn: 1,
        },
        EpochStart {
            epoch: 2,
            first_lsn: 500,
        },
    ];
    at_every_boundary(
        |fs| {
            create_dir_all_in(fs, dir).unwrap();
            epochs::store(fs, dir, 1, &old).unwrap();
        },
        |fs| epochs::store(fs, dir, 1, &new).map_err(|e| io::Error::other(e.to_string())),
        |fs, returned, case| {
            let loaded = epochs::load(fs, dir, 1).unwrap_or_else(|e| panic!("{case}: {e}"));
            assert!(
                loaded == new || (loaded == old && !returned),
                "{case}: {loaded:?}"
            );
        },
    );
}

/// EIO or ENOSPC at any operation of a replace: it says so, and the file
/// still holds the old bytes, before a power loss and after.
#[test]
fn a_replace_that_fails_says_so_and_keeps_the_old_bytes() {
    let dir = Path::new("/d");
    let setup = |fs: &SimFs| {
        create_dir_all_in(fs, dir).unwrap();
        rewrite_atomic(fs, dir, "f", b"old").unwrap();
    };
    let probe = SimFs::new();
    setup(&probe);
    let before = probe.ops();
    rewrite_atomic(&probe, dir, "f", b"new").unwrap();
    let ops = probe.ops() - before;
    for fault in [Fault::Eio, Fault::Enospc] {
        // The last operation is the directory's fsync: the rename is
        // visible, but a power loss may take it (checked below).
        for at in 1..ops {
            let fs = SimFs::new();
            setup(&fs);
            fs.inject(fs.ops() + at, fault);
            let result = rewrite_atomic(&fs, dir, "f", b"new");
            let errno = result.as_ref().err().and_then(io::Error::raw_os_error);
            let expected = match fault {
                Fault::Eio => libc::EIO,
                _ => libc::ENOSPC,
            };
            assert_eq!(errno, Some(expected), "{fault:?} at op {at}: {result:?}");
            assert_eq!(
                fs.read(&dir.join("f")).unwrap(),
                b"old",
                "{fault:?} at op {at}"
            );
            fs.power_loss(PowerLoss::DropUnsynced);
            assert_eq!(
                fs.read(&dir.join("f")).unwrap(),
                b"old",
                "{fault:?} at op {at}"
            );
        }
        let fs = SimFs::new();
        setup(&fs);
        fs.inject(fs.ops() + ops, fault);
        assert!(rewrite_atomic(&fs, dir, "f", b"new").is_err());
        fs.power_loss(PowerLoss::DropUnsynced);
        assert_eq!(
            fs.read(&dir.join("f")).unwrap(),
            b"old",
            "{fault:?} at the dir fsync"
        );
    }
}

/// A file system with `/d/f` holding one synced page of 1s, then eight
/// unsynced pages of 2s written after it, and an unsynced `/d/unsynced`.
fn one_synced_page_then_eight_unsynced() -> SimFs {
    let fs = SimFs::new();
    fs.create_dir(Path::new("/d")).unwrap();
    fs.sync_dir(Path::new("/")).unwrap();
    let file = fs.create(Path::new("/d/f")).unwrap();
    file.write_at(&[1u8; 4096], 0).unwrap();
    file.sync_all().unwrap();
    fs.sync_dir(Path::new("/d")).unwrap();
    file.write_at(&[2u8; 8 * 4096], 4096).unwrap();
    fs.create(Path::new("/d/unsynced")).unwrap();
    fs
}

/// The model itself: unsynced data and entries go, synced ones stay, and
/// a seeded loss keeps some unsynced pages and not others.
#[test]
fn the_model_keeps_what_was_synced_and_a_seeded_part_of_the_rest() {
    let lost = one_synced_page_then_eight_unsynced();
    lost.power_loss(PowerLoss::DropUnsynced);
    assert_eq!(lost.read(Path::new("/d/f")).unwrap(), vec![1u8; 4096]);
    assert!(lost.read(Path::new("/d/unsynced")).is_err());

    let mut kept_pages = std::collections::BTreeSet::new();
    for seed in 1..=16 {
        let fs = one_synced_page_then_eight_unsynced();
        fs.power_loss(PowerLoss::Seeded(seed));
        let data = fs.read(Path::new("/d/f")).unwrap();
        assert_eq!(&data[..4096], &[1u8; 4096], "seed {seed}: synced page lost");
        for (page, chunk) in data.chunks(4096).enumerate().skip(1) {
            assert!(chunk.iter().all(|b| *b == 2) || chunk.iter().all(|b| *b == 0));
            if chunk[0] == 2 {
                kept_pages.insert(page);
            }
        }
    }
    assert!(
        !kept_pages.is_empty(),
        "a seeded loss never kept an unsynced page"
    );
    assert!(
        kept_pages.len() > 1,
        "a seeded loss kept the same page every time"
    );
}

/// An fsync that fails with EIO loses the dirty pages, as Linux does after
/// a failed writeback: the data reads as it was last synced, and the next
/// fsync has nothing left to write. kill -9 (a restart without a power
/// loss) keeps what was written.
#[test]
fn a_failed_fsync_loses_the_dirty_pages_and_kill_9_keeps_them() {
    let fs = one_synced_page_then_eight_unsynced();
    let file = fs.open(Path::new("/d/f")).unwrap();
    fs.inject(fs.ops() + 1, Fault::Eio);
    assert!(file.sync_data().is_err());
    // Still readable (until evicted), but clean: the retried fsync
    // "succeeds" without writing it, and a power loss takes it.
    assert_eq!(fs.read(Path::new("/d/f")).unwrap().len(), 9 * 4096);
    file.sync_data().unwrap();
    fs.power_loss(PowerLoss::DropUnsynced);
    // The size the second fsync wrote, without the pages the first lost.
    let mut lost = vec![1u8; 4096];
    lost.resize(9 * 4096, 0);
    assert_eq!(fs.read(Path::new("/d/f")).unwrap(), lost);

    let fs = one_synced_page_then_eight_unsynced();
    fs.inject(fs.ops() + 1, Fault::Crash);
    assert!(fs.create(Path::new("/d/g")).is_err());
    fs.restart();
    assert_eq!(fs.read(Path::new("/d/f")).unwrap().len(), 9 * 4096);
    assert!(fs.read(Path::new("/d/unsynced")).is_ok());
}
