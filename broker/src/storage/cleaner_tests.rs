//! Tests of log compaction: what survives, tombstones, bounded maps cleaning
//! in parts, readers holding old bytes, and a crash at every step of a swap.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use proptest::prelude::*;
use tally_proto::batch::{BatchBuilder, BatchIter, BatchLimits, RecordBatch, RecordRef};

use super::*;
use crate::storage::config::Compaction;
use crate::storage::{Clock, LogConfig, ManualClock, Offset, testfs};

const RETENTION: i64 = 10_000;

fn config(segment_bytes: u64) -> LogConfig {
    LogConfig {
        segment_bytes,
        index_interval_bytes: 100,
        segment_index_bytes: 4096,
        retention_ms: None,
        compaction: Some(Compaction {
            min_cleanable_dirty_ratio: 0.0,
            delete_retention_ms: RETENTION,
            ..Compaction::default()
        }),
        ..LogConfig::default()
    }
}

/// A record: key and value (`None`: a tombstone).
type Rec = (String, Option<String>);

fn keyed(records: &[Rec], ts: i64) -> RecordBatch {
    let mut b = BatchBuilder::new();
    for (key, value) in records {
        b.push(&RecordRef {
            timestamp: ts,
            key: Some(key.as_bytes()),
            value: value.as_deref().map(str::as_bytes),
            headers: &[],
        });
    }
    RecordBatch::validate(b.finish(), &BatchLimits { max_batch_bytes: usize::MAX, ..BatchLimits::default() }).unwrap()
}

/// Every record readable from the log start: (offset, key, value).
fn read_records(log: &Log) -> Vec<(u64, String, Option<String>)> {
    let mut out = Vec::new();
    let mut next = log.log_start_offset().get();
    let text = |b: Option<Bytes>| b.map(|b| String::from_utf8(b.to_vec()).unwrap());
    loop {
        let r = log.read(Offset(next), 500, Offset::MAX).unwrap();
        if r.chunks.is_empty() {
            break;
        }
        for chunk in r.chunks {
            for batch in BatchIter::new(chunk) {
                let batch = batch.unwrap();
                let h = batch.header();
                assert_eq!(h.base_offset() as u64, next, "batches cover every offset, in order");
                next = h.next_offset() as u64;
                for record in batch.records().unwrap() {
                    let record = record.unwrap();
                    out.push((record.offset as u64, text(record.key).unwrap(), text(record.value)));
                }
            }
        }
        assert_eq!(next, r.next_offset.get());
    }
    out
}

fn open(dir: &Path, segment_bytes: u64, clock: &Arc<ManualClock>) -> Mutex<Log> {
    Mutex::new(Log::open(dir, config(segment_bytes), clock.clone()).unwrap())
}

/// Appends one batch per record group, then rolls and moves the high
/// watermark to the end, so everything written is cleanable.
fn append_all(log: &Mutex<Log>, groups: &[Vec<Rec>], clock: &ManualClock) -> Vec<(u64, String, Option<String>)> {
    let mut written = Vec::new();
    let mut log = log.lock().unwrap();
    for group in groups {
        let info = log.append(&keyed(group, clock.now_ms()), 0).unwrap();
        for (i, (k, v)) in group.iter().enumerate() {
            written.push((info.base_offset.get() + i as u64, k.clone(), v.clone()));
        }
    }
    log.roll().unwrap();
    let leo = log.log_end_offset();
    log.set_high_watermark(leo);
    written
}

fn rec(key: &str, value: Option<&str>) -> Rec {
    (key.to_string(), value.map(str::to_string))
}

/// The last record of every key among `written`.
fn latest(written: &[(u64, String, Option<String>)]) -> BTreeMap<String, (u64, Option<String>)> {
    written.iter().map(|(o, k, v)| (k.clone(), (*o, v.clone()))).collect()
}

fn clean(cleaner: &mut Cleaner, log: &Mutex<Log>, _clock: &ManualClock) -> Option<CleanOutcome> {
    cleaner.clean_if_due(log, true).unwrap()
}

