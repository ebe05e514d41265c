//! The sender task: seals batches whose linger ran out, groups the
//! partitions with sealed batches by leader broker, and sends each broker
//! requests that carry every ready batch for it, up to `max_in_flight`
//! requests per broker at once. Request tasks settle the batches, put
//! retriable ones back at the front of their partition's queue, and hand the
//! partition back.
//!
//! The sender never waits on metadata: a partition whose leader is not
//! cached waits a backoff while a refresh runs in the background.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use bytes::Bytes;
use tally_proto::v1::{self as pb};
use tokio::time::Instant;

use super::Shared;
use super::accumulator::{BatchBytes, PartitionAcc, PartitionState, SealedBatch};
use super::idempotence::{self, Prepared};
use crate::error::Error;
use crate::partition_client::Acks;

/// Runs until the producer is closed and everything it took is settled.
pub(crate) async fn run(shared: Arc<Shared>) {
    let mut sender = Sender { shared, waiting: Vec::new(), in_flight: HashMap::new(), refreshing: HashMap::new() };
    let mut swept = false;
    loop {
        let closed = sender.shared.closed.load(Ordering::Acquire);
        if closed && !swept {
            // Sends check `closed` under their partition's lock, so after
            // this sweep no batch opens again.
            sender.seal_everything();
            swept = true;
        }
        let next_linger = sender.seal_lingering(closed);
        let next_retry = sender.dispatch();
        if closed && sender.is_idle() {
            break;
        }
        let deadline = match (next_linger, next_retry) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        let wake = sender.shared.queues.wake.notified();
        match deadline {
            Some(d) => {
                tokio::select! {
                    () = wake => {}
                    () = tokio::time::sleep_until(d) => {}
                }
            }
            None => wake.await,
        }
    }
    sender.shared.stopped.send_replace(true);
}

struct Sender {
    shared: Arc<Shared>,
    /// Partitions this task holds (`queued`) that could not be sent yet:
    /// backing off, leader unknown, or their broker at `max_in_flight`.
    waiting: Vec<Arc<PartitionAcc>>,
    /// Requests in flight per broker address.
    in_flight: HashMap<Arc<str>, Arc<AtomicUsize>>,
    /// Topics whose metadata refresh was started, and when the next may be.
    refreshing: HashMap<Arc<str>, Instant>,
}

impl Sender {
    /// Seals the open batches whose linger has run out (all of them once
    /// closed); returns the next linger deadline.
    fn seal_lingering(&mut self, closed: bool) -> Option<Instant> {
        let now = Instant::now();
        loop {
            let due = {
                let mut work = self.shared.queues.lock();
                match work.lingering.front() {
                    Some((deadline, _, _)) if closed || *deadline <= now => work.lingering.pop_front(),
                    Some((deadline, _, _)) => return Some(*deadline),
                    None => return None,
                }
            };
            let (_, acc, id) = due?;
            let mut st = acc.lock();
            if st.open.as_ref().is_some_and(|o| o.id == id) {
                self.shared.queues.seal(&acc, &mut st, &self.shared.rng);
            }
        }
    }

    /// Seals every open batch of every topic (close and flush).
    fn seal_everything(&self) {
        for acc in self.shared.all_partitions() {
            let mut st = acc.lock();
            self.shared.queues.seal(&acc, &mut st, &self.shared.rng);
        }
    }

    /// True when nothing is open, queued or in flight.
    fn is_idle(&self) -> bool {
        if !self.waiting.is_empty() || self.in_flight.values().any(|c| c.load(Ordering::Acquire) > 0) {
            return false;
        }
        if !self.shared.queues.lock().ready.is_empty() {
            return false;
        }
        self.shared.all_partitions().iter().all(|acc| {
            let st = acc.lock();
            st.open.is_none() && st.ready.is_empty() && st.in_flight.is_empty()
        })
    }

