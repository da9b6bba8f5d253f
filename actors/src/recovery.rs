//! The node-wide recovery budget: one rate shared by every catch-up and
//! rebuild a runtime sends, a floor each recovery keeps however many run,
//! and a cap on concurrent rebuilds with a queue in arrival order. Live
//! shipping of new writes is never in it.
//!
//! The pure parts ([`Bucket`], [`SlotQueue`]) take time and tickets as
//! arguments and are tested as tables; [`RecoveryBudget`] puts them behind a
//! lock for the runtime. Like DRBD's `c-max-rate`/`c-min-rate` and Ceph's
//! `osd_max_backfills`, but the floor is MiB/s (DRBD's 250 KiB/s default
//! made a 100 GiB resync take days).

use serde::Serialize;
use std::collections::{BTreeMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};
use tokio::sync::oneshot;

/// The smallest floor: a recovery always gets at least this much.
pub const MIN_FLOOR_BYTES: u64 = 1 << 20;

/// What recoveries may take of a node.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[non_exhaustive]
pub struct RecoveryLimits {
    /// Bytes per second every catch-up and rebuild sent by this runtime
    /// share (`None`: unlimited).
    pub rate: Option<u64>,
    /// Bytes per second each running recovery gets at least, whatever the
    /// rate: the shared rate is raised to `floor` times the recoveries
    /// running when that is more.
    pub floor: u64,
    /// Rebuilds that may run at once (`None`: no cap); the rest queue in
    /// arrival order.
    pub max_rebuilds: Option<usize>,
    /// Bytes per second every catch-up and rebuild this runtime's
    /// replicas *receive* share (`None`: unlimited), with the same floor
    /// per recovery received. Ceph counts backfills both ways: a node that
    /// is the target of many recoveries must not be flooded by them.
    pub receive_rate: Option<u64>,
}

impl Default for RecoveryLimits {
    /// Unlimited, with a 32 MiB/s floor once a rate is set.
    fn default() -> Self {
        Self {
            rate: None,
            floor: 32 << 20,
            max_rebuilds: None,
            receive_rate: None,
        }
    }
}

/// Limits that cannot be applied; nothing of them is.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LimitsError {
    /// A rate of zero would stop every recovery.
    #[error("a recovery rate of 0 would stop every recovery; leave it unset for no limit")]
    ZeroRate,
    /// The rate is below the floor each recovery keeps.
    #[error("a recovery rate of {rate} B/s is below the floor of {floor} B/s each recovery keeps")]
    RateBelowFloor {
        /// Asked for.
        rate: u64,
        /// The floor.
        floor: u64,
    },
    /// The floor is below [`MIN_FLOOR_BYTES`].
    #[error(
        "a recovery floor of {floor} B/s is below {MIN_FLOOR_BYTES} B/s: recoveries would crawl"
    )]
    FloorTooLow {
        /// Asked for.
        floor: u64,
    },
    /// A receive rate of zero would stop every recovery this node receives.
    #[error("a receive rate of 0 would stop every recovery this node receives; leave it unset for no limit")]
    ZeroReceiveRate,
    /// The receive rate is below the floor each recovery keeps.
    #[error("a receive rate of {rate} B/s is below the floor of {floor} B/s each recovery keeps")]
    ReceiveRateBelowFloor {
        /// Asked for.
        rate: u64,
        /// The floor.
        floor: u64,
    },
    /// A cap of zero would queue every rebuild forever.
    #[error("max_rebuilds of 0 would queue every rebuild forever; leave it unset for no cap")]
    ZeroRebuilds,
}

impl RecoveryLimits {
    /// No limit on anything.
    pub fn unlimited() -> Self {
        Self::default()
    }

    /// These limits with `rate` bytes per second.
    pub fn with_rate(mut self, rate: Option<u64>) -> Self {
        self.rate = rate;
        self
    }

