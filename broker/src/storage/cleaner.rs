//! Log compaction: Kafka's log cleaner, one log at a time, synchronous.
//!
//! A pass over a compacted log:
//! 1. Plan, under the log's lock: the closed segments wholly below the
//!    first uncleanable offset (the active segment, the high watermark,
//!    `min_compaction_lag_ms`), as byte slices that stay valid without the
//!    lock, and the cleaner offset where the dirty section starts.
//! 2. Map, without the lock: key hash -> last offset over the dirty section,
//!    in a map of bounded size (`dedupe_buffer_bytes`). A section that does
//!    not fit is mapped up to a batch boundary and cleaned in parts: the map
//!    ends there, and the next pass goes on from it.
//! 3. Rewrite, without the lock: every segment below the map's end, in
//!    groups of consecutive segments up to `segment_bytes`, into one new
//!    segment per group. A record survives if it has a key, no later record
//!    of the section has the same key, and it is not a tombstone past its
//!    delete horizon. Batches keep their offsets and spans; a run of batches
//!    removed whole becomes one empty batch over their offsets (a filler),
//!    so a cleaned log is still a contiguous run of batches: recovery's
//!    checks that offsets continue exactly, and followers' appends, hold as
//!    before, and a read at a removed offset returns the filler, which the
//!    reader steps over.
//! 4. Install each group under the lock (see `log_cleaning.rs` for the
//!    crash-safe swap), then record the new cleaner offset.
//!
//! Replicas clean independently: each looks only below its own high
//! watermark and decides by keys and offsets alone, so what survives on one
//! replica is a superset of what survives a later clean on another.
//!
//! Key hashes are 128-bit xxh3: two distinct keys collide with probability
//! about 2^-128 per pair, which would drop the older one's record. Like
//! Kafka's MD5, this is no defence against keys built to collide.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use tally_proto::batch::{self, RecordBatch, Retained};

use super::log::{CleanPlan, SegmentView, StagedGroup};
use super::segment::Segment;
use super::{CleanStats, Log, Result, StorageError};

/// Bytes of map memory per slot: a 16-byte key hash and an 8-byte offset.
const MAP_ENTRY_BYTES: u64 = 24;

/// The most of its slots the offset map fills (linear probing stays short).
const MAP_LOAD: f64 = 0.9;

/// Key hash -> last offset, in a flat table of `dedupe_buffer_bytes`
/// (Kafka's `SkimpyOffsetMap`): open addressing with linear probing, no
/// allocation per entry, and a pass uses (and touches) only as many slots
/// as its section has records.
struct OffsetMap {
    /// `[hash high, hash low, offset]`; offset `u64::MAX` marks a free slot.
    slots: Vec<[u64; 3]>,
    /// Slots in use this pass (a prefix of `slots`).
    len: usize,
    entries: usize,
}

impl OffsetMap {
    fn new(budget_bytes: u64) -> OffsetMap {
        let most = usize::try_from((budget_bytes / MAP_ENTRY_BYTES).max(16)).unwrap_or(usize::MAX);
        OffsetMap { slots: Vec::with_capacity(most), len: 0, entries: 0 }
    }

    /// Empties the map, sized for up to `records` entries (within budget).
    fn reset(&mut self, records: u64) {
        // Enough slots that `room` holds every record at the load factor.
        let wanted = usize::try_from(records.saturating_mul(10) / 9 + 2).unwrap_or(usize::MAX).max(16);
        self.len = wanted.min(self.slots.capacity());
        self.slots.clear();
        self.slots.resize(self.len, [0, 0, u64::MAX]);
        self.entries = 0;
    }

    /// How many more entries fit.
    fn room(&self) -> usize {
        ((self.len as f64 * MAP_LOAD) as usize).saturating_sub(self.entries)
    }

    fn slot(&self, hash: u128) -> usize {
        ((hash as u64) % self.len as u64) as usize
    }

