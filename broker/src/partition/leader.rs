//! The leader side of a partition: produce (append under the log lock in
//! the leader's epoch, then the waits for write-behind, fsync and the high
//! watermark) and followers' fetches (divergence, progress, ISR changes).

use super::*;

/// What a leader's produce did (see [`Partition::produce_with_outcome`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Produced {
    /// Where the batches lie.
    pub info: AppendInfo,
    /// For a retry of a batch already in the log (nothing appended): the
    /// original's max timestamp, which is its append time on a
    /// `LogAppendTime` topic.
    pub duplicate_timestamp: Option<i64>,
}

impl Partition {
    /// Appends validated batches as leader in `leader_epoch`: all, or, when
    /// one fails, the ones before it, answered as
    /// [`BrokerError::PartlyAppended`] once waited for. Waits (bounded) while too many produce
    /// bytes are in flight, and with flush `always` until the batches are
    /// durable. With `acks_all` (the request's timeout), first refuses when
    /// the committed ISR is smaller than `min_insync_replicas`, then waits
    /// until the high watermark passes the batches.
    pub async fn produce(
        self: &Arc<Self>,
        batches: &[RecordBatch],
        leader_epoch: u32,
        acks_all: Option<Duration>,
    ) -> Result<AppendInfo, BrokerError> {
        self.produce_with_outcome(batches, leader_epoch, acks_all, None).await.map(|p| p.info)
    }

    /// [`Partition::produce`], also saying whether the (one) batch was a
    /// retry of an idempotent producer's batch already in the log: then
    /// nothing was appended, `info` is where the original lies, and its
    /// waits (fsync, high watermark) were for the original. With
    /// `expected_end` (a conditional append), appends only if the log ends
    /// there, checked under the log lock with the producer check first (a
    /// retry of an append that happened is answered as that append), else
    /// [`BrokerError::EndOffsetMismatch`].
    pub async fn produce_with_outcome(
        self: &Arc<Self>,
        batches: &[RecordBatch],
        leader_epoch: u32,
        acks_all: Option<Duration>,
        expected_end: Option<u64>,
    ) -> Result<Produced, BrokerError> {
        if let Some(batch) = idempotence::idempotent_batch(batches)? {
            self.await_sequence_turn(batch).await;
        }
        let mut duplicate_timestamp = None;
        let bytes: usize = batches.iter().map(RecordBatch::len).sum();
        let permits = u32::try_from(bytes).unwrap_or(u32::MAX).min(self.inflight_limit);
        // Held until the reply, acks=all waits included: this bounds the
        // bytes of waiting produce requests per partition.
        let _permit = self.inflight_bytes.acquire_many(permits).await.map_err(|_| BrokerError::ShuttingDown)?;
        let role_changes = self.role_changes.subscribe();
        let rest_failed;
        let (appended, failure, flush, writeback, hw, leo, role_generation) = {
            let mut log = self.write_log();
            self.check_leads(leader_epoch, acks_all.is_some())?;
            if let Some(expected) = expected_end {
                self.check_end_offset(&log, batches, expected)?;
            }
            // Role changes take the log lock: this is the role the batches
            // are appended under.
            let role_generation = *self.role_changes.borrow();
            let mut appended: Option<(AppendInfo, AppendInfo, usize)> = None;
            let mut failure = None;
            for batch in batches {
                match log.append(batch, leader_epoch) {
                    Ok(info) => {
                        appended = Some(match appended {
                            None => (info, info, 1),
                            Some((first, _, n)) => (first, info, n + 1),
                        })
                    }
                    Err(StorageError::DuplicateBatch { first_offset, last_offset, timestamp, .. }) => {
                        // A retry of a batch already in the log: answered
                        // as that batch (the request holds no other).
                        let info = AppendInfo {
                            base_offset: Offset(first_offset),
                            last_offset: Offset(last_offset),
                            log_end_offset: Offset(last_offset + 1),
                        };
                        duplicate_timestamp = Some(timestamp);
                        appended = Some((info, info, 1));
                    }
                    Err(e) => {
                        failure = Some(BrokerError::from_storage(e));
                        break;
                    }
                }
            }
            // Whatever was appended is visible (up to what the flush policy
            // and the ISR allow), even when a later batch of the same
            // request failed: the high watermark never lags what is stored.
            let hw = self.advance_hw(&mut log);
            (appended, failure, log.config().flush, log.take_writeback(), hw, log.log_end_offset(), role_generation)
        };
        self.publish_hw(hw);
        self.publish_log_end(leo);
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
        // A failure after some batches were appended: those stay (readers may
        // have them already) and are answered as appended once they are
        // waited for like a whole request, so a retry sends only the rest
        // and nothing is appended twice.
        let (first, last, count) = match (appended, failure) {
            (None, Some(e)) => return Err(e),
            (None, None) => return Err(BrokerError::InvalidRequest("no record batch in the produce data".into())),
            (Some(appended), failure) => {
                rest_failed = failure;
                appended
            }
        };
        if flush == FlushPolicy::Always {
            self.sync_to(last.log_end_offset).await?;
        }
        if let Some(timeout) = acks_all {
            self.wait_replicated(last.log_end_offset, leader_epoch, role_changes, timeout).await?;
        }
        if flush == FlushPolicy::Always || acks_all.is_some() {
            // What was waited for (the fsync, the high watermark) counts only
            // if this broker led the whole time: after a role change the
            // batches may have been truncated and replaced by another
            // leader's records at the same offsets, and the high watermark
            // seen may be that leader's. Epochs are never reused, so an
            // unchanged role generation means this leadership never ended.
            self.check_still_leads(leader_epoch, role_generation)?;
        }
        let appended = AppendInfo {
            base_offset: first.base_offset,
            last_offset: last.last_offset,
            log_end_offset: last.log_end_offset,
        };
        match rest_failed {
            None => Ok(Produced { info: appended, duplicate_timestamp }),
            Some(e) => Err(BrokerError::PartlyAppended { appended, batches: count, source: Box::new(e) }),
        }
    }

