//! The codec that frames messages: a header (length, version, type,
//! epoch) and the body ([`super::body`]), checked against the maximum
//! before any buffer grows.

use super::body::Reader;
use super::*;

impl Decoder for WireCodec {
    type Item = Envelope;
    type Error = WireError;

    fn decode(&mut self, src: &mut BytesMut) -> Result<Option<Envelope>, WireError> {
        if src.len() < 4 {
            // Room for a header and a small message, so the next read takes
            // them in one call rather than a byte or a few at a time.
            src.reserve(READ_AHEAD);
            return Ok(None);
        }
        let len = u32::from_le_bytes([src[0], src[1], src[2], src[3]]) as usize;
        if len > self.max_frame {
            return Err(WireError::TooLarge {
                len,
                max: self.max_frame,
            });
        }
        if len < HEADER {
            return Err(WireError::TooShort(len));
        }
        if src.len() < 4 + len {
            // The whole frame, and room after it for the next header.
            src.reserve(4 + len - src.len() + READ_AHEAD);
            return Ok(None);
        }
        src.advance(4);
        let mut frame = if len >= BULK_FRAME {
            // Copied out: the read buffer stays its own, and is reused in
            // place for the next frame (see `Received`).
            let frame = Received::copy(&src[..len]);
            src.advance(len);
            frame
        } else {
            src.split_to(len).freeze()
        };
        let version = frame.get_u8();
        if version != PROTOCOL_VERSION {
            return Err(WireError::Version(version));
        }
        let kind = frame.get_u8();
        let epoch = frame.get_u64_le();
        let mut reader = Reader { body: frame };
        let message = Message::decode_body(kind, &mut reader)?;
        reader.finish()?;
        Ok(Some(Envelope { epoch, message }))
    }
}

impl WireCodec {
    /// Encodes `item` into `dst` like [`Encoder::encode`], except for the
    /// payload of a `WalBatch` or `RebuildChunk`, which it returns instead of
    /// copying: the caller writes `dst` and then the payload (vectored), and
    /// the bytes on the wire are the same. Other messages are encoded whole
    /// and return `None`.
    pub fn encode_head(
        &self,
        item: Envelope,
        dst: &mut BytesMut,
    ) -> Result<Option<Bytes>, WireError> {
        let Envelope { epoch, mut message } = item;
        let payload = match &mut message {
            Message::WalBatch { frames, .. } => std::mem::take(frames),
            Message::RebuildChunk { data, .. } => std::mem::take(data),
            _ => {
                let mut codec = *self;
                codec.encode(Envelope { epoch, message }, dst)?;
                return Ok(None);
            }
        };
        let start = dst.len();
        let mut codec = *self;
        codec.encode(Envelope { epoch, message }, dst)?;
        // The blob is the body's last field: its u32 length ends the head.
        let len = dst.len() - start - 4 + payload.len();
        if len > self.max_frame {
            dst.truncate(start);
            return Err(WireError::TooLarge {
                len,
                max: self.max_frame,
            });
        }
        dst[start..start + 4].copy_from_slice(&(len as u32).to_le_bytes());
        let end = dst.len();
        dst[end - 4..].copy_from_slice(&(payload.len() as u32).to_le_bytes());
        Ok(Some(payload))
    }
}

impl Encoder<Envelope> for WireCodec {
    type Error = WireError;

    fn encode(&mut self, item: Envelope, dst: &mut BytesMut) -> Result<(), WireError> {
        let start = dst.len();
        dst.put_u32_le(0);
        dst.put_u8(PROTOCOL_VERSION);
        dst.put_u8(item.message.type_byte());
        dst.put_u64_le(item.epoch);
        if let Err(error) = item.message.encode_body(dst) {
            dst.truncate(start);
            return Err(error);
        }
        let len = dst.len() - start - 4;
        if len > self.max_frame {
            dst.truncate(start);
            return Err(WireError::TooLarge {
                len,
                max: self.max_frame,
            });
        }
        dst[start..start + 4].copy_from_slice(&(len as u32).to_le_bytes());
        Ok(())
    }
}
