//! The superblock: the volume's identity and its trusted checkpoint.
//!
//! Layout (little-endian), one 4 KiB file `superblock`:
//!
//! | offset | size | field |
//! | --- | --- | --- |
//! | 0 | 8 | magic `WALSHIP1` |
//! | 8 | 4 | format version (1) |
//! | 12 | 4 | block size (4096) |
//! | 16 | 16 | volume uuid |
//! | 32 | 8 | block count |
//! | 40 | 8 | checkpoint LSN: the extent holds every frame up to it |
//! | 48 | 8 | epoch |
//! | 56 | 8 | generation: names the extent file and the WAL segments |
//! | 64 | 4 | crc32c over bytes `[0, 64)` |
//!
//! It is replaced atomically: written to `superblock.tmp`, fsynced, renamed
//! over `superblock`, directory fsynced. A superblock that reads back with a
//! good magic, version and crc is a trusted checkpoint.

use crate::frame::BLOCK_SIZE;
use crate::fs::Fs;
use std::fs::File;
use std::io::Read;
use std::path::{Path, PathBuf};

const MAGIC: &[u8; 8] = b"WALSHIP1";
const VERSION: u32 = 1;
const ENCODED: usize = 68;
/// The superblock's file name in a store's directory.
const FILE: &str = "superblock";

/// The superblock's fields.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Superblock {
    /// Volume identity.
    pub uuid: [u8; 16],
    /// Blocks in the volume.
    pub block_count: u64,
    /// LSN the extent is known to hold.
    pub checkpoint: u64,
    /// Epoch at the last commit.
    pub epoch: u64,
    /// Generation of the extent file and WAL.
    pub generation: u64,
}

/// A superblock that cannot be trusted or written.
#[derive(Debug, thiserror::Error)]
pub enum SuperblockError {
    /// No superblock exists.
    #[error("no superblock at {0}")]
    Missing(PathBuf),
    /// It exists but fails its checks.
    #[error("superblock {path} is not trustworthy: {reason}")]
    Corrupt {
        /// The file.
        path: PathBuf,
        /// What failed.
        reason: String,
    },
    /// A filesystem call failed.
    #[error("superblock {op} {path}: {source}")]
    Io {
        /// What was being done.
        op: &'static str,
        /// The file.
        path: PathBuf,
        /// OS error.
        #[source]
        source: std::io::Error,
    },
}

impl Superblock {
    /// Encodes the fields with their crc.
    pub fn encode(&self) -> [u8; ENCODED] {
        let mut buf = [0u8; ENCODED];
        buf[0..8].copy_from_slice(MAGIC);
        buf[8..12].copy_from_slice(&VERSION.to_le_bytes());
        buf[12..16].copy_from_slice(&(BLOCK_SIZE as u32).to_le_bytes());
        buf[16..32].copy_from_slice(&self.uuid);
        buf[32..40].copy_from_slice(&self.block_count.to_le_bytes());
        buf[40..48].copy_from_slice(&self.checkpoint.to_le_bytes());
        buf[48..56].copy_from_slice(&self.epoch.to_le_bytes());
        buf[56..64].copy_from_slice(&self.generation.to_le_bytes());
        let crc = crc32c::crc32c(&buf[..64]);
        buf[64..68].copy_from_slice(&crc.to_le_bytes());
        buf
    }

    /// Decodes and verifies.
    pub fn decode(buf: &[u8]) -> Result<Self, String> {
        if buf.len() < ENCODED {
            return Err(format!("{} bytes, need {ENCODED}", buf.len()));
        }
        if &buf[0..8] != MAGIC {
            return Err("bad magic".into());
        }
        let u32_at =
            |at: usize| u32::from_le_bytes([buf[at], buf[at + 1], buf[at + 2], buf[at + 3]]);
        let u64_at = |at: usize| {
            let mut raw = [0u8; 8];
            raw.copy_from_slice(&buf[at..at + 8]);
            u64::from_le_bytes(raw)
        };
        let stored = u32_at(64);
        let computed = crc32c::crc32c(&buf[..64]);
        if stored != computed {
            return Err(format!(
                "crc mismatch: stored {stored:#010x}, computed {computed:#010x}"
            ));
        }
        if u32_at(8) != VERSION {
            return Err(format!("unsupported version {}", u32_at(8)));
        }
        if u32_at(12) as usize != BLOCK_SIZE {
            return Err(format!("block size {} is not {BLOCK_SIZE}", u32_at(12)));
        }
        let mut uuid = [0u8; 16];
        uuid.copy_from_slice(&buf[16..32]);
        Ok(Self {
            uuid,
            block_count: u64_at(32),
            checkpoint: u64_at(40),
            epoch: u64_at(48),
            generation: u64_at(56),
        })
    }

    /// Path of the superblock in `dir`.
    pub fn path(dir: &Path) -> PathBuf {
        dir.join(FILE)
    }

    /// Reads and verifies the superblock in `dir`.
    pub fn load(dir: &Path) -> Result<Self, SuperblockError> {
        Self::load_in(crate::fs::real(), dir)
    }

    /// [`load`](Self::load) through `fs`.
    pub fn load_in(fs: &dyn Fs, dir: &Path) -> Result<Self, SuperblockError> {
        let path = Self::path(dir);
        let buf = match fs.read(&path) {
            Ok(buf) => buf,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(SuperblockError::Missing(path))
            }
            Err(source) => {
                return Err(SuperblockError::Io {
                    op: "read",
                    path,
                    source,
                })
            }
        };
        Self::decode(&buf).map_err(|reason| SuperblockError::Corrupt { path, reason })
    }

    /// Replaces the superblock in `dir` atomically
    /// ([`durable::rewrite_atomic`](crate::durable::rewrite_atomic)).
    pub fn store(&self, dir: &Path) -> Result<(), SuperblockError> {
        self.store_in(crate::fs::real(), dir)
    }

    /// [`store`](Self::store) through `fs`.
    pub fn store_in(&self, fs: &dyn Fs, dir: &Path) -> Result<(), SuperblockError> {
        let mut block = vec![0u8; BLOCK_SIZE];
        block[..ENCODED].copy_from_slice(&self.encode());
        crate::durable::rewrite_atomic(fs, dir, FILE, &block).map_err(|source| {
            SuperblockError::Io {
                op: "replace",
                path: Self::path(dir),
                source,
            }
        })
    }
}

/// 16 bytes from the kernel's random source, for volume identities.
pub fn new_uuid() -> std::io::Result<[u8; 16]> {
    let mut uuid = [0u8; 16];
    File::open("/dev/urandom")?.read_exact(&mut uuid)?;
    Ok(uuid)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Superblock {
        Superblock {
            uuid: [7; 16],
            block_count: 1024,
            checkpoint: 99,
            epoch: 3,
            generation: 2,
        }
    }

    #[test]
    fn store_and_load_round_trip() {
        let dir = tempfile::tempdir().unwrap();
        sample().store(dir.path()).unwrap();
        assert_eq!(Superblock::load(dir.path()).unwrap(), sample());
        assert!(!dir.path().join("superblock.tmp").exists());
    }

    #[test]
    fn any_flipped_byte_makes_it_untrusted() {
        let encoded = sample().encode();
        for i in 0..encoded.len() {
            let mut bad = encoded;
            bad[i] ^= 0x04;
            assert!(Superblock::decode(&bad).is_err(), "flip at {i}");
        }
        let dir = tempfile::tempdir().unwrap();
        assert!(matches!(
            Superblock::load(dir.path()),
            Err(SuperblockError::Missing(_))
        ));
    }
}
