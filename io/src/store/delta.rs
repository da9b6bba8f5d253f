//! What a delta rebuild needs of a store: the primary's dirty maps, and a
//! replica's install in place.
//!
//! **Dirty maps** (primary). `track_dirty(key, since)` starts a map for an
//! away replica; the checkpointer marks every frame it applies after the
//! map's `since` (see `Store::checkpoint`), so a map covers the writes in
//! `(since, checkpoint]`, and it is written to `DIRTY` before each
//! checkpoint's superblock (a map may cover more than the superblock says,
//! never less). A map is valid only for the history it was built in, so
//! the store drops every map when that history may change under it: a
//! base install (new generation), an install in place, and
//! `clear_dirty_maps`, which a replica's receiver calls before it takes a
//! frame (a replica's writes are not marked). Removal is durable: a map
//! that came back after a power loss would miss what came after it.
//!
//! **Installs in place** (replica). `begin_in_place` syncs a `REBUILD`
//! marker (the image's source, the dirty map it was chosen by, its LSN)
//! before it changes anything; from then on the store is *partial*: its
//! extent mixes what it held with the image, its log is not to be trusted,
//! and it says so (`partial()`) until `commit_in_place` switches it, in an
//! order a crash cannot reverse: extent sync, the new generation's epoch
//! history, the extent renamed to the new generation, the superblock (the
//! switch), a fresh WAL after the image, then the marker removed. A crash
//! before the marker goes reopens partial, whatever step it cut: the
//! primary compares checksums (or the same dirty map) and sends what
//! differs. A partial store is never checkpointed: its WAL's frames are
//! not part of what it will hold.

use super::{io_err, Store, StoreError};
use crate::epochs::{self, EpochStart};
use crate::extent::ExtentFile;
use crate::frame::{Frame, BLOCK_SIZE};
use crate::fs::FsRef;
use crate::regions::{self, DirtyMap, DirtyMapInfo};
use crate::superblock::Superblock;
use crate::wal::{Wal, WalError};
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

/// The dirty maps file.
pub(super) const DIRTY_MAPS: &str = "DIRTY";
/// The marker of an install in place.
pub(super) const REBUILD_MARKER: &str = "REBUILD";

/// An install in place a crash interrupted, or one under way: what the
/// replica's extent partly holds.
///
/// Below `cursor` the extent holds the image (every region there was sent,
/// or found equal), durably; above it, regions the image chose by the
/// primary's dirty map hold the replica's own history (`by_map`), and any
/// other region holds whatever it held.
///
/// `REBUILD` format (little-endian): source, since, image LSN, cursor (u64
/// each), flags (u8: 1 `by_map`, 2 `since` present), crc32c (u32) of the
/// 33 bytes before it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct PartialImage {
    /// Which primary store the image came from ([`Store::image_source`]).
    pub source: u64,
    /// The primary's dirty map for this replica marked every write after
    /// this LSN, at most the image's (`None`: it had none).
    pub since: Option<u64>,
    /// The image's LSN.
    pub image_lsn: u64,
    /// Bytes of the image installed, durably, from its start.
    pub cursor: u64,
    /// The regions were chosen by that dirty map (the rest hold the
    /// replica's own history, which the map covers).
    pub by_map: bool,
}

const MARKER_BYTES: usize = 37;

impl PartialImage {
    fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(MARKER_BYTES);
        let since = self.since.unwrap_or(0);
        for value in [self.source, since, self.image_lsn, self.cursor] {
            out.extend_from_slice(&value.to_le_bytes());
        }
        out.push(u8::from(self.by_map) | u8::from(self.since.is_some()) << 1);
        let crc = crc32c::crc32c(&out);
        out.extend_from_slice(&crc.to_le_bytes());
        out
    }

    /// `None` when a crash cut the marker's first write (nothing was
    /// changed before it was synced; later ones replace it atomically) or
    /// it is damaged: then the store is partial with nothing known of it.
    fn decode(bytes: &[u8]) -> Option<Self> {
        let body = MARKER_BYTES - 4;
        if bytes.len() != MARKER_BYTES
            || crc32c::crc32c(&bytes[..body]).to_le_bytes() != bytes[body..]
            || bytes[32] > 3
        {
            return None;
        }
        let at =
            |i: usize| u64::from_le_bytes(bytes[i * 8..i * 8 + 8].try_into().unwrap_or_default());
        Some(Self {
            source: at(0),
            since: (bytes[32] & 2 != 0).then(|| at(1)),
            image_lsn: at(2),
            cursor: at(3),
            by_map: bytes[32] & 1 != 0,
        })
    }
}

