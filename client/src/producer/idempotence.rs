//! The idempotent producer (Kafka's `enable.idempotence`): a producer id
//! from the cluster (InitProducerId), and per partition an epoch and
//! sequence numbers stamped on every batch, so the partition leader drops a
//! retried batch it already has (answering with the original offsets) and
//! refuses one that would land out of order.
//!
//! Rules kept here:
//! - A batch keeps its stamp across retries; a retried batch goes back into
//!   its partition's `ready` queue in sealing order, so it is sent again
//!   before anything sealed after it.
//! - A partition keeps up to `max_in_flight` requests (one batch each) in
//!   flight, all within `max_in_flight` batches of its oldest unsettled
//!   one: answers can come back out of order (separate HTTP/2 streams), and
//!   the broker remembers only a producer's last five batches, so no batch
//!   may be followed by five appended ones while its own answer is still
//!   unknown (its retry would no longer be recognised as a duplicate). The
//!   broker appends a batch only as the next in sequence, and holds one
//!   that overtook another on the way for a moment, so pipelining never
//!   reorders the log.
//! - OUT_OF_ORDER_SEQUENCE_NUMBER or UNKNOWN_PRODUCER_ID for a batch that
//!   has an earlier batch still unsettled is a consequence of that one: it
//!   is retried. For the first batch in line it is retried once (it may have
//!   raced an earlier batch's answer); a second time means the broker lost
//!   or never had what came before (a batch that failed for good, a
//!   forgotten producer): the partition's epoch is bumped (KIP-360) once
//!   nothing is in flight, and its unsettled batches are stamped again from
//!   sequence 0. That is safe because a partition appends nothing of an
//!   epoch after a gap: none of the batches stamped again is in the log.
//!   A batch that failed for good is reported to its records.
//! - Epochs are per partition (the broker's table is per partition too), so
//!   one partition's bump does not disturb the others' sequences.

use std::sync::{Arc, Mutex};

use tally_proto::ErrorCode;
use tokio::time::Instant;

use super::Shared;
use super::accumulator::{PartitionAcc, PartitionState, SealedBatch, next_stamp};
use crate::error::Error;

/// The producer-wide id from InitProducerId.
#[derive(Debug, Default)]
pub(crate) struct Identity {
    state: Mutex<IdentityState>,
}

#[derive(Debug, Default, Clone, Copy)]
enum IdentityState {
    #[default]
    Unknown,
    Fetching,
    Known(i64, i16),
}

