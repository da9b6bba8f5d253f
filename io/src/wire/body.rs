//! Each message's body, encoded and decoded field by field (strings,
//! epoch histories and blobs length-prefixed; every read checked).

use super::*;
pub(super) struct Reader {
    pub(super) body: Bytes,
}

impl Reader {
    fn need(&self, n: usize, what: &'static str) -> Result<(), WireError> {
        if self.body.remaining() < n {
            return Err(WireError::Truncated(what));
        }
        Ok(())
    }

    fn u8(&mut self, what: &'static str) -> Result<u8, WireError> {
        self.need(1, what)?;
        Ok(self.body.get_u8())
    }

    fn u16(&mut self, what: &'static str) -> Result<u16, WireError> {
        self.need(2, what)?;
        Ok(self.body.get_u16_le())
    }

    fn u32(&mut self, what: &'static str) -> Result<u32, WireError> {
        self.need(4, what)?;
        Ok(self.body.get_u32_le())
    }

    fn u64(&mut self, what: &'static str) -> Result<u64, WireError> {
        self.need(8, what)?;
        Ok(self.body.get_u64_le())
    }

    fn string(&mut self, what: &'static str) -> Result<String, WireError> {
        let len = self.u16(what)? as usize;
        if len > MAX_STRING {
            return Err(WireError::StringTooLong { field: what, len });
        }
        self.need(len, what)?;
        let raw = self.body.split_to(len);
        String::from_utf8(raw.to_vec()).map_err(|_| WireError::BadUtf8(what))
    }

    fn epochs(&mut self, what: &'static str) -> Result<Vec<EpochStart>, WireError> {
        let count = self.u32(what)? as usize;
        if count > MAX_EPOCHS {
            return Err(WireError::TooManyEpochs(count));
        }
        self.need(16 * count, what)?;
        Ok((0..count)
            .map(|_| EpochStart {
                epoch: self.body.get_u64_le(),
                first_lsn: self.body.get_u64_le(),
            })
            .collect())
    }

    fn blob(&mut self, what: &'static str) -> Result<Bytes, WireError> {
        let len = self.u32(what)? as usize;
        self.need(len, what)?;
        Ok(self.body.split_to(len))
    }

    pub(super) fn finish(self) -> Result<(), WireError> {
        match self.body.remaining() {
            0 => Ok(()),
            n => Err(WireError::Trailing(n)),
        }
    }
}

/// Writes a string, cut to [`MAX_STRING`] bytes at a character boundary
/// (only free text such as an error's detail can be that long).
fn put_string(dst: &mut BytesMut, value: &str) {
    let mut len = value.len().min(MAX_STRING);
    while !value.is_char_boundary(len) {
        len -= 1;
    }
    dst.put_u16_le(len as u16);
    dst.put_slice(&value.as_bytes()[..len]);
}

/// Writes an epoch history. One longer than [`MAX_EPOCHS`] is refused, not
/// cut: a history missing its newest epochs would match the wrong log.
fn put_epochs(dst: &mut BytesMut, epochs: &[EpochStart]) -> Result<(), WireError> {
    if epochs.len() > MAX_EPOCHS {
        return Err(WireError::TooManyEpochs(epochs.len()));
    }
    dst.put_u32_le(epochs.len() as u32);
    for entry in epochs {
        dst.put_u64_le(entry.epoch);
        dst.put_u64_le(entry.first_lsn);
    }
    Ok(())
}

fn put_blob(dst: &mut BytesMut, value: &Bytes) {
    dst.put_u32_le(value.len() as u32);
    dst.put_slice(value);
}

