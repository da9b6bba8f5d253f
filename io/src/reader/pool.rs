//! Read buffers, reused once every consumer has dropped them.
//!
//! A buffer handed out as `Bytes` stays on a lent list; when the pool's
//! handle is the only one left (`Bytes::try_into_mut`), the memory comes back
//! for the next read. At most `max_free` buffers wait for reuse.

use bytes::{Bytes, BytesMut};
use std::sync::{Mutex, MutexGuard, PoisonError};

#[derive(Debug, Default)]
struct Lists {
    free: Vec<BytesMut>,
    lent: Vec<Bytes>,
}

#[derive(Debug)]
pub(crate) struct BufferPool {
    lists: Mutex<Lists>,
    max_free: usize,
}

impl BufferPool {
    pub(crate) fn new(max_free: usize) -> Self {
        Self {
            lists: Mutex::new(Lists::default()),
            max_free: max_free.max(1),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Lists> {
        self.lists.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// A buffer of exactly `len` initialized bytes.
    pub(crate) fn take(&self, len: usize) -> BytesMut {
        self.reclaim();
        let reused = {
            let mut lists = self.lock();
            let fit = lists.free.iter().position(|b| b.capacity() >= len);
            fit.map(|i| lists.free.swap_remove(i))
        };
        let mut buf = reused.unwrap_or_else(|| BytesMut::with_capacity(len));
        if buf.len() >= len {
            buf.truncate(len);
        } else {
            buf.resize(len, 0);
        }
        buf
    }

    /// Remembers a buffer handed to consumers, to reuse it once they drop it.
    pub(crate) fn lend(&self, bytes: &Bytes) {
        self.lock().lent.push(bytes.clone());
    }

    /// Returns a buffer that was never handed out.
    pub(crate) fn give_back(&self, buf: BytesMut) {
        let mut lists = self.lock();
        if lists.free.len() < self.max_free {
            lists.free.push(buf);
        }
    }

    /// Moves every lent buffer no consumer holds any more back to the free list.
    pub(crate) fn reclaim(&self) {
        let mut lists = self.lock();
        let lent = std::mem::take(&mut lists.lent);
        for bytes in lent {
            match bytes.try_into_mut() {
                Ok(buf) if lists.free.len() < self.max_free => lists.free.push(buf),
                Ok(_) => {}
                Err(still_used) => lists.lent.push(still_used),
            }
        }
    }

    pub(crate) fn lent(&self) -> usize {
        self.lock().lent.len()
    }

    pub(crate) fn free(&self) -> usize {
        self.lock().free.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buffers_come_back_only_after_consumers_drop_them() {
        let pool = BufferPool::new(4);
        let bytes = pool.take(4096).freeze();
        pool.lend(&bytes);
        let slice = bytes.slice(10..20);
        drop(bytes);
        pool.reclaim();
        assert_eq!((pool.lent(), pool.free()), (1, 0), "a slice still holds it");
        drop(slice);
        pool.reclaim();
        assert_eq!((pool.lent(), pool.free()), (0, 1));
        let again = pool.take(1000);
        assert_eq!((again.len(), pool.free()), (1000, 0));
    }
}
