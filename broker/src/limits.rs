//! Process limits a broker depends on: open files (each hosted partition
//! holds descriptors for its segments) and the checks that turn running out
//! into a clear error at start or at topic creation instead of EMFILE in the
//! middle of a segment roll.

use std::path::Path;

/// Descriptors a segment holds: its `.log` (the indexes are mapped and hold
/// none, see `storage/index.rs`). A partition holds one per segment.
pub const FDS_PER_SEGMENT: u64 = 1;

/// Descriptors kept back for connections, the metadata log, checkpoints
/// and the cleaner.
pub const RESERVED_FDS: u64 = 1024;

/// The soft and hard limits on open files.
pub fn open_files() -> (u64, u64) {
    let mut limit = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: getrlimit writes into the struct we pass.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } != 0 {
        return (u64::MAX, u64::MAX);
    }
    (limit.rlim_cur, limit.rlim_max)
}

/// Raises the soft limit on open files to the hard limit (what a process
/// may do without privileges); returns the limits now in force.
pub fn raise_open_files() -> (u64, u64) {
    let (soft, hard) = open_files();
    if soft < hard {
        let limit = libc::rlimit { rlim_cur: hard, rlim_max: hard };
        // SAFETY: setrlimit reads the struct we pass.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &limit) } != 0 {
            tracing::warn!(soft, hard, "cannot raise the open-file limit to its hard limit");
        }
    }
    open_files()
}

/// Partitions (of one segment each) that `soft` descriptors hold.
pub fn partitions_within(soft: u64) -> u64 {
    soft.saturating_sub(RESERVED_FDS) / FDS_PER_SEGMENT
}

/// Segments on disk under `data_dir` (every `.log` file in a partition
/// directory), counted before any is opened.
pub fn segments_on_disk(data_dir: &Path) -> u64 {
    let Ok(entries) = std::fs::read_dir(data_dir) else { return 0 };
    entries
        .filter_map(Result::ok)
        .filter(|e| {
            e.file_type().is_ok_and(|t| t.is_dir()) && !e.file_name().to_string_lossy().starts_with("__cluster")
        })
        .filter_map(|e| std::fs::read_dir(e.path()).ok())
        .map(|files| {
            files.filter_map(Result::ok).filter(|f| f.file_name().to_string_lossy().ends_with(".log")).count() as u64
        })
        .sum()
}

/// Memory maps a segment holds: its `.log` and two indexes.
pub const MAPS_PER_SEGMENT: u64 = 3;

/// Maps kept back for the runtime, libraries and the metadata log.
pub const RESERVED_MAPS: u64 = 1024;

/// The kernel's limit on a process's memory maps (`vm.max_map_count`).
pub fn max_map_count() -> Option<u64> {
    std::fs::read_to_string("/proc/sys/vm/max_map_count").ok()?.trim().parse().ok()
}

/// Checks at start that the open-file limit (after raising it) and the
/// kernel's map limit hold the segments on disk; the error gives the
/// numbers and what to change.
pub fn check_start(data_dir: &Path) -> Result<(), String> {
    let (soft, hard) = raise_open_files();
    check_counts(segments_on_disk(data_dir), (soft, hard), max_map_count())
}

/// Whether `segments` fit the open-file limits and the map limit.
fn check_counts(segments: u64, (soft, hard): (u64, u64), max_maps: Option<u64>) -> Result<(), String> {
    if let Some(max_maps) = max_maps {
        let maps = segments * MAPS_PER_SEGMENT + RESERVED_MAPS;
        if maps > max_maps {
            return Err(format!(
                "this broker needs about {maps} memory maps ({segments} segments on disk, {MAPS_PER_SEGMENT} each, \
                 plus {RESERVED_MAPS}) but the kernel allows {max_maps}: raise it (`sysctl vm.max_map_count={}`) \
                 before starting it",
                maps.next_power_of_two()
            ));
        }
    }
    let needed = segments * FDS_PER_SEGMENT + RESERVED_FDS;
    if needed > soft {
        return Err(format!(
            "this broker needs about {needed} open files ({segments} segments on disk, {FDS_PER_SEGMENT} descriptor \
             each, plus {RESERVED_FDS} for connections) but may open only {soft} (hard limit {hard}): raise the \
             limit (`ulimit -n {needed}`, or LimitNOFILE={needed} in its systemd unit) before starting it"
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_soft_limit_is_raised_to_the_hard_one() {
        let (soft, hard) = raise_open_files();
        assert_eq!(soft, hard);
    }

    #[test]
    fn a_start_beyond_the_descriptor_or_map_limit_is_refused_with_the_numbers() {
        assert!(check_counts(1000, (20_000, 20_000), Some(65_530)).is_ok());
        let fds = check_counts(19_500, (20_000, 20_000), Some(1 << 20)).unwrap_err();
        assert!(fds.contains("needs about 20524 open files") && fds.contains("ulimit -n 20524"), "{fds}");
        let maps = check_counts(30_000, (1 << 20, 1 << 20), Some(65_530)).unwrap_err();
        assert!(maps.contains("needs about 91024 memory maps") && maps.contains("vm.max_map_count=131072"), "{maps}");
    }

    #[test]
    fn segments_are_counted_per_partition_directory() {
        let dir = tempfile::tempdir().unwrap();
        for (p, n) in [("a-0", 2), ("a-1", 1), ("__cluster_metadata", 5)] {
            std::fs::create_dir(dir.path().join(p)).unwrap();
            for i in 0..n {
                std::fs::write(dir.path().join(p).join(format!("{i:020}.log")), b"").unwrap();
                std::fs::write(dir.path().join(p).join(format!("{i:020}.index")), b"").unwrap();
            }
        }
        assert_eq!(segments_on_disk(dir.path()), 3);
        assert_eq!(partitions_within(RESERVED_FDS + 30), 30);
    }
}
