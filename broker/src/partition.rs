//! One partition as the broker serves it: its log, its replication role
//! (leader with the bookkeeping of its followers, or follower), the high
//! watermark that fetches and acks=all wait on, group commit, and a bound
//! on produce bytes in flight.
//!
//! The log sits behind a `std::sync::RwLock` held only for in-memory work
//! (an append is a copy into the mapped segment; a read slices the map);
//! fsyncs run on a blocking thread outside the lock through
//! [`GroupCommit`], so concurrent producers share one fsync. The role sits
//! behind a mutex taken inside the log lock (always in that order), so an
//! append and a role change never interleave: a broker that stopped leading
//! appends nothing more as leader.
//!
//! High watermark: on a leader, the least log end over the ISR (see
//! [`LeaderState`]), where the leader's own end is the durable end with
//! flush `always`: no consumer reads a record a crash could take back. On a
//! follower, the leader's HW capped at its own log end. The `watch` that
//! long polls and acks=all wait on moves back only when a truncation cuts
//! below it.
//!
//! A failed fsync or write-behind fails the partition for good: every
//! produce, fetch and sync answers KAFKA_STORAGE_ERROR until the broker
//! restarts and recovers the log.

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex, MutexGuard, RwLock, RwLockReadGuard, RwLockWriteGuard};
use std::time::Duration;

use tally_proto::batch::RecordBatch;
use tokio::sync::{Semaphore, watch};

use crate::controller::BrokerId;
use crate::error::BrokerError;
use crate::replication::{Assignment, IsrChange, LeaderSettings, LeaderState, ProposalOutcome};
use crate::storage::{
    AppendInfo, CleanOutcome, CleanStats, Cleaner, FlushPolicy, GroupCommit, Log, Offset, ReadResult, StorageError,
    Writeback,
};
use crate::topic::TopicConfig;

/// What this broker is for a partition.
#[derive(Debug)]
enum Role {
    /// Neither (just opened, or offline: no leader anywhere).
    Idle,
    /// The leader, with its followers' progress.
    Leader(LeaderState),
    /// A follower of `leader` in `leader_epoch`.
    Follower { leader: Option<BrokerId>, leader_epoch: u32 },
}

/// Whether this broker may act as a leader right now: its controller session
/// is live and its registration active (see `membership`). Checked at every
/// append as leader, under the log lock, so a request admitted under a valid
/// session that waited (in-flight bytes) past its end appends nothing.
#[derive(Clone)]
pub struct LeaderSession(Arc<dyn Fn() -> bool + Send + Sync>);

impl LeaderSession {
    /// A session that `is_live` reports on; it must be cheap (atomics).
    pub fn new(is_live: impl Fn() -> bool + Send + Sync + 'static) -> LeaderSession {
        LeaderSession(Arc::new(is_live))
    }

    /// Always live: a partition outside a cluster (tools, tests).
    pub fn always() -> LeaderSession {
        LeaderSession::new(|| true)
    }

    fn is_live(&self) -> bool {
        (self.0)()
    }
}

impl std::fmt::Debug for LeaderSession {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_tuple("LeaderSession").field(&self.is_live()).finish()
    }
}

/// A leadership the image gave this broker that it could not take yet
/// (recording the new epoch failed): retried with backoff until it is
/// taken, or until the image gives the partition another role.
#[derive(Debug, Clone)]
struct PendingLeadership {
    me: BrokerId,
    assignment: Assignment,
    settings: LeaderSettings,
    error: String,
    retry_at_ms: u64,
    backoff_ms: u64,
}

/// The first wait before taking a leadership again after a failure; it
/// doubles up to [`LEADERSHIP_RETRY_MAX_MS`].
const LEADERSHIP_RETRY_MS: u64 = 100;
/// The longest wait between attempts to take a leadership.
const LEADERSHIP_RETRY_MAX_MS: u64 = 5_000;

/// One partition's state.
#[derive(Debug)]
pub struct Partition {
    topic: Arc<str>,
    index: u32,
    log: RwLock<Log>,
    role: Mutex<Role>,
    commit: GroupCommit,
    high_watermark: watch::Sender<Offset>,
    /// The log end offset, for the long polls of followers.
    log_end: watch::Sender<Offset>,
    /// Bumped at every role change, so acks=all waiters stop waiting.
    role_changes: watch::Sender<u64>,
    inflight_bytes: Semaphore,
    inflight_limit: u32,
    /// Serializes upkeep (flush, checkpoint, retention) with `close`; true
    /// once closed.
    upkeep: Mutex<bool>,
    /// Cold pages of the last read, dropped once a fetch passes their end.
    read_behind: Mutex<Option<(Offset, Vec<Writeback>)>>,
    /// Whether this broker's session lets it lead now.
    session: LeaderSession,
    /// A leadership not taken yet, to retry.
    pending_leadership: Mutex<Option<PendingLeadership>>,
}

