//! Produce and consume benchmarks against a running broker: records/s, MB/s
//! and request latency percentiles (HdrHistogram), with a progress line on
//! stderr and, given the broker's pid, its peak anonymous memory.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use bytes::Bytes;
use hdrhistogram::Histogram;
use tally_client::{Acks, Client, NewTopic, Producer, ProducerConfig, ProducerRecord};
use tally_proto::batch::{BatchBuilder, RecordRef};

use crate::child::rss_anon_kib;

/// Parameters of a produce benchmark.
#[derive(Debug, Clone)]
pub struct ProduceParams {
    /// Topic (created with `partitions` partitions if missing).
    pub topic: String,
    /// Concurrent producers; producer i writes partition i % partitions.
    pub producers: usize,
    /// Partitions of the topic.
    pub partitions: u32,
    /// Value bytes per record.
    pub record_size: usize,
    /// Records per batch (one batch per request).
    pub records_per_batch: usize,
    /// Acknowledgement level.
    pub acks: Acks,
    /// Measured time.
    pub duration: Duration,
    /// Unmeasured time before it.
    pub warmup: Duration,
    /// Topic configs used when the topic is created (e.g. flush=always).
    pub topic_configs: Vec<(String, String)>,
    /// Broker pid, to report its RssAnon.
    pub broker_pid: Option<u32>,
    /// Replicas per partition when the topic is created.
    pub replication_factor: u32,
    /// Codec of the pre-built batches (the broker decompresses each to
    /// validate it).
    pub compression: tally_client::Compression,
    /// Total records per second to pace at (spread over the producers);
    /// `None` sends as fast as answers come back. A paced producer still
    /// has one request in flight: if answers come slower than the pace, the
    /// rate reached falls short (the records/s figure shows it).
    pub rate_records_per_s: Option<f64>,
    /// Send records one by one through the batching [`Producer`] (which
    /// partitions, batches up to `records_per_batch` records and retries)
    /// instead of pre-built batches through a `PartitionClient`.
    pub through_producer: bool,
    /// With `through_producer`: the producer's `idempotence` setting
    /// (`None`: its default, on with acks=all).
    pub idempotence: Option<bool>,
    /// With `through_producer`: requests in flight per broker (and per
    /// partition when idempotent); `None` for the producer's default (5).
    pub max_in_flight: Option<usize>,
}

/// Parameters of a consume benchmark.
#[derive(Debug, Clone)]
pub struct ConsumeParams {
    /// Topic to read (from the beginning).
    pub topic: String,
    /// Concurrent consumers; consumer i reads partition i % partitions.
    pub consumers: usize,
    /// Bytes per fetch.
    pub fetch_bytes: u32,
    /// Upper bound on the measured time.
    pub duration: Duration,
    /// Broker pid, to report its RssAnon.
    pub broker_pid: Option<u32>,
    /// Read through the [`tally_client::Consumer`] (background prefetch,
    /// every record decoded and handed out) instead of raw fetches through a
    /// `PartitionClient`.
    pub through_consumer: bool,
    /// The broker's data directory: before reading, drop the topic's segment
    /// files from the page cache, so the read-back comes from disk, and
    /// measure the disk's own sequential read of them (direct I/O); the
    /// report then gives both figures and the page cache's growth.
    pub from_disk: Option<std::path::PathBuf>,
}

/// Figures of one run.
#[derive(Debug, Clone)]
pub struct Report {
    /// Records per second.
    pub records_per_s: f64,
    /// Megabytes (10^6) of record values (produce) or batches (consume) per second.
    pub mb_per_s: f64,
    /// Request latency percentiles in milliseconds: p50, p99, p99.9.
    pub latency_ms: [f64; 3],
    /// Latency samples: requests, or records when sent through the Producer.
    pub requests: u64,
    /// Peak broker RssAnon seen, in MiB.
    pub broker_rss_anon_mib: Option<f64>,
    /// Peak broker RSS seen (anonymous and file pages mapped), in MiB.
    pub broker_rss_mib: Option<f64>,
    /// Growth of the machine's page cache over the run, in MiB (consume
    /// `--from-disk`).
    pub page_cache_growth_mib: Option<f64>,
    /// The disk's sequential read of the same files, 1 MiB direct reads
    /// (consume `--from-disk`), MB/s.
    pub disk_read_mb_s: Option<f64>,
    /// Broker CPU seconds per GB (10^9) of record values, over the run
    /// (warm-up included in both).
    pub broker_cpu_s_per_gb: Option<f64>,
}