#[test]
fn the_last_record_of_every_key_survives_at_its_offset_and_the_rest_goes() {
    let dir = tempfile::tempdir().unwrap();
    let clock = Arc::new(ManualClock::new(1_000_000));
    let log = open(dir.path(), 1024, &clock);
    let groups: Vec<Vec<Rec>> = (0..60)
        .map(|i| (0..3).map(|j| rec(&format!("k{}", (i * 3 + j) % 7), Some(&format!("v{i}-{j}")))).collect())
        .collect();
    let written = append_all(&log, &groups, &clock);
    let (segments_before, bytes_before) = log.with_log(|l| (l.segment_count(), l.size_bytes()));
    let outcome = clean(&mut Cleaner::new(CleanerConfig::default()), &log, &clock).expect("a pass ran");
    assert!(outcome.completed);
    let by_offset: BTreeMap<u64, (String, Option<String>)> =
        latest(&written).into_iter().map(|(k, (o, v))| (o, (k, v))).collect();
    let expected: Vec<(u64, String, Option<String>)> = by_offset.into_iter().map(|(o, (k, v))| (o, k, v)).collect();
    let got = log.with_log(|l| read_records(l));
    assert_eq!(got, expected, "one record per key, the last, at its offset");
    assert_eq!(outcome.records_removed, (written.len() - expected.len()) as u64);
    let bytes_after = log.with_log(|l| l.size_bytes());
    assert!(bytes_after * 4 < bytes_before, "{bytes_before} -> {bytes_after} bytes");
    // A fetch at a removed offset answers the batch covering it.
    let first_kept = expected[0].0;
    if first_kept > 0 {
        let r = log.with_log(|l| l.read(Offset(first_kept - 1), 1, Offset::MAX).unwrap());
        assert!(!r.chunks.is_empty() && r.next_offset.get() >= first_kept);
    }
    // The clean is durable: a reopen reads the same.
    drop(log);
    let log = open(dir.path(), 1024, &clock);
    assert_eq!(log.with_log(|l| read_records(l)), expected);
    // The next pass merges the small cleaned segments.
    let mut written = written;
    written.extend(append_all(&log, &[vec![rec("k0", Some("last"))]], &clock));
    clean(&mut Cleaner::new(CleanerConfig::default()), &log, &clock).expect("a pass ran");
    let segments_after = log.with_log(|l| l.segment_count());
    assert!(segments_after <= 3, "small cleaned segments are merged: {segments_before} -> {segments_after}");
    let expected: Vec<(u64, String, Option<String>)> = latest(&written)
        .into_iter()
        .map(|(k, (o, v))| (o, (k, v)))
        .collect::<BTreeMap<_, _>>()
        .into_iter()
        .map(|(o, (k, v))| (o, k, v))
        .collect();
    assert_eq!(log.with_log(|l| read_records(l)), expected);
    let stats = log.with_log(|l| l.cleaning_stats(clock.now_ms())).unwrap();
    assert_eq!((stats.dirty_bytes, stats.cleaner_offset.get()), (0, written.len() as u64), "{stats:?}");
    assert_eq!(stats.dirty_ratio(), 0.0);
}

#[test]
fn nothing_at_or_above_the_high_watermark_or_in_the_active_segment_is_cleaned() {
    let dir = tempfile::tempdir().unwrap();
    let clock = Arc::new(ManualClock::new(1_000_000));
    let log = open(dir.path(), 1 << 20, &clock);
    let mut groups = vec![vec![rec("a", Some("1"))], vec![rec("a", Some("2"))]];
    let written = append_all(&log, &groups, &clock);
    // Newer values of `a` in the active segment do not clean the closed one.
    groups = vec![vec![rec("a", Some("3"))]];
    log.with_log(|l| l.append(&keyed(&groups[0], 0), 0).unwrap());
    clean(&mut Cleaner::new(CleanerConfig::default()), &log, &clock);
    let got = log.with_log(|l| read_records(l));
    assert_eq!(got.len(), 2, "the closed segment keeps its last `a`, the active one is untouched: {got:?}");
    assert_eq!(got[0], written[1]);
    // Below the high watermark only.
    let dir = tempfile::tempdir().unwrap();
    let log = open(dir.path(), 1 << 20, &clock);
    append_all(&log, &[vec![rec("b", Some("1"))], vec![rec("b", Some("2"))]], &clock);
    log.with_log(|l| l.set_high_watermark(Offset(1)));
    assert!(clean(&mut Cleaner::new(CleanerConfig::default()), &log, &clock).is_none(), "nothing cleanable");
    assert_eq!(log.with_log(|l| read_records(l)).len(), 2);
}

