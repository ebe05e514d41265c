//! Tests of the partition log. Segments and index intervals are tiny so rolls,
//! index lookups and multi-segment reads happen in every test.

use std::collections::BTreeMap;
use std::sync::Arc;

use bytes::Bytes;
use proptest::prelude::*;
use tally_proto::batch::compute_crc;
use tally_proto::batch::{BatchBuilder, BatchIter, BatchLimits, RecordBatch, RecordRef};

use super::*;
use crate::storage::Offset;
use crate::storage::{ManualClock, StorageError, testfs};

fn tiny_config() -> LogConfig {
    LogConfig {
        segment_bytes: 1024,
        index_interval_bytes: 100,
        segment_index_bytes: 256,
        retention_ms: None,
        ..LogConfig::default()
    }
}

fn batch(values: &[&[u8]], ts: i64) -> RecordBatch {
    let mut b = BatchBuilder::new();
    for (i, v) in values.iter().enumerate() {
        b.push(&RecordRef { timestamp: ts + i as i64, key: None, value: Some(v), headers: &[] });
    }
    RecordBatch::validate(b.finish(), &BatchLimits { max_batch_bytes: usize::MAX, ..BatchLimits::default() }).unwrap()
}

fn value_for(offset: u64) -> Vec<u8> {
    format!("value-{offset}-{}", "x".repeat((offset % 17) as usize)).into_bytes()
}

/// Appends `n` batches of `per` records with values from [`value_for`]; the
/// timestamp of a record is 1000 + its offset.
fn fill(log: &mut Log, n: usize, per: usize) {
    for _ in 0..n {
        let start = log.log_end_offset().get();
        let values: Vec<Vec<u8>> = (0..per as u64).map(|i| value_for(start + i)).collect();
        let refs: Vec<&[u8]> = values.iter().map(Vec::as_slice).collect();
        log.append(&batch(&refs, 1000 + start as i64), 0).unwrap();
    }
    let leo = log.log_end_offset().get();
    log.set_high_watermark(Offset(leo));
}

/// All (offset, value) pairs readable from `from`, checked for contiguity.
fn read_all(log: &Log, from: u64) -> Vec<(u64, Vec<u8>)> {
    let mut out = Vec::new();
    let mut next = from;
    loop {
        let r = log.read(Offset(next), 300, Offset::MAX).unwrap();
        if r.chunks.is_empty() {
            break;
        }
        for chunk in r.chunks {
            for b in BatchIter::new(chunk) {
                for rec in b.unwrap().records().unwrap() {
                    let rec = rec.unwrap();
                    if rec.offset as u64 >= from {
                        out.push((rec.offset as u64, rec.value.unwrap().to_vec()));
                    }
                }
            }
        }
        assert!(r.next_offset.get() > next, "read made progress");
        next = r.next_offset.get();
    }
    for w in out.windows(2) {
        assert_eq!(w[0].0 + 1, w[1].0, "offsets are contiguous");
    }
    out
}

fn open(dir: &std::path::Path) -> Log {
    Log::open(dir, tiny_config(), Arc::new(SystemClock)).unwrap()
}

use crate::storage::SystemClock;

#[test]
fn appends_read_back_across_segments_and_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let mut log = open(dir.path());
    fill(&mut log, 60, 3);
    assert_eq!(log.log_end_offset().get(), 180);
    assert!(log.segment_count() > 5, "tiny segments roll: {}", log.segment_count());
    let all = read_all(&log, 0);
    assert_eq!(all.len(), 180);
    assert!(all.iter().all(|(o, v)| *v == value_for(*o)));
    // Starting in the middle of a batch returns that batch.
    let r = log.read(Offset(100), 1, Offset::MAX).unwrap();
    let first = BatchIter::new(r.chunks[0].clone()).next().unwrap().unwrap();
    assert_eq!(first.header().base_offset(), 99);
    log.close().unwrap();

    let mut log = open(dir.path());
    assert_eq!(log.log_end_offset().get(), 180);
    assert_eq!(read_all(&log, 37).len(), 143);
    fill(&mut log, 1, 2);
    assert_eq!(log.log_end_offset().get(), 182);
}

#[test]
fn reads_respect_max_bytes_and_upper_bound() {
    let dir = tempfile::tempdir().unwrap();
    let mut log = open(dir.path());
    fill(&mut log, 10, 2);
    let one = log.read(Offset(0), 1, Offset::MAX).unwrap();
    assert_eq!(one.next_offset, Offset(2), "one oversized batch still comes back");
    let below_hw = log.read(Offset(0), 1 << 20, Offset(5)).unwrap();
    assert_eq!(below_hw.next_offset, Offset(4), "batch 4..5 reaches the bound and is left out");
    let at_end = log.read(Offset(20), 100, Offset::MAX).unwrap();
    assert!(at_end.chunks.is_empty());
    assert!(matches!(
        log.read(Offset(21), 100, Offset::MAX),
        Err(StorageError::OffsetOutOfRange { requested: Offset(21), log_start: Offset(0), log_end: Offset(20) })
    ));
}

#[test]
fn offset_for_timestamp_finds_the_first_record_at_or_after() {
    let dir = tempfile::tempdir().unwrap();
    let mut log = open(dir.path());
    fill(&mut log, 40, 3);
    for target in [0u64, 1, 2, 59, 60, 100, 119] {
        assert_eq!(
            log.offset_for_timestamp(1000 + target as i64).unwrap(),
            Some((Offset(target), 1000 + target as i64))
        );
    }
    assert_eq!(log.offset_for_timestamp(0).unwrap(), Some((Offset(0), 1000)));
    assert_eq!(log.offset_for_timestamp(5000).unwrap(), None);
    log.close().unwrap();
    let log = open(dir.path());
    assert_eq!(log.offset_for_timestamp(1077).unwrap(), Some((Offset(77), 1077)));
}

#[test]
fn retention_by_bytes_deletes_whole_old_segments_only() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = tiny_config();
    config.retention_bytes = Some(3000);
    let mut log = Log::open(dir.path(), config, Arc::new(SystemClock)).unwrap();
    fill(&mut log, 80, 2);
    let before = log.segment_count();
    let outcome = log.enforce_retention().unwrap();
    assert!(outcome.segments_deleted > 0);
    assert_eq!(log.segment_count(), before - outcome.segments_deleted);
    assert!(log.size_bytes() >= 3000 - 1024 && log.size_bytes() <= 3000 + 1024, "size {}", log.size_bytes());
    let start = log.log_start_offset().get();
    let remaining = read_all(&log, start);
    assert_eq!(remaining.first().unwrap().0, start);
    assert_eq!(remaining.last().unwrap().0, 159);
    assert!(matches!(log.read(Offset(0), 100, Offset::MAX), Err(StorageError::OffsetOutOfRange { .. })));
    log.close().unwrap();
    assert_eq!(open(dir.path()).log_start_offset().get(), start);
}

#[test]
fn retention_by_time_uses_the_newest_record_and_keeps_the_active_segment() {
    let dir = tempfile::tempdir().unwrap();
    let clock = Arc::new(ManualClock::new(1_500));
    let mut config = tiny_config();
    config.retention_ms = Some(1_000);
    let mut log = Log::open(dir.path(), config, clock.clone()).unwrap();
    fill(&mut log, 30, 2); // timestamps 1000..1060
    let before = log.segment_count();
    assert!(before > 2);
    assert_eq!(
        log.enforce_retention().unwrap().segments_deleted,
        0,
        "records from t=1000 are not older than 1s at t=1060+"
    );
    clock.advance(10_000);
    let deleted = log.enforce_retention().unwrap().segments_deleted;
    assert_eq!(deleted, before - 1);
    assert_eq!(log.segment_count(), 1, "only the active segment remains");
    let start = log.log_start_offset().get();
    assert_eq!(read_all(&log, start).len() as u64, log.log_end_offset().get() - start);
}

#[test]
fn segment_ms_rolls_an_old_segment() {
    let dir = tempfile::tempdir().unwrap();
    let clock = Arc::new(ManualClock::new(0));
    let mut config = tiny_config();
    config.segment_bytes = 1 << 20;
    config.segment_ms = 100;
    let mut log = Log::open(dir.path(), config, clock.clone()).unwrap();
    fill(&mut log, 2, 1);
    assert_eq!(log.segment_count(), 1);
    clock.advance(100);
    fill(&mut log, 1, 1);
    assert_eq!(log.segment_count(), 2);
}

/// A directory the power-loss model watches (see `storage::testfs`).
struct Watched(tempfile::TempDir);

impl Watched {
    fn new() -> Watched {
        let dir = tempfile::tempdir().unwrap();
        testfs::watch(dir.path());
        Watched(dir)
    }
    fn path(&self) -> &std::path::Path {
        self.0.path()
    }
}

impl Drop for Watched {
    fn drop(&mut self) {
        testfs::forget(self.0.path());
    }
}

#[test]
fn truncation_removes_whole_batches_and_survives_power_loss() {
    let dir = Watched::new();
    let mut log = open(dir.path());
    fill(&mut log, 50, 2);
    log.flush().unwrap();
    assert_eq!(log.truncate_to(Offset(31)).unwrap(), Offset(30), "the batch holding 31 starts at 30");
    assert_eq!(log.log_end_offset().get(), 30);
    assert_eq!(log.recovery_point().get(), 30);
    drop(log);
    // Nothing after the truncation was synced: the truncation itself must be.
    testfs::power_loss(dir.path());
    let mut log = open(dir.path());
    assert_eq!(log.log_end_offset().get(), 30, "cut batches never come back");
    assert_eq!(read_all(&log, 0).len(), 30);
    // A shorter batch after the cut, synced, then another power loss.
    log.append(&batch(&[b"new"], 5), 0).unwrap();
    log.flush().unwrap();
    drop(log);
    testfs::power_loss(dir.path());
    let log = open(dir.path());
    assert_eq!(log.log_end_offset().get(), 31);
    let all = read_all(&log, 0);
    assert_eq!(all.last().unwrap(), &(30, b"new".to_vec()));
    assert!(all[..30].iter().all(|(o, v)| *v == value_for(*o)));
}

