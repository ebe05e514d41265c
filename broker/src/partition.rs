//! One partition as the broker serves it: its log, the high watermark that
//! fetches wait on, group commit, and a bound on produce bytes in flight.
//!
//! The log sits behind a `std::sync::RwLock` held only for in-memory work
//! (an append is a copy into the mapped segment; a read slices the map);
//! fsyncs run on a blocking thread outside the lock through
//! [`GroupCommit`], so concurrent producers share one fsync.
//!
//! High watermark: with one replica it is the log end, except that with
//! flush `always` it is the durable end: no consumer reads a record a crash
//! could take back (and whose offset would then be reused). The `watch` that
//! long polls wait on only ever moves forward.
//!
//! A failed fsync or write-behind fails the partition for good: every
//! produce, fetch and sync answers KAFKA_STORAGE_ERROR until the broker
//! restarts and recovers the log.

use std::sync::{Arc, Mutex, RwLock, RwLockReadGuard, RwLockWriteGuard};

use tally_proto::batch::RecordBatch;
use tokio::sync::{Semaphore, watch};

use crate::error::BrokerError;
use crate::storage::{AppendInfo, FlushPolicy, GroupCommit, Log, Offset, ReadResult, StorageError, Writeback};
use crate::topic::TopicConfig;

/// One partition's state.
#[derive(Debug)]
pub struct Partition {
    topic: Arc<str>,
    index: u32,
    log: RwLock<Log>,
    commit: GroupCommit,
    high_watermark: watch::Sender<Offset>,
    inflight_bytes: Semaphore,
    inflight_limit: u32,
    /// Serializes upkeep (flush, checkpoint, retention) with `close`; true
    /// once closed.
    upkeep: Mutex<bool>,
    /// Cold pages of the last read, dropped once a fetch passes their end.
    read_behind: Mutex<Option<(Offset, Vec<Writeback>)>>,
}

impl Partition {
    /// Wraps an opened log. `inflight_limit` bounds produce bytes in flight.
    /// The high watermark starts from the log's (its checkpoint) and moves
    /// by [`Partition::hw_candidate`].
    pub fn new(topic: Arc<str>, index: u32, mut log: Log, inflight_limit: u32) -> Partition {
        let hw = Self::advance_hw(&mut log);
        Partition {
            topic,
            index,
            log: RwLock::new(log),
            commit: GroupCommit::new(),
            high_watermark: watch::channel(hw).0,
            inflight_bytes: Semaphore::new(inflight_limit as usize),
            inflight_limit,
            read_behind: Mutex::new(None),
            upkeep: Mutex::new(false),
        }
    }

    /// Where the high watermark may move to now. One replica: the log end,
    /// or with flush `always` the durable end (what a crash cannot take
    /// back). Replication replaces this with the minimum over the ISR.
    fn hw_candidate(log: &Log) -> Offset {
        let leo = log.log_end_offset();
        match log.config().flush {
            FlushPolicy::Always => leo.min(log.recovery_point()),
            FlushPolicy::IntervalMs(_) | FlushPolicy::Os => leo,
        }
    }

    /// Moves the log's high watermark up to the candidate (never down) and
    /// returns it.
    fn advance_hw(log: &mut Log) -> Offset {
        let hw = log.high_watermark().max(Self::hw_candidate(log));
        log.set_high_watermark(hw);
        log.high_watermark()
    }

    /// Tells long polls about `hw`; the watch never moves back.
    fn publish_hw(&self, hw: Offset) {
        self.high_watermark.send_if_modified(|current| {
            let moved = hw > *current;
            if moved {
                *current = hw;
            }
            moved
        });
    }

    /// Fails the partition after an I/O error that may have lost data.
    fn fail(&self, error: &StorageError) {
        tracing::error!(topic = %self.topic, partition = self.index, %error, "partition failed: it answers KAFKA_STORAGE_ERROR until the broker restarts and recovers its log");
        self.write_log().fail(error);
    }

    /// Why the partition failed, if it did.
    pub fn failure(&self) -> Option<String> {
        self.read_log().failure().map(str::to_string)
    }

