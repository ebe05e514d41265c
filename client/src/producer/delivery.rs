//! What a sent record becomes: a [`DeliveryFuture`] that resolves to its
//! [`RecordMetadata`], or to a [`DeliveryError`] that hands the record back.
//!
//! All records of one batch share one [`BatchOutcome`]: completing a batch is
//! one store and one wake-up round, whatever its record count, and a record's
//! future is an `Arc` and two integers.

use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex, OnceLock};
use std::task::{Context, Poll, Waker};

use bytes::Bytes;
use tally_proto::batch::RecordBatch;

use crate::error::Error;

/// Where an acknowledged record landed.
///
/// It keeps a reference to its batch's shared outcome (which names the
/// topic) instead of a topic of its own: a record's delivery costs no
/// reference-count traffic beyond the one its future already held.
#[derive(Clone)]
#[non_exhaustive]
pub struct RecordMetadata {
    /// Partition.
    pub partition: u32,
    /// Offset (-1 with acks=0: nobody waited for the broker's answer).
    pub offset: i64,
    /// Record timestamp: the one sent, or the broker's append time for a
    /// `LogAppendTime` topic.
    pub timestamp: i64,
    batch: Arc<BatchOutcome>,
}

impl RecordMetadata {
    /// Topic.
    pub fn topic(&self) -> &str {
        &self.batch.topic
    }

    /// Topic, as a shared string.
    pub fn topic_arc(&self) -> Arc<str> {
        self.batch.topic.clone()
    }
}

impl std::fmt::Debug for RecordMetadata {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RecordMetadata")
            .field("topic", &self.topic())
            .field("partition", &self.partition)
            .field("offset", &self.offset)
            .field("timestamp", &self.timestamp)
            .finish()
    }
}

impl PartialEq for RecordMetadata {
    fn eq(&self, other: &Self) -> bool {
        (self.topic(), self.partition, self.offset, self.timestamp)
            == (other.topic(), other.partition, other.offset, other.timestamp)
    }
}

impl Eq for RecordMetadata {}

/// A record that was not delivered, as it was sent (key, value and headers
/// are slices of the batch it travelled in).
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct UndeliveredRecord {
    /// Topic.
    pub topic: Arc<str>,
    /// Partition it was sent to.
    pub partition: u32,
    /// Timestamp (ms).
    pub timestamp: i64,
    /// Key.
    pub key: Option<Bytes>,
    /// Value.
    pub value: Option<Bytes>,
    /// Headers, in order.
    pub headers: Vec<(String, Option<Bytes>)>,
}

/// A record that failed for good: why, and the record itself, so the caller
/// can send it again, park it, or log it.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{error}")]
#[non_exhaustive]
pub struct DeliveryError {
    /// Why it failed.
    pub error: Error,
    /// The record; `None` only if its batch could not be read back (which
    /// the producer's own encoder never produces).
    pub record: Option<Box<UndeliveredRecord>>,
}

impl From<DeliveryError> for Error {
    fn from(e: DeliveryError) -> Error {
        e.error
    }
}

/// How a batch ended.
#[derive(Debug)]
enum Settled {
    /// Base offset of the batch (-1 with acks=0), and the broker's append
    /// time for `LogAppendTime` topics (else -1).
    Acked {
        base_offset: i64,
        log_append_time_ms: i64,
    },
    Failed(Failure),
}

#[derive(Debug)]
struct Failure {
    error: Error,
    /// The batch as sent, to hand records back from.
    batch: Bytes,
    /// Its records, decoded once by the first future that asks.
    records: OnceLock<Vec<UndeliveredRecord>>,
}

/// The shared fate of one batch's records.
#[derive(Debug)]
pub(crate) struct BatchOutcome {
    topic: Arc<str>,
    partition: u32,
    settled: OnceLock<Settled>,
    /// Futures waiting for `settled`; drained by the completion.
    wakers: Mutex<Vec<Waker>>,
}

impl BatchOutcome {
    pub(crate) fn new(topic: Arc<str>, partition: u32) -> Arc<BatchOutcome> {
        Arc::new(BatchOutcome { topic, partition, settled: OnceLock::new(), wakers: Mutex::new(Vec::new()) })
    }

    /// The batch was appended at `base_offset`.
    pub(crate) fn acked(&self, base_offset: i64, log_append_time_ms: i64) {
        self.settle(Settled::Acked { base_offset, log_append_time_ms });
    }

    /// The batch failed for good; `batch` is its bytes as sent.
    pub(crate) fn failed(&self, error: Error, batch: Bytes) {
        self.settle(Settled::Failed(Failure { error, batch, records: OnceLock::new() }));
    }

    fn settle(&self, how: Settled) {
        if self.settled.set(how).is_err() {
            return; // settled already (acks=0 settles at dispatch)
        }
        let wakers = std::mem::take(&mut *self.wakers.lock().unwrap_or_else(std::sync::PoisonError::into_inner));
        for w in wakers {
            w.wake();
        }
    }

    /// Waits until settled (for `flush`).
    pub(crate) async fn settled(self: &Arc<Self>) {
        let _ = DeliveryFuture::new(self.clone(), 0, 0).await;
    }
}

const NO_SLOT: u32 = u32::MAX;

/// Resolves once a sent record is acknowledged at the producer's acks level,
/// or has failed for good. A named future: awaiting it allocates nothing.
#[derive(Debug)]
#[must_use = "a delivery is only known once the future resolves"]
pub struct DeliveryFuture {
    /// The batch's outcome; moved into the result when the future resolves.
    outcome: Option<Arc<BatchOutcome>>,
    offset_delta: i32,
    timestamp: i64,
    /// Where this future's waker sits in the outcome's list (`NO_SLOT`:
    /// nowhere yet). A `u32` keeps the future at 24 bytes.
    waker_slot: u32,
}

