//! Tests of a partition: flush, group commit, partly applied requests,
//! sessions and leadership retries.

use super::*;
use crate::storage::{LogConfig, SystemClock, testfs};
use tally_proto::ErrorCode;
use tally_proto::batch::{BatchBuilder, BatchLimits, RecordRef};

fn batch(value: &[u8]) -> RecordBatch {
    let mut b = BatchBuilder::new();
    b.push(&RecordRef { timestamp: 1, value: Some(value), ..Default::default() });
    RecordBatch::validate(b.finish(), &BatchLimits::default()).unwrap()
}

fn partition(dir: &std::path::Path, flush: FlushPolicy) -> Arc<Partition> {
    let config = LogConfig { flush, segment_bytes: 4096, ..LogConfig::default() };
    let log = Log::open(dir, config, Arc::new(SystemClock)).unwrap();
    let p = Arc::new(Partition::new(Arc::from("t"), 0, log, 1 << 20));
    let alone = Assignment { replicas: vec![BrokerId(1)], isr: vec![BrokerId(1)], leader_epoch: 0, partition_epoch: 0 };
    p.make_leader(BrokerId(1), alone, settings(), 0).unwrap();
    p
}

fn settings() -> LeaderSettings {
    LeaderSettings { min_insync_replicas: 1, replica_lag_time_max_ms: 10_000 }
}

#[tokio::test]
async fn with_flush_always_the_high_watermark_moves_only_after_the_fsync() {
    let dir = tempfile::tempdir().unwrap();
    let p = partition(dir.path(), FlushPolicy::Always);
    let hw = p.subscribe();
    p.produce(&[batch(b"a")], 0, None).await.unwrap();
    assert_eq!((p.offsets().1, *hw.borrow()), (Offset(1), Offset(1)));
    testfs::fail_next(dir.path(), testfs::Op::Fsync, Some(".log"), 1);
    let err = p.produce(&[batch(b"b")], 0, None).await.unwrap_err();
    assert_eq!(err.code(), ErrorCode::KafkaStorageError, "{err}");
    assert_eq!(p.offsets(), (Offset(0), Offset(1), Offset(2)), "stored, but not visible");
    assert_eq!(*hw.borrow(), Offset(1), "no long poll was woken for it");
    // The partition is failed for good: no retry of the fsync, no reads.
    let err = p.produce(&[batch(b"c")], 0, None).await.unwrap_err();
    assert_eq!(err.code(), ErrorCode::KafkaStorageError);
    assert!(err.to_string().contains("restarts"), "{err}");
    assert_eq!(p.fetch(0, 1 << 20).unwrap_err().code(), ErrorCode::KafkaStorageError);
    assert!(p.failure().unwrap().contains("fdatasync"));
    testfs::forget(dir.path());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_producer_waiting_on_a_failed_fsync_gets_a_storage_error() {
    let dir = tempfile::tempdir().unwrap();
    let p = partition(dir.path(), FlushPolicy::Always);
    testfs::fail_next(dir.path(), testfs::Op::Fsync, Some(".log"), 1);
    let tasks: Vec<_> = (0..8u8)
        .map(|i| {
            let p = p.clone();
            tokio::spawn(async move { p.produce(&[batch(&[i])], 0, None).await })
        })
        .collect();
    for t in tasks {
        let outcome = t.await.unwrap();
        assert_eq!(outcome.unwrap_err().code(), ErrorCode::KafkaStorageError, "no ack after a failed fsync");
    }
    assert_eq!(p.offsets().1, Offset(0), "nothing became visible");
    testfs::forget(dir.path());
}

#[tokio::test]
async fn without_flush_always_appends_are_visible_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let p = partition(dir.path(), FlushPolicy::Os);
    let hw = p.subscribe();
    p.produce(&[batch(b"a"), batch(b"b")], 0, None).await.unwrap();
    assert_eq!(*hw.borrow(), Offset(2));
    assert_eq!(p.fetch(0, 1 << 20).unwrap().read.next_offset, Offset(2));
}

