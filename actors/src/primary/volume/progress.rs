//! Each recovering replica's progress, for operators: what kind of
//! recovery, bytes to go, the rate it gets, when it should be done, and its
//! place in the node's rebuild queue. Read from the engine's sessions and
//! the bytes each sender put on the wire; nothing here decides anything.

use super::VolumeActor;
use serde::Serialize;
use std::collections::{HashMap, VecDeque};
use std::time::{Duration, Instant};
use walship_engine::{PlanKind, RebuildState, ReplicaId, Work};

/// One replica's recovery as operators see it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct RecoveryProgress {
    /// The replica.
    pub replica: ReplicaId,
    /// `catch_up`, `queued`, or the rebuild's transfer
    /// (`rebuild_delta`, `rebuild_checksum`, `rebuild_whole`,
    /// `rebuild_resume`, `rebuild_staged`).
    pub kind: String,
    /// Bytes still to go: the WAL to the catch-up's target, or the image
    /// not yet passed (a delta rebuild sends only its marked regions of
    /// it) and the WAL tail after it.
    pub bytes_to_go: u64,
    /// Bytes per second sent to it over the last seconds.
    pub rate: u64,
    /// Seconds to go at that rate (unknown while nothing moves).
    pub eta_seconds: Option<f64>,
    /// Place in the node's rebuild queue (from 1) and how many wait.
    pub queued: Option<(usize, usize)>,
}

/// Bytes sent to each replica, sampled at each heartbeat over a window.
#[derive(Debug, Default)]
pub(super) struct SendRates(HashMap<ReplicaId, VecDeque<(Instant, u64)>>);

/// How far back a rate looks.
const RATE_WINDOW: Duration = Duration::from_secs(3);

impl SendRates {
    pub(super) fn sample(&mut self, replica: &ReplicaId, sent: u64, now: Instant) {
        let samples = self.0.entry(replica.clone()).or_default();
        samples.push_back((now, sent));
        while samples
            .front()
            .is_some_and(|(at, _)| now.duration_since(*at) > RATE_WINDOW)
            && samples.len() > 2
        {
            samples.pop_front();
        }
    }

    /// Bytes per second over the window.
    pub(super) fn rate(&self, replica: &ReplicaId) -> u64 {
        let Some(samples) = self.0.get(replica) else {
            return 0;
        };
        match (samples.front(), samples.back()) {
            (Some((t0, b0)), Some((t1, b1))) if t1 > t0 => {
                (b1.saturating_sub(*b0) as f64 / t1.duration_since(*t0).as_secs_f64()) as u64
            }
            _ => 0,
        }
    }

    pub(super) fn forget(&mut self, keep: impl Fn(&ReplicaId) -> bool) {
        self.0.retain(|replica, _| keep(replica));
    }
}

impl VolumeActor {
    /// Samples what each sender has sent (at each heartbeat).
    pub(super) fn sample_send_rates(&mut self) {
        let now = Instant::now();
        for (replica, sent) in &self.bytes_sent {
            let sent = sent.load(std::sync::atomic::Ordering::Relaxed);
            self.send_rates.sample(replica, sent, now);
        }
        let bytes_sent = &self.bytes_sent;
        self.send_rates.forget(|r| bytes_sent.contains_key(r));
    }

    /// Every replica that is recovering or queued, with its progress.
    pub(super) fn progress(
        &self,
        registry: &walship_engine::RegistryStatus,
    ) -> Vec<RecoveryProgress> {
        let wal = self.store.wal();
        let to = |from: u64, target: u64| {
            wal.retained_after(from)
                .saturating_sub(wal.retained_after(target))
        };
        let image_bytes = self.store.block_count() * walship_io::BLOCK_SIZE as u64;
        registry
            .senders
            .iter()
            .filter_map(|sender| {
                let session = sender.session.as_ref()?;
                let queued = self.pools.recovery.queue_position(sender.replica.as_str());
                if session.stage == "queued" {
                    // Planned when its slot comes: all of it may have to move.
                    return Some(RecoveryProgress {
                        replica: sender.replica.clone(),
                        kind: "queued".to_owned(),
                        bytes_to_go: image_bytes,
                        rate: 0,
                        eta_seconds: None,
                        queued,
                    });
                }
                let plan = session.plan.as_ref()?;
                let (kind, bytes_to_go) = match (&session.work, &plan.kind) {
                    (
                        Some(Work::CatchUp {
                            applied, target, ..
                        }),
                        _,
                    ) => ("catch_up".to_owned(), to(applied.get(), target.get())),
                    (Some(Work::Rebuild(fsm)), PlanKind::Rebuild { transfer, .. }) => {
                        let kind = transfer.event_name().trim_start_matches("plan_").to_owned();
                        let to_go = match fsm.state() {
                            RebuildState::Transfer {
                                transferred_bytes,
                                image_lsn,
                                ..
                            } => {
                                let tail = match &plan.kind {
                                    PlanKind::Rebuild { source, .. } => match source {
                                        walship_engine::RebuildSource::SnapshotTail {
                                            tail_target,
                                            ..
                                        } => to(image_lsn.get(), tail_target.get()),
                                        walship_engine::RebuildSource::FullBase { .. } => 0,
                                    },
                                    PlanKind::CatchUp { .. } => 0,
                                };
                                image_bytes.saturating_sub(*transferred_bytes) + tail
                            }
                            RebuildState::TailReplay {
                                replayed, target, ..
                            } => to(replayed.get(), target.get()),
                            _ => image_bytes,
                        };
                        (kind, to_go)
                    }
                    _ => return None,
                };
                let rate = self.send_rates.rate(&sender.replica);
                let eta_seconds =
                    (rate > 0 && queued.is_none()).then(|| bytes_to_go as f64 / rate as f64);
                Some(RecoveryProgress {
                    replica: sender.replica.clone(),
                    kind,
                    bytes_to_go,
                    rate,
                    eta_seconds,
                    queued,
                })
            })
            .collect()
    }
}