/// (offset, bytes) of every batch in `read`, copied.
fn held_batches(read: &ReadResult) -> Vec<(Bytes, Vec<u8>)> {
    let mut out = Vec::new();
    for chunk in &read.chunks {
        for b in BatchIter::new(chunk.clone()) {
            let bytes = b.unwrap().into_bytes();
            let copy = bytes.to_vec();
            out.push((bytes, copy));
        }
    }
    out
}

#[test]
fn readers_keep_their_bytes_across_truncate_reappend_and_close() {
    let dir = tempfile::tempdir().unwrap();
    let mut log = open(dir.path());
    fill(&mut log, 40, 2);
    // Readers hold slices of every segment, the active one included.
    let held = held_batches(&log.read(Offset(0), u64::MAX, Offset::MAX).unwrap());
    assert_eq!(held.len(), 40);
    let check = |what: &str| {
        for (bytes, copy) in &held {
            assert!(bytes[..] == copy[..], "a held batch changed after {what}");
            let h = tally_proto::batch::BatchHeader::new(bytes).unwrap();
            assert_eq!(h.crc(), compute_crc(bytes), "held batch still valid after {what}");
        }
    };
    // Cut inside a segment, write new batches over the same offsets, close.
    log.truncate_to(Offset(41)).unwrap();
    check("truncate mid-segment");
    for _ in 0..12 {
        log.append(&batch(&[b"other history, longer than the first"], 7), 0).unwrap();
    }
    check("re-append");
    log.roll().unwrap();
    log.close().unwrap();
    check("close");
    // Cut at a segment's base offset: that segment's name is taken by a new file.
    let bases: Vec<u64> = std::fs::read_dir(dir.path())
        .unwrap()
        .filter_map(|e| e.unwrap().file_name().to_str()?.strip_suffix(".log")?.parse().ok())
        .collect();
    let base = *bases.iter().filter(|&&b| b > 0 && b < 40).max().unwrap();
    log.truncate_to(Offset(base)).unwrap();
    assert_eq!(log.log_end_offset().get(), base);
    log.append(&batch(&[b"x"], 7), 0).unwrap();
    check("truncate at a segment base");
    // Start over at an offset that is an existing segment's base.
    let first_after_zero = *bases.iter().filter(|&&b| b > 0).min().unwrap();
    log.delete_records_before(Offset(first_after_zero)).unwrap();
    assert_eq!(log.log_start_offset().get(), first_after_zero);
    log.truncate_fully_and_start_at(Offset(first_after_zero)).unwrap();
    log.append(&batch(&[b"y"], 7), 0).unwrap();
    check("truncate fully");
    drop(log);
    let log = open(dir.path());
    assert_eq!(log.log_end_offset().get(), first_after_zero + 1);
    check("reopen");
}

#[test]
fn an_epoch_begun_at_the_log_end_is_cut_by_a_truncation_to_the_end() {
    let dir = tempfile::tempdir().unwrap();
    let mut log = open(dir.path());
    log.append(&batch(&[b"a"], 1), 1).unwrap();
    // Leader in epoch 3, but nothing appended before it lost the leadership.
    log.begin_leader_epoch(3).unwrap();
    assert_eq!(log.leader_epochs().latest_epoch(), Some(3));
    assert_eq!(log.end_offset_for_epoch(1), Some((1, Offset(1))));
    assert!(matches!(log.begin_leader_epoch(2), Err(StorageError::StaleLeaderEpoch { epoch: 2, latest: 3 })));
    // The new leader says epoch 1 ends at 1: a cut at the log end drops
    // the empty epoch, so the next fetch names epoch 1.
    log.truncate_to(Offset(1)).unwrap();
    assert_eq!(log.leader_epochs().latest_epoch(), Some(1));
    drop(log);
    assert_eq!(open(dir.path()).leader_epochs().latest_epoch(), Some(1), "durably");
}

#[test]
fn delete_records_before_moves_the_log_start() {
    let dir = tempfile::tempdir().unwrap();
    let mut log = open(dir.path());
    fill(&mut log, 50, 2);
    log.delete_records_before(Offset(55)).unwrap();
    assert_eq!(log.log_start_offset().get(), 55);
    assert_eq!(read_all(&log, 55).len(), 45);
    assert!(matches!(
        log.read(Offset(54), 10, Offset::MAX),
        Err(StorageError::OffsetOutOfRange { log_start: Offset(55), .. })
    ));
    assert!(log.delete_records_before(Offset(101)).is_err(), "cannot pass the high watermark");
    drop(log);
    assert_eq!(open(dir.path()).log_start_offset().get(), 55);
}

#[test]
fn oversized_batch_gets_a_segment_of_its_own() {
    let dir = tempfile::tempdir().unwrap();
    let mut log = open(dir.path());
    fill(&mut log, 2, 1);
    let big = vec![7u8; 5000];
    log.append(&batch(&[&big], 1), 0).unwrap();
    fill(&mut log, 2, 1);
    let r = log.read(Offset(2), 1, Offset::MAX).unwrap();
    assert_eq!(r.next_offset.get(), 3);
    drop(log);
    let log = open(dir.path());
    assert_eq!(log.log_end_offset().get(), 5);
}

#[test]
fn stray_files_from_interrupted_work_are_removed() {
    let dir = tempfile::tempdir().unwrap();
    let mut log = open(dir.path());
    fill(&mut log, 5, 1);
    log.close().unwrap();
    for name in [
        "00000000000000000099.index",
        "00000000000000000099.timeindex",
        "recovery-point-checkpoint.tmp",
        "00000000000000000000.log.deleted",
    ] {
        std::fs::write(dir.path().join(name), b"junk").unwrap();
    }
    let log = open(dir.path());
    assert_eq!(log.log_end_offset().get(), 5);
    for name in ["00000000000000000099.index", "recovery-point-checkpoint.tmp", "00000000000000000000.log.deleted"] {
        assert!(!dir.path().join(name).exists(), "{name} removed");
    }
}

/// Writes 12 batches of 3 records, then returns the segment's path and the
/// byte range of its last batch, with the recovery point checkpoint set to
/// `recovery_point` (what a crash before the later batches were synced
/// leaves).
fn log_with_tail(dir: &std::path::Path, recovery_point: u64) -> (std::path::PathBuf, u64, u64, u64) {
    let mut config = tiny_config();
    config.segment_bytes = 1 << 16;
    let mut log = Log::open(dir, config, Arc::new(SystemClock)).unwrap();
    fill(&mut log, 12, 3);
    let leo = log.log_end_offset().get();
    let last_base = leo - 3;
    log.close().unwrap();
    std::fs::write(dir.join("recovery-point-checkpoint"), format!("0\n{recovery_point}\n")).unwrap();
    let path = dir.join("00000000000000000000.log");
    let data = std::fs::read(&path).unwrap();
    let mut pos = 0u64;
    let mut last_start = 0;
    while (pos as usize) < data.len() {
        let len = tally_proto::batch::batch_size_at(&data[pos as usize..]).unwrap() as u64;
        last_start = pos;
        pos += len;
    }
    (path, last_start, pos, last_base)
}

fn reopen_tail_config(dir: &std::path::Path) -> Result<Log> {
    let mut config = tiny_config();
    config.segment_bytes = 1 << 16;
    Log::open(dir, config, Arc::new(SystemClock))
}

fn copy_dir(from: &std::path::Path) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        std::fs::copy(entry.path(), dir.path().join(entry.file_name())).unwrap();
    }
    dir
}

#[test]
fn recovery_cuts_a_torn_last_batch_at_every_byte() {
    let template = tempfile::tempdir().unwrap();
    let (path, start, end, last_base) = log_with_tail(template.path(), 33);
    let original = std::fs::read(&path).unwrap();
    for cut in start..end {
        let dir = copy_dir(template.path());
        // A torn write: the file ends inside the batch, or the rest is zeros
        // (preallocated space that the write never reached).
        let seg = dir.path().join("00000000000000000000.log");
        if cut % 2 == 0 {
            std::fs::write(&seg, &original[..cut as usize]).unwrap();
        } else {
            let mut torn = original.clone();
            torn[cut as usize..].fill(0);
            std::fs::write(&seg, &torn).unwrap();
        }
        let mut log = reopen_tail_config(dir.path()).unwrap();
        assert_eq!(log.log_end_offset().get(), last_base, "cut at {cut}");
        assert_eq!(read_all(&log, 0).len() as u64, last_base);
        log.append(&batch(&[b"after"], 1), 0).unwrap();
        assert_eq!(log.log_end_offset().get(), last_base + 1);
        drop(log);
        let log = reopen_tail_config(dir.path()).unwrap();
        assert_eq!(log.log_end_offset().get(), last_base + 1, "appends after recovery survive reopen (cut {cut})");
    }
}

