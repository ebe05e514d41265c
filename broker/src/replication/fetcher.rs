//! A follower's fetchers: one task per leader broker, fetching every
//! partition this broker follows from that leader in one long-polling
//! request stream, appending what comes back as the same bytes (CRC
//! checked), and truncating where the leader says the logs diverge.
//!
//! Each fetcher keeps a fetch session with its leader (KIP-227, see
//! `replication.proto`): the first request lists every partition and opens
//! the session; later ones list only partitions that are new or whose
//! position (log end, last epoch), leader epoch or topic id moved, and the
//! partitions that leave ([`FollowerSession`]). Answers are matched to
//! partitions by (topic, partition), and applied only if they were served
//! from where the log stands. A request whose fate is unknown (a transport
//! error, a timeout, a call dropped because the partitions changed) or a
//! session error drops the session, and the next request opens a new one.
//!
//! What to follow comes from the metadata image ([`Fetchers::update`]); a
//! task whose leader no longer leads anything here, or moved to another
//! address, is stopped (a new task opens a new session). A partition whose
//! fetch fails (a stale epoch, a storage error) pauses for a backoff while
//! the others go on. Every buffer is bounded: one request in flight per
//! leader, `max_bytes` per response.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tally_proto::ErrorCode;
use tally_proto::batch::{RecordBatch, split_batches};
use tally_proto::connection::Connection as Channel;
use tally_proto::internal::v1 as pb;
use tally_proto::internal::v1::replication_client::ReplicationClient;
use tokio::sync::watch;
use tokio::time::Instant;
use tracing::Instrument;

use crate::controller::BrokerId;
use crate::partition::Partition;
use crate::replication::fetch_session::{FIRST_INCREMENTAL_EPOCH, NEW_SESSION_EPOCH, next_epoch};
use crate::storage::Offset;

/// A partition this broker follows.
#[derive(Debug, Clone)]
pub struct Follow {
    /// Topic name.
    pub topic: Arc<str>,
    /// The topic's stable id.
    pub topic_id: Arc<str>,
    /// The partition, in the follower role.
    pub partition: Arc<Partition>,
    /// The leader epoch it follows in.
    pub leader_epoch: u32,
}

/// How fetchers fetch.
#[derive(Debug, Clone)]
pub struct FetcherSettings {
    /// This broker's id, sent as the replica id.
    pub replica_id: BrokerId,
    /// How long the leader may hold a fetch that finds nothing new.
    pub max_wait_ms: u32,
    /// Bytes per response asked for (a response may carry one batch more).
    pub max_bytes: u32,
    /// The largest batch a leader accepts (its `max_request_bytes`): what a
    /// response may carry past `max_bytes`.
    pub max_batch_bytes: usize,
    /// First wait after a failure; doubles up to `backoff_max`.
    pub backoff: Duration,
    /// Longest wait after failures.
    pub backoff_max: Duration,
    /// Local address of connections to leaders, when set.
    pub source: Option<std::net::IpAddr>,
}

#[derive(Debug)]
struct Fetcher {
    address: String,
    follows: watch::Sender<Arc<Vec<Follow>>>,
    task: tokio::task::JoinHandle<()>,
}

/// The fetcher tasks of one broker.
#[derive(Debug)]
pub struct Fetchers {
    settings: FetcherSettings,
    fetchers: Mutex<BTreeMap<BrokerId, Fetcher>>,
}

impl Fetchers {
    /// No fetchers yet.
    pub fn new(settings: FetcherSettings) -> Self {
        Fetchers { settings, fetchers: Mutex::new(BTreeMap::new()) }
    }

    /// Follows `wanted`: for each leader broker, its address and the
    /// partitions to fetch from it. Starts, retargets and stops tasks to
    /// match. Needs a tokio runtime (it may run on a blocking thread).
    pub fn update(&self, wanted: BTreeMap<BrokerId, (String, Vec<Follow>)>) {
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            tracing::warn!("no runtime: replica fetchers not started");
            return;
        };
        let mut fetchers = self.fetchers.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        fetchers.retain(|leader, f| {
            let keep = wanted.get(leader).is_some_and(|(address, _)| *address == f.address) && !f.task.is_finished();
            if !keep {
                f.task.abort();
            }
            keep
        });
        for (leader, (address, follows)) in wanted {
            match fetchers.get(&leader) {
                Some(f) => {
                    f.follows.send_replace(Arc::new(follows));
                }
                None => {
                    let (tx, rx) = watch::channel(Arc::new(follows));
                    let span = tracing::info_span!("replica_fetcher", leader = leader.0, %address);
                    let task = runtime.spawn(run(leader, address.clone(), rx, self.settings.clone()).instrument(span));
                    fetchers.insert(leader, Fetcher { address, follows: tx, task });
                }
            }
        }
    }

    /// Stops every fetcher.
    pub fn shutdown(&self) {
        let mut fetchers = self.fetchers.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        for (_, f) in std::mem::take(&mut *fetchers) {
            f.task.abort();
        }
    }
}

impl Drop for Fetchers {
    fn drop(&mut self) {
        self.shutdown();
    }
}

type Key = (Arc<str>, u32);

fn key(f: &Follow) -> Key {
    (f.topic.clone(), f.partition.index())
}

/// What the leader's session holds for one partition: the position this
/// follower last sent for it.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Sent {
    topic_id: Arc<str>,
    fetch_offset: i64,
    current_leader_epoch: u32,
    /// -1 when the log is empty.
    last_fetched_epoch: i32,
}

