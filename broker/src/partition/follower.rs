//! The follower side of a partition: appending the leader's batches,
//! truncating where the logs diverge (KIP-279), adopting the leader's log
//! start, and restarting from an empty log.

use super::*;

impl Partition {
    /// Where a follower fetches next: its log end and the epoch of its last
    /// batch.
    pub fn fetch_position(&self) -> (Offset, Option<u32>) {
        let log = self.read_log();
        (log.log_end_offset(), log.leader_epochs().latest_epoch())
    }

    /// Checks that this broker follows in `leader_epoch`.
    pub(super) fn check_follows(&self, leader_epoch: u32) -> Result<(), BrokerError> {
        match &*self.lock_role() {
            Role::Follower { leader_epoch: e, .. } if *e == leader_epoch => Ok(()),
            Role::Follower { leader, leader_epoch: e } => Err(self.not_leader(*leader, *e)),
            Role::Leader(state) => Err(self.not_leader(None, state.leader_epoch())),
            Role::Idle => Err(self.not_leader(None, leader_epoch)),
        }
    }

    /// Appends the leader's batches as a follower in `leader_epoch` (same
    /// bytes, the leader's offsets and epochs) and takes the leader's high
    /// watermark, capped at its own log end. Returns the new log end. With
    /// flush `always`, returns once that end is durable, so the next fetch
    /// offset the leader counts is on disk here.
    pub async fn append_as_follower(
        self: &Arc<Self>,
        batches: &[RecordBatch],
        leader_high_watermark: Offset,
        leader_epoch: u32,
    ) -> Result<Offset, BrokerError> {
        let (leo, hw, flush) = {
            let mut log = self.write_log();
            self.check_follows(leader_epoch)?;
            for batch in batches {
                log.append_replica(batch).map_err(BrokerError::from_storage)?;
            }
            let leo = log.log_end_offset();
            let target = leader_high_watermark.min(leo);
            if target > log.high_watermark() {
                log.set_high_watermark(target);
            }
            (leo, log.high_watermark(), log.config().flush)
        };
        self.publish_hw(hw);
        self.publish_log_end(leo);
        if flush == FlushPolicy::Always && !batches.is_empty() {
            self.sync_to(leo).await?;
        }
        Ok(leo)
    }

    /// Truncates a follower's log where it diverges from the leader's: the
    /// leader's last epoch at or below ours ends at `leader_end`. Kafka's
    /// rule: when our log has that epoch, cut at the smaller of both ends
    /// of it; when it does not, cut at the end of our largest epoch below
    /// it, and ask again. Returns the new log end. Durable on return.
    pub fn truncate_diverging(
        &self,
        leader_epoch: u32,
        diverging_epoch: u32,
        leader_end: Offset,
    ) -> Result<Offset, BrokerError> {
        let mut log = self.write_log();
        self.check_follows(leader_epoch)?;
        let leo = log.log_end_offset();
        let cut = match log.end_offset_for_epoch(diverging_epoch) {
            None => leader_end.min(leo),
            Some((e, own_end)) if e != diverging_epoch => own_end.min(leo),
            Some((_, own_end)) => own_end.min(leader_end).min(leo),
        };
        let cut = cut.max(log.log_start_offset());
        tracing::info!(topic = %self.topic, partition = self.index, diverging_epoch, %leader_end, from = %leo, to = %cut, "truncating a diverging log tail");
        let leo = log.truncate_to(cut).map_err(|e| self.truncation_failed(&mut log, e))?;
        let hw = log.high_watermark();
        drop(log);
        self.high_watermark.send_replace(hw);
        self.publish_log_end(leo);
        Ok(leo)
    }

    /// A follower takes the leader's log start (Kafka's
    /// maybeIncrementLogStartOffset), capped at its own high watermark: what
    /// the leader deleted (retention, DeleteRecords) goes here too, so no
    /// prefix the leader no longer has, divergent or not, is served from
    /// this replica after it leads.
    pub fn adopt_leader_log_start(&self, leader_epoch: u32, leader_start: Offset) -> Result<(), BrokerError> {
        let mut log = self.write_log();
        self.check_follows(leader_epoch)?;
        let start = leader_start.min(log.high_watermark());
        if start <= log.log_start_offset() {
            return Ok(());
        }
        tracing::debug!(topic = %self.topic, partition = self.index, from = %log.log_start_offset(), to = %start, "taking the leader's log start");
        log.delete_records_before(start).map_err(BrokerError::from_storage)
    }

    /// A truncation that failed may have stopped part way (later segments
    /// unlinked, the cut segment not started, the high watermark and the
    /// epoch cache not yet moved): the log is failed for good, so nothing of
    /// it is served or appended to; the next start recovers it from the
    /// disk, below a recovery point the truncation lowered first.
    pub(super) fn truncation_failed(&self, log: &mut Log, e: StorageError) -> BrokerError {
        if log.failure().is_none() {
            tracing::error!(topic = %self.topic, partition = self.index, error = %e, "truncation failed part way: partition failed until the broker restarts and recovers its log");
            log.fail(&e);
        }
        BrokerError::Storage(StorageError::LogFailed { reason: e.to_string() })
    }

    /// A follower whose log ends below the leader's log start: empties the
    /// log and starts it at `log_start`.
    pub fn restart_at(&self, leader_epoch: u32, log_start: Offset) -> Result<Offset, BrokerError> {
        let mut log = self.write_log();
        self.check_follows(leader_epoch)?;
        tracing::info!(topic = %self.topic, partition = self.index, %log_start, "the leader's log starts past ours: starting over there");
        let leo = log.truncate_fully_and_start_at(log_start).map_err(|e| self.truncation_failed(&mut log, e))?;
        let hw = log.high_watermark();
        drop(log);
        self.high_watermark.send_replace(hw);
        self.publish_log_end(leo);
        Ok(leo)
    }

    /// A receiver that sees every move of the log end (followers' long polls).
    pub fn subscribe_log_end(&self) -> watch::Receiver<Offset> {
        self.log_end.subscribe()
    }
}
