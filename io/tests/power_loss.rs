//! Power loss under the WAL and the store, on the page-cache model
//! ([`SimFs`]): each scripted workload runs with a fault before its first,
//! second, ... file operation (the process's death, or EIO), then the power
//! goes (every unsynced page, size and directory entry dropped, or a seeded
//! part of them kept), the WAL or store is opened again, and its promises
//! are checked:
//! - it opens (a torn tail is cut, never refused);
//! - every LSN reported durable (by `sync_to`, or by an open) is there with
//!   what was written at it last, and the epoch history agrees with every
//!   frame's epoch;
//! - nothing is there that was never written;
//! - a store reads what its log holds applied in order, at a head at least
//!   the durable one, and keeps the newest epoch it persisted.
//!
//! Large seeded workloads are crashed at random points the same way.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use bytes::{Bytes, BytesMut};
use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;
use walship_io::fs::{Fault, PowerLoss, SimFs};
use walship_io::*;

const DIR: &str = "/data/vol0/store";
const FRAME: u64 = (frame::HEADER_LEN + BLOCK_SIZE + 4) as u64;

fn modes(seeds: u64) -> impl Iterator<Item = PowerLoss> {
    std::iter::once(PowerLoss::DropUnsynced).chain((1..=seeds).map(PowerLoss::Seeded))
}

/// What a workload wrote and what it was promised.
#[derive(Debug, Default, Clone)]
struct Model {
    /// Every version written at each LSN, oldest first (a truncation lets
    /// an LSN be written again): its epoch and frame.
    versions: BTreeMap<u64, Vec<(u64, FrameKind, u64, Bytes)>>,
    /// Every LSN up to this was reported durable.
    promised: u64,
    /// How many of each LSN's first versions a truncation that returned
    /// took away.
    dead: BTreeMap<u64, usize>,
    /// The newest epoch a store persisted.
    epoch: u64,
    /// What a WAL's caller holds elsewhere (a store's checkpoint): its
    /// `start_after` at the next open.
    checkpoint: u64,
    /// A replica's committed floor persisted.
    floor: u64,
    /// A run of committed frames written straight to a replica's extent
    /// was begun and not yet recorded (a crash then starts the replica
    /// over: [`StoreOptions::reset_interrupted_run`]).
    run_open: bool,
}

impl Model {
    fn wrote(&mut self, frame: &Frame) {
        self.versions.entry(frame.lsn).or_default().push((
            frame.epoch,
            frame.kind,
            frame.lba,
            frame.payload.clone(),
        ));
    }

    fn synced(&mut self, durable: u64) {
        self.promised = self.promised.max(durable);
    }

    /// A truncation to `lsn` begins: the promise above it ends.
    fn truncating(&mut self, lsn: u64) {
        self.promised = self.promised.min(lsn);
    }

    /// A truncation to `lsn` returned: what was written above it is gone
    /// for good, and must never come back.
    fn truncated(&mut self, lsn: u64) {
        for (at, versions) in self.versions.range(lsn + 1..) {
            self.dead.insert(*at, versions.len());
        }
    }

    /// Checks one frame found after the power loss.
    fn check_frame(&self, frame: &Frame, history: &[EpochStart], case: &str) {
        let found = (frame.epoch, frame.kind, frame.lba, frame.payload.clone());
        let versions = self
            .versions
            .get(&frame.lsn)
            .unwrap_or_else(|| panic!("{case}: lsn {} was never written", frame.lsn));
        // The newest match: two trims of one LSN may be the same frame.
        let version = versions.iter().rposition(|v| *v == found);
        let version = version.unwrap_or_else(|| {
            panic!(
                "{case}: lsn {} holds what was never written at it",
                frame.lsn
            )
        });
        assert!(
            version >= self.dead.get(&frame.lsn).copied().unwrap_or(0),
            "{case}: lsn {} holds version {version}, which a truncation took away",
            frame.lsn
        );
        if frame.lsn <= self.promised {
            assert_eq!(
                versions.last(),
                Some(&found),
                "{case}: lsn {} was durable, and holds an older version",
                frame.lsn
            );
        }
        let epoch = history
            .iter()
            .rev()
            .find(|e| e.first_lsn <= frame.lsn)
            .map(|e| e.epoch);
        assert_eq!(
            epoch,
            Some(frame.epoch),
            "{case}: the epoch history disagrees with lsn {}",
            frame.lsn
        );
    }

