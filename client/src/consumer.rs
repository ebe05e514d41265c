//! [`Consumer`]: reads assigned partitions, fetching ahead in the background.
//!
//! Manual assignment: the caller names partitions and where to start. Once
//! something is read, a background task keeps one long-poll fetch per leader
//! broker going and buffers what comes back, up to `max_prefetch_bytes`, so
//! fetching overlaps processing. [`Consumer::poll`] takes every buffered
//! record; [`Consumer::stream`] yields them one by one. Both borrow the
//! consumer, so it stays usable while streaming: seek, pause, resume,
//! position and assignment changes take effect at once (buffered records of
//! a partition that was moved are dropped).
//!
//! Invariants:
//! - `position` is the offset after the last record handed out; the fetcher
//!   reads from `fetch_position` (ahead of it by what is buffered).
//! - Every seek, pause or reassignment bumps the partition's `generation`;
//!   fetched data of an older generation is dropped, never handed out.
//! - The state lock is never held across an `.await`.

use std::collections::{BTreeMap, VecDeque};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use futures_util::Stream;
use tally_proto::ErrorCode;
use tally_proto::batch::RawHeaders;
use tally_proto::v1::{self as pb};
use tokio::sync::Notify;

use crate::client::Client;
use crate::error::{Error, Result};
use crate::fetch_buffer::Chunk;
use crate::group::{CommittedOffset, CoordinatorClient, TopicPartitions};
use crate::membership::{GroupShared, RebalanceEvent};
use crate::partition_client::{OffsetSpec, decode_fetch, list_offset_rpc};

/// Where to start reading a partition.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SeekTo {
    /// The first offset still in the log.
    Beginning,
    /// After the last record (only new records).
    End,
    /// A given offset.
    Offset(i64),
    /// The first record with a timestamp >= this (ms); the end if none.
    Timestamp(i64),
}

/// What to do when the position is outside the log (deleted by retention,
/// say).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OffsetReset {
    /// Jump to the first offset.
    Earliest,
    /// Jump to the end.
    Latest,
    /// Report `OFFSET_OUT_OF_RANGE`.
    Error,
}

/// Settings of a [`Consumer`]. Start from `default()` and set fields.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct ConsumerConfig {
    /// Longest a fetch waits for data, and longest `poll` waits. Default 500 ms.
    pub max_wait: Duration,
    /// Largest fetch response. Default 16 MiB.
    pub max_bytes: u32,
    /// Largest share of one partition in a response. Default 8 MiB.
    pub partition_max_bytes: u32,
    /// Bytes of fetched records held ahead of the reader; fetching pauses
    /// above it. Each partition may go past it by one batch (a fetch always
    /// returns at least one). Default 32 MiB.
    pub max_prefetch_bytes: usize,
    /// Reaction to an out-of-range position, and where a group member
    /// starts a partition without a committed offset. Default
    /// [`OffsetReset::Latest`] (Kafka's default).
    pub auto_offset_reset: OffsetReset,
    /// The consumer group to join on [`Consumer::subscribe`]. Default none.
    pub group_id: Option<String>,
    /// Commit, every `auto_commit_interval`, what the application is done
    /// with: the records `poll` / `stream` handed out before it last asked
    /// for more (also before a partition is revoked; on close, everything
    /// handed out). Default on.
    pub enable_auto_commit: bool,
    /// Default 5 s.
    pub auto_commit_interval: Duration,
    /// The group session: the coordinator removes a member it has not heard
    /// from for this long. Default: the broker's (45 s).
    pub session_timeout: Option<Duration>,
    /// A group member that does not poll for this long leaves the group
    /// (and rejoins at its next poll); also how long it may take to give up
    /// revoked partitions. Default 5 min.
    pub max_poll_interval: Duration,
    /// The server assignor to ask for: `uniform` (default) or `range`.
    pub group_assignor: Option<String>,
}

impl Default for ConsumerConfig {
    fn default() -> Self {
        ConsumerConfig {
            max_wait: Duration::from_millis(500),
            max_bytes: 16 << 20,
            partition_max_bytes: 8 << 20,
            max_prefetch_bytes: 32 << 20,
            auto_offset_reset: OffsetReset::Latest,
            group_id: None,
            enable_auto_commit: true,
            auto_commit_interval: Duration::from_secs(5),
            session_timeout: None,
            max_poll_interval: Duration::from_secs(300),
            group_assignor: None,
        }
    }
}

