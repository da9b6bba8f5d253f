//! Regions of a volume: the unit a delta rebuild compares and moves.
//!
//! A volume is cut into regions of [`region_bytes`] (64 KiB, doubled until
//! a volume has at most [`MAX_REGIONS`]: a 1 TiB volume has 16 Mi regions
//! of 64 KiB, and its dirty map is 2 MiB).
//!
//! - A [`DirtyMap`] is a bit per region, set for every region a write
//!   applied to the extent after `since` touched. The primary keeps one per
//!   replica that is away (see `Store::track_dirty`); the checkpointer marks
//!   it as it applies frames, so a map always covers exactly the writes in
//!   `(since, checkpoint]`, which is what a rebuild from the extent at the
//!   checkpoint needs. Persisted in `DIRTY` with each checkpoint.
//! - A region's checksum ([`region_sum`]) is xxh3-128 of its bytes: a
//!   replica whose history is unknown sends one per region, and the
//!   primary sends the regions whose checksums differ.
//!
//! `DIRTY` format (little-endian): magic `WSDIRTY1`, store generation u64,
//! map count u32, then per map: key (u16 length, UTF-8), since u64,
//! region bytes u64, regions u64, the bits as u64 words; crc32c u32 of all
//! before it. Replaced atomically.

use std::collections::BTreeMap;

/// The smallest region.
pub const MIN_REGION_BYTES: u64 = 64 << 10;
/// Regions a volume has at most: bounds a dirty map at 2 MiB.
pub const MAX_REGIONS: u64 = 1 << 24;
const MAGIC: &[u8; 8] = b"WSDIRTY1";

/// The region size for a volume of `volume_bytes`.
pub fn region_bytes(volume_bytes: u64) -> u64 {
    let mut region = MIN_REGION_BYTES;
    while volume_bytes.div_ceil(region) > MAX_REGIONS {
        region *= 2;
    }
    region
}

/// A region's checksum: xxh3-128 (a collision between two regions that
/// differ would let a rebuild skip one; at 2^-128 per region it is not a
/// practical risk, unlike a 32-bit crc's 2^-32).
pub fn region_sum(data: &[u8]) -> u128 {
    xxhash_rust::xxh3::xxh3_128(data)
}

/// The checksums of the regions of `data`, which starts at a region
/// boundary (the last region may be short: the volume's end).
pub fn region_sums(data: &[u8], region_bytes: u64) -> Vec<u128> {
    data.chunks(region_bytes.max(1) as usize)
        .map(region_sum)
        .collect()
}

/// Encodes checksums for the wire: 16 bytes each, little-endian.
pub fn encode_sums(sums: &[u128]) -> Vec<u8> {
    sums.iter().flat_map(|s| s.to_le_bytes()).collect()
}

/// Decodes what [`encode_sums`] wrote; `None` if the length is not a
/// multiple of 16.
pub fn decode_sums(bytes: &[u8]) -> Option<Vec<u128>> {
    if !bytes.len().is_multiple_of(16) {
        return None;
    }
    Some(
        bytes
            .chunks_exact(16)
            .map(|c| u128::from_le_bytes(c.try_into().unwrap_or([0; 16])))
            .collect(),
    )
}

/// Which regions writes touched after `since`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DirtyMap {
    since: u64,
    region_bytes: u64,
    regions: u64,
    words: Vec<u64>,
}

/// What a dirty map covers, for the engine and the status.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DirtyMapInfo {
    /// Writes after this LSN are marked.
    pub since: u64,
    /// Regions marked.
    pub dirty: u64,
    /// Regions in the volume.
    pub regions: u64,
    /// Bytes per region.
    pub region_bytes: u64,
}

impl DirtyMap {
    /// An empty map for a volume of `volume_bytes`, marking writes after `since`.
    pub fn new(since: u64, volume_bytes: u64) -> Self {
        let region_bytes = region_bytes(volume_bytes);
        let regions = volume_bytes.div_ceil(region_bytes);
        Self {
            since,
            region_bytes,
            regions,
            words: vec![0; regions.div_ceil(64) as usize],
        }
    }

