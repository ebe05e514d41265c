//! A [`Consumer`](crate::Consumer)'s membership in a consumer group (Kafka
//! 4's protocol, KIP-848): a background task heartbeats the coordinator with
//! the subscription and the partitions the consumer owns, and applies what
//! it answers. A partition taken away is revoked first: nothing more of it
//! is handed out, the task waits until the application asks for records
//! again (so it holds none of that partition: Kafka runs its revocation
//! inside `poll` for the same reason), then the listener hears of it, its
//! position is committed (with auto-commit), the consumer drops it, and only
//! then does a heartbeat report it released. So the coordinator never hands
//! it to another member while this one may still work on it. A partition
//! given is started at its committed offset (or `auto_offset_reset`).
//!
//! Auto-commit commits what the application is done with: the records
//! handed out before its latest `poll` (or stream item request), never the
//! ones it may still be processing.
//!
//! Invariants:
//! - Commits go out one at a time, in order (`commit_order`), so a later
//!   commit is never overtaken by an earlier one.
//! - The member state lock is never held across an `.await`.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use tally_proto::ErrorCode;
use tally_proto::v1::{self as pb};
use tokio::sync::Notify;

use crate::consumer::{Inner, OffsetReset, SeekTo};
use crate::error::{Error, Result};
use crate::group::{CoordinatorClient, TopicPartitions, check, from_wire, to_wire};

/// A change of the partitions a group member owns.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RebalanceEvent {
    /// These partitions were given to this consumer; reading starts at their
    /// committed offsets.
    Assigned(Vec<(String, u32)>),
    /// These partitions are being taken away: called once the application
    /// asked for records again (it holds none of theirs), before they are
    /// released and, with auto-commit, before their positions are committed.
    Revoked(Vec<(String, u32)>),
    /// The coordinator removed this member (its session or rebalance timeout
    /// passed): these partitions may already belong to another member. The
    /// consumer rejoins.
    Lost(Vec<(String, u32)>),
}

/// The application's rebalance callback.
pub type RebalanceListener = Arc<dyn Fn(&RebalanceEvent) + Send + Sync>;

#[derive(Debug, Default)]
pub(crate) struct MemberInfo {
    pub(crate) member_id: String,
    pub(crate) epoch: i32,
    pub(crate) owned: TopicPartitions,
    pub(crate) topics: Vec<String>,
    pub(crate) regex: String,
    /// Why the member left on its own (poll interval passed); it rejoins at
    /// the next poll.
    pub(crate) left: Option<String>,
    /// The last offset committed per partition by this consumer.
    pub(crate) committed: BTreeMap<(String, u32), i64>,
}

/// What the consumer and its membership task share.
pub(crate) struct GroupShared {
    pub(crate) coordinator: CoordinatorClient,
    member: Mutex<MemberInfo>,
    /// Wakes the task: subscription changed, closing, or polled after leaving.
    pub(crate) wake: Notify,
    /// The application asked for records while a revocation waited.
    pub(crate) polled: Notify,
    commit_order: tokio::sync::Mutex<()>,
    listener: Mutex<Option<RebalanceListener>>,
    pub(crate) closing: AtomicBool,
}

impl std::fmt::Debug for GroupShared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GroupShared").field("group", &self.coordinator.group()).finish_non_exhaustive()
    }
}

fn new_member_id() -> String {
    use std::hash::{BuildHasher, Hasher};
    let mut out = String::with_capacity(32);
    for i in 0..2u64 {
        let mut h = std::collections::hash_map::RandomState::new().build_hasher();
        h.write_u64(i);
        h.write_u128(std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos()));
        out.push_str(&format!("{:016x}", h.finish()));
    }
    out
}

fn pairs(a: &TopicPartitions) -> Vec<(String, u32)> {
    a.iter().flat_map(|(t, ps)| ps.iter().map(move |p| (t.clone(), *p))).collect()
}

fn minus(a: &TopicPartitions, b: &TopicPartitions) -> TopicPartitions {
    let mut out = TopicPartitions::new();
    for (t, ps) in a {
        for p in ps {
            if !b.get(t).is_some_and(|s| s.contains(p)) {
                out.entry(t.clone()).or_default().insert(*p);
            }
        }
    }
    out
}