impl Sent {
    /// Where `f` fetches now.
    fn of(f: &Follow) -> Sent {
        let (log_end, last_epoch) = f.partition.fetch_position();
        Sent {
            topic_id: f.topic_id.clone(),
            fetch_offset: log_end.to_wire(),
            current_leader_epoch: f.leader_epoch,
            last_fetched_epoch: wire_epoch(last_epoch),
        }
    }
}

fn wire_epoch(epoch: Option<u32>) -> i32 {
    epoch.and_then(|e| i32::try_from(e).ok()).unwrap_or(-1)
}

/// What one request told the leader, kept until its answer arrives (then
/// it becomes what the session holds).
#[derive(Debug)]
struct Pending {
    session_id: u32,
    /// [`NEW_SESSION_EPOCH`] for a full fetch that opens a session.
    epoch: i32,
    listed: Vec<(Key, Sent)>,
    forgotten: Vec<(Key, Arc<str>)>,
}

/// A follower's half of its fetch session with one leader: the session's id
/// and next epoch, and what the leader holds for each partition. Sans-IO:
/// positions come in, the partitions of the next request go out.
///
/// A partition paused after an error is forgotten by the next request (it
/// leaves the session, as paused partitions were left out of sessionless
/// requests) and added again, with its position, when its pause ends: the
/// leader does not read it, or count it in sync, while this follower does
/// not append it. (When every partition is paused no request goes out, and
/// none needs forgetting: the leader reads nothing without a request.)
#[derive(Debug, Default)]
struct FollowerSession {
    /// (id, epoch of the next request); `None`: the next request opens one.
    open: Option<(u32, i32)>,
    sent: HashMap<Key, Sent>,
}

impl FollowerSession {
    /// The partitions the next request carries: all of `active` when no
    /// session is open (a full fetch that opens one), else those that are
    /// new or moved since last sent, and, as forgotten, those sent before
    /// that are no longer active.
    fn next(&self, active: impl Iterator<Item = (Key, Sent)>, is_active: impl Fn(&Key) -> bool) -> Pending {
        let Some((session_id, epoch)) = self.open else {
            return Pending {
                session_id: 0,
                epoch: NEW_SESSION_EPOCH,
                listed: active.collect(),
                forgotten: Vec::new(),
            };
        };
        let mut listed = Vec::new();
        let mut still = 0usize;
        for (k, now) in active {
            match self.sent.get(&k) {
                Some(sent) => {
                    still += 1;
                    if *sent != now {
                        listed.push((k, now));
                    }
                }
                None => listed.push((k, now)),
            }
        }
        let mut forgotten = Vec::new();
        if still < self.sent.len() {
            forgotten.extend(
                self.sent.iter().filter(|(k, _)| !is_active(k)).map(|(k, sent)| (k.clone(), sent.topic_id.clone())),
            );
        }
        Pending { session_id, epoch, listed, forgotten }
    }

    /// The next incremental request when only `candidates` may have moved
    /// since the last one: each with where it stands now, or `None` when it
    /// is no longer active. `None` when no session is open (the next request
    /// is a full fetch: [`FollowerSession::next`]).
    fn next_changed(&self, candidates: impl Iterator<Item = (Key, Option<Sent>)>) -> Option<Pending> {
        let (session_id, epoch) = self.open?;
        let (mut listed, mut forgotten) = (Vec::new(), Vec::new());
        for (k, now) in candidates {
            match (self.sent.get(&k), now) {
                (Some(sent), Some(now)) if *sent == now => {}
                (_, Some(now)) => listed.push((k, now)),
                (Some(sent), None) => forgotten.push((k, sent.topic_id.clone())),
                (None, None) => {}
            }
        }
        Some(Pending { session_id, epoch, listed, forgotten })
    }

    /// The answer to `pending` arrived, belonging to `session_id`: the
    /// leader now holds what it said. An answer of another session than the
    /// request's is an inconsistency: the session is dropped.
    fn answered(&mut self, pending: Pending, session_id: u32) -> Result<(), String> {
        if pending.epoch == NEW_SESSION_EPOCH {
            self.sent.clear();
            if session_id == 0 {
                // The leader keeps no session (older than sessions, or the
                // session too large): full fetches from here on.
                self.open = None;
                return Ok(());
            }
            self.open = Some((session_id, FIRST_INCREMENTAL_EPOCH));
            self.sent.extend(pending.listed);
            return Ok(());
        }
        if session_id != pending.session_id {
            self.reset();
            return Err(format!("asked in session {}, answered in {session_id}", pending.session_id));
        }
        for (k, _) in &pending.forgotten {
            self.sent.remove(k);
        }
        self.sent.extend(pending.listed);
        self.open = Some((session_id, next_epoch(pending.epoch)));
        Ok(())
    }

    /// An answer for `k` was not applied: whatever the leader holds for it,
    /// the next request lists it again with where it stands (or forgets it,
    /// if it is no longer followed).
    fn unapplied(&mut self, k: &Key) {
        if let Some(sent) = self.sent.get_mut(k) {
            sent.fetch_offset = i64::MIN;
        }
    }

    /// Forgets the session: the next request is a full fetch that opens a
    /// new one. For any request whose fate is unknown (a transport error, a
    /// timeout, a cancelled call) and any session error.
    fn reset(&mut self) {
        self.open = None;
        self.sent.clear();
    }
}

