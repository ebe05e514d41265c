//! One segment: a `.log` file of record batches and its two indexes.
//!
//! Appends copy a batch into the memory map at the segment's end and patch its
//! base offset and leader epoch there (bytes the CRC does not cover). Reads
//! hand out [`Bytes`] that share the map. The active segment's files are
//! preallocated; closing a segment trims them to their contents.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use bytes::Bytes;
use memmap2::MmapRaw;
use tally_proto::batch::{self, BatchError, BatchHeader, HEADER_LEN, RecordBatch};

use super::checkpoint::LeaderEpochCache;
use super::error::io_err;
use super::fs::{map, open_rw, preallocate, pwrite_all, remove_if_exists};
use super::index::{IndexFile, OffsetIndex, TimeIndex};
use super::writeback::Writeback;
use super::{Result, StorageError};

/// Bytes of `.log` allocated at a time as the active segment fills, so an
/// idle partition does not reserve a whole `segment_bytes` of disk.
pub(crate) const LOG_ALLOCATION_STEP: u64 = 32 << 20;

/// File name of a segment file: the base offset, 20 digits, and `ext`.
pub(crate) fn file_name(base_offset: u64, ext: &str) -> String {
    format!("{base_offset:020}.{ext}")
}

/// A mapped region that owns its mapping, so `Bytes` can slice it.
struct MapSlice {
    map: Arc<MmapRaw>,
    len: usize,
}

impl AsRef<[u8]> for MapSlice {
    fn as_ref(&self) -> &[u8] {
        // SAFETY: len never exceeds the written size of the segment, which
        // is inside the mapping; bytes below it are not written again except
        // by a truncation, which only zeroes them.
        unsafe { std::slice::from_raw_parts(self.map.as_ptr(), self.len) }
    }
}

/// Options for opening or creating a segment.
#[derive(Debug, Clone, Copy)]
pub(crate) struct SegmentSizes {
    /// Bytes to preallocate for the active `.log`.
    pub(crate) log_bytes: u64,
    /// Bytes to preallocate for each active index.
    pub(crate) index_bytes: u64,
}

#[derive(Debug)]
pub(crate) struct Segment {
    base_offset: u64,
    path: PathBuf,
    file: Arc<File>,
    map: Option<Arc<MmapRaw>>,
    /// Most bytes the segment may hold: the length of its map.
    capacity: u64,
    /// Bytes of the file with real blocks (the file's length); appends
    /// allocate ahead in steps of [`LOG_ALLOCATION_STEP`].
    allocated: u64,
    size: u64,
    next_offset: u64,
    max_timestamp: i64,
    offset_of_max_timestamp: u64,
    offset_index: OffsetIndex,
    time_index: TimeIndex,
    bytes_since_index: u64,
    created_ms: i64,
    /// Writeback was started for bytes below this.
    written_back: u64,
    /// Bytes below this were dropped from the page cache.
    dropped: u64,
}

impl Segment {
    /// Creates an empty active segment at `base_offset`.
    pub(crate) fn create(dir: &Path, base_offset: u64, sizes: SegmentSizes, now_ms: i64) -> Result<Segment> {
        let path = dir.join(file_name(base_offset, "log"));
        let result = Self::create_files(dir, &path, base_offset, sizes, now_ms);
        if result.is_err() {
            // Leave no half-made segment behind (disk full, say).
            for ext in ["log", "index", "timeindex"] {
                let _ = std::fs::remove_file(dir.join(file_name(base_offset, ext)));
            }
        }
        result
    }

