//! [`Log`]: one partition's segments, with offsets, reads, rolls, retention,
//! truncation, flushing and crash recovery.
//!
//! Durability rules kept here:
//! - The recovery point only moves up over data this process synced (at
//!   open too: every segment recovery re-validated is synced first).
//! - A truncation never rewrites or shrinks bytes a reader may hold: the
//!   segment holding the cut ends there and a new segment file starts at the
//!   cut; later segments are unlinked. It is durable when it returns: the
//!   recovery point is lowered first, the directory is fsynced last, and on
//!   disk a segment ends where the next begins.
//! - After a failed fsync the log is failed ([`StorageError::LogFailed`]):
//!   no more appends, reads or syncs until it is reopened and recovered.
//! - Corruption below the recovery point is an error at open, never cut.

use std::collections::BTreeMap;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use bytes::Bytes;
use tally_proto::batch::RecordBatch;

use super::checkpoint::{
    CheckpointSnapshot, CheckpointWriter, Checkpoints, Kind, LeaderEpochCache, RecoveryPointSnapshot,
};
use super::clock::Clock;
use super::config::{FlushPolicy, LogConfig};
use super::error::io_err;
use super::fs::{remove_if_exists, sync_data, sync_dir};
use super::producer_state::ProducerStateTable;
use super::segment::{Segment, SegmentSizes, Tail, file_name};
use super::writeback::Writeback;
use super::{Offset, Result, StorageError};

/// The least time between two writes of the recovery-point file after
/// syncs ([`Log::recovery_point_after_sync`]).
pub const RECOVERY_POINT_WRITE_INTERVAL_MS: i64 = 100;

/// Where an append landed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AppendInfo {
    /// Offset of the batch's first record.
    pub base_offset: Offset,
    /// Offset of its last record.
    pub last_offset: Offset,
    /// The log end offset after the append.
    pub log_end_offset: Offset,
}

/// Batches returned by [`Log::read`]: runs of whole batches, each a zero-copy
/// slice of a segment's map.
#[derive(Debug, Clone, Default)]
pub struct ReadResult {
    /// One run of batches per segment touched, in offset order.
    pub chunks: Vec<Bytes>,
    /// Offset after the last batch returned (the fetch offset when empty).
    pub next_offset: Offset,
    /// Total bytes in `chunks`.
    pub bytes: u64,
    /// Page-cache work that drops the cold parts of this read once the
    /// reader has moved past them (empty unless write-behind is on).
    pub cold: Vec<Writeback>,
}

/// What a retention pass deleted.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RetentionOutcome {
    /// Segments deleted.
    pub segments_deleted: usize,
    /// Bytes of segment data deleted.
    pub bytes_deleted: u64,
}

/// Segments taken out of a log by retention, whose files are still to be
/// deleted; see [`Log::enforce_retention_deferred`].
#[derive(Debug)]
#[must_use = "the files are deleted by finish()"]
pub struct RemovedSegments {
    segments: Vec<Segment>,
    checkpoints: Option<CheckpointSnapshot>,
}

impl RemovedSegments {
    /// Writes the checkpoints (log start and leader epochs moved), then
    /// deletes the segment files. Readers still holding bytes of them keep
    /// their maps.
    pub fn finish(self) -> Result<()> {
        if let Some(c) = &self.checkpoints {
            c.write()?;
        }
        for segment in self.segments {
            segment.delete()?;
        }
        Ok(())
    }
}

/// A sync that can run without the log: the files written since the last
/// sync and the offset they will make durable. Built by [`Log::sync_plan`]
/// under whatever lock guards the log, run outside it, then reported back
/// with [`Log::mark_durable`].
#[derive(Debug)]
pub struct SyncPlan {
    files: Vec<Arc<File>>,
    log_dir: PathBuf,
    sync_dir: bool,
    dir_generation: u64,
    truncations: u64,
    up_to: u64,
    /// End offsets of the closed segments whose files this plan syncs whole:
    /// only these leave the unsynced list (a segment closed after the plan
    /// had only its `.log` synced by it).
    closed: Vec<u64>,
}

impl SyncPlan {
    /// fdatasyncs the files (and the directory when entries changed).
    /// Returns the offset below which the log is now durable. An error
    /// must fail the log ([`Log::fail`]): it is never retried.
    pub fn execute(&self) -> Result<Offset> {
        for f in &self.files {
            sync_data(f, &self.log_dir)?;
        }
        if self.sync_dir {
            sync_dir(&self.log_dir)?;
        }
        Ok(Offset(self.up_to))
    }

    /// The offset this plan makes durable.
    pub fn up_to(&self) -> Offset {
        Offset(self.up_to)
    }
}

/// One partition's log.
///
/// ```
/// use std::sync::Arc;
/// use tally_broker::storage::{Log, LogConfig, Offset, SystemClock};
/// use tally_proto::batch::{BatchBuilder, BatchLimits, RecordBatch, RecordRef};
///
/// let dir = tempfile::tempdir().unwrap();
/// let mut log = Log::open(dir.path(), LogConfig::default(), Arc::new(SystemClock)).unwrap();
/// let mut b = BatchBuilder::new();
/// b.push(&RecordRef { timestamp: 1, value: Some(b"hello"), ..Default::default() });
/// let batch = RecordBatch::validate(b.finish(), &BatchLimits::default()).unwrap();
/// assert_eq!(log.append(&batch, 0).unwrap().base_offset, Offset(0));
/// let read = log.read(Offset(0), 1 << 20, Offset::MAX).unwrap();
/// assert_eq!(read.next_offset, Offset(1));
/// ```
#[derive(Debug)]
pub struct Log {
    dir: PathBuf,
    config: LogConfig,
    clock: Arc<dyn Clock>,
    segments: BTreeMap<u64, Segment>,
    log_start_offset: u64,
    high_watermark: u64,
    recovery_point: u64,
    leader_epochs: LeaderEpochCache,
    /// Closed segments not yet synced: (end offset, files).
    unsynced: Vec<(u64, [Arc<File>; 3])>,
    dir_generation: u64,
    synced_dir_generation: u64,
    /// Truncations so far: a sync planned before one marks nothing durable.
    truncations: u64,
    last_flush_ms: i64,
    /// When a sync last handed out the recovery point to write (see
    /// [`Log::recovery_point_after_sync`]).
    recovery_point_taken_ms: i64,
    /// The one writer of the checkpoint files.
    writer: Arc<CheckpointWriter>,
    /// Why the log stopped (a failed fsync), if it did.
    failed: Option<String>,
    /// Where the last clean of a compacted log ended (persisted in
    /// `cleaner-offset-checkpoint`).
    cleaner_offset: u64,
    /// When the last clean ended (since this open).
    last_clean_ms: Option<i64>,
    /// Set by `close`: a clean in progress installs nothing after it (the
    /// directory may be renamed away and another log created at its path).
    closed: bool,
    /// Per producer id, its epoch and last batches (see `log_producers.rs`).
    producers: ProducerStateTable,
    /// The epoch file still holds entries that open cut from `leader_epochs`
    /// (an epoch begun at the log end with no batch): rewritten before the
    /// next batch (see [`Log::open`]).
    epochs_unwritten: bool,
}