/// A record read from a partition. Key, value and headers are slices of the
/// fetched bytes (nothing is copied); headers are decoded when iterated.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct ConsumerRecord {
    /// Topic.
    pub topic: Arc<str>,
    /// Partition.
    pub partition: u32,
    /// Offset.
    pub offset: i64,
    /// Timestamp (ms).
    pub timestamp: i64,
    /// Key.
    pub key: Option<Bytes>,
    /// Value.
    pub value: Option<Bytes>,
    /// Headers, in order.
    pub headers: Headers,
}

/// A record's headers, decoded lazily.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Headers(RawHeaders);

impl Headers {
    pub(crate) fn from_raw(raw: RawHeaders) -> Headers {
        Headers(raw)
    }

    /// Iterates `(key, value)` pairs in order. Keys are UTF-8 (the broker
    /// refuses batches whose header keys are not).
    pub fn iter(&self) -> impl Iterator<Item = (String, Option<Bytes>)> + '_ {
        self.0.iter().map_while(std::result::Result::ok).map(|(k, v)| (String::from_utf8_lossy(&k).into_owned(), v))
    }

    /// The value of the first header named `key` (`Some(None)`: present, null).
    pub fn get(&self, key: &str) -> Option<Option<Bytes>> {
        self.0.iter().map_while(std::result::Result::ok).find(|(k, _)| k.as_ref() == key.as_bytes()).map(|(_, v)| v)
    }

    /// Number of headers.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// True when there are none.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

type Key = (Arc<str>, u32);

#[derive(Debug, Clone)]
struct Assigned {
    /// Next offset to hand out.
    position: i64,
    /// Next offset to fetch.
    fetch_position: i64,
    high_watermark: i64,
    generation: u64,
    paused: bool,
    /// A non-retriable error was reported; not fetched until a seek.
    failed: bool,
    /// Being taken away by the group: nothing more is fetched or handed out.
    revoking: bool,
    /// The poll cycle that last moved `position`, and the position before
    /// that cycle: what the application is done with (see `committable`).
    cycle: u64,
    committable: i64,
}

impl Assigned {
    fn new(position: i64) -> Assigned {
        Assigned {
            position,
            fetch_position: position,
            high_watermark: -1,
            generation: 0,
            paused: false,
            failed: false,
            revoking: false,
            cycle: 0,
            committable: position,
        }
    }

    /// Moves the position in poll cycle `cycle`.
    fn advance(&mut self, to: i64, cycle: u64) {
        if self.cycle != cycle {
            self.committable = self.position;
            self.cycle = cycle;
        }
        self.position = self.position.max(to);
    }

    /// The position the application is done with: everything handed out
    /// before the current poll cycle (a `poll`, or a stream item, asked for
    /// after records means those records were processed).
    fn committable(&self, cycle: u64) -> i64 {
        if self.cycle < cycle { self.position } else { self.committable }
    }
}

#[derive(Debug, Default)]
struct State {
    assigned: BTreeMap<Key, Assigned>,
    buffered: VecDeque<Chunk>,
    buffered_bytes: usize,
    /// Failures waiting to be reported, one per failed partition at most.
    errors: VecDeque<Error>,
    /// The retriable error of the last fetch round, when it reached no
    /// leader at all (cleared by the next round that does).
    fetch_failure: Option<Error>,
    next_generation: u64,
    /// When `poll` or the stream last asked for records.
    last_poll: Option<std::time::Instant>,
    /// Counts `poll` calls and stream item requests.
    cycle: u64,
    /// The application is waiting inside `poll` or the stream, holding no
    /// record of the current cycle.
    in_poll: bool,
    /// A revocation waits for the application to ask for records again.
    revoke_waiting: bool,
}

impl State {
    fn bump(&mut self, key: &Key) {
        self.next_generation += 1;
        let generation = self.next_generation;
        if let Some(a) = self.assigned.get_mut(key) {
            a.generation = generation;
        }
        self.drop_buffered(key);
    }

    fn drop_buffered(&mut self, key: &Key) {
        let mut freed = 0;
        self.buffered.retain(|c| {
            let keep = c.key != *key;
            if !keep {
                freed += c.bytes;
            }
            keep
        });
        self.buffered_bytes -= freed;
    }