/// What a follower's fetch gets from the leader's partition.
#[derive(Debug)]
pub struct ReplicaRead {
    /// Batches from the fetch offset (empty when the logs diverge).
    pub read: ReadResult,
    /// The leader's high watermark after this fetch counted.
    pub high_watermark: Offset,
    /// The leader's log start.
    pub log_start_offset: Offset,
    /// The leader's log end.
    pub log_end_offset: Offset,
    /// Where the follower's log diverges: the leader's (epoch, end offset).
    pub diverging: Option<(u32, Offset)>,
    /// An ISR expansion for the controller, when the follower qualifies.
    pub isr_change: Option<IsrChange>,
}

impl Partition {
    /// Wraps an opened log. `inflight_limit` bounds produce bytes in flight.
    /// The partition leads nothing until [`Partition::make_leader`].
    pub fn new(topic: Arc<str>, index: u32, log: Log, inflight_limit: u32) -> Partition {
        let (hw, leo) = (log.high_watermark(), log.log_end_offset());
        Partition {
            topic,
            index,
            log: RwLock::new(log),
            role: Mutex::new(Role::Idle),
            commit: GroupCommit::new(),
            high_watermark: watch::channel(hw).0,
            log_end: watch::channel(leo).0,
            role_changes: watch::channel(0).0,
            inflight_bytes: Semaphore::new(inflight_limit as usize),
            inflight_limit,
            read_behind: Mutex::new(None),
            upkeep: Mutex::new(false),
            session: LeaderSession::always(),
            pending_leadership: Mutex::new(None),
        }
    }

    /// The same partition, leading only while `session` is live.
    pub fn with_session(mut self, session: LeaderSession) -> Partition {
        self.session = session;
        self
    }

    /// The leader's own end for the high watermark: its log end, or with
    /// flush `always` its durable end (what a crash cannot take back).
    fn own_end(log: &Log) -> Offset {
        let leo = log.log_end_offset();
        match log.config().flush {
            FlushPolicy::Always => leo.min(log.recovery_point()),
            FlushPolicy::IntervalMs(_) | FlushPolicy::Os => leo,
        }
    }

    fn lock_role(&self) -> MutexGuard<'_, Role> {
        self.role.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// On a leader, moves the log's high watermark up to what the ISR
    /// allows (never down) and returns it. Takes the role lock: call with
    /// the log locked.
    fn advance_hw(&self, log: &mut Log) -> Offset {
        if let Role::Leader(state) = &*self.lock_role()
            && let Some(target) = state.high_watermark(Self::own_end(log))
            && target > log.high_watermark()
        {
            log.set_high_watermark(target);
        }
        log.high_watermark()
    }

    /// Tells long polls and acks=all waiters about `hw` (forward only).
    fn publish_hw(&self, hw: Offset) {
        self.high_watermark.send_if_modified(|current| {
            let moved = hw > *current;
            if moved {
                *current = hw;
            }
            moved
        });
    }

    fn publish_log_end(&self, leo: Offset) {
        self.log_end.send_if_modified(|current| {
            let moved = leo != *current;
            *current = leo;
            moved
        });
    }

    fn not_leader(&self, leader: Option<BrokerId>, leader_epoch: u32) -> BrokerError {
        BrokerError::NotLeaderOrFollower {
            topic: self.topic.to_string(),
            partition: self.index,
            leader: leader.map(|l| l.0),
            leader_epoch,
        }
    }

    /// Makes this broker the partition's leader in `assignment`'s epoch, or,
    /// when it already leads in that epoch, takes the newer committed ISR.
    /// A new epoch is recorded in the log (durably) before any append.
    ///
    /// When recording it fails, the partition serves nothing (idle) and the
    /// leadership is kept to be taken again with backoff
    /// ([`Partition::retry_leadership`]); meanwhile
    /// [`Partition::leadership_failure`] says why.
    pub fn make_leader(
        &self,
        me: BrokerId,
        assignment: Assignment,
        settings: LeaderSettings,
        now_ms: u64,
    ) -> Result<(), BrokerError> {
        let mut log = self.write_log();
        {
            let mut role = self.lock_role();
            if let Role::Leader(state) = &mut *role
                && state.leader_epoch() == assignment.leader_epoch
            {
                state.committed(assignment, settings);
            } else if let Err(e) = log.begin_leader_epoch(assignment.leader_epoch) {
                if !matches!(*role, Role::Idle) {
                    *role = Role::Idle;
                    self.role_changes.send_modify(|n| *n += 1);
                }
                drop(role);
                drop(log);
                let error = BrokerError::Storage(e);
                self.leadership_not_taken(me, assignment, settings, &error, now_ms);
                return Err(error);
            } else {
                let leo = log.log_end_offset();
                *role = Role::Leader(LeaderState::new(me, assignment, settings, leo, now_ms));
                self.role_changes.send_modify(|n| *n += 1);
            }
        }
        let hw = self.advance_hw(&mut log);
        drop(log);
        *self.lock_pending_leadership() = None;
        self.publish_hw(hw);
        Ok(())
    }

