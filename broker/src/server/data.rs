//! The `Tally` service: Produce, Fetch, ListOffsets, Metadata.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use tally_proto::ErrorCode;
use tally_proto::batch::{BatchLimits, RecordBatch, split_batches};
use tally_proto::v1::{self as pb, tally_server::Tally};
use tokio::sync::watch;
use tonic::{Request, Response, Status};
use tracing::Instrument;

use crate::broker::Broker;
use crate::error::BrokerError;
use crate::partition::Partition;
use crate::storage::Offset;
use crate::topic::TopicConfig;

/// How long acks=all waits when the request does not say (Kafka's
/// `request.timeout.ms` default).
const DEFAULT_ACKS_TIMEOUT: Duration = Duration::from_secs(30);

/// Fetch response size when the request does not say.
const DEFAULT_FETCH_MAX_BYTES: u64 = 50 << 20;

/// Implements the `tally.v1.Tally` service.
#[derive(Debug, Clone)]
pub struct TallyService {
    broker: Arc<Broker>,
    times: crate::metrics::RequestTimes,
}

impl TallyService {
    /// A service over `broker`.
    pub fn new(broker: Arc<Broker>) -> Self {
        TallyService { broker, times: crate::metrics::RequestTimes::new() }
    }

    async fn produce_partition(
        &self,
        topic: &str,
        partition: u32,
        records: Vec<Bytes>,
        expected_end_offset: Option<i64>,
        acks: Result<pb::Acks, i32>,
        timeout: Duration,
    ) -> Result<(crate::storage::AppendInfo, i64), BrokerError> {
        let acks = acks.map_err(BrokerError::InvalidRequiredAcks)?;
        if topic == crate::coordinator::OFFSETS_TOPIC {
            return Err(BrokerError::InvalidTopic(format!(
                "`{topic}` is internal: only the group coordinator writes to it"
            )));
        }
        let (topic, partition) = self.broker.partition(topic, partition)?;
        let now_ms = wall_clock_ms();
        let batches = validate_payload(&records, &topic.config, now_ms)?;
        let epoch = topic.states.get(partition.index() as usize).map_or(0, |s| s.leader_epoch.0);
        if batches.iter().any(|b| b.header().producer_id() >= 0) {
            partition.check_leads_now(epoch)?;
            for batch in batches.iter().filter(|b| b.header().producer_id() >= 0) {
                self.broker.check_producer_id(batch.header().producer_id())?;
            }
        }
        let acks_all = (acks == pb::Acks::All).then_some(timeout);
        let expected_end = expected_end_offset
            .map(|o| {
                u64::try_from(o).map_err(|_| {
                    BrokerError::InvalidRequest(format!("expected_end_offset {o} is negative: send a log end offset"))
                })
            })
            .transpose()?;
        let produced = partition.produce_with_outcome(&batches, epoch, acks_all, expected_end).await?;
        if produced.duplicate_timestamp.is_none() {
            let bytes = records.iter().map(|r| r.len() as u64).sum();
            let count = batches.iter().map(|b| u64::try_from(b.header().record_count()).unwrap_or(0)).sum();
            topic.metrics.produced(bytes, count);
        }
        let append_time = match produced.duplicate_timestamp {
            _ if !topic.config.log_append_time => -1,
            Some(original) => original,
            None => now_ms,
        };
        Ok((produced.info, append_time))
    }
}

impl TallyService {
    /// Counts what a fetch answer sends, per topic, and its errors.
    fn count_fetch(&self, response: &pb::FetchResponse) {
        for t in &response.topics {
            if let Some(topic) = self.broker.topic(&t.name) {
                for p in t.partitions.iter().filter(|p| !p.records.is_empty()) {
                    topic.metrics.fetched(&p.records);
                }
            }
            for p in t.partitions.iter().filter(|p| p.error_code != 0) {
                crate::metrics::request_error("fetch", p.error_code);
            }
        }
    }

