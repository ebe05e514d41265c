//! Whether memory is short enough that the logs give pages back to the OS.
//!
//! Write-behind (written windows of the active segment) and drop-behind
//! (data a catch-up reader has moved past) could drop their pages from the
//! page cache every time, which bounds the cache each partition holds but
//! makes every read-back of older data a disk read, even on a machine with
//! gigabytes to spare. Instead they drop pages only while free memory is
//! below `LogConfig::cache_min_free_percent`: with memory to spare, written
//! and read data stays cached for the next catch-up reader (as Kafka leaves
//! it to the OS); once the cache has taken what was free, each partition
//! again holds only its newest windows, and the kernel reclaims the clean
//! pages kept earlier before anything else.
//!
//! "Free" is the smaller of the machine's `MemFree / MemTotal` and, for the
//! cgroup v2 group and each ancestor with a `memory.max`, `(max - current)
//! / max` (a
//! container's page cache counts against its limit). Page cache is not
//! free: a full cache is what "short" means here. The figure is sampled at
//! most every [`SAMPLE_INTERVAL_MS`], by whichever thread asks.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU8, AtomicU64, Ordering};
use std::time::Instant;

/// How often free memory is read again, at most.
pub const SAMPLE_INTERVAL_MS: u64 = 100;

/// The default `cache_min_free_percent` where filling free memory is cheap.
pub const KEEP_WHILE_FREE_PERCENT: u8 = 10;

/// The default policy for this machine: [`KEEP_WHILE_FREE_PERCENT`], or 100
/// (always drop, a bounded cache per partition) on a VM that hands free
/// memory back to its host (a virtio balloon with free page reporting, as
/// Firecracker and some clouds run). There, memory the cache grows into must
/// be backed by the host again, which was measured to halve a producer's
/// throughput against recycling the same pages.
pub fn default_min_free_percent() -> u8 {
    if host_reclaims_free_memory(Path::new("/sys/bus/virtio/drivers/virtio_balloon")) {
        100
    } else {
        KEEP_WHILE_FREE_PERCENT
    }
}

/// True when a virtio balloon device under `driver_dir` offers free page
/// reporting (feature bit 5, `VIRTIO_BALLOON_F_REPORTING`; the `features`
/// file lists bits as '0'/'1' characters from bit 0).
fn host_reclaims_free_memory(driver_dir: &Path) -> bool {
    const VIRTIO_BALLOON_F_REPORTING: usize = 5;
    let Ok(entries) = std::fs::read_dir(driver_dir) else { return false };
    entries.filter_map(Result::ok).filter(|e| e.file_name().to_string_lossy().starts_with("virtio")).any(|e| {
        std::fs::read_to_string(e.path().join("features"))
            .is_ok_and(|f| f.as_bytes().get(VIRTIO_BALLOON_F_REPORTING) == Some(&b'1'))
    })
}

/// True when pages Tally is done with should leave the page cache, under
/// a `min_free_percent` policy: 0 never drops, 100 always drops, anything
/// between drops while free memory is below that percent.
pub(crate) fn should_drop(min_free_percent: u8) -> bool {
    match min_free_percent {
        0 => false,
        p if p >= 100 => true,
        p => drops_at(p, free_percent()),
    }
}

/// The policy with `free` percent of memory free.
fn drops_at(min_free_percent: u8, free: u8) -> bool {
    min_free_percent >= 100 || free < min_free_percent
}

/// Percent of memory free now (see the module doc), sampled at most every
/// [`SAMPLE_INTERVAL_MS`]. 100 when nothing can be read (not Linux).
pub fn free_percent() -> u8 {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    // Sample time in ms since EPOCH, plus one (0: never sampled).
    static SAMPLED_AT: AtomicU64 = AtomicU64::new(0);
    static FREE: AtomicU8 = AtomicU8::new(100);
    let now = EPOCH.get_or_init(Instant::now).elapsed().as_millis() as u64 + 1;
    let at = SAMPLED_AT.load(Ordering::Acquire);
    if (at == 0 || now.saturating_sub(at) >= SAMPLE_INTERVAL_MS)
        && SAMPLED_AT.compare_exchange(at, now, Ordering::AcqRel, Ordering::Acquire).is_ok()
    {
        FREE.store(sample(), Ordering::Release);
    }
    FREE.load(Ordering::Acquire)
}

/// Reads free memory now.
fn sample() -> u8 {
    let machine = std::fs::read_to_string("/proc/meminfo").ok().and_then(|t| meminfo_free(&t));
    let cgroups = limited_cgroups().iter().filter_map(|dir| cgroup_free(dir));
    let pairs = machine.into_iter().chain(cgroups);
    pairs.map(|(free, total)| percent(free, total)).min().unwrap_or(100)
}

/// `free` as a percent of `total`, rounded down.
fn percent(free: u64, total: u64) -> u8 {
    if total == 0 { 100 } else { (free.min(total) as u128 * 100 / total as u128) as u8 }
}

