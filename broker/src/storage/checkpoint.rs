//! Small state files beside the segments, replaced atomically, the writer
//! that serializes them, and the leader-epoch cache (epoch -> first offset
//! written in that epoch, KIP-101).
//!
//! Invariants:
//! - Every checkpoint file of a log is written by its [`CheckpointWriter`],
//!   one write at a time, so two writers never share a temp file, and a
//!   value taken earlier never replaces one taken later (each value carries
//!   the sequence number it was taken under the log's lock with).
//! - A file that exists but does not parse (wrong version line, wrong count,
//!   junk) is never read as 0: [`Checkpoints::read`] reports it, and the log
//!   falls back to a full recovery or refuses to open.

use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

use super::error::io_err;
use super::fs::{replace_unsynced, write_atomic};
use super::{Offset, Result, StorageError};

const RECOVERY_POINT: &str = "recovery-point-checkpoint";
const LOG_START: &str = "log-start-offset-checkpoint";
const HIGH_WATERMARK: &str = "high-watermark-checkpoint";
const LEADER_EPOCH: &str = "leader-epoch-checkpoint";
const CLEANER_OFFSET: &str = "cleaner-offset-checkpoint";
const VERSION: &str = "0";

/// One leader epoch and the first offset appended in it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EpochEntry {
    /// The leader epoch.
    pub epoch: u32,
    /// First offset written under it.
    pub start_offset: Offset,
}

/// Epoch -> start offset, strictly ascending in epochs and in offsets.
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

    /// Records that `epoch` starts at `offset`, as Kafka's
    /// `LeaderEpochFileCache.assign` does: nothing changes when `epoch` is
    /// the latest and starts no later; otherwise every entry that conflicts
    /// with the new one (an epoch at or above it, or a start at or after its
    /// start) is removed from the end first, so the cache stays monotonic.
    /// Returns true when the cache changed.
    pub fn assign(&mut self, epoch: u32, offset: Offset) -> bool {
        if let Some(last) = self.entries.last()
            && last.epoch == epoch
            && last.start_offset <= offset
        {
            return false;
        }
        let keep = self.entries.iter().rposition(|e| e.epoch < epoch && e.start_offset < offset).map_or(0, |i| i + 1);
        let removed = self.entries.len() - keep;
        if removed > 1 || (removed == 1 && self.entries[keep].start_offset != offset) {
            tracing::warn!(epoch, start_offset = %offset, removed = ?&self.entries[keep..], "new leader epoch entry replaces conflicting entries");
        }
        self.entries.truncate(keep);
        self.entries.push(EpochEntry { epoch, start_offset: offset });
        true
    }

    /// The answer to a follower's OffsetsForLeaderEpoch for `epoch`, as Kafka
    /// gives it: `None` (UNDEFINED) when `epoch` is above the latest epoch or
    /// the cache is empty; the latest epoch and `log_end` when `epoch` is the
    /// latest; otherwise the largest epoch at or below `epoch` (or `epoch`
    /// itself when it is below the earliest) and the start offset of the
    /// first epoch above it.
    pub fn end_offset_for(&self, epoch: u32, log_end: Offset) -> Option<(u32, Offset)> {
        let latest = self.entries.last()?;
        if latest.epoch == epoch {
            return Some((epoch, log_end));
        }
        let higher = self.entries.iter().position(|e| e.epoch > epoch)?;
        let answer_epoch = if higher == 0 { epoch } else { self.entries[higher - 1].epoch };
        Some((answer_epoch, self.entries[higher].start_offset))
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

    fn encode(&self) -> String {
        let mut text = format!("{VERSION}\n{}\n", self.entries.len());
        for e in &self.entries {
            text.push_str(&format!("{} {}\n", e.epoch, e.start_offset));
        }
        text
    }

    fn decode(text: &str) -> std::result::Result<LeaderEpochCache, String> {
        let mut lines = text.lines();
        check_version(lines.next())?;
        let count: usize =
            lines.next().ok_or("no entry count line")?.trim().parse().map_err(|e| format!("bad entry count: {e}"))?;
        let mut cache = LeaderEpochCache::default();
        for (i, line) in lines.by_ref().take(count).enumerate() {
            let mut parts = line.split_whitespace();
            let (Some(e), Some(o), None) = (parts.next(), parts.next(), parts.next()) else {
                return Err(format!("entry {i} is not `epoch offset`: {line:?}"));
            };
            let epoch: u32 = e.parse().map_err(|err| format!("entry {i}: bad epoch {e:?}: {err}"))?;
            let start_offset = Offset(o.parse().map_err(|err| format!("entry {i}: bad offset {o:?}: {err}"))?);
            if let Some(last) = cache.entries.last()
                && (last.epoch >= epoch || last.start_offset >= start_offset)
            {
                return Err(format!(
                    "entry {i} ({epoch} {start_offset}) does not follow ({} {})",
                    last.epoch, last.start_offset
                ));
            }
            cache.entries.push(EpochEntry { epoch, start_offset });
        }
        if cache.entries.len() != count {
            return Err(format!("count line says {count} entries, found {}", cache.entries.len()));
        }
        if let Some(extra) = lines.find(|l| !l.trim().is_empty()) {
            return Err(format!("unexpected line after {count} entries: {extra:?}"));
        }
        Ok(cache)
    }
}

