//! The elected controller's view of its cluster, kept by a watch: one
//! range read when it is made (or when the watch cannot go on), then only
//! what changed. Before, each pass (every 250 ms) read every record of
//! the cluster again: at 10,000 volumes some 50,000 keys, four times a
//! second, for a cluster where nothing moved.

use super::store::{delete, put, Store};
use crate::control::ClusterView;
use etcd_client::EventType;
use futures::FutureExt;
use std::time::Duration;

/// How long a controller waits for its own write to come back on the
/// watch before it reads the whole view again instead.
const CATCH_UP: Duration = Duration::from_secs(2);

/// A [`ClusterView`] and the watch that keeps it.
pub(super) struct WatchedView {
    view: ClusterView,
    /// The next revision the view has not seen.
    next: i64,
    /// `None` until the first read, and after the watch broke.
    stream: Option<etcd_client::WatchStream>,
}

impl WatchedView {
    pub(super) fn new() -> Self {
        Self {
            view: ClusterView::default(),
            next: 0,
            stream: None,
        }
    }

    /// The view with every change the watch has delivered so far (not
    /// waiting for more); read whole first if there is no watch.
    pub(super) async fn current(
        &mut self,
        store: &mut Store,
    ) -> Result<&ClusterView, etcd_client::Error> {
        if self.stream.is_none() {
            self.reread(store).await?;
        }
        while let Some(message) = self
            .stream
            .as_mut()
            .and_then(|s| s.message().now_or_never())
        {
            if !self.take(store, message) {
                self.reread(store).await?;
            }
        }
        Ok(&self.view)
    }

    /// Waits (up to [`CATCH_UP`]) until the view holds what was written
    /// at `revision` (the controller's own transaction): a decision is
    /// never made on a view that misses what the controller just did
    /// (it would probe again, and a new probe asks every replica anew).
    /// Past that, the next [`current`](Self::current) reads it whole.
    pub(super) async fn catch_up(&mut self, store: &Store, revision: i64) {
        let deadline = tokio::time::Instant::now() + CATCH_UP;
        while self.next <= revision {
            let Some(stream) = self.stream.as_mut() else {
                return;
            };
            let taken = match tokio::time::timeout_at(deadline, stream.message()).await {
                Ok(message) => self.take(store, message),
                Err(_) => false,
            };
            if !taken {
                self.stream = None;
                return;
            }
        }
    }

    /// Reads the whole view and watches from just after it.
    async fn reread(&mut self, store: &mut Store) -> Result<(), etcd_client::Error> {
        self.stream = None;
        let (view, revision) = store.read_at().await?;
        self.view = view;
        self.next = revision + 1;
        self.stream = Some(store.watch_from(self.next).await?);
        Ok(())
    }

    /// Applies one message of the watch; false if the watch cannot go on
    /// (compacted past, canceled, ended, failed).
    fn take(
        &mut self,
        store: &Store,
        message: Result<Option<etcd_client::WatchResponse>, etcd_client::Error>,
    ) -> bool {
        let response = match message {
            Ok(Some(response)) => response,
            Ok(None) => return false,
            Err(e) => {
                tracing::warn!(error = %e, "etcd controller: watch broken; reading the cluster again");
                return false;
            }
        };
        if response.compact_revision() > 0 || response.canceled() {
            tracing::warn!(
                compacted = response.compact_revision(),
                "etcd controller: watch cannot go on; reading the cluster again"
            );
            return false;
        }
        let prefix = store.prefix();
        for event in response.events() {
            let Some(kv) = event.kv() else { continue };
            self.next = self.next.max(kv.mod_revision() + 1);
            let Ok(key) = kv.key_str() else { continue };
            match event.event_type() {
                EventType::Put => put(&mut self.view, &prefix, key, kv.value(), kv.mod_revision()),
                EventType::Delete => delete(&mut self.view, &prefix, key),
            }
        }
        true
    }
}
