//! Opening a WAL: its open plan ([`super::plan`]) carried out, the
//! epoch history reconciled with the frames found.

use super::*;

impl Wal {
    /// Opens (or creates) the WAL in `dir`, recovering from a crash: a torn
    /// last frame is cut off and reported; corruption anywhere else is an error
    /// and nothing is truncated.
    pub fn open(
        dir: impl AsRef<Path>,
        options: WalOptions,
    ) -> Result<(Wal, RecoveryReport), WalError> {
        let dir = dir.as_ref().to_path_buf();
        let fs = Arc::clone(&options.fs);
        let fs = fs.as_ref();
        crate::durable::create_dir_all_in(fs, &dir).map_err(io_err("create", &dir))?;
        // What is there and what opening changes, read alone; then done.
        let plan = plan::plan(fs, &dir, options.generation, options.start_after);
        if let Some(refused) = plan.refused {
            return Err(refused);
        }
        for path in &plan.stale {
            fs.remove_file(path).map_err(io_err("remove stale", path))?;
        }
        let stale_history = epochs::remove_others(fs, &dir, options.generation)?;
        if !plan.stale.is_empty() || stale_history {
            fs.sync_dir(&dir).map_err(io_err("sync", &dir))?;
        }
        if let Some(torn) = &plan.torn {
            let file = fs.open(&torn.path).map_err(io_err("open", &torn.path))?;
            file.set_len(torn.offset)
                .map_err(io_err("truncate torn tail", &torn.path))?;
            file.sync_all().map_err(io_err("sync", &torn.path))?;
        }
        let torn = plan.torn.as_ref().map_or(0, |t| t.bytes);
        let frame_epochs = plan.runs;
        let mut segments = plan.segments;
        let mut superseded = plan.superseded;
        if plan.restarts {
            superseded.extend(segments.drain(..).map(|s| s.path));
        }
        for path in &superseded {
            fs.remove_file(path)
                .map_err(io_err("remove superseded", path))?;
        }
        if !superseded.is_empty() {
            fs.sync_dir(&dir).map_err(io_err("sync", &dir))?;
        }
        if segments.is_empty() {
            let first = options.start_after + 1;
            let path = dir.join(segment::segment_name(options.generation, first));
            fs.create(&path).map_err(io_err("create", &path))?;
            fs.sync_dir(&dir).map_err(io_err("sync", &dir))?;
            segments.push(Segment::empty(path, first));
        }
        let tail = segments[0].first - 1;
        let head = segments.last().map_or(tail, Segment::last);
        let persisted = epochs::load(fs, &dir, options.generation)?;
        let history = Self::reconcile_epochs(persisted.clone(), tail, head, &frame_epochs)?;
        if history != persisted {
            epochs::store(fs, &dir, options.generation, &history)?;
        }
        let active_path = segments.last().map(|s| s.path.clone()).unwrap_or_default();
        let active: Arc<dyn FsFile> = fs
            .open(&active_path)
            .map_err(io_err("open", &active_path))?
            .into();
        let allocated = active.size().map_err(io_err("stat", &active_path))?;
        // What was found counts as durable from here on: a process that died
        // may have left frames it never synced, and a segment whose entry it
        // never synced. Only the last segments can hold either (a rotation
        // makes the full one durable, and its entry waits for the next sync
        // at most). Rotation skips its sync when everything is durable, so
        // this must be true.
        if options.sync != SyncMode::None {
            let last_frames = segments.iter().rev().find(|s| !s.is_empty());
            if let Some(last) = last_frames.filter(|s| s.path != active_path) {
                let file = fs.open(&last.path).map_err(io_err("open", &last.path))?;
                options
                    .sync
                    .sync(file.as_ref())
                    .map_err(io_err("sync", &last.path))?;
            }
            options
                .sync
                .sync(active.as_ref())
                .map_err(io_err("sync", &active_path))?;
            fs.sync_dir(&dir).map_err(io_err("sync", &dir))?;
        }
        let report = RecoveryReport {
            segments: segments.len(),
            tail,
            head,
            torn_bytes_dropped: torn,
            stale_segments_removed: plan.stale.len(),
            superseded_segments_removed: superseded.len(),
        };
        let (durable_tx, _) = watch::channel(head);
        let wal = Wal {
            inner: Arc::new(Inner {
                dir,
                options,
                writer: Mutex::new(Writer {
                    segments,
                    active,
                    allocated,
                    unsynced: 0,
                    synced_last: 0,
                    head,
                    tail,
                    checkpoint: tail,
                    scratch: BytesMut::new(),
                    epochs: history,
                    dir_unsynced: false,
                }),
                sync: Mutex::new(SyncState {
                    durable: head,
                    ..SyncState::default()
                }),
                synced: Condvar::new(),
                durable_tx,
                pins: Arc::new(PinTable::default()),
                #[cfg(feature = "faults")]
                fail_next_sync: AtomicBool::new(false),
                #[cfg(feature = "faults")]
                sync_delay_us: AtomicU64::new(0),
                syncs: AtomicU64::new(0),
                poison: std::sync::OnceLock::new(),
            }),
        };
        Ok((wal, report))
    }

    /// The history to trust after a crash: persisted entries up to the
    /// tail (their frames may be recycled), then what the frames after the
    /// tail say. Entries for frames a crash took are dropped; frames whose
    /// epoch contradicts the persisted history are an error.
    pub(super) fn reconcile_epochs(
        mut history: Vec<EpochStart>,
        tail: u64,
        head: u64,
        frame_epochs: &[EpochStart],
    ) -> Result<Vec<EpochStart>, EpochError> {
        epochs::cut_after(&mut history, tail.min(head));
        for start in frame_epochs.iter().filter(|e| e.first_lsn > tail) {
            epochs::note(&mut history, start.first_lsn, start.epoch)?;
        }
        Ok(history)
    }
}
