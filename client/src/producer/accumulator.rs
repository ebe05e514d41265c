//! Per-partition batching: the open batch records are copied into, the
//! sealed batches waiting for the sender, and the buffer memory they hold.
//!
//! Invariants:
//! - Each partition has its own lock; nothing on the per-record path locks
//!   anything shared by two partitions.
//! - A partition is on the sender's ready list at most once (`queued`).
//!   Without idempotence it is never there while it has a request in
//!   flight: the request's end puts it back if batches are waiting, so it
//!   has at most one request in flight and its batches reach the broker in
//!   sequence order, retries included (a retried batch goes back to the
//!   front of `ready`). An idempotent producer's partition may have up to
//!   `max_in_flight` requests of one batch each in flight; the broker's
//!   sequence check keeps their order (see `idempotence.rs`).
//! - Buffer memory is taken from the producer's semaphore in chunks
//!   (`credit`), spent by records, and given back when their batch settles;
//!   unspent credit goes back when the batch is sealed.
//! - Lock order: a partition's lock, then the sender's work queue.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use bytes::Bytes;
use tally_proto::batch::BatchBuilder;
use tally_proto::compression::Compression;
use tokio::sync::{Notify, Semaphore};
use tokio::time::Instant;

use super::delivery::BatchOutcome;

/// Buffer memory taken from the producer's semaphore; given back on drop.
#[derive(Debug)]
pub(crate) struct Reservation {
    buffer: Arc<Semaphore>,
    bytes: usize,
}

impl Reservation {
    pub(crate) fn new(buffer: Arc<Semaphore>, bytes: usize) -> Self {
        Reservation { buffer, bytes }
    }

    fn take(&mut self, bytes: usize) -> Reservation {
        debug_assert!(bytes <= self.bytes);
        self.bytes -= bytes;
        Reservation { buffer: self.buffer.clone(), bytes }
    }

    /// Bytes held.
    pub(crate) fn bytes(&self) -> usize {
        self.bytes
    }

    pub(crate) fn merge(&mut self, mut other: Reservation) {
        self.bytes += std::mem::take(&mut other.bytes);
    }

    /// Moves `bytes` of this reservation into `to` (of the same buffer),
    /// without touching the buffer's shared counters: the per-record path.
    fn move_to(&mut self, to: &mut Reservation, bytes: usize) {
        debug_assert!(bytes <= self.bytes && Arc::ptr_eq(&self.buffer, &to.buffer));
        self.bytes -= bytes;
        to.bytes += bytes;
    }
}

impl Drop for Reservation {
    fn drop(&mut self) {
        if self.bytes > 0 {
            self.buffer.add_permits(self.bytes);
        }
    }
}

/// What the partition lock guards.
pub(crate) struct PartitionState {
    pub open: Option<OpenBatch>,
    /// Sealed batches not in flight, in sequence order.
    pub ready: VecDeque<SealedBatch>,
    /// The batches in flight: their place in the partition's order
    /// (`SealedBatch::sequence`) and outcome (empty: none).
    pub in_flight: Vec<(u64, Arc<BatchOutcome>)>,
    /// On the sender's ready list.
    pub queued: bool,
    /// No request before this (backing off after a retriable error).
    pub retry_at: Option<Instant>,
    /// The next retry's backoff.
    pub backoff: Duration,
    /// Buffer memory taken and not yet spent by a record.
    pub credit: Option<Reservation>,
    /// Sequence number of the next batch sealed (its place in the partition's
    /// order; the idempotent producer will send it as the base sequence).
    pub next_sequence: u64,
    /// Size of the last batch sealed: the next one's buffer capacity.
    pub last_batch_bytes: usize,
    /// The idempotent producer's state of this partition.
    pub idem: IdempotentState,
}

/// The producer id, epoch and sequence numbers of one partition, for an
/// idempotent producer. Epochs are per partition: the broker's
/// producer-state table is too, so bumping one partition's epoch (KIP-360)
/// leaves the others' sequences alone.
#[derive(Debug, Default)]
pub(crate) struct IdempotentState {
    /// Producer id and epoch, once known.
    pub producer: Option<(i64, i16)>,
    /// Base sequence of the next batch stamped.
    pub next_seq: i32,
    /// A batch failed for good (or the broker lost this producer): the
    /// epoch is bumped and sequences restart before anything more is sent.
    pub needs_bump: bool,
    /// An InitProducerId for the bump is under way.
    pub bumping: bool,
}

/// A batch's idempotent-producer fields.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Stamp {
    pub producer_id: i64,
    pub epoch: i16,
    pub base_sequence: i32,
}