fn check_version(line: Option<&str>) -> std::result::Result<(), String> {
    match line.map(str::trim) {
        Some(VERSION) => Ok(()),
        Some(other) => Err(format!("unsupported version {other:?} (expected {VERSION})")),
        None => Err("empty file".to_string()),
    }
}

fn encode_offset(offset: Offset) -> String {
    format!("{VERSION}\n{offset}\n")
}

fn decode_offset(text: &str) -> std::result::Result<Offset, String> {
    let mut lines = text.lines();
    check_version(lines.next())?;
    let value = lines.next().ok_or("no value line")?.trim();
    let offset = value.parse().map(Offset).map_err(|e| format!("bad offset {value:?}: {e}"))?;
    if let Some(extra) = lines.find(|l| !l.trim().is_empty()) {
        return Err(format!("unexpected line after the value: {extra:?}"));
    }
    Ok(offset)
}

/// The cleaner offset of the log in `dir`: where its last clean ended, or
/// 0 when it was never cleaned. A file that does not parse reads as 0 (the
/// whole log counts as uncleaned, which only costs a clean).
pub(crate) fn read_cleaner_offset(dir: &Path) -> Result<Offset> {
    match read_file(&dir.join(CLEANER_OFFSET), decode_offset)? {
        Some(Ok(offset)) => Ok(offset),
        Some(Err(reason)) => {
            tracing::warn!(dir = %dir.display(), reason, "unreadable cleaner offset checkpoint; the log counts as uncleaned");
            Ok(Offset(0))
        }
        None => Ok(Offset(0)),
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
    ///
    /// A file that does not parse is never taken as 0. A bad recovery-point,
    /// high-watermark or leader-epoch file is logged and replaced by what a
    /// full recovery rebuilds (recovery point 0, high watermark 0 clamped to
    /// the log start, epochs read back from every batch). A bad log-start
    /// file is an error ([`StorageError::CorruptCheckpoint`]): guessing it
    /// could bring back records that DeleteRecords removed.
    pub fn read(dir: &Path) -> Result<Checkpoints> {
        let log_start_offset = match read_file(&dir.join(LOG_START), decode_offset)? {
            Some(Ok(o)) => o,
            Some(Err(reason)) => return Err(StorageError::CorruptCheckpoint { path: dir.join(LOG_START), reason }),
            None => Offset(0),
        };
        let mut full_recovery = false;
        let recovery_point = lenient(dir, RECOVERY_POINT, decode_offset, &mut full_recovery)?;
        let high_watermark = lenient(dir, HIGH_WATERMARK, decode_offset, &mut full_recovery)?;
        let leader_epochs = lenient(dir, LEADER_EPOCH, LeaderEpochCache::decode, &mut full_recovery)?;
        if full_recovery {
            return Ok(Checkpoints { log_start_offset, ..Checkpoints::default() });
        }
        Ok(Checkpoints {
            recovery_point: recovery_point.unwrap_or_default(),
            log_start_offset,
            high_watermark: high_watermark.unwrap_or_default(),
            leader_epochs: leader_epochs.unwrap_or_default(),
        })
    }
}

/// Reads a checkpoint whose loss a full recovery makes up for: a file that
/// does not parse is logged and sets `full_recovery`.
fn lenient<T>(
    dir: &Path,
    name: &str,
    decode: impl FnOnce(&str) -> std::result::Result<T, String>,
    full_recovery: &mut bool,
) -> Result<Option<T>> {
    let path = dir.join(name);
    match read_file(&path, decode)? {
        Some(Ok(v)) => Ok(Some(v)),
        Some(Err(reason)) => {
            tracing::warn!(path = %path.display(), %reason, "checkpoint file does not parse; recovering the whole log instead");
            *full_recovery = true;
            Ok(None)
        }
        None => Ok(None),
    }
}

fn read_file<T>(
    path: &PathBuf,
    decode: impl FnOnce(&str) -> std::result::Result<T, String>,
) -> Result<Option<std::result::Result<T, String>>> {
    match std::fs::read(path) {
        Ok(bytes) => Ok(Some(String::from_utf8(bytes).map_err(|_| "not UTF-8".to_string()).and_then(|t| decode(&t)))),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(io_err("read", path)(e)),
    }
}

/// Values of a log's checkpoints, taken under the log's lock, to be written
/// outside it with [`CheckpointSnapshot::write`]. Writing a snapshot never
/// replaces what a later snapshot or change already wrote.
#[derive(Debug, Clone)]
#[must_use = "a snapshot does nothing until written"]
pub struct CheckpointSnapshot {
    pub(crate) values: Checkpoints,
    seq: u64,
    writer: std::sync::Arc<CheckpointWriter>,
}

impl CheckpointSnapshot {
    /// The values.
    pub fn values(&self) -> &Checkpoints {
        &self.values
    }

    /// Writes the files whose values changed since they were last written.
    /// The leader-epoch file goes first and the recovery point last: the
    /// recovery point vouches for the data below it, epochs included.
    pub fn write(&self) -> Result<()> {
        let v = &self.values;
        self.writer.write(self.seq, Kind::LeaderEpoch, v.leader_epochs.encode())?;
        self.writer.write(self.seq, Kind::LogStart, encode_offset(v.log_start_offset))?;
        self.writer.write(self.seq, Kind::HighWatermark, encode_offset(v.high_watermark))?;
        self.writer.write(self.seq, Kind::RecoveryPoint, encode_offset(v.recovery_point))
    }
}

/// The recovery point as a sync just left it, taken under the log's lock,
/// to be written outside it with [`RecoveryPointSnapshot::write`].
#[derive(Debug, Clone)]
#[must_use = "a snapshot does nothing until written"]
pub struct RecoveryPointSnapshot {
    offset: Offset,
    seq: u64,
    writer: std::sync::Arc<CheckpointWriter>,
}

impl RecoveryPointSnapshot {
    pub(crate) fn new(writer: &std::sync::Arc<CheckpointWriter>, offset: Offset) -> RecoveryPointSnapshot {
        RecoveryPointSnapshot { offset, seq: writer.next_seq(), writer: writer.clone() }
    }

    /// The recovery point.
    pub fn offset(&self) -> Offset {
        self.offset
    }

    /// Replaces the recovery-point file (temp file and rename, no fsync):
    /// it costs no fsync next to the sync it follows. Safe without one: the
    /// data below the value was fsynced before it was taken, so whichever
    /// file a power loss leaves (the old value, the new one, or an empty
    /// file that reads as "recover everything") never vouches for data
    /// that is not on disk. The periodic checkpoint and close make it
    /// durable. Never replaces a value taken later.
    pub fn write(&self) -> Result<()> {
        self.writer.write_recovery_point_unsynced(self.seq, self.offset)
    }
}

/// One checkpoint file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Kind {
    RecoveryPoint = 0,
    LogStart = 1,
    HighWatermark = 2,
    LeaderEpoch = 3,
    /// Where the last clean of a compacted log ended (Kafka's
    /// `cleaner-offset-checkpoint`): below it the log was cleaned.
    CleanerOffset = 4,
}

