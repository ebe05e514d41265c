//! The log's side of compaction: what the cleaner may clean, installing a
//! cleaned group of segments, and finishing a swap a crash interrupted. The
//! cleaning itself (offset map, rewriting) is `cleaner.rs`.
//!
//! A group of segments `[B, E)` is replaced so that a crash at any step
//! leaves either the old segments or the new one, never both and never
//! neither:
//! 1. The cleaner writes `B.log.cleaned` and its indexes beside the live
//!    files, closes and fsyncs them (no lock held).
//! 2. Under the log's lock the indexes, then the log, are renamed to
//!    `.swap` and the directory is fsynced. From here the swap is decided.
//! 3. The old segments' files other than B's are unlinked, the `.swap` files
//!    renamed over B's (indexes first, the log last), the directory fsynced.
//!
//! At open, a `B.log.swap` means step 2 completed: step 3 is finished
//! ([`finish_interrupted_swaps`]). `E` is where the swap's last batch ends:
//! a cleaned group covers every offset of the segments it replaces (runs of
//! removed batches become empty fillers), so it ends where the next segment
//! begins. `.cleaned` files,
//! and index `.swap` files without a log `.swap`, are leftovers of steps 1
//! and 2 and are removed. Readers holding bytes of the old segments keep
//! them: their maps outlive the unlinked files.

use std::path::{Path, PathBuf};

use bytes::Bytes;

use super::Log;
use crate::storage::config::Compaction;
use crate::storage::error::io_err;
use crate::storage::fs::{remove_if_exists, sync_dir};
use crate::storage::segment::{Segment, SegmentSizes, file_name};
use crate::storage::{Offset, Result, StorageError};

/// Suffix of the files the cleaner writes (step 1).
pub(crate) const CLEANED: &str = ".cleaned";
/// Suffix of a decided swap (step 2).
const SWAP: &str = ".swap";

/// A closed segment's bytes, taken under the log's lock so the cleaner can
/// read them without it (they stay valid whatever the log does meanwhile).
#[derive(Debug, Clone)]
pub(crate) struct SegmentView {
    pub(crate) base: u64,
    pub(crate) next: u64,
    pub(crate) bytes: Bytes,
    pub(crate) last_append_ms: i64,
}

/// What one clean pass works on: every closed segment wholly below the
/// first uncleanable offset, oldest first.
#[derive(Debug)]
pub(crate) struct CleanPlan {
    pub(crate) dir: PathBuf,
    pub(crate) segments: Vec<SegmentView>,
    /// The dirty section starts here: below it the log was cleaned before.
    pub(crate) cleaner_offset: u64,
    pub(crate) truncations: u64,
    pub(crate) compaction: Compaction,
    pub(crate) sizes: SegmentSizes,
    pub(crate) index_interval_bytes: u64,
}

/// A cleaned group written beside the log (step 1 done).
#[derive(Debug)]
pub(crate) struct StagedGroup {
    /// The cleaned segment, named `B.*.cleaned`.
    pub(crate) segment: Segment,
    /// `(base, next offset, size)` of each segment it replaces.
    pub(crate) replaces: Vec<(u64, u64, u64)>,
    /// Broker time of the replaced segments' last append, which the new
    /// file keeps (time retention of `compact,delete` must not restart).
    pub(crate) last_append_ms: i64,
}

impl StagedGroup {
    /// Removes the staged files (the log changed under the cleaner).
    pub(crate) fn discard(self, dir: &Path) {
        let base = self.segment.base_offset();
        drop(self.segment);
        for ext in ["log", "index", "timeindex"] {
            let _ = remove_if_exists(&dir.join(file_name(base, &format!("{ext}{CLEANED}"))));
        }
    }
}

/// Segments a swap replaced: dropped (maps unmapped, files closed) and
/// their renamed-aside files deleted outside the log's lock, so freeing a
/// large file's blocks never holds up appends and reads.
#[derive(Debug, Default)]
#[must_use = "the replaced files are deleted by finish()"]
pub(crate) struct Retired {
    segments: Vec<Segment>,
    paths: Vec<PathBuf>,
}

impl Retired {
    /// Drops the segments and deletes their files (a crash first leaves
    /// `.deleted` files the next open removes).
    pub(crate) fn finish(self) -> Result<()> {
        drop(self.segments);
        for path in self.paths {
            remove_if_exists(&path)?;
        }
        Ok(())
    }
}