impl GroupShared {
    pub(crate) fn new(coordinator: CoordinatorClient) -> GroupShared {
        GroupShared {
            coordinator,
            member: Mutex::new(MemberInfo { member_id: new_member_id(), ..MemberInfo::default() }),
            wake: Notify::new(),
            polled: Notify::new(),
            commit_order: tokio::sync::Mutex::new(()),
            listener: Mutex::new(None),
            closing: AtomicBool::new(false),
        }
    }

    pub(crate) fn member(&self) -> MutexGuard<'_, MemberInfo> {
        self.member.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    pub(crate) fn set_listener(&self, listener: RebalanceListener) {
        *self.listener.lock().unwrap_or_else(std::sync::PoisonError::into_inner) = Some(listener);
    }

    fn notify(&self, event: RebalanceEvent) {
        let listener = self.listener.lock().unwrap_or_else(std::sync::PoisonError::into_inner).clone();
        if let Some(l) = listener {
            l(&event);
        }
    }

    /// Commits `offsets` as the current member (in order with every other
    /// commit of this consumer); answers once replicated.
    pub(crate) async fn commit(&self, offsets: &BTreeMap<(String, u32), i64>) -> Result<()> {
        if offsets.is_empty() {
            return Ok(());
        }
        let _order = self.commit_order.lock().await;
        let (member_id, epoch) = {
            let m = self.member();
            (m.member_id.clone(), m.epoch)
        };
        if epoch <= 0 {
            return Err(Error::InvalidArgument(format!(
                "not a member of group `{}` right now (joining or rejoining); nothing committed",
                self.coordinator.group()
            )));
        }
        self.coordinator.commit(&member_id, epoch, offsets).await?;
        let mut m = self.member();
        for (k, v) in offsets {
            m.committed.insert(k.clone(), *v);
        }
        Ok(())
    }
}

/// The positions of `partitions` that moved past what this consumer last
/// committed: what was handed out, or (`done_only`) what the application is
/// done with (handed out before its latest poll).
fn uncommitted(
    inner: &Inner,
    group: &GroupShared,
    partitions: &TopicPartitions,
    done_only: bool,
) -> BTreeMap<(String, u32), i64> {
    let positions = inner.positions(partitions, done_only);
    let m = group.member();
    positions.into_iter().filter(|(k, v)| m.committed.get(k).is_none_or(|c| c != v)).collect()
}

async fn commit_positions(inner: &Inner, group: &GroupShared, partitions: &TopicPartitions, done_only: bool) {
    let offsets = uncommitted(inner, group, partitions, done_only);
    if let Err(e) = group.commit(&offsets).await {
        tracing::warn!(group = %group.coordinator.group(), error = %e, "auto-commit failed");
    }
}

/// Heartbeats once. `leave` sends epoch -1.
async fn heartbeat(
    inner: &Inner,
    group: &GroupShared,
    leave: bool,
    max_wait: Duration,
) -> Result<pb::ConsumerGroupHeartbeatResponse> {
    let config = inner.config();
    let request = {
        let m = group.member();
        pb::ConsumerGroupHeartbeatRequest {
            group_id: group.coordinator.group().to_string(),
            member_id: m.member_id.clone(),
            member_epoch: if leave { -1 } else { m.epoch },
            rebalance_timeout_ms: u32::try_from(config.max_poll_interval.as_millis()).unwrap_or(u32::MAX),
            subscribed_topic_names: m.topics.clone(),
            subscribed_topic_regex: m.regex.clone(),
            server_assignor: config.group_assignor.clone().unwrap_or_default(),
            owned_partitions: to_wire(&m.owned),
            session_timeout_ms: config.session_timeout.map_or(0, |d| u32::try_from(d.as_millis()).unwrap_or(u32::MAX)),
            client_id: "tally-client".into(),
            client_host: String::new(),
            max_wait_ms: u32::try_from(max_wait.as_millis()).unwrap_or(u32::MAX),
        }
    };
    let patience = inner.client().request_timeout() + max_wait;
    let group_id = group.coordinator.group().to_string();
    group
        .coordinator
        .call(patience, |mut rpc| {
            let request = request.clone();
            let group_id = group_id.clone();
            async move {
                let r = rpc.consumer_group_heartbeat(request).await?.into_inner();
                check(r.error_code, r.error_message.clone(), &group_id)?;
                Ok(r)
            }
        })
        .await
}

