//! The NBD export against a raw client that says exactly what the test
//! wants, hostile input included: every bad option or request gets its
//! typed error (or the connection closes), and other clients and volumes
//! keep serving. A node in this process (`walship::node::Node`) hosts:
//! - `fast`, `other`: primaries without replicas (best_effort);
//! - `strict`: a sync_all primary whose one replica answers peering
//!   (holding nothing) but never takes a session;
//! - `mirror`: a replica (its primary is elsewhere), exported read-only.

#![allow(clippy::unwrap_used, clippy::expect_used)]

#[path = "support/nbd_client.rs"]
mod nbd_client;

use futures::{SinkExt, StreamExt};
use nbd_client::*;
use std::collections::BTreeSet;
use std::sync::Arc;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::net::TcpStream;
use tokio_util::codec::Framed;
use walship::engine::CommitMode;
use walship::io::{Envelope, Message, WireCodec};
use walship::node::config::NodeConfig;
use walship::node::{config, AssignmentSource, Node, NodeProcess, WriteFence};

/// A replica that answers a primary's peering, holding nothing, and
/// closes every other connection (a session never starts): for a primary
/// whose replica is away, once the primary knows nothing was lost.
async fn empty_replica(listener: TcpListener, replica: &'static str) {
    while let Ok((stream, _)) = listener.accept().await {
        tokio::spawn(async move {
            let mut conn = Framed::new(stream, WireCodec::default());
            if let Some(Ok(Envelope {
                message: Message::Peer { .. },
                ..
            })) = conn.next().await
            {
                let ack = Message::HelloAck {
                    replica: replica.into(),
                    flushed: 0,
                    checkpoint: 0,
                    epochs: Vec::new(),
                    committed: 0,
                    partial: None,
                };
                let _ = conn
                    .send(Envelope {
                        epoch: 0,
                        message: ack,
                    })
                    .await;
            }
        });
    }
}

async fn start_node(dir: &std::path::Path) -> Arc<Node> {
    start_node_fenced(dir, Arc::new(WriteFence::open())).await
}

/// [`start_node`] held to `fence`.
async fn start_node_fenced(dir: &std::path::Path, fence: Arc<WriteFence>) -> Arc<Node> {
    let config = solo_config(dir).await;
    Node::start_fenced(config, fence, None, None).await.unwrap()
}

/// The config of node "solo", its volume "strict" replicated to a ghost
/// that holds nothing (started here).
async fn solo_config(dir: &std::path::Path) -> NodeConfig {
    let ghost = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let ghost_addr = ghost.local_addr().unwrap();
    tokio::spawn(empty_replica(ghost, "strict/ghost"));
    let text = r#"
node = "solo"
cluster = "test"
replication = "127.0.0.1:0"
nbd = "127.0.0.1:0"
admin = "127.0.0.1:0"

[tuning]
barrier_timeout_ms = 400
network_retry_max_ms = 200
# The fake replica speaks plain connections, not a multiplexed link.
multiplex = false

[[volume]]
name = "fast"
size = "16MiB"
commit_mode = "best_effort"
primary = "solo"

[[volume]]
name = "other"
size = "4MiB"
commit_mode = "best_effort"
primary = "solo"

[[volume]]
name = "strict"
size = "4MiB"
commit_mode = "sync_all"
primary = "solo"
replicas = { ghost = "GHOST" }

[[volume]]
name = "mirror"
size = "4MiB"
commit_mode = "sync_all"
primary = "elsewhere"
replicas = { solo = "127.0.0.1:0" }
export_replicas = true
"#;
    let text = text.replace("GHOST", &ghost_addr.to_string());
    config::parse("test.toml", &text, Some(dir)).unwrap()
}

