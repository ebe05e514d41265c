//! `tally bench sweep`: the acks benchmark. Every combination of acks level
//! (0, 1, all), record size, partition count and idempotence is one
//! *point*; each point gets a fresh topic (replication factor and
//! `min_insync_replicas` from the config), producers and consumers running
//! together for a fixed time, and yields records/s, MB/s, produce latency
//! (send to acknowledgement) and end-to-end latency (send to a consumer in
//! this process receiving it).
//!
//! How a point is measured:
//! - Records go through the batching [`Producer`], one producer per point
//!   shared by `partitions × producers_per_partition` tasks, each task
//!   writing one partition. Idempotence is the producer's own setting, so
//!   the idempotent points pay what an application would pay.
//! - Each record's first 8 bytes are a [stamp](STAMP_BYTES): nanoseconds
//!   since one `Instant` shared by producers and consumers. The clock is read
//!   once per chunk of up to [`CHUNK_RECORDS`] records (a clock read per
//!   record would cost a noticeable part of the send loop); the chunk's
//!   first record is flagged as sampled, and its acknowledgement and its
//!   receipt by the consumer are the latency samples.
//! - Only records sent inside the measured window (after the warm-up)
//!   count, for rates and latencies alike.
//! - Closed loop by default: a point keeps at most
//!   [`SweepConfig::unacked_bytes`] of record values sent but not yet
//!   acknowledged (split over its tasks), so a closed loop measures the
//!   pipeline, not a 64 MiB client queue; its latency is about that
//!   amount over the throughput (Little's law). With
//!   `rate_records_per_s` the tasks release records on a 1 ms tick at that
//!   total rate instead (Kafka's `kafka-producer-perf-test --throughput`):
//!   latency at a fixed load.
//!
//! Invariants: idempotence=on points exist only for acks=all (the client
//! refuses the others; [`SweepConfig::plan`] lists them as skipped);
//! [`SweepConfig::validate`] refuses impossible settings before any broker
//! starts or any topic is created.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context as _, anyhow};
use hdrhistogram::Histogram;
use indicatif::ProgressBar;
use serde_json::{Value, json};
use tally_client::{
    Acks, Client, Consumer, ConsumerConfig, DeliveryFuture, OffsetSpec, Producer, ProducerConfig, ProducerRecord,
    SeekTo,
};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinSet;

use crate::bench::{LocalCluster, ProduceParams, create_replicated, text_values};

/// Brokers of the cluster the sweep starts itself.
pub const LOCAL_BROKERS: u32 = 3;
/// Bytes at the start of every record value holding its send stamp.
pub const STAMP_BYTES: usize = 8;
/// Largest record size the sweep accepts (a batch must fit the broker's
/// default `max_message_bytes` of 1 MiB).
pub const RECORD_SIZE_MAX: usize = 512 << 10;
/// Most records sent per clock reading; one of them is sampled. A point
/// uses fewer when its unacknowledged budget is small (large records, many
/// partitions), so the budget still spans [`CHUNKS_IN_FLIGHT_MIN`] chunks.
pub const CHUNK_RECORDS: usize = 64;
/// Chunks a producer task's unacknowledged budget spans at least.
pub const CHUNKS_IN_FLIGHT_MIN: usize = 8;
/// Default of [`SweepConfig::unacked_bytes`]: 4 MiB.
pub const UNACKED_BYTES_DEFAULT: usize = 4 << 20;
/// Longest the consumers may take, after the producers stop, to read what
/// was produced.
pub const DRAIN_MAX: Duration = Duration::from_secs(10);
/// The pacing tick with a target rate.
const PACE_TICK: Duration = Duration::from_millis(1);
/// The stamp's flag marking a sampled record.
const SAMPLED: u64 = 1 << 63;

/// Which cluster the sweep measures.
#[derive(Debug, Clone)]
pub enum ClusterChoice {
    /// [`LOCAL_BROKERS`] `tally serve` child processes started for the
    /// sweep and stopped after it.
    Local {
        /// The `tally` binary the brokers run.
        binary: PathBuf,
        /// Where the brokers keep their data (one directory each); the
        /// caller removes it.
        data_dir: PathBuf,
    },
    /// A running cluster reached through these bootstrap addresses.
    Existing {
        /// `host:port` of one or more brokers.
        bootstrap: Vec<String>,
    },
}

/// Everything a sweep needs; check it with [`SweepConfig::validate`].
#[derive(Debug, Clone)]
pub struct SweepConfig {
    /// The cluster to measure.
    pub cluster: ClusterChoice,
    /// Acknowledgement levels to try.
    pub acks: Vec<Acks>,
    /// Record value sizes to try, in bytes ([`STAMP_BYTES`] ..= [`RECORD_SIZE_MAX`]).
    pub record_sizes: Vec<usize>,
    /// Partition counts to try.
    pub partitions: Vec<u32>,
    /// Idempotence settings to try (`true` only combines with acks=all).
    pub idempotence: Vec<bool>,
    /// Measured time per point.
    pub duration: Duration,
    /// Unmeasured time before it, per point.
    pub warmup: Duration,
    /// Total records per second to hold; `None` for a closed loop.
    pub rate_records_per_s: Option<f64>,
    /// Replicas per partition of each point's topic.
    pub replication_factor: u32,
    /// `min_insync_replicas` of each point's topic.
    pub min_insync_replicas: u32,
    /// Producer tasks per partition (sharing the point's one producer).
    pub producers_per_partition: usize,
    /// Bytes of record values a point keeps sent but unacknowledged at
    /// most, split over its producer tasks (each gets at least two
    /// batches' worth). Kafka's perf
    /// tool has its producer's `buffer.memory` (32 MiB) in this role.
    pub unacked_bytes: usize,
}