#[test]
fn recovery_cuts_damage_above_the_recovery_point_and_refuses_damage_below_it() {
    let template = tempfile::tempdir().unwrap();
    let recovery_point = 18; // batches 0..6 were synced; 6..12 were not
    let (path, _, end, _) = log_with_tail(template.path(), recovery_point);
    let original = std::fs::read(&path).unwrap();
    let mut rng = 0x2545F4914F6CDD1Du64;
    let (mut refused, mut cut, mut reported) = (0, 0, 0);
    for _ in 0..80 {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        let at = (rng % end) as usize;
        let dir = copy_dir(template.path());
        let mut bad = original.clone();
        bad[at] ^= 0x5a;
        std::fs::write(dir.path().join("00000000000000000000.log"), &bad).unwrap();
        // Which batch holds byte `at`: its start and base offset.
        let (mut pos, mut base) = (0usize, 0u64);
        loop {
            let len = tally_proto::batch::batch_size_at(&original[pos..]).unwrap();
            if at < pos + len {
                break;
            }
            base = tally_proto::batch::BatchHeader::new(&original[pos..]).unwrap().next_offset() as u64;
            pos += len;
        }
        let in_epoch_field = (12..16).contains(&(at - pos));
        match reopen_tail_config(dir.path()) {
            Ok(log) => {
                assert!(base >= recovery_point, "damage below the recovery point was cut (flip at {at})");
                // The leader epoch is outside the CRC, but checked against
                // the epoch checkpoint; damage with valid batches after it
                // is reported: only the last batch can be cut.
                assert!(!in_epoch_field && base == 33, "flip at {at} in batch {base} was cut, not reported");
                assert_eq!(log.log_end_offset().get(), base, "cut at the damaged batch (flip at byte {at})");
                let readable = read_all(&log, 0);
                assert!(readable.iter().all(|(o, v)| *v == value_for(*o)), "never serves a corrupt byte");
                cut += 1;
            }
            Err(StorageError::DamagedAboveRecoveryPoint { position, .. }) => {
                assert!(base >= recovery_point && (base < 33 || in_epoch_field), "flip at {at} in batch {base}");
                assert_eq!(position, pos as u64);
                let now = std::fs::read(dir.path().join("00000000000000000000.log")).unwrap();
                assert!(now == bad, "nothing was cut (flip at {at})");
                reported += 1;
            }
            Err(StorageError::CorruptBelowRecoveryPoint { position, .. }) => {
                assert!(base < recovery_point, "flip at {at} in batch {base} refused");
                assert_eq!(position, pos as u64);
                let now = std::fs::read(dir.path().join("00000000000000000000.log")).unwrap();
                assert!(now == bad, "nothing was cut (flip at {at})");
                refused += 1;
            }
            Err(e) => panic!("flip at {at}: {e}"),
        }
    }
    assert!(
        refused > 10 && reported > 10 && cut > 0,
        "all sides were exercised: {refused} refused, {reported} reported, {cut} cut"
    );
}

#[test]
fn corruption_found_at_read_time_is_an_error_not_data() {
    let dir = tempfile::tempdir().unwrap();
    let config = LogConfig { verify_on_read: true, ..tiny_config() };
    let mut log = Log::open(dir.path(), config, Arc::new(SystemClock)).unwrap();
    fill(&mut log, 3, 2);
    // Corrupt a value byte in the live map through the file.
    let path = dir.path().join("00000000000000000000.log");
    let mut data = std::fs::read(&path).unwrap();
    let first_len = tally_proto::batch::batch_size_at(&data).unwrap();
    data[first_len - 1] ^= 0xff;
    std::fs::write(&path, &data).unwrap();
    assert!(matches!(log.read(Offset(0), 1 << 20, Offset::MAX), Err(StorageError::Corrupt { position: 0, .. })));
}

#[test]
fn flush_makes_appends_durable_and_reports_the_offset() {
    let dir = Watched::new();
    let mut config = tiny_config();
    config.flush = FlushPolicy::IntervalMs(10);
    let clock = Arc::new(ManualClock::new(0));
    let mut log = Log::open(dir.path(), config.clone(), clock.clone()).unwrap();
    fill(&mut log, 20, 2);
    assert!(!log.flush_due());
    clock.advance(10);
    assert!(log.flush_due());
    assert_eq!(log.flush().unwrap(), Offset(40));
    assert!(!log.flush_due());
    assert_eq!(log.recovery_point().get(), 40);
    fill(&mut log, 5, 2); // never flushed
    drop(log);
    testfs::power_loss(dir.path());
    let log = Log::open(dir.path(), config, clock).unwrap();
    assert_eq!(log.log_end_offset().get(), 40, "what the flush covered survived the power loss, and only that");
    let all = read_all(&log, 0);
    assert_eq!(all.len(), 40);
    assert!(all.iter().all(|(o, v)| *v == value_for(*o)));
}

#[test]
fn replica_appends_keep_the_leaders_offsets_and_epochs() {
    let dir = tempfile::tempdir().unwrap();
    let mut leader = open(dir.path().join("leader").as_path());
    let mut follower = open(dir.path().join("follower").as_path());
    leader.append(&batch(&[b"a", b"b"], 1), 3).unwrap();
    leader.append(&batch(&[b"c"], 1), 5).unwrap();
    let r = leader.read(Offset(0), 1 << 20, Offset::MAX).unwrap();
    for chunk in r.chunks {
        for b in BatchIter::new(chunk) {
            follower.append_replica(&b.unwrap()).unwrap();
        }
    }
    assert_eq!(follower.log_end_offset().get(), 3);
    assert_eq!(follower.leader_epochs().entries(), leader.leader_epochs().entries());
    let stale = batch(&[b"x"], 1);
    assert!(matches!(
        follower.append_replica(&stale),
        Err(StorageError::NonContiguousOffset { expected: Offset(3), got: 0 })
    ));
}

#[derive(Debug, Clone)]
enum Op {
    Append { records: usize, value_len: usize },
    Read { at: u16, max_bytes: u16 },
    Roll,
    Truncate { at: u16 },
    DeleteBefore { at: u16 },
    Retention,
    Reopen { clean: bool },
}

fn arb_op() -> impl Strategy<Value = Op> {
    prop_oneof![
        8 => (1usize..5, 0usize..200).prop_map(|(records, value_len)| Op::Append { records, value_len }),
        4 => (any::<u16>(), 1u16..2000).prop_map(|(at, max_bytes)| Op::Read { at, max_bytes }),
        1 => Just(Op::Roll),
        1 => any::<u16>().prop_map(|at| Op::Truncate { at }),
        1 => any::<u16>().prop_map(|at| Op::DeleteBefore { at }),
        1 => Just(Op::Retention),
        1 => any::<bool>().prop_map(|clean| Op::Reopen { clean }),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, .. ProptestConfig::default() })]

    /// Random operations against a plain in-memory model of the log.
    #[test]
    fn log_matches_a_model(ops in proptest::collection::vec(arb_op(), 1..60)) {
        let dir = tempfile::tempdir().unwrap();
        let mut config = tiny_config();
        config.retention_bytes = Some(2048);
        let mut log = Log::open(dir.path(), config.clone(), Arc::new(SystemClock)).unwrap();
        let mut model: BTreeMap<u64, Vec<u8>> = BTreeMap::new();
        let mut batch_starts: Vec<u64> = Vec::new();
        let mut start = 0u64;
        let mut end = 0u64;
        for op in ops {
            match op {
                Op::Append { records, value_len } => {
                    let values: Vec<Vec<u8>> = (0..records).map(|i| vec![(end as u8).wrapping_add(i as u8); value_len]).collect();
                    let refs: Vec<&[u8]> = values.iter().map(Vec::as_slice).collect();
                    let info = log.append(&batch(&refs, 1), 0).unwrap();
                    prop_assert_eq!(info.base_offset.get(), end);
                    batch_starts.push(end);
                    for v in values {
                        model.insert(end, v);
                        end += 1;
                    }
                    log.set_high_watermark(Offset(end));
                }
                Op::Read { at, max_bytes } => {
                    let span = end - start + 1;
                    let offset = start + u64::from(at) % span;
                    let r = log.read(Offset(offset), u64::from(max_bytes), Offset::MAX).unwrap();
                    let mut expect = offset;
                    for chunk in r.chunks {
                        for b in BatchIter::new(chunk) {
                            for rec in b.unwrap().records().unwrap() {
                                let rec = rec.unwrap();
                                let o = rec.offset as u64;
                                if o < offset { continue; }
                                prop_assert_eq!(o, expect);
                                prop_assert_eq!(rec.value.as_deref(), model.get(&o).map(Vec::as_slice));
                                expect += 1;
                            }
                        }
                    }
                    if offset < end { prop_assert!(expect > offset, "read at {} returned nothing", offset); }
                }
                Op::Roll => log.roll().unwrap(),
                Op::Truncate { at } => {
                    let span = end - start + 1;
                    let offset = start + u64::from(at) % span;
                    let new_end = log.truncate_to(Offset(offset)).unwrap().get();
                    // Whole batches go: the new end is the start of the batch holding `offset`.
                    // The batch holding `offset` starts the new end; a batch that also
                    // holds the log start leaves an empty log starting there.
                    let expected = if offset >= end {
                        end
                    } else {
                        batch_starts.iter().rev().find(|&&b| b <= offset).copied().unwrap_or(start).max(start)
                    };
                    prop_assert_eq!(new_end, expected);
                    model.retain(|&o, _| o < new_end);
                    batch_starts.retain(|&b| b < new_end);
                    end = new_end;
                }
                Op::DeleteBefore { at } => {
                    let span = end - start + 1;
                    let offset = start + u64::from(at) % span;
                    log.delete_records_before(Offset(offset)).unwrap();
                    start = start.max(offset);
                    model.retain(|&o, _| o >= start);
                }
                Op::Retention => {
                    log.enforce_retention().unwrap();
                    prop_assert!(log.log_start_offset().get() >= start);
                    start = log.log_start_offset().get();
                    model.retain(|&o, _| o >= start);
                }
                Op::Reopen { clean } => {
                    if clean { log.close().unwrap(); } else { drop(log); }
                    log = Log::open(dir.path(), config.clone(), Arc::new(SystemClock)).unwrap();
                    log.set_high_watermark(log.log_end_offset());
                }
            }
            prop_assert_eq!(log.log_end_offset().get(), end);
            prop_assert_eq!(log.log_start_offset().get(), start);
        }
        let all = read_all(&log, start);
        prop_assert_eq!(all.len() as u64, end - start);
        for (o, v) in all {
            prop_assert_eq!(Some(&v), model.get(&o));
        }
    }
}