    fn put(&mut self, hash: u128, offset: u64) {
        let (hi, lo) = ((hash >> 64) as u64, hash as u64);
        let mut i = self.slot(hash);
        loop {
            let s = &mut self.slots[i];
            if s[2] == u64::MAX {
                *s = [hi, lo, offset];
                self.entries += 1;
                return;
            }
            if s[0] == hi && s[1] == lo {
                s[2] = offset;
                return;
            }
            i = if i + 1 == self.len { 0 } else { i + 1 };
        }
    }

    fn get(&self, hash: u128) -> Option<u64> {
        let (hi, lo) = ((hash >> 64) as u64, hash as u64);
        let mut i = self.slot(hash);
        loop {
            let s = &self.slots[i];
            if s[2] == u64::MAX {
                return None;
            }
            if s[0] == hi && s[1] == lo {
                return Some(s[2]);
            }
            i = if i + 1 == self.len { 0 } else { i + 1 };
        }
    }
}

/// Settings of the broker's cleaner, with Kafka's names.
#[derive(Debug, Clone, Copy)]
pub struct CleanerConfig {
    /// `log.cleaner.dedupe.buffer.size`: memory for the offset map. Default
    /// 128 MiB.
    pub dedupe_buffer_bytes: u64,
    /// `log.cleaner.io.max.bytes.per.second`: read and write rate limit;
    /// `None` for none. Default none.
    pub io_max_bytes_per_second: Option<u64>,
}

impl Default for CleanerConfig {
    fn default() -> Self {
        CleanerConfig { dedupe_buffer_bytes: 128 << 20, io_max_bytes_per_second: None }
    }
}

/// Access to a log behind whatever lock guards it: the cleaner holds the
/// lock only to plan and to install, never while it reads or writes.
pub trait LogAccess {
    /// Runs `f` with the log locked.
    fn with_log<R>(&self, f: impl FnOnce(&mut Log) -> R) -> R;
}

impl LogAccess for std::sync::Mutex<Log> {
    fn with_log<R>(&self, f: impl FnOnce(&mut Log) -> R) -> R {
        f(&mut self.lock().unwrap_or_else(std::sync::PoisonError::into_inner))
    }
}

impl LogAccess for std::sync::RwLock<Log> {
    fn with_log<R>(&self, f: impl FnOnce(&mut Log) -> R) -> R {
        f(&mut self.write().unwrap_or_else(std::sync::PoisonError::into_inner))
    }
}

/// What one pass did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CleanOutcome {
    /// Segments rewritten.
    pub segments_before: usize,
    /// Segments they became.
    pub segments_after: usize,
    /// Bytes of the rewritten segments before.
    pub bytes_before: u64,
    /// Bytes of the segments they became.
    pub bytes_after: u64,
    /// Records dropped.
    pub records_removed: u64,
    /// The new cleaner offset: the log is cleaned below it.
    pub cleaner_offset: u64,
    /// False when the log changed under the pass (a truncation, say) and
    /// nothing more was installed.
    pub completed: bool,
}

fn key_hash(key: &[u8]) -> u128 {
    twox_hash::XxHash3_128::oneshot(key)
}

/// The broker's cleaner: its offset map (allocated once, reused by every
/// pass, so its memory is bounded) and its rate limit.
pub struct Cleaner {
    config: CleanerConfig,
    map: OffsetMap,
    throttle: Throttle,
    /// Set to make a pass in progress stop at its next batch.
    stop: Arc<AtomicBool>,
    /// Producer id -> base offset of its last batch in the pass's segments:
    /// that batch is kept, emptied if need be, as Kafka keeps it, so the
    /// producer's last sequence survives for its state.
    last_of_producer: std::collections::HashMap<i64, u64>,
}

impl Cleaner {
    /// A cleaner with an empty map of `dedupe_buffer_bytes`.
    pub fn new(config: CleanerConfig) -> Cleaner {
        Cleaner {
            config,
            map: OffsetMap::new(config.dedupe_buffer_bytes),
            throttle: Throttle::new(config.io_max_bytes_per_second),
            stop: Arc::new(AtomicBool::new(false)),
            last_of_producer: std::collections::HashMap::new(),
        }
    }

