//! The WAL frame: one record of the write-ahead log, on disk and on the wire.
//!
//! Layout, little-endian, byte offsets:
//!
//! | offset | size | field |
//! | --- | --- | --- |
//! | 0 | 8 | `lsn` |
//! | 8 | 8 | `epoch` |
//! | 16 | 1 | `kind` (1 write, 2 trim, 3 barrier) |
//! | 17 | 1 | `flags` (reserved, 0) |
//! | 18 | 8 | `lba` (in 4 KiB blocks) |
//! | 26 | 4 | `len`: payload length |
//! | 30 | `len` | payload |
//! | 30 + `len` | 4 | crc32c over bytes `[0, 30 + len)` |
//!
//! A write's payload is whole 4 KiB blocks starting at `lba`; a trim's payload
//! is the block count as a little-endian u64; a barrier has none.
//!
//! Parsing is two-phase, like mini-redis: [`check`] reads only the header and
//! answers "complete frame of n bytes" or [`FrameError::Incomplete`] cheaply,
//! refusing an oversized length before anything is allocated; [`Frame::decode`]
//! then verifies the checksum and slices the payload out of the buffer without
//! copying.

use bytes::{BufMut, Bytes, BytesMut};

/// Header length in bytes.
pub const HEADER_LEN: usize = 30;
/// Trailer (crc32c) length in bytes.
pub const TRAILER_LEN: usize = 4;
/// Largest payload a frame may carry.
pub const MAX_PAYLOAD: u32 = 16 << 20;
/// Block size of the volume.
pub const BLOCK_SIZE: usize = 4096;

/// What a frame does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum FrameKind {
    /// Write whole blocks at `lba`.
    Write = 1,
    /// Zero `count` blocks at `lba`.
    Trim = 2,
    /// An ordering point with no data.
    Barrier = 3,
}

impl FrameKind {
    fn from_byte(byte: u8) -> Option<Self> {
        match byte {
            1 => Some(Self::Write),
            2 => Some(Self::Trim),
            3 => Some(Self::Barrier),
            _ => None,
        }
    }
}

/// A frame that could not be parsed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    /// More bytes are needed to hold the whole frame.
    #[error("incomplete frame: have {have} bytes, need {need}")]
    Incomplete {
        /// Bytes available.
        have: usize,
        /// Bytes the frame needs (the header's worth when the header itself is short).
        need: usize,
    },
    /// The payload length exceeds [`MAX_PAYLOAD`].
    #[error("frame payload length {len} exceeds the maximum {max}")]
    Oversized {
        /// Declared length.
        len: u32,
        /// The maximum.
        max: u32,
    },
    /// Unknown kind byte.
    #[error("unknown frame kind {0}")]
    BadKind(u8),
    /// The checksum does not match.
    #[error("checksum mismatch in frame claiming lsn {lsn}: stored {stored:#010x}, computed {computed:#010x}")]
    Checksum {
        /// LSN the header claims (not trustworthy).
        lsn: u64,
        /// Stored crc.
        stored: u32,
        /// Computed crc.
        computed: u32,
    },
    /// A valid frame with an LSN other than the next expected one.
    #[error("lsn discontinuity: expected {expected}, found {found}")]
    Discontinuity {
        /// The next LSN expected.
        expected: u64,
        /// The LSN found.
        found: u64,
    },
    /// A write whose payload is not whole blocks, or a trim without its count.
    #[error("malformed {kind:?} payload of {len} bytes")]
    BadPayload {
        /// Kind.
        kind: FrameKind,
        /// Payload length.
        len: u32,
    },
}

/// One WAL record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frame {
    /// Log sequence number.
    pub lsn: u64,
    /// Epoch it was written in.
    pub epoch: u64,
    /// What it does.
    pub kind: FrameKind,
    /// Reserved flags.
    pub flags: u8,
    /// First block.
    pub lba: u64,
    /// Payload (see the module docs).
    pub payload: Bytes,
}

fn read_u64(buf: &[u8], at: usize) -> u64 {
    let mut raw = [0u8; 8];
    raw.copy_from_slice(&buf[at..at + 8]);
    u64::from_le_bytes(raw)
}

