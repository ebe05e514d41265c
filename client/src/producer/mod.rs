//! [`Producer`]: batches records per partition and sends them in the
//! background.
//!
//! - `send` copies a record into its partition's open batch under that
//!   partition's lock alone, and returns a [`DeliveryFuture`]. No allocation
//!   per record: the batch buffer grows per batch, and the future is a
//!   reference to the batch's shared outcome.
//! - A batch is sealed when it reaches `batch_bytes`, when its `linger` runs
//!   out, or on flush and close. Sealing queues the partition for the sender
//!   and moves the sticky partition on ([`accumulator`]).
//! - The sender bundles the ready batches of every partition a broker leads
//!   into one request, up to `max_in_flight` requests per broker. Without
//!   idempotence each partition has one request in flight at a time, so its
//!   batches land in the order they were sealed, retries included
//!   ([`sender`]); the idempotent producer (the default) sends one batch per
//!   partition per request and up to `max_in_flight` requests per
//!   partition, in order by the broker's sequence check ([`idempotence`]).
//! - Memory is bounded by `buffer_bytes`: `send` waits while records not yet
//!   settled hold that much.
//!
//! Retries of a non-idempotent producer can duplicate a batch whose answer was
//! lost; the idempotent producer's cannot.

mod accumulator;
mod delivery;
mod idempotence;
mod sender;
mod transport;

#[cfg(test)]
mod tests;

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicPtr, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use tally_proto::ErrorCode;
use tally_proto::batch::{HeaderRef, RecordRef};
use tally_proto::compression::Compression;
use tokio::sync::{Semaphore, watch};

pub use delivery::{DeliveryError, DeliveryFuture, RecordMetadata, UndeliveredRecord};

use crate::client::Client;
use crate::error::{Error, Result};
use crate::partition_client::Acks;
use crate::partitioner::partition_for_key;
use accumulator::{PartitionAcc, Queues, Reservation, Rng, TopicCore, TopicState};
use transport::{ClientTransport, Transport};

/// Settings of a [`Producer`]. Start from `default()` and set fields.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct ProducerConfig {
    /// Acknowledgement level. Default [`Acks::All`] (Kafka's default since
    /// 3.0, and what idempotence needs).
    pub acks: Acks,
    /// How long a batch waits for more records. Default 5 ms.
    pub linger: Duration,
    /// Batch size that seals a batch. Default 512 KiB; keep it below the
    /// topic's `max_message_bytes`.
    pub batch_bytes: usize,
    /// Bytes of records buffered or in flight before `send` waits. Default 64 MiB.
    pub buffer_bytes: usize,
    /// Time from a batch's first record to giving up on it. Default 120 s.
    pub delivery_timeout: Duration,
    /// How long the broker may wait for acks=all before answering
    /// REQUEST_TIMED_OUT (Kafka's `request.timeout.ms`). Default 30 s.
    pub request_timeout: Duration,
    /// First retry backoff; doubles up to `retry_backoff_max`, with ±20% jitter.
    /// Default 100 ms.
    pub retry_backoff: Duration,
    /// Largest retry backoff. Default 1 s.
    pub retry_backoff_max: Duration,
    /// Codec of the batches sent (Kafka's `compression.type`). Default none.
    pub compression: Compression,
    /// Requests in flight to one broker (Kafka's
    /// `max.in.flight.requests.per.connection`), and with idempotence to
    /// one partition. Default 5; at most 5 with idempotence (the broker
    /// remembers a producer's last five batches).
    pub max_in_flight: usize,
    /// Kafka's `enable.idempotence`: a producer id from the cluster and a
    /// sequence number on every batch, so no retry duplicates a record and
    /// several requests per partition keep their order. `None` (the
    /// default) turns it on unless `acks` is not [`Acks::All`] or
    /// `max_in_flight` is above 5, as Kafka's default does; `Some(true)`
    /// with either is refused by [`Producer::try_new`].
    pub idempotence: Option<bool>,
    /// Largest request: the ready batches for one broker are bundled up to
    /// this many bytes (one batch always goes). Default 8 MiB.
    pub max_request_bytes: usize,
}

impl Default for ProducerConfig {
    fn default() -> Self {
        ProducerConfig {
            acks: Acks::All,
            linger: Duration::from_millis(5),
            batch_bytes: 512 << 10,
            buffer_bytes: 64 << 20,
            delivery_timeout: Duration::from_secs(120),
            request_timeout: Duration::from_secs(30),
            retry_backoff: Duration::from_millis(100),
            retry_backoff_max: Duration::from_secs(1),
            compression: Compression::None,
            max_in_flight: 5,
            max_request_bytes: 8 << 20,
            idempotence: None,
        }
    }
}

