//! Storage benchmark: the partition log against the raw file system.
//!
//! `cargo bench --bench storage` prints, for 1 KiB records in 64 KiB batches
//! and 100-byte records in 16 KiB batches: append MB/s and records/s with
//! flush `os` and `always`, sequential read MB/s, offset and timestamp lookup
//! latency, and recovery MB/s over a 1 GiB log; beside them, the same
//! machine's buffered `write` and `write` + `fdatasync` figures for the same
//! bytes, measured in the same run. Set TALLY_BENCH_DIR to choose the file
//! system (default: the system temp dir); TALLY_BENCH_QUICK=1 for a short run.
//! The figures the targets speak of leave writeback to the OS (page cache);
//! one more line shows appends with the broker's default 32 MiB write-behind.

use std::fs::File;
use std::io::Write;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use tally_broker::storage::{FlushPolicy, Log, LogConfig, Offset, SystemClock};
use tally_proto::batch::{BatchBuilder, BatchLimits, RecordBatch, RecordRef};

struct Case {
    name: &'static str,
    record_bytes: usize,
    batch_bytes: usize,
}

fn quick() -> bool {
    std::env::var("TALLY_BENCH_QUICK").is_ok_and(|v| v == "1")
}

fn make_batch(case: &Case) -> (RecordBatch, u64) {
    let value = vec![b'v'; case.record_bytes];
    let mut b = BatchBuilder::with_capacity(case.batch_bytes + 1024);
    let ts = 1_700_000_000_000i64;
    let mut n = 0;
    loop {
        let r = RecordRef { timestamp: ts + n, key: None, value: Some(&value), headers: &[] };
        if b.len() + b.encoded_record_len(&r) > case.batch_bytes {
            break;
        }
        b.push(&r);
        n += 1;
    }
    let batch =
        RecordBatch::validate(b.finish(), &BatchLimits { max_batch_bytes: usize::MAX, ..BatchLimits::default() })
            .expect("valid");
    (batch, n as u64)
}

fn config(flush: FlushPolicy, writeback_window_bytes: u64) -> LogConfig {
    LogConfig { flush, retention_ms: None, writeback_window_bytes, ..LogConfig::default() }
}

fn mbps(bytes: u64, d: Duration) -> f64 {
    bytes as f64 / d.as_secs_f64() / 1e6
}

/// Appends `count` copies of `batch`; with `sync`, fsyncs after each.
fn append(dir: &Path, batch: &RecordBatch, count: u64, sync: bool, writeback_window_bytes: u64) -> (Duration, Log) {
    let flush = if sync { FlushPolicy::Always } else { FlushPolicy::Os };
    let mut log = Log::open(dir, config(flush, writeback_window_bytes), Arc::new(SystemClock)).expect("open");
    settle();
    let start = Instant::now();
    for _ in 0..count {
        log.append(batch, 0).expect("append");
        // As the broker does after each produce (outside the partition lock).
        if let Some(writeback) = log.take_writeback() {
            writeback.run().expect("write-behind");
        }
        if sync {
            log.flush().expect("flush");
        }
    }
    (start.elapsed(), log)
}

/// Writes back all dirty data, so one measurement does not pay for the last.
fn settle() {
    // SAFETY: sync(2) takes no arguments and cannot fail.
    unsafe { libc::sync() };
}

fn raw_write(path: &Path, bytes: &Bytes, count: u64, sync: bool) -> Duration {
    settle();
    let mut f = File::create(path).expect("create");
    let start = Instant::now();
    for _ in 0..count {
        f.write_all(bytes).expect("write");
        if sync {
            f.sync_data().expect("fdatasync");
        }
    }
    let d = start.elapsed();
    drop(f);
    let _ = std::fs::remove_file(path);
    d
}

fn lookups(log: &Log, records: u64) -> (Duration, Duration) {
    let n = 20_000u64;
    let mut x = 88172645463325252u64;
    let mut next = || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x % records
    };
    let start = Instant::now();
    for _ in 0..n {
        let r = log.read(Offset(next()), 1, Offset::MAX).expect("read");
        std::hint::black_box(r);
    }
    let offset = start.elapsed() / n as u32;
    let start = Instant::now();
    for _ in 0..n {
        let r = log.offset_for_timestamp(1_700_000_000_000 + next() as i64 % 1000).expect("lookup");
        std::hint::black_box(r);
    }
    (offset, start.elapsed() / n as u32)
}

fn sequential_read(log: &Log) -> (Duration, u64) {
    let end = log.log_end_offset();
    let start = Instant::now();
    let mut bytes = 0;
    let mut offset = Offset(0);
    while offset < end {
        let r = log.read(offset, 1 << 20, Offset::MAX).expect("read");
        bytes += r.bytes;
        offset = r.next_offset;
    }
    (start.elapsed(), bytes)
}