/// An image being written into the replica's own extent, region by
/// region, in ascending order. Dropping it without committing leaves the
/// store partial, with the cursor last persisted.
#[derive(Debug)]
pub struct InPlaceInstall {
    extent: Arc<ExtentFile>,
    fs: FsRef,
    dir: PathBuf,
    marker: PartialImage,
    /// The store's own record of it, which a hello reports.
    slot: Arc<Mutex<Option<PartialImage>>>,
    image_bytes: u64,
    crc: u32,
    written: u64,
    unsynced: u64,
    /// Where the last chunk ended: everything below is the image's.
    reached: u64,
}

/// An install in place syncs the extent every this many bytes written:
/// bounded dirty page cache, and a short final sync.
const IN_PLACE_SYNC_BYTES: u64 = 16 << 20;
/// ... and persists its cursor (extent sync, then the marker: three
/// fsyncs) each time it moved this far: what a cut rebuild need not send
/// again.
const CURSOR_BYTES: u64 = 32 << 20;

impl InPlaceInstall {
    /// Writes `data` at `offset` (whole blocks, within the image, past
    /// every chunk before it); the crc32c of what was written, in order,
    /// is checked at commit.
    pub fn write_chunk(&mut self, offset: u64, data: &[u8]) -> Result<(), StoreError> {
        let block = BLOCK_SIZE as u64;
        let end = offset + data.len() as u64;
        if !offset.is_multiple_of(block) || end > self.image_bytes {
            return Err(StoreError::BaseIncomplete {
                received: end,
                expected: self.image_bytes,
            });
        }
        if offset < self.reached {
            return Err(StoreError::ChunkOutOfOrder {
                expected: self.reached,
                got: offset,
            });
        }
        self.extent.write(offset / block, data)?;
        self.crc = crc32c::crc32c_append(self.crc, data);
        self.written += data.len() as u64;
        self.unsynced += data.len() as u64;
        self.reached = end;
        if self.reached - self.marker.cursor >= CURSOR_BYTES {
            self.persist_cursor()?;
        } else if self.unsynced >= IN_PLACE_SYNC_BYTES {
            self.extent.sync()?;
            self.unsynced = 0;
        }
        Ok(())
    }

    /// Makes what was written durable, then says so in the marker.
    fn persist_cursor(&mut self) -> Result<(), StoreError> {
        self.extent.sync()?;
        self.unsynced = 0;
        let marker = PartialImage {
            cursor: self.reached,
            ..self.marker
        };
        let path = self.dir.join(REBUILD_MARKER);
        crate::durable::rewrite_atomic(
            self.fs.as_ref(),
            &self.dir,
            REBUILD_MARKER,
            &marker.encode(),
        )
        .map_err(io_err("replace", &path))?;
        self.marker = marker;
        *self.slot.lock().unwrap_or_else(PoisonError::into_inner) = Some(marker);
        Ok(())
    }

    /// Bytes of the image installed durably from its start.
    pub fn cursor(&self) -> u64 {
        self.marker.cursor
    }

    /// The image LSN.
    pub fn image_lsn(&self) -> u64 {
        self.marker.image_lsn
    }

    /// Bytes written so far.
    pub fn written(&self) -> u64 {
        self.written
    }
}

/// The dirty maps and whether `DIRTY` exists.
#[derive(Debug, Default)]
pub(super) struct Maps {
    pub(super) maps: BTreeMap<String, DirtyMap>,
    pub(super) on_disk: bool,
}

