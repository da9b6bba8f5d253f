//! Reading frames back: planned chunks of whole segments, raw or decoded.

use super::*;

impl Wal {
    /// Splits `(from, to]` into reads of whole frames, each at most `chunk_bytes`
    /// (or one frame, if a frame is larger).
    pub fn plan_read(
        &self,
        from: u64,
        to: u64,
        chunk_bytes: usize,
    ) -> Result<Vec<ReadChunk>, WalError> {
        let writer = self.writer();
        if from < writer.tail {
            return Err(WalError::Recycled {
                from,
                tail: writer.tail,
            });
        }
        if to > writer.head {
            return Err(WalError::BeyondHead {
                to,
                head: writer.head,
            });
        }
        let mut chunks = Vec::new();
        for segment in &writer.segments {
            if segment.is_empty() || segment.last() <= from || segment.first > to {
                continue;
            }
            let path = Arc::new(segment.path.clone());
            let mut lsn = (from + 1).max(segment.first);
            let end = to.min(segment.last());
            while lsn <= end {
                let start = segment.offset_of(lsn);
                let limit = start + chunk_bytes as u64;
                // Last frame that ends within the limit; at least one frame.
                let first_index = (lsn - segment.first) as usize;
                let end_index = (end - segment.first) as usize;
                let fits = segment.offsets[first_index + 1..=end_index]
                    .partition_point(|&offset| offset <= limit);
                let mut last = lsn + fits as u64;
                if segment.offset_of(last + 1) > limit && last > lsn {
                    last -= 1;
                }
                let stop = segment.offset_of(last + 1);
                chunks.push(ReadChunk {
                    path: Arc::clone(&path),
                    offset: start,
                    len: (stop - start) as usize,
                    first_lsn: lsn,
                    last_lsn: last,
                });
                lsn = last + 1;
            }
        }
        Ok(chunks)
    }

    /// Reads the encoded frames after `from`, up to `to`, as one buffer of at
    /// most `max_bytes` (at least one frame). Returns the bytes and the last
    /// LSN they hold. Frames are not decoded: whoever applies them checks them.
    pub fn read_raw(&self, from: u64, to: u64, max_bytes: usize) -> Result<(Bytes, u64), WalError> {
        let chunks = self.plan_read(from, to, max_bytes)?;
        let mut buf = BytesMut::new();
        let mut last = from;
        for chunk in chunks {
            if !buf.is_empty() && buf.len() + chunk.len > max_bytes {
                break;
            }
            let file = self
                .fs()
                .open(chunk.path.as_ref())
                .map_err(io_err("open", &chunk.path))?;
            let start = buf.len();
            buf.resize(start + chunk.len, 0);
            file.read_exact_at(&mut buf[start..], chunk.offset)
                .map_err(io_err("read", &chunk.path))?;
            last = chunk.last_lsn;
        }
        Ok((buf.freeze(), last))
    }

    /// Reads `(from, to]` with positional reads on the calling thread.
    pub fn read_frames(&self, from: u64, to: u64) -> Result<Vec<Frame>, WalError> {
        let mut frames = Vec::new();
        for chunk in self.plan_read(from, to, 4 << 20)? {
            frames.extend(self.read_chunk_frames(&chunk)?);
        }
        Ok(frames)
    }

    /// Reads `(from, to]` like [`Wal::read_frames`], handing the frames to
    /// `f` in batches of about `batch_bytes`, so a caller walking a long log
    /// (a checkpoint after a long pause) holds one batch, not the log.
    pub fn read_frames_batched<E: From<WalError>>(
        &self,
        from: u64,
        to: u64,
        batch_bytes: usize,
        mut f: impl FnMut(Vec<Frame>) -> Result<(), E>,
    ) -> Result<(), E> {
        let mut batch = Vec::new();
        let mut bytes = 0;
        for chunk in self.plan_read(from, to, 4 << 20)? {
            batch.extend(self.read_chunk_frames(&chunk)?);
            bytes += chunk.len;
            if bytes >= batch_bytes {
                f(std::mem::take(&mut batch))?;
                bytes = 0;
            }
        }
        if !batch.is_empty() {
            f(batch)?;
        }
        Ok(())
    }

    pub(super) fn read_chunk_frames(&self, chunk: &ReadChunk) -> Result<Vec<Frame>, WalError> {
        let file = self
            .fs()
            .open(chunk.path.as_ref())
            .map_err(io_err("open", &chunk.path))?;
        let mut buf = vec![0u8; chunk.len];
        file.read_exact_at(&mut buf, chunk.offset)
            .map_err(io_err("read", &chunk.path))?;
        frame::decode_all(&Bytes::from(buf), chunk.first_lsn).map_err(|(lsn, error)| {
            WalError::Corrupt {
                path: chunk.path.to_path_buf(),
                offset: chunk.offset,
                lsn,
                error,
            }
        })
    }
}
