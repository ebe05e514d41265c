//! The log's producer-state table through the log: a leader's append
//! refuses duplicates and gaps, a follower's feeds it, truncation rewinds
//! it, and every way of reopening (clean close, crash after a roll, lost
//! snapshots, retention below the producers' batches) gives the same table.

use std::sync::Arc;

use tally_proto::batch::{BatchBuilder, BatchLimits, RecordBatch, RecordRef};

use super::*;
use crate::storage::producer_snapshot;
use crate::storage::producer_state::ProducerStateError;
use crate::storage::{ManualClock, Offset, StorageError};

fn config() -> LogConfig {
    LogConfig {
        segment_bytes: 1024,
        index_interval_bytes: 100,
        segment_index_bytes: 256,
        retention_ms: None,
        ..LogConfig::default()
    }
}

/// A batch of `records` records from producer `pid` at `epoch` starting at
/// sequence `seq`.
fn pbatch(pid: i64, epoch: i16, seq: i32, records: usize) -> RecordBatch {
    let mut b = BatchBuilder::new();
    b.set_producer(pid, epoch, seq);
    let value = [b'v'; 40];
    for i in 0..records {
        b.push(&RecordRef { timestamp: 1000 + i as i64, key: None, value: Some(&value), headers: &[] });
    }
    RecordBatch::validate(b.finish(), &BatchLimits { max_batch_bytes: usize::MAX, ..BatchLimits::default() }).unwrap()
}

fn open(dir: &std::path::Path) -> Log {
    Log::open(dir, config(), Arc::new(ManualClock::new(5_000))).unwrap()
}

/// Appends batches of 3 records for producers 7 and 9, alternating, `n`
/// each; returns the next sequence.
fn produce(log: &mut Log, n: i32) -> i32 {
    let mut seq = 0;
    for _ in 0..n {
        log.append(&pbatch(7, 0, seq, 3), 0).unwrap();
        log.append(&pbatch(9, 2, seq, 3), 0).unwrap();
        seq += 3;
    }
    seq
}

#[test]
fn a_leader_append_refuses_a_duplicate_with_its_offsets_and_a_gap_with_nothing_appended() {
    let dir = tempfile::tempdir().unwrap();
    let mut log = open(dir.path());
    let first = log.append(&pbatch(7, 0, 0, 3), 0).unwrap();
    log.append(&pbatch(7, 0, 3, 2), 0).unwrap();
    let leo = log.log_end_offset();
    match log.append(&pbatch(7, 0, 0, 3), 0) {
        Err(StorageError::DuplicateBatch { first_offset, last_offset, .. }) => {
            assert_eq!((first_offset, last_offset), (first.base_offset.get(), first.last_offset.get()));
        }
        other => panic!("expected a duplicate, got {other:?}"),
    }
    assert!(matches!(
        log.append(&pbatch(7, 0, 9, 1), 0),
        Err(StorageError::ProducerState(ProducerStateError::OutOfOrderSequence { expected: 5, .. }))
    ));
    assert!(matches!(
        log.append(&pbatch(8, 0, 4, 1), 0),
        Err(StorageError::ProducerState(ProducerStateError::UnknownProducerId { .. }))
    ));
    assert_eq!(log.log_end_offset(), leo, "nothing appended");
}

#[test]
fn a_follower_records_what_it_appends_so_a_new_leader_knows_every_producer() {
    let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let mut leader = open(a.path());
    produce(&mut leader, 4);
    let mut follower = open(b.path());
    let read = leader.read(Offset(0), u64::MAX, Offset::MAX).unwrap();
    for chunk in &read.chunks {
        for batch in tally_proto::batch::split_batches(chunk).unwrap() {
            follower.append_replica(&RecordBatch::check_framing(batch).unwrap()).unwrap();
        }
    }
    assert_eq!(follower.producer_state(), leader.producer_state());
    assert!(matches!(follower.append(&pbatch(9, 2, 9, 3), 1), Err(StorageError::DuplicateBatch { .. })));
}

#[test]
fn reopening_after_a_clean_close_or_a_crash_gives_the_same_table() {
    let dir = tempfile::tempdir().unwrap();
    let mut log = open(dir.path());
    produce(&mut log, 20);
    assert!(log.segment_count() > 3, "rolled several times");
    assert!(!producer_snapshot::list(dir.path()).unwrap().is_empty(), "rolls wrote snapshots");
    let before = log.producer_state().clone();
    // A crash: no close, so the newest snapshot is the last roll's and the
    // active segment is replayed after it.
    drop(log);
    let mut log = open(dir.path());
    assert_eq!(*log.producer_state(), before);
    log.close().unwrap();
    drop(log);
    let leo_snapshot = producer_snapshot::list(dir.path()).unwrap();
    let log = open(dir.path());
    assert_eq!(*log.producer_state(), before);
    assert_eq!(leo_snapshot.last().copied(), Some(log.log_end_offset().get()), "close wrote one at the log end");
}