    /// The volume's blocks with every LSN up to `head` applied (its newest
    /// version: an older one is never found past a truncation that
    /// returned, which the frame checks hold to).
    fn image(&self, head: u64, blocks: u64) -> Vec<u8> {
        let mut image = vec![0u8; blocks as usize * BLOCK_SIZE];
        for (_, versions) in self.versions.range(..=head) {
            let Some((_, kind, lba, payload)) = versions.last() else {
                continue;
            };
            let at = *lba as usize * BLOCK_SIZE;
            match kind {
                FrameKind::Write => image[at..at + payload.len()].copy_from_slice(payload),
                FrameKind::Trim => {
                    let count = Frame {
                        lsn: 0,
                        epoch: 0,
                        kind: *kind,
                        flags: 0,
                        lba: *lba,
                        payload: payload.clone(),
                    }
                    .block_count() as usize;
                    image[at..at + count * BLOCK_SIZE].fill(0);
                }
                FrameKind::Barrier => {}
            }
        }
        image
    }
}

/// A payload of `blocks` blocks no other (lsn, version) shares.
fn payload(lsn: u64, version: usize, blocks: usize) -> Bytes {
    let mut data = vec![(lsn as u8).wrapping_mul(31) ^ (version as u8); blocks * BLOCK_SIZE];
    data[..8].copy_from_slice(&lsn.to_le_bytes());
    data[8] = version as u8;
    Bytes::from(data)
}

/// Runs `check`; if it fails, prints the file operations that led there.
fn checked(fs: &SimFs, check: impl FnOnce()) {
    if let Err(panic) = std::panic::catch_unwind(std::panic::AssertUnwindSafe(check)) {
        eprintln!("{}", fs.history().join("\n"));
        std::panic::resume_unwind(panic);
    }
}

/// Runs `script` with a fault before each of its operations in turn (and
/// once without one), loses power in each mode, and runs `check`. Returns
/// the number of cases.
fn at_every_boundary(
    seeds: u64,
    script: impl Fn(&SimFs, &mut Model) -> Result<(), String>,
    check: impl Fn(&SimFs, &Model, &str),
) -> usize {
    let probe = SimFs::new();
    let mut model = Model::default();
    script(&probe, &mut model).unwrap_or_else(|e| panic!("the script fails alone: {e}"));
    let ops = probe.ops();
    let mut cases = 0;
    for at in 1..=ops + 1 {
        for fault in [Fault::Crash, Fault::Eio, Fault::Enospc] {
            if at > ops && fault != Fault::Crash {
                continue;
            }
            // Each power loss, and for a crash also a kill -9 (the page
            // cache kept: only what a process death loses is lost).
            let kill = (fault == Fault::Crash).then_some(None);
            for after in modes(seeds).map(Some).chain(kill) {
                let fs = SimFs::new();
                fs.inject(at, fault);
                let mut model = Model::default();
                let result = script(&fs, &mut model);
                // (An EIO may be one the code tolerates: the old extent's
                // removal after an install, which the next open repeats.)
                if fault == Fault::Crash {
                    assert_eq!(result.is_ok(), at > ops, "crash before op {at} of {ops}");
                }
                match after {
                    Some(mode) => {
                        fs.power_loss(mode);
                    }
                    None => {
                        fs.restart();
                        fs.clear_fault();
                    }
                }
                let after = after.map_or("kill -9".to_owned(), |mode| format!("{mode:?}"));
                let case = format!("{fault:?} before op {at} of {ops}, {after}");
                checked(&fs, || check(&fs, &model, &case));
                cases += 1;
            }
        }
    }
    cases
}

// ---------------------------------------------------------------- the WAL

fn wal_options(fs: &SimFs, model: &Model) -> WalOptions {
    WalOptions {
        start_after: model.checkpoint,
        // Three one-block frames a segment: rotations every few appends.
        segment_bytes: 3 * FRAME + 64,
        zero_ahead: 8 << 10,
        fs: Arc::new(fs.clone()),
        ..WalOptions::default()
    }
}