    /// Starts requests for every partition that can send now; returns when
    /// the next backing-off partition may.
    fn dispatch(&mut self) -> Option<Instant> {
        let now = Instant::now();
        let mut candidates = std::mem::take(&mut self.waiting);
        candidates.append(&mut std::mem::take(&mut self.shared.queues.lock().ready));
        let mut next_retry: Option<Instant> = None;
        let mut by_leader: HashMap<Arc<str>, Vec<Arc<PartitionAcc>>> = HashMap::new();
        for acc in candidates {
            let mut st = acc.lock();
            self.expire(&acc, &mut st, now);
            if st.ready.is_empty() {
                st.queued = false;
                continue;
            }
            if let Some(at) = st.retry_at.filter(|&at| at > now) {
                next_retry = Some(next_retry.map_or(at, |n| n.min(at)));
                drop(st);
                self.waiting.push(acc);
                continue;
            }
            if self.shared.queues.idempotent.is_some() {
                let prepared = idempotence::prepare(&self.shared, &acc, &mut st);
                if matches!(prepared, Prepared::Wait) || !self.shared.queues.may_send_more(&st) {
                    // What it waits for (the producer id, a bump, a request
                    // slot) queues it again when it is done.
                    st.queued = false;
                    continue;
                }
            }
            drop(st);
            match self.shared.transport.leader(&acc.topic.name, acc.partition) {
                Some(leader) => by_leader.entry(leader).or_default().push(acc),
                None => {
                    acc.topic.mark(acc.partition, false);
                    self.refresh(&acc.topic.name, now);
                    let at = now + self.shared.config.retry_backoff;
                    acc.lock().retry_at = Some(at);
                    next_retry = Some(next_retry.map_or(at, |n| n.min(at)));
                    self.waiting.push(acc);
                }
            }
        }
        for (leader, accs) in by_leader {
            self.send_to(leader, accs);
        }
        next_retry
    }

    /// Fails the batches at the front of the queue that have outlived the
    /// delivery timeout.
    fn expire(&self, acc: &PartitionAcc, st: &mut PartitionState, now: Instant) {
        let timeout = self.shared.config.delivery_timeout;
        while st.ready.front().is_some_and(|b| b.created + timeout <= now) {
            let batch = st.ready.pop_front().expect("checked");
            tracing::warn!(topic = %acc.topic.name, partition = acc.partition, "batch expired before it could be sent");
            fail_later(batch, Error::Timeout(timeout));
        }
    }

    /// Starts a background metadata refresh of `topic`, at most one per
    /// retry backoff.
    fn refresh(&mut self, topic: &Arc<str>, now: Instant) {
        if self.refreshing.get(topic).is_some_and(|&next| next > now) {
            return;
        }
        self.refreshing.insert(topic.clone(), now + self.shared.config.retry_backoff);
        tokio::spawn(self.shared.transport.refresh(topic.clone()));
    }

    /// Sends the ready batches of `accs` to `leader` in as few requests as
    /// the request size allows, while the broker has request slots free.
    fn send_to(&mut self, leader: Arc<str>, accs: Vec<Arc<PartitionAcc>>) {
        if self.shared.queues.idempotent.is_some() {
            return self.send_idempotent(leader, accs);
        }
        let counter = self.in_flight.entry(leader.clone()).or_default().clone();
        let max_bytes = self.shared.config.max_request_bytes;
        let mut accs = accs.into_iter().peekable();
        while accs.peek().is_some() {
            if counter.load(Ordering::Acquire) >= self.shared.config.max_in_flight.max(1) {
                self.waiting.extend(accs);
                return;
            }
            let mut parts: Vec<(Arc<PartitionAcc>, Vec<SealedBatch>)> = Vec::new();
            let mut bytes = 0usize;
            while let Some(acc) = accs.peek() {
                let mut st = acc.lock();
                let mut taken = Vec::new();
                while let Some(b) = st.ready.front() {
                    let first = parts.is_empty() && taken.is_empty();
                    if !first && bytes + b.size > max_bytes {
                        break;
                    }
                    bytes += b.size;
                    taken.push(st.ready.pop_front().expect("checked"));
                }
                if taken.is_empty() {
                    break; // the request is full; this partition starts the next
                }
                debug_assert!(taken.windows(2).all(|w| w[1].sequence == w[0].sequence + 1), "batches in sequence");
                let full = !st.ready.is_empty();
                st.queued = false;
                st.in_flight = taken.iter().map(|b| (b.sequence, b.outcome.clone())).collect();
                drop(st);
                parts.push((accs.next().expect("peeked"), taken));
                if full {
                    break;
                }
            }
            counter.fetch_add(1, Ordering::AcqRel);
            tokio::spawn(run_request(self.shared.clone(), leader.clone(), counter.clone(), parts));
        }
    }
}

