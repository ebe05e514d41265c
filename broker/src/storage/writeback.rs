//! Write-behind work for one segment, run outside the log's lock (see
//! `LogConfig::writeback_window_bytes`).

use std::fs::File;
use std::sync::Arc;

use memmap2::MmapRaw;

/// Write-behind work for one segment, run outside the log's lock: start
/// writeback of `start`, then wait for `drop` to be on disk and drop it from
/// this process's map, and from the page cache while memory is short (see
/// [`page_cache`](super::page_cache)). It changes no data: a reader that
/// touches a dropped range faults it back in from the cache or the file.
#[derive(Debug, Clone)]
pub struct Writeback {
    pub(crate) file: Arc<File>,
    pub(crate) map: Option<Arc<MmapRaw>>,
    pub(crate) start: std::ops::Range<u64>,
    pub(crate) drop: std::ops::Range<u64>,
    /// `LogConfig::cache_min_free_percent` of the log.
    pub(crate) cache_min_free_percent: u8,
    /// Write `drop` out and wait for it before dropping it (write-behind:
    /// its pages may be dirty). A read-side drop skips this and never
    /// waits on the disk: dirty pages simply stay cached.
    pub(crate) sync_drop: bool,
}

impl Writeback {
    /// Runs it. Blocks while the disk catches up with the dropped range.
    pub fn run(&self) -> std::io::Result<()> {
        use std::os::fd::AsRawFd;
        let fd = self.file.as_raw_fd();
        let range = |r: &std::ops::Range<u64>| -> std::io::Result<(libc::off64_t, libc::off64_t)> {
            let at = libc::off64_t::try_from(r.start).map_err(|_| std::io::Error::from_raw_os_error(libc::EFBIG))?;
            let len =
                libc::off64_t::try_from(r.end - r.start).map_err(|_| std::io::Error::from_raw_os_error(libc::EFBIG))?;
            Ok((at, len))
        };
        let check = |rc: libc::c_int| if rc == 0 { Ok(()) } else { Err(std::io::Error::last_os_error()) };
        if !self.start.is_empty() {
            let (at, len) = range(&self.start)?;
            // SAFETY: plain syscalls on a descriptor we own.
            check(unsafe { libc::sync_file_range(fd, at, len, libc::SYNC_FILE_RANGE_WRITE) })?;
        }
        if self.drop.is_empty() {
            return Ok(());
        }
        let (at, len) = range(&self.drop)?;
        if self.sync_drop {
            let wait =
                libc::SYNC_FILE_RANGE_WAIT_BEFORE | libc::SYNC_FILE_RANGE_WRITE | libc::SYNC_FILE_RANGE_WAIT_AFTER;
            // SAFETY: as above.
            check(unsafe { libc::sync_file_range(fd, at, len, wait) })?;
        }
        if let Some(map) = &self.map
            && self.drop.end <= map.len() as u64
        {
            // SAFETY: the range lies inside a shared file mapping; dropping
            // its pages only makes the next access fault them back in.
            unsafe { libc::madvise(map.as_mut_ptr().add(at as usize).cast(), len as usize, libc::MADV_DONTNEED) };
        }
        if !super::page_cache::should_drop(self.cache_min_free_percent) {
            // Memory to spare: the pages stay cached for the next reader
            // (out of this process's map, so they do not count as its RSS).
            return Ok(());
        }
        // SAFETY: as above.
        let rc = unsafe { libc::posix_fadvise(fd, at, len, libc::POSIX_FADV_DONTNEED) };
        if rc != 0 {
            return Err(std::io::Error::from_raw_os_error(rc));
        }
        Ok(())
    }
}