#[test]
fn a_tombstone_outlives_its_first_clean_by_the_delete_retention_then_goes() {
    let dir = tempfile::tempdir().unwrap();
    let clock = Arc::new(ManualClock::new(1_000_000));
    let log = open(dir.path(), 1 << 20, &clock);
    let mut cleaner = Cleaner::new(CleanerConfig::default());
    append_all(&log, &[vec![rec("a", Some("1")), rec("b", Some("1"))], vec![rec("a", None)]], &clock);
    clean(&mut cleaner, &log, &clock);
    let got = log.with_log(|l| read_records(l));
    assert_eq!(got, vec![(1, "b".into(), Some("1".into())), (2, "a".into(), None)], "the tombstone stays");
    // Before the horizon, another clean keeps it.
    clock.advance(RETENTION - 1);
    append_all(&log, &[vec![rec("c", Some("1"))]], &clock);
    clean(&mut cleaner, &log, &clock);
    assert!(log.with_log(|l| read_records(l)).contains(&(2, "a".into(), None)));
    clock.advance(2);
    append_all(&log, &[vec![rec("d", Some("1"))]], &clock);
    clean(&mut cleaner, &log, &clock);
    let got = log.with_log(|l| read_records(l));
    assert_eq!(
        got.iter().map(|(_, k, _)| k.as_str()).collect::<Vec<_>>(),
        ["b", "c", "d"],
        "past its horizon the tombstone is gone, and `a` with it"
    );
}

#[test]
fn a_section_of_one_large_batch_fits_the_map_it_sizes() {
    let dir = tempfile::tempdir().unwrap();
    let clock = Arc::new(ManualClock::new(1_000_000));
    let log = open(dir.path(), 1 << 20, &clock);
    for n in [200usize, 9, 1000] {
        let group: Vec<Rec> = (0..n).map(|i| rec(&format!("k{}", i % (n / 2).max(1)), Some("v"))).collect();
        append_all(&log, &[group], &clock);
        let outcome = clean(&mut Cleaner::new(CleanerConfig::default()), &log, &clock).expect("a pass ran");
        assert!(outcome.completed && outcome.records_removed > 0, "{n} records: {outcome:?}");
    }
}

#[test]
fn a_truncation_below_the_cleaner_offset_makes_what_follows_dirty_again() {
    let dir = tempfile::tempdir().unwrap();
    let clock = Arc::new(ManualClock::new(1_000_000));
    let log = open(dir.path(), 1 << 20, &clock);
    let mut cleaner = Cleaner::new(CleanerConfig::default());
    append_all(&log, &[vec![rec("a", Some("1"))], vec![rec("b", Some("1"))], vec![rec("c", Some("1"))]], &clock);
    clean(&mut cleaner, &log, &clock);
    assert_eq!(log.with_log(|l| l.cleaning_stats(0).unwrap().cleaner_offset), Offset(3));
    // A new leader's log differs from offset 1 on: the tail is cut, and
    // its tombstone for `a` lands below the old cleaner offset.
    log.with_log(|l| l.truncate_to(Offset(1)).unwrap());
    assert_eq!(log.with_log(|l| l.cleaning_stats(0).unwrap().cleaner_offset), Offset(1));
    append_all(&log, &[vec![rec("a", None)], vec![rec("d", Some("1"))], vec![rec("e", Some("1"))]], &clock);
    clean(&mut cleaner, &log, &clock);
    clock.advance(RETENTION + 1);
    append_all(&log, &[vec![rec("f", Some("1"))]], &clock);
    clean(&mut cleaner, &log, &clock);
    let keys: Vec<String> = log.with_log(|l| read_records(l)).into_iter().map(|(_, k, _)| k).collect();
    assert_eq!(keys, ["d", "e", "f"], "the tombstone took `a` with it; nothing came back");
}