impl Message {
    pub(super) fn type_byte(&self) -> u8 {
        match self {
            Self::Hello { .. } => 1,
            Self::HelloAck { .. } => 2,
            Self::WalBatch { .. } => 3,
            Self::Barrier { .. } => 4,
            Self::DurableAck { .. } => 5,
            Self::Heartbeat { .. } => 6,
            Self::HeartbeatAck { .. } => 7,
            Self::RebuildBegin { .. } => 8,
            Self::RebuildChunk { .. } => 9,
            Self::RebuildDone { .. } => 10,
            Self::RebuildInstalled { .. } => 11,
            Self::Truncate { .. } => 12,
            Self::Truncated { .. } => 13,
            Self::Fence { .. } => 14,
            Self::Error { .. } => 15,
            Self::Peer { .. } => 16,
            Self::PullImage => 17,
            Self::PullChunk { .. } => 18,
            Self::PullDone => 19,
            Self::PullFrames { .. } => 20,
            Self::SumsRequest { .. } => 21,
            Self::RegionSums { .. } => 22,
            Self::VerifyBegin { .. } => 23,
            Self::VerifyReady { .. } => 24,
            Self::VerifyEnd => 25,
        }
    }

    pub(super) fn encode_body(&self, dst: &mut BytesMut) -> Result<(), WireError> {
        match self {
            Self::Hello {
                cluster,
                volume,
                replica,
                session,
                durable_commits,
            } => {
                put_string(dst, cluster);
                put_string(dst, volume);
                put_string(dst, replica);
                dst.put_u64_le(*session);
                dst.put_u8(u8::from(*durable_commits));
            }
            Self::HelloAck {
                replica,
                flushed,
                checkpoint,
                epochs,
                committed,
                partial,
            } => {
                put_string(dst, replica);
                dst.put_u64_le(*flushed);
                dst.put_u64_le(*checkpoint);
                put_epochs(dst, epochs)?;
                dst.put_u64_le(*committed);
                // 0: none; else 1, | 2 chosen by a dirty map, | 4 since known.
                dst.put_u8(match partial {
                    None => 0,
                    Some(p) => 1 | u8::from(p.by_map) << 1 | u8::from(p.since.is_some()) << 2,
                });
                let p = partial.unwrap_or_default();
                dst.put_u64_le(p.source);
                dst.put_u64_le(p.since.unwrap_or(0));
                dst.put_u64_le(p.image_lsn);
                dst.put_u64_le(p.cursor);
            }
            Self::Peer {
                cluster,
                volume,
                replica,
            } => {
                put_string(dst, cluster);
                put_string(dst, volume);
                put_string(dst, replica);
            }
            Self::PullImage | Self::PullDone | Self::VerifyEnd => {}
            Self::VerifyBegin {
                cluster,
                volume,
                replica,
                lsn,
            } => {
                put_string(dst, cluster);
                put_string(dst, volume);
                put_string(dst, replica);
                dst.put_u64_le(*lsn);
            }
            Self::VerifyReady { lsn } => dst.put_u64_le(*lsn),
            Self::PullFrames { after } => dst.put_u64_le(*after),
            Self::PullChunk { offset, len } => {
                dst.put_u64_le(*offset);
                dst.put_u32_le(*len);
            }
            Self::WalBatch {
                session,
                first_lsn,
                last_lsn,
                committed,
                frames,
            } => {
                dst.put_u64_le(*session);
                dst.put_u64_le(*first_lsn);
                dst.put_u64_le(*last_lsn);
                dst.put_u64_le(*committed);
                put_blob(dst, frames);
            }
            Self::Barrier { id, lsn, committed } => {
                dst.put_u64_le(*id);
                dst.put_u64_le(*lsn);
                dst.put_u64_le(*committed);
            }
            Self::DurableAck {
                durable,
                barrier,
                committed,
            } => {
                dst.put_u64_le(*durable);
                dst.put_u8(u8::from(barrier.is_some()));
                dst.put_u64_le(barrier.unwrap_or(0));
                dst.put_u64_le(*committed);
            }
            Self::Heartbeat { seq, committed } => {
                dst.put_u64_le(*seq);
                dst.put_u64_le(*committed);
            }
            Self::HeartbeatAck { seq, durable } => {
                dst.put_u64_le(*seq);
                dst.put_u64_le(*durable);
            }
            Self::RebuildBegin {
                session,
                kind,
                image_lsn,
                image_bytes,
                install,
            } => {
                dst.put_u64_le(*session);
                dst.put_u8(match kind {
                    ImageKind::Snapshot => 1,
                    ImageKind::FullBase => 2,
                });
                dst.put_u64_le(*image_lsn);
                dst.put_u64_le(*image_bytes);
                match install {
                    Install::Staging => dst.put_u8(0),
                    Install::InPlace {
                        source,
                        since,
                        apply_through,
                        by_map,
                    } => {
                        dst.put_u8(1 | u8::from(*by_map) << 1 | u8::from(since.is_some()) << 2);
                        dst.put_u64_le(*source);
                        dst.put_u64_le(since.unwrap_or(0));
                        dst.put_u64_le(*apply_through);
                    }
                }
            }
            Self::SumsRequest {
                session,
                offset,
                len,
                region_bytes,
            } => {
                dst.put_u64_le(*session);
                dst.put_u64_le(*offset);
                dst.put_u64_le(*len);
                dst.put_u64_le(*region_bytes);
            }
            Self::RegionSums {
                session,
                offset,
                sums,
            } => {
                dst.put_u64_le(*session);
                dst.put_u64_le(*offset);
                put_blob(dst, sums);
            }
            Self::RebuildChunk {
                session,
                offset,
                data,
            } => {
                dst.put_u64_le(*session);
                dst.put_u64_le(*offset);
                put_blob(dst, data);
            }
            Self::RebuildDone {
                session,
                image_lsn,
                checksum,
                epochs,
            } => {
                dst.put_u64_le(*session);
                dst.put_u64_le(*image_lsn);
                dst.put_u32_le(*checksum);
                put_epochs(dst, epochs)?;
            }
            Self::RebuildInstalled { session, image_lsn } => {
                dst.put_u64_le(*session);
                dst.put_u64_le(*image_lsn);
            }
            Self::Truncate { session, to } | Self::Truncated { session, to } => {
                dst.put_u64_le(*session);
                dst.put_u64_le(*to);
            }
            Self::Fence { current_epoch } => dst.put_u64_le(*current_epoch),
            Self::Error { code, message } => {
                dst.put_u16_le(*code);
                put_string(dst, message);
            }
        }
        Ok(())
    }