/// What identifies a follow for the session: a change in any of these for a
/// partition while a request is out makes the answer's meaning unclear.
#[derive(Debug, Clone, PartialEq, Eq)]
struct FollowId {
    topic_id: Arc<str>,
    leader_epoch: u32,
    partition: usize,
}

impl FollowId {
    fn of(f: &Follow) -> FollowId {
        FollowId {
            topic_id: f.topic_id.clone(),
            leader_epoch: f.leader_epoch,
            partition: Arc::as_ptr(&f.partition) as usize,
        }
    }
}

/// The follows one fetcher serves, indexed by partition.
#[derive(Debug, Default)]
struct FollowSet {
    follows: Arc<Vec<Follow>>,
    index: HashMap<Key, usize>,
}

impl FollowSet {
    fn new(follows: Arc<Vec<Follow>>) -> FollowSet {
        let index = follows.iter().enumerate().map(|(i, f)| (key(f), i)).collect();
        FollowSet { follows, index }
    }

    fn get(&self, k: &Key) -> Option<&Follow> {
        self.index.get(k).map(|&i| &self.follows[i])
    }

    /// What `new` changes: the partitions it adds or follows differently
    /// (another epoch, topic id or partition object), and those it drops.
    fn differences(&self, new: &FollowSet) -> (Vec<Key>, Vec<Key>) {
        let changed = new
            .follows
            .iter()
            .filter(|f| self.get(&key(f)).is_none_or(|old| FollowId::of(old) != FollowId::of(f)))
            .map(key)
            .collect();
        let dropped = self.follows.iter().map(key).filter(|k| !new.index.contains_key(k)).collect();
        (changed, dropped)
    }
}

/// One leader's fetch loop, until aborted.
async fn run(leader: BrokerId, address: String, follows: watch::Receiver<Arc<Vec<Follow>>>, settings: FetcherSettings) {
    let client = match crate::peer::peer_channel(&address, settings.source) {
        Ok(channel) => ReplicationClient::new(channel)
            .max_decoding_message_size((settings.max_bytes as usize).saturating_add(settings.max_batch_bytes)),
        Err(e) => {
            tracing::error!(error = %e, "cannot fetch from this leader");
            return;
        }
    };
    let mut fetcher = LeaderFetcher::new(leader, client, follows, settings);
    while fetcher.round().await.is_some() {}
}

/// How a request ended.
enum Outcome {
    /// The leader answered.
    Answer(pb::ReplicaFetchResponse),
    /// The call failed (transport, or the leader's gRPC status).
    Failed(tonic::Status),
    /// No answer in time.
    TimedOut,
    /// Dropped unanswered: the follow set changed under it.
    Dropped,
}

/// The state of one leader's fetch loop.
struct LeaderFetcher {
    leader: BrokerId,
    client: ReplicationClient<Channel>,
    follows: watch::Receiver<Arc<Vec<Follow>>>,
    settings: FetcherSettings,
    backoff: Duration,
    set: FollowSet,
    session: FollowerSession,
    paused: HashMap<Key, Instant>,
    /// The last reason each partition paused for, logged once per change.
    reasons: HashMap<Key, String>,
    /// Partitions whose position, follow or pause may have changed since
    /// the last request: only these are compared with what the session
    /// holds (the fetcher is the only writer of a follower's log).
    dirty: HashSet<Key>,
    /// When every partition is compared again, whatever `dirty` says: a
    /// safety net, once per long poll.
    rescan_at: Instant,
}

impl LeaderFetcher {
    fn new(
        leader: BrokerId,
        client: ReplicationClient<Channel>,
        mut follows: watch::Receiver<Arc<Vec<Follow>>>,
        settings: FetcherSettings,
    ) -> LeaderFetcher {
        let set = FollowSet::new(follows.borrow_and_update().clone());
        LeaderFetcher {
            leader,
            client,
            follows,
            backoff: settings.backoff,
            settings,
            set,
            session: FollowerSession::default(),
            paused: HashMap::new(),
            reasons: HashMap::new(),
            dirty: HashSet::new(),
            rescan_at: Instant::now(),
        }
    }

    /// Takes a new follow set, marking what differs dirty. Returns whether
    /// it adds a partition or follows one differently: an answer in flight
    /// would then be applied to the wrong follow, or a new partition would
    /// wait a whole long poll. Removals alone do not: their answers are
    /// dropped.
    fn replace_set(set: &mut FollowSet, dirty: &mut HashSet<Key>, follows: Arc<Vec<Follow>>) -> bool {
        let new = FollowSet::new(follows);
        let (changed, dropped) = set.differences(&new);
        let restart = !changed.is_empty();
        dirty.extend(changed);
        dirty.extend(dropped);
        *set = new;
        restart
    }

    /// The next request: only the dirty partitions compared, or, without a
    /// session or when a rescan is due, every partition.
    fn next_request(&mut self, now: Instant) -> Pending {
        if now < self.rescan_at {
            let dirty = std::mem::take(&mut self.dirty);
            let (set, paused) = (&self.set, &self.paused);
            let candidates = dirty.into_iter().map(|k| {
                let at = set.get(&k).filter(|_| !paused.contains_key(&k)).map(Sent::of);
                (k, at)
            });
            if let Some(pending) = self.session.next_changed(candidates) {
                return pending;
            }
        }
        self.dirty.clear();
        self.rescan_at = now + Duration::from_millis(u64::from(self.settings.max_wait_ms));
        let active = self.set.follows.iter().filter(|f| self.is_active(&key(f))).map(|f| (key(f), Sent::of(f)));
        self.session.next(active, |k| self.is_active(k))
    }

