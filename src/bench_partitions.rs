//! `tally bench partitions`: what a partition costs a broker. One `tally
//! serve` child process gets `count` partitions (one topic, or `topics`
//! topics sharing them), and the benchmark prints the disk allocated (real
//! blocks, as `du` counts them), RssAnon, open descriptors and memory maps,
//! the time to create them and to serve them again after a clean stop and
//! after SIGKILL, and produce throughput through one `Producer` whose
//! unkeyed records spread over all of them (sticky), against the same on an
//! 8-partition topic.
//!
//! With more than one broker ([`PartitionsParams::brokers`]) it measures
//! replication at partition scale instead: see [`replicated`].

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use futures_util::StreamExt as _;
use tally_client::{Acks, Client, NewTopic, Producer, ProducerConfig, ProducerRecord};

use crate::bench::text_values;
use crate::child::{BrokerProcess, rss_anon_kib};

pub mod replicated;

/// What to measure.
#[derive(Debug, Clone)]
pub struct PartitionsParams {
    /// The `tally` binary.
    pub binary: PathBuf,
    /// The broker's data directory (created; its contents are the broker's).
    pub data_dir: PathBuf,
    /// Partitions in all.
    pub count: u32,
    /// Topics sharing them (`count / topics` partitions each).
    pub topics: u32,
    /// Seconds of each produce run (the replicated mode: of each acks=all
    /// latency run).
    pub produce: Duration,
    /// Value bytes per record.
    pub record_size: usize,
    /// Brokers: 1 measures one broker ([`run`]); more, a cluster of them
    /// ([`replicated::run`]).
    pub brokers: u32,
    /// Replicas per partition (at most `brokers`).
    pub replication_factor: u32,
    /// Seconds of each quiet window of the replicated mode.
    pub idle: Duration,
}

/// The figures.
#[derive(Debug, Clone, Default)]
pub struct PartitionsReport {
    /// Partitions created.
    pub partitions: u64,
    /// Seconds from the first create request until the broker leads every partition.
    pub create_s: f64,
    /// Bytes of real blocks under the data directory after creation.
    pub disk_bytes: u64,
    /// Broker RssAnon after creation, KiB (and before any topic).
    pub rss_anon_kib: (u64, u64),
    /// Open descriptors after creation (and before).
    pub fds: (u64, u64),
    /// Memory maps after creation (and before).
    pub maps: (u64, u64),
    /// Seconds from a clean restart's spawn until it leads every partition again.
    pub restart_clean_s: f64,
    /// The same after SIGKILL (every active segment recovered).
    pub restart_killed_s: f64,
    /// Records/s through one Producer over the first topic's partitions
    /// (all of them with one topic), and over an 8-partition topic.
    pub produce_records_per_s: (f64, f64),
}

impl std::fmt::Display for PartitionsReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let per = |total: u64, base: u64| (total.saturating_sub(base)) as f64 / self.partitions.max(1) as f64;
        writeln!(f, "partitions                {}", self.partitions)?;
        writeln!(f, "create until served       {:.2} s", self.create_s)?;
        writeln!(
            f,
            "disk allocated (du)       {:.1} MiB ({:.1} KiB per partition)",
            self.disk_bytes as f64 / (1 << 20) as f64,
            self.disk_bytes as f64 / 1024.0 / self.partitions.max(1) as f64
        )?;
        writeln!(
            f,
            "broker RssAnon            {:.1} MiB ({:.1} KiB per partition above the empty broker's {:.1} MiB)",
            self.rss_anon_kib.0 as f64 / 1024.0,
            per(self.rss_anon_kib.0, self.rss_anon_kib.1),
            self.rss_anon_kib.1 as f64 / 1024.0
        )?;
        writeln!(f, "open descriptors          {} ({:.2} per partition)", self.fds.0, per(self.fds.0, self.fds.1))?;
        writeln!(f, "memory maps               {} ({:.2} per partition)", self.maps.0, per(self.maps.0, self.maps.1))?;
        writeln!(f, "restart after clean stop  {:.2} s until every partition is led", self.restart_clean_s)?;
        writeln!(f, "restart after SIGKILL     {:.2} s until every partition is led", self.restart_killed_s)?;
        let (all, eight) = self.produce_records_per_s;
        write!(
            f,
            "produce, sticky, 1 Producer  {all:.0} records/s over topic p0, {eight:.0} over 8 partitions ({:.0}%)",
            100.0 * all / eight.max(1.0)
        )
    }
}

