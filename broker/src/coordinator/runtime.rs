//! The tasks around the [`Shard`]s: one per `__consumer_offsets` partition
//! this broker leads, a single-threaded event loop like Kafka's
//! `CoordinatorRuntime`. It loads the shard by replaying the partition (to
//! its log end; requests meanwhile get COORDINATOR_LOAD_IN_PROGRESS), then
//! runs requests and ticks one at a time: a request's records are applied
//! and appended in one batch as leader (no lock held across the append's
//! wait), and its answer is sent only once the high watermark passes the
//! batch (and, for a read, the records before it), with this broker leading
//! throughout. When the leadership moves, the task ends and its state is
//! dropped (NOT_COORDINATOR); a failed append ends it too and the next load
//! starts from the log.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tally_proto::batch::{BatchBuilder, BatchIter, RecordBatch, RecordRef};
use tokio::sync::{mpsc, oneshot};

use super::records::CoordinatorRecord;
use super::{
    GroupConfig, GroupError, HeartbeatRequest, HeartbeatResponse, OFFSETS_TOPIC, Shard, TopicsView, partition_for_group,
};
use crate::broker::{Broker, NewTopic};
use crate::error::BrokerError;
use crate::partition::Partition;
use crate::storage::Offset;

/// How often a shard checks sessions and deadlines.
const TICK: Duration = Duration::from_millis(250);
/// How long an answer waits for its records to be replicated.
const COMMIT_TIMEOUT: Duration = Duration::from_secs(15);
/// Requests queued per shard before callers wait.
const QUEUE: usize = 1024;
/// The longest a heartbeat waits for news.
const MAX_HEARTBEAT_WAIT: Duration = Duration::from_secs(15);
/// Bytes read per step of a load.
const LOAD_READ_BYTES: u64 = 4 << 20;

type Reply = Box<dyn FnOnce(Result<(), GroupError>) + Send>;
type Job = Box<dyn FnOnce(&mut Shard, &TopicsView, u64) -> (Vec<CoordinatorRecord>, Reply) + Send>;

struct ShardHandle {
    leader_epoch: u32,
    ops: mpsc::Sender<Op>,
    loaded: Arc<AtomicBool>,
    task: tokio::task::JoinHandle<()>,
}

/// The group coordinators of this broker: a shard task for each offsets
/// partition it leads.
pub struct Coordinators {
    broker: Arc<Broker>,
    config: GroupConfig,
    shards: Mutex<HashMap<u32, ShardHandle>>,
    creating: tokio::sync::Mutex<()>,
}

impl std::fmt::Debug for Coordinators {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Coordinators").field("config", &self.config).finish_non_exhaustive()
    }
}

fn now_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}

/// The topics groups may subscribe to: every topic but the internal ones.
pub fn topics_view(broker: &Broker) -> TopicsView {
    broker
        .topics()
        .iter()
        .filter(|t| !t.name.as_str().starts_with("__"))
        .map(|t| (t.name.as_str().to_string(), t.states.len() as u32))
        .collect()
}

impl Coordinators {
    /// Starts following which offsets partitions this broker leads.
    pub fn start(broker: Arc<Broker>) -> Arc<Coordinators> {
        let c = broker.config();
        let config = GroupConfig {
            session_timeout_ms: c.group_consumer_session_timeout_ms,
            min_session_timeout_ms: c.group_consumer_min_session_timeout_ms,
            max_session_timeout_ms: c.group_consumer_max_session_timeout_ms,
            heartbeat_interval_ms: c.group_consumer_heartbeat_interval_ms,
            max_size: c.group_consumer_max_size,
            offsets_retention_ms: c.offsets_retention_minutes.saturating_mul(60_000),
        };
        let coordinators =
            Arc::new(Coordinators { broker, config, shards: Mutex::new(HashMap::new()), creating: Default::default() });
        let weak = Arc::downgrade(&coordinators);
        let mut reconciled = coordinators.broker.reconciled_index();
        tokio::spawn(async move {
            loop {
                let Some(c) = weak.upgrade() else { return };
                c.sync_shards();
                drop(c);
                tokio::select! {
                    changed = reconciled.changed() => if changed.is_err() { return },
                    () = tokio::time::sleep(Duration::from_secs(1)) => {}
                }
            }
        });
        coordinators
    }

