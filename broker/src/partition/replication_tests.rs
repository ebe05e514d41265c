//! Replication between `Partition`s without a network: a follower's fetch is
//! a direct call on the leader. The KIP-101 and KIP-279 scenarios, zombies
//! and acks=all.

use std::sync::Arc;
use std::time::Duration;

use tally_proto::ErrorCode;
use tally_proto::batch::{BatchBuilder, BatchLimits, RecordBatch, RecordRef, split_batches};

use super::*;
use crate::storage::{LogConfig, SystemClock};

fn batch(value: &str) -> RecordBatch {
    let mut b = BatchBuilder::new();
    b.push(&RecordRef { timestamp: 1, value: Some(value.as_bytes()), ..Default::default() });
    RecordBatch::validate(b.finish(), &BatchLimits::default()).unwrap()
}

struct Replica {
    id: BrokerId,
    p: Arc<Partition>,
    _dir: tempfile::TempDir,
}

fn replica(id: u32) -> Replica {
    let dir = tempfile::tempdir().unwrap();
    let config = LogConfig { segment_bytes: 4096, ..LogConfig::default() };
    let log = Log::open(dir.path(), config, Arc::new(SystemClock)).unwrap();
    Replica { id: BrokerId(id), p: Arc::new(Partition::new(Arc::from("t"), 0, log, 1 << 20)), _dir: dir }
}

fn settings(min_isr: u32) -> LeaderSettings {
    LeaderSettings { min_insync_replicas: min_isr, replica_lag_time_max_ms: 10_000 }
}

fn lead(r: &Replica, replicas: &[&Replica], epoch: u32, min_isr: u32) {
    let ids: Vec<BrokerId> = replicas.iter().map(|r| r.id).collect();
    let assignment = Assignment { replicas: ids.clone(), isr: ids, leader_epoch: epoch, partition_epoch: epoch };
    r.p.make_leader(r.id, assignment, settings(min_isr), 0).unwrap();
}

async fn produce(r: &Replica, epoch: u32, value: &str) -> Offset {
    r.p.produce(&[batch(value)], epoch, None).await.unwrap().base_offset
}

/// Fetches from `leader` into `follower` until it has nothing more, as the
/// fetcher does: truncating where the leader says the logs diverge.
async fn sync(follower: &Replica, leader: &Replica, epoch: u32) -> usize {
    let mut truncations = 0;
    for _ in 0..20 {
        let (offset, last) = follower.p.fetch_position();
        let read = leader.p.replica_fetch(follower.id, offset.to_wire(), epoch, last, u64::MAX, 1).unwrap();
        if let Some((e, end)) = read.diverging {
            follower.p.truncate_diverging(epoch, e, end).unwrap();
            truncations += 1;
            continue;
        }
        if read.read.chunks.is_empty() {
            return truncations;
        }
        let mut batches = Vec::new();
        for chunk in &read.read.chunks {
            for b in split_batches(chunk).unwrap() {
                batches.push(RecordBatch::check_framing(b).unwrap());
            }
        }
        follower.p.append_as_follower(&batches, read.high_watermark, epoch).await.unwrap();
    }
    panic!("the follower never caught up");
}

/// Every value of the log, with its offset, and the raw bytes.
fn contents(r: &Replica) -> (Vec<(u64, String)>, Vec<u8>) {
    let log = r.p.read_log();
    let read = log.read(Offset(0), u64::MAX, log.log_end_offset()).unwrap();
    let bytes: Vec<u8> = read.chunks.iter().flat_map(|c| c.iter().copied()).collect();
    let mut values = Vec::new();
    for chunk in &read.chunks {
        for b in split_batches(chunk).unwrap() {
            let b = RecordBatch::check_framing(b).unwrap();
            let base = b.header().base_offset() as u64;
            for rec in b.records().unwrap() {
                let rec = rec.unwrap();
                let value = String::from_utf8(rec.value.unwrap().to_vec()).unwrap();
                values.push((base + rec.offset_delta as u64, value));
            }
        }
    }
    (values, bytes)
}

