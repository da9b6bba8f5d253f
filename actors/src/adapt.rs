//! Adapters between io's types and the engine's: LSNs and epochs are plain
//! integers in io, newtypes in the engine.

use walship_engine::{Epoch, EpochHistory, EpochOrderError, EpochStart, Lsn};

/// io's epoch history (from a WAL or the wire) as the engine's.
pub(crate) fn engine_epochs(
    entries: &[walship_io::EpochStart],
) -> Result<EpochHistory, EpochOrderError> {
    EpochHistory::from_entries(entries.iter().copied().map(engine_epoch).collect())
}

/// One io epoch start as the engine's.
pub(crate) fn engine_epoch(entry: walship_io::EpochStart) -> EpochStart {
    EpochStart {
        epoch: Epoch(entry.epoch),
        first: Lsn(entry.first_lsn),
    }
}
