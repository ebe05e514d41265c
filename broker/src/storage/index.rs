//! Sparse, memory-mapped indexes of one segment.
//!
//! - Offset index: 8-byte entries `(relative offset u32, position u32)`,
//!   big-endian, one per `index_interval_bytes` of batches; entry offsets are
//!   batch base offsets, strictly increasing, as are positions.
//! - Time index: 12-byte entries `(max timestamp so far i64, relative offset
//!   u32)` where the offset is the last offset of the batch that raised the
//!   segment's max timestamp; timestamps strictly increase.
//!
//! The active segment's index files are mapped at `segment_index_bytes` but
//! allocated on disk in steps of [`INDEX_ALLOCATION_STEP`] as entries arrive
//! (so a thousand idle partitions do not reserve 20 MiB each), and trimmed to
//! their entries when the segment is closed. The number of
//! entries is kept in memory; on open it comes from the file length (closed
//! segments) or from a rebuild (segments that recovery re-validates).

use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use memmap2::MmapRaw;

use super::Result;
use super::error::io_err;
use super::fs::{map, open_rw, preallocate};

/// Bytes of index file allocated at a time.
pub(crate) const INDEX_ALLOCATION_STEP: u64 = 16 << 10;

/// One mapped index file of fixed-size entries.
#[derive(Debug)]
pub(crate) struct IndexFile {
    path: PathBuf,
    map: Option<MmapRaw>,
    entry_len: usize,
    /// Most entries the map can hold.
    capacity: usize,
    /// Entries the file has real blocks for (stores beyond would hit a hole).
    allocated: usize,
    len: usize,
}

impl IndexFile {
    /// Opens `path`. With `writable_bytes`, the file is preallocated to that
    /// size for appends; otherwise it is mapped at its length and all of it
    /// is taken as entries.
    pub(crate) fn open(path: &Path, entry_len: usize, writable_bytes: Option<u64>, keep_entries: bool) -> Result<Self> {
        let file = open_rw(path)?;
        let file_len = file.metadata().map_err(io_err("stat", path))?.len();
        let existing = if keep_entries { usize::try_from(file_len).unwrap_or(0) / entry_len } else { 0 };
        let whole = |bytes: u64| bytes / entry_len as u64 * entry_len as u64;
        let (map_len, allocated_bytes) = match writable_bytes {
            Some(bytes) => {
                let first_step = whole(file_len.max(INDEX_ALLOCATION_STEP.min(bytes)));
                preallocate(&file, first_step, path)?;
                (whole(bytes.max(file_len)), first_step)
            }
            None => (whole(file_len), whole(file_len)),
        };
        let map = map(&file, map_len, path)?;
        let capacity = usize::try_from(map_len).unwrap_or(0) / entry_len;
        let allocated = usize::try_from(allocated_bytes).unwrap_or(0) / entry_len;
        // The map outlives the descriptor, which is closed here.
        drop(file);
        Ok(IndexFile { path: path.to_path_buf(), map, entry_len, capacity, allocated, len: existing.min(capacity) })
    }

    /// Allocates the next step of the file; false when the disk refuses
    /// (the entry is then skipped: indexes are sparse, lookups scan on).
    fn allocate_more(&mut self) -> bool {
        let step = (INDEX_ALLOCATION_STEP as usize / self.entry_len).max(1);
        let target = (self.allocated + step).min(self.capacity);
        if target <= self.allocated {
            return false;
        }
        let grown = self.open_file().and_then(|f| preallocate(&f, (target * self.entry_len) as u64, &self.path));
        if grown.is_err() {
            return false;
        }
        self.allocated = target;
        true
    }

    pub(crate) fn len(&self) -> usize {
        self.len
    }

    pub(crate) fn is_full(&self) -> bool {
        self.len >= self.capacity
    }

