//! [`Producer`]: batches records per partition and sends them in the
//! background.
//!
//! `send` copies a record into its partition's open batch (no allocation per
//! record) and returns a [`DeliveryFuture`]. A sender task seals a batch when
//! it reaches `batch_bytes` or has waited `linger`, and keeps at most one
//! request in flight per partition, so retries cannot reorder a partition's
//! records. Memory is bounded by `buffer_bytes`: `send` waits while the
//! records not yet acknowledged take more than that.
//!
//! Retries of a non-idempotent producer can duplicate a batch whose answer was
//! lost; the idempotent producer (producer ids and sequence numbers) will
//! remove those duplicates.

use std::collections::{HashMap, VecDeque};
use std::future::{Future, IntoFuture};
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::time::Duration;

use bytes::Bytes;
use tally_proto::ErrorCode;
use tally_proto::batch::{BatchBuilder, HeaderRef, RecordRef};
use tally_proto::compression::Compression;
use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinHandle;
use tokio::time::Instant;

use crate::client::Client;
use crate::error::{Error, Result};
use crate::partition_client::{Acks, produce_rpc};
use crate::partitioner::partition_for_key;

/// Settings of a [`Producer`].
#[derive(Debug, Clone)]
pub struct ProducerConfig {
    /// Acknowledgement level. Default [`Acks::Leader`].
    pub acks: Acks,
    /// How long a batch waits for more records. Default 5 ms.
    pub linger: Duration,
    /// Batch size that triggers a send. Default 512 KiB; keep it below the
    /// topic's `max_message_bytes`.
    pub batch_bytes: usize,
    /// Bytes of records buffered or in flight before `send` waits. Default 64 MiB.
    pub buffer_bytes: usize,
    /// Time from a batch's first record to giving up on it. Default 120 s.
    pub delivery_timeout: Duration,
    /// First retry backoff; doubles up to `retry_backoff_max`, with ±20% jitter.
    /// Default 100 ms.
    pub retry_backoff: Duration,
    /// Largest retry backoff. Default 1 s.
    pub retry_backoff_max: Duration,
    /// Codec of the batches sent (Kafka's `compression.type`). Default none.
    pub compression: Compression,
}

impl Default for ProducerConfig {
    fn default() -> Self {
        ProducerConfig {
            acks: Acks::Leader,
            linger: Duration::from_millis(5),
            batch_bytes: 512 << 10,
            buffer_bytes: 64 << 20,
            delivery_timeout: Duration::from_secs(120),
            retry_backoff: Duration::from_millis(100),
            retry_backoff_max: Duration::from_secs(1),
            compression: Compression::None,
        }
    }
}

/// A record to send. Borrowed: `send` copies it into a batch.
#[derive(Debug, Clone, Copy)]
pub struct ProducerRecord<'a> {
    /// Topic.
    pub topic: &'a str,
    /// Partition; `None` lets the partitioner choose (key hash, or sticky).
    pub partition: Option<u32>,
    /// Key, or `None`.
    pub key: Option<&'a [u8]>,
    /// Value, or `None` (a tombstone).
    pub value: Option<&'a [u8]>,
    /// Headers.
    pub headers: &'a [HeaderRef<'a>],
    /// Timestamp in ms since the epoch; `None` for now.
    pub timestamp: Option<i64>,
}

impl<'a> ProducerRecord<'a> {
    /// A record with a value and nothing else.
    pub fn new(topic: &'a str, value: &'a [u8]) -> Self {
        ProducerRecord { topic, partition: None, key: None, value: Some(value), headers: &[], timestamp: None }
    }
    /// Sets the key.
    pub fn key(mut self, key: &'a [u8]) -> Self {
        self.key = Some(key);
        self
    }
    /// Sets the partition.
    pub fn partition(mut self, partition: u32) -> Self {
        self.partition = Some(partition);
        self
    }
    /// Sets the headers.
    pub fn headers(mut self, headers: &'a [HeaderRef<'a>]) -> Self {
        self.headers = headers;
        self
    }
    /// Sets the timestamp.
    pub fn timestamp(mut self, ms: i64) -> Self {
        self.timestamp = Some(ms);
        self
    }
}

/// Where an acknowledged record landed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RecordMetadata {
    /// Topic.
    pub topic: Arc<str>,
    /// Partition.
    pub partition: u32,
    /// Offset (-1 with acks=0).
    pub offset: i64,
    /// Record timestamp.
    pub timestamp: i64,
}

#[derive(Debug, Default)]
struct Outcome {
    result: OnceLock<Result<i64>>,
    done: Notify,
}

impl Outcome {
    fn complete(&self, result: Result<i64>) {
        let _ = self.result.set(result);
        self.done.notify_waiters();
    }