    fn is_active(&self, k: &Key) -> bool {
        self.set.index.contains_key(k) && !self.paused.contains_key(k)
    }

    /// One request and its answer (or a wait while nothing is active).
    /// `None` once the fetcher is no longer wanted.
    async fn round(&mut self) -> Option<()> {
        if self.follows.has_changed().unwrap_or(false) {
            let follows = self.follows.borrow_and_update().clone();
            Self::replace_set(&mut self.set, &mut self.dirty, follows);
        }
        let now = Instant::now();
        let (set, dirty) = (&self.set, &mut self.dirty);
        self.paused.retain(|k, until| {
            let keep = *until > now && set.index.contains_key(k);
            if !keep {
                // Its pause ended: added to the session again.
                dirty.insert(k.clone());
            }
            keep
        });
        if !self.set.follows.iter().any(|f| self.is_active(&key(f))) {
            return self.idle(now).await;
        }
        let pending = self.next_request(now);
        let request = fetch_request(&pending, &self.settings);
        match self.call(request).await? {
            Outcome::Answer(response) if response.error_code != ErrorCode::None as i32 => {
                self.session.reset();
                let code = ErrorCode::try_from(response.error_code).unwrap_or(ErrorCode::UnknownServerError);
                tracing::debug!(leader = self.leader.0, ?code, message = %response.error_message, "replica fetch session refused: opening a new one");
                if !matches!(code, ErrorCode::FetchSessionIdNotFound | ErrorCode::InvalidFetchSessionEpoch) {
                    self.back_off().await;
                }
            }
            Outcome::Answer(response) => {
                self.backoff = self.settings.backoff;
                match self.session.answered(pending, response.session_id) {
                    Ok(()) => self.take_answers(response.partitions).await,
                    Err(why) => {
                        tracing::warn!(leader = self.leader.0, %why, "replica fetch answered out of its session: opening a new one");
                    }
                }
            }
            Outcome::Failed(status) => {
                self.session.reset();
                tracing::debug!(leader = self.leader.0, %status, "replica fetch failed");
                self.back_off().await;
            }
            Outcome::TimedOut => {
                self.session.reset();
                tracing::debug!(leader = self.leader.0, "replica fetch timed out");
                self.backoff = (self.backoff * 2).min(self.settings.backoff_max);
            }
            // What the leader took of it is unknown.
            Outcome::Dropped => self.session.reset(),
        }
        Some(())
    }

    /// Nothing to fetch: waits for the follow set to change or a pause to end.
    async fn idle(&mut self, now: Instant) -> Option<()> {
        let wake = self.paused.values().min().copied().unwrap_or(now + Duration::from_secs(3600));
        tokio::select! {
            changed = self.follows.changed() => {
                changed.ok()?;
                let follows = self.follows.borrow_and_update().clone();
                Self::replace_set(&mut self.set, &mut self.dirty, follows);
            }
            () = tokio::time::sleep_until(wake) => {}
        }
        Some(())
    }

    async fn back_off(&mut self) {
        tokio::time::sleep(self.backoff).await;
        self.backoff = (self.backoff * 2).min(self.settings.backoff_max);
    }

    /// Sends `request` and waits for its answer, following changes of the
    /// follow set meanwhile. `None`: the fetcher is no longer wanted.
    async fn call(&mut self, request: pb::ReplicaFetchRequest) -> Option<Outcome> {
        let timeout = Duration::from_millis(u64::from(self.settings.max_wait_ms)) + Duration::from_secs(10);
        let call = tokio::time::timeout(timeout, fetch(&mut self.client, request));
        tokio::pin!(call);
        loop {
            tokio::select! {
                outcome = &mut call => return Some(match outcome {
                    Ok(Ok(response)) => Outcome::Answer(response),
                    Ok(Err(status)) => Outcome::Failed(status),
                    Err(_) => Outcome::TimedOut,
                }),
                changed = self.follows.changed() => {
                    changed.ok()?;
                    let follows = self.follows.borrow_and_update().clone();
                    if Self::replace_set(&mut self.set, &mut self.dirty, follows) {
                        // Ask again for the new set at once.
                        return Some(Outcome::Dropped);
                    }
                }
            }
        }
    }

    /// Applies each answered partition still followed and not paused;
    /// pauses the ones that fail.
    async fn take_answers(&mut self, partitions: Vec<pb::ReplicaFetchPartitionResponse>) {
        for p in partitions {
            let k: Key = (Arc::from(p.topic.as_str()), p.partition);
            // Whatever happens to it, its position may move.
            self.dirty.insert(k.clone());
            // Removed or paused while the request was out: dropped, and
            // listed (or forgotten) again by the next request.
            let Some(f) = self.set.get(&k).filter(|_| !self.paused.contains_key(&k)) else {
                self.session.unapplied(&k);
                continue;
            };
            match apply(f, p).await {
                Ok(Applied::Done) => {
                    self.reasons.remove(&k);
                }
                Ok(Applied::Stale(why)) => {
                    tracing::warn!(topic = %f.topic, partition = f.partition.index(), %why, "replica fetch answer not applied: opening a new session");
                    self.session.reset();
                }
                Err(why) => self.pause(k, why),
            }
        }
    }