    /// The index file, opened now (it must exist: its segment is in the
    /// log), for a sync or a resize.
    pub(crate) fn open_file(&self) -> Result<Arc<File>> {
        std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&self.path)
            .map(Arc::new)
            .map_err(io_err("open", &self.path))
    }

    pub(crate) fn entry(&self, i: usize) -> &[u8] {
        debug_assert!(i < self.len);
        let map = self.map.as_ref().expect("entries imply a map");
        // SAFETY: i < len <= capacity, so the range lies inside the mapping.
        unsafe { std::slice::from_raw_parts(map.as_ptr().add(i * self.entry_len), self.entry_len) }
    }

    fn push(&mut self, entry: &[u8]) {
        debug_assert_eq!(entry.len(), self.entry_len);
        debug_assert!(!self.is_full());
        if self.len >= self.allocated && !self.allocate_more() {
            return;
        }
        let map = self.map.as_ref().expect("capacity implies a map");
        // SAFETY: len < capacity, so the destination lies inside the mapping;
        // nobody reads entries at or after len.
        unsafe {
            std::ptr::copy_nonoverlapping(
                entry.as_ptr(),
                map.as_mut_ptr().add(self.len * self.entry_len),
                self.entry_len,
            )
        };
        self.len += 1;
    }

    pub(crate) fn truncate_entries(&mut self, len: usize) {
        if len < self.len {
            let map = self.map.as_ref().expect("entries imply a map");
            // SAFETY: the zeroed range [len, self.len) lies inside the mapping.
            unsafe {
                std::ptr::write_bytes(map.as_mut_ptr().add(len * self.entry_len), 0, (self.len - len) * self.entry_len)
            };
            self.len = len;
        }
    }

    /// Shrinks the file to its entries (when the segment closes).
    pub(crate) fn trim(&mut self) -> Result<()> {
        let bytes = (self.len * self.entry_len) as u64;
        self.open_file()?.set_len(bytes).map_err(io_err("truncate", &self.path))?;
        self.capacity = self.len;
        self.allocated = self.len;
        Ok(())
    }

    /// Grows the file back to `bytes` for appends (when a closed segment
    /// becomes active again after a truncation).
    pub(crate) fn make_writable(&mut self, bytes: u64) -> Result<()> {
        let bytes = bytes / self.entry_len as u64 * self.entry_len as u64;
        let file = self.open_file()?;
        self.map = map(&file, bytes, &self.path)?;
        self.capacity = usize::try_from(bytes).unwrap_or(0) / self.entry_len;
        self.allocated = self.allocated.max(self.len).min(self.capacity);
        Ok(())
    }

    pub(crate) fn path(&self) -> &Path {
        &self.path
    }
}

/// Offset index of one segment.
#[derive(Debug)]
pub(crate) struct OffsetIndex {
    pub(crate) file: IndexFile,
    base_offset: u64,
}

impl OffsetIndex {
    pub(crate) const ENTRY: usize = 8;

    pub(crate) fn new(file: IndexFile, base_offset: u64) -> Self {
        OffsetIndex { file, base_offset }
    }

    fn get(&self, i: usize) -> (u64, u32) {
        let e = self.file.entry(i);
        let rel = u32::from_be_bytes([e[0], e[1], e[2], e[3]]);
        let pos = u32::from_be_bytes([e[4], e[5], e[6], e[7]]);
        (self.base_offset + u64::from(rel), pos)
    }

    /// Adds `offset -> position`. The caller keeps both increasing.
    pub(crate) fn push(&mut self, offset: u64, position: u32) {
        let rel = u32::try_from(offset - self.base_offset).expect("segment rolls before relative offsets overflow");
        let mut e = [0u8; Self::ENTRY];
        e[..4].copy_from_slice(&rel.to_be_bytes());
        e[4..].copy_from_slice(&position.to_be_bytes());
        self.file.push(&e);
    }