    async fn wait(&self) -> Result<i64> {
        loop {
            let notified = self.done.notified();
            if let Some(r) = self.result.get() {
                return r.clone();
            }
            notified.await;
        }
    }
}

/// Resolves once a sent record is acknowledged at the producer's acks level.
#[derive(Debug)]
pub struct DeliveryFuture {
    outcome: Arc<Outcome>,
    topic: Arc<str>,
    partition: u32,
    offset_delta: i32,
    timestamp: i64,
}

impl DeliveryFuture {
    /// Waits for the acknowledgement (allocation-free; `.await` on the
    /// future itself boxes).
    pub async fn wait(self) -> Result<RecordMetadata> {
        let base = self.outcome.wait().await?;
        Ok(RecordMetadata {
            topic: self.topic,
            partition: self.partition,
            offset: if base < 0 { -1 } else { base + i64::from(self.offset_delta) },
            timestamp: self.timestamp,
        })
    }
}

impl IntoFuture for DeliveryFuture {
    type Output = Result<RecordMetadata>;
    type IntoFuture = Pin<Box<dyn Future<Output = Result<RecordMetadata>> + Send>>;
    fn into_future(self) -> Self::IntoFuture {
        Box::pin(self.wait())
    }
}

struct OpenBatch {
    builder: BatchBuilder,
    created: Instant,
    outcome: Arc<Outcome>,
    permit: Option<OwnedSemaphorePermit>,
}

/// A batch that takes no more records. Its bytes are made (compressed and
/// checksummed) by the task that sends it, not under the producer's lock.
struct SealedBatch {
    builder: BatchBuilder,
    created: Instant,
    outcome: Arc<Outcome>,
    _permit: Option<OwnedSemaphorePermit>,
}

impl OpenBatch {
    fn seal(self) -> SealedBatch {
        SealedBatch { builder: self.builder, created: self.created, outcome: self.outcome, _permit: self.permit }
    }
}

#[derive(Default)]
struct PartitionQueue {
    open: Option<OpenBatch>,
    ready: VecDeque<SealedBatch>,
    in_flight: Option<Arc<Outcome>>,
}

impl PartitionQueue {
    fn seal_open(&mut self) -> bool {
        match self.open.take() {
            Some(open) => {
                self.ready.push_back(open.seal());
                true
            }
            None => false,
        }
    }
}

struct TopicQueues {
    name: Arc<str>,
    partitions: Vec<PartitionQueue>,
    sticky: u32,
    /// Partition count from the metadata, and when it was read.
    partition_count: u32,
    metadata_at: Instant,
}

/// How long a producer trusts a topic's partition count before asking the
/// client's metadata again (so added partitions are picked up).
const METADATA_MAX_AGE: Duration = Duration::from_secs(30);

impl TopicQueues {
    fn fresh_partition_count(&self) -> Option<u32> {
        (self.metadata_at.elapsed() < METADATA_MAX_AGE).then_some(self.partition_count)
    }
}

struct State {
    topics: HashMap<String, TopicQueues>,
    closed: bool,
}

struct Shared {
    client: Client,
    config: ProducerConfig,
    state: Mutex<State>,
    wake: Notify,
    buffer: Arc<Semaphore>,
    rng: AtomicU64,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn random(&self) -> u64 {
        // xorshift64*; quality is plenty for jitter and sticky partitions.
        let mut x = self.rng.load(Ordering::Relaxed);
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.rng.store(x, Ordering::Relaxed);
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
}

/// Sends records to a cluster in batches, in the background.
///
/// ```no_run
/// # async fn demo(client: tally_client::Client) -> Result<(), tally_client::Error> {
/// use tally_client::{Producer, ProducerConfig, ProducerRecord};
/// let producer = Producer::new(client, ProducerConfig::default());
/// let delivery = producer.send(ProducerRecord::new("orders", b"42 widgets").key(b"customer-7")).await?;
/// let meta = delivery.await?;
/// println!("written at {}/{}", meta.partition, meta.offset);
/// producer.close().await;
/// # Ok(()) }
/// ```
pub struct Producer {
    shared: Arc<Shared>,
    sender: Option<JoinHandle<()>>,
}

impl std::fmt::Debug for Producer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Producer").field("config", &self.shared.config).finish_non_exhaustive()
    }
}

/// Wall-clock milliseconds for record timestamps, from the coarse clock: a
/// record timestamp is in milliseconds anyway, and the coarse clock costs a
/// memory read where the precise one reads the time-stamp counter (a
/// seventh of the send path's time in a profile).
fn now_ms() -> i64 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: clock_gettime writes the timespec we pass.
    if unsafe { libc::clock_gettime(libc::CLOCK_REALTIME_COARSE, &mut ts) } == 0 {
        return ts.tv_sec * 1000 + ts.tv_nsec / 1_000_000;
    }
    let d = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}

