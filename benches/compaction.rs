//! Log compaction benchmark: the cleaner's throughput and memory, and what
//! it costs appends and reads on other partitions.
//!
//! `cargo bench --bench compaction` writes 10 M records of 100 B over 1 M
//! distinct keys (batches of 100 records) into one compacted log, then
//! prints:
//! - cleaner throughput: MB of dirty log cleaned per second, and the
//!   records and bytes it removed;
//! - memory: the process's peak anonymous RSS while cleaning, beside the
//!   offset map's budget (`dedupe_buffer_bytes`, 128 MiB);
//! - interference: append MB/s and sequential read MB/s on another log,
//!   alone and while the cleaner runs (target: within 10% of idle).
//!
//! TALLY_BENCH_QUICK=1 for a short run (1 M records, 100 k keys);
//! TALLY_BENCH_DIR chooses the file system.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tally_broker::storage::{Cleaner, CleanerConfig, Compaction, Log, LogConfig, Offset, SystemClock};
use tally_proto::batch::{BatchBuilder, BatchLimits, RecordBatch, RecordRef};

fn quick() -> bool {
    std::env::var("TALLY_BENCH_QUICK").is_ok_and(|v| v == "1")
}

fn compacted() -> LogConfig {
    LogConfig {
        retention_ms: None,
        segment_bytes: 256 << 20,
        writeback_window_bytes: 0,
        compaction: Some(Compaction { min_cleanable_dirty_ratio: 0.0, ..Compaction::default() }),
        ..LogConfig::default()
    }
}

/// xorshift: reproducible keys.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

fn keyed_batch(rng: &mut Rng, keys: u64, per_batch: usize, ts: i64) -> RecordBatch {
    let value = [b'v'; 100];
    let mut b = BatchBuilder::with_capacity(per_batch * 140);
    let mut key_buf = Vec::with_capacity(per_batch);
    for _ in 0..per_batch {
        key_buf.push(format!("key-{:08}", rng.next() % keys));
    }
    for key in &key_buf {
        b.push(&RecordRef { timestamp: ts, key: Some(key.as_bytes()), value: Some(&value), headers: &[] });
    }
    RecordBatch::validate(b.finish(), &BatchLimits { max_batch_bytes: usize::MAX, ..BatchLimits::default() })
        .expect("valid")
}

fn rss_anon_bytes() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("RssAnon:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map_or(0, |kb| kb * 1024)
}

fn now_ms() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_millis() as i64
}

/// Appends 1 KiB-record batches of 64 KiB to `log` until `stop`, then
/// reads it back from the start until `stop` again; returns bytes/s of each.
fn other_partition(dir: &std::path::Path, run_for: Duration) -> (f64, f64) {
    let mut log =
        Log::open(dir, LogConfig { retention_ms: None, ..LogConfig::default() }, Arc::new(SystemClock)).expect("open");
    let value = [b'x'; 1024];
    let mut b = BatchBuilder::with_capacity(70_000);
    for _ in 0..63 {
        b.push(&RecordRef { timestamp: now_ms(), key: None, value: Some(&value), headers: &[] });
    }
    let batch =
        RecordBatch::validate(b.finish(), &BatchLimits { max_batch_bytes: usize::MAX, ..BatchLimits::default() })
            .expect("valid");
    let began = Instant::now();
    let mut written = 0u64;
    while began.elapsed() < run_for {
        log.append(&batch, 0).expect("append");
        if let Some(w) = log.take_writeback() {
            w.run().expect("write-behind");
        }
        written += batch.len() as u64;
    }
    let append = written as f64 / began.elapsed().as_secs_f64();
    let leo = log.log_end_offset();
    log.set_high_watermark(leo);
    let began = Instant::now();
    let (mut read, mut offset) = (0u64, Offset(0));
    while began.elapsed() < run_for {
        let r = log.read(offset, 1 << 20, Offset::MAX).expect("read");
        read += r.bytes;
        offset = if r.next_offset >= leo { Offset(0) } else { r.next_offset };
    }
    let fetch = read as f64 / began.elapsed().as_secs_f64();
    drop(log);
    let _ = std::fs::remove_dir_all(dir);
    (append, fetch)
}