#[test]
fn a_producers_last_batch_stays_emptied_when_all_its_records_are_superseded() {
    let dir = tempfile::tempdir().unwrap();
    let clock = Arc::new(ManualClock::new(1_000_000));
    let log = open(dir.path(), 1 << 20, &clock);
    for (sequence, key) in [(0, "a"), (1, "b")] {
        let mut b = BatchBuilder::new();
        b.set_producer(7, 3, sequence);
        b.push(&RecordRef { timestamp: 0, key: Some(key.as_bytes()), value: Some(b"old"), headers: &[] });
        let batch = RecordBatch::validate(b.finish(), &BatchLimits::default()).unwrap();
        log.with_log(|l| l.append(&batch, 0).unwrap());
    }
    append_all(&log, &[vec![rec("a", Some("new")), rec("b", Some("new"))]], &clock);
    clean(&mut Cleaner::new(CleanerConfig::default()), &log, &clock);
    let batches: Vec<(i64, i64, i32, i64, i32)> = log.with_log(|l| {
        let r = l.read(Offset(0), u64::MAX, Offset::MAX).unwrap();
        r.chunks
            .into_iter()
            .flat_map(BatchIter::new)
            .map(|b| {
                let b = b.unwrap();
                let h = b.header();
                (h.base_offset(), h.last_offset(), h.record_count(), h.producer_id(), h.base_sequence())
            })
            .collect()
    });
    assert_eq!(
        batches,
        vec![(0, 0, 0, -1, -1), (1, 1, 0, 7, 1), (2, 3, 2, -1, -1)],
        "(base, last, records, producer, sequence): a filler, producer 7's last batch emptied, the new records"
    );
}

#[test]
fn unkeyed_records_do_not_survive_a_clean() {
    let dir = tempfile::tempdir().unwrap();
    let clock = Arc::new(ManualClock::new(1_000_000));
    let log = open(dir.path(), 1 << 20, &clock);
    let mut b = BatchBuilder::new();
    b.push(&RecordRef { timestamp: 0, key: None, value: Some(b"x"), headers: &[] });
    let unkeyed = RecordBatch::validate(b.finish(), &BatchLimits::default()).unwrap();
    log.with_log(|l| l.append(&unkeyed, 0).unwrap());
    append_all(&log, &[vec![rec("a", Some("1"))]], &clock);
    clean(&mut Cleaner::new(CleanerConfig::default()), &log, &clock);
    assert_eq!(log.with_log(|l| read_records(l)), vec![(1, "a".into(), Some("1".into()))]);
}

#[test]
fn a_reader_holding_old_segment_bytes_keeps_them_through_a_swap() {
    let dir = tempfile::tempdir().unwrap();
    let clock = Arc::new(ManualClock::new(1_000_000));
    let log = open(dir.path(), 1024, &clock);
    let groups: Vec<Vec<Rec>> = (0..30).map(|i| vec![rec(&format!("k{}", i % 3), Some(&"v".repeat(40)))]).collect();
    append_all(&log, &groups, &clock);
    let held = log.with_log(|l| l.read(Offset(0), 1 << 20, Offset::MAX).unwrap());
    let copies: Vec<Vec<u8>> = held.chunks.iter().map(|c| c.to_vec()).collect();
    let outcome = clean(&mut Cleaner::new(CleanerConfig::default()), &log, &clock).unwrap();
    assert!(outcome.segments_before > 1 && outcome.records_removed > 0);
    for (chunk, copy) in held.chunks.iter().zip(&copies) {
        assert_eq!(&chunk[..], &copy[..], "bytes a reader holds never change");
    }
}

#[test]
fn a_small_map_cleans_in_parts_and_ends_the_same() {
    let dir = tempfile::tempdir().unwrap();
    let clock = Arc::new(ManualClock::new(1_000_000));
    let log = open(dir.path(), 1024, &clock);
    let groups: Vec<Vec<Rec>> =
        (0..80).map(|i| vec![rec(&format!("k{}", (i * 7) % 23), Some(&format!("{i}")))]).collect();
    let written = append_all(&log, &groups, &clock);
    // Room for 8 keys: each pass maps part of the dirty section.
    let mut cleaner =
        Cleaner::new(CleanerConfig { dedupe_buffer_bytes: 8 * MAP_ENTRY_BYTES, ..CleanerConfig::default() });
    let mut passes = 0;
    while let Some(outcome) = clean(&mut cleaner, &log, &clock) {
        passes += 1;
        assert!(passes < 100, "cleaning makes progress");
        if outcome.cleaner_offset == written.len() as u64 {
            break;
        }
    }
    assert!(passes > 2, "the map forced several passes: {passes}");
    // Each part is cleaned against the keys it mapped: later passes leave
    // older copies of keys they did not map until the whole log is clean.
    let mut full = Cleaner::new(CleanerConfig::default());
    clean(&mut full, &log, &clock);
    let expected: BTreeMap<u64, (String, Option<String>)> =
        latest(&written).into_iter().map(|(k, (o, v))| (o, (k, v))).collect();
    let got: BTreeMap<u64, (String, Option<String>)> =
        log.with_log(|l| read_records(l)).into_iter().map(|(o, k, v)| (o, (k, v))).collect();
    assert_eq!(got, expected);
}