#[path = "log_cleaning.rs"]
pub(crate) mod cleaning;
pub use cleaning::CleanStats;
pub(crate) use cleaning::{CLEANED, CleanPlan, SegmentView, StagedGroup};

#[path = "log_producers.rs"]
mod producers;
#[cfg(test)]
#[path = "log_producers_tests.rs"]
mod producers_tests;

fn parse_segment_name(name: &str) -> Option<(u64, &str)> {
    let (stem, ext) = name.split_once('.')?;
    (stem.len() == 20 && stem.bytes().all(|b| b.is_ascii_digit()))
        .then(|| (stem.parse().ok(), ext))
        .and_then(|(b, e)| Some((b?, e)))
}

impl Log {
    /// Opens (creating if needed) the log in `dir`, recovering it: stray
    /// files from an interrupted roll or delete are removed, segments from the
    /// one holding the recovery point on are re-validated, and the log is cut
    /// at the first torn, zeroed or corrupt batch. Opening twice in a row, or
    /// crashing while opening, gives the same log.
    pub fn open(dir: &Path, config: LogConfig, clock: Arc<dyn Clock>) -> Result<Log> {
        let problems = config.problems();
        if !problems.is_empty() {
            return Err(StorageError::InvalidArgument(problems.join("; ")));
        }
        Self::create_dir_durably(dir)?;
        let checkpoints = Checkpoints::read(dir)?;
        cleaning::finish_interrupted_swaps(dir)?;
        let bases = Self::clean_directory(dir)?;
        let mut log = Log {
            dir: dir.to_path_buf(),
            config,
            clock,
            segments: BTreeMap::new(),
            log_start_offset: checkpoints.log_start_offset.get(),
            high_watermark: 0,
            recovery_point: checkpoints.recovery_point.get(),
            leader_epochs: checkpoints.leader_epochs.clone(),
            unsynced: Vec::new(),
            dir_generation: 1,
            synced_dir_generation: 0,
            truncations: 0,
            last_flush_ms: 0,
            recovery_point_taken_ms: i64::MIN,
            writer: Arc::new(CheckpointWriter::new(dir)),
            failed: None,
            cleaner_offset: super::checkpoint::read_cleaner_offset(dir)?.get(),
            last_clean_ms: None,
            closed: false,
            producers: ProducerStateTable::new(0),
            epochs_unwritten: false,
        };
        log.producers = ProducerStateTable::new(log.config.max_producers);
        let recovery_changed_files = log.load_segments(&bases)?;
        let leo = log.leo();
        let first_base = log.segments.keys().next().copied().unwrap_or(leo);
        log.log_start_offset = log.log_start_offset.max(first_base).min(leo);
        log.leader_epochs.truncate_from_end(Offset(leo));
        log.leader_epochs.truncate_from_start(Offset(log.log_start_offset));
        log.high_watermark = checkpoints.high_watermark.get().clamp(log.log_start_offset, leo);
        log.cleaner_offset = log.cleaner_offset.clamp(log.log_start_offset, leo);
        log.last_flush_ms = log.clock.now_ms();
        // Whatever recovery validated (and trimmed) is synced before the
        // recovery point moves over it: the segments it re-validated are in
        // the unsynced list, the active one and the directory in every plan.
        // When nothing lies above the recovery point (a clean shutdown synced
        // everything) there is nothing to vouch for: the sync waits for the
        // next flush, and an open costs no fsync (a broker restarting with
        // ten thousand partitions pays ten thousand of each otherwise). A cut
        // recovery made then is not synced either; made again after a crash.
        if log.recovery_point < leo || recovery_changed_files {
            log.sync_all()?;
        } else {
            // Only the active segment was re-validated, and every sync plan
            // takes it: its files (which hold descriptors) need not wait.
            log.unsynced.clear();
        }
        // Epochs first: the recovery point vouches for what lies below it.
        // Entries only cut at the log's ends (an epoch begun at the log end
        // with no batch in it yet) are cut again at every open, so the file
        // need not be rewritten now; but it must be before the next batch of
        // any epoch (a follower's batch in an older epoch would otherwise lie
        // under the file's stale later one, which recovery refuses). Anything
        // else recovery learned is written now.
        let mut reopened = checkpoints.leader_epochs.clone();
        reopened.truncate_from_end(Offset(leo));
        reopened.truncate_from_start(Offset(log.log_start_offset));
        if log.leader_epochs != reopened {
            log.writer.write_epochs_now(&log.leader_epochs)?;
        } else {
            log.epochs_unwritten = log.leader_epochs != checkpoints.leader_epochs;
        }
        if log.recovery_point != checkpoints.recovery_point.get() {
            log.writer.write_offset_now(Kind::RecoveryPoint, Offset(log.recovery_point))?;
        }
        log.load_producers()?;
        Ok(log)
    }

    /// Creates `dir` and any missing parents, and fsyncs the parent of each
    /// directory it created, so the new entries survive a power loss (an
    /// fsync of the files inside does not persist the directory's own name).
    fn create_dir_durably(dir: &Path) -> Result<()> {
        let missing: Vec<PathBuf> =
            dir.ancestors().take_while(|a| !a.as_os_str().is_empty() && !a.exists()).map(Path::to_path_buf).collect();
        std::fs::create_dir_all(dir).map_err(io_err("create directory", dir))?;
        for created in missing.iter().rev() {
            let parent = created.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
            sync_dir(parent)?;
        }
        Ok(())
    }

    /// Removes leftovers (temp files, index files without a log) and returns
    /// the base offsets of the segments present, ascending.
    fn clean_directory(dir: &Path) -> Result<Vec<u64>> {
        let mut logs = Vec::new();
        let mut others = Vec::new();
        for entry in std::fs::read_dir(dir).map_err(io_err("read directory", dir))? {
            let entry = entry.map_err(io_err("read directory", dir))?;
            let name = entry.file_name().to_string_lossy().into_owned();
            let path = entry.path();
            // `.swap` files left here are leftovers of an undecided swap
            // (decided ones were finished before this).
            if name.ends_with(".tmp")
                || name.ends_with(".deleted")
                || name.ends_with(".swap")
                || name.ends_with(".cleaned")
            {
                remove_if_exists(&path)?;
            } else if let Some((base, ext)) = parse_segment_name(&name) {
                match ext {
                    "log" => logs.push(base),
                    "index" | "timeindex" => others.push((base, path)),
                    _ => {}
                }
            }
        }
        logs.sort_unstable();
        for (base, path) in others {
            if logs.binary_search(&base).is_err() {
                remove_if_exists(&path)?;
            }
        }
        Ok(logs)
    }