    fn create_files(dir: &Path, path: &Path, base_offset: u64, sizes: SegmentSizes, now_ms: i64) -> Result<Segment> {
        let file = open_rw(path)?;
        file.set_len(0).map_err(io_err("truncate", path))?;
        let first_step = LOG_ALLOCATION_STEP.min(sizes.log_bytes);
        preallocate(&file, first_step, path)?;
        // The map covers the whole segment; only allocated bytes are ever read.
        let map = map(&file, sizes.log_bytes, path)?.map(Arc::new);
        let (offset_index, time_index) = open_indexes(dir, base_offset, Some(sizes.index_bytes), false)?;
        let indexes = (offset_index, time_index);
        let mut segment = Segment::new(base_offset, path.to_path_buf(), file, map, sizes.log_bytes, indexes, now_ms);
        segment.allocated = first_step;
        Ok(segment)
    }

    /// Opens an existing segment mapped at its file length. Nothing is
    /// trusted yet: call [`Segment::load_trusted`] (with `recover_index_bytes`
    /// `None`: the index files are read as they are) or [`Segment::recover`]
    /// (with `Some`: the indexes get room to be rebuilt).
    pub(crate) fn open(dir: &Path, base_offset: u64, now_ms: i64, recover_index_bytes: Option<u64>) -> Result<Segment> {
        let path = dir.join(file_name(base_offset, "log"));
        let file = open_rw(&path)?;
        let len = file.metadata().map_err(io_err("stat", &path))?.len();
        let map = map(&file, len, &path)?.map(Arc::new);
        let keep = recover_index_bytes.is_none();
        let (offset_index, time_index) = open_indexes(dir, base_offset, recover_index_bytes, keep)?;
        Ok(Segment::new(base_offset, path, file, map, len, (offset_index, time_index), now_ms))
    }

    /// A segment with no batches accounted for yet.
    fn new(
        base_offset: u64,
        path: PathBuf,
        file: File,
        map: Option<Arc<MmapRaw>>,
        capacity: u64,
        (offset_index, time_index): (OffsetIndex, TimeIndex),
        created_ms: i64,
    ) -> Segment {
        Segment {
            base_offset,
            path,
            file: Arc::new(file),
            map,
            capacity,
            allocated: capacity,
            size: 0,
            next_offset: base_offset,
            max_timestamp: i64::MIN,
            offset_of_max_timestamp: base_offset,
            offset_index,
            time_index,
            bytes_since_index: 0,
            created_ms,
            written_back: 0,
            dropped: 0,
        }
    }

    /// True when `position` lies in what write-behind dropped from the cache.
    pub(crate) fn is_dropped(&self, position: u64) -> bool {
        position < self.dropped
    }

    pub(crate) fn base_offset(&self) -> u64 {
        self.base_offset
    }

    pub(crate) fn next_offset(&self) -> u64 {
        self.next_offset
    }
    pub(crate) fn size(&self) -> u64 {
        self.size
    }
    pub(crate) fn is_empty(&self) -> bool {
        self.size == 0
    }
    pub(crate) fn max_timestamp(&self) -> Option<i64> {
        (self.max_timestamp != i64::MIN).then_some(self.max_timestamp)
    }
    pub(crate) fn created_ms(&self) -> i64 {
        self.created_ms
    }
    pub(crate) fn path(&self) -> &Path {
        &self.path
    }
    /// The `.log` file.
    pub(crate) fn log_file(&self) -> &Arc<File> {
        &self.file
    }

    pub(crate) fn files(&self) -> [Arc<File>; 3] {
        [self.file.clone(), self.offset_index.file.file().clone(), self.time_index.file.file().clone()]
    }

    /// True when `len` more bytes or another index entry may not fit.
    pub(crate) fn is_full_for(&self, len: u64, last_offset: u64) -> bool {
        self.size + len > self.capacity
            || self.offset_index.file.is_full()
            || self.time_index.file.is_full()
            || last_offset - self.base_offset > u64::from(u32::MAX)
    }

    fn bytes(&self, position: u64, len: u64) -> &[u8] {
        debug_assert!(position + len <= self.size.max(self.capacity));
        match &self.map {
            // SAFETY: callers stay inside the mapping (see debug_assert).
            Some(m) => unsafe { std::slice::from_raw_parts(m.as_ptr().add(position as usize), len as usize) },
            None => &[],
        }
    }

