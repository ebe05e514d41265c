//! One partition as the broker serves it: its log, the high watermark that
//! fetches wait on, group commit, and a bound on produce bytes in flight.
//!
//! The log sits behind a `std::sync::RwLock` held only for in-memory work
//! (an append is a copy into the mapped segment; a read slices the map);
//! fsyncs run on a blocking thread outside the lock through
//! [`GroupCommit`], so concurrent producers share one fsync.

use std::sync::{Arc, Mutex, RwLock, RwLockReadGuard, RwLockWriteGuard};

use tally_proto::batch::RecordBatch;
use tokio::sync::{Semaphore, watch};

use crate::error::BrokerError;
use crate::storage::{AppendInfo, Checkpoints, FlushPolicy, GroupCommit, Log, Offset, ReadResult, Writeback};
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
    last_checkpoint: Mutex<Option<Checkpoints>>,
    /// Serializes upkeep (flush, checkpoint, retention) with `close`; true
    /// once closed.
    upkeep: Mutex<bool>,
    /// Cold pages of the last read, dropped once a fetch passes their end.
    read_behind: Mutex<Option<(Offset, Vec<Writeback>)>>,
}

impl Partition {
    /// Wraps an opened log. `inflight_limit` bounds produce bytes in flight.
    pub fn new(topic: Arc<str>, index: u32, mut log: Log, inflight_limit: u32) -> Partition {
        // One replica: everything appended is replicated.
        let leo = log.log_end_offset();
        log.set_high_watermark(leo);
        let durable = log.recovery_point();
        Partition {
            topic,
            index,
            log: RwLock::new(log),
            commit: GroupCommit::new(durable),
            high_watermark: watch::channel(leo).0,
            inflight_bytes: Semaphore::new(inflight_limit as usize),
            inflight_limit,
            last_checkpoint: Mutex::new(None),
            read_behind: Mutex::new(None),
            upkeep: Mutex::new(false),
        }
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
        let (appended, failure, flush, writeback) = {
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
            // Whatever was appended is visible, even when a later batch of the
            // same request failed: the high watermark never lags what is stored.
            let leo = log.log_end_offset();
            log.set_high_watermark(leo);
            (appended, failure, log.config().flush, log.take_writeback())
        };
        if let Some((_, last)) = appended {
            self.high_watermark.send_replace(last.log_end_offset);
        }
        if let Some(writeback) = writeback {
            // Waiting here is the backpressure that keeps a producer at the
            // disk's pace instead of filling memory with dirty pages.
            let outcome = tokio::task::spawn_blocking(move || writeback.run()).await;
            if let Ok(Err(e)) = outcome {
                tracing::warn!(topic = %self.topic, partition = self.index, error = %e, "write-behind failed");
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
    /// blocking thread; the log lock is not held during the fsync).
    pub async fn sync_to(self: &Arc<Self>, offset: Offset) -> Result<Offset, BrokerError> {
        if self.commit.durable() >= offset {
            return Ok(self.commit.durable());
        }
        let this = self.clone();
        tokio::task::spawn_blocking(move || this.sync_blocking(offset))
            .await
            .map_err(|e| BrokerError::InvalidRequest(format!("sync task failed: {e}")))?
    }

    /// Blocking group-commit sync up to `offset`.
    pub fn sync_blocking(&self, offset: Offset) -> Result<Offset, BrokerError> {
        self.commit
            .sync_to(offset, || {
                let plan = self.read_log().sync_plan();
                let up_to = plan.execute()?;
                self.write_log().mark_durable(&plan);
                Ok::<_, crate::storage::StorageError>(up_to)
            })
            .map_err(BrokerError::Storage)
    }

    /// Reads batches from `offset` below the high watermark.
    pub fn fetch(&self, offset: i64, max_bytes: u64) -> Result<Fetched, BrokerError> {
        let log = self.read_log();
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
    /// written outside it).
    ///
    /// First syncs closed segments that are not yet durable, so the recovery
    /// point can move up to the active segment. Files are rewritten only when
    /// their values changed.
    pub fn checkpoint(&self) -> Result<(), BrokerError> {
        let Some(_upkeep) = self.upkeep() else { return Ok(()) };
        let plan = self.read_log().sync_plan_closed();
        plan.execute()?;
        let (values, dir) = {
            let mut log = self.write_log();
            log.mark_durable(&plan);
            (log.checkpoints(), log.dir().to_path_buf())
        };
        let mut last = self.last_checkpoint.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if last.as_ref() != Some(&values) {
            values.write(&dir)?;
            *last = Some(values);
        }
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