    /// A consumer fetch: long-polls until `min_bytes` are there or
    /// `max_wait_ms` passed.
    async fn fetch_inner(&self, req: pb::FetchRequest) -> Result<Response<pb::FetchResponse>, Status> {
        let max_wait = Duration::from_millis(u64::from(req.max_wait_ms).min(self.broker.config().max_fetch_wait_ms));
        let deadline = tokio::time::Instant::now() + max_wait;
        let limit = self.broker.config().max_request_bytes.saturating_sub(64 << 10);
        let max_bytes = if req.max_bytes == 0 { DEFAULT_FETCH_MAX_BYTES } else { u64::from(req.max_bytes) }.min(limit);
        let min_bytes = u64::from(req.min_bytes);
        let names: Vec<String> = req.topics.iter().map(|t| t.name.clone()).collect();
        let mut targets = Vec::new();
        for (topic_index, t) in req.topics.iter().enumerate() {
            for p in &t.partitions {
                targets.push(FetchTarget {
                    topic_index,
                    partition: p.partition,
                    offset: p.fetch_offset,
                    max_bytes: if p.partition_max_bytes == 0 { max_bytes } else { u64::from(p.partition_max_bytes) },
                    resolved: self.broker.partition(&t.name, p.partition).map(|(_, p)| p),
                });
            }
        }
        // Subscribe before the first read so an append between the read and
        // the wait still wakes us.
        let mut watchers: Vec<watch::Receiver<Offset>> =
            targets.iter().filter_map(|t| t.resolved.as_ref().ok().map(|p| p.subscribe())).collect();
        let shared = Arc::new((targets, names));
        loop {
            let (response, total, any_error) = read_off_runtime(&shared, max_bytes).await?;
            if total >= min_bytes || any_error || watchers.is_empty() || tokio::time::Instant::now() >= deadline {
                return Ok(Response::new(response));
            }
            let changed = futures_util::future::select_all(watchers.iter_mut().map(|w| Box::pin(w.changed())));
            if tokio::time::timeout_at(deadline, changed).await.is_err() {
                let (response, _, _) = read_off_runtime(&shared, max_bytes).await?;
                return Ok(Response::new(response));
            }
        }
    }

    /// InitProducerId for an idempotent producer: a new id at epoch 0, or
    /// (KIP-360) the given id at the next epoch; past the last epoch, a new
    /// id. Transactions are not supported.
    async fn init_producer_id_inner(&self, req: &pb::InitProducerIdRequest) -> Result<(i64, i16), BrokerError> {
        if req.transactional_id.as_deref().is_some_and(|t| !t.is_empty()) {
            return Err(BrokerError::InvalidRequest(
                "transactions are not supported by Tally: leave transactional_id unset (idempotence needs none)".into(),
            ));
        }
        let new_id = || async { Ok((self.broker.producer_ids().next_id(&self.broker).await?, 0)) };
        match (req.producer_id, req.producer_epoch) {
            (-1, -1) => new_id().await,
            (id, epoch) if id >= 0 && (0..=i32::from(i16::MAX)).contains(&epoch) => {
                self.broker.check_producer_id(id)?;
                // Kafka keeps the last epoch for a transaction's abort
                // marker; an idempotent producer there gets a new id.
                match i16::try_from(epoch + 1) {
                    Ok(next) if next < i16::MAX => Ok((id, next)),
                    _ => new_id().await,
                }
            }
            (id, epoch) => Err(BrokerError::InvalidRequest(format!(
                "producer_id {id} with producer_epoch {epoch}: send -1 and -1 for a new producer, or an id and its \
                 current epoch (0 ..= 32767) to bump it"
            ))),
        }
    }
}

/// The answer for a partition that failed: nothing appended, or (with
/// [`BrokerError::PartlyAppended`]) the batches appended before the failure
/// and the failure of the rest.
fn produce_failure(partition: u32, log_start: i64, e: &BrokerError) -> pb::PartitionProduceResponse {
    let (error_code, error_message) = code_and_message(e);
    let (leader_id, leader_epoch) = leader_hint(e);
    let (base_offset, appended_batches) = match e {
        BrokerError::PartlyAppended { appended, batches, .. } => {
            (appended.base_offset.to_wire(), u32::try_from(*batches).unwrap_or(u32::MAX))
        }
        _ => (-1, 0),
    };
    let current_end_offset = match e {
        BrokerError::EndOffsetMismatch { current, .. } => i64::try_from(*current).ok(),
        _ => None,
    };
    pb::PartitionProduceResponse {
        partition,
        error_code,
        error_message,
        base_offset,
        log_append_time_ms: -1,
        log_start_offset: log_start,
        leader_id,
        leader_epoch,
        appended_batches,
        current_end_offset,
    }
}