#[test]
fn syncing_closed_segments_moves_the_recovery_point_up_to_the_active_segment() {
    let dir = Watched::new();
    let mut log = open(dir.path());
    fill(&mut log, 40, 2);
    assert_eq!(log.recovery_point().get(), 0);
    let plan = log.sync_plan_closed();
    plan.execute().unwrap();
    log.mark_durable(&plan);
    let rp = log.recovery_point().get();
    let active_base = log.segments.keys().next_back().copied().unwrap();
    assert_eq!(rp, active_base, "everything below the active segment is durable");
    // A power loss now keeps everything below the recovery point.
    drop(log);
    testfs::power_loss(dir.path());
    let log = open(dir.path());
    assert!(log.log_end_offset().get() >= rp, "log end {} below the recovery point {rp}", log.log_end_offset());
    assert_eq!(read_all(&log, 0).len() as u64, log.log_end_offset().get());
}

#[test]
fn open_syncs_what_recovery_validated_before_moving_the_recovery_point() {
    let dir = Watched::new();
    let mut log = open(dir.path());
    fill(&mut log, 40, 2); // many segments, nothing synced
    drop(log); // a process crash: the page cache keeps the data
    let log = open(dir.path());
    let claimed = log.recovery_point().get();
    assert_eq!(claimed, 80, "recovery validated everything");
    drop(log);
    testfs::power_loss(dir.path());
    let log = Log::open(dir.path(), tiny_config(), Arc::new(SystemClock)).expect("what open called durable is");
    assert_eq!(log.log_end_offset().get(), claimed);
    assert_eq!(read_all(&log, 0).len(), 80);
}

#[test]
fn a_cleanly_closed_log_opens_without_a_sync() {
    let dir = tempfile::tempdir().unwrap();
    let mut log = open(dir.path());
    fill(&mut log, 40, 2);
    log.begin_leader_epoch(4).unwrap();
    log.close().unwrap();
    drop(log);
    // Any sync at open fails: there must be none (a restarting broker opens
    // thousands of logs), and no epoch file rewrite either.
    testfs::fail_next(dir.path(), testfs::Op::Fsync, None, 1);
    testfs::fail_next(dir.path(), testfs::Op::DirFsync, None, 1);
    let log = open(dir.path());
    assert_eq!(log.recovery_point().get(), 80);
    assert!(log.unsynced.is_empty(), "no descriptors held for a sync that is not needed");
    testfs::forget(dir.path());
}

#[test]
fn a_log_opened_without_a_sync_survives_power_loss_and_rewrites_a_stale_epoch_file_before_its_next_batch() {
    let dir = Watched::new();
    let mut log = open(dir.path());
    fill(&mut log, 40, 2);
    // An idle leadership: the close writes "epoch 4 begins at 80", which
    // every open drops (no batch of epoch 4 exists).
    log.begin_leader_epoch(4).unwrap();
    log.close().unwrap();
    drop(log);
    let log = open(dir.path());
    drop(log);
    testfs::power_loss(dir.path());
    let mut log = open(dir.path());
    assert_eq!(read_all(&log, 0).len(), 80, "everything a clean close synced, though the open synced nothing");
    assert_eq!(log.end_offset_for_epoch(4), None, "epoch 4 held no batch: dropped at open");
    // A follower's batch of epoch 0 (another leader never cut it): the file
    // still says epoch 4 begins at 80, so it is rewritten first, or the
    // next open would find a batch of epoch 0 under epoch 4 and refuse.
    let stamped = patched(&batch(&[b"x"], 1), |h| {
        h[..8].copy_from_slice(&80i64.to_be_bytes());
        h[12..16].copy_from_slice(&0i32.to_be_bytes());
    });
    log.append_replica(&stamped).unwrap();
    drop(log); // a process crash: nothing synced, the page cache keeps it
    let mut log = Log::open(dir.path(), tiny_config(), Arc::new(SystemClock)).expect("the epoch file matches the log");
    assert_eq!(log.log_end_offset().get(), 81);
    // A new leadership writes its epoch when taken.
    log.begin_leader_epoch(5).unwrap();
    assert_eq!(log.end_offset_for_epoch(0), Some((0, Offset(81))));
    log.append(&batch(&[b"y"], 1), 5).unwrap();
    log.flush().unwrap();
    drop(log);
    testfs::power_loss(dir.path());
    let log = open(dir.path());
    assert_eq!(log.log_end_offset().get(), 82);
    assert_eq!(log.end_offset_for_epoch(5), Some((5, Offset(82))));
    assert_eq!(log.end_offset_for_epoch(0), Some((0, Offset(81))), "epoch 5 began at 81");
}

#[test]
fn what_recovery_cut_is_synced_at_open_even_with_nothing_above_the_recovery_point() {
    let dir = Watched::new();
    let mut log = open(dir.path());
    fill(&mut log, 40, 2);
    log.close().unwrap();
    drop(log);
    // The active segment gets junk after its last batch (a torn append
    // never acknowledged: above the recovery point, so recovery cuts it).
    let mut logs: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "log"))
        .collect();
    logs.sort();
    let first = logs.pop().unwrap();
    let mut bytes = std::fs::read(&first).unwrap();
    bytes.extend_from_slice(&[0xAB; 64]);
    std::fs::write(&first, &bytes).unwrap();
    testfs::forget(dir.path());
    testfs::watch(dir.path());
    let log = open(dir.path());
    assert_eq!(read_all(&log, 0).len(), 80);
    drop(log);
    testfs::power_loss(dir.path());
    let cut = std::fs::read(&first).unwrap();
    assert_eq!(cut.len(), bytes.len() - 64, "the cut was synced before open returned");
}

#[test]
fn a_failed_fsync_fails_the_log_and_is_never_retried() {
    let dir = Watched::new();
    let mut log = open(dir.path());
    fill(&mut log, 3, 2);
    log.flush().unwrap();
    fill(&mut log, 3, 2);
    testfs::fail_next(dir.path(), testfs::Op::Fsync, Some(".log"), 1);
    assert!(matches!(log.flush(), Err(StorageError::Io { op: "fdatasync", .. })));
    assert_eq!(log.recovery_point().get(), 6, "nothing new counts as durable");
    // Linux would let a second fsync succeed with the data gone: never ask.
    assert!(matches!(log.flush(), Err(StorageError::LogFailed { .. })));
    assert!(matches!(log.append(&batch(&[b"z"], 1), 0), Err(StorageError::LogFailed { .. })));
    assert!(matches!(log.read(Offset(0), 100, Offset::MAX), Err(StorageError::LogFailed { .. })));
    assert!(matches!(log.truncate_to(Offset(2)), Err(StorageError::LogFailed { .. })));
    assert!(log.failure().unwrap().contains("fdatasync"));
    drop(log);
    // Reopening recovers it from what the disk holds.
    testfs::power_loss(dir.path());
    let mut log = open(dir.path());
    assert_eq!(log.log_end_offset().get(), 6, "only what was synced survived");
    fill(&mut log, 1, 1);
    assert_eq!(log.log_end_offset().get(), 7);
}

#[test]
fn damage_in_a_trusted_segment_is_refused_and_later_segments_are_kept() {
    let dir = tempfile::tempdir().unwrap();
    let mut log = open(dir.path());
    fill(&mut log, 40, 2);
    log.close().unwrap(); // everything below the recovery point
    let mut logs: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "log"))
        .collect();
    logs.sort();
    assert!(logs.len() > 4);
    // Damage the last batch's header in the second segment: the header walk
    // that loads a trusted segment reads it. (Damage earlier in a trusted
    // segment is found by the CRC check on read.)
    let victim = &logs[1];
    let mut data = std::fs::read(victim).unwrap();
    let mut second = 0;
    while second + tally_proto::batch::batch_size_at(&data[second..]).unwrap() < data.len() {
        second += tally_proto::batch::batch_size_at(&data[second..]).unwrap();
    }
    data[second + 8..second + 12].copy_from_slice(&[0x7f, 0, 0, 0]);
    std::fs::write(victim, &data).unwrap();
    let err = Log::open(dir.path(), tiny_config(), Arc::new(SystemClock)).unwrap_err();
    assert!(
        matches!(&err, StorageError::CorruptBelowRecoveryPoint { path, position, .. } if path == victim && *position == second as u64),
        "{err}"
    );
    assert!(err.to_string().contains("dump-log"), "the message says what to do: {err}");
    for path in &logs {
        assert!(path.exists(), "{} was kept", path.display());
    }
    assert!(std::fs::read(victim).unwrap() == data, "nothing was cut");
}

