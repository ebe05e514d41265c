//! One segment: a `.log` file of record batches and its two indexes.
//!
//! Appends write a batch at the segment's end with one `pwritev`, its base
//! offset and leader epoch patched (bytes the CRC does not cover). Reads hand
//! out [`Bytes`] that share the file's map. The active segment's files are
//! preallocated; closing a segment trims them to their contents.
//!
//! Invariant: no byte a reader may hold ever changes or goes away. Bytes
//! below `size` are written once; a truncation ([`Segment::seal_at`]) only
//! lowers the segment's logical end and leaves the bytes after it in place
//! (the log starts a new file for what comes next), and no `set_len` at run
//! time cuts below `keep_len`, the most the segment ever handed out. On disk
//! a segment ends where the next one begins: recovery ignores a stale tail
//! that a truncation left behind it.

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

/// Largest step of `.log` allocation: a busy partition allocates this much
/// at a time (one `fallocate` per 32 MiB written).
pub(crate) const LOG_ALLOCATION_STEP: u64 = 32 << 20;

/// First step of a new segment's `.log` allocation: what an idle partition
/// reserves. Each later step is as large as everything allocated so far (up
/// to [`LOG_ALLOCATION_STEP`]), so the steps follow the write rate: a busy
/// segment reaches 32 MiB steps after 64 MiB, an idle one stays at 64 KiB.
pub(crate) const LOG_FIRST_ALLOCATION: u64 = 64 << 10;

/// The page size residency is checked and ranges are dropped in.
fn page_size() -> u64 {
    static PAGE: std::sync::OnceLock<u64> = std::sync::OnceLock::new();
    // SAFETY: sysconf has no preconditions.
    *PAGE.get_or_init(|| {
        u64::try_from(unsafe { libc::sysconf(libc::_SC_PAGESIZE) }).ok().filter(|&p| p > 0).unwrap_or(4096)
    })
}

/// Least a read of data that is not cached asks the kernel to read ahead
/// (`MADV_WILLNEED`): enough in flight to keep a disk busy between fetches.
const READ_AHEAD_MIN: u64 = 8 << 20;

/// The next allocation target for a segment with `allocated` bytes of real
/// blocks that must reach `end`, within `capacity`.
fn allocation_target(allocated: u64, end: u64, capacity: u64) -> u64 {
    let step = allocated.clamp(LOG_FIRST_ALLOCATION, LOG_ALLOCATION_STEP);
    end.max(allocated + step).min(capacity.max(end))
}

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
        // is inside the mapping; bytes below it are never written again, and
        // the file is never cut below them while the process runs.
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
    /// allocate ahead in growing steps (see [`LOG_FIRST_ALLOCATION`]).
    allocated: u64,
    size: u64,
    /// The file is never cut below this while the process runs: the most
    /// bytes the segment held (readers may hold slices up to it), or a
    /// stale tail left by a truncation.
    keep_len: u64,
    next_offset: u64,
    max_timestamp: i64,
    offset_of_max_timestamp: u64,
    offset_index: OffsetIndex,
    time_index: TimeIndex,
    bytes_since_index: u64,
    created_ms: i64,
    /// Broker time of the last append (the file's mtime for a segment
    /// loaded from disk): what retention trusts over a record's timestamp.
    last_append_ms: i64,
    /// Writeback was started for bytes below this.
    written_back: u64,
    /// Bytes below this were dropped from the page cache.
    dropped: u64,
}

impl Segment {
    /// Creates an empty active segment at `base_offset`. Fails, touching
    /// nothing, if a `.log` of that name exists: a live file is never
    /// truncated to be reused (readers may hold its bytes).
    pub(crate) fn create(dir: &Path, base_offset: u64, sizes: SegmentSizes, now_ms: i64) -> Result<Segment> {
        Self::create_named(dir, base_offset, "", sizes, now_ms)
    }