    /// Hands out up to `limit` buffered records to `sink`, moving their
    /// partitions' positions; returns how many. A record that does not
    /// decode fails its partition (reported once, as a fetch error would
    /// be) after the records before it.
    fn take_records(&mut self, limit: usize, mut sink: impl FnMut(ConsumerRecord)) -> usize {
        let mut taken = 0;
        let cycle = self.cycle;
        while taken < limit {
            let State { buffered, assigned, errors, .. } = self;
            let Some(chunk) = buffered.front_mut() else { break };
            let state = assigned.get_mut(&chunk.key).filter(|a| a.generation == chunk.generation);
            let Some(a) = state.filter(|a| !a.paused && !a.revoking) else {
                self.pop_chunk();
                continue;
            };
            let done = chunk.take(limit - taken, &mut sink);
            taken += done.count;
            if let Some(after) = done.after {
                a.advance(after, cycle);
            }
            if let Some(e) = done.failure {
                tracing::warn!(topic = %chunk.key.0, partition = chunk.key.1, error = %e, "partition failed");
                a.failed = true;
                errors.push_back(Error::Corrupt(e));
                // A new generation: what the fetcher has in flight for the
                // partition is dropped when it lands, not handed out past
                // the records this chunk still held.
                let key = chunk.key.clone();
                self.bump(&key);
                continue;
            }
            if !chunk.is_exhausted() {
                break; // the limit was reached
            }
            self.pop_chunk();
        }
        taken
    }

    /// Records buffered at most (to size what `poll` returns).
    fn records_hint(&self) -> usize {
        self.buffered.iter().map(|c| c.records_hint).sum()
    }

    /// Drops the front chunk; a live one that was handed out whole moves its
    /// partition's position to the chunk's end.
    fn pop_chunk(&mut self) {
        if let Some(c) = self.buffered.pop_front() {
            let cycle = self.cycle;
            if c.is_exhausted()
                && let Some(a) = self.assigned.get_mut(&c.key).filter(|a| a.generation == c.generation)
            {
                a.advance(c.next_offset, cycle);
            }
            self.buffered_bytes -= c.bytes;
        }
    }
}

#[derive(Debug)]
pub(crate) struct Inner {
    client: Client,
    config: ConsumerConfig,
    group: Option<Arc<GroupShared>>,
    state: Mutex<State>,
    /// Fetcher to readers: records or an error were buffered.
    data: Notify,
    /// Readers to fetcher: buffer space was freed or the assignment changed.
    space: Notify,
    fetcher_started: AtomicBool,
}

impl Inner {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    pub(crate) fn config(&self) -> &ConsumerConfig {
        &self.config
    }

    pub(crate) fn client(&self) -> &Client {
        &self.client
    }

    /// Starts reading a partition from `from`.
    pub(crate) async fn start_partition(&self, topic: &str, partition: u32, from: SeekTo) -> Result<()> {
        let info = self.client.topic_info(topic).await?;
        if partition as usize >= info.leaders.len() {
            return Err(Error::Broker {
                code: ErrorCode::UnknownTopicOrPartition,
                message: format!("topic `{topic}` has {} partitions", info.leaders.len()),
                topic: topic.to_string(),
                partition: Some(partition),
            });
        }
        let position = resolve(&self.client, topic, partition, from).await?;
        let key: Key = (Arc::from(topic), partition);
        let mut st = self.lock();
        let entry = st.assigned.entry(key.clone()).or_insert(Assigned::new(position));
        entry.position = position;
        entry.fetch_position = position;
        entry.committable = position;
        entry.cycle = 0;
        entry.failed = false;
        st.bump(&key);
        drop(st);
        self.space.notify_one();
        Ok(())
    }

    /// Stops reading a partition, dropping what was fetched ahead for it.
    pub(crate) fn stop_partition(&self, topic: &str, partition: u32) {
        let key: Key = (Arc::from(topic), partition);
        let mut st = self.lock();
        st.drop_buffered(&key);
        st.assigned.remove(&key);
    }

    /// The positions of those of `partitions` that are being read: what was
    /// handed out, or (`done_only`) what the application is done with.
    pub(crate) fn positions(
        &self,
        partitions: &crate::group::TopicPartitions,
        done_only: bool,
    ) -> BTreeMap<(String, u32), i64> {
        let st = self.lock();
        let mut out = BTreeMap::new();
        for (t, ps) in partitions {
            for p in ps {
                if let Some(a) = st.assigned.get(&(Arc::from(t.as_str()), *p)) {
                    out.insert((t.clone(), *p), if done_only { a.committable(st.cycle) } else { a.position });
                }
            }
        }
        out
    }

    /// Stops handing out and fetching `partitions` (the group takes them
    /// away); returns the poll cycle to wait past.
    pub(crate) fn begin_revoke(&self, partitions: &[(String, u32)]) -> u64 {
        let mut st = self.lock();
        for (t, p) in partitions {
            let key: Key = (Arc::from(t.as_str()), *p);
            if let Some(a) = st.assigned.get_mut(&key) {
                a.revoking = true;
            }
            // A new generation drops what is buffered and what is in flight.
            st.bump(&key);
        }
        st.revoke_waiting = true;
        st.cycle
    }

    /// True once the application holds no record handed out before the
    /// revocation began at `mark`: it asked for records again, or waits
    /// inside `poll`.
    pub(crate) fn revoke_ready(&self, mark: u64) -> bool {
        let st = self.lock();
        st.cycle > mark || st.in_poll
    }