    /// Topic name.
    pub fn topic(&self) -> &str {
        &self.topic
    }

    /// Partition number.
    pub fn index(&self) -> u32 {
        self.index
    }

    fn read_log(&self) -> RwLockReadGuard<'_, Log> {
        self.log.read().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn write_log(&self) -> RwLockWriteGuard<'_, Log> {
        self.log.write().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Appends validated batches (all or, on a storage error, a prefix).
    /// Waits (bounded) while too many produce bytes are in flight, and with
    /// flush `always` until the batches are durable.
    pub async fn produce(
        self: &Arc<Self>,
        batches: &[RecordBatch],
        leader_epoch: u32,
    ) -> Result<AppendInfo, BrokerError> {
        let bytes: usize = batches.iter().map(RecordBatch::len).sum();
        let permits = u32::try_from(bytes).unwrap_or(u32::MAX).min(self.inflight_limit);
        let _permit = self.inflight_bytes.acquire_many(permits).await.map_err(|_| BrokerError::ShuttingDown)?;
        let (appended, failure, flush, writeback, hw) = {
            let mut log = self.write_log();
            let mut appended: Option<(AppendInfo, AppendInfo)> = None;
            let mut failure = None;
            for batch in batches {
                match log.append(batch, leader_epoch) {
                    Ok(info) => appended = Some((appended.map_or(info, |(first, _)| first), info)),
                    Err(e) => {
                        failure = Some(BrokerError::from_storage(e));
                        break;
                    }
                }
            }
            // Whatever was appended is visible (up to what the flush policy
            // allows), even when a later batch of the same request failed:
            // the high watermark never lags what is stored.
            let hw = Self::advance_hw(&mut log);
            (appended, failure, log.config().flush, log.take_writeback(), hw)
        };
        self.publish_hw(hw);
        if let Some(writeback) = writeback {
            // Waiting here is the backpressure that keeps a producer at the
            // disk's pace instead of filling memory with dirty pages.
            let outcome = tokio::task::spawn_blocking(move || writeback.run()).await;
            if let Ok(Err(e)) = outcome {
                // Writeback that failed may have lost the pages it covered.
                let e = StorageError::Io { op: "write-behind", path: self.read_log().dir().to_path_buf(), source: e };
                self.fail(&e);
                return Err(BrokerError::Storage(e));
            }
        }
        if let Some(e) = failure {
            return Err(e);
        }
        let (first, last) =
            appended.ok_or_else(|| BrokerError::InvalidRequest("no record batch in the produce data".into()))?;
        if flush == FlushPolicy::Always {
            self.sync_to(last.log_end_offset).await?;
        }
        Ok(AppendInfo {
            base_offset: first.base_offset,
            last_offset: last.last_offset,
            log_end_offset: last.log_end_offset,
        })
    }

    /// Returns once offsets below `offset` are on disk (group commit on a
    /// blocking thread; the log lock is not held during the fsync), and the
    /// high watermark has moved over what became durable.
    pub async fn sync_to(self: &Arc<Self>, offset: Offset) -> Result<Offset, BrokerError> {
        let reached = {
            let mut log = self.write_log();
            let durable = log.recovery_point();
            (durable >= offset && log.failure().is_none()).then(|| (durable, Self::advance_hw(&mut log)))
        };
        if let Some((durable, hw)) = reached {
            self.publish_hw(hw);
            return Ok(durable);
        }
        let this = self.clone();
        tokio::task::spawn_blocking(move || this.sync_blocking(offset))
            .await
            .map_err(|e| BrokerError::InvalidRequest(format!("sync task failed: {e}")))?
    }

    /// Blocking group-commit sync up to `offset`. A failed sync fails the
    /// partition; it is never retried.
    pub fn sync_blocking(&self, offset: Offset) -> Result<Offset, BrokerError> {
        let durable = self
            .commit
            .sync_to(
                offset,
                || self.read_log().recovery_point(),
                || {
                    let plan = {
                        let log = self.read_log();
                        if let Some(reason) = log.failure() {
                            return Err(StorageError::LogFailed { reason: reason.to_string() });
                        }
                        log.sync_plan()
                    };
                    if let Err(e) = plan.execute() {
                        self.fail(&e);
                        return Err(e);
                    }
                    Ok(self.write_log().mark_durable(&plan))
                },
            )
            .map_err(BrokerError::Storage)?;
        let hw = Self::advance_hw(&mut self.write_log());
        self.publish_hw(hw);
        Ok(durable)
    }