/// Most requests an idempotent producer keeps in flight per partition (the
/// batches the broker remembers per producer).
pub const MAX_IDEMPOTENT_IN_FLIGHT: usize = 5;

impl ProducerConfig {
    /// Whether this config makes an idempotent producer, or why it cannot
    /// be used.
    pub fn effective_idempotence(&self) -> Result<bool> {
        let compatible = self.acks == Acks::All && self.max_in_flight <= MAX_IDEMPOTENT_IN_FLIGHT;
        match self.idempotence {
            None => Ok(compatible),
            Some(false) => Ok(false),
            Some(true) if self.acks != Acks::All => Err(Error::InvalidArgument(format!(
                "idempotence needs acks=all, not {:?}: set acks to Acks::All or idempotence to Some(false)",
                self.acks
            ))),
            Some(true) if self.max_in_flight > MAX_IDEMPOTENT_IN_FLIGHT => Err(Error::InvalidArgument(format!(
                "idempotence allows at most {MAX_IDEMPOTENT_IN_FLIGHT} requests in flight, not {}",
                self.max_in_flight
            ))),
            Some(true) => Ok(true),
        }
    }
}

/// A record to send. Borrowed: `send` copies it into a batch.
#[derive(Debug, Clone, Copy)]
#[non_exhaustive]
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
    /// A record without a value (a tombstone, for compacted topics).
    pub fn tombstone(topic: &'a str, key: &'a [u8]) -> Self {
        ProducerRecord { topic, partition: None, key: Some(key), value: None, headers: &[], timestamp: None }
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

/// What every handle of one producer shares with its sender task.
pub(crate) struct Shared {
    transport: Arc<dyn Transport>,
    config: ProducerConfig,
    queues: Queues,
    buffer: Arc<Semaphore>,
    rng: Rng,
    /// Set once closing starts: sends are refused from then on.
    closed: AtomicBool,
    /// The idempotent producer's id (unused without idempotence).
    identity: idempotence::Identity,
    topics: RwLock<HashMap<Arc<str>, Arc<TopicState>>>,
    /// Topic states replaced by a newer generation, kept alive because
    /// handles may still point at them (one per partition-count increase).
    retired: Mutex<Vec<Arc<TopicState>>>,
    /// How long a topic's partition count is trusted.
    metadata_max_age: Duration,
    /// Topics whose metadata `try_send` is fetching in the background.
    fetching: Mutex<std::collections::HashSet<String>>,
    /// True once the sender has settled everything and stopped.
    stopped: watch::Sender<bool>,
}

impl Shared {
    /// Every partition accumulator of every topic.
    fn all_partitions(&self) -> Vec<Arc<PartitionAcc>> {
        let topics = self.topics.read().unwrap_or_else(std::sync::PoisonError::into_inner);
        topics.values().flat_map(|t| t.partitions.iter().cloned()).collect()
    }

    fn begin_close(&self) {
        self.closed.store(true, Ordering::Release);
        self.buffer.close();
        self.queues.wake.notify_one();
    }
}

/// Closes the producer when the last handle goes.
struct Handle {
    shared: Arc<Shared>,
}

impl Drop for Handle {
    fn drop(&mut self) {
        // The sender sends what is buffered, then stops.
        self.shared.begin_close();
    }
}

/// Sends records to a cluster in batches, in the background.
///
/// Clones share one producer (its buffers, batches and connections); any of
/// them can flush or close it. Dropping the last one closes it in the
/// background, still delivering what was sent.
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
    handle: Arc<Handle>,
    /// This handle's last topic, so a send looks up nothing shared.
    /// Points into `Shared::topics` (see `cached_topic`).
    last_topic: AtomicPtr<TopicState>,
}

impl Clone for Producer {
    fn clone(&self) -> Self {
        Producer { handle: self.handle.clone(), last_topic: AtomicPtr::new(std::ptr::null_mut()) }
    }
}

impl std::fmt::Debug for Producer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Producer").field("config", &self.handle.shared.config).finish_non_exhaustive()
    }
}

/// Wall-clock milliseconds for record timestamps, from the coarse clock: a
/// record timestamp is in milliseconds anyway, and the coarse clock costs a
/// memory read where the precise one reads the time-stamp counter.
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