    pub(crate) fn end_revoke(&self) {
        self.lock().revoke_waiting = false;
    }

    /// Hands `e` to the next `poll` (or stream item).
    pub(crate) fn report(&self, e: Error) {
        self.lock().errors.push_back(e);
        self.data.notify_waiters();
    }

    /// How long since `poll` or the stream last asked for records (`None`
    /// before the first time, and while the application waits inside them:
    /// it is not stuck then, there is just nothing to hand out).
    pub(crate) fn since_last_poll(&self) -> Option<Duration> {
        let st = self.lock();
        if st.in_poll {
            return None;
        }
        st.last_poll.map(|t| t.elapsed())
    }

    /// Notes a poll (a new poll cycle); wakes a revocation waiting for it,
    /// and a membership that left for want of one.
    fn polled(&self, st: &mut State) {
        st.cycle += 1;
        if let Some(g) = &self.group {
            st.last_poll = Some(std::time::Instant::now());
            if st.revoke_waiting {
                g.polled.notify_waiters();
            }
            if g.member().left.is_some() {
                g.wake.notify_one();
            }
        }
    }
}

/// Reads records from assigned partitions.
///
/// ```no_run
/// # async fn demo(client: tally_client::Client) -> Result<(), tally_client::Error> {
/// use futures_util::StreamExt;
/// use tally_client::{Consumer, ConsumerConfig, SeekTo};
/// let consumer = Consumer::new(client, ConsumerConfig::default());
/// consumer.assign("orders", 0, SeekTo::Beginning).await?;
/// let mut records = consumer.stream();
/// while let Some(record) = records.next().await {
///     let record = record?;
///     println!("{}: {:?}", record.offset, record.value);
///     if record.offset == 100 {
///         consumer.seek("orders", 0, SeekTo::Offset(0)).await?; // while streaming
///     }
/// }
/// # Ok(()) }
/// ```
#[derive(Debug)]
pub struct Consumer {
    inner: Arc<Inner>,
    fetcher: Mutex<Option<tokio::task::JoinHandle<()>>>,
    membership: Mutex<Option<tokio::task::JoinHandle<()>>>,
}

impl Drop for Consumer {
    fn drop(&mut self) {
        if let Some(task) = self.fetcher.lock().unwrap_or_else(std::sync::PoisonError::into_inner).take() {
            task.abort();
        }
        if let Some(task) = self.membership.lock().unwrap_or_else(std::sync::PoisonError::into_inner).take() {
            task.abort();
        }
    }
}

impl Consumer {
    /// A consumer with nothing assigned.
    pub fn new(client: Client, config: ConsumerConfig) -> Consumer {
        let group =
            config.group_id.clone().map(|g| Arc::new(GroupShared::new(CoordinatorClient::new(client.clone(), g))));
        let inner = Arc::new(Inner {
            client,
            config,
            group,
            state: Mutex::new(State::default()),
            data: Notify::new(),
            space: Notify::new(),
            fetcher_started: AtomicBool::new(false),
        });
        Consumer { inner, fetcher: Mutex::new(None), membership: Mutex::new(None) }
    }

    /// Starts reading `topic`/`partition` from `from` (replacing any earlier
    /// position for it).
    pub async fn assign(&self, topic: &str, partition: u32, from: SeekTo) -> Result<()> {
        self.inner.start_partition(topic, partition, from).await
    }

    /// Moves an assigned partition's position (dropping what was fetched
    /// ahead for it); clears a reported failure.
    pub async fn seek(&self, topic: &str, partition: u32, to: SeekTo) -> Result<()> {
        self.assign(topic, partition, to).await
    }

    /// Stops reading a partition.
    pub fn unassign(&self, topic: &str, partition: u32) {
        self.inner.stop_partition(topic, partition);
    }

    /// The assigned partitions.
    pub fn assignment(&self) -> Vec<(Arc<str>, u32)> {
        self.inner.lock().assigned.keys().cloned().collect()
    }

    /// Stops fetching and handing out a partition's records until
    /// [`Consumer::resume`]; its position stays where it is.
    pub fn pause(&self, topic: &str, partition: u32) {
        self.set_paused(topic, partition, true);
    }

    /// Resumes a paused partition from its position.
    pub fn resume(&self, topic: &str, partition: u32) {
        self.set_paused(topic, partition, false);
        self.inner.space.notify_one();
    }

    fn set_paused(&self, topic: &str, partition: u32, paused: bool) {
        let key: Key = (Arc::from(topic), partition);
        let mut st = self.inner.lock();
        let Some(a) = st.assigned.get_mut(&key) else { return };
        if a.paused == paused {
            return;
        }
        a.paused = paused;
        a.fetch_position = a.position;
        st.bump(&key);
    }