#[tokio::test]
async fn batches_appended_before_a_failing_one_are_answered_as_appended_and_a_retry_adds_only_the_rest() {
    let dir = tempfile::tempdir().unwrap();
    let p = partition(dir.path(), FlushPolicy::Os);
    // One 3000-byte batch fills the 4096-byte segment; the next needs a
    // roll, and the next segment's name is taken.
    let big = vec![7u8; 3000];
    let obstacle = dir.path().join(format!("{:020}.log", 1));
    std::fs::create_dir(&obstacle).unwrap();
    let err = p.produce(&[batch(&big), batch(&big), batch(&big)], 0, None).await.unwrap_err();
    assert_eq!(err.code(), ErrorCode::KafkaStorageError, "{err}");
    let BrokerError::PartlyAppended { appended, batches, .. } = &err else { panic!("not a partial answer: {err}") };
    assert_eq!((*batches, appended.base_offset, appended.log_end_offset), (1, Offset(0), Offset(1)));
    assert_eq!(p.offsets(), (Offset(0), Offset(1), Offset(1)), "the first batch is stored and visible");
    // The client retries only the batches after the appended prefix.
    std::fs::remove_dir(&obstacle).unwrap();
    let info = p.produce(&[batch(&big), batch(&big)], 0, None).await.unwrap();
    assert_eq!((info.base_offset, info.log_end_offset), (Offset(1), Offset(3)), "each batch once");
}

#[tokio::test]
async fn a_produce_admitted_under_a_live_session_appends_nothing_once_the_session_lapsed() {
    let dir = tempfile::tempdir().unwrap();
    let config = LogConfig { segment_bytes: 4096, ..LogConfig::default() };
    let log = Log::open(dir.path(), config, Arc::new(SystemClock)).unwrap();
    let live = Arc::new(std::sync::atomic::AtomicBool::new(true));
    let session = {
        let live = live.clone();
        LeaderSession::new(move || live.load(std::sync::atomic::Ordering::SeqCst))
    };
    let one = batch(b"a").len() as u32;
    // Room for one batch in flight.
    let p = Arc::new(Partition::new(Arc::from("t"), 0, log, one).with_session(session));
    let pair = Assignment {
        replicas: vec![BrokerId(1), BrokerId(2)],
        isr: vec![BrokerId(1), BrokerId(2)],
        leader_epoch: 0,
        partition_epoch: 0,
    };
    p.make_leader(BrokerId(1), pair, settings(), 0).unwrap();
    // The first holds the in-flight bytes in its acks=all wait; the
    // second, admitted meanwhile, waits for them.
    let first = {
        let p = p.clone();
        tokio::spawn(async move { p.produce(&[batch(b"a")], 0, Some(Duration::from_secs(30))).await })
    };
    while p.offsets().2 != Offset(1) {
        tokio::task::yield_now().await;
    }
    let second = {
        let p = p.clone();
        tokio::spawn(async move { p.produce(&[batch(b"b")], 0, None).await })
    };
    for _ in 0..100 {
        tokio::task::yield_now().await;
    }
    assert!(!second.is_finished(), "waiting for in-flight bytes");
    // The session lapses while it waits (the image still names this
    // broker the leader); then broker 2 fetches and the first completes.
    live.store(false, std::sync::atomic::Ordering::SeqCst);
    p.replica_fetch(BrokerId(2), 1, 0, None, u64::MAX, 1).unwrap();
    tokio::time::timeout(Duration::from_secs(5), first).await.unwrap().unwrap().unwrap();
    let e = tokio::time::timeout(Duration::from_secs(5), second).await.unwrap().unwrap().unwrap_err();
    assert_eq!(e.code(), ErrorCode::LeaderNotAvailable, "{e}");
    assert_eq!(p.offsets().2, Offset(1), "nothing appended after the session lapsed");
}