/// Settings [`SweepConfig::validate`] refused, every problem at once.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InvalidSweep {
    /// One sentence per problem, saying why.
    pub problems: Vec<String>,
}

impl std::fmt::Display for InvalidSweep {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "impossible sweep settings:")?;
        for p in &self.problems {
            write!(f, "\n  - {p}")?;
        }
        Ok(())
    }
}

impl std::error::Error for InvalidSweep {}

/// One combination of the sweep's dimensions.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Point {
    /// Acknowledgement level.
    pub acks: Acks,
    /// Whether the producer is idempotent.
    pub idempotence: bool,
    /// Value bytes per record.
    pub record_size: usize,
    /// Partitions of the topic.
    pub partitions: u32,
}

impl Point {
    /// Whether the client can run it: idempotence needs acks=all.
    pub fn is_possible(&self) -> bool {
        !self.idempotence || self.acks == Acks::All
    }

    /// The acks level and idempotence, as the chart groups points:
    /// `acks=0`, `acks=1`, `acks=all`, `acks=all, idempotent`.
    pub fn acks_group(&self) -> String {
        let idempotent = if self.idempotence { ", idempotent" } else { "" };
        format!("acks={}{idempotent}", acks_label(self.acks))
    }
}

/// The points a config runs, in run and report order (acks, idempotence,
/// record size, partitions), and those it skips as impossible.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Plan {
    /// Points to run.
    pub points: Vec<Point>,
    /// Combinations the client cannot run (idempotence without acks=all).
    pub skipped: Vec<Point>,
}

/// `0`, `1` or `all`, as the command line spells acks levels.
pub fn acks_label(acks: Acks) -> &'static str {
    match acks {
        Acks::None => "0",
        Acks::Leader => "1",
        Acks::All => "all",
    }
}

fn acks_rank(acks: Acks) -> u8 {
    match acks {
        Acks::None => 0,
        Acks::Leader => 1,
        Acks::All => 2,
    }
}

/// `100 B`, `1 KiB`, `10 KiB`: a record size for people.
pub fn size_label(bytes: usize) -> String {
    if bytes >= 1024 && bytes.is_multiple_of(1024) { format!("{} KiB", bytes / 1024) } else { format!("{bytes} B") }
}

impl SweepConfig {
    /// Checks the settings, listing every problem at once: empty
    /// dimensions, sizes and counts out of range, a replication factor the
    /// local cluster cannot hold, acks=all with `min_insync_replicas`
    /// above the replication factor (never acknowledged), and a sweep with
    /// no possible point. An existing cluster's size is checked when the
    /// sweep connects (see [`run_sweep`]).
    pub fn validate(&self) -> Result<(), InvalidSweep> {
        let mut problems = Vec::new();
        for (name, empty) in [
            ("--acks", self.acks.is_empty()),
            ("--record-sizes", self.record_sizes.is_empty()),
            ("--partitions", self.partitions.is_empty()),
            ("--idempotence", self.idempotence.is_empty()),
        ] {
            if empty {
                problems.push(format!("{name} is empty: give at least one value"));
            }
        }
        for &size in &self.record_sizes {
            if !(STAMP_BYTES..=RECORD_SIZE_MAX).contains(&size) {
                problems.push(format!(
                    "record size {size} is outside {STAMP_BYTES} ..= {RECORD_SIZE_MAX} bytes (each record carries an \
                     {STAMP_BYTES}-byte send timestamp, and a batch must fit the broker's 1 MiB message limit)"
                ));
            }
        }
        if self.partitions.contains(&0) {
            problems.push("a partition count of 0: a topic needs at least one partition".into());
        }
        if self.duration.is_zero() {
            problems.push("--duration-s must be above 0".into());
        }
        if let Some(rate) = self.rate_records_per_s
            && !(rate.is_finite() && rate > 0.0)
        {
            problems.push(format!("--rate must be a positive number of records per second, got {rate}"));
        }
        if self.unacked_bytes == 0 {
            problems.push("--unacked-kib must be above 0".into());
        }
        if self.producers_per_partition == 0 {
            problems.push("--producers-per-partition must be at least 1".into());
        }
        let (rf, min_isr) = (self.replication_factor, self.min_insync_replicas);
        if rf == 0 {
            problems.push("--replication-factor must be at least 1".into());
        }
        if min_isr == 0 {
            problems.push("--min-insync-replicas must be at least 1".into());
        }
        if matches!(self.cluster, ClusterChoice::Local { .. }) && rf > LOCAL_BROKERS {
            problems.push(format!(
                "replication factor {rf} needs {rf} brokers, but the local cluster has {LOCAL_BROKERS}: lower \
                 --replication-factor, or pass --existing to measure a larger cluster"
            ));
        }
        if self.acks.contains(&Acks::All) && min_isr > rf {
            problems.push(format!(
                "acks=all with --min-insync-replicas {min_isr} above --replication-factor {rf} could never be \
                 acknowledged (every produce would be NOT_ENOUGH_REPLICAS): lower --min-insync-replicas or leave \
                 acks=all out"
            ));
        }
        let plan = self.plan();
        if plan.points.is_empty() && !plan.skipped.is_empty() {
            problems.push(
                "no point to run: idempotence on needs acks=all, and --acks does not include all (add all to \
                 --acks or off to --idempotence)"
                    .into(),
            );
        }
        if problems.is_empty() { Ok(()) } else { Err(InvalidSweep { problems }) }
    }

