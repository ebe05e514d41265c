//! The partition log: segments of Kafka v2 record batches on disk.
//!
//! This module is synchronous and knows nothing of tokio, protobuf or
//! replication. A [`Log`] is one partition's directory:
//!
//! ```text
//! 00000000000000000000.log        record batches, as received, offsets patched
//! 00000000000000000000.index      sparse offset -> byte position (8-byte entries)
//! 00000000000000000000.timeindex  sparse max timestamp -> offset (12-byte entries)
//! recovery-point-checkpoint       offsets below it are durable and were validated
//! log-start-offset-checkpoint     first readable offset
//! high-watermark-checkpoint       last known high watermark
//! leader-epoch-checkpoint         leader epoch -> first offset of that epoch
//! ```
//!
//! Invariants:
//! - `log_start_offset <= high_watermark <= log_end_offset`.
//! - Segments are contiguous: each segment's base offset is the previous one's
//!   end offset; only the last (active) segment is written.
//! - Every byte handed out by [`Log::read`] lies below the segment's valid size
//!   and was validated when written or recovered; batches are CRC-checked again
//!   when read only if `verify_on_read` is set (off by default: readers check
//!   each batch's CRC themselves).
//! - Logs and indexes are memory-mapped; the active segment's files get real
//!   blocks (fallocate, in steps) before anything is written into them, so a
//!   full disk is an error from the allocation, never a hole in the map.

mod checkpoint;
mod cleaner;
mod clock;
mod config;
mod error;
pub(crate) mod fs;
mod group_commit;
mod index;
mod log;
mod offset;
pub mod page_cache;
mod producer_snapshot;
pub mod producer_state;
mod scan;
mod segment;
#[cfg(test)]
pub(crate) mod testfs;
mod writeback;

pub use checkpoint::{CheckpointSnapshot, Checkpoints, EpochEntry, LeaderEpochCache, RecoveryPointSnapshot};
pub use cleaner::{CleanOutcome, Cleaner, CleanerConfig, LogAccess};
pub use clock::{Clock, ManualClock, SystemClock};
pub use config::{Compaction, FlushPolicy, LogConfig};
pub use error::StorageError;
pub use group_commit::GroupCommit;
pub use log::{
    AppendInfo, CleanStats, Log, RECOVERY_POINT_WRITE_INTERVAL_MS, ReadResult, RemovedSegments, RetentionOutcome,
    SyncPlan,
};
pub use offset::Offset;
pub use scan::{SegmentBatch, SegmentScan, scan_segment_file};
pub use writeback::Writeback;

/// Result type of this module.
pub type Result<T, E = StorageError> = std::result::Result<T, E>;