impl std::fmt::Display for Report {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{:.0} records/s, {:.1} MB/s, latency p50 {:.3} ms, p99 {:.3} ms, p99.9 {:.3} ms ({} samples)",
            self.records_per_s,
            self.mb_per_s,
            self.latency_ms[0],
            self.latency_ms[1],
            self.latency_ms[2],
            self.requests
        )?;
        if let Some(rss) = self.broker_rss_anon_mib {
            write!(f, ", broker RssAnon peak {rss:.1} MiB")?;
        }
        if let Some(rss) = self.broker_rss_mib {
            write!(f, ", RSS peak {rss:.1} MiB")?;
        }
        if let Some(growth) = self.page_cache_growth_mib {
            write!(f, ", page cache {growth:+.0} MiB")?;
        }
        if let Some(disk) = self.disk_read_mb_s {
            write!(
                f,
                "; disk sequential read of the same files {disk:.1} MB/s (read-back {:.0}% of it)",
                100.0 * self.mb_per_s / disk
            )?;
        }
        if let Some(cpu) = self.broker_cpu_s_per_gb {
            write!(f, ", broker CPU {cpu:.2} s per GB")?;
        }
        Ok(())
    }
}

/// `count` record values of `size` bytes of text-like content: words of a
/// small English vocabulary in a seeded pseudo-random order, with numbers,
/// the way log lines and JSON events compress (about 3-5x with lz4/zstd),
/// rather than random bytes (incompressible) or one repeated byte.
pub fn text_values(size: usize, count: usize) -> Vec<Vec<u8>> {
    const WORDS: &[&str] = &[
        "the", "user", "order", "event", "created", "updated", "payment", "status", "service", "request", "response",
        "latency", "error", "warning", "info", "session", "cart", "item", "price", "quantity", "shipping", "address",
        "city", "country", "account", "login", "logout", "click", "view", "page", "product", "category", "search",
        "query", "result", "timeout", "retry", "success", "failed", "queued",
    ];
    let mut seed: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut next = move || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed
    };
    (0..count)
        .map(|_| {
            let mut v = Vec::with_capacity(size + 16);
            while v.len() < size {
                let r = next();
                if r % 7 == 0 {
                    v.extend_from_slice(format!("{} ", r % 100_000).as_bytes());
                } else {
                    v.extend_from_slice(WORDS[(r % WORDS.len() as u64) as usize].as_bytes());
                    v.push(b' ');
                }
            }
            v.truncate(size);
            v
        })
        .collect()
}

/// CPU seconds (user + system) the process has used, from /proc.
pub fn cpu_seconds(pid: u32) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let after = &stat[stat.rfind(')')? + 2..];
    let fields: Vec<&str> = after.split_whitespace().collect();
    let ticks: f64 = fields.get(11)?.parse::<f64>().ok()? + fields.get(12)?.parse::<f64>().ok()?;
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    (hz > 0).then(|| ticks / hz as f64)
}

fn histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 60_000_000, 3).expect("valid bounds")
}

fn percentiles(h: &Histogram<u64>) -> [f64; 3] {
    [0.5, 0.99, 0.999].map(|q| h.value_at_quantile(q) as f64 / 1000.0)
}