#[test]
fn a_follower_whose_log_ends_inside_a_filler_catches_up_from_the_cleaned_leader() {
    let (leader_dir, follower_dir) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let clock = Arc::new(ManualClock::new(1_000_000));
    let leader = open(leader_dir.path(), 1 << 20, &clock);
    let groups: Vec<Vec<Rec>> = (0..30).map(|i| vec![rec(&format!("k{}", i % 3), Some(&format!("{i}")))]).collect();
    append_all(&leader, &groups[..20], &clock);
    append_all(&leader, &groups[20..], &clock);
    let mut follower = Log::open(follower_dir.path(), config(1 << 20), clock.clone()).unwrap();
    let replicate = |follower: &mut Log, leader: &Log, until: u64| {
        while follower.log_end_offset().get() < until {
            let r = leader.read(follower.log_end_offset(), 1, Offset::MAX).unwrap();
            for batch in BatchIter::new(r.chunks[0].clone()) {
                follower.append_replica(&batch.unwrap()).unwrap();
            }
        }
    };
    leader.with_log(|l| replicate(&mut follower, l, 7));
    assert_eq!(follower.log_end_offset().get(), 7);
    // The leader's records 0..17 go: one filler covers them, around the
    // follower's end.
    clean(&mut Cleaner::new(CleanerConfig::default()), &leader, &clock).unwrap();
    let first = leader.with_log(|l| l.read(Offset(7), 1, Offset::MAX).unwrap());
    let filler = RecordBatch::check_framing(first.chunks[0].slice(..))
        .map(|b| (b.header().base_offset(), b.header().record_count()));
    assert!(matches!(filler, Ok((base, 0)) if base < 7), "{filler:?}");
    leader.with_log(|l| replicate(&mut follower, l, 30));
    follower.set_high_watermark(Offset(30));
    let (ours, theirs) = (read_records(&follower), leader.with_log(|l| read_records(l)));
    for record in &theirs {
        assert!(ours.contains(record), "the follower holds {record:?}");
    }
    assert_eq!(ours.iter().filter(|r| r.0 >= 7).count(), theirs.iter().filter(|r| r.0 >= 7).count());
}