    /// A zero-copy slice of written bytes.
    pub(crate) fn slice(&self, position: u64, len: u64) -> Bytes {
        debug_assert!(position + len <= self.size);
        match &self.map {
            Some(m) => {
                let owner = MapSlice { map: m.clone(), len: (position + len) as usize };
                Bytes::from_owner(owner).slice(position as usize..)
            }
            None => Bytes::new(),
        }
    }

    /// The header of the batch at `position`, if a whole header lies below
    /// `limit` and its declared size fits too.
    fn header_at(&self, position: u64, limit: u64) -> Option<HeaderInfo> {
        if position + HEADER_LEN as u64 > limit {
            return None;
        }
        let header = BatchHeader::new(self.bytes(position, HEADER_LEN as u64)).ok()?;
        let total = header.total_size();
        let fits = total >= HEADER_LEN as i64 && position + total as u64 <= limit && header.magic() == batch::MAGIC;
        fits.then(|| HeaderInfo {
            base_offset: header.base_offset(),
            last_offset: header.last_offset(),
            total: total as u64,
            max_timestamp: header.max_timestamp(),
        })
    }

    /// The write-behind work that appends since the last call made due (see
    /// [`LogConfig::writeback_window_bytes`](super::LogConfig)), or `None`.
    pub(crate) fn take_writeback(&mut self, window: u64) -> Option<Writeback> {
        if window == 0 {
            return None;
        }
        let complete = self.size / window * window;
        if complete <= self.written_back {
            return None;
        }
        let start = self.written_back..complete;
        let drop_to = complete.saturating_sub(window).max(self.dropped);
        let drop = self.dropped..drop_to;
        self.written_back = complete;
        self.dropped = drop_to;
        Some(Writeback { file: self.file.clone(), map: self.map.clone(), start, drop })
    }

    /// Makes sure the file has real blocks up to `end`, allocating a step
    /// ahead. A full disk fails here, before anything is written.
    fn allocate_to(&mut self, end: u64) -> Result<()> {
        if end <= self.allocated {
            return Ok(());
        }
        let target = end.max(self.allocated + LOG_ALLOCATION_STEP).min(self.capacity.max(end));
        preallocate(&self.file, target, &self.path)?;
        self.allocated = target;
        Ok(())
    }

    /// Writes `batch` at the end with `base_offset` and `epoch` patched in.
    /// The write goes through the page cache with one `pwritev` (the patched
    /// header from the stack, the rest from the batch), so a full disk is an
    /// error, never a SIGBUS, and readers of the shared map see the bytes.
    pub(crate) fn append(&mut self, batch: &RecordBatch, base_offset: u64, epoch: i32, interval: u64) -> Result<()> {
        let len = batch.len() as u64;
        debug_assert!(self.size + len <= self.capacity);
        let position = self.size;
        self.allocate_to(position + len)?;
        let bytes = batch.bytes();
        let mut header = [0u8; HEADER_LEN];
        header.copy_from_slice(&bytes[..HEADER_LEN]);
        batch::set_base_offset(&mut header, base_offset as i64);
        batch::set_partition_leader_epoch(&mut header, epoch);
        pwrite_all(&self.file, &[&header, &bytes[HEADER_LEN..]], position).map_err(io_err("write", &self.path))?;
        let h = batch.header();
        let last_offset = base_offset + h.last_offset_delta() as u64;
        self.track(position, len, base_offset, last_offset, h.max_timestamp(), interval);
        Ok(())
    }

    /// Index and timestamp bookkeeping for a batch now at `position`.
    fn track(&mut self, position: u64, len: u64, base_offset: u64, last_offset: u64, max_ts: i64, interval: u64) {
        if max_ts > self.max_timestamp {
            self.max_timestamp = max_ts;
            self.offset_of_max_timestamp = last_offset;
        }
        if self.bytes_since_index >= interval && !self.offset_index.file.is_full() {
            self.offset_index.push(base_offset, position as u32);
            self.time_index.maybe_push(self.max_timestamp, self.offset_of_max_timestamp);
            self.bytes_since_index = 0;
        }
        self.bytes_since_index += len;
        self.size = position + len;
        self.next_offset = last_offset + 1;
    }

