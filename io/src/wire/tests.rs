use super::*;

fn chunk(fill: u8) -> Envelope {
    Envelope {
        epoch: 1,
        message: Message::RebuildChunk {
            session: 1,
            offset: 0,
            data: Bytes::from(vec![fill; BULK_FRAME * 2]),
        },
    }
}

/// Large frames are copied into reused buffers: one still held keeps
/// its bytes while later frames are decoded into buffers freed before.
#[test]
fn large_frames_held_by_consumers_are_never_reused_under_them() {
    let mut codec = WireCodec::default();
    let mut wire = BytesMut::new();
    for fill in 1..=40u8 {
        codec.encode(chunk(fill), &mut wire).unwrap();
    }
    let mut held = Vec::new();
    for fill in 1..=40u8 {
        let envelope = codec.decode(&mut wire).unwrap().unwrap();
        assert_eq!(envelope, chunk(fill));
        // Every other one dropped at once, its buffer free for the next.
        if fill % 2 == 0 {
            held.push((fill, envelope));
        }
    }
    for (fill, envelope) in held {
        assert_eq!(
            envelope,
            chunk(fill),
            "frame {fill} changed under its holder"
        );
    }
    assert!(wire.is_empty());
}

fn round_trip(message: Message) {
    let mut codec = WireCodec::default();
    let mut buf = BytesMut::new();
    let envelope = Envelope { epoch: 9, message };
    codec.encode(envelope.clone(), &mut buf).unwrap();
    // Byte by byte: Incomplete until the last byte, then exactly one message.
    let mut partial = BytesMut::new();
    let encoded = buf.clone();
    for (i, byte) in encoded.iter().enumerate() {
        partial.put_u8(*byte);
        let decoded = codec.decode(&mut partial).unwrap();
        if i + 1 < encoded.len() {
            assert!(decoded.is_none());
        } else {
            assert_eq!(decoded, Some(envelope.clone()));
        }
    }
    assert!(partial.is_empty());
}

#[test]
fn every_message_round_trips_even_byte_by_byte() {
    round_trip(Message::Hello {
        cluster: "c".into(),
        volume: "v".into(),
        replica: "v/r".into(),
        session: 3,
        durable_commits: true,
    });
    round_trip(Message::DurableAck {
        durable: 5,
        barrier: Some(2),
        committed: 4,
    });
    round_trip(Message::DurableAck {
        durable: 5,
        barrier: None,
        committed: 0,
    });
    round_trip(Message::WalBatch {
        session: 1,
        first_lsn: 2,
        last_lsn: 3,
        committed: 1,
        frames: Bytes::from_static(b"frames"),
    });
    round_trip(Message::RebuildBegin {
        session: 1,
        kind: ImageKind::FullBase,
        image_lsn: 7,
        image_bytes: 8,
        install: Install::Staging,
    });
    round_trip(Message::RebuildBegin {
        session: 1,
        kind: ImageKind::Snapshot,
        image_lsn: 7,
        image_bytes: 8,
        install: Install::InPlace {
            source: 9,
            since: Some(3),
            apply_through: 5,
            by_map: true,
        },
    });
    round_trip(Message::SumsRequest {
        session: 1,
        offset: 64 << 10,
        len: 1 << 20,
        region_bytes: 64 << 10,
    });
    round_trip(Message::RegionSums {
        session: 1,
        offset: 64 << 10,
        sums: Bytes::from(vec![7; 32]),
    });
    round_trip(Message::Error {
        code: 4,
        message: "stale epoch".into(),
    });
    let epochs = vec![
        EpochStart {
            epoch: 1,
            first_lsn: 1,
        },
        EpochStart {
            epoch: 2,
            first_lsn: 201,
        },
    ];
    round_trip(Message::HelloAck {
        replica: "v/r".into(),
        flushed: 300,
        checkpoint: 100,
        epochs: epochs.clone(),
        committed: 250,
        partial: None,
    });
    round_trip(Message::HelloAck {
        replica: "v/r".into(),
        flushed: 0,
        checkpoint: 0,
        epochs: Vec::new(),
        committed: 250,
        partial: Some(crate::PartialImage {
            source: 11,
            since: Some(12),
            image_lsn: 13,
            cursor: 14 << 20,
            by_map: true,
        }),
    });
    round_trip(Message::Peer {
        cluster: "c".into(),
        volume: "v".into(),
        replica: "v/r".into(),
    });
    round_trip(Message::PullImage);
    round_trip(Message::PullChunk {
        offset: 1 << 20,
        len: 4096,
    });
    round_trip(Message::PullDone);
    round_trip(Message::VerifyBegin {
        cluster: "c".into(),
        volume: "v".into(),
        replica: "v/r".into(),
        lsn: 12,
    });
    round_trip(Message::VerifyReady { lsn: 13 });
    round_trip(Message::VerifyEnd);
    round_trip(Message::PullFrames { after: 30 });
    round_trip(Message::RebuildDone {
        session: 4,
        image_lsn: 250,
        checksum: 0xdead_beef,
        epochs,
    });
}