impl Kind {
    fn file_name(self) -> &'static str {
        match self {
            Kind::RecoveryPoint => RECOVERY_POINT,
            Kind::LogStart => LOG_START,
            Kind::HighWatermark => HIGH_WATERMARK,
            Kind::LeaderEpoch => LEADER_EPOCH,
            Kind::CleanerOffset => CLEANER_OFFSET,
        }
    }
}

/// The one writer of a log's checkpoint files (see the module invariants).
/// Its lock is held across the file write on purpose: that is what
/// serializes writers. It never takes the log's lock.
#[derive(Debug)]
pub(crate) struct CheckpointWriter {
    dir: PathBuf,
    seq: AtomicU64,
    /// Per file: the sequence number and contents last written, and
    /// whether that write was fsynced.
    written: Mutex<[Option<(u64, String, bool)>; 5]>,
}

impl CheckpointWriter {
    pub(crate) fn new(dir: &Path) -> CheckpointWriter {
        CheckpointWriter { dir: dir.to_path_buf(), seq: AtomicU64::new(1), written: Mutex::new(Default::default()) }
    }

    /// A sequence number for values taken now (under the log's lock).
    pub(crate) fn next_seq(&self) -> u64 {
        self.seq.fetch_add(1, Ordering::SeqCst)
    }