impl Store {
    pub(super) fn maps(&self) -> MutexGuard<'_, Maps> {
        self.dirty_maps
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    fn partial_slot(&self) -> MutexGuard<'_, Option<PartialImage>> {
        self.partial.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn volume_bytes(&self) -> u64 {
        self.options.block_count * BLOCK_SIZE as u64
    }

    /// Loads `DIRTY` at open. A file of another generation, or a damaged
    /// one, is dropped: a map lost is a rebuild that compares checksums.
    /// Returns why a file found was not taken.
    pub(super) fn load_dirty_maps(&self) -> Result<Option<String>, StoreError> {
        let path = self.dir.join(DIRTY_MAPS);
        let bytes = match self.fs().read(&path) {
            Ok(bytes) => bytes,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(io_err("read", &path)(e)),
        };
        let generation = self.superblock().generation;
        let mut maps = self.maps();
        maps.on_disk = true;
        match regions::decode_maps(&bytes, generation, self.volume_bytes()) {
            Ok(loaded) => {
                maps.maps = loaded;
                Ok(None)
            }
            Err(e) => Ok(Some(e.to_string())),
        }
    }

    /// An install in place renames its extent to the next generation before
    /// the superblock names it: a crash between the two leaves the
    /// superblock's generation without its extent and the next one with it.
    /// Under a `REBUILD` marker that extent is the install's, so it is
    /// renamed back (the store stays partial) rather than removed as
    /// another generation's (and an empty extent made in its place).
    pub(super) fn settle_in_place_rename(
        fs: &dyn crate::fs::Fs,
        dir: &std::path::Path,
        generation: u64,
    ) -> Result<(), StoreError> {
        if !fs.exists(&dir.join(REBUILD_MARKER)) {
            return Ok(());
        }
        let current = ExtentFile::path(dir, generation);
        let next = ExtentFile::path(dir, generation + 1);
        if !fs.exists(&current) && fs.exists(&next) {
            fs.rename(&next, &current)
                .map_err(io_err("rename", &current))?;
            fs.sync_dir(dir).map_err(io_err("sync", dir))?;
        }
        Ok(())
    }

    /// Loads the `REBUILD` marker at open.
    pub(super) fn load_partial(&self) -> Result<(), StoreError> {
        let path = self.dir.join(REBUILD_MARKER);
        match self.fs().read(&path) {
            Ok(bytes) => {
                *self.partial_slot() = Some(PartialImage::decode(&bytes).unwrap_or_default());
                Ok(())
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(io_err("read", &path)(e)),
        }
    }

    /// Marks the frames a checkpoint applies in every map they are newer than.
    pub(super) fn mark_dirty(&self, frames: &[Frame]) {
        let mut maps = self.maps();
        if maps.maps.is_empty() {
            return;
        }
        let block = BLOCK_SIZE as u64;
        for map in maps.maps.values_mut() {
            let since = map.since();
            for frame in frames.iter().filter(|f| f.lsn > since) {
                map.mark(frame.lba * block, frame.block_count() * block);
            }
        }
    }

    /// Writes `DIRTY` (before a checkpoint's superblock), or removes it
    /// when no map is left.
    ///
    /// Called under the checkpointer's lock (one writer of the file); the
    /// maps are copied under their own lock and written without it, so the
    /// volume's reports and track/forget do not wait on the fsyncs.
    pub(super) fn persist_dirty_maps(&self) -> Result<(), StoreError> {
        let path = self.dir.join(DIRTY_MAPS);
        let bytes = {
            let maps = self.maps();
            if maps.maps.is_empty() && !maps.on_disk {
                return Ok(());
            }
            (!maps.maps.is_empty())
                .then(|| regions::encode_maps(self.superblock().generation, &maps.maps))
        };
        let on_disk = bytes.is_some();
        match bytes {
            None => self.remove_durably(&path)?,
            Some(bytes) => crate::durable::rewrite_atomic(self.fs(), &self.dir, DIRTY_MAPS, &bytes)
                .map_err(io_err("replace", &path))?,
        }
        self.maps().on_disk = on_disk;
        Ok(())
    }

    fn remove_durably(&self, path: &std::path::Path) -> Result<(), StoreError> {
        match self.fs().remove_file(path) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(io_err("remove", path)(e)),
        }
        self.fs()
            .sync_dir(&self.dir)
            .map_err(io_err("sync", &self.dir))
    }