#[test]
fn a_damaged_or_missing_snapshot_falls_back_to_replaying_more() {
    let dir = tempfile::tempdir().unwrap();
    let mut log = open(dir.path());
    produce(&mut log, 20);
    let before = log.producer_state().clone();
    drop(log);
    let newest = *producer_snapshot::list(dir.path()).unwrap().last().unwrap();
    let path = producer_snapshot::path(dir.path(), newest);
    let mut bytes = std::fs::read(&path).unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 0xff;
    std::fs::write(&path, bytes).unwrap();
    assert_eq!(*open(dir.path()).producer_state(), before, "the older snapshot plus more log");
    for offset in producer_snapshot::list(dir.path()).unwrap() {
        std::fs::remove_file(producer_snapshot::path(dir.path(), offset)).unwrap();
    }
    // No snapshot at all: the last two segments are replayed, which holds
    // every producer's last five batches here.
    let reopened = open(dir.path());
    for pid in [7, 9] {
        assert_eq!(
            reopened.producer_state().get(pid).map(|e| e.batches.back().copied()),
            before.get(pid).map(|e| e.batches.back().copied())
        );
    }
}

#[test]
fn truncation_rewinds_the_table_and_drops_the_snapshots_above_the_cut() {
    let dir = tempfile::tempdir().unwrap();
    let mut log = open(dir.path());
    produce(&mut log, 20);
    assert!(producer_snapshot::list(dir.path()).unwrap().len() > 3, "a snapshot per roll is kept");
    let cut = log.log_end_offset().get() - 12; // the last two batches of each
    log.truncate_to(Offset(cut)).unwrap();
    assert!(producer_snapshot::list(dir.path()).unwrap().iter().all(|&o| o <= cut));
    let last7 = log.producer_state().get(7).unwrap().batches.back().copied().unwrap();
    assert!(last7.last_offset < cut);
    assert_eq!(last7.last_seq, 3 * 18 - 1);
    // The producer's retry of its first cut batch is appended again.
    log.append(&pbatch(7, 0, 3 * 18, 3), 1).unwrap();
    drop(log);
    let reopened = open(dir.path());
    assert_eq!(reopened.producer_state().get(7).unwrap().batches.back().unwrap().last_seq, 3 * 19 - 1);
}

#[test]
fn retention_below_every_batch_of_a_producer_does_not_forget_it() {
    let dir = tempfile::tempdir().unwrap();
    let mut log = open(dir.path());
    log.append(&pbatch(42, 1, 0, 3), 0).unwrap();
    for i in 0..40 {
        log.append(&pbatch(7, 0, i * 3, 3), 0).unwrap();
    }
    let leo = log.log_end_offset();
    log.set_high_watermark(leo);
    log.delete_records_before(Offset(leo.get() - 3)).unwrap();
    assert!(log.producer_state().get(42).is_some());
    assert!(matches!(log.append(&pbatch(42, 1, 0, 3), 0), Err(StorageError::DuplicateBatch { .. })));
    log.roll().unwrap();
    drop(log);
    let mut reopened = open(dir.path());
    assert!(reopened.producer_state().get(42).is_some(), "the snapshot keeps it");
    reopened.append(&pbatch(42, 1, 3, 1), 0).unwrap();
}

#[test]
fn producers_idle_past_the_expiration_are_dropped() {
    let dir = tempfile::tempdir().unwrap();
    let clock = Arc::new(ManualClock::new(1_000));
    let mut log = Log::open(dir.path(), config(), clock.clone()).unwrap();
    log.append(&pbatch(7, 0, 0, 1), 0).unwrap();
    clock.advance(500);
    log.append(&pbatch(9, 0, 0, 1), 0).unwrap();
    clock.advance(600);
    assert_eq!(log.expire_producers(1_000), 1);
    assert!(log.producer_state().get(7).is_none() && log.producer_state().get(9).is_some());
}

#[test]
fn a_truncation_that_cuts_every_remembered_batch_still_knows_the_producer() {
    // Producer 7's last five batches are all above the cut, but the log
    // below the cut holds its earlier ones: the rebuilt table has them
    // (Kafka's rebuild), so its next batch is in sequence, not unknown.
    let dir = tempfile::tempdir().unwrap();
    let mut log = open(dir.path());
    for i in 0..4 {
        log.append(&pbatch(7, 3, i * 2, 2), 0).unwrap();
    }
    let cut = log.log_end_offset();
    for i in 4..10 {
        log.append(&pbatch(7, 3, i * 2, 2), 0).unwrap();
    }
    log.truncate_to(cut).unwrap();
    let entry = log.producer_state().get(7).expect("still known");
    assert_eq!((entry.epoch, entry.batches.back().unwrap().last_seq), (3, 7));
    log.append(&pbatch(7, 3, 8, 2), 1).unwrap();
}

#[test]
fn a_truncation_many_segments_back_rebuilds_from_the_snapshot_below_it() {
    let dir = tempfile::tempdir().unwrap();
    let mut log = open(dir.path());
    log.append(&pbatch(42, 0, 0, 3), 0).unwrap();
    produce(&mut log, 8);
    let cut = log.log_end_offset();
    produce_more(&mut log, 8, 24);
    assert!(log.segment_count() > 6);
    log.truncate_to(cut).unwrap();
    assert!(log.producer_state().get(42).is_some(), "known from the snapshot below the cut");
    assert!(matches!(log.append(&pbatch(42, 0, 0, 3), 1), Err(StorageError::DuplicateBatch { .. })));
    assert_eq!(log.producer_state().get(7).unwrap().batches.back().unwrap().last_seq, 3 * 8 - 1);
}

/// Continues producers 7 and 9 from sequence `seq` for `n` more batches each.
fn produce_more(log: &mut Log, n: i32, mut seq: i32) {
    for _ in 0..n {
        log.append(&pbatch(7, 0, seq, 3), 0).unwrap();
        log.append(&pbatch(9, 2, seq, 3), 0).unwrap();
        seq += 3;
    }
}
