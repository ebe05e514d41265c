//! Errors of the broker layer and their wire codes.

use tally_proto::ErrorCode;
use tally_proto::batch::BatchError;

use crate::controller::ControllerError;
use crate::storage::producer_state::ProducerStateError;
use crate::storage::{Offset, StorageError};
use crate::topic::InvalidConfig;

/// What a broker operation can fail with. Each maps to one wire
/// [`ErrorCode`] and a message a person can act on.
#[derive(Debug, thiserror::Error)]
pub enum BrokerError {
    /// No such topic, or no such partition in it.
    #[error("unknown topic or partition: {topic}{}", .partition.map(|p| format!("/{p}")).unwrap_or_default())]
    UnknownTopicOrPartition {
        /// The topic.
        topic: String,
        /// The partition, when one was named.
        partition: Option<u32>,
    },
    /// The topic name breaks the naming rules.
    #[error("invalid topic name: {0}")]
    InvalidTopic(String),
    /// A topic with that name exists.
    #[error("topic `{0}` already exists")]
    TopicAlreadyExists(String),
    /// A partition count that cannot be used.
    #[error("{0}")]
    InvalidPartitions(String),
    /// A replication factor that cannot be satisfied.
    #[error("{0}")]
    InvalidReplicationFactor(String),
    /// A config key or value that was refused.
    #[error(transparent)]
    InvalidConfig(#[from] InvalidConfig),
    /// A batch failed validation.
    #[error("invalid record batch: {0}")]
    CorruptMessage(BatchError),
    /// A batch is larger than the topic allows.
    #[error("record batch of {size} bytes exceeds max_message_bytes = {max}")]
    MessageTooLarge {
        /// Batch size.
        size: usize,
        /// Topic limit.
        max: u64,
    },
    /// A fetch or list-offsets position outside the log.
    #[error("offset {requested} is out of range: the partition holds offsets [{log_start}, {log_end})")]
    OffsetOutOfRange {
        /// Offset asked for.
        requested: i64,
        /// First offset.
        log_start: Offset,
        /// Offset after the last.
        log_end: Offset,
    },
    /// A produce whose first `batches` batches were appended (from
    /// `appended.base_offset`, and waited for at the request's acks level)
    /// before the next one failed with `source`; the rest were not appended.
    #[error("the first {batches} batches were appended at offset {}; the rest were not: {source}", .appended.base_offset)]
    PartlyAppended {
        /// The offsets of the appended batches.
        appended: crate::storage::AppendInfo,
        /// How many batches, in request order, were appended.
        batches: usize,
        /// Why the next batch was not.
        source: Box<BrokerError>,
    },
    /// acks=all with too few in-sync replicas.
    #[error("acks=all needs {min_isr} in-sync replicas but only {isr} are in sync")]
    NotEnoughReplicas {
        /// In-sync replicas now.
        isr: usize,
        /// `min_insync_replicas`.
        min_isr: u32,
    },
    /// An acks value other than 0, 1 or all.
    #[error("acks must be 0, 1 or all (got wire value {0})")]
    InvalidRequiredAcks(i32),
    /// A malformed request.
    #[error("invalid request: {0}")]
    InvalidRequest(String),
    /// A conditional append whose expected end offset is not the log end.
    #[error("the log of {topic}/{partition} ends at {current}, not at the expected {expected}: nothing was appended")]
    EndOffsetMismatch {
        /// Topic.
        topic: String,
        /// Partition.
        partition: u32,
        /// The end offset the request expected.
        expected: u64,
        /// The log end offset now.
        current: u64,
    },
    /// A producer id this cluster never handed out (or, on InitProducerId,
    /// one it cannot bump).
    #[error("{0}")]
    UnknownProducerId(String),
    /// The disk or file system failed.
    #[error("storage error: {0}")]
    Storage(#[from] StorageError),
    /// This broker does not lead the partition.
    #[error(
        "broker does not lead {topic}/{partition}: {}",
        .leader.map(|l| format!("broker {l} does (leader epoch {leader_epoch})")).unwrap_or_else(|| "it has no leader now".into())
    )]
    NotLeaderOrFollower {
        /// Topic.
        topic: String,
        /// Partition.
        partition: u32,
        /// The leader, if it has one.
        leader: Option<u32>,
        /// The current leader epoch.
        leader_epoch: u32,
    },
    /// A request names a leader epoch older than the partition's.
    #[error("{topic}/{partition}: leader epoch {got} is fenced; the current epoch is {current}")]
    FencedLeaderEpoch {
        /// Topic.
        topic: String,
        /// Partition.
        partition: u32,
        /// This broker's epoch.
        current: u32,
        /// The request's.
        got: u32,
    },
    /// A request names a leader epoch this broker has not seen yet.
    #[error("{topic}/{partition}: leader epoch {got} is not known here yet (this broker has {current})")]
    UnknownLeaderEpoch {
        /// Topic.
        topic: String,
        /// Partition.
        partition: u32,
        /// This broker's epoch.
        current: u32,
        /// The request's.
        got: u32,
    },
    /// A new leader whose high watermark has not yet reached the start of
    /// its epoch cannot say where the committed log ends (Kafka's
    /// OFFSET_NOT_AVAILABLE): offsets it would list could go backwards.
    #[error(
        "{topic}/{partition}: the new leader's high watermark {high_watermark} has not reached the start of its epoch ({epoch_start}) yet; ask again shortly"
    )]
    OffsetNotAvailable {
        /// Topic.
        topic: String,
        /// Partition.
        partition: u32,
        /// The leader's high watermark.
        high_watermark: u64,
        /// Where its epoch began.
        epoch_start: u64,
    },
    /// acks=all was not reached in time: the batch is stored on the leader,
    /// but not known to be on every in-sync replica.
    #[error("{topic}/{partition}: the in-sync replicas did not confirm the batch within {timeout_ms} ms")]
    ReplicationTimedOut {
        /// Topic.
        topic: String,
        /// Partition.
        partition: u32,
        /// The request's timeout.
        timeout_ms: u64,
    },
    /// The broker is stopping.
    #[error("the broker is shutting down")]
    ShuttingDown,
    /// The metadata controller could not do what was asked.
    #[error(transparent)]
    Controller(#[from] ControllerError),
}