    pub(crate) fn snapshot(self: &std::sync::Arc<Self>, values: Checkpoints) -> CheckpointSnapshot {
        CheckpointSnapshot { values, seq: self.next_seq(), writer: self.clone() }
    }

    /// Writes one file now, with a fresh sequence number.
    pub(crate) fn write_now(&self, kind: Kind, contents: String) -> Result<()> {
        self.write(self.next_seq(), kind, contents)
    }

    pub(crate) fn write_offset_now(&self, kind: Kind, offset: Offset) -> Result<()> {
        self.write_now(kind, encode_offset(offset))
    }

    pub(crate) fn write_epochs_now(&self, epochs: &LeaderEpochCache) -> Result<()> {
        self.write_now(Kind::LeaderEpoch, epochs.encode())
    }

    fn write(&self, seq: u64, kind: Kind, contents: String) -> Result<()> {
        self.write_with(seq, kind, contents, true)
    }

    /// Replaces the recovery-point file after a sync, without fsyncs (see
    /// [`RecoveryPointSnapshot::write`]); a later durable write of the same
    /// value still fsyncs it.
    pub(crate) fn write_recovery_point_unsynced(&self, seq: u64, offset: Offset) -> Result<()> {
        self.write_with(seq, Kind::RecoveryPoint, encode_offset(offset), false)
    }

    fn write_with(&self, seq: u64, kind: Kind, contents: String, durable: bool) -> Result<()> {
        let mut written = self.written.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let slot = &mut written[kind as usize];
        if let Some((last_seq, last, synced)) = slot {
            if *last_seq > seq {
                return Ok(()); // a newer value is on disk already
            }
            if *last == contents && (*synced || !durable) {
                *last_seq = seq; // already on disk, and now as of this value
                return Ok(());
            }
        }
        let path = self.dir.join(kind.file_name());
        if durable {
            write_atomic(&path, contents.as_bytes())?;
        } else {
            replace_unsynced(&path, contents.as_bytes())?;
        }
        *slot = Some((seq, contents, durable));
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;

    fn epochs(entries: &[(u32, u64)]) -> LeaderEpochCache {
        LeaderEpochCache {
            entries: entries.iter().map(|&(epoch, o)| EpochEntry { epoch, start_offset: Offset(o) }).collect(),
        }
    }

    #[test]
    fn checkpoints_round_trip_and_missing_files_read_as_defaults() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(Checkpoints::read(dir.path()).unwrap(), Checkpoints::default());
        let c = Checkpoints {
            recovery_point: Offset(10),
            log_start_offset: Offset(3),
            high_watermark: Offset(9),
            leader_epochs: epochs(&[(0, 0), (2, 7)]),
        };
        let writer = Arc::new(CheckpointWriter::new(dir.path()));
        writer.snapshot(c.clone()).write().unwrap();
        assert_eq!(Checkpoints::read(dir.path()).unwrap(), c);
        assert!(!dir.path().join("recovery-point-checkpoint.tmp").exists());
    }