    pub(super) fn decode_body(kind: u8, r: &mut Reader) -> Result<Self, WireError> {
        Ok(match kind {
            1 => Self::Hello {
                cluster: r.string("cluster")?,
                volume: r.string("volume")?,
                replica: r.string("replica")?,
                session: r.u64("session")?,
                durable_commits: match r.u8("durable_commits")? {
                    0 => false,
                    1 => true,
                    value => {
                        return Err(WireError::BadValue {
                            field: "durable_commits",
                            value,
                        })
                    }
                },
            },
            2 => Self::HelloAck {
                replica: r.string("replica")?,
                flushed: r.u64("flushed")?,
                checkpoint: r.u64("checkpoint")?,
                epochs: r.epochs("epochs")?,
                committed: r.u64("committed")?,
                partial: {
                    let flag = r.u8("partial flag")?;
                    let source = r.u64("partial source")?;
                    let since = r.u64("partial since")?;
                    let image = crate::PartialImage {
                        source,
                        since: (flag & 4 != 0).then_some(since),
                        image_lsn: r.u64("partial image lsn")?,
                        cursor: r.u64("partial cursor")?,
                        by_map: flag & 2 != 0,
                    };
                    match flag {
                        0 => None,
                        1..=7 if flag & 1 == 1 => Some(image),
                        value => {
                            return Err(WireError::BadValue {
                                field: "partial flag",
                                value,
                            })
                        }
                    }
                },
            },
            3 => Self::WalBatch {
                session: r.u64("session")?,
                first_lsn: r.u64("first_lsn")?,
                last_lsn: r.u64("last_lsn")?,
                committed: r.u64("committed")?,
                frames: r.blob("frames")?,
            },
            4 => Self::Barrier {
                id: r.u64("id")?,
                lsn: r.u64("lsn")?,
                committed: r.u64("committed")?,
            },
            5 => {
                let durable = r.u64("durable")?;
                let has_barrier = r.u8("barrier flag")?;
                let barrier = r.u64("barrier")?;
                let barrier = match has_barrier {
                    0 => None,
                    1 => Some(barrier),
                    value => {
                        return Err(WireError::BadValue {
                            field: "barrier flag",
                            value,
                        })
                    }
                };
                Self::DurableAck {
                    durable,
                    barrier,
                    committed: r.u64("committed")?,
                }
            }
            6 => Self::Heartbeat {
                seq: r.u64("seq")?,
                committed: r.u64("committed")?,
            },
            7 => Self::HeartbeatAck {
                seq: r.u64("seq")?,
                durable: r.u64("durable")?,
            },
            8 => {
                let session = r.u64("session")?;
                let kind = match r.u8("image kind")? {
                    1 => ImageKind::Snapshot,
                    2 => ImageKind::FullBase,
                    value => {
                        return Err(WireError::BadValue {
                            field: "image kind",
                            value,
                        })
                    }
                };
                let image_lsn = r.u64("image_lsn")?;
                let image_bytes = r.u64("image_bytes")?;
                let install = match r.u8("install")? {
                    0 => Install::Staging,
                    flag @ 1..=7 if flag & 1 == 1 => Install::InPlace {
                        source: r.u64("source")?,
                        since: {
                            let since = r.u64("since")?;
                            (flag & 4 != 0).then_some(since)
                        },
                        apply_through: r.u64("apply_through")?,
                        by_map: flag & 2 != 0,
                    },
                    value => {
                        return Err(WireError::BadValue {
                            field: "install",
                            value,
                        })
                    }
                };
                Self::RebuildBegin {
                    session,
                    kind,
                    image_lsn,
                    image_bytes,
                    install,
                }
            }
            9 => Self::RebuildChunk {
                session: r.u64("session")?,
                offset: r.u64("offset")?,
                data: r.blob("data")?,
            },
            10 => Self::RebuildDone {
                session: r.u64("session")?,
                image_lsn: r.u64("image_lsn")?,
                checksum: r.u32("checksum")?,
                epochs: r.epochs("epochs")?,
            },
            11 => Self::RebuildInstalled {
                session: r.u64("session")?,
                image_lsn: r.u64("image_lsn")?,
            },
            12 => Self::Truncate {
                session: r.u64("session")?,
                to: r.u64("to")?,
            },
            13 => Self::Truncated {
                session: r.u64("session")?,
                to: r.u64("to")?,
            },
            14 => Self::Fence {
                current_epoch: r.u64("current_epoch")?,
            },
            15 => Self::Error {
                code: r.u16("code")?,
                message: r.string("message")?,
            },
            16 => Self::Peer {
                cluster: r.string("cluster")?,
                volume: r.string("volume")?,
                replica: r.string("replica")?,
            },
            17 => Self::PullImage,
            18 => Self::PullChunk {
                offset: r.u64("offset")?,
                len: r.u32("len")?,
            },
            19 => Self::PullDone,
            20 => Self::PullFrames {
                after: r.u64("after")?,
            },
            21 => Self::SumsRequest {
                session: r.u64("session")?,
                offset: r.u64("offset")?,
                len: r.u64("len")?,
                region_bytes: r.u64("region_bytes")?,
            },
            23 => Self::VerifyBegin {
                cluster: r.string("cluster")?,
                volume: r.string("volume")?,
                replica: r.string("replica")?,
                lsn: r.u64("lsn")?,
            },
            24 => Self::VerifyReady { lsn: r.u64("lsn")? },
            25 => Self::VerifyEnd,
            22 => Self::RegionSums {
                session: r.u64("session")?,
                offset: r.u64("offset")?,
                sums: r.blob("sums")?,
            },
            other => return Err(WireError::UnknownType(other)),
        })
    }
}