    /// Position of the batch holding `offset` (or the first after it), or
    /// `None` when the segment ends first.
    pub(crate) fn find_position(&self, offset: u64) -> Result<Option<u64>> {
        let mut position = u64::from(self.offset_index.lookup(offset));
        while position < self.size {
            let header = self.header_at(position, self.size).ok_or_else(|| self.corrupt_header(position))?;
            if header.last_offset() >= offset as i64 {
                return Ok(Some(position));
            }
            position += header.total_size() as u64;
        }
        Ok(None)
    }

    /// Base offset of the batch holding `offset`, if the segment has it.
    pub(crate) fn batch_base_holding(&self, offset: u64) -> Result<Option<u64>> {
        let Some(position) = self.find_position(offset)? else {
            return Ok(None);
        };
        let h = self.header_at(position, self.size).ok_or_else(|| self.corrupt_header(position))?;
        Ok(Some(h.base_offset() as u64))
    }

    fn corrupt_header(&self, position: u64) -> StorageError {
        let available = (self.size - position) as usize;
        StorageError::Corrupt {
            path: self.path.clone(),
            position,
            reason: BatchError::Truncated { needed: HEADER_LEN, available },
        }
    }

    /// Whole batches from `position`, stopping before a batch that would make
    /// the total exceed `max_bytes` (the first batch is always taken when
    /// `take_first`) or that reaches `upper` (exclusive). Returns the slice
    /// and the offset after its last batch.
    pub(crate) fn read_from(
        &self,
        position: u64,
        max_bytes: u64,
        upper: u64,
        take_first: bool,
        verify: bool,
    ) -> Result<Option<(Bytes, u64)>> {
        let mut end = position;
        let mut next = None;
        while end < self.size {
            let header = self.header_at(end, self.size).ok_or_else(|| self.corrupt_header(end))?;
            if header.last_offset() as u64 >= upper {
                break;
            }
            let total = header.total_size() as u64;
            let first = end == position;
            if end - position + total > max_bytes && !(first && take_first) {
                break;
            }
            if verify {
                self.check_batch(end, total)?;
            }
            next = Some(header.next_offset() as u64);
            end += total;
        }
        Ok(next.map(|n| (self.slice(position, end - position), n)))
    }

    /// For a range just read: if write-behind is on (`window` > 0) and the
    /// range lies below what it keeps cached (the segment is closed, or the
    /// range is below the dropped mark), the work that drops it again once
    /// the reader has moved on. Reads of cold data then recycle page-cache
    /// pages instead of growing the cache.
    pub(crate) fn cold_read(&self, position: u64, len: u64, window: u64, active: bool) -> Option<Writeback> {
        let end = position + len;
        let cold = window > 0 && (!active || end <= self.dropped);
        let page = 4096;
        let (start, end) = (position.div_ceil(page) * page, end / page * page);
        (cold && end > start).then(|| Writeback {
            file: self.file.clone(),
            map: self.map.clone(),
            start: 0..0,
            drop: start..end,
        })
    }

    /// Before reading `len` bytes at `position` of data write-behind no
    /// longer caches: ask the kernel to read that range and as much again
    /// after it, so one fetch waits on one large read instead of a page
    /// fault per readahead window, and the next fetch finds its data cached.
    pub(crate) fn read_ahead(&self, position: u64, len: u64, window: u64, active: bool) {
        let cold = window > 0 && (!active || position < self.dropped);
        let Some(map) = &self.map else { return };
        if !cold || position >= self.size {
            return;
        }
        let start = position / 4096 * 4096;
        let end = (position + len.saturating_mul(2)).min(self.size);
        // SAFETY: [start, end) lies inside the mapping; MADV_WILLNEED only
        // starts reads.
        unsafe {
            libc::madvise(map.as_mut_ptr().add(start as usize).cast(), (end - start) as usize, libc::MADV_WILLNEED)
        };
    }

