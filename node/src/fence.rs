//! Whether this node may acknowledge writes at all: always, unless a
//! control plane holds it to a lease (etcd). Then the node acknowledges a
//! write only while its lease is certainly still alive at etcd, so that no
//! other node can have been made primary meanwhile.
//!
//! The clock assumption: etcd expires a lease TTL after it *received* the
//! last renewal, on its own clock; the node's deadline is TTL minus a
//! margin after it *sent* that renewal, on its monotonic clock. The
//! deadline comes first as long as the two clocks' rates differ by less
//! than the margin over one TTL (a tenth of it here: far beyond the drift
//! of real clocks; a VM paused longer than the margin is what breaks it,
//! as it breaks every lease).

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};
use tokio::sync::Notify;

/// The deadline past which writes are refused.
#[derive(Debug)]
pub struct WriteFence {
    origin: Instant,
    /// Nanoseconds after `origin`; `u64::MAX`: no deadline.
    until: AtomicU64,
    /// Closed for good: the lease is being given up.
    closed: AtomicBool,
    /// Woken when the fence is held or closed before its deadline.
    shut: Notify,
}

impl Default for WriteFence {
    fn default() -> Self {
        Self::open()
    }
}

impl WriteFence {
    /// No deadline: the static control plane.
    pub fn open() -> Self {
        Self {
            origin: Instant::now(),
            until: AtomicU64::new(u64::MAX),
            closed: AtomicBool::new(false),
            shut: Notify::new(),
        }
    }

    /// Holds writes to a lease: nothing is acknowledged until
    /// [`renewed`](Self::renewed) says the lease is alive.
    pub fn hold(&self) {
        self.until.store(0, Ordering::Release);
        self.shut.notify_waiters();
    }

    /// A renewal sent at `sent` was granted `ttl`: writes may be
    /// acknowledged until `sent + ttl - ttl / 10`. Never moves the
    /// deadline back (a late answer to an older renewal).
    pub fn renewed(&self, sent: Instant, ttl: Duration) {
        let until = sent + ttl - ttl / 10;
        let nanos = until.saturating_duration_since(self.origin).as_nanos() as u64;
        self.until.fetch_max(nanos, Ordering::AcqRel);
    }

    /// Closes the fence for good, before the lease is given up (a revoked
    /// lease lets another node be made primary at once); no renewal
    /// reopens it.
    pub fn close(&self) {
        self.closed.store(true, Ordering::Release);
        self.shut.notify_waiters();
    }

    /// Resolves once writes are no longer allowed: the deadline passed
    /// with no renewal moving it, or the fence was held or closed. Never,
    /// without a deadline. A request that waits (a barrier whose replicas
    /// now answer another primary) fails then, not when it times out.
    pub async fn lapsed(&self) {
        loop {
            let shut = self.shut.notified();
            tokio::pin!(shut);
            // Registered before the state is read: a hold in between wakes it.
            shut.as_mut().enable();
            let left = self.remaining();
            if left.is_zero() {
                return;
            }
            if left == Duration::MAX {
                shut.await;
                continue;
            }
            tokio::select! {
                () = shut => {}
                () = tokio::time::sleep(left) => {}
            }
        }
    }

    /// Whether a lease holds it (a control plane's), rather than no
    /// deadline at all: only then can it lapse under a waiting request.
    pub fn leased(&self) -> bool {
        self.until.load(Ordering::Acquire) != u64::MAX
    }

    /// Whether a write may be acknowledged now.
    pub fn allows(&self) -> bool {
        if self.closed.load(Ordering::Acquire) {
            return false;
        }
        let now = self.origin.elapsed().as_nanos() as u64;
        now < self.until.load(Ordering::Acquire)
    }

    /// How long writes remain allowed (zero when they are not).
    pub fn remaining(&self) -> Duration {
        let until = self.until.load(Ordering::Acquire);
        if self.closed.load(Ordering::Acquire) {
            return Duration::ZERO;
        }
        if until == u64::MAX {
            return Duration::MAX;
        }
        Duration::from_nanos(until.saturating_sub(self.origin.elapsed().as_nanos() as u64))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_held_fence_allows_writes_only_inside_a_renewal() {
        let fence = WriteFence::open();
        assert!(fence.allows());
        fence.hold();
        assert!(!fence.allows());
        let sent = Instant::now();
        fence.renewed(sent, Duration::from_secs(2));
        assert!(fence.allows());
        let left = fence.remaining();
        assert!(left <= Duration::from_millis(1800), "{left:?}");
        assert!(left > Duration::from_millis(1000), "{left:?}");
        // An older renewal answered late does not shorten it.
        fence.renewed(sent - Duration::from_secs(1), Duration::from_secs(2));
        assert!(fence.remaining() > Duration::from_millis(1000));
        // A renewal whose deadline already passed allows nothing.
        let stale = WriteFence::open();
        stale.hold();
        stale.renewed(sent - Duration::from_secs(3), Duration::from_secs(2));
        assert!(!stale.allows());
        // Closed for good: a renewal does not reopen it.
        fence.close();
        assert!(!fence.allows());
        fence.renewed(Instant::now(), Duration::from_secs(2));
        assert!(!fence.allows());
    }

    /// Real time (the fence reads the monotonic clock): the sleeps are
    /// what is under test, each far from the deadline it straddles.
    #[tokio::test]
    async fn lapsed_resolves_at_the_deadline_a_renewal_moves_or_at_once_when_held() {
        let ms = Duration::from_millis;
        let fence = std::sync::Arc::new(WriteFence::open());
        // No deadline: never.
        assert!(tokio::time::timeout(ms(50), fence.lapsed()).await.is_err());
        fence.hold();
        // Deadlines a tenth short of the TTL: 1.8 s after each renewal.
        fence.renewed(Instant::now(), ms(2000));
        let waiter = tokio::spawn({
            let fence = std::sync::Arc::clone(&fence);
            async move { fence.lapsed().await }
        });
        tokio::time::sleep(ms(800)).await;
        // A renewal moves the deadline: still waiting past the old one
        // (at 2 s or later; the new one is at 2.6 s).
        fence.renewed(Instant::now(), ms(2000));
        tokio::time::sleep(ms(1200)).await;
        assert!(!waiter.is_finished());
        // Held: at once.
        fence.hold();
        tokio::time::timeout(ms(100), waiter)
            .await
            .expect("held: lapsed at once")
            .unwrap();
        // A deadline passing with nothing moving it.
        fence.renewed(Instant::now(), ms(300));
        tokio::time::timeout(ms(2000), fence.lapsed())
            .await
            .expect("lapsed at its deadline");
    }
}
