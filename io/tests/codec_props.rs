//! Property tests for the two decoders that face untrusted bytes: the WAL
//! frame parser and the wire codec. Round trips are exact; arbitrary input
//! never panics and never yields a message that does not re-encode to itself.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use bytes::{Bytes, BytesMut};
use proptest::prelude::*;
use tokio_util::codec::{Decoder, Encoder};
use walship_io::*;

fn frame() -> impl Strategy<Value = Frame> {
    let lsn = any::<u64>();
    let epoch = any::<u64>();
    let lba = any::<u64>();
    prop_oneof![
        (lsn, epoch, lba, 1..4usize, any::<u8>()).prop_map(|(l, e, b, n, fill)| Frame::write(
            l,
            e,
            b,
            Bytes::from(vec![fill; n * BLOCK_SIZE])
        )),
        (lsn, epoch, lba, any::<u64>()).prop_map(|(l, e, b, c)| Frame::trim(l, e, b, c)),
        (lsn, epoch).prop_map(|(l, e)| Frame::barrier(l, e)),
    ]
}

fn text() -> impl Strategy<Value = String> {
    "[a-z0-9/._-]{0,40}"
}

fn blob() -> impl Strategy<Value = Bytes> {
    proptest::collection::vec(any::<u8>(), 0..300).prop_map(Bytes::from)
}

fn epochs() -> impl Strategy<Value = Vec<EpochStart>> {
    proptest::collection::vec((any::<u64>(), any::<u64>()), 0..8).prop_map(|pairs| {
        pairs
            .into_iter()
            .map(|(epoch, first_lsn)| EpochStart { epoch, first_lsn })
            .collect()
    })
}

fn message() -> impl Strategy<Value = Message> {
    let n = any::<u64>;
    prop_oneof![
        (text(), text(), text(), n(), any::<bool>()).prop_map(
            |(cluster, volume, replica, session, durable_commits)| Message::Hello {
                cluster,
                volume,
                replica,
                session,
                durable_commits,
            }
        ),
        (
            text(),
            n(),
            n(),
            epochs(),
            n(),
            proptest::option::of((n(), proptest::option::of(n()), n(), n(), any::<bool>()))
        )
            .prop_map(
                |(replica, flushed, checkpoint, epochs, committed, partial)| {
                    Message::HelloAck {
                        replica,
                        flushed,
                        checkpoint,
                        epochs,
                        committed,
                        partial: partial.map(|(source, since, image_lsn, cursor, by_map)| {
                            PartialImage {
                                source,
                                since,
                                image_lsn,
                                cursor,
                                by_map,
                            }
                        }),
                    }
                }
            ),
        (n(), n(), n(), n()).prop_map(|(session, offset, len, region_bytes)| {
            Message::SumsRequest {
                session,
                offset,
                len,
                region_bytes,
            }
        }),
        (n(), n(), blob()).prop_map(|(session, offset, sums)| Message::RegionSums {
            session,
            offset,
            sums
        }),
        (text(), text(), text()).prop_map(|(cluster, volume, replica)| Message::Peer {
            cluster,
            volume,
            replica,
        }),
        Just(Message::PullImage),
        Just(Message::VerifyEnd),
        (text(), text(), text(), n()).prop_map(|(cluster, volume, replica, lsn)| {
            Message::VerifyBegin {
                cluster,
                volume,
                replica,
                lsn,
            }
        }),
        n().prop_map(|lsn| Message::VerifyReady { lsn }),
        Just(Message::PullDone),
        n().prop_map(|after| Message::PullFrames { after }),
        (n(), any::<u32>()).prop_map(|(offset, len)| Message::PullChunk { offset, len }),
        (n(), n(), n(), n(), blob()).prop_map(
            |(session, first_lsn, last_lsn, committed, frames)| Message::WalBatch {
                session,
                first_lsn,
                last_lsn,
                committed,
                frames
            }
        ),
        (n(), n(), n()).prop_map(|(id, lsn, committed)| Message::Barrier { id, lsn, committed }),
        (n(), proptest::option::of(n()), n()).prop_map(|(durable, barrier, committed)| {
            Message::DurableAck {
                durable,
                barrier,
                committed,
            }
        }),
        (n(), n()).prop_map(|(seq, committed)| Message::Heartbeat { seq, committed }),
        (n(), n()).prop_map(|(seq, durable)| Message::HeartbeatAck { seq, durable }),
        (
            n(),
            any::<bool>(),
            n(),
            n(),
            proptest::option::of((n(), proptest::option::of(n()), n(), any::<bool>()))
        )
            .prop_map(|(session, snap, image_lsn, image_bytes, in_place)| {
                Message::RebuildBegin {
                    session,
                    kind: if snap {
                        ImageKind::Snapshot
                    } else {
                        ImageKind::FullBase
                    },
                    image_lsn,
                    image_bytes,
                    install: match in_place {
                        None => Install::Staging,
                        Some((source, since, apply_through, by_map)) => Install::InPlace {
                            source,
                            since,
                            apply_through,
                            by_map,
                        },
                    },
                }
            }),
        (n(), n(), blob()).prop_map(|(session, offset, data)| Message::RebuildChunk {
            session,
            offset,
            data
        }),
        (n(), n(), any::<u32>(), epochs()).prop_map(|(session, image_lsn, checksum, epochs)| {
            Message::RebuildDone {
                session,
                image_lsn,
                checksum,
                epochs,
            }
        }),
        (n(), n())
            .prop_map(|(session, image_lsn)| Message::RebuildInstalled { session, image_lsn }),
        (n(), n()).prop_map(|(session, to)| Message::Truncate { session, to }),
        (n(), n()).prop_map(|(session, to)| Message::Truncated { session, to }),
        n().prop_map(|current_epoch| Message::Fence { current_epoch }),
        (any::<u16>(), text()).prop_map(|(code, message)| Message::Error { code, message }),
    ]
}