    /// [`Segment::create`] with `suffix` after each file's extension
    /// (`.log.cleaned`, ...): a segment the cleaner builds beside the live
    /// ones, which no open of the log takes for a segment.
    pub(crate) fn create_named(
        dir: &Path,
        base_offset: u64,
        suffix: &str,
        sizes: SegmentSizes,
        now_ms: i64,
    ) -> Result<Segment> {
        let path = dir.join(file_name(base_offset, &format!("log{suffix}")));
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(&path)
            .map_err(io_err("create", &path))?;
        let result = Self::create_files(dir, &path, file, base_offset, suffix, sizes, now_ms);
        if result.is_err() {
            // Leave no half-made segment behind (disk full, say); the files
            // are ours: the `.log` did not exist before.
            for ext in ["log", "index", "timeindex"] {
                let _ = remove_if_exists(&dir.join(file_name(base_offset, &format!("{ext}{suffix}"))));
            }
        }
        result
    }

    fn create_files(
        dir: &Path,
        path: &Path,
        file: File,
        base_offset: u64,
        suffix: &str,
        sizes: SegmentSizes,
        now_ms: i64,
    ) -> Result<Segment> {
        // Index files without their `.log` belong to no segment.
        remove_if_exists(&dir.join(file_name(base_offset, &format!("index{suffix}"))))?;
        remove_if_exists(&dir.join(file_name(base_offset, &format!("timeindex{suffix}"))))?;
        let first_step = LOG_FIRST_ALLOCATION.min(sizes.log_bytes);
        preallocate(&file, first_step, path)?;
        // The map covers the whole segment; only allocated bytes are ever read.
        let map = map(&file, sizes.log_bytes, path)?.map(Arc::new);
        let (offset_index, time_index) = open_indexes(dir, base_offset, suffix, Some(sizes.index_bytes), false)?;
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
        let meta = file.metadata().map_err(io_err("stat", &path))?;
        let len = meta.len();
        let map = map(&file, len, &path)?.map(Arc::new);
        let keep = recover_index_bytes.is_none();
        let (offset_index, time_index) = open_indexes(dir, base_offset, "", recover_index_bytes, keep)?;
        let mut segment = Segment::new(base_offset, path, file, map, len, (offset_index, time_index), now_ms);
        segment.last_append_ms = mtime_ms(&meta).unwrap_or(now_ms);
        Ok(segment)
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
            keep_len: 0,
            next_offset: base_offset,
            max_timestamp: i64::MIN,
            offset_of_max_timestamp: base_offset,
            offset_index,
            time_index,
            bytes_since_index: 0,
            created_ms,
            last_append_ms: created_ms,
            written_back: 0,
            dropped: 0,
        }
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
    /// The time retention judges the segment by: its newest record's
    /// timestamp, but never later than the broker's time of its last append,
    /// so a record claiming a far-future timestamp cannot pin the segment.
    pub(crate) fn retention_time_ms(&self) -> i64 {
        self.max_timestamp().map_or(self.last_append_ms, |ts| ts.min(self.last_append_ms))
    }
    /// Broker time of the last append (the file's mtime once loaded).
    pub(crate) fn last_append_ms(&self) -> i64 {
        self.last_append_ms
    }
    pub(crate) fn set_last_append_ms(&mut self, ms: i64) {
        self.last_append_ms = ms;
    }
    pub(crate) fn path(&self) -> &Path {
        &self.path
    }
    /// The `.log` file.
    pub(crate) fn log_file(&self) -> &Arc<File> {
        &self.file
    }

