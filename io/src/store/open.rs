//! Opening a store: its lock, its WAL, an interrupted direct run settled,
//! other generations' extents removed, the dirty map rebuilt from the WAL.

use super::*;

impl Store {
    /// Opens the store in `dir`, creating it if empty.
    pub fn open(
        dir: impl AsRef<Path>,
        options: StoreOptions,
    ) -> Result<(Store, StoreReport), StoreError> {
        let dir = dir.as_ref().to_path_buf();
        let fs = options.fs.as_ref();
        crate::durable::create_dir_all_in(fs, &dir).map_err(io_err("create", &dir))?;
        let lock = match options.lock {
            true => Some(Self::lock(fs, &dir, options.lock_wait)?),
            false => None,
        };
        let (superblock, created) = match Superblock::load_in(fs, &dir) {
            Ok(sb) => (sb, false),
            Err(SuperblockError::Missing(_)) => {
                let uuid = new_uuid().map_err(io_err("uuid", Path::new("/dev/urandom")))?;
                let sb = Superblock {
                    uuid,
                    block_count: options.block_count,
                    checkpoint: 0,
                    epoch: 0,
                    generation: 1,
                };
                sb.store_in(fs, &dir)?;
                (sb, true)
            }
            Err(e) => return Err(e.into()),
        };
        if superblock.block_count != options.block_count {
            return Err(StoreError::SizeMismatch {
                on_disk: superblock.block_count,
                configured: options.block_count,
            });
        }
        let (superblock, reset_after_interrupted_run) =
            Self::settle_interrupted_run(fs, &dir, superblock, options.reset_interrupted_run)?;
        Self::settle_in_place_rename(fs, &dir, superblock.generation)?;
        Self::remove_other_extents(fs, &dir, superblock.generation)?;
        let extent = ExtentFile::open_in(
            Arc::clone(&options.fs),
            &ExtentFile::path(&dir, superblock.generation),
            options.block_count,
        )?;
        // A WAL that ends below the checkpoint restarts after it: committed
        // frames written straight to the extent, then the checkpoint, and a
        // crash before the WAL followed (see `apply_replicated`).
        let (wal, recovery) = Wal::open(dir.join("wal"), Self::wal_options(&options, &superblock))?;
        wal.set_checkpoint(superblock.checkpoint);
        let store = Store {
            dir,
            options,
            state: RwLock::new(State {
                superblock,
                extent: Arc::new(extent),
                wal,
            }),
            dirty: Mutex::new(BTreeMap::new()),
            direct: Mutex::new(None),
            snapshot_pins: Arc::new(AtomicUsize::new(0)),
            committed_floor: Mutex::new(0),
            dirty_maps: Mutex::new(delta::Maps::default()),
            partial: Arc::new(Mutex::new(None)),
            extent_ahead: std::sync::atomic::AtomicU64::new(
                match recovery.head > superblock.checkpoint {
                    true => recovery.head,
                    false => 0,
                },
            ),
            checkpointing: Mutex::new(()),
            _lock: lock,
        };
        *store.floor() = Self::load_committed_floor(store.fs(), &store.dir)?;
        let dirty_maps_dropped = store.load_dirty_maps()?;
        store.load_partial()?;
        let replayed_frames = store.rebuild_dirty()?;
        let report = StoreReport {
            created,
            checkpoint: superblock.checkpoint,
            head: recovery.head,
            torn_bytes_dropped: recovery.torn_bytes_dropped,
            replayed_frames,
            reset_after_interrupted_run,
            dirty_maps_dropped,
        };
        Ok((store, report))
    }