impl Identity {
    fn lock(&self) -> std::sync::MutexGuard<'_, IdentityState> {
        self.state.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

/// Whether a partition can send now.
pub(crate) enum Prepared {
    /// Stamped and allowed to send.
    Ready,
    /// Waiting for the producer id or an epoch bump; whatever ends the wait
    /// queues the partition again.
    Wait,
}

/// Readies an idempotent producer's partition for sending: takes the
/// producer id (fetching it first), stamps batches sealed before it was
/// known, and starts an epoch bump that is due.
pub(crate) fn prepare(shared: &Arc<Shared>, acc: &Arc<PartitionAcc>, st: &mut PartitionState) -> Prepared {
    if st.idem.producer.is_none() {
        let state = *shared.identity.lock();
        match state {
            IdentityState::Known(id, epoch) => {
                st.idem.producer = Some((id, epoch));
                st.idem.next_seq = 0;
            }
            IdentityState::Fetching => return Prepared::Wait,
            IdentityState::Unknown => {
                *shared.identity.lock() = IdentityState::Fetching;
                tokio::spawn(fetch_identity(shared.clone()));
                return Prepared::Wait;
            }
        }
    }
    if st.idem.bumping {
        return Prepared::Wait;
    }
    if st.idem.needs_bump {
        if st.in_flight.is_empty() {
            start_bump(shared, acc, st);
        }
        return Prepared::Wait;
    }
    // Batches sealed before the id was known, in order.
    for i in 0..st.ready.len() {
        if st.ready[i].stamp.is_none() {
            let records = st.ready[i].record_count;
            st.ready[i].stamp = next_stamp(st, records);
        }
    }
    Prepared::Ready
}

/// Asks the cluster for a producer id until it answers, then lets every
/// partition waiting for it send.
async fn fetch_identity(shared: Arc<Shared>) {
    let mut backoff = shared.config.retry_backoff;
    loop {
        match shared.transport.init_producer_id(None).await {
            Ok((id, epoch)) => {
                tracing::debug!(producer_id = id, epoch, "idempotent producer id");
                *shared.identity.lock() = IdentityState::Known(id, epoch);
                break;
            }
            Err(e) => {
                tracing::warn!(error = %e, "InitProducerId failed; retrying");
                // Waiting partitions look again (their batches may expire).
                requeue_all(&shared);
                let closed = shared.closed.load(std::sync::atomic::Ordering::Acquire);
                if closed && (shared.all_partitions().is_empty() || *shared.stopped.borrow()) {
                    *shared.identity.lock() = IdentityState::Unknown;
                    return;
                }
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(shared.config.retry_backoff_max);
            }
        }
    }
    requeue_all(&shared);
}

fn requeue_all(shared: &Shared) {
    let mut wake = false;
    for acc in shared.all_partitions() {
        let mut st = acc.lock();
        wake |= shared.queues.enqueue(&acc, &mut st);
    }
    if wake {
        shared.queues.wake.notify_one();
    }
}

/// Bumps the partition's epoch (InitProducerId with its id and epoch),
/// then stamps its unsettled batches again from sequence 0.
fn start_bump(shared: &Arc<Shared>, acc: &Arc<PartitionAcc>, st: &mut PartitionState) {
    let Some(current) = st.idem.producer else { return };
    st.idem.bumping = true;
    let (shared, acc) = (shared.clone(), acc.clone());
    tokio::spawn(async move {
        let answer = shared.transport.init_producer_id(Some(current)).await;
        let mut st = acc.lock();
        st.idem.bumping = false;
        match answer {
            Ok((id, epoch)) => {
                tracing::info!(
                    topic = %acc.topic.name,
                    partition = acc.partition,
                    producer_id = id,
                    epoch,
                    "producer epoch bumped; unsettled batches get new sequence numbers"
                );
                st.idem.producer = Some((id, epoch));
                st.idem.next_seq = 0;
                st.idem.needs_bump = false;
                for i in 0..st.ready.len() {
                    let records = st.ready[i].record_count;
                    st.ready[i].stamp = next_stamp(&mut st, records);
                    st.ready[i].sequence_refusals = 0;
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, "epoch bump failed; retrying");
                st.retry_at = Some(Instant::now() + st.backoff);
                st.backoff = (st.backoff * 2).min(shared.config.retry_backoff_max);
            }
        }
        let wake = shared.queues.enqueue(&acc, &mut st);
        drop(st);
        if wake {
            shared.queues.wake.notify_one();
        }
    });
}

/// What to do with a batch of an idempotent producer whose request failed.
pub(crate) enum Verdict {
    /// Send it again (in its place in the partition's order).
    Retry,
    /// It failed for good.
    Fail,
}

/// Decides a failed batch's fate and updates the partition's state; call
/// with the batch already out of `in_flight`.
pub(crate) fn on_failure(
    st: &mut PartitionState,
    batch: &mut SealedBatch,
    error: &Error,
    retry_by: Instant,
    deadline: Instant,
) -> Verdict {
    let first_in_line = st.in_flight.iter().all(|(s, _)| *s > batch.sequence)
        && st.ready.front().is_none_or(|b| b.sequence > batch.sequence);
    let in_time = retry_by < deadline;
    match error.code() {
        Some(ErrorCode::OutOfOrderSequenceNumber | ErrorCode::UnknownProducerId) => {
            if first_in_line {
                batch.sequence_refusals += 1;
                if batch.sequence_refusals >= 2 {
                    st.idem.needs_bump = true;
                }
            }
            if in_time { Verdict::Retry } else { Verdict::Fail }
        }
        Some(ErrorCode::InvalidProducerEpoch) => {
            st.idem.needs_bump = true;
            if in_time { Verdict::Retry } else { Verdict::Fail }
        }
        _ if error.is_retriable() && in_time => Verdict::Retry,
        // No bump here: the batch may be in the log (a lost answer, then
        // no time left), and so may the ones after it, which a bump would
        // append again. If it is not, the next batch is refused as out of
        // order twice while first in line, and that bumps (nothing after a
        // gap is ever appended, so that bump is safe).
        _ => Verdict::Fail,
    }
}

/// Puts a batch to retry back into `ready` at its place in sealing order.
pub(crate) fn requeue(st: &mut PartitionState, batch: SealedBatch) {
    let at = st.ready.iter().position(|b| b.sequence > batch.sequence).unwrap_or(st.ready.len());
    st.ready.insert(at, batch);
}
