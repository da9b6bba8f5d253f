//! A volume's activity count: it moves whenever what a report of the
//! volume would say may have changed (a primary's committed LSN, its
//! replicas' states and acknowledgements, its opening; a replica's
//! frames received, its connection closed). Whoever reports volumes
//! elsewhere (a node's control plane) compares it with what it last saw
//! and asks only the volumes that moved, so an idle volume is never
//! asked at all.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

/// Shared by a volume's handle and its actor; cheap to clone.
#[derive(Debug, Clone)]
pub(crate) struct Activity(Arc<AtomicU64>);

impl Default for Activity {
    /// Each count starts where no other handle's was: a volume reopened
    /// (a role change, a restart in the same process) never reads as the
    /// count a reporter saw for its last handle.
    fn default() -> Self {
        static NEXT: AtomicU64 = AtomicU64::new(0);
        Self(Arc::new(AtomicU64::new(
            NEXT.fetch_add(1 << 32, Ordering::Relaxed),
        )))
    }
}

impl Activity {
    /// Something a report would say may have changed.
    pub(crate) fn bump(&self) {
        self.0.fetch_add(1, Ordering::Relaxed);
    }

    /// The count now.
    pub(crate) fn get(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}
