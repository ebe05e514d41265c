//! The idempotent producer's part of a leader's produce: a request carries
//! at most one batch with a producer id per partition (Kafka's rule, so a
//! duplicate is answered with exactly its own offsets), and a batch that
//! arrives ahead of its producer's sequence waits a moment for the batches
//! before it: a producer keeps up to five requests in flight per partition,
//! and two requests can overtake each other between its socket and the log
//! lock (separate HTTP/2 streams, separate tasks). Without the wait such a
//! batch is refused as OUT_OF_ORDER_SEQUENCE_NUMBER and sent again; with it,
//! it is appended right after the batch it overtook.

use std::time::Duration;

use tally_proto::batch::RecordBatch;

use super::*;
use crate::storage::producer_state::ProducerStateError;

/// How long a batch ahead of its producer's sequence waits for the batches
/// before it before being refused as out of order.
pub(super) const SEQUENCE_GAP_WAIT: Duration = Duration::from_millis(500);

/// How far ahead of the expected sequence a batch may be and still wait:
/// five in-flight batches of small records stay well inside it; anything
/// further is refused at once.
const SEQUENCE_GAP_WINDOW: i64 = 1 << 24;

/// The batch with a producer id in `batches`, if any; refuses a request
/// that mixes it with other batches for the same partition.
pub(super) fn idempotent_batch(batches: &[RecordBatch]) -> Result<Option<&RecordBatch>, BrokerError> {
    let mut with_producer = batches.iter().filter(|b| b.header().producer_id() >= 0);
    match (with_producer.next(), batches.len()) {
        (None, _) => Ok(None),
        (Some(b), 1) => Ok(Some(b)),
        (Some(_), n) => Err(BrokerError::InvalidRequest(format!(
            "a batch with a producer id must be the only batch of its partition in a produce request, got {n}"
        ))),
    }
}

/// True when `first_seq` lies a little ahead of `expected` (wrapping at
/// `i32::MAX` as sequences do).
fn ahead_of(first_seq: i32, expected: i32) -> bool {
    let distance = (i64::from(first_seq) - i64::from(expected)).rem_euclid(i64::from(i32::MAX) + 1);
    (1..SEQUENCE_GAP_WINDOW).contains(&distance)
}

impl Partition {
    /// Waits (at most [`SEQUENCE_GAP_WAIT`]) while `batch` is a little
    /// ahead of its producer's next sequence in this log (or, for a
    /// producer the log does not know, of sequence 0), for the batches
    /// before it to be appended. Returns at once for anything else; the
    /// append under the log lock decides.
    pub(super) async fn await_sequence_turn(&self, batch: &RecordBatch) {
        let deadline = tokio::time::Instant::now() + SEQUENCE_GAP_WAIT;
        // Subscribed before the check: an append in between still wakes us.
        let mut ends = self.log_end.subscribe();
        loop {
            let waiting = match self.read_log().producer_verdict(batch) {
                Err(ProducerStateError::OutOfOrderSequence { first_seq, expected, .. }) => {
                    ahead_of(first_seq, expected)
                }
                // A new producer's second batch overtook its first.
                Err(ProducerStateError::UnknownProducerId { first_seq, .. }) => ahead_of(first_seq, 0),
                _ => false,
            };
            if !waiting {
                return;
            }
            match tokio::time::timeout_at(deadline, ends.changed()).await {
                Ok(Ok(())) => {}
                Ok(Err(_)) | Err(_) => return,
            }
        }
    }

    /// Refuses a produce unless this broker leads in `leader_epoch` now: the
    /// check `produce` makes under the log lock, made early so that a
    /// former leader answers NOT_LEADER_OR_FOLLOWER before anything about
    /// the batch's producer (Kafka's order: a client that hears a producer
    /// error from a stale leader would act on it).
    pub fn check_leads_now(&self, leader_epoch: u32) -> Result<(), BrokerError> {
        let _log = self.read_log();
        self.check_leads(leader_epoch, false)
    }

    /// A conditional append's check, under the log lock: the log must end
    /// at `expected`, unless the request is a retry of an idempotent
    /// producer's batch that was appended (then it is answered as that
    /// append, not as a mismatch).
    pub(super) fn check_end_offset(
        &self,
        log: &Log,
        batches: &[RecordBatch],
        expected: u64,
    ) -> Result<(), BrokerError> {
        let current = log.log_end_offset().get();
        if current == expected {
            return Ok(());
        }
        let retry_of_appended = batches.len() == 1
            && matches!(
                log.producer_verdict(&batches[0]),
                Ok(Some(crate::storage::producer_state::Verdict::Duplicate(_)))
            );
        if retry_of_appended {
            return Ok(());
        }
        Err(BrokerError::EndOffsetMismatch {
            topic: self.topic().to_string(),
            partition: self.index(),
            expected,
            current,
        })
    }

    /// Drops the producers idle for `expiration_ms` from the log's
    /// producer-state table; returns how many.
    pub fn expire_producers(&self, expiration_ms: i64) -> usize {
        self.write_log().expire_producers(expiration_ms)
    }
}

#[cfg(test)]
mod tests {
    use super::ahead_of;

    #[test]
    fn a_batch_is_ahead_only_a_little_and_across_the_wrap() {
        assert!(ahead_of(10, 5));
        assert!(!ahead_of(5, 5));
        assert!(!ahead_of(4, 5), "behind is a duplicate or out of order, never waited for");
        assert!(ahead_of(3, i32::MAX - 2), "wraps past i32::MAX to 0");
        assert!(!ahead_of(1 << 30, 0), "too far ahead to be in flight");
    }
}