/// An upper bound on a record's encoded size (varint overheads included).
fn record_size_bound(r: &ProducerRecord<'_>) -> usize {
    let field = |f: Option<&[u8]>| f.map_or(1, |b| b.len() + 5);
    let headers: usize = r.headers.iter().map(|h| h.key.len() + 5 + field(h.value)).sum();
    1 + 10 + 5 + 5 + field(r.key) + field(r.value) + 5 + headers + 5
}

impl Producer {
    /// A producer over `client`. Must be created inside a tokio runtime.
    pub fn new(client: Client, config: ProducerConfig) -> Producer {
        let seed = u64::try_from(now_ms()).unwrap_or(1) | 1;
        let shared = Arc::new(Shared {
            client,
            buffer: Arc::new(Semaphore::new(config.buffer_bytes.max(1))),
            config,
            state: Mutex::new(State { topics: HashMap::new(), closed: false }),
            wake: Notify::new(),
            rng: AtomicU64::new(seed),
        });
        let sender = tokio::spawn(run_sender(shared.clone()));
        Producer { shared, sender: Some(sender) }
    }

    /// Queues a record; waits while the buffer is full. The returned future
    /// resolves when the record is acknowledged (or fails for good).
    pub async fn send(&self, record: ProducerRecord<'_>) -> Result<DeliveryFuture> {
        let shared = &self.shared;
        // The partition count, from this producer's own state while fresh:
        // the client's shared metadata cache costs a contended lock per record.
        let known = shared.lock().topics.get(record.topic).and_then(TopicQueues::fresh_partition_count);
        let (partitions, refreshed) = match known {
            Some(n) => (n, false),
            None => {
                let info = shared.client.topic_info(record.topic).await?;
                (u32::try_from(info.leaders.len()).unwrap_or(u32::MAX), true)
            }
        };
        if let Some(p) = record.partition
            && p >= partitions
        {
            return Err(Error::Broker {
                code: ErrorCode::UnknownTopicOrPartition,
                message: format!("topic `{}` has {partitions} partitions; there is no partition {p}", record.topic),
                topic: record.topic.to_string(),
                partition: Some(p),
            });
        }
        let size = record_size_bound(&record);
        if size > shared.config.buffer_bytes {
            return Err(Error::InvalidArgument(format!("record of {size} bytes is larger than buffer_bytes")));
        }
        let permits = u32::try_from(size).unwrap_or(u32::MAX);
        let permit = shared.buffer.clone().acquire_many_owned(permits).await.map_err(|_| Error::Closed)?;
        let timestamp = record.timestamp.unwrap_or_else(now_ms);
        let rec = RecordRef { timestamp, key: record.key, value: record.value, headers: record.headers };

        let mut state = shared.lock();
        if state.closed {
            return Err(Error::Closed);
        }
        if !state.topics.contains_key(record.topic) {
            let queues = TopicQueues {
                name: Arc::from(record.topic),
                partitions: Vec::new(),
                sticky: (shared.random() % u64::from(partitions.max(1))) as u32,
                partition_count: partitions,
                metadata_at: Instant::now(),
            };
            state.topics.insert(record.topic.to_string(), queues);
        }
        let topic = state.topics.get_mut(record.topic).expect("inserted above");
        if refreshed {
            topic.partition_count = partitions;
            topic.metadata_at = Instant::now();
        }
        if topic.partitions.len() < partitions as usize {
            topic.partitions.resize_with(partitions as usize, PartitionQueue::default);
        }
        let partition = match (record.partition, record.key) {
            (Some(p), _) => p,
            (None, Some(key)) => partition_for_key(key, partitions),
            (None, None) => topic.sticky % partitions.max(1),
        };
        let queue = &mut topic.partitions[partition as usize];
        let mut wake = false;
        if let Some(open) = &queue.open
            && !open.builder.is_empty()
            && open.builder.len() + size > shared.config.batch_bytes
        {
            wake |= queue.seal_open();
            if record.partition.is_none() && record.key.is_none() {
                topic.sticky = (shared.random() % u64::from(partitions.max(1))) as u32;
            }
        }
        let open = queue.open.get_or_insert_with(|| {
            wake = true;
            let mut builder = BatchBuilder::with_capacity(shared.config.batch_bytes.min(64 << 10));
            builder.set_compression(shared.config.compression);
            OpenBatch { builder, created: Instant::now(), outcome: Arc::new(Outcome::default()), permit: None }
        });
        let offset_delta = open.builder.push(&rec);
        match &mut open.permit {
            Some(p) => p.merge(permit),
            slot @ None => *slot = Some(permit),
        }
        let outcome = open.outcome.clone();
        if open.builder.len() >= shared.config.batch_bytes {
            queue.seal_open();
            wake = true;
        }
        let topic_name = topic.name.clone();
        drop(state);
        if wake {
            shared.wake.notify_one();
        }
        Ok(DeliveryFuture { outcome, topic: topic_name, partition, offset_delta, timestamp })
    }