/// How much of a compacted log is cleaned and how much is not.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct CleanStats {
    /// Bytes of closed segments below the cleaner offset.
    pub clean_bytes: u64,
    /// Bytes of cleanable segments at or above it.
    pub dirty_bytes: u64,
    /// Where the last clean ended.
    pub cleaner_offset: Offset,
    /// The newest record time of the oldest dirty segment, if any.
    pub oldest_dirty_ms: Option<i64>,
    /// When the last clean of this log since it was opened ended.
    pub last_clean_ms: Option<i64>,
}

impl CleanStats {
    /// Dirty bytes over all cleanable bytes (0 when there are none).
    pub fn dirty_ratio(&self) -> f64 {
        let total = self.clean_bytes + self.dirty_bytes;
        if total == 0 { 0.0 } else { self.dirty_bytes as f64 / total as f64 }
    }

    /// True when the log is due for cleaning under `compaction` at `now_ms`:
    /// its dirty ratio reached `min_cleanable_dirty_ratio`, or its oldest
    /// dirty data is older than `max_compaction_lag_ms`.
    pub fn is_due(&self, compaction: &Compaction, now_ms: i64) -> bool {
        if self.dirty_bytes == 0 {
            return false;
        }
        let overdue = self.oldest_dirty_ms.is_some_and(|t| now_ms.saturating_sub(t) > compaction.max_lag_ms);
        overdue || self.dirty_ratio() >= compaction.min_cleanable_dirty_ratio
    }
}

impl Log {
    /// The log's clock, in ms (what retention and the cleaner judge by).
    pub fn now_ms(&self) -> i64 {
        self.clock.now_ms()
    }

    /// How much of this compacted log is cleaned, by its own clock, and
    /// whether it is due for cleaning; `None` unless it is compacted.
    pub fn cleaning_due(&self) -> Option<(CleanStats, bool)> {
        let now_ms = self.now_ms();
        let compaction = self.config.compaction?;
        let stats = self.cleaning_stats(now_ms)?;
        Some((stats, stats.is_due(&compaction, now_ms)))
    }

    /// The first offset the cleaner must leave alone: the active segment,
    /// anything at or above the high watermark, and segments younger than
    /// `min_compaction_lag_ms`. Cleaning takes whole segments below it.
    fn first_uncleanable(&self, compaction: &Compaction, now_ms: i64) -> u64 {
        let mut limit = self.active().base_offset().min(self.high_watermark);
        for segment in self.segments.values() {
            if segment.next_offset() > limit {
                return segment.base_offset();
            }
            if now_ms.saturating_sub(segment.retention_time_ms()) < compaction.min_lag_ms {
                limit = segment.base_offset();
                return limit;
            }
        }
        limit
    }

    fn cleanable_segments(&self, compaction: &Compaction, now_ms: i64) -> impl Iterator<Item = &Segment> {
        let limit = self.first_uncleanable(compaction, now_ms);
        self.segments.values().take_while(move |s| s.next_offset() <= limit && s.base_offset() < limit)
    }

    /// How much of this log is cleaned; `None` unless it is compacted.
    pub fn cleaning_stats(&self, now_ms: i64) -> Option<CleanStats> {
        let compaction = self.config.compaction?;
        let mut stats = CleanStats {
            clean_bytes: 0,
            dirty_bytes: 0,
            cleaner_offset: Offset(self.cleaner_offset),
            oldest_dirty_ms: None,
            last_clean_ms: self.last_clean_ms,
        };
        for segment in self.cleanable_segments(&compaction, now_ms) {
            if segment.next_offset() <= self.cleaner_offset {
                stats.clean_bytes += segment.size();
            } else {
                stats.dirty_bytes += segment.size();
                stats.oldest_dirty_ms.get_or_insert(segment.retention_time_ms());
            }
        }
        Some(stats)
    }

