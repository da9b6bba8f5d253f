//! Hostile and broken peers, on real loopback sockets. Each is refused with a
//! typed error and the volume keeps serving everyone else.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use futures::{SinkExt, StreamExt};
use std::time::Duration;
use support::*;
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};
use tokio_util::codec::Framed;
use walship::engine::{CommitMode, ReplicaState};
use walship::io::{Envelope, Message, WireCodec, CODE_IDENTITY, CODE_SUPERSEDED, CODE_WIRE};

const LONG: Duration = Duration::from_secs(20);

async fn raw(addr: &str) -> Framed<TcpStream, WireCodec> {
    Framed::new(
        TcpStream::connect(addr).await.unwrap(),
        WireCodec::default(),
    )
}

async fn next(conn: &mut Framed<TcpStream, WireCodec>) -> Option<Envelope> {
    tokio::time::timeout(Duration::from_secs(5), conn.next())
        .await
        .unwrap()
        .map(|r| r.unwrap())
}

fn hello(epoch: u64, replica: &str) -> Envelope {
    Envelope {
        epoch,
        message: Message::Hello {
            cluster: "test".into(),
            volume: VOLUME.into(),
            replica: replica.into(),
            session: 99,
            durable_commits: false,
        },
    }
}

/// After each attack the real primary still replicates to the replica.
async fn still_replicating(cluster: &Cluster, from: u64) {
    cluster.write_blocks(from, 5).await.unwrap();
    cluster.primary.barrier().await.unwrap();
    cluster.wait_converged(LONG).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_and_oversized_frames_are_refused_and_the_replica_keeps_serving() {
    let cluster = start(CommitMode::SyncAll, &["r1"]).await;
    cluster
        .wait_state("r1", ReplicaState::InSync, LONG)
        .await
        .unwrap();
    let addr = cluster.replicas[0].addr.clone();

    // Garbage: a length that parses, then a version byte that does not.
    let mut garbage = TcpStream::connect(&addr).await.unwrap();
    garbage
        .write_all(&[
            16, 0, 0, 0, 0xEE, 0xEE, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14,
        ])
        .await
        .unwrap();
    let mut garbage = Framed::new(garbage, WireCodec::default());
    let reply = next(&mut garbage).await.unwrap();
    assert!(
        matches!(reply.message, Message::Error { code: CODE_WIRE, ref message } if message.contains("protocol version 238")),
        "{reply:?}"
    );
    assert!(next(&mut garbage).await.is_none(), "closed after the error");

    // Oversized: refused from the length alone.
    let mut huge = TcpStream::connect(&addr).await.unwrap();
    huge.write_all(&u32::MAX.to_le_bytes()).await.unwrap();
    let mut huge = Framed::new(huge, WireCodec::default());
    let reply = next(&mut huge).await.unwrap();
    assert!(
        matches!(reply.message, Message::Error { code: CODE_WIRE, ref message } if message.contains("exceeds the maximum")),
        "{reply:?}"
    );

    still_replicating(&cluster, 0).await;
}

/// The primary's stream is cut in the middle of a WAL batch carrying a
/// block: the replica applies nothing of it, the primary keeps taking
/// writes, and once the link is back the replica recovers the write.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_cut_mid_frame_applies_nothing_and_the_replica_recovers() {
    let mut cluster = start(CommitMode::SyncAll, &["r1"]).await;
    cluster
        .wait_state("r1", ReplicaState::InSync, LONG)
        .await
        .unwrap();
    let relay = cluster.relay("r1").await.unwrap();
    cluster
        .wait_state("r1", ReplicaState::InSync, LONG)
        .await
        .unwrap();
    cluster.write_blocks(0, 10).await.unwrap();
    cluster.primary.barrier().await.unwrap();
    let before = cluster.wait_converged(LONG).await.unwrap();
    let rejected = |status: &serde_json::Value| status["mailbox"]["rejected"].as_u64().unwrap();
    let rejected_before = rejected(&replica_json(&cluster, "r1").await);

    relay.cut_next_batch();
    let lsn = cluster.primary.write(100, block(4242)).await.unwrap();
    // r1 sees a stream that ends inside a frame (a wire error, counted as
    // a rejection; a clean close is not), and the connection gone.
    let cut = within(LONG, || async {
        let status = replica_json(&cluster, "r1").await;
        (relay.is_cut() && status["connected"] == false && rejected(&status) > rejected_before)
            .then_some(status)
    });
    let after = cut
        .await
        .expect("the batch was never cut mid-frame, or r1 never saw it");
    // Nothing of the half batch: not in the WAL, not in the volume.
    assert_eq!(after["head"].as_u64(), Some(before.lsn), "{after}");
    assert_eq!(after["durable"].as_u64(), Some(before.lsn), "{after}");
    let r1 = cluster.replica("r1");
    assert_eq!(r1.content_checksum().await.unwrap(), before.checksum);
    assert_ne!(r1.read(100, 1).await.unwrap(), block(4242));
    // The primary keeps serving meanwhile.
    let more = cluster.primary.write(101, block(4343)).await.unwrap();
    assert_eq!(cluster.primary.read(100, 1).await.unwrap(), block(4242));

    // The whole batch, once the link is back.
    relay.resume();
    let converged = cluster.wait_converged(LONG).await.unwrap();
    assert!(converged.lsn >= more && more > lsn, "{converged:?}");
    assert!(cluster.primary.barrier().await.unwrap() >= more);
    let r1 = cluster.replica("r1");
    assert_eq!(r1.read(100, 1).await.unwrap(), block(4242));
    assert_eq!(r1.read(101, 1).await.unwrap(), block(4343));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stale_epoch_wrong_identity_and_hijacking_are_refused() {
    let cluster = start(CommitMode::SyncAll, &["r1"]).await;
    cluster
        .wait_state("r1", ReplicaState::InSync, LONG)
        .await
        .unwrap();
    let addr = cluster.replicas[0].addr.clone();

    let mut stale = raw(&addr).await;
    stale.send(hello(0, "vol1/r1")).await.unwrap();
    let reply = next(&mut stale).await.unwrap();
    assert_eq!(reply.message, Message::Fence { current_epoch: 1 });

    let mut stranger = raw(&addr).await;
    stranger.send(hello(1, "vol1/r9")).await.unwrap();
    let reply = next(&mut stranger).await.unwrap();
    assert!(
        matches!(
            reply.message,
            Message::Error {
                code: CODE_IDENTITY,
                ..
            }
        ),
        "{reply:?}"
    );

    // Frames without a hello on this connection: not the current primary's.
    let mut hijack = raw(&addr).await;
    let batch = Message::WalBatch {
        session: 0,
        first_lsn: 1,
        last_lsn: 1,
        committed: 0,
        frames: bytes::Bytes::new(),
    };
    hijack
        .send(Envelope {
            epoch: 1,
            message: batch,
        })
        .await
        .unwrap();
    let reply = next(&mut hijack).await.unwrap();
    assert!(
        matches!(
            reply.message,
            Message::Error {
                code: CODE_SUPERSEDED,
                ..
            }
        ),
        "{reply:?}"
    );

    still_replicating(&cluster, 0).await;
    let status = replica_json(&cluster, "r1").await;
    assert_eq!(status["mailbox"]["fenced"], 1);
}

/// A fake replica that answers every hello as someone else.
async fn impostor() -> String {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut conn = Framed::new(stream, WireCodec::default());
                while let Some(Ok(envelope)) = conn.next().await {
                    if let Message::Hello { .. } = envelope.message {
                        let ack = Message::HelloAck {
                            replica: "vol1/r1".into(),
                            flushed: 0,
                            checkpoint: 0,
                            epochs: Vec::new(),
                            committed: 0,
                            partial: None,
                        };
                        let _ = conn
                            .send(Envelope {
                                epoch: envelope.epoch,
                                message: ack,
                            })
                            .await;
                    }
                }
            });
        }
    });
    addr
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_claiming_another_replicas_identity_is_rejected_and_others_keep_working() {
    let cluster = Cluster::start(ClusterOptions {
        outsiders: vec![("r2".into(), impostor().await)],
        ..options(CommitMode::BestEffort, &["r1"], tuning())
    })
    .await
    .unwrap();
    cluster
        .wait_state("r1", ReplicaState::InSync, LONG)
        .await
        .unwrap();
    cluster
        .wait_event("r2", "identity_mismatch", LONG)
        .await
        .unwrap();
    assert_ne!(
        cluster.state("r2").await.unwrap(),
        Some(ReplicaState::InSync)
    );
    cluster.write_blocks(0, 10).await.unwrap();
    cluster.primary.barrier().await.unwrap();
    let primary = cluster.primary.content_checksum().await.unwrap();
    let caught_up = within(LONG, || async {
        (cluster.replica("r1").content_checksum().await.unwrap() == primary).then_some(())
    });
    assert!(caught_up.await.is_some(), "r1 stopped receiving");
    let status = cluster.status().await.unwrap();
    assert!(
        status.mailboxes[0].rejected > 0,
        "the refused handshakes are counted"
    );
}