    /// The next offset to be handed out for a partition.
    pub fn position(&self, topic: &str, partition: u32) -> Option<i64> {
        self.inner.lock().assigned.get(&(Arc::from(topic), partition)).map(|a| a.position)
    }

    /// The high watermark seen by the last fetch of a partition (-1 before).
    pub fn high_watermark(&self, topic: &str, partition: u32) -> Option<i64> {
        self.inner.lock().assigned.get(&(Arc::from(topic), partition)).map(|a| a.high_watermark)
    }

    /// Bytes fetched ahead and not yet handed out (at most
    /// `max_prefetch_bytes`, plus one batch per partition).
    pub fn buffered_bytes(&self) -> usize {
        self.inner.lock().buffered_bytes
    }

    /// True when every assigned, unpaused partition's position has reached
    /// the high watermark of its last fetch.
    pub fn at_end(&self) -> bool {
        let st = self.inner.lock();
        st.assigned.values().filter(|a| !a.paused).all(|a| a.high_watermark >= 0 && a.position >= a.high_watermark)
    }

    fn start_fetcher(&self) {
        if self.inner.fetcher_started.swap(true, Ordering::AcqRel) {
            return;
        }
        let task = tokio::spawn(run_fetcher(self.inner.clone()));
        *self.fetcher.lock().unwrap_or_else(std::sync::PoisonError::into_inner) = Some(task);
    }

    /// Every buffered record, waiting up to `max_wait` for some. Records of
    /// healthy partitions come before any partition's failure: a failure is
    /// returned by a call that has no records to return. When nothing came
    /// because no leader could be reached, that retriable error is returned
    /// (the background fetching goes on; call again to ride it out).
    pub async fn poll(&self) -> Result<Vec<ConsumerRecord>> {
        self.start_fetcher();
        let deadline = tokio::time::Instant::now() + self.inner.config.max_wait;
        let mut first = true;
        loop {
            let notified = self.inner.data.notified();
            {
                let mut st = self.inner.lock();
                if first {
                    self.inner.polled(&mut st);
                    first = false;
                }
                if st.assigned.is_empty() && self.inner.group.is_none() {
                    return Err(Error::InvalidArgument("no partition is assigned".into()));
                }
                // A hint from CRC-checked headers; capped all the same.
                let mut out = Vec::with_capacity(st.records_hint().min(1 << 16));
                let before = st.buffered_bytes;
                st.take_records(usize::MAX, |r| out.push(r));
                if st.buffered_bytes < before {
                    // Space freed, whatever is returned: a corrupt batch or
                    // stale chunks free it too, and the fetcher may be
                    // waiting for it.
                    self.inner.space.notify_one();
                }
                if !out.is_empty() {
                    st.in_poll = false;
                    return Ok(out);
                }
                if let Some(e) = st.errors.pop_front() {
                    st.in_poll = false;
                    return Err(e);
                }
                st.in_poll = true;
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                // Nothing came: say why if no leader could be reached.
                let mut st = self.inner.lock();
                st.in_poll = false;
                return match st.fetch_failure.clone() {
                    Some(e) => Err(e),
                    None => Ok(Vec::new()),
                };
            }
        }
    }

