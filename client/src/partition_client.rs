//! [`PartitionClient`]: produce, fetch and list offsets on one partition,
//! without batching or retries. For tools, tests and benchmarks.

use std::time::Duration;

use bytes::Bytes;
use tally_proto::batch::{BatchBuilder, BatchIter, Record, RecordBatch, RecordRef};
use tally_proto::v1::{self as pb};

use crate::client::Client;
use crate::error::{Error, Result};

/// How many replicas must have a batch before the broker answers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Acks {
    /// acks=0: the producer does not wait for an answer.
    None,
    /// acks=1: the leader appended it.
    #[default]
    Leader,
    /// acks=all: every in-sync replica has it.
    All,
}

impl Acks {
    pub(crate) fn to_wire(self) -> pb::Acks {
        match self {
            Acks::None => pb::Acks::None,
            Acks::Leader => pb::Acks::Leader,
            Acks::All => pb::Acks::All,
        }
    }
}

impl std::str::FromStr for Acks {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "0" => Ok(Acks::None),
            "1" => Ok(Acks::Leader),
            "all" | "-1" => Ok(Acks::All),
            other => Err(Error::InvalidArgument(format!("acks must be 0, 1 or all, got `{other}`"))),
        }
    }
}

/// Which offset [`PartitionClient::list_offset`] looks up.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OffsetSpec {
    /// The first offset still in the log.
    Earliest,
    /// The offset the next record will get (the high watermark).
    Latest,
    /// The first offset whose timestamp is >= this (ms since the epoch).
    Timestamp(i64),
    /// The record with the largest timestamp (Kafka's KIP-734).
    MaxTimestamp,
}

impl OffsetSpec {
    fn to_wire(self) -> i64 {
        match self {
            OffsetSpec::Earliest => -2,
            OffsetSpec::Latest => -1,
            OffsetSpec::Timestamp(ts) => ts.max(0),
            OffsetSpec::MaxTimestamp => -3,
        }
    }
}

/// Record batches from one fetch.
#[derive(Debug, Clone)]
pub struct FetchedBatches {
    /// Whole batches, CRC-checked; the first may start before the fetch offset.
    pub batches: Vec<RecordBatch>,
    /// The partition's high watermark.
    pub high_watermark: i64,
    /// The partition's log start offset.
    pub log_start_offset: i64,
}

impl FetchedBatches {
    /// The records at or after `from`, in offset order.
    pub fn records(&self, from: i64) -> impl Iterator<Item = Result<Record>> + '_ {
        self.batches.iter().flat_map(move |b| match b.records() {
            Ok(records) => Box::new(
                records
                    .map(|r| r.map_err(Error::Corrupt))
                    .filter(move |r| r.as_ref().map_or(true, |r| r.offset >= from)),
            ) as Box<dyn Iterator<Item = Result<Record>>>,
            Err(e) => Box::new(std::iter::once(Err(Error::Corrupt(e)))),
        })
    }

    /// Offset after the last batch (`None` when empty).
    pub fn next_offset(&self) -> Option<i64> {
        self.batches.last().map(|b| b.header().next_offset())
    }
}

/// Produce, fetch and list offsets on one partition.
///
/// ```no_run
/// # async fn demo(client: tally_client::Client) -> Result<(), tally_client::Error> {
/// use tally_client::{Acks, OffsetSpec};
/// use tally_proto::batch::RecordRef;
/// let p = client.partition_client("orders", 0);
/// let offset = p.produce_records(&[RecordRef { timestamp: 1, value: Some(b"hi"), ..Default::default() }], Acks::Leader).await?;
/// let fetched = p.fetch(offset, 1 << 20, std::time::Duration::from_millis(100)).await?;
/// let latest = p.list_offset(OffsetSpec::Latest).await?;
/// # Ok(()) }
/// ```
#[derive(Debug, Clone)]
pub struct PartitionClient {
    client: Client,
    topic: String,
    partition: u32,
}

impl PartitionClient {
    pub(crate) fn new(client: Client, topic: String, partition: u32) -> Self {
        PartitionClient { client, topic, partition }
    }

    /// Topic name.
    pub fn topic(&self) -> &str {
        &self.topic
    }

    /// Partition number.
    pub fn partition(&self) -> u32 {
        self.partition
    }

    /// Appends encoded batches; returns the base offset of the first
    /// (-1 with acks=0).
    pub async fn produce(&self, batches: Bytes, acks: Acks) -> Result<i64> {
        produce_rpc(&self.client, &self.topic, self.partition, batches, acks).await
    }