impl Sender {
    /// [`Sender::send_to`] for an idempotent producer: one batch per
    /// partition per request (the broker's rule for batches with a producer
    /// id), several requests per partition in flight, each partition's
    /// batches taken in order.
    fn send_idempotent(&mut self, leader: Arc<str>, mut accs: Vec<Arc<PartitionAcc>>) {
        let counter = self.in_flight.entry(leader.clone()).or_default().clone();
        let max_bytes = self.shared.config.max_request_bytes;
        while !accs.is_empty() {
            if counter.load(Ordering::Acquire) >= self.shared.config.max_in_flight.max(1) {
                self.waiting.extend(accs);
                return;
            }
            let mut parts: Vec<(Arc<PartitionAcc>, Vec<SealedBatch>)> = Vec::new();
            let mut bytes = 0usize;
            let mut next = Vec::new();
            let now = Instant::now();
            for acc in accs {
                let mut st = acc.lock();
                if st.retry_at.is_some_and(|at| at > now) {
                    // An earlier request of it failed since dispatch looked:
                    // its backoff holds. The next dispatch (woken now) sees
                    // the deadline and sleeps until it.
                    drop(st);
                    self.waiting.push(acc);
                    self.shared.queues.wake.notify_one();
                    continue;
                }
                let sendable =
                    st.ready.front().is_some_and(|b| b.stamp.is_some()) && self.shared.queues.may_send_more(&st);
                if !sendable {
                    st.queued = false;
                    // A request may have settled since dispatch looked (its
                    // enqueue saw the partition still queued): a bump it made
                    // due is started from the ready list.
                    if self.shared.queues.enqueue(&acc, &mut st) {
                        self.shared.queues.wake.notify_one();
                    }
                    continue;
                }
                let size = st.ready.front().expect("checked").size;
                if !parts.is_empty() && bytes + size > max_bytes {
                    drop(st);
                    next.push(acc); // the next request takes it
                    continue;
                }
                bytes += size;
                let batch = st.ready.pop_front().expect("checked");
                st.in_flight.push((batch.sequence, batch.outcome.clone()));
                let more = !st.ready.is_empty() && self.shared.queues.may_send_more(&st);
                if !more {
                    st.queued = false;
                }
                drop(st);
                if more {
                    next.push(acc.clone());
                }
                parts.push((acc, vec![batch]));
            }
            if parts.is_empty() {
                return;
            }
            counter.fetch_add(1, Ordering::AcqRel);
            tokio::spawn(run_request(self.shared.clone(), leader.clone(), counter.clone(), parts));
            accs = next;
        }
    }
}

/// Fails a batch once its bytes exist (they may still be compressing).
fn fail_later(mut batch: SealedBatch, error: Error) {
    match &batch.bytes {
        BatchBytes::Ready(bytes) => batch.outcome.failed(error, bytes.clone()),
        BatchBytes::Compressing(_) => {
            tokio::spawn(async move {
                let bytes = batch.bytes().await;
                batch.outcome.failed(error, bytes);
            });
        }
    }
}