fn main() {
    let base = std::env::var("TALLY_BENCH_DIR").map_or_else(|_| std::env::temp_dir(), std::path::PathBuf::from);
    let root = tempfile::tempdir_in(base).expect("temp dir");
    let (records, keys): (u64, u64) = if quick() { (1_000_000, 100_000) } else { (10_000_000, 1_000_000) };
    let per_batch = 100;
    println!("compaction benchmark in {}", root.path().display());
    println!("{records} records of 100 B over {keys} keys, {per_batch} per batch");

    let build = |name: &str| {
        let mut log = Log::open(&root.path().join(name), compacted(), Arc::new(SystemClock)).expect("open");
        let mut rng = Rng(0x9E37_79B9_7F4A_7C15);
        let ts = now_ms();
        for _ in 0..records / per_batch as u64 {
            log.append(&keyed_batch(&mut rng, keys, per_batch, ts), 0).expect("append");
        }
        log.roll().expect("roll");
        let leo = log.log_end_offset();
        log.set_high_watermark(leo);
        log.flush().expect("flush");
        // SAFETY: sync(2) takes no arguments.
        unsafe { libc::sync() };
        Mutex::new(log)
    };
    let clean = |log: Mutex<Log>, config: CleanerConfig| {
        std::thread::Builder::new()
            .name("cleaner".into())
            .spawn(move || {
                let mut cleaner = Cleaner::new(config);
                let began = Instant::now();
                let outcome = cleaner.clean_if_due(&log, true).expect("clean").expect("a pass ran");
                (began.elapsed(), outcome, log)
            })
            .expect("spawn the cleaner")
    };
    let config = CleanerConfig::default();

    // The cleaner alone.
    let log = build("alone-0");
    let size = log.lock().unwrap().size_bytes();
    println!("log: {} MB in {} segments", size / 1_000_000, log.lock().unwrap().segment_count());
    let anon_before = rss_anon_bytes();
    let peak = Arc::new(AtomicU64::new(anon_before));
    let done = Arc::new(AtomicBool::new(false));
    let sampler = {
        let (peak, done) = (peak.clone(), done.clone());
        std::thread::spawn(move || {
            while !done.load(Ordering::Relaxed) {
                peak.fetch_max(rss_anon_bytes(), Ordering::Relaxed);
                std::thread::sleep(Duration::from_millis(10));
            }
        })
    };
    let (took, outcome, log) = clean(log, config).join().expect("cleaner thread");
    done.store(true, Ordering::Relaxed);
    sampler.join().expect("sampler");
    let remaining = log.lock().unwrap().size_bytes();
    assert!(remaining < size, "cleaning shrank the log");
    drop(log);
    let cleaned_mb = outcome.bytes_before as f64 / 1e6;
    println!("\n== cleaner");
    println!(
        "cleaned {:.0} MB in {:.2} s: {:.0} MB/s of dirty log; {} records removed, {} MB -> {} MB, {} segments -> {}",
        cleaned_mb,
        took.as_secs_f64(),
        cleaned_mb / took.as_secs_f64(),
        outcome.records_removed,
        outcome.bytes_before / 1_000_000,
        outcome.bytes_after / 1_000_000,
        outcome.segments_before,
        outcome.segments_after
    );
    println!(
        "memory: anonymous RSS {} MiB before, {} MiB at its peak while cleaning (offset map budget {} MiB)",
        anon_before >> 20,
        peak.load(Ordering::Relaxed) >> 20,
        config.dedupe_buffer_bytes >> 20
    );

    // Another partition alone, then beside a cleaner.
    let window = Duration::from_secs(if quick() { 2 } else { 4 });
    let (append_idle, fetch_idle) = other_partition(&root.path().join("other-idle"), window);
    let log = build("busy-0");
    let cleaning = clean(log, config);
    std::thread::sleep(Duration::from_millis(100));
    let (append_busy, fetch_busy) = other_partition(&root.path().join("other-busy"), window);
    let (took_busy, _, log) = cleaning.join().expect("cleaner thread");
    println!("\n== another partition, alone and while the cleaner runs (target: within 10%)");
    println!("(the cleaner took {:.2} s beside it)", took_busy.as_secs_f64());
    println!(
        "append    {:>7.0} MB/s idle, {:>7.0} MB/s during cleaning ({:+.0}%)",
        append_idle / 1e6,
        append_busy / 1e6,
        100.0 * (append_busy / append_idle - 1.0)
    );
    println!(
        "read      {:>7.0} MB/s idle, {:>7.0} MB/s during cleaning ({:+.0}%)",
        fetch_idle / 1e6,
        fetch_busy / 1e6,
        100.0 * (fetch_busy / fetch_idle - 1.0)
    );
    drop(log);
}