    /// Appends one batch the broker wrote itself (the group coordinator's
    /// records) as leader in `leader_epoch`, refusing (NOT_ENOUGH_REPLICAS)
    /// when the committed ISR is below `min_insync_replicas`. Answers at once
    /// with where the batch landed and the role generation it was appended
    /// under, for [`Partition::wait_committed`].
    pub fn append_internal(
        self: &Arc<Self>,
        batch: &RecordBatch,
        leader_epoch: u32,
    ) -> Result<(AppendInfo, u64), BrokerError> {
        let (info, hw, leo, generation, writeback) = {
            let mut log = self.write_log();
            self.check_leads(leader_epoch, true)?;
            let generation = *self.role_changes.borrow();
            let info = log.append(batch, leader_epoch).map_err(BrokerError::from_storage)?;
            let hw = self.advance_hw(&mut log);
            (info, hw, log.log_end_offset(), generation, log.take_writeback())
        };
        self.publish_hw(hw);
        self.publish_log_end(leo);
        if let Some(writeback) = writeback {
            let partition = self.clone();
            tokio::task::spawn_blocking(move || {
                if let Err(e) = writeback.run() {
                    // As for produce: the pages it covered may be lost.
                    let dir = partition.read_log().dir().to_path_buf();
                    partition.fail(&StorageError::Io { op: "write-behind", path: dir, source: e });
                }
            });
        }
        Ok((info, generation))
    }

    /// Waits until what was appended below `end` in `leader_epoch` (under
    /// `role_generation`) is committed: durable under flush `always`, and
    /// below the high watermark, with this broker leading the whole time.
    pub async fn wait_committed(
        self: &Arc<Self>,
        end: Offset,
        leader_epoch: u32,
        role_generation: u64,
        timeout: Duration,
    ) -> Result<(), BrokerError> {
        let role_changes = self.role_changes.subscribe();
        self.check_still_leads(leader_epoch, role_generation)?;
        if self.read_log().config().flush == FlushPolicy::Always {
            self.sync_to(end).await?;
        }
        self.wait_replicated(end, leader_epoch, role_changes, timeout).await?;
        self.check_still_leads(leader_epoch, role_generation)?;
        if !self.session.is_live() {
            // Cut off from the controller: another broker may lead by now.
            return Err(self.not_leader(None, leader_epoch));
        }
        Ok(())
    }

    /// Refuses unless this broker leads in `leader_epoch` under a live
    /// session (and, for acks=all, the committed ISR is large enough). Call with the log lock
    /// held, so no role change slips in before the append.
    pub(super) fn check_leads(&self, leader_epoch: u32, acks_all: bool) -> Result<(), BrokerError> {
        match &*self.lock_role() {
            Role::Leader(state) if state.leader_epoch() == leader_epoch => {
                if !self.session.is_live() {
                    // By now the controller may have fenced this broker and
                    // moved the leadership: never append as a lapsed leader.
                    return Err(self.not_leader(None, leader_epoch));
                }
                if acks_all && !state.enough_replicas() {
                    let (isr, min_isr) = state.isr_size();
                    return Err(BrokerError::NotEnoughReplicas { isr, min_isr: min_isr as u32 });
                }
                Ok(())
            }
            Role::Leader(state) => Err(self.not_leader(None, state.leader_epoch())),
            Role::Follower { leader, leader_epoch } => Err(self.not_leader(*leader, *leader_epoch)),
            Role::Idle => Err(self.not_leader(None, leader_epoch)),
        }
    }

    /// Refuses unless the role is still the one of `role_generation` (the
    /// generation the batches were appended under).
    pub(super) fn check_still_leads(&self, leader_epoch: u32, role_generation: u64) -> Result<(), BrokerError> {
        if *self.role_changes.borrow() == role_generation {
            return Ok(());
        }
        Err(self.not_leading_now(leader_epoch))
    }

    /// NOT_LEADER_OR_FOLLOWER (or LEADER_NOT_AVAILABLE) for a request of
    /// `leader_epoch`, naming the leader this broker knows of now.
    pub(super) fn not_leading_now(&self, leader_epoch: u32) -> BrokerError {
        match &*self.lock_role() {
            Role::Leader(state) => self.not_leader(None, state.leader_epoch()),
            Role::Follower { leader, leader_epoch } => self.not_leader(*leader, *leader_epoch),
            Role::Idle => self.not_leader(None, leader_epoch),
        }
    }