    /// Position of the last indexed batch whose base offset is <= `offset`
    /// (0 when there is none).
    pub(crate) fn lookup(&self, offset: u64) -> u32 {
        let n = self.file.len();
        // Binary search for the last entry with entry.offset <= offset.
        let (mut lo, mut hi) = (0usize, n);
        while lo < hi {
            let mid = (lo + hi) / 2;
            if self.get(mid).0 <= offset {
                lo = mid + 1;
            } else {
                hi = mid;
            }
        }
        if lo == 0 { 0 } else { self.get(lo - 1).1 }
    }

    /// Drops entries for batches at or after `position`.
    pub(crate) fn truncate_to_position(&mut self, position: u32) {
        let keep = (0..self.file.len()).take_while(|&i| self.get(i).1 < position).count();
        self.file.truncate_entries(keep);
    }

    /// Entries increase strictly and point below `size`.
    pub(crate) fn is_sane(&self, size: u64) -> bool {
        let mut prev: Option<(u64, u32)> = None;
        for i in 0..self.file.len() {
            let (o, p) = self.get(i);
            if u64::from(p) >= size || prev.is_some_and(|(po, pp)| po >= o || pp >= p) {
                return false;
            }
            prev = Some((o, p));
        }
        true
    }

    /// The last entry.
    pub(crate) fn last(&self) -> Option<(u64, u32)> {
        self.file.len().checked_sub(1).map(|i| self.get(i))
    }
}

/// Time index of one segment.
#[derive(Debug)]
pub(crate) struct TimeIndex {
    pub(crate) file: IndexFile,
    base_offset: u64,
}

impl TimeIndex {
    pub(crate) const ENTRY: usize = 12;

    pub(crate) fn new(file: IndexFile, base_offset: u64) -> Self {
        TimeIndex { file, base_offset }
    }

    fn get(&self, i: usize) -> (i64, u64) {
        let e = self.file.entry(i);
        let mut ts = [0u8; 8];
        ts.copy_from_slice(&e[..8]);
        let rel = u32::from_be_bytes([e[8], e[9], e[10], e[11]]);
        (i64::from_be_bytes(ts), self.base_offset + u64::from(rel))
    }

    /// Adds `timestamp -> offset` if the timestamp is larger than the last one.
    pub(crate) fn maybe_push(&mut self, timestamp: i64, offset: u64) {
        if self.file.is_full() || self.last().is_some_and(|(ts, _)| ts >= timestamp) {
            return;
        }
        let rel = u32::try_from(offset - self.base_offset).expect("segment rolls before relative offsets overflow");
        let mut e = [0u8; Self::ENTRY];
        e[..8].copy_from_slice(&timestamp.to_be_bytes());
        e[8..].copy_from_slice(&rel.to_be_bytes());
        self.file.push(&e);
    }

    /// The offset of the last entry whose timestamp is < `timestamp`: every
    /// record up to that offset is older than `timestamp`.
    pub(crate) fn last_offset_older_than(&self, timestamp: i64) -> Option<u64> {
        let (mut lo, mut hi) = (0usize, self.file.len());
        while lo < hi {
            let mid = (lo + hi) / 2;
            if self.get(mid).0 < timestamp {
                lo = mid + 1;
            } else {
                hi = mid;
            }
        }
        (lo > 0).then(|| self.get(lo - 1).1)
    }

    /// Drops entries for offsets at or after `offset`.
    pub(crate) fn truncate_to_offset(&mut self, offset: u64) {
        let keep = (0..self.file.len()).take_while(|&i| self.get(i).1 < offset).count();
        self.file.truncate_entries(keep);
    }

    /// Entries increase strictly in both fields and lie below `next_offset`.
    pub(crate) fn is_sane(&self, next_offset: u64) -> bool {
        let mut prev: Option<(i64, u64)> = None;
        for i in 0..self.file.len() {
            let (t, o) = self.get(i);
            if o >= next_offset || prev.is_some_and(|(pt, po)| pt >= t || po > o) {
                return false;
            }
            prev = Some((t, o));
        }
        true
    }

    /// The last entry.
    pub(crate) fn last(&self) -> Option<(i64, u64)> {
        self.file.len().checked_sub(1).map(|i| self.get(i))
    }
}