fn run_case(root: &Path, case: &Case) {
    let (batch, per_batch) = make_batch(case);
    let total: u64 = if quick() { 256 << 20 } else { 1 << 30 };
    let batches = total / batch.len() as u64;
    let sync_batches: u64 = if quick() { 300 } else { 2000 };
    println!("\n== {}: {} records of {} B per batch, batch {} B", case.name, per_batch, case.record_bytes, batch.len());

    let raw_buffered = raw_write(&root.join("raw.bin"), batch.bytes(), batches, false);
    let raw_sync = raw_write(&root.join("raw-sync.bin"), batch.bytes(), sync_batches, true);

    let dir = root.join(format!("{}-os", case.name));
    let (t_os, log) = append(&dir, &batch, batches, false, 0);
    let records = batches * per_batch;
    let bytes = batches * batch.len() as u64;
    let (t_read, read_bytes) = sequential_read(&log);
    let (t_offset, t_ts) = lookups(&log, records);
    drop(log); // a crash: nothing checkpointed, so recovery re-validates all of it

    settle();
    let start = Instant::now();
    let log = Log::open(&dir, config(FlushPolicy::Os, 0), Arc::new(SystemClock)).expect("recover");
    let t_recover = start.elapsed();
    assert_eq!(log.log_end_offset(), Offset(records), "recovery kept every record");
    drop(log);
    let _ = std::fs::remove_dir_all(&dir);

    let dir = root.join(format!("{}-always", case.name));
    let (t_always, log) = append(&dir, &batch, sync_batches, true, 0);
    drop(log);
    let _ = std::fs::remove_dir_all(&dir);

    let dir = root.join(format!("{}-behind", case.name));
    let (t_behind, log) = append(&dir, &batch, batches, false, 32 << 20);
    drop(log);
    let _ = std::fs::remove_dir_all(&dir);
    let sync_bytes = sync_batches * batch.len() as u64;

    let os_mbps = mbps(bytes, t_os);
    let raw_mbps = mbps(bytes, raw_buffered);
    let always_mbps = mbps(sync_bytes, t_always);
    let raw_sync_mbps = mbps(sync_bytes, raw_sync);
    println!("append, flush os      {:>9.0} MB/s {:>12.0} records/s", os_mbps, records as f64 / t_os.as_secs_f64());
    println!(
        "  raw buffered write  {:>9.0} MB/s   -> append is {:.0}% of raw (target >= 70%)",
        raw_mbps,
        100.0 * os_mbps / raw_mbps
    );
    println!(
        "  with 32 MiB write-behind (the broker default) {:.0} MB/s: paced by the disk, page cache bounded",
        mbps(bytes, t_behind)
    );
    println!(
        "append, flush always  {:>9.1} MB/s {:>12.0} records/s",
        always_mbps,
        (sync_batches * per_batch) as f64 / t_always.as_secs_f64()
    );
    println!(
        "  raw write+fdatasync {:>9.1} MB/s   -> append is {:.0}% of raw (target >= 80%)",
        raw_sync_mbps,
        100.0 * always_mbps / raw_sync_mbps
    );
    println!("sequential read       {:>9.0} MB/s (CRC checked on read; target >= 3000)", mbps(read_bytes, t_read));
    println!("offset lookup         {:>9.2} us", t_offset.as_secs_f64() * 1e6);
    println!("offset_for_timestamp  {:>9.2} us", t_ts.as_secs_f64() * 1e6);
    println!("recovery              {:>9.0} MB/s over {} MiB (target >= 1000)", mbps(bytes, t_recover), bytes >> 20);
}

/// This machine is a VM whose memory the host backs on first touch: the
/// first pass over fresh pages runs at a fraction of the speed of every later
/// one. One untimed pass of the largest write makes both the raw and the log
/// figures steady-state.
fn warm_up(root: &Path, bytes: u64) {
    let chunk = Bytes::from(vec![0u8; 1 << 20]);
    raw_write(&root.join("warm-up.bin"), &chunk, bytes >> 20, false);
}

fn main() {
    let base = std::env::var_os("TALLY_BENCH_DIR").map_or_else(std::env::temp_dir, Into::into);
    let root = tempfile::Builder::new().prefix("tally-bench").tempdir_in(base).expect("temp dir");
    println!("storage benchmark in {}", root.path().display());
    warm_up(root.path(), if quick() { 256 << 20 } else { 1 << 30 });
    for case in [
        Case { name: "1KiB-records-64KiB-batches", record_bytes: 1024, batch_bytes: 64 << 10 },
        Case { name: "100B-records-16KiB-batches", record_bytes: 100, batch_bytes: 16 << 10 },
    ] {
        run_case(root.path(), &case);
    }
}