    /// Conditional append, for event sourcing: encodes `records` into one
    /// batch and appends it only if the partition's log ends at
    /// `expected_end_offset` at that moment (checked by the leader under its
    /// log lock), so of two writers that read the same state only one can
    /// append after it. Answers the offset of the first record, or
    /// [`AppendIfError::Conflict`] with the log's end now (nothing was
    /// appended). Not retried: after a transport failure the outcome is
    /// unknown ([`AppendIfError::Failed`]); read the partition to find out.
    pub async fn append_if(
        &self,
        expected_end_offset: i64,
        records: &[RecordRef<'_>],
        acks: Acks,
    ) -> std::result::Result<i64, AppendIfError> {
        let mut b = BatchBuilder::new();
        for r in records {
            b.push(r);
        }
        if b.is_empty() {
            return Err(Error::InvalidArgument("no records".into()).into());
        }
        let parts =
            produce_parts(&self.client, &self.topic, self.partition, b.finish(), Some(expected_end_offset), acks)
                .await?;
        if let Some(p) = parts.iter().find(|p| p.partition == self.partition)
            && p.error_code == tally_proto::ErrorCode::EndOffsetMismatch as i32
        {
            return Err(AppendIfError::Conflict { current_end_offset: p.current_end_offset.unwrap_or(-1) });
        }
        Ok(answer(parts, &self.topic, self.partition)?.base_offset)
    }

    /// Encodes `records` into one batch and appends it.
    pub async fn produce_records(&self, records: &[RecordRef<'_>], acks: Acks) -> Result<i64> {
        let mut b = BatchBuilder::new();
        for r in records {
            b.push(r);
        }
        if b.is_empty() {
            return Err(Error::InvalidArgument("no records".into()));
        }
        self.produce(b.finish(), acks).await
    }

    /// Reads batches from `offset`, waiting up to `max_wait` for data.
    pub async fn fetch(&self, offset: i64, max_bytes: u32, max_wait: Duration) -> Result<FetchedBatches> {
        let request = pb::FetchRequest {
            max_wait_ms: u32::try_from(max_wait.as_millis()).unwrap_or(u32::MAX),
            min_bytes: 1,
            max_bytes,
            topics: vec![pb::FetchTopic {
                name: self.topic.clone(),
                partitions: vec![pb::FetchPartition {
                    partition: self.partition,
                    fetch_offset: offset,
                    partition_max_bytes: max_bytes,
                }],
            }],
        };
        let address = self.client.leader_address(&self.topic, self.partition).await?;
        let mut rpc = self.client.rpc_at(&address)?;
        let mut request = tonic::Request::new(request);
        request.set_timeout(self.client.config().request_timeout + max_wait);
        let response = rpc.fetch(request).await.map_err(|s| self.client.transport_failed(&address, &self.topic, s))?;
        let response = response.into_inner();
        let p = response
            .topics
            .into_iter()
            .flat_map(|t| t.partitions)
            .find(|p| p.partition == self.partition)
            .ok_or_else(|| Error::InvalidArgument("the broker did not answer for the partition".into()))?;
        decode_fetch(&self.topic, p)
    }

    /// Looks up an offset; `None` when no record is as new as the timestamp.
    pub async fn list_offset(&self, spec: OffsetSpec) -> Result<Option<i64>> {
        list_offset_rpc(&self.client, &self.topic, self.partition, spec).await
    }
}

/// Turns one partition of a fetch response into checked batches.
pub(crate) fn decode_fetch(topic: &str, p: pb::FetchPartitionResponse) -> Result<FetchedBatches> {
    if p.error_code != 0 {
        return Err(Error::broker(p.error_code, p.error_message, topic, Some(p.partition)));
    }
    let mut batches = Vec::new();
    for chunk in p.records {
        for b in BatchIter::new(chunk) {
            batches.push(b?);
        }
    }
    Ok(FetchedBatches { batches, high_watermark: p.high_watermark, log_start_offset: p.log_start_offset })
}

/// A per-partition answer in a response.
trait PartitionAnswer {
    fn partition(&self) -> u32;
    /// Error code and message.
    fn error(self) -> (i32, String);
    fn error_code(&self) -> i32;
}

macro_rules! partition_answer {
    ($($t:ty),*) => {$(
        impl PartitionAnswer for $t {
            fn partition(&self) -> u32 { self.partition }
            fn error(self) -> (i32, String) { (self.error_code, self.error_message) }
            fn error_code(&self) -> i32 { self.error_code }
        }
    )*};
}
partition_answer!(pb::PartitionProduceResponse, pb::ListOffsetsPartitionResponse);

/// The answer for `partition`, or its error.
fn answer<P: PartitionAnswer>(parts: impl IntoIterator<Item = P>, topic: &str, partition: u32) -> Result<P> {
    let p = parts
        .into_iter()
        .find(|p| p.partition() == partition)
        .ok_or_else(|| Error::InvalidArgument("the broker did not answer for the partition".into()))?;
    if p.error_code() != 0 {
        let (code, message) = p.error();
        return Err(Error::broker(code, message, topic, Some(partition)));
    }
    Ok(p)
}

/// Why a conditional append ([`PartitionClient::append_if`]) did not
/// happen.
#[derive(Debug, Clone, thiserror::Error)]
#[non_exhaustive]
pub enum AppendIfError {
    /// The partition's log does not end at the expected offset (another
    /// append came first): nothing was appended. Read from the expected
    /// offset to `current_end_offset`, decide again, and retry with it.
    #[error("conflict: the log ends at {current_end_offset}, not at the expected offset; nothing was appended")]
    Conflict {
        /// Where the partition's log ends now.
        current_end_offset: i64,
    },
    /// Any other failure. After a transport failure the append may have
    /// happened.
    #[error(transparent)]
    Failed(#[from] Error),
}

pub(crate) async fn produce_rpc(
    client: &Client,
    topic: &str,
    partition: u32,
    records: Bytes,
    acks: Acks,
) -> Result<i64> {
    let parts = produce_parts(client, topic, partition, records, None, acks).await?;
    Ok(answer(parts, topic, partition)?.base_offset)
}

/// One Produce of `records` to the partition's leader (following a
/// NOT_LEADER hint for the next call); the partitions' answers.
async fn produce_parts(
    client: &Client,
    topic: &str,
    partition: u32,
    records: Bytes,
    expected_end_offset: Option<i64>,
    acks: Acks,
) -> Result<Vec<pb::PartitionProduceResponse>> {
    let request = pb::ProduceRequest {
        acks: acks.to_wire() as i32,
        timeout_ms: u32::try_from(client.config().request_timeout.as_millis()).unwrap_or(u32::MAX),
        topics: vec![pb::TopicProduceData {
            name: topic.to_string(),
            partitions: vec![pb::PartitionProduceData { partition, records: vec![records], expected_end_offset }],
        }],
    };
    let address = client.leader_address(topic, partition).await?;
    let mut rpc = client.rpc_at(&address)?;
    let mut request = tonic::Request::new(request);
    request.set_timeout(client.config().request_timeout);
    let response = rpc.produce(request).await.map_err(|s| client.transport_failed(&address, topic, s))?.into_inner();
    let parts: Vec<pb::PartitionProduceResponse> = response.topics.into_iter().flat_map(|t| t.partitions).collect();
    if let Some(p) = parts.iter().find(|p| p.partition == partition)
        && p.error_code == tally_proto::ErrorCode::NotLeaderOrFollower as i32
        && let (Some(leader), Some(epoch)) = (p.leader_id, p.leader_epoch)
    {
        client.follow_leader_hint(topic, partition, leader, epoch);
    }
    Ok(parts)
}

pub(crate) async fn list_offset_rpc(
    client: &Client,
    topic: &str,
    partition: u32,
    spec: OffsetSpec,
) -> Result<Option<i64>> {
    let request = pb::ListOffsetsRequest {
        topics: vec![pb::ListOffsetsTopic {
            name: topic.to_string(),
            partitions: vec![pb::ListOffsetsPartition { partition, timestamp: spec.to_wire() }],
        }],
    };
    // A leader moving, a broker restarting or a new leader whose high
    // watermark lags (OFFSET_NOT_AVAILABLE) is ridden out within the
    // request timeout: refresh the leader, back off, ask again.
    let deadline = std::time::Instant::now() + client.request_timeout();
    let mut backoff = std::time::Duration::from_millis(50);
    loop {
        let outcome = async {
            let mut rpc = client.leader(topic, partition).await?;
            let response = rpc.list_offsets(request.clone()).await?.into_inner();
            answer(response.topics.into_iter().flat_map(|t| t.partitions), topic, partition)
        }
        .await;
        match outcome {
            Ok(p) => return Ok((p.offset >= 0).then_some(p.offset)),
            Err(e) if rides_out(&e) && std::time::Instant::now() + backoff < deadline => {
                client.invalidate(topic);
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(std::time::Duration::from_millis(500));
            }
            Err(e) => return Err(e),
        }
    }
}

/// Failures that a leader change or a broker restart explains, which a
/// retry after a metadata refresh outlasts (not an unknown topic: that is
/// an answer).
fn rides_out(e: &Error) -> bool {
    use tally_proto::ErrorCode as C;
    match e {
        Error::Broker { code, .. } => matches!(
            code,
            C::LeaderNotAvailable
                | C::NotLeaderOrFollower
                | C::OffsetNotAvailable
                | C::FencedLeaderEpoch
                | C::UnknownLeaderEpoch
                | C::RequestTimedOut
        ),
        Error::Rpc { .. } => e.is_retriable(),
        _ => false,
    }
}

#[cfg(test)]
mod rides_out_tests {
    use super::*;

    fn broker(code: tally_proto::ErrorCode) -> Error {
        Error::Broker { code, message: String::new(), topic: "t".into(), partition: Some(0) }
    }

    #[test]
    fn a_leader_change_is_ridden_out_and_an_unknown_topic_is_an_answer() {
        use tally_proto::ErrorCode as C;
        for code in [C::LeaderNotAvailable, C::NotLeaderOrFollower, C::OffsetNotAvailable, C::FencedLeaderEpoch] {
            assert!(rides_out(&broker(code)), "{code:?}");
        }
        for code in [C::UnknownTopicOrPartition, C::InvalidRequest, C::OffsetOutOfRange] {
            assert!(!rides_out(&broker(code)), "{code:?}");
        }
        assert!(rides_out(&Error::Rpc { code: tonic::Code::Unavailable, message: "down".into() }));
    }
}