    /// Stops every shard task.
    pub fn stop(&self) {
        for (_, h) in self.lock().drain() {
            h.task.abort();
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<u32, ShardHandle>> {
        self.shards.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Starts a shard for each offsets partition led here in a new epoch,
    /// and drops those no longer led.
    fn sync_shards(&self) {
        let led: BTreeMap<u32, (Arc<Partition>, u32)> = match self.broker.topic(OFFSETS_TOPIC) {
            Some(t) => {
                t.partitions.iter().filter_map(|(i, p)| p.leading_epoch().map(|e| (*i, (p.clone(), e)))).collect()
            }
            None => BTreeMap::new(),
        };
        let mut shards = self.lock();
        shards.retain(|i, h| {
            let keep = led.get(i).is_some_and(|(_, e)| *e == h.leader_epoch) && !h.task.is_finished();
            if !keep {
                h.task.abort();
            }
            keep
        });
        for (index, (partition, epoch)) in led {
            if shards.contains_key(&index) {
                continue;
            }
            let (ops, rx) = mpsc::channel(QUEUE);
            let loaded = Arc::new(AtomicBool::new(false));
            let task = tokio::spawn(run_shard(
                self.broker.clone(),
                partition,
                epoch,
                Shard::new(self.config.clone()),
                rx,
                loaded.clone(),
            ));
            tracing::info!(partition = index, leader_epoch = epoch, "loading group coordinator");
            shards.insert(index, ShardHandle { leader_epoch: epoch, ops, loaded, task });
        }
    }

    /// Creates `__consumer_offsets` if it does not exist yet.
    pub async fn ensure_offsets_topic(&self) -> Result<Arc<crate::broker::Topic>, GroupError> {
        if let Some(t) = self.broker.topic(OFFSETS_TOPIC) {
            return Ok(t);
        }
        let _one = self.creating.lock().await;
        if let Some(t) = self.broker.topic(OFFSETS_TOPIC) {
            return Ok(t);
        }
        let c = self.broker.config();
        let brokers = self.broker.brokers().len().max(1) as u32;
        let replication_factor = c.offsets_topic_replication_factor.min(brokers);
        let mut configs = BTreeMap::from([
            ("cleanup_policy".to_string(), "compact".to_string()),
            ("segment_bytes".to_string(), c.offsets_topic_segment_bytes.to_string()),
            ("segment_index_bytes".to_string(), (1u64 << 20).to_string()),
        ]);
        configs.insert("min_insync_replicas".into(), if replication_factor >= 3 { "2" } else { "1" }.into());
        let new = NewTopic {
            name: OFFSETS_TOPIC.to_string(),
            partitions: c.offsets_topic_num_partitions,
            replication_factor,
            configs,
        };
        match self.broker.create_topic(new, false).await {
            Ok(()) | Err(BrokerError::TopicAlreadyExists(_)) => {}
            Err(e) => {
                return Err(GroupError::CoordinatorNotAvailable(format!("cannot create {OFFSETS_TOPIC}: {e}")));
            }
        }
        tracing::info!(partitions = c.offsets_topic_num_partitions, replication_factor, "created {OFFSETS_TOPIC}");
        self.broker
            .topic(OFFSETS_TOPIC)
            .ok_or_else(|| GroupError::CoordinatorNotAvailable(format!("{OFFSETS_TOPIC} is being created")))
    }

    /// The broker (id, address) coordinating `group`, creating the offsets
    /// topic on first use.
    pub async fn find(&self, group: &str) -> Result<(u32, String), GroupError> {
        if group.is_empty() {
            return Err(GroupError::InvalidRequest("the group id must not be empty".into()));
        }
        let topic = self.ensure_offsets_topic().await?;
        let index = partition_for_group(group, topic.states.len() as u32);
        let state = &topic.states[index as usize];
        let Some(leader) = state.leader else {
            return Err(GroupError::CoordinatorNotAvailable(format!(
                "partition {index} of {OFFSETS_TOPIC} has no leader right now"
            )));
        };
        let address = self.broker.brokers().into_iter().find(|(id, _)| *id == leader.0).map(|(_, a)| a);
        match address {
            Some(a) => Ok((leader.0, a)),
            None => Err(GroupError::CoordinatorNotAvailable(format!("broker {} is not registered", leader.0))),
        }
    }

    /// Runs `f` on the shard of `group`'s offsets partition, appends its
    /// records and answers once they are committed.
    pub async fn run<T: Send + 'static>(
        &self,
        group: &str,
        f: impl FnOnce(&mut Shard, &TopicsView, u64) -> Result<(Vec<CoordinatorRecord>, T), GroupError> + Send + 'static,
    ) -> Result<T, GroupError> {
        let ops = self.shard_for(group)?;
        let (tx, rx) = oneshot::channel();
        let job: Job = Box::new(move |shard, topics, now| match f(shard, topics, now) {
            Ok((records, value)) => {
                let reply: Reply = Box::new(move |outcome| {
                    let _ = tx.send(outcome.map(|()| value));
                });
                (records, reply)
            }
            Err(e) => {
                let _ = tx.send(Err(e));
                (Vec::new(), Box::new(|_| {}))
            }
        });
        let gone = || GroupError::NotCoordinator(group.to_string());
        ops.send(Op::Job(job)).await.map_err(|_| gone())?;
        rx.await.map_err(|_| gone())?
    }

    /// A member's heartbeat. With `max_wait`, a heartbeat that has nothing
    /// new to tell the member (same epoch, same assignment) is answered when
    /// its group changes, or after `max_wait`: members hear of a rebalance at
    /// once instead of at their next interval.
    pub async fn heartbeat(&self, req: HeartbeatRequest, max_wait: Duration) -> Result<HeartbeatResponse, GroupError> {
        let group = req.group.clone();
        let ops = self.shard_for(&group)?;
        let (reply, answer) = oneshot::channel();
        let max_wait = max_wait.min(MAX_HEARTBEAT_WAIT);
        let gone = || GroupError::NotCoordinator(group.clone());
        ops.send(Op::Heartbeat { req: Box::new(req), max_wait, reply }).await.map_err(|_| gone())?;
        answer.await.map_err(|_| gone())?
    }

    /// Runs `f` on every loaded shard of this broker (listing groups).
    pub async fn run_all<T: Send + 'static>(
        &self,
        f: impl Fn(&Shard) -> T + Send + Sync + Clone + 'static,
    ) -> Vec<Result<T, GroupError>> {
        let senders: Vec<mpsc::Sender<Op>> =
            self.lock().values().filter(|h| h.loaded.load(Ordering::Acquire)).map(|h| h.ops.clone()).collect();
        let mut out = Vec::new();
        for ops in senders {
            let (tx, rx) = oneshot::channel();
            let f = f.clone();
            let job: Job = Box::new(move |shard, _, _| {
                let value = f(shard);
                (Vec::new(), Box::new(move |outcome| drop(tx.send(outcome.map(|()| value)))))
            });
            if ops.send(Op::Job(job)).await.is_ok()
                && let Ok(r) = rx.await
            {
                out.push(r);
            }
        }
        out
    }

    fn shard_for(&self, group: &str) -> Result<mpsc::Sender<Op>, GroupError> {
        if group.is_empty() {
            return Err(GroupError::InvalidRequest("the group id must not be empty".into()));
        }
        let Some(topic) = self.broker.topic(OFFSETS_TOPIC) else {
            return Err(GroupError::NotCoordinator(group.to_string()));
        };
        let index = partition_for_group(group, topic.states.len() as u32);
        let shards = self.lock();
        let Some(h) = shards.get(&index).filter(|h| !h.task.is_finished()) else {
            return Err(GroupError::NotCoordinator(group.to_string()));
        };
        if !h.loaded.load(Ordering::Acquire) {
            return Err(GroupError::CoordinatorLoadInProgress(group.to_string()));
        }
        Ok(h.ops.clone())
    }
}

impl Drop for Coordinators {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Replays the partition from its log start to its log end.
fn load(partition: &Partition, shard: &mut Shard, now: u64) -> Result<Offset, String> {
    let (start, _, end) = partition.offsets();
    let mut next = start;
    let (mut records, mut skipped) = (0u64, 0u64);
    while next < end {
        let read = partition.read_to_log_end(next, LOAD_READ_BYTES).map_err(|e| e.to_string())?;
        if read.next_offset <= next {
            break;
        }
        for chunk in read.chunks {
            for batch in BatchIter::new(chunk) {
                let batch = batch.map_err(|e| format!("corrupt batch: {e}"))?;
                for record in batch.records().map_err(|e| e.to_string())? {
                    let record = record.map_err(|e| e.to_string())?;
                    let Some(key) = record.key.as_deref() else { continue };
                    if !CoordinatorRecord::is_known_key(key) {
                        // A kind of record from a newer version: skipped, as
                        // Kafka skips unknown record types.
                        skipped += 1;
                        continue;
                    }
                    let decoded = CoordinatorRecord::decode(record.offset, key, record.value.as_deref())
                        .map_err(|e| e.to_string())?;
                    shard.replay(&decoded, now);
                    records += 1;
                }
            }
        }
        next = read.next_offset;
    }
    if skipped > 0 {
        tracing::warn!(partition = partition.index(), skipped, "skipped coordinator records of unknown kinds");
    }
    tracing::debug!(
        topic = OFFSETS_TOPIC,
        partition = partition.index(),
        records,
        groups = shard.group_count(),
        "loaded"
    );
    Ok(end)
}

fn encode(records: &[CoordinatorRecord], now: u64) -> Result<RecordBatch, GroupError> {
    let mut builder = BatchBuilder::new();
    for r in records {
        let key = r.encode_key();
        let value = r.encode_value();
        builder.push(&RecordRef { timestamp: now as i64, key: Some(&key), value: value.as_deref(), headers: &[] });
    }
    RecordBatch::check_framing(builder.finish())
        .map_err(|e| GroupError::CoordinatorNotAvailable(format!("cannot encode coordinator records: {e}")))
}

/// What a failed append or wait on offsets partition `index` means to a
/// group's client: find the coordinator again, or retry.
fn group_error(e: &BrokerError, index: u32) -> GroupError {
    match e.code() {
        tally_proto::ErrorCode::NotLeaderOrFollower | tally_proto::ErrorCode::LeaderNotAvailable => {
            GroupError::NotCoordinator(format!("{OFFSETS_TOPIC}/{index}"))
        }
        _ => GroupError::CoordinatorNotAvailable(e.to_string()),
    }
}

/// True when `records` change what a member may be told (members, targets,
/// the group's epochs); a committed offset does not.
fn changes_membership(records: &[CoordinatorRecord]) -> bool {
    records.iter().any(|r| !matches!(r.key, super::records::RecordKey::Offset { .. }))
}

/// The groups whose membership `records` change: their parked heartbeats
/// run again.
fn membership_groups(records: &[CoordinatorRecord]) -> BTreeSet<String> {
    records
        .iter()
        .filter(|r| !matches!(r.key, super::records::RecordKey::Offset { .. }))
        .map(|r| r.key.group().to_string())
        .collect()
}

/// What a shard task is asked to do.
enum Op {
    /// Anything on the shard, answered once its records are committed.
    Job(Job),
    /// A member's heartbeat that may wait (`max_wait`) for a change to tell.
    Heartbeat {
        req: Box<HeartbeatRequest>,
        max_wait: Duration,
        reply: oneshot::Sender<Result<HeartbeatResponse, GroupError>>,
    },
}

/// A heartbeat with nothing new to tell yet: answered when its group
/// changes, or at its deadline.
struct Parked {
    req: HeartbeatRequest,
    deadline: tokio::time::Instant,
    reply: oneshot::Sender<Result<HeartbeatResponse, GroupError>>,
}

/// The state of one shard's task.
struct ShardTask {
    broker: Arc<Broker>,
    partition: Arc<Partition>,
    leader_epoch: u32,
    shard: Shard,
    /// The log end after the last append: what answers wait to be committed.
    end: Offset,
    /// The role generation requests are being answered under.
    generation: u64,
    /// By (group, member): a member has one heartbeat in flight.
    parked: HashMap<(String, String), Parked>,
}

/// The task must end (leadership lost, or an append failed).
struct Stop;

impl ShardTask {
    /// Appends `records` (if any) as leader, then sends `reply` on a task of
    /// its own once the high watermark passes everything appended so far.
    fn commit_then(&mut self, records: &[CoordinatorRecord], reply: Option<Reply>) -> Result<(), Stop> {
        let mut generation = self.generation;
        if !records.is_empty() {
            let appended = encode(records, now_ms()).and_then(|batch| {
                let index = self.partition.index();
                self.partition.append_internal(&batch, self.leader_epoch).map_err(|e| group_error(&e, index))
            });
            match appended {
                Ok((info, g)) => {
                    self.end = info.log_end_offset;
                    generation = g;
                }
                Err(e) => {
                    // The shard applied records the log does not hold: end
                    // here; the next load starts from the log.
                    tracing::warn!(partition = self.partition.index(), error = %e, "cannot append coordinator records; reloading");
                    if let Some(reply) = reply {
                        reply(Err(e));
                    }
                    return Err(Stop);
                }
            }
        }
        let Some(reply) = reply else { return Ok(()) };
        let (p, wait_for, leader_epoch) = (self.partition.clone(), self.end, self.leader_epoch);
        tokio::spawn(async move {
            let outcome = p.wait_committed(wait_for, leader_epoch, generation, COMMIT_TIMEOUT).await;
            reply(outcome.map_err(|e| group_error(&e, p.index())));
        });
        Ok(())
    }

