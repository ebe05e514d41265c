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
//!
//! This file holds the state, roles and leadership; `leader.rs` produce and
//! followers' fetches, `follower.rs` the follower's appends and
//! truncations, `read.rs` syncs, fetches and offset lookups, `upkeep.rs`
//! compaction, retention, flushes, checkpoints and closing.

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

pub use leader::Produced;

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

    /// True while this broker leads in `leader_epoch` under a live session:
    /// what the group coordinator checks before answering from its state.
    pub fn leads_live(&self, leader_epoch: u32) -> bool {
        self.leading_epoch() == Some(leader_epoch) && self.session.is_live()
    }

    /// The current role generation (bumped by every role change).
    pub fn role_generation(&self) -> u64 {
        *self.role_changes.borrow()
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

mod follower;
mod idempotence;
mod leader;
mod read;
mod upkeep;

#[cfg(test)]
mod replication_tests;

#[cfg(test)]
mod tests;