    /// These limits with `floor` bytes per second per recovery.
    pub fn with_floor(mut self, floor: u64) -> Self {
        self.floor = floor;
        self
    }

    /// These limits with `rate` bytes per second received.
    pub fn with_receive_rate(mut self, rate: Option<u64>) -> Self {
        self.receive_rate = rate;
        self
    }

    /// These limits with at most `max` rebuilds at once.
    pub fn with_max_rebuilds(mut self, max: Option<usize>) -> Self {
        self.max_rebuilds = max;
        self
    }

    /// Checks that the limits can be applied.
    pub fn validate(&self) -> Result<(), LimitsError> {
        if self.floor < MIN_FLOOR_BYTES {
            return Err(LimitsError::FloorTooLow { floor: self.floor });
        }
        match self.rate {
            Some(0) => return Err(LimitsError::ZeroRate),
            Some(rate) if rate < self.floor => {
                return Err(LimitsError::RateBelowFloor {
                    rate,
                    floor: self.floor,
                })
            }
            _ => {}
        }
        match self.receive_rate {
            Some(0) => return Err(LimitsError::ZeroReceiveRate),
            Some(rate) if rate < self.floor => {
                return Err(LimitsError::ReceiveRateBelowFloor {
                    rate,
                    floor: self.floor,
                })
            }
            _ => {}
        }
        if self.max_rebuilds == Some(0) {
            return Err(LimitsError::ZeroRebuilds);
        }
        Ok(())
    }
}

/// A token bucket whose tokens may go negative: a sender reserves what it
/// is about to send and waits until the debt is paid, so senders are
/// served in the order they asked and the aggregate stays at the rate
/// whatever the chunk sizes. At most `burst` tokens accumulate while idle.
#[derive(Debug, Clone)]
pub(crate) struct Bucket {
    tokens: f64,
    /// Nanoseconds since the budget's epoch at the last refill.
    at: u64,
}

/// Tokens an idle bucket keeps: a tenth of a second at the rate.
const BURST_SECONDS: f64 = 0.1;

impl Bucket {
    pub(crate) fn new(now: u64) -> Self {
        Self {
            tokens: 0.0,
            at: now,
        }
    }

    /// Reserves `bytes` at `rate` bytes per second, at `now` (ns); returns
    /// how long the sender waits before sending them.
    pub(crate) fn reserve(&mut self, now: u64, rate: f64, bytes: u64) -> Duration {
        let elapsed = now.saturating_sub(self.at) as f64 / 1e9;
        self.at = self.at.max(now);
        self.tokens = (self.tokens + elapsed * rate).min(rate * BURST_SECONDS);
        self.tokens -= bytes as f64;
        if self.tokens >= 0.0 {
            Duration::ZERO
        } else {
            Duration::from_secs_f64(-self.tokens / rate)
        }
    }

    /// [`reserve`](Self::reserve), but nobody waits longer than `max`:
    /// the debt never grows past `max` at the rate, so what is asked
    /// beyond it goes without waiting (a bound, not a limit).
    pub(crate) fn reserve_bounded(
        &mut self,
        now: u64,
        rate: f64,
        bytes: u64,
        max: Duration,
    ) -> Duration {
        let wait = self.reserve(now, rate, bytes).min(max);
        self.tokens = self.tokens.max(-rate * max.as_secs_f64());
        wait
    }
}

/// Who waits for a rebuild slot, in arrival order, and who holds one.
#[derive(Debug, Clone, Default)]
pub(crate) struct SlotQueue {
    cap: Option<usize>,
    running: BTreeMap<u64, String>,
    waiting: VecDeque<(u64, String)>,
}

impl SlotQueue {
    pub(crate) fn new(cap: Option<usize>) -> Self {
        Self {
            cap,
            ..Self::default()
        }
    }

    fn room(&self) -> bool {
        self.cap.is_none_or(|cap| self.running.len() < cap)
    }