    fn sizes(&self) -> SegmentSizes {
        SegmentSizes { log_bytes: self.config.segment_bytes, index_bytes: self.config.segment_index_bytes }
    }

    /// Loads the segments: those wholly below the recovery point are
    /// trusted (their ends found by walking headers), the one holding it and
    /// all later ones are re-validated batch by batch. Each segment ends at
    /// the next one's base. What does not hold up is cut only above the
    /// recovery point; below it, it is an error.
    /// Returns whether it changed any file beyond trimming the active
    /// segment's preallocated zeros or creating the first, empty segment (a
    /// tail cut, segments deleted): those changes are synced before anything
    /// is appended.
    fn load_segments(&mut self, bases: &[u64]) -> Result<bool> {
        let now = self.clock.now_ms();
        let sizes = self.sizes();
        let interval = self.config.index_interval_bytes;
        let rp = self.recovery_point;
        if bases.is_empty() {
            let segment = Segment::create(&self.dir, self.log_start_offset, sizes, now)?;
            self.segments.insert(self.log_start_offset, segment);
            self.recovery_point = self.recovery_point.min(self.log_start_offset);
            // An empty segment vouches for nothing: if a power loss takes its
            // files, the next open creates them again. The first sync of
            // anything appended syncs them and the directory (so a new
            // partition costs no fsync here: thousands are created at once).
            return Ok(false);
        }
        let mut changed = false;
        // The epoch cache as read from its checkpoint: every batch's epoch
        // was recorded there before the batch was written (`append_at`).
        let checkpointed = self.leader_epochs.clone();
        let revalidate_from = bases.iter().rposition(|&b| b <= rp).unwrap_or(0).min(bases.len() - 1);
        let mut expected: Option<u64> = None;
        for (i, &base) in bases.iter().enumerate() {
            let is_last = i == bases.len() - 1;
            let limit = bases.get(i + 1).copied().unwrap_or(u64::MAX);
            if let Some(e) = expected
                && e != base
            {
                let what = format!("offsets {e}..{base} are missing: this segment does not continue the log");
                self.below_recovery_point(e, &self.dir.join(file_name(base, "log")), 0, what)?;
                tracing::warn!(dir = %self.dir.display(), base, expected = e, "segment does not continue the log, above the recovery point; removing it and all later segments");
                self.delete_segment_files_from(&bases[i..])?;
                changed = true;
                break;
            }
            if i < revalidate_from {
                let mut segment = Segment::open(&self.dir, base, now, None)?;
                segment.load_trusted(interval, limit, rp)?;
                expected = Some(segment.next_offset());
                self.segments.insert(base, segment);
                continue;
            }
            let mut segment = Segment::open(&self.dir, base, now, Some(sizes.index_bytes))?;
            let recovered = segment.recover(base, &mut self.leader_epochs, &checkpointed, interval, limit)?;
            let end = segment.next_offset();
            expected = Some(end);
            let path = segment.path().to_path_buf();
            match recovered.tail {
                Tail::Damaged => {
                    let what =
                        recovered.damage.unwrap_or("a torn or damaged batch (framing, CRC, offsets or record count)");
                    self.below_recovery_point(end, &path, recovered.end, what.to_string())?;
                    // Valid data after it (in this file, or later segments
                    // when the damage is not a torn write): report, never cut.
                    let reported = recovered.damage.or_else(|| {
                        (!is_last && !recovered.looks_torn).then_some(
                            "a damaged batch (CRC, framing, offsets or record count) with later segments after it",
                        )
                    });
                    if let Some(what) = reported {
                        return Err(StorageError::DamagedAboveRecoveryPoint {
                            path,
                            position: recovered.end,
                            what: what.to_string(),
                        });
                    }
                    tracing::warn!(path = %path.display(), position = recovered.end, cut_bytes = recovered.cut_bytes, offset = end, "recovery cut a torn or damaged tail after the last valid batch");
                }
                Tail::Zeros if !is_last => {
                    tracing::info!(path = %path.display(), cut_bytes = recovered.cut_bytes, "recovery trimmed preallocated space of a closed segment");
                }
                Tail::Stale => {
                    tracing::debug!(path = %path.display(), position = recovered.end, "ignoring batches a truncation left before the next segment");
                }
                Tail::None | Tail::Zeros => {}
            }
            // Zeros cut from the active segment may come back after a power
            // loss and are cut again; any other cut must stay cut.
            let harmless = match recovered.tail {
                Tail::None => true,
                Tail::Zeros => is_last,
                Tail::Damaged | Tail::Stale => false,
            };
            changed |= !harmless;
            segment.cut_recovered_tail(&recovered)?;
            if !is_last {
                segment.close()?;
            }
            // Re-validated bytes count as durable only once synced.
            self.unsynced.push((end, segment.files()?));
            self.segments.insert(base, segment);
            if recovered.tail == Tail::Damaged && !is_last {
                tracing::warn!(dir = %self.dir.display(), "removing the segments after the damaged one: they follow a hole");
                self.delete_segment_files_from(&bases[i + 1..])?;
                changed = true;
                break;
            }
        }
        let leo = self.leo();
        if leo < rp {
            let last = self.active().path().to_path_buf();
            let what = format!("the log ends at offset {leo}");
            let size = self.active().size();
            self.below_recovery_point(leo, &last, size, what)?;
        }
        self.recovery_point = self.recovery_point.min(leo);
        let sizes = self.sizes();
        self.active_mut().make_active(sizes)?;
        Ok(changed)
    }

    /// The error for damage found at `offset`, if that lies below the
    /// recovery point (data recorded as durable), else `Ok`.
    fn below_recovery_point(&self, offset: u64, path: &Path, position: u64, what: String) -> Result<()> {
        if offset < self.recovery_point {
            return Err(StorageError::CorruptBelowRecoveryPoint {
                path: path.to_path_buf(),
                position,
                recovery_point: Offset(self.recovery_point),
                what,
            });
        }
        Ok(())
    }

    fn delete_segment_files_from(&mut self, bases: &[u64]) -> Result<()> {
        for &base in bases {
            for ext in ["log", "index", "timeindex"] {
                remove_if_exists(&self.dir.join(file_name(base, ext)))?;
            }
        }
        self.dir_generation += 1;
        Ok(())
    }

    fn active(&self) -> &Segment {
        self.segments.values().next_back().expect("a log always has an active segment")
    }