/// `b` with its header changed by `f` and its CRC made right again.
fn patched(b: &RecordBatch, f: impl FnOnce(&mut [u8])) -> RecordBatch {
    let mut bytes = b.bytes().to_vec();
    f(&mut bytes);
    let crc = compute_crc(&bytes);
    bytes[17..21].copy_from_slice(&crc.to_be_bytes());
    RecordBatch::check_framing(Bytes::from(bytes)).unwrap()
}

#[test]
fn recovery_cuts_a_batch_whose_record_count_disagrees_with_its_offsets() {
    let dir = tempfile::tempdir().unwrap();
    let mut log = open(dir.path());
    fill(&mut log, 3, 2);
    log.close().unwrap();
    drop(log);
    // Append a batch whose recordCount lies, as a buggy or hostile writer
    // could have (the CRC is right), after the recovery point.
    let liar = patched(&batch(&[b"a", b"b"], 1), |h| {
        h[..8].copy_from_slice(&6i64.to_be_bytes());
        h[57..61].copy_from_slice(&5i32.to_be_bytes());
    });
    let seg = dir.path().join("00000000000000000000.log");
    let mut data = std::fs::read(&seg).unwrap();
    data.extend_from_slice(liar.bytes());
    std::fs::write(&seg, &data).unwrap();
    let log = open(dir.path());
    assert_eq!(log.log_end_offset().get(), 6);
}

#[test]
fn a_failed_epoch_checkpoint_leaves_the_log_unchanged_and_a_retry_stores_once() {
    let dir = tempfile::tempdir().unwrap();
    let mut log = open(dir.path());
    log.append(&batch(&[b"a", b"b"], 1), 0).unwrap();
    let before = read_all(&log, 0);
    testfs::fail_next(dir.path(), testfs::Op::Fsync, Some("leader-epoch"), 1);
    let next = batch(&[b"c"], 1);
    assert!(log.append(&next, 1).is_err(), "a new epoch's checkpoint failed");
    assert_eq!(log.log_end_offset().get(), 2, "the batch was not stored");
    assert_eq!(read_all(&log, 0), before);
    assert_eq!(log.leader_epochs().latest_epoch(), Some(0));
    log.append(&next, 1).unwrap();
    assert_eq!(log.log_end_offset().get(), 3, "the retry stored it once");
    let epochs: Vec<(u32, u64)> =
        log.leader_epochs().entries().iter().map(|e| (e.epoch, e.start_offset.get())).collect();
    assert_eq!(epochs, vec![(0, 0), (1, 2)]);
    testfs::forget(dir.path());
}

#[test]
fn a_sync_planned_before_a_truncation_marks_nothing_after_it_durable() {
    let dir = tempfile::tempdir().unwrap();
    let mut log = open(dir.path());
    fill(&mut log, 50, 2);
    let plan = log.sync_plan(); // covers up to 100
    log.truncate_to(Offset(50)).unwrap();
    fill(&mut log, 35, 2); // 50..120, never synced
    plan.execute().unwrap();
    assert!(log.mark_durable(&plan).get() <= 50, "new data past the cut is not durable");
    assert!(log.recovery_point().get() <= 50);
    assert_eq!(log.flush().unwrap(), Offset(120), "the next sync covers it");
}

#[test]
fn replica_and_leader_appends_refuse_what_a_leader_could_not_have_sent() {
    let dir = tempfile::tempdir().unwrap();
    let mut log = open(dir.path());
    let stamped = |b: &RecordBatch, base: i64, epoch: i32| {
        patched(b, |h| {
            h[..8].copy_from_slice(&base.to_be_bytes());
            h[12..16].copy_from_slice(&epoch.to_be_bytes());
        })
    };
    log.append_replica(&stamped(&batch(&[b"a"], 1), 0, 3)).unwrap();
    let negative_delta =
        patched(&stamped(&batch(&[b"b"], 1), 1, 3), |h| h[23..27].copy_from_slice(&(-1i32).to_be_bytes()));
    assert!(matches!(log.append_replica(&negative_delta), Err(StorageError::InvalidReplicaBatch(_))));
    let miscounted =
        patched(&stamped(&batch(&[b"b", b"c"], 1), 1, 3), |h| h[57..61].copy_from_slice(&3i32.to_be_bytes()));
    assert!(matches!(log.append_replica(&miscounted), Err(StorageError::InvalidReplicaBatch(_))));
    assert!(matches!(
        log.append_replica(&stamped(&batch(&[b"b"], 1), 1, -1)),
        Err(StorageError::InvalidReplicaBatch(_))
    ));
    assert!(matches!(
        log.append_replica(&stamped(&batch(&[b"b"], 1), 1, 2)),
        Err(StorageError::StaleLeaderEpoch { epoch: 2, latest: 3 })
    ));
    assert!(matches!(log.append(&batch(&[b"b"], 1), 2), Err(StorageError::StaleLeaderEpoch { epoch: 2, latest: 3 })));
    assert_eq!(log.log_end_offset().get(), 1, "nothing refused was stored");
    log.append_replica(&stamped(&batch(&[b"b"], 1), 1, 4)).unwrap();
    assert_eq!(log.log_end_offset().get(), 2);
}

#[test]
fn a_far_future_timestamp_does_not_pin_a_segment_against_retention() {
    let dir = tempfile::tempdir().unwrap();
    let clock = Arc::new(ManualClock::new(10_000));
    let mut config = tiny_config();
    config.retention_ms = Some(1_000);
    let mut log = Log::open(dir.path(), config, clock.clone()).unwrap();
    log.append(&batch(&[b"from the far future"], i64::MAX), 0).unwrap();
    log.roll().unwrap();
    log.append(&batch(&[b"now"], 10_000), 0).unwrap();
    log.set_high_watermark(log.log_end_offset());
    clock.advance(500);
    assert_eq!(log.enforce_retention().unwrap().segments_deleted, 0, "not yet past retention");
    clock.advance(1_000);
    assert_eq!(log.enforce_retention().unwrap().segments_deleted, 1, "judged by its append time");
    assert_eq!(log.log_start_offset().get(), 1);
}

/// Runs `scenario` in a child copy of this test binary with the file-size
/// limit set to `limit_bytes`, so writes past it fail with EFBIG the way a
/// full disk fails with ENOSPC, without touching other tests.
fn in_child_with_file_size_limit(test_name: &str, limit_bytes: u64, scenario: impl FnOnce()) {
    if std::env::var_os("TALLY_FSIZE_CHILD").is_some() {
        let limit = libc::rlimit { rlim_cur: limit_bytes, rlim_max: libc::RLIM_INFINITY };
        // SAFETY: plain syscalls; SIGXFSZ is ignored so the write returns EFBIG.
        unsafe {
            libc::signal(libc::SIGXFSZ, libc::SIG_IGN);
            assert_eq!(libc::setrlimit(libc::RLIMIT_FSIZE, &limit), 0);
        }
        scenario();
        return;
    }
    let out = std::process::Command::new(std::env::current_exe().unwrap())
        .args([test_name, "--exact", "--test-threads=1", "--nocapture"])
        .env("TALLY_FSIZE_CHILD", "1")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "child failed:\n{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    assert!(stdout.contains("1 passed"), "the child ran the scenario:\n{stdout}");
}

#[test]
fn a_write_error_during_append_is_typed_and_leaves_the_log_intact() {
    in_child_with_file_size_limit(
        "storage::log::tests::a_write_error_during_append_is_typed_and_leaves_the_log_intact",
        256 << 10,
        || {
            let dir = tempfile::tempdir().unwrap();
            let mut config = tiny_config();
            config.segment_bytes = 64 << 10;
            let mut log = Log::open(dir.path(), config.clone(), Arc::new(SystemClock)).unwrap();
            fill(&mut log, 20, 2);
            let before = read_all(&log, 0);
            // The pwrite of a batch fails, in the current epoch and in a new one.
            for epoch in [0, 1] {
                testfs::fail_next(dir.path(), testfs::Op::Write, Some(".log"), 1);
                let err = log.append(&batch(&[b"lost"], 1), epoch).unwrap_err();
                assert!(matches!(err, StorageError::Io { op: "write", .. }), "{err}");
                assert_eq!(log.log_end_offset().get(), 40, "nothing of the failed batch is visible");
                assert_eq!(read_all(&log, 0), before);
                assert_eq!(log.leader_epochs().latest_epoch(), Some(0), "a batch never stored begins no epoch");
            }
            testfs::forget(dir.path());
            // This batch needs a segment larger than the file-size limit.
            let big = vec![1u8; 300 << 10];
            let err = log.append(&batch(&[&big], 1), 0).unwrap_err();
            assert!(matches!(err, StorageError::Io { op: "preallocate", .. }), "{err}");
            assert_eq!(log.log_end_offset().get(), 40, "nothing of the failed batch is visible");
            assert_eq!(read_all(&log, 0), before);
            fill(&mut log, 1, 2);
            assert_eq!(log.log_end_offset().get(), 42, "the log keeps taking appends");
            drop(log);
            let log = Log::open(dir.path(), config, Arc::new(SystemClock)).unwrap();
            assert_eq!(log.log_end_offset().get(), 42, "and nothing partial appears after a restart");
            assert_eq!(read_all(&log, 0).len(), 42);
            let epochs: Vec<(u32, u64)> =
                log.leader_epochs().entries().iter().map(|e| (e.epoch, e.start_offset.get())).collect();
            assert_eq!(epochs, vec![(0, 0)], "nor an epoch of a batch that was never stored");
        },
    );
}