/// A sync_all primary on a store created at this start cannot tell a new
/// volume from one whose data this node lost: it serves nothing until its
/// replica has answered. Meanwhile the node is up, its status says why,
/// and each request gets EIO after a barrier timeout (nothing
/// acknowledged, no zeroes read that the replica might hold). Once the
/// replica answers, the primary opens and serves.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_primary_serves_nothing_until_its_replica_answers() {
    let dir = tempfile::tempdir().unwrap();
    // Holding the port: connections queue unanswered until it accepts.
    let replica = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let text = format!(
        r#"
node = "solo"
cluster = "test"
replication = "127.0.0.1:0"
nbd = "127.0.0.1:0"
admin = "127.0.0.1:0"

[tuning]
barrier_timeout_ms = 300
peer_timeout_ms = 200
multiplex = false

[[volume]]
name = "late"
size = "4MiB"
commit_mode = "sync_all"
primary = "solo"
replicas = {{ away = "{}" }}
"#,
        replica.local_addr().unwrap()
    );
    let config = config::parse("test.toml", &text, Some(dir.path())).unwrap();
    let node = Node::start(config).await.unwrap();
    let peering = walship::actors::testing::within(std::time::Duration::from_secs(10), || async {
        let json = serde_json::to_value(node.volume_status("late").await.ok()?).ok()?;
        (json["status"]["state"] == "peering" && json["status"]["round"].as_u64()? >= 1)
            .then_some(json)
    })
    .await
    .expect("the primary peers");
    assert_eq!(peering["status"]["need"], 1, "{peering:#}");
    assert_eq!(peering["status"]["have"], 0, "{peering:#}");
    let mut client = Haggle::connect(node.nbd_addr().unwrap())
        .await
        .go("late")
        .await;
    assert_eq!(client.write(0, &[1u8; 4096], 0).await, EIO);
    assert_eq!(client.read(0, 4096).await, Err(EIO));

    tokio::spawn(empty_replica(replica, "late/away"));
    let opened = walship::actors::testing::within(std::time::Duration::from_secs(10), || async {
        let json = serde_json::to_value(node.volume_status("late").await.ok()?).ok()?;
        json["status"]["registry"].is_object().then_some(json)
    })
    .await
    .expect("the primary opens once its replica answered");
    let peered = opened["recent_recovery"][0].clone();
    assert_eq!(peered["event"], "peered", "{opened:#}");
    assert!(
        peered["detail"]
            .as_str()
            .unwrap()
            .starts_with("peered: 1 of 1 answered"),
        "{peered:#}"
    );
    assert_eq!(client.write(0, &[1u8; 4096], 0).await, 0);
    assert_eq!(client.read(0, 4096).await, Ok(vec![1u8; 4096]));
    node.stop().await;
}