    /// Runs a heartbeat: parks it while it has nothing new to tell (and
    /// `max_wait` allows), else answers it once its records are committed.
    /// Returns the groups whose records changed.
    fn heartbeat(
        &mut self,
        req: HeartbeatRequest,
        deadline: Option<tokio::time::Instant>,
        reply: oneshot::Sender<Result<HeartbeatResponse, GroupError>>,
        topics: &TopicsView,
    ) -> Result<Option<String>, Stop> {
        // A member has one heartbeat in flight; an older parked one is moot.
        self.parked.remove(&(req.group.clone(), req.member_id.clone()));
        match self.shard.heartbeat(&req, topics, now_ms()) {
            Err(e) => {
                let _ = reply.send(Err(e));
                Ok(None)
            }
            Ok((records, response)) => {
                let idle = records.is_empty()
                    && response.member_epoch == req.member_epoch
                    && req.owned.as_ref() == Some(&response.assignment);
                // Never parked past the member's heartbeat interval: its
                // session is refreshed only when the heartbeat runs.
                let now = tokio::time::Instant::now();
                let longest = now + Duration::from_millis(u64::from(response.heartbeat_interval_ms));
                if idle && let Some(deadline) = deadline.map(|d| d.min(longest)).filter(|d| *d > now) {
                    let key = (req.group.clone(), req.member_id.clone());
                    self.parked.insert(key, Parked { req, deadline, reply });
                    return Ok(None);
                }
                let changed = changes_membership(&records).then(|| req.group.clone());
                let reply: Reply = Box::new(move |outcome| drop(reply.send(outcome.map(|()| response))));
                self.commit_then(&records, Some(reply))?;
                Ok(changed)
            }
        }
    }

