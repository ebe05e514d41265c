//! Small state files beside the segments, replaced atomically, and the
//! leader-epoch cache (epoch -> first offset written in that epoch, KIP-101).

use std::path::{Path, PathBuf};

use super::error::io_err;
use super::fs::write_atomic;
use super::{Offset, Result};

const RECOVERY_POINT: &str = "recovery-point-checkpoint";
const LOG_START: &str = "log-start-offset-checkpoint";
const HIGH_WATERMARK: &str = "high-watermark-checkpoint";
const LEADER_EPOCH: &str = "leader-epoch-checkpoint";
const VERSION: &str = "0";

/// One leader epoch and the first offset appended in it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EpochEntry {
    /// The leader epoch.
    pub epoch: u32,
    /// First offset written under it.
    pub start_offset: Offset,
}

/// Epoch -> start offset, ascending in both.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LeaderEpochCache {
    entries: Vec<EpochEntry>,
}

impl LeaderEpochCache {
    /// The entries, oldest first.
    pub fn entries(&self) -> &[EpochEntry] {
        &self.entries
    }

    /// The newest epoch, if any.
    pub fn latest_epoch(&self) -> Option<u32> {
        self.entries.last().map(|e| e.epoch)
    }

    /// Records that `epoch` starts at `offset` if it is newer than the last
    /// one. Returns true when the cache changed.
    pub fn assign(&mut self, epoch: u32, offset: Offset) -> bool {
        match self.entries.last() {
            Some(last) if last.epoch >= epoch => false,
            _ => {
                self.entries.push(EpochEntry { epoch, start_offset: offset });
                true
            }
        }
    }

    /// For a follower asking about `epoch`: the largest epoch <= it and the
    /// offset where that epoch ended (the next epoch's start, or `log_end`).
    pub fn end_offset_for(&self, epoch: u32, log_end: Offset) -> Option<(u32, Offset)> {
        let idx = self.entries.iter().rposition(|e| e.epoch <= epoch)?;
        let end = self.entries.get(idx + 1).map_or(log_end, |n| n.start_offset);
        Some((self.entries[idx].epoch, end))
    }

    /// Drops epochs that start at or after `offset` (after a truncation).
    pub fn truncate_from_end(&mut self, offset: Offset) -> bool {
        let before = self.entries.len();
        self.entries.retain(|e| e.start_offset < offset);
        before != self.entries.len()
    }

    /// Drops epochs wholly below `offset` and moves the first to start there.
    pub fn truncate_from_start(&mut self, offset: Offset) -> bool {
        let keep_from = self.entries.iter().rposition(|e| e.start_offset <= offset).unwrap_or(0);
        let mut changed = keep_from > 0;
        self.entries.drain(..keep_from);
        if let Some(first) = self.entries.first_mut()
            && first.start_offset < offset
        {
            first.start_offset = offset;
            changed = true;
        }
        changed
    }
}

/// The values kept in a log's checkpoint files.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Checkpoints {
    /// Offsets below this are durable and were validated.
    pub recovery_point: Offset,
    /// First readable offset.
    pub log_start_offset: Offset,
    /// Last known high watermark.
    pub high_watermark: Offset,
    /// Leader epochs.
    pub leader_epochs: LeaderEpochCache,
}

impl Checkpoints {
    /// Reads the checkpoint files in `dir`; a missing file gives the default.
    pub fn read(dir: &Path) -> Result<Checkpoints> {
        let mut out = Checkpoints {
            recovery_point: read_offset(&dir.join(RECOVERY_POINT))?.unwrap_or_default(),
            log_start_offset: read_offset(&dir.join(LOG_START))?.unwrap_or_default(),
            high_watermark: read_offset(&dir.join(HIGH_WATERMARK))?.unwrap_or_default(),
            leader_epochs: LeaderEpochCache::default(),
        };
        if let Some(lines) = read_lines(&dir.join(LEADER_EPOCH))? {
            for line in lines {
                let mut parts = line.split_whitespace();
                let (Some(e), Some(o)) = (parts.next(), parts.next()) else {
                    continue;
                };
                if let (Ok(epoch), Ok(start_offset)) = (e.parse(), o.parse()) {
                    out.leader_epochs.entries.push(EpochEntry { epoch, start_offset });
                }
            }
        }
        Ok(out)
    }