    /// Writes after this LSN are marked.
    pub fn since(&self) -> u64 {
        self.since
    }

    /// Bytes per region.
    pub fn region_bytes(&self) -> u64 {
        self.region_bytes
    }

    /// Regions in the volume.
    pub fn regions(&self) -> u64 {
        self.regions
    }

    /// Marks the regions the byte range `[offset, offset + len)` touches
    /// (a range past the end is cut at it).
    pub fn mark(&mut self, offset: u64, len: u64) {
        if len == 0 {
            return;
        }
        let first = offset / self.region_bytes;
        let last = ((offset + len - 1) / self.region_bytes).min(self.regions.saturating_sub(1));
        for region in first..=last {
            self.words[(region / 64) as usize] |= 1 << (region % 64);
        }
    }

    /// Whether `region` is marked.
    pub fn is_dirty(&self, region: u64) -> bool {
        region < self.regions && self.words[(region / 64) as usize] & (1 << (region % 64)) != 0
    }

    /// Regions marked.
    pub fn dirty(&self) -> u64 {
        self.words.iter().map(|w| u64::from(w.count_ones())).sum()
    }

    /// The map's figures.
    pub fn info(&self) -> DirtyMapInfo {
        DirtyMapInfo {
            since: self.since,
            dirty: self.dirty(),
            regions: self.regions,
            region_bytes: self.region_bytes,
        }
    }
}

/// Encodes the maps of a store at `generation` (see the module docs).
pub(crate) fn encode_maps(generation: u64, maps: &BTreeMap<String, DirtyMap>) -> Vec<u8> {
    let mut out = Vec::new();
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&generation.to_le_bytes());
    out.extend_from_slice(&(maps.len() as u32).to_le_bytes());
    for (key, map) in maps {
        let key = &key.as_bytes()[..key.len().min(u16::MAX as usize)];
        out.extend_from_slice(&(key.len() as u16).to_le_bytes());
        out.extend_from_slice(key);
        for value in [map.since, map.region_bytes, map.regions] {
            out.extend_from_slice(&value.to_le_bytes());
        }
        for word in &map.words {
            out.extend_from_slice(&word.to_le_bytes());
        }
    }
    let crc = crc32c::crc32c(&out);
    out.extend_from_slice(&crc.to_le_bytes());
    out
}

/// Why a `DIRTY` file was not taken.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MapsError {
    /// Its checksum or its layout is wrong.
    #[error("dirty maps file damaged: {0}")]
    Damaged(&'static str),
    /// It was written for another generation of the store (a base install
    /// replaced the extent since): its maps describe another history.
    #[error("dirty maps of generation {found}, the store is at {expected}")]
    OtherGeneration {
        /// Generation it names.
        found: u64,
        /// The store's.
        expected: u64,
    },
}

/// Decodes a `DIRTY` file for a store at `generation` with `volume_bytes`.
pub(crate) fn decode_maps(
    bytes: &[u8],
    generation: u64,
    volume_bytes: u64,
) -> Result<BTreeMap<String, DirtyMap>, MapsError> {
    let damaged = MapsError::Damaged;
    if bytes.len() < 24 {
        return Err(damaged("short"));
    }
    let (body, crc) = bytes.split_at(bytes.len() - 4);
    if crc32c::crc32c(body).to_le_bytes() != crc {
        return Err(damaged("checksum"));
    }
    let mut r = Cursor(body);
    if r.take(8)? != MAGIC {
        return Err(damaged("magic"));
    }
    let found = r.u64()?;
    if found != generation {
        return Err(MapsError::OtherGeneration {
            found,
            expected: generation,
        });
    }
    let count = u32::from_le_bytes(r.take(4)?.try_into().unwrap_or_default());
    let mut maps = BTreeMap::new();
    for _ in 0..count {
        let len = u16::from_le_bytes(r.take(2)?.try_into().unwrap_or_default()) as usize;
        let key = String::from_utf8(r.take(len)?.to_vec()).map_err(|_| damaged("key"))?;
        let (since, region, regions) = (r.u64()?, r.u64()?, r.u64()?);
        let mut map = DirtyMap::new(since, volume_bytes);
        if map.region_bytes != region || map.regions != regions {
            return Err(damaged("map of another volume size"));
        }
        for word in &mut map.words {
            *word = r.u64()?;
        }
        maps.insert(key, map);
    }
    if !r.0.is_empty() {
        return Err(damaged("trailing bytes"));
    }
    Ok(maps)
}