#[test]
fn compressed_batches_are_cleaned_with_their_codec_and_time_lookups_still_answer() {
    let dir = tempfile::tempdir().unwrap();
    let clock = Arc::new(ManualClock::new(1_000_000));
    let log = open(dir.path(), 1 << 20, &clock);
    let codec = tally_proto::compression::Compression::Zstd;
    let mut written = Vec::new();
    for i in 0..20u64 {
        let mut b = BatchBuilder::new();
        b.set_compression(codec);
        b.set_producer(42, 1, i as i32 * 2);
        let (k1, k2, v) = (format!("k{}", i % 4), format!("k{}", (i + 1) % 4), format!("v{i}"));
        b.push(&RecordRef {
            timestamp: 5000 + i as i64,
            key: Some(k1.as_bytes()),
            value: Some(v.as_bytes()),
            headers: &[],
        });
        b.push(&RecordRef {
            timestamp: 5000 + i as i64,
            key: Some(k2.as_bytes()),
            value: Some(v.as_bytes()),
            headers: &[],
        });
        let batch = RecordBatch::validate(b.finish(), &BatchLimits::default()).unwrap();
        let info = log.with_log(|l| l.append(&batch, 0).unwrap());
        written.push((info.base_offset.get(), k1, Some(v.clone())));
        written.push((info.base_offset.get() + 1, k2, Some(v)));
    }
    log.with_log(|l| {
        l.roll().unwrap();
        let leo = l.log_end_offset();
        l.set_high_watermark(leo);
    });
    clean(&mut Cleaner::new(CleanerConfig::default()), &log, &clock).unwrap();
    let by_offset: BTreeMap<u64, (String, Option<String>)> =
        latest(&written).into_iter().map(|(k, (o, v))| (o, (k, v))).collect();
    let expected: Vec<_> = by_offset.into_iter().map(|(o, (k, v))| (o, k, v)).collect();
    assert_eq!(log.with_log(|l| read_records(l)), expected);
    let r = log.with_log(|l| l.read(Offset(0), u64::MAX, Offset::MAX).unwrap());
    for chunk in r.chunks {
        for batch in BatchIter::new(chunk) {
            let batch = batch.expect("a valid CRC");
            let h = batch.header();
            if h.record_count() > 0 {
                assert_eq!(h.compression(), 4, "zstd kept");
                assert_eq!((h.producer_id(), h.producer_epoch()), (42, 1), "producer fields kept");
                assert_eq!(h.base_sequence() as u64, h.base_offset() as u64, "sequence of the batch's first offset");
            }
        }
    }
    // Producer 42's last batch stays, emptied if nothing in it survived,
    // with its sequence: its producer state can be rebuilt from the log.
    let last = log.with_log(|l| {
        let r = l.read(Offset(38), 1, Offset::MAX).unwrap();
        BatchIter::new(r.chunks[0].clone()).next().unwrap().unwrap()
    });
    let h = last.header();
    assert_eq!((h.base_offset(), h.last_offset(), h.producer_id(), h.base_sequence()), (38, 39, 42, 38));
    // Time lookups land on a batch covering a surviving record or a filler
    // a reader steps over, never past a surviving record of that time.
    let (found, _) = log.with_log(|l| l.offset_for_timestamp(5016).unwrap()).expect("a record that late");
    let first_survivor = expected.iter().map(|(o, _, _)| *o).find(|o| 5000 + *o / 2 >= 5016).unwrap();
    assert!(found.get() <= first_survivor, "{found:?} is past the first surviving record of that time");
}

/// Copies a log directory (to compare a crashed clean with a clean one).
fn copy_dir(from: &Path, to: &Path) {
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        std::fs::copy(entry.path(), to.join(entry.file_name())).unwrap();
    }
}

#[test]
fn a_crash_at_any_step_of_a_swap_leaves_the_old_segments_or_the_new_one() {
    let template = tempfile::tempdir().unwrap();
    let clock = Arc::new(ManualClock::new(1_000_000));
    // Eight small segments that the cleaner merges into one group: one swap.
    const SEGMENT_BYTES: u64 = 8192;
    {
        let log = open(template.path(), SEGMENT_BYTES, &clock);
        for s in 0..8 {
            let groups: Vec<Vec<Rec>> =
                (0..5).map(|i| vec![rec(&format!("k{}", (s + i) % 5), Some(&"v".repeat(30)))]).collect();
            append_all(&log, &groups, &clock);
        }
        assert_eq!(log.with_log(|l| l.segment_count()), 9);
        log.with_log(|l| l.close().unwrap());
    }
    let before = open(template.path(), SEGMENT_BYTES, &clock).with_log(|l| read_records(l));
    let after = {
        let dir = tempfile::tempdir().unwrap();
        copy_dir(template.path(), dir.path());
        let log = open(dir.path(), SEGMENT_BYTES, &clock);
        let outcome = clean(&mut Cleaner::new(CleanerConfig::default()), &log, &clock).unwrap();
        assert_eq!((outcome.segments_before, outcome.segments_after), (8, 1));
        log.with_log(|l| read_records(l))
    };
    assert!(after.len() < before.len());
    let (mut old, mut new) = (0, 0);
    for power_loss in [false, true] {
        let mut finished = false;
        for step in 1..=64 {
            let dir = tempfile::tempdir().unwrap();
            copy_dir(template.path(), dir.path());
            testfs::watch(dir.path());
            let log = open(dir.path(), SEGMENT_BYTES, &clock);
            crate::storage::log::cleaning::CRASH_AFTER_STEP.with(|c| c.set(Some(step)));
            let result = Cleaner::new(CleanerConfig::default()).clean_if_due(&log, true);
            crate::storage::log::cleaning::CRASH_AFTER_STEP.with(|c| c.set(None));
            drop(log);
            if power_loss {
                testfs::power_loss(dir.path());
            }
            testfs::forget(dir.path());
            let reopened = open(dir.path(), SEGMENT_BYTES, &clock).with_log(|l| read_records(l));
            if reopened == before {
                old += 1;
            } else {
                assert_eq!(
                    reopened, after,
                    "step {step}, power loss {power_loss}: neither the old log nor the cleaned one"
                );
                new += 1;
            }
            if result.is_ok() {
                finished = true;
                break; // past the swap's last step
            }
        }
        assert!(finished, "every step of the swap was crashed at");
    }
    assert!(old > 0 && new > 0, "both outcomes were reached: {old} old, {new} new");
}

