//! The broker's log cleaner threads (`log_cleaner_threads`): each wakes
//! every `log_cleaner_backoff_ms`, takes the compacted partition with the
//! highest dirty ratio among those due (and not being cleaned by another
//! thread), cleans it with `storage::Cleaner`, and looks again at once
//! after a clean. Leaders and followers clean their own copies.
//!
//! Each thread owns one offset map of `log_cleaner_dedupe_buffer_bytes`
//! (divided among the threads, as Kafka does), so the cleaner's memory is
//! bounded whatever the partitions hold. The work is synchronous I/O on
//! plain threads, off the async runtime.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::watch;

use crate::broker::Broker;
use crate::partition::Partition;
use crate::storage::{Cleaner, CleanerConfig};

/// The running cleaner threads; [`LogCleaners::stop`] ends them.
pub struct LogCleaners {
    stop: watch::Sender<bool>,
    /// Each thread's cleaner's stop flag: a pass in progress ends at its
    /// next batch when the broker stops.
    flags: Arc<Mutex<Vec<Arc<AtomicBool>>>>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

impl LogCleaners {
    /// Starts the broker's cleaner threads (none when `log_cleaner_threads`
    /// is 0).
    pub fn start(broker: Arc<Broker>) -> std::io::Result<LogCleaners> {
        let config = broker.config();
        let count = config.log_cleaner_threads as usize;
        let cleaner = CleanerConfig {
            dedupe_buffer_bytes: config.log_cleaner_dedupe_buffer_bytes / count.max(1) as u64,
            io_max_bytes_per_second: (config.log_cleaner_io_max_bytes_per_second > 0)
                .then_some(config.log_cleaner_io_max_bytes_per_second),
        };
        let backoff = Duration::from_millis(config.log_cleaner_backoff_ms);
        let (stop, stopped) = watch::channel(false);
        let busy = Arc::new(Mutex::new(HashSet::new()));
        let failed = Arc::new(Mutex::new(HashMap::new()));
        let flags = Arc::new(Mutex::new(Vec::new()));
        let mut threads = Vec::new();
        for i in 0..count {
            let (broker, stopped, busy, failed) = (broker.clone(), stopped.clone(), busy.clone(), failed.clone());
            let cleaner = Cleaner::new(cleaner);
            flags.lock().unwrap_or_else(std::sync::PoisonError::into_inner).push(cleaner.stop_flag());
            let thread = std::thread::Builder::new()
                .name(format!("log-cleaner-{i}"))
                .spawn(move || run(&broker, cleaner, backoff, &stopped, &busy, &failed))?;
            threads.push(thread);
        }
        Ok(LogCleaners { stop, flags, threads })
    }

    /// Stops the threads; a pass in progress stops at its next batch.
    pub fn stop(self) {
        let _ = self.stop.send(true);
        for flag in self.flags.lock().unwrap_or_else(std::sync::PoisonError::into_inner).iter() {
            flag.store(true, Ordering::Relaxed);
        }
        for t in self.threads {
            let _ = t.join();
        }
    }
}

type Busy = Mutex<HashSet<(Arc<str>, u32)>>;

/// Partitions whose last pass failed: not tried again before the instant,
/// with the wait doubling up to [`FAILED_BACKOFF_MAX`] (Kafka marks them
/// uncleanable), so one bad partition does not take every pass.
type Failed = Mutex<HashMap<(Arc<str>, u32), (Instant, Duration)>>;

/// The longest wait before a partition whose cleaning failed is tried again.
const FAILED_BACKOFF_MAX: Duration = Duration::from_secs(600);

fn run(
    broker: &Broker,
    mut cleaner: Cleaner,
    backoff: Duration,
    stopped: &watch::Receiver<bool>,
    busy: &Busy,
    failed: &Failed,
) {
    let stop = cleaner.stop_flag();
    while !*stopped.borrow() {
        let Some(partition) = dirtiest(broker, busy, failed) else {
            sleep_unless_stopped(backoff, stopped, &stop);
            continue;
        };
        let key = (Arc::<str>::from(partition.topic()), partition.index());
        let span = tracing::info_span!("log_cleaner", topic = partition.topic(), partition = partition.index());
        let _enter = span.enter();
        let began = std::time::Instant::now();
        let result = partition.clean(&mut cleaner, false);
        match &result {
            Ok(Some(outcome)) => tracing::info!(
                segments_before = outcome.segments_before,
                segments_after = outcome.segments_after,
                bytes_before = outcome.bytes_before,
                bytes_after = outcome.bytes_after,
                records_removed = outcome.records_removed,
                cleaner_offset = outcome.cleaner_offset,
                completed = outcome.completed,
                ms = began.elapsed().as_millis() as u64,
                "cleaned"
            ),
            Ok(None) => {}
            Err(_) if *stopped.borrow() => {}
            Err(e) => {
                let mut failed = failed.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
                let wait = failed.get(&key).map_or(backoff, |(_, w)| (*w * 2).min(FAILED_BACKOFF_MAX));
                tracing::error!(error = %e, retry_in_ms = wait.as_millis() as u64, "cleaning failed; other partitions go first");
                failed.insert(key.clone(), (Instant::now() + wait, wait));
            }
        }
        if let Ok(Some(_)) = &result {
            failed.lock().unwrap_or_else(std::sync::PoisonError::into_inner).remove(&key);
        }
        busy.lock().unwrap_or_else(std::sync::PoisonError::into_inner).remove(&key);
    }
}

/// The due partition with the highest dirty ratio that no other thread is
/// cleaning, marked busy.
fn dirtiest(broker: &Broker, busy: &Busy, failed: &Failed) -> Option<Arc<Partition>> {
    let mut busy = busy.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
    let failed = failed.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
    let now = Instant::now();
    let best = broker
        .all_partitions()
        .into_iter()
        .filter(|p| {
            let key = (Arc::<str>::from(p.topic()), p.index());
            !busy.contains(&key) && failed.get(&key).is_none_or(|(until, _)| now >= *until)
        })
        .filter_map(|p| match p.cleaning_due() {
            Some((stats, true)) => Some((stats.dirty_ratio(), p)),
            _ => None,
        })
        .max_by(|a, b| a.0.total_cmp(&b.0))
        .map(|(_, p)| p)?;
    busy.insert((Arc::from(best.topic()), best.index()));
    Some(best)
}

fn sleep_unless_stopped(total: Duration, stopped: &watch::Receiver<bool>, stop: &AtomicBool) {
    let step = Duration::from_millis(100);
    let mut left = total;
    while !left.is_zero() && !*stopped.borrow() && !stop.load(Ordering::Relaxed) {
        let nap = left.min(step);
        std::thread::sleep(nap);
        left -= nap;
    }
}