#[test]
fn write_behind_covers_completed_windows_and_dropped_pages_read_back_intact() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = tiny_config();
    config.segment_bytes = 16 << 20;
    config.writeback_window_bytes = 1 << 20;
    config.cache_min_free_percent = 100; // memory short: drop what is written back
    let mut log = Log::open(dir.path(), config, Arc::new(SystemClock)).unwrap();
    let value = vec![9u8; 64 << 10];
    let mut runs = 0;
    for _ in 0..60 {
        log.append(&batch(&[&value], 1), 0).unwrap();
        if let Some(w) = log.take_writeback() {
            w.run().unwrap();
            runs += 1;
        }
    }
    // ~3.75 MiB written: windows complete at 1, 2 and 3 MiB.
    assert_eq!(runs, 3);
    assert!(log.take_writeback().is_none(), "nothing new is due");
    assert!(log.may_read_disk(Offset(0), 64 << 10), "the first window was dropped from the cache");
    assert!(!log.may_read_disk(Offset(59), 64 << 10), "the newest windows stay cached");
    let r = log.read(Offset(0), u64::MAX, Offset::MAX).unwrap();
    let mut n = 0;
    for chunk in r.chunks {
        for b in BatchIter::new(chunk) {
            assert_eq!(b.unwrap().records().unwrap().next().unwrap().unwrap().value.unwrap(), value.as_slice());
            n += 1;
        }
    }
    assert_eq!(n, 60, "bytes dropped from the cache fault back in from the file");
}

/// Bytes of `path` in the page cache.
fn cached_bytes(path: &std::path::Path) -> u64 {
    let file = std::fs::File::open(path).unwrap();
    let len = file.metadata().unwrap().len() as usize;
    // SAFETY: a read-only map of a file this test owns; only its residency
    // is asked for.
    let map = unsafe { memmap2::Mmap::map(&file).unwrap() };
    let mut vec = vec![0u8; len.div_ceil(4096)];
    // SAFETY: the range is the whole mapping and `vec` has a byte per page.
    let rc = unsafe { libc::mincore(map.as_ptr() as *mut libc::c_void, len, vec.as_mut_ptr()) };
    assert_eq!(rc, 0, "mincore: {}", std::io::Error::last_os_error());
    vec.iter().filter(|v| **v & 1 == 1).count() as u64 * 4096
}

/// Writes ~3.75 MiB through 1 MiB write-behind windows into each of 16
/// logs under `cache_min_free_percent` and returns each log's cached bytes
/// of its segment, and whether a read from offset 0 may go to disk.
fn write_behind_cache(cache_min_free_percent: u8) -> Vec<(u64, bool)> {
    let root = tempfile::tempdir().unwrap();
    let value = vec![7u8; 64 << 10];
    (0..16)
        .map(|p| {
            let dir = root.path().join(format!("t-{p}"));
            let config = LogConfig {
                segment_bytes: 16 << 20,
                writeback_window_bytes: 1 << 20,
                cache_min_free_percent,
                retention_ms: None,
                ..LogConfig::default()
            };
            let mut log = Log::open(&dir, config, Arc::new(SystemClock)).unwrap();
            for _ in 0..60 {
                log.append(&batch(&[&value], 1), 0).unwrap();
                if let Some(w) = log.take_writeback() {
                    w.run().unwrap();
                }
            }
            (cached_bytes(&dir.join("00000000000000000000.log")), log.may_read_disk(Offset(0), 64 << 10))
        })
        .collect()
}

#[test]
fn with_memory_short_each_partition_caches_only_its_newest_windows() {
    // 100: memory counts as short whatever is free.
    for (p, (cached, may_read_disk)) in write_behind_cache(100).into_iter().enumerate() {
        // Windows complete at 1, 2 and 3 MiB; the third drops [0, 2 MiB).
        assert!(cached <= 2 << 20, "partition {p} caches {cached} bytes, more than its two newest windows");
        assert!(may_read_disk, "partition {p}: the dropped window is read from disk");
    }
}

#[test]
fn with_memory_to_spare_written_windows_stay_cached_for_catch_up_readers() {
    // 0: memory never counts as short.
    for (p, (cached, may_read_disk)) in write_behind_cache(0).into_iter().enumerate() {
        assert!(cached >= 3 << 20, "partition {p} caches only {cached} bytes of ~3.75 MiB written");
        assert!(!may_read_disk, "partition {p}: a read from the start is served from the cache");
    }
}

fn allocated_bytes(path: &std::path::Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(path).unwrap().blocks() * 512
}

#[test]
fn an_idle_partition_reserves_a_small_first_step_and_a_busy_one_allocates_ahead_in_growing_steps() {
    use super::super::segment::{LOG_ALLOCATION_STEP, LOG_FIRST_ALLOCATION};
    let dir = tempfile::tempdir().unwrap();
    let config = LogConfig { retention_ms: None, ..LogConfig::default() }; // 1 GiB segments
    let mut log = Log::open(dir.path(), config.clone(), Arc::new(SystemClock)).unwrap();
    let seg = dir.path().join("00000000000000000000.log");
    assert!(allocated_bytes(&seg) <= LOG_FIRST_ALLOCATION, "allocated {}", allocated_bytes(&seg));
    let mut idle = allocated_bytes(&seg);
    for ext in ["index", "timeindex"] {
        let idx = dir.path().join(format!("00000000000000000000.{ext}"));
        assert!(allocated_bytes(&idx) <= 16 << 10, "{ext} allocated {}", allocated_bytes(&idx));
        idle += allocated_bytes(&idx);
    }
    assert!(idle <= 128 << 10, "an idle partition reserves at most 128 KiB, not {idle}");
    // 40 MiB written: allocated ahead of the writer, by at most one step
    // (steps double up to 32 MiB), and the data reads back.
    let value = vec![3u8; 512 << 10];
    let batches = 80u64;
    for _ in 0..batches {
        log.append(&batch(&[&value], 1), 0).unwrap();
    }
    let written = std::fs::metadata(&seg).unwrap().len().min(batches * (512 << 10));
    let allocated = allocated_bytes(&seg);
    assert!(allocated >= written, "allocated {allocated} below written {written}");
    assert!(allocated <= written + LOG_ALLOCATION_STEP && allocated <= 2 * written, "allocated {allocated}");
    drop(log);
    let log = Log::open(dir.path(), config, Arc::new(SystemClock)).unwrap();
    assert_eq!(log.log_end_offset().get(), batches);
}

fn compressed_batch(timestamps: &[i64]) -> RecordBatch {
    let mut b = tally_proto::batch::BatchBuilder::new();
    b.set_compression(tally_proto::compression::Compression::Lz4);
    for ts in timestamps {
        b.push(&tally_proto::batch::RecordRef { timestamp: *ts, value: Some(b"v"), ..Default::default() });
    }
    RecordBatch::validate(b.finish(), &BatchLimits::default()).unwrap()
}

#[test]
fn timestamp_lookups_answer_a_record_inside_compressed_batches() {
    let dir = tempfile::tempdir().unwrap();
    let mut log = open(dir.path());
    log.append(&compressed_batch(&[10, 20, 30, 25]), 0).unwrap(); // offsets 0-3
    log.append(&compressed_batch(&[40, 35, 50]), 0).unwrap(); // offsets 4-6
    assert_eq!(log.offset_for_timestamp(15).unwrap(), Some((Offset(1), 20)), "the record, not the batch");
    assert_eq!(log.offset_for_timestamp(26).unwrap(), Some((Offset(2), 30)));
    assert_eq!(log.offset_for_timestamp(36).unwrap(), Some((Offset(4), 40)));
    assert_eq!(log.offset_for_timestamp(51).unwrap(), None);
    // The record with the largest timestamp, below an upper bound.
    assert_eq!(log.max_timestamp_record(Offset(7)).unwrap(), Some((Offset(6), 50)));
    assert_eq!(log.max_timestamp_record(Offset(4)).unwrap(), Some((Offset(2), 30)), "whole batches below the bound");
    assert_eq!(log.max_timestamp_record(Offset(0)).unwrap(), None);
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, .. ProptestConfig::default() })]

    /// ListOffsets by timestamp against a brute-force scan of every record:
    /// out-of-order and equal timestamps, plain and compressed batches,
    /// several segments, and targets inside batches.
    #[test]
    fn timestamp_lookups_match_a_scan_of_the_records(
        batches in proptest::collection::vec(
            (proptest::collection::vec(0i64..200, 1..6), any::<bool>()), 1..25),
        targets in proptest::collection::vec(-5i64..210, 1..40),
    ) {
        let dir = tempfile::tempdir().unwrap();
        let mut log = open(dir.path());
        let mut all: Vec<i64> = Vec::new();
        for (timestamps, compress) in &batches {
            let mut b = BatchBuilder::new();
            if *compress {
                b.set_compression(tally_proto::compression::Compression::Snappy);
            }
            for ts in timestamps {
                b.push(&RecordRef { timestamp: *ts, value: Some(b"v"), ..Default::default() });
            }
            log.append(&RecordBatch::validate(b.finish(), &BatchLimits::default()).unwrap(), 0).unwrap();
            all.extend(timestamps);
        }
        for t in targets {
            let expected = all.iter().position(|ts| *ts >= t).map(|o| (Offset(o as u64), all[o]));
            prop_assert_eq!(log.offset_for_timestamp(t).unwrap(), expected, "timestamp {}", t);
        }
        let max = *all.iter().max().unwrap();
        let first_max = all.iter().position(|ts| *ts == max).unwrap();
        let end = Offset(all.len() as u64);
        prop_assert_eq!(log.max_timestamp_record(end).unwrap(), Some((Offset(first_max as u64), max)));
    }
}