#[tokio::test]
async fn a_leadership_whose_epoch_cannot_be_recorded_is_taken_again_until_it_is() {
    let dir = tempfile::tempdir().unwrap();
    let config = LogConfig { segment_bytes: 4096, ..LogConfig::default() };
    let log = Log::open(dir.path(), config, Arc::new(SystemClock)).unwrap();
    let p = Arc::new(Partition::new(Arc::from("t"), 0, log, 1 << 20));
    let alone = Assignment { replicas: vec![BrokerId(1)], isr: vec![BrokerId(1)], leader_epoch: 3, partition_epoch: 3 };
    testfs::fail_next(dir.path(), testfs::Op::Fsync, Some("leader-epoch"), 2);
    assert!(p.make_leader(BrokerId(1), alone, settings(), 1000).is_err());
    assert_eq!(p.leading_epoch(), None, "serves nothing meanwhile");
    assert!(p.leadership_failure().is_some_and(|e| e.contains("leader-epoch")), "{:?}", p.leadership_failure());
    let e = p.produce(&[batch(b"a")], 3, None).await.unwrap_err();
    assert_eq!(e.code(), ErrorCode::LeaderNotAvailable, "{e}");
    assert!(p.retry_leadership(1000 + LEADERSHIP_RETRY_MS - 1).is_none(), "backing off");
    assert!(p.retry_leadership(1000 + LEADERSHIP_RETRY_MS).unwrap().is_err(), "the second fault");
    assert!(p.retry_leadership(1000 + 2 * LEADERSHIP_RETRY_MS).is_none(), "the backoff doubled");
    p.retry_leadership(1000 + 3 * LEADERSHIP_RETRY_MS).unwrap().unwrap();
    assert_eq!(p.leading_epoch(), Some(3));
    assert_eq!(p.leadership_failure(), None);
    assert_eq!(p.produce(&[batch(b"a")], 3, None).await.unwrap().base_offset, Offset(0));
    testfs::forget(dir.path());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_group_sync_racing_a_failed_checkpoint_fsync_acknowledges_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let p = partition(dir.path(), FlushPolicy::Os);
    // Enough to roll: the first segment is closed and not yet synced.
    for i in 0..40u8 {
        p.produce(&[batch(&[i; 200])], 0, None).await.unwrap();
    }
    let leo = p.offsets().2;
    let (acked_tx, acked_rx) = std::sync::mpsc::channel();
    let racer = p.clone();
    let (racer_tx, racer_rx) = std::sync::mpsc::channel();
    // The checkpoint's fsync of the closed segment fails; in that window
    // (before the partition is failed) a producer's group sync runs.
    testfs::fail_next_then(dir.path(), testfs::Op::Fsync, Some("00000000000000000000.log"), move || {
        let handle = std::thread::spawn(move || {
            let outcome = racer.sync_blocking(leo);
            let _ = acked_tx.send(outcome.is_ok());
            outcome
        });
        // Give the racer every chance to finish inside the window; it
        // may not (it must wait for the failing sync).
        let _ = acked_rx.recv_timeout(std::time::Duration::from_millis(500));
        racer_tx.send(handle).unwrap();
    });
    let err = tokio::task::spawn_blocking({
        let p = p.clone();
        move || p.checkpoint()
    })
    .await
    .unwrap()
    .unwrap_err();
    assert!(err.to_string().contains("fdatasync"), "{err}");
    let outcome = racer_rx.recv().unwrap().join().unwrap();
    assert!(outcome.is_err(), "a sync after a failed fsync of the same files acknowledged {outcome:?}");
    assert!(p.read_log().recovery_point() < leo, "the recovery point did not move over lost data");
    testfs::forget(dir.path());
}

#[tokio::test]
async fn a_group_commit_sync_records_the_recovery_point_on_disk() {
    let dir = tempfile::tempdir().unwrap();
    let p = partition(dir.path(), FlushPolicy::Always);
    p.produce(&[batch(b"a"), batch(b"b")], 0, None).await.unwrap();
    let on_disk = crate::storage::Checkpoints::read(dir.path()).unwrap().recovery_point;
    assert_eq!(on_disk, Offset(2), "written by the sync, not the periodic checkpoint");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_flush_always_every_acknowledged_record_survives_power_loss() {
    for seed in 1..=4u64 {
        let dir = tempfile::tempdir().unwrap();
        testfs::watch(dir.path());
        let p = partition(dir.path(), FlushPolicy::Always);
        let tasks: Vec<_> = (0..4u8)
            .map(|t| {
                let p = p.clone();
                tokio::spawn(async move {
                    let mut acked = Vec::new();
                    for i in 0..15u8 {
                        let value = vec![t, i, 7, 7, 7, 7, 7, 7, 7, 7];
                        let info = p.produce(&[batch(&value)], 0, None).await.unwrap();
                        acked.push((info.base_offset, value));
                    }
                    acked
                })
            })
            .collect();
        let mut acked = Vec::new();
        for t in tasks {
            acked.extend(t.await.unwrap());
        }
        // Appended after the last acknowledgement, never synced.
        p.write_log().append(&batch(b"unacked"), 0).unwrap();
        drop(p);
        testfs::power_loss_torn(dir.path(), seed);
        let config = LogConfig { segment_bytes: 4096, ..LogConfig::default() };
        let log = Log::open(dir.path(), config, Arc::new(SystemClock)).unwrap();
        for (offset, value) in &acked {
            let read = log.read(*offset, 1, Offset::MAX).unwrap();
            let records: Vec<Vec<u8>> = read
                .chunks
                .iter()
                .flat_map(|c| tally_proto::batch::BatchIter::new(c.clone()))
                .flat_map(|b| {
                    let b = b.unwrap();
                    b.records().unwrap().map(|r| r.unwrap().value.unwrap().to_vec()).collect::<Vec<_>>()
                })
                .collect();
            assert_eq!(records.first(), Some(value), "seed {seed}: acknowledged offset {offset} survived");
        }
        testfs::forget(dir.path());
    }
}