    /// Waits until the high watermark reaches `end` while this broker still
    /// leads in `leader_epoch`, for at most `timeout`.
    pub(super) async fn wait_replicated(
        &self,
        end: Offset,
        leader_epoch: u32,
        mut role_changes: watch::Receiver<u64>,
        timeout: Duration,
    ) -> Result<(), BrokerError> {
        let mut hw = self.high_watermark.subscribe();
        let wait = async {
            loop {
                if *hw.borrow_and_update() >= end {
                    return Ok(());
                }
                tokio::select! {
                    changed = hw.changed() => changed.map_err(|_| BrokerError::ShuttingDown)?,
                    changed = role_changes.changed() => {
                        changed.map_err(|_| BrokerError::ShuttingDown)?;
                        // Leadership moved: the batch may or may not survive
                        // on the new leader; the producer must retry.
                        if self.leading_epoch() != Some(leader_epoch) {
                            return Err(self.not_leading_now(leader_epoch));
                        }
                    }
                }
            }
        };
        match tokio::time::timeout(timeout, wait).await {
            Ok(outcome) => outcome,
            Err(_) => Err(BrokerError::ReplicationTimedOut {
                topic: self.topic.to_string(),
                partition: self.index,
                timeout_ms: u64::try_from(timeout.as_millis()).unwrap_or(u64::MAX),
            }),
        }
    }

    /// A follower's fetch, on the leader: checks the follower's epoch,
    /// finds where its log diverges (its last fetched epoch against this
    /// log's epochs, Kafka's KIP-320 rule), counts its fetch offset as its
    /// log end (which may move the HW and the ISR), and reads batches from
    /// there up to the log end: at most `max_bytes`, but at least one batch
    /// when there is one, unless `max_bytes` is 0 (the response it goes in
    /// is full: nothing is read).
    pub fn replica_fetch(
        &self,
        follower: BrokerId,
        fetch_offset: i64,
        current_leader_epoch: u32,
        last_fetched_epoch: Option<u32>,
        max_bytes: u64,
        now_ms: u64,
    ) -> Result<ReplicaRead, BrokerError> {
        let mut log = self.write_log();
        if let Some(reason) = log.failure() {
            return Err(BrokerError::Storage(StorageError::LogFailed { reason: reason.to_string() }));
        }
        let (log_start, leo) = (log.log_start_offset(), log.log_end_offset());
        let out_of_range = || BrokerError::OffsetOutOfRange { requested: fetch_offset, log_start, log_end: leo };
        let offset = Offset::from_wire(fetch_offset).ok_or_else(out_of_range)?;
        let isr_change = {
            let mut role = self.lock_role();
            let state = match &mut *role {
                Role::Leader(state) => state,
                Role::Follower { leader, leader_epoch } => return Err(self.not_leader(*leader, *leader_epoch)),
                Role::Idle => return Err(self.not_leader(None, current_leader_epoch)),
            };
            let epoch = state.leader_epoch();
            let (topic, partition) = (self.topic.to_string(), self.index);
            if current_leader_epoch < epoch {
                return Err(BrokerError::FencedLeaderEpoch {
                    topic,
                    partition,
                    current: epoch,
                    got: current_leader_epoch,
                });
            }
            if current_leader_epoch > epoch {
                return Err(BrokerError::UnknownLeaderEpoch {
                    topic,
                    partition,
                    current: epoch,
                    got: current_leader_epoch,
                });
            }
            if let Some(last) = last_fetched_epoch {
                match log.end_offset_for_epoch(last) {
                    Some((e, end)) if e != last || end < offset => {
                        return Ok(ReplicaRead {
                            read: ReadResult { next_offset: offset, ..ReadResult::default() },
                            high_watermark: log.high_watermark(),
                            log_start_offset: log_start,
                            log_end_offset: leo,
                            diverging: Some((e, end)),
                            isr_change: None,
                        });
                    }
                    Some(_) => {}
                    None => {
                        return Err(BrokerError::UnknownLeaderEpoch { topic, partition, current: epoch, got: last });
                    }
                }
            }
            if offset < log_start || offset > leo {
                return Err(out_of_range());
            }
            state.on_fetch(follower, offset, leo, log.high_watermark(), now_ms)
        };
        let hw = self.advance_hw(&mut log);
        // No budget left in the response: the follower's position counted,
        // nothing read (a read always takes at least one batch).
        let read = if max_bytes == 0 {
            ReadResult { next_offset: offset, ..ReadResult::default() }
        } else {
            log.read(offset, max_bytes, leo).map_err(BrokerError::from_storage)?
        };
        drop(log);
        self.publish_hw(hw);
        Ok(ReplicaRead {
            read,
            high_watermark: hw,
            log_start_offset: log_start,
            log_end_offset: leo,
            diverging: None,
            isr_change,
        })
    }
}