    fn active_mut(&mut self) -> &mut Segment {
        self.segments.values_mut().next_back().expect("a log always has an active segment")
    }

    /// The directory of this log.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The settings in force.
    pub fn config(&self) -> &LogConfig {
        &self.config
    }

    /// Replaces the settings; size and time limits apply from the next
    /// append or retention pass.
    pub fn set_config(&mut self, config: LogConfig) -> Result<()> {
        let problems = config.problems();
        if !problems.is_empty() {
            return Err(StorageError::InvalidArgument(problems.join("; ")));
        }
        self.config = config;
        Ok(())
    }

    /// First readable offset.
    pub fn log_start_offset(&self) -> Offset {
        Offset(self.log_start_offset)
    }

    /// Offset the next appended record gets (LEO).
    pub fn log_end_offset(&self) -> Offset {
        Offset(self.leo())
    }

    fn leo(&self) -> u64 {
        self.active().next_offset()
    }

    /// The high watermark: consumers read below it.
    pub fn high_watermark(&self) -> Offset {
        Offset(self.high_watermark)
    }

    /// Moves the high watermark; it stays within `[log_start, log_end]`.
    pub fn set_high_watermark(&mut self, hw: Offset) {
        debug_assert!(hw.get() <= self.leo(), "hw {hw} beyond leo {}", self.leo());
        self.high_watermark = hw.get().clamp(self.log_start_offset, self.leo());
    }

    /// Offsets below this are durable.
    pub fn recovery_point(&self) -> Offset {
        Offset(self.recovery_point)
    }

    /// The leader-epoch cache.
    pub fn leader_epochs(&self) -> &LeaderEpochCache {
        &self.leader_epochs
    }

    /// Number of segments, the active one included.
    pub fn segment_count(&self) -> usize {
        self.segments.len()
    }

    /// Bytes of batch data in all segments.
    pub fn size_bytes(&self) -> u64 {
        self.segments.values().map(Segment::size).sum()
    }

    /// Why the log failed, if it did (see [`Log::fail`]).
    pub fn failure(&self) -> Option<&str> {
        self.failed.as_deref()
    }

    /// Fails the log after an I/O error that may have lost data (a failed
    /// fsync): from now on it refuses appends, truncations, reads and syncs
    /// with [`StorageError::LogFailed`], until it is reopened (which
    /// recovers it from what the disk holds).
    pub fn fail(&mut self, reason: &dyn std::fmt::Display) {
        if self.failed.is_none() {
            let reason = reason.to_string();
            tracing::error!(dir = %self.dir.display(), %reason, "log failed: it takes no more writes or reads until the broker restarts and recovers it");
            self.failed = Some(reason);
        }
    }

    fn check_not_failed(&self) -> Result<()> {
        match &self.failed {
            Some(reason) => Err(StorageError::LogFailed { reason: reason.clone() }),
            None => Ok(()),
        }
    }

    /// Appends a validated batch as leader: assigns offsets from the log end
    /// and stamps `leader_epoch`, patching 12 header bytes (never
    /// re-encoding). An epoch older than the log's latest is refused, and a
    /// batch with a producer id must be the next in its producer's sequence
    /// ([`StorageError::DuplicateBatch`] for a retry of one of its last
    /// batches, [`StorageError::ProducerState`] otherwise). On error the log
    /// is unchanged.
    pub fn append(&mut self, batch: &RecordBatch, leader_epoch: u32) -> Result<AppendInfo> {
        self.check_not_failed()?;
        if let Some(latest) = self.leader_epochs.latest_epoch()
            && leader_epoch < latest
        {
            return Err(StorageError::StaleLeaderEpoch { epoch: leader_epoch, latest });
        }
        self.check_producer(batch)?;
        let base = self.leo();
        let epoch =
            i32::try_from(leader_epoch).map_err(|_| StorageError::InvalidArgument("leader epoch too large".into()))?;
        self.append_at(batch, base, epoch)
    }

    /// Records that `epoch` begins at the log end (a broker becoming leader
    /// in `epoch`), durably, so a follower asking for the end of an older
    /// epoch is answered from here on, before any batch of `epoch` exists.
    /// An epoch older than the latest is refused; the latest is kept.
    ///
    /// (Written at once, not before the first batch: the file must be on
    /// disk before any batch of the epoch can reach it, and writing it on
    /// the produce path put three syncs in the first produce of every
    /// partition after each election.)
    pub fn begin_leader_epoch(&mut self, epoch: u32) -> Result<()> {
        self.check_not_failed()?;
        match self.leader_epochs.latest_epoch() {
            Some(latest) if latest > epoch => Err(StorageError::StaleLeaderEpoch { epoch, latest }),
            Some(latest) if latest == epoch => Ok(()),
            _ => {
                let mut epochs = self.leader_epochs.clone();
                epochs.assign(epoch, Offset(self.leo()));
                self.writer.write_epochs_now(&epochs)?;
                self.leader_epochs = epochs;
                self.epochs_unwritten = false;
                Ok(())
            }
        }
    }

    /// Kafka's OffsetsForLeaderEpoch answer for `epoch` on this log (see
    /// [`LeaderEpochCache::end_offset_for`]).
    pub fn end_offset_for_epoch(&self, epoch: u32) -> Option<(u32, Offset)> {
        self.leader_epochs.end_offset_for(epoch, Offset(self.leo()))
    }

    /// Appends a batch as a follower, keeping the leader's offsets and epoch.
    /// The batch must start at the log end offset, hold no more records than
    /// its offsets span (a cleaned batch may hold fewer, or none), and carry
    /// an epoch no older than the log's latest. On error the log is
    /// unchanged.
    pub fn append_replica(&mut self, batch: &RecordBatch) -> Result<AppendInfo> {
        self.check_not_failed()?;
        let h = batch.header();
        let leo = self.leo();
        if h.base_offset() < leo as i64 && h.record_count() == 0 && h.last_offset() >= leo as i64 {
            // The leader's cleaner covered removed batches with one filler,
            // and this log ends inside it: take the part from here on (what
            // this log holds before it are records the leader removed).
            let delta = i32::try_from(h.last_offset() - leo as i64).expect("within the filler's span");
            let mut rest = RecordBatch::filler(delta, h.base_timestamp(), h.max_timestamp()).into_bytes().to_vec();
            tally_proto::batch::set_base_offset(&mut rest, leo as i64);
            tally_proto::batch::set_partition_leader_epoch(&mut rest, h.partition_leader_epoch());
            let rest = RecordBatch::check_framing(rest.into()).expect("a filler is well framed");
            return self.append_replica(&rest);
        }
        if h.base_offset() != leo as i64 {
            return Err(StorageError::NonContiguousOffset { expected: Offset(leo), got: h.base_offset() });
        }
        let (delta, count) = (h.last_offset_delta(), h.record_count());
        if delta < 0 || count < 0 || i64::from(count) > i64::from(delta) + 1 {
            return Err(StorageError::InvalidReplicaBatch(format!(
                "lastOffsetDelta {delta} does not fit recordCount {count}"
            )));
        }
        if h.last_offset().checked_add(1).is_none() {
            return Err(StorageError::InvalidReplicaBatch(format!("last offset {} overflows", h.last_offset())));
        }
        let epoch = h.partition_leader_epoch();
        if epoch < 0 {
            return Err(StorageError::InvalidReplicaBatch(format!("partitionLeaderEpoch {epoch} is not an epoch")));
        }
        if let Some(latest) = self.leader_epochs.latest_epoch()
            && (epoch as u32) < latest
        {
            return Err(StorageError::StaleLeaderEpoch { epoch: epoch as u32, latest });
        }
        self.append_at(batch, leo, epoch)
    }