impl BrokerError {
    /// The wire code for this error.
    pub fn code(&self) -> ErrorCode {
        match self {
            BrokerError::UnknownTopicOrPartition { .. } => ErrorCode::UnknownTopicOrPartition,
            BrokerError::InvalidTopic(_) => ErrorCode::InvalidTopicException,
            BrokerError::TopicAlreadyExists(_) => ErrorCode::TopicAlreadyExists,
            BrokerError::InvalidPartitions(_) => ErrorCode::InvalidPartitions,
            BrokerError::InvalidReplicationFactor(_) => ErrorCode::InvalidReplicationFactor,
            BrokerError::InvalidConfig(_) => ErrorCode::InvalidConfig,
            BrokerError::CorruptMessage(BatchError::TooLarge { .. }) | BrokerError::MessageTooLarge { .. } => {
                ErrorCode::MessageTooLarge
            }
            BrokerError::CorruptMessage(
                BatchError::ControlBatch
                | BatchError::ProducerFields { .. }
                | BatchError::HeaderKeyNotUtf8 { .. }
                | BatchError::MissingKey { .. }
                | BatchError::DeleteHorizonSet,
            ) => ErrorCode::InvalidRecord,
            BrokerError::CorruptMessage(BatchError::TimestampOutOfRange { .. }) => ErrorCode::InvalidTimestamp,
            BrokerError::CorruptMessage(_) => ErrorCode::CorruptMessage,
            BrokerError::OffsetOutOfRange { .. } => ErrorCode::OffsetOutOfRange,
            BrokerError::PartlyAppended { source, .. } => source.code(),
            BrokerError::NotEnoughReplicas { .. } => ErrorCode::NotEnoughReplicas,
            BrokerError::InvalidRequiredAcks(_) => ErrorCode::InvalidRequiredAcks,
            BrokerError::InvalidRequest(_) => ErrorCode::InvalidRequest,
            BrokerError::Storage(StorageError::OffsetOutOfRange { .. }) => ErrorCode::OffsetOutOfRange,
            BrokerError::Storage(StorageError::StaleLeaderEpoch { .. }) => ErrorCode::FencedLeaderEpoch,
            BrokerError::Storage(StorageError::InvalidReplicaBatch(_)) => ErrorCode::CorruptMessage,
            BrokerError::Storage(StorageError::ProducerState(e)) => match e {
                ProducerStateError::OutOfOrderSequence { .. } => ErrorCode::OutOfOrderSequenceNumber,
                ProducerStateError::InvalidProducerEpoch { .. } => ErrorCode::InvalidProducerEpoch,
                ProducerStateError::UnknownProducerId { .. } => ErrorCode::UnknownProducerId,
                ProducerStateError::TooManyProducers { .. } => ErrorCode::PolicyViolation,
            },
            BrokerError::UnknownProducerId(_) => ErrorCode::UnknownProducerId,
            BrokerError::EndOffsetMismatch { .. } => ErrorCode::EndOffsetMismatch,
            BrokerError::Storage(_) => ErrorCode::KafkaStorageError,
            BrokerError::FencedLeaderEpoch { .. } => ErrorCode::FencedLeaderEpoch,
            BrokerError::UnknownLeaderEpoch { .. } => ErrorCode::UnknownLeaderEpoch,
            BrokerError::OffsetNotAvailable { .. } => ErrorCode::OffsetNotAvailable,
            BrokerError::ReplicationTimedOut { .. } => ErrorCode::RequestTimedOut,
            BrokerError::ShuttingDown => ErrorCode::LeaderNotAvailable,
            BrokerError::NotLeaderOrFollower { leader: Some(_), .. } => ErrorCode::NotLeaderOrFollower,
            BrokerError::NotLeaderOrFollower { leader: None, .. } => ErrorCode::LeaderNotAvailable,
            BrokerError::Controller(ControllerError::NotLeader { .. }) => ErrorCode::LeaderNotAvailable,
            BrokerError::Controller(ControllerError::Timeout { .. }) => ErrorCode::RequestTimedOut,
            BrokerError::Controller(ControllerError::Refused(_) | ControllerError::Config(_)) => {
                ErrorCode::InvalidRequest
            }
            BrokerError::Controller(ControllerError::Stopped(_)) => ErrorCode::UnknownServerError,
        }
    }

    /// Storage offset errors become the broker's, with the range in the message.
    pub(crate) fn from_storage(e: StorageError) -> BrokerError {
        match e {
            StorageError::OffsetOutOfRange { requested, log_start, log_end } => {
                BrokerError::OffsetOutOfRange { requested: requested.to_wire(), log_start, log_end }
            }
            other => BrokerError::Storage(other),
        }
    }
}