#[derive(Debug, Clone)]
enum Step {
    Append(Vec<(u8, Option<u8>)>),
    Clean,
}

fn arb_step() -> impl Strategy<Value = Step> {
    prop_oneof![
        4 => prop::collection::vec((0u8..12, prop::option::weighted(0.85, 0u8..=255)), 1..5).prop_map(Step::Append),
        1 => Just(Step::Clean),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

    /// For any appends of keyed records and tombstones, cleaned at random
    /// points with a small map and small segments: what is read holds the
    /// last record of every key at its offset, only records that were
    /// written, at their offsets, in order; and after a full clean, one
    /// record per key (tombstones included, before their horizon).
    #[test]
    fn cleaning_keeps_the_latest_record_of_every_key(
        steps in prop::collection::vec(arb_step(), 1..40),
        segment_bytes in 1024u64..4000,
        map_keys in 4u64..40,
    ) {
        let dir = tempfile::tempdir().unwrap();
        let clock = Arc::new(ManualClock::new(1_000_000));
        let log = open(dir.path(), segment_bytes, &clock);
        let mut cleaner = Cleaner::new(CleanerConfig { dedupe_buffer_bytes: map_keys * MAP_ENTRY_BYTES, ..CleanerConfig::default() });
        let mut written: Vec<(u64, String, Option<String>)> = Vec::new();
        let check = |log: &Mutex<Log>, written: &[(u64, String, Option<String>)]| {
            let got = log.with_log(|l| read_records(l));
            let all: BTreeMap<u64, (String, Option<String>)> = written.iter().map(|(o, k, v)| (*o, (k.clone(), v.clone()))).collect();
            let mut last = None;
            for (o, k, v) in &got {
                assert_eq!(all.get(o), Some(&(k.clone(), v.clone())), "offset {} holds what was written there", o);
                assert!(last.is_none_or(|l| l < *o), "offsets increase");
                last = Some(*o);
            }
            let read: std::collections::BTreeSet<u64> = got.iter().map(|r| r.0).collect();
            for (k, (o, _)) in latest(written) {
                assert!(read.contains(&o), "the last record of {k} (offset {o}) survives");
            }
            got
        };
        for step in steps {
            match step {
                Step::Append(records) => {
                    let group: Vec<Rec> = records.iter().map(|(k, v)| (format!("k{k}"), v.map(|v| format!("{v}")))).collect();
                    written.extend(append_all(&log, &[group], &clock));
                }
                Step::Clean => {
                    clean(&mut cleaner, &log, &clock);
                    check(&log, &written);
                }
            }
        }
        // Clean until nothing is dirty, with a map that holds every key.
        let mut full = Cleaner::new(CleanerConfig::default());
        while clean(&mut full, &log, &clock).is_some() {}
        let got = check(&log, &written);
        let keys: std::collections::BTreeSet<&String> = got.iter().map(|r| &r.1).collect();
        prop_assert_eq!(keys.len(), got.len(), "one record per key after a full clean");
        drop(log);
        let log = open(dir.path(), segment_bytes, &clock);
        prop_assert_eq!(&log.with_log(|l| read_records(l)), &got);
        // Past the delete retention, the next clean drops every tombstone
        // it kept (and its key); live keys stay.
        clock.advance(RETENTION + 1);
        written.extend(append_all(&log, &[vec![rec("fresh", Some("1"))]], &clock));
        while clean(&mut full, &log, &clock).is_some() {}
        let after = log.with_log(|l| read_records(l));
        prop_assert!(after.iter().all(|(_, k, v)| v.is_some() || k == "fresh"), "no tombstone outlives its horizon: {:?}", after);
        let live: Vec<_> = got.iter().filter(|(_, _, v)| v.is_some()).cloned().collect();
        let after_live: Vec<_> = after.iter().filter(|(_, k, _)| k != "fresh").cloned().collect();
        prop_assert_eq!(after_live, live);
    }
}