/// One Produce request to one broker, and what its answer does to each
/// partition in it.
async fn run_request(
    shared: Arc<Shared>,
    leader: Arc<str>,
    counter: Arc<AtomicUsize>,
    mut parts: Vec<(Arc<PartitionAcc>, Vec<SealedBatch>)>,
) {
    let config = &shared.config;
    let mut topics: Vec<pb::TopicProduceData> = Vec::new();
    for (acc, batches) in &mut parts {
        let mut records: Vec<Bytes> = Vec::with_capacity(batches.len());
        for b in batches.iter_mut() {
            records.push(b.stamped_bytes().await);
        }
        let data = pb::PartitionProduceData { partition: acc.partition, records, expected_end_offset: None };
        match topics.iter_mut().find(|t| *t.name == *acc.topic.name) {
            Some(t) => t.partitions.push(data),
            None => topics.push(pb::TopicProduceData { name: acc.topic.name.to_string(), partitions: vec![data] }),
        }
    }
    let acks_none = config.acks == Acks::None;
    if acks_none {
        // Nobody waits for acks=0: the records count as sent once handed
        // to the connection, and are never retried.
        for (_, batches) in &parts {
            for b in batches {
                b.outcome.acked(-1, -1);
            }
        }
    }
    let request = pb::ProduceRequest {
        acks: config.acks.to_wire() as i32,
        timeout_ms: u32::try_from(config.request_timeout.as_millis()).unwrap_or(u32::MAX),
        topics,
    };
    let answer = shared.transport.produce(leader, request).await;
    for (acc, batches) in parts {
        let result = match &answer {
            Ok(response) => partition_answer(response, &acc),
            Err(e) => Err(Failure { error: e.clone(), hint: None, appended: None }),
        };
        settle(&shared, &acc, batches, result, acks_none);
    }
    counter.fetch_sub(1, Ordering::AcqRel);
    shared.queues.wake.notify_one();
}

/// A partition's answer in a response: base offset and log-append time, or
/// the failure.
type PartitionResult = Result<(i64, i64), Failure>;

/// A partition's failed answer.
struct Failure {
    error: Error,
    /// The leader and its epoch, when the broker named them.
    hint: Option<(u32, u32)>,
    /// How many of the request's batches (a prefix) were appended before
    /// the failure, and the base offset of the first: acknowledged, never
    /// to be sent again.
    appended: Option<(usize, i64)>,
}

fn partition_answer(response: &pb::ProduceResponse, acc: &PartitionAcc) -> PartitionResult {
    let found = response
        .topics
        .iter()
        .filter(|t| *t.name == *acc.topic.name)
        .flat_map(|t| &t.partitions)
        .find(|p| p.partition == acc.partition);
    let Some(p) = found else {
        let message = format!("the broker did not answer for {}/{}", acc.topic.name, acc.partition);
        return Err(Failure { error: Error::InvalidArgument(message), hint: None, appended: None });
    };
    if p.error_code != 0 {
        let error = Error::broker(p.error_code, p.error_message.clone(), &acc.topic.name, Some(acc.partition));
        let hint = p.leader_id.zip(p.leader_epoch);
        let appended = (p.appended_batches > 0).then_some((p.appended_batches as usize, p.base_offset));
        return Err(Failure { error, hint, appended });
    }
    Ok((p.base_offset, p.log_append_time_ms))
}

