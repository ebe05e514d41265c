//! The client's error type.

use tally_proto::ErrorCode;
use tally_proto::batch::BatchError;

/// What a client call can fail with. Cheap to clone, so one failed batch can
/// fail every record in it.
#[derive(Debug, Clone, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// No bootstrap broker could be reached.
    #[error("cannot connect to any of {addresses}: {message}")]
    Connect {
        /// The addresses tried.
        addresses: String,
        /// The last failure.
        message: String,
    },
    /// The broker answered with an error code for a topic or partition.
    #[error("{code:?} ({topic}{}): {message}", .partition.map(|p| format!("/{p}")).unwrap_or_default())]
    Broker {
        /// The wire error code.
        code: ErrorCode,
        /// The broker's message.
        message: String,
        /// Topic concerned.
        topic: String,
        /// Partition concerned, if any.
        partition: Option<u32>,
    },
    /// The broker answered with an error code this client does not know (a
    /// newer broker): kept as the number, and not retried.
    #[error("unknown error code {code} ({topic}{}): {message}", .partition.map(|p| format!("/{p}")).unwrap_or_default())]
    UnknownBrokerCode {
        /// The wire error code, as sent.
        code: i32,
        /// The broker's message.
        message: String,
        /// Topic concerned.
        topic: String,
        /// Partition concerned, if any.
        partition: Option<u32>,
    },
    /// The gRPC call failed (connection lost, deadline, malformed request).
    #[error("request failed: {code:?}: {message}")]
    Rpc {
        /// gRPC status code.
        code: tonic::Code,
        /// Status message.
        message: String,
    },
    /// The broker returned bytes that are not valid record batches.
    #[error("corrupt data from the broker: {0}")]
    Corrupt(#[from] BatchError),
    /// An argument the client cannot use.
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
    /// The operation did not finish in time.
    #[error("timed out after {0:?}")]
    Timeout(std::time::Duration),
    /// The producer or consumer was closed.
    #[error("closed")]
    Closed,
    /// [`Producer::try_send`](crate::Producer::try_send) could not queue
    /// the record without waiting: the buffer is full, or the topic's
    /// metadata is not known yet (it is being fetched). `send` would wait.
    #[error("would block: {0}")]
    WouldBlock(&'static str),
}

impl Error {
    /// True when retrying the same operation may succeed.
    pub fn is_retriable(&self) -> bool {
        match self {
            Error::Broker { code, .. } => code.is_retriable(),
            Error::Rpc { code, message } => match code {
                // Not ResourceExhausted: that is what an oversized message gets.
                tonic::Code::Unavailable
                | tonic::Code::DeadlineExceeded
                | tonic::Code::Aborted
                | tonic::Code::Cancelled => true,
                // A connection that breaks mid-call (a broker restarting) comes
                // back from tonic as INTERNAL or UNKNOWN with the transport's
                // words; a server's own INTERNAL (say, an undecodable request)
                // is not retried.
                tonic::Code::Internal | tonic::Code::Unknown => is_transport_failure(message),
                _ => false,
            },
            Error::Connect { .. } | Error::Timeout(_) => true,
            // Trying again later (or awaiting `send`) is what it asks for.
            Error::WouldBlock(_) => true,
            Error::Corrupt(_) | Error::InvalidArgument(_) | Error::Closed | Error::UnknownBrokerCode { .. } => false,
        }
    }

    /// The broker's error code, when the broker answered with one.
    pub fn code(&self) -> Option<ErrorCode> {
        match self {
            Error::Broker { code, .. } => Some(*code),
            _ => None,
        }
    }

    pub(crate) fn broker(code: i32, message: String, topic: &str, partition: Option<u32>) -> Error {
        let topic = topic.to_string();
        match ErrorCode::try_from(code) {
            Ok(code) => Error::Broker { code, message, topic, partition },
            Err(_) => Error::UnknownBrokerCode { code, message, topic, partition },
        }
    }
}

/// True for the messages tonic gives a call whose connection failed.
fn is_transport_failure(message: &str) -> bool {
    ["h2 protocol error", "transport error", "connection reset", "broken pipe", "connection closed"]
        .iter()
        .any(|m| message.to_ascii_lowercase().contains(m))
}

impl From<tonic::Status> for Error {
    fn from(s: tonic::Status) -> Self {
        Error::Rpc { code: s.code(), message: s.message().to_string() }
    }
}

/// Result type of the client.
pub type Result<T, E = Error> = std::result::Result<T, E>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_unknown_wire_code_is_kept_as_its_number_and_not_retried() {
        let e = Error::broker(9999, "from the future".into(), "t", Some(1));
        assert!(matches!(&e, Error::UnknownBrokerCode { code: 9999, .. }), "{e:?}");
        assert!(e.to_string().contains("9999") && e.to_string().contains("t/1"), "{e}");
        assert!(!e.is_retriable());
        assert!(matches!(
            Error::broker(6, String::new(), "t", None),
            Error::Broker { code: ErrorCode::NotLeaderOrFollower, .. }
        ));
    }

    #[test]
    fn a_broken_connection_is_retriable_and_a_server_internal_error_is_not() {
        let rpc = |code, message: &str| Error::Rpc { code, message: message.to_string() };
        assert!(rpc(tonic::Code::Internal, "h2 protocol error: http2 error").is_retriable());
        assert!(rpc(tonic::Code::Unknown, "transport error").is_retriable());
        assert!(rpc(tonic::Code::Unavailable, "connection refused").is_retriable());
        assert!(!rpc(tonic::Code::Internal, "failed to decode Protobuf message").is_retriable());
        assert!(!rpc(tonic::Code::ResourceExhausted, "message too large").is_retriable());
    }
}