fn read_u32(buf: &[u8], at: usize) -> u32 {
    let mut raw = [0u8; 4];
    raw.copy_from_slice(&buf[at..at + 4]);
    u32::from_le_bytes(raw)
}

/// Phase one: the length of the complete frame at the start of `buf`.
/// Reads only the header; never allocates.
pub fn check(buf: &[u8]) -> Result<usize, FrameError> {
    if buf.len() < HEADER_LEN {
        return Err(FrameError::Incomplete {
            have: buf.len(),
            need: HEADER_LEN,
        });
    }
    let len = read_u32(buf, 26);
    if len > MAX_PAYLOAD {
        return Err(FrameError::Oversized {
            len,
            max: MAX_PAYLOAD,
        });
    }
    let total = HEADER_LEN + len as usize + TRAILER_LEN;
    if buf.len() < total {
        return Err(FrameError::Incomplete {
            have: buf.len(),
            need: total,
        });
    }
    Ok(total)
}

/// The LSN a header claims, without verifying anything.
pub fn peek_lsn(buf: &[u8]) -> Option<u64> {
    (buf.len() >= 8).then(|| read_u64(buf, 0))
}

impl Frame {
    /// A write of whole blocks.
    pub fn write(lsn: u64, epoch: u64, lba: u64, data: Bytes) -> Self {
        Self {
            lsn,
            epoch,
            kind: FrameKind::Write,
            flags: 0,
            lba,
            payload: data,
        }
    }

    /// A trim of `count` blocks.
    pub fn trim(lsn: u64, epoch: u64, lba: u64, count: u64) -> Self {
        let payload = Bytes::copy_from_slice(&count.to_le_bytes());
        Self {
            lsn,
            epoch,
            kind: FrameKind::Trim,
            flags: 0,
            lba,
            payload,
        }
    }

    /// A barrier.
    pub fn barrier(lsn: u64, epoch: u64) -> Self {
        Self {
            lsn,
            epoch,
            kind: FrameKind::Barrier,
            flags: 0,
            lba: 0,
            payload: Bytes::new(),
        }
    }

    /// Bytes the encoded frame takes.
    pub fn encoded_len(&self) -> usize {
        HEADER_LEN + self.payload.len() + TRAILER_LEN
    }

    /// Number of blocks a trim covers, or the blocks a write carries.
    pub fn block_count(&self) -> u64 {
        match self.kind {
            FrameKind::Write => (self.payload.len() / BLOCK_SIZE) as u64,
            FrameKind::Trim => {
                let mut raw = [0u8; 8];
                raw.copy_from_slice(&self.payload[..8.min(self.payload.len())]);
                u64::from_le_bytes(raw)
            }
            FrameKind::Barrier => 0,
        }
    }

    /// Checks the payload's shape for the kind.
    pub fn validate(&self) -> Result<(), FrameError> {
        let len = self.payload.len();
        let ok = match self.kind {
            FrameKind::Write => len > 0 && len.is_multiple_of(BLOCK_SIZE),
            FrameKind::Trim => len == 8,
            FrameKind::Barrier => len == 0,
        };
        if !ok || len > MAX_PAYLOAD as usize {
            return Err(FrameError::BadPayload {
                kind: self.kind,
                len: len as u32,
            });
        }
        Ok(())
    }

    /// Appends the encoded frame to `dst`.
    pub fn encode(&self, dst: &mut BytesMut) {
        let start = dst.len();
        dst.reserve(self.encoded_len());
        dst.put_u64_le(self.lsn);
        dst.put_u64_le(self.epoch);
        dst.put_u8(self.kind as u8);
        dst.put_u8(self.flags);
        dst.put_u64_le(self.lba);
        dst.put_u32_le(self.payload.len() as u32);
        dst.put_slice(&self.payload);
        let crc = crc32c::crc32c(&dst[start..]);
        dst.put_u32_le(crc);
    }

    /// The encoded frame as one buffer.
    pub fn to_bytes(&self) -> Bytes {
        let mut buf = BytesMut::with_capacity(self.encoded_len());
        self.encode(&mut buf);
        buf.freeze()
    }

