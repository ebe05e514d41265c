//! Tally's wire: the gRPC API (package `tally.v1`, generated from
//! `proto/tally/v1/tally.proto`), the Kafka v2 record batch codec, and the
//! HTTP/2 connection gRPC calls travel on, which the client and the broker
//! share.
//!
//! The generated types are converted at the edges; domain code inside the
//! broker and client does not pass them around.

pub mod batch;
pub mod compression;
pub mod connection;
pub mod partitioner;
pub mod varint;

/// Generated gRPC messages and services for `tally.v1`.
#[allow(missing_docs, clippy::all, clippy::pedantic)]
pub mod v1 {
    tonic::include_proto!("tally.v1");
}

/// Generated messages and services for `tally.internal.v1`: what brokers of
/// one cluster send each other (not for clients).
#[allow(missing_docs, clippy::all, clippy::pedantic)]
pub mod internal {
    /// Version 1.
    pub mod v1 {
        tonic::include_proto!("tally.internal.v1");
    }
}

/// The encoded file descriptor set, for the gRPC reflection service.
pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("tally_descriptor");

pub use v1::ErrorCode;

impl ErrorCode {
    /// True when retrying the same request may succeed.
    pub fn is_retriable(self) -> bool {
        matches!(
            self,
            ErrorCode::LeaderNotAvailable
                | ErrorCode::NotLeaderOrFollower
                | ErrorCode::RequestTimedOut
                | ErrorCode::NotEnoughReplicas
                | ErrorCode::NotEnoughReplicasAfterAppend
                | ErrorCode::KafkaStorageError
                | ErrorCode::UnknownTopicOrPartition
                | ErrorCode::FencedLeaderEpoch
                | ErrorCode::UnknownLeaderEpoch
                | ErrorCode::OffsetNotAvailable
                | ErrorCode::CoordinatorLoadInProgress
                | ErrorCode::CoordinatorNotAvailable
                | ErrorCode::NotCoordinator
        )
    }

    /// Kafka's number for this error (UNKNOWN_SERVER_ERROR is -1 there).
    pub fn kafka_code(self) -> i16 {
        match self {
            ErrorCode::UnknownServerError => -1,
            other => i16::try_from(other as i32).unwrap_or(-1),
        }
    }
}