    /// Runs again the parked heartbeats of `groups` (their group changed)
    /// and, with `expired`, those past their deadline; repeats while that
    /// changes more groups.
    fn wake(&mut self, mut groups: BTreeSet<String>, expired: bool) -> Result<(), Stop> {
        let topics = topics_view(&self.broker);
        let mut expired = expired;
        while !groups.is_empty() || expired {
            let now = tokio::time::Instant::now();
            let due_keys: Vec<(String, String)> = self
                .parked
                .iter()
                .filter(|(_, p)| groups.contains(&p.req.group) || (expired && p.deadline <= now) || p.reply.is_closed())
                .map(|(k, _)| k.clone())
                .collect();
            let due: Vec<Parked> = due_keys.iter().filter_map(|k| self.parked.remove(k)).collect();
            groups.clear();
            expired = false;
            for p in due {
                if p.reply.is_closed() {
                    continue;
                }
                let deadline = (p.deadline > now).then_some(p.deadline);
                if let Some(g) = self.heartbeat(p.req, deadline, p.reply, &topics)? {
                    groups.insert(g);
                }
            }
        }
        Ok(())
    }
}

async fn run_shard(
    broker: Arc<Broker>,
    partition: Arc<Partition>,
    leader_epoch: u32,
    shard: Shard,
    mut ops: mpsc::Receiver<Op>,
    loaded: Arc<AtomicBool>,
) {
    let index = partition.index();
    let loading = partition.clone();
    let mut shard = shard;
    let outcome = tokio::task::spawn_blocking(move || {
        let r = load(&loading, &mut shard, now_ms());
        (shard, r)
    })
    .await;
    let (shard, end) = match outcome {
        Ok((shard, Ok(end))) => (shard, end),
        Ok((_, Err(e))) => {
            tracing::error!(partition = index, error = %e, "cannot load the group coordinator's state; retrying");
            tokio::time::sleep(Duration::from_secs(1)).await;
            return;
        }
        Err(e) => {
            tracing::error!(partition = index, error = %e, "coordinator load task failed");
            return;
        }
    };
    loaded.store(true, Ordering::Release);
    tracing::info!(partition = index, leader_epoch, groups = shard.group_count(), "group coordinator loaded");
    let generation = partition.role_generation();
    let mut task = ShardTask { broker, partition, leader_epoch, shard, end, generation, parked: HashMap::new() };
    let mut tick = tokio::time::interval(TICK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let step = tokio::select! {
            op = ops.recv() => {
                let Some(op) = op else { return };
                task.generation = task.partition.role_generation();
                if !task.partition.leads_live(leader_epoch) {
                    // Dropping the op drops its answer's sender: the caller
                    // hears NOT_COORDINATOR and finds the new coordinator.
                    return;
                }
                let topics = topics_view(&task.broker);
                match op {
                    Op::Job(job) => {
                        let (records, reply) = job(&mut task.shard, &topics, now_ms());
                        let groups = membership_groups(&records);
                        task.commit_then(&records, Some(reply)).and_then(|()| task.wake(groups, false))
                    }
                    Op::Heartbeat { req, max_wait, reply } => {
                        let deadline = (!max_wait.is_zero()).then(|| tokio::time::Instant::now() + max_wait);
                        match task.heartbeat(*req, deadline, reply, &topics) {
                            Ok(Some(group)) => task.wake(BTreeSet::from([group]), false),
                            Ok(None) => Ok(()),
                            Err(stop) => Err(stop),
                        }
                    }
                }
            }
            _ = tick.tick() => {
                if !task.partition.leads_live(leader_epoch) {
                    return;
                }
                task.generation = task.partition.role_generation();
                let records = task.shard.tick(now_ms());
                let groups = membership_groups(&records);
                task.commit_then(&records, None).and_then(|()| task.wake(groups, true))
            }
        };
        if step.is_err() {
            return;
        }
    }
}