    /// Starts marking what writes after `since` touch, for `key` (an away
    /// replica), unless a map for it exists (an older one covers more).
    /// The map's `since` is raised to the checkpoint: writes the extent
    /// already holds were not marked. Persisted with the next checkpoint.
    pub fn track_dirty(&self, key: &str, since: u64) -> DirtyMapInfo {
        if let Some(map) = self.maps().maps.get(key) {
            return map.info();
        }
        // A checkpoint running now applies frames up to at most the
        // durable LSN without this map: start past them. Otherwise the
        // map goes in before the next checkpoint can start.
        let serial = self.checkpointing.try_lock().ok();
        let applied = match serial {
            Some(_) => self.superblock().checkpoint,
            None => self.wal().durable(),
        };
        let map = DirtyMap::new(since.max(applied), self.volume_bytes());
        let info = map.info();
        self.maps().maps.insert(key.to_owned(), map);
        drop(serial);
        info
    }

    /// Stops marking for `key`.
    pub fn forget_dirty(&self, key: &str) {
        self.maps().maps.remove(key);
    }

    /// Every map's figures.
    pub fn dirty_maps(&self) -> Vec<(String, DirtyMapInfo)> {
        self.maps()
            .maps
            .iter()
            .map(|(key, map)| (key.clone(), map.info()))
            .collect()
    }

    /// A copy of `key`'s map.
    pub fn dirty_map(&self, key: &str) -> Option<DirtyMap> {
        self.maps().maps.get(key).cloned()
    }

    /// Drops every map, durably (a replica's writes are not marked; see the
    /// module docs).
    pub fn clear_dirty_maps(&self) -> Result<(), StoreError> {
        let mut maps = self.maps();
        maps.maps.clear();
        if maps.on_disk {
            self.remove_durably(&self.dir.join(DIRTY_MAPS))?;
            maps.on_disk = false;
        }
        Ok(())
    }

    /// Which store (and generation of it) an image comes from: the
    /// superblock's uuid and generation, hashed. A partial image from
    /// another source cannot be resumed by this one's dirty map.
    pub fn image_source(&self) -> u64 {
        let sb = self.superblock();
        let mut bytes = sb.uuid.to_vec();
        bytes.extend_from_slice(&sb.generation.to_le_bytes());
        xxhash_rust::xxh3::xxh3_64(&bytes).max(1)
    }

    /// The install in place a crash interrupted or one under way.
    pub fn partial(&self) -> Option<PartialImage> {
        *self.partial_slot()
    }

    /// Checksums of the regions of the extent file in `[offset, offset +
    /// len)` (region-aligned), as it is: a replica's for a rebuild that
    /// compares (its WAL is not part of what it will hold).
    ///
    /// Read a MiB at a time into `buf` (kept by the caller: on a VM, fresh
    /// pages cost more than the read).
    pub fn extent_sums(
        &self,
        offset: u64,
        len: u64,
        region_bytes: u64,
        buf: &mut bytes::BytesMut,
    ) -> Result<Vec<u128>, StoreError> {
        if offset.saturating_add(len) > self.volume_bytes() {
            return Err(StoreError::BaseIncomplete {
                received: offset.saturating_add(len),
                expected: self.volume_bytes(),
            });
        }
        let extent = Arc::clone(&self.read_state().extent);
        let volume = self.volume_bytes();
        super::at_lsn::sums_in_steps(offset, len, region_bytes, volume, buf, |at, n, buf| {
            buf.resize(n as usize, 0);
            Ok(extent.read_bytes_into(at, buf)?)
        })
    }

