//! Writing a base image being received, on a thread of its own.

use bytes::Bytes;
use walship_io::{BaseInstall, InPlaceInstall, StoreError};

/// Where an image's chunks go: a staging file, or the replica's own
/// extent (an install in place).
#[derive(Debug)]
pub(crate) enum Sink {
    Staging(BaseInstall),
    InPlace(InPlaceInstall),
}

impl Sink {
    fn write_chunk(&mut self, offset: u64, data: &[u8]) -> Result<(), StoreError> {
        match self {
            Self::Staging(install) => install.write_chunk(offset, data),
            Self::InPlace(install) => install.write_chunk(offset, data),
        }
    }

    pub(crate) fn image_lsn(&self) -> u64 {
        match self {
            Self::Staging(install) => install.image_lsn(),
            Self::InPlace(install) => install.image_lsn(),
        }
    }
}

/// Chunks a base install may have queued for its writer (1 MiB each).
const INSTALL_QUEUE: usize = 8;

/// Writes a base image on its own thread, in arrival order, so the arbiter
/// goes back to reading the socket while the page cache takes the previous
/// chunk: on P2 the replica's one thread did both and was the bottleneck.
/// The queue is bounded (the arbiter waits when the writer is behind), and
/// a write error surfaces on the next chunk or at `finish`.
#[derive(Debug)]
pub(crate) struct InstallWriter {
    chunks: Option<std::sync::mpsc::SyncSender<(u64, Bytes)>>,
    thread: Option<std::thread::JoinHandle<Result<Sink, StoreError>>>,
}

impl InstallWriter {
    pub(crate) fn start(mut install: Sink) -> Self {
        let (tx, rx) = std::sync::mpsc::sync_channel::<(u64, Bytes)>(INSTALL_QUEUE);
        let thread = std::thread::Builder::new()
            .name("walship-install".into())
            .spawn(move || {
                for (offset, data) in rx {
                    install.write_chunk(offset, &data)?;
                }
                Ok(install)
            });
        match thread {
            Ok(thread) => Self {
                chunks: Some(tx),
                thread: Some(thread),
            },
            // No thread to be had: fail the install at its first chunk.
            Err(e) => {
                tracing::error!(error = %e, "install writer thread");
                Self {
                    chunks: None,
                    thread: None,
                }
            }
        }
    }

    pub(crate) fn write(&mut self, offset: u64, data: Bytes) -> Result<(), StoreError> {
        let sent = self
            .chunks
            .as_ref()
            .is_some_and(|tx| tx.send((offset, data)).is_ok());
        if sent {
            return Ok(());
        }
        // The writer stopped: its error says why.
        self.finish_now().map(|_| ())
    }

    /// Waits for every queued chunk; returns the install to commit.
    pub(crate) fn finish(mut self) -> Result<Sink, StoreError> {
        self.finish_now()
    }

    fn finish_now(&mut self) -> Result<Sink, StoreError> {
        // (Also what dropping does: see `Drop`.)
        self.chunks = None;
        match self.thread.take().map(std::thread::JoinHandle::join) {
            Some(Ok(result)) => result,
            Some(Err(_)) => Err(StoreError::Io {
                op: "install",
                path: "writer thread".into(),
                source: std::io::Error::other("install writer panicked"),
            }),
            None => Err(StoreError::Io {
                op: "install",
                path: "writer thread".into(),
                source: std::io::Error::other("install writer not running"),
            }),
        }
    }
}

/// Dropping an unfinished writer (a session cancelled, a stop mid-pull)
/// waits for its thread to write what it queued and drop the install: no
/// thread writes to the staging path after the drop, so a later install of
/// the same generation (which truncates that file) starts clean.
impl Drop for InstallWriter {
    fn drop(&mut self) {
        if self.thread.is_some() {
            let _ = self.finish_now();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use walship_io::{Store, StoreOptions, BLOCK_SIZE};

    fn chunk(fill: u8) -> Bytes {
        Bytes::from(vec![fill; BLOCK_SIZE])
    }

    #[test]
    fn the_install_writer_writes_in_order_and_reports_a_bad_chunk() {
        let dir = tempfile::tempdir().unwrap();
        let (store, _) = Store::open(dir.path(), StoreOptions::new(4)).unwrap();
        // In order: everything lands, finish hands the install back.
        let mut writer = InstallWriter::start(Sink::Staging(store.begin_install(0).unwrap()));
        for i in 0..4u8 {
            writer
                .write(u64::from(i) * BLOCK_SIZE as u64, chunk(i))
                .unwrap();
        }
        let Sink::Staging(install) = writer.finish().unwrap() else {
            panic!("a staging install")
        };
        let crc = (0..4u8).fold(0, |crc, i| crc32c::crc32c_append(crc, &chunk(i)));
        store.commit_install(install, crc, 1, &[]).unwrap();
        assert_eq!(store.read(2, 1).unwrap(), chunk(2));
        // Out of order: the writer stops; the error comes back at the latest
        // at finish, and no chunk after it is accepted.
        let mut writer = InstallWriter::start(Sink::Staging(store.begin_install(0).unwrap()));
        writer.write(0, chunk(9)).unwrap();
        let _ = writer.write(3 * BLOCK_SIZE as u64, chunk(9));
        // The writer takes nothing after the bad chunk, so the queue fills
        // and the write after that fails at the latest (no timing involved).
        let refused =
            (0..=INSTALL_QUEUE).any(|_| writer.write(BLOCK_SIZE as u64, chunk(9)).is_err());
        assert!(
            refused,
            "a chunk after the bad one was accepted into a stopped writer"
        );
        assert!(matches!(
            writer.finish(),
            Err(StoreError::ChunkOutOfOrder { .. } | StoreError::Io { .. })
        ));
    }
}