    fn check_batch(&self, position: u64, total: u64) -> Result<()> {
        let bytes = self.bytes(position, total);
        let stored = BatchHeader::new(bytes).map(|h| h.crc()).unwrap_or(0);
        let computed = batch::compute_crc(bytes);
        if stored != computed {
            return Err(StorageError::Corrupt {
                path: self.path.clone(),
                position,
                reason: BatchError::CrcMismatch { stored, computed },
            });
        }
        Ok(())
    }

    /// First record offset at or after `timestamp` with its timestamp.
    pub(crate) fn offset_for_timestamp(&self, timestamp: i64, from_offset: u64) -> Result<Option<(u64, i64)>> {
        let start = self.time_index.last_offset_older_than(timestamp).map_or(from_offset, |o| (o + 1).max(from_offset));
        let Some(mut position) = self.find_position(start)? else {
            return Ok(None);
        };
        while position < self.size {
            let header = self.header_at(position, self.size).ok_or_else(|| self.corrupt_header(position))?;
            let total = header.total_size() as u64;
            if header.max_timestamp() >= timestamp && header.last_offset() >= start as i64 {
                let batch = RecordBatch::check_framing(self.slice(position, total))
                    .map_err(|reason| StorageError::Corrupt { path: self.path.clone(), position, reason })?;
                let compressed_or_append_time =
                    batch.header().compression() != 0 || batch.header().is_log_append_time();
                if compressed_or_append_time {
                    let offset = (header.base_offset() as u64).max(start);
                    return Ok(Some((offset, header.max_timestamp())));
                }
                let records = batch.records().map_err(|reason| StorageError::Corrupt {
                    path: self.path.clone(),
                    position,
                    reason,
                })?;
                for record in records {
                    let record =
                        record.map_err(|reason| StorageError::Corrupt { path: self.path.clone(), position, reason })?;
                    if record.timestamp >= timestamp && record.offset as u64 >= start {
                        return Ok(Some((record.offset as u64, record.timestamp)));
                    }
                }
            }
            position += total;
        }
        Ok(None)
    }

    /// Removes batches at and after the one holding `offset`. The cut bytes
    /// are zeroed so a later recovery cannot mistake them for data.
    pub(crate) fn truncate_to(&mut self, offset: u64) -> Result<()> {
        let Some(position) = self.find_position(offset)? else {
            return Ok(());
        };
        let cut_offset = self
            .header_at(position, self.size)
            .map(|h| h.base_offset() as u64)
            .ok_or_else(|| self.corrupt_header(position))?;
        if let Some(map) = &self.map {
            // SAFETY: [position, size) lies inside the mapping.
            unsafe {
                std::ptr::write_bytes(map.as_mut_ptr().add(position as usize), 0, (self.size - position) as usize)
            };
        }
        self.size = position;
        self.next_offset = cut_offset;
        self.offset_index.truncate_to_position(position as u32);
        self.time_index.truncate_to_offset(cut_offset);
        self.recompute_max_timestamp()?;
        Ok(())
    }

    fn recompute_max_timestamp(&mut self) -> Result<()> {
        self.max_timestamp = i64::MIN;
        self.offset_of_max_timestamp = self.base_offset;
        let mut position = 0;
        while position < self.size {
            let h = self.header_at(position, self.size).ok_or_else(|| self.corrupt_header(position))?;
            if h.max_timestamp() > self.max_timestamp {
                self.max_timestamp = h.max_timestamp();
                self.offset_of_max_timestamp = h.last_offset() as u64;
            }
            position += h.total_size() as u64;
        }
        Ok(())
    }