/// A batch taking records.
pub(crate) struct OpenBatch {
    pub builder: BatchBuilder,
    pub created: Instant,
    pub outcome: Arc<BatchOutcome>,
    /// Buffer memory its records hold.
    pub reserved: Option<Reservation>,
    /// Tells the linger timer which batch its entry was for.
    pub id: u64,
}

/// The bytes of a sealed batch: ready, or being compressed off the runtime.
pub(crate) enum BatchBytes {
    Ready(Bytes),
    Compressing(tokio::task::JoinHandle<Bytes>),
}

/// A batch that takes no more records.
pub(crate) struct SealedBatch {
    pub bytes: BatchBytes,
    /// Uncompressed size, for request sizing.
    pub size: usize,
    pub record_count: i32,
    pub created: Instant,
    pub outcome: Arc<BatchOutcome>,
    pub sequence: u64,
    /// The producer fields it is to be sent with (idempotent producer).
    pub stamp: Option<Stamp>,
    /// The producer fields its bytes hold now.
    pub stamped: Option<Stamp>,
    /// Answers of OUT_OF_ORDER_SEQUENCE_NUMBER or UNKNOWN_PRODUCER_ID it got
    /// while first in line (see `idempotence.rs`).
    pub sequence_refusals: u8,
    pub _reserved: Option<Reservation>,
}

impl SealedBatch {
    /// The batch's bytes, waiting for its compression if need be.
    pub(crate) async fn bytes(&mut self) -> Bytes {
        let bytes = match &mut self.bytes {
            BatchBytes::Ready(b) => return b.clone(),
            BatchBytes::Compressing(task) => match task.await {
                Ok(b) => b,
                // Only a panic in the codec gets here; no bytes to send.
                Err(e) => std::panic::resume_unwind(e.into_panic()),
            },
        };
        self.bytes = BatchBytes::Ready(bytes.clone());
        bytes
    }

    /// The batch's bytes with its producer fields as `stamp` says:
    /// patched (and the CRC recomputed) when they differ, in place when no
    /// one else holds the bytes, else on a copy.
    pub(crate) async fn stamped_bytes(&mut self) -> Bytes {
        let bytes = self.bytes().await;
        match self.stamp {
            Some(stamp) if self.stamped != Some(stamp) => {
                drop(bytes);
                let BatchBytes::Ready(ready) = std::mem::replace(&mut self.bytes, BatchBytes::Ready(Bytes::new()))
                else {
                    unreachable!("bytes() made them ready")
                };
                let mut owned = ready.try_into_mut().unwrap_or_else(|shared| bytes::BytesMut::from(&shared[..]));
                tally_proto::batch::set_producer_fields(
                    &mut owned,
                    stamp.producer_id,
                    stamp.epoch,
                    stamp.base_sequence,
                );
                let bytes = owned.freeze();
                self.bytes = BatchBytes::Ready(bytes.clone());
                self.stamped = Some(stamp);
                bytes
            }
            _ => bytes,
        }
    }
}

/// One partition's accumulator.
pub(crate) struct PartitionAcc {
    pub topic: Arc<TopicCore>,
    pub partition: u32,
    /// The topic's name, a copy of its own: every record's delivery holds
    /// it, and a count shared by all partitions would bounce between cores.
    pub topic_name: Arc<str>,
    state: Mutex<PartitionState>,
}

impl PartitionAcc {
    pub(crate) fn new(topic: Arc<TopicCore>, partition: u32, backoff: Duration) -> Arc<Self> {
        Arc::new(PartitionAcc {
            topic_name: Arc::from(&*topic.name),
            topic,
            partition,
            state: Mutex::new(PartitionState {
                open: None,
                ready: VecDeque::new(),
                in_flight: Vec::new(),
                queued: false,
                retry_at: None,
                backoff,
                credit: None,
                next_sequence: 0,
                last_batch_bytes: 0,
                idem: IdempotentState::default(),
            }),
        })
    }

    pub(crate) fn lock(&self) -> MutexGuard<'_, PartitionState> {
        self.state.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

/// Per-topic state shared by every partition's accumulator.
pub(crate) struct TopicCore {
    pub name: Arc<str>,
    /// The partition unkeyed records go to now.
    pub sticky: AtomicU32,
    /// Whether each partition had a reachable leader when last looked at.
    available: Mutex<Vec<bool>>,
}

impl TopicCore {
    pub(crate) fn new(name: Arc<str>, available: Vec<bool>, rng: &Rng) -> Arc<Self> {
        let core = TopicCore { name, sticky: AtomicU32::new(0), available: Mutex::new(available) };
        core.switch_sticky(u32::MAX, rng);
        Arc::new(core)
    }

    /// Takes what the metadata says of each partition's leader.
    pub(crate) fn set_available(&self, available: Vec<bool>) {
        *self.available.lock().unwrap_or_else(std::sync::PoisonError::into_inner) = available;
    }