    fn append_at(&mut self, batch: &RecordBatch, base: u64, epoch: i32) -> Result<AppendInfo> {
        let len = batch.len() as u64;
        let delta = u64::try_from(batch.header().last_offset_delta())
            .map_err(|_| StorageError::InvalidArgument("negative lastOffsetDelta".into()))?;
        let last = base + delta;
        let now = self.clock.now_ms();
        self.make_room(len, last, now)?;
        let interval = self.config.index_interval_bytes;
        let new_epoch = epoch >= 0 && self.leader_epochs.latest_epoch() != Some(epoch as u32);
        if new_epoch || self.epochs_unwritten {
            // The epoch file is written before the batch. If the batch write
            // then fails, the file is put back to the cache in memory
            // (unchanged): otherwise a later append in the old epoch would
            // sit under an epoch that never began, and open would refuse the
            // log as damaged. If even that fails, the log fails.
            let mut epochs = self.leader_epochs.clone();
            if new_epoch {
                epochs.assign(epoch as u32, Offset(base));
            }
            self.writer.write_epochs_now(&epochs)?;
            self.epochs_unwritten = false;
            if let Err(e) = self.active_mut().append(batch, base, epoch, interval, now) {
                if let Err(restore) = self.writer.write_epochs_now(&self.leader_epochs) {
                    self.fail(&restore);
                }
                return Err(e);
            }
            self.leader_epochs = epochs;
        } else {
            self.active_mut().append(batch, base, epoch, interval, now)?;
        }
        let leo = self.leo();
        debug_assert_eq!(leo, last + 1);
        self.record_producer(batch, base, last, now);
        Ok(AppendInfo { base_offset: Offset(base), last_offset: Offset(last), log_end_offset: Offset(leo) })
    }

    /// Rolls if the batch does not fit or the segment is old, and grows an
    /// empty segment that is too small for one oversized batch.
    fn make_room(&mut self, len: u64, last_offset: u64, now: i64) -> Result<()> {
        let active = self.active();
        let too_old = now.saturating_sub(active.created_ms()) >= self.config.segment_ms;
        if !active.is_empty() && (active.is_full_for(len, last_offset) || too_old) {
            self.roll()?;
        }
        let active = self.active_mut();
        if active.is_full_for(len, last_offset) {
            active.grow_for(len)?;
        }
        Ok(())
    }

    /// Closes the active segment and starts a new one at the log end offset.
    /// Does nothing when the active segment is empty.
    pub fn roll(&mut self) -> Result<()> {
        if self.active().is_empty() {
            return Ok(());
        }
        let base = self.leo();
        // Opened first (the indexes hold no descriptor): nothing changed if
        // the process is out of descriptors.
        let files = self.active().files()?;
        let segment = Segment::create(&self.dir, base, self.sizes(), self.clock.now_ms())?;
        if let Err(e) = self.active_mut().close() {
            // Undone, so the next append can roll again (the new files
            // would stand in its way).
            drop(segment);
            for ext in ["log", "index", "timeindex"] {
                let _ = super::fs::remove_if_exists(&self.dir.join(super::segment::file_name(base, ext)));
            }
            return Err(e);
        }
        self.unsynced.push((base, files));
        self.segments.insert(base, segment);
        self.dir_generation += 1;
        // The table as of the new segment's base: an open replays only from
        // here, and retention may delete everything below it.
        self.snapshot_producers();
        Ok(())
    }

    /// Reads whole batches from the one holding `offset`, up to `max_bytes`
    /// (at least one batch, even if larger), never including a batch that
    /// reaches `upper` (exclusive; pass the high watermark for consumers).
    /// Crosses segment boundaries. Fails with `OffsetOutOfRange` outside
    /// `[log_start, log_end]`, and, with `verify_on_read`, with `Corrupt`
    /// rather than return a batch whose CRC does not match.
    pub fn read(&self, offset: Offset, max_bytes: u64, upper: Offset) -> Result<ReadResult> {
        self.check_not_failed()?;
        let leo = self.leo();
        let (offset, upper) = (offset.get(), upper.get());
        if offset < self.log_start_offset || offset > leo {
            return Err(StorageError::OffsetOutOfRange {
                requested: Offset(offset),
                log_start: Offset(self.log_start_offset),
                log_end: Offset(leo),
            });
        }
        let upper = upper.min(leo);
        let mut out = ReadResult { chunks: Vec::new(), next_offset: Offset(offset), bytes: 0, cold: Vec::new() };
        let window = self.config.writeback_window_bytes;
        let active_base = self.active().base_offset();
        if offset >= upper {
            return Ok(out);
        }
        let floor = self.segments.range(..=offset).next_back().map_or(0, |(b, _)| *b);
        for segment in self.segments.range(floor..).map(|(_, s)| s) {
            let position = if out.chunks.is_empty() {
                match segment.find_position(offset)? {
                    Some(p) => p,
                    None => continue,
                }
            } else {
                0
            };
            let budget = max_bytes.saturating_sub(out.bytes);
            let is_active = segment.base_offset() == active_base;
            segment.read_ahead(position, budget);
            let taken =
                segment.read_from(position, budget, upper, out.chunks.is_empty(), self.config.verify_on_read)?;
            let Some((bytes, next)) = taken else { break };
            let cache = self.config.cache_min_free_percent;
            out.cold.extend(segment.cold_read(position, bytes.len() as u64, window, is_active, cache));
            out.bytes += bytes.len() as u64;
            out.next_offset = Offset(next);
            out.chunks.push(bytes);
            if next < segment.next_offset() {
                break;
            }
        }
        Ok(out)
    }