    /// The `.log` and both index files, to sync (the indexes are opened
    /// now: they hold no descriptor otherwise).
    pub(crate) fn files(&self) -> Result<[Arc<File>; 3]> {
        Ok([self.file.clone(), self.offset_index.file.open_file()?, self.time_index.file.open_file()?])
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
            record_count: header.record_count(),
        })
    }

    /// The write-behind work that appends since the last call made due (see
    /// [`LogConfig::writeback_window_bytes`](super::LogConfig)), or `None`.
    pub(crate) fn take_writeback(&mut self, window: u64, cache_min_free_percent: u8) -> Option<Writeback> {
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
        Some(Writeback {
            file: self.file.clone(),
            map: self.map.clone(),
            start,
            drop,
            cache_min_free_percent,
            sync_drop: true,
        })
    }

    /// Makes sure the file has real blocks up to `end`, allocating a step
    /// ahead. A full disk fails here, before anything is written.
    fn allocate_to(&mut self, end: u64) -> Result<()> {
        if end <= self.allocated {
            return Ok(());
        }
        let target = allocation_target(self.allocated, end, self.capacity);
        preallocate(&self.file, target, &self.path)?;
        self.allocated = target;
        Ok(())
    }

    /// Writes `batch` at the end with `base_offset` and `epoch` patched in.
    /// The write goes through the page cache with one `pwritev` (the patched
    /// header from the stack, the rest from the batch), so a full disk is an
    /// error, never a SIGBUS, and readers of the shared map see the bytes.
    pub(crate) fn append(
        &mut self,
        batch: &RecordBatch,
        base_offset: u64,
        epoch: i32,
        interval: u64,
        now_ms: i64,
    ) -> Result<()> {
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
        self.last_append_ms = now_ms;
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
        self.keep_len = self.keep_len.max(self.size);
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
    /// range is below its two newest windows), the work that drops it again once
    /// the reader has moved on: out of this process's map always, out of the
    /// page cache while memory is short (`cache_min_free_percent`). A reader
    /// catching up from disk then recycles page-cache pages instead of
    /// growing the cache, unless there is memory to spare.
    pub(crate) fn cold_read(
        &self,
        position: u64,
        len: u64,
        window: u64,
        active: bool,
        cache_min_free_percent: u8,
    ) -> Option<Writeback> {
        let end = position + len;
        // What write-behind has dropped, or would have by now: everything
        // below the two newest windows (also after a restart, before any
        // append has run write-behind on the reopened segment).
        let cold_below = (self.size / window.max(1) * window).saturating_sub(window).max(self.dropped);
        let cold = window > 0 && (!active || end <= cold_below);
        let page = page_size();
        let (start, end) = (position.div_ceil(page) * page, end / page * page);
        (cold && end > start).then(|| Writeback {
            file: self.file.clone(),
            map: self.map.clone(),
            start: 0..0,
            drop: start..end,
            cache_min_free_percent,
            sync_drop: false,
        })
    }

    /// Before reading `len` bytes at `position`: if that range and the one
    /// after it are not both in the page cache, ask the kernel to read them
    /// (at least [`READ_AHEAD_MIN`]),
    /// so one fetch waits on one large read instead of a page fault per
    /// readahead window, and the next fetch finds its data cached or on its
    /// way (checking the next range too keeps one fetch's worth of reads
    /// always in flight, not every other fetch's).
    pub(crate) fn read_ahead(&self, position: u64, len: u64) {
        let Some(map) = &self.map else { return };
        if position >= self.size || self.resident(position, len.saturating_mul(2)) {
            return;
        }
        let page = page_size();
        let start = position / page * page;
        let end = (position + len.saturating_mul(2).max(READ_AHEAD_MIN)).min(self.size);
        // SAFETY: [start, end) lies inside the mapping; MADV_WILLNEED only
        // starts reads.
        unsafe {
            libc::madvise(map.as_mut_ptr().add(start as usize).cast(), (end - start) as usize, libc::MADV_WILLNEED)
        };
    }

    /// For a read of up to `len` bytes from the batch holding `offset`: the
    /// bytes of it that lie past this segment's end (read from the next
    /// segment), or `None` when some page of it here is not in the page
    /// cache. Touches no page of the segment (the position is the offset
    /// index's, at or before the batch), so asking never blocks on the disk.
    pub(crate) fn resident_from(&self, offset: u64, len: u64) -> Option<u64> {
        let position = u64::from(self.offset_index.lookup(offset));
        self.resident(position, len).then(|| (position + len).saturating_sub(self.size))
    }

    /// True when every page of `[position, position + len)` (within the
    /// segment's bytes) is in the page cache and read (a page whose read is
    /// still in flight counts as absent: touching it would wait on the
    /// disk). One `mincore` per 1024 pages asked about.
    fn resident(&self, position: u64, len: u64) -> bool {
        const PAGES_PER_CALL: usize = 1024;
        let Some(map) = &self.map else { return true };
        let end = position.saturating_add(len).min(self.size);
        if position >= end {
            return true;
        }
        let page = page_size();
        let mut at = position / page * page;
        let mut vec = [0u8; PAGES_PER_CALL];
        while at < end {
            let pages = ((end - at).div_ceil(page) as usize).min(PAGES_PER_CALL);
            // SAFETY: [at, at + pages pages) lies inside the mapping (below
            // `size` rounded up to a page, within its length); mincore only
            // reports residency, one byte per page into `vec`.
            let rc = unsafe {
                libc::mincore(map.as_mut_ptr().add(at as usize).cast(), pages * page as usize, vec.as_mut_ptr())
            };
            if rc != 0 || vec[..pages].iter().any(|v| v & 1 == 0) {
                return false;
            }
            at += pages as u64 * page;
        }
        true
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
                // Every record of a LogAppendTime batch has the batch's time
                // (and, unless compaction removed some, every offset a record).
                let whole = i64::from(header.record_count) == header.last_offset() - header.base_offset() + 1;
                if batch.header().is_log_append_time() && whole {
                    let offset = (header.base_offset() as u64).max(start);
                    return Ok(Some((offset, header.max_timestamp())));
                }
                // Compressed batches are decompressed: the answer is a record,
                // not a batch, as Kafka gives it.
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

    /// The largest batch max timestamp among batches that end below
    /// `upper`, with the base offset of the first batch carrying it.
    pub(crate) fn max_timestamp_below(&self, upper: u64) -> Result<Option<(i64, u64)>> {
        let mut best: Option<(i64, u64)> = None;
        let mut position = 0;
        while position < self.size {
            let header = self.header_at(position, self.size).ok_or_else(|| self.corrupt_header(position))?;
            if header.last_offset >= upper as i64 {
                break;
            }
            // A compaction filler holds no record to answer with.
            if header.record_count > 0 && best.is_none_or(|(ts, _)| header.max_timestamp > ts) {
                best = Some((header.max_timestamp, header.base_offset as u64));
            }
            position += header.total;
        }
        Ok(best)
    }

    /// Ends the segment before the batch holding `offset` and returns that
    /// batch's base offset (the new end), or `None` when the segment does
    /// not hold `offset`. The bytes after the new end stay as they are:
    /// readers may hold them. The caller starts the next segment at the
    /// returned offset, which is what marks the end on disk.
    pub(crate) fn seal_at(&mut self, offset: u64) -> Result<Option<u64>> {
        let Some(position) = self.find_position(offset)? else {
            return Ok(None);
        };
        let cut_offset = self
            .header_at(position, self.size)
            .map(|h| h.base_offset() as u64)
            .ok_or_else(|| self.corrupt_header(position))?;
        self.size = position;
        self.next_offset = cut_offset;
        self.offset_index.truncate_to_position(position as u32);
        self.time_index.truncate_to_offset(cut_offset);
        self.recompute_max_timestamp()?;
        // Write-behind bookkeeping must not point past the new end.
        self.written_back = self.written_back.min(position);
        self.dropped = self.dropped.min(position);
        Ok(Some(cut_offset))
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
    /// contents are trusted, but the end is found by walking headers from
    /// the last index entry (up to the first batch at or past `limit`, the
    /// next segment's base), and indexes that do not look sane are rebuilt.
    /// A walk that does not end cleanly is retried from the start, and if
    /// the segment still does not read back as whole batches, that is
    /// [`StorageError::CorruptBelowRecoveryPoint`]: trusted data is never
    /// cut.
    pub(crate) fn load_trusted(&mut self, interval: u64, limit: u64, recovery_point: u64) -> Result<()> {
        let file_len = self.capacity;
        let index_ok = self.offset_index.is_sane(file_len) && self.offset_index.last().is_none_or(|(o, _)| o < limit);
        if !index_ok {
            self.offset_index.file.truncate_entries(0);
            self.time_index.file.truncate_entries(0);
        }
        let from = match self.offset_index.last() {
            Some((offset, pos)) if index_ok => (u64::from(pos), offset),
            _ => (0, self.base_offset),
        };
        let mut walk = self.walk_headers(from, limit, !index_ok, interval);
        if walk.damaged.is_some() && from.0 > 0 {
            // The index may point somewhere wrong: walk from the start.
            self.offset_index.file.truncate_entries(0);
            self.time_index.file.truncate_entries(0);
            walk = self.walk_headers((0, self.base_offset), limit, true, interval);
        }
        if let Some(position) = walk.damaged {
            let what = if self.bytes(position, file_len - position).iter().all(|&b| b == 0) {
                "zeros where batches should be"
            } else {
                "bytes that are not a valid batch header"
            };
            return Err(StorageError::CorruptBelowRecoveryPoint {
                path: self.path.clone(),
                position,
                recovery_point: super::Offset(recovery_point),
                what: what.to_string(),
            });
        }
        self.size = walk.end;
        self.keep_len = file_len;
        self.next_offset = walk.next.max(self.base_offset);
        if !self.time_index.is_sane(self.next_offset) {
            self.time_index.file.truncate_entries(0);
        }
        self.recompute_max_timestamp_from_time_index()?;
        Ok(())
    }

    /// Walks batch headers from `(position, offset)` until the file ends, a
    /// batch at or past `limit` starts (a stale tail), or a header does not
    /// parse (`damaged`). With `track`, indexes and timestamps are rebuilt.
    fn walk_headers(&mut self, (mut position, mut next): (u64, u64), limit: u64, track: bool, interval: u64) -> Walk {
        let file_len = self.capacity;
        if track {
            self.size = position;
            self.max_timestamp = i64::MIN;
            self.bytes_since_index = 0;
        }
        while position < file_len && next < limit {
            let Some(h) = self.header_at(position, file_len) else {
                return Walk { end: position, next, damaged: Some(position) };
            };
            if h.base_offset() as u64 != next {
                return Walk { end: position, next, damaged: Some(position) };
            }
            let total = h.total_size() as u64;
            if track {
                self.track(
                    position,
                    total,
                    h.base_offset() as u64,
                    h.last_offset() as u64,
                    h.max_timestamp(),
                    interval,
                );
            }
            next = h.next_offset() as u64;
            position += total;
        }
        Walk { end: position, next, damaged: None }
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

    /// Validates every batch (framing, CRC, record count, contiguous offsets
    /// from `expected_offset`), rebuilding the indexes and leader epochs,
    /// up to the first batch at or past `limit` (the next segment's base; a
    /// truncation leaves a stale tail before it). A batch's leader epoch
    /// must not go backwards and must match the entry of `checkpointed` (the
    /// epoch file as read at open) covering its offset; the cache is rebuilt
    /// from the batches only when that file held nothing. What ends the walk
    /// is reported, with whether it is damage to report rather than a torn
    /// tail; nothing is cut here (see [`Segment::cut_recovered_tail`]).
    pub(crate) fn recover(
        &mut self,
        expected_offset: u64,
        epochs: &mut LeaderEpochCache,
        checkpointed: &LeaderEpochCache,
        interval: u64,
        limit: u64,
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
        let mut stale = false;
        let mut damage = None;
        let mut previous_epoch = i32::MIN;
        while position < file_len {
            if expected >= limit {
                // The next segment starts here: what follows was truncated away.
                stale = !self.bytes(position, file_len - position).iter().all(|&b| b == 0);
                break;
            }
            let head = self.bytes(position, (file_len - position).min(12));
            let Some(total) = batch_size_at_checked(head, file_len - position) else {
                break;
            };
            let Ok(h) = batch::check_framing_slice(self.bytes(position, total)) else {
                break;
            };
            // A cleaned batch keeps its span with fewer records, or none
            // (the cleaner's fillers): the count is under the CRC, the
            // offsets are not and must continue exactly.
            let count_ok = h.record_count() >= 0 && i64::from(h.record_count()) <= i64::from(h.last_offset_delta()) + 1;
            if h.base_offset() != expected as i64 || !count_ok || h.last_offset() as u64 >= limit {
                break;
            }
            let base = expected;
            let epoch = h.partition_leader_epoch();
            let (last, max_ts) = (h.last_offset() as u64, h.max_timestamp());
            if epoch >= 0 {
                let covering = checkpointed.entries().iter().rev().find(|e| e.start_offset.get() <= base);
                let consistent = epoch >= previous_epoch && covering.is_none_or(|e| e.epoch == epoch as u32);
                if !consistent {
                    // partitionLeaderEpoch is outside the CRC: a flipped
                    // epoch must not enter the cache.
                    damage =
                        Some("a batch whose leader epoch goes backwards or disagrees with the leader-epoch checkpoint");
                    break;
                }
                previous_epoch = epoch;
                // With a checkpoint, the cache already holds this epoch (or
                // the batch lies below its first entry, before the log
                // start); without one (full recovery) it is rebuilt here.
                if checkpointed.entries().is_empty() {
                    epochs.assign(epoch as u32, super::Offset(base));
                }
            }
            self.track(position, total, base, last, max_ts, interval);
            expected = last + 1;
            position += total;
        }
        let tail = if position == file_len {
            Tail::None
        } else if stale {
            Tail::Stale
        } else if self.bytes(position, file_len - position).iter().all(|&b| b == 0) {
            Tail::Zeros
        } else {
            Tail::Damaged
        };
        let mut looks_torn = false;
        if tail == Tail::Damaged && damage.is_none() {
            let head = self.bytes(position, (file_len - position).min(12));
            let region_end = batch_size_at_checked(head, file_len - position)
                .map_or(file_len.min(position + HEADER_LEN as u64), |total| position + total);
            looks_torn = self.has_zero_sector(position, region_end);
            if !looks_torn && self.valid_batch_after(position + 1, file_len, expected) {
                damage = Some("a damaged batch (CRC, framing, offsets or record count) with valid batches after it");
            }
        }
        self.keep_len = self.capacity;
        Ok(Recovered { end: position, cut_bytes: file_len - position, tail, damage, looks_torn })
    }

    /// True when an aligned 512-byte sector that overlaps `[from, to)` by at
    /// least 16 bytes is all zeros there: the mark of a write that partly
    /// never reached the disk (unwritten blocks read back as zeros).
    fn has_zero_sector(&self, from: u64, to: u64) -> bool {
        const SECTOR: u64 = 512;
        let mut sector = from - from % SECTOR;
        while sector < to {
            let (a, b) = (sector.max(from), (sector + SECTOR).min(to));
            if b - a >= 16 && self.bytes(a, b - a).iter().all(|&x| x == 0) {
                return true;
            }
            sector += SECTOR;
        }
        false
    }

    /// True when a whole, CRC-valid batch with a base offset at or past
    /// `expected` starts anywhere in `[from, to)`. Runs only on damage.
    fn valid_batch_after(&self, from: u64, to: u64, expected: u64) -> bool {
        (from..to.saturating_sub(HEADER_LEN as u64)).any(|position| {
            let head = self.bytes(position, (to - position).min(12));
            batch_size_at_checked(head, to - position).is_some_and(|total| {
                batch::check_framing_slice(self.bytes(position, total))
                    .is_ok_and(|h| h.base_offset() >= 0 && h.base_offset() as u64 >= expected)
            })
        })
    }

    /// After [`Segment::recover`]: cuts a zero or damaged tail from the file
    /// (a stale tail stays). Runs at open, before any reader.
    pub(crate) fn cut_recovered_tail(&mut self, recovered: &Recovered) -> Result<()> {
        if matches!(recovered.tail, Tail::Zeros | Tail::Damaged) {
            let end = recovered.end;
            self.file.set_len(end).map_err(io_err("truncate", &self.path))?;
            self.map = map(&self.file, end, &self.path)?.map(Arc::new);
            self.capacity = end;
            self.allocated = end;
            self.keep_len = end;
        }
        Ok(())
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
    /// to their contents (never below `keep_len`).
    pub(crate) fn close(&mut self) -> Result<()> {
        if self.max_timestamp != i64::MIN {
            self.time_index.maybe_push(self.max_timestamp, self.offset_of_max_timestamp);
        }
        let keep = self.size.max(self.keep_len);
        if self.allocated > keep {
            self.file.set_len(keep).map_err(io_err("truncate", &self.path))?;
            self.allocated = keep;
        }
        self.capacity = self.size;
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
    record_count: i32,
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
    /// Byte position where valid batches end.
    pub(crate) end: u64,
    /// Bytes after `end` (cut from the file unless the tail is stale).
    pub(crate) cut_bytes: u64,
    /// What follows the valid batches.
    pub(crate) tail: Tail,
    /// Damage that no torn write explains, to report rather than cut: a
    /// batch whose CRC holds but whose leader epoch disagrees with the epoch
    /// cache or goes backwards, or a damaged batch with valid batches after
    /// it in this file.
    pub(crate) damage: Option<&'static str>,
    /// The damaged batch (when the tail is damaged) holds an aligned
    /// 512-byte sector of zeros: a write that partly never reached the disk.
    pub(crate) looks_torn: bool,
}

/// What follows a segment's last valid batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Tail {
    /// Nothing: the batches fill the file.
    None,
    /// Zeros: preallocated space, or a write that never reached the disk.
    Zeros,
    /// Batches at or past the next segment's base, left by a truncation.
    Stale,
    /// Bytes that are not a valid, contiguous batch: a torn write or damage.
    Damaged,
}

/// Where a header walk of a trusted segment ended.
#[derive(Debug, Clone, Copy)]
struct Walk {
    end: u64,
    next: u64,
    damaged: Option<u64>,
}

fn mtime_ms(meta: &std::fs::Metadata) -> Option<i64> {
    let since = meta.modified().ok()?.duration_since(std::time::UNIX_EPOCH).ok()?;
    i64::try_from(since.as_millis()).ok()
}

fn batch_size_at_checked(head: &[u8], available: u64) -> Option<u64> {
    let total = batch::batch_size_at(head)? as u64;
    (total >= HEADER_LEN as u64 && total <= available).then_some(total)
}

fn open_indexes(
    dir: &Path,
    base: u64,
    suffix: &str,
    writable: Option<u64>,
    keep: bool,
) -> Result<(OffsetIndex, TimeIndex)> {
    let oi =
        IndexFile::open(&dir.join(file_name(base, &format!("index{suffix}"))), OffsetIndex::ENTRY, writable, keep)?;
    let ti =
        IndexFile::open(&dir.join(file_name(base, &format!("timeindex{suffix}"))), TimeIndex::ENTRY, writable, keep)?;
    Ok((OffsetIndex::new(oi, base), TimeIndex::new(ti, base)))
}

#[cfg(test)]
mod tests {
    #[test]
    fn allocation_steps_double_from_64_kib_to_32_mib_and_stop_at_the_capacity() {
        let (mut allocated, mut steps) = (super::LOG_FIRST_ALLOCATION, Vec::new());
        while allocated < 200 << 20 {
            let next = super::allocation_target(allocated, allocated + 1, 1 << 30);
            steps.push((next - allocated) >> 10);
            allocated = next;
        }
        assert_eq!(steps[..10], [64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384, 32768]);
        assert!(steps[10..].iter().all(|s| *s == 32768));
        assert_eq!(super::allocation_target(10 << 20, 11 << 20, 12 << 20), 12 << 20, "capped at the capacity");
        assert_eq!(super::allocation_target(1 << 20, 50 << 20, 1 << 30), 50 << 20, "a large write gets what it needs");
    }
}