    fn pause(&mut self, k: Key, why: String) {
        if self.reasons.get(&k) != Some(&why) {
            // A leader that has not opened a new partition yet, or has
            // deleted it, answers this until metadata catches up.
            if why.starts_with("UnknownTopicOrPartition") {
                tracing::debug!(topic = %k.0, partition = k.1, %why, "replica fetch paused");
            } else {
                tracing::warn!(topic = %k.0, partition = k.1, %why, "replica fetch paused");
            }
            self.reasons.insert(k.clone(), why);
        }
        self.dirty.insert(k.clone());
        self.paused.insert(k, Instant::now() + self.settings.backoff_max.min(self.backoff * 4));
    }
}

async fn fetch(
    client: &mut ReplicationClient<Channel>,
    request: pb::ReplicaFetchRequest,
) -> Result<pb::ReplicaFetchResponse, tonic::Status> {
    Ok(client.replica_fetch(request).await?.into_inner())
}

fn fetch_request(pending: &Pending, settings: &FetcherSettings) -> pb::ReplicaFetchRequest {
    let partitions = pending
        .listed
        .iter()
        .map(|((topic, partition), sent)| pb::ReplicaFetchPartition {
            topic: topic.to_string(),
            topic_id: sent.topic_id.to_string(),
            partition: *partition,
            fetch_offset: sent.fetch_offset,
            current_leader_epoch: sent.current_leader_epoch,
            last_fetched_epoch: sent.last_fetched_epoch,
        })
        .collect();
    let forgotten = pending
        .forgotten
        .iter()
        .map(|((topic, partition), topic_id)| pb::ForgottenPartition {
            topic: topic.to_string(),
            topic_id: topic_id.to_string(),
            partition: *partition,
        })
        .collect();
    pb::ReplicaFetchRequest {
        replica_id: settings.replica_id.0,
        max_wait_ms: settings.max_wait_ms,
        max_bytes: settings.max_bytes,
        partitions,
        session_id: pending.session_id,
        session_epoch: pending.epoch,
        forgotten,
    }
}

/// What applying one partition's answer did.
#[derive(Debug, PartialEq, Eq)]
enum Applied {
    /// Applied (or nothing to apply).
    Done,
    /// Not applied: the answer was served from another position than this
    /// log's, so the session disagrees with the log; nothing was changed.
    Stale(String),
}

/// Checks that an answer was served from where `f`'s log stands now (a
/// leader older than sessions does not say, and is trusted as before).
fn served_from_here(p: &pb::ReplicaFetchPartitionResponse, here: (Offset, Option<u32>)) -> Result<(), String> {
    let (log_end, last_epoch) = here;
    match (p.fetch_offset, p.last_fetched_epoch) {
        (None, _) => Ok(()),
        (Some(offset), epoch) if offset == log_end.to_wire() && epoch.is_none_or(|e| e == wire_epoch(last_epoch)) => {
            Ok(())
        }
        (Some(offset), epoch) => Err(format!(
            "served from offset {offset} epoch {epoch:?}, the log ends at {log_end} epoch {:?}",
            wire_epoch(last_epoch)
        )),
    }
}

/// Applies one partition's answer; an `Err` pauses the partition.
async fn apply(f: &Follow, p: pb::ReplicaFetchPartitionResponse) -> Result<Applied, String> {
    if let Err(why) = served_from_here(&p, f.partition.fetch_position()) {
        return Ok(Applied::Stale(why));
    }
    let code = ErrorCode::try_from(p.error_code).unwrap_or(ErrorCode::UnknownServerError);
    if code == ErrorCode::OffsetOutOfRange {
        let (log_end, _) = f.partition.fetch_position();
        let leader_start = Offset::from_wire(p.log_start_offset).ok_or("the leader sent no log start")?;
        if log_end < leader_start {
            f.partition.restart_at(f.leader_epoch, leader_start).map_err(|e| e.to_string())?;
            return Ok(Applied::Done);
        }
        return Err(format!("offset out of range: {}", p.error_message));
    }
    if code != ErrorCode::None {
        return Err(format!("{code:?}: {}", p.error_message));
    }
    if let Some(d) = p.diverging_epoch {
        let end = Offset::from_wire(d.end_offset).ok_or("the leader sent a negative end offset")?;
        f.partition.truncate_diverging(f.leader_epoch, d.epoch, end).map_err(|e| e.to_string())?;
        return Ok(Applied::Done);
    }
    let hw = Offset::from_wire(p.high_watermark).ok_or("the leader sent a negative high watermark")?;
    let mut batches = Vec::new();
    for chunk in &p.records {
        for part in split_batches(chunk).map_err(|e| format!("the leader sent a torn batch: {e}"))? {
            batches
                .push(RecordBatch::check_framing(part).map_err(|e| format!("the leader sent a corrupt batch: {e}"))?);
        }
    }
    f.partition.append_as_follower(&batches, hw, f.leader_epoch).await.map_err(|e| e.to_string())?;
    if let Some(leader_start) = Offset::from_wire(p.log_start_offset) {
        f.partition.adopt_leader_log_start(f.leader_epoch, leader_start).map_err(|e| e.to_string())?;
    }
    Ok(Applied::Done)
}

#[cfg(test)]
mod tests {
    use tally_proto::batch::{BatchBuilder, BatchLimits, RecordRef};

    use super::*;
    use crate::replication::fetch_session::{FetchEntry, FetchPosition, PartitionKey, ReadSummary, Session, SessionId};
    use crate::replication::{Assignment, LeaderSettings};
    use crate::storage::{Log, LogConfig, SystemClock};