fn open_wal(fs: &SimFs, model: &mut Model) -> Result<Wal, String> {
    let (wal, _) = Wal::open(DIR, wal_options(fs, model)).map_err(|e| e.to_string())?;
    // What an open finds counts as durable: the caller may acknowledge it.
    model.synced(wal.durable());
    Ok(wal)
}

fn append(wal: &Wal, model: &mut Model, epoch: u64, count: u64) -> Result<u64, String> {
    for _ in 0..count {
        let lsn = wal.head() + 1;
        let version = model.versions.get(&lsn).map_or(0, Vec::len);
        let blocks = 1 + lsn.is_multiple_of(3) as usize;
        let data = payload(lsn, version, blocks);
        model.wrote(&Frame::write(lsn, epoch, lsn % 16, data.clone()));
        wal.append(epoch, FrameKind::Write, lsn % 16, data)
            .map_err(|e| e.to_string())?;
    }
    Ok(wal.head())
}

fn sync(wal: &Wal, model: &mut Model) -> Result<(), String> {
    let durable = wal.sync_to(wal.head()).map_err(|e| e.to_string())?;
    model.synced(durable);
    Ok(())
}

/// Records a checkpoint at `lsn` (as a store would persist it) and
/// recycles what it covers.
fn checkpoint(wal: &Wal, model: &mut Model, lsn: u64) -> Result<(), String> {
    model.checkpoint = lsn;
    wal.set_checkpoint(lsn);
    wal.recycle().map_err(|e| e.to_string())?;
    Ok(())
}

fn check_wal(fs: &SimFs, model: &Model, case: &str) {
    let (wal, _) =
        Wal::open(DIR, wal_options(fs, model)).unwrap_or_else(|e| panic!("{case}: reopen: {e}"));
    assert!(
        wal.head() >= model.promised,
        "{case}: head {} below the durable {}",
        wal.head(),
        model.promised
    );
    let history = wal.epochs();
    let frames = wal
        .read_frames(wal.tail(), wal.head())
        .unwrap_or_else(|e| panic!("{case}: read: {e}"));
    let lsns: Vec<u64> = frames.iter().map(|f| f.lsn).collect();
    let expected: Vec<u64> = (wal.tail() + 1..=wal.head()).collect();
    assert_eq!(lsns, expected, "{case}: the log's frames");
    for frame in &frames {
        model.check_frame(frame, &history, case);
    }
}

/// Appends with syncs, a kill -9 with unsynced frames (open must make them
/// durable before it says so), a truncation across a segment boundary, two
/// rotations with no sync between them, recycling, new epochs.
fn wal_script(fs: &SimFs, model: &mut Model) -> Result<(), String> {
    let wal = open_wal(fs, model)?;
    append(&wal, model, 1, 5)?;
    sync(&wal, model)?;
    append(&wal, model, 1, 4)?;
    drop(wal);
    fs.restart();
    let wal = open_wal(fs, model)?;
    append(&wal, model, 2, 2)?;
    sync(&wal, model)?;
    let cut = wal.head() - 4;
    model.truncating(cut);
    wal.truncate_after(cut).map_err(|e| e.to_string())?;
    model.truncated(cut);
    append(&wal, model, 3, 7)?;
    sync(&wal, model)?;
    checkpoint(&wal, model, wal.head() - 5)?;
    append(&wal, model, 3, 2)?;
    sync(&wal, model)
}

#[test]
fn the_wal_keeps_every_durable_frame_through_a_power_loss_at_every_boundary() {
    let cases = at_every_boundary(8, wal_script, check_wal);
    assert!(cases > 1000, "{cases}");
}