    /// The records of every assigned partition as a stream, borrowing the
    /// consumer so it can still seek, pause or report its position.
    /// In a group, asking for the next item tells the consumer the previous
    /// ones are processed (what auto-commit commits, and when a revoked
    /// partition may go): adapters that read ahead (`ready_chunks`,
    /// `buffer_unordered`, ...) void that; batch with `poll` instead.
    /// Retriable errors (a broker restarting, a leader moving) are ridden out
    /// in the background; any other error is yielded once, its partition
    /// stops until it is sought again, and the stream goes on with the rest.
    pub fn stream(&self) -> RecordStream<'_> {
        self.start_fetcher();
        RecordStream { consumer: self, waiting: None }
    }

    fn group(&self) -> Result<&Arc<GroupShared>> {
        self.inner
            .group
            .as_ref()
            .ok_or_else(|| Error::InvalidArgument("this consumer has no group: set ConsumerConfig::group_id".into()))
    }

    /// Joins the consumer's group (`group_id`) subscribed to `topics`: the
    /// coordinator assigns this consumer a share of their partitions, and
    /// `poll` / `stream` read those, each from its committed offset. Calling
    /// it again changes the subscription.
    pub fn subscribe(&self, topics: &[&str]) -> Result<()> {
        self.subscribe_with(topics.iter().map(|t| t.to_string()).collect(), String::new())
    }

    /// Like [`Consumer::subscribe`], with every topic whose whole name
    /// matches `pattern` (a regular expression, matched by the coordinator;
    /// topics created later are picked up).
    pub fn subscribe_pattern(&self, pattern: &str) -> Result<()> {
        if pattern.is_empty() {
            return Err(Error::InvalidArgument("the subscription pattern is empty".into()));
        }
        self.subscribe_with(Vec::new(), pattern.to_string())
    }

    fn subscribe_with(&self, topics: Vec<String>, regex: String) -> Result<()> {
        let group = self.group()?.clone();
        if group.closing.load(Ordering::Acquire) {
            return Err(Error::Closed);
        }
        {
            let mut m = group.member();
            m.topics = topics;
            m.regex = regex;
        }
        let mut task = self.membership.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if task.is_none() {
            *task = Some(tokio::spawn(crate::membership::run(self.inner.clone(), group.clone())));
        }
        group.wake.notify_one();
        Ok(())
    }

    /// Calls `listener` on every change of the partitions this group member
    /// owns. A revocation is reported once the application has asked for
    /// records again (so it holds none of those partitions' records), before
    /// they are released and before their positions are auto-committed: the
    /// place to flush state kept per partition. Runs on the membership task:
    /// keep it short.
    pub fn on_rebalance(&self, listener: impl Fn(&RebalanceEvent) + Send + Sync + 'static) -> Result<()> {
        self.group()?.set_listener(Arc::new(listener));
        Ok(())
    }

    /// Commits `record`'s partition at the offset after it; returns once the
    /// commit is replicated. Refused (STALE_MEMBER_EPOCH) when this consumer
    /// no longer owns the partition.
    pub async fn commit(&self, record: &ConsumerRecord) -> Result<()> {
        let offsets = BTreeMap::from([((record.topic.to_string(), record.partition), record.offset + 1)]);
        self.commit_offsets(&offsets).await
    }

    /// Commits offsets (each the next offset to read) as this group member;
    /// returns once replicated. Commits of one consumer apply in the order
    /// they were made.
    pub async fn commit_offsets(&self, offsets: &BTreeMap<(String, u32), i64>) -> Result<()> {
        self.group()?.commit(offsets).await
    }

    /// Commits the positions `poll` / `stream` have handed out for every
    /// owned partition; returns once replicated.
    pub async fn commit_positions(&self) -> Result<()> {
        let group = self.group()?;
        let owned = group.member().owned.clone();
        let positions = self.inner.positions(&owned, false);
        group.commit(&positions).await
    }

    /// Like [`Consumer::commit_offsets`] without waiting: the commit runs in
    /// the background (in order with the others); the handle tells how it
    /// went.
    pub fn commit_async(&self, offsets: BTreeMap<(String, u32), i64>) -> Result<tokio::task::JoinHandle<Result<()>>> {
        let group = self.group()?.clone();
        Ok(tokio::spawn(async move { group.commit(&offsets).await }))
    }

    /// The group's committed offsets for `partitions` (all of them when
    /// empty).
    pub async fn committed(&self, partitions: &TopicPartitions) -> Result<BTreeMap<(String, u32), CommittedOffset>> {
        self.group()?.coordinator.fetch_offsets(partitions).await
    }

    /// The partitions the group assigned to this consumer, and its member id
    /// and epoch (-1 after close, 0 while joining).
    pub fn group_assignment(&self) -> Option<(String, i32, TopicPartitions)> {
        let group = self.inner.group.as_ref()?;
        let m = group.member();
        Some((m.member_id.clone(), m.epoch, m.owned.clone()))
    }

    /// Leaves the group: commits what was handed out (with auto-commit) and
    /// tells the coordinator, so the others take the partitions over at
    /// once. Without a group, stops fetching.
    pub async fn close(&self) -> Result<()> {
        if let Some(group) = &self.inner.group {
            group.closing.store(true, Ordering::Release);
            group.wake.notify_one();
            let task = self.membership.lock().unwrap_or_else(std::sync::PoisonError::into_inner).take();
            if let Some(task) = task {
                let _ = task.await;
            }
        }
        if let Some(task) = self.fetcher.lock().unwrap_or_else(std::sync::PoisonError::into_inner).take() {
            task.abort();
        }
        Ok(())
    }
}

/// The offset `from` means for a partition.
pub(crate) async fn resolve(client: &Client, topic: &str, partition: u32, from: SeekTo) -> Result<i64> {
    let spec = match from {
        SeekTo::Offset(o) => return Ok(o),
        SeekTo::Beginning => OffsetSpec::Earliest,
        SeekTo::End => OffsetSpec::Latest,
        SeekTo::Timestamp(ts) => OffsetSpec::Timestamp(ts),
    };
    match list_offset_rpc(client, topic, partition, spec).await? {
        Some(o) => Ok(o),
        None => Ok(list_offset_rpc(client, topic, partition, OffsetSpec::Latest).await?.unwrap_or(0)),
    }
}