    /// The points, each dimension sorted and without repeats.
    pub fn plan(&self) -> Plan {
        let mut acks = self.acks.clone();
        acks.sort_by_key(|a| acks_rank(*a));
        acks.dedup();
        let mut idempotence = self.idempotence.clone();
        idempotence.sort();
        idempotence.dedup();
        let mut sizes = self.record_sizes.clone();
        sizes.sort();
        sizes.dedup();
        let mut partitions = self.partitions.clone();
        partitions.sort();
        partitions.dedup();
        let mut plan = Plan { points: Vec::new(), skipped: Vec::new() };
        for &acks in &acks {
            for &idempotence in &idempotence {
                for &record_size in &sizes {
                    for &partitions in &partitions {
                        let point = Point { acks, idempotence, record_size, partitions };
                        if point.is_possible() { plan.points.push(point) } else { plan.skipped.push(point) }
                    }
                }
            }
        }
        plan
    }

    /// The parameters, for `results.json`.
    pub fn to_json(&self) -> Value {
        let cluster = match &self.cluster {
            ClusterChoice::Local { .. } => json!({ "kind": "local", "brokers": LOCAL_BROKERS }),
            ClusterChoice::Existing { bootstrap } => json!({ "kind": "existing", "bootstrap": bootstrap }),
        };
        json!({
            "cluster": cluster,
            "acks": self.acks.iter().map(|a| acks_label(*a)).collect::<Vec<_>>(),
            "record_sizes": self.record_sizes,
            "partitions": self.partitions,
            "idempotence": self.idempotence,
            "duration_s": self.duration.as_secs_f64(),
            "warmup_s": self.warmup.as_secs_f64(),
            "rate_records_per_s": self.rate_records_per_s,
            "replication_factor": self.replication_factor,
            "min_insync_replicas": self.min_insync_replicas,
            "producers_per_partition": self.producers_per_partition,
            "unacked_bytes": self.unacked_bytes,
        })
    }
}

/// p50, p99 and p99.9 of a latency, in milliseconds.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Percentiles {
    /// Median.
    pub p50: f64,
    /// 99th percentile.
    pub p99: f64,
    /// 99.9th percentile.
    pub p99_9: f64,
}

impl Percentiles {
    /// Of a histogram of microseconds; `None` when it holds no sample.
    fn of(h: &Histogram<u64>) -> Option<Percentiles> {
        let ms = |q: f64| h.value_at_quantile(q) as f64 / 1000.0;
        (!h.is_empty()).then(|| Percentiles { p50: ms(0.5), p99: ms(0.99), p99_9: ms(0.999) })
    }

    fn to_json(self) -> Value {
        json!({ "p50": self.p50, "p99": self.p99, "p99_9": self.p99_9 })
    }
}

/// The figures of one point.
#[derive(Debug, Clone, PartialEq)]
pub struct PointResult {
    /// What was measured.
    pub point: Point,
    /// Records acknowledged per second (of those sent in the window).
    pub records_per_s: f64,
    /// Megabytes (10^6) of record values acknowledged per second.
    pub mb_per_s: f64,
    /// Send to acknowledgement (acks=0: to the request being handed to the
    /// connection); `None` if no sample fell in the window.
    pub produce_latency_ms: Option<Percentiles>,
    /// Produce latency samples.
    pub produce_samples: u64,
    /// Send to receipt by a consumer in this process; `None` if no sample.
    pub end_to_end_latency_ms: Option<Percentiles>,
    /// End-to-end latency samples.
    pub end_to_end_samples: u64,
    /// Records the consumers read (warm-up included).
    pub records_consumed: u64,
}

impl PointResult {
    /// One element of `results.json`'s `results`.
    pub fn to_json(&self) -> Value {
        let p = &self.point;
        json!({
            "acks": acks_label(p.acks),
            "idempotence": p.idempotence,
            "record_size": p.record_size,
            "partitions": p.partitions,
            "records_per_s": self.records_per_s,
            "mb_per_s": self.mb_per_s,
            "produce_latency_ms": self.produce_latency_ms.map(Percentiles::to_json),
            "produce_samples": self.produce_samples,
            "end_to_end_latency_ms": self.end_to_end_latency_ms.map(Percentiles::to_json),
            "end_to_end_samples": self.end_to_end_samples,
            "records_consumed": self.records_consumed,
        })
    }
}

/// What a finished sweep measured.
#[derive(Debug, Clone)]
pub struct SweepOutcome {
    /// One per point run, in plan order.
    pub results: Vec<PointResult>,
    /// Unfenced brokers of the cluster when the sweep began.
    pub brokers: u32,
    /// Peak RssAnon in MiB of each broker the sweep started (empty for an
    /// existing cluster).
    pub broker_peak_rss_anon_mib: Vec<(u32, f64)>,
}

/// The machine the sweep ran on, for the record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Machine {
    /// CPUs this process may use.
    pub cores: usize,
    /// `model name` from /proc/cpuinfo.
    pub cpu_model: Option<String>,
    /// Kernel name and release (/proc/sys/kernel/ostype and osrelease).
    pub kernel: String,
    /// `MemTotal` from /proc/meminfo, in MiB.
    pub memory_mib: Option<u64>,
}

