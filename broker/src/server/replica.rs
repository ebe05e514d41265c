//! The `tally.internal.v1.Replication` service: followers' fetches, served
//! by the partitions' leaders.
//!
//! A fetch that finds nothing new for any partition is held until one of
//! their log ends moves or `max_wait_ms` passes, so an idle follower costs
//! one request per wait and a busy one hears of an append at once.

use std::sync::Arc;
use std::time::Duration;

use tally_proto::ErrorCode;
use tally_proto::internal::v1 as pb;
use tally_proto::internal::v1::replication_server::Replication;
use tokio::sync::watch;
use tonic::{Request, Response, Status};

use crate::broker::Broker;
use crate::controller::BrokerId;
use crate::error::BrokerError;
use crate::partition::{Partition, ReplicaRead};
use crate::replication::isr::now_ms;
use crate::storage::Offset;

use super::data::clone_error;

/// Longest hold of a follower's fetch.
const MAX_WAIT: Duration = Duration::from_secs(5);

/// Implements the replication service.
#[derive(Debug, Clone)]
pub struct ReplicationService {
    broker: Arc<Broker>,
}

impl ReplicationService {
    /// A service over `broker`.
    pub fn new(broker: Arc<Broker>) -> Self {
        ReplicationService { broker }
    }

    /// The partition a follower asks for, if this broker leads it (topic id
    /// checked: a recreated topic is another topic).
    fn resolve(&self, p: &pb::ReplicaFetchPartition) -> Result<Arc<Partition>, BrokerError> {
        let (topic, partition) = self.broker.partition(&p.topic, p.partition)?;
        if topic.id != p.topic_id {
            return Err(BrokerError::UnknownTopicOrPartition { topic: p.topic.clone(), partition: Some(p.partition) });
        }
        Ok(partition)
    }
}

fn answer(
    p: &pb::ReplicaFetchPartition,
    outcome: Result<ReplicaRead, BrokerError>,
) -> (pb::ReplicaFetchPartitionResponse, u64) {
    let mut out = pb::ReplicaFetchPartitionResponse {
        topic: p.topic.clone(),
        partition: p.partition,
        error_code: ErrorCode::None as i32,
        error_message: String::new(),
        high_watermark: -1,
        log_start_offset: -1,
        log_end_offset: -1,
        diverging_epoch: None,
        records: Vec::new(),
    };
    match outcome {
        Ok(read) => {
            out.high_watermark = read.high_watermark.to_wire();
            out.log_start_offset = read.log_start_offset.to_wire();
            out.log_end_offset = read.log_end_offset.to_wire();
            out.diverging_epoch =
                read.diverging.map(|(epoch, end)| pb::DivergingEpoch { epoch, end_offset: end.to_wire() });
            let bytes = read.read.bytes;
            out.records = read.read.chunks;
            (out, bytes)
        }
        Err(e) => {
            if let BrokerError::OffsetOutOfRange { log_start, log_end, .. } = &e {
                out.log_start_offset = log_start.to_wire();
                out.log_end_offset = log_end.to_wire();
            }
            out.error_code = e.code() as i32;
            out.error_message = e.to_string();
            (out, 0)
        }
    }
}

#[tonic::async_trait]
impl Replication for ReplicationService {
    async fn replica_fetch(
        &self,
        request: Request<pb::ReplicaFetchRequest>,
    ) -> Result<Response<pb::ReplicaFetchResponse>, Status> {
        let req = request.into_inner();
        let follower = BrokerId(req.replica_id);
        let wait = Duration::from_millis(u64::from(req.max_wait_ms)).min(MAX_WAIT);
        let deadline = tokio::time::Instant::now() + wait;
        let max_bytes = u64::from(req.max_bytes.max(1));
        let resolved: Vec<Result<Arc<Partition>, BrokerError>> =
            req.partitions.iter().map(|p| self.resolve(p)).collect();
        // Subscribe before the first read, so an append between the read and
        // the wait still wakes this fetch.
        let mut watchers: Vec<watch::Receiver<Offset>> =
            resolved.iter().filter_map(|r| r.as_ref().ok().map(|p| p.subscribe_log_end())).collect();
        loop {
            let mut partitions = Vec::with_capacity(req.partitions.len());
            let mut total = 0u64;
            let mut news = false;
            let now = now_ms();
            for (p, target) in req.partitions.iter().zip(&resolved) {
                let outcome = target.as_ref().map_err(clone_error).and_then(|partition| {
                    let left = max_bytes.saturating_sub(total).max(1);
                    let epoch = u32::try_from(p.last_fetched_epoch).ok();
                    let read =
                        partition.replica_fetch(follower, p.fetch_offset, p.current_leader_epoch, epoch, left, now)?;
                    if let Some(change) = read.isr_change.clone() {
                        self.broker.propose_isr_change(&p.topic, partition.clone(), change);
                    }
                    Ok(read)
                });
                news |= outcome.as_ref().map_or(true, |r| r.diverging.is_some() || r.read.bytes > 0);
                let (response, bytes) = answer(p, outcome);
                total += bytes;
                partitions.push(response);
            }
            if news || watchers.is_empty() || tokio::time::Instant::now() >= deadline {
                return Ok(Response::new(pb::ReplicaFetchResponse { partitions }));
            }
            let changed = futures_util::future::select_all(watchers.iter_mut().map(|w| Box::pin(w.changed())));
            if tokio::time::timeout_at(deadline, changed).await.is_err() {
                return Ok(Response::new(pb::ReplicaFetchResponse { partitions }));
            }
        }
    }
}