    /// A flag that, once set, stops a pass at its next batch (nothing of
    /// the group being written is installed); for a broker shutting down.
    pub fn stop_flag(&self) -> Arc<AtomicBool> {
        self.stop.clone()
    }

    fn check_stop(&self) -> Result<()> {
        if self.stop.load(Ordering::Relaxed) {
            return Err(StorageError::InvalidArgument("cleaning stopped: the broker is shutting down".into()));
        }
        Ok(())
    }

    /// Cleans the log once if it is compacted and due by its own clock (see
    /// [`CleanStats::is_due`]), or whenever it has anything dirty if `force`.
    pub fn clean_if_due<L: LogAccess>(&mut self, log: &L, force: bool) -> Result<Option<CleanOutcome>> {
        let planned = log.with_log(|l| {
            let now_ms = l.now_ms();
            let due = |s: CleanStats| force || l.config().compaction.is_some_and(|c| s.is_due(&c, now_ms));
            let plan = l.cleaning_stats(now_ms).is_some_and(due).then(|| l.clean_plan(now_ms)).flatten();
            plan.map(|p| (p, now_ms))
        });
        let Some((plan, now_ms)) = planned else { return Ok(None) };
        self.clean(log, &plan, now_ms).map(Some)
    }

    fn clean<L: LogAccess>(&mut self, log: &L, plan: &CleanPlan, now_ms: i64) -> Result<CleanOutcome> {
        self.last_of_producer.clear();
        for segment in &plan.segments {
            for_each_header(&segment.bytes, |h| {
                if h.producer_id() >= 0 {
                    self.last_of_producer.insert(h.producer_id(), h.base_offset() as u64);
                }
            });
        }
        let map_end = self.build_map(plan)?;
        let mut outcome = CleanOutcome { cleaner_offset: map_end, completed: true, ..CleanOutcome::default() };
        let rewrite: Vec<&SegmentView> = plan.segments.iter().filter(|s| s.base < map_end).collect();
        let pass = Pass { map_end, now_ms, delete_horizon: now_ms.saturating_add(plan.compaction.delete_retention_ms) };
        for group in groups(&rewrite, plan.sizes.log_bytes) {
            let staged = self.rewrite_group(plan, group, pass, &mut outcome)?;
            let installed = log.with_log(|l| l.install_cleaned(&staged, plan.truncations));
            match installed {
                Ok(Some(retired)) => {
                    drop(staged);
                    retired.finish()?;
                }
                Ok(None) => {
                    staged.discard(&plan.dir);
                    outcome.completed = false;
                    return Ok(outcome);
                }
                Err(e) => {
                    staged.discard(&plan.dir);
                    return Err(e);
                }
            }
        }
        log.with_log(|l| l.set_cleaner_offset(map_end, plan.truncations))?;
        Ok(outcome)
    }

    /// Maps every key of the dirty section to its last offset, until the map
    /// is full. Returns where the map ends: records at or above it are left
    /// as they are.
    fn build_map(&mut self, plan: &CleanPlan) -> Result<u64> {
        let dirty: Vec<&SegmentView> = plan.segments.iter().filter(|s| s.next > plan.cleaner_offset).collect();
        // The section's record count bounds its keys: the map is sized (and
        // its memory touched) for that, within the budget.
        let records: u64 = dirty.iter().map(|s| record_count(&s.bytes)).sum();
        self.map.reset(records);
        let mut end = plan.cleaner_offset;
        for segment in dirty {
            for batch in batches(segment) {
                self.check_stop()?;
                let batch = batch?;
                let h = batch.header();
                if h.is_control() || (h.last_offset() as u64) < plan.cleaner_offset {
                    continue;
                }
                let count = h.record_count().max(0) as usize;
                if count > self.map.room() {
                    if end == plan.cleaner_offset {
                        return Err(StorageError::InvalidArgument(format!(
                            "the cleaner's dedupe buffer ({} bytes) cannot hold one batch of {count} records",
                            self.config.dedupe_buffer_bytes
                        )));
                    }
                    return Ok(end);
                }
                let map = &mut self.map;
                batch
                    .for_each_key(|offset, key| {
                        if let Some(key) = key {
                            map.put(key_hash(key), offset as u64);
                        }
                    })
                    .map_err(|e| corrupt(segment, 0, e))?;
                end = h.next_offset() as u64;
                self.throttle.account(batch.len() as u64);
            }
            end = end.max(segment.next);
        }
        Ok(end)
    }