    /// What a clean pass would work on, or `None` when the log is not
    /// compacted, has failed, or has nothing dirty to clean.
    pub(crate) fn clean_plan(&self, now_ms: i64) -> Option<CleanPlan> {
        let compaction = self.config.compaction?;
        if self.failed.is_some() {
            return None;
        }
        let segments: Vec<SegmentView> = self
            .cleanable_segments(&compaction, now_ms)
            .map(|s| SegmentView {
                base: s.base_offset(),
                next: s.next_offset(),
                bytes: s.slice(0, s.size()),
                last_append_ms: s.last_append_ms(),
            })
            .collect();
        if !segments.iter().any(|s| s.next > self.cleaner_offset) {
            return None;
        }
        Some(CleanPlan {
            dir: self.dir.clone(),
            segments,
            cleaner_offset: self.cleaner_offset,
            truncations: self.truncations,
            compaction,
            sizes: self.sizes(),
            index_interval_bytes: self.config.index_interval_bytes,
        })
    }

    /// Installs a cleaned group (steps 2 and 3 of the module's swap), if the
    /// segments it replaces are still in the log as the plan saw them (no
    /// truncation, retention or deletion since). Returns `None`, touching
    /// nothing, when they are not (the caller discards the group), else the
    /// replaced segments to let go of after the lock ([`Retired::finish`]).
    /// An I/O error part way fails the log: the next open finishes or drops
    /// the swap.
    pub(crate) fn install_cleaned(&mut self, staged: &StagedGroup, truncations: u64) -> Result<Option<Retired>> {
        self.check_not_failed()?;
        let base = staged.segment.base_offset();
        let end = staged.segment.next_offset();
        let active_base = self.active().base_offset();
        let unchanged = !self.closed
            && self.truncations == truncations
            && end <= active_base
            && self.segments.range(base..end).count() == staged.replaces.len()
            && staged.replaces.iter().all(|&(b, next, size)| {
                self.segments.get(&b).is_some_and(|s| s.next_offset() == next && s.size() == size)
            })
            && self.segments.contains_key(&end);
        if !unchanged {
            return Ok(None);
        }
        let mut retired = Retired::default();
        if let Err(e) = self.swap_in(base, end, staged, &mut retired) {
            self.fail(&e);
            return Err(e);
        }
        Ok(Some(retired))
    }

    fn swap_in(&mut self, base: u64, end: u64, staged: &StagedGroup, retired: &mut Retired) -> Result<()> {
        let path = |ext: &str, suffix: &str| self.dir.join(file_name(base, &format!("{ext}{suffix}")));
        let rename = |from: PathBuf, to: PathBuf, step: &mut u32| -> Result<()> {
            std::fs::rename(&from, &to).map_err(io_err("rename", &from))?;
            crash_point(step)
        };
        let sync = |step: &mut u32| -> Result<()> {
            sync_dir(&self.dir)?;
            crash_point(step)
        };
        let mut step = 0;
        // Step 2: decide. The indexes are durably renamed before the log,
        // so a `.log.swap` always comes with its indexes.
        for ext in ["index", "timeindex"] {
            rename(path(ext, CLEANED), path(ext, SWAP), &mut step)?;
        }
        sync(&mut step)?;
        rename(path("log", CLEANED), path("log", SWAP), &mut step)?;
        sync(&mut step)?;
        // Step 3: the old segments leave the log (readers keep their maps;
        // the objects are dropped and the files deleted after the lock, by
        // `Retired::finish`), their files are renamed aside, durably, before
        // the new files take B's names, so a finished swap never comes back
        // with them.
        let old: Vec<u64> = self.segments.range(base..end).map(|(b, _)| *b).collect();
        for b in old {
            retired.segments.push(self.segments.remove(&b).expect("listed"));
            if b != base {
                for ext in ["log", "index", "timeindex"] {
                    let name = self.dir.join(file_name(b, ext));
                    let aside = self.dir.join(format!("{}.deleted", file_name(b, ext)));
                    match std::fs::rename(&name, &aside) {
                        Ok(()) => retired.paths.push(aside),
                        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                        Err(e) => return Err(io_err("rename", &name)(e)),
                    }
                }
                crash_point(&mut step)?;
            }
        }
        self.unsynced.retain(|(e, _)| *e <= base || *e > end);
        sync(&mut step)?;
        for ext in ["index", "timeindex"] {
            rename(path(ext, SWAP), path(ext, ""), &mut step)?;
        }
        sync(&mut step)?;
        rename(path("log", SWAP), path("log", ""), &mut step)?;
        self.dir_generation += 1;
        sync_dir(&self.dir)?;
        self.synced_dir_generation = self.synced_dir_generation.max(self.dir_generation);
        let mut segment = Segment::open(&self.dir, base, self.clock.now_ms(), None)?;
        segment.load_trusted(self.config.index_interval_bytes, end, self.recovery_point)?;
        segment.set_last_append_ms(staged.last_append_ms);
        if segment.next_offset() != end {
            return Err(StorageError::InvalidArgument(format!(
                "the cleaned segment {base} ends at {} instead of {end}",
                segment.next_offset()
            )));
        }
        self.segments.insert(base, segment);
        Ok(())
    }