/// Samples the broker's RssAnon and VmRSS every 100 ms until stopped;
/// returns their peaks in KiB.
fn watch_rss(pid: Option<u32>, stop: Arc<AtomicBool>) -> Option<std::thread::JoinHandle<(u64, u64)>> {
    let pid = pid?;
    Some(std::thread::spawn(move || {
        let sample = || (rss_anon_kib(pid).unwrap_or(0), crate::child::rss_kib(pid).unwrap_or(0));
        let mut peak = (0, 0);
        loop {
            let (anon, all) = sample();
            peak = (peak.0.max(anon), peak.1.max(all));
            if stop.load(Ordering::Relaxed) {
                return peak;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }))
}

fn progress(label: &'static str, records: Arc<AtomicU64>, bytes: Arc<AtomicU64>, stop: Arc<AtomicBool>) {
    std::thread::spawn(move || {
        let (mut last_r, mut last_b) = (0, 0);
        while !stop.load(Ordering::Relaxed) {
            std::thread::sleep(Duration::from_secs(1));
            let (r, b) = (records.load(Ordering::Relaxed), bytes.load(Ordering::Relaxed));
            eprint!("\r{label}: {} records/s, {:.1} MB/s        ", r - last_r, (b - last_b) as f64 / 1e6);
            (last_r, last_b) = (r, b);
        }
        eprintln!();
    });
}

/// The moving parts of one run, and how they become a [`Report`].
struct Run {
    tasks: Vec<tokio::task::JoinHandle<anyhow::Result<Histogram<u64>>>>,
    records: Arc<AtomicU64>,
    bytes: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
    rss: Option<std::thread::JoinHandle<(u64, u64)>>,
    /// The broker's pid and CPU seconds at the start.
    cpu: Option<(u32, f64)>,
    /// Bytes counted from the start, warm-up included (for CPU per GB).
    all_bytes: Arc<AtomicU64>,
}

impl Run {
    /// Counters, a progress line on stderr and the broker's memory watch.
    fn start(label: &'static str, broker_pid: Option<u32>) -> Run {
        let records = Arc::new(AtomicU64::new(0));
        let bytes = Arc::new(AtomicU64::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        progress(label, records.clone(), bytes.clone(), stop.clone());
        let rss = watch_rss(broker_pid, stop.clone());
        let cpu = broker_pid.and_then(|pid| cpu_seconds(pid).map(|s| (pid, s)));
        Run { tasks: Vec::new(), records, bytes, stop, rss, cpu, all_bytes: Arc::new(AtomicU64::new(0)) }
    }

    /// Waits for the tasks, then computes rates over `measured()`.
    async fn finish(self, measured: impl FnOnce() -> Duration) -> anyhow::Result<Report> {
        let mut all = histogram();
        for t in self.tasks {
            all.add(t.await??)?;
        }
        self.stop.store(true, Ordering::Relaxed);
        let secs = measured().as_secs_f64();
        let rss = self.rss.and_then(|h| h.join().ok());
        let all_gb = self.all_bytes.load(Ordering::Relaxed) as f64 / 1e9;
        let broker_cpu_s_per_gb = self
            .cpu
            .and_then(|(pid, start)| cpu_seconds(pid).map(|end| (end - start) / all_gb))
            .filter(|v| v.is_finite());
        Ok(Report {
            records_per_s: self.records.load(Ordering::Relaxed) as f64 / secs,
            mb_per_s: self.bytes.load(Ordering::Relaxed) as f64 / secs / 1e6,
            latency_ms: percentiles(&all),
            requests: all.len(),
            broker_rss_anon_mib: rss.map(|(anon, _)| anon as f64 / 1024.0),
            broker_rss_mib: rss.map(|(_, all)| all as f64 / 1024.0),
            page_cache_growth_mib: None,
            disk_read_mb_s: None,
            broker_cpu_s_per_gb,
        })
    }
}

/// Runs a produce benchmark.
pub async fn produce(client: &Client, p: &ProduceParams) -> anyhow::Result<Report> {
    let topic = NewTopic {
        name: p.topic.clone(),
        partitions: p.partitions,
        replication_factor: p.replication_factor.max(1),
        configs: p.topic_configs.iter().cloned().collect(),
    };
    match client.admin().create_topic(topic).await {
        Ok(()) => {}
        Err(e) if e.code() == Some(tally_client::ErrorCode::TopicAlreadyExists) => {}
        Err(e) => return Err(e).context("cannot create the benchmark topic"),
    }
    if p.through_producer {
        return produce_records(client, p).await;
    }
    let values = text_values(p.record_size, p.records_per_batch);
    let mut builder = BatchBuilder::with_capacity(p.records_per_batch * (p.record_size + 16) + 64);
    let now = i64::try_from(std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH)?.as_millis())?;
    builder.set_compression(p.compression);
    for v in &values {
        builder.push(&RecordRef { timestamp: now, key: None, value: Some(v), headers: &[] });
    }
    let batch: Bytes = builder.finish();
    let Run { records, bytes, stop, rss, cpu, all_bytes, .. } = Run::start("produce", p.broker_pid);
    let start = Instant::now();
    let measure_from = start + p.warmup;
    let end = measure_from + p.duration;
    let mut tasks = Vec::new();
    for i in 0..p.producers {
        let pc = client.partition_client(p.topic.clone(), (i as u32) % p.partitions);
        let (batch, records, bytes, all_bytes) = (batch.clone(), records.clone(), bytes.clone(), all_bytes.clone());
        let (per_batch, payload, acks) =
            (p.records_per_batch as u64, (p.records_per_batch * p.record_size) as u64, p.acks);
        // One request per `interval` when paced.
        let interval = p
            .rate_records_per_s
            .map(|rate| Duration::from_secs_f64(per_batch as f64 * p.producers as f64 / rate.max(1.0)));
        tasks.push(tokio::spawn(async move {
            let mut h = histogram();
            let mut due = start;
            loop {
                if let Some(every) = interval {
                    // The timer's millisecond grain would add up to 1 ms to
                    // a latency counted from `due`: count from the send.
                    due += every;
                    tokio::time::sleep_until(due.into()).await;
                }
                let t0 = Instant::now();
                if t0 >= end {
                    break;
                }
                pc.produce(batch.clone(), acks).await?;
                all_bytes.fetch_add(payload, Ordering::Relaxed);
                if t0 >= measure_from {
                    h.saturating_record(t0.elapsed().as_micros() as u64);
                    records.fetch_add(per_batch, Ordering::Relaxed);
                    bytes.fetch_add(payload, Ordering::Relaxed);
                }
            }
            anyhow::Ok(h)
        }));
    }
    let run = Run { tasks, records, bytes, stop, rss, cpu, all_bytes };
    run.finish(|| p.duration).await
}

/// The produce benchmark through the batching `Producer`: each task sends
/// records one at a time through one shared producer and keeps up to
/// 32,768 deliveries outstanding; latency is from `send` to the
/// acknowledgement being observed, sampled on one record in 64 (the clock
/// read per record would cost a fifth of the loop).
async fn produce_records(client: &Client, p: &ProduceParams) -> anyhow::Result<Report> {
    let Run { records, bytes, stop, rss, cpu, all_bytes, .. } = Run::start("produce", p.broker_pid);
    let start = Instant::now();
    let measure_from = start + p.warmup;
    let end = measure_from + p.duration;
    let mut config = ProducerConfig::default();
    config.acks = p.acks;
    config.compression = p.compression;
    config.batch_bytes = (p.records_per_batch * (p.record_size + 16)).clamp(1024, 1 << 20);
    config.idempotence = p.idempotence;
    if let Some(n) = p.max_in_flight {
        config.max_in_flight = n;
    }
    // One producer shared by every task, as an application would share it.
    let shared = Producer::try_new(client.clone(), config)?;
    let mut tasks = Vec::new();
    for i in 0..p.producers {
        let producer = shared.clone();
        let (topic, records, bytes, size) = (p.topic.clone(), records.clone(), bytes.clone(), p.record_size);
        let all_bytes = all_bytes.clone();
        let partition = (i as u32) % p.partitions;
        tasks.push(tokio::spawn(async move {
            let values = text_values(size, 256);
            let mut h = histogram();
            // Deliveries outstanding, oldest first, and when the sampled
            // ones among them were sent (by send number): the per-record
            // entry is the 24-byte future alone.
            let mut pending = std::collections::VecDeque::with_capacity(OUTSTANDING + 1);
            let mut sampled = std::collections::VecDeque::new();
            let (mut sent, mut settled) = (0u64, 0u64);
            // Counted locally and published every 1024 records: shared
            // counters bumped per record would cost more than the send.
            let mut counted = Counted { group_sent: start, records: 0, bytes: 0, all_bytes: 0 };
            loop {
                // The clock is read once per 64 records, and the record sent
                // right after a reading is the one whose latency is sampled.
                if sent.is_multiple_of(64) {
                    let now = Instant::now();
                    if now >= end {
                        break;
                    }
                    sampled.push_back((sent, now));
                }
                let record = ProducerRecord::new(&topic, &values[sent as usize % values.len()]).partition(partition);
                // As an application sending from a hot loop would: queue
                // without an await when there is room, wait only when not.
                let delivery = match producer.try_send(record) {
                    Ok(delivery) => delivery,
                    Err(tally_client::Error::WouldBlock(_)) => producer.send(record).await?,
                    Err(e) => return Err(e.into()),
                };
                pending.push_back(delivery);
                sent += 1;
                if pending.len() > OUTSTANDING
                    && let Some(delivery) = pending.pop_front()
                {
                    delivery.await?;
                    counted.settled(&mut h, &mut sampled, settled, size, measure_from, end);
                    settled += 1;
                    if counted.all_bytes >= 1024 * size as u64 {
                        counted.publish(&records, &bytes, &all_bytes);
                    }
                }
            }
            producer.flush().await;
            for delivery in pending {
                delivery.await?;
                counted.settled(&mut h, &mut sampled, settled, size, measure_from, end);
                settled += 1;
            }
            counted.publish(&records, &bytes, &all_bytes);
            anyhow::Ok(h)
        }));
    }
    let run = Run { tasks, records, bytes, stop, rss, cpu, all_bytes };
    let report = run.finish(|| p.duration).await;
    shared.close().await;
    report
}

/// Deliveries the through-producer benchmark keeps outstanding per task.
const OUTSTANDING: usize = 8_192;

/// What one through-producer task has counted and not yet published.
struct Counted {
    /// When the sampled send that began the current group of 64 was made:
    /// the send time of every record of that group.
    group_sent: Instant,
    /// Records and bytes sent in the measured window.
    records: u64,
    bytes: u64,
    /// Bytes acknowledged, window or not.
    all_bytes: u64,
}

impl Counted {
    /// Counts send number `n`, just acknowledged (in send order). A sampled
    /// send's latency is taken now, at its acknowledgement.
    fn settled(
        &mut self,
        h: &mut Histogram<u64>,
        sampled: &mut std::collections::VecDeque<(u64, Instant)>,
        n: u64,
        size: usize,
        measure_from: Instant,
        end: Instant,
    ) {
        self.all_bytes += size as u64;
        let in_window = |t: Instant| t >= measure_from && t < end;
        if let Some(&(first, sent_at)) = sampled.front()
            && first == n
        {
            sampled.pop_front();
            self.group_sent = sent_at;
            if in_window(sent_at) {
                h.saturating_record(sent_at.elapsed().as_micros() as u64);
            }
        }
        if in_window(self.group_sent) {
            self.records += 1;
            self.bytes += size as u64;
        }
    }

    fn publish(&mut self, records: &AtomicU64, bytes: &AtomicU64, all_bytes: &AtomicU64) {
        records.fetch_add(std::mem::take(&mut self.records), Ordering::Relaxed);
        bytes.fetch_add(std::mem::take(&mut self.bytes), Ordering::Relaxed);
        all_bytes.fetch_add(std::mem::take(&mut self.all_bytes), Ordering::Relaxed);
    }
}

/// Runs a consume benchmark: each consumer reads its partition from the
/// beginning to the high watermark it saw at the start.
pub async fn consume(client: &Client, p: &ConsumeParams) -> anyhow::Result<Report> {
    let Some(data_dir) = &p.from_disk else { return consume_cached(client, p).await };
    let files = crate::bench_disk::segment_files(data_dir, &p.topic)?;
    crate::bench_disk::drop_from_cache(&files)?;
    let disk = crate::bench_disk::sequential_read_mb_s(&files)?;
    let cached_before = crate::bench_disk::page_cache_bytes();
    let mut report = consume_cached(client, p).await?;
    let cached_after = crate::bench_disk::page_cache_bytes();
    report.disk_read_mb_s = Some(disk);
    report.page_cache_growth_mib =
        cached_before.zip(cached_after).map(|(b, a)| (a as f64 - b as f64) / (1 << 20) as f64);
    Ok(report)
}

/// [`consume`] of whatever the page cache holds.
async fn consume_cached(client: &Client, p: &ConsumeParams) -> anyhow::Result<Report> {
    let info = client.topic_info(&p.topic).await?;
    let partitions = info.leaders.len() as u32;
    if p.through_consumer {
        return consume_records(client, p, partitions).await;
    }
    let Run { records, bytes, stop, rss, cpu, all_bytes, .. } = Run::start("consume", p.broker_pid);
    let start = Instant::now();
    let end = start + p.duration;
    let mut tasks = Vec::new();
    for i in 0..p.consumers {
        let pc = client.partition_client(p.topic.clone(), (i as u32) % partitions);
        let (records, bytes, fetch_bytes) = (records.clone(), bytes.clone(), p.fetch_bytes);
        tasks.push(tokio::spawn(async move {
            let mut h = histogram();
            let mut offset = pc.list_offset(tally_client::OffsetSpec::Earliest).await?.unwrap_or(0);
            let target = pc.list_offset(tally_client::OffsetSpec::Latest).await?.unwrap_or(0);
            while offset < target && Instant::now() < end {
                let t0 = Instant::now();
                let fetched = match pc.fetch(offset, fetch_bytes, Duration::from_millis(100)).await {
                    Ok(f) => f,
                    // Retention moved the log start past us: go on from there.
                    Err(e) if e.code() == Some(tally_client::ErrorCode::OffsetOutOfRange) => {
                        offset =
                            pc.list_offset(tally_client::OffsetSpec::Earliest).await?.unwrap_or(offset).max(offset);
                        continue;
                    }
                    Err(e) => return Err(e.into()),
                };
                h.saturating_record(t0.elapsed().as_micros() as u64);
                for b in &fetched.batches {
                    let hd = b.header();
                    let fresh = (hd.next_offset() - offset.max(hd.base_offset())).max(0) as u64;
                    records.fetch_add(fresh, Ordering::Relaxed);
                    bytes.fetch_add(b.len() as u64, Ordering::Relaxed);
                }
                offset = fetched.next_offset().unwrap_or(offset).max(offset);
            }
            anyhow::Ok(h)
        }));
    }
    let run = Run { tasks, records, bytes, stop, rss, cpu, all_bytes };
    run.finish(|| start.elapsed()).await
}

/// The consume benchmark through the `Consumer`: each consumer reads its
/// partition from the beginning to the high watermark it saw at the start,
/// with `poll`; bytes are record keys and values; latency is per `poll`.
async fn consume_records(client: &Client, p: &ConsumeParams, partitions: u32) -> anyhow::Result<Report> {
    let Run { records, bytes, stop, rss, cpu, all_bytes, .. } = Run::start("consume", p.broker_pid);
    let start = Instant::now();
    let end = start + p.duration;
    let mut tasks = Vec::new();
    for i in 0..p.consumers {
        let partition = (i as u32) % partitions;
        let (client, topic, records, bytes, all_bytes) =
            (client.clone(), p.topic.clone(), records.clone(), bytes.clone(), all_bytes.clone());
        let mut config = tally_client::ConsumerConfig::default();
        config.max_bytes = p.fetch_bytes;
        config.partition_max_bytes = p.fetch_bytes;
        tasks.push(tokio::spawn(async move {
            let mut h = histogram();
            let pc = client.partition_client(topic.clone(), partition);
            let target = pc.list_offset(tally_client::OffsetSpec::Latest).await?.unwrap_or(0);
            let consumer = tally_client::Consumer::new(client, config);
            consumer.assign(&topic, partition, tally_client::SeekTo::Beginning).await?;
            while consumer.position(&topic, partition).unwrap_or(0) < target && Instant::now() < end {
                let t0 = Instant::now();
                let got = consumer.poll().await?;
                h.saturating_record(t0.elapsed().as_micros() as u64);
                let size: usize = got
                    .iter()
                    .map(|r| r.key.as_ref().map_or(0, |k| k.len()) + r.value.as_ref().map_or(0, |v| v.len()))
                    .sum();
                records.fetch_add(got.len() as u64, Ordering::Relaxed);
                bytes.fetch_add(size as u64, Ordering::Relaxed);
                all_bytes.fetch_add(size as u64, Ordering::Relaxed);
            }
            anyhow::Ok(h)
        }));
    }
    let run = Run { tasks, records, bytes, stop, rss, cpu, all_bytes };
    run.finish(|| start.elapsed()).await
}

/// Parameters of the replication sweep ([`replication_sweep`]).
#[derive(Debug, Clone)]
pub struct SweepParams {
    /// The `tally` binary the brokers run.
    pub binary: std::path::PathBuf,
    /// Where the three brokers keep their data (one directory each).
    pub data_dir: std::path::PathBuf,
    /// Partition counts to try.
    pub partitions: Vec<u32>,
    /// Record sizes to try, in bytes.
    pub record_sizes: Vec<usize>,
    /// Producers per partition.
    pub producers_per_partition: usize,
    /// Measured time per run.
    pub duration: Duration,
    /// Unmeasured time before it.
    pub warmup: Duration,
}

/// One run of the sweep.
#[derive(Debug, Clone)]
pub struct SweepRow {
    /// Partitions of the topic.
    pub partitions: u32,
    /// Value bytes per record.
    pub record_size: usize,
    /// `0`, `1`, `all`, or `all @ 50%` (paced at half of acks=all's rate).
    pub acks: String,
    /// The figures.
    pub report: Report,
}

/// Creates the topic of `p` and waits until every partition has all its
/// replicas in sync and its leader serves it.
pub async fn create_replicated(client: &Client, p: &ProduceParams) -> anyhow::Result<()> {
    let topic = NewTopic {
        name: p.topic.clone(),
        partitions: p.partitions,
        replication_factor: p.replication_factor,
        configs: p.topic_configs.iter().cloned().collect(),
    };
    client.admin().create_topic(topic).await.context("cannot create the benchmark topic")?;
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let d = client.admin().describe_topic(&p.topic).await;
        let ready = d.is_ok_and(|d| {
            d.partitions.iter().all(|q| q.isr.len() == p.replication_factor as usize && q.high_watermark >= 0)
        });
        if ready {
            client.refresh_metadata(std::slice::from_ref(&p.topic)).await?;
            return Ok(());
        }
        anyhow::ensure!(Instant::now() < deadline, "topic {} never had every replica in sync", p.topic);
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// `tally serve` child processes (three unless asked otherwise) on free
/// local ports forming one cluster, every broker a controller voter, with
/// data under a directory of the caller's, each watched for its peak
/// RssAnon; for the benchmarks that need replication.
pub struct LocalCluster {
    processes: Vec<crate::child::BrokerProcess>,
    stop: Arc<AtomicBool>,
    watches: Vec<Option<std::thread::JoinHandle<(u64, u64)>>>,
    /// A client of the cluster.
    pub client: Client,
}

impl LocalCluster {
    /// Starts three brokers (the `tally` binary at `binary`, data under
    /// `data_dir`) and waits until all three are registered.
    pub async fn start(binary: &std::path::Path, data_dir: &std::path::Path) -> anyhow::Result<LocalCluster> {
        Self::start_with(binary, data_dir, 3, &[]).await
    }

    /// [`LocalCluster::start`] with `brokers` brokers (node ids 1 ..=
    /// brokers, data in `data_dir/ID`), each also given `args` (e.g.
    /// `--metrics-listen 127.0.0.1:0`); waits until all are registered.
    pub async fn start_with(
        binary: &std::path::Path,
        data_dir: &std::path::Path,
        brokers: u32,
        args: &[&str],
    ) -> anyhow::Result<LocalCluster> {
        anyhow::ensure!(brokers >= 1, "a cluster needs at least one broker");
        let ports: Vec<u16> = (0..brokers)
            .map(|_| std::net::TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).map(|a| a.port()))
            .collect::<Result<_, _>>()?;
        let voters =
            ports.iter().enumerate().map(|(i, port)| format!("{}@127.0.0.1:{port}", i + 1)).collect::<Vec<_>>();
        let voters = voters.join(",");
        let mut starting = Vec::new();
        for (i, port) in ports.iter().enumerate() {
            let id = (i + 1).to_string();
            let dir = data_dir.join(&id);
            let mut args_owned: Vec<String> =
                ["--node-id", id.as_str(), "--voters", voters.as_str()].map(str::to_string).to_vec();
            args_owned.extend(args.iter().map(|a| a.to_string()));
            let listen = format!("127.0.0.1:{port}");
            let binary = binary.to_path_buf();
            let process = tokio::task::spawn_blocking(move || {
                let args: Vec<&str> = args_owned.iter().map(String::as_str).collect();
                crate::child::BrokerProcess::start_listening(&binary, &dir, &listen, &args, &[])
            });
            starting.push(process);
        }
        let mut processes = Vec::new();
        for b in starting {
            processes.push(b.await??);
        }
        let addresses: Vec<String> = processes.iter().map(|b| b.address.clone()).collect();
        let client = Client::builder().bootstrap(addresses).connect().await?;
        let deadline = Instant::now() + Duration::from_secs(30);
        let wanted = processes.len();
        while !client
            .admin()
            .describe_cluster()
            .await
            .is_ok_and(|c| c.brokers.iter().filter(|b| !b.fenced).count() == wanted)
        {
            anyhow::ensure!(Instant::now() < deadline, "the {wanted} brokers did not all register within 30 s");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let stop = Arc::new(AtomicBool::new(false));
        let watches = processes.iter().map(|b| watch_rss(Some(b.pid()), stop.clone())).collect();
        Ok(LocalCluster { processes, stop, watches, client })
    }

    /// The brokers' processes, broker 1 first.
    pub fn processes(&self) -> &[crate::child::BrokerProcess] {
        &self.processes
    }

    /// Stops the brokers; returns each one's peak RssAnon in MiB.
    pub async fn stop(self) -> Vec<(u32, f64)> {
        self.stop.store(true, Ordering::Relaxed);
        let mut peaks = Vec::new();
        for (i, watch) in self.watches.into_iter().enumerate() {
            let (kib, _) = watch.and_then(|h| h.join().ok()).unwrap_or((0, 0));
            peaks.push((i as u32 + 1, kib as f64 / 1024.0));
        }
        for b in self.processes {
            let _ = tokio::task::spawn_blocking(move || b.stop()).await;
        }
        peaks
    }
}

/// A three-broker local cluster (child processes), each topic with
/// replication factor 3 and `min_insync_replicas` 2, and produce runs over
/// every combination of partitions, record size and acks (0, 1, all), plus
/// acks=all paced at half of its measured rate. Calls `row` after each run;
/// returns the peak RssAnon of each broker in MiB.
pub async fn replication_sweep(p: &SweepParams, mut row: impl FnMut(&SweepRow)) -> anyhow::Result<Vec<(u32, f64)>> {
    let cluster = LocalCluster::start(&p.binary, &p.data_dir).await?;
    let client = cluster.client.clone();
    for &partitions in &p.partitions {
        for &record_size in &p.record_sizes {
            let records_per_batch = (100_000 / record_size.max(1)).clamp(1, 1000);
            let mut all_rate = None;
            for acks in [Acks::None, Acks::Leader, Acks::All, Acks::All] {
                let paced = acks == Acks::All && all_rate.is_some();
                let label = match (acks, paced) {
                    (Acks::None, _) => "0".to_string(),
                    (Acks::Leader, _) => "1".to_string(),
                    (_, false) => "all".to_string(),
                    (_, true) => "all @ 50%".to_string(),
                };
                let topic = format!("sweep-p{partitions}-s{record_size}-{}", label.replace([' ', '@', '%'], ""));
                let params = ProduceParams {
                    topic: topic.clone(),
                    producers: partitions as usize * p.producers_per_partition.max(1),
                    partitions,
                    record_size,
                    records_per_batch,
                    acks,
                    duration: p.duration,
                    warmup: p.warmup,
                    topic_configs: vec![("min_insync_replicas".into(), "2".into())],
                    broker_pid: None,
                    replication_factor: 3,
                    compression: tally_client::Compression::None,
                    rate_records_per_s: if paced { all_rate.map(|r: f64| r / 2.0) } else { None },
                    through_producer: false,
                    idempotence: None,
                    max_in_flight: None,
                };
                create_replicated(&client, &params).await?;
                let report = produce(&client, &params).await?;
                if acks == Acks::All && !paced {
                    all_rate = Some(report.records_per_s);
                }
                row(&SweepRow { partitions, record_size, acks: label, report });
                client.admin().delete_topic(&topic).await?;
            }
        }
    }
    Ok(cluster.stop().await)
}