impl TallyService {
    fn partition_produce_response(
        &self,
        topic: &str,
        partition: u32,
        result: Result<(crate::storage::AppendInfo, i64), BrokerError>,
    ) -> pb::PartitionProduceResponse {
        let log_start = self.broker.partition(topic, partition).map(|(_, p)| p.offsets().0.to_wire()).unwrap_or(-1);
        match result {
            Ok((info, log_append_time_ms)) => pb::PartitionProduceResponse {
                partition,
                error_code: ErrorCode::None as i32,
                error_message: String::new(),
                base_offset: info.base_offset.to_wire(),
                log_append_time_ms,
                log_start_offset: log_start,
                leader_id: None,
                leader_epoch: None,
                appended_batches: 0,
                current_end_offset: None,
            },
            Err(e) => {
                tracing::debug!(topic, partition, error = %e, "produce refused");
                let failure = produce_failure(partition, log_start, &e);
                crate::metrics::request_error("produce", failure.error_code);
                failure
            }
        }
    }
}

/// Splits a produce payload into batches and validates every one before any
/// is appended, so a bad batch leaves the log untouched.
/// With `LogAppendTime`, each batch is stamped with `now_ms` (a copy: the
/// CRC covers the timestamp); otherwise record timestamps must lie within
/// the topic's bounds around `now_ms`.
fn validate_payload(records: &[Bytes], config: &TopicConfig, now_ms: i64) -> Result<Vec<RecordBatch>, BrokerError> {
    let max_message_bytes = config.max_message_bytes;
    let max = usize::try_from(max_message_bytes).unwrap_or(usize::MAX);
    let limits = BatchLimits {
        max_batch_bytes: max,
        timestamps: (!config.log_append_time).then(|| config.timestamp_bounds(now_ms)),
        require_keys: config.is_compacted(),
        ..BatchLimits::default()
    };
    let mut parts = Vec::new();
    for chunk in records {
        parts.extend(split_batches(chunk).map_err(BrokerError::CorruptMessage)?);
    }
    if parts.is_empty() {
        return Err(BrokerError::InvalidRequest("no record batch in the produce data".into()));
    }
    parts
        .into_iter()
        .map(|b| {
            let size = b.len();
            let batch = RecordBatch::validate(b, &limits).map_err(|e| match e {
                tally_proto::batch::BatchError::TooLarge { .. } => {
                    BrokerError::MessageTooLarge { size, max: max_message_bytes }
                }
                other => BrokerError::CorruptMessage(other),
            })?;
            Ok(if config.log_append_time { batch.with_log_append_time(now_ms) } else { batch })
        })
        .collect()
}

/// Milliseconds since the Unix epoch: record timestamps are wall-clock time.
fn wall_clock_ms() -> i64 {
    let since = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
    i64::try_from(since.as_millis()).unwrap_or(i64::MAX)
}

/// The leader and epoch a NOT_LEADER_OR_FOLLOWER answer names.
fn leader_hint(e: &BrokerError) -> (Option<u32>, Option<u32>) {
    match e {
        BrokerError::NotLeaderOrFollower { leader: Some(leader), leader_epoch, .. } => {
            (Some(*leader), Some(*leader_epoch))
        }
        _ => (None, None),
    }
}

fn code_and_message(e: &BrokerError) -> (i32, String) {
    (e.code() as i32, e.to_string())
}

/// One partition of a fetch, resolved.
struct FetchTarget {
    topic_index: usize,
    partition: u32,
    offset: i64,
    max_bytes: u64,
    resolved: Result<Arc<Partition>, BrokerError>,
}

#[tonic::async_trait]
impl Tally for TallyService {
    async fn produce(&self, request: Request<pb::ProduceRequest>) -> Result<Response<pb::ProduceResponse>, Status> {
        let started = std::time::Instant::now();
        let req = request.into_inner();
        let wire_acks = req.acks;
        let acks = pb::Acks::try_from(req.acks).map_err(|_| req.acks);
        let timeout =
            if req.timeout_ms == 0 { DEFAULT_ACKS_TIMEOUT } else { Duration::from_millis(u64::from(req.timeout_ms)) };
        // Every partition at once: acks=all waits overlap instead of adding up.
        let topics = req.topics.into_iter().map(|t| async move {
            let name = t.name;
            let partitions = t.partitions.into_iter().map(|p| {
                let name = name.as_str();
                async move {
                    let span = tracing::debug_span!("produce", topic = %name, partition = p.partition);
                    let result = self
                        .produce_partition(name, p.partition, p.records, p.expected_end_offset, acks, timeout)
                        .instrument(span)
                        .await;
                    self.partition_produce_response(name, p.partition, result)
                }
            });
            let partitions = futures_util::future::join_all(partitions).await;
            pb::TopicProduceResponse { name, partitions }
        });
        let topics = futures_util::future::join_all(topics).await;
        self.times.produce(wire_acks, started.elapsed().as_secs_f64());
        Ok(Response::new(pb::ProduceResponse { topics }))
    }