impl DeliveryFuture {
    pub(crate) fn new(outcome: Arc<BatchOutcome>, offset_delta: i32, timestamp: i64) -> Self {
        DeliveryFuture { outcome: Some(outcome), offset_delta, timestamp, waker_slot: NO_SLOT }
    }

    /// Waits for the outcome (the same as `.await` on the future).
    pub async fn wait(self) -> Result<RecordMetadata, DeliveryError> {
        self.await
    }

    /// The result once `outcome` has settled; the future is spent after.
    fn resolve(&mut self, outcome: Arc<BatchOutcome>) -> Result<RecordMetadata, DeliveryError> {
        match outcome.settled.get().expect("resolve follows settle") {
            &Settled::Acked { base_offset, log_append_time_ms } => Ok(RecordMetadata {
                partition: outcome.partition,
                offset: if base_offset < 0 { -1 } else { base_offset + i64::from(self.offset_delta) },
                timestamp: if log_append_time_ms >= 0 { log_append_time_ms } else { self.timestamp },
                batch: outcome,
            }),
            Settled::Failed(f) => {
                let records = f.records.get_or_init(|| decode_records(&outcome.topic, outcome.partition, &f.batch));
                let record =
                    usize::try_from(self.offset_delta).ok().and_then(|i| records.get(i)).cloned().map(Box::new);
                Err(DeliveryError { error: f.error.clone(), record })
            }
        }
    }
}

impl Future for DeliveryFuture {
    type Output = Result<RecordMetadata, DeliveryError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.get_mut();
        let outcome = this.outcome.as_ref().expect("DeliveryFuture polled after it resolved");
        if outcome.settled.get().is_some() {
            let outcome = this.outcome.take().expect("checked above");
            return Poll::Ready(this.resolve(outcome));
        }
        let mut wakers = outcome.wakers.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        // Checked again under the lock: `settle` stores before it drains.
        if outcome.settled.get().is_some() {
            drop(wakers);
            let outcome = this.outcome.take().expect("checked above");
            return Poll::Ready(this.resolve(outcome));
        }
        match wakers.get_mut(this.waker_slot as usize) {
            Some(w) if this.waker_slot != NO_SLOT => {
                if !w.will_wake(cx.waker()) {
                    *w = cx.waker().clone();
                }
            }
            _ => {
                this.waker_slot = u32::try_from(wakers.len()).unwrap_or(NO_SLOT);
                wakers.push(cx.waker().clone());
            }
        }
        Poll::Pending
    }
}

/// The records of a batch the producer built, for handing back.
fn decode_records(topic: &Arc<str>, partition: u32, batch: &Bytes) -> Vec<UndeliveredRecord> {
    let Ok(batch) = RecordBatch::check_framing(batch.clone()) else { return Vec::new() };
    let Ok(records) = batch.records() else { return Vec::new() };
    records
        .map_while(Result::ok)
        .map(|r| UndeliveredRecord {
            topic: topic.clone(),
            partition,
            timestamp: r.timestamp,
            headers: r
                .headers()
                .map_while(Result::ok)
                .map(|(k, v)| (String::from_utf8_lossy(&k).into_owned(), v))
                .collect(),
            key: r.key,
            value: r.value,
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use tally_proto::batch::{BatchBuilder, HeaderRef, RecordRef};

    #[tokio::test]
    async fn every_record_of_an_acked_batch_gets_its_own_offset() {
        let outcome = BatchOutcome::new(Arc::from("t"), 2);
        let first = DeliveryFuture::new(outcome.clone(), 0, 10);
        let third = DeliveryFuture::new(outcome.clone(), 2, 12);
        let waiting = tokio::spawn(third);
        tokio::task::yield_now().await;
        outcome.acked(100, -1);
        assert_eq!(first.await.unwrap().offset, 100);
        let meta = waiting.await.unwrap().unwrap();
        assert_eq!((meta.partition, meta.offset, meta.timestamp), (2, 102, 12));
    }

    #[tokio::test]
    async fn a_failed_delivery_hands_back_its_own_record() {
        let mut b = BatchBuilder::new();
        b.push(&RecordRef { timestamp: 5, key: Some(b"k0"), value: Some(b"v0"), headers: &[] });
        let h = [HeaderRef { key: "h", value: Some(b"x") }];
        b.push(&RecordRef { timestamp: 6, key: None, value: Some(b"v1"), headers: &h });
        let outcome = BatchOutcome::new(Arc::from("t"), 0);
        let second = DeliveryFuture::new(outcome.clone(), 1, 6);
        outcome.failed(Error::Closed, b.finish());
        let e = second.await.unwrap_err();
        assert!(matches!(e.error, Error::Closed));
        let r = e.record.expect("record handed back");
        assert_eq!((r.timestamp, r.key, r.value.as_deref()), (6, None, Some(&b"v1"[..])));
        assert_eq!(r.headers, vec![("h".to_string(), Some(Bytes::from_static(b"x")))]);
    }

    #[tokio::test]
    async fn log_append_time_replaces_the_sent_timestamp() {
        let outcome = BatchOutcome::new(Arc::from("t"), 0);
        let f = DeliveryFuture::new(outcome.clone(), 0, 1);
        outcome.acked(7, 999);
        assert_eq!(f.await.unwrap().timestamp, 999);
    }
}
