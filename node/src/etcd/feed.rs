//! A watch that resumes where it was.

use super::session::REOPEN_EVERY;
use super::store::range;
use etcd_client::{Client, EventType, WatchOptions};

/// A watch of a prefix that resumes where it was when its stream breaks
/// (etcd restarting, a connection reset): each put under the prefix is
/// seen, in order; if etcd compacted its history past the point to resume
/// from, what is under the prefix then is seen instead.
pub(super) struct Feed {
    client: Client,
    prefix: String,
    /// The revision to resume from.
    next: i64,
    stream: Option<etcd_client::WatchStream>,
    /// When a broken stream is opened again.
    retry_at: tokio::time::Instant,
}

impl Feed {
    pub(super) async fn open(
        client: &Client,
        prefix: String,
        from: i64,
    ) -> Result<Self, etcd_client::Error> {
        let mut feed = Self {
            client: client.clone(),
            prefix,
            next: from,
            stream: None,
            retry_at: tokio::time::Instant::now(),
        };
        feed.stream = Some(feed.watch().await?);
        Ok(feed)
    }

    async fn watch(&mut self) -> Result<etcd_client::WatchStream, etcd_client::Error> {
        let from = WatchOptions::new()
            .with_prefix()
            .with_start_revision(self.next);
        self.client.watch(self.prefix.as_str(), Some(from)).await
    }

    /// The next puts (after a compaction, everything under the prefix).
    /// Cancel-safe: nothing is lost if the future is dropped.
    pub(super) async fn puts(&mut self) -> Vec<etcd_client::KeyValue> {
        loop {
            let Some(stream) = self.stream.as_mut() else {
                // A deadline, not a pause: the other watches' answers cancel
                // this future often.
                tokio::time::sleep_until(self.retry_at).await;
                match self.watch().await {
                    Ok(stream) => {
                        tracing::info!(prefix = %self.prefix, from = self.next, "etcd: watch resumed");
                        self.stream = Some(stream);
                    }
                    Err(e) => {
                        self.retry_at = tokio::time::Instant::now() + REOPEN_EVERY;
                        tracing::warn!(prefix = %self.prefix, error = %e, "etcd: watch not resumed yet")
                    }
                }
                continue;
            };
            let why = match stream.message().await {
                Ok(Some(response)) if response.compact_revision() > 0 => {
                    // The history to resume from is gone: what is there now
                    // (every taker is fenced by epoch or idempotent), then on.
                    tracing::warn!(prefix = %self.prefix, from = self.next,
                        compacted = response.compact_revision(),
                        "etcd: watch cannot resume past a compaction; reading the prefix again");
                    match range(&mut self.client, &self.prefix).await {
                        Ok((kvs, revision)) => {
                            self.next = revision + 1;
                            self.stream = None;
                            self.retry_at = tokio::time::Instant::now();
                            if kvs.is_empty() {
                                continue;
                            }
                            return kvs;
                        }
                        Err(e) => format!("read after a compaction failed: {e}"),
                    }
                }
                Ok(Some(response)) if response.canceled() => {
                    format!("canceled: {}", response.cancel_reason())
                }
                Ok(Some(response)) => {
                    // Resumed after the last event seen, never the header's
                    // revision: the answer that creates a watch carries the
                    // current one, ahead of the events still to come.
                    for kv in response.events().iter().filter_map(|e| e.kv()) {
                        self.next = self.next.max(kv.mod_revision() + 1);
                    }
                    let puts: Vec<etcd_client::KeyValue> = response
                        .events()
                        .iter()
                        .filter(|e| e.event_type() == EventType::Put)
                        .filter_map(|e| e.kv().cloned())
                        .collect();
                    if puts.is_empty() {
                        continue;
                    }
                    return puts;
                }
                Ok(None) => "ended".to_owned(),
                Err(e) => e.to_string(),
            };
            tracing::warn!(prefix = %self.prefix, why, "etcd: watch broken; resuming");
            self.stream = None;
            self.retry_at = tokio::time::Instant::now() + REOPEN_EVERY;
        }
    }
}