/// splitmix64.
fn next(seed: &mut u64) -> u64 {
    *seed = seed.wrapping_add(0x9E37_79B9_7F4A_7C15);
    let mut z = *seed;
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// A long random workload: appends of one to three frames in a rising
/// epoch, syncs, truncations above the checkpoint, checkpoints with
/// recycling, and kill -9 restarts.
fn random_wal_script(seed: u64, steps: usize) -> impl Fn(&SimFs, &mut Model) -> Result<(), String> {
    move |fs, model| {
        let mut rng = seed;
        let mut wal = open_wal(fs, model)?;
        let mut epoch = 1;
        for _ in 0..steps {
            match next(&mut rng) % 20 {
                0..=9 => {
                    if next(&mut rng).is_multiple_of(10) {
                        epoch += 1;
                    }
                    append(&wal, model, epoch, 1 + next(&mut rng) % 3)?;
                }
                10..=14 => sync(&wal, model)?,
                15 => {
                    let back = 1 + next(&mut rng) % 6;
                    let cut = wal.head().saturating_sub(back).max(wal.checkpoint());
                    model.truncating(cut);
                    wal.truncate_after(cut).map_err(|e| e.to_string())?;
                    model.truncated(cut);
                }
                16 | 17 => {
                    let at = wal.durable().saturating_sub(next(&mut rng) % 8);
                    checkpoint(&wal, model, at.max(wal.checkpoint()))?;
                }
                _ => {
                    drop(wal);
                    fs.restart();
                    wal = open_wal(fs, model)?;
                }
            }
        }
        Ok(())
    }
}

/// Runs each seed's long `script` crashed (or failed with a fault from
/// `faults`) at `per_seed` random operations, loses power with a seeded
/// choice, and runs `check`. Returns the number of cases.
fn at_random_points<S>(
    seeds: u64,
    per_seed: usize,
    faults: &[Fault],
    script: impl Fn(u64) -> S,
    check: impl Fn(&SimFs, &Model, &str),
) -> usize
where
    S: Fn(&SimFs, &mut Model) -> Result<(), String>,
{
    let mut cases = 0;
    for seed in 1..=seeds {
        let script = script(seed);
        let probe = SimFs::new();
        script(&probe, &mut Model::default()).unwrap();
        let ops = probe.ops();
        let mut rng = seed ^ 0x5eed;
        for _ in 0..per_seed {
            let at = 1 + next(&mut rng) % ops;
            let fault = faults[(next(&mut rng) % faults.len() as u64) as usize];
            let mode = PowerLoss::Seeded(next(&mut rng));
            let fs = SimFs::new();
            fs.inject(at, fault);
            let mut model = Model::default();
            let _ = script(&fs, &mut model);
            fs.power_loss(mode);
            let case = format!("seed {seed}: {fault:?} before op {at} of {ops}, {mode:?}");
            checked(&fs, || check(&fs, &model, &case));
            cases += 1;
        }
    }
    cases
}

#[test]
fn the_wal_keeps_every_durable_frame_through_a_power_loss_at_random_points_of_long_workloads() {
    let faults = [Fault::Crash, Fault::Crash, Fault::Crash, Fault::Eio];
    let cases = at_random_points(
        24,
        8,
        &faults,
        |seed| random_wal_script(seed, 400),
        check_wal,
    );
    assert_eq!(cases, 24 * 8);
}

// -------------------------------------------------------------- the store

const BLOCKS: u64 = 64;

fn store_options(fs: &SimFs, replica: bool) -> StoreOptions {
    StoreOptions {
        segment_bytes: match replica {
            true => 4 << 20,
            false => 3 * FRAME + 64,
        },
        reset_interrupted_run: replica,
        fs: Arc::new(fs.clone()),
        ..StoreOptions::new(BLOCKS)
    }
}

fn open_store(fs: &SimFs, model: &mut Model, replica: bool) -> Result<Store, String> {
    let (store, _) = Store::open(DIR, store_options(fs, replica)).map_err(|e| e.to_string())?;
    model.synced(store.wal().durable());
    Ok(store)
}

fn write(store: &Store, model: &mut Model, epoch: u64, count: u64) -> Result<(), String> {
    for i in 0..count {
        let lsn = store.head() + 1;
        let version = model.versions.get(&lsn).map_or(0, Vec::len);
        let lba = (lsn * 7 + i) % (BLOCKS - 2);
        let frame = match lsn % 5 {
            4 => Frame::trim(lsn, epoch, lba, 2),
            _ => Frame::write(
                lsn,
                epoch,
                lba,
                payload(lsn, version, 1 + (lsn % 2) as usize),
            ),
        };
        model.wrote(&frame);
        let written = match frame.kind {
            FrameKind::Trim => store.trim(epoch, lba, 2),
            _ => store.write(epoch, lba, frame.payload.clone()),
        };
        assert_eq!(written.map_err(|e| e.to_string())?, lsn);
    }
    Ok(())
}

fn sync_store(store: &Store, model: &mut Model) -> Result<(), String> {
    let durable = store.sync_to(store.head()).map_err(|e| e.to_string())?;
    model.synced(durable);
    model.run_open = false;
    Ok(())
}

fn check_store(fs: &SimFs, model: &Model, replica: bool, case: &str) {
    let (store, report) = Store::open(DIR, store_options(fs, replica))
        .unwrap_or_else(|e| panic!("{case}: reopen: {e}"));
    let image = store
        .read(0, BLOCKS)
        .unwrap_or_else(|e| panic!("{case}: read: {e}"));
    if report.reset_after_interrupted_run.is_some() {
        // A replica whose run a crash cut starts over empty, by design:
        // its primary sends everything again.
        assert!(model.run_open, "{case}: started over with no run open");
        assert_eq!(store.head(), 0, "{case}");
        assert!(image.iter().all(|b| *b == 0), "{case}: not empty");
        return;
    }
    assert!(
        store.committed_floor() >= model.floor,
        "{case}: floor {} persisted, {} after",
        model.floor,
        store.committed_floor()
    );
    let head = store.head();
    assert!(
        head >= model.promised,
        "{case}: head {head} below the durable {}",
        model.promised
    );
    let wal = store.wal();
    let history = wal.epochs();
    for frame in &wal.read_frames(wal.tail(), wal.head()).unwrap() {
        model.check_frame(frame, &history, case);
    }
    assert!(
        image == model.image(head, BLOCKS),
        "{case}: the blocks differ from the log applied up to {head}"
    );
    assert!(
        store.superblock().epoch >= model.epoch,
        "{case}: epoch {} persisted, {} after",
        model.epoch,
        store.superblock().epoch
    );
}

/// A primary's store: writes and trims, syncs, checkpoints (the extent
/// synced before the superblock names it), a truncation, a persisted
/// epoch, a kill -9.
fn primary_script(fs: &SimFs, model: &mut Model) -> Result<(), String> {
    let store = open_store(fs, model, false)?;
    write(&store, model, 1, 6)?;
    sync_store(&store, model)?;
    store.checkpoint(u64::MAX).map_err(|e| e.to_string())?;
    write(&store, model, 1, 4)?;
    drop(store);
    fs.restart();
    let store = open_store(fs, model, false)?;
    store.persist_epoch(2).map_err(|e| e.to_string())?;
    model.epoch = 2;
    write(&store, model, 2, 3)?;
    sync_store(&store, model)?;
    let cut = store.head() - 2;
    model.truncating(cut);
    store.truncate_after(cut).map_err(|e| e.to_string())?;
    model.truncated(cut);
    write(&store, model, 2, 5)?;
    sync_store(&store, model)?;
    store.checkpoint(u64::MAX).map_err(|e| e.to_string())?;
    write(&store, model, 2, 2)?;
    sync_store(&store, model)
}

#[test]
fn a_primary_store_keeps_its_durable_blocks_through_a_power_loss_at_every_boundary() {
    let cases = at_every_boundary(4, primary_script, |fs, model, case| {
        check_store(fs, model, false, case)
    });
    assert!(cases > 500, "{cases}");
}

/// A long random workload on a primary's store: writes and trims in a
/// rising epoch, syncs, checkpoints, truncations above the checkpoint,
/// persisted epochs, kill -9 restarts.
fn random_store_script(
    seed: u64,
    steps: usize,
) -> impl Fn(&SimFs, &mut Model) -> Result<(), String> {
    move |fs, model| {
        let mut rng = seed;
        let mut store = open_store(fs, model, false)?;
        let mut epoch = 1;
        for _ in 0..steps {
            match next(&mut rng) % 20 {
                0..=9 => write(&store, model, epoch, 1 + next(&mut rng) % 3)?,
                10..=13 => sync_store(&store, model)?,
                14 | 15 => {
                    store.checkpoint(u64::MAX).map_err(|e| e.to_string())?;
                }
                16 => {
                    let back = 1 + next(&mut rng) % 4;
                    let cut = store
                        .head()
                        .saturating_sub(back)
                        .max(store.superblock().checkpoint);
                    model.truncating(cut);
                    store.truncate_after(cut).map_err(|e| e.to_string())?;
                    model.truncated(cut);
                }
                17 => {
                    epoch += 1;
                    store.persist_epoch(epoch).map_err(|e| e.to_string())?;
                    model.epoch = epoch;
                }
                _ => {
                    drop(store);
                    fs.restart();
                    store = open_store(fs, model, false)?;
                }
            }
        }
        Ok(())
    }
}

#[test]
fn a_store_keeps_its_durable_blocks_through_a_power_loss_at_random_points_of_long_workloads() {
    let faults = [Fault::Crash, Fault::Crash, Fault::Eio, Fault::Enospc];
    let cases = at_random_points(
        12,
        6,
        &faults,
        |seed| random_store_script(seed, 300),
        |fs, model, case| check_store(fs, model, false, case),
    );
    assert_eq!(cases, 12 * 6);
}

/// Encodes `count` one-block frames after `head`, in `epoch`.
fn batch(model: &mut Model, head: u64, epoch: u64, count: u64) -> Bytes {
    let mut raw = BytesMut::new();
    for lsn in head + 1..=head + count {
        let version = model.versions.get(&lsn).map_or(0, Vec::len);
        let frame = Frame::write(lsn, epoch, lsn % BLOCKS, payload(lsn, version, 1));
        frame.encode(&mut raw);
        model.wrote(&frame);
    }
    raw.freeze()
}

fn apply(store: &Store, model: &mut Model, raw: Bytes, committed: u64) -> Result<(), String> {
    // A batch that may go straight to the extent may open a run before
    // it fails.
    if raw.len() >= DIRECT_MIN_BYTES {
        model.run_open = true;
    }
    store
        .apply_replicated(&raw, committed)
        .map_err(|e| e.to_string())?;
    // Applied past the WAL's head: a run of committed frames is open.
    model.run_open = store.head() != store.wal().head();
    Ok(())
}

/// A replica's store: live batches to the WAL, then a catch-up whose
/// committed batches go straight to the extent (a run, with its marker),
/// recorded by a sync; more live batches; a base image installed (the
/// superblock commit naming the new extent is the switch); live batches
/// on top.
fn replica_script(fs: &SimFs, model: &mut Model) -> Result<(), String> {
    let store = open_store(fs, model, true)?;
    let raw = batch(model, 0, 1, 5);
    apply(&store, model, raw, 0)?;
    sync_store(&store, model)?;
    let generation = store.superblock().generation;
    store
        .raise_committed_floor(4, generation)
        .map_err(|e| e.to_string())?;
    model.floor = 4;
    let bulk = (DIRECT_MIN_BYTES as u64).div_ceil(FRAME);
    for _ in 0..2 {
        let head = store.head();
        let raw = batch(model, head, 1, bulk);
        apply(&store, model, raw, head + 2 * bulk)?;
    }
    sync_store(&store, model)?;
    let raw = batch(model, store.head(), 2, 3);
    apply(&store, model, raw, 0)?;
    sync_store(&store, model)?;
    install(&store, model, 3, 4)?;
    let raw = batch(model, store.head(), 3, 2);
    apply(&store, model, raw, 0)?;
    sync_store(&store, model)
}

/// Installs a base image of the primary's volume `more` LSNs past the
/// replica's head (frames it never received), in `epoch`.
fn install(store: &Store, model: &mut Model, epoch: u64, more: u64) -> Result<(), String> {
    let head = store.head();
    batch(model, head, epoch, more);
    let lsn = head + more;
    let image = model.image(lsn, BLOCKS);
    let mut history: Vec<EpochStart> = Vec::new();
    for (lsn, versions) in model.versions.range(..=lsn) {
        let epoch = versions.last().map_or(0, |v| v.0);
        if history.last().is_none_or(|e| e.epoch != epoch) {
            history.push(EpochStart {
                epoch,
                first_lsn: *lsn,
            });
        }
    }
    let mut base = store.begin_install(lsn).map_err(|e| e.to_string())?;
    for (i, chunk) in image.chunks(64 << 10).enumerate() {
        base.write_chunk((i * (64 << 10)) as u64, chunk)
            .map_err(|e| e.to_string())?;
    }
    store
        .commit_install(base, crc32c::crc32c(&image), epoch, &history)
        .map_err(|e| e.to_string())?;
    model.synced(lsn);
    model.run_open = false;
    Ok(())
}

#[test]
fn a_replica_store_keeps_its_durable_blocks_or_starts_over_through_a_power_loss_at_every_boundary()
{
    let cases = at_every_boundary(2, replica_script, |fs, model, case| {
        check_store(fs, model, true, case)
    });
    assert!(cases > 100, "{cases}");
}

#[test]
fn the_models_own_checks_can_fail() {
    // A frame rewritten after it was durable, and a frame never written:
    // the checks the suites rely on must see both.
    let mut model = Model::default();
    let frame = Frame::write(1, 1, 0, payload(1, 0, 1));
    model.wrote(&frame);
    model.synced(1);
    let history = [EpochStart {
        epoch: 1,
        first_lsn: 1,
    }];
    model.check_frame(&frame, &history, "ok");
    let older = std::panic::catch_unwind(|| {
        let mut model = model.clone();
        model.wrote(&Frame::write(1, 1, 0, payload(1, 1, 1)));
        model.check_frame(&frame, &history, "older");
    });
    assert!(older.is_err());
    let cut = std::panic::catch_unwind(|| {
        let mut model = model.clone();
        model.truncating(0);
        model.truncated(0);
        model.check_frame(&frame, &history, "cut");
    });
    assert!(cut.is_err(), "a frame a truncation took away came back");
    let never = std::panic::catch_unwind(|| {
        model.check_frame(&Frame::write(2, 1, 0, payload(2, 0, 1)), &history, "never");
    });
    assert!(never.is_err());
    assert!(Path::new(DIR).is_absolute());
}

#[test]
fn a_read_that_fails_while_a_wal_or_store_opens_loses_nothing() {
    for store in [false, true] {
        let fs = SimFs::new();
        let mut model = Model::default();
        match store {
            false => wal_script(&fs, &mut model).unwrap(),
            true => primary_script(&fs, &mut model).unwrap(),
        }
        let open = |fs: &SimFs| match store {
            false => Wal::open(DIR, wal_options(fs, &model))
                .map(drop)
                .map_err(|e| e.to_string()),
            true => Store::open(DIR, store_options(fs, false))
                .map(drop)
                .map_err(|e| e.to_string()),
        };
        let before = fs.reads();
        open(&fs).unwrap();
        let reads = fs.reads() - before;
        let mut refused = 0;
        for at in 1..=reads {
            fs.inject_read(fs.reads() + at);
            refused += usize::from(open(&fs).is_err());
            fs.clear_fault();
            let case = format!("store {store}: EIO on read {at} of {reads} at open");
            match store {
                false => checked(&fs, || check_wal(&fs, &model, &case)),
                true => checked(&fs, || check_store(&fs, &model, false, &case)),
            }
        }
        assert!(refused > 0, "no failed read made an open fail");
    }
}

#[test]
fn a_sync_begun_before_a_truncation_does_not_make_the_frames_written_after_it_durable() {
    let fs = SimFs::new();
    let mut model = Model::default();
    let wal = open_wal(&fs, &mut model).unwrap();
    append(&wal, &mut model, 1, 6).unwrap();
    // A sync that starts now and takes a while, as a slow disk's would.
    wal.inject_sync_delay(std::time::Duration::from_millis(300));
    let syncs = wal.sync_count();
    let slow = std::thread::spawn({
        let wal = wal.clone();
        move || wal.sync_to(6)
    });
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while wal.sync_count() == syncs {
        assert!(std::time::Instant::now() < deadline, "the sync never began");
        std::thread::yield_now();
    }
    // While it runs, the log is cut below what it syncs, then written
    // again at those LSNs.
    model.truncating(3);
    wal.truncate_after(3).unwrap();
    model.truncated(3);
    let _ = slow.join().unwrap();
    wal.inject_sync_delay(std::time::Duration::ZERO);
    append(&wal, &mut model, 2, 3).unwrap();
    sync(&wal, &mut model).unwrap();
    fs.power_loss(PowerLoss::DropUnsynced);
    checked(&fs, || check_wal(&fs, &model, "slow sync, truncation"));
}