    fn k(partition: u32) -> Key {
        (Arc::from("t"), partition)
    }

    fn at(offset: i64) -> Sent {
        Sent { topic_id: Arc::from("t-id"), fetch_offset: offset, current_leader_epoch: 1, last_fetched_epoch: 1 }
    }

    fn all(partitions: &[(u32, Sent)]) -> impl Iterator<Item = (Key, Sent)> + '_ {
        partitions.iter().map(|(p, s)| (k(*p), s.clone()))
    }

    fn listed(pending: &Pending) -> Vec<u32> {
        pending.listed.iter().map(|((_, p), _)| *p).collect()
    }

    /// A follower session opened (id 7) over partitions 0..4 at offset 10.
    fn opened() -> (FollowerSession, Vec<(u32, Sent)>) {
        let mut session = FollowerSession::default();
        let partitions: Vec<(u32, Sent)> = (0..4).map(|p| (p, at(10))).collect();
        let pending = session.next(all(&partitions), |_| true);
        assert_eq!(pending.epoch, NEW_SESSION_EPOCH);
        assert_eq!(listed(&pending), vec![0, 1, 2, 3], "a full fetch lists everything");
        session.answered(pending, 7).unwrap();
        (session, partitions)
    }

    #[test]
    fn an_unchanged_round_lists_nothing_and_each_request_takes_the_next_epoch() {
        let (mut session, partitions) = opened();
        for epoch in 1..=3 {
            let pending = session.next(all(&partitions), |_| true);
            assert_eq!((pending.session_id, pending.epoch), (7, epoch));
            assert!(pending.listed.is_empty() && pending.forgotten.is_empty(), "{pending:?}");
            session.answered(pending, 7).unwrap();
        }
    }

    #[test]
    fn a_moved_log_end_last_epoch_leader_epoch_or_topic_id_is_listed() {
        let (mut session, mut partitions) = opened();
        partitions[0].1.fetch_offset = 11;
        partitions[1].1.last_fetched_epoch = 2;
        partitions[2].1.current_leader_epoch = 3;
        partitions[3].1.topic_id = Arc::from("recreated");
        let pending = session.next(all(&partitions), |_| true);
        assert_eq!(listed(&pending), vec![0, 1, 2, 3]);
        session.answered(pending, 7).unwrap();
        partitions[2].1.fetch_offset = 0; // truncated
        let pending = session.next(all(&partitions), |_| true);
        assert_eq!(listed(&pending), vec![2], "only what moved since the last request");
    }

    #[test]
    fn a_partition_no_longer_followed_or_paused_is_forgotten_and_comes_back_with_its_position() {
        let (mut session, partitions) = opened();
        let active = |k: &Key| k.1 != 1;
        let rest: Vec<(u32, Sent)> = partitions.iter().filter(|(p, _)| *p != 1).cloned().collect();
        let pending = session.next(all(&rest), active);
        let forgotten: Vec<u32> = pending.forgotten.iter().map(|((_, p), _)| *p).collect();
        assert_eq!(forgotten, vec![1]);
        assert!(pending.listed.is_empty());
        session.answered(pending, 7).unwrap();
        let pending = session.next(all(&rest), active);
        assert!(pending.forgotten.is_empty(), "forgotten once");
        session.answered(pending, 7).unwrap();
        // The pause ends: it is added again, with where it stands.
        let pending = session.next(all(&partitions), |_| true);
        assert_eq!(listed(&pending), vec![1]);
    }

    #[test]
    fn an_answer_not_applied_is_listed_again_even_at_an_unchanged_position() {
        let (mut session, partitions) = opened();
        session.unapplied(&(Arc::from("t"), 2));
        let pending = session.next(all(&partitions), |_| true);
        assert_eq!(listed(&pending), vec![2], "the leader may think it moved on");
        session.answered(pending, 7).unwrap();
        // No longer followed: forgotten rather than listed.
        session.unapplied(&(Arc::from("t"), 0));
        let rest: Vec<(u32, Sent)> = partitions.iter().filter(|(p, _)| *p != 0).cloned().collect();
        let pending = session.next(all(&rest), |k| k.1 != 0);
        let forgotten: Vec<u32> = pending.forgotten.iter().map(|((_, p), _)| *p).collect();
        assert_eq!((listed(&pending), forgotten), (Vec::new(), vec![0]));
    }

    #[test]
    fn a_leader_without_sessions_gets_a_full_fetch_every_time() {
        let mut session = FollowerSession::default();
        let partitions: Vec<(u32, Sent)> = (0..3).map(|p| (p, at(10))).collect();
        for _ in 0..3 {
            let pending = session.next(all(&partitions), |_| true);
            assert_eq!((pending.session_id, pending.epoch), (0, NEW_SESSION_EPOCH));
            assert_eq!(pending.listed.len(), 3);
            session.answered(pending, 0).unwrap();
        }
    }

    #[test]
    fn an_answer_from_another_session_or_a_reset_opens_a_new_session_with_everything() {
        let (mut session, partitions) = opened();
        let pending = session.next(all(&partitions), |_| true);
        assert!(session.answered(pending, 8).is_err());
        let pending = session.next(all(&partitions), |_| true);
        assert_eq!((pending.epoch, pending.listed.len()), (NEW_SESSION_EPOCH, 4));
        session.answered(pending, 9).unwrap();
        session.reset();
        let pending = session.next(all(&partitions), |_| true);
        assert_eq!((pending.epoch, pending.listed.len()), (NEW_SESSION_EPOCH, 4));
    }

    #[test]
    fn answers_are_applied_only_where_they_were_served_from() {
        let mut answer = pb::ReplicaFetchPartitionResponse::default();
        assert!(served_from_here(&answer, (Offset(5), Some(2))).is_ok(), "a leader older than sessions");
        answer.fetch_offset = Some(5);
        answer.last_fetched_epoch = Some(2);
        assert!(served_from_here(&answer, (Offset(5), Some(2))).is_ok());
        assert!(served_from_here(&answer, (Offset(6), Some(2))).is_err());
        assert!(served_from_here(&answer, (Offset(5), Some(1))).is_err());
        answer.fetch_offset = Some(0);
        answer.last_fetched_epoch = Some(-1);
        assert!(served_from_here(&answer, (Offset(0), None)).is_ok());
    }

    struct Replica {
        p: Arc<Partition>,
        _dir: tempfile::TempDir,
    }

    fn replica(index: u32) -> Replica {
        let dir = tempfile::tempdir().unwrap();
        let config = LogConfig { segment_bytes: 4096, ..LogConfig::default() };
        let log = Log::open(dir.path(), config, Arc::new(SystemClock)).unwrap();
        Replica { p: Arc::new(Partition::new(Arc::from("t"), index, log, 1 << 20)), _dir: dir }
    }

    fn follow(r: &Replica, leader_epoch: u32) -> Follow {
        Follow { topic: Arc::from("t"), topic_id: Arc::from("t-id"), partition: r.p.clone(), leader_epoch }
    }

    #[test]
    fn a_follow_set_change_names_what_it_adds_follows_differently_or_drops() {
        let (a, b, a_again, c) = (replica(0), replica(1), replica(0), replica(2));
        let set = FollowSet::new(Arc::new(vec![follow(&a, 1), follow(&b, 1)]));
        let diff = |new: Vec<Follow>| {
            let (changed, dropped) = set.differences(&FollowSet::new(Arc::new(new)));
            let p = |keys: Vec<Key>| keys.iter().map(|k| k.1).collect::<Vec<u32>>();
            (p(changed), p(dropped))
        };
        assert_eq!(diff(vec![follow(&a, 1), follow(&b, 1)]), (vec![], vec![]), "the same");
        assert_eq!(diff(vec![follow(&a, 1)]), (vec![], vec![1]), "a removal");
        assert_eq!(diff(vec![follow(&a, 2), follow(&b, 1)]), (vec![0], vec![]), "a new leader epoch");
        assert_eq!(diff(vec![follow(&a_again, 1), follow(&b, 1)]), (vec![0], vec![]), "another partition object");
        let mut recreated = follow(&b, 1);
        recreated.topic_id = Arc::from("t-id-2");
        assert_eq!(diff(vec![follow(&a, 1), recreated]), (vec![1], vec![]), "a recreated topic");
        assert_eq!(diff(vec![follow(&a, 1), follow(&b, 1), follow(&c, 1)]), (vec![2], vec![]), "an addition");
    }

    #[test]
    fn a_request_of_the_dirty_partitions_alone_lists_what_moved_and_forgets_what_left() {
        let (mut session, partitions) = opened();
        let candidates =
            vec![(k(0), Some(at(10))), (k(1), Some(at(12))), (k(2), None), (k(9), None), (k(5), Some(at(0)))];
        let pending = session.next_changed(candidates.into_iter()).expect("a session is open");
        assert_eq!((pending.session_id, pending.epoch), (7, 1));
        assert_eq!(listed(&pending), vec![1, 5], "moved, and new; the unmoved one is not listed");
        let forgotten: Vec<u32> = pending.forgotten.iter().map(|((_, p), _)| *p).collect();
        assert_eq!(forgotten, vec![2], "left; one never sent is not forgotten");
        session.answered(pending, 7).unwrap();
        let full = session.next(all(&partitions), |k| k.1 < 4);
        assert_eq!(listed(&full), vec![1, 2], "a full comparison against 0..4 at 10: 1 moved back, 2 comes back");
        let forgotten: Vec<u32> = full.forgotten.iter().map(|((_, p), _)| *p).collect();
        assert_eq!(forgotten, vec![5]);
        session.reset();
        assert!(session.next_changed(std::iter::empty()).is_none(), "without a session, a full fetch");
    }

    const LAG_MS: u64 = 2_000;
    const WAIT_MS: u64 = 500;

    /// Leader (broker 1) and follower (broker 2) partitions of topic "t",
    /// both in epoch 1, the ISR both.
    fn pairs(count: u32) -> Vec<(Replica, Replica)> {
        (0..count)
            .map(|i| {
                let (leader, follower) = (replica(i), replica(i));
                let ids = vec![BrokerId(1), BrokerId(2)];
                let assignment = Assignment { replicas: ids.clone(), isr: ids, leader_epoch: 1, partition_epoch: 1 };
                let settings = LeaderSettings { min_insync_replicas: 1, replica_lag_time_max_ms: LAG_MS };
                leader.p.make_leader(BrokerId(1), assignment, settings, 0).unwrap();
                follower.p.make_follower(Some(BrokerId(1)), 1);
                (leader, follower)
            })
            .collect()
    }

    fn entry(((topic, partition), sent): &(Key, Sent)) -> FetchEntry {
        FetchEntry {
            key: PartitionKey { topic: topic.to_string(), partition: *partition },
            position: FetchPosition {
                topic_id: sent.topic_id.to_string(),
                fetch_offset: sent.fetch_offset,
                current_leader_epoch: sent.current_leader_epoch,
                last_fetched_epoch: u32::try_from(sent.last_fetched_epoch).ok(),
            },
        }
    }

    /// One round without a network: the follower's request, the leader's
    /// session serving it (the server's pass, without the wait), the
    /// follower appending the answer. Returns (partitions the request
    /// listed, partitions the answer held).
    async fn round(
        follower: &mut FollowerSession,
        leader: &mut Option<Session<(), ()>>,
        pairs: &[(Replica, Replica)],
        now_ms: u64,
    ) -> (usize, usize) {
        let follows: Vec<Follow> = pairs.iter().map(|(_, f)| follow(f, 1)).collect();
        let pending = follower.next(follows.iter().map(|f| (key(f), Sent::of(f))), |_| true);
        let entries: Vec<FetchEntry> = pending.listed.iter().map(entry).collect();
        let listed = entries.len();
        let id = SessionId::new(7).unwrap();
        if pending.epoch == NEW_SESSION_EPOCH {
            *leader = Some(Session::new(BrokerId(2), entries));
        } else {
            let forgotten =
                pending.forgotten.iter().map(|((t, p), _)| PartitionKey { topic: t.to_string(), partition: *p });
            leader.as_mut().unwrap().merge(id, entries, forgotten.collect()).unwrap();
        }
        let session = leader.as_mut().unwrap();
        let mut answers = Vec::new();
        for slot in session.plan(now_ms, WAIT_MS) {
            let (key, position) = (session.partition(slot).key().clone(), session.partition(slot).position().clone());
            let read = pairs[key.partition as usize]
                .0
                .p
                .replica_fetch(
                    BrokerId(2),
                    position.fetch_offset,
                    position.current_leader_epoch,
                    position.last_fetched_epoch,
                    u64::MAX,
                    now_ms,
                )
                .unwrap();
            let summary = ReadSummary {
                bytes: read.read.bytes,
                error: false,
                diverging: read.diverging.is_some(),
                high_watermark: read.high_watermark.to_wire(),
                log_start_offset: read.log_start_offset.to_wire(),
                deferred: false,
            };
            if session.record(slot, &summary).is_some() {
                answers.push((key.partition, read));
            }
        }
        session.finish_request();
        follower.answered(pending, id.get()).unwrap();
        let answered = answers.len();
        for (partition, read) in answers {
            let mut batches = Vec::new();
            for chunk in &read.read.chunks {
                for part in split_batches(chunk).unwrap() {
                    batches.push(RecordBatch::check_framing(part).unwrap());
                }
            }
            pairs[partition as usize].1.p.append_as_follower(&batches, read.high_watermark, 1).await.unwrap();
        }
        (listed, answered)
    }

    fn batch(value: &str) -> RecordBatch {
        let mut b = BatchBuilder::new();
        b.push(&RecordRef { timestamp: 1, value: Some(value.as_bytes()), ..Default::default() });
        RecordBatch::validate(b.finish(), &BatchLimits::default()).unwrap()
    }

    #[tokio::test]
    async fn idle_rounds_carry_nothing_yet_keep_the_follower_in_sync_and_an_append_replicates() {
        let pairs = pairs(20);
        let (mut follower, mut leader) = (FollowerSession::default(), None);
        assert_eq!(round(&mut follower, &mut leader, &pairs, 0).await, (20, 20), "the full fetch opens the session");
        // Three lag times of idle long polls, one per wait.
        let mut now = 0;
        while now < 3 * LAG_MS {
            now += WAIT_MS;
            assert_eq!(round(&mut follower, &mut leader, &pairs, now).await, (0, 0), "at {now} ms");
        }
        for (l, _) in &pairs {
            assert!(l.p.isr_tick(now).is_none(), "a follower that said nothing stays in the ISR");
        }
        // An append to one partition: it alone is answered (here found by
        // the next full pass; the server's watcher finds it at once), then
        // listed with its new position, which moves the high watermark.
        pairs[5].0.p.produce(&[batch("x")], 1, None).await.unwrap();
        now += WAIT_MS;
        assert_eq!(round(&mut follower, &mut leader, &pairs, now).await, (0, 1), "the records");
        assert_eq!(pairs[5].1.p.fetch_position().0, Offset(1));
        assert_eq!(round(&mut follower, &mut leader, &pairs, now + 1).await, (1, 1), "the new position, and its HW");
        assert_eq!(pairs[5].0.p.offsets().1, Offset(1), "the leader's high watermark passed it");
        assert_eq!(pairs[5].1.p.offsets().1, Offset(1), "and the follower learned it");
        assert_eq!(round(&mut follower, &mut leader, &pairs, now + 2).await, (0, 0));
    }

    #[tokio::test]
    async fn without_the_sessions_reads_an_idle_follower_would_leave_the_isr() {
        // The control for the test above: the same follower, not fetching.
        let pairs = pairs(2);
        let (mut follower, mut leader) = (FollowerSession::default(), None);
        round(&mut follower, &mut leader, &pairs, 0).await;
        assert!(pairs[0].0.p.isr_tick(3 * LAG_MS).is_some(), "it is shrunk out after the lag time");
    }
}