    /// Loads a closed segment that lies below the recovery point: its
    /// contents are trusted, but the end is found by walking headers from the
    /// last index entry, and indexes that do not look sane are rebuilt.
    pub(crate) fn load_trusted(&mut self, interval: u64) -> Result<()> {
        let file_len = self.capacity;
        let index_ok = self.offset_index.is_sane(file_len);
        if !index_ok {
            self.offset_index.file.truncate_entries(0);
            self.time_index.file.truncate_entries(0);
        }
        let (mut position, mut next) = match self.offset_index.last() {
            Some((offset, pos)) if index_ok => (u64::from(pos), offset),
            _ => (0, self.base_offset),
        };
        while let Some(h) = self.header_at(position, file_len) {
            let total = h.total_size() as u64;
            if !index_ok {
                let last = h.last_offset() as u64;
                self.size = position;
                self.track(position, total, h.base_offset() as u64, last, h.max_timestamp(), interval);
            }
            next = h.next_offset() as u64;
            position += total;
        }
        self.size = position;
        self.next_offset = next.max(self.base_offset);
        if !self.time_index.is_sane(self.next_offset) {
            self.time_index.file.truncate_entries(0);
        }
        self.recompute_max_timestamp_from_time_index()?;
        if self.size < file_len {
            self.file.set_len(self.size).map_err(io_err("truncate", &self.path))?;
            self.capacity = self.size;
            self.allocated = self.size;
        }
        Ok(())
    }

    fn recompute_max_timestamp_from_time_index(&mut self) -> Result<()> {
        // Closing appends the segment's max timestamp to the time index, so
        // the last entry is usually exact; walk the tail after it to be sure.
        let Some((ts, offset)) = self.time_index.last() else {
            return self.recompute_max_timestamp();
        };
        self.max_timestamp = ts;
        self.offset_of_max_timestamp = offset;
        let Some(mut position) = self.find_position(offset)? else {
            return Ok(());
        };
        while let Some(h) = self.header_at(position, self.size) {
            if h.max_timestamp() > self.max_timestamp {
                self.max_timestamp = h.max_timestamp();
                self.offset_of_max_timestamp = h.last_offset() as u64;
            }
            position += h.total_size() as u64;
        }
        Ok(())
    }

    /// Validates every batch (framing, CRC, contiguous offsets from
    /// `expected_offset`), rebuilding the indexes and leader epochs, and cuts
    /// the file where valid batches end. With `check_tail`, reports whether
    /// what was cut was only zeros (preallocated space, not corruption).
    pub(crate) fn recover(
        &mut self,
        expected_offset: u64,
        epochs: &mut LeaderEpochCache,
        interval: u64,
        check_tail: bool,
    ) -> Result<Recovered> {
        self.offset_index.file.truncate_entries(0);
        self.time_index.file.truncate_entries(0);
        self.max_timestamp = i64::MIN;
        self.bytes_since_index = 0;
        self.size = 0;
        self.next_offset = expected_offset;
        let file_len = self.capacity;
        let mut position = 0u64;
        let mut expected = expected_offset;
        while position < file_len {
            let head = self.bytes(position, (file_len - position).min(12));
            let Some(total) = batch_size_at_checked(head, file_len - position) else {
                break;
            };
            let Ok(h) = batch::check_framing_slice(self.bytes(position, total)) else {
                break;
            };
            if h.base_offset() != expected as i64 || h.last_offset_delta() < 0 || h.record_count() <= 0 {
                break;
            }
            let epoch = h.partition_leader_epoch();
            let (last, max_ts) = (h.last_offset() as u64, h.max_timestamp());
            if epoch >= 0 {
                epochs.assign(epoch as u32, super::Offset(expected));
            }
            self.track(position, total, expected, last, max_ts, interval);
            expected = last + 1;
            position += total;
        }
        let zero_tail = !check_tail || self.bytes(position, file_len - position).iter().all(|&b| b == 0);
        let cut_bytes = file_len - position;
        if cut_bytes > 0 {
            self.file.set_len(position).map_err(io_err("truncate", &self.path))?;
            self.map = map(&self.file, position, &self.path)?.map(Arc::new);
            self.capacity = position;
            self.allocated = position;
        }
        Ok(Recovered { cut_bytes, zero_tail })
    }