#[test]
fn a_head_plus_its_payload_is_the_whole_frame() {
    let payload = Bytes::from(vec![0xA5u8; 3000]);
    let messages = [
        Message::WalBatch {
            session: 1,
            first_lsn: 2,
            last_lsn: 3,
            committed: 1,
            frames: payload.clone(),
        },
        Message::RebuildChunk {
            session: 4,
            offset: 8192,
            data: payload.clone(),
        },
        Message::Heartbeat {
            seq: 9,
            committed: 2,
        },
    ];
    for message in messages {
        let envelope = Envelope { epoch: 6, message };
        let mut whole = BytesMut::new();
        WireCodec::default()
            .encode(envelope.clone(), &mut whole)
            .unwrap();
        let mut head = BytesMut::new();
        let rest = WireCodec::default()
            .encode_head(envelope.clone(), &mut head)
            .unwrap();
        if matches!(envelope.message, Message::Heartbeat { .. }) {
            assert!(rest.is_none());
        } else {
            // The payload is not copied: the very same bytes come back.
            assert_eq!(rest.as_ref().unwrap().as_ptr(), payload.as_ptr());
        }
        head.extend_from_slice(&rest.unwrap_or_default());
        assert_eq!(head, whole);
        let decoded = WireCodec::default().decode(&mut head).unwrap();
        assert_eq!(decoded, Some(envelope));
    }
    // The frame limit counts the payload.
    let big = Envelope {
        epoch: 1,
        message: Message::RebuildChunk {
            session: 1,
            offset: 0,
            data: Bytes::from(vec![0u8; 2048]),
        },
    };
    let mut head = BytesMut::new();
    assert!(matches!(
        WireCodec::new(1024).encode_head(big, &mut head),
        Err(WireError::TooLarge { max: 1024, .. })
    ));
    assert!(head.is_empty());
}

#[test]
fn oversized_length_is_refused_before_allocating() {
    let mut codec = WireCodec::new(1024);
    let mut buf = BytesMut::from(&(u32::MAX).to_le_bytes()[..]);
    let capacity = buf.capacity();
    assert!(
        matches!(codec.decode(&mut buf), Err(WireError::TooLarge { len, max: 1024 }) if len == u32::MAX as usize)
    );
    assert_eq!(buf.capacity(), capacity);
}

#[test]
fn malformed_frames_get_typed_errors() {
    let mut codec = WireCodec::default();
    let frame = |version: u8, kind: u8, body: &[u8]| {
        let mut buf = BytesMut::new();
        buf.put_u32_le((HEADER + body.len()) as u32);
        buf.put_u8(version);
        buf.put_u8(kind);
        buf.put_u64_le(1);
        buf.put_slice(body);
        buf
    };
    const V: u8 = PROTOCOL_VERSION;
    assert!(matches!(
        codec.decode(&mut frame(1, 1, &[])),
        Err(WireError::Version(1))
    ));
    assert!(matches!(
        codec.decode(&mut frame(V, 99, &[])),
        Err(WireError::UnknownType(99))
    ));
    assert!(matches!(
        codec.decode(&mut frame(V, 4, &[0; 15])),
        Err(WireError::Truncated("lsn"))
    ));
    assert!(matches!(
        codec.decode(&mut frame(V, 4, &[0; 23])),
        Err(WireError::Truncated("committed"))
    ));
    assert!(matches!(
        codec.decode(&mut frame(V, 4, &[0; 25])),
        Err(WireError::Trailing(1))
    ));
    assert!(matches!(
        codec.decode(&mut frame(V, 2, &[2, 0, 0xff, 0xfe])),
        Err(WireError::BadUtf8("replica"))
    ));
    // A hello ack claiming more epochs than the protocol allows is
    // refused before anything is allocated for them; fewer bytes than
    // the count says is a truncation.
    let mut body = vec![1, 0, b'r'];
    body.extend_from_slice(&[0; 16]);
    body.extend_from_slice(&u32::MAX.to_le_bytes());
    assert!(matches!(
        codec.decode(&mut frame(V, 2, &body)),
        Err(WireError::TooManyEpochs(n)) if n == u32::MAX as usize
    ));
    let mut body = vec![1, 0, b'r'];
    body.extend_from_slice(&[0; 16]);
    body.extend_from_slice(&2u32.to_le_bytes());
    body.extend_from_slice(&[0; 24]);
    assert!(matches!(
        codec.decode(&mut frame(V, 2, &body)),
        Err(WireError::Truncated("epochs"))
    ));
    // Nor is one encoded: it is refused whole, and nothing is left behind.
    let mut buf = BytesMut::from(&b"kept"[..]);
    let too_many = vec![
        EpochStart {
            epoch: 1,
            first_lsn: 1
        };
        MAX_EPOCHS + 1
    ];
    let ack = Message::HelloAck {
        replica: "r".into(),
        flushed: 0,
        checkpoint: 0,
        epochs: too_many,
        committed: 0,
        partial: None,
    };
    assert!(matches!(
        codec.encode(Envelope { epoch: 1, message: ack }, &mut buf),
        Err(WireError::TooManyEpochs(n)) if n == MAX_EPOCHS + 1
    ));
    assert_eq!(&buf[..], b"kept");
    // A long free-text field is cut at a character boundary, still UTF-8.
    let mut buf = BytesMut::new();
    let message = Message::Error {
        code: 1,
        message: "é".repeat(MAX_STRING),
    };
    codec
        .encode(Envelope { epoch: 1, message }, &mut buf)
        .unwrap();
    match codec.decode(&mut buf).unwrap().unwrap().message {
        Message::Error { message, .. } => {
            assert_eq!(message.len(), MAX_STRING - MAX_STRING % 2);
        }
        other => panic!("{other:?}"),
    }
    let mut short = BytesMut::new();
    short.put_u32_le(3);
    short.put_slice(&[1, 2, 3]);
    assert!(matches!(
        codec.decode(&mut short),
        Err(WireError::TooShort(3))
    ));
}