fn count_entries(dir: &str) -> u64 {
    std::fs::read_dir(dir).map_or(0, |d| d.count() as u64)
}

fn maps_of(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/maps")).map_or(0, |m| m.lines().count() as u64)
}

/// Bytes of real blocks of every file under `dir` (what `du` reports).
pub fn allocated_bytes(dir: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    let Ok(entries) = std::fs::read_dir(dir) else { return 0 };
    entries
        .filter_map(Result::ok)
        .map(|e| match e.metadata() {
            Ok(m) if m.is_dir() => allocated_bytes(&e.path()),
            Ok(m) => m.blocks() * 512,
            Err(_) => 0,
        })
        .sum()
}

/// `GET /metrics` of the endpoint at `metrics`: the body, or `None` when it
/// cannot be read.
async fn scrape(metrics: &str) -> Option<String> {
    let metrics = metrics.to_string();
    tokio::task::spawn_blocking(move || {
        use std::io::{Read, Write};
        let mut s = std::net::TcpStream::connect(&metrics).ok()?;
        s.set_read_timeout(Some(Duration::from_secs(30))).ok()?;
        write!(s, "GET /metrics HTTP/1.1\r\nHost: {metrics}\r\nConnection: close\r\n\r\n").ok()?;
        let mut body = String::new();
        s.read_to_string(&mut body).ok()?;
        Some(body)
    })
    .await
    .ok()
    .flatten()
}

/// The value of the unlabelled series `name` in a scrape's `body`.
fn metric_value(body: &str, name: &str) -> Option<f64> {
    body.lines().find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')).and_then(|v| v.trim().parse::<f64>().ok())
}

/// Partitions the broker leads, read from its metrics endpoint.
async fn partitions_led(metrics: &str) -> Option<u64> {
    metric_value(&scrape(metrics).await?, "tally_partitions_leader").map(|v| v as u64)
}

