//! Walking a segment file batch by batch, for `tally dump-log`.

use std::fs::File;
use std::path::Path;

use bytes::Bytes;
use tally_proto::batch::{BatchError, BatchHeader, HEADER_LEN, RecordBatch};

use super::Result;
use super::error::io_err;

/// One batch as `tally dump-log` shows it.
#[derive(Debug, Clone)]
pub struct SegmentBatch {
    /// Byte position in the file.
    pub position: u64,
    /// Total size in bytes.
    pub size: u64,
    /// First offset.
    pub base_offset: i64,
    /// Last offset.
    pub last_offset: i64,
    /// Records.
    pub record_count: i32,
    /// Leader epoch.
    pub partition_leader_epoch: i32,
    /// First record timestamp.
    pub base_timestamp: i64,
    /// Largest record timestamp.
    pub max_timestamp: i64,
    /// Producer id.
    pub producer_id: i64,
    /// Compression codec id.
    pub compression: u8,
    /// `None` when the batch is valid, else why not.
    pub error: Option<BatchError>,
    /// The batch bytes (for printing records).
    pub bytes: Bytes,
}

/// Walks a segment file batch by batch, for inspection. Stops at the first
/// batch whose framing is unreadable (reported with its error) or at a
/// zero-filled tail (preallocated space, not an error).
pub fn scan_segment_file(path: &Path) -> Result<Vec<SegmentBatch>> {
    let file = File::open(path).map_err(io_err("open", path))?;
    let len = file.metadata().map_err(io_err("stat", path))?.len();
    let data = if len == 0 {
        Bytes::new()
    } else {
        // SAFETY: a read-only map of a file that a running broker may still
        // append to; bytes past what it has written read as zeros or as a
        // torn batch, which the walk below reports as such.
        let map = unsafe { memmap2::Mmap::map(&file) }.map_err(io_err("mmap", path))?;
        Bytes::from_owner(map)
    };
    let mut out = Vec::new();
    let mut position = 0usize;
    while position < data.len() {
        let rest = &data[position..];
        if rest.iter().take(HEADER_LEN).all(|&b| b == 0) {
            break;
        }
        let header = match BatchHeader::new(rest) {
            Ok(h) => h,
            Err(e) => {
                out.push(broken(position, rest.len(), e));
                break;
            }
        };
        let total = header.total_size();
        if total < HEADER_LEN as i64 || total as usize > rest.len() {
            out.push(broken(position, rest.len(), BatchError::LengthMismatch { declared: total, actual: rest.len() }));
            break;
        }
        let bytes = data.slice(position..position + total as usize);
        let error = RecordBatch::check_framing(bytes.clone()).err();
        out.push(SegmentBatch {
            position: position as u64,
            size: total as u64,
            base_offset: header.base_offset(),
            last_offset: header.last_offset(),
            record_count: header.record_count(),
            partition_leader_epoch: header.partition_leader_epoch(),
            base_timestamp: header.base_timestamp(),
            max_timestamp: header.max_timestamp(),
            producer_id: header.producer_id(),
            compression: header.compression(),
            error,
            bytes,
        });
        position += total as usize;
    }
    Ok(out)
}

fn broken(position: usize, available: usize, error: BatchError) -> SegmentBatch {
    SegmentBatch {
        position: position as u64,
        size: available as u64,
        base_offset: -1,
        last_offset: -1,
        record_count: 0,
        partition_leader_epoch: -1,
        base_timestamp: -1,
        max_timestamp: -1,
        producer_id: -1,
        compression: 0,
        error: Some(error),
        bytes: Bytes::new(),
    }
}