/// Records of a [`Consumer`], one at a time. See [`Consumer::stream`].
pub struct RecordStream<'a> {
    consumer: &'a Consumer,
    waiting: Option<Pin<Box<tokio::sync::futures::Notified<'a>>>>,
}

impl std::fmt::Debug for RecordStream<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RecordStream").finish_non_exhaustive()
    }
}

impl Stream for RecordStream<'_> {
    type Item = Result<ConsumerRecord>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let inner = &self.consumer.inner;
        loop {
            // Registered before looking, so a record buffered in between wakes us.
            let waiting = self.waiting.get_or_insert_with(|| Box::pin(inner.data.notified()));
            waiting.as_mut().enable();
            let (item, freed) = {
                let mut st = inner.lock();
                inner.polled(&mut st);
                let before = st.buffered_bytes;
                let mut record = None;
                st.take_records(1, |r| record = Some(r));
                let item = match record {
                    Some(r) => Some(Ok(r)),
                    None => st.errors.pop_front().map(Err),
                };
                st.in_poll = item.is_none();
                (item, st.buffered_bytes < before)
            };
            if freed {
                inner.space.notify_one();
            }
            if let Some(item) = item {
                return Poll::Ready(Some(item));
            }
            match self.waiting.as_mut().expect("set above").as_mut().poll(cx) {
                Poll::Ready(()) => self.waiting = None,
                Poll::Pending => return Poll::Pending,
            }
        }
    }
}

/// One partition to fetch in a round.
struct Target {
    key: Key,
    offset: i64,
    generation: u64,
}

/// Keeps fetching for the consumer while there is buffer space.
async fn run_fetcher(inner: Arc<Inner>) {
    let mut backoff = Duration::from_millis(100);
    loop {
        let space = inner.space.notified();
        let (targets, budget) = {
            let st = inner.lock();
            let budget = inner.config.max_prefetch_bytes.saturating_sub(st.buffered_bytes);
            let targets: Vec<Target> = st
                .assigned
                .iter()
                .filter(|(_, a)| !a.paused && !a.failed && !a.revoking)
                .map(|(k, a)| Target { key: k.clone(), offset: a.fetch_position, generation: a.generation })
                .collect();
            (targets, budget)
        };
        if targets.is_empty() || budget == 0 {
            space.await;
            continue;
        }
        let round = fetch_round(&inner, targets, budget).await;
        let failing = round.is_err();
        let was_failing = {
            let mut st = inner.lock();
            std::mem::replace(&mut st.fetch_failure, round.err()).is_some()
        };
        inner.data.notify_waiters();
        match (was_failing, failing) {
            (false, true) => tracing::warn!(?backoff, "cannot fetch from any leader; retrying"),
            (true, false) => tracing::info!("fetching again"),
            _ => {}
        }
        if failing {
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(Duration::from_secs(5));
        } else {
            backoff = Duration::from_millis(100);
        }
    }
}

