//! Errors of the storage layer.

use std::path::PathBuf;

use tally_proto::batch::BatchError;

use super::Offset;

/// What went wrong in the log.
#[derive(Debug, thiserror::Error)]
pub enum StorageError {
    /// An operating-system call failed.
    #[error("{op} {path}: {source}")]
    Io {
        /// What was being done.
        op: &'static str,
        /// The file or directory.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// The offset is outside `[log_start, log_end]`.
    #[error("offset {requested} is out of range: the log holds [{log_start}, {log_end})")]
    OffsetOutOfRange {
        /// The offset asked for.
        requested: Offset,
        /// First offset in the log.
        log_start: Offset,
        /// Offset after the last record.
        log_end: Offset,
    },
    /// Bytes on disk that fail validation.
    #[error("corrupt batch in {path} at position {position}: {reason}")]
    Corrupt {
        /// The segment file.
        path: PathBuf,
        /// Byte position of the batch.
        position: u64,
        /// What was wrong.
        reason: BatchError,
    },
    /// A replica batch that does not start at the log end offset.
    #[error("replica batch starts at offset {got}, but the log ends at {expected}")]
    NonContiguousOffset {
        /// The log end offset.
        expected: Offset,
        /// The batch's base offset.
        got: i64,
    },
    /// Bytes that were durable and validated (below the recovery point) no
    /// longer read back as the batches they were. Recovery refuses to cut
    /// or drop them silently.
    #[error(
        "{path}: data below the recovery point {recovery_point} is damaged at position {position} ({what}); \
         the log was not opened and nothing was deleted. Inspect it with `tally dump-log --verify {path}`; \
         to give up the partition's data, move its directory away"
    )]
    CorruptBelowRecoveryPoint {
        /// The segment file.
        path: PathBuf,
        /// Byte position of the damage.
        position: u64,
        /// The checkpointed recovery point.
        recovery_point: Offset,
        /// What was found.
        what: String,
    },
    /// Damage above the recovery point that no torn write explains: a
    /// damaged batch followed by valid ones, or a leader epoch that
    /// disagrees with the epoch checkpoint. Cutting there would delete
    /// acknowledged data after it, so the log is not opened.
    #[error(
        "{path}: damaged at position {position} ({what}); the log was not opened and nothing was deleted. \
         Inspect it with `tally dump-log --verify {path}`; restore the partition from a replica, \
         or move its directory away to give up its data"
    )]
    DamagedAboveRecoveryPoint {
        /// The segment file.
        path: PathBuf,
        /// Byte position of the damaged batch.
        position: u64,
        /// What was found.
        what: String,
    },
    /// A checkpoint file that exists but does not parse.
    #[error("checkpoint file {path} is corrupt: {reason}")]
    CorruptCheckpoint {
        /// The file.
        path: PathBuf,
        /// What was wrong.
        reason: String,
    },
    /// The log stopped taking writes and serving reads after an I/O failure
    /// that may have lost data (a failed fsync); only reopening it, which
    /// recovers it from what is on disk, clears this.
    #[error("the log is failed and takes no more writes or reads until the broker restarts and recovers it: {reason}")]
    LogFailed {
        /// The failure that stopped it.
        reason: String,
    },
    /// A batch from a leader that this log cannot take as it is.
    #[error("invalid replica batch: {0}")]
    InvalidReplicaBatch(String),
    /// A leader append in an epoch older than the newest one in the log.
    #[error("leader epoch {epoch} is older than the log's latest epoch {latest}")]
    StaleLeaderEpoch {
        /// The epoch of the append.
        epoch: u32,
        /// The latest epoch in the log.
        latest: u32,
    },
    /// An argument the log cannot act on.
    #[error("{0}")]
    InvalidArgument(String),
    /// A producer's batch the producer-state table refuses (a sequence gap,
    /// a fenced epoch, an unknown producer, too many producers).
    #[error(transparent)]
    ProducerState(#[from] super::producer_state::ProducerStateError),
    /// A retry of a producer's batch the log already holds: not appended
    /// again. The leader answers with the original offsets instead.
    #[error(
        "producer {producer_id}: sequences {first_seq}..={last_seq} are already in the log at offsets {first_offset}..={last_offset}"
    )]
    DuplicateBatch {
        /// Producer.
        producer_id: i64,
        /// First sequence of the batch.
        first_seq: i32,
        /// Last sequence of the batch.
        last_seq: i32,
        /// Where the original batch starts.
        first_offset: u64,
        /// Where it ends.
        last_offset: u64,
        /// Its max timestamp (the append time on a `LogAppendTime` topic).
        timestamp: i64,
    },
}

impl StorageError {
    /// True when the disk is full (ENOSPC or EDQUOT).
    pub fn is_disk_full(&self) -> bool {
        match self {
            StorageError::Io { source, .. } => {
                matches!(source.raw_os_error(), Some(libc::ENOSPC) | Some(libc::EDQUOT))
            }
            _ => false,
        }
    }
}

/// Wraps an `io::Error` with what was being done and where.
pub(crate) fn io_err(op: &'static str, path: impl Into<PathBuf>) -> impl FnOnce(std::io::Error) -> StorageError {
    let path = path.into();
    move |source| StorageError::Io { op, path, source }
}