    #[test]
    fn an_older_snapshot_never_overwrites_a_newer_write() {
        let dir = tempfile::tempdir().unwrap();
        let writer = Arc::new(CheckpointWriter::new(dir.path()));
        let old = writer.snapshot(Checkpoints { recovery_point: Offset(5), ..Default::default() });
        writer.write_offset_now(Kind::RecoveryPoint, Offset(2)).unwrap(); // a truncation, later
        old.write().unwrap(); // the old snapshot is written late
        assert_eq!(Checkpoints::read(dir.path()).unwrap().recovery_point, Offset(2));
    }

    #[test]
    fn an_older_snapshot_never_overwrites_a_newer_unchanged_value_either() {
        let dir = tempfile::tempdir().unwrap();
        let writer = Arc::new(CheckpointWriter::new(dir.path()));
        writer.write_offset_now(Kind::RecoveryPoint, Offset(2)).unwrap();
        let old = writer.snapshot(Checkpoints { recovery_point: Offset(5), ..Default::default() });
        // A later change writes the value that is already on disk (skipped as unchanged).
        writer.write_offset_now(Kind::RecoveryPoint, Offset(2)).unwrap();
        old.write().unwrap();
        assert_eq!(Checkpoints::read(dir.path()).unwrap().recovery_point, Offset(2));
    }