fn values(r: &Replica) -> Vec<String> {
    contents(r).0.into_iter().map(|(_, v)| v).collect()
}

#[tokio::test]
async fn kip_101_an_old_leaders_uncommitted_tail_is_cut_and_replaced_by_the_new_leaders() {
    let (a, b) = (replica(1), replica(2));
    lead(&a, &[&a, &b], 0, 1);
    b.p.make_follower(Some(a.id), 0);
    produce(&a, 0, "m0").await;
    produce(&a, 0, "m1").await;
    sync(&b, &a, 0).await;
    produce(&a, 0, "m2").await; // never reaches b
    // a is gone; b leads epoch 1 and takes a write at offset 2.
    lead(&b, &[&a, &b], 1, 1);
    assert_eq!(produce(&b, 1, "m3").await, Offset(2), "offset 2 is reused by the new leader");
    a.p.make_follower(Some(b.id), 1);
    assert_eq!(sync(&a, &b, 1).await, 1, "one truncation");
    assert_eq!(values(&a), ["m0", "m1", "m3"]);
    assert_eq!(contents(&a), contents(&b), "byte-identical, epochs included");
}

#[tokio::test]
async fn kip_279_two_quick_leader_changes_with_divergent_tails_converge_on_the_last_leader() {
    let (a, b, c) = (replica(1), replica(2), replica(3));
    let all = [&a, &b, &c];
    lead(&a, &all, 0, 1);
    b.p.make_follower(Some(a.id), 0);
    c.p.make_follower(Some(a.id), 0);
    produce(&a, 0, "m0").await;
    sync(&b, &a, 0).await;
    sync(&c, &a, 0).await;
    produce(&a, 0, "a1").await; // only on a
    // b leads epoch 1 briefly: its write reaches nobody.
    lead(&b, &all, 1, 1);
    produce(&b, 1, "b1").await;
    // c leads epoch 2 without ever seeing epoch 1.
    lead(&c, &all, 2, 1);
    produce(&c, 2, "c1").await;
    produce(&c, 2, "c2").await;
    for follower in [&a, &b] {
        follower.p.make_follower(Some(c.id), 2);
        assert!(sync(follower, &c, 2).await >= 1, "replica {} truncated", follower.id);
    }
    assert_eq!(values(&c), ["m0", "c1", "c2"]);
    assert_eq!(contents(&a), contents(&c));
    assert_eq!(contents(&b), contents(&c));
}

#[tokio::test]
async fn a_follower_that_led_an_epoch_without_writing_catches_up() {
    let (a, b, c) = (replica(1), replica(2), replica(3));
    let all = [&a, &b, &c];
    lead(&a, &all, 0, 1);
    b.p.make_follower(Some(a.id), 0);
    c.p.make_follower(Some(a.id), 0);
    produce(&a, 0, "m0").await;
    sync(&b, &a, 0).await;
    sync(&c, &a, 0).await;
    lead(&b, &all, 1, 1); // leads, appends nothing: epoch 1 begins at b's log end
    lead(&c, &all, 2, 1);
    produce(&c, 2, "c1").await;
    b.p.make_follower(Some(c.id), 2);
    // c says epoch 0 ends at 1, which is b's log end: the cut removes only
    // the empty epoch 1, and b then fetches c1.
    assert_eq!(sync(&b, &c, 2).await, 1);
    assert_eq!(values(&b), ["m0", "c1"]);
    assert_eq!(contents(&b), contents(&c));
    // And the leader counts it as caught up: it reports the leader's end.
    assert_eq!(b.p.fetch_position().0, c.p.offsets().2);
}

