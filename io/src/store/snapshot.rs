//! Snapshot and base pins, the content checksum, and a base installed
//! from a rebuild.

use super::*;

impl Store {
    /// Pins the extent image at the current checkpoint (see the module docs).
    pub fn snapshot_pin(&self, label: &str) -> Result<SnapshotPin, StoreError> {
        // No committed frames are written straight to the extent while it is
        // pinned; a run already written is recorded first.
        let mut direct = self.direct();
        self.record_direct(&mut direct)?;
        let _serial = self
            .checkpointing
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let state = self.read_state();
        let lsn = state.superblock.checkpoint;
        let wal_pin = state.wal.pin_from(lsn, label)?;
        self.snapshot_pins.fetch_add(1, Ordering::AcqRel);
        Ok(SnapshotPin {
            lsn,
            extent: Arc::clone(&state.extent),
            image_bytes: self.options.block_count * BLOCK_SIZE as u64,
            gate: Arc::clone(&self.snapshot_pins),
            _wal_pin: wal_pin,
        })
    }

    /// Checkpoints everything durable, then pins that image: a full base at a
    /// known LSN, with the WAL after it retained.
    pub fn full_base_pin(&self, label: &str) -> Result<SnapshotPin, StoreError> {
        let durable = self.wal().durable();
        self.checkpoint(durable)?;
        self.snapshot_pin(label)
    }

    /// A crc32c of the whole readable volume (WAL included), for comparing replicas.
    pub fn content_checksum(&self) -> Result<u32, StoreError> {
        const STEP: u64 = 256;
        let mut crc = 0u32;
        let mut lba = 0;
        while lba < self.options.block_count {
            let blocks = STEP.min(self.options.block_count - lba);
            crc = crc32c::crc32c_append(crc, &self.read(lba, blocks)?);
            lba += blocks;
        }
        Ok(crc)
    }

    /// Starts receiving a base image of this volume's size at `image_lsn`.
    pub fn begin_install(&self, image_lsn: u64) -> Result<BaseInstall, StoreError> {
        let generation = self.read_state().superblock.generation + 1;
        let final_path = ExtentFile::path(&self.dir, generation);
        let staging = self.dir.join(format!("extent.{generation}.staging"));
        let file = self
            .fs()
            .create(&staging)
            .map_err(io_err("create", &staging))?;
        let image_bytes = self.options.block_count * BLOCK_SIZE as u64;
        file.set_len(image_bytes)
            .map_err(io_err("size", &staging))?;
        Ok(BaseInstall {
            file,
            staging,
            final_path,
            generation,
            image_lsn,
            image_bytes,
            received: 0,
            unsynced: 0,
            crc: 0,
        })
    }

    /// Switches to a fully received base: the superblock commit naming the new
    /// generation is the atomic point. The WAL restarts after the image LSN,
    /// with `epochs` (the sender's epoch history up to the image) as its
    /// history, written before the commit so both switch together.
    pub fn commit_install(
        &self,
        install: BaseInstall,
        expected_crc: u32,
        epoch: u64,
        epochs: &[EpochStart],
    ) -> Result<(), StoreError> {
        // The base replaces whatever was written straight to the extent.
        let mut direct = self.direct();
        if install.received != install.image_bytes {
            return Err(StoreError::BaseIncomplete {
                received: install.received,
                expected: install.image_bytes,
            });
        }
        if install.crc != expected_crc {
            let _ = self.fs().remove_file(&install.staging);
            return Err(StoreError::BaseChecksum {
                expected: expected_crc,
                actual: install.crc,
            });
        }
        epochs::validate(epochs).map_err(WalError::from)?;
        let mut history = epochs.to_vec();
        epochs::cut_after(&mut history, install.image_lsn);
        install
            .file
            .sync_all()
            .map_err(io_err("sync", &install.staging))?;
        let fs = self.fs();
        epochs::store(fs, &self.dir.join("wal"), install.generation, &history)
            .map_err(WalError::from)?;
        fs.rename(&install.staging, &install.final_path)
            .map_err(io_err("rename", &install.final_path))?;
        fs.sync_dir(&self.dir).map_err(io_err("sync", &self.dir))?;
        let _serial = self
            .checkpointing
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let mut state = self.write_state();
        let old_extent = state.extent.file_path().to_path_buf();
        let next = Superblock {
            generation: install.generation,
            checkpoint: install.image_lsn,
            epoch,
            ..state.superblock
        };
        next.store_in(fs, &self.dir)?;
        let (wal, _) = Wal::open(
            self.dir.join("wal"),
            Self::wal_options(&self.options, &next),
        )?;
        wal.set_checkpoint(next.checkpoint);
        state.extent = Arc::new(ExtentFile::open_in(
            Arc::clone(&self.options.fs),
            &install.final_path,
            self.options.block_count,
        )?);
        state.wal = wal;
        state.superblock = next;
        self.dirty().clear();
        *direct = None;
        drop(state);
        // Another history now: no map built in the old one holds, and an
        // install in place this one replaced is over.
        self.clear_dirty_maps()?;
        self.clear_partial()?;
        let marker = self.dir.join(RUN_MARKER);
        if fs.exists(&marker) {
            fs.remove_file(&marker).map_err(io_err("remove", &marker))?;
            fs.sync_dir(&self.dir).map_err(io_err("sync", &self.dir))?;
        }
        let _ = fs.remove_file(&old_extent);
        Ok(())
    }
}