    /// `ticket` (for `who`) asks for a slot: true when it has one now.
    pub(crate) fn enqueue(&mut self, ticket: u64, who: String) -> bool {
        if self.waiting.is_empty() && self.room() {
            self.running.insert(ticket, who);
            return true;
        }
        self.waiting.push_back((ticket, who));
        false
    }

    /// `ticket` is done (or gave up waiting); returns the tickets admitted
    /// in its place.
    pub(crate) fn release(&mut self, ticket: u64) -> Vec<u64> {
        if self.running.remove(&ticket).is_none() {
            self.waiting.retain(|(t, _)| *t != ticket);
        }
        self.admit()
    }

    /// A new cap; returns the tickets it admits (a lower cap lets running
    /// ones finish and admits no more until they are under it).
    pub(crate) fn set_cap(&mut self, cap: Option<usize>) -> Vec<u64> {
        self.cap = cap;
        self.admit()
    }

    fn admit(&mut self) -> Vec<u64> {
        let mut admitted = Vec::new();
        while self.room() {
            let Some((ticket, who)) = self.waiting.pop_front() else {
                break;
            };
            self.running.insert(ticket, who);
            admitted.push(ticket);
        }
        admitted
    }

    /// Where `ticket` waits: (1-based position, how many wait).
    pub(crate) fn position(&self, ticket: u64) -> Option<(usize, usize)> {
        let at = self.waiting.iter().position(|(t, _)| *t == ticket)?;
        Some((at + 1, self.waiting.len()))
    }

    /// Who runs and who waits, in order.
    pub(crate) fn snapshot(&self) -> (Vec<String>, Vec<String>) {
        (
            self.running.values().cloned().collect(),
            self.waiting.iter().map(|(_, who)| who.clone()).collect(),
        )
    }
}

/// The budget and queue as operators see them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[non_exhaustive]
pub struct RecoveryStatus {
    /// The limits in force.
    pub limits: RecoveryLimits,
    /// Catch-ups and rebuilds sending now.
    pub recovering: usize,
    /// Rebuilds holding a slot (`<volume>/<server>`).
    pub rebuilds_running: Vec<String>,
    /// Rebuilds waiting for one, first first.
    pub rebuilds_queued: Vec<String>,
    /// Bytes recoveries sent through the budget so far.
    pub bytes_sent: u64,
    /// Of those, bytes sent by boosted catch-ups (first call on the rate).
    pub boosted_bytes: u64,
    /// Recoveries this runtime's replicas are receiving now.
    pub receiving: usize,
    /// Bytes of recoveries they received through the budget so far.
    pub bytes_received: u64,
}

#[derive(Debug)]
struct Shared {
    limits: RecoveryLimits,
    bucket: Bucket,
    /// The boosted senders' own lane: they wait for each other only.
    boosted: Bucket,
    boosted_bytes: u64,
    /// What replicas receive: its own bucket, count and bytes.
    received: Bucket,
    receiving: usize,
    bytes_received: u64,
    slots: SlotQueue,
    wakers: BTreeMap<u64, oneshot::Sender<()>>,
    next_ticket: u64,
    recovering: usize,
    bytes_sent: u64,
}

/// The runtime's recovery budget (see the module docs). Cheap to clone.
#[derive(Debug, Clone)]
pub struct RecoveryBudget {
    shared: Arc<Mutex<Shared>>,
    epoch: Instant,
}

impl Default for RecoveryBudget {
    /// Unlimited.
    fn default() -> Self {
        Self::new_unchecked(RecoveryLimits::unlimited())
    }
}

impl RecoveryBudget {
    /// A budget with `limits`, checked ([`RecoveryLimits::validate`]); a
    /// runtime makes its own ([`crate::Runtime::recovery`]).
    pub fn new(limits: RecoveryLimits) -> Result<Self, LimitsError> {
        limits.validate()?;
        Ok(Self::new_unchecked(limits))
    }