#[tokio::test]
async fn a_broker_that_lost_the_leadership_appends_nothing_and_old_epochs_are_refused() {
    let (a, b) = (replica(1), replica(2));
    lead(&a, &[&a, &b], 0, 1);
    produce(&a, 0, "m0").await;
    a.p.make_follower(Some(b.id), 1);
    let e = a.p.produce(&[batch("zombie")], 0, None).await.unwrap_err();
    assert_eq!(e.code(), ErrorCode::NotLeaderOrFollower, "{e}");
    assert_eq!(a.p.offsets().2, Offset(1), "nothing appended");
    lead(&b, &[&a, &b], 1, 1);
    let stale = b.p.replica_fetch(a.id, 0, 0, None, u64::MAX, 1).unwrap_err();
    assert_eq!(stale.code(), ErrorCode::FencedLeaderEpoch, "{stale}");
    let future = b.p.replica_fetch(a.id, 0, 2, None, u64::MAX, 1).unwrap_err();
    assert_eq!(future.code(), ErrorCode::UnknownLeaderEpoch, "{future}");
    // A follower refuses to append an answer from another epoch.
    let e = a.p.append_as_follower(&[batch("x")], Offset(0), 0).await.unwrap_err();
    assert_eq!(e.code(), ErrorCode::NotLeaderOrFollower);
}

#[tokio::test]
async fn acks_all_waits_for_the_isr_and_ends_when_the_leadership_moves() {
    let (a, b) = (replica(1), replica(2));
    lead(&a, &[&a, &b], 0, 2);
    b.p.make_follower(Some(a.id), 0);
    // Answered only once b has fetched past the batch.
    let pending = {
        let p = a.p.clone();
        tokio::spawn(async move { p.produce(&[batch("m0")], 0, Some(Duration::from_secs(10))).await })
    };
    // Once m0 is in the log the produce has run up to its wait (this
    // runtime is single-threaded: it ran until it had to wait, or ended).
    let appended = async {
        while a.p.offsets().2 < Offset(1) {
            tokio::task::yield_now().await;
        }
    };
    tokio::time::timeout(Duration::from_secs(5), appended).await.expect("the produce appended m0");
    assert!(!pending.is_finished(), "b has not fetched yet");
    sync(&b, &a, 0).await; // appends m0
    let (offset, last) = b.p.fetch_position();
    a.p.replica_fetch(b.id, offset.to_wire(), 0, last, u64::MAX, 2).unwrap(); // reports its end
    let info = tokio::time::timeout(Duration::from_secs(5), pending).await.unwrap().unwrap().unwrap();
    assert_eq!(info.base_offset, Offset(0));
    assert_eq!(b.p.offsets().1, Offset(0), "b learns the HW with its next fetch");
    sync(&b, &a, 0).await;
    // A wait in progress ends as soon as the leadership moves.
    let pending = {
        let p = a.p.clone();
        tokio::spawn(async move { p.produce(&[batch("m1")], 0, Some(Duration::from_secs(30))).await })
    };
    // Move the leadership only once m1 is appended: a produce refused up
    // front (NOT_LEADER_OR_FOLLOWER naming b, nothing stored) must not pass.
    let appended = async {
        while a.p.offsets().2 < Offset(2) {
            tokio::task::yield_now().await;
        }
    };
    tokio::time::timeout(Duration::from_secs(5), appended).await.expect("the produce appended m1");
    assert!(!pending.is_finished(), "the produce waits for b");
    a.p.make_follower(Some(b.id), 1);
    let e = tokio::time::timeout(Duration::from_secs(5), pending).await.expect("the wait ends").unwrap().unwrap_err();
    // The wait's own answer names the new leader (NOT_LEADER_OR_FOLLOWER,
    // retriable): whether m1 survives is up to it. m1 was appended, so this
    // is not the up-front refusal.
    assert!(
        matches!(e, BrokerError::NotLeaderOrFollower { leader: Some(2), leader_epoch: 1, .. }),
        "the acks=all wait ended by the leadership move: {e:?}"
    );
    assert_eq!(e.code(), ErrorCode::NotLeaderOrFollower, "{e}");
    assert!(e.code().is_retriable(), "{e}");
    assert_eq!(a.p.offsets().2, Offset(2), "m1 was appended before the wait ended");
    // Without enough replicas in sync it is refused up front, storing nothing.
    let c = replica(3);
    let assignment = Assignment { replicas: vec![c.id, a.id], isr: vec![c.id], leader_epoch: 0, partition_epoch: 0 };
    c.p.make_leader(c.id, assignment, settings(2), 0).unwrap();
    let e = c.p.produce(&[batch("x")], 0, Some(Duration::from_secs(1))).await.unwrap_err();
    assert_eq!(e.code(), ErrorCode::NotEnoughReplicas);
    assert_eq!(c.p.offsets().2, Offset(0));
}