    /// Records that the log is cleaned below `offset`, durably (a lost
    /// value only makes the next clean redo work), unless the log was
    /// truncated since the pass planned (`truncations`) or closed.
    pub(crate) fn set_cleaner_offset(&mut self, offset: u64, truncations: u64) -> Result<()> {
        if self.truncations != truncations || self.closed {
            return Ok(());
        }
        self.cleaner_offset = offset;
        self.last_clean_ms = Some(self.clock.now_ms());
        self.writer.write_offset_now(super::Kind::CleanerOffset, Offset(offset))
    }
}

#[cfg(test)]
thread_local! {
    /// Tests: the swap step after which [`crash_point`] stops the swap.
    pub(crate) static CRASH_AFTER_STEP: std::cell::Cell<Option<u32>> = const { std::cell::Cell::new(None) };
}

/// Counts a step of the swap; in tests, stops there as a crash would when
/// [`CRASH_AFTER_STEP`] says so (the files stay as they are).
fn crash_point(step: &mut u32) -> Result<()> {
    *step += 1;
    #[cfg(test)]
    if CRASH_AFTER_STEP.with(std::cell::Cell::get) == Some(*step) {
        return Err(StorageError::InvalidArgument(format!("simulated crash after swap step {step}")));
    }
    Ok(())
}

/// Finishes every swap of `dir` that was decided (a `B.log.swap` exists)
/// but not completed, before the segments are loaded.
pub(crate) fn finish_interrupted_swaps(dir: &Path) -> Result<()> {
    let mut swaps = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(io_err("read directory", dir))? {
        let entry = entry.map_err(io_err("read directory", dir))?;
        let name = entry.file_name().to_string_lossy().into_owned();
        if let Some((base, "log.swap")) = super::parse_segment_name(&name) {
            swaps.push(base);
        }
    }
    if swaps.is_empty() {
        return Ok(());
    }
    for base in swaps {
        let swap = dir.join(file_name(base, &format!("log{SWAP}")));
        let mut end = None;
        for batch in crate::storage::scan_segment_file(&swap)? {
            let batch = batch?;
            if let Some(error) = batch.error {
                return Err(StorageError::Corrupt { path: swap, position: batch.position, reason: error });
            }
            end = Some(batch.last_offset as u64 + 1);
        }
        let Some(end) = end else {
            return Err(StorageError::InvalidArgument(format!("{} holds no batch", swap.display())));
        };
        tracing::info!(dir = %dir.display(), base, end, "finishing a cleaned segment swap a crash interrupted");
        let mut bases = Vec::new();
        for entry in std::fs::read_dir(dir).map_err(io_err("read directory", dir))? {
            let entry = entry.map_err(io_err("read directory", dir))?;
            let name = entry.file_name().to_string_lossy().into_owned();
            if let Some((b, "log")) = super::parse_segment_name(&name)
                && b > base
                && b < end
            {
                bases.push(b);
            }
        }
        for b in bases {
            for ext in ["log", "index", "timeindex"] {
                remove_if_exists(&dir.join(file_name(b, ext)))?;
            }
        }
        for ext in ["index", "timeindex", "log"] {
            let from = dir.join(file_name(base, &format!("{ext}{SWAP}")));
            match std::fs::rename(&from, dir.join(file_name(base, ext))) {
                Ok(()) => {}
                // Renamed before the crash (the indexes go first).
                Err(e) if e.kind() == std::io::ErrorKind::NotFound && ext != "log" => {}
                Err(e) => return Err(io_err("rename", &from)(e)),
            }
        }
    }
    sync_dir(dir)
}