    /// Reads batches from `offset` below the high watermark.
    pub fn fetch(&self, offset: i64, max_bytes: u64) -> Result<Fetched, BrokerError> {
        let log = self.read_log();
        if let Some(reason) = log.failure() {
            return Err(BrokerError::Storage(StorageError::LogFailed { reason: reason.to_string() }));
        }
        let (log_start, hw) = (log.log_start_offset(), log.high_watermark());
        let Some(offset) = Offset::from_wire(offset) else {
            return Err(BrokerError::OffsetOutOfRange { requested: offset, log_start, log_end: hw });
        };
        if offset > hw && offset <= log.log_end_offset() {
            // Not yet visible to consumers: nothing to return, not an error.
            return Ok(Fetched {
                read: ReadResult { next_offset: offset, ..ReadResult::default() },
                high_watermark: hw,
                log_start_offset: log_start,
            });
        }
        let mut read = log.read(offset, max_bytes, hw).map_err(BrokerError::from_storage)?;
        drop(log);
        self.drop_behind_reader(offset, &mut read);
        Ok(Fetched { read, high_watermark: hw, log_start_offset: log_start })
    }

    /// Read-side drop-behind: a cold read's pages are dropped from the cache
    /// when a later fetch starts at or past its end (the reader has moved on),
    /// so a consumer catching up from disk recycles page-cache pages instead
    /// of growing the cache. Dropping clean pages is a quick syscall.
    fn drop_behind_reader(&self, offset: Offset, read: &mut ReadResult) {
        let due = {
            let mut pending = self.read_behind.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            let due = match pending.take() {
                Some((end, drops)) if offset >= end => Some(drops),
                other => {
                    *pending = other;
                    None
                }
            };
            if pending.is_none() && !read.cold.is_empty() {
                *pending = Some((read.next_offset, std::mem::take(&mut read.cold)));
            }
            due
        };
        for d in due.into_iter().flatten() {
            if let Err(e) = d.run() {
                tracing::debug!(topic = %self.topic, partition = self.index, error = %e, "dropping read pages failed");
            }
        }
    }

    /// True when reading from `offset` may fault pages in from disk.
    pub fn may_read_disk(&self, offset: Offset) -> bool {
        self.read_log().may_read_disk(offset)
    }

    /// A receiver that sees every move of the high watermark.
    pub fn subscribe(&self) -> watch::Receiver<Offset> {
        self.high_watermark.subscribe()
    }

    /// `(log_start_offset, high_watermark, log_end_offset)`.
    pub fn offsets(&self) -> (Offset, Offset, Offset) {
        let log = self.read_log();
        (log.log_start_offset(), log.high_watermark(), log.log_end_offset())
    }

    /// The first offset below the high watermark whose timestamp is >= `ts`.
    pub fn offset_for_timestamp(&self, ts: i64) -> Result<Option<(Offset, i64)>, BrokerError> {
        let log = self.read_log();
        let found = log.offset_for_timestamp(ts).map_err(BrokerError::from_storage)?;
        Ok(found.filter(|(o, _)| *o < log.high_watermark()))
    }

    /// Applies new topic settings to the log.
    pub fn set_config(&self, config: &TopicConfig) -> Result<(), BrokerError> {
        self.write_log().set_config(config.log.clone()).map_err(BrokerError::Storage)
    }

    /// Deletes segments past retention.
    pub fn enforce_retention(&self) -> Result<usize, BrokerError> {
        let Some(_upkeep) = self.upkeep() else { return Ok(0) };
        // Checkpoint writes and file deletion happen outside the log lock.
        let (outcome, removed) = self.write_log().enforce_retention_deferred();
        removed.finish()?;
        Ok(outcome.segments_deleted)
    }