#[tokio::test]
async fn acks_all_times_out_when_the_followers_never_fetch() {
    let (a, b) = (replica(1), replica(2));
    lead(&a, &[&a, &b], 0, 2);
    let e = a.p.produce(&[batch("m0")], 0, Some(Duration::from_millis(100))).await.unwrap_err();
    assert_eq!(e.code(), ErrorCode::RequestTimedOut, "{e}");
    assert_eq!(a.p.offsets(), (Offset(0), Offset(0), Offset(1)), "stored on the leader, not committed");
}

/// Lets a spawned task on this current-thread runtime run until `done` holds
/// (bounded: the task needs no I/O to get there).
async fn run_until(mut done: impl FnMut() -> bool) {
    for _ in 0..10_000 {
        if done() {
            return;
        }
        tokio::task::yield_now().await;
    }
    panic!("the condition never held");
}

/// A produce parked in its acks=all wait while its broker stops leading,
/// truncates the batch, appends the new leader's record at the same offset
/// and takes the new leader's high watermark past it: the produce must not
/// answer success, whichever of the role change and the high-watermark move
/// its wait sees first (so the scenario runs many times).
#[tokio::test]
async fn acks_all_never_succeeds_for_a_batch_replaced_after_the_leadership_moved() {
    for round in 0..32 {
        let (a, b) = (replica(1), replica(2));
        lead(&a, &[&a, &b], 0, 1);
        b.p.make_follower(Some(a.id), 0);
        let pending = {
            let p = a.p.clone();
            tokio::spawn(async move { p.produce(&[batch("lost")], 0, Some(Duration::from_secs(30))).await })
        };
        // On this current-thread runtime the produce goes from its append to
        // its high-watermark wait without yielding: appended means parked.
        run_until(|| a.p.offsets().2 == Offset(1)).await;
        assert!(!pending.is_finished(), "round {round}: b never fetched, so nothing may answer yet");
        // b never saw the batch; it leads epoch 1 alone and commits another
        // record at offset 0.
        let alone = Assignment { replicas: vec![a.id, b.id], isr: vec![b.id], leader_epoch: 1, partition_epoch: 1 };
        b.p.make_leader(b.id, alone, settings(1), 0).unwrap();
        produce(&b, 1, "kept").await;
        a.p.make_follower(Some(b.id), 1);
        sync(&a, &b, 1).await;
        assert_eq!(values(&a), ["kept"], "round {round}: a's batch was cut and replaced");
        assert_eq!(a.p.offsets().1, Offset(1), "round {round}: a took b's high watermark past offset 0");
        let outcome = tokio::time::timeout(Duration::from_secs(5), pending).await.unwrap().unwrap();
        let e = outcome.expect_err("acknowledged a record that is not in the log");
        assert_eq!(e.code(), ErrorCode::NotLeaderOrFollower, "round {round}: {e}");
    }
}