    /// Marks one partition as having (or not) a reachable leader.
    pub(crate) fn mark(&self, partition: u32, up: bool) {
        if let Some(a) =
            self.available.lock().unwrap_or_else(std::sync::PoisonError::into_inner).get_mut(partition as usize)
        {
            *a = up;
        }
    }

    /// Kafka's sticky partitioner (KIP-480, with KIP-794's avoidance of
    /// unavailable leaders): when the batch of the sticky partition `from` is
    /// sealed, unkeyed records move to another partition, picked at random
    /// among those with a leader. `u32::MAX` picks a first one.
    pub(crate) fn switch_sticky(&self, from: u32, rng: &Rng) {
        let available = self.available.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let n = u32::try_from(available.len()).unwrap_or(u32::MAX);
        if n == 0 || (from != u32::MAX && self.sticky.load(Ordering::Relaxed) != from) {
            return;
        }
        let up: Vec<u32> = (0..n).filter(|&p| available[p as usize] && p != from).collect();
        let pick = if up.is_empty() {
            // Nothing else is up: any other partition (or stay, with one).
            if n == 1 { 0 } else { (from.wrapping_add(1 + (rng.next() % u64::from(n - 1)) as u32)) % n }
        } else {
            up[(rng.next() % up.len() as u64) as usize]
        };
        self.sticky.store(pick, Ordering::Relaxed);
    }
}

/// A topic's accumulators, as one generation of its metadata sized them.
pub(crate) struct TopicState {
    pub core: Arc<TopicCore>,
    pub partitions: Box<[Arc<PartitionAcc>]>,
    /// Coarse wall-clock ms after which the layout is looked up again.
    pub expires_ms: AtomicI64,
    /// Set when a newer generation (more partitions) took its place.
    pub replaced: AtomicBool,
}

/// Work handed to the sender: partitions with sealed batches, and open
/// batches to seal when their linger runs out.
#[derive(Default)]
pub(crate) struct Work {
    pub ready: Vec<Arc<PartitionAcc>>,
    /// In opening order, which is deadline order (linger is one constant).
    /// One entry per batch opened; an entry whose batch was sealed by size
    /// meanwhile is skipped when it comes due. So it holds at most the
    /// batches opened within one linger.
    pub lingering: VecDeque<(Instant, Arc<PartitionAcc>, u64)>,
}

/// Everything the accumulators share with the sender.
pub(crate) struct Queues {
    work: Mutex<Work>,
    /// Wakes the sender.
    pub wake: Notify,
    next_batch_id: AtomicU64,
    /// The producer's runtime: sealing a batch may start its compression
    /// from a thread outside it (`try_send`).
    pub runtime: tokio::runtime::Handle,
    /// With idempotence, the requests (of one batch each) a partition may
    /// have in flight; `None` without.
    pub idempotent: Option<usize>,
}

impl Queues {
    pub(crate) fn new(runtime: tokio::runtime::Handle) -> Self {
        Queues {
            work: Mutex::new(Work::default()),
            wake: Notify::new(),
            next_batch_id: AtomicU64::new(0),
            runtime,
            idempotent: None,
        }
    }

    pub(crate) fn lock(&self) -> MutexGuard<'_, Work> {
        self.work.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Puts a partition with ready batches on the sender's list (if it is not
    /// on it and has no request in flight). True when the sender should wake.
    pub(crate) fn enqueue(&self, acc: &Arc<PartitionAcc>, st: &mut PartitionState) -> bool {
        if st.queued || st.ready.is_empty() || !(self.may_send_more(st) || self.bump_due(st)) {
            return false;
        }
        st.queued = true;
        self.lock().ready.push(acc.clone());
        true
    }

    /// Whether the partition may have one more request in flight now.
    pub(crate) fn may_send_more(&self, st: &PartitionState) -> bool {
        match self.idempotent {
            None => st.in_flight.is_empty(),
            // A bump waits until nothing is in flight; the next batch stays
            // within `limit` of the oldest one in flight (see
            // `idempotence.rs`).
            Some(limit) => {
                let oldest = st.in_flight.iter().map(|(s, _)| *s).min();
                let within = match (oldest, st.ready.front()) {
                    (Some(oldest), Some(next)) => next.sequence < oldest + limit as u64,
                    _ => true,
                };
                st.in_flight.len() < limit && within && !st.idem.needs_bump && !st.idem.bumping
            }
        }
    }

    /// An idempotent partition whose epoch bump can start now (nothing in
    /// flight, none under way): the sender's dispatch starts it.
    pub(crate) fn bump_due(&self, st: &PartitionState) -> bool {
        self.idempotent.is_some() && st.idem.needs_bump && !st.idem.bumping && st.in_flight.is_empty()
    }