#[test]
fn mark_durable_moves_nothing_on_a_failed_log() {
    let dir = tempfile::tempdir().unwrap();
    let mut log = open(dir.path());
    fill(&mut log, 3, 2);
    let plan = log.sync_plan();
    plan.execute().unwrap();
    // Another sync of the same files failed meanwhile: this one's success
    // proves nothing (Linux dropped the dirty pages).
    log.fail(&"fdatasync: EIO");
    assert_eq!(log.mark_durable(&plan), Offset(0));
    assert_eq!(log.recovery_point(), Offset(0));
}

#[test]
fn a_roll_between_planning_and_marking_a_sync_keeps_the_closed_segments_indexes_unsynced() {
    let dir = Watched::new();
    let mut log = open(dir.path());
    fill(&mut log, 6, 2);
    log.flush().unwrap();
    let plan = log.sync_plan(); // the active segment's `.log` only
    plan.execute().unwrap();
    log.roll().unwrap();
    let base = log.segments.keys().next_back().copied().unwrap();
    let closed = *log.segments.range(..base).next_back().unwrap().0;
    log.mark_durable(&plan);
    log.flush().unwrap();
    let index = dir.path().join(file_name(closed, "index"));
    let timeindex = dir.path().join(file_name(closed, "timeindex"));
    let (index_bytes, time_bytes) = (std::fs::read(&index).unwrap(), std::fs::read(&timeindex).unwrap());
    assert!(!index_bytes.is_empty() && !time_bytes.is_empty());
    drop(log);
    testfs::power_loss(dir.path());
    assert_eq!(std::fs::read(&index).unwrap(), index_bytes, "the closed segment's offset index was fsynced");
    assert_eq!(std::fs::read(&timeindex).unwrap(), time_bytes, "and its time index");
}

#[test]
fn a_new_log_is_created_without_syncing_its_empty_files() {
    let parent = tempfile::tempdir().unwrap();
    let dir = parent.path().join("topic-0");
    // Only the parent's fsync (the new directory's entry) is allowed.
    testfs::fail_next(&dir, testfs::Op::Fsync, None, 1);
    testfs::fail_next(&dir, testfs::Op::DirFsync, None, 1);
    let log = open(&dir);
    assert_eq!(log.log_end_offset().get(), 0);
    testfs::forget(&dir);
}

#[test]
fn a_new_partition_directory_survives_power_loss() {
    let parent = tempfile::tempdir().unwrap();
    let dir = parent.path().join("topic-0");
    testfs::watch_new(&dir);
    let mut log = open(&dir);
    fill(&mut log, 3, 2);
    log.flush().unwrap();
    drop(log);
    testfs::power_loss(&dir);
    assert!(dir.is_dir(), "the directory's entry in its parent was fsynced");
    let log = open(&dir);
    assert_eq!(log.log_end_offset().get(), 6, "flushed records survive");
    testfs::forget(&dir);
}

/// The position and base offset of every batch in a segment file.
fn batch_positions(data: &[u8]) -> Vec<(usize, u64)> {
    let (mut pos, mut out) = (0usize, Vec::new());
    while let Some(len) = tally_proto::batch::batch_size_at(&data[pos..]) {
        let base = tally_proto::batch::BatchHeader::new(&data[pos..]).unwrap().base_offset() as u64;
        out.push((pos, base));
        pos += len;
        if pos >= data.len() {
            break;
        }
    }
    out
}

#[test]
fn a_flipped_byte_with_valid_segments_after_it_is_reported_and_nothing_is_deleted() {
    let dir = tempfile::tempdir().unwrap();
    let mut log = open(dir.path());
    fill(&mut log, 30, 2);
    let bases: Vec<u64> = log.segments.keys().copied().collect();
    assert!(bases.len() >= 3);
    log.close().unwrap();
    drop(log);
    // What a crash leaves when the recovery point was written long ago.
    std::fs::write(dir.path().join("recovery-point-checkpoint"), "0\n0\n").unwrap();
    let first = dir.path().join(file_name(bases[0], "log"));
    let mut data = std::fs::read(&first).unwrap();
    let (pos, _) = batch_positions(&data)[1];
    data[pos + 70] ^= 0x01; // inside a record: the CRC fails
    std::fs::write(&first, &data).unwrap();
    match Log::open(dir.path(), tiny_config(), Arc::new(SystemClock)) {
        Err(StorageError::DamagedAboveRecoveryPoint { path, position, .. }) => {
            assert_eq!((path, position), (first.clone(), pos as u64));
        }
        other => panic!("damage followed by valid data must be reported, got {other:?}"),
    }
    for base in &bases {
        assert!(dir.path().join(file_name(*base, "log")).exists(), "segment {base} was kept");
    }
    assert_eq!(std::fs::read(&first).unwrap(), data, "nothing was cut");
}

#[test]
fn a_flipped_byte_in_a_batch_with_valid_batches_after_it_in_the_same_file_is_reported() {
    let dir = tempfile::tempdir().unwrap();
    let mut log = reopen_tail_config(dir.path()).unwrap();
    fill(&mut log, 12, 3);
    log.close().unwrap();
    drop(log);
    std::fs::write(dir.path().join("recovery-point-checkpoint"), "0\n0\n").unwrap();
    let seg = dir.path().join("00000000000000000000.log");
    let mut data = std::fs::read(&seg).unwrap();
    let (pos, _) = batch_positions(&data)[5];
    data[pos + 20] ^= 0x40; // in the CRC field
    std::fs::write(&seg, &data).unwrap();
    let err = reopen_tail_config(dir.path()).unwrap_err();
    assert!(matches!(err, StorageError::DamagedAboveRecoveryPoint { position, .. } if position == pos as u64), "{err}");
}

#[test]
fn a_lost_sector_of_unsynced_data_is_still_cut_as_a_torn_write() {
    let dir = tempfile::tempdir().unwrap();
    let mut log = reopen_tail_config(dir.path()).unwrap();
    fill(&mut log, 40, 3);
    log.close().unwrap();
    drop(log);
    std::fs::write(dir.path().join("recovery-point-checkpoint"), "0\n0\n").unwrap();
    let seg = dir.path().join("00000000000000000000.log");
    let mut data = std::fs::read(&seg).unwrap();
    // A page that never reached the disk, with later pages that did.
    data[512..1024].fill(0);
    std::fs::write(&seg, &data).unwrap();
    let damaged = batch_positions(&data).into_iter().take_while(|(p, _)| *p < 512).last().unwrap();
    let log = reopen_tail_config(dir.path()).unwrap();
    assert_eq!(log.log_end_offset().get(), damaged.1, "cut at the batch the lost sector tore");
}

#[test]
fn a_flipped_leader_epoch_is_reported_and_never_enters_the_epoch_cache() {
    let dir = tempfile::tempdir().unwrap();
    let mut log = open(dir.path());
    log.append(&batch(&[b"a"], 1), 3).unwrap();
    log.append(&batch(&[b"b"], 1), 5).unwrap();
    log.append(&batch(&[b"c"], 1), 5).unwrap();
    log.close().unwrap();
    drop(log);
    std::fs::write(dir.path().join("recovery-point-checkpoint"), "0\n0\n").unwrap();
    let seg = dir.path().join("00000000000000000000.log");
    let original = std::fs::read(&seg).unwrap();
    let batches = batch_positions(&original);
    // The last batch's epoch 5 becomes 7 (no CRC covers it); then the
    // middle batch's 5 becomes 4 (goes backwards from nothing, but
    // disagrees with the checkpoint).
    for (which, epoch) in [(2usize, 7i32), (1, 4)] {
        let mut data = original.clone();
        let pos = batches[which].0;
        data[pos + 12..pos + 16].copy_from_slice(&epoch.to_be_bytes());
        std::fs::write(&seg, &data).unwrap();
        match Log::open(dir.path(), tiny_config(), Arc::new(SystemClock)) {
            Err(StorageError::DamagedAboveRecoveryPoint { position, .. }) => assert_eq!(position, pos as u64),
            Ok(log) => panic!("epoch {epoch} accepted; cache {:?}", log.leader_epochs()),
            Err(e) => panic!("{e}"),
        }
    }
    std::fs::write(&seg, &original).unwrap();
    let log = open(dir.path());
    let epochs: Vec<(u32, u64)> =
        log.leader_epochs().entries().iter().map(|e| (e.epoch, e.start_offset.get())).collect();
    assert_eq!(epochs, vec![(3, 0), (5, 1)]);
}

#[test]
fn a_sync_records_the_recovery_point_on_disk() {
    let dir = tempfile::tempdir().unwrap();
    let mut log = open(dir.path());
    fill(&mut log, 4, 2);
    log.flush().unwrap();
    let on_disk = Checkpoints::read(dir.path()).unwrap().recovery_point;
    assert_eq!(on_disk, Offset(8), "without waiting for the periodic checkpoint");
}

/// Asserts the log holds offsets `0..leo` with their values, `leo >= at_least`.
fn assert_prefix(log: &Log, at_least: u64, context: &str) {
    let leo = log.log_end_offset().get();
    assert!(leo >= at_least, "{context}: log ends at {leo}, synced data reached {at_least}");
    let all = read_all(log, 0);
    assert_eq!(all.len() as u64, leo, "{context}");
    assert!(all.iter().enumerate().all(|(i, (o, v))| *o == i as u64 && *v == value_for(*o)), "{context}");
}