impl Machine {
    /// Reads the description from /proc.
    pub fn describe() -> Machine {
        let read = |path: &str| std::fs::read_to_string(path).ok().map(|s| s.trim().to_string());
        let cpu_model = read("/proc/cpuinfo").and_then(|info| {
            info.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split_once(':'))
                .map(|(_, v)| v.trim().to_string())
        });
        let memory_mib = read("/proc/meminfo").and_then(|info| {
            let line = info.lines().find(|l| l.starts_with("MemTotal:"))?;
            line.split_whitespace().nth(1)?.parse::<u64>().ok().map(|kib| kib / 1024)
        });
        let kernel = match (read("/proc/sys/kernel/ostype"), read("/proc/sys/kernel/osrelease")) {
            (Some(os), Some(release)) => format!("{os} {release}"),
            _ => std::env::consts::OS.to_string(),
        };
        Machine {
            cores: std::thread::available_parallelism().map_or(1, std::num::NonZeroUsize::get),
            cpu_model,
            kernel,
            memory_mib,
        }
    }

    /// One line for people: `2 cores (Intel ...), 7.7 GiB, Linux 6.1.0`.
    pub fn summary(&self) -> String {
        let mut s = format!("{} cores", self.cores);
        if let Some(model) = &self.cpu_model {
            s += &format!(" ({model})");
        }
        if let Some(mib) = self.memory_mib {
            s += &format!(", {:.1} GiB RAM", mib as f64 / 1024.0);
        }
        s + ", " + &self.kernel
    }

    /// For `results.json`.
    pub fn to_json(&self) -> Value {
        json!({
            "cores": self.cores,
            "cpu_model": self.cpu_model,
            "kernel": self.kernel,
            "memory_mib": self.memory_mib,
            "arch": std::env::consts::ARCH,
        })
    }
}

/// `results.json`: the tally version, when, the machine, the parameters,
/// the skipped combinations, one object per point and the brokers' peak
/// memory.
pub fn results_json(config: &SweepConfig, machine: &Machine, outcome: &SweepOutcome) -> Value {
    let skipped: Vec<Value> = config
        .plan()
        .skipped
        .iter()
        .map(|p| {
            json!({
                "acks": acks_label(p.acks),
                "idempotence": p.idempotence,
                "record_size": p.record_size,
                "partitions": p.partitions,
                "reason": "the idempotent producer needs acks=all",
            })
        })
        .collect();
    let unix_s = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs());
    json!({
        "tally_version": env!("CARGO_PKG_VERSION"),
        "finished_unix_s": unix_s,
        "machine": machine.to_json(),
        "parameters": config.to_json(),
        "brokers": outcome.brokers,
        "skipped": skipped,
        "results": outcome.results.iter().map(PointResult::to_json).collect::<Vec<_>>(),
        "broker_peak_rss_anon_mib": outcome
            .broker_peak_rss_anon_mib
            .iter()
            .map(|(broker, mib)| json!({ "broker": broker, "mib": mib }))
            .collect::<Vec<_>>(),
    })
}

/// The columns of `results.csv`, in order.
pub const CSV_HEADER: &str = "acks,idempotence,record_size,partitions,records_per_s,mb_per_s,produce_p50_ms,\
produce_p99_ms,produce_p99_9_ms,e2e_p50_ms,e2e_p99_ms,e2e_p99_9_ms,produce_samples,e2e_samples,records_consumed";

/// `results.csv`: [`CSV_HEADER`] and one line per point; a latency without
/// samples is an empty field.
pub fn results_csv(results: &[PointResult]) -> String {
    let mut out = String::from(CSV_HEADER);
    out.push('\n');
    let cells = |p: Option<Percentiles>| match p {
        Some(p) => format!("{:.3},{:.3},{:.3}", p.p50, p.p99, p.p99_9),
        None => ",,".to_string(),
    };
    for r in results {
        let p = &r.point;
        out += &format!(
            "{},{},{},{},{:.1},{:.3},{},{},{},{},{}\n",
            acks_label(p.acks),
            if p.idempotence { "on" } else { "off" },
            p.record_size,
            p.partitions,
            r.records_per_s,
            r.mb_per_s,
            cells(r.produce_latency_ms),
            cells(r.end_to_end_latency_ms),
            r.produce_samples,
            r.end_to_end_samples,
            r.records_consumed,
        );
    }
    out
}

/// The header of the table [`table_row`] prints under.
pub fn table_header() -> String {
    format!(
        "{:>4} {:>4} {:>7} {:>5} {:>11} {:>8} {:>9} {:>9} {:>9} {:>9} {:>9}",
        "acks", "idem", "bytes", "parts", "records/s", "MB/s", "p50 ms", "p99 ms", "p99.9 ms", "e2e p50", "e2e p99"
    )
}

/// One point as a table line; a latency without samples is `-`.
pub fn table_row(r: &PointResult) -> String {
    let ms = |v: Option<f64>| v.map_or_else(|| "-".to_string(), |v| format!("{v:.3}"));
    let (prod, e2e) = (r.produce_latency_ms, r.end_to_end_latency_ms);
    format!(
        "{:>4} {:>4} {:>7} {:>5} {:>11.0} {:>8.1} {:>9} {:>9} {:>9} {:>9} {:>9}",
        acks_label(r.point.acks),
        if r.point.idempotence { "on" } else { "off" },
        r.point.record_size,
        r.point.partitions,
        r.records_per_s,
        r.mb_per_s,
        ms(prod.map(|p| p.p50)),
        ms(prod.map(|p| p.p99)),
        ms(prod.map(|p| p.p99_9)),
        ms(e2e.map(|p| p.p50)),
        ms(e2e.map(|p| p.p99)),
    )
}

