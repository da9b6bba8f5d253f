//! Received frames: large ones copied out of the read buffer into
//! buffers reused across the process.

use super::*;

/// Frames at least this large (catch-up batches, image chunks) are copied
/// out of the read buffer into a [`Received`] buffer.
pub(super) const BULK_FRAME: usize = 64 << 10;

/// Received buffers kept for reuse, at most [`FREE_BYTES`] in all, none
/// larger than [`FREE_BUFFER_MAX`].
const FREE_BYTES: usize = 32 << 20;
const FREE_BUFFER_MAX: usize = 4 << 20;

/// The free received buffers of the whole process.
fn free_received() -> MutexGuard<'static, Vec<Vec<u8>>> {
    static FREE: Mutex<Vec<Vec<u8>>> = Mutex::new(Vec::new());
    FREE.lock().unwrap_or_else(PoisonError::into_inner)
}

/// A large received frame's buffer, back on the free list when the last
/// `Bytes` of it drops.
///
/// Splitting a frame off the read buffer shares that buffer's allocation,
/// so the next frame's room was a new allocation whenever a consumer still
/// held the last one (a base install's writer queue, a batch in the dirty
/// map): glibc handed a freed MiB back to the kernel, and the next one
/// faulted in fresh zeroed pages. Measured on the project's VM (P2, a
/// 512 MiB full base): glibc tuned to keep freed memory
/// (`MALLOC_TRIM_THRESHOLD_`, `MALLOC_MMAP_THRESHOLD_`) took walship's
/// system CPU from 1.7-2.1 to ~1.0 s/GiB, the raw pipeline's figure. One
/// copy per byte received (user CPU) avoids the churn without tuning, and
/// the read buffer is reused in place.
pub(super) struct Received(Vec<u8>);

impl Received {
    /// `bytes` in the smallest free buffer that holds them, or a new one.
    pub(super) fn copy(bytes: &[u8]) -> Bytes {
        let reused = {
            let mut free = free_received();
            let best = (0..free.len())
                .filter(|&i| free[i].capacity() >= bytes.len())
                .min_by_key(|&i| free[i].capacity());
            best.map(|i| free.swap_remove(i))
        };
        let mut buf = reused.unwrap_or_else(|| Vec::with_capacity(bytes.len()));
        buf.clear();
        buf.extend_from_slice(bytes);
        Bytes::from_owner(Received(buf))
    }
}

impl AsRef<[u8]> for Received {
    fn as_ref(&self) -> &[u8] {
        &self.0
    }
}

impl Drop for Received {
    fn drop(&mut self) {
        let buf = std::mem::take(&mut self.0);
        if buf.capacity() > FREE_BUFFER_MAX {
            return;
        }
        let mut free = free_received();
        let held: usize = free.iter().map(Vec::capacity).sum();
        if held + buf.capacity() <= FREE_BYTES {
            free.push(buf);
        }
    }
}