/// One fetch per leader broker, all at once. The first retriable error
/// when no fetch got an answer (every one failed at the transport or for
/// want of a leader): the caller backs off.
async fn fetch_round(inner: &Arc<Inner>, targets: Vec<Target>, budget: usize) -> Result<()> {
    let client = &inner.client;
    let mut by_leader: BTreeMap<String, Vec<Target>> = BTreeMap::new();
    let mut progressed = false;
    let mut failure: Option<Error> = None;
    for t in targets {
        match client.leader_address(&t.key.0, t.key.1).await {
            Ok(address) => by_leader.entry(address).or_default().push(t),
            Err(e) if e.is_retriable() => {
                tracing::debug!(topic = %t.key.0, partition = t.key.1, error = %e, "no leader to fetch from");
                client.invalidate(&t.key.0);
                failure.get_or_insert(e);
            }
            Err(e) => report(inner, &t, e),
        }
    }
    let config = &inner.config;
    // The budget is shared by the brokers fetched from at once.
    let share = budget / by_leader.len().max(1);
    let max_bytes = u32::try_from(share).unwrap_or(u32::MAX).min(config.max_bytes).max(1);
    let timeout = client.config().request_timeout + config.max_wait;
    let calls = by_leader.iter().map(|(address, targets)| {
        let mut topics: Vec<pb::FetchTopic> = Vec::new();
        for t in targets {
            let fp = pb::FetchPartition {
                partition: t.key.1,
                fetch_offset: t.offset,
                partition_max_bytes: config.partition_max_bytes.min(max_bytes),
            };
            match topics.last_mut() {
                Some(ft) if ft.name == *t.key.0 => ft.partitions.push(fp),
                _ => topics.push(pb::FetchTopic { name: t.key.0.to_string(), partitions: vec![fp] }),
            }
        }
        let request = pb::FetchRequest {
            max_wait_ms: u32::try_from(config.max_wait.as_millis()).unwrap_or(u32::MAX),
            min_bytes: 1,
            max_bytes,
            topics,
        };
        let rpc = client.rpc_at(address);
        async move {
            let mut rpc = rpc?;
            let mut call = tonic::Request::new(request);
            call.set_timeout(timeout);
            rpc.fetch(call).await.map(tonic::Response::into_inner).map_err(Error::from)
        }
    });
    let answers = futures_util::future::join_all(calls).await;
    for (answer, (address, targets)) in answers.into_iter().zip(by_leader) {
        let response = match answer {
            Ok(r) => r,
            Err(e) => {
                tracing::debug!(broker = %address, error = %e, "fetch failed");
                if e.is_retriable() {
                    client.forget_channel(&address);
                    for t in &targets {
                        client.invalidate(&t.key.0);
                    }
                    failure.get_or_insert(e);
                } else {
                    for t in &targets {
                        report(inner, t, e.clone());
                    }
                }
                continue;
            }
        };
        progressed = true;
        for t in response.topics {
            for p in t.partitions {
                if let Some(target) = targets.iter().find(|x| *x.key.0 == t.name && x.key.1 == p.partition) {
                    take_partition(inner, target, p).await;
                }
            }
        }
    }
    match failure {
        Some(e) if !progressed => Err(e),
        _ => Ok(()),
    }
}

/// Buffers one partition's answer, or deals with its error.
async fn take_partition(inner: &Arc<Inner>, target: &Target, p: pb::FetchPartitionResponse) {
    let (topic, partition) = (&target.key.0, target.key.1);
    let (batches, high_watermark) = match decode_fetch(topic, p) {
        Ok(f) => (f.batches, f.high_watermark),
        Err(Error::Broker { code: ErrorCode::OffsetOutOfRange, message, .. })
            if inner.config.auto_offset_reset != OffsetReset::Error =>
        {
            let to =
                if inner.config.auto_offset_reset == OffsetReset::Earliest { SeekTo::Beginning } else { SeekTo::End };
            match resolve(&inner.client, topic, partition, to).await {
                Ok(position) => {
                    tracing::warn!(topic = %topic, partition, position, reason = %message, "position out of range; reset");
                    let mut st = inner.lock();
                    if let Some(a) = st.assigned.get_mut(&target.key).filter(|a| a.generation == target.generation) {
                        a.position = position;
                        a.fetch_position = position;
                        a.committable = position;
                        // Nothing fetched from before the reset is handed out.
                        st.bump(&target.key);
                    }
                }
                Err(e) => tracing::debug!(topic = %topic, partition, error = %e, "offset reset failed"),
            }
            return;
        }
        Err(e) if e.is_retriable() => {
            inner.client.invalidate(topic);
            return;
        }
        Err(e) => return report(inner, target, e),
    };
    let chunk = Chunk::new(target.key.clone(), target.generation, batches, target.offset);
    let mut st = inner.lock();
    let live = |a: &&mut Assigned| a.generation == target.generation && !a.failed && !a.revoking && !a.paused;
    let Some(a) = st.assigned.get_mut(&target.key).filter(live) else {
        return; // sought, paused, failed, revoked or unassigned meanwhile
    };
    a.high_watermark = high_watermark;
    let Some(chunk) = chunk else { return };
    let next = chunk.next_offset;
    a.fetch_position = a.fetch_position.max(next);
    if chunk.records_hint == 0 && a.position >= target.offset {
        // Batches without records for us (a compacted log's removed
        // offsets), fetched from the position itself: it moves past them
        // now. (Behind buffered records, the chunk moves it once those are
        // handed out; never past records dropped unseen.)
        a.position = a.position.max(next);
        return;
    }
    st.buffered_bytes += chunk.bytes;
    st.buffered.push_back(chunk);
}

/// Reports a partition's non-retriable failure once and stops fetching it.
fn report(inner: &Inner, target: &Target, e: Error) {
    tracing::warn!(topic = %target.key.0, partition = target.key.1, error = %e, "partition failed");
    let mut st = inner.lock();
    let Some(a) = st.assigned.get_mut(&target.key).filter(|a| a.generation == target.generation) else { return };
    a.failed = true;
    st.errors.push_back(e);
}