/// Settles the batches of one partition after its request ended, and gives
/// the partition back to the sender.
fn settle(
    shared: &Arc<Shared>,
    acc: &Arc<PartitionAcc>,
    batches: Vec<SealedBatch>,
    result: PartitionResult,
    acks_none: bool,
) {
    if shared.queues.idempotent.is_some() {
        return settle_idempotent(shared, acc, batches, result);
    }
    let config = &shared.config;
    let mut retry = Vec::new();
    let acked = result.is_ok();
    match result {
        Ok((base_offset, log_append_time_ms)) => {
            let mut offset = base_offset;
            for b in &batches {
                b.outcome.acked(offset, log_append_time_ms);
                offset += i64::from(b.record_count);
            }
        }
        Err(Failure { error: e, .. }) if acks_none => {
            tracing::debug!(topic = %acc.topic.name, partition = acc.partition, error = %e, "acks=0 request failed");
        }
        Err(Failure { error: e, hint, appended }) => {
            shared.transport.partition_failed(&acc.topic.name, acc.partition, &e, hint);
            // The batches the broker appended before the failure are
            // acknowledged; sending them again would append them twice.
            let (count, mut offset) = appended.unwrap_or((0, -1));
            let mut batches = batches.into_iter();
            for b in batches.by_ref().take(count) {
                b.outcome.acked(offset, -1);
                offset += i64::from(b.record_count);
            }
            let backoff = acc.lock().backoff;
            let retry_by = Instant::now() + backoff;
            for b in batches {
                if e.is_retriable() && b.created + config.delivery_timeout > retry_by {
                    retry.push(b);
                } else {
                    tracing::warn!(topic = %acc.topic.name, partition = acc.partition, error = %e, "batch failed");
                    fail_later(b, e.clone());
                }
            }
            if !retry.is_empty() {
                tracing::debug!(topic = %acc.topic.name, partition = acc.partition, error = %e, ?backoff, "retrying");
            }
        }
    }
    let mut st = acc.lock();
    if acked {
        st.backoff = config.retry_backoff;
    }
    if !retry.is_empty() {
        // Back to the front, in order: nothing later overtakes them.
        for b in retry.into_iter().rev() {
            st.ready.push_front(b);
        }
        let jitter = 0.8 + (shared.rng.next() % 400) as f64 / 1000.0;
        st.retry_at = Some(Instant::now() + st.backoff.mul_f64(jitter));
        st.backoff = (st.backoff * 2).min(config.retry_backoff_max);
    }
    st.in_flight.clear();
    shared.queues.enqueue(acc, &mut st);
}

/// [`settle`] for an idempotent producer's request: one batch of the
/// partition, retried in its place or failed as `idempotence` decides.
fn settle_idempotent(
    shared: &Arc<Shared>,
    acc: &Arc<PartitionAcc>,
    batches: Vec<SealedBatch>,
    result: PartitionResult,
) {
    let config = &shared.config;
    let mut st = acc.lock();
    for mut b in batches {
        st.in_flight.retain(|(s, _)| *s != b.sequence);
        match &result {
            Ok((base_offset, log_append_time_ms)) => {
                st.backoff = config.retry_backoff;
                b.outcome.acked(*base_offset, *log_append_time_ms);
            }
            Err(Failure { appended: Some((n, base_offset)), .. }) if *n > 0 => b.outcome.acked(*base_offset, -1),
            Err(Failure { error, hint, .. }) => {
                shared.transport.partition_failed(&acc.topic.name, acc.partition, error, *hint);
                let retry_by = Instant::now() + st.backoff;
                let deadline = b.created + config.delivery_timeout;
                match idempotence::on_failure(&mut st, &mut b, error, retry_by, deadline) {
                    idempotence::Verdict::Retry => {
                        tracing::debug!(topic = %acc.topic.name, partition = acc.partition, error = %error, "retrying");
                        idempotence::requeue(&mut st, b);
                        // One backoff for the batches of one failed round,
                        // not one doubling per batch.
                        let now = Instant::now();
                        if st.retry_at.is_none_or(|at| at <= now) {
                            let jitter = 0.8 + (shared.rng.next() % 400) as f64 / 1000.0;
                            st.retry_at = Some(now + st.backoff.mul_f64(jitter));
                            st.backoff = (st.backoff * 2).min(config.retry_backoff_max);
                        }
                    }
                    idempotence::Verdict::Fail => {
                        tracing::warn!(topic = %acc.topic.name, partition = acc.partition, error = %error, "batch failed");
                        fail_later(b, error.clone());
                    }
                }
            }
        }
    }
    // Queued again to send more, or (a bump due) to start the bump.
    let wake = shared.queues.enqueue(acc, &mut st);
    drop(st);
    if wake {
        shared.queues.wake.notify_one();
    }
}