/// Gives up every owned partition (stops reading them) and reports `event`.
fn drop_all(inner: &Inner, group: &GroupShared, lost: bool) {
    let owned = std::mem::take(&mut group.member().owned);
    if owned.is_empty() {
        return;
    }
    let list = pairs(&owned);
    group.notify(if lost { RebalanceEvent::Lost(list.clone()) } else { RebalanceEvent::Revoked(list.clone()) });
    for (t, p) in list {
        inner.stop_partition(&t, p);
    }
}

/// A revocation in progress: its partitions are no longer handed out, and
/// are released once the application asks for records again.
struct PendingRevoke {
    partitions: TopicPartitions,
    /// The poll cycle it began in.
    mark: u64,
    /// Past it, the partitions go without a commit (the coordinator is about
    /// to remove this member anyway).
    deadline: tokio::time::Instant,
}

/// Starts revoking what the coordinator took away.
fn begin_revoke(inner: &Inner, revoked: TopicPartitions) -> PendingRevoke {
    let mark = inner.begin_revoke(&pairs(&revoked));
    PendingRevoke {
        partitions: revoked,
        mark,
        deadline: tokio::time::Instant::now() + inner.config().max_poll_interval,
    }
}

/// Finishes a revocation whose partitions the application no longer holds:
/// the listener, the commit (with auto-commit), then they are dropped.
/// `in_time` false: the member is being removed or left for want of a
/// poll, so the partitions may already be another member's (`Lost`, no
/// commit).
async fn finish_revoke(inner: &Inner, group: &GroupShared, revoke: PendingRevoke, in_time: bool) {
    let list = pairs(&revoke.partitions);
    group.notify(if in_time { RebalanceEvent::Revoked(list.clone()) } else { RebalanceEvent::Lost(list.clone()) });
    if in_time && inner.config().enable_auto_commit {
        commit_positions(inner, group, &revoke.partitions, true).await;
    }
    for (t, p) in list {
        inner.stop_partition(&t, p);
    }
    inner.end_revoke();
    let mut m = group.member();
    m.owned = minus(&m.owned, &revoke.partitions);
}

/// Starts the partitions the coordinator added, each at its committed offset
/// (or `auto_offset_reset`). A partition that cannot start now (its offsets
/// unreadable, its topic's new partitions not in the cached metadata yet) is
/// left for the next heartbeat's answer; returns false then.
async fn start_added(inner: &Inner, group: &GroupShared, added: TopicPartitions) -> bool {
    let committed = match group.coordinator.fetch_offsets(&added).await {
        Ok(c) => c,
        Err(e) => {
            tracing::warn!(group = %group.coordinator.group(), error = %e, "cannot read committed offsets; retrying");
            return false;
        }
    };
    let mut all_started = true;
    let mut started = TopicPartitions::new();
    for (t, p) in pairs(&added) {
        let from = match committed.get(&(t.clone(), p)).map(|c| c.offset).filter(|o| *o >= 0) {
            Some(o) => SeekTo::Offset(o),
            None => match inner.config().auto_offset_reset {
                OffsetReset::Earliest => SeekTo::Beginning,
                OffsetReset::Latest => SeekTo::End,
                OffsetReset::Error => {
                    inner.report(Error::Broker {
                        code: ErrorCode::OffsetOutOfRange,
                        message: format!(
                            "group `{}` has no committed offset for {t}/{p} and auto_offset_reset is Error",
                            group.coordinator.group()
                        ),
                        topic: t.clone(),
                        partition: Some(p),
                    });
                    // Owned (the coordinator gave it) but not read.
                    started.entry(t.clone()).or_default().insert(p);
                    continue;
                }
            },
        };
        match inner.start_partition(&t, p, from).await {
            Ok(()) => {
                started.entry(t.clone()).or_default().insert(p);
            }
            Err(e) => {
                tracing::warn!(topic = %t, partition = p, error = %e, "cannot start an assigned partition; retrying");
                // A partition added to the topic since its metadata was cached.
                inner.client().invalidate(&t);
                all_started = false;
            }
        }
    }
    {
        let mut m = group.member();
        for (t, ps) in &started {
            m.owned.entry(t.clone()).or_default().extend(ps);
        }
        for ((t, p), c) in committed {
            if c.offset >= 0 {
                m.committed.insert((t, p), c.offset);
            }
        }
    }
    if !started.is_empty() {
        group.notify(RebalanceEvent::Assigned(pairs(&started)));
    }
    all_started
}

