//! Producer ids for idempotent producers (Kafka's `ProducerIdManager`):
//! each broker takes blocks of ids from the controller (the
//! `AllocateProducerIds` command: a block is committed to the metadata log
//! before any id of it is handed out, so no id is ever given twice, across
//! brokers and restarts) and hands them out one by one. The next block is
//! fetched in the background once the current one is 90% used, so
//! InitProducerId rarely waits on the controller.
//!
//! No lock is held across the proposal: the block state sits behind a
//! `std::sync::Mutex` taken for a few instructions, and callers that find
//! no id wait on a `Notify` for the fetch to land.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::Notify;

use crate::broker::Broker;
use crate::controller::{BrokerId, MetadataCommand, MetadataEffect};
use crate::error::BrokerError;

/// Ids per block taken from the controller.
pub const PRODUCER_ID_BLOCK: u64 = 1000;

/// How long InitProducerId waits for a block before giving up.
const FETCH_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, Default)]
struct Blocks {
    /// Ids left in the current block: `[next, end)`.
    next: u64,
    end: u64,
    /// The block fetched ahead, if any.
    prefetched: Option<(u64, u64)>,
    /// A fetch is under way.
    fetching: bool,
    /// Why the last fetch failed, for callers that waited on it.
    last_error: Option<String>,
}

/// A broker's source of producer ids.
#[derive(Debug, Default)]
pub struct ProducerIds {
    blocks: Mutex<Blocks>,
    landed: Notify,
}

impl ProducerIds {
    /// An empty source: the first id fetches a block.
    pub fn new() -> ProducerIds {
        ProducerIds::default()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Blocks> {
        self.blocks.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// A producer id never handed out before.
    pub async fn next_id(self: &Arc<Self>, broker: &Arc<Broker>) -> Result<i64, BrokerError> {
        let deadline = tokio::time::Instant::now() + FETCH_TIMEOUT;
        loop {
            let landed = self.landed.notified();
            tokio::pin!(landed);
            landed.as_mut().enable();
            {
                let mut b = self.lock();
                if b.next == b.end
                    && let Some((first, end)) = b.prefetched.take()
                {
                    (b.next, b.end) = (first, end);
                }
                if b.next < b.end {
                    let id = b.next;
                    b.next += 1;
                    let left = b.end - b.next;
                    if left < PRODUCER_ID_BLOCK / 10 && b.prefetched.is_none() && !b.fetching {
                        b.fetching = true;
                        self.spawn_fetch(broker);
                    }
                    return i64::try_from(id)
                        .map_err(|_| BrokerError::UnknownProducerId("producer ids are exhausted".into()));
                }
                if !b.fetching {
                    b.fetching = true;
                    b.last_error = None;
                    self.spawn_fetch(broker);
                }
            }
            if tokio::time::timeout_at(deadline, landed).await.is_err() {
                if let Some(why) = self.lock().last_error.clone() {
                    tracing::warn!(error = %why, "no block of producer ids in time");
                }
                let timeout_ms = u64::try_from(FETCH_TIMEOUT.as_millis()).unwrap_or(u64::MAX);
                return Err(BrokerError::Controller(crate::controller::ControllerError::Timeout { timeout_ms }));
            }
        }
    }

    fn spawn_fetch(self: &Arc<Self>, broker: &Arc<Broker>) {
        let (ids, broker) = (self.clone(), broker.clone());
        tokio::spawn(async move {
            let me = BrokerId(broker.node_id());
            let command = MetadataCommand::AllocateProducerIds { broker: me, count: PRODUCER_ID_BLOCK };
            let outcome = broker.propose_with_effects(command).await;
            let mut b = ids.lock();
            b.fetching = false;
            match outcome {
                Ok(effects) => {
                    let block = effects.iter().find_map(|e| match e {
                        MetadataEffect::ProducerIdsAllocated { broker, first, count } if *broker == me => {
                            Some((*first, first + count))
                        }
                        _ => None,
                    });
                    match block {
                        Some(block) => b.prefetched = Some(block),
                        None => b.last_error = Some("the controller answered without a block".into()),
                    }
                }
                Err(e) => {
                    tracing::warn!(error = %e, "could not take a block of producer ids");
                    b.last_error = Some(e.to_string());
                }
            }
            drop(b);
            ids.landed.notify_waiters();
        });
    }
}