    /// True when a read of up to `max_bytes` from `offset` may have to go to
    /// disk: one of its pages is not in the page cache. Touches no
    /// page of the log, so the answer itself never waits on the disk.
    pub fn may_read_disk(&self, offset: Offset, max_bytes: u64) -> bool {
        let offset = offset.get();
        let floor = self.segments.range(..=offset).next_back().map_or(0, |(b, _)| *b);
        // The read starts at the batch holding `offset`, up to one index
        // interval past the indexed position, and may go on into the
        // following segments.
        let mut left = max_bytes.saturating_add(self.config.index_interval_bytes);
        for (i, segment) in self.segments.range(floor..).map(|(_, s)| s).enumerate() {
            let from = if i == 0 { offset } else { segment.base_offset() };
            let Some(overflow) = segment.resident_from(from, left) else { return true };
            left = overflow;
            if left == 0 {
                break;
            }
        }
        false
    }

    /// The first offset whose record timestamp is >= `timestamp`, with that
    /// timestamp; `None` when every record is older.
    pub fn offset_for_timestamp(&self, timestamp: i64) -> Result<Option<(Offset, i64)>> {
        self.check_not_failed()?;
        for segment in self.segments.values() {
            if segment.max_timestamp().is_some_and(|m| m >= timestamp)
                && segment.next_offset() > self.log_start_offset
                && let Some(found) = segment.offset_for_timestamp(timestamp, self.log_start_offset)?
            {
                return Ok(Some((Offset(found.0), found.1)));
            }
        }
        Ok(None)
    }

    /// The record with the largest timestamp among whole batches below
    /// `upper` (Kafka's max-timestamp query, KIP-734): the first record
    /// carrying it, with that timestamp.
    pub fn max_timestamp_record(&self, upper: Offset) -> Result<Option<(Offset, i64)>> {
        self.check_not_failed()?;
        let mut best: Option<(i64, u64)> = None;
        for segment in self.segments.values() {
            let could_beat = segment.max_timestamp().is_some_and(|m| best.is_none_or(|(ts, _)| m > ts));
            if !could_beat || segment.base_offset() >= upper.get() {
                continue;
            }
            if let Some((ts, base)) = segment.max_timestamp_below(upper.get())?
                && best.is_none_or(|(b, _)| ts > b)
            {
                best = Some((ts, base));
            }
        }
        let Some((ts, base)) = best else { return Ok(None) };
        // The first record at or after the batch's base with that timestamp.
        let holder = self.segments.range(..=base).next_back().map(|(_, s)| s).expect("a batch lies in a segment");
        Ok(holder.offset_for_timestamp(ts, base.max(self.log_start_offset))?.map(|(o, t)| (Offset(o), t)))
    }

    /// Removes every batch at or after the one holding `offset` (followers
    /// call this to match their leader). Returns the new log end offset,
    /// which is at most `offset` and a batch boundary.
    ///
    /// No byte a reader holds changes: the segment holding the cut ends
    /// there (its later bytes stay in the file) and a new segment file
    /// starts at the cut; later segments are unlinked. Durable on return:
    /// the recovery point is lowered first, and the directory is fsynced
    /// after the new segment exists, which is what ends the old one on disk.
    pub fn truncate_to(&mut self, offset: Offset) -> Result<Offset> {
        self.check_not_failed()?;
        let offset = offset.get();
        let leo = self.leo();
        if offset >= leo {
            // No batch to cut, but an epoch that begins at the log end (a
            // leadership that appended nothing) ends here too: a follower
            // that kept it would report it as its last fetched epoch forever.
            let mut epochs = self.leader_epochs.clone();
            if epochs.truncate_from_end(Offset(offset)) {
                self.writer.write_epochs_now(&epochs)?;
                self.leader_epochs = epochs;
            }
            return Ok(Offset(leo));
        }
        if offset < self.log_start_offset {
            return Err(StorageError::InvalidArgument(format!(
                "cannot truncate to {offset}, below the log start offset {}",
                self.log_start_offset
            )));
        }
        let floor = *self.segments.range(..=offset).next_back().expect("offset >= log start").0;
        let cut = self.segments[&floor].batch_base_holding(offset)?.unwrap_or(offset);
        if cut < self.log_start_offset {
            // The batch to cut also holds the log start: nothing readable remains.
            return self.truncate_fully_and_start_at(Offset(self.log_start_offset));
        }
        // A crash from here on re-validates the cut region.
        self.lower_recovery_point(cut)?;
        self.truncations += 1;
        // Later segments go first, the newest first, so a crash leaves a prefix.
        let later: Vec<u64> = self.segments.range(floor + 1..).map(|(b, _)| *b).collect();
        for base in later.into_iter().rev() {
            self.segments.remove(&base).expect("listed").delete()?;
            self.dir_generation += 1;
        }
        if cut == floor {
            self.replace_with_empty(floor)?;
        } else {
            let files = self.segments.get(&floor).expect("floor exists").files()?;
            let segment = Segment::create(&self.dir, cut, self.sizes(), self.clock.now_ms())?;
            let sealed = self.segments.get_mut(&floor).expect("floor exists");
            sealed.seal_at(offset)?;
            sealed.close()?;
            self.segments.insert(cut, segment);
            self.unsynced.retain(|(end, _)| *end <= floor);
            self.unsynced.push((cut, files));
        }
        self.dir_generation += 1;
        self.sync_directory()?;
        let leo = self.leo();
        debug_assert_eq!(leo, cut);
        self.unsynced.retain(|(end, _)| *end <= leo);
        self.high_watermark = self.high_watermark.min(leo);
        if self.leader_epochs.truncate_from_end(Offset(leo)) {
            self.writer.write_epochs_now(&self.leader_epochs)?;
        }
        self.lower_cleaner_offset(leo)?;
        self.rebuild_producers_after_truncation()?;
        Ok(Offset(leo))
    }

    /// A truncation below the cleaner offset makes what follows dirty
    /// again (Kafka's `maybeTruncateCheckpoint`): records appended there
    /// must be mapped, or a tombstone among them could be dropped while
    /// an older value of its key survives below.
    fn lower_cleaner_offset(&mut self, offset: u64) -> Result<()> {
        if self.cleaner_offset > offset {
            self.cleaner_offset = offset;
            self.writer.write_offset_now(Kind::CleanerOffset, Offset(offset))?;
        }
        Ok(())
    }

    /// Lowers the recovery point to `offset`, durably.
    fn lower_recovery_point(&mut self, offset: u64) -> Result<()> {
        if self.recovery_point > offset {
            self.recovery_point = offset;
            self.writer.write_offset_now(Kind::RecoveryPoint, Offset(offset))?;
        }
        Ok(())
    }

    /// fsyncs the directory now (entries created or removed persist). A
    /// failure fails the log, as a failed fsync of its files does: the
    /// entry changes may be lost while a later fsync succeeds.
    fn sync_directory(&mut self) -> Result<()> {
        if let Err(e) = sync_dir(&self.dir) {
            self.fail(&e);
            return Err(e);
        }
        self.synced_dir_generation = self.dir_generation;
        Ok(())
    }

