//! Cancelling a plan at each of its await points releases every pin it
//! holds: the sender cancels by dropping the plan's future, so dropping it
//! anywhere must leave no resource in the table and, once a detached image
//! read finishes, no snapshot or WAL pin in the store.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use super::{connect_and_hello, run_plan, SenderContext};
use crate::config::{ReplicaConfig, Tuning, VolumeConfig};
use crate::metered;
use crate::metrics::{MailboxMetrics, Metered, MeteredAddr};
use crate::primary::context::EngineInput;
use crate::primary::resources::ResourceTable;
use crate::primary::volume::pins::pin_resources;
use crate::runtime::Runtime;
use actix::prelude::*;
use bytes::Bytes;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::AtomicU64;
use std::sync::Arc;
use std::task::{Context as TaskContext, Poll};
use std::time::{Duration, Instant};
use tokio::sync::watch;
use tokio_util::task::TaskTracker;
use walship_engine::{
    CatchUpBudget, Endpoint, Epoch, Lsn, PlanKind, RebuildSource, RecoveryPlan, ReplicaId,
    ResourceGrant, ResourceId, SessionId,
};
use walship_io::{BackendRequest, LogReader, ReaderOptions, Store, StoreOptions, BLOCK_SIZE};

const BLOCKS: u64 = 64;

/// Takes the executor's reports and drops them.
struct Sink(Arc<MailboxMetrics>);

impl Actor for Sink {
    type Context = Context<Self>;
}

impl Metered for Sink {
    fn mailbox(&self) -> &MailboxMetrics {
        &self.0
    }
}

metered!(Sink: EngineInput);

impl Handler<EngineInput> for Sink {
    type Result = ();

    fn handle(&mut self, _: EngineInput, _: &mut Context<Self>) {}
}

/// Polls the inner future at most `polls` times, then drops it (`None`).
struct Cancelled<F> {
    inner: Option<Pin<Box<F>>>,
    polls: usize,
}

impl<F: Future> Future for Cancelled<F> {
    type Output = Option<F::Output>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut TaskContext<'_>) -> Poll<Self::Output> {
        if self.polls == 0 {
            self.inner = None;
            return Poll::Ready(None);
        }
        self.polls -= 1;
        let Some(inner) = self.inner.as_mut() else {
            return Poll::Ready(None);
        };
        match inner.as_mut().poll(cx) {
            Poll::Ready(output) => Poll::Ready(Some(output)),
            Poll::Pending if self.polls == 0 => {
                // Dropped at this await point, on the very next poll.
                cx.waker().wake_by_ref();
                Poll::Pending
            }
            Poll::Pending => Poll::Pending,
        }
    }
}

/// A primary store: 300 writes over 64 blocks, checkpointed at 200.
fn primary_store(dir: &std::path::Path) -> Store {
    let (store, _) = Store::open(dir, StoreOptions::new(BLOCKS)).unwrap();
    for i in 0..300u64 {
        let data = Bytes::from(vec![i as u8; BLOCK_SIZE]);
        store.write(1, i % BLOCKS, data).unwrap();
    }
    store.sync_to(300).unwrap();
    store.checkpoint(200).unwrap();
    store
}

fn pins_left(store: &Store) -> usize {
    store.snapshot_pins() + store.wal().retention().pins.len()
}