    async fn init_producer_id(
        &self,
        request: Request<pb::InitProducerIdRequest>,
    ) -> Result<Response<pb::InitProducerIdResponse>, Status> {
        let req = request.into_inner();
        let answer = match self.init_producer_id_inner(&req).await {
            Ok((producer_id, producer_epoch)) => pb::InitProducerIdResponse {
                error_code: ErrorCode::None as i32,
                error_message: String::new(),
                producer_id,
                producer_epoch: i32::from(producer_epoch),
            },
            Err(e) => {
                tracing::debug!(error = %e, "InitProducerId refused");
                let (error_code, error_message) = code_and_message(&e);
                pb::InitProducerIdResponse { error_code, error_message, producer_id: -1, producer_epoch: -1 }
            }
        };
        Ok(Response::new(answer))
    }

    async fn fetch(&self, request: Request<pb::FetchRequest>) -> Result<Response<pb::FetchResponse>, Status> {
        let started = std::time::Instant::now();
        let answer = self.fetch_inner(request.into_inner()).await;
        self.times.fetch(started.elapsed().as_secs_f64());
        if let Ok(response) = &answer {
            self.count_fetch(response.get_ref());
        }
        answer
    }

    async fn list_offsets(
        &self,
        request: Request<pb::ListOffsetsRequest>,
    ) -> Result<Response<pb::ListOffsetsResponse>, Status> {
        let req = request.into_inner();
        let mut topics = Vec::with_capacity(req.topics.len());
        for t in req.topics {
            let partitions = t
                .partitions
                .iter()
                .map(|p| {
                    let found = self.broker.partition(&t.name, p.partition).and_then(|(_, part)| {
                        part.check_offsets_available()?;
                        let (start, hw, _) = part.offsets();
                        match p.timestamp {
                            -2 => Ok((start.to_wire(), -1)),
                            -1 => Ok((hw.to_wire(), -1)),
                            -3 => Ok(part.max_timestamp_record()?.map_or((-1, -1), |(o, t)| (o.to_wire(), t))),
                            ts if ts < 0 => {
                                Err(BrokerError::InvalidRequest(format!("timestamp {ts} is not -3, -2, -1 or >= 0")))
                            }
                            ts => Ok(part.offset_for_timestamp(ts)?.map_or((-1, -1), |(o, t)| (o.to_wire(), t))),
                        }
                    });
                    match found {
                        Ok((offset, timestamp)) => pb::ListOffsetsPartitionResponse {
                            partition: p.partition,
                            error_code: 0,
                            error_message: String::new(),
                            offset,
                            timestamp,
                        },
                        Err(e) => {
                            let (error_code, error_message) = code_and_message(&e);
                            pb::ListOffsetsPartitionResponse {
                                partition: p.partition,
                                error_code,
                                error_message,
                                offset: -1,
                                timestamp: -1,
                            }
                        }
                    }
                })
                .collect();
            topics.push(pb::ListOffsetsTopicResponse { name: t.name, partitions });
        }
        Ok(Response::new(pb::ListOffsetsResponse { topics }))
    }

    async fn metadata(&self, request: Request<pb::MetadataRequest>) -> Result<Response<pb::MetadataResponse>, Status> {
        let req = request.into_inner();
        let node = self.broker.node_id();
        if !self.broker.metadata_ready() {
            let not_ready =
                pb::MetadataResponse { controller_id: node as i32, catching_up: true, ..Default::default() };
            return Ok(Response::new(not_ready));
        }
        let topics = if req.topics.is_empty() {
            self.broker.topics().iter().map(|t| topic_metadata(t)).collect()
        } else {
            req.topics
                .iter()
                .map(|name| match self.broker.topic(name) {
                    Some(t) => topic_metadata(&t),
                    None => {
                        let e = BrokerError::UnknownTopicOrPartition { topic: name.clone(), partition: None };
                        let (error_code, error_message) = code_and_message(&e);
                        pb::TopicMetadata { name: name.clone(), error_code, error_message, partitions: Vec::new() }
                    }
                })
                .collect()
        };
        let brokers =
            self.broker.brokers().into_iter().map(|(node_id, address)| pb::BrokerMetadata { node_id, address });
        Ok(Response::new(pb::MetadataResponse {
            brokers: brokers.collect(),
            controller_id: node as i32,
            topics,
            catching_up: false,
        }))
    }
}