    fn new_unchecked(limits: RecoveryLimits) -> Self {
        Self {
            shared: Arc::new(Mutex::new(Shared {
                limits,
                bucket: Bucket::new(0),
                boosted: Bucket::new(0),
                boosted_bytes: 0,
                received: Bucket::new(0),
                receiving: 0,
                bytes_received: 0,
                slots: SlotQueue::new(limits.max_rebuilds),
                wakers: BTreeMap::new(),
                next_ticket: 1,
                recovering: 0,
                bytes_sent: 0,
            })),
            epoch: Instant::now(),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Shared> {
        self.shared.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn now(&self) -> u64 {
        u64::try_from(self.epoch.elapsed().as_nanos()).unwrap_or(u64::MAX)
    }

    /// The limits in force.
    pub fn limits(&self) -> RecoveryLimits {
        self.lock().limits
    }

    /// Applies new limits, or none of them: a lower cap lets running
    /// rebuilds finish; a higher one admits queued ones at once.
    pub fn set_limits(&self, limits: RecoveryLimits) -> Result<(), LimitsError> {
        limits.validate()?;
        let mut shared = self.lock();
        shared.limits = limits;
        let admitted = shared.slots.set_cap(limits.max_rebuilds);
        Self::wake(&mut shared, admitted);
        Ok(())
    }

    fn wake(shared: &mut Shared, admitted: Vec<u64>) {
        for ticket in admitted {
            if let Some(waker) = shared.wakers.remove(&ticket) {
                let _ = waker.send(());
            }
        }
    }

    /// Counts a recovery as running while the guard lives (the floor is
    /// per running recovery).
    pub(crate) fn recovering(&self) -> Counted {
        self.count(Way::Sending)
    }

    fn count(&self, way: Way) -> Counted {
        *self.lock().running(way) += 1;
        Counted(self.clone(), way)
    }

    /// Waits until `bytes` may be sent under the shared rate.
    pub(crate) async fn throttle(&self, bytes: u64) {
        let wait = self.reserve(bytes);
        if !wait.is_zero() {
            tokio::time::sleep(wait).await;
        }
    }

    /// Waits until `bytes` may go for a boosted catch-up (one that is not
    /// converging): first call on the rate. It waits only for boosted
    /// senders before it (a lane of its own at the same rate), and what it
    /// sends is charged to the shared bucket too, so everyone else waits
    /// for it. The rate still bounds what boosted senders send; the others
    /// get what they leave.
    pub(crate) async fn throttle_first(&self, bytes: u64) {
        let wait = self.reserve_first(bytes);
        if !wait.is_zero() {
            tokio::time::sleep(wait).await;
        }
    }

    /// Reserves `bytes` for a boosted sender; returns its wait.
    fn reserve_first(&self, bytes: u64) -> Duration {
        let now = self.now();
        let mut shared = self.lock();
        shared.boosted_bytes += bytes;
        // Everyone else waits for these bytes too.
        let _others = self.reserve_locked(&mut shared, now, bytes);
        match shared.rate() {
            Some(rate) => shared.boosted.reserve(now, rate, bytes),
            None => Duration::ZERO,
        }
    }

    /// Waits until `bytes` a replica received for a catch-up or rebuild
    /// may be applied under the receive rate; the socket is not read
    /// meanwhile, so the sender's window fills and it waits too.
    pub(crate) async fn throttle_received(&self, bytes: u64) {
        let wait = self.reserve_received(bytes);
        if !wait.is_zero() {
            tokio::time::sleep(wait).await;
        }
    }

    /// Whether what replicas receive is limited.
    pub(crate) fn receive_limited(&self) -> bool {
        self.lock().limits.receive_rate.is_some()
    }

    fn reserve_received(&self, bytes: u64) -> Duration {
        let now = self.now();
        let mut shared = self.lock();
        shared.bytes_received += bytes;
        match shared.receive_rate() {
            Some(rate) => shared.received.reserve(now, rate, bytes),
            None => Duration::ZERO,
        }
    }

    /// Counts a recovery as being received while the guard lives (the
    /// floor is per recovery received).
    pub(crate) fn receiving(&self) -> Counted {
        self.count(Way::Receiving)
    }

    /// Reserves `bytes` under the shared rate; returns the wait.
    fn reserve(&self, bytes: u64) -> Duration {
        let now = self.now();
        let mut shared = self.lock();
        self.reserve_locked(&mut shared, now, bytes)
    }

    fn reserve_locked(&self, shared: &mut Shared, now: u64, bytes: u64) -> Duration {
        shared.bytes_sent += bytes;
        match shared.rate() {
            Some(rate) => shared.bucket.reserve(now, rate, bytes),
            None => Duration::ZERO,
        }
    }

    /// Waits for a rebuild slot for `who`; the slot is held until the
    /// returned guard drops. Dropping the future before it resolves leaves
    /// the queue.
    pub(crate) async fn rebuild_slot(&self, who: String) -> RebuildSlot {
        // The place and its waker under one lock: a slot freed between
        // the two would admit a ticket nobody wakes.
        let (tx, rx) = oneshot::channel();
        let (ticket, admitted) = {
            let mut shared = self.lock();
            let ticket = shared.next_ticket;
            shared.next_ticket += 1;
            let admitted = shared.slots.enqueue(ticket, who);
            if !admitted {
                shared.wakers.insert(ticket, tx);
            }
            (ticket, admitted)
        };
        let slot = RebuildSlot {
            budget: self.clone(),
            ticket,
        };
        if admitted {
            return slot;
        }
        // If the future is dropped here, `slot` goes with it: the ticket
        // leaves the queue (or gives its slot back).
        let _ = rx.await;
        slot
    }

    /// Where the rebuild of `who` waits, if it does: (position, of).
    pub fn queue_position(&self, who: &str) -> Option<(usize, usize)> {
        let shared = self.lock();
        let ticket = shared
            .slots
            .waiting
            .iter()
            .find(|(_, w)| w == who)
            .map(|(t, _)| *t)?;
        shared.slots.position(ticket)
    }

    /// The budget and queue now.
    pub fn status(&self) -> RecoveryStatus {
        let shared = self.lock();
        let (rebuilds_running, rebuilds_queued) = shared.slots.snapshot();
        RecoveryStatus {
            limits: shared.limits,
            recovering: shared.recovering,
            rebuilds_running,
            rebuilds_queued,
            bytes_sent: shared.bytes_sent,
            boosted_bytes: shared.boosted_bytes,
            receiving: shared.receiving,
            bytes_received: shared.bytes_received,
        }
    }
}

impl Shared {
    /// The rate in force, bytes per second: the limit, raised to the floor
    /// of every recovery running; `None` is unlimited.
    fn rate(&self) -> Option<f64> {
        self.rate_of(Way::Sending)
    }

    /// The receive rate in force, raised likewise to the floor of every
    /// recovery received.
    fn receive_rate(&self) -> Option<f64> {
        self.rate_of(Way::Receiving)
    }

    fn rate_of(&self, way: Way) -> Option<f64> {
        let rate = match way {
            Way::Sending => self.limits.rate,
            Way::Receiving => self.limits.receive_rate,
        }?;
        let running = match way {
            Way::Sending => self.recovering,
            Way::Receiving => self.receiving,
        };
        let running = running.max(1) as u64;
        Some(rate.max(self.limits.floor.saturating_mul(running)) as f64)
    }

    /// The count of recoveries running `way`.
    fn running(&mut self, way: Way) -> &mut usize {
        match way {
            Way::Sending => &mut self.recovering,
            Way::Receiving => &mut self.receiving,
        }
    }
}

/// Which way a recovery's bytes go, for its rate and its floor.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Way {
    /// What this runtime's primaries send.
    Sending,
    /// What its replicas receive.
    Receiving,
}

/// A recovery counted for the floor of its way. Dropping it uncounts it.
#[must_use = "the recovery is counted only while this lives"]
#[derive(Debug)]
pub(crate) struct Counted(RecoveryBudget, Way);

impl Drop for Counted {
    fn drop(&mut self) {
        let mut shared = self.0.lock();
        let running = shared.running(self.1);
        *running = running.saturating_sub(1);
    }
}

/// A rebuild slot, or a place in the queue for one. Dropping it gives the
/// slot to the next rebuild waiting (or leaves the queue); it never blocks.
#[must_use = "the slot is given back as soon as this is dropped"]
#[derive(Debug)]
pub struct RebuildSlot {
    budget: RecoveryBudget,
    ticket: u64,
}

impl Drop for RebuildSlot {
    fn drop(&mut self) {
        let mut shared = self.budget.lock();
        shared.wakers.remove(&self.ticket);
        let admitted = shared.slots.release(self.ticket);
        RecoveryBudget::wake(&mut shared, admitted);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = 1 << 20;

    #[test]
    fn limits_refuse_what_cannot_be_applied() {
        let ok = RecoveryLimits::default()
            .with_rate(Some(200 * MIB))
            .with_max_rebuilds(Some(2));
        assert_eq!(ok.validate(), Ok(()));
        let cases = [
            (ok.with_rate(Some(0)), LimitsError::ZeroRate),
            (
                ok.with_rate(Some(MIB)),
                LimitsError::RateBelowFloor {
                    rate: MIB,
                    floor: 32 * MIB,
                },
            ),
            (ok.with_max_rebuilds(Some(0)), LimitsError::ZeroRebuilds),
            (
                ok.with_floor(100 << 10),
                LimitsError::FloorTooLow { floor: 100 << 10 },
            ),
        ];
        for (limits, want) in cases {
            assert_eq!(limits.validate(), Err(want), "{limits:?}");
        }
        assert_eq!(RecoveryLimits::unlimited().validate(), Ok(()));
    }

    #[test]
    fn the_bucket_keeps_the_rate_whatever_the_chunk_sizes() {
        let rate = 100.0 * MIB as f64;
        let mut bucket = Bucket::new(0);
        // Back to back at t=0: each waits for the debt before it.
        assert_eq!(bucket.reserve(0, rate, MIB), Duration::from_millis(10));
        assert_eq!(bucket.reserve(0, rate, 4 * MIB), Duration::from_millis(50));
        // 50 ms later the debt is paid: the next waits only for itself.
        let ns = 50_000_000;
        assert_eq!(bucket.reserve(ns, rate, MIB), Duration::from_millis(10));
        // Idle for a second: at most a tenth of a second accumulates.
        let later = ns + 10_000_000 + 1_000_000_000;
        assert_eq!(bucket.reserve(later, rate, 10 * MIB), Duration::ZERO);
        assert_eq!(bucket.reserve(later, rate, MIB), Duration::from_millis(10));
    }

    #[test]
    fn a_boosted_sender_goes_before_the_others_and_they_wait_for_it() {
        let limits = RecoveryLimits::default()
            .with_floor(MIN_FLOOR_BYTES)
            .with_rate(Some(100 * MIB));
        let budget = RecoveryBudget::new(limits).unwrap();
        let ms = |d: Duration| d.as_secs_f64() * 1000.0;
        let near = |d: Duration, want: f64| (ms(d) - want).abs() < 3.0;
        // A sender owes 40 ms; a boosted one waits only for its own 10.
        let normal = budget.reserve(4 * MIB);
        assert!(near(normal, 40.0), "{normal:?}");
        let first = budget.reserve_first(MIB);
        assert!(near(first, 10.0), "{first:?}");
        // The next ordinary sender waits for both; the next boosted one
        // for the boosted before it only.
        let after = budget.reserve(MIB);
        assert!(near(after, 60.0), "{after:?}");
        let second = budget.reserve_first(MIB);
        assert!(near(second, 20.0), "{second:?}");
        assert_eq!(budget.status().boosted_bytes, 2 * MIB);
        assert_eq!(budget.status().bytes_sent, 7 * MIB);
    }

    #[test]
    fn a_bounded_reservation_never_waits_or_owes_past_its_bound() {
        let rate = 100.0 * MIB as f64;
        let max = Duration::from_millis(20);
        let mut bucket = Bucket::new(0);
        assert_eq!(
            bucket.reserve_bounded(0, rate, MIB, max),
            Duration::from_millis(10)
        );
        // 10 MiB would owe 110 ms: it waits the bound, and the debt is
        // the bound's worth, not more.
        assert_eq!(bucket.reserve_bounded(0, rate, 10 * MIB, max), max);
        assert_eq!(bucket.reserve_bounded(0, rate, 1, max), max);
        // 20 ms later the debt is paid.
        assert_eq!(
            bucket.reserve_bounded(20_000_000, rate, MIB, max),
            Duration::from_millis(10)
        );
    }

    #[test]
    fn slots_go_in_arrival_order_and_a_new_cap_applies_at_once() {
        let mut q = SlotQueue::new(Some(2));
        let who = |t: u64| format!("v{t}/r");
        let admitted: Vec<bool> = (1..=5).map(|t| q.enqueue(t, who(t))).collect();
        assert_eq!(admitted, [true, true, false, false, false]);
        assert_eq!(q.position(4), Some((2, 3)));
        assert_eq!(q.position(1), None, "running, not queued");
        // One leaves the queue: the others move up; one finishes: the next runs.
        assert_eq!(q.release(4), Vec::<u64>::new());
        assert_eq!(q.position(5), Some((2, 2)));
        assert_eq!(q.release(1), vec![3]);
        // A higher cap admits at once; a lower one admits nothing until
        // the running ones are under it.
        assert_eq!(q.set_cap(Some(3)), vec![5]);
        assert_eq!(q.set_cap(Some(1)), Vec::<u64>::new());
        assert!(!q.enqueue(6, who(6)));
        assert_eq!(q.release(2), Vec::<u64>::new());
        assert_eq!(q.release(3), Vec::<u64>::new());
        assert_eq!(q.release(5), vec![6]);
        assert_eq!(q.set_cap(None), Vec::<u64>::new());
        assert!(q.enqueue(7, who(7)));
        let (running, queued) = q.snapshot();
        assert_eq!((running.len(), queued.len()), (2, 0));
    }

    #[tokio::test]
    async fn a_dropped_wait_leaves_the_queue_and_a_dropped_slot_admits_the_next() {
        let budget =
            RecoveryBudget::new(RecoveryLimits::unlimited().with_max_rebuilds(Some(1))).unwrap();
        let first = budget.rebuild_slot("v1/a".into()).await;
        let waiting = budget.rebuild_slot("v2/a".into());
        let mut waiting = Box::pin(waiting);
        assert!(futures::poll!(waiting.as_mut()).is_pending());
        assert_eq!(budget.queue_position("v2/a"), Some((1, 1)));
        let third = budget.rebuild_slot("v3/a".into());
        let mut third = Box::pin(third);
        assert!(futures::poll!(third.as_mut()).is_pending());
        drop(waiting);
        assert_eq!(budget.queue_position("v3/a"), Some((1, 1)));
        drop(first);
        let slot = tokio::time::timeout(Duration::from_secs(5), third)
            .await
            .expect("admitted when the first slot went");
        assert_eq!(budget.status().rebuilds_running, vec!["v3/a".to_owned()]);
        drop(slot);
        assert!(budget.status().rebuilds_running.is_empty());
    }
}