/// String equality that skips the byte comparison when both are the same
/// string (a caller sending many records usually passes one topic `&str`).
fn same_str(a: &str, b: &str) -> bool {
    a.len() == b.len() && (std::ptr::eq(a.as_ptr(), b.as_ptr()) || a == b)
}

/// Buffer memory a partition takes from the producer's buffer at a time.
const CREDIT_CHUNK_BYTES: usize = 64 << 10;

/// A record's size bound, the time it was sent, and its timestamp.
struct Admitted {
    size: usize,
    now: i64,
    timestamp: i64,
}

/// What one try at appending a record found.
enum Append {
    Done(DeliveryFuture),
    /// The partition's credit is short: take this much buffer, then retry.
    NeedsBuffer(usize),
    /// The sticky partition's batch was full and sealed: choose again.
    Repartition,
}

impl Producer {
    /// A producer over `client`. Must be created inside a tokio runtime.
    ///
    /// # Panics
    /// When `config` cannot be used (see [`Producer::try_new`]).
    pub fn new(client: Client, config: ProducerConfig) -> Producer {
        Self::try_new(client, config).unwrap_or_else(|e| panic!("invalid producer config: {e}"))
    }

    /// A producer over `client`, or why `config` cannot be used
    /// (idempotence asked for with acks other than all, or with more than
    /// five requests in flight). Must be called inside a tokio runtime.
    pub fn try_new(client: Client, config: ProducerConfig) -> Result<Producer> {
        let max_age = client.config().metadata_max_age;
        Self::with_transport(Arc::new(ClientTransport(client)), config, max_age)
    }

    /// Whether this producer is idempotent.
    pub fn is_idempotent(&self) -> bool {
        self.shared().queues.idempotent.is_some()
    }

    fn with_transport(
        transport: Arc<dyn Transport>,
        config: ProducerConfig,
        metadata_max_age: Duration,
    ) -> Result<Producer> {
        let idempotent = config.effective_idempotence()?;
        let mut queues = Queues::new(tokio::runtime::Handle::current());
        queues.idempotent = idempotent.then_some(config.max_in_flight.max(1));
        let seed = u64::try_from(now_ms()).unwrap_or(1) ^ u64::from(std::process::id()).rotate_left(32);
        let (stopped, _) = watch::channel(false);
        let shared = Arc::new(Shared {
            transport,
            buffer: Arc::new(Semaphore::new(config.buffer_bytes.clamp(1, Semaphore::MAX_PERMITS))),
            config,
            queues,
            rng: Rng::new(seed),
            closed: AtomicBool::new(false),
            identity: idempotence::Identity::default(),
            topics: RwLock::new(HashMap::new()),
            retired: Mutex::new(Vec::new()),
            metadata_max_age,
            fetching: Mutex::new(std::collections::HashSet::new()),
            stopped,
        });
        tokio::spawn(sender::run(shared.clone()));
        Ok(Producer { handle: Arc::new(Handle { shared }), last_topic: AtomicPtr::new(std::ptr::null_mut()) })
    }

    fn shared(&self) -> &Arc<Shared> {
        &self.handle.shared
    }

    /// Queues a record; waits while the buffer is full. The returned future
    /// resolves when the record is acknowledged (or fails for good, handing
    /// the record back).
    pub async fn send(&self, record: ProducerRecord<'_>) -> Result<DeliveryFuture> {
        let Admitted { size, now, timestamp } = self.admit(&record)?;
        // The fast path takes no lock but the partition's and allocates
        // nothing; anything else (a new topic, a full buffer, a sticky
        // switch) goes the slow way, boxed so this future stays small.
        let first = match self.cached_topic(record.topic) {
            Some(topic) => {
                self.check_age(topic, now);
                match self.try_append(topic, &record, timestamp, size, &mut None, false)? {
                    Append::Done(delivery) => return Ok(delivery),
                    other => Some(other),
                }
            }
            None => None,
        };
        Box::pin(self.send_slow(record, timestamp, size, first)).await
    }

    /// What `send` and `try_send` check and compute first: the record's
    /// encoded size bound (refused when the whole buffer could not hold
    /// it), the time, and the record's timestamp.
    fn admit(&self, record: &ProducerRecord<'_>) -> Result<Admitted> {
        let size = record_size_bound(record);
        let buffer_bytes = self.shared().config.buffer_bytes;
        if size > buffer_bytes {
            return Err(Error::InvalidArgument(format!(
                "a record of {size} bytes does not fit in buffer_bytes ({buffer_bytes})"
            )));
        }
        let now = now_ms();
        Ok(Admitted { size, now, timestamp: record.timestamp.unwrap_or(now) })
    }