/// Writes `results.json`, `results.csv` and `chart.svg` (titled `title`,
/// with `footer` under it, e.g. the machine) into `dir`.
pub fn write_results(
    dir: &Path,
    json: &Value,
    results: &[PointResult],
    title: &str,
    footer: &str,
) -> anyhow::Result<()> {
    let write = |name: &str, content: &[u8]| {
        let path = dir.join(name);
        std::fs::write(&path, content).with_context(|| format!("cannot write {}", path.display()))
    };
    write("results.json", serde_json::to_string_pretty(json)?.as_bytes())?;
    write("results.csv", results_csv(results).as_bytes())?;
    write("chart.svg", crate::bench_chart::render_svg(results, title, footer)?.as_bytes())?;
    Ok(())
}

/// Runs the sweep: validates it, starts or reaches the cluster (refusing
/// an existing one with fewer live brokers than the replication factor),
/// runs every point of the plan and calls `on_point` after each. `progress`
/// gets one step per point and a live rate as its message.
pub async fn run_sweep(
    config: &SweepConfig,
    progress: &ProgressBar,
    mut on_point: impl FnMut(&PointResult),
) -> anyhow::Result<SweepOutcome> {
    config.validate()?;
    let plan = config.plan();
    let (client, local, brokers) = match &config.cluster {
        ClusterChoice::Local { binary, data_dir } => {
            progress.set_message(format!("starting {LOCAL_BROKERS} brokers"));
            let cluster = LocalCluster::start(binary, data_dir).await?;
            (cluster.client.clone(), Some(cluster), LOCAL_BROKERS)
        }
        ClusterChoice::Existing { bootstrap } => {
            let client = Client::builder()
                .bootstrap(bootstrap.iter().cloned())
                .connect()
                .await
                .with_context(|| format!("cannot reach a broker at {}", bootstrap.join(",")))?;
            let brokers = live_brokers(&client, config.replication_factor, bootstrap).await?;
            (client, None, brokers)
        }
    };
    let origin = Instant::now();
    let mut results = Vec::new();
    let mut failure = None;
    for (i, point) in plan.points.iter().enumerate() {
        let topic = format!("bench-sweep-{}-{i}", std::process::id());
        let live = Arc::new(AtomicU64::new(0));
        let ticker = tick_progress(progress.clone(), describe(point), live.clone());
        let result = run_point(&client, config, point, topic, origin, live).await;
        ticker.abort();
        match result {
            Ok(r) => {
                progress.inc(1);
                on_point(&r);
                results.push(r);
            }
            Err(e) => {
                failure = Some(e.context(format!("point {}", describe(point))));
                break;
            }
        }
    }
    let broker_peak_rss_anon_mib = match local {
        Some(cluster) => cluster.stop().await,
        None => Vec::new(),
    };
    match failure {
        Some(e) => Err(e),
        None => Ok(SweepOutcome { results, brokers, broker_peak_rss_anon_mib }),
    }
}

/// `acks=all idempotent 1 KiB × 8 partitions`: a point for progress and errors.
fn describe(p: &Point) -> String {
    let idem = if p.idempotence { " idempotent" } else { "" };
    format!("acks={}{idem} {} × {} partitions", acks_label(p.acks), size_label(p.record_size), p.partitions)
}

/// The unfenced brokers of an existing cluster, refused when fewer than
/// the replication factor.
async fn live_brokers(client: &Client, replication_factor: u32, bootstrap: &[String]) -> anyhow::Result<u32> {
    let cluster = client.admin().describe_cluster().await.context("cannot describe the cluster")?;
    let live: Vec<u32> = cluster.brokers.iter().filter(|b| !b.fenced).map(|b| b.id).collect();
    let count = u32::try_from(live.len())?;
    if count < replication_factor {
        let ids = live.iter().map(u32::to_string).collect::<Vec<_>>().join(", ");
        let noun = if count == 1 { "broker" } else { "brokers" };
        return Err(InvalidSweep {
            problems: vec![format!(
                "replication factor {replication_factor} needs {replication_factor} brokers, but the cluster at {} \
                 has {count} live {noun} ({ids}): lower --replication-factor (and --min-insync-replicas) or add \
                 brokers",
                bootstrap.join(",")
            )],
        }
        .into());
    }
    Ok(count)
}

/// Shows the point and its live acknowledged rate every half second.
fn tick_progress(progress: ProgressBar, point: String, live: Arc<AtomicU64>) -> tokio::task::JoinHandle<()> {
    progress.set_message(point.clone());
    tokio::spawn(async move {
        let mut last = 0;
        let mut every = tokio::time::interval(Duration::from_millis(500));
        every.tick().await;
        loop {
            every.tick().await;
            let now = live.load(Ordering::Relaxed);
            progress.set_message(format!("{point}: {} records/s", (now - last) * 2));
            last = now;
        }
    })
}

/// The measured window: records sent in `[from, to)` count.
#[derive(Debug, Clone, Copy)]
struct Window {
    from: Instant,
    to: Instant,
}

impl Window {
    fn contains(&self, t: Instant) -> bool {
        t >= self.from && t < self.to
    }
}

fn histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 60_000_000, 3).expect("valid bounds")
}

fn micros(d: Duration) -> u64 {
    u64::try_from(d.as_micros()).unwrap_or(u64::MAX)
}