    /// Opens a batch on the partition, registering its linger deadline.
    /// True when the sender should wake (it had no deadline to wait for).
    pub(crate) fn open_batch(
        &self,
        acc: &Arc<PartitionAcc>,
        st: &mut PartitionState,
        capacity: usize,
        compression: Compression,
        linger: Duration,
    ) -> bool {
        let mut builder = BatchBuilder::with_capacity(capacity);
        builder.set_compression(compression);
        let created = Instant::now();
        let id = self.next_batch_id.fetch_add(1, Ordering::Relaxed);
        st.open = Some(OpenBatch {
            builder,
            created,
            outcome: BatchOutcome::new(acc.topic_name.clone(), acc.partition),
            reserved: None,
            id,
        });
        let mut work = self.lock();
        work.lingering.push_back((created + linger, acc.clone(), id));
        work.lingering.len() == 1
    }

    /// Seals the partition's open batch (if any): gives back unspent credit,
    /// starts its compression, queues it, and moves the sticky partition on.
    /// True when the sender should wake.
    pub(crate) fn seal(&self, acc: &Arc<PartitionAcc>, st: &mut PartitionState, rng: &Rng) -> bool {
        let Some(open) = st.open.take() else { return false };
        st.credit = None;
        if open.builder.is_empty() {
            return false; // opened by a send that then waited for buffer
        }
        let OpenBatch { mut builder, created, outcome, reserved, id: _ } = open;
        let (size, record_count) = (builder.len(), builder.record_count());
        st.last_batch_bytes = size;
        let stamp = if self.idempotent.is_some() { next_stamp(st, record_count) } else { None };
        if let Some(s) = stamp {
            builder.set_producer(s.producer_id, s.epoch, s.base_sequence);
        }
        let bytes = if builder.is_compressed() {
            BatchBytes::Compressing(self.runtime.spawn_blocking(move || builder.finish()))
        } else {
            BatchBytes::Ready(builder.finish())
        };
        let sequence = st.next_sequence;
        st.next_sequence += 1;
        st.ready.push_back(SealedBatch {
            bytes,
            size,
            record_count,
            created,
            outcome,
            sequence,
            stamp,
            stamped: stamp,
            sequence_refusals: 0,
            _reserved: reserved,
        });
        acc.topic.switch_sticky(acc.partition, rng);
        self.enqueue(acc, st)
    }

    /// Spends `bytes` of the partition's credit on a record of its open batch.
    /// False when the credit is short (the caller takes more first).
    pub(crate) fn spend(st: &mut PartitionState, bytes: usize) -> bool {
        let Some(credit) = st.credit.as_mut().filter(|c| c.bytes >= bytes) else { return false };
        let open = st.open.as_mut().expect("spend follows open_batch");
        match &mut open.reserved {
            // No reference count or semaphore touched per record: the
            // buffer's counters are shared by every partition and thread.
            Some(r) => credit.move_to(r, bytes),
            slot @ None => *slot = Some(credit.take(bytes)),
        }
        true
    }

    /// Adds buffer memory to the partition's credit.
    pub(crate) fn add_credit(st: &mut PartitionState, more: Reservation) {
        match &mut st.credit {
            Some(c) => c.merge(more),
            slot @ None => *slot = Some(more),
        }
    }
}

/// A small, fast random source for sticky partitions and jitter
/// (xorshift64*).
#[derive(Debug)]
pub(crate) struct Rng(AtomicU64);

impl Rng {
    pub(crate) fn new(seed: u64) -> Self {
        Rng(AtomicU64::new(seed | 1))
    }

    pub(crate) fn next(&self) -> u64 {
        let mut x = self.0.load(Ordering::Relaxed);
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0.store(x, Ordering::Relaxed);
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
}

/// The producer fields of the partition's next batch of `records` records,
/// taking its sequence numbers; `None` while the producer id is unknown
/// (the batch is stamped when it is, before it is first sent).
pub(crate) fn next_stamp(st: &mut PartitionState, records: i32) -> Option<Stamp> {
    let (producer_id, epoch) = st.idem.producer?;
    let base_sequence = st.idem.next_seq;
    st.idem.next_seq = wrapping_seq_add(base_sequence, records);
    Some(Stamp { producer_id, epoch, base_sequence })
}

/// `seq + n`, wrapping past `i32::MAX` to 0 as Kafka's sequences do.
pub(crate) fn wrapping_seq_add(seq: i32, n: i32) -> i32 {
    ((i64::from(seq) + i64::from(n)) % (i64::from(i32::MAX) + 1)) as i32
}