/// Runs `plan` against a real replica, cancelled after 1, 2, 3, ... polls
/// until it completes, and checks after each cancel that its pins are gone.
fn cancel_everywhere(plan_kind: impl Fn() -> PlanKind, what: &str) {
    let tmp = tempfile::tempdir().unwrap();
    let store = Arc::new(primary_store(&tmp.path().join("primary")));
    let rt = Runtime::start().unwrap();
    let replica = rt
        .spawn_volume_blocking(VolumeConfig::Replica({
            let mut made = ReplicaConfig::new(
                ("test", "vol", "r1"),
                tmp.path().join("r1"),
                StoreOptions::new(BLOCKS),
                "127.0.0.1:0",
            );
            made.checkpoint_every_lsns = 1 << 30;
            made
        }))
        .unwrap();
    let endpoint = Endpoint::new(replica.listen_addr().unwrap().to_string(), 1);
    let replica_id = ReplicaId::new("vol", "r1").unwrap();
    // Small reads and a small window: many batches, many acks to wait for.
    let options = ReaderOptions {
        chunk_bytes: 16 * 1024,
        queue_depth: 2,
        stream_buffer: 2,
        ..ReaderOptions::default()
    };
    let reader = LogReader::open(store.wal(), BackendRequest::Pread, options).unwrap();
    let tuning = Tuning {
        image_chunk_bytes: 4 * BLOCK_SIZE,
        batch_bytes: 8 * 1024,
        max_inflight_bytes: 16 * 1024,
        ..Tuning::default()
    };
    let (_head_tx, head_rx) = watch::channel(300);
    // Nothing called committed: the replica keeps every frame in its WAL
    // (committed ones would go straight to its extent), so each attempt can
    // truncate it back to 0.
    let (_committed_tx, committed_rx) = watch::channel(0);
    let tasks = TaskTracker::new();
    let system = actix::System::new();
    let (completed_after, cancels) = system.block_on(async move {
        let metrics = MailboxMetrics::new("sink", "test");
        let sink = MeteredAddr::new(Sink(Arc::clone(&metrics)).start(), metrics);
        let context = SenderContext {
            replica: replica_id.clone(),
            cluster: "test".into(),
            volume: sink.recipient(),
            reader: Arc::new(reader),
            store: Arc::clone(&store),
            // Limited, so sends also wait on the budget: more await points.
            recovery: crate::recovery::RecoveryBudget::new(
                crate::recovery::RecoveryLimits::default()
                    .with_floor(crate::recovery::MIN_FLOOR_BYTES)
                    .with_rate(Some(256 << 20)),
            )
            .expect("valid limits"),
            head_rx,
            committed_rx,
            durable_commits: Arc::default(),
            tuning: tuning.clone(),
            links: Arc::default(),
            bytes_sent: Arc::new(AtomicU64::new(0)),
            boosted: Arc::default(),
            barrier_line: Arc::default(),
            away: Arc::default(),
            _alive: Arc::new(tasks.token()),
        };
        let mut cancels = 0;
        for polls in 1..20_000usize {
            let session = SessionId(polls as u64);
            let plan = RecoveryPlan {
                session,
                replica: replica_id.clone(),
                epoch: Epoch(1),
                kind: plan_kind(),
            };
            let table = ResourceTable::default();
            let pinned = pin_resources(&store, true, "cancel test", &plan.resources()).unwrap();
            let mut grants = Vec::new();
            for (i, (granted, held)) in pinned.into_iter().enumerate() {
                let id = ResourceId(i as u64 + 1);
                table.insert(id, held);
                grants.push(ResourceGrant { id, granted });
            }
            let ids: Vec<ResourceId> = grants.iter().map(|g| g.id).collect();
            let image = table.image(&ids);
            let lease = table.lease(ids);
            assert!(pins_left(&store) > 0, "{what}: the plan holds pins");
            let (mut conn, _) = connect_and_hello(&context, session, 1, &endpoint)
                .await
                .unwrap();
            let c = context.clone();
            let run = async move {
                let result = run_plan(&mut conn, &c, session, &plan, &grants, image).await;
                drop(lease);
                result
            };
            let outcome = Cancelled {
                inner: Some(Box::pin(run)),
                polls,
            }
            .await;
            assert_eq!(
                table.len(),
                0,
                "{what}: cancelled after {polls} polls, pins held"
            );
            // A read-ahead of the image runs detached: it lets go when it ends.
            let deadline = Instant::now() + Duration::from_secs(10);
            while pins_left(&store) > 0 {
                assert!(
                    Instant::now() < deadline,
                    "{what}: cancelled after {polls} polls, {} pins left in the store",
                    pins_left(&store)
                );
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
            match outcome {
                Some(result) => {
                    result.unwrap();
                    return (polls, cancels);
                }
                None => cancels += 1,
            }
        }
        panic!("{what}: the plan never completed");
    });
    eprintln!("{what}: cancelled at {cancels} await points, then completed");
    assert!(cancels >= 20, "{what}: only {cancels} await points");
    assert_eq!(completed_after, cancels + 1);
    drop(rt);
}

#[test]
fn a_catch_up_cancelled_at_any_await_point_releases_its_wal_pin() {
    cancel_everywhere(
        || PlanKind::CatchUp {
            // Each attempt starts over: what a cancelled one left goes first.
            start: Lsn(0),
            frozen_target: Lsn(300),
            truncate_to: Some(Lsn(0)),
            budget: CatchUpBudget::default(),
        },
        "catch-up",
    );
}

#[test]
fn a_rebuild_cancelled_at_any_await_point_releases_its_snapshot_and_wal_pins() {
    cancel_everywhere(
        || PlanKind::Rebuild {
            source: RebuildSource::SnapshotTail {
                snapshot_lsn: Lsn(200),
                tail_target: Lsn(300),
            },
            transfer: walship_engine::Transfer::Staged {
                reason: "test".into(),
            },
        },
        "snapshot+tail rebuild",
    );
}

#[test]
fn a_rebuild_in_place_comparing_checksums_cancelled_at_any_await_point_releases_its_pins() {
    cancel_everywhere(
        || PlanKind::Rebuild {
            source: RebuildSource::SnapshotTail {
                snapshot_lsn: Lsn(200),
                tail_target: Lsn(300),
            },
            transfer: walship_engine::Transfer::Compared {
                reason: "test".into(),
                apply_through: Lsn(0),
            },
        },
        "snapshot+tail rebuild in place",
    );
}