async fn wait_led(metrics: &str, count: u64, limit: Duration) -> anyhow::Result<()> {
    let deadline = Instant::now() + limit;
    loop {
        if partitions_led(metrics).await.is_some_and(|n| n >= count) {
            return Ok(());
        }
        anyhow::ensure!(Instant::now() < deadline, "the broker did not lead all {count} partitions within {limit:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn start(p: &PartitionsParams) -> anyhow::Result<BrokerProcess> {
    BrokerProcess::start(&p.binary, &p.data_dir, &["--metrics-listen", "127.0.0.1:0"])
}

/// Records acknowledged per second through one idempotent Producer sending
/// unkeyed records (the sticky partitioner spreads them) to `topic`.
async fn produce_rate(client: &Client, topic: &str, p: &PartitionsParams) -> anyhow::Result<f64> {
    let mut config = ProducerConfig::default();
    config.acks = Acks::All;
    let producer = Producer::try_new(client.clone(), config)?;
    let acked = Arc::new(AtomicU64::new(0));
    let end = Instant::now() + p.produce;
    let mut tasks = Vec::new();
    for _ in 0..2 {
        let (producer, acked, topic) = (producer.clone(), acked.clone(), topic.to_string());
        let values = text_values(p.record_size, 64);
        tasks.push(tokio::spawn(async move {
            let mut pending = std::collections::VecDeque::new();
            let mut sent = 0usize;
            while Instant::now() < end {
                for _ in 0..64 {
                    pending.push_back(producer.send(ProducerRecord::new(&topic, &values[sent % values.len()])).await?);
                    sent += 1;
                }
                while pending.len() > 4096 {
                    if let Some(d) = pending.pop_front() {
                        d.await?;
                        acked.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
            anyhow::Ok(())
        }));
    }
    let started = Instant::now();
    for t in tasks {
        t.await??;
    }
    let elapsed = started.elapsed().as_secs_f64();
    producer.close().await;
    Ok(acked.load(Ordering::Relaxed) as f64 / elapsed)
}

/// Runs the benchmark; `progress` hears what it is doing.
pub async fn run(p: &PartitionsParams, mut progress: impl FnMut(&str)) -> anyhow::Result<PartitionsReport> {
    anyhow::ensure!(
        p.brokers == 1 && p.replication_factor == 1,
        "one broker, replication factor 1: the replicated mode is replicated::run"
    );
    anyhow::ensure!(p.count > 0 && p.topics > 0 && p.topics <= p.count, "--count and --topics must be 1 ..= count");
    anyhow::ensure!(
        p.count.is_multiple_of(p.topics),
        "--count {} does not split evenly over {} topics",
        p.count,
        p.topics
    );
    std::fs::create_dir_all(&p.data_dir)?;
    let mut report = PartitionsReport { partitions: u64::from(p.count), ..Default::default() };
    let broker = start(p)?;
    let metrics = broker.metrics_address.clone().context("the broker printed no metrics address")?;
    let client = Client::builder().bootstrap([broker.address.clone()]).connect().await?;
    wait_led(&metrics, 0, Duration::from_secs(30)).await?;
    let pid = broker.pid();
    let fds_path = format!("/proc/{pid}/fd");
    let before = (rss_anon_kib(pid).unwrap_or(0), count_entries(&fds_path), maps_of(pid));

    progress(&format!("creating {} partitions in {} topic(s)", p.count, p.topics));
    let per_topic = p.count / p.topics;
    let started = Instant::now();
    let creates = (0..p.topics).map(|t| {
        let client = client.clone();
        async move { client.admin().create_topic(NewTopic::new(format!("p{t}"), per_topic)).await }
    });
    // A few creations at a time, as an operator's script would send them.
    let mut creates = futures_util::stream::iter(creates).buffer_unordered(16);
    while let Some(created) = creates.next().await {
        created.context("create topic")?;
    }
    drop(creates);
    wait_led(&metrics, u64::from(p.count), Duration::from_secs(600)).await?;
    report.create_s = started.elapsed().as_secs_f64();
    // Let the first checkpoints and maps settle before counting.
    tokio::time::sleep(Duration::from_secs(2)).await;
    report.disk_bytes = allocated_bytes(&p.data_dir);
    report.rss_anon_kib = (rss_anon_kib(pid).unwrap_or(0), before.0);
    report.fds = (count_entries(&fds_path), before.1);
    report.maps = (maps_of(pid), before.2);

    progress("producing over all of them, then over 8");
    client.admin().create_topic(NewTopic::new("eight", 8)).await?;
    // The first topic: all the partitions when there is one topic.
    let all = produce_rate(&client, "p0", p).await?;
    let eight = produce_rate(&client, "eight", p).await?;
    report.produce_records_per_s = (all, eight);
    drop(client);
    let led = u64::from(p.count) + 8;

    progress("restarting after a clean stop");
    broker.stop()?;
    let started = Instant::now();
    let broker = start(p)?;
    let metrics = broker.metrics_address.clone().context("no metrics address")?;
    wait_led(&metrics, led, Duration::from_secs(600)).await?;
    report.restart_clean_s = started.elapsed().as_secs_f64();

    progress("restarting after SIGKILL");
    drop(broker); // SIGKILL
    let started = Instant::now();
    let broker = start(p)?;
    let metrics = broker.metrics_address.clone().context("no metrics address")?;
    wait_led(&metrics, led, Duration::from_secs(600)).await?;
    report.restart_killed_s = started.elapsed().as_secs_f64();
    broker.stop()?;
    Ok(report)
}