    /// Replaces the segment at `base` by an empty one of the same name. The
    /// old files are renamed aside first (readers keep their maps of them)
    /// and put back if the new segment cannot be made; leftovers of a crash
    /// in between are removed by the next open.
    fn replace_with_empty(&mut self, base: u64) -> Result<()> {
        let aside = |ext: &str| {
            (self.dir.join(file_name(base, ext)), self.dir.join(format!("{}.deleted", file_name(base, ext))))
        };
        let mut moved = Vec::new();
        for ext in ["log", "index", "timeindex"] {
            let (from, to) = aside(ext);
            match std::fs::rename(&from, &to) {
                Ok(()) => moved.push((from, to)),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => {
                    for (from, to) in moved.iter().rev() {
                        let _ = std::fs::rename(to, from);
                    }
                    return Err(io_err("rename", &from)(e));
                }
            }
        }
        match Segment::create(&self.dir, base, self.sizes(), self.clock.now_ms()) {
            Ok(segment) => {
                self.segments.insert(base, segment);
                self.unsynced.retain(|(end, _)| *end <= base);
                for (_, to) in &moved {
                    remove_if_exists(to)?;
                }
                Ok(())
            }
            Err(e) => {
                for (from, to) in moved.iter().rev() {
                    let _ = std::fs::rename(to, from);
                }
                Err(e)
            }
        }
    }

    /// Deletes every segment and starts an empty log at `offset` (a follower
    /// whose leader's log starts past its own end). The recovery point drops
    /// to 0 first, so a crash part way re-validates whatever remains, and
    /// moves to `offset` once the new segment and log start are recorded.
    pub fn truncate_fully_and_start_at(&mut self, offset: Offset) -> Result<Offset> {
        self.check_not_failed()?;
        let offset = offset.get();
        self.lower_recovery_point(0)?;
        self.truncations += 1;
        let last = *self.segments.keys().next_back().expect("a log always has an active segment");
        let older: Vec<u64> = self.segments.keys().copied().filter(|&b| b != last).collect();
        for base in older.into_iter().rev() {
            self.segments.remove(&base).expect("listed").delete()?;
            self.dir_generation += 1;
        }
        self.log_start_offset = self.log_start_offset.max(last);
        if last == offset {
            self.replace_with_empty(offset)?;
        } else {
            let segment = Segment::create(&self.dir, offset, self.sizes(), self.clock.now_ms())?;
            let old = self.segments.remove(&last).expect("listed");
            self.segments.insert(offset, segment);
            old.delete()?;
        }
        self.unsynced.clear();
        self.dir_generation += 1;
        self.sync_directory()?;
        self.log_start_offset = offset;
        self.high_watermark = offset;
        self.leader_epochs = LeaderEpochCache::default();
        self.writer.write_epochs_now(&self.leader_epochs)?;
        self.writer.write_offset_now(Kind::LogStart, Offset(offset))?;
        self.recovery_point = offset;
        self.writer.write_offset_now(Kind::RecoveryPoint, Offset(offset))?;
        self.cleaner_offset = offset;
        self.writer.write_offset_now(Kind::CleanerOffset, Offset(offset))?;
        self.clear_producers()?;
        Ok(Offset(offset))
    }

    /// Makes `offset` the new log start (Kafka's DeleteRecords): offsets
    /// below it are no longer readable, and segments wholly below it are
    /// deleted. `offset` may not pass the high watermark.
    pub fn delete_records_before(&mut self, offset: Offset) -> Result<()> {
        let offset = offset.get();
        if offset > self.high_watermark {
            return Err(StorageError::OffsetOutOfRange {
                requested: Offset(offset),
                log_start: Offset(self.log_start_offset),
                log_end: Offset(self.high_watermark),
            });
        }
        if offset <= self.log_start_offset {
            return Ok(());
        }
        self.log_start_offset = offset;
        self.writer.write_offset_now(Kind::LogStart, Offset(offset))?;
        for segment in self.remove_segments_while(|log, first| first.next_offset() <= log.log_start_offset) {
            segment.delete()?;
        }
        if self.leader_epochs.truncate_from_start(Offset(offset)) {
            self.writer.write_epochs_now(&self.leader_epochs)?;
        }
        Ok(())
    }

    /// Deletes the oldest closed segments that are past `retention_ms` (by
    /// their newest record, but never later than their last append: see
    /// `Segment::retention_time_ms`) or that keep the log above
    /// `retention_bytes`.
    /// Only segments below the high watermark go; the active one never does.
    pub fn enforce_retention(&mut self) -> Result<RetentionOutcome> {
        let (outcome, removed) = self.enforce_retention_deferred();
        removed.finish()?;
        Ok(outcome)
    }

    /// [`Log::enforce_retention`] in two steps: this one takes the segments
    /// out of the log (readers no longer see them) and moves the log start;
    /// [`RemovedSegments::finish`], run outside whatever lock guards the log,
    /// writes the checkpoints and deletes the files. A crash in between
    /// leaves files that the next open loads and the next pass removes.
    pub fn enforce_retention_deferred(&mut self) -> (RetentionOutcome, RemovedSegments) {
        let now = self.clock.now_ms();
        let (retention_ms, retention_bytes) = (self.config.retention_ms, self.config.retention_bytes);
        let mut total = self.size_bytes();
        let removed = self.remove_segments_while(|log, first| {
            let expired = retention_ms.is_some_and(|r| now.saturating_sub(first.retention_time_ms()) > r);
            let oversized = retention_bytes.is_some_and(|r| total.saturating_sub(first.size()) >= r);
            let below_start = first.next_offset() <= log.log_start_offset;
            let deletable = (expired || oversized || below_start) && first.next_offset() <= log.high_watermark;
            if deletable {
                total -= first.size();
            }
            deletable
        });
        let outcome = RetentionOutcome {
            segments_deleted: removed.len(),
            bytes_deleted: removed.iter().map(Segment::size).sum(),
        };
        let mut checkpoints = None;
        if !removed.is_empty() {
            let first_base = *self.segments.keys().next().expect("active remains");
            self.log_start_offset = self.log_start_offset.max(first_base);
            self.leader_epochs.truncate_from_start(Offset(self.log_start_offset));
            checkpoints = Some(self.checkpoint_snapshot());
        }
        (outcome, RemovedSegments { segments: removed, checkpoints })
    }

    fn remove_segments_while(&mut self, mut pred: impl FnMut(&Log, &Segment) -> bool) -> Vec<Segment> {
        let mut removed = Vec::new();
        while self.segments.len() > 1 {
            let first = self.segments.values().next().expect("len > 1");
            if !pred(self, first) {
                break;
            }
            let (_, segment) = self.segments.pop_first().expect("len > 1");
            removed.push(segment);
            self.dir_generation += 1;
        }
        removed
    }