    /// Writes the cleaned group as `B.*.cleaned`, closed and fsynced.
    fn rewrite_group(
        &mut self,
        plan: &CleanPlan,
        group: &[&SegmentView],
        pass: Pass,
        outcome: &mut CleanOutcome,
    ) -> Result<StagedGroup> {
        let now_ms = pass.now_ms;
        let base = group[0].base;
        let input: u64 = group.iter().map(|s| s.bytes.len() as u64).sum();
        // Rewritten batches are rarely larger than they were (a recompressed
        // one, a horizon's rebased timestamps): room for twice the input.
        let log_bytes = input.saturating_mul(2).saturating_add(1 << 20).min(u64::from(u32::MAX));
        // Indexes for every entry the output can need (an entry needs an
        // index interval of bytes since the last), whatever
        // segment_index_bytes; they are allocated as they fill.
        let entries = log_bytes / plan.index_interval_bytes.max(1) + 64;
        let index_bytes = plan.sizes.index_bytes.max(entries.saturating_mul(12));
        let sizes = super::segment::SegmentSizes { log_bytes, index_bytes };
        let dir = &plan.dir;
        let _ = super::fs::remove_if_exists(&dir.join(super::segment::file_name(base, "log.cleaned")));
        let mut out = Segment::create_named(dir, base, super::log::CLEANED, sizes, now_ms)?;
        let result = self.fill(&mut out, plan, group, pass, outcome);
        let last_append_ms = group.iter().map(|s| s.last_append_ms).max().unwrap_or(now_ms);
        let result = result.and_then(|()| finish_staged(&mut out, last_append_ms));
        let staged = StagedGroup {
            segment: out,
            replaces: group.iter().map(|s| (s.base, s.next, s.bytes.len() as u64)).collect(),
            last_append_ms,
        };
        if let Err(e) = result {
            staged.discard(dir);
            return Err(e);
        }
        outcome.segments_before += group.len();
        outcome.segments_after += 1;
        outcome.bytes_before += input;
        outcome.bytes_after += staged.segment.size();
        Ok(staged)
    }