    #[test]
    fn racing_writers_never_replace_a_later_value_with_an_earlier_one() {
        use std::sync::Barrier;
        use std::sync::atomic::AtomicBool;
        const THREADS: usize = 4;
        const ROUNDS: u64 = 60;
        let dir = tempfile::tempdir().unwrap();
        let writer = Arc::new(CheckpointWriter::new(dir.path()));
        // The log's lock: values are taken, and their snapshots numbered, under it.
        let log = Arc::new(Mutex::new(0u64));
        let read_rp = {
            let dir = dir.path().to_path_buf();
            move || Checkpoints::read(&dir).unwrap().recovery_point.get()
        };
        let done = Arc::new(AtomicBool::new(false));
        // A reader watching the file: the value on disk never goes back.
        let watcher = {
            let (done, read_rp) = (done.clone(), read_rp.clone());
            std::thread::spawn(move || {
                let (mut last, mut reads) = (0, 0u64);
                while !done.load(Ordering::SeqCst) {
                    let now = read_rp();
                    assert!(now >= last, "the recovery point on disk went back from {last} to {now}");
                    (last, reads) = (now, reads + 1);
                }
                reads
            })
        };
        let start = Arc::new(Barrier::new(THREADS));
        let threads: Vec<_> = (0..THREADS)
            .map(|t| {
                let (writer, log, start, read_rp) = (writer.clone(), log.clone(), start.clone(), read_rp.clone());
                std::thread::spawn(move || {
                    start.wait();
                    for round in 0..ROUNDS {
                        let snapshot = {
                            let mut value = log.lock().unwrap();
                            *value += 1;
                            writer.snapshot(Checkpoints { recovery_point: Offset(*value), ..Default::default() })
                        };
                        // Vary the gap between taking and writing, so writes overtake each other.
                        for _ in 0..(round + t as u64) % 4 {
                            std::thread::yield_now();
                        }
                        snapshot.write().unwrap();
                        let mine = snapshot.values().recovery_point.get();
                        let on_disk = read_rp();
                        assert!(on_disk >= mine, "{mine} was written, then {on_disk} replaced it");
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        done.store(true, Ordering::SeqCst);
        assert!(watcher.join().unwrap() > 0, "the watcher read the file");
        let last = *log.lock().unwrap();
        assert_eq!(last, THREADS as u64 * ROUNDS);
        assert_eq!(read_rp(), last, "the value taken last is the one on disk");
    }

    #[test]
    fn unparsable_checkpoints_are_never_read_as_zero() {
        let dir = tempfile::tempdir().unwrap();
        let writer = Arc::new(CheckpointWriter::new(dir.path()));
        let good = Checkpoints {
            recovery_point: Offset(10),
            log_start_offset: Offset(4),
            high_watermark: Offset(9),
            leader_epochs: epochs(&[(1, 4)]),
        };
        writer.snapshot(good.clone()).write().unwrap();
        // A bad recovery point (or HW, or epochs) falls back to a full recovery, keeping the log start.
        for (file, text) in [
            (RECOVERY_POINT, "1\n10\n"),
            (RECOVERY_POINT, "0\nten\n"),
            (HIGH_WATERMARK, "0\n"),
            (LEADER_EPOCH, "0\n2\n1 4\n"),
            (LEADER_EPOCH, "0\n2\n3 4\n1 9\n"),
            (LEADER_EPOCH, "0\n1\n1 4\n5 8\n"),
        ] {
            let saved = std::fs::read(dir.path().join(file)).unwrap();
            std::fs::write(dir.path().join(file), text).unwrap();
            let read = Checkpoints::read(dir.path()).unwrap();
            assert_eq!(read, Checkpoints { log_start_offset: Offset(4), ..Default::default() }, "{file}: {text:?}");
            std::fs::write(dir.path().join(file), saved).unwrap();
        }
        assert_eq!(Checkpoints::read(dir.path()).unwrap(), good);
        std::fs::write(dir.path().join(LOG_START), "0\n4\n4\n").unwrap();
        assert!(matches!(Checkpoints::read(dir.path()), Err(StorageError::CorruptCheckpoint { .. })));
    }

    #[test]
    fn assign_follows_kafka_and_removes_conflicting_entries() {
        let mut c = LeaderEpochCache::default();
        assert!(c.assign(1, Offset(0)));
        assert!(!c.assign(1, Offset(5)), "same epoch, later start: no change");
        assert!(c.assign(3, Offset(10)));
        assert!(c.assign(3, Offset(8)), "same epoch, earlier start: moves the start");
        assert_eq!(c, epochs(&[(1, 0), (3, 8)]));
        // An older epoch at a later offset removes every entry that conflicts with it.
        assert!(c.assign(2, Offset(9)));
        assert_eq!(c, epochs(&[(1, 0), (2, 9)]));
        // A newer epoch at an earlier offset removes entries starting at or after it.
        assert!(c.assign(5, Offset(3)));
        assert_eq!(c, epochs(&[(1, 0), (5, 3)]));
    }

    #[test]
    fn end_offset_for_answers_as_kafka_does() {
        let c = epochs(&[(2, 5), (4, 10), (7, 20)]);
        let leo = Offset(30);
        assert_eq!(c.end_offset_for(7, leo), Some((7, leo)), "the latest epoch ends at the log end");
        assert_eq!(c.end_offset_for(8, leo), None, "an epoch above the latest is UNDEFINED");
        assert_eq!(c.end_offset_for(4, leo), Some((4, Offset(20))));
        assert_eq!(c.end_offset_for(5, leo), Some((4, Offset(20))), "a missing epoch answers the one below it");
        assert_eq!(c.end_offset_for(1, leo), Some((1, Offset(5))), "below the earliest: that epoch, the first start");
        assert_eq!(LeaderEpochCache::default().end_offset_for(0, leo), None);
    }

    #[test]
    fn epoch_cache_truncates_from_both_ends() {
        let mut c = epochs(&[(1, 0), (3, 10)]);
        assert!(c.truncate_from_end(Offset(10)));
        assert_eq!(c.latest_epoch(), Some(1));
        c.assign(3, Offset(10));
        assert!(c.truncate_from_start(Offset(12)));
        assert_eq!(c.entries(), &[EpochEntry { epoch: 3, start_offset: Offset(12) }]);
    }
}