    /// Syncs if the interval flush policy says it is time.
    pub fn flush_if_due(&self) -> Result<(), BrokerError> {
        let Some(_upkeep) = self.upkeep() else { return Ok(()) };
        let due = self.read_log().flush_due();
        if due {
            let leo = self.read_log().log_end_offset();
            self.sync_blocking(leo)?;
        }
        Ok(())
    }

    /// Writes the checkpoint files (values taken under the lock, files
    /// written outside it by the log's one checkpoint writer, which never
    /// lets an older value replace a newer one).
    ///
    /// First syncs closed segments that are not yet durable, so the recovery
    /// point can move up to the active segment. Files are rewritten only when
    /// their values changed. Does nothing on a failed partition.
    pub fn checkpoint(&self) -> Result<(), BrokerError> {
        let Some(_upkeep) = self.upkeep() else { return Ok(()) };
        let plan = {
            let log = self.read_log();
            if log.failure().is_some() {
                return Ok(());
            }
            log.sync_plan_closed()
        };
        if let Err(e) = plan.execute() {
            self.fail(&e);
            return Err(BrokerError::Storage(e));
        }
        let snapshot = {
            let mut log = self.write_log();
            log.mark_durable(&plan);
            log.checkpoint_snapshot()
        };
        snapshot.write()?;
        Ok(())
    }

    /// Flushes and closes the log for shutdown.
    ///
    /// Waits for any upkeep in progress, and no upkeep runs afterwards: once
    /// this returns, the partition's directory may be renamed or removed
    /// without an old maintenance pass writing or deleting files by path in
    /// a directory that a new topic of the same name may own by then.
    pub fn close(&self) -> Result<(), BrokerError> {
        self.inflight_bytes.close();
        let mut closed = self.upkeep.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        *closed = true;
        self.write_log().close().map_err(BrokerError::Storage)
    }

    /// The upkeep guard, or `None` once the partition is closed. Held across
    /// the file work of flushes, checkpoints and retention (that is its job),
    /// never by appends or fetches.
    fn upkeep(&self) -> Option<std::sync::MutexGuard<'_, bool>> {
        let guard = self.upkeep.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        (!*guard).then_some(guard)
    }
}

/// What [`Partition::fetch`] returns.
#[derive(Debug)]
pub struct Fetched {
    /// The batches.
    pub read: ReadResult,
    /// High watermark when read.
    pub high_watermark: Offset,
    /// Log start offset when read.
    pub log_start_offset: Offset,
}

#[cfg(test)]
mod tests {
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
        Arc::new(Partition::new(Arc::from("t"), 0, log, 1 << 20))
    }

    #[tokio::test]
    async fn with_flush_always_the_high_watermark_moves_only_after_the_fsync() {
        let dir = tempfile::tempdir().unwrap();
        let p = partition(dir.path(), FlushPolicy::Always);
        let hw = p.subscribe();
        p.produce(&[batch(b"a")], 0).await.unwrap();
        assert_eq!((p.offsets().1, *hw.borrow()), (Offset(1), Offset(1)));
        testfs::fail_next(dir.path(), testfs::Op::Fsync, Some(".log"), 1);
        let err = p.produce(&[batch(b"b")], 0).await.unwrap_err();
        assert_eq!(err.code(), ErrorCode::KafkaStorageError, "{err}");
        assert_eq!(p.offsets(), (Offset(0), Offset(1), Offset(2)), "stored, but not visible");
        assert_eq!(*hw.borrow(), Offset(1), "no long poll was woken for it");
        // The partition is failed for good: no retry of the fsync, no reads.
        let err = p.produce(&[batch(b"c")], 0).await.unwrap_err();
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
                tokio::spawn(async move { p.produce(&[batch(&[i])], 0).await })
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
        p.produce(&[batch(b"a"), batch(b"b")], 0).await.unwrap();
        assert_eq!(*hw.borrow(), Offset(2));
        assert_eq!(p.fetch(0, 1 << 20).unwrap().read.next_offset, Offset(2));
    }
}
