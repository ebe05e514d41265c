//! Walking a segment file batch by batch, for `tally dump-log`.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use bytes::Bytes;
use tally_proto::batch::{BatchError, BatchHeader, HEADER_LEN, RecordBatch};

use super::error::io_err;
use super::{Result, StorageError};

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
///
/// The file is read with `pread`, one batch at a time, never mapped: a
/// running broker may shrink a segment (at close, or recovery), and a map of
/// the lost range would fault; a read past the new end is only short.
pub fn scan_segment_file(path: &Path) -> Result<SegmentScan> {
    let file = File::open(path).map_err(io_err("open", path))?;
    let len = file.metadata().map_err(io_err("stat", path))?.len();
    Ok(SegmentScan { file, path: path.to_path_buf(), len, position: 0, done: false })
}

/// The batches of one segment file, read as they are iterated.
#[derive(Debug)]
pub struct SegmentScan {
    file: File,
    path: PathBuf,
    len: u64,
    position: u64,
    done: bool,
}

impl SegmentScan {
    /// Reads up to `len` bytes at `position`; fewer if the file ends first.
    fn read(&self, position: u64, len: usize) -> Result<Vec<u8>> {
        let mut buf = vec![0u8; len];
        let mut filled = 0;
        while filled < len {
            match self.file.read_at(&mut buf[filled..], position + filled as u64) {
                Ok(0) => break,
                Ok(n) => filled += n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Err(io_err("read", &self.path)(e)),
            }
        }
        buf.truncate(filled);
        Ok(buf)
    }

    fn next_batch(&mut self) -> Result<Option<SegmentBatch>> {
        let position = self.position;
        let available = usize::try_from(self.len - position).unwrap_or(usize::MAX);
        let head = self.read(position, HEADER_LEN.min(available))?;
        if head.iter().all(|&b| b == 0) {
            return Ok(None);
        }
        let header = match BatchHeader::new(&head) {
            Ok(h) => h,
            Err(e) => return Ok(Some(broken(position, available, e))),
        };
        let total = header.total_size();
        if total < HEADER_LEN as i64 || total as u64 > self.len - position {
            let e = BatchError::LengthMismatch { declared: total, actual: available };
            return Ok(Some(broken(position, available, e)));
        }
        let data = self.read(position, total as usize)?;
        if data.len() < total as usize {
            let e = BatchError::Truncated { needed: total as usize, available: data.len() };
            return Ok(Some(broken(position, data.len(), e)));
        }
        let bytes = Bytes::from(data);
        let header = BatchHeader::new(&bytes).map_err(|reason| StorageError::Corrupt {
            path: self.path.clone(),
            position,
            reason,
        })?;
        let batch = SegmentBatch {
            position,
            size: total as u64,
            base_offset: header.base_offset(),
            last_offset: header.last_offset(),
            record_count: header.record_count(),
            partition_leader_epoch: header.partition_leader_epoch(),
            base_timestamp: header.base_timestamp(),
            max_timestamp: header.max_timestamp(),
            producer_id: header.producer_id(),
            compression: header.compression(),
            error: RecordBatch::check_framing(bytes.clone()).err(),
            bytes,
        };
        self.position += total as u64;
        Ok(Some(batch))
    }
}

impl Iterator for SegmentScan {
    type Item = Result<SegmentBatch>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.done || self.position >= self.len {
            return None;
        }
        match self.next_batch() {
            Ok(Some(batch)) => {
                self.done = batch.error.is_some() && batch.base_offset < 0;
                Some(Ok(batch))
            }
            Ok(None) => {
                self.done = true;
                None
            }
            Err(e) => {
                self.done = true;
                Some(Err(e))
            }
        }
    }
}

fn broken(position: u64, available: usize, error: BatchError) -> SegmentBatch {
    SegmentBatch {
        position,
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

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use tally_proto::batch::{BatchBuilder, BatchLimits, RecordRef};

    use super::*;
    use crate::storage::{Log, LogConfig, SystemClock};

    #[test]
    fn a_file_that_shrinks_while_scanned_reads_short_instead_of_faulting() {
        let dir = tempfile::tempdir().unwrap();
        let mut log = Log::open(dir.path(), LogConfig::default(), Arc::new(SystemClock)).unwrap();
        for i in 0..20u8 {
            let mut b = BatchBuilder::new();
            b.push(&RecordRef { timestamp: 1, value: Some(&[i; 300]), ..Default::default() });
            log.append(&RecordBatch::validate(b.finish(), &BatchLimits::default()).unwrap(), 0).unwrap();
        }
        log.close().unwrap();
        let path = dir.path().join("00000000000000000000.log");
        let full: Vec<_> = scan_segment_file(&path).unwrap().map(Result::unwrap).collect();
        assert_eq!(full.len(), 20);
        assert!(full.iter().all(|b| b.error.is_none()));
        let mut scan = scan_segment_file(&path).unwrap();
        let first = scan.next().unwrap().unwrap();
        // The broker cuts the file (recovery, say) while the scan goes on.
        std::fs::OpenOptions::new().write(true).open(&path).unwrap().set_len(first.size * 5 + 10).unwrap();
        let rest: Vec<_> = scan.map(Result::unwrap).collect();
        assert_eq!(rest.len(), 5, "four whole batches, then the torn one");
        assert!(rest[..4].iter().all(|b| b.error.is_none()));
        assert!(matches!(rest[4].error, Some(BatchError::Truncated { .. })), "{:?}", rest[4].error);
    }
}