/// A node whose lease lapsed (its fence closed) answers EIO to every
/// request on a primary's export, reads too: another node may be primary
/// by now. The connection goes on; a replica's read-only export, a
/// lagging view anyway, is still read.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lapsed_fence_refuses_writes_flushes_and_reads_on_a_primary_export() {
    let dir = tempfile::tempdir().unwrap();
    let fence = Arc::new(WriteFence::open());
    let node = start_node_fenced(dir.path(), Arc::clone(&fence)).await;
    let addr = node.nbd_addr().unwrap();
    let mut client = Haggle::connect(addr).await.go("fast").await;
    assert_eq!(client.write(0, &[7u8; 4096], FLAG_FUA).await, 0);
    assert_eq!(client.read(0, 4096).await.unwrap(), vec![7u8; 4096]);
    let mut mirror = Haggle::connect(addr).await.go("mirror").await;
    assert!(mirror.read(0, 4096).await.is_ok());

    fence.close();
    assert_eq!(client.write(0, &[8u8; 4096], FLAG_FUA).await, EIO);
    assert_eq!(client.read(0, 4096).await, Err(EIO));
    assert_eq!(client.call(CMD_FLUSH, 0, 0, 0, &[]).await, EIO);
    assert!(mirror.read(0, 4096).await.is_ok());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn options_get_typed_replies_and_the_handshake_goes_on() {
    let dir = tempfile::tempdir().unwrap();
    let node = start_node(dir.path()).await;
    let mut haggle = Haggle::connect(node.nbd_addr().unwrap()).await;

    let unsupported = haggle.ask(OPT_STRUCTURED_REPLY, &[]).await;
    assert_eq!(unsupported.len(), 1);
    assert_eq!(unsupported[0].0, REP_ERR_UNSUP);
    assert_eq!(haggle.ask(OPT_LIST, b"junk").await[0].0, REP_ERR_INVALID);
    let listed = haggle.ask(OPT_LIST, &[]).await;
    let names: BTreeSet<String> = listed
        .iter()
        .filter(|(kind, _)| *kind == REP_SERVER)
        .map(|(_, data)| String::from_utf8(data[4..].to_vec()).unwrap())
        .collect();
    let expected = ["fast", "mirror", "other", "strict"].map(String::from);
    assert_eq!(names, BTreeSet::from(expected));
    assert_eq!(listed.last().unwrap().0, REP_ACK);

    // Malformed INFO data (a name longer than the data), an unknown export.
    let mut long_name = 40u32.to_be_bytes().to_vec();
    long_name.extend_from_slice(b"fast\0\0");
    assert_eq!(haggle.ask(OPT_INFO, &long_name).await[0].0, REP_ERR_INVALID);
    let unknown = haggle.ask(OPT_INFO, &info_request("nope", &[])).await;
    assert_eq!(unknown[0].0, REP_ERR_UNKNOWN);

    // INFO: the size and flags, the 4 KiB minimum block size, then ACK.
    let info = haggle.ask(OPT_INFO, &info_request("fast", &[3])).await;
    assert_eq!(info.len(), 3, "{info:?}");
    let export = &info[0].1;
    assert_eq!(u16::from_be_bytes([export[0], export[1]]), 0);
    assert_eq!(
        u64::from_be_bytes(export[2..10].try_into().unwrap()),
        16 * MIB
    );
    let flags = u16::from_be_bytes([export[10], export[11]]);
    assert_eq!(flags & 0b10, 0, "read-write");
    assert_ne!(flags & (1 << 3), 0, "FUA");
    let sizes = &info[1].1;
    let size = |at: usize| u32::from_be_bytes(sizes[at..at + 4].try_into().unwrap());
    assert_eq!((size(2), size(6), size(10)), (4096, 4096, 32 << 20));
    let mirror = haggle.ask(OPT_INFO, &info_request("mirror", &[])).await;
    let mirror_flags = u16::from_be_bytes([mirror[0].1[10], mirror[0].1[11]]);
    assert_ne!(mirror_flags & 0b10, 0, "a replica's export is read-only");

    // After all that, GO works and so does the volume.
    let mut client = haggle.go("fast").await;
    assert_eq!(client.write(0, &[9u8; 4096], FLAG_FUA).await, 0);
    assert_eq!(client.read(0, 4096).await.unwrap(), vec![9u8; 4096]);
    client.send(CMD_DISC, 0, 1, 0, 0, &[]).await;
    assert!(client.closed().await);
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broken_handshake_closes_that_connection_only() {
    let dir = tempfile::tempdir().unwrap();
    let node = start_node(dir.path()).await;
    let mut other = Haggle::connect(node.nbd_addr().unwrap())
        .await
        .go("other")
        .await;

    let mut bad_magic = Haggle::connect(node.nbd_addr().unwrap()).await;
    bad_magic.0.write_all(&[0xee; 16]).await.unwrap();
    assert!(bad_magic.closed().await, "a bad option magic closes");

    let mut huge = Haggle::connect(node.nbd_addr().unwrap()).await;
    huge.0.write_u64(IHAVEOPT).await.unwrap();
    huge.0.write_u32(OPT_GO).await.unwrap();
    huge.0.write_u32(1 << 30).await.unwrap();
    assert!(huge.closed().await, "a 1 GiB option closes");

    let mut flags = TcpStream::connect(node.nbd_addr().unwrap()).await.unwrap();
    let mut greeting = [0u8; 18];
    flags.read_exact(&mut greeting).await.unwrap();
    flags.write_u32(1 << 7).await.unwrap();
    // Closed at once, well before the 30 s a silent handshake is given.
    assert!(Haggle(flags).closed().await, "unknown client flags close");

    // The client that negotiated properly never noticed.
    assert_eq!(other.write(4096, &[3u8; 8192], 0).await, 0);
    assert_eq!(other.read(4096, 8192).await.unwrap(), vec![3u8; 8192]);
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_requests_get_errors_and_the_connection_goes_on() {
    let dir = tempfile::tempdir().unwrap();
    let node = start_node(dir.path()).await;
    let mut client = Haggle::connect(node.nbd_addr().unwrap())
        .await
        .go("fast")
        .await;
    assert_eq!(client.write(0, &[1u8; 8192], 0).await, 0);

    // Unaligned: refused, its payload consumed, nothing changed.
    assert_eq!(client.write(100, &[2u8; 4096], 0).await, EINVAL);
    assert_eq!(client.write(4096, &[2u8; 1000], 0).await, EINVAL);
    assert_eq!(client.read(0, 8192).await.unwrap(), vec![1u8; 8192]);
    assert_eq!(client.read(512, 4096).await, Err(EINVAL));
    // Past the end: ENOSPC for writes and zeroes, EINVAL for reads.
    assert_eq!(client.write(16 * MIB, &[2u8; 4096], 0).await, ENOSPC);
    assert_eq!(
        client
            .call(CMD_WRITE_ZEROES, 0, 16 * MIB - 4096, 8192, &[])
            .await,
        ENOSPC
    );
    assert_eq!(client.read(16 * MIB - 4096, 8192).await, Err(EINVAL));
    assert_eq!(client.read(u64::MAX - 4095, 4096).await, Err(EINVAL));
    // Oversized, unknown command, unknown flag.
    assert_eq!(client.call(CMD_READ, 0, 0, 33 << 20, &[]).await, EINVAL);
    assert_eq!(client.call(42, 0, 0, 0, &[]).await, EINVAL);
    assert_eq!(client.call(CMD_READ, 1 << 9, 0, 4096, &[]).await, EINVAL);
    // WRITE_ZEROES zeroes; FLUSH commits.
    assert_eq!(
        client
            .call(CMD_WRITE_ZEROES, FLAG_FUA, 4096, 4096, &[])
            .await,
        0
    );
    assert_eq!(
        client.read(0, 8192).await.unwrap(),
        [vec![1u8; 4096], vec![0u8; 4096]].concat()
    );
    assert_eq!(client.call(CMD_FLUSH, 0, 0, 0, &[]).await, 0);

    // Pipelined: 32 writes and 32 reads in flight, every reply matched by handle.
    for i in 0..32u64 {
        let data = vec![i as u8; 4096];
        client
            .send(CMD_WRITE, 0, 1000 + i, (64 + i) * 4096, 4096, &data)
            .await;
    }
    let mut handles = BTreeSet::new();
    for _ in 0..32 {
        let (error, handle) = client.reply().await;
        assert_eq!(error, 0);
        handles.insert(handle);
    }
    assert_eq!(handles, (1000..1032).collect());
    for i in 0..32u64 {
        assert_eq!(
            client.read((64 + i) * 4096, 4096).await.unwrap(),
            vec![i as u8; 4096]
        );
    }

    // A read-only export refuses writes and zeroes with EPERM, reads fine.
    let mut mirror = Haggle::connect(node.nbd_addr().unwrap())
        .await
        .go("mirror")
        .await;
    assert_eq!(mirror.write(0, &[5u8; 4096], 0).await, EPERM);
    assert_eq!(mirror.call(CMD_WRITE_ZEROES, 0, 0, 4096, &[]).await, EPERM);
    assert_eq!(mirror.read(0, 4096).await.unwrap(), vec![0u8; 4096]);

    // A bad request magic, or a write payload past 32 MiB, closes the
    // connection; the others keep serving.
    client.0.write_all(&[0xab; 28]).await.unwrap();
    assert!(client.closed().await);
    let mut huge = Haggle::connect(node.nbd_addr().unwrap())
        .await
        .go("fast")
        .await;
    huge.send(CMD_WRITE, 0, 9, 0, 64 << 20, &[]).await;
    assert!(huge.closed().await);
    assert_eq!(mirror.read(4096, 4096).await.unwrap(), vec![0u8; 4096]);
    let mut again = Haggle::connect(node.nbd_addr().unwrap())
        .await
        .go("fast")
        .await;
    assert_eq!(again.read(64 * 4096, 4096).await.unwrap(), vec![0u8; 4096]);
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_the_volume_cannot_commit_gets_an_error_never_a_silent_ack() {
    let dir = tempfile::tempdir().unwrap();
    let node = start_node(dir.path()).await;

    // sync_all with its replica away past the barrier timeout: the write
    // is in the WAL, but FUA and FLUSH must not say it is committed.
    let mut strict = Haggle::connect(node.nbd_addr().unwrap())
        .await
        .go("strict")
        .await;
    assert_eq!(strict.write(0, &[1u8; 4096], FLAG_FUA).await, EIO);
    assert_eq!(strict.call(CMD_FLUSH, 0, 0, 0, &[]).await, EIO);

    // Meanwhile requests keep being read, even one whose header arrives in
    // pieces while the FUA write waiting for its barrier fails: the reply
    // comes between the header's two halves, and nothing is lost.
    strict.0.set_nodelay(true).unwrap();
    strict
        .send(CMD_WRITE, FLAG_FUA, 77, 0, 4096, &[2u8; 4096])
        .await;
    let mut split = Vec::new();
    split.extend_from_slice(&REQUEST_MAGIC.to_be_bytes());
    split.extend_from_slice(&0u16.to_be_bytes());
    split.extend_from_slice(&CMD_WRITE.to_be_bytes());
    split.extend_from_slice(&78u64.to_be_bytes());
    split.extend_from_slice(&4096u64.to_be_bytes());
    split.extend_from_slice(&4096u32.to_be_bytes());
    split.extend_from_slice(&[6u8; 4096]);
    strict.0.write_all(&split[..10]).await.unwrap();
    assert_eq!(strict.reply().await, (EIO, 77));
    strict.0.write_all(&split[10..]).await.unwrap();
    assert_eq!(
        strict.reply().await,
        (0, 78),
        "a write without FUA is taken"
    );
    assert_eq!(strict.read(4096, 4096).await.unwrap(), vec![6u8; 4096]);

    // A poisoned WAL: the write itself is refused.
    let mut other = Haggle::connect(node.nbd_addr().unwrap())
        .await
        .go("other")
        .await;
    assert_eq!(other.write(0, &[1u8; 4096], FLAG_FUA).await, 0);
    node.volume("other")
        .unwrap()
        .inject_storage_failure()
        .await
        .unwrap();
    assert_eq!(other.write(4096, &[2u8; 4096], FLAG_FUA).await, EIO);
    assert_eq!(other.write(8192, &[2u8; 4096], 0).await, EIO);

    // Fenced: a newer assignment makes this node a replica of `fast`; the
    // client still connected to the old primary is disconnected (so that
    // it reconnects to wherever the export is now), having written nothing
    // more.
    let mut fast = Haggle::connect(node.nbd_addr().unwrap())
        .await
        .go("fast")
        .await;
    assert_eq!(fast.write(0, &[1u8; 4096], FLAG_FUA).await, 0);
    // A write in flight as the role changes: answered (either way) before
    // the connection closes, or never read; never half a reply.
    fast.send(CMD_WRITE, 0, 99, 8192, 4096, &[3u8; 4096]).await;
    let replicas = [("solo".to_owned(), node.replication_addr().to_string())].into();
    let demoted = walship::node::Applied::new(7, "elsewhere", CommitMode::BestEffort, &replicas);
    node.apply_assignment("fast", demoted.clone())
        .await
        .unwrap();
    let mut rest = Vec::new();
    let closed = tokio::time::timeout(
        std::time::Duration::from_secs(5),
        fast.0.read_to_end(&mut rest),
    )
    .await;
    assert!(
        matches!(closed, Ok(Ok(0 | 16))),
        "the connection to the demoted export stays open: {closed:?}, {rest:?}"
    );
    if rest.len() == 16 {
        assert_eq!(&rest[..4], &SIMPLE_REPLY_MAGIC.to_be_bytes(), "{rest:?}");
        assert_eq!(&rest[8..], &99u64.to_be_bytes(), "{rest:?}");
    }
    // The same epoch again is fenced.
    let again = node.apply_assignment("fast", demoted).await;
    assert!(
        matches!(
            again,
            Err(walship::node::NodeError::Fenced {
                applied: 7,
                offered: 7,
                ..
            })
        ),
        "{again:?}"
    );
    // A replica not configured for export is not exported; it holds what
    // was committed.
    let mut haggle = Haggle::connect(node.nbd_addr().unwrap()).await;
    let gone = haggle.ask(OPT_GO, &info_request("fast", &[])).await;
    assert_eq!(gone[0].0, REP_ERR_UNKNOWN);
    let kept = node.volume("fast").unwrap().read(0, 1).await.unwrap();
    assert_eq!(&kept[..], &[1u8; 4096][..]);
    node.stop().await;
}

/// What the node's replication listener answers a connection that opens
/// with `first` (raw bytes), within 5 s: its error message, or `None` if it
/// closed without one.
async fn replication_answer(node: &Node, first: &[u8]) -> Option<(u16, String)> {
    use futures::StreamExt;
    let mut stream = TcpStream::connect(node.replication_addr()).await.unwrap();
    stream.write_all(first).await.unwrap();
    let mut framed = tokio_util::codec::Framed::new(stream, walship::io::WireCodec::default());
    let answer = tokio::time::timeout(std::time::Duration::from_secs(5), framed.next())
        .await
        .expect("an answer or a close within 5 s");
    match answer {
        Some(Ok(walship::io::Envelope {
            message: walship::io::Message::Error { code, message },
            ..
        })) => Some((code, message)),
        Some(other) => panic!("unexpected answer {other:?}"),
        None => None,
    }
}

fn encoded(message: walship::io::Message) -> Vec<u8> {
    use tokio_util::codec::Encoder;
    let mut bytes = bytes::BytesMut::new();
    walship::io::WireCodec::default()
        .encode(walship::io::Envelope { epoch: 3, message }, &mut bytes)
        .unwrap();
    bytes.to_vec()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_replication_listener_refuses_what_it_cannot_route_and_keeps_serving() {
    use walship::io::{Message, CODE_IDENTITY, CODE_UNEXPECTED, CODE_WIRE};
    let dir = tempfile::tempdir().unwrap();
    let node = start_node(dir.path()).await;
    let hello = |cluster: &str, volume: &str| {
        encoded(Message::Hello {
            cluster: cluster.into(),
            volume: volume.into(),
            replica: format!("{volume}/solo"),
            session: 1,
            durable_commits: true,
        })
    };

    let garbage = replication_answer(&node, &[0xff; 64]).await;
    assert!(matches!(garbage, Some((CODE_WIRE, _))), "{garbage:?}");
    let (code, said) = replication_answer(&node, &hello("test", "nope"))
        .await
        .unwrap();
    assert_eq!(code, CODE_IDENTITY);
    assert!(said.contains("no replica of volume nope"), "{said}");
    let (code, said) = replication_answer(&node, &hello("other", "mirror"))
        .await
        .unwrap();
    assert_eq!(code, CODE_IDENTITY);
    assert!(said.contains("cluster other"), "{said}");
    let heartbeat = encoded(Message::Heartbeat {
        seq: 1,
        committed: 0,
    });
    let (code, _) = replication_answer(&node, &heartbeat).await.unwrap();
    assert_eq!(code, CODE_UNEXPECTED);
    // A primary that names the replica right is answered with its log.
    let mut stream = TcpStream::connect(node.replication_addr()).await.unwrap();
    stream.write_all(&hello("test", "mirror")).await.unwrap();
    let mut framed = tokio_util::codec::Framed::new(stream, walship::io::WireCodec::default());
    let ack = futures::StreamExt::next(&mut framed)
        .await
        .unwrap()
        .unwrap();
    assert!(
        matches!(ack.message, Message::HelloAck { ref replica, .. } if replica == "mirror/solo"),
        "{ack:?}"
    );
    drop(framed);

    // NBD clients never noticed.
    let mut mirror = Haggle::connect(node.nbd_addr().unwrap())
        .await
        .go("mirror")
        .await;
    assert_eq!(mirror.read(0, 4096).await.unwrap(), vec![0u8; 4096]);
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_size_the_store_on_disk_contradicts_is_refused_with_its_line() {
    let dir = tempfile::tempdir().unwrap();
    let text = "node = \"solo\"\nreplication = \"127.0.0.1:0\"\n\n[[volume]]\nname = \"v\"\nsize = \"4MiB\"\ncommit_mode = \"best_effort\"\nprimary = \"solo\"\n";
    let node = Node::start(config::parse("solo.toml", text, Some(dir.path())).unwrap())
        .await
        .unwrap();
    node.stop().await;
    let grown = text.replace("4MiB", "8MiB");
    let refused = Node::start(config::parse("solo.toml", &grown, Some(dir.path())).unwrap()).await;
    let error = refused
        .expect_err("a size the store contradicts is refused")
        .to_string();
    assert!(
        error.starts_with(
            "solo.toml:6: volume v: size 8388608 bytes, but its store on disk holds 4194304"
        ),
        "{error}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_admin_endpoint_reports_status_and_metrics_and_fences_assignments() {
    use walship::node::admin::request;
    let dir = tempfile::tempdir().unwrap();
    // The admin endpoint is the node process's (it holds the node).
    let config = solo_config(dir.path()).await;
    let process = NodeProcess::start(config, AssignmentSource::Static)
        .await
        .unwrap();
    let node = Arc::clone(process.node());
    let admin = process.admin_addr().unwrap().to_string();
    let mut client = Haggle::connect(node.nbd_addr().unwrap())
        .await
        .go("fast")
        .await;
    assert_eq!(client.write(0, &[4u8; 8192], FLAG_FUA).await, 0);

    let (status, body) = request(&admin, "/status", None).await.unwrap();
    assert_eq!(status, 200);
    let report: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(report["node"], "solo");
    let roles: BTreeSet<(String, String)> = report["volumes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| {
            (
                v["name"].as_str().unwrap().to_owned(),
                v["role"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    let expected = [
        ("fast", "primary"),
        ("mirror", "replica"),
        ("other", "primary"),
        ("strict", "primary"),
    ]
    .map(|(n, r)| (n.to_owned(), r.to_owned()));
    assert_eq!(roles, BTreeSet::from(expected));

    let (status, body) = request(&admin, "/volumes/fast", None).await.unwrap();
    assert_eq!(status, 200);
    let fast: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(
        fast["status"]["head"], 1,
        "one write, one WAL frame: {body}"
    );
    assert_eq!(fast["export"], "read-write");
    assert_eq!(request(&admin, "/volumes/nope", None).await.unwrap().0, 404);

    // Assignments: malformed → 400; not newer → 409 with the applied epoch.
    let bad = request(
        &admin,
        "/volumes/fast/assignment",
        Some("{\"epoch\": 1}".into()),
    )
    .await
    .unwrap();
    assert_eq!(bad.0, 400, "{}", bad.1);
    let stale = r#"{"epoch": 1, "primary": "solo", "commit_mode": "best_effort", "replicas": {}}"#;
    let fenced = request(&admin, "/volumes/fast/assignment", Some(stale.into()))
        .await
        .unwrap();
    assert_eq!(fenced.0, 409, "{}", fenced.1);
    assert!(
        fenced.1.contains("not newer than the applied epoch 1"),
        "{}",
        fenced.1
    );
    let newer = stale.replace("\"epoch\": 1", "\"epoch\": 4");
    let applied = request(&admin, "/volumes/fast/assignment", Some(newer))
        .await
        .unwrap();
    assert_eq!(applied.0, 200, "{}", applied.1);
    let applied: serde_json::Value = serde_json::from_str(&applied.1).unwrap();
    assert_eq!(applied["assignment"]["epoch"], 4);
    // The runtime's term: the epoch in the high bits, incarnation 0.
    assert_eq!(applied["status"]["registry"]["epoch"], 4 << 20);

    let (status, metrics) = request(&admin, "/metrics", None).await.unwrap();
    assert_eq!(status, 200);
    for expected in [
        "walship_mailbox_sent_total{actor=\"volume\"}",
        "walship_wal_sync_seconds",
        "walship_volume_head_lsn{volume=\"fast\"} 1",
        "walship_volume_epoch{volume=\"fast\"} 4",
        "walship_replica_state{volume=\"strict\",replica=\"strict/ghost\",state=\"in_sync\"} 0",
        "walship_replica_lag_bytes{volume=\"strict\",replica=\"strict/ghost\"}",
    ] {
        assert!(metrics.contains(expected), "no {expected} in:\n{metrics}");
    }
    drop(node);
    process.stop().await;
}

/// Established TCP connections whose local port is `port` (from
/// /proc/net/tcp: the accepted side of connections to a listener).
fn established_to(port: u16) -> usize {
    let table = std::fs::read_to_string("/proc/net/tcp").unwrap();
    table
        .lines()
        .skip(1)
        .filter(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            let local_port = fields[1].rsplit(':').next().unwrap();
            u16::from_str_radix(local_port, 16).unwrap() == port && fields[3] == "01"
        })
        .count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn volumes_between_two_nodes_share_one_connection() {
    let dir = tempfile::tempdir().unwrap();
    let replica_port = {
        let probe = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        probe.local_addr().unwrap().port()
    };
    let volumes = |names: &[&str]| {
        names
            .iter()
            .map(|v| {
                format!(
                    "[[volume]]\nname = \"{v}\"\nsize = \"1MiB\"\ncommit_mode = \"sync_all\"\n\
                     primary = \"a\"\nreplicas = {{ b = \"127.0.0.1:{replica_port}\" }}\n\n"
                )
            })
            .collect::<String>()
    };
    let names = ["v1", "v2", "v3", "v4"];
    let b = format!(
        "node = \"b\"\nreplication = \"127.0.0.1:{replica_port}\"\n\n{}",
        volumes(&names)
    );
    let a = format!(
        "node = \"a\"\nreplication = \"127.0.0.1:0\"\n\n{}",
        volumes(&names)
    );
    let b = Node::start(config::parse("b.toml", &b, Some(&dir.path().join("b"))).unwrap())
        .await
        .unwrap();
    let a = Node::start(config::parse("a.toml", &a, Some(&dir.path().join("a"))).unwrap())
        .await
        .unwrap();
    for name in names {
        let volume = a.volume(name).unwrap();
        volume
            .wait_replica_state(
                "b",
                walship::engine::ReplicaState::InSync,
                std::time::Duration::from_secs(20),
            )
            .await
            .unwrap();
        volume
            .write(0, bytes::Bytes::from(vec![1u8; 4096]))
            .await
            .unwrap();
        volume.barrier().await.unwrap();
    }
    // Four volumes, four sessions, one connection.
    assert_eq!(a.peer_links().await, 1);
    assert_eq!(established_to(replica_port), 1);
    a.stop().await;
    b.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_node_on_the_same_data_dir_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let node = start_node(dir.path()).await;
    let text = "node = \"solo\"\nreplication = \"127.0.0.1:0\"\n";
    let second = Node::start(config::parse("again.toml", text, Some(dir.path())).unwrap()).await;
    let refused = second.expect_err("one node per data dir").to_string();
    assert!(
        refused.contains("another node runs on this data dir"),
        "{refused}"
    );
    // Offline tools see its stores in use, through the node's lock.
    let store = dir.path().join("fast/store");
    assert!(walship::io::inspect(&store).in_use);
    node.stop().await;
    assert!(!walship::io::inspect(&store).in_use);
    // Stopped, it lets go: another node may take the directory.
    let again = Node::start(config::parse("again.toml", text, Some(dir.path())).unwrap()).await;
    again.unwrap().stop().await;
}