    /// Queues a record if that needs no waiting, from any thread (inside
    /// the runtime or not): the same as [`Producer::send`] when its buffer
    /// has room and its topic is known, else
    /// [`Error::WouldBlock`](crate::Error::WouldBlock) (an unknown topic's
    /// metadata is then fetched in the background, so a later try finds it).
    pub fn try_send(&self, record: ProducerRecord<'_>) -> Result<DeliveryFuture> {
        let Admitted { size, now, timestamp } = self.admit(&record)?;
        let topic = match self.cached_topic(record.topic) {
            Some(topic) => topic,
            None => self.known_topic(record.topic)?,
        };
        self.check_age(topic, now);
        let mut repartitioned = false;
        loop {
            match self.try_append(topic, &record, timestamp, size, &mut None, repartitioned)? {
                Append::Done(delivery) => return Ok(delivery),
                Append::Repartition => repartitioned = true,
                Append::NeedsBuffer(_) => return Err(Error::WouldBlock("the producer's buffer is full")),
            }
        }
    }

    /// `name`'s state from the shared table, made this handle's last topic;
    /// when it is not there, starts fetching its metadata and says so.
    fn known_topic(&self, name: &str) -> Result<&TopicState> {
        let shared = self.shared();
        let found = shared.topics.read().unwrap_or_else(std::sync::PoisonError::into_inner).get(name).cloned();
        if let Some(topic) = found {
            // The table (or its retired list) keeps it alive.
            self.last_topic.store(Arc::as_ptr(&topic).cast_mut(), Ordering::Release);
            return self.cached_topic(name).ok_or(Error::WouldBlock("the topic's metadata is being replaced"));
        }
        let first = shared.fetching.lock().unwrap_or_else(std::sync::PoisonError::into_inner).insert(name.to_string());
        if first {
            let handle = self.clone();
            let name = name.to_string();
            shared.queues.runtime.spawn(async move {
                if let Err(e) = handle.topic_state(&name).await {
                    tracing::debug!(topic = %name, error = %e, "metadata fetch for try_send failed");
                }
                handle.shared().fetching.lock().unwrap_or_else(std::sync::PoisonError::into_inner).remove(&name);
            });
        }
        Err(Error::WouldBlock("the topic's metadata is not known yet; it is being fetched"))
    }

    /// The rest of [`Producer::send`]: looks the topic up, waits for buffer
    /// memory, and picks a partition again after a sticky switch.
    async fn send_slow(
        &self,
        record: ProducerRecord<'_>,
        timestamp: i64,
        size: usize,
        mut attempt: Option<Append>,
    ) -> Result<DeliveryFuture> {
        let shared = self.shared();
        let mut extra: Option<Reservation> = None;
        let mut repartitioned = false;
        loop {
            match attempt.take() {
                None => {}
                Some(Append::Done(delivery)) => return Ok(delivery),
                Some(Append::Repartition) => repartitioned = true,
                Some(Append::NeedsBuffer(bytes)) => {
                    let permits = u32::try_from(bytes).unwrap_or(u32::MAX);
                    let permit = shared.buffer.acquire_many(permits).await.map_err(|_| Error::Closed)?;
                    permit.forget();
                    let more = Reservation::new(shared.buffer.clone(), bytes);
                    match &mut extra {
                        Some(r) => r.merge(more),
                        None => extra = Some(more),
                    }
                }
            }
            let topic = match self.cached_topic(record.topic) {
                Some(topic) => topic,
                None => {
                    let topic = self.topic_state(record.topic).await?;
                    // The table (or its retired list) keeps it alive.
                    self.last_topic.store(Arc::as_ptr(&topic).cast_mut(), Ordering::Release);
                    continue;
                }
            };
            attempt = Some(self.try_append(topic, &record, timestamp, size, &mut extra, repartitioned)?);
        }
    }

