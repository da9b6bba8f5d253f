//! The shell's side of convergence (the rule is the engine's,
//! `walship_engine::ConvergencePolicy`): what the volume ingests and each
//! replica's backlog, told to the engine at each heartbeat; the boosts and
//! the limit on writes it decides, carried out.

use super::VolumeActor;
use crate::recovery::Bucket;
use serde::Serialize;
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use walship_engine::ReplicaId;

/// What convergence keeps between heartbeats.
#[derive(Debug)]
pub(super) struct Converging {
    /// WAL bytes appended since the volume opened, counted up to `head`.
    ingested: u64,
    head: u64,
    /// Each replica's boost flag, shared with its senders' contexts.
    boosts: HashMap<ReplicaId, Arc<AtomicBool>>,
    /// The writes' limit (bytes per second) and its bucket, while held.
    limit: Option<(u64, Bucket)>,
    epoch: Instant,
    delayed_writes: u64,
    delayed_for: Duration,
    /// Each delay, for `/metrics` (`walship_volume_write_delay_seconds`).
    delays: metrics::Histogram,
}

/// The volume's writes held back for a replica that is not converging.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct WriteBackpressure {
    /// The rate writes are held to now, bytes per second (`None`: free).
    pub limit: Option<u64>,
    /// Writes delayed since the volume opened.
    pub delayed_writes: u64,
    /// Their delays, summed, in seconds.
    pub delay_seconds: f64,
}

impl Converging {
    pub(super) fn new(volume: &str, head: u64) -> Self {
        Self {
            delays: metrics::histogram!(
                "walship_volume_write_delay_seconds",
                "volume" => volume.to_owned()
            ),
            ingested: 0,
            head,
            boosts: HashMap::new(),
            limit: None,
            epoch: Instant::now(),
            delayed_writes: 0,
            delayed_for: Duration::ZERO,
        }
    }

    /// The flag a sender's context reads for `replica`, made if need be.
    pub(super) fn boost_flag(&mut self, replica: &ReplicaId) -> Arc<AtomicBool> {
        Arc::clone(self.boosts.entry(replica.clone()).or_default())
    }

    /// The flag, if it was made.
    pub(super) fn boost_flag_made(&self, replica: &ReplicaId) -> Option<Arc<AtomicBool>> {
        self.boosts.get(replica).map(Arc::clone)
    }

    pub(super) fn boost(&mut self, replica: &ReplicaId, on: bool) {
        self.boost_flag(replica).store(on, Ordering::Relaxed);
    }

    pub(super) fn limit_writes(&mut self, rate: Option<u64>) {
        let now = self.now();
        self.limit = rate.map(|rate| match self.limit.take() {
            // The debt already owed carries over to the new rate.
            Some((_, bucket)) => (rate, bucket),
            None => (rate, Bucket::new(now)),
        });
    }

    /// How long a write of `bytes` waits before it is answered: nothing
    /// while writes are free, at most `max` while they are held.
    pub(super) fn write_delay(&mut self, bytes: usize, max: Duration) -> Duration {
        let now = self.now();
        let Some((rate, bucket)) = &mut self.limit else {
            return Duration::ZERO;
        };
        // A rate of zero (nothing drains) still lets a write go per bound.
        let rate = (*rate).max(1) as f64;
        let wait = bucket.reserve_bounded(now, rate, bytes as u64, max);
        if !wait.is_zero() {
            self.delayed_writes += 1;
            self.delayed_for += wait;
            self.delays.record(wait.as_secs_f64());
        }
        wait
    }

    pub(super) fn status(&self) -> WriteBackpressure {
        WriteBackpressure {
            limit: self.limit.as_ref().map(|(rate, _)| *rate),
            delayed_writes: self.delayed_writes,
            delay_seconds: self.delayed_for.as_secs_f64(),
        }
    }

    fn now(&self) -> u64 {
        u64::try_from(self.epoch.elapsed().as_nanos()).unwrap_or(u64::MAX)
    }
}

impl VolumeActor {
    /// Each replica's backlog: the WAL bytes after its durable LSN that
    /// the primary still holds.
    pub(super) fn backlogs(&self) -> Vec<(ReplicaId, u64)> {
        let wal = self.store.wal();
        self.engine
            .replicas()
            .filter_map(|r| {
                let flushed = self.engine.flushed(r)?;
                Some((r.clone(), wal.retained_after(flushed.get())))
            })
            .collect()
    }

    /// Tells the engine what the volume ingested and each replica's
    /// backlog (at each heartbeat); what it decides runs with the
    /// heartbeat's commands.
    pub(super) fn report_lag(&mut self) {
        // The samples are stamped with the engine's clock: now, not the
        // last message's.
        self.clock();
        let wal = self.store.wal();
        let c = &mut self.converging;
        // The WAL after the last head counted: what was appended since. A
        // checkpoint may recycle past that head before this runs only when
        // no hold keeps it, that is when no replica is behind to watch.
        c.ingested = c.ingested.saturating_add(wal.retained_after(c.head));
        c.head = wal.head();
        let ingested = c.ingested;
        let backlogs = self.backlogs();
        self.engine.handle_lag(ingested, &backlogs);
    }
}