#[test]
fn power_loss_in_the_middle_of_a_truncation_leaves_a_prefix() {
    for seed in 1..=8u64 {
        let dir = Watched::new();
        let mut log = open(dir.path());
        fill(&mut log, 50, 2);
        log.flush().unwrap();
        // The truncation stops at its directory fsync.
        testfs::fail_next(dir.path(), testfs::Op::DirFsync, None, 1);
        assert!(log.truncate_to(Offset(31)).is_err(), "seed {seed}");
        drop(log);
        testfs::power_loss_torn(dir.path(), seed);
        let log = Log::open(dir.path(), tiny_config(), Arc::new(SystemClock))
            .unwrap_or_else(|e| panic!("seed {seed}: a crashed truncation must reopen: {e}"));
        assert_prefix(&log, 30, &format!("seed {seed}"));
    }
}

#[test]
fn power_loss_in_the_middle_of_a_roll_keeps_what_was_synced() {
    for seed in 1..=8u64 {
        let dir = Watched::new();
        let mut log = open(dir.path());
        fill(&mut log, 9, 2);
        log.flush().unwrap();
        let synced = log.log_end_offset().get();
        let segments = log.segment_count();
        // Appends that roll, never synced: power fails with writes torn.
        fill(&mut log, 10, 2);
        assert!(log.segment_count() > segments, "the appends rolled");
        drop(log);
        testfs::power_loss_torn(dir.path(), seed);
        let log =
            Log::open(dir.path(), tiny_config(), Arc::new(SystemClock)).unwrap_or_else(|e| panic!("seed {seed}: {e}"));
        assert_prefix(&log, synced, &format!("seed {seed}"));
    }
}

#[test]
fn power_loss_after_a_cut_at_a_segments_base_keeps_the_cut() {
    for seed in 1..=8u64 {
        let dir = Watched::new();
        let mut log = open(dir.path());
        fill(&mut log, 50, 2);
        log.flush().unwrap();
        let base = *log.segments.keys().nth(2).unwrap();
        assert_eq!(log.truncate_to(Offset(base)).unwrap(), Offset(base));
        drop(log);
        testfs::power_loss_torn(dir.path(), seed);
        let log =
            Log::open(dir.path(), tiny_config(), Arc::new(SystemClock)).unwrap_or_else(|e| panic!("seed {seed}: {e}"));
        assert_eq!(log.log_end_offset().get(), base, "seed {seed}: the cut batches never come back");
        assert_prefix(&log, base, &format!("seed {seed}"));
    }
}

#[test]
fn corrupt_offset_and_time_indexes_are_rebuilt_at_open() {
    let dir = tempfile::tempdir().unwrap();
    let mut log = open(dir.path());
    fill(&mut log, 30, 2);
    let closed: Vec<u64> = log.segments.keys().copied().collect();
    let expected_ts: Vec<_> = (0..60).map(|o| log.offset_for_timestamp(1000 + o).unwrap()).collect();
    log.close().unwrap();
    drop(log);
    for (i, base) in closed[..closed.len() - 1].iter().enumerate() {
        for ext in ["index", "timeindex"] {
            let path = dir.path().join(file_name(*base, ext));
            let mut data = std::fs::read(&path).unwrap();
            assert!(data.len() >= 8, "{ext} of {base} has entries");
            // Entries out of order, or pointing past the file's end.
            let fill_byte = if i % 2 == 0 { 0xff } else { 0x00 };
            let at = data.len() / 2;
            data[at..].fill(fill_byte);
            data[..4].fill(0x7f);
            std::fs::write(&path, &data).unwrap();
        }
    }
    let log = open(dir.path());
    assert_prefix(&log, 60, "after corrupt indexes");
    for o in 0..60u64 {
        let read = log.read(Offset(o), 1, Offset::MAX).unwrap();
        let first = BatchIter::new(read.chunks[0].clone()).next().unwrap().unwrap();
        let h = first.header();
        assert!(h.base_offset() as u64 <= o && o <= h.last_offset() as u64, "the index found offset {o}");
    }
    let now: Vec<_> = (0..60).map(|o| log.offset_for_timestamp(1000 + o).unwrap()).collect();
    assert_eq!(now, expected_ts, "timestamp lookups answer as before");
}

#[test]
fn a_full_recovery_rebuilds_epochs_that_change_between_segments() {
    let dir = tempfile::tempdir().unwrap();
    let mut log = open(dir.path());
    log.append(&batch(&[b"a"], 1), 1).unwrap();
    log.roll().unwrap();
    log.append(&batch(&[b"b"], 1), 2).unwrap();
    log.roll().unwrap();
    log.append(&batch(&[b"c"], 1), 2).unwrap();
    log.close().unwrap();
    drop(log);
    std::fs::remove_file(dir.path().join("leader-epoch-checkpoint")).unwrap();
    std::fs::write(dir.path().join("recovery-point-checkpoint"), "0\n0\n").unwrap();
    let log = Log::open(dir.path(), tiny_config(), Arc::new(SystemClock)).unwrap();
    let epochs: Vec<(u32, u64)> =
        log.leader_epochs().entries().iter().map(|e| (e.epoch, e.start_offset.get())).collect();
    assert_eq!(epochs, vec![(1, 0), (2, 1)]);
}

#[test]
fn an_injected_pwrite_error_fails_the_append_and_stores_nothing() {
    let dir = Watched::new();
    let mut log = open(dir.path());
    fill(&mut log, 3, 2);
    testfs::fail_next(dir.path(), testfs::Op::Write, Some(".log"), 1);
    let err = log.append(&batch(&[b"lost"], 1), 0).unwrap_err();
    assert!(matches!(err, StorageError::Io { op: "write", .. }), "{err}");
    assert_eq!(log.log_end_offset().get(), 6, "nothing was appended");
    fill(&mut log, 1, 2);
    assert_prefix(&log, 8, "the next append lands where the failed one would have");
}

#[test]
fn a_failed_directory_fsync_in_a_truncation_fails_the_log() {
    let dir = Watched::new();
    let mut log = open(dir.path());
    fill(&mut log, 50, 2); // not flushed: the recovery point needs no lowering
    testfs::fail_next(dir.path(), testfs::Op::DirFsync, None, 1);
    assert!(matches!(log.truncate_to(Offset(31)), Err(StorageError::Io { op: "fsync directory", .. })));
    assert!(matches!(log.flush(), Err(StorageError::LogFailed { .. })), "no later fsync is trusted");
    assert!(matches!(log.append(&batch(&[b"z"], 1), 0), Err(StorageError::LogFailed { .. })));
}

#[test]
fn the_recovery_point_after_syncs_is_written_at_most_once_per_interval() {
    let dir = tempfile::tempdir().unwrap();
    let clock = Arc::new(ManualClock::new(10_000));
    let mut log = Log::open(dir.path(), tiny_config(), clock.clone()).unwrap();
    fill(&mut log, 2, 2);
    log.flush().unwrap();
    assert_eq!(Checkpoints::read(dir.path()).unwrap().recovery_point, Offset(4), "the first flush writes it");
    fill(&mut log, 1, 2);
    log.flush().unwrap();
    assert_eq!(Checkpoints::read(dir.path()).unwrap().recovery_point, Offset(4), "flush keeps the same rate");
    fill(&mut log, 1, 2);
    let plan = log.sync_plan();
    plan.execute().unwrap();
    log.mark_durable(&plan);
    assert!(log.recovery_point_after_sync().is_none(), "not again within the interval");
    clock.advance(crate::storage::RECOVERY_POINT_WRITE_INTERVAL_MS);
    let next = log.recovery_point_after_sync().expect("once the interval passed");
    next.write().unwrap();
    assert_eq!(Checkpoints::read(dir.path()).unwrap().recovery_point, Offset(8));
}

/// Files under `dir` this process holds a descriptor of.
fn open_files_under(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let dir = dir.canonicalize().unwrap();
    let mut out: Vec<_> = std::fs::read_dir("/proc/self/fd")
        .unwrap()
        .filter_map(Result::ok)
        .filter_map(|e| std::fs::read_link(e.path()).ok())
        .filter(|p| p.starts_with(&dir))
        .collect();
    out.sort();
    out
}

#[test]
fn a_segment_holds_one_descriptor_its_indexes_none() {
    let dir = tempfile::tempdir().unwrap();
    let config = LogConfig { segment_bytes: 4096, ..LogConfig::default() };
    let mut log = Log::open(dir.path(), config.clone(), Arc::new(SystemClock)).unwrap();
    for _ in 0..20 {
        log.append(&batch(&[&[7u8; 1000]], 1), 0).unwrap();
    }
    assert!(log.segment_count() >= 3, "rolled");
    // Syncing lets go of the closed segments' index files too.
    let plan = log.sync_plan();
    plan.execute().unwrap();
    log.mark_durable(&plan);
    drop(plan);
    let held = open_files_under(dir.path());
    assert!(held.iter().all(|p| p.extension().is_some_and(|e| e == "log")), "{held:?}");
    assert_eq!(held.len(), log.segment_count(), "one per segment: {held:?}");
    // Indexes still answer lookups and grow after a reopen.
    drop(log);
    let mut log = Log::open(dir.path(), config, Arc::new(SystemClock)).unwrap();
    assert_eq!(log.offset_for_timestamp(1).unwrap().map(|(o, _)| o), Some(Offset(0)));
    log.append(&batch(&[&[7u8; 1000]], 1), 0).unwrap();
    assert_eq!(log.log_end_offset(), Offset(21));
}