#[tokio::test]
async fn a_new_leader_lists_no_offsets_until_its_high_watermark_reaches_its_epoch_start() {
    let (a, b) = (replica(1), replica(2));
    lead(&a, &[&a, &b], 0, 1);
    b.p.make_follower(Some(a.id), 0);
    for v in ["m0", "m1", "m2"] {
        produce(&a, 0, v).await;
    }
    sync(&b, &a, 0).await;
    let (offset, last) = b.p.fetch_position();
    a.p.replica_fetch(b.id, offset.to_wire(), 0, last, u64::MAX, 2).unwrap();
    assert_eq!(a.p.offsets().1, Offset(3), "committed on a");
    // b takes over knowing a HW below 3 (the one it learned last).
    lead(&b, &[&a, &b], 1, 1);
    assert!(b.p.offsets().1 < Offset(3));
    let e = b.p.check_offsets_available().unwrap_err();
    assert_eq!(e.code(), ErrorCode::OffsetNotAvailable, "{e}");
    assert!(e.code().is_retriable());
    // Once a follows and reports its end, the HW reaches the epoch start.
    a.p.make_follower(Some(b.id), 1);
    sync(&a, &b, 1).await;
    let (offset, last) = a.p.fetch_position();
    b.p.replica_fetch(a.id, offset.to_wire(), 1, last, u64::MAX, 3).unwrap();
    b.p.check_offsets_available().unwrap();
    assert_eq!(b.p.offsets().1, Offset(3), "latest never went backwards");
}

#[tokio::test]
async fn a_truncation_that_fails_part_way_fails_the_partition_instead_of_serving_a_half_cut_log() {
    let (a, b) = (replica(1), replica(2));
    lead(&a, &[&a, &b], 0, 1);
    b.p.make_follower(Some(a.id), 0);
    let big = "x".repeat(1000);
    for _ in 0..12 {
        produce(&a, 0, &big).await;
    }
    sync(&b, &a, 0).await;
    let (offset, last) = b.p.fetch_position();
    a.p.replica_fetch(b.id, offset.to_wire(), 0, last, u64::MAX, 2).unwrap();
    produce(&a, 0, "m12").await;
    sync(&b, &a, 0).await;
    assert_eq!(b.p.offsets().1, Offset(12), "b learned the HW");
    // The truncation to 5 unlinks the later segments, then cannot create
    // the segment that starts at the cut (its name is taken).
    std::fs::create_dir(b._dir.path().join(format!("{:020}.log", 5))).unwrap();
    b.p.make_follower(Some(a.id), 1);
    let e = b.p.truncate_diverging(1, 0, Offset(5)).unwrap_err();
    assert_eq!(e.code(), ErrorCode::KafkaStorageError, "{e}");
    assert!(b.p.failure().is_some(), "the partition is failed until a restart recovers it");
    let e = b.p.fetch(0, 1 << 20).unwrap_err();
    assert_eq!(e.code(), ErrorCode::KafkaStorageError, "nothing of a half-cut log is served");
    let e = b.p.append_as_follower(&[batch("y")], Offset(0), 1).await.unwrap_err();
    assert_eq!(e.code(), ErrorCode::KafkaStorageError, "nor appended to");
}

#[tokio::test]
async fn a_follower_takes_the_leaders_log_start() {
    let (a, b) = (replica(1), replica(2));
    lead(&a, &[&a, &b], 0, 1);
    b.p.make_follower(Some(a.id), 0);
    let big = "x".repeat(1000);
    for _ in 0..9 {
        produce(&a, 0, &big).await;
    }
    sync(&b, &a, 0).await;
    let (offset, last) = b.p.fetch_position();
    a.p.replica_fetch(b.id, offset.to_wire(), 0, last, u64::MAX, 2).unwrap();
    produce(&a, 0, "m9").await;
    sync(&b, &a, 0).await;
    // The leader's retention (or DeleteRecords) moves its log start to 6.
    a.p.write_log().delete_records_before(Offset(6)).unwrap();
    let read = a.p.replica_fetch(b.id, b.p.fetch_position().0.to_wire(), 0, Some(0), u64::MAX, 3).unwrap();
    b.p.adopt_leader_log_start(0, read.log_start_offset).unwrap();
    assert_eq!(b.p.offsets().0, Offset(6), "the follower's log starts where the leader's does");
    assert_eq!(b.p.fetch(0, 1 << 20).unwrap_err().code(), ErrorCode::OffsetOutOfRange);
    // Never past what the follower knows is committed.
    b.p.adopt_leader_log_start(0, Offset(1_000)).unwrap();
    assert_eq!(b.p.offsets().0, b.p.offsets().1);
}