/// The membership task: runs until the consumer closes (then commits, with
/// auto-commit, and leaves the group) or is dropped.
///
/// While nothing changes, each heartbeat waits at the coordinator for up to
/// the heartbeat interval (Tally's long poll), so a rebalance reaches the
/// member at once; while a revocation waits for the application, heartbeats
/// go at the interval, carrying the partitions not yet released.
pub(crate) async fn run(inner: Arc<Inner>, group: Arc<GroupShared>) {
    let config = inner.config().clone();
    let mut interval = Duration::from_millis(500);
    let mut backoff = Duration::from_millis(100);
    let mut next_commit = Instant::now() + config.auto_commit_interval;
    let mut last_ok = Instant::now();
    let session = config.session_timeout.unwrap_or(Duration::from_secs(45));
    let mut revoking: Option<PendingRevoke> = None;
    // No long poll before the first answer: a join must be answered at once.
    let mut long_poll = false;
    loop {
        let woken = group.wake.notified();
        tokio::pin!(woken);
        woken.as_mut().enable();
        if group.closing.load(Ordering::Acquire) {
            break;
        }
        // A consumer that stopped polling leaves, so its partitions move on.
        let idle = inner.since_last_poll();
        if group.member().left.is_some() {
            // Back (it polled since, or waits inside poll): rejoin.
            if idle.is_none_or(|d| d < config.max_poll_interval) {
                group.member().left = None;
                long_poll = false;
                continue;
            }
            woken.await;
            continue;
        }
        if idle.is_some_and(|d| d > config.max_poll_interval) {
            let reason = format!(
                "left group `{}`: poll was not called within max_poll_interval ({:?}); rejoining at the next poll",
                group.coordinator.group(),
                config.max_poll_interval
            );
            tracing::warn!("{reason}");
            if let Some(r) = revoking.take() {
                finish_revoke(&inner, &group, r, false).await;
            }
            if config.enable_auto_commit {
                // Only what it finished: it is stuck on the rest.
                let owned = group.member().owned.clone();
                commit_positions(&inner, &group, &owned, true).await;
            }
            drop_all(&inner, &group, false);
            let _ = heartbeat(&inner, &group, true, Duration::ZERO).await;
            {
                let mut m = group.member();
                m.epoch = 0;
                m.left = Some(reason.clone());
            }
            inner.report(Error::InvalidArgument(reason));
            continue;
        }
        // A revocation the application has let go of is finished first, and
        // reported at once.
        if let Some(r) = revoking.take() {
            let ready = inner.revoke_ready(r.mark);
            let late = tokio::time::Instant::now() >= r.deadline;
            if ready || late {
                finish_revoke(&inner, &group, r, ready).await;
            } else {
                revoking = Some(r);
            }
        }
        // Parked at most half a request timeout, so the call never times out.
        let longest = inner.client().request_timeout() / 2;
        let wait = if long_poll && revoking.is_none() { interval.min(longest) } else { Duration::ZERO };
        let call = heartbeat(&inner, &group, false, wait);
        tokio::pin!(call);
        let answer = loop {
            tokio::select! {
                answer = &mut call => break Some(answer),
                // Auto-commit keeps its pace while the heartbeat is parked.
                () = tokio::time::sleep_until(tokio::time::Instant::from_std(next_commit)), if config.enable_auto_commit => {
                    let owned = group.member().owned.clone();
                    commit_positions(&inner, &group, &owned, true).await;
                    next_commit = Instant::now() + config.auto_commit_interval;
                }
                () = &mut woken => {
                    // Closing drops the parked heartbeat (close refreshes the
                    // epoch before it commits); a new subscription goes
                    // with the next one.
                    if group.closing.load(Ordering::Acquire) {
                        break None;
                    }
                    woken.set(group.wake.notified());
                    woken.as_mut().enable();
                }
            }
        };
        let Some(answer) = answer else { continue };
        match answer {
            Ok(r) => {
                backoff = Duration::from_millis(100);
                last_ok = Instant::now();
                interval = Duration::from_millis(u64::from(r.heartbeat_interval_ms.max(50)));
                long_poll = true;
                group.member().epoch = r.member_epoch;
                let assigned = from_wire(r.assignment);
                let owned = group.member().owned.clone();
                let taken = minus(&owned, &assigned);
                let pending = revoking.as_ref().map(|r| r.partitions.clone()).unwrap_or_default();
                let newly_taken = minus(&taken, &pending);
                if !newly_taken.is_empty() {
                    match &mut revoking {
                        Some(r) => {
                            r.mark = inner.begin_revoke(&pairs(&newly_taken));
                            for (t, ps) in newly_taken {
                                r.partitions.entry(t).or_default().extend(ps);
                            }
                        }
                        None => revoking = Some(begin_revoke(&inner, newly_taken)),
                    }
                    continue;
                }
                let added = minus(&assigned, &owned);
                if !added.is_empty() && !start_added(&inner, &group, added).await {
                    // Not parked next time (the coordinator parks only a
                    // member that owns its assignment): pace the retries.
                    tokio::select! {
                        () = tokio::time::sleep(backoff) => {}
                        () = &mut woken => {}
                    }
                    backoff = (backoff * 2).min(interval.max(Duration::from_millis(100)));
                    continue;
                }
            }
            Err(e) if matches!(e.code(), Some(ErrorCode::FencedMemberEpoch | ErrorCode::UnknownMemberId)) => {
                tracing::warn!(group = %group.coordinator.group(), error = %e, "fenced by the coordinator; rejoining");
                if let Some(r) = revoking.take() {
                    finish_revoke(&inner, &group, r, false).await;
                }
                drop_all(&inner, &group, true);
                if e.code() == Some(ErrorCode::FencedMemberEpoch) {
                    // Leave first, so the rejoin starts from nothing instead
                    // of being fenced again as a late join.
                    let _ = heartbeat(&inner, &group, true, Duration::ZERO).await;
                }
                group.member().epoch = 0;
                long_poll = false;
                continue;
            }
            Err(e) if e.is_retriable() => {
                tracing::debug!(group = %group.coordinator.group(), error = %e, "heartbeat failed; retrying");
                long_poll = false;
                if last_ok.elapsed() > session && !group.member().owned.is_empty() {
                    // The coordinator has given them away by now.
                    tracing::warn!(group = %group.coordinator.group(), "no heartbeat answered for a session; partitions lost");
                    if let Some(r) = revoking.take() {
                        finish_revoke(&inner, &group, r, false).await;
                    }
                    drop_all(&inner, &group, true);
                    group.member().epoch = 0;
                }
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(interval.max(Duration::from_millis(100)));
                continue;
            }
            Err(e) => {
                tracing::warn!(group = %group.coordinator.group(), error = %e, "heartbeat refused");
                inner.report(e);
                long_poll = false;
                tokio::time::sleep(interval.max(Duration::from_secs(1))).await;
                continue;
            }
        }
        if config.enable_auto_commit && Instant::now() >= next_commit {
            let owned = group.member().owned.clone();
            commit_positions(&inner, &group, &owned, true).await;
            next_commit = Instant::now() + config.auto_commit_interval;
        }
        if revoking.is_some() {
            // Until the application asks for records again (or the interval
            // passes: the member heartbeats meanwhile).
            let polled = group.polled.notified();
            tokio::pin!(polled);
            polled.as_mut().enable();
            if !revoking.as_ref().is_some_and(|r| inner.revoke_ready(r.mark)) {
                tokio::select! {
                    () = &mut polled => {}
                    () = &mut woken => {}
                    () = tokio::time::sleep(interval) => {}
                }
            }
        }
    }
    // Closing (the application is done with what it was handed): commit
    // it, then leave (also when a join's answer never came).
    if let Some(r) = revoking.take() {
        finish_revoke(&inner, &group, r, true).await;
    }
    if config.enable_auto_commit && group.member().epoch > 0 {
        // A heartbeat dropped on the way out may have moved the epoch: learn
        // it, so the commit is not refused as stale.
        if let Ok(r) = heartbeat(&inner, &group, false, Duration::ZERO).await {
            group.member().epoch = r.member_epoch;
        }
        let owned = group.member().owned.clone();
        commit_positions(&inner, &group, &owned, false).await;
    }
    drop_all(&inner, &group, false);
    if let Err(e) = heartbeat(&inner, &group, true, Duration::ZERO).await {
        tracing::warn!(group = %group.coordinator.group(), error = %e, "leaving the group failed; its session will end it");
    }
    group.member().epoch = -1;
}