    /// Sends every buffered record now and waits until each is acknowledged
    /// or has failed (failures are reported by their delivery futures).
    pub async fn flush(&self) {
        let outcomes: Vec<Arc<Outcome>> = {
            let mut state = self.shared.lock();
            let mut out = Vec::new();
            for t in state.topics.values_mut() {
                for q in &mut t.partitions {
                    q.seal_open();
                    out.extend(q.ready.iter().map(|b| b.outcome.clone()));
                    out.extend(q.in_flight.iter().cloned());
                }
            }
            out
        };
        self.shared.wake.notify_one();
        for o in outcomes {
            let _ = o.wait().await;
        }
    }

    /// Flushes, then stops the sender.
    pub async fn close(mut self) {
        self.flush().await;
        self.shared.lock().closed = true;
        self.shared.wake.notify_one();
        if let Some(sender) = self.sender.take() {
            let _ = sender.await;
        }
    }
}

impl Drop for Producer {
    fn drop(&mut self) {
        // The sender sends what is buffered, then exits.
        self.shared.lock().closed = true;
        self.shared.wake.notify_one();
    }
}

/// Seals lingering batches and starts one request per partition with work.
async fn run_sender(shared: Arc<Shared>) {
    loop {
        let mut to_send = Vec::new();
        let mut next_deadline: Option<Instant> = None;
        let finished = {
            let mut state = shared.lock();
            let closed = state.closed;
            let now = Instant::now();
            let mut idle = true;
            for t in state.topics.values_mut() {
                for (p, q) in t.partitions.iter_mut().enumerate() {
                    if let Some(open) = &q.open {
                        let due = open.created + shared.config.linger;
                        if closed || now >= due {
                            q.seal_open();
                        } else {
                            next_deadline = Some(next_deadline.map_or(due, |d: Instant| d.min(due)));
                        }
                    }
                    if q.in_flight.is_none()
                        && let Some(batch) = q.ready.pop_front()
                    {
                        q.in_flight = Some(batch.outcome.clone());
                        to_send.push((t.name.clone(), p as u32, batch));
                    }
                    idle &= q.open.is_none() && q.ready.is_empty() && q.in_flight.is_none();
                }
            }
            closed && idle && to_send.is_empty()
        };
        if finished {
            return;
        }
        for (topic, partition, batch) in to_send {
            tokio::spawn(send_batch(shared.clone(), topic, partition, batch));
        }
        match next_deadline {
            Some(deadline) => {
                tokio::select! {
                    _ = shared.wake.notified() => {}
                    _ = tokio::time::sleep_until(deadline) => {}
                }
            }
            None => shared.wake.notified().await,
        }
    }
}

/// Sends one batch, retrying retriable errors with backoff until the
/// delivery timeout, then frees the partition for its next batch.
async fn send_batch(shared: Arc<Shared>, topic: Arc<str>, partition: u32, batch: SealedBatch) {
    let config = &shared.config;
    let deadline = batch.created + config.delivery_timeout;
    let mut backoff = config.retry_backoff;
    if config.acks == Acks::None {
        batch.outcome.complete(Ok(-1));
    }
    let SealedBatch { builder, created: _, outcome, _permit } = batch;
    let bytes: Bytes = builder.finish();
    let result = loop {
        match produce_rpc(&shared.client, &topic, partition, bytes.clone(), config.acks).await {
            Ok(offset) => break Ok(offset),
            Err(e) if e.is_retriable() && Instant::now() + backoff < deadline => {
                tracing::debug!(topic = %topic, partition, error = %e, "retrying produce");
                // NOT_LEADER_OR_FOLLOWER named the new leader, which the
                // client took; anything else asks for fresh metadata.
                if e.code() != Some(tally_proto::ErrorCode::NotLeaderOrFollower) {
                    shared.client.invalidate(&topic);
                }
                let jitter = 0.8 + (shared.random() % 400) as f64 / 1000.0;
                tokio::time::sleep(backoff.mul_f64(jitter)).await;
                backoff = (backoff * 2).min(config.retry_backoff_max);
            }
            Err(e) => break Err(e),
        }
    };
    if let Err(e) = &result {
        tracing::warn!(topic = %topic, partition, error = %e, "batch failed");
    }
    outcome.complete(result);
    drop(_permit);
    if let Some(t) = shared.lock().topics.get_mut(&*topic)
        && let Some(q) = t.partitions.get_mut(partition as usize)
    {
        q.in_flight = None;
    }
    shared.wake.notify_one();
}