    /// This handle's last topic, if it is `name` and still current.
    fn cached_topic(&self, name: &str) -> Option<&TopicState> {
        let p = self.last_topic.load(Ordering::Acquire);
        if p.is_null() {
            return None;
        }
        // SAFETY: `last_topic` only ever points at a `TopicState` published
        // in `Shared::topics`; one replaced there moves to `Shared::retired`,
        // so each lives as long as `Shared`, which this handle keeps alive.
        let topic = unsafe { &*p };
        (same_str(&topic.core.name, name) && !topic.replaced.load(Ordering::Relaxed)).then_some(topic)
    }

    /// One try at appending under the partition's lock.
    fn try_append(
        &self,
        topic: &TopicState,
        record: &ProducerRecord<'_>,
        timestamp: i64,
        size: usize,
        extra: &mut Option<Reservation>,
        repartitioned: bool,
    ) -> Result<Append> {
        let shared = self.shared();
        let config = &shared.config;
        let count = u32::try_from(topic.partitions.len()).unwrap_or(u32::MAX);
        let sticky = record.partition.is_none() && record.key.is_none();
        let partition = match (record.partition, record.key) {
            (Some(p), _) => p,
            (None, Some(key)) => partition_for_key(key, count),
            (None, None) => topic.core.sticky.load(Ordering::Relaxed) % count,
        };
        let Some(acc) = topic.partitions.get(partition as usize) else {
            return Err(Error::Broker {
                code: ErrorCode::UnknownTopicOrPartition,
                message: format!("topic `{}` has {count} partitions; there is no partition {partition}", record.topic),
                topic: record.topic.to_string(),
                partition: Some(partition),
            });
        };
        let mut st = acc.lock();
        if shared.closed.load(Ordering::Acquire) {
            return Err(Error::Closed);
        }
        let mut wake = false;
        if let Some(open) = &st.open
            && !open.builder.is_empty()
            && open.builder.len() + size > config.batch_bytes
        {
            wake |= shared.queues.seal(acc, &mut st, &shared.rng);
            if sticky && !repartitioned {
                // KIP-480: a record that would open a new batch goes to the
                // new sticky partition instead.
                drop(st);
                if wake {
                    shared.queues.wake.notify_one();
                }
                return Ok(Append::Repartition);
            }
        }
        if let Some(more) = extra.take() {
            accumulator::Queues::add_credit(&mut st, more);
        }
        if st.credit.as_ref().is_none_or(|c| c.bytes() < size) {
            // Take a chunk without waiting if the buffer has it; else wait
            // outside the lock.
            let want = size.max(config.batch_bytes.min(CREDIT_CHUNK_BYTES)).min(config.buffer_bytes);
            match shared.buffer.try_acquire_many(u32::try_from(want).unwrap_or(u32::MAX)) {
                Ok(permit) => {
                    permit.forget();
                    Queues::add_credit(&mut st, Reservation::new(shared.buffer.clone(), want));
                }
                Err(_) => {
                    drop(st);
                    if wake {
                        shared.queues.wake.notify_one();
                    }
                    return Ok(Append::NeedsBuffer(want));
                }
            }
        }
        // Credit first, then the batch: a send that has to wait for buffer
        // leaves no empty batch behind.
        if st.open.is_none() {
            // As big as this partition's last batch (growing the buffer
            // copies it), so a busy partition allocates once per batch and
            // a quiet one holds little.
            let hint = if st.last_batch_bytes == 0 { CREDIT_CHUNK_BYTES } else { st.last_batch_bytes };
            let capacity = hint.min(config.batch_bytes).max(size) + 128;
            wake |= shared.queues.open_batch(acc, &mut st, capacity, config.compression, config.linger);
        }
        let spent = Queues::spend(&mut st, size);
        debug_assert!(spent, "the credit covers the record");
        let open = st.open.as_mut().expect("opened above");
        let offset_delta =
            open.builder.push(&RecordRef { timestamp, key: record.key, value: record.value, headers: record.headers });
        let delivery = DeliveryFuture::new(open.outcome.clone(), offset_delta, timestamp);
        if open.builder.len() >= config.batch_bytes {
            wake |= shared.queues.seal(acc, &mut st, &shared.rng);
        }
        drop(st);
        if wake {
            shared.queues.wake.notify_one();
        }
        Ok(Append::Done(delivery))
    }