struct Cursor<'a>(&'a [u8]);

impl<'a> Cursor<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], MapsError> {
        if self.0.len() < n {
            return Err(MapsError::Damaged("short"));
        }
        let (head, rest) = self.0.split_at(n);
        self.0 = rest;
        Ok(head)
    }

    fn u64(&mut self) -> Result<u64, MapsError> {
        Ok(u64::from_le_bytes(
            self.take(8)?.try_into().unwrap_or_default(),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn region_size_grows_so_a_map_stays_small() {
        assert_eq!(region_bytes(1 << 30), 64 << 10);
        assert_eq!(region_bytes(1 << 40), 64 << 10);
        assert_eq!(region_bytes(4 << 40), 256 << 10);
        let map = DirtyMap::new(0, 1 << 40);
        assert_eq!(map.words.len() * 8, 2 << 20, "1 TiB: 2 MiB of bits");
    }

    #[test]
    fn marking_covers_every_region_a_range_touches() {
        let mut map = DirtyMap::new(7, 1 << 20); // 16 regions of 64 KiB
        map.mark(0, 4096);
        map.mark((64 << 10) - 4096, 8192); // straddles regions 0 and 1
        map.mark(15 * (64 << 10), 1 << 30); // past the end: cut
        let marked: Vec<u64> = (0..16).filter(|r| map.is_dirty(*r)).collect();
        assert_eq!(marked, vec![0, 1, 15]);
        assert_eq!(map.dirty(), 3);
        assert!(!map.is_dirty(16), "past the end is never dirty");
    }

    #[test]
    fn maps_round_trip_and_refuse_damage_and_other_generations() {
        let mut maps = BTreeMap::new();
        let mut a = DirtyMap::new(10, 100 << 20);
        a.mark(5 << 20, 3 << 20);
        maps.insert("vol/a".to_owned(), a);
        maps.insert("vol/b".to_owned(), DirtyMap::new(99, 100 << 20));
        let bytes = encode_maps(3, &maps);
        assert_eq!(decode_maps(&bytes, 3, 100 << 20).unwrap(), maps);
        assert_eq!(
            decode_maps(&bytes, 4, 100 << 20),
            Err(MapsError::OtherGeneration {
                found: 3,
                expected: 4
            })
        );
        for at in [0, 9, 20, bytes.len() / 2, bytes.len() - 1] {
            let mut bad = bytes.clone();
            bad[at] ^= 0x40;
            assert!(decode_maps(&bad, 3, 100 << 20).is_err(), "flip at {at}");
        }
        assert!(decode_maps(&bytes[..bytes.len() - 5], 3, 100 << 20).is_err());
        assert!(matches!(
            decode_maps(&bytes, 3, 200 << 20),
            Err(MapsError::Damaged(_))
        ));
    }

    #[test]
    fn sums_differ_where_bytes_differ_and_round_trip() {
        let mut data = vec![7u8; 4 * 4096];
        let before = region_sums(&data, 4096);
        data[2 * 4096 + 17] ^= 1;
        let after = region_sums(&data, 4096);
        let differ: Vec<usize> = (0..4).filter(|i| before[*i] != after[*i]).collect();
        assert_eq!(differ, vec![2]);
        assert_eq!(decode_sums(&encode_sums(&after)).unwrap(), after);
        assert!(decode_sums(&[0; 17]).is_none());
    }
}