/// `(MemFree, MemTotal)` in bytes from the text of `/proc/meminfo`.
fn meminfo_free(text: &str) -> Option<(u64, u64)> {
    let field = |name: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(':'))
            .and_then(|rest| rest.split_whitespace().next()?.parse::<u64>().ok())
            .map(|kib| kib * 1024)
    };
    Some((field("MemFree")?, field("MemTotal")?))
}

/// `(max - current, max)` of a cgroup v2 directory with a numeric
/// `memory.max`; `None` when it has no limit or cannot be read.
fn cgroup_free(dir: &Path) -> Option<(u64, u64)> {
    let max = std::fs::read_to_string(dir.join("memory.max")).ok()?;
    let current = std::fs::read_to_string(dir.join("memory.current")).ok()?;
    cgroup_values(&max, &current)
}

/// [`cgroup_free`] from the files' texts (`max` may be "max": no limit).
fn cgroup_values(max: &str, current: &str) -> Option<(u64, u64)> {
    let max: u64 = max.trim().parse().ok()?;
    let current: u64 = current.trim().parse().ok()?;
    Some((max.saturating_sub(current), max))
}

/// This process's cgroup v2 directory and its ancestors that have a
/// `memory.max` file, found once (the host's root has none; a container's
/// own root, in a cgroup namespace, has its limit there).
fn limited_cgroups() -> &'static [PathBuf] {
    static DIRS: OnceLock<Vec<PathBuf>> = OnceLock::new();
    DIRS.get_or_init(|| {
        let Ok(text) = std::fs::read_to_string("/proc/self/cgroup") else { return Vec::new() };
        cgroup_dirs(&text, Path::new("/sys/fs/cgroup")).into_iter().filter(|d| d.join("memory.max").exists()).collect()
    })
}

/// The cgroup v2 path of `/proc/self/cgroup` text (`0::/a/b`) under `root`,
/// and each ancestor up to the root: `root/a/b`, `root/a`, `root`.
fn cgroup_dirs(text: &str, root: &Path) -> Vec<PathBuf> {
    let Some(path) = text.lines().find_map(|l| l.strip_prefix("0::")) else { return Vec::new() };
    let mut dirs = Vec::new();
    let mut dir = root.join(path.trim().trim_start_matches('/'));
    while dir.starts_with(root) {
        dirs.push(dir.clone());
        if dir == root || !dir.pop() {
            break;
        }
    }
    dirs
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn meminfo_gives_free_and_total_in_bytes() {
        let text = "MemTotal:       24576000 kB\nMemFree:         2457600 kB\nMemAvailable:   20000000 kB\n";
        assert_eq!(meminfo_free(text), Some((2_457_600 * 1024, 24_576_000 * 1024)));
        assert_eq!(percent(2_457_600, 24_576_000), 10);
        assert_eq!(meminfo_free("MemTotal: 10 kB\n"), None, "no MemFree line");
    }

    #[test]
    fn a_cgroup_limit_counts_its_page_cache_as_used() {
        assert_eq!(cgroup_values("max\n", "123\n"), None, "no limit");
        assert_eq!(cgroup_values("1000\n", "900\n"), Some((100, 1000)));
        assert_eq!(cgroup_values("1000\n", "1200\n"), Some((0, 1000)), "over the limit is nothing free");
    }

    #[test]
    fn the_cgroup_and_its_ancestors_are_checked() {
        let root = Path::new("/sys/fs/cgroup");
        let dirs = cgroup_dirs("0::/system.slice/tally.service\n", root);
        assert_eq!(dirs, [root.join("system.slice/tally.service"), root.join("system.slice"), root.to_path_buf()]);
        assert_eq!(cgroup_dirs("0::/\n", root), [root.to_path_buf()], "a container's namespace root");
        assert!(cgroup_dirs("1:memory:/x\n", root).is_empty(), "cgroup v1 only");
    }

    #[test]
    fn a_balloon_with_free_page_reporting_is_found_by_its_feature_bit() {
        let dir = tempfile::tempdir().unwrap();
        assert!(!host_reclaims_free_memory(&dir.path().join("absent")), "no balloon driver");
        let device = dir.path().join("virtio0");
        std::fs::create_dir(&device).unwrap();
        std::fs::write(device.join("features"), "0110000100000000\n").unwrap();
        assert!(!host_reclaims_free_memory(dir.path()), "bit 5 clear");
        std::fs::write(device.join("features"), "0110010100000000\n").unwrap();
        assert!(host_reclaims_free_memory(dir.path()), "bit 5 set");
    }

    #[test]
    fn pages_are_dropped_only_while_free_memory_is_below_the_threshold() {
        assert!(!drops_at(10, 40), "memory to spare: keep");
        assert!(!drops_at(10, 10), "at the threshold: keep");
        assert!(drops_at(10, 9), "below it: drop");
        assert!(drops_at(100, 100), "100 always drops");
        assert!(!should_drop(0), "0 never drops");
        assert!(should_drop(100));
        assert!(free_percent() <= 100);
    }
}