    /// Starts a background look at the topic's layout once its age is up,
    /// so added partitions get used.
    fn check_age(&self, topic: &TopicState, now: i64) {
        let expires = topic.expires_ms.load(Ordering::Relaxed);
        if now < expires {
            return;
        }
        let next = now.saturating_add(i64::try_from(self.shared().metadata_max_age.as_millis()).unwrap_or(i64::MAX));
        if topic.expires_ms.compare_exchange(expires, next, Ordering::AcqRel, Ordering::Relaxed).is_err() {
            return; // another send started it
        }
        let shared = self.shared().clone();
        let name = topic.core.name.clone();
        self.shared().queues.runtime.spawn(async move {
            match shared.transport.layout(&name, true).await {
                Ok(layout) => {
                    install_layout(&shared, &name, layout);
                }
                Err(e) => tracing::debug!(topic = %name, error = %e, "metadata refresh failed"),
            }
        });
    }

    /// The topic's accumulators, from the shared table or newly made.
    async fn topic_state(&self, topic: &str) -> Result<Arc<TopicState>> {
        let shared = self.shared();
        if let Some(t) = shared.topics.read().unwrap_or_else(std::sync::PoisonError::into_inner).get(topic) {
            return Ok(t.clone());
        }
        let layout = shared.transport.layout(topic, false).await?;
        if layout.partitions == 0 {
            return Err(Error::Broker {
                code: ErrorCode::UnknownTopicOrPartition,
                message: format!("topic `{topic}` has no partitions"),
                topic: topic.to_string(),
                partition: None,
            });
        }
        Ok(install_layout(shared, &Arc::from(topic), layout))
    }

    /// Sends every buffered record now and waits until each is acknowledged
    /// or has failed (failures are reported by their delivery futures).
    pub async fn flush(&self) {
        let shared = self.shared();
        let mut outcomes = Vec::new();
        let mut wake = false;
        for acc in shared.all_partitions() {
            let mut st = acc.lock();
            wake |= shared.queues.seal(&acc, &mut st, &shared.rng);
            outcomes.extend(st.ready.iter().map(|b| b.outcome.clone()));
            outcomes.extend(st.in_flight.iter().map(|(_, o)| o.clone()));
        }
        if wake {
            shared.queues.wake.notify_one();
        }
        for o in outcomes {
            o.settled().await;
        }
    }

    /// Closes the producer for every handle: sends are refused from now on,
    /// what was sent before is delivered (or fails), then the background
    /// sender stops. Returns once it has.
    pub async fn close(&self) {
        let shared = self.shared();
        shared.begin_close();
        let mut stopped = shared.stopped.subscribe();
        let _ = stopped.wait_for(|s| *s).await;
    }
}

/// Makes (or grows) the topic's accumulators for `layout` and publishes them.
fn install_layout(shared: &Arc<Shared>, name: &Arc<str>, layout: transport::Layout) -> Arc<TopicState> {
    let mut topics = shared.topics.write().unwrap_or_else(std::sync::PoisonError::into_inner);
    let max_age_ms = i64::try_from(shared.metadata_max_age.as_millis()).unwrap_or(i64::MAX);
    let expires_ms = AtomicI64::new(now_ms().saturating_add(max_age_ms));
    let old = topics.get(name).cloned();
    let state = match old {
        Some(old) if old.partitions.len() >= layout.partitions as usize => {
            old.core.set_available(layout.available);
            old.expires_ms.store(expires_ms.into_inner(), Ordering::Relaxed);
            return old;
        }
        Some(old) => {
            // More partitions: keep the accumulators there are, add the rest.
            old.core.set_available(layout.available);
            let mut partitions: Vec<Arc<PartitionAcc>> = old.partitions.to_vec();
            for p in partitions.len() as u32..layout.partitions {
                partitions.push(PartitionAcc::new(old.core.clone(), p, shared.config.retry_backoff));
            }
            old.replaced.store(true, Ordering::Relaxed);
            shared.retired.lock().unwrap_or_else(std::sync::PoisonError::into_inner).push(old.clone());
            tracing::info!(topic = %name, partitions = layout.partitions, "producer picked up added partitions");
            TopicState {
                core: old.core.clone(),
                partitions: partitions.into(),
                expires_ms,
                replaced: AtomicBool::new(false),
            }
        }
        None => {
            let core = TopicCore::new(name.clone(), layout.available, &shared.rng);
            let partitions = (0..layout.partitions)
                .map(|p| PartitionAcc::new(core.clone(), p, shared.config.retry_backoff))
                .collect::<Vec<_>>();
            TopicState { core, partitions: partitions.into(), expires_ms, replaced: AtomicBool::new(false) }
        }
    };
    let state = Arc::new(state);
    topics.insert(name.clone(), state.clone());
    state
}
