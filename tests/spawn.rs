//! `spawn_volume` refuses, typed and before any write, an assignment the
//! engine would refuse; the refused volume leaves its store free, and the
//! same directory opens with a good one.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;
use std::time::Duration;
use walship::actors::{PrimaryConfig, ReplicaSpec, Runtime, VolumeConfig, VolumeError};
use walship::engine::{CommitError, CommitMode, EngineError};
use walship::io::StoreOptions;

fn primary(dir: &Path, epoch: u64, mode: CommitMode, servers: &[&str]) -> VolumeConfig {
    VolumeConfig::Primary(PrimaryConfig::new(
        ("spawn", "v"),
        dir.to_path_buf(),
        StoreOptions {
            lock_wait: Duration::ZERO,
            ..StoreOptions::new(256)
        },
        epoch,
        mode,
        servers
            .iter()
            .map(|server| ReplicaSpec::new((*server).to_owned(), "127.0.0.1:9", 1))
            .collect(),
    ))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_assignment_the_engine_would_refuse_is_refused_at_spawn_typed() {
    let dir = tempfile::tempdir().unwrap();
    let rt = Runtime::start().unwrap();
    let at = dir.path().join("v");
    // sync_quorum with two members: any one failure blocks every write.
    let refused = rt
        .spawn_volume(primary(&at, 1, CommitMode::SyncQuorum, &["r1"]))
        .await
        .unwrap_err();
    assert!(
        matches!(
            refused,
            VolumeError::Engine(EngineError::Commit(CommitError::ImpossibleQuorum {
                members: 2,
                quorum: 2
            }))
        ),
        "{refused:?}"
    );
    // The same replica twice.
    let refused = rt
        .spawn_volume(primary(&at, 1, CommitMode::SyncAll, &["r1", "r1"]))
        .await
        .unwrap_err();
    assert!(
        matches!(
            refused,
            VolumeError::Engine(EngineError::DuplicateReplica(_))
        ),
        "{refused:?}"
    );
    // A server name that cannot name a replica (it was dropped silently).
    let refused = rt
        .spawn_volume(primary(&at, 1, CommitMode::SyncAll, &["r1", "a/b"]))
        .await
        .unwrap_err();
    assert!(
        matches!(refused, VolumeError::InvalidReplica(_)),
        "{refused:?}"
    );
    // A replica named like the primary itself (a node's name).
    let VolumeConfig::Primary(config) = primary(&at, 1, CommitMode::SyncAll, &["n1", "r1"]) else {
        unreachable!()
    };
    let refused = rt
        .spawn_volume(VolumeConfig::Primary(config.with_server("n1")))
        .await
        .unwrap_err();
    assert!(
        matches!(&refused, VolumeError::InvalidReplica(why) if why.contains("the primary's own name")),
        "{refused:?}"
    );
    // Nothing was written and the store is free: a good assignment opens
    // the same directory and takes a write.
    let volume = rt
        .spawn_volume(primary(&at, 1, CommitMode::BestEffort, &[]))
        .await
        .unwrap();
    let lsn = volume
        .write(0, bytes::Bytes::from(vec![1u8; 4096]))
        .await
        .unwrap();
    assert_eq!(lsn, 1, "the refused spawns wrote nothing");
    volume.stop().await;
    // An epoch not newer than the WAL's.
    let refused = rt
        .spawn_volume(primary(&at, 1, CommitMode::BestEffort, &[]))
        .await
        .unwrap_err();
    assert!(
        matches!(refused, VolumeError::EpochNotNewer { .. }),
        "{refused:?}"
    );
    rt.shutdown();
}

/// The first frame a replication connection would get for `hello`'s
/// volume on `addr`: whatever the listener answers.
async fn answer_to_hello(addr: std::net::SocketAddr, volume: &str) -> walship::io::Message {
    use futures::{SinkExt, StreamExt};
    let stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    let mut framed = tokio_util::codec::Framed::new(stream, walship::io::WireCodec::default());
    let hello = walship::io::Message::Hello {
        cluster: "spawn".into(),
        volume: volume.into(),
        replica: format!("{volume}/r1"),
        session: 1,
        durable_commits: true,
    };
    framed
        .send(walship::io::Envelope {
            epoch: 1,
            message: hello,
        })
        .await
        .unwrap();
    let answer = tokio::time::timeout(Duration::from_secs(15), framed.next()).await;
    answer.expect("an answer").unwrap().unwrap().message
}

/// A node opens its replication listener before its volumes: while it
/// starts, a hello for a volume still opening waits for it and is
/// answered (a primary whose link is back need not back off); once the
/// node says its volumes started, a hello for a volume it lacks is
/// refused at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hello_for_a_volume_still_opening_waits_for_it_while_the_node_starts() {
    use walship::actors::{Listen, ReplicaConfig};
    use walship::io::Message;
    let dir = tempfile::tempdir().unwrap();
    let rt = Runtime::start().unwrap();
    let listener = rt.replication_listener("spawn", "127.0.0.1:0").unwrap();
    listener.wait_for_volumes();
    let addr = listener.local_addr();
    let asked = tokio::spawn(answer_to_hello(addr, "late"));
    // The hello is in, held, before the volume opens.
    let held = walship::actors::testing::within(Duration::from_secs(10), || async {
        (listener.hellos_held() == 1).then_some(())
    })
    .await;
    assert!(held.is_some(), "the hello was not held");
    assert!(!asked.is_finished(), "refused while the node starts");
    let replica = rt
        .spawn_volume(VolumeConfig::Replica(ReplicaConfig::new(
            ("spawn", "late", "r1"),
            dir.path().join("late"),
            StoreOptions::new(256),
            Listen::Shared(listener.clone()),
        )))
        .await
        .unwrap();
    let answer = asked.await.unwrap();
    assert_eq!(listener.hellos_held(), 0);
    assert!(
        matches!(answer, Message::HelloAck { ref replica, .. } if replica == "late/r1"),
        "{answer:?}"
    );
    listener.volumes_started();
    let refused = tokio::time::timeout(Duration::from_secs(2), answer_to_hello(addr, "nope"))
        .await
        .expect("refused at once once the volumes started");
    assert!(
        matches!(refused, Message::Error { ref message, .. } if message.contains("no replica of volume nope")),
        "{refused:?}"
    );
    replica.stop().await;
    listener.close().await;
    rt.shutdown();
}