proptest! {
    #[test]
    fn wal_frames_round_trip(frame in frame()) {
        let bytes = frame.to_bytes();
        let (decoded, len) = Frame::decode(&bytes).unwrap();
        prop_assert_eq!(len, bytes.len());
        prop_assert_eq!(decoded, frame);
        for cut in [0, 1, frame::HEADER_LEN - 1, bytes.len() - 1] {
            let short = bytes.slice(..cut);
            prop_assert!(matches!(Frame::decode(&short), Err(FrameError::Incomplete { .. })), "incomplete frames are reported as such");
        }
    }

    #[test]
    fn wal_frame_parser_survives_arbitrary_bytes(data in proptest::collection::vec(any::<u8>(), 0..200)) {
        let bytes = Bytes::from(data);
        if let Ok((frame, len)) = Frame::decode(&bytes) {
            prop_assert_eq!(frame.to_bytes(), bytes.slice(..len));
        }
    }

    #[test]
    fn wire_messages_round_trip_in_any_split(message in message(), epoch in any::<u64>(), split in 0usize..64) {
        let mut codec = WireCodec::default();
        let mut encoded = BytesMut::new();
        let envelope = Envelope { epoch, message };
        codec.encode(envelope.clone(), &mut encoded).unwrap();
        let split = split.min(encoded.len());
        let mut buf = BytesMut::from(&encoded[..split]);
        let first = codec.decode(&mut buf).unwrap();
        if split < encoded.len() {
            prop_assert!(first.is_none());
            buf.extend_from_slice(&encoded[split..]);
            prop_assert_eq!(codec.decode(&mut buf).unwrap(), Some(envelope));
        } else {
            prop_assert_eq!(first, Some(envelope));
        }
        prop_assert!(buf.is_empty());
    }

    #[test]
    fn wire_decoder_survives_arbitrary_bytes(data in proptest::collection::vec(any::<u8>(), 0..400)) {
        let mut codec = WireCodec::new(4096);
        let mut buf = BytesMut::from(&data[..]);
        while let Ok(Some(envelope)) = codec.decode(&mut buf) {
            let mut again = BytesMut::new();
            codec.encode(envelope.clone(), &mut again).unwrap();
            prop_assert_eq!(codec.decode(&mut again).unwrap(), Some(envelope));
        }
    }
}