    /// Deals with the marker of a run of committed frames written straight
    /// to the extent. A run is live if the marker names the checkpoint
    /// still committed: the crash came before the run was recorded, and
    /// its blocks may be in the extent. Frames sent again would rewrite
    /// them only if they are the same frames; after a failover they need
    /// not be, and blocks the new primary never writes would keep the old
    /// run's data. So a replica starts over: a new generation, empty, with
    /// nothing applied (its epoch kept), committed before the marker goes.
    /// A marker whose run was recorded (or whose own write a crash cut:
    /// nothing was written to the extent before it was synced) just goes.
    pub(super) fn settle_interrupted_run(
        fs: &dyn Fs,
        dir: &Path,
        superblock: Superblock,
        reset: bool,
    ) -> Result<(Superblock, Option<u64>), StoreError> {
        let tmp = dir.join(RUN_MARKER_TMP);
        if fs.exists(&tmp) {
            fs.remove_file(&tmp).map_err(io_err("remove", &tmp))?;
        }
        let path = dir.join(RUN_MARKER);
        let marked = match fs.read(&path) {
            Ok(bytes) => decode_run_marker(&bytes),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok((superblock, None)),
            Err(e) => return Err(io_err("read", &path)(e)),
        };
        let mut settled = (superblock, None);
        if marked == Some(superblock.checkpoint) {
            if !reset {
                return Err(StoreError::InterruptedRun {
                    checkpoint: superblock.checkpoint,
                });
            }
            let next = Superblock {
                generation: superblock.generation + 1,
                checkpoint: 0,
                ..superblock
            };
            // What an install a crash cut before its commit left of the
            // next generation must not be taken for it.
            let staging = dir.join(format!("extent.{}.staging", next.generation));
            for leftover in [ExtentFile::path(dir, next.generation), staging] {
                if fs.exists(&leftover) {
                    fs.remove_file(&leftover)
                        .map_err(io_err("remove", &leftover))?;
                }
            }
            let wal_dir = dir.join("wal");
            if fs.is_dir(&wal_dir) {
                epochs::remove_others(fs, &wal_dir, superblock.generation)
                    .map_err(WalError::from)?;
            }
            next.store_in(fs, dir)?;
            settled = (next, Some(superblock.checkpoint));
        }
        fs.remove_file(&path).map_err(io_err("remove", &path))?;
        fs.sync_dir(dir).map_err(io_err("sync", dir))?;
        Ok(settled)
    }

    /// Locks `dir/LOCK` exclusively, waiting up to `wait` for a previous
    /// instance (the lock is the kernel's: a crashed process holds nothing).
    pub(super) fn lock(
        fs: &dyn Fs,
        dir: &Path,
        wait: Duration,
    ) -> Result<Box<dyn FsFile>, StoreError> {
        let path = dir.join("LOCK");
        let (file, _) =
            crate::durable::open_or_create_in(fs, &path).map_err(io_err("create", &path))?;
        let deadline = Instant::now() + wait;
        loop {
            match file.try_lock() {
                Ok(true) => return Ok(file),
                Ok(false) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(5));
                }
                Ok(false) => return Err(StoreError::Locked(dir.to_path_buf())),
                Err(e) => return Err(io_err("lock", &path)(e)),
            }
        }
    }

    pub(super) fn wal_options(options: &StoreOptions, superblock: &Superblock) -> WalOptions {
        WalOptions {
            segment_bytes: options.segment_bytes,
            sync: options.sync,
            generation: superblock.generation,
            start_after: superblock.checkpoint,
            max_retained_bytes: options.max_retained_bytes,
            fs: Arc::clone(&options.fs),
            ..WalOptions::default()
        }
    }

    pub(super) fn remove_other_extents(
        fs: &dyn Fs,
        dir: &Path,
        generation: u64,
    ) -> Result<(), StoreError> {
        let keep = format!("extent.{generation}");
        let mut removed = false;
        for name in fs.list(dir).map_err(io_err("list", dir))? {
            if name.starts_with("extent.") && name != keep {
                let path = dir.join(&name);
                fs.remove_file(&path).map_err(io_err("remove", &path))?;
                removed = true;
            }
        }
        if removed {
            fs.sync_dir(dir).map_err(io_err("sync", dir))?;
        }
        Ok(())
    }

    /// Replays `(checkpoint, head]` into the dirty map. Returns the frames replayed.
    pub(super) fn rebuild_dirty(&self) -> Result<u64, StoreError> {
        let (wal, checkpoint) = {
            let state = self.read_state();
            (state.wal.clone(), state.superblock.checkpoint)
        };
        let frames = wal.read_frames(checkpoint, wal.head())?;
        let mut dirty = self.dirty();
        dirty.clear();
        for frame in &frames {
            Self::note_dirty(&mut dirty, frame);
        }
        Ok(frames.len() as u64)
    }
}