    /// Phase two: decodes the frame at the start of `buf`, verifying its crc.
    /// The payload is a zero-copy slice of `buf`. Returns the frame and its length.
    pub fn decode(buf: &Bytes) -> Result<(Frame, usize), FrameError> {
        let total = check(buf)?;
        let body = total - TRAILER_LEN;
        let stored = read_u32(buf, body);
        let computed = crc32c::crc32c(&buf[..body]);
        let lsn = read_u64(buf, 0);
        if stored != computed {
            return Err(FrameError::Checksum {
                lsn,
                stored,
                computed,
            });
        }
        let kind = FrameKind::from_byte(buf[16]).ok_or(FrameError::BadKind(buf[16]))?;
        let frame = Frame {
            lsn,
            epoch: read_u64(buf, 8),
            kind,
            flags: buf[17],
            lba: read_u64(buf, 18),
            payload: buf.slice(HEADER_LEN..body),
        };
        frame.validate()?;
        Ok((frame, total))
    }
}

/// Decodes every frame in `buf`, which must hold whole frames with
/// consecutive LSNs starting at `first_lsn`.
pub fn decode_all(buf: &Bytes, first_lsn: u64) -> Result<Vec<Frame>, (u64, FrameError)> {
    let mut frames = Vec::new();
    let mut at = 0;
    let mut expected = first_lsn;
    while at < buf.len() {
        let rest = buf.slice(at..);
        let (frame, len) = Frame::decode(&rest).map_err(|e| (expected, e))?;
        if frame.lsn != expected {
            return Err((
                expected,
                FrameError::Discontinuity {
                    expected,
                    found: frame.lsn,
                },
            ));
        }
        expected += 1;
        at += len;
        frames.push(frame);
    }
    Ok(frames)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn block(fill: u8) -> Bytes {
        Bytes::from(vec![fill; BLOCK_SIZE])
    }

    #[test]
    fn round_trip_keeps_every_field_and_slices_payload() {
        let frame = Frame::write(7, 3, 42, block(9));
        let bytes = frame.to_bytes();
        assert_eq!(bytes.len(), HEADER_LEN + BLOCK_SIZE + TRAILER_LEN);
        let (decoded, len) = Frame::decode(&bytes).unwrap();
        assert_eq!((decoded.clone(), len), (frame, bytes.len()));
        assert_eq!(
            decoded.payload.as_ptr(),
            bytes[HEADER_LEN..].as_ptr(),
            "zero-copy"
        );
    }

    #[test]
    fn every_flipped_byte_is_detected() {
        let bytes = Frame::trim(1, 1, 0, 16).to_bytes();
        for i in 0..bytes.len() {
            let mut bad = bytes.to_vec();
            bad[i] ^= 0x40;
            let bad = Bytes::from(bad);
            assert!(Frame::decode(&bad).is_err(), "flip at {i} went unnoticed");
        }
    }

    #[test]
    fn check_is_cheap_and_refuses_oversized_lengths() {
        let bytes = Frame::barrier(1, 1).to_bytes();
        assert_eq!(
            check(&bytes[..10]),
            Err(FrameError::Incomplete {
                have: 10,
                need: HEADER_LEN
            })
        );
        assert_eq!(
            check(&bytes[..HEADER_LEN + 1]),
            Err(FrameError::Incomplete {
                have: HEADER_LEN + 1,
                need: HEADER_LEN + TRAILER_LEN
            })
        );
        let mut huge = bytes.to_vec();
        huge[26..30].copy_from_slice(&u32::MAX.to_le_bytes());
        assert_eq!(
            check(&huge),
            Err(FrameError::Oversized {
                len: u32::MAX,
                max: MAX_PAYLOAD
            })
        );
    }

    #[test]
    fn payload_shape_is_checked_per_kind() {
        let bad_write = Frame::write(1, 1, 0, Bytes::from_static(b"short"));
        assert!(matches!(
            bad_write.validate(),
            Err(FrameError::BadPayload { .. })
        ));
        assert_eq!(Frame::trim(1, 1, 5, 9).block_count(), 9);
    }
}