    fn fill(
        &mut self,
        out: &mut Segment,
        plan: &CleanPlan,
        group: &[&SegmentView],
        pass: Pass,
        outcome: &mut CleanOutcome,
    ) -> Result<()> {
        let Pass { map_end, now_ms, delete_horizon } = pass;
        let interval = plan.index_interval_bytes;
        // Batches removed whole, not yet covered by a filler.
        let mut removed: Option<Removed> = None;
        for segment in group {
            for batch in batches(segment) {
                self.check_stop()?;
                let batch = batch?;
                let h = batch.header();
                let (base, epoch, count_before) =
                    (h.base_offset() as u64, h.partition_leader_epoch(), h.record_count());
                let last = h.last_offset() as u64;
                let total = h.total_size().max(0) as u64;
                let producers_last = h.producer_id() >= 0 && self.last_of_producer.get(&h.producer_id()) == Some(&base);
                let kept = if base >= map_end || h.is_control() {
                    Retained::Unchanged
                } else {
                    let horizon = batch.delete_horizon_ms();
                    let map = &self.map;
                    let keep = |offset: i64, key: Option<&[u8]>, has_value: bool| {
                        let Some(key) = key else { return false };
                        if map.get(key_hash(key)).is_some_and(|latest| latest > offset as u64) {
                            return false;
                        }
                        // The latest record of its key: a tombstone goes once
                        // its horizon has passed.
                        has_value || horizon.is_none_or(|h| now_ms < h)
                    };
                    batch.retain(keep, delete_horizon).map_err(|e| corrupt(segment, 0, e))?
                };
                self.throttle.account(total);
                let written = match kept {
                    Retained::Unchanged => batch,
                    Retained::Rewritten(b) => {
                        outcome.records_removed += (count_before - b.header().record_count()).max(0) as u64;
                        b
                    }
                    Retained::Empty if producers_last => {
                        outcome.records_removed += count_before.max(0) as u64;
                        batch.emptied()
                    }
                    Retained::Empty => {
                        outcome.records_removed += count_before.max(0) as u64;
                        let joins =
                            removed.as_ref().is_some_and(|r| r.epoch == epoch && last - r.base <= i32::MAX as u64);
                        if joins {
                            removed.as_mut().expect("joins").last = last;
                        } else {
                            self.write_filler(out, removed.take(), interval, now_ms)?;
                            removed = Some(Removed { base, last, epoch });
                        }
                        continue;
                    }
                };
                self.write_filler(out, removed.take(), interval, now_ms)?;
                self.write(out, &written, base, epoch, interval, now_ms)?;
            }
        }
        self.write_filler(out, removed.take(), interval, now_ms)
    }

    /// Covers a run of removed batches with one empty batch, so the cleaned
    /// segment stays a contiguous run of batches.
    fn write_filler(&mut self, out: &mut Segment, removed: Option<Removed>, interval: u64, now_ms: i64) -> Result<()> {
        let Some(r) = removed else { return Ok(()) };
        let delta = i32::try_from(r.last - r.base).expect("runs are split to fit");
        // No timestamp: a filler holds no record for a time lookup to find.
        let filler = RecordBatch::filler(delta, -1, -1);
        self.write(out, &filler, r.base, r.epoch, interval, now_ms)
    }

    fn write(
        &mut self,
        out: &mut Segment,
        batch: &RecordBatch,
        base: u64,
        epoch: i32,
        interval: u64,
        now_ms: i64,
    ) -> Result<()> {
        let last = base + batch.header().last_offset_delta().max(0) as u64;
        if out.is_full_for(batch.len() as u64, last) {
            return Err(StorageError::InvalidArgument(format!(
                "the cleaned segment {} outgrew its {} bytes",
                out.base_offset(),
                out.size()
            )));
        }
        out.append(batch, base, epoch, interval, now_ms)?;
        self.throttle.account(batch.len() as u64);
        Ok(())
    }
}

/// What one pass decides by, the same for every group it rewrites.
#[derive(Debug, Clone, Copy)]
struct Pass {
    /// The offset map covers the dirty section below this; batches at or
    /// above it are left as they are.
    map_end: u64,
    /// The log's clock when the pass planned.
    now_ms: i64,
    /// The horizon given to tombstones this pass keeps for the first time.
    delete_horizon: i64,
}

/// A run of batches removed whole, with one leader epoch.
struct Removed {
    base: u64,
    last: u64,
    epoch: i32,
}

/// Closes the staged segment, gives it the replaced segments' last append
/// time as its mtime, and fsyncs its files.
fn finish_staged(out: &mut Segment, last_append_ms: i64) -> Result<()> {
    out.close()?;
    let mtime = std::time::UNIX_EPOCH + Duration::from_millis(u64::try_from(last_append_ms).unwrap_or(0));
    out.log_file().set_modified(mtime).map_err(super::error::io_err("set mtime", out.path()))?;
    for file in out.files()? {
        super::fs::sync_data(&file, out.path())?;
    }
    Ok(())
}