    fn lock_pending_leadership(&self) -> MutexGuard<'_, Option<PendingLeadership>> {
        self.pending_leadership.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Keeps a leadership that could not be taken, to retry it later.
    fn leadership_not_taken(
        &self,
        me: BrokerId,
        assignment: Assignment,
        settings: LeaderSettings,
        error: &BrokerError,
        now_ms: u64,
    ) {
        let mut pending = self.lock_pending_leadership();
        let backoff_ms = match &*pending {
            Some(p) if p.assignment.leader_epoch == assignment.leader_epoch => {
                (p.backoff_ms * 2).min(LEADERSHIP_RETRY_MAX_MS)
            }
            _ => LEADERSHIP_RETRY_MS,
        };
        tracing::error!(topic = %self.topic, partition = self.index, leader_epoch = assignment.leader_epoch, %error, retry_in_ms = backoff_ms, "cannot take the leadership; serving nothing until it is taken");
        *pending = Some(PendingLeadership {
            me,
            assignment,
            settings,
            error: error.to_string(),
            retry_at_ms: now_ms.saturating_add(backoff_ms),
            backoff_ms,
        });
    }

    /// Takes a leadership that could not be taken before, when its retry is
    /// due: `None` when nothing was due.
    pub fn retry_leadership(&self, now_ms: u64) -> Option<Result<(), BrokerError>> {
        let due = self.lock_pending_leadership().as_ref().filter(|p| now_ms >= p.retry_at_ms).cloned()?;
        Some(self.make_leader(due.me, due.assignment, due.settings, now_ms))
    }

    /// Why this broker does not yet lead a partition the image says it
    /// leads (recording the epoch failed; it is being retried).
    pub fn leadership_failure(&self) -> Option<String> {
        self.lock_pending_leadership().as_ref().map(|p| p.error.clone())
    }

    /// Makes this broker a follower of `leader` in `leader_epoch` (no
    /// leader: the partition is offline). Waiting acks=all produces end.
    pub fn make_follower(&self, leader: Option<BrokerId>, leader_epoch: u32) {
        let _log = self.write_log();
        let mut role = self.lock_role();
        let same =
            matches!(&*role, Role::Follower { leader: l, leader_epoch: e } if *l == leader && *e == leader_epoch);
        if !same {
            *role = Role::Follower { leader, leader_epoch };
            self.role_changes.send_modify(|n| *n += 1);
        }
        drop(role);
        *self.lock_pending_leadership() = None;
    }

    /// The leader epoch this broker leads in, if it leads.
    pub fn leading_epoch(&self) -> Option<u32> {
        match &*self.lock_role() {
            Role::Leader(state) => Some(state.leader_epoch()),
            _ => None,
        }
    }

    /// Each follower's lag in offsets behind the log end (leader only).
    pub fn follower_lags(&self) -> Vec<(BrokerId, Option<u64>)> {
        let leo = self.read_log().log_end_offset();
        match &*self.lock_role() {
            Role::Leader(state) => state.lags(leo),
            _ => Vec::new(),
        }
    }

    /// Time passed: an ISR shrink to propose, when a member lags.
    pub fn isr_tick(&self, now_ms: u64) -> Option<IsrChange> {
        match &mut *self.lock_role() {
            Role::Leader(state) => state.tick(now_ms),
            _ => None,
        }
    }

    /// `change` did not come back committed; `outcome` says what is known
    /// of it (see [`LeaderState::proposal_failed`]).
    pub fn isr_proposal_failed(&self, change: &IsrChange, outcome: ProposalOutcome, now_ms: u64) {
        if let Role::Leader(state) = &mut *self.lock_role() {
            state.proposal_failed(change, outcome, now_ms);
        }
    }