/// The stamp of a record sent at `sent_at`: nanoseconds since `origin`,
/// with [`SAMPLED`] set on a sampled record.
fn stamp(sent_at: Instant, origin: Instant, sampled: bool) -> u64 {
    let nanos = u64::try_from(sent_at.saturating_duration_since(origin).as_nanos()).unwrap_or(u64::MAX) & !SAMPLED;
    if sampled { nanos | SAMPLED } else { nanos }
}

/// A record value's stamp: nanoseconds since the origin and whether it is
/// sampled; `None` for a value too short to hold one.
fn read_stamp(value: &[u8]) -> Option<(u64, bool)> {
    let raw = u64::from_le_bytes(value.get(..STAMP_BYTES)?.try_into().ok()?);
    Some((raw & !SAMPLED, raw & SAMPLED != 0))
}

/// Records per batch as the other producer benchmarks choose it: about
/// 100 kB, at most 1000 records.
fn records_per_batch(record_size: usize) -> usize {
    (100_000 / record_size.max(1)).clamp(1, 1000)
}

/// One point: a fresh topic, measured, then deleted.
async fn run_point(
    client: &Client,
    config: &SweepConfig,
    point: &Point,
    topic: String,
    origin: Instant,
    live: Arc<AtomicU64>,
) -> anyhow::Result<PointResult> {
    let params = ProduceParams {
        topic: topic.clone(),
        producers: config.producers_per_partition,
        partitions: point.partitions,
        record_size: point.record_size,
        records_per_batch: records_per_batch(point.record_size),
        acks: point.acks,
        duration: config.duration,
        warmup: config.warmup,
        topic_configs: vec![("min_insync_replicas".into(), config.min_insync_replicas.to_string())],
        broker_pid: None,
        replication_factor: config.replication_factor,
        compression: tally_client::Compression::None,
        rate_records_per_s: config.rate_records_per_s,
        through_producer: true,
        idempotence: Some(point.idempotence),
        max_in_flight: None,
    };
    create_replicated(client, &params).await?;
    let measured = measure(client, config, point, &params, origin, live).await;
    let deleted = client.admin().delete_topic(&topic).await;
    let result = measured?;
    deleted.with_context(|| format!("cannot delete the benchmark topic {topic}"))?;
    Ok(result)
}

/// Producers and consumers of one point, running together.
async fn measure(
    client: &Client,
    config: &SweepConfig,
    point: &Point,
    params: &ProduceParams,
    origin: Instant,
    live: Arc<AtomicU64>,
) -> anyhow::Result<PointResult> {
    let start = Instant::now();
    let window = Window { from: start + config.warmup, to: start + config.warmup + config.duration };
    let (drain_tx, drain_rx) = watch::channel(None);
    let mut consumers = JoinSet::new();
    for partition in 0..point.partitions {
        let reader = Reader { client: client.clone(), topic: params.topic.clone(), partition, origin, window };
        consumers.spawn(reader.run(drain_rx.clone()));
    }

    let mut producer_config = ProducerConfig::default();
    producer_config.acks = point.acks;
    producer_config.idempotence = Some(point.idempotence);
    producer_config.batch_bytes = (params.records_per_batch * (point.record_size + 16)).clamp(1024, 1 << 20);
    let producer = Producer::try_new(client.clone(), producer_config)?;
    let tasks = point.partitions as usize * config.producers_per_partition;
    // Records each task keeps unacknowledged, in chunks of `chunk_records`
    // (paced chunks hold one tick's records at most): the channel to the
    // collector holds the rest.
    let outstanding = (config.unacked_bytes / tasks / point.record_size).max(2 * params.records_per_batch);
    let chunk_records = (outstanding / CHUNKS_IN_FLIGHT_MIN).clamp(1, CHUNK_RECORDS);
    let rate_per_task = config.rate_records_per_s.map(|r| r / tasks as f64);
    let chunk_filled =
        rate_per_task.map_or(chunk_records as f64, |r| (r * PACE_TICK.as_secs_f64()).clamp(1.0, chunk_records as f64));
    let channel_chunks = ((outstanding as f64 / chunk_filled) as usize).max(2);
    let (mut senders, mut collectors) = (JoinSet::new(), JoinSet::new());
    for i in 0..tasks {
        let (tx, rx) = mpsc::channel(channel_chunks);
        let sender = Sender {
            producer: producer.clone(),
            topic: params.topic.clone(),
            partition: u32::try_from(i % point.partitions as usize)?,
            record_size: point.record_size,
            origin,
            start,
            end: window.to,
            rate_records_per_s: rate_per_task,
            chunk_records,
            chunks: tx,
        };
        senders.spawn(sender.run());
        collectors.spawn(collect(rx, window, live.clone()));
    }
    // Collectors end when their senders do; a failed delivery ends its
    // collector first, and returning drops (aborts) every other task.
    let (mut produce_latency, mut records) = (histogram(), 0u64);
    while let Some(done) = collectors.join_next().await {
        let got = done??;
        produce_latency.add(&got.latency)?;
        records += got.records;
    }
    while let Some(done) = senders.join_next().await {
        done??;
    }
    producer.close().await;

    // Consumers read up to each partition's end as it stands now.
    let mut targets = Vec::new();
    for partition in 0..point.partitions {
        let pc = client.partition_client(params.topic.clone(), partition);
        targets.push(pc.list_offset(OffsetSpec::Latest).await?.unwrap_or(0));
    }
    let _ = drain_tx.send(Some(Drain { targets, deadline: Instant::now() + DRAIN_MAX }));
    let (mut e2e_latency, mut consumed) = (histogram(), 0u64);
    while let Some(done) = consumers.join_next().await {
        let got = done??;
        e2e_latency.add(&got.latency)?;
        consumed += got.records;
    }

    let secs = config.duration.as_secs_f64();
    Ok(PointResult {
        point: *point,
        records_per_s: records as f64 / secs,
        mb_per_s: (records * point.record_size as u64) as f64 / secs / 1e6,
        produce_latency_ms: Percentiles::of(&produce_latency),
        produce_samples: produce_latency.len(),
        end_to_end_latency_ms: Percentiles::of(&e2e_latency),
        end_to_end_samples: e2e_latency.len(),
        records_consumed: consumed,
    })
}

