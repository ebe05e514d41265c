//! `tally bench consume --from-disk`: takes a topic's segment files out of
//! the page cache before it is read back, measures the disk's own
//! sequential read of the same files (what `dd` would), and reports how
//! much the page cache grew while the consumers read.

use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::Context;

/// The `.log` segment files of every partition of `topic` under a broker's
/// `data_dir` (`<data_dir>/<topic>-<partition>/*.log`), in partition and
/// offset order.
pub fn segment_files(data_dir: &Path, topic: &str) -> anyhow::Result<Vec<PathBuf>> {
    let mut files = Vec::new();
    let entries = std::fs::read_dir(data_dir).with_context(|| format!("cannot list {}", data_dir.display()))?;
    let mut partitions: Vec<(u32, PathBuf)> = entries
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            let name = e.file_name().into_string().ok()?;
            let index = name.strip_prefix(topic)?.strip_prefix('-')?.parse().ok()?;
            Some((index, e.path()))
        })
        .collect();
    partitions.sort();
    for (_, dir) in partitions {
        let mut logs: Vec<PathBuf> = std::fs::read_dir(&dir)
            .with_context(|| format!("cannot list {}", dir.display()))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|x| x == "log"))
            .collect();
        logs.sort();
        files.extend(logs);
    }
    anyhow::ensure!(!files.is_empty(), "no segment of topic {topic} under {}", data_dir.display());
    Ok(files)
}

/// Writes out and drops every page of `files` from the page cache
/// (`fdatasync`, then `posix_fadvise(DONTNEED)`; no root needed). Pages a
/// process has mapped stay: the broker's newest write-behind windows.
/// Returns the files' total size.
pub fn drop_from_cache(files: &[PathBuf]) -> anyhow::Result<u64> {
    let mut total = 0;
    for path in files {
        let file = std::fs::File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
        file.sync_data().with_context(|| format!("cannot sync {}", path.display()))?;
        // SAFETY: a plain syscall on a descriptor we own.
        let rc = unsafe { libc::posix_fadvise(file.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) };
        anyhow::ensure!(rc == 0, "posix_fadvise({}): {}", path.display(), std::io::Error::from_raw_os_error(rc));
        total += file.metadata()?.len();
    }
    Ok(total)
}

/// Reads `files` one after another in 1 MiB direct reads (`O_DIRECT`, as
/// `dd iflag=direct bs=1M` or `fio --direct=1` do: the disk itself, not the
/// page cache or how fast the kernel finds memory for it) and returns MB
/// (10^6) per second.
pub fn sequential_read_mb_s(files: &[PathBuf]) -> anyhow::Result<f64> {
    use std::io::Read;
    use std::os::unix::fs::OpenOptionsExt;
    const LEN: usize = 1 << 20;
    let layout = std::alloc::Layout::from_size_align(LEN, 4096).expect("a valid layout");
    // SAFETY: the layout has a non-zero size; the buffer is freed below.
    let ptr = unsafe { std::alloc::alloc_zeroed(layout) };
    anyhow::ensure!(!ptr.is_null(), "cannot allocate a read buffer");
    // SAFETY: `ptr` is a live allocation of LEN bytes, zeroed.
    let buf = unsafe { std::slice::from_raw_parts_mut(ptr, LEN) };
    let (start, mut bytes) = (Instant::now(), 0u64);
    let mut outcome = Ok(());
    'files: for path in files {
        let opened = std::fs::OpenOptions::new().read(true).custom_flags(libc::O_DIRECT).open(path);
        let mut file = match opened.with_context(|| format!("cannot open {} for direct reads", path.display())) {
            Ok(f) => f,
            Err(e) => {
                outcome = Err(e);
                break;
            }
        };
        loop {
            match file.read(buf) {
                Ok(0) => break,
                Ok(n) => bytes += n as u64,
                Err(e) => {
                    outcome = Err(anyhow::Error::new(e).context(format!("cannot read {}", path.display())));
                    break 'files;
                }
            }
        }
    }
    let secs = start.elapsed().as_secs_f64();
    // SAFETY: allocated above with this layout and no longer borrowed.
    unsafe { std::alloc::dealloc(ptr, layout) };
    outcome.map(|()| bytes as f64 / secs / 1e6)
}

/// The machine's page cache (`Cached` of /proc/meminfo) in bytes.
pub fn page_cache_bytes() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    let kib: u64 = text.lines().find_map(|l| l.strip_prefix("Cached:"))?.split_whitespace().next()?.parse().ok()?;
    Some(kib * 1024)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_topics_segments_are_found_in_partition_and_offset_order_and_dropped() {
        let dir = tempfile::tempdir().unwrap();
        for (d, f) in [
            ("t-1", "00000000000000000000.log"),
            ("t-0", "00000000000000000100.log"),
            ("t-0", "00000000000000000000.log"),
            ("t-0", "00000000000000000000.index"),
            ("tt-0", "00000000000000000000.log"),
        ] {
            std::fs::create_dir_all(dir.path().join(d)).unwrap();
            std::fs::write(dir.path().join(d).join(f), vec![1u8; 8192]).unwrap();
        }
        let files = segment_files(dir.path(), "t").unwrap();
        let names: Vec<String> =
            files.iter().map(|p| p.strip_prefix(dir.path()).unwrap().display().to_string()).collect();
        assert_eq!(
            names,
            ["t-0/00000000000000000000.log", "t-0/00000000000000000100.log", "t-1/00000000000000000000.log"]
        );
        assert_eq!(drop_from_cache(&files).unwrap(), 3 * 8192);
        match sequential_read_mb_s(&files) {
            Ok(mb_s) => assert!(mb_s > 0.0),
            // A filesystem without direct I/O (tmpfs) refuses the open.
            Err(e) => assert!(format!("{e:#}").contains("Invalid argument"), "{e:#}"),
        }
        assert!(segment_files(dir.path(), "nope").is_err(), "a topic with no segment here is an error");
    }
}