fn topic_metadata(t: &crate::broker::Topic) -> pb::TopicMetadata {
    pb::TopicMetadata {
        name: t.name.to_string(),
        error_code: 0,
        error_message: String::new(),
        partitions: t
            .states
            .iter()
            .enumerate()
            .map(|(i, p)| pb::PartitionMetadata {
                partition: i as u32,
                error_code: if p.leader.is_some() { 0 } else { ErrorCode::LeaderNotAvailable as i32 },
                leader_id: p.leader.map_or(-1, |l| l.0 as i32),
                leader_epoch: p.leader_epoch.0,
                replicas: p.replicas.iter().map(|b| b.0).collect(),
                isr: p.isr.iter().map(|b| b.0).collect(),
            })
            .collect(),
    }
}

/// [`read_targets`], moved to a blocking thread when some partition's read
/// may fault pages in from disk (its data is not in the page cache).
/// Reads served from the page cache stay inline: moving them cost a quarter
/// of the page-cache fetch throughput (the encoder then copies bytes that
/// another core just read).
async fn read_off_runtime(
    shared: &Arc<(Vec<FetchTarget>, Vec<String>)>,
    max_bytes: u64,
) -> Result<(pb::FetchResponse, u64, bool), Status> {
    let may_block = shared.0.iter().any(|t| {
        let budget = t.max_bytes.min(max_bytes);
        t.resolved.as_ref().is_ok_and(|p| Offset::from_wire(t.offset).is_some_and(|o| p.may_read_disk(o, budget)))
    });
    if !may_block {
        return Ok(read_targets(&shared.0, &shared.1, max_bytes));
    }
    let shared = shared.clone();
    tokio::task::spawn_blocking(move || read_targets(&shared.0, &shared.1, max_bytes))
        .await
        .map_err(|e| Status::internal(format!("fetch task failed: {e}")))
}

/// Reads every target once: the response, its data bytes, and whether any
/// partition failed.
fn read_targets(targets: &[FetchTarget], names: &[String], max_bytes: u64) -> (pb::FetchResponse, u64, bool) {
    let mut topics: Vec<pb::FetchTopicResponse> =
        names.iter().map(|n| pb::FetchTopicResponse { name: n.clone(), partitions: Vec::new() }).collect();
    let mut total = 0u64;
    let mut any_error = false;
    for t in targets {
        let _span = tracing::debug_span!("fetch", topic = %names[t.topic_index], partition = t.partition).entered();
        let budget = t.max_bytes.min(max_bytes.saturating_sub(total));
        let result = t.resolved.as_ref().map_err(clone_error).and_then(|p| {
            if budget == 0 {
                let (start, hw, _) = p.offsets();
                return Ok((Vec::new(), hw, start));
            }
            let f = p.fetch(t.offset, budget)?;
            Ok((f.read.chunks, f.high_watermark, f.log_start_offset))
        });
        let response = match result {
            Ok((chunks, hw, start)) => {
                total += chunks.iter().map(|c| c.len() as u64).sum::<u64>();
                pb::FetchPartitionResponse {
                    partition: t.partition,
                    error_code: 0,
                    error_message: String::new(),
                    high_watermark: hw.to_wire(),
                    log_start_offset: start.to_wire(),
                    records: chunks,
                    leader_id: None,
                    leader_epoch: None,
                }
            }
            Err(e) => {
                any_error = true;
                if let BrokerError::Storage(s) = &e {
                    tracing::error!(partition = t.partition, error = %s, "fetch failed");
                }
                let (error_code, error_message) = code_and_message(&e);
                let (leader_id, leader_epoch) = leader_hint(&e);
                pb::FetchPartitionResponse {
                    partition: t.partition,
                    error_code,
                    error_message,
                    high_watermark: -1,
                    log_start_offset: -1,
                    records: Vec::new(),
                    leader_id,
                    leader_epoch,
                }
            }
        };
        topics[t.topic_index].partitions.push(response);
    }
    (pb::FetchResponse { topics }, total, any_error)
}

/// A copy of a partition's resolution error, keeping its wire code (one
/// fetch may read a partition's error more than once while it long-polls).
pub(super) fn clone_error(e: &BrokerError) -> BrokerError {
    match e {
        BrokerError::UnknownTopicOrPartition { topic, partition } => {
            BrokerError::UnknownTopicOrPartition { topic: topic.clone(), partition: *partition }
        }
        BrokerError::NotLeaderOrFollower { topic, partition, leader, leader_epoch } => {
            BrokerError::NotLeaderOrFollower {
                topic: topic.clone(),
                partition: *partition,
                leader: *leader,
                leader_epoch: *leader_epoch,
            }
        }
        other => BrokerError::InvalidRequest(other.to_string()),
    }
}
