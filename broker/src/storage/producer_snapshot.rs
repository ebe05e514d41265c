//! Producer-state snapshot files beside a log's segments (Kafka's
//! `.snapshot` files): `{offset:020}.snapshot` holds the producer-state
//! table as it was with every batch below `offset` applied, CRC-checked by
//! [`ProducerStateTable::decode`]. A snapshot is written to a `.tmp` name
//! and renamed into place, so a reader never sees a half-written one under
//! its final name; a torn one that a crash left anyway fails its CRC and
//! the next older one is used.
//!
//! One snapshot is kept per segment roll down to the log start (Kafka's
//! way), so a truncation anywhere in the log finds one at or below its cut.
//! Those wholly below the log start go when the next one is written,
//! except the newest of them (an open replays from the log start after it).
//!
//! The files are not fsynced: losing the newest snapshot costs a longer
//! replay at open (from an older snapshot), never a wrong table, as long as
//! the log after the older snapshot is still there.

use std::path::{Path, PathBuf};

use super::error::io_err;
use super::fs::remove_if_exists;
use super::producer_state::ProducerStateTable;
use super::{Result, StorageError};

const SUFFIX: &str = ".snapshot";

/// The snapshot file for `offset` in `dir`.
pub(crate) fn path(dir: &Path, offset: u64) -> PathBuf {
    dir.join(format!("{offset:020}{SUFFIX}"))
}

/// The offsets of the snapshots in `dir`, ascending.
pub(crate) fn list(dir: &Path) -> Result<Vec<u64>> {
    let mut offsets = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(io_err("read directory", dir))? {
        let entry = entry.map_err(io_err("read directory", dir))?;
        let name = entry.file_name();
        let Some(stem) = name.to_str().and_then(|n| n.strip_suffix(SUFFIX)) else { continue };
        if stem.len() == 20
            && let Ok(offset) = stem.parse::<u64>()
        {
            offsets.push(offset);
        }
    }
    offsets.sort_unstable();
    Ok(offsets)
}

/// Writes `table` as the snapshot at `offset` (replacing one of the same
/// offset) and deletes those below `log_start` but the newest of them.
pub(crate) fn write(dir: &Path, offset: u64, table: &ProducerStateTable, log_start: u64) -> Result<()> {
    let target = path(dir, offset);
    let tmp = dir.join(format!("{offset:020}{SUFFIX}.tmp"));
    std::fs::write(&tmp, table.encode()).map_err(io_err("write", &tmp))?;
    std::fs::rename(&tmp, &target).map_err(io_err("rename", &tmp))?;
    let below: Vec<u64> = list(dir)?.into_iter().filter(|&o| o <= log_start).collect();
    for &old in below.iter().rev().skip(1) {
        remove_if_exists(&path(dir, old))?;
    }
    Ok(())
}

/// Deletes the snapshots above `offset` (they hold batches a truncation
/// removed).
pub(crate) fn delete_above(dir: &Path, offset: u64) -> Result<()> {
    for old in list(dir)?.into_iter().filter(|&o| o > offset) {
        remove_if_exists(&path(dir, old))?;
    }
    Ok(())
}

/// Deletes every snapshot (the log was emptied).
pub(crate) fn delete_all(dir: &Path) -> Result<()> {
    for old in list(dir)? {
        remove_if_exists(&path(dir, old))?;
    }
    Ok(())
}

/// The newest readable snapshot at or below `at_most`, with its offset.
/// Unreadable ones are reported and skipped (the caller replays more log).
pub(crate) fn load_latest(dir: &Path, at_most: u64, max_producers: usize) -> Result<Option<(u64, ProducerStateTable)>> {
    for offset in list(dir)?.into_iter().rev().filter(|&o| o <= at_most) {
        let file = path(dir, offset);
        let bytes = match std::fs::read(&file) {
            Ok(bytes) => bytes,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => return Err(StorageError::Io { op: "read", path: file, source: e }),
        };
        match ProducerStateTable::decode(&bytes, max_producers) {
            Ok(table) => return Ok(Some((offset, table))),
            Err(e) => {
                tracing::warn!(path = %file.display(), error = %e, "skipping an unreadable producer-state snapshot");
            }
        }
    }
    Ok(None)
}