/// Records sent after one clock reading, their deliveries in send order;
/// the first is the sampled one.
struct Chunk {
    sent_at: Instant,
    deliveries: Vec<DeliveryFuture>,
}

/// One producer task: sends stamped records to one partition until the
/// window ends, handing each chunk's deliveries to its collector (whose
/// bounded channel bounds what is outstanding).
struct Sender {
    producer: Producer,
    topic: String,
    partition: u32,
    record_size: usize,
    origin: Instant,
    start: Instant,
    end: Instant,
    /// This task's share of the target rate; `None`: closed loop.
    rate_records_per_s: Option<f64>,
    /// Records per chunk (per clock reading) at most.
    chunk_records: usize,
    chunks: mpsc::Sender<Chunk>,
}

impl Sender {
    async fn run(self) -> anyhow::Result<()> {
        let mut value = text_values(self.record_size, 1).pop().unwrap_or_default();
        anyhow::ensure!(value.len() >= STAMP_BYTES, "record size {} cannot hold a stamp", self.record_size);
        let mut chunk: Option<Chunk> = None;
        let mut released = 0u64;
        'run: loop {
            // How many records may have gone by now: all of them in a
            // closed loop; with a rate, those due, without a backlog of
            // more than 10 ms (a stalled sender does not burst to catch up).
            let due = match self.rate_records_per_s {
                None => u64::MAX,
                Some(rate) => {
                    let due = (self.start.elapsed().as_secs_f64() * rate) as u64;
                    released = released.max(due.saturating_sub((rate / 100.0).max(1.0) as u64));
                    due
                }
            };
            while released < due {
                if chunk.as_ref().is_some_and(|c| c.deliveries.len() >= self.chunk_records) {
                    self.hand_over(chunk.take()).await?;
                }
                if chunk.is_none() {
                    let now = Instant::now();
                    if now >= self.end {
                        break 'run;
                    }
                    chunk = Some(Chunk { sent_at: now, deliveries: Vec::with_capacity(self.chunk_records) });
                }
                let c = chunk.as_mut().expect("set just above");
                let sampled = c.deliveries.is_empty();
                value[..STAMP_BYTES].copy_from_slice(&stamp(c.sent_at, self.origin, sampled).to_le_bytes());
                let record = ProducerRecord::new(&self.topic, &value).partition(self.partition);
                // As an application sending from a hot loop would: queue
                // without an await when there is room, wait only when not.
                let delivery = match self.producer.try_send(record) {
                    Ok(delivery) => delivery,
                    Err(tally_client::Error::WouldBlock(_)) => self.producer.send(record).await?,
                    Err(e) => return Err(e.into()),
                };
                c.deliveries.push(delivery);
                released += 1;
            }
            // Paced: this tick's records go to the collector now, so their
            // latency is observed promptly; then wait for the next tick.
            self.hand_over(chunk.take()).await?;
            if Instant::now() >= self.end {
                break;
            }
            tokio::time::sleep(PACE_TICK).await;
        }
        self.hand_over(chunk.take()).await
    }

    async fn hand_over(&self, chunk: Option<Chunk>) -> anyhow::Result<()> {
        match chunk {
            Some(chunk) => self.chunks.send(chunk).await.map_err(|_| anyhow!("the delivery collector stopped")),
            None => Ok(()),
        }
    }
}

/// What a collector saw: produce latency of sampled records and records
/// acknowledged, both of sends in the window.
struct Collected {
    latency: Histogram<u64>,
    records: u64,
}

/// Awaits every delivery of one sender in send order; a failed delivery
/// fails the point.
async fn collect(mut chunks: mpsc::Receiver<Chunk>, window: Window, live: Arc<AtomicU64>) -> anyhow::Result<Collected> {
    let mut got = Collected { latency: histogram(), records: 0 };
    while let Some(Chunk { sent_at, deliveries }) = chunks.recv().await {
        let n = deliveries.len() as u64;
        let in_window = window.contains(sent_at);
        let mut deliveries = deliveries.into_iter();
        if let Some(first) = deliveries.next() {
            first.await?;
            if in_window {
                got.latency.saturating_record(micros(sent_at.elapsed()));
            }
        }
        for delivery in deliveries {
            delivery.await?;
        }
        if in_window {
            got.records += n;
        }
        live.fetch_add(n, Ordering::Relaxed);
    }
    Ok(got)
}

/// Where the consumers stop: each partition's end offset when the
/// producers finished, or the deadline.
#[derive(Debug, Clone)]
struct Drain {
    targets: Vec<i64>,
    deadline: Instant,
}

/// One consumer task, reading one partition from its beginning.
struct Reader {
    client: Client,
    topic: String,
    partition: u32,
    origin: Instant,
    window: Window,
}

/// What a consumer saw: end-to-end latency of sampled records sent in the
/// window, and records read.
struct Consumed {
    latency: Histogram<u64>,
    records: u64,
}