    /// Writes every checkpoint file atomically.
    pub fn write(&self, dir: &Path) -> Result<()> {
        write_atomic(&dir.join(RECOVERY_POINT), format!("{VERSION}\n{}\n", self.recovery_point).as_bytes())?;
        write_atomic(&dir.join(LOG_START), format!("{VERSION}\n{}\n", self.log_start_offset).as_bytes())?;
        write_atomic(&dir.join(HIGH_WATERMARK), format!("{VERSION}\n{}\n", self.high_watermark).as_bytes())?;
        self.write_leader_epochs(dir)
    }

    /// Writes only the recovery point.
    pub fn write_recovery_point(dir: &Path, offset: Offset) -> Result<()> {
        write_atomic(&dir.join(RECOVERY_POINT), format!("{VERSION}\n{offset}\n").as_bytes())
    }

    /// Writes only the log start offset.
    pub fn write_log_start(dir: &Path, offset: Offset) -> Result<()> {
        write_atomic(&dir.join(LOG_START), format!("{VERSION}\n{offset}\n").as_bytes())
    }

    /// Writes only the leader-epoch file.
    pub fn write_leader_epochs(&self, dir: &Path) -> Result<()> {
        let mut text = format!("{VERSION}\n{}\n", self.leader_epochs.entries.len());
        for e in &self.leader_epochs.entries {
            text.push_str(&format!("{} {}\n", e.epoch, e.start_offset));
        }
        write_atomic(&dir.join(LEADER_EPOCH), text.as_bytes())
    }
}

fn read_lines(path: &PathBuf) -> Result<Option<Vec<String>>> {
    match std::fs::read_to_string(path) {
        Ok(text) => {
            let mut lines = text.lines().map(str::to_string);
            // Skip version and count lines for the epoch file; offset files have one value.
            let _version = lines.next();
            Ok(Some(lines.collect()))
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(io_err("read", path)(e)),
    }
}

fn read_offset(path: &PathBuf) -> Result<Option<Offset>> {
    Ok(read_lines(path)?.and_then(|lines| lines.first().and_then(|l| l.trim().parse().ok())))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn checkpoints_round_trip_and_missing_files_read_as_defaults() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(Checkpoints::read(dir.path()).unwrap(), Checkpoints::default());
        let mut c = Checkpoints {
            recovery_point: Offset(10),
            log_start_offset: Offset(3),
            high_watermark: Offset(9),
            ..Default::default()
        };
        c.leader_epochs.assign(0, Offset(0));
        c.leader_epochs.assign(2, Offset(7));
        c.write(dir.path()).unwrap();
        assert_eq!(Checkpoints::read(dir.path()).unwrap(), c);
        assert!(!dir.path().join("recovery-point-checkpoint.tmp").exists());
    }

    #[test]
    fn epoch_cache_answers_end_offsets_and_truncates() {
        let mut c = LeaderEpochCache::default();
        assert!(c.assign(1, Offset(0)));
        assert!(!c.assign(1, Offset(5)), "same epoch is not a new entry");
        assert!(c.assign(3, Offset(10)));
        assert_eq!(c.end_offset_for(1, Offset(20)), Some((1, Offset(10))));
        assert_eq!(c.end_offset_for(2, Offset(20)), Some((1, Offset(10))));
        assert_eq!(c.end_offset_for(3, Offset(20)), Some((3, Offset(20))));
        assert_eq!(c.end_offset_for(0, Offset(20)), None);
        c.truncate_from_end(Offset(10));
        assert_eq!(c.latest_epoch(), Some(1));
        c.assign(3, Offset(10));
        c.truncate_from_start(Offset(12));
        assert_eq!(c.entries(), &[EpochEntry { epoch: 3, start_offset: Offset(12) }]);
    }
}
