//! Syncs (group commit), consumer fetches, and the offset and timestamp
//! lookups of a partition.

use super::*;

impl Partition {
    /// Returns once offsets below `offset` are on disk (group commit on a
    /// blocking thread; the log lock is not held during the fsync), and the
    /// high watermark has moved over what became durable.
    pub async fn sync_to(self: &Arc<Self>, offset: Offset) -> Result<Offset, BrokerError> {
        let reached = {
            let mut log = self.write_log();
            let durable = log.recovery_point();
            (durable >= offset && log.failure().is_none()).then(|| (durable, self.advance_hw(&mut log)))
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
                    let started = std::time::Instant::now();
                    let executed = plan.execute();
                    metrics::histogram!(crate::metrics::FLUSH_DURATION).record(started.elapsed().as_secs_f64());
                    if let Err(e) = executed {
                        self.fail(&e);
                        return Err(e);
                    }
                    let (durable, recovery_point) = {
                        let mut log = self.write_log();
                        (log.mark_durable(&plan), log.recovery_point_after_sync())
                    };
                    // Inside the group commit, so these writes never race:
                    // one small file replaced, no fsync, at most every
                    // RECOVERY_POINT_WRITE_INTERVAL_MS (see its doc).
                    if let Some(Err(e)) = recovery_point.map(|r| r.write()) {
                        tracing::warn!(topic = %self.topic, partition = self.index, error = %e, "could not record the recovery point after a sync; the periodic checkpoint will");
                    }
                    Ok(durable)
                },
            )
            .map_err(BrokerError::Storage)?;
        let hw = self.advance_hw(&mut self.write_log());
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

    /// Reads batches from `offset` up to the log end, committed or not: the
    /// group coordinator's load, on the leader.
    pub fn read_to_log_end(&self, offset: Offset, max_bytes: u64) -> Result<ReadResult, BrokerError> {
        let log = self.read_log();
        let leo = log.log_end_offset();
        log.read(offset, max_bytes, leo).map_err(BrokerError::from_storage)
    }

    /// Read-side drop-behind: a cold read's pages are dropped from the cache
    /// when a later fetch starts at or past its end (the reader has moved on),
    /// so a consumer catching up from disk recycles page-cache pages instead
    /// of growing the cache. Dropping clean pages is a quick syscall.
    pub(super) fn drop_behind_reader(&self, offset: Offset, read: &mut ReadResult) {
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

    /// True when reading up to `max_bytes` from `offset` may fault pages in
    /// from disk.
    pub fn may_read_disk(&self, offset: Offset, max_bytes: u64) -> bool {
        self.read_log().may_read_disk(offset, max_bytes)
    }

    /// A receiver that sees every move of the high watermark.
    pub fn subscribe(&self) -> watch::Receiver<Offset> {
        self.high_watermark.subscribe()
    }

    /// Refuses to list offsets (OFFSET_NOT_AVAILABLE) while this broker is a
    /// leader whose high watermark has not reached the start of its epoch:
    /// until then the HW it knows may lag the previous leader's, and a
    /// client would see "latest" go backwards (Kafka's rule).
    pub fn check_offsets_available(&self) -> Result<(), BrokerError> {
        let log = self.read_log();
        let hw = log.high_watermark();
        match &*self.lock_role() {
            Role::Leader(state) if hw < state.epoch_start() => Err(BrokerError::OffsetNotAvailable {
                topic: self.topic.to_string(),
                partition: self.index,
                high_watermark: hw.get(),
                epoch_start: state.epoch_start().get(),
            }),
            _ => Ok(()),
        }
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

    /// The record with the largest timestamp below the high watermark.
    pub fn max_timestamp_record(&self) -> Result<Option<(Offset, i64)>, BrokerError> {
        let log = self.read_log();
        log.max_timestamp_record(log.high_watermark()).map_err(BrokerError::from_storage)
    }

    /// Bytes of the log's segments on disk, and producer ids tracked.
    pub fn sizes(&self) -> (u64, usize) {
        let log = self.read_log();
        (log.size_bytes(), log.producer_count())
    }
}