impl Reader {
    async fn run(self, drain: watch::Receiver<Option<Drain>>) -> anyhow::Result<Consumed> {
        let mut config = ConsumerConfig::default();
        config.max_wait = Duration::from_millis(100);
        config.enable_auto_commit = false;
        let consumer = Consumer::new(self.client.clone(), config);
        consumer.assign(&self.topic, self.partition, SeekTo::Beginning).await?;
        let mut got = Consumed { latency: histogram(), records: 0 };
        loop {
            match consumer.poll().await {
                Ok(records) => {
                    let now = Instant::now();
                    for r in &records {
                        if let Some((nanos, true)) = r.value.as_deref().and_then(read_stamp) {
                            let sent_at = self.origin + Duration::from_nanos(nanos);
                            if self.window.contains(sent_at) {
                                got.latency.saturating_record(micros(now.saturating_duration_since(sent_at)));
                            }
                        }
                    }
                    got.records += records.len() as u64;
                }
                // A leader moving or a broker busy: the consumer rides it out.
                Err(e) if e.is_retriable() => {}
                Err(e) => return Err(e).context(format!("consuming partition {}", self.partition)),
            }
            if let Some(d) = drain.borrow().as_ref() {
                let target = d.targets.get(self.partition as usize).copied().unwrap_or(0);
                let position = consumer.position(&self.topic, self.partition).unwrap_or(0);
                if position >= target || Instant::now() >= d.deadline {
                    break;
                }
            }
        }
        Ok(got)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config() -> SweepConfig {
        SweepConfig {
            cluster: ClusterChoice::Local { binary: "tally".into(), data_dir: "/tmp/x".into() },
            acks: vec![Acks::All, Acks::None, Acks::Leader],
            record_sizes: vec![1024, 100],
            partitions: vec![8, 1],
            idempotence: vec![true, false],
            duration: Duration::from_secs(1),
            warmup: Duration::ZERO,
            rate_records_per_s: None,
            replication_factor: 3,
            min_insync_replicas: 2,
            producers_per_partition: 1,
            unacked_bytes: UNACKED_BYTES_DEFAULT,
        }
    }

    #[test]
    fn idempotent_points_exist_only_for_acks_all() {
        let plan = config().plan();
        assert_eq!(plan.points.len(), 3 * 2 * 2 + 2 * 2, "acks 0/1/all off, plus all on");
        assert!(plan.points.iter().all(|p| !p.idempotence || p.acks == Acks::All));
        assert_eq!(plan.skipped.len(), 2 * 2 * 2);
        assert!(plan.skipped.iter().all(|p| p.idempotence && p.acks != Acks::All));
        let first = plan.points[0];
        assert_eq!((first.acks, first.idempotence, first.record_size, first.partitions), (Acks::None, false, 100, 1));
        assert_eq!(plan.points.last().map(|p| p.acks_group()), Some("acks=all, idempotent".to_string()));
    }

    #[test]
    fn validate_lists_every_impossible_setting() {
        let mut c = config();
        c.acks.clear();
        c.record_sizes = vec![4];
        c.min_insync_replicas = 4;
        c.replication_factor = 4;
        let problems = c.validate().unwrap_err().problems;
        assert_eq!(problems.len(), 3, "{problems:?}");
        assert!(problems[0].contains("--acks is empty"));
        assert!(problems[1].contains("record size 4"));
        assert!(problems[2].contains("local cluster has 3"));

        let mut c = config();
        c.min_insync_replicas = 3;
        c.replication_factor = 2;
        let problems = c.validate().unwrap_err().problems;
        assert!(problems.iter().any(|p| p.contains("min-insync-replicas 3 above --replication-factor 2")));
        c.acks = vec![Acks::Leader];
        assert!(c.validate().is_ok(), "min ISR only matters to acks=all");

        let mut c = config();
        c.acks = vec![Acks::Leader];
        c.idempotence = vec![true];
        let problems = c.validate().unwrap_err().problems;
        assert!(problems[0].contains("no point to run"), "{problems:?}");
        assert!(config().validate().is_ok());
    }

    #[test]
    fn a_stamp_round_trips_with_its_sample_flag() {
        let origin = Instant::now();
        let later = origin + Duration::from_nanos(123_456_789);
        for sampled in [false, true] {
            let bytes = stamp(later, origin, sampled).to_le_bytes();
            assert_eq!(read_stamp(&bytes), Some((123_456_789, sampled)));
        }
        assert_eq!(read_stamp(&[1, 2, 3]), None);
    }

    #[test]
    fn csv_has_a_line_per_point_and_empty_fields_for_missing_latency() {
        let point = Point { acks: Acks::Leader, idempotence: false, record_size: 100, partitions: 1 };
        let r = PointResult {
            point,
            records_per_s: 10.0,
            mb_per_s: 0.001,
            produce_latency_ms: Some(Percentiles { p50: 1.0, p99: 2.0, p99_9: 3.0 }),
            produce_samples: 5,
            end_to_end_latency_ms: None,
            end_to_end_samples: 0,
            records_consumed: 10,
        };
        let csv = results_csv(&[r]);
        let lines: Vec<&str> = csv.lines().collect();
        assert_eq!(lines.len(), 2);
        assert_eq!(lines[0].split(',').count(), lines[1].split(',').count());
        assert_eq!(lines[1], "1,off,100,1,10.0,0.001,1.000,2.000,3.000,,,,5,0,10");
    }
}