    /// Write-behind work made due by appends since the last call; run it
    /// outside whatever lock guards the log. `None` when there is none or
    /// `writeback_window_bytes` is 0.
    pub fn take_writeback(&mut self) -> Option<Writeback> {
        let window = self.config.writeback_window_bytes;
        let cache = self.config.cache_min_free_percent;
        self.active_mut().take_writeback(window, cache)
    }

    /// What a sync right now would cover. Cheap; does no I/O.
    pub fn sync_plan(&self) -> SyncPlan {
        // Closed segments are synced whole; of the active segment only the
        // `.log`: its indexes are rebuilt by recovery, which always re-reads
        // the last segment.
        let mut plan = self.sync_plan_closed();
        plan.files.push(self.active().log_file().clone());
        plan.up_to = self.leo();
        plan
    }

    /// A sync of the closed segments only, which makes everything below the
    /// active segment durable without waiting on its writes. The broker runs
    /// it periodically so that, with flush `os`, recovery after a crash
    /// re-validates little more than the active segment.
    pub fn sync_plan_closed(&self) -> SyncPlan {
        let files: Vec<Arc<File>> = self.unsynced.iter().flat_map(|(_, f)| f.iter().cloned()).collect();
        let closed = self.unsynced.iter().map(|(end, _)| *end).collect();
        let up_to = self.segments.keys().next_back().copied().unwrap_or(0).max(self.recovery_point);
        SyncPlan {
            files,
            log_dir: self.dir.clone(),
            sync_dir: self.dir_generation > self.synced_dir_generation,
            dir_generation: self.dir_generation,
            truncations: self.truncations,
            up_to,
            closed,
        }
    }

    /// Records that `plan` ran: offsets below its `up_to` are durable.
    /// Returns the recovery point after it. A plan made before a truncation
    /// marks nothing (its files may be gone and the offsets it covered
    /// reused); the next sync covers what it would have.
    ///
    /// On a failed log it marks nothing either: the plan's fsync may have
    /// succeeded only because an earlier one on the same files failed and
    /// Linux dropped their dirty pages.
    pub fn mark_durable(&mut self, plan: &SyncPlan) -> Offset {
        if plan.truncations != self.truncations || self.failed.is_some() {
            return Offset(self.recovery_point);
        }
        let up_to = plan.up_to.min(self.leo());
        self.recovery_point = self.recovery_point.max(up_to);
        self.unsynced.retain(|(end, _)| *end > up_to || !plan.closed.contains(end));
        self.synced_dir_generation = self.synced_dir_generation.max(plan.dir_generation);
        self.last_flush_ms = self.clock.now_ms();
        Offset(self.recovery_point)
    }

    /// Syncs everything appended so far and records the recovery point at
    /// the rate the broker's syncs do ([`Log::recovery_point_after_sync`];
    /// [`Log::close`] writes it always). Returns the offset below which the
    /// log is durable. A failed sync fails the log.
    pub fn flush(&mut self) -> Result<Offset> {
        let durable = self.sync_all()?;
        if let Some(recovery_point) = self.recovery_point_after_sync() {
            recovery_point.write()?;
        }
        Ok(durable)
    }

    /// Syncs everything appended so far, without writing any checkpoint.
    fn sync_all(&mut self) -> Result<Offset> {
        self.check_not_failed()?;
        let plan = self.sync_plan();
        if let Err(e) = plan.execute() {
            self.fail(&e);
            return Err(e);
        }
        Ok(self.mark_durable(&plan))
    }

    /// After a sync: the recovery point to write outside the lock, at most
    /// once per [`RECOVERY_POINT_WRITE_INTERVAL_MS`]. Replacing the file
    /// costs about 100 µs here (create, write, rename: metadata journaling),
    /// half an fdatasync, too much to pay on every sync with `flush =
    /// always`; at this rate it is under 0.1% of a second, and data synced
    /// since the last write stays protected by recovery's rule that damage
    /// with valid data after it is reported, not cut.
    pub fn recovery_point_after_sync(&mut self) -> Option<RecoveryPointSnapshot> {
        let now = self.clock.now_ms();
        if now.saturating_sub(self.recovery_point_taken_ms) < RECOVERY_POINT_WRITE_INTERVAL_MS {
            return None;
        }
        self.recovery_point_taken_ms = now;
        Some(self.recovery_point_snapshot())
    }

    /// The recovery point now, to write after a sync outside whatever lock
    /// guards the log, so that data fsynced above the last periodic
    /// checkpoint is vouched for on disk too (damage in it is then reported
    /// at open rather than cut with everything after it).
    pub fn recovery_point_snapshot(&self) -> RecoveryPointSnapshot {
        RecoveryPointSnapshot::new(&self.writer, Offset(self.recovery_point))
    }

    /// True when the flush policy wants a sync now.
    pub fn flush_due(&self) -> bool {
        if self.failed.is_some() {
            return false;
        }
        match self.config.flush {
            FlushPolicy::IntervalMs(ms) => {
                self.recovery_point < self.leo()
                    && self.clock.now_ms().saturating_sub(self.last_flush_ms) >= i64::try_from(ms).unwrap_or(i64::MAX)
            }
            FlushPolicy::Always | FlushPolicy::Os => false,
        }
    }

    /// The values for the checkpoint files.
    pub fn checkpoints(&self) -> Checkpoints {
        Checkpoints {
            recovery_point: Offset(self.recovery_point),
            log_start_offset: Offset(self.log_start_offset),
            high_watermark: Offset(self.high_watermark),
            leader_epochs: self.leader_epochs.clone(),
        }
    }

    /// The checkpoint values now, to be written outside the log's lock
    /// ([`CheckpointSnapshot::write`]); a snapshot written late never
    /// replaces what a later one or a later change wrote.
    pub fn checkpoint_snapshot(&self) -> CheckpointSnapshot {
        self.writer.snapshot(self.checkpoints())
    }

    /// Flushes, trims the active segment's preallocation and writes every
    /// checkpoint: the next open re-validates nothing but the last segment.
    pub fn close(&mut self) -> Result<()> {
        self.closed = true;
        self.flush()?;
        self.active_mut().close()?;
        self.snapshot_producers();
        self.checkpoint_snapshot().write()
    }

    /// Deletes the log's directory and everything in it.
    pub fn delete(self) -> Result<()> {
        let dir = self.dir.clone();
        drop(self);
        std::fs::remove_dir_all(&dir).map_err(io_err("remove directory", &dir))
    }
}

#[cfg(test)]
#[path = "log_tests.rs"]
mod tests;