/// Consecutive segments, each group up to `max_bytes` of input (at least
/// one segment) and an offset span a segment's 32-bit index can address.
fn groups<'a>(segments: &'a [&'a SegmentView], max_bytes: u64) -> Vec<&'a [&'a SegmentView]> {
    let mut out = Vec::new();
    let mut start = 0;
    while start < segments.len() {
        let mut end = start + 1;
        let mut bytes = segments[start].bytes.len() as u64;
        while end < segments.len() {
            let next = segments[end];
            let span = next.next - segments[start].base;
            if bytes + next.bytes.len() as u64 > max_bytes || span > i32::MAX as u64 {
                break;
            }
            bytes += next.bytes.len() as u64;
            end += 1;
        }
        out.push(&segments[start..end]);
        start = end;
    }
    out
}

/// Calls `f` with each batch header of a segment's bytes (no CRC check:
/// for sizing and bookkeeping; the batches are checked when read).
fn for_each_header(bytes: &[u8], mut f: impl FnMut(&batch::BatchHeader<'_>)) {
    let mut position = 0usize;
    while position < bytes.len() {
        let Some(total) = batch::batch_size_at(&bytes[position..]).filter(|t| *t >= batch::HEADER_LEN) else {
            return;
        };
        if let Ok(h) = batch::BatchHeader::new(&bytes[position..]) {
            f(&h);
        }
        position += total;
    }
}

/// Records in a segment's bytes, from the batch headers alone (an upper
/// bound for sizing the map).
fn record_count(bytes: &[u8]) -> u64 {
    let mut records = 0u64;
    for_each_header(bytes, |h| records += h.record_count().max(0) as u64);
    records
}

/// The batches of a segment's bytes, each CRC-checked, one at a time (a
/// segment of small batches must not cost memory per batch).
fn batches(segment: &SegmentView) -> Batches<'_> {
    Batches { segment, position: 0 }
}

struct Batches<'a> {
    segment: &'a SegmentView,
    position: usize,
}

impl Iterator for Batches<'_> {
    type Item = Result<RecordBatch>;

    fn next(&mut self) -> Option<Self::Item> {
        let bytes = &self.segment.bytes;
        let position = self.position;
        if position >= bytes.len() {
            return None;
        }
        let one = batch::batch_size_at(&bytes[position..])
            .filter(|t| *t >= batch::HEADER_LEN && position + t <= bytes.len())
            .ok_or(batch::BatchError::Truncated { needed: batch::HEADER_LEN, available: bytes.len() - position })
            .and_then(|total| {
                self.position += total;
                RecordBatch::check_framing(bytes.slice(position..position + total))
            });
        if one.is_err() {
            self.position = bytes.len();
        }
        Some(one.map_err(|e| corrupt(self.segment, position as u64, e)))
    }
}

fn corrupt(segment: &SegmentView, position: u64, reason: batch::BatchError) -> StorageError {
    StorageError::Corrupt { path: std::path::PathBuf::from(format!("segment {}", segment.base)), position, reason }
}

/// A rate limit on the bytes a pass reads and writes.
struct Throttle {
    rate: Option<u64>,
    began: Instant,
    bytes: u64,
}

impl Throttle {
    fn new(rate: Option<u64>) -> Throttle {
        Throttle { rate, began: Instant::now(), bytes: 0 }
    }

    /// Counts `bytes` and sleeps while the pass is ahead of its rate.
    fn account(&mut self, bytes: u64) {
        let Some(rate) = self.rate.filter(|r| *r > 0) else { return };
        self.bytes += bytes;
        let due = Duration::from_secs_f64(self.bytes as f64 / rate as f64);
        let elapsed = self.began.elapsed();
        if due > elapsed {
            std::thread::sleep(due - elapsed);
        }
        if elapsed > Duration::from_secs(10) {
            // A fresh window, so an idle spell is not banked as credit.
            self.began = Instant::now();
            self.bytes = 0;
        }
    }
}

#[cfg(test)]
#[path = "cleaner_tests.rs"]
mod tests;