    /// The replicas the latest image shows fenced (leader only): they may not
    /// join the ISR.
    pub fn set_fenced_replicas(&self, fenced: BTreeSet<BrokerId>) {
        if let Role::Leader(state) = &mut *self.lock_role() {
            state.set_fenced(fenced);
        }
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
            None => Ok(appended),
            Some(e) => Err(BrokerError::PartlyAppended { appended, batches: count, source: Box::new(e) }),
        }
    }

    /// Refuses unless this broker leads in `leader_epoch` under a live
    /// session (and, for acks=all, the committed ISR is large enough). Call with the log lock
    /// held, so no role change slips in before the append.
    fn check_leads(&self, leader_epoch: u32, acks_all: bool) -> Result<(), BrokerError> {
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
    fn check_still_leads(&self, leader_epoch: u32, role_generation: u64) -> Result<(), BrokerError> {
        if *self.role_changes.borrow() == role_generation {
            return Ok(());
        }
        Err(self.not_leading_now(leader_epoch))
    }

    /// NOT_LEADER_OR_FOLLOWER (or LEADER_NOT_AVAILABLE) for a request of
    /// `leader_epoch`, naming the leader this broker knows of now.
    fn not_leading_now(&self, leader_epoch: u32) -> BrokerError {
        match &*self.lock_role() {
            Role::Leader(state) => self.not_leader(None, state.leader_epoch()),
            Role::Follower { leader, leader_epoch } => self.not_leader(*leader, *leader_epoch),
            Role::Idle => self.not_leader(None, leader_epoch),
        }
    }

    /// Waits until the high watermark reaches `end` while this broker still
    /// leads in `leader_epoch`, for at most `timeout`.
    async fn wait_replicated(
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
    /// there up to the log end.
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
        let read = log.read(offset, max_bytes, leo).map_err(BrokerError::from_storage)?;
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

    /// Where a follower fetches next: its log end and the epoch of its last
    /// batch.
    pub fn fetch_position(&self) -> (Offset, Option<u32>) {
        let log = self.read_log();
        (log.log_end_offset(), log.leader_epochs().latest_epoch())
    }

    /// Checks that this broker follows in `leader_epoch`.
    fn check_follows(&self, leader_epoch: u32) -> Result<(), BrokerError> {
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
    fn truncation_failed(&self, log: &mut Log, e: StorageError) -> BrokerError {
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
                    if let Err(e) = plan.execute() {
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

    /// Applies new topic settings to the log.
    pub fn set_config(&self, config: &TopicConfig) -> Result<(), BrokerError> {
        self.write_log().set_config(config.log.clone()).map_err(BrokerError::Storage)
    }

    /// One pass of log compaction if this partition's log is compacted and
    /// due (`force`: whenever anything is dirty). The log's lock is held
    /// only to plan and to install each cleaned group; a truncation or
    /// retention meanwhile makes the pass stop without installing more.
    pub fn clean(&self, cleaner: &mut Cleaner, force: bool) -> Result<Option<CleanOutcome>, BrokerError> {
        if self.upkeep().is_none() {
            return Ok(None); // closed
        }
        cleaner.clean_if_due(&self.log, force).map_err(BrokerError::Storage)
    }

    /// How much of this compacted partition is cleaned, and whether it is
    /// due; `None` unless compacted.
    pub fn cleaning_due(&self) -> Option<(CleanStats, bool)> {
        self.read_log().cleaning_due()
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
        if self.read_log().failure().is_some() {
            return Ok(());
        }
        // The same group commit as producers' syncs: never alongside one,
        // and a failure here fails every later one (and the log) before
        // another fsync of these files can run.
        self.commit
            .sync_now(|| {
                let plan = {
                    let log = self.read_log();
                    if let Some(reason) = log.failure() {
                        return Err(StorageError::LogFailed { reason: reason.to_string() });
                    }
                    log.sync_plan_closed()
                };
                if let Err(e) = plan.execute() {
                    self.fail(&e);
                    return Err(e);
                }
                self.write_log().mark_durable(&plan);
                Ok(())
            })
            .map_err(BrokerError::Storage)?;
        let snapshot = self.read_log().checkpoint_snapshot();
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
#[path = "partition_replication_tests.rs"]
mod replication_tests;

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
        let p = Arc::new(Partition::new(Arc::from("t"), 0, log, 1 << 20));
        let alone =
            Assignment { replicas: vec![BrokerId(1)], isr: vec![BrokerId(1)], leader_epoch: 0, partition_epoch: 0 };
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
        let alone =
            Assignment { replicas: vec![BrokerId(1)], isr: vec![BrokerId(1)], leader_epoch: 3, partition_epoch: 3 };
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
}