    /// Starts an install in place of the image `marker` names (its cursor
    /// taken as 0): the marker is synced first, then the replica's own log
    /// is applied to its extent through `apply_through` (what it shares
    /// with the primary: a dirty map covers the writes after it; 0: nothing
    /// applied), and the returned install writes regions.
    pub fn begin_in_place(
        &self,
        marker: PartialImage,
        apply_through: u64,
    ) -> Result<InPlaceInstall, StoreError> {
        self.record_direct(&mut self.direct())?;
        // Its own log first, while the store is whole (an ordinary
        // checkpoint): a marker saying the map chose the regions promises
        // that the rest holds this history, so it must not exist before
        // the history is in the extent.
        if apply_through > 0 && self.partial().is_none() {
            // All of it, or no install: a marker saying the map chose the
            // regions would promise what the extent does not hold.
            let wanted = apply_through.min(self.wal().durable());
            if let super::CheckpointOutcome::Paused { pins } = self.checkpoint_now(apply_through)? {
                return Err(StoreError::Pinned { pins });
            }
            let reached = self.superblock().checkpoint;
            if reached < wanted {
                return Err(StoreError::NotAt {
                    lsn: wanted,
                    checkpoint: reached,
                    durable: self.wal().durable(),
                });
            }
        }
        let marker = PartialImage {
            cursor: 0,
            ..marker
        };
        let path = self.dir.join(REBUILD_MARKER);
        {
            // Under the checkpointer's lock: one running now finishes
            // before any region is written, and any later one finds the
            // store partial and applies nothing.
            let _serial = self
                .checkpointing
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            crate::durable::rewrite_atomic(self.fs(), &self.dir, REBUILD_MARKER, &marker.encode())
                .map_err(io_err("replace", &path))?;
            *self.partial_slot() = Some(marker);
        }
        Ok(InPlaceInstall {
            extent: Arc::clone(&self.read_state().extent),
            fs: Arc::clone(&self.options.fs),
            dir: self.dir.clone(),
            marker,
            slot: Arc::clone(&self.partial),
            image_bytes: self.volume_bytes(),
            crc: 0,
            written: 0,
            unsynced: 0,
            reached: 0,
        })
    }

    /// Switches to the image written in place (see the module docs for the
    /// order). `expected_crc` is the crc32c of every chunk sent, in order;
    /// `epochs` the sender's history up to the image.
    pub fn commit_in_place(
        &self,
        install: InPlaceInstall,
        expected_crc: u32,
        epoch: u64,
        epochs: &[EpochStart],
    ) -> Result<(), StoreError> {
        let mut direct = self.direct();
        if install.crc != expected_crc {
            return Err(StoreError::BaseChecksum {
                expected: expected_crc,
                actual: install.crc,
            });
        }
        epochs::validate(epochs).map_err(WalError::from)?;
        let mut history = epochs.to_vec();
        epochs::cut_after(&mut history, install.marker.image_lsn);
        install.extent.sync()?;
        let fs = self.fs();
        let _serial = self
            .checkpointing
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let superblock = self.superblock();
        let generation = superblock.generation + 1;
        epochs::store(fs, &self.dir.join("wal"), generation, &history).map_err(WalError::from)?;
        let old_path = install.extent.file_path().to_path_buf();
        let new_path: PathBuf = ExtentFile::path(&self.dir, generation);
        fs.rename(&old_path, &new_path)
            .map_err(io_err("rename", &new_path))?;
        fs.sync_dir(&self.dir).map_err(io_err("sync", &self.dir))?;
        let next = Superblock {
            generation,
            checkpoint: install.marker.image_lsn,
            epoch,
            ..superblock
        };
        next.store_in(fs, &self.dir)?;
        let (wal, _) = Wal::open(
            self.dir.join("wal"),
            Self::wal_options(&self.options, &next),
        )?;
        wal.set_checkpoint(next.checkpoint);
        let extent = Arc::new(ExtentFile::open_in(
            Arc::clone(&self.options.fs),
            &new_path,
            self.options.block_count,
        )?);
        {
            let mut state = self.write_state();
            state.extent = extent;
            state.wal = wal;
            state.superblock = next;
        }
        self.dirty().clear();
        *direct = None;
        self.clear_dirty_maps()?;
        self.clear_partial()
    }

    /// The store holds a whole image again: the marker goes, durably.
    pub(super) fn clear_partial(&self) -> Result<(), StoreError> {
        self.remove_durably(&self.dir.join(REBUILD_MARKER))?;
        *self.partial_slot() = None;
        Ok(())
    }
}