    /// Makes this the active segment: preallocates room for appends and maps it.
    pub(crate) fn make_active(&mut self, sizes: SegmentSizes) -> Result<()> {
        // Never shrink here: readers may hold slices of the current map, and
        // bytes past `size` are zeros already (preallocated, zeroed by a
        // truncation, or cut away by recovery).
        let capacity = sizes.log_bytes.max(self.size).max(self.capacity);
        self.map = map(&self.file, capacity, &self.path)?.map(Arc::new);
        self.capacity = capacity;
        let entries = sizes.index_bytes;
        self.offset_index
            .file
            .make_writable(entries.max((self.offset_index.file.len() * OffsetIndex::ENTRY) as u64 + 8 * 64))?;
        self.time_index
            .file
            .make_writable(entries.max((self.time_index.file.len() * TimeIndex::ENTRY) as u64 + 12 * 64))?;
        Ok(())
    }

    /// Grows an empty active segment so one batch of `len` bytes fits.
    pub(crate) fn grow_for(&mut self, len: u64) -> Result<()> {
        debug_assert!(self.size + len > self.capacity);
        let capacity = self.size + len;
        preallocate(&self.file, capacity, &self.path)?;
        self.map = map(&self.file, capacity, &self.path)?.map(Arc::new);
        self.capacity = capacity;
        self.allocated = capacity;
        Ok(())
    }

    /// Closes the segment for appends: final time-index entry, files trimmed
    /// to their contents.
    pub(crate) fn close(&mut self) -> Result<()> {
        if self.max_timestamp != i64::MIN {
            self.time_index.maybe_push(self.max_timestamp, self.offset_of_max_timestamp);
        }
        self.file.set_len(self.size).map_err(io_err("truncate", &self.path))?;
        self.capacity = self.size;
        self.allocated = self.size;
        self.offset_index.file.trim()?;
        self.time_index.file.trim()?;
        Ok(())
    }

    /// Deletes the segment's files.
    pub(crate) fn delete(self) -> Result<()> {
        remove_if_exists(&self.path)?;
        remove_if_exists(self.offset_index.file.path())?;
        remove_if_exists(self.time_index.file.path())
    }
}

/// The header fields the segment walks by.
#[derive(Debug, Clone, Copy)]
struct HeaderInfo {
    base_offset: i64,
    last_offset: i64,
    total: u64,
    max_timestamp: i64,
}

impl HeaderInfo {
    fn base_offset(&self) -> i64 {
        self.base_offset
    }
    fn last_offset(&self) -> i64 {
        self.last_offset
    }
    fn next_offset(&self) -> i64 {
        self.last_offset + 1
    }
    fn total_size(&self) -> i64 {
        self.total as i64
    }
    fn max_timestamp(&self) -> i64 {
        self.max_timestamp
    }
}

/// What [`Segment::recover`] found.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Recovered {
    /// Bytes cut from the end of the file.
    pub(crate) cut_bytes: u64,
    /// True when the cut bytes were all zero (or not checked).
    pub(crate) zero_tail: bool,
}

fn batch_size_at_checked(head: &[u8], available: u64) -> Option<u64> {
    let total = batch::batch_size_at(head)? as u64;
    (total >= HEADER_LEN as u64 && total <= available).then_some(total)
}

fn open_indexes(dir: &Path, base: u64, writable: Option<u64>, keep: bool) -> Result<(OffsetIndex, TimeIndex)> {
    let oi = IndexFile::open(&dir.join(file_name(base, "index")), OffsetIndex::ENTRY, writable, keep)?;
    let ti = IndexFile::open(&dir.join(file_name(base, "timeindex")), TimeIndex::ENTRY, writable, keep)?;
    Ok((OffsetIndex::new(oi, base), TimeIndex::new(ti, base)))
}
