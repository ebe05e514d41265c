//! File-system helpers: preallocation, directory fsync, atomic replacement,
//! and memory maps that tolerate empty files.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::fd::AsRawFd;
use std::path::Path;

use memmap2::{MmapOptions, MmapRaw};

use super::Result;
use super::error::io_err;

/// Opens (creating if needed) a file for reading and writing.
pub(crate) fn open_rw(path: &Path) -> Result<File> {
    OpenOptions::new().read(true).write(true).create(true).truncate(false).open(path).map_err(io_err("open", path))
}

/// Allocates real blocks for `[0, len)` so stores into a map of the file
/// cannot fail for lack of space (a sparse hole would SIGBUS on a full disk).
pub(crate) fn preallocate(file: &File, len: u64, path: &Path) -> Result<()> {
    let len_i64 =
        i64::try_from(len).map_err(|_| super::StorageError::InvalidArgument(format!("length {len} too large")))?;
    // SAFETY: plain syscall on a valid descriptor.
    let rc = unsafe { libc::posix_fallocate(file.as_raw_fd(), 0, len_i64) };
    if rc != 0 {
        return Err(io_err("preallocate", path)(std::io::Error::from_raw_os_error(rc)));
    }
    Ok(())
}

/// Maps `len` bytes of `file` for reading and writing; `None` when `len` is 0.
pub(crate) fn map(file: &File, len: u64, path: &Path) -> Result<Option<MmapRaw>> {
    if len == 0 {
        return Ok(None);
    }
    let len = usize::try_from(len).map_err(|_| super::StorageError::InvalidArgument(format!("map of {len} bytes")))?;
    MmapOptions::new().len(len).map_raw(file).map(Some).map_err(io_err("mmap", path))
}

/// fsyncs a directory so entries created, renamed or removed in it persist.
pub(crate) fn sync_dir(dir: &Path) -> Result<()> {
    #[cfg(test)]
    super::testfs::before_sync_dir(dir).map_err(io_err("fsync directory", dir))?;
    File::open(dir).and_then(|d| d.sync_all()).map_err(io_err("fsync directory", dir))?;
    #[cfg(test)]
    super::testfs::after_sync_dir(dir);
    Ok(())
}

/// fdatasyncs `file` (`path` names it in errors). An error means the data
/// written since the last sync may be lost even if a later sync succeeds
/// (Linux drops the dirty pages): callers must treat it as fatal for the file.
pub(crate) fn sync_data(file: &File, path: &Path) -> Result<()> {
    #[cfg(test)]
    super::testfs::before_sync(file).map_err(io_err("fdatasync", path))?;
    file.sync_data().map_err(io_err("fdatasync", path))?;
    #[cfg(test)]
    super::testfs::after_sync(file);
    Ok(())
}

/// Replaces `path` with `contents` atomically: temp file, fsync, rename,
/// fsync of the directory. A crash leaves either the old or the new file.
pub(crate) fn write_atomic(path: &Path, contents: &[u8]) -> Result<()> {
    let tmp = path.with_extension("tmp");
    let mut f = File::create(&tmp).map_err(io_err("create", &tmp))?;
    #[cfg(test)]
    super::testfs::before_write(&f).map_err(io_err("write", &tmp))?;
    f.write_all(contents).map_err(io_err("write", &tmp))?;
    sync_data(&f, &tmp)?;
    drop(f);
    #[cfg(test)]
    super::testfs::before_unlink(path);
    std::fs::rename(&tmp, path).map_err(io_err("rename", path))?;
    if let Some(dir) = path.parent() {
        sync_dir(dir)?;
    }
    Ok(())
}

/// Creates `path` (it must not exist) holding `contents`, fdatasynced. The
/// first half of an atomic replace whose caller picks a unique temp name and
/// does the rename and the directory fsync itself.
pub(crate) fn write_new_synced(path: &Path, contents: &[u8]) -> Result<()> {
    let mut f = OpenOptions::new().write(true).create_new(true).open(path).map_err(io_err("create", path))?;
    #[cfg(test)]
    super::testfs::before_write(&f).map_err(io_err("write", path))?;
    f.write_all(contents).map_err(io_err("write", path))?;
    sync_data(&f, path)
}

/// Replaces `path` with `contents` by a temp file and a rename, without
/// fsyncs: a power loss leaves the old file, the new one, or (the rename
/// durable but not the data) an empty or partial one. Only for files whose
/// every such outcome is safe to read back.
pub(crate) fn replace_unsynced(path: &Path, contents: &[u8]) -> Result<()> {
    let tmp = path.with_extension("tmp");
    let mut f = File::create(&tmp).map_err(io_err("create", &tmp))?;
    #[cfg(test)]
    super::testfs::before_write(&f).map_err(io_err("write", &tmp))?;
    f.write_all(contents).map_err(io_err("write", &tmp))?;
    drop(f);
    #[cfg(test)]
    super::testfs::before_unlink(path);
    std::fs::rename(&tmp, path).map_err(io_err("rename", path))
}

/// Removes a file, treating "not found" as done (so recovery can repeat it).
pub(crate) fn remove_if_exists(path: &Path) -> Result<()> {
    #[cfg(test)]
    super::testfs::before_unlink(path);
    match std::fs::remove_file(path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(io_err("remove", path)(e)),
        _ => Ok(()),
    }
}

/// Writes all of `parts` at `position` with `pwritev`, resuming after short
/// writes and retrying interrupted ones.
pub(crate) fn pwrite_all(file: &File, parts: &[&[u8]; 2], position: u64) -> std::io::Result<()> {
    use std::os::fd::AsRawFd;
    #[cfg(test)]
    super::testfs::before_write(file)?;
    let total: usize = parts.iter().map(|p| p.len()).sum();
    let mut done = 0usize;
    while done < total {
        let mut iov = [libc::iovec { iov_base: std::ptr::null_mut(), iov_len: 0 }; 2];
        let mut n = 0;
        let mut skip = done;
        for p in parts {
            if skip >= p.len() {
                skip -= p.len();
                continue;
            }
            iov[n] = libc::iovec { iov_base: p[skip..].as_ptr() as *mut libc::c_void, iov_len: p.len() - skip };
            skip = 0;
            n += 1;
        }
        let offset = libc::off_t::try_from(position + done as u64)
            .map_err(|_| std::io::Error::from_raw_os_error(libc::EFBIG))?;
        // SAFETY: the iovecs point into slices that outlive the call.
        let written = unsafe { libc::pwritev(file.as_raw_fd(), iov.as_ptr(), n as libc::c_int, offset) };
        if written < 0 {
            let err = std::io::Error::last_os_error();
            if err.kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            return Err(err);
        }
        if written == 0 {
            return Err(std::io::Error::from(std::io::ErrorKind::WriteZero));
        }
        done += written as usize;
    }
    Ok(())
}
